//! Ember's control plane: the REST shim (axum), its store (sqlx over SQLite or MariaDB)
//! and the domain modules.
//!
//! Layout:
//! - Plumbing, below every domain module: [`store`] (connection, dialect, migration
//!   runner), [`error`] (Cinder-style errors), [`api`] (strict JSON extractor, error
//!   middleware), [`seal`] (the master key), [`locks`] (the database read-write lock),
//!   [`dataplane`] (the boundary to the data plane), [`state`] ([`AppState`], what
//!   handlers share), [`auth`] (tokens and roles).
//! - Domain modules, each owning its routes: [`projects`] (projects, tokens),
//!   [`types`] (volume types, extra specs, metadata, encryption, access), [`metadefs`]
//!   (Glance-style catalog, enforced on types), [`keys`] (Barbican-style secrets and
//!   orders, sealed with a master key), [`volumes`] (volumes, snapshots, clones, attachments; start-up reconciliation),
//!   [`locks::api`] (the locks' own routes).
//! - Above them all: [`schema`] (every migration, in order) and [`openapi`] (the router).
//! - [`Control::open`] connects, migrates and bootstraps (admin project and token file,
//!   `__DEFAULT__` type, standard metadef namespaces, node registration);
//!   [`Control::router`] gives the axum router to serve.
//!
//! The data plane is reached only through [`dataplane::DataPlane`].

pub mod api;
pub mod auth;
pub mod dataplane;
pub mod error;
pub mod keys;
pub mod locks;
pub mod metadefs;
pub mod openapi;
pub mod projects;
pub mod qos;
pub mod schema;
pub mod seal;
pub mod services;
pub mod state;
pub mod store;
pub mod types;
pub mod versions;
pub mod volumes;

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use dataplane::DataPlane;
pub use state::AppState;
pub use store::Db;

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Data directory (admin token, master key, SQLite file live here by default).
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `mysql://USER:PASSWORD@HOST[:PORT]/DB`.
    pub database: String,
    /// Master key file; default `DATA/master.key` (created on first start).
    pub master_key_file: Option<PathBuf>,
    /// This node's name (cluster member id).
    pub node_name: String,
    /// Address the REST API is served on (recorded in `nodes`).
    pub rest_address: String,
    /// Cluster this node belongs to (`--cluster`).
    pub cluster: String,
    /// NBD listeners of this node (recorded in `nodes`).
    pub nbd_addresses: Vec<String>,
    /// A node whose heartbeat is older than this is down (`--service-down-time`).
    pub service_down_time: std::time::Duration,
}

impl ControlConfig {
    /// Settings with the membership defaults: cluster [`services::DEFAULT_CLUSTER`], no
    /// NBD listener recorded, [`services::DEFAULT_SERVICE_DOWN_SECS`].
    pub fn new(
        data_dir: PathBuf,
        database: String,
        node_name: String,
        rest_address: String,
    ) -> Self {
        ControlConfig {
            data_dir,
            database,
            master_key_file: None,
            node_name,
            rest_address,
            cluster: services::DEFAULT_CLUSTER.to_string(),
            nbd_addresses: Vec::new(),
            service_down_time: std::time::Duration::from_secs(services::DEFAULT_SERVICE_DOWN_SECS),
        }
    }
}

/// An opened control plane.
pub struct Control {
    pub state: AppState,
    /// Where the bootstrap admin token is stored.
    pub admin_token_path: PathBuf,
}

/// Name of the bootstrap admin project.
pub const ADMIN_PROJECT: &str = "admin";

impl Control {
    /// Connect, migrate, load or create the master key and bootstrap first-start objects.
    pub async fn open(
        cfg: &ControlConfig,
        dataplane: Arc<dyn DataPlane>,
    ) -> anyhow::Result<Control> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("create data dir {}", cfg.data_dir.display()))?;
        let db = Db::connect(&cfg.database).await?;
        db.migrate(schema::MIGRATIONS)
            .await
            .context("database migrations")?;
        if db.dialect == store::Dialect::Sqlite {
            // Write-ahead log: a commit costs one fsync instead of several, so short lock
            // transactions stay short while volume copies load the disk (persistent).
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&db.pool)
                .await
                .context("switch SQLite to WAL")?;
        }
        let master = match &cfg.master_key_file {
            Some(p) => seal::MasterKey::load(p)?,
            None => seal::MasterKey::load_or_create(&cfg.data_dir.join("master.key"))?,
        };
        seal::check_master_key(&db, &master).await?;
        let locks = locks::Locks::new(
            db.pool.clone(),
            db.dialect == store::Dialect::MySql,
            cfg.node_name.clone(),
        );
        let state = AppState::new(
            db,
            master,
            cfg.node_name.clone(),
            dataplane,
            locks,
            cfg.service_down_time,
        );
        let admin_token_path = cfg.data_dir.join("admin-token");
        // Several nodes may start at once on one database: a bootstrap step that loses a
        // race (unique key) is retried and then finds the other node's rows.
        macro_rules! retried {
            ($what:literal, $step:expr) => {{
                let mut attempt = 0u64;
                loop {
                    match $step.await {
                        Ok(v) => break v,
                        Err(e) if attempt < 3 => {
                            attempt += 1;
                            tracing::info!(error = %e, "{} raced with another node; retrying", $what);
                            tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                        }
                        Err(e) => return Err(e.context($what)),
                    }
                }
            }};
        }
        retried!(
            "bootstrap the admin project and token",
            bootstrap_admin(state.db(), &admin_token_path)
        );
        retried!(
            "bootstrap the default volume type",
            types::bootstrap(state.db())
        );
        retried!(
            "bootstrap the standard metadef namespaces",
            metadefs::bootstrap(state.db())
        );
        let me = services::NodeInfo {
            name: cfg.node_name.clone(),
            cluster: cfg.cluster.clone(),
            rest: cfg.rest_address.clone(),
            nbd: cfg.nbd_addresses.clone(),
        };
        retried!(
            "register this node",
            services::register_node(state.db(), &me)
        );
        Ok(Control {
            state,
            admin_token_path,
        })
    }

    /// The HTTP router (all routes, OpenAPI included).
    pub fn router(&self) -> axum::Router {
        openapi::router(self.state.clone())
    }

    /// Refresh this node's heartbeat row (call every `--heartbeat-secs`).
    pub async fn heartbeat(&self) -> Result<(), sqlx::Error> {
        services::heartbeat(self.state.db(), self.state.node_name()).await
    }

    /// One membership tick: the heartbeat, then this node's lock leases renewed and
    /// expired holders of any node reaped. The leases are renewed only after a
    /// heartbeat that reached the database, so a node cut off from it loses its locks
    /// after one lease.
    pub async fn membership_tick(&self) -> Result<(), String> {
        self.heartbeat()
            .await
            .map_err(|e| format!("heartbeat failed (database unavailable?): {e}"))?;
        let locks = self.state.locks();
        locks
            .renew_node()
            .await
            .map_err(|e| format!("lock lease renewal failed: {e}"))?;
        locks
            .reap()
            .await
            .map_err(|e| format!("reaping expired locks failed: {e}"))?;
        Ok(())
    }
}

/// Ensure the admin project exists and `path` holds a valid admin token.
///
/// First start: create the token and write it (0600). Later starts: make sure the
/// token in the file is registered (a new database with an old data dir re-registers it).
async fn bootstrap_admin(db: &Db, path: &Path) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    let row = sqlx::query("SELECT id FROM projects WHERE name = ?")
        .bind(ADMIN_PROJECT)
        .fetch_optional(&mut *tx)
        .await?;
    let project_id = match row {
        Some(r) => store::get_str(&r, "id")?,
        None => {
            let id = store::new_id();
            sqlx::query(
                "INSERT INTO projects (id, name, description, created_at) VALUES (?, ?, ?, ?)",
            )
            .bind(id.clone())
            .bind(ADMIN_PROJECT)
            .bind("bootstrap administration project")
            .bind(store::now())
            .execute(&mut *tx)
            .await?;
            id
        }
    };
    if path.exists() {
        let token =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
        let known: i64 = store::count(
            &mut tx,
            "SELECT COUNT(*) AS n FROM tokens WHERE hash = ?",
            &auth::hash_token(token),
        )
        .await?;
        if known == 0 {
            auth::insert_token(
                &mut tx,
                &project_id,
                auth::Role::Admin,
                "bootstrap admin",
                token,
            )
            .await?;
            tracing::info!(path = %path.display(), "registered the admin token from the data dir in the database");
        }
        tx.commit().await?;
        return Ok(());
    }
    let token = auth::generate_token().map_err(|e| anyhow::anyhow!("{e}"))?;
    auth::insert_token(
        &mut tx,
        &project_id,
        auth::Role::Admin,
        "bootstrap admin",
        &token,
    )
    .await?;
    seal::create_private(path, format!("{token}\n").as_bytes())?;
    tx.commit().await?;
    tracing::info!(path = %path.display(), "created the admin token (read it from this file)");
    Ok(())
}

/// Re-exported so embedders serve the router with the same axum version.
pub use axum;
