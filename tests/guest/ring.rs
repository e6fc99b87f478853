//! A guest and its vhost-user frontend, played by the test, for the hostile-frontend
//! tests (`tests/vhost_hostile.rs`): vhost-user messages written by hand over a
//! `UnixStream` (fds in SCM_RIGHTS, replies read with a timeout), and split virtqueues
//! written by hand in a memfd shared with emberd. Unlike QEMU or the `vhost` crate's
//! `Frontend`, it sends whatever a test asks: out-of-range values, wrong fds, memory
//! tables that lie, rings in impossible states.
//!
//! Use from a test file: `#[path = "guest/ring.rs"] mod ring;`.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::FrontendReq;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Virtio feature bits.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature bits.
pub const P_MQ: u64 = 1 << 0;
pub const P_REPLY_ACK: u64 = 1 << 3;
pub const P_CONFIG: u64 = 1 << 9;
pub const P_INFLIGHT: u64 = 1 << 12;
pub const P_MEM_SLOTS: u64 = 1 << 15;

/// Descriptor flags.
pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;
pub const D_INDIRECT: u16 = 4;

/// The frontend's (made-up) virtual address of guest physical address 0.
pub const UADDR: u64 = 0x7f00_0000_0000;

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// One raw vhost-user connection.
pub struct Conn {
    pub sock: UnixStream,
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Payload: one u64.
pub fn u64le(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Payload: `VhostUserVringState`.
pub fn state(index: u32, num: u32) -> Vec<u8> {
    words(&[index, num])
}

/// Payload: `VhostUserVringAddr` (frontend virtual addresses).
pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = words(&[index, 0]);
    for v in [desc, used, avail, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// Payload: `VhostUserMemory` with (gpa, size, user address, mmap offset) regions.
pub fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = words(&[regions.len() as u32, 0]);
    for &(gpa, size, ua, off) in regions {
        for v in [gpa, size, ua, off] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// Payload: `VhostUserSingleMemoryRegion` (ADD_MEM_REG / REM_MEM_REG).
pub fn single_region(gpa: u64, size: u64, ua: u64, off: u64) -> Vec<u8> {
    let mut p = u64le(0);
    for v in [gpa, size, ua, off] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// Payload: `VhostUserInflight`.
pub fn inflight(mmap_size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = mmap_size.to_le_bytes().to_vec();
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0; 4]); // repr(C) padding
    p
}

impl Conn {
    /// Connect (retrying while the socket appears) with a 20 s read timeout.
    pub fn connect(path: &Path) -> Conn {
        let t = Instant::now();
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(30), "connect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Conn { sock }
    }

    /// Send one message with `fds` in SCM_RIGHTS.
    pub fn send(
        &self,
        req: FrontendReq,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut bytes = words(&[u32::from(req), VERSION_1 | flags, payload.len() as u32]);
        bytes.extend_from_slice(payload);
        let n = self.sock.send_with_fds(&[&bytes[..]], fds)?;
        if n != bytes.len() {
            return Err(io::Error::other("short send"));
        }
        Ok(())
    }

    /// Read one message: (request code, flags, payload, fds).
    pub fn recv(&self) -> io::Result<(u32, u32, Vec<u8>, Vec<File>)> {
        let mut hdr = [0u8; 12];
        let mut cbuf = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: 12,
        };
        // SAFETY: an all-zero msghdr is valid; the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: `msg` points at `hdr` and `cbuf`, alive and sized as declared.
        let n =
            unsafe { libc::recvmsg(self.sock.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut files = Vec::new();
        // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / 4 {
                        files.push(File::from(OwnedFd::from_raw_fd(
                            data.add(i).read_unaligned(),
                        )));
                    }
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if (n as usize) < 12 {
            (&self.sock).read_exact(&mut hdr[n as usize..])?;
        }
        let w = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let mut payload = vec![0u8; w(8) as usize];
        (&self.sock).read_exact(&mut payload)?;
        Ok((w(0), w(4), payload, files))
    }

    /// Send with NEED_REPLY and wait for the ack (REPLY_ACK must be negotiated).
    /// Err: a nack, the connection closed, or no answer within the read timeout.
    pub fn ack(&self, req: FrontendReq, payload: &[u8], fds: &[RawFd]) -> Result<(), String> {
        self.send(req, FLAG_NEED_REPLY, payload, fds)
            .map_err(|e| format!("{req:?}: send: {e}"))?;
        let (code, flags, p, _) = self.recv().map_err(|e| format!("{req:?}: {e}"))?;
        if code != u32::from(req) || flags & FLAG_REPLY == 0 || p.len() != 8 {
            return Err(format!("{req:?}: unexpected reply {code} {flags:#x} {p:?}"));
        }
        match u64::from_le_bytes(p[..8].try_into().unwrap()) {
            0 => Ok(()),
            v => Err(format!("{req:?}: nack {v}")),
        }
    }

    /// A request that has a reply; returns its payload and fds.
    pub fn get(&self, req: FrontendReq, payload: &[u8]) -> io::Result<(Vec<u8>, Vec<File>)> {
        self.send(req, 0, payload, &[])?;
        let (code, flags, p, files) = self.recv()?;
        if code != u32::from(req) || flags & FLAG_REPLY == 0 {
            return Err(io::Error::other(format!(
                "unexpected reply {code} {flags:#x}"
            )));
        }
        Ok((p, files))
    }

    /// GET_FEATURES and friends.
    pub fn get_u64(&self, req: FrontendReq) -> io::Result<u64> {
        let (p, _) = self.get(req, &[])?;
        Ok(u64::from_le_bytes(
            p.get(..8)
                .ok_or_else(|| io::Error::other("short"))?
                .try_into()
                .unwrap(),
        ))
    }

    /// Negotiate features (the backend's, minus those not in `want`) and protocol
    /// features `proto`; REPLY_ACK is always asked for.
    pub fn negotiate(&self, want: u64, proto: u64) -> Result<u64, String> {
        self.send(FrontendReq::SET_OWNER, 0, &[], &[])
            .map_err(|e| e.to_string())?;
        let f = self
            .get_u64(FrontendReq::GET_FEATURES)
            .map_err(|e| e.to_string())?;
        let f = f & (want | F_PROTOCOL_FEATURES | (1 << 32));
        self.send(FrontendReq::SET_FEATURES, 0, &u64le(f), &[])
            .map_err(|e| e.to_string())?;
        self.get_u64(FrontendReq::GET_PROTOCOL_FEATURES)
            .map_err(|e| e.to_string())?;
        self.ack(
            FrontendReq::SET_PROTOCOL_FEATURES,
            &u64le(proto | P_REPLY_ACK),
            &[],
        )?;
        Ok(f)
    }

    /// True once the backend closed the connection (within `t`).
    pub fn closed_within(&self, t: Duration) -> bool {
        let start = Instant::now();
        self.sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 64];
        loop {
            match (&self.sock).read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
            if start.elapsed() > t {
                return false;
            }
        }
    }
}

/// Where the rings live in guest memory (guest physical = offset in the memfd).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Layout {
    /// Descriptor table at `base`, avail ring at +0x4000, used ring at +0x5000 (room
    /// for 1024 entries).
    pub fn at(base: u64) -> Layout {
        Layout {
            desc: base,
            avail: base + 0x4000,
            used: base + 0x5000,
        }
    }
}

/// Split rings written by the test in guest memory (a mapping of the memfd).
pub struct Rings {
    pub mem: GuestMemoryMmap<()>,
    pub size: u16,
    pub layout: Layout,
    pub avail_idx: u16,
}

impl Rings {
    /// Map the first `len` bytes of `file` as guest memory at guest address 0.
    pub fn new(file: &File, len: u64, size: u16, layout: Layout) -> Rings {
        let m = MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), len as usize)
            .unwrap();
        let r = GuestRegionMmap::new(m, GuestAddress(0)).unwrap();
        Rings {
            mem: GuestMemoryMmap::from_regions(vec![r]).unwrap(),
            size,
            layout,
            avail_idx: 0,
        }
    }

    /// Write descriptor `i` of the table at `table`.
    pub fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + u64::from(i) * 16;
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Make the chain at `head` available (avail ring slot, then `avail.idx`).
    pub fn publish(&mut self, head: u16) {
        let slot = self.layout.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.set_avail_idx(self.avail_idx);
    }

    /// Write `avail.idx` as is.
    pub fn set_avail_idx(&self, v: u16) {
        self.mem
            .write_obj(v, GuestAddress(self.layout.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.layout.used + 2))
            .unwrap()
    }

    pub fn byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A one-sector read of `sector`: descriptors `head..head+3`, header at `at`, data
    /// at `at + 0x100`, status byte at `at + 0x300` (set to 0xff first).
    pub fn read_request(&self, head: u16, at: u64, sector: u64) {
        self.mem.write_obj(0u32, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(at + 0x300))
            .unwrap();
        let t = self.layout.desc;
        self.desc(t, head, at, 16, D_NEXT, head + 1);
        self.desc(t, head + 1, at + 0x100, 512, D_NEXT | D_WRITE, head + 2);
        self.desc(t, head + 2, at + 0x300, 1, D_WRITE, 0);
    }

    /// Wait until the used index reaches `n` (panics after 30 s).
    pub fn wait_used(&self, n: u16) {
        let t = Instant::now();
        while self.used_idx() != n {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "used index stuck at {}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// How a [`Session`] sets itself up.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Queue size.
    pub size: u16,
    /// Virtio features to ask for beyond VERSION_1 and PROTOCOL_FEATURES.
    pub features: u64,
    /// Bytes of the memfd.
    pub mem_len: u64,
    /// Bytes the memory table declares (may be more than `mem_len`: a lie).
    pub region_len: u64,
    /// Where the rings are.
    pub layout: Layout,
    /// Set up an inflight area: None, or Some(bytes of the memfd handed back; None: the
    /// one the backend gave).
    pub inflight: Option<Option<u64>>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            size: 16,
            features: F_EVENT_IDX | F_INDIRECT_DESC,
            mem_len: 1 << 20,
            region_len: 1 << 20,
            layout: Layout::at(0),
            inflight: None,
        }
    }
}

/// A frontend with one set-up virtqueue (queue 0) over rings the test writes.
pub struct Session {
    pub conn: Conn,
    pub rings: Rings,
    pub file: File,
    pub kick: EventFd,
    pub call: EventFd,
    pub err: EventFd,
}

impl Session {
    /// Connect and set up queue 0 the way QEMU does; every message waits for its ack.
    /// Err names the first message the backend refused (or the connection's end).
    pub fn start(sock: &Path, o: &Opts) -> Result<Session, String> {
        let conn = Conn::connect(sock);
        let mut proto = P_CONFIG | P_MQ;
        if o.inflight.is_some() {
            proto |= P_INFLIGHT;
        }
        conn.negotiate(o.features, proto)?;
        let file = memfd(o.mem_len);
        conn.ack(
            FrontendReq::SET_MEM_TABLE,
            &mem_table(&[(0, o.region_len, UADDR, 0)]),
            &[file.as_raw_fd()],
        )?;
        if let Some(short) = o.inflight {
            let (p, files) = conn
                .get(FrontendReq::GET_INFLIGHT_FD, &inflight(0, 0, 1, o.size))
                .map_err(|e| format!("GET_INFLIGHT_FD: {e}"))?;
            let size = u64::from_le_bytes(p[..8].try_into().unwrap());
            let area = match short {
                None => files.into_iter().next().ok_or("no inflight fd")?,
                Some(len) => memfd(len),
            };
            conn.ack(
                FrontendReq::SET_INFLIGHT_FD,
                &inflight(size, 0, 1, o.size),
                &[area.as_raw_fd()],
            )?;
        }
        let l = o.layout;
        conn.ack(
            FrontendReq::SET_VRING_NUM,
            &state(0, u32::from(o.size)),
            &[],
        )?;
        conn.ack(
            FrontendReq::SET_VRING_ADDR,
            &vring_addr(0, UADDR + l.desc, UADDR + l.used, UADDR + l.avail),
            &[],
        )?;
        conn.ack(FrontendReq::SET_VRING_BASE, &state(0, 0), &[])?;
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let err = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        conn.ack(FrontendReq::SET_VRING_CALL, &u64le(0), &[call.as_raw_fd()])?;
        conn.ack(FrontendReq::SET_VRING_ERR, &u64le(0), &[err.as_raw_fd()])?;
        conn.ack(FrontendReq::SET_VRING_KICK, &u64le(0), &[kick.as_raw_fd()])?;
        conn.ack(FrontendReq::SET_VRING_ENABLE, &state(0, 1), &[])?;
        let mapped = o.mem_len.min(o.region_len);
        let rings = Rings::new(&file, mapped, o.size, l);
        Ok(Session {
            conn,
            rings,
            file,
            kick,
            call,
            err,
        })
    }

    /// GET_VRING_BASE of queue 0 (stops it); Err if no answer within the read timeout.
    pub fn vring_base(&self) -> io::Result<u32> {
        let (p, _) = self.conn.get(FrontendReq::GET_VRING_BASE, &state(0, 0))?;
        Ok(u32::from_le_bytes(
            p.get(4..8)
                .ok_or_else(|| io::Error::other("short"))?
                .try_into()
                .unwrap(),
        ))
    }

    /// Stop queue 0 (GET_VRING_BASE) and start it again at the base it answered, with a
    /// new kick fd (or a fresh eventfd), as a frontend does when its guest resets the
    /// device. Returns the base.
    pub fn restart(&mut self, kick: Option<EventFd>) -> io::Result<u32> {
        let base = self.vring_base()?;
        let kick = match kick {
            Some(k) => k,
            None => EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let ack =
            |req, p: &[u8], fds: &[RawFd]| self.conn.ack(req, p, fds).map_err(io::Error::other);
        ack(FrontendReq::SET_VRING_BASE, &state(0, base), &[])?;
        ack(
            FrontendReq::SET_VRING_CALL,
            &u64le(0),
            &[self.call.as_raw_fd()],
        )?;
        ack(
            FrontendReq::SET_VRING_ERR,
            &u64le(0),
            &[self.err.as_raw_fd()],
        )?;
        ack(FrontendReq::SET_VRING_KICK, &u64le(0), &[kick.as_raw_fd()])?;
        self.kick = kick;
        Ok(base)
    }

    /// True once the vring error eventfd was signalled (within `t`).
    pub fn err_signalled_within(&self, t: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.err.read().is_ok() {
                return true;
            }
            if start.elapsed() > t {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
