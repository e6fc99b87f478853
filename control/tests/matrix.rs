//! Role/project matrix: every endpoint of the OpenAPI spec × {no token, other project,
//! reader, member, admin}, on SQLite and MariaDB; plus the spec ↔ router check.

mod common;

use axum::http::Method;
use common::{uuid_like, Backend, Harness};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Objects a row acts on (fresh for every row, so destructive rows do not interfere).
struct Fx {
    t: String,
    t_plain: String,
    tp: String,
    enc: String,
    ns: String,
    s: String,
    o: String,
    spare_token: String,
    q: String,
}

async fn fixture(h: &Harness, pa: &str, member: &str) -> Fx {
    let r = uuid_like();
    let t = h
        .create_type(
            json!({"name": format!("t-{r}"), "metadata": {"tier": "gold"},
            "extra_specs": {"volume_backend_name": "b", "multiattach": "<is> True"}}),
        )
        .await;
    let enc = h.create_luks_encryption(&t).await;
    let t_plain = h.create_type(json!({"name": format!("tp-{r}")})).await;
    let tp = h
        .create_type(json!({"name": format!("priv-{r}"), "is_public": false}))
        .await;
    let ns = format!("NS-{r}");
    h.admin_ok(
        Method::POST,
        "/v2/metadefs/namespaces",
        Some(json!({"namespace": ns, "visibility": "public",
            "properties": {"prop": {"title": "P", "type": "string"}},
            "resource_type_associations": [{"name": "OS::Cinder::Volume"}]})),
        201,
    )
    .await;
    h.admin_ok(
        Method::POST,
        &format!("/v2/metadefs/namespaces/{ns}/objects"),
        Some(json!({"name": "obj"})),
        201,
    )
    .await;
    h.admin_ok(
        Method::POST,
        &format!("/v2/metadefs/namespaces/{ns}/tags"),
        Some(json!({"tags": [{"name": "tag1"}]})),
        201,
    )
    .await;
    let s = h.create_text_secret(member, "pw").await;
    h.expect(
        Method::PUT,
        &format!("/v1/secrets/{s}/metadata"),
        Some(member),
        Some(json!({"metadata": {"k": "v"}})),
        201,
    )
    .await;
    let o = h.create_key_order(member).await;
    let (spare_token, _) = h.token(pa, "reader").await;
    let q = h
        .admin_ok(
            Method::POST,
            &format!("/v3/{pa}/qos-specs"),
            Some(json!({"qos_specs": {"name": format!("q-{r}"), "read_iops_sec": "100"}})),
            200,
        )
        .await["qos_specs"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    h.admin_ok(
        Method::GET,
        &format!("/v3/{pa}/qos-specs/{q}/associate?vol_type_id={t_plain}"),
        None,
        202,
    )
    .await;
    Fx {
        t,
        t_plain,
        tp,
        enc,
        ns,
        s,
        o,
        spare_token,
        q,
    }
}

/// (spec operation, concrete URI, body, expected status for [none, other, reader, member, admin]).
fn rows(pa: &str, f: &Fx) -> Vec<(&'static str, String, Option<Value>, [u16; 5])> {
    let r = uuid_like();
    let ty = format!("/v3/{pa}/types/{}", f.t);
    let ns = format!("/v2/metadefs/namespaces/{}", f.ns);
    const READ_ANY: [u16; 5] = [401, 200, 200, 200, 200];
    const READ_PROJ: [u16; 5] = [401, 403, 200, 200, 200];
    const ADMIN: fn(u16) -> [u16; 5] = |ok| [401, 403, 403, 403, ok];
    // An object of the URL's project that does not exist: read, change.
    const READ_OBJ: [u16; 5] = [401, 403, 404, 404, 404];
    const WRITE_OBJ: [u16; 5] = [401, 403, 403, 404, 404];
    // The member's secret: readable in its project, changed by its members; the admin
    // token is of another project (and not on the secret's ACL).
    const SECRET_READ: [u16; 5] = [401, 404, 200, 200, 404];
    const SECRET_WRITE: fn(u16) -> [u16; 5] = |ok| [401, 404, 403, ok, 404];
    let qs = format!("/v3/{pa}/qos-specs/{}", f.q);
    vec![
        (
            "POST /v3/projects",
            "/v3/projects".into(),
            Some(json!({"project": {"name": format!("p-{r}")}})),
            ADMIN(201),
        ),
        ("GET /v3/projects", "/v3/projects".into(), None, READ_ANY),
        (
            "GET /v3/projects/{project_id}",
            format!("/v3/projects/{pa}"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/projects/{project_id}/tokens",
            format!("/v3/projects/{pa}/tokens"),
            Some(json!({"token": {"role": "reader"}})),
            ADMIN(201),
        ),
        (
            "GET /v3/projects/{project_id}/tokens",
            format!("/v3/projects/{pa}/tokens"),
            None,
            ADMIN(200),
        ),
        (
            "DELETE /v3/projects/{project_id}/tokens/{token_id}",
            format!("/v3/projects/{pa}/tokens/{}", f.spare_token),
            None,
            ADMIN(204),
        ),
        (
            "GET /v3/auth/tokens",
            "/v3/auth/tokens".into(),
            None,
            READ_ANY,
        ),
        (
            "GET /v3/{project_id}/types",
            format!("/v3/{pa}/types"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/{project_id}/types",
            format!("/v3/{pa}/types"),
            Some(json!({"volume_type": {"name": format!("n-{r}")}})),
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/types/default",
            format!("/v3/{pa}/types/default"),
            None,
            READ_PROJ,
        ),
        (
            "GET /v3/{project_id}/types/{type_id}",
            ty.clone(),
            None,
            READ_PROJ,
        ),
        (
            "PUT /v3/{project_id}/types/{type_id}",
            ty.clone(),
            Some(json!({"volume_type": {"description": "d"}})),
            ADMIN(200),
        ),
        (
            "DELETE /v3/{project_id}/types/{type_id}",
            ty.clone(),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/extra_specs",
            format!("{ty}/extra_specs"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/{project_id}/types/{type_id}/extra_specs",
            format!("{ty}/extra_specs"),
            Some(json!({"extra_specs": {"k": "v"}})),
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/extra_specs/{key}",
            format!("{ty}/extra_specs/volume_backend_name"),
            None,
            [401, 403, 404, 404, 200],
        ),
        (
            "PUT /v3/{project_id}/types/{type_id}/extra_specs/{key}",
            format!("{ty}/extra_specs/k"),
            Some(json!({"k": "v"})),
            ADMIN(200),
        ),
        (
            "DELETE /v3/{project_id}/types/{type_id}/extra_specs/{key}",
            format!("{ty}/extra_specs/volume_backend_name"),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/metadata",
            format!("{ty}/metadata"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/{project_id}/types/{type_id}/metadata",
            format!("{ty}/metadata"),
            Some(json!({"metadata": {"a": "b"}})),
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/metadata/{key}",
            format!("{ty}/metadata/tier"),
            None,
            READ_PROJ,
        ),
        (
            "PUT /v3/{project_id}/types/{type_id}/metadata/{key}",
            format!("{ty}/metadata/tier"),
            Some(json!({"tier": "x"})),
            ADMIN(200),
        ),
        (
            "DELETE /v3/{project_id}/types/{type_id}/metadata/{key}",
            format!("{ty}/metadata/tier"),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/encryption",
            format!("{ty}/encryption"),
            None,
            ADMIN(200),
        ),
        (
            "POST /v3/{project_id}/types/{type_id}/encryption",
            format!("/v3/{pa}/types/{}/encryption", f.t_plain),
            Some(json!({"encryption": {"provider": "luks2"}})),
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/encryption/{encryption_id}",
            format!("{ty}/encryption/provider"),
            None,
            ADMIN(200),
        ),
        (
            "PUT /v3/{project_id}/types/{type_id}/encryption/{encryption_id}",
            format!("{ty}/encryption/{}", f.enc),
            Some(json!({"encryption": {"key_size": 256}})),
            ADMIN(200),
        ),
        (
            "DELETE /v3/{project_id}/types/{type_id}/encryption/{encryption_id}",
            format!("{ty}/encryption/{}", f.enc),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/types/{type_id}/os-volume-type-access",
            format!("/v3/{pa}/types/{}/os-volume-type-access", f.tp),
            None,
            [401, 403, 404, 404, 200],
        ),
        (
            "POST /v3/{project_id}/types/{type_id}/action",
            format!("/v3/{pa}/types/{}/action", f.tp),
            Some(json!({"addProjectAccess": {"project": pa}})),
            ADMIN(202),
        ),
        (
            "GET /v2/metadefs/namespaces",
            "/v2/metadefs/namespaces".into(),
            None,
            READ_ANY,
        ),
        (
            "POST /v2/metadefs/namespaces",
            "/v2/metadefs/namespaces".into(),
            Some(json!({"namespace": format!("new-{r}")})),
            ADMIN(201),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}",
            ns.clone(),
            None,
            READ_ANY,
        ),
        (
            "PUT /v2/metadefs/namespaces/{namespace}",
            ns.clone(),
            Some(json!({"description": "d"})),
            ADMIN(200),
        ),
        (
            "DELETE /v2/metadefs/namespaces/{namespace}",
            ns.clone(),
            None,
            ADMIN(204),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/properties",
            format!("{ns}/properties"),
            None,
            READ_ANY,
        ),
        (
            "POST /v2/metadefs/namespaces/{namespace}/properties",
            format!("{ns}/properties"),
            Some(json!({"name": "p2", "title": "t", "type": "string"})),
            ADMIN(201),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/properties/{property_name}",
            format!("{ns}/properties/prop"),
            None,
            READ_ANY,
        ),
        (
            "PUT /v2/metadefs/namespaces/{namespace}/properties/{property_name}",
            format!("{ns}/properties/prop"),
            Some(json!({"title": "t", "type": "string"})),
            ADMIN(200),
        ),
        (
            "DELETE /v2/metadefs/namespaces/{namespace}/properties/{property_name}",
            format!("{ns}/properties/prop"),
            None,
            ADMIN(204),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/resource_types",
            format!("{ns}/resource_types"),
            None,
            READ_ANY,
        ),
        (
            "POST /v2/metadefs/namespaces/{namespace}/resource_types",
            format!("{ns}/resource_types"),
            Some(json!({"name": "OS::Nova::Flavor"})),
            ADMIN(201),
        ),
        (
            "DELETE /v2/metadefs/namespaces/{namespace}/resource_types/{resource_type}",
            format!("{ns}/resource_types/OS::Cinder::Volume"),
            None,
            ADMIN(204),
        ),
        (
            "POST /v1/secrets",
            "/v1/secrets".into(),
            Some(json!({"payload": "x", "payload_content_type": "text/plain"})),
            [401, 201, 403, 201, 201],
        ),
        ("GET /v1/secrets", "/v1/secrets".into(), None, READ_ANY),
        (
            "GET /v1/secrets/{secret_id}",
            format!("/v1/secrets/{}", f.s),
            None,
            [401, 404, 200, 200, 404],
        ),
        (
            "DELETE /v1/secrets/{secret_id}",
            format!("/v1/secrets/{}", f.s),
            None,
            [401, 404, 403, 204, 404],
        ),
        (
            "GET /v1/secrets/{secret_id}/payload",
            format!("/v1/secrets/{}/payload", f.s),
            None,
            [401, 404, 403, 200, 404],
        ),
        (
            "POST /v1/orders",
            "/v1/orders".into(),
            Some(json!({"type": "key", "meta": {"algorithm": "aes", "bit_length": 256}})),
            [401, 202, 403, 202, 202],
        ),
        ("GET /v1/orders", "/v1/orders".into(), None, READ_ANY),
        (
            "GET /v1/orders/{order_id}",
            format!("/v1/orders/{}", f.o),
            None,
            [401, 404, 200, 200, 404],
        ),
        (
            "DELETE /v1/orders/{order_id}",
            format!("/v1/orders/{}", f.o),
            None,
            [401, 404, 403, 204, 404],
        ),
        (
            "GET /openapi.json",
            "/openapi.json".into(),
            None,
            [200, 200, 200, 200, 200],
        ),
        // Volumes and snapshots (issue 6). The harness has no data plane, so a create
        // that passes auth and validation ends in 503 (no storage pool on this node);
        // the per-object rows use an id that does not exist.
        (
            "GET /v3/{project_id}/volumes",
            format!("/v3/{pa}/volumes"),
            None,
            READ_PROJ,
        ),
        (
            "GET /v3/{project_id}/volumes/detail",
            format!("/v3/{pa}/volumes/detail"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/{project_id}/volumes",
            format!("/v3/{pa}/volumes"),
            Some(json!({"volume": {"size": 1}})),
            [401, 403, 403, 503, 503],
        ),
        (
            "GET /v3/{project_id}/volumes/{volume_id}",
            format!("/v3/{pa}/volumes/{r}"),
            None,
            [401, 403, 404, 404, 404],
        ),
        (
            "DELETE /v3/{project_id}/volumes/{volume_id}",
            format!("/v3/{pa}/volumes/{r}"),
            None,
            [401, 403, 403, 404, 404],
        ),
        (
            "POST /v3/{project_id}/volumes/{volume_id}/action",
            format!("/v3/{pa}/volumes/{r}/action"),
            Some(json!({"os-extend": {"new_size": 2}})),
            [401, 403, 403, 404, 404],
        ),
        (
            "GET /v3/{project_id}/manageable_volumes",
            format!("/v3/{pa}/manageable_volumes"),
            None,
            [401, 403, 403, 403, 200],
        ),
        (
            "GET /v3/{project_id}/manageable_volumes/detail",
            format!("/v3/{pa}/manageable_volumes/detail"),
            None,
            [401, 403, 403, 403, 200],
        ),
        (
            "POST /v3/{project_id}/manageable_volumes",
            format!("/v3/{pa}/manageable_volumes"),
            Some(json!({"volume": {"host": "array", "ref": {"source-name": "lun-1"}}})),
            // No LUN pool on the matrix's node.
            [401, 403, 403, 403, 400],
        ),
        (
            "GET /v3/{project_id}/volumes/{volume_id}/encryption",
            format!("/v3/{pa}/volumes/{r}/encryption"),
            None,
            [401, 403, 404, 404, 404],
        ),
        (
            "GET /v3/{project_id}/snapshots",
            format!("/v3/{pa}/snapshots"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/{project_id}/snapshots",
            format!("/v3/{pa}/snapshots"),
            Some(json!({"snapshot": {"volume_id": r}})),
            [401, 403, 403, 404, 404],
        ),
        (
            "GET /v3/{project_id}/snapshots/{snapshot_id}",
            format!("/v3/{pa}/snapshots/{r}"),
            None,
            [401, 403, 404, 404, 404],
        ),
        (
            "DELETE /v3/{project_id}/snapshots/{snapshot_id}",
            format!("/v3/{pa}/snapshots/{r}"),
            None,
            [401, 403, 403, 404, 404],
        ),
        // Database locks: admin only.
        // The OpenStack clients (issue 14). Version documents and schemas are public.
        ("GET /", "/".into(), None, [300; 5]),
        ("GET /v3", "/v3".into(), None, [200; 5]),
        ("GET /v1", "/v1".into(), None, [200; 5]),
        ("GET /v2", "/v2".into(), None, [200; 5]),
        ("GET /versions", "/versions".into(), None, [200; 5]),
        (
            "GET /v2/schemas/metadefs/{name}",
            "/v2/schemas/metadefs/namespace".into(),
            None,
            [200; 5],
        ),
        (
            "PUT /v3/{project_id}/volumes/{volume_id}",
            format!("/v3/{pa}/volumes/{r}"),
            Some(json!({"volume": {"name": "n"}})),
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/volumes/{volume_id}/metadata",
            format!("/v3/{pa}/volumes/{r}/metadata"),
            None,
            READ_OBJ,
        ),
        (
            "POST /v3/{project_id}/volumes/{volume_id}/metadata",
            format!("/v3/{pa}/volumes/{r}/metadata"),
            Some(json!({"metadata": {"a": "b"}})),
            WRITE_OBJ,
        ),
        (
            "PUT /v3/{project_id}/volumes/{volume_id}/metadata",
            format!("/v3/{pa}/volumes/{r}/metadata"),
            Some(json!({"metadata": {"a": "b"}})),
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/volumes/{volume_id}/metadata/{key}",
            format!("/v3/{pa}/volumes/{r}/metadata/k"),
            None,
            READ_OBJ,
        ),
        (
            "PUT /v3/{project_id}/volumes/{volume_id}/metadata/{key}",
            format!("/v3/{pa}/volumes/{r}/metadata/k"),
            Some(json!({"meta": {"k": "v"}})),
            WRITE_OBJ,
        ),
        (
            "DELETE /v3/{project_id}/volumes/{volume_id}/metadata/{key}",
            format!("/v3/{pa}/volumes/{r}/metadata/k"),
            None,
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/snapshots/detail",
            format!("/v3/{pa}/snapshots/detail"),
            None,
            READ_PROJ,
        ),
        (
            "PUT /v3/{project_id}/snapshots/{snapshot_id}",
            format!("/v3/{pa}/snapshots/{r}"),
            Some(json!({"snapshot": {"name": "n"}})),
            WRITE_OBJ,
        ),
        (
            "POST /v3/{project_id}/snapshots/{snapshot_id}/action",
            format!("/v3/{pa}/snapshots/{r}/action"),
            Some(json!({"os-reset_status": {"status": "error"}})),
            [401, 403, 403, 403, 404],
        ),
        (
            "GET /v3/{project_id}/snapshots/{snapshot_id}/metadata",
            format!("/v3/{pa}/snapshots/{r}/metadata"),
            None,
            READ_OBJ,
        ),
        (
            "POST /v3/{project_id}/snapshots/{snapshot_id}/metadata",
            format!("/v3/{pa}/snapshots/{r}/metadata"),
            Some(json!({"metadata": {"a": "b"}})),
            WRITE_OBJ,
        ),
        (
            "PUT /v3/{project_id}/snapshots/{snapshot_id}/metadata",
            format!("/v3/{pa}/snapshots/{r}/metadata"),
            Some(json!({"metadata": {"a": "b"}})),
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/snapshots/{snapshot_id}/metadata/{key}",
            format!("/v3/{pa}/snapshots/{r}/metadata/k"),
            None,
            READ_OBJ,
        ),
        (
            "PUT /v3/{project_id}/snapshots/{snapshot_id}/metadata/{key}",
            format!("/v3/{pa}/snapshots/{r}/metadata/k"),
            Some(json!({"meta": {"k": "v"}})),
            WRITE_OBJ,
        ),
        (
            "DELETE /v3/{project_id}/snapshots/{snapshot_id}/metadata/{key}",
            format!("/v3/{pa}/snapshots/{r}/metadata/k"),
            None,
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/attachments",
            format!("/v3/{pa}/attachments"),
            None,
            READ_PROJ,
        ),
        (
            "GET /v3/{project_id}/attachments/detail",
            format!("/v3/{pa}/attachments/detail"),
            None,
            READ_PROJ,
        ),
        (
            "POST /v3/{project_id}/attachments",
            format!("/v3/{pa}/attachments"),
            Some(json!({"attachment": {"volume_uuid": r, "connector": null}})),
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/attachments/{attachment_id}",
            format!("/v3/{pa}/attachments/{r}"),
            None,
            READ_OBJ,
        ),
        (
            "PUT /v3/{project_id}/attachments/{attachment_id}",
            format!("/v3/{pa}/attachments/{r}"),
            Some(json!({"attachment": {"connector": {}}})),
            WRITE_OBJ,
        ),
        (
            "DELETE /v3/{project_id}/attachments/{attachment_id}",
            format!("/v3/{pa}/attachments/{r}"),
            None,
            WRITE_OBJ,
        ),
        (
            "POST /v3/{project_id}/attachments/{attachment_id}/action",
            format!("/v3/{pa}/attachments/{r}/action"),
            Some(json!({"os-complete": null})),
            WRITE_OBJ,
        ),
        (
            "GET /v3/{project_id}/qos-specs",
            format!("/v3/{pa}/qos-specs"),
            None,
            ADMIN(200),
        ),
        (
            "POST /v3/{project_id}/qos-specs",
            format!("/v3/{pa}/qos-specs"),
            Some(json!({"qos_specs": {"name": format!("q2-{r}"), "read_iops_sec": "10"}})),
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/qos-specs/{qos_id}",
            qs.clone(),
            None,
            ADMIN(200),
        ),
        (
            "PUT /v3/{project_id}/qos-specs/{qos_id}",
            qs.clone(),
            Some(json!({"qos_specs": {"write_iops_sec": "5"}})),
            ADMIN(200),
        ),
        (
            "DELETE /v3/{project_id}/qos-specs/{qos_id}",
            format!("{qs}?force=True"),
            None,
            ADMIN(202),
        ),
        (
            "PUT /v3/{project_id}/qos-specs/{qos_id}/delete_keys",
            format!("{qs}/delete_keys"),
            Some(json!({"keys": ["read_iops_sec"]})),
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/qos-specs/{qos_id}/associations",
            format!("{qs}/associations"),
            None,
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/qos-specs/{qos_id}/associate",
            format!("{qs}/associate?vol_type_id={}", f.t),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/qos-specs/{qos_id}/disassociate",
            format!("{qs}/disassociate?vol_type_id={}", f.t_plain),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/qos-specs/{qos_id}/disassociate_all",
            format!("{qs}/disassociate_all"),
            None,
            ADMIN(202),
        ),
        (
            "GET /v3/{project_id}/os-services",
            format!("/v3/{pa}/os-services"),
            None,
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/clusters",
            format!("/v3/{pa}/clusters"),
            None,
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/clusters/detail",
            format!("/v3/{pa}/clusters/detail"),
            None,
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/clusters/{cluster_name}",
            format!("/v3/{pa}/clusters/ember"),
            None,
            ADMIN(200),
        ),
        (
            "GET /v3/{project_id}/limits",
            format!("/v3/{pa}/limits"),
            None,
            READ_PROJ,
        ),
        (
            "GET /v1/secrets/{secret_id}/acl",
            format!("/v1/secrets/{}/acl", f.s),
            None,
            SECRET_READ,
        ),
        (
            "PUT /v1/secrets/{secret_id}/acl",
            format!("/v1/secrets/{}/acl", f.s),
            Some(json!({"read": {"users": [], "project-access": true}})),
            SECRET_WRITE(200),
        ),
        (
            "PATCH /v1/secrets/{secret_id}/acl",
            format!("/v1/secrets/{}/acl", f.s),
            Some(json!({"read": {"project-access": true}})),
            SECRET_WRITE(200),
        ),
        (
            "DELETE /v1/secrets/{secret_id}/acl",
            format!("/v1/secrets/{}/acl", f.s),
            None,
            SECRET_WRITE(200),
        ),
        (
            "GET /v1/secrets/{secret_id}/metadata",
            format!("/v1/secrets/{}/metadata", f.s),
            None,
            SECRET_READ,
        ),
        (
            "PUT /v1/secrets/{secret_id}/metadata",
            format!("/v1/secrets/{}/metadata", f.s),
            Some(json!({"metadata": {"a": "b"}})),
            SECRET_WRITE(201),
        ),
        (
            "POST /v1/secrets/{secret_id}/metadata",
            format!("/v1/secrets/{}/metadata", f.s),
            Some(json!({"key": "k2", "value": "v"})),
            SECRET_WRITE(201),
        ),
        (
            "GET /v1/secrets/{secret_id}/metadata/{key}",
            format!("/v1/secrets/{}/metadata/k", f.s),
            None,
            SECRET_READ,
        ),
        (
            "POST /v1/secrets/{secret_id}/metadata/{key}",
            format!("/v1/secrets/{}/metadata/k", f.s),
            Some(json!({"key": "k", "value": "v2"})),
            SECRET_WRITE(201),
        ),
        (
            "PUT /v1/secrets/{secret_id}/metadata/{key}",
            format!("/v1/secrets/{}/metadata/k", f.s),
            Some(json!({"key": "k", "value": "v2"})),
            SECRET_WRITE(200),
        ),
        (
            "DELETE /v1/secrets/{secret_id}/metadata/{key}",
            format!("/v1/secrets/{}/metadata/k", f.s),
            None,
            SECRET_WRITE(204),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/objects",
            format!("{ns}/objects"),
            None,
            READ_ANY,
        ),
        (
            "POST /v2/metadefs/namespaces/{namespace}/objects",
            format!("{ns}/objects"),
            Some(json!({"name": "o2"})),
            ADMIN(201),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/objects/{object_name}",
            format!("{ns}/objects/obj"),
            None,
            READ_ANY,
        ),
        (
            "PUT /v2/metadefs/namespaces/{namespace}/objects/{object_name}",
            format!("{ns}/objects/obj"),
            Some(json!({"name": "obj", "description": "d"})),
            ADMIN(200),
        ),
        (
            "DELETE /v2/metadefs/namespaces/{namespace}/objects/{object_name}",
            format!("{ns}/objects/obj"),
            None,
            ADMIN(204),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/tags",
            format!("{ns}/tags"),
            None,
            READ_ANY,
        ),
        (
            "POST /v2/metadefs/namespaces/{namespace}/tags",
            format!("{ns}/tags"),
            Some(json!({"tags": [{"name": "t2"}]})),
            ADMIN(201),
        ),
        (
            "DELETE /v2/metadefs/namespaces/{namespace}/tags",
            format!("{ns}/tags"),
            None,
            ADMIN(204),
        ),
        (
            "GET /v2/metadefs/namespaces/{namespace}/tags/{tag_name}",
            format!("{ns}/tags/tag1"),
            None,
            READ_ANY,
        ),
        (
            "POST /v2/metadefs/namespaces/{namespace}/tags/{tag_name}",
            format!("{ns}/tags/tag3"),
            None,
            ADMIN(201),
        ),
        (
            "PUT /v2/metadefs/namespaces/{namespace}/tags/{tag_name}",
            format!("{ns}/tags/tag1"),
            Some(json!({"name": "tag9"})),
            ADMIN(200),
        ),
        (
            "DELETE /v2/metadefs/namespaces/{namespace}/tags/{tag_name}",
            format!("{ns}/tags/tag1"),
            None,
            ADMIN(204),
        ),
        (
            "GET /v2/metadefs/resource_types",
            "/v2/metadefs/resource_types".into(),
            None,
            READ_ANY,
        ),
        ("GET /v3/locks", "/v3/locks".into(), None, ADMIN(200)),
        (
            "GET /v3/locks/history",
            "/v3/locks/history?resource_id=x".into(),
            None,
            ADMIN(200),
        ),
        (
            "POST /v3/locks",
            "/v3/locks".into(),
            Some(json!({"lock": {"resource_type": "volume", "resource_id": r, "mode": "shared"}})),
            ADMIN(201),
        ),
        (
            "GET /v3/locks/{holder_id}",
            format!("/v3/locks/{r}"),
            None,
            ADMIN(404),
        ),
        (
            "PUT /v3/locks/{holder_id}",
            format!("/v3/locks/{r}"),
            None,
            ADMIN(404),
        ),
        (
            "DELETE /v3/locks/{holder_id}",
            format!("/v3/locks/{r}"),
            None,
            ADMIN(404),
        ),
    ]
}

fn spec_operations() -> BTreeSet<String> {
    let spec = serde_json::to_value(ember_control::openapi::spec()).unwrap();
    let mut ops = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"].contains(&m.as_str()) {
                ops.insert(format!("{} {path}", m.to_uppercase()));
            }
        }
    }
    ops
}

async fn matrix(backend: Backend) {
    let h = Harness::new(backend).await;
    let pa = h.project("alpha").await;
    let pb = h.project("beta").await;
    let (_, member) = h.token(&pa, "member").await;
    let (_, reader) = h.token(&pa, "reader").await;
    let (_, other) = h.token(&pb, "member").await;
    let personas: [(&str, Option<&str>); 5] = [
        ("none", None),
        ("other", Some(&other)),
        ("reader", Some(&reader)),
        ("member", Some(&member)),
        ("admin", Some(&h.admin)),
    ];

    let dummy = Fx {
        t: String::new(),
        t_plain: String::new(),
        tp: String::new(),
        enc: String::new(),
        ns: String::new(),
        s: String::new(),
        o: String::new(),
        spare_token: String::new(),
        q: String::new(),
    };
    let covered: BTreeSet<String> = rows(&pa, &dummy).iter().map(|r| r.0.to_string()).collect();
    assert_eq!(
        covered,
        spec_operations(),
        "the matrix must cover exactly the operations of the OpenAPI spec"
    );

    let n = rows(&pa, &dummy).len();
    let mut failures = Vec::new();
    for i in 0..n {
        let f = fixture(&h, &pa, &member).await;
        let (op, uri, body, want) = rows(&pa, &f).swap_remove(i);
        let method: Method = op.split(' ').next().unwrap().parse().unwrap();
        for ((who, token), want) in personas.iter().zip(want) {
            // The newest microversion, so that every route of it is reached.
            let (s, v) = h
                .call_with(
                    method.clone(),
                    &uri,
                    *token,
                    body.clone(),
                    &[("openstack-api-version", "volume 3.71")],
                )
                .await;
            if s.as_u16() != want {
                failures.push(format!("{op} as {who}: got {s}, want {want}: {v}"));
            } else if s.as_u16() >= 400 {
                // Every error has the Cinder body.
                let fault = ember_control::error::fault_name(s);
                if v[fault]["code"] != want {
                    failures.push(format!(
                        "{op} as {who}: error body is not Cinder-shaped: {v}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} matrix failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    h.finish().await;
}

backend_tests!(matrix => role_matrix_sqlite, role_matrix_mariadb);

/// Every spec operation reaches a handler (not the fallback, not 405), and every
/// handler in the router is in the spec: routes are only added via `routes!` (which
/// needs a `#[utoipa::path]` and registers it), and each annotated handler is registered.
#[tokio::test]
async fn openapi_matches_router() {
    let h = Harness::new(Backend::Sqlite).await;
    let ops = spec_operations();
    for op in &ops {
        let (m, path) = op.split_once(' ').unwrap();
        let uri = path.replace('{', "x").replace('}', "");
        let (s, v) = h.call(m.parse().unwrap(), &uri, Some(&h.admin), None).await;
        assert_ne!(s, 405, "{op}: method not routed");
        let routed = !(s == 404 && v["itemNotFound"]["message"] == ember_control::api::NO_ROUTE);
        assert!(routed, "{op}: no route in the router");
    }
    // Served spec equals the generated one.
    let (s, served) = h.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(
        served,
        serde_json::to_value(ember_control::openapi::spec()).unwrap()
    );
    // Source check: every #[utoipa::path] handler is registered, nothing bypasses routes!.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut annotated = 0;
    let mut dirs = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(path).unwrap();
            annotated += text.matches("#[utoipa::path(").count();
        }
    }
    assert_eq!(
        annotated,
        ops.len(),
        "each #[utoipa::path] handler must be registered exactly once"
    );
    let router_src = std::fs::read_to_string(src.join("openapi.rs")).unwrap();
    for forbidden in [".route(", ".nest(", ".route_service(", ".nest_service("] {
        assert!(
            !router_src.contains(forbidden),
            "openapi.rs must register routes only through routes!: found {forbidden}"
        );
    }
    h.finish().await;
}
