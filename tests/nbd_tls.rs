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
use std::process::Command;
use std::time::Duration;

const START: Duration = Duration::from_secs(30);

/// Reply type of `NBD_REP_ERR_TLS_REQD`.
const ERR_TLS_REQD: u32 = 0x8000_0005;
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

fn assert_io_ok(out: &std::process::Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verification failed") && !text.contains("failed:"),
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
        assert_io_ok(&out);
    }
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
