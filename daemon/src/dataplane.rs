//! The data plane of `emberd serve`: the daemon's implementation of the control plane's
//! one boundary, [`DataPlane`] (typed requests in, typed [`Endpoint`]s out; no JSON).
//!
//! - Pools: the configured [`DirPool`]s. A volume's object is named by its id, a
//!   snapshot's by `snap-<id>`.
//! - Every method runs its blocking work (file system calls, copies, LUKS headers and
//!   key derivation) on tokio's blocking threads, never on the REST runtime's workers.
//! - LUKS header work (format a new volume, rekey a copy) goes through the one header
//!   adapter, [`ember_blockdev::stack::header_disk`].
//! - Attachments: one device stack per attached volume, built by
//!   [`ember_blockdev::stack::build`] (`throttle (type's qos:) → crypt (LUKS) → gate →
//!   file`) and shared by all its attachments, so the type's QoS limits the volume as a
//!   whole. Every attachment has its own front end, so its access mode is its own and
//!   ending it ends exactly its clients: an NBD attachment is the export
//!   `<volume>-<attachment>` on the daemon's NBD listeners (removing it closes its
//!   connections); a vhost-user attachment is the socket
//!   `VHOST_DIR/<volume>-<attachment8>.sock` (detaching disconnects the frontend,
//!   drains its queues and joins the export's threads).
//! - **NBD credentials** (`emberd serve --nbd-tls`, require by default): every NBD
//!   attachment gets a fresh random pre-shared key ([`NBD_PSK_BYTES`]) whose identity is
//!   its export name, in the listeners' one [`PskTable`]; the export's [`Access`] admits
//!   only a client that completed the TLS handshake with that identity, so no other
//!   client lists or opens it. The key goes to the caller once, in the endpoint's
//!   `credentials` (`connection_info.data.tls`); the control plane seals it under the
//!   master key in the attachment's row and hands it back in [`AttachVolume::nbd_psk`]
//!   when it serves the attachment again after a restart, so the client's credentials
//!   outlive the process. Detach revokes the key, then removes the export, which closes
//!   its connections (the control plane deletes the row, and the sealed key with it).
//!   TCP listeners require TLS; Unix-socket listeners offer it (`on`): a client there
//!   may instead be admitted by its `SO_PEERCRED` uid/gid when the attachment names a
//!   [`AttachVolume::unix_peer`] (the connector's `uid`/`gid`), and its Unix URI is then
//!   plaintext (`nbd+unix://`). Anyone else sees no such export.
//!   With `--nbd-tls off` exports are open to every client of the listeners, unless the
//!   attachment names a Unix peer: then only that peer, over a Unix socket.
//! - **No unlock under the volumes lock.** Opening a LUKS volume derives its key (PBKDF2
//!   or argon2: up to seconds, by design). The first attachment of a volume builds the
//!   stack *before* taking the lock that guards the attached volumes, and only registers
//!   it under the lock; so one slow unlock never holds up other volumes' attach, detach,
//!   resize or the daemon's shutdown. Two first attachments of one volume racing may
//!   both unlock; the first to register wins, the other's stack is dropped.
//! - **Point-in-time copies.** Every volume has a [`Gate`] (made on demand, shared by
//!   the stack of its attachments). A clone or snapshot of a volume shuts its gate for
//!   the copy: writes in flight drain (at most [`PAUSE_DRAIN`], else the copy fails
//!   `Busy`), new ones are held until the copy is done. The gate exists apart from the
//!   stack, so a volume attached during a copy starts with its writes held.
//! - Grow: the pool grows the file; the live stack's base device is told, and the
//!   layers above derive their size from it. Connected vhost-user frontends get a
//!   config-change notice (QEMU then re-reads the capacity and interrupts the guest);
//!   NBD clients see the new size on their next connection.
//! - LUN pools ([`luns`]): volumes bound to LUNs an array made (every LUN of an iSCSI
//!   target through Ember's initiator, or host block devices by glob). Their stacks are
//!   built on the LUN (opened, identity checked, then [`stack::build_on`]); nothing is
//!   allocated or erased on them; grow takes the size the array gave the LUN.

use crate::nbd::{Access, ListenAddr, NbdLimits, NbdServer, PskTable, TlsMode, TlsServer};
use crate::vhost::{self, VhostConfig, VhostExport};
use anyhow::Context;
use ember_blockdev::layer::crypt::DeviceDisk;
use ember_blockdev::layer::gate::Gate;
use ember_blockdev::layer::throttle::QosLimits;
use ember_blockdev::pool::{DirPool, Pool, PoolError};
use ember_blockdev::stack::{self, Stack, StackSpec, Unlock};
use ember_blockdev::{BackendSpec, OpenOptions};
use ember_control::dataplane::{
    AttachVolume, ChapSecret, CloneVolume, CreateVolume, DataPlane, DataPlaneError, DpFuture,
    DpResult, Endpoint, LuksFormat, LuksVersion, LunHealth, LunPoolInfo, ManageLun, ManageableLun,
    ManagedLun, NbdCredentials, ObjectKind, ObjectRef, Passphrase, PoolStats, Protocol, Rekey,
    SnapshotVolume, StoredObject,
};
use ember_crypto::kdf::Hash;
use ember_crypto::{FormatParams, KdfParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// PBKDF2-SHA256 iterations of keyslots Ember writes. Ember's own keys are 256+ random
/// bits, so the KDF adds no strength to them; this keeps unlocks fast while staying well
/// above cryptsetup's minimum of 1000.
pub const KEYSLOT_PBKDF2_ITERATIONS: u32 = 20_000;
/// Virtqueues of a vhost-user attachment.
pub const VHOST_QUEUES: u16 = 2;
/// How long a point-in-time copy waits for a volume's writes in flight to drain.
pub const PAUSE_DRAIN: Duration = Duration::from_secs(30);
/// Bytes of each NBD attachment's pre-shared key.
pub const NBD_PSK_BYTES: usize = 32;
/// Pool object name prefix of snapshots.
pub const SNAPSHOT_PREFIX: &str = "snap-";

/// One attachment.
enum Attachment {
    /// The NBD export of this attachment (by name).
    Nbd {
        export: String,
        /// Its PSK identity, revoked at detach (`None` without TLS).
        psk_identity: Option<String>,
    },
    Vhost {
        export: VhostExport,
    },
}

/// An attached volume.
struct Attached {
    /// The device stack every front end of the volume serves.
    stack: Stack,
    attachments: HashMap<String, Attachment>,
}

/// What the volumes lock guards (only quick work happens under it).
#[derive(Default)]
struct Volumes {
    attached: HashMap<String, Attached>,
    /// Each volume's gate, while a stack or a copy uses it.
    gates: HashMap<String, Arc<Gate>>,
}

impl Volumes {
    /// Drop the gate of `volume` if nothing but this map holds it.
    fn forget_gate(&mut self, volume: &str) {
        if self
            .gates
            .get(volume)
            .is_some_and(|g| Arc::strong_count(g) == 1)
        {
            self.gates.remove(volume);
        }
    }
}

/// Where NBD clients reach the daemon.
#[derive(Debug, Clone)]
enum NbdEndpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

struct Inner {
    pools: Vec<Arc<dyn Pool>>,
    /// LUN pools (see [`luns`]).
    lun_pools: Vec<luns::LunEntry>,
    /// Volume id → the LUN it is bound to.
    bindings: Mutex<HashMap<String, luns::Binding>>,
    /// `None` once shut down.
    nbd: Mutex<Option<NbdServer>>,
    nbd_endpoints: Vec<NbdEndpoint>,
    /// Each NBD attachment's key, by identity (`None`: `--nbd-tls off`, exports open
    /// to every client).
    nbd_psk: Option<Arc<PskTable>>,
    vhost_dir: PathBuf,
    volumes: Mutex<Volumes>,
    stopping: AtomicBool,
    /// Cost limits for every LUKS header this data plane reads (`emberd serve --max-…`).
    unlock: ember_crypto::UnlockLimits,
}

/// `emberd serve`'s data plane (cheap to clone).
#[derive(Clone)]
pub struct EmberDataPlane {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error with its chain of causes, for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn pool_error(pool: &str, what: &str, e: PoolError) -> DataPlaneError {
    match e {
        PoolError::NoSpace { need, free } => DataPlaneError::NoSpace {
            pool: pool.to_string(),
            need,
            free,
        },
        PoolError::NotFound(id) => DataPlaneError::NotFound(format!("{id} in pool {pool}")),
        PoolError::AlreadyExists(id) => {
            DataPlaneError::AlreadyExists(format!("{id} in pool {pool}"))
        }
        e => DataPlaneError::failed(what, chain(&e)),
    }
}

fn failed(what: &str, e: &dyn std::error::Error) -> DataPlaneError {
    DataPlaneError::failed(what, chain(e))
}

/// The pool object name of a volume or snapshot.
fn object_name(o: &ObjectRef) -> String {
    match o.kind {
        ObjectKind::Volume => o.id.clone(),
        ObjectKind::Snapshot => format!("{SNAPSHOT_PREFIX}{}", o.id),
    }
}

/// NBD export name of an attachment (ids are UUIDs: no characters a URI must escape).
fn nbd_export_name(volume_id: &str, attachment_id: &str) -> String {
    format!("{volume_id}-{attachment_id}")
}

/// Socket path of a vhost-user attachment (short: Unix socket paths are limited).
fn vhost_socket(dir: &Path, volume_id: &str, attachment_id: &str) -> PathBuf {
    let short: String = attachment_id.chars().take(8).collect();
    dir.join(format!("{volume_id}-{short}.sock"))
}

fn keyslot_kdf() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: Hash::Sha256,
        iterations: KEYSLOT_PBKDF2_ITERATIONS,
    }
}

fn qos(q: &ember_control::dataplane::QosLimits) -> QosLimits {
    QosLimits {
        read_iops_sec: q.iops.read,
        write_iops_sec: q.iops.write,
        total_iops_sec: q.iops.total,
        read_bytes_sec: q.bytes.read,
        write_bytes_sec: q.bytes.write,
        total_bytes_sec: q.bytes.total,
    }
}

impl EmberDataPlane {
    /// Open the pools (name → directory) and take the LUN pools, start the NBD server
    /// listening on `listen` under `nbd_limits`, and put vhost-user sockets in
    /// `vhost_dir`; every LUKS header is read within `unlock` (`emberd serve --max-…`).
    /// Returns the bound NBD addresses too.
    pub fn start(
        pools: Vec<(String, PathBuf)>,
        lun_pools: Vec<luns::LunPoolSetup>,
        listen: &[ListenAddr],
        nbd_limits: NbdLimits,
        nbd_tls: TlsMode,
        vhost_dir: PathBuf,
        unlock: ember_crypto::UnlockLimits,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        let mut ps: Vec<Arc<dyn Pool>> = Vec::new();
        for (name, dir) in pools {
            let p = DirPool::open(name.clone(), &dir)
                .with_context(|| format!("open pool {name} at {}", dir.display()))?;
            ps.push(Arc::new(p));
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // With TLS every listener runs one PSK server over a table the attachments fill.
        let (nbd_psk, tls) = if nbd_tls == TlsMode::Off {
            (None, None)
        } else {
            let table = Arc::new(PskTable::default());
            let server = TlsServer::new(Some(table.clone()), None).context("NBD TLS")?;
            (Some(table), Some(Arc::new(server)))
        };
        let server = NbdServer::start(threads, nbd_limits)?;
        let mut bound = Vec::new();
        let mut endpoints = Vec::new();
        for a in listen {
            // Unix sockets offer TLS but do not demand it: a client without it sees only
            // the exports whose attachment named its uid/gid (`SO_PEERCRED`).
            let mode = match (a, nbd_tls) {
                (ListenAddr::Unix(_), TlsMode::Require) => TlsMode::On,
                (_, m) => m,
            };
            match server.listen_tls(a, mode, tls.clone()) {
                Ok(b) => {
                    endpoints.push(match a {
                        ListenAddr::Unix(p) => NbdEndpoint::Unix(p.clone()),
                        ListenAddr::Tcp(_) => NbdEndpoint::Tcp(b.clone()),
                    });
                    bound.push(b);
                }
                Err(e) => {
                    server.shutdown();
                    return Err(e);
                }
            }
        }
        let inner = Inner {
            pools: ps,
            lun_pools: lun_pools.into_iter().map(Into::into).collect(),
            bindings: Mutex::default(),
            nbd: Mutex::new(Some(server)),
            nbd_endpoints: endpoints,
            nbd_psk,
            vhost_dir,
            volumes: Mutex::default(),
            stopping: AtomicBool::new(false),
            unlock,
        };
        Ok((
            EmberDataPlane {
                inner: Arc::new(inner),
            },
            bound,
        ))
    }

    /// Stop every attachment (vhost-user exports finish their submitted requests
    /// first), stop listening for NBD, close NBD connections and join the I/O threads.
    /// Attaches still unlocking when it runs fail with `ShuttingDown`.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Run `f` on a blocking thread.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> DpResult<T> + Send + 'static,
    ) -> DpFuture<'static, T> {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| DataPlaneError::failed("data-plane task", e))?
        })
    }
}

impl Inner {
    fn pool(&self, name: &str) -> DpResult<&Arc<dyn Pool>> {
        if self.is_lun_pool(name) {
            return Err(DataPlaneError::Invalid(format!(
                "storage pool {name} holds an array's LUNs: nothing is allocated in it (manage a LUN instead)"
            )));
        }
        self.pools
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| DataPlaneError::NoPool(name.to_string()))
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let volumes: Vec<String> = lock(&self.volumes).attached.keys().cloned().collect();
        for v in volumes {
            // The detach path of every attachment: one way to stop a front end.
            self.close_volume(&v);
        }
        let server = lock(&self.nbd).take();
        if let Some(s) = server {
            s.shutdown();
        }
    }

    /// End every attachment of a volume.
    fn close_volume(&self, volume_id: &str) {
        let ids: Vec<String> = lock(&self.volumes)
            .attached
            .get(volume_id)
            .map(|a| a.attachments.keys().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.detach(volume_id, &id);
        }
    }

    fn stats(&self) -> DpResult<Vec<PoolStats>> {
        let mut out = self
            .pools
            .iter()
            .map(|p| {
                let s = p
                    .stats()
                    .map_err(|e| pool_error(p.name(), "pool statistics", e))?;
                Ok(PoolStats {
                    name: p.name().to_string(),
                    total_bytes: s.total_bytes,
                    free_bytes: s.free_bytes,
                    provisioned_bytes: s.provisioned_bytes,
                })
            })
            .collect::<DpResult<Vec<_>>>()?;
        out.extend(self.lun_stats());
        Ok(out)
    }

    fn inventory(&self, pool: &str) -> DpResult<Vec<StoredObject>> {
        if self.is_lun_pool(pool) {
            return Ok(self.lun_inventory(pool));
        }
        let p = self.pool(pool)?;
        let objects = p.list().map_err(|e| pool_error(pool, "list the pool", e))?;
        Ok(objects
            .into_iter()
            .map(|o| {
                let object = match o.id.strip_prefix(SNAPSHOT_PREFIX) {
                    Some(id) => ObjectRef::snapshot(pool, id),
                    None => ObjectRef::volume(pool, &o.id),
                };
                StoredObject {
                    object,
                    size: o.size,
                    partial: o.partial,
                }
            })
            .collect())
    }

    /// Write a LUKS header with one keyslot on a new volume.
    fn luks_format(&self, backend: &BackendSpec, f: &LuksFormat) -> DpResult<()> {
        let disk = stack::header_disk(backend, false)
            .map_err(|e| failed("open the volume for its LUKS header", &e))?;
        self.luks_format_disk(disk, f)
    }

    /// Write a LUKS header with one keyslot on an opened device.
    fn luks_format_disk(&self, mut disk: DeviceDisk, f: &LuksFormat) -> DpResult<()> {
        if f.key_bits != 256 && f.key_bits != 512 {
            return Err(DataPlaneError::Invalid(format!(
                "LUKS key size {} bits: use 256 or 512",
                f.key_bits
            )));
        }
        let p = FormatParams {
            version: match f.version {
                LuksVersion::Luks1 => 1,
                LuksVersion::Luks2 => 2,
            },
            key_bytes: (f.key_bits / 8) as usize,
            sector_size: 512,
            kdf: keyslot_kdf(),
            label: String::new(),
            uuid: None,
        };
        ember_crypto::format(&mut disk, f.passphrase.expose(), &p)
            .map_err(|e| failed("write the LUKS header", &e))?;
        disk.flush().map_err(|e| failed("sync the LUKS header", &e))
    }

    /// Replace the keyslot `old` opens by one for `new` (a copy's own key).
    fn luks_rekey(&self, backend: &BackendSpec, r: &Rekey) -> DpResult<()> {
        let mut disk = stack::header_disk(backend, false)
            .map_err(|e| failed("open the copy for its LUKS header", &e))?;
        ember_crypto::change_key(
            &mut disk,
            r.old.expose(),
            r.new.expose(),
            keyslot_kdf(),
            &self.unlock,
        )
        .map_err(|e| DataPlaneError::Unlock {
            what: "the copied LUKS header".into(),
            detail: chain(&e),
        })?;
        disk.flush().map_err(|e| failed("sync the LUKS header", &e))
    }

    fn create(&self, req: &CreateVolume) -> DpResult<()> {
        if let Some(f) = &req.luks {
            if f.key_bits != 256 && f.key_bits != 512 {
                return Err(DataPlaneError::Invalid(format!(
                    "LUKS key size {} bits: use 256 or 512",
                    f.key_bits
                )));
            }
        }
        let p = self.pool(&req.volume.pool)?;
        let spec = p
            .create(&object_name(&req.volume), req.size)
            .map_err(|e| pool_error(p.name(), "create the volume", e))?;
        if let Some(f) = &req.luks {
            self.luks_format(&spec, f)?;
        }
        Ok(())
    }

    /// The gate of `volume`, made if needed.
    fn gate_of(&self, volume: &str) -> Arc<Gate> {
        lock(&self.volumes)
            .gates
            .entry(volume.to_string())
            .or_default()
            .clone()
    }

    /// Copy `source` to `target` at one instant: an attached volume's writes are
    /// paused for the copy.
    fn copy(&self, source: &ObjectRef, target: &ObjectRef) -> DpResult<BackendSpec> {
        let p = self.pool(&source.pool)?;
        if target.pool != source.pool {
            return Err(DataPlaneError::Invalid(format!(
                "{target} must be in the pool of {source}"
            )));
        }
        let gate = (source.kind == ObjectKind::Volume).then(|| self.gate_of(&source.id));
        let res = (|| {
            let _pause = match &gate {
                Some(g) => Some(g.pause(PAUSE_DRAIN).map_err(|e| {
                    tracing::warn!(volume = %source.id, error = %e, "cannot pause the volume for a copy");
                    DataPlaneError::Busy(source.to_string())
                })?),
                None => None,
            };
            let (spec, method) =
                Pool::clone_from(p.as_ref(), &object_name(source), &object_name(target))
                    .map_err(|e| pool_error(p.name(), "copy", e))?;
            tracing::info!(source = %source, target = %target, ?method, "copied at one instant");
            Ok(spec)
        })();
        if let Some(g) = gate {
            drop(g);
            lock(&self.volumes).forget_gate(&source.id);
        }
        res
    }

    fn clone_volume(&self, req: &CloneVolume) -> DpResult<()> {
        let spec = self.copy(&req.source, &req.volume)?;
        let p = self.pool(&req.volume.pool)?;
        let name = object_name(&req.volume);
        let size = p
            .stat(&name)
            .map_err(|e| pool_error(p.name(), "size of the copy", e))?
            .size;
        if req.size > size {
            p.resize(&name, req.size)
                .map_err(|e| pool_error(p.name(), "grow the copy", e))?;
        }
        if let Some(r) = &req.rekey {
            self.luks_rekey(&spec, r)?;
        }
        Ok(())
    }

    fn grow(&self, volume: &ObjectRef, new_size: u64) -> DpResult<()> {
        let lun = self.is_lun_pool(&volume.pool);
        if lun {
            let b = self
                .binding(volume)
                .ok_or_else(|| DataPlaneError::NotFound(format!("the LUN of {volume}")))?;
            self.grow_lun(volume, &b, new_size)?;
        } else {
            let p = self.pool(&volume.pool)?;
            p.resize(&object_name(volume), new_size)
                .map_err(|e| pool_error(p.name(), "grow the volume", e))?;
        }
        let notifiers: Vec<(String, vhost::ConfigNotifier)> = {
            let vols = lock(&self.volumes);
            let Some(a) = vols.attached.get(&volume.id) else {
                return Ok(());
            };
            // A LUN's live device took the new size in `grow_lun`.
            if let Err(e) = (!lun).then(|| a.stack.base.resize(new_size)).transpose() {
                // The file grew: the next stack of this volume sees it.
                tracing::warn!(volume = %volume.id, error = %e, "the live device did not learn the new size");
            }
            a.attachments
                .iter()
                .filter_map(|(id, att)| match att {
                    Attachment::Vhost { export } => Some((id.clone(), export.notifier())),
                    Attachment::Nbd { .. } => None,
                })
                .collect()
        };
        // vhost-user frontends learn the new capacity in band (NBD clients see it on
        // their next connection). Told outside the lock: a frontend slow to ack must not
        // hold up other attachments. One that cannot be told is no reason to fail the
        // resize: it already happened.
        for (id, n) in notifiers {
            if let Err(e) = n.config_changed() {
                tracing::warn!(volume = %volume.id, attachment = %id, "{e:#}");
            }
        }
        Ok(())
    }

    fn delete(&self, object: &ObjectRef) -> DpResult<()> {
        if self.is_lun_pool(&object.pool) {
            // Ember never erases an array's LUN: the volume lets it go.
            self.unbind(object);
            return Ok(());
        }
        let p = self.pool(&object.pool)?;
        p.delete(&object_name(object))
            .map_err(|e| pool_error(p.name(), "delete", e))
    }

    fn check_running(&self) -> DpResult<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(DataPlaneError::ShuttingDown);
        }
        Ok(())
    }

    /// Open the volume's device stack: LUKS unlock (key derivation) included. Called
    /// without the volumes lock.
    fn build_stack(&self, req: &AttachVolume, gate: Arc<Gate>) -> DpResult<Stack> {
        let lun = match self.is_lun_pool(&req.volume.pool) {
            true => Some(self.binding(&req.volume).ok_or_else(|| {
                DataPlaneError::NotFound(format!("the LUN of {} (manage it again)", req.volume))
            })?),
            false => None,
        };
        let backend = match &lun {
            // Opened below, with its identity checked; `build_on` ignores the spec.
            Some(_) => BackendSpec::Null { size: 0 },
            None => {
                let p = self.pool(&req.volume.pool)?;
                p.spec(&object_name(&req.volume))
                    .map_err(|e| pool_error(p.name(), "find the volume", e))?
            }
        };
        let spec = StackSpec {
            backend,
            open: OpenOptions::default(),
            luks: req.passphrase.as_ref().map(|pass| Unlock {
                passphrase: pass.expose(),
                limits: self.unlock,
            }),
            qos: qos(&req.qos),
            gate: Some(gate),
        };
        let built = match &lun {
            Some(b) => stack::build_on(self.open_bound(&req.volume, b)?, &spec),
            None => stack::build(&spec),
        };
        built.map_err(|e| {
            if req.passphrase.is_some() {
                DataPlaneError::Unlock {
                    what: req.volume.to_string(),
                    detail: chain(&e),
                }
            } else {
                failed("open the volume", &e)
            }
        })
    }

    fn attach(&self, req: &AttachVolume) -> DpResult<Endpoint> {
        let vid = req.volume.id.clone();
        let mut built: Option<Stack> = None;
        loop {
            let gate = {
                let mut vols = lock(&self.volumes);
                self.check_running()?;
                if vols.attached.contains_key(&vid) || built.is_some() {
                    return self.add_attachment(&mut vols, req, built.take());
                }
                vols.gates.entry(vid.clone()).or_default().clone()
            };
            // The first attachment unlocks, with no lock held (see the module doc).
            built = Some(self.build_stack(req, gate)?);
        }
    }

    /// Register an attachment (and the stack, for the first one): quick work only.
    fn add_attachment(
        &self,
        vols: &mut Volumes,
        req: &AttachVolume,
        built: Option<Stack>,
    ) -> DpResult<Endpoint> {
        let vid = &req.volume.id;
        let fresh = !vols.attached.contains_key(vid);
        let a = match (vols.attached.get_mut(vid), built) {
            (Some(a), _) => a, // another attachment registered first: ours is dropped
            (None, Some(stack)) => vols.attached.entry(vid.clone()).or_insert(Attached {
                stack,
                attachments: HashMap::new(),
            }),
            (None, None) => return Err(DataPlaneError::failed("attach", "no device stack")),
        };
        if a.attachments.contains_key(&req.attachment_id) {
            return Err(DataPlaneError::AlreadyExists(format!(
                "attachment {} of volume {vid}",
                req.attachment_id
            )));
        }
        let res = match req.protocol {
            Protocol::Nbd => {
                let name = nbd_export_name(vid, &req.attachment_id);
                // With TLS: its key (a fresh one, or the one it had before a restart),
                // its identity the export name; only a client that authenticated with
                // it sees and opens the export.
                let creds = match &self.nbd_psk {
                    Some(table) => {
                        let key = match &req.nbd_psk {
                            Some(k) => {
                                let k = k.expose();
                                if k.is_empty() || k.len() > crate::nbd::tls::MAX_PSK_BYTES {
                                    return Err(DataPlaneError::Invalid(format!(
                                        "an NBD key of {} bytes",
                                        k.len()
                                    )));
                                }
                                Zeroizing::new(k.to_vec())
                            }
                            None => {
                                let mut key = Zeroizing::new(vec![0u8; NBD_PSK_BYTES]);
                                openssl::rand::rand_bytes(&mut key)
                                    .map_err(|e| DataPlaneError::failed("make an NBD key", e))?;
                                key
                            }
                        };
                        table.insert(&name, key.clone());
                        Some(NbdCredentials {
                            psk_identity: name.clone(),
                            psk: Passphrase::new(key),
                        })
                    }
                    None => None,
                };
                let peer = req.unix_peer.filter(|p| p.uid.is_some() || p.gid.is_some());
                let access = match (&creds, peer) {
                    (None, None) => Access::Any,
                    (c, p) => Access::Attachment {
                        psk_identity: c.as_ref().map(|c| c.psk_identity.clone()),
                        uid: p.and_then(|p| p.uid),
                        gid: p.and_then(|p| p.gid),
                    },
                };
                let added = match lock(&self.nbd).as_ref() {
                    Some(s) => s
                        .add_export_with(&name, a.stack.top.clone(), req.read_only, access)
                        .map_err(|e| {
                            DataPlaneError::failed("add the NBD export", format!("{e:#}"))
                        }),
                    None => Err(DataPlaneError::ShuttingDown),
                };
                if added.is_err() {
                    if let (Some(t), Some(c)) = (&self.nbd_psk, &creds) {
                        t.remove(&c.psk_identity);
                    }
                }
                added.map(|()| {
                    let s = if creds.is_some() { "s" } else { "" };
                    // A Unix peer named by uid/gid connects without TLS.
                    let su = if peer.is_some() { "" } else { s };
                    let uris = self
                        .nbd_endpoints
                        .iter()
                        .map(|e| match e {
                            NbdEndpoint::Unix(p) => {
                                format!("nbd{su}+unix:///{name}?socket={}", p.display())
                            }
                            NbdEndpoint::Tcp(a) => format!("nbd{s}://{a}/{name}"),
                        })
                        .collect();
                    let psk_identity = creds.as_ref().map(|c| c.psk_identity.clone());
                    let ep = Endpoint::Nbd {
                        export: name.clone(),
                        uris,
                        credentials: creds,
                    };
                    (
                        Attachment::Nbd {
                            export: name,
                            psk_identity,
                        },
                        ep,
                    )
                })
            }
            Protocol::VhostUser => {
                let socket = vhost_socket(&self.vhost_dir, vid, &req.attachment_id);
                vhost::spawn(
                    a.stack.top.clone(),
                    &socket,
                    VhostConfig {
                        num_queues: VHOST_QUEUES,
                        read_only: req.read_only,
                        id: vid.clone(),
                    },
                )
                .map_err(|e| {
                    DataPlaneError::failed("start the vhost-user export", format!("{e:#}"))
                })
                .map(|export| {
                    let ep = Endpoint::VhostUser {
                        socket,
                        queues: VHOST_QUEUES,
                    };
                    (Attachment::Vhost { export }, ep)
                })
            }
        };
        match res {
            Ok((att, ep)) => {
                a.attachments.insert(req.attachment_id.clone(), att);
                tracing::info!(volume = %vid, attachment = %req.attachment_id,
                    protocol = req.protocol.as_str(), read_only = req.read_only, "attached");
                Ok(ep)
            }
            Err(e) => {
                if fresh && a.attachments.is_empty() {
                    vols.attached.remove(vid);
                    vols.forget_gate(vid);
                }
                Err(e)
            }
        }
    }

    fn detach(&self, volume_id: &str, attachment_id: &str) {
        let mut vols = lock(&self.volumes);
        let Some(a) = vols.attached.get_mut(volume_id) else {
            return;
        };
        let mut vhost_stop = None;
        match a.attachments.remove(attachment_id) {
            Some(Attachment::Nbd {
                export,
                psk_identity,
            }) => {
                // Revoke the key first (no new handshake succeeds), then remove the
                // export, which closes its connections (and so their TLS relays).
                if let (Some(t), Some(id)) = (&self.nbd_psk, &psk_identity) {
                    t.remove(id);
                }
                if let Some(s) = lock(&self.nbd).as_ref() {
                    s.remove_export(&export);
                }
            }
            // Stopped below, without holding the volumes lock.
            Some(Attachment::Vhost { export }) => vhost_stop = Some(export),
            None => {}
        }
        if a.attachments.is_empty() {
            vols.attached.remove(volume_id);
            vols.forget_gate(volume_id);
        }
        drop(vols);
        if let Some(export) = vhost_stop {
            // Disconnects the frontend, drains its queues, joins the threads and removes
            // the socket (bounded; see `VhostExport::stop`).
            export.stop();
        }
        tracing::info!(volume = %volume_id, attachment = %attachment_id, "detached");
    }
}

impl DataPlane for EmberDataPlane {
    fn stats(&self) -> DpFuture<'_, Vec<PoolStats>> {
        self.run(|i| i.stats())
    }

    fn inventory(&self, pool: String) -> DpFuture<'_, Vec<StoredObject>> {
        self.run(move |i| i.inventory(&pool))
    }

    fn create(&self, req: CreateVolume) -> DpFuture<'_, ()> {
        self.run(move |i| i.create(&req))
    }

    fn clone_volume(&self, req: CloneVolume) -> DpFuture<'_, ()> {
        self.run(move |i| i.clone_volume(&req))
    }

    fn snapshot(&self, req: SnapshotVolume) -> DpFuture<'_, ()> {
        self.run(move |i| i.copy(&req.volume, &req.snapshot).map(drop))
    }

    fn grow(&self, volume: ObjectRef, new_size: u64) -> DpFuture<'_, ()> {
        self.run(move |i| i.grow(&volume, new_size))
    }

    fn delete(&self, object: ObjectRef) -> DpFuture<'_, ()> {
        self.run(move |i| i.delete(&object))
    }

    fn attach(&self, req: AttachVolume) -> DpFuture<'_, Endpoint> {
        self.run(move |i| i.attach(&req))
    }

    fn detach(&self, volume: ObjectRef, attachment_id: String) -> DpFuture<'_, ()> {
        self.run(move |i| {
            i.detach(&volume.id, &attachment_id);
            Ok(())
        })
    }

    fn lun_pools(&self) -> DpFuture<'_, Vec<LunPoolInfo>> {
        let info = self.inner.lun_pools_info();
        Box::pin(async move { Ok(info) })
    }

    fn set_chap(&self, pool: String, chap: Option<ChapSecret>) -> DpFuture<'_, ()> {
        let r = self.inner.set_chap(&pool, chap);
        Box::pin(async move { r })
    }

    fn list_luns(&self, pool: String) -> DpFuture<'_, Vec<ManageableLun>> {
        self.run(move |i| i.list_luns(&pool))
    }

    fn manage(&self, req: ManageLun) -> DpFuture<'_, ManagedLun> {
        self.run(move |i| i.manage(&req))
    }

    fn unmanage(&self, volume: ObjectRef) -> DpFuture<'_, ()> {
        self.run(move |i| i.unmanage(&volume))
    }

    fn check_luns(&self) -> DpFuture<'_, Vec<LunHealth>> {
        self.run(|i| Ok(i.check_luns()))
    }
}

pub mod luns;
#[cfg(test)]
mod tests;
