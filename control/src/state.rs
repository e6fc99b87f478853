//! [`AppState`]: what every handler shares — the database, the master key, this
//! node's name, the data plane and the lock service. Built by [`crate::Control::open`].
//!
//! It sits below the domain modules (they import it; it imports only the plumbing
//! modules `store`, `seal`, `locks` and the [`crate::dataplane`] boundary), so no import
//! points back up to `lib.rs`.

use crate::dataplane::DataPlane;
use crate::locks::Locks;
use crate::seal::MasterKey;
use crate::store::Db;
use std::sync::Arc;
use std::time::Duration;

struct Inner {
    db: Db,
    master: MasterKey,
    node_name: String,
    dataplane: Arc<dyn DataPlane>,
    locks: Locks,
    service_down_time: Duration,
}

/// State shared by all handlers (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// Assemble the state (the database is connected and migrated already).
    pub fn new(
        db: Db,
        master: MasterKey,
        node_name: String,
        dataplane: Arc<dyn DataPlane>,
        locks: Locks,
        service_down_time: Duration,
    ) -> Self {
        AppState(Arc::new(Inner {
            db,
            master,
            node_name,
            dataplane,
            locks,
            service_down_time,
        }))
    }
    /// The database.
    pub fn db(&self) -> &Db {
        &self.0.db
    }
    /// The master key sealing secrets.
    pub fn master(&self) -> &MasterKey {
        &self.0.master
    }
    /// This node's name (cluster member id).
    pub fn node_name(&self) -> &str {
        &self.0.node_name
    }
    /// The data plane: the one way to volumes' bytes and front ends.
    pub fn dataplane(&self) -> &Arc<dyn DataPlane> {
        &self.0.dataplane
    }
    /// The database read-write locks, as this node.
    pub fn locks(&self) -> &Locks {
        &self.0.locks
    }
    /// A node whose heartbeat is older than this is down.
    pub fn service_down_time(&self) -> Duration {
        self.0.service_down_time
    }
}
