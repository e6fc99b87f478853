//! The attachments API (`/v3/{project_id}/attachments…`, microversion 3.27+), as Nova
//! drives it: HTTP only, the work is in [`super::service`].
//!
//! - `POST /attachments` `{"attachment": {volume_uuid, instance_uuid, connector, mode}}`:
//!   with a connector the attachment gets its front end at once (status `attaching`,
//!   the volume `in-use`) and the answer carries `connection_info`; without one it is a
//!   reservation (status `reserved`, an available volume becomes `reserved`).
//! - `PUT /attachments/{id}` `{"attachment": {"connector": {…}}}`: a reservation gets
//!   its front end; a live attachment answers its recorded `connection_info`.
//! - `POST /attachments/{id}/action` `{"os-complete": …}` (3.44+): `attached`.
//! - `DELETE /attachments/{id}`: the front end goes (its clients are disconnected); the
//!   volume is `available` when no attachment is left.
//! - `GET /attachments[/detail]`, `GET /attachments/{id}`: filters `volume_id`,
//!   `instance_id`, `status`, paging as the other listings.
//!
//! `mode` (`rw`/`ro`, 3.54+) and the volume's `readonly` flag make a read-only front
//! end. The connector's `protocol` picks NBD (the default) or vhost-user, as for
//! `os-initialize_connection`.

use super::handlers::Connector;
use super::listing::{select, ListQuery};
use super::rows::{self, AttachStatus, Attachment, Vol};
use super::service::{self, AttachRequest};
use super::views;
use crate::api::{parse_value, ApiJson};
use crate::auth::Ctx;
use crate::dataplane::Protocol;
use crate::error::{ApiError, ApiResult};
use crate::projects::check_url_project;
use crate::state::AppState;
use crate::versions::{Microversion, Origin, Version};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The attachments API's first microversion.
pub const ATTACHMENTS_MIN: Version = Version(3, 27);
/// `os-complete`'s first microversion.
pub const COMPLETE_MIN: Version = Version(3, 44);
/// `mode`'s first microversion.
pub const MODE_MIN: Version = Version(3, 54);

/// `POST /attachments` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentCreateBody {
    /// The new attachment.
    pub attachment: AttachmentCreate,
}

/// A new attachment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentCreate {
    /// The volume.
    pub volume_uuid: String,
    /// The server it is for.
    pub instance_uuid: Option<String>,
    /// How the host connects (null: a reservation).
    pub connector: Option<Connector>,
    /// `rw` (default) or `ro` (3.54+).
    pub mode: Option<String>,
}

/// `PUT /attachments/{id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentUpdateBody {
    /// The change.
    pub attachment: AttachmentUpdate,
}

/// The connector of a reservation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentUpdate {
    /// How the host connects.
    pub connector: Connector,
}

/// `POST /attachments/{id}/action` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachmentAction {
    /// The consumer uses the attachment now (null or `{}`).
    #[serde(rename = "os-complete")]
    #[schema(value_type = Object)]
    pub complete: Value,
}

/// The URL's and the microversion's checks; `write`: a role that may change things.
async fn check(
    st: &AppState,
    ctx: &Ctx,
    mv: Microversion,
    project_id: &str,
    write: bool,
) -> ApiResult<()> {
    mv.require(ATTACHMENTS_MIN, "the attachments API")?;
    check_url_project(st, ctx, project_id).await?;
    if write {
        ctx.require_writer()?;
    }
    Ok(())
}

/// Attachment `id` of a volume of the URL's project (admins: any); 404 otherwise.
async fn load(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    id: &str,
) -> ApiResult<(Attachment, Vol)> {
    let mut conn = st.db().pool.acquire().await?;
    let found = rows::find_attachment(&mut conn, id).await?;
    let (a, owner) = match found {
        Some((a, owner)) if owner == project_id || ctx.is_admin() => (a, owner),
        _ => return Err(ApiError::not_found(format!("attachment {id} not found"))),
    };
    let v = service::load::<Vol>(&mut conn, ctx, &owner, &a.volume_id).await?;
    Ok((a, v))
}

fn protocol_of(c: &Connector) -> ApiResult<Protocol> {
    Ok(c.protocol()?.unwrap_or(Protocol::Nbd))
}

fn read_only(mv: Microversion, mode: Option<&str>) -> ApiResult<bool> {
    match mode {
        None => Ok(false),
        Some(_) if !mv.at_least(MODE_MIN) => Err(ApiError::bad_request(format!(
            "`attachment.mode` needs microversion {MODE_MIN} or later"
        ))),
        Some("rw") => Ok(false),
        Some("ro") => Ok(true),
        Some(m) => Err(ApiError::bad_request(format!(
            "`attachment.mode` {m:?} must be rw or ro"
        ))),
    }
}

#[utoipa::path(post, path = "/v3/{project_id}/attachments", tag = "attachments",
    request_body = AttachmentCreateBody, params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{attachment}` (with `connection_info` when a connector was given)"),
        (status = 400, description = "bad input or volume status"), (status = 401, description = "no token"),
        (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume, or microversion below 3.27"),
        (status = 409, description = "the volume changed meanwhile")))]
pub async fn create_attachment(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<AttachmentCreateBody>,
) -> ApiResult<Json<Value>> {
    check(&st, &ctx, mv, &project_id, true).await?;
    let b = body.attachment;
    let ro = read_only(mv, b.mode.as_deref())?;
    let mut conn = st.db().pool.acquire().await?;
    let v = service::load::<Vol>(&mut conn, &ctx, &project_id, &b.volume_uuid).await?;
    drop(conn);
    let id = match &b.connector {
        Some(c) => {
            let protocol = protocol_of(c)?;
            let req = AttachRequest {
                protocol,
                read_only: ro || c.read_only,
                instance_uuid: b.instance_uuid.clone(),
                status: AttachStatus::Attaching,
                unix_peer: c.unix_peer(protocol)?,
            };
            let made = service::attach(&st, &v, req).await?;
            // The answer carries the credentials (the stored row does not).
            let (a, _) = load(&st, &ctx, &project_id, &made.id).await?;
            let mut view = views::attachment_api(&a, true);
            view["connection_info"] = made.connection_info;
            return Ok(Json(json!({ "attachment": view })));
        }
        None => service::reserve(&st, &v, b.instance_uuid.clone(), ro).await?,
    };
    let (a, _) = load(&st, &ctx, &project_id, &id).await?;
    Ok(Json(
        json!({ "attachment": views::attachment_api(&a, true) }),
    ))
}

/// The listing of `project_id` (after [`check`]), `full` for `/detail`.
async fn list_any(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    q: ListQuery,
    origin: Origin,
    query: Option<String>,
    full: bool,
) -> ApiResult<Json<Value>> {
    let l = q.parse(&ctx)?;
    let mut conn = st.db().pool.acquire().await?;
    let project = match (l.all_projects, l.project_filter()) {
        (true, None) => None,
        (true, Some(p)) => Some(p.to_string()),
        (false, _) => Some(project_id.clone()),
    };
    let all: Vec<Value> = rows::attachments_of_project(&mut conn, project.as_deref())
        .await?
        .iter()
        .map(|a| {
            let mut v = views::attachment_api(a, true);
            // Sort keys of the listings.
            v["created_at"] = json!(a.attached_at);
            v
        })
        .collect();
    let (page, next) = select(all, &l)?;
    let page: Vec<Value> = page
        .into_iter()
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("created_at");
                if !full {
                    for k in [
                        "attached_at",
                        "detached_at",
                        "attach_mode",
                        "connection_info",
                    ] {
                        o.remove(k);
                    }
                }
            }
            v
        })
        .collect();
    let path = if full {
        "attachments/detail"
    } else {
        "attachments"
    };
    let mut o = json!({ "attachments": page });
    if let Some(m) = next {
        o["attachments_links"] = json!([{"rel": "next", "href": origin.url(&format!(
            "/v3/{project_id}/{path}?{}", super::listing::next_query(query.as_deref(), &m)))}]);
    }
    Ok(Json(o))
}

#[utoipa::path(get, path = "/v3/{project_id}/attachments", tag = "attachments",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{attachments}` (id, status, instance, volume_id)"),
        (status = 400, description = "bad query"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "microversion below 3.27")))]
pub async fn list_attachments(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
    origin: Origin,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    check(&st, &ctx, mv, &project_id, false).await?;
    list_any(st, ctx, project_id, q, origin, query, false).await
}

#[utoipa::path(get, path = "/v3/{project_id}/attachments/detail", tag = "attachments",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{attachments}` with mode, times and connection_info"),
        (status = 400, description = "bad query"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "microversion below 3.27")))]
pub async fn list_attachments_detail(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
    origin: Origin,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    check(&st, &ctx, mv, &project_id, false).await?;
    list_any(st, ctx, project_id, q, origin, query, true).await
}

#[utoipa::path(get, path = "/v3/{project_id}/attachments/{attachment_id}", tag = "attachments",
    params(("project_id" = String, Path, description = "project id"), ("attachment_id" = String, Path, description = "attachment id")),
    responses((status = 200, description = "`{attachment}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"),
        (status = 404, description = "no such attachment, or microversion below 3.27")))]
pub async fn show_attachment(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    check(&st, &ctx, mv, &project_id, false).await?;
    let (a, _) = load(&st, &ctx, &project_id, &id).await?;
    Ok(Json(
        json!({ "attachment": views::attachment_api(&a, true) }),
    ))
}

#[utoipa::path(put, path = "/v3/{project_id}/attachments/{attachment_id}", tag = "attachments",
    request_body = AttachmentUpdateBody,
    params(("project_id" = String, Path, description = "project id"), ("attachment_id" = String, Path, description = "attachment id")),
    responses((status = 200, description = "`{attachment}` with `connection_info`"),
        (status = 400, description = "bad connector or volume status"), (status = 401, description = "no token"),
        (status = 403, description = "reader or another project"),
        (status = 404, description = "no such attachment, or microversion below 3.27"),
        (status = 409, description = "changed meanwhile")))]
pub async fn update_attachment(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<AttachmentUpdateBody>,
) -> ApiResult<Json<Value>> {
    check(&st, &ctx, mv, &project_id, true).await?;
    let (a, v) = load(&st, &ctx, &project_id, &id).await?;
    let c = &body.attachment.connector;
    let protocol = protocol_of(c)?;
    let info = service::connect(&st, &v, &a, protocol, c.unix_peer(protocol)?).await?;
    let (a, _) = load(&st, &ctx, &project_id, &id).await?;
    let mut view = views::attachment_api(&a, true);
    view["connection_info"] = info;
    Ok(Json(json!({ "attachment": view })))
}

#[utoipa::path(post, path = "/v3/{project_id}/attachments/{attachment_id}/action", tag = "attachments",
    request_body = AttachmentAction,
    params(("project_id" = String, Path, description = "project id"), ("attachment_id" = String, Path, description = "attachment id")),
    responses((status = 204, description = "completed"), (status = 400, description = "bad action, or a reservation"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such attachment, or microversion below 3.44")))]
pub async fn attachment_action(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<BTreeMap<String, Value>>,
) -> ApiResult<StatusCode> {
    check(&st, &ctx, mv, &project_id, true).await?;
    mv.require(COMPLETE_MIN, "os-complete")?;
    let mut body = body;
    if let Some(v) = body.get_mut("os-complete") {
        if v.is_null() {
            *v = json!({});
        }
    }
    let a: AttachmentAction = parse_value("action", Value::Object(body.into_iter().collect()))?;
    if !a.complete.as_object().is_some_and(|m| m.is_empty()) {
        return Err(ApiError::bad_request(
            "`os-complete` takes no arguments (null or {})",
        ));
    }
    let (att, _) = load(&st, &ctx, &project_id, &id).await?;
    service::complete(&st, &att).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v3/{project_id}/attachments/{attachment_id}", tag = "attachments",
    params(("project_id" = String, Path, description = "project id"), ("attachment_id" = String, Path, description = "attachment id")),
    responses((status = 200, description = "deleted (`{}`)"), (status = 401, description = "no token"),
        (status = 403, description = "reader or another project"),
        (status = 404, description = "no such attachment, or microversion below 3.27")))]
pub async fn delete_attachment(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    check(&st, &ctx, mv, &project_id, true).await?;
    let (a, v) = load(&st, &ctx, &project_id, &id).await?;
    service::detach(&st, &v, None, Some(&a.id)).await?;
    Ok(Json(json!({})))
}
