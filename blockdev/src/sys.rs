//! Safe wrappers over the plain syscalls and ioctls Ember makes, so their `unsafe` lives
//! in one place instead of at every call site.
//!
//! Each wrapper takes borrowed fds and owned or borrowed Rust values and passes the
//! kernel only pointers to memory it owns for the duration of the call (out-parameters on
//! its stack, the caller's slices): nothing here outlives the call, so none of these
//! needs an `unsafe` contract. Errors are the `errno` as an [`io::Error`].
//!
//! What stays outside, because its safety depends on memory that outlives a call: pushing
//! SQEs ([`Ring::push`](crate::engine::Ring::push)), reads and writes into borrowed
//! iovecs ([`IoVecs`](crate::buf::IoVecs)), shared-memory mappings (the vhost-user
//! inflight region) and the SIMD kernels of `ember-crypto`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKDISCARD: libc::c_ulong = 0x1277;

/// `Ok(r)` for a non-negative `r`, else the thread's `errno`.
fn check<T: Copy + PartialOrd + Default>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn blk_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into the pointed-to local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &raw mut size) })?;
    Ok(size)
}

/// Logical block size of a block device (`BLKSSZGET`).
pub fn blk_logical_block_size(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int into the pointed-to local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &raw mut lbs) })?;
    Ok(lbs)
}

/// Physical block size of a block device (`BLKPBSZGET`).
pub fn blk_physical_block_size(fd: BorrowedFd<'_>) -> io::Result<libc::c_uint> {
    let mut pbs: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int into the pointed-to local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), BLKPBSZGET, &raw mut pbs) })?;
    Ok(pbs)
}

/// Discard `[offset, offset + len)` of a block device (`BLKDISCARD`, synchronous).
pub fn blk_discard(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, a local array.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), BLKDISCARD, range.as_ptr()) })?;
    Ok(())
}

/// `lseek(2)`; `Ok(None)` for `ENXIO` (no data or hole past `off`).
pub fn lseek(fd: BorrowedFd<'_>, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a borrowed fd has no memory effects.
    match check(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) }) {
        Ok(r) => Ok(u64::try_from(r).ok()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file system type (`statfs.f_type`) of the file behind `fd`.
pub fn fs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, exclusively borrowed out-pointer; the fd is open.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), &raw mut st) })?;
    // f_type's width differs between architectures.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(st.f_type))
}

/// `poll(2)` over `fds`; the number of ready entries (0 on timeout). `EINTR` is an error
/// of kind [`io::ErrorKind::Interrupted`].
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `n` pollfd for the call.
    let r = check(unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) })?;
    Ok(r.unsigned_abs() as usize)
}

/// The credentials of the peer of a Unix socket (`SO_PEERCRED`).
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid out-pointers of the sizes given.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    })?;
    Ok(cred)
}

/// The address family of the socket `fd` (`getsockname`).
pub fn socket_family(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` and `len` are valid out-pointers sized as declared.
    check(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&raw mut ss).cast::<libc::sockaddr>(),
            &raw mut len,
        )
    })?;
    Ok(libc::c_int::from(ss.ss_family))
}

/// Set a socket's send buffer size (`SO_SNDBUF`).
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads a c_int from a live local.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Shut down both directions of a socket, waking every receive and send on it.
pub fn shutdown(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown(2) on a borrowed socket has no memory effects.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) })?;
    Ok(())
}

/// Add `O_NONBLOCK` to the file status flags of `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments only, on a borrowed fd.
    let fl = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    Ok(())
}

/// A new blocking, close-on-exec eventfd with a zero count.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let raw = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Add `n` to an eventfd's count (waking its readers).
pub fn eventfd_add(fd: BorrowedFd<'_>, n: u64) -> io::Result<()> {
    // SAFETY: writes 8 bytes from a live local u64.
    let r = check(unsafe { libc::write(fd.as_raw_fd(), (&raw const n).cast(), 8) })?;
    if r != 8 {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Most fds [`recv_with_fds`] takes from one message.
pub const MAX_RECV_FDS: usize = 16;

/// `recvmsg(2)` into `buf` with `flags` (plus `MSG_CMSG_CLOEXEC`), taking ownership of
/// every fd passed with `SCM_RIGHTS` (at most [`MAX_RECV_FDS`]; the kernel closes the
/// rest and sets `MSG_CTRUNC`). `EINTR` is retried. With `MSG_PEEK` the message stays
/// queued and the fds are duplicates.
pub fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 2 + MAX_RECV_FDS / 2];
    let want = (MAX_RECV_FDS * std::mem::size_of::<libc::c_int>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let cspace = unsafe { libc::CMSG_SPACE(want) } as usize;
    let cspace = cspace.min(std::mem::size_of_val(&cbuf));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null name, no iovecs); fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cspace as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `cbuf`, both alive for the call
        // and sized as declared.
        let r =
            unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        match check(r) {
            Ok(n) => break n.unsigned_abs(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros walk its control buffer
    // within `msg_controllen`, and every fd in an SCM_RIGHTS payload is a descriptor the
    // kernel just installed for us, owned by nobody else.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n, fds))
}

/// `sendmsg(2)` of `bytes` with `fds` passed in `SCM_RIGHTS` (at most
/// [`MAX_RECV_FDS`]); the bytes sent.
pub fn send_with_fds(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_RECV_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut cbuf = [0u64; 2 + MAX_RECV_FDS / 2];
    let payload = (fds.len() * std::mem::size_of::<libc::c_int>()) as u32;
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid; fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
        // SAFETY: the control buffer (`cbuf`, aligned, larger than CMSG_SPACE of the most
        // fds allowed) holds one cmsghdr with room for `fds.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
            let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for (i, f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov` (over `bytes`, only read) and `cbuf`, alive for the
    // call. sendmsg does not write through msg_iov.
    let n = check(unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) })?;
    Ok(n.unsigned_abs())
}

/// A set of signals blocked in the calling thread (and the threads it starts later),
/// to be waited for synchronously with [`SignalSet::wait`].
pub struct SignalSet(libc::sigset_t);

impl std::fmt::Debug for SignalSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalSet")
    }
}

impl SignalSet {
    /// Block `signals` in the calling thread and return them as a set.
    pub fn block(signals: &[libc::c_int]) -> io::Result<SignalSet> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
        check(unsafe { libc::sigemptyset(&raw mut set) })?;
        for &s in signals {
            // SAFETY: as above.
            check(unsafe { libc::sigaddset(&raw mut set, s) })?;
        }
        // SAFETY: pthread_sigmask only reads `set`; the old mask is not asked for.
        let r =
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(SignalSet(set))
    }

    /// Wait for one signal of the set; its number.
    pub fn wait(&self) -> libc::c_int {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: the set is initialised and `sig` is a valid out-pointer.
            if unsafe { libc::sigwait(&raw const self.0, &raw mut sig) } == 0 {
                return sig;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn eventfd_wakes_poll() {
        let efd = eventfd().expect("eventfd");
        let mut fds = [libc::pollfd {
            fd: efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(poll(&mut fds, 0).expect("poll"), 0);
        eventfd_add(efd.as_fd(), 1).expect("write");
        assert_eq!(poll(&mut fds, 0).expect("poll"), 1);
        set_nonblocking(efd.as_fd()).expect("fcntl");
    }

    #[test]
    fn unix_socket_queries() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(socket_family(a.as_fd()).expect("family"), libc::AF_UNIX);
        let cred = peer_cred(a.as_fd()).expect("cred");
        let mine = tempfile::tempfile().expect("tmp").metadata().expect("stat");
        assert_eq!(cred.uid, std::os::unix::fs::MetadataExt::uid(&mine));
        assert_eq!(cred.pid.unsigned_abs(), std::process::id());
        set_send_buffer(a.as_fd(), 1 << 20).expect("sndbuf");
        shutdown(b.as_fd()).expect("shutdown");
    }

    #[test]
    fn fds_pass_over_a_unix_socket() {
        use std::io::{Read, Write};
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (mut x, y) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert_eq!(
            send_with_fds(a.as_fd(), b"hello", &[y.as_fd()]).expect("send"),
            5
        );
        drop(y);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, libc::MSG_PEEK).expect("peek");
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 1));
        let (n, mut fds) = recv_with_fds(b.as_fd(), &mut buf, 0).expect("recv");
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 1));
        let mut y2 = std::os::unix::net::UnixStream::from(fds.pop().expect("fd"));
        y2.write_all(b"x").expect("write");
        let mut one = [0u8; 1];
        x.read_exact(&mut one).expect("read");
        assert_eq!(&one, b"x");
    }

    #[test]
    fn errors_are_errno() {
        let f = tempfile::tempfile().expect("tmp");
        let e = blk_size(f.as_fd()).expect_err("not a block device");
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(lseek(f.as_fd(), 0, libc::SEEK_DATA).expect("seek"), None);
        assert!(fs_type(f.as_fd()).is_ok());
    }
}
