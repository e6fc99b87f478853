//! Start-up reconciliation: after a crash (SIGKILL in the middle of a create, clone,
//! snapshot or delete), make every object this node was working on end in a clean state.
//!
//! 1. Locks: every holder and waiter recorded for this node belongs to the dead process;
//!    release them at once (other nodes would otherwise wait for the lease).
//! 2. Volumes and snapshots of this node still `creating`: their bytes may be half made;
//!    delete them from the pool and mark the row `error` (the user sees the failure and
//!    deletes it). Rows still `deleting`: finish the delete.
//! 3. Attachments of this node died with it: drop their rows; volumes left without an
//!    attachment go back to `available`.
//! 4. Pool objects no volume or snapshot row names (orphans, and partial leftovers of
//!    an interrupted create) are deleted.
//!
//! Several nodes may share one pool (a shared directory or LUN) and one database. Step 4
//! must then never delete another node's object, even one made while this pass runs.
//! The rule that guarantees it: **list the pool first, read the database after**. Every
//! create, clone and snapshot inserts its row before it asks the data plane for the
//! bytes, and every delete removes the bytes before the row; so an object seen in the
//! listing has a row by the time the database is read, unless it is being deleted (and
//! deleting it again is harmless). Reading the database first would miss the row of an
//! object another node makes between the two reads, and delete it.
//! Only objects named like Ember's (volume and snapshot ids are UUIDs) are touched.

use super::rows;
use super::service::{finish_delete, finish_snapshot_delete};
use super::status::{Event, Status};
use crate::dataplane::ObjectRef;
use crate::state::AppState;
use std::collections::HashSet;

/// A volume or snapshot this node was working on.
enum Busy {
    Volume(rows::Vol),
    Snapshot(rows::Snap),
}

/// What the pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Lock holders released.
    pub locks_released: u64,
    /// Volumes and snapshots marked `error`.
    pub marked_error: usize,
    /// Deletes finished.
    pub deletes_finished: usize,
    /// Attachments dropped.
    pub attachments_dropped: u64,
    /// Pool objects removed (orphans and partial leftovers).
    pub objects_removed: usize,
}

/// Run the pass for this node. Errors on single objects are logged and skipped.
pub async fn reconcile(st: &AppState) -> anyhow::Result<Report> {
    let node = st.node_name().to_string();
    let dp = st.dataplane().clone();
    let mut rep = Report {
        locks_released: st.locks().release_node(&node).await?,
        ..Default::default()
    };
    // A connection per step: SQLite pools have one, and finishing a delete needs it.
    let pool = &st.db().pool;

    // This node's volumes and snapshots caught in the middle of a create or delete.
    let busy = [Status::Creating, Status::Deleting];
    let vols = rows::of_node::<rows::Vol>(&mut *pool.acquire().await?, &node, &busy).await?;
    let snaps = rows::of_node::<rows::Snap>(&mut *pool.acquire().await?, &node, &busy).await?;
    let busy = vols
        .into_iter()
        .map(Busy::Volume)
        .chain(snaps.into_iter().map(Busy::Snapshot));
    for b in busy {
        let (object, status) = match &b {
            Busy::Volume(v) => (v.object(), v.status),
            Busy::Snapshot(s) => (s.object(), s.status),
        };
        if status == Status::Creating {
            if let Err(e) = dp.delete(object.clone()).await {
                tracing::warn!(object = %object, error = %e, "cannot remove half-made bytes");
            }
            rows::apply(&mut *pool.acquire().await?, &object, Event::NodeRestarted).await?;
            tracing::warn!(object = %object, "was being made when the daemon stopped: marked error");
            rep.marked_error += 1;
            continue;
        }
        let finished = match &b {
            Busy::Volume(v) => finish_delete(st, v).await,
            Busy::Snapshot(s) => finish_snapshot_delete(st, s).await,
        };
        match finished {
            Ok(()) => rep.deletes_finished += 1,
            Err(e) => {
                tracing::error!(object = %object, error = %e, "cannot finish an interrupted delete")
            }
        }
    }

    rep.attachments_dropped =
        rows::drop_node_attachments(&mut *pool.acquire().await?, &node).await?;

    // The pools first, then the database (see the module doc).
    let mut stored = Vec::new();
    for p in dp.stats().await? {
        match dp.inventory(p.name.clone()).await {
            Ok(objects) => stored.extend(objects),
            Err(e) => tracing::error!(pool = %p.name, error = %e, "cannot list the pool"),
        }
    }
    let known: HashSet<ObjectRef> = rows::all_objects(&mut *pool.acquire().await?)
        .await?
        .into_iter()
        .collect();
    for o in stored {
        let ours = uuid::Uuid::parse_str(&o.object.id).is_ok();
        if !ours || known.contains(&o.object) {
            continue;
        }
        match dp.delete(o.object.clone()).await {
            Ok(()) => {
                tracing::warn!(object = %o.object, partial = o.partial, "removed a leftover pool object");
                rep.objects_removed += 1;
            }
            Err(e) => {
                tracing::error!(object = %o.object, error = %e, "cannot remove a leftover")
            }
        }
    }
    tracing::info!(?rep, "start-up reconciliation done");
    Ok(rep)
}
