//! Authentication and authorisation.
//!
//! Every request carries `X-Auth-Token`. Tokens are random 32-byte strings shown once;
//! the store keeps only their SHA-256 (hex). A token belongs to one project with one
//! role: `admin` (cloud administrator, like Cinder's `rule:admin_api`), `member`
//! (read and write inside its project) or `reader` (read only inside its project).
//!
//! Rules applied by handlers through [`Ctx`]: missing/unknown token → 401; a
//! non-admin acting on another project's URL, or a reader changing something → 403;
//! objects whose existence must stay hidden (another project's secret, a private type,
//! a hidden extra spec) → 404.

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{get_str, new_id, now};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Header carrying the token.
pub const TOKEN_HEADER: &str = "x-auth-token";

/// A role inside a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Reader => "reader",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub token_id: String,
    pub project_id: String,
    pub role: Role,
}

impl Ctx {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
    /// 403 unless admin.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this action requires the admin role"))
        }
    }
    /// 403 for readers.
    pub fn require_writer(&self) -> ApiResult<()> {
        if self.role == Role::Reader {
            Err(ApiError::forbidden(
                "the reader role cannot change anything",
            ))
        } else {
            Ok(())
        }
    }
    /// 403 unless the URL's project is the caller's (admins may act on any project).
    pub fn require_project(&self, project_id: &str) -> ApiResult<()> {
        if self.is_admin() || self.project_id == project_id {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "the token is not valid for this project",
            ))
        }
    }
}

/// SHA-256 hex of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token string.
pub fn generate_token() -> Result<String, ApiError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)
        .map_err(|e| ApiError::internal(format!("OS random generator failed: {e}")))?;
    Ok(format!("ember-{}", hex::encode(b)))
}

/// Insert a token row (the caller shows the clear token once).
pub async fn insert_token(
    conn: &mut sqlx::AnyConnection,
    project_id: &str,
    role: Role,
    name: &str,
    token: &str,
) -> Result<String, sqlx::Error> {
    let id = new_id();
    sqlx::query("INSERT INTO tokens (id, hash, project_id, role, name, created_at) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(id.clone())
        .bind(hash_token(token))
        .bind(project_id.to_string())
        .bind(role.as_str())
        .bind(name.to_string())
        .bind(now())
        .execute(conn)
        .await?;
    Ok(id)
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(TOKEN_HEADER)
            .ok_or_else(|| ApiError::unauthorized("missing X-Auth-Token header"))?
            .to_str()
            .map_err(|_| ApiError::unauthorized("invalid X-Auth-Token header"))?
            .trim();
        if token.is_empty() || token.len() > 512 {
            return Err(ApiError::unauthorized("invalid X-Auth-Token header"));
        }
        let row = sqlx::query("SELECT id, project_id, role FROM tokens WHERE hash = ?")
            .bind(hash_token(token))
            .fetch_optional(&state.db().pool)
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown token"))?;
        let role = get_str(&row, "role")?;
        Ok(Ctx {
            token_id: get_str(&row, "id")?,
            project_id: get_str(&row, "project_id")?,
            role: Role::parse(&role)
                .ok_or_else(|| ApiError::internal("token with unknown role in the store"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = generate_token().unwrap();
        assert!(t.starts_with("ember-") && t.len() == 70);
    }

    #[test]
    fn roles() {
        let c = Ctx {
            token_id: "t".into(),
            project_id: "p".into(),
            role: Role::Reader,
        };
        assert!(c.require_writer().is_err());
        assert!(c.require_project("p").is_ok());
        assert_eq!(c.require_project("q").unwrap_err().status.as_u16(), 403);
        assert_eq!(Role::parse("member"), Some(Role::Member));
        assert_eq!(Role::parse("root"), None);
    }
}
