//! The one boundary between the control plane and the data plane: a typed, async
//! volume-lifecycle interface, [`DataPlane`], that this crate owns and the process
//! embedding it implements (`emberd serve`: `ember_daemon::dataplane::EmberDataPlane`).
//!
//! ```text
//!   volumes::service ──(DataPlane: plain data, one error enum)──▶ emberd's data plane
//!        │ renders Cinder JSON                                    pools, LUKS, device
//!        ▼                                                        stacks, NBD, vhost-user
//!   connection_info  ◀── Endpoint { Nbd | VhostUser } ◀───────────┘
//! ```
//!
//! Design:
//! - **Plain data** in and out: object references ([`ObjectRef`]: pool, kind, id), sizes
//!   in bytes, LUKS parameters, QoS limits, passphrases in [`Passphrase`] (zeroized on
//!   drop, shown as `<redacted>` by `Debug`), and a typed [`Endpoint`] from
//!   [`DataPlane::attach`]. No JSON and no block-layer types cross it: the control plane
//!   renders Cinder's `connection_info` from the endpoint; the data plane never sees an
//!   HTTP body, and this crate does not depend on `ember-blockdev` (nor io_uring).
//! - **One error enum**, [`DataPlaneError`]; the volumes service maps it to HTTP in one
//!   place (`NoSpace` → 413, `NoPool`/`ShuttingDown` → 503, `Busy` → 409, the rest a
//!   logged 500).
//! - **Async, never blocking the runtime**: every method returns a boxed future. An
//!   implementation does its blocking work (file system calls, copies, LUKS headers and
//!   key derivation) on blocking threads, so neither a copy nor a slow unlock stalls
//!   the REST server.
//! - **Idempotent ends**: deleting a missing object and detaching an unknown attachment
//!   succeed (both are retried after crashes).
//! - **Point in time**: a clone or snapshot of an attached volume is the volume at one
//!   instant; the data plane pauses the volume's writes (drains the in-flight ones and
//!   holds new ones, for a bounded time) while it copies.
//!
//! - **LUN pools** ([`luns`]): a pool may hold LUNs an array made rather than files
//!   Ember allocates. Nothing is created in it: the control plane lists its LUNs
//!   ([`DataPlane::list_luns`]), binds one to a volume ([`DataPlane::manage`], which
//!   checks the LUN's identity and can format it as LUKS) and releases it
//!   ([`DataPlane::unmanage`]; [`DataPlane::delete`] of such a volume does the same:
//!   Ember never erases an array's LUN). The pool's CHAP secrets live in the control
//!   plane's key store; it hands them over ([`DataPlane::set_chap`]) before it asks for
//!   a login. Attach, detach and grow work on bound volumes as on files (grow takes the
//!   size the array gave the LUN). [`DataPlane::check_luns`] is the periodic health
//!   check of attached LUN volumes: their faults, which the control plane shows.
//!
//! `mem::MemDataPlane` (this crate's tests, or feature `test-utils`) implements it in
//! memory, with failure injection and holds, for the volumes API's in-process tests.

pub mod luns;
#[cfg(any(test, feature = "test-utils"))]
pub mod mem;

pub use luns::{ChapRef, ChapSecret, LunHealth, LunPoolInfo, ManageLun, ManageableLun, ManagedLun};

use ember_crypto::Zeroizing;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// Result of a data-plane call.
pub type DpResult<T> = Result<T, DataPlaneError>;

/// The future a [`DataPlane`] method returns.
pub type DpFuture<'a, T> = Pin<Box<dyn Future<Output = DpResult<T>> + Send + 'a>>;

/// What a pool object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A volume's bytes.
    Volume,
    /// A snapshot's bytes.
    Snapshot,
}

/// One object in a storage pool: a volume or a snapshot, by its control-plane id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// The storage pool's name.
    pub pool: String,
    /// Volume or snapshot.
    pub kind: ObjectKind,
    /// The volume's or snapshot's id.
    pub id: String,
}

impl ObjectRef {
    /// Volume `id` in `pool`.
    pub fn volume(pool: impl Into<String>, id: impl Into<String>) -> Self {
        ObjectRef {
            pool: pool.into(),
            kind: ObjectKind::Volume,
            id: id.into(),
        }
    }

    /// Snapshot `id` in `pool`.
    pub fn snapshot(pool: impl Into<String>, id: impl Into<String>) -> Self {
        ObjectRef {
            pool: pool.into(),
            kind: ObjectKind::Snapshot,
            id: id.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ObjectKind::Volume => "volume",
            ObjectKind::Snapshot => "snapshot",
        };
        write!(f, "{kind} {} in pool {}", self.id, self.pool)
    }
}

/// A LUKS passphrase (Cinder's rule already applied): zeroized on drop, never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Wrap the bytes.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Passphrase(bytes)
    }

    /// The bytes, for the LUKS code that needs them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// LUKS header version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksVersion {
    /// LUKS1 (`provider: luks`).
    Luks1,
    /// LUKS2 (`provider: luks2`).
    Luks2,
}

/// How to format a new encrypted volume (aes-xts-plain64).
#[derive(Debug, Clone)]
pub struct LuksFormat {
    /// Header version.
    pub version: LuksVersion,
    /// Volume key bits as cryptsetup counts them (256: AES-128-XTS, 512: AES-256-XTS).
    pub key_bits: u32,
    /// The one keyslot's passphrase.
    pub passphrase: Passphrase,
}

/// Replace the keyslot `old` opens by one for `new` (a copy gets its own key).
#[derive(Debug, Clone)]
pub struct Rekey {
    /// Opens the copied header.
    pub old: Passphrase,
    /// The copy's own passphrase.
    pub new: Passphrase,
}

/// [`DataPlane::create`]: a new, zero-filled volume.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    /// The new volume (kind [`ObjectKind::Volume`]).
    pub volume: ObjectRef,
    /// Size in bytes.
    pub size: u64,
    /// Write a LUKS header with one keyslot.
    pub luks: Option<LuksFormat>,
}

/// [`DataPlane::clone_volume`]: a new volume with the bytes of a volume or snapshot.
#[derive(Debug, Clone)]
pub struct CloneVolume {
    /// The volume or snapshot copied (same pool as `volume`).
    pub source: ObjectRef,
    /// The new volume.
    pub volume: ObjectRef,
    /// Size in bytes (at least the source's; the copy is grown to it).
    pub size: u64,
    /// Give the copied LUKS header its own passphrase.
    pub rekey: Option<Rekey>,
}

/// [`DataPlane::snapshot`]: a point-in-time copy of a volume.
#[derive(Debug, Clone)]
pub struct SnapshotVolume {
    /// The volume.
    pub volume: ObjectRef,
    /// The new snapshot (kind [`ObjectKind::Snapshot`], same pool).
    pub snapshot: ObjectRef,
}

/// QoS limits of a volume (Cinder's `qos:` extra specs): caps on operations and on
/// bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    /// `qos:{read,write,total}_iops_sec`
    pub iops: RateLimits,
    /// `qos:{read,write,total}_bytes_sec`
    pub bytes: RateLimits,
}

/// Per-second caps on reads, writes and both together; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Reads.
    pub read: Option<u64>,
    /// Writes (and discards, write-zeroes).
    pub write: Option<u64>,
    /// Everything.
    pub total: Option<u64>,
}

/// Front-end protocol of an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// An NBD export on the daemon's NBD listeners.
    Nbd,
    /// A vhost-user-blk socket of its own.
    VhostUser,
}

impl Protocol {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::VhostUser => "vhost-user",
        }
    }
}

/// [`DataPlane::attach`]: serve a volume through one more front end.
#[derive(Debug, Clone)]
pub struct AttachVolume {
    /// The volume.
    pub volume: ObjectRef,
    /// The attachment's id (several attachments of one volume may coexist).
    pub attachment_id: String,
    /// Front end.
    pub protocol: Protocol,
    /// Refuse writes through this attachment.
    pub read_only: bool,
    /// LUKS passphrase when the volume is encrypted.
    pub passphrase: Option<Passphrase>,
    /// The volume's QoS (shared by all its attachments).
    pub qos: QosLimits,
    /// NBD with TLS: the attachment's pre-shared key when it has one already (served
    /// again after a restart, the key unsealed from its row); `None` makes a fresh one.
    pub nbd_psk: Option<Passphrase>,
    /// NBD over a Unix socket: the peer (`SO_PEERCRED`) that may connect without TLS
    /// (the connector's `uid`/`gid`); `None`: no Unix peer is admitted without TLS.
    pub unix_peer: Option<UnixPeer>,
}

/// A Unix-socket NBD client an attachment admits by its credentials: a uid, a gid, or
/// both (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// The peer's uid must be this…
    pub uid: Option<u32>,
    /// …and its gid this.
    pub gid: Option<u32>,
}

/// TLS credentials an NBD client must present (a pre-shared key per attachment).
#[derive(Debug, Clone)]
pub struct NbdCredentials {
    /// PSK identity.
    pub psk_identity: String,
    /// The key.
    pub psk: Passphrase,
}

/// Where a client reaches an attachment.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Endpoint {
    /// An NBD export.
    Nbd {
        /// Export name.
        export: String,
        /// One URI per NBD listener (`nbd+unix:///…?socket=…`, `nbd://host:port/…`).
        uris: Vec<String>,
        /// TLS credentials, when the listener requires TLS.
        credentials: Option<NbdCredentials>,
    },
    /// A vhost-user-blk socket.
    VhostUser {
        /// The Unix socket path.
        socket: PathBuf,
        /// Virtqueues the device offers.
        queues: u16,
    },
}

/// Capacity of one storage pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The pool's name.
    pub name: String,
    /// Bytes of the underlying storage.
    pub total_bytes: u64,
    /// Bytes free for new objects.
    pub free_bytes: u64,
    /// Sum of the objects' sizes.
    pub provisioned_bytes: u64,
}

/// One object found in a pool ([`DataPlane::inventory`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// The object.
    pub object: ObjectRef,
    /// Size in bytes.
    pub size: u64,
    /// Left by an interrupted create or clone (or one still running, on any node that
    /// shares the pool).
    pub partial: bool,
}

/// A data-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The object exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A point-in-time copy could not pause the volume's writes in time.
    #[error("{0} is busy; retry later")]
    Busy(String),
    /// Anything else: what failed, and why (the why is for the log).
    #[error("{what}: {detail}")]
    Failed {
        /// The operation.
        what: String,
        /// The cause.
        detail: String,
    },
    /// A request the data plane cannot carry out as given (a bug in the caller).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The pool is not configured on this node.
    #[error("storage pool {0} is not reachable from this node")]
    NoPool(String),
    /// Not enough space in the pool (nothing was allocated).
    #[error("not enough space in storage pool {pool}: {need} bytes needed, {free} bytes free")]
    NoSpace {
        /// The pool.
        pool: String,
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        free: u64,
    },
    /// The object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The data plane is stopping.
    #[error("the data plane is shutting down")]
    ShuttingDown,
    /// A LUN cannot be used now: its target refuses the login (a wrong CHAP secret),
    /// the LUN is gone or is another LUN than the one recorded. The reason is for the
    /// API: it names what an operator must fix.
    #[error("{what} is unavailable: {reason}")]
    LunUnavailable {
        /// The LUN or volume.
        what: String,
        /// Why.
        reason: String,
    },
    /// The LUKS header refused the passphrase or could not be read.
    #[error("cannot unlock {what}: {detail}")]
    Unlock {
        /// The object.
        what: String,
        /// The cause.
        detail: String,
    },
}

impl DataPlaneError {
    /// [`DataPlaneError::Failed`] from any error.
    pub fn failed(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        DataPlaneError::Failed {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// The volume lifecycle as the data plane carries it out. Implemented by the process
/// that embeds the control plane; see the module doc for the rules.
pub trait DataPlane: Send + Sync + 'static {
    /// Capacity of every pool of this node.
    fn stats(&self) -> DpFuture<'_, Vec<PoolStats>>;

    /// Every object of `pool`, complete or partial (start-up reconciliation).
    fn inventory(&self, pool: String) -> DpFuture<'_, Vec<StoredObject>>;

    /// Allocate a volume (refused with `NoSpace` before anything is allocated), and
    /// format it as LUKS when asked.
    fn create(&self, req: CreateVolume) -> DpFuture<'_, ()>;

    /// Make a volume from a volume or snapshot (point in time when the source is
    /// attached), grow it to the requested size, rekey it when asked.
    fn clone_volume(&self, req: CloneVolume) -> DpFuture<'_, ()>;

    /// Copy a volume into a snapshot (point in time when the volume is attached).
    fn snapshot(&self, req: SnapshotVolume) -> DpFuture<'_, ()>;

    /// Grow a volume to `new_size` bytes, live attachments included (vhost-user
    /// frontends are told; NBD clients see the size on their next connection).
    fn grow(&self, volume: ObjectRef, new_size: u64) -> DpFuture<'_, ()>;

    /// Remove an object (no error when it is missing).
    fn delete(&self, object: ObjectRef) -> DpFuture<'_, ()>;

    /// Serve a volume through a new front end; where clients reach it.
    fn attach(&self, req: AttachVolume) -> DpFuture<'_, Endpoint>;

    /// End one attachment: its clients are disconnected (no error when unknown).
    fn detach(&self, volume: ObjectRef, attachment_id: String) -> DpFuture<'_, ()>;

    /// The LUN pools of this node and the CHAP secrets (by id) their logins need.
    fn lun_pools(&self) -> DpFuture<'_, Vec<LunPoolInfo>>;

    /// Give a LUN pool the CHAP credentials of its logins (`None`: no CHAP).
    fn set_chap(&self, pool: String, chap: Option<ChapSecret>) -> DpFuture<'_, ()>;

    /// Every LUN of a LUN pool, with what it is bound to on this node and why it must
    /// not be managed, if so (bounded: every login has a timeout).
    fn list_luns(&self, pool: String) -> DpFuture<'_, Vec<ManageableLun>>;

    /// Bind a volume to a LUN (again: also after a restart): open it, check that it is
    /// the LUN recorded (when an identity is given), format it as LUKS when asked (only
    /// a blank LUN); its size and identity.
    fn manage(&self, req: ManageLun) -> DpFuture<'_, ManagedLun>;

    /// Release a volume's LUN (its bytes stay; no error when it is not bound).
    fn unmanage(&self, volume: ObjectRef) -> DpFuture<'_, ()>;

    /// The periodic health check: check the LUN of every attached LUN volume of this
    /// node now; each one's fault, `None` when it serves. Bounded by the LUNs' login
    /// and command timeouts. A data plane without LUN pools has nothing to check.
    fn check_luns(&self) -> DpFuture<'_, Vec<LunHealth>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
