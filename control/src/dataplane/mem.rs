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

use super::{
    AttachVolume, CloneVolume, CreateVolume, DataPlane, DataPlaneError, DpFuture, DpResult,
    Endpoint, LuksVersion, ObjectKind, ObjectRef, Passphrase, PoolStats, Protocol, QosLimits,
    SnapshotVolume, StoredObject,
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
}
