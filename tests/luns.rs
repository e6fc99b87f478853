//! End-to-end: LUN pools of `emberd serve` (issue 15's control-plane half) with real
//! parts: a `tgtd` on loopback as the array (CHAP by a secret of Ember's key store) and
//! loop devices (`losetup`) as host block LUNs found by glob. Through the REST API:
//! list the manageable LUNs, manage one (its data is kept and read back over NBD with
//! qemu-io), attach/detach, extend once the array (tgtadm) or the loop device grew,
//! an encrypted volume on a blank LUN (opened afterwards by cryptsetup, and a LUKS1 one
//! read by qemu-io's LUKS driver, with the key from the key store), unmanage (data left intact), and the
//! faults: a missing CHAP secret, a wrong one, a LUN that disappears (clear status and
//! reason on the volume, never a hang). Mutual CHAP with both secrets from the key store
//! (a wrong target secret refused before any I/O). Faults under attached volumes: a LUN
//! deleted by tgtd, tgtd killed, a loop LUN that shrinks to nothing; the health check
//! (`lun-health-secs = 1`) shows each on the volume (`lun.health`, `lun.fault`, polled
//! with a deadline) while its I/O fails with EIO and the other volumes serve, and the
//! volume heals through the same attachment once the LUN is back.

mod common;

use common::{free_port, require_tool, run_ok, sparse_file, wait_for_tcp, Daemon};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const START: Duration = Duration::from_secs(60);
const IQN: &str = "iqn.2026-01.org.ember.test:luns";

// ---------------------------------------------------------------------------------------
// The array: tgtd on loopback

/// A `tgtd` of this test on its own portal port and management socket.
struct Tgtd {
    child: Option<Child>,
    port: u16,
    ctl: u16,
    log: PathBuf,
}

impl Tgtd {
    fn start(dir: &Path) -> Tgtd {
        require_tool("tgtd");
        require_tool("tgtadm");
        let port = free_port();
        let mut t = Tgtd {
            child: None,
            port,
            ctl: port % 30000 + 1000,
            log: dir.join(format!("tgtd-{port}.log")),
        };
        t.launch();
        t
    }

    /// Start tgtd on this portal (again) with target 1, no LUNs, open to everyone.
    fn launch(&mut self) {
        let (port, ctl) = (self.port, self.ctl);
        std::fs::create_dir_all("/var/run/tgtd").expect("create /var/run/tgtd");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("tgtd log");
        let child = Command::new("tgtd")
            .args([
                "-f",
                "-C",
                &ctl.to_string(),
                "--iscsi",
                &format!("portal=127.0.0.1:{port}"),
            ])
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn tgtd");
        self.child = Some(child);
        let t = &*self;
        let started = Instant::now();
        while !Command::new("tgtadm")
            .args(["-C", &ctl.to_string(), "--op", "show", "--mode", "system"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                started.elapsed() < START,
                "tgtd did not start: {}",
                std::fs::read_to_string(&t.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_for_tcp(&format!("127.0.0.1:{port}"), START);
        t.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN]);
        t.adm(&[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
    }

    /// The array dies: SIGKILL, no logout, no goodbye to the initiators.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn adm(&self, args: &[&str]) {
        let ctl = self.ctl.to_string();
        run_ok(
            Command::new("tgtadm")
                .args(["-C", &ctl, "--lld", "iscsi"])
                .args(args),
        );
    }

    fn add_lun(&self, backing: &Path, lun: u16) {
        self.adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            &lun.to_string(),
            "-b",
            backing.to_str().expect("utf-8 path"),
        ]);
    }

    fn delete_lun(&self, lun: u16) {
        self.adm(&[
            "--op",
            "delete",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            &lun.to_string(),
        ]);
    }

    /// CHAP account `user`/`secret`, required for target 1.
    fn chap(&self, user: &str, secret: &str) {
        self.adm(&[
            "--op",
            "new",
            "--mode",
            "account",
            "--user",
            user,
            "--password",
            secret,
        ]);
        self.adm(&[
            "--op", "bind", "--mode", "account", "--tid", "1", "--user", user,
        ]);
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let ctl = self.ctl.to_string();
        for args in [
            &[
                "--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force",
            ][..],
            &["--op", "delete", "--mode", "system"][..],
        ] {
            let _ = Command::new("tgtadm")
                .args(["-C", &ctl])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(backing: &Path) -> Loop {
        require_tool("losetup");
        let out =
            run_ok(Command::new("losetup").args(["--find", "--show", backing.to_str().unwrap()]));
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }

    /// Re-read the backing file's size (`losetup -c`).
    fn refresh(&self) {
        run_ok(Command::new("losetup").arg("-c").arg(&self.dev));
    }

    fn detach(&self) {
        run_ok(Command::new("losetup").arg("-d").arg(&self.dev));
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------
// The node and its API

struct Node {
    daemon: Daemon,
    url: String,
    data: PathBuf,
    admin: String,
    project: String,
    args: Vec<String>,
}

impl Node {
    /// `emberd serve` with `config` (TOML) as its `--config`.
    fn start(dir: &Path, config: &str) -> Node {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let cfg = dir.join("ember.toml");
        std::fs::write(&cfg, config).unwrap();
        let rest = format!("127.0.0.1:{}", free_port());
        let args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--rest".into(),
            rest.clone(),
            "--nbd".into(),
            format!("unix:{}", data.join("nbd.sock").display()),
            "--node-name".into(),
            "n1".into(),
            // The LUN volumes are read with plain NBD clients; tests/nbd_tls.rs covers
            // the default (TLS with a key per attachment).
            "--nbd-tls".into(),
            "off".into(),
            // Last: `reconfigure` rewrites the file the last argument names.
            "--config".into(),
            cfg.display().to_string(),
        ];
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::spawn(&data, &a);
        wait_for_tcp(&rest, Duration::from_secs(120));
        let admin = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        let mut n = Node {
            daemon,
            url: format!("http://{rest}"),
            data,
            admin,
            project: String::new(),
            args,
        };
        let v = n.ok("GET", "/v3/auth/tokens", None, 200);
        n.project = v["token"]["project_id"].as_str().unwrap().to_string();
        n
    }

    /// Stop, write a new config, start again.
    fn reconfigure(&mut self, config: &str) {
        self.daemon.terminate(Duration::from_secs(60));
        let cfg = PathBuf::from(self.args.last().unwrap());
        std::fs::write(&cfg, config).unwrap();
        let a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Daemon::spawn(&self.data, &a);
        wait_for_tcp(
            self.url.trim_start_matches("http://"),
            Duration::from_secs(120),
        );
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let c = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap();
        let url = format!("{}{path}", self.url);
        let mut r = c
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                &url,
            )
            .header("X-Auth-Token", &self.admin);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let s = resp.status().as_u16();
        let text = resp.text().unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (s, v)
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (s, v) = self.call(method, path, body);
        assert_eq!(s, want, "{method} {path}: {v}\n{}", self.daemon.log_text());
        v
    }

    fn p(&self, rest: &str) -> String {
        format!("/v3/{}{rest}", self.project)
    }

    /// A text secret of the admin's project; its id.
    fn secret(&self, payload: &str) -> String {
        let v = self.ok(
            "POST",
            "/v1/secrets",
            Some(json!({"payload": payload, "payload_content_type": "text/plain"})),
            201,
        );
        v["secret_ref"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    }

    fn list(&self) -> Vec<Value> {
        self.ok("GET", &self.p("/manageable_volumes/detail"), None, 200)["manageable-volumes"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Manage LUN `lun` of `pool`; the volume once it left `creating`.
    fn manage(&self, pool: &str, lun: &str, volume_type: Option<&str>) -> Value {
        let mut v =
            json!({"host": format!("n1@{pool}#{pool}"), "ref": {"source-name": lun}, "name": lun});
        if let Some(t) = volume_type {
            v["volume_type"] = json!(t);
        }
        let r = self.ok(
            "POST",
            &self.p("/manageable_volumes"),
            Some(json!({ "volume": v })),
            202,
        );
        self.wait(r["volume"]["id"].as_str().unwrap())
    }

    fn show(&self, id: &str) -> Value {
        self.ok("GET", &self.p(&format!("/volumes/{id}")), None, 200)["volume"].clone()
    }

    fn wait(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.show(id);
            if v["status"] != "creating" {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "stuck creating: {v}\n{}",
                self.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn action(&self, id: &str, body: Value) -> (u16, Value) {
        self.call(
            "POST",
            &self.p(&format!("/volumes/{id}/action")),
            Some(body),
        )
    }

    /// Attach over NBD: (attachment id, NBD URI).
    fn attach(&self, id: &str) -> (String, String) {
        let (s, v) = self.action(
            id,
            json!({"os-initialize_connection": {"connector": {"protocol": "nbd"}}}),
        );
        assert_eq!(s, 200, "attach: {v}\n{}", self.daemon.log_text());
        let d = &v["connection_info"]["data"];
        (
            d["attachment_id"].as_str().unwrap().to_string(),
            d["uris"][0].as_str().unwrap().to_string(),
        )
    }

    fn detach(&self, id: &str, attachment: &str) {
        let (s, v) = self.action(
            id,
            json!({"os-terminate_connection": {"connector": {"attachment_id": attachment}}}),
        );
        assert_eq!(s, 202, "detach: {v}");
    }

    fn extend(&self, id: &str, gib: u64) -> (u16, Value) {
        self.action(id, json!({"os-extend": {"new_size": gib}}))
    }

    fn unmanage(&self, id: &str) {
        let (s, v) = self.action(id, json!({"os-unmanage": null}));
        assert_eq!(s, 202, "unmanage: {v}");
        self.ok("GET", &self.p(&format!("/volumes/{id}")), None, 404);
    }

    /// An encrypted volume type (`provider` luks or luks2, aes-xts-plain64, 512-bit
    /// key); its name.
    fn encrypted_type(&self, provider: &str) -> String {
        let t = self.ok(
            "POST",
            &self.p("/types"),
            Some(json!({"volume_type": {"name": provider}})),
            200,
        );
        let id = t["volume_type"]["id"].as_str().unwrap();
        self.ok(
            "POST",
            &self.p(&format!("/types/{id}/encryption")),
            Some(
                json!({"encryption": {"provider": provider, "cipher": "aes-xts-plain64",
                "key_size": 512, "control_location": "front-end"}}),
            ),
            200,
        );
        provider.into()
    }

    /// The payload of a secret as lowercase hex (the LUKS passphrase of a volume key).
    fn key_hex(&self, key_id: &str) -> String {
        let key = reqwest::blocking::Client::new()
            .get(format!("{}/v1/secrets/{key_id}/payload", self.url))
            .header("X-Auth-Token", &self.admin)
            .header("Accept", "application/octet-stream")
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        key.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn fault_message(v: &Value) -> String {
    v.as_object()
        .and_then(|o| o.values().next())
        .and_then(|f| f["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn by_name<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|l| l["reference"]["source-name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:?}"))
}

fn qemu_io(uri: &str, cmd: &str) {
    require_tool("qemu-io");
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Pattern verification failed"),
        "{cmd}: {text}"
    );
}

fn nbd_size(uri: &str) -> u64 {
    require_tool("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").args(["--size", uri]));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Write `len` bytes of `byte` at `offset` of a file.
fn pattern(path: &Path, offset: u64, len: usize, byte: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
    f.sync_all().unwrap();
}

fn has_pattern(path: &Path, offset: u64, len: usize, byte: u8) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf.iter().all(|&b| b == byte)
}

fn grow(path: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .unwrap();
}

/// The LUKS checks on a backing file after unmanage: cryptsetup opens its header with
/// the key (and dumps its version), and for LUKS1 (QEMU 7.2 reads no LUKS2) qemu-io's
/// LUKS driver reads the plaintext with `cmd`.
fn luks_holds(backing: &Path, pass_hex: &str, version: u8, cmd: &str) {
    use std::io::Write;
    require_tool("cryptsetup");
    let mut c = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file=-"])
        .arg(backing)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(pass_hex.as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cryptsetup refused the key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = run_ok(Command::new("cryptsetup").arg("luksDump").arg(backing));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Version:") && l.trim().ends_with(&version.to_string())),
        "{dump}"
    );
    if version != 1 {
        return;
    }
    require_tool("qemu-io");
    let out = run_ok(Command::new("qemu-io").args([
        "--object",
        &format!("secret,id=k0,data={pass_hex}"),
        "--image-opts",
        &format!(
            "driver=luks,key-secret=k0,file.driver=file,file.filename={}",
            backing.display()
        ),
        "-c",
        cmd,
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Tests

fn iscsi_config(port: u16, secret_id: &str) -> String {
    format!(
        "[pools.files]\npath = \"files\"\n\
         [pools.array]\nkind = \"lun\"\nportals = [\"127.0.0.1:{port}\"]\ntarget = \"{IQN}\"\n\
         chap-user = \"ember\"\nchap-secret = \"{secret_id}\"\nchap-algorithms = [\"md5\"]\n\
         iscsi-options = \"login_timeout=5&timeout=5\"\n"
    )
}

#[test]
fn iscsi_lun_pool_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("files")).unwrap();
    let lun1 = d.join("lun1.img");
    let lun2 = d.join("lun2.img");
    sparse_file(&lun1, GIB);
    sparse_file(&lun2, GIB);
    // Data the array's LUN holds before Ember sees it.
    pattern(&lun1, MIB, MIB as usize, 0x5a);
    let tgt = Tgtd::start(d);
    tgt.add_lun(&lun1, 1);
    tgt.add_lun(&lun2, 2);
    tgt.chap("ember", "chap-secret-0123");

    // The CHAP secret id names nothing yet: a clear 503, no hang.
    let mut n = Node::start(&dir.path().join("node"), &iscsi_config(tgt.port, "missing"));
    let (s, v) = n.call("GET", &n.p("/manageable_volumes"), None);
    assert_eq!(s, 503, "{v}");
    assert!(fault_message(&v).contains("not in the key store"), "{v}");
    // A wrong secret: the target refuses the login; the listing says so, a manage
    // leaves the volume `error` with the reason.
    let wrong = n.secret("wrong-secret-99");
    let right = n.secret("chap-secret-0123");
    n.reconfigure(&iscsi_config(tgt.port, &wrong));
    let t = Instant::now();
    let (s, v) = n.call("GET", &n.p("/manageable_volumes"), None);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the refused login took {:?}",
        t.elapsed()
    );
    assert_eq!(s, 503, "{v}");
    assert!(fault_message(&v).contains("authentication failed"), "{v}");
    assert!(!fault_message(&v).contains("wrong-secret-99"));
    let v = n.manage("array", "lun-1", None);
    assert_eq!(v["status"], "error", "{v}");
    assert!(
        v["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{v}"
    );
    let failed = v["id"].as_str().unwrap().to_string();
    n.ok("DELETE", &n.p(&format!("/volumes/{failed}")), None, 202);
    assert!(n.daemon.log_text().contains("cannot manage the LUN"));

    // The right one.
    n.reconfigure(&iscsi_config(tgt.port, &right));
    let list = n.list();
    let l1 = by_name(&list, "lun-1");
    assert_eq!(l1["safe_to_manage"], true, "{list:?}");
    assert_eq!(l1["size"], 1);
    assert_eq!(l1["extra_info"]["size_bytes"], GIB);
    assert!(l1["extra_info"]["identity"].is_string(), "{l1}");
    assert_eq!(by_name(&list, "lun-2")["safe_to_manage"], true);
    // LUN 0 is tgtd's controller, not a disk.
    assert_eq!(by_name(&list, "lun-0")["safe_to_manage"], false, "{list:?}");

    // Manage LUN 1: its data is there over NBD; writes reach the array.
    let v = n.manage("array", "lun-1", None);
    assert_eq!(v["status"], "available", "{v}\n{}", n.daemon.log_text());
    assert_eq!(v["size"], 1);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(by_name(&n.list(), "lun-1")["cinder_id"], id.as_str());
    let (att, uri) = n.attach(&id);
    assert_eq!(nbd_size(&uri), GIB);
    qemu_io(&uri, &format!("read -P 0x5a {MIB} {MIB}"));
    qemu_io(&uri, &format!("write -P 0x77 {} {MIB}", 4 * MIB));
    qemu_io(&uri, "flush");
    n.detach(&id, &att);
    assert!(has_pattern(&lun1, 4 * MIB, MIB as usize, 0x77));

    // Extend: refused until the array grew the LUN, then taken.
    let (s, v) = n.extend(&id, 2);
    assert_eq!(s, 400, "{v}");
    assert!(fault_message(&v).contains("grow it on the array"), "{v}");
    // tgtd cannot resize a live LU: re-create it on the grown file (same tid/LUN: the
    // same identity).
    tgt.delete_lun(1);
    grow(&lun1, 2 * GIB);
    tgt.add_lun(&lun1, 1);
    let (s, v) = n.extend(&id, 2);
    assert_eq!(s, 202, "{v}\n{}", n.daemon.log_text());
    assert_eq!(n.show(&id)["size"], 2);
    let (att, uri) = n.attach(&id);
    assert_eq!(nbd_size(&uri), 2 * GIB);
    qemu_io(&uri, &format!("read -P 0x77 {} {MIB}", 4 * MIB));
    n.detach(&id, &att);

    // A LUN that disappears: the attach fails in bounded time with the reason, shown
    // on the volume; it works again once the LUN is back.
    tgt.delete_lun(1);
    let t = Instant::now();
    let (s, v) = n.action(
        &id,
        json!({"os-initialize_connection": {"connector": {"protocol": "nbd"}}}),
    );
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_eq!(s, 503, "{v}");
    assert!(fault_message(&v).contains("does not exist"), "{v}");
    let shown = n.show(&id);
    assert_eq!(shown["status"], "available");
    assert!(
        shown["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{shown}"
    );
    tgt.add_lun(&lun1, 1);
    let (att, _) = n.attach(&id);
    assert_eq!(n.show(&id)["lun"]["fault"], Value::Null);
    n.detach(&id, &att);

    // Unmanage: the volume goes, the LUN keeps its bytes and is manageable again.
    n.unmanage(&id);
    assert!(has_pattern(&lun1, MIB, MIB as usize, 0x5a));
    assert!(has_pattern(&lun1, 4 * MIB, MIB as usize, 0x77));
    assert_eq!(by_name(&n.list(), "lun-1")["safe_to_manage"], true);

    // An encrypted volume on the blank LUN 2; LUN 1 holds data and is refused.
    let t = n.encrypted_type("luks");
    let v = n.manage("array", "lun-1", Some(&t));
    assert_eq!(v["status"], "error");
    assert!(
        v["lun"]["fault"].as_str().unwrap().contains("holds data"),
        "{v}"
    );
    assert!(
        has_pattern(&lun1, MIB, MIB as usize, 0x5a),
        "a refused manage wrote"
    );
    let v = n.manage("array", "lun-2", Some(&t));
    assert_eq!(v["status"], "available", "{v}\n{}", n.daemon.log_text());
    assert_eq!(v["encrypted"], true);
    let id = v["id"].as_str().unwrap().to_string();
    let key = v["encryption_key_id"].as_str().unwrap().to_string();
    let (att, uri) = n.attach(&id);
    qemu_io(&uri, &format!("write -P 0x42 {MIB} {MIB}"));
    qemu_io(&uri, "flush");
    n.detach(&id, &att);
    n.unmanage(&id);
    luks_holds(
        &lun2,
        &n.key_hex(&key),
        1,
        &format!("read -P 0x42 {MIB} {MIB}"),
    );
}

fn devices_config(glob: &str) -> String {
    format!("[pools.local]\nkind = \"lun\"\ndevices = [\"{glob}\"]\ndevice-wait-secs = 1\n")
}

#[test]
fn loop_device_lun_pool_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.img");
    let b = d.join("b.img");
    sparse_file(&a, GIB);
    sparse_file(&b, GIB);
    pattern(&a, MIB, MIB as usize, 0x3c);
    let la = Loop::new(&a);
    let lb = Loop::new(&b);
    // The pool's glob matches these links only (never other loop devices of the host).
    let links = d.join("luns");
    std::fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink(&la.dev, links.join("lun-a")).unwrap();
    std::os::unix::fs::symlink(&lb.dev, links.join("lun-b")).unwrap();
    let n = Node::start(
        &d.join("node"),
        &devices_config(&format!("{}/lun-*", links.display())),
    );
    let name_a = links.join("lun-a").display().to_string();
    let name_b = links.join("lun-b").display().to_string();
    let list = n.list();
    assert_eq!(list.len(), 2, "{list:?}");
    let la_info = by_name(&list, &name_a);
    assert_eq!(la_info["safe_to_manage"], true, "{la_info}");
    assert_eq!(
        la_info["extra_info"]["identity"],
        format!("loop:{}", a.display()),
        "{la_info}"
    );

    // Manage, read the data that was there, write, detach.
    let v = n.manage("local", &name_a, None);
    assert_eq!(v["status"], "available", "{v}\n{}", n.daemon.log_text());
    let id = v["id"].as_str().unwrap().to_string();
    let (att, uri) = n.attach(&id);
    qemu_io(&uri, &format!("read -P 0x3c {MIB} {MIB}"));
    qemu_io(&uri, &format!("write -P 0x99 {} {MIB}", 8 * MIB));
    qemu_io(&uri, "flush");
    // Grow the loop device while attached: extend takes it, the next client sees it.
    grow(&a, 2 * GIB);
    let (s, v) = n.extend(&id, 2);
    assert_eq!(s, 400, "the loop device has not re-read its file yet: {v}");
    la.refresh();
    let (s, v) = n.extend(&id, 2);
    assert_eq!(s, 202, "{v}\n{}", n.daemon.log_text());
    assert_eq!(nbd_size(&uri), 2 * GIB);
    n.detach(&id, &att);
    assert!(has_pattern(&a, 8 * MIB, MIB as usize, 0x99));

    // Encrypted on the blank device.
    let t = n.encrypted_type("luks2");
    let v = n.manage("local", &name_b, Some(&t));
    assert_eq!(v["status"], "available", "{v}\n{}", n.daemon.log_text());
    let enc = v["id"].as_str().unwrap().to_string();
    let key = v["encryption_key_id"].as_str().unwrap().to_string();
    let (att, uri) = n.attach(&enc);
    qemu_io(&uri, &format!("write -P 0xe1 0 {MIB}"));
    qemu_io(&uri, "flush");
    n.detach(&enc, &att);
    n.unmanage(&enc);
    luks_holds(&b, &n.key_hex(&key), 2, &format!("read -P 0xe1 0 {MIB}"));

    // The device disappears: a clear 503 and the fault on the volume.
    la.detach();
    let (s, v) = n.action(
        &id,
        json!({"os-initialize_connection": {"connector": {"protocol": "nbd"}}}),
    );
    assert_eq!(s, 503, "{v}");
    let shown = n.show(&id);
    assert!(shown["lun"]["fault"].is_string(), "{shown}");
    // Unmanage leaves the file as it was.
    n.unmanage(&id);
    assert!(has_pattern(&a, MIB, MIB as usize, 0x3c));
    assert!(has_pattern(&a, 8 * MIB, MIB as usize, 0x99));
}

// ---------------------------------------------------------------------------------------
// Faults under attached volumes

impl Node {
    /// Poll `GET /volumes/{id}` until `lun.health` is `want` (bounded); the volume.
    fn wait_health(&self, id: &str, want: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.show(id);
            if v["lun"]["health"] == want {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "volume {id}: lun.health not {want} after {:?}: {v}\n{}",
                t.elapsed(),
                self.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// qemu-io `cmd` on `uri`, which must fail with EIO within a bounded time; its output.
fn qemu_io_eio(uri: &str, cmd: &str) -> String {
    require_tool("qemu-io");
    let t = Instant::now();
    let out = common::run_any(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Input/output error"), "{cmd}: {text}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "{cmd} took {:?}",
        t.elapsed()
    );
    text
}

#[test]
fn attached_iscsi_luns_that_fail_show_on_their_volumes_and_heal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lun1 = d.join("lun1.img");
    let lun2 = d.join("lun2.img");
    sparse_file(&lun1, GIB);
    sparse_file(&lun2, GIB);
    let mut tgt = Tgtd::start(d);
    tgt.add_lun(&lun1, 1);
    tgt.add_lun(&lun2, 2);
    let n = Node::start(
        &d.join("node"),
        &format!(
            "lun-health-secs = 1\n\
             [pools.array]\nkind = \"lun\"\nportals = [\"127.0.0.1:{}\"]\ntarget = \"{IQN}\"\n\
             iscsi-options = \"login_timeout=3&timeout=3&replacement_timeout=4&nop_interval=1&nop_timeout=2\"\n",
            tgt.port
        ),
    );
    let v1 = n.manage("array", "lun-1", None);
    let v2 = n.manage("array", "lun-2", None);
    assert_eq!(v1["status"], "available", "{v1}\n{}", n.daemon.log_text());
    assert_eq!(v2["status"], "available", "{v2}");
    let (id1, id2) = (
        v1["id"].as_str().unwrap().to_string(),
        v2["id"].as_str().unwrap().to_string(),
    );
    let (att1, uri1) = n.attach(&id1);
    let (att2, uri2) = n.attach(&id2);
    qemu_io(&uri1, &format!("write -P 0x21 0 {MIB}"));
    qemu_io(&uri2, &format!("write -P 0x22 0 {MIB}"));
    assert_eq!(n.show(&id1)["lun"]["health"], "ok");

    // The array deletes LUN 1 under the attached, idle volume: the health check sees
    // it without any I/O; the volume says so, stays in-use; its reads fail with EIO;
    // the other volume keeps serving.
    tgt.delete_lun(1);
    let t = Instant::now();
    let shown = n.wait_health(&id1, "error");
    eprintln!("LUN deleted: fault shown after {:?}", t.elapsed());
    assert_eq!(shown["status"], "in-use", "{shown}");
    let fault = shown["lun"]["fault"].as_str().unwrap().to_string();
    assert!(fault.contains("LUN 1 does not exist"), "{shown}");
    assert!(shown["lun"]["fault_at"].is_string(), "{shown}");
    qemu_io_eio(&uri1, "read 0 4k");
    qemu_io(&uri2, &format!("read -P 0x22 0 {MIB}"));
    assert_eq!(n.show(&id2)["lun"]["health"], "ok");
    assert!(n.daemon.log_text().contains("LUN volume faulted"));

    // The array brings the same LUN back: the volume heals through the same attachment.
    tgt.add_lun(&lun1, 1);
    let shown = n.wait_health(&id1, "ok");
    assert_eq!(shown["lun"]["fault"], Value::Null, "{shown}");
    qemu_io(&uri1, &format!("read -P 0x21 0 {MIB}"));
    assert!(n.daemon.log_text().contains("LUN volume serves again"));

    // The array dies: after the replacement timeout both volumes say so and fail I/O.
    tgt.kill();
    for id in [&id1, &id2] {
        let shown = n.wait_health(id, "error");
        assert!(
            shown["lun"]["fault"]
                .as_str()
                .unwrap()
                .contains("replacement timeout"),
            "{shown}"
        );
    }
    qemu_io_eio(&uri2, "read 0 4k");
    // The daemon still serves its API and other requests meanwhile.
    n.ok("GET", &n.p("/volumes"), None, 200);

    // The array is back with the same LUNs: both heal, data intact.
    tgt.launch();
    tgt.add_lun(&lun1, 1);
    tgt.add_lun(&lun2, 2);
    n.wait_health(&id1, "ok");
    n.wait_health(&id2, "ok");
    qemu_io(&uri1, &format!("read -P 0x21 0 {MIB}"));
    qemu_io(&uri2, &format!("read -P 0x22 0 {MIB}"));
    n.detach(&id1, &att1);
    n.detach(&id2, &att2);
}

#[test]
fn an_attached_loop_lun_that_shrinks_away_shows_on_its_volume_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.img");
    sparse_file(&a, GIB);
    pattern(&a, MIB, MIB as usize, 0x4b);
    let la = Loop::new(&a);
    let links = d.join("luns");
    std::fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink(&la.dev, links.join("lun-a")).unwrap();
    let n = Node::start(
        &d.join("node"),
        &format!(
            "lun-health-secs = 1\n{}",
            devices_config(&format!("{}/lun-*", links.display()))
        ),
    );
    let name = links.join("lun-a").display().to_string();
    let v = n.manage("local", &name, None);
    assert_eq!(v["status"], "available", "{v}\n{}", n.daemon.log_text());
    let id = v["id"].as_str().unwrap().to_string();
    let (att, uri) = n.attach(&id);
    qemu_io(&uri, &format!("read -P 0x4b {MIB} {MIB}"));
    assert_eq!(n.show(&id)["lun"]["health"], "ok");

    // The LUN goes away under the host: the device reads as 0 bytes. Reads fail with
    // EIO (never zeros the volume does not hold), the volume shows the fault.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(0)
        .unwrap();
    la.refresh();
    let shown = n.wait_health(&id, "error");
    assert_eq!(shown["status"], "in-use", "{shown}");
    assert!(
        shown["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("is now 0 bytes"),
        "{shown}"
    );
    qemu_io_eio(&uri, &format!("read {MIB} 4k"));

    // It comes back (same backing file: same identity): the volume heals.
    sparse_file(&a, GIB);
    pattern(&a, MIB, MIB as usize, 0x4c);
    la.refresh();
    n.wait_health(&id, "ok");
    qemu_io(&uri, &format!("read -P 0x4c {MIB} {MIB}"));
    n.detach(&id, &att);
}

/// A LUN pool with mutual CHAP; `algorithms` as `chap-algorithms` (TOML) or the default.
fn mutual_config(port: u16, secret_id: &str, target_secret_id: &str, algorithms: &str) -> String {
    format!(
        "[pools.array]\nkind = \"lun\"\nportals = [\"127.0.0.1:{port}\"]\ntarget = \"{IQN}\"\n\
         chap-user = \"ember\"\nchap-secret = \"{secret_id}\"\n\
         chap-target-user = \"array\"\nchap-target-secret = \"{target_secret_id}\"\n\
         {algorithms}iscsi-options = \"login_timeout=5&timeout=5\"\n"
    )
}

#[test]
fn mutual_chap_with_secrets_from_the_key_store_against_tgtd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lun1 = d.join("lun1.img");
    sparse_file(&lun1, GIB);
    pattern(&lun1, MIB, MIB as usize, 0x6d);
    let tgt = Tgtd::start(d);
    tgt.add_lun(&lun1, 1);
    tgt.chap("ember", "chap-secret-0123");
    // The target's own (outgoing) account: what it answers Ember's challenge with.
    tgt.adm(&[
        "--op",
        "new",
        "--mode",
        "account",
        "--user",
        "array",
        "--password",
        "array-secret-456",
    ]);
    tgt.adm(&[
        "--op",
        "bind",
        "--mode",
        "account",
        "--tid",
        "1",
        "--user",
        "array",
        "--outgoing",
    ]);
    let md5 = "chap-algorithms = [\"md5\"]\n";
    let mut n = Node::start(
        &d.join("node"),
        &mutual_config(tgt.port, "none", "none", md5),
    );
    let ours = n.secret("chap-secret-0123");
    let theirs = n.secret("array-secret-456");
    let impostor = n.secret("not-the-array-secret");

    // The default offer (SHA-256 first): tgtd picks CHAP_A=7 but wants SHA-1 for it,
    // so even the right secrets fail; the reason says what to do.
    n.reconfigure(&mutual_config(tgt.port, &ours, &theirs, ""));
    let (s, v) = n.call("GET", &n.p("/manageable_volumes"), None);
    assert_eq!(s, 503, "{v}");
    assert!(fault_message(&v).contains("tgtd does SHA-1 for 7"), "{v}");

    // The target proves a secret other than the one in the key store: no login, a
    // clear reason in the listing and on the managed volume, nothing read or written.
    n.reconfigure(&mutual_config(tgt.port, &ours, &impostor, md5));
    let before = std::fs::read(&lun1).unwrap();
    let (s, v) = n.call("GET", &n.p("/manageable_volumes"), None);
    assert_eq!(s, 503, "{v}");
    assert!(
        fault_message(&v).contains("failed mutual authentication"),
        "{v}"
    );
    let v = n.manage("array", "lun-1", None);
    assert_eq!(v["status"], "error", "{v}");
    assert!(
        v["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("failed mutual authentication"),
        "{v}"
    );
    let log = n.daemon.log_text();
    assert!(!log.contains("not-the-array-secret") && !log.contains("array-secret-456"));
    n.ok(
        "DELETE",
        &n.p(&format!("/volumes/{}", v["id"].as_str().unwrap())),
        None,
        202,
    );
    assert!(std::fs::read(&lun1).unwrap() == before, "the LUN changed");

    // The right target secret: managed, attached, read and written.
    n.reconfigure(&mutual_config(tgt.port, &ours, &theirs, md5));
    let v = n.manage("array", "lun-1", None);
    assert_eq!(v["status"], "available", "{v}\n{}", n.daemon.log_text());
    let id = v["id"].as_str().unwrap().to_string();
    let (att, uri) = n.attach(&id);
    qemu_io(&uri, &format!("read -P 0x6d {MIB} {MIB}"));
    qemu_io(&uri, &format!("write -P 0x6e {} {MIB}", 2 * MIB));
    qemu_io(&uri, "flush");
    n.detach(&id, &att);
    assert!(has_pattern(&lun1, 2 * MIB, MIB as usize, 0x6e));
}
