//! One NBD connection in the transmission phase, driven by its I/O thread's ring.
//!
//! Receive: one `IORING_OP_RECV` at a time into a large per-connection buffer; every
//! complete request in it is decided ([`request::decide`]: flags, read-only, size and range
//! checked before anything is allocated), charged (below) and submitted to the device
//! queue at once. A small write whose payload is already there is written from the receive
//! buffer itself (the buffer is then pinned: not compacted or reset until that write
//! completes); a payload that is not yet complete is received straight into its own pooled
//! buffer (only the head that had already arrived is copied). A request that must be
//! refused after its header (oversized, read-only, out of range) has its payload skipped,
//! then gets its error: the stream stays in sync and nothing of the announced size is
//! allocated.
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
//! Memory bound: every request is charged, from its header until its reply has left the
//! socket, [`REQ_BYTES`] for its bookkeeping and reply header plus its data buffer (a
//! read's buffer, a write's payload buffer, a block-status reply's descriptors). The
//! charge goes to the connection's [`ConnSlot`]: at most `--nbd-conn-memory-mib` per
//! connection, and the server's budget over all of them (see [`super::gate`]). At most
//! [`MAX_REQUESTS`] requests may be unanswered, queued replies included. A request that
//! does not fit is left in the receive buffer and the connection stops receiving
//! (back-pressure): a client that never reads its replies fills its own bound and
//! then its socket, never the daemon's memory. Its connection retries when its own
//! replies drain, or on its I/O thread's tick if it holds nothing.
//!
//! Deadlines (`--nbd-stall-timeout-secs`, checked on the I/O thread's tick): a send that
//! makes no progress for that long (the client does not read), or a request whose bytes
//! stop arriving halfway for that long (counted from the last complete request, so a
//! trickle does not reset it), drops the client. An idle client between requests is
//! never dropped.
//!
//! Ownership rule for io_uring: every pointer an SQE or a device request holds (`rbuf`, a payload buffer in
//! `reqs`, `iovs`/`msg` and the `sending` batch) belongs to this `Conn`, which sits in a
//! `Box` (stable address) and is only freed once no SQE of it is in flight
//! ([`Conn::finished`]).
//!
//! In-flight table: a [`Slots`] of at most [`MAX_REQUESTS`] entries (every entry is an
//! unreplied request). A device request's [`Tag`] carries the connection's slot in the
//! worker as its route and the request's key; a socket SQE's carries the connection's
//! key and [`KIND_RECV`] or [`KIND_SEND`]. A completion whose key is stale finds nothing.

use super::gate::{buf_bytes, ConnSlot, Pool};
use super::handshake::BASE_ALLOCATION_ID;
use super::proto::{self, cmd, cmd_flag, err, RequestHeader};
use super::request::{self, Action, Session};
use super::Export;
use ember_blockdev::sys;
use ember_blockdev::{
    Buffer, Completion, IoBuf, IoVecs, Key, Kind, Op, Queue, Request, Ring, Slots, Tag,
};
use io_uring::{opcode, types};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receive buffer size.
const RBUF_BYTES: usize = 256 * 1024;
/// Compact the receive buffer when less than this is free at its end.
const RECV_MIN_BYTES: usize = 64 * 1024;
/// Most requests per connection between header and sent reply (queued replies included).
pub const MAX_REQUESTS: usize = 512;
/// Charged per request for its bookkeeping (in-flight slot, reply item, reply header,
/// iovecs), on top of its data buffer.
pub const REQ_BYTES: usize = 256;
/// Most descriptors in one `BLOCK_STATUS` reply: the protocol lets a server describe less
/// than the whole range asked for, and the client asks again for the rest.
pub const MAX_STATUS_EXTENTS: usize = 512;
/// Charged for a block-status request: its descriptors at most.
const STATUS_BYTES: usize = REQ_BYTES + 8 * MAX_STATUS_EXTENTS;
/// A connection's fixed memory: its receive buffer, and its bookkeeping vectors at
/// [`MAX_REQUESTS`] (taken from the budget at admission).
pub const FIXED_BYTES: usize = RBUF_BYTES + 256 * 1024;
/// Requests a connection can always hold without asking the shared budget (taken at
/// admission): small requests make progress even when the budget is spent.
pub const FLOOR_IO_BYTES: usize = 1 << 20;
/// Reply header arenas bigger than this are shrunk once sent (block-status bursts).
const ARENA_KEEP_BYTES: usize = 64 * 1024;
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

/// Tag kind of a connection's socket receive (owner 0 is the event loop; the key is the
/// connection's in the worker).
pub const KIND_RECV: Kind = Kind::new(0);
/// Tag kind of a connection's `sendmsg`.
pub const KIND_SEND: Kind = Kind::new(1);

/// What the worker gives a connection to work with.
pub struct Cx<'a> {
    /// The thread's ring.
    pub ring: &'a mut Ring,
    /// The export's queue on this thread.
    pub queue: &'a mut dyn Queue,
    /// The thread's buffer pool.
    pub pool: &'a mut Pool,
    /// Synchronous device completions land here.
    pub done: &'a mut Vec<Completion>,
    /// The time of this loop iteration.
    pub now: Instant,
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
    /// Bytes charged to the connection for it (its reply carries them on).
    charge: usize,
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
    /// Bytes charged for the request; given back once the reply is sent.
    charge: usize,
}

#[derive(Default)]
struct Batch {
    hdr: Vec<u8>,
    items: Vec<Item>,
}

/// A write payload being received into its own buffer.
struct Payload {
    slot: Key,
    filled: usize,
}

/// What a worker hands a connection at its start.
pub struct ConnSetup {
    /// The socket, after the handshake.
    pub fd: OwnedFd,
    /// Peer address, for logs.
    pub peer: String,
    /// The export served.
    pub export: Arc<Export>,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected.
    pub meta: bool,
    /// Its admission: place and memory.
    pub slot: ConnSlot,
}

/// One connection.
pub struct Conn {
    /// This connection's key in its worker (the key of its socket SQEs).
    key: Key,
    /// The route of its device requests' tags: `key`'s slot.
    route: u16,
    fd: OwnedFd,
    /// Peer address, for logs.
    pub peer: String,
    /// The export served.
    pub export: Arc<Export>,
    /// Key of the export's queue in the worker.
    pub qidx: Key,
    session: Session,
    state: State,
    /// Queued for service by the worker.
    pub dirty: bool,
    /// Memory charged to this connection (given back when it is freed).
    slot: ConnSlot,
    /// Requests parsed whose reply has not left yet.
    unreplied: usize,
    /// The next request did not fit in memory: not reading until memory frees.
    wait_mem: bool,

    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// In-flight writes borrowing bytes of `rbuf`.
    rbuf_pins: usize,
    rx_armed: bool,
    rx_into_payload: bool,
    payload: Option<Payload>,
    skip: u64,
    /// The reply of a refused write, once its payload is skipped: handle, command,
    /// error, charge.
    skip_reply: Option<(u64, u16, u32, usize)>,
    /// Since when a request has been half received (see the module doc).
    mid_since: Option<Instant>,

    /// Requests at the device (or receiving their payload), by the key in their tag;
    /// at most [`MAX_REQUESTS`] (each is unreplied).
    reqs: Slots<Pending>,
    dev_inflight: usize,

    /// Reused vector for synchronous completions.
    scratch: Vec<Completion>,
    out: Batch,
    sending: Batch,
    iovs: Vec<libc::iovec>,
    iov_pos: usize,
    msg: libc::msghdr,
    tx_armed: bool,
    /// Last progress of the send in flight.
    tx_since: Instant,
}

impl Conn {
    /// A connection at `key` of its worker, whose device requests carry `route`.
    pub fn new(key: Key, route: u16, qidx: Key, c: ConnSetup, now: Instant) -> Box<Conn> {
        let session = Session {
            max_block: c.export.max_block(),
            read_only: c.export.is_read_only(),
            structured: c.structured,
            meta: c.meta,
        };
        Self::tune_socket(&c.fd);
        Box::new(Conn {
            key,
            route,
            fd: c.fd,
            peer: c.peer,
            export: c.export,
            qidx,
            session,
            state: State::Open,
            dirty: false,
            slot: c.slot,
            unreplied: 0,
            wait_mem: false,
            rbuf: vec![0u8; RBUF_BYTES].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            rbuf_pins: 0,
            rx_armed: false,
            rx_into_payload: false,
            payload: None,
            skip: 0,
            skip_reply: None,
            mid_since: None,
            reqs: Slots::new(MAX_REQUESTS),
            dev_inflight: 0,
            scratch: Vec::new(),
            out: Batch::default(),
            sending: Batch::default(),
            iovs: Vec::new(),
            iov_pos: 0,
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
            msg: unsafe { std::mem::zeroed() },
            tx_armed: false,
            tx_since: now,
        })
    }

    /// Enlarge a Unix socket's send buffer (see [`UNIX_SNDBUF_BYTES`]); TCP keeps its
    /// auto-tuning. Best effort: a failure only costs speed.
    fn tune_socket(fd: &OwnedFd) {
        if sys::socket_family(fd.as_fd()).ok() != Some(libc::AF_UNIX) {
            return;
        }
        if let Err(e) = sys::set_send_buffer(fd.as_fd(), UNIX_SNDBUF_BYTES) {
            tracing::debug!(error = %e, "could not enlarge SO_SNDBUF");
        }
    }

    fn ud(&self, kind: Kind) -> u64 {
        Tag::new(0, kind, self.key).raw()
    }

    /// True once the connection is closed and no SQE of it is in flight: it may be freed.
    pub fn finished(&self) -> bool {
        self.state == State::Closing && !self.rx_armed && !self.tx_armed && self.dev_inflight == 0
    }

    /// Start closing (idempotent). `why` is logged once, at info level when abnormal.
    pub fn close(&mut self, why: &str, abnormal: bool, pool: &mut Pool) {
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
        let _ = sys::shutdown(self.fd.as_fd());
        // The charges need no settling: the slot gives everything back with the Conn.
        for it in self.out.items.drain(..) {
            if let Some(b) = it.data {
                pool.put(b);
            }
        }
        self.out.hdr.clear();
    }

    /// Drop the client if a deadline passed (see the module doc); true if it was.
    pub fn check_deadlines(&mut self, now: Instant, stall: Duration, pool: &mut Pool) -> bool {
        if self.state == State::Closing {
            return false;
        }
        let secs = stall.as_secs();
        if self.tx_armed && now.saturating_duration_since(self.tx_since) > stall {
            let why = format!("it has not read its replies for {secs} s");
            self.close(&why, true, pool);
            return true;
        }
        if self.rx_armed
            && self
                .mid_since
                .is_some_and(|t| now.saturating_duration_since(t) > stall)
        {
            let why = format!("it left a request half sent for {secs} s");
            self.close(&why, true, pool);
            return true;
        }
        false
    }

    /// The next request waits for memory and nothing of this connection will complete
    /// to retry it: the worker retries on its tick.
    pub fn waits_for_memory(&self) -> bool {
        self.wait_mem && self.state == State::Open
    }

    /// Bytes charged to this connection now.
    pub fn held(&self) -> usize {
        self.slot.held()
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
                if Tag::from_raw(c.tag).route() == self.route {
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

    /// At a bound: no more requests are parsed (nor received) until replies drain.
    fn blocked(&self) -> bool {
        self.unreplied >= MAX_REQUESTS || self.wait_mem
    }

    /// Bytes of a request are here but not all of them.
    fn mid_request(&self) -> bool {
        self.payload.is_some() || self.skip > 0 || self.rend > self.rstart
    }

    // ---------------------------------------------------------------- receive

    fn arm_recv(&mut self, cx: &mut Cx<'_>) {
        if self.rx_armed || self.state != State::Open {
            return;
        }
        let fd = types::Fd(self.fd.as_raw_fd());
        let (ptr, len, into_payload) = if let Some(p) = &self.payload {
            let Some(buf) = self.reqs.get_mut(p.slot).and_then(|r| r.buf.as_mut()) else {
                self.close("internal error: lost a write payload", true, cx.pool);
                return;
            };
            let len = buf.len() - p.filled;
            // SAFETY: filled < len ≤ capacity, so the pointer stays inside the buffer.
            (unsafe { buf.as_mut_ptr().add(p.filled) }, len, true)
        } else {
            if self.blocked() && self.skip == 0 {
                // Back-pressure: the client waits for us, so its clock stops.
                self.mid_since = None;
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
                .and_then(|r| r.buf.as_ref())
                .is_some_and(|b| p.filled >= b.len());
            if complete {
                self.payload = None;
                self.mid_since = None;
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
        self.wait_mem = false;
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
                if let Some((h, c, e, charge)) = self.skip_reply.take() {
                    self.reply(h, c, e, charge);
                }
                self.mid_since = None;
                continue;
            }
            if self.payload.is_some() || self.unreplied >= MAX_REQUESTS {
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
            let action = request::decide(&h, &self.session, &info);
            let after = self.rend - self.rstart - proto::REQUEST_HEADER_BYTES;
            let len = h.len as usize;
            let borrow =
                matches!(action, Action::Write { .. }) && after >= len && len <= BORROW_MAX_BYTES;
            let charge = match action {
                Action::Disconnect => 0,
                Action::Read => REQ_BYTES + buf_bytes(len),
                Action::Write { .. } if !borrow => REQ_BYTES + buf_bytes(len),
                Action::BlockStatus => STATUS_BYTES,
                _ => REQ_BYTES,
            };
            if !self.slot.try_charge(charge) {
                // Leave the header where it is; retried when memory frees.
                self.wait_mem = true;
                break;
            }
            self.rstart += proto::REQUEST_HEADER_BYTES;
            if action.replies() {
                self.unreplied += 1;
            }
            self.mid_since = None;
            self.request(h, action, charge, borrow, cx);
            if self.state != State::Open {
                break;
            }
        }
        // The clock of a request left half sent starts when its bytes stop coming.
        if !self.mid_request() {
            self.mid_since = None;
        } else if self.mid_since.is_none() {
            self.mid_since = Some(cx.now);
        }
    }

    fn request(
        &mut self,
        h: RequestHeader,
        action: Action,
        charge: usize,
        borrow: bool,
        cx: &mut Cx<'_>,
    ) {
        let (off, len) = (h.offset, u64::from(h.len));
        match action {
            Action::Reply { error, skip: 0 } => self.reply(h.handle, h.cmd, error, charge),
            Action::Reply { error, skip } => {
                // Skip the payload to stay in sync, then answer.
                self.skip = u64::from(skip);
                self.skip_reply = Some((h.handle, h.cmd, error, charge));
            }
            Action::Read => {
                let Some(slot) = self.alloc(&h, None, charge, false, cx) else {
                    return;
                };
                let buf = cx.pool.get(h.len as usize);
                self.submit(slot, Op::Read, off, len, Buffer::Owned(buf), cx);
            }
            Action::Write { fua } if borrow => {
                let Some(slot) = self.alloc(&h, None, charge, true, cx) else {
                    return;
                };
                let n = h.len as usize;
                // Zero copy: the device writes straight from the receive buffer.
                let iov = libc::iovec {
                    // SAFETY: rstart + n ≤ rend ≤ rbuf.len() (checked by the caller).
                    iov_base: unsafe { self.rbuf.as_mut_ptr().add(self.rstart) }.cast(),
                    iov_len: n,
                };
                // SAFETY: the bytes lie in `rbuf`, owned by this boxed Conn, which is not
                // freed while a device request is in flight (`finished`). While
                // `rbuf_pins` > 0 the buffer is never compacted or reset, and receives only
                // fill it past `rend`, so nothing writes these bytes until the completion
                // (`on_done`) unpins them.
                let v = unsafe { IoVecs::new(vec![iov]) };
                self.rstart += n;
                self.rbuf_pins += 1;
                self.submit(slot, Op::Write { fua }, off, len, Buffer::Borrowed(v), cx);
            }
            Action::Write { .. } => {
                let n = h.len as usize;
                let have = (self.rend - self.rstart).min(n);
                let mut buf = cx.pool.get(n);
                buf.as_mut_slice()[..have]
                    .copy_from_slice(&self.rbuf[self.rstart..self.rstart + have]);
                self.rstart += have;
                let Some(slot) = self.alloc(&h, Some(buf), charge, false, cx) else {
                    return;
                };
                if have == n {
                    self.submit_write(slot, cx);
                } else {
                    self.payload = Some(Payload { slot, filled: have });
                }
            }
            Action::Disconnect => self.state = State::Draining,
            Action::Flush => {
                let Some(slot) = self.alloc(&h, None, charge, false, cx) else {
                    return;
                };
                self.submit(slot, Op::Flush, 0, 0, Buffer::None, cx);
            }
            Action::Trim => {
                let Some(slot) = self.alloc(&h, None, charge, false, cx) else {
                    return;
                };
                self.submit(slot, Op::Discard, off, len, Buffer::None, cx);
            }
            Action::WriteZeroes { unmap } => {
                let Some(slot) = self.alloc(&h, None, charge, false, cx) else {
                    return;
                };
                self.submit(slot, Op::WriteZeroes { unmap }, off, len, Buffer::None, cx);
            }
            Action::BlockStatus => self.block_status(&h, charge),
        }
    }

    fn block_status(&mut self, h: &RequestHeader, charge: usize) {
        let extents = match self.export.dev.block_status(h.offset, u64::from(h.len)) {
            Ok(x) => x,
            Err(e) => {
                let errno = proto::nbd_error(e.kind().errno());
                return self.reply(h.handle, h.cmd, errno, charge);
            }
        };
        let mut descs = Vec::with_capacity(extents.len().min(MAX_STATUS_EXTENTS));
        let mut left = u64::from(h.len);
        for x in extents {
            if left == 0 || descs.len() >= MAX_STATUS_EXTENTS {
                break;
            }
            let len = x.len.min(left);
            if len == 0 {
                continue;
            }
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
            return self.reply(h.handle, h.cmd, err::EIO, charge);
        }
        let off = self.out.hdr.len();
        proto::encode_block_status(h.handle, BASE_ALLOCATION_ID, &descs, &mut self.out.hdr);
        self.push_item(off, None, charge);
    }

    // ---------------------------------------------------------------- in-flight table

    /// Record a request; `None` (and the connection closed) if the table is full, which
    /// the [`MAX_REQUESTS`] bound on unreplied requests rules out.
    fn alloc(
        &mut self,
        h: &RequestHeader,
        buf: Option<IoBuf>,
        charge: usize,
        borrowed: bool,
        cx: &mut Cx<'_>,
    ) -> Option<Key> {
        let p = Pending {
            handle: h.handle,
            cmd: h.cmd,
            flags: h.flags,
            offset: h.offset,
            len: h.len,
            charge,
            buf,
            flushing: false,
            borrowed,
            zero_retry: false,
        };
        match self.reqs.insert(p) {
            Ok(key) => Some(key),
            Err(p) => {
                if let Some(b) = p.buf {
                    cx.pool.put(b);
                }
                self.close("internal error: request table full", true, cx.pool);
                None
            }
        }
    }

    fn submit(&mut self, slot: Key, op: Op, offset: u64, len: u64, buf: Buffer, cx: &mut Cx<'_>) {
        self.dev_inflight += 1;
        let req = Request {
            op,
            offset,
            len,
            buf,
            tag: Tag::new(self.route, Kind::IO, slot).raw(),
        };
        cx.queue.submit(cx.ring, req, cx.done);
    }

    fn submit_write(&mut self, slot: Key, cx: &mut Cx<'_>) {
        let Some(p) = self.reqs.get_mut(slot) else {
            return;
        };
        let Some(buf) = p.buf.take() else { return };
        let op = Op::Write {
            fua: p.flags & cmd_flag::FUA != 0,
        };
        let (offset, len) = (p.offset, u64::from(p.len));
        self.submit(slot, op, offset, len, Buffer::Owned(buf), cx);
    }

    /// A device completion for this connection (its tag's key is the request's).
    pub fn on_done(&mut self, c: Completion, cx: &mut Cx<'_>) {
        self.dev_inflight = self.dev_inflight.saturating_sub(1);
        let slot = Tag::from_raw(c.tag).key();
        let buf = c.buf.into_owned();
        let closing = self.state == State::Closing;
        let mut result = c.result;
        let unsupported = matches!(result, Err(libc::EOPNOTSUPP));
        if let (false, true, Some(p)) = (closing, unsupported, self.reqs.get_mut(slot)) {
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
            && self.reqs.get(slot).is_some_and(|p| {
                matches!(p.cmd, cmd::TRIM | cmd::WRITE_ZEROES)
                    && p.flags & cmd_flag::FUA != 0
                    && !p.flushing
            });
        if fua_flush {
            // Trim and write-zeroes have no FUA of their own: flush after them.
            if let Some(p) = self.reqs.get_mut(slot) {
                p.flushing = true;
            }
            self.submit(slot, Op::Flush, 0, 0, Buffer::None, cx);
            return;
        }
        let Some(mut p) = self.reqs.remove(slot) else {
            tracing::warn!(tag = c.tag, "completion for an unknown NBD request");
            return;
        };
        if p.borrowed {
            self.rbuf_pins = self.rbuf_pins.saturating_sub(1);
        }
        let keep = match (closing, p.cmd, result, buf) {
            (false, cmd::READ, Ok(()), Some(b)) => Some(b),
            (_, _, _, b) => {
                if let Some(b) = b {
                    // A write's payload (or a failed read's buffer) is done with.
                    let cap = b.capacity();
                    p.charge = p.charge.saturating_sub(cap);
                    self.slot.uncharge(cap);
                    cx.pool.put(b);
                }
                None
            }
        };
        if closing {
            return;
        }
        match (result, keep) {
            (Ok(()), Some(b)) => self.reply_read(p.handle, p.offset, b, p.charge),
            (Ok(()), None) => self.reply(p.handle, p.cmd, 0, p.charge),
            (Err(e), _) => self.reply(p.handle, p.cmd, proto::nbd_error(e), p.charge),
        }
    }

    // ---------------------------------------------------------------- replies

    fn push_item(&mut self, hdr_off: usize, data: Option<IoBuf>, charge: usize) {
        let hdr_len = self.out.hdr.len() - hdr_off;
        self.out.items.push(Item {
            hdr_off,
            hdr_len,
            data,
            charge,
        });
    }

    /// A reply without data: success (`error` 0) or an error.
    fn reply(&mut self, handle: u64, command: u16, error: u32, charge: usize) {
        let off = self.out.hdr.len();
        let structured = self.session.structured;
        if error == 0 {
            if structured && command == cmd::READ {
                proto::encode_none_chunk(handle, &mut self.out.hdr);
            } else {
                proto::encode_simple_reply(handle, 0, &mut self.out.hdr);
            }
        } else if structured && matches!(command, cmd::READ | cmd::BLOCK_STATUS) {
            proto::encode_error_chunk(handle, error, &mut self.out.hdr);
        } else {
            proto::encode_simple_reply(handle, error, &mut self.out.hdr);
        }
        self.push_item(off, None, charge);
    }

    fn reply_read(&mut self, handle: u64, offset: u64, data: IoBuf, charge: usize) {
        let off = self.out.hdr.len();
        if self.session.structured {
            // One chunk for the whole read, so NBD_CMD_FLAG_DF is always honoured. The
            // length is at most the maximum block size, far below u32::MAX.
            let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
            proto::encode_read_chunk_header(handle, offset, len, &mut self.out.hdr);
        } else {
            proto::encode_simple_reply(handle, 0, &mut self.out.hdr);
        }
        self.push_item(off, Some(data), charge);
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
            self.tx_since = cx.now;
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
    pub fn on_send(&mut self, res: i32, pool: &mut Pool, now: Instant) {
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
            self.tx_since = now;
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
        // The batch is sent (or the connection is closing): give back its charges and
        // recycle its buffers.
        for it in self.sending.items.drain(..) {
            self.slot.uncharge(it.charge);
            self.unreplied = self.unreplied.saturating_sub(1);
            if let Some(b) = it.data {
                pool.put(b);
            }
        }
        self.sending.hdr.clear();
        if self.sending.hdr.capacity() > ARENA_KEEP_BYTES {
            self.sending.hdr.shrink_to(ARENA_KEEP_BYTES);
        }
        self.iovs.clear();
        self.iov_pos = 0;
    }
}
