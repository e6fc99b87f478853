//! The nodes of Ember as Cinder's services and clusters, and a project's limits:
//! `/v3/{project_id}/os-services`, `/clusters[/detail|/{name}]` (3.7+), `/limits`.
//!
//! Membership: every `emberd serve` registers in the `nodes` table (this module owns
//! it) under its node name with its cluster (`--cluster`, default [`DEFAULT_CLUSTER`]),
//! start time, the addresses it serves on (REST and NBD listeners, JSON) and a
//! heartbeat it refreshes every `--heartbeat-secs` ([`DEFAULT_HEARTBEAT_SECS`]; the same
//! tick renews its lock leases, so a node that cannot heartbeat loses its locks after
//! the lease). Cinder's view of a node is one `cinder-volume` service on host
//! `<node>@ember` in cluster `<cluster>`; it is `up` while its heartbeat is younger than
//! `--service-down-time` ([`DEFAULT_SERVICE_DOWN_SECS`], Cinder's `service_down_time`).
//! A cluster is the set of nodes registered with its name: `state` is `up` while any of
//! them is, `num_hosts`/`num_down_hosts` count them, `last_heartbeat` is the newest.
//! Clusters cannot be disabled (`status` is always `enabled`). Services and clusters
//! are admin only, as in Cinder.
//!
//! Ember has no quotas: `limits` reports what the project uses and `-1` (unlimited)
//! for every maximum; the pool's free space is the limit a create meets (413).

use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::projects::check_url_project;
use crate::state::AppState;
use crate::store::{get_str, now, opt_str, Db};
use crate::versions::{Microversion, Version};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use utoipa::IntoParams;

/// The cluster of a node started without `--cluster`.
pub const DEFAULT_CLUSTER: &str = "ember";
/// Seconds between two heartbeats of a node (Cinder's `report_interval`).
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// A node whose heartbeat is older than this many seconds is `down` (Cinder's
/// `service_down_time`).
pub const DEFAULT_SERVICE_DOWN_SECS: u64 = 60;
/// The clusters API's first microversion.
pub const CLUSTERS_MIN: Version = Version(3, 7);

/// Migration 12: the cluster a node belongs to and the addresses it serves on.
pub const SCHEMA_12: &[&str] = &[
    "ALTER TABLE nodes ADD COLUMN cluster VARCHAR(255) NOT NULL DEFAULT 'ember'",
    "ALTER TABLE nodes ADD COLUMN addresses TEXT NULL",
];

/// What a node tells the others about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node name (host name by default): the member id.
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// REST address.
    pub rest: String,
    /// NBD listener addresses (`HOST:PORT`, `unix:PATH`).
    pub nbd: Vec<String>,
}

/// Register (or re-register) a node: its row is created or its start, heartbeat,
/// cluster and addresses are replaced.
pub async fn register_node(db: &Db, node: &NodeInfo) -> anyhow::Result<()> {
    let addresses = json!({ "rest": node.rest, "nbd": node.nbd }).to_string();
    let r: Result<(), sqlx::Error> = db
        .write("register node", |mut tx| {
            let addresses = addresses.clone();
            async move {
                let now = now();
                let n = sqlx::query(
                    "UPDATE nodes SET started_at = ?, heartbeat_at = ?, rest_address = ?, cluster = ?, \
                     addresses = ? WHERE name = ?",
                )
                .bind(now.clone())
                .bind(now.clone())
                .bind(node.rest.clone())
                .bind(node.cluster.clone())
                .bind(addresses.clone())
                .bind(node.name.clone())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    sqlx::query(
                        "INSERT INTO nodes (name, started_at, heartbeat_at, rest_address, cluster, addresses) \
                         VALUES (?, ?, ?, ?, ?, ?)",
                    )
                    .bind(node.name.clone())
                    .bind(now.clone())
                    .bind(now)
                    .bind(node.rest.clone())
                    .bind(node.cluster.clone())
                    .bind(addresses)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await
            }
        })
        .await;
    Ok(r?)
}

/// Refresh node `name`'s heartbeat.
pub async fn heartbeat(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    crate::store::retry(crate::store::DEFAULT_RETRY, "heartbeat", || async {
        sqlx::query("UPDATE nodes SET heartbeat_at = ? WHERE name = ?")
            .bind(now())
            .bind(name.to_string())
            .execute(&db.pool)
            .await
    })
    .await?;
    Ok(())
}

/// A registered node as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// When it (re)started.
    pub started_at: String,
    /// Its last heartbeat.
    pub heartbeat_at: String,
    /// `{"rest": ADDR, "nbd": [ADDR…]}` as registered (`{}` for rows of older nodes).
    pub addresses: Value,
    /// Heartbeat younger than the service down time.
    pub up: bool,
}

/// Every registered node, by name; `up` from the heartbeat's age against `down_after`.
pub async fn list_nodes(db: &Db, down_after: Duration) -> Result<Vec<Node>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT name, cluster, started_at, heartbeat_at, addresses FROM nodes ORDER BY name",
    )
    .fetch_all(&db.pool)
    .await?;
    let now = time::OffsetDateTime::now_utc();
    let limit = i64::try_from(down_after.as_secs()).unwrap_or(i64::MAX);
    rows.iter()
        .map(|r| {
            let hb = get_str(r, "heartbeat_at")?;
            let up =
                time::OffsetDateTime::parse(&hb, &time::format_description::well_known::Rfc3339)
                    .is_ok_and(|t| (now - t).whole_seconds() < limit);
            Ok(Node {
                name: get_str(r, "name")?,
                cluster: get_str(r, "cluster")?,
                started_at: get_str(r, "started_at")?,
                heartbeat_at: hb,
                addresses: opt_str(r, "addresses")?
                    .and_then(|a| serde_json::from_str(&a).ok())
                    .unwrap_or_else(|| json!({})),
                up,
            })
        })
        .collect()
}

async fn nodes(st: &AppState) -> ApiResult<Vec<Node>> {
    Ok(list_nodes(st.db(), st.service_down_time()).await?)
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
                "cluster": n.cluster,
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

/// The clusters of the registered nodes, by name.
async fn clusters(st: &AppState) -> ApiResult<BTreeMap<String, Vec<Node>>> {
    let mut out: BTreeMap<String, Vec<Node>> = BTreeMap::new();
    for n in nodes(st).await? {
        out.entry(n.cluster.clone()).or_default().push(n);
    }
    Ok(out)
}

fn cluster_view(name: &str, nodes: &[Node], full: bool) -> Value {
    let down = nodes.iter().filter(|n| !n.up).count();
    let mut c = json!({
        "name": name,
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
    c
}

async fn cluster_list(st: &AppState, full: bool) -> ApiResult<Json<Value>> {
    let list: Vec<Value> = clusters(st)
        .await?
        .iter()
        .map(|(name, nodes)| cluster_view(name, nodes, full))
        .collect();
    Ok(Json(json!({ "clusters": list })))
}

#[utoipa::path(get, path = "/v3/{project_id}/clusters", tag = "services",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{clusters}`: the clusters of the registered nodes"),
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
    cluster_list(&st, false).await
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
    cluster_list(&st, true).await
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
    let all = clusters(&st).await?;
    let Some(nodes) = all.get(&name) else {
        return Err(ApiError::not_found(format!("cluster {name} not found")));
    };
    Ok(Json(json!({ "cluster": cluster_view(&name, nodes, true) })))
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
