//! HTTP plumbing shared by all handlers: the JSON body extractor (strict, with
//! Cinder-style errors naming the offending field), the body size cap, and the
//! middleware that turns any non-JSON error (axum's own 404/405/413/…) into a Cinder
//! error body.

use crate::error::{error_body, ApiError};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// Largest request body accepted (bytes); larger bodies get 413.
pub const MAX_BODY: usize = 64 * 1024;

/// Message of the router's fallback (tests use it to tell "no route" from "no object").
pub const NO_ROUTE: &str = "no such API route";

/// A JSON request body, parsed strictly.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(format!("request body is larger than {MAX_BODY} bytes"))
            } else {
                ApiError::bad_request(format!("cannot read request body: {}", e.body_text()))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// `POST`/`PUT …/metadata` body of volumes, snapshots and volume types.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetadataBody {
    /// Keys and values.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// Parse a JSON body, naming the field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request("a JSON request body is required"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ApiError::bad_request(format!("malformed JSON in request body: {inner}"))
            }
            _ if path == "." => ApiError::bad_request(format!("invalid request body: {inner}")),
            _ => ApiError::bad_request(format!("invalid request body at `{path}`: {inner}")),
        }
    })?;
    Ok(v)
}

/// Parse part of a body already read as JSON (an action's arguments), naming the field
/// on error with `at` (e.g. `os-extend`) in front of its path.
pub fn parse_value<T: DeserializeOwned>(at: &str, v: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid `{at}`: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid `{at}.{path}`: {inner}"))
        }
    })
}

/// Rewrite error responses that are not JSON (produced by axum itself) into Cinder bodies.
pub async fn cinder_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut msg = String::from_utf8_lossy(&text).trim().to_string();
    if msg.is_empty() {
        msg = status.canonical_reason().unwrap_or("error").to_string();
    }
    let mut out = (status, axum::Json(error_body(status, &msg))).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// Router fallback.
pub async fn fallback() -> ApiError {
    ApiError::not_found(NO_ROUTE)
}

/// Validate a free-text field's length (in characters).
pub fn check_len(field: &str, v: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = v.chars().count();
    if n < min || n > max {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be {min} to {max} characters long (got {n})"
        )));
    }
    Ok(())
}

/// Validate a required name: 1 to 255 characters, not blank.
pub fn check_required_name(field: &str, v: &str) -> Result<(), ApiError> {
    check_len(field, v, 1, 255)?;
    if v.trim().is_empty() {
        return Err(ApiError::bad_request(format!(
            "`{field}` must not be blank"
        )));
    }
    Ok(())
}

/// A boolean accepting Cinder's string spellings too (`"true"`, `"yes"`, `"1"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoolLike(pub bool);

impl<'de> serde::Deserialize<'de> for BoolLike {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = BoolLike;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a boolean (true/false, or a string such as \"true\", \"no\", \"1\")")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<BoolLike, E> {
                Ok(BoolLike(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BoolLike, E> {
                parse_bool(v)
                    .map(BoolLike)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// A non-negative integer that may also come as a string of digits (Cinder's sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntLike(pub u64);

impl<'de> serde::Deserialize<'de> for IntLike {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntLike;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a non-negative integer (or a string of digits)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntLike, E> {
                Ok(IntLike(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntLike, E> {
                u64::try_from(v)
                    .map(IntLike)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntLike, E> {
                let t = v.trim();
                if t.is_empty() || t.len() > 19 || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::invalid_value(serde::de::Unexpected::Str(v), &self));
                }
                t.parse()
                    .map(IntLike)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Cinder's boolean strings.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" | "y" | "t" | "<is> true" => Some(true),
        "false" | "0" | "off" | "no" | "n" | "f" | "<is> false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: u32,
        flag: Option<BoolLike>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Outer>(br#"{"inner": {"size": "x"}}"#).unwrap_err();
        assert!(e.message.contains("inner.size"), "{}", e.message);
        let e = parse_json::<Outer>(br#"{"inner": {"size": 1, "bogus": 2}}"#).unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        let e = parse_json::<Outer>(b"{not json").unwrap_err();
        assert!(e.message.contains("malformed JSON"), "{}", e.message);
        let e = parse_json::<Outer>(b"").unwrap_err();
        assert!(e.message.contains("required"), "{}", e.message);
        let o = parse_json::<Outer>(br#"{"inner": {"size": 1, "flag": "yes"}}"#).unwrap();
        assert_eq!(o.inner.flag, Some(BoolLike(true)));
        assert!(parse_json::<Outer>(br#"{"inner": {"size": 1, "flag": "maybe"}}"#).is_err());
    }
}
