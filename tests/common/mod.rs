//! Shared helpers for Ember's end-to-end tests (`tests/*.rs`, run by `cargo test`).
//!
//! Tests talk to a real `emberd` with real clients. A missing client is a failure with a
//! clear message (the README's test command installs every tool), never a silent skip.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the `emberd` binary under test.
pub fn emberd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_emberd"))
}

/// Fail loudly if `tool` is not on PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run scripts/install-test-deps.sh (the README's test command does)");
}

/// Run a command, return its output; panics with stdout/stderr if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command and return its output whatever its status.
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// A child process killed (SIGKILL) when dropped, unless it already exited.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Spawn `emberd` with `args`, logging to `dir/emberd.log`.
    pub fn spawn(dir: &Path, args: &[&str]) -> Daemon {
        Daemon::spawn_bin(&emberd_bin(), dir, args)
    }

    /// Spawn the `emberd` binary `bin` (another build, for A/B checks) with `args`.
    pub fn spawn_bin(bin: &Path, dir: &Path, args: &[&str]) -> Daemon {
        let log = dir.join(format!("emberd-{}.log", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn emberd");
        Daemon { child, log }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for exit up to `timeout`; returns the exit code (None if it did not exit).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stop with SIGTERM: panics unless it exits successfully within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) {
        self.signal(libc::SIGTERM);
        let st = self
            .wait_exit(timeout)
            .expect("emberd did not exit on SIGTERM");
        assert!(
            st.success(),
            "emberd exited with {st}; log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `path` exists (a socket appears), or panic after `timeout`.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until a TCP port accepts connections.
pub fn wait_for_tcp(addr: &str, timeout: Duration) {
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < timeout,
            "{addr} did not accept within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
}
pub mod serve;
