//! Volumes, snapshots, clones and attachments (Cinder-shaped).
//!
//! - [`api`]: `/v3/{project_id}/volumes…` (create, clone, list/show, delete, actions:
//!   `os-extend`, `os-initialize_connection`, `os-terminate_connection`; per-volume
//!   encryption) and `/v3/{project_id}/snapshots…`.
//! - [`reconcile`]: the start-up pass that makes a crashed create/clone/delete end in a
//!   clean state (volume `error` or gone, locks released, no orphan files).
//!
//! Bytes live in storage pools ([`ember_blockdev::pool`]) that the data plane owns; the
//! control plane reaches them, the LUKS header code and the front ends only through
//! [`crate::DataPlane`]. Sources of clones and snapshots are protected by shared
//! database locks ([`crate::locks`]); delete and extend take them exclusive.

pub mod api;
pub mod reconcile;

use crate::store::count;

/// Schema of the volume tables (migration 2; the `volumes` table itself is from 1).
pub const SCHEMA: &[&str] = &[
    "ALTER TABLE volumes ADD COLUMN description VARCHAR(255) NULL",
    "ALTER TABLE volumes ADD COLUMN source_volid VARCHAR(64) NULL",
    "ALTER TABLE volumes ADD COLUMN snapshot_id VARCHAR(64) NULL",
    "ALTER TABLE volumes ADD COLUMN owns_key BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE volumes ADD COLUMN previous_status VARCHAR(32) NULL",
    "CREATE TABLE IF NOT EXISTS snapshots (id VARCHAR(64) NOT NULL PRIMARY KEY, project_id VARCHAR(64) NOT NULL, \
     volume_id VARCHAR(64) NOT NULL, name VARCHAR(255) NOT NULL, description VARCHAR(255) NULL, \
     size_bytes BIGINT NOT NULL, encryption_key_id VARCHAR(64) NULL, pool VARCHAR(255) NOT NULL, \
     node_id VARCHAR(255) NULL, status VARCHAR(32) NOT NULL, created_at VARCHAR(40) NOT NULL, \
     updated_at VARCHAR(40) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS volume_attachments (id VARCHAR(64) NOT NULL PRIMARY KEY, \
     volume_id VARCHAR(64) NOT NULL, protocol VARCHAR(16) NOT NULL, node_id VARCHAR(255) NOT NULL, \
     connection_info TEXT NOT NULL, attached_at VARCHAR(40) NOT NULL)",
];

/// Number of volumes of a volume type.
pub async fn count_by_type(
    conn: &mut sqlx::AnyConnection,
    type_id: &str,
) -> Result<i64, sqlx::Error> {
    count(
        conn,
        "SELECT COUNT(*) AS n FROM volumes WHERE type_id = ?",
        type_id,
    )
    .await
}

/// Number of volumes whose encryption key is this secret.
pub async fn count_by_secret(
    conn: &mut sqlx::AnyConnection,
    secret_id: &str,
) -> Result<i64, sqlx::Error> {
    count(
        conn,
        "SELECT COUNT(*) AS n FROM volumes WHERE encryption_key_id = ?",
        secret_id,
    )
    .await
}
