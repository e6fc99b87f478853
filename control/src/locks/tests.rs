//! Lock tests on SQLite (temp file) and MariaDB (`EMBER_TEST_MYSQL_URL`).

use super::*;
use sqlx::any::AnyPoolOptions;
use std::sync::Arc;

async fn sqlite() -> (Locks, tempfile::TempDir) {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/locks.db?mode=rwc", dir.path().display());
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let l = Locks::new(pool, false, "node-a");
    l.create_tables().await.unwrap();
    (l, dir)
}

fn mysql_url() -> String {
    std::env::var("EMBER_TEST_MYSQL_URL").unwrap_or_else(|_| {
        panic!(
            "EMBER_TEST_MYSQL_URL is not set: the MariaDB lock tests need it, e.g. \
             mysql://ember:ember@127.0.0.1:3306/ember_test (see control/README.md)"
        )
    })
}

async fn mysql() -> Locks {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let base = mysql_url();
    let name = format!("ember_locks_{}", uuid::Uuid::new_v4().simple());
    let mut c = sqlx::AnyConnection::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut c)
        .await
        .unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    let url = format!("{head}/{name}");
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let l = Locks::new(pool, true, "node-a");
    l.create_tables().await.unwrap();
    // Twice: migrations must be idempotent.
    l.create_tables().await.unwrap();
    l
}

fn req(mode: Mode, op: &str, wait_ms: u64) -> LockRequest {
    LockRequest::new("volume", "v1", mode, op, Duration::from_millis(wait_ms))
}

/// One attempt at the test lock (`volume` `v1`): the holder, or None when refused.
async fn try_take(l: &Locks, mode: Mode, op: &str) -> Option<Holder> {
    l.try_acquire(&req(mode, op, 0)).await.unwrap()
}

async fn readers_share_writers_exclude(l: Locks) {
    let a = try_take(&l, Mode::Shared, "clone").await.unwrap();
    let b = try_take(&l, Mode::Shared, "clone").await.unwrap();
    assert!(try_take(&l, Mode::Exclusive, "delete").await.is_none());
    let info = l.list(None, false).await.unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].readers, 2);
    assert_eq!(info[0].writer, None);
    assert!(
        info[0].waiters.is_empty(),
        "a refused try_acquire withdraws"
    );
    assert!(l.release(&a.id).await.unwrap());
    assert!(!l.release(&a.id).await.unwrap(), "double release");
    assert!(l.release(&b.id).await.unwrap());
    let w = try_take(&l, Mode::Exclusive, "delete").await.unwrap();
    assert!(try_take(&l, Mode::Shared, "clone").await.is_none());
    assert!(try_take(&l, Mode::Exclusive, "extend").await.is_none());
    assert_eq!(
        l.list(None, false).await.unwrap()[0].writer.as_deref(),
        Some(w.id.as_str())
    );
    l.release(&w.id).await.unwrap();
    assert!(l.list(None, false).await.unwrap().is_empty());
    assert_eq!(l.list(None, true).await.unwrap().len(), 1);
    check_history(&l.history("volume", "v1").await.unwrap()).unwrap();
}

async fn waiting_writer_blocks_new_readers(l: Locks) {
    let r = try_take(&l, Mode::Shared, "clone").await.unwrap();
    let l2 = l.clone();
    let writer =
        tokio::spawn(async move { l2.acquire(&req(Mode::Exclusive, "delete", 20_000)).await });
    // Wait until the writer is recorded as waiting.
    let mut waited = false;
    for _ in 0..500 {
        let info = l.list(None, false).await.unwrap();
        if info.first().is_some_and(|i| !i.waiters.is_empty()) {
            waited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waited, "writer never recorded as waiting");
    // A new reader is refused while the writer waits (no starvation)...
    match l.acquire(&req(Mode::Shared, "clone", 100)).await {
        Err(LockError::Busy {
            why, retry_after, ..
        }) => {
            assert!(why.contains("writer is waiting"), "{why}");
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
    // ...and the writer gets it once the reader leaves.
    l.release(&r.id).await.unwrap();
    let w = writer.await.unwrap().unwrap();
    assert_eq!(w.mode, Mode::Exclusive);
    l.release(&w.id).await.unwrap();
    let h = l.history("volume", "v1").await.unwrap();
    check_history(&h).unwrap();
    assert_eq!(h.len(), 2);
}

async fn expired_leases_are_reaped(l: Locks) {
    let short = l.clone().with_lease(Duration::from_secs(4));
    let dead = try_take(&short, Mode::Exclusive, "delete").await.unwrap();
    assert!(try_take(&l, Mode::Exclusive, "delete").await.is_none());
    // The heartbeat renews it...
    assert_eq!(short.renew_node().await.unwrap(), 1);
    let renewed = l.holder(&dead.id).await.unwrap().unwrap();
    assert!(renewed.lease_until >= dead.lease_until);
    assert!(try_take(&l, Mode::Shared, "clone").await.is_none());
    // ...and without heartbeats it expires: the next acquirer reaps it.
    let got = l
        .acquire(&req(Mode::Shared, "clone", 60_000))
        .await
        .unwrap();
    let h = l.history("volume", "v1").await.unwrap();
    assert_eq!(h[0].holder_id, dead.id);
    assert_eq!(h[0].release_reason.as_deref(), Some("expired"));
    check_history(&h).unwrap();
    assert!(!l.release(&dead.id).await.unwrap());
    // A restarted node drops its old holders at once.
    assert_eq!(l.release_node("node-a").await.unwrap(), 1);
    assert!(l.holder(&got.id).await.unwrap().is_none());
    // reap() finds expired holders without an acquirer.
    let tiny = l.clone().with_lease(Duration::from_millis(100));
    let e = try_take(&tiny, Mode::Shared, "clone").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(l.reap().await.unwrap(), 1);
    assert!(l.holder(&e.id).await.unwrap().is_none());
}

async fn concurrent_history_is_exclusive(l: Locks) {
    let l = Arc::new(l);
    let mut tasks = Vec::new();
    for t in 0..6 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..12 {
                let mode = if (t + i) % 3 == 0 {
                    Mode::Exclusive
                } else {
                    Mode::Shared
                };
                let h = l.acquire(&req(mode, "test", 60_000)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
                assert!(l.release(&h.id).await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = l.history("volume", "v1").await.unwrap();
    assert_eq!(h.len(), 72);
    assert!(h.iter().all(|e| e.released_gen.is_some()));
    check_history(&h).unwrap();
}

#[test]
fn history_checker_finds_overlaps() {
    let e = |mode, a, r: Option<i64>| HistoryEntry {
        holder_id: format!("{a}"),
        mode,
        node: "n".into(),
        operation: "o".into(),
        acquired_at: 0,
        acquired_gen: a,
        released_at: None,
        released_gen: r,
        release_reason: None,
    };
    check_history(&[e(Mode::Shared, 1, Some(5)), e(Mode::Shared, 2, Some(3))]).unwrap();
    check_history(&[e(Mode::Exclusive, 1, Some(2)), e(Mode::Shared, 2, Some(3))]).unwrap();
    assert!(check_history(&[e(Mode::Exclusive, 1, Some(3)), e(Mode::Shared, 2, Some(4))]).is_err());
    assert!(check_history(&[e(Mode::Shared, 1, None), e(Mode::Exclusive, 7, Some(9))]).is_err());
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (l, _dir) = super::sqlite().await;
                super::$name(l).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mariadb() {
                super::$name(super::mysql().await).await;
            }
        }
    };
}

both!(readers_share_writers_exclude);
both!(waiting_writer_blocks_new_readers);
both!(expired_leases_are_reaped);
both!(concurrent_history_is_exclusive);
