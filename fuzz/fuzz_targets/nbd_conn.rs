//! The real NBD transmission phase, in process: one `NbdServer` (an I/O thread, io_uring,
//! a null export of 1 MiB, small limits) serves a socketpair whose client side writes
//! the input and reads every reply until the server hangs up (after `NBD_CMD_DISC`, a bad
//! magic, or the client's EOF). This drives `conn.rs` itself: receive-buffer compaction,
//! payloads split across receives, skipped payloads, back-pressure at the connection's
//! memory bound, and reply batching.
//!
//! The first input byte chooses structured replies (bit 0); at most 16 KiB of the rest
//! is sent (a few hundred requests of at most 1 MiB each keep one input well under
//! libFuzzer's timeout). Checked: no panic or sanitizer report; the server hangs up
//! within 8 s; with structured replies, the reply
//! stream is well formed (every chunk has the structured magic, the DONE flag, a length
//! that is really there, and a handle the client sent). Seeds: the client side of real
//! conversations after the handshake, captured through a proxy.
#![no_main]

use ember_blockdev::{open, BackendSpec, OpenOptions};
use ember_daemon::nbd::gate::Peer;
use ember_daemon::nbd::{proto, NbdLimitArgs, NbdLimits, NbdServer};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn server() -> &'static NbdServer {
    static S: OnceLock<NbdServer> = OnceLock::new();
    S.get_or_init(|| {
        let limits = NbdLimits::try_from(&NbdLimitArgs {
            nbd_memory_mib: Some(128),
            nbd_conn_memory_mib: Some(40),
            nbd_max_conns: Some(16),
            nbd_max_conns_per_peer: Some(16),
            ..NbdLimitArgs::default()
        })
        .expect("limits");
        let s = NbdServer::start(1, limits).expect("server");
        let dev = open(&BackendSpec::Null { size: 1 << 20 }, &OpenOptions::default())
            .expect("null device");
        s.add_export("", dev, false).expect("export");
        s
    })
}

/// Check a structured reply stream; returns the bytes that were not a whole chunk.
fn check_chunks(mut b: &[u8], handles: &HashSet<u64>) -> usize {
    while b.len() >= proto::CHUNK_HEADER_BYTES {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic == proto::SIMPLE_REPLY_MAGIC {
            // Replies to commands other than READ and BLOCK_STATUS are simple.
            let h = u64::from_be_bytes(b[8..16].try_into().unwrap());
            assert!(handles.contains(&h), "reply for a handle never sent: {h}");
            b = &b[16..];
            continue;
        }
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
        assert_ne!(b[5] & 1, 0, "chunk without DONE");
        let h = u64::from_be_bytes(b[8..16].try_into().unwrap());
        assert!(handles.contains(&h), "chunk for a handle never sent: {h}");
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        if b.len() < 20 + len {
            break;
        }
        b = &b[20 + len..];
    }
    b.len()
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let structured = ctl & 1 != 0;
    let input = &input[..input.len().min(16 << 10)];
    let s = server();
    let (mut c, srv) = UnixStream::pair().expect("socketpair");
    if s.adopt(srv.into(), "", structured, false, Peer::Unknown).is_err() {
        return;
    }
    // The handles the client sends (every 28-byte header that has the request magic is a
    // candidate: a superset of what the server parses).
    let mut handles = HashSet::new();
    for w in input.windows(proto::REQUEST_HEADER_BYTES) {
        if w[..4] == proto::REQUEST_MAGIC.to_be_bytes() {
            handles.insert(u64::from_be_bytes(w[8..16].try_into().unwrap()));
        }
    }
    c.set_nonblocking(true).expect("nonblocking");
    let mut sent = 0;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let t = Instant::now();
    let mut eof = false;
    let mut shut = false;
    while !eof {
        assert!(t.elapsed() < Duration::from_secs(8), "the server never hung up");
        let mut progress = false;
        if sent < input.len() {
            match c.write(&input[sent..]) {
                Ok(n) => {
                    sent += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => sent = input.len(),
            }
        }
        if sent == input.len() && !shut {
            // The client's EOF: the server finishes what it has, then hangs up.
            let _ = c.shutdown(std::net::Shutdown::Write);
            shut = true;
        }
        match c.read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => {
                if structured && got.len() < 1 << 20 {
                    got.extend_from_slice(&buf[..n]);
                }
                progress = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => eof = true,
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    if structured && got.len() < 1 << 20 {
        check_chunks(&got, &handles);
    }
    // Let the server free the connection before the next input.
    let t = Instant::now();
    while s.connections() > 0 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_micros(100));
    }
});
