//! Volumes on LUN pools in process (`router().oneshot()` with the in-memory data plane,
//! whose LUN pools a test fills, grows, empties and guards with CHAP): the manageable
//! volumes listing, manage, os-unmanage, attach/extend of LUN volumes, and the faults
//! (refused login, missing or replaced LUN) shown on the volume. The end-to-end tests
//! (`tests/luns.rs`) drive the same API against tgtd and loop devices.

mod common;

use common::{wait_while, Backend, Harness, DELETE, GET, GIB, POST};
use ember_control::dataplane::mem::MemDataPlane;
use ember_control::dataplane::{ChapRef, LuksVersion, ObjectRef};
use serde_json::{json, Value};
use std::sync::Arc;

struct Fx {
    h: Harness,
    dp: Arc<MemDataPlane>,
    /// The admin's project.
    p: String,
}

async fn fx_on(backend: Backend) -> Fx {
    let dp = Arc::new(
        MemDataPlane::new()
            .with_pool("default", 100 * GIB)
            .with_lun_pool("array", None),
    );
    dp.put_lun("array", "lun-1", 2 * GIB, Some("naa.6001"), false);
    dp.put_lun("array", "lun-2", 512 << 20, Some("naa.6002"), true);
    dp.put_lun("array", "lun-3", GIB, Some("naa.6003"), true);
    let h = Harness::with_dataplane(backend, dp.clone()).await;
    let p = h.admin_project.clone();
    Fx { h, dp, p }
}

async fn fx() -> Fx {
    fx_on(Backend::Sqlite).await
}

impl Fx {
    fn url(&self, rest: &str) -> String {
        format!("/v3/{}{rest}", self.p)
    }

    async fn list(&self, detail: bool) -> Vec<Value> {
        let u = self.url(if detail {
            "/manageable_volumes/detail"
        } else {
            "/manageable_volumes"
        });
        let v = self.h.admin_ok(GET, &u, None, 200).await;
        v["manageable-volumes"].as_array().unwrap().clone()
    }

    fn manage_body(&self, lun: &str, extra: Value) -> Value {
        let mut v = json!({"host": "test-node@array#array", "ref": {"source-name": lun}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        json!({ "volume": v })
    }

    /// Manage `lun`; the volume once it left `creating`.
    async fn manage(&self, lun: &str, extra: Value) -> Value {
        let v = self
            .h
            .admin_ok(
                POST,
                &self.url("/manageable_volumes"),
                Some(self.manage_body(lun, extra)),
                202,
            )
            .await;
        assert_eq!(v["volume"]["status"], "creating", "{v}");
        self.wait(v["volume"]["id"].as_str().unwrap()).await
    }

    async fn show(&self, id: &str) -> Value {
        self.h
            .admin_ok(GET, &self.url(&format!("/volumes/{id}")), None, 200)
            .await["volume"]
            .clone()
    }

    async fn wait(&self, id: &str) -> Value {
        wait_while("creating", || self.show(id)).await
    }

    async fn action(&self, id: &str, body: Value) -> (u16, Value) {
        let (s, v) = self
            .h
            .call(
                POST,
                &self.url(&format!("/volumes/{id}/action")),
                Some(&self.h.admin),
                Some(body),
            )
            .await;
        (s.as_u16(), v)
    }

    async fn attach(&self, id: &str) -> (u16, Value) {
        self.action(
            id,
            json!({"os-initialize_connection": {"connector": {"protocol": "nbd"}}}),
        )
        .await
    }
}

fn by_name<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|l| l["reference"]["source-name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list:?}"))
}

fn fault_of(v: &Value, status: u16) -> String {
    let f = v.as_object().unwrap().values().next().unwrap();
    assert_eq!(f["code"], status, "{v}");
    f["message"].as_str().unwrap().to_string()
}

async fn manage_attach_extend_unmanage(backend: Backend) {
    let f = fx_on(backend).await;
    let list = f.list(false).await;
    assert_eq!(list.len(), 3, "{list:?}");
    let l1 = by_name(&list, "lun-1");
    assert_eq!(l1["size"], 2);
    assert_eq!(l1["safe_to_manage"], true, "{l1}");
    assert_eq!(l1["cinder_id"], Value::Null);
    let l2 = by_name(&list, "lun-2");
    assert_eq!(l2["safe_to_manage"], false);
    assert!(l2["reason_not_safe"]
        .as_str()
        .unwrap()
        .contains("smaller than 1 GiB"));
    let detail = f.list(true).await;
    let d1 = by_name(&detail, "lun-1");
    assert_eq!(d1["host"], "test-node@array#array");
    assert_eq!(d1["extra_info"]["identity"], "naa.6001");
    assert_eq!(d1["extra_info"]["size_bytes"], 2 * GIB);

    // Manage: the volume takes the LUN's size and identity.
    let v = f
        .manage(
            "lun-1",
            json!({"name": "db", "description": "from the array"}),
        )
        .await;
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(v["size"], 2);
    assert_eq!(v["name"], "db");
    assert_eq!(v["lun"]["name"], "lun-1");
    assert_eq!(v["lun"]["identity"], "naa.6001");
    assert_eq!(v["lun"]["fault"], Value::Null);
    assert_eq!(v["os-vol-host-attr:host"], "test-node@array");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(f.dp.bound_lun("array", &id).as_deref(), Some("lun-1"));
    let l1 = by_name(&f.list(false).await, "lun-1").clone();
    assert_eq!(l1["safe_to_manage"], false);
    assert_eq!(l1["cinder_id"], id.as_str());
    assert!(l1["reason_not_safe"].as_str().unwrap().contains(&id));
    // Once only.
    let v =
        f.h.admin_ok(
            POST,
            &f.url("/manageable_volumes"),
            Some(f.manage_body("lun-1", json!({}))),
            409,
        )
        .await;
    assert!(fault_of(&v, 409).contains("managed already"), "{v}");

    // Attach and detach like a file volume.
    let (s, v) = f.attach(&id).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["connection_info"]["driver_volume_type"], "nbd", "{v}");
    assert_eq!(f.show(&id).await["status"], "in-use");
    // Unmanage refuses an attached volume.
    let (s, v) = f.action(&id, json!({"os-unmanage": null})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = f
        .action(&id, json!({"os-terminate_connection": {"connector": {}}}))
        .await;
    assert_eq!(s, 202, "{v}");

    // Extend: refused until the array grew the LUN; then the volume takes it.
    let (s, v) = f.action(&id, json!({"os-extend": {"new_size": 3}})).await;
    assert_eq!(s, 400, "{v}");
    assert!(fault_of(&v, 400).contains("grow it on the array"), "{v}");
    f.dp.put_lun("array", "lun-1", 3 * GIB, Some("naa.6001"), false);
    let (s, v) = f.action(&id, json!({"os-extend": {"new_size": 3}})).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(f.show(&id).await["size"], 3);
    assert_eq!(
        f.dp.size_of(&ObjectRef::volume("array", &id)),
        Some(3 * GIB)
    );

    // Unmanage: the volume goes, the LUN is free again (and its bytes stay).
    let (s, v) = f.action(&id, json!({"os-unmanage": {}})).await;
    assert_eq!(s, 202, "{v}");
    f.h.admin_ok(GET, &f.url(&format!("/volumes/{id}")), None, 404)
        .await;
    assert_eq!(f.dp.bound_lun("array", &id), None);
    let l1 = by_name(&f.list(false).await, "lun-1").clone();
    assert_eq!(l1["safe_to_manage"], true, "{l1}");

    // Manage again, then delete: the LUN is released, never erased.
    let v = f.manage("lun-1", json!({})).await;
    let id = v["id"].as_str().unwrap().to_string();
    f.h.admin_ok(DELETE, &f.url(&format!("/volumes/{id}")), None, 202)
        .await;
    assert_eq!(f.dp.bound_lun("array", &id), None);
    assert_eq!(
        by_name(&f.list(false).await, "lun-1")["safe_to_manage"],
        true
    );
    let v = f.manage("lun-1", json!({})).await;
    assert_eq!(v["status"], "available", "{v}");
    f.h.finish().await;
}

backend_tests!(manage_attach_extend_unmanage => manage_attach_extend_unmanage_sqlite, manage_attach_extend_unmanage_mariadb);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_secrets_come_from_the_key_store() {
    let f = fx().await;
    f.dp.require_chap("array", "ember", b"right-secret");
    let wrong = f.h.create_text_secret(&f.h.admin, "wrong-secret").await;
    f.dp.set_lun_chap(
        "array",
        Some(ChapRef {
            user: "ember".into(),
            secret_id: wrong,
            target_user: None,
            target_secret_id: None,
        }),
    );
    // A refused login: a clear 503 on the listing, `error` with the reason on a manage.
    let v =
        f.h.admin_ok(GET, &f.url("/manageable_volumes"), None, 503)
            .await;
    assert!(
        fault_of(&v, 503).contains("CHAP authentication failed"),
        "{v}"
    );
    let v = f.manage("lun-1", json!({})).await;
    assert_eq!(v["status"], "error", "{v}");
    assert!(
        v["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("CHAP authentication failed"),
        "{v}"
    );
    assert!(v["lun"]["fault_at"].is_string());
    let failed = v["id"].as_str().unwrap().to_string();
    assert_eq!(f.dp.bound_lun("array", &failed), None);
    // A secret id that is not in the key store.
    f.dp.set_lun_chap(
        "array",
        Some(ChapRef {
            user: "ember".into(),
            secret_id: "no-such-secret".into(),
            target_user: None,
            target_secret_id: None,
        }),
    );
    let v =
        f.h.admin_ok(GET, &f.url("/manageable_volumes"), None, 503)
            .await;
    assert!(fault_of(&v, 503).contains("not in the key store"), "{v}");
    // The right one.
    let right = f.h.create_text_secret(&f.h.admin, "right-secret").await;
    f.dp.set_lun_chap(
        "array",
        Some(ChapRef {
            user: "ember".into(),
            secret_id: right,
            target_user: None,
            target_secret_id: None,
        }),
    );
    assert_eq!(f.list(false).await.len(), 3);
    // The failed volume is deleted like any other; the LUN is free.
    f.h.admin_ok(DELETE, &f.url(&format!("/volumes/{failed}")), None, 202)
        .await;
    let v = f.manage("lun-1", json!({})).await;
    assert_eq!(v["status"], "available", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lun_that_disappears_or_is_replaced_is_a_fault_on_the_volume() {
    let f = fx().await;
    let v = f.manage("lun-1", json!({})).await;
    let id = v["id"].as_str().unwrap().to_string();
    f.dp.remove_lun("array", "lun-1");
    let (s, v) = f.attach(&id).await;
    assert_eq!(s, 503, "{v}");
    assert!(fault_of(&v, 503).contains("does not exist"), "{v}");
    let shown = f.show(&id).await;
    assert_eq!(shown["status"], "available");
    assert!(
        shown["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{shown}"
    );
    // Another LUN under the same name is not this volume's.
    f.dp.put_lun("array", "lun-1", 2 * GIB, Some("naa.9999"), false);
    let (s, v) = f.attach(&id).await;
    assert_eq!(s, 503, "{v}");
    assert!(fault_of(&v, 503).contains("naa.6001"), "{v}");
    let (s, v) = f.action(&id, json!({"os-extend": {"new_size": 3}})).await;
    assert_eq!(s, 503, "{v}");
    // Back: the attach works and the fault is cleared.
    f.dp.put_lun("array", "lun-1", 2 * GIB, Some("naa.6001"), false);
    let (s, v) = f.attach(&id).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(f.show(&id).await["lun"]["fault"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_manage_formats_only_a_blank_lun() {
    let f = fx().await;
    let t = f.h.create_type(json!({"name": "secure"})).await;
    f.h.create_luks_encryption(&t).await;
    // lun-1 holds data: refused, nothing written.
    let v = f.manage("lun-1", json!({"volume_type": "secure"})).await;
    assert_eq!(v["status"], "error", "{v}");
    assert!(
        v["lun"]["fault"].as_str().unwrap().contains("holds data"),
        "{v}"
    );
    let bad = v["id"].as_str().unwrap().to_string();
    assert_eq!(f.dp.luks_of(&ObjectRef::volume("array", &bad)), None);
    // lun-3 is blank: formatted with the volume's own key.
    let v = f.manage("lun-3", json!({"volume_type": "secure"})).await;
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(v["encrypted"], true);
    let id = v["id"].as_str().unwrap().to_string();
    let key = v["encryption_key_id"].as_str().unwrap().to_string();
    let o = ObjectRef::volume("array", &id);
    assert_eq!(f.dp.luks_of(&o).map(|x| x.0), Some(LuksVersion::Luks1));
    let (s, v) = f.attach(&id).await;
    assert_eq!(s, 200, "{v}");
    f.action(&id, json!({"os-terminate_connection": {"connector": {}}}))
        .await;
    // Unmanage keeps the key: the LUN can still be opened.
    let (s, v) = f.action(&id, json!({"os-unmanage": null})).await;
    assert_eq!(s, 202, "{v}");
    f.h.admin_ok(GET, &format!("/v1/secrets/{key}"), None, 200)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly() {
    let f = fx().await;
    let url = f.url("/manageable_volumes");
    let body = |v: Value| Some(json!({ "volume": v }));
    for (b, want, needle) in [
        (json!({"ref": {"source-name": "lun-1"}}), 400, "host"),
        (
            json!({"host": "other-node@array", "ref": {"source-name": "lun-1"}}),
            400,
            "other-node",
        ),
        (
            json!({"host": "test-node@default", "ref": {"source-name": "x"}}),
            400,
            "not a LUN pool",
        ),
        (
            json!({"host": "test-node@array", "ref": {}}),
            400,
            "source-name",
        ),
        (
            json!({"host": "test-node@array", "ref": {"source-id": "1"}}),
            400,
            "source-id",
        ),
        (
            json!({"host": "test-node@array", "ref": {"source-name": ""}}),
            400,
            "source-name",
        ),
        (
            json!({"host": "test-node@array", "ref": {"source-name": "lun-1"}, "volume_type": "nope"}),
            404,
            "nope",
        ),
        (
            json!({"host": "test-node@array", "ref": {"source-name": "lun-1"}, "metadata": {"a": "b"}}),
            400,
            "metadata",
        ),
        (
            json!({"host": "test-node@array", "ref": {"source-name": "lun-1"}, "colour": 1}),
            400,
            "colour",
        ),
    ] {
        let v = f.h.admin_ok(POST, &url, body(b.clone()), want).await;
        assert!(fault_of(&v, want).contains(needle), "{b}: {v}");
    }
    // Managing a LUN the pool does not have: the volume is `error` with the reason.
    let v = f.manage("lun-77", json!({})).await;
    assert_eq!(v["status"], "error");
    assert!(
        v["lun"]["fault"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{v}"
    );
    // Members may not list or manage.
    let (_, member) = f.h.token(&f.p, "member").await;
    f.h.expect(GET, &url, Some(&member), None, 403).await;
    f.h.expect(
        POST,
        &url,
        Some(&member),
        body(json!({"host": "array", "ref": {"source-name": "lun-1"}})),
        403,
    )
    .await;
    // Listing by host.
    let v =
        f.h.admin_ok(GET, &format!("{url}?host=test-node@array"), None, 200)
            .await;
    assert_eq!(v["manageable-volumes"].as_array().unwrap().len(), 3);
    f.h.admin_ok(GET, &format!("{url}?host=test-node@default"), None, 400)
        .await;
    // Nothing is allocated in a LUN pool; a file volume cannot be unmanaged.
    let t = f
        .h
        .create_type(json!({"name": "on-array", "extra_specs": {"volume_backend_name": "array"}}))
        .await;
    let v =
        f.h.admin_ok(
            POST,
            &f.url("/volumes"),
            Some(json!({"volume": {"size": 1, "volume_type": t}})),
            413,
        )
        .await;
    assert!(fault_of(&v, 413).contains("array"), "{v}");
    let v =
        f.h.admin_ok(
            POST,
            &f.url("/volumes"),
            Some(json!({"volume": {"size": 1}})),
            202,
        )
        .await;
    let file = v["volume"]["id"].as_str().unwrap().to_string();
    f.wait(&file).await;
    let (s, v) = f.action(&file, json!({"os-unmanage": null})).await;
    assert_eq!(s, 400, "{v}");
    assert!(fault_of(&v, 400).contains("not on a LUN pool"), "{v}");
    // A LUN volume cannot be snapshotted (nothing is allocated on the array).
    let v = f.manage("lun-1", json!({})).await;
    let id = v["id"].as_str().unwrap();
    f.h.admin_ok(
        POST,
        &f.url("/snapshots"),
        Some(json!({"snapshot": {"volume_id": id}})),
        413,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_shows_an_attached_luns_fault_and_clears_it() {
    use ember_control::volumes::manageable::check_health;
    let f = fx().await;
    let v = f.manage("lun-1", json!({})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let (s, v) = f.attach(&id).await;
    assert_eq!(s, 200, "{v}");
    let st = &f.h.control.state;
    assert_eq!(check_health(st).await.unwrap(), 0);
    assert_eq!(f.show(&id).await["lun"]["health"], "ok");
    // The array deletes the LUN under the attached volume.
    f.dp.remove_lun("array", "lun-1");
    assert_eq!(check_health(st).await.unwrap(), 1);
    let shown = f.show(&id).await;
    assert_eq!(shown["status"], "in-use", "{shown}");
    assert_eq!(shown["lun"]["health"], "error", "{shown}");
    assert!(
        shown["lun"]["fault"].as_str().unwrap().contains("is gone"),
        "{shown}"
    );
    assert!(shown["lun"]["fault_at"].is_string(), "{shown}");
    // Recorded once, not again on every check.
    assert_eq!(check_health(st).await.unwrap(), 0);
    // Back: cleared.
    f.dp.put_lun("array", "lun-1", 2 * GIB, Some("naa.6001"), false);
    assert_eq!(check_health(st).await.unwrap(), 1);
    let shown = f.show(&id).await;
    assert_eq!(shown["lun"]["health"], "ok", "{shown}");
    assert_eq!(shown["lun"]["fault"], Value::Null, "{shown}");
}
