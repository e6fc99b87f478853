//! Per-virtqueue I/O worker: one thread per queue, owning its io_uring [`Ring`], its
//! device [`Queue`](ember_blockdev::Queue), its virtqueue and its in-flight table. No lock
//! on the I/O path.
//!
//! The thread sleeps in its own epoll on three fds: a wake eventfd for commands from the
//! vhost-user message thread (start, stop, new call fd), the ring fd (readable when CQEs
//! wait) and, while the queue runs, the guest's kick eventfd. So kicks and completions
//! both wake it.
//!
//! Per kick: pop every available chain, decode, record it in the inflight region, submit
//! each to the device with iovecs into guest memory, one `io_uring_enter`, reap, write
//! statuses, add used entries, signal once (EVENT_IDX aware). `Stop` (GET_VRING_BASE)
//! drains everything in flight before answering, so the reported avail index owes nothing.

use super::inflight::QueueInflight;
use super::request::{self, Decoded, Mem, Seg, S_IOERR, S_OK, S_UNSUPP};
use ember_blockdev::{
    engine::owner_of, BlockDevice, Buffer, Completion, Cqe, IoVecs, Request, Ring,
};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory shared between the message thread (which swaps maps) and the workers.
pub type GuestMem = GuestMemoryAtomic<Mem>;

const TOKEN_WAKE: u64 = 0;
const TOKEN_RING: u64 = 1;
const TOKEN_KICK: u64 = 2;

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
}

/// Everything a queue needs to run, built by the message thread.
pub struct Start {
    /// The configured virtqueue (size, addresses, next avail/used, event idx, ready).
    pub queue: Queue,
    /// Guest → device notifications.
    pub kick: EventFd,
    /// Device → guest notifications.
    pub call: Option<EventFd>,
    /// Guest memory.
    pub mem: GuestMem,
    /// Inflight region of this queue, if the frontend set one up.
    pub inflight: Option<QueueInflight>,
}

/// A command for a worker.
pub enum Cmd {
    /// Run a queue; the reply comes once the worker has taken it (and processed what
    /// was already available).
    Start(Box<Start>, mpsc::Sender<()>),
    /// Stop the queue: drain in-flight requests, answer the next avail index.
    Stop(mpsc::Sender<u16>),
    /// Replace the call eventfd.
    SetCall(Option<EventFd>),
}

/// The message thread's handle on a worker thread.
#[derive(Debug)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Cmd>,
    wake: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Spawn the worker of queue `q`. The ring and device queue are created on the thread;
    /// a failure there is reported here.
    pub fn spawn(shared: Arc<Shared>, q: u16) -> io::Result<WorkerHandle> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let wake2 = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
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
            .recv()
            .map_err(|_| io::Error::other("worker thread died"))??;
        Ok(WorkerHandle {
            tx,
            wake,
            thread: Some(thread),
        })
    }

    /// Send a command.
    pub fn send(&self, cmd: Cmd) -> io::Result<()> {
        self.tx
            .send(cmd)
            .map_err(|_| io::Error::other("worker thread is gone"))?;
        self.wake.write(1)
    }

    /// Hand a queue to the worker and wait until it runs.
    pub fn start(&self, s: Start) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Start(Box::new(s), tx))?;
        rx.recv()
            .map_err(|_| io::Error::other("worker thread is gone"))
    }

    /// Stop the queue and return its next avail index (None if the worker is gone).
    pub fn stop(&self) -> Option<u16> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Stop(tx)).ok()?;
        rx.recv().ok()
    }
}

impl WorkerHandle {
    /// Make the thread exit (it drains what it submitted first) and wait for it.
    pub fn join(mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a vhost-user queue worker panicked");
            }
        }
    }

    fn close(&mut self) {
        // Closing the channel and waking the thread makes it exit (after draining).
        let (tx, _) = mpsc::channel();
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
    kick: EventFd,
    call: Option<EventFd>,
    mem: GuestMem,
    inflight: Option<QueueInflight>,
    counter: u64,
}

/// One request between submission and completion.
struct InFlight {
    head: u16,
    status: GuestAddress,
    used_len: u32,
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
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    done: Vec<Completion>,
    cqes: Vec<Cqe>,
    pending: Vec<(u16, Vec<Seg>)>,
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
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            done: Vec::new(),
            cqes: Vec::new(),
            pending: Vec::new(),
            used_since_signal: 0,
        })
    }

    fn run(&mut self, rx: &mpsc::Receiver<Cmd>) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(queue = self.q, "epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        loop {
                            match rx.try_recv() {
                                Ok(cmd) => self.command(cmd),
                                Err(mpsc::TryRecvError::Empty) => break,
                                Err(mpsc::TryRecvError::Disconnected) => {
                                    self.stop();
                                    return;
                                }
                            }
                        }
                    }
                    TOKEN_KICK => {
                        if let Some(a) = &self.active {
                            let _ = a.kick.read();
                        }
                        self.process(true);
                    }
                    _ => self.process(false),
                }
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Start(s, reply) => {
                self.start(*s);
                let _ = reply.send(());
            }
            Cmd::Stop(reply) => {
                let next = self.stop();
                let _ = reply.send(next);
            }
            Cmd::SetCall(call) => {
                if let Some(a) = &mut self.active {
                    a.call = call;
                }
            }
        }
    }

    fn start(&mut self, s: Start) {
        if self.active.is_some() {
            self.stop();
        }
        let Start {
            mut queue,
            kick,
            call,
            mem,
            inflight,
        } = s;
        let mut counter = 1;
        let mut resubmit = Vec::new();
        if let Some(inf) = &inflight {
            let m = mem.memory();
            let used = match queue.used_idx(&*m, Ordering::Acquire) {
                Ok(u) => u.0,
                Err(e) => {
                    tracing::error!(queue = self.q, "cannot read the used index: {e}");
                    return;
                }
            };
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
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        ) {
            tracing::error!(queue = self.q, "register kick fd: {e}");
            return;
        }
        self.active = Some(Active {
            queue,
            kick,
            call,
            mem,
            inflight,
            counter,
        });
        tracing::debug!(queue = self.q, "virtqueue started");
        for head in resubmit {
            self.resubmit(head);
        }
        // Requests may have been queued before we started listening.
        self.process(true);
    }

    /// Drain and stop; returns the next avail index to report.
    fn stop(&mut self) -> u16 {
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                tracing::error!(queue = self.q, "io_uring wait while draining: {e}");
                break;
            }
            self.process(false);
        }
        let Some(a) = self.active.take() else {
            return 0;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            a.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        );
        tracing::debug!(queue = self.q, "virtqueue stopped");
        a.queue.next_avail()
    }

    fn process(&mut self, kick: bool) {
        let mut popped = std::mem::take(&mut self.pending);
        let gm = match self.active.as_mut() {
            Some(a) => {
                let gm = a.mem.memory();
                if kick {
                    pop_all(a, &gm, &mut popped);
                }
                Some(gm)
            }
            None => None,
        };
        if let Some(gm) = &gm {
            let ctx = self.ctx();
            for (head, segs) in popped.drain(..) {
                self.submit(head, &segs, gm, &ctx);
            }
        }
        popped.clear();
        self.pending = popped;
        // One io_uring_enter for the whole batch.
        if let Err(e) = self.ring.submit() {
            tracing::warn!(queue = self.q, "io_uring submit: {e}");
        }
        self.reap();
        self.signal();
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
                    // in-flight slot until the completion is handled, so the mapping
                    // cannot be unmapped under the I/O even if the frontend replaces the
                    // memory table. The driver does not touch a chain's buffers until we
                    // put it in the used ring, which happens only after the completion.
                    Buffer::Borrowed(unsafe { IoVecs::new(iovs) })
                };
                let entry = InFlight {
                    head,
                    status,
                    used_len,
                    mem: gm.clone(),
                };
                let slot = if let Some(i) = self.free.pop() {
                    self.slots[i] = Some(entry);
                    i
                } else {
                    self.slots.push(Some(entry));
                    self.slots.len() - 1
                };
                self.in_flight += 1;
                let req = Request {
                    op,
                    offset,
                    len,
                    buf,
                    tag: slot as u64,
                };
                self.dq.submit(&mut self.ring, req, &mut self.done);
            }
            Ok(Decoded::Done {
                status,
                code,
                used_len,
            }) => self.finish(head, gm, Some(status), code, used_len),
            Err(bad) => {
                tracing::debug!(
                    queue = self.q,
                    head,
                    why = bad.why,
                    "bad virtio-blk request"
                );
                self.finish(head, gm, bad.status, bad.code, 1);
            }
        }
    }

    /// Resubmit a chain recorded as in flight by a previous process.
    fn resubmit(&mut self, head: u16) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        let gm = a.mem.memory();
        let segs = walk_chain(&gm, a.queue.desc_table(), a.queue.size(), head);
        match segs {
            Some(segs) => {
                let ctx = self.ctx();
                self.submit(head, &segs, &gm, &ctx);
            }
            None => self.finish(head, &gm, None, S_IOERR, 0),
        }
    }

    /// Reap CQEs and synchronous completions, completing their chains.
    fn reap(&mut self) {
        self.cqes.clear();
        self.ring.reap(&mut self.cqes);
        let owner = self.dq.owner();
        for i in 0..self.cqes.len() {
            let c = self.cqes[i];
            if owner_of(c.user_data) == owner {
                self.dq.complete(&mut self.ring, c, &mut self.done);
            }
        }
        let mut done = std::mem::take(&mut self.done);
        for c in done.drain(..) {
            let tag = c.tag as usize;
            let Some(entry) = self.slots.get_mut(tag).and_then(Option::take) else {
                tracing::error!(queue = self.q, tag, "completion for an unknown request");
                continue;
            };
            self.free.push(tag);
            self.in_flight -= 1;
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
            self.finish(entry.head, &entry.mem, Some(entry.status), code, used_len);
        }
        self.done = done;
    }

    /// Write the status byte and put the chain in the used ring (inflight-tracked).
    fn finish(
        &mut self,
        head: u16,
        mem: &Mem,
        status: Option<GuestAddress>,
        code: u8,
        used_len: u32,
    ) {
        let used_len = match status {
            Some(addr) if mem.write_obj(code, addr).is_ok() => used_len,
            _ => 0,
        };
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let gm = a.mem.memory();
        if let Some(inf) = &a.inflight {
            inf.pre_put(head);
        }
        if let Err(e) = a.queue.add_used(&*gm, head, used_len) {
            tracing::warn!(queue = self.q, head, "add_used: {e}");
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
            if let Some(call) = &a.call {
                if let Err(e) = call.write(1) {
                    tracing::warn!(queue = self.q, "signal guest: {e}");
                }
            }
        }
    }
}

/// Pop every available chain of `a` (EVENT_IDX aware), recording each as in flight.
fn pop_all(a: &mut Active, gm: &GuestMemoryLoadGuard<Mem>, out: &mut Vec<(u16, Vec<Seg>)>) {
    let event_idx = a.queue.event_idx_enabled();
    loop {
        if event_idx {
            let _ = a.queue.disable_notification(&**gm);
        }
        while let Some(chain) = a.queue.pop_descriptor_chain(gm.clone()) {
            let head = chain.head_index();
            if let Some(inf) = &a.inflight {
                inf.popped(head, a.counter);
            }
            a.counter += 1;
            out.push((head, request::segments(chain)));
        }
        if !event_idx {
            break;
        }
        match a.queue.enable_notification(&**gm) {
            // More chains arrived while notifications were off.
            Ok(true) => continue,
            _ => break,
        }
    }
}

/// The segments of the chain starting at `head` (split ring, indirect tables allowed),
/// or None if it is malformed. Used only to resubmit chains after a restart.
fn walk_chain(mem: &Mem, desc_table: u64, queue_size: u16, head: u16) -> Option<Vec<Seg>> {
    let mut table = desc_table;
    let mut size = queue_size;
    let mut idx = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut out = Vec::new();
    loop {
        if idx >= size || ttl == 0 {
            return None;
        }
        let at = table.checked_add(u64::from(idx) * 16)?;
        let d: Descriptor = mem.read_obj(GuestAddress(at)).ok()?;
        if d.refers_to_indirect_table() {
            if indirect || !d.len().is_multiple_of(16) || d.len() / 16 > u32::from(u16::MAX) {
                return None;
            }
            table = d.addr().0;
            size = (d.len() / 16) as u16;
            ttl = size;
            idx = 0;
            indirect = true;
            continue;
        }
        out.push(Seg {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        });
        if !d.has_next() {
            return Some(out);
        }
        idx = d.next();
        ttl -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn put(m: &Mem, table: u64, i: u16, d: Descriptor) {
        m.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let m: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let table = 0x1000;
        // Chain 2 → 5 → 7 in the main table.
        put(&m, table, 2, Descriptor::new(0x4000, 16, F_NEXT, 5));
        put(
            &m,
            table,
            5,
            Descriptor::new(0x5000, 512, F_NEXT | F_WRITE, 7),
        );
        put(&m, table, 7, Descriptor::new(0x6000, 1, F_WRITE, 0));
        let segs = walk_chain(&m, table, 8, 2).unwrap();
        assert_eq!(segs.len(), 3);
        assert_eq!(
            segs[1],
            Seg {
                addr: 0x5000,
                len: 512,
                write: true
            }
        );
        // Head 0 points to an indirect table of two entries.
        let ind = 0x2000;
        put(&m, table, 0, Descriptor::new(ind, 32, F_INDIRECT, 0));
        put(&m, ind, 0, Descriptor::new(0x7000, 16, F_NEXT, 1));
        put(&m, ind, 1, Descriptor::new(0x7100, 1, F_WRITE, 0));
        assert_eq!(walk_chain(&m, table, 8, 0).unwrap().len(), 2);
        // A loop is refused, and so is a head beyond the queue.
        put(&m, table, 3, Descriptor::new(0x4000, 16, F_NEXT, 4));
        put(&m, table, 4, Descriptor::new(0x4000, 16, F_NEXT, 3));
        assert!(walk_chain(&m, table, 8, 3).is_none());
        assert!(walk_chain(&m, table, 8, 8).is_none());
        // A descriptor table outside guest memory.
        assert!(walk_chain(&m, 0xffff_0000, 8, 0).is_none());
    }
}
