//! The per-thread driver: one iSCSI session per [`IscsiQueue`], its socket on the
//! thread's io_uring, block requests turned into SCSI commands.
//!
//! Socket I/O is readiness-based: the ring carries `POLL_ADD` SQEs (readable, writable),
//! a `NOP` that marks the end of a batch of submissions, and a `TIMEOUT` for the timers;
//! the bytes move with non-blocking `recv`/`sendmsg` from the completion handler. None of
//! these SQEs points into the queue's memory (the timeouts point to statics), so the
//! queue can be dropped while they are in flight: a late CQE carries this queue's random
//! epoch as the generation of its [`Tag`]'s key and is ignored by whoever owns the id
//! next. A batch of requests
//! submitted in one event-loop turn leaves in one `sendmsg` (the NOP's completion comes
//! after the turn), sent straight from the requests' buffers.
//!
//! States: `Down` (waiting to reconnect) → `Connecting` (non-blocking connect) →
//! `LoggingIn` → `Setup` (REPORT LUNS, INQUIRY VPD 0x80/0x83 checked against the
//! identity recorded at open, READ CAPACITY(16)) → `Ready`. Requests that arrive before
//! `Ready` are held. A connection failure of any kind (reset, EOF, bad PDU, digest,
//! timeout) takes the unfinished commands back and holds them for replay on the next
//! session; after `replacement_timeout` without a session they fail with `EIO`, and
//! new ones fail at once, while logins keep being tried. A permanent failure (identity
//! changed, LUN gone, CHAP refused) fails everything and is logged once.

use super::chap::ChapAlg;
use super::login::{Login, LoginConfig, LoginDone, Step};
use super::pdu::{self, FrameCfg, Pdu};
use super::session::{Command, Dir, Event, Finished, Outcome, Session};
use super::Inner;
use crate::backend::scsi::{self, asc, key, status, Capacity, Cdb, Sense};
use crate::buf::{Buffer, IoBuf};
use crate::engine::{Cqe, OwnerId, Ring};
use crate::request::{Completion, Op, Request};
use crate::slots::{Key, Slots};
use crate::tag::{Kind, Tag};
use crate::Queue;
use io_uring::{opcode, types};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receive buffer: room for several PDUs of the largest data segment Ember accepts.
const RBUF_BYTES: usize = 1 << 20;
/// Largest login response accepted.
const LOGIN_MAX_DATA: u32 = 64 << 10;
/// Most iovecs in one sendmsg.
const MAX_IOVS: usize = 1024;
/// Commands of one split request (discard, write-zeroes) in flight at once.
const MAX_PARTS_IN_FLIGHT: u32 = 4;
/// Largest chunk of zeros written when WRITE SAME is not available.
const ZERO_CHUNK_BYTES: u64 = 1 << 20;
/// Retries of one command for unit attentions, aborts and the like.
const MAX_RETRIES: u32 = 8;
/// First back-off for BUSY / TASK SET FULL / NOT READY; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Reconnect back-off: first, then doubling up to the cap.
const RECONNECT_FIRST: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Reconnect interval after a permanent failure (the operator may fix the target).
const RECONNECT_FAILED: Duration = Duration::from_secs(30);

/// Timer periods. Statics, so an in-flight TIMEOUT SQE never points into a dropped queue.
static TICK_FAST: types::Timespec = types::Timespec::new().nsec(50_000_000);
static TICK_SLOW: types::Timespec = types::Timespec::new().sec(1);

/// Tag kinds of the queue's SQEs (their key is the queue's epoch).
const K_POLL_IN: Kind = Kind::new(1);
const K_POLL_OUT: Kind = Kind::new(2);
const K_FLUSH: Kind = Kind::new(3);
const K_TIMER: Kind = Kind::new(4);

/// Command cookies: a request's [`Tag`] (bit 63 clear: its route is 0), or an internal
/// command.
const INTERNAL: u64 = 1 << 63;

/// Internal commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Internal {
    ReportLuns,
    StdInquiry,
    Vpd(u8),
    ReadCapacity,
}

impl Internal {
    fn code(self) -> u64 {
        match self {
            Internal::ReportLuns => 1,
            Internal::StdInquiry => 2,
            Internal::ReadCapacity => 3,
            Internal::Vpd(p) => 0x100 | u64::from(p),
        }
    }
    fn from_code(c: u64) -> Option<Internal> {
        match c {
            1 => Some(Internal::ReportLuns),
            2 => Some(Internal::StdInquiry),
            3 => Some(Internal::ReadCapacity),
            c if c & 0x100 != 0 => Some(Internal::Vpd((c & 0xff) as u8)),
            _ => None,
        }
    }
    fn command(self) -> Command {
        let (cdb, len) = match self {
            Internal::ReportLuns => (Cdb::report_luns(4096), 4096),
            Internal::StdInquiry => (Cdb::inquiry(None, 96), 96),
            Internal::Vpd(p) => (Cdb::inquiry(Some(p), 1024), 1024),
            Internal::ReadCapacity => (Cdb::read_capacity16(), scsi::READ_CAPACITY16_LEN),
        };
        Command {
            cdb,
            dir: Dir::Read,
            len,
            buf: Buffer::Owned(IoBuf::new(len as usize)),
            cookie: INTERNAL | self.code(),
        }
    }
}

/// Whether the queue runs one login for `IscsiDevice::open` or serves I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// One attempt; the full set-up; the first failure is final.
    Probe,
    /// One attempt; REPORT LUNS only (the target's LUN list, for `report_luns`); the
    /// first failure is final.
    Discover,
    /// Serve requests, reconnecting as long as it lives.
    Serve,
}

/// Where the connection is.
#[derive(Debug)]
enum State {
    Down {
        retry_at: Instant,
    },
    Connecting {
        deadline: Instant,
    },
    LoggingIn {
        login: Box<Login>,
        deadline: Instant,
    },
    Setup {
        session: Box<Session>,
        steps: VecDeque<Internal>,
        running: bool,
    },
    Ready {
        session: Box<Session>,
    },
}

/// A block request being served.
struct Req {
    tag: u64,
    op: Op,
    offset: u64,
    len: u64,
    /// The request's buffer while no command holds it.
    buf: Buffer,
    /// Commands of this request in flight.
    parts: u32,
    /// Next byte to cover (split requests).
    next: u64,
    /// End of what the request covers (`offset + 1` for a flush: one command).
    end: u64,
    result: Result<(), i32>,
    started: Instant,
    retries: u32,
    /// Held for (re)issue at this time.
    retry_at: Option<Instant>,
    /// The request's own commands waiting to be re-sent (replay, retry).
    replay: Vec<Command>,
}

/// The session's account of probe and setup results.
#[derive(Debug, Default)]
struct SetupAcc {
    luns: Option<Vec<u16>>,
    serial: Option<String>,
    designators: Option<Vec<scsi::Designator>>,
    vpd_pages: Vec<u8>,
}

/// One session to the LUN, owned by one I/O thread.
pub struct IscsiQueue {
    inner: Arc<Inner>,
    mode: Mode,
    owner: OwnerId,
    /// Random key of every SQE of this queue (slot 0, a 15-bit generation).
    epoch: Key,
    isid: [u8; 6],
    state: State,
    fd: Option<OwnedFd>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Login bytes waiting to go out.
    tx: Vec<u8>,
    tx_sent: usize,
    /// Block requests in flight, by the key in their commands' cookies (a [`Tag`]).
    /// Bounded by the front ends' queue depths; a full table fails a request with
    /// `EAGAIN`.
    reqs: Slots<Req>,
    /// Requests waiting for the session (or a back-off), in arrival order.
    held: VecDeque<Key>,
    poll_in: bool,
    poll_out: bool,
    flush: bool,
    timer: bool,
    /// When the current outage began.
    down_since: Option<Instant>,
    reconnects: u32,
    /// A permanent failure: its reason.
    failed: Option<String>,
    /// The last connection failure, for the probe's error.
    last_error: Option<String>,
    acc: SetupAcc,
    /// Requests to complete at the end of the current call.
    pending_done: Vec<Key>,
    iovs: Vec<libc::iovec>,
    chap_used: Option<ChapAlg>,
    logged_in_once: bool,
}

impl std::fmt::Debug for IscsiQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiQueue")
            .field("owner", &self.owner)
            .field("state", &self.state_name())
            .field("in_flight", &self.reqs.len())
            .finish_non_exhaustive()
    }
}

fn errno_now() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl IscsiQueue {
    pub(super) fn new(inner: Arc<Inner>, ring: &mut Ring, mode: Mode) -> IscsiQueue {
        let owner = ring.new_owner();
        let mut r = [0u8; 2];
        let _ = getrandom::fill(&mut r);
        let epoch = Key::masked(0, u32::from(u16::from_le_bytes(r) & 0x7fff));
        let isid = inner.next_isid();
        let now = Instant::now();
        let mut q = IscsiQueue {
            inner,
            mode,
            owner,
            epoch,
            isid,
            state: State::Down { retry_at: now },
            fd: None,
            rbuf: vec![0u8; RBUF_BYTES],
            rstart: 0,
            rend: 0,
            tx: Vec::new(),
            tx_sent: 0,
            reqs: Slots::new(Key::MAX_SLOTS),
            held: VecDeque::new(),
            poll_in: false,
            poll_out: false,
            flush: false,
            timer: false,
            down_since: Some(now),
            reconnects: 0,
            failed: None,
            last_error: None,
            acc: SetupAcc::default(),
            pending_done: Vec::new(),
            iovs: Vec::new(),
            chap_used: None,
            logged_in_once: false,
        };
        q.connect(ring, now);
        q.arm_timer(ring);
        q
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::Down { .. } => "down",
            State::Connecting { .. } => "connecting",
            State::LoggingIn { .. } => "logging in",
            State::Setup { .. } => "setup",
            State::Ready { .. } => "ready",
        }
    }

    /// Ready to serve (the probe waits for this).
    pub(super) fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    /// A final failure (the probe stops on this): permanent, or any in probe mode.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed.clone().or_else(|| {
            (self.mode != Mode::Serve && self.reconnects > 0)
                .then(|| self.last_error.clone())
                .flatten()
        })
    }

    /// The last attempt's failure once an attempt failed (the health check's one try).
    pub(super) fn attempt_failed(&self) -> Option<String> {
        (self.reconnects > 0).then(|| {
            self.last_error
                .clone()
                .unwrap_or_else(|| "the connection failed".into())
        })
    }

    /// The CHAP algorithm the last login used.
    pub(super) fn chap_used(&self) -> Option<ChapAlg> {
        self.chap_used
    }

    /// The parameters of the session, once logged in.
    pub(super) fn negotiated(&self) -> Option<super::text::Negotiated> {
        match &self.state {
            State::Setup { session, .. } | State::Ready { session } => Some(*session.params()),
            _ => None,
        }
    }

    fn ud(&self, kind: Kind) -> u64 {
        Tag::new(self.owner, kind, self.epoch).raw()
    }

    fn push(&mut self, ring: &mut Ring, e: io_uring::squeue::Entry) -> bool {
        // SAFETY: the entries built here are POLL_ADD and NOP (no memory) and TIMEOUT
        // pointing to a `static` timespec, so nothing the kernel reads can be freed.
        match unsafe { ring.push(&e) } {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(error = %err, "io_uring push failed");
                false
            }
        }
    }

    fn arm_poll(&mut self, ring: &mut Ring, out: bool) {
        let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        if (out && self.poll_out) || (!out && self.poll_in) {
            return;
        }
        let (mask, kind) = if out {
            (libc::POLLOUT, K_POLL_OUT)
        } else {
            (libc::POLLIN, K_POLL_IN)
        };
        let e = opcode::PollAdd::new(types::Fd(fd), mask as u32)
            .build()
            .user_data(self.ud(kind));
        if self.push(ring, e) {
            if out {
                self.poll_out = true;
            } else {
                self.poll_in = true;
            }
        }
    }

    fn arm_flush(&mut self, ring: &mut Ring) {
        if self.flush {
            return;
        }
        let e = opcode::Nop::new().build().user_data(self.ud(K_FLUSH));
        self.flush = self.push(ring, e);
    }

    fn arm_timer(&mut self, ring: &mut Ring) {
        if self.timer {
            return;
        }
        let fast = !matches!(self.state, State::Ready { .. })
            || self
                .held
                .iter()
                .any(|&i| self.reqs.get(i).is_some_and(|r| r.retry_at.is_some()));
        let ts: &'static types::Timespec = if fast { &TICK_FAST } else { &TICK_SLOW };
        let e = opcode::Timeout::new(std::ptr::from_ref(ts))
            .build()
            .user_data(self.ud(K_TIMER));
        self.timer = self.push(ring, e);
    }

    // ---- connection lifecycle ----

    fn connect(&mut self, ring: &mut Ring, now: Instant) {
        let addr = self.inner.portal;
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            self.conn_failed(ring, now, format!("socket: {e}"), false);
            return;
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads an int from a live local.
        unsafe {
            libc::setsockopt(
                raw,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let (sa, len) = sockaddr(&addr);
        // SAFETY: `sa` is a valid sockaddr of `len` bytes for the call's duration.
        let r = unsafe { libc::connect(raw, std::ptr::from_ref(&sa).cast(), len) };
        if r < 0 && errno_now() != libc::EINPROGRESS {
            let e = std::io::Error::last_os_error();
            self.conn_failed(ring, now, format!("connect to {addr}: {e}"), false);
            return;
        }
        self.fd = Some(fd);
        self.rstart = 0;
        self.rend = 0;
        self.tx.clear();
        self.tx_sent = 0;
        self.state = State::Connecting {
            deadline: now + self.inner.cfg.login_timeout,
        };
        self.arm_poll(ring, true);
    }

    fn connected(&mut self, ring: &mut Ring, now: Instant) {
        let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes an int and its length into live locals.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                std::ptr::from_mut(&mut err).cast(),
                &raw mut len,
            )
        };
        if r < 0 || err != 0 {
            let e = std::io::Error::from_raw_os_error(if r < 0 { errno_now() } else { err });
            let m = format!("connect to {}: {e}", self.inner.portal);
            self.conn_failed(ring, now, m, false);
            return;
        }
        let cfg = LoginConfig {
            initiator_name: self.inner.cfg.initiator_name.clone(),
            target_name: self.inner.cfg.target.clone(),
            isid: self.isid,
            chap: self.inner.cfg.chap.clone(),
            offer: self.inner.cfg.offer(),
        };
        let (login, first) = Login::new(cfg, 1);
        self.tx = first;
        self.tx_sent = 0;
        self.state = State::LoggingIn {
            login: Box::new(login),
            deadline: now + self.inner.cfg.login_timeout,
        };
        self.send(ring, now);
        self.arm_poll(ring, false);
    }

    fn close_fd(&mut self) {
        if let Some(fd) = self.fd.take() {
            // SAFETY: shutdown(2) on a descriptor we own. It ends the connection even
            // while a POLL_ADD SQE still holds a reference to the socket.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// The connection failed: hold its commands for replay and schedule a reconnect.
    fn conn_failed(&mut self, ring: &mut Ring, now: Instant, reason: String, permanent: bool) {
        let was_ready = matches!(self.state, State::Ready { .. } | State::Setup { .. });
        let state = std::mem::replace(&mut self.state, State::Down { retry_at: now });
        self.close_fd();
        if let State::Setup { mut session, .. } | State::Ready { mut session } = state {
            let cmds = session.take_commands();
            let fin = session.take_finished();
            self.on_finished(ring, fin, now);
            for c in cmds {
                self.hold_command(c);
            }
        }
        if self.down_since.is_none() {
            self.down_since = Some(now);
        }
        self.reconnects += 1;
        if permanent {
            if self.failed.is_none() {
                tracing::error!(target_name = %self.inner.cfg.target, lun = self.inner.cfg.lun, reason = %reason, "iSCSI LUN failed; its I/O fails until it is fixed");
            }
            if self.mode == Mode::Serve {
                self.inner.set_fault(&reason);
            }
            self.failed = Some(reason.clone());
            self.fail_all(libc::EIO);
        } else if was_ready || self.reconnects == 1 || self.reconnects.is_power_of_two() {
            tracing::warn!(
                portal = %self.inner.portal,
                target_name = %self.inner.cfg.target,
                attempt = self.reconnects,
                reason = %reason,
                "iSCSI connection lost; logging in again"
            );
        }
        self.last_error = Some(reason);
        let wait = if self.failed.is_some() {
            RECONNECT_FAILED
        } else {
            let n = self.reconnects.saturating_sub(1).min(8);
            (RECONNECT_FIRST * 2u32.pow(n)).min(RECONNECT_MAX)
        };
        self.state = State::Down {
            retry_at: now + wait,
        };
        self.arm_timer(ring);
    }

    fn login_done(&mut self, ring: &mut Ring, d: LoginDone, now: Instant) {
        self.chap_used = d.chap;
        let session = Session::new(
            d.params,
            self.inner.cfg.timeouts,
            scsi::encode_lun(self.inner.cfg.lun),
            d.start_sn(),
            now,
        );
        tracing::debug!(
            tsih = d.tsih,
            header_digest = d.params.header_digest,
            data_digest = d.params.data_digest,
            max_send = d.params.max_send_data_segment,
            first_burst = d.params.first_burst,
            max_burst = d.params.max_burst,
            initial_r2t = d.params.initial_r2t,
            immediate_data = d.params.immediate_data,
            "iSCSI login done"
        );
        let mut steps = VecDeque::new();
        steps.push_back(Internal::ReportLuns);
        match self.mode {
            Mode::Probe => {
                steps.push_back(Internal::StdInquiry);
                steps.push_back(Internal::Vpd(0x00));
            }
            Mode::Serve => {
                steps.push_back(Internal::Vpd(0x80));
                steps.push_back(Internal::Vpd(0x83));
            }
            Mode::Discover => {}
        }
        if self.mode != Mode::Discover {
            steps.push_back(Internal::ReadCapacity);
        }
        self.acc = SetupAcc::default();
        self.state = State::Setup {
            session: Box::new(session),
            steps,
            running: false,
        };
        self.setup_next(ring, now);
    }

    fn setup_next(&mut self, ring: &mut Ring, now: Instant) {
        let State::Setup {
            session,
            steps,
            running,
        } = &mut self.state
        else {
            return;
        };
        if *running {
            return;
        }
        if let Some(step) = steps.front().copied() {
            *running = true;
            let _ = session.submit(step.command(), now);
            self.send(ring, now);
            return;
        }
        // Set-up complete: check the identity, then serve.
        if let Err(m) = self.check_identity() {
            self.conn_failed(ring, now, m, true);
            return;
        }
        let State::Setup { session, .. } =
            std::mem::replace(&mut self.state, State::Down { retry_at: now })
        else {
            return;
        };
        if self.down_since.take().is_some() && self.logged_in_once {
            tracing::info!(target_name = %self.inner.cfg.target, lun = self.inner.cfg.lun, held = self.held.len(), "iSCSI session re-established; replaying held requests");
        }
        self.logged_in_once = true;
        self.reconnects = 0;
        self.failed = None;
        if self.mode == Mode::Serve {
            self.inner.clear_fault();
        }
        self.state = State::Ready { session };
        self.release_held(now);
        self.send(ring, now);
    }

    fn check_identity(&mut self) -> Result<(), String> {
        let acc = std::mem::take(&mut self.acc);
        let lun = self.inner.cfg.lun;
        if self.mode == Mode::Discover {
            let mut info = self.inner.info.lock().unwrap_or_else(|e| e.into_inner());
            info.luns = acc.luns;
            return Ok(());
        }
        if let Some(luns) = &acc.luns {
            if !luns.contains(&lun) {
                return Err(format!(
                    "LUN {lun} does not exist on target {} (it has LUNs {luns:?})",
                    self.inner.cfg.target
                ));
            }
        }
        let now_id = scsi::LunIdentity {
            designators: acc.designators.unwrap_or_default(),
            serial: acc.serial,
        };
        let mut info = self.inner.info.lock().unwrap_or_else(|e| e.into_inner());
        match self.mode {
            Mode::Probe | Mode::Discover => {
                info.identity = now_id;
                Ok(())
            }
            Mode::Serve => {
                if info.identity != now_id {
                    return Err(format!(
                        "LUN identity changed: was {}, now {}; refusing to use it",
                        info.identity, now_id
                    ));
                }
                Ok(())
            }
        }
    }

    // ---- socket I/O ----

    fn send(&mut self, ring: &mut Ring, now: Instant) {
        let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        loop {
            self.iovs.clear();
            let session = match &mut self.state {
                State::Setup { session, .. } | State::Ready { session } => Some(session),
                _ => None,
            };
            match &session {
                Some(s) => s.iovecs(&mut self.iovs, MAX_IOVS),
                None => {
                    if self.tx_sent < self.tx.len() {
                        self.iovs.push(libc::iovec {
                            iov_base: self.tx[self.tx_sent..].as_ptr() as *mut libc::c_void,
                            iov_len: self.tx.len() - self.tx_sent,
                        });
                    }
                }
            }
            if self.iovs.is_empty() {
                return;
            }
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iovs.as_mut_ptr();
            msg.msg_iovlen = self.iovs.len();
            // SAFETY: the iovecs point into the session's headers and the buffers of its
            // commands (or into `tx`), none of which changes until this call returns.
            let n = unsafe {
                libc::sendmsg(fd, &raw const msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                let e = errno_now();
                if e == libc::EAGAIN || e == libc::EWOULDBLOCK {
                    self.arm_poll(ring, true);
                } else if e != libc::EINTR {
                    let m = format!("send: {}", std::io::Error::from_raw_os_error(e));
                    self.conn_failed(ring, now, m, false);
                }
                return;
            }
            let n = n.unsigned_abs();
            match &mut self.state {
                State::Setup { session, .. } | State::Ready { session } => {
                    session.advance(n);
                    let fin = session.take_finished();
                    if !fin.is_empty() {
                        self.on_finished(ring, fin, now);
                    }
                }
                _ => self.tx_sent += n,
            }
        }
    }

    fn recv(&mut self, ring: &mut Ring, now: Instant) {
        loop {
            let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
                return;
            };
            if self.rend == self.rbuf.len() {
                if self.rstart == 0 {
                    self.conn_failed(ring, now, "receive buffer overrun".into(), false);
                    return;
                }
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let room = &mut self.rbuf[self.rend..];
            // SAFETY: recv writes at most `room.len()` bytes into `room`, which we own.
            let n =
                unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = errno_now();
                if e == libc::EAGAIN || e == libc::EWOULDBLOCK {
                    self.arm_poll(ring, false);
                } else if e != libc::EINTR {
                    let m = format!("receive: {}", std::io::Error::from_raw_os_error(e));
                    self.conn_failed(ring, now, m, false);
                }
                return;
            }
            if n == 0 {
                self.conn_failed(ring, now, "the target closed the connection".into(), false);
                return;
            }
            self.rend += n.unsigned_abs();
            if !self.process_input(ring, now) {
                return;
            }
            if self.rstart == self.rend {
                self.rstart = 0;
                self.rend = 0;
            }
        }
    }

    /// Parse what is buffered. False when the connection went away.
    fn process_input(&mut self, ring: &mut Ring, now: Instant) -> bool {
        loop {
            let buf = &self.rbuf[self.rstart..self.rend];
            match &mut self.state {
                State::LoggingIn { login, .. } => {
                    let cfg = FrameCfg {
                        header_digest: false,
                        data_digest: false,
                        max_data: LOGIN_MAX_DATA,
                    };
                    let f = match pdu::decode_frame(buf, &cfg) {
                        Ok(Some(f)) => f,
                        Ok(None) => return true,
                        Err(e) => {
                            self.conn_failed(ring, now, format!("login: {e}"), false);
                            return false;
                        }
                    };
                    let Pdu::LoginResp(r) = f.pdu else {
                        let m = format!("login: unexpected {:?}", f.pdu);
                        self.conn_failed(ring, now, m, false);
                        return false;
                    };
                    let step = login.on_response(&r, &buf[f.data.clone()]);
                    self.rstart += f.len;
                    match step {
                        Ok(Step::Send(b)) => {
                            self.tx = b;
                            self.tx_sent = 0;
                            self.send(ring, now);
                        }
                        Ok(Step::Done(d)) => {
                            self.tx.clear();
                            self.login_done(ring, d, now);
                        }
                        Err(e) => {
                            let permanent = e.is_permanent();
                            let m = format!(
                                "login to {} at {}: {e}",
                                self.inner.cfg.target, self.inner.portal
                            );
                            self.conn_failed(ring, now, m, permanent);
                            return false;
                        }
                    }
                }
                State::Setup { session, .. } | State::Ready { session } => {
                    let used = match session.input(buf, now) {
                        Ok(n) => n,
                        Err(e) => {
                            self.conn_failed(ring, now, e.to_string(), false);
                            return false;
                        }
                    };
                    self.rstart += used;
                    let fin = session.take_finished();
                    let ev = session.take_events();
                    self.on_finished(ring, fin, now);
                    for e in ev {
                        self.on_event(ring, e, now);
                    }
                    if !matches!(self.state, State::Setup { .. } | State::Ready { .. }) {
                        return false;
                    }
                    // Retries due now and further parts of split requests go out with
                    // this batch.
                    self.release_held(now);
                    self.send(ring, now);
                    return self.fd.is_some();
                }
                _ => return true,
            }
        }
    }

    fn on_event(&mut self, ring: &mut Ring, e: Event, now: Instant) {
        match e {
            Event::Sense(s) => {
                tracing::info!(sense = %s, "asynchronous event from the target");
                self.unit_attention(s, now);
            }
            Event::Reconnect { event, wait_s } => {
                let m = format!(
                    "the target asked to end the connection (async event {event}, wait {wait_s} s)"
                );
                self.conn_failed(ring, now, m, false);
                if let State::Down { retry_at } = &mut self.state {
                    *retry_at = now + Duration::from_secs(u64::from(wait_s.min(60)));
                }
            }
        }
    }

    /// A unit attention that says the LUN changed: re-read what it says changed.
    fn unit_attention(&mut self, s: Sense, now: Instant) {
        let code = s.code();
        let recheck_capacity = code == asc::CAPACITY_CHANGED
            || code == asc::REPORTED_LUNS_CHANGED
            || s.asc == asc::POWER_ON_RESET;
        if !recheck_capacity {
            return;
        }
        if let State::Ready { session } = &mut self.state {
            let _ = session.submit(Internal::ReadCapacity.command(), now);
        }
    }

    // ---- requests ----

    /// Complete the requests marked done.
    fn flush_done(&mut self, done: &mut Vec<Completion>) {
        for id in std::mem::take(&mut self.pending_done) {
            let Some(r) = self.reqs.remove(id) else {
                continue;
            };
            self.held.retain(|&h| h != id);
            done.push(Completion {
                tag: r.tag,
                result: r.result,
                buf: r.buf,
            });
        }
    }

    fn hold(&mut self, id: Key) {
        if !self.held.contains(&id) {
            self.held.push_back(id);
        }
    }

    /// A command of a request came back unfinished from a dead connection.
    fn hold_command(&mut self, c: Command) {
        if c.cookie & INTERNAL != 0 {
            return;
        }
        let id = Tag::from_raw(c.cookie).key();
        if let Some(r) = self.reqs.get_mut(id) {
            r.parts = r.parts.saturating_sub(1);
            r.replay.push(c);
            self.hold(id);
        }
    }

    /// Fail every held request with `errno`.
    fn fail_all(&mut self, errno: i32) {
        let ids: Vec<Key> = self.held.drain(..).collect();
        for id in ids {
            if let Some(r) = self.reqs.get_mut(id) {
                for c in r.replay.drain(..) {
                    if matches!(r.op, Op::Read | Op::Write { .. }) {
                        r.buf = c.buf;
                    }
                }
                if r.result.is_ok() {
                    r.result = Err(errno);
                }
                r.next = r.end;
                if r.parts == 0 {
                    self.pending_done.push(id);
                }
            }
        }
    }

    /// Outage longer than the replacement timeout: requests fail instead of waiting.
    fn down_too_long(&self, now: Instant) -> bool {
        self.failed.is_some()
            || self
                .down_since
                .is_some_and(|t| now.duration_since(t) > self.inner.cfg.replacement_timeout)
    }

    /// Issue what held requests can issue now.
    fn release_held(&mut self, now: Instant) {
        if !matches!(self.state, State::Ready { .. }) {
            return;
        }
        let n = self.held.len();
        for _ in 0..n {
            let Some(id) = self.held.pop_front() else {
                break;
            };
            let wait = self
                .reqs
                .get(id)
                .and_then(|r| r.retry_at)
                .is_some_and(|t| t > now);
            if wait {
                self.held.push_back(id);
                continue;
            }
            self.drive(id, now);
        }
    }

    /// Put the request's commands on the session: replays first, then new parts.
    fn drive(&mut self, id: Key, now: Instant) {
        let State::Ready { session } = &mut self.state else {
            self.hold(id);
            return;
        };
        let Some(r) = self.reqs.get_mut(id) else {
            return;
        };
        r.retry_at = None;
        let mut failed = false;
        for c in std::mem::take(&mut r.replay) {
            r.parts += 1;
            if let Err(c) = session.submit(c, now) {
                r.parts -= 1;
                if matches!(r.op, Op::Read | Op::Write { .. }) {
                    r.buf = c.buf;
                }
                failed = true;
            }
        }
        while !failed && r.parts < MAX_PARTS_IN_FLIGHT && r.next < r.end {
            let Some(cmd) = next_command(r, id, &self.inner) else {
                break;
            };
            r.parts += 1;
            if let Err(c) = session.submit(cmd, now) {
                r.parts -= 1;
                if matches!(r.op, Op::Read | Op::Write { .. }) {
                    r.buf = c.buf;
                }
                failed = true;
            }
        }
        if failed {
            r.result = Err(libc::EAGAIN);
            r.next = r.end;
        }
        if r.parts == 0 && r.replay.is_empty() && r.next >= r.end {
            self.pending_done.push(id);
        }
    }

    fn on_finished(&mut self, ring: &mut Ring, fin: Vec<Finished>, now: Instant) {
        for f in fin {
            if f.cmd.cookie & INTERNAL != 0 {
                self.on_internal(ring, f, now);
            } else {
                self.on_request_command(f, now);
            }
        }
    }

    fn on_internal(&mut self, ring: &mut Ring, f: Finished, now: Instant) {
        let Some(kind) = Internal::from_code(f.cmd.cookie & !INTERNAL) else {
            return;
        };
        let in_setup =
            matches!(&self.state, State::Setup { steps, .. } if steps.front() == Some(&kind));
        let ok = matches!(
            f.outcome,
            Outcome::Status {
                status: status::GOOD,
                response: 0,
                ..
            }
        );
        if ok {
            let data_len = match f.outcome {
                Outcome::Status { residual, .. } => {
                    let n = i64::from(f.cmd.len) - residual.max(0);
                    usize::try_from(n.clamp(0, i64::from(f.cmd.len))).unwrap_or(0)
                }
                _ => 0,
            };
            if let Buffer::Owned(b) = &f.cmd.buf {
                let bytes = b.as_slice().get(..data_len).unwrap_or(&[]);
                if let Err(m) = self.record(kind, bytes) {
                    self.conn_failed(ring, now, m, true);
                    return;
                }
            }
        } else {
            let ua = matches!(
                f.outcome,
                Outcome::Status {
                    status: status::CHECK_CONDITION,
                    sense: Some(Sense {
                        key: key::UNIT_ATTENTION,
                        ..
                    }),
                    ..
                }
            );
            let busy = matches!(
                f.outcome,
                Outcome::Status {
                    status: status::BUSY | status::TASK_SET_FULL,
                    ..
                } | Outcome::TimedOut
            );
            if ua || busy {
                // Power-on and reset attentions are normal after a login: ask again.
                match &mut self.state {
                    State::Setup { running, .. } if in_setup => {
                        *running = false;
                        self.setup_next(ring, now);
                    }
                    State::Ready { session } => {
                        let _ = session.submit(kind.command(), now);
                    }
                    _ => {}
                }
                return;
            }
            let gone = matches!(
                f.outcome,
                Outcome::Status {
                    status: status::CHECK_CONDITION,
                    sense: Some(Sense {
                        key: key::ILLEGAL_REQUEST,
                        asc: 0x25,
                        ..
                    }),
                    ..
                }
            );
            if gone {
                let m = format!(
                    "LUN {} does not exist on target {} (LOGICAL UNIT NOT SUPPORTED)",
                    self.inner.cfg.lun, self.inner.cfg.target
                );
                self.conn_failed(ring, now, m, true);
                return;
            }
            let optional = matches!(kind, Internal::Vpd(_) | Internal::ReportLuns);
            if in_setup && !optional {
                let m = format!("{kind:?} failed on the LUN: {:?}", f.outcome);
                self.conn_failed(ring, now, m, self.mode != Mode::Serve);
                return;
            }
            tracing::debug!(?kind, outcome = ?f.outcome, "optional LUN query failed");
        }
        if let State::Setup { steps, running, .. } = &mut self.state {
            if in_setup {
                steps.pop_front();
                *running = false;
                if kind == Internal::Vpd(0x00) {
                    for p in [0xb2u8, 0xb0, 0x83, 0x80] {
                        if self.acc.vpd_pages.contains(&p) {
                            steps.push_front(Internal::Vpd(p));
                        }
                    }
                }
                self.setup_next(ring, now);
            }
        }
    }

    /// Keep what an internal command returned. An error is a permanent failure.
    fn record(&mut self, kind: Internal, b: &[u8]) -> Result<(), String> {
        let mut info = self.inner.info.lock().unwrap_or_else(|e| e.into_inner());
        match kind {
            Internal::ReportLuns => {
                let luns = scsi::parse_report_luns(b);
                let lun = self.inner.cfg.lun;
                let wanted = self.mode != Mode::Discover;
                if let Some(l) = luns.as_ref().filter(|l| wanted && !l.contains(&lun)) {
                    return Err(format!(
                        "LUN {lun} does not exist on target {} (it has LUNs {l:?})",
                        self.inner.cfg.target
                    ));
                }
                self.acc.luns = luns;
            }
            Internal::StdInquiry => {
                let inq = scsi::StdInquiry::parse(b);
                if let Some(i) = &inq {
                    if i.qualifier == 3 {
                        return Err(format!(
                            "LUN {} does not exist on target {} (INQUIRY: peripheral qualifier 3)",
                            self.inner.cfg.lun, self.inner.cfg.target
                        ));
                    }
                    if i.qualifier != 0 || i.device_type != 0 {
                        return Err(format!(
                            "LUN {} is not a block device (peripheral qualifier {}, type {:#x})",
                            self.inner.cfg.lun, i.qualifier, i.device_type
                        ));
                    }
                }
                info.inquiry = inq;
            }
            Internal::Vpd(0x00) => {
                self.acc.vpd_pages = scsi::parse_supported_vpd(b).unwrap_or_default();
            }
            Internal::Vpd(0x80) => {
                self.acc.serial = scsi::parse_serial(b).filter(|s| !s.is_empty());
            }
            Internal::Vpd(0x83) => self.acc.designators = scsi::parse_designators(b),
            Internal::Vpd(0xb0) => info.limits = scsi::BlockLimits::parse(b).unwrap_or_default(),
            Internal::Vpd(0xb2) => {
                info.provisioning = scsi::Provisioning::parse(b).unwrap_or_default();
            }
            Internal::Vpd(_) => {}
            Internal::ReadCapacity => {
                let c = Capacity::parse(b).ok_or("READ CAPACITY(16) returned nothing usable")?;
                let bytes = c.bytes().ok_or("LUN capacity overflows")?;
                if !c.block_len.is_power_of_two() || !(512..=65536).contains(&c.block_len) {
                    return Err(format!(
                        "logical block size {} is not supported",
                        c.block_len
                    ));
                }
                if let Some(old) = info.capacity {
                    if old.block_len != c.block_len {
                        return Err(format!(
                            "logical block size changed from {} to {}",
                            old.block_len, c.block_len
                        ));
                    }
                }
                info.capacity = Some(c);
                let prev = self.inner.size.swap(bytes, Ordering::AcqRel);
                if prev != bytes && self.mode == Mode::Serve {
                    tracing::info!(target_name = %self.inner.cfg.target, lun = self.inner.cfg.lun, old = prev, new = bytes, "LUN capacity changed");
                }
            }
        }
        Ok(())
    }

    fn on_request_command(&mut self, f: Finished, now: Instant) {
        let id = Tag::from_raw(f.cmd.cookie).key();
        let Some(r) = self.reqs.get(id) else {
            return;
        };
        let verdict = classify(&f.outcome, r, now, &self.inner.cfg);
        if let Outcome::Status {
            sense: Some(s),
            status: status::CHECK_CONDITION,
            ..
        } = f.outcome
        {
            if s.key == key::UNIT_ATTENTION {
                tracing::info!(sense = %s, "unit attention");
                self.unit_attention(s, now);
            } else if s.key == key::ILLEGAL_REQUEST && s.code() == asc::LUN_NOT_SUPPORTED {
                tracing::error!(target_name = %self.inner.cfg.target, lun = self.inner.cfg.lun, "the LUN is gone from the target");
                self.inner.set_fault(&format!(
                    "LUN {} is gone from target {} (LOGICAL UNIT NOT SUPPORTED)",
                    self.inner.cfg.lun, self.inner.cfg.target
                ));
            } else {
                tracing::warn!(sense = %s, op = ?r.op, offset = r.offset, len = r.len, ?verdict, "SCSI command failed");
            }
        }
        let lbs = u64::from(self.inner.lbs());
        let Some(r) = self.reqs.get_mut(id) else {
            return;
        };
        r.parts = r.parts.saturating_sub(1);
        let data_op = matches!(r.op, Op::Read | Op::Write { .. });
        match verdict {
            Verdict::Done => {
                if self.inner.is_faulted() {
                    self.inner.clear_fault();
                }
                if data_op {
                    r.buf = f.cmd.buf;
                }
            }
            Verdict::Fail(e) => {
                if data_op {
                    r.buf = f.cmd.buf;
                }
                if r.result.is_ok() {
                    r.result = Err(e);
                }
                r.next = r.end;
            }
            Verdict::Unsupported => {
                let op = f.cmd.cdb.opcode();
                if op == scsi::opcode::WRITE_SAME_16 {
                    // Cover the part again with written zeros from now on.
                    self.inner.no_write_same.store(true, Ordering::Relaxed);
                    tracing::info!("the LUN has no WRITE SAME(16); writing zeros instead");
                    if let Some(lba) = cdb_lba(&f.cmd.cdb) {
                        r.next = r.next.min(lba.saturating_mul(lbs));
                    }
                } else {
                    if op == scsi::opcode::UNMAP {
                        self.inner.no_unmap.store(true, Ordering::Relaxed);
                        tracing::info!("the LUN refused UNMAP; discard is off");
                    }
                    if data_op {
                        r.buf = f.cmd.buf;
                    }
                    if r.result.is_ok() {
                        r.result = Err(libc::EOPNOTSUPP);
                    }
                    r.next = r.end;
                }
            }
            Verdict::Retry(after) => {
                r.retries += 1;
                r.replay.push(f.cmd);
                r.retry_at = (after > Duration::ZERO).then(|| now + after);
            }
        }
        if r.parts == 0 && r.replay.is_empty() && r.next >= r.end {
            self.pending_done.push(id);
        } else if r.parts < MAX_PARTS_IN_FLIGHT && (r.next < r.end || !r.replay.is_empty()) {
            self.hold(id);
        }
    }

    /// The timer fired.
    fn tick(&mut self, ring: &mut Ring, now: Instant) {
        match &mut self.state {
            State::Down { retry_at } => {
                if now >= *retry_at && (self.mode == Mode::Serve || self.reconnects == 0) {
                    self.connect(ring, now);
                }
            }
            State::Connecting { deadline } | State::LoggingIn { deadline, .. } => {
                if now > *deadline {
                    let m = format!(
                        "no login to {} at {} within {} s",
                        self.inner.cfg.target,
                        self.inner.portal,
                        self.inner.cfg.login_timeout.as_secs()
                    );
                    self.conn_failed(ring, now, m, false);
                }
            }
            State::Setup { session, .. } | State::Ready { session } => {
                if let Err(e) = session.tick(now) {
                    self.conn_failed(ring, now, e.to_string(), false);
                } else {
                    let fin = session.take_finished();
                    self.on_finished(ring, fin, now);
                }
            }
        }
        if !matches!(self.state, State::Ready { .. }) && self.down_too_long(now) {
            if self.mode == Mode::Serve && self.failed.is_none() {
                self.inner.set_fault(&format!(
                    "no iSCSI session to {} at {} for over {} s (replacement timeout): {}",
                    self.inner.cfg.target,
                    self.inner.portal,
                    self.inner.cfg.replacement_timeout.as_secs(),
                    self.last_error.as_deref().unwrap_or("no answer")
                ));
            }
            if !self.held.is_empty() {
                tracing::error!(target_name = %self.inner.cfg.target, lun = self.inner.cfg.lun, requests = self.held.len(), "no iSCSI session within the replacement timeout; failing held requests");
            }
            self.fail_all(libc::EIO);
        }
        self.release_held(now);
        self.send(ring, now);
    }
}

/// What to do with a finished command of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Done,
    Fail(i32),
    /// The LUN does not support the command (INVALID OPCODE / FIELD IN CDB).
    Unsupported,
    /// Issue it again after this delay.
    Retry(Duration),
}

fn backoff(retries: u32) -> Duration {
    (FIRST_BACKOFF * 2u32.saturating_pow(retries.min(10))).min(MAX_BACKOFF)
}

/// The retry policy: unit attentions and aborted commands are retried at once, BUSY,
/// TASK SET FULL and NOT READY after a back-off, timed-out commands a few times; all
/// within the request timeout and [`MAX_RETRIES`].
fn classify(o: &Outcome, r: &Req, now: Instant, cfg: &super::IscsiConfig) -> Verdict {
    let may_retry = r.retries < MAX_RETRIES && now.duration_since(r.started) < cfg.request_timeout;
    let retry = |d: Duration| {
        if may_retry {
            Verdict::Retry(d)
        } else {
            Verdict::Fail(libc::EIO)
        }
    };
    match *o {
        Outcome::TimedOut => retry(Duration::ZERO),
        Outcome::Rejected(_) => Verdict::Fail(libc::EIO),
        Outcome::Status { response, .. } if response != 0 => retry(backoff(r.retries)),
        Outcome::Status {
            status, residual, ..
        } if status == status::GOOD || status == status::CONDITION_MET => {
            if residual != 0 && r.op == Op::Read {
                // A short read would hand stale bytes to the client.
                Verdict::Fail(libc::EIO)
            } else {
                Verdict::Done
            }
        }
        Outcome::Status { status, .. }
            if status == status::BUSY || status == status::TASK_SET_FULL =>
        {
            retry(backoff(r.retries))
        }
        Outcome::Status { status, .. } if status == status::TASK_ABORTED => retry(Duration::ZERO),
        Outcome::Status { status, .. } if status == status::RESERVATION_CONFLICT => {
            Verdict::Fail(libc::EBADE)
        }
        Outcome::Status {
            status,
            sense: Some(s),
            ..
        } if status == status::CHECK_CONDITION => match s.key {
            key::NO_SENSE | key::UNIT_ATTENTION | key::ABORTED_COMMAND => retry(Duration::ZERO),
            key::RECOVERED_ERROR => Verdict::Done,
            key::NOT_READY if s.asc == asc::NOT_READY => retry(backoff(r.retries)),
            key::ILLEGAL_REQUEST => match s.code() {
                asc::INVALID_OPCODE | asc::INVALID_FIELD_IN_CDB => Verdict::Unsupported,
                asc::LBA_OUT_OF_RANGE => Verdict::Fail(libc::EINVAL),
                _ => Verdict::Fail(libc::EIO),
            },
            key::DATA_PROTECT if s.code() == asc::SPACE_ALLOCATION_FAILED => {
                Verdict::Fail(libc::ENOSPC)
            }
            key::DATA_PROTECT => Verdict::Fail(libc::EPERM),
            _ => Verdict::Fail(libc::EIO),
        },
        Outcome::Status { .. } => Verdict::Fail(libc::EIO),
    }
}

/// The LBA field of a 16-byte CDB.
fn cdb_lba(c: &Cdb) -> Option<u64> {
    Some(u64::from_be_bytes(c.0.get(2..10)?.try_into().ok()?))
}

/// The next SCSI command of request `r` (and advance `r.next` past it).
fn next_command(r: &mut Req, id: Key, inner: &Inner) -> Option<Command> {
    let lbs = u64::from(inner.lbs());
    let cookie = Tag::of(id).raw();
    let lba = r.next / lbs;
    let left = r.end - r.next;
    match r.op {
        Op::Read | Op::Write { .. } => {
            let blocks = u32::try_from(r.len / lbs).ok()?;
            let len = u32::try_from(r.len).ok()?;
            r.next = r.end;
            let (cdb, dir) = match r.op {
                Op::Read => (Cdb::read16(lba, blocks), Dir::Read),
                Op::Write { fua } => (Cdb::write16(lba, blocks, fua), Dir::Write),
                _ => return None,
            };
            Some(Command {
                cdb,
                dir,
                len,
                buf: std::mem::take(&mut r.buf),
                cookie,
            })
        }
        Op::Flush => {
            r.next = r.end;
            Some(Command {
                cdb: Cdb::sync_cache16(),
                dir: Dir::None,
                len: 0,
                buf: Buffer::None,
                cookie,
            })
        }
        Op::Discard => {
            let g = inner.geometry();
            let per = u64::from(g.max_unmap_blocks);
            let mut ranges = Vec::new();
            let mut at = lba;
            let mut blocks_left = left / lbs;
            while blocks_left > 0 && ranges.len() < g.max_unmap_descriptors as usize {
                let n = blocks_left.min(per);
                ranges.push((at, u32::try_from(n).unwrap_or(u32::MAX)));
                at += n;
                blocks_left -= n;
            }
            let covered: u64 = ranges.iter().map(|&(_, n)| u64::from(n)).sum();
            r.next += covered * lbs;
            let params = scsi::unmap_parameters(&ranges);
            let len = u32::try_from(params.len()).ok()?;
            Some(Command {
                cdb: Cdb::unmap(u16::try_from(len).ok()?),
                dir: Dir::Write,
                len,
                buf: Buffer::Owned(IoBuf::from_slice(&params)),
                cookie,
            })
        }
        Op::WriteZeroes { unmap } => {
            let g = inner.geometry();
            if inner.no_write_same.load(Ordering::Relaxed) {
                let n = left.min(ZERO_CHUNK_BYTES).min(u64::from(g.max_transfer));
                let n = n - n % lbs;
                let blocks = u32::try_from(n / lbs).ok()?;
                r.next += n;
                return Some(Command {
                    cdb: Cdb::write16(lba, blocks, false),
                    dir: Dir::Write,
                    len: u32::try_from(n).ok()?,
                    buf: Buffer::Owned(IoBuf::new(n as usize)),
                    cookie,
                });
            }
            let blocks = (left / lbs).min(g.max_write_same_blocks);
            r.next += blocks * lbs;
            let len = u32::try_from(lbs).ok()?;
            Some(Command {
                cdb: Cdb::write_same16(
                    lba,
                    u32::try_from(blocks).ok()?,
                    unmap && g.write_same_unmap,
                ),
                dir: Dir::Write,
                len,
                buf: Buffer::Owned(IoBuf::new(len as usize)),
                cookie,
            })
        }
    }
}

/// A socket address as `sockaddr_storage` and its length.
fn sockaddr(a: &std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        std::net::SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

impl Queue for IscsiQueue {
    fn owner(&self) -> OwnerId {
        self.owner
    }

    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        let info = self.inner.info();
        let check = info
            .check_request(req.op, req.offset, req.len)
            .and_then(|()| match req.op {
                Op::Read | Op::Write { .. } if req.buf.len() as u64 != req.len => Err(libc::EINVAL),
                Op::Read | Op::Write { .. } if req.len > u64::from(info.max_transfer) => {
                    Err(libc::EOVERFLOW)
                }
                Op::Discard if !info.discard => Err(libc::EOPNOTSUPP),
                _ => Ok(()),
            });
        if let Err(e) = check {
            done.push(Completion::of(req, Err(e)));
            return;
        }
        if req.len == 0 && req.op != Op::Flush {
            done.push(Completion::of(req, Ok(())));
            return;
        }
        let now = Instant::now();
        if !matches!(self.state, State::Ready { .. }) && self.down_too_long(now) {
            done.push(Completion::of(req, Err(libc::EIO)));
            return;
        }
        let end = if req.op == Op::Flush {
            req.offset + 1
        } else {
            req.offset + req.len
        };
        let id = self.reqs.insert(Req {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            buf: req.buf,
            parts: 0,
            next: req.offset,
            end,
            result: Ok(()),
            started: now,
            retries: 0,
            retry_at: None,
            replay: Vec::new(),
        });
        let id = match id {
            Ok(id) => id,
            Err(r) => {
                done.push(Completion {
                    tag: r.tag,
                    result: Err(libc::EAGAIN),
                    buf: r.buf,
                });
                return;
            }
        };
        self.drive(id, now);
        self.flush_done(done);
        if let State::Ready { session } = &self.state {
            if session.has_output() {
                self.arm_flush(ring);
            }
        }
    }

    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>) {
        let tag = cqe.tag();
        if tag.key() != self.epoch {
            return;
        }
        let now = Instant::now();
        match tag.kind() {
            K_POLL_IN => {
                self.poll_in = false;
                if self.fd.is_some() && cqe.result >= 0 {
                    self.recv(ring, now);
                }
            }
            K_POLL_OUT => {
                self.poll_out = false;
                if self.fd.is_some() && cqe.result >= 0 {
                    if matches!(self.state, State::Connecting { .. }) {
                        self.connected(ring, now);
                    } else {
                        self.send(ring, now);
                    }
                }
            }
            K_FLUSH => {
                self.flush = false;
                self.send(ring, now);
            }
            K_TIMER => {
                self.timer = false;
                self.tick(ring, now);
                self.arm_timer(ring);
            }
            _ => {}
        }
        self.flush_done(done);
    }

    fn in_flight(&self) -> usize {
        self.reqs.len()
    }
}

impl Drop for IscsiQueue {
    fn drop(&mut self) {
        // Best effort: tell the target the session ends, then close the socket.
        if let (State::Ready { session }, Some(fd)) = (&mut self.state, &self.fd) {
            session.logout();
            self.iovs.clear();
            session.iovecs(&mut self.iovs, MAX_IOVS);
            if !self.iovs.is_empty() {
                // SAFETY: msghdr is plain data; zeroed is a valid empty header.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = self.iovs.as_mut_ptr();
                msg.msg_iovlen = self.iovs.len();
                // SAFETY: the iovecs point into the session, alive for this call.
                unsafe {
                    libc::sendmsg(
                        fd.as_raw_fd(),
                        &raw const msg,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
            }
        }
        self.close_fd();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iscsi::{Geometry, IscsiConfig, LunInfo};
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64};
    use std::sync::{Mutex, OnceLock};

    fn key(slot: u32) -> Key {
        Key::masked(slot, 0)
    }

    fn req(op: Op, offset: u64, len: u64) -> Req {
        Req {
            tag: 1,
            op,
            offset,
            len,
            buf: Buffer::None,
            parts: 0,
            next: offset,
            end: offset + len,
            result: Ok(()),
            started: Instant::now(),
            retries: 0,
            retry_at: None,
            replay: Vec::new(),
        }
    }

    fn inner(g: Geometry) -> Inner {
        let cfg = IscsiConfig::parse_uri("iscsi://127.0.0.1/iqn.x:y/1").expect("uri");
        let geometry = OnceLock::new();
        let _ = geometry.set(g);
        Inner {
            cfg,
            portal: "127.0.0.1:3260".parse().expect("addr"),
            size: AtomicU64::new(1 << 30),
            info: Mutex::new(LunInfo::default()),
            geometry,
            no_write_same: AtomicBool::new(false),
            no_unmap: AtomicBool::new(false),
            fault: Mutex::new(None),
            faulted: AtomicBool::new(false),
            unreachable_since: Mutex::new(None),
            isid_base: [1, 2, 3],
            next_qualifier: AtomicU16::new(1),
        }
    }

    fn geo() -> Geometry {
        Geometry {
            lbs: 512,
            pbs: 4096,
            max_transfer: 1 << 20,
            max_unmap_blocks: 2048,
            max_unmap_descriptors: 2,
            max_write_same_blocks: 4096,
            write_same_unmap: true,
            unmap: true,
        }
    }

    fn status(status: u8, key: Option<(u8, u16)>) -> Outcome {
        Outcome::Status {
            response: 0,
            status,
            sense: key.map(|(key, code)| Sense {
                key,
                asc: (code >> 8) as u8,
                ascq: code as u8,
            }),
            residual: 0,
        }
    }

    #[test]
    fn retry_policy() {
        let cfg = IscsiConfig::parse_uri("iscsi://h/iqn.x:y/1").expect("uri");
        let now = Instant::now();
        let r = req(Op::Read, 0, 4096);
        let v = |o: Outcome| classify(&o, &r, now, &cfg);
        assert_eq!(v(status(status::GOOD, None)), Verdict::Done);
        assert_eq!(
            v(status(
                status::CHECK_CONDITION,
                Some((key::UNIT_ATTENTION, asc::CAPACITY_CHANGED))
            )),
            Verdict::Retry(Duration::ZERO)
        );
        assert_eq!(v(status(status::BUSY, None)), Verdict::Retry(FIRST_BACKOFF));
        assert_eq!(
            v(status(status::TASK_SET_FULL, None)),
            Verdict::Retry(FIRST_BACKOFF)
        );
        assert_eq!(
            v(status(
                status::CHECK_CONDITION,
                Some((key::NOT_READY, 0x0401))
            )),
            Verdict::Retry(FIRST_BACKOFF)
        );
        assert_eq!(v(Outcome::TimedOut), Verdict::Retry(Duration::ZERO));
        assert_eq!(
            v(status(
                status::CHECK_CONDITION,
                Some((key::ILLEGAL_REQUEST, asc::INVALID_OPCODE))
            )),
            Verdict::Unsupported
        );
        assert_eq!(
            v(status(
                status::CHECK_CONDITION,
                Some((key::DATA_PROTECT, asc::SPACE_ALLOCATION_FAILED))
            )),
            Verdict::Fail(libc::ENOSPC)
        );
        assert_eq!(
            v(status(
                status::CHECK_CONDITION,
                Some((key::MEDIUM_ERROR, 0x1100))
            )),
            Verdict::Fail(libc::EIO)
        );
        assert_eq!(
            v(status(status::RESERVATION_CONFLICT, None)),
            Verdict::Fail(libc::EBADE)
        );
        // A short read is an error, never stale bytes.
        let short = Outcome::Status {
            response: 0,
            status: 0,
            sense: None,
            residual: 512,
        };
        assert_eq!(v(short), Verdict::Fail(libc::EIO));
        // Back-off doubles up to its cap; retries end at the limit.
        let mut r2 = req(Op::Read, 0, 4096);
        r2.retries = 3;
        assert_eq!(
            classify(&status(status::BUSY, None), &r2, now, &cfg),
            Verdict::Retry(FIRST_BACKOFF * 8)
        );
        r2.retries = MAX_RETRIES;
        assert_eq!(
            classify(&status(status::BUSY, None), &r2, now, &cfg),
            Verdict::Fail(libc::EIO)
        );
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn discard_and_write_zeroes_are_split_by_the_lun_limits() {
        let i = inner(geo());
        // 3 MiB discard: UNMAP commands of at most 2 descriptors of 2048 blocks (1 MiB).
        let mut r = req(Op::Discard, 1 << 20, 3 << 20);
        let c = next_command(&mut r, key(7), &i).expect("unmap");
        assert_eq!(c.cdb.opcode(), scsi::opcode::UNMAP);
        assert_eq!(
            (c.dir, c.len, c.cookie),
            (Dir::Write, 8 + 32, Tag::of(key(7)).raw())
        );
        assert_eq!(r.next, 3 << 20);
        let c = next_command(&mut r, key(7), &i).expect("unmap");
        assert_eq!(c.len, 8 + 16);
        assert_eq!(r.next, r.end);
        // Write-zeroes: WRITE SAME(16) with UNMAP of at most 4096 blocks, one block of data.
        let mut r = req(Op::WriteZeroes { unmap: true }, 0, 3 << 20);
        let c = next_command(&mut r, key(1), &i).expect("write same");
        assert_eq!(c.cdb.0[1], 0x08);
        assert_eq!(
            u32::from_be_bytes(c.cdb.0[10..14].try_into().unwrap()),
            4096
        );
        assert_eq!((c.len, r.next), (512, 2 << 20));
        // Without WRITE SAME: written zeros, in chunks of at most 1 MiB.
        i.no_write_same.store(true, Ordering::Relaxed);
        let mut r = req(Op::WriteZeroes { unmap: false }, 0, (2 << 20) + 4096);
        let c = next_command(&mut r, key(1), &i).expect("write");
        assert_eq!(c.cdb.opcode(), scsi::opcode::WRITE_16);
        assert_eq!((c.len, r.next), (1 << 20, 1 << 20));
        next_command(&mut r, key(1), &i).expect("write");
        let c = next_command(&mut r, key(1), &i).expect("write");
        assert_eq!(c.len, 4096);
        assert_eq!(r.next, r.end);
        // Reads and writes are one command each, with the request's buffer.
        let mut r = req(Op::Write { fua: true }, 8192, 4096);
        r.buf = Buffer::Owned(IoBuf::new(4096));
        let c = next_command(&mut r, key(3), &i).expect("write");
        assert_eq!(c.cdb, Cdb::write16(16, 8, true));
        assert!(matches!(r.buf, Buffer::None) && c.buf.len() == 4096);
    }

    #[test]
    fn isids_are_distinct_per_queue() {
        let i = inner(geo());
        let a = i.next_isid();
        let b = i.next_isid();
        assert_ne!(a, b);
        assert_eq!(a[0] & 0xc0, 0x80, "random-type ISID");
    }
}
