//! Lock tests on SQLite (temp file) and MariaDB (`EMBER_TEST_MYSQL_URL`).

use super::*;
use sqlx::any::AnyPoolOptions;

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

use super::conformance::*;

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
                super::$name(&[l]).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mariadb() {
                super::$name(&[super::mysql().await]).await;
            }
        }
    };
}

both!(readers_share_writers_exclude);
both!(waiting_writer_blocks_new_readers);
both!(expired_leases_are_reaped);
both!(concurrent_history_is_exclusive);
