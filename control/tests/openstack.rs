//! What the OpenStack clients need of the API, in process (`router().oneshot()`, the
//! in-memory data plane): version documents and service prefixes, microversion
//! negotiation, Cinder's lenient-but-typed bodies, volume and snapshot updates,
//! metadata, listings, admin actions, the attachments API, QoS specs, services,
//! clusters and limits, Barbican ACLs and secret metadata, Glance metadefs objects,
//! tags and schemas. `tests/openstack.rs` runs the real clients end to end.

mod common;

use axum::http::{Method, StatusCode};
use common::{
    assert_fault, fields, ref_id, wait_while, Backend, Harness, DELETE, GET, GIB, PATCH, POST, PUT,
};
use ember_control::dataplane::mem::{MemDataPlane, Op};
use ember_control::dataplane::DataPlaneError;
use serde_json::{json, Value};
use std::sync::Arc;

/// A node with a 100 GiB pool, a project `p` with a member token, another project's
/// member.
struct Fx {
    h: Harness,
    dp: Arc<MemDataPlane>,
    p: String,
    tok: String,
    tok_id: String,
    other: String,
    other_id: String,
}

async fn fx_on(backend: Backend) -> Fx {
    let dp = Arc::new(MemDataPlane::new().with_pool("default", 100 * GIB));
    let h = Harness::with_dataplane(backend, dp.clone()).await;
    let p = h.project("os").await;
    let (tok_id, tok) = h.token(&p, "member").await;
    let q = h.project("other").await;
    let (other_id, other) = h.token(&q, "member").await;
    Fx {
        h,
        dp,
        p,
        tok,
        tok_id,
        other,
        other_id,
    }
}

async fn fx() -> Fx {
    fx_on(Backend::Sqlite).await
}

/// A request with headers; (status, headers, JSON body).
async fn req(
    h: &Harness,
    m: Method,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, axum::http::HeaderMap, Value) {
    let mut all = vec![("host", "ember.test:8776")];
    all.extend_from_slice(headers);
    let body = body
        .map(|v| serde_json::to_vec(&v).unwrap())
        .unwrap_or_default();
    let (s, hd, bytes) = h.send(m, uri, token, &all, body).await;
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (s.as_u16(), hd, v)
}

const MV: (&str, &str) = ("openstack-api-version", "volume 3.71");

impl Fx {
    fn v3(&self, rest: &str) -> String {
        format!("/v3/{}{rest}", self.p)
    }

    async fn call(&self, m: Method, uri: &str, body: Option<Value>) -> (u16, Value) {
        let (s, _, v) = req(&self.h, m, uri, Some(&self.tok), &[MV], body).await;
        (s, v)
    }

    async fn ok(&self, m: Method, uri: &str, body: Option<Value>, want: u16) -> Value {
        let (s, v) = self.call(m.clone(), uri, body).await;
        assert_eq!(s, want, "{m} {uri}: {v}");
        v
    }

    async fn admin(&self, m: Method, uri: &str, body: Option<Value>, want: u16) -> Value {
        let (s, _, v) = req(&self.h, m.clone(), uri, Some(&self.h.admin), &[MV], body).await;
        assert_eq!(s, want, "{m} {uri} (admin): {v}");
        v
    }

    /// 400 (or `want`) naming `needle`.
    async fn fault(&self, m: Method, uri: &str, body: Option<Value>, want: u16, needle: &str) {
        let v = self.ok(m, uri, body, want).await;
        let fault = ember_control::error::fault_name(StatusCode::from_u16(want).unwrap());
        assert_fault(&v, want, fault, needle);
    }

    async fn wait(&self, uri: &str, key: &str) -> Value {
        wait_while("creating", || async {
            self.ok(GET, uri, None, 200).await[key].clone()
        })
        .await
    }

    /// A volume of `size` GiB (more fields in `extra`), available; its id.
    async fn volume(&self, name: &str, extra: Value) -> String {
        let mut body = json!({"size": 1, "name": name});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let v = self
            .ok(
                POST,
                &self.v3("/volumes"),
                Some(json!({ "volume": body })),
                202,
            )
            .await;
        let id = v["volume"]["id"].as_str().unwrap().to_string();
        let v = self
            .wait(&self.v3(&format!("/volumes/{id}")), "volume")
            .await;
        assert_eq!(v["status"], "available", "{v}");
        id
    }

    async fn status(&self, id: &str) -> Value {
        self.ok(GET, &self.v3(&format!("/volumes/{id}")), None, 200)
            .await["volume"]["status"]
            .clone()
    }
}

// ---------------------------------------------------------------------------------------
// Versions, prefixes, microversions

#[tokio::test]
async fn version_documents_and_prefixes() {
    let f = fx().await;
    let h = &f.h;
    // The bare root: Barbican first (barbicanclient reads entry 0), Cinder second
    // (cinderclient looks for a 3.x `version`).
    let (s, _, v) = req(h, GET, "/", None, &[], None).await;
    assert_eq!(s, 300);
    assert_eq!(v["versions"][0]["id"], "v1");
    assert_eq!(v["versions"][0]["max_version"], "1.0");
    assert_eq!(v["versions"][1]["id"], "v3.0");
    assert_eq!(v["versions"][1]["version"], "3.71");
    assert_eq!(v["versions"][1]["min_version"], "3.0");
    // Each prefix answers its own document, with links that keep the prefix.
    let (s, _, v) = req(h, GET, "/volume", None, &[], None).await;
    assert_eq!((s, v["versions"].as_array().unwrap().len()), (300, 1));
    assert_eq!(
        v["versions"][0]["links"][0]["href"],
        "http://ember.test:8776/volume/v3/"
    );
    let (s, _, v) = req(h, GET, "/key-manager/", None, &[], None).await;
    assert_eq!(s, 300);
    assert_eq!(v["versions"]["values"][0]["id"], "v1");
    for uri in ["/key-manager/v1", "/v1", "/v1/"] {
        let (s, _, v) = req(h, GET, uri, None, &[], None).await;
        assert_eq!(
            (s, &v["version"]["min_version"]),
            (200, &json!("1.0")),
            "{uri}"
        );
    }
    for uri in [
        "/image",
        "/image/versions",
        "/versions",
        "/image/v2",
        "/v2/",
    ] {
        let (s, _, v) = req(h, GET, uri, None, &[], None).await;
        assert!(s == 200 || s == 300, "{uri}: {s}");
        assert_eq!(v["versions"][0]["status"], "CURRENT", "{uri}");
    }
    let (s, _, v) = req(h, GET, "/v3/", None, &[], None).await;
    assert_eq!((s, &v["versions"][0]["version"]), (200, &json!("3.71")));
    // A path of another API under a prefix is no route.
    for uri in [
        "/volume/v1/secrets",
        "/key-manager/v3/auth/tokens",
        "/image/v1",
    ] {
        let (s, _, v) = req(h, GET, uri, Some(&f.tok), &[], None).await;
        assert_eq!(s, 404, "{uri}");
        assert_eq!(v["itemNotFound"]["message"], ember_control::api::NO_ROUTE);
    }
    // The same API under its prefix, trailing slashes trimmed; links keep the prefix.
    let (s, _, v) = req(
        h,
        POST,
        "/key-manager/v1/secrets/",
        Some(&f.tok),
        &[],
        Some(json!({"payload": "pw", "payload_content_type": "text/plain"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert!(
        v["secret_ref"]
            .as_str()
            .unwrap()
            .starts_with("http://ember.test:8776/key-manager/v1/secrets/"),
        "{v}"
    );
    let (s, _, v) = req(
        h,
        GET,
        &format!("/volume/v3/{}/volumes/detail/", f.p),
        Some(&f.tok),
        &[],
        None,
    )
    .await;
    assert_eq!((s, &v["volumes"]), (200, &json!([])));
    let (s, _, v) = req(
        h,
        GET,
        "/image/v2/metadefs/namespaces",
        Some(&f.tok),
        &[],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["namespaces"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn microversion_negotiation() {
    let f = fx().await;
    let h = &f.h;
    let url = f.v3("/volumes");
    // None asked: 3.0, echoed.
    let (s, hd, _) = req(h, GET, &url, Some(&f.tok), &[], None).await;
    assert_eq!(s, 200);
    assert_eq!(hd["openstack-api-version"], "volume 3.0");
    assert!(hd
        .get_all("vary")
        .iter()
        .any(|v| v == "OpenStack-API-Version"));
    for (header, value, echo) in [
        ("openstack-api-version", "volume 3.27", "volume 3.27"),
        ("openstack-api-version", "volume latest", "volume 3.71"),
        (
            "openstack-api-version",
            "compute 2.1, volume 3.5",
            "volume 3.5",
        ),
        ("x-openstack-volume-api-version", "3.44", "volume 3.44"),
    ] {
        let (s, hd, v) = req(h, GET, &url, Some(&f.tok), &[(header, value)], None).await;
        assert_eq!(s, 200, "{value}: {v}");
        assert_eq!(hd["openstack-api-version"], echo, "{value}");
    }
    let (_, hd, _) = req(
        h,
        GET,
        &url,
        Some(&f.tok),
        &[("x-openstack-volume-api-version", "3.44")],
        None,
    )
    .await;
    assert_eq!(hd["x-openstack-volume-api-version"], "3.44");
    // Outside the range: 406 as Cinder answers; malformed: 400.
    for v in ["volume 3.72", "volume 2.0", "volume 4.0"] {
        let (s, _, body) = req(
            h,
            GET,
            &url,
            Some(&f.tok),
            &[("openstack-api-version", v)],
            None,
        )
        .await;
        assert_eq!(s, 406, "{v}");
        assert_fault(&body, 406, "notAcceptable", "maximum is 3.71");
    }
    let (s, _, body) = req(
        h,
        GET,
        &url,
        Some(&f.tok),
        &[("openstack-api-version", "volume 3.x")],
        None,
    )
    .await;
    assert_eq!(s, 400);
    assert_fault(&body, 400, "badRequest", "MAJOR.MINOR");
    // Routes of later versions: 404 below them.
    let (s, _, body) = req(
        h,
        GET,
        &f.v3("/attachments"),
        Some(&f.tok),
        &[("openstack-api-version", "volume 3.26")],
        None,
    )
    .await;
    assert_eq!(s, 404);
    assert_fault(&body, 404, "itemNotFound", "3.27");
    let (s, _, _) = req(
        h,
        GET,
        &f.v3("/clusters"),
        Some(&h.admin),
        &[("openstack-api-version", "volume 3.6")],
        None,
    )
    .await;
    assert_eq!(s, 404);
    // Barbican: 1.0 only; its errors carry Barbican's fields beside Cinder's.
    let (s, hd, body) = req(
        h,
        GET,
        "/v1/secrets",
        Some(&f.tok),
        &[("openstack-api-version", "key-manager 1.1")],
        None,
    )
    .await;
    assert_eq!(s, 406);
    assert!(hd.get("openstack-api-version").is_none());
    assert_eq!(body["code"], 406);
    assert_eq!(body["title"], "Not Acceptable");
    assert!(body["description"]
        .as_str()
        .unwrap()
        .contains("maximum is 1.0"));
    assert_eq!(body["notAcceptable"]["code"], 406);
    let (s, hd, _) = req(
        h,
        GET,
        "/v1/secrets",
        Some(&f.tok),
        &[("openstack-api-version", "key-manager 1.0")],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(hd["openstack-api-version"], "key-manager 1.0");
    // Version documents are not held to the range (barbicanclient asks for 1.1 there).
    let (s, _, _) = req(
        h,
        GET,
        "/key-manager/v1",
        None,
        &[("openstack-api-version", "key-manager 1.1")],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, body) = req(h, GET, "/v1/secrets/nope", Some(&f.tok), &[], None).await;
    assert_eq!(s, 404);
    assert_eq!(body["title"], "Not Found");
    assert_eq!(body["itemNotFound"]["code"], 404);
}

// ---------------------------------------------------------------------------------------
// Cinder

#[tokio::test]
async fn volume_bodies_lenient_and_typed() {
    let f = fx().await;
    // What cinderclient 9.x sends: every field it knows, most of them null.
    let body = json!({"volume": {"size": "1", "consistencygroup_id": null, "snapshot_id": null,
        "name": "cc", "description": null, "volume_type": null, "availability_zone": null,
        "metadata": {"a": "1"}, "imageRef": null, "source_volid": null, "backup_id": null,
        "group_id": null, "multiattach": false, "scheduler_hints": null},
        "OS-SCH-HNT:scheduler_hints": {"same_host": []}});
    let v = f.ok(POST, &f.v3("/volumes"), Some(body), 202).await;
    assert_eq!(v["volume"]["metadata"], json!({"a": "1"}));
    assert_eq!(v["volume"]["size"], 1);
    // Non-null fields Ember cannot honour, and wrong types or values: 400 naming them.
    let bad = [
        (json!({"size": 1, "imageRef": "img"}), "imageRef"),
        (json!({"size": 1, "backup_id": "b"}), "backup_id"),
        (
            json!({"size": 1, "consistencygroup_id": "c"}),
            "consistencygroup_id",
        ),
        (json!({"size": 1, "group_id": "g"}), "group_id"),
        (
            json!({"size": 1, "availability_zone": "nova"}),
            "availability_zone",
        ),
        (json!({"size": "abc"}), "volume.size"),
        (json!({"size": -1}), "volume.size"),
        (
            json!({"size": 1, "multiattach": "maybe"}),
            "volume.multiattach",
        ),
        (
            json!({"size": 1, "metadata": {"k": 1}}),
            "volume.metadata.k",
        ),
        (
            json!({"size": 1, "metadata": {"k": "v".repeat(256)}}),
            "volume.metadata.k",
        ),
        (json!({"size": 1, "colour": "red"}), "colour"),
        (json!({"size": 1, "name": 5}), "volume.name"),
    ];
    for (b, needle) in bad {
        f.fault(
            POST,
            &f.v3("/volumes"),
            Some(json!({ "volume": b })),
            400,
            needle,
        )
        .await;
    }
    // display_description, Cinder's v1 spelling, is the description.
    let id = f.volume("x", json!({"display_description": "old"})).await;
    let v = f.ok(GET, &f.v3(&format!("/volumes/{id}")), None, 200).await;
    assert_eq!(v["volume"]["description"], "old");
}

#[tokio::test]
async fn volume_update_metadata_and_listing() {
    let f = fx().await;
    let a = f
        .volume("alpha", json!({"metadata": {"tier": "gold"}}))
        .await;
    let b = f.volume("bravo", json!({"size": 3})).await;
    let c = f
        .volume("charlie", json!({"metadata": {"tier": "silver"}}))
        .await;
    // Update.
    let v = f
        .ok(
            PUT,
            &f.v3(&format!("/volumes/{a}")),
            Some(json!({"volume": {"name": "alpha2", "description": "d"}})),
            200,
        )
        .await;
    assert_eq!(
        (&v["volume"]["name"], &v["volume"]["description"]),
        (&json!("alpha2"), &json!("d"))
    );
    f.fault(
        PUT,
        &f.v3(&format!("/volumes/{a}")),
        Some(json!({"volume": {}})),
        400,
        "at least one",
    )
    .await;
    // Metadata routes.
    let m = f.v3(&format!("/volumes/{a}/metadata"));
    let v = f
        .ok(POST, &m, Some(json!({"metadata": {"k": "v"}})), 200)
        .await;
    assert_eq!(v["metadata"], json!({"tier": "gold", "k": "v"}));
    let v = f
        .ok(PUT, &m, Some(json!({"metadata": {"only": "this"}})), 200)
        .await;
    assert_eq!(v["metadata"], json!({"only": "this"}));
    let v = f.ok(GET, &format!("{m}/only"), None, 200).await;
    assert_eq!(v["meta"], json!({"only": "this"}));
    f.ok(
        PUT,
        &format!("{m}/two"),
        Some(json!({"meta": {"two": "2"}})),
        200,
    )
    .await;
    f.fault(
        PUT,
        &format!("{m}/two"),
        Some(json!({"meta": {"three": "3"}})),
        400,
        "exactly",
    )
    .await;
    f.ok(DELETE, &format!("{m}/only"), None, 200).await;
    f.fault(GET, &format!("{m}/only"), None, 404, "only").await;
    assert_eq!(
        f.ok(GET, &m, None, 200).await["metadata"],
        json!({"two": "2"})
    );
    // Listing: filters, sort, paging with a next link.
    let d = f.v3("/volumes/detail");
    let names = |v: &Value| -> Vec<String> {
        let names = fields(v, "volumes", "name");
        names.into_iter().map(String::from).collect()
    };
    let v = f.ok(GET, &format!("{d}?sort=name:asc"), None, 200).await;
    assert_eq!(names(&v), ["alpha2", "bravo", "charlie"]);
    let v = f
        .ok(GET, &format!("{d}?sort_key=size&sort_dir=desc"), None, 200)
        .await;
    assert_eq!(names(&v)[0], "bravo");
    let v = f.ok(GET, &format!("{d}?name=charlie"), None, 200).await;
    assert_eq!(names(&v), ["charlie"]);
    let v = f
        .ok(
            GET,
            &format!("{d}?metadata=%7B%22tier%22%3A%22silver%22%7D"),
            None,
            200,
        )
        .await;
    assert_eq!(names(&v), ["charlie"]);
    let v = f
        .ok(
            GET,
            &format!("{d}?status=available&limit=2&sort=name:asc"),
            None,
            200,
        )
        .await;
    assert_eq!(names(&v), ["alpha2", "bravo"]);
    let next = v["volumes_links"][0]["href"].as_str().unwrap().to_string();
    assert_eq!(v["volumes_links"][0]["rel"], "next");
    assert!(next.starts_with("http://ember.test:8776/v3/"), "{next}");
    assert!(next.contains(&format!("marker={b}")), "{next}");
    let path = next.trim_start_matches("http://ember.test:8776");
    let v = f.ok(GET, path, None, 200).await;
    assert_eq!(names(&v), ["charlie"]);
    assert!(v.get("volumes_links").is_none());
    f.fault(GET, &format!("{d}?marker=nope"), None, 400, "marker")
        .await;
    f.fault(GET, &format!("{d}?sort=colour"), None, 400, "colour")
        .await;
    f.fault(GET, &format!("{d}?limit=x"), None, 400, "limit")
        .await;
    // all_tenants: admins see every project's; a member's is ignored.
    let v = f.ok(GET, &format!("{d}?all_tenants=1"), None, 200).await;
    assert_eq!(names(&v).len(), 3);
    let admin_url = format!("/v3/{}/volumes/detail", f.h.admin_project);
    let v = f.admin(GET, &admin_url, None, 200).await;
    assert_eq!(names(&v).len(), 0);
    let v = f
        .admin(GET, &format!("{admin_url}?all_tenants=true"), None, 200)
        .await;
    assert_eq!(names(&v).len(), 3);
    let v = f
        .admin(
            GET,
            &format!(
                "{admin_url}?all_tenants=true&project_id={}",
                f.h.admin_project
            ),
            None,
            200,
        )
        .await;
    assert_eq!(names(&v).len(), 0);
    // Snapshots: detail, update, metadata.
    let s = f
        .ok(
            POST,
            &f.v3("/snapshots"),
            Some(json!({"snapshot": {"volume_id": c, "name": "s", "metadata": {"x": "1"}, "force": false}})),
            202,
        )
        .await["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let snap = f.wait(&f.v3(&format!("/snapshots/{s}")), "snapshot").await;
    assert_eq!(
        (&snap["status"], &snap["metadata"], &snap["progress"]),
        (&json!("available"), &json!({"x": "1"}), &json!("100%"))
    );
    f.ok(
        PUT,
        &f.v3(&format!("/snapshots/{s}")),
        Some(json!({"snapshot": {"name": "s2"}})),
        200,
    )
    .await;
    f.ok(
        POST,
        &f.v3(&format!("/snapshots/{s}/metadata")),
        Some(json!({"metadata": {"y": "2"}})),
        200,
    )
    .await;
    let v = f
        .ok(
            GET,
            &f.v3(&format!("/snapshots/detail?volume_id={c}")),
            None,
            200,
        )
        .await;
    assert_eq!(v["snapshots"][0]["name"], "s2");
    assert_eq!(v["snapshots"][0]["metadata"], json!({"x": "1", "y": "2"}));
    f.ok(
        DELETE,
        &f.v3(&format!("/snapshots/{s}/metadata/x")),
        None,
        200,
    )
    .await;
    assert_eq!(
        f.ok(GET, &f.v3(&format!("/snapshots/{s}/metadata/y")), None, 200)
            .await["meta"],
        json!({"y": "2"})
    );
}

#[tokio::test]
async fn snapshot_of_in_use_volume_from_3_66() {
    let f = fx().await;
    let v = f.volume("v", json!({})).await;
    f.ok(
        POST,
        &f.v3(&format!("/volumes/{v}/action")),
        Some(json!({"os-initialize_connection": {"connector": {}}})),
        200,
    )
    .await;
    let body = json!({"snapshot": {"volume_id": v}});
    let (s, _, e) = req(
        &f.h,
        POST,
        &f.v3("/snapshots"),
        Some(&f.tok),
        &[("openstack-api-version", "volume 3.65")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_fault(&e, 400, "badRequest", "force");
    f.ok(POST, &f.v3("/snapshots"), Some(body), 202).await;
    f.fault(
        POST,
        &f.v3("/snapshots"),
        Some(json!({"snapshot": {"volume_id": v, "force": false}})),
        400,
        "force",
    )
    .await;
}

#[tokio::test]
async fn admin_actions_flags_and_retype() {
    let f = fx().await;
    let v = f.volume("v", json!({})).await;
    let act = f.v3(&format!("/volumes/{v}/action"));
    // Unknown and unsupported actions are named.
    f.fault(POST, &act, Some(json!({"os-attach": {}})), 400, "os-attach")
        .await;
    f.fault(
        POST,
        &act,
        Some(json!({"revert": {"snapshot_id": "s"}})),
        400,
        "revert",
    )
    .await;
    f.fault(
        POST,
        &act,
        Some(json!({"os-frobnicate": {}})),
        400,
        "os-frobnicate",
    )
    .await;
    f.fault(
        POST,
        &act,
        Some(json!({"os-extend": {"new_size": 2}, "os-set_bootable": {"bootable": true}})),
        400,
        "exactly one",
    )
    .await;
    // Bootable and readonly (members may, as in Cinder).
    f.ok(
        POST,
        &act,
        Some(json!({"os-set_bootable": {"bootable": "true"}})),
        202,
    )
    .await;
    f.fault(
        POST,
        &act,
        Some(json!({"os-set_bootable": {"bootable": "perhaps"}})),
        400,
        "os-set_bootable.bootable",
    )
    .await;
    f.ok(
        POST,
        &act,
        Some(json!({"os-update_readonly_flag": {"readonly": true}})),
        202,
    )
    .await;
    let vol = f.ok(GET, &f.v3(&format!("/volumes/{v}")), None, 200).await["volume"].clone();
    assert_eq!(
        (&vol["bootable"], &vol["metadata"]["readonly"]),
        (&json!("true"), &json!("True"))
    );
    let info = f
        .ok(
            POST,
            &act,
            Some(json!({"os-initialize_connection": {"connector": {}}})),
            200,
        )
        .await;
    assert_eq!(info["connection_info"]["data"]["access_mode"], "ro");
    assert!(
        f.dp.attachments().iter().all(|a| a.3),
        "the data plane attached read-only"
    );
    f.ok(
        POST,
        &act,
        Some(json!({"os-terminate_connection": {"connector": {}}})),
        202,
    )
    .await;
    // Reset status: admin only, to statuses no operation owns, consistent with the
    // attachments.
    let reset = |s: &str| json!({"os-reset_status": {"status": s}});
    f.fault(POST, &act, Some(reset("error")), 403, "admin")
        .await;
    let admin_act = act.clone();
    let (s, _, e) = req(
        &f.h,
        POST,
        &admin_act,
        Some(&f.h.admin),
        &[],
        Some(reset("creating")),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    let (s, _, e) = req(
        &f.h,
        POST,
        &admin_act,
        Some(&f.h.admin),
        &[],
        Some(reset("in-use")),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_fault(&e, 400, "badRequest", "has no attachments");
    let (s, _, e) = req(
        &f.h,
        POST,
        &admin_act,
        Some(&f.h.admin),
        &[],
        Some(json!({"os-reset_status": {"status": "error", "migration_status": "migrating"}})),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    f.admin(POST, &act, Some(reset("error")), 202).await;
    assert_eq!(f.status(&v).await, "error");
    f.admin(POST, &act, Some(reset("available")), 202).await;
    // Force delete: also from error_deleting (a failed delete).
    f.dp.fail_next(Op::Delete, DataPlaneError::failed("delete", "EIO"));
    let (s, e) = f.call(DELETE, &f.v3(&format!("/volumes/{v}")), None).await;
    assert_eq!(s, 500, "{e}");
    assert_eq!(f.status(&v).await, "error_deleting");
    f.fault(
        DELETE,
        &f.v3(&format!("/volumes/{v}")),
        None,
        400,
        "error_deleting",
    )
    .await;
    f.fault(
        POST,
        &act,
        Some(json!({"os-force_delete": null})),
        403,
        "admin",
    )
    .await;
    f.admin(POST, &act, Some(json!({"os-force_delete": null})), 202)
        .await;
    f.fault(GET, &f.v3(&format!("/volumes/{v}")), None, 404, "not found")
        .await;
    // Retype: in place when the bytes stay valid.
    let plain2 = f.h.create_type(json!({"name": "plain2"})).await;
    let enc = f.h.create_type(json!({"name": "enc"})).await;
    f.h.create_luks_encryption(&enc).await;
    let w = f.volume("w", json!({})).await;
    let wact = f.v3(&format!("/volumes/{w}/action"));
    f.ok(
        POST,
        &wact,
        Some(json!({"os-retype": {"new_type": "plain2", "migration_policy": "never"}})),
        202,
    )
    .await;
    let vol = f.ok(GET, &f.v3(&format!("/volumes/{w}")), None, 200).await["volume"].clone();
    assert_eq!(
        (&vol["volume_type"], &vol["volume_type_id"]),
        (&json!("plain2"), &json!(plain2))
    );
    f.fault(
        POST,
        &wact,
        Some(json!({"os-retype": {"new_type": "enc"}})),
        400,
        "encryption",
    )
    .await;
    f.fault(
        POST,
        &wact,
        Some(json!({"os-retype": {"new_type": "plain2", "migration_policy": "always"}})),
        400,
        "migration_policy",
    )
    .await;
    f.fault(
        POST,
        &wact,
        Some(json!({"os-retype": {"new_type": "nope"}})),
        404,
        "nope",
    )
    .await;
}

#[tokio::test]
async fn attachments_api() {
    let f = fx().await;
    let v = f.volume("v", json!({})).await;
    let at = f.v3("/attachments");
    let inst = "0c8a4f7e-0000-4000-8000-000000000001";
    // A reservation: no front end; the volume is reserved and cannot be deleted.
    let a = f
        .ok(
            POST,
            &at,
            Some(
                json!({"attachment": {"volume_uuid": v, "instance_uuid": inst, "connector": null}}),
            ),
            200,
        )
        .await["attachment"]
        .clone();
    assert_eq!(
        (&a["status"], &a["instance"], &a["connection_info"]),
        (&json!("reserved"), &json!(inst), &json!({}))
    );
    let aid = a["id"].as_str().unwrap().to_string();
    assert_eq!(f.status(&v).await, "reserved");
    assert!(f.dp.attachments().is_empty());
    f.fault(DELETE, &f.v3(&format!("/volumes/{v}")), None, 400, "in use")
        .await;
    f.fault(
        POST,
        &format!("{at}/{aid}/action"),
        Some(json!({"os-complete": null})),
        400,
        "connector",
    )
    .await;
    // The connector gives it its front end.
    let u = f
        .ok(
            PUT,
            &format!("{at}/{aid}"),
            Some(json!({"attachment": {"connector": {"host": "h", "protocol": "nbd"}}})),
            200,
        )
        .await["attachment"]
        .clone();
    assert_eq!(u["connection_info"]["driver_volume_type"], "nbd");
    assert_eq!(u["connection_info"]["data"]["attachment_id"], aid.as_str());
    assert_eq!(u["status"], "attaching");
    assert_eq!(f.status(&v).await, "in-use");
    assert_eq!(f.dp.attachments().len(), 1);
    // Updating again answers the recorded connection.
    let again = f
        .ok(
            PUT,
            &format!("{at}/{aid}"),
            Some(json!({"attachment": {"connector": {}}})),
            200,
        )
        .await;
    assert_eq!(
        again["attachment"]["connection_info"]["data"]["export_name"],
        u["connection_info"]["data"]["export_name"]
    );
    assert_eq!(f.dp.attachments().len(), 1);
    // os-complete (3.44+).
    let (s, _, _) = req(
        &f.h,
        POST,
        &format!("{at}/{aid}/action"),
        Some(&f.tok),
        &[("openstack-api-version", "volume 3.43")],
        Some(json!({"os-complete": null})),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _, _) = req(
        &f.h,
        POST,
        &format!("{at}/{aid}/action"),
        Some(&f.tok),
        &[MV],
        Some(json!({"os-complete": null})),
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(
        f.ok(GET, &format!("{at}/{aid}"), None, 200).await["attachment"]["status"],
        "attached"
    );
    // A second one with a connector at once, read-only (mode, 3.54+).
    let b = f
        .ok(
            POST,
            &at,
            Some(json!({"attachment": {"volume_uuid": v, "connector": {}, "mode": "ro"}})),
            200,
        )
        .await["attachment"]
        .clone();
    assert_eq!(
        (
            &b["attach_mode"],
            &b["connection_info"]["data"]["access_mode"]
        ),
        (&json!("ro"), &json!("ro"))
    );
    let (s, _, e) = req(
        &f.h,
        POST,
        &at,
        Some(&f.tok),
        &[("openstack-api-version", "volume 3.50")],
        Some(json!({"attachment": {"volume_uuid": v, "connector": {}, "mode": "ro"}})),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_fault(&e, 400, "badRequest", "3.54");
    f.fault(
        POST,
        &at,
        Some(json!({"attachment": {"volume_uuid": v, "connector": {}, "mode": "rx"}})),
        400,
        "mode",
    )
    .await;
    // Listings.
    let l = f.ok(GET, &format!("{at}?volume_id={v}"), None, 200).await;
    assert_eq!(l["attachments"].as_array().unwrap().len(), 2);
    assert!(l["attachments"][0].get("connection_info").is_none());
    let l = f
        .ok(GET, &format!("{at}/detail?instance_id={inst}"), None, 200)
        .await;
    assert_eq!(l["attachments"].as_array().unwrap().len(), 1);
    assert_eq!(l["attachments"][0]["attach_mode"], "rw");
    // Another project sees none of it.
    let (s, _, _) = req(
        &f.h,
        GET,
        &format!("{at}/{aid}"),
        Some(&f.other),
        &[MV],
        None,
    )
    .await;
    assert_eq!(s, 403);
    // Delete: the front end goes; the volume is available once none is left.
    f.ok(DELETE, &format!("{at}/{aid}"), None, 200).await;
    assert_eq!(f.status(&v).await, "in-use");
    f.ok(
        DELETE,
        &format!("{at}/{}", b["id"].as_str().unwrap()),
        None,
        200,
    )
    .await;
    assert_eq!(f.status(&v).await, "available");
    assert!(f.dp.attachments().is_empty());
    f.fault(GET, &format!("{at}/{aid}"), None, 404, "not found")
        .await;
    // A reservation deleted without ever connecting.
    let r = f
        .ok(
            POST,
            &at,
            Some(json!({"attachment": {"volume_uuid": v}})),
            200,
        )
        .await["attachment"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    f.ok(DELETE, &format!("{at}/{r}"), None, 200).await;
    assert_eq!(f.status(&v).await, "available");
}

#[tokio::test]
async fn qos_specs_map_onto_the_data_plane() {
    let f = fx().await;
    let pa = f.h.admin_project.clone();
    let q = format!("/v3/{pa}/qos-specs");
    let t =
        f.h.create_type(json!({"name": "fast", "extra_specs": {"qos:write_iops_sec": "300"}}))
            .await;
    // Members may not; admins may.
    let (s, _) = f.call(GET, &f.v3("/qos-specs"), None).await;
    assert_eq!(s, 403);
    let spec = f
        .admin(POST, &q, Some(json!({"qos_specs": {"name": "q1", "consumer": "front-end", "read_iops_sec": "100", "write_iops_sec": 200}})), 200)
        .await["qos_specs"]
        .clone();
    assert_eq!(
        spec["specs"],
        json!({"read_iops_sec": "100", "write_iops_sec": "200"})
    );
    let id = spec["id"].as_str().unwrap().to_string();
    for (body, needle) in [
        (
            json!({"qos_specs": {"name": "q2", "read_iops_sec_max": "5"}}),
            "read_iops_sec_max",
        ),
        (
            json!({"qos_specs": {"name": "q2", "read_iops_sec": "0"}}),
            "read_iops_sec",
        ),
        (
            json!({"qos_specs": {"name": "q2", "consumer": "middle"}}),
            "consumer",
        ),
        (json!({"qos_specs": {"read_iops_sec": "5"}}), "name"),
    ] {
        let v = f.admin(POST, &q, Some(body), 400).await;
        assert_fault(&v, 400, "badRequest", needle);
    }
    f.admin(POST, &q, Some(json!({"qos_specs": {"name": "q1"}})), 409)
        .await;
    f.admin(
        PUT,
        &format!("{q}/{id}"),
        Some(json!({"qos_specs": {"total_bytes_sec": "1048576"}})),
        200,
    )
    .await;
    f.admin(
        PUT,
        &format!("{q}/{id}/delete_keys"),
        Some(json!({"keys": ["write_iops_sec"]})),
        202,
    )
    .await;
    f.admin(
        PUT,
        &format!("{q}/{id}/delete_keys"),
        Some(json!({"keys": ["nope"]})),
        404,
    )
    .await;
    let shown = f.admin(GET, &format!("{q}/{id}"), None, 200).await;
    assert_eq!(
        shown["qos_specs"]["specs"],
        json!({"read_iops_sec": "100", "total_bytes_sec": "1048576"})
    );
    assert_eq!(
        f.admin(GET, &q, None, 200).await["qos_specs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Associated with a type: the volume's attachment gets the spec's limits, the
    // type's own qos: extra specs winning.
    f.admin(
        GET,
        &format!("{q}/{id}/associate?vol_type_id={t}"),
        None,
        202,
    )
    .await;
    f.admin(GET, &format!("{q}/{id}/associate"), None, 400)
        .await;
    let assoc = f
        .admin(GET, &format!("{q}/{id}/associations"), None, 200)
        .await;
    assert_eq!(
        assoc["qos_associations"],
        json!([{"association_type": "volume_type", "id": t, "name": "fast"}])
    );
    let ty = f
        .admin(GET, &format!("/v3/{pa}/types/{t}"), None, 200)
        .await;
    assert_eq!(ty["volume_type"]["qos_specs_id"], id.as_str());
    let v = f.volume("v", json!({"volume_type": "fast"})).await;
    let info = f
        .ok(
            POST,
            &f.v3(&format!("/volumes/{v}/action")),
            Some(json!({"os-initialize_connection": {"connector": {}}})),
            200,
        )
        .await;
    let att = info["connection_info"]["data"]["attachment_id"]
        .as_str()
        .unwrap();
    let limits = f.dp.qos_of(att).unwrap();
    assert_eq!(
        (limits.iops.read, limits.iops.write, limits.bytes.total),
        (Some(100), Some(300), Some(1_048_576))
    );
    // Deleting an associated spec needs force; disassociation frees it.
    f.admin(DELETE, &format!("{q}/{id}"), None, 400).await;
    f.admin(
        GET,
        &format!("{q}/{id}/disassociate?vol_type_id={t}"),
        None,
        202,
    )
    .await;
    f.admin(
        GET,
        &format!("{q}/{id}/disassociate?vol_type_id={t}"),
        None,
        400,
    )
    .await;
    f.admin(
        GET,
        &format!("{q}/{id}/associate?vol_type_id={t}"),
        None,
        202,
    )
    .await;
    f.admin(GET, &format!("{q}/{id}/disassociate_all"), None, 202)
        .await;
    f.admin(
        GET,
        &format!("{q}/{id}/associate?vol_type_id={t}"),
        None,
        202,
    )
    .await;
    f.admin(DELETE, &format!("{q}/{id}?force=True"), None, 202)
        .await;
    let ty = f
        .admin(GET, &format!("/v3/{pa}/types/{t}"), None, 200)
        .await;
    assert_eq!(ty["volume_type"]["qos_specs_id"], Value::Null);
    f.admin(GET, &format!("{q}/{id}"), None, 404).await;
}

#[tokio::test]
async fn services_clusters_limits() {
    let f = fx().await;
    let pa = f.h.admin_project.clone();
    let s = f
        .admin(GET, &format!("/v3/{pa}/os-services"), None, 200)
        .await;
    assert_eq!(s["services"][0]["binary"], "cinder-volume");
    assert_eq!(s["services"][0]["host"], "test-node@ember");
    assert_eq!(s["services"][0]["state"], "up");
    let s = f
        .admin(
            GET,
            &format!("/v3/{pa}/os-services?binary=cinder-scheduler"),
            None,
            200,
        )
        .await;
    assert_eq!(s["services"], json!([]));
    let (st, _) = f.call(GET, &f.v3("/os-services"), None).await;
    assert_eq!(st, 403);
    let c = f.admin(GET, &format!("/v3/{pa}/clusters"), None, 200).await;
    assert_eq!(
        c["clusters"],
        json!([{"name": "ember", "binary": "cinder-volume", "state": "up", "status": "enabled"}])
    );
    let c = f
        .admin(GET, &format!("/v3/{pa}/clusters/detail"), None, 200)
        .await;
    assert_eq!(
        (
            &c["clusters"][0]["num_hosts"],
            &c["clusters"][0]["num_down_hosts"]
        ),
        (&json!(1), &json!(0))
    );
    f.admin(GET, &format!("/v3/{pa}/clusters/ember"), None, 200)
        .await;
    f.admin(GET, &format!("/v3/{pa}/clusters/other"), None, 404)
        .await;
    // Two more nodes in cluster `east`; one stopped heartbeating long ago.
    let db = f.h.control.state.db();
    for name in ["east-1", "east-2"] {
        ember_control::services::register_node(
            db,
            &ember_control::services::NodeInfo {
                name: name.into(),
                cluster: "east".into(),
                rest: "127.0.0.1:1".into(),
                nbd: vec!["127.0.0.1:2".into()],
            },
        )
        .await
        .unwrap();
    }
    sqlx::query("UPDATE nodes SET heartbeat_at = '2026-01-01T00:00:00Z' WHERE name = 'east-2'")
        .execute(&db.pool)
        .await
        .unwrap();
    let c = f
        .admin(GET, &format!("/v3/{pa}/clusters/detail"), None, 200)
        .await;
    let names: Vec<&str> = c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["east", "ember"]);
    let east = &c["clusters"][0];
    assert_eq!(
        (&east["num_hosts"], &east["num_down_hosts"], &east["state"]),
        (&json!(2), &json!(1), &json!("up")),
        "{c}"
    );
    let s = f
        .admin(
            GET,
            &format!("/v3/{pa}/os-services?host=east-2@ember"),
            None,
            200,
        )
        .await;
    assert_eq!(
        (&s["services"][0]["state"], &s["services"][0]["cluster"]),
        (&json!("down"), &json!("east")),
        "{s}"
    );
    let e = f
        .admin(GET, &format!("/v3/{pa}/clusters/east"), None, 200)
        .await;
    assert_eq!(e["cluster"]["num_down_hosts"], 1);
    let nodes = ember_control::services::list_nodes(db, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let e1 = nodes.iter().find(|n| n.name == "east-1").unwrap();
    assert_eq!(e1.addresses["nbd"], json!(["127.0.0.1:2"]));
    f.volume("a", json!({"size": 2})).await;
    let l = f.ok(GET, &f.v3("/limits"), None, 200).await;
    let abs = &l["limits"]["absolute"];
    assert_eq!(
        (
            &abs["totalVolumesUsed"],
            &abs["totalGigabytesUsed"],
            &abs["maxTotalVolumes"]
        ),
        (&json!(1), &json!(2), &json!(-1))
    );
    assert_eq!(l["limits"]["rate"], json!([]));
}

// ---------------------------------------------------------------------------------------
// Barbican

async fn barbican(backend: Backend) {
    let f = fx_on(backend).await;
    let h = &f.h;
    let sref = h
        .expect(POST, "/v1/secrets", Some(&f.tok), Some(json!({"name": "k", "secret_type": "passphrase", "payload": "pw", "payload_content_type": "text/plain"})), 201)
        .await["secret_ref"]
        .clone();
    let s = ref_id(&sref);
    // Metadata.
    let m = format!("/v1/secrets/{s}/metadata");
    let v = h
        .expect(
            PUT,
            &m,
            Some(&f.tok),
            Some(json!({"metadata": {"Use": "disk", "b": "2"}})),
            201,
        )
        .await;
    assert!(v["metadata_ref"].as_str().unwrap().ends_with(&m));
    h.expect(
        POST,
        &m,
        Some(&f.tok),
        Some(json!({"key": "c", "value": "3"})),
        201,
    )
    .await;
    h.expect(
        POST,
        &m,
        Some(&f.tok),
        Some(json!({"key": "c", "value": "4"})),
        409,
    )
    .await;
    h.expect(
        POST,
        &format!("{m}/c"),
        Some(&f.tok),
        Some(json!({"key": "c", "value": "5"})),
        201,
    )
    .await;
    h.expect(
        PUT,
        &format!("{m}/b"),
        Some(&f.tok),
        Some(json!({"key": "b", "value": "6"})),
        200,
    )
    .await;
    h.expect(
        PUT,
        &format!("{m}/b"),
        Some(&f.tok),
        Some(json!({"key": "x", "value": "6"})),
        400,
    )
    .await;
    h.expect(DELETE, &format!("{m}/use"), Some(&f.tok), None, 204)
        .await;
    let v = h.expect(GET, &m, Some(&f.tok), None, 200).await;
    assert_eq!(v["metadata"], json!({"b": "6", "c": "5"}));
    assert_eq!(
        h.expect(GET, &format!("{m}/c"), Some(&f.tok), None, 200)
            .await,
        json!({"key": "c", "value": "5"})
    );
    // ACLs: another project's member cannot see it until named (by token id).
    let acl = format!("/v1/secrets/{s}/acl");
    let payload = format!("/v1/secrets/{s}/payload");
    h.expect(GET, &payload, Some(&f.other), None, 404).await;
    let v = h.expect(GET, &acl, Some(&f.tok), None, 200).await;
    assert_eq!(v["read"]["project-access"], true);
    h.expect(
        PUT,
        &acl,
        Some(&f.other),
        Some(json!({"read": {"users": [f.other_id]}})),
        404,
    )
    .await;
    let v = h
        .expect(
            PUT,
            &acl,
            Some(&f.tok),
            Some(json!({"read": {"users": [f.other_id], "project-access": true}})),
            200,
        )
        .await;
    assert!(v["acl_ref"].as_str().unwrap().ends_with(&acl));
    let (s_, _, body) = req(
        h,
        GET,
        &payload,
        Some(&f.other),
        &[("accept", "text/plain")],
        None,
    )
    .await;
    assert_eq!(s_, 200, "{body}");
    h.expect(GET, &format!("/v1/secrets/{s}"), Some(&f.other), None, 200)
        .await;
    h.expect(
        DELETE,
        &format!("/v1/secrets/{s}"),
        Some(&f.other),
        None,
        403,
    )
    .await;
    h.expect(PUT, &m, Some(&f.other), Some(json!({"metadata": {}})), 403)
        .await;
    // project-access false: the project's other tokens are shut out; the creator and
    // the listed users are not.
    let (_, reader) = h.token(&f.p, "reader").await;
    let (_, member2) = h.token(&f.p, "member").await;
    h.expect(GET, &format!("/v1/secrets/{s}"), Some(&reader), None, 200)
        .await;
    h.expect(
        PATCH,
        &acl,
        Some(&f.tok),
        Some(json!({"read": {"project-access": false}})),
        200,
    )
    .await;
    let v = h.expect(GET, &acl, Some(&f.tok), None, 200).await;
    assert_eq!(
        (&v["read"]["project-access"], &v["read"]["users"]),
        (&json!(false), &json!([f.other_id]))
    );
    h.expect(GET, &format!("/v1/secrets/{s}"), Some(&reader), None, 403)
        .await;
    h.expect(GET, &payload, Some(&member2), None, 403).await;
    h.expect(GET, &payload, Some(&f.tok), None, 200).await;
    h.expect(GET, &payload, Some(&f.other), None, 200).await;
    h.expect(PUT, &acl, Some(&f.tok), Some(json!({"write": {}})), 400)
        .await;
    h.expect(
        PUT,
        &acl,
        Some(&f.tok),
        Some(json!({"read": {"users": [""]}})),
        400,
    )
    .await;
    let _ = f.tok_id;
    // Back to the defaults.
    h.expect(DELETE, &acl, Some(&f.tok), None, 200).await;
    h.expect(GET, &payload, Some(&member2), None, 200).await;
    h.expect(GET, &payload, Some(&f.other), None, 404).await;
    // Paging links.
    for i in 0..4 {
        h.create_text_secret(&f.tok, &format!("p{i}")).await;
    }
    let v = h
        .expect(GET, "/v1/secrets?limit=2&offset=2", Some(&f.tok), None, 200)
        .await;
    assert_eq!(v["total"], 5);
    assert_eq!(v["secrets"].as_array().unwrap().len(), 2);
    assert!(v["next"]
        .as_str()
        .unwrap()
        .ends_with("/v1/secrets?limit=2&offset=4"));
    assert!(v["previous"]
        .as_str()
        .unwrap()
        .ends_with("/v1/secrets?limit=2&offset=0"));
    // Deleting the secret takes its ACL and metadata.
    h.expect(DELETE, &format!("/v1/secrets/{s}"), Some(&f.tok), None, 204)
        .await;
    h.expect(GET, &m, Some(&f.tok), None, 404).await;
    f.h.finish().await;
}

backend_tests!(barbican => barbican_acls_metadata_paging_sqlite, barbican_acls_metadata_paging_mariadb);

// ---------------------------------------------------------------------------------------
// Glance metadefs

async fn metadefs(backend: Backend) {
    let f = fx_on(backend).await;
    let h = &f.h;
    let a = Some(h.admin.as_str());
    let ns = "/v2/metadefs/namespaces/OS::T";
    h.expect(
        POST,
        "/v2/metadefs/namespaces",
        a,
        Some(json!({"namespace": "OS::T", "visibility": "public",
        "objects": [{"name": "o0"}], "tags": [{"name": "t0"}]})),
        201,
    )
    .await;
    // Objects.
    let obj = json!({"name": "disk", "description": "d", "required": ["bus"],
        "properties": {"bus": {"title": "Bus", "type": "string", "enum": ["virtio", "scsi"]}}});
    let v = h
        .expect(POST, &format!("{ns}/objects"), a, Some(obj.clone()), 201)
        .await;
    assert_eq!(
        (&v["self"], &v["schema"]),
        (
            &json!(format!("{ns}/objects/disk")),
            &json!("/v2/schemas/metadefs/object")
        )
    );
    h.expect(POST, &format!("{ns}/objects"), a, Some(obj), 409)
        .await;
    h.expect(
        POST,
        &format!("{ns}/objects"),
        a,
        Some(json!({"name": "x", "required": ["nope"]})),
        400,
    )
    .await;
    h.expect(
        POST,
        &format!("{ns}/objects"),
        a,
        Some(json!({"name": "x", "properties": {"p": {"title": "P", "type": "object"}}})),
        400,
    )
    .await;
    h.expect(
        POST,
        &format!("{ns}/objects"),
        Some(&f.tok),
        Some(json!({"name": "y"})),
        403,
    )
    .await;
    let v = h
        .expect(GET, &format!("{ns}/objects"), Some(&f.tok), None, 200)
        .await;
    assert_eq!(v["objects"].as_array().unwrap().len(), 2);
    h.expect(
        PUT,
        &format!("{ns}/objects/disk"),
        a,
        Some(json!({"name": "disk2", "required": []})),
        200,
    )
    .await;
    h.expect(GET, &format!("{ns}/objects/disk"), a, None, 404)
        .await;
    assert_eq!(
        h.expect(GET, &format!("{ns}/objects/disk2"), Some(&f.tok), None, 200)
            .await["required"],
        json!([])
    );
    h.expect(DELETE, &format!("{ns}/objects/disk2"), a, None, 204)
        .await;
    // Tags: POST replaces unless appending.
    let v = h
        .expect(
            POST,
            &format!("{ns}/tags"),
            a,
            Some(json!({"tags": [{"name": "a"}, {"name": "b"}]})),
            201,
        )
        .await;
    assert_eq!(v["tags"].as_array().unwrap().len(), 2);
    let (s, _, v) = req(
        h,
        POST,
        &format!("{ns}/tags"),
        a,
        &[("x-openstack-append", "true")],
        Some(json!({"tags": [{"name": "c"}]})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["tags"].as_array().unwrap().len(), 3);
    h.expect(POST, &format!("{ns}/tags/d"), a, None, 201).await;
    h.expect(POST, &format!("{ns}/tags/d"), a, None, 409).await;
    h.expect(
        PUT,
        &format!("{ns}/tags/d"),
        a,
        Some(json!({"name": "e"})),
        200,
    )
    .await;
    h.expect(GET, &format!("{ns}/tags/e"), Some(&f.tok), None, 200)
        .await;
    h.expect(DELETE, &format!("{ns}/tags/e"), a, None, 204)
        .await;
    h.expect(
        POST,
        &format!("{ns}/tags"),
        a,
        Some(json!({"tags": [{"name": "a"}, {"name": "a"}]})),
        409,
    )
    .await;
    let full = h.expect(GET, ns, Some(&f.tok), None, 200).await;
    assert_eq!(
        (
            full["objects"].as_array().unwrap().len(),
            full["tags"].as_array().unwrap().len()
        ),
        (1, 3)
    );
    h.expect(DELETE, &format!("{ns}/tags"), a, None, 204).await;
    assert_eq!(
        h.expect(GET, &format!("{ns}/tags"), Some(&f.tok), None, 200)
            .await["tags"],
        json!([])
    );
    // glanceclient sends the namespace back with its read-only fields on update.
    let mut back = h.expect(GET, ns, a, None, 200).await;
    back["description"] = json!("new");
    for k in ["schema", "created_at", "updated_at", "self"] {
        back.as_object_mut().unwrap().remove(k);
    }
    h.expect(PUT, ns, a, Some(back), 200).await;
    // Resource types; paging and sorting of namespaces.
    let rt = h
        .expect(GET, "/v2/metadefs/resource_types", Some(&f.tok), None, 200)
        .await;
    assert!(rt["resource_types"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "OS::Cinder::Volumetype"));
    let p1 = h
        .expect(
            GET,
            "/v2/metadefs/namespaces?limit=1",
            Some(&f.tok),
            None,
            200,
        )
        .await;
    let next = p1["next"].as_str().unwrap();
    assert_eq!(
        next,
        "/v2/metadefs/namespaces?limit=1&marker=OS::Ember::QoS"
    );
    let p2 = h.expect(GET, next, Some(&f.tok), None, 200).await;
    assert_eq!(p2["namespaces"][0]["namespace"], "OS::Ember::VolumeType");
    let d = h
        .expect(
            GET,
            "/v2/metadefs/namespaces?sort_dir=desc&visibility=public",
            Some(&f.tok),
            None,
            200,
        )
        .await;
    assert_eq!(d["namespaces"][0]["namespace"], "OS::T");
    h.expect(
        GET,
        "/v2/metadefs/namespaces?sort_key=owner",
        Some(&f.tok),
        None,
        400,
    )
    .await;
    // Deleting the namespace takes its objects and tags.
    h.expect(DELETE, ns, a, None, 204).await;
    h.expect(
        POST,
        "/v2/metadefs/namespaces",
        a,
        Some(json!({"namespace": "OS::T"})),
        201,
    )
    .await;
    assert_eq!(
        h.expect(GET, &format!("{ns}/objects"), a, None, 200).await["objects"],
        json!([])
    );
    f.h.finish().await;
}

backend_tests!(metadefs => metadefs_objects_tags_sqlite, metadefs_objects_tags_mariadb);

#[tokio::test]
async fn metadefs_schemas_describe_the_answers() {
    let f = fx().await;
    for name in ember_control::metadefs::schemas::NAMES {
        let (s, _, v) = req(
            &f.h,
            GET,
            &format!("/v2/schemas/metadefs/{name}"),
            None,
            &[],
            None,
        )
        .await;
        assert_eq!(s, 200, "{name}");
        assert!(v["properties"].is_object(), "{name}");
    }
    let (s, _, _) = req(&f.h, GET, "/v2/schemas/metadefs/image", None, &[], None).await;
    assert_eq!(s, 404);
    // Every field of a full namespace view is in the namespace schema.
    let (_, _, schema) = req(&f.h, GET, "/v2/schemas/metadefs/namespace", None, &[], None).await;
    let (_, _, ns) = req(
        &f.h,
        GET,
        "/v2/metadefs/namespaces/OS::Ember::QoS",
        Some(&f.tok),
        &[],
        None,
    )
    .await;
    for k in ns.as_object().unwrap().keys() {
        assert!(
            schema["properties"].get(k).is_some(),
            "namespace field {k} is not in the schema"
        );
    }
    let (_, _, pschema) = req(&f.h, GET, "/v2/schemas/metadefs/property", None, &[], None).await;
    let (_, _, p) = req(
        &f.h,
        GET,
        "/v2/metadefs/namespaces/OS::Ember::QoS/properties/read_iops_sec",
        Some(&f.tok),
        &[],
        None,
    )
    .await;
    for k in p.as_object().unwrap().keys() {
        assert!(
            pschema["properties"].get(k).is_some(),
            "property field {k} is not in the schema"
        );
    }
}
