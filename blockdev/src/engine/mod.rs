//! The io_uring engine: one [`Ring`] per I/O thread.
//!
//! Design (after cloud-hypervisor's `uring_data_io`):
//! - SQEs are pushed into the submission queue; nothing is sent to the kernel until the
//!   owner of the thread's event loop calls [`Ring::submit_and_wait`], so a batch of
//!   requests costs one `io_uring_enter`. A full submission queue is flushed to the
//!   kernel and the push retried; only if that fails too does a push fail, and the caller
//!   turns that into an `EAGAIN` completion through its normal completion path.
//! - `user_data` is a [`Tag`]: the owner id (16 bits), which the event loop routes each
//!   CQE by to the queue or connection that owns it, and the owner's own kind and
//!   [`Slots`](crate::slots::Slots) key of the operation.
//! - Memory an SQE points to must be owned by the pusher's in-flight table until the
//!   CQE is reaped; [`Ring::push`] is `unsafe` for that reason.

use crate::tag::Tag;
use io_uring::{squeue, IoUring};
use std::io;

/// Identifies who owns an SQE, so its CQE can be routed back.
pub type OwnerId = u16;

/// Default number of SQ entries per ring.
pub const DEFAULT_RING_ENTRIES: u32 = 1024;

/// A reaped completion-queue entry.
#[derive(Debug, Clone, Copy)]
pub struct Cqe {
    /// The `user_data` of the SQE (a [`Tag`], see [`Cqe::tag`]).
    pub user_data: u64,
    /// The syscall result: ≥ 0 on success, `-errno` on failure.
    pub result: i32,
    /// CQE flags (e.g. `IORING_CQE_F_MORE`).
    pub flags: u32,
}

impl Cqe {
    /// The decoded `user_data`.
    pub fn tag(&self) -> Tag {
        Tag::from_raw(self.user_data)
    }

    /// The owner the CQE belongs to.
    pub fn owner(&self) -> OwnerId {
        self.tag().route()
    }
}

/// One io_uring and the owners registered on it. Not shared between threads.
pub struct Ring {
    ring: IoUring,
    next_owner: OwnerId,
    free_owners: Vec<OwnerId>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("next_owner", &self.next_owner)
            .finish()
    }
}

impl Ring {
    /// A ring with `entries` SQ entries (the CQ gets twice as many).
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)?;
        Ok(Ring {
            ring,
            next_owner: 1,
            free_owners: Vec::new(),
        })
    }

    /// A ring for an event loop that lives on the calling thread and only ever waits in
    /// [`Ring::submit_and_wait`]: `SINGLE_ISSUER | DEFER_TASKRUN`, so the kernel's
    /// completion work (socket receives, mostly) runs in batches when the loop asks for
    /// it instead of interrupting the thread. Create it on the thread that uses it; do
    /// not poll its fd. Falls back to [`Ring::new`] on kernels without these flags.
    pub fn new_single_thread(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        match ring {
            Ok(ring) => Ok(Ring {
                ring,
                next_owner: 1,
                free_owners: Vec::new(),
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ring::new(entries),
            Err(e) => Err(e),
        }
    }

    /// Register a new owner id (never 0, which is reserved for the event loop itself).
    pub fn new_owner(&mut self) -> OwnerId {
        if let Some(id) = self.free_owners.pop() {
            return id;
        }
        let id = self.next_owner;
        self.next_owner = self.next_owner.wrapping_add(1).max(1);
        id
    }

    /// Give an owner id back once all its SQEs have completed.
    pub fn release_owner(&mut self, id: OwnerId) {
        if id != 0 {
            self.free_owners.push(id);
        }
    }

    /// Queue one SQE. If the SQ is full it is flushed to the kernel first.
    ///
    /// # Safety
    /// Every pointer in `entry` (buffers, iovecs, paths) must stay valid until the
    /// matching CQE has been reaped, and nothing else may access the memory written by
    /// the operation until then.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller guarantees the entry's pointers outlive the operation.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        self.ring.submit()?;
        // SAFETY: as above.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EAGAIN))
    }

    /// Submit queued SQEs and wait for at least `want` completions (0: don't wait).
    /// `EINTR` and `EBUSY` are not errors: the caller just reaps what is there.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        match self.ring.submit_and_wait(want) {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Submit queued SQEs without waiting.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.submit_and_wait(0)
    }

    /// Move every available CQE into `out`.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        for c in self.ring.completion() {
            out.push(Cqe {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            });
        }
    }

    /// Limit the calling thread's io-wq workers on this ring to `n` bounded and `n`
    /// unbounded ones (`IORING_REGISTER_IOWQ_MAX_WORKERS`, Linux ≥ 5.15).
    pub fn set_iowq_max_workers(&mut self, n: u32) -> io::Result<()> {
        self.ring.submitter().register_iowq_max_workers(&mut [n, n])
    }

    /// Number of SQEs queued and not yet submitted.
    pub fn pending(&mut self) -> usize {
        self.ring.submission().len()
    }
}

/// The ring's file descriptor: it polls readable while CQEs are waiting, so an event loop
/// can sleep in epoll on it together with other fds (vhost-user kick eventfds).
impl std::os::fd::AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::Key;
    use crate::tag::Kind;
    use io_uring::opcode;

    #[test]
    fn nop_round_trip_in_a_batch() {
        let mut ring = Ring::new(8).expect("io_uring available");
        let owner = ring.new_owner();
        for i in 0..20u32 {
            let key = Key::new(i, 0).expect("small");
            let e = opcode::Nop::new()
                .build()
                .user_data(Tag::new(owner, Kind::IO, key).raw());
            // SAFETY: a NOP references no memory.
            unsafe { ring.push(&e) }.expect("push");
        }
        let mut got = Vec::new();
        while got.len() < 20 {
            ring.submit_and_wait(1).expect("submit");
            ring.reap(&mut got);
        }
        let mut slots: Vec<u32> = got.iter().map(|c| c.tag().key().slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..20).collect::<Vec<_>>());
        assert!(got.iter().all(|c| c.owner() == owner && c.result == 0));
    }
}
