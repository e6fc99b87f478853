//! Listings of volumes, snapshots and attachments as Cinder pages them: filters
//! (`name`, `status`, `metadata`, `bootable`, `volume_id`, `project_id`), sort
//! (`sort=key[:dir],…` or `sort_key`/`sort_dir`; default newest first), `limit` and
//! `marker` (or `offset`), `all_tenants` for admins, and the `*_links` next link.
//!
//! The filter, sort and page run over the JSON views (one function, [`select`], for
//! every collection), so what a client filters on is what it sees. A bad parameter is
//! a 400 naming it; a marker that names no object of the listing too (as in Cinder).

use crate::api::parse_bool;
use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use serde::Deserialize;
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use utoipa::IntoParams;

/// Largest page (Cinder's `osapi_max_limit` default).
pub const MAX_LIMIT: usize = 1000;

/// The query of a listing (unknown parameters are ignored, as Cinder does).
#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct ListQuery {
    /// Admins: every project's objects (`1`, `true`, …).
    pub all_tenants: Option<String>,
    /// With `all_tenants`: only this project's.
    pub project_id: Option<String>,
    /// Exact name.
    pub name: Option<String>,
    /// Exact status.
    pub status: Option<String>,
    /// Snapshots: of this volume. Attachments: of this volume.
    pub volume_id: Option<String>,
    /// Volumes: bootable or not.
    pub bootable: Option<String>,
    /// Metadata that must be present, as a JSON object (`{"k": "v"}`).
    pub metadata: Option<String>,
    /// Page size (0..1000).
    pub limit: Option<String>,
    /// Id of the last object of the previous page.
    pub marker: Option<String>,
    /// Objects to skip (instead of `marker`).
    pub offset: Option<String>,
    /// `key[:asc|desc],…` over id, name, status, size, created_at, updated_at, bootable.
    pub sort: Option<String>,
    /// Legacy sort key.
    pub sort_key: Option<String>,
    /// Legacy sort direction.
    pub sort_dir: Option<String>,
    /// Attachments: of this server.
    pub instance_id: Option<String>,
}

const SORT_KEYS: &[&str] = &[
    "id",
    "name",
    "status",
    "size",
    "created_at",
    "updated_at",
    "bootable",
    "volume_id",
];

/// A parsed listing request.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Every project (admins only).
    pub all_projects: bool,
    project_id: Option<String>,
    equal: Vec<(&'static str, String)>,
    metadata: BTreeMap<String, String>,
    sort: Vec<(String, bool)>,
    /// Page size.
    pub limit: Option<usize>,
    marker: Option<String>,
    offset: usize,
}

fn num(field: &str, v: &Option<String>) -> ApiResult<Option<usize>> {
    v.as_deref()
        .map(|s| {
            s.trim().parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!("`{field}` must be a non-negative integer"))
            })
        })
        .transpose()
}

impl ListQuery {
    /// Check and parse for `ctx` (a non-admin's `all_tenants` is ignored, as Cinder does).
    pub fn parse(self, ctx: &Ctx) -> ApiResult<Listing> {
        let all = match self.all_tenants.as_deref() {
            None => false,
            Some("") => true,
            Some(v) => parse_bool(v)
                .ok_or_else(|| ApiError::bad_request("`all_tenants` must be a boolean"))?,
        };
        let mut equal = Vec::new();
        for (field, v) in [
            ("name", self.name),
            ("status", self.status),
            ("volume_id", self.volume_id),
            ("instance", self.instance_id),
        ] {
            if let Some(v) = v {
                equal.push((field, v));
            }
        }
        if let Some(b) = self.bootable {
            let b = parse_bool(&b)
                .ok_or_else(|| ApiError::bad_request("`bootable` must be a boolean"))?;
            equal.push(("bootable", b.to_string()));
        }
        let metadata = match self.metadata.as_deref() {
            None => BTreeMap::new(),
            Some(m) => serde_json::from_str(m)
                // cinderclient sends a Python dict literal.
                .or_else(|_| serde_json::from_str(&m.replace('\'', "\"")))
                .map_err(|_| {
                    ApiError::bad_request(
                        "`metadata` must be an object of strings, e.g. {\"k\": \"v\"}",
                    )
                })?,
        };
        let mut sort = Vec::new();
        let spec = match (&self.sort, &self.sort_key) {
            (Some(s), _) => s.clone(),
            (None, Some(k)) => format!("{k}:{}", self.sort_dir.as_deref().unwrap_or("desc")),
            (None, None) => String::new(),
        };
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, dir) = item.split_once(':').unwrap_or((item, "desc"));
            // cinderclient sends Cinder's database names of some keys.
            let key = match key {
                "display_name" => "name",
                k => k,
            };
            if !SORT_KEYS.contains(&key) {
                return Err(ApiError::bad_request(format!(
                    "`sort` key {key:?} is not one of {}",
                    SORT_KEYS.join(", ")
                )));
            }
            let asc = match dir {
                "asc" => true,
                "desc" => false,
                d => {
                    return Err(ApiError::bad_request(format!(
                        "`sort` direction {d:?} must be asc or desc"
                    )))
                }
            };
            sort.push((key.to_string(), asc));
        }
        if sort.is_empty() {
            sort.push(("created_at".to_string(), false));
        }
        if !sort.iter().any(|(k, _)| k == "id") {
            let asc = sort[0].1;
            sort.push(("id".to_string(), asc));
        }
        let limit = num("limit", &self.limit)?.map(|l| l.min(MAX_LIMIT));
        let offset = num("offset", &self.offset)?.unwrap_or(0);
        if offset > 0 && self.marker.is_some() {
            return Err(ApiError::bad_request("give `marker` or `offset`, not both"));
        }
        Ok(Listing {
            all_projects: all && ctx.is_admin(),
            project_id: self.project_id.filter(|_| all && ctx.is_admin()),
            equal,
            metadata,
            sort,
            limit,
            marker: self.marker,
            offset,
        })
    }
}

impl Listing {
    /// Only these projects' objects when listing every project.
    pub fn project_filter(&self) -> Option<&str> {
        self.project_id.as_deref()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn compare(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        _ => text(a).cmp(&text(b)),
    }
}

/// Filter, sort and page `items` (JSON views); the page, and the marker of the next
/// page when the page is full and more objects follow.
pub fn select(items: Vec<Value>, l: &Listing) -> ApiResult<(Vec<Value>, Option<String>)> {
    let mut items: Vec<Value> = items
        .into_iter()
        .filter(|v| {
            l.equal
                .iter()
                .all(|(field, want)| text(&v[*field]) == *want)
                && l.metadata
                    .iter()
                    .all(|(k, want)| v["metadata"][k].as_str() == Some(want.as_str()))
        })
        .collect();
    items.sort_by(|a, b| {
        l.sort
            .iter()
            .map(|(k, asc)| {
                let o = compare(&a[k.as_str()], &b[k.as_str()]);
                if *asc {
                    o
                } else {
                    o.reverse()
                }
            })
            .find(|o| *o != Ordering::Equal)
            .unwrap_or(Ordering::Equal)
    });
    let start = match &l.marker {
        Some(m) => {
            items
                .iter()
                .position(|v| v["id"].as_str() == Some(m.as_str()))
                .ok_or_else(|| ApiError::bad_request(format!("marker {m} could not be found")))?
                + 1
        }
        None => l.offset,
    };
    let rest: Vec<Value> = items.into_iter().skip(start).collect();
    let Some(limit) = l.limit else {
        return Ok((rest, None));
    };
    let more = rest.len() > limit;
    let page: Vec<Value> = rest.into_iter().take(limit).collect();
    let next = if more && limit > 0 {
        page.last()
            .and_then(|v| v["id"].as_str())
            .map(str::to_string)
    } else {
        None
    };
    Ok((page, next))
}

/// The query string of the next page: `query` with its `marker` (and `offset`)
/// replaced by `marker`.
pub fn next_query(query: Option<&str>, marker: &str) -> String {
    let mut parts: Vec<String> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("marker=") && !p.starts_with("offset="))
        .map(str::to_string)
        .collect();
    parts.push(format!("marker={marker}"));
    parts.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use serde_json::json;

    fn ctx(role: Role) -> Ctx {
        Ctx {
            token_id: "t".into(),
            project_id: "p".into(),
            role,
        }
    }

    fn items() -> Vec<Value> {
        (0..5)
            .map(|i| {
                json!({"id": format!("id{i}"), "name": if i % 2 == 0 { "even" } else { "odd" },
                "status": "available", "size": 5 - i, "created_at": format!("2026-01-0{}", i + 1),
                "metadata": {"k": i.to_string()}})
            })
            .collect()
    }

    fn q(pairs: &[(&str, &str)]) -> ListQuery {
        let s = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        serde_json::from_value(json!(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()))
        .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ids(v: &[Value]) -> Vec<&str> {
        v.iter().map(|x| x["id"].as_str().unwrap()).collect()
    }

    #[test]
    fn filter_sort_page() {
        let c = ctx(Role::Member);
        let l = q(&[]).parse(&c).unwrap();
        let (page, next) = select(items(), &l).unwrap();
        assert_eq!(ids(&page), ["id4", "id3", "id2", "id1", "id0"]);
        assert!(next.is_none());
        let l = q(&[("name", "even"), ("sort", "size:asc")])
            .parse(&c)
            .unwrap();
        assert_eq!(ids(&select(items(), &l).unwrap().0), ["id4", "id2", "id0"]);
        let l = q(&[("limit", "2"), ("sort_key", "id"), ("sort_dir", "asc")])
            .parse(&c)
            .unwrap();
        let (page, next) = select(items(), &l).unwrap();
        assert_eq!(
            (ids(&page), next.as_deref()),
            (vec!["id0", "id1"], Some("id1"))
        );
        let l = q(&[("limit", "2"), ("sort", "id:asc"), ("marker", "id3")])
            .parse(&c)
            .unwrap();
        let (page, next) = select(items(), &l).unwrap();
        assert_eq!((ids(&page), next), (vec!["id4"], None));
        let l = q(&[("metadata", "{'k': '3'}")]).parse(&c).unwrap();
        assert_eq!(ids(&select(items(), &l).unwrap().0), ["id3"]);
        let l = q(&[("marker", "nope")]).parse(&c).unwrap();
        assert_eq!(select(items(), &l).unwrap_err().status.as_u16(), 400);
        for bad in [
            ("sort", "colour:asc"),
            ("sort", "name:up"),
            ("limit", "-1"),
            ("metadata", "[1]"),
            ("all_tenants", "maybe"),
        ] {
            let e = q(&[bad]).parse(&c).unwrap_err();
            assert!(e.message.contains(bad.0), "{bad:?}: {}", e.message);
        }
        // A member's all_tenants is ignored; an admin's is not.
        assert!(!q(&[("all_tenants", "1")]).parse(&c).unwrap().all_projects);
        assert!(
            q(&[("all_tenants", "1")])
                .parse(&ctx(Role::Admin))
                .unwrap()
                .all_projects
        );
        assert_eq!(
            next_query(Some("limit=2&marker=a"), "b"),
            "limit=2&marker=b"
        );
    }
}
