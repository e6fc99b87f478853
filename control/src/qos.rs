//! QoS specs (`/v3/{project_id}/qos-specs…`), Cinder-shaped, mapped onto Ember's QoS.
//!
//! Ember enforces QoS in its data plane, per volume (the device stack's throttle
//! layer), as `read/write/total` × `iops/bytes` per-second limits. A QoS spec holds
//! such limits under Cinder's key names (`read_iops_sec`, `write_iops_sec`,
//! `total_iops_sec`, `read_bytes_sec`, `write_bytes_sec`, `total_bytes_sec`; each a
//! whole number in 1..1e9 for IOPS, 1..1e15 for bytes, as the `OS::Ember::QoS` metadef
//! namespace says). Other keys (`*_max`, `size_iops_sec`, …) are refused, naming the
//! key: Ember would not enforce them. `consumer` is `front-end`, `back-end` or `both`
//! (default `back-end`); Ember is both the storage and the server the hosts connect
//! to, so it enforces every consumer.
//!
//! A volume type has at most one QoS spec (associate/disassociate). The limits a
//! volume gets when it is attached: the type's spec, overridden key by key by the
//! type's own `qos:*` extra specs ([`limits_of_type`]). A change applies to the next
//! attachment. Deleting a spec still associated needs `force` (which disassociates).
//!
//! Tables: `qos_specs`, `qos_spec_keys`; the association is the type's column
//! `volume_types.qos_specs_id`, written through [`crate::types`]. Admin only, as in
//! Cinder.

use crate::api::{check_required_name, ApiJson};
use crate::auth::Ctx;
use crate::dataplane::{QosLimits, RateLimits};
use crate::error::{ApiError, ApiResult};
use crate::projects::check_url_project;
use crate::state::AppState;
use crate::store::{execute_args, fetch_optional_args, get_str, new_id, now};
use crate::types::{self, VolumeType};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Migration 6 (issue 14): the QoS specs.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS qos_specs (id VARCHAR(64) NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL UNIQUE, \
     consumer VARCHAR(16) NOT NULL, created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS qos_spec_keys (qos_id VARCHAR(64) NOT NULL, spec_key VARCHAR(255) NOT NULL, \
     value VARCHAR(255) NOT NULL, PRIMARY KEY (qos_id, spec_key))",
];

/// The keys Ember enforces, with their largest value.
pub const KEYS: &[(&str, u64)] = &[
    ("read_iops_sec", 1_000_000_000),
    ("write_iops_sec", 1_000_000_000),
    ("total_iops_sec", 1_000_000_000),
    ("read_bytes_sec", 1_000_000_000_000_000),
    ("write_bytes_sec", 1_000_000_000_000_000),
    ("total_bytes_sec", 1_000_000_000_000_000),
];

const CONSUMERS: &[&str] = &["front-end", "back-end", "both"];

/// A spec value: a string or a number on the wire.
fn value_text(field: &str, v: &Value) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(ApiError::bad_request(format!(
            "`{field}` must be a string or a number"
        ))),
    }
}

/// Check a key and its value; the value as stored.
pub fn check_key(key: &str, v: &Value) -> ApiResult<String> {
    let field = format!("qos_specs.{key}");
    let Some((_, max)) = KEYS.iter().find(|(k, _)| *k == key) else {
        return Err(ApiError::bad_request(format!(
            "`{field}`: Ember enforces only {} (per volume, by its data plane)",
            KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        )));
    };
    let text = value_text(&field, v)?;
    match text.trim().parse::<u64>() {
        Ok(n) if (1..=*max).contains(&n) => Ok(n.to_string()),
        _ => Err(ApiError::bad_request(format!(
            "`{field}` must be a whole number between 1 and {max} (got {text:?})"
        ))),
    }
}

fn check_consumer(c: &str) -> ApiResult<()> {
    if CONSUMERS.contains(&c) {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "`qos_specs.consumer` {c:?} must be front-end, back-end or both"
    )))
}

/// `POST /qos-specs` body: `{"qos_specs": {"name", "consumer", <key>: <value>…}}` (the
/// keys flat beside `name`, as the clients send them; a nested `specs` object is
/// accepted too).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QosCreateBody {
    /// The new spec.
    #[schema(value_type = Object)]
    pub qos_specs: Map<String, Value>,
}

/// `PUT /qos-specs/{id}/delete_keys` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteKeysBody {
    /// Keys to remove.
    pub keys: Vec<String>,
}

/// `?vol_type_id=` of associate/disassociate.
#[derive(Debug, Deserialize, IntoParams)]
pub struct TypeQuery {
    /// The volume type.
    pub vol_type_id: Option<String>,
}

/// `?force=` of delete.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ForceQuery {
    /// Delete even if associated (disassociates).
    pub force: Option<String>,
}

/// A QoS spec.
#[derive(Debug, Clone)]
struct Spec {
    id: String,
    name: String,
    consumer: String,
    keys: BTreeMap<String, String>,
}

fn view(s: &Spec) -> Value {
    json!({"id": s.id, "name": s.name, "consumer": s.consumer, "specs": s.keys})
}

async fn keys_of(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let rows = sqlx::query("SELECT spec_key, value FROM qos_spec_keys WHERE qos_id = ?")
        .bind(id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((get_str(r, "spec_key")?, get_str(r, "value")?)))
        .collect()
}

async fn load(conn: &mut AnyConnection, id: &str) -> ApiResult<Spec> {
    let sql = "SELECT id, name, consumer FROM qos_specs WHERE id = ?";
    let r = fetch_optional_args(conn, sql, &[id])
        .await?
        .ok_or_else(|| ApiError::not_found(format!("QoS spec {id} not found")))?;
    Ok(Spec {
        id: get_str(&r, "id")?,
        name: get_str(&r, "name")?,
        consumer: get_str(&r, "consumer")?,
        keys: keys_of(conn, id).await?,
    })
}

async fn set_key(conn: &mut AnyConnection, id: &str, k: &str, v: &str) -> ApiResult<()> {
    execute_args(
        conn,
        "DELETE FROM qos_spec_keys WHERE qos_id = ? AND spec_key = ?",
        &[id, k],
    )
    .await?;
    execute_args(
        conn,
        "INSERT INTO qos_spec_keys (qos_id, spec_key, value) VALUES (?, ?, ?)",
        &[id, k, v],
    )
    .await?;
    Ok(())
}

/// The limits a volume of type `t` gets: its QoS spec's, overridden key by key by the
/// type's `qos:*` extra specs.
pub async fn limits_of_type(conn: &mut AnyConnection, t: &VolumeType) -> ApiResult<QosLimits> {
    let own = t.qos();
    let Some(id) = &t.qos_specs_id else {
        return Ok(own);
    };
    let keys = keys_of(conn, id).await?;
    let get = |k: &str| {
        keys.get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    let merge = |own: RateLimits, unit: &str| RateLimits {
        read: own.read.or(get(&format!("read_{unit}_sec"))),
        write: own.write.or(get(&format!("write_{unit}_sec"))),
        total: own.total.or(get(&format!("total_{unit}_sec"))),
    };
    Ok(QosLimits {
        iops: merge(own.iops, "iops"),
        bytes: merge(own.bytes, "bytes"),
    })
}

async fn admin(st: &AppState, ctx: &Ctx, project_id: &str) -> ApiResult<()> {
    check_url_project(st, ctx, project_id).await?;
    ctx.require_admin()
}

#[utoipa::path(get, path = "/v3/{project_id}/qos-specs", tag = "qos",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{qos_specs: [...]}`"), (status = 401, description = "no token"),
        (status = 403, description = "not admin")))]
pub async fn list_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    admin(&st, &ctx, &project_id).await?;
    let mut conn = st.db().pool.acquire().await?;
    let ids = sqlx::query("SELECT id FROM qos_specs ORDER BY name")
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::new();
    for r in &ids {
        out.push(view(&load(&mut conn, &get_str(r, "id")?).await?));
    }
    Ok(Json(json!({ "qos_specs": out })))
}

#[utoipa::path(post, path = "/v3/{project_id}/qos-specs", tag = "qos", request_body = QosCreateBody,
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{qos_specs}` created"), (status = 400, description = "bad name, consumer, key or value"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 409, description = "name taken")))]
pub async fn create_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<QosCreateBody>,
) -> ApiResult<Json<Value>> {
    admin(&st, &ctx, &project_id).await?;
    let spec = parse_create(body.qos_specs)?;
    let spec = &spec;
    st.db()
        .write("create qos", |mut tx| async move {
            let taken = crate::store::count(
                &mut tx,
                "SELECT COUNT(*) AS n FROM qos_specs WHERE name = ?",
                &spec.name,
            )
            .await?;
            if taken > 0 {
                return Err(ApiError::conflict(format!(
                    "a QoS spec named {:?} already exists",
                    spec.name
                )));
            }
            let t = now();
            sqlx::query(
        "INSERT INTO qos_specs (id, name, consumer, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(spec.id.clone())
    .bind(spec.name.clone())
    .bind(spec.consumer.clone())
    .bind(t.clone())
    .bind(t)
    .execute(&mut *tx)
    .await?;
            for (k, v) in &spec.keys {
                set_key(&mut tx, &spec.id, k, v).await?;
            }
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(Json(json!({ "qos_specs": view(spec), "links": [] })))
}

/// A create body's spec (no database needed: fuzz targets call this).
pub fn check_create_body(body: QosCreateBody) -> ApiResult<()> {
    parse_create(body.qos_specs).map(drop)
}

fn parse_create(mut m: Map<String, Value>) -> ApiResult<Spec> {
    let name = match m.remove("name") {
        Some(Value::String(n)) => n,
        Some(_) => return Err(ApiError::bad_request("`qos_specs.name` must be a string")),
        None => return Err(ApiError::bad_request("`qos_specs.name` is required")),
    };
    check_required_name("qos_specs.name", &name)?;
    let consumer = match m.remove("consumer") {
        None | Some(Value::Null) => "back-end".to_string(),
        Some(Value::String(c)) => c,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`qos_specs.consumer` must be a string",
            ))
        }
    };
    check_consumer(&consumer)?;
    let mut flat = m;
    if let Some(nested) = flat.remove("specs") {
        match nested {
            Value::Object(o) => flat.extend(o),
            Value::Null => {}
            _ => return Err(ApiError::bad_request("`qos_specs.specs` must be an object")),
        }
    }
    let mut keys = BTreeMap::new();
    for (k, v) in &flat {
        keys.insert(k.clone(), check_key(k, v)?);
    }
    Ok(Spec {
        id: new_id(),
        name,
        consumer,
        keys,
    })
}

#[utoipa::path(get, path = "/v3/{project_id}/qos-specs/{qos_id}", tag = "qos",
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id")),
    responses((status = 200, description = "`{qos_specs}`"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such spec")))]
pub async fn show_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    admin(&st, &ctx, &project_id).await?;
    let mut conn = st.db().pool.acquire().await?;
    Ok(Json(
        json!({ "qos_specs": view(&load(&mut conn, &id).await?), "links": [] }),
    ))
}

#[utoipa::path(put, path = "/v3/{project_id}/qos-specs/{qos_id}", tag = "qos",
    request_body = QosCreateBody,
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id")),
    responses((status = 200, description = "`{qos_specs: {key: value}}` as set"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such spec")))]
pub async fn set_qos_keys(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<QosCreateBody>,
) -> ApiResult<Json<Value>> {
    admin(&st, &ctx, &project_id).await?;
    if body.qos_specs.is_empty() {
        return Err(ApiError::bad_request("`qos_specs` must not be empty"));
    }
    let (body, id) = (&body, &id);
    let set = st
        .db()
        .write("set qos keys", |mut tx| async move {
            load(&mut tx, id).await?;
            let mut set = Map::new();
            for (k, v) in &body.qos_specs {
                if k == "consumer" {
                    let c = value_text("qos_specs.consumer", v)?;
                    check_consumer(&c)?;
                    execute_args(
                        &mut tx,
                        "UPDATE qos_specs SET consumer = ?, updated_at = ? WHERE id = ?",
                        &[&c, &now(), id],
                    )
                    .await?;
                    set.insert(k.clone(), json!(c));
                    continue;
                }
                let text = check_key(k, v)?;
                set_key(&mut tx, id, k, &text).await?;
                set.insert(k.clone(), json!(text));
            }
            tx.commit().await?;
            ApiResult::Ok(set)
        })
        .await?;
    Ok(Json(json!({ "qos_specs": set })))
}

#[utoipa::path(put, path = "/v3/{project_id}/qos-specs/{qos_id}/delete_keys", tag = "qos",
    request_body = DeleteKeysBody,
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id")),
    responses((status = 202, description = "removed"), (status = 400, description = "bad body"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such spec or key")))]
pub async fn delete_qos_keys(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<DeleteKeysBody>,
) -> ApiResult<StatusCode> {
    admin(&st, &ctx, &project_id).await?;
    let (body, id) = (&body, &id);
    st.db()
        .write("delete qos keys", |mut tx| async move {
            let spec = load(&mut tx, id).await?;
            for k in &body.keys {
                if !spec.keys.contains_key(k) {
                    return Err(ApiError::not_found(format!(
                        "QoS spec {id} has no key {k:?}"
                    )));
                }
                execute_args(
                    &mut tx,
                    "DELETE FROM qos_spec_keys WHERE qos_id = ? AND spec_key = ?",
                    &[id, k],
                )
                .await?;
            }
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(delete, path = "/v3/{project_id}/qos-specs/{qos_id}", tag = "qos",
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id"), ForceQuery),
    responses((status = 202, description = "deleted"), (status = 400, description = "still associated (use force)"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such spec")))]
pub async fn delete_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    Query(q): Query<ForceQuery>,
) -> ApiResult<StatusCode> {
    admin(&st, &ctx, &project_id).await?;
    let force = match q.force.as_deref() {
        None => false,
        Some(f) => crate::api::parse_bool(f)
            .ok_or_else(|| ApiError::bad_request("`force` must be a boolean"))?,
    };
    let id = &id;
    st.db().write("delete qos", |mut tx| async move {
    load(&mut tx, id).await?;
    let users = types::with_qos(&mut tx, id).await?;
    if !users.is_empty() && !force {
        return Err(ApiError::bad_request(format!(
            "QoS spec {id} is associated with {} volume type(s): disassociate them or pass force=True",
            users.len()
        )));
    }
    types::set_qos_of_all(&mut tx, id, None).await?;
    execute_args(
        &mut tx,
        "DELETE FROM qos_spec_keys WHERE qos_id = ?",
        &[id],
    )
    .await?;
    execute_args(&mut tx, "DELETE FROM qos_specs WHERE id = ?", &[id]).await?;
    tx.commit().await?;
    ApiResult::Ok(())
    }).await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/v3/{project_id}/qos-specs/{qos_id}/associations", tag = "qos",
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id")),
    responses((status = 200, description = "`{qos_associations: [{association_type, name, id}]}`"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such spec")))]
pub async fn qos_associations(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    admin(&st, &ctx, &project_id).await?;
    let mut conn = st.db().pool.acquire().await?;
    load(&mut conn, &id).await?;
    let list: Vec<Value> = types::with_qos(&mut conn, &id)
        .await?
        .into_iter()
        .map(|(tid, name)| json!({"association_type": "volume_type", "id": tid, "name": name}))
        .collect();
    Ok(Json(json!({ "qos_associations": list })))
}

/// The type of an associate/disassociate request.
async fn type_of(conn: &mut AnyConnection, ctx: &Ctx, q: &TypeQuery) -> ApiResult<VolumeType> {
    let tid = q
        .vol_type_id
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("`vol_type_id` is required"))?;
    types::resolve(conn, ctx, tid).await
}

#[utoipa::path(get, path = "/v3/{project_id}/qos-specs/{qos_id}/associate", tag = "qos",
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id"), TypeQuery),
    responses((status = 202, description = "associated"), (status = 400, description = "the type has another spec"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such spec or type")))]
pub async fn associate_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    Query(q): Query<TypeQuery>,
) -> ApiResult<StatusCode> {
    admin(&st, &ctx, &project_id).await?;
    let (ctx, id, q) = (&ctx, &id, &q);
    st.db()
        .write("associate qos", |mut tx| async move {
            load(&mut tx, id).await?;
            let t = type_of(&mut tx, ctx, q).await?;
            match &t.qos_specs_id {
                Some(cur) if cur == id => {}
                Some(cur) => {
                    return Err(ApiError::bad_request(format!(
                        "volume type {} is associated with QoS spec {cur}: disassociate it first",
                        t.id
                    )))
                }
                None => types::set_qos(&mut tx, &t.id, Some(id)).await?,
            }
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/v3/{project_id}/qos-specs/{qos_id}/disassociate", tag = "qos",
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id"), TypeQuery),
    responses((status = 202, description = "disassociated"), (status = 400, description = "not associated"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such spec or type")))]
pub async fn disassociate_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
    Query(q): Query<TypeQuery>,
) -> ApiResult<StatusCode> {
    admin(&st, &ctx, &project_id).await?;
    let (ctx, id, q) = (&ctx, &id, &q);
    st.db()
        .write("disassociate qos", |mut tx| async move {
            load(&mut tx, id).await?;
            let t = type_of(&mut tx, ctx, q).await?;
            if t.qos_specs_id.as_deref() != Some(id.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "volume type {} is not associated with QoS spec {id}",
                    t.id
                )));
            }
            types::set_qos(&mut tx, &t.id, None).await?;
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(get, path = "/v3/{project_id}/qos-specs/{qos_id}/disassociate_all", tag = "qos",
    params(("project_id" = String, Path, description = "project id"), ("qos_id" = String, Path, description = "QoS spec id")),
    responses((status = 202, description = "disassociated from every type"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such spec")))]
pub async fn disassociate_all_qos(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    admin(&st, &ctx, &project_id).await?;
    let id = &id;
    st.db()
        .write("disassociate all qos", |mut tx| async move {
            load(&mut tx, id).await?;
            types::set_qos_of_all(&mut tx, id, None).await?;
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_bodies() {
        assert_eq!(check_key("read_iops_sec", &json!("100")).unwrap(), "100");
        assert_eq!(check_key("total_bytes_sec", &json!(4096)).unwrap(), "4096");
        assert!(check_key("read_iops_sec", &json!("0")).is_err());
        assert!(check_key("read_iops_sec", &json!("x")).is_err());
        let e = check_key("read_iops_sec_max", &json!("1")).unwrap_err();
        assert!(e.message.contains("read_iops_sec_max"), "{}", e.message);
        let body = |v: Value| QosCreateBody {
            qos_specs: v.as_object().cloned().unwrap(),
        };
        assert!(check_create_body(body(json!({"name": "q", "read_iops_sec": "5"}))).is_ok());
        assert!(check_create_body(body(
            json!({"name": "q", "consumer": "front-end", "specs": {"write_iops_sec": 5}})
        ))
        .is_ok());
        let e = check_create_body(body(json!({"name": "q", "consumer": "x"}))).unwrap_err();
        assert!(e.message.contains("consumer"), "{}", e.message);
        assert!(check_create_body(body(json!({"read_iops_sec": "5"}))).is_err());
    }
}
