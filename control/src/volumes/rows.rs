//! Row mapping: the volumes module's own tables (`volumes`, `snapshots`,
//! `volume_attachments`, `volume_metadata`, `snapshot_metadata`) and every SQL statement
//! on them. Nothing else in the crate
//! reads these tables except through the functions here ([`count_by_type`] for
//! `types`, [`count_by_secret`] for `keys`).

use super::status::{Event, Status, Target};
use crate::dataplane::{ObjectKind, ObjectRef, Protocol, UnixPeer};
use crate::store::{count, execute_args, get_i64, get_str, now, opt_str};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

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

/// Migration 4: snapshots record the status a delete left too (to give it back).
pub const SCHEMA_4: &[&str] =
    &["ALTER TABLE snapshots ADD COLUMN previous_status VARCHAR(32) NULL"];

/// Migration 5 (issue 14): flags, user metadata, attachments of the attachments API.
pub const SCHEMA_5: &[&str] = &[
    "ALTER TABLE volumes ADD COLUMN bootable BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE volumes ADD COLUMN readonly BIGINT NOT NULL DEFAULT 0",
    "CREATE TABLE IF NOT EXISTS volume_metadata (volume_id VARCHAR(64) NOT NULL, meta_key VARCHAR(255) NOT NULL, \
     value VARCHAR(255) NOT NULL, PRIMARY KEY (volume_id, meta_key))",
    "CREATE TABLE IF NOT EXISTS snapshot_metadata (snapshot_id VARCHAR(64) NOT NULL, meta_key VARCHAR(255) NOT NULL, \
     value VARCHAR(255) NOT NULL, PRIMARY KEY (snapshot_id, meta_key))",
    "ALTER TABLE volume_attachments ADD COLUMN instance_uuid VARCHAR(64) NULL",
    "ALTER TABLE volume_attachments ADD COLUMN attach_mode VARCHAR(2) NOT NULL DEFAULT 'rw'",
    "ALTER TABLE volume_attachments ADD COLUMN attach_status VARCHAR(16) NOT NULL DEFAULT 'attached'",
];

/// Migration 11 (issue 12): an NBD attachment's pre-shared key, sealed under the master
/// key (`keys::seal_attachment_psk`), so a restarted daemon serves it with the same key;
/// and the Unix-socket peer (uid, gid) the connector named.
pub const SCHEMA_11: &[&str] = &[
    "ALTER TABLE volume_attachments ADD COLUMN nbd_psk_sealed TEXT NULL",
    "ALTER TABLE volume_attachments ADD COLUMN peer_uid BIGINT NULL",
    "ALTER TABLE volume_attachments ADD COLUMN peer_gid BIGINT NULL",
];

/// A volume row.
#[derive(Debug, Clone)]
pub struct Vol {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub description: Option<String>,
    pub size_bytes: u64,
    pub type_id: String,
    pub encryption_key_id: Option<String>,
    /// The key was made for this volume and goes with it.
    pub owns_key: bool,
    pub pool: String,
    /// The node that made it.
    pub node_id: Option<String>,
    pub status: Status,
    pub source_volid: Option<String>,
    pub snapshot_id: Option<String>,
    /// `os-set_bootable` (a clone inherits it).
    pub bootable: bool,
    /// `os-update_readonly_flag`: new attachments are read-only.
    pub readonly: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl Vol {
    /// Its pool object.
    pub fn object(&self) -> ObjectRef {
        ObjectRef::volume(&self.pool, &self.id)
    }
}

/// A snapshot row.
#[derive(Debug, Clone)]
pub struct Snap {
    pub id: String,
    pub project_id: String,
    pub volume_id: String,
    pub name: String,
    pub description: Option<String>,
    pub size_bytes: u64,
    /// A copy of the volume's key, owned by the snapshot.
    pub encryption_key_id: Option<String>,
    pub pool: String,
    pub node_id: Option<String>,
    pub status: Status,
    pub created_at: String,
    pub updated_at: String,
}

impl Snap {
    /// Its pool object.
    pub fn object(&self) -> ObjectRef {
        ObjectRef::snapshot(&self.pool, &self.id)
    }
}

/// An attachment row.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub id: String,
    pub volume_id: String,
    /// `nbd` or `vhost-user`; empty for a reservation (no front end yet).
    pub protocol: String,
    pub node_id: String,
    pub attached_at: String,
    /// The server it is for (attachments API), if named.
    pub instance_uuid: Option<String>,
    /// `rw` or `ro`.
    pub attach_mode: String,
    /// [`AttachStatus`] spelling.
    pub attach_status: String,
    /// The rendered `connection_info` without credentials (JSON text; `{}` when reserved).
    pub connection_info: String,
    /// Its NBD pre-shared key, sealed (`None` without TLS or before it has a front end).
    pub nbd_psk_sealed: Option<String>,
    /// The Unix-socket peer its connector named.
    pub unix_peer: Option<UnixPeer>,
}

/// Where an attachment is (the attachments API's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStatus {
    /// Made without a connector: no front end yet.
    Reserved,
    /// Its front end exists; the consumer has not said `os-complete` yet.
    Attaching,
    /// Its front end exists and is in use.
    Attached,
}

impl AttachStatus {
    /// The API and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachStatus::Reserved => "reserved",
            AttachStatus::Attaching => "attaching",
            AttachStatus::Attached => "attached",
        }
    }
}

impl Attachment {
    /// Has it a front end in the data plane?
    pub fn is_live(&self) -> bool {
        self.attach_status != AttachStatus::Reserved.as_str()
    }
}

/// Which metadata table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// `volume_metadata`.
    Volume,
    /// `snapshot_metadata`.
    Snapshot,
}

impl Meta {
    fn table(self) -> &'static str {
        match self {
            Meta::Volume => "volume_metadata",
            Meta::Snapshot => "snapshot_metadata",
        }
    }
    fn col(self) -> &'static str {
        match self {
            Meta::Volume => "volume_id",
            Meta::Snapshot => "snapshot_id",
        }
    }
}

fn size_of(r: &AnyRow) -> Result<u64, sqlx::Error> {
    u64::try_from(get_i64(r, "size_bytes")?).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn bad_status(s: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("unknown status {s:?}").into())
}

fn db_size(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

fn vol_row(r: &AnyRow) -> Result<Vol, sqlx::Error> {
    let status = get_str(r, "status")?;
    Ok(Vol {
        id: get_str(r, "id")?,
        project_id: get_str(r, "project_id")?,
        name: get_str(r, "name")?,
        description: opt_str(r, "description")?,
        size_bytes: size_of(r)?,
        type_id: get_str(r, "type_id")?,
        encryption_key_id: opt_str(r, "encryption_key_id")?,
        owns_key: get_i64(r, "owns_key")? != 0,
        pool: get_str(r, "pool")?,
        node_id: opt_str(r, "node_id")?,
        status: Status::parse(&status).ok_or_else(|| bad_status(&status))?,
        source_volid: opt_str(r, "source_volid")?,
        snapshot_id: opt_str(r, "snapshot_id")?,
        bootable: get_i64(r, "bootable")? != 0,
        readonly: get_i64(r, "readonly")? != 0,
        created_at: get_str(r, "created_at")?,
        updated_at: get_str(r, "updated_at")?,
    })
}

fn snap_row(r: &AnyRow) -> Result<Snap, sqlx::Error> {
    let status = get_str(r, "status")?;
    Ok(Snap {
        id: get_str(r, "id")?,
        project_id: get_str(r, "project_id")?,
        volume_id: get_str(r, "volume_id")?,
        name: get_str(r, "name")?,
        description: opt_str(r, "description")?,
        size_bytes: size_of(r)?,
        encryption_key_id: opt_str(r, "encryption_key_id")?,
        pool: get_str(r, "pool")?,
        node_id: opt_str(r, "node_id")?,
        status: Status::parse(&status).ok_or_else(|| bad_status(&status))?,
        created_at: get_str(r, "created_at")?,
        updated_at: get_str(r, "updated_at")?,
    })
}

/// The rows `sql` selects (text arguments), mapped by `map`. The SQL is this module's
/// own (status spellings are its constants).
async fn fetch<T>(
    conn: &mut AnyConnection,
    sql: String,
    args: &[&str],
    map: fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, sqlx::Error> {
    let q = args
        .iter()
        .fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, a| {
            q.bind(a.to_string())
        });
    q.fetch_all(&mut *conn).await?.iter().map(map).collect()
}

/// A row the service loads by id: a volume or a snapshot.
pub trait Stored: Sized + Send {
    /// What the API calls it.
    const WHAT: &'static str;
    /// Its table.
    const TABLE: &'static str;
    /// Map a row.
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error>;
    /// Its project.
    fn project_id(&self) -> &str;

    /// The row of `id`.
    fn find(
        conn: &mut AnyConnection,
        id: &str,
    ) -> impl std::future::Future<Output = Result<Option<Self>, sqlx::Error>> + Send {
        let sql = format!("SELECT * FROM {} WHERE id = ?", Self::TABLE);
        async move { Ok(fetch(conn, sql, &[id], Self::from_row).await?.pop()) }
    }
}

impl Stored for Vol {
    const WHAT: &'static str = "volume";
    const TABLE: &'static str = "volumes";
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        vol_row(r)
    }
    fn project_id(&self) -> &str {
        &self.project_id
    }
}

impl Stored for Snap {
    const WHAT: &'static str = "snapshot";
    const TABLE: &'static str = "snapshots";
    fn from_row(r: &AnyRow) -> Result<Self, sqlx::Error> {
        snap_row(r)
    }
    fn project_id(&self) -> &str {
        &self.project_id
    }
}

/// The volumes or snapshots of a project, oldest first.
pub async fn of_project<T: Stored>(
    conn: &mut AnyConnection,
    project: &str,
) -> Result<Vec<T>, sqlx::Error> {
    let sql = format!(
        "SELECT * FROM {} WHERE project_id = ? ORDER BY created_at, id",
        T::TABLE
    );
    fetch(conn, sql, &[project], T::from_row).await
}

/// The volumes or snapshots of `node` in one of `statuses` (start-up reconciliation).
pub async fn of_node<T: Stored>(
    conn: &mut AnyConnection,
    node: &str,
    statuses: &[Status],
) -> Result<Vec<T>, sqlx::Error> {
    let sql = format!(
        "SELECT * FROM {} WHERE node_id = ? AND status IN ({})",
        T::TABLE,
        in_list(statuses.iter().map(|s| s.as_str()))
    );
    fetch(conn, sql, &[node], T::from_row).await
}

/// Every volume or snapshot (an admin's `all_tenants` listing), oldest first.
pub async fn all<T: Stored>(conn: &mut AnyConnection) -> Result<Vec<T>, sqlx::Error> {
    let sql = format!("SELECT * FROM {} ORDER BY created_at, id", T::TABLE);
    fetch(conn, sql, &[], T::from_row).await
}

/// Every volume and snapshot object the database names.
pub async fn all_objects(conn: &mut AnyConnection) -> Result<Vec<ObjectRef>, sqlx::Error> {
    let vols = fetch(conn, "SELECT id, pool FROM volumes".into(), &[], |r| {
        Ok(ObjectRef::volume(get_str(r, "pool")?, get_str(r, "id")?))
    });
    let mut out = vols.await?;
    let snaps = fetch(conn, "SELECT id, pool FROM snapshots".into(), &[], |r| {
        Ok(ObjectRef::snapshot(get_str(r, "pool")?, get_str(r, "id")?))
    });
    out.extend(snaps.await?);
    Ok(out)
}

/// A quoted `IN (…)` list of status spellings (static strings of this module).
fn in_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Insert a new volume row.
pub async fn insert_vol(conn: &mut AnyConnection, v: &Vol) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO volumes (id, project_id, name, size_bytes, type_id, encryption_key_id, pool, node_id, status, \
         created_at, updated_at, description, source_volid, snapshot_id, owns_key, previous_status, bootable, \
         readonly) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
    )
    .bind(v.id.clone())
    .bind(v.project_id.clone())
    .bind(v.name.clone())
    .bind(db_size(v.size_bytes))
    .bind(v.type_id.clone())
    .bind(v.encryption_key_id.clone())
    .bind(v.pool.clone())
    .bind(v.node_id.clone())
    .bind(v.status.as_str())
    .bind(v.created_at.clone())
    .bind(v.updated_at.clone())
    .bind(v.description.clone())
    .bind(v.source_volid.clone())
    .bind(v.snapshot_id.clone())
    .bind(i64::from(v.owns_key))
    .bind(i64::from(v.bootable))
    .bind(i64::from(v.readonly))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Insert a new snapshot row.
pub async fn insert_snap(conn: &mut AnyConnection, s: &Snap) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO snapshots (id, project_id, volume_id, name, description, size_bytes, encryption_key_id, pool, \
         node_id, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(s.id.clone())
    .bind(s.project_id.clone())
    .bind(s.volume_id.clone())
    .bind(s.name.clone())
    .bind(s.description.clone())
    .bind(db_size(s.size_bytes))
    .bind(s.encryption_key_id.clone())
    .bind(s.pool.clone())
    .bind(s.node_id.clone())
    .bind(s.status.as_str())
    .bind(s.created_at.clone())
    .bind(s.updated_at.clone())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Apply `event` to `object`'s row as a compare-and-swap; false when its status was
/// not one the event starts from (someone else moved it first).
pub async fn apply(
    conn: &mut AnyConnection,
    object: &ObjectRef,
    event: Event,
) -> Result<bool, sqlx::Error> {
    let table = match object.kind {
        ObjectKind::Volume => "volumes",
        ObjectKind::Snapshot => "snapshots",
    };
    let (from, to) = event.transition();
    let from = in_list(from.iter().map(|s| s.as_str()));
    let set = match to {
        Target::To(s) if event.records_previous() => {
            format!("previous_status = status, status = '{s}'")
        }
        Target::To(s) => format!("status = '{s}'"),
        Target::Previous => format!(
            "status = COALESCE(previous_status, '{}')",
            Status::Available
        ),
    };
    let mut sql =
        format!("UPDATE {table} SET {set}, updated_at = ? WHERE id = ? AND status IN ({from})");
    let t = now();
    let mut args = vec![t.as_str(), object.id.as_str()];
    if event == Event::LastDetached {
        sql.push_str(" AND NOT EXISTS (SELECT 1 FROM volume_attachments WHERE volume_id = ?)");
        args.push(&object.id);
    }
    Ok(exec_built(conn, sql, &args).await? > 0)
}

/// Run a statement built from this module's constants (status spellings) with text
/// arguments; the number of rows it touched.
async fn exec_built(
    conn: &mut AnyConnection,
    sql: String,
    args: &[&str],
) -> Result<u64, sqlx::Error> {
    let q = args
        .iter()
        .fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, a| {
            q.bind(a.to_string())
        });
    Ok(q.execute(&mut *conn).await?.rows_affected())
}

/// Record the new size of volume `id`.
pub async fn set_size(conn: &mut AnyConnection, id: &str, size: u64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE volumes SET size_bytes = ?, updated_at = ? WHERE id = ?")
        .bind(db_size(size))
        .bind(now())
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Remove volume `id`'s row, its attachment rows and its metadata.
pub async fn delete_vol(conn: &mut AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    for sql in [
        "DELETE FROM volume_attachments WHERE volume_id = ?",
        "DELETE FROM volume_metadata WHERE volume_id = ?",
        "DELETE FROM volumes WHERE id = ?",
    ] {
        execute_args(conn, sql, &[id]).await?;
    }
    Ok(())
}

/// Remove snapshot `id`'s row and its metadata.
pub async fn delete_snap(conn: &mut AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    for sql in [
        "DELETE FROM snapshot_metadata WHERE snapshot_id = ?",
        "DELETE FROM snapshots WHERE id = ?",
    ] {
        execute_args(conn, sql, &[id]).await?;
    }
    Ok(())
}

/// Set a volume's or snapshot's name and description.
pub async fn set_names(
    conn: &mut AnyConnection,
    which: Meta,
    id: &str,
    name: &str,
    description: Option<&str>,
) -> Result<(), sqlx::Error> {
    let table = match which {
        Meta::Volume => "volumes",
        Meta::Snapshot => "snapshots",
    };
    let sql = format!("UPDATE {table} SET name = ?, description = ?, updated_at = ? WHERE id = ?");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name.to_string())
        .bind(description.map(str::to_string))
        .bind(now())
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A volume flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `bootable`.
    Bootable,
    /// `readonly`.
    Readonly,
}

/// Set a volume flag.
pub async fn set_flag(
    conn: &mut AnyConnection,
    id: &str,
    flag: Flag,
    on: bool,
) -> Result<(), sqlx::Error> {
    let col = match flag {
        Flag::Bootable => "bootable",
        Flag::Readonly => "readonly",
    };
    let sql = format!("UPDATE volumes SET {col} = ?, updated_at = ? WHERE id = ?");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(i64::from(on))
        .bind(now())
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Move volume `id` to type `type_id` (`os-retype`).
pub async fn set_type(
    conn: &mut AnyConnection,
    id: &str,
    type_id: &str,
) -> Result<(), sqlx::Error> {
    execute_args(
        conn,
        "UPDATE volumes SET type_id = ?, updated_at = ? WHERE id = ?",
        &[type_id, &now(), id],
    )
    .await?;
    Ok(())
}

/// The metadata of a volume or snapshot.
pub async fn metadata_of(
    conn: &mut AnyConnection,
    which: Meta,
    id: &str,
) -> Result<std::collections::BTreeMap<String, String>, sqlx::Error> {
    let sql = format!(
        "SELECT meta_key, value FROM {} WHERE {} = ?",
        which.table(),
        which.col()
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| Ok((get_str(r, "meta_key")?, get_str(r, "value")?)))
        .collect()
}

/// Set metadata keys of a volume or snapshot (`replace`: drop the others first).
pub async fn set_metadata(
    conn: &mut AnyConnection,
    which: Meta,
    id: &str,
    items: &std::collections::BTreeMap<String, String>,
    replace: bool,
) -> Result<(), sqlx::Error> {
    if replace {
        let sql = format!("DELETE FROM {} WHERE {} = ?", which.table(), which.col());
        exec_built(conn, sql, &[id]).await?;
    }
    for (k, v) in items {
        let del = format!(
            "DELETE FROM {} WHERE {} = ? AND meta_key = ?",
            which.table(),
            which.col()
        );
        exec_built(conn, del, &[id, k]).await?;
        let ins = format!(
            "INSERT INTO {} ({}, meta_key, value) VALUES (?, ?, ?)",
            which.table(),
            which.col()
        );
        exec_built(conn, ins, &[id, k, v]).await?;
    }
    Ok(())
}

/// Remove one metadata key; the number of rows removed.
pub async fn delete_metadata(
    conn: &mut AnyConnection,
    which: Meta,
    id: &str,
    key: &str,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {} WHERE {} = ? AND meta_key = ?",
        which.table(),
        which.col()
    );
    exec_built(conn, sql, &[id, key]).await
}

/// A project's use of the volumes service (`limits`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Volumes.
    pub volumes: i64,
    /// Snapshots.
    pub snapshots: i64,
    /// Bytes of volumes and snapshots.
    pub bytes: i64,
}

/// What `project` uses.
pub async fn usage(conn: &mut AnyConnection, project: &str) -> Result<Usage, sqlx::Error> {
    let mut u = Usage::default();
    for (table, n) in [("volumes", &mut u.volumes), ("snapshots", &mut u.snapshots)] {
        let sql = format!(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size_bytes), 0) AS SIGNED) AS b FROM {table} \
             WHERE project_id = ?"
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(project.to_string())
            .fetch_one(&mut *conn)
            .await?;
        *n = get_i64(&r, "n")?;
        u.bytes = u.bytes.saturating_add(get_i64(&r, "b")?);
    }
    Ok(u)
}

/// Number of snapshots of volume `id`.
pub async fn snapshots_of(conn: &mut AnyConnection, id: &str) -> Result<i64, sqlx::Error> {
    count(
        conn,
        "SELECT COUNT(*) AS n FROM snapshots WHERE volume_id = ?",
        id,
    )
    .await
}

fn attachment_row(r: &AnyRow) -> Result<Attachment, sqlx::Error> {
    Ok(Attachment {
        id: get_str(r, "id")?,
        volume_id: get_str(r, "volume_id")?,
        protocol: get_str(r, "protocol")?,
        node_id: get_str(r, "node_id")?,
        attached_at: get_str(r, "attached_at")?,
        instance_uuid: opt_str(r, "instance_uuid")?,
        attach_mode: get_str(r, "attach_mode")?,
        attach_status: get_str(r, "attach_status")?,
        connection_info: get_str(r, "connection_info")?,
        nbd_psk_sealed: opt_str(r, "nbd_psk_sealed")?,
        unix_peer: {
            let id = |col: &str| -> Result<Option<u32>, sqlx::Error> {
                r.try_get::<Option<i64>, _>(col)?
                    .map(|v| {
                        u32::try_from(v).map_err(|e| sqlx::Error::ColumnDecode {
                            index: col.to_string(),
                            source: Box::new(e),
                        })
                    })
                    .transpose()
            };
            let (uid, gid) = (id("peer_uid")?, id("peer_gid")?);
            (uid.is_some() || gid.is_some()).then_some(UnixPeer { uid, gid })
        },
    })
}

/// The attachments of volume `id`, oldest first.
pub async fn attachments_of(
    conn: &mut AnyConnection,
    volume_id: &str,
) -> Result<Vec<Attachment>, sqlx::Error> {
    let sql =
        "SELECT * FROM volume_attachments WHERE volume_id = ? ORDER BY attached_at, id".into();
    fetch(conn, sql, &[volume_id], attachment_row).await
}

/// Attachment `id`, with the project of its volume.
pub async fn find_attachment(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<(Attachment, String)>, sqlx::Error> {
    let sql = "SELECT a.*, v.project_id AS owner FROM volume_attachments a \
               JOIN volumes v ON v.id = a.volume_id WHERE a.id = ?"
        .into();
    Ok(fetch(conn, sql, &[id], |r| {
        Ok((attachment_row(r)?, get_str(r, "owner")?))
    })
    .await?
    .pop())
}

/// The attachments of `project`'s volumes (every project's when `None`), oldest first.
pub async fn attachments_of_project(
    conn: &mut AnyConnection,
    project: Option<&str>,
) -> Result<Vec<Attachment>, sqlx::Error> {
    match project {
        Some(p) => {
            let sql = "SELECT a.* FROM volume_attachments a JOIN volumes v ON v.id = a.volume_id \
                       WHERE v.project_id = ? ORDER BY a.attached_at, a.id"
                .into();
            fetch(conn, sql, &[p], attachment_row).await
        }
        None => {
            let sql = "SELECT * FROM volume_attachments ORDER BY attached_at, id".into();
            fetch(conn, sql, &[], attachment_row).await
        }
    }
}

/// A new attachment row.
#[derive(Debug, Clone)]
pub struct NewAttachment<'a> {
    pub id: &'a str,
    pub volume_id: &'a str,
    /// `None` for a reservation.
    pub protocol: Option<Protocol>,
    pub node: &'a str,
    /// Rendered, without credentials.
    pub connection_info: &'a str,
    pub instance_uuid: Option<&'a str>,
    pub read_only: bool,
    pub status: AttachStatus,
    /// The NBD pre-shared key, sealed.
    pub nbd_psk_sealed: Option<&'a str>,
    /// The Unix-socket peer the connector named.
    pub unix_peer: Option<UnixPeer>,
}

/// Record an attachment and its rendered `connection_info`.
pub async fn insert_attachment(
    conn: &mut AnyConnection,
    a: &NewAttachment<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO volume_attachments (id, volume_id, protocol, node_id, connection_info, attached_at, \
         instance_uuid, attach_mode, attach_status, nbd_psk_sealed, peer_uid, peer_gid) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(a.id.to_string())
    .bind(a.volume_id.to_string())
    .bind(a.protocol.map(|p| p.as_str()).unwrap_or(""))
    .bind(a.node.to_string())
    .bind(a.connection_info.to_string())
    .bind(now())
    .bind(a.instance_uuid.map(str::to_string))
    .bind(if a.read_only { "ro" } else { "rw" })
    .bind(a.status.as_str())
    .bind(a.nbd_psk_sealed.map(str::to_string))
    .bind(a.unix_peer.and_then(|p| p.uid).map(i64::from))
    .bind(a.unix_peer.and_then(|p| p.gid).map(i64::from))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A reservation got its front end: record where and how (compare-and-swap on the
/// reservation; false when it is no longer one).
pub async fn connect_attachment(
    conn: &mut AnyConnection,
    id: &str,
    protocol: Protocol,
    node: &str,
    connection_info: &str,
    nbd_psk_sealed: Option<&str>,
    unix_peer: Option<UnixPeer>,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE volume_attachments SET protocol = ?, node_id = ?, connection_info = ?, attach_status = ?, \
         nbd_psk_sealed = ?, peer_uid = ?, peer_gid = ? WHERE id = ? AND attach_status = ?",
    )
    .bind(protocol.as_str())
    .bind(node.to_string())
    .bind(connection_info.to_string())
    .bind(AttachStatus::Attaching.as_str())
    .bind(nbd_psk_sealed.map(str::to_string))
    .bind(unix_peer.and_then(|p| p.uid).map(i64::from))
    .bind(unix_peer.and_then(|p| p.gid).map(i64::from))
    .bind(id.to_string())
    .bind(AttachStatus::Reserved.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Mark a live attachment `attached` (`os-complete`); false if it is a reservation.
pub async fn complete_attachment(conn: &mut AnyConnection, id: &str) -> Result<bool, sqlx::Error> {
    let n = execute_args(
        conn,
        "UPDATE volume_attachments SET attach_status = ? WHERE id = ? AND attach_status <> ?",
        &[
            AttachStatus::Attached.as_str(),
            id,
            AttachStatus::Reserved.as_str(),
        ],
    )
    .await?;
    Ok(n > 0)
}

/// Remove attachment `id`.
pub async fn delete_attachment(conn: &mut AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    execute_args(conn, "DELETE FROM volume_attachments WHERE id = ?", &[id]).await?;
    Ok(())
}

/// Every attachment `node` made a front end for (reservations have none), oldest first:
/// what start-up reconciliation serves again.
pub async fn node_attachments(
    conn: &mut AnyConnection,
    node: &str,
) -> Result<Vec<Attachment>, sqlx::Error> {
    let sql = "SELECT * FROM volume_attachments WHERE node_id = ? AND attach_status <> ? \
               ORDER BY attached_at, id"
        .into();
    fetch(
        conn,
        sql,
        &[node, AttachStatus::Reserved.as_str()],
        attachment_row,
    )
    .await
}

/// Record the sealed NBD key of attachment `id` (a restart gave it a new one).
pub async fn set_nbd_psk(
    conn: &mut AnyConnection,
    id: &str,
    sealed: &str,
) -> Result<(), sqlx::Error> {
    execute_args(
        conn,
        "UPDATE volume_attachments SET nbd_psk_sealed = ? WHERE id = ?",
        &[sealed, id],
    )
    .await?;
    Ok(())
}

/// Replace the recorded `connection_info` of attachment `id`.
pub async fn set_connection_info(
    conn: &mut AnyConnection,
    id: &str,
    connection_info: &str,
) -> Result<(), sqlx::Error> {
    execute_args(
        conn,
        "UPDATE volume_attachments SET connection_info = ? WHERE id = ?",
        &[connection_info, id],
    )
    .await?;
    Ok(())
}

/// Volumes `in-use` without any attachment left go back to `available`; returns how
/// many moved.
pub async fn settle_unattached(conn: &mut AnyConnection) -> Result<u64, sqlx::Error> {
    let (from, _) = Event::LastDetached.transition();
    let sql = format!(
        "UPDATE volumes SET status = '{}', updated_at = ? WHERE status IN ({}) \
         AND NOT EXISTS (SELECT 1 FROM volume_attachments a WHERE a.volume_id = volumes.id)",
        Status::Available,
        in_list(from.iter().map(|s| s.as_str()))
    );
    exec_built(conn, sql, &[&now()]).await
}

/// Number of volumes of a volume type.
pub async fn count_by_type(conn: &mut AnyConnection, type_id: &str) -> Result<i64, sqlx::Error> {
    count(
        conn,
        "SELECT COUNT(*) AS n FROM volumes WHERE type_id = ?",
        type_id,
    )
    .await
}

/// Number of volumes and snapshots whose encryption key is this secret.
pub async fn count_by_secret(
    conn: &mut AnyConnection,
    secret_id: &str,
) -> Result<i64, sqlx::Error> {
    crate::store::count_args(
        conn,
        "SELECT (SELECT COUNT(*) FROM volumes WHERE encryption_key_id = ?) + \
         (SELECT COUNT(*) FROM snapshots WHERE encryption_key_id = ?) AS n",
        &[secret_id, secret_id],
    )
    .await
}
