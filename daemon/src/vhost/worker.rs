//! Per-virtqueue I/O worker: one thread per queue, owning its io_uring [`Ring`], its
//! device [`Queue`](ember_blockdev::Queue), its virtqueue and its in-flight table. No lock
//! on the I/O path.
//!
//! The thread sleeps in its own epoll on three fds: a wake eventfd for commands from the
//! vhost-user message thread (start, stop, new call/err fd), the ring fd (readable when
//! CQEs wait) and, while the queue runs, the guest's kick eventfd. So kicks and completions
//! both wake it.
//!
//! Per kick: pop the available chains ([`ring::pending`], [`ring::pop_head`]), walk each
//! ([`ring::walk_chain`]), record it in the inflight region, decode it, submit it to the
//! device with iovecs into guest memory; one `io_uring_enter`, reap, write statuses, add
//! used entries, signal once (EVENT_IDX aware). `Stop` (GET_VRING_BASE) drains what is in
//! flight before answering, so the reported avail index owes nothing.
//!
//! A start (and a new call fd) notifies the guest once, whatever EVENT_IDX says: a
//! process killed between putting chains in the used ring and writing the call fd left a
//! guest that was never told, and whose `used_event` stays behind those chains, so no
//! later completion would notify it either and the queue would wait forever (issue 11's
//! guest stall in `tests/crash.rs`). A spurious notice costs the guest one look at the
//! used ring. A start also pops what the guest queued while no backend ran (its kicks
//! went nowhere). At `debug`, start and stop log the queue's state: our next avail and
//! used indexes, the guest's avail index and `used_event`, our `avail_event`, requests
//! in flight and the inflight region's entries.
//!
//! A hostile guest owns the ring memory, so every pass is bounded:
//! - one pass pops at most *queue size* chains; if more are waiting (the guest keeps
//!   refilling), the thread first looks at its commands again (`epoll_wait` with a zero
//!   timeout) and continues in the next pass, so a stop is never starved;
//! - at most *queue size* chains are outstanding (popped, not yet used) and a chain is at
//!   most *queue size* descriptors long ([`super::ring`]), so the in-flight table (a
//!   [`Slots`] keyed by the device request's [`Tag`]) and the one reused segment buffer
//!   are bounded by the queue size. Late completions of earlier starts (a drain that ran
//!   out) may still hold entries, so the table's bound is [`MAX_IN_FLIGHT`]; a chain that
//!   finds it full gets `VIRTIO_BLK_S_IOERR`;
//! - an impossible ring state ([`ring::RingError`]: `avail.idx` too far ahead, a head or
//!   `next` out of range, a chain too long or looping, a bad indirect table, rings outside
//!   guest memory) makes the queue **broken**: logged once at `error`, its kick fd is no
//!   longer watched, nothing more is popped, the vring's error eventfd (`SET_VRING_ERR`)
//!   is signalled, and requests already submitted still complete. It stays broken until
//!   the frontend stops it (`GET_VRING_BASE`, answered at once with the next avail index)
//!   and starts it again, or disconnects. This is what vhost-user lets a backend do: the
//!   device status (`VIRTIO_CONFIG_S_NEEDS_RESET`) belongs to the frontend, and no
//!   backend message sets it (`SET_STATUS`/`GET_STATUS` are frontend requests; QEMU 7.2
//!   never copies a backend's status into the guest's). QEMU 7.2 reacts to the error
//!   eventfd by logging "vhost vring error in virtqueue N"; the guest sees its requests on
//!   that queue never complete, as with QEMU's own `virtio_error()` short of the status bit.
//!
//! Every wait on a queue thread has a bound ([`Timeouts`]): the message thread waits at
//! most `reply` for a worker to take a command or answer it, and a stopping worker waits
//! at most `drain` for the device to finish what was submitted. A drain that runs out
//! answers an error (the frontend is then dropped, and with inflight tracking the
//! unfinished requests are resubmitted by the next backend); its late completions still
//! write their status byte but never touch a ring that was started again, and their guest
//! memory mappings are kept (leaked at thread exit, if need be) so the kernel never writes
//! into reused address space.
//!
//! Large transfers are not split here: on tmpfs the file backend hands reads over
//! 128 KiB to io-wq with `IOSQE_ASYNC` and a worker cap of CPUs / tmpfs queues, so the
//! QD8 × 1 MiB reads of one queue copy on every core (before: one io-wq worker per ring,
//! 1 MiB reads 0.64× qsd; after 0.92–1.04× with a 2.5× lower p99, see benches/README.md).

use super::handler::MAX_QUEUE_SIZE;
use super::inflight::QueueInflight;
use super::request::{self, Decoded, Mem, Seg, S_IOERR, S_OK, S_UNSUPP};
use super::ring::{self, RingError};
use ember_blockdev::{BlockDevice, Buffer, Completion, Cqe, IoVecs, Request, Ring, Slots, Tag};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory shared between the message thread (which swaps maps) and the workers.
pub type GuestMem = GuestMemoryAtomic<Mem>;

const TOKEN_WAKE: u64 = 0;
const TOKEN_RING: u64 = 1;
const TOKEN_KICK: u64 = 2;

/// Commands that may wait for a busy worker (start, stop, call/err fds).
const CMD_QUEUE: usize = 16;
/// Bound of a worker's in-flight table: a queue's chains (at most the queue size) plus
/// late completions of earlier starts whose drain ran out.
pub const MAX_IN_FLIGHT: usize = 4 * MAX_QUEUE_SIZE as usize;

/// Default [`Timeouts::drain`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Default [`Timeouts::reply`] (longer than the drain, so a slow drain still answers).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds of the waits on and in a queue thread.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a stopping queue waits for the device to complete what it submitted.
    pub drain: Duration,
    /// How long the message thread waits for a worker to take a command and answer.
    pub reply: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            drain: DEFAULT_DRAIN_TIMEOUT,
            reply: DEFAULT_REPLY_TIMEOUT,
        }
    }
}

/// State every worker of an export shares (read-only or atomics).
#[derive(Debug)]
pub struct Shared {
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// The export refuses writes.
    pub read_only: bool,
    /// GET_ID answer.
    pub id: [u8; super::config::ID_BYTES],
    /// Write-back cache mode (CONFIG_WCE); false: every write is FUA.
    pub writeback: AtomicBool,
    /// Bounds of the waits on the queue threads.
    pub timeouts: Timeouts,
}

/// Everything a queue needs to run, built by the message thread.
pub struct Start {
    /// The configured virtqueue (size, addresses, next avail/used, event idx, ready).
    pub queue: Queue,
    /// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub indirect: bool,
    /// Guest → device notifications.
    pub kick: EventFd,
    /// Device → guest notifications.
    pub call: Option<EventFd>,
    /// Signalled when the queue breaks (`SET_VRING_ERR`).
    pub err: Option<EventFd>,
    /// Guest memory.
    pub mem: GuestMem,
    /// Inflight region of this queue, if the frontend set one up.
    pub inflight: Option<QueueInflight>,
}

/// A command for a worker.
pub enum Cmd {
    /// Run a queue; the reply comes once the worker has taken it (and processed what
    /// was already available), or with why it could not.
    Start(Box<Start>, mpsc::Sender<io::Result<()>>),
    /// Stop the queue: drain in-flight requests (bounded), answer the next avail index.
    Stop(mpsc::Sender<io::Result<u16>>),
    /// Replace the call eventfd.
    SetCall(Option<EventFd>),
    /// Replace the error eventfd.
    SetErr(Option<EventFd>),
}

/// The message thread's handle on a worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    tx: mpsc::SyncSender<Cmd>,
    wake: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
    reply_timeout: Duration,
}

fn timed_out(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl WorkerHandle {
    /// Spawn the worker of queue `q`. The ring and device queue are created on the thread;
    /// a failure there is reported here.
    pub fn spawn(shared: Arc<Shared>, q: u16) -> io::Result<WorkerHandle> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let wake2 = wake.try_clone()?;
        let reply_timeout = shared.timeouts.reply;
        let (tx, rx) = mpsc::sync_channel(CMD_QUEUE);
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-q{q}"))
            .spawn(move || match Worker::new(shared, q, wake2) {
                Ok(mut w) => {
                    let _ = ready_tx.send(Ok(()));
                    w.run(&rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        ready_rx
            .recv_timeout(reply_timeout)
            .map_err(|_| io::Error::other("the queue worker did not start"))??;
        Ok(WorkerHandle {
            tx,
            wake,
            thread: Some(thread),
            reply_timeout,
        })
    }

    /// Send a command, waiting at most the reply timeout for room in the worker's queue.
    pub fn send(&self, cmd: Cmd) -> io::Result<()> {
        let deadline = Instant::now() + self.reply_timeout;
        let mut cmd = cmd;
        loop {
            match self.tx.try_send(cmd) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(io::Error::other("the queue worker is gone"))
                }
                Err(mpsc::TrySendError::Full(c)) => {
                    if Instant::now() >= deadline {
                        return Err(timed_out(format!(
                            "the queue worker took no command for {:?}",
                            self.reply_timeout
                        )));
                    }
                    cmd = c;
                    let _ = self.wake.write(1);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        self.wake.write(1)
    }

    /// Hand a queue to the worker and wait (bounded) until it runs.
    pub fn start(&self, s: Start) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Start(Box::new(s), tx))?;
        match rx.recv_timeout(self.reply_timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(timed_out(format!(
                "the queue worker did not start the queue within {:?}",
                self.reply_timeout
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("the queue worker is gone"))
            }
        }
    }

    /// Ask the worker to stop its queue; [`StopWait::wait`] gets the answer. Several
    /// queues stop in parallel this way.
    pub fn begin_stop(&self) -> io::Result<StopWait> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Stop(tx))?;
        Ok(StopWait { rx })
    }

    /// Stop the queue and return its next avail index, waiting at most the reply
    /// timeout.
    pub fn stop(&self) -> io::Result<u16> {
        self.begin_stop()?.wait(Instant::now() + self.reply_timeout)
    }

    /// The reply timeout of this worker.
    pub fn reply_timeout(&self) -> Duration {
        self.reply_timeout
    }
}

/// A stop in progress (see [`WorkerHandle::begin_stop`]).
#[derive(Debug)]
pub struct StopWait {
    rx: mpsc::Receiver<io::Result<u16>>,
}

impl StopWait {
    /// The worker's answer: the next avail index, or why the stop failed (also when no
    /// answer came by `deadline`).
    pub fn wait(self, deadline: Instant) -> io::Result<u16> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(timed_out(
                "the queue worker did not stop the queue in time".into(),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("the queue worker is gone"))
            }
        }
    }
}

impl WorkerHandle {
    /// Make the thread exit (it drains what it submitted first, bounded) and wait for it
    /// until `deadline`. Returns false if it did not exit in time (it is then left
    /// running, detached, and logged).
    pub fn join(mut self, deadline: Instant) -> bool {
        self.close();
        let Some(t) = self.thread.take() else {
            return true;
        };
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !t.is_finished() {
            tracing::error!("a vhost-user queue worker did not exit in time; left running");
            return false;
        }
        if t.join().is_err() {
            tracing::error!("a vhost-user queue worker panicked");
        }
        true
    }

    fn close(&mut self) {
        // Closing the channel and waking the thread makes it exit (after draining).
        let (tx, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.tx, tx));
        let _ = self.wake.write(1);
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// A running virtqueue.
struct Active {
    queue: Queue,
    indirect: bool,
    kick: EventFd,
    call: Option<EventFd>,
    err: Option<EventFd>,
    mem: GuestMem,
    inflight: Option<QueueInflight>,
    counter: u64,
    /// Which start this is (completions of an earlier start must not touch this ring).
    gen: u64,
    /// Requests of this start submitted and not completed.
    in_flight: usize,
    /// The guest put the ring in an impossible state: nothing more is popped.
    broken: bool,
}

/// One request between submission and completion.
struct InFlight {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// The start (`Active::gen`) it belongs to.
    gen: u64,
    /// Keeps the guest memory mapping the request's iovecs point into alive.
    mem: GuestMemoryLoadGuard<Mem>,
}

struct Worker {
    shared: Arc<Shared>,
    q: u16,
    epoll: Epoll,
    wake: EventFd,
    ring: Ring,
    dq: Box<dyn ember_blockdev::Queue>,
    active: Option<Active>,
    gen: u64,
    slots: Slots<InFlight>,
    done: Vec<Completion>,
    cqes: Vec<Cqe>,
    /// The segments of the chain being decoded (reused; at most queue-size entries).
    segs: Vec<Seg>,
    /// A pass stopped at its budget with chains still waiting.
    more: bool,
    used_since_signal: usize,
}

impl Worker {
    fn new(shared: Arc<Shared>, q: u16, wake: EventFd) -> io::Result<Worker> {
        let mut ring = Ring::new(ember_blockdev::engine::DEFAULT_RING_ENTRIES)?;
        let dq = shared
            .dev
            .clone()
            .queue(&mut ring)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            ring.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_RING),
        )?;
        Ok(Worker {
            shared,
            q,
            epoll,
            wake,
            ring,
            dq,
            active: None,
            gen: 0,
            slots: Slots::new(MAX_IN_FLIGHT),
            done: Vec::new(),
            cqes: Vec::new(),
            segs: Vec::new(),
            more: false,
            used_since_signal: 0,
        })
    }

    fn run(&mut self, rx: &mpsc::Receiver<Cmd>) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            // With chains left over from a budget-limited pass, only peek at events.
            let timeout = if self.more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(queue = self.q, "epoll: {e}");
                    self.exit();
                    return;
                }
            };
            let mut kicked = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        loop {
                            match rx.try_recv() {
                                Ok(cmd) => self.command(cmd),
                                Err(mpsc::TryRecvError::Empty) => break,
                                Err(mpsc::TryRecvError::Disconnected) => {
                                    self.exit();
                                    return;
                                }
                            }
                        }
                    }
                    TOKEN_KICK => {
                        if let Some(a) = &self.active {
                            let _ = a.kick.read();
                        }
                        kicked = true;
                        self.process(true);
                    }
                    _ => self.process(false),
                }
            }
            if self.more && !kicked {
                self.process(true);
            }
        }
    }

    /// The channel closed: stop (bounded drain) and leave.
    fn exit(&mut self) {
        if self.active.is_some() {
            let _ = self.stop();
        }
        let stuck = self.slots.len();
        if stuck > 0 {
            // The kernel may still write into these requests' buffers: keep their guest
            // memory mapped for the life of the process rather than let the address
            // space be reused under an I/O.
            tracing::error!(
                queue = self.q,
                stuck,
                "queue worker exits with requests still in flight; keeping their memory mapped"
            );
            std::mem::forget(std::mem::replace(&mut self.slots, Slots::new(0)));
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Start(s, reply) => {
                let r = self.start(*s);
                if let Err(e) = &r {
                    tracing::error!(queue = self.q, "cannot start the virtqueue: {e}");
                }
                let _ = reply.send(r);
            }
            Cmd::Stop(reply) => {
                let r = self.stop();
                let _ = reply.send(r);
            }
            Cmd::SetCall(call) => {
                if let Some(a) = &mut self.active {
                    a.call = call;
                }
                // A notice may have gone to the fd just replaced: tell the new one.
                self.call_guest();
            }
            Cmd::SetErr(err) => {
                if let Some(a) = &mut self.active {
                    a.err = err;
                }
            }
        }
    }

    fn start(&mut self, s: Start) -> io::Result<()> {
        if self.active.is_some() {
            // Not expected (the handler stops first); a failed drain is logged there.
            let _ = self.stop();
        }
        let Start {
            mut queue,
            indirect,
            kick,
            call,
            err,
            mem,
            inflight,
        } = s;
        if tracing::enabled!(tracing::Level::DEBUG) {
            // The used ring as the last backend left it: a `used_event` behind `used`
            // means the guest was not told of the chains between (see `call_guest`).
            let m = mem.memory();
            let size = u64::from(queue.size());
            tracing::debug!(
                queue = self.q,
                used = ?ring_u16(&m, queue.used_ring(), 2),
                used_event = ?ring_u16(&m, queue.avail_ring(), 4 + 2 * size),
                guest_avail = ?ring_u16(&m, queue.avail_ring(), 2),
                base = queue.next_avail(),
                event_idx = queue.event_idx_enabled(),
                "virtqueue starting"
            );
        }
        let mut counter = 1;
        let mut resubmit = Vec::new();
        if let Some(inf) = &inflight {
            let m = mem.memory();
            let used = queue
                .used_idx(&*m, Ordering::Acquire)
                .map_err(|e| io::Error::other(format!("cannot read the used index: {e}")))?
                .0;
            let r = inf.recover(queue.size(), used);
            if !r.resubmit.is_empty() || r.next_avail != queue.next_avail() {
                tracing::info!(
                    queue = self.q,
                    resubmit = r.resubmit.len(),
                    used,
                    next_avail = r.next_avail,
                    "recovered in-flight requests"
                );
            }
            queue.set_next_avail(r.next_avail);
            queue.set_next_used(used);
            counter = r.next_counter;
            resubmit = r.resubmit;
        }
        // Edge-triggered: every write of the kick fd is one event, and an fd that stays
        // readable (a semaphore eventfd the frontend filled) cannot make us spin.
        self.epoll
            .ctl(
                ControlOperation::Add,
                kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_KICK),
            )
            .map_err(|e| io::Error::other(format!("cannot watch the kick fd: {e}")))?;
        self.gen += 1;
        self.active = Some(Active {
            queue,
            indirect,
            kick,
            call,
            err,
            mem,
            inflight,
            counter,
            gen: self.gen,
            in_flight: 0,
            broken: false,
        });
        let resubmitted = resubmit.len();
        for head in resubmit {
            self.resubmit(head);
        }
        // Requests may have been queued before we started listening.
        self.process(true);
        // The guest may not know about chains already in the used ring: a backend
        // killed between `add_used` and the call-fd write never told it, and with
        // EVENT_IDX no later completion does either (its `used_event` stays behind
        // them, so `needs_notification` says no until the index wraps): the queue
        // stalls. Nothing tells a new start whether that happened, so every start
        // notifies once; a spurious notice costs the guest one look at the used ring.
        self.call_guest();
        self.log_state("virtqueue started", Some(resubmitted));
        Ok(())
    }

    /// Log (at debug) what a stalled queue would be diagnosed by: our next avail and
    /// used indexes, the guest's avail index and `used_event`, the `avail_event` we
    /// published, requests in flight, the inflight region's entries, and whether call
    /// and error fds are set.
    fn log_state(&self, what: &str, resubmitted: Option<usize>) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let Some(a) = self.active.as_ref() else {
            return;
        };
        let gm = a.mem.memory();
        let size = u64::from(a.queue.size());
        let (avail, used) = (a.queue.avail_ring(), a.queue.used_ring());
        let guest_avail = ring_u16(&gm, avail, 2);
        let guest_used = ring_u16(&gm, used, 2);
        let used_event = ring_u16(&gm, avail, 4 + 2 * size);
        let avail_event = ring_u16(&gm, used, 4 + 8 * size);
        let inflight = a.inflight.as_ref().map(|i| i.pending(a.queue.size()));
        tracing::debug!(
            queue = self.q,
            next_avail = a.queue.next_avail(),
            next_used = a.queue.next_used(),
            ?guest_avail,
            ?guest_used,
            event_idx = a.queue.event_idx_enabled(),
            ?used_event,
            ?avail_event,
            in_flight = a.in_flight,
            ?resubmitted,
            ?inflight,
            call = a.call.is_some(),
            err = a.err.is_some(),
            broken = a.broken,
            "{what}"
        );
    }

    /// Stop: no more kicks, drain what was submitted (at most `timeouts.drain`), and
    /// return the next avail index to report.
    fn stop(&mut self) -> io::Result<u16> {
        self.more = false;
        let Some(a) = self.active.as_ref() else {
            return Err(io::Error::other("the queue is not running"));
        };
        // Fails if already removed (a broken queue): fine.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            a.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        );
        let drain = self.shared.timeouts.drain;
        let deadline = Instant::now() + drain;
        loop {
            self.process(false);
            let left = match &self.active {
                Some(a) if a.in_flight > 0 => deadline.saturating_duration_since(Instant::now()),
                _ => break,
            };
            if left.is_zero() {
                break;
            }
            if let Err(e) = wait_readable(self.ring.as_raw_fd(), left) {
                tracing::error!(
                    queue = self.q,
                    "waiting for completions while draining: {e}"
                );
                break;
            }
        }
        self.log_state("virtqueue stopping", None);
        let Some(a) = self.active.take() else {
            return Err(io::Error::other("the queue is not running"));
        };
        if a.in_flight > 0 {
            tracing::error!(
                queue = self.q,
                in_flight = a.in_flight,
                "virtqueue stopped with requests the device did not complete within {drain:?}"
            );
            return Err(timed_out(format!(
                "{} requests of queue {} did not complete within {drain:?}",
                a.in_flight, self.q
            )));
        }
        Ok(a.queue.next_avail())
    }

    /// Mark the queue broken (see the module doc): log, stop watching kicks, tell the
    /// frontend through the error eventfd. In-flight requests still complete.
    fn fail(&mut self, e: RingError) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        self.more = false;
        if a.broken {
            return;
        }
        a.broken = true;
        tracing::error!(
            queue = self.q,
            error = %e,
            next_avail = a.queue.next_avail(),
            "virtqueue broken: the guest put the ring in an impossible state; the queue \
             is stopped until the frontend resets it"
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            a.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        );
        if let Some(err) = &a.err {
            if let Err(e) = err.write(1) {
                tracing::warn!(queue = self.q, "signal the vring error fd: {e}");
            }
        }
    }

    fn process(&mut self, kick: bool) {
        if kick {
            self.more = false;
            self.pop_and_submit();
        }
        // One io_uring_enter for the whole batch.
        if let Err(e) = self.ring.submit() {
            tracing::warn!(queue = self.q, "io_uring submit: {e}");
        }
        self.reap();
        self.signal();
    }

    /// Pop, walk, decode and submit the available chains: at most queue-size of them in
    /// one pass (the rest wait for the next pass, see `more`). EVENT_IDX aware.
    fn pop_and_submit(&mut self) {
        let (gm, event_idx, size) = match &self.active {
            Some(a) if !a.broken => (a.mem.memory(), a.queue.event_idx_enabled(), a.queue.size()),
            _ => return,
        };
        let ctx = self.ctx();
        let mut budget = usize::from(size).max(1);
        loop {
            let Some(a) = self.active.as_mut() else {
                return;
            };
            if budget == 0 {
                self.more = true;
                return;
            }
            if event_idx {
                let _ = a.queue.disable_notification(&*gm);
            }
            let n = match ring::pending(&a.queue, &*gm) {
                Ok(n) => n,
                Err(e) => return self.fail(e),
            };
            if n == 0 {
                if !event_idx {
                    return;
                }
                match a.queue.enable_notification(&*gm) {
                    // More chains arrived while notifications were off.
                    Ok(true) => {
                        budget -= 1;
                        continue;
                    }
                    Ok(false) => return,
                    Err(_) => {
                        return self.fail(RingError::Memory {
                            what: "avail_event",
                        })
                    }
                }
            }
            for _ in 0..n {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                let Some(a) = self.active.as_mut() else {
                    return;
                };
                let head = match ring::pop_head(&mut a.queue, &*gm) {
                    Ok(h) => h,
                    Err(e) => return self.fail(e),
                };
                if let Some(inf) = &a.inflight {
                    inf.popped(head, a.counter);
                }
                a.counter += 1;
                let (table, indirect) = (a.queue.desc_table(), a.indirect);
                let mut segs = std::mem::take(&mut self.segs);
                let walked = ring::walk_chain(&*gm, table, size, head, indirect, &mut segs);
                match walked {
                    Ok(()) => self.submit(head, &segs, &gm, &ctx),
                    Err(e) => {
                        self.segs = segs;
                        return self.fail(e);
                    }
                }
                self.segs = segs;
            }
        }
    }

    fn ctx(&self) -> request::Ctx {
        request::Ctx {
            info: self.shared.dev.info(),
            read_only: self.shared.read_only,
            writethrough: !self.shared.writeback.load(Ordering::Relaxed),
            id: self.shared.id,
        }
    }

    /// Decode and start one chain.
    fn submit(
        &mut self,
        head: u16,
        segs: &[Seg],
        gm: &GuestMemoryLoadGuard<Mem>,
        ctx: &request::Ctx,
    ) {
        let Some(gen) = self.active.as_ref().map(|a| a.gen) else {
            return;
        };
        match request::decode(segs, gm, ctx) {
            Ok(Decoded::Io {
                op,
                offset,
                len,
                iovs,
                status,
                used_len,
            }) => {
                let buf = if iovs.is_empty() {
                    Buffer::None
                } else {
                    // SAFETY: the iovecs point into the guest memory mapping `gm`, checked
                    // by `decode`. A clone of `gm` (an Arc of the mapping) stays in the
                    // in-flight slot until the completion is handled (or for the life of
                    // the process if the worker exits first, see `exit`), so the mapping
                    // cannot be unmapped under the I/O even if the frontend replaces the
                    // memory table. The driver does not touch a chain's buffers until we
                    // put it in the used ring, which happens only after the completion.
                    Buffer::Borrowed(unsafe { IoVecs::new(iovs) })
                };
                let entry = InFlight {
                    head,
                    status,
                    used_len,
                    gen,
                    mem: gm.clone(),
                };
                let key = match self.slots.insert(entry) {
                    Ok(key) => key,
                    Err(entry) => {
                        tracing::warn!(queue = self.q, head, "in-flight table full");
                        // The borrowed iovecs go before the chain is given back.
                        drop(buf);
                        self.finish(head, gm, Some(entry.status), S_IOERR, 1, gen);
                        return;
                    }
                };
                if let Some(a) = self.active.as_mut() {
                    a.in_flight += 1;
                }
                let req = Request {
                    op,
                    offset,
                    len,
                    buf,
                    tag: Tag::of(key).raw(),
                };
                self.dq.submit(&mut self.ring, req, &mut self.done);
            }
            Ok(Decoded::Done {
                status,
                code,
                used_len,
            }) => self.finish(head, gm, Some(status), code, used_len, gen),
            Err(bad) => {
                tracing::debug!(
                    queue = self.q,
                    head,
                    why = bad.why,
                    "bad virtio-blk request"
                );
                self.finish(head, gm, bad.status, bad.code, 1, gen);
            }
        }
    }

    /// Resubmit a chain recorded as in flight by a previous process.
    fn resubmit(&mut self, head: u16) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if a.broken {
            return;
        }
        let gm = a.mem.memory();
        let (table, size, indirect) = (a.queue.desc_table(), a.queue.size(), a.indirect);
        let mut segs = std::mem::take(&mut self.segs);
        match ring::walk_chain(&*gm, table, size, head, indirect, &mut segs) {
            Ok(()) => {
                let ctx = self.ctx();
                self.submit(head, &segs, &gm, &ctx);
            }
            Err(e) => self.fail(e),
        }
        self.segs = segs;
    }

    /// Reap CQEs and synchronous completions, completing their chains.
    fn reap(&mut self) {
        self.cqes.clear();
        self.ring.reap(&mut self.cqes);
        let owner = self.dq.owner();
        for i in 0..self.cqes.len() {
            let c = self.cqes[i];
            if c.owner() == owner {
                self.dq.complete(&mut self.ring, c, &mut self.done);
            }
        }
        let mut done = std::mem::take(&mut self.done);
        for c in done.drain(..) {
            let Some(entry) = self.slots.remove(Tag::from_raw(c.tag).key()) else {
                tracing::error!(
                    queue = self.q,
                    tag = c.tag,
                    "completion for an unknown request"
                );
                continue;
            };
            if let Some(a) = self.active.as_mut() {
                if a.gen == entry.gen {
                    a.in_flight = a.in_flight.saturating_sub(1);
                }
            }
            let code = match c.result {
                Ok(()) => S_OK,
                Err(e) if e == libc::EOPNOTSUPP => S_UNSUPP,
                Err(e) => {
                    tracing::warn!(queue = self.q, errno = e, "virtio-blk request failed");
                    S_IOERR
                }
            };
            // The buffer (borrowed iovecs) is dropped before the chain is given back.
            drop(c.buf);
            let used_len = if code == S_OK { entry.used_len } else { 1 };
            self.finish(
                entry.head,
                &entry.mem,
                Some(entry.status),
                code,
                used_len,
                entry.gen,
            );
        }
        self.done = done;
    }

    /// Write the status byte and put the chain in the used ring (inflight-tracked), if
    /// the start `gen` it belongs to is still the running one.
    fn finish(
        &mut self,
        head: u16,
        mem: &Mem,
        status: Option<GuestAddress>,
        code: u8,
        used_len: u32,
        gen: u64,
    ) {
        let used_len = match status {
            Some(addr) if mem.write_obj(code, addr).is_ok() => used_len,
            _ => 0,
        };
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if a.gen != gen {
            return;
        }
        let gm = a.mem.memory();
        if let Some(inf) = &a.inflight {
            inf.pre_put(head);
        }
        if a.queue.add_used(&*gm, head, used_len).is_err() {
            return self.fail(RingError::Memory { what: "used ring" });
        }
        if let Some(inf) = &a.inflight {
            inf.post_put(head, a.queue.next_used());
        }
        self.used_since_signal += 1;
    }

    /// Notify the guest once for everything used since the last signal.
    fn signal(&mut self) {
        if self.used_since_signal == 0 {
            return;
        }
        self.used_since_signal = 0;
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let gm = a.mem.memory();
        if a.queue.needs_notification(&*gm).unwrap_or(true) {
            self.call_guest();
        }
    }

    /// Write the call fd (notify the guest), if the running queue has one.
    fn call_guest(&self) {
        let Some(call) = self.active.as_ref().and_then(|a| a.call.as_ref()) else {
            return;
        };
        // Non-blocking (the handler sets O_NONBLOCK): a counter the frontend filled up
        // costs this notice, never the thread.
        if let Err(e) = call.write(1) {
            tracing::debug!(queue = self.q, "signal guest: {e}");
        }
    }
}

/// The `u16` at `base + off` in guest memory (for diagnostics), if it is there.
fn ring_u16(m: &Mem, base: u64, off: u64) -> Option<u16> {
    base.checked_add(off)
        .and_then(|at| m.read_obj::<u16>(GuestAddress(at)).ok())
}

/// Wait until `fd` is readable or `timeout` passes.
fn wait_readable(fd: i32, timeout: Duration) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&raw mut p, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_blockdev::backend::null::NullDevice;
    use ember_blockdev::{DeviceInfo, Extent, OwnerId};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x4000;
    const USED: u64 = 0x5000;
    const QSIZE: u16 = 8;

    /// A device whose requests never complete (a hung backend). Unit-test fake.
    #[derive(Debug)]
    struct Hung;

    struct HungQueue {
        owner: OwnerId,
        held: Vec<Request>,
    }

    impl BlockDevice for Hung {
        fn info(&self) -> DeviceInfo {
            NullDevice::new(1 << 20, false).info()
        }
        fn queue(
            self: Arc<Self>,
            ring: &mut Ring,
        ) -> ember_blockdev::Result<Box<dyn ember_blockdev::Queue>> {
            Ok(Box::new(HungQueue {
                owner: ring.new_owner(),
                held: Vec::new(),
            }))
        }
        fn block_status(&self, _: u64, _: u64) -> ember_blockdev::Result<Vec<Extent>> {
            Ok(Vec::new())
        }
        fn resize(&self, _: u64) -> ember_blockdev::Result<()> {
            Ok(())
        }
    }

    impl ember_blockdev::Queue for HungQueue {
        fn owner(&self) -> OwnerId {
            self.owner
        }
        fn submit(&mut self, _: &mut Ring, req: Request, _: &mut Vec<Completion>) {
            self.held.push(req);
        }
        fn complete(&mut self, _: &mut Ring, _: Cqe, _: &mut Vec<Completion>) {}
        fn in_flight(&self) -> usize {
            self.held.len()
        }
    }

    fn shared(dev: Arc<dyn BlockDevice>, drain: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            dev,
            read_only: false,
            id: [0; super::super::config::ID_BYTES],
            writeback: AtomicBool::new(true),
            timeouts: Timeouts {
                drain,
                reply: drain + Duration::from_secs(10),
            },
        })
    }

    /// Guest memory, a queue over it, and the kick/err eventfds the test keeps.
    fn setup(event_idx: bool) -> (GuestMem, Start, EventFd, EventFd) {
        let m: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut q = Queue::new(1024).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let mem = GuestMem::new(m);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let err = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let start = Start {
            queue: q,
            indirect: true,
            kick: kick.try_clone().unwrap(),
            call: None,
            err: Some(err.try_clone().unwrap()),
            mem: mem.clone(),
            inflight: None,
        };
        (mem, start, kick, err)
    }

    /// Put a one-sector read at head `head` in the avail ring slot `slot`.
    fn read_request(m: &Mem, head: u16, slot: u16) {
        let base = 0x8000 + u64::from(head) * 0x400;
        m.write_obj(0u32, GuestAddress(base)).unwrap();
        m.write_obj(0u64, GuestAddress(base + 8)).unwrap();
        let d = |i: u16, addr: u64, len: u32, flags: u16| {
            m.write_obj(
                Descriptor::new(addr, len, flags, i + 1),
                GuestAddress(DESC + u64::from(i) * 16),
            )
            .unwrap();
        };
        d(head, base, 16, F_NEXT);
        d(head + 1, base + 0x100, 512, F_NEXT | F_WRITE);
        d(head + 2, base + 0x300, 1, F_WRITE);
        m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
    }

    fn avail_idx(m: &Mem, v: u16) {
        m.write_obj(v, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(m: &Mem) -> u16 {
        m.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Run `f` on a thread; fail (instead of hanging the test run) after `limit`.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
    }

    /// Item 2 of issue 11: with EVENT_IDX, an `avail.idx` more than the queue size ahead
    /// made the pop loop spin forever, so the stop never answered. Now the queue breaks at
    /// once (error eventfd signalled) and the stop answers.
    #[test]
    fn avail_index_far_ahead_breaks_the_queue_and_stop_answers() {
        let dev: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20, false));
        let w = WorkerHandle::spawn(shared(dev, Duration::from_secs(5)), 0).unwrap();
        let (mem, start, kick, err) = setup(true);
        let m = mem.memory();
        read_request(&m, 0, 0);
        avail_idx(&m, 1);
        w.start(start).unwrap();
        assert_eq!(used_idx(&m), 1, "a good request completes");
        assert!(err.read().is_err(), "no error yet");
        avail_idx(&m, 1 + QSIZE + 1);
        kick.write(1).unwrap();
        // Wait for the kick to be seen before stopping: a stop that overtakes the kick
        // (a loaded machine) would never look at the impossible ring.
        let deadline = Instant::now() + Duration::from_secs(20);
        let signalled = loop {
            match err.read() {
                Ok(n) => break n,
                Err(e) if Instant::now() >= deadline => {
                    panic!("the vring error fd was not signalled within 20 s: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert_eq!(signalled, 1, "the vring error fd was signalled once");
        let next = within(Duration::from_secs(20), move || {
            let r = w.stop();
            (r, w)
        });
        assert_eq!(
            next.0.unwrap(),
            1,
            "nothing popped from the impossible ring"
        );
        assert!(next.1.join(Instant::now() + Duration::from_secs(10)));
    }

    /// A looping chain breaks the queue; chains popped before it were completed.
    #[test]
    fn a_looping_chain_breaks_the_queue() {
        let dev: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20, false));
        let w = WorkerHandle::spawn(shared(dev, Duration::from_secs(5)), 0).unwrap();
        let (mem, start, _kick, err) = setup(false);
        let m = mem.memory();
        read_request(&m, 0, 0);
        m.write_obj(
            Descriptor::new(0x9000, 16, F_NEXT, 4),
            GuestAddress(DESC + 3 * 16),
        )
        .unwrap();
        m.write_obj(
            Descriptor::new(0x9000, 16, F_NEXT, 3),
            GuestAddress(DESC + 4 * 16),
        )
        .unwrap();
        m.write_obj(3u16, GuestAddress(AVAIL + 6)).unwrap();
        avail_idx(&m, 2);
        w.start(start).unwrap();
        assert_eq!(used_idx(&m), 1);
        assert_eq!(err.read().unwrap(), 1);
        assert_eq!(w.stop().unwrap(), 2, "the bad chain was popped");
        // Started again (the frontend reset the ring): it runs.
        let (mem2, start2, kick2, err2) = setup(false);
        let m2 = mem2.memory();
        read_request(&m2, 0, 0);
        avail_idx(&m2, 1);
        w.start(start2).unwrap();
        assert_eq!(used_idx(&m2), 1);
        read_request(&m2, 3, 1);
        avail_idx(&m2, 2);
        kick2.write(1).unwrap();
        let t = Instant::now();
        while used_idx(&m2) != 2 {
            assert!(t.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(err2.read().is_err());
        assert_eq!(w.stop().unwrap(), 2);
    }

    /// A device that never completes: the stop gives up after the drain timeout with an
    /// error instead of waiting forever, and the thread still exits when told to.
    #[test]
    fn stop_is_bounded_when_the_device_never_completes() {
        let w = WorkerHandle::spawn(shared(Arc::new(Hung), Duration::from_millis(300)), 0).unwrap();
        let (mem, start, _kick, _err) = setup(true);
        let m = mem.memory();
        read_request(&m, 0, 0);
        avail_idx(&m, 1);
        w.start(start).unwrap();
        assert_eq!(used_idx(&m), 0, "the request is stuck in the device");
        let (r, w) = within(Duration::from_secs(20), move || (w.stop(), w));
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // A new start works; the stuck request's completion (never) cannot touch it.
        let (mem2, start2, _k, _e) = setup(true);
        avail_idx(&mem2.memory(), 0);
        w.start(start2).unwrap();
        assert_eq!(w.stop().unwrap(), 0);
        assert!(w.join(Instant::now() + Duration::from_secs(10)));
    }

    /// The guest stall of issue 11 (tests/crash.rs, about one run of 50 kills in four):
    /// emberd was killed after putting a chain in the used ring and before writing the
    /// call fd. The guest (EVENT_IDX) was never told, its `used_event` stayed behind, so
    /// after the restart the resubmitted chain's completion did not notify it either
    /// (`needs_notification`: `used_event` is not in the range just used) and the queue
    /// waited forever. The state is built from bytes as the killed process left it:
    /// heads 0 and 3 popped (inflight counters 1, 2), head 0 in the used ring (index 1),
    /// head 3 still in flight, `used_event` 0. A start must notify the guest.
    #[test]
    fn a_restart_notifies_the_guest_of_chains_used_before_the_kill() {
        use super::super::inflight::InflightArea;
        let dev: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20, false));
        let w = WorkerHandle::spawn(shared(dev, Duration::from_secs(5)), 0).unwrap();
        let (mem, mut start, _kick, _err) = setup(true);
        let m = mem.memory();
        read_request(&m, 0, 0);
        read_request(&m, 3, 1);
        avail_idx(&m, 2);
        // used_event (after the avail ring): the guest wants a notice when entry 0 is used.
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
        // The killed process: popped 0 and 3, completed 0, died before the call.
        let area = Arc::new(InflightArea::create(1, QSIZE).unwrap());
        let region = area.queue(0).unwrap();
        region.recover(QSIZE, 0);
        region.popped(0, 1);
        region.popped(3, 2);
        region.pre_put(0);
        m.write_obj(0u32, GuestAddress(USED + 4)).unwrap();
        m.write_obj(1u32, GuestAddress(USED + 8)).unwrap();
        m.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
        region.post_put(0, 1);
        // QEMU sends the used index as the base after a backend died.
        start.queue.set_next_avail(1);
        start.queue.set_next_used(1);
        start.inflight = Some(region.clone());
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        start.call = Some(call.try_clone().unwrap());
        w.start(start).unwrap();
        let t = Instant::now();
        while used_idx(&m) != 2 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "head 3 not resubmitted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let second: u32 = m.read_obj(GuestAddress(USED + 4 + 8)).unwrap();
        assert_eq!(
            second, 3,
            "the chain in flight was resubmitted and used once"
        );
        assert!(
            call.read().is_ok(),
            "the guest was not notified: chains in the used ring it never heard of"
        );
        assert_eq!(w.stop().unwrap(), 2);
        assert!(region.pending(QSIZE).is_empty(), "nothing left in flight");
    }

    /// Per pass at most queue-size chains are popped, and a guest that keeps the ring
    /// full cannot starve a stop.
    #[test]
    fn a_full_ring_is_served_in_bounded_passes() {
        let dev: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20, false));
        let w = WorkerHandle::spawn(shared(dev, Duration::from_secs(5)), 0).unwrap();
        let (mem, start, kick, err) = setup(true);
        let m = mem.memory();
        // QSIZE/3 chains of three descriptors each, published again and again.
        let heads = [0u16, 3];
        for (slot, h) in heads.iter().enumerate() {
            read_request(&m, *h, slot as u16);
        }
        avail_idx(&m, 2);
        w.start(start).unwrap();
        let mut idx = 2u16;
        for _ in 0..200 {
            let used = used_idx(&m);
            while idx.wrapping_sub(used) < 2 {
                let slot = idx % QSIZE;
                m.write_obj(
                    heads[usize::from(idx % 2)],
                    GuestAddress(AVAIL + 4 + 2 * u64::from(slot)),
                )
                .unwrap();
                idx = idx.wrapping_add(1);
            }
            avail_idx(&m, idx);
            kick.write(1).unwrap();
        }
        let (r, _w) = within(Duration::from_secs(20), move || (w.stop(), w));
        assert!(r.is_ok());
        assert!(err.read().is_err(), "a busy but legal ring is not broken");
    }
}
