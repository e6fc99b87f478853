//! Volumes on LUN pools (Cinder's manageable volumes): LUNs an array made, listed,
//! bound to volumes ("managed") and released ("unmanaged"), never allocated or erased.
//!
//! ```text
//!   GET  /v3/{p}/manageable_volumes[/detail]  ─▶ DataPlane::list_luns (+ which volume
//!                                                 holds each LUN, from managed_luns)
//!   POST /v3/{p}/manageable_volumes           ─▶ row `creating` + managed_luns row,
//!        (ref.source-name, host node@pool)        then in the background
//!                                                 DataPlane::manage ─▶ available | error
//!   os-unmanage                               ─▶ deleting ─▶ DataPlane::unmanage ─▶ rows gone
//!   attach, os-extend of a LUN volume         ─▶ DataPlane::manage again first (login,
//!                                                 identity check) ─▶ fault recorded/cleared
//! ```
//!
//! Design:
//! - Admin only (as Cinder's default policy): the caller names a LUN of the node's
//!   storage, which no project owns. The volume belongs to the URL's project.
//! - **Its own table**, `managed_luns` (volume id → pool, LUN name, identity, last
//!   fault), so the volume rows stay what they are for file volumes. A row whose volume
//!   is gone (a delete of a LUN volume releases the LUN through [`DataPlane::delete`])
//!   is ignored and replaced by the next manage of that LUN; a unique (pool, LUN)
//!   index stops two concurrent manages of one LUN.
//! - **Identity**: the first manage records the LUN's identity (VPD 0x83 designator,
//!   serial; `loop:<file>` for loop devices); every later bind (attach, extend, after a
//!   restart) hands it to the data plane, which refuses a LUN that reports another.
//! - **Faults are on the volume**: a manage that fails (the target refuses the login, a
//!   wrong CHAP secret, no such LUN, a LUN that holds data where an encrypted volume is
//!   asked for) leaves the volume `error`; a bind before an attach or extend that fails
//!   answers 503 with the reason. Either way the reason is recorded and shown in the
//!   volume's view (`lun.fault`, `lun.fault_at`) and logged; the next successful bind
//!   clears it. Every data-plane call is bounded (logins have timeouts), so none hangs.
//! - **Faults while attached** ([`check_health`], run by `emberd serve` every
//!   `--lun-health-secs`): the data plane checks the LUN of every attached LUN volume
//!   ([`DataPlane::check_luns`]: a short login or a device read, plus the fault the
//!   volume's I/O saw: the LUN gone from its target, no session within the replacement
//!   timeout, a host device that shrank or does not read). A fault is recorded and
//!   logged as above and `lun.health` turns `error`; the volume's `status` stays
//!   `in-use` (it is attached, and detach must still work), its clients' I/O fails
//!   with EIO, other volumes are untouched. When the array brings the same LUN back
//!   (same identity), the volume heals by itself: the sessions log in again, the next
//!   check clears the fault (`lun.health` `ok`); no re-attach is needed. A LUN that
//!   comes back as another LUN stays refused.
//! - **CHAP**: a LUN pool names its CHAP secrets by id ([`LunPoolInfo::chap`]); they
//!   are read from the key store (any project's secret: the operator configured the
//!   id) and handed to the data plane ([`DataPlane::set_chap`]) before each login.
//! - **Encryption**: managing with an encrypted volume type orders a key, and the data
//!   plane formats the LUN as LUKS, only when the LUN is blank (its first 16 MiB, where its header goes, all zeros):
//!   data on a LUN is never destroyed by a manage. Unmanage keeps the key (the secret
//!   stays in the project), so the LUN can still be opened with it.
//! - Extend of a LUN volume takes the size the array gave the LUN: refused (400) while
//!   the LUN is smaller than asked; never writes to the array.

use super::rows::{self, Vol};
use super::service::{dp_error, load, volume_view};
use super::status::{Event, Status, VolumeUse};
use super::views::GIB;
use crate::api::ApiJson;
use crate::auth::Ctx;
use crate::dataplane::{
    ChapSecret, DataPlane, DataPlaneError, LuksFormat, LunPoolInfo, ManageLun, ManageableLun,
    ManagedLun, ObjectRef, Passphrase,
};
use crate::error::{ApiError, ApiResult};
use crate::projects::check_url_project;
use crate::state::AppState;
use crate::store::{fetch_optional_args, get_str, new_id, now, opt_str};
use crate::{keys, types};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Schema of the `managed_luns` table (migration 10).
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS managed_luns (volume_id VARCHAR(64) NOT NULL PRIMARY KEY, \
     pool VARCHAR(128) NOT NULL, lun VARCHAR(512) NOT NULL, identity VARCHAR(1024) NULL, \
     fault VARCHAR(1024) NULL, fault_at VARCHAR(40) NULL, managed_at VARCHAR(40) NOT NULL)",
    "CREATE UNIQUE INDEX managed_luns_lun ON managed_luns (pool, lun)",
];

/// Longest LUN name (`source-name`) accepted.
pub const MAX_LUN_NAME: usize = 512;
/// Longest fault text kept.
const MAX_FAULT: usize = 1000;

// ---------------------------------------------------------------------------------------
// Rows

/// A `managed_luns` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedRow {
    pub volume_id: String,
    pub pool: String,
    pub lun: String,
    pub identity: Option<String>,
    pub fault: Option<String>,
    pub fault_at: Option<String>,
}

fn managed_row(r: &sqlx::any::AnyRow) -> Result<ManagedRow, sqlx::Error> {
    Ok(ManagedRow {
        volume_id: get_str(r, "volume_id")?,
        pool: get_str(r, "pool")?,
        lun: get_str(r, "lun")?,
        identity: opt_str(r, "identity")?,
        fault: opt_str(r, "fault")?,
        fault_at: opt_str(r, "fault_at")?,
    })
}

/// The LUN row of volume `id`, if it is a LUN volume.
pub async fn row_of(conn: &mut AnyConnection, id: &str) -> Result<Option<ManagedRow>, sqlx::Error> {
    let r = fetch_optional_args(
        conn,
        "SELECT * FROM managed_luns WHERE volume_id = ?",
        &[id],
    )
    .await?;
    r.as_ref().map(managed_row).transpose()
}

/// The rows of `pool` whose volume still exists.
async fn rows_of_pool(
    conn: &mut AnyConnection,
    pool: &str,
) -> Result<Vec<ManagedRow>, sqlx::Error> {
    let rs = sqlx::query(
        "SELECT m.* FROM managed_luns m JOIN volumes v ON v.id = m.volume_id WHERE m.pool = ?",
    )
    .bind(pool.to_string())
    .fetch_all(&mut *conn)
    .await?;
    rs.iter().map(managed_row).collect()
}

async fn set_fault(
    conn: &mut AnyConnection,
    id: &str,
    fault: Option<&str>,
) -> Result<(), sqlx::Error> {
    let fault: Option<String> = fault.map(|f| f.chars().take(MAX_FAULT).collect());
    let at = fault.as_ref().map(|_| now());
    sqlx::query("UPDATE managed_luns SET fault = ?, fault_at = ? WHERE volume_id = ?")
        .bind(fault)
        .bind(at)
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn set_bound(conn: &mut AnyConnection, id: &str, m: &ManagedLun) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE managed_luns SET lun = ?, identity = COALESCE(identity, ?), fault = NULL, fault_at = NULL \
         WHERE volume_id = ?",
    )
    .bind(m.lun.clone())
    .bind(m.identity.clone())
    .bind(id.to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn delete_row(conn: &mut AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM managed_luns WHERE volume_id = ?")
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pools and CHAP

/// The LUN pool `name` of this node, with its CHAP credentials handed to the data
/// plane; 400 when it is not one, 503 when a CHAP secret is missing.
async fn prepare_pool(st: &AppState, name: &str) -> ApiResult<LunPoolInfo> {
    let dp = st.dataplane();
    let pools = dp
        .lun_pools()
        .await
        .map_err(|e| dp_error("list the LUN pools", e))?;
    let p = pools
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ApiError::bad_request(format!("{name:?} is not a LUN pool of this node")))?;
    let chap = match &p.chap {
        None => None,
        Some(c) => {
            let mut conn = st.db().pool.acquire().await?;
            let secret = chap_secret(&mut conn, st, name, &c.secret_id).await?;
            let target = match (&c.target_user, &c.target_secret_id) {
                (Some(u), Some(id)) => {
                    Some((u.clone(), chap_secret(&mut conn, st, name, id).await?))
                }
                _ => None,
            };
            Some(ChapSecret {
                user: c.user.clone(),
                secret,
                target,
            })
        }
    };
    dp.set_chap(name.to_string(), chap)
        .await
        .map_err(|e| dp_error("give the LUN pool its CHAP credentials", e))?;
    Ok(p)
}

async fn chap_secret(
    conn: &mut AnyConnection,
    st: &AppState,
    pool: &str,
    id: &str,
) -> ApiResult<Passphrase> {
    match keys::payload_of(conn, st.master(), id).await? {
        Some(p) => Ok(Passphrase::new(p)),
        None => {
            let m = format!("the CHAP secret {id} of LUN pool {pool} is not in the key store");
            tracing::error!(pool, secret = id, "{m}");
            Err(ApiError::unavailable(m))
        }
    }
}

/// What the API may be told about a failed bind: the data plane's reasons that name
/// what to fix; anything else stays in the log.
fn fault_text(e: &DataPlaneError) -> String {
    match e {
        DataPlaneError::LunUnavailable { .. }
        | DataPlaneError::Invalid(_)
        | DataPlaneError::NotFound(_)
        | DataPlaneError::NoPool(_)
        | DataPlaneError::AlreadyExists(_)
        | DataPlaneError::ShuttingDown => e.to_string(),
        _ => "the data plane could not open the LUN (see the daemon log)".to_string(),
    }
}

/// The API error of a failed bind of volume `id`.
fn bind_error(id: &str, e: DataPlaneError) -> ApiError {
    match e {
        DataPlaneError::LunUnavailable { .. } | DataPlaneError::NotFound(_) => {
            ApiError::unavailable(format!("volume {id}: {e}"))
        }
        e => dp_error("bind the volume to its LUN", e),
    }
}

/// Bind volume `v` (a LUN volume: `m`) to its LUN again (a login and the identity
/// check): recorded as a fault on the volume when it fails, cleared when it works.
async fn rebind(st: &AppState, v: &Vol, m: &ManagedRow) -> ApiResult<ManagedLun> {
    let res = match prepare_pool(st, &m.pool).await {
        Ok(_) => st
            .dataplane()
            .manage(ManageLun {
                volume: v.object(),
                lun: m.lun.clone(),
                identity: m.identity.clone(),
                luks: None,
            })
            .await
            .map_err(|e| {
                let text = fault_text(&e);
                tracing::error!(volume = %v.id, pool = %m.pool, lun = %m.lun, error = %e, "the volume's LUN cannot be used");
                (text, bind_error(&v.id, e))
            }),
        Err(e) => Err((e.message.clone(), e)),
    };
    let mut conn = st.db().pool.acquire().await?;
    match res {
        Ok(b) => {
            set_bound(&mut conn, &v.id, &b).await?;
            Ok(b)
        }
        Err((text, e)) => {
            set_fault(&mut conn, &v.id, Some(&text)).await?;
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hooks of the volume service

/// Before an attach: a LUN volume is bound again (the LUN may have moved, gone, or the
/// daemon restarted); 503 with the reason when it cannot be. Nothing for file volumes.
pub async fn before_attach(st: &AppState, v: &Vol) -> ApiResult<()> {
    let mut conn = st.db().pool.acquire().await?;
    let Some(m) = row_of(&mut conn, &v.id).await? else {
        return Ok(());
    };
    drop(conn);
    rebind(st, v, &m).await.map(drop)
}

/// `os-extend` of a LUN volume (`Ok(false)`: not one, the file path goes on): the
/// array grew the LUN; the volume takes the new size when the LUN has it.
pub async fn extend(st: &AppState, v: &Vol, new_gib: u64) -> ApiResult<bool> {
    let mut conn = st.db().pool.acquire().await?;
    let Some(m) = row_of(&mut conn, &v.id).await? else {
        return Ok(false);
    };
    drop(conn);
    v.status.allows(&v.id, VolumeUse::Extend)?;
    let old_gib = v.size_bytes / GIB;
    if new_gib <= old_gib || new_gib > super::service::MAX_SIZE_GIB {
        return Err(ApiError::bad_request(format!(
            "`os-extend.new_size` must be larger than the current size ({old_gib} GiB) and at most {}",
            super::service::MAX_SIZE_GIB
        )));
    }
    let new_size = new_gib * GIB;
    let bound = rebind(st, v, &m).await?;
    if bound.size < new_size {
        return Err(ApiError::bad_request(format!(
            "LUN {} of pool {} is {} bytes: grow it on the array to at least {new_size} bytes first",
            bound.lun, m.pool, bound.size
        )));
    }
    st.dataplane()
        .grow(v.object(), new_size)
        .await
        .map_err(|e| match e {
            DataPlaneError::NoSpace { need, free, .. } => ApiError::bad_request(format!(
                "LUN {} of pool {} is {free} bytes: grow it on the array to at least {need} bytes first",
                bound.lun, m.pool
            )),
            e => bind_error(&v.id, e),
        })?;
    let mut conn = st.db().pool.acquire().await?;
    rows::set_size(&mut conn, &v.id, new_size).await?;
    tracing::info!(volume = %v.id, lun = %bound.lun, new_size, "LUN volume extended");
    Ok(true)
}

/// The periodic health check of this node's attached LUN volumes (see the module doc):
/// a fault the data plane reports is recorded on the volume and logged, a LUN that
/// serves again has its fault cleared. Returns how many volumes changed.
pub async fn check_health(st: &AppState) -> ApiResult<usize> {
    let report = st
        .dataplane()
        .check_luns()
        .await
        .map_err(|e| dp_error("check the LUNs", e))?;
    let mut changed = 0;
    let mut conn = st.db().pool.acquire().await?;
    for h in report {
        let Some(m) = row_of(&mut conn, &h.volume.id).await? else {
            continue;
        };
        let fault: Option<String> = h.fault.map(|f| f.chars().take(MAX_FAULT).collect());
        if fault == m.fault {
            continue;
        }
        match &fault {
            Some(f) => {
                tracing::error!(volume = %m.volume_id, pool = %m.pool, lun = %m.lun, fault = %f, "LUN volume faulted: its I/O fails until the LUN is back");
            }
            None => {
                tracing::info!(volume = %m.volume_id, pool = %m.pool, lun = %m.lun, "LUN volume serves again; fault cleared");
            }
        }
        set_fault(&mut conn, &m.volume_id, fault.as_deref()).await?;
        changed += 1;
    }
    Ok(changed)
}

/// Add the LUN of a LUN volume to its view (`lun`: pool, name, identity, fault).
pub async fn decorate(conn: &mut AnyConnection, v: &Vol, view: &mut Value) -> ApiResult<()> {
    if let Some(m) = row_of(conn, &v.id).await? {
        view["lun"] = json!({
            "pool": m.pool,
            "name": m.lun,
            "identity": m.identity,
            "health": if m.fault.is_some() { "error" } else { "ok" },
            "fault": m.fault,
            "fault_at": m.fault_at,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Listing

/// Query of the listings.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `node@pool` (or `node@pool#pool`, or a pool name): list only that LUN pool.
    pub host: Option<String>,
    /// Accepted, ignored (the listing is short).
    pub limit: Option<u64>,
    /// Accepted, ignored.
    pub offset: Option<u64>,
    /// Accepted, ignored.
    pub marker: Option<String>,
    /// Accepted, ignored.
    pub sort: Option<String>,
}

/// The pool a `host` names (`node@pool#pool`, `node@pool`, `pool`): 400 when it
/// names another node.
fn pool_of_host(st: &AppState, host: &str) -> ApiResult<String> {
    let (node, rest) = match host.split_once('@') {
        Some((n, r)) => (Some(n), r),
        None => (None, host),
    };
    if let Some(n) = node {
        if n != st.node_name() {
            return Err(ApiError::bad_request(format!(
                "host {host:?} names node {n:?}; this is node {:?}",
                st.node_name()
            )));
        }
    }
    let pool = rest.split('#').next().unwrap_or_default();
    if pool.is_empty() {
        return Err(ApiError::bad_request(format!(
            "host {host:?}: expected NODE@POOL"
        )));
    }
    Ok(pool.to_string())
}

async fn listing(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    q: &ListQuery,
    detail: bool,
) -> ApiResult<Value> {
    check_url_project(st, ctx, project_id).await?;
    ctx.require_admin()?;
    let pools: Vec<String> = match &q.host {
        Some(h) => vec![pool_of_host(st, h)?],
        None => st
            .dataplane()
            .lun_pools()
            .await
            .map_err(|e| dp_error("list the LUN pools", e))?
            .into_iter()
            .map(|p| p.name)
            .collect(),
    };
    let mut out = Vec::new();
    for pool in pools {
        prepare_pool(st, &pool).await?;
        let luns = st
            .dataplane()
            .list_luns(pool.clone())
            .await
            .map_err(|e| match e {
                DataPlaneError::LunUnavailable { .. } => ApiError::unavailable(e.to_string()),
                e => dp_error("list the LUNs", e),
            })?;
        let mut conn = st.db().pool.acquire().await?;
        let managed = rows_of_pool(&mut conn, &pool).await?;
        for l in luns {
            out.push(lun_view(st, &l, &managed, detail));
        }
    }
    Ok(json!({ "manageable-volumes": out }))
}

/// One LUN as Cinder lists a manageable volume.
fn lun_view(st: &AppState, l: &ManageableLun, managed: &[ManagedRow], detail: bool) -> Value {
    let holder = managed
        .iter()
        .find(|m| m.lun == l.name || (m.identity.is_some() && m.identity == l.identity))
        .map(|m| m.volume_id.clone())
        .or_else(|| l.volume_id.clone());
    let reason = match (&holder, &l.unusable) {
        (Some(v), _) => Some(format!("already managed as volume {v}")),
        (None, Some(u)) => Some(u.clone()),
        (None, None) if l.size < GIB => Some(format!(
            "smaller than 1 GiB ({} bytes): volume sizes are whole GiB",
            l.size
        )),
        (None, None) => None,
    };
    let mut o = json!({
        "reference": { "source-name": l.name },
        "size": l.size / GIB,
        "safe_to_manage": reason.is_none(),
        "reason_not_safe": reason,
        "cinder_id": holder,
        "extra_info": null,
    });
    if detail {
        o["host"] = json!(format!("{}@{}#{}", st.node_name(), l.pool, l.pool));
        o["extra_info"] = json!({
            "size_bytes": l.size,
            "identity": l.identity,
            "vendor": l.vendor,
            "product": l.product,
            "paths": l.paths,
        });
    }
    o
}

#[utoipa::path(get, path = "/v3/{project_id}/manageable_volumes", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{manageable-volumes}`: the LUNs of this node's LUN pools"),
        (status = 400, description = "bad host"), (status = 401, description = "no token"),
        (status = 403, description = "not an admin"),
        (status = 503, description = "a target refuses the login, or a CHAP secret is missing")))]
pub async fn list_manageable(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(listing(&st, &ctx, &project_id, &q, false).await?))
}

#[utoipa::path(get, path = "/v3/{project_id}/manageable_volumes/detail", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{manageable-volumes}` with host and extra_info"),
        (status = 400, description = "bad host"), (status = 401, description = "no token"),
        (status = 403, description = "not an admin"),
        (status = 503, description = "a target refuses the login, or a CHAP secret is missing")))]
pub async fn list_manageable_detail(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(listing(&st, &ctx, &project_id, &q, true).await?))
}

// ---------------------------------------------------------------------------------------
// Manage

/// `POST /v3/{project_id}/manageable_volumes` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManageBody {
    /// The LUN and the new volume.
    pub volume: ManageVolume,
}

/// A LUN to manage.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManageVolume {
    /// `node@pool` (or `node@pool#pool`, or the pool's name).
    pub host: Option<String>,
    /// Accepted like `host` (Cinder's cluster form).
    pub cluster: Option<String>,
    /// `{"source-name": "lun-1"}` (iSCSI) or `{"source-name": "/dev/…"}` (devices).
    #[serde(rename = "ref")]
    #[schema(value_type = Object)]
    pub reference: BTreeMap<String, Value>,
    /// Name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Type name or id (default `__DEFAULT__`); an encrypted type formats a blank LUN.
    pub volume_type: Option<String>,
    /// Accepted, ignored.
    pub availability_zone: Option<String>,
    /// Must be empty or absent.
    pub metadata: Option<BTreeMap<String, String>>,
    /// The volume's bootable flag.
    pub bootable: Option<bool>,
}

impl ManageVolume {
    /// Pool and LUN name, once the fields that need no database are checked.
    fn target(&self, st: &AppState) -> ApiResult<(String, String)> {
        let host = self
            .host
            .as_deref()
            .or(self.cluster.as_deref())
            .ok_or_else(|| ApiError::bad_request("`volume.host` is required (NODE@POOL)"))?;
        let pool = pool_of_host(st, host)?;
        if let Some(k) = self.reference.keys().find(|k| *k != "source-name") {
            return Err(ApiError::bad_request(format!(
                "`volume.ref.{k}` is not supported: name the LUN by `source-name`"
            )));
        }
        let lun = match self.reference.get("source-name") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_LUN_NAME => s.clone(),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`volume.ref.source-name` must be a LUN name of 1..{MAX_LUN_NAME} characters"
                )))
            }
        };
        crate::api::check_len("volume.name", self.name.as_deref().unwrap_or(""), 0, 255)?;
        if let Some(d) = &self.description {
            crate::api::check_len("volume.description", d, 0, 255)?;
        }
        if self.metadata.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::bad_request(
                "`volume.metadata` is not supported (leave it empty)",
            ));
        }
        Ok((pool, lun))
    }
}

#[utoipa::path(post, path = "/v3/{project_id}/manageable_volumes", tag = "volumes", request_body = ManageBody,
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 202, description = "`{volume}` (status creating; available or error once the LUN is bound)"),
        (status = 400, description = "bad input, not a LUN pool"), (status = 401, description = "no token"),
        (status = 403, description = "not an admin"), (status = 404, description = "no such type"),
        (status = 409, description = "the LUN is managed already")))]
pub async fn manage(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<ManageBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_url_project(&st, &ctx, &project_id).await?;
    ctx.require_admin()?;
    let req = body.volume;
    let (pool, lun) = req.target(&st)?;
    let is_lun_pool = st
        .dataplane()
        .lun_pools()
        .await
        .map_err(|e| dp_error("list the LUN pools", e))?
        .iter()
        .any(|p| p.name == pool);
    if !is_lun_pool {
        return Err(ApiError::bad_request(format!(
            "{pool:?} is not a LUN pool of this node"
        )));
    }
    let mut conn = st.db().pool.acquire().await?;
    let t = types::resolve(
        &mut conn,
        &ctx,
        req.volume_type.as_deref().unwrap_or(types::DEFAULT_TYPE),
    )
    .await?;
    if let Some(b) = t.backend_name() {
        if b != pool {
            return Err(ApiError::bad_request(format!(
                "volume type {} keeps its volumes in pool {b:?}, not {pool:?}",
                t.name
            )));
        }
    }
    drop(conn);

    let vol_id = new_id();
    let (lun, pool, project_id, req, st, t, vol_id) =
        (&lun, &pool, &project_id, &req, &st, &t, &vol_id);
    let (luks, v) = st
        .db()
        .write("manage", |mut tx| async move {
            // A row left by a deleted volume frees its LUN.
            sqlx::query(
                "DELETE FROM managed_luns WHERE pool = ? AND lun = ? \
         AND NOT EXISTS (SELECT 1 FROM volumes v WHERE v.id = managed_luns.volume_id)",
            )
            .bind(pool.clone())
            .bind(lun.clone())
            .execute(&mut *tx)
            .await?;
            let sql = "SELECT volume_id FROM managed_luns WHERE pool = ? AND lun = ?";
            let held = fetch_optional_args(&mut tx, sql, &[pool, lun]).await?;
            if let Some(r) = held {
                return Err(ApiError::conflict(format!(
                    "LUN {lun} of pool {pool} is managed already (volume {})",
                    get_str(&r, "volume_id")?
                )));
            }
            let (key, luks) = match &t.encryption {
                None => (None, None),
                Some(enc) => {
                    let k = keys::order_volume_key(
                        &mut tx,
                        st.master(),
                        project_id,
                        enc.key_fit(),
                        vol_id,
                    )
                    .await?;
                    let pass =
                        Passphrase::new(keys::volume_passphrase(&mut tx, st.master(), &k).await?);
                    let f = LuksFormat {
                        version: enc.luks_version(),
                        key_bits: enc.key_bits(),
                        passphrase: pass,
                    };
                    (Some(k), Some(f))
                }
            };
            let t_now = now();
            let v = Vol {
                id: vol_id.clone(),
                project_id: project_id.clone(),
                name: req.name.clone().unwrap_or_default(),
                description: req.description.clone(),
                size_bytes: 0,
                type_id: t.id.clone(),
                encryption_key_id: key.clone(),
                owns_key: key.is_some(),
                pool: pool.clone(),
                node_id: Some(st.node_name().to_string()),
                status: Status::Creating,
                source_volid: None,
                snapshot_id: None,
                bootable: req.bootable.unwrap_or(false),
                readonly: false,
                created_at: t_now.clone(),
                updated_at: t_now.clone(),
            };
            rows::insert_vol(&mut tx, &v).await?;
            sqlx::query(
        "INSERT INTO managed_luns (volume_id, pool, lun, identity, fault, fault_at, managed_at) \
         VALUES (?, ?, ?, NULL, NULL, NULL, ?)",
    )
    .bind(vol_id.clone())
    .bind(pool.clone())
    .bind(lun.clone())
    .bind(t_now)
    .execute(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            ApiError::conflict(format!("LUN {lun} of pool {pool} is managed already"))
        }
        _ => e.into(),
    })?;
            tx.commit().await?;
            ApiResult::Ok((luks, v))
        })
        .await?;
    tracing::info!(volume = %vol_id, pool = %pool, lun = %lun, encrypted = luks.is_some(), "managing a LUN");
    tokio::spawn(run_manage(st.clone(), v.clone(), lun.clone(), luks));
    let mut conn = st.db().pool.acquire().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "volume": volume_view(&mut conn, &v).await? })),
    ))
}

/// The background part of a manage: bind, record size and identity, `available`; or
/// `error` with the reason.
async fn run_manage(st: AppState, v: Vol, lun: String, luks: Option<LuksFormat>) {
    let object = v.object();
    let res = match prepare_pool(&st, &v.pool).await {
        Err(e) => Err(e.message),
        Ok(_) => st
            .dataplane()
            .manage(ManageLun {
                volume: object.clone(),
                lun: lun.clone(),
                identity: None,
                luks,
            })
            .await
            .map_err(|e| {
                tracing::error!(volume = %v.id, pool = %v.pool, lun = %lun, error = %e, "cannot manage the LUN");
                fault_text(&e)
            }),
    };
    if let Err(e) = end_manage(&st, &object, res).await {
        tracing::error!(volume = %v.id, error = %e, "cannot record the end of a manage");
    }
}

async fn end_manage(
    st: &AppState,
    object: &ObjectRef,
    res: Result<ManagedLun, String>,
) -> ApiResult<()> {
    let mut conn = st.db().pool.acquire().await?;
    match res {
        Ok(b) => {
            rows::set_size(&mut conn, &object.id, b.size).await?;
            set_bound(&mut conn, &object.id, &b).await?;
            if rows::apply(&mut conn, object, Event::Built).await? {
                tracing::info!(volume = %object.id, lun = %b.lun, size = b.size, identity = ?b.identity, "LUN managed");
            } else {
                // Deleted while it was being bound: let the LUN go again.
                drop(conn);
                unbind(st.dataplane().as_ref(), object).await;
            }
        }
        Err(reason) => {
            set_fault(&mut conn, &object.id, Some(&reason)).await?;
            rows::apply(&mut conn, object, Event::BuildFailed).await?;
            drop(conn);
            unbind(st.dataplane().as_ref(), object).await;
        }
    }
    Ok(())
}

async fn unbind(dp: &dyn DataPlane, object: &ObjectRef) {
    if let Err(e) = dp.unmanage(object.clone()).await {
        tracing::warn!(object = %object, error = %e, "cannot release the LUN binding");
    }
}

// ---------------------------------------------------------------------------------------
// Unmanage

/// `os-unmanage`: forget a LUN volume, leave its bytes (and its key, which stays a
/// secret of the project) as they are.
pub async fn unmanage(st: &AppState, ctx: &Ctx, project_id: &str, id: &str) -> ApiResult<()> {
    ctx.require_admin()?;
    let mut conn = st.db().pool.acquire().await?;
    let v = load::<Vol>(&mut conn, ctx, project_id, id).await?;
    if row_of(&mut conn, id).await?.is_none() {
        return Err(ApiError::bad_request(format!(
            "volume {id} is not on a LUN pool: only managed LUN volumes can be unmanaged"
        )));
    }
    if !rows::attachments_of(&mut conn, id).await?.is_empty() {
        return Status::InUse.allows(id, VolumeUse::Delete);
    }
    v.status.allows(id, VolumeUse::Delete)?;
    if !rows::apply(&mut conn, &v.object(), Event::DeleteStarted).await? {
        return Err(ApiError::conflict(format!(
            "volume {id} changed state; retry"
        )));
    }
    drop(conn);
    if let Err(e) = st.dataplane().unmanage(v.object()).await {
        let mut conn = st.db().pool.acquire().await?;
        rows::apply(&mut conn, &v.object(), Event::DeleteAbandoned).await?;
        return Err(dp_error("release the LUN", e));
    }
    st.db()
        .write("unmanage", |mut tx| async move {
            rows::delete_vol(&mut tx, id).await?;
            delete_row(&mut tx, id).await?;
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    tracing::info!(volume = %id, key = ?v.encryption_key_id, "LUN volume unmanaged (its bytes and key stay)");
    Ok(())
}
