//! End-to-end tests of NBD over TLS (`NBD_OPT_STARTTLS`): a real `emberd export` with
//! `--tls-psk`/`--tls-creds` and real clients (qemu-io/qemu-img with `tls-creds-psk` and
//! `tls-creds-x509`, nbdinfo/nbdcopy with `nbds://` URIs), keys and certificates made
//! at test time with GnuTLS's `psktool` and `certtool` in a temp dir; plus refusals
//! (plaintext against `require`, wrong key, unknown identity, an untrusted client
//! certificate, garbage after STARTTLS), each checked to leave the server serving.
//!
//! libnbd 1.14 (Debian 12) ignores the URI's `tls-username` and takes the PSK identity
//! from the login name, so the tests set `LOGNAME` for nbdinfo/nbdcopy.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const START: Duration = Duration::from_secs(30);

/// Reply type of `NBD_REP_ERR_TLS_REQD`.
const ERR_TLS_REQD: u32 = 0x8000_0005;
/// Reply type of `NBD_REP_ACK`.
const ACK: u32 = 1;
/// Reply type of `NBD_REP_ERR_UNKNOWN`.
const ERR_UNKNOWN: u32 = 0x8000_0006;
/// Reply type of `NBD_REP_ERR_POLICY`.
const ERR_POLICY: u32 = 0x8000_0002;

/// A psktool file for `identity` in `dir/NAME`, the layout qemu's `tls-creds-psk` wants
/// (`dir/keys.psk`) when NAME is `keys.psk`.
fn psk_file(dir: &Path, name: &str, identity: &str) -> PathBuf {
    require_tool("psktool");
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    run_ok(Command::new("psktool").args(["-u", identity, "-p"]).arg(&p));
    p
}

/// Run certtool with a template.
fn certtool(dir: &Path, template: &str, args: &[&str]) {
    require_tool("certtool");
    let t = dir.join("template.info");
    std::fs::write(&t, template).unwrap();
    run_ok(
        Command::new("certtool")
            .current_dir(dir)
            .args(args)
            .arg("--template")
            .arg(&t),
    );
}

/// A CA in `dir` (`ca-cert.pem`, `ca-key.pem`).
fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(Command::new("certtool").current_dir(dir).args([
        "--generate-privkey",
        "--outfile",
        "ca-key.pem",
    ]));
    certtool(
        dir,
        &format!("cn = {cn}\nca\ncert_signing_key\nexpiration_days = 2\n"),
        &[
            "--generate-self-signed",
            "--load-privkey",
            "ca-key.pem",
            "--outfile",
            "ca-cert.pem",
        ],
    );
}

/// A certificate `PREFIX-cert.pem` with key `PREFIX-key.pem` in `out`, signed by the CA
/// in `ca`.
fn make_cert(ca: &Path, out: &Path, prefix: &str, server: bool) {
    std::fs::create_dir_all(out).unwrap();
    let key = out.join(format!("{prefix}-key.pem"));
    let cert = out.join(format!("{prefix}-cert.pem"));
    run_ok(
        Command::new("certtool")
            .args(["--generate-privkey", "--outfile"])
            .arg(&key),
    );
    let usage = if server {
        "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n"
    } else {
        "cn = client\ntls_www_client\n"
    };
    certtool(
        ca,
        &format!("{usage}encryption_key\nsigning_key\nexpiration_days = 2\n"),
        &[
            "--generate-certificate",
            "--load-privkey",
            key.to_str().unwrap(),
            "--load-ca-certificate",
            "ca-cert.pem",
            "--load-ca-privkey",
            "ca-key.pem",
            "--outfile",
            cert.to_str().unwrap(),
        ],
    );
}

/// A running `emberd export` of a sparse file on a Unix socket and a TCP port.
struct Srv {
    dir: tempfile::TempDir,
    file: PathBuf,
    sock: PathBuf,
    port: u16,
    daemon: Daemon,
}

impl Srv {
    fn start(dir: tempfile::TempDir, size: u64, extra: &[&str]) -> Srv {
        let file = dir.path().join("disk.img");
        sparse_file(&file, size);
        let sock = dir.path().join("nbd.sock");
        let port = free_port();
        let nbd = format!("unix:{}", sock.display());
        let tcp = format!("127.0.0.1:{port}");
        let mut args = vec![
            "export",
            "--file",
            file.to_str().unwrap(),
            "--nbd",
            &nbd,
            "--nbd",
            &tcp,
            "--threads",
            "2",
        ];
        args.extend_from_slice(extra);
        let daemon = Daemon::spawn(dir.path(), &args);
        wait_for_path(&sock, START);
        wait_for_tcp(&tcp, START);
        Srv {
            dir,
            file,
            sock,
            port,
            daemon,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `nbds+unix://` with a PSK file (identity from LOGNAME, see the module doc).
    fn psk_uri(&self, psk: &Path, identity: &str) -> String {
        format!(
            "nbds+unix:///?socket={}&tls-psk-file={}&tls-username={identity}",
            self.sock.display(),
            psk.display()
        )
    }

    fn stop(mut self) {
        self.daemon.terminate(START);
    }
}

/// A libnbd tool with `LOGNAME` as the PSK identity.
fn libnbd(tool: &str, identity: &str) -> Command {
    require_tool(tool);
    let mut c = Command::new(tool);
    c.env("LOGNAME", identity);
    c
}

/// qemu-io over the Unix socket with a TLS object (`--object` spec, its id `t0`).
fn qemu_io_tls(srv: &Srv, object: &str, tcp: bool, cmds: &[&str]) -> std::process::Output {
    require_tool("qemu-io");
    let server = if tcp {
        format!(
            "file.server.type=inet,file.server.host=localhost,file.server.port={}",
            srv.port
        )
    } else {
        format!(
            "file.server.type=unix,file.server.path={}",
            srv.sock.display()
        )
    };
    let mut c = Command::new("qemu-io");
    c.args(["--object", object, "--image-opts"]);
    c.arg(format!(
        "driver=raw,file.driver=nbd,{server},file.tls-creds=t0"
    ));
    for x in cmds {
        c.args(["-c", x]);
    }
    run_any(&mut c)
}

/// [`assert_io_ok`], with the server's log in the failure (the rare EIO under load of
/// issue 12 is not understood yet: the log is what tells).
fn assert_srv_io_ok(srv: &Srv, out: &std::process::Output) {
    if !io_ok(out) {
        eprintln!("emberd log:\n{}", srv.daemon.log_text());
    }
    assert_io_ok(out);
}

/// qemu-io succeeded: exit status 0, no failed command, no pattern mismatch.
fn io_ok(out: &std::process::Output) -> bool {
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("verification failed") && !text.contains("failed:")
}

fn assert_io_ok(out: &std::process::Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        io_ok(out),
        "qemu-io: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_io_refused(out: &std::process::Output, what: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("failed") || text.is_empty(),
        "{what}: qemu-io succeeded: {text}"
    );
    assert!(!text.contains("read 65536/65536"), "{what}: data was read");
}

// ------------------------------------------------------------------ raw client

fn opt<S: Write>(s: &mut S, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// One option reply: (type, data).
fn opt_reply<S: Read>(s: &mut S) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (ty, d)
}

fn greet(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// The server closes the connection (after at most a TLS alert's worth of bytes).
fn is_closed<S: Read>(s: &mut S) -> bool {
    let mut b = [0u8; 512];
    for _ in 0..16 {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
    false
}

// ------------------------------------------------------------------ PSK

#[test]
fn psk_qemu_io_nbdinfo_nbdcopy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let keys = psk_file(&dir.path().join("server"), "keys.psk", "alice");
    // qemu wants the key in DIR/keys.psk: the same file, copied.
    let qdir = dir.path().join("qemu");
    std::fs::create_dir_all(&qdir).unwrap();
    std::fs::copy(&keys, qdir.join("keys.psk")).unwrap();
    let srv = Srv::start(dir, 16 << 20, &["--tls-psk", keys.to_str().unwrap()]);
    let obj = format!(
        "tls-creds-psk,id=t0,endpoint=client,dir={},username=alice",
        qdir.display()
    );
    for tcp in [false, true] {
        let out = qemu_io_tls(
            &srv,
            &obj,
            tcp,
            &[
                "write -P 0x5a 0 4M",
                "write -P 0xa5 8M 1M",
                "read -P 0x5a 0 4M",
                "read -P 0xa5 8M 1M",
                "read -P 0 12M 1M",
            ],
        );
        assert_srv_io_ok(&srv, &out);
    }
    // TLS 1.2 with PSK (GnuTLS priority string, ECDHE-PSK or DHE-PSK), too.
    let obj12 = format!("{obj},priority=NORMAL:-VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK");
    assert_io_ok(&qemu_io_tls(&srv, &obj12, false, &["read -P 0x5a 0 1M"]));
    // nbdinfo: TLS negotiated, the size right.
    let uri = srv.psk_uri(&keys, "alice");
    let info = run_ok(libnbd("nbdinfo", "alice").arg(&uri));
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("with TLS"), "{text}");
    assert!(text.contains("16777216"), "{text}");
    // nbdcopy out and back: equal to the file.
    let copy = srv.path().join("copy.img");
    run_ok(libnbd("nbdcopy", "alice").arg(&uri).arg(&copy));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&srv.file).unwrap()
    );
    let src = srv.path().join("src.img");
    let pattern: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    run_ok(
        libnbd("nbdcopy", "alice")
            .args(["-C", "4"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(std::fs::read(&srv.file).unwrap() == pattern);
    srv.stop();
}

/// One TLS session carries a whole fio verify run (writes of mixed sizes, then reads
/// checked against their crc32c). fio 3.33's nbd engine cannot use a PSK at all: libnbd
/// refuses a URI's `tls-psk-file=` (and `tls-certificates=`) unless the program called
/// `nbd_set_uri_allow_local_file`, which fio 3.33 never does (`nm -D /usr/bin/fio`: its
/// only libnbd calls are create, connect_uri, get_size, the aio reads/writes/flush/trim
/// and errors), and libnbd has no other way (no environment variable) to name a PSK.
/// So fio runs with x509 from libnbd's default directory, `$HOME/.pki/libnbd` (server
/// verified against the CA). The server does not verify the client here: with `--tls-verify-peer` the
/// handshake from that directory failed, not yet understood; client certificates are
/// covered with `tls-certificates=DIR` in `x509_with_client_certificates`.
#[test]
fn fio_verify_over_one_tls_session() {
    require_tool("fio");
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let home = dir.path().join("home");
    let libnbd_dir = home.join(".pki").join("libnbd");
    std::fs::create_dir_all(&libnbd_dir).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(pki.client.join(f), libnbd_dir.join(f)).unwrap();
    }
    let srv = Srv::start(
        dir,
        32 << 20,
        &["--tls-creds", pki.server.to_str().unwrap()],
    );
    let out = run_ok(
        Command::new("fio")
            .current_dir(srv.path())
            .env("HOME", &home)
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri=nbds://localhost:{}/", srv.port),
                "--rw=randwrite",
                "--bssplit=4k/50:64k/30:1m/20",
                "--iodepth=16",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("verify: bad"), "{text}");
    // fio opens one connection to size the device, then one for the job; neither was
    // dropped.
    let log = srv.daemon.log_text();
    assert!(!log.contains("dropping NBD TLS client"), "{log}");
    srv.stop();
}

#[test]
fn psk_refusals_leave_the_server_serving() {
    let dir = tempfile::tempdir().unwrap();
    let keys = psk_file(&dir.path().join("server"), "keys.psk", "alice");
    // Same identity, another key; and a key for an identity the server does not know.
    let wrong = psk_file(&dir.path().join("wrong"), "keys.psk", "alice");
    let stranger = psk_file(&dir.path().join("stranger"), "keys.psk", "mallory");
    let srv = Srv::start(dir, 4 << 20, &["--tls-psk", keys.to_str().unwrap()]);

    // Plaintext against require: nbdinfo fails, and the raw protocol says TLS_REQD for
    // every option but STARTTLS and ABORT.
    let plain = run_any(
        libnbd("nbdinfo", "alice").arg(format!("nbd+unix:///?socket={}", srv.sock.display())),
    );
    assert!(!plain.status.success(), "plaintext nbdinfo succeeded");
    let mut s = greet(&srv.sock);
    for (option, data) in [
        (3u32, &[][..]),
        (7, &[0, 0, 0, 0, 0, 0][..]),
        (6, &[0, 0, 0, 0, 0, 0][..]),
    ] {
        opt(&mut s, option, data);
        let (ty, _) = opt_reply(&mut s);
        assert_eq!(ty, ERR_TLS_REQD, "option {option}");
    }
    // EXPORT_NAME has no error reply: the server closes.
    opt(&mut s, 1, b"");
    assert!(is_closed(&mut s));

    // Wrong key, unknown identity: the TLS handshake fails, nothing is read.
    for (psk, id) in [(&wrong, "alice"), (&stranger, "mallory")] {
        let out = run_any(libnbd("nbdinfo", id).arg(srv.psk_uri(psk, id)));
        assert!(
            !out.status.success(),
            "{id} with {}: nbdinfo succeeded",
            psk.display()
        );
        let qdir = psk.parent().unwrap();
        let obj = format!(
            "tls-creds-psk,id=t0,endpoint=client,dir={},username={id}",
            qdir.display()
        );
        assert_io_refused(&qemu_io_tls(&srv, &obj, true, &["read 0 64k"]), id);
    }

    // Garbage after STARTTLS, and a client that sends a TLS alert: that client only.
    let mut s = greet(&srv.sock);
    opt(&mut s, 5, b"");
    let (ty, _) = opt_reply(&mut s);
    assert_eq!(ty, 1, "STARTTLS not acknowledged");
    s.write_all(&[0x42u8; 4096]).unwrap();
    assert!(is_closed(&mut s));
    let mut s = greet(&srv.sock);
    opt(&mut s, 5, b"");
    let (ty, _) = opt_reply(&mut s);
    assert_eq!(ty, 1);
    // A fatal alert record (handshake_failure).
    s.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
        .unwrap();
    assert!(is_closed(&mut s));

    // The right key still works.
    let out = run_ok(libnbd("nbdinfo", "alice").arg(srv.psk_uri(&keys, "alice")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("with TLS"));
    srv.stop();
}

#[test]
fn tls_on_lets_clients_choose_and_off_refuses_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let keys = psk_file(&dir.path().join("server"), "keys.psk", "alice");
    let srv = Srv::start(
        dir,
        4 << 20,
        &["--tls-psk", keys.to_str().unwrap(), "--tls", "on"],
    );
    let plain = run_ok(
        libnbd("nbdinfo", "alice").arg(format!("nbd+unix:///?socket={}", srv.sock.display())),
    );
    assert!(String::from_utf8_lossy(&plain.stdout).contains("without TLS"));
    let tls = run_ok(libnbd("nbdinfo", "alice").arg(srv.psk_uri(&keys, "alice")));
    assert!(String::from_utf8_lossy(&tls.stdout).contains("with TLS"));
    srv.stop();

    let srv = Srv::start(tempfile::tempdir().unwrap(), 4 << 20, &[]);
    let mut s = greet(&srv.sock);
    opt(&mut s, 5, b"");
    assert_eq!(opt_reply(&mut s).0, ERR_POLICY);
    srv.stop();
}

#[test]
fn tls_without_credentials_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.img");
    sparse_file(&file, 1 << 20);
    let bad_psk = dir.path().join("bad.psk");
    std::fs::write(&bad_psk, "alice:nothex\n").unwrap();
    for (args, want) in [
        (vec!["--tls", "require"], "needs credentials"),
        (vec!["--tls-psk", bad_psk.to_str().unwrap()], "line 1"),
        (
            vec!["--tls-creds", "/nonexistent-ember-dir"],
            "server certificate",
        ),
    ] {
        let mut c = Command::new(emberd_bin());
        c.args([
            "export",
            "--file",
            file.to_str().unwrap(),
            "--nbd",
            "127.0.0.1:1",
        ]);
        c.args(&args);
        let out = run_any(&mut c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("nothex"),
            "the key file's content was shown: {err}"
        );
    }
}

// ------------------------------------------------------------------ x509

/// CA, server certificate (qemu's server layout) and a client directory with a trusted
/// client certificate, plus a client directory whose certificate another CA signed.
struct Pki {
    server: PathBuf,
    client: PathBuf,
    rogue: PathBuf,
    anon: PathBuf,
}

fn make_pki(root: &Path) -> Pki {
    let ca = root.join("ca");
    make_ca(&ca, "Ember test CA");
    let server = root.join("server");
    make_cert(&ca, &server, "server", true);
    std::fs::copy(ca.join("ca-cert.pem"), server.join("ca-cert.pem")).unwrap();
    let client = root.join("client");
    make_cert(&ca, &client, "client", false);
    std::fs::copy(ca.join("ca-cert.pem"), client.join("ca-cert.pem")).unwrap();
    // Another CA's client certificate (the client trusts the real CA for the server).
    let other = root.join("other-ca");
    make_ca(&other, "Rogue CA");
    let rogue = root.join("rogue");
    make_cert(&other, &rogue, "client", false);
    std::fs::copy(ca.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
    // No client certificate at all.
    let anon = root.join("anon");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    Pki {
        server,
        client,
        rogue,
        anon,
    }
}

fn x509_obj(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=t0,endpoint=client,dir={},verify-peer=on",
        dir.display()
    )
}

#[test]
fn x509_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let srv = Srv::start(
        dir,
        8 << 20,
        &[
            "--tls-creds",
            pki.server.to_str().unwrap(),
            "--tls-verify-peer",
        ],
    );
    let out = qemu_io_tls(
        &srv,
        &x509_obj(&pki.client),
        true,
        &["write -P 0x33 0 2M", "read -P 0x33 0 2M"],
    );
    assert_io_ok(&out);
    // libnbd with the same client directory.
    let uri = format!(
        "nbds://localhost:{}/?tls-certificates={}",
        srv.port,
        pki.client.display()
    );
    let copy = srv.path().join("copy.img");
    run_ok(libnbd("nbdcopy", "client").arg(&uri).arg(&copy));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&srv.file).unwrap()
    );
    // A certificate another CA signed, and none at all: refused, nothing read.
    assert_io_refused(
        &qemu_io_tls(&srv, &x509_obj(&pki.rogue), true, &["read 0 64k"]),
        "rogue client certificate",
    );
    assert_io_refused(
        &qemu_io_tls(&srv, &x509_obj(&pki.anon), true, &["read 0 64k"]),
        "no client certificate",
    );
    // Still serving.
    assert_io_ok(&qemu_io_tls(
        &srv,
        &x509_obj(&pki.client),
        true,
        &["read -P 0x33 0 2M"],
    ));
    srv.stop();
}

#[test]
fn x509_without_client_verification() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let srv = Srv::start(dir, 4 << 20, &["--tls-creds", pki.server.to_str().unwrap()]);
    // qemu checks the server against the CA; no client certificate needed.
    assert_io_ok(&qemu_io_tls(
        &srv,
        &x509_obj(&pki.anon),
        true,
        &["write -P 9 0 1M", "read -P 9 0 1M"],
    ));
    let mut s = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut s, 3, b"");
    assert_eq!(opt_reply(&mut s).0, ERR_TLS_REQD, "LIST before STARTTLS");
    srv.stop();
}

// ------------------------------------------------------------------ emberd serve

/// A running `emberd serve` (default `--nbd-tls require`) with an NBD Unix socket and TCP
/// port, and a project token.
struct Node {
    _dir: tempfile::TempDir,
    url: String,
    token: String,
    project: String,
    sock: PathBuf,
    tcp: String,
    daemon: Daemon,
}

fn http(
    method: &str,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = c.request(m, url).header("X-Auth-Token", token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

impl Node {
    fn start() -> Node {
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let rest = format!("127.0.0.1:{}", free_port());
        let tcp = format!("127.0.0.1:{}", free_port());
        let sock = dir.path().join("nbd.sock");
        let daemon = Daemon::spawn(
            dir.path(),
            &[
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--rest",
                &rest,
                "--nbd",
                &format!("unix:{}", sock.display()),
                "--nbd",
                &tcp,
                "--node-name",
                "tls",
            ],
        );
        wait_for_tcp(&rest, Duration::from_secs(120));
        let url = format!("http://{rest}");
        let admin = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        let (st, p) = http(
            "POST",
            &format!("{url}/v3/projects"),
            &admin,
            Some(json!({"project": {"name": "tls"}})),
        );
        assert_eq!(st, 201, "{p}");
        let project = p["project"]["id"].as_str().unwrap().to_string();
        let (st, t) = http(
            "POST",
            &format!("{url}/v3/projects/{project}/tokens"),
            &admin,
            Some(json!({"token": {"role": "member"}})),
        );
        assert_eq!(st, 201, "{t}");
        Node {
            _dir: dir,
            url,
            token: t["token"]["token"].as_str().unwrap().to_string(),
            project,
            sock,
            tcp,
            daemon,
        }
    }

    fn vols(&self) -> String {
        format!("{}/v3/{}/volumes", self.url, self.project)
    }

    /// Create a 1 GiB volume and wait for it.
    fn volume(&self) -> String {
        use serde_json::json;
        let (st, v) = http(
            "POST",
            &self.vols(),
            &self.token,
            Some(json!({"volume": {"size": 1}})),
        );
        assert_eq!(st, 202, "{v}");
        let id = v["volume"]["id"].as_str().unwrap().to_string();
        let t = std::time::Instant::now();
        loop {
            let (_, v) = http("GET", &format!("{}/{id}", self.vols()), &self.token, None);
            if v["volume"]["status"] == "available" {
                return id;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "{v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn action(&self, id: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        http(
            "POST",
            &format!("{}/{id}/action", self.vols()),
            &self.token,
            Some(body),
        )
    }

    /// Attach over NBD: the connection_info's data.
    fn attach(&self, id: &str) -> serde_json::Value {
        let (st, r) = self.action(
            id,
            serde_json::json!({"os-initialize_connection": {"connector": {"protocol": "nbd"}}}),
        );
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["connection_info"]["driver_volume_type"], "nbd");
        r["connection_info"]["data"].clone()
    }

    fn detach(&self, id: &str, attachment: &str) {
        let (st, r) = self.action(
            id,
            serde_json::json!({"os-terminate_connection": {"connector": {"attachment_id": attachment}}}),
        );
        assert_eq!(st, 202, "{r}");
    }
}

/// The PSK of an attachment's connection_info as a psktool file `dir/keys.psk`;
/// returns (identity, file).
fn attachment_psk(data: &serde_json::Value, dir: &Path) -> (String, PathBuf) {
    let id = data["tls"]["psk_identity"]
        .as_str()
        .expect("psk_identity")
        .to_string();
    let key = data["tls"]["psk"].as_str().expect("psk");
    assert_eq!(key.len(), 64, "a 32-byte key in hex");
    std::fs::create_dir_all(dir).unwrap();
    let f = dir.join("keys.psk");
    std::fs::write(&f, format!("{id}:{key}\n")).unwrap();
    (id, f)
}

#[test]
fn serve_gives_each_nbd_attachment_its_own_key() {
    let n = Node::start();
    let keys = tempfile::tempdir().unwrap();
    let (va, vb) = (n.volume(), n.volume());
    let a = n.attach(&va);
    let (ida, pska) = attachment_psk(&a, &keys.path().join("a"));
    // B through emberctl, which writes the key file itself and does not print the key.
    std::fs::create_dir_all(keys.path().join("b")).unwrap();
    let pskb = keys.path().join("b").join("keys.psk");
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_emberctl"))
            .args([
                "--url", &n.url, "--token", &n.token, "--json", "volume", "attach", &vb,
            ])
            .arg("--psk-file")
            .arg(&pskb),
    );
    let ci: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = ci["connection_info"]["data"].clone();
    assert!(b["tls"]["psk"].is_null(), "emberctl printed the key: {b}");
    let idb = b["tls"]["psk_identity"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(&pskb).unwrap();
    assert!(
        text.starts_with(&format!("{idb}:")) && text.trim_end().len() == idb.len() + 65,
        "{text}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pskb).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_ne!(ida, idb);
    let (ea, eb) = (
        a["export_name"].as_str().unwrap().to_string(),
        b["export_name"].as_str().unwrap().to_string(),
    );
    let uris: Vec<String> = a["uris"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    assert!(uris.iter().all(|u| u.starts_with("nbds")), "{uris:?}");
    let with_psk = |uri: &str, f: &Path| {
        format!(
            "{uri}{}tls-psk-file={}",
            if uri.contains('?') { "&" } else { "?" },
            f.display()
        )
    };

    // A's key opens A (both listeners): write and read back with qemu-io and nbdcopy.
    let obj = |dir: &Path, id: &str| {
        format!(
            "tls-creds-psk,id=t0,endpoint=client,dir={},username={id}",
            dir.display()
        )
    };
    require_tool("qemu-io");
    let out = run_any(
        Command::new("qemu-io")
            .args(["--object", &obj(pska.parent().unwrap(), &ida), "--image-opts"])
            .arg(format!(
                "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={ea},file.tls-creds=t0",
                n.sock.display()
            ))
            .args(["-c", "write -P 0x61 0 1M", "-c", "read -P 0x61 0 1M"]),
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "{out:?}"
    );
    let tcp_uri = uris.iter().find(|u| u.starts_with("nbds://")).unwrap();
    let copy = keys.path().join("copy.img");
    run_ok(
        libnbd("nbdcopy", &ida)
            .arg(with_psk(tcp_uri, &pska))
            .arg(&copy),
    );
    let bytes = std::fs::read(&copy).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&x| x == 0x61));

    // LIST with A's key names A only; with no TLS the listener says TLS is required.
    let list = run_ok(libnbd("nbdinfo", &ida).arg("--list").arg(format!(
        "nbds+unix:///?socket={}&tls-psk-file={}",
        n.sock.display(),
        pska.display()
    )));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&ea), "{text}");
    assert!(!text.contains(&eb), "B listed to A's client: {text}");
    // TCP requires TLS; the Unix socket offers it (a plaintext client there sees only
    // attachments that name its uid).
    let mut s = TcpStream::connect(&n.tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut s, 3, b"");
    assert_eq!(opt_reply(&mut s).0, ERR_TLS_REQD);
    let mut s = greet(&n.sock);
    opt(&mut s, 3, b"");
    assert_eq!(opt_reply(&mut s), (ACK, vec![]), "LIST named an export");
    let plain = run_any(
        libnbd("nbdinfo", "x").arg(format!("nbd+unix:///{eb}?socket={}", n.sock.display())),
    );
    assert!(!plain.status.success(), "plaintext client opened B");

    // A's key does not open B; B's key does.
    let cross = run_any(libnbd("nbdinfo", &ida).arg(format!(
        "nbds+unix:///{eb}?socket={}&tls-psk-file={}",
        n.sock.display(),
        pska.display()
    )));
    assert!(!cross.status.success(), "A's key opened B: {cross:?}");
    let own = run_ok(libnbd("nbdinfo", &idb).arg(format!(
        "nbds+unix:///{eb}?socket={}&tls-psk-file={}",
        n.sock.display(),
        pskb.display()
    )));
    assert!(String::from_utf8_lossy(&own.stdout).contains("with TLS"));

    // A live connection with A's key, then detach A: the connection is closed and the
    // key no longer works.
    require_tool("nbdsh");
    let script = format!(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri("nbds+unix:///{ea}?socket={sock}&tls-psk-file={psk}")
assert h.pread(512, 0) == b"a" * 512
print("ready", flush=True)
sys.stdin.readline()
try:
    h.pread(512, 0)
    print("still-open", flush=True)
except Exception as e:
    print("closed", flush=True)
"#,
        sock = n.sock.display(),
        psk = pska.display()
    );
    // nbdsh runs `python3 -m nbd` from Debian's python3-libnbd: /usr/bin's python3 first.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-c", &script])
        .env("LOGNAME", &ida)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    n.detach(&va, a["attachment_id"].as_str().unwrap());
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "closed",
        "the detached attachment's connection lives"
    );
    let _ = child.wait();
    let revoked = run_any(libnbd("nbdinfo", &ida).arg(with_psk(tcp_uri, &pska)));
    assert!(!revoked.status.success(), "revoked key still works");
    // B is untouched.
    run_ok(libnbd("nbdinfo", &idb).arg(format!(
        "nbds+unix:///{eb}?socket={}&tls-psk-file={}",
        n.sock.display(),
        pskb.display()
    )));
    let _ = &n.tcp;
    let mut n = n;
    n.daemon.terminate(START);
}

// ------------------------------------------------------------------ restarts, Unix peers

/// qemu-io over TCP with a PSK file (`dir/keys.psk`) for `identity`, on `export`.
fn qemu_io_psk(tcp: &str, dir: &Path, identity: &str, export: &str, cmds: &[&str]) -> Output {
    require_tool("qemu-io");
    let (host, port) = tcp.rsplit_once(':').unwrap();
    let mut c = Command::new("qemu-io");
    c.args([
        "--object",
        &format!(
            "tls-creds-psk,id=t0,endpoint=client,dir={},username={identity}",
            dir.display()
        ),
        "--image-opts",
        &format!(
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},\
             file.server.port={port},file.export={export},file.tls-creds=t0"
        ),
    ]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run_any(&mut c)
}

/// Every file under `dir` but the pools (the volumes' bytes), read whole.
fn files_under(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "pools") {
                files_under(&p, out);
            }
        } else if p.is_file() {
            if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
}

/// An NBD attachment's key is sealed at rest with its row: after a SIGKILL and a
/// restart the same client credentials read and write, and a detached attachment's key
/// does not come back.
#[test]
fn nbd_keys_survive_a_sigkill_restart_and_detach_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = format!("127.0.0.1:{}", free_port());
    let mut node =
        common::serve::ServeNode::start(dir.path(), &["--nbd-tls", "require", "--nbd", &tcp]);
    let (va, vb) = (node.volume("a", 1, None), node.volume("b", 1, None));
    let (a, b) = (node.attach(&va, "nbd"), node.attach(&vb, "nbd"));
    let keys = tempfile::tempdir().unwrap();
    let (ida, pska) = attachment_psk(&a, &keys.path().join("a"));
    let (idb, pskb) = attachment_psk(&b, &keys.path().join("b"));
    let (ea, eb) = (
        a["export_name"].as_str().unwrap().to_string(),
        b["export_name"].as_str().unwrap().to_string(),
    );
    let (da, db) = (pska.parent().unwrap(), pskb.parent().unwrap());
    assert_io_ok(&qemu_io_psk(
        &tcp,
        da,
        &ida,
        &ea,
        &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"],
    ));
    assert_io_ok(&qemu_io_psk(&tcp, db, &idb, &eb, &["write -P 0x3c 0 64k"]));
    node.detach(&vb, b["attachment_id"].as_str().unwrap());

    // The keys are in the database sealed: neither the raw key nor its hex is in any
    // file of the data dir (the database, its journal, the log).
    let mut files = Vec::new();
    files_under(&node.data, &mut files);
    assert!(
        files.iter().any(|(p, _)| p.ends_with("ember.db")),
        "no database"
    );
    let hexa = a["tls"]["psk"].as_str().unwrap();
    let rawa = hex::decode(hexa).unwrap();
    for (p, bytes) in &files {
        assert!(
            !bytes.windows(hexa.len()).any(|w| w == hexa.as_bytes())
                && !bytes.windows(rawa.len()).any(|w| w == rawa),
            "{} holds A's key in the clear",
            p.display()
        );
    }

    node.kill();
    node.start_again();
    wait_for_tcp(&tcp, common::serve::START);
    // A's credentials still work, on both listeners.
    assert_io_ok(&qemu_io_psk(
        &tcp,
        da,
        &ida,
        &ea,
        &[
            "read -P 0x5a 0 1M",
            "write -P 0xa5 1M 1M",
            "read -P 0xa5 1M 1M",
        ],
    ));
    let own = run_ok(libnbd("nbdinfo", &ida).arg(format!(
        "nbds+unix:///{ea}?socket={}&tls-psk-file={}",
        node.nbd_sock.display(),
        pska.display()
    )));
    assert!(String::from_utf8_lossy(&own.stdout).contains("with TLS"));
    // B was detached before the crash: its key opens nothing.
    assert_io_refused(
        &qemu_io_psk(&tcp, db, &idb, &eb, &["read 0 4k"]),
        "the detached attachment's key after a restart",
    );
    let gone = run_any(libnbd("nbdinfo", &idb).arg(format!(
        "nbds+unix:///{eb}?socket={}&tls-psk-file={}",
        node.nbd_sock.display(),
        pskb.display()
    )));
    assert!(!gone.status.success(), "B's key opened B after a restart");
    assert!(
        node.log().contains("attachment served again"),
        "{}",
        node.log()
    );
    node.detach(&va, a["attachment_id"].as_str().unwrap());
    assert_io_refused(
        &qemu_io_psk(&tcp, da, &ida, &ea, &["read 0 4k"]),
        "a detached attachment's key",
    );
    node.daemon.terminate(START);
}

/// An NBD attachment whose connector names a uid and gid: that Unix peer (a real client
/// run as that user with `setpriv`) reads and writes without TLS, also after a restart;
/// root and other uids get exactly the reply an unknown export gets.
#[test]
fn unix_peer_named_by_the_connector_and_nobody_else() {
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    require_tool("setpriv");
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::serve::ServeNode::start(dir.path(), &["--nbd-tls", "require"]);
    // The socket must be reachable by the peer (the operator's part: directory and
    // socket permissions).
    for p in [dir.path(), node.data.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let open_sock = |n: &common::serve::ServeNode| {
        std::fs::set_permissions(&n.nbd_sock, std::fs::Permissions::from_mode(0o666)).unwrap()
    };
    open_sock(&node);
    let v = node.volume("u", 1, None);
    let attach = |connector: serde_json::Value| {
        http(
            "POST",
            &node.vol_url(&format!("/{v}/action")),
            &node.token,
            Some(json!({"os-initialize_connection": {"connector": connector}})),
        )
    };
    let (st, r) = attach(json!({"protocol": "vhost-user", "uid": 65534}));
    assert_eq!(st, 400, "{r}");
    let (st, r) = attach(json!({"protocol": "nbd", "uid": 65534, "gid": 65534}));
    assert_eq!(st, 200, "{r}");
    let data = r["connection_info"]["data"].clone();
    let export = data["export_name"].as_str().unwrap().to_string();
    let uri = data["uris"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u.as_str())
        .find(|u| u.starts_with("nbd+unix://"))
        .unwrap_or_else(|| panic!("no plaintext Unix URI: {data}"))
        .to_string();
    // The same name with one character changed: an export that does not exist.
    let unknown = {
        let mut c: Vec<char> = export.chars().collect();
        c[0] = if c[0] == 'f' { 'e' } else { 'f' };
        c.into_iter().collect::<String>()
    };
    let as_user = |uid: u32, tool: &str| {
        require_tool(tool);
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            tool,
        ]);
        c
    };
    let peer_io = |cmds: &[&str]| {
        let mut c = as_user(65534, "qemu-io");
        c.args(["-f", "raw", &uri]);
        for x in cmds {
            c.args(["-c", x]);
        }
        run_any(&mut c)
    };
    assert_io_ok(&peer_io(&["write -P 0x77 0 64k", "read -P 0x77 0 64k"]));
    run_ok(as_user(65534, "nbdinfo").arg(&uri));

    // Root and another uid: refused, with what an unknown export gets.
    let refusal = |who: Option<u32>, name: &str| {
        let u = uri.replace(&export, name);
        let out = match who {
            Some(uid) => run_any(as_user(uid, "nbdinfo").arg(&u)),
            None => run_any(Command::new("nbdinfo").arg(&u)),
        };
        assert!(!out.status.success(), "{who:?} opened {name}");
        String::from_utf8_lossy(&out.stderr).replace(name, "NAME")
    };
    for who in [None, Some(65533)] {
        let hidden = refusal(who, &export);
        assert_eq!(hidden, refusal(who, &unknown), "{who:?}");
    }
    // Byte for byte on the wire (root, plaintext on the Unix socket): INFO, GO and LIST.
    let transcript = |name: &str| {
        let mut s = greet(&node.nbd_sock);
        let mut out = Vec::new();
        for o in [3u32, 6, 7] {
            let d = if o == 3 {
                vec![]
            } else {
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                d.extend_from_slice(&0u16.to_be_bytes());
                d
            };
            opt(&mut s, o, &d);
            let (t, d) = opt_reply(&mut s);
            out.push((t, String::from_utf8_lossy(&d).replace(name, "NAME")));
        }
        out
    };
    let hidden = transcript(&export);
    assert_eq!(hidden, transcript(&unknown));
    assert_eq!(hidden[0], (ACK, String::new()), "LIST named the export");
    assert_eq!(hidden[1].0, ERR_UNKNOWN);
    assert!(
        node.log()
            .contains("refused a client an export it may not use"),
        "{}",
        node.log()
    );

    // The peer is kept with the attachment across a restart.
    node.kill();
    node.start_again();
    open_sock(&node);
    assert_io_ok(&peer_io(&["read -P 0x77 0 64k"]));
    node.daemon.terminate(START);
}
