//! NBD I/O threads.
//!
//! Each thread owns one [`Ring`], one device [`Queue`] per export it serves, a
//! [`BufPool`] and its connections. One loop iteration = one `submit_and_wait`: it
//! submits every SQE queued since the last one (receives, disk I/O, sendmsgs) and waits
//! for at least one CQE. CQEs of owner 0 are the loop's own (socket I/O of a connection,
//! or the control eventfd); other owners are device queues.
//!
//! Control messages (a new connection, an export removed, shutdown) arrive over an
//! mpsc channel; the sender then bumps the thread's eventfd, on which a read is always
//! armed in the ring, so the loop wakes without polling. Nothing else is shared but the
//! server's memory budget (an atomic counter, see [`super::gate`]).
//!
//! While it has connections the thread also keeps a tick armed (an `IORING_OP_TIMEOUT`
//! every [`TICK`]): it drops clients whose deadlines passed
//! ([`Conn::check_deadlines`]) and retries connections that wait for memory with nothing
//! of their own in flight ([`Conn::waits_for_memory`]).

use super::conn::{Conn, ConnSetup, Cx, KIND_RECV, KIND_SEND};
use super::gate::Pool;
use super::Export;
use ember_blockdev::engine::{owner_of, slot_of, user_data, DEFAULT_RING_ENTRIES};
use ember_blockdev::{Completion, Cqe, OwnerId, Queue, Ring};
use io_uring::{opcode, types};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The `user_data` slot of the eventfd read.
const EVENTFD_SLOT: u64 = (1 << 48) - 1;
/// The `user_data` slot of the tick.
const TICK_SLOT: u64 = (1 << 48) - 2;
/// How often a thread with connections looks at their deadlines and memory waits.
pub const TICK: Duration = Duration::from_millis(200);

/// A control message to an I/O thread.
pub enum Ctl {
    /// Serve this connection.
    NewConn(ConnSetup),
    /// Close every connection of this export id.
    #[allow(dead_code)] // sent by `NbdServer::remove_export`, used by `emberd serve`
    RemoveExport(u64),
    /// Close everything and exit once in-flight requests are done.
    Shutdown,
}

/// The sending side of an I/O thread.
pub struct WorkerHandle {
    tx: mpsc::Sender<Ctl>,
    efd: Arc<OwnedFd>,
}

impl WorkerHandle {
    /// Send a control message and wake the thread.
    pub fn send(&self, c: Ctl) {
        if self.tx.send(c).is_ok() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            let r = unsafe { libc::write(self.efd.as_raw_fd(), (&raw const one).cast(), 8) };
            if r != 8 {
                tracing::warn!(error = %io::Error::last_os_error(), "could not wake an I/O thread");
            }
        }
    }
}

/// Start I/O thread number `i`, keeping at most `pool_bytes` of idle buffers and dropping
/// clients that stall for `stall`.
pub fn spawn(
    i: usize,
    pool_bytes: usize,
    stall: Duration,
) -> io::Result<(WorkerHandle, JoinHandle<()>)> {
    // SAFETY: eventfd(2) with constant flags; the result is checked below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
    let (tx, rx) = mpsc::channel();
    let efd2 = efd.clone();
    // The ring is made on its own thread (it is single-issuer); set-up errors come back.
    let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let join = std::thread::Builder::new()
        .name(format!("nbd-io-{i}"))
        .spawn(move || {
            let ring = match Ring::new_single_thread(DEFAULT_RING_ENTRIES) {
                Ok(r) => {
                    let _ = ready_tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            Worker {
                ring,
                rx,
                efd: efd2,
                efd_buf: Box::new(0),
                efd_armed: false,
                tick_ts: Box::new(
                    types::Timespec::new()
                        .sec(TICK.as_secs())
                        .nsec(TICK.subsec_nanos()),
                ),
                tick_armed: false,
                stall,
                now: Instant::now(),
                conns: Vec::new(),
                free_conns: Vec::new(),
                live: 0,
                queues: Vec::new(),
                owners: HashMap::new(),
                pool: Pool::new(pool_bytes),
                done: Vec::new(),
                cqes: Vec::new(),
                dirty: Vec::new(),
                stopping: false,
            }
            .run()
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("I/O thread died during set-up"))??;
    Ok((WorkerHandle { tx, efd }, join))
}

struct QueueSlot {
    export_id: u64,
    queue: Box<dyn Queue>,
    users: usize,
}

struct Worker {
    ring: Ring,
    rx: mpsc::Receiver<Ctl>,
    efd: Arc<OwnedFd>,
    /// Target of the armed eventfd read; owned here until its CQE.
    efd_buf: Box<u64>,
    efd_armed: bool,
    /// The tick's interval; owned here until its CQE.
    tick_ts: Box<types::Timespec>,
    tick_armed: bool,
    stall: Duration,
    /// The time of this loop iteration.
    now: Instant,
    conns: Vec<Option<Box<Conn>>>,
    free_conns: Vec<usize>,
    live: usize,
    queues: Vec<Option<QueueSlot>>,
    owners: HashMap<OwnerId, usize>,
    pool: Pool,
    done: Vec<Completion>,
    cqes: Vec<Cqe>,
    dirty: Vec<usize>,
    stopping: bool,
}

impl Worker {
    fn run(mut self) {
        self.arm_eventfd();
        let mut errors = 0u32;
        loop {
            if self.stopping && self.live == 0 && !self.efd_armed && !self.tick_armed {
                break;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                errors += 1;
                tracing::error!(error = %e, "io_uring submit failed");
                if errors > 100 {
                    tracing::error!("NBD I/O thread giving up; its connections are lost");
                    // SQEs may still point into connection memory: never free it.
                    std::mem::forget(self);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            errors = 0;
            self.now = Instant::now();
            self.cqes.clear();
            self.ring.reap(&mut self.cqes);
            let cqes = std::mem::take(&mut self.cqes);
            for c in &cqes {
                self.dispatch(*c);
            }
            self.cqes = cqes;
            self.drain();
        }
    }

    fn arm_eventfd(&mut self) {
        if self.efd_armed || self.stopping {
            return;
        }
        let ptr: *mut u64 = &raw mut *self.efd_buf;
        let e = opcode::Read::new(types::Fd(self.efd.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(user_data(0, EVENTFD_SLOT));
        // SAFETY: `efd_buf` is a Box owned by the worker, which exits only after this
        // read's CQE was reaped (`efd_armed` false), so the 8 bytes stay valid.
        match unsafe { self.ring.push(&e) } {
            Ok(()) => self.efd_armed = true,
            Err(e) => tracing::error!(error = %e, "could not arm the control eventfd"),
        }
    }

    /// Keep the tick armed while there are connections.
    fn arm_tick(&mut self) {
        if self.tick_armed || self.live == 0 {
            return;
        }
        let ts: *const types::Timespec = &raw const *self.tick_ts;
        let e = opcode::Timeout::new(ts)
            .build()
            .user_data(user_data(0, TICK_SLOT));
        // SAFETY: `tick_ts` is a Box owned by the worker, which exits only after this
        // timeout's CQE was reaped (`tick_armed` false); the kernel reads it at submission.
        match unsafe { self.ring.push(&e) } {
            Ok(()) => self.tick_armed = true,
            Err(e) => tracing::warn!(error = %e, "could not arm the NBD tick; will retry"),
        }
    }

    /// Deadlines and memory waits of every connection.
    fn tick(&mut self) {
        for ci in 0..self.conns.len() {
            let Some(Some(c)) = self.conns.get_mut(ci) else {
                continue;
            };
            let dropped = c.check_deadlines(self.now, self.stall, &mut self.pool);
            if (dropped || c.waits_for_memory()) && !c.dirty {
                c.dirty = true;
                self.dirty.push(ci);
            }
        }
    }

    fn dispatch(&mut self, c: Cqe) {
        let owner = owner_of(c.user_data);
        if owner != 0 {
            let Some(qi) = self.owners.get(&owner).copied() else {
                // A dropped queue may leave SQEs that point to no memory (an iSCSI
                // queue's socket polls and timer); their completions end here.
                tracing::debug!(owner, "completion for an unknown queue");
                return;
            };
            if let Some(q) = self.queues.get_mut(qi).and_then(|q| q.as_mut()) {
                q.queue.complete(&mut self.ring, c, &mut self.done);
            }
            return;
        }
        let slot = slot_of(c.user_data);
        if slot == EVENTFD_SLOT {
            self.efd_armed = false;
            self.control();
            self.arm_eventfd();
            self.arm_tick();
            return;
        }
        if slot == TICK_SLOT {
            self.tick_armed = false;
            self.tick();
            self.arm_tick();
            return;
        }
        let ci = (slot >> 2) as usize;
        let Some(Some(conn)) = self.conns.get_mut(ci) else {
            return;
        };
        match slot & 3 {
            KIND_RECV => {
                let Some(q) = self.queues.get_mut(conn.qidx).and_then(|q| q.as_mut()) else {
                    return;
                };
                let mut cx = Cx {
                    ring: &mut self.ring,
                    queue: q.queue.as_mut(),
                    pool: &mut self.pool,
                    done: &mut self.done,
                    now: self.now,
                };
                conn.on_recv(c.result, &mut cx);
            }
            KIND_SEND => conn.on_send(c.result, &mut self.pool, self.now),
            _ => {}
        }
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(ci);
        }
    }

    /// Route device completions and service dirty connections until both are quiet.
    fn drain(&mut self) {
        loop {
            let done = std::mem::take(&mut self.done);
            for c in done {
                let ci = (c.tag >> 32) as usize;
                let Some(Some(conn)) = self.conns.get_mut(ci) else {
                    tracing::warn!(conn = ci, "completion for an unknown connection");
                    continue;
                };
                let Some(q) = self.queues.get_mut(conn.qidx).and_then(|q| q.as_mut()) else {
                    continue;
                };
                let mut cx = Cx {
                    ring: &mut self.ring,
                    queue: q.queue.as_mut(),
                    pool: &mut self.pool,
                    done: &mut self.done,
                    now: self.now,
                };
                conn.on_done(c, &mut cx);
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(ci);
                }
            }
            if self.dirty.is_empty() && self.done.is_empty() {
                return;
            }
            while let Some(ci) = self.dirty.pop() {
                self.service(ci);
            }
        }
    }

    fn service(&mut self, ci: usize) {
        let Some(Some(conn)) = self.conns.get_mut(ci) else {
            return;
        };
        conn.dirty = false;
        let qidx = conn.qidx;
        let Some(q) = self.queues.get_mut(qidx).and_then(|q| q.as_mut()) else {
            return;
        };
        let mut cx = Cx {
            ring: &mut self.ring,
            queue: q.queue.as_mut(),
            pool: &mut self.pool,
            done: &mut self.done,
            now: self.now,
        };
        conn.service(&mut cx);
        if conn.finished() {
            self.free_conn(ci);
        }
    }

    fn free_conn(&mut self, ci: usize) {
        let Some(conn) = self.conns.get_mut(ci).and_then(|c| c.take()) else {
            return;
        };
        self.free_conns.push(ci);
        self.live -= 1;
        let qidx = conn.qidx;
        drop(conn);
        let unused = match self.queues.get_mut(qidx).and_then(|q| q.as_mut()) {
            Some(q) => {
                q.users = q.users.saturating_sub(1);
                q.users == 0 && q.queue.in_flight() == 0
            }
            None => false,
        };
        if unused {
            if let Some(q) = self.queues.get_mut(qidx).and_then(|q| q.take()) {
                let owner = q.queue.owner();
                self.owners.remove(&owner);
                drop(q);
                self.ring.release_owner(owner);
            }
        }
    }

    fn control(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Ctl::NewConn(n) => self.add_conn(n),
                Ctl::RemoveExport(id) => {
                    for ci in 0..self.conns.len() {
                        let Some(Some(c)) = self.conns.get_mut(ci) else {
                            continue;
                        };
                        if c.export.id == id {
                            c.close("export removed", true, &mut self.pool);
                            if !c.dirty {
                                c.dirty = true;
                                self.dirty.push(ci);
                            }
                        }
                    }
                }
                Ctl::Shutdown => {
                    self.stopping = true;
                    for ci in 0..self.conns.len() {
                        let Some(Some(c)) = self.conns.get_mut(ci) else {
                            continue;
                        };
                        c.close("server shutting down", false, &mut self.pool);
                        if !c.dirty {
                            c.dirty = true;
                            self.dirty.push(ci);
                        }
                    }
                }
            }
        }
    }

    fn queue_for(&mut self, export: &Arc<Export>) -> Option<usize> {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.as_ref().is_some_and(|q| q.export_id == export.id))
        {
            return Some(i);
        }
        let queue = match export.dev.clone().queue(&mut self.ring) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(export = %export.name, error = %e, "could not open a device queue");
                return None;
            }
        };
        let owner = queue.owner();
        let slot = QueueSlot {
            export_id: export.id,
            queue,
            users: 0,
        };
        let i = match self.queues.iter().position(|q| q.is_none()) {
            Some(i) => {
                self.queues[i] = Some(slot);
                i
            }
            None => {
                self.queues.push(Some(slot));
                self.queues.len() - 1
            }
        };
        self.owners.insert(owner, i);
        Some(i)
    }

    fn add_conn(&mut self, n: ConnSetup) {
        if self.stopping {
            return;
        }
        let Some(qidx) = self.queue_for(&n.export) else {
            return;
        };
        if let Some(q) = self.queues.get_mut(qidx).and_then(|q| q.as_mut()) {
            q.users += 1;
        }
        let ci = self.free_conns.pop().unwrap_or(self.conns.len());
        if ci == self.conns.len() {
            self.conns.push(None);
        }
        tracing::info!(peer = %n.peer, export = %n.export.name, "NBD client connected");
        let mut conn = Conn::new(ci, qidx, n, self.now);
        conn.dirty = true;
        self.conns[ci] = Some(conn);
        self.live += 1;
        self.dirty.push(ci);
    }
}
