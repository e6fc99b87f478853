//! A database that goes away gives 503 (Cinder body, `Retry-After`), and the daemon
//! recovers by itself when it comes back. MariaDB is reached through a TCP proxy that
//! the test cuts and restores.

mod common;

use axum::http::Method;
use common::{fields, fresh_mysql_db, mysql_base_url, Harness};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

struct Proxy {
    port: u16,
    target: String,
    tasks: Option<JoinSet<()>>,
}

impl Proxy {
    async fn start(port: u16, target: String) -> Proxy {
        let mut p = Proxy {
            port,
            target,
            tasks: None,
        };
        p.up().await;
        p
    }

    async fn up(&mut self) {
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.port = listener.local_addr().unwrap().port();
        let target = self.target.clone();
        let mut set = JoinSet::new();
        set.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        self.tasks = Some(set);
    }

    async fn down(&mut self) {
        // Aborting the accept task drops the listener and every connection task.
        if let Some(mut set) = self.tasks.take() {
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
    }
}

fn host_port(url: &str) -> String {
    let after = url
        .split_once('@')
        .map(|x| x.1)
        .unwrap_or_else(|| url.split_once("://").map(|x| x.1).unwrap_or(url));
    let hp = after.split(['/', '?']).next().unwrap_or_default();
    assert!(
        !hp.is_empty() && hp != "localhost",
        "EMBER_TEST_MYSQL_URL must name a TCP host:port for this test (got {url})"
    );
    if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:3306")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_503_then_recovers() {
    let base = mysql_base_url();
    let (url, name) = fresh_mysql_db().await;
    let target = host_port(&base);
    let mut proxy = Proxy::start(0, target.clone()).await;
    let via_proxy = url.replacen(&target, &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(via_proxy, url, "could not route {url} through the proxy");
    let h =
        Harness::with_database(tempfile::tempdir().unwrap(), via_proxy, Some((base, name))).await;
    let uri = format!("/v3/{}/types", h.admin_project);
    h.admin_ok(Method::GET, &uri, None, 200).await;

    proxy.down().await;
    let (s, v) = h.call(Method::GET, &uri, Some(&h.admin), None).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["serviceUnavailable"]["code"], 503, "{v}");
    let (s, v) = h
        .call(
            Method::POST,
            &uri,
            Some(&h.admin),
            Some(json!({"volume_type": {"name": "during-outage"}})),
        )
        .await;
    assert_eq!(s, 503, "{v}");

    proxy.up().await;
    let t = Instant::now();
    loop {
        let (s, _) = h.call(Method::GET, &uri, Some(&h.admin), None).await;
        if s == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "did not recover after the database came back (last {s})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.admin_ok(
        Method::POST,
        &uri,
        Some(json!({"volume_type": {"name": "after-outage"}})),
        200,
    )
    .await;
    let v = h.admin_ok(Method::GET, &uri, None, 200).await;
    let names = fields(&v, "volume_types", "name");
    assert!(
        names.contains(&"after-outage") && !names.contains(&"during-outage"),
        "{names:?}"
    );
    h.finish().await;
}
