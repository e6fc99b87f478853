//! Hostile NBD clients against a real `emberd serve`, from real sockets (issue 11).
//!
//! Each test starts its own daemon with small, known limits ([`LIMITS`]), creates two
//! volumes and attaches both over NBD: `victim` (attacked) and `other`. It then runs one
//! attack with a raw client that misbehaves (never reads its replies, trickles its
//! handshake, opens connection after connection, sends absurd options, stalls halfway
//! through a write) and checks that:
//!
//! - emberd answers or drops that client, and logs why;
//! - emberd stays within its NBD memory budget: its resident memory (`VmHWM` and sampled
//!   `VmRSS` of `/proc/PID/status`) grows by less than `--nbd-memory-mib` plus a margin for
//!   allocator slack; the figures are printed (`cargo test -- --nocapture`);
//! - a well-behaved client (`qemu-io`, writing then verifying a pattern) on the `other`
//!   export is served *during* the attack.
//!
//! Attackers that must not share a per-peer bound with the good client connect over TCP
//! from 127.0.0.2 (a different peer address than the good client's 127.0.0.1).
//!
//! To see these tests fail on a build without the bounds, point `EMBER_HOSTILE_EMBERD` at
//! that build's `emberd` and set `EMBER_HOSTILE_LEGACY=1` (which leaves out the `--nbd-*`
//! limit flags it would not know).

mod common;

use common::serve::ServeNode;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The limits every test runs under.
const LIMITS: &[&str] = &[
    "--nbd-memory-mib",
    "192",
    "--nbd-conn-memory-mib",
    "40",
    "--nbd-max-conns",
    "32",
    "--nbd-max-conns-per-peer",
    "8",
    "--nbd-handshake-timeout-secs",
    "5",
    "--nbd-stall-timeout-secs",
    "8",
];
/// `--nbd-memory-mib` above, in KiB.
const BUDGET_KIB: u64 = 192 << 10;
/// Allocator slack allowed on top of the budget (freed memory the allocator keeps).
const SLACK_KIB: u64 = 48 << 10;
const STALL: Duration = Duration::from_secs(8);
const HANDSHAKE: Duration = Duration::from_secs(5);

fn legacy() -> bool {
    std::env::var_os("EMBER_HOSTILE_LEGACY").is_some()
}

fn emberd() -> PathBuf {
    std::env::var_os("EMBER_HOSTILE_EMBERD")
        .map(PathBuf::from)
        .unwrap_or_else(emberd_bin)
}

/// A running `emberd serve` with two NBD-attached volumes.
struct Node {
    serve: ServeNode,
    sock: PathBuf,
    tcp: String,
    victim: String,
    other: String,
}

impl Node {
    fn start() -> Node {
        require_tool("qemu-io");
        let tcp = format!("127.0.0.1:{}", free_port());
        let mut extra = vec!["--nbd", tcp.as_str()];
        if !legacy() {
            extra.extend(LIMITS);
        }
        let serve = ServeNode::start_bin_temp(&emberd(), &extra);
        let mut exports = ["victim", "other"].map(|name| {
            let id = serve.volume(name, 1, None);
            serve.attach(&id, "nbd")["export_name"]
                .as_str()
                .expect("export name")
                .to_string()
        });
        Node {
            sock: serve.nbd_sock.clone(),
            serve,
            tcp,
            victim: std::mem::take(&mut exports[0]),
            other: std::mem::take(&mut exports[1]),
        }
    }

    fn pid(&self) -> u32 {
        self.serve.pid()
    }

    fn log(&self) -> String {
        self.serve.log()
    }

    /// `(VmRSS, VmHWM)` in KiB.
    fn mem(&self) -> (u64, u64) {
        self.serve.mem_kib()
    }

    /// Sample VmRSS every 50 ms until the returned guard is dropped; it reports the peak.
    fn watch(&self) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p, pid) = (stop.clone(), peak.clone(), self.pid());
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = st
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        p.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watch {
            stop,
            peak,
            thread: Some(t),
            base: self.mem().0,
        }
    }

    /// The good client: qemu-io writes a pattern to `other` and reads it back, through
    /// `uri` (a Unix or TCP URI of the `other` export). Panics if it fails or hangs.
    fn serve_other(&self, uri: &str, pattern: u8) {
        let out = Command::new("timeout")
            .args(["120", "qemu-io", "-f", "raw"])
            .args(["-c", &format!("write -P {pattern:#x} 1M 256k")])
            .args(["-c", &format!("read -P {pattern:#x} 1M 256k")])
            .arg(uri)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("failed") && !text.contains("verification"),
            "the good client was not served during the attack: {text}\nemberd log:\n{}",
            self.log()
        );
    }

    fn other_unix(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.other, self.sock.display())
    }

    fn other_tcp(&self) -> String {
        format!("nbd://{}/{}", self.tcp, self.other)
    }

    /// Wait for `text` in the log (up to `limit`).
    fn wait_log(&self, text: &str, limit: Duration) {
        let t = Instant::now();
        while !self.log().contains(text) {
            assert!(
                t.elapsed() < limit,
                "{text:?} not logged within {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running RSS sampler.
struct Watch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    base: u64,
}

impl Watch {
    /// Stop sampling; print and check the figures: the peak RSS and VmHWM may exceed the
    /// RSS before the attack by at most the budget and the slack.
    fn check(mut self, node: &Node, attack: &str) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let (rss, hwm) = node.mem();
        let peak = self.peak.load(Ordering::Relaxed).max(rss);
        eprintln!(
            "RSS {attack}: before {} KiB, peak sampled {} KiB, VmHWM {} KiB, after {} KiB \
             (growth {} KiB, budget {BUDGET_KIB} KiB)",
            self.base,
            peak,
            hwm,
            rss,
            hwm.saturating_sub(self.base)
        );
        assert!(
            hwm.saturating_sub(self.base) <= BUDGET_KIB + SLACK_KIB,
            "{attack}: emberd grew from {} KiB to {hwm} KiB, beyond its budget",
            self.base
        );
    }
}

// ------------------------------------------------------------------ a raw NBD client

/// A client socket, Unix or TCP.
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sock {
    fn unix(node: &Node) -> Sock {
        let s = UnixStream::connect(&node.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Sock::Unix(s)
    }

    /// A TCP connection from 127.0.0.2: another peer than the good client.
    fn tcp_from_2(node: &Node) -> Sock {
        Sock::tcp_from(node, 2)
    }

    /// A TCP connection from 127.0.0.`host`.
    fn tcp_from(node: &Node, host: u8) -> Sock {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let from: SocketAddr = format!("127.0.0.{host}:0").parse().unwrap();
        s.bind(&from.into()).unwrap();
        let to: SocketAddr = node.tcp.parse().unwrap();
        s.connect(&to.into()).unwrap();
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        Sock::Tcp(s)
    }

    fn set_read_timeout(&self, d: Duration) {
        match self {
            Sock::Unix(s) => s.set_read_timeout(Some(d)).unwrap(),
            Sock::Tcp(s) => s.set_read_timeout(Some(d)).unwrap(),
        }
    }

    fn set_write_timeout(&self, d: Option<Duration>) {
        match self {
            Sock::Unix(s) => s.set_write_timeout(d).unwrap(),
            Sock::Tcp(s) => s.set_write_timeout(d).unwrap(),
        }
    }

    /// Shrink the receive buffer: the replies back up sooner.
    fn small_rcvbuf(&self) {
        let r = match self {
            Sock::Unix(s) => socket2::SockRef::from(s).set_recv_buffer_size(4096),
            Sock::Tcp(s) => socket2::SockRef::from(s).set_recv_buffer_size(4096),
        };
        r.unwrap();
    }

    /// Read the greeting and send the client flags.
    fn greet(&mut self) -> std::io::Result<()> {
        let mut g = [0u8; 18];
        self.read_exact(&mut g)?;
        assert_eq!(&g[..8], b"NBDMAGIC");
        self.write_all(&3u32.to_be_bytes())
    }

    fn option(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write_all(&b)
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self) -> std::io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.read_exact(&mut h)?;
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.read_exact(&mut d)?;
        Ok((ty, d))
    }

    /// `NBD_OPT_GO` to `name`: Ok, or the error reply's type and message.
    fn go(&mut self, name: &str) -> Result<(), (u32, String)> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d).map_err(|e| (0, e.to_string()))?;
        loop {
            let (ty, d) = self.option_reply().map_err(|e| (0, e.to_string()))?;
            if ty >= 0x8000_0000 {
                return Err((ty, String::from_utf8_lossy(&d).into_owned()));
            }
            if ty == 1 {
                return Ok(());
            }
        }
    }

    /// Connected and in transmission on `name`.
    fn open(mut self, name: &str) -> Sock {
        self.greet().unwrap();
        self.go(name).unwrap();
        self
    }

    fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.write_all(&b)
    }

    /// Whether the server hung up within `limit`, seen without reading (reading would
    /// make a deaf client a listening one).
    fn hung_up_within(&self, limit: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        };
        let t = Instant::now();
        while t.elapsed() < limit {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: `p` is a valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&raw mut p, 1, 200) };
            if r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return true;
            }
        }
        false
    }

    /// Read until EOF or error (the server closed us): true if closed within `limit`.
    fn closed_within(&mut self, limit: Duration) -> bool {
        let t = Instant::now();
        self.set_read_timeout(Duration::from_millis(500));
        let mut b = vec![0u8; 1 << 16];
        while t.elapsed() < limit {
            match self.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// Send requests (request `i` from `make`) and read nothing, until the server stops
/// reading (a write blocks for 3 s) or `limit` passes. Returns whether it stopped
/// reading.
fn flood_without_reading(
    s: &mut Sock,
    limit: Duration,
    mut make: impl FnMut(u64) -> (u16, u32),
) -> bool {
    s.set_write_timeout(Some(Duration::from_secs(3)));
    let t = Instant::now();
    let mut batch = Vec::new();
    let mut i = 0u64;
    while t.elapsed() < limit {
        batch.clear();
        for _ in 0..256 {
            let (cmd, len) = make(i);
            batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes());
            batch.extend_from_slice(&cmd.to_be_bytes());
            batch.extend_from_slice(&i.to_be_bytes());
            batch.extend_from_slice(&((i % 1024) << 20).to_be_bytes());
            batch.extend_from_slice(&len.to_be_bytes());
            i += 1;
        }
        match s.write_all(&batch) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return true,
            Err(_) => return false,
        }
    }
    false
}

// ------------------------------------------------------------------ attacks

#[test]
fn clients_that_never_read_their_replies() {
    let node = Node::start();
    let watch = node.watch();
    // Four connections send cheap requests (CACHE, zero-length reads, unknown commands)
    // and 256 KiB reads, and never read a reply.
    let attackers: Vec<_> = (0..4)
        .map(|k| {
            let mut s = Sock::unix(&node).open(&node.victim);
            s.small_rcvbuf();
            std::thread::spawn(move || {
                let blocked =
                    flood_without_reading(&mut s, Duration::from_secs(30), |i| match (i + k) % 4 {
                        0 => (5, 4096),
                        1 => (0, 0),
                        2 => (77, 0),
                        _ => (0, 256 << 10),
                    });
                (s, blocked)
            })
        })
        .collect();
    let mut socks = Vec::new();
    for a in attackers {
        let (s, blocked) = a.join().unwrap();
        assert!(
            blocked,
            "emberd kept reading from a client that reads nothing"
        );
        socks.push(s);
    }
    // The server stopped reading them; another export is served meanwhile.
    node.serve_other(&node.other_unix(), 0x11);
    watch.check(&node, "replies never read (4 connections)");
    // At the stall deadline they are dropped, with the reason in the log.
    for s in &socks {
        assert!(s.hung_up_within(STALL * 4), "a deaf client was not dropped");
    }
    node.wait_log("has not read its replies", Duration::from_secs(10));
    node.serve_other(&node.other_unix(), 0x12);
}

#[test]
fn handshakes_trickled_a_byte_at_a_time() {
    let node = Node::start();
    let watch = node.watch();
    // 300 handshakes from 127.0.0.2, more than a listener ever allowed in all, each
    // sending a byte every second: the flags, then an endless option.
    let mut socks: Vec<Sock> = (0..300).map(|_| Sock::tcp_from_2(&node)).collect();
    let script: Vec<u8> = 3u32
        .to_be_bytes()
        .into_iter()
        .chain(*b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x01\x00")
        .chain(std::iter::repeat_n(0u8, 256))
        .collect();
    let started = Instant::now();
    let mut greeted = vec![false; socks.len()];
    let mut closed_at: Vec<Option<Duration>> = vec![None; socks.len()];
    for s in &socks {
        s.set_read_timeout(Duration::from_millis(1));
    }
    // A good client from another address is served while they trickle.
    let good = {
        let uri = node.other_tcp();
        let tcp = node.tcp.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            let out = Command::new("timeout")
                .args(["60", "qemu-io", "-f", "raw", "-c", "write -P 0x21 0 64k"])
                .args(["-c", "read -P 0x21 0 64k", &uri])
                .output()
                .unwrap();
            (out, tcp)
        })
    };
    let mut step = 0;
    while started.elapsed() < HANDSHAKE * 3 {
        for (i, s) in socks.iter_mut().enumerate() {
            if closed_at[i].is_some() {
                continue;
            }
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => closed_at[i] = Some(started.elapsed()),
                Ok(n) => greeted[i] |= n > 0,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => closed_at[i] = Some(started.elapsed()),
            }
            if closed_at[i].is_none()
                && step < script.len()
                && s.write_all(&script[step..step + 1]).is_err()
            {
                closed_at[i] = Some(started.elapsed());
            }
        }
        step += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    let (out, _) = good.join().unwrap();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "the good client was locked out: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    let admitted = greeted.iter().filter(|&&g| g).count();
    eprintln!(
        "trickle: {admitted} of {} handshakes greeted, {} closed within {:?}",
        socks.len(),
        closed_at.iter().filter(|c| c.is_some()).count(),
        HANDSHAKE * 3
    );
    assert!(
        admitted <= 8,
        "{admitted} handshakes of one peer in progress at once"
    );
    // Every trickler is closed, the greeted ones by the handshake's deadline.
    for (i, c) in closed_at.iter().enumerate() {
        let c = c.unwrap_or_else(|| panic!("trickler {i} still open after {:?}", HANDSHAKE * 3));
        if greeted[i] {
            assert!(c < HANDSHAKE * 2, "trickler {i} lasted {c:?}");
        }
    }
    node.wait_log("handshake deadline passed", Duration::from_secs(10));
    node.wait_log(
        "handshakes in progress from this peer",
        Duration::from_secs(10),
    );
    watch.check(&node, "trickled handshakes (300 connections)");
    drop(socks);
    node.serve_other(&node.other_unix(), 0x22);
}

#[test]
fn huge_option_lengths_and_endless_options() {
    let node = Node::start();
    let watch = node.watch();
    // An option announcing 4 GiB of data: NBD_REP_ERR_TOO_BIG, then closed.
    let mut s = Sock::unix(&node);
    s.greet().unwrap();
    s.write_all(b"IHAVEOPT\x00\x00\x00\x07\xff\xff\xff\xff")
        .unwrap();
    let (ty, _) = s.option_reply().unwrap();
    assert_eq!(ty, 0x8000_0009, "NBD_REP_ERR_TOO_BIG");
    assert!(s.closed_within(Duration::from_secs(10)));
    // Options without end: answered up to the bound, then closed.
    let mut s = Sock::unix(&node);
    s.greet().unwrap();
    let mut w = match &s {
        Sock::Unix(u) => Sock::Unix(u.try_clone().unwrap()),
        Sock::Tcp(_) => unreachable!(),
    };
    let writer = std::thread::spawn(move || {
        for _ in 0..5000 {
            if w.option(99, &[0; 16]).is_err() {
                return;
            }
        }
    });
    let mut answered = 0;
    while let Ok((ty, _)) = s.option_reply() {
        assert_eq!(ty, 0x8000_0001, "NBD_REP_ERR_UNSUP");
        answered += 1;
    }
    writer.join().unwrap();
    eprintln!("endless options: {answered} answered before the server hung up");
    assert!(
        answered <= 1024,
        "{answered} options answered in one handshake"
    );
    node.wait_log("more than 1024 options", Duration::from_secs(10));
    node.serve_other(&node.other_unix(), 0x31);
    watch.check(&node, "huge and endless options");
}

#[test]
fn a_flood_of_connections() {
    let node = Node::start();
    let watch = node.watch();
    // 20 connections of one peer (127.0.0.2): 8 get in, the rest are refused at GO
    // with the reason.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..20 {
        let mut s = Sock::tcp_from_2(&node);
        s.greet().unwrap();
        match s.go(&node.victim) {
            Ok(()) => held.push(s),
            Err((ty, msg)) => refused.push((ty, msg)),
        }
    }
    eprintln!(
        "flood from one peer: {} admitted, {} refused",
        held.len(),
        refused.len()
    );
    assert_eq!(held.len(), 8);
    assert!(refused
        .iter()
        .all(|(ty, m)| *ty == 0x8000_0002 && m.contains("too many NBD connections")));
    // Another peer is served meanwhile.
    node.serve_other(&node.other_tcp(), 0x41);
    // Connections from three more peers fill the total (32) ...
    for host in [3, 4, 5] {
        for _ in 0..8 {
            let mut s = Sock::tcp_from(&node, host);
            s.greet().unwrap();
            match s.go(&node.victim) {
                Ok(()) => held.push(s),
                Err((_, m)) => panic!("refused before the total was reached: {m}"),
            }
        }
    }
    let mut s = Sock::tcp_from(&node, 6);
    s.greet().unwrap();
    let (ty, m) = s.go(&node.victim).unwrap_err();
    assert_eq!(ty, 0x8000_0002, "{m}");
    assert!(m.contains("limit 32"), "{m}");
    // ... and the next client, whoever it is, gets a clear refusal, not a hang.
    let out = Command::new("timeout")
        .args([
            "60",
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            &node.other_unix(),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "served beyond the connection cap: {text}"
    );
    assert!(text.contains("too many NBD connections"), "{text}");
    // The flood ends: service resumes.
    drop(held);
    let t = Instant::now();
    loop {
        let mut s = Sock::unix(&node);
        s.greet().unwrap();
        if s.go(&node.other).is_ok() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "places not freed");
        std::thread::sleep(Duration::from_millis(100));
    }
    node.serve_other(&node.other_unix(), 0x42);
    node.wait_log("too many NBD connections", Duration::from_secs(10));
    watch.check(&node, "connection flood (52 connections)");
}

#[test]
fn writes_stalled_halfway() {
    let node = Node::start();
    let watch = node.watch();
    // Eight clients of one peer each announce a 32 MiB write, send 1 MiB of it, and
    // stop; two keep trickling a byte a second, which does not reset the deadline.
    let mut socks: Vec<Sock> = (0..8)
        .map(|_| {
            let mut s = Sock::tcp_from_2(&node).open(&node.victim);
            s.request(1, 1, 0, 32 << 20).unwrap();
            s.write_all(&vec![0xee; 1 << 20]).unwrap();
            s
        })
        .collect();
    let started = Instant::now();
    node.serve_other(&node.other_tcp(), 0x51);
    node.serve_other(&node.other_unix(), 0x52);
    let mut dropped: Vec<Option<Duration>> = vec![None; socks.len()];
    while started.elapsed() < STALL * 4 && dropped.iter().any(|d| d.is_none()) {
        for (i, s) in socks.iter_mut().enumerate() {
            if dropped[i].is_some() {
                continue;
            }
            if i < 2 && s.write_all(&[0xee]).is_err() {
                dropped[i] = Some(started.elapsed());
                continue;
            }
            s.set_read_timeout(Duration::from_millis(10));
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => dropped[i] = Some(started.elapsed()),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                _ => dropped[i] = Some(started.elapsed()),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("stalled writes dropped after {dropped:?}");
    // A stalled write's deadline starts when the daemon admits its request: the budget
    // admits a few 32 MiB writes at a time (the rest wait, back-pressure), so they are
    // dropped in waves of STALL each (seen: 3, 3 and 2 writers at 8, 16 and 24 s).
    for (i, d) in dropped.iter().enumerate() {
        let d = d.unwrap_or_else(|| panic!("stalled writer {i} was never dropped"));
        assert!(d < STALL * 4, "stalled writer {i} lasted {d:?}");
    }
    node.wait_log("left a request half sent", Duration::from_secs(10));
    node.serve_other(&node.other_unix(), 0x53);
    watch.check(&node, "writes stalled halfway (8 connections)");
    // Nothing of the stalled writes reached the disk.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0 0 1M"])
        .arg(format!(
            "nbd+unix:///{}?socket={}",
            node.victim,
            node.sock.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
