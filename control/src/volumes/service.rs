//! The volumes service: what every volume and snapshot operation does, in order,
//! between the database, the locks, the keys and the data plane. No HTTP here (the
//! handlers parse and render); no SQL here (that is [`super::rows`]).
//!
//! - **Create and clone** answer once the request is validated, the space checked, the
//!   key settled and the source locked **shared**: the row is inserted `creating` and
//!   the bytes are made in a background task ([`DataPlane::create`] or
//!   [`DataPlane::clone_volume`], LUKS format or rekey included) that ends the volume
//!   `available` or `error` and releases the lock.
//! - **Snapshots** likewise (shared lock on the volume, background
//!   [`DataPlane::snapshot`]); an in-use volume needs `force` and is copied at one
//!   instant (the data plane pauses its writes).
//! - **Delete and extend** run in the request: they take the object's lock
//!   **exclusive**, waiting (as a recorded writer, so new clones queue behind them) up
//!   to [`crate::locks::Locks::operation_wait`] (a minute), then answer 409 with
//!   `Retry-After`. A delete first moves the
//!   status to `deleting` (compare-and-swap), so new clones are refused at once.
//! - **Attach** asks the data plane for an [`Endpoint`], renders `connection_info`,
//!   and records the attachment together with the move to `in-use` in one
//!   transaction; if the volume changed status meanwhile (a delete won), the data-plane
//!   attachment is undone and the caller told 409.
//! - Keys: a volume of an encrypted type gets a fresh key it owns (deleted with it),
//!   unless the caller names one of its own secrets, checked against the type
//!   ([`keys::check_volume_key`]). A clone, or a volume made from a snapshot, gets its
//!   own new key: the copied LUKS header gets a keyslot for the new passphrase and
//!   loses the old one. A snapshot keeps a copy of its volume's key.
//!
//! Every status move is an [`Event`] of [`super::status`].

use super::rows::{self, AttachStatus, Attachment, Flag, NewAttachment, Snap, Stored, Vol};
use super::status::{Event, SnapshotUse, Status, VolumeUse};
use super::views::{self, GIB};
use crate::api::check_len;
use crate::auth::Ctx;
#[cfg(doc)]
use crate::dataplane::DataPlane;
use crate::dataplane::{
    AttachVolume, CloneVolume, CreateVolume, DataPlaneError, Endpoint, LuksFormat, ObjectKind,
    ObjectRef, Passphrase, PoolStats, Protocol, Rekey, SnapshotVolume, UnixPeer,
};
use crate::error::{ApiError, ApiResult};
use crate::locks::{Holder, LockRequest, Mode};
use crate::state::AppState;
use crate::store::{new_id, now};
use crate::types::VolumeType;
use crate::{keys, types};
use serde_json::{json, Value};
use sqlx::AnyConnection;
use std::collections::BTreeMap;

/// Largest volume accepted (GiB).
pub const MAX_SIZE_GIB: u64 = 1 << 20;
/// `Retry-After` when the data plane could not pause a volume for a copy.
const BUSY_RETRY_SECS: u64 = 5;

/// The API's answer to a data-plane error (the one place that maps them).
pub fn dp_error(what: &str, e: DataPlaneError) -> ApiError {
    match e {
        DataPlaneError::NoSpace { .. } => ApiError::too_large(e.to_string()),
        DataPlaneError::NoPool(_) => ApiError::unavailable(e.to_string()),
        DataPlaneError::ShuttingDown => ApiError::unavailable("the node is shutting down; retry"),
        DataPlaneError::Busy(_) => ApiError::busy(e.to_string(), BUSY_RETRY_SECS),
        DataPlaneError::LunUnavailable { .. } => ApiError::unavailable(e.to_string()),
        e => {
            tracing::error!(error = %e, "{what}");
            ApiError::internal(format!("{what} failed (see the daemon log)"))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Loading and viewing

/// A volume or snapshot of the URL's project (admins see any); 404 otherwise (other
/// projects' objects stay hidden).
pub async fn load<T: Stored>(
    conn: &mut AnyConnection,
    ctx: &Ctx,
    project_id: &str,
    id: &str,
) -> ApiResult<T> {
    match T::find(conn, id).await? {
        Some(o) if o.project_id() == project_id || ctx.is_admin() => Ok(o),
        _ => Err(ApiError::not_found(format!("{} {id} not found", T::WHAT))),
    }
}

/// A volume's JSON view (with its type's name, attachments and metadata).
pub async fn volume_view(conn: &mut AnyConnection, v: &Vol) -> ApiResult<Value> {
    let type_name = types::name_of(conn, &v.type_id).await?;
    let atts = rows::attachments_of(conn, &v.id).await?;
    let meta = rows::metadata_of(conn, rows::Meta::Volume, &v.id).await?;
    let mut view = views::volume(v, type_name, &atts, &meta);
    super::manageable::decorate(conn, v, &mut view).await?;
    Ok(view)
}

/// Add `paths` to an attached volume's view when its LUN is reached through several
/// (multipath): each path's portal, state (`up`, `degraded`, `down`, `idle`), sessions logged in
/// out of the I/O threads, ALUA state and failovers, as this node's data plane sees them.
/// A data-plane error leaves the view as it is (logged): the volume's row is still the
/// answer.
pub async fn add_paths(st: &AppState, v: &Vol, view: &mut Value) {
    match st.dataplane().volume_paths(v.object()).await {
        Ok(paths) if !paths.is_empty() => {
            view["paths"] = Value::Array(
                paths
                    .into_iter()
                    .map(|p| {
                        json!({
                            "portal": p.portal,
                            "state": p.state,
                            "sessions_up": p.sessions_up,
                            "sessions": p.sessions,
                            "alua_state": p.alua,
                            "failovers": p.failovers,
                        })
                    })
                    .collect(),
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(volume = %v.id, error = %e, "path states unavailable"),
    }
}

/// A snapshot's JSON view (with its metadata).
pub async fn snapshot_view(conn: &mut AnyConnection, s: &Snap) -> ApiResult<Value> {
    let meta = rows::metadata_of(conn, rows::Meta::Snapshot, &s.id).await?;
    Ok(views::snapshot(s, &meta))
}

/// A volume's encryption (`GET …/volumes/{id}/encryption`).
pub async fn encryption_view(conn: &mut AnyConnection, v: &Vol) -> ApiResult<Value> {
    let t = types::by_id(conn, &v.type_id).await?;
    let mut o = json!({ "encryption_key_id": v.encryption_key_id });
    if let (Some(e), Some(_)) = (&t.encryption, &v.encryption_key_id) {
        o["provider"] = json!(e.provider);
        o["cipher"] = json!(e.cipher);
        o["key_size"] = json!(e.key_size);
        o["control_location"] = json!(e.control_location);
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Pools, keys, locks

async fn pools(st: &AppState) -> ApiResult<Vec<PoolStats>> {
    st.dataplane()
        .stats()
        .await
        .map_err(|e| dp_error("read the storage pools", e))
}

/// The pool for a new volume: the type's `volume_backend_name`, else `default`, else
/// the first one.
async fn pick_pool(st: &AppState, t: &VolumeType) -> ApiResult<PoolStats> {
    let pools = pools(st).await?;
    if let Some(name) = t.backend_name() {
        return pools.into_iter().find(|p| p.name == name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "volume type {}: volume_backend_name {name:?} names no storage pool of this node",
                t.name
            ))
        });
    }
    let i = pools.iter().position(|p| p.name == "default").unwrap_or(0);
    pools
        .into_iter()
        .nth(i)
        .ok_or_else(|| ApiError::unavailable("this node has no storage pool"))
}

/// The pool an existing object lives in.
async fn pool_named(st: &AppState, name: &str) -> ApiResult<PoolStats> {
    pools(st)
        .await?
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "storage pool {name} is not reachable from this node"
            ))
        })
}

/// 413 unless `need` bytes fit in `pool`.
fn check_space(pool: &PoolStats, need: u64, what: impl std::fmt::Display) -> ApiResult<()> {
    if need > pool.free_bytes {
        return Err(ApiError::too_large(format!(
            "{what} does not fit in storage pool {}: {} bytes free",
            pool.name, pool.free_bytes
        )));
    }
    Ok(())
}

async fn passphrase(conn: &mut AnyConnection, st: &AppState, key: &str) -> ApiResult<Passphrase> {
    Ok(Passphrase::new(
        keys::volume_passphrase(conn, st.master(), key).await?,
    ))
}

/// Release a lock holder, logging failures (its lease runs out anyway).
async fn release(st: &AppState, holder: &str) {
    if let Err(e) = st.locks().release(holder).await {
        tracing::error!(holder, error = %e, "cannot release a lock (its lease will expire)");
    }
}

/// A lock this node's operation `op` takes on `kind` `id` for `holder`, waiting at
/// most the node's operation wait.
fn lock_request(
    st: &AppState,
    kind: &str,
    id: &str,
    mode: Mode,
    op: &str,
    holder: String,
) -> LockRequest {
    let mut req = LockRequest::new(kind, id, mode, op, st.locks().operation_wait());
    req.holder = holder;
    req
}

/// The exclusive lock a delete of `kind` `id` holds while the bytes go.
fn delete_lock(st: &AppState, kind: &str, id: &str) -> LockRequest {
    lock_request(
        st,
        kind,
        id,
        Mode::Exclusive,
        "delete",
        format!("{kind} {id}"),
    )
}

// ---------------------------------------------------------------------------------------
// Create and clone

/// Where a new volume's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A clone of this volume.
    Volume(String),
    /// A restore of this snapshot.
    Snapshot(String),
}

/// A new volume, as the API asks for it.
#[derive(Debug, Clone)]
pub struct NewVolume {
    /// Name (checked by the handler).
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Size in GiB (default: the source's).
    pub size_gib: Option<u64>,
    /// Type name or id (default: the source's type, else `__DEFAULT__`).
    pub volume_type: Option<String>,
    /// A secret of the caller's to encrypt with.
    pub encryption_key_id: Option<String>,
    /// Clone or restore from.
    pub source: Option<Source>,
    /// User metadata (checked by the handler).
    pub metadata: BTreeMap<String, String>,
}

/// The source of a clone, as loaded.
struct Src {
    kind: &'static str,
    id: String,
    object: ObjectRef,
    size: u64,
    bootable: bool,
    type_id: String,
    key: Option<String>,
}

async fn load_source(
    conn: &mut AnyConnection,
    ctx: &Ctx,
    project_id: &str,
    source: &Source,
) -> ApiResult<Src> {
    match source {
        Source::Volume(sid) => {
            let v = load::<Vol>(conn, ctx, project_id, sid)
                .await
                .map_err(|_| ApiError::not_found(format!("source volume {sid} not found")))?;
            v.status.allows(sid, VolumeUse::CloneSource)?;
            Ok(Src {
                kind: "volume",
                bootable: v.bootable,
                object: v.object(),
                id: v.id,
                size: v.size_bytes,
                type_id: v.type_id,
                key: v.encryption_key_id,
            })
        }
        Source::Snapshot(sid) => {
            let s = load::<Snap>(conn, ctx, project_id, sid).await?;
            s.status.snapshot_allows(sid, SnapshotUse::CloneSource)?;
            let (type_id, bootable) = match Vol::find(conn, &s.volume_id).await? {
                Some(v) => (v.type_id, v.bootable),
                None => (types::DEFAULT_TYPE.to_string(), false),
            };
            Ok(Src {
                kind: "snapshot",
                bootable,
                object: s.object(),
                id: s.id,
                size: s.size_bytes,
                type_id,
                key: s.encryption_key_id,
            })
        }
    }
}

/// Is the source still usable (under its lock: a delete may have won the race)?
async fn source_still_there(conn: &mut AnyConnection, s: &Src) -> ApiResult<bool> {
    Ok(if s.kind == "volume" {
        Vol::find(conn, &s.id)
            .await?
            .is_some_and(|v| v.status.allows(&s.id, VolumeUse::CloneSource).is_ok())
    } else {
        Snap::find(conn, &s.id).await?.is_some_and(|x| {
            x.status
                .snapshot_allows(&s.id, SnapshotUse::CloneSource)
                .is_ok()
        })
    })
}

/// The data-plane work of a create, run in the background.
enum Build {
    Blank(CreateVolume),
    Copy(CloneVolume),
}

/// Create a volume (blank, clone or restore); the row is `creating` and the bytes
/// are made in the background.
pub async fn create_volume(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    req: NewVolume,
) -> ApiResult<Vol> {
    let mut conn = st.db().pool.acquire().await?;
    let vol_id = new_id();
    let src = match &req.source {
        Some(s) => Some(load_source(&mut conn, ctx, project_id, s).await?),
        None => None,
    };

    // Type: explicit > source's > default.
    let t = match (&req.volume_type, &src) {
        (Some(k), _) => types::resolve(&mut conn, ctx, k).await?,
        (None, Some(s)) => types::by_id(&mut conn, &s.type_id).await?,
        (None, None) => types::resolve(&mut conn, ctx, types::DEFAULT_TYPE).await?,
    };
    if let Some(s) = &src {
        if s.key.is_some() != t.encryption.is_some() {
            return Err(ApiError::bad_request(format!(
                "volume type {} is {}encrypted but the source {} {} is {}: a copy cannot change that",
                t.name,
                if t.encryption.is_some() { "" } else { "not " },
                s.kind,
                s.id,
                if s.key.is_some() { "encrypted" } else { "not encrypted" }
            )));
        }
    }
    if req.encryption_key_id.is_some() && t.encryption.is_none() {
        return Err(ApiError::bad_request(format!(
            "`volume.encryption_key_id` given but volume type {} is not encrypted",
            t.name
        )));
    }

    // Size.
    let size_gib = match (req.size_gib, &src) {
        (Some(s), _) => s,
        (None, Some(s)) => s.size.div_ceil(GIB),
        (None, None) => return Err(ApiError::bad_request("`volume.size` is required")),
    };
    if size_gib == 0 || size_gib > MAX_SIZE_GIB {
        return Err(ApiError::bad_request(format!(
            "`volume.size` must be between 1 and {MAX_SIZE_GIB} GiB"
        )));
    }
    let size = size_gib * GIB;
    if let Some(s) = &src {
        if size < s.size {
            return Err(ApiError::bad_request(format!(
                "`volume.size` {size_gib} GiB is smaller than the source's {} GiB",
                s.size / GIB
            )));
        }
    }

    // Pool and space, before anything is allocated.
    let pool = match &src {
        Some(s) => pool_named(st, &s.object.pool).await?,
        None => pick_pool(st, &t).await?,
    };
    check_space(&pool, size, format_args!("volume of {size_gib} GiB"))?;

    // A caller's key is checked before the source is locked.
    if let (Some(kid), Some(enc)) = (&req.encryption_key_id, &t.encryption) {
        keys::check_volume_key(&mut conn, kid, project_id, enc.key_fit()).await?;
    }
    drop(conn);

    // Lock the source shared for the whole copy.
    let lock = match &src {
        Some(s) => {
            let lr = lock_request(
                st,
                s.kind,
                &s.id,
                Mode::Shared,
                "clone",
                format!("volume {vol_id}"),
            );
            Some(st.locks().acquire(&lr).await?)
        }
        None => None,
    };
    match insert_new_volume(st, project_id, &vol_id, &req, &t, &pool, size, src.as_ref()).await {
        Ok((v, build)) => {
            tokio::spawn(run_build(st.clone(), v.clone(), build, lock.map(|h| h.id)));
            Ok(v)
        }
        Err(e) => {
            if let Some(h) = lock {
                release(st, &h.id).await;
            }
            Err(e)
        }
    }
}

/// Under the source's lock: settle the keys, insert the `creating` row, and say what
/// the data plane must build.
#[allow(clippy::too_many_arguments)]
async fn insert_new_volume(
    st: &AppState,
    project_id: &str,
    vol_id: &str,
    req: &NewVolume,
    t: &VolumeType,
    pool: &PoolStats,
    size: u64,
    src: Option<&Src>,
) -> ApiResult<(Vol, Build)> {
    // Run again whole on a conflict (a random key ordered again, nothing outside the
    // database touched before the commit).
    st.db()
        .write("insert a new volume", |mut tx| async move {
            if let Some(s) = src {
                if !source_still_there(&mut tx, s).await? {
                    return Err(ApiError::conflict(format!(
                        "source {} {} is being deleted",
                        s.kind, s.id
                    )));
                }
            }
            let object = ObjectRef::volume(&pool.name, vol_id);
            let (key, owns_key, build) = match &t.encryption {
                None => (None, false, None),
                Some(enc) => {
                    let (kid, owns) = match &req.encryption_key_id {
                        Some(k) => (k.clone(), false),
                        None => {
                            let k = keys::order_volume_key(
                                &mut tx,
                                st.master(),
                                project_id,
                                enc.key_fit(),
                                vol_id,
                            )
                            .await?;
                            (k, true)
                        }
                    };
                    let new = passphrase(&mut tx, st, &kid).await?;
                    let build = match src {
                        None => Build::Blank(CreateVolume {
                            volume: object.clone(),
                            size,
                            luks: Some(LuksFormat {
                                version: enc.luks_version(),
                                key_bits: enc.key_bits(),
                                passphrase: new,
                            }),
                        }),
                        Some(s) => {
                            let old = s
                                .key
                                .as_deref()
                                .ok_or_else(|| ApiError::internal("the source's key is missing"))?;
                            Build::Copy(CloneVolume {
                                source: s.object.clone(),
                                volume: object.clone(),
                                size,
                                rekey: Some(Rekey {
                                    old: passphrase(&mut tx, st, old).await?,
                                    new,
                                }),
                            })
                        }
                    };
                    (Some(kid), owns, Some(build))
                }
            };
            let build = build.unwrap_or_else(|| match src {
                None => Build::Blank(CreateVolume {
                    volume: object.clone(),
                    size,
                    luks: None,
                }),
                Some(s) => Build::Copy(CloneVolume {
                    source: s.object.clone(),
                    volume: object.clone(),
                    size,
                    rekey: None,
                }),
            });
            let t_now = now();
            let v = Vol {
                id: vol_id.to_string(),
                project_id: project_id.to_string(),
                name: req.name.clone(),
                description: req.description.clone(),
                size_bytes: size,
                type_id: t.id.clone(),
                encryption_key_id: key,
                owns_key,
                pool: pool.name.clone(),
                node_id: Some(st.node_name().to_string()),
                status: Status::Creating,
                source_volid: match &req.source {
                    Some(Source::Volume(id)) => Some(id.clone()),
                    _ => None,
                },
                snapshot_id: match &req.source {
                    Some(Source::Snapshot(id)) => Some(id.clone()),
                    _ => None,
                },
                bootable: src.is_some_and(|s| s.bootable),
                readonly: false,
                created_at: t_now.clone(),
                updated_at: t_now,
            };
            rows::insert_vol(&mut tx, &v).await?;
            rows::set_metadata(&mut tx, rows::Meta::Volume, vol_id, &req.metadata, false).await?;
            tx.commit().await?;
            Ok((v, build))
        })
        .await
}

/// The background part of a create or clone.
async fn run_build(st: AppState, v: Vol, build: Build, lock: Option<String>) {
    let dp = st.dataplane().clone();
    let res = match build {
        Build::Blank(req) => dp.create(req).await,
        Build::Copy(req) => dp.clone_volume(req).await,
    };
    end_build(&st, v.object(), res, lock).await;
}

/// The end of a background create, clone or snapshot of `object`: its status moves
/// to built or failed (a failed one's bytes are removed) and the source's lock is
/// released. Logged, not returned: no request waits for it.
async fn end_build(
    st: &AppState,
    object: ObjectRef,
    res: Result<(), DataPlaneError>,
    lock: Option<String>,
) {
    let built = match res {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(object = %object, error = %e, "making the bytes failed");
            if let Err(e) = st.dataplane().delete(object.clone()).await {
                tracing::warn!(object = %object, error = %e, "cannot remove the failed bytes");
            }
            false
        }
    };
    let event = if built {
        Event::Built
    } else {
        Event::BuildFailed
    };
    if let Err(e) = record(st, &object, event).await {
        tracing::error!(object = %object, error = %e, "cannot record the status");
    }
    if let Some(h) = lock {
        release(st, &h).await;
    }
    if built {
        tracing::info!(object = %object, "ready");
    }
}

/// Apply a status move on a connection of its own.
async fn record(st: &AppState, object: &ObjectRef, event: Event) -> ApiResult<bool> {
    let mut conn = st.db().pool.acquire().await?;
    Ok(rows::apply(&mut conn, object, event).await?)
}

/// Remove an object's bytes, then its row and the key it owns (its status is
/// `deleting` already); `error_deleting` when the data plane refuses.
async fn remove(st: &AppState, object: ObjectRef, owned_key: Option<&str>) -> ApiResult<()> {
    if let Err(e) = st.dataplane().delete(object.clone()).await {
        record(st, &object, Event::DeleteFailed).await?;
        return Err(dp_error(&format!("delete the storage of {object}"), e));
    }
    let obj = &object;
    st.db()
        .write("remove an object's rows", |mut tx| async move {
            match obj.kind {
                ObjectKind::Volume => rows::delete_vol(&mut tx, &obj.id).await?,
                ObjectKind::Snapshot => rows::delete_snap(&mut tx, &obj.id).await?,
            }
            if let Some(k) = owned_key {
                keys::delete_owned(&mut tx, k).await?;
            }
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    tracing::info!(object = %object, "deleted");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Delete

/// Delete a volume: refused while attached or snapshotted; waits for clones of it.
/// `force` (an admin's `os-force_delete`) also takes a volume in `error_deleting`.
pub async fn delete_volume(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    id: &str,
    force: bool,
) -> ApiResult<()> {
    let mut conn = st.db().pool.acquire().await?;
    let v = load::<Vol>(&mut conn, ctx, project_id, id).await?;
    let attached = !rows::attachments_of(&mut conn, id).await?.is_empty();
    if attached {
        return Status::InUse.allows(id, VolumeUse::Delete);
    }
    let snaps = rows::snapshots_of(&mut conn, id).await?;
    if snaps > 0 {
        return Err(ApiError::bad_request(format!(
            "volume {id} has {snaps} snapshot(s): delete them first"
        )));
    }
    let (use_, start) = if force {
        (VolumeUse::ForceDelete, Event::ForceDeleteStarted)
    } else {
        (VolumeUse::Delete, Event::DeleteStarted)
    };
    v.status.allows(id, use_)?;
    drop(conn);
    delete_locked(st, &v.object(), start, finish_delete(st, &v)).await
}

/// The common part of a delete of `object`: move its status to `deleting` (a
/// compare-and-swap: 409 when it moved since it was checked; new clones are refused
/// from now on), take its lock exclusive, run `finish`. When the lock cannot be had in
/// time the status goes back and the caller is told 409 with `Retry-After`.
async fn delete_locked(
    st: &AppState,
    object: &ObjectRef,
    start: Event,
    finish: impl std::future::Future<Output = ApiResult<()>>,
) -> ApiResult<()> {
    if !record(st, object, start).await? {
        return Err(ApiError::conflict(format!("{object} changed state; retry")));
    }
    let kind = match object.kind {
        ObjectKind::Volume => "volume",
        ObjectKind::Snapshot => "snapshot",
    };
    let holder = match st.locks().acquire(&delete_lock(st, kind, &object.id)).await {
        Ok(h) => h,
        Err(e) => {
            record(st, object, Event::DeleteAbandoned).await?;
            return Err(e.into());
        }
    };
    let res = finish.await;
    release(st, &holder.id).await;
    res
}

/// Remove a volume's bytes, key and row (its status is `deleting` already).
pub(crate) async fn finish_delete(st: &AppState, v: &Vol) -> ApiResult<()> {
    let key = v.encryption_key_id.as_deref().filter(|_| v.owns_key);
    remove(st, v.object(), key).await
}

// ---------------------------------------------------------------------------------------
// Extend

/// Grow a volume (live attachments too) to `new_gib` GiB.
pub async fn extend(st: &AppState, v: &Vol, new_gib: u64) -> ApiResult<()> {
    if super::manageable::extend(st, v, new_gib).await? {
        return Ok(());
    }
    v.status.allows(&v.id, VolumeUse::Extend)?;
    let old_gib = v.size_bytes / GIB;
    if new_gib <= old_gib || new_gib > MAX_SIZE_GIB {
        return Err(ApiError::bad_request(format!(
            "`os-extend.new_size` must be larger than the current size ({old_gib} GiB) and at most {MAX_SIZE_GIB}"
        )));
    }
    let new_size = new_gib * GIB;
    let pool = pool_named(st, &v.pool).await?;
    check_space(
        &pool,
        new_size - v.size_bytes,
        format_args!("extending to {new_gib} GiB"),
    )?;
    let req = lock_request(
        st,
        "volume",
        &v.id,
        Mode::Exclusive,
        "extend",
        format!("volume {}", v.id),
    );
    let h = st.locks().acquire(&req).await?;
    let res = async {
        st.dataplane()
            .grow(v.object(), new_size)
            .await
            .map_err(|e| dp_error("grow the volume", e))?;
        let mut conn = st.db().pool.acquire().await?;
        rows::set_size(&mut conn, &v.id, new_size).await?;
        ApiResult::Ok(())
    }
    .await;
    release(st, &h.id).await;
    res
}

// ---------------------------------------------------------------------------------------
// Attach and detach

/// What an attachment asks for.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The front end.
    pub protocol: Protocol,
    /// Read-only (also when the volume's `readonly` flag is set).
    pub read_only: bool,
    /// The server it is for (attachments API), if named.
    pub instance_uuid: Option<String>,
    /// How the row starts: `attached` (`os-initialize_connection`) or `attaching`
    /// (attachments API, until `os-complete`).
    pub status: AttachStatus,
    /// NBD: the Unix-socket peer (the connector's `uid`/`gid`) admitted without TLS.
    pub unix_peer: Option<UnixPeer>,
}

/// A made attachment.
#[derive(Debug, Clone)]
pub struct Attached {
    /// Its id.
    pub id: String,
    /// Cinder's `connection_info` (with credentials: only this answer carries them).
    pub connection_info: Value,
}

/// What the data plane needs to attach `v` (key, limits).
async fn attach_volume(
    st: &AppState,
    v: &Vol,
    attachment_id: &str,
    protocol: Protocol,
    read_only: bool,
    nbd: NbdAccess,
) -> ApiResult<Endpoint> {
    // A LUN volume is bound to its LUN again first (login, identity check).
    super::manageable::before_attach(st, v).await?;
    let mut conn = st.db().pool.acquire().await?;
    let t = types::by_id(&mut conn, &v.type_id).await?;
    let qos = crate::qos::limits_of_type(&mut conn, &t).await?;
    let pass = match &v.encryption_key_id {
        Some(k) => Some(passphrase(&mut conn, st, k).await?),
        None => None,
    };
    drop(conn);
    st.dataplane()
        .attach(AttachVolume {
            volume: v.object(),
            attachment_id: attachment_id.to_string(),
            protocol,
            read_only,
            passphrase: pass,
            qos,
            nbd_psk: nbd.psk,
            unix_peer: nbd.unix_peer,
        })
        .await
        .map_err(|e| dp_error("attach the volume", e))
}

/// Who may use an NBD attachment: its key (known when it is served again) and the Unix
/// peer its connector named.
#[derive(Debug, Default)]
struct NbdAccess {
    psk: Option<Passphrase>,
    unix_peer: Option<UnixPeer>,
}

/// The attachment's NBD key sealed for its row, when the data plane gave it one.
fn sealed_psk(
    st: &AppState,
    endpoint: &Endpoint,
    attachment_id: &str,
) -> ApiResult<Option<String>> {
    match endpoint {
        Endpoint::Nbd {
            credentials: Some(c),
            ..
        } => Ok(Some(keys::seal_attachment_psk(
            st.master(),
            attachment_id,
            c.psk.expose(),
        )?)),
        _ => Ok(None),
    }
}

/// Undo a data-plane attachment whose recording failed: the front end must not
/// outlive the request that made it.
async fn undo_attach(st: &AppState, v: &Vol, attachment_id: &str) {
    if let Err(d) = st
        .dataplane()
        .detach(v.object(), attachment_id.to_string())
        .await
    {
        tracing::error!(volume = %v.id, error = %d, "cannot undo a data-plane attachment");
    }
}

/// Serve again an attachment this node recorded before it stopped (start-up
/// reconciliation): the same attachment id, protocol and access mode, so the data plane
/// serves it at the same endpoint (NBD export name, vhost-user socket path) and its
/// clients reconnect to what they knew. An NBD attachment keeps its pre-shared key
/// (unsealed from its row) and its Unix peer, so its clients' credentials still work.
/// Returns the `connection_info` it has now, as the attachment row keeps it (JSON text,
/// without credentials), and the sealed key when the attachment got a new one (it had
/// none: made with `--nbd-tls off`, served again with TLS).
pub async fn restore_attachment(
    st: &AppState,
    v: &Vol,
    a: &Attachment,
    protocol: Protocol,
    read_only: bool,
) -> ApiResult<(String, Option<String>)> {
    let psk = match &a.nbd_psk_sealed {
        Some(sealed) => Some(Passphrase::new(keys::open_attachment_psk(
            st.master(),
            &a.id,
            sealed,
        )?)),
        None => None,
    };
    let had_key = psk.is_some();
    let nbd = NbdAccess {
        psk,
        unix_peer: a.unix_peer,
    };
    let endpoint = attach_volume(st, v, &a.id, protocol, read_only, nbd).await?;
    let info = views::connection_info(&endpoint, v, &a.id, read_only);
    let new_key = match had_key {
        true => None,
        false => match sealed_psk(st, &endpoint, &a.id) {
            Ok(k) => k,
            Err(e) => {
                undo_attach(st, v, &a.id).await;
                return Err(e);
            }
        },
    };
    Ok((stored_info(&endpoint, &info), new_key))
}

/// `connection_info` as the database keeps it: credentials are for the caller only; the
/// row keeps where, not how to get in.
fn stored_info(endpoint: &Endpoint, info: &Value) -> String {
    let mut i = info.clone();
    if let (
        Endpoint::Nbd {
            credentials: Some(_),
            ..
        },
        Some(d),
    ) = (endpoint, i["data"].as_object_mut())
    {
        d.remove("tls");
    }
    i.to_string()
}

/// Attach a volume (a new attachment with its own front end).
pub async fn attach(st: &AppState, v: &Vol, req: AttachRequest) -> ApiResult<Attached> {
    v.status.allows(&v.id, VolumeUse::Attach)?;
    let read_only = req.read_only || v.readonly;
    let attachment_id = new_id();
    let nbd = NbdAccess {
        psk: None,
        unix_peer: req.unix_peer,
    };
    let endpoint = attach_volume(st, v, &attachment_id, req.protocol, read_only, nbd).await?;
    let info = views::connection_info(&endpoint, v, &attachment_id, read_only);
    let sealed = match sealed_psk(st, &endpoint, &attachment_id) {
        Ok(s) => s,
        Err(e) => {
            undo_attach(st, v, &attachment_id).await;
            return Err(e);
        }
    };
    let row = NewAttachment {
        id: &attachment_id,
        volume_id: &v.id,
        protocol: Some(req.protocol),
        node: st.node_name(),
        connection_info: &stored_info(&endpoint, &info),
        instance_uuid: req.instance_uuid.as_deref(),
        read_only,
        status: req.status,
        nbd_psk_sealed: sealed.as_deref(),
        unix_peer: req.unix_peer,
    };
    match record_attachment(st, v, &row, Event::Attached).await {
        Ok(()) => Ok(Attached {
            id: attachment_id,
            connection_info: info,
        }),
        Err(e) => {
            // The volume moved on (a delete won the race) or the database failed.
            undo_attach(st, v, &attachment_id).await;
            Err(e)
        }
    }
}

/// Reserve a volume for a server (attachments API without a connector): an
/// attachment row without a front end; an available volume becomes `reserved`.
pub async fn reserve(
    st: &AppState,
    v: &Vol,
    instance_uuid: Option<String>,
    read_only: bool,
) -> ApiResult<String> {
    v.status.allows(&v.id, VolumeUse::Attach)?;
    let id = new_id();
    let row = NewAttachment {
        id: &id,
        volume_id: &v.id,
        protocol: None,
        node: st.node_name(),
        connection_info: "{}",
        instance_uuid: instance_uuid.as_deref(),
        read_only: read_only || v.readonly,
        status: AttachStatus::Reserved,
        nbd_psk_sealed: None,
        unix_peer: None,
    };
    // Available becomes reserved; in-use stays (Attached is its compare-and-swap); a
    // reserved volume (it cannot be deleted) only gets the row.
    let event = match v.status {
        Status::Available => Event::Reserved,
        Status::InUse => Event::Attached,
        _ => {
            let r = &row;
            st.db()
                .write("insert an attachment", |mut tx| async move {
                    rows::insert_attachment(&mut tx, r).await?;
                    tx.commit().await?;
                    ApiResult::Ok(())
                })
                .await?;
            return Ok(id);
        }
    };
    record_attachment(st, v, &row, event).await?;
    Ok(id)
}

/// Give a reservation its front end (attachments API `PUT` with a connector); a live
/// attachment answers its recorded `connection_info` (without credentials).
pub async fn connect(
    st: &AppState,
    v: &Vol,
    a: &Attachment,
    protocol: Protocol,
    unix_peer: Option<UnixPeer>,
) -> ApiResult<Value> {
    if a.is_live() {
        return Ok(serde_json::from_str(&a.connection_info).unwrap_or(Value::Null));
    }
    v.status.allows(&v.id, VolumeUse::Attach)?;
    let read_only = a.attach_mode == "ro" || v.readonly;
    let nbd = NbdAccess {
        psk: None,
        unix_peer,
    };
    let endpoint = attach_volume(st, v, &a.id, protocol, read_only, nbd).await?;
    let info = views::connection_info(&endpoint, v, &a.id, read_only);
    let res = async {
        // Sealed once, outside the retried transaction; a failure undoes the attach too.
        let sealed = sealed_psk(st, &endpoint, &a.id)?;
        let stored = stored_info(&endpoint, &info);
        let (stored, sealed) = (&stored, sealed.as_deref());
        st.db()
            .write("record an attachment's connection", |mut tx| async move {
                let recorded = rows::connect_attachment(
                    &mut tx,
                    &a.id,
                    protocol,
                    st.node_name(),
                    stored,
                    sealed,
                    unix_peer,
                )
                .await?;
                if !recorded {
                    return Err(ApiError::conflict(format!(
                        "attachment {} changed meanwhile; retry",
                        a.id
                    )));
                }
                if !rows::apply(&mut tx, &v.object(), Event::Attached).await? {
                    return Err(ApiError::conflict(format!(
                        "volume {} changed state while it was being attached; retry",
                        v.id
                    )));
                }
                tx.commit().await?;
                ApiResult::Ok(())
            })
            .await
    }
    .await;
    match res {
        Ok(()) => Ok(info),
        Err(e) => {
            undo_attach(st, v, &a.id).await;
            Err(e)
        }
    }
}

/// `os-complete`: the consumer uses the attachment now.
pub async fn complete(st: &AppState, a: &Attachment) -> ApiResult<()> {
    let mut conn = st.db().pool.acquire().await?;
    if !rows::complete_attachment(&mut conn, &a.id).await? {
        return Err(ApiError::bad_request(format!(
            "attachment {} has no connection yet: update it with a connector first",
            a.id
        )));
    }
    Ok(())
}

/// Record an attachment row and the volume's move (`event`) in one transaction.
async fn record_attachment(
    st: &AppState,
    v: &Vol,
    row: &NewAttachment<'_>,
    event: Event,
) -> ApiResult<()> {
    st.db()
        .write("record an attachment", |mut tx| async move {
            if !rows::apply(&mut tx, &v.object(), event).await? {
                return Err(ApiError::conflict(format!(
                    "volume {} changed state while it was being attached; retry",
                    v.id
                )));
            }
            rows::insert_attachment(&mut tx, row).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
}

/// End the attachments of a volume that match (`protocol`, `attachment_id`; both
/// optional); 400 when none does. Live ones lose their front end first.
pub async fn detach(
    st: &AppState,
    v: &Vol,
    protocol: Option<Protocol>,
    attachment_id: Option<&str>,
) -> ApiResult<()> {
    let mut conn = st.db().pool.acquire().await?;
    let chosen: Vec<Attachment> = rows::attachments_of(&mut conn, &v.id)
        .await?
        .into_iter()
        .filter(|a| attachment_id.is_none_or(|x| x == a.id))
        .filter(|a| protocol.is_none_or(|p| p.as_str() == a.protocol))
        .collect();
    if chosen.is_empty() {
        return Err(ApiError::bad_request(format!(
            "volume {} has no matching attachment",
            v.id
        )));
    }
    for a in &chosen {
        if a.is_live() {
            st.dataplane()
                .detach(v.object(), a.id.clone())
                .await
                .map_err(|e| dp_error("detach the volume", e))?;
        }
        rows::delete_attachment(&mut conn, &a.id).await?;
    }
    rows::apply(&mut conn, &v.object(), Event::LastDetached).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Descriptions, flags, metadata, admin actions

/// Check user metadata: keys 1..255 characters, values up to 255.
pub fn check_metadata(field: &str, m: &BTreeMap<String, String>) -> ApiResult<()> {
    for (k, v) in m {
        check_len(&format!("{field} key"), k, 1, 255)?;
        check_len(&format!("{field}.{k}"), v, 0, 255)?;
    }
    Ok(())
}

/// What a `PUT` of a volume or snapshot changes.
#[derive(Debug, Clone, Default)]
pub struct Update {
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New metadata (replaces the old).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Change a volume's or snapshot's name, description, metadata.
pub async fn update<T: Stored + Described>(st: &AppState, o: &T, u: Update) -> ApiResult<()> {
    o.check_describe()?;
    let name = u.name.unwrap_or_else(|| o.name().to_string());
    let description = match u.description {
        Some(d) => Some(d),
        None => o.description().map(str::to_string),
    };
    let (name, description, metadata) = (&name, &description, &u.metadata);
    st.db()
        .write("update names and metadata", |mut tx| async move {
            rows::set_names(&mut tx, T::META, o.id(), name, description.as_deref()).await?;
            if let Some(m) = metadata {
                rows::set_metadata(&mut tx, T::META, o.id(), m, true).await?;
            }
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await
}

/// Set (`replace`: replace all) metadata keys of a volume or snapshot; the metadata
/// after the change.
pub async fn set_metadata<T: Stored + Described>(
    st: &AppState,
    o: &T,
    items: &BTreeMap<String, String>,
    replace: bool,
) -> ApiResult<BTreeMap<String, String>> {
    o.check_describe()?;
    st.db()
        .write("set metadata", |mut tx| async move {
            rows::set_metadata(&mut tx, T::META, o.id(), items, replace).await?;
            let m = rows::metadata_of(&mut tx, T::META, o.id()).await?;
            tx.commit().await?;
            ApiResult::Ok(m)
        })
        .await
}

/// Remove one metadata key of a volume or snapshot (404 when it has none).
pub async fn delete_metadata<T: Stored + Described>(
    st: &AppState,
    o: &T,
    key: &str,
) -> ApiResult<()> {
    o.check_describe()?;
    let mut conn = st.db().pool.acquire().await?;
    if rows::delete_metadata(&mut conn, T::META, o.id(), key).await? == 0 {
        return Err(ApiError::not_found(format!(
            "{} {} has no metadata key {key:?}",
            T::WHAT,
            o.id()
        )));
    }
    Ok(())
}

/// A volume or snapshot as the description calls see it.
pub trait Described {
    /// Its metadata table.
    const META: rows::Meta;
    /// Id.
    fn id(&self) -> &str;
    /// Name.
    fn name(&self) -> &str;
    /// Description.
    fn description(&self) -> Option<&str>;
    /// May its description change now?
    fn check_describe(&self) -> ApiResult<()>;
}

impl Described for Vol {
    const META: rows::Meta = rows::Meta::Volume;
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    fn check_describe(&self) -> ApiResult<()> {
        self.status.allows(&self.id, VolumeUse::Describe)
    }
}

impl Described for Snap {
    const META: rows::Meta = rows::Meta::Snapshot;
    fn id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    fn check_describe(&self) -> ApiResult<()> {
        self.status.snapshot_allows(&self.id, SnapshotUse::Describe)
    }
}

/// `os-set_bootable` / `os-update_readonly_flag`.
pub async fn set_flag(st: &AppState, v: &Vol, flag: Flag, on: bool) -> ApiResult<()> {
    v.status.allows(&v.id, VolumeUse::Describe)?;
    let mut conn = st.db().pool.acquire().await?;
    rows::set_flag(&mut conn, &v.id, flag, on).await?;
    Ok(())
}

/// An admin's `os-reset_status` of a volume or snapshot to `to`: only to a status no
/// running operation owns, and consistent with the volume's attachments.
pub async fn reset_status<T: Stored>(
    st: &AppState,
    object: &ObjectRef,
    current: Status,
    to: &str,
) -> ApiResult<()> {
    let to = Status::parse(to)
        .filter(|s| Status::RESETTABLE.contains(s))
        .filter(|s| object.kind == ObjectKind::Volume || *s != Status::InUse)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`os-reset_status.status` {to:?}: {} can be reset to {}",
                T::WHAT,
                if object.kind == ObjectKind::Volume {
                    "available, error, in-use or error_deleting"
                } else {
                    "available, error or error_deleting"
                }
            ))
        })?;
    if matches!(current, Status::Creating | Status::Deleting) {
        return Err(ApiError::conflict(format!(
            "{} {} is {current}: an operation owns it; wait for it to end",
            T::WHAT,
            object.id
        )));
    }
    st.db()
        .write("reset a status", |mut tx| async move {
    if object.kind == ObjectKind::Volume {
        let live = rows::attachments_of(&mut tx, &object.id)
            .await?
            .iter()
            .any(Attachment::is_live);
        if live != (to == Status::InUse) && matches!(to, Status::InUse | Status::Available) {
            return Err(ApiError::bad_request(format!(
                "volume {} {} attachments: it cannot be reset to {to} (end them with os-terminate_connection or DELETE /attachments/{{id}})",
                object.id,
                if live { "has" } else { "has no" }
            )));
        }
    }
    if !rows::apply(&mut tx, object, Event::Reset(to)).await? {
        return Err(ApiError::conflict(format!(
            "{} {} changed state; retry",
            T::WHAT,
            object.id
        )));
    }
    tx.commit().await?;
    Ok(())
        })
        .await
}

/// `os-retype`: give a volume another type. Ember changes the type in place when the
/// bytes stay valid: the same encryption spec (or none on both), the same storage
/// pool; new QoS limits apply from the next attachment. Anything that would need a
/// migration is refused (400).
pub async fn retype(st: &AppState, ctx: &Ctx, v: &Vol, new_type: &str) -> ApiResult<()> {
    v.status.allows(&v.id, VolumeUse::Retype)?;
    let mut conn = st.db().pool.acquire().await?;
    let old = types::by_id(&mut conn, &v.type_id).await?;
    let new = types::resolve(&mut conn, ctx, new_type).await?;
    let same_enc = match (&old.encryption, &new.encryption) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.provider == b.provider
                && a.cipher == b.cipher
                && a.key_size == b.key_size
                && a.control_location == b.control_location
        }
        _ => false,
    };
    if !same_enc {
        return Err(ApiError::bad_request(format!(
            "`os-retype.new_type` {}: its encryption differs from type {}'s; Ember cannot migrate a volume's bytes (retype to a type with the same encryption spec)",
            new.name, old.name
        )));
    }
    if let Some(pool) = new.backend_name() {
        if pool != v.pool {
            return Err(ApiError::bad_request(format!(
                "`os-retype.new_type` {}: its volume_backend_name {pool:?} is another pool than the volume's ({}); Ember cannot migrate a volume",
                new.name, v.pool
            )));
        }
    }
    rows::set_type(&mut conn, &v.id, &new.id).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Snapshots

/// A new snapshot, as the API asks for it.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    /// The volume.
    pub volume_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Allow a snapshot of an in-use volume (taken at one instant).
    pub force: bool,
    /// User metadata (checked by the handler).
    pub metadata: BTreeMap<String, String>,
}

/// Snapshot a volume; the row is `creating` and the copy runs in the background.
pub async fn create_snapshot(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    req: NewSnapshot,
) -> ApiResult<Snap> {
    let mut conn = st.db().pool.acquire().await?;
    let v = load::<Vol>(&mut conn, ctx, project_id, &req.volume_id).await?;
    let use_ = VolumeUse::Snapshot { force: req.force };
    v.status.allows(&v.id, use_)?;
    drop(conn);
    let pool = pool_named(st, &v.pool).await?;
    check_space(
        &pool,
        v.size_bytes,
        format_args!("a snapshot of volume {}", v.id),
    )?;
    let snap_id = new_id();
    let lr = lock_request(
        st,
        "volume",
        &v.id,
        Mode::Shared,
        "snapshot",
        format!("snapshot {snap_id}"),
    );
    let h = st.locks().acquire(&lr).await?;
    let s = match insert_snapshot(st, project_id, &snap_id, &req, &v).await {
        Ok(s) => s,
        Err(e) => {
            release(st, &h.id).await;
            return Err(e);
        }
    };
    tokio::spawn(run_snapshot(st.clone(), v, s.clone(), h));
    Ok(s)
}

/// Under the volume's lock: copy its key, insert the `creating` row.
async fn insert_snapshot(
    st: &AppState,
    project_id: &str,
    snap_id: &str,
    req: &NewSnapshot,
    v: &Vol,
) -> ApiResult<Snap> {
    st.db()
        .write("insert a snapshot", |mut tx| async move {
            let still = Vol::find(&mut tx, &v.id).await?;
            if still.is_none_or(|x| x.status.allows(&v.id, VolumeUse::CloneSource).is_err()) {
                return Err(ApiError::conflict(format!(
                    "volume {} is being deleted",
                    v.id
                )));
            }
            let key = match &v.encryption_key_id {
                Some(k) => Some(
                    keys::copy_secret(
                        &mut tx,
                        st.master(),
                        k,
                        &v.project_id,
                        &format!("snapshot-{snap_id}"),
                    )
                    .await?,
                ),
                None => None,
            };
            let t = now();
            let s = Snap {
                id: snap_id.to_string(),
                project_id: project_id.to_string(),
                volume_id: v.id.clone(),
                name: req.name.clone(),
                description: req.description.clone(),
                size_bytes: v.size_bytes,
                encryption_key_id: key,
                pool: v.pool.clone(),
                node_id: Some(st.node_name().to_string()),
                status: Status::Creating,
                created_at: t.clone(),
                updated_at: t,
            };
            rows::insert_snap(&mut tx, &s).await?;
            rows::set_metadata(&mut tx, rows::Meta::Snapshot, snap_id, &req.metadata, false)
                .await?;
            tx.commit().await?;
            Ok(s)
        })
        .await
}

async fn run_snapshot(st: AppState, v: Vol, s: Snap, lock: Holder) {
    let req = SnapshotVolume {
        volume: v.object(),
        snapshot: s.object(),
    };
    let res = st.dataplane().snapshot(req).await;
    end_build(&st, s.object(), res, Some(lock.id)).await;
}

/// Delete a snapshot; waits for volumes being made from it. `force` as for volumes.
pub async fn delete_snapshot(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    id: &str,
    force: bool,
) -> ApiResult<()> {
    let mut conn = st.db().pool.acquire().await?;
    let s = load::<Snap>(&mut conn, ctx, project_id, id).await?;
    let (use_, start) = if force {
        (SnapshotUse::ForceDelete, Event::ForceDeleteStarted)
    } else {
        (SnapshotUse::Delete, Event::DeleteStarted)
    };
    s.status.snapshot_allows(id, use_)?;
    drop(conn);
    delete_locked(st, &s.object(), start, finish_snapshot_delete(st, &s)).await
}

/// Remove a snapshot's bytes, key and row (its status is `deleting` already).
pub(crate) async fn finish_snapshot_delete(st: &AppState, s: &Snap) -> ApiResult<()> {
    remove(st, s.object(), s.encryption_key_id.as_deref()).await
}
