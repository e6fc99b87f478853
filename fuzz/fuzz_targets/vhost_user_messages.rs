//! vhost-user messages from a hostile frontend: bytes go over a real Unix socket into the
//! `vhost` crate's parser (`BackendReqHandler`) and from there into Ember's handler
//! (`BlkHandler`), its vrings and its queue workers (over a null device), as in
//! `emberd`. Any header, payload and sequence is allowed, with fds attached: eventfds,
//! memfds (holding the input itself, so rings placed in them read fuzzed bytes), pipes.
//! The handler must answer or refuse each message and end the session cleanly: no
//! panic (in the handler or a worker), no hang (every wait is bounded), no SIGBUS.
//!
//! Input: records of `[fd kind][12-byte header: request, flags, size][size bytes]`; the
//! last record may be cut short (then the crate sees a partial message). Fd kinds
//! (mod 7): none, an eventfd, a 1 MiB memfd, eventfd + memfd, a pipe, a 64 KiB memfd (a
//! region may claim more than the file holds), a Unix socket (the backend channel).
#![no_main]

use ember_blockdev::backend::null::NullDevice;
use ember_daemon::vhost::handler::BlkHandler;
use ember_daemon::vhost::worker::{Shared, Timeouts, WorkerHandle};
use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

type Export = (Arc<Shared>, Arc<Vec<WorkerHandle>>);

static EXPORT: OnceLock<Export> = OnceLock::new();

fn export() -> &'static Export {
    EXPORT.get_or_init(|| {
        let shared = Arc::new(Shared {
            dev: Arc::new(NullDevice::new(64 << 20, false)),
            read_only: false,
            id: *b"ember-fuzz-volume-00",
            writeback: AtomicBool::new(true),
            timeouts: Timeouts {
                drain: Duration::from_secs(2),
                reply: Duration::from_secs(5),
            },
        });
        let workers = (0..2)
            .map(|q| WorkerHandle::spawn(shared.clone(), q).expect("worker"))
            .collect();
        (shared, Arc::new(workers))
    })
}

fn memfd(len: u64, content: &[u8]) -> File {
    // SAFETY: memfd_create with a valid name; the fd is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    let n = content.len().min(len as usize);
    f.write_all(&content[..n]).unwrap();
    f
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with valid flags; the fd is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Send `bytes` with `fds` in one sendmsg (MSG_NOSIGNAL: a closed peer is an error, not
/// a SIGPIPE).
fn send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
    sock.send_with_fds(&[bytes], fds).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let (shared, workers) = export();
    let (front, back) = UnixStream::pair().unwrap();
    let handler = Arc::new(Mutex::new(BlkHandler::new(shared.clone(), workers.clone())));
    let mut conn = BackendReqHandler::from_stream(back, handler.clone());

    // Fds stay open on our side for the session (a frontend keeps its kick eventfds).
    let mut keep: Vec<OwnedFd> = Vec::new();
    let mut i = 0;
    let mut messages = 0;
    while i + 13 <= data.len() && messages < 64 {
        let kind = data[i] % 7;
        let hdr = &data[i + 1..i + 13];
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let end = (i + 13 + size.min(4096)).min(data.len());
        let bytes = &data[i + 1..end];
        i = end;
        messages += 1;
        let mut fds: Vec<OwnedFd> = Vec::new();
        match kind {
            1 => fds.push(eventfd()),
            2 => fds.push(memfd(1 << 20, data).into()),
            3 => {
                fds.push(eventfd());
                fds.push(memfd(1 << 20, data).into());
            }
            4 => {
                let mut p = [0; 2];
                // SAFETY: pipe2 fills two fds.
                if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
                    // SAFETY: both are fresh fds we own.
                    unsafe {
                        fds.push(OwnedFd::from_raw_fd(p[0]));
                        keep.push(OwnedFd::from_raw_fd(p[1]));
                    }
                }
            }
            5 => fds.push(memfd(64 << 10, data).into()),
            6 => {
                let (a, b) = UnixStream::pair().unwrap();
                fds.push(a.into());
                keep.push(b.into());
            }
            _ => {}
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if !send(&front, bytes, &raw) {
            break;
        }
        keep.extend(fds);
    }
    let _ = front.shutdown(std::net::Shutdown::Write);
    // Every message is handled or refused; the first error ends the session, as in
    // emberd (the crate reports EOF once our messages run out).
    for _ in 0..=messages {
        if conn.handle_request().is_err() {
            break;
        }
    }
    handler.lock().unwrap().disconnect();
    drop(conn);
    drop(keep);
});
