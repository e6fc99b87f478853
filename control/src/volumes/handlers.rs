//! The volume and snapshot REST handlers: HTTP only. Each one checks the URL's project
//! and the caller's role, parses the body (strictly, [`ApiJson`]), calls
//! [`super::service`] and renders its answer with [`super::views`].

use super::rows::{Snap, Vol};
use super::service::{self, NewSnapshot, NewVolume, Source};
use crate::api::{check_len, ApiJson, BoolLike};
use crate::auth::Ctx;
use crate::dataplane::Protocol;
use crate::error::{ApiError, ApiResult};
use crate::projects::{check_url_project, project_conn};
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

// ---------------------------------------------------------------------------------------
// Bodies

/// `POST /v3/{project_id}/volumes` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreateBody {
    /// The new volume.
    pub volume: VolumeCreate,
    /// Accepted and ignored (one node decides).
    #[serde(default, rename = "OS-SCH-HNT:scheduler_hints")]
    #[schema(value_type = Option<Object>)]
    pub scheduler_hints: Option<Value>,
}

/// A new volume.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    /// Size in GiB (default: the source's).
    pub size: Option<u64>,
    /// Name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Type name or id (default: the source's type, else `__DEFAULT__`).
    pub volume_type: Option<String>,
    /// An existing secret of the caller to encrypt with.
    pub encryption_key_id: Option<String>,
    /// Clone this volume.
    pub source_volid: Option<String>,
    /// Create from this snapshot.
    pub snapshot_id: Option<String>,
    /// Accepted, ignored.
    pub availability_zone: Option<String>,
    /// Accepted, ignored (every Ember volume can be attached several times).
    pub multiattach: Option<bool>,
    /// Must be empty or absent.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /volumes/{id}/action` body: exactly one action.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAction {
    /// Grow the volume.
    #[serde(rename = "os-extend")]
    pub extend: Option<ExtendArgs>,
    /// Attach.
    #[serde(rename = "os-initialize_connection")]
    pub initialize: Option<ConnectionArgs>,
    /// Detach.
    #[serde(rename = "os-terminate_connection")]
    pub terminate: Option<ConnectionArgs>,
    /// Forget a LUN volume, leave its bytes (admin; `null` or `{}`).
    #[serde(rename = "os-unmanage", default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    pub unmanage: Option<Value>,
}

/// A field that is present (even `null`) is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(Some(Value::deserialize(d)?))
}

/// `os-extend` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendArgs {
    /// New size in GiB.
    pub new_size: u64,
}

/// `os-initialize_connection` / `os-terminate_connection` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionArgs {
    /// The connector.
    pub connector: Connector,
}

/// Who connects, and how.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Connector {
    /// `nbd` or `vhost-user`.
    pub protocol: Option<String>,
    /// Terminate only this attachment.
    pub attachment_id: Option<String>,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Other connector properties (host, initiator…) are accepted and ignored.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: BTreeMap<String, Value>,
}

/// `POST /v3/{project_id}/snapshots` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateBody {
    /// The new snapshot.
    pub snapshot: SnapshotCreate,
}

/// A new snapshot.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Source volume.
    pub volume_id: String,
    /// Name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Allow snapshots of in-use volumes (taken at one instant).
    #[schema(value_type = Option<bool>)]
    pub force: Option<BoolLike>,
    /// Must be empty or absent.
    pub metadata: Option<BTreeMap<String, String>>,
}

// ---------------------------------------------------------------------------------------
// Checks of the request itself

/// First checks of every change to a project's volumes and snapshots: the URL's
/// project, then a role that may write.
async fn check_writer_project(st: &AppState, ctx: &Ctx, project_id: &str) -> ApiResult<()> {
    check_url_project(st, ctx, project_id).await?;
    ctx.require_writer()
}

/// The descriptive fields of a new volume or snapshot (`what`): name and description of
/// up to 255 characters, and no metadata.
fn check_descriptive(
    what: &str,
    name: &str,
    description: &Option<String>,
    metadata: &Option<BTreeMap<String, String>>,
) -> ApiResult<()> {
    check_len(&format!("{what}.name"), name, 0, 255)?;
    if let Some(d) = description {
        check_len(&format!("{what}.description"), d, 0, 255)?;
    }
    if metadata.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad_request(format!(
            "`{what}.metadata` is not supported (leave it empty)"
        )));
    }
    Ok(())
}

impl VolumeCreate {
    /// The service's request, once the fields that need no database are checked.
    pub fn validate(self) -> ApiResult<NewVolume> {
        let name = self.name.unwrap_or_default();
        check_descriptive("volume", &name, &self.description, &self.metadata)?;
        let source = match (self.source_volid, self.snapshot_id) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give at most one of `volume.source_volid` and `volume.snapshot_id`",
                ))
            }
            (Some(v), None) => Some(Source::Volume(v)),
            (None, Some(s)) => Some(Source::Snapshot(s)),
            (None, None) => None,
        };
        Ok(NewVolume {
            name,
            description: self.description,
            size_gib: self.size,
            volume_type: self.volume_type,
            encryption_key_id: self.encryption_key_id,
            source,
        })
    }
}

impl SnapshotCreate {
    /// The service's request, once the fields that need no database are checked.
    pub fn validate(self) -> ApiResult<NewSnapshot> {
        let name = self.name.unwrap_or_default();
        check_descriptive("snapshot", &name, &self.description, &self.metadata)?;
        Ok(NewSnapshot {
            volume_id: self.volume_id,
            name,
            description: self.description,
            force: self.force.is_some_and(|f| f.0),
        })
    }
}

impl Connector {
    /// The protocol named (`None` when absent).
    pub fn protocol(&self) -> ApiResult<Option<Protocol>> {
        match self.protocol.as_deref() {
            None => Ok(None),
            Some("nbd") => Ok(Some(Protocol::Nbd)),
            Some("vhost-user") | Some("vhost_user") => Ok(Some(Protocol::VhostUser)),
            Some(p) => Err(ApiError::bad_request(format!(
                "connector.protocol {p:?}: use \"nbd\" or \"vhost-user\""
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Volume handlers

#[utoipa::path(get, path = "/v3/{project_id}/volumes", tag = "volumes",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{volumes}` of the project"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_volumes(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let mut out = Vec::new();
    for v in super::rows::of_project::<Vol>(&mut conn, &project_id).await? {
        out.push(service::volume_view(&mut conn, &v).await?);
    }
    Ok(Json(json!({ "volumes": out })))
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes/detail", tag = "volumes",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{volumes}` of the project"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_volumes_detail(
    st: State<AppState>,
    ctx: Ctx,
    p: Path<String>,
) -> ApiResult<Json<Value>> {
    list_volumes(st, ctx, p).await
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes/{volume_id}", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{volume}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such volume")))]
pub async fn show_volume(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let v = service::load::<Vol>(&mut conn, &ctx, &project_id, &id).await?;
    Ok(Json(
        json!({ "volume": service::volume_view(&mut conn, &v).await? }),
    ))
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes/{volume_id}/encryption", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`encryption_key_id`, `provider`, `cipher`, `key_size`, `control_location`"),
        (status = 401, description = "no token"), (status = 403, description = "another project"),
        (status = 404, description = "no such volume")))]
pub async fn volume_encryption(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let v = service::load::<Vol>(&mut conn, &ctx, &project_id, &id).await?;
    Ok(Json(service::encryption_view(&mut conn, &v).await?))
}

#[utoipa::path(post, path = "/v3/{project_id}/volumes", tag = "volumes", request_body = VolumeCreateBody,
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 202, description = "`{volume}` (status creating)"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such type, volume or snapshot"),
        (status = 409, description = "the source is being deleted or is locked (Retry-After)"),
        (status = 413, description = "not enough space in the pool")))]
pub async fn create_volume(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<VolumeCreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let req = body.volume.validate()?;
    let v = service::create_volume(&st, &ctx, &project_id, req).await?;
    let mut conn = st.db().pool.acquire().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "volume": service::volume_view(&mut conn, &v).await? })),
    ))
}

#[utoipa::path(delete, path = "/v3/{project_id}/volumes/{volume_id}", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 202, description = "deleted"), (status = 400, description = "in use, has snapshots, or busy status"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"),
        (status = 409, description = "clones still run after the wait (Retry-After)")))]
pub async fn delete_volume(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    check_writer_project(&st, &ctx, &project_id).await?;
    service::delete_volume(&st, &ctx, &project_id, &id).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v3/{project_id}/volumes/{volume_id}/action", tag = "volumes",
    request_body = VolumeAction, params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{connection_info}` (os-initialize_connection)"),
        (status = 202, description = "done (os-extend, os-terminate_connection)"),
        (status = 400, description = "bad action or status"), (status = 401, description = "no token"),
        (status = 403, description = "reader or another project"), (status = 404, description = "no such volume"),
        (status = 409, description = "locked (Retry-After)"), (status = 413, description = "not enough space")))]
pub async fn volume_action(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(a): ApiJson<VolumeAction>,
) -> ApiResult<Response> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let n = usize::from(a.extend.is_some())
        + usize::from(a.initialize.is_some())
        + usize::from(a.terminate.is_some())
        + usize::from(a.unmanage.is_some());
    if n != 1 {
        return Err(ApiError::bad_request(
            "give exactly one action: os-extend, os-initialize_connection, os-terminate_connection or os-unmanage",
        ));
    }
    if a.unmanage.is_some() {
        super::manageable::unmanage(&st, &ctx, &project_id, &id).await?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let mut conn = st.db().pool.acquire().await?;
    let v = service::load::<Vol>(&mut conn, &ctx, &project_id, &id).await?;
    drop(conn);
    if let Some(e) = a.extend {
        service::extend(&st, &v, e.new_size).await?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    if let Some(c) = a.initialize {
        let protocol = c.connector.protocol()?.unwrap_or(Protocol::Nbd);
        let info = service::attach(&st, &v, protocol, c.connector.read_only).await?;
        return Ok(Json(info).into_response());
    }
    if let Some(c) = a.terminate {
        let protocol = c.connector.protocol()?;
        service::detach(&st, &v, protocol, c.connector.attachment_id.as_deref()).await?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    Err(ApiError::bad_request("no action"))
}

// ---------------------------------------------------------------------------------------
// Snapshot handlers

#[utoipa::path(get, path = "/v3/{project_id}/snapshots", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{snapshots}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_snapshots(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let out: Vec<Value> = super::rows::of_project::<Snap>(&mut conn, &project_id)
        .await?
        .iter()
        .map(super::views::snapshot)
        .collect();
    Ok(Json(json!({ "snapshots": out })))
}

#[utoipa::path(get, path = "/v3/{project_id}/snapshots/{snapshot_id}", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "`{snapshot}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such snapshot")))]
pub async fn show_snapshot(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let s = service::load::<Snap>(&mut conn, &ctx, &project_id, &id).await?;
    Ok(Json(json!({ "snapshot": super::views::snapshot(&s) })))
}

#[utoipa::path(post, path = "/v3/{project_id}/snapshots", tag = "snapshots",
    request_body = SnapshotCreateBody, params(("project_id" = String, Path, description = "project id")),
    responses((status = 202, description = "`{snapshot}` (status creating)"), (status = 400, description = "bad input or status"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"), (status = 409, description = "volume locked (Retry-After)"),
        (status = 413, description = "not enough space")))]
pub async fn create_snapshot(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<SnapshotCreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let req = body.snapshot.validate()?;
    let s = service::create_snapshot(&st, &ctx, &project_id, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "snapshot": super::views::snapshot(&s) })),
    ))
}

#[utoipa::path(delete, path = "/v3/{project_id}/snapshots/{snapshot_id}", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 202, description = "deleted"), (status = 400, description = "busy status"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such snapshot"), (status = 409, description = "clones still run (Retry-After)")))]
pub async fn delete_snapshot(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    check_writer_project(&st, &ctx, &project_id).await?;
    service::delete_snapshot(&st, &ctx, &project_id, &id).await?;
    Ok(StatusCode::ACCEPTED)
}
