//! API errors in Cinder's shape: `{"<faultName>": {"code": N, "message": "..."}}`.
//!
//! Every handler returns [`ApiError`]; database errors are classified here so that a
//! database that went away becomes 503 (and the pool reconnects by itself when it is
//! back), a uniqueness clash becomes 409, and anything else a logged 500 whose details
//! stay in the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error with a Cinder-style body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds after which a retry is worth it (`Retry-After`); 503 always carries one.
    pub retry_after: Option<u64>,
    /// Made from a database conflict (deadlock, certification failure, busy): the
    /// store's retry wrapper runs the transaction again ([`crate::store::Retryable`]).
    pub db_conflict: bool,
}

impl crate::store::Retryable for ApiError {
    fn is_retryable(&self) -> bool {
        self.db_conflict
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// The Cinder fault name for a status code.
pub fn fault_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        406 => "notAcceptable",
        409 => "conflictingRequest",
        413 => "overLimit",
        415 => "badMediaType",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

/// The JSON body of an error.
pub fn error_body(status: StatusCode, message: &str) -> serde_json::Value {
    json!({ fault_name(status): { "code": status.as_u16(), "message": message } })
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
            db_conflict: false,
        }
    }
    /// 409 with `Retry-After` (a lock held by others).
    pub fn busy(message: impl Into<String>, retry_after_secs: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after_secs.max(1)),
            ..Self::conflict(message)
        }
    }
}

/// `ApiError::NAME(message)` for each status the handlers answer with.
macro_rules! with_status {
    ($($name:ident => $status:ident),* $(,)?) => {
        impl ApiError {
            $(
                #[doc = concat!("An error with status `", stringify!($status), "`.")]
                pub fn $name(message: impl Into<String>) -> Self {
                    Self::new(StatusCode::$status, message)
                }
            )*
        }
    };
}

with_status! {
    bad_request => BAD_REQUEST,
    unauthorized => UNAUTHORIZED,
    forbidden => FORBIDDEN,
    not_found => NOT_FOUND,
    conflict => CONFLICT,
    too_large => PAYLOAD_TOO_LARGE,
    unavailable => SERVICE_UNAVAILABLE,
    internal => INTERNAL_SERVER_ERROR,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            axum::Json(error_body(self.status, &self.message)),
        )
            .into_response();
        let retry_after = match (self.retry_after, self.status) {
            (Some(s), _) => Some(s),
            (None, StatusCode::SERVICE_UNAVAILABLE) => Some(5),
            (None, _) => None,
        };
        if let Some(v) = retry_after.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// Is this database error "the database is not reachable right now"?
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => {
            // SQLite busy/locked, MariaDB server shutdown / lost connection / lock wait timeout.
            let code = d.code().map(|c| c.to_string()).unwrap_or_default();
            matches!(
                code.as_str(),
                "5" | "6" | "517" | "1053" | "2006" | "2013" | "1205" | "1213" | "08S01"
            ) || d.message().contains("database is locked")
        }
        _ => false,
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::store::is_retryable(&e) {
            // Retried by the store's wrapper; what is left after its last attempt.
            tracing::warn!(error = %e, "database conflict (deadlock, certification failure or busy)");
            return ApiError {
                db_conflict: true,
                ..ApiError::unavailable(
                    "the database kept reporting conflicting transactions; retry later",
                )
            };
        }
        if is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            return ApiError::unavailable("the database is unavailable; retry later");
        }
        if let sqlx::Error::Database(d) = &e {
            if d.is_unique_violation() {
                return ApiError::conflict("an object with the same identity already exists");
            }
        }
        tracing::error!(error = %e, "database error");
        ApiError::internal("internal database error (see the daemon log)")
    }
}

impl From<crate::locks::LockError> for ApiError {
    fn from(e: crate::locks::LockError) -> Self {
        match e {
            crate::locks::LockError::Busy { retry_after, .. } => {
                ApiError::busy(e.to_string(), retry_after.as_secs())
            }
            crate::locks::LockError::Db(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let b = error_body(StatusCode::BAD_REQUEST, "bad name");
        assert_eq!(b["badRequest"]["code"], 400);
        assert_eq!(b["badRequest"]["message"], "bad name");
        assert_eq!(fault_name(StatusCode::PAYLOAD_TOO_LARGE), "overLimit");
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
    }
}
