//! Multipath: one LUN reached through several iSCSI portals, used active-active, with
//! ALUA-aware path selection and failover that the client never sees.
//!
//! ## Design
//! ```text
//!   front end ─ Request ─▶ MultipathQueue (one per I/O thread, one ring owner id)
//!                           │ choose a path: usable ALUA class first, then least outstanding
//!                           ▼
//!             IscsiQueue path 0 … IscsiQueue path N-1 (one session each, fail-fast mode)
//! ```
//! - **Paths and identity.** `iscsi://HOST1[:PORT],HOST2[:PORT]/IQN/LUN` names the
//!   portals of one target. [`MultipathDevice::open`] probes every portal (a login,
//!   INQUIRY, VPD 0x80/0x83, READ CAPACITY) and groups them only when the LUN identity
//!   (the logical-unit designators of VPD 0x83 and the serial of VPD 0x80) is the same
//!   through each: a portal that answers with another LUN is an error at open, and a
//!   later login that finds another LUN fails that path only (the session's identity
//!   check). A portal that cannot be reached at open is kept, with the geometry learned
//!   through the others, and comes up when it answers. At least one portal must answer.
//! - **Per thread, per path.** Each I/O thread's [`MultipathQueue`] has one session per
//!   portal. The path queues share the multipath queue's ring owner id, and the
//!   [`Tag`] of each of their SQEs has the path index as its key's slot (the queue's
//!   epoch as its generation), so the front end routes every CQE of the device to this
//!   queue, which hands it to the path the key names. The multipath queue keeps its
//!   requests in a [`Slots`] table; the request it hands a path carries the
//!   [`Tag`] of its slot, so a path's completion finds its request (or, stale, nothing).
//!   No lock on the I/O path.
//! - **Selection.** A path is usable when its session is logged in and its port's ALUA
//!   state allows media access: active/optimized first; active/non-optimized (and
//!   LBA-dependent) only when no optimized path is up; standby, unavailable, offline and
//!   transitioning never. A LUN without ALUA (TPGS 0, as tgtd) has every path optimized.
//!   Within the best class the path with the fewest outstanding requests wins, ties go
//!   round-robin: dm-multipath's `queue-length`, which is what `service-time` reduces to
//!   when the paths are of equal speed.
//! - **ALUA re-evaluation.** Each session reads REPORT TARGET PORT GROUPS at login and
//!   again on the unit attentions ASYMMETRIC ACCESS STATE CHANGED (2A/06), IMPLICIT
//!   TRANSITION FAILED (2A/07) and power-on/reset, and when a command fails NOT READY
//!   04/0A (transitioning), 04/0B (standby) or 04/0C (unavailable); such a command fails
//!   over to another path at once, and a path that fails a request while its session
//!   stays up (that, or a command timeout) is left out of selection for a second.
//! - **Failover.** A path queue completes with [`PATH_FAILED`] (ENOLINK, the kernel's
//!   errno for a transport error) every request it cannot finish: the commands of a
//!   connection that died (reset, EOF, bad PDU, unanswered NOP-Out ping after
//!   `nop_interval + nop_timeout`), a command that timed out (`timeout`, after its ABORT
//!   TASK), a port ALUA makes inaccessible. The multipath queue re-drives the whole
//!   request on another usable path (reads, writes, flushes, UNMAP and WRITE SAME are
//!   idempotent, so a part that reached the LUN through the dead path is harmless), with
//!   the request's own buffer. A reservation conflict (fencing) and medium or
//!   illegal-request errors are the LUN's answer and go to the client.
//! - **No path.** While no path is usable, requests wait in the multipath queue (the
//!   paths keep logging in with back-off); after `replacement_timeout` of waiting (like
//!   dm-multipath's `no_path_retry`) they fail with EIO. A request is also bounded in
//!   total by `request_timeout`. Never an unkillable hang.
//! - **Failback.** A path that logs in again (and reads an ALUA state that allows I/O)
//!   is chosen again by the next request; nothing else is needed.
//!
//! ## What is implemented, and what is not
//! - iSCSI portals only (see below for host block devices).
//! - Path states are logged (per I/O thread: path up, path down, ALUA state, each
//!   re-driven request) and summed over the device's queues in
//!   [`BlockDevice::paths`] ([`PathStatus`]: sessions logged in out of the queues,
//!   ALUA state, requests failed over away from the path), which `emberd serve` passes
//!   through the data-plane boundary to `GET /v3/{project}/volumes/{id}` (`paths`) and
//!   `emberctl volume paths`. No metrics endpoint exists yet to carry them.
//! - LUN pools of `emberd serve` with several `portals` open each LUN through all of
//!   them as one multipath device.
//! - Host block devices (several `/dev/sdX` or loop paths to one LUN) are not grouped by
//!   Ember yet. How an operator declares them is settled by the LUN pool: its `devices`
//!   globs, where device nodes with one identity (VPD 0x83 designators and serial; for
//!   a loop device its backing file, for a device-mapper map its uuid) are listed as one
//!   LUN with several paths; a multipath file device would open them all and fail over
//!   on the transport errors a path gives (ENOLINK, ENXIO, ENODEV, ETIMEDOUT). Until
//!   then such a LUN is opened through its first path that opens, and the kernel's
//!   dm-multipath device (a file path) is the way to use several.
//! - ALUA: implicit only (Ember never sends SET TARGET PORT GROUPS). tgtd (Debian's tgt
//!   1.0.85) reports TPGS 0 and has no REPORT TARGET PORT GROUPS, so the ALUA logic is
//!   tested from bytes, not against a target.
//! - Persistent reservations: every path's sessions register the node's `pr_key` (the
//!   paths share the fenced state); PREEMPT and the rest go through the first path that
//!   answers ([`MultipathDevice::pr_out`]).

use crate::backend::iscsi::queue::{path_of, IscsiQueue};
use crate::backend::iscsi::{IscsiConfig, IscsiDevice, PR_REFUSED};
use crate::backend::scsi::alua::AluaState;
use crate::backend::scsi::pr::{PrKeys, PrOut, PrReservation};
use crate::backend::scsi::LunIdentity;
use crate::buf::Buffer;
use crate::engine::{Cqe, OwnerId, Ring};
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, DeviceInfo, Extent, Op, Request};
use crate::slots::{Key, Slots};
use crate::tag::Tag;
use crate::{BlockDevice, Queue};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The errno a path queue completes a request with when another path should take it
/// (ENOLINK: what the kernel returns for a transport error, BLK_STS_TRANSPORT).
pub const PATH_FAILED: i32 = libc::ENOLINK;
/// Most paths of one LUN.
pub const MAX_PATHS: usize = 32;
/// A path that failed a request while its session stays up (a timed-out command, an
/// ALUA state not read yet) is left out of selection this long.
const SUSPECT: Duration = Duration::from_secs(1);

/// One LUN through several portals of one target.
#[derive(Debug)]
pub struct MultipathDevice {
    paths: Vec<Arc<IscsiDevice>>,
    /// What the queues see of each path, in path order.
    shared: Vec<Arc<PathShared>>,
    /// How long a request waits for a usable path.
    no_path_timeout: Duration,
    /// How long a request may take in all, failovers included.
    request_timeout: Duration,
}

/// A path's state summed over the device's queues (what the API shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStatus {
    /// `host:port` of the portal.
    pub portal: String,
    /// Queues (one per I/O thread) whose session through this path is logged in.
    pub sessions_up: usize,
    /// Queues of the device.
    pub sessions: usize,
    /// ALUA access state last read through it (`None`: no ALUA, or not read yet).
    pub alua: Option<AluaState>,
    /// Requests that failed on this path and were re-driven on another, since open.
    pub failovers: u64,
}

impl PathStatus {
    /// `up` (every session logged in), `degraded` (some), `down` (none), or `idle` (no
    /// I/O thread has a queue of the device: no client uses it now).
    pub fn state(&self) -> &'static str {
        match (self.sessions_up, self.sessions) {
            (_, 0) => "idle",
            (0, _) => "down",
            (u, n) if u >= n => "up",
            _ => "degraded",
        }
    }
}

/// The counters behind a [`PathStatus`], written by the queues on transitions.
#[derive(Debug, Default)]
struct PathShared {
    up: AtomicUsize,
    queues: AtomicUsize,
    /// [`AluaState::bits`], or [`NO_ALUA`].
    alua: AtomicU8,
    failovers: AtomicU64,
}

/// [`PathShared::alua`] when no state was read.
const NO_ALUA: u8 = 0xff;

/// What one path looks like from one I/O thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// `host:port` of the portal.
    pub portal: String,
    /// Logged in.
    pub up: bool,
    /// ALUA access state of its port (`None`: no ALUA).
    pub alua: Option<AluaState>,
}

impl MultipathDevice {
    /// Open the LUN through `cfg.portal` and every portal of `cfg.extra_portals`.
    pub fn open(cfg: IscsiConfig) -> Result<MultipathDevice> {
        let mut portals = vec![cfg.portal.clone()];
        for p in &cfg.extra_portals {
            if !portals.contains(p) {
                portals.push(p.clone());
            }
        }
        if portals.len() > MAX_PATHS {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("{} portals: at most {MAX_PATHS}", portals.len()),
            ));
        }
        let path_cfg = |p: &str| {
            let mut c = cfg.clone();
            c.portal = p.to_string();
            c.extra_portals.clear();
            c
        };
        let mut opened: Vec<Option<IscsiDevice>> = Vec::new();
        let mut errors = Vec::new();
        let pr = Arc::default();
        for p in &portals {
            match IscsiDevice::open_path(path_cfg(p), Arc::clone(&pr)) {
                Ok(d) => opened.push(Some(d)),
                Err(e) => {
                    tracing::warn!(portal = %p, error = %e, "multipath: portal not reachable at open; it joins when it answers");
                    errors.push(format!("{p}: {e}"));
                    opened.push(None);
                }
            }
        }
        let Some(first) = opened.iter().flatten().next() else {
            return Err(Error::new(
                ErrorKind::Io,
                format!("no portal of the LUN answered: {}", errors.join("; ")),
            ));
        };
        let id: Option<LunIdentity> = first.identity();
        for (p, d) in portals.iter().zip(&opened) {
            if let Some(d) = d {
                if d.identity() != id {
                    return Err(Error::new(
                        ErrorKind::InvalidConfig,
                        format!(
                            "portal {p} serves another LUN ({}) than {} ({}); refusing to group them",
                            d.identity().map(|i| i.to_string()).unwrap_or_default(),
                            portals[0],
                            id.as_ref().map(|i| i.to_string()).unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        let mut paths = Vec::with_capacity(portals.len());
        for (p, d) in portals.iter().zip(opened.iter()) {
            let dev = match d {
                Some(_) => None,
                None => Some(IscsiDevice::unprobed(path_cfg(p), first)?),
            };
            paths.push(dev);
        }
        let mut devs = Vec::with_capacity(portals.len());
        for (o, u) in opened.into_iter().zip(paths) {
            if let Some(d) = o.or(u) {
                devs.push(Arc::new(d));
            }
        }
        tracing::info!(
            target_name = %cfg.target,
            lun = cfg.lun,
            portals = %portals.join(","),
            reachable = portals.len() - errors.len(),
            "multipath LUN opened"
        );
        let shared = devs
            .iter()
            .map(|_| {
                Arc::new(PathShared {
                    alua: AtomicU8::new(NO_ALUA),
                    ..PathShared::default()
                })
            })
            .collect();
        Ok(MultipathDevice {
            paths: devs,
            shared,
            no_path_timeout: cfg.replacement_timeout,
            request_timeout: cfg.request_timeout,
        })
    }

    /// The portals, in path order.
    pub fn portals(&self) -> Vec<String> {
        self.paths
            .iter()
            .map(|p| p.config().portal.clone())
            .collect()
    }

    /// The path devices.
    pub fn path_devices(&self) -> &[Arc<IscsiDevice>] {
        &self.paths
    }

    /// PERSISTENT RESERVE OUT through the first path that answers. The LUN's answer
    /// (a conflict, an illegal request) is final; a path that cannot log in is skipped.
    pub fn pr_out(&self, c: PrOut) -> Result<()> {
        self.first_path(|p| p.pr_out(c))
    }

    /// PERSISTENT RESERVE OUT, READ KEYS and READ RESERVATION in one session through
    /// the first path that answers.
    pub fn pr_out_and_read(&self, c: PrOut) -> Result<(PrKeys, Option<PrReservation>)> {
        self.first_path(|p| p.pr_out_and_read(c))
    }

    /// READ KEYS through the first path that answers.
    pub fn pr_read_keys(&self) -> Result<PrKeys> {
        self.first_path(IscsiDevice::pr_read_keys)
    }

    /// READ RESERVATION through the first path that answers.
    pub fn pr_read_reservation(&self) -> Result<Option<PrReservation>> {
        self.first_path(IscsiDevice::pr_read_reservation)
    }

    fn first_path<T>(&self, f: impl Fn(&IscsiDevice) -> Result<T>) -> Result<T> {
        let mut last = None;
        for p in &self.paths {
            match f(p) {
                Ok(v) => return Ok(v),
                // The LUN answered: another path would get the same answer.
                Err(e) if e.to_string().contains(PR_REFUSED) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Io, "no path")))
    }
}

impl BlockDevice for MultipathDevice {
    fn info(&self) -> DeviceInfo {
        // Every path is the same LUN; a capacity change may have been seen through one.
        let mut info = self.paths[0].info();
        info.size = self.paths.iter().map(|p| p.info().size).max().unwrap_or(0);
        info
    }

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        let owner = ring.new_owner();
        let paths = self
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| Path {
                shared: {
                    let s = self.shared.get(i).cloned().unwrap_or_default();
                    s.queues.fetch_add(1, Ordering::Relaxed);
                    s
                },
                portal: p.config().portal.clone(),
                q: p.path_queue(ring, owner, u8::try_from(i).unwrap_or(u8::MAX)),
                up: false,
                alua: None,
                suspect_until: None,
            })
            .collect();
        Ok(Box::new(MultipathQueue {
            owner,
            paths,
            reqs: Slots::new(Key::MAX_SLOTS),
            waiting: VecDeque::new(),
            tmp: Vec::new(),
            rr: 0,
            no_path_timeout: self.no_path_timeout,
            request_timeout: self.request_timeout,
        }))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Extent::all_data(self.info().size, offset, len)
    }

    /// Re-read the capacity through the first path that answers.
    fn resize(&self, new_size: u64) -> Result<()> {
        let mut last = None;
        for p in &self.paths {
            match p.resize(new_size) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NoSpace => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Io, "no path")))
    }

    fn identity(&self) -> Option<LunIdentity> {
        self.paths[0].identity()
    }

    /// A fault only when every path has one (one live path serves the LUN).
    fn fault(&self) -> Option<String> {
        let faults: Vec<String> = self
            .paths
            .iter()
            .map(|p| p.fault().map(|f| format!("{}: {f}", p.config().portal)))
            .collect::<Option<_>>()?;
        Some(format!("every path is faulted: {}", faults.join("; ")))
    }

    /// Healthy when one path checks healthy; otherwise every path's error.
    fn check(&self) -> Result<()> {
        let mut errors = Vec::new();
        for p in &self.paths {
            match p.check() {
                Ok(()) => return Ok(()),
                Err(e) => errors.push(format!("{}: {e}", p.config().portal)),
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("no path of the LUN is healthy: {}", errors.join("; ")),
        ))
    }

    fn paths(&self) -> Vec<PathStatus> {
        self.paths
            .iter()
            .zip(&self.shared)
            .map(|(p, s)| PathStatus {
                portal: p.config().portal.clone(),
                sessions_up: s.up.load(Ordering::Relaxed),
                sessions: s.queues.load(Ordering::Relaxed),
                alua: match s.alua.load(Ordering::Relaxed) {
                    NO_ALUA => None,
                    b => AluaState::from_bits(b),
                },
                failovers: s.failovers.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// A path of one queue.
struct Path {
    /// The device's counters for this path.
    shared: Arc<PathShared>,
    portal: String,
    q: IscsiQueue,
    /// Last seen state, to log transitions.
    up: bool,
    alua: Option<AluaState>,
    /// Not chosen before this time (it failed a request while logged in).
    suspect_until: Option<Instant>,
}

impl Path {
    /// Its I/O priority class (lower first); `None`: not usable now.
    fn class(&self, now: Instant) -> Option<u8> {
        if !self.q.is_ready() || self.suspect_until.is_some_and(|t| t > now) {
            return None;
        }
        match self.q.alua_state() {
            None => Some(0),
            Some(s) => s.io_priority(),
        }
    }
}

/// A request of the multipath queue.
#[derive(Debug)]
struct MpReq {
    tag: u64,
    op: Op,
    offset: u64,
    len: u64,
    started: Instant,
    /// The path it went to last.
    path: Option<usize>,
    /// Failovers so far.
    failovers: u32,
}

/// One thread's view of a [`MultipathDevice`]: a session per path.
pub struct MultipathQueue {
    owner: OwnerId,
    paths: Vec<Path>,
    /// Requests in flight, by the key in their path requests' tags. Bounded like the
    /// iSCSI queue's table; a full table fails a request with EAGAIN.
    reqs: Slots<MpReq>,
    /// Requests with no usable path: key, buffer, since when.
    waiting: VecDeque<(Key, Buffer, Instant)>,
    tmp: Vec<Completion>,
    rr: usize,
    no_path_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for MultipathQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultipathQueue")
            .field("owner", &self.owner)
            .field("paths", &self.paths.len())
            .field("in_flight", &self.reqs.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

/// The path for a request: the best usable class, then the least loaded, ties
/// round-robin from `rr`. `avoid` (the path that just failed it) only when it is the
/// only usable one. `cands[i]`: (class, outstanding requests) of path `i`.
fn choose(cands: &[(Option<u8>, usize)], avoid: Option<usize>, rr: usize) -> Option<usize> {
    let n = cands.len();
    let pick = |skip: Option<usize>| {
        let best = cands
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != skip)
            .filter_map(|(_, c)| c.0)
            .min()?;
        (0..n)
            .map(|k| (rr + k) % n)
            .filter(|&i| Some(i) != skip && cands[i].0 == Some(best))
            .min_by_key(|&i| cands[i].1)
    };
    pick(avoid).or_else(|| pick(None))
}

impl MultipathQueue {
    /// Path states as this queue sees them.
    pub fn path_states(&self) -> Vec<PathState> {
        self.paths
            .iter()
            .map(|p| PathState {
                portal: p.portal.clone(),
                up: p.q.is_ready(),
                alua: p.q.alua_state(),
            })
            .collect()
    }

    fn finish(
        &mut self,
        id: Key,
        result: std::result::Result<(), i32>,
        buf: Buffer,
        done: &mut Vec<Completion>,
    ) {
        if let Some(r) = self.reqs.remove(id) {
            done.push(Completion {
                tag: r.tag,
                result,
                buf,
            });
        }
    }

    /// Send request `id` down a usable path, or make it wait for one.
    fn dispatch(&mut self, ring: &mut Ring, id: Key, buf: Buffer, now: Instant) {
        let Some(r) = self.reqs.get(id) else {
            return;
        };
        let cands: Vec<(Option<u8>, usize)> = self
            .paths
            .iter()
            .map(|p| (p.class(now), p.q.in_flight()))
            .collect();
        let Some(i) = choose(&cands, r.path, self.rr) else {
            self.waiting.push_back((id, buf, now));
            return;
        };
        self.rr = (i + 1) % self.paths.len();
        let req = Request {
            op: r.op,
            offset: r.offset,
            len: r.len,
            buf,
            tag: Tag::of(id).raw(),
        };
        if let Some(r) = self.reqs.get_mut(id) {
            r.path = Some(i);
        }
        let mut tmp = std::mem::take(&mut self.tmp);
        self.paths[i].q.submit(ring, req, &mut tmp);
        self.tmp = tmp;
    }

    /// Completions the paths produced: deliver, or queue for another path.
    fn absorb(&mut self, now: Instant, done: &mut Vec<Completion>) {
        let tmp = std::mem::take(&mut self.tmp);
        for c in tmp {
            let id = Tag::from_raw(c.tag).key();
            let Some(r) = self.reqs.get_mut(id) else {
                continue;
            };
            if c.result == Err(PATH_FAILED) {
                // A path that fails requests while logged in rests a moment, so that a
                // lone path in trouble is not hammered.
                if let Some(p) = r.path.and_then(|p| self.paths.get_mut(p)) {
                    p.shared.failovers.fetch_add(1, Ordering::Relaxed);
                    if p.q.is_ready() {
                        p.suspect_until = Some(now + SUSPECT);
                    }
                }
                if now.duration_since(r.started) < self.request_timeout {
                    r.failovers += 1;
                    if r.failovers == 1 || r.failovers.is_power_of_two() {
                        tracing::info!(
                            portal = %r.path.and_then(|p| self.paths.get(p)).map_or("", |p| p.portal.as_str()),
                            op = ?r.op,
                            offset = r.offset,
                            len = r.len,
                            failovers = r.failovers,
                            "multipath: re-driving a request on another path"
                        );
                    }
                    self.waiting.push_back((id, c.buf, now));
                    continue;
                }
                tracing::error!(op = ?r.op, offset = r.offset, "multipath: request timed out across failovers");
                self.finish(id, Err(libc::EIO), c.buf, done);
                continue;
            }
            self.finish(id, c.result, c.buf, done);
        }
    }

    /// Dispatch what waits, fail what waited too long, log path changes.
    fn pump(&mut self, ring: &mut Ring, now: Instant, done: &mut Vec<Completion>) {
        self.log_transitions();
        for _ in 0..4 {
            if self.waiting.is_empty() {
                break;
            }
            let any = self.paths.iter().any(|p| p.class(now).is_some());
            let n = self.waiting.len();
            for _ in 0..n {
                let Some((id, buf, since)) = self.waiting.pop_front() else {
                    break;
                };
                if any {
                    self.dispatch(ring, id, buf, now);
                } else if now.duration_since(since) > self.no_path_timeout {
                    tracing::error!(
                        paths = self.paths.len(),
                        "multipath: no usable path within the replacement timeout; failing the request"
                    );
                    self.finish(id, Err(libc::EIO), buf, done);
                } else {
                    self.waiting.push_back((id, buf, since));
                }
            }
            // A path that failed synchronously sends its requests back through `tmp`.
            if self.tmp.is_empty() {
                break;
            }
            self.absorb(now, done);
        }
        // Whatever is still in `tmp` goes out (or back to waiting) now, not next call.
        if !self.tmp.is_empty() {
            self.absorb(now, done);
        }
    }

    fn log_transitions(&mut self) {
        for p in &mut self.paths {
            let up = p.q.is_ready();
            let alua = p.q.alua_state();
            if up != p.up {
                if up {
                    p.shared.up.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(portal = %p.portal, alua = ?alua, "multipath: path up");
                } else {
                    p.shared.up.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(portal = %p.portal, "multipath: path down");
                }
                p.up = up;
            }
            if alua != p.alua {
                p.shared
                    .alua
                    .store(alua.map_or(NO_ALUA, AluaState::bits), Ordering::Relaxed);
                if let Some(s) = alua {
                    tracing::info!(portal = %p.portal, state = %s, "multipath: path ALUA state");
                }
                p.alua = alua;
            }
        }
    }
}

impl Drop for MultipathQueue {
    fn drop(&mut self) {
        for p in &self.paths {
            p.shared.queues.fetch_sub(1, Ordering::Relaxed);
            if p.up {
                p.shared.up.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Queue for MultipathQueue {
    fn owner(&self) -> OwnerId {
        self.owner
    }

    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        let now = Instant::now();
        let id = match self.reqs.insert(MpReq {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            started: now,
            path: None,
            failovers: 0,
        }) {
            Ok(id) => id,
            Err(r) => {
                done.push(Completion {
                    tag: r.tag,
                    result: Err(libc::EAGAIN),
                    buf: req.buf,
                });
                return;
            }
        };
        self.dispatch(ring, id, req.buf, now);
        self.absorb(now, done);
        if !self.tmp.is_empty() || !self.waiting.is_empty() {
            self.pump(ring, now, done);
        }
    }

    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>) {
        let i = path_of(cqe.tag());
        let mut tmp = std::mem::take(&mut self.tmp);
        if let Some(p) = self.paths.get_mut(i) {
            p.q.complete(ring, cqe, &mut tmp);
        }
        self.tmp = tmp;
        let now = Instant::now();
        self.absorb(now, done);
        self.pump(ring, now, done);
    }

    fn in_flight(&self) -> usize {
        self.reqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_prefers_the_best_class_then_the_least_loaded() {
        // Optimized paths 1 and 2, non-optimized 0, standby/down 3.
        let c = [(Some(1), 0), (Some(0), 5), (Some(0), 2), (None, 0)];
        assert_eq!(choose(&c, None, 0), Some(2));
        // Equal load: round-robin from `rr`.
        let c = [(Some(0), 1), (Some(0), 1), (Some(1), 0)];
        assert_eq!(choose(&c, None, 0), Some(0));
        assert_eq!(choose(&c, None, 1), Some(1));
        assert_eq!(choose(&c, None, 2), Some(0));
        // Non-optimized only when no optimized path is left.
        let c = [(None, 0), (Some(1), 9), (None, 0)];
        assert_eq!(choose(&c, None, 0), Some(1));
        // The path that just failed a request is avoided while another is usable,
        // even of a worse class; used again when it is the only one.
        let c = [(Some(0), 0), (Some(1), 3)];
        assert_eq!(choose(&c, Some(0), 0), Some(1));
        assert_eq!(choose(&[(Some(0), 0), (None, 0)], Some(0), 0), Some(0));
        // No usable path.
        assert_eq!(choose(&[(None, 0), (None, 0)], None, 0), None);
        assert_eq!(choose(&[], None, 0), None);
    }

    #[test]
    fn path_status_states() {
        let st = |sessions_up, sessions| PathStatus {
            portal: "h:3260".into(),
            sessions_up,
            sessions,
            alua: None,
            failovers: 0,
        };
        assert_eq!(st(2, 2).state(), "up");
        assert_eq!(st(1, 2).state(), "degraded");
        assert_eq!(st(0, 2).state(), "down");
        assert_eq!(st(0, 0).state(), "idle");
    }

    #[test]
    fn alua_classes() {
        use AluaState::*;
        let class = |s: Option<AluaState>| s.map_or(Some(0), AluaState::io_priority);
        assert_eq!(class(None), Some(0));
        assert_eq!(class(Some(ActiveOptimized)), Some(0));
        assert_eq!(class(Some(ActiveNonOptimized)), Some(1));
        assert_eq!(class(Some(Standby)), None);
        assert_eq!(class(Some(Transitioning)), None);
    }
}
