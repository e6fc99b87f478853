//! Start-up reconciliation: after a crash (SIGKILL in the middle of a create, clone,
//! snapshot or delete), make every object this node was working on end in a clean state.
//!
//! 1. Locks: every holder and waiter recorded for this node belongs to the dead process;
//!    release them at once (other nodes would otherwise wait for the lease).
//! 2. Volumes and snapshots of this node still `creating`: their bytes may be half made;
//!    delete them from the pool and mark the row `error` (the user sees the failure and
//!    deletes it). Rows still `deleting`: finish the delete.
//! 3. Attachments of this node: **serve them again**, with the same attachment id,
//!    protocol and access mode, so the data plane puts them at the same endpoint (NBD
//!    export `<volume>-<attachment>` on the same listeners, vhost-user socket
//!    `VHOST_DIR/<volume>-<attachment8>.sock`), an NBD attachment with the pre-shared
//!    key sealed in its row (unsealed with the master key) and the Unix peer its
//!    connector named, and the clients that lost their
//!    connection reconnect to what they knew: QEMU's `reconnect=` chardev and its
//!    inflight area resubmit the guest's requests in flight, an NBD client reconnects
//!    and retries. A changed endpoint (the daemon was restarted with other `--nbd` or
//!    `--vhost-dir` flags) is recorded and logged. An attachment that cannot be served
//!    again (its volume is gone or not `in-use`, the unlock fails, the key is missing)
//!    is dropped and logged at `error`; volumes left without an attachment go back to
//!    `available`. Reservations (attachments API rows without a connector) have no
//!    front end and are left as they are.
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
use super::rows::Stored;
use super::service::{finish_delete, finish_snapshot_delete, restore_attachment};
use super::status::{Event, Status};
use crate::dataplane::{ObjectRef, Protocol};
use crate::state::AppState;
use serde_json::Value;
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
    /// Attachments served again.
    pub attachments_restored: usize,
    /// Attachments that could not be served again, dropped.
    pub attachments_dropped: usize,
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

    restore_attachments(st, &node, &mut rep).await?;

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

/// Step 3: serve this node's attachments again (see the module doc).
async fn restore_attachments(st: &AppState, node: &str, rep: &mut Report) -> anyhow::Result<()> {
    let pool = &st.db().pool;
    let atts = rows::node_attachments(&mut *pool.acquire().await?, node).await?;
    for a in atts {
        let protocol = match a.protocol.as_str() {
            "nbd" => Protocol::Nbd,
            "vhost-user" => Protocol::VhostUser,
            _ => continue,
        };
        let stored: Value = serde_json::from_str(&a.connection_info).unwrap_or(Value::Null);
        let vol = rows::Vol::find(&mut *pool.acquire().await?, &a.volume_id).await?;
        let res = match vol {
            Some(v) if v.status == Status::InUse => {
                let read_only = a.attach_mode == "ro" || v.readonly;
                restore_attachment(st, &v, &a, protocol, read_only)
                    .await
                    .map_err(|e| e.to_string())
                    .map(|(text, new_key)| {
                        let info: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        (info, read_only, new_key)
                    })
            }
            Some(v) => Err(format!("the volume is {}", v.status)),
            None => Err("the volume is gone".to_string()),
        };
        match res {
            Ok((info, read_only, new_key)) => {
                if let Some(sealed) = new_key {
                    // It had no key (made without TLS): its clients must attach again to
                    // learn the new one.
                    rows::set_nbd_psk(&mut *pool.acquire().await?, &a.id, &sealed).await?;
                    tracing::warn!(volume = %a.volume_id, attachment = %a.id,
                        "attachment served again with a new NBD key: its clients must attach again");
                }
                if info != stored {
                    // Restarted with other listeners or another vhost dir: the row says
                    // where clients find it now.
                    rows::set_connection_info(
                        &mut *pool.acquire().await?,
                        &a.id,
                        &info.to_string(),
                    )
                    .await?;
                    tracing::warn!(volume = %a.volume_id, attachment = %a.id,
                        before = %stored["data"], now = %info["data"],
                        "attachment served again at another endpoint: its clients must be told");
                }
                tracing::info!(volume = %a.volume_id, attachment = %a.id,
                    protocol = protocol.as_str(), read_only, "attachment served again");
                rep.attachments_restored += 1;
            }
            Err(why) => {
                tracing::error!(volume = %a.volume_id, attachment = %a.id, error = %why,
                    "cannot serve the attachment again: dropped");
                rows::delete_attachment(&mut *pool.acquire().await?, &a.id).await?;
                rep.attachments_dropped += 1;
            }
        }
    }
    rows::settle_unattached(&mut *pool.acquire().await?).await?;
    Ok(())
}
