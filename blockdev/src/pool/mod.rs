//! Storage pools: where volumes are allocated.
//!
//! A [`Pool`] hands out backing storage for volumes and snapshots, named by an opaque id
//! chosen by the control plane, and describes each one as a [`BackendSpec`] that
//! [`open`](crate::open) understands. A [`LunPool`] is the other kind: LUNs an array
//! made, which volumes are bound to rather than allocated on.
//!
//! Crash safety is part of the contract: [`Pool::create`] and [`Pool::clone_from`] build
//! the object under a temporary name and publish it atomically, so after a crash an
//! object is either complete under its real name or listed as
//! [`partial`](PoolObject::partial) by [`Pool::list`], for the start-up reconciliation
//! pass to [`delete`](Pool::delete).
//!
//! - [`dir`]: [`DirPool`], a directory of sparse files `<id>.img`; clones use a reflink
//!   (`FICLONE`) where the file system has one, else [`copy::copy_device`].
//! - [`copy`]: a pipelined, sparse-aware io_uring copy between two devices.
//! - [`lun`]: [`LunPool`], LUNs that exist already (every LUN of an iSCSI target, or
//!   host block devices matching globs): found and opened, never allocated; it does not
//!   implement [`Pool`], whose operations make and remove objects.
//!
//! All methods block (file system calls, copies); async callers run them on a blocking
//! thread.

pub mod copy;
pub mod dir;
pub mod lun;

pub use copy::{copy_device, CopyOptions, CopyStats};
pub use dir::DirPool;
pub use lun::LunPool;

use crate::backend::BackendSpec;

/// Result alias of this module.
pub type Result<T, E = PoolError> = std::result::Result<T, E>;

/// A pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The object already exists.
    #[error("{0} already exists in the pool")]
    AlreadyExists(String),
    /// A copy between two devices failed.
    #[error("copy {0}")]
    Copy(String, #[source] crate::Error),
    /// The id is not a valid object name.
    #[error(
        "invalid volume id {0:?}: use 1 to 128 characters of [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidId(String),
    /// The size is zero, not a multiple of the block size, or too large.
    #[error("invalid size {0}: must be a positive multiple of {ALIGN_BYTES} bytes")]
    InvalidSize(u64),
    /// A file system call failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// There is not enough free space.
    #[error("not enough space in the pool: {need} bytes needed, {free} bytes free")]
    NoSpace {
        /// Bytes the operation needs.
        need: u64,
        /// Bytes the pool has free.
        free: u64,
    },
    /// The object does not exist.
    #[error("{0} not found in the pool")]
    NotFound(String),
    /// A resize would shrink the object (data loss); pools only grow objects.
    #[error("cannot shrink {id} from {size} to {new_size} bytes")]
    Shrink {
        /// Object id.
        id: String,
        /// Current size.
        size: u64,
        /// Requested size.
        new_size: u64,
    },
}

impl PoolError {
    pub(crate) fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            // The file system filled up under us: report it as such, with what we know.
            return PoolError::NoSpace { need: 0, free: 0 };
        }
        PoolError::Io(context.into(), e)
    }
}

/// Sizes are multiples of this (the largest logical block size a front end may use).
pub const ALIGN_BYTES: u64 = 4096;

/// Longest object id.
pub const MAX_ID_LEN: usize = 128;

/// Check that `id` is safe to use as a file or LUN name: 1..=128 characters of
/// `[A-Za-z0-9._-]`, not starting with a dot (no hidden files, no `..`).
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PoolError::InvalidId(id.to_string()))
    }
}

/// Check a requested object size.
pub fn validate_size(size: u64) -> Result<()> {
    // i64::MAX: the largest length the kernel's file APIs take.
    if size == 0 || !size.is_multiple_of(ALIGN_BYTES) || size > i64::MAX as u64 {
        return Err(PoolError::InvalidSize(size));
    }
    Ok(())
}

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// The file system shares the blocks (copy on write); nothing was copied.
    Reflink,
    /// The data was copied through io_uring.
    Copy(CopyStats),
}

/// One object in a pool, as [`Pool::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolObject {
    /// The object id.
    pub id: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Bytes actually allocated.
    pub allocated: u64,
    /// Left behind by an interrupted create or clone: not usable, delete it.
    pub partial: bool,
}

/// Capacity figures of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Total bytes of the underlying storage.
    pub total_bytes: u64,
    /// Bytes free for new allocations.
    pub free_bytes: u64,
    /// Sum of the logical sizes of the objects.
    pub provisioned_bytes: u64,
}

/// A storage pool. Implementations are shared between threads.
pub trait Pool: Send + Sync + std::fmt::Debug {
    /// The pool's name (from the configuration).
    fn name(&self) -> &str;

    /// Allocate a zero-filled object of `size` bytes. Refused with
    /// [`PoolError::NoSpace`] before anything is allocated when the pool cannot hold it.
    fn create(&self, id: &str, size: u64) -> Result<BackendSpec>;

    /// Remove an object and any partial leftovers of it. Deleting a missing object is
    /// not an error (deletes are retried after crashes).
    fn delete(&self, id: &str) -> Result<()>;

    /// Make `dst` a copy of `src` (same size, same bytes) the fastest correct way.
    fn clone_from(&self, src: &str, dst: &str) -> Result<(BackendSpec, CloneMethod)>;

    /// Grow an object to `new_size` bytes (no-op when equal; shrinking is refused).
    fn resize(&self, id: &str, new_size: u64) -> Result<()>;

    /// Bytes available for new objects.
    fn free_bytes(&self) -> Result<u64>;

    /// Capacity figures.
    fn stats(&self) -> Result<PoolStats>;

    /// Every object, complete or partial (for start-up reconciliation).
    fn list(&self) -> Result<Vec<PoolObject>>;

    /// How to open an object.
    fn spec(&self, id: &str) -> Result<BackendSpec>;

    /// Size and allocation of one object.
    fn stat(&self, id: &str) -> Result<PoolObject>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_file_names() {
        for ok in ["a", "0f8e-11", "vol_1.snap", &"x".repeat(128)] {
            validate_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(validate_id(bad), Err(PoolError::InvalidId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_are_aligned_and_positive() {
        validate_size(4096).unwrap();
        validate_size(1 << 30).unwrap();
        for bad in [0, 512, 4097, u64::MAX] {
            assert!(matches!(validate_size(bad), Err(PoolError::InvalidSize(_))));
        }
    }
}
