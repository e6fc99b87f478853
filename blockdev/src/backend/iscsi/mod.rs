//! The iSCSI backend: Ember's own userspace initiator (RFC 7143), a LUN of an array as a
//! [`BlockDevice`], its sockets on the same io_uring as the front end and the disks.
//!
//! ## Design
//! ```text
//!   front end ─ Request ─▶ IscsiQueue (one per I/O thread: one session, one TCP connection)
//!                           │ block op → SCSI command (READ/WRITE(16), SYNCHRONIZE CACHE(16),
//!                           │   UNMAP, WRITE SAME(16)), retry policy on the sense data
//!                           ▼
//!                          Session (pure: ITTs, CmdSN window, R2T/Data-Out, Data-In,
//!                           │   NOP-Out pings, ABORT TASK / LUN RESET on timeouts)
//!                           ▼
//!                          pdu (pure codec: BHS ⇄ typed PDU, framing, CRC32C digests)
//!                           ▼
//!                          socket: POLL_ADD / NOP / TIMEOUT SQEs on the thread's ring,
//!                                  non-blocking recv and vectored sendmsg
//! ```
//! - [`pdu`], [`text`], [`chap`], [`login`] and [`session`] do no I/O and are tested from
//!   bytes (captured tgtd sessions in `testdata/`); [`queue`] is the only part that
//!   touches a socket or the ring.
//! - Each I/O thread's queue logs in its own session (own ISID), so the I/O path takes
//!   no lock and a request goes front end → PDU → socket without a thread hop. A write is
//!   sent straight from the request's buffer (vectored send); Data-In is copied into it.
//! - [`IscsiDevice::open`] logs in once to learn the LUN (REPORT LUNS, INQUIRY standard
//!   and VPD 0x00/0x80/0x83/0xB0/0xB2, READ CAPACITY(16)), records its identity and
//!   limits, and fails with a clear error when the target refuses the login, CHAP fails,
//!   the LUN does not exist or is not a disk. Every later login (each queue's, and every
//!   re-login) checks VPD 0x80/0x83 against that identity and refuses a different LUN.
//! - Faults: a connection that fails (reset, EOF, a PDU with a bad opcode, length or
//!   digest, an unanswered NOP-Out ping, a command timeout whose ABORT TASK and LUN RESET
//!   both go unanswered) is closed; its unfinished commands are held and replayed on a
//!   new session (login retried with back-off). After `replacement_timeout` without a
//!   session, held requests fail with `EIO` (logins go on in the background). Unit
//!   attentions are retried (capacity changed 0x2a09, reported LUNs changed 0x3f0e and
//!   power-on/reset 0x29xx trigger a READ CAPACITY(16) and a resize); BUSY, TASK SET FULL
//!   and NOT READY are retried with back-off; all within `request_timeout`.
//! - Fault state for the data plane ([`BlockDevice::fault`]): the queues record, in
//!   [`Inner`], the faults an operator must see — the LUN gone (LOGICAL UNIT NOT
//!   SUPPORTED on a live session, or missing from REPORT LUNS at a login), another
//!   identity, a refused login, no session within `replacement_timeout` — and clear it
//!   when a session is ready again or a command succeeds. [`BlockDevice::check`] is
//!   the periodic health check of an idle volume: one short login (REPORT LUNS, VPD
//!   0x80/0x83 checked, READ CAPACITY(16)), a fault when the target answers that the
//!   LUN cannot be used; a portal that does not answer is left to the sessions'
//!   replacement timeout. So a LUN deleted on the array shows without any I/O, and
//!   clears by itself (no re-attach) once the array brings the same LUN back.
//!
//! ## What is implemented, and what is not
//! - Error recovery level 0 only: the session is the unit of recovery (no SNACK, no
//!   connection-level recovery within a session), which is what Linux's open-iscsi and
//!   libiscsi do too. One connection per session (MaxConnections=1).
//! - Header and data digests: CRC32C (SSE4.2) or None, as offered with
//!   `header_digest=`/`data_digest=`. ImmediateData and InitialR2T=No are offered;
//!   the target's answer decides. MaxOutstandingR2T=1, in-order data only.
//! - CHAP one-way and mutual, MD5 (default), SHA-1 and SHA-256 by configuration. No
//!   SRP/Kerberos. Login redirection (status class 1) is reported, not followed.
//! - No discovery sessions (SendTargets), no iSER, no AHS (bidirectional/extended CDBs).
//! - Several portals of one target (`iscsi://HOST1,HOST2/…`) make a multipath device
//!   ([`crate::backend::multipath`]): one session per portal per I/O thread, ALUA-aware
//!   selection, failover without an error to the client.
//! - Persistent reservations ([`crate::backend::scsi::pr`]), for fencing: with
//!   `pr_key=KEY` every session (each I/O thread's, each path's) registers the node's key
//!   at set-up (REGISTER AND IGNORE EXISTING KEY), after the identity check, so that every
//!   I_T nexus of the node may write under a Write Exclusive – Registrants Only
//!   reservation. [`IscsiDevice::pr_out`] and the READ KEYS / READ RESERVATION calls run
//!   on an administrative session with one fixed ISID per device. A node whose key was
//!   preempted (unit attention REGISTRATIONS PREEMPTED 2A/05, a RESERVATION CONFLICT
//!   after it registered — tgtd 1.0.85 raises no such attention —, or its key missing
//!   from READ KEYS when a session logs in again) is fenced: it never registers again on its
//!   own, and its writes fail with EBADE (RESERVATION CONFLICT), never retried on another
//!   path. There is a window between that READ KEYS and the REGISTER in which a
//!   preemption is undone by the re-registration; the cluster's lease (the node stops
//!   writing when its lease ends) closes it, not SCSI.
//! - Why not libiscsi: there is no Rust initiator worth building on (the one crate is
//!   AGPL and Tokio-bound); Debian 12's libiscsi 1.19 reconnects only to its first
//!   portal and needs its own event loop per context, so requests would hop threads.

pub mod chap;
pub mod crc32c;
pub mod login;
pub mod pdu;
pub mod queue;
pub mod session;
pub mod text;

use crate::backend::scsi::pr::{self, PrIn, PrKeys, PrOut, PrReservation};
use crate::backend::scsi::{BlockLimits, Capacity, LunIdentity, Provisioning, StdInquiry};
use crate::engine::Ring;
use crate::error::{Error, ErrorKind, Result};
use crate::request::{DeviceInfo, Extent};
use crate::{BlockDevice, Queue};
use chap::{ChapAlg, ChapCredentials};
use queue::{AdminCmd, IscsiQueue, Mode};
use session::Timeouts;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use text::{Negotiated, Offer};

/// In the error of a persistent-reservation command the LUN answered (not a path
/// failure): another path would get the same answer.
pub(crate) const PR_REFUSED: &str = "refused by the LUN";

/// The default iSCSI port.
pub const DEFAULT_PORT: u16 = 3260;
/// Largest read or write sent as one command.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;
/// Default time for a connection and login.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Default time held requests wait for a new session (open-iscsi's `replacement_timeout`).
pub const DEFAULT_REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time a request may spend in retries.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Where and how to reach a LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiConfig {
    /// `host:port` of the portal.
    pub portal: String,
    /// Further portals of the same target, for multipath (`iscsi://HOST1,HOST2/…`).
    pub extra_portals: Vec<String>,
    /// Target IQN.
    pub target: String,
    /// LUN number.
    pub lun: u16,
    /// InitiatorName Ember logs in with.
    pub initiator_name: String,
    /// CHAP credentials (from a file or the key manager; never from the URI).
    pub chap: Option<ChapCredentials>,
    /// The CHAP user named in the URI, if any (must match the credentials).
    pub uri_user: Option<String>,
    /// Offer CRC32C header digests.
    pub header_digest: bool,
    /// Offer CRC32C data digests.
    pub data_digest: bool,
    /// Session timers.
    pub timeouts: Timeouts,
    /// Connection and login time limit.
    pub login_timeout: Duration,
    /// How long held requests wait for a new session.
    pub replacement_timeout: Duration,
    /// How long a request may be retried.
    pub request_timeout: Duration,
    /// Refuse writes.
    pub read_only: bool,
    /// This node's persistent-reservation key: every session registers it (non-zero).
    pub pr_key: Option<u64>,
}

impl PartialEq for ChapCredentials {
    fn eq(&self, o: &Self) -> bool {
        self.user == o.user
            && self.secret == o.secret
            && self.target == o.target
            && self.algorithms == o.algorithms
    }
}
impl Eq for ChapCredentials {}

/// The InitiatorName used when none is configured: `iqn.2026-01.org.ember:<hostname>`.
pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    let host = if host.is_empty() {
        "localhost".into()
    } else {
        host
    };
    format!("iqn.2026-01.org.ember:{host}")
}

fn secs(k: &str, v: &str) -> Result<Duration> {
    let s: f64 = v.parse().map_err(|_| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("{k}={v}: expected seconds"),
        )
    })?;
    if !(0.05..=86_400.0).contains(&s) {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("{k}={v}: out of range"),
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

impl IscsiConfig {
    /// Parse `iscsi://[user@]host[:port][,host2[:port]…]/target-iqn/lun[?params]`
    /// (several portals: one LUN through several paths, see
    /// [`crate::backend::multipath`]). Parameters:
    /// `header_digest`/`data_digest` (`crc32c` or `none`), `initiator` (IQN), `ro`,
    /// and timers in seconds: `login_timeout`, `replacement_timeout`,
    /// `request_timeout`, `timeout` (per command), `nop_interval`, `nop_timeout`;
    /// `pr_key` (hex, `0x` optional, non-zero): the node's persistent-reservation key.
    /// A password in the URI (`user%password@`) is refused: CHAP secrets come from a
    /// credentials file or the key manager.
    pub fn parse_uri(uri: &str) -> Result<IscsiConfig> {
        let bad = |m: String| Error::new(ErrorKind::InvalidConfig, m);
        let rest = uri
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad(format!("{uri:?} is not an iscsi:// URI")))?;
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (auth, hostpath) = match main.split_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, main),
        };
        if auth.is_some_and(|a| a.contains('%')) {
            return Err(bad(
                "a CHAP secret must not be in the URI (it would be visible in argv and logs); \
                 give it in a credentials file"
                    .into(),
            ));
        }
        let mut parts = hostpath.splitn(3, '/');
        let portal = parts.next().unwrap_or_default();
        let target = parts.next().unwrap_or_default();
        let lun = parts.next().unwrap_or_default();
        if portal.is_empty() || target.is_empty() || lun.is_empty() {
            return Err(bad(format!(
                "{uri:?}: expected iscsi://host[:port]/target-iqn/lun"
            )));
        }
        let lun: u16 = lun
            .parse()
            .ok()
            .filter(|l| *l < 16384)
            .ok_or_else(|| bad(format!("LUN {lun:?} is not a number below 16384")))?;
        let with_port = |portal: &str| {
            if portal.starts_with('[') {
                if portal.contains("]:") {
                    portal.to_string()
                } else {
                    format!("{portal}:{DEFAULT_PORT}")
                }
            } else if portal.contains(':') {
                portal.to_string()
            } else {
                format!("{portal}:{DEFAULT_PORT}")
            }
        };
        let mut portals = Vec::new();
        for p in portal.split(',') {
            if p.is_empty() {
                return Err(bad(format!("{uri:?}: an empty portal in the list")));
            }
            let p = with_port(p);
            if !portals.contains(&p) {
                portals.push(p);
            }
        }
        let portal = portals.remove(0);
        let mut c = IscsiConfig {
            portal,
            extra_portals: portals,
            target: target.to_string(),
            lun,
            initiator_name: default_initiator_name(),
            chap: None,
            uri_user: auth.filter(|a| !a.is_empty()).map(str::to_string),
            header_digest: false,
            data_digest: false,
            timeouts: Timeouts::default(),
            login_timeout: DEFAULT_LOGIN_TIMEOUT,
            replacement_timeout: DEFAULT_REPLACEMENT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            read_only: false,
            pr_key: None,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let digest = |v: &str| match v.to_ascii_lowercase().as_str() {
                "crc32c" => Ok(true),
                "none" => Ok(false),
                _ => Err(bad(format!("{k}={v}: expected crc32c or none"))),
            };
            match k {
                "header_digest" => c.header_digest = digest(v)?,
                "data_digest" => c.data_digest = digest(v)?,
                "initiator" if v.starts_with("iqn.") || v.starts_with("eui.") => {
                    c.initiator_name = v.to_string();
                }
                "ro" => c.read_only = matches!(v, "1" | "true" | "on" | ""),
                "login_timeout" => c.login_timeout = secs(k, v)?,
                "replacement_timeout" => c.replacement_timeout = secs(k, v)?,
                "request_timeout" => c.request_timeout = secs(k, v)?,
                "timeout" => c.timeouts.cmd_timeout = secs(k, v)?,
                "nop_interval" => c.timeouts.nop_interval = secs(k, v)?,
                "nop_timeout" => c.timeouts.nop_timeout = secs(k, v)?,
                "pr_key" => {
                    let hex = v.strip_prefix("0x").unwrap_or(v);
                    c.pr_key = Some(
                        u64::from_str_radix(hex, 16)
                            .ok()
                            .filter(|k| *k != 0)
                            .ok_or_else(|| {
                                bad(format!("pr_key={v}: expected a non-zero hex key"))
                            })?,
                    );
                }
                _ => return Err(bad(format!("unknown parameter {k:?} for iscsi://"))),
            }
        }
        Ok(c)
    }

    /// The operational offer this configuration makes.
    pub fn offer(&self) -> Offer {
        Offer {
            header_digest: self.header_digest,
            data_digest: self.data_digest,
            ..Offer::default()
        }
    }
}

/// What Ember learned about a LUN.
#[derive(Debug, Clone, Default)]
pub struct LunInfo {
    /// Standard INQUIRY data.
    pub inquiry: Option<StdInquiry>,
    /// Identity (VPD 0x83 designators, VPD 0x80 serial).
    pub identity: LunIdentity,
    /// READ CAPACITY(16).
    pub capacity: Option<Capacity>,
    /// Block limits (VPD 0xB0).
    pub limits: BlockLimits,
    /// Logical block provisioning (VPD 0xB2).
    pub provisioning: Provisioning,
    /// CHAP algorithm used at open.
    pub chap: Option<ChapAlg>,
    /// Parameters negotiated at open.
    pub params: Option<Negotiated>,
    /// The TPGS field of standard INQUIRY (0: no ALUA).
    pub tpgs: u8,
    /// The target's LUNs (REPORT LUNS), when [`report_luns`] asked for them.
    pub luns: Option<Vec<u16>>,
}

/// Limits derived once from [`LunInfo`], read on the I/O path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) lbs: u32,
    pub(crate) pbs: u32,
    pub(crate) max_transfer: u32,
    pub(crate) max_unmap_blocks: u32,
    pub(crate) max_unmap_descriptors: u32,
    pub(crate) max_write_same_blocks: u64,
    pub(crate) write_same_unmap: bool,
    pub(crate) unmap: bool,
}

impl Geometry {
    fn from_info(i: &LunInfo) -> Geometry {
        let (lbs, pbs) = i
            .capacity
            .map_or((512, 512), |c| (c.block_len, c.physical_block_len()));
        let l = i.limits;
        let max_transfer = match u64::from(l.max_transfer) * u64::from(lbs) {
            0 => MAX_TRANSFER_BYTES,
            n => u32::try_from(n).unwrap_or(u32::MAX).min(MAX_TRANSFER_BYTES),
        };
        let max_transfer = max_transfer.max(lbs);
        Geometry {
            lbs,
            pbs,
            max_transfer,
            max_unmap_blocks: if l.max_unmap_lba == 0 {
                (1 << 30) / lbs
            } else {
                l.max_unmap_lba
            },
            max_unmap_descriptors: l.max_unmap_descriptors.clamp(1, 64),
            max_write_same_blocks: if l.max_write_same == 0 {
                u64::from((32 << 20) / lbs)
            } else {
                l.max_write_same.min(u64::from(u32::MAX))
            },
            write_same_unmap: i.provisioning.write_same_unmap,
            unmap: i.provisioning.unmap,
        }
    }
}

/// Persistent-reservation state of a node's sessions to one LUN (shared by its paths).
#[derive(Debug, Default)]
pub(crate) struct PrState {
    /// A session has registered the key.
    pub(crate) registered: AtomicBool,
    /// The key was preempted: never register it again.
    pub(crate) fenced: AtomicBool,
    /// A RESERVATION CONFLICT was logged (once per device).
    pub(crate) conflict_logged: AtomicBool,
}

/// State shared by the device and its queues.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: IscsiConfig,
    pub(crate) portal: SocketAddr,
    pub(crate) size: AtomicU64,
    pub(crate) info: Mutex<LunInfo>,
    geometry: OnceLock<Geometry>,
    pub(crate) no_write_same: AtomicBool,
    pub(crate) no_unmap: AtomicBool,
    /// The fault that holds now (see the module doc); `faulted` mirrors `is_some()`
    /// so the I/O path checks it without the lock.
    fault: Mutex<Option<String>>,
    faulted: AtomicBool,
    /// Since when the health check's logins fail to connect (see [`BlockDevice::check`]).
    unreachable_since: Mutex<Option<Instant>>,
    isid_base: [u8; 3],
    next_qualifier: AtomicU16,
    pub(crate) pr: Arc<PrState>,
}

impl Inner {
    /// A fresh ISID: random type (RFC 7143 §11.12.5), a random 24-bit value per device
    /// and a qualifier per queue.
    pub(crate) fn next_isid(&self) -> [u8; 6] {
        let q = self
            .next_qualifier
            .fetch_add(1, Ordering::Relaxed)
            .to_be_bytes();
        let b = self.isid_base;
        [0x80, b[0], b[1], b[2], q[0], q[1]]
    }

    /// The ISID of the device's administrative session (qualifier 0, never a queue's).
    pub(crate) fn admin_isid(&self) -> [u8; 6] {
        let b = self.isid_base;
        [0x80, b[0], b[1], b[2], 0, 0]
    }

    /// Record a fault an operator must see (a serving session's view of the LUN).
    pub(crate) fn set_fault(&self, reason: &str) {
        let mut f = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        if f.as_deref() != Some(reason) {
            *f = Some(reason.to_string());
        }
        self.faulted.store(true, Ordering::Release);
    }

    /// The LUN serves again: forget the fault.
    pub(crate) fn clear_fault(&self) {
        if self.faulted.swap(false, Ordering::AcqRel) {
            let was = self.fault.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(was) = was {
                tracing::info!(target_name = %self.cfg.target, lun = self.cfg.lun, fault = %was, "iSCSI LUN serves again");
            }
        }
    }

    /// Whether a fault is recorded (no lock).
    pub(crate) fn is_faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire)
    }

    pub(crate) fn geometry(&self) -> Geometry {
        match self.geometry.get() {
            Some(g) => *g,
            None => Geometry::from_info(&self.info.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    pub(crate) fn lbs(&self) -> u32 {
        self.geometry().lbs
    }

    pub(crate) fn info(&self) -> DeviceInfo {
        let g = self.geometry();
        DeviceInfo {
            size: self.size.load(Ordering::Acquire),
            logical_block_size: g.lbs,
            physical_block_size: g.pbs,
            max_transfer: g.max_transfer,
            read_only: self.cfg.read_only,
            discard: g.unmap && !self.no_unmap.load(Ordering::Relaxed),
            write_zeroes: true,
            block_status: false,
        }
    }
}

/// A LUN reached through Ember's iSCSI initiator.
#[derive(Debug)]
pub struct IscsiDevice {
    inner: Arc<Inner>,
}

impl IscsiDevice {
    /// Log in once, learn the LUN, log out; fail with a clear error if it cannot be used.
    pub fn open(cfg: IscsiConfig) -> Result<IscsiDevice> {
        let inner = new_inner(cfg, Arc::default())?;
        IscsiDevice::probe(inner)
    }

    /// Open one path of a multipath device: `pr` is shared by every path.
    pub(crate) fn open_path(cfg: IscsiConfig, pr: Arc<PrState>) -> Result<IscsiDevice> {
        let inner = new_inner(cfg, pr)?;
        IscsiDevice::probe(inner)
    }

    /// A path to the LUN `like` was opened through, by another portal that did not
    /// answer at open: it takes `like`'s geometry and identity, and its sessions log in
    /// when the portal answers (and check that it is the same LUN).
    pub(crate) fn unprobed(cfg: IscsiConfig, like: &IscsiDevice) -> Result<IscsiDevice> {
        let inner = new_inner(cfg, like.inner.pr.clone())?;
        *inner.info.lock().unwrap_or_else(|e| e.into_inner()) = like.lun_info();
        let _ = inner.geometry.set(like.inner.geometry());
        inner
            .size
            .store(like.inner.size.load(Ordering::Acquire), Ordering::Release);
        Ok(IscsiDevice { inner })
    }

    /// A fail-fast queue of this path for a multipath queue: SQEs with `owner`, path
    /// number `index`.
    pub(crate) fn path_queue(
        &self,
        ring: &mut Ring,
        owner: crate::engine::OwnerId,
        index: u8,
    ) -> IscsiQueue {
        IscsiQueue::with_owner(self.inner.clone(), ring, Mode::Serve, owner, Some(index))
    }

    fn probe(inner: Arc<Inner>) -> Result<IscsiDevice> {
        let (chap, params) = run_until_ready(&inner, Mode::Probe, false)?;
        {
            let mut info = inner.info.lock().unwrap_or_else(|e| e.into_inner());
            info.chap = chap;
            info.params = params;
            let _ = inner.geometry.set(Geometry::from_info(&info));
        }
        let dev = IscsiDevice { inner };
        let i = dev.lun_info();
        let g = dev.inner.geometry();
        tracing::info!(
            portal = %dev.inner.portal,
            target_name = %dev.inner.cfg.target,
            lun = dev.inner.cfg.lun,
            identity = %i.identity,
            vendor = %i.inquiry.as_ref().map_or("", |q| q.vendor.as_str()),
            product = %i.inquiry.as_ref().map_or("", |q| q.product.as_str()),
            size = dev.inner.size.load(Ordering::Acquire),
            logical_block_size = g.lbs,
            physical_block_size = g.pbs,
            max_transfer = g.max_transfer,
            unmap = g.unmap,
            write_same_unmap = g.write_same_unmap,
            chap = ?i.chap,
            header_digest = i.params.is_some_and(|p| p.header_digest),
            data_digest = i.params.is_some_and(|p| p.data_digest),
            "iSCSI LUN opened"
        );
        Ok(dev)
    }

    /// What was learned about the LUN.
    pub fn lun_info(&self) -> LunInfo {
        self.inner
            .info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The configuration.
    pub fn config(&self) -> &IscsiConfig {
        &self.inner.cfg
    }

    /// PERSISTENT RESERVE OUT through the device's administrative session (which has
    /// registered the node's `pr_key` first, unless the node is fenced). A refusal
    /// (RESERVATION CONFLICT, ILLEGAL REQUEST) is an error naming it.
    pub fn pr_out(&self, c: PrOut) -> Result<()> {
        self.admin(AdminCmd::pr_out(c), c.name()).map(drop)
    }

    /// PERSISTENT RESERVE OUT, then READ KEYS and READ RESERVATION, in one
    /// administrative session (tgtd counts every login as a new I_T nexus, so each
    /// session adds a registration of the key: one session, not three).
    pub fn pr_out_and_read(&self, c: PrOut) -> Result<(PrKeys, Option<PrReservation>)> {
        let cmds = vec![
            AdminCmd::pr_out(c),
            AdminCmd::pr_in(PrIn::ReadKeys),
            AdminCmd::pr_in(PrIn::ReadReservation),
        ];
        let mut r = self.admin_many(cmds, c.name())?.into_iter();
        let (Some(_), Some(k), Some(res)) = (r.next(), r.next(), r.next()) else {
            return Err(Error::new(ErrorKind::Io, "PERSISTENT RESERVE: no answer"));
        };
        let keys = pr::parse_read_keys(&k)
            .ok_or_else(|| Error::new(ErrorKind::Io, "READ KEYS: short answer"))?;
        let res = pr::parse_read_reservation(&res)
            .ok_or_else(|| Error::new(ErrorKind::Io, "READ RESERVATION: short answer"))?;
        Ok((keys, res))
    }

    /// PERSISTENT RESERVE IN, READ KEYS.
    pub fn pr_read_keys(&self) -> Result<PrKeys> {
        let b = self.admin(AdminCmd::pr_in(PrIn::ReadKeys), "READ KEYS")?;
        pr::parse_read_keys(&b).ok_or_else(|| Error::new(ErrorKind::Io, "READ KEYS: short answer"))
    }

    /// PERSISTENT RESERVE IN, READ RESERVATION (`None`: nothing reserved).
    pub fn pr_read_reservation(&self) -> Result<Option<PrReservation>> {
        let b = self.admin(AdminCmd::pr_in(PrIn::ReadReservation), "READ RESERVATION")?;
        pr::parse_read_reservation(&b)
            .ok_or_else(|| Error::new(ErrorKind::Io, "READ RESERVATION: short answer"))
    }

    /// The node's key was preempted on this LUN (see the module doc).
    pub fn is_fenced(&self) -> bool {
        self.inner.pr.fenced.load(Ordering::Acquire)
    }

    fn admin(&self, cmd: AdminCmd, what: &str) -> Result<Vec<u8>> {
        self.admin_many(vec![cmd], what)?
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Io, format!("{what}: no answer")))
    }

    /// Run `cmds` on an administrative session; the first refusal is the error.
    fn admin_many(&self, cmds: Vec<AdminCmd>, what: &str) -> Result<Vec<Vec<u8>>> {
        let mut ring = Ring::new(64).map_err(|e| Error::io("io_uring setup", e))?;
        let mut q = IscsiQueue::new(self.inner.clone(), &mut ring, Mode::Serve);
        q.set_admin(self.inner.admin_isid(), cmds);
        drive_until_ready(&self.inner, &mut ring, &mut q, false)?;
        let at = format!(
            "{what} on LUN {} of {} at {}",
            self.inner.cfg.lun, self.inner.cfg.target, self.inner.portal
        );
        q.take_admin_results()
            .into_iter()
            .map(|r| match r {
                Some(Ok(b)) => Ok(b),
                Some(Err(m)) => Err(Error::new(
                    ErrorKind::Io,
                    format!("{at}: {PR_REFUSED}: {m}"),
                )),
                None => Err(Error::new(ErrorKind::Io, format!("{what}: not sent"))),
            })
            .collect()
    }
}

/// The shared state of a device or a discovery session for `cfg` (CHAP user checked,
/// portal resolved, a fresh ISID base); `pr` is shared by the paths of a multipath
/// device.
fn new_inner(cfg: IscsiConfig, pr: Arc<PrState>) -> Result<Arc<Inner>> {
    if let (Some(u), Some(c)) = (&cfg.uri_user, &cfg.chap) {
        if *u != c.user {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "the URI names CHAP user {u:?}, the credentials {:?}",
                    c.user
                ),
            ));
        }
    }
    if cfg.uri_user.is_some() && cfg.chap.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            "the URI names a CHAP user but no CHAP credentials were given",
        ));
    }
    let portal = cfg
        .portal
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolve {}", cfg.portal), e))?
        .next()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("{}: no address", cfg.portal),
            )
        })?;
    let mut r = [0u8; 3];
    getrandom::fill(&mut r)
        .map_err(|e| Error::new(ErrorKind::Io, format!("no randomness for the ISID: {e}")))?;
    Ok(Arc::new(Inner {
        cfg,
        portal,
        size: AtomicU64::new(0),
        info: Mutex::new(LunInfo::default()),
        geometry: OnceLock::new(),
        no_write_same: AtomicBool::new(false),
        no_unmap: AtomicBool::new(false),
        fault: Mutex::new(None),
        faulted: AtomicBool::new(false),
        unreachable_since: Mutex::new(None),
        isid_base: r,
        next_qualifier: AtomicU16::new(1),
        pr,
    }))
}

/// The LUNs of `cfg`'s target: one login, REPORT LUNS (addressed to `cfg.lun`; LUN 0
/// answers it on every target, SPC-4 §6.33), log out. Bounded like an open: the login
/// timeout plus one command timeout; a refused login or CHAP failure is a clear error.
pub fn report_luns(cfg: IscsiConfig) -> Result<Vec<u16>> {
    let inner = new_inner(cfg, Arc::default())?;
    run_until_ready(&inner, Mode::Discover, false)?;
    let luns = inner
        .info
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .luns
        .take();
    luns.ok_or_else(|| {
        Error::new(
            ErrorKind::Io,
            format!(
                "target {} at {} answered REPORT LUNS with nothing usable",
                inner.cfg.target, inner.portal
            ),
        )
    })
}

/// Drive one queue on a private ring until its session is ready (probe or refresh).
/// With `once`, a serving queue's first failed attempt ends it too: a permanent failure
/// as an `Io` error, a connection that failed as `Busy`.
fn run_until_ready(
    inner: &Arc<Inner>,
    mode: Mode,
    once: bool,
) -> Result<(Option<ChapAlg>, Option<Negotiated>)> {
    let mut ring = Ring::new(64).map_err(|e| Error::io("io_uring setup", e))?;
    let mut q = IscsiQueue::new(inner.clone(), &mut ring, mode);
    drive_until_ready(inner, &mut ring, &mut q, once)
}

/// Run `q` on `ring` until its session is ready (set-up done), fails, or times out
/// (`once`: see [`run_until_ready`]).
fn drive_until_ready(
    inner: &Arc<Inner>,
    ring: &mut Ring,
    q: &mut IscsiQueue,
    once: bool,
) -> Result<(Option<ChapAlg>, Option<Negotiated>)> {
    let limit = inner.cfg.login_timeout + inner.cfg.timeouts.cmd_timeout;
    let deadline = Instant::now() + limit;
    let mut cqes = Vec::new();
    let mut done = Vec::new();
    let what = format!(
        "iSCSI LUN {} of {} at {}",
        inner.cfg.lun, inner.cfg.target, inner.portal
    );
    loop {
        if q.is_ready() {
            return Ok((q.chap_used(), q.negotiated()));
        }
        if let Some(e) = q.failure() {
            return Err(Error::new(ErrorKind::Io, format!("{what}: {e}")));
        }
        if once {
            if let Some(e) = q.attempt_failed() {
                return Err(Error::new(ErrorKind::Busy, format!("{what}: {e}")));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{what}: not ready within {} s", limit.as_secs()),
            ));
        }
        ring.submit_and_wait(1)
            .map_err(|e| Error::io("io_uring wait", e))?;
        cqes.clear();
        ring.reap(&mut cqes);
        for c in cqes.drain(..) {
            if c.owner() == q.owner() {
                q.complete(ring, c, &mut done);
            }
        }
    }
}

impl BlockDevice for IscsiDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        Ok(Box::new(IscsiQueue::new(
            self.inner.clone(),
            ring,
            Mode::Serve,
        )))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Extent::all_data(self.inner.size.load(Ordering::Acquire), offset, len)
    }

    /// A LUN is grown on the array; this checks that it was (a fresh READ CAPACITY
    /// through a short session) and takes the new size.
    fn resize(&self, new_size: u64) -> Result<()> {
        run_until_ready(&self.inner, Mode::Serve, false)?;
        let size = self.inner.size.load(Ordering::Acquire);
        if size < new_size {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("the LUN is {size} bytes; grow it on the array to {new_size} bytes first"),
            ));
        }
        Ok(())
    }

    fn identity(&self) -> Option<LunIdentity> {
        let id = self.lun_info().identity;
        (!id.is_empty()).then_some(id)
    }

    fn fault(&self) -> Option<String> {
        if !self.inner.is_faulted() {
            return None;
        }
        self.inner
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One short login in serving mode (the identity check and READ CAPACITY(16) of a
    /// re-login). A target that answers "no" is a fault at once (recorded by the queue
    /// as well); a portal that does not answer is one only once the checks have failed
    /// to connect for longer than `replacement_timeout`, as for a serving session.
    fn check(&self) -> Result<()> {
        let since = |v: Option<Instant>| {
            *self
                .inner
                .unreachable_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = v;
        };
        match run_until_ready(&self.inner, Mode::Serve, true) {
            Ok(_) => {
                since(None);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Busy => {
                let now = Instant::now();
                let first = *self
                    .inner
                    .unreachable_since
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(now);
                let limit = self.inner.cfg.replacement_timeout;
                if now.duration_since(first) > limit {
                    let m = format!(
                        "no iSCSI session for over {} s (replacement timeout): {e}",
                        limit.as_secs()
                    );
                    self.inner.set_fault(&m);
                    return Err(Error::new(ErrorKind::Io, m));
                }
                tracing::debug!(error = %e, "iSCSI health check: no session this time");
                Ok(())
            }
            Err(e) => {
                since(None);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
