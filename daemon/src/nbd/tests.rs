//! In-process tests of the whole server: a raw NBD client over a Unix socket against an
//! [`NbdServer`] exporting null devices (no external tools; those are in `tests/nbd.rs`).

use super::*;
use ember_blockdev::{open, BackendSpec, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::path::PathBuf;

#[test]
fn parses_listen_addrs() {
    assert_eq!(
        "unix:/tmp/x.sock".parse::<ListenAddr>().unwrap(),
        ListenAddr::Unix("/tmp/x.sock".into())
    );
    assert_eq!(
        "127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
        ListenAddr::Tcp("127.0.0.1:10809".into())
    );
    assert_eq!(
        "[::1]:0".parse::<ListenAddr>().unwrap(),
        ListenAddr::Tcp("[::1]:0".into())
    );
    assert!("unix:".parse::<ListenAddr>().is_err());
    assert!("localhost".parse::<ListenAddr>().is_err());
    assert!("localhost:http".parse::<ListenAddr>().is_err());
}

fn null(size: u64) -> Arc<dyn BlockDevice> {
    open(&BackendSpec::Null { size }, &OpenOptions::default()).unwrap()
}

fn opt(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Connect and GO to `name`; returns the stream or the first error reply type.
fn connect(path: &Path, name: &str) -> Result<UnixStream, u32> {
    connect_with(path, name, false)
}

/// Connect, optionally negotiate structured replies, and GO to `name`.
fn connect_with(path: &Path, name: &str, structured: bool) -> Result<UnixStream, u32> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    if structured {
        opt(&mut s, proto::opt::STRUCTURED_REPLY, &[]);
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(&h[12..16], &proto::rep::ACK.to_be_bytes());
    }
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut s, proto::opt::GO, &d);
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        if ty >= 0x8000_0000 {
            return Err(ty);
        }
        if ty == proto::rep::ACK {
            return Ok(s);
        }
    }
}

fn request(cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    request_flags(cmd, 0, handle, offset, len)
}

fn request_flags(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    proto::RequestHeader {
        flags,
        cmd,
        handle,
        offset,
        len,
    }
    .encode()
}

/// Read one simple reply (and `data` bytes after it): (error, handle).
fn reply(s: &mut UnixStream, data: usize) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    let err = u32::from_be_bytes(r[4..8].try_into().unwrap());
    if err == 0 && data > 0 {
        let mut d = vec![0u8; data];
        s.read_exact(&mut d).unwrap();
        assert!(d.iter().all(|&b| b == 0));
    }
    (err, u64::from_be_bytes(r[8..16].try_into().unwrap()))
}

#[test]
fn exports_come_and_go_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let server = NbdServer::start(2, NbdLimits::default()).unwrap();
    server.add_export("a", null(1 << 20), false).unwrap();
    server.add_export("b", null(1 << 20), true).unwrap();
    assert!(server.add_export("a", null(1), false).is_err());
    server.listen(&ListenAddr::Unix(path.clone())).unwrap();
    assert_eq!(server.export_names(), ["a", "b"]);

    let mut a = connect(&path, "a").unwrap();
    let mut b = connect(&path, "b").unwrap();
    a.write_all(&request(proto::cmd::READ, 1, 0, 4096)).unwrap();
    assert_eq!(reply(&mut a, 4096), (0, 1));
    // "b" is read-only: a write is refused (its payload skipped).
    b.write_all(&request(proto::cmd::WRITE, 2, 0, 512)).unwrap();
    b.write_all(&[1; 512]).unwrap();
    assert_eq!(reply(&mut b, 0), (proto::err::EPERM, 2));

    assert!(server.remove_export("a"));
    assert!(!server.remove_export("a"));
    let mut byte = [0u8; 1];
    assert!(
        matches!(a.read(&mut byte), Ok(0) | Err(_)),
        "a's connection survived removal"
    );
    assert_eq!(connect(&path, "a").err(), Some(proto::rep::ERR_UNKNOWN));
    // "b" is unaffected.
    b.write_all(&request(proto::cmd::READ, 3, 512, 512))
        .unwrap();
    assert_eq!(reply(&mut b, 512), (0, 3));
    server.add_export("a", null(1 << 20), false).unwrap();
    let mut a = connect(&path, "a").unwrap();
    a.write_all(&request(proto::cmd::FLUSH, 4, 0, 0)).unwrap();
    assert_eq!(reply(&mut a, 0), (0, 4));

    server.shutdown();
    assert!(!path.exists());
    assert!(matches!(b.read(&mut byte), Ok(0) | Err(_)));
}

#[test]
fn far_more_requests_than_the_in_flight_bound_all_get_replies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let server = NbdServer::start(1, NbdLimits::default()).unwrap();
    server.add_export("", null(1 << 30), false).unwrap();
    server.listen(&ListenAddr::Unix(path.clone())).unwrap();
    let s = connect(&path, "").unwrap();
    // 300 reads of 1 MiB: far more than the per-connection bounds. A writer thread sends
    // them all while this thread reads the replies; everything must arrive.
    const N: u64 = 300;
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            w.write_all(&request(proto::cmd::READ, i, (i % 1000) << 20, 1 << 20))
                .unwrap();
        }
    });
    let mut r = s;
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let (err, h) = reply(&mut r, 1 << 20);
        assert_eq!(err, 0);
        seen[h as usize] = true;
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|&x| x));
    server.shutdown();
}

/// A device whose every operation fails, each with its own errno.
#[derive(Debug)]
struct Failing;

struct FailingQueue {
    owner: ember_blockdev::OwnerId,
}

impl BlockDevice for Failing {
    fn info(&self) -> ember_blockdev::DeviceInfo {
        ember_blockdev::DeviceInfo::new(1 << 20, 1 << 20)
    }

    fn queue(
        self: Arc<Self>,
        ring: &mut ember_blockdev::Ring,
    ) -> ember_blockdev::Result<Box<dyn ember_blockdev::Queue>> {
        Ok(Box::new(FailingQueue {
            owner: ring.new_owner(),
        }))
    }

    fn block_status(&self, _: u64, _: u64) -> ember_blockdev::Result<Vec<ember_blockdev::Extent>> {
        Err(ember_blockdev::Error::new(
            ember_blockdev::ErrorKind::Io,
            "injected",
        ))
    }

    fn resize(&self, _: u64) -> ember_blockdev::Result<()> {
        Ok(())
    }
}

impl ember_blockdev::Queue for FailingQueue {
    fn owner(&self) -> ember_blockdev::OwnerId {
        self.owner
    }

    fn submit(
        &mut self,
        _: &mut ember_blockdev::Ring,
        req: ember_blockdev::Request,
        done: &mut Vec<ember_blockdev::Completion>,
    ) {
        use ember_blockdev::Op;
        let errno = match req.op {
            Op::Read => libc::EIO,
            Op::Write { .. } => libc::ENOSPC,
            Op::Flush => libc::EIO,
            Op::Discard => libc::EOPNOTSUPP,
            Op::WriteZeroes { unmap: true } => libc::EOPNOTSUPP,
            Op::WriteZeroes { unmap: false } => libc::ENOMEM,
        };
        done.push(ember_blockdev::Completion::of(req, Err(errno)));
    }

    fn complete(
        &mut self,
        _: &mut ember_blockdev::Ring,
        _: ember_blockdev::Cqe,
        _: &mut Vec<ember_blockdev::Completion>,
    ) {
    }

    fn in_flight(&self) -> usize {
        0
    }
}

#[test]
fn disk_errors_reach_the_client_as_nbd_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let server = NbdServer::start(1, NbdLimits::default()).unwrap();
    server.add_export("", Arc::new(Failing), false).unwrap();
    server.listen(&ListenAddr::Unix(path.clone())).unwrap();

    let mut s = connect(&path, "").unwrap();
    s.write_all(&request(proto::cmd::READ, 1, 0, 4096)).unwrap();
    assert_eq!(reply(&mut s, 0), (proto::err::EIO, 1));
    s.write_all(&request(proto::cmd::WRITE, 2, 0, 512)).unwrap();
    s.write_all(&[7; 512]).unwrap();
    assert_eq!(reply(&mut s, 0), (proto::err::ENOSPC, 2));
    s.write_all(&request(proto::cmd::FLUSH, 3, 0, 0)).unwrap();
    assert_eq!(reply(&mut s, 0), (proto::err::EIO, 3));
    // Trim is advisory: a device that cannot deallocate is not an error.
    s.write_all(&request(proto::cmd::TRIM, 4, 0, 512)).unwrap();
    assert_eq!(reply(&mut s, 0), (0, 4));
    // Write-zeroes that cannot deallocate is retried as a plain zeroing (which fails
    // here with its own errno), unless the client asked for a fast zero.
    s.write_all(&request(proto::cmd::WRITE_ZEROES, 5, 0, 512))
        .unwrap();
    assert_eq!(reply(&mut s, 0), (proto::err::ENOMEM, 5));
    let fast = proto::cmd_flag::FAST_ZERO;
    s.write_all(&request_flags(proto::cmd::WRITE_ZEROES, fast, 8, 0, 512))
        .unwrap();
    assert_eq!(reply(&mut s, 0), (proto::err::ENOTSUP, 8));
    let no_hole = proto::cmd_flag::FAST_ZERO | proto::cmd_flag::NO_HOLE;
    s.write_all(&request_flags(proto::cmd::WRITE_ZEROES, no_hole, 9, 0, 512))
        .unwrap();
    assert_eq!(reply(&mut s, 0), (proto::err::ENOTSUP, 9));

    // With structured replies a failed read is an error chunk.
    let mut s = connect_with(&path, "", true).unwrap();
    s.write_all(&request(proto::cmd::READ, 6, 0, 4096)).unwrap();
    let mut c = [0u8; 26];
    s.read_exact(&mut c).unwrap();
    assert_eq!(&c[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&c[4..8], &[0, 1, 0x80, 1]); // DONE, ERROR
    assert_eq!(&c[8..16], &6u64.to_be_bytes());
    assert_eq!(&c[20..24], &proto::err::EIO.to_be_bytes());
    // Block status without a selected context is refused.
    s.write_all(&request(proto::cmd::BLOCK_STATUS, 7, 0, 4096))
        .unwrap();
    s.read_exact(&mut c).unwrap();
    assert_eq!(&c[20..24], &proto::err::EINVAL.to_be_bytes());
    server.shutdown();
}

// ------------------------------------------------------------------ hostile clients

/// Small limits for the tests: `memory` MiB in all, 40 MiB per connection.
fn limits(memory_mib: u64, max_conns: usize, stall_secs: u64) -> NbdLimits {
    NbdLimits::try_from(&NbdLimitArgs {
        nbd_memory_mib: Some(memory_mib),
        nbd_conn_memory_mib: Some(40),
        nbd_max_conns: Some(max_conns),
        nbd_max_conns_per_peer: Some(max_conns),
        nbd_handshake_timeout_secs: Some(2),
        nbd_stall_timeout_secs: Some(stall_secs),
    })
    .unwrap()
}

fn server(threads: usize, limits: NbdLimits) -> (NbdServer, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let server = NbdServer::start(threads, limits).unwrap();
    server.add_export("", null(1 << 30), false).unwrap();
    server.add_export("other", null(1 << 30), false).unwrap();
    server.listen(&ListenAddr::Unix(path.clone())).unwrap();
    (server, dir, path)
}

/// Wait until `f` holds, up to 30 s.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send requests built by `make` (request i) without reading a single reply, until the
/// server stops reading (a write blocks for 2 s). Returns how many were sent whole.
fn send_until_blocked(s: &UnixStream, mut make: impl FnMut(u64) -> [u8; 28]) -> u64 {
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut i = 0u64;
    loop {
        let r = make(i);
        let mut off = 0;
        while off < r.len() {
            match w.write(&r[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(i > 100, "blocked after only {i} requests");
                    // Finish the partial request so the stream stays framed.
                    w.set_write_timeout(None).unwrap();
                    if off > 0 {
                        w.write_all(&r[off..]).unwrap_or(());
                        return i + 1;
                    }
                    return i;
                }
                Err(e) => panic!("send: {e}"),
            }
        }
        i += 1;
    }
}

#[test]
fn a_client_that_never_reads_its_replies_is_bounded_and_loses_nothing() {
    let (server, _dir, path) = server(1, limits(256, 16, 600));
    let base = server.memory_used();
    let s = connect(&path, "").unwrap();
    // Cheap requests that need no disk: CACHE, zero-length reads, unknown commands, and
    // reads of 256 KiB. None of the replies is read.
    let sent = send_until_blocked(&s, |i| match i % 4 {
        0 => request(proto::cmd::CACHE, i, 0, 4096),
        1 => request(proto::cmd::READ, i, 0, 0),
        2 => request(77, i, 0, 0),
        _ => request(proto::cmd::READ, i, (i % 512) << 20, 256 << 10),
    });
    // What the connection holds is within its own limit (40 MiB), whatever it sent.
    let used = server.memory_used() - base;
    assert!(used <= 40 << 20, "connection holds {used} bytes");
    // Another client, on another export, is served meanwhile.
    let mut other = connect(&path, "other").unwrap();
    other
        .write_all(&request(proto::cmd::READ, 9, 0, 65536))
        .unwrap();
    assert_eq!(reply(&mut other, 65536), (0, 9));
    // Every request the server took is answered, in full, once the client reads.
    let mut r = s;
    let mut seen = vec![false; sent as usize];
    for _ in 0..sent {
        let mut h = [0u8; 16];
        r.read_exact(&mut h).unwrap();
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let want = match handle % 4 {
            0 | 1 => 0,
            2 => proto::err::EINVAL,
            _ => 0,
        };
        assert_eq!(err, want, "handle {handle}");
        if handle % 4 == 3 {
            let mut d = vec![0u8; 256 << 10];
            r.read_exact(&mut d).unwrap();
        }
        assert!(!seen[handle as usize], "two replies for {handle}");
        seen[handle as usize] = true;
    }
    eventually("charges given back", || {
        server.memory_used() - base <= 2 << 20
    });
    server.shutdown();
}

#[test]
fn connections_share_the_budget_and_small_requests_always_progress() {
    // 96 MiB: pools (12 MiB), 16 floors (24 MiB), and a shared 60 MiB: less than what
    // three connections of 40 MiB would hold.
    let (server, _dir, path) = server(1, limits(96, 16, 600));
    let limit = server.limits().memory_bytes;
    let base = server.memory_used();
    // Each sends 60 reads of 1 MiB and reads nothing: together they want 180 MiB.
    const N: u64 = 60;
    let mut hogs: Vec<UnixStream> = (0..3).map(|_| connect(&path, "").unwrap()).collect();
    for s in &mut hogs {
        for i in 0..N {
            s.write_all(&request(proto::cmd::READ, i, i << 20, 1 << 20))
                .unwrap();
        }
    }
    eventually("the shared budget spent", || {
        server.memory_used() + (2 << 20) >= limit
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.memory_used() <= limit);
    assert!(server.memory_used() - base <= 64 << 20);
    // The budget is spent, yet a small request of a new client goes through (its
    // connection's floor), on either export.
    for name in ["", "other"] {
        let mut c = connect(&path, name).unwrap();
        c.write_all(&request(proto::cmd::READ, 1, 4096, 4096))
            .unwrap();
        assert_eq!(reply(&mut c, 4096), (0, 1));
    }
    // Drain the hogs: everything is answered.
    for mut s in hogs {
        for _ in 0..N {
            assert_eq!(reply(&mut s, 1 << 20).0, 0);
        }
    }
    eventually("charges given back", || server.memory_used() == base);
    server.shutdown();
}

#[test]
fn connections_beyond_the_cap_are_refused_at_go_with_the_reason() {
    let (server, _dir, path) = server(1, limits(256, 2, 600));
    let a = connect(&path, "").unwrap();
    let _b = connect(&path, "other").unwrap();
    // The third gets NBD_REP_ERR_POLICY and the reason.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    opt(&mut s, proto::opt::GO, &[0, 0, 0, 0, 0, 0]);
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[12..16], &proto::rep::ERR_POLICY.to_be_bytes());
    let mut msg = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut msg).unwrap();
    let msg = String::from_utf8(msg).unwrap();
    assert!(msg.contains("too many NBD connections"), "{msg}");
    assert_eq!(server.connections(), 2);
    // One leaves: the next one gets in.
    drop(a);
    eventually("a's place freed", || server.connections() == 1);
    let mut c = connect(&path, "").unwrap();
    c.write_all(&request(proto::cmd::FLUSH, 3, 0, 0)).unwrap();
    assert_eq!(reply(&mut c, 0), (0, 3));
    server.shutdown();
}

#[test]
fn stalled_readers_and_half_sent_requests_are_dropped_idle_clients_are_not() {
    let (server, _dir, path) = server(1, limits(256, 16, 2));
    let idle = connect(&path, "").unwrap();
    // Never reads: replies pile up, the send stalls.
    let deaf = connect(&path, "").unwrap();
    let _ = send_until_blocked(&deaf, |i| request(proto::cmd::READ, i, 0, 1 << 20));
    // Trickles a write payload, a byte every 300 ms: each byte is progress, the
    // request as a whole is not.
    let mut slow = connect(&path, "").unwrap();
    slow.write_all(&request(proto::cmd::WRITE, 1, 0, 1 << 20))
        .unwrap();
    let trickle = {
        let mut w = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..40 {
                if w.write_all(&[1]).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            false
        })
    };
    eventually("two dropped", || server.connections() == 1);
    assert!(trickle.join().unwrap(), "the trickler was not dropped");
    let mut b = [0u8; 1];
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(slow.read(&mut b), Ok(0) | Err(_)));
    // The idle one was never at fault and still works.
    let mut idle = idle;
    idle.write_all(&request(proto::cmd::READ, 5, 0, 512))
        .unwrap();
    assert_eq!(reply(&mut idle, 512), (0, 5));
    server.shutdown();
}

#[test]
fn handshakes_are_bounded_per_peer_and_in_time() {
    let (server, _dir, path) = server(1, limits(256, 16, 600));
    // The same uid opens more handshakes than a peer may have: the extra ones are
    // closed before any greeting.
    let mut held: Vec<UnixStream> = Vec::new();
    for _ in 0..limits::MAX_HANDSHAKES_PER_PEER {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        held.push(s);
    }
    eventually("all handshakes counted", || {
        server.handshakes() == limits::MAX_HANDSHAKES_PER_PEER
    });
    let mut extra = UnixStream::connect(&path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut g = [0u8; 18];
    assert!(
        extra.read_exact(&mut g).is_err(),
        "greeted beyond the bound"
    );
    // A trickling client keeps sending bytes, yet the handshake's single deadline (2 s)
    // ends it, and frees the places.
    let mut w = held[0].try_clone().unwrap();
    let t = std::time::Instant::now();
    std::thread::spawn(move || {
        for b in 3u32.to_be_bytes().into_iter().chain(*b"IHAVEOPT") {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    eventually("handshakes timed out", || server.handshakes() == 0);
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(connect(&path, "").is_ok());
    server.shutdown();
}

// ------------------------------------------------------------------ differential property

/// Read one reply, simple or structured: (handle, error, data bytes). A simple reply's
/// data length is not on the wire: `read_len` gives it by handle.
fn any_reply(s: &mut UnixStream, read_len: &HashMap<u64, usize>) -> (u64, u32, usize) {
    let mut m = [0u8; 4];
    s.read_exact(&mut m).unwrap();
    match u32::from_be_bytes(m) {
        proto::SIMPLE_REPLY_MAGIC => {
            let mut r = [0u8; 12];
            s.read_exact(&mut r).unwrap();
            let err = u32::from_be_bytes(r[..4].try_into().unwrap());
            let handle = u64::from_be_bytes(r[4..].try_into().unwrap());
            let len = if err == 0 {
                read_len.get(&handle).copied().unwrap_or(0)
            } else {
                0
            };
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).unwrap();
            (handle, err, len)
        }
        proto::STRUCTURED_REPLY_MAGIC => {
            let mut r = [0u8; 16];
            s.read_exact(&mut r).unwrap();
            let ty = u16::from_be_bytes([r[2], r[3]]);
            let handle = u64::from_be_bytes(r[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(r[12..16].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).unwrap();
            assert_ne!(r[1] & 1, 0, "every chunk is the last one");
            match ty {
                proto::reply_type::ERROR => {
                    (handle, u32::from_be_bytes(d[..4].try_into().unwrap()), 0)
                }
                proto::reply_type::OFFSET_DATA => (handle, 0, len - 8),
                _ => (handle, 0, 0),
            }
        }
        m => panic!("bad reply magic {m:#x}"),
    }
}

#[test]
fn property_the_server_answers_every_request_as_the_model_decides() {
    use super::request::{decide, Action, Session};
    use super::testgen::Rng;
    let server = NbdServer::start(1, NbdLimits::default()).unwrap();
    let dev = null(1 << 20);
    let info = dev.info();
    server.add_export("", dev, false).unwrap();
    let mut r = Rng::new(0x5eed_0004);
    for round in 0..60 {
        let structured = round % 2 == 1;
        let session = Session {
            max_block: MAX_BLOCK_BYTES.min(info.max_transfer),
            read_only: false,
            structured,
            meta: false,
        };
        let (a, b) = UnixStream::pair().unwrap();
        server
            .adopt(b.into(), "", structured, false, gate::Peer::Unknown)
            .unwrap();
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for k in 0..r.below(60) {
            let mut h = super::request::tests::random_header(&mut r, k);
            if h.cmd == proto::cmd::DISC || h.cmd == proto::cmd::BLOCK_STATUS {
                h.cmd = proto::cmd::FLUSH;
            }
            let act = decide(&h, &session, &info);
            if act.payload(&h) > 1 << 16 {
                continue;
            }
            stream.extend_from_slice(&h.encode());
            stream.extend((0..act.payload(&h)).map(|x| x as u8));
            let (err, data) = match act {
                Action::Reply { error, .. } => (error, 0),
                Action::Read => (0, h.len as usize),
                _ => (0, 0),
            };
            want.push((h.handle, err, data));
        }
        let mut w = a.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&stream).unwrap());
        let mut a = a;
        a.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let lens: HashMap<u64, usize> = want.iter().map(|w| (w.0, w.2)).collect();
        let mut got: Vec<_> = (0..want.len()).map(|_| any_reply(&mut a, &lens)).collect();
        writer.join().unwrap();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "round {round}");
    }
    server.shutdown();
}
