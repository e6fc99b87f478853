//! API versions as the OpenStack clients find them: the version documents, the service
//! prefixes, and Cinder's microversions.
//!
//! One listener serves three APIs. Each also answers under the prefix devstack gives
//! it, so that every client can be pointed at "its" endpoint:
//!
//! | prefix | API | paths under it | give the client |
//! |---|---|---|---|
//! | `/volume` | Cinder v3 | `/`, `/v3…` | `http://HOST:8776/volume/v3/<project_id>` |
//! | `/key-manager` | Barbican v1 | `/`, `/v1…` | `http://HOST:8776/key-manager` |
//! | `/image` | Glance v2 (metadefs) | `/`, `/versions`, `/v2…` | `http://HOST:8776/image` |
//!
//! [`serve_prefixed`] wraps the router in one middleware, [`route_request`], that runs
//! before routing: it strips a service prefix (a path of another API under it is 404),
//! trims trailing slashes (barbicanclient adds one to every collection), records where
//! the request came in ([`Origin`]: the prefix and the base URL its links must use), and
//! negotiates the microversion of Cinder (`/v3…`) and Barbican (`/v1…`) requests.
//!
//! Version documents ([`root`]): `GET /` answers the prefix's document; without a prefix
//! it lists Barbican's v1 **first** and Cinder's v3 second, because barbicanclient reads
//! only the first entry of the list and cinderclient searches the list for a `3.x`
//! version (so both clients can also be given the bare `http://HOST:8776`). Glance's
//! list is at `GET /versions` (and `GET /v2`). Cinder's `GET /v3` and Barbican's
//! `GET /v1` describe the one version. Version documents answer whatever version a
//! request names (barbicanclient reads Barbican's while asking for 1.1).
//!
//! Microversions: `OpenStack-API-Version: volume 3.N` (or the legacy
//! `X-OpenStack-Volume-API-Version: 3.N`; `latest` is the maximum; none is 3.0) must lie
//! in [`CINDER_MIN`]..=[`CINDER_MAX`], else 406 as Cinder answers; a malformed version
//! is 400. Errors of Barbican routes also carry Barbican's `code`, `title` and
//! `description` beside the Cinder fault. The answer carries `OpenStack-API-Version: volume 3.N` (and the legacy header
//! when the request used it) and `Vary`. Barbican's `key-manager 1.N` likewise
//! ([`BARBICAN_MIN`]..=[`BARBICAN_MAX`]). Handlers read the negotiated version with the
//! [`Microversion`] extractor; routes that need one answer 404 below it, as Cinder does.

use crate::api::NO_ROUTE;
use crate::error::ApiError;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// A `MAJOR.MINOR` API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl Version {
    /// Parse `3.27` (a leading `v` is accepted).
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim();
        let s = s.strip_prefix('v').unwrap_or(s);
        let (a, b) = s.split_once('.')?;
        let ok = |x: &str| !x.is_empty() && x.len() <= 4 && x.bytes().all(|c| c.is_ascii_digit());
        if !ok(a) || !ok(b) {
            return None;
        }
        Some(Version(a.parse().ok()?, b.parse().ok()?))
    }
}

/// Oldest Cinder microversion served.
pub const CINDER_MIN: Version = Version(3, 0);
/// Newest Cinder microversion served (what each version needs of Ember is in
/// `docs/volumes.md`; versions Ember has nothing for change nothing).
pub const CINDER_MAX: Version = Version(3, 71);
/// Oldest Barbican microversion served.
pub const BARBICAN_MIN: Version = Version(1, 0);
/// Newest Barbican microversion served (1.1 would add secret consumers, which Ember
/// does not have: a volume's key is its own copy, never shared).
pub const BARBICAN_MAX: Version = Version(1, 0);

/// The three APIs of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Cinder v3 (`/v3…`).
    Volume,
    /// Barbican v1 (`/v1…`).
    KeyManager,
    /// Glance v2 metadefs (`/v2…`, `/versions`).
    Image,
}

impl Service {
    /// The path prefix devstack gives the service.
    pub fn prefix(self) -> &'static str {
        match self {
            Service::Volume => "/volume",
            Service::KeyManager => "/key-manager",
            Service::Image => "/image",
        }
    }

    const ALL: [Service; 3] = [Service::Volume, Service::KeyManager, Service::Image];

    /// Does `path` (prefix stripped) belong to this service?
    fn owns(self, path: &str) -> bool {
        let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
        path == "/"
            || match self {
                Service::Volume => under("/v3"),
                Service::KeyManager => under("/v1"),
                Service::Image => under("/v2") || under("/versions"),
            }
    }
}

/// Where a request came in: under which prefix, and the base URL (scheme, host and
/// prefix) that links in the answer must start with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The prefix the request used, if any.
    pub service: Option<Service>,
    /// `http://HOST[/prefix]`, from the `Host` header.
    pub base: String,
}

impl Origin {
    /// The origin of a request with these headers and no prefix.
    pub fn plain(headers: &HeaderMap) -> Origin {
        Origin {
            service: None,
            base: host_url(headers),
        }
    }

    /// An absolute link to `path` (starting with `/`) as the client reached the API.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Origin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Origin>()
            .cloned()
            .unwrap_or_else(|| Origin::plain(&parts.headers)))
    }
}

/// `http://HOST` from the `Host` header (`localhost` when it is missing or odd).
fn host_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// The negotiated Cinder microversion of a request (3.0 when none was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Microversion(pub Version);

impl Microversion {
    /// 404 (as Cinder answers for a method its version lacks) below `min`.
    pub fn require(self, min: Version, what: &str) -> Result<(), ApiError> {
        if self.0 < min {
            return Err(ApiError::not_found(format!(
                "{what} needs microversion {min} or later (OpenStack-API-Version: volume {min}); \
                 the request used {}",
                self.0
            )));
        }
        Ok(())
    }

    /// At least `v`?
    pub fn at_least(self, v: Version) -> bool {
        self.0 >= v
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Microversion {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Microversion>()
            .copied()
            .unwrap_or(Microversion(CINDER_MIN)))
    }
}

const API_VERSION: HeaderName = HeaderName::from_static("openstack-api-version");
const LEGACY_VOLUME: HeaderName = HeaderName::from_static("x-openstack-volume-api-version");

/// What a request asked for, per [`negotiate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The version to serve.
    pub version: Version,
    /// The request used the legacy header.
    pub legacy: bool,
}

/// The version a request asks of `service` (`volume`, `key-manager`) in its headers,
/// checked against `min..=max`: 400 when malformed, 406 when outside.
pub fn negotiate(
    headers: &HeaderMap,
    service: &str,
    legacy: Option<&HeaderName>,
    min: Version,
    max: Version,
) -> Result<Negotiated, ApiError> {
    let mut asked: Option<(String, bool)> = None;
    for v in headers.get_all(API_VERSION) {
        let text = v
            .to_str()
            .map_err(|_| ApiError::bad_request("OpenStack-API-Version is not ASCII"))?;
        for item in text.split(',') {
            let mut words = item.split_whitespace();
            let (Some(s), Some(ver), None) = (words.next(), words.next(), words.next()) else {
                if item.trim().is_empty() {
                    continue;
                }
                return Err(ApiError::bad_request(format!(
                    "OpenStack-API-Version {item:?}: expected \"<service> <version>\""
                )));
            };
            let same = s.eq_ignore_ascii_case(service)
                || (service == "volume" && s.eq_ignore_ascii_case("block-storage"));
            if same {
                asked = Some((ver.to_string(), false));
            }
        }
    }
    if asked.is_none() {
        if let Some(h) = legacy.and_then(|l| headers.get(l)) {
            let text = h.to_str().map_err(|_| {
                ApiError::bad_request(format!("{} is not ASCII", legacy_name(legacy)))
            })?;
            asked = Some((text.trim().to_string(), true));
        }
    }
    let Some((text, legacy)) = asked else {
        return Ok(Negotiated {
            version: min,
            legacy: false,
        });
    };
    let version = if text.eq_ignore_ascii_case("latest") {
        max
    } else {
        Version::parse(&text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "API version {text:?} of {service} is not of the form MAJOR.MINOR"
            ))
        })?
    };
    if version < min || version > max {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!("version {version} of {service} is not supported by the API: minimum is {min} and maximum is {max}"),
        ));
    }
    Ok(Negotiated { version, legacy })
}

fn legacy_name(h: Option<&HeaderName>) -> &str {
    h.map(HeaderName::as_str).unwrap_or("header")
}

/// The prefix of `path`, and the path without it; `None` when `path` has none.
fn split_prefix(path: &str) -> Option<(Service, &str)> {
    Service::ALL.into_iter().find_map(|s| {
        let rest = path.strip_prefix(s.prefix())?;
        if rest.is_empty() {
            Some((s, "/"))
        } else if rest.starts_with('/') {
            Some((s, rest))
        } else {
            None
        }
    })
}

/// The middleware of [`serve_prefixed`]: prefix, trailing slashes, origin,
/// microversions (see the module doc).
pub async fn route_request(mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let (service, rest) = match split_prefix(&path) {
        Some((s, rest)) if s.owns(rest) => (Some(s), rest.to_string()),
        Some(_) => return ApiError::not_found(NO_ROUTE).into_response(),
        None => (None, path.clone()),
    };
    let trimmed = match rest.trim_end_matches('/') {
        "" => "/".to_string(),
        t => t.to_string(),
    };
    if trimmed != path {
        let pq = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.clone(),
        };
        let mut parts = req.uri().clone().into_parts();
        match pq.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => return ApiError::bad_request("malformed request path").into_response(),
        }
        match Uri::from_parts(parts) {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => return ApiError::bad_request("malformed request path").into_response(),
        }
    }
    let base = match service {
        Some(s) => format!("{}{}", host_url(req.headers()), s.prefix()),
        None => host_url(req.headers()),
    };
    req.extensions_mut().insert(Origin { service, base });

    let under = |p: &str| trimmed == p || trimmed.starts_with(&format!("{p}/"));
    // Version documents describe the range; they are not held to it (barbicanclient
    // asks for key-manager 1.1 while it reads them).
    let document = matches!(trimmed.as_str(), "/" | "/v1" | "/v2" | "/v3" | "/versions");
    let negotiated = if document {
        None
    } else if under("/v3") {
        Some((
            "volume",
            negotiate(
                req.headers(),
                "volume",
                Some(&LEGACY_VOLUME),
                CINDER_MIN,
                CINDER_MAX,
            ),
        ))
    } else if under("/v1") {
        Some((
            "key-manager",
            negotiate(
                req.headers(),
                "key-manager",
                None,
                BARBICAN_MIN,
                BARBICAN_MAX,
            ),
        ))
    } else {
        None
    };
    let barbican = under("/v1");
    let echo = match negotiated {
        None => None,
        Some((_, Err(e))) if barbican => return barbican_error(e.into_response()).await,
        Some((_, Err(e))) => return e.into_response(),
        Some((svc, Ok(n))) => {
            if svc == "volume" {
                req.extensions_mut().insert(Microversion(n.version));
            }
            Some((svc, n))
        }
    };
    let mut resp = next.run(req).await;
    if barbican && (resp.status().is_client_error() || resp.status().is_server_error()) {
        resp = barbican_error(resp).await;
    }
    if let Some((svc, n)) = echo {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&format!("{svc} {}", n.version)) {
            h.insert(API_VERSION, v);
        }
        if n.legacy {
            if let Ok(v) = HeaderValue::from_str(&n.version.to_string()) {
                h.insert(LEGACY_VOLUME, v);
            }
        }
        h.append(
            header::VARY,
            HeaderValue::from_static("OpenStack-API-Version"),
        );
    }
    resp
}

/// A Cinder error body of a Barbican route, with Barbican's fields added
/// (`{"code", "title", "description"}`, which barbicanclient reads) beside the Cinder
/// fault, so that both kinds of client find theirs.
async fn barbican_error(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, crate::api::MAX_BODY)
        .await
        .unwrap_or_default();
    let mut v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({}));
    let status = parts.status;
    let fault = crate::error::fault_name(status);
    let message = v[fault]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    if let Some(o) = v.as_object_mut() {
        o.insert("code".into(), json!(status.as_u16()));
        o.insert(
            "title".into(),
            json!(status.canonical_reason().unwrap_or("Error")),
        );
        o.insert("description".into(), json!(message));
    }
    let out = serde_json::to_vec(&v).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(out))
}

/// The router served under its prefixes too (see the module doc). Routing happens after
/// [`route_request`] has rewritten the path: the API router is the fallback service of
/// an outer router whose only layer is that middleware.
pub fn serve_prefixed(api: axum::Router) -> axum::Router {
    axum::Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn(route_request))
}

// ---------------------------------------------------------------------------------------
// Version documents

fn cinder_entry(o: &Origin) -> Value {
    json!({
        "id": "v3.0",
        "status": "CURRENT",
        "version": CINDER_MAX.to_string(),
        "min_version": CINDER_MIN.to_string(),
        "updated": "2023-08-31T00:00:00Z",
        "links": [
            {"rel": "self", "href": o.url("/v3/")},
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
        ],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.volume+json;version=3"}],
    })
}

fn barbican_entry(o: &Origin) -> Value {
    json!({
        "id": "v1",
        "status": "CURRENT",
        "min_version": BARBICAN_MIN.to_string(),
        "max_version": BARBICAN_MAX.to_string(),
        // For clients that search a shared list by `version` (cinderclient).
        "version": BARBICAN_MAX.to_string(),
        "links": [
            {"rel": "self", "href": o.url("/v1/")},
            {"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"},
        ],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.key-manager-v1+json"}],
    })
}

fn glance_versions(o: &Origin) -> Value {
    json!({"versions": [{
        "id": "v2.0",
        "status": "CURRENT",
        "links": [{"rel": "self", "href": o.url("/v2/")}],
    }]})
}

#[utoipa::path(get, path = "/", tag = "versions", security(()),
    responses((status = 300, description = "the version list: under `/volume` Cinder's, under `/key-manager` \
        Barbican's, under `/image` Glance's; without a prefix Barbican v1 then Cinder v3")))]
pub async fn root(o: Origin) -> (StatusCode, Json<Value>) {
    let doc = match o.service {
        Some(Service::Volume) => json!({"versions": [cinder_entry(&o)]}),
        Some(Service::KeyManager) => json!({"versions": {"values": [barbican_entry(&o)]}}),
        Some(Service::Image) => glance_versions(&o),
        None => json!({"versions": [barbican_entry(&o), cinder_entry(&o)]}),
    };
    (StatusCode::MULTIPLE_CHOICES, Json(doc))
}

#[utoipa::path(get, path = "/v3", tag = "versions", security(()),
    responses((status = 200, description = "Cinder v3 with its microversion range"),
        (status = 406, description = "microversion outside the range")))]
pub async fn cinder_v3(o: Origin) -> Json<Value> {
    Json(json!({"versions": [cinder_entry(&o)]}))
}

#[utoipa::path(get, path = "/v1", tag = "versions", security(()),
    responses((status = 200, description = "Barbican v1 with its microversion range"),
        (status = 406, description = "microversion outside the range")))]
pub async fn barbican_v1(o: Origin) -> Json<Value> {
    Json(json!({"version": barbican_entry(&o)}))
}

#[utoipa::path(get, path = "/versions", tag = "versions", security(()),
    responses((status = 200, description = "Glance's version list (v2: metadefs)")))]
pub async fn glance(o: Origin) -> Json<Value> {
    Json(glance_versions(&o))
}

#[utoipa::path(get, path = "/v2", tag = "versions", security(()),
    responses((status = 200, description = "Glance's version list, for clients given the `/v2` endpoint")))]
pub async fn glance_v2(o: Origin) -> Json<Value> {
    Json(glance_versions(&o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn vol(m: &HeaderMap) -> Result<Negotiated, ApiError> {
        negotiate(m, "volume", Some(&LEGACY_VOLUME), CINDER_MIN, CINDER_MAX)
    }

    #[test]
    fn negotiation() {
        assert_eq!(vol(&h(&[])).unwrap().version, Version(3, 0));
        let n = vol(&h(&[("openstack-api-version", "volume 3.27")])).unwrap();
        assert_eq!((n.version, n.legacy), (Version(3, 27), false));
        let n = vol(&h(&[(
            "openstack-api-version",
            "compute 2.1, volume latest",
        )]))
        .unwrap();
        assert_eq!(n.version, CINDER_MAX);
        let n = vol(&h(&[("x-openstack-volume-api-version", "3.44")])).unwrap();
        assert_eq!((n.version, n.legacy), (Version(3, 44), true));
        // The standard header wins over the legacy one.
        let n = vol(&h(&[
            ("x-openstack-volume-api-version", "3.44"),
            ("openstack-api-version", "volume 3.1"),
        ]))
        .unwrap();
        assert_eq!(n.version, Version(3, 1));
        let e = vol(&h(&[("openstack-api-version", "volume 3.999")])).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_ACCEPTABLE);
        assert!(e.message.contains("maximum is 3.71"), "{}", e.message);
        let e = vol(&h(&[("openstack-api-version", "volume 2.0")])).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_ACCEPTABLE);
        let e = vol(&h(&[("openstack-api-version", "volume three")])).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = vol(&h(&[("openstack-api-version", "volume 3.1 extra")])).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        // Another service's version is not ours.
        assert_eq!(
            vol(&h(&[("openstack-api-version", "compute 2.90")]))
                .unwrap()
                .version,
            CINDER_MIN
        );
        assert_eq!(Version::parse("v3.27"), Some(Version(3, 27)));
        assert_eq!(Version::parse("3."), None);
        assert_eq!(Version::parse("99999.1"), None);
    }

    #[test]
    fn prefixes() {
        assert_eq!(split_prefix("/volume"), Some((Service::Volume, "/")));
        assert_eq!(
            split_prefix("/volume/v3/p/volumes"),
            Some((Service::Volume, "/v3/p/volumes"))
        );
        assert_eq!(split_prefix("/volumes"), None);
        assert_eq!(split_prefix("/v3/p"), None);
        assert!(Service::Volume.owns("/v3/p/volumes"));
        assert!(!Service::Volume.owns("/v1/secrets"));
        assert!(!Service::Volume.owns("/v33"));
        assert!(Service::KeyManager.owns("/v1"));
        assert!(Service::Image.owns("/versions"));
        assert!(!Service::Image.owns("/v3/x"));
    }
}
