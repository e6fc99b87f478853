//! `/v3/locks`: inspect the database locks and let an external orchestrator (a Cinder
//! driver, say) take and release the same locks Ember's own operations use.
//!
//! Admin only. `POST` waits up to `wait_s` (default 0: one attempt) and answers 409 with
//! `Retry-After` when the lock stays busy. Locks taken here are `external`: their lease
//! is their own `ttl_s` (default 60 s), renewed by `PUT /v3/locks/{id}`, not by the
//! heartbeat of the node that served the request — unless `node_lease` is true: then
//! the holder belongs to that node like its own operations' locks (the node's lease,
//! renewed by its heartbeat, released when it restarts, expired one lease after it
//! dies), for an orchestrator that runs beside its node and must not outlive it.

use super::{LockRequest, Mode};
use crate::api::{check_len, ApiJson};
use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Longest wait a request may ask for.
const MAX_WAIT_S: u64 = 300;
/// Longest lease a request may ask for.
const MAX_TTL_S: u64 = 24 * 3600;
/// Lease of an external lock when none is given.
const DEFAULT_TTL_S: u64 = 60;

/// `POST /v3/locks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockCreateBody {
    /// The lock to take.
    pub lock: LockCreate,
}

/// A lock to take.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockCreate {
    /// `volume`, `snapshot`, or any name of 1..32 characters.
    pub resource_type: String,
    /// The resource's id.
    pub resource_id: String,
    /// `shared` or `exclusive`.
    pub mode: Mode,
    /// What the holder does (default `external`).
    pub operation: Option<String>,
    /// Who holds it (free text).
    pub holder: Option<String>,
    /// Lease in seconds (default 60).
    pub ttl_s: Option<u64>,
    /// Tie the holder to the serving node's heartbeat instead of `ttl_s` (default false).
    pub node_lease: Option<bool>,
    /// How long to wait for the lock (default 0).
    pub wait_s: Option<f64>,
}

/// `GET /v3/locks` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockQuery {
    /// Only locks of this resource.
    pub resource_id: Option<String>,
    /// Also locks nobody holds or waits for.
    pub all: Option<bool>,
}

/// `GET /v3/locks/history` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Resource type (default `volume`).
    pub resource_type: Option<String>,
    /// Resource id.
    pub resource_id: String,
}

#[utoipa::path(get, path = "/v3/locks", tag = "locks",
    params(("resource_id" = Option<String>, Query, description = "only this resource"),
        ("all" = Option<bool>, Query, description = "include idle locks")),
    responses((status = 200, description = "`{locks}` with holders and waiting writers"),
        (status = 401, description = "no token"), (status = 403, description = "not admin")))]
pub async fn list_locks(
    State(st): State<AppState>,
    ctx: Ctx,
    Query(q): Query<LockQuery>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    let locks = st
        .locks()
        .list(q.resource_id.as_deref(), q.all.unwrap_or(false))
        .await?;
    Ok(Json(json!({ "locks": locks })))
}

#[utoipa::path(get, path = "/v3/locks/history", tag = "locks",
    params(("resource_type" = Option<String>, Query, description = "default volume"),
        ("resource_id" = String, Query, description = "resource id")),
    responses((status = 200, description = "`{history}`: every grant with acquire/release generations"),
        (status = 401, description = "no token"), (status = 403, description = "not admin")))]
pub async fn lock_history(
    State(st): State<AppState>,
    ctx: Ctx,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    let t = q.resource_type.unwrap_or_else(|| "volume".into());
    let h = st.locks().history(&t, &q.resource_id).await?;
    Ok(Json(json!({ "history": h })))
}

#[utoipa::path(post, path = "/v3/locks", tag = "locks",
    responses((status = 201, description = "`{lock}`: the holder (release with its id)"),
        (status = 400, description = "bad input"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 409, description = "busy (Retry-After)")))]
pub async fn create_lock(
    State(st): State<AppState>,
    ctx: Ctx,
    ApiJson(body): ApiJson<LockCreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    let l = body.lock;
    check_len("lock.resource_type", &l.resource_type, 1, 32)?;
    check_len("lock.resource_id", &l.resource_id, 1, 255)?;
    let op = l.operation.unwrap_or_else(|| "external".into());
    check_len("lock.operation", &op, 1, 64)?;
    let holder = l.holder.unwrap_or_default();
    check_len("lock.holder", &holder, 0, 255)?;
    let node_lease = l.node_lease.unwrap_or(false);
    if node_lease && l.ttl_s.is_some() {
        return Err(ApiError::bad_request(
            "`lock.ttl_s` and `lock.node_lease` exclude each other",
        ));
    }
    let ttl = l.ttl_s.unwrap_or(DEFAULT_TTL_S);
    if ttl == 0 || ttl > MAX_TTL_S {
        return Err(ApiError::bad_request(format!(
            "`lock.ttl_s` must be 1..{MAX_TTL_S}"
        )));
    }
    let wait = l.wait_s.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT_S as f64).contains(&wait) {
        return Err(ApiError::bad_request(format!(
            "`lock.wait_s` must be 0..{MAX_WAIT_S}"
        )));
    }
    let req = LockRequest {
        resource_type: l.resource_type,
        resource_id: l.resource_id,
        mode: l.mode,
        operation: op,
        holder,
        external: !node_lease,
        lease: (!node_lease).then(|| Duration::from_secs(ttl)),
        wait: Duration::from_secs_f64(wait),
    };
    let h = if wait == 0.0 {
        match st.locks().try_acquire(&req).await? {
            Some(h) => h,
            None => {
                // One attempt failed: say why through the same path as a timed-out wait.
                st.locks().acquire(&req).await.map_err(ApiError::from)?
            }
        }
    } else {
        st.locks().acquire(&req).await?
    };
    Ok((StatusCode::CREATED, Json(json!({ "lock": h }))))
}

#[utoipa::path(get, path = "/v3/locks/{holder_id}", tag = "locks",
    params(("holder_id" = String, Path, description = "holder id from POST")),
    responses((status = 200, description = "`{lock}`"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "not held")))]
pub async fn show_lock(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    match st.locks().holder(&id).await? {
        Some(h) => Ok(Json(json!({ "lock": h }))),
        None => Err(ApiError::not_found(format!("lock holder {id} not found"))),
    }
}

#[utoipa::path(put, path = "/v3/locks/{holder_id}", tag = "locks",
    params(("holder_id" = String, Path, description = "holder id from POST")),
    responses((status = 200, description = "lease renewed: `{lock}`"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "not held (released or expired)")))]
pub async fn renew_lock(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    if !st.locks().renew(&id).await? {
        return Err(ApiError::not_found(format!(
            "lock holder {id} not found (released or expired)"
        )));
    }
    show_lock(State(st), ctx, Path(id)).await
}

#[utoipa::path(delete, path = "/v3/locks/{holder_id}", tag = "locks",
    params(("holder_id" = String, Path, description = "holder id from POST")),
    responses((status = 204, description = "released"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "not held")))]
pub async fn delete_lock(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    ctx.require_admin()?;
    if st.locks().release(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("lock holder {id} not found")))
    }
}
