//! Projects and tokens (Keystone-like, minimal): admins create projects and issue
//! tokens with a role for a project. A token's clear text is returned once; only its
//! SHA-256 is stored.

use crate::api::{check_len, check_required_name, ApiJson};
use crate::auth::{generate_token, insert_token, Ctx, Role};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{fetch_optional_args, get_str, new_id, now};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::Any;
use utoipa::ToSchema;

/// `POST /v3/projects` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreateBody {
    pub project: ProjectCreate,
}

/// A new project.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreate {
    /// Unique name, 1..255 characters.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// `POST /v3/projects/{project_id}/tokens` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateBody {
    pub token: TokenCreate,
}

/// A new token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub role: Role,
    #[serde(default)]
    pub name: Option<String>,
}

fn project_view(r: &AnyRow) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "id": get_str(r, "id")?,
        "name": get_str(r, "name")?,
        "description": get_str(r, "description")?,
        "created_at": get_str(r, "created_at")?,
    }))
}

fn token_view(r: &AnyRow) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "id": get_str(r, "id")?,
        "project_id": get_str(r, "project_id")?,
        "role": get_str(r, "role")?,
        "name": get_str(r, "name")?,
        "created_at": get_str(r, "created_at")?,
    }))
}

/// 404 unless the project exists.
pub async fn ensure_project(conn: &mut sqlx::AnyConnection, id: &str) -> ApiResult<()> {
    let n =
        crate::store::count(conn, "SELECT COUNT(*) AS n FROM projects WHERE id = ?", id).await?;
    if n == 0 {
        return Err(ApiError::not_found(format!("project {id} not found")));
    }
    Ok(())
}

/// Check the `{project_id}` of a URL against the caller: 403 for a foreign project
/// (non-admin), 404 if an admin names a project that does not exist.
pub async fn check_url_project(state: &AppState, ctx: &Ctx, project_id: &str) -> ApiResult<()> {
    ctx.require_project(project_id)?;
    if project_id != ctx.project_id {
        let mut conn = state.db().pool.acquire().await?;
        ensure_project(&mut conn, project_id).await?;
    }
    Ok(())
}

/// [`check_url_project`], then a pooled connection for the handler's queries.
pub async fn project_conn(
    state: &AppState,
    ctx: &Ctx,
    project_id: &str,
) -> ApiResult<PoolConnection<Any>> {
    check_url_project(state, ctx, project_id).await?;
    Ok(state.db().pool.acquire().await?)
}

#[utoipa::path(post, path = "/v3/projects", tag = "projects", request_body = ProjectCreateBody,
    responses((status = 201, description = "project created"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 409, description = "name taken")))]
pub async fn create_project(
    State(st): State<AppState>,
    ctx: Ctx,
    ApiJson(body): ApiJson<ProjectCreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    let p = body.project;
    check_required_name("project.name", &p.name)?;
    let desc = p.description.clone().unwrap_or_default();
    check_len("project.description", &desc, 0, 255)?;
    let id = new_id();
    let created = now();
    let (pr, idr, descr, createdr) = (&p, &id, &desc, &created);
    st.db()
        .write("create a project", |mut tx| async move {
            let taken = crate::store::count(
                &mut tx,
                "SELECT COUNT(*) AS n FROM projects WHERE name = ?",
                &pr.name,
            )
            .await?;
            if taken > 0 {
                return Err(ApiError::conflict(format!(
                    "a project named {:?} already exists",
                    pr.name
                )));
            }
            sqlx::query(
                "INSERT INTO projects (id, name, description, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(idr.clone())
            .bind(pr.name.clone())
            .bind(descr.clone())
            .bind(createdr.clone())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"project": {"id": id, "name": p.name, "description": desc, "created_at": created}}),
        ),
    ))
}

#[utoipa::path(get, path = "/v3/projects", tag = "projects",
    responses((status = 200, description = "projects the caller may see (all for admins)"),
        (status = 401, description = "no token")))]
pub async fn list_projects(State(st): State<AppState>, ctx: Ctx) -> ApiResult<Json<Value>> {
    let rows = if ctx.is_admin() {
        sqlx::query("SELECT id, name, description, created_at FROM projects ORDER BY name")
            .fetch_all(&st.db().pool)
            .await?
    } else {
        sqlx::query("SELECT id, name, description, created_at FROM projects WHERE id = ?")
            .bind(ctx.project_id.clone())
            .fetch_all(&st.db().pool)
            .await?
    };
    let list = rows
        .iter()
        .map(project_view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "projects": list })))
}

#[utoipa::path(get, path = "/v3/projects/{project_id}", tag = "projects",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "the project"), (status = 401, description = "no token"),
        (status = 403, description = "another project"), (status = 404, description = "no such project")))]
pub async fn show_project(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    ctx.require_project(&project_id)?;
    let sql = "SELECT id, name, description, created_at FROM projects WHERE id = ?";
    let row = fetch_optional_args(&mut *st.db().pool.acquire().await?, sql, &[&project_id])
        .await?
        .ok_or_else(|| ApiError::not_found(format!("project {project_id} not found")))?;
    Ok(Json(json!({ "project": project_view(&row)? })))
}

#[utoipa::path(post, path = "/v3/projects/{project_id}/tokens", tag = "projects",
    params(("project_id" = String, Path, description = "project id")), request_body = TokenCreateBody,
    responses((status = 201, description = "token created; `token.token` is shown only now"),
        (status = 400, description = "bad input"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such project")))]
pub async fn create_token(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
    ApiJson(body): ApiJson<TokenCreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    let name = body.token.name.unwrap_or_default();
    check_len("token.name", &name, 0, 255)?;
    let token = generate_token()?;
    let (pid, role, namer, tokenr) = (&project_id, body.token.role, &name, &token);
    let id = st
        .db()
        .write("create a token", |mut tx| async move {
            ensure_project(&mut tx, pid).await?;
            let id = insert_token(&mut tx, pid, role, namer, tokenr).await?;
            tx.commit().await?;
            ApiResult::Ok(id)
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": {
            "id": id, "project_id": project_id, "role": body.token.role.as_str(), "name": name, "token": token,
        }})),
    ))
}

#[utoipa::path(get, path = "/v3/projects/{project_id}/tokens", tag = "projects",
    params(("project_id" = String, Path, description = "project id")),
    responses((status = 200, description = "token metadata (never the tokens)"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such project")))]
pub async fn list_tokens(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(project_id): Path<String>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    let mut conn = st.db().pool.acquire().await?;
    ensure_project(&mut conn, &project_id).await?;
    let rows = sqlx::query(
        "SELECT id, project_id, role, name, created_at FROM tokens WHERE project_id = ? ORDER BY created_at, id",
    )
    .bind(project_id)
    .fetch_all(&mut *conn)
    .await?;
    let list = rows.iter().map(token_view).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "tokens": list })))
}

#[utoipa::path(delete, path = "/v3/projects/{project_id}/tokens/{token_id}", tag = "projects",
    params(("project_id" = String, Path, description = "project id"), ("token_id" = String, Path, description = "token id")),
    responses((status = 204, description = "revoked"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such token"),
        (status = 409, description = "a token cannot revoke itself")))]
pub async fn delete_token(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((project_id, token_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    ctx.require_admin()?;
    if token_id == ctx.token_id {
        return Err(ApiError::conflict("a token cannot revoke itself"));
    }
    let n = sqlx::query("DELETE FROM tokens WHERE id = ? AND project_id = ?")
        .bind(token_id.clone())
        .bind(project_id)
        .execute(&st.db().pool)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found(format!("token {token_id} not found")));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v3/auth/tokens", tag = "projects",
    responses((status = 200, description = "the caller's own token: project and role"),
        (status = 401, description = "no token")))]
pub async fn whoami(ctx: Ctx) -> Json<Value> {
    Json(
        json!({"token": {"id": ctx.token_id, "project_id": ctx.project_id, "role": ctx.role.as_str()}}),
    )
}
