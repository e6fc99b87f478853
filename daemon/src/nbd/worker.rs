//! NBD I/O threads.
//!
//! Each thread owns one [`Ring`], one device [`Queue`] per export it serves, a
//! [`Pool`] of idle buffers and its connections. One loop iteration = one `submit_and_wait`: it
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
//!
//! Tables: connections and device queues live in [`Slots`]. The loop's own SQEs carry a
//! [`Tag`] with owner 0 and a kind (a connection's receive or send, keyed by the
//! connection; the eventfd read; the tick). Device completions find their connection by
//! the route of their tag, the connection's slot: a connection is freed only once none
//! of its requests is at the device, so that slot cannot have been reused meanwhile.
//! Connections per thread are bounded by the route's 16 bits ([`MAX_CONNS`]).

use super::conn::{Conn, ConnSetup, Cx, KIND_RECV, KIND_SEND};
use super::gate::Pool;
use super::Export;
use ember_blockdev::engine::DEFAULT_RING_ENTRIES;
use ember_blockdev::sys;
use ember_blockdev::{Completion, Cqe, Key, Kind, OwnerId, Queue, Ring, Slots, Tag};
use io_uring::{opcode, types};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Tag kind of the eventfd read.
const KIND_EVENTFD: Kind = Kind::new(2);
/// Tag kind of the tick.
const KIND_TICK: Kind = Kind::new(3);
/// Most connections one I/O thread serves: a device request's tag routes by a 16-bit
/// connection slot.
pub const MAX_CONNS: usize = 1 << 16;
/// Most device queues (exports) one I/O thread serves: one owner id each.
const MAX_QUEUES: usize = 1 << 16;
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
            if let Err(e) = sys::eventfd_add(self.efd.as_fd(), 1) {
                tracing::warn!(error = %e, "could not wake an I/O thread");
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
    let efd = Arc::new(sys::eventfd()?);
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
                conns: Slots::new(MAX_CONNS),
                queues: Slots::new(MAX_QUEUES),
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
    conns: Slots<Box<Conn>>,
    queues: Slots<QueueSlot>,
    owners: HashMap<OwnerId, Key>,
    pool: Pool,
    done: Vec<Completion>,
    cqes: Vec<Cqe>,
    dirty: Vec<Key>,
    stopping: bool,
}

impl Worker {
    fn run(mut self) {
        self.arm_eventfd();
        let mut errors = 0u32;
        loop {
            if self.stopping && self.conns.is_empty() && !self.efd_armed && !self.tick_armed {
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
            .user_data(Tag::new(0, KIND_EVENTFD, Key::ZERO).raw());
        // SAFETY: `efd_buf` is a Box owned by the worker, which exits only after this
        // read's CQE was reaped (`efd_armed` false), so the 8 bytes stay valid.
        match unsafe { self.ring.push(&e) } {
            Ok(()) => self.efd_armed = true,
            Err(e) => tracing::error!(error = %e, "could not arm the control eventfd"),
        }
    }

    /// Keep the tick armed while there are connections.
    fn arm_tick(&mut self) {
        if self.tick_armed || self.conns.is_empty() {
            return;
        }
        let ts: *const types::Timespec = &raw const *self.tick_ts;
        let e = opcode::Timeout::new(ts)
            .build()
            .user_data(Tag::new(0, KIND_TICK, Key::ZERO).raw());
        // SAFETY: `tick_ts` is a Box owned by the worker, which exits only after this
        // timeout's CQE was reaped (`tick_armed` false); the kernel reads it at submission.
        match unsafe { self.ring.push(&e) } {
            Ok(()) => self.tick_armed = true,
            Err(e) => tracing::warn!(error = %e, "could not arm the NBD tick; will retry"),
        }
    }

    /// Deadlines and memory waits of every connection.
    fn tick(&mut self) {
        for (ci, c) in self.conns.iter_mut() {
            let dropped = c.check_deadlines(self.now, self.stall, &mut self.pool);
            if (dropped || c.waits_for_memory()) && !c.dirty {
                c.dirty = true;
                self.dirty.push(ci);
            }
        }
    }

    fn dispatch(&mut self, c: Cqe) {
        let tag = c.tag();
        let owner = tag.route();
        if owner != 0 {
            let Some(qi) = self.owners.get(&owner).copied() else {
                // A dropped queue may leave SQEs that point to no memory (an iSCSI
                // queue's socket polls and timer); their completions end here.
                tracing::debug!(owner, "completion for an unknown queue");
                return;
            };
            if let Some(q) = self.queues.get_mut(qi) {
                q.queue.complete(&mut self.ring, c, &mut self.done);
            }
            return;
        }
        let kind = tag.kind();
        if kind == KIND_EVENTFD {
            self.efd_armed = false;
            self.control();
            self.arm_eventfd();
            self.arm_tick();
            return;
        }
        if kind == KIND_TICK {
            self.tick_armed = false;
            self.tick();
            self.arm_tick();
            return;
        }
        let ci = tag.key();
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        match kind {
            KIND_RECV => {
                let Some(q) = self.queues.get_mut(conn.qidx) else {
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
                // Routed by slot alone: see the module doc.
                let route = Tag::from_raw(c.tag).route();
                let Some((ci, conn)) = self.conns.get_by_slot_mut(u32::from(route)) else {
                    tracing::warn!(conn = route, "completion for an unknown connection");
                    continue;
                };
                let Some(q) = self.queues.get_mut(conn.qidx) else {
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

    fn service(&mut self, ci: Key) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        conn.dirty = false;
        let qidx = conn.qidx;
        let Some(q) = self.queues.get_mut(qidx) else {
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

    fn free_conn(&mut self, ci: Key) {
        let Some(conn) = self.conns.remove(ci) else {
            return;
        };
        let qidx = conn.qidx;
        drop(conn);
        let unused = match self.queues.get_mut(qidx) {
            Some(q) => {
                q.users = q.users.saturating_sub(1);
                q.users == 0 && q.queue.in_flight() == 0
            }
            None => false,
        };
        if unused {
            if let Some(q) = self.queues.remove(qidx) {
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
                    for (ci, c) in self.conns.iter_mut() {
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
                    for (ci, c) in self.conns.iter_mut() {
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

    fn queue_for(&mut self, export: &Arc<Export>) -> Option<Key> {
        if let Some((k, _)) = self.queues.iter().find(|(_, q)| q.export_id == export.id) {
            return Some(k);
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
        let i = match self.queues.insert(slot) {
            Ok(i) => i,
            Err(slot) => {
                tracing::error!(export = %export.name, "too many exports on one I/O thread");
                self.ring.release_owner(slot.queue.owner());
                return None;
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
        tracing::info!(peer = %n.peer, export = %n.export.name, "NBD client connected");
        let now = self.now;
        let mut n = Some(n);
        let ci = self.conns.insert_with(|key| {
            let route = u16::try_from(key.slot()).ok()?;
            let mut conn = Conn::new(key, route, qidx, n.take()?, now);
            conn.dirty = true;
            Some(conn)
        });
        let Some(ci) = ci else {
            // Dropping the setup closes the socket.
            tracing::error!("too many NBD connections on one I/O thread; dropping one");
            return;
        };
        if let Some(q) = self.queues.get_mut(qidx) {
            q.users += 1;
        }
        self.dirty.push(ci);
    }
}
