//! The volume and snapshot REST handlers.
//!
//! Create and clone answer 202 with status `creating` once the request is validated, the
//! space checked, the key settled and the source locked **shared**; the bytes are made
//! in a background task (pool create or clone, LUKS format or rekey) that ends in
//! `available` or `error` and releases the lock. Delete and extend run in the request:
//! they take the volume's lock **exclusive**, waiting (as a recorded writer, so new
//! clones queue behind them) up to [`LOCK_WAIT`], then answer 409 with `Retry-After`.
//!
//! Keys: a volume of an encrypted type gets a fresh symmetric key of the type's
//! `key_size` that it owns (deleted with it), unless the caller names one of its own
//! secrets, which is then checked against the type. A clone, or a volume made from a
//! snapshot, gets its own new key: the copied LUKS header gets a keyslot for the new
//! passphrase and loses the old one. A snapshot keeps a copy of its volume's key.

use crate::api::{check_len, ApiJson};
use crate::auth::Ctx;
use crate::dataplane::{AttachSpec, LuksFormat, Protocol};
use crate::error::{error_body, ApiError};
use crate::locks::{LockError, LockRequest, Mode};
use crate::projects::{check_url_project, project_conn};
use crate::state::AppState;
use crate::store::{execute_args, get_i64, get_str, new_id, now, opt_str};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_blockdev::layer::throttle::QosLimits;
use ember_blockdev::pool::{Pool, PoolError};
use ember_crypto::Zeroizing;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long delete, extend and clone wait for a lock before answering 409.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);
/// Bytes per GiB (volume sizes are whole GiB, as in Cinder).
pub const GIB: u64 = 1 << 30;
/// Largest volume accepted (GiB).
pub const MAX_SIZE_GIB: u64 = 1 << 20;
/// Pool object id prefix of snapshots.
pub const SNAPSHOT_PREFIX: &str = "snap-";

/// A handler error: an API error, or a lock conflict with a `Retry-After` hint.
#[derive(Debug)]
pub enum VolError {
    /// Any Cinder-style error.
    Api(ApiError),
    /// 409 with `Retry-After` (seconds).
    Busy {
        /// What is locked and by whom.
        message: String,
        /// Seconds until a retry is worth it.
        retry_after: u64,
    },
}

/// Handler result.
pub type VResult<T> = Result<T, VolError>;

impl From<ApiError> for VolError {
    fn from(e: ApiError) -> Self {
        VolError::Api(e)
    }
}

impl From<sqlx::Error> for VolError {
    fn from(e: sqlx::Error) -> Self {
        VolError::Api(e.into())
    }
}

impl From<LockError> for VolError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Busy { retry_after, .. } => VolError::Busy {
                message: e.to_string(),
                retry_after: retry_after.as_secs().max(1),
            },
            LockError::Db(e) => e.into(),
        }
    }
}

impl IntoResponse for VolError {
    fn into_response(self) -> Response {
        match self {
            VolError::Api(e) => e.into_response(),
            VolError::Busy {
                message,
                retry_after,
            } => {
                let mut r = (
                    StatusCode::CONFLICT,
                    Json(error_body(StatusCode::CONFLICT, &message)),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                r
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> VolError {
    VolError::Api(ApiError::bad_request(msg))
}

/// First checks of every change to a project's volumes and snapshots: the URL's
/// project, then a role that may write.
async fn check_writer_project(st: &AppState, ctx: &Ctx, project_id: &str) -> Result<(), ApiError> {
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
) -> VResult<()> {
    check_len(&format!("{what}.name"), name, 0, 255)?;
    if let Some(d) = description {
        check_len(&format!("{what}.description"), d, 0, 255)?;
    }
    if metadata.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(bad(format!(
            "`{what}.metadata` is not supported (leave it empty)"
        )));
    }
    Ok(())
}

fn internal(what: &str, e: impl std::fmt::Display) -> VolError {
    tracing::error!(error = %e, "{what}");
    VolError::Api(ApiError::internal(format!(
        "{what} failed (see the daemon log)"
    )))
}

fn pool_error(e: PoolError) -> VolError {
    match e {
        PoolError::NoSpace { need, free } => VolError::Api(ApiError::too_large(format!(
            "not enough space in the storage pool: {need} bytes needed, {free} bytes free"
        ))),
        e => internal("storage pool operation", e),
    }
}

/// Run blocking data-plane work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("background task failed: {e}"))?
}

// ---------------------------------------------------------------------------------------
// Rows

/// A volume row.
#[derive(Debug, Clone)]
pub(crate) struct Vol {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: Option<String>,
    pub size_bytes: u64,
    pub type_id: String,
    pub encryption_key_id: Option<String>,
    pub owns_key: bool,
    pub pool: String,
    pub node_id: Option<String>,
    pub status: String,
    pub source_volid: Option<String>,
    pub snapshot_id: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

pub(crate) fn vol_row(r: &AnyRow) -> Result<Vol, sqlx::Error> {
    Ok(Vol {
        id: get_str(r, "id")?,
        project_id: get_str(r, "project_id")?,
        name: get_str(r, "name")?,
        description: opt_str(r, "description")?,
        size_bytes: u64::try_from(get_i64(r, "size_bytes")?).unwrap_or(0),
        type_id: get_str(r, "type_id")?,
        encryption_key_id: opt_str(r, "encryption_key_id")?,
        owns_key: get_i64(r, "owns_key")? != 0,
        pool: get_str(r, "pool")?,
        node_id: opt_str(r, "node_id")?,
        status: get_str(r, "status")?,
        source_volid: opt_str(r, "source_volid")?,
        snapshot_id: opt_str(r, "snapshot_id")?,
        created_at: get_str(r, "created_at")?,
        updated_at: get_str(r, "updated_at")?,
    })
}

/// A snapshot row.
#[derive(Debug, Clone)]
pub(crate) struct Snap {
    pub id: String,
    pub project_id: String,
    pub volume_id: String,
    pub name: String,
    pub description: Option<String>,
    pub size_bytes: u64,
    pub encryption_key_id: Option<String>,
    pub pool: String,
    pub node_id: Option<String>,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

pub(crate) fn snap_row(r: &AnyRow) -> Result<Snap, sqlx::Error> {
    Ok(Snap {
        id: get_str(r, "id")?,
        project_id: get_str(r, "project_id")?,
        volume_id: get_str(r, "volume_id")?,
        name: get_str(r, "name")?,
        description: opt_str(r, "description")?,
        size_bytes: u64::try_from(get_i64(r, "size_bytes")?).unwrap_or(0),
        encryption_key_id: opt_str(r, "encryption_key_id")?,
        pool: get_str(r, "pool")?,
        node_id: opt_str(r, "node_id")?,
        status: get_str(r, "status")?,
        created_at: get_str(r, "created_at")?,
        updated_at: get_str(r, "updated_at")?,
    })
}

/// The pool object id of a snapshot.
pub(crate) fn snap_object(id: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{id}")
}

async fn find_vol(conn: &mut AnyConnection, id: &str) -> Result<Option<Vol>, sqlx::Error> {
    let r = sqlx::query("SELECT * FROM volumes WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    r.as_ref().map(vol_row).transpose()
}

/// A volume of the URL's project (admins see any); 404 otherwise.
async fn load_vol(conn: &mut AnyConnection, ctx: &Ctx, project_id: &str, id: &str) -> VResult<Vol> {
    match find_vol(conn, id).await? {
        Some(v) if v.project_id == project_id || ctx.is_admin() => Ok(v),
        _ => Err(ApiError::not_found(format!("volume {id} not found")).into()),
    }
}

async fn load_snap(
    conn: &mut AnyConnection,
    ctx: &Ctx,
    project_id: &str,
    id: &str,
) -> VResult<Snap> {
    let r = sqlx::query("SELECT * FROM snapshots WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    match r.as_ref().map(snap_row).transpose()? {
        Some(s) if s.project_id == project_id || ctx.is_admin() => Ok(s),
        _ => Err(ApiError::not_found(format!("snapshot {id} not found")).into()),
    }
}

pub(crate) async fn set_vol_status(
    st: &AppState,
    id: &str,
    status: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE volumes SET status = ?, updated_at = ? WHERE id = ?")
        .bind(status.to_string())
        .bind(now())
        .bind(id.to_string())
        .execute(&st.db().pool)
        .await?;
    Ok(())
}

async fn set_snap_status(st: &AppState, id: &str, status: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE snapshots SET status = ?, updated_at = ? WHERE id = ?")
        .bind(status.to_string())
        .bind(now())
        .bind(id.to_string())
        .execute(&st.db().pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Types, pools, keys

/// The encryption spec of a type.
#[derive(Debug, Clone)]
struct Enc {
    provider: String,
    cipher: String,
    key_size: i64,
    control_location: String,
}

impl Enc {
    fn luks(&self) -> LuksFormat {
        LuksFormat {
            version: if self.provider == "luks2" { 2 } else { 1 },
            key_bits: u32::try_from(self.key_size).unwrap_or(512),
        }
    }
    /// `aes` of `aes-xts-plain64`.
    fn algorithm(&self) -> &str {
        self.cipher.split('-').next().unwrap_or("aes")
    }
    /// `xts` of `aes-xts-plain64`.
    fn mode(&self) -> &str {
        self.cipher.split('-').nth(1).unwrap_or("xts")
    }
}

#[derive(Debug, Clone)]
struct TypeInfo {
    id: String,
    name: String,
    enc: Option<Enc>,
    specs: BTreeMap<String, String>,
}

async fn type_info(conn: &mut AnyConnection, row: &AnyRow) -> Result<TypeInfo, sqlx::Error> {
    let id = get_str(row, "id")?;
    let enc = sqlx::query("SELECT * FROM volume_type_encryption WHERE type_id = ?")
        .bind(id.clone())
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| -> Result<Enc, sqlx::Error> {
            Ok(Enc {
                provider: get_str(&r, "provider")?,
                cipher: get_str(&r, "cipher")?,
                key_size: get_i64(&r, "key_size")?,
                control_location: get_str(&r, "control_location")?,
            })
        })
        .transpose()?;
    let mut specs = BTreeMap::new();
    for r in sqlx::query("SELECT spec_key, value FROM volume_type_extra_specs WHERE type_id = ?")
        .bind(id.clone())
        .fetch_all(&mut *conn)
        .await?
    {
        specs.insert(get_str(&r, "spec_key")?, get_str(&r, "value")?);
    }
    Ok(TypeInfo {
        id,
        name: get_str(row, "name")?,
        enc,
        specs,
    })
}

/// A type by id or name that the caller may see (404 otherwise).
async fn visible_type(
    conn: &mut AnyConnection,
    ctx: &Ctx,
    project_id: &str,
    key: &str,
) -> VResult<TypeInfo> {
    let rows = sqlx::query("SELECT id, name, is_public FROM volume_types WHERE id = ? OR name = ?")
        .bind(key.to_string())
        .bind(key.to_string())
        .fetch_all(&mut *conn)
        .await?;
    let row = rows
        .iter()
        .find(|r| get_str(r, "id").is_ok_and(|v| v == key))
        .or(rows.first());
    let Some(row) = row else {
        return Err(ApiError::not_found(format!("volume type {key} not found")).into());
    };
    let id = get_str(row, "id")?;
    if get_i64(row, "is_public")? == 0 && !ctx.is_admin() {
        let n = sqlx::query(
            "SELECT COUNT(*) AS n FROM volume_type_access WHERE type_id = ? AND project_id = ?",
        )
        .bind(id.clone())
        .bind(project_id.to_string())
        .fetch_one(&mut *conn)
        .await?;
        if get_i64(&n, "n")? == 0 {
            return Err(ApiError::not_found(format!("volume type {key} not found")).into());
        }
    }
    Ok(type_info(conn, row).await?)
}

async fn type_by_id(conn: &mut AnyConnection, id: &str) -> VResult<TypeInfo> {
    let row = sqlx::query("SELECT id, name, is_public FROM volume_types WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::internal(format!("volume type {id} vanished")))?;
    Ok(type_info(conn, &row).await?)
}

fn qos_of(specs: &BTreeMap<String, String>) -> QosLimits {
    let get = |k: &str| {
        specs
            .get(&format!("qos:{k}"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0)
    };
    QosLimits {
        read_iops_sec: get("read_iops_sec"),
        write_iops_sec: get("write_iops_sec"),
        total_iops_sec: get("total_iops_sec"),
        read_bytes_sec: get("read_bytes_sec"),
        write_bytes_sec: get("write_bytes_sec"),
        total_bytes_sec: get("total_bytes_sec"),
    }
}

/// The pool for a new volume: the type's `volume_backend_name`, else `default`, else the
/// first one.
fn pick_pool(st: &AppState, t: &TypeInfo) -> VResult<Arc<dyn Pool>> {
    let pools = st.dataplane().pools();
    if let Some(name) = t.specs.get("volume_backend_name") {
        return pools.into_iter().find(|p| p.name() == name).ok_or_else(|| {
            bad(format!(
                "volume type {}: volume_backend_name {name:?} names no storage pool of this node",
                t.name
            ))
        });
    }
    let found = pools
        .iter()
        .find(|p| p.name() == "default")
        .cloned()
        .or_else(|| pools.first().cloned());
    found.ok_or_else(|| VolError::Api(ApiError::unavailable("this node has no storage pool")))
}

/// The pool an existing object lives in.
pub(crate) fn pool_named(st: &AppState, name: &str) -> VResult<Arc<dyn Pool>> {
    st.dataplane()
        .pools()
        .into_iter()
        .find(|p| p.name() == name)
        .ok_or_else(|| {
            VolError::Api(ApiError::unavailable(format!(
                "storage pool {name} is not reachable from this node"
            )))
        })
}

/// A secret row (no payload).
struct KeyRow {
    project_id: String,
    secret_type: String,
    algorithm: Option<String>,
    bit_length: Option<i64>,
    mode: Option<String>,
    expiration: Option<String>,
    status: String,
    content_type: String,
    sealed: String,
}

async fn load_key(conn: &mut AnyConnection, id: &str) -> Result<Option<KeyRow>, sqlx::Error> {
    let r = sqlx::query("SELECT * FROM secrets WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    r.map(|r| {
        Ok(KeyRow {
            project_id: get_str(&r, "project_id")?,
            secret_type: get_str(&r, "secret_type")?,
            algorithm: opt_str(&r, "algorithm")?,
            bit_length: r.try_get_unchecked_opt("bit_length")?,
            mode: opt_str(&r, "mode")?,
            expiration: opt_str(&r, "expiration")?,
            status: get_str(&r, "status")?,
            content_type: get_str(&r, "content_type")?,
            sealed: get_str(&r, "sealed")?,
        })
    })
    .transpose()
}

trait OptI64 {
    fn try_get_unchecked_opt(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
}

impl OptI64 for AnyRow {
    fn try_get_unchecked_opt(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        use sqlx::Row;
        self.try_get::<Option<i64>, _>(col)
    }
}

fn expired(expiration: &Option<String>) -> bool {
    expiration
        .as_deref()
        .and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
        .is_some_and(|t| t <= time::OffsetDateTime::now_utc())
}

/// Check a caller-supplied key against the type (400 naming the field that differs).
fn check_user_key(k: &KeyRow, id: &str, project_id: &str, enc: &Enc) -> VResult<()> {
    if k.project_id != project_id {
        // Do not reveal that someone else's secret exists.
        return Err(bad(format!(
            "encryption_key_id {id}: no such secret in this project"
        )));
    }
    if k.status != "ACTIVE" || expired(&k.expiration) {
        return Err(bad(format!(
            "encryption_key_id {id}: the secret is not active (expired or not ready)"
        )));
    }
    match k.secret_type.as_str() {
        "symmetric" => {
            let alg = k.algorithm.clone().unwrap_or_default();
            if !alg.eq_ignore_ascii_case(enc.algorithm()) {
                return Err(bad(format!(
                    "encryption_key_id {id}: algorithm is {alg:?}, the volume type needs {:?}",
                    enc.algorithm()
                )));
            }
            if k.bit_length != Some(enc.key_size) {
                return Err(bad(format!(
                    "encryption_key_id {id}: bit_length is {}, the volume type's key_size is {}",
                    k.bit_length.map_or("unset".to_string(), |b| b.to_string()),
                    enc.key_size
                )));
            }
            if let Some(m) = k.mode.as_deref().filter(|m| !m.is_empty()) {
                if !m.eq_ignore_ascii_case(enc.mode()) {
                    return Err(bad(format!(
                        "encryption_key_id {id}: mode is {m:?}, the volume type's cipher needs {:?}",
                        enc.mode()
                    )));
                }
            }
            Ok(())
        }
        "passphrase" | "opaque" => Ok(()),
        other => Err(bad(format!(
            "encryption_key_id {id}: secret_type is {other:?}; use a symmetric or passphrase secret"
        ))),
    }
}

/// Attributes of a secret Ember stores for a volume or snapshot.
struct KeyAttrs<'a> {
    name: &'a str,
    secret_type: &'a str,
    algorithm: Option<&'a str>,
    bit_length: Option<i64>,
    mode: Option<&'a str>,
    content_type: &'a str,
}

/// Insert a secret owned by `project_id` (a volume's own key).
async fn insert_key(
    conn: &mut AnyConnection,
    st: &AppState,
    project_id: &str,
    a: &KeyAttrs<'_>,
    payload: &[u8],
) -> VResult<String> {
    let KeyAttrs {
        name,
        secret_type,
        algorithm,
        bit_length,
        mode,
        content_type,
    } = *a;
    let id = new_id();
    let sealed = st.master().seal(&id, payload)?;
    let t = now();
    sqlx::query(
        "INSERT INTO secrets (id, project_id, creator_id, name, secret_type, algorithm, bit_length, mode, \
         content_type, expiration, status, sealed, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'ACTIVE', ?, ?, ?)",
    )
    .bind(id.clone())
    .bind(project_id.to_string())
    .bind("ember")
    .bind(name.to_string())
    .bind(secret_type.to_string())
    .bind(algorithm.map(str::to_string))
    .bind(bit_length)
    .bind(mode.map(str::to_string))
    .bind(content_type.to_string())
    .bind(sealed)
    .bind(t.clone())
    .bind(t)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Order a new symmetric key for a volume of `enc`.
async fn order_key(
    conn: &mut AnyConnection,
    st: &AppState,
    project_id: &str,
    enc: &Enc,
    volume_id: &str,
) -> VResult<String> {
    let bytes = usize::try_from(enc.key_size / 8)
        .unwrap_or(64)
        .clamp(16, 64);
    let mut key = Zeroizing::new(vec![0u8; bytes]);
    getrandom::fill(&mut key).map_err(|e| internal("OS random generator", e))?;
    insert_key(
        conn,
        st,
        project_id,
        &KeyAttrs {
            name: &format!("volume-{volume_id}"),
            secret_type: "symmetric",
            algorithm: Some(enc.algorithm()),
            bit_length: Some(enc.key_size),
            mode: None,
            content_type: "application/octet-stream",
        },
        &key,
    )
    .await
}

/// A copy of a secret (a snapshot keeps its volume's key even after the volume is gone).
async fn copy_key(
    conn: &mut AnyConnection,
    st: &AppState,
    src: &str,
    project_id: &str,
    name: &str,
) -> VResult<String> {
    let k = load_key(conn, src)
        .await?
        .ok_or_else(|| ApiError::internal(format!("encryption key {src} vanished")))?;
    let payload = Zeroizing::new(st.master().open(src, &k.sealed)?);
    insert_key(
        conn,
        st,
        project_id,
        &KeyAttrs {
            name,
            secret_type: &k.secret_type,
            algorithm: k.algorithm.as_deref(),
            bit_length: k.bit_length,
            mode: k.mode.as_deref(),
            content_type: &k.content_type,
        },
        &payload,
    )
    .await
}

/// The LUKS passphrase of a key (Cinder's rule: hex for symmetric, as-is for passphrase).
async fn passphrase(
    conn: &mut AnyConnection,
    st: &AppState,
    key_id: &str,
) -> VResult<Zeroizing<Vec<u8>>> {
    let k = load_key(conn, key_id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("encryption key {key_id} vanished")))?;
    let payload = Zeroizing::new(st.master().open(key_id, &k.sealed)?);
    Ok(crate::keys::passphrase_for(&k.secret_type, &payload))
}

// ---------------------------------------------------------------------------------------
// Views

async fn attachments(conn: &mut AnyConnection, volume_id: &str) -> Result<Vec<Value>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT * FROM volume_attachments WHERE volume_id = ? ORDER BY attached_at, id",
    )
    .bind(volume_id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(json!({
                "id": get_str(r, "id")?,
                "attachment_id": get_str(r, "id")?,
                "volume_id": volume_id,
                "server_id": null,
                "host_name": get_str(r, "node_id")?,
                "protocol": get_str(r, "protocol")?,
                "attached_at": get_str(r, "attached_at")?,
            }))
        })
        .collect()
}

async fn vol_view(conn: &mut AnyConnection, v: &Vol) -> Result<Value, sqlx::Error> {
    let tname = sqlx::query("SELECT name FROM volume_types WHERE id = ?")
        .bind(v.type_id.clone())
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| get_str(&r, "name"))
        .transpose()?;
    let mut o = json!({
        "id": v.id,
        "name": v.name,
        "description": v.description,
        "status": v.status,
        "size": v.size_bytes / GIB,
        "volume_type": tname,
        "volume_type_id": v.type_id,
        "encrypted": v.encryption_key_id.is_some(),
        "attachments": attachments(conn, &v.id).await?,
        "replication_status": "disabled",
        "multiattach": true,
        "source_volid": v.source_volid,
        "snapshot_id": v.snapshot_id,
        "bootable": "false",
        "metadata": {},
        "availability_zone": "ember",
        "os-vol-host-attr:host": format!("{}@{}", v.node_id.clone().unwrap_or_default(), v.pool),
        "os-vol-tenant-attr:tenant_id": v.project_id,
        "created_at": v.created_at,
        "updated_at": v.updated_at,
    });
    if let Some(k) = &v.encryption_key_id {
        o["encryption_key_id"] = json!(k);
    }
    Ok(o)
}

fn snap_view(s: &Snap) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "description": s.description,
        "volume_id": s.volume_id,
        "status": s.status,
        "size": s.size_bytes / GIB,
        "encrypted": s.encryption_key_id.is_some(),
        "metadata": {},
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    })
}

// ---------------------------------------------------------------------------------------
// Bodies

/// `POST /v3/{project_id}/volumes` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreateBody {
    /// The new volume.
    pub volume: VolumeCreate,
    /// Accepted and ignored (one node decides).
    #[serde(default, rename = "OS-SCH-HNT:scheduler_hints")]
    pub scheduler_hints: Option<Value>,
}

/// A new volume.
#[derive(Debug, Deserialize)]
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
#[derive(Debug, Deserialize)]
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
}

/// `os-extend` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendArgs {
    /// New size in GiB.
    pub new_size: u64,
}

/// `os-initialize_connection` / `os-terminate_connection` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionArgs {
    /// The connector.
    pub connector: Connector,
}

/// Who connects, and how.
#[derive(Debug, Deserialize)]
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
    pub other: BTreeMap<String, Value>,
}

/// `POST /v3/{project_id}/snapshots` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateBody {
    /// The new snapshot.
    pub snapshot: SnapshotCreate,
}

/// A new snapshot.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Source volume.
    pub volume_id: String,
    /// Name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Allow snapshots of in-use volumes (crash-consistent).
    pub force: Option<crate::api::BoolLike>,
    /// Must be empty or absent.
    pub metadata: Option<BTreeMap<String, String>>,
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
) -> VResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let rows = sqlx::query("SELECT * FROM volumes WHERE project_id = ? ORDER BY created_at, id")
        .bind(project_id.clone())
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        out.push(vol_view(&mut conn, &vol_row(r)?).await?);
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
) -> VResult<Json<Value>> {
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
) -> VResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let v = load_vol(&mut conn, &ctx, &project_id, &id).await?;
    Ok(Json(json!({ "volume": vol_view(&mut conn, &v).await? })))
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
) -> VResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let v = load_vol(&mut conn, &ctx, &project_id, &id).await?;
    let t = type_by_id(&mut conn, &v.type_id).await?;
    let mut o = json!({ "encryption_key_id": v.encryption_key_id });
    if let (Some(e), Some(_)) = (&t.enc, &v.encryption_key_id) {
        o["provider"] = json!(e.provider);
        o["cipher"] = json!(e.cipher);
        o["key_size"] = json!(e.key_size);
        o["control_location"] = json!(e.control_location);
    }
    Ok(Json(o))
}

/// Where a new volume's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    Blank,
    /// Pool object id of the source volume or snapshot, and its size.
    Object {
        id: String,
        size: u64,
    },
}

/// A LUKS passphrase.
type Passphrase = Zeroizing<Vec<u8>>;

/// The background part of a create.
struct CreateJob {
    vol_id: String,
    pool: Arc<dyn Pool>,
    size: u64,
    source: Source,
    /// Format a new LUKS volume with this passphrase.
    format: Option<(LuksFormat, Zeroizing<Vec<u8>>)>,
    /// Rekey the copied LUKS header: old → new passphrase.
    rekey: Option<(Passphrase, Passphrase)>,
    lock_holder: Option<String>,
}

fn build_volume(st: &AppState, job: &CreateJob) -> anyhow::Result<()> {
    let spec = match &job.source {
        Source::Blank => job.pool.create(&job.vol_id, job.size)?,
        Source::Object { id, size } => {
            let (spec, method) = Pool::clone_from(job.pool.as_ref(), id, &job.vol_id)?;
            tracing::info!(volume = %job.vol_id, source = %id, ?method, "cloned");
            if job.size > *size {
                job.pool.resize(&job.vol_id, job.size)?;
            }
            spec
        }
    };
    if let Some((f, pass)) = &job.format {
        st.dataplane().luks_format(&spec, pass, f)?;
    }
    if let Some((old, new)) = &job.rekey {
        st.dataplane().luks_change_key(&spec, old, new)?;
    }
    Ok(())
}

async fn run_create(st: AppState, job: CreateJob) {
    let job = Arc::new(job);
    let (st2, j2) = (st.clone(), job.clone());
    let res = blocking(move || build_volume(&st2, &j2)).await;
    let status = match &res {
        Ok(()) => "available",
        Err(e) => {
            tracing::error!(volume = %job.vol_id, error = %format!("{e:#}"), "volume create failed");
            let (p, id) = (job.pool.clone(), job.vol_id.clone());
            let _ = blocking(move || Ok(p.delete(&id)?)).await;
            "error"
        }
    };
    let r = sqlx::query(
        "UPDATE volumes SET status = ?, updated_at = ? WHERE id = ? AND status = 'creating'",
    )
    .bind(status)
    .bind(now())
    .bind(job.vol_id.clone())
    .execute(&st.db().pool)
    .await;
    if let Err(e) = r {
        tracing::error!(volume = %job.vol_id, error = %e, "cannot record the volume's status");
    }
    if let Some(h) = &job.lock_holder {
        if let Err(e) = st.locks().release(h).await {
            tracing::error!(holder = %h, error = %e, "cannot release the source lock (its lease will expire)");
        }
    }
    if status == "available" {
        tracing::info!(volume = %job.vol_id, "volume available");
    }
}

#[utoipa::path(post, path = "/v3/{project_id}/volumes", tag = "volumes",
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
) -> VResult<(StatusCode, Json<Value>)> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let b = body.volume;
    let name = b.name.clone().unwrap_or_default();
    check_descriptive("volume", &name, &b.description, &b.metadata)?;
    if b.source_volid.is_some() && b.snapshot_id.is_some() {
        return Err(bad(
            "give at most one of `volume.source_volid` and `volume.snapshot_id`",
        ));
    }
    let mut conn = st.db().pool.acquire().await?;
    let vol_id = new_id();

    // The source: its type, size, key and pool object.
    struct Src {
        kind: &'static str,
        id: String,
        object: String,
        size: u64,
        type_id: String,
        key: Option<String>,
        pool: String,
    }
    let src = if let Some(sid) = &b.source_volid {
        let v = load_vol(&mut conn, &ctx, &project_id, sid)
            .await
            .map_err(|_| {
                VolError::Api(ApiError::not_found(format!(
                    "source volume {sid} not found"
                )))
            })?;
        match v.status.as_str() {
            "available" | "in-use" => {}
            "deleting" => {
                return Err(VolError::Api(ApiError::conflict(format!(
                    "source volume {sid} is being deleted"
                ))))
            }
            s => {
                return Err(bad(format!(
                    "source volume {sid} is {s}; it must be available or in-use"
                )))
            }
        }
        Some(Src {
            kind: "volume",
            id: v.id.clone(),
            object: v.id.clone(),
            size: v.size_bytes,
            type_id: v.type_id.clone(),
            key: v.encryption_key_id.clone(),
            pool: v.pool.clone(),
        })
    } else if let Some(sid) = &b.snapshot_id {
        let s = load_snap(&mut conn, &ctx, &project_id, sid).await?;
        match s.status.as_str() {
            "available" => {}
            "deleting" => {
                return Err(VolError::Api(ApiError::conflict(format!(
                    "snapshot {sid} is being deleted"
                ))))
            }
            st => return Err(bad(format!("snapshot {sid} is {st}; it must be available"))),
        }
        let type_id = match find_vol(&mut conn, &s.volume_id).await? {
            Some(v) => v.type_id,
            None => crate::types::DEFAULT_TYPE.to_string(),
        };
        Some(Src {
            kind: "snapshot",
            id: s.id.clone(),
            object: snap_object(&s.id),
            size: s.size_bytes,
            type_id,
            key: s.encryption_key_id.clone(),
            pool: s.pool.clone(),
        })
    } else {
        None
    };

    // Type: explicit > source's > default.
    let t = match (&b.volume_type, &src) {
        (Some(k), _) => visible_type(&mut conn, &ctx, &project_id, k).await?,
        (None, Some(s)) => type_by_id(&mut conn, &s.type_id).await?,
        (None, None) => {
            visible_type(&mut conn, &ctx, &project_id, crate::types::DEFAULT_TYPE).await?
        }
    };
    if let Some(s) = &src {
        if s.key.is_some() != t.enc.is_some() {
            return Err(bad(format!(
                "volume type {} is {}encrypted but the source {} {} is {}: a copy cannot change that",
                t.name,
                if t.enc.is_some() { "" } else { "not " },
                s.kind,
                s.id,
                if s.key.is_some() { "encrypted" } else { "not encrypted" }
            )));
        }
    }
    if b.encryption_key_id.is_some() && t.enc.is_none() {
        return Err(bad(format!(
            "`volume.encryption_key_id` given but volume type {} is not encrypted",
            t.name
        )));
    }

    // Size.
    let size_gib = match (b.size, &src) {
        (Some(s), _) => s,
        (None, Some(s)) => s.size.div_ceil(GIB),
        (None, None) => return Err(bad("`volume.size` is required")),
    };
    if size_gib == 0 || size_gib > MAX_SIZE_GIB {
        return Err(bad(format!(
            "`volume.size` must be between 1 and {MAX_SIZE_GIB} GiB"
        )));
    }
    let size = size_gib * GIB;
    if let Some(s) = &src {
        if size < s.size {
            return Err(bad(format!(
                "`volume.size` {size_gib} GiB is smaller than the source's {} GiB",
                s.size / GIB
            )));
        }
    }

    // Pool and space, before anything is allocated.
    let pool = match &src {
        Some(s) => pool_named(&st, &s.pool)?,
        None => pick_pool(&st, &t)?,
    };
    let free = {
        let p = pool.clone();
        blocking(move || Ok(p.free_bytes()?))
            .await
            .map_err(|e| internal("pool free space", e))?
    };
    let need = match &src {
        Some(s) => size.saturating_sub(s.size).saturating_add(s.size),
        None => size,
    };
    if need > free {
        return Err(VolError::Api(ApiError::too_large(format!(
            "volume of {size_gib} GiB does not fit in storage pool {}: {free} bytes free",
            pool.name()
        ))));
    }

    // Keys (validated before the source is locked).
    let mut user_key = None;
    if let (Some(kid), Some(enc)) = (&b.encryption_key_id, &t.enc) {
        let k = load_key(&mut conn, kid).await?.ok_or_else(|| {
            bad(format!(
                "encryption_key_id {kid}: no such secret in this project"
            ))
        })?;
        check_user_key(&k, kid, &project_id, enc)?;
        user_key = Some(kid.clone());
    }
    drop(conn);

    // Lock the source shared for the whole copy.
    let lock_holder = match &src {
        Some(s) => {
            let mut req = LockRequest::new(s.kind, &s.id, Mode::Shared, "clone", LOCK_WAIT);
            req.holder = format!("volume {vol_id}");
            Some(st.locks().acquire(&req).await?)
        }
        None => None,
    };
    let release = |st: AppState, h: Option<crate::locks::Holder>| async move {
        if let Some(h) = h {
            let _ = st.locks().release(&h.id).await;
        }
    };
    // Re-check the source under the lock: a delete may have won the race.
    if let Some(s) = &src {
        let mut conn = st.db().pool.acquire().await?;
        let status = if s.kind == "volume" {
            find_vol(&mut conn, &s.id).await?.map(|v| v.status)
        } else {
            load_snap(&mut conn, &ctx, &project_id, &s.id)
                .await
                .ok()
                .map(|s| s.status)
        };
        if !matches!(status.as_deref(), Some("available" | "in-use")) {
            release(st.clone(), lock_holder).await;
            return Err(VolError::Api(ApiError::conflict(format!(
                "source {} {} is being deleted",
                s.kind, s.id
            ))));
        }
    }

    let res: VResult<(CreateJob, Vol)> = async {
        let mut tx = st.db().begin().await?;
        let mut format = None;
        let mut rekey = None;
        let (key_id, owns) = match &t.enc {
            None => (None, false),
            Some(enc) => {
                let (kid, owns) = match &user_key {
                    Some(k) => (k.clone(), false),
                    None => (order_key(&mut tx, &st, &project_id, enc, &vol_id).await?, true),
                };
                let new_pass = passphrase(&mut tx, &st, &kid).await?;
                match &src {
                    None => format = Some((enc.luks(), new_pass)),
                    Some(s) => {
                        let old = s.key.clone().ok_or_else(|| ApiError::internal("source key missing"))?;
                        let old_pass = passphrase(&mut tx, &st, &old).await?;
                        rekey = Some((old_pass, new_pass));
                    }
                }
                (Some(kid), owns)
            }
        };
        let t_now = now();
        let v = Vol {
            id: vol_id.clone(),
            project_id: project_id.clone(),
            name: name.clone(),
            description: b.description.clone(),
            size_bytes: size,
            type_id: t.id.clone(),
            encryption_key_id: key_id,
            owns_key: owns,
            pool: pool.name().to_string(),
            node_id: Some(st.node_name().to_string()),
            status: "creating".into(),
            source_volid: b.source_volid.clone(),
            snapshot_id: b.snapshot_id.clone(),
            created_at: t_now.clone(),
            updated_at: t_now,
        };
        sqlx::query(
            "INSERT INTO volumes (id, project_id, name, size_bytes, type_id, encryption_key_id, pool, node_id, status, \
             created_at, updated_at, description, source_volid, snapshot_id, owns_key, previous_status) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        )
        .bind(v.id.clone())
        .bind(v.project_id.clone())
        .bind(v.name.clone())
        .bind(i64::try_from(v.size_bytes).unwrap_or(i64::MAX))
        .bind(v.type_id.clone())
        .bind(v.encryption_key_id.clone())
        .bind(v.pool.clone())
        .bind(v.node_id.clone())
        .bind(v.status.clone())
        .bind(v.created_at.clone())
        .bind(v.updated_at.clone())
        .bind(v.description.clone())
        .bind(v.source_volid.clone())
        .bind(v.snapshot_id.clone())
        .bind(i64::from(v.owns_key))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let job = CreateJob {
            vol_id: vol_id.clone(),
            pool: pool.clone(),
            size,
            source: match &src {
                None => Source::Blank,
                Some(s) => Source::Object {
                    id: s.object.clone(),
                    size: s.size,
                },
            },
            format,
            rekey,
            lock_holder: lock_holder.as_ref().map(|h| h.id.clone()),
        };
        Ok((job, v))
    }
    .await;
    let (job, v) = match res {
        Ok(x) => x,
        Err(e) => {
            release(st.clone(), lock_holder).await;
            return Err(e);
        }
    };
    tokio::spawn(run_create(st.clone(), job));
    let mut conn = st.db().pool.acquire().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "volume": vol_view(&mut conn, &v).await? })),
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
) -> VResult<StatusCode> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let mut conn = st.db().pool.acquire().await?;
    let v = load_vol(&mut conn, &ctx, &project_id, &id).await?;
    let attached = !attachments(&mut conn, &id).await?.is_empty();
    if v.status == "in-use" || attached {
        return Err(bad(format!(
            "volume {id} is in use: terminate its connections first"
        )));
    }
    let snaps = crate::store::count(
        &mut conn,
        "SELECT COUNT(*) AS n FROM snapshots WHERE volume_id = ?",
        &id,
    )
    .await?;
    if snaps > 0 {
        return Err(bad(format!(
            "volume {id} has {snaps} snapshot(s): delete them first"
        )));
    }
    if !matches!(v.status.as_str(), "available" | "error") {
        return Err(bad(format!(
            "volume {id} is {}; it must be available or error to be deleted",
            v.status
        )));
    }
    // Compare-and-swap to `deleting`: new clones are refused from now on.
    mark_deleting(
        &mut conn,
        "volume",
        &id,
        "UPDATE volumes SET previous_status = status, status = 'deleting', updated_at = ? \
         WHERE id = ? AND status IN ('available', 'error')",
    )
    .await?;
    drop(conn);
    let holder = match st.locks().acquire(&delete_lock("volume", &id)).await {
        Ok(h) => h,
        Err(e) => {
            // Give the volume back: the delete did not happen.
            let _ = sqlx::query(
                "UPDATE volumes SET status = COALESCE(previous_status, 'available'), updated_at = ? WHERE id = ? AND status = 'deleting'",
            )
            .bind(now())
            .bind(id.clone())
            .execute(&st.db().pool)
            .await;
            return Err(e.into());
        }
    };
    let res = finish_delete(&st, &v).await;
    let _ = st.locks().release(&holder.id).await;
    res.map(|()| StatusCode::ACCEPTED)
}

/// Move `kind` `id` to `deleting` with `cas_sql`, a compare-and-swap
/// `UPDATE … SET … updated_at = ? WHERE id = ? AND status IN (…)`: 409 when the status
/// changed since it was checked.
async fn mark_deleting(
    conn: &mut AnyConnection,
    kind: &str,
    id: &str,
    cas_sql: &'static str,
) -> VResult<()> {
    if execute_args(conn, cas_sql, &[&now(), id]).await? == 0 {
        return Err(VolError::Api(ApiError::conflict(format!(
            "{kind} {id} changed state; retry"
        ))));
    }
    Ok(())
}

/// The exclusive lock a delete of `kind` `id` holds while the bytes go.
fn delete_lock(kind: &str, id: &str) -> LockRequest {
    let mut req = LockRequest::new(kind, id, Mode::Exclusive, "delete", LOCK_WAIT);
    req.holder = format!("{kind} {id}");
    req
}

/// Remove a volume's bytes, key and row (status already `deleting`).
pub(crate) async fn finish_delete(st: &AppState, v: &Vol) -> VResult<()> {
    let pool = pool_named(st, &v.pool)?;
    let id = v.id.clone();
    if let Err(e) = blocking(move || Ok(pool.delete(&id)?)).await {
        let _ = set_vol_status(st, &v.id, "error_deleting").await;
        return Err(internal("delete the volume's storage", format!("{e:#}")));
    }
    let mut tx = st.db().begin().await?;
    sqlx::query("DELETE FROM volume_attachments WHERE volume_id = ?")
        .bind(v.id.clone())
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM volumes WHERE id = ?")
        .bind(v.id.clone())
        .execute(&mut *tx)
        .await?;
    if let (true, Some(k)) = (v.owns_key, &v.encryption_key_id) {
        sqlx::query("DELETE FROM secrets WHERE id = ?")
            .bind(k.clone())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::info!(volume = %v.id, "volume deleted");
    Ok(())
}

#[utoipa::path(post, path = "/v3/{project_id}/volumes/{volume_id}/action", tag = "volumes",
    params(("project_id" = String, Path, description = "project id"), ("volume_id" = String, Path, description = "volume id")),
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
) -> VResult<Response> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let n = usize::from(a.extend.is_some())
        + usize::from(a.initialize.is_some())
        + usize::from(a.terminate.is_some());
    if n != 1 {
        return Err(bad(
            "give exactly one action: os-extend, os-initialize_connection or os-terminate_connection",
        ));
    }
    let mut conn = st.db().pool.acquire().await?;
    let v = load_vol(&mut conn, &ctx, &project_id, &id).await?;
    drop(conn);
    if let Some(e) = a.extend {
        return extend(&st, &v, e.new_size)
            .await
            .map(|()| StatusCode::ACCEPTED.into_response());
    }
    if let Some(c) = a.initialize {
        return attach(&st, &v, c.connector)
            .await
            .map(|j| Json(j).into_response());
    }
    if let Some(c) = a.terminate {
        return detach(&st, &v, c.connector)
            .await
            .map(|()| StatusCode::ACCEPTED.into_response());
    }
    Err(bad("no action"))
}

async fn extend(st: &AppState, v: &Vol, new_gib: u64) -> VResult<()> {
    if !matches!(v.status.as_str(), "available" | "in-use") {
        return Err(bad(format!(
            "volume {} is {}; it must be available or in-use to be extended",
            v.id, v.status
        )));
    }
    let old_gib = v.size_bytes / GIB;
    if new_gib <= old_gib || new_gib > MAX_SIZE_GIB {
        return Err(bad(format!(
            "`os-extend.new_size` must be larger than the current size ({old_gib} GiB) and at most {MAX_SIZE_GIB}"
        )));
    }
    let new_size = new_gib * GIB;
    let pool = pool_named(st, &v.pool)?;
    let free = {
        let p = pool.clone();
        blocking(move || Ok(p.free_bytes()?))
            .await
            .map_err(|e| internal("pool free space", e))?
    };
    if new_size - v.size_bytes > free {
        return Err(VolError::Api(ApiError::too_large(format!(
            "extending to {new_gib} GiB does not fit in storage pool {}: {free} bytes free",
            pool.name()
        ))));
    }
    let mut req = LockRequest::new("volume", &v.id, Mode::Exclusive, "extend", LOCK_WAIT);
    req.holder = format!("volume {}", v.id);
    let h = st.locks().acquire(&req).await?;
    let res: VResult<()> = async {
        let (p, id) = (pool.clone(), v.id.clone());
        blocking(move || Ok(p.resize(&id, new_size)?))
            .await
            .map_err(|e| match e.downcast::<PoolError>() {
                Ok(pe) => pool_error(pe),
                Err(e) => internal("grow the volume", format!("{e:#}")),
            })?;
        let (dp, id) = (st.dataplane().clone(), v.id.clone());
        if let Err(e) = blocking(move || dp.resize(&id, new_size)).await {
            tracing::warn!(volume = %v.id, error = %format!("{e:#}"), "live exports did not learn the new size");
        }
        sqlx::query("UPDATE volumes SET size_bytes = ?, updated_at = ? WHERE id = ?")
            .bind(i64::try_from(new_size).unwrap_or(i64::MAX))
            .bind(now())
            .bind(v.id.clone())
            .execute(&st.db().pool)
            .await?;
        Ok(())
    }
    .await;
    let _ = st.locks().release(&h.id).await;
    res
}

fn protocol_of(c: &Connector) -> VResult<Protocol> {
    match c.protocol.as_deref() {
        Some("nbd") | None => Ok(Protocol::Nbd),
        Some("vhost-user") | Some("vhost_user") => Ok(Protocol::VhostUser),
        Some(p) => Err(bad(format!(
            "connector.protocol {p:?}: use \"nbd\" or \"vhost-user\""
        ))),
    }
}

async fn attach(st: &AppState, v: &Vol, c: Connector) -> VResult<Value> {
    if !matches!(v.status.as_str(), "available" | "in-use") {
        return Err(bad(format!(
            "volume {} is {}; it must be available or in-use to be attached",
            v.id, v.status
        )));
    }
    let protocol = protocol_of(&c)?;
    let mut conn = st.db().pool.acquire().await?;
    let t = type_by_id(&mut conn, &v.type_id).await?;
    let pass = match &v.encryption_key_id {
        Some(k) => Some(passphrase(&mut conn, st, k).await?),
        None => None,
    };
    drop(conn);
    let pool = pool_named(st, &v.pool)?;
    let backend = {
        let (p, id) = (pool.clone(), v.id.clone());
        blocking(move || Ok(p.spec(&id)?))
            .await
            .map_err(|e| internal("find the volume's storage", format!("{e:#}")))?
    };
    let attachment_id = new_id();
    let spec = AttachSpec {
        volume_id: v.id.clone(),
        attachment_id: attachment_id.clone(),
        backend,
        protocol,
        read_only: c.read_only,
        passphrase: pass,
        qos: qos_of(&t.specs),
    };
    let dp = st.dataplane().clone();
    let info = blocking(move || dp.attach(&spec))
        .await
        .map_err(|e| internal("attach the volume", format!("{e:#}")))?;
    let mut tx = st.db().begin().await?;
    sqlx::query(
        "INSERT INTO volume_attachments (id, volume_id, protocol, node_id, connection_info, attached_at) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(attachment_id.clone())
    .bind(v.id.clone())
    .bind(protocol.as_str())
    .bind(st.node_name().to_string())
    .bind(info.to_string())
    .bind(now())
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE volumes SET status = 'in-use', updated_at = ? WHERE id = ? AND status IN ('available', 'in-use')")
        .bind(now())
        .bind(v.id.clone())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut info = info;
    info["data"]["attachment_id"] = json!(attachment_id);
    info["data"]["volume_id"] = json!(v.id);
    info["data"]["encrypted"] = json!(v.encryption_key_id.is_some());
    info["data"]["access_mode"] = json!(if c.read_only { "ro" } else { "rw" });
    Ok(json!({ "connection_info": info }))
}

async fn detach(st: &AppState, v: &Vol, c: Connector) -> VResult<()> {
    let protocol = match &c.protocol {
        Some(_) => Some(protocol_of(&c)?),
        None => None,
    };
    let rows = sqlx::query("SELECT id, protocol FROM volume_attachments WHERE volume_id = ?")
        .bind(v.id.clone())
        .fetch_all(&st.db().pool)
        .await?;
    let mut chosen = Vec::new();
    for r in &rows {
        let aid = get_str(r, "id")?;
        let p = get_str(r, "protocol")?;
        let by_id = c.attachment_id.as_deref().is_none_or(|a| a == aid);
        let by_proto = protocol.is_none_or(|x| x.as_str() == p);
        if by_id && by_proto {
            chosen.push(aid);
        }
    }
    if chosen.is_empty() {
        return Err(bad(format!("volume {} has no matching attachment", v.id)));
    }
    for aid in &chosen {
        let (dp, vid, a) = (st.dataplane().clone(), v.id.clone(), aid.clone());
        blocking(move || dp.detach(&vid, &a))
            .await
            .map_err(|e| internal("detach the volume", format!("{e:#}")))?;
        sqlx::query("DELETE FROM volume_attachments WHERE id = ?")
            .bind(aid.clone())
            .execute(&st.db().pool)
            .await?;
    }
    sqlx::query(
        "UPDATE volumes SET status = 'available', updated_at = ? WHERE id = ? AND status = 'in-use' \
         AND NOT EXISTS (SELECT 1 FROM volume_attachments WHERE volume_id = ?)",
    )
    .bind(now())
    .bind(v.id.clone())
    .bind(v.id.clone())
    .execute(&st.db().pool)
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Snapshots

#[utoipa::path(get, path = "/v3/{project_id}/snapshots", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "`{snapshots}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_snapshots(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> VResult<Json<Value>> {
    check_url_project(&st, &ctx, &project_id).await?;
    let rows = sqlx::query("SELECT * FROM snapshots WHERE project_id = ? ORDER BY created_at, id")
        .bind(project_id.clone())
        .fetch_all(&st.db().pool)
        .await?;
    let out = rows
        .iter()
        .map(|r| snap_row(r).map(|s| snap_view(&s)))
        .collect::<Result<Vec<_>, _>>()?;
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
) -> VResult<Json<Value>> {
    let mut conn = project_conn(&st, &ctx, &project_id).await?;
    let s = load_snap(&mut conn, &ctx, &project_id, &id).await?;
    Ok(Json(json!({ "snapshot": snap_view(&s) })))
}

#[utoipa::path(post, path = "/v3/{project_id}/snapshots", tag = "snapshots",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 202, description = "`{snapshot}` (status creating)"), (status = 400, description = "bad input or status"),
        (status = 401, description = "no token"), (status = 403, description = "reader or another project"),
        (status = 404, description = "no such volume"), (status = 409, description = "volume locked (Retry-After)"),
        (status = 413, description = "not enough space")))]
pub async fn create_snapshot(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<SnapshotCreateBody>,
) -> VResult<(StatusCode, Json<Value>)> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let b = body.snapshot;
    let name = b.name.clone().unwrap_or_default();
    check_descriptive("snapshot", &name, &b.description, &b.metadata)?;
    let mut conn = st.db().pool.acquire().await?;
    let v = load_vol(&mut conn, &ctx, &project_id, &b.volume_id).await?;
    let force = b.force.is_some_and(|f| f.0);
    match v.status.as_str() {
        "available" => {}
        "in-use" if force => {}
        "in-use" => {
            return Err(bad(format!(
                "volume {} is in-use: pass \"force\": true for a crash-consistent snapshot",
                v.id
            )))
        }
        "deleting" => {
            return Err(VolError::Api(ApiError::conflict(format!(
                "volume {} is being deleted",
                v.id
            ))))
        }
        s => return Err(bad(format!("volume {} is {s}; it must be available", v.id))),
    }
    drop(conn);
    let pool = pool_named(&st, &v.pool)?;
    let free = {
        let p = pool.clone();
        blocking(move || Ok(p.free_bytes()?))
            .await
            .map_err(|e| internal("pool free space", e))?
    };
    if v.size_bytes > free {
        return Err(VolError::Api(ApiError::too_large(format!(
            "a snapshot of volume {} does not fit in storage pool {}: {free} bytes free",
            v.id,
            pool.name()
        ))));
    }
    let snap_id = new_id();
    let mut req = LockRequest::new("volume", &v.id, Mode::Shared, "snapshot", LOCK_WAIT);
    req.holder = format!("snapshot {snap_id}");
    let h = st.locks().acquire(&req).await?;
    let res: VResult<Snap> = async {
        let mut tx = st.db().begin().await?;
        let still = find_vol(&mut tx, &v.id).await?;
        if !still.as_ref().is_some_and(|x| matches!(x.status.as_str(), "available" | "in-use")) {
            return Err(VolError::Api(ApiError::conflict(format!("volume {} is being deleted", v.id))));
        }
        let key = match &v.encryption_key_id {
            Some(k) => Some(copy_key(&mut tx, &st, k, &v.project_id, &format!("snapshot-{snap_id}")).await?),
            None => None,
        };
        let t = now();
        let s = Snap {
            id: snap_id.clone(),
            project_id: project_id.clone(),
            volume_id: v.id.clone(),
            name: name.clone(),
            description: b.description.clone(),
            size_bytes: v.size_bytes,
            encryption_key_id: key,
            pool: v.pool.clone(),
            node_id: Some(st.node_name().to_string()),
            status: "creating".into(),
            created_at: t.clone(),
            updated_at: t,
        };
        sqlx::query(
            "INSERT INTO snapshots (id, project_id, volume_id, name, description, size_bytes, encryption_key_id, pool, \
             node_id, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id.clone())
        .bind(s.project_id.clone())
        .bind(s.volume_id.clone())
        .bind(s.name.clone())
        .bind(s.description.clone())
        .bind(i64::try_from(s.size_bytes).unwrap_or(i64::MAX))
        .bind(s.encryption_key_id.clone())
        .bind(s.pool.clone())
        .bind(s.node_id.clone())
        .bind(s.status.clone())
        .bind(s.created_at.clone())
        .bind(s.updated_at.clone())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(s)
    }
    .await;
    let s = match res {
        Ok(s) => s,
        Err(e) => {
            let _ = st.locks().release(&h.id).await;
            return Err(e);
        }
    };
    let (st2, s2, vid) = (st.clone(), s.clone(), v.id.clone());
    tokio::spawn(async move {
        let obj = snap_object(&s2.id);
        let (p, o, src) = (pool.clone(), obj.clone(), vid.clone());
        let res = blocking(move || Ok(Pool::clone_from(p.as_ref(), &src, &o)?)).await;
        let status = match res {
            Ok((_, method)) => {
                tracing::info!(snapshot = %s2.id, volume = %vid, ?method, "snapshot taken");
                "available"
            }
            Err(e) => {
                tracing::error!(snapshot = %s2.id, error = %format!("{e:#}"), "snapshot failed");
                let p = pool.clone();
                let _ = blocking(move || Ok(p.delete(&obj)?)).await;
                "error"
            }
        };
        if let Err(e) = set_snap_status(&st2, &s2.id, status).await {
            tracing::error!(snapshot = %s2.id, error = %e, "cannot record the snapshot's status");
        }
        let _ = st2.locks().release(&h.id).await;
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "snapshot": snap_view(&s) })),
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
) -> VResult<StatusCode> {
    check_writer_project(&st, &ctx, &project_id).await?;
    let mut conn = st.db().pool.acquire().await?;
    let s = load_snap(&mut conn, &ctx, &project_id, &id).await?;
    if !matches!(s.status.as_str(), "available" | "error") {
        return Err(bad(format!(
            "snapshot {id} is {}; it must be available or error to be deleted",
            s.status
        )));
    }
    mark_deleting(
        &mut conn,
        "snapshot",
        &id,
        "UPDATE snapshots SET status = 'deleting', updated_at = ? WHERE id = ? AND status IN ('available', 'error')",
    )
    .await?;
    drop(conn);
    let h = match st.locks().acquire(&delete_lock("snapshot", &id)).await {
        Ok(h) => h,
        Err(e) => {
            let _ = set_snap_status(&st, &id, &s.status).await;
            return Err(e.into());
        }
    };
    let res = finish_snapshot_delete(&st, &s).await;
    let _ = st.locks().release(&h.id).await;
    res.map(|()| StatusCode::ACCEPTED)
}

pub(crate) async fn finish_snapshot_delete(st: &AppState, s: &Snap) -> VResult<()> {
    let pool = pool_named(st, &s.pool)?;
    let obj = snap_object(&s.id);
    if let Err(e) = blocking(move || Ok(pool.delete(&obj)?)).await {
        let _ = set_snap_status(st, &s.id, "error_deleting").await;
        return Err(internal("delete the snapshot's storage", format!("{e:#}")));
    }
    let mut tx = st.db().begin().await?;
    sqlx::query("DELETE FROM snapshots WHERE id = ?")
        .bind(s.id.clone())
        .execute(&mut *tx)
        .await?;
    if let Some(k) = &s.encryption_key_id {
        sqlx::query("DELETE FROM secrets WHERE id = ?")
            .bind(k.clone())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
