//! One NBD connection in the transmission phase, driven by its I/O thread's ring.
//!
//! Receive: one `IORING_OP_RECV` at a time into a large per-connection buffer; every
//! complete request in it is parsed and submitted to the device queue at once. A small
//! write whose payload is already there is written from the receive buffer itself (the
//! buffer is then pinned: not compacted or reset until that write completes); a payload
//! that is not yet complete is received straight into its own pooled buffer (only the
//! head that had already arrived is copied). A request that must be refused after its header
//! (oversized, read-only, out of range) has its payload skipped, then gets its error:
//! the stream stays in sync and nothing of the announced size is allocated.
//!
//! Send: replies accumulate in a batch (headers in one byte arena, data buffers as they
//! came back from the disk); one `IORING_OP_SENDMSG` sends a whole batch with a vectored
//! iovec list, zero copy. While it is in flight the next batch accumulates. Partial sends
//! advance the iovecs and resubmit. Unix sockets get a 4 MiB send buffer
//! ([`UNIX_SNDBUF_BYTES`]): with the default 208 KiB a 1 MiB read reply leaves in five
//! pieces, each waiting for the client to drain the socket, and the loop cannot move on
//! to the next reply (or its decrypt) meanwhile; with room for several replies the send
//! completes at once and the client's copy-out overlaps with the next reply's work.
//! Measured against the same build without it (benches/README.md, 1M seq read QD8):
//! plain and LUKS reads gain 10-20%.
//!
//! Memory bound: at most [`MAX_REQUESTS`] requests and about [`MAX_INFLIGHT_BYTES`] of
//! buffers (plus one maximum-size request) per connection; over the bound the connection
//! stops parsing and receiving until replies drain.
//!
//! Ownership rule for io_uring: every pointer an SQE or a device request holds (`rbuf`, a payload buffer in
//! `reqs`, `iovs`/`msg` and the `sending` batch) belongs to this `Conn`, which sits in a
//! `Box` (stable address) and is only freed once no SQE of it is in flight
//! ([`Conn::finished`]).

use super::handshake::BASE_ALLOCATION_ID;
use super::proto::{self, cmd, cmd_flag, err, RequestHeader};
use super::Export;
use ember_blockdev::buf::BufPool;
use ember_blockdev::engine::user_data;
use ember_blockdev::{Buffer, Completion, DeviceInfo, IoBuf, IoVecs, Op, Queue, Request, Ring};
use io_uring::{opcode, types};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Receive buffer size.
const RBUF_BYTES: usize = 256 * 1024;
/// Compact the receive buffer when less than this is free at its end.
const RECV_MIN_BYTES: usize = 64 * 1024;
/// Most requests in flight per connection.
pub const MAX_REQUESTS: usize = 512;
/// Buffered bytes per connection above which it stops reading.
pub const MAX_INFLIGHT_BYTES: usize = 64 << 20;
/// Most iovecs in one sendmsg (`IOV_MAX`).
const MAX_IOVS: usize = 1024;

/// Send buffer asked for on Unix sockets (the kernel doubles it and caps it at twice
/// `net.core.wmem_max`). The default (208 KiB) makes a 1 MiB read reply go out in five
/// pieces, each waiting for the client to drain the socket, so the loop cannot start on
/// the next reply meanwhile.
const UNIX_SNDBUF_BYTES: libc::c_int = 4 << 20;

/// Writes up to this size whose payload is already in the receive buffer are written
/// from it directly (zero copy); bigger ones get their own buffer so the receive buffer
/// is not pinned for long.
const BORROW_MAX_BYTES: usize = 64 * 1024;
/// Buffers up to this size go back to the thread's pool; bigger ones are freed, so a
/// burst of huge requests does not pin their memory for good.
const POOL_MAX_BUF_BYTES: usize = 1 << 20;

fn recycle(pool: &mut BufPool, b: IoBuf) {
    if b.capacity() <= POOL_MAX_BUF_BYTES {
        pool.put(b);
    }
}

/// `user_data` slot kinds of the socket SQEs (owner 0 is the event loop).
pub const KIND_RECV: u64 = 0;
/// See [`KIND_RECV`].
pub const KIND_SEND: u64 = 1;

/// What the worker gives a connection to work with.
pub struct Cx<'a> {
    /// The thread's ring.
    pub ring: &'a mut Ring,
    /// The export's queue on this thread.
    pub queue: &'a mut dyn Queue,
    /// The thread's buffer pool.
    pub pool: &'a mut BufPool,
    /// Synchronous device completions land here.
    pub done: &'a mut Vec<Completion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Serving requests.
    Open,
    /// `NBD_CMD_DISC` seen: finish in-flight requests, send their replies, then close.
    Draining,
    /// Closing: waiting for in-flight SQEs before the connection can be freed.
    Closing,
}

/// A request between parse and reply.
struct Pending {
    handle: u64,
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
    /// Write payload being received (before submission).
    buf: Option<IoBuf>,
    /// The FUA flush after a trim/write-zeroes is in flight.
    flushing: bool,
    /// A write whose payload is borrowed from the receive buffer (pins it).
    borrowed: bool,
    /// A write-zeroes is being retried without deallocation.
    zero_retry: bool,
}

/// One reply: header bytes in the batch arena, optional data.
struct Item {
    hdr_off: usize,
    hdr_len: usize,
    data: Option<IoBuf>,
}

#[derive(Default)]
struct Batch {
    hdr: Vec<u8>,
    items: Vec<Item>,
}

/// A write payload being received into its own buffer.
struct Payload {
    slot: usize,
    filled: usize,
}

/// One connection.
pub struct Conn {
    idx: usize,
    fd: OwnedFd,
    /// Peer address, for logs.
    pub peer: String,
    /// The export served.
    pub export: Arc<Export>,
    /// Index of the export's queue in the worker.
    pub qidx: usize,
    structured: bool,
    meta: bool,
    max_block: u32,
    read_only: bool,
    state: State,
    /// Queued for service by the worker.
    pub dirty: bool,

    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// In-flight writes borrowing bytes of `rbuf`.
    rbuf_pins: usize,
    rx_armed: bool,
    rx_into_payload: bool,
    payload: Option<Payload>,
    skip: u64,
    skip_reply: Option<(u64, u16, u32)>,

    reqs: Vec<Option<Pending>>,
    free: Vec<usize>,
    live_reqs: usize,
    dev_inflight: usize,
    inflight_bytes: usize,

    /// Reused vector for synchronous completions.
    scratch: Vec<Completion>,
    out: Batch,
    sending: Batch,
    iovs: Vec<libc::iovec>,
    iov_pos: usize,
    msg: libc::msghdr,
    tx_armed: bool,
}

impl Conn {
    /// A connection at slot `idx` of its worker.
    pub fn new(
        idx: usize,
        fd: OwnedFd,
        peer: String,
        export: Arc<Export>,
        qidx: usize,
        structured: bool,
        meta: bool,
    ) -> Box<Conn> {
        let max_block = export.max_block();
        let read_only = export.is_read_only();
        Self::tune_socket(&fd);
        Box::new(Conn {
            idx,
            fd,
            peer,
            export,
            qidx,
            structured,
            meta,
            max_block,
            read_only,
            state: State::Open,
            dirty: false,
            rbuf: vec![0u8; RBUF_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            rbuf_pins: 0,
            rx_armed: false,
            rx_into_payload: false,
            payload: None,
            skip: 0,
            skip_reply: None,
            reqs: Vec::new(),
            free: Vec::new(),
            live_reqs: 0,
            dev_inflight: 0,
            inflight_bytes: 0,
            scratch: Vec::new(),
            out: Batch::default(),
            sending: Batch::default(),
            iovs: Vec::new(),
            iov_pos: 0,
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            tx_armed: false,
        })
    }

    /// Enlarge a Unix socket's send buffer (see [`UNIX_SNDBUF_BYTES`]); TCP keeps its
    /// auto-tuning. Best effort: a failure only costs speed.
    fn tune_socket(fd: &OwnedFd) {
        // SAFETY: sockaddr_storage is plain data; all-zero is valid.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `ss` and `len` are valid out-pointers sized as declared.
        let r = unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&raw mut ss).cast::<libc::sockaddr>(),
                &raw mut len,
            )
        };
        if r != 0 || libc::c_int::from(ss.ss_family) != libc::AF_UNIX {
            return;
        }
        let v = UNIX_SNDBUF_BYTES;
        // SAFETY: setsockopt reads a c_int from a live local.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not enlarge SO_SNDBUF");
        }
    }

    fn ud(&self, kind: u64) -> u64 {
        user_data(0, ((self.idx as u64) << 2) | kind)
    }

    /// True once the connection is closed and no SQE of it is in flight: it may be freed.
    pub fn finished(&self) -> bool {
        self.state == State::Closing && !self.rx_armed && !self.tx_armed && self.dev_inflight == 0
    }

    /// Start closing (idempotent). `why` is logged once, at info level when abnormal.
    pub fn close(&mut self, why: &str, abnormal: bool, pool: &mut BufPool) {
        if self.state == State::Closing {
            return;
        }
        if abnormal {
            tracing::info!(peer = %self.peer, export = %self.export.name, "dropping NBD client: {why}");
        } else {
            tracing::debug!(peer = %self.peer, export = %self.export.name, "NBD client left: {why}");
        }
        self.state = State::Closing;
        // Wakes any receive or send of ours still in the ring; their CQEs then arrive.
        // SAFETY: shutdown(2) on a socket we own has no memory effects.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        for it in self.out.items.drain(..) {
            if let Some(b) = it.data {
                self.inflight_bytes = self.inflight_bytes.saturating_sub(b.len());
                recycle(pool, b);
            }
        }
        self.out.hdr.clear();
    }

    /// Parse what was received, keep a receive armed and send what is ready.
    pub fn service(&mut self, cx: &mut Cx<'_>) {
        self.parse(cx);
        self.take_sync_completions(cx);
        // Replies first: the client's next requests follow them, so by the time the
        // receive is tried they may already be there.
        self.flush_send(cx);
        self.arm_recv(cx);
        if self.state == State::Draining
            && self.dev_inflight == 0
            && self.out.items.is_empty()
            && self.sending.items.is_empty()
            && !self.tx_armed
        {
            self.close("disconnect requested", false, cx.pool);
        }
    }

    /// Handle the completions that `parse`'s submissions produced synchronously (inline
    /// devices), so their replies go out and their buffers (and receive buffer pins) are
    /// released in this same pass.
    fn take_sync_completions(&mut self, cx: &mut Cx<'_>) {
        while !cx.done.is_empty() {
            let mut batch = std::mem::take(&mut self.scratch);
            std::mem::swap(cx.done, &mut batch);
            let mut foreign = false;
            for c in batch.drain(..) {
                if (c.tag >> 32) as usize == self.idx {
                    self.on_done(c, cx);
                } else {
                    // Not ours (cannot happen today): leave it to the worker.
                    cx.done.push(c);
                    foreign = true;
                }
            }
            self.scratch = batch;
            if foreign {
                break;
            }
        }
    }

    fn blocked(&self) -> bool {
        self.live_reqs >= MAX_REQUESTS || self.inflight_bytes >= MAX_INFLIGHT_BYTES
    }

    // ---------------------------------------------------------------- receive

    fn arm_recv(&mut self, cx: &mut Cx<'_>) {
        if self.rx_armed || self.state != State::Open {
            return;
        }
        let fd = types::Fd(self.fd.as_raw_fd());
        let (ptr, len, into_payload) = if let Some(p) = &self.payload {
            let Some(buf) = self
                .reqs
                .get_mut(p.slot)
                .and_then(|r| r.as_mut())
                .and_then(|r| r.buf.as_mut())
            else {
                self.close("internal error: lost a write payload", true, cx.pool);
                return;
            };
            let len = buf.len() - p.filled;
            // SAFETY: filled < len ≤ capacity, so the pointer stays inside the buffer.
            (unsafe { buf.as_mut_ptr().add(p.filled) }, len, true)
        } else {
            if self.blocked() && self.skip == 0 {
                return;
            }
            // Writes in flight may borrow bytes before `rstart`: while any does, the
            // buffer is neither reset nor compacted, only filled further.
            if self.rstart == self.rend && self.rbuf_pins == 0 {
                self.rstart = 0;
                self.rend = 0;
            }
            if self.rbuf.len() - self.rend < RECV_MIN_BYTES
                && self.rstart > 0
                && self.rbuf_pins == 0
            {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let room = self.rbuf.len() - self.rend;
            if room == 0 {
                return;
            }
            // SAFETY: rend < rbuf.len(), so the pointer stays inside the buffer.
            (
                unsafe { self.rbuf.as_mut_ptr().add(self.rend) },
                room,
                false,
            )
        };
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        // A payload is wanted whole: MSG_WAITALL lets the kernel keep receiving into it
        // instead of completing (and waking this loop) once per socket-buffer refill.
        let flags = if into_payload { libc::MSG_WAITALL } else { 0 };
        let e = opcode::Recv::new(fd, ptr, len)
            .flags(flags)
            .build()
            .user_data(self.ud(KIND_RECV));
        // SAFETY: the target is `rbuf` or a payload buffer owned by `reqs`; both belong to
        // this boxed Conn, which is not freed while `rx_armed` (see `finished`), and
        // neither is read, moved or compacted until the CQE clears `rx_armed`.
        match unsafe { cx.ring.push(&e) } {
            Ok(()) => {
                self.rx_armed = true;
                self.rx_into_payload = into_payload;
            }
            Err(e) => tracing::warn!(error = %e, "could not queue a receive; will retry"),
        }
    }

    /// The receive CQE.
    pub fn on_recv(&mut self, res: i32, cx: &mut Cx<'_>) {
        self.rx_armed = false;
        if self.state == State::Closing {
            return;
        }
        if res < 0 {
            match -res {
                libc::EINTR | libc::EAGAIN | libc::ENOBUFS => {}
                e => {
                    let why = format!("receive failed: {}", std::io::Error::from_raw_os_error(e));
                    self.close(&why, true, cx.pool);
                }
            }
            return;
        }
        if res == 0 {
            let mid = self.payload.is_some() || self.rstart < self.rend || self.skip > 0;
            if self.state == State::Draining {
                // The client closed after NBD_CMD_DISC; pending replies are moot.
                self.close("disconnected", false, cx.pool);
            } else if mid {
                self.close("client vanished in the middle of a request", true, cx.pool);
            } else {
                self.close(
                    "client closed the connection without NBD_CMD_DISC",
                    false,
                    cx.pool,
                );
            }
            return;
        }
        let n = res.unsigned_abs() as usize;
        if self.state != State::Open {
            return;
        }
        if self.rx_into_payload {
            let Some(p) = &mut self.payload else { return };
            p.filled += n;
            let slot = p.slot;
            let complete = self
                .reqs
                .get(slot)
                .and_then(|r| r.as_ref())
                .and_then(|r| r.buf.as_ref())
                .is_some_and(|b| p.filled >= b.len());
            if complete {
                self.payload = None;
                self.submit_write(slot, cx);
            }
        } else {
            self.rend = (self.rend + n).min(self.rbuf.len());
        }
    }

    // ---------------------------------------------------------------- parse

    fn parse(&mut self, cx: &mut Cx<'_>) {
        if self.state != State::Open {
            return;
        }
        let info = self.export.dev.info();
        loop {
            if self.skip > 0 {
                let take =
                    (self.rend - self.rstart).min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.rstart += take;
                self.skip -= take as u64;
                if self.skip > 0 {
                    break;
                }
                if let Some((h, c, e)) = self.skip_reply.take() {
                    self.reply_error(h, c, e);
                }
                continue;
            }
            if self.payload.is_some() || self.blocked() {
                break;
            }
            if self.rend - self.rstart < proto::REQUEST_HEADER_BYTES {
                break;
            }
            let h = match RequestHeader::decode(&self.rbuf[self.rstart..self.rend]) {
                Ok(h) => h,
                Err(e) => {
                    let why = format!("garbage in the request stream ({e})");
                    self.close(&why, true, cx.pool);
                    return;
                }
            };
            self.rstart += proto::REQUEST_HEADER_BYTES;
            self.request(h, &info, cx);
            if self.state != State::Open {
                break;
            }
        }
    }

    /// Range/limit checks shared by the data commands.
    fn check(&self, h: &RequestHeader, info: &DeviceInfo, write: bool) -> Result<(), u32> {
        if h.flags & !cmd_flag::KNOWN != 0 {
            return Err(err::EINVAL);
        }
        if write && self.read_only {
            return Err(err::EPERM);
        }
        if matches!(h.cmd, cmd::READ | cmd::WRITE) && h.len > self.max_block {
            return Err(err::EOVERFLOW);
        }
        info.check_range(h.offset, u64::from(h.len))
            .map_err(proto::nbd_error)
    }

    fn request(&mut self, h: RequestHeader, info: &DeviceInfo, cx: &mut Cx<'_>) {
        match h.cmd {
            cmd::READ => {
                if let Err(e) = self.check(&h, info, false) {
                    return self.reply_error(h.handle, h.cmd, e);
                }
                if h.len == 0 {
                    return self.reply_ok(h.handle, h.cmd);
                }
                let len = h.len as usize;
                let buf = cx.pool.get(len);
                self.inflight_bytes += len;
                let slot = self.alloc(&h, None);
                self.submit(
                    slot,
                    Op::Read,
                    h.offset,
                    u64::from(h.len),
                    Buffer::Owned(buf),
                    cx,
                );
            }
            cmd::WRITE => {
                if let Err(e) = self.check(&h, info, true) {
                    // Skip the payload to stay in sync, then answer.
                    self.skip = u64::from(h.len);
                    self.skip_reply = Some((h.handle, h.cmd, e));
                    return;
                }
                let len = h.len as usize;
                let have = (self.rend - self.rstart).min(len);
                if have == len && len > 0 && len <= BORROW_MAX_BYTES {
                    // Zero copy: the device writes straight from the receive buffer.
                    let iov = libc::iovec {
                        // SAFETY: rstart + len ≤ rend ≤ rbuf.len().
                        iov_base: unsafe { self.rbuf.as_mut_ptr().add(self.rstart) }.cast(),
                        iov_len: len,
                    };
                    // SAFETY: the bytes lie in `rbuf`, owned by this boxed Conn, which is
                    // not freed while a device request is in flight (`finished`). While
                    // `rbuf_pins` > 0 the buffer is never compacted or reset, and receives
                    // only fill it past `rend`, so nothing writes these bytes until the
                    // completion (`on_done`) unpins them.
                    let v = unsafe { IoVecs::new(vec![iov]) };
                    self.rstart += len;
                    self.rbuf_pins += 1;
                    let slot = self.alloc(&h, None);
                    if let Some(p) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) {
                        p.borrowed = true;
                    }
                    let op = Op::Write {
                        fua: h.flags & cmd_flag::FUA != 0,
                    };
                    let (off, l) = (h.offset, u64::from(h.len));
                    self.submit(slot, op, off, l, Buffer::Borrowed(v), cx);
                    return;
                }
                let mut buf = cx.pool.get(len);
                buf.as_mut_slice()[..have]
                    .copy_from_slice(&self.rbuf[self.rstart..self.rstart + have]);
                self.rstart += have;
                self.inflight_bytes += len;
                let slot = self.alloc(&h, Some(buf));
                if have == len {
                    self.submit_write(slot, cx);
                } else {
                    self.payload = Some(Payload { slot, filled: have });
                }
            }
            cmd::DISC => self.state = State::Draining,
            cmd::FLUSH => {
                if h.flags & !cmd_flag::KNOWN != 0 {
                    return self.reply_error(h.handle, h.cmd, err::EINVAL);
                }
                let slot = self.alloc(&h, None);
                self.submit(slot, Op::Flush, 0, 0, Buffer::None, cx);
            }
            cmd::TRIM => {
                if let Err(e) = self.check(&h, info, true) {
                    return self.reply_error(h.handle, h.cmd, e);
                }
                if !info.discard {
                    return self.reply_error(h.handle, h.cmd, err::ENOTSUP);
                }
                let slot = self.alloc(&h, None);
                self.submit(
                    slot,
                    Op::Discard,
                    h.offset,
                    u64::from(h.len),
                    Buffer::None,
                    cx,
                );
            }
            cmd::WRITE_ZEROES => {
                if let Err(e) = self.check(&h, info, true) {
                    return self.reply_error(h.handle, h.cmd, e);
                }
                let may_unmap = h.flags & cmd_flag::NO_HOLE == 0;
                // Fast only if it needs no data writes: punching a hole does not; zeroing
                // a range may fall back to writing zeros (tmpfs), so refuse that.
                if h.flags & cmd_flag::FAST_ZERO != 0 && !(may_unmap && info.discard) {
                    return self.reply_error(h.handle, h.cmd, err::ENOTSUP);
                }
                let slot = self.alloc(&h, None);
                let op = Op::WriteZeroes {
                    unmap: may_unmap && info.discard,
                };
                self.submit(slot, op, h.offset, u64::from(h.len), Buffer::None, cx);
            }
            cmd::CACHE => match self.check(&h, info, false) {
                Ok(()) => self.reply_ok(h.handle, h.cmd),
                Err(e) => self.reply_error(h.handle, h.cmd, e),
            },
            cmd::BLOCK_STATUS => self.block_status(&h, info),
            _ => self.reply_error(h.handle, h.cmd, err::EINVAL),
        }
    }

    fn block_status(&mut self, h: &RequestHeader, info: &DeviceInfo) {
        let end = h.offset.checked_add(u64::from(h.len));
        if !self.structured
            || !self.meta
            || h.flags & !cmd_flag::KNOWN != 0
            || h.len == 0
            || end.is_none_or(|e| e > info.size)
        {
            return self.reply_error(h.handle, h.cmd, err::EINVAL);
        }
        let extents = match self.export.dev.block_status(h.offset, u64::from(h.len)) {
            Ok(x) => x,
            Err(e) => return self.reply_error(h.handle, h.cmd, proto::nbd_error(e.kind().errno())),
        };
        let mut descs = Vec::with_capacity(extents.len());
        let mut left = u64::from(h.len);
        for x in extents {
            if left == 0 {
                break;
            }
            let len = x.len.min(left);
            left -= len;
            let mut flags = 0;
            if x.hole {
                flags |= proto::STATE_HOLE;
            }
            if x.zero {
                flags |= proto::STATE_ZERO;
            }
            // len ≤ h.len, a u32.
            descs.push((len as u32, flags));
            if h.flags & cmd_flag::REQ_ONE != 0 {
                break;
            }
        }
        if descs.is_empty() {
            return self.reply_error(h.handle, h.cmd, err::EIO);
        }
        let off = self.out.hdr.len();
        proto::encode_block_status(h.handle, BASE_ALLOCATION_ID, &descs, &mut self.out.hdr);
        self.push_item(off, None);
    }

    // ---------------------------------------------------------------- in-flight table

    fn alloc(&mut self, h: &RequestHeader, buf: Option<IoBuf>) -> usize {
        let p = Pending {
            handle: h.handle,
            cmd: h.cmd,
            flags: h.flags,
            offset: h.offset,
            len: h.len,
            buf,
            flushing: false,
            borrowed: false,
            zero_retry: false,
        };
        self.live_reqs += 1;
        if let Some(i) = self.free.pop() {
            self.reqs[i] = Some(p);
            i
        } else {
            self.reqs.push(Some(p));
            self.reqs.len() - 1
        }
    }

    fn release(&mut self, slot: usize) -> Option<Pending> {
        let p = self.reqs.get_mut(slot)?.take()?;
        self.free.push(slot);
        self.live_reqs -= 1;
        Some(p)
    }

    fn submit(&mut self, slot: usize, op: Op, offset: u64, len: u64, buf: Buffer, cx: &mut Cx<'_>) {
        self.dev_inflight += 1;
        let req = Request {
            op,
            offset,
            len,
            buf,
            tag: ((self.idx as u64) << 32) | slot as u64,
        };
        cx.queue.submit(cx.ring, req, cx.done);
    }

    fn submit_write(&mut self, slot: usize, cx: &mut Cx<'_>) {
        let Some(p) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) else {
            return;
        };
        let Some(buf) = p.buf.take() else { return };
        let op = Op::Write {
            fua: p.flags & cmd_flag::FUA != 0,
        };
        let (offset, len) = (p.offset, u64::from(p.len));
        self.submit(slot, op, offset, len, Buffer::Owned(buf), cx);
    }

    /// A device completion for this connection (`tag` low half = slot).
    pub fn on_done(&mut self, c: Completion, cx: &mut Cx<'_>) {
        self.dev_inflight = self.dev_inflight.saturating_sub(1);
        let slot = (c.tag & 0xffff_ffff) as usize;
        let buf = c.buf.into_owned();
        let closing = self.state == State::Closing;
        let mut result = c.result;
        let unsupported = matches!(result, Err(libc::EOPNOTSUPP));
        if let (false, true, Some(p)) = (
            closing,
            unsupported,
            self.reqs.get_mut(slot).and_then(|r| r.as_mut()),
        ) {
            if p.cmd == cmd::TRIM && !p.flushing {
                // Trim is advisory: a device that cannot deallocate just keeps the data.
                result = Ok(());
            } else if p.cmd == cmd::WRITE_ZEROES
                && !p.flushing
                && !p.zero_retry
                && p.flags & cmd_flag::FAST_ZERO == 0
            {
                // Deallocating failed (e.g. a block device without unmap): zero the range
                // the slow way, which the backend can always do.
                p.zero_retry = true;
                let (offset, len) = (p.offset, u64::from(p.len));
                let op = Op::WriteZeroes { unmap: false };
                self.submit(slot, op, offset, len, Buffer::None, cx);
                return;
            }
        }
        let fua_flush = !closing
            && result.is_ok()
            && self
                .reqs
                .get(slot)
                .and_then(|r| r.as_ref())
                .is_some_and(|p| {
                    matches!(p.cmd, cmd::TRIM | cmd::WRITE_ZEROES)
                        && p.flags & cmd_flag::FUA != 0
                        && !p.flushing
                });
        if fua_flush {
            // Trim and write-zeroes have no FUA of their own: flush after them.
            if let Some(p) = self.reqs.get_mut(slot).and_then(|r| r.as_mut()) {
                p.flushing = true;
            }
            self.submit(slot, Op::Flush, 0, 0, Buffer::None, cx);
            return;
        }
        let Some(p) = self.release(slot) else {
            tracing::warn!(slot, "completion for an unknown NBD request");
            return;
        };
        if p.borrowed {
            self.rbuf_pins = self.rbuf_pins.saturating_sub(1);
        }
        let keep = match (closing, p.cmd, result, buf) {
            (false, cmd::READ, Ok(()), Some(b)) => Some(b),
            (_, _, _, b) => {
                if let Some(b) = b {
                    self.inflight_bytes = self.inflight_bytes.saturating_sub(b.len());
                    recycle(cx.pool, b);
                }
                None
            }
        };
        if closing {
            return;
        }
        match (result, keep) {
            (Ok(()), Some(b)) => self.reply_read(p.handle, p.offset, b),
            (Ok(()), None) => self.reply_ok(p.handle, p.cmd),
            (Err(e), _) => self.reply_error(p.handle, p.cmd, proto::nbd_error(e)),
        }
    }

    // ---------------------------------------------------------------- replies

    fn push_item(&mut self, hdr_off: usize, data: Option<IoBuf>) {
        let hdr_len = self.out.hdr.len() - hdr_off;
        self.out.items.push(Item {
            hdr_off,
            hdr_len,
            data,
        });
    }

    fn reply_ok(&mut self, handle: u64, command: u16) {
        let off = self.out.hdr.len();
        if self.structured && command == cmd::READ {
            proto::encode_none_chunk(handle, &mut self.out.hdr);
        } else {
            proto::encode_simple_reply(handle, 0, &mut self.out.hdr);
        }
        self.push_item(off, None);
    }

    fn reply_error(&mut self, handle: u64, command: u16, error: u32) {
        let off = self.out.hdr.len();
        if self.structured && matches!(command, cmd::READ | cmd::BLOCK_STATUS) {
            proto::encode_error_chunk(handle, error, &mut self.out.hdr);
        } else {
            proto::encode_simple_reply(handle, error, &mut self.out.hdr);
        }
        self.push_item(off, None);
    }

    fn reply_read(&mut self, handle: u64, offset: u64, data: IoBuf) {
        let off = self.out.hdr.len();
        if self.structured {
            // One chunk for the whole read, so NBD_CMD_FLAG_DF is always honoured.
            proto::encode_read_chunk_header(handle, offset, data.len() as u32, &mut self.out.hdr);
        } else {
            proto::encode_simple_reply(handle, 0, &mut self.out.hdr);
        }
        self.push_item(off, Some(data));
    }

    // ---------------------------------------------------------------- send

    fn flush_send(&mut self, cx: &mut Cx<'_>) {
        if self.tx_armed || self.state == State::Closing {
            return;
        }
        if self.iov_pos >= self.iovs.len() {
            if self.out.items.is_empty() {
                return;
            }
            std::mem::swap(&mut self.out, &mut self.sending);
            self.iovs.clear();
            self.iov_pos = 0;
            let base = self.sending.hdr.as_mut_ptr();
            for it in &mut self.sending.items {
                self.iovs.push(libc::iovec {
                    // SAFETY: hdr_off + hdr_len ≤ hdr.len(), recorded when it was appended.
                    iov_base: unsafe { base.add(it.hdr_off) }.cast(),
                    iov_len: it.hdr_len,
                });
                if let Some(d) = &mut it.data {
                    if !d.is_empty() {
                        self.iovs.push(libc::iovec {
                            iov_base: d.as_mut_ptr().cast(),
                            iov_len: d.len(),
                        });
                    }
                }
            }
        }
        let n = (self.iovs.len() - self.iov_pos).min(MAX_IOVS);
        // SAFETY: iov_pos < iovs.len(), so the pointer stays inside the vector.
        self.msg.msg_iov = unsafe { self.iovs.as_mut_ptr().add(self.iov_pos) };
        self.msg.msg_iovlen = n;
        let e = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &raw const self.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(self.ud(KIND_SEND));
        // SAFETY: `msg`, `iovs` and the memory they describe (the `sending` batch's header
        // arena and data buffers) belong to this boxed Conn and are not touched until the
        // send CQE clears `tx_armed`; the Conn is not freed before that (`finished`).
        match unsafe { cx.ring.push(&e) } {
            Ok(()) => self.tx_armed = true,
            Err(e) => tracing::warn!(error = %e, "could not queue a send; will retry"),
        }
    }

    /// The send CQE.
    pub fn on_send(&mut self, res: i32, pool: &mut BufPool) {
        self.tx_armed = false;
        if res <= 0 {
            if self.state != State::Closing && !matches!(-res, libc::EINTR | libc::EAGAIN) {
                let why = if res == 0 {
                    "send made no progress".to_string()
                } else {
                    format!("send failed: {}", std::io::Error::from_raw_os_error(-res))
                };
                self.close(&why, true, pool);
            }
            if self.state != State::Closing {
                return;
            }
        } else {
            let mut n = res.unsigned_abs() as usize;
            while self.iov_pos < self.iovs.len() {
                let v = &mut self.iovs[self.iov_pos];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    self.iov_pos += 1;
                } else {
                    // SAFETY: n < iov_len, so the pointer stays inside the iovec's memory.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    break;
                }
            }
            if self.iov_pos < self.iovs.len() && self.state != State::Closing {
                return;
            }
        }
        // The batch is sent (or the connection is closing): recycle its buffers.
        for it in self.sending.items.drain(..) {
            if let Some(b) = it.data {
                self.inflight_bytes = self.inflight_bytes.saturating_sub(b.len());
                recycle(pool, b);
            }
        }
        self.sending.hdr.clear();
        self.iovs.clear();
        self.iov_pos = 0;
    }
}
