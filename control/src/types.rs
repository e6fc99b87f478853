//! Volume types (`/v3/{project_id}/types…`), Cinder v3 in spirit.
//!
//! A type has a name, description, `is_public` and per-project access (private types),
//! scheduler-facing **extra specs** (admin-only, immutable while a volume uses the type,
//! hidden from non-admins except [`USER_VISIBLE_SPECS`]; a hidden key is 404 so its
//! name does not leak), descriptive user-visible **metadata** (mutable at any time; the
//! derived read-only key `encryption` is added on reads), and an optional **encryption
//! spec** (LUKS front-end/back-end; immutable while in use). QoS lives in `qos:*` extra
//! specs. Keys and values written to extra specs or metadata are checked against the
//! metadef namespaces associated with `OS::Cinder::Volumetype` ([`crate::metadefs`]).
//!
//! Every change runs in one transaction.
//!
//! The volumes module reads types only through [`resolve`] (visibility applied),
//! [`by_id`] and [`name_of`], as a [`VolumeType`] (encryption spec, QoS, pool).

use crate::api::{check_len, check_required_name, ApiJson, BoolLike, MetadataBody};
use crate::auth::Ctx;
use crate::dataplane::{LuksVersion, QosLimits, RateLimits};
use crate::error::{ApiError, ApiResult};
use crate::projects::{check_url_project, ensure_project, project_conn};
use crate::state::AppState;
use crate::store::{
    count_args, execute_args, fetch_optional_args, get_i64, get_str, new_id, now, opt_str, Db, Tx,
};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Extra specs non-admins may see (Cinder's allow-list).
pub const USER_VISIBLE_SPECS: &[&str] = &[
    "multiattach",
    "RESKEY:availability_zones",
    "replication_enabled",
];

/// Name of the built-in default type.
pub const DEFAULT_TYPE: &str = "__DEFAULT__";

/// The derived, read-only metadata key telling whether a type encrypts.
pub const ENCRYPTION_KEY: &str = "encryption";

/// Migration 7 (issue 14): a type's QoS spec (written through [`set_qos`]).
pub const SCHEMA_7: &[&str] =
    &["ALTER TABLE volume_types ADD COLUMN qos_specs_id VARCHAR(64) NULL"];

/// Create `__DEFAULT__` on first start.
pub async fn bootstrap(db: &Db) -> anyhow::Result<()> {
    let r: Result<(), sqlx::Error> = db
        .write("bootstrap the default volume type", |mut tx| async move {
            let n = crate::store::count(
                &mut tx,
                "SELECT COUNT(*) AS n FROM volume_types WHERE name = ?",
                DEFAULT_TYPE,
            )
            .await?;
            if n == 0 {
                let t = now();
                sqlx::query(
                    "INSERT INTO volume_types (id, name, description, is_public, created_at, updated_at) VALUES (?, ?, ?, 1, ?, ?)",
                )
                .bind(new_id())
                .bind(DEFAULT_TYPE)
                .bind("Default Volume Type")
                .bind(t.clone())
                .bind(t)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        })
        .await;
    Ok(r?)
}

/// `POST /types` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeCreateBody {
    pub volume_type: TypeCreate,
}

/// A new volume type.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeCreate {
    /// 1..255 characters, unique.
    pub name: String,
    pub description: Option<String>,
    /// Default true.
    #[serde(rename = "os-volume-type-access:is_public", alias = "is_public")]
    #[schema(value_type = Option<bool>)]
    pub is_public: Option<BoolLike>,
    pub extra_specs: Option<BTreeMap<String, String>>,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `PUT /types/{id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeUpdateBody {
    pub volume_type: TypeUpdate,
}

/// Fields to change (at least one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(alias = "os-volume-type-access:is_public")]
    #[schema(value_type = Option<bool>)]
    pub is_public: Option<BoolLike>,
}

/// `POST /types/{id}/extra_specs` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtraSpecsBody {
    pub extra_specs: BTreeMap<String, String>,
}

/// `POST /types/{id}/encryption` and `PUT …/encryption/{id}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncryptionBody {
    pub encryption: EncryptionSpec,
}

/// An encryption spec. `key_size` is the LUKS volume-key size in bits as given to
/// `cryptsetup --key-size` (XTS: 256 = AES-128-XTS, 512 = AES-256-XTS).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSpec {
    /// `luks` or `luks2` (required on create).
    pub provider: Option<String>,
    /// Only `aes-xts-plain64` (default).
    pub cipher: Option<String>,
    /// 256 or 512 (default 512); an integer or an integer string.
    #[schema(value_type = Option<i64>)]
    pub key_size: Option<Value>,
    /// `front-end` (default) or `back-end`.
    pub control_location: Option<String>,
}

/// `POST /types/{id}/action` body: exactly one of the two.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TypeActionBody {
    #[serde(rename = "addProjectAccess")]
    pub add_project_access: Option<ProjectRef>,
    #[serde(rename = "removeProjectAccess")]
    pub remove_project_access: Option<ProjectRef>,
}

/// A project reference.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectRef {
    pub project: String,
}

/// `GET /types` query.
#[derive(Debug, Deserialize, IntoParams)]
pub struct TypeListQuery {
    /// `true`, `false` or `none` (all; the default).
    pub is_public: Option<String>,
}

/// Key rule for extra specs and metadata: `[A-Za-z0-9-_:.]{1,255}`.
pub fn check_key(field: &str, key: &str) -> ApiResult<()> {
    let ok = (1..=255).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'));
    if !ok {
        return Err(ApiError::bad_request(format!(
            "{field} key {key:?} must match [A-Za-z0-9-_:.]{{1,255}}"
        )));
    }
    Ok(())
}

fn check_value(field: &str, key: &str, value: &str) -> ApiResult<()> {
    if value.chars().count() > 255 {
        return Err(ApiError::bad_request(format!(
            "{field} value of {key:?} is longer than 255 characters"
        )));
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Kv {
    Specs,
    Meta,
}

impl Kv {
    fn table(self) -> &'static str {
        match self {
            Kv::Specs => "volume_type_extra_specs",
            Kv::Meta => "volume_type_metadata",
        }
    }
    fn col(self) -> &'static str {
        match self {
            Kv::Specs => "spec_key",
            Kv::Meta => "meta_key",
        }
    }
    fn field(self) -> &'static str {
        match self {
            Kv::Specs => "extra_specs",
            Kv::Meta => "metadata",
        }
    }
}

async fn kv_all(
    conn: &mut AnyConnection,
    kv: Kv,
    type_id: &str,
) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let sql = format!(
        "SELECT {} AS k, value FROM {} WHERE type_id = ?",
        kv.col(),
        kv.table()
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(type_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((get_str(r, "k")?, get_str(r, "value")?)))
        .collect()
}

async fn kv_set(
    conn: &mut AnyConnection,
    kv: Kv,
    type_id: &str,
    key: &str,
    value: &str,
) -> Result<(), sqlx::Error> {
    let del = format!(
        "DELETE FROM {} WHERE type_id = ? AND {} = ?",
        kv.table(),
        kv.col()
    );
    sqlx::query(sqlx::AssertSqlSafe(del))
        .bind(type_id.to_string())
        .bind(key.to_string())
        .execute(&mut *conn)
        .await?;
    let ins = format!(
        "INSERT INTO {} (type_id, {}, value) VALUES (?, ?, ?)",
        kv.table(),
        kv.col()
    );
    sqlx::query(sqlx::AssertSqlSafe(ins))
        .bind(type_id.to_string())
        .bind(key.to_string())
        .bind(value.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn kv_delete(
    conn: &mut AnyConnection,
    kv: Kv,
    type_id: &str,
    key: &str,
) -> Result<u64, sqlx::Error> {
    let del = format!(
        "DELETE FROM {} WHERE type_id = ? AND {} = ?",
        kv.table(),
        kv.col()
    );
    Ok(sqlx::query(sqlx::AssertSqlSafe(del))
        .bind(type_id.to_string())
        .bind(key.to_string())
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// A loaded type row.
struct TypeRow {
    id: String,
    name: String,
    description: Option<String>,
    is_public: bool,
    qos_specs_id: Option<String>,
}

/// The columns [`type_row`] reads.
const TYPE_COLS: &str = "id, name, description, is_public, qos_specs_id";

fn type_row(r: &AnyRow) -> Result<TypeRow, sqlx::Error> {
    Ok(TypeRow {
        id: get_str(r, "id")?,
        name: get_str(r, "name")?,
        description: opt_str(r, "description")?,
        is_public: get_i64(r, "is_public")? != 0,
        qos_specs_id: opt_str(r, "qos_specs_id")?,
    })
}

async fn visible_to(conn: &mut AnyConnection, ctx: &Ctx, t: &TypeRow) -> Result<bool, sqlx::Error> {
    if t.is_public || ctx.is_admin() {
        return Ok(true);
    }
    has_access(conn, &t.id, &ctx.project_id).await
}

/// Does the access list of a (private) type name the project?
async fn has_access(
    conn: &mut AnyConnection,
    type_id: &str,
    project_id: &str,
) -> Result<bool, sqlx::Error> {
    let n = count_args(
        conn,
        "SELECT COUNT(*) AS n FROM volume_type_access WHERE type_id = ? AND project_id = ?",
        &[type_id, project_id],
    )
    .await?;
    Ok(n > 0)
}

/// Load a type by id (or name) that the caller may see; 404 otherwise.
async fn load_type(conn: &mut AnyConnection, ctx: &Ctx, id: &str) -> ApiResult<TypeRow> {
    let sql = format!("SELECT {TYPE_COLS} FROM volume_types WHERE id = ? OR name = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .bind(id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    // An id match wins over a name match.
    let row = row
        .iter()
        .find(|r| get_str(r, "id").is_ok_and(|v| v == id))
        .or(row.first());
    let t = match row {
        Some(r) => type_row(r)?,
        None => return Err(ApiError::not_found(format!("volume type {id} not found"))),
    };
    if !visible_to(conn, ctx, &t).await? {
        return Err(ApiError::not_found(format!("volume type {id} not found")));
    }
    Ok(t)
}

/// The `{key: value}` body of the single-key endpoints.
fn one_entry(key: String, value: Value) -> Json<Value> {
    let mut m = Map::new();
    m.insert(key, value);
    Json(Value::Object(m))
}

/// Prologue of the reads under `/v3/{project_id}/types/{type_id}`: the URL's project
/// is checked, then the type must be visible to the caller.
async fn read_type(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    type_id: &str,
) -> ApiResult<(PoolConnection<Any>, TypeRow)> {
    let mut conn = project_conn(st, ctx, project_id).await?;
    let t = load_type(&mut conn, ctx, type_id).await?;
    Ok((conn, t))
}

/// First check of every change: the URL's project, then the admin role.
async fn check_admin_project(st: &AppState, ctx: &Ctx, project_id: &str) -> ApiResult<()> {
    check_url_project(st, ctx, project_id).await?;
    ctx.require_admin()
}

/// The transaction of a change, with the type it changes loaded.
async fn begin_type(st: &AppState, ctx: &Ctx, type_id: &str) -> ApiResult<(Tx<'static>, TypeRow)> {
    let mut tx = st.db().begin().await?;
    let t = load_type(&mut tx, ctx, type_id).await?;
    Ok((tx, t))
}

/// Prologue of the changes that validate nothing before loading the type:
/// [`check_admin_project`], then [`begin_type`].
async fn change_type(
    st: &AppState,
    ctx: &Ctx,
    project_id: &str,
    type_id: &str,
) -> ApiResult<(Tx<'static>, TypeRow)> {
    check_admin_project(st, ctx, project_id).await?;
    begin_type(st, ctx, type_id).await
}

async fn has_encryption(conn: &mut AnyConnection, type_id: &str) -> Result<bool, sqlx::Error> {
    Ok(crate::store::count(
        conn,
        "SELECT COUNT(*) AS n FROM volume_type_encryption WHERE type_id = ?",
        type_id,
    )
    .await?
        > 0)
}

async fn metadata_view(
    conn: &mut AnyConnection,
    type_id: &str,
) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let mut m = kv_all(conn, Kv::Meta, type_id).await?;
    let enc = has_encryption(conn, type_id).await?;
    m.insert(ENCRYPTION_KEY.to_string(), enc.to_string());
    Ok(m)
}

fn filter_specs(ctx: &Ctx, specs: BTreeMap<String, String>) -> BTreeMap<String, String> {
    if ctx.is_admin() {
        return specs;
    }
    specs
        .into_iter()
        .filter(|(k, _)| USER_VISIBLE_SPECS.contains(&k.as_str()))
        .collect()
}

async fn type_view(conn: &mut AnyConnection, ctx: &Ctx, t: &TypeRow) -> Result<Value, sqlx::Error> {
    let specs = filter_specs(ctx, kv_all(conn, Kv::Specs, &t.id).await?);
    let meta = metadata_view(conn, &t.id).await?;
    Ok(json!({
        "id": t.id, "name": t.name, "description": t.description,
        "is_public": t.is_public, "os-volume-type-access:is_public": t.is_public,
        "extra_specs": specs, "metadata": meta, "qos_specs_id": t.qos_specs_id,
    }))
}

/// 400 if any volume uses the type.
async fn refuse_in_use(conn: &mut AnyConnection, type_id: &str, what: &str) -> ApiResult<()> {
    let n = crate::volumes::count_by_type(conn, type_id).await?;
    if n > 0 {
        return Err(ApiError::bad_request(format!(
            "cannot change {what}: the volume type is used by {n} volume(s)"
        )));
    }
    Ok(())
}

async fn validate_kv(conn: &mut AnyConnection, kv: Kv, key: &str, value: &str) -> ApiResult<()> {
    check_key(kv.field(), key)?;
    check_value(kv.field(), key, value)?;
    crate::metadefs::enforce(conn, key, value).await
}

// ---- what the volumes module asks of a type ----

/// A volume type as the volumes module needs it.
#[derive(Debug, Clone)]
pub struct VolumeType {
    /// Type id.
    pub id: String,
    /// Type name.
    pub name: String,
    /// The encryption spec, if the type encrypts.
    pub encryption: Option<Encryption>,
    /// All extra specs (admin view).
    pub extra_specs: BTreeMap<String, String>,
    /// Its QoS spec ([`crate::qos`]).
    pub qos_specs_id: Option<String>,
}

/// A type's encryption spec.
#[derive(Debug, Clone)]
pub struct Encryption {
    /// `luks` or `luks2`.
    pub provider: String,
    /// `aes-xts-plain64`.
    pub cipher: String,
    /// Key bits (256 or 512).
    pub key_size: i64,
    /// `front-end` or `back-end`.
    pub control_location: String,
}

impl Encryption {
    /// What a key must fit (`aes`, the key size, `xts`).
    pub fn key_fit(&self) -> crate::keys::KeyFit<'_> {
        let mut parts = self.cipher.split('-');
        crate::keys::KeyFit {
            algorithm: parts.next().unwrap_or("aes"),
            bit_length: self.key_size,
            mode: parts.next().unwrap_or("xts"),
        }
    }

    /// LUKS header version of new volumes.
    pub fn luks_version(&self) -> LuksVersion {
        if self.provider == "luks2" {
            LuksVersion::Luks2
        } else {
            LuksVersion::Luks1
        }
    }

    /// LUKS volume key bits of new volumes.
    pub fn key_bits(&self) -> u32 {
        u32::try_from(self.key_size).unwrap_or(512)
    }
}

impl VolumeType {
    /// QoS limits from the `qos:` extra specs (unset, zero or unparsable: unlimited).
    pub fn qos(&self) -> QosLimits {
        let rates = |unit: &str| {
            let get = |what: &str| {
                self.extra_specs
                    .get(&format!("qos:{what}_{unit}_sec"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|v| *v > 0)
            };
            RateLimits {
                read: get("read"),
                write: get("write"),
                total: get("total"),
            }
        };
        QosLimits {
            iops: rates("iops"),
            bytes: rates("bytes"),
        }
    }

    /// The storage pool the type asks for (`volume_backend_name`).
    pub fn backend_name(&self) -> Option<&str> {
        self.extra_specs
            .get("volume_backend_name")
            .map(String::as_str)
    }
}

async fn volume_type(conn: &mut AnyConnection, t: TypeRow) -> ApiResult<VolumeType> {
    let encryption = load_encryption(conn, &t.id)
        .await?
        .map(|r| -> Result<Encryption, sqlx::Error> {
            Ok(Encryption {
                provider: get_str(&r, "provider")?,
                cipher: get_str(&r, "cipher")?,
                key_size: get_i64(&r, "key_size")?,
                control_location: get_str(&r, "control_location")?,
            })
        })
        .transpose()?;
    Ok(VolumeType {
        extra_specs: kv_all(conn, Kv::Specs, &t.id).await?,
        qos_specs_id: t.qos_specs_id,
        id: t.id,
        name: t.name,
        encryption,
    })
}

/// A type by id or name that the caller may see, for a new volume (404 otherwise).
pub async fn resolve(conn: &mut AnyConnection, ctx: &Ctx, key: &str) -> ApiResult<VolumeType> {
    let t = load_type(conn, ctx, key).await?;
    volume_type(conn, t).await
}

/// The type of an existing volume (whoever may see it now).
pub async fn by_id(conn: &mut AnyConnection, id: &str) -> ApiResult<VolumeType> {
    let sql = format!("SELECT {TYPE_COLS} FROM volume_types WHERE id = ?");
    let r = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::internal(format!("volume type {id} vanished")))?;
    let t = type_row(&r)?;
    volume_type(conn, t).await
}

/// The types associated with QoS spec `qos_id`: (id, name).
pub async fn with_qos(
    conn: &mut AnyConnection,
    qos_id: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT id, name FROM volume_types WHERE qos_specs_id = ? ORDER BY name")
            .bind(qos_id.to_string())
            .fetch_all(&mut *conn)
            .await?;
    rows.iter()
        .map(|r| Ok((get_str(r, "id")?, get_str(r, "name")?)))
        .collect()
}

/// Associate type `type_id` with QoS spec `qos_id` (`None`: disassociate).
pub async fn set_qos(
    conn: &mut AnyConnection,
    type_id: &str,
    qos_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE volume_types SET qos_specs_id = ?, updated_at = ? WHERE id = ?")
        .bind(qos_id.map(str::to_string))
        .bind(now())
        .bind(type_id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Move every type of QoS spec `qos_id` to `to` (`None`: disassociate all).
pub async fn set_qos_of_all(
    conn: &mut AnyConnection,
    qos_id: &str,
    to: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE volume_types SET qos_specs_id = ?, updated_at = ? WHERE qos_specs_id = ?")
        .bind(to.map(str::to_string))
        .bind(now())
        .bind(qos_id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The name of type `id` (`None` if it is gone).
pub async fn name_of(conn: &mut AnyConnection, id: &str) -> Result<Option<String>, sqlx::Error> {
    fetch_optional_args(conn, "SELECT name FROM volume_types WHERE id = ?", &[id])
        .await?
        .map(|r| get_str(&r, "name"))
        .transpose()
}

#[utoipa::path(get, path = "/v3/{project_id}/types", tag = "types",
    params(("project_id" = String, Path, description = "project id"), TypeListQuery),
    responses((status = 200, description = "`{volume_types: [...]}` visible to the caller"),
        (status = 400, description = "bad query"), (status = 401, description = "no token"),
        (status = 403, description = "another project")))]
pub async fn list_types(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    Query(q): Query<TypeListQuery>,
) -> ApiResult<Json<Value>> {
    check_url_project(&st, &ctx, &project_id).await?;
    let filter = match q.is_public.as_deref() {
        None | Some("none") | Some("None") => None,
        Some(v) => Some(
            crate::api::parse_bool(v)
                .ok_or_else(|| ApiError::bad_request("`is_public` must be true, false or none"))?,
        ),
    };
    let mut conn = st.db().pool.acquire().await?;
    let sql = format!("SELECT {TYPE_COLS} FROM volume_types ORDER BY name");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let t = type_row(r)?;
        if filter.is_some_and(|f| f != t.is_public) {
            continue;
        }
        if visible_to(&mut conn, &ctx, &t).await? {
            out.push(type_view(&mut conn, &ctx, &t).await?);
        }
    }
    Ok(Json(json!({ "volume_types": out })))
}

#[utoipa::path(post, path = "/v3/{project_id}/types", tag = "types",
    params(("project_id" = String, Path, description = "project id")), request_body = TypeCreateBody,
    responses((status = 200, description = "`{volume_type}` created"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 409, description = "name taken")))]
pub async fn create_type(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<TypeCreateBody>,
) -> ApiResult<Json<Value>> {
    check_admin_project(&st, &ctx, &project_id).await?;
    let b = body.volume_type;
    check_required_name("volume_type.name", &b.name)?;
    if let Some(d) = &b.description {
        check_len("volume_type.description", d, 0, 255)?;
    }
    let (b, ctx) = (&b, &ctx);
    let view = st.db().write("create type", |mut tx| async move {
    let taken = crate::store::count(
        &mut tx,
        "SELECT COUNT(*) AS n FROM volume_types WHERE name = ?",
        &b.name,
    )
    .await?;
    if taken > 0 {
        return Err(ApiError::conflict(format!(
            "a volume type named {:?} already exists",
            b.name
        )));
    }
    let specs = b.extra_specs.clone().unwrap_or_default();
    let meta = b.metadata.clone().unwrap_or_default();
    for (k, v) in &specs {
        validate_kv(&mut tx, Kv::Specs, k, v).await?;
    }
    for (k, v) in &meta {
        validate_kv(&mut tx, Kv::Meta, k, v).await?;
    }
    let id = new_id();
    let t = now();
    let is_public = b.is_public.map(|b| b.0).unwrap_or(true);
    sqlx::query(
        "INSERT INTO volume_types (id, name, description, is_public, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(id.clone())
    .bind(b.name.clone())
    .bind(b.description.clone())
    .bind(i64::from(is_public))
    .bind(t.clone())
    .bind(t)
    .execute(&mut *tx)
    .await?;
    for (k, v) in &specs {
        kv_set(&mut tx, Kv::Specs, &id, k, v).await?;
    }
    for (k, v) in &meta {
        kv_set(&mut tx, Kv::Meta, &id, k, v).await?;
    }
    let row = TypeRow {
        id,
        name: b.name.clone(),
        description: b.description.clone(),
        is_public,
        qos_specs_id: None,
    };
    let view = type_view(&mut tx, ctx, &row).await?;
    tx.commit().await?;
    ApiResult::Ok(view)
    }).await?;
    Ok(Json(json!({ "volume_type": view })))
}

#[utoipa::path(get, path = "/v3/{project_id}/types/default", tag = "types",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "the default type"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no default type")))]
pub async fn default_type(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, DEFAULT_TYPE).await?;
    Ok(Json(
        json!({ "volume_type": type_view(&mut conn, &ctx, &t).await? }),
    ))
}

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    responses((status = 200, description = "`{volume_type}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such (visible) type")))]
pub async fn show_type(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    Ok(Json(
        json!({ "volume_type": type_view(&mut conn, &ctx, &t).await? }),
    ))
}

#[utoipa::path(put, path = "/v3/{project_id}/types/{type_id}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    request_body = TypeUpdateBody,
    responses((status = 200, description = "`{volume_type}` updated"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type"), (status = 409, description = "name taken")))]
pub async fn update_type(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<TypeUpdateBody>,
) -> ApiResult<Json<Value>> {
    check_admin_project(&st, &ctx, &project_id).await?;
    let u = body.volume_type;
    if u.name.is_none() && u.description.is_none() && u.is_public.is_none() {
        return Err(ApiError::bad_request(
            "`volume_type` must change at least one of name, description, is_public",
        ));
    }
    let (mut tx, mut t) = begin_type(&st, &ctx, &type_id).await?;
    if let Some(name) = u.name {
        check_required_name("volume_type.name", &name)?;
        if t.name == DEFAULT_TYPE && name != DEFAULT_TYPE {
            return Err(ApiError::bad_request(
                "the default volume type cannot be renamed",
            ));
        }
        if name != t.name {
            let taken = crate::store::count(
                &mut tx,
                "SELECT COUNT(*) AS n FROM volume_types WHERE name = ?",
                &name,
            )
            .await?;
            if taken > 0 {
                return Err(ApiError::conflict(format!(
                    "a volume type named {name:?} already exists"
                )));
            }
        }
        t.name = name;
    }
    if let Some(d) = u.description {
        check_len("volume_type.description", &d, 0, 255)?;
        t.description = Some(d);
    }
    if let Some(p) = u.is_public {
        t.is_public = p.0;
    }
    sqlx::query("UPDATE volume_types SET name = ?, description = ?, is_public = ?, updated_at = ? WHERE id = ?")
        .bind(t.name.clone())
        .bind(t.description.clone())
        .bind(i64::from(t.is_public))
        .bind(now())
        .bind(t.id.clone())
        .execute(&mut *tx)
        .await?;
    let view = type_view(&mut tx, &ctx, &t).await?;
    tx.commit().await?;
    Ok(Json(json!({ "volume_type": view })))
}

#[utoipa::path(delete, path = "/v3/{project_id}/types/{type_id}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    responses((status = 202, description = "deleted"), (status = 400, description = "in use or the default type"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type")))]
pub async fn delete_type(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let (mut tx, t) = change_type(&st, &ctx, &project_id, &type_id).await?;
    if t.name == DEFAULT_TYPE {
        return Err(ApiError::bad_request(
            "the default volume type cannot be deleted",
        ));
    }
    refuse_in_use(&mut tx, &t.id, "the volume type").await?;
    for table in [
        "DELETE FROM volume_type_extra_specs WHERE type_id = ?",
        "DELETE FROM volume_type_metadata WHERE type_id = ?",
        "DELETE FROM volume_type_encryption WHERE type_id = ?",
        "DELETE FROM volume_type_access WHERE type_id = ?",
        "DELETE FROM volume_types WHERE id = ?",
    ] {
        sqlx::query(table)
            .bind(t.id.clone())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(StatusCode::ACCEPTED)
}

// ---- extra specs ----

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/extra_specs", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    responses((status = 200, description = "`{extra_specs}` (user-visible keys only for non-admins)"),
        (status = 401, description = "no token"), (status = 403, description = "another project"),
        (status = 404, description = "no such type")))]
pub async fn list_specs(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    let specs = filter_specs(&ctx, kv_all(&mut conn, Kv::Specs, &t.id).await?);
    Ok(Json(json!({ "extra_specs": specs })))
}

#[utoipa::path(post, path = "/v3/{project_id}/types/{type_id}/extra_specs", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    request_body = ExtraSpecsBody,
    responses((status = 200, description = "`{extra_specs}` as set"), (status = 400, description = "bad key/value, metadef rule, or type in use"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type")))]
pub async fn set_specs(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<ExtraSpecsBody>,
) -> ApiResult<Json<Value>> {
    let (mut tx, t) = change_type(&st, &ctx, &project_id, &type_id).await?;
    if body.extra_specs.is_empty() {
        return Err(ApiError::bad_request("`extra_specs` must not be empty"));
    }
    refuse_in_use(&mut tx, &t.id, "extra specs").await?;
    for (k, v) in &body.extra_specs {
        validate_kv(&mut tx, Kv::Specs, k, v).await?;
    }
    for (k, v) in &body.extra_specs {
        kv_set(&mut tx, Kv::Specs, &t.id, k, v).await?;
    }
    tx.commit().await?;
    Ok(Json(json!({ "extra_specs": body.extra_specs })))
}

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/extra_specs/{key}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("key" = String, Path, description = "extra spec key")),
    responses((status = 200, description = "`{key: value}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such key, or hidden")))]
pub async fn show_spec(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    let specs = filter_specs(&ctx, kv_all(&mut conn, Kv::Specs, &t.id).await?);
    let v = specs.get(&key).ok_or_else(|| {
        ApiError::not_found(format!("volume type {} has no extra spec {key:?}", t.id))
    })?;
    Ok(one_entry(key, Value::String(v.clone())))
}

#[utoipa::path(put, path = "/v3/{project_id}/types/{type_id}/extra_specs/{key}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("key" = String, Path, description = "extra spec key")),
    request_body(content = BTreeMap<String, String>, description = "exactly `{\"<key>\": \"<value>\"}`"),
    responses((status = 200, description = "`{key: value}`"), (status = 400, description = "bad body, metadef rule, or type in use"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type")))]
pub async fn put_spec(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<BTreeMap<String, String>>,
) -> ApiResult<Json<Value>> {
    put_kv(st, ctx, Kv::Specs, project_id, type_id, key, body).await
}

async fn put_kv(
    st: AppState,
    ctx: Ctx,
    kv: Kv,
    project_id: String,
    type_id: String,
    key: String,
    body: BTreeMap<String, String>,
) -> ApiResult<Json<Value>> {
    let (mut tx, t) = change_type(&st, &ctx, &project_id, &type_id).await?;
    if body.len() != 1 || !body.contains_key(&key) {
        return Err(ApiError::bad_request(format!(
            "the body must be exactly {{{key:?}: \"<value>\"}}"
        )));
    }
    let value = body.get(&key).cloned().unwrap_or_default();
    if matches!(kv, Kv::Specs) {
        refuse_in_use(&mut tx, &t.id, "extra specs").await?;
    }
    validate_kv(&mut tx, kv, &key, &value).await?;
    kv_set(&mut tx, kv, &t.id, &key, &value).await?;
    tx.commit().await?;
    Ok(one_entry(key, Value::String(value)))
}

async fn delete_kv(
    st: AppState,
    ctx: Ctx,
    kv: Kv,
    project_id: String,
    type_id: String,
    key: String,
) -> ApiResult<StatusCode> {
    let (mut tx, t) = change_type(&st, &ctx, &project_id, &type_id).await?;
    if matches!(kv, Kv::Specs) {
        refuse_in_use(&mut tx, &t.id, "extra specs").await?;
    }
    if kv_delete(&mut tx, kv, &t.id, &key).await? == 0 {
        return Err(ApiError::not_found(format!(
            "volume type {} has no {} key {key:?}",
            t.id,
            kv.field()
        )));
    }
    tx.commit().await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(delete, path = "/v3/{project_id}/types/{type_id}/extra_specs/{key}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("key" = String, Path, description = "extra spec key")),
    responses((status = 202, description = "deleted"), (status = 400, description = "type in use"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type or key")))]
pub async fn delete_spec(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete_kv(st, ctx, Kv::Specs, project_id, type_id, key).await
}

// ---- metadata ----

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/metadata", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    responses((status = 200, description = "`{metadata}` including the derived `encryption`"),
        (status = 401, description = "no token"), (status = 403, description = "another project"),
        (status = 404, description = "no such type")))]
pub async fn list_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    Ok(Json(
        json!({ "metadata": metadata_view(&mut conn, &t.id).await? }),
    ))
}

#[utoipa::path(post, path = "/v3/{project_id}/types/{type_id}/metadata", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    request_body = MetadataBody,
    responses((status = 200, description = "`{metadata}` as set"), (status = 400, description = "bad key/value or metadef rule"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type")))]
pub async fn set_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<MetadataBody>,
) -> ApiResult<Json<Value>> {
    let (mut tx, t) = change_type(&st, &ctx, &project_id, &type_id).await?;
    if body.metadata.is_empty() {
        return Err(ApiError::bad_request("`metadata` must not be empty"));
    }
    for (k, v) in &body.metadata {
        validate_kv(&mut tx, Kv::Meta, k, v).await?;
    }
    for (k, v) in &body.metadata {
        kv_set(&mut tx, Kv::Meta, &t.id, k, v).await?;
    }
    tx.commit().await?;
    Ok(Json(json!({ "metadata": body.metadata })))
}

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/metadata/{key}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{key: value}`"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such key")))]
pub async fn show_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    let meta = metadata_view(&mut conn, &t.id).await?;
    let v = meta.get(&key).ok_or_else(|| {
        ApiError::not_found(format!("volume type {} has no metadata {key:?}", t.id))
    })?;
    Ok(one_entry(key, Value::String(v.clone())))
}

#[utoipa::path(put, path = "/v3/{project_id}/types/{type_id}/metadata/{key}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("key" = String, Path, description = "metadata key")),
    request_body(content = BTreeMap<String, String>, description = "exactly `{\"<key>\": \"<value>\"}`"),
    responses((status = 200, description = "`{key: value}`"), (status = 400, description = "bad body or metadef rule"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type")))]
pub async fn put_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<BTreeMap<String, String>>,
) -> ApiResult<Json<Value>> {
    put_kv(st, ctx, Kv::Meta, project_id, type_id, key, body).await
}

#[utoipa::path(delete, path = "/v3/{project_id}/types/{type_id}/metadata/{key}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("key" = String, Path, description = "metadata key")),
    responses((status = 202, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such type or key")))]
pub async fn delete_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    delete_kv(st, ctx, Kv::Meta, project_id, type_id, key).await
}

// ---- encryption ----

fn encryption_view(r: &AnyRow, full: bool) -> Result<Value, sqlx::Error> {
    let mut v = json!({
        "volume_type_id": get_str(r, "type_id")?,
        "encryption_id": get_str(r, "encryption_id")?,
        "provider": get_str(r, "provider")?,
        "cipher": get_str(r, "cipher")?,
        "key_size": get_i64(r, "key_size")?,
        "control_location": get_str(r, "control_location")?,
    });
    if full {
        v["created_at"] = json!(get_str(r, "created_at")?);
        v["updated_at"] = json!(get_str(r, "updated_at")?);
        v["deleted"] = json!(false);
        v["deleted_at"] = Value::Null;
    }
    Ok(v)
}

async fn load_encryption(
    conn: &mut AnyConnection,
    type_id: &str,
) -> Result<Option<AnyRow>, sqlx::Error> {
    sqlx::query(
        "SELECT type_id, encryption_id, provider, cipher, key_size, control_location, created_at, updated_at \
         FROM volume_type_encryption WHERE type_id = ?",
    )
    .bind(type_id.to_string())
    .fetch_optional(conn)
    .await
}

fn check_provider(v: &str) -> ApiResult<()> {
    match v {
        "luks" | "luks2" => Ok(()),
        _ => Err(ApiError::bad_request(format!(
            "`encryption.provider` must be luks or luks2 (got {v:?})"
        ))),
    }
}
fn check_cipher(v: &str) -> ApiResult<()> {
    match v {
        "aes-xts-plain64" => Ok(()),
        _ => Err(ApiError::bad_request(format!(
            "`encryption.cipher` must be aes-xts-plain64 (got {v:?})"
        ))),
    }
}
fn check_location(v: &str) -> ApiResult<()> {
    match v {
        "front-end" | "back-end" => Ok(()),
        _ => Err(ApiError::bad_request(format!(
            "`encryption.control_location` must be front-end or back-end (got {v:?})"
        ))),
    }
}
fn parse_key_size(v: &Value) -> ApiResult<i64> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(256) | Some(512) => Ok(n.unwrap_or(512)),
        _ => Err(ApiError::bad_request(format!(
            "`encryption.key_size` must be 256 or 512 (got {v})"
        ))),
    }
}

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/encryption", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    responses((status = 200, description = "the spec (unwrapped), `{}` if none"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such type")))]
pub async fn show_encryption(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    ctx.require_admin()?;
    match load_encryption(&mut conn, &t.id).await? {
        Some(r) => Ok(Json(encryption_view(&r, true)?)),
        None => Ok(Json(json!({}))),
    }
}

#[utoipa::path(post, path = "/v3/{project_id}/types/{type_id}/encryption", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    request_body = EncryptionBody,
    responses((status = 200, description = "`{encryption}` created"), (status = 400, description = "bad field, exists already, or type in use"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type")))]
pub async fn create_encryption(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<EncryptionBody>,
) -> ApiResult<Json<Value>> {
    check_admin_project(&st, &ctx, &project_id).await?;
    let e = body.encryption;
    let provider = e
        .provider
        .ok_or_else(|| ApiError::bad_request("`encryption.provider` is required"))?;
    check_provider(&provider)?;
    let cipher = e.cipher.unwrap_or_else(|| "aes-xts-plain64".to_string());
    check_cipher(&cipher)?;
    let key_size = match &e.key_size {
        Some(v) => parse_key_size(v)?,
        None => 512,
    };
    let location = e
        .control_location
        .unwrap_or_else(|| "front-end".to_string());
    check_location(&location)?;
    let (mut tx, t) = begin_type(&st, &ctx, &type_id).await?;
    if load_encryption(&mut tx, &t.id).await?.is_some() {
        return Err(ApiError::bad_request(format!(
            "volume type {} already has an encryption spec",
            t.id
        )));
    }
    refuse_in_use(&mut tx, &t.id, "the encryption spec").await?;
    let ts = now();
    sqlx::query(
        "INSERT INTO volume_type_encryption (type_id, encryption_id, provider, cipher, key_size, control_location, \
         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(t.id.clone())
    .bind(new_id())
    .bind(provider)
    .bind(cipher)
    .bind(key_size)
    .bind(location)
    .bind(ts.clone())
    .bind(ts)
    .execute(&mut *tx)
    .await?;
    let row = load_encryption(&mut tx, &t.id)
        .await?
        .ok_or_else(|| ApiError::internal("encryption row vanished"))?;
    let v = encryption_view(&row, false)?;
    tx.commit().await?;
    Ok(Json(json!({ "encryption": v })))
}

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/encryption/{encryption_id}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("encryption_id" = String, Path, description = "for GET: a field name (provider, cipher, key_size, control_location, encryption_id, volume_type_id)")),
    responses((status = 200, description = "`{field: value}`"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such type, spec or field")))]
pub async fn show_encryption_key(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, key)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    ctx.require_admin()?;
    let row = load_encryption(&mut conn, &t.id).await?.ok_or_else(|| {
        ApiError::not_found(format!("volume type {} has no encryption spec", t.id))
    })?;
    let v = encryption_view(&row, false)?;
    let field = v
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no encryption field {key:?}")))?;
    Ok(one_entry(key, field))
}

#[utoipa::path(put, path = "/v3/{project_id}/types/{type_id}/encryption/{encryption_id}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("encryption_id" = String, Path, description = "encryption spec id")),
    request_body = EncryptionBody,
    responses((status = 200, description = "`{encryption}` with the changed fields"), (status = 400, description = "bad field or type in use"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type or spec")))]
pub async fn update_encryption(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, enc_id)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<EncryptionBody>,
) -> ApiResult<Json<Value>> {
    check_admin_project(&st, &ctx, &project_id).await?;
    let e = body.encryption;
    let mut changed = Map::new();
    if let Some(p) = &e.provider {
        check_provider(p)?;
        changed.insert("provider".into(), json!(p));
    }
    if let Some(c) = &e.cipher {
        check_cipher(c)?;
        changed.insert("cipher".into(), json!(c));
    }
    if let Some(k) = &e.key_size {
        changed.insert("key_size".into(), json!(parse_key_size(k)?));
    }
    if let Some(l) = &e.control_location {
        check_location(l)?;
        changed.insert("control_location".into(), json!(l));
    }
    if changed.is_empty() {
        return Err(ApiError::bad_request(
            "`encryption` must change at least one field",
        ));
    }
    let (mut tx, t) = begin_type(&st, &ctx, &type_id).await?;
    let row = load_encryption(&mut tx, &t.id)
        .await?
        .filter(|r| get_str(r, "encryption_id").is_ok_and(|v| v == enc_id))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "encryption spec {enc_id} not found on type {}",
                t.id
            ))
        })?;
    refuse_in_use(&mut tx, &t.id, "the encryption spec").await?;
    let cur = encryption_view(&row, false)?;
    let pick = |f: &str| {
        changed
            .get(f)
            .or_else(|| cur.get(f))
            .cloned()
            .unwrap_or(Value::Null)
    };
    sqlx::query(
        "UPDATE volume_type_encryption SET provider = ?, cipher = ?, key_size = ?, control_location = ?, updated_at = ? \
         WHERE type_id = ?",
    )
    .bind(pick("provider").as_str().unwrap_or_default().to_string())
    .bind(pick("cipher").as_str().unwrap_or_default().to_string())
    .bind(pick("key_size").as_i64().unwrap_or(512))
    .bind(pick("control_location").as_str().unwrap_or_default().to_string())
    .bind(now())
    .bind(t.id.clone())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(json!({ "encryption": changed })))
}

#[utoipa::path(delete, path = "/v3/{project_id}/types/{type_id}/encryption/{encryption_id}", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name"),
        ("encryption_id" = String, Path, description = "encryption spec id")),
    responses((status = 202, description = "deleted"), (status = 400, description = "type in use"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type or spec")))]
pub async fn delete_encryption(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id, enc_id)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let (mut tx, t) = change_type(&st, &ctx, &project_id, &type_id).await?;
    let n = crate::store::count(
        &mut tx,
        "SELECT COUNT(*) AS n FROM volume_type_encryption WHERE encryption_id = ?",
        &enc_id,
    )
    .await?;
    let mine = load_encryption(&mut tx, &t.id)
        .await?
        .is_some_and(|r| get_str(&r, "encryption_id").is_ok_and(|v| v == enc_id));
    if n == 0 || !mine {
        return Err(ApiError::not_found(format!(
            "encryption spec {enc_id} not found on type {}",
            t.id
        )));
    }
    refuse_in_use(&mut tx, &t.id, "the encryption spec").await?;
    sqlx::query("DELETE FROM volume_type_encryption WHERE type_id = ?")
        .bind(t.id.clone())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(StatusCode::ACCEPTED)
}

// ---- access ----

#[utoipa::path(get, path = "/v3/{project_id}/types/{type_id}/os-volume-type-access", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    responses((status = 200, description = "`{volume_type_access: [{volume_type_id, project_id}]}`"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type, or the type is public")))]
pub async fn list_access(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, t) = read_type(&st, &ctx, &project_id, &type_id).await?;
    ctx.require_admin()?;
    if t.is_public {
        return Err(ApiError::not_found(
            "access lists exist only for private volume types",
        ));
    }
    let rows = sqlx::query(
        "SELECT project_id FROM volume_type_access WHERE type_id = ? ORDER BY project_id",
    )
    .bind(t.id.clone())
    .fetch_all(&mut *conn)
    .await?;
    let list = rows
        .iter()
        .map(|r| Ok(json!({"volume_type_id": t.id, "project_id": get_str(r, "project_id")?})))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(json!({ "volume_type_access": list })))
}

#[utoipa::path(post, path = "/v3/{project_id}/types/{type_id}/action", tag = "types",
    params(("project_id" = String, Path, description = "project id"), ("type_id" = String, Path, description = "type id or name")),
    request_body = TypeActionBody,
    responses((status = 202, description = "done"), (status = 400, description = "bad body or public type"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such type, project or access"), (status = 409, description = "access exists already")))]
pub async fn type_action(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, type_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<TypeActionBody>,
) -> ApiResult<StatusCode> {
    check_admin_project(&st, &ctx, &project_id).await?;
    let (add, target) = match (body.add_project_access, body.remove_project_access) {
        (Some(a), None) => (true, a.project),
        (None, Some(r)) => (false, r.project),
        _ => {
            return Err(ApiError::bad_request(
                "the body must hold exactly one of addProjectAccess, removeProjectAccess",
            ))
        }
    };
    let (mut tx, t) = begin_type(&st, &ctx, &type_id).await?;
    if t.is_public {
        return Err(ApiError::bad_request(
            "type access does not apply to public volume types",
        ));
    }
    if add {
        ensure_project(&mut tx, &target).await?;
        if has_access(&mut tx, &t.id, &target).await? {
            return Err(ApiError::conflict(format!(
                "project {target} already has access to type {}",
                t.id
            )));
        }
        sqlx::query("INSERT INTO volume_type_access (type_id, project_id) VALUES (?, ?)")
            .bind(t.id.clone())
            .bind(target)
            .execute(&mut *tx)
            .await?;
    } else {
        let n = execute_args(
            &mut tx,
            "DELETE FROM volume_type_access WHERE type_id = ? AND project_id = ?",
            &[&t.id, &target],
        )
        .await?;
        if n == 0 {
            return Err(ApiError::not_found(format!(
                "project {target} has no access to type {}",
                t.id
            )));
        }
    }
    tx.commit().await?;
    Ok(StatusCode::ACCEPTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rule() {
        assert!(check_key("extra_specs", "qos:read_iops_sec").is_ok());
        assert!(check_key("extra_specs", "a-b_c.d").is_ok());
        assert!(check_key("extra_specs", "").is_err());
        assert!(check_key("extra_specs", "has space").is_err());
        assert!(check_key("extra_specs", &"k".repeat(256)).is_err());
        assert!(check_value("extra_specs", "k", &"v".repeat(256)).is_err());
        assert_eq!(parse_key_size(&json!("256")).unwrap(), 256);
        assert!(parse_key_size(&json!(128)).is_err());
    }
}
