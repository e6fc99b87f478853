//! End-to-end tests of the NBD server: a real `emberd export` and real clients (qemu-io,
//! qemu-img, nbdinfo, nbdcopy, nbdsh, fio), plus a raw socket for what no polite client
//! sends (garbage, oversized and unknown requests, a client vanishing mid-request).

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const START: Duration = Duration::from_secs(30);

/// A running `emberd export` of a sparse file in a temp dir, on a Unix socket.
struct Srv {
    dir: tempfile::TempDir,
    file: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
}

impl Srv {
    fn start(size: u64, extra: &[&str]) -> Srv {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        sparse_file(&file, size);
        let sock = dir.path().join("nbd.sock");
        let nbd = format!("unix:{}", sock.display());
        let mut args = vec!["export", "--file", file.to_str().unwrap(), "--nbd", &nbd];
        args.extend_from_slice(extra);
        let daemon = Daemon::spawn(dir.path(), &args);
        wait_for_path(&sock, START);
        Srv {
            dir,
            file,
            sock,
            daemon,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn uri_named(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// Stop with SIGTERM and check the exit status and the socket removal.
    fn stop(mut self) {
        self.daemon.terminate(START);
        assert!(
            !self.sock.exists(),
            "socket {} left behind",
            self.sock.display()
        );
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    require_tool("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// `qemu-img compare` of two raw images (files or NBD URIs): panics if they differ.
fn qemu_img_compare(a: &str, b: &str) {
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
}

/// `qemu-img convert` from raw to raw; `into_existing` (`-n`) writes into an existing target.
fn qemu_img_convert(into_existing: bool, src: &str, dst: &str) {
    let mut c = Command::new("qemu-img");
    c.arg("convert");
    if into_existing {
        c.arg("-n");
    }
    run_ok(c.args(["-f", "raw", "-O", "raw", src, dst]));
}

fn nbdsh(uri: &str, script: &str) -> String {
    require_tool("nbdsh");
    // nbdsh runs `python3 -m nbd`; the module comes with Debian's python3-libnbd, so make
    // sure /usr/bin's python3 wins over any other python3 on PATH (pyenv, venvs).
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = run_ok(
        Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", uri, "-c", script]),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn qemu_io_patterns_and_qemu_img_compare_convert() {
    require_tool("qemu-img");
    let srv = Srv::start(16 << 20, &[]);
    let uri = srv.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4096 8k",
            "write -P 0x11 15M 1M",
            "write -P 0x5a 3M 512",
            "read -P 0xab 0 4096",
            "read -P 0xcd 4096 8k",
            "read -P 0xab 12288 1036288",
            "read -P 0x11 15M 1M",
            "read -P 0x5a 3M 512",
            "read -P 0 1M 1M",
        ],
    );
    // Reads through NBD equal the file itself.
    qemu_img_compare(srv.file.to_str().unwrap(), &uri);
    // convert out of the export, then a different image into it, and compare.
    let out = srv.dir.path().join("out.img");
    qemu_img_convert(false, &uri, out.to_str().unwrap());
    qemu_img_compare(out.to_str().unwrap(), &uri);
    let src = srv.dir.path().join("src.img");
    let mut data = vec![0u8; 16 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 4096 % 251) as u8;
    }
    data[8 << 20..10 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    qemu_img_convert(true, src.to_str().unwrap(), &uri);
    qemu_img_compare(src.to_str().unwrap(), &uri);
    assert_eq!(std::fs::read(&srv.file).unwrap(), data);
    srv.stop();
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    require_tool("nbdinfo");
    let srv = Srv::start(64 << 20, &[]);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri()]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    let e = &j["exports"][0];
    assert_eq!(e["export-size"], 64 << 20);
    for flag in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert!(e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));
    srv.stop();
}

#[test]
fn nbdinfo_map_shows_a_hole_after_discard() {
    require_tool("nbdinfo");
    let srv = Srv::start(8 << 20, &[]);
    let uri = srv.uri();
    qemu_io(
        &uri,
        &["write -P 0x77 0 8M", "discard 2M 1M", "read -P 0 2M 1M"],
    );
    let out = run_ok(Command::new("nbdinfo").args(["--map", &uri]));
    let map = String::from_utf8_lossy(&out.stdout);
    // Lines: offset length type description.
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let hole = rows
        .iter()
        .find(|r| r.first() == Some(&"2097152"))
        .unwrap_or_else(|| panic!("no extent at 2M in:\n{map}"));
    assert_eq!(hole[1], "1048576", "{map}");
    assert!(hole[3].contains("hole"), "{map}");
    assert!(rows.iter().any(|r| r[0] == "0" && r[3] == "data"), "{map}");
    srv.stop();
}

#[test]
fn nbdcopy_four_connections_round_trip() {
    require_tool("nbdcopy");
    let srv = Srv::start(32 << 20, &[]);
    let src = srv.dir.path().join("src.img");
    let back = srv.dir.path().join("back.img");
    let mut data = vec![0u8; 32 << 20];
    let mut x: u32 = 12345;
    for chunk in data.chunks_mut(4) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data[4 << 20..6 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    sparse_file(&back, 0);
    run_ok(Command::new("nbdcopy").args(["--connections=4", src.to_str().unwrap(), &srv.uri()]));
    run_ok(Command::new("nbdcopy").args(["--connections=4", &srv.uri(), back.to_str().unwrap()]));
    assert!(std::fs::read(&back).unwrap() == data, "round trip differs");
    srv.stop();
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    require_tool("fio");
    let srv = Srv::start(32 << 20, &[]);
    // fio writes its verify state file into its working directory: keep it in the temp dir.
    let out = run_ok(Command::new("fio").current_dir(srv.dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--bssplit=4k/50:64k/30:1m/20",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("verify: bad"), "{text}");
    srv.stop();
}

#[test]
fn nbdsh_bad_requests_get_errors_and_the_connection_lives() {
    let srv = Srv::start(4 << 20, &[]);
    let script = r#"
import errno
h.set_strict_mode(0)
size = h.get_size()
def expect(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want, "%s: got %s want %s" % (what, e.errnum, want)
        return
    raise AssertionError(what + ": no error")
expect(lambda: h.pread(512, size), errno.EINVAL, "read past the end")
expect(lambda: h.pread(4096, size - 512), errno.EINVAL, "read across the end")
expect(lambda: h.pwrite(b"x" * 512, size), errno.EINVAL, "write past the end")
expect(lambda: h.pread(512, 1), errno.EINVAL, "misaligned offset")
expect(lambda: h.pread(100, 0), errno.EINVAL, "misaligned length")
expect(lambda: h.pwrite(b"y" * 100, 512), errno.EINVAL, "misaligned write")
expect(lambda: h.trim(512, size), errno.EINVAL, "trim past the end")
expect(lambda: h.zero(512, 2**62), errno.EINVAL, "zero far past the end")
expect(lambda: h.pread(64 << 20, 0), errno.EOVERFLOW, "read over the maximum")
expect(lambda: h.pwrite(b"z" * ((32 << 20) + 4096), 0), errno.EOVERFLOW, "write over the maximum")
# The connection still works and nothing was written by the refused requests.
h.pwrite(b"\xab" * 4096, 8192)
assert h.pread(4096, 8192) == b"\xab" * 4096
assert h.pread(4096, 0) == bytes(4096)
h.flush()
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 8192) == bytes(4096)
h.trim(1 << 20, 0)
h.cache(4096, 0)
h.pwrite(b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0, nbd.CMD_FLAG_DF) == b"\x01" * 4096
print("ok")
"#;
    let out = nbdsh(&srv.uri(), script);
    assert!(out.contains("ok"), "{out}");
    srv.stop();
}

// ------------------------------------------------------------------ raw client

fn opt(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Read option replies until ACK; panics on an error reply.
fn until_ack(s: &mut UnixStream) {
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        assert!(ty < 0x8000_0000, "option error reply {ty:#x}");
        if ty == 1 {
            return;
        }
    }
}

/// Connect and `NBD_OPT_GO` to the default export, simple replies.
fn raw_connect(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut s, 7, &[0, 0, 0, 0, 0, 0]);
    until_ack(&mut s);
    s
}

fn raw_request(s: &mut UnixStream, cmd: u16, handle: u64, offset: u64, len: u32) {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    s.write_all(&b).unwrap();
}

/// Read a simple reply: (error, handle).
fn raw_reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

fn is_closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn raw_socket_garbage_unknown_and_vanishing_clients() {
    let srv = Srv::start(4 << 20, &[]);
    let mut good = raw_connect(&srv.sock);

    // An unknown command gets EINVAL; the connection lives on.
    raw_request(&mut good, 42, 1, 0, 0);
    assert_eq!(raw_reply(&mut good), (22, 1));
    // An oversized write: its payload is skipped, then EOVERFLOW.
    let big = (32u32 << 20) + 512;
    raw_request(&mut good, 1, 2, 0, big);
    good.write_all(&vec![0xee; big as usize]).unwrap();
    assert_eq!(raw_reply(&mut good), (75, 2));
    // A write to a misaligned offset: payload skipped, EINVAL.
    raw_request(&mut good, 1, 3, 7, 512);
    good.write_all(&[0xee; 512]).unwrap();
    assert_eq!(raw_reply(&mut good), (22, 3));
    // A normal write and read.
    raw_request(&mut good, 1, 4, 4096, 512);
    good.write_all(&[0x42; 512]).unwrap();
    assert_eq!(raw_reply(&mut good), (0, 4));
    raw_request(&mut good, 0, 5, 4096, 512);
    assert_eq!(raw_reply(&mut good), (0, 5));
    let mut data = [0u8; 512];
    good.read_exact(&mut data).unwrap();
    assert_eq!(data, [0x42; 512]);

    // Garbage after the handshake: that connection is dropped.
    let mut bad = raw_connect(&srv.sock);
    bad.write_all(b"this is not an NBD request at all, not even close")
        .unwrap();
    assert!(is_closed(&mut bad), "garbage connection was not dropped");
    // Garbage during the handshake.
    let mut bad = UnixStream::connect(&srv.sock).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    bad.read_exact(&mut g).unwrap();
    bad.write_all(&[0xff; 64]).unwrap();
    assert!(is_closed(&mut bad));
    // A client vanishing in the middle of a write payload, and one mid-header.
    let mut gone = raw_connect(&srv.sock);
    raw_request(&mut gone, 1, 9, 0, 1 << 20);
    gone.write_all(&[0x99; 1000]).unwrap();
    drop(gone);
    let mut gone = raw_connect(&srv.sock);
    gone.write_all(&[0x25, 0x60]).unwrap();
    drop(gone);

    // The first connection never noticed.
    raw_request(&mut good, 0, 6, 0, 1024);
    assert_eq!(raw_reply(&mut good), (0, 6));
    let mut data = [0u8; 1024];
    good.read_exact(&mut data).unwrap();
    assert!(
        data.iter().all(|&b| b == 0),
        "vanished write reached the disk"
    );
    raw_request(&mut good, 2, 7, 0, 0); // NBD_CMD_DISC
    assert!(is_closed(&mut good));
    // And new clients are served.
    qemu_io(&srv.uri(), &["read -P 0x42 4096 512"]);
    srv.stop();
}

#[test]
fn eight_concurrent_qemu_io_clients() {
    let srv = Srv::start(16 << 20, &["--threads", "2"]);
    let uri = srv.uri();
    let writers: Vec<_> = (0..8u32)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = u64::from(i) << 21;
                let p = 0x10 + i;
                let mut cmds = Vec::new();
                for k in 0..8u64 {
                    cmds.push(format!("write -P {p:#x} {} 256k", off + k * (256 << 10)));
                }
                cmds.push(format!("read -P {p:#x} {off} 2M"));
                let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
                qemu_io(&uri, &refs);
            })
        })
        .collect();
    for w in writers {
        w.join().expect("qemu-io client");
    }
    let reads: Vec<String> = (0..8u32)
        .map(|i| format!("read -P {:#x} {} 2M", 0x10 + i, u64::from(i) << 21))
        .collect();
    let refs: Vec<&str> = reads.iter().map(|s| s.as_str()).collect();
    qemu_io(&uri, &refs);
    srv.stop();
}

#[test]
fn read_only_export_refuses_writes() {
    let srv = Srv::start(4 << 20, &["--read-only"]);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &srv.uri()]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["exports"][0]["is_read_only"], true);
    let script = r#"
import errno
assert h.is_read_only()
h.set_strict_mode(0)
for what, fn in [("write", lambda: h.pwrite(b"x" * 4096, 0)),
                 ("trim", lambda: h.trim(4096, 0)),
                 ("zero", lambda: h.zero(4096, 0))]:
    try:
        fn()
        raise AssertionError(what + " succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (what, e.errnum)
assert h.pread(4096, 0) == bytes(4096)
print("ok")
"#;
    assert!(nbdsh(&srv.uri(), script).contains("ok"));
    assert!(std::fs::read(&srv.file).unwrap().iter().all(|&b| b == 0));
    srv.stop();
}

#[test]
fn tcp_and_unix_listeners_and_named_export() {
    let port = free_port();
    let tcp = format!("127.0.0.1:{port}");
    let srv = Srv::start(4 << 20, &["--nbd", &tcp, "--name", "vol1"]);
    wait_for_tcp(&tcp, START);
    qemu_io(
        &format!("nbd://{tcp}/vol1"),
        &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"],
    );
    qemu_io(&srv.uri_named("vol1"), &["read -P 0x3c 0 64k"]);
    // The empty name is not exported here.
    let out = run_any(Command::new("nbdinfo").arg(srv.uri()));
    assert!(!out.status.success(), "unknown export accepted");
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &srv.uri()]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["exports"][0]["export-name"], "vol1");
    srv.stop();
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket() {
    let srv = Srv::start(1 << 20, &[]);
    // With a client connected and idle.
    let _c = raw_connect(&srv.sock);
    srv.stop();
}

#[test]
fn bad_flags_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.img");
    sparse_file(&file, 1 << 20);
    for args in [
        vec!["--nbd", "nonsense"],
        vec!["--nbd", "unix:"],
        vec!["--nbd", "localhost:notaport"],
        vec![
            "--vhost-user",
            "/tmp/x.sock",
            "--num-queues",
            "0",
            "--nbd",
            "unix:/tmp/y.sock",
        ],
        vec![],
        vec!["--nbd", "unix:/tmp/y.sock", "--nbd-conn-memory-mib", "8"],
        vec!["--nbd", "unix:/tmp/y.sock", "--nbd-memory-mib", "100"],
        vec![
            "--nbd",
            "unix:/tmp/y.sock",
            "--nbd-handshake-timeout-secs",
            "0",
        ],
        vec!["--nbd", "unix:/tmp/y.sock", "--nbd-max-conns", "0"],
    ] {
        let mut c = Command::new(emberd_bin());
        c.args(["export", "--file", file.to_str().unwrap()])
            .args(&args);
        let out = run_any(&mut c);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!out.stderr.is_empty(), "{args:?}: no error message");
    }
}
