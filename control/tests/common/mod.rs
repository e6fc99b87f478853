//! Test harness for router-level tests: an opened control plane over SQLite (temp dir)
//! or a fresh database on the MariaDB named by `EMBER_TEST_MYSQL_URL`, driven with
//! `tower::ServiceExt::oneshot`.
//!
//! What the test files share (put a helper here as soon as a second file needs it):
//! `Harness` (`new`/`with_dataplane`/`open`, `project`, `token`, the `create_*` fixtures,
//! `send` → `call_bytes_with` → `call`/`call_with` → `expect`/`fault` and their `admin_*`
//! forms, `finish`), the method constants and `GIB`, `wait_while` (poll until a status
//! is left, 30 s deadline), `fields`, `ref_id`, `assert_fault`, and the macros
//! `api_test!` (a body run on both backends as `<name>::sqlite`/`<name>::mariadb`) and
//! `backend_tests!` (the two tests of an `async fn(Backend)`, named as given).

#![allow(dead_code)]

pub mod galera;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use ember_control::dataplane::mem::MemDataPlane;
use ember_control::{Control, ControlConfig};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

pub const GIB: u64 = 1 << 30;
pub const GET: Method = Method::GET;
pub const POST: Method = Method::POST;
pub const PUT: Method = Method::PUT;
pub const DELETE: Method = Method::DELETE;
pub const PATCH: Method = Method::PATCH;

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    MariaDb,
}

pub struct Harness {
    pub router: Router,
    pub control: Control,
    pub admin: String,
    pub admin_project: String,
    pub dir: tempfile::TempDir,
    mysql_db: Option<(String, String)>,
}

/// The MariaDB server URL for tests; fails loudly when unset.
pub fn mysql_base_url() -> String {
    std::env::var("EMBER_TEST_MYSQL_URL").unwrap_or_else(|_| {
        panic!(
            "EMBER_TEST_MYSQL_URL is not set: the MariaDB suite needs a running MariaDB and \
             EMBER_TEST_MYSQL_URL=mysql://ember:ember@127.0.0.1:3306/ember_test (see control/README.md)"
        )
    })
}

fn replace_db(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    format!("{base}/{db}{query}")
}

/// Create a fresh database on the test MariaDB and return its URL.
pub async fn fresh_mysql_db() -> (String, String) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let base = mysql_base_url();
    let name = format!("ember_t_{}", uuid_like());
    let mut c = sqlx::AnyConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("connect to EMBER_TEST_MYSQL_URL ({base}): {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut c)
        .await
        .unwrap();
    (replace_db(&base, &name), name)
}

pub fn uuid_like() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

impl Harness {
    /// A node with no storage pool (volume creates answer 503).
    pub async fn new(backend: Backend) -> Harness {
        Self::with_dataplane(backend, Arc::new(MemDataPlane::new())).await
    }

    /// A harness whose node has the pools of `dp`.
    pub async fn with_dataplane(backend: Backend, dp: Arc<MemDataPlane>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (database, mysql_db) = match backend {
            Backend::Sqlite => (format!("sqlite://{}/ember.db", dir.path().display()), None),
            Backend::MariaDb => {
                let (url, name) = fresh_mysql_db().await;
                (url, Some((mysql_base_url(), name)))
            }
        };
        Self::open(dir, database, mysql_db, "test-node", dp).await
    }

    /// A node with no storage pool (volume creates answer 503).
    pub async fn with_database(
        dir: tempfile::TempDir,
        database: String,
        mysql_db: Option<(String, String)>,
    ) -> Harness {
        Self::open(
            dir,
            database,
            mysql_db,
            "test-node",
            Arc::new(MemDataPlane::new()),
        )
        .await
    }

    /// Open node `node` on `database` with data plane `dp`.
    pub async fn open(
        dir: tempfile::TempDir,
        database: String,
        mysql_db: Option<(String, String)>,
        node: &str,
        dp: Arc<MemDataPlane>,
    ) -> Harness {
        let cfg = ControlConfig::new(
            dir.path().to_path_buf(),
            database,
            node.into(),
            "127.0.0.1:0".into(),
        );
        let control = Control::open(&cfg, dp).await.unwrap();
        let router = control.router();
        let admin = std::fs::read_to_string(dir.path().join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        let mut h = Harness {
            router,
            control,
            admin: admin.clone(),
            admin_project: String::new(),
            dir,
            mysql_db,
        };
        let (s, v) = h
            .call(Method::GET, "/v3/auth/tokens", Some(&admin), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        h.admin_project = v["token"]["project_id"].as_str().unwrap().to_string();
        h
    }

    /// Drop the MariaDB database (call at the end of a test).
    pub async fn finish(self) {
        if let Some((base, name)) = &self.mysql_db {
            use sqlx::Connection;
            self.control.state.db().pool.close().await;
            let mut c = sqlx::AnyConnection::connect(base).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE `{name}`")))
                .execute(&mut c)
                .await
                .unwrap();
        }
    }

    pub async fn raw(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, body)
    }

    /// A request with a JSON content type, the token (if any) and extra headers;
    /// (status, headers, body bytes).
    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("x-auth-token", t);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.raw(b.body(Body::from(body)).unwrap()).await
    }

    /// [`Harness::send`] of raw bytes; the body as JSON (`null` when empty, `{raw}` when
    /// not JSON).
    pub async fn call_bytes_with(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let (s, _, body) = self.send(method, uri, token, headers, body).await;
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&body)}))
        };
        (s, v)
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_with(method, uri, token, body, &[]).await
    }

    /// [`Harness::call`] with extra request headers.
    pub async fn call_with(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let bytes = body
            .map(|b| serde_json::to_vec(&b).unwrap())
            .unwrap_or_default();
        self.call_bytes_with(method, uri, token, bytes, headers)
            .await
    }

    /// [`Harness::call`] expecting the status `want`; returns the body.
    pub async fn expect(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        want: u16,
    ) -> Value {
        let (s, v) = self.call(method.clone(), uri, token, body).await;
        assert_eq!(s.as_u16(), want, "{method} {uri}: {v}");
        v
    }

    /// [`Harness::call`] expecting a Cinder error `want` whose message contains `needle`;
    /// returns the body.
    pub async fn fault(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        want: u16,
        needle: &str,
    ) -> Value {
        let v = self.expect(method, uri, token, body, want).await;
        let status = StatusCode::from_u16(want).unwrap();
        assert_fault(&v, want, ember_control::error::fault_name(status), needle);
        v
    }

    /// As admin, expecting `want`.
    pub async fn admin_ok(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
        want: u16,
    ) -> Value {
        self.expect(method, uri, Some(&self.admin), body, want)
            .await
    }

    /// As admin, expecting a Cinder error `want` whose message contains `needle`.
    pub async fn admin_fault(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
        want: u16,
        needle: &str,
    ) -> Value {
        self.fault(method, uri, Some(&self.admin), body, want, needle)
            .await
    }

    /// POST `body` to `uri` as admin, expecting `want`; returns the string at
    /// `answer[object][field]` (the new resource's id).
    async fn admin_create(
        &self,
        uri: &str,
        body: Value,
        want: u16,
        (object, field): (&str, &str),
    ) -> String {
        let v = self.admin_ok(Method::POST, uri, Some(body), want).await;
        v[object][field].as_str().unwrap().to_string()
    }

    /// Create a volume type as admin (`body` is the `volume_type` object); returns its id.
    pub async fn create_type(&self, body: Value) -> String {
        let uri = format!("/v3/{}/types", self.admin_project);
        let body = json!({ "volume_type": body });
        self.admin_create(&uri, body, 200, ("volume_type", "id"))
            .await
    }

    /// Create a project and return its id.
    pub async fn project(&self, name: &str) -> String {
        let body = json!({"project": {"name": name}});
        self.admin_create("/v3/projects", body, 201, ("project", "id"))
            .await
    }

    /// Give a type the LUKS encryption spec (defaults for the rest); returns its id.
    pub async fn create_luks_encryption(&self, type_id: &str) -> String {
        let uri = format!("/v3/{}/types/{type_id}/encryption", self.admin_project);
        let body = json!({"encryption": {"provider": "luks"}});
        self.admin_create(&uri, body, 200, ("encryption", "encryption_id"))
            .await
    }

    /// Store a text passphrase secret with `token`; returns its id.
    pub async fn create_text_secret(&self, token: &str, payload: &str) -> String {
        let v = self
            .expect(
                Method::POST,
                "/v1/secrets",
                Some(token),
                Some(json!({"payload": payload, "payload_content_type": "text/plain"})),
                201,
            )
            .await;
        ref_id(&v["secret_ref"])
    }

    /// Order a 256-bit AES key with `token`; returns the order's id.
    pub async fn create_key_order(&self, token: &str) -> String {
        let v = self
            .expect(
                Method::POST,
                "/v1/orders",
                Some(token),
                Some(json!({"type": "key", "meta": {"algorithm": "aes", "bit_length": 256}})),
                202,
            )
            .await;
        ref_id(&v["order_ref"])
    }

    /// Issue a token for a project; returns (token id, token).
    pub async fn token(&self, project: &str, role: &str) -> (String, String) {
        let v = self
            .admin_ok(
                Method::POST,
                &format!("/v3/projects/{project}/tokens"),
                Some(json!({"token": {"role": role}})),
                201,
            )
            .await;
        (
            v["token"]["id"].as_str().unwrap().to_string(),
            v["token"]["token"].as_str().unwrap().to_string(),
        )
    }

    /// Pretend a volume exists (the volumes API arrives with the next issue).
    pub async fn fake_volume(&self, project: &str, type_id: &str, secret: Option<&str>) -> String {
        let id = format!("vol-{}", uuid_like());
        sqlx::query(
            "INSERT INTO volumes (id, project_id, name, size_bytes, type_id, encryption_key_id, pool, node_id, status, \
             created_at, updated_at) VALUES (?, ?, 'v', 1048576, ?, ?, 'default', NULL, 'available', 'x', 'x')",
        )
        .bind(id.clone())
        .bind(project.to_string())
        .bind(type_id.to_string())
        .bind(secret.map(str::to_string))
        .execute(&self.control.state.db().pool)
        .await
        .unwrap();
        id
    }
}

/// Poll `show` (every 5 ms, for at most 30 s) until the object's `status` is no longer
/// `busy`; the object then.
pub async fn wait_while<F, Fut>(busy: &str, mut show: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let t = std::time::Instant::now();
    loop {
        let v = show().await;
        if v["status"] != busy {
            return v;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "stuck: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The string `field` of each object in the list `v[list]`.
pub fn fields<'a>(v: &'a Value, list: &str, field: &str) -> Vec<&'a str> {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no list {list:?} in {v}"))
        .iter()
        .map(|x| x[field].as_str().unwrap())
        .collect()
}

/// The id at the end of a `*_ref` link (`secret_ref`, `order_ref`).
pub fn ref_id(link: &Value) -> String {
    let link = link
        .as_str()
        .unwrap_or_else(|| panic!("not a link: {link}"));
    link.rsplit('/').next().unwrap().to_string()
}

/// Assert a Cinder error body with `fault` and a message containing `needle`.
pub fn assert_fault(v: &Value, status: u16, fault: &str, needle: &str) {
    let f = &v[fault];
    assert_eq!(f["code"], status, "expected {fault} {status}, got {v}");
    let msg = f["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "message {msg:?} should contain {needle:?} (body {v})"
    );
}

/// Generate one test per backend (`sqlite`, `mariadb`) from a body using `$h: &Harness`.
#[macro_export]
macro_rules! api_test {
    ($name:ident, |$h:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn on(backend: Backend) {
                let owned = Harness::new(backend).await;
                {
                    let $h = &owned;
                    $body
                }
                owned.finish().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                on(Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mariadb() {
                on(Backend::MariaDb).await;
            }
        }
    };
}

/// One test per backend, named as given, from `async fn $run(Backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($run:ident => $sqlite:ident, $mariadb:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $run(Backend::Sqlite).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $mariadb() {
            $run(Backend::MariaDb).await;
        }
    };
}
