//! The database schema: every migration in order. Each domain module owns the
//! statements of its tables (`volumes::SCHEMA`, `locks::SCHEMA`); this list, above
//! them all, orders them, so [`crate::store`] depends on no domain module.

use crate::store::Migration;

/// Every migration, in order. Append only; never edit a released entry.
pub const MIGRATIONS: &[Migration] = &[(
    1,
    &[
        "CREATE TABLE IF NOT EXISTS settings (name VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS nodes (name VARCHAR(255) NOT NULL PRIMARY KEY, started_at VARCHAR(40) NOT NULL, \
         heartbeat_at VARCHAR(40) NOT NULL, rest_address VARCHAR(255) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS projects (id VARCHAR(64) NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL UNIQUE, \
         description VARCHAR(255) NOT NULL, created_at VARCHAR(40) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS tokens (id VARCHAR(64) NOT NULL PRIMARY KEY, hash CHAR(64) NOT NULL UNIQUE, \
         project_id VARCHAR(64) NOT NULL, role VARCHAR(16) NOT NULL, name VARCHAR(255) NOT NULL, \
         created_at VARCHAR(40) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS volume_types (id VARCHAR(64) NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL UNIQUE, \
         description VARCHAR(255) NULL, is_public BIGINT NOT NULL, created_at VARCHAR(40) NOT NULL, \
         updated_at VARCHAR(40) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS volume_type_access (type_id VARCHAR(64) NOT NULL, project_id VARCHAR(64) NOT NULL, \
         PRIMARY KEY (type_id, project_id))",
        "CREATE TABLE IF NOT EXISTS volume_type_extra_specs (type_id VARCHAR(64) NOT NULL, spec_key VARCHAR(255) NOT NULL, \
         value VARCHAR(255) NOT NULL, PRIMARY KEY (type_id, spec_key))",
        "CREATE TABLE IF NOT EXISTS volume_type_metadata (type_id VARCHAR(64) NOT NULL, meta_key VARCHAR(255) NOT NULL, \
         value VARCHAR(255) NOT NULL, PRIMARY KEY (type_id, meta_key))",
        "CREATE TABLE IF NOT EXISTS volume_type_encryption (type_id VARCHAR(64) NOT NULL PRIMARY KEY, \
         encryption_id VARCHAR(64) NOT NULL UNIQUE, provider VARCHAR(16) NOT NULL, cipher VARCHAR(64) NOT NULL, \
         key_size BIGINT NOT NULL, control_location VARCHAR(16) NOT NULL, created_at VARCHAR(40) NOT NULL, \
         updated_at VARCHAR(40) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS metadef_namespaces (namespace VARCHAR(80) NOT NULL PRIMARY KEY, \
         display_name VARCHAR(80) NOT NULL, description VARCHAR(500) NOT NULL, visibility VARCHAR(16) NOT NULL, \
         protected BIGINT NOT NULL, owner VARCHAR(64) NOT NULL, created_at VARCHAR(40) NOT NULL, \
         updated_at VARCHAR(40) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS metadef_properties (namespace VARCHAR(80) NOT NULL, name VARCHAR(80) NOT NULL, \
         definition MEDIUMTEXT NOT NULL, PRIMARY KEY (namespace, name))",
        "CREATE TABLE IF NOT EXISTS metadef_resource_types (namespace VARCHAR(80) NOT NULL, name VARCHAR(80) NOT NULL, \
         prefix VARCHAR(80) NOT NULL, properties_target VARCHAR(80) NOT NULL, created_at VARCHAR(40) NOT NULL, \
         PRIMARY KEY (namespace, name))",
        "CREATE TABLE IF NOT EXISTS secrets (id VARCHAR(64) NOT NULL PRIMARY KEY, project_id VARCHAR(64) NOT NULL, \
         creator_id VARCHAR(64) NOT NULL, name VARCHAR(255) NOT NULL, secret_type VARCHAR(16) NOT NULL, \
         algorithm VARCHAR(255) NULL, bit_length BIGINT NULL, mode VARCHAR(255) NULL, \
         content_type VARCHAR(64) NOT NULL, expiration VARCHAR(40) NULL, status VARCHAR(16) NOT NULL, \
         sealed TEXT NOT NULL, created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL)",
        "CREATE TABLE IF NOT EXISTS orders (id VARCHAR(64) NOT NULL PRIMARY KEY, project_id VARCHAR(64) NOT NULL, \
         creator_id VARCHAR(64) NOT NULL, order_type VARCHAR(16) NOT NULL, status VARCHAR(16) NOT NULL, \
         meta TEXT NOT NULL, secret_id VARCHAR(64) NULL, error_reason VARCHAR(255) NULL, \
         created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL)",
        // The first volumes table (migration 1); migration 2 (volumes::SCHEMA) extends it.
        "CREATE TABLE IF NOT EXISTS volumes (id VARCHAR(64) NOT NULL PRIMARY KEY, project_id VARCHAR(64) NOT NULL, \
         name VARCHAR(255) NOT NULL, size_bytes BIGINT NOT NULL, type_id VARCHAR(64) NOT NULL, \
         encryption_key_id VARCHAR(64) NULL, pool VARCHAR(255) NOT NULL, node_id VARCHAR(255) NULL, \
         status VARCHAR(32) NOT NULL, created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL)",
    ],
),
// Volumes, snapshots, attachments (issue 6).
(2, crate::volumes::SCHEMA),
// Database read-write locks (issue 6).
(3, crate::locks::SCHEMA),
// Snapshots record the status a delete left (issue 13).
(4, crate::volumes::SCHEMA_4),
// The OpenStack clients (issue 14): volume flags, metadata, attachments API; QoS specs;
// a type's QoS spec.
(5, crate::volumes::SCHEMA_5),
(6, crate::qos::SCHEMA),
(7, crate::types::SCHEMA_7),
(8, crate::keys::acl::SCHEMA),
(9, crate::metadefs::objects::SCHEMA),
// Volumes on LUN pools (issue 15).
(10, crate::volumes::manageable::SCHEMA),
// NBD attachments' sealed pre-shared keys and Unix-socket peers (issue 12).
(11, crate::volumes::SCHEMA_11),
// Cluster membership (issue 16): a node's cluster and the addresses it serves on.
(12, crate::services::SCHEMA_12)];
