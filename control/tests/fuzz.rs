//! Property-based run of the OpenAPI spec against a live HTTP server (the router served
//! by axum/hyper on a loopback TCP port, requests written on raw sockets): for every
//! operation, requests generated from the spec's own schemas (valid, near-valid and junk bodies, real and
//! random path parameters, random query values, admin and member tokens). No response
//! may be a 5xx, and every error must carry a Cinder-shaped body. Deterministic seeds;
//! the failing request is printed. (`scripts/schemathesis.sh` does the same with
//! schemathesis against a live daemon.) The node has a storage pool (the in-memory data
//! plane), a volume and a snapshot, so volume bodies reach the volumes service.
//!
//! Also: the strict body parser over byte-level mutations of the REST bodies the
//! end-to-end tests send (the seeds of the `rest_bodies` cargo-fuzz target): every input
//! parses or is a 400 naming what is wrong, never a panic.

mod common;

use axum::http::Method;
use common::{Backend, Harness};
use ember_control::dataplane::mem::MemDataPlane;
use ember_control::openapi::{check_body, BodyKind};
use serde_json::{json, Map, Value};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request on a fresh connection; returns status and JSON body.
async fn http(
    addr: SocketAddr,
    method: &Method,
    uri: &str,
    token: &str,
    body: &[u8],
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the live server");
    let head = format!(
        "{method} {uri} HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // The server may answer (413) and close before reading a large body: ignore write errors.
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response to {method} {uri}: {buf:?}"));
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {head:?}"));
    let mut payload = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &payload[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        payload = out;
    }
    let v = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&payload)
            .unwrap_or(json!({"raw": String::from_utf8_lossy(&payload)}))
    };
    (status, v)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
}

const STRINGS: &[&str] = &[
    "",
    "a",
    "luks",
    "luks2",
    "aes-xts-plain64",
    "front-end",
    "back-end",
    "256",
    "512",
    "true",
    "<is> True",
    "qos:read_iops_sec",
    "qos:bogus",
    "replication",
    "encryption",
    "symmetric",
    "passphrase",
    "opaque",
    "key",
    "text/plain",
    "application/octet-stream",
    "base64",
    "aGVsbG8=",
    "2099-01-01T00:00:00Z",
    "2001-01-01T00:00:00Z",
    "admin",
    "member",
    "reader",
    "OS::Cinder::Volumetype",
    "public",
    "private",
    "string",
    "integer",
    "array",
    "é💥 ünïcode",
    " ",
    "a b",
    "../..",
    "%00",
    "'; DROP TABLE volume_types; --",
    "[a-z]+",
    "(",
    "\\",
    "null",
];

fn random_string(r: &mut Rng) -> String {
    match r.below(4) {
        0 => "x".repeat([0, 80, 81, 255, 256, 501, 5000][r.below(7)]),
        1 => (0..r.below(20))
            .map(|_| char::from_u32(0x20 + r.below(0x2fff) as u32).unwrap_or('?'))
            .collect(),
        _ => STRINGS[r.below(STRINGS.len())].to_string(),
    }
}

fn junk(r: &mut Rng) -> Value {
    match r.below(7) {
        0 => Value::Null,
        1 => json!(r.chance(0.5)),
        2 => json!([0i64, -1, 1, 256, 512, i64::MAX, i64::MIN][r.below(7)]),
        3 => json!([0.5f64, -1e300, 1e300, 3.25][r.below(4)]),
        4 => json!(random_string(r)),
        5 => json!([random_string(r)]),
        _ => json!({random_string(r): random_string(r)}),
    }
}

fn resolve<'a>(spec: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(rf) => {
            let name = rf.rsplit('/').next().unwrap_or_default();
            resolve(spec, &spec["components"]["schemas"][name])
        }
        None => s,
    }
}

fn gen(spec: &Value, schema: &Value, r: &mut Rng, depth: usize) -> Value {
    if depth > 6 || r.chance(0.05) {
        return junk(r);
    }
    let s = resolve(spec, schema);
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            if !alts.is_empty() {
                return gen(spec, &alts[r.below(alts.len())], r, depth + 1);
            }
        }
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        if let Some(first) = all.first() {
            return gen(spec, first, r, depth + 1);
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.is_empty() && r.chance(0.9) {
            return e[r.below(e.len())].clone();
        }
    }
    let ty = match s.get("type") {
        Some(Value::Array(ts)) if !ts.is_empty() => ts[r.below(ts.len())]
            .as_str()
            .unwrap_or("string")
            .to_string(),
        Some(Value::String(t)) => t.clone(),
        _ if s.get("properties").is_some() => "object".into(),
        _ => return junk(r),
    };
    match ty.as_str() {
        "object" => {
            let mut m = Map::new();
            if let Some(props) = s.get("properties").and_then(Value::as_object) {
                for (k, ps) in props {
                    if r.chance(0.85) {
                        m.insert(k.clone(), gen(spec, ps, r, depth + 1));
                    }
                }
            }
            if let Some(ap) = s.get("additionalProperties").filter(|v| v.is_object()) {
                for _ in 0..r.below(4) {
                    m.insert(random_string(r), gen(spec, ap, r, depth + 1));
                }
            }
            if r.chance(0.05) {
                m.insert("unexpected".into(), junk(r));
            }
            Value::Object(m)
        }
        "array" => {
            let items = s.get("items").cloned().unwrap_or(json!({}));
            Value::Array(
                (0..r.below(4))
                    .map(|_| gen(spec, &items, r, depth + 1))
                    .collect(),
            )
        }
        "string" => json!(random_string(r)),
        "integer" => json!(
            [
                0i64,
                1,
                -1,
                8,
                100,
                256,
                512,
                4096,
                4097,
                i64::from(u32::MAX),
                i64::MAX
            ][r.below(11)]
        ),
        "number" => json!([0.0f64, 1.0, -5.5, 1e9, 1e300][r.below(5)]),
        "boolean" => json!(r.chance(0.5)),
        "null" => Value::Null,
        _ => junk(r),
    }
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn fuzz(backend: Backend, seed: u64, per_op: usize) {
    let dp = Arc::new(MemDataPlane::new().with_pool("default", 1 << 40));
    let h = Harness::with_dataplane(backend, dp).await;
    let pa = h.project("fuzz").await;
    let (_, member) = h.token(&pa, "member").await;
    let vol = h
        .expect(
            Method::POST,
            &format!("/v3/{pa}/volumes"),
            Some(&member),
            Some(json!({"volume": {"size": 1}})),
            202,
        )
        .await["volume"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t0 = std::time::Instant::now();
    while h
        .expect(
            Method::GET,
            &format!("/v3/{pa}/volumes/{vol}"),
            Some(&member),
            None,
            200,
        )
        .await["volume"]["status"]
        == "creating"
    {
        assert!(t0.elapsed() < std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let snap = h
        .expect(
            Method::POST,
            &format!("/v3/{pa}/snapshots"),
            Some(&member),
            Some(json!({"snapshot": {"volume_id": vol}})),
            202,
        )
        .await["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let p = h.admin_project.clone();
    let t = h
        .create_type(json!({"name": "fz", "extra_specs": {"k": "v"}, "metadata": {"m": "v"}}))
        .await;
    let enc = h.create_luks_encryption(&t).await;
    let s = h.create_text_secret(&member, "pw").await;
    let o = h.create_key_order(&member).await;
    let real = |name: &str, admin: bool| -> Vec<String> {
        match name {
            "project_id" => vec![if admin { p.clone() } else { pa.clone() }],
            "type_id" => vec![t.clone(), "fz".into(), "__DEFAULT__".into()],
            "key" => vec![
                "k".into(),
                "m".into(),
                "encryption".into(),
                "qos:read_iops_sec".into(),
            ],
            "encryption_id" => vec![enc.clone(), "provider".into(), "key_size".into()],
            "namespace" => vec!["OS::Ember::QoS".into(), "OS::Ember::VolumeType".into()],
            "property_name" => vec!["read_iops_sec".into(), "encryption".into()],
            "resource_type" => vec!["OS::Cinder::Volumetype".into()],
            "secret_id" => vec![s.clone()],
            "order_id" => vec![o.clone()],
            "volume_id" => vec![vol.clone()],
            "snapshot_id" => vec![snap.clone()],
            _ => vec!["x".into()],
        }
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(ember_control::axum::serve(listener, h.router.clone()).into_future());
    let spec: Value = http(addr, &Method::GET, "/openapi.json", "none", b"")
        .await
        .1;
    assert!(spec["paths"].is_object(), "the live server serves its spec");
    let mut r = Rng(seed | 1);
    let mut failures = Vec::new();
    let mut total = 0;
    let mut histogram = std::collections::BTreeMap::<u16, usize>::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let body_schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
            for i in 0..per_op {
                let admin = i % 2 == 0;
                let token = if admin {
                    h.admin.clone()
                } else {
                    member.clone()
                };
                let mut uri = path.clone();
                let mut query = Vec::new();
                for prm in op["parameters"].as_array().into_iter().flatten() {
                    let name = prm["name"].as_str().unwrap_or_default();
                    let val = if prm["in"] == "path" && r.chance(0.8) {
                        let c = real(name, admin);
                        c[r.below(c.len())].clone()
                    } else {
                        match gen(&spec, &prm["schema"], &mut r, 0) {
                            Value::String(s) => s,
                            other => other.to_string(),
                        }
                    };
                    if prm["in"] == "path" {
                        uri = uri.replace(&format!("{{{name}}}"), &pct(&val));
                    } else if prm["in"] == "query" && r.chance(0.5) {
                        query.push(format!("{name}={}", pct(&val)));
                    }
                }
                if !query.is_empty() {
                    uri = format!("{uri}?{}", query.join("&"));
                }
                let body = if body_schema.is_null() {
                    Vec::new()
                } else if r.chance(0.05) {
                    b"{\"truncated\": ".to_vec()
                } else {
                    serde_json::to_vec(&gen(&spec, &body_schema, &mut r, 0)).unwrap()
                };
                let (code, v) = http(addr, &m, &uri, &token, &body).await;
                let st = axum::http::StatusCode::from_u16(code).unwrap();
                total += 1;
                *histogram.entry(code).or_default() += 1;
                let bad_shape =
                    code >= 400 && v[ember_control::error::fault_name(st)]["code"] != code;
                if st.is_server_error() || bad_shape {
                    failures.push(format!(
                        "{m} {uri} body={} -> {st} {v}",
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
        }
    }
    server.abort();
    eprintln!("{backend:?}: {total} requests, statuses {histogram:?}");
    assert!(
        histogram.keys().any(|s| *s < 300),
        "the generator never produced an accepted request"
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} bad responses of {total}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_fuzz_sqlite() {
    fuzz(Backend::Sqlite, 0x5eed_0001, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_fuzz_mariadb() {
    fuzz(Backend::MariaDb, 0x5eed_0002, 40).await;
}

/// The seeds of the `rest_bodies` cargo-fuzz target (request bodies the end-to-end
/// tests send), one file per body: the first byte selects the body kind
/// (`openapi::BodyKind::ALL`), the rest is the body.
fn seeds() -> Vec<(BodyKind, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/rest_bodies");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let b = std::fs::read(e.unwrap().path()).unwrap();
        let kind = BodyKind::ALL[usize::from(b[0]) % BodyKind::ALL.len()];
        out.push((kind, b[1..].to_vec()));
    }
    out.sort();
    assert!(out.len() >= BodyKind::ALL.len(), "a seed per body kind");
    out
}

#[test]
fn mutated_bodies_parse_or_name_the_problem() {
    let seeds = seeds();
    // Real requests: most are accepted; the e2e tests' bad-input ones get their 400.
    let accepted = seeds
        .iter()
        .filter(|(kind, body)| match check_body(*kind, body) {
            Ok(()) => true,
            Err(e) => {
                assert_eq!(e.status.as_u16(), 400, "{kind:?}: {e}");
                false
            }
        })
        .count();
    assert!(accepted + 2 >= seeds.len(), "{accepted} of {}", seeds.len());
    let mut r = Rng(0x5eed_b0d1);
    let mut refused = 0;
    for round in 0..20_000 {
        let (kind, seed) = &seeds[round % seeds.len()];
        let mut b = seed.clone();
        for _ in 0..1 + r.below(4) {
            if b.is_empty() {
                break;
            }
            let i = r.below(b.len());
            match r.below(4) {
                0 => b[i] = r.next() as u8,
                1 => {
                    b.remove(i);
                }
                2 => {
                    const PUNCT: &[u8] = br#"{}[]",:0-e\u"#;
                    b.insert(i, PUNCT[r.below(PUNCT.len())]);
                }
                _ => b.truncate(i),
            }
        }
        if let Err(e) = check_body(*kind, &b) {
            refused += 1;
            assert!(
                matches!(e.status.as_u16(), 400 | 413),
                "{kind:?} {:?}: {e}",
                String::from_utf8_lossy(&b)
            );
            assert!(!e.message.is_empty());
        }
    }
    assert!(
        refused > 10_000,
        "the mutations mostly break the bodies ({refused})"
    );
}
