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

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
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

    #[test]
    fn time_format() {
        let t = now();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
    }
}
