//! Two nodes starting at once on one database (the cluster case): bootstrap races are
//! resolved, both nodes register, and objects made through one node are served by the
//! other (same master key file).

mod common;

use axum::http::Method;
use common::{fresh_mysql_db, mysql_base_url, ref_id, Harness};
use ember_control::dataplane::mem::MemDataPlane;
use ember_control::{Control, ControlConfig};
use serde_json::json;
use std::sync::Arc;

async fn two_nodes(database: String, mysql: Option<(String, String)>) {
    let shared = tempfile::tempdir().unwrap();
    let key = shared.path().join("master.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let cfg = |i: usize| ControlConfig {
        master_key_file: Some(key.clone()),
        ..ControlConfig::new(
            dirs[i].path().to_path_buf(),
            database.clone(),
            format!("node-{i}"),
            format!("127.0.0.1:{}", 9000 + i),
        )
    };
    let (c0, c1) = (cfg(0), cfg(1));
    let (a, b) = tokio::join!(
        Control::open(&c0, Arc::new(MemDataPlane::new())),
        Control::open(&c1, Arc::new(MemDataPlane::new()))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    drop(b);
    // Node 0 as a harness; node 1 re-opened as a second harness over the same database.
    drop(a);
    let [d0, d1] = dirs;
    // The harness reads DATA/master.key: give both nodes the shared key there.
    for d in [&d0, &d1] {
        std::fs::copy(&key, d.path().join("master.key")).unwrap();
    }
    let h0 = Harness::with_database(d0, database.clone(), None).await;
    let h1 = Harness::with_database(d1, database.clone(), mysql).await;
    // One admin project, one default type, one copy of each standard namespace.
    let (_, v) = h0
        .call(Method::GET, "/v3/projects", Some(&h0.admin), None)
        .await;
    let admins = v["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "admin")
        .count();
    assert_eq!(admins, 1, "{v}");
    assert_eq!(h0.admin_project, h1.admin_project);
    let v = h1
        .admin_ok(
            Method::GET,
            &format!("/v3/{}/types", h1.admin_project),
            None,
            200,
        )
        .await;
    assert_eq!(v["volume_types"].as_array().unwrap().len(), 1, "{v}");
    let v = h1
        .admin_ok(Method::GET, "/v2/metadefs/namespaces", None, 200)
        .await;
    assert_eq!(v["namespaces"].as_array().unwrap().len(), 2, "{v}");
    // Each node's admin token works on the other node.
    let (s, _) = h1
        .call(Method::GET, "/v3/auth/tokens", Some(&h0.admin), None)
        .await;
    assert_eq!(s, 200);
    // A secret stored through node 0 is served by node 1.
    let (s, v) = h0
        .call(
            Method::POST,
            "/v1/secrets",
            Some(&h0.admin),
            Some(json!({"payload": "shared", "payload_content_type": "text/plain", "secret_type": "passphrase"})),
        )
        .await;
    assert_eq!(s, 201);
    let id = ref_id(&v["secret_ref"]);
    let pp = ember_control::keys::unlock_passphrase(&h1.control.state, &h1.admin_project, &id)
        .await
        .unwrap();
    assert_eq!(&pp[..], b"shared");
    // Both nodes are registered.
    let rows: Vec<(String,)> = sqlx::query_as("SELECT name FROM nodes ORDER BY name")
        .fetch_all(&h1.control.state.db().pool)
        .await
        .unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert!(
        names.contains(&"node-0") && names.contains(&"node-1") && names.contains(&"test-node"),
        "{names:?}"
    );
    drop(h0);
    h1.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sqlite() {
    let d = tempfile::tempdir().unwrap();
    two_nodes(format!("sqlite://{}/shared.db", d.path().display()), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_mariadb() {
    let base = mysql_base_url();
    let (url, name) = fresh_mysql_db().await;
    two_nodes(url, Some((base, name))).await;
}
