//! In-process tests of the whole server: a raw NBD client over a Unix socket against an
//! [`NbdServer`] exporting null devices (no external tools; those are in `tests/nbd.rs`).

use super::*;
use ember_blockdev::{open, BackendSpec, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

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
        ember_blockdev::DeviceInfo {
            size: 1 << 20,
            logical_block_size: 512,
            physical_block_size: 4096,
            max_transfer: 1 << 20,
            read_only: false,
            discard: true,
            write_zeroes: true,
            block_status: true,
        }
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
