//! The vhost-user message handler of one frontend connection.
//!
//! The `vhost` crate parses messages and calls us (`VhostUserBackendReqHandlerMut`); we
//! keep the negotiated features, the guest memory table, each vring's setup, and the
//! inflight area. A vring starts (is handed to its worker thread) once it has a size,
//! addresses and a kick fd and is enabled; `GET_VRING_BASE` stops it, waiting until the
//! worker has completed everything it started. GET_CONFIG reports the device's current
//! size, so a frontend told of a config change (after a resize) reads the new capacity.
//!
//! We write this handler ourselves (rather than use `vhost-user-backend`'s) because that
//! crate answers `GET_INFLIGHT_FD` with "not supported", and inflight tracking is what
//! lets a guest survive an `emberd` restart.
//!
//! The frontend is not trusted. The `vhost` crate checks message framing (header flags
//! and version, payload sizes against each request, at most 4 KiB of payload, fds only
//! on the requests that take them, at most 32 memory regions, regions whose ranges do
//! not wrap); every error ends the connection (with `REPLY_ACK`, after a nack), so a
//! refused message costs the frontend its session and nothing else. On top of that:
//! - **memory regions** (`SET_MEM_TABLE`, `ADD_MEM_REG`) and the **inflight area**
//!   (`SET_INFLIGHT_FD`): the fd must be a regular file (a memfd, a tmpfs or hugetlbfs
//!   file) that holds `mmap_offset + size` bytes (`fstat`), checked before mapping.
//!   Touching a shared mapping past the end of its file raises SIGBUS, which would end
//!   the whole daemon. Regions may not overlap in guest-physical space; at most
//!   `MAX_MEM_SLOTS`. A frontend that *shrinks* its file after we mapped it can still
//!   fault us: QEMU's `memory-backend-memfd` seals its memfd against shrinking
//!   (`F_SEAL_SHRINK`, on by default); other backings are trusted not to shrink;
//! - **vrings**: the index must exist; `SET_VRING_NUM` a power of two ≤ 1024,
//!   `SET_VRING_BASE` ≤ 65535 (split rings), neither while the ring runs; ring addresses
//!   must lie in a region and the whole ring must fit in guest memory when it starts;
//! - **kick/call/err fds** must be eventfds (`/proc/self/fd` names them
//!   `anon_inode:[eventfd]`); we set `O_NONBLOCK` on them (QEMU's already are) and watch
//!   the kick edge-triggered, so a pipe that stays readable or an eventfd counter the
//!   frontend filled cannot make a queue thread spin or block;
//! - **features**: only bits we offered, virtio and protocol alike;
//! - **waits**: starting or stopping a queue waits at most the worker's reply timeout
//!   (see [`super::worker`]); queues stop in parallel at disconnect.

use super::config;
use super::inflight::InflightArea;
use super::worker::{Cmd, GuestMem, Shared, Start, WorkerHandle};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use vhost::vhost_user::message::VhostUserLog;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

/// Memory slots we accept (`GET_MAX_MEM_SLOTS`).
const MAX_MEM_SLOTS: u64 = 32;
/// Largest virtqueue we accept.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// One guest memory region: where it is for the frontend (user_addr) and the guest (gpa).
struct Region {
    gpa: u64,
    size: u64,
    user_addr: u64,
    mmap: Arc<GuestRegionMmap<()>>,
}

#[derive(Default)]
struct VringSetup {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    running: bool,
}

/// The handler of one connection.
pub struct BlkHandler {
    shared: Arc<Shared>,
    num_queues: u16,
    features: u64,
    acked_features: u64,
    acked_protocol: u64,
    regions: Vec<Region>,
    mem: GuestMem,
    vrings: Vec<VringSetup>,
    workers: Arc<Vec<WorkerHandle>>,
    inflight: Option<Arc<InflightArea>>,
    /// The frontend sent SET_BACKEND_REQ_FD (the connection thread keeps the channel).
    backend_req: bool,
}

fn err(msg: impl Into<String>) -> VuError {
    VuError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, msg.into()))
}

/// Refuse a message: log why (the crate then ends the connection) and return the error.
fn refuse(msg: impl Into<String>) -> VuError {
    let msg = msg.into();
    tracing::warn!("refused vhost-user message: {msg}");
    err(msg)
}

/// Check that `file` holds `len` bytes at `offset` and is a regular file (memfd, tmpfs,
/// hugetlbfs), before it is mapped: a shared mapping beyond the end of its file raises
/// SIGBUS on access.
fn check_backing(file: &File, offset: u64, len: u64, what: &str) -> VuResult<()> {
    let meta = file
        .metadata()
        .map_err(|e| refuse(format!("{what}: fstat: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(refuse(format!(
            "{what}: the fd is not a regular file or memfd"
        )));
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| refuse(format!("{what}: offset + size overflows")))?;
    if end > meta.len() {
        return Err(refuse(format!(
            "{what}: declares {len} bytes at offset {offset} but its file holds {} bytes",
            meta.len()
        )));
    }
    Ok(())
}

/// Check that `file` (a kick, call or error fd) is an eventfd and make it non-blocking.
/// `O_NONBLOCK` lives on the open file description the frontend shares with us; QEMU's
/// eventfds already have it.
fn checked_eventfd(file: File, what: &str) -> VuResult<File> {
    let fd = file.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| refuse(format!("{what} fd: cannot tell its type: {e}")))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(refuse(format!(
            "{what} fd is not an eventfd ({})",
            link.display()
        )));
    }
    if let Err(e) = ember_blockdev::sys::set_nonblocking(file.as_fd()) {
        return Err(refuse(format!(
            "{what} fd: cannot make it non-blocking: {e}"
        )));
    }
    Ok(file)
}

impl BlkHandler {
    /// A handler for a new connection; `workers` run the queues (one per queue).
    pub fn new(shared: Arc<Shared>, workers: Arc<Vec<WorkerHandle>>) -> Self {
        let num_queues = workers.len() as u16;
        let info = shared.dev.info();
        let features = config::features(&info, shared.read_only, num_queues);
        BlkHandler {
            shared,
            num_queues,
            features,
            acked_features: 0,
            acked_protocol: 0,
            regions: Vec::new(),
            mem: GuestMem::new(GuestMemoryMmap::new()),
            vrings: (0..num_queues).map(|_| VringSetup::default()).collect(),
            workers,
            inflight: None,
            backend_req: false,
        }
    }

    /// Stop every running queue (the frontend went away), in parallel, each wait bounded.
    pub fn disconnect(&mut self) {
        let all: Vec<usize> = (0..self.vrings.len()).collect();
        for (i, r) in self.stop_vrings(&all) {
            if let Err(e) = r {
                tracing::error!(queue = i, "stopping the queue at disconnect: {e}");
            }
        }
    }

    /// The frontend has set up its backend channel (`SET_BACKEND_REQ_FD`).
    pub fn backend_req_set(&self) -> bool {
        self.backend_req
    }

    /// REPLY_ACK was negotiated (backend-channel messages then want an ack).
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut VringSetup> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    /// SET_VRING_CALL and SET_VRING_ERR: check that `fd` (`what`) is an eventfd, hand a
    /// duplicate to the queue's worker if it runs (`cmd`), and keep it in `slot` for the
    /// queue's next start.
    fn set_notifier(
        &mut self,
        index: u8,
        fd: Option<File>,
        what: &str,
        cmd: fn(Option<EventFd>) -> Cmd,
        slot: fn(&mut VringSetup) -> &mut Option<File>,
    ) -> VuResult<()> {
        let i = usize::from(index);
        let running = self.vring(u32::from(index))?.running;
        let fd = fd.map(|f| checked_eventfd(f, what)).transpose()?;
        if running {
            let dup = dup_eventfd(fd.as_ref())?;
            self.workers[i]
                .send(cmd(dup))
                .map_err(VuError::ReqHandlerError)?;
        }
        *slot(&mut self.vrings[i]) = fd;
        Ok(())
    }

    /// Frontend virtual address → guest physical address.
    fn vmm_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
            .ok_or_else(|| err("vring address outside every memory region"))
    }

    fn rebuild_mem(&mut self) -> VuResult<()> {
        // The collection wants regions sorted by address (and refuses overlaps).
        self.regions.sort_by_key(|r| r.gpa);
        let regions: Vec<_> = self.regions.iter().map(|r| r.mmap.clone()).collect();
        let map = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions)
                .map_err(|e| VuError::ReqHandlerError(io::Error::other(e.to_string())))?
        };
        self.mem
            .lock()
            .map_err(|_| err("memory lock poisoned"))?
            .replace(map);
        Ok(())
    }

    fn map_region(region: &VhostUserMemoryRegion, file: File) -> VuResult<Region> {
        if region.memory_size == 0 {
            return Err(refuse("empty memory region"));
        }
        region
            .guest_phys_addr
            .checked_add(region.memory_size)
            .ok_or_else(|| refuse("memory region wraps around"))?;
        usize::try_from(region.memory_size).map_err(|_| refuse("memory region too large"))?;
        let gpa = region.guest_phys_addr;
        check_backing(
            &file,
            region.mmap_offset,
            region.memory_size,
            &format!("memory region at guest address {gpa:#x}"),
        )?;
        let mmap = region.mmap_region::<()>(file)?;
        let mmap = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
            .ok_or_else(|| err("memory region does not fit the guest address space"))?;
        Ok(Region {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            user_addr: region.user_addr,
            mmap: Arc::new(mmap),
        })
    }

    /// Hand vring `i` to its worker if it is complete and enabled.
    fn maybe_start(&mut self, i: usize) -> VuResult<()> {
        let v = &self.vrings[i];
        if v.running || !v.enabled || !v.addr_set || v.kick.is_none() || v.size == 0 {
            return Ok(());
        }
        let mut queue = Queue::new(MAX_QUEUE_SIZE).map_err(|_| err("virtqueue"))?;
        queue.set_size(v.size);
        queue
            .try_set_desc_table_address(GuestAddress(v.desc))
            .map_err(|_| refuse("bad descriptor table address"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(v.avail))
            .map_err(|_| refuse("bad avail ring address"))?;
        queue
            .try_set_used_ring_address(GuestAddress(v.used))
            .map_err(|_| refuse("bad used ring address"))?;
        queue.set_next_avail(v.base);
        queue.set_next_used(v.base);
        queue.set_event_idx(
            self.acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0,
        );
        let indirect = self.acked_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC)
            != 0;
        queue.set_ready(true);
        if !queue.is_valid(&*self.mem.memory()) {
            return Err(refuse("vring does not fit in guest memory"));
        }
        let kick = dup_eventfd(v.kick.as_ref())?.ok_or_else(|| err("no kick fd"))?;
        let call = dup_eventfd(v.call.as_ref())?;
        let errfd = dup_eventfd(v.err.as_ref())?;
        let inflight = match &self.inflight {
            Some(area) => area.queue(i as u16),
            None => None,
        };
        let start = Start {
            queue,
            indirect,
            kick,
            call,
            err: errfd,
            mem: self.mem.clone(),
            inflight,
        };
        if let Err(e) = self.workers[i].start(start) {
            if e.kind() == io::ErrorKind::TimedOut {
                // The worker may still take the queue later: make it stop again then
                // (best effort, nobody waits for the answer).
                let _ = self.workers[i].begin_stop();
            }
            return Err(VuError::ReqHandlerError(e));
        }
        self.vrings[i].running = true;
        Ok(())
    }

    /// Stop vring `i` (draining, bounded); returns its next avail index.
    fn stop_vring(&mut self, i: usize) -> io::Result<u16> {
        self.stop_vrings(&[i])
            .pop()
            .map_or(Ok(self.vrings[i].base), |(_, r)| r)
    }

    /// Stop the running vrings among `which` in parallel: every worker is asked first,
    /// then the answers are collected against one deadline (the reply timeout). A
    /// vring whose stop failed is no longer running for us; its base is left as it was.
    fn stop_vrings(&mut self, which: &[usize]) -> Vec<(usize, io::Result<u16>)> {
        let mut waits = Vec::new();
        let mut out = Vec::new();
        for &i in which {
            let v = &mut self.vrings[i];
            if !v.running {
                continue;
            }
            v.running = false;
            match self.workers[i].begin_stop() {
                Ok(w) => waits.push((i, w)),
                Err(e) => out.push((i, Err(e))),
            }
        }
        let deadline = Instant::now()
            + self
                .workers
                .first()
                .map_or(std::time::Duration::ZERO, |w| w.reply_timeout());
        for (i, w) in waits {
            let r = w.wait(deadline);
            if let Ok(next) = r {
                self.vrings[i].base = next;
            }
            out.push((i, r));
        }
        out
    }
}

/// An EventFd owning a duplicate of `f`.
fn dup_eventfd(f: Option<&File>) -> VuResult<Option<EventFd>> {
    let Some(f) = f else { return Ok(None) };
    let dup = f.try_clone().map_err(VuError::ReqHandlerError)?;
    // SAFETY: `dup` is a fresh descriptor we own; EventFd takes sole ownership of it.
    Ok(Some(unsafe { EventFd::from_raw_fd(dup.into_raw_fd()) }))
}

fn unsupported(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnect();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.disconnect();
        for v in &mut self.vrings {
            *v = VringSetup::default();
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.features != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        let enabled = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for v in &mut self.vrings {
            if !v.running {
                v.enabled = enabled;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(unsupported("postcopy"));
        }
        if ctx.len() != files.len() {
            return Err(VuError::IncorrectFds);
        }
        let mut regions = Vec::new();
        for (r, f) in ctx.iter().zip(files) {
            regions.push(Self::map_region(r, f)?);
        }
        let old = std::mem::replace(&mut self.regions, regions);
        if let Err(e) = self.rebuild_mem() {
            tracing::warn!("refused vhost-user message: memory table: {e}");
            self.regions = old;
            return Err(e);
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(refuse(format!(
                "vring size {num} (a power of two up to {MAX_QUEUE_SIZE})"
            )));
        }
        let v = self.vring(index)?;
        if v.running {
            return Err(refuse(format!("SET_VRING_NUM on running vring {index}")));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.vmm_to_gpa(descriptor)?;
        let used = self.vmm_to_gpa(used)?;
        let avail = self.vmm_to_gpa(available)?;
        let v = self.vring(index)?;
        v.desc = desc;
        v.used = used;
        v.avail = avail;
        v.addr_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        // Split rings: the next avail index is 16 bits (packed rings are not offered).
        let base = u16::try_from(base)
            .map_err(|_| refuse(format!("vring base {base} of a split ring (at most 65535)")))?;
        let v = self.vring(index)?;
        if v.running {
            return Err(refuse(format!("SET_VRING_BASE on running vring {index}")));
        }
        v.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let stopped = self.stop_vring(index as usize);
        let v = self.vring(index)?;
        v.kick = None;
        v.call = None;
        v.err = None;
        match stopped {
            Ok(next) => Ok(VhostUserVringState::new(index, u32::from(next))),
            Err(e) => {
                tracing::error!(queue = index, "GET_VRING_BASE: {e}");
                Err(VuError::ReqHandlerError(e))
            }
        }
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = u32::from(index);
        self.vring(i)?;
        let fd = fd.map(|f| checked_eventfd(f, "kick")).transpose()?;
        self.vring(i)?.kick = fd;
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.set_notifier(index, fd, "call", Cmd::SetCall, |v| &mut v.call)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.set_notifier(index, fd, "error", Cmd::SetErr, |v| &mut v.err)
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        // The crate always offers REPLY_ACK (it implements it).
        let offered =
            self.get_protocol_features()?.bits() | VhostUserProtocolFeatures::REPLY_ACK.bits();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "protocol features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let v = self.vring(index)?;
        v.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop_vring(index as usize)
                .map(|_| ())
                .map_err(VuError::ReqHandlerError)
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let space = config::config_space(
            &self.shared.dev.info(),
            self.num_queues,
            self.shared.writeback.load(Ordering::Relaxed),
        );
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(VuError::InvalidParam)?;
        let mut out = vec![0u8; size as usize];
        if start < space.len() {
            let n = end.min(space.len()) - start;
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        Ok(out)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only the `writeback` byte is writable (CONFIG_WCE).
        let off = offset as usize;
        let wb_at = config::WRITEBACK_OFFSET;
        if off <= wb_at && wb_at < off + buf.len() {
            let wb = buf[wb_at - off] != 0;
            self.shared.writeback.store(wb, Ordering::Relaxed);
            tracing::info!(writeback = wb, "guest changed the cache mode");
            Ok(())
        } else {
            Err(VuError::InvalidParam)
        }
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // The crate's `Backend` proxy cannot send CONFIG_CHANGE_MSG; the connection
        // thread peeked this message and keeps its own duplicate of the channel (see
        // `backend_chan`). We only note that the channel exists.
        self.backend_req = true;
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(unsupported("gpu socket"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(unsupported("shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let nq = inflight.num_queues;
        let qs = inflight.queue_size;
        if nq == 0 || nq > self.num_queues || qs == 0 || qs > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let area = InflightArea::create(nq, qs).map_err(VuError::ReqHandlerError)?;
        let file = area.file().try_clone().map_err(VuError::ReqHandlerError)?;
        let reply = VhostUserInflight::new(area.len() as u64, 0, nq, qs);
        tracing::debug!(queues = nq, queue_size = qs, "created inflight area");
        self.inflight = Some(Arc::new(area));
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let nq = inflight.num_queues;
        let qs = inflight.queue_size;
        if nq == 0 || nq > self.num_queues || qs == 0 || qs > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let len = usize::try_from(inflight.mmap_size).unwrap_or(usize::MAX);
        let area = InflightArea::map(file, inflight.mmap_offset, len, nq, qs).map_err(|e| {
            tracing::warn!("refused vhost-user message: SET_INFLIGHT_FD: {e}");
            VuError::ReqHandlerError(e)
        })?;
        tracing::debug!(
            queues = nq,
            queue_size = qs,
            "frontend set the inflight area"
        );
        self.inflight = Some(Arc::new(area));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(unsupported("postcopy"));
        }
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refuse("too many memory regions"));
        }
        let r = Self::map_region(region, fd)?;
        let gpa = r.gpa;
        self.regions.push(r);
        if let Err(e) = self.rebuild_mem() {
            tracing::warn!(gpa, "refused memory region: {e}");
            self.regions.retain(|r| r.gpa != gpa);
            let _ = self.rebuild_mem();
            return Err(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let before = self.regions.len();
        self.regions
            .retain(|r| !(r.gpa == region.guest_phys_addr && r.size == region.memory_size));
        if self.regions.len() == before {
            return Err(VuError::InvalidParam);
        }
        self.rebuild_mem()
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(unsupported("device state transfer"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(unsupported("device state transfer"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(unsupported("dirty page logging"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(unsupported("shared memory regions"))
    }
}
