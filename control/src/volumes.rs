//! Volumes, snapshots, clones and attachments (Cinder-shaped).
//!
//! ```text
//!   handlers (HTTP: auth, bodies, JSON)  ──▶  service (the state machine)  ──▶  DataPlane
//!                                                │      │        │
//!                           status (the moves) ◀─┘    rows     keys, types, locks
//!                                                   (own SQL)
//! ```
//!
//! - [`handlers`]: `/v3/{project_id}/volumes…` (create, clone, list/show, delete,
//!   actions `os-extend`, `os-initialize_connection`, `os-terminate_connection`;
//!   per-volume encryption) and `/v3/{project_id}/snapshots…`. HTTP only.
//! - [`service`]: what each operation does, in order; the one place that maps
//!   [`crate::dataplane::DataPlaneError`] to HTTP.
//! - [`status`]: the statuses as enums, every move between them in one table, and what
//!   each status allows.
//! - [`rows`]: the module's tables and every statement on them.
//! - [`views`]: the JSON answers, Cinder's `connection_info` from the typed endpoint.
//! - [`manageable`]: volumes on LUN pools: `/v3/{project_id}/manageable_volumes`
//!   (list the LUNs, manage one as a volume), `os-unmanage`, and the LUN side of
//!   attach and extend (a bind with an identity check first; faults shown on the volume).
//! - [`reconcile`]: the start-up pass that makes a crashed create/clone/delete end in a
//!   clean state (volume `error` or gone, locks released, no orphan objects), safe when
//!   several nodes share a pool.
//!
//! Bytes live in storage pools that the data plane owns; this module reaches them, the
//! LUKS header code and the front ends only through [`crate::dataplane::DataPlane`].
//! Secrets go through [`crate::keys`], type lookups through [`crate::types`]. Sources of
//! clones and snapshots are protected by shared database locks ([`crate::locks`]);
//! delete and extend take them exclusive.

pub mod attachments;
pub mod handlers;
pub mod listing;
pub mod manageable;
pub mod reconcile;
pub mod rows;
pub mod service;
pub mod status;
pub mod views;

pub use rows::{count_by_secret, count_by_type, SCHEMA, SCHEMA_11, SCHEMA_4, SCHEMA_5};
