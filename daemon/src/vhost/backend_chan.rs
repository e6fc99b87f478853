//! The backend → frontend channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`), used to tell
//! the frontend that the config space changed (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`),
//! e.g. after an online resize; QEMU then re-reads the config and interrupts the guest.
//!
//! The `vhost` crate (0.18) parses `SET_BACKEND_REQ_FD` and hands the handler a `Backend`
//! proxy, but that proxy cannot send `CONFIG_CHANGE_MSG` and hides its socket. So before
//! each message the connection thread *peeks* at the next header ([`peek_backend_fd`]):
//! on Linux, `recvmsg(MSG_PEEK)` on a Unix socket installs duplicates of the passed fds
//! and leaves the message queued for the crate to read as usual. For
//! `SET_BACKEND_REQ_FD` we keep the duplicate as our own end of the channel
//! ([`BackendChannel`]); every other peeked fd is closed at once.
//!
//! Sending is bounded: a frontend that stops answering (need-reply with `REPLY_ACK`) makes
//! [`BackendChannel::config_changed`] fail after its timeout instead of blocking forever.

use ember_blockdev::sys;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vhost::vhost_user::message::{BackendReq, FrontendReq};

/// Bytes of a vhost-user message header: request, flags, size (u32 LE each).
const HDR_LEN: usize = 12;
/// Protocol version 1 in the header flags.
const VERSION_1: u32 = 0x1;
/// Header flag: this is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flag: the sender wants a reply (REPLY_ACK).
const FLAG_NEED_REPLY: u32 = 0x8;

/// Peek at the next message on the connection `sock` without consuming it. If it is
/// `SET_BACKEND_REQ_FD` with one fd, return our own duplicate of that fd as a stream.
/// Blocks until data (or EOF) arrives; EOF and errors give `None` (the crate's own read
/// of the message reports them).
pub fn peek_backend_fd(sock: &UnixStream) -> Option<UnixStream> {
    let mut hdr = [0u8; HDR_LEN];
    // Every fd the kernel installed is owned in `fds`, so all are closed unless kept.
    let (n, mut fds) = sys::recv_with_fds(sock.as_fd(), &mut hdr, libc::MSG_PEEK).ok()?;
    if n < HDR_LEN {
        return None;
    }
    let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if request != u32::from(FrontendReq::SET_BACKEND_REQ_FD) || fds.len() != 1 {
        return None;
    }
    fds.pop().map(UnixStream::from)
}

/// Our end of a frontend's backend channel.
#[derive(Debug)]
pub struct BackendChannel {
    stream: UnixStream,
    /// REPLY_ACK was negotiated: every message asks for (and waits for) an ack.
    reply_ack: bool,
}

impl BackendChannel {
    /// Wrap the channel socket; `reply_ack`: REPLY_ACK was negotiated.
    pub fn new(stream: UnixStream, reply_ack: bool) -> Self {
        BackendChannel { stream, reply_ack }
    }

    /// Send `CONFIG_CHANGE_MSG`; with REPLY_ACK, wait up to `timeout` for the frontend's
    /// ack (the frontend re-reads the config over the main channel before it answers).
    pub fn config_changed(&mut self, timeout: Duration) -> io::Result<()> {
        let code = u32::from(BackendReq::CONFIG_CHANGE_MSG);
        let flags = VERSION_1 | if self.reply_ack { FLAG_NEED_REPLY } else { 0 };
        let mut hdr = [0u8; HDR_LEN];
        hdr[0..4].copy_from_slice(&code.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..12].copy_from_slice(&0u32.to_le_bytes());
        self.stream.set_write_timeout(Some(timeout))?;
        self.stream.write_all(&hdr)?;
        if !self.reply_ack {
            return Ok(());
        }
        self.stream.set_read_timeout(Some(timeout))?;
        let mut reply = [0u8; HDR_LEN + 8];
        self.stream.read_exact(&mut reply).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, "no ack from the frontend")
            } else {
                e
            }
        })?;
        let word =
            |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        if word(0) != code || word(4) & FLAG_REPLY == 0 || word(8) != 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed reply to CONFIG_CHANGE_MSG",
            ));
        }
        let mut v = [0u8; 8];
        v.copy_from_slice(&reply[HDR_LEN..]);
        match u64::from_le_bytes(v) {
            0 => Ok(()),
            e => Err(io::Error::other(format!(
                "the frontend failed to apply the config change ({e})"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Send `bytes` with one fd in SCM_RIGHTS.
    fn send_with_fd(sock: &UnixStream, bytes: &[u8], fd: &impl AsFd) {
        let n = sys::send_with_fds(sock.as_fd(), bytes, &[fd.as_fd()]).expect("sendmsg");
        assert_eq!(n, bytes.len());
    }

    fn header(code: u32, flags: u32, size: u32) -> Vec<u8> {
        [code, flags, size]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn peek_keeps_a_duplicate_and_leaves_the_message() {
        let (front, back) = UnixStream::pair().unwrap();
        let (chan_front, chan_back) = UnixStream::pair().unwrap();
        let code = u32::from(FrontendReq::SET_BACKEND_REQ_FD);
        send_with_fd(&front, &header(code, VERSION_1, 0), &chan_back);
        drop(chan_back);
        let mut dup = peek_backend_fd(&back).expect("the channel fd");
        // The message is still there for the real reader.
        let mut buf = [0u8; HDR_LEN];
        (&back).read_exact(&mut buf).unwrap();
        assert_eq!(&buf[..], &header(code, VERSION_1, 0)[..]);
        // Our duplicate talks to the frontend's end.
        dup.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        (&chan_front).read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");

        // Another message with an fd: nothing kept.
        let code = u32::from(FrontendReq::SET_VRING_KICK);
        let (a, _b) = UnixStream::pair().unwrap();
        send_with_fd(&front, &header(code, VERSION_1, 0), &a);
        assert!(peek_backend_fd(&back).is_none());
        // EOF: none.
        drop(front);
        let mut rest = [0u8; HDR_LEN];
        (&back).read_exact(&mut rest).unwrap();
        assert!(peek_backend_fd(&back).is_none());
    }

    #[test]
    fn config_change_with_and_without_ack() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let code = u32::from(BackendReq::CONFIG_CHANGE_MSG);
        // Without REPLY_ACK: just the header.
        BackendChannel::new(ours.try_clone().unwrap(), false)
            .config_changed(Duration::from_secs(5))
            .unwrap();
        let mut h = [0u8; HDR_LEN];
        (&theirs).read_exact(&mut h).unwrap();
        assert_eq!(&h[..], &header(code, VERSION_1, 0)[..]);

        // With REPLY_ACK: need-reply, then the ack (0 ok, else an error).
        let mut ch = BackendChannel::new(ours, true);
        for (value, ok) in [(0u64, true), (1u64, false)] {
            let t = theirs.try_clone().unwrap();
            let frontend = std::thread::spawn(move || {
                let mut h = [0u8; HDR_LEN];
                (&t).read_exact(&mut h).unwrap();
                assert_eq!(&h[..], &header(code, VERSION_1 | FLAG_NEED_REPLY, 0)[..]);
                let mut r = header(code, VERSION_1 | FLAG_REPLY, 8);
                r.extend_from_slice(&value.to_le_bytes());
                (&t).write_all(&r).unwrap();
            });
            assert_eq!(ch.config_changed(Duration::from_secs(30)).is_ok(), ok);
            frontend.join().unwrap();
        }

        // A frontend that never answers: a timeout, not a hang.
        let e = ch.config_changed(Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // A frontend that is gone: an error.
        drop(theirs);
        assert!(ch.config_changed(Duration::from_secs(5)).is_err());
    }
}
