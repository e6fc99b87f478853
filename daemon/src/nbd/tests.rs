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
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
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
    proto::RequestHeader {
        flags: 0,
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
    let server = NbdServer::start(2).unwrap();
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
    let server = NbdServer::start(1).unwrap();
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
