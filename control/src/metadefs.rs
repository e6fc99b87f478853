//! Metadata definitions (`/v2/metadefs/namespaces…`), Glance-shaped, but enforced.
//!
//! A namespace holds property definitions (a restricted JSON schema: `type` string |
//! integer | number | boolean | array, `enum`, `minimum`/`maximum`,
//! `minLength`/`maxLength`, `pattern`, `default`, `readonly`, `items`, `title`,
//! `description`) and resource-type associations with an optional `prefix`.
//!
//! Unlike Glance, Ember enforces them: when a volume type's metadata or extra spec is
//! set, [`enforce`] finds every namespace associated with `OS::Cinder::Volumetype`; if
//! the key is `prefix + property` the value must satisfy the property, and a key that
//! starts with a non-empty prefix but names no property is refused. Values are strings
//! on the wire; they are parsed per the property type (booleans accept Cinder's
//! spellings, `<is> True` included; arrays are comma separated). Patterns use
//! unanchored search, as JSON schema does.
//!
//! Namespaces also hold objects and tags ([`objects`], catalog only), and the JSON
//! schemas of all these documents are served for glanceclient ([`schemas`]). The
//! namespace list pages with `limit`/`marker` (`next` link), sorts by `sort_key`
//! (`namespace` or `created_at`) and filters by `visibility` and `resource_types`.
//!
//! Start-up creates two protected public namespaces: `OS::Ember::VolumeType`
//! (`encryption`, derived and read-only; `replication`) and `OS::Ember::QoS` (prefix
//! `qos:`, the six IOPS/bandwidth limits with ranges).

pub mod objects;
pub mod schemas;

use crate::api::{check_len, parse_bool, ApiJson};
use crate::auth::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{execute_args, fetch_optional_args, get_i64, get_str, now, Db, Tx};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sqlx::any::AnyRow;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// The resource type whose namespaces are enforced on volume types.
pub const VOLUME_TYPE_RESOURCE: &str = "OS::Cinder::Volumetype";

/// Property value types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PropType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
}

/// Item schema of an array property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemsDef {
    #[serde(rename = "type")]
    pub item_type: PropType,
    #[serde(rename = "enum", default, skip_serializing_if = "Option::is_none")]
    pub enum_values: Option<Vec<Value>>,
}

/// A property definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertyDef {
    /// Property name (required when creating through the properties endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub title: String,
    #[serde(rename = "type")]
    pub prop_type: PropType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(rename = "enum", default, skip_serializing_if = "Option::is_none")]
    pub enum_values: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    #[serde(rename = "minLength", default, skip_serializing_if = "Option::is_none")]
    pub min_length: Option<u64>,
    #[serde(rename = "maxLength", default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemsDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operators: Option<Vec<String>>,
}

/// A resource-type association.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssociationCreate {
    /// e.g. `OS::Cinder::Volumetype`.
    pub name: String,
    pub prefix: Option<String>,
    pub properties_target: Option<String>,
}

/// `POST /v2/metadefs/namespaces` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamespaceCreate {
    /// 1..80 characters, unique.
    pub namespace: String,
    pub display_name: Option<String>,
    pub description: Option<String>,
    /// `public` or `private` (default).
    pub visibility: Option<String>,
    #[serde(rename = "protected")]
    pub is_protected: Option<bool>,
    pub resource_type_associations: Option<Vec<AssociationCreate>>,
    pub properties: Option<BTreeMap<String, PropertyDef>>,
    /// Objects to create with it.
    pub objects: Option<Vec<objects::ObjectBody>>,
    /// Tags to create with it.
    pub tags: Option<Vec<objects::TagBody>>,
}

/// `PUT /v2/metadefs/namespaces/{namespace}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamespaceUpdate {
    /// Must equal the current name if given (renaming is not supported).
    pub namespace: Option<String>,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub visibility: Option<String>,
    #[serde(rename = "protected")]
    pub is_protected: Option<bool>,
    /// Ignored (glanceclient sends the namespace back as it read it).
    #[schema(value_type = Option<String>)]
    pub owner: Option<Value>,
    /// Ignored: change them through their own routes.
    #[schema(value_type = Option<Object>)]
    pub resource_type_associations: Option<Value>,
    /// Ignored: change them through their own routes.
    #[schema(value_type = Option<Object>)]
    pub properties: Option<Value>,
    /// Ignored: change them through their own routes.
    #[schema(value_type = Option<Object>)]
    pub objects: Option<Value>,
    /// Ignored: change them through their own routes.
    #[schema(value_type = Option<Object>)]
    pub tags: Option<Value>,
    /// Ignored (read-only).
    #[schema(value_type = Option<String>)]
    pub schema: Option<Value>,
    /// Ignored (read-only).
    #[serde(rename = "self")]
    #[schema(value_type = Option<String>)]
    pub self_link: Option<Value>,
    /// Ignored (read-only).
    #[schema(value_type = Option<String>)]
    pub created_at: Option<Value>,
    /// Ignored (read-only).
    #[schema(value_type = Option<String>)]
    pub updated_at: Option<Value>,
}

/// Namespace list query.
#[derive(Debug, Deserialize, IntoParams)]
pub struct NamespaceQuery {
    /// Only namespaces associated with one of these resource types (comma separated).
    pub resource_types: Option<String>,
    /// Only `public` or `private` ones.
    pub visibility: Option<String>,
    /// Page size (1..1000; default 20 as glanceclient asks).
    pub limit: Option<String>,
    /// The last namespace of the previous page.
    pub marker: Option<String>,
    /// `namespace` (default) or `created_at`.
    pub sort_key: Option<String>,
    /// `asc` (default) or `desc`.
    pub sort_dir: Option<String>,
}

fn check_name(field: &str, v: &str) -> ApiResult<()> {
    check_len(field, v, 1, 80)?;
    if v.chars().any(|c| c.is_control() || c == '/') {
        return Err(ApiError::bad_request(format!(
            "`{field}` must not contain '/' or control characters"
        )));
    }
    Ok(())
}

fn value_matches_type(t: PropType, v: &Value) -> bool {
    match t {
        PropType::String => v.is_string(),
        PropType::Integer => v.is_i64() || v.is_u64(),
        PropType::Number => v.is_number(),
        PropType::Boolean => v.is_boolean(),
        PropType::Array => v.is_array(),
    }
}

/// Check a definition is self-consistent.
pub fn check_def(name: &str, d: &PropertyDef) -> ApiResult<()> {
    check_name("name", name)?;
    check_len("title", &d.title, 1, 255)?;
    if let Some(desc) = &d.description {
        check_len("description", desc, 0, 500)?;
    }
    if let (Some(a), Some(b)) = (d.minimum, d.maximum) {
        if a > b {
            return Err(ApiError::bad_request(format!(
                "property {name}: `minimum` is greater than `maximum`"
            )));
        }
    }
    if d.minimum.is_some_and(|v| !v.is_finite()) || d.maximum.is_some_and(|v| !v.is_finite()) {
        return Err(ApiError::bad_request(format!(
            "property {name}: bounds must be finite"
        )));
    }
    if (d.minimum.is_some() || d.maximum.is_some())
        && !matches!(d.prop_type, PropType::Integer | PropType::Number)
    {
        return Err(ApiError::bad_request(format!(
            "property {name}: `minimum`/`maximum` need type integer or number"
        )));
    }
    if let (Some(a), Some(b)) = (d.min_length, d.max_length) {
        if a > b {
            return Err(ApiError::bad_request(format!(
                "property {name}: `minLength` is greater than `maxLength`"
            )));
        }
    }
    if let Some(p) = &d.pattern {
        check_len("pattern", p, 1, 255)?;
        regex::RegexBuilder::new(p)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "property {name}: `pattern` is not a valid regex: {e}"
                ))
            })?;
    }
    if let Some(e) = &d.enum_values {
        if e.is_empty() || e.len() > 256 {
            return Err(ApiError::bad_request(format!(
                "property {name}: `enum` must hold 1 to 256 values"
            )));
        }
        if let Some(bad) = e.iter().find(|v| !value_matches_type(d.prop_type, v)) {
            return Err(ApiError::bad_request(format!(
                "property {name}: `enum` value {bad} does not match the type"
            )));
        }
    }
    match (&d.items, d.prop_type) {
        (Some(_), t) if t != PropType::Array => {
            return Err(ApiError::bad_request(format!(
                "property {name}: `items` is only for type array"
            )))
        }
        (Some(i), _) if i.item_type == PropType::Array => {
            return Err(ApiError::bad_request(format!(
                "property {name}: nested arrays are not supported"
            )))
        }
        (
            Some(ItemsDef {
                item_type,
                enum_values: Some(e),
            }),
            _,
        ) if e.is_empty() || e.iter().any(|v| !value_matches_type(*item_type, v)) => {
            return Err(ApiError::bad_request(format!(
                "property {name}: `items.enum` does not match `items.type`"
            )));
        }
        _ => {}
    }
    if let Some(def) = &d.default {
        let text = match def {
            Value::String(s) => s.clone(),
            Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        let mut d2 = d.clone();
        d2.readonly = None;
        check_value(&d2, &text)
            .map_err(|rule| ApiError::bad_request(format!("property {name}: `default` {rule}")))?;
    }
    Ok(())
}

fn in_enum(e: &Option<Vec<Value>>, pred: impl Fn(&Value) -> bool) -> bool {
    e.as_ref().is_none_or(|vals| vals.iter().any(pred))
}

fn check_scalar(
    t: PropType,
    d: &PropertyDef,
    enum_values: &Option<Vec<Value>>,
    v: &str,
) -> Result<(), String> {
    match t {
        PropType::Integer => {
            let n: i64 = v
                .trim()
                .parse()
                .map_err(|_| "must be an integer".to_string())?;
            bounds(d, n as f64)?;
            if !in_enum(enum_values, |e| e.as_i64() == Some(n)) {
                return Err(format!("must be one of {}", enum_text(enum_values)));
            }
        }
        PropType::Number => {
            let n: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|n: &f64| n.is_finite())
                .ok_or("must be a number")?;
            bounds(d, n)?;
            if !in_enum(enum_values, |e| e.as_f64() == Some(n)) {
                return Err(format!("must be one of {}", enum_text(enum_values)));
            }
        }
        PropType::Boolean => {
            let b = parse_bool(v).ok_or("must be a boolean (true/false, <is> True/<is> False)")?;
            if !in_enum(enum_values, |e| e.as_bool() == Some(b)) {
                return Err(format!("must be one of {}", enum_text(enum_values)));
            }
        }
        PropType::String => {
            let n = v.chars().count() as u64;
            if d.min_length.is_some_and(|m| n < m) || d.max_length.is_some_and(|m| n > m) {
                return Err(format!(
                    "length must be between {} and {} (minLength/maxLength)",
                    d.min_length.unwrap_or(0),
                    d.max_length
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "any".into())
                ));
            }
            if let Some(p) = &d.pattern {
                let re = regex::RegexBuilder::new(p)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|_| "has an invalid pattern")?;
                if !re.is_match(v) {
                    return Err(format!("must match the pattern {p:?}"));
                }
            }
            if !in_enum(enum_values, |e| e.as_str() == Some(v)) {
                return Err(format!("must be one of {}", enum_text(enum_values)));
            }
        }
        PropType::Array => return Err("nested arrays are not supported".into()),
    }
    Ok(())
}

fn enum_text(e: &Option<Vec<Value>>) -> String {
    e.as_ref()
        .map(|v| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn bounds(d: &PropertyDef, n: f64) -> Result<(), String> {
    if d.minimum.is_some_and(|m| n < m) || d.maximum.is_some_and(|m| n > m) {
        let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_else(|| "any".into());
        return Err(format!(
            "must be between {} and {} (minimum/maximum)",
            f(d.minimum),
            f(d.maximum)
        ));
    }
    Ok(())
}

/// Check a string value against a property; `Err` is the violated rule, in words.
pub fn check_value(d: &PropertyDef, v: &str) -> Result<(), String> {
    if d.readonly == Some(true) {
        return Err("is read-only (derived by Ember)".into());
    }
    match d.prop_type {
        PropType::Array => {
            let items = d.items.clone().unwrap_or(ItemsDef {
                item_type: PropType::String,
                enum_values: None,
            });
            for item in v.split(',').map(str::trim) {
                let plain = PropertyDef {
                    pattern: None,
                    min_length: None,
                    max_length: None,
                    ..d.clone()
                };
                check_scalar(items.item_type, &plain, &items.enum_values, item)
                    .map_err(|r| format!("item {item:?} {r}"))?;
            }
            Ok(())
        }
        t => check_scalar(t, d, &d.enum_values, v),
    }
}

/// Validate `key = value` set on a volume type against the enforced namespaces.
pub async fn enforce(conn: &mut AnyConnection, key: &str, value: &str) -> ApiResult<()> {
    let assocs = sqlx::query(
        "SELECT namespace, prefix FROM metadef_resource_types WHERE name = ? ORDER BY namespace",
    )
    .bind(VOLUME_TYPE_RESOURCE)
    .fetch_all(&mut *conn)
    .await?;
    for a in &assocs {
        let ns = get_str(a, "namespace")?;
        let prefix = get_str(a, "prefix")?;
        let Some(prop) = key.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let sql = "SELECT definition FROM metadef_properties WHERE namespace = ? AND name = ?";
        let row = fetch_optional_args(conn, sql, &[&ns, prop]).await?;
        match row {
            Some(r) => {
                let def: PropertyDef = serde_json::from_str(&get_str(&r, "definition")?)
                    .map_err(|_| ApiError::internal("corrupted metadef property in the store"))?;
                check_value(&def, value).map_err(|rule| {
                    ApiError::bad_request(format!(
                        "{key} = {value:?}: metadef property {ns}/{prop} {rule}"
                    ))
                })?;
            }
            None if !prefix.is_empty() => {
                return Err(ApiError::bad_request(format!(
                    "{key}: unknown property; namespace {ns} (prefix {prefix:?}) does not define {prop:?}"
                )));
            }
            None => {}
        }
    }
    Ok(())
}

// ---- storage helpers ----

async fn insert_property(
    conn: &mut AnyConnection,
    ns: &str,
    name: &str,
    def: &PropertyDef,
) -> ApiResult<()> {
    let mut d = def.clone();
    d.name = None;
    let text = serde_json::to_string(&d).map_err(|_| ApiError::internal("serialize property"))?;
    sqlx::query("INSERT INTO metadef_properties (namespace, name, definition) VALUES (?, ?, ?)")
        .bind(ns.to_string())
        .bind(name.to_string())
        .bind(text)
        .execute(conn)
        .await?;
    Ok(())
}

async fn insert_association(
    conn: &mut AnyConnection,
    ns: &str,
    a: &AssociationCreate,
) -> ApiResult<Value> {
    check_name("name", &a.name)?;
    let prefix = a.prefix.clone().unwrap_or_default();
    check_len("prefix", &prefix, 0, 80)?;
    let target = a.properties_target.clone().unwrap_or_default();
    check_len("properties_target", &target, 0, 80)?;
    let n = {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM metadef_resource_types WHERE namespace = ? AND name = ?",
        )
        .bind(ns.to_string())
        .bind(a.name.clone())
        .fetch_one(&mut *conn)
        .await?;
        get_i64(&r, "n")?
    };
    if n > 0 {
        return Err(ApiError::conflict(format!(
            "namespace {ns} is already associated with {}",
            a.name
        )));
    }
    let t = now();
    sqlx::query(
        "INSERT INTO metadef_resource_types (namespace, name, prefix, properties_target, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(ns.to_string())
    .bind(a.name.clone())
    .bind(prefix.clone())
    .bind(target.clone())
    .bind(t.clone())
    .execute(conn)
    .await?;
    Ok(assoc_json(&a.name, &prefix, &target, &t))
}

fn assoc_json(name: &str, prefix: &str, target: &str, created: &str) -> Value {
    let mut v = json!({"name": name, "created_at": created, "updated_at": created});
    if !prefix.is_empty() {
        v["prefix"] = json!(prefix);
    }
    if !target.is_empty() {
        v["properties_target"] = json!(target);
    }
    v
}

async fn create_namespace_tx(
    conn: &mut AnyConnection,
    owner: &str,
    b: &NamespaceCreate,
) -> ApiResult<()> {
    check_name("namespace", &b.namespace)?;
    let display = b.display_name.clone().unwrap_or_default();
    check_len("display_name", &display, 0, 80)?;
    let desc = b.description.clone().unwrap_or_default();
    check_len("description", &desc, 0, 500)?;
    let vis = b.visibility.clone().unwrap_or_else(|| "private".into());
    if vis != "public" && vis != "private" {
        return Err(ApiError::bad_request(
            "`visibility` must be public or private",
        ));
    }
    let n = crate::store::count(
        conn,
        "SELECT COUNT(*) AS n FROM metadef_namespaces WHERE namespace = ?",
        &b.namespace,
    )
    .await?;
    if n > 0 {
        return Err(ApiError::conflict(format!(
            "namespace {} already exists",
            b.namespace
        )));
    }
    let t = now();
    sqlx::query(
        "INSERT INTO metadef_namespaces (namespace, display_name, description, visibility, protected, owner, \
         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(b.namespace.clone())
    .bind(display)
    .bind(desc)
    .bind(vis)
    .bind(i64::from(b.is_protected.unwrap_or(false)))
    .bind(owner.to_string())
    .bind(t.clone())
    .bind(t)
    .execute(&mut *conn)
    .await?;
    for (name, def) in b.properties.iter().flatten() {
        check_def(name, def)?;
        insert_property(conn, &b.namespace, name, def).await?;
    }
    for a in b.resource_type_associations.iter().flatten() {
        insert_association(conn, &b.namespace, a).await?;
    }
    for o in b.objects.iter().flatten() {
        objects::check_object(o)?;
        objects::insert_object(conn, &b.namespace, o, &now()).await?;
    }
    if let Some(tags) = &b.tags {
        for t in tags {
            objects::check_tag(&t.name)?;
            objects::insert_tag(conn, &b.namespace, &t.name).await?;
        }
    }
    Ok(())
}

/// Load a namespace visible to the caller; 404 otherwise.
async fn load_ns(conn: &mut AnyConnection, ctx: &Ctx, ns: &str) -> ApiResult<AnyRow> {
    let sql = "SELECT namespace, display_name, description, visibility, protected, owner, created_at, updated_at \
         FROM metadef_namespaces WHERE namespace = ?";
    let row = fetch_optional_args(conn, sql, &[ns])
        .await?
        .ok_or_else(|| ApiError::not_found(format!("metadef namespace {ns} not found")))?;
    let visible = ctx.is_admin()
        || get_str(&row, "visibility")? == "public"
        || get_str(&row, "owner")? == ctx.project_id;
    if !visible {
        return Err(ApiError::not_found(format!(
            "metadef namespace {ns} not found"
        )));
    }
    Ok(row)
}

/// Prologue of the reads under a namespace: a pooled connection and the visible namespace.
async fn read_ns(st: &AppState, ctx: &Ctx, ns: &str) -> ApiResult<(PoolConnection<Any>, AnyRow)> {
    let mut conn = st.db().pool.acquire().await?;
    let row = load_ns(&mut conn, ctx, ns).await?;
    Ok((conn, row))
}

/// The transaction of a change under a namespace, with the namespace loaded.
async fn begin_ns(st: &AppState, ctx: &Ctx, ns: &str) -> ApiResult<(Tx<'static>, AnyRow)> {
    let mut tx = st.db().begin().await?;
    let row = load_ns(&mut tx, ctx, ns).await?;
    Ok((tx, row))
}

/// The `DELETE` of one entry under a namespace (a property, an object, a tag), admin
/// only: `delete` (`… WHERE namespace = ? AND name = ?`) removes the `what` called
/// `name`; 404 when the namespace or the entry does not exist.
async fn delete_entry(
    st: &AppState,
    ctx: &Ctx,
    (ns, name): (&str, &str),
    delete: &'static str,
    what: &str,
) -> ApiResult<StatusCode> {
    ctx.require_admin()?;
    let (mut tx, _) = begin_ns(st, ctx, ns).await?;
    if execute_args(&mut tx, delete, &[ns, name]).await? == 0 {
        return Err(ApiError::not_found(format!(
            "{what} {name} not found in {ns}"
        )));
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn properties_of(conn: &mut AnyConnection, ns: &str) -> ApiResult<Map<String, Value>> {
    let rows = sqlx::query(
        "SELECT name, definition FROM metadef_properties WHERE namespace = ? ORDER BY name",
    )
    .bind(ns.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let mut m = Map::new();
    for r in &rows {
        let def: Value = serde_json::from_str(&get_str(r, "definition")?).unwrap_or(Value::Null);
        m.insert(get_str(r, "name")?, def);
    }
    Ok(m)
}

async fn associations_of(conn: &mut AnyConnection, ns: &str) -> ApiResult<Vec<Value>> {
    let rows = sqlx::query(
        "SELECT name, prefix, properties_target, created_at FROM metadef_resource_types WHERE namespace = ? ORDER BY name",
    )
    .bind(ns.to_string())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(assoc_json(
                &get_str(r, "name")?,
                &get_str(r, "prefix")?,
                &get_str(r, "properties_target")?,
                &get_str(r, "created_at")?,
            ))
        })
        .collect()
}

async fn ns_view(conn: &mut AnyConnection, r: &AnyRow, full: bool) -> ApiResult<Value> {
    let ns = get_str(r, "namespace")?;
    let mut v = json!({
        "namespace": ns,
        "display_name": get_str(r, "display_name")?,
        "description": get_str(r, "description")?,
        "visibility": get_str(r, "visibility")?,
        "protected": get_i64(r, "protected")? != 0,
        "owner": get_str(r, "owner")?,
        "created_at": get_str(r, "created_at")?,
        "updated_at": get_str(r, "updated_at")?,
        "self": format!("/v2/metadefs/namespaces/{ns}"),
        "schema": "/v2/schemas/metadefs/namespace",
    });
    v["resource_type_associations"] = json!(associations_of(conn, &ns).await?);
    if full {
        v["properties"] = Value::Object(properties_of(conn, &ns).await?);
        v["objects"] = json!(objects::objects_of(conn, &ns).await?);
        v["tags"] = json!(objects::tags_of(conn, &ns).await?);
    }
    Ok(v)
}

/// Create the standard namespaces on first start.
pub async fn bootstrap(db: &Db) -> anyhow::Result<()> {
    for b in standard_namespaces() {
        let b = &b;
        let created = db
            .write("bootstrap a metadef namespace", |mut tx| async move {
                let n = crate::store::count(
                    &mut tx,
                    "SELECT COUNT(*) AS n FROM metadef_namespaces WHERE namespace = ?",
                    &b.namespace,
                )
                .await?;
                if n > 0 {
                    return ApiResult::Ok(false);
                }
                create_namespace_tx(&mut tx, "system", b).await?;
                tx.commit().await?;
                Ok(true)
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if created {
            tracing::info!(namespace = %b.namespace, "created standard metadef namespace");
        }
    }
    Ok(())
}

fn prop(title: &str, t: PropType, desc: &str) -> PropertyDef {
    PropertyDef {
        name: None,
        title: title.into(),
        prop_type: t,
        description: Some(desc.into()),
        enum_values: None,
        default: None,
        minimum: None,
        maximum: None,
        min_length: None,
        max_length: None,
        pattern: None,
        readonly: None,
        items: None,
        operators: None,
    }
}

fn standard_namespaces() -> Vec<NamespaceCreate> {
    let assoc = |prefix: Option<&str>| {
        Some(vec![AssociationCreate {
            name: VOLUME_TYPE_RESOURCE.into(),
            prefix: prefix.map(str::to_string),
            properties_target: None,
        }])
    };
    let mut vt = BTreeMap::new();
    let mut enc = prop(
        "Encryption",
        PropType::Boolean,
        "True when the type has an encryption spec (derived, read-only).",
    );
    enc.readonly = Some(true);
    vt.insert("encryption".to_string(), enc);
    vt.insert(
        "replication".to_string(),
        prop(
            "Replication",
            PropType::Boolean,
            "Volumes of this type are replicated to a secondary backend.",
        ),
    );
    let mut qos = BTreeMap::new();
    for (k, what, max) in [
        ("read_iops_sec", "read operations per second", 1e9),
        ("write_iops_sec", "write operations per second", 1e9),
        ("total_iops_sec", "operations per second", 1e9),
        ("read_bytes_sec", "bytes read per second", 1e15),
        ("write_bytes_sec", "bytes written per second", 1e15),
        ("total_bytes_sec", "bytes per second", 1e15),
    ] {
        let mut p = prop(
            k,
            PropType::Integer,
            &format!("Limit of {what} per volume (enforced by the data plane)."),
        );
        p.minimum = Some(1.0);
        p.maximum = Some(max);
        qos.insert(k.to_string(), p);
    }
    vec![
        NamespaceCreate {
            namespace: "OS::Ember::VolumeType".into(),
            display_name: Some("Ember volume type capabilities".into()),
            description: Some("User-visible facts about a volume type.".into()),
            visibility: Some("public".into()),
            is_protected: Some(true),
            resource_type_associations: assoc(None),
            properties: Some(vt),
            objects: None,
            tags: None,
        },
        NamespaceCreate {
            namespace: "OS::Ember::QoS".into(),
            display_name: Some("Ember QoS limits".into()),
            description: Some("qos:* extra specs enforced per volume by the data plane.".into()),
            visibility: Some("public".into()),
            is_protected: Some(true),
            resource_type_associations: assoc(Some("qos:")),
            properties: Some(qos),
            objects: None,
            tags: None,
        },
    ]
}

// ---- handlers ----

#[utoipa::path(get, path = "/v2/metadefs/namespaces", tag = "metadefs", params(NamespaceQuery),
    responses((status = 200, description = "`{namespaces}` visible to the caller"), (status = 401, description = "no token")))]
pub async fn list_namespaces(
    State(st): State<AppState>,
    ctx: Ctx,
    Query(q): Query<NamespaceQuery>,
) -> ApiResult<Json<Value>> {
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(l) => l
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::bad_request("`limit` must be between 1 and 1000"))?,
    };
    let by_created = match q.sort_key.as_deref() {
        None | Some("namespace") => false,
        Some("created_at") => true,
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "`sort_key` {k:?} must be namespace or created_at"
            )))
        }
    };
    let desc = match q.sort_dir.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(d) => {
            return Err(ApiError::bad_request(format!(
                "`sort_dir` {d:?} must be asc or desc"
            )))
        }
    };
    if let Some(v) = q.visibility.as_deref() {
        if v != "public" && v != "private" && v != "all" {
            return Err(ApiError::bad_request(
                "`visibility` must be public, private or all",
            ));
        }
    }
    let mut conn = st.db().pool.acquire().await?;
    let rows = sqlx::query(
        "SELECT namespace, display_name, description, visibility, protected, owner, created_at, updated_at \
         FROM metadef_namespaces ORDER BY namespace",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        let vis = get_str(r, "visibility")?;
        let visible = ctx.is_admin() || vis == "public" || get_str(r, "owner")? == ctx.project_id;
        if !visible
            || q.visibility
                .as_deref()
                .is_some_and(|w| w != "all" && w != vis)
        {
            continue;
        }
        let v = ns_view(&mut conn, r, false).await?;
        if let Some(rt) = &q.resource_types {
            let wanted: Vec<&str> = rt.split(',').map(str::trim).collect();
            let has = v["resource_type_associations"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["name"].as_str().is_some_and(|n| wanted.contains(&n)))
            });
            if !has {
                continue;
            }
        }
        out.push(v);
    }
    let key = if by_created {
        "created_at"
    } else {
        "namespace"
    };
    out.sort_by(|a, b| {
        let o = a[key]
            .as_str()
            .cmp(&b[key].as_str())
            .then_with(|| a["namespace"].as_str().cmp(&b["namespace"].as_str()));
        if desc {
            o.reverse()
        } else {
            o
        }
    });
    let start = match &q.marker {
        None => 0,
        Some(m) => {
            out.iter()
                .position(|v| v["namespace"].as_str() == Some(m.as_str()))
                .ok_or_else(|| ApiError::bad_request(format!("marker {m} could not be found")))?
                + 1
        }
    };
    let more = out.len() > start.saturating_add(limit);
    let page: Vec<Value> = out.into_iter().skip(start).take(limit).collect();
    let mut o = json!({"namespaces": page, "schema": "/v2/schemas/metadefs/namespaces",
        "first": "/v2/metadefs/namespaces"});
    if more {
        if let Some(last) = page.last().and_then(|v| v["namespace"].as_str()) {
            let mut next = format!("/v2/metadefs/namespaces?limit={limit}&marker={last}");
            if let Some(k) = &q.sort_key {
                next.push_str(&format!("&sort_key={k}"));
            }
            if let Some(d) = &q.sort_dir {
                next.push_str(&format!("&sort_dir={d}"));
            }
            o["next"] = json!(next);
        }
    }
    Ok(Json(o))
}

#[utoipa::path(post, path = "/v2/metadefs/namespaces", tag = "metadefs", request_body = NamespaceCreate,
    responses((status = 201, description = "the namespace"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 409, description = "exists")))]
pub async fn create_namespace(
    State(st): State<AppState>,
    ctx: Ctx,
    ApiJson(body): ApiJson<NamespaceCreate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    let (body, ctx) = (&body, &ctx);
    let v = st
        .db()
        .write("create namespace", |mut tx| async move {
            create_namespace_tx(&mut tx, &ctx.project_id, body).await?;
            let row = load_ns(&mut tx, ctx, &body.namespace).await?;
            let v = ns_view(&mut tx, &row, true).await?;
            tx.commit().await?;
            ApiResult::Ok(v)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 200, description = "the namespace with properties"), (status = 401, description = "no token"),
        (status = 404, description = "no such (visible) namespace")))]
pub async fn show_namespace(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<Json<Value>> {
    let (mut conn, row) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(ns_view(&mut conn, &row, true).await?))
}

#[utoipa::path(put, path = "/v2/metadefs/namespaces/{namespace}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")), request_body = NamespaceUpdate,
    responses((status = 200, description = "the namespace"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace")))]
pub async fn update_namespace(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
    ApiJson(b): ApiJson<NamespaceUpdate>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    let (mut tx, row) = begin_ns(&st, &ctx, &ns).await?;
    if b.namespace.as_ref().is_some_and(|n| *n != ns) {
        return Err(ApiError::bad_request("`namespace` cannot be renamed"));
    }
    let display = b.display_name.unwrap_or(get_str(&row, "display_name")?);
    check_len("display_name", &display, 0, 80)?;
    let desc = b.description.unwrap_or(get_str(&row, "description")?);
    check_len("description", &desc, 0, 500)?;
    let vis = b.visibility.unwrap_or(get_str(&row, "visibility")?);
    if vis != "public" && vis != "private" {
        return Err(ApiError::bad_request(
            "`visibility` must be public or private",
        ));
    }
    let prot = b
        .is_protected
        .map(i64::from)
        .unwrap_or(get_i64(&row, "protected")?);
    sqlx::query(
        "UPDATE metadef_namespaces SET display_name = ?, description = ?, visibility = ?, protected = ?, updated_at = ? \
         WHERE namespace = ?",
    )
    .bind(display)
    .bind(desc)
    .bind(vis)
    .bind(prot)
    .bind(now())
    .bind(ns.clone())
    .execute(&mut *tx)
    .await?;
    let row = load_ns(&mut tx, &ctx, &ns).await?;
    let v = ns_view(&mut tx, &row, true).await?;
    tx.commit().await?;
    Ok(Json(v))
}

#[utoipa::path(delete, path = "/v2/metadefs/namespaces/{namespace}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 204, description = "deleted with its properties and associations"),
        (status = 401, description = "no token"), (status = 403, description = "not admin, or protected"),
        (status = 404, description = "no such namespace")))]
pub async fn delete_namespace(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<StatusCode> {
    ctx.require_admin()?;
    let (mut tx, row) = begin_ns(&st, &ctx, &ns).await?;
    if get_i64(&row, "protected")? != 0 {
        return Err(ApiError::forbidden(format!(
            "namespace {ns} is protected; set protected=false first"
        )));
    }
    objects::forget(&mut tx, &ns).await?;
    for sql in [
        "DELETE FROM metadef_properties WHERE namespace = ?",
        "DELETE FROM metadef_resource_types WHERE namespace = ?",
        "DELETE FROM metadef_namespaces WHERE namespace = ?",
    ] {
        sqlx::query(sql).bind(ns.clone()).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/properties", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 200, description = "`{properties: {name: definition}}`"), (status = 401, description = "no token"),
        (status = 404, description = "no such namespace")))]
pub async fn list_properties(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(
        json!({"properties": properties_of(&mut conn, &ns).await?}),
    ))
}

#[utoipa::path(post, path = "/v2/metadefs/namespaces/{namespace}/properties", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")), request_body = PropertyDef,
    responses((status = 201, description = "the property"), (status = 400, description = "bad definition"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace"), (status = 409, description = "exists")))]
pub async fn create_property(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
    ApiJson(def): ApiJson<PropertyDef>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    let name = def
        .name
        .clone()
        .ok_or_else(|| ApiError::bad_request("`name` is required"))?;
    check_def(&name, &def)?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    let sql = "SELECT name FROM metadef_properties WHERE namespace = ? AND name = ?";
    let exists = fetch_optional_args(&mut tx, sql, &[&ns, &name]).await?;
    if exists.is_some() {
        return Err(ApiError::conflict(format!(
            "property {name} already exists in {ns}"
        )));
    }
    insert_property(&mut tx, &ns, &name, &def).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(&def).unwrap_or(Value::Null)),
    ))
}

async fn load_property(conn: &mut AnyConnection, ns: &str, name: &str) -> ApiResult<PropertyDef> {
    let sql = "SELECT definition FROM metadef_properties WHERE namespace = ? AND name = ?";
    let row = fetch_optional_args(conn, sql, &[ns, name])
        .await?
        .ok_or_else(|| ApiError::not_found(format!("property {name} not found in {ns}")))?;
    serde_json::from_str(&get_str(&row, "definition")?)
        .map_err(|_| ApiError::internal("corrupted metadef property"))
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/properties/{property_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("property_name" = String, Path, description = "property")),
    responses((status = 200, description = "the property"), (status = 401, description = "no token"),
        (status = 404, description = "no such namespace or property")))]
pub async fn show_property(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    let mut def = load_property(&mut conn, &ns, &name).await?;
    def.name = Some(name);
    Ok(Json(serde_json::to_value(&def).unwrap_or(Value::Null)))
}

#[utoipa::path(put, path = "/v2/metadefs/namespaces/{namespace}/properties/{property_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("property_name" = String, Path, description = "property")),
    request_body = PropertyDef,
    responses((status = 200, description = "the property"), (status = 400, description = "bad definition"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace or property")))]
pub async fn update_property(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
    ApiJson(mut def): ApiJson<PropertyDef>,
) -> ApiResult<Json<Value>> {
    ctx.require_admin()?;
    if def.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::bad_request("`name` cannot be changed"));
    }
    check_def(&name, &def)?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    load_property(&mut tx, &ns, &name).await?;
    sqlx::query("DELETE FROM metadef_properties WHERE namespace = ? AND name = ?")
        .bind(ns.clone())
        .bind(name.clone())
        .execute(&mut *tx)
        .await?;
    insert_property(&mut tx, &ns, &name, &def).await?;
    tx.commit().await?;
    def.name = Some(name);
    Ok(Json(serde_json::to_value(&def).unwrap_or(Value::Null)))
}

#[utoipa::path(delete, path = "/v2/metadefs/namespaces/{namespace}/properties/{property_name}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("property_name" = String, Path, description = "property")),
    responses((status = 204, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such namespace or property")))]
pub async fn delete_property(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let delete = "DELETE FROM metadef_properties WHERE namespace = ? AND name = ?";
    delete_entry(&st, &ctx, (&ns, &name), delete, "property").await
}

#[utoipa::path(get, path = "/v2/metadefs/namespaces/{namespace}/resource_types", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")),
    responses((status = 200, description = "`{resource_type_associations}`"), (status = 401, description = "no token"),
        (status = 404, description = "no such namespace")))]
pub async fn list_associations(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
) -> ApiResult<Json<Value>> {
    let (mut conn, _) = read_ns(&st, &ctx, &ns).await?;
    Ok(Json(
        json!({"resource_type_associations": associations_of(&mut conn, &ns).await?}),
    ))
}

#[utoipa::path(post, path = "/v2/metadefs/namespaces/{namespace}/resource_types", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name")), request_body = AssociationCreate,
    responses((status = 201, description = "the association"), (status = 400, description = "bad input"),
        (status = 401, description = "no token"), (status = 403, description = "not admin"),
        (status = 404, description = "no such namespace"), (status = 409, description = "exists")))]
pub async fn create_association(
    State(st): State<AppState>,
    ctx: Ctx,
    Path(ns): Path<String>,
    ApiJson(a): ApiJson<AssociationCreate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    ctx.require_admin()?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    let v = insert_association(&mut tx, &ns, &a).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(delete, path = "/v2/metadefs/namespaces/{namespace}/resource_types/{resource_type}", tag = "metadefs",
    params(("namespace" = String, Path, description = "namespace name"), ("resource_type" = String, Path, description = "resource type name")),
    responses((status = 204, description = "deleted"), (status = 401, description = "no token"),
        (status = 403, description = "not admin"), (status = 404, description = "no such namespace or association")))]
pub async fn delete_association(
    State(st): State<AppState>,
    ctx: Ctx,
    Path((ns, rt)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    ctx.require_admin()?;
    let (mut tx, _) = begin_ns(&st, &ctx, &ns).await?;
    let n = execute_args(
        &mut tx,
        "DELETE FROM metadef_resource_types WHERE namespace = ? AND name = ?",
        &[&ns, &rt],
    )
    .await?;
    if n == 0 {
        return Err(ApiError::not_found(format!(
            "namespace {ns} is not associated with {rt}"
        )));
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_rules() {
        let mut p = prop("x", PropType::Integer, "");
        p.minimum = Some(1.0);
        p.maximum = Some(10.0);
        assert!(check_value(&p, "5").is_ok());
        assert!(check_value(&p, "0").unwrap_err().contains("minimum"));
        assert!(check_value(&p, "x").unwrap_err().contains("integer"));
        let b = prop("b", PropType::Boolean, "");
        assert!(check_value(&b, "<is> True").is_ok());
        assert!(check_value(&b, "maybe").is_err());
        let mut s = prop("s", PropType::String, "");
        s.enum_values = Some(vec![json!("luks"), json!("luks2")]);
        assert!(check_value(&s, "luks2").is_ok());
        assert!(check_value(&s, "plain").unwrap_err().contains("one of"));
        s.enum_values = None;
        s.pattern = Some("^[a-z]+$".into());
        assert!(check_value(&s, "abc").is_ok());
        assert!(check_value(&s, "ABC").unwrap_err().contains("pattern"));
        let mut a = prop("a", PropType::Array, "");
        a.items = Some(ItemsDef {
            item_type: PropType::String,
            enum_values: Some(vec![json!("x"), json!("y")]),
        });
        assert!(check_value(&a, "x, y").is_ok());
        assert!(check_value(&a, "x,z").is_err());
        let mut r = prop("r", PropType::Boolean, "");
        r.readonly = Some(true);
        assert!(check_value(&r, "true").unwrap_err().contains("read-only"));
    }

    #[test]
    fn definitions_are_checked() {
        let mut p = prop("x", PropType::Integer, "");
        p.minimum = Some(5.0);
        p.maximum = Some(1.0);
        assert!(check_def("x", &p).is_err());
        let mut s = prop("s", PropType::String, "");
        s.pattern = Some("(".into());
        assert!(check_def("s", &s).is_err());
        let mut d = prop("d", PropType::Integer, "");
        d.default = Some(json!("abc"));
        assert!(check_def("d", &d).is_err());
        for ns in standard_namespaces() {
            for (n, d) in ns.properties.iter().flatten() {
                check_def(n, d).unwrap();
            }
        }
    }
}
