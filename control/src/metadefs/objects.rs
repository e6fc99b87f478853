//! Objects and tags of a metadefs namespace, and the resource-type list, Glance-shaped
//! (`/v2/metadefs/namespaces/{ns}/objects…`, `…/tags…`, `/v2/metadefs/resource_types`).
//!
//! An object is a named group of property definitions (each checked as a namespace's
//! property is) with a `required` list naming some of them; a tag is a name. Both are
//! catalog entries: Ember enforces a namespace's properties on volume types, not its
//! objects or tags. Reads follow the namespace's visibility; changes are admin only.
//! `POST …/tags` replaces the namespace's tags unless `X-Openstack-Append: true`.
//! Tables: `metadef_objects`, `metadef_tags`.

use super::{
    begin_ns, check_def, check_name, delete_entry, read_ns, PropertyDef, VOLUME_TYPE_RESOURCE,
};
use crate::api::{check_len, ApiJson};
use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{count_args, execute_args, get_str, now};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Migration 9 (issue 14): objects and tags of namespaces.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS metadef_objects (namespace VARCHAR(80) NOT NULL, name VARCHAR(80) NOT NULL, \
     description TEXT NOT NULL, required TEXT NOT NULL, properties MEDIUMTEXT NOT NULL, \
     created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL, PRIMARY KEY (namespace, name))",
    "CREATE TABLE IF NOT EXISTS metadef_tags (namespace VARCHAR(80) NOT NULL, name VARCHAR(255) NOT NULL, \
     created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL, PRIMARY KEY (namespace, name))",
];

/// Resource types every deployment knows (Glance's list), besides those associated.
const KNOWN_RESOURCE_TYPES: &[&str] = &[
    "OS::Cinder::Volume",
    VOLUME_TYPE_RESOURCE,
    "OS::Glance::Image",
    "OS::Nova::Flavor",
    "OS::Nova::Server",
];

/// Most tags, objects or properties in one body.
const MAX_ITEMS: usize = 256;

/// An object (`POST …/objects`, `PUT …/objects/{name}`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectBody {
    /// 1..80 characters, unique in the namespace.
    pub name: String,
    /// Up to 500 characters.
    pub description: Option<String>,
    /// Names of its properties that are required.
    pub required: Option<Vec<String>>,
    /// Its property definitions.
    pub properties: Option<BTreeMap<String, PropertyDef>>,
    /// Ignored (read-only fields glanceclient sends back on update).
    #[schema(value_type = Option<String>)]
    pub schema: Option<Value>,
    /// Ignored.
    #[schema(value_type = Option<String>)]
    pub created_at: Option<Value>,
    /// Ignored.
    #[schema(value_type = Option<String>)]
    pub updated_at: Option<Value>,
}

/// A tag name.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagBody {
    /// 1..255 characters.
    pub name: String,
    /// Ignored.
    #[schema(value_type = Option<String>)]
    pub created_at: Option<Value>,
    /// Ignored.
    #[schema(value_type = Option<String>)]
    pub updated_at: Option<Value>,
}

/// `POST …/tags` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    /// The tags.
    pub tags: Vec<TagBody>,
}

/// The checks of an object body that need no database.
pub fn check_object(b: &ObjectBody) -> ApiResult<()> {
    check_name("name", &b.name)?;
    if let Some(d) = &b.description {
        check_len("description", d, 0, 500)?;
    }
    let props = b.properties.clone().unwrap_or_default();
    if props.len() > MAX_ITEMS {
        return Err(ApiError::bad_request(format!(
            "`properties` holds at most {MAX_ITEMS} definitions"
        )));
    }
    for (n, d) in &props {
        check_def(n, d)?;
    }
    for r in b.required.iter().flatten() {
        if !props.contains_key(r) {
            return Err(ApiError::bad_request(format!(
                "`required` names {r:?}, which is not one of the object's properties"
            )));
        }
    }
    Ok(())
}

pub(super) fn check_tag(name: &str) -> ApiResult<()> {
    check_len("name", name, 1, 255)?;
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError::bad_request(
            "a tag must not contain '/' or control characters",
        ));
    }
    Ok(())
}

/// The checks of a tags body that need no database.
pub fn check_tags(b: &TagsBody) -> ApiResult<()> {
    if b.tags.len() > MAX_ITEMS {
        return Err(ApiError::bad_request(format!(
            "`tags` holds at most {MAX_ITEMS} tags"
        )));
    }
    b.tags.iter().try_for_each(|t| check_tag(&t.name))
}

fn object_view(ns: &str, r: &AnyRow) -> ApiResult<Value> {
    let name = get_str(r, "name")?;
    let required: Value = serde_json::from_str(&get_str(r, "required")?).unwrap_or(json!([]));
    let properties: Value = serde_json::from_str(&get_str(r, "properties")?).unwrap_or(json!({}));
    let mut v = json!({
        "name": name,
        "required": required,
        "properties": properties,
        "created_at": get_str(r, "created_at")?,
        "updated_at": get_str(r, "updated_at")?,
        "schema": "/v2/schemas/metadefs/object",
        "self": format!("/v2/metadefs/namespaces/{ns}/objects/{name}"),
    });
    let d = get_str(r, "description")?;
    if !d.is_empty() {
        v["description"] = json!(d);
    }
    Ok(v)
}

fn tag_view(r: &AnyRow) -> ApiResult<Value> {
    Ok(json!({
        "name": get_str(r, "name")?,
        "created_at": get_str(r, "created_at")?,
        "updated_at": get_str(r, "updated_at")?,
    }))
}

/// The objects of namespace `ns`.
pub async fn objects_of(conn: &mut AnyConnection, ns: &str) -> ApiResult<Vec<Value>> {
    let rows = sqlx::query("SELECT * FROM metadef_objects WHERE namespace = ? ORDER BY name")
        .bind(ns.to_string())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(|r| object_view(ns, r)).collect()
}

/// The tags of namespace `ns`.
pub async fn tags_of(conn: &mut AnyConnection, ns: &str) -> ApiResult<Vec<Value>> {
    let rows = sqlx::query("SELECT * FROM metadef_tags WHERE namespace = ? ORDER BY name")
        .bind(ns.to_string())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(tag_view).collect()
}

/// Remove a namespace's objects and tags (with the namespace, in its transaction).
pub async fn forget(conn: &mut AnyConnection, ns: &str) -> Result<(), sqlx::Error> {
    execute_args(
        conn,
        "DELETE FROM metadef_objects WHERE namespace = ?",
        &[ns],
    )
    .await?;
    execute_args(conn, "DELETE FROM metadef_tags WHERE namespace = ?", &[ns]).await?;
    Ok(())
}

pub(super) async fn insert_object(
    conn: &mut AnyConnection,
    ns: &str,
    b: &ObjectBody,
    created: &str,
) -> ApiResult<()> {
    let props: BTreeMap<String, Value> = b
        .properties
        .iter()
        .flatten()
        .map(|(n, d)| {
            let mut d = d.clone();
            d.name = None;
            (n.clone(), serde_json::to_value(d).unwrap_or(Value::Null))
        })
        .collect();
    let t = now();
    sqlx::query(
        "INSERT INTO metadef_objects (namespace, name, description, required, properties, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(ns.to_string())
    .bind(b.name.clone())
    .bind(b.description.clone().unwrap_or_default())
    .bind(json!(b.required.clone().unwrap_or_default()).to_string())
    .bind(json!(props).to_string())
    .bind(created.to_string())
    .bind(t)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Row `name` of namespace `ns` in `table` (objects or tags); 404 names it `what`.
async fn load_row(
    conn: &mut AnyConnection,
    (table, what): (&'static str, &str),
    ns: &str,
    name: &str,
) -> ApiResult<AnyRow> {
    // `table` is one of two literals, never client input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM {table} WHERE namespace = ? AND name = ?"
    )))
    .bind(ns.to_string())
    .bind(name.to_string())
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| ApiError::not_found(format!("{what} {name} not found in {ns}")))
}

async fn load_object(conn: &mut AnyConnection, ns: &str, name: &str) -> ApiResult<AnyRow> {
    load_row(conn, ("metadef_objects", "object"), ns, name).await
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/objects", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 200, description = "`{objects}`"), (status = 401, description = "no token"),
        (status = 404, description = "no such (visible) namespace")))]
pub async fn list_objects(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(json!({
        "objects": objects_of(&mut conn, &ns).await?,
        "schema": "/v2/schemas/metadefs/objects",
    })))
}

#[utoipa::path(post, path = "/v2/metadefs/namespaces/{namespace}/objects", tag = "metadefs",
    request_body = ObjectBody, params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 201, description = "the object"), (status = 400, description = "bad definition"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace"), (status = 409, description = "exists")))]
pub async fn create_object(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
    ApiJson(b): ApiJson<ObjectBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    check_object(&b)?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    let n = count_args(
        &mut tx,
        "SELECT COUNT(*) AS n FROM metadef_objects WHERE namespace = ? AND name = ?",
        &[&ns, &b.name],
    )
    .await?;
    if n > 0 {
        return Err(ApiError::conflict(format!(
            "object {} already exists in {ns}",
            b.name
        )));
    }
    insert_object(&mut tx, &ns, &b, &now()).await?;
    let v = object_view(&ns, &load_object(&mut tx, &ns, &b.name).await?)?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/objects/{object_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("object_name" = String, Path, description = "object")),
    responses((status = 200, description = "the object"), (status = 401, description = "no token"),
        (status = 404, description = "no such namespace or object")))]
pub async fn show_object(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(object_view(
        &ns,
        &load_object(&mut conn, &ns, &name).await?,
    )?))
}

#[utoipa::path(put, path = "/v2/metadefs/namespaces/{namespace}/objects/{object_name}", tag = "metadefs",
    request_body = ObjectBody,
    params(("namespace" = String, Path, description = "namespace name"), ("object_name" = String, Path, description = "object")),
    responses((status = 200, description = "the object (renamed if `name` differs)"), (status = 400, description = "bad definition"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace or object"), (status = 409, description = "the new name exists")))]
pub async fn update_object(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
    ApiJson(b): ApiJson<ObjectBody>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    check_object(&b)?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    let old = load_object(&mut tx, &ns, &name).await?;
    if b.name != name {
        let n = count_args(
            &mut tx,
            "SELECT COUNT(*) AS n FROM metadef_objects WHERE namespace = ? AND name = ?",
            &[&ns, &b.name],
        )
        .await?;
        if n > 0 {
            return Err(ApiError::conflict(format!(
                "object {} already exists in {ns}",
                b.name
            )));
        }
    }
    execute_args(
        &mut tx,
        "DELETE FROM metadef_objects WHERE namespace = ? AND name = ?",
        &[&ns, &name],
    )
    .await?;
    insert_object(&mut tx, &ns, &b, &get_str(&old, "created_at")?).await?;
    let v = object_view(&ns, &load_object(&mut tx, &ns, &b.name).await?)?;
    tx.commit().await?;
    Ok(Json(v))
}

#[utoipa::path(delete, path = "/v2/metadefs/namespaces/{namespace}/objects/{object_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("object_name" = String, Path, description = "object")),
    responses((status = 204, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such namespace or object")))]
pub async fn delete_object(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let delete = "DELETE FROM metadef_objects WHERE namespace = ? AND name = ?";
    delete_entry(&st, &ctx, (&ns, &name), delete, "object").await
}

// ---- tags ----

pub(super) async fn insert_tag(conn: &mut AnyConnection, ns: &str, name: &str) -> ApiResult<()> {
    let n = count_args(
        conn,
        "SELECT COUNT(*) AS n FROM metadef_tags WHERE namespace = ? AND name = ?",
        &[ns, name],
    )
    .await?;
    if n > 0 {
        return Err(ApiError::conflict(format!(
            "tag {name} already exists in {ns}"
        )));
    }
    let t = now();
    execute_args(
        conn,
        "INSERT INTO metadef_tags (namespace, name, created_at, updated_at) VALUES (?, ?, ?, ?)",
        &[ns, name, &t, &t],
    )
    .await?;
    Ok(())
}

async fn load_tag(conn: &mut AnyConnection, ns: &str, name: &str) -> ApiResult<AnyRow> {
    load_row(conn, ("metadef_tags", "tag"), ns, name).await
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/tags", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 200, description = "`{tags}`"), (status = 401, description = "no token"),
        (status = 404, description = "no such (visible) namespace")))]
pub async fn list_tags(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(json!({ "tags": tags_of(&mut conn, &ns).await? })))
}

#[utoipa::path(post, path = "/v2/metadefs/namespaces/{namespace}/tags", tag = "metadefs",
    request_body = TagsBody, params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 201, description = "`{tags}` (replacing the old ones unless X-Openstack-Append: true)"),
        (status = 400, description = "bad tag"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such namespace"),
        (status = 409, description = "a tag twice")))]
pub async fn create_tags(
    State(st): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    Path(ns): Path<String>,
    ApiJson(b): ApiJson<TagsBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    check_tags(&b)?;
    let append = headers
        .get("x-openstack-append")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::api::parse_bool)
        .unwrap_or(false);
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    if !append {
        execute_args(
            &mut tx,
            "DELETE FROM metadef_tags WHERE namespace = ?",
            &[&ns],
        )
        .await?;
    }
    for t in &b.tags {
        insert_tag(&mut tx, &ns, &t.name).await?;
    }
    let tags = tags_of(&mut tx, &ns).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(json!({ "tags": tags }))))
}

#[utoipa::path(delete, path = "/v2/metadefs/namespaces/{namespace}/tags", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 204, description = "every tag deleted"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such namespace")))]
pub async fn delete_tags(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<StatusCode> {
    ctx.require_admin()?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    execute_args(
        &mut tx,
        "DELETE FROM metadef_tags WHERE namespace = ?",
        &[&ns],
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/tags/{tag_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("tag_name" = String, Path, description = "tag")),
    responses((status = 200, description = "the tag"), (status = 401, description = "no token"),
        (status = 404, description = "no such namespace or tag")))]
pub async fn show_tag(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(tag_view(&load_tag(&mut conn, &ns, &name).await?)?))
}

#[utoipa::path(post, path = "/v2/metadefs/namespaces/{namespace}/tags/{tag_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("tag_name" = String, Path, description = "tag")),
    responses((status = 201, description = "the tag"), (status = 400, description = "bad name"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace"), (status = 409, description = "exists")))]
pub async fn create_tag(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    check_tag(&name)?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    insert_tag(&mut tx, &ns, &name).await?;
    let v = tag_view(&load_tag(&mut tx, &ns, &name).await?)?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(put, path = "/v2/metadefs/namespaces/{namespace}/tags/{tag_name}", tag = "metadefs",
    request_body = TagBody,
    params(("namespace" = String, Path, description = "namespace name"), ("tag_name" = String, Path, description = "tag")),
    responses((status = 200, description = "the tag, renamed"), (status = 400, description = "bad name"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace or tag"), (status = 409, description = "the new name exists")))]
pub async fn rename_tag(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
    ApiJson(b): ApiJson<TagBody>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    check_tag(&b.name)?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    load_tag(&mut tx, &ns, &name).await?;
    if b.name != name {
        insert_tag(&mut tx, &ns, &b.name).await?;
        execute_args(
            &mut tx,
            "DELETE FROM metadef_tags WHERE namespace = ? AND name = ?",
            &[&ns, &name],
        )
        .await?;
    }
    let v = tag_view(&load_tag(&mut tx, &ns, &b.name).await?)?;
    tx.commit().await?;
    Ok(Json(v))
}

#[utoipa::path(delete, path = "/v2/metadefs/namespaces/{namespace}/tags/{tag_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("tag_name" = String, Path, description = "tag")),
    responses((status = 204, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such namespace or tag")))]
pub async fn delete_tag(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let delete = "DELETE FROM metadef_tags WHERE namespace = ? AND name = ?";
    delete_entry(&st, &ctx, (&ns, &name), delete, "tag").await
}

// ---- resource types ----

#[utoipa::path(get, path = "/v2/metadefs/resource_types", tag = "metadefs",
    responses((status = 200, description = "`{resource_types: [{name, created_at, updated_at}]}`: the known ones and every associated one"),
        (status = 401, description = "no token")))]
pub async fn list_resource_types(State(st): State<AppState>, _ctx: Ctx) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(
        "SELECT name, MIN(created_at) AS created_at FROM metadef_resource_types GROUP BY name",
    )
    .fetch_all(&st.db().pool)
    .await?;
    let mut names: BTreeMap<String, String> = KNOWN_RESOURCE_TYPES
        .iter()
        .map(|n| (n.to_string(), "2026-01-01T00:00:00Z".to_string()))
        .collect();
    for r in &rows {
        names.insert(get_str(r, "name")?, get_str(r, "created_at")?);
    }
    let list: Vec<Value> = names
        .into_iter()
        .map(|(n, t)| json!({"name": n, "created_at": t, "updated_at": t}))
        .collect();
    Ok(Json(json!({ "resource_types": list })))
}
