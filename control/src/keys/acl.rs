//! Who may read a secret ([`access`]): its ACL (`/v1/secrets/{id}/acl`), and the
//! secret's user metadata (`/v1/secrets/{id}/metadata…`), Barbican-shaped.
//!
//! Barbican's users are Keystone users; Ember's callers are tokens, so an ACL's
//! `users` are **token ids** (the `creator_id` a secret shows is one too; a caller
//! reads its own with `GET /v3/auth/tokens`). The `read` ACL:
//!
//! - `users`: these tokens may read the secret's metadata and payload, also from
//!   another project (any role: the grant is to the token);
//! - `project-access` (default true): false makes the secret private to its creator,
//!   the project's admins and the listed users; the project's other tokens get 403.
//!
//! Only the `read` operation exists (Barbican's default); setting an ACL, metadata or
//! deleting needs a `member`/`admin` token of the owning project (others: 404 when
//! the secret is not theirs to see, 403 when they may see it). Tables:
//! `secret_acls` (project access), `secret_acl_users`, `secret_metadata`.

use super::secret_cols_sql;
use crate::api::{check_len, ApiJson};
use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{execute_args, get_i64, get_str, now};
use crate::versions::Origin;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Migration 8 (issue 14): ACLs and metadata of secrets.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS secret_acls (secret_id VARCHAR(64) NOT NULL PRIMARY KEY, \
     project_access BIGINT NOT NULL, created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS secret_acl_users (secret_id VARCHAR(64) NOT NULL, user_id VARCHAR(64) NOT NULL, \
     PRIMARY KEY (secret_id, user_id))",
    "CREATE TABLE IF NOT EXISTS secret_metadata (secret_id VARCHAR(64) NOT NULL, meta_key VARCHAR(255) NOT NULL, \
     value VARCHAR(255) NOT NULL, PRIMARY KEY (secret_id, meta_key))",
];

/// How a caller reaches a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A token of the owning project that the ACL lets in (`writer`: member or admin).
    Owner {
        /// May change it.
        writer: bool,
    },
    /// A token on the secret's read ACL, of another project.
    Reader,
}

impl Access {
    /// May read the payload?
    pub fn payload(self) -> bool {
        matches!(self, Access::Owner { writer: true } | Access::Reader)
    }

    /// 403 unless a writer of the owning project.
    pub fn require_writer(self, id: &str) -> ApiResult<()> {
        match self {
            Access::Owner { writer: true } => Ok(()),
            Access::Owner { writer: false } => Err(ApiError::forbidden(
                "the reader role cannot change anything",
            )),
            Access::Reader => Err(ApiError::forbidden(format!(
                "secret {id} belongs to another project: its ACL grants reading only"
            ))),
        }
    }
}

/// A secret's read ACL.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// Tokens allowed to read.
    pub users: Vec<String>,
    /// The owning project's tokens may read (false: creator, admins, users only).
    pub project_access: bool,
    /// When it was set (`None`: no ACL, the defaults).
    pub created: Option<(String, String)>,
}

/// The ACL of secret `id` (defaults when none was set).
pub async fn acl_of(conn: &mut AnyConnection, id: &str) -> Result<Acl, sqlx::Error> {
    let row = sqlx::query(
        "SELECT project_access, created_at, updated_at FROM secret_acls WHERE secret_id = ?",
    )
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    let users =
        sqlx::query("SELECT user_id FROM secret_acl_users WHERE secret_id = ? ORDER BY user_id")
            .bind(id.to_string())
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| get_str(r, "user_id"))
            .collect::<Result<Vec<_>, _>>()?;
    Ok(match row {
        None => Acl {
            users,
            project_access: true,
            created: None,
        },
        Some(r) => Acl {
            users,
            project_access: get_i64(&r, "project_access")? != 0,
            created: Some((get_str(&r, "created_at")?, get_str(&r, "updated_at")?)),
        },
    })
}

/// Secret `id` and how `ctx` reaches it: 404 when it may not (its existence stays
/// hidden), 403 when the owning project's ACL shuts this token out.
pub async fn access(st: &AppState, ctx: &Ctx, id: &str) -> ApiResult<(AnyRow, Access)> {
    let mut conn = st.db().pool.acquire().await?;
    let sql = format!("SELECT {} FROM secrets WHERE id = ?", secret_cols_sql());
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("secret {id} not found")))?;
    let acl = acl_of(&mut conn, id).await?;
    let listed = acl.users.contains(&ctx.token_id);
    if get_str(&row, "project_id")? == ctx.project_id {
        let creator = get_str(&row, "creator_id")? == ctx.token_id;
        if !acl.project_access && !creator && !listed && !ctx.is_admin() {
            return Err(ApiError::forbidden(format!(
                "secret {id} is private to its creator and the users of its ACL"
            )));
        }
        return Ok((
            row,
            Access::Owner {
                writer: ctx.require_writer().is_ok(),
            },
        ));
    }
    if listed {
        return Ok((row, Access::Reader));
    }
    Err(ApiError::not_found(format!("secret {id} not found")))
}

/// Secret `id` readable by `ctx` (404/403 as [`access`]); a connection to read its
/// parts with.
async fn read_conn(st: &AppState, ctx: &Ctx, id: &str) -> ApiResult<PoolConnection<Any>> {
    access(st, ctx, id).await?;
    Ok(st.db().pool.acquire().await?)
}

/// Secret `id` writable by `ctx`: 404/403 as [`access`], and 403 for readers and the
/// users of its ACL.
pub async fn check_writer(st: &AppState, ctx: &Ctx, id: &str) -> ApiResult<()> {
    let (_, a) = access(st, ctx, id).await?;
    a.require_writer(id)
}

/// Remove a secret's ACL and metadata (with the secret, in the caller's transaction).
pub async fn forget(conn: &mut AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    for sql in [
        "DELETE FROM secret_acls WHERE secret_id = ?",
        "DELETE FROM secret_acl_users WHERE secret_id = ?",
        "DELETE FROM secret_metadata WHERE secret_id = ?",
    ] {
        execute_args(conn, sql, &[id]).await?;
    }
    Ok(())
}

fn acl_view(a: &Acl) -> Value {
    let mut read = json!({"users": a.users, "project-access": a.project_access});
    if let Some((c, u)) = &a.created {
        read["created"] = json!(c);
        read["updated"] = json!(u);
    }
    json!({ "read": read })
}

/// `PUT`/`PATCH /v1/secrets/{id}/acl` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AclBody {
    /// The read ACL (the only operation).
    pub read: Option<AclRead>,
}

/// A read ACL.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AclRead {
    /// Token ids allowed to read.
    pub users: Option<Vec<String>>,
    /// The owning project's tokens may read (default true).
    #[serde(rename = "project-access")]
    pub project_access: Option<bool>,
}

/// The checks of an ACL body that need no database.
pub fn check_acl_body(b: &AclBody) -> ApiResult<()> {
    if let Some(users) = b.read.as_ref().and_then(|r| r.users.as_ref()) {
        if users.len() > 100 {
            return Err(ApiError::bad_request(
                "`read.users` holds at most 100 users",
            ));
        }
        for u in users {
            check_len("read.users", u, 1, 64)?;
        }
    }
    Ok(())
}

async fn write_acl(
    st: &AppState,
    ctx: &Ctx,
    id: &str,
    b: AclBody,
    replace: bool,
) -> ApiResult<Acl> {
    check_acl_body(&b)?;
    check_writer(st, ctx, id).await?;
    let b = &b;
    let acl = st.db().write("write acl", |mut tx| async move {
    let cur = acl_of(&mut tx, id).await?;
    let read = b.read.clone().unwrap_or(AclRead {
        users: None,
        project_access: None,
    });
    let project_access = match (read.project_access, replace) {
        (Some(p), _) => p,
        (None, true) => true,
        (None, false) => cur.project_access,
    };
    let users = match (read.users, replace) {
        (Some(u), _) => u,
        (None, true) => Vec::new(),
        (None, false) => cur.users,
    };
    let t = now();
    let created = cur.created.map(|(c, _)| c).unwrap_or_else(|| t.clone());
    forget_acl(&mut tx, id).await?;
    sqlx::query(
        "INSERT INTO secret_acls (secret_id, project_access, created_at, updated_at) VALUES (?, ?, ?, ?)",
    )
    .bind(id.to_string())
    .bind(i64::from(project_access))
    .bind(created)
    .bind(t)
    .execute(&mut *tx)
    .await?;
    let mut seen = std::collections::BTreeSet::new();
    for u in users.iter().filter(|u| seen.insert(u.as_str())) {
        execute_args(
            &mut tx,
            "INSERT INTO secret_acl_users (secret_id, user_id) VALUES (?, ?)",
            &[id, u],
        )
        .await?;
    }
    let acl = acl_of(&mut tx, id).await?;
    tx.commit().await?;
    ApiResult::Ok(acl)
    }).await?;
    Ok(acl)
}

async fn forget_acl(conn: &mut AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    execute_args(conn, "DELETE FROM secret_acls WHERE secret_id = ?", &[id]).await?;
    execute_args(
        conn,
        "DELETE FROM secret_acl_users WHERE secret_id = ?",
        &[id],
    )
    .await?;
    Ok(())
}

#[utoipa::path(get, path = "/v1/secrets/{secret_id}/acl", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "`{read: {users, project-access}}`"), (status = 401, description = "no token"),
        (status = 403, description = "private secret"), (status = 404, description = "no such secret")))]
pub async fn show_acl(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let mut conn = read_conn(&st, &ctx, &id).await?;
    Ok(Json(acl_view(&acl_of(&mut conn, &id).await?)))
}

#[utoipa::path(put, path = "/v1/secrets/{secret_id}/acl", tag = "keys", request_body = AclBody,
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "`{acl_ref}` (the ACL replaced)"), (status = 400, description = "bad body"),
        (status = 401, description = "no token"), (status = 403, description = "reader, ACL user, or private secret"),
        (status = 404, description = "no such secret")))]
pub async fn put_acl(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<AclBody>,
) -> ApiResult<Json<Value>> {
    write_acl(&st, &ctx, &id, b, true).await?;
    Ok(Json(
        json!({"acl_ref": origin.url(&format!("/v1/secrets/{id}/acl"))}),
    ))
}

#[utoipa::path(patch, path = "/v1/secrets/{secret_id}/acl", tag = "keys", request_body = AclBody,
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "`{acl_ref}` (the given fields changed)"), (status = 400, description = "bad body"),
        (status = 401, description = "no token"), (status = 403, description = "reader, ACL user, or private secret"),
        (status = 404, description = "no such secret")))]
pub async fn patch_acl(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<AclBody>,
) -> ApiResult<Json<Value>> {
    write_acl(&st, &ctx, &id, b, false).await?;
    Ok(Json(
        json!({"acl_ref": origin.url(&format!("/v1/secrets/{id}/acl"))}),
    ))
}

#[utoipa::path(delete, path = "/v1/secrets/{secret_id}/acl", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "back to the defaults (`{}`)"), (status = 401, description = "no token"),
        (status = 403, description = "reader, ACL user, or private secret"), (status = 404, description = "no such secret")))]
pub async fn delete_acl(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    check_writer(&st, &ctx, &id).await?;
    let id = &id;
    st.db()
        .write("delete acl", |mut tx| async move {
            forget_acl(&mut tx, id).await?;
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(Json(json!({})))
}

// ---- metadata ----

/// `PUT /v1/secrets/{id}/metadata` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretMetadataBody {
    /// All keys and values (replaces the old).
    pub metadata: BTreeMap<String, String>,
}

/// `POST /v1/secrets/{id}/metadata[/{key}]` and `PUT …/metadata/{key}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretMetaItem {
    /// The key (lowercase, as Barbican stores them).
    pub key: String,
    /// Its value.
    pub value: String,
}

/// Barbican's metadata key rule: 1..255 characters, stored lowercase.
fn check_meta(key: &str, value: &str) -> ApiResult<String> {
    check_len("metadata key", key, 1, 255)?;
    check_len(&format!("metadata.{key}"), value, 0, 255)?;
    if key.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError::bad_request(format!(
            "metadata key {key:?} must not contain '/' or control characters"
        )));
    }
    Ok(key.to_lowercase())
}

/// The checks of a metadata body that need no database.
pub fn check_metadata_body(b: &SecretMetadataBody) -> ApiResult<()> {
    if b.metadata.len() > 100 {
        return Err(ApiError::bad_request("`metadata` holds at most 100 keys"));
    }
    for (k, v) in &b.metadata {
        check_meta(k, v)?;
    }
    Ok(())
}

async fn metadata_of(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<BTreeMap<String, String>, sqlx::Error> {
    sqlx::query("SELECT meta_key, value FROM secret_metadata WHERE secret_id = ?")
        .bind(id.to_string())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| Ok((get_str(r, "meta_key")?, get_str(r, "value")?)))
        .collect()
}

async fn set_meta(conn: &mut AnyConnection, id: &str, k: &str, v: &str) -> ApiResult<()> {
    execute_args(
        conn,
        "DELETE FROM secret_metadata WHERE secret_id = ? AND meta_key = ?",
        &[id, k],
    )
    .await?;
    execute_args(
        conn,
        "INSERT INTO secret_metadata (secret_id, meta_key, value) VALUES (?, ?, ?)",
        &[id, k, v],
    )
    .await?;
    Ok(())
}

#[utoipa::path(get, path = "/v1/secrets/{secret_id}/metadata", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "`{metadata}`"), (status = 401, description = "no token"),
        (status = 403, description = "private secret"), (status = 404, description = "no such secret")))]
pub async fn show_secret_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let mut conn = read_conn(&st, &ctx, &id).await?;
    Ok(Json(
        json!({"metadata": metadata_of(&mut conn, &id).await?}),
    ))
}

#[utoipa::path(put, path = "/v1/secrets/{secret_id}/metadata", tag = "keys", request_body = SecretMetadataBody,
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 201, description = "`{metadata_ref}` (replaced)"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or ACL user"),
        (status = 404, description = "no such secret")))]
pub async fn put_secret_metadata(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<SecretMetadataBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_metadata_body(&b)?;
    check_writer(&st, &ctx, &id).await?;
    let (b, id) = (&b, &id);
    st.db()
        .write("put secret metadata", |mut tx| async move {
            execute_args(
                &mut tx,
                "DELETE FROM secret_metadata WHERE secret_id = ?",
                &[id],
            )
            .await?;
            for (k, v) in &b.metadata {
                let k = check_meta(k, v)?;
                set_meta(&mut tx, id, &k, v).await?;
            }
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"metadata_ref": origin.url(&format!("/v1/secrets/{id}/metadata"))})),
    ))
}

async fn add_item(
    st: &AppState,
    ctx: &Ctx,
    id: &str,
    url_key: Option<&str>,
    b: SecretMetaItem,
    create_only: bool,
) -> ApiResult<Value> {
    let k = check_meta(&b.key, &b.value)?;
    if url_key.is_some_and(|u| u.to_lowercase() != k) {
        return Err(ApiError::bad_request("`key` must be the key of the URL"));
    }
    check_writer(st, ctx, id).await?;
    let (b, k) = (&b, &k);
    st.db()
        .write("add item", |mut tx| async move {
            let exists = metadata_of(&mut tx, id).await?.contains_key(k);
            if create_only && exists {
                return Err(ApiError::conflict(format!(
                    "secret {id} already has metadata key {k:?}"
                )));
            }
            set_meta(&mut tx, id, k, &b.value).await?;
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(json!({"key": k, "value": b.value}))
}

#[utoipa::path(post, path = "/v1/secrets/{secret_id}/metadata", tag = "keys", request_body = SecretMetaItem,
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 201, description = "`{key, value}` added"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or ACL user"),
        (status = 404, description = "no such secret"), (status = 409, description = "the key exists")))]
pub async fn add_secret_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<SecretMetaItem>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let v = add_item(&st, &ctx, &id, None, b, true).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/v1/secrets/{secret_id}/metadata/{key}", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id"), ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{key, value}`"), (status = 401, description = "no token"),
        (status = 403, description = "private secret"), (status = 404, description = "no such secret or key")))]
pub async fn show_secret_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let mut conn = read_conn(&st, &ctx, &id).await?;
    let k = key.to_lowercase();
    let m = metadata_of(&mut conn, &id).await?;
    let v = m
        .get(&k)
        .ok_or_else(|| ApiError::not_found(format!("secret {id} has no metadata key {k:?}")))?;
    Ok(Json(json!({"key": k, "value": v})))
}

#[utoipa::path(post, path = "/v1/secrets/{secret_id}/metadata/{key}", tag = "keys", request_body = SecretMetaItem,
    params(("secret_id" = String, Path, description = "secret id"), ("key" = String, Path, description = "metadata key")),
    responses((status = 201, description = "`{key, value}` set (barbicanclient's way of adding one)"),
        (status = 400, description = "bad key or value"), (status = 401, description = "no token"),
        (status = 403, description = "reader or ACL user"), (status = 404, description = "no such secret")))]
pub async fn post_secret_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((id, key)): Path<(String, String)>,
    ApiJson(b): ApiJson<SecretMetaItem>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let v = add_item(&st, &ctx, &id, Some(&key), b, false).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(put, path = "/v1/secrets/{secret_id}/metadata/{key}", tag = "keys", request_body = SecretMetaItem,
    params(("secret_id" = String, Path, description = "secret id"), ("key" = String, Path, description = "metadata key")),
    responses((status = 200, description = "`{key, value}` set"), (status = 400, description = "bad key or value"),
        (status = 401, description = "no token"), (status = 403, description = "reader or ACL user"),
        (status = 404, description = "no such secret")))]
pub async fn put_secret_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((id, key)): Path<(String, String)>,
    ApiJson(b): ApiJson<SecretMetaItem>,
) -> ApiResult<Json<Value>> {
    Ok(Json(add_item(&st, &ctx, &id, Some(&key), b, false).await?))
}

#[utoipa::path(delete, path = "/v1/secrets/{secret_id}/metadata/{key}", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id"), ("key" = String, Path, description = "metadata key")),
    responses((status = 204, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "reader or ACL user"), (status = 404, description = "no such secret or key")))]
pub async fn delete_secret_meta(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    check_writer(&st, &ctx, &id).await?;
    let mut conn = st.db().pool.acquire().await?;
    let n = execute_args(
        &mut conn,
        "DELETE FROM secret_metadata WHERE secret_id = ? AND meta_key = ?",
        &[&id, &key.to_lowercase()],
    )
    .await?;
    if n == 0 {
        return Err(ApiError::not_found(format!(
            "secret {id} has no metadata key {key:?}"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        let b: AclBody =
            serde_json::from_value(json!({"read": {"users": ["t1"], "project-access": false}}))
                .unwrap();
        assert!(check_acl_body(&b).is_ok());
        let b: AclBody = serde_json::from_value(json!({"read": {"users": [""]}})).unwrap();
        assert!(check_acl_body(&b).is_err());
        assert!(serde_json::from_value::<AclBody>(json!({"write": {}})).is_err());
        assert_eq!(check_meta("Color", "red").unwrap(), "color");
        assert!(check_meta("a/b", "x").is_err());
    }
}
