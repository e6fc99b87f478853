//! # ember-blockdev: Ember's block layer
//!
//! Every byte Ember serves goes through this crate. Front ends (NBD, vhost-user-blk) turn wire
//! requests into [`Request`]s and submit them to a per-thread [`Queue`] of a [`BlockDevice`];
//! the queue turns them into io_uring SQEs on the thread's [`Ring`], and completions come
//! back as [`Completion`]s carrying the caller's tag.
//!
//! ```text
//!   front end (nbd / vhost)         one I/O thread
//!   ──────────────────────────────────────────────────────────────
//!   Request{op,offset,len,buf,tag} ─▶ Queue::submit ─▶ Ring (SQEs, one io_uring_enter per batch)
//!                                                      │
//!   Completion{tag,result,buf}     ◀─ Queue::complete ◀─┘ CQE routed by owner id
//!   stack:  throttle → crypt → gate → backend (file | null | iscsi)
//! ```
//!
//! ## Threading model
//! A [`BlockDevice`] is shared (`Send + Sync`) by all threads that serve it. Each I/O thread
//! owns one [`Ring`] and asks the device for its own [`Queue`]; queues are never shared, so
//! the I/O path takes no lock. A CQE is routed to its queue by the owner id packed in the
//! top 16 bits of its `user_data` (a [`Tag`]).
//!
//! ## In-flight state
//! Every ring owner (backend queue, layer, front-end connection or worker) keeps what an
//! operation needs until its completion in one [`Slots`] table and sends the operation's
//! [`Key`] along, packed with its owner and kind in a [`Tag`] (the `user_data` of an SQE,
//! or the tag of a [`Request`]). A completion for a freed or reused slot finds nothing.
//!
//! ## Unsafe
//! Plain syscalls and ioctls go through the safe wrappers of [`sys`]. The `unsafe` left
//! elsewhere is what depends on memory outliving a call: [`engine`] (pushing SQEs; its
//! callers are the ring owners, the backends' queues and the layers' timers), [`buf`]
//! (aligned allocations, borrowed iovecs), the crypt layer's helper thread
//! (`layer/crypt/split.rs`), inline reads and writes into borrowed iovecs
//! (`backend/file.rs`) and the CRC32C kernel; and plain syscalls not moved to [`sys`] yet
//! (the iSCSI queue's socket calls, the pool's `statvfs` and `FICLONE`). The rule is
//! CH's: every buffer or iovec an SQE points to is owned by the in-flight slot of the
//! queue that pushed it, from before the push until its CQE is reaped.
//!
//! ## Modules
//! - [`buf`]: aligned owned buffers, borrowed iovec lists, a per-thread pool.
//! - [`request`]: [`Request`], [`Op`], [`Completion`], [`DeviceInfo`], [`Extent`].
//! - [`engine`]: the io_uring [`Ring`] wrapper.
//! - [`slots`]: [`Slots`], the bounded, generation-checked in-flight table.
//! - [`tag`]: [`Tag`], the packing of a `user_data` or request tag.
//! - [`sys`]: safe wrappers over plain syscalls and ioctls (used by the daemon too).
//! - [`backend`]: `file` (regular files, host block devices), `iscsi` (Ember's own
//!   initiator) and `null`; [`open`] is the factory; `scsi` holds the SCSI they share.
//! - [`sync`]: [`SyncDevice`], a blocking driver for tools, the control plane and tests.
//! - [`layer`]: stacking layers (crypt, throttle, gate) that wrap another device.
//! - [`stack`]: the one builder of a volume's stack (backend → gate → crypt → throttle)
//!   and of LUKS header access.
//! - [`pool`]: storage pools (a directory of files) that allocate, clone and grow volumes.

#![deny(missing_docs)]

pub mod backend;
pub mod buf;
pub mod engine;
pub mod error;
pub mod layer;
pub mod pool;
pub mod request;
pub mod slots;
pub mod stack;
pub mod sync;
pub mod sys;
pub mod tag;

pub use backend::{open, BackendSpec, OpenOptions};
pub use buf::{Buffer, IoBuf, IoVecs};
pub use engine::{Cqe, OwnerId, Ring};
pub use error::{Error, ErrorKind, Result};
pub use request::{Completion, DeviceInfo, Extent, Op, Request};
pub use slots::{Key, Slots};
pub use sync::SyncDevice;
pub use tag::{Kind, Tag};

use std::sync::Arc;

/// A block device: one per volume, shared by every thread that serves it.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Current geometry and capabilities. The size can change ([`BlockDevice::resize`]).
    fn info(&self) -> DeviceInfo;

    /// Open a per-thread queue whose SQEs go on `ring`. The queue registers itself as an
    /// owner on the ring and only handles CQEs of that owner.
    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>>;

    /// Allocation map of `[offset, offset+len)`: extents in order, covering at least one
    /// byte and at most the requested range. Synchronous (SEEK_DATA/SEEK_HOLE is cheap).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Grow (or shrink) the device. Front ends learn the new size through [`info`](Self::info).
    fn resize(&self, new_size: u64) -> Result<()>;

    /// The identity of the LUN behind the device (VPD 0x83 designators, serial), for
    /// devices that are LUNs: host block devices with SCSI pages, iSCSI LUNs.
    fn identity(&self) -> Option<backend::scsi::LunIdentity> {
        None
    }

    /// The fault the device's I/O path saw last and that still holds, if any (an iSCSI
    /// LUN gone from its target, no session within the replacement timeout). No I/O;
    /// cleared by the device itself once it serves again.
    fn fault(&self) -> Option<String> {
        None
    }

    /// Check actively that the device can still serve (a LUN: a short iSCSI session, or
    /// a read of a host device's first block), for the data plane's periodic health
    /// check of idle volumes. Blocks, bounded by the device's own timeouts. An error is
    /// a fault the operator must see; a failure the device rides out by itself (an
    /// iSCSI portal that does not answer for less than the replacement timeout) is not.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// A per-thread handle on a [`BlockDevice`]. Not shared; lives on one I/O thread.
///
/// Contract: every request given to [`submit`](Queue::submit) produces exactly one
/// [`Completion`] with the request's tag, either synchronously (pushed to `done` by
/// `submit`) or later from [`complete`](Queue::complete). A full ring, an error from the
/// kernel, a bad range: all are completions, never panics or lost requests.
///
/// A queue may be dropped once [`in_flight`](Queue::in_flight) is 0. It may then leave
/// SQEs in the ring that point to no memory of its own (the iSCSI queue's socket polls,
/// a timeout on a `static` timespec); their CQEs still carry its owner id, which the
/// ring may have handed to a new queue, so a queue ignores CQEs whose slot it does not
/// recognise, and an event loop ignores CQEs of owners it no longer knows.
pub trait Queue {
    /// The ring owner id this queue's SQEs carry.
    fn owner(&self) -> OwnerId;

    /// Start `req`. Synchronous completions are pushed to `done`.
    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>);

    /// Handle one CQE whose owner is [`owner`](Queue::owner).
    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>);

    /// Number of requests submitted and not yet completed.
    fn in_flight(&self) -> usize;
}

/// Helpers of this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use crate::backend::{open, BackendSpec, OpenOptions};
    use crate::BlockDevice;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// A file `name` in `dir` holding `bytes`, opened with the file backend.
    pub fn file_device(
        dir: &tempfile::TempDir,
        name: &str,
        bytes: &[u8],
        read_only: bool,
    ) -> (PathBuf, Arc<dyn BlockDevice>) {
        let path = dir.path().join(name);
        if !path.exists() {
            std::fs::write(&path, bytes).unwrap();
        }
        let opts = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        let dev = open(&BackendSpec::File { path: path.clone() }, &opts).unwrap();
        (path, dev)
    }
}
