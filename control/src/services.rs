//! The nodes of Ember as Cinder's services and cluster, and a project's limits:
//! `/v3/{project_id}/os-services`, `/clusters[/detail|/{name}]` (3.7+), `/limits`.
//!
//! Every `emberd serve` registers in the `nodes` table (this module owns it: name,
//! start, heartbeat every minute, REST address). Cinder's view of a node is one
//! `cinder-volume` service on host `<node>@ember`; it is `up` while its heartbeat is
//! younger than [`DOWN_AFTER_SECS`]. All nodes sharing the database form one cluster,
//! [`CLUSTER`] (they share the storage pools and the database; today a deployment is
//! one node). Services and clusters are admin only, as in Cinder.
//!
//! Ember has no quotas: `limits` reports what the project uses and `-1` (unlimited)
//! for every maximum; the pool's free space is the limit a create meets (413).

use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::projects::check_url_project;
use crate::state::AppState;
use crate::store::{get_str, now, Db};
use crate::versions::{Microversion, Version};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

/// The cluster every node of the database belongs to.
pub const CLUSTER: &str = "ember";
/// A node whose heartbeat is older than this is `down`.
pub const DOWN_AFTER_SECS: i64 = 180;
/// The clusters API's first microversion.
pub const CLUSTERS_MIN: Version = Version(3, 7);

/// Register (or re-register) node `name` serving REST on `rest`.
pub async fn register_node(db: &Db, name: &str, rest: &str) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    let now = now();
    let n = sqlx::query(
        "UPDATE nodes SET started_at = ?, heartbeat_at = ?, rest_address = ? WHERE name = ?",
    )
    .bind(now.clone())
    .bind(now.clone())
    .bind(rest.to_string())
    .bind(name.to_string())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        sqlx::query(
            "INSERT INTO nodes (name, started_at, heartbeat_at, rest_address) VALUES (?, ?, ?, ?)",
        )
        .bind(name.to_string())
        .bind(now.clone())
        .bind(now)
        .bind(rest.to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Refresh node `name`'s heartbeat.
pub async fn heartbeat(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE nodes SET heartbeat_at = ? WHERE name = ?")
        .bind(now())
        .bind(name.to_string())
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// A registered node.
struct Node {
    name: String,
    started_at: String,
    heartbeat_at: String,
    up: bool,
}

async fn nodes(st: &AppState) -> ApiResult<Vec<Node>> {
    let rows = sqlx::query("SELECT name, started_at, heartbeat_at FROM nodes ORDER BY name")
        .fetch_all(&st.db().pool)
        .await?;
    let now = time::OffsetDateTime::now_utc();
    rows.iter()
        .map(|r| {
            let hb = get_str(r, "heartbeat_at")?;
            let up =
                time::OffsetDateTime::parse(&hb, &time::format_description::well_known::Rfc3339)
                    .is_ok_and(|t| (now - t).whole_seconds() < DOWN_AFTER_SECS);
            Ok(Node {
                name: get_str(r, "name")?,
                started_at: get_str(r, "started_at")?,
                heartbeat_at: hb,
                up,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

async fn admin(st: &AppState, ctx: &Ctx, project_id: &str) -> ApiResult<()> {
    check_url_project(st, ctx, project_id).await?;
    ctx.require_admin()
}

fn state(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "down"
    }
}

/// `os-services` filters.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ServiceQuery {
    /// Only this host (`<node>@ember`).
    pub host: Option<String>,
    /// Only this binary (`cinder-volume`).
    pub binary: Option<String>,
}

#[utoipa::path(get, path = "/v3/{project_id}/os-services", tag = "services",
    params(("project_id" = String, Path, description = "project id"), ServiceQuery),
    responses((status = 200, description = "`{services}`: a cinder-volume service per node"),
        (status = 401, description = "no token"), (status = 403, description = "not admin")))]
pub async fn list_services(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<ServiceQuery>,
) -> ApiResult<Json<Value>> {
    admin(&st, &ctx, &project_id).await?;
    let out: Vec<Value> = nodes(&st)
        .await?
        .into_iter()
        .map(|n| {
            json!({
                "binary": "cinder-volume",
                "host": format!("{}@ember", n.name),
                "zone": crate::volumes::views::AVAILABILITY_ZONE,
                "status": "enabled",
                "state": state(n.up),
                "updated_at": n.heartbeat_at,
                "disabled_reason": null,
                "cluster": CLUSTER,
                "replication_status": "disabled",
                "active_backend_id": null,
                "frozen": false,
                "backend_state": if n.up { "up" } else { "down" },
                "started_at": n.started_at,
            })
        })
        .filter(|s| q.host.as_deref().is_none_or(|h| s["host"] == h))
        .filter(|s| q.binary.as_deref().is_none_or(|b| s["binary"] == b))
        .collect();
    Ok(Json(json!({ "services": out })))
}

async fn cluster(st: &AppState, full: bool) -> ApiResult<Value> {
    let nodes = nodes(st).await?;
    let down = nodes.iter().filter(|n| !n.up).count();
    let mut c = json!({
        "name": CLUSTER,
        "binary": "cinder-volume",
        "state": state(nodes.iter().any(|n| n.up)),
        "status": "enabled",
    });
    if full {
        c["num_hosts"] = json!(nodes.len());
        c["num_down_hosts"] = json!(down);
        c["last_heartbeat"] = json!(nodes.iter().map(|n| n.heartbeat_at.clone()).max());
        c["created_at"] = json!(nodes.iter().map(|n| n.started_at.clone()).min());
        c["updated_at"] = c["last_heartbeat"].clone();
        c["disabled_reason"] = Value::Null;
        c["replication_status"] = json!("disabled");
        c["frozen"] = json!(false);
        c["active_backend_id"] = Value::Null;
    }
    Ok(c)
}

#[utoipa::path(get, path = "/v3/{project_id}/clusters", tag = "services",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{clusters}`: the one cluster of the database's nodes"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "microversion below 3.7")))]
pub async fn list_clusters(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    mv.require(CLUSTERS_MIN, "the clusters API")?;
    admin(&st, &ctx, &project_id).await?;
    Ok(Json(json!({ "clusters": [cluster(&st, false).await?] })))
}

#[utoipa::path(get, path = "/v3/{project_id}/clusters/detail", tag = "services",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{clusters}` with host counts and heartbeats"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "microversion below 3.7")))]
pub async fn list_clusters_detail(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    mv.require(CLUSTERS_MIN, "the clusters API")?;
    admin(&st, &ctx, &project_id).await?;
    Ok(Json(json!({ "clusters": [cluster(&st, true).await?] })))
}

#[utoipa::path(get, path = "/v3/{project_id}/clusters/{cluster_name}", tag = "services",
    params(("project_id" = String, Path, description = "project id"), ("cluster_name" = String, Path, description = "cluster name")),
    responses((status = 200, description = "`{cluster}`"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such cluster, or microversion below 3.7")))]
pub async fn show_cluster(
    State(st): State<AppState>,
    ctx: Ctx,
    mv: Microversion,
    Path((project_id, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    mv.require(CLUSTERS_MIN, "the clusters API")?;
    admin(&st, &ctx, &project_id).await?;
    if name != CLUSTER {
        return Err(ApiError::not_found(format!("cluster {name} not found")));
    }
    Ok(Json(json!({ "cluster": cluster(&st, true).await? })))
}

#[utoipa::path(get, path = "/v3/{project_id}/limits", tag = "services",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{limits: {rate: [], absolute: {...}}}`: usage, and -1 (no quota) for maxima"),
        (status = 401, description = "no token"), (status = 403, description = "another project")))]
pub async fn limits(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    check_url_project(&st, &ctx, &project_id).await?;
    let mut conn = st.db().pool.acquire().await?;
    let u = crate::volumes::rows::usage(&mut conn, &project_id).await?;
    let gib = u.bytes.div_euclid(1 << 30);
    Ok(Json(json!({"limits": {"rate": [], "absolute": {
        "maxTotalVolumes": -1,
        "maxTotalSnapshots": -1,
        "maxTotalVolumeGigabytes": -1,
        "maxTotalBackups": -1,
        "maxTotalBackupGigabytes": -1,
        "totalVolumesUsed": u.volumes,
        "totalSnapshotsUsed": u.snapshots,
        "totalGigabytesUsed": gib,
        "totalBackupsUsed": 0,
        "totalBackupGigabytesUsed": 0,
    }}})))
}
