//! A tiny QEMU guest for end-to-end tests (TCG; KVM does not work on the test machines).
//!
//! `tests/guest/build.sh OUTDIR` builds, once, a Debian 6.1 cloud kernel and a busybox
//! initramfs with the virtio(-blk/-net) and nbd modules and `nbd-client`. A test adds its
//! own `/test.sh` ([`Guest::initrd`] appends a second cpio archive, which the kernel
//! unpacks over the first); the guest's `/init` loads the virtio-blk modules, runs the
//! script and prints `EMBER-GUEST-EXIT rc=N` on the serial console, then powers off.
//!
//! Use from a test file: `#[path = "guest/mod.rs"] mod guest;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The built guest: kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub base_initrd: PathBuf,
}

static BUILD: Mutex<()> = Mutex::new(());

impl Guest {
    /// Build the guest (or reuse the cached one) under the cargo target dir.
    pub fn get() -> Guest {
        let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ember-guest");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/build.sh");
        let o = Command::new("sh")
            .arg(&script)
            .arg(&out)
            .output()
            .expect("run build.sh");
        assert!(
            o.status.success(),
            "tests/guest/build.sh failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Guest {
            kernel: out.join("vmlinuz"),
            base_initrd: out.join("base.cpio"),
        }
    }

    /// An initrd for one test: the base image plus `/test.sh` holding `script`.
    pub fn initrd(&self, dir: &Path, script: &str) -> PathBuf {
        let sdir = dir.join("guest-script");
        std::fs::create_dir_all(&sdir).unwrap();
        std::fs::write(sdir.join("test.sh"), script).unwrap();
        let mut child = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(&sdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio is not installed");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"test.sh\n").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio failed");
        let mut initrd = std::fs::read(&self.base_initrd).unwrap();
        initrd.extend_from_slice(&out.stdout);
        let path = dir.join("initrd.cpio");
        std::fs::write(&path, initrd).unwrap();
        path
    }
}

/// A running QEMU whose serial console goes to a file. Killed on drop.
pub struct Qemu {
    pub child: Child,
    pub console: PathBuf,
}

/// QEMU arguments for a q35 TCG guest with shared memory (needed by vhost-user).
/// `cryptomgr.notests`: the kernel's crypto self-tests once stalled a TCG vCPU for many
/// minutes (soft lockup in `cryptomgr_test`) on a loaded host; the guest needs none.
/// `no_timer_check`: at load average 20 the kernel's IO-APIC timer check failed twice in
/// a row under TCG ("Kernel panic - not syncing: IO-APIC + timer doesn't work!") before
/// the test's first round (2026-12-03, tests/crash.rs); the timer works, the check's
/// timing window does not hold on an overloaded host.
pub fn base_args(g: &Guest, initrd: &Path, mem_mib: u32) -> Vec<String> {
    [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-smp",
        "2",
        "-m",
        &format!("{mem_mib}"),
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-numa",
        "node,memdev=mem",
        "-kernel",
        g.kernel.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-append",
        "console=ttyS0 quiet panic=-1 cryptomgr.notests no_timer_check",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A vhost-user-blk disk on `sock` with `num_queues` queues (`reconnect`: QEMU reconnects
/// to the socket when the backend goes away).
pub fn vhost_blk_args(id: &str, sock: &Path, num_queues: u16, reconnect: bool) -> Vec<String> {
    let mut chardev = format!("socket,id={id},path={}", sock.display());
    if reconnect {
        chardev.push_str(",reconnect=1");
    }
    vec![
        "-chardev".into(),
        chardev,
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},num-queues={num_queues}"),
    ]
}

impl Qemu {
    /// Start `qemu-system-x86_64` with `args`, console to `dir/console.log`.
    pub fn spawn(dir: &Path, args: &[String]) -> Qemu {
        let console = dir.join("console.log");
        let f = std::fs::File::create(&console).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("qemu-system-x86_64 is not installed");
        Qemu { child, console }
    }

    /// The console so far.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Wait until the console contains `needle`; panics with the console after `timeout`
    /// or if QEMU exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            let text = self.console_text();
            if text.contains(needle) {
                return text;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let text = self.console_text();
                if text.contains(needle) {
                    return text;
                }
                panic!("QEMU exited ({st}) before {needle:?}; console:\n{text}");
            }
            assert!(
                t.elapsed() < timeout,
                "no {needle:?} within {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait for the guest's script to finish; returns (exit code, console).
    pub fn wait_exit(&mut self, timeout: Duration) -> (i32, String) {
        let text = self.wait_for("EMBER-GUEST-EXIT rc=", timeout);
        let rc = text
            .split("EMBER-GUEST-EXIT rc=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (rc, text)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
