//! The volumes API in process: `router().oneshot()` over SQLite (and MariaDB where the
//! database matters) with the in-memory data plane (`dataplane::mem`). Every status
//! move, refusal and race of `volumes::status` has a test here; the end-to-end tests
//! (`tests/volumes.rs`) drive the same API against the real data plane.

mod common;

use axum::http::Method;
use common::{ref_id, wait_while, Backend, Harness, DELETE, GET, GIB, POST};
use ember_control::dataplane::mem::{MemDataPlane, Op};
use ember_control::dataplane::{DataPlaneError, LuksVersion, ObjectRef, Protocol, StoredObject};
use ember_control::volumes::reconcile::reconcile;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A node with two pools (`default`: 100 GiB, `fast`: 3 GiB) and a project with a
/// member token.
struct Fx {
    h: Harness,
    dp: Arc<MemDataPlane>,
    p: String,
    tok: String,
}

fn mem() -> Arc<MemDataPlane> {
    Arc::new(
        MemDataPlane::new()
            .with_pool("default", 100 * GIB)
            .with_pool("fast", 3 * GIB),
    )
}

async fn fx_on(backend: Backend) -> Fx {
    let dp = mem();
    let h = Harness::with_dataplane(backend, dp.clone()).await;
    h.control
        .state
        .locks()
        .set_operation_wait(Duration::from_millis(300));
    let p = h.project("vols").await;
    let (_, tok) = h.token(&p, "member").await;
    Fx { h, dp, p, tok }
}

async fn fx() -> Fx {
    fx_on(Backend::Sqlite).await
}

fn id_of(v: &Value, what: &str) -> String {
    v[what]["id"].as_str().unwrap().to_string()
}

impl Fx {
    fn vols(&self, rest: &str) -> String {
        format!("/v3/{}/volumes{rest}", self.p)
    }

    fn snaps(&self, rest: &str) -> String {
        format!("/v3/{}/snapshots{rest}", self.p)
    }

    async fn call(&self, m: Method, uri: &str, body: Option<Value>) -> (u16, Value) {
        let (s, v) = self.h.call(m, uri, Some(&self.tok), body).await;
        (s.as_u16(), v)
    }

    async fn ok(&self, m: Method, uri: &str, body: Option<Value>, want: u16) -> Value {
        self.h.expect(m, uri, Some(&self.tok), body, want).await
    }

    async fn fault(&self, m: Method, uri: &str, body: Option<Value>, want: u16, needle: &str) {
        self.h
            .fault(m, uri, Some(&self.tok), body, want, needle)
            .await;
    }

    async fn create(&self, body: Value) -> (u16, Value) {
        self.call(POST, &self.vols(""), Some(json!({ "volume": body })))
            .await
    }

    /// Create and wait until built; the volume id.
    async fn create_ok(&self, body: Value) -> String {
        let (s, v) = self.create(body).await;
        assert_eq!(s, 202, "{v}");
        assert_eq!(v["volume"]["status"], "creating");
        let id = id_of(&v, "volume");
        assert_eq!(self.wait(&id).await["status"], "available");
        id
    }

    async fn show(&self, id: &str) -> Value {
        self.ok(GET, &self.vols(&format!("/{id}")), None, 200).await["volume"].clone()
    }

    /// Wait until volume `id` leaves `creating`.
    async fn wait(&self, id: &str) -> Value {
        wait_while("creating", || self.show(id)).await
    }

    async fn wait_snap(&self, id: &str) -> Value {
        let uri = self.snaps(&format!("/{id}"));
        wait_while("creating", || async {
            self.ok(GET, &uri, None, 200).await["snapshot"].clone()
        })
        .await
    }

    async fn action(&self, id: &str, body: Value) -> (u16, Value) {
        self.call(POST, &self.vols(&format!("/{id}/action")), Some(body))
            .await
    }

    async fn attach(&self, id: &str, connector: Value) -> Value {
        let (s, v) = self
            .action(
                id,
                json!({"os-initialize_connection": {"connector": connector}}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["connection_info"].clone()
    }

    async fn detach(&self, id: &str, connector: Value) -> (u16, Value) {
        self.action(
            id,
            json!({"os-terminate_connection": {"connector": connector}}),
        )
        .await
    }

    async fn snapshot(&self, volume: &str, force: bool) -> (u16, Value) {
        self.call(
            POST,
            &self.snaps(""),
            Some(json!({"snapshot": {"volume_id": volume, "force": force}})),
        )
        .await
    }

    /// An encrypted type (aes-xts-plain64) visible to everyone; its name.
    async fn encrypted_type(&self, name: &str, provider: &str, key_size: u32) -> String {
        let t = self.h.create_type(json!({"name": name})).await;
        self.h
            .admin_ok(
                POST,
                &format!("/v3/{}/types/{t}/encryption", self.h.admin_project),
                Some(
                    json!({"encryption": {"provider": provider, "cipher": "aes-xts-plain64",
                    "key_size": key_size, "control_location": "front-end"}}),
                ),
                200,
            )
            .await;
        name.to_string()
    }

    async fn secret(&self, body: Value) -> String {
        ref_id(&self.ok(POST, "/v1/secrets", Some(body), 201).await["secret_ref"])
    }

    /// Cinder's passphrase of a symmetric secret: the hex of its payload.
    async fn hex_key(&self, id: &str) -> Vec<u8> {
        let req = axum::http::Request::get(format!("/v1/secrets/{id}/payload"))
            .header("x-auth-token", &self.tok)
            .header("accept", "application/octet-stream")
            .body(axum::body::Body::empty())
            .unwrap();
        let (s, _, body) = self.h.raw(req).await;
        assert_eq!(s.as_u16(), 200);
        hex::encode(body).into_bytes()
    }

    async fn secret_ids(&self) -> Vec<(String, String)> {
        let v = self.ok(GET, "/v1/secrets?limit=100", None, 200).await;
        v["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    ref_id(&s["secret_ref"]),
                    s["name"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn objects(&self) -> Vec<ObjectRef> {
        self.dp.objects().into_iter().map(|o| o.object).collect()
    }
}

fn vol(id: &str) -> ObjectRef {
    ObjectRef::volume("default", id)
}

// ---------------------------------------------------------------------------------------
// creating → available | error, and delete

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_becomes_available_then_delete_removes_everything() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 2, "name": "a"})).await;
    let v = f.show(&id).await;
    assert_eq!(v["size"], 2);
    assert_eq!(v["volume_type"], "__DEFAULT__");
    assert_eq!(v["encrypted"], false);
    assert_eq!(v["os-vol-host-attr:host"], "test-node@default");
    assert_eq!(f.dp.size_of(&vol(&id)), Some(2 * GIB));
    f.ok(DELETE, &f.vols(&format!("/{id}")), None, 202).await;
    f.fault(GET, &f.vols(&format!("/{id}")), None, 404, "not found")
        .await;
    assert!(f.objects().is_empty());
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_ends_in_error_and_can_be_deleted() {
    let f = fx().await;
    f.dp.fail_next(Op::Create, DataPlaneError::failed("create", "disk on fire"));
    let (s, v) = f.create(json!({"size": 1})).await;
    assert_eq!(s, 202, "{v}");
    let id = id_of(&v, "volume");
    assert_eq!(f.wait(&id).await["status"], "error");
    assert_eq!(f.dp.calls().iter().filter(|o| **o == Op::Delete).count(), 1);
    // error: only delete is allowed.
    let (s, _) = f.action(&id, json!({"os-extend": {"new_size": 2}})).await;
    assert_eq!(s, 400);
    f.ok(DELETE, &f.vols(&format!("/{id}")), None, 202).await;
    f.fault(GET, &f.vols(&format!("/{id}")), None, 404, "not found")
        .await;
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creating_volume_refuses_everything_until_built() {
    let f = fx().await;
    let src = f.create_ok(json!({"size": 1})).await;
    let hold = f.dp.hold(Op::Create);
    let (s, v) = f.create(json!({"size": 1})).await;
    assert_eq!(s, 202, "{v}");
    let id = id_of(&v, "volume");
    hold.entered().await;
    assert_eq!(f.show(&id).await["status"], "creating");
    let url = f.vols(&format!("/{id}/action"));
    for (body, needle) in [
        (
            json!({"os-initialize_connection": {"connector": {}}}),
            "to be attached",
        ),
        (json!({"os-extend": {"new_size": 2}}), "to be extended"),
    ] {
        f.fault(POST, &url, Some(body), 400, needle).await;
    }
    f.fault(DELETE, &f.vols(&format!("/{id}")), None, 400, "is creating")
        .await;
    f.fault(
        POST,
        &f.vols(""),
        Some(json!({"volume": {"source_volid": id}})),
        400,
        "is creating",
    )
    .await;
    let (s, v) = f.snapshot(&id, false).await;
    assert_eq!(s, 400, "{v}");
    hold.release();
    assert_eq!(f.wait(&id).await["status"], "available");
    let _ = src;
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_creates_allocate_nothing() {
    let f = fx().await;
    for (body, status, needle) in [
        (json!({"size": 101}), 413, "does not fit"),
        (json!({"size": 0}), 400, "between 1 and"),
        (json!({}), 400, "`volume.size` is required"),
        (json!({"size": 1, "colour": "red"}), 400, "colour"),
        (json!({"size": 1, "metadata": {"a": 1}}), 400, "metadata"),
        (
            json!({"size": 1, "multiattach": "maybe"}),
            400,
            "multiattach",
        ),
        (json!({"size": 1, "imageRef": "img"}), 400, "imageRef"),
        (
            json!({"size": 1, "source_volid": "x", "snapshot_id": "y"}),
            400,
            "at most one",
        ),
        (json!({"size": 1, "volume_type": "nope"}), 404, "not found"),
        (
            json!({"size": 1, "encryption_key_id": "k"}),
            400,
            "is not encrypted",
        ),
        (json!({"source_volid": "nope"}), 404, "not found"),
        (json!({"snapshot_id": "nope"}), 404, "not found"),
    ] {
        f.fault(
            POST,
            &f.vols(""),
            Some(json!({ "volume": body })),
            status,
            needle,
        )
        .await;
    }
    // A type naming a pool this node lacks, and one naming the small pool.
    f.h.create_type(json!({"name": "elsewhere", "extra_specs": {"volume_backend_name": "nas"}}))
        .await;
    f.h.create_type(json!({"name": "quick", "extra_specs": {"volume_backend_name": "fast"}}))
        .await;
    f.fault(
        POST,
        &f.vols(""),
        Some(json!({"volume": {"size": 1, "volume_type": "elsewhere"}})),
        400,
        "names no storage pool",
    )
    .await;
    f.fault(
        POST,
        &f.vols(""),
        Some(json!({"volume": {"size": 4, "volume_type": "quick"}})),
        413,
        "storage pool fast",
    )
    .await;
    assert!(f.objects().is_empty());
    let v = f.ok(GET, &f.vols(""), None, 200).await;
    assert_eq!(v["volumes"], json!([]));
    let id = f
        .create_ok(json!({"size": 2, "volume_type": "quick"}))
        .await;
    assert_eq!(f.dp.objects()[0].object, ObjectRef::volume("fast", &id));
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_pools_answers_503() {
    let h = Harness::new(Backend::Sqlite).await;
    h.admin_fault(
        POST,
        &format!("/v3/{}/volumes", h.admin_project),
        Some(json!({"volume": {"size": 1}})),
        503,
        "no storage pool",
    )
    .await;
    h.finish().await;
}

// ---------------------------------------------------------------------------------------
// available ⇄ in-use

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_move_in_use_and_back() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    let nbd = f
        .attach(&id, json!({"protocol": "nbd", "host": "h1"}))
        .await;
    assert_eq!(nbd["driver_volume_type"], "nbd");
    let d = &nbd["data"];
    let aid = d["attachment_id"].as_str().unwrap().to_string();
    assert_eq!(d["export_name"], format!("{id}-{aid}"));
    assert_eq!(d["uri"], d["uris"][0]);
    assert!(d["uri"].as_str().unwrap().starts_with("nbd+unix:///"));
    assert_eq!(d["volume_id"], id.as_str());
    assert_eq!(d["encrypted"], false);
    assert_eq!(d["access_mode"], "rw");
    assert_eq!(f.show(&id).await["status"], "in-use");
    let vh = f
        .attach(&id, json!({"protocol": "vhost-user", "read_only": true}))
        .await;
    assert_eq!(vh["driver_volume_type"], "vhost-user");
    assert_eq!(vh["data"]["num_queues"], 2);
    assert_eq!(vh["data"]["access_mode"], "ro");
    assert!(vh["data"]["socket_path"].is_string());
    let vaid = vh["data"]["attachment_id"].as_str().unwrap().to_string();
    let v = f.show(&id).await;
    assert_eq!(v["attachments"].as_array().unwrap().len(), 2);
    assert_eq!(v["attachments"][0]["host_name"], "test-node");
    assert_eq!(f.dp.attachments(), {
        let mut a = vec![
            (id.clone(), aid.clone(), Protocol::Nbd, false),
            (id.clone(), vaid.clone(), Protocol::VhostUser, true),
        ];
        a.sort();
        a
    });

    // In use: no delete; bad connectors are refused.
    f.fault(DELETE, &f.vols(&format!("/{id}")), None, 400, "terminate")
        .await;
    let url = f.vols(&format!("/{id}/action"));
    f.fault(
        POST,
        &url,
        Some(json!({"os-initialize_connection": {"connector": {"protocol": "iscsi"}}})),
        400,
        "connector.protocol",
    )
    .await;
    f.fault(
        POST,
        &url,
        Some(json!({"os-terminate_connection": {"connector": {"attachment_id": "nope"}}})),
        400,
        "no matching attachment",
    )
    .await;
    f.fault(POST, &url, Some(json!({})), 400, "exactly one action")
        .await;

    // Detach one: still in use; detach the other (by protocol): available.
    let (s, _) = f.detach(&id, json!({"attachment_id": aid})).await;
    assert_eq!(s, 202);
    assert_eq!(f.show(&id).await["status"], "in-use");
    let (s, _) = f.detach(&id, json!({"protocol": "vhost-user"})).await;
    assert_eq!(s, 202);
    let v = f.show(&id).await;
    assert_eq!(v["status"], "available");
    assert_eq!(v["attachments"], json!([]));
    assert!(f.dp.attachments().is_empty());
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attach_leaves_the_volume_as_it_was() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    f.dp.fail_next(Op::Attach, DataPlaneError::failed("attach", "no socket"));
    f.fault(
        POST,
        &f.vols(&format!("/{id}/action")),
        Some(json!({"os-initialize_connection": {"connector": {}}})),
        500,
        "see the daemon log",
    )
    .await;
    let v = f.show(&id).await;
    assert_eq!(v["status"], "available");
    assert_eq!(v["attachments"], json!([]));
    f.dp.fail_next(Op::Attach, DataPlaneError::ShuttingDown);
    f.fault(
        POST,
        &f.vols(&format!("/{id}/action")),
        Some(json!({"os-initialize_connection": {"connector": {}}})),
        503,
        "shutting down",
    )
    .await;
    f.h.finish().await;
}

/// An attach whose data-plane part finishes after a delete took the volume is undone
/// (before: the attachment row and the live export outlived the volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_that_loses_to_a_delete_is_undone() {
    let f = Arc::new(fx().await);
    let id = f.create_ok(json!({"size": 1})).await;
    let attach_hold = f.dp.hold(Op::Attach);
    let delete_hold = f.dp.hold(Op::Delete);
    let (f2, id2) = (f.clone(), id.clone());
    let attach = tokio::spawn(async move {
        f2.action(&id2, json!({"os-initialize_connection": {"connector": {}}}))
            .await
    });
    attach_hold.entered().await;
    let (f3, id3) = (f.clone(), id.clone());
    let delete =
        tokio::spawn(async move { f3.call(DELETE, &f3.vols(&format!("/{id3}")), None).await });
    delete_hold.entered().await;
    assert_eq!(f.show(&id).await["status"], "deleting");
    attach_hold.release();
    let (s, v) = attach.await.unwrap();
    assert_eq!(s, 409, "{v}");
    assert!(
        v["conflictingRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("changed state"),
        "{v}"
    );
    assert!(f.dp.attachments().is_empty(), "the export was undone");
    delete_hold.release();
    let (s, v) = delete.await.unwrap();
    assert_eq!(s, 202, "{v}");
    assert!(f.objects().is_empty());
}

// ---------------------------------------------------------------------------------------
// extend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_grows_available_and_in_use_volumes() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    let url = f.vols(&format!("/{id}/action"));
    f.ok(POST, &url, Some(json!({"os-extend": {"new_size": 2}})), 202)
        .await;
    assert_eq!(f.show(&id).await["size"], 2);
    assert_eq!(f.dp.size_of(&vol(&id)), Some(2 * GIB));
    f.fault(
        POST,
        &url,
        Some(json!({"os-extend": {"new_size": 2}})),
        400,
        "larger than",
    )
    .await;
    f.fault(
        POST,
        &url,
        Some(json!({"os-extend": {"new_size": 200}})),
        413,
        "does not fit",
    )
    .await;
    f.attach(&id, json!({})).await;
    f.ok(POST, &url, Some(json!({"os-extend": {"new_size": 3}})), 202)
        .await;
    let v = f.show(&id).await;
    assert_eq!(
        (v["size"].clone(), v["status"].clone()),
        (json!(3), json!("in-use"))
    );
    // A data-plane failure leaves the recorded size alone.
    f.dp.fail_next(Op::Grow, DataPlaneError::failed("grow", "no"));
    f.fault(
        POST,
        &url,
        Some(json!({"os-extend": {"new_size": 4}})),
        500,
        "grow the volume",
    )
    .await;
    assert_eq!(f.show(&id).await["size"], 3);
    f.h.finish().await;
}

// ---------------------------------------------------------------------------------------
// deleting → back, error_deleting

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_cannot_lock_gives_the_volume_back() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    // An orchestrator holds the volume shared past the delete's wait.
    f.h.admin_ok(
        POST,
        "/v3/locks",
        Some(
            json!({"lock": {"resource_type": "volume", "resource_id": id, "mode": "shared",
            "operation": "backup", "ttl_s": 600}}),
        ),
        201,
    )
    .await;
    let (s, headers, _) =
        f.h.raw(
            axum::http::Request::delete(f.vols(&format!("/{id}")))
                .header("x-auth-token", &f.tok)
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s.as_u16(), 409);
    assert!(headers.get("retry-after").is_some());
    assert_eq!(f.show(&id).await["status"], "available", "given back");
    assert!(f.objects().contains(&vol(&id)));
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_the_data_plane_refuses_ends_in_error_deleting() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    f.dp.fail_next(Op::Delete, DataPlaneError::failed("delete", "EIO"));
    f.fault(
        DELETE,
        &f.vols(&format!("/{id}")),
        None,
        500,
        "delete the storage of volume",
    )
    .await;
    assert_eq!(f.show(&id).await["status"], "error_deleting");
    f.fault(
        DELETE,
        &f.vols(&format!("/{id}")),
        None,
        400,
        "error_deleting",
    )
    .await;
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deletes_race_one_wins() {
    let f = Arc::new(fx().await);
    let id = f.create_ok(json!({"size": 1})).await;
    let hold = f.dp.hold(Op::Delete);
    let (f2, id2) = (f.clone(), id.clone());
    let first =
        tokio::spawn(async move { f2.call(DELETE, &f2.vols(&format!("/{id2}")), None).await });
    hold.entered().await;
    // The second finds it deleting.
    let (s, v) = f.call(DELETE, &f.vols(&format!("/{id}")), None).await;
    assert_eq!(s, 400, "{v}");
    // And no clone of it starts.
    let (s, v) = f.create(json!({"source_volid": id})).await;
    assert_eq!(s, 409, "{v}");
    hold.release();
    assert_eq!(first.await.unwrap().0, 202);
}

// ---------------------------------------------------------------------------------------
// clones, snapshots, keys

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_volumes_clones_and_restores_get_their_own_keys() {
    let f = fx().await;
    f.encrypted_type("secure", "luks2", 512).await;
    let id = f
        .create_ok(json!({"size": 1, "volume_type": "secure"}))
        .await;
    let v = f.show(&id).await;
    assert_eq!(v["encrypted"], true);
    let key = v["encryption_key_id"].as_str().unwrap().to_string();
    assert_eq!(f.dp.luks_of(&vol(&id)), Some((LuksVersion::Luks2, 512)));
    let pass = f.hex_key(&key).await;
    assert_eq!(pass.len(), 128, "hex of a 512-bit key");
    assert!(f.dp.opens_with(&vol(&id), &pass));
    let e = f
        .ok(GET, &f.vols(&format!("/{id}/encryption")), None, 200)
        .await;
    assert_eq!(
        (e["provider"].clone(), e["key_size"].clone()),
        (json!("luks2"), json!(512))
    );
    let ci = f.attach(&id, json!({})).await;
    assert_eq!(ci["data"]["encrypted"], true);

    // A clone of the in-use volume: its own key, and the old one no longer opens it.
    let c = f.create_ok(json!({"source_volid": id})).await;
    let cv = f.show(&c).await;
    assert_eq!(cv["source_volid"], id.as_str());
    let ckey = cv["encryption_key_id"].as_str().unwrap().to_string();
    assert_ne!(ckey, key);
    assert!(f.dp.opens_with(&vol(&c), &f.hex_key(&ckey).await));
    assert!(!f.dp.opens_with(&vol(&c), &pass));

    // A snapshot (forced: in use) keeps a copy of the key; a restore into 2 GiB gets
    // its own.
    let (s, sv) = f.snapshot(&id, true).await;
    assert_eq!(s, 202, "{sv}");
    let sid = id_of(&sv, "snapshot");
    assert_eq!(f.wait_snap(&sid).await["status"], "available");
    let snap_obj = ObjectRef::snapshot("default", &sid);
    assert!(f.dp.opens_with(&snap_obj, &pass), "a snapshot is a copy");
    let r = f.create_ok(json!({"snapshot_id": sid, "size": 2})).await;
    let rv = f.show(&r).await;
    assert_eq!(
        (rv["size"].clone(), rv["snapshot_id"].clone()),
        (json!(2), json!(sid))
    );
    let rkey = rv["encryption_key_id"].as_str().unwrap().to_string();
    assert!(f.dp.opens_with(&vol(&r), &f.hex_key(&rkey).await));
    assert_eq!(f.dp.size_of(&vol(&r)), Some(2 * GIB));

    // A copy cannot change whether it is encrypted, nor shrink.
    f.fault(
        POST,
        &f.vols(""),
        Some(json!({"volume": {"source_volid": id, "volume_type": "__DEFAULT__"}})),
        400,
        "cannot change that",
    )
    .await;
    f.fault(
        POST,
        &f.vols(""),
        Some(json!({"volume": {"source_volid": r, "size": 1}})),
        400,
        "smaller than the source",
    )
    .await;
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_the_data_plane_refuses_ends_in_error() {
    let f = fx().await;
    f.encrypted_type("enc", "luks", 256).await;
    let id = f.create_ok(json!({"size": 1, "volume_type": "enc"})).await;
    f.dp.fail_next(
        Op::Clone,
        DataPlaneError::Unlock {
            what: "x".into(),
            detail: "wrong passphrase".into(),
        },
    );
    let (s, v) = f.create(json!({"source_volid": id})).await;
    assert_eq!(s, 202);
    let c = id_of(&v, "volume");
    assert_eq!(f.wait(&c).await["status"], "error");
    // Its owned key goes with it.
    let key = f.show(&c).await["encryption_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    f.ok(DELETE, &f.vols(&format!("/{c}")), None, 202).await;
    f.fault(GET, &format!("/v1/secrets/{key}"), None, 404, "not found")
        .await;
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_statuses_and_rules() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    f.attach(&id, json!({})).await;
    let (s, v) = f.snapshot(&id, false).await;
    assert_eq!(s, 400);
    assert!(v["badRequest"]["message"]
        .as_str()
        .unwrap()
        .contains("force"));
    let (s, v) = f.snapshot(&id, true).await;
    assert_eq!(s, 202, "{v}");
    let sid = id_of(&v, "snapshot");
    assert_eq!(v["snapshot"]["status"], "creating");
    assert_eq!(f.wait_snap(&sid).await["status"], "available");
    f.detach(&id, json!({})).await;
    // A volume with snapshots stays.
    f.fault(DELETE, &f.vols(&format!("/{id}")), None, 400, "snapshot(s)")
        .await;
    let list = f.ok(GET, &f.snaps(""), None, 200).await;
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);

    // creating: no delete, no restore.
    let hold = f.dp.hold(Op::Snapshot);
    let (_, v) = f.snapshot(&id, false).await;
    let s2 = id_of(&v, "snapshot");
    hold.entered().await;
    f.fault(
        DELETE,
        &f.snaps(&format!("/{s2}")),
        None,
        400,
        "is creating",
    )
    .await;
    f.fault(
        POST,
        &f.vols(""),
        Some(json!({"volume": {"snapshot_id": s2}})),
        400,
        "must be available",
    )
    .await;
    hold.release();
    assert_eq!(f.wait_snap(&s2).await["status"], "available");

    // A failed copy: error, its bytes removed; an error snapshot can be deleted.
    f.dp.fail_next(Op::Snapshot, DataPlaneError::Busy("v".into()));
    let (_, v) = f.snapshot(&id, false).await;
    let s3 = id_of(&v, "snapshot");
    assert_eq!(f.wait_snap(&s3).await["status"], "error");
    assert!(!f.objects().contains(&ObjectRef::snapshot("default", &s3)));
    for s in [&sid, &s2, &s3] {
        f.ok(DELETE, &f.snaps(&format!("/{s}")), None, 202).await;
    }
    f.ok(DELETE, &f.vols(&format!("/{id}")), None, 202).await;
    assert!(f.objects().is_empty());
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_delete_that_cannot_lock_gives_it_back() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    let (_, v) = f.snapshot(&id, false).await;
    let sid = id_of(&v, "snapshot");
    f.wait_snap(&sid).await;
    f.h.admin_ok(
        POST,
        "/v3/locks",
        Some(
            json!({"lock": {"resource_type": "snapshot", "resource_id": sid, "mode": "shared",
            "ttl_s": 600}}),
        ),
        201,
    )
    .await;
    f.fault(DELETE, &f.snaps(&format!("/{sid}")), None, 409, "locked")
        .await;
    assert_eq!(f.wait_snap(&sid).await["status"], "available");
    f.h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_delete_the_data_plane_refuses_ends_in_error_deleting() {
    let f = fx().await;
    let id = f.create_ok(json!({"size": 1})).await;
    let (_, v) = f.snapshot(&id, false).await;
    let sid = id_of(&v, "snapshot");
    f.wait_snap(&sid).await;
    f.dp.fail_next(Op::Delete, DataPlaneError::failed("delete", "EIO"));
    let url = f.snaps(&format!("/{sid}"));
    f.fault(DELETE, &url, None, 500, "delete the storage of snapshot")
        .await;
    assert_eq!(f.wait_snap(&sid).await["status"], "error_deleting");
    f.fault(DELETE, &url, None, 400, "error_deleting").await;
    f.h.finish().await;
}

/// Issue 11 (7): a snapshot keeps a copy of its volume's key; that copy is in use as
/// long as the snapshot exists (before: deleting it answered 204 and the snapshot
/// could never be restored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshots_key_cannot_be_deleted() {
    for backend in [Backend::Sqlite, Backend::MariaDb] {
        let f = fx_on(backend).await;
        f.encrypted_type("enc", "luks2", 512).await;
        let id = f.create_ok(json!({"size": 1, "volume_type": "enc"})).await;
        let key = f.show(&id).await["encryption_key_id"]
            .as_str()
            .unwrap()
            .to_string();
        let (_, v) = f.snapshot(&id, false).await;
        let sid = id_of(&v, "snapshot");
        f.wait_snap(&sid).await;
        let skey = f
            .secret_ids()
            .await
            .into_iter()
            .find(|(_, name)| *name == format!("snapshot-{sid}"))
            .map(|(k, _)| k)
            .expect("the snapshot's key");
        assert_ne!(skey, key);
        for k in [&skey, &key] {
            f.fault(DELETE, &format!("/v1/secrets/{k}"), None, 409, "used by 1")
                .await;
        }
        // The snapshot still restores.
        f.create_ok(json!({"snapshot_id": sid})).await;
        // Deleting the snapshot removes its key.
        f.ok(DELETE, &f.snaps(&format!("/{sid}")), None, 202).await;
        f.fault(GET, &format!("/v1/secrets/{skey}"), None, 404, "not found")
            .await;
        f.h.finish().await;
    }
}

/// Issue 11 (11): only `passphrase` secrets skip the algorithm/bit length/mode match;
/// an `opaque` (or `symmetric`) key that does not fit the type is refused naming the
/// field, and nothing is left behind (before: an opaque 64-bit DES key was accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_the_wrong_kind_is_refused() {
    let f = fx().await;
    f.encrypted_type("secure", "luks2", 512).await;
    let b64 = |n: usize| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(vec![7u8; n])
    };
    let opaque = |alg: &str, bits: u32, bytes: usize| {
        json!({"secret_type": "opaque", "algorithm": alg, "bit_length": bits, "payload": b64(bytes),
            "payload_content_type": "application/octet-stream", "payload_content_encoding": "base64"})
    };
    let des = f.secret(opaque("des", 64, 8)).await;
    let short = f.secret(opaque("aes", 256, 32)).await;
    let unset = f
        .secret(json!({"secret_type": "opaque", "algorithm": "aes", "payload": b64(64),
            "payload_content_type": "application/octet-stream", "payload_content_encoding": "base64"}))
        .await;
    let cbc = f
        .secret(
            json!({"secret_type": "symmetric", "algorithm": "aes", "mode": "cbc", "bit_length": 512,
            "payload": b64(64), "payload_content_type": "application/octet-stream",
            "payload_content_encoding": "base64"}),
        )
        .await;
    let before = f.secret_ids().await.len();
    for (key, needle) in [
        (&des, "algorithm is \"des\""),
        (&short, "bit_length is 256"),
        (&unset, "bit_length is unset"),
        (&cbc, "mode is \"cbc\""),
        (&"no-such".to_string(), "no such secret"),
    ] {
        f.fault(
            POST,
            &f.vols(""),
            Some(json!({"volume": {"size": 1, "volume_type": "secure", "encryption_key_id": key}})),
            400,
            needle,
        )
        .await;
    }
    assert!(f.objects().is_empty(), "nothing allocated");
    assert_eq!(
        f.ok(GET, &f.vols(""), None, 200).await["volumes"],
        json!([])
    );
    assert_eq!(f.secret_ids().await.len(), before, "no key ordered");

    // What fits: an opaque AES-512 key, a passphrase (used as-is).
    let good = f.secret(opaque("AES", 512, 64)).await;
    let id = f
        .create_ok(json!({"size": 1, "volume_type": "secure", "encryption_key_id": good}))
        .await;
    assert!(f.dp.opens_with(&vol(&id), &f.hex_key(&good).await));
    let words = f
        .secret(
            json!({"secret_type": "passphrase", "payload": "correct horse",
            "payload_content_type": "text/plain"}),
        )
        .await;
    let id = f
        .create_ok(json!({"size": 1, "volume_type": "secure", "encryption_key_id": words}))
        .await;
    assert!(f.dp.opens_with(&vol(&id), b"correct horse"));
    // A caller's key is not the volume's to delete.
    f.ok(DELETE, &f.vols(&format!("/{id}")), None, 202).await;
    f.ok(GET, &format!("/v1/secrets/{words}"), None, 200).await;
    f.h.finish().await;
}

// ---------------------------------------------------------------------------------------
// start-up reconciliation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_cleans_up_after_a_crash() {
    let f = fx().await;
    let st = f.h.control.state.clone();
    let creating = f.create_ok(json!({"size": 1})).await;
    let deleting = f.create_ok(json!({"size": 1})).await;
    let attached = f.create_ok(json!({"size": 1})).await;
    let info = f.attach(&attached, json!({"protocol": "vhost-user"})).await;
    let att_id = info["data"]["attachment_id"].as_str().unwrap().to_string();
    let ro = f.create_ok(json!({"size": 1})).await;
    let ro_info = f
        .attach(&ro, json!({"protocol": "nbd", "read_only": true}))
        .await;
    let lost = f.create_ok(json!({"size": 1})).await;
    f.attach(&lost, json!({})).await;
    let (_, v) = f.snapshot(&attached, true).await;
    let snap = id_of(&v, "snapshot");
    f.wait_snap(&snap).await;
    // What a SIGKILL leaves: rows mid-operation, a partial object, an orphan, and
    // something that is not Ember's.
    let db = &st.db().pool;
    for (sql, id) in [
        (
            "UPDATE volumes SET status = 'creating' WHERE id = ?",
            &creating,
        ),
        (
            "UPDATE volumes SET status = 'deleting' WHERE id = ?",
            &deleting,
        ),
        (
            "UPDATE snapshots SET status = 'creating' WHERE id = ?",
            &snap,
        ),
    ] {
        sqlx::query(sql).bind(id.clone()).execute(db).await.unwrap();
    }
    let orphan = uuid_like();
    for (id, partial) in [(orphan.as_str(), true), ("lost+found", false)] {
        f.dp.put_object(&StoredObject {
            object: vol(id),
            size: GIB,
            partial,
        });
    }
    // The process died: its front ends are gone. One volume's attachment cannot be
    // served again (its key is gone).
    f.dp.forget_attachments();
    sqlx::query("UPDATE volumes SET encryption_key_id = 'no-such-key' WHERE id = ?")
        .bind(lost.clone())
        .execute(db)
        .await
        .unwrap();
    let rep = reconcile(&st).await.unwrap();
    assert_eq!(rep.marked_error, 2, "{rep:?}");
    assert_eq!(rep.deletes_finished, 1, "{rep:?}");
    assert_eq!(rep.attachments_restored, 2, "{rep:?}");
    assert_eq!(rep.attachments_dropped, 1, "{rep:?}");
    assert_eq!(rep.objects_removed, 1, "{rep:?}");
    assert_eq!(f.show(&creating).await["status"], "error");
    // Served again under the same attachment id, protocol and access mode (so at the
    // same endpoint); the one that failed is dropped and its volume available.
    let mut live = f.dp.attachments();
    live.sort();
    let mut want = vec![
        (attached.clone(), att_id.clone(), Protocol::VhostUser, false),
        (
            ro.clone(),
            ro_info["data"]["attachment_id"]
                .as_str()
                .unwrap()
                .to_string(),
            Protocol::Nbd,
            true,
        ),
    ];
    want.sort();
    assert_eq!(live, want);
    assert_eq!(f.show(&attached).await["status"], "in-use");
    let v = f.show(&ro).await;
    assert_eq!(v["status"], "in-use");
    assert_eq!(v["attachments"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(f.show(&lost).await["status"], "available");
    assert!(f.show(&lost).await["attachments"]
        .as_array()
        .unwrap()
        .is_empty());
    f.fault(
        GET,
        &f.vols(&format!("/{deleting}")),
        None,
        404,
        "not found",
    )
    .await;
    assert_eq!(f.wait_snap(&snap).await["status"], "error");
    let left = f.objects();
    assert!(left.contains(&vol("lost+found")), "not Ember's: kept");
    assert!(left.contains(&vol(&attached)));
    for gone in [vol(&creating), vol(&deleting), vol(&orphan)] {
        assert!(!left.contains(&gone), "{gone} {left:?}");
    }
    f.h.finish().await;
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Issue 11 (10): two nodes share one pool and one database. Node B makes a volume
/// while node A's start-up pass is listing the pool; A must not take it for an orphan.
/// (Reading the database before listing the pool deleted it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_spares_another_nodes_new_volume() {
    let dp = mem();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for d in &dirs {
        std::fs::write(d.path().join("master.key"), [9u8; 32]).unwrap();
    }
    let db = format!("sqlite://{}/shared.db", dirs[0].path().display());
    let [d0, d1] = dirs;
    let a = Harness::open(d0, db.clone(), None, "node-a", dp.clone()).await;
    let b = Harness::open(d1, db, None, "node-b", dp.clone()).await;
    let project = b.project("shared").await;
    let hold = dp.hold(Op::Inventory);
    let st = a.control.state.clone();
    let pass = tokio::spawn(async move { reconcile(&st).await });
    hold.entered().await;
    // B creates a volume (row, then bytes) while A lists the pool.
    let url = format!("/v3/{project}/volumes");
    let body = json!({"volume": {"size": 1}});
    let id = id_of(&b.admin_ok(POST, &url, Some(body), 202).await, "volume");
    let t = Instant::now();
    while !dp.objects().iter().any(|o| o.object == vol(&id)) {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hold.release();
    let rep = pass.await.unwrap().unwrap();
    assert_eq!(rep.objects_removed, 0, "{rep:?}");
    assert!(dp.objects().iter().any(|o| o.object == vol(&id)));
    let v = b
        .admin_ok(GET, &format!("/v3/{project}/volumes/{id}"), None, 200)
        .await;
    assert_eq!(v["volume"]["status"], "available");
}
