//! One `emberd serve` node for end-to-end tests: started on a free REST port with a Unix
//! NBD listener (no TLS needed), a project with a member token, and the REST calls the
//! crash and hostile-input tests make (volumes, encrypted types, attach, detach).

use super::{emberd_bin, free_port, wait_for_path, wait_for_tcp, Daemon};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a start (or restart) may take on a loaded machine.
pub const START: Duration = Duration::from_secs(120);

/// A running `emberd serve`.
pub struct ServeNode {
    pub daemon: Daemon,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`
    pub rest: String,
    pub data: PathBuf,
    /// The NBD listener's socket.
    pub nbd_sock: PathBuf,
    pub admin: String,
    pub project: String,
    pub token: String,
    /// The member token's id (for token APIs and ACLs).
    pub token_id: String,
    args: Vec<String>,
    /// The `emberd` binary (the one under test unless a test names another build).
    bin: PathBuf,
    /// The temporary directory of [`ServeNode::start_temp`], removed on drop.
    _tmp: Option<tempfile::TempDir>,
}

/// A REST answer: status, `Retry-After` and JSON body (`Null` when empty, a string when
/// not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
}

/// One REST request with an `X-Auth-Token` (and a JSON body, if any).
pub fn request(method: &str, url: &str, token: &str, body: Option<Value>) -> Resp {
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("http client");
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut r = c.request(m, url).header("X-Auth-Token", token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().unwrap_or_default();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Resp {
        status,
        retry_after,
        body,
    }
}

/// [`request`] as `(status, body)`.
pub fn http(method: &str, url: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let r = request(method, url, token, body);
    (r.status, r.body)
}

impl ServeNode {
    /// Start a node in a temporary directory of its own (removed when the node drops).
    pub fn start_temp(extra: &[&str]) -> ServeNode {
        ServeNode::start_bin_temp(&emberd_bin(), extra)
    }

    /// [`ServeNode::start_temp`] with the `emberd` binary `bin`.
    pub fn start_bin_temp(bin: &Path, extra: &[&str]) -> ServeNode {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut node = ServeNode::start_bin(bin, tmp.path(), extra);
        node._tmp = Some(tmp);
        node
    }

    /// Start a node in `dir` (its data dir is `dir/data`) with `extra` flags, make a
    /// project and a member token.
    pub fn start(dir: &Path, extra: &[&str]) -> ServeNode {
        ServeNode::start_bin(&emberd_bin(), dir, extra)
    }

    /// [`ServeNode::start`] with the `emberd` binary `bin`.
    pub fn start_bin(bin: &Path, dir: &Path, extra: &[&str]) -> ServeNode {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let rest = format!("127.0.0.1:{}", free_port());
        let nbd_sock = data.join("nbd.sock");
        let mut args: Vec<String> = [
            "serve",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--rest",
            &rest,
            "--nbd",
            &format!("unix:{}", nbd_sock.display()),
            "--node-name",
            "test-node",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Plain NBD clients read the attachments unless `extra` names a TLS mode;
        // tests/nbd_tls.rs covers the default, TLS with a key per attachment.
        if !extra.iter().any(|a| a.starts_with("--nbd-tls")) {
            args.extend(["--nbd-tls".to_string(), "off".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::spawn_bin(bin, &data, &a);
        wait_for_tcp(&rest, START);
        wait_for_path(&nbd_sock, START);
        let url = format!("http://{rest}");
        let admin = std::fs::read_to_string(data.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_string();
        let (s, p) = http(
            "POST",
            &format!("{url}/v3/projects"),
            &admin,
            Some(json!({"project": {"name": "tests"}})),
        );
        assert_eq!(s, 201, "{p}");
        let project = p["project"]["id"].as_str().expect("project id").to_string();
        let (s, t) = http(
            "POST",
            &format!("{url}/v3/projects/{project}/tokens"),
            &admin,
            Some(json!({"token": {"role": "member"}})),
        );
        assert_eq!(s, 201, "{t}");
        ServeNode {
            daemon,
            url,
            rest,
            data,
            nbd_sock,
            admin,
            project,
            token: t["token"]["token"].as_str().expect("token").to_string(),
            token_id: t["token"]["id"].as_str().expect("token id").to_string(),
            args,
            bin: bin.to_path_buf(),
            _tmp: None,
        }
    }

    /// SIGKILL the daemon and wait until it is gone.
    pub fn kill(&mut self) {
        self.daemon.signal(libc::SIGKILL);
        assert!(
            self.daemon.wait_exit(Duration::from_secs(60)).is_some(),
            "emberd did not die on SIGKILL"
        );
    }

    /// Start the daemon again with the same flags; returns once the REST API answers
    /// (start-up reconciliation, attachments included, is done by then).
    pub fn start_again(&mut self) {
        let a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Daemon::spawn_bin(&self.bin, &self.data, &a);
        wait_for_tcp(&self.rest, START);
        wait_for_path(&self.nbd_sock, START);
    }

    pub fn pid(&self) -> u32 {
        self.daemon.child.id()
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    pub fn vol_url(&self, rest: &str) -> String {
        format!("{}/v3/{}/volumes{rest}", self.url, self.project)
    }

    /// An encrypted volume type `name` (LUKS2, aes-xts-plain64, 512-bit keys).
    pub fn encrypted_type(&self, name: &str) {
        let (s, t) = http(
            "POST",
            &format!("{}/v3/{}/types", self.url, self.project),
            &self.admin,
            Some(json!({"volume_type": {"name": name}})),
        );
        assert_eq!(s, 200, "{t}");
        let type_id = t["volume_type"]["id"].as_str().expect("type id");
        let (s, e) = http(
            "POST",
            &format!(
                "{}/v3/{}/types/{type_id}/encryption",
                self.url, self.project
            ),
            &self.admin,
            Some(
                json!({"encryption": {"provider": "luks2", "cipher": "aes-xts-plain64",
                "key_size": 512, "control_location": "front-end"}}),
            ),
        );
        assert_eq!(s, 200, "{e}");
    }

    /// A volume of `size_gib` GiB (of `volume_type`, if any), once `available`.
    pub fn volume(&self, name: &str, size_gib: u64, volume_type: Option<&str>) -> String {
        let mut body = json!({"size": size_gib, "name": name});
        if let Some(t) = volume_type {
            body["volume_type"] = json!(t);
        }
        let (s, v) = http(
            "POST",
            &self.vol_url(""),
            &self.token,
            Some(json!({ "volume": body })),
        );
        assert_eq!(s, 202, "{v}");
        let id = v["volume"]["id"].as_str().expect("volume id").to_string();
        let t = Instant::now();
        loop {
            let v = self.show(&id);
            if v["status"] == "available" {
                return id;
            }
            assert!(
                v["status"] == "creating" && t.elapsed() < Duration::from_secs(300),
                "volume {id}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The volume's JSON view.
    pub fn show(&self, id: &str) -> Value {
        let (s, v) = http("GET", &self.vol_url(&format!("/{id}")), &self.token, None);
        assert_eq!(s, 200, "{v}");
        v["volume"].clone()
    }

    /// `os-initialize_connection`: status and body.
    pub fn try_attach(&self, id: &str, protocol: &str) -> (u16, Value) {
        http(
            "POST",
            &self.vol_url(&format!("/{id}/action")),
            &self.token,
            Some(json!({"os-initialize_connection": {"connector": {"protocol": protocol}}})),
        )
    }

    /// Attach; the `connection_info` data.
    pub fn attach(&self, id: &str, protocol: &str) -> Value {
        let (s, r) = self.try_attach(id, protocol);
        assert_eq!(s, 200, "{r}\n{}", self.log());
        r["connection_info"]["data"].clone()
    }

    /// End one attachment; returns how long it took.
    pub fn detach(&self, id: &str, attachment: &str) -> Duration {
        let t = Instant::now();
        let (s, r) = http(
            "POST",
            &self.vol_url(&format!("/{id}/action")),
            &self.token,
            Some(json!({"os-terminate_connection": {"connector": {"attachment_id": attachment}}})),
        );
        assert_eq!(s, 202, "{r}");
        t.elapsed()
    }

    /// emberd still runs (a process killed by a signal a moment ago may not be reaped
    /// yet: look again after a short while).
    pub fn alive(&mut self) -> bool {
        std::thread::sleep(Duration::from_millis(300));
        matches!(self.daemon.child.try_wait(), Ok(None))
    }

    /// `(VmRSS, VmHWM)` of the daemon in KiB.
    pub fn mem_kib(&self) -> (u64, u64) {
        mem_kib(self.pid())
    }
}

/// `(VmRSS, VmHWM)` of `pid` in KiB (zeros once it is gone).
pub fn mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
