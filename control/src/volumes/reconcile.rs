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
//! 4. Pool objects: partial ones (interrupted create/clone) are deleted; complete ones
//!    that no volume or snapshot row names are orphans and are deleted too. Objects
//!    another node is still building (a shared pool directory) are left alone.

use super::api::{
    finish_delete, finish_snapshot_delete, snap_object, snap_row, vol_row, SNAPSHOT_PREFIX,
};
use crate::state::AppState;
use crate::store::{get_str, now, opt_str};
use std::collections::HashSet;

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
    pub attachments_dropped: usize,
    /// Pool objects removed (partial or orphaned).
    pub objects_removed: usize,
}

/// Run the pass for this node. Errors on single objects are logged and skipped.
pub async fn reconcile(st: &AppState) -> anyhow::Result<Report> {
    let node = st.node_name().to_string();
    let mut rep = Report {
        locks_released: st.locks().release_node(&node).await?,
        ..Default::default()
    };
    let pool = &st.db().pool;

    for r in sqlx::query(
        "SELECT * FROM volumes WHERE node_id = ? AND status IN ('creating', 'deleting')",
    )
    .bind(node.clone())
    .fetch_all(pool)
    .await?
    {
        let v = vol_row(&r)?;
        if v.status == "creating" {
            if let Ok(p) = super::api::pool_named(st, &v.pool) {
                let id = v.id.clone();
                let _ = super::api::blocking(move || Ok(p.delete(&id)?)).await;
            }
            super::api::set_vol_status(st, &v.id, "error").await?;
            tracing::warn!(volume = %v.id, "volume was being created when the daemon stopped: marked error");
            rep.marked_error += 1;
        } else {
            match finish_delete(st, &v).await {
                Ok(()) => rep.deletes_finished += 1,
                Err(e) => {
                    tracing::error!(volume = %v.id, error = ?e, "cannot finish an interrupted delete")
                }
            }
        }
    }
    for r in sqlx::query(
        "SELECT * FROM snapshots WHERE node_id = ? AND status IN ('creating', 'deleting')",
    )
    .bind(node.clone())
    .fetch_all(pool)
    .await?
    {
        let s = snap_row(&r)?;
        if s.status == "creating" {
            if let Ok(p) = super::api::pool_named(st, &s.pool) {
                let obj = snap_object(&s.id);
                let _ = super::api::blocking(move || Ok(p.delete(&obj)?)).await;
            }
            sqlx::query("UPDATE snapshots SET status = 'error', updated_at = ? WHERE id = ?")
                .bind(now())
                .bind(s.id.clone())
                .execute(pool)
                .await?;
            rep.marked_error += 1;
        } else {
            match finish_snapshot_delete(st, &s).await {
                Ok(()) => rep.deletes_finished += 1,
                Err(e) => {
                    tracing::error!(snapshot = %s.id, error = ?e, "cannot finish an interrupted delete")
                }
            }
        }
    }

    let dropped = sqlx::query("SELECT volume_id FROM volume_attachments WHERE node_id = ?")
        .bind(node.clone())
        .fetch_all(pool)
        .await?;
    rep.attachments_dropped = dropped.len();
    sqlx::query("DELETE FROM volume_attachments WHERE node_id = ?")
        .bind(node.clone())
        .execute(pool)
        .await?;
    sqlx::query(
        "UPDATE volumes SET status = 'available', updated_at = ? WHERE status = 'in-use' \
         AND NOT EXISTS (SELECT 1 FROM volume_attachments a WHERE a.volume_id = volumes.id)",
    )
    .bind(now())
    .execute(pool)
    .await?;

    // Objects the database knows, and those another node is building right now (a pool
    // directory may be shared by several nodes: their part files are not ours to remove).
    let mut known = HashSet::new();
    let mut others_building = HashSet::new();
    for (sql, snap) in [
        ("SELECT id, status, node_id FROM volumes", false),
        ("SELECT id, status, node_id FROM snapshots", true),
    ] {
        for r in sqlx::query(sql).fetch_all(pool).await? {
            let raw = get_str(&r, "id")?;
            let id = if snap { snap_object(&raw) } else { raw };
            let building = get_str(&r, "status")? == "creating";
            if building && opt_str(&r, "node_id")?.as_deref() != Some(node.as_str()) {
                others_building.insert(id.clone());
            }
            known.insert(id);
        }
    }
    for p in st.dataplane().pools() {
        let p2 = p.clone();
        let objects = match super::api::blocking(move || Ok(p2.list()?)).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(pool = p.name(), error = %format!("{e:#}"), "cannot list the pool");
                continue;
            }
        };
        for o in objects {
            let volume_like = uuid::Uuid::parse_str(&o.id).is_ok()
                || o.id
                    .strip_prefix(SNAPSHOT_PREFIX)
                    .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok());
            let leftover = o.partial || (volume_like && !known.contains(&o.id));
            if !leftover || others_building.contains(&o.id) {
                continue;
            }
            let (p2, id) = (p.clone(), o.id.clone());
            match super::api::blocking(move || Ok(p2.delete(&id)?)).await {
                Ok(()) => {
                    tracing::warn!(pool = p.name(), object = %o.id, partial = o.partial, "removed a leftover pool object");
                    rep.objects_removed += 1;
                }
                Err(e) => {
                    tracing::error!(object = %o.id, error = %format!("{e:#}"), "cannot remove a leftover")
                }
            }
        }
    }
    tracing::info!(?rep, "start-up reconciliation done");
    Ok(rep)
}
