//! End-to-end tests of LUN backends: Ember's iSCSI initiator against a real `tgtd`
//! (Debian `tgt`) on loopback, served over NBD by a real `emberd export` to real clients
//! (fio, qemu-img, qemu-io, nbdsh, nbdinfo), cross-checked with libiscsi's tools; and
//! host block devices (loop devices) through the same export.
//!
//! Every test starts its own `tgtd` on its own iSCSI port and management socket
//! (`tgtd -C N`), configures it with `tgtadm`, and stops it (SIGKILL as a fallback) when
//! it is dropped.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(60);
const IQN: &str = "iqn.2026-01.org.ember.test:lun";

/// A `tgtd` of this test: its own portal port and management socket.
struct Tgtd {
    child: Option<Child>,
    /// Loopback address of its portal (127.0.0.1, or 127.0.0.2 for a second path).
    host: &'static str,
    /// A second portal of the same tgtd (same port) on this address.
    second: Option<&'static str>,
    port: u16,
    ctl: u16,
    log: PathBuf,
}

impl Tgtd {
    fn start(dir: &Path) -> Tgtd {
        Tgtd::start_on(dir, "127.0.0.1")
    }

    fn start_on(dir: &Path, host: &'static str) -> Tgtd {
        let mut t = Tgtd::unstarted(dir, host);
        t.spawn();
        t
    }

    /// A tgtd with its port chosen, not running yet (`spawn` starts it).
    fn unstarted(dir: &Path, host: &'static str) -> Tgtd {
        require_tool("tgtd");
        require_tool("tgtadm");
        let port = free_port();
        Tgtd {
            child: None,
            host,
            second: None,
            port,
            // The management socket is /var/run/tgtd/socket.N (N a short int): derived
            // from the port, which is unique among the tgtd of concurrent tests.
            ctl: port % 30000 + 1000,
            log: dir.join(format!("tgtd-{port}.log")),
        }
    }

    /// One tgtd with two portals: 127.0.0.1 and 127.0.0.2, same port.
    fn start_two_portals(dir: &Path) -> Tgtd {
        require_tool("tgtd");
        require_tool("tgtadm");
        let port = free_port();
        let mut t = Tgtd {
            child: None,
            host: "127.0.0.1",
            second: Some("127.0.0.2"),
            port,
            ctl: port % 30000 + 1000,
            log: dir.join(format!("tgtd-{port}.log")),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all("/var/run/tgtd").expect("create /var/run/tgtd");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("tgtd log");
        let mut portals = format!("portal={}:{}", self.host, self.port);
        if let Some(h) = self.second {
            portals.push_str(&format!(",portal={h}:{}", self.port));
        }
        let child = Command::new("tgtd")
            .args(["-f", "-C", &self.ctl.to_string(), "--iscsi", &portals])
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn tgtd");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            let ok = Command::new("tgtadm")
                .args([
                    "-C",
                    &self.ctl.to_string(),
                    "--op",
                    "show",
                    "--mode",
                    "system",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                t.elapsed() < START,
                "tgtd did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_for_tcp(&format!("{}:{}", self.host, self.port), START);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn adm(&self, args: &[&str]) {
        let ctl = self.ctl.to_string();
        let mut c = Command::new("tgtadm");
        c.args(["-C", &ctl, "--lld", "iscsi"]).args(args);
        run_ok(&mut c);
    }

    /// Target 1 with `iqn`, LUN `lun` on `backing`, open to every initiator.
    fn target(&self, backing: &Path, lun: u16, thin: bool) {
        self.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN]);
        self.add_lun(backing, lun, thin);
        self.adm(&[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
    }

    fn add_lun(&self, backing: &Path, lun: u16, thin: bool) {
        let l = lun.to_string();
        self.adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            &l,
            "-b",
            backing.to_str().expect("utf-8 path"),
        ]);
        if thin {
            self.adm(&[
                "--op",
                "update",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                &l,
                "--params",
                "thin_provisioning=1",
            ]);
        }
    }

    fn uri(&self, lun: u16, query: &str) -> String {
        format!("iscsi://{}/{IQN}/{lun}{query}", self.portal())
    }

    fn portal(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        if self.child.is_some() {
            // tgtd only accepts `delete --mode system` once it has no targets.
            let _ = Command::new("tgtadm")
                .args([
                    "-C",
                    &self.ctl.to_string(),
                    "--lld",
                    "iscsi",
                    "--op",
                    "delete",
                ])
                .args(["--mode", "target", "--tid", "1", "--force"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("tgtadm")
                .args([
                    "-C",
                    &self.ctl.to_string(),
                    "--op",
                    "delete",
                    "--mode",
                    "system",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if let Some(c) = self.child.as_mut() {
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(5) {
                    if let Ok(Some(_)) = c.try_wait() {
                        self.child = None;
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        self.kill();
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An `emberd export --iscsi` (or `--file`) on a Unix socket.
struct Export {
    sock: PathBuf,
    daemon: Daemon,
}

impl Export {
    fn start(dir: &Path, source: &[&str]) -> Export {
        let sock = dir.join(format!("nbd-{}.sock", free_port()));
        let nbd = format!("unix:{}", sock.display());
        let mut args = vec!["export", "--nbd", &nbd, "--threads", "2"];
        args.extend_from_slice(source);
        let mut daemon = Daemon::spawn(dir, &args);
        let t = Instant::now();
        while !sock.exists() {
            if let Some(st) = daemon.wait_exit(Duration::from_millis(20)) {
                panic!("emberd exited with {st}:\n{}", daemon.log_text());
            }
            assert!(t.elapsed() < START, "no socket: {}", daemon.log_text());
        }
        Export { sock, daemon }
    }

    /// Start, expecting emberd to fail: returns its log.
    fn fails(dir: &Path, source: &[&str]) -> String {
        let sock = dir.join(format!("nbd-{}.sock", free_port()));
        let nbd = format!("unix:{}", sock.display());
        let mut args = vec!["export", "--nbd", &nbd];
        args.extend_from_slice(source);
        let mut daemon = Daemon::spawn(dir, &args);
        let st = daemon
            .wait_exit(START)
            .expect("emberd should give up within its login timeout");
        assert!(!st.success(), "emberd should fail: {}", daemon.log_text());
        assert!(!sock.exists());
        daemon.log_text()
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn stop(mut self) {
        self.daemon.terminate(START);
    }
}

fn fio_verify(dir: &Path, uri: &str, size: &str, extra: &[&str]) -> String {
    require_tool("fio");
    let mut c = Command::new("fio");
    c.current_dir(dir).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--bssplit=4k/50:64k/30:1m/20",
        "--iodepth=16",
        &format!("--size={size}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    c.args(extra);
    let out = run_ok(&mut c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains("verify: bad"), "{text}");
    assert!(text.contains("err= 0"), "fio reported errors: {text}");
    text
}

/// Random bytes from the kernel.
fn random_file(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut data = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut data))
        .expect("urandom");
    std::fs::write(path, &data).expect("write");
    data
}

/// Bytes of a file that are allocated.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn qemu_img(args: &[&str]) -> String {
    require_tool("qemu-img");
    let out = run_ok(Command::new("qemu-img").args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The byte-for-byte test: write random data through Ember's NBD export of the LUN,
/// then compare the NBD export and tgtd's backing file (both must equal the source),
/// and verify a random workload with fio.
fn data_round_trip(digests: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 64 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    if digests {
        // tgtd only picks CRC32C from an initiator's list when its own setting has it.
        for k in ["HeaderDigest", "DataDigest"] {
            tgt.adm(&[
                "--op",
                "update",
                "--mode",
                "target",
                "--tid",
                "1",
                "--name",
                k,
                "--value",
                "CRC32C,None",
            ]);
        }
    }
    let q = if digests {
        "?header_digest=crc32c&data_digest=crc32c"
    } else {
        ""
    };
    let uri = tgt.uri(1, q);
    let exp = Export::start(dir.path(), &["--iscsi", &uri]);
    let log = exp.daemon.log_text();
    assert!(log.contains("iSCSI LUN opened"), "{log}");
    assert!(
        log.contains(&format!("header_digest={digests}"))
            && log.contains(&format!("data_digest={digests}")),
        "digests not as asked: {log}"
    );
    // libiscsi sees the same LUN that Ember reports.
    require_tool("iscsi-readcapacity16");
    let rc = run_ok(Command::new("iscsi-readcapacity16").arg(tgt.uri(1, "")));
    let rc = String::from_utf8_lossy(&rc.stdout);
    assert!(rc.contains("Total size:67108864"), "{rc}");
    require_tool("iscsi-inq");
    let inq = run_ok(Command::new("iscsi-inq").args(["-e", "1", "-c", "128", &tgt.uri(1, "")]));
    let inq = String::from_utf8_lossy(&inq.stdout).into_owned();
    let serial = inq
        .lines()
        .find_map(|l| l.strip_prefix("Unit Serial Number:"))
        .map(|s| {
            s.trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace())
                .to_string()
        })
        .unwrap_or_else(|| panic!("no serial in {inq}"));
    assert!(
        log.contains(&format!("serial {serial:?}")),
        "Ember's identity differs from iscsi-inq's serial {serial}: {log}"
    );
    require_tool("nbdinfo");
    let size = run_ok(Command::new("nbdinfo").args(["--size", &exp.uri()]));
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "67108864");

    let src = dir.path().join("src.img");
    let data = random_file(&src, 64 << 20);
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &exp.uri(),
    ]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &exp.uri(),
    ]);
    fio_verify(dir.path(), &exp.uri(), "32M", &[]);
    exp.stop();
    // After emberd has flushed and stopped, tgtd's file holds exactly what was written.
    let back = std::fs::read(&backing).expect("read backing");
    let fio_area = 32 << 20;
    assert!(
        back[fio_area..] == data[fio_area..],
        "backing file differs from what was written"
    );
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        backing.to_str().unwrap(),
        &tgt.uri(1, ""),
    ]);
}

#[test]
fn lun_over_nbd_matches_the_backing_file() {
    data_round_trip(false);
}

#[test]
fn lun_over_nbd_with_header_and_data_digests() {
    data_round_trip(true);
}

#[test]
fn unmap_and_write_same_reach_the_backing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 32 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, true);
    let exp = Export::start(dir.path(), &["--iscsi", &tgt.uri(1, "")]);
    require_tool("qemu-io");
    let q = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        c.arg(exp.uri());
        let out = run_ok(&mut c);
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!t.contains("failed"), "{cmds:?}: {t}");
        t
    };
    q(&["write -P 0xab 0 32M", "flush"]);
    let full = allocated(&backing);
    assert!(full >= 32 << 20, "{full}");
    // Discard → UNMAP; write-zeroes with unmap → WRITE SAME(16) with the UNMAP bit;
    // write-zeroes without → WRITE SAME(16) of zeros.
    q(&[
        "discard 4M 4M",
        "write -z -u 12M 4M",
        "write -z 20M 2M",
        "flush",
    ]);
    let after = allocated(&backing);
    assert!(
        after <= full - (8 << 20),
        "UNMAP/WRITE SAME left the backing file allocated: {full} -> {after}"
    );
    q(&[
        "read -P 0xab 0 4M",
        "read -P 0 4M 4M",
        "read -P 0xab 8M 4M",
        "read -P 0 12M 4M",
        "read -P 0xab 16M 4M",
        "read -P 0 20M 2M",
        "read -P 0xab 22M 10M",
    ]);
    exp.stop();
}

#[test]
fn chap_one_way_mutual_and_wrong_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 8 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    tgt.adm(&[
        "--op",
        "new",
        "--mode",
        "account",
        "--user",
        "ember",
        "--password",
        "ember-secret-1",
    ]);
    tgt.adm(&[
        "--op", "bind", "--mode", "account", "--tid", "1", "--user", "ember",
    ]);
    let chap = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write chap file");
        p
    };
    let uri = tgt.uri(1, "?login_timeout=5");

    // No credentials: the target requires CHAP.
    let log = Export::fails(dir.path(), &["--iscsi", &uri]);
    assert!(log.contains("requires authentication (CHAP)"), "{log}");
    // Wrong secret: a clear authentication failure.
    let bad = chap("bad.chap", "user = ember\nsecret = wrong-secret-99\n");
    let log = Export::fails(
        dir.path(),
        &["--iscsi", &uri, "--chap-file", bad.to_str().unwrap()],
    );
    assert!(log.contains("authentication failed"), "{log}");
    assert!(
        !log.contains("wrong-secret-99"),
        "a secret reached the log: {log}"
    );
    // A secret in the URI is refused before anything is sent.
    let log = Export::fails(
        dir.path(),
        &[
            "--iscsi",
            &format!(
                "iscsi://ember%ember-secret-1@127.0.0.1:{}/{IQN}/1",
                tgt.port
            ),
        ],
    );
    assert!(log.contains("must not be in the URI"), "{log}");

    // One-way CHAP (MD5: what tgtd 1.0.85 implements as specified).
    let good = chap("good.chap", "user = ember\nsecret = ember-secret-1\n");
    let exp = Export::start(
        dir.path(),
        &["--iscsi", &uri, "--chap-file", good.to_str().unwrap()],
    );
    let log = exp.daemon.log_text();
    assert!(log.contains("chap=Some(Md5)"), "{log}");
    fio_verify(dir.path(), &exp.uri(), "8M", &[]);
    exp.stop();

    // Mutual CHAP: the target proves itself with its outgoing account.
    tgt.adm(&[
        "--op",
        "new",
        "--mode",
        "account",
        "--user",
        "array",
        "--password",
        "array-secret-2",
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
    let mutual = chap(
        "mutual.chap",
        "user = ember\nsecret = ember-secret-1\ntarget_user = array\ntarget_secret = array-secret-2\n",
    );
    let exp = Export::start(
        dir.path(),
        &["--iscsi", &uri, "--chap-file", mutual.to_str().unwrap()],
    );
    fio_verify(dir.path(), &exp.uri(), "4M", &[]);
    exp.stop();
    // The target answering with another secret fails mutual authentication.
    let impostor = chap(
        "impostor.chap",
        "user = ember\nsecret = ember-secret-1\ntarget_user = array\ntarget_secret = not-the-array\n",
    );
    let log = Export::fails(
        dir.path(),
        &["--iscsi", &uri, "--chap-file", impostor.to_str().unwrap()],
    );
    assert!(log.contains("failed mutual authentication"), "{log}");
}

#[test]
fn missing_lun_unknown_target_and_no_portal_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 8 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    let log = Export::fails(dir.path(), &["--iscsi", &tgt.uri(5, "?login_timeout=5")]);
    assert!(log.contains("LUN 5 does not exist"), "{log}");
    let log = Export::fails(
        dir.path(),
        &[
            "--iscsi",
            &format!(
                "iscsi://127.0.0.1:{}/iqn.2026-01.no:such/1?login_timeout=5",
                tgt.port
            ),
        ],
    );
    assert!(log.contains("target not found"), "{log}");
    let closed = free_port();
    let log = Export::fails(
        dir.path(),
        &[
            "--iscsi",
            &format!("iscsi://127.0.0.1:{closed}/{IQN}/1?login_timeout=5"),
        ],
    );
    assert!(log.contains("Connection refused"), "{log}");
}

#[test]
fn a_grown_lun_is_seen_after_the_unit_attention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 16 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    let exp = Export::start(dir.path(), &["--iscsi", &tgt.uri(1, "")]);
    require_tool("nbdsh");
    // One NBD connection stays open (so its session does too) while the LUN grows.
    let flag = dir.path().join("grown");
    let script = format!(
        r#"
import os, time
h.pread(512, 0)
while not os.path.exists({flag:?}):
    time.sleep(0.05)
for i in range(3):
    h.pread(512, 0)
print("ok")
"#,
        flag = flag.to_str().unwrap()
    );
    // nbdsh runs `python3 -m nbd` (Debian's python3-libnbd): /usr/bin's python3 first.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let sh = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", &exp.uri(), "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    std::thread::sleep(Duration::from_millis(500));
    // tgtd 1.0.85 cannot resize a live LU nor raise CAPACITY DATA HAS CHANGED (0x2a09):
    // the LU is re-created on the grown file, then another LU is added, which raises
    // REPORTED LUNS DATA HAS CHANGED (0x3f0e) on every LU of the open session. Ember
    // re-reads the capacity on either attention.
    tgt.adm(&[
        "--op",
        "delete",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
    ]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .and_then(|f| f.set_len(32 << 20))
        .expect("grow");
    tgt.add_lun(&backing, 1, false);
    let other = dir.path().join("other.img");
    sparse_file(&other, 1 << 20);
    tgt.add_lun(&other, 2, false);
    std::fs::write(&flag, b"").expect("flag");
    let out = sh.wait_with_output().expect("nbdsh");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        exp.daemon.log_text()
    );
    let t = Instant::now();
    while !exp.daemon.log_text().contains("LUN capacity changed") {
        assert!(t.elapsed() < START, "no resize: {}", exp.daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let size = run_ok(Command::new("nbdinfo").args(["--size", &exp.uri()]));
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (32u64 << 20).to_string()
    );
    exp.stop();
}

#[test]
fn tgtd_killed_and_restarted_under_fio_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 64 << 20);
    let mut tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    let exp = Export::start(
        dir.path(),
        &["--iscsi", &tgt.uri(1, "?nop_interval=1&nop_timeout=2")],
    );
    let uri = exp.uri();
    let d = dir.path().to_path_buf();
    let fio = std::thread::spawn(move || {
        fio_verify(&d, &uri, "64M", &["--rate=8m", "--verify_backlog=512"])
    });
    std::thread::sleep(Duration::from_secs(3));
    tgt.kill();
    std::thread::sleep(Duration::from_secs(2));
    tgt.spawn();
    tgt.target(&backing, 1, false);
    let text = fio.join().expect("fio thread");
    assert!(text.contains("err= 0"), "{text}");
    let log = exp.daemon.log_text();
    assert!(log.contains("iSCSI connection lost"), "{log}");
    assert!(log.contains("re-established"), "{log}");
    exp.stop();
}

#[test]
fn a_target_that_stops_answering_fails_io_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 8 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    let exp = Export::start(
        dir.path(),
        &[
            "--iscsi",
            &tgt.uri(
                1,
                "?nop_interval=1&nop_timeout=1&timeout=2&login_timeout=2&replacement_timeout=4",
            ),
        ],
    );
    let pid = tgt.child.as_ref().expect("tgtd").id() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = Instant::now();
    let out = run_any(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &exp.uri()]));
    let took = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error") || !out.status.success(),
        "a read from a stopped target should fail: {text}"
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    // Once the target answers again, so does the export.
    let t = Instant::now();
    loop {
        let out =
            run_any(Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &exp.uri()]));
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error") {
            break;
        }
        assert!(
            t.elapsed() < START,
            "the export did not recover: {}",
            exp.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    exp.stop();
}

/// A loop device over a temp file (a block LUN as the host sees one), detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(backing: &Path, sector: u32) -> Loop {
        require_tool("losetup");
        let out = run_ok(Command::new("losetup").args([
            "--find",
            "--show",
            "--sector-size",
            &sector.to_string(),
            backing.to_str().unwrap(),
        ]));
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn loop_device_luns_through_the_same_export() {
    for sector in [512u32, 4096] {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("lun.img");
        sparse_file(&backing, 64 << 20);
        let lo = Loop::new(&backing, sector);
        let exp = Export::start(dir.path(), &["--file", lo.dev.to_str().unwrap()]);
        let src = dir.path().join("src.img");
        let data = random_file(&src, 64 << 20);
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &exp.uri(),
        ]);
        fio_verify(dir.path(), &exp.uri(), "32M", &[]);
        let mut c = Command::new("qemu-io");
        c.args([
            "-f",
            "raw",
            "-c",
            "discard 48M 8M",
            "-c",
            "flush",
            &exp.uri(),
        ]);
        run_ok(&mut c);
        exp.stop();
        let back = std::fs::read(&backing).expect("read backing");
        assert!(
            back[32 << 20..48 << 20] == data[32 << 20..48 << 20],
            "sector {sector}"
        );
        assert!(
            back[48 << 20..56 << 20].iter().all(|&b| b == 0),
            "discard, sector {sector}"
        );
        assert!(back[56 << 20..] == data[56 << 20..], "sector {sector}");
        assert!(
            allocated(&backing) <= (56 << 20) + (1 << 20),
            "the discard punched no hole"
        );
    }
}

#[test]
fn a_lun_that_disappears_fails_io_clearly_and_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 8 << 20);
    let tgt = Tgtd::start(dir.path());
    tgt.target(&backing, 1, false);
    let exp = Export::start(dir.path(), &["--iscsi", &tgt.uri(1, "")]);
    require_tool("qemu-io");
    let io = |cmd: &str| {
        let out = run_any(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &exp.uri()]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(io("write -P 0x11 0 64k").contains("wrote"));
    tgt.adm(&[
        "--op",
        "delete",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
    ]);
    let t = Instant::now();
    let text = io("read 0 4k");
    assert!(text.contains("Input/output error"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(30));
    let log = exp.daemon.log_text();
    // A session that was open sees LOGICAL UNIT NOT SUPPORTED; a new one sees REPORT LUNS.
    assert!(
        log.contains("the LUN is gone from the target") || log.contains("LUN 1 does not exist"),
        "{log}"
    );
    // The array brings the LUN back (same target, same LUN number, same identity).
    tgt.add_lun(&backing, 1, false);
    let text = io("read -P 0x11 0 64k");
    assert!(text.contains("read 65536/65536"), "{text}");
    exp.stop();
}

/// Two `tgtd`s on one backing file (one LUN, same SCSI ID and serial: two paths of one
/// LUN, as two array controllers), one on 127.0.0.1 and one on 127.0.0.2. Ember's
/// export uses both; each is killed in turn under fio verify and brought back: the
/// workload sees no error, the data verifies, and each path comes back by itself. Then
/// one path hangs (SIGSTOP) and is taken out by the NOP-Out timeout.
#[test]
fn multipath_survives_each_path_dying_under_fio_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 64 << 20);
    let mut a = Tgtd::start_on(dir.path(), "127.0.0.1");
    a.target(&backing, 1, false);
    let mut b = Tgtd::start_on(dir.path(), "127.0.0.2");
    b.target(&backing, 1, false);
    let uri = format!(
        "iscsi://{},{}/{IQN}/1?nop_interval=1&nop_timeout=2&replacement_timeout=30",
        a.portal(),
        b.portal()
    );
    let exp = Export::start(dir.path(), &["--iscsi", &uri]);
    let log = exp.daemon.log_text();
    assert!(log.contains("multipath LUN opened"), "{log}");
    assert!(log.contains("reachable=2"), "{log}");
    let nbd = exp.uri();
    let d = dir.path().to_path_buf();
    let fio = std::thread::spawn(move || {
        fio_verify(&d, &nbd, "64M", &["--rate=4m", "--verify_backlog=256"])
    });
    let ups = |portal: &str| {
        exp.daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("multipath: path up") && l.contains(portal))
            .count()
    };
    let downs = |portal: &str| {
        exp.daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("multipath: path down") && l.contains(portal))
            .count()
    };
    // Kill a path, bring it back, and wait until the export uses it again (failback).
    let cycle = |t: &mut Tgtd| {
        let since = Instant::now();
        while ups(&t.portal()) == 0 {
            assert!(since.elapsed() < START, "{}", exp.daemon.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        let before = ups(&t.portal());
        t.kill();
        std::thread::sleep(Duration::from_secs(2));
        t.spawn();
        t.target(&backing, 1, false);
        let since = Instant::now();
        while ups(&t.portal()) <= before {
            assert!(
                since.elapsed() < START,
                "path {} did not come back: {}",
                t.portal(),
                exp.daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    cycle(&mut a);
    cycle(&mut b);
    // A path that hangs (SIGSTOP: no reset, no answer) is taken out by the unanswered
    // NOP-Out ping (nop_interval + nop_timeout), its commands go to the other path.
    let pid = a.child.as_ref().expect("tgtd").id() as i32;
    let before = downs(&a.portal());
    let ups_before = ups(&a.portal());
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let since = Instant::now();
    while downs(&a.portal()) <= before {
        assert!(since.elapsed() < START, "{}", exp.daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("hung path taken out after {:?}", since.elapsed());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let since = Instant::now();
    while ups(&a.portal()) <= ups_before {
        assert!(since.elapsed() < START, "{}", exp.daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = fio.join().expect("fio thread");
    // The longest wait fio saw (completion latency max), for the record; never asserted.
    for l in text
        .lines()
        .filter(|l| l.trim_start().starts_with("clat ("))
    {
        eprintln!("fio: {}", l.trim());
    }
    assert!(text.contains("err= 0"), "{text}");
    let log = exp.daemon.log_text();
    assert!(downs(&a.portal()) >= 1 && downs(&b.portal()) >= 1, "{log}");
    assert!(!log.contains("failing the request"), "{log}");
    for l in log.lines().filter(|l| l.contains("multipath")) {
        eprintln!("{l}");
    }
    exp.stop();
}

/// SCSI persistent reservations for fencing, against tgtd's implementation: one tgtd,
/// one LUN on two portals. Node A registers its key on every session of both paths and
/// reserves the LUN Write Exclusive – Registrants Only; a node without a key can read
/// but not write; node B registers and preempts A's key: B writes, A's writes are
/// refused by the target (RESERVATION CONFLICT) on every path while its reads go on.
#[test]
fn persistent_reservations_fence_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 16 << 20);
    let tgt = Tgtd::start_two_portals(dir.path());
    tgt.target(&backing, 1, false);
    let portals = format!("127.0.0.1:{p},127.0.0.2:{p}", p = tgt.port);
    let uri = |q: &str| format!("iscsi://{portals}/{IQN}/1?request_timeout=10{q}");
    require_tool("qemu-io");
    let io = |exp: &Export, cmd: &str| {
        let out = run_any(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &exp.uri()]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // Each node logs to its own directory.
    let node = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("node dir");
        d
    };
    let a = Export::start(&node("a"), &["--iscsi", &uri("&pr_key=a1"), "--pr-reserve"]);
    let log = a.daemon.log_text();
    assert!(
        log.contains("persistent reservation taken")
            && log.contains("holder=Some(\"0xa1\")")
            && log.contains("write-exclusive-registrants-only"),
        "{log}"
    );
    assert!(io(&a, "write -P 0xa1 0 64k").contains("wrote 65536/65536"));
    assert!(
        a.daemon.log_text().contains("reservation key registered"),
        "{}",
        a.daemon.log_text()
    );
    // A node that did not register: reads yes, writes refused by the target.
    let n = Export::start(&node("n"), &["--iscsi", &uri("")]);
    assert!(io(&n, "read -P 0xa1 0 64k").contains("read 65536/65536"));
    let t = io(&n, "write -P 0x99 0 4k");
    assert!(t.contains("Input/output error"), "{t}");
    n.stop();
    // A's writes reached the LUN; nothing of the refused write did.
    let back = std::fs::read(&backing).expect("read backing");
    assert!(back[..65536].iter().all(|&b| b == 0xa1));
    // A client of A keeps its connection (so A's sessions stay logged in) across the
    // preemption: its next write is refused, its reads go on.
    require_tool("nbdsh");
    let flag = dir.path().join("preempted");
    let connected = dir.path().join("connected");
    let script = format!(
        r#"
import os, time
h.pwrite(b"\xa1" * 4096, 16 * 4096)
open({connected:?}, "w").close()
while not os.path.exists({flag:?}):
    time.sleep(0.05)
try:
    h.pwrite(b"\xa1" * 4096, 32 * 4096)
    print("written")
except nbd.Error as e:
    print("refused:", e)
print("read", h.pread(4096, 0)[:1].hex())
"#,
        flag = flag.to_str().unwrap(),
        connected = connected.to_str().unwrap()
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut sh = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", &a.uri(), "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let since = Instant::now();
    while !connected.exists() {
        if let Ok(Some(st)) = sh.try_wait() {
            panic!("nbdsh exited with {st}: {}", a.daemon.log_text());
        }
        assert!(since.elapsed() < START, "nbdsh did not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Node B registers and fences A: preempts A's key and takes the reservation.
    let b = Export::start(
        &node("b"),
        &["--iscsi", &uri("&pr_key=b2"), "--pr-preempt", "a1"],
    );
    let log = b.daemon.log_text();
    assert!(
        log.contains("action=\"PREEMPT\"") && log.contains("holder=Some(\"0xb2\")"),
        "{log}"
    );
    let registered = log
        .lines()
        .find(|l| l.contains("persistent reservation taken"))
        .and_then(|l| l.split("registered=[").nth(1))
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no registered keys: {log}"));
    assert!(
        registered.contains("0xb2") && !registered.contains("0xa1"),
        "A's key is still registered: {log}"
    );
    assert!(io(&b, "write -P 0xb2 0 64k").contains("wrote 65536/65536"));
    std::fs::write(&flag, b"").expect("flag");
    let out = sh.wait_with_output().expect("nbdsh");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("open client of A: {text}");
    assert!(
        text.contains("refused:") && text.contains("read b2"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A is fenced: the target refuses its writes (through either path), reads go on.
    let t = io(&a, "write -P 0xa1 0 4k");
    assert!(t.contains("Input/output error"), "{t}");
    assert!(io(&a, "read -P 0xb2 0 64k").contains("read 65536/65536"));
    let t = io(&a, "write -P 0xa1 8M 4k");
    assert!(t.contains("Input/output error"), "{t}");
    let log = a.daemon.log_text();
    assert!(
        log.contains("REGISTRATIONS PREEMPTED")
            || log.contains("was preempted")
            || log.contains("fenced=true"),
        "{log}"
    );
    assert!(log.contains("RESERVATION CONFLICT"), "{log}");
    for l in log
        .lines()
        .filter(|l| l.contains("reservation") || l.contains("PREEMPT") || l.contains("CONFLICT"))
    {
        eprintln!("A: {l}");
    }
    let back = std::fs::read(&backing).expect("read backing");
    assert!(back[..65536].iter().all(|&b| b == 0xb2));
    assert!(back[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 0));
    a.stop();
    b.stop();
}

/// A portal that does not answer at open is kept as a path (with the geometry learned
/// through the others) and used once it answers: after the first path dies, the data
/// is read through it.
#[test]
fn multipath_takes_a_portal_that_was_down_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("lun.img");
    sparse_file(&backing, 16 << 20);
    let mut a = Tgtd::start_on(dir.path(), "127.0.0.1");
    a.target(&backing, 1, false);
    let mut b = Tgtd::unstarted(dir.path(), "127.0.0.2");
    let uri = format!(
        "iscsi://{},{}/{IQN}/1?login_timeout=5&replacement_timeout=30",
        a.portal(),
        b.portal()
    );
    let exp = Export::start(dir.path(), &["--iscsi", &uri]);
    let log = exp.daemon.log_text();
    assert!(log.contains("reachable=1"), "{log}");
    assert!(log.contains("not reachable at open"), "{log}");
    require_tool("qemu-io");
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let out = run_any(c.arg(exp.uri()));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let t = io(&["write -P 0x5a 0 1M", "flush"]);
    assert!(t.contains("wrote 1048576/1048576"), "{t}");
    b.spawn();
    b.target(&backing, 1, false);
    a.kill();
    let t = io(&["read -P 0x5a 0 1M"]);
    assert!(t.contains("read 1048576/1048576"), "{t}");
    let log = exp.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("multipath: path up") && l.contains(&b.portal())),
        "{log}"
    );
    exp.stop();
}
