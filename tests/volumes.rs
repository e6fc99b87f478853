//! End-to-end: volumes, clones, snapshots, exports and database locks through `emberd
//! serve`'s REST API, with real clients (qemu-io over NBD, a QEMU TCG guest over
//! vhost-user, cryptsetup on the backing file) on SQLite and on MariaDB
//! (`EMBER_TEST_MYSQL_URL`, see control/README.md).

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::serve::{request as http, Resp};
use common::{free_port, require_tool, run_ok, wait_for_tcp, Daemon};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// One `emberd serve` node.
struct Node {
    daemon: Daemon,
    url: String,
    data: PathBuf,
    admin: String,
    args: Vec<String>,
    dir: PathBuf,
}

impl Node {
    fn start(dir: &Path, name: &str, database: Option<&str>, lease_secs: u64) -> Node {
        Self::start_with(dir, name, database, lease_secs, &[])
    }

    fn start_with(
        dir: &Path,
        name: &str,
        database: Option<&str>,
        lease_secs: u64,
        extra: &[&str],
    ) -> Node {
        let data = dir.join(format!("data-{name}"));
        std::fs::create_dir_all(&data).unwrap();
        let port = free_port();
        let rest = format!("127.0.0.1:{port}");
        let nbd_sock = data.join("nbd.sock");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--rest".into(),
            rest.clone(),
            "--nbd".into(),
            format!("unix:{}", nbd_sock.display()),
            "--node-name".into(),
            name.into(),
            "--lock-lease-secs".into(),
            lease_secs.to_string(),
            // These tests read attachments with plain NBD clients; tests/nbd_tls.rs
            // covers the default (TLS with a key per attachment).
            "--nbd-tls".into(),
            "off".into(),
        ];
        if let Some(db) = database {
            args.push("--database".into());
            args.push(db.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::spawn(&data, &a);
        wait_for_tcp(&rest, Duration::from_secs(120));
        let admin = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        Node {
            daemon,
            url: format!("http://{rest}"),
            data,
            admin,
            args,
            dir: dir.to_path_buf(),
        }
    }

    /// SIGKILL and start again with the same flags.
    fn restart(&mut self) {
        self.daemon.signal(libc::SIGKILL);
        self.daemon.wait_exit(Duration::from_secs(30));
        let a: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Daemon::spawn(&self.data, &a);
        wait_for_tcp(
            self.url.trim_start_matches("http://"),
            Duration::from_secs(120),
        );
    }

    fn pool_dir(&self) -> PathBuf {
        self.data.join("pools").join("default")
    }

    fn log(&self) -> String {
        self.daemon.log_text()
    }
}

fn expect(r: Resp, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {r:?}");
    r.body
}

/// A project with a member token.
struct Project {
    id: String,
    token: String,
}

fn project(n: &Node, name: &str) -> Project {
    let p = expect(
        http(
            "POST",
            &format!("{}/v3/projects", n.url),
            &n.admin,
            Some(json!({"project": {"name": name}})),
        ),
        201,
        "create project",
    );
    let id = p["project"]["id"].as_str().unwrap().to_string();
    let t = expect(
        http(
            "POST",
            &format!("{}/v3/projects/{id}/tokens", n.url),
            &n.admin,
            Some(json!({"token": {"role": "member"}})),
        ),
        201,
        "create token",
    );
    Project {
        id,
        token: t["token"]["token"].as_str().unwrap().to_string(),
    }
}

fn vol_url(n: &Node, p: &Project, rest: &str) -> String {
    format!("{}/v3/{}/volumes{rest}", n.url, p.id)
}

fn create_volume(n: &Node, p: &Project, body: Value) -> Resp {
    http(
        "POST",
        &vol_url(n, p, ""),
        &p.token,
        Some(json!({ "volume": body })),
    )
}

/// Create a volume and wait until it is `available`; returns its id.
fn create_available(n: &Node, p: &Project, body: Value) -> String {
    let v = expect(create_volume(n, p, body), 202, "create");
    let id = v["volume"]["id"].as_str().unwrap().to_string();
    assert_eq!(wait_ready(n, p, &id)["status"], "available", "{}", n.log());
    id
}

fn show(n: &Node, p: &Project, id: &str) -> Value {
    expect(
        http("GET", &vol_url(n, p, &format!("/{id}")), &p.token, None),
        200,
        "show volume",
    )["volume"]
        .clone()
}

/// Wait until the volume leaves `creating`; returns it.
fn wait_ready(n: &Node, p: &Project, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = show(n, p, id);
        if v["status"] != "creating" {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "volume {id} stuck creating; log:\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn action(n: &Node, p: &Project, id: &str, body: Value) -> Resp {
    http(
        "POST",
        &vol_url(n, p, &format!("/{id}/action")),
        &p.token,
        Some(body),
    )
}

fn attach(n: &Node, p: &Project, id: &str, protocol: &str) -> Value {
    let r = expect(
        action(
            n,
            p,
            id,
            json!({"os-initialize_connection": {"connector": {"protocol": protocol}}}),
        ),
        200,
        "initialize connection",
    );
    r["connection_info"].clone()
}

fn detach(n: &Node, p: &Project, id: &str, attachment_id: &str) {
    expect(
        action(
            n,
            p,
            id,
            json!({"os-terminate_connection": {"connector": {"attachment_id": attachment_id}}}),
        ),
        202,
        "terminate connection",
    );
}

/// Fill the first `len` bytes of a pool file with a pattern (plaintext volumes only).
fn fill(path: &Path, len: usize, byte: u8) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let chunk = vec![byte; 8 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

/// Guest: the vhost-user disk must hold 0x5a at 1 MiB..2 MiB and 0xa5 at 8 MiB..9 MiB.
const GUEST_READ: &str = r#"
set -e
dd if=/dev/vda of=/tmp/a bs=64k skip=16 count=16 iflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/b bs=64k skip=128 count=16 iflag=direct 2>/dev/null
[ "$(md5sum < /tmp/a)" = "$(head -c 1048576 /dev/zero | tr '\0' '\132' | md5sum)" ] || { echo "PATTERN-A-MISSING"; exit 4; }
[ "$(md5sum < /tmp/b)" = "$(head -c 1048576 /dev/zero | tr '\0' '\245' | md5sum)" ] || { echo "PATTERN-B-MISSING"; exit 5; }
echo GUEST-READ-OK
"#;

/// The tour a user takes: encrypted type, Ember orders the key, create, NBD write,
/// vhost-user read in a guest, cryptsetup on the file; plus the bad-input answers.
#[test]
fn full_tour_encrypted_volume() {
    require_tool("qemu-io");
    require_tool("qemu-system-x86_64");
    require_tool("cryptsetup");
    let g = guest::Guest::get();
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(dir.path(), "tour", None, 30);
    let p = project(&n, "tour");

    // Admin: an encrypted type (LUKS2, AES-256-XTS) with QoS.
    encrypted_type(
        &n,
        &p,
        "secure",
        json!({"qos:total_iops_sec": "100000"}),
        "luks2",
        512,
    );

    // Bad input first: too big (413 before anything is allocated), unknown field, bad key.
    let r = create_volume(&n, &p, json!({"size": 1 << 19, "volume_type": "secure"}));
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.body["overLimit"]["code"], 413);
    let r = create_volume(&n, &p, json!({"size": 1, "colour": "red"}));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{r:?}"
    );
    let wrong = expect(
        http(
            "POST",
            &format!("{}/v1/secrets", n.url),
            &p.token,
            Some(
                json!({"secret_type": "symmetric", "algorithm": "aes", "bit_length": 256,
                "payload": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "payload_content_type": "application/octet-stream",
                "payload_content_encoding": "base64"}),
            ),
        ),
        201,
        "store a 256-bit key",
    );
    let wrong_id = wrong["secret_ref"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let r = create_volume(
        &n,
        &p,
        json!({"size": 1, "volume_type": "secure", "encryption_key_id": wrong_id}),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("bit_length"),
        "{r:?}"
    );
    assert!(
        std::fs::read_dir(n.pool_dir())
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "refused creates allocate nothing"
    );

    // Create: Ember orders the key.
    let v = expect(
        create_volume(
            &n,
            &p,
            json!({"size": 1, "name": "db", "volume_type": "secure"}),
        ),
        202,
        "create",
    );
    assert_eq!(v["volume"]["status"], "creating");
    let id = v["volume"]["id"].as_str().unwrap().to_string();
    let v = wait_ready(&n, &p, &id);
    assert_eq!(v["status"], "available", "{v}\n{}", n.log());
    assert_eq!(v["encrypted"], true);
    let key_id = v["encryption_key_id"].as_str().unwrap().to_string();
    let e = expect(
        http(
            "GET",
            &vol_url(&n, &p, &format!("/{id}/encryption")),
            &p.token,
            None,
        ),
        200,
        "encryption",
    );
    assert_eq!(e["encryption_key_id"], key_id.as_str());
    assert_eq!(e["provider"], "luks2");
    assert_eq!(e["key_size"], 512);
    let s = expect(
        http(
            "GET",
            &format!("{}/v1/secrets/{key_id}", n.url),
            &p.token,
            None,
        ),
        200,
        "key metadata",
    );
    assert_eq!(s["bit_length"], 512, "{s}");

    // Attach over NBD and write with qemu-io.
    let ci = attach(&n, &p, &id, "nbd");
    assert_eq!(ci["driver_volume_type"], "nbd");
    let uri = ci["data"]["uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("nbd+unix:///"), "{uri}");
    let nbd_att = ci["data"]["attachment_id"].as_str().unwrap().to_string();
    assert_eq!(show(&n, &p, &id)["status"], "in-use");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "write -P 0xa5 8M 1M",
    ]));
    // In use: delete refused.
    let r = http(
        "DELETE",
        &vol_url(&n, &p, &format!("/{id}")),
        &p.token,
        None,
    );
    assert_eq!(r.status, 400, "{r:?}");
    detach(&n, &p, &id, &nbd_att);
    assert_eq!(show(&n, &p, &id)["status"], "available");

    // Attach over vhost-user and read the same data in the TCG guest.
    let ci = attach(&n, &p, &id, "vhost-user");
    assert_eq!(ci["driver_volume_type"], "vhost-user");
    let sock = PathBuf::from(ci["data"]["socket_path"].as_str().unwrap());
    let vh_att = ci["data"]["attachment_id"].as_str().unwrap().to_string();
    let gdir = dir.path().join("guest");
    std::fs::create_dir_all(&gdir).unwrap();
    let initrd = g.initrd(&gdir, GUEST_READ);
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &sock, 1, false));
    let mut q = guest::Qemu::spawn(&gdir, &args);
    let (rc, console) = q.wait_exit(Duration::from_secs(900));
    assert_eq!(
        rc,
        0,
        "guest failed; console:\n{console}\nemberd log:\n{}",
        n.log()
    );
    detach(&n, &p, &id, &vh_att);

    // The file on disk is a LUKS volume that opens with the hex of the ordered key.
    let file = n.pool_dir().join(format!("{id}.img"));
    let dump = run_ok(Command::new("cryptsetup").args(["luksDump", file.to_str().unwrap()]));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("Version:") && dump.contains("2"), "{dump}");
    let hex = key_hex(&n, &p, &key_id);
    assert_eq!(hex.len(), 128, "a 512-bit key");
    assert!(
        opens_with(&file, &hex),
        "cryptsetup rejected the hex passphrase"
    );
    let raw = std::fs::read(&file).unwrap();
    assert!(
        !raw.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)),
        "plaintext found on disk"
    );

    // An encrypted clone gets its own key, opening with its own hex passphrase only.
    let c = expect(
        create_volume(&n, &p, json!({"source_volid": id, "name": "copy"})),
        202,
        "clone",
    );
    let cid = c["volume"]["id"].as_str().unwrap().to_string();
    let cv = wait_ready(&n, &p, &cid);
    assert_eq!(cv["status"], "available", "{cv}\n{}", n.log());
    let ckey = cv["encryption_key_id"].as_str().unwrap().to_string();
    assert_ne!(ckey, key_id);
    let cfile = n.pool_dir().join(format!("{cid}.img"));
    assert!(
        !opens_with(&cfile, &hex),
        "the clone must not open with the source's key"
    );
    let chex = key_hex(&n, &p, &ckey);
    assert!(
        opens_with(&cfile, &chex),
        "the clone opens with its own key"
    );
    // The clone's data reads back over NBD.
    let ci = attach(&n, &p, &cid, "nbd");
    let curi = ci["data"]["uri"].as_str().unwrap().to_string();
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &curi,
        "-c",
        "read -P 0x5a 1M 1M",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    detach(&n, &p, &cid, ci["data"]["attachment_id"].as_str().unwrap());

    // Extend, then delete: files and owned keys go away.
    expect(
        action(&n, &p, &id, json!({"os-extend": {"new_size": 2}})),
        202,
        "extend",
    );
    assert_eq!(show(&n, &p, &id)["size"], 2);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * GIB);
    for v in [&id, &cid] {
        expect(
            http("DELETE", &vol_url(&n, &p, &format!("/{v}")), &p.token, None),
            202,
            "delete",
        );
    }
    assert!(!file.exists() && !cfile.exists());
    let r = http(
        "GET",
        &format!("{}/v1/secrets/{key_id}", n.url),
        &p.token,
        None,
    );
    assert_eq!(r.status, 404, "an owned key is deleted with its volume");
}

/// Payload of a secret as lowercase hex (Cinder's passphrase for a symmetric key).
fn key_hex(n: &Node, p: &Project, key_id: &str) -> String {
    let key = reqwest::blocking::Client::new()
        .get(format!("{}/v1/secrets/{key_id}/payload", n.url))
        .header("X-Auth-Token", &p.token)
        .header("Accept", "application/octet-stream")
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// `cryptsetup open --test-passphrase` of `file` with `pass`.
fn opens_with(file: &Path, pass: &str) -> bool {
    use std::io::Write;
    let mut c = Command::new("cryptsetup")
        .args([
            "open",
            "--test-passphrase",
            "--key-file=-",
            file.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(pass.as_bytes()).unwrap();
    c.wait().unwrap().success()
}

/// Snapshots of an encrypted volume, and a bigger volume made from one: same data, its
/// own key; a volume with snapshots cannot be deleted.
#[test]
fn encrypted_snapshot_and_restore() {
    require_tool("qemu-io");
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(dir.path(), "snap", None, 30);
    let p = project(&n, "snap");
    encrypted_type(&n, &p, "enc1", json!({}), "luks", 256);
    let v = expect(
        create_volume(&n, &p, json!({"size": 1, "volume_type": "enc1"})),
        202,
        "create",
    );
    let id = v["volume"]["id"].as_str().unwrap().to_string();
    let v = wait_ready(&n, &p, &id);
    assert_eq!(v["status"], "available", "{v}");
    let key = v["encryption_key_id"].as_str().unwrap().to_string();
    let ci = attach(&n, &p, &id, "nbd");
    let uri = ci["data"]["uri"].as_str().unwrap().to_string();
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x77 3M 2M"]));
    // Snapshot of an in-use volume needs force.
    let snap_url = format!("{}/v3/{}/snapshots", n.url, p.id);
    let r = http(
        "POST",
        &snap_url,
        &p.token,
        Some(json!({"snapshot": {"volume_id": id}})),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let s = expect(
        http(
            "POST",
            &snap_url,
            &p.token,
            Some(json!({"snapshot": {"volume_id": id, "force": true, "name": "s1"}})),
        ),
        202,
        "snapshot",
    );
    let sid = s["snapshot"]["id"].as_str().unwrap().to_string();
    detach(&n, &p, &id, ci["data"]["attachment_id"].as_str().unwrap());
    let t0 = Instant::now();
    loop {
        let s = expect(
            http("GET", &format!("{snap_url}/{sid}"), &p.token, None),
            200,
            "show snapshot",
        );
        if s["snapshot"]["status"] == "available" {
            assert_eq!(s["snapshot"]["encrypted"], true);
            break;
        }
        assert_eq!(s["snapshot"]["status"], "creating", "{s}");
        assert!(t0.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = http(
        "DELETE",
        &vol_url(&n, &p, &format!("/{id}")),
        &p.token,
        None,
    );
    assert_eq!(r.status, 400, "a volume with snapshots stays: {r:?}");

    // Restore into a bigger volume: same data, its own key.
    let r = expect(
        create_volume(&n, &p, json!({"snapshot_id": sid, "size": 2})),
        202,
        "from snapshot",
    );
    let rid = r["volume"]["id"].as_str().unwrap().to_string();
    let rv = wait_ready(&n, &p, &rid);
    assert_eq!(rv["status"], "available", "{rv}\n{}", n.log());
    assert_eq!(rv["size"], 2);
    assert_eq!(rv["snapshot_id"], sid.as_str());
    let rkey = rv["encryption_key_id"].as_str().unwrap().to_string();
    assert_ne!(rkey, key);
    let rfile = n.pool_dir().join(format!("{rid}.img"));
    assert!(opens_with(&rfile, &key_hex(&n, &p, &rkey)));
    assert!(!opens_with(&rfile, &key_hex(&n, &p, &key)));
    let ci = attach(&n, &p, &rid, "nbd");
    let ruri = ci["data"]["uri"].as_str().unwrap().to_string();
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &ruri,
        "-c",
        "read -P 0x77 3M 2M",
        // The grown second GiB is readable (as with dm-crypt, it holds the decryption
        // of whatever the new blocks contain, not zeros).
        "-c",
        "read 1G 1M",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    detach(&n, &p, &rid, ci["data"]["attachment_id"].as_str().unwrap());

    // Clean up in order: snapshot, then the volumes.
    expect(
        http("DELETE", &format!("{snap_url}/{sid}"), &p.token, None),
        202,
        "delete snapshot",
    );
    for v in [&id, &rid] {
        expect(
            http("DELETE", &vol_url(&n, &p, &format!("/{v}")), &p.token, None),
            202,
            "delete volume",
        );
    }
    let left: Vec<_> = std::fs::read_dir(n.pool_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The lock flow on one node: four clones overlap, a delete waits for them, a clone
/// after the waiting delete gets 409; then a SIGKILL in the middle of a clone.
fn clone_lock_flow(database: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Node::start(dir.path(), "locks", database, 3);
    let p = project(&n, "locks");
    let src = expect(
        create_volume(&n, &p, json!({"size": 1, "name": "src"})),
        202,
        "create source",
    );
    let src = src["volume"]["id"].as_str().unwrap().to_string();
    assert_eq!(wait_ready(&n, &p, &src)["status"], "available");
    fill(&n.pool_dir().join(format!("{src}.img")), 384 << 20, 0x11);

    // An external orchestrator holds the source shared too, so the delete below is
    // guaranteed to find readers whatever the machine's speed.
    let ext = expect(
        http(
            "POST",
            &format!("{}/v3/locks", n.url),
            &n.admin,
            Some(
                json!({"lock": {"resource_type": "volume", "resource_id": src, "mode": "shared",
                "operation": "backup", "holder": "test", "ttl_s": 600}}),
            ),
        ),
        201,
        "external shared lock",
    );
    let ext_id = ext["lock"]["id"].as_str().unwrap().to_string();
    // A writer that will not wait is told when to come back.
    let r = http(
        "POST",
        &format!("{}/v3/locks", n.url),
        &n.admin,
        Some(json!({"lock": {"resource_type": "volume", "resource_id": src, "mode": "exclusive"}})),
    );
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        r.retry_after
            .as_deref()
            .is_some_and(|s| s.parse::<u64>().is_ok()),
        "{r:?}"
    );

    // Four clones at once.
    let clones: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let (n, p, src) = (&n, &p, &src);
                s.spawn(move || {
                    let r =
                        create_volume(n, p, json!({"source_volid": src, "name": format!("c{i}")}));
                    expect(r, 202, "clone")["volume"]["id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    // A delete during the clones waits (as a recorded writer)...
    std::thread::scope(|s| {
        let del = s.spawn(|| {
            http(
                "DELETE",
                &vol_url(&n, &p, &format!("/{src}")),
                &p.token,
                None,
            )
        });
        let t = Instant::now();
        loop {
            let l = expect(
                http(
                    "GET",
                    &format!("{}/v3/locks?resource_id={src}", n.url),
                    &n.admin,
                    None,
                ),
                200,
                "list locks",
            );
            if l["locks"][0]["waiters"]
                .as_array()
                .is_some_and(|w| !w.is_empty())
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the delete never waited: {l}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // ...and a clone issued after it is refused.
        let r = create_volume(&n, &p, json!({"source_volid": src}));
        assert_eq!(r.status, 409, "{r:?}");
        assert_eq!(r.body["conflictingRequest"]["code"], 409, "{r:?}");
        // The external holder leaves; the delete then goes through once the clones end.
        expect(
            http(
                "DELETE",
                &format!("{}/v3/locks/{ext_id}", n.url),
                &n.admin,
                None,
            ),
            204,
            "release",
        );
        let r = del.join().unwrap();
        assert_eq!(r.status, 202, "{r:?}\n{}", n.log());
    });
    assert!(!n.pool_dir().join(format!("{src}.img")).exists());
    for c in &clones {
        let v = wait_ready(&n, &p, c);
        assert_eq!(v["status"], "available", "{v}");
        let f = std::fs::File::open(n.pool_dir().join(format!("{c}.img"))).unwrap();
        let mut b = vec![0u8; 1 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 380 << 20).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x11),
            "clone {c} has the source's data"
        );
    }

    // The recorded history: the four clones overlap, the delete came after all of them.
    let h = expect(
        http(
            "GET",
            &format!("{}/v3/locks/history?resource_id={src}", n.url),
            &n.admin,
            None,
        ),
        200,
        "history",
    )["history"]
        .as_array()
        .unwrap()
        .clone();
    let gen = |e: &Value, k: &str| e[k].as_i64().unwrap_or(i64::MAX);
    let clone_h: Vec<&Value> = h.iter().filter(|e| e["operation"] == "clone").collect();
    assert_eq!(clone_h.len(), 4, "{h:?}");
    let last_start = clone_h
        .iter()
        .map(|e| gen(e, "acquired_gen"))
        .max()
        .unwrap();
    let first_end = clone_h
        .iter()
        .map(|e| gen(e, "released_gen"))
        .min()
        .unwrap();
    assert!(
        last_start < first_end,
        "the four clones did not overlap: {h:?}"
    );
    let del = h
        .iter()
        .find(|e| e["operation"] == "delete")
        .expect("delete in history");
    assert!(
        clone_h
            .iter()
            .all(|c| gen(c, "released_gen") <= gen(del, "acquired_gen")),
        "{h:?}"
    );
    assert_no_writer_overlap(&h);

    // SIGKILL in the middle of a clone: after the restart the clone is `error`, no part
    // file is left, and the source's lock is free.
    let big = clones[0].clone();
    let r = expect(
        create_volume(&n, &p, json!({"source_volid": big, "name": "doomed"})),
        202,
        "clone",
    );
    let doomed = r["volume"]["id"].as_str().unwrap().to_string();
    n.restart();
    let v = show(&n, &p, &doomed);
    assert!(v["status"] == "error" || v["status"] == "available", "{v}");
    let leftovers: Vec<_> = std::fs::read_dir(n.pool_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    if v["status"] == "error" {
        assert!(!n.pool_dir().join(format!("{doomed}.img")).exists());
    }
    let l = expect(
        http("GET", &format!("{}/v3/locks", n.url), &n.admin, None),
        200,
        "locks",
    );
    assert_eq!(l["locks"], json!([]), "locks released after the restart");
    expect(
        http(
            "DELETE",
            &vol_url(&n, &p, &format!("/{doomed}")),
            &p.token,
            None,
        ),
        202,
        "delete the failed clone",
    );
    let _ = &n.dir;
}

/// No exclusive grant overlaps any other grant (intervals in lock generations).
fn assert_no_writer_overlap(h: &[Value]) {
    let span = |e: &Value| {
        (
            e["acquired_gen"].as_i64().unwrap(),
            e["released_gen"].as_i64().unwrap_or(i64::MAX),
        )
    };
    for (i, a) in h.iter().enumerate() {
        for b in &h[i + 1..] {
            if a["mode"] == "shared" && b["mode"] == "shared" {
                continue;
            }
            let ((a0, a1), (b0, b1)) = (span(a), span(b));
            assert!(!(a0 < b1 && b0 < a1), "writer overlaps: {a} / {b}");
        }
    }
}

#[test]
fn clone_lock_flow_sqlite() {
    clone_lock_flow(None);
}

#[test]
fn clone_lock_flow_mariadb() {
    let db = fresh_mysql_db();
    clone_lock_flow(Some(&db));
}

/// A fresh database on the test MariaDB (`EMBER_TEST_MYSQL_URL`), created with the
/// `mariadb` client.
fn fresh_mysql_db() -> String {
    let base = std::env::var("EMBER_TEST_MYSQL_URL").unwrap_or_else(|_| {
        panic!(
            "EMBER_TEST_MYSQL_URL is not set: the MariaDB tests need it, e.g. \
             mysql://ember:ember@127.0.0.1:3306/ember_test (see control/README.md)"
        )
    });
    let rest = base.split_once("://").unwrap().1;
    let (creds, hostdb) = rest.rsplit_once('@').unwrap();
    let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
    let hostport = hostdb.split('/').next().unwrap();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    let name = format!(
        "ember_vol_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    require_tool("mysql");
    run_ok(Command::new("mysql").args([
        "-u",
        user,
        &format!("-p{pass}"),
        "-h",
        host,
        "-P",
        port,
        "-e",
        &format!("CREATE DATABASE `{name}`"),
    ]));
    format!("mysql://{creds}@{hostport}/{name}")
}

/// Two nodes on one MariaDB: a randomized history of external locks never shows a writer
/// with anyone else; a node SIGKILLed while holding a lock loses it after the lease.
#[test]
fn two_nodes_mariadb_history_and_sigkill() {
    let db = fresh_mysql_db();
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(dir.path(), "node-a", Some(&db), 3);
    // Cluster members share the master key that seals the secrets in the database.
    let key = a.data.join("master.key");
    let mut b = Node::start_with(
        dir.path(),
        "node-b",
        Some(&db),
        3,
        &["--master-key-file", key.to_str().unwrap()],
    );
    let nodes = [&a, &b];
    let admin = a.admin.clone();
    // Both nodes share the database: node B's admin token file was registered too.
    let observed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let (nodes, observed, admin, b_admin) = (&nodes, &observed, &admin, &b.admin);
            s.spawn(move || {
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..12 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = nodes[(x % 2) as usize];
                    let token = if x % 2 == 0 { admin } else { b_admin };
                    let mode = if x % 3 == 0 { "exclusive" } else { "shared" };
                    let r = http(
                        "POST",
                        &format!("{}/v3/locks", n.url),
                        token,
                        Some(json!({"lock": {"resource_type": "volume", "resource_id": "R", "mode": mode,
                            "operation": "test", "wait_s": 120}})),
                    );
                    let l = expect(r, 201, "acquire");
                    let start = Instant::now();
                    std::thread::sleep(Duration::from_millis(x % 20));
                    let end = Instant::now();
                    let id = l["lock"]["id"].as_str().unwrap().to_string();
                    let other = nodes[((x >> 8) % 2) as usize];
                    let token = if std::ptr::eq(other, nodes[0]) { admin } else { b_admin };
                    expect(http("DELETE", &format!("{}/v3/locks/{id}", other.url), token, None), 204, "release");
                    observed.lock().unwrap().push((mode, start, end));
                }
            });
        }
    });
    let h = expect(
        http(
            "GET",
            &format!("{}/v3/locks/history?resource_id=R", a.url),
            &admin,
            None,
        ),
        200,
        "history",
    )["history"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(h.len(), 72);
    assert!(h.iter().any(|e| e["node"] == "node-a") && h.iter().any(|e| e["node"] == "node-b"));
    assert!(h.iter().all(|e| e["released_gen"].is_i64()));
    assert_no_writer_overlap(&h);
    // The clients' own observations agree (held intervals are inside the granted ones).
    let obs = observed.into_inner().unwrap();
    for (i, (m1, s1, e1)) in obs.iter().enumerate() {
        for (m2, s2, e2) in &obs[i + 1..] {
            if *m1 == "shared" && *m2 == "shared" {
                continue;
            }
            assert!(
                !(s1 < e2 && s2 < e1),
                "a writer overlapped another holder as seen by the clients"
            );
        }
    }

    // Node B holds a lock of its own (a clone's shared lock on its source) and dies.
    let p = project(&b, "kill");
    let src = expect(create_volume(&b, &p, json!({"size": 1})), 202, "create")["volume"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(wait_ready(&b, &p, &src)["status"], "available");
    fill(&b.pool_dir().join(format!("{src}.img")), 1 << 30, 0x22);
    let c = expect(
        create_volume(&b, &p, json!({"source_volid": src})),
        202,
        "clone",
    )["volume"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    b.daemon.signal(libc::SIGKILL);
    b.daemon.wait_exit(Duration::from_secs(30));
    // The dead node's holder is still there, with the lease its last heartbeat gave it.
    let locks = expect(
        http(
            "GET",
            &format!("{}/v3/locks?resource_id={src}", a.url),
            &admin,
            None,
        ),
        200,
        "locks",
    );
    let dead_lease_until = locks["locks"][0]["holders"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["node"] == "node-b"))
        .and_then(|h| h["lease_until"].as_i64());
    // Node A takes the source exclusively once B's lease runs out, not before.
    let t = Instant::now();
    let r = http(
        "POST",
        &format!("{}/v3/locks", a.url),
        &admin,
        Some(
            json!({"lock": {"resource_type": "volume", "resource_id": src, "mode": "exclusive",
            "operation": "takeover", "wait_s": 120}}),
        ),
    );
    let l = expect(r, 201, "acquire after the lease");
    let h = expect(
        http(
            "GET",
            &format!("{}/v3/locks/history?resource_id={src}", a.url),
            &admin,
            None,
        ),
        200,
        "history",
    )["history"]
        .as_array()
        .unwrap()
        .clone();
    let clone_entry = h
        .iter()
        .find(|e| e["operation"] == "clone")
        .expect("clone in history");
    assert_eq!(clone_entry["node"], "node-b");
    assert!(
        clone_entry["release_reason"] == "expired",
        "B's holder was reaped after its lease ({:?}): {h:?}",
        t.elapsed()
    );
    let lease_until =
        dead_lease_until.expect("B's clone held the lock when it was killed (see the history)");
    let takeover = h
        .iter()
        .find(|e| e["operation"] == "takeover")
        .expect("takeover in history");
    assert!(
        takeover["acquired_at"].as_i64().unwrap() >= lease_until,
        "A got the lock before B's lease ended: {takeover} vs lease_until {lease_until}"
    );
    println!(
        "lease: A got the lock {} ms after the dead node's lease ended (it waited {:?})",
        takeover["acquired_at"].as_i64().unwrap_or(0) - lease_until,
        t.elapsed()
    );
    expect(
        http(
            "DELETE",
            &format!("{}/v3/locks/{}", a.url, l["lock"]["id"].as_str().unwrap()),
            &admin,
            None,
        ),
        204,
        "release",
    );
    // B comes back: its half-made clone is `error`, no part file, nothing locked.
    b.restart();
    let v = show(&b, &p, &c);
    assert!(v["status"] == "error" || v["status"] == "available", "{v}");
    let parts = std::fs::read_dir(b.pool_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".part")
        })
        .count();
    assert_eq!(parts, 0);
    let l = expect(
        http("GET", &format!("{}/v3/locks", a.url), &admin, None),
        200,
        "locks",
    );
    assert_eq!(l["locks"], json!([]), "{l}");
}

/// NBD attachments are separate exports: each has its own access mode, terminating one
/// closes its live connections and leaves the others, and a new connection after
/// `os-extend` sees the new size (NBD cannot tell a connected client).
#[test]
fn nbd_attachments_modes_terminate_and_extend() {
    use std::io::{BufRead, BufReader, Write};
    require_tool("qemu-io");
    require_tool("nbdinfo");
    require_tool("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(dir.path(), "nbdatt", None, 30);
    let p = project(&n, "nbdatt");
    let id = create_available(&n, &p, json!({"size": 1, "name": "plain"}));

    let rw = attach(&n, &p, &id, "nbd");
    let ro = expect(
        action(
            &n,
            &p,
            &id,
            json!({"os-initialize_connection": {"connector": {"protocol": "nbd", "read_only": true}}}),
        ),
        200,
        "read-only attach",
    )["connection_info"]
        .clone();
    assert_eq!(ro["data"]["access_mode"], "ro");
    let rw_uri = rw["data"]["uri"].as_str().unwrap().to_string();
    let ro_uri = ro["data"]["uri"].as_str().unwrap().to_string();
    assert_ne!(rw_uri, ro_uri, "each attachment is its own export");

    // The modes are each attachment's own, whichever came first.
    run_ok(Command::new("qemu-io").args(["-f", "raw", &rw_uri, "-c", "write -P 0x3c 0 64k"]));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &ro_uri, "-c", "write -P 0x11 0 64k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ermission denied")
            || text.contains("read-only")
            || text.contains("Read-only"),
        "a write through the read-only attachment must fail: {text}"
    );
    let out = run_ok(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &ro_uri,
        "-c",
        "read -P 0x3c 0 64k",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));

    // A live connection to the read-write attachment ends with its termination.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let script = "import sys\n\
h.pread(512, 0)\n\
print('connected', flush=True)\n\
sys.stdin.readline()\n\
try:\n    h.pread(512, 0)\n    print('still-open', flush=True)\n\
except nbd.Error as e:\n    print('closed', e, flush=True)\n";
    let mut sh = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", &rw_uri, "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sh.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "connected");
    detach(&n, &p, &id, rw["data"]["attachment_id"].as_str().unwrap());
    writeln!(sh.stdin.take().unwrap()).unwrap();
    let last = lines.next().unwrap().unwrap();
    assert!(last.starts_with("closed"), "{last}\n{}", n.log());
    sh.wait().unwrap();
    let out = Command::new("nbdinfo").arg(&rw_uri).output().unwrap();
    assert!(!out.status.success(), "the terminated export is gone");

    // Online extend: the read-only attachment lives on; a new connection sees 2 GiB.
    expect(
        action(&n, &p, &id, json!({"os-extend": {"new_size": 2}})),
        202,
        "extend",
    );
    let out = run_ok(Command::new("nbdinfo").args(["--size", &ro_uri]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (2 * GIB).to_string()
    );
    detach(&n, &p, &id, ro["data"]["attachment_id"].as_str().unwrap());
    assert_eq!(show(&n, &p, &id)["status"], "available");
}

/// An encrypted volume type `name` (`provider` luks or luks2, aes-xts-plain64 with
/// `key_size`-bit keys; Ember orders the keys) with `extra_specs`.
fn encrypted_type(
    n: &Node,
    p: &Project,
    name: &str,
    extra_specs: Value,
    provider: &str,
    key_size: u32,
) {
    let t = expect(
        http(
            "POST",
            &format!("{}/v3/{}/types", n.url, p.id),
            &n.admin,
            Some(json!({"volume_type": {"name": name, "extra_specs": extra_specs}})),
        ),
        200,
        "create type",
    );
    let type_id = t["volume_type"]["id"].as_str().unwrap().to_string();
    expect(
        http(
            "POST",
            &format!("{}/v3/{}/types/{type_id}/encryption", n.url, p.id),
            &n.admin,
            Some(
                json!({"encryption": {"provider": provider, "cipher": "aes-xts-plain64",
                "key_size": key_size, "control_location": "front-end"}}),
            ),
        ),
        200,
        "create encryption spec",
    );
}

/// The value after `key=` on the console, as a number.
fn console_number(console: &str, key: &str) -> u64 {
    console
        .split(key)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key} number on the console:\n{console}"))
}

/// Guest: print vda's size, wait (bounded) for it to change, print the new size, then
/// write and read back a block beyond the old end.
const GUEST_WAIT_RESIZE: &str = r#"
s0=$(cat /sys/block/vda/size)
echo "SIZE0=$s0 "
i=0
s=$s0
while [ "$s" = "$s0" ] && [ $i -lt 900 ]; do
    sleep 1
    s=$(cat /sys/block/vda/size)
    i=$((i+1))
done
echo "SIZE1=$s "
[ "$s" != "$s0" ] || { echo "NO-RESIZE"; exit 3; }
head -c 65536 /dev/zero | tr '\0' '\132' > /tmp/p
dd if=/tmp/p of=/dev/vda bs=64k seek=$((s0 / 128)) oflag=direct conv=fsync 2>/dev/null || { echo "WRITE-FAILED"; exit 4; }
dd if=/dev/vda of=/tmp/r bs=64k skip=$((s0 / 128)) count=1 iflag=direct 2>/dev/null || { echo "READ-FAILED"; exit 5; }
[ "$(md5sum < /tmp/r)" = "$(md5sum < /tmp/p)" ] || { echo "PATTERN-MISSING"; exit 6; }
echo GUEST-RESIZE-OK
"#;

/// `os-extend` of an encrypted volume attached over vhost-user: the running TCG guest
/// sees the disk grow by 1 GiB without reconnecting (CONFIG_CHANGE_MSG → QEMU re-reads
/// the capacity → config interrupt → virtio_blk updates the size), and can use it.
#[test]
fn vhost_online_extend_reaches_the_guest() {
    require_tool("qemu-system-x86_64");
    let g = guest::Guest::get();
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(dir.path(), "vhext", None, 30);
    let p = project(&n, "vhext");
    encrypted_type(&n, &p, "secure", json!({}), "luks2", 512);
    let id = create_available(&n, &p, json!({"size": 1, "volume_type": "secure"}));
    let ci = attach(&n, &p, &id, "vhost-user");
    let sock = PathBuf::from(ci["data"]["socket_path"].as_str().unwrap());
    let att = ci["data"]["attachment_id"].as_str().unwrap().to_string();

    let gdir = dir.path().join("guest");
    std::fs::create_dir_all(&gdir).unwrap();
    let initrd = g.initrd(&gdir, GUEST_WAIT_RESIZE);
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &sock, 1, false));
    let mut q = guest::Qemu::spawn(&gdir, &args);
    let console = q.wait_for("SIZE0=", Duration::from_secs(900));
    let s0 = console_number(&console, "SIZE0=");
    // 1 GiB minus the LUKS2 header (the data offset), in sectors.
    assert!(s0 < 2 << 20 && s0 > (2 << 20) - (64 << 11), "SIZE0={s0}");
    expect(
        action(&n, &p, &id, json!({"os-extend": {"new_size": 2}})),
        202,
        "extend",
    );
    let (rc, console) = q.wait_exit(Duration::from_secs(900));
    assert_eq!(
        rc,
        0,
        "guest failed; console:\n{console}\nemberd log:\n{}",
        n.log()
    );
    let s1 = console_number(&console, "SIZE1=");
    assert_eq!(s1, s0 + (2 << 20), "the guest sees exactly 1 GiB more");
    eprintln!("guest: /sys/block/vda/size {s0} -> {s1} sectors");
    assert!(
        n.log()
            .contains("notified the vhost-user frontend of a config change"),
        "{}",
        n.log()
    );
    drop(q);
    detach(&n, &p, &id, &att);
    assert_eq!(show(&n, &p, &id)["size"], 2);
}

/// Names of `pid`'s threads that belong to vhost-user exports.
fn vhost_threads(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let comm = std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm == "vhost-listen" || comm.starts_with("vhost-q") {
            out.push(comm.to_string());
        }
    }
    out.sort();
    out
}

/// One QMP command on a QEMU monitor socket; returns the `return` value.
fn qmp(sock: &Path, command: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let next_return = |r: &mut BufReader<std::os::unix::net::UnixStream>| loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        if let Some(ret) = v.get("return") {
            return ret.clone();
        }
        assert!(v.get("error").is_none(), "QMP error: {v}");
    };
    let mut greeting = String::new();
    r.read_line(&mut greeting).unwrap();
    writeln!(w, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
    next_return(&mut r);
    writeln!(w, r#"{{"execute": "{command}"}}"#).unwrap();
    next_return(&mut r)
}

/// The `filename` QEMU reports for chardev `label` (`disconnected:…` once the peer left).
fn chardev_filename(qmp_sock: &Path, label: &str) -> String {
    let list = qmp(qmp_sock, "query-chardev");
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == label)
        .unwrap_or_else(|| panic!("no chardev {label}: {list}"))["filename"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Guest: write 0x5a at 1 MiB..2 MiB (direct + fsync: acknowledged), say so, then keep
/// writing 0xa5 at 8 MiB..9 MiB so requests are in flight when the export stops.
const GUEST_WRITE_THEN_BUSY: &str = r#"
set -e
head -c 1048576 /dev/zero | tr '\0' '\132' > /tmp/a
head -c 1048576 /dev/zero | tr '\0' '\245' > /tmp/b
dd if=/tmp/a of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null
echo GUEST-WROTE
set +e
while dd if=/tmp/b of=/dev/vda bs=64k seek=128 oflag=direct 2>/dev/null; do :; done
echo GUEST-IO-FAILED
sleep 100000
"#;

/// `os-terminate_connection` of a vhost-user attachment ends the live session: QEMU
/// sees the socket close, the export's threads are gone, the socket file is removed, the
/// data the guest wrote is on disk (read back over NBD) and the volume can be deleted.
#[test]
fn vhost_terminate_ends_the_live_session() {
    require_tool("qemu-system-x86_64");
    require_tool("qemu-io");
    let g = guest::Guest::get();
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(dir.path(), "vhterm", None, 30);
    let p = project(&n, "vhterm");
    let id = create_available(&n, &p, json!({"size": 1, "name": "plain"}));
    let pid = n.daemon.child.id();
    assert!(vhost_threads(pid).is_empty(), "{:?}", vhost_threads(pid));
    let ci = attach(&n, &p, &id, "vhost-user");
    let sock = PathBuf::from(ci["data"]["socket_path"].as_str().unwrap());
    let att = ci["data"]["attachment_id"].as_str().unwrap().to_string();
    // A new thread names itself once it runs: wait (bounded) for the names.
    let want = vec!["vhost-listen", "vhost-q0", "vhost-q1"];
    let t0 = Instant::now();
    while vhost_threads(pid) != want && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        vhost_threads(pid),
        want,
        "one listener and one worker per queue"
    );

    let gdir = dir.path().join("guest");
    std::fs::create_dir_all(&gdir).unwrap();
    let initrd = g.initrd(&gdir, GUEST_WRITE_THEN_BUSY);
    let qmp_sock = gdir.join("qmp.sock");
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(guest::vhost_blk_args("c0", &sock, 1, false));
    args.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp_sock.display()),
    ]);
    let mut q = guest::Qemu::spawn(&gdir, &args);
    q.wait_for("GUEST-WROTE", Duration::from_secs(900));
    let before = chardev_filename(&qmp_sock, "c0");
    assert!(!before.starts_with("disconnected"), "{before}");
    // Let the write loop run so requests are in flight at the stop.
    std::thread::sleep(Duration::from_secs(2));

    detach(&n, &p, &id, &att);
    assert!(vhost_threads(pid).is_empty(), "{:?}", vhost_threads(pid));
    assert!(!sock.exists(), "the socket file is removed");
    let t = Instant::now();
    loop {
        let f = chardev_filename(&qmp_sock, "c0");
        if f.starts_with("disconnected") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "QEMU still connected: {f}; console:\n{}",
            q.console_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = n.log();
    assert!(log.contains("vhost-user-blk export stopped"), "{log}");
    eprintln!(
        "QEMU chardev c0: {before:?} -> {:?}; emberd: {}",
        chardev_filename(&qmp_sock, "c0"),
        log.lines()
            .filter(|l| l.contains("vhost-user"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(show(&n, &p, &id)["status"], "available");
    drop(q);

    // What the guest wrote before the terminate is on disk.
    let ci = attach(&n, &p, &id, "nbd");
    let uri = ci["data"]["uri"].as_str().unwrap().to_string();
    let out =
        run_ok(Command::new("qemu-io").args(["-r", "-f", "raw", &uri, "-c", "read -P 0x5a 1M 1M"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    detach(&n, &p, &id, ci["data"]["attachment_id"].as_str().unwrap());
    expect(
        http(
            "DELETE",
            &vol_url(&n, &p, &format!("/{id}")),
            &p.token,
            None,
        ),
        202,
        "delete",
    );
    assert!(!n.pool_dir().join(format!("{id}.img")).exists());
}

/// The writer of `clones_of_an_in_use_volume_are_point_in_time`: an NBD client writing
/// an increasing counter into the first and then the last 4 KiB block of the volume,
/// each write acknowledged before the next, until `STOP` exists. At every instant the
/// volume holds (first, last) = (n, n) or (n, n-1).
const COUNTER_WRITER: &str = r#"
import os, struct
size = h.get_size()
n = 0
while not os.path.exists('STOP'):
    n += 1
    blk = struct.pack('<Q', n) * 512
    h.pwrite(blk, 0)
    h.pwrite(blk, size - 4096)
    if n == 100:
        print('writing', flush=True)
print('wrote', n, flush=True)
"#;

/// The counters in the first and last block of a plaintext image.
fn counters(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 0).unwrap();
    let first = u64::from_le_bytes(b);
    f.read_exact_at(&mut b, size - 4096).unwrap();
    (first, u64::from_le_bytes(b))
}

/// Issue 11 (9): a clone or snapshot of a volume a client is writing is the volume at
/// one instant, also on a file system without reflinks (here: ext4 or tmpfs, so the
/// copy reads the live file for a while). A real NBD client (nbdsh) keeps writing an
/// increasing counter into the first and the last block while a clone and a forced
/// snapshot are taken: each copy must hold (n, n) or (n, n-1), never a first block older
/// than the last (a torn copy, as before the data plane paused the volume's writes).
#[test]
fn clones_of_an_in_use_volume_are_point_in_time() {
    use std::io::{BufRead, BufReader};
    require_tool("nbdsh");
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(dir.path(), "pit", None, 30);
    let p = project(&n, "pit");
    let id = create_available(&n, &p, json!({"size": 1, "name": "busy"}));
    // Data to copy, so that a copy takes a while (the copy skips holes and zeros).
    fill(&n.pool_dir().join(format!("{id}.img")), 512 << 20, 0x11);
    let ci = attach(&n, &p, &id, "nbd");
    let uri = ci["data"]["uri"].as_str().unwrap().to_string();
    let work = dir.path().join("writer");
    std::fs::create_dir_all(&work).unwrap();
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut writer = Command::new("nbdsh")
        .current_dir(&work)
        .env("PATH", path)
        .args(["-u", &uri, "-c", COUNTER_WRITER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "writing");

    // A clone, then a forced snapshot, while the writer runs.
    let c = create_available(&n, &p, json!({"source_volid": id, "name": "copy"}));
    let snap_url = format!("{}/v3/{}/snapshots", n.url, p.id);
    let body = json!({"snapshot": {"volume_id": id, "force": true}});
    let s = expect(
        http("POST", &snap_url, &p.token, Some(body)),
        202,
        "snapshot",
    );
    let sid = s["snapshot"]["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let done = loop {
        let s = http("GET", &format!("{snap_url}/{sid}"), &p.token, None).body;
        if s["snapshot"]["status"] != "creating" || t.elapsed() > Duration::from_secs(600) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        done["snapshot"]["status"],
        "available",
        "{done}\n{}",
        n.log()
    );
    std::fs::write(work.join("STOP"), b"").unwrap();
    let last = lines.next().unwrap().unwrap();
    assert!(writer.wait().unwrap().success(), "writer: {last}");
    let written: u64 = last.trim_start_matches("wrote ").parse().unwrap();

    for (what, file) in [
        ("clone", n.pool_dir().join(format!("{c}.img"))),
        ("snapshot", n.pool_dir().join(format!("snap-{sid}.img"))),
    ] {
        let (first, last) = counters(&file);
        eprintln!("{what}: first block {first}, last block {last}; the writer wrote {written}");
        assert!(
            first >= 100 && first <= written,
            "{what}: {first}/{written}"
        );
        assert!(
            first == last || first == last + 1,
            "the {what} is torn: first block {first}, last block {last}"
        );
    }
    detach(&n, &p, &id, ci["data"]["attachment_id"].as_str().unwrap());
}
