//! [`MemDataPlane`]: the [`DataPlane`] in memory, for the control plane's in-process
//! tests (this crate's unit tests, and its `tests/` with feature `test-utils`).
//!
//! Pools have a capacity and hold objects (a size, a `partial` flag, the LUKS
//! parameters and passphrase they were formatted with); attachments are recorded by
//! volume and attachment id. It keeps the real one's contract: `NoSpace` before
//! anything is allocated, a wrong passphrase is `Unlock`, delete and detach are
//! idempotent. No bytes are stored: what the bytes hold is the end-to-end tests' job.
//!
//! For races and failures a test can make the next call of an operation fail
//! ([`MemDataPlane::fail_next`]) or stop at its start until released
//! ([`MemDataPlane::hold`], which also tells when the call got there), and can put
//! objects in a pool behind the control plane's back ([`MemDataPlane::put_object`]: a
//! leftover, or another node's volume on a shared pool).
//!
//! LUN pools ([`MemDataPlane::with_lun_pool`]) hold LUNs a test puts, grows and removes
//! ([`MemDataPlane::put_lun`], [`MemDataPlane::remove_lun`]); a pool can require CHAP
//! credentials ([`MemDataPlane::require_chap`]): logins with others are refused as a
//! target would. A bound volume is an object of the pool (attach and detach as usual);
//! it grows up to its LUN's size; delete and unmanage release the LUN. The health check
//! ([`DataPlane::check_luns`]) reports an attached volume whose LUN was removed as
//! faulted, and healthy once it is put back.

use super::{
    AttachVolume, ChapRef, ChapSecret, CloneVolume, CreateVolume, DataPlane, DataPlaneError,
    DpFuture, DpResult, Endpoint, LuksVersion, LunPoolInfo, ManageLun, ManageableLun, ManagedLun,
    ObjectKind, ObjectRef, Passphrase, PoolStats, Protocol, QosLimits, SnapshotVolume,
    StoredObject,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, Semaphore};

/// The operations of [`DataPlane`], to aim failures and holds at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// [`DataPlane::stats`]
    Stats,
    /// [`DataPlane::inventory`]
    Inventory,
    /// [`DataPlane::create`]
    Create,
    /// [`DataPlane::clone_volume`]
    Clone,
    /// [`DataPlane::snapshot`]
    Snapshot,
    /// [`DataPlane::grow`]
    Grow,
    /// [`DataPlane::delete`]
    Delete,
    /// [`DataPlane::attach`]
    Attach,
    /// [`DataPlane::detach`]
    Detach,
    /// [`DataPlane::list_luns`]
    ListLuns,
    /// [`DataPlane::manage`]
    Manage,
    /// [`DataPlane::unmanage`]
    Unmanage,
}

/// One LUN of a LUN pool.
#[derive(Debug, Clone)]
struct MemLun {
    size: u64,
    identity: Option<String>,
    /// Its first 16 MiB are zeros (a LUKS format is allowed).
    blank: bool,
}

#[derive(Default)]
struct LunPool {
    luns: BTreeMap<String, MemLun>,
    chap: Option<ChapRef>,
    /// Logins need these (user, secret).
    required: Option<(String, Vec<u8>)>,
    /// What the control plane gave.
    given: Option<(String, Vec<u8>)>,
    /// Volume id → LUN name.
    bound: BTreeMap<String, String>,
}

impl LunPool {
    /// A login as the target would answer it.
    fn login(&self, pool: &str) -> DpResult<()> {
        match &self.required {
            Some(r) if self.given.as_ref() != Some(r) => Err(DataPlaneError::LunUnavailable {
                what: format!("the target of LUN pool {pool}"),
                reason: "login refused: CHAP authentication failed".into(),
            }),
            _ => Ok(()),
        }
    }
}

#[derive(Clone)]
struct Obj {
    size: u64,
    partial: bool,
    luks: Option<(LuksVersion, u32, Passphrase)>,
}

#[derive(Default)]
struct Pool {
    capacity: u64,
    objects: BTreeMap<(ObjectKind, String), Obj>,
}

impl Pool {
    fn used(&self) -> u64 {
        self.objects.values().map(|o| o.size).sum()
    }
    fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }
}

struct HoldInner {
    entered: Notify,
    release: Semaphore,
}

/// An operation stopped at its start by [`MemDataPlane::hold`]. Dropping the handle
/// releases it too, so a failing test never leaves a call hanging.
pub struct Hold(Arc<HoldInner>);

impl Hold {
    /// Wait until the held call has started (and is now waiting).
    pub async fn entered(&self) {
        self.0.entered.notified().await;
    }

    /// Let the held call go on.
    pub fn release(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.release.add_permits(1);
    }
}

#[derive(Default)]
struct State {
    pools: BTreeMap<String, Pool>,
    /// (volume id, attachment id) → protocol, read-only.
    attachments: BTreeMap<(String, String), (Protocol, bool)>,
    /// Attachment id → the QoS limits it was attached with.
    qos: BTreeMap<String, QosLimits>,
    lun_pools: BTreeMap<String, LunPool>,
    failures: Vec<(Op, DataPlaneError)>,
    holds: Vec<(Op, Arc<HoldInner>)>,
    calls: Vec<Op>,
}

/// The in-memory data plane.
#[derive(Default)]
pub struct MemDataPlane {
    state: Mutex<State>,
}

impl MemDataPlane {
    /// No pools (a create answers "no storage pool").
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a pool of `capacity` bytes.
    pub fn with_pool(self, name: &str, capacity: u64) -> Self {
        self.lock().pools.insert(
            name.to_string(),
            Pool {
                capacity,
                ..Pool::default()
            },
        );
        self
    }

    /// Add a LUN pool (no LUNs yet) whose logins use `chap` from the key store.
    pub fn with_lun_pool(self, name: &str, chap: Option<ChapRef>) -> Self {
        {
            let mut s = self.lock();
            s.pools.insert(name.to_string(), Pool::default());
            s.lun_pools.insert(
                name.to_string(),
                LunPool {
                    chap,
                    ..LunPool::default()
                },
            );
        }
        self
    }

    /// Put (or replace: grow, re-identify) LUN `lun` of `pool`; `blank`: its first 16 MiB
    /// is zeros.
    pub fn put_lun(&self, pool: &str, lun: &str, size: u64, identity: Option<&str>, blank: bool) {
        if let Some(p) = self.lock().lun_pools.get_mut(pool) {
            p.luns.insert(
                lun.to_string(),
                MemLun {
                    size,
                    identity: identity.map(str::to_string),
                    blank,
                },
            );
        }
    }

    /// Remove LUN `lun` of `pool` (the array deleted or unmapped it).
    pub fn remove_lun(&self, pool: &str, lun: &str) {
        if let Some(p) = self.lock().lun_pools.get_mut(pool) {
            p.luns.remove(lun);
        }
    }

    /// Name other CHAP secrets (by id) for `pool`'s logins (the configuration changed).
    pub fn set_lun_chap(&self, pool: &str, chap: Option<ChapRef>) {
        if let Some(p) = self.lock().lun_pools.get_mut(pool) {
            p.chap = chap;
        }
    }

    /// Logins to `pool`'s target need CHAP user `user` with `secret`.
    pub fn require_chap(&self, pool: &str, user: &str, secret: &[u8]) {
        if let Some(p) = self.lock().lun_pools.get_mut(pool) {
            p.required = Some((user.to_string(), secret.to_vec()));
        }
    }

    /// The LUN volume `volume_id` is bound to in `pool`, if any.
    pub fn bound_lun(&self, pool: &str, volume_id: &str) -> Option<String> {
        self.lock()
            .lun_pools
            .get(pool)?
            .bound
            .get(volume_id)
            .cloned()
    }

    fn manage_sync(&self, req: ManageLun) -> DpResult<ManagedLun> {
        let mut s = self.lock();
        let pool_name = req.volume.pool.clone();
        let lp = s
            .lun_pools
            .get_mut(&pool_name)
            .ok_or_else(|| DataPlaneError::NoPool(pool_name.clone()))?;
        lp.login(&pool_name)?;
        let lun = lp
            .luns
            .get(&req.lun)
            .cloned()
            .ok_or_else(|| DataPlaneError::LunUnavailable {
                what: format!("LUN {} of pool {pool_name}", req.lun),
                reason: "the LUN does not exist".into(),
            })?;
        if let (Some(want), got) = (&req.identity, &lun.identity) {
            if got.as_ref() != Some(want) {
                return Err(DataPlaneError::LunUnavailable {
                    what: format!("LUN {} of pool {pool_name}", req.lun),
                    reason: format!("it is now {got:?}, not the LUN {want} that was managed"),
                });
            }
        }
        if let Some((v, _)) = lp
            .bound
            .iter()
            .find(|(v, l)| **l == req.lun && **v != req.volume.id)
        {
            return Err(DataPlaneError::AlreadyExists(format!(
                "LUN {} of pool {pool_name} (bound to volume {v})",
                req.lun
            )));
        }
        if req.luks.is_some() && !lun.blank {
            return Err(DataPlaneError::Invalid(format!(
                "LUN {} of pool {pool_name} holds data: it is not formatted as an encrypted volume",
                req.lun
            )));
        }
        lp.bound.insert(req.volume.id.clone(), req.lun.clone());
        let pool = pool_mut(&mut s, &pool_name)?;
        let key = (ObjectKind::Volume, req.volume.id.clone());
        let luks = req
            .luks
            .map(|f| (f.version, f.key_bits, f.passphrase))
            .or_else(|| pool.objects.get(&key).and_then(|o| o.luks.clone()));
        let size = pool.objects.get(&key).map_or(lun.size, |o| o.size);
        pool.objects.insert(
            key,
            Obj {
                size,
                partial: false,
                luks,
            },
        );
        Ok(ManagedLun {
            lun: req.lun,
            size: lun.size,
            identity: lun.identity,
        })
    }

    /// Release the LUN of `volume` (and its object).
    fn unbind_sync(&self, volume: &ObjectRef) {
        let mut s = self.lock();
        if let Some(lp) = s.lun_pools.get_mut(&volume.pool) {
            lp.bound.remove(&volume.id);
        }
        if let Some(p) = s.pools.get_mut(&volume.pool) {
            p.objects.remove(&(volume.kind, volume.id.clone()));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next call of `op` fails with `error` (after any hold).
    pub fn fail_next(&self, op: Op, error: DataPlaneError) {
        self.lock().failures.push((op, error));
    }

    /// The next call of `op` stops at its start until the returned handle is released
    /// (or dropped).
    pub fn hold(&self, op: Op) -> Hold {
        let h = Arc::new(HoldInner {
            entered: Notify::new(),
            release: Semaphore::new(0),
        });
        self.lock().holds.push((op, h.clone()));
        Hold(h)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Op> {
        self.lock().calls.clone()
    }

    /// Every object of every pool.
    pub fn objects(&self) -> Vec<StoredObject> {
        let s = self.lock();
        let mut out = Vec::new();
        for (pool, p) in &s.pools {
            for ((kind, id), o) in &p.objects {
                out.push(StoredObject {
                    object: ObjectRef {
                        pool: pool.clone(),
                        kind: *kind,
                        id: id.clone(),
                    },
                    size: o.size,
                    partial: o.partial,
                });
            }
        }
        out
    }

    /// Size of an object, if it exists.
    pub fn size_of(&self, o: &ObjectRef) -> Option<u64> {
        self.with_obj(o, |x| x.size)
    }

    /// LUKS version and key bits of an object, if it was formatted.
    pub fn luks_of(&self, o: &ObjectRef) -> Option<(LuksVersion, u32)> {
        self.with_obj(o, |x| x.luks.as_ref().map(|(v, b, _)| (*v, *b)))
            .flatten()
    }

    /// Does `passphrase` open the object's LUKS header?
    pub fn opens_with(&self, o: &ObjectRef, passphrase: &[u8]) -> bool {
        self.with_obj(o, |x| {
            x.luks
                .as_ref()
                .is_some_and(|(_, _, p)| p.expose() == passphrase)
        })
        .unwrap_or(false)
    }

    /// Live attachments: (volume id, attachment id, protocol, read-only).
    pub fn attachments(&self) -> Vec<(String, String, Protocol, bool)> {
        self.lock()
            .attachments
            .iter()
            .map(|((v, a), (p, ro))| (v.clone(), a.clone(), *p, *ro))
            .collect()
    }

    /// What a process restart does to the front ends: every attachment is gone (the
    /// objects stay).
    pub fn forget_attachments(&self) {
        let mut s = self.lock();
        s.attachments.clear();
        s.qos.clear();
    }

    /// The QoS limits attachment `attachment_id` was made with.
    pub fn qos_of(&self, attachment_id: &str) -> Option<QosLimits> {
        self.lock().qos.get(attachment_id).copied()
    }

    /// Put an object in a pool without the control plane (a leftover, or another
    /// node's object on a shared pool).
    pub fn put_object(&self, o: &StoredObject) {
        let mut s = self.lock();
        let pool = s.pools.entry(o.object.pool.clone()).or_default();
        pool.objects.insert(
            (o.object.kind, o.object.id.clone()),
            Obj {
                size: o.size,
                partial: o.partial,
                luks: None,
            },
        );
    }

    fn with_obj<T>(&self, o: &ObjectRef, f: impl FnOnce(&Obj) -> T) -> Option<T> {
        let s = self.lock();
        s.pools
            .get(&o.pool)?
            .objects
            .get(&(o.kind, o.id.clone()))
            .map(f)
    }

    /// Record the call, wait out a hold, return an injected failure.
    async fn checkpoint(&self, op: Op) -> DpResult<()> {
        let (hold, fail) = {
            let mut s = self.lock();
            s.calls.push(op);
            let hold = s
                .holds
                .iter()
                .position(|(o, _)| *o == op)
                .map(|i| s.holds.remove(i).1);
            let fail = s
                .failures
                .iter()
                .position(|(o, _)| *o == op)
                .map(|i| s.failures.remove(i).1);
            (hold, fail)
        };
        if let Some(h) = hold {
            h.entered.notify_one();
            if let Ok(p) = h.release.acquire().await {
                p.forget();
            }
        }
        match fail {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn create_sync(&self, req: CreateVolume) -> DpResult<()> {
        if let Some(f) = &req.luks {
            if f.key_bits != 256 && f.key_bits != 512 {
                return Err(DataPlaneError::Invalid(format!(
                    "LUKS key size {} bits",
                    f.key_bits
                )));
            }
        }
        let mut s = self.lock();
        let pool = pool_mut(&mut s, &req.volume.pool)?;
        let key = (req.volume.kind, req.volume.id.clone());
        if pool.objects.contains_key(&key) {
            return Err(DataPlaneError::AlreadyExists(req.volume.to_string()));
        }
        check_space(pool, &req.volume.pool, req.size)?;
        pool.objects.insert(
            key,
            Obj {
                size: req.size,
                partial: false,
                luks: req.luks.map(|f| (f.version, f.key_bits, f.passphrase)),
            },
        );
        Ok(())
    }

    /// A copy of `source` as `target` of at least `size` bytes, rekeyed if asked.
    fn copy_sync(
        &self,
        source: &ObjectRef,
        target: &ObjectRef,
        size: u64,
        rekey: Option<super::Rekey>,
    ) -> DpResult<()> {
        if source.pool != target.pool {
            return Err(DataPlaneError::Invalid(format!(
                "{source} and {target} are in different pools"
            )));
        }
        let mut s = self.lock();
        let pool = pool_mut(&mut s, &source.pool)?;
        let src = pool
            .objects
            .get(&(source.kind, source.id.clone()))
            .filter(|o| !o.partial)
            .cloned()
            .ok_or_else(|| DataPlaneError::NotFound(source.to_string()))?;
        let key = (target.kind, target.id.clone());
        if pool.objects.contains_key(&key) {
            return Err(DataPlaneError::AlreadyExists(target.to_string()));
        }
        let size = size.max(src.size);
        check_space(pool, &source.pool, size)?;
        let mut copy = Obj { size, ..src };
        if let Some(r) = rekey {
            match &mut copy.luks {
                Some((_, _, p)) if p.expose() == r.old.expose() => *p = r.new,
                _ => {
                    return Err(DataPlaneError::Unlock {
                        what: source.to_string(),
                        detail: "no keyslot opens with the passphrase".into(),
                    })
                }
            }
        }
        pool.objects.insert(key, copy);
        Ok(())
    }

    fn grow_sync(&self, volume: &ObjectRef, new_size: u64) -> DpResult<()> {
        let mut s = self.lock();
        if let Some(lp) = s.lun_pools.get(&volume.pool) {
            lp.login(&volume.pool)?;
            let lun = lp
                .bound
                .get(&volume.id)
                .and_then(|l| lp.luns.get(l))
                .map(|l| l.size)
                .ok_or_else(|| DataPlaneError::NotFound(volume.to_string()))?;
            if new_size > lun {
                return Err(DataPlaneError::NoSpace {
                    pool: volume.pool.clone(),
                    need: new_size,
                    free: lun,
                });
            }
            let pool = pool_mut(&mut s, &volume.pool)?;
            if let Some(o) = pool.objects.get_mut(&(volume.kind, volume.id.clone())) {
                o.size = new_size;
            }
            return Ok(());
        }
        let pool = pool_mut(&mut s, &volume.pool)?;
        let size = pool
            .objects
            .get(&(volume.kind, volume.id.clone()))
            .map(|o| o.size)
            .ok_or_else(|| DataPlaneError::NotFound(volume.to_string()))?;
        if new_size < size {
            return Err(DataPlaneError::Invalid(format!("{volume} cannot shrink")));
        }
        check_space(pool, &volume.pool, new_size - size)?;
        if let Some(o) = pool.objects.get_mut(&(volume.kind, volume.id.clone())) {
            o.size = new_size;
        }
        Ok(())
    }

    fn attach_sync(&self, req: AttachVolume) -> DpResult<Endpoint> {
        let mut s = self.lock();
        let pool = pool_mut(&mut s, &req.volume.pool)?;
        let obj = pool
            .objects
            .get(&(req.volume.kind, req.volume.id.clone()))
            .ok_or_else(|| DataPlaneError::NotFound(req.volume.to_string()))?;
        let opens = match (&obj.luks, &req.passphrase) {
            (None, None) => true,
            (Some((_, _, want)), Some(p)) => want.expose() == p.expose(),
            _ => false,
        };
        if !opens {
            return Err(DataPlaneError::Unlock {
                what: req.volume.to_string(),
                detail: "the passphrase does not open the volume".into(),
            });
        }
        let key = (req.volume.id.clone(), req.attachment_id.clone());
        if s.attachments.contains_key(&key) {
            return Err(DataPlaneError::AlreadyExists(format!(
                "attachment {}",
                req.attachment_id
            )));
        }
        s.attachments.insert(key, (req.protocol, req.read_only));
        s.qos.insert(req.attachment_id.clone(), req.qos);
        let name = format!("{}-{}", req.volume.id, req.attachment_id);
        Ok(match req.protocol {
            Protocol::Nbd => Endpoint::Nbd {
                uris: vec![format!("nbd+unix:///{name}?socket=/mem/nbd.sock")],
                export: name,
                credentials: None,
            },
            Protocol::VhostUser => Endpoint::VhostUser {
                socket: PathBuf::from(format!("/mem/vhost/{name}.sock")),
                queues: 2,
            },
        })
    }
}

fn pool_mut<'a>(s: &'a mut State, name: &str) -> DpResult<&'a mut Pool> {
    s.pools
        .get_mut(name)
        .ok_or_else(|| DataPlaneError::NoPool(name.to_string()))
}

fn check_space(pool: &Pool, name: &str, need: u64) -> DpResult<()> {
    let free = pool.free();
    if need > free {
        return Err(DataPlaneError::NoSpace {
            pool: name.to_string(),
            need,
            free,
        });
    }
    Ok(())
}

impl DataPlane for MemDataPlane {
    fn stats(&self) -> DpFuture<'_, Vec<PoolStats>> {
        Box::pin(async move {
            self.checkpoint(Op::Stats).await?;
            let s = self.lock();
            Ok(s.pools
                .iter()
                .map(|(name, p)| PoolStats {
                    name: name.clone(),
                    total_bytes: p.capacity,
                    free_bytes: p.free(),
                    provisioned_bytes: p.used(),
                })
                .collect())
        })
    }

    fn inventory(&self, pool: String) -> DpFuture<'_, Vec<StoredObject>> {
        Box::pin(async move {
            self.checkpoint(Op::Inventory).await?;
            if !self.lock().pools.contains_key(&pool) {
                return Err(DataPlaneError::NoPool(pool));
            }
            Ok(self
                .objects()
                .into_iter()
                .filter(|o| o.object.pool == pool)
                .collect())
        })
    }

    fn create(&self, req: CreateVolume) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Create).await?;
            self.create_sync(req)
        })
    }

    fn clone_volume(&self, req: CloneVolume) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Clone).await?;
            self.copy_sync(&req.source, &req.volume, req.size, req.rekey)
        })
    }

    fn snapshot(&self, req: SnapshotVolume) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Snapshot).await?;
            self.copy_sync(&req.volume, &req.snapshot, 0, None)
        })
    }

    fn grow(&self, volume: ObjectRef, new_size: u64) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Grow).await?;
            self.grow_sync(&volume, new_size)
        })
    }

    fn delete(&self, object: ObjectRef) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Delete).await?;
            let mut s = self.lock();
            if let Some(lp) = s.lun_pools.get_mut(&object.pool) {
                lp.bound.remove(&object.id);
            }
            let pool = pool_mut(&mut s, &object.pool)?;
            pool.objects.remove(&(object.kind, object.id.clone()));
            Ok(())
        })
    }

    fn attach(&self, req: AttachVolume) -> DpFuture<'_, Endpoint> {
        Box::pin(async move {
            self.checkpoint(Op::Attach).await?;
            self.attach_sync(req)
        })
    }

    fn detach(&self, volume: ObjectRef, attachment_id: String) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Detach).await?;
            self.lock().attachments.remove(&(volume.id, attachment_id));
            Ok(())
        })
    }

    fn lun_pools(&self) -> DpFuture<'_, Vec<LunPoolInfo>> {
        Box::pin(async move {
            Ok(self
                .lock()
                .lun_pools
                .iter()
                .map(|(name, p)| LunPoolInfo {
                    name: name.clone(),
                    chap: p.chap.clone(),
                })
                .collect())
        })
    }

    fn set_chap(&self, pool: String, chap: Option<ChapSecret>) -> DpFuture<'_, ()> {
        Box::pin(async move {
            let mut s = self.lock();
            let p = s
                .lun_pools
                .get_mut(&pool)
                .ok_or(DataPlaneError::NoPool(pool))?;
            p.given = chap.map(|c| (c.user, c.secret.expose().to_vec()));
            Ok(())
        })
    }

    fn list_luns(&self, pool: String) -> DpFuture<'_, Vec<ManageableLun>> {
        Box::pin(async move {
            self.checkpoint(Op::ListLuns).await?;
            let s = self.lock();
            let p = s
                .lun_pools
                .get(&pool)
                .ok_or_else(|| DataPlaneError::NoPool(pool.clone()))?;
            p.login(&pool)?;
            Ok(p.luns
                .iter()
                .map(|(name, l)| ManageableLun {
                    pool: pool.clone(),
                    name: name.clone(),
                    size: l.size,
                    identity: l.identity.clone(),
                    vendor: Some("MEM".into()),
                    product: Some("LUN".into()),
                    paths: vec![format!("mem://{pool}/{name}")],
                    volume_id: p
                        .bound
                        .iter()
                        .find(|(_, b)| *b == name)
                        .map(|(v, _)| v.clone()),
                    unusable: None,
                })
                .collect())
        })
    }

    fn manage(&self, req: ManageLun) -> DpFuture<'_, ManagedLun> {
        Box::pin(async move {
            self.checkpoint(Op::Manage).await?;
            self.manage_sync(req)
        })
    }

    fn unmanage(&self, volume: ObjectRef) -> DpFuture<'_, ()> {
        Box::pin(async move {
            self.checkpoint(Op::Unmanage).await?;
            self.unbind_sync(&volume);
            Ok(())
        })
    }

    /// An attached LUN volume whose LUN the test removed ([`MemDataPlane::remove_lun`])
    /// is faulted; put back, it serves again.
    fn check_luns(&self) -> DpFuture<'_, Vec<super::LunHealth>> {
        let s = self.lock();
        let mut out = Vec::new();
        for (pool, lp) in &s.lun_pools {
            for (vol, lun) in &lp.bound {
                if !s.attachments.keys().any(|(v, _)| v == vol) {
                    continue;
                }
                out.push(super::LunHealth {
                    volume: ObjectRef::volume(pool.clone(), vol.clone()),
                    fault: (!lp.luns.contains_key(lun))
                        .then(|| format!("LUN {lun} of pool {pool} is gone from the array")),
                });
            }
        }
        Box::pin(async move { Ok(out) })
    }
}
