//! Key manager, Barbican-shaped: `/v1/secrets` and `/v1/orders`.
//!
//! Secrets belong to the project that created them. Metadata is readable by any role of
//! that project; the payload only by its `member`/`admin` tokens; other projects get
//! 404 (existence stays hidden). Payloads are sealed at rest with AES-256-GCM under the
//! master key (`DATA/master.key`, 0600, or `--master-key-file`); the secret id is the
//! associated data, so a sealed payload cannot be moved to another row. The database
//! alone never reveals a key, and a `settings` row lets start-up detect a wrong master
//! key before anything is written with it.
//!
//! Orders (`type: key`) generate a symmetric key from the OS RNG at once; the order is
//! `ACTIVE` when the 202 returns. Deleting a secret that a volume or a snapshot uses is
//! refused (409).
//!
//! [`passphrase_for`] is Cinder's rule turning a secret into a LUKS passphrase.
//!
//! The volumes module keeps its keys here and reaches them only through this module:
//! [`check_volume_key`] (a caller's key against the type), [`order_volume_key`] (a new
//! key a volume owns), [`copy_secret`] (a snapshot's copy of its volume's key),
//! [`volume_passphrase`] and [`delete_owned`]; and an NBD attachment's pre-shared key
//! sealed in its own row ([`seal_attachment_psk`], [`open_attachment_psk`]: the same
//! master key and AES-256-GCM, `nbd-psk:<attachment id>` as associated data, so a
//! sealed key opens only in the row it was made for and never as a secret).
//!
//! [`acl`]: who reads a secret (its read ACL, by token id) and its user metadata.
//! Lists page with `limit`/`offset` and answer `total`, `next` and `previous` links.
//! Ember stores `symmetric`, `passphrase` and `opaque` secrets; `public`, `private`
//! and `certificate` are refused (400), and so are containers: Ember needs none (a
//! volume's key is one symmetric secret).

pub mod acl;

use crate::api::{check_len, ApiJson};
use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{fetch_optional_args, get_str, new_id, now, opt_str};
use crate::versions::Origin;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use ember_crypto::volume::SecretKind;
use ember_crypto::Zeroizing;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

/// Largest secret payload (decoded bytes), as Barbican's default.
pub const MAX_PAYLOAD: usize = 10_000;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub use crate::seal::{check_master_key, MasterKey};

/// Cinder's passphrase rule, from `ember_crypto`: a `symmetric` (or `opaque`, as
/// os-brick does) secret's bytes are hex-encoded (lowercase) and that text is the LUKS
/// passphrase; a `passphrase` secret is used as-is.
pub fn passphrase_for(secret_type: &str, bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let kind = if secret_type == "passphrase" {
        SecretKind::Passphrase
    } else {
        SecretKind::Symmetric
    };
    ember_crypto::volume::passphrase_for(kind, bytes)
}

/// Secret types Ember stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SecretType {
    Symmetric,
    Passphrase,
    Opaque,
}

impl SecretType {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretType::Symmetric => "symmetric",
            SecretType::Passphrase => "passphrase",
            SecretType::Opaque => "opaque",
        }
    }
}

/// `POST /v1/secrets` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretCreate {
    pub name: Option<String>,
    /// Default `opaque`.
    pub secret_type: Option<SecretType>,
    pub algorithm: Option<String>,
    pub bit_length: Option<u32>,
    pub mode: Option<String>,
    /// Base64 (`application/octet-stream`) or text (`text/plain`).
    pub payload: String,
    /// `application/octet-stream` or `text/plain`.
    pub payload_content_type: String,
    /// `base64`, only with `application/octet-stream`.
    pub payload_content_encoding: Option<String>,
    /// ISO-8601 UTC, in the future.
    pub expiration: Option<String>,
}

/// `POST /v1/orders` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCreate {
    /// Only `key`.
    #[serde(rename = "type")]
    pub order_type: String,
    pub meta: OrderMeta,
}

/// Attributes of the secret an order generates.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderMeta {
    pub name: Option<String>,
    pub algorithm: String,
    pub bit_length: u32,
    pub mode: Option<String>,
    pub payload_content_type: Option<String>,
    pub expiration: Option<String>,
}

/// List query.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// 1..100, default 10.
    pub limit: Option<u32>,
    pub offset: Option<u32>,
    pub name: Option<String>,
    pub secret_type: Option<String>,
}

/// A page of a listing: rows to skip, rows to show.
#[derive(Debug, Clone, Copy)]
struct Page {
    offset: usize,
    limit: usize,
}

impl ListQuery {
    /// The page asked for; 400 unless `limit` is 1..100.
    fn page(&self) -> ApiResult<Page> {
        let limit = self.limit.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::bad_request("`limit` must be between 1 and 100"));
        }
        Ok(Page {
            offset: usize::try_from(self.offset.unwrap_or(0)).unwrap_or(usize::MAX),
            limit: limit as usize,
        })
    }
}

/// The views of one page of rows.
fn page_of(
    rows: &[AnyRow],
    page: Page,
    view: impl Fn(&AnyRow) -> Result<Value, sqlx::Error>,
) -> Result<Vec<Value>, sqlx::Error> {
    rows.iter()
        .skip(page.offset)
        .take(page.limit)
        .map(view)
        .collect()
}

fn normalize_content_type(ct: &str) -> Option<&'static str> {
    let c: String = ct
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    match c.as_str() {
        "application/octet-stream" => Some("application/octet-stream"),
        "text/plain" | "text/plain;charset=utf-8" => Some("text/plain"),
        _ => None,
    }
}

fn parse_expiration(field: &str, v: &Option<String>) -> ApiResult<Option<String>> {
    let Some(s) = v else { return Ok(None) };
    let mut t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339);
    if t.is_err() {
        // Barbican examples omit the zone: treat as UTC.
        t = time::OffsetDateTime::parse(
            &format!("{s}Z"),
            &time::format_description::well_known::Rfc3339,
        );
    }
    let t = t.map_err(|_| {
        ApiError::bad_request(format!("`{field}` must be an ISO-8601 UTC timestamp"))
    })?;
    if t <= time::OffsetDateTime::now_utc() {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be in the future"
        )));
    }
    Ok(Some(crate::store::fmt_time(t)))
}

fn is_expired(expiration: &Option<String>) -> bool {
    expiration
        .as_deref()
        .and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
        .is_some_and(|t| t <= time::OffsetDateTime::now_utc())
}

const SECRET_COLS: &str =
    "id, project_id, creator_id, name, secret_type, algorithm, bit_length, mode, content_type, \
                           expiration, status, created_at, updated_at";

/// The secret columns [`acl::access`] loads.
pub fn secret_cols_sql() -> &'static str {
    SECRET_COLS
}

/// `total`, `next` and `previous` of a page of `path` (`total` rows).
fn page_links(o: &mut Value, origin: &Origin, path: &str, page: Page, total: usize) {
    o["total"] = json!(total);
    let link = |offset: usize| origin.url(&format!("{path}?limit={}&offset={offset}", page.limit));
    if page.offset.saturating_add(page.limit) < total {
        o["next"] = json!(link(page.offset + page.limit));
    }
    if page.offset > 0 {
        o["previous"] = json!(link(page.offset.saturating_sub(page.limit)));
    }
}

fn secret_view(base: &str, r: &AnyRow) -> Result<Value, sqlx::Error> {
    let name = get_str(r, "name")?;
    Ok(json!({
        "secret_ref": format!("{base}/v1/secrets/{}", get_str(r, "id")?),
        "name": if name.is_empty() { Value::Null } else { Value::String(name) },
        "secret_type": get_str(r, "secret_type")?,
        "algorithm": opt_str(r, "algorithm")?,
        "bit_length": r.try_get::<Option<i64>, _>("bit_length")?,
        "mode": opt_str(r, "mode")?,
        "status": get_str(r, "status")?,
        "expiration": opt_str(r, "expiration")?,
        "content_types": {"default": get_str(r, "content_type")?},
        "creator_id": get_str(r, "creator_id")?,
        "created": get_str(r, "created_at")?,
        "updated": get_str(r, "updated_at")?,
        "consumers": [],
    }))
}

/// Validated secret attributes ready to store.
struct NewSecret {
    name: String,
    secret_type: SecretType,
    algorithm: Option<String>,
    bit_length: Option<i64>,
    mode: Option<String>,
    content_type: &'static str,
    expiration: Option<String>,
    payload: Zeroizing<Vec<u8>>,
}

/// The checks of a `POST /v1/secrets` body that need no database (fuzz targets and
/// property tests call this).
pub fn check_secret_body(b: SecretCreate) -> ApiResult<()> {
    validate_secret(b).map(drop)
}

fn validate_secret(b: SecretCreate) -> ApiResult<NewSecret> {
    let name = b.name.unwrap_or_default();
    check_len("name", &name, 0, 255)?;
    for (f, v) in [("algorithm", &b.algorithm), ("mode", &b.mode)] {
        if let Some(v) = v {
            check_len(f, v, 0, 255)?;
        }
    }
    let secret_type = b.secret_type.unwrap_or(SecretType::Opaque);
    let content_type = normalize_content_type(&b.payload_content_type).ok_or_else(|| {
        ApiError::bad_request(
            "`payload_content_type` must be application/octet-stream or text/plain",
        )
    })?;
    if b.payload.len() > MAX_PAYLOAD * 2 {
        return Err(ApiError::too_large(format!(
            "`payload` is larger than {MAX_PAYLOAD} bytes"
        )));
    }
    let payload = match content_type {
        "application/octet-stream" => {
            match b.payload_content_encoding.as_deref() {
                Some("base64") => {}
                _ => return Err(ApiError::bad_request(
                    "`payload_content_encoding` must be \"base64\" with application/octet-stream",
                )),
            }
            Zeroizing::new(
                B64.decode(b.payload.trim())
                    .map_err(|_| ApiError::bad_request("`payload` is not valid base64"))?,
            )
        }
        _ => {
            if b.payload_content_encoding.is_some() {
                return Err(ApiError::bad_request(
                    "`payload_content_encoding` is not allowed with text/plain",
                ));
            }
            Zeroizing::new(b.payload.into_bytes())
        }
    };
    if payload.is_empty() {
        return Err(ApiError::bad_request("`payload` must not be empty"));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(ApiError::too_large(format!(
            "`payload` is larger than {MAX_PAYLOAD} bytes"
        )));
    }
    let mut bit_length = b.bit_length.map(i64::from);
    if bit_length == Some(0) {
        return Err(ApiError::bad_request("`bit_length` must be at least 1"));
    }
    if secret_type == SecretType::Symmetric {
        if content_type != "application/octet-stream" {
            return Err(ApiError::bad_request(
                "`payload_content_type` must be application/octet-stream for symmetric secrets",
            ));
        }
        let actual = payload.len() as i64 * 8;
        match bit_length {
            Some(bl) if bl != actual => {
                return Err(ApiError::bad_request(format!(
                    "`bit_length` is {bl} but the payload holds {actual} bits"
                )))
            }
            _ => bit_length = Some(actual),
        }
    }
    Ok(NewSecret {
        name,
        secret_type,
        algorithm: b.algorithm,
        bit_length,
        mode: b.mode,
        content_type,
        expiration: parse_expiration("expiration", &b.expiration)?,
        payload,
    })
}

/// Store a secret of `project_id`, sealed; returns its id.
async fn insert_secret(
    conn: &mut sqlx::AnyConnection,
    master: &MasterKey,
    project_id: &str,
    creator_id: &str,
    s: &NewSecret,
) -> ApiResult<String> {
    let id = new_id();
    let sealed = master.seal(&id, &s.payload)?;
    let t = now();
    sqlx::query(
        "INSERT INTO secrets (id, project_id, creator_id, name, secret_type, algorithm, bit_length, mode, \
         content_type, expiration, status, sealed, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ACTIVE', ?, ?, ?)",
    )
    .bind(id.clone())
    .bind(project_id.to_string())
    .bind(creator_id.to_string())
    .bind(s.name.clone())
    .bind(s.secret_type.as_str())
    .bind(s.algorithm.clone())
    .bind(s.bit_length)
    .bind(s.mode.clone())
    .bind(s.content_type)
    .bind(s.expiration.clone())
    .bind(sealed)
    .bind(t.clone())
    .bind(t)
    .execute(conn)
    .await?;
    Ok(id)
}

/// A row of the caller's project by id: `sql` selects `WHERE id = ? AND project_id = ?`;
/// 404 naming `what` when there is none.
async fn fetch_own(
    st: &AppState,
    ctx: &Ctx,
    sql: String,
    what: &str,
    id: &str,
) -> ApiResult<AnyRow> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .bind(ctx.project_id.clone())
        .fetch_optional(&st.db().pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{what} {id} not found")))
}

#[utoipa::path(post, path = "/v1/secrets", tag = "keys", request_body = SecretCreate,
    responses((status = 201, description = "`{\"secret_ref\": url}`"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "reader"),
        (status = 413, description = "payload too large")))]
pub async fn create_secret(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    ApiJson(body): ApiJson<SecretCreate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_writer()?;
    let s = validate_secret(body)?;
    let (ctx, s, st) = (&ctx, &s, &st);
    let id = st
        .db()
        .write("create secret", |mut tx| async move {
            let id = insert_secret(&mut tx, st.master(), &ctx.project_id, &ctx.token_id, s).await?;
            tx.commit().await?;
            ApiResult::Ok(id)
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"secret_ref": origin.url(&format!("/v1/secrets/{id}"))})),
    ))
}

#[utoipa::path(get, path = "/v1/secrets", tag = "keys", params(ListQuery),
    responses((status = 200, description = "`{secrets, total}` of the caller's project"),
        (status = 400, description = "bad query"), (status = 401, description = "no token")))]
pub async fn list_secrets(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let page = q.page()?;
    let sql = format!(
        "SELECT {SECRET_COLS} FROM secrets WHERE project_id = ? AND (? = '' OR name = ?) AND (? = '' OR secret_type = ?) \
         ORDER BY created_at, id"
    );
    let name = q.name.unwrap_or_default();
    let stype = q.secret_type.unwrap_or_default();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ctx.project_id.clone())
        .bind(name.clone())
        .bind(name)
        .bind(stype.clone())
        .bind(stype)
        .fetch_all(&st.db().pool)
        .await?;
    let base = origin.base.clone();
    let list = page_of(&rows, page, |r| secret_view(&base, r))?;
    let mut o = json!({ "secrets": list });
    page_links(&mut o, &origin, "/v1/secrets", page, rows.len());
    Ok(Json(o))
}

#[utoipa::path(get, path = "/v1/secrets/{secret_id}", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "secret metadata"), (status = 401, description = "no token"),
        (status = 403, description = "private to its creator and ACL users"),
        (status = 404, description = "no such secret for the caller (its project's, or its ACL's)")))]
pub async fn show_secret(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let (row, _) = acl::access(&st, &ctx, &id).await?;
    Ok(Json(secret_view(&origin.base, &row)?))
}

#[utoipa::path(get, path = "/v1/secrets/{secret_id}/payload", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 200, description = "the raw payload"), (status = 401, description = "no token"),
        (status = 403, description = "reader, or private to its creator and ACL users"),
        (status = 404, description = "no such secret for the caller, or expired"),
        (status = 406, description = "Accept does not match the payload's content type")))]
pub async fn secret_payload(
    State(st): State<AppState>,
    ctx: Ctx,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (row, a) = acl::access(&st, &ctx, &id).await?;
    if !a.payload() {
        return Err(ApiError::forbidden("the reader role cannot read payloads"));
    }
    let (ct, bytes) = open_row(&st, &id).await?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*/*");
    let ct = payload_type(accept, &ct, &bytes).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!("this secret's payload is {ct} (not valid UTF-8 text)"),
        )
    })?;
    if is_expired(&opt_str(&row, "expiration")?) {
        return Err(ApiError::not_found(format!("secret {id} has expired")));
    }
    let mut resp = bytes.to_vec().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&ct).map_err(|_| ApiError::internal("content type"))?,
    );
    Ok(resp)
}

/// The content type to answer a payload with for `accept`: the stored one when
/// accepted; bytes of a text secret as `application/octet-stream`; bytes stored as
/// `application/octet-stream` as `text/plain` when they are UTF-8 text (the `openstack`
/// CLI stores a passphrase base64-encoded and reads it back as text). `None`: 406.
fn payload_type(accept: &str, stored: &str, bytes: &[u8]) -> Option<String> {
    let wants = |t: &str| {
        let (family, _) = t.split_once('/').unwrap_or((t, ""));
        accept.contains("*/*") || accept.contains(t) || accept.contains(&format!("{family}/*"))
    };
    if wants(stored) {
        return Some(stored.to_string());
    }
    if wants("application/octet-stream") {
        return Some("application/octet-stream".to_string());
    }
    if wants("text/plain") && std::str::from_utf8(bytes).is_ok() {
        return Some("text/plain".to_string());
    }
    None
}

async fn open_row(st: &AppState, id: &str) -> ApiResult<(String, Zeroizing<Vec<u8>>)> {
    let sql = "SELECT content_type, sealed FROM secrets WHERE id = ?";
    let row = fetch_optional_args(&mut *st.db().pool.acquire().await?, sql, &[id])
        .await?
        .ok_or_else(|| ApiError::not_found(format!("secret {id} not found")))?;
    let bytes = st.master().open(id, &get_str(&row, "sealed")?)?;
    Ok((get_str(&row, "content_type")?, bytes))
}

/// The LUKS passphrase a secret yields for a volume of `project_id` (volumes issue).
/// 404 if the secret is not the project's, 400 if it expired or has the wrong type.
pub async fn unlock_passphrase(
    st: &AppState,
    project_id: &str,
    secret_id: &str,
) -> ApiResult<Zeroizing<Vec<u8>>> {
    let sql = "SELECT secret_type, expiration FROM secrets WHERE id = ? AND project_id = ?";
    let row = fetch_optional_args(
        &mut *st.db().pool.acquire().await?,
        sql,
        &[secret_id, project_id],
    )
    .await?
    .ok_or_else(|| ApiError::not_found(format!("secret {secret_id} not found")))?;
    if is_expired(&opt_str(&row, "expiration")?) {
        return Err(ApiError::bad_request(format!(
            "secret {secret_id} has expired"
        )));
    }
    let stype = get_str(&row, "secret_type")?;
    let (_, bytes) = open_row(st, secret_id).await?;
    Ok(passphrase_for(&stype, &bytes))
}

/// What an encrypted volume type asks of a key (from its encryption spec).
#[derive(Debug, Clone, Copy)]
pub struct KeyFit<'a> {
    /// `aes` of `aes-xts-plain64`.
    pub algorithm: &'a str,
    /// The type's `key_size`.
    pub bit_length: i64,
    /// `xts` of `aes-xts-plain64`.
    pub mode: &'a str,
}

/// A secret's attributes and sealed payload.
struct SecretRow {
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

async fn secret_row(
    conn: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<Option<SecretRow>, sqlx::Error> {
    let r = fetch_optional_args(conn, "SELECT * FROM secrets WHERE id = ?", &[id]).await?;
    r.map(|r| {
        Ok(SecretRow {
            project_id: get_str(&r, "project_id")?,
            secret_type: get_str(&r, "secret_type")?,
            algorithm: opt_str(&r, "algorithm")?,
            bit_length: r.try_get::<Option<i64>, _>("bit_length")?,
            mode: opt_str(&r, "mode")?,
            expiration: opt_str(&r, "expiration")?,
            status: get_str(&r, "status")?,
            content_type: get_str(&r, "content_type")?,
            sealed: get_str(&r, "sealed")?,
        })
    })
    .transpose()
}

/// A secret Ember stores for a volume: it must exist, or something lost it.
async fn volume_secret(conn: &mut sqlx::AnyConnection, id: &str) -> ApiResult<SecretRow> {
    secret_row(conn, id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("encryption key {id} vanished")))
}

/// Check a caller-supplied `encryption_key_id` for a volume of `project_id` against
/// what its type asks: 400 naming the field that does not fit. Only `passphrase`
/// secrets are exempt from the algorithm/bit length/mode match (their text is the
/// passphrase); `symmetric` and `opaque` ones must fit the cipher.
pub async fn check_volume_key(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    project_id: &str,
    fit: KeyFit<'_>,
) -> ApiResult<()> {
    let bad = |m: String| {
        Err(ApiError::bad_request(format!(
            "encryption_key_id {id}: {m}"
        )))
    };
    let k = match secret_row(conn, id).await? {
        // Someone else's secret: do not reveal that it exists.
        Some(k) if k.project_id == project_id => k,
        _ => return bad("no such secret in this project".into()),
    };
    if k.status != "ACTIVE" || is_expired(&k.expiration) {
        return bad("the secret is not active (expired or not ready)".into());
    }
    match k.secret_type.as_str() {
        "passphrase" => return Ok(()),
        "symmetric" | "opaque" => {}
        other => {
            return bad(format!(
                "secret_type is {other:?}; use a symmetric, opaque or passphrase secret"
            ))
        }
    }
    let alg = k.algorithm.unwrap_or_default();
    if !alg.eq_ignore_ascii_case(fit.algorithm) {
        return bad(format!(
            "algorithm is {alg:?}, the volume type needs {:?}",
            fit.algorithm
        ));
    }
    if k.bit_length != Some(fit.bit_length) {
        return bad(format!(
            "bit_length is {}, the volume type's key_size is {}",
            k.bit_length.map_or("unset".to_string(), |b| b.to_string()),
            fit.bit_length
        ));
    }
    if let Some(m) = k.mode.as_deref().filter(|m| !m.is_empty()) {
        if !m.eq_ignore_ascii_case(fit.mode) {
            return bad(format!(
                "mode is {m:?}, the volume type's cipher needs {:?}",
                fit.mode
            ));
        }
    }
    Ok(())
}

/// Generate a symmetric key of `fit` for volume `volume_id` of `project_id` and store
/// it (the volume owns it: it is deleted with the volume); returns its id.
pub async fn order_volume_key(
    conn: &mut sqlx::AnyConnection,
    master: &MasterKey,
    project_id: &str,
    fit: KeyFit<'_>,
    volume_id: &str,
) -> ApiResult<String> {
    let bytes = usize::try_from(fit.bit_length / 8)
        .unwrap_or(64)
        .clamp(16, 64);
    let mut key = Zeroizing::new(vec![0u8; bytes]);
    getrandom::fill(&mut key)
        .map_err(|e| ApiError::internal(format!("OS random generator failed: {e}")))?;
    let s = NewSecret {
        name: format!("volume-{volume_id}"),
        secret_type: SecretType::Symmetric,
        algorithm: Some(fit.algorithm.to_string()),
        bit_length: Some(fit.bit_length),
        mode: None,
        content_type: "application/octet-stream",
        expiration: None,
        payload: key,
    };
    insert_secret(conn, master, project_id, EMBER_CREATOR, &s).await
}

/// Creator id of the secrets Ember makes for volumes and snapshots.
const EMBER_CREATOR: &str = "ember";

/// Store a copy of secret `src` for `project_id` under `name` (a snapshot keeps its
/// volume's key even after the volume is gone); returns the copy's id.
pub async fn copy_secret(
    conn: &mut sqlx::AnyConnection,
    master: &MasterKey,
    src: &str,
    project_id: &str,
    name: &str,
) -> ApiResult<String> {
    let k = volume_secret(conn, src).await?;
    let s = NewSecret {
        name: name.to_string(),
        secret_type: match k.secret_type.as_str() {
            "passphrase" => SecretType::Passphrase,
            "opaque" => SecretType::Opaque,
            _ => SecretType::Symmetric,
        },
        algorithm: k.algorithm,
        bit_length: k.bit_length,
        mode: k.mode,
        content_type: normalize_content_type(&k.content_type).unwrap_or("application/octet-stream"),
        expiration: None,
        payload: master.open(src, &k.sealed)?,
    };
    insert_secret(conn, master, project_id, EMBER_CREATOR, &s).await
}

/// The LUKS passphrase secret `id` yields for a volume (Cinder's rule, [`passphrase_for`]).
pub async fn volume_passphrase(
    conn: &mut sqlx::AnyConnection,
    master: &MasterKey,
    id: &str,
) -> ApiResult<Zeroizing<Vec<u8>>> {
    let k = volume_secret(conn, id).await?;
    let payload = master.open(id, &k.sealed)?;
    Ok(passphrase_for(&k.secret_type, &payload))
}

/// The payload of secret `id` as stored (any project's: for secrets the operator's
/// configuration names by id, such as a LUN pool's CHAP secret); `None` when there is
/// no such secret.
pub async fn payload_of(
    conn: &mut sqlx::AnyConnection,
    master: &MasterKey,
    id: &str,
) -> ApiResult<Option<Zeroizing<Vec<u8>>>> {
    match secret_row(conn, id).await? {
        Some(k) => Ok(Some(master.open(id, &k.sealed)?)),
        None => Ok(None),
    }
}

/// Associated data of an attachment's sealed PSK (never a secret id: those are bare UUIDs).
fn attachment_psk_aad(attachment_id: &str) -> String {
    format!("nbd-psk:{attachment_id}")
}

/// Seal an NBD attachment's pre-shared key for its attachment row.
pub fn seal_attachment_psk(
    master: &MasterKey,
    attachment_id: &str,
    psk: &[u8],
) -> ApiResult<String> {
    master.seal(&attachment_psk_aad(attachment_id), psk)
}

/// Open what [`seal_attachment_psk`] sealed for `attachment_id`.
pub fn open_attachment_psk(
    master: &MasterKey,
    attachment_id: &str,
    sealed: &str,
) -> ApiResult<Zeroizing<Vec<u8>>> {
    master.open(&attachment_psk_aad(attachment_id), sealed)
}

/// Delete a secret a volume or snapshot owned (with it, in the caller's transaction).
pub async fn delete_owned(conn: &mut sqlx::AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    acl::forget(conn, id).await?;
    sqlx::query("DELETE FROM secrets WHERE id = ?")
        .bind(id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

#[utoipa::path(delete, path = "/v1/secrets/{secret_id}", tag = "keys",
    params(("secret_id" = String, Path, description = "secret id")),
    responses((status = 204, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "reader"), (status = 404, description = "no such secret"),
        (status = 409, description = "a volume or snapshot uses this secret")))]
pub async fn delete_secret(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    acl::check_writer(&st, &ctx, &id).await?;
    let (ctx, id) = (&ctx, &id);
    st.db()
        .write("delete secret", |mut tx| async move {
            // Volumes and snapshots both keep their key here: either one makes it in use.
            let users = crate::volumes::count_by_secret(&mut tx, id).await?;
            if users > 0 {
                return Err(ApiError::conflict(format!(
                    "secret {id} is used by {users} volume(s) or snapshot(s)"
                )));
            }
            acl::forget(&mut tx, id).await?;
            sqlx::query("DELETE FROM secrets WHERE id = ? AND project_id = ?")
                .bind(id)
                .bind(ctx.project_id.clone())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            ApiResult::Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn order_view(base: &str, r: &AnyRow) -> Result<Value, sqlx::Error> {
    let meta: Value = serde_json::from_str(&get_str(r, "meta")?).unwrap_or(Value::Null);
    Ok(json!({
        "order_ref": format!("{base}/v1/orders/{}", get_str(r, "id")?),
        "type": get_str(r, "order_type")?,
        "status": get_str(r, "status")?,
        "secret_ref": opt_str(r, "secret_id")?.map(|s| format!("{base}/v1/secrets/{s}")),
        "meta": meta,
        "error_reason": opt_str(r, "error_reason")?,
        "creator_id": get_str(r, "creator_id")?,
        "created": get_str(r, "created_at")?,
        "updated": get_str(r, "updated_at")?,
        "sub_status": "Unknown",
        "sub_status_message": "",
    }))
}

const ORDER_COLS: &str =
    "id, order_type, status, meta, secret_id, error_reason, creator_id, created_at, updated_at";

#[utoipa::path(post, path = "/v1/orders", tag = "keys", request_body = OrderCreate,
    responses((status = 202, description = "`{\"order_ref\": url}`; the key is generated at once"),
        (status = 400, description = "bad input"), (status = 401, description = "no token"),
        (status = 403, description = "reader")))]
pub async fn create_order(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    ApiJson(body): ApiJson<OrderCreate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_writer()?;
    if body.order_type != "key" {
        return Err(ApiError::bad_request(
            "`type` must be \"key\" (asymmetric orders are not supported)",
        ));
    }
    let m = body.meta;
    check_len("meta.algorithm", &m.algorithm, 1, 255)?;
    if m.bit_length == 0 || m.bit_length % 8 != 0 || m.bit_length > 4096 {
        return Err(ApiError::bad_request(
            "`meta.bit_length` must be a multiple of 8 between 8 and 4096",
        ));
    }
    if let Some(ct) = &m.payload_content_type {
        if normalize_content_type(ct) != Some("application/octet-stream") {
            return Err(ApiError::bad_request(
                "`meta.payload_content_type` must be application/octet-stream",
            ));
        }
    }
    let name = m.name.clone().unwrap_or_default();
    check_len("meta.name", &name, 0, 255)?;
    if let Some(mode) = &m.mode {
        check_len("meta.mode", mode, 0, 255)?;
    }
    let expiration = parse_expiration("meta.expiration", &m.expiration)?;
    let mut key = Zeroizing::new(vec![0u8; (m.bit_length / 8) as usize]);
    getrandom::fill(&mut key)
        .map_err(|e| ApiError::internal(format!("OS random generator failed: {e}")))?;
    let s = NewSecret {
        name: name.clone(),
        secret_type: SecretType::Symmetric,
        algorithm: Some(m.algorithm.clone()),
        bit_length: Some(i64::from(m.bit_length)),
        mode: m.mode.clone(),
        content_type: "application/octet-stream",
        expiration: expiration.clone(),
        payload: key,
    };
    let meta = json!({
        "name": m.name, "algorithm": m.algorithm, "bit_length": m.bit_length, "mode": m.mode,
        "payload_content_type": "application/octet-stream", "expiration": expiration,
    });
    let (ctx, meta, s, st) = (&ctx, &meta, &s, &st);
    let id = st.db().write("create order", |mut tx| async move {
    let secret_id = insert_secret(&mut tx, st.master(), &ctx.project_id, &ctx.token_id, s).await?;
    let id = new_id();
    let t = now();
    sqlx::query(
        "INSERT INTO orders (id, project_id, creator_id, order_type, status, meta, secret_id, error_reason, \
         created_at, updated_at) VALUES (?, ?, ?, 'key', 'ACTIVE', ?, ?, NULL, ?, ?)",
    )
    .bind(id.clone())
    .bind(ctx.project_id.clone())
    .bind(ctx.token_id.clone())
    .bind(meta.to_string())
    .bind(secret_id)
    .bind(t.clone())
    .bind(t)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    ApiResult::Ok(id)
    }).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"order_ref": origin.url(&format!("/v1/orders/{id}"))})),
    ))
}

#[utoipa::path(get, path = "/v1/orders", tag = "keys", params(ListQuery),
    responses((status = 200, description = "`{orders, total}` of the caller's project"),
        (status = 400, description = "bad query"), (status = 401, description = "no token")))]
pub async fn list_orders(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let page = q.page()?;
    let sql =
        format!("SELECT {ORDER_COLS} FROM orders WHERE project_id = ? ORDER BY created_at, id");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ctx.project_id.clone())
        .fetch_all(&st.db().pool)
        .await?;
    let base = origin.base.clone();
    let list = page_of(&rows, page, |r| order_view(&base, r))?;
    let mut o = json!({ "orders": list });
    page_links(&mut o, &origin, "/v1/orders", page, rows.len());
    Ok(Json(o))
}

async fn fetch_order(st: &AppState, ctx: &Ctx, id: &str) -> ApiResult<AnyRow> {
    let sql = format!("SELECT {ORDER_COLS} FROM orders WHERE id = ? AND project_id = ?");
    fetch_own(st, ctx, sql, "order", id).await
}

#[utoipa::path(get, path = "/v1/orders/{order_id}", tag = "keys",
    params(("order_id" = String, Path, description = "order id")),
    responses((status = 200, description = "the order"), (status = 401, description = "no token"),
        (status = 404, description = "no such order in the caller's project")))]
pub async fn show_order(
    State(st): State<AppState>,
    ctx: Ctx,
    origin: Origin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = fetch_order(&st, &ctx, &id).await?;
    Ok(Json(order_view(&origin.base, &row)?))
}

#[utoipa::path(delete, path = "/v1/orders/{order_id}", tag = "keys",
    params(("order_id" = String, Path, description = "order id")),
    responses((status = 204, description = "deleted (the secret stays)"), (status = 401, description = "no token"),
        (status = 403, description = "reader"), (status = 404, description = "no such order")))]
pub async fn delete_order(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    fetch_order(&st, &ctx, &id).await?;
    ctx.require_writer()?;
    sqlx::query("DELETE FROM orders WHERE id = ? AND project_id = ?")
        .bind(id)
        .bind(ctx.project_id.clone())
        .execute(&st.db().pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_negotiation() {
        let bin = "application/octet-stream";
        assert_eq!(payload_type("*/*", bin, b"x").as_deref(), Some(bin));
        assert_eq!(
            payload_type("text/plain", bin, b"words").as_deref(),
            Some("text/plain")
        );
        assert_eq!(payload_type("text/plain", bin, &[0xff, 0xfe]), None);
        assert_eq!(payload_type(bin, "text/plain", b"w").as_deref(), Some(bin));
        assert_eq!(payload_type("image/png", bin, b"w"), None);
    }

    #[test]
    fn passphrase_rule() {
        assert_eq!(
            &passphrase_for("symmetric", &[0x00, 0xab, 0xff])[..],
            b"00abff"
        );
        assert_eq!(
            &passphrase_for("passphrase", b"Secret Words")[..],
            b"Secret Words"
        );
        assert_eq!(&passphrase_for("opaque", &[0x12])[..], b"12");
    }
}
