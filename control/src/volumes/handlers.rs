//! The volume and snapshot REST handlers: HTTP only. Each one checks the URL's project
//! and the caller's role, parses the body (strictly, [`ApiJson`]), calls
//! [`super::service`] and renders its answer with [`super::views`].

use super::listing::{next_query, select, ListQuery, Listing};
use super::rows::{self, AttachStatus, Flag, Snap, Vol};
use super::service::{self, NewSnapshot, NewVolume, Source};
use super::views::AVAILABILITY_ZONE;
use crate::api::{check_len, ApiJson, BoolLike, IntLike, MetadataBody};
use crate::auth::Ctx;
use crate::dataplane::{Protocol, UnixPeer};
use crate::error::{ApiError, ApiResult};
use crate::projects::{check_url_project, project_conn};
use crate::state::AppState;
use crate::versions::{Microversion, Origin, Version};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};
use std::collections::BTreeMap;
use utoipa::ToSchema;

// ---------------------------------------------------------------------------------------
// Bodies
//
// Cinder's clients send every field Cinder knows, most of them null. Each is accepted
// and typed here: what Ember uses is validated, what it ignores is named in its doc,
// what it cannot do is refused when non-null (400 naming the field). A field Cinder
// does not know is refused (400 naming it), as before.

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
    /// Size in GiB (default: the source's); an integer or a string of digits.
    #[schema(value_type = Option<u64>)]
    pub size: Option<IntLike>,
    /// Name.
    #[serde(alias = "display_name")]
    pub name: Option<String>,
    /// Description.
    #[serde(alias = "display_description")]
    pub description: Option<String>,
    /// Type name or id (default: the source's type, else `__DEFAULT__`).
    pub volume_type: Option<String>,
    /// An existing secret of the caller to encrypt with (Ember's extension).
    pub encryption_key_id: Option<String>,
    /// Clone this volume.
    pub source_volid: Option<String>,
    /// Create from this snapshot.
    pub snapshot_id: Option<String>,
    /// `ember` (the one zone) or null.
    pub availability_zone: Option<String>,
    /// Accepted, ignored: every Ember volume can be attached several times.
    #[schema(value_type = Option<bool>)]
    pub multiattach: Option<BoolLike>,
    /// User metadata (keys 1..255, values up to 255 characters).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Must be null: Ember has no image service.
    #[serde(rename = "imageRef")]
    #[schema(value_type = Option<String>)]
    pub image_ref: Option<Value>,
    /// Must be null: Ember has no backups.
    #[schema(value_type = Option<String>)]
    pub backup_id: Option<Value>,
    /// Must be null: Ember has no consistency groups.
    #[schema(value_type = Option<String>)]
    pub consistencygroup_id: Option<Value>,
    /// Must be null: Ember has no groups.
    #[schema(value_type = Option<String>)]
    pub group_id: Option<Value>,
    /// Must be null: Ember has no replicas.
    #[schema(value_type = Option<String>)]
    pub source_replica: Option<Value>,
    /// Accepted, ignored (one node decides).
    #[schema(value_type = Option<Object>)]
    pub scheduler_hints: Option<Value>,
}

/// `PUT /v3/{project_id}/volumes/{volume_id}` and `…/snapshots/{snapshot_id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeUpdateBody {
    /// The changes (`snapshot` for snapshots).
    #[serde(alias = "snapshot")]
    pub volume: DescriptionUpdate,
}

/// New name, description or metadata (at least one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DescriptionUpdate {
    /// New name.
    #[serde(alias = "display_name")]
    pub name: Option<String>,
    /// New description.
    #[serde(alias = "display_description")]
    pub description: Option<String>,
    /// New metadata (replaces the old).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /volumes/{id}/action` body: exactly one action. The value of each is its
/// arguments (`os-force_delete` takes none: null or `{}`). Other Cinder actions
/// (`os-attach`, `os-reserve`, `os-migrate_volume`, `revert`, …) are refused naming
/// the action.
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
    /// Admin: set the status.
    #[serde(rename = "os-reset_status")]
    pub reset_status: Option<ResetStatusArgs>,
    /// Admin: delete also from `error_deleting`.
    #[serde(rename = "os-force_delete")]
    #[schema(value_type = Option<Object>)]
    pub force_delete: Option<Value>,
    /// New attachments read-only or not.
    #[serde(rename = "os-update_readonly_flag")]
    pub readonly: Option<ReadonlyArgs>,
    /// Bootable or not.
    #[serde(rename = "os-set_bootable")]
    pub bootable: Option<BootableArgs>,
    /// Another type, when the bytes stay valid.
    #[serde(rename = "os-retype")]
    pub retype: Option<RetypeArgs>,
    /// Admin: forget a LUN volume, leave its bytes (`null` or `{}`).
    #[serde(rename = "os-unmanage")]
    #[schema(value_type = Option<Object>)]
    pub unmanage: Option<Value>,
}

/// `os-extend` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendArgs {
    /// New size in GiB.
    #[schema(value_type = u64)]
    pub new_size: IntLike,
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
    /// NBD over a Unix socket: the client's uid (`SO_PEERCRED`); a peer with it (and
    /// with `gid`, when given) uses the attachment without TLS, every other is refused.
    pub uid: Option<u32>,
    /// NBD over a Unix socket: the client's gid (see `uid`).
    pub gid: Option<u32>,
    /// Other connector properties (host, initiator…) are accepted and ignored.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub other: BTreeMap<String, Value>,
}

/// `os-reset_status` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetStatusArgs {
    /// `available`, `error`, `in-use` (volumes with attachments) or `error_deleting`.
    pub status: Option<String>,
    /// `attached` or `detached`: must agree with the volume's attachments.
    pub attach_status: Option<String>,
    /// Must be null or `none`: Ember does not migrate.
    pub migration_status: Option<String>,
}

/// `os-update_readonly_flag` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadonlyArgs {
    /// New attachments are read-only.
    #[schema(value_type = bool)]
    pub readonly: BoolLike,
}

/// `os-set_bootable` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootableArgs {
    /// Bootable.
    #[schema(value_type = bool)]
    pub bootable: BoolLike,
}

/// `os-retype` arguments.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetypeArgs {
    /// Type name or id.
    pub new_type: String,
    /// `never` or `on-demand`: Ember never migrates (a retype needing it is refused).
    pub migration_policy: Option<String>,
}

/// Volume actions of Cinder that Ember refuses, and why.
const UNSUPPORTED_ACTIONS: &[(&str, &str)] = &[
    (
        "os-attach",
        "use os-initialize_connection or the attachments API",
    ),
    (
        "os-detach",
        "use os-terminate_connection or DELETE /attachments/{id}",
    ),
    ("os-reserve", "use POST /attachments without a connector"),
    ("os-unreserve", "use DELETE /attachments/{id}"),
    ("os-begin_detaching", "use os-terminate_connection"),
    ("os-roll_detaching", "use os-terminate_connection"),
    ("os-force_detach", "use os-terminate_connection"),
    ("os-volume_upload_image", "Ember has no image service"),
    ("os-migrate_volume", "Ember does not migrate volumes"),
    (
        "os-migrate_volume_completion",
        "Ember does not migrate volumes",
    ),
    ("os-reimage", "Ember has no image service"),
    (
        "revert",
        "reverting to a snapshot is not supported; create a volume from it",
    ),
    (
        "os-extend_volume_completion",
        "os-extend completes in the request",
    ),
    (
        "os-update_snapshot_status",
        "snapshot statuses are Ember's own",
    ),
];

impl VolumeAction {
    /// The one action of a body (unsupported and unknown ones refused, naming them).
    pub fn parse(body: BTreeMap<String, Value>) -> ApiResult<VolumeAction> {
        if body.len() != 1 {
            return Err(ApiError::bad_request(format!(
                "give exactly one action (got {})",
                body.len()
            )));
        }
        if let Some((name, why)) = body
            .keys()
            .find_map(|k| UNSUPPORTED_ACTIONS.iter().find(|(n, _)| n == k))
        {
            return Err(ApiError::bad_request(format!(
                "action {name} is not supported by Ember: {why}"
            )));
        }
        let mut body = body;
        // Cinder's clients send `{"os-force_delete": null}`: an action without arguments.
        for k in ["os-force_delete", "os-unmanage"] {
            if let Some(v) = body.get_mut(k) {
                if v.is_null() {
                    *v = json!({});
                }
            }
        }
        let a: VolumeAction =
            crate::api::parse_value("action", Value::Object(body.into_iter().collect()))?;
        for (name, v) in [
            ("os-force_delete", &a.force_delete),
            ("os-unmanage", &a.unmanage),
        ] {
            if v.as_ref()
                .is_some_and(|v| !v.as_object().is_some_and(|m| m.is_empty()))
            {
                return Err(ApiError::bad_request(format!(
                    "`{name}` takes no arguments (null or {{}})"
                )));
            }
        }
        for c in [&a.initialize, &a.terminate].into_iter().flatten() {
            c.connector.protocol()?;
        }
        Ok(a)
    }
}

/// `POST /snapshots/{id}/action` body: `os-reset_status` or `os-force_delete`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotAction {
    /// Admin: set the status (`available`, `error`, `error_deleting`).
    #[serde(rename = "os-reset_status")]
    pub reset_status: Option<ResetStatusArgs>,
    /// Admin: delete also from `error_deleting`.
    #[serde(rename = "os-force_delete")]
    #[schema(value_type = Option<Object>)]
    pub force_delete: Option<Value>,
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
    #[serde(alias = "display_name")]
    pub name: Option<String>,
    /// Description.
    #[serde(alias = "display_description")]
    pub description: Option<String>,
    /// Allow snapshots of in-use volumes (taken at one instant); implied from
    /// microversion 3.66 on (where `false` for an in-use volume is refused).
    #[schema(value_type = Option<bool>)]
    pub force: Option<BoolLike>,
    /// User metadata.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Must be null: Ember has no group snapshots.
    #[schema(value_type = Option<String>)]
    pub group_snapshot_id: Option<Value>,
}

/// `PUT …/metadata/{key}` body: exactly `{"meta": {"<key>": "<value>"}}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetaItemBody {
    /// The one key and its value.
    pub meta: BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------
// Checks of the request itself

/// First checks of every change to a project's volumes and snapshots: the URL's
/// project, then a role that may write.
async fn check_writer_project(st: &AppState, ctx: &Ctx, project_id: &str) -> ApiResult<()> {
    check_url_project(st, ctx, project_id).await?;
    ctx.require_writer()
}

/// The descriptive fields of a volume or snapshot (`what`): name and description of up
/// to 255 characters, metadata keys and values.
fn check_descriptive(
    what: &str,
    name: Option<&str>,
    description: &Option<String>,
    metadata: &Option<BTreeMap<String, String>>,
) -> ApiResult<()> {
    if let Some(n) = name {
        check_len(&format!("{what}.name"), n, 0, 255)?;
    }
    if let Some(d) = description {
        check_len(&format!("{what}.description"), d, 0, 255)?;
    }
    if let Some(m) = metadata {
        service::check_metadata(&format!("{what}.metadata"), m)?;
    }
    Ok(())
}

/// 400 naming `field` unless `v` is absent or null (what Ember cannot do).
fn refuse_non_null(field: &str, v: &Option<Value>, why: &str) -> ApiResult<()> {
    if v.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request(format!(
            "`{field}` is not supported: {why} (leave it null)"
        )));
    }
    Ok(())
}

impl VolumeCreate {
    /// The service's request, once the fields that need no database are checked.
    pub fn validate(self) -> ApiResult<NewVolume> {
        let name = self.name.unwrap_or_default();
        check_descriptive("volume", Some(&name), &self.description, &self.metadata)?;
        refuse_non_null(
            "volume.imageRef",
            &self.image_ref,
            "Ember has no image service",
        )?;
        refuse_non_null("volume.backup_id", &self.backup_id, "Ember has no backups")?;
        refuse_non_null(
            "volume.consistencygroup_id",
            &self.consistencygroup_id,
            "Ember has no consistency groups",
        )?;
        refuse_non_null("volume.group_id", &self.group_id, "Ember has no groups")?;
        refuse_non_null(
            "volume.source_replica",
            &self.source_replica,
            "Ember has no replicas",
        )?;
        if let Some(z) = self.availability_zone.as_deref() {
            if z != AVAILABILITY_ZONE {
                return Err(ApiError::bad_request(format!(
                    "`volume.availability_zone` {z:?} is invalid: the one zone is {AVAILABILITY_ZONE:?}"
                )));
            }
        }
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
            size_gib: self.size.map(|s| s.0),
            volume_type: self.volume_type,
            encryption_key_id: self.encryption_key_id,
            source,
            metadata: self.metadata.unwrap_or_default(),
        })
    }
}

impl SnapshotCreate {
    /// The service's request, once the fields that need no database are checked
    /// (`mv`: from 3.66 on `force` is implied).
    pub fn validate(self, mv: Microversion) -> ApiResult<NewSnapshot> {
        let name = self.name.unwrap_or_default();
        check_descriptive("snapshot", Some(&name), &self.description, &self.metadata)?;
        refuse_non_null(
            "snapshot.group_snapshot_id",
            &self.group_snapshot_id,
            "Ember has no group snapshots",
        )?;
        let force = match self.force {
            Some(f) => f.0,
            None => mv.at_least(Version(3, 66)),
        };
        Ok(NewSnapshot {
            volume_id: self.volume_id,
            name,
            description: self.description,
            force,
            metadata: self.metadata.unwrap_or_default(),
        })
    }
}

impl DescriptionUpdate {
    /// The service's update (`what`: `volume` or `snapshot`), at least one change.
    pub fn validate(self, what: &str) -> ApiResult<service::Update> {
        if self.name.is_none() && self.description.is_none() && self.metadata.is_none() {
            return Err(ApiError::bad_request(format!(
                "`{what}` must change at least one of name, description, metadata"
            )));
        }
        check_descriptive(
            what,
            self.name.as_deref(),
            &self.description,
            &self.metadata,
        )?;
        Ok(service::Update {
            name: self.name,
            description: self.description,
            metadata: self.metadata,
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

    /// The Unix-socket peer named by `uid`/`gid` (NBD only).
    pub fn unix_peer(&self, protocol: Protocol) -> ApiResult<Option<UnixPeer>> {
        if self.uid.is_none() && self.gid.is_none() {
            return Ok(None);
        }
        if protocol != Protocol::Nbd {
            return Err(ApiError::bad_request(
                "connector.uid and connector.gid apply to NBD only",
            ));
        }
        Ok(Some(UnixPeer {
            uid: self.uid,
            gid: self.gid,
        }))
    }
}

impl ResetStatusArgs {
    /// The status asked for, after the checks of the other fields against `attached`
    /// (whether the volume has attachments; `None` for snapshots).
    fn target(&self, what: &str, attached: Option<bool>) -> ApiResult<String> {
        if let Some(m) = self.migration_status.as_deref() {
            if !m.eq_ignore_ascii_case("none") {
                return Err(ApiError::bad_request(
                    "`os-reset_status.migration_status` is not supported: Ember does not migrate",
                ));
            }
        }
        if let Some(a) = self.attach_status.as_deref() {
            let want = match a {
                "attached" => true,
                "detached" => false,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "`os-reset_status.attach_status` {a:?} must be attached or detached"
                    )))
                }
            };
            match attached {
                None => {
                    return Err(ApiError::bad_request(format!(
                        "`os-reset_status.attach_status` does not apply to a {what}"
                    )))
                }
                Some(has) if has != want => {
                    return Err(ApiError::bad_request(format!(
                        "`os-reset_status.attach_status` {a}: the volume {} attachments; end them \
                         with os-terminate_connection or DELETE /attachments/{{id}}",
                        if has { "has" } else { "has no" }
                    )))
                }
                Some(_) => {}
            }
        }
        self.status
            .clone()
            .ok_or_else(|| ApiError::bad_request("`os-reset_status.status` is required"))
    }
}

/// The project and URL checks of a listing, then its parsed query.
async fn listing(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    q: ListQuery,
) -> ApiResult<(PoolConnection<Any>, Listing)> {
    let conn = project_conn(st, ctx, project_id).await?;
    Ok((conn, q.parse(ctx)?))
}

/// The rows a listing starts from: the project's, or every project's (admins'
/// `all_tenants`, optionally narrowed by `project_id`).
async fn listed_rows<T: rows::Stored>(
    conn: &mut AnyConnection,
    project_id: &str,
    l: &Listing,
) -> ApiResult<Vec<T>> {
    Ok(match (l.all_projects, l.project_filter()) {
        (true, None) => rows::all::<T>(conn).await?,
        (true, Some(p)) => rows::of_project::<T>(conn, p).await?,
        (false, _) => rows::of_project::<T>(conn, project_id).await?,
    })
}

/// The answer of a listing: `{key: page}` and, when more follow, `{key}_links` with the
/// next page's URL.
fn list_answer(
    key: &str,
    page: Vec<Value>,
    next: Option<String>,
    origin: &Origin,
    path: &str,
    query: Option<&str>,
) -> Json<Value> {
    let mut o = json!({ key: page });
    if let Some(m) = next {
        o[format!("{key}_links")] = json!([{
            "rel": "next",
            "href": origin.url(&format!("{path}?{}", next_query(query, &m))),
        }]);
    }
    Json(o)
}

// ---------------------------------------------------------------------------------------
// Volume handlers

async fn list_volumes_any(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    q: ListQuery,
    origin: Origin,
    query: Option<String>,
    path: &str,
) -> ApiResult<Json<Value>> {
    let (mut conn, l) = listing(&st, &ctx, &project_id, q).await?;
    let mut all = Vec::new();
    for v in listed_rows::<Vol>(&mut conn, &project_id, &l).await? {
        all.push(service::volume_view(&mut conn, &v).await?);
    }
    let (page, next) = select(all, &l)?;
    Ok(list_answer(
        "volumes",
        page,
        next,
        &origin,
        &format!("/v3/{project_id}/{path}"),
        query.as_deref(),
    ))
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{volumes[, volumes_links]}` of the project"),
        (status = 400, description = "bad query"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_volumes(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
    origin: Origin,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    list_volumes_any(st, ctx, project_id, q, origin, query, "volumes").await
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes/detail", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{volumes[, volumes_links]}` of the project"),
        (status = 400, description = "bad query"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_volumes_detail(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
    origin: Origin,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    list_volumes_any(st, ctx, project_id, q, origin, query, "volumes/detail").await
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

#[utoipa::path(put, path = "/v3/{project_id}/volumes/{volume_id}", tag = "volumes",
    request_body = VolumeUpdateBody,
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{volume}` updated"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"), (status = 409, description = "being deleted")))]
pub async fn update_volume(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<VolumeUpdateBody>,
) -> ApiResult<Json<Value>> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let u = body.volume.validate("volume")?;
    let mut conn = st.db().pool.acquire().await?;
    let v = service::load::<Vol>(&mut conn, &ctx, &project_id, &id).await?;
    drop(conn);
    service::update(&st, &v, u).await?;
    let mut conn = st.db().pool.acquire().await?;
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
    service::delete_volume(&st, &ctx, &project_id, &id, false).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v3/{project_id}/volumes/{volume_id}/action", tag = "volumes",
    request_body = VolumeAction, params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{connection_info}` (os-initialize_connection)"),
        (status = 202, description = "done (the other actions)"),
        (status = 400, description = "bad or unsupported action, or status"), (status = 401, description = "no token"),
        (status = 403, description = "reader, another project, or an admin action"), (status = 404, description = "no such volume"),
        (status = 409, description = "locked (Retry-After) or changed meanwhile"), (status = 413, description = "not enough space")))]
pub async fn volume_action(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<BTreeMap<String, Value>>,
) -> ApiResult<Response> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let a = VolumeAction::parse(body)?;
    if a.unmanage.is_some() {
        super::manageable::unmanage(&st, &ctx, &project_id, &id).await?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let mut conn = st.db().pool.acquire().await?;
    let v = service::load::<Vol>(&mut conn, &ctx, &project_id, &id).await?;
    let attached = !rows::attachments_of(&mut conn, &v.id).await?.is_empty();
    drop(conn);
    let done = StatusCode::ACCEPTED.into_response();
    if let Some(e) = a.extend {
        service::extend(&st, &v, e.new_size.0).await?;
        return Ok(done);
    }
    if let Some(c) = a.initialize {
        let protocol = c.connector.protocol()?.unwrap_or(Protocol::Nbd);
        let req = service::AttachRequest {
            protocol,
            read_only: c.connector.read_only,
            instance_uuid: None,
            status: AttachStatus::Attached,
            unix_peer: c.connector.unix_peer(protocol)?,
        };
        let made = service::attach(&st, &v, req).await?;
        return Ok(Json(json!({ "connection_info": made.connection_info })).into_response());
    }
    if let Some(c) = a.terminate {
        let protocol = c.connector.protocol()?;
        service::detach(&st, &v, protocol, c.connector.attachment_id.as_deref()).await?;
        return Ok(done);
    }
    if let Some(r) = a.reset_status {
        ctx.require_admin()?;
        let to = r.target("volume", Some(attached))?;
        service::reset_status::<Vol>(&st, &v.object(), v.status, &to).await?;
        return Ok(done);
    }
    if a.force_delete.is_some() {
        ctx.require_admin()?;
        service::delete_volume(&st, &ctx, &project_id, &id, true).await?;
        return Ok(done);
    }
    if let Some(r) = a.readonly {
        service::set_flag(&st, &v, Flag::Readonly, r.readonly.0).await?;
        return Ok(done);
    }
    if let Some(b) = a.bootable {
        service::set_flag(&st, &v, Flag::Bootable, b.bootable.0).await?;
        return Ok(done);
    }
    if let Some(r) = a.retype {
        if let Some(p) = r.migration_policy.as_deref() {
            if p != "never" && p != "on-demand" {
                return Err(ApiError::bad_request(format!(
                    "`os-retype.migration_policy` {p:?} must be never or on-demand"
                )));
            }
        }
        service::retype(&st, &ctx, &v, &r.new_type).await?;
        return Ok(done);
    }
    Err(ApiError::bad_request("no action"))
}

// ---------------------------------------------------------------------------------------
// Metadata of volumes and snapshots

/// The volume or snapshot `id` of the URL's project, after the URL's checks (`write`:
/// a role that may change it).
async fn described<T: rows::Stored>(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    id: &str,
    write: bool,
) -> ApiResult<T> {
    if write {
        check_writer_project(st, ctx, project_id).await?;
    } else {
        check_url_project(st, ctx, project_id).await?;
    }
    let mut conn = st.db().pool.acquire().await?;
    service::load::<T>(&mut conn, ctx, project_id, id).await
}

async fn metadata_of<T: rows::Stored + service::Described>(
    st: &AppState,
    o: &T,
) -> ApiResult<BTreeMap<String, String>> {
    let mut conn = st.db().pool.acquire().await?;
    Ok(rows::metadata_of(&mut conn, T::META, service::Described::id(o)).await?)
}

/// `GET …/metadata`.
async fn get_metadata<T: rows::Stored + service::Described>(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    id: String,
) -> ApiResult<Json<Value>> {
    let o = described::<T>(&st, &ctx, &project_id, &id, false).await?;
    Ok(Json(json!({ "metadata": metadata_of(&st, &o).await? })))
}

/// `POST` (merge) / `PUT` (replace) `…/metadata`.
async fn post_metadata<T: rows::Stored + service::Described>(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    id: String,
    body: MetadataBody,
    replace: bool,
) -> ApiResult<Json<Value>> {
    let o = described::<T>(&st, &ctx, &project_id, &id, true).await?;
    service::check_metadata("metadata", &body.metadata)?;
    let m = service::set_metadata(&st, &o, &body.metadata, replace).await?;
    Ok(Json(json!({ "metadata": m })))
}

/// `GET …/metadata/{key}`.
async fn get_meta_item<T: rows::Stored + service::Described>(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    id: String,
    key: String,
) -> ApiResult<Json<Value>> {
    let o = described::<T>(&st, &ctx, &project_id, &id, false).await?;
    let m = metadata_of(&st, &o).await?;
    let v = m.get(&key).ok_or_else(|| {
        ApiError::not_found(format!("{} {id} has no metadata key {key:?}", T::WHAT))
    })?;
    Ok(Json(json!({ "meta": { key: v } })))
}

/// `PUT …/metadata/{key}`.
async fn put_meta_item<T: rows::Stored + service::Described>(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    id: String,
    key: String,
    body: MetaItemBody,
) -> ApiResult<Json<Value>> {
    let o = described::<T>(&st, &ctx, &project_id, &id, true).await?;
    if body.meta.len() != 1 || !body.meta.contains_key(&key) {
        return Err(ApiError::bad_request(format!(
            "the body must be exactly {{\"meta\": {{{key:?}: \"<value>\"}}}}"
        )));
    }
    service::check_metadata("meta", &body.meta)?;
    service::set_metadata(&st, &o, &body.meta, false).await?;
    Ok(Json(json!({ "meta": body.meta })))
}

/// `DELETE …/metadata/{key}`.
async fn delete_meta_item<T: rows::Stored + service::Described>(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    id: String,
    key: String,
) -> ApiResult<StatusCode> {
    let o = described::<T>(&st, &ctx, &project_id, &id, true).await?;
    service::delete_metadata(&st, &o, &key).await?;
    Ok(StatusCode::OK)
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes/{volume_id}/metadata", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{metadata}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such volume")))]
pub async fn volume_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    get_metadata::<Vol>(st, ctx, p, id).await
}

#[utoipa::path(post, path = "/v3/{project_id}/volumes/{volume_id}/metadata", tag = "volumes",
    request_body = MetadataBody,
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{metadata}` after the keys were set"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"), (status = 409, description = "being deleted")))]
pub async fn set_volume_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id)): Path<(String, String)>,
    ApiJson(b): ApiJson<MetadataBody>,
) -> ApiResult<Json<Value>> {
    post_metadata::<Vol>(st, ctx, p, id, b, false).await
}

#[utoipa::path(put, path = "/v3/{project_id}/volumes/{volume_id}/metadata", tag = "volumes",
    request_body = MetadataBody,
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
    responses((status = 200, description = "`{metadata}` (replaced)"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"), (status = 409, description = "being deleted")))]
pub async fn replace_volume_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id)): Path<(String, String)>,
    ApiJson(b): ApiJson<MetadataBody>,
) -> ApiResult<Json<Value>> {
    post_metadata::<Vol>(st, ctx, p, id, b, true).await
}

#[utoipa::path(get, path = "/v3/{project_id}/volumes/{volume_id}/metadata/{key}", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{meta: {key: value}}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such volume or key")))]
pub async fn volume_meta_item(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    get_meta_item::<Vol>(st, ctx, p, id, key).await
}

#[utoipa::path(put, path = "/v3/{project_id}/volumes/{volume_id}/metadata/{key}", tag = "volumes",
    request_body = MetaItemBody,
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{meta: {key: value}}`"), (status = 400, description = "bad body"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"), (status = 409, description = "being deleted")))]
pub async fn put_volume_meta_item(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id, key)): Path<(String, String, String)>,
    ApiJson(b): ApiJson<MetaItemBody>,
) -> ApiResult<Json<Value>> {
    put_meta_item::<Vol>(st, ctx, p, id, key, b).await
}

#[utoipa::path(delete, path = "/v3/{project_id}/volumes/{volume_id}/metadata/{key}", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "reader or another project"), (status = 404, description = "no such volume or key"),
        (status = 409, description = "being deleted")))]
pub async fn delete_volume_meta_item(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete_meta_item::<Vol>(st, ctx, p, id, key).await
}

#[utoipa::path(get, path = "/v3/{project_id}/snapshots/{snapshot_id}/metadata", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "`{metadata}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such snapshot")))]
pub async fn snapshot_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    get_metadata::<Snap>(st, ctx, p, id).await
}

#[utoipa::path(post, path = "/v3/{project_id}/snapshots/{snapshot_id}/metadata", tag = "snapshots",
    request_body = MetadataBody,
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "`{metadata}` after the keys were set"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such snapshot"), (status = 409, description = "being deleted")))]
pub async fn set_snapshot_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id)): Path<(String, String)>,
    ApiJson(b): ApiJson<MetadataBody>,
) -> ApiResult<Json<Value>> {
    post_metadata::<Snap>(st, ctx, p, id, b, false).await
}

#[utoipa::path(put, path = "/v3/{project_id}/snapshots/{snapshot_id}/metadata", tag = "snapshots",
    request_body = MetadataBody,
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "`{metadata}` (replaced)"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such snapshot"), (status = 409, description = "being deleted")))]
pub async fn replace_snapshot_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id)): Path<(String, String)>,
    ApiJson(b): ApiJson<MetadataBody>,
) -> ApiResult<Json<Value>> {
    post_metadata::<Snap>(st, ctx, p, id, b, true).await
}

#[utoipa::path(get, path = "/v3/{project_id}/snapshots/{snapshot_id}/metadata/{key}", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{meta: {key: value}}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such snapshot or key")))]
pub async fn snapshot_meta_item(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    get_meta_item::<Snap>(st, ctx, p, id, key).await
}

#[utoipa::path(put, path = "/v3/{project_id}/snapshots/{snapshot_id}/metadata/{key}", tag = "snapshots",
    request_body = MetaItemBody,
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{meta: {key: value}}`"), (status = 400, description = "bad body"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such snapshot"), (status = 409, description = "being deleted")))]
pub async fn put_snapshot_meta_item(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id, key)): Path<(String, String, String)>,
    ApiJson(b): ApiJson<MetaItemBody>,
) -> ApiResult<Json<Value>> {
    put_meta_item::<Snap>(st, ctx, p, id, key, b).await
}

#[utoipa::path(delete, path = "/v3/{project_id}/snapshots/{snapshot_id}/metadata/{key}", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "reader or another project"), (status = 404, description = "no such snapshot or key"),
        (status = 409, description = "being deleted")))]
pub async fn delete_snapshot_meta_item(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((p, id, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete_meta_item::<Snap>(st, ctx, p, id, key).await
}

// ---------------------------------------------------------------------------------------
// Snapshot handlers

async fn list_snapshots_any(
    st: AppState,
    ctx: Ctx,
    project_id: String,
    q: ListQuery,
    origin: Origin,
    query: Option<String>,
    path: &str,
) -> ApiResult<Json<Value>> {
    let (mut conn, l) = listing(&st, &ctx, &project_id, q).await?;
    let mut all = Vec::new();
    for s in listed_rows::<Snap>(&mut conn, &project_id, &l).await? {
        all.push(service::snapshot_view(&mut conn, &s).await?);
    }
    let (page, next) = select(all, &l)?;
    Ok(list_answer(
        "snapshots",
        page,
        next,
        &origin,
        &format!("/v3/{project_id}/{path}"),
        query.as_deref(),
    ))
}

#[utoipa::path(get, path = "/v3/{project_id}/snapshots", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{snapshots[, snapshots_links]}`"), (status = 400, description = "bad query"),
        (status = 401, description = "no token"), (status = 403, description = "another project")))]
pub async fn list_snapshots(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
    origin: Origin,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    list_snapshots_any(st, ctx, project_id, q, origin, query, "snapshots").await
}

#[utoipa::path(get, path = "/v3/{project_id}/snapshots/detail", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id"), ListQuery),
    responses((status = 200, description = "`{snapshots[, snapshots_links]}`"), (status = 400, description = "bad query"),
        (status = 401, description = "no token"), (status = 403, description = "another project")))]
pub async fn list_snapshots_detail(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ListQuery>,
    origin: Origin,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    list_snapshots_any(st, ctx, project_id, q, origin, query, "snapshots/detail").await
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
    Ok(Json(
        json!({ "snapshot": service::snapshot_view(&mut conn, &s).await? }),
    ))
}

#[utoipa::path(put, path = "/v3/{project_id}/snapshots/{snapshot_id}", tag = "snapshots",
    request_body = VolumeUpdateBody,
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 200, description = "`{snapshot}` updated"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such snapshot"), (status = 409, description = "being deleted")))]
pub async fn update_snapshot(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<VolumeUpdateBody>,
) -> ApiResult<Json<Value>> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let u = body.volume.validate("snapshot")?;
    let mut conn = st.db().pool.acquire().await?;
    let s = service::load::<Snap>(&mut conn, &ctx, &project_id, &id).await?;
    drop(conn);
    service::update(&st, &s, u).await?;
    let mut conn = st.db().pool.acquire().await?;
    let s = service::load::<Snap>(&mut conn, &ctx, &project_id, &id).await?;
    Ok(Json(
        json!({ "snapshot": service::snapshot_view(&mut conn, &s).await? }),
    ))
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
    mv: Microversion,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<SnapshotCreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let req = body.snapshot.validate(mv)?;
    let s = service::create_snapshot(&st, &ctx, &project_id, req).await?;
    let mut conn = st.db().pool.acquire().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "snapshot": service::snapshot_view(&mut conn, &s).await? })),
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
    service::delete_snapshot(&st, &ctx, &project_id, &id, false).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(post, path = "/v3/{project_id}/snapshots/{snapshot_id}/action", tag = "snapshots",
    request_body = SnapshotAction,
    params(("project_id" = String, Path, description = "project id"), ("snapshot_id" = String, Path, description = "snapshot id")),
    responses((status = 202, description = "done"), (status = 400, description = "bad action or status"),
        (status = 401, description = "no token"), (status = 403, description = "not admin, or another project"),
        (status = 404, description = "no such snapshot"), (status = 409, description = "changed meanwhile")))]
pub async fn snapshot_action(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(mut body): ApiJson<BTreeMap<String, Value>>,
) -> ApiResult<StatusCode> {
    check_writer_project(&st, &ctx, &project_id).await?;
    if body.len() != 1 {
        return Err(ApiError::bad_request("give exactly one action"));
    }
    if let Some(v) = body.get_mut("os-force_delete") {
        if v.is_null() {
            *v = json!({});
        }
    }
    let a: SnapshotAction =
        crate::api::parse_value("action", Value::Object(body.into_iter().collect()))?;
    ctx.require_admin()?;
    let mut conn = st.db().pool.acquire().await?;
    let s = service::load::<Snap>(&mut conn, &ctx, &project_id, &id).await?;
    drop(conn);
    if let Some(r) = a.reset_status {
        let to = r.target("snapshot", None)?;
        service::reset_status::<Snap>(&st, &s.object(), s.status, &to).await?;
    } else if let Some(v) = a.force_delete {
        if !v.as_object().is_some_and(|m| m.is_empty()) {
            return Err(ApiError::bad_request(
                "`os-force_delete` takes no arguments (null or {})",
            ));
        }
        service::delete_snapshot(&st, &ctx, &project_id, &id, true).await?;
    }
    Ok(StatusCode::ACCEPTED)
}
