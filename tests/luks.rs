//! LUKS interoperability with the real tools: QEMU (`qemu-img`, `qemu-io` with its luks
//! driver) and cryptsetup 2.6 (`luksFormat`, offline `reencrypt --encrypt`, `luksDump`,
//! `open --test-passphrase`). Ember's side is the real data path: the file backend on
//! io_uring under the crypt layer (`ember-blockdev`), and the `emberd luks` CLI.
//!
//! Passphrase files are used byte-for-byte by all three tools.

mod common;

use common::{emberd_bin, require_tool, run_any, run_ok};
use ember_blockdev::layer::crypt::CryptDevice;
use ember_blockdev::{BackendSpec, OpenOptions as BackendOpts, SyncDevice};
use ember_crypto::{passphrase_for, SecretKind, UnlockLimits};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// The plaintext of `img` through Ember's crypt layer over the io_uring file backend.
fn ember_open(img: &Path, pass: &[u8]) -> SyncDevice {
    let inner = ember_blockdev::open(
        &BackendSpec::File {
            path: img.to_path_buf(),
        },
        &BackendOpts::default(),
    )
    .unwrap();
    let c = CryptDevice::open(inner, pass, &UnlockLimits::default()).unwrap();
    SyncDevice::new(Arc::new(c)).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(13) ^ (i >> 8) as u8)
        .collect()
}

fn emberd(args: &[&str]) -> Command {
    let mut c = Command::new(emberd_bin());
    c.args(args);
    c
}

/// `emberd luks OP IMG --passphrase-file PW`, for the caller to add to.
fn luks(op: &str, img: &Path, pw: &Path) -> Command {
    let mut c = emberd(&["luks", op]);
    c.arg(img).arg("--passphrase-file").arg(pw);
    c
}

/// `emberd luks add-key IMG --passphrase-file PW --new-passphrase-file NEW`, for the
/// caller to add to.
fn add_key(img: &Path, pw: &Path, new: &Path) -> Command {
    let mut c = luks("add-key", img, pw);
    c.arg("--new-passphrase-file").arg(new);
    c
}

/// Run `cmd`, which must fail; returns its stderr.
fn fails(cmd: &mut Command) -> String {
    let out = run_any(cmd);
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `emberd luks format` of a `size`-byte volume of type `ty` with a cheap PBKDF2.
fn luks_format_fast(img: &Path, pw: &Path, ty: &str, size: &str) {
    run_ok(
        luks("format", img, pw)
            .args(["--type", ty, "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--size", size]),
    );
}

/// `cryptsetup luksFormat`: LUKS2, 4096-byte sectors, a cheap Argon2id.
fn cryptsetup_format_luks2_4k(img: &Path, key: &Path) {
    run_ok(
        Command::new("cryptsetup")
            .args(["luksFormat", "--type", "luks2", "--pbkdf", "argon2id"])
            .args(["--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4"])
            .args(["--sector-size", "4096", "--batch-mode", "--key-file"])
            .arg(key)
            .arg(img),
    );
}

fn qemu_io(img: &Path, pw: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!("secret,id=sec0,file={}", pw.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            img.display()
        ));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    qemu_io_output(&mut c, cmds)
}

/// Run the `qemu-io` command line `c` (running `cmds`); panics if it fails or reports a
/// failure or an error. Returns its output.
fn qemu_io_output(c: &mut Command, cmds: &[&str]) -> String {
    let out = run_ok(c);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

/// `qemu-img create -f luks` (10 ms of PBKDF2). QEMU calibrates PBKDF2 by CPU time and
/// can fail with "Unable to get accurate CPU usage" on a heavily loaded machine: retry.
fn qemu_img_create_luks(img: &Path, pw: &Path, size: &str) {
    for attempt in 1..=5 {
        let out = run_any(
            Command::new("qemu-img")
                .args(["create", "-f", "luks", "--object"])
                .arg(format!("secret,id=sec0,file={}", pw.display()))
                .args(["-o", "key-secret=sec0,iter-time=10"])
                .arg(img)
                .arg(size),
        );
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("accurate CPU usage") && attempt < 5,
            "qemu-img create -f luks failed: {err}"
        );
    }
}

/// A LUKS1 image `name` of `size` that QEMU made in `dir`, and its passphrase file
/// (holding `pass`): (passphrase file, image). Needs qemu-img and qemu-io.
fn qemu_luks_image(dir: &Path, pass: &[u8], name: &str, size: &str) -> (PathBuf, PathBuf) {
    require_tool("qemu-img");
    require_tool("qemu-io");
    let pw = write_file(dir, "pw", pass);
    let img = dir.join(name);
    qemu_img_create_luks(&img, &pw, size);
    (pw, img)
}

fn cryptsetup_test_passphrase(img: &Path, key: &Path) -> bool {
    run_any(
        Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--key-file"])
            .arg(key)
            .arg(img),
    )
    .status
    .success()
}

#[test]
fn qemu_img_luks1_volume_interoperates_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (pw, img) = qemu_luks_image(dir.path(), b"qemu secret", "q.luks", "8M");
    // QEMU writes, Ember reads.
    qemu_io(&img, &pw, &["write -P 0xab 0 1M", "write -P 0x5c 3M 64k"]);
    let mut d = ember_open(&img, b"qemu secret");
    assert_eq!(d.device().info().size, 8 << 20);
    assert!(d
        .read_at(0, 1 << 20)
        .unwrap()
        .as_slice()
        .iter()
        .all(|&b| b == 0xab));
    assert!(d
        .read_at(3 << 20, 65536)
        .unwrap()
        .as_slice()
        .iter()
        .all(|&b| b == 0x5c));
    // Ember writes, QEMU reads.
    d.write_at(5 << 20, &[0xcd; 131072]).unwrap();
    drop(d);
    qemu_io(&img, &pw, &["read -P 0xcd 5M 128k", "read -P 0xab 0 1M"]);
}

#[test]
fn cryptsetup_luks2_argon2id_4k_volume_opens_in_ember() {
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"cs pass\n");
    let img = dir.path().join("c.luks");
    common::sparse_file(&img, 24 << 20);
    cryptsetup_format_luks2_4k(&img, &pw);
    let mut d = ember_open(&img, b"cs pass\n");
    let info = d.device().info();
    assert_eq!(info.size, 8 << 20);
    assert_eq!(info.logical_block_size, 4096);
    let data = pattern(1 << 20, 7);
    d.write_at(1 << 20, &data).unwrap();
    assert_eq!(
        d.read_at(1 << 20, data.len()).unwrap().as_slice(),
        &data[..]
    );
    drop(d);
    // Ember's keyslot added to cryptsetup's header is accepted by cryptsetup, and vice
    // versa for a wrong passphrase.
    let pw2 = write_file(dir.path(), "pw2", b"second");
    run_ok(add_key(&img, &pw, &pw2).args([
        "--pbkdf",
        "argon2i",
        "--pbkdf-memory",
        "8192",
        "--pbkdf-force-iterations",
        "4",
    ]));
    assert!(cryptsetup_test_passphrase(&img, &pw2));
    assert!(cryptsetup_test_passphrase(&img, &pw));
    // Ember still reads what it wrote, through the new keyslot.
    let mut d = ember_open(&img, b"second");
    assert_eq!(
        d.read_at(1 << 20, data.len()).unwrap().as_slice(),
        &data[..]
    );
}

/// The IV convention for 4096-byte sectors, against data cryptsetup itself encrypted:
/// offline `reencrypt --encrypt` turns a plaintext file into a LUKS2 volume with cryptsetup's
/// own cipher code; Ember must read back the original plaintext.
#[test]
fn cryptsetup_encrypted_4k_sectors_decrypt_identically() {
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"iv check");
    let img = dir.path().join("r.img");
    let plain = pattern(24 << 20, 0x3c);
    std::fs::write(&img, &plain).unwrap();
    run_ok(
        Command::new("cryptsetup")
            .args([
                "reencrypt",
                "--encrypt",
                "--type",
                "luks2",
                "--sector-size",
                "4096",
            ])
            .args(["--reduce-device-size", "16M", "--pbkdf", "pbkdf2"])
            .args([
                "--pbkdf-force-iterations",
                "1000",
                "--batch-mode",
                "--key-file",
            ])
            .arg(&pw)
            .arg(&img),
    );
    let mut d = ember_open(&img, b"iv check");
    // The header took 8 MiB (half the reduction) and the last 16 MiB of the original
    // are given up: the first 8 MiB of plaintext are preserved.
    let keep = 8 << 20;
    assert!(d.device().info().size as usize >= keep);
    let got = d.read_at(0, keep).unwrap();
    for (i, (a, b)) in got
        .as_slice()
        .chunks(4096)
        .zip(plain.chunks(4096))
        .enumerate()
    {
        assert!(a == b, "4096-byte sector {i} differs (IV convention?)");
    }
    // And the ciphertext on disk is not the plaintext.
    let raw = std::fs::read(&img).unwrap();
    let window = &plain[1 << 20..(1 << 20) + 64];
    assert!(!raw.windows(64).any(|w| w == window));
}

#[test]
fn emberd_formatted_volumes_pass_cryptsetup_and_qemu() {
    require_tool("cryptsetup");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"ember pass");
    for (ty, ss, pbkdf, key) in [
        ("luks1", "512", "pbkdf2", "256"),
        ("luks1", "512", "pbkdf2", "512"),
        ("luks2", "512", "pbkdf2", "512"),
        ("luks2", "4096", "argon2id", "512"),
        ("luks2", "4096", "pbkdf2", "256"),
    ] {
        let img = dir.path().join(format!("{ty}-{ss}-{pbkdf}-{key}.img"));
        run_ok(
            luks("format", &img, &pw)
                .args([
                    "--type",
                    ty,
                    "--sector-size",
                    ss,
                    "--pbkdf",
                    pbkdf,
                    "--key-size",
                    key,
                ])
                .args(["--size", "4194304", "--pbkdf-force-iterations", "4"])
                .args(["--pbkdf-memory", "16384"]),
        );
        let dump = run_ok(Command::new("cryptsetup").arg("luksDump").arg(&img));
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(dump.contains("xts-plain64"), "{dump}");
        assert!(cryptsetup_test_passphrase(&img, &pw), "{ty} {ss} {pbkdf}");
        let bad = write_file(dir.path(), "bad", b"ember pas");
        assert!(!cryptsetup_test_passphrase(&img, &bad));

        let mut d = ember_open(&img, b"ember pass");
        assert_eq!(d.device().info().size, 4 << 20);
        d.write_at(0, &[0x71; 65536]).unwrap();
        d.write_at(2 << 20, &[0x72; 8192]).unwrap();
        drop(d);
        if ty == "luks1" {
            qemu_io(&img, &pw, &["read -P 0x71 0 64k", "read -P 0x72 2M 8k"]);
        }
    }
}

#[test]
fn symmetric_secret_becomes_hex_passphrase_for_cryptsetup() {
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    // A binary key with bytes that are not text (and a NUL).
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x80).collect();
    let hex = passphrase_for(SecretKind::Symmetric, &key);
    assert_eq!(hex.len(), 64);
    assert!(hex
        .iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
    let hex_file = write_file(dir.path(), "hex", &hex);
    let raw_file = write_file(dir.path(), "raw", &key);

    // cryptsetup formats with the hex text; Ember opens with the rule applied to the key.
    let img = dir.path().join("cs.img");
    common::sparse_file(&img, 20 << 20);
    run_ok(
        Command::new("cryptsetup")
            .args(["luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args([
                "--pbkdf-force-iterations",
                "1000",
                "--batch-mode",
                "--key-file",
            ])
            .arg(&hex_file)
            .arg(&img),
    );
    let mut d = ember_open(&img, &passphrase_for(SecretKind::Symmetric, &key));
    d.write_at(0, &[1; 4096]).unwrap();
    drop(d);

    // Ember formats (passphrase file holding the hex), cryptsetup accepts the hex, not the
    // raw bytes.
    let img2 = dir.path().join("em.img");
    luks_format_fast(&img2, &hex_file, "luks1", "1048576");
    assert!(cryptsetup_test_passphrase(&img2, &hex_file));
    assert!(!cryptsetup_test_passphrase(&img2, &raw_file));
    // A `passphrase` secret is used as-is.
    assert_eq!(
        &passphrase_for(SecretKind::Passphrase, b"as is\n")[..],
        b"as is\n"
    );
}

#[test]
fn on_disk_bytes_never_contain_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"scan");
    let img = dir.path().join("scan.img");
    luks_format_fast(&img, &pw, "luks2", "8388608");
    let marker = b"EMBER-PLAINTEXT-MARKER-0123456789abcdef";
    let mut block = Vec::new();
    while block.len() < 1 << 20 {
        block.extend_from_slice(marker);
    }
    block.truncate(1 << 20);
    let mut d = ember_open(&img, b"scan");
    for i in 0..8u64 {
        d.write_at(i << 20, &block).unwrap();
    }
    // Write-zeroes must read back as zeros, yet leave no zeros (or plaintext) on disk.
    d.op(ember_blockdev::Op::WriteZeroes { unmap: true }, 0, 65536)
        .unwrap();
    assert!(d
        .read_at(0, 65536)
        .unwrap()
        .as_slice()
        .iter()
        .all(|&b| b == 0));
    drop(d);
    let raw = std::fs::read(&img).unwrap();
    assert!(!raw.windows(16).any(|w| w == &marker[..16]));
    let data_start = 16 << 20;
    assert!(raw[data_start..data_start + 4096].iter().any(|&b| b != 0));
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn wrong_passphrase_and_corrupt_header_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"right");
    let wrong = write_file(dir.path(), "wrong", b"wrong");
    let new = write_file(dir.path(), "new", b"new");
    for ty in ["luks1", "luks2"] {
        let img = dir.path().join(format!("{ty}.img"));
        luks_format_fast(&img, &pw, ty, "1048576");
        let before = sha(&img);
        for op in ["add-key", "remove-key", "change-key"] {
            let mut c = luks(op, &img, &wrong);
            if op != "remove-key" {
                c.arg("--new-passphrase-file").arg(&new);
            }
            let err = fails(&mut c);
            assert!(err.contains("wrong passphrase"), "{err}");
            assert!(!err.contains("right") && !err.contains("wrong\n"), "{err}");
            assert!(sha(&img) == before, "luks {op} changed the file");
        }
        // Formatting over a LUKS volume is refused without --force.
        let err = fails(luks("format", &img, &new).args(["--type", ty, "--size", "4096"]));
        assert!(err.contains("already holds a LUKS header"), "{err}");
        assert!(sha(&img) == before);
        // Removing the only keyslot is refused.
        let err = fails(&mut luks("remove-key", &img, &pw));
        assert!(err.contains("last keyslot"), "{err}");
        assert!(sha(&img) == before);
    }

    // LUKS2: damage the JSON of both copies: checksum error, nothing written.
    let img = dir.path().join("luks2.img");
    let mut raw = sha(&img);
    raw[4096 + 10] ^= 0x20;
    raw[16384 + 4096 + 10] ^= 0x20;
    std::fs::write(&img, &raw).unwrap();
    for args in [vec!["luks", "dump"], vec!["luks", "add-key"]] {
        let mut c = emberd(&args);
        c.arg(&img);
        if args[1] == "add-key" {
            c.arg("--passphrase-file")
                .arg(&pw)
                .arg("--new-passphrase-file")
                .arg(&new);
        }
        let err = fails(&mut c);
        assert!(err.contains("checksum"), "{err}");
        assert!(sha(&img) == raw);
    }
    // Not LUKS at all, and truncated.
    let plain = dir.path().join("plain.img");
    common::sparse_file(&plain, 1 << 20);
    let err = fails(emberd(&["luks", "dump"]).arg(&plain));
    assert!(err.contains("not a LUKS volume"), "{err}");
    let short = dir.path().join("short.img");
    std::fs::write(&short, &sha(&dir.path().join("luks1.img"))[..4096]).unwrap();
    let err = fails(&mut add_key(&short, &pw, &new));
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn argon2_memory_cap_is_enforced_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"mem");
    let new = write_file(dir.path(), "new", b"new");
    let img = dir.path().join("m.img");
    run_ok(
        luks("format", &img, &pw)
            .args([
                "--pbkdf",
                "argon2id",
                "--pbkdf-memory",
                "65536",
                "--pbkdf-force-iterations",
                "4",
            ])
            .args(["--size", "1048576"]),
    );
    let err = fails(add_key(&img, &pw, &new).args(["--max-argon2-memory", "1024"]));
    assert!(
        err.contains("65536 KiB") && err.contains("1024 KiB"),
        "{err}"
    );
}

/// `emberd export --passphrase-file` running until stopped.
struct LuksExport {
    sock: PathBuf,
    daemon: common::Daemon,
}

impl LuksExport {
    fn start(dir: &Path, img: &Path, pw: &Path) -> LuksExport {
        let sock = dir.join(format!(
            "luks-{}.sock",
            img.file_name().unwrap().to_string_lossy()
        ));
        let nbd = format!("unix:{}", sock.display());
        let daemon = common::Daemon::spawn(
            dir,
            &[
                "export",
                "--file",
                img.to_str().unwrap(),
                "--passphrase-file",
                pw.to_str().unwrap(),
                "--nbd",
                &nbd,
                "--threads",
                "2",
            ],
        );
        common::wait_for_path(&sock, std::time::Duration::from_secs(60));
        LuksExport { sock, daemon }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn stop(mut self) {
        self.daemon.terminate(std::time::Duration::from_secs(60));
    }
}

fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    qemu_io_output(&mut c, cmds)
}

#[test]
fn export_serves_qemu_luks1_plaintext_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (pw, img) = qemu_luks_image(dir.path(), b"nbd luks", "q.luks", "16M");
    qemu_io(&img, &pw, &["write -P 0xab 0 1M", "write -P 0x17 15M 1M"]);
    let srv = LuksExport::start(dir.path(), &img, &pw);
    let out = run_ok(
        Command::new("qemu-img")
            .args(["info", "-f", "raw"])
            .arg(srv.uri()),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("16 MiB"));
    qemu_io_nbd(
        &srv.uri(),
        &[
            "read -P 0xab 0 1M",
            "read -P 0x17 15M 1M",
            "write -P 0x5a 2M 1M",
            "write -z 4M 1M",
            "read -P 0x5a 2M 1M",
            "read -P 0 4M 1M",
        ],
    );
    srv.stop();
    // What Ember wrote over NBD, QEMU's own luks driver reads back.
    qemu_io(
        &img,
        &pw,
        &["read -P 0x5a 2M 1M", "read -P 0 4M 1M", "read -P 0xab 0 1M"],
    );
}

#[test]
fn export_serves_cryptsetup_luks2_4k_over_nbd() {
    require_tool("cryptsetup");
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"nbd luks2");
    let img = dir.path().join("c.luks");
    common::sparse_file(&img, 32 << 20);
    cryptsetup_format_luks2_4k(&img, &pw);
    let srv = LuksExport::start(dir.path(), &img, &pw);
    qemu_io_nbd(&srv.uri(), &["write -P 0x99 1M 3M", "read -P 0x99 1M 3M"]);
    srv.stop();
    let raw = std::fs::read(&img).unwrap();
    assert!(!raw.windows(64).any(|w| w.iter().all(|&b| b == 0x99)));
    // A second export (a fresh unlock) reads the same plaintext.
    let srv = LuksExport::start(dir.path(), &img, &pw);
    qemu_io_nbd(&srv.uri(), &["read -P 0x99 1M 3M"]);
    srv.stop();
    assert!(cryptsetup_test_passphrase(&img, &pw));
}

#[test]
fn export_with_wrong_passphrase_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"good");
    let bad = write_file(dir.path(), "bad", b"bad");
    let img = dir.path().join("w.img");
    luks_format_fast(&img, &pw, "luks1", "1048576");
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("w.sock");
    let err = fails(
        emberd(&["export", "--file"])
            .arg(&img)
            .arg("--passphrase-file")
            .arg(&bad)
            .arg("--nbd")
            .arg(format!("unix:{}", sock.display())),
    );
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!err.contains("good") && !err.contains("bad\n"));
    assert!(!sock.exists());
    assert!(std::fs::read(&img).unwrap() == before);
}

/// vhost-user-blk with `--passphrase-file`: a blkio client (guest memory = borrowed
/// iovecs) writes and reads plaintext; QEMU's luks driver reads the same plaintext from
/// the file afterwards.
#[test]
fn export_serves_luks_over_vhost_user() {
    use blkio::{Blkio, ReqFlags};
    use std::mem::MaybeUninit;
    let dir = tempfile::tempdir().unwrap();
    let (pw, img) = qemu_luks_image(dir.path(), b"vhost luks", "v.luks", "16M");
    qemu_io(&img, &pw, &["write -P 0x3e 8M 1M"]);
    let sock = dir.path().join("v.sock");
    let mut daemon = common::Daemon::spawn(
        dir.path(),
        &[
            "export",
            "--file",
            img.to_str().unwrap(),
            "--passphrase-file",
            pw.to_str().unwrap(),
            "--vhost-user",
            sock.to_str().unwrap(),
        ],
    );
    common::wait_for_path(&sock, std::time::Duration::from_secs(60));

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect()
        .unwrap_or_else(|e| panic!("blkio connect: {e:?}"));
    b.set_i32("num-queues", 1).unwrap();
    let mut started = b.start().unwrap_or_else(|e| panic!("blkio start: {e:?}"));
    assert_eq!(b.get_u64("capacity").unwrap(), 16 << 20);
    let region = b.alloc_mem_region(4 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    let q = &mut started.queues[0];
    let wait = |q: &mut blkio::Blkioq, n: usize| {
        let mut comps: Vec<MaybeUninit<blkio::Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = 0;
        while got < n {
            let mut timeout = std::time::Duration::from_secs(60);
            let k = q
                .do_io(&mut comps[got..], n - got, Some(&mut timeout), None)
                .unwrap_or_else(|e| panic!("do_io: {e:?}"));
            assert!(k > 0, "no completion within 60 s");
            for c in &comps[got..got + k] {
                // SAFETY: do_io initialised these entries.
                assert_eq!(unsafe { c.assume_init_ref() }.ret, 0, "request failed");
            }
            got += k;
        }
    };
    // SAFETY: the region is mapped read-write until freed below, and the slices are only
    // used while no request runs on the same bytes.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let data = pattern(1 << 20, 0x44);
    mem[..data.len()].copy_from_slice(&data);
    // Eight 128 KiB writes in one batch, then read everything back elsewhere.
    for i in 0..8usize {
        let p = (region.addr + i * (128 << 10)) as *const u8;
        q.write(
            (1 << 20) + (i as u64) * (128 << 10),
            p,
            128 << 10,
            i,
            ReqFlags::empty(),
        );
    }
    wait(q, 8);
    assert!(
        mem[..data.len()] == data[..],
        "the guest's write buffer was modified"
    );
    q.read(
        1 << 20,
        (region.addr + (2 << 20)) as *mut u8,
        1 << 20,
        9,
        ReqFlags::empty(),
    );
    q.read(
        8 << 20,
        (region.addr + (3 << 20)) as *mut u8,
        1 << 20,
        10,
        ReqFlags::empty(),
    );
    wait(q, 2);
    assert!(mem[2 << 20..3 << 20] == data[..], "vhost read-back differs");
    assert!(mem[3 << 20..4 << 20].iter().all(|&b| b == 0x3e));
    q.flush(11, ReqFlags::empty());
    wait(q, 1);
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    drop(started);
    drop(b);
    daemon.signal(libc::SIGTERM);
    daemon
        .wait_exit(std::time::Duration::from_secs(60))
        .expect("emberd did not exit on SIGTERM");
    // QEMU's luks driver sees the plaintext the vhost client wrote.
    let check = dir.path().join("expect.bin");
    std::fs::write(&check, &data).unwrap();
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "--image-opts", "--object"])
            .arg(format!("secret,id=sec0,file={}", pw.display()))
            .arg(format!("driver=raw,file.filename={}", check.display()))
            .arg(format!(
                "driver=raw,offset=1048576,size=1048576,file.driver=luks,file.key-secret=sec0,file.file.filename={}",
                img.display()
            )),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
}

/// Power safety against the real cryptsetup: a key change recorded by Ember over a
/// cryptsetup-made LUKS2 volume (4096-byte sectors) and over a QEMU-made LUKS1 volume;
/// a sample of the states a power cut could leave (see `ember_crypto::crash`: cuts at
/// every flush, subsets of the writes in flight, torn writes) is written to a file and
/// `cryptsetup open --test-passphrase` must accept the old or the new passphrase.
#[test]
fn crash_images_of_a_key_change_open_in_cryptsetup() {
    use ember_crypto::crash::{for_each_crash_state, CrashOptions, Recorder};
    use ember_crypto::kdf::Hash;
    use ember_crypto::KdfParams;
    require_tool("cryptsetup");
    let dir = tempfile::tempdir().unwrap();
    let old = write_file(dir.path(), "old", b"old pass");
    let new = write_file(dir.path(), "new", b"new pass");

    let cs = dir.path().join("cs.luks");
    common::sparse_file(&cs, 17 << 20);
    run_ok(
        Command::new("cryptsetup")
            .args(["luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--sector-size", "4096"])
            .args(["--batch-mode", "--key-file"])
            .arg(&old)
            .arg(&cs),
    );
    let (_, q) = qemu_luks_image(dir.path(), b"old pass", "q.luks", "1M");

    for (name, img) in [("cryptsetup LUKS2", cs), ("qemu-img LUKS1", q)] {
        let initial = std::fs::read(&img).unwrap();
        let mut rec = Recorder::new(initial.clone());
        let kdf = KdfParams::Pbkdf2 {
            hash: Hash::Sha256,
            iterations: 1000,
        };
        ember_crypto::change_key(
            &mut rec,
            b"old pass",
            b"new pass",
            kdf,
            &UnlockLimits::default(),
        )
        .unwrap();
        let ops = rec.ops().to_vec();
        // Every whole-write state, and every fifth torn one: cryptsetup takes ~50 ms each.
        let (mut n, mut checked) = (0usize, 0usize);
        let crash = dir.path().join("crash.img");
        let s = for_each_crash_state(&initial, &ops, &CrashOptions::default(), |st, bytes| {
            n += 1;
            if st.torn.is_some() && n % 5 != 0 {
                return Ok(());
            }
            checked += 1;
            std::fs::write(&crash, bytes).unwrap();
            if cryptsetup_test_passphrase(&crash, &old) || cryptsetup_test_passphrase(&crash, &new)
            {
                Ok(())
            } else {
                Err(format!("{st:?}"))
            }
        })
        .unwrap_or_else(|st| panic!("{name}: cryptsetup opens neither passphrase after {st}"));
        eprintln!(
            "{name}: {checked} of {} crash states checked in cryptsetup",
            s.states
        );
        assert!(checked >= 20, "{name}: {s:?}");
        // The finished change: only the new passphrase.
        std::fs::write(&crash, rec.image()).unwrap();
        assert!(cryptsetup_test_passphrase(&crash, &new));
        assert!(!cryptsetup_test_passphrase(&crash, &old));
    }
}

/// The cost limits as flags: a keyslot above `--max-pbkdf2-iterations` is refused with
/// an error naming the field and the flag, by `emberd luks` and `emberd export`, and a
/// QEMU-made header with 2^32-1 iterations (which would take most of an hour) fails at
/// once with the defaults. Nothing is written.
#[test]
fn luks_cost_limit_flags_refuse_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write_file(dir.path(), "pw", b"limits");
    let new = write_file(dir.path(), "new", b"new");
    let img = dir.path().join("l.img");
    luks_format_fast(&img, &pw, "luks2", "1048576");
    let before = sha(&img);
    let err = fails(add_key(&img, &pw, &new).args(["--max-pbkdf2-iterations", "999"]));
    assert!(
        err.contains("kdf.iterations is 1000")
            && err.contains("limit of 999")
            && err.contains("--max-pbkdf2-iterations"),
        "{err}"
    );
    assert!(sha(&img) == before);
    let err = fails(
        emberd(&["export", "--file"])
            .arg(&img)
            .arg("--passphrase-file")
            .arg(&pw)
            .args(["--nbd", "127.0.0.1:1", "--max-digest-iterations", "10"]),
    );
    assert!(err.contains("--max-digest-iterations"), "{err}");

    // QEMU's LUKS1 header, keyslot 0 patched to 2^32-1 PBKDF2 iterations.
    let (qpw, q) = qemu_luks_image(dir.path(), b"q", "q.luks", "1M");
    let mut raw = sha(&q);
    raw[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&q, &raw).unwrap();
    let t = std::time::Instant::now();
    let err = fails(
        emberd(&["export", "--file"])
            .arg(&q)
            .arg("--passphrase-file")
            .arg(&qpw)
            .args(["--nbd", "127.0.0.1:1"]),
    );
    assert!(
        err.contains("keyslot 0") && err.contains("--max-pbkdf2-iterations"),
        "{err}"
    );
    assert!(t.elapsed().as_secs() < 30, "took {:?}", t.elapsed());
    assert!(sha(&q) == raw);
}
