//! The JSON schemas of the metadefs documents (`GET /v2/schemas/metadefs/{name}`), as
//! glanceclient fetches them before its first call and validates every answer against
//! them (warlock models). They describe exactly what Ember answers: the namespace,
//! property, object, tag and resource-type association views of [`super`], and their
//! lists.

use crate::error::{ApiError, ApiResult};
use axum::extract::Path;
use axum::Json;
use serde_json::{json, Value};

/// The value types a property definition may name (Glance's list; Ember stores the
/// first five and refuses `object` and `null` with a 400).
const TYPES: [&str; 7] = [
    "array", "boolean", "integer", "number", "object", "string", "null",
];

fn stamp() -> Value {
    json!({"type": "string", "format": "date-time", "readOnly": true})
}

/// A property definition.
fn property() -> Value {
    json!({
        "name": "property",
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 80},
            "title": {"type": "string"},
            "description": {"type": "string"},
            "operators": {"type": "array", "items": {"type": "string"}},
            "type": {"type": "string", "enum": TYPES},
            "required": {"type": "array", "items": {"type": "string"}},
            "minimum": {"type": "number"},
            "maximum": {"type": "number"},
            "maxLength": {"type": "integer", "minimum": 0},
            "minLength": {"type": "integer", "minimum": 0},
            "pattern": {"type": "string", "format": "regex"},
            "enum": {"type": "array"},
            "readonly": {"type": "boolean"},
            "default": {},
            "items": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": TYPES},
                    "enum": {"type": "array"},
                },
            },
            "maxItems": {"type": "integer", "minimum": 0},
            "minItems": {"type": "integer", "minimum": 0},
            "uniqueItems": {"type": "boolean"},
            "additionalItems": {"type": "boolean"},
        },
        "required": ["type", "title"],
        "additionalProperties": false,
    })
}

/// A property definition inside a namespace or object (no `name`: it is the key).
fn property_value() -> Value {
    let mut p = property();
    if let Some(o) = p.as_object_mut() {
        o.remove("name");
    }
    p
}

fn association() -> Value {
    json!({
        "name": "resource_type_association",
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 80},
            "prefix": {"type": "string", "maxLength": 80},
            "properties_target": {"type": "string", "maxLength": 80},
            "created_at": stamp(),
            "updated_at": stamp(),
        },
        "required": ["name"],
        "additionalProperties": false,
    })
}

fn object() -> Value {
    json!({
        "name": "object",
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 80},
            "description": {"type": "string"},
            "required": {"type": "array", "items": {"type": "string"}},
            "properties": {"type": "object", "additionalProperties": property_value()},
            "schema": {"type": "string", "readOnly": true},
            "self": {"type": "string", "readOnly": true},
            "created_at": stamp(),
            "updated_at": stamp(),
        },
        "required": ["name"],
        "additionalProperties": false,
    })
}

fn tag() -> Value {
    json!({
        "name": "tag",
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 255},
            "created_at": stamp(),
            "updated_at": stamp(),
        },
        "required": ["name"],
        "additionalProperties": false,
    })
}

fn namespace() -> Value {
    json!({
        "name": "namespace",
        "type": "object",
        "properties": {
            "namespace": {"type": "string", "maxLength": 80},
            "display_name": {"type": "string", "maxLength": 80},
            "description": {"type": "string", "maxLength": 500},
            "visibility": {"type": "string", "enum": ["public", "private"]},
            "protected": {"type": "boolean"},
            "owner": {"type": "string", "maxLength": 255},
            "created_at": stamp(),
            "updated_at": stamp(),
            "schema": {"type": "string", "readOnly": true},
            "self": {"type": "string", "readOnly": true},
            "resource_type_associations": {"type": "array", "items": association()},
            "properties": {"type": "object", "additionalProperties": property_value()},
            "objects": {"type": "array", "items": object()},
            "tags": {"type": "array", "items": tag()},
        },
        "required": ["namespace"],
        "additionalProperties": false,
    })
}

fn plural(name: &str, item: Value) -> Value {
    json!({
        "name": name,
        "type": "object",
        "properties": {
            name: {"type": "array", "items": item},
            "first": {"type": "string"},
            "next": {"type": "string"},
            "schema": {"type": "string"},
        },
        "links": [
            {"rel": "first", "href": "{first}"},
            {"rel": "next", "href": "{next}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    })
}

/// The names [`schema`] answers (each document and its list).
pub const NAMES: [&str; 10] = [
    "namespace",
    "namespaces",
    "property",
    "properties",
    "object",
    "objects",
    "tag",
    "tags",
    "resource_type",
    "resource_types",
];

/// The schema document `name` (`namespace`, `namespaces`, `property`, …).
pub fn schema(name: &str) -> Option<Value> {
    Some(match name {
        "namespace" => namespace(),
        "namespaces" => plural("namespaces", namespace()),
        "property" => property(),
        "properties" => plural("properties", property()),
        "object" => object(),
        "objects" => plural("objects", object()),
        "tag" => tag(),
        "tags" => plural("tags", tag()),
        "resource_type" => association(),
        "resource_types" => plural("resource_type_associations", association()),
        _ => return None,
    })
}

#[utoipa::path(get, path = "/v2/schemas/metadefs/{name}", tag = "metadefs", security(()),
    params(("name" = String, Path, description = "namespace(s), property/properties, object(s), tag(s), resource_type(s)")),
    responses((status = 200, description = "the JSON schema of that document"),
        (status = 404, description = "no such schema")))]
pub async fn show_schema(Path(name): Path<String>) -> ApiResult<Json<Value>> {
    schema(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no metadefs schema {name:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_is_an_object_schema() {
        for n in NAMES {
            let s = schema(n).unwrap();
            assert_eq!(s["type"], "object", "{n}");
            assert!(s["properties"].is_object(), "{n}");
        }
        assert!(schema("image").is_none());
    }
}
