//! The store: one `sqlx::Any` pool over SQLite (default, a file in the data dir) or
//! MariaDB/MySQL (`mysql://…`, shared by the nodes of a cluster).
//!
//! One code path serves both: queries use `?` placeholders and portable SQL
//! (`VARCHAR`, `BIGINT`, `TEXT`), booleans are `BIGINT` 0/1, timestamps are RFC 3339
//! strings, binary data is base64 text. The only per-dialect piece is the table suffix
//! (`ENGINE=InnoDB … COLLATE utf8mb4_nopad_bin` so names compare byte-wise, trailing spaces included, on MariaDB as on
//! SQLite). Upserts are written as "update, insert if nothing was updated" inside a
//! transaction instead of `ON CONFLICT`/`ON DUPLICATE KEY`.
//!
//! Migrations are an ordered list of statements numbered by schema version, applied at
//! start-up; `schema_version` records the versions applied. Every table that
//! describes something node-local carries a `node_id` column so several nodes can share
//! one database.
//!
//! Write transactions go through one retry wrapper, [`retry`] (or [`Db::write`], which
//! also begins the transaction), like oslo.db's `wrap_db_retry(retry_on_deadlock=True)`:
//! on Galera `SELECT … FOR UPDATE` does not lock across members, and a conflicting
//! transaction of another member surfaces as deadlock 1213 (a certification failure or
//! a brute-force abort) at any statement or at commit. So the *whole* transaction is run
//! again — never one statement — on MariaDB 1213 (deadlock, certification failure), 1205
//! (lock wait timeout), SQLSTATE 40001, SQLite BUSY/LOCKED, and a pool with every
//! connection busy; with exponential back-off from [`RetryPolicy::first_delay`] doubling
//! to [`RetryPolicy::max_delay`], each delay scaled by a random factor in [0.5, 1.5)
//! so two losers do not collide again in step, for at most [`RetryPolicy::attempts`]
//! attempts; then the last error is returned and logged as "gave up". SQLite, one
//! MariaDB and Galera take the same path. A transaction body must therefore have no side
//! effect outside the database before its commit (it may run several times), and must
//! take its inputs by clone. [`retries_seen`] counts the re-runs of this process (logs
//! and tests).

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// SQL dialect of the connected database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
}

/// A handle to the database (cheap to clone).
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub dialect: Dialect,
}

/// Connection used inside a transaction.
pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// A schema migration: its version and statements (see [`crate::schema`]).
pub type Migration = (i64, &'static [&'static str]);

impl Db {
    /// Connect to `url` (`sqlite://PATH` or `mysql://…`). SQLite files are created if missing.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            let url = if rest.contains('?') || rest.contains(":memory:") {
                url.to_string()
            } else {
                format!("{url}?mode=rwc")
            };
            (Dialect::Sqlite, url)
        } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            (Dialect::MySql, url.replacen("mariadb:", "mysql:", 1))
        } else {
            anyhow::bail!("unsupported database URL {url:?}: use sqlite://PATH or mysql://USER:PASSWORD@HOST/DB");
        };
        // SQLite allows one writer; a single connection avoids SQLITE_BUSY on lock upgrades.
        let max = if dialect == Dialect::Sqlite { 1 } else { 8 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(true)
            .connect(&url)
            .await
            .with_context(|| format!("connect to the database ({})", redact(&url)))?;
        Ok(Db { pool, dialect })
    }

    /// Table options appended to `CREATE TABLE`.
    fn table_suffix(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::MySql => " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin",
        }
    }

    /// Apply the pending ones of `migrations` (in order; each version once).
    pub async fn migrate(&self, migrations: &[Migration]) -> anyhow::Result<()> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL PRIMARY KEY, applied_at VARCHAR(40) NOT NULL){}",
            self.table_suffix()
        );
        sqlx::query(AssertSqlSafe(create))
            .execute(&self.pool)
            .await
            .context("create schema_version")?;
        for (version, stmts) in migrations {
            let done: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM schema_version WHERE version = ?")
                    .bind(*version)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?;
            if done > 0 {
                continue;
            }
            // DDL is idempotent (IF NOT EXISTS) because MariaDB commits DDL implicitly;
            // a second node racing us simply finds the tables there.
            for stmt in *stmts {
                let sql = if stmt.starts_with("CREATE TABLE") {
                    format!("{stmt}{}", self.table_suffix())
                } else {
                    stmt.to_string()
                };
                match sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await {
                    Ok(_) => {}
                    // ADD COLUMN / CREATE INDEX have no portable IF NOT EXISTS: a second
                    // node migrating at the same time finds them done.
                    Err(sqlx::Error::Database(d))
                        if d.message()
                            .to_ascii_lowercase()
                            .contains("duplicate column name")
                            || d.message().contains("Duplicate key name")
                            || (stmt.starts_with("CREATE INDEX")
                                && d.message().contains("already exists")) => {}
                    Err(e) => {
                        return Err(
                            anyhow::Error::new(e).context(format!("migration {version}: {stmt}"))
                        )
                    }
                }
            }
            let r = sqlx::query("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)")
                .bind(*version)
                .bind(now())
                .execute(&self.pool)
                .await;
            match r {
                Ok(_) => tracing::info!(version, "applied database migration"),
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Start a transaction.
    pub async fn begin(&self) -> Result<Tx<'static>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Start a write transaction: on SQLite `BEGIN IMMEDIATE` takes the write lock up
    /// front (a deferred transaction that reads and then writes can fail with BUSY on the
    /// upgrade, after work that must then be redone anyway).
    pub async fn begin_write(&self) -> Result<Tx<'static>, sqlx::Error> {
        begin_write(&self.pool, self.dialect).await
    }

    /// Run the write transaction `body` with [`DEFAULT_RETRY`]: each attempt gets a new
    /// transaction from [`Db::begin_write`] and must commit it itself; `what` names it in
    /// logs.
    pub async fn write<T, E, F, Fut>(&self, what: &str, mut body: F) -> Result<T, E>
    where
        E: Retryable + From<sqlx::Error>,
        F: FnMut(Tx<'static>) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut backoff = Backoff::new(DEFAULT_RETRY);
        loop {
            let r = match self.begin_write().await {
                Ok(tx) => body(tx).await,
                Err(e) => Err(E::from(e)),
            };
            match r {
                Err(e) if e.is_retryable() && backoff.wait(what).await => {}
                r => return r,
            }
        }
    }
}

/// Begin a write transaction on `pool` (see [`Db::begin_write`]).
pub async fn begin_write(pool: &AnyPool, dialect: Dialect) -> Result<Tx<'static>, sqlx::Error> {
    match dialect {
        Dialect::MySql => pool.begin().await,
        Dialect::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
    }
}

/// How a conflicting write transaction is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included).
    pub attempts: u32,
    /// Delay before the second attempt (then doubled each time).
    pub first_delay: Duration,
    /// Longest delay between two attempts.
    pub max_delay: Duration,
}

/// oslo.db's defaults are 10 attempts (0.5 s doubling to 10 s); a control-plane
/// transaction here is a few short statements, so retries start sooner and are more: 20
/// attempts, 5 ms doubling to 500 ms, at most about 6 s of back-off in all.
pub const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    attempts: 20,
    first_delay: Duration::from_millis(5),
    max_delay: Duration::from_millis(500),
};

/// An error that says whether re-running the whole transaction may succeed.
pub trait Retryable {
    /// Deadlock, certification failure, lock wait timeout, busy: run it again.
    fn is_retryable(&self) -> bool;
}

impl Retryable for sqlx::Error {
    fn is_retryable(&self) -> bool {
        is_retryable(self)
    }
}

/// Deadlock, lock wait timeout, or SQLite busy/locked: run the transaction again.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        // Every connection busy (SQLite has one): wait for it rather than fail.
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.to_string()).unwrap_or_default();
            // MySQL 1213 ER_LOCK_DEADLOCK (Galera reports certification failures and
            // brute-force aborts with it), 1205 ER_LOCK_WAIT_TIMEOUT, 40001 SQLSTATE
            // serialization failure; SQLite 5 BUSY, 6 LOCKED, 517 BUSY_SNAPSHOT.
            matches!(code.as_str(), "1213" | "1205" | "40001" | "5" | "6" | "517")
                || d.message().contains("database is locked")
                || d.message().contains("Deadlock found")
        }
        _ => false,
    }
}

static RETRIES: AtomicU64 = AtomicU64::new(0);
static GAVE_UP: AtomicU64 = AtomicU64::new(0);

/// Transactions re-run by [`retry`] in this process so far.
pub fn retries_seen() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

/// Transactions [`retry`] gave up on (attempts exhausted) in this process so far.
pub fn retries_exhausted() -> u64 {
    GAVE_UP.load(Ordering::Relaxed)
}

/// Run `attempt` (one whole transaction: begin … commit) until it succeeds, fails with
/// an error that is not [`Retryable`], or `policy.attempts` are used up.
pub async fn retry<T, E, F, Fut>(policy: RetryPolicy, what: &str, mut attempt: F) -> Result<T, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(policy);
    loop {
        match attempt().await {
            Err(e) if e.is_retryable() && backoff.wait(what).await => {}
            r => return r,
        }
    }
}

/// The attempts and delays of one retried transaction.
struct Backoff {
    policy: RetryPolicy,
    /// Attempts made so far.
    made: u32,
    delay: Duration,
}

impl Backoff {
    fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            made: 1,
            delay: policy.first_delay,
        }
    }

    /// After a conflicting attempt: sleep and return true when another attempt is
    /// allowed, false (counted and logged) when they are used up.
    async fn wait(&mut self, what: &str) -> bool {
        if self.made >= self.policy.attempts {
            GAVE_UP.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                what,
                attempts = self.made,
                "database transaction still conflicting; gave up"
            );
            return false;
        }
        RETRIES.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            what,
            attempt = self.made,
            "database transaction conflicted (deadlock, certification or busy); running it again"
        );
        tokio::time::sleep(jitter(self.delay)).await;
        self.delay = self.delay.saturating_mul(2).min(self.policy.max_delay);
        self.made += 1;
        true
    }
}

/// `d` scaled by a random factor in [0.5, 1.5).
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        u16::MAX / 2
    };
    d.mul_f64(0.5 + f64::from(r) / f64::from(u16::MAX))
}

/// Hide the password of a database URL for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Current time, RFC 3339 UTC with second precision.
pub fn now() -> String {
    fmt_time(time::OffsetDateTime::now_utc())
}

/// Format a timestamp like [`now`].
pub fn fmt_time(t: time::OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A fresh UUID v4 string.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Read a nullable text column.
pub fn opt_str(row: &AnyRow, col: &str) -> Result<Option<String>, sqlx::Error> {
    row.try_get::<Option<String>, _>(col)
}

/// Read a text column.
pub fn get_str(row: &AnyRow, col: &str) -> Result<String, sqlx::Error> {
    row.try_get::<String, _>(col)
}

/// Read an integer column.
pub fn get_i64(row: &AnyRow, col: &str) -> Result<i64, sqlx::Error> {
    row.try_get::<i64, _>(col)
}

/// `COUNT(*) AS n` helper.
pub async fn count(
    tx: &mut sqlx::AnyConnection,
    sql: &'static str,
    arg: &str,
) -> Result<i64, sqlx::Error> {
    count_args(tx, sql, &[arg]).await
}

/// `COUNT(*) AS n` helper for several text arguments.
pub async fn count_args(
    conn: &mut sqlx::AnyConnection,
    sql: &'static str,
    args: &[&str],
) -> Result<i64, sqlx::Error> {
    let row = with_args(sql, args).fetch_one(&mut *conn).await?;
    get_i64(&row, "n")
}

/// Run a statement (`DELETE`, `UPDATE`) with text arguments; the number of rows it touched.
pub async fn execute_args(
    conn: &mut sqlx::AnyConnection,
    sql: &'static str,
    args: &[&str],
) -> Result<u64, sqlx::Error> {
    Ok(with_args(sql, args)
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// The row a `SELECT` with text arguments finds, if any.
pub async fn fetch_optional_args(
    conn: &mut sqlx::AnyConnection,
    sql: &'static str,
    args: &[&str],
) -> Result<Option<AnyRow>, sqlx::Error> {
    with_args(sql, args).fetch_optional(&mut *conn).await
}

/// `sql` with its text arguments bound in order.
fn with_args(
    sql: &'static str,
    args: &[&str],
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    args.iter()
        .fold(sqlx::query(sql), |q, a| q.bind(a.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("mysql://u:secret@localhost/db"),
            "mysql://u:***@localhost/db"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[derive(Debug)]
    struct Conflict(bool);

    impl Retryable for Conflict {
        fn is_retryable(&self) -> bool {
            self.0
        }
    }

    const QUICK: RetryPolicy = RetryPolicy {
        attempts: 4,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };

    #[tokio::test]
    async fn retry_reruns_conflicts_until_success() {
        let mut n = 0u32;
        let r = retry(QUICK, "test", || {
            n += 1;
            let k = n;
            async move {
                if k < 3 {
                    Err(Conflict(true))
                } else {
                    Ok(k)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
    }

    #[tokio::test]
    async fn retry_gives_up_after_the_attempts() {
        let gave_up = retries_exhausted();
        let mut n = 0u32;
        let r: Result<(), Conflict> = retry(QUICK, "test", || {
            n += 1;
            async { Err(Conflict(true)) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n, QUICK.attempts);
        assert!(retries_exhausted() > gave_up);
        // Anything else is returned at once.
        let mut n = 0u32;
        let r: Result<(), Conflict> = retry(QUICK, "test", || {
            n += 1;
            async { Err(Conflict(false)) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn write_runs_the_whole_transaction_again() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}/t.db", dir.path().display()))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n BIGINT NOT NULL)")
            .execute(&db.pool)
            .await
            .unwrap();
        let mut attempts = 0;
        let r: Result<(), sqlx::Error> = db
            .write("test", |mut tx| {
                attempts += 1;
                let first = attempts == 1;
                async move {
                    sqlx::query("INSERT INTO t (n) VALUES (1)")
                        .execute(&mut *tx)
                        .await?;
                    if first {
                        // A conflict after a write: the write is rolled back with it.
                        return Err(sqlx::Error::PoolTimedOut);
                    }
                    tx.commit().await
                }
            })
            .await;
        r.unwrap();
        assert_eq!(attempts, 2);
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM t")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            .try_get("n")
            .unwrap();
        assert_eq!(n, 1, "the first attempt's insert was rolled back");
    }

    #[test]
    fn time_format() {
        let t = now();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
    }
}
