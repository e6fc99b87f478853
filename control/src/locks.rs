//! Read-write locks kept in the database (Cinder bug 2060830: clones of one source must
//! run in parallel, a delete must wait for them, and nothing may starve).
//!
//! State is data, row locks only guard transitions:
//! - `rw_locks`: one row per resource (`resource_type`, `resource_id`) with the reader
//!   count, the exclusive holder, a `generation` bumped by every grant and release (a
//!   per-resource logical clock), and the time a writer started waiting.
//! - `rw_lock_holders`: who holds it (holder id, node, operation, mode, lease expiry).
//! - `rw_lock_waiters`: writers waiting for it. A live waiter blocks new shared grants
//!   (writer preference); waiting writers are served oldest first.
//! - `rw_lock_history`: every grant with its acquire/release generation and times, for
//!   audits and for the tests' "no writer ever overlapped anyone" check.
//!
//! Every acquire or release is one short transaction: `BEGIN IMMEDIATE` on SQLite, and on
//! MariaDB `SELECT … FOR UPDATE` of the resource's row, which serialises transitions of
//! that resource across the clients of one server. On Galera that row lock is local to
//! one member; what serialises transitions across members is that every grant and
//! release writes the resource's `rw_locks` row (its `generation`), so of two
//! concurrent transitions of one resource on two members, certification lets one commit
//! and aborts the other with deadlock 1213. Each transition runs through the store's
//! retry wrapper ([`crate::store::retry`]): an aborted transition is re-run whole, reads
//! included, so it decides again on what the winner committed. Inside the
//! transaction expired holders and waiters of the resource are reaped first and the
//! counters recomputed from the holder rows, so they heal themselves after a crash.
//!
//! Leases: holders taken by the node itself are renewed by the node's heartbeat
//! ([`Locks::renew_node`]); holders taken through the API (`external`) carry their own
//! TTL. A node that dies stops renewing; its holders expire and are reaped by the next
//! acquirer or by [`Locks::reap`]. A node that restarts drops its old holders at once
//! ([`Locks::release_node`]).
//!
//! Waiting ([`Locks::acquire`]) polls [`Locks::try_acquire`] with jittered exponential
//! back-off up to a bound, then fails with [`LockError::Busy`] carrying a `Retry-After`
//! hint; a writer that gives up withdraws its waiter row.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Grants and releases whose commit reported a conflict yet took effect (found by the
/// next attempt of the same call), in this process.
static AMBIGUOUS_COMMITS: AtomicU64 = AtomicU64::new(0);

/// How many grants and releases reported a conflict at commit yet took effect.
pub fn ambiguous_commits() -> u64 {
    AMBIGUOUS_COMMITS.load(Ordering::Relaxed)
}

/// Default lease of a holder (renewed by the heartbeat well before it runs out).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How long a waiting writer's row stays live without being refreshed by its poll loop.
pub const WAITER_TTL: Duration = Duration::from_secs(5);
/// First poll interval of a waiter.
const POLL_MIN: Duration = Duration::from_millis(20);
/// Longest poll interval of a waiter.
const POLL_MAX: Duration = Duration::from_millis(500);

/// Schema of the lock tables (`CREATE TABLE IF NOT EXISTS`, portable SQL).
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS rw_locks (id VARCHAR(64) NOT NULL PRIMARY KEY, \
     resource_type VARCHAR(32) NOT NULL, resource_id VARCHAR(255) NOT NULL, \
     readers BIGINT NOT NULL, writer VARCHAR(64) NULL, writer_waiting_since BIGINT NULL, \
     generation BIGINT NOT NULL, updated_at BIGINT NOT NULL, \
     UNIQUE (resource_type, resource_id))",
    "CREATE TABLE IF NOT EXISTS rw_lock_holders (id VARCHAR(64) NOT NULL PRIMARY KEY, \
     lock_id VARCHAR(64) NOT NULL, mode VARCHAR(16) NOT NULL, holder VARCHAR(255) NOT NULL, \
     node VARCHAR(255) NOT NULL, operation VARCHAR(64) NOT NULL, external BIGINT NOT NULL, \
     ttl_ms BIGINT NOT NULL, acquired_at BIGINT NOT NULL, acquired_gen BIGINT NOT NULL, \
     lease_until BIGINT NOT NULL)",
    "CREATE INDEX rw_lock_holders_lock ON rw_lock_holders (lock_id)",
    "CREATE TABLE IF NOT EXISTS rw_lock_waiters (id VARCHAR(64) NOT NULL PRIMARY KEY, \
     lock_id VARCHAR(64) NOT NULL, node VARCHAR(255) NOT NULL, operation VARCHAR(64) NOT NULL, \
     since BIGINT NOT NULL, expires BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rw_lock_history (holder_id VARCHAR(64) NOT NULL PRIMARY KEY, \
     lock_id VARCHAR(64) NOT NULL, mode VARCHAR(16) NOT NULL, node VARCHAR(255) NOT NULL, \
     operation VARCHAR(64) NOT NULL, acquired_at BIGINT NOT NULL, acquired_gen BIGINT NOT NULL, \
     released_at BIGINT NULL, released_gen BIGINT NULL, release_reason VARCHAR(16) NULL)",
];

/// Shared (readers) or exclusive (one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Many holders at once (clone source, snapshot source).
    Shared,
    /// One holder, nobody else (delete, extend, migrate).
    Exclusive,
}

impl Mode {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        }
    }
}

/// What to lock and on whose behalf.
#[derive(Debug, Clone)]
pub struct LockRequest {
    /// E.g. `volume`, `snapshot`.
    pub resource_type: String,
    /// The resource's id.
    pub resource_id: String,
    /// Shared or exclusive.
    pub mode: Mode,
    /// What the holder does (`clone`, `delete`, …), for humans.
    pub operation: String,
    /// Who holds it (a volume id, an orchestrator's name), for humans.
    pub holder: String,
    /// Taken through the API: the lease is its own TTL, not renewed by the heartbeat.
    pub external: bool,
    /// Lease length (default [`DEFAULT_LEASE`]).
    pub lease: Option<Duration>,
    /// How long [`Locks::acquire`] may wait.
    pub wait: Duration,
}

impl LockRequest {
    /// A request of this node for `operation` on a resource, waiting up to `wait`.
    pub fn new(
        resource_type: &str,
        resource_id: &str,
        mode: Mode,
        operation: &str,
        wait: Duration,
    ) -> Self {
        LockRequest {
            resource_type: resource_type.to_string(),
            resource_id: resource_id.to_string(),
            mode,
            operation: operation.to_string(),
            holder: String::new(),
            external: false,
            lease: None,
            wait,
        }
    }
}

/// A granted lock (one holder row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// Holder id: release with it.
    pub id: String,
    /// The lock's id.
    pub lock_id: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// Mode held.
    pub mode: Mode,
    /// Who holds it.
    pub holder: String,
    /// Node that took it.
    pub node: String,
    /// Operation.
    pub operation: String,
    /// Taken through the API.
    pub external: bool,
    /// Unix milliseconds of the grant.
    pub acquired_at: i64,
    /// The lock's generation at the grant.
    pub acquired_gen: i64,
    /// Unix milliseconds when the lease runs out.
    pub lease_until: i64,
}

/// A waiting writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Waiter {
    /// Waiter id (the holder id it will get).
    pub id: String,
    /// Node.
    pub node: String,
    /// Operation.
    pub operation: String,
    /// Unix milliseconds since when it waits.
    pub since: i64,
}

/// A lock with its holders and waiters.
#[derive(Debug, Clone, Serialize)]
pub struct LockInfo {
    /// Lock id.
    pub id: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: String,
    /// Number of shared holders.
    pub readers: i64,
    /// Holder id of the exclusive holder.
    pub writer: Option<String>,
    /// Unix milliseconds since when the oldest writer waits.
    pub writer_waiting_since: Option<i64>,
    /// Transitions so far.
    pub generation: i64,
    /// Holders.
    pub holders: Vec<Holder>,
    /// Waiting writers, oldest first.
    pub waiters: Vec<Waiter>,
}

/// One grant in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// Holder id.
    pub holder_id: String,
    /// Mode.
    pub mode: Mode,
    /// Node.
    pub node: String,
    /// Operation.
    pub operation: String,
    /// Unix ms of the grant.
    pub acquired_at: i64,
    /// Generation at the grant.
    pub acquired_gen: i64,
    /// Unix ms of the release, if released.
    pub released_at: Option<i64>,
    /// Generation at the release.
    pub released_gen: Option<i64>,
    /// `released`, `expired` or `node-restart`.
    pub release_reason: Option<String>,
}

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Held by others past the wait bound.
    #[error("{resource} is locked ({why}); retry after {retry_after:?}")]
    Busy {
        /// `type id` of the resource.
        resource: String,
        /// Who holds or waits for it.
        why: String,
        /// When a retry is worth it.
        retry_after: Duration,
    },
    /// A database error.
    #[error("lock database error")]
    Db(#[from] sqlx::Error),
}

/// The lock service of one node.
#[derive(Debug, Clone)]
pub struct Locks {
    pool: AnyPool,
    mysql: bool,
    node: String,
    /// Lease of this node's holders in ms (shared by clones, settable at run time).
    lease_ms: Arc<AtomicU64>,
    /// How long this node's own operations (delete, extend, clone) wait for a lock, ms.
    wait_ms: Arc<AtomicU64>,
}

/// How long delete, extend and clone wait for a lock before answering 409 by default.
pub const DEFAULT_OPERATION_WAIT: Duration = Duration::from_secs(60);

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub use crate::store::is_retryable;

fn mode_of(s: &str) -> Mode {
    if s == "exclusive" {
        Mode::Exclusive
    } else {
        Mode::Shared
    }
}

/// Outcome of one attempt.
enum Attempt {
    Granted(Holder),
    Refused { why: String, retry_after: Duration },
}

struct LockRow {
    id: String,
    generation: i64,
}

impl Locks {
    /// Locks of node `node` over `pool`; `mysql` selects the MariaDB dialect.
    pub fn new(pool: AnyPool, mysql: bool, node: impl Into<String>) -> Self {
        Locks {
            pool,
            mysql,
            node: node.into(),
            lease_ms: Arc::new(AtomicU64::new(DEFAULT_LEASE.as_millis() as u64)),
            wait_ms: Arc::new(AtomicU64::new(DEFAULT_OPERATION_WAIT.as_millis() as u64)),
        }
    }

    /// Change how long this node's own operations wait for a lock (tests shorten it).
    pub fn set_operation_wait(&self, wait: Duration) {
        self.wait_ms
            .store(ms(wait).unsigned_abs(), Ordering::Relaxed);
    }

    /// How long this node's own operations wait for a lock before giving up.
    pub fn operation_wait(&self) -> Duration {
        Duration::from_millis(self.wait_ms.load(Ordering::Relaxed))
    }

    /// A handle with its own lease setting (tests use short leases).
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease_ms = Arc::new(AtomicU64::new(ms(lease).unsigned_abs()));
        self
    }

    /// Change the lease of this node's holders (the heartbeat must renew well within it).
    pub fn set_lease(&self, lease: Duration) {
        self.lease_ms
            .store(ms(lease).unsigned_abs(), Ordering::Relaxed);
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease of this node's holders.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// Create the tables if missing (also part of the store's migrations).
    pub async fn create_tables(&self) -> Result<(), sqlx::Error> {
        for stmt in SCHEMA {
            let sql = if stmt.starts_with("CREATE TABLE") && self.mysql {
                format!("{stmt} ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
            } else {
                stmt.to_string()
            };
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
            {
                Ok(_) => {}
                // The index exists already (no portable CREATE INDEX IF NOT EXISTS).
                Err(sqlx::Error::Database(d))
                    if stmt.starts_with("CREATE INDEX")
                        && (d.message().contains("already exists")
                            || d.message().contains("Duplicate key name")) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        let dialect = if self.mysql {
            crate::store::Dialect::MySql
        } else {
            crate::store::Dialect::Sqlite
        };
        crate::store::begin_write(&self.pool, dialect).await
    }

    fn for_update(&self) -> &'static str {
        if self.mysql {
            " FOR UPDATE"
        } else {
            ""
        }
    }

    /// Lock (row-lock on MariaDB) the resource's row, creating it if needed.
    async fn lock_row(
        &self,
        tx: &mut sqlx::AnyConnection,
        rtype: &str,
        rid: &str,
        now: i64,
    ) -> Result<LockRow, sqlx::Error> {
        let ignore = if self.mysql {
            "INSERT IGNORE"
        } else {
            "INSERT OR IGNORE"
        };
        let sql = format!(
            "{ignore} INTO rw_locks (id, resource_type, resource_id, readers, writer, writer_waiting_since, \
             generation, updated_at) VALUES (?, ?, ?, 0, NULL, NULL, 0, ?)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(rtype.to_string())
            .bind(rid.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let sql = format!(
            "SELECT id, generation FROM rw_locks WHERE resource_type = ? AND resource_id = ?{}",
            self.for_update()
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(rtype.to_string())
            .bind(rid.to_string())
            .fetch_one(&mut *tx)
            .await?;
        Ok(LockRow {
            id: r.try_get("id")?,
            generation: r.try_get("generation")?,
        })
    }

    /// Reap expired holders and waiters of one lock (inside its transaction). Returns
    /// whether anything was removed.
    async fn reap_lock(
        &self,
        tx: &mut sqlx::AnyConnection,
        lock: &LockRow,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let expired = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM rw_lock_holders WHERE lock_id = ? AND lease_until < ?{}",
            self.for_update()
        )))
        .bind(lock.id.clone())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for r in &expired {
            let id: String = r.try_get("id")?;
            tracing::warn!(holder = %id, lock = %lock.id, "lock holder's lease expired; releasing it");
            self.drop_holder(tx, &id, lock.generation + 1, now, "expired")
                .await?;
        }
        let w = sqlx::query("DELETE FROM rw_lock_waiters WHERE lock_id = ? AND expires < ?")
            .bind(lock.id.clone())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        Ok(!expired.is_empty() || w > 0)
    }

    async fn drop_holder(
        &self,
        tx: &mut sqlx::AnyConnection,
        holder_id: &str,
        gen: i64,
        now: i64,
        reason: &str,
    ) -> Result<bool, sqlx::Error> {
        let n = sqlx::query("DELETE FROM rw_lock_holders WHERE id = ?")
            .bind(holder_id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            sqlx::query(
                "UPDATE rw_lock_history SET released_at = ?, released_gen = ?, release_reason = ? WHERE holder_id = ?",
            )
            .bind(now)
            .bind(gen)
            .bind(reason.to_string())
            .bind(holder_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        Ok(n > 0)
    }

    /// Recompute the counters of a lock from its holder and waiter rows and bump its
    /// generation.
    async fn refresh_counters(
        &self,
        tx: &mut sqlx::AnyConnection,
        lock_id: &str,
        gen: i64,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let holders = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, mode FROM rw_lock_holders WHERE lock_id = ?{}",
            self.for_update()
        )))
        .bind(lock_id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let mut readers = 0i64;
        let mut writer: Option<String> = None;
        for h in &holders {
            let m: String = h.try_get("mode")?;
            if m == "exclusive" {
                writer = Some(h.try_get("id")?);
            } else {
                readers += 1;
            }
        }
        let since = sqlx::query("SELECT MIN(since) AS s FROM rw_lock_waiters WHERE lock_id = ?")
            .bind(lock_id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get::<Option<i64>, _>("s")?;
        sqlx::query(
            "UPDATE rw_locks SET readers = ?, writer = ?, writer_waiting_since = ?, generation = ?, updated_at = ? WHERE id = ?",
        )
        .bind(readers)
        .bind(writer)
        .bind(since)
        .bind(gen)
        .bind(now)
        .bind(lock_id.to_string())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn attempt(&self, req: &LockRequest, holder_id: &str) -> Result<Attempt, sqlx::Error> {
        let mut tx = self.begin().await?;
        // A previous attempt of this call whose commit reported a conflict may have
        // taken effect all the same: then the grant is already ours.
        if let Some(r) = sqlx::query(
            "SELECT h.*, l.resource_type, l.resource_id FROM rw_lock_holders h JOIN rw_locks l ON l.id = h.lock_id WHERE h.id = ?",
        )
        .bind(holder_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        {
            tx.commit().await?;
            AMBIGUOUS_COMMITS.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(holder = %holder_id, "a grant reported a conflict at commit but took effect");
            return Ok(Attempt::Granted(holder_of(&r)?));
        }
        let now = now_ms();
        let lock = self
            .lock_row(&mut tx, &req.resource_type, &req.resource_id, now)
            .await?;
        let reaped = self.reap_lock(&mut tx, &lock, now).await?;
        let holders = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id, mode, operation, node, lease_until FROM rw_lock_holders WHERE lock_id = ?{}",
            self.for_update()
        )))
        .bind(lock.id.clone())
        .fetch_all(&mut *tx)
        .await?;
        let waiters = sqlx::query(
            "SELECT id, operation, since FROM rw_lock_waiters WHERE lock_id = ? ORDER BY since, id",
        )
        .bind(lock.id.clone())
        .fetch_all(&mut *tx)
        .await?;
        let mut writer_op = None;
        let mut readers = 0usize;
        let mut ops = Vec::new();
        let mut soonest = i64::MAX;
        for h in &holders {
            let m: String = h.try_get("mode")?;
            let op: String = h.try_get("operation")?;
            soonest = soonest.min(h.try_get::<i64, _>("lease_until")?);
            if m == "exclusive" {
                writer_op = Some(op);
            } else {
                readers += 1;
                ops.push(op);
            }
        }
        let first_waiter: Option<String> = waiters.first().map(|w| w.try_get("id")).transpose()?;
        let refusal = match req.mode {
            Mode::Shared => {
                if let Some(op) = &writer_op {
                    Some(format!("held exclusively for {op}"))
                } else if let Some(w) = waiters.first() {
                    let op: String = w.try_get("operation")?;
                    Some(format!("a writer is waiting for {op}"))
                } else {
                    None
                }
            }
            Mode::Exclusive => {
                if let Some(op) = &writer_op {
                    Some(format!("held exclusively for {op}"))
                } else if readers > 0 {
                    ops.sort();
                    ops.dedup();
                    Some(format!("{readers} shared holder(s): {}", ops.join(", ")))
                } else if first_waiter.as_deref().is_some_and(|w| w != holder_id) {
                    Some("another writer waits first".to_string())
                } else {
                    None
                }
            }
        };
        if let Some(why) = refusal {
            if req.mode == Mode::Exclusive {
                // Record (or refresh) this writer's place in the queue.
                let expires = now + ms(WAITER_TTL);
                let n = sqlx::query("UPDATE rw_lock_waiters SET expires = ? WHERE id = ?")
                    .bind(expires)
                    .bind(holder_id.to_string())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 0 {
                    sqlx::query(
                        "INSERT INTO rw_lock_waiters (id, lock_id, node, operation, since, expires) VALUES (?, ?, ?, ?, ?, ?)",
                    )
                    .bind(holder_id.to_string())
                    .bind(lock.id.clone())
                    .bind(self.node.clone())
                    .bind(req.operation.clone())
                    .bind(now)
                    .bind(expires)
                    .execute(&mut *tx)
                    .await?;
                }
                self.refresh_counters(&mut tx, &lock.id, lock.generation + 1, now)
                    .await?;
            } else if reaped {
                self.refresh_counters(&mut tx, &lock.id, lock.generation + 1, now)
                    .await?;
            }
            tx.commit().await?;
            let retry_after = if soonest == i64::MAX {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(
                    u64::try_from((soonest - now).clamp(1000, 30_000)).unwrap_or(1000),
                )
            };
            return Ok(Attempt::Refused { why, retry_after });
        }
        let gen = lock.generation + 1;
        let lease = req.lease.unwrap_or(self.lease());
        let h = Holder {
            id: holder_id.to_string(),
            lock_id: lock.id.clone(),
            resource_type: req.resource_type.clone(),
            resource_id: req.resource_id.clone(),
            mode: req.mode,
            holder: req.holder.clone(),
            node: self.node.clone(),
            operation: req.operation.clone(),
            external: req.external,
            acquired_at: now,
            acquired_gen: gen,
            lease_until: now.saturating_add(ms(lease)),
        };
        sqlx::query("DELETE FROM rw_lock_waiters WHERE id = ?")
            .bind(holder_id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO rw_lock_holders (id, lock_id, mode, holder, node, operation, external, ttl_ms, \
             acquired_at, acquired_gen, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(h.id.clone())
        .bind(h.lock_id.clone())
        .bind(h.mode.as_str())
        .bind(h.holder.clone())
        .bind(h.node.clone())
        .bind(h.operation.clone())
        .bind(i64::from(h.external))
        .bind(ms(lease))
        .bind(now)
        .bind(gen)
        .bind(h.lease_until)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO rw_lock_history (holder_id, lock_id, mode, node, operation, acquired_at, acquired_gen, \
             released_at, released_gen, release_reason) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL)",
        )
        .bind(h.id.clone())
        .bind(h.lock_id.clone())
        .bind(h.mode.as_str())
        .bind(h.node.clone())
        .bind(h.operation.clone())
        .bind(now)
        .bind(gen)
        .execute(&mut *tx)
        .await?;
        self.refresh_counters(&mut tx, &lock.id, gen, now).await?;
        tx.commit().await?;
        Ok(Attempt::Granted(h))
    }

    /// Run `f` as a transaction through the store's retry wrapper.
    async fn retrying<T, F, Fut>(&self, f: F) -> Result<T, sqlx::Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        crate::store::retry(crate::store::DEFAULT_RETRY, "lock transition", f).await
    }

    /// One attempt: grant now or refuse (a refused writer is recorded as waiting).
    pub async fn try_acquire(&self, req: &LockRequest) -> Result<Option<Holder>, LockError> {
        let id = uuid::Uuid::new_v4().to_string();
        match self.retrying(|| self.attempt(req, &id)).await? {
            Attempt::Granted(h) => Ok(Some(h)),
            Attempt::Refused { .. } => {
                self.withdraw(&id).await?;
                Ok(None)
            }
        }
    }

    /// Acquire, polling with back-off up to `req.wait`; then [`LockError::Busy`].
    pub async fn acquire(&self, req: &LockRequest) -> Result<Holder, LockError> {
        let id = uuid::Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + req.wait;
        let mut delay = POLL_MIN;
        loop {
            match self.retrying(|| self.attempt(req, &id)).await {
                Ok(Attempt::Granted(h)) => return Ok(h),
                Ok(Attempt::Refused { why, retry_after }) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        self.withdraw(&id).await?;
                        return Err(LockError::Busy {
                            resource: format!("{} {}", req.resource_type, req.resource_id),
                            why,
                            retry_after,
                        });
                    }
                    tokio::time::sleep(jitter(delay).min(deadline - now)).await;
                    delay = (delay * 3 / 2).min(POLL_MAX);
                }
                Err(e) => {
                    let _ = self.withdraw(&id).await;
                    return Err(e.into());
                }
            }
        }
    }

    /// Remove a waiter row (a writer that gave up).
    async fn withdraw(&self, waiter_id: &str) -> Result<(), sqlx::Error> {
        self.retrying(|| async {
            sqlx::query("DELETE FROM rw_lock_waiters WHERE id = ?")
                .bind(waiter_id.to_string())
                .execute(&self.pool)
                .await
        })
        .await?;
        Ok(())
    }

    /// Release a holder. Returns false when it was not held (already released or reaped).
    pub async fn release(&self, holder_id: &str) -> Result<bool, LockError> {
        let tried = std::sync::atomic::AtomicBool::new(false);
        Ok(self
            .retrying(|| self.release_once(holder_id, "released", &tried))
            .await?)
    }

    /// One release attempt. `tried` is set when an attempt of the same call reached its
    /// commit: if that commit reported a conflict and yet took effect (the client cannot
    /// tell), the next attempt finds the holder gone, and the history row, released
    /// for `reason`, says this call released it.
    async fn release_once(
        &self,
        holder_id: &str,
        reason: &str,
        tried: &std::sync::atomic::AtomicBool,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.begin().await?;
        let Some(r) = sqlx::query(
            "SELECT l.resource_type AS t, l.resource_id AS r FROM rw_lock_holders h JOIN rw_locks l ON l.id = h.lock_id WHERE h.id = ?",
        )
        .bind(holder_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        else {
            let done = if tried.load(Ordering::Relaxed) {
                sqlx::query("SELECT release_reason FROM rw_lock_history WHERE holder_id = ?")
                    .bind(holder_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get::<Option<String>, _>("release_reason"))
                    .transpose()?
                    .flatten()
                    .is_some_and(|r| r == reason)
            } else {
                false
            };
            if done {
                AMBIGUOUS_COMMITS.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(holder = %holder_id, "a release reported a conflict at commit but took effect");
            }
            tx.commit().await?;
            return Ok(done);
        };
        let (t, rid): (String, String) = (r.try_get("t")?, r.try_get("r")?);
        let now = now_ms();
        let lock = self.lock_row(&mut tx, &t, &rid, now).await?;
        let gen = lock.generation + 1;
        let found = self
            .drop_holder(&mut tx, holder_id, gen, now, reason)
            .await?;
        if found {
            self.refresh_counters(&mut tx, &lock.id, gen, now).await?;
        }
        tried.store(true, Ordering::Relaxed);
        tx.commit().await?;
        Ok(found)
    }

    /// Show one holder.
    pub async fn holder(&self, holder_id: &str) -> Result<Option<Holder>, LockError> {
        let r = sqlx::query(
            "SELECT h.*, l.resource_type, l.resource_id FROM rw_lock_holders h JOIN rw_locks l ON l.id = h.lock_id WHERE h.id = ?",
        )
        .bind(holder_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(holder_of).transpose()?)
    }

    /// Extend a holder's lease by its TTL from now (external holders). False if not held.
    pub async fn renew(&self, holder_id: &str) -> Result<bool, LockError> {
        let now = now_ms();
        let n = self
            .retrying(|| async {
                sqlx::query("UPDATE rw_lock_holders SET lease_until = ? + ttl_ms WHERE id = ? AND lease_until >= ?")
                    .bind(now)
                    .bind(holder_id.to_string())
                    .bind(now)
                    .execute(&self.pool)
                    .await
            })
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// Heartbeat: extend the leases of every non-external holder of this node.
    pub async fn renew_node(&self) -> Result<u64, LockError> {
        let now = now_ms();
        let until = now + ms(self.lease());
        let n = self
            .retrying(|| async {
                sqlx::query(
                    "UPDATE rw_lock_holders SET lease_until = ? WHERE node = ? AND external = 0 AND lease_until >= ?",
                )
                .bind(until)
                .bind(self.node.clone())
                .bind(now)
                .execute(&self.pool)
                .await
            })
            .await?
            .rows_affected();
        Ok(n)
    }

    /// Release expired holders and waiters everywhere. Returns the number of holders reaped.
    pub async fn reap(&self) -> Result<u64, LockError> {
        let now = now_ms();
        let rows = sqlx::query("SELECT id FROM rw_lock_holders WHERE lease_until < ?")
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        let mut n = 0;
        for r in rows {
            let id: String = r.try_get("id")?;
            let tried = std::sync::atomic::AtomicBool::new(false);
            if self
                .retrying(|| self.release_once(&id, "expired", &tried))
                .await?
            {
                tracing::warn!(holder = %id, "lock holder's lease expired; released");
                n += 1;
            }
        }
        self.retrying(|| async {
            sqlx::query("DELETE FROM rw_lock_waiters WHERE expires < ?")
                .bind(now)
                .execute(&self.pool)
                .await
        })
        .await?;
        Ok(n)
    }

    /// Release every holder of `node` (its process restarted, so none of them is real).
    pub async fn release_node(&self, node: &str) -> Result<u64, LockError> {
        let rows = sqlx::query("SELECT id FROM rw_lock_holders WHERE node = ? AND external = 0")
            .bind(node.to_string())
            .fetch_all(&self.pool)
            .await?;
        let mut n = 0;
        for r in rows {
            let id: String = r.try_get("id")?;
            let tried = std::sync::atomic::AtomicBool::new(false);
            if self
                .retrying(|| self.release_once(&id, "node-restart", &tried))
                .await?
            {
                n += 1;
            }
        }
        self.retrying(|| async {
            sqlx::query("DELETE FROM rw_lock_waiters WHERE node = ?")
                .bind(node.to_string())
                .execute(&self.pool)
                .await
        })
        .await?;
        Ok(n)
    }

    /// Locks with holders or waiters (all of them when `all`), optionally of one resource.
    pub async fn list(
        &self,
        resource_id: Option<&str>,
        all: bool,
    ) -> Result<Vec<LockInfo>, LockError> {
        let rows = match resource_id {
            Some(r) => sqlx::query(
                "SELECT * FROM rw_locks WHERE resource_id = ? ORDER BY resource_type, resource_id",
            )
            .bind(r.to_string())
            .fetch_all(&self.pool)
            .await?,
            None => {
                sqlx::query("SELECT * FROM rw_locks ORDER BY resource_type, resource_id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut out = Vec::new();
        for r in rows {
            let id: String = r.try_get("id")?;
            let holders = sqlx::query(
                "SELECT h.*, l.resource_type, l.resource_id FROM rw_lock_holders h JOIN rw_locks l ON l.id = h.lock_id \
                 WHERE h.lock_id = ? ORDER BY h.acquired_gen",
            )
            .bind(id.clone())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(holder_of)
            .collect::<Result<Vec<_>, _>>()?;
            let waiters = sqlx::query(
                "SELECT id, node, operation, since FROM rw_lock_waiters WHERE lock_id = ? ORDER BY since, id",
            )
            .bind(id.clone())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|w| {
                Ok(Waiter {
                    id: w.try_get("id")?,
                    node: w.try_get("node")?,
                    operation: w.try_get("operation")?,
                    since: w.try_get("since")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            if !all && holders.is_empty() && waiters.is_empty() {
                continue;
            }
            out.push(LockInfo {
                id,
                resource_type: r.try_get("resource_type")?,
                resource_id: r.try_get("resource_id")?,
                readers: r.try_get("readers")?,
                writer: r.try_get("writer")?,
                writer_waiting_since: r.try_get("writer_waiting_since")?,
                generation: r.try_get("generation")?,
                holders,
                waiters,
            });
        }
        Ok(out)
    }

    /// The grant history of one resource, in grant order.
    pub async fn history(
        &self,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Vec<HistoryEntry>, LockError> {
        let rows = sqlx::query(
            "SELECT h.* FROM rw_lock_history h JOIN rw_locks l ON l.id = h.lock_id \
             WHERE l.resource_type = ? AND l.resource_id = ? ORDER BY h.acquired_gen",
        )
        .bind(resource_type.to_string())
        .bind(resource_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HistoryEntry {
                    holder_id: r.try_get("holder_id")?,
                    mode: mode_of(&r.try_get::<String, _>("mode")?),
                    node: r.try_get("node")?,
                    operation: r.try_get("operation")?,
                    acquired_at: r.try_get("acquired_at")?,
                    acquired_gen: r.try_get("acquired_gen")?,
                    released_at: r.try_get("released_at")?,
                    released_gen: r.try_get("released_gen")?,
                    release_reason: r.try_get("release_reason")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(LockError::from)
    }
}

fn holder_of(r: &AnyRow) -> Result<Holder, sqlx::Error> {
    Ok(Holder {
        id: r.try_get("id")?,
        lock_id: r.try_get("lock_id")?,
        resource_type: r.try_get("resource_type")?,
        resource_id: r.try_get("resource_id")?,
        mode: mode_of(&r.try_get::<String, _>("mode")?),
        holder: r.try_get("holder")?,
        node: r.try_get("node")?,
        operation: r.try_get("operation")?,
        external: r.try_get::<i64, _>("external")? != 0,
        acquired_at: r.try_get("acquired_at")?,
        acquired_gen: r.try_get("acquired_gen")?,
        lease_until: r.try_get("lease_until")?,
    })
}

use crate::store::jitter;

/// Check a history for mutual exclusion: no exclusive grant overlaps any other grant
/// (intervals in generations, open intervals run to infinity). Returns the first
/// violating pair.
pub fn check_history(h: &[HistoryEntry]) -> Result<(), Box<(HistoryEntry, HistoryEntry)>> {
    let span = |e: &HistoryEntry| (e.acquired_gen, e.released_gen.unwrap_or(i64::MAX));
    for (i, a) in h.iter().enumerate() {
        for b in &h[i + 1..] {
            if a.mode == Mode::Shared && b.mode == Mode::Shared {
                continue;
            }
            let ((a0, a1), (b0, b1)) = (span(a), span(b));
            if a0 < b1 && b0 < a1 {
                return Err(Box::new((a.clone(), b.clone())));
            }
        }
    }
    Ok(())
}

pub mod api;

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;

#[cfg(test)]
mod tests;
