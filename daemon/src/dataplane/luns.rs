//! The LUN pools of the data plane: [`LunPool`]s of the configuration (every LUN of an
//! iSCSI target, or host block devices by glob) and the volumes bound to their LUNs.
//!
//! - A binding (volume id → pool, LUN name, identity, size) lives in memory; the control
//!   plane records it and binds again ([`DataPlane::manage`] with the recorded identity)
//!   before it attaches or extends a volume, also after a restart. So the data plane
//!   needs no state of its own on disk, and every bind re-checks that the LUN is there
//!   and is the same LUN (VPD 0x83 designators and serial; `loop:<file>` for loop
//!   devices).
//! - A manage opens the LUN read-write: one login for an iSCSI LUN, bounded by the
//!   pool's login and command timeouts, so a dead target or a wrong CHAP secret is a
//!   clear [`DataPlaneError::LunUnavailable`] within seconds, never a hang. A host device
//!   the host holds (mounted, or claimed by another driver: `O_EXCL` answers `EBUSY`) is
//!   refused; so is a LUN another volume is bound to.
//! - LUKS on a LUN: the first manage of an encrypted volume formats the LUN, only when
//!   first [`BLANK_CHECK`] bytes (the most a LUKS1 or LUKS2 header of Ember's takes)
//!   are all zeros: a LUN with data there is refused, so a manage never destroys data.
//! - Nothing is ever allocated, resized or erased on the array: delete and unmanage
//!   drop the binding; grow takes the size the array gave the LUN (an attached device
//!   re-reads it: `BLKGETSIZE64`, or READ CAPACITY on a short iSCSI session) and fails
//!   with `NoSpace` while the LUN is smaller than asked.
//! - Listing ([`DataPlane::list_luns`]) is [`LunPool::scan`]: a discovery login and a
//!   probe login per LUN, each bounded.
//! - Health ([`DataPlane::check_luns`], every `--lun-health-secs`): the base device of
//!   every attached LUN volume is checked ([`BlockDevice::check`]: a short login with the
//!   identity check, or a read of the host device's first block) and asked for the fault
//!   its I/O path saw ([`BlockDevice::fault`]: the LUN gone, no session within the
//!   replacement timeout). [`HEALTH_PARALLEL`] volumes at a time, each bounded by its
//!   LUN's timeouts; the I/O path never waits for it.

use super::{chain, lock, Inner};
use ember_blockdev::backend::iscsi::chap::{ChapAlg, ChapCredentials};
use ember_blockdev::backend::scsi::LunIdentity;
use ember_blockdev::layer::crypt::DeviceDisk;
use ember_blockdev::pool::lun::{held_by_host, LunSource};
use ember_blockdev::pool::LunPool;
use ember_blockdev::{BlockDevice, OpenOptions};
use ember_control::dataplane::{
    ChapRef, ChapSecret, DataPlaneError, DpResult, LunHealth, LunPoolInfo, ManageLun,
    ManageableLun, ManagedLun, ObjectRef,
};
use ember_crypto::{Disk, Zeroizing};
use std::sync::Arc;

/// How many leading bytes of a LUN must be zeros before it is formatted as LUKS (a
/// LUKS2 header with its keyslots area is 16 MiB; LUKS1's is smaller).
pub const BLANK_CHECK: u64 = 16 << 20;
/// LUNs checked at once by the health check (each check is one bounded login or
/// device read, so a dead portal's login timeout is paid once per group, not per LUN).
pub const HEALTH_PARALLEL: usize = 8;
/// Bytes read at a time by the blank check.
const BLANK_CHUNK: usize = 1 << 20;

/// A LUN pool as the configuration gives it.
pub struct LunPoolSetup {
    /// The pool (its source checked).
    pub pool: LunPool,
    /// CHAP secrets of its logins, by id in the control plane's key store.
    pub chap: Option<ChapRef>,
    /// CHAP algorithms offered, preferred first.
    pub algorithms: Vec<ChapAlg>,
}

/// A configured LUN pool.
pub(super) struct LunEntry {
    pub(super) pool: LunPool,
    chap: Option<ChapRef>,
    algorithms: Vec<ChapAlg>,
}

impl From<LunPoolSetup> for LunEntry {
    fn from(s: LunPoolSetup) -> Self {
        LunEntry {
            pool: s.pool,
            chap: s.chap,
            algorithms: s.algorithms,
        }
    }
}

/// A volume bound to a LUN.
#[derive(Debug, Clone)]
pub(super) struct Binding {
    pub(super) pool: String,
    pub(super) lun: String,
    pub(super) identity: Option<String>,
    pub(super) size: u64,
}

fn unavailable(what: String, e: &dyn std::error::Error) -> DataPlaneError {
    DataPlaneError::LunUnavailable {
        what,
        reason: chain(e),
    }
}

fn identity_text(id: Option<LunIdentity>) -> Option<String> {
    id.filter(|i| !i.is_empty()).map(|i| i.to_string())
}

impl Inner {
    pub(super) fn lun_entry(&self, pool: &str) -> Option<&LunEntry> {
        self.lun_pools.iter().find(|e| e.pool.name() == pool)
    }

    pub(super) fn is_lun_pool(&self, pool: &str) -> bool {
        self.lun_entry(pool).is_some()
    }

    fn lun_entry_or(&self, pool: &str) -> DpResult<&LunEntry> {
        self.lun_entry(pool)
            .ok_or_else(|| DataPlaneError::NoPool(pool.to_string()))
    }

    pub(super) fn binding(&self, volume: &ObjectRef) -> Option<Binding> {
        lock(&self.bindings)
            .get(&volume.id)
            .filter(|b| b.pool == volume.pool)
            .cloned()
    }

    pub(super) fn unbind(&self, volume: &ObjectRef) {
        let gone = lock(&self.bindings).remove(&volume.id);
        if let Some(b) = gone {
            tracing::info!(volume = %volume.id, pool = %b.pool, lun = %b.lun, "LUN released (its bytes stay on the array)");
        }
    }

    pub(super) fn lun_pools_info(&self) -> Vec<LunPoolInfo> {
        self.lun_pools
            .iter()
            .map(|e| LunPoolInfo {
                name: e.pool.name().to_string(),
                chap: e.chap.clone(),
            })
            .collect()
    }

    pub(super) fn set_chap(&self, pool: &str, chap: Option<ChapSecret>) -> DpResult<()> {
        let e = self.lun_entry_or(pool)?;
        e.pool.set_chap(chap.map(|c| {
            ChapCredentials {
                user: c.user,
                secret: Zeroizing::new(c.secret.expose().to_vec()),
                target: c
                    .target
                    .map(|(u, s)| (u, Zeroizing::new(s.expose().to_vec()))),
                algorithms: e.algorithms.clone(),
            }
        }));
        Ok(())
    }

    pub(super) fn list_luns(&self, pool: &str) -> DpResult<Vec<ManageableLun>> {
        let e = self.lun_entry_or(pool)?;
        let found = e.pool.scan().map_err(|err| {
            tracing::warn!(pool, error = %chain(&err), "cannot list the LUN pool");
            unavailable(format!("LUN pool {pool}"), &err)
        })?;
        let bindings = lock(&self.bindings).clone();
        Ok(found
            .into_iter()
            .map(|l| {
                let identity = identity_text(l.identity.clone());
                let volume_id = bindings
                    .iter()
                    .find(|(_, b)| {
                        b.pool == pool
                            && (b.lun == l.name || (b.identity.is_some() && b.identity == identity))
                    })
                    .map(|(v, _)| v.clone());
                ManageableLun {
                    pool: pool.to_string(),
                    name: l.name,
                    size: l.size,
                    identity,
                    vendor: l.vendor,
                    product: l.product,
                    paths: l.paths,
                    volume_id,
                    unusable: l.unusable,
                }
            })
            .collect())
    }

    /// Open LUN `name` of `e` read-write and learn its identity; a host device whose
    /// path is gone is looked for by `identity` under its other paths.
    fn open_lun(
        &self,
        e: &LunEntry,
        name: &str,
        identity: Option<&str>,
    ) -> DpResult<(String, Arc<dyn BlockDevice>, Option<String>)> {
        let what = |n: &str| format!("LUN {n} of pool {}", e.pool.name());
        let opts = OpenOptions::default();
        let (name, dev) = match e.pool.open(name, &opts) {
            Ok(d) => (name.to_string(), d),
            Err(err) => {
                // A device path that moved: find the LUN by its identity.
                let moved =
                    match (e.pool.source(), identity) {
                        (LunSource::Devices { .. }, Some(want)) => {
                            e.pool.scan().ok().into_iter().flatten().find(|l| {
                                identity_text(l.identity.clone()).as_deref() == Some(want)
                            })
                        }
                        _ => None,
                    };
                let Some(l) = moved else {
                    return Err(unavailable(what(name), &err));
                };
                tracing::warn!(pool = %e.pool.name(), old = name, new = %l.name, "the LUN moved to another path");
                let d = e
                    .pool
                    .open(&l.name, &opts)
                    .map_err(|err| unavailable(what(&l.name), &err))?;
                (l.name, d)
            }
        };
        let got = identity_text(e.pool.identity_of(dev.as_ref(), &name));
        if let Some(want) = identity {
            if got.as_deref() != Some(want) {
                return Err(DataPlaneError::LunUnavailable {
                    what: what(&name),
                    reason: format!(
                        "it reports identity {}, not {want} (the LUN managed as this volume)",
                        got.as_deref().unwrap_or("none")
                    ),
                });
            }
        }
        Ok((name, dev, got))
    }

    /// Open the LUN a bound volume is on (attach).
    pub(super) fn open_bound(
        &self,
        volume: &ObjectRef,
        b: &Binding,
    ) -> DpResult<Arc<dyn BlockDevice>> {
        let e = self.lun_entry_or(&volume.pool)?;
        let (_, dev, _) = self.open_lun(e, &b.lun, b.identity.as_deref())?;
        Ok(dev)
    }

    pub(super) fn manage(&self, req: &ManageLun) -> DpResult<ManagedLun> {
        self.check_running()?;
        let pool = &req.volume.pool;
        let e = self.lun_entry_or(pool)?;
        let first = req.identity.is_none();
        if first {
            if let LunSource::Devices { .. } = e.pool.source() {
                if held_by_host(std::path::Path::new(&req.lun)) {
                    return Err(DataPlaneError::LunUnavailable {
                        what: format!("LUN {} of pool {pool}", req.lun),
                        reason: "in use by the host (mounted, or held by another driver)".into(),
                    });
                }
            }
        }
        let (name, dev, identity) = self.open_lun(e, &req.lun, req.identity.as_deref())?;
        let size = dev.info().size;
        {
            let b = lock(&self.bindings);
            let other = b.iter().find(|(v, x)| {
                **v != req.volume.id
                    && x.pool == *pool
                    && (x.lun == name || (x.identity.is_some() && x.identity == identity))
            });
            if let Some((v, _)) = other {
                return Err(DataPlaneError::AlreadyExists(format!(
                    "LUN {name} of pool {pool} (bound to volume {v})"
                )));
            }
        }
        if let Some(f) = &req.luks {
            let mut disk =
                DeviceDisk::new(dev).map_err(|err| unavailable(format!("LUN {name}"), &err))?;
            let end = size.min(BLANK_CHECK);
            let mut buf = vec![0u8; BLANK_CHUNK];
            let mut off = 0u64;
            while off < end {
                let n = usize::try_from((end - off).min(BLANK_CHUNK as u64)).unwrap_or(BLANK_CHUNK);
                disk.read_at(off, &mut buf[..n])
                    .map_err(|err| unavailable(format!("LUN {name}"), &err))?;
                if buf[..n].iter().any(|&b| b != 0) {
                    return Err(DataPlaneError::Invalid(format!(
                        "LUN {name} of pool {pool} holds data (its first {} MiB, where the LUKS header \
                         would go, are not blank): formatting it as an encrypted volume would destroy it; \
                         use a blank LUN or a type without encryption",
                        BLANK_CHECK >> 20
                    )));
                }
                off += n as u64;
            }
            self.luks_format_disk(disk, f)?;
            tracing::info!(volume = %req.volume.id, lun = %name, "LUN formatted as LUKS");
        }
        lock(&self.bindings).insert(
            req.volume.id.clone(),
            Binding {
                pool: pool.clone(),
                lun: name.clone(),
                identity: identity.clone(),
                size,
            },
        );
        tracing::info!(volume = %req.volume.id, pool = %pool, lun = %name, size, identity = ?identity, "volume bound to its LUN");
        Ok(ManagedLun {
            lun: name,
            size,
            identity,
        })
    }

    pub(super) fn unmanage(&self, volume: &ObjectRef) -> DpResult<()> {
        if lock(&self.volumes).attached.contains_key(&volume.id) {
            return Err(DataPlaneError::Invalid(format!(
                "{volume} is attached: detach it before it is unmanaged"
            )));
        }
        self.unbind(volume);
        Ok(())
    }

    /// Grow a LUN volume to `new_size`: the array grew the LUN; an attached device
    /// re-reads its size, an unattached LUN is opened to read it.
    pub(super) fn grow_lun(&self, volume: &ObjectRef, b: &Binding, new_size: u64) -> DpResult<()> {
        let base = lock(&self.volumes)
            .attached
            .get(&volume.id)
            .map(|a| a.stack.base.clone());
        let no_space = |free: u64| DataPlaneError::NoSpace {
            pool: volume.pool.clone(),
            need: new_size,
            free,
        };
        match base {
            Some(dev) => dev.resize(new_size).map_err(|err| {
                if err.kind() == ember_blockdev::ErrorKind::NoSpace {
                    no_space(dev.info().size)
                } else {
                    unavailable(format!("LUN {} of pool {}", b.lun, volume.pool), &err)
                }
            })?,
            None => {
                let size = self.open_bound(volume, b)?.info().size;
                if size < new_size {
                    return Err(no_space(size));
                }
            }
        }
        if let Some(x) = lock(&self.bindings).get_mut(&volume.id) {
            x.size = new_size;
        }
        Ok(())
    }

    /// The health check of every attached LUN volume (see the module doc), at most
    /// [`HEALTH_PARALLEL`] at a time.
    pub(super) fn check_luns(&self) -> Vec<LunHealth> {
        let attached: Vec<(String, Arc<dyn BlockDevice>)> = lock(&self.volumes)
            .attached
            .iter()
            .map(|(id, a)| (id.clone(), a.stack.base.clone()))
            .collect();
        let bound: Vec<(ObjectRef, Arc<dyn BlockDevice>)> = {
            let b = lock(&self.bindings);
            attached
                .into_iter()
                .filter_map(|(id, base)| {
                    let pool = b.get(&id)?.pool.clone();
                    Some((ObjectRef::volume(pool, id), base))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(bound.len());
        for group in bound.chunks(HEALTH_PARALLEL) {
            std::thread::scope(|s| {
                let running: Vec<_> = group
                    .iter()
                    .map(|(volume, base)| {
                        s.spawn(move || LunHealth {
                            volume: volume.clone(),
                            fault: match base.check() {
                                Err(e) => Some(chain(&e)),
                                Ok(()) => base.fault(),
                            },
                        })
                    })
                    .collect();
                out.extend(running.into_iter().filter_map(|h| h.join().ok()));
            });
        }
        out
    }

    /// Statistics of the LUN pools: the bytes of their last scan, none free (nothing
    /// is allocated from them), the bound volumes' sizes.
    pub(super) fn lun_stats(&self) -> Vec<ember_control::dataplane::PoolStats> {
        let b = lock(&self.bindings);
        self.lun_pools
            .iter()
            .map(|e| {
                let name = e.pool.name();
                let provisioned = b
                    .values()
                    .filter(|x| x.pool == name)
                    .map(|x| x.size)
                    .fold(0u64, u64::saturating_add);
                ember_control::dataplane::PoolStats {
                    name: name.to_string(),
                    total_bytes: e.pool.last_scan().1.max(provisioned),
                    free_bytes: 0,
                    provisioned_bytes: provisioned,
                }
            })
            .collect()
    }

    /// The bound volumes of a LUN pool, as its objects.
    pub(super) fn lun_inventory(&self, pool: &str) -> Vec<ember_control::dataplane::StoredObject> {
        lock(&self.bindings)
            .iter()
            .filter(|(_, b)| b.pool == pool)
            .map(|(v, b)| ember_control::dataplane::StoredObject {
                object: ObjectRef::volume(pool, v),
                size: b.size,
                partial: false,
            })
            .collect()
    }
}
