//! The vhost-user-blk backend: `VhostUserBackend` for any [`BlockDevice`].
//!
//! Threads: the vhost-user-backend crate runs one epoll thread per entry of
//! [`queues_per_thread`](VhostUserBackend::queues_per_thread); we give every virtqueue its
//! own thread. Each thread owns a [`Worker`] (its io_uring [`Ring`], its device
//! [`Queue`], its in-flight table) in a thread-local, so the I/O path takes no shared lock.
//! The ring's fd is registered in the thread's epoll next to the queue's kick eventfd:
//! a kick and a completion both wake the same thread.
//!
//! Per kick: pop every available chain, decode, submit each to the device queue with
//! iovecs into guest memory, one `io_uring_enter`, reap, write statuses, add used entries,
//! signal once (EVENT_IDX aware). Per ring wake-up: reap and complete the same way.

use super::config;
use super::request::{self, Decoded, Mem, S_IOERR, S_OK, S_UNSUPP};
use ember_blockdev::{
    engine::owner_of, BlockDevice, Buffer, Completion, Cqe, IoVecs, Queue, Request, Ring,
};
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest memory as the handler shares it with us.
pub type GuestMem = GuestMemoryAtomic<Mem>;

/// Largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// How long `GET_VRING_BASE` waits for a stopping queue's in-flight requests.
const STOP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of one vhost-user-blk export.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    /// Number of virtqueues (and worker threads).
    pub num_queues: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// GET_ID answer (the volume id).
    pub id: String,
}

/// The backend shared by the vhost-user handler and the worker threads.
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    cfg: BlkConfig,
    features: u64,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    mem: OnceLock<GuestMem>,
    /// Rings created up front (their fds are registered in the epoll threads before any
    /// traffic), taken by each worker thread on its first event.
    rings: Vec<Mutex<Option<Ring>>>,
    /// Requests submitted and not yet completed, per queue (read by `stop_vring`).
    in_flight: Vec<AtomicUsize>,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("dev", &self.dev)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// The epoll event id of a worker's ring (ids ≤ num_queues are the crate's).
pub fn ring_event(num_queues: u16) -> u16 {
    num_queues + 1
}

impl BlkBackend {
    /// A backend for `dev`.
    pub fn new(dev: Arc<dyn BlockDevice>, cfg: BlkConfig) -> io::Result<Self> {
        if cfg.num_queues == 0 || usize::from(cfg.num_queues) > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "num-queues must be between 1 and 64",
            ));
        }
        let info = dev.info();
        let features = config::features(&info, cfg.read_only, cfg.num_queues);
        let mut rings = Vec::new();
        for _ in 0..cfg.num_queues {
            rings.push(Mutex::new(Some(Ring::new(
                ember_blockdev::engine::DEFAULT_RING_ENTRIES,
            )?)));
        }
        Ok(BlkBackend {
            in_flight: (0..cfg.num_queues).map(|_| AtomicUsize::new(0)).collect(),
            dev,
            cfg,
            features,
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            mem: OnceLock::new(),
            rings,
        })
    }

    /// The fd of queue `q`'s ring (before its worker took it), for epoll registration.
    pub fn ring_fd(&self, q: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let slot = self.rings.get(q)?.lock().ok()?;
        slot.as_ref().map(|r| r.as_raw_fd())
    }

    fn ctx(&self) -> request::Ctx {
        request::Ctx {
            info: self.dev.info(),
            read_only: self.cfg.read_only,
            writethrough: !self.writeback.load(Ordering::Relaxed),
            id: config::id_bytes(&self.cfg.id),
        }
    }

    fn make_worker(&self, q: usize) -> io::Result<Worker> {
        let ring = self
            .rings
            .get(q)
            .and_then(|m| m.lock().ok().and_then(|mut s| s.take()))
            .ok_or_else(|| io::Error::other(format!("no ring for queue {q}")))?;
        let mut ring = ring;
        let queue = self
            .dev
            .clone()
            .queue(&mut ring)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Worker {
            q,
            ring,
            queue,
            slots: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// Pop and start every available request; returns how many chains were used
    /// synchronously (bad requests, GET_ID).
    fn pop_and_submit(&self, w: &mut Worker, vring: &VringRwLock<GuestMem>) -> io::Result<usize> {
        let Some(gm) = self.mem.get() else {
            return Ok(0);
        };
        let mem = gm.memory();
        let ctx = self.ctx();
        let mut used_now = 0;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let segs = request::segments(chain);
            match request::decode(&segs, &mem, &ctx) {
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
                        // SAFETY: the iovecs point into the guest memory mapping `mem`,
                        // checked by `decode`. A clone of `mem` (an Arc of the mapping) is
                        // kept in the in-flight slot until the completion is handled, so
                        // the mapping cannot be unmapped under the I/O even if the
                        // frontend replaces the memory table. The driver does not touch
                        // the buffers of a chain until we put it in the used ring.
                        Buffer::Borrowed(unsafe { IoVecs::new(iovs) })
                    };
                    let slot = w.insert(InFlight {
                        head,
                        status,
                        used_len,
                        mem: mem.clone(),
                    });
                    self.in_flight[w.q].fetch_add(1, Ordering::Relaxed);
                    let req = Request {
                        op,
                        offset,
                        len,
                        buf,
                        tag: slot as u64,
                    };
                    w.queue.submit(&mut w.ring, req, &mut w.done);
                }
                Ok(Decoded::Done {
                    status,
                    code,
                    used_len,
                }) => {
                    finish(vring, &mem, head, Some(status), code, used_len);
                    used_now += 1;
                }
                Err(bad) => {
                    tracing::debug!(queue = w.q, head, why = bad.why, "bad virtio-blk request");
                    finish(vring, &mem, head, bad.status, bad.code, 1);
                    used_now += 1;
                }
            }
        }
        Ok(used_now)
    }

    /// Reap CQEs and synchronous completions; returns how many chains were used.
    fn reap(&self, w: &mut Worker, vring: &VringRwLock<GuestMem>) -> usize {
        w.cqes.clear();
        w.ring.reap(&mut w.cqes);
        let owner = w.queue.owner();
        let cqes = std::mem::take(&mut w.cqes);
        for c in &cqes {
            if owner_of(c.user_data) == owner {
                w.queue.complete(&mut w.ring, *c, &mut w.done);
            }
        }
        w.cqes = cqes;
        let mut n = 0;
        let done = std::mem::take(&mut w.done);
        for c in &done {
            if let Some(entry) = w.remove(c.tag as usize) {
                let code = match c.result {
                    Ok(()) => S_OK,
                    Err(e) if e == libc::EOPNOTSUPP => S_UNSUPP,
                    Err(e) => {
                        tracing::warn!(queue = w.q, errno = e, "virtio-blk request failed");
                        S_IOERR
                    }
                };
                let used_len = if code == S_OK { entry.used_len } else { 1 };
                finish(
                    vring,
                    &entry.mem,
                    entry.head,
                    Some(entry.status),
                    code,
                    used_len,
                );
                self.in_flight[w.q].fetch_sub(1, Ordering::Relaxed);
                n += 1;
            }
        }
        w.done = done;
        w.done.clear();
        n
    }

    fn process(&self, w: &mut Worker, vring: &VringRwLock<GuestMem>, kick: bool) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut used = 0;
        if kick {
            loop {
                if event_idx {
                    vring.disable_notification().map_err(io::Error::other)?;
                }
                used += self.pop_and_submit(w, vring)?;
                if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                    break;
                }
            }
        }
        // One io_uring_enter for the whole batch.
        if let Err(e) = w.ring.submit() {
            tracing::warn!(queue = w.q, "io_uring submit: {e}");
        }
        used += self.reap(w, vring);
        if used > 0 && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Write the status byte and put the chain in the used ring.
fn finish(
    vring: &VringRwLock<GuestMem>,
    mem: &Mem,
    head: u16,
    status: Option<GuestAddress>,
    code: u8,
    used_len: u32,
) {
    let used_len = match status {
        Some(addr) if mem.write_obj(code, addr).is_ok() => used_len,
        _ => 0,
    };
    if let Err(e) = vring.add_used(head, used_len) {
        tracing::warn!(head, "add_used: {e}");
    }
}

/// One request between submission and completion.
struct InFlight {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    /// Keeps the guest memory mapping the request's iovecs point into alive.
    mem: GuestMemoryLoadGuard<Mem>,
}

/// A worker thread's private state.
struct Worker {
    q: usize,
    ring: Ring,
    queue: Box<dyn Queue>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    done: Vec<Completion>,
    cqes: Vec<Cqe>,
}

impl Worker {
    fn insert(&mut self, e: InFlight) -> usize {
        if let Some(i) = self.free.pop() {
            self.slots[i] = Some(e);
            i
        } else {
            self.slots.push(Some(e));
            self.slots.len() - 1
        }
    }

    fn remove(&mut self, i: usize) -> Option<InFlight> {
        let e = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(e)
    }
}

thread_local! {
    /// The worker of the current epoll thread (one per virtqueue).
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = config::config_space(
            &self.dev.info(),
            self.cfg.num_queues,
            self.writeback.load(Ordering::Relaxed),
        );
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(space.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(space.len());
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the `writeback` byte is writable (CONFIG_WCE).
        let off = offset as usize;
        if off <= config::WRITEBACK_OFFSET && config::WRITEBACK_OFFSET < off + buf.len() {
            let wb = buf[config::WRITEBACK_OFFSET - off] != 0;
            self.writeback.store(wb, Ordering::Relaxed);
            tracing::info!(writeback = wb, "guest changed the cache mode");
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // The handler always passes the same GuestMemoryAtomic (it swaps the map inside),
        // so keeping the first one is enough.
        let _ = self.mem.set(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE must not report requests we still owe: wait for the worker to
        // complete what it started (it runs on its own thread, woken by its ring).
        let Some(count) = self.in_flight.get(queue_index as usize) else {
            return Ok(());
        };
        let t = Instant::now();
        while count.load(Ordering::Relaxed) > 0 {
            if t.elapsed() > STOP_DRAIN_TIMEOUT {
                tracing::warn!(queue = queue_index, "in-flight requests did not drain");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let kick = device_event == 0;
        if !kick && device_event != ring_event(self.cfg.num_queues) {
            return Ok(());
        }
        WORKER.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(self.make_worker(thread_id)?);
            }
            match slot.as_mut() {
                Some(w) => self.process(w, vring, kick),
                None => Ok(()),
            }
        })
    }
}
