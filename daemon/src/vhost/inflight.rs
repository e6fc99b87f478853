//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), split virtqueues.
//!
//! The frontend asks us for a shared memory area (`GET_INFLIGHT_FD`), keeps its fd, and
//! hands it back after a reconnect (`SET_INFLIGHT_FD`). Because the memory outlives our
//! process, a backend that was SIGKILLed can tell, after restart, which requests it had
//! taken from the avail ring and not yet put in the used ring, and resubmit them.
//!
//! Layout per queue (the vhost-user spec's "split virtqueue inflight region", the same as
//! libvhost-user so any frontend that keeps the region opaque works):
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc[desc_num] { u8 inflight; u8 pad[5]; u16 next; u64 counter }     (16 bytes each)
//! ```
//! Each queue's region is rounded up to 64 bytes.
//!
//! Protocol on our side: when a chain is popped, `desc[head].counter = n++` then
//! `inflight = 1`. To complete: `last_batch_head = head`, put it in the used ring
//! (which bumps the guest-visible `used->idx`), then `inflight = 0`, then `used_idx =
//! used->idx`. After a restart, if `used_idx != used->idx`, we died between those steps,
//! so `last_batch_head` was in fact completed. Every other descriptor with `inflight = 1`
//! is resubmitted, oldest counter first, and the next avail index is `used->idx + number
//! of inflight descriptors`. The restarted queue then notifies the guest once (see
//! [`super::worker`]): the dead process may have used chains without telling it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// A shared mapping of the inflight area.
#[derive(Debug)]
pub struct InflightArea {
    ptr: *mut u8,
    len: usize,
    queue_size: u16,
    num_queues: u16,
    file: File,
}

// SAFETY: the mapping is plain shared memory; all accesses go through atomics on
// naturally aligned fields (see `QueueInflight`), so sharing across threads is sound.
unsafe impl Send for InflightArea {}
// SAFETY: as above.
unsafe impl Sync for InflightArea {}

impl InflightArea {
    /// A new zeroed area (a memfd) for `num_queues` queues of `queue_size` entries.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<Self> {
        let len = queue_region_size(queue_size) * usize::from(num_queues);
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"ember-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        Self::map(file, 0, len, num_queues, queue_size)
    }

    /// Map an area the frontend handed back: `len` bytes (its `mmap_size`) at `offset`
    /// of `file`. Only the bytes the layout needs are mapped, and only after checking
    /// (`fstat`) that the file is a regular file (a memfd) that holds them: touching a
    /// shared mapping beyond the end of its file raises SIGBUS, which would kill the
    /// whole daemon, not just this frontend.
    pub fn map(
        file: File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        let need = queue_region_size(queue_size) * usize::from(num_queues);
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if num_queues == 0 || queue_size == 0 || len < need {
            return Err(invalid(format!(
                "inflight area of {len} bytes too small for {num_queues} queues of {queue_size}"
            )));
        }
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(invalid(
                "inflight fd is not a regular file or memfd".to_string(),
            ));
        }
        let end = offset
            .checked_add(need as u64)
            .ok_or_else(|| invalid("inflight offset overflows".to_string()))?;
        if end > meta.len() {
            return Err(invalid(format!(
                "inflight area needs {need} bytes at offset {offset} but its file holds {}",
                meta.len()
            )));
        }
        let off =
            libc::off_t::try_from(offset).map_err(|_| invalid("inflight offset".to_string()))?;
        // SAFETY: mapping a file we hold, shared, with a non-zero length the file was
        // just checked to hold; the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                need,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightArea {
            ptr: ptr.cast(),
            len: need,
            queue_size,
            num_queues,
            file,
        })
    }

    /// The memfd (to send to the frontend).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Mapped length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never, for an area that was created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region of queue `q`.
    pub fn queue(self: &Arc<Self>, q: u16) -> Option<QueueInflight> {
        if q >= self.num_queues {
            return None;
        }
        let off = queue_region_size(self.queue_size) * usize::from(q);
        Some(QueueInflight {
            _area: self.clone(),
            // SAFETY: off + region size ≤ len (the mapped length is exactly what the
            // layout needs, see `map`).
            base: unsafe { self.ptr.add(off) },
            capacity: self.queue_size,
        })
    }
}

impl Drop for InflightArea {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap; no QueueInflight outlives the Arc.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's inflight region.
#[derive(Debug, Clone)]
pub struct QueueInflight {
    /// Keeps the mapping `base` points into alive.
    _area: Arc<InflightArea>,
    base: *mut u8,
    capacity: u16,
}

// SAFETY: see InflightArea: atomics only, and the Arc keeps the mapping alive.
unsafe impl Send for QueueInflight {}

/// What a restarted queue must do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// The avail index to continue from (`used->idx + inflight count`).
    pub next_avail: u16,
    /// The next pop counter.
    pub next_counter: u64,
}

impl QueueInflight {
    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: off is one of the header offsets (8..16, even) inside the region, which
        // is 64-byte aligned and mapped for the Arc's lifetime (≥ &self).
        unsafe { AtomicU16::from_ptr(self.base.add(off).cast()) }
    }

    fn flag(&self, head: u16) -> &AtomicU8 {
        // SAFETY: head < capacity (callers check), so the byte is inside the region.
        unsafe { AtomicU8::from_ptr(self.base.add(HEADER_LEN + DESC_LEN * usize::from(head))) }
    }

    fn counter(&self, head: u16) -> &AtomicU64 {
        // SAFETY: as `flag`; offset 8 of a 16-byte entry at a 16-byte-aligned address.
        unsafe {
            AtomicU64::from_ptr(
                self.base
                    .add(HEADER_LEN + DESC_LEN * usize::from(head) + 8)
                    .cast(),
            )
        }
    }

    /// Start a queue of `size` entries whose guest-visible used index is `used_idx`.
    /// A fresh region is initialised; a used one yields what to resubmit: only heads
    /// below `size` (the frontend can write the region, so `desc_num` is not trusted),
    /// hence at most `size` of them.
    pub fn recover(&self, size: u16, used_idx: u16) -> Recovery {
        let version = self.u16_at(8);
        let desc_num = self.u16_at(10);
        let last_batch_head = self.u16_at(12);
        let region_used = self.u16_at(14);
        if version.load(Ordering::Acquire) != VERSION {
            for h in 0..self.capacity {
                self.flag(h).store(0, Ordering::Relaxed);
                self.counter(h).store(0, Ordering::Relaxed);
            }
            desc_num.store(size.min(self.capacity), Ordering::Relaxed);
            last_batch_head.store(0, Ordering::Relaxed);
            region_used.store(used_idx, Ordering::Relaxed);
            version.store(VERSION, Ordering::Release);
            return Recovery {
                resubmit: Vec::new(),
                next_avail: used_idx,
                next_counter: 1,
            };
        }
        let n = desc_num
            .load(Ordering::Acquire)
            .min(self.capacity)
            .min(size);
        if region_used.load(Ordering::Acquire) != used_idx {
            // Died after putting last_batch_head in the used ring, before clearing it.
            let h = last_batch_head.load(Ordering::Acquire);
            if h < n {
                self.flag(h).store(0, Ordering::Release);
            }
            region_used.store(used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..n)
            .filter(|&h| self.flag(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter(h).load(Ordering::Acquire), h))
            .collect();
        pending.sort_unstable();
        let next_counter = pending.last().map_or(1, |&(c, _)| c + 1);
        desc_num.store(size.min(self.capacity), Ordering::Release);
        Recovery {
            next_avail: used_idx.wrapping_add(pending.len() as u16),
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }

    /// The heads marked in flight among the first `size`, with their counters (for
    /// diagnostics).
    pub fn pending(&self, size: u16) -> Vec<(u16, u64)> {
        (0..size.min(self.capacity))
            .filter(|&h| self.flag(h).load(Ordering::Acquire) == 1)
            .map(|h| (h, self.counter(h).load(Ordering::Acquire)))
            .collect()
    }

    /// A chain with `head` was taken from the avail ring.
    pub fn popped(&self, head: u16, counter: u64) {
        if head >= self.capacity {
            return;
        }
        self.counter(head).store(counter, Ordering::Relaxed);
        fence(Ordering::Release);
        self.flag(head).store(1, Ordering::Release);
    }

    /// About to put `head` in the used ring.
    pub fn pre_put(&self, head: u16) {
        self.u16_at(12).store(head, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// `head` is in the used ring, whose index is now `used_idx`.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.capacity {
            self.flag(head).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.u16_at(14).store(used_idx, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_aligned() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
    }

    #[test]
    fn crash_and_recover() {
        let area = Arc::new(InflightArea::create(2, 8).unwrap());
        let q = area.queue(1).unwrap();
        assert_eq!(q.recover(8, 5).next_avail, 5);
        // Pop heads 3, 1, 6; complete 1 fully; die in the middle of completing 6.
        q.popped(3, 1);
        q.popped(1, 2);
        q.popped(6, 3);
        q.pre_put(1);
        q.post_put(1, 6);
        q.pre_put(6); // used->idx becomes 7 in the guest, then we die.
                      // Re-map the same memfd as a restarted process would.
        let f = area.file().try_clone().unwrap();
        let again = Arc::new(InflightArea::map(f, 0, area.len(), 2, 8).unwrap());
        let r = again.queue(1).unwrap().recover(8, 7);
        assert_eq!(r.resubmit, vec![3]);
        assert_eq!(r.next_avail, 8);
        assert_eq!(r.next_counter, 2);
        // Queue 0 was never used: fresh.
        assert_eq!(
            again.queue(0).unwrap().recover(8, 0),
            Recovery {
                resubmit: vec![],
                next_avail: 0,
                next_counter: 1
            }
        );
        assert!(again.queue(2).is_none());
        assert!(InflightArea::map(area.file().try_clone().unwrap(), 0, 64, 2, 8).is_err());
    }

    fn memfd(len: u64) -> File {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// Item 3 of issue 11: a memfd shorter than the area it is declared to hold was
    /// mapped, and the first access raised SIGBUS in the whole daemon.
    #[test]
    fn a_file_shorter_than_the_area_is_refused() {
        let need = queue_region_size(8) * 2;
        for (len, offset) in [(0u64, 0u64), (need as u64 - 1, 0), (need as u64, 4096)] {
            let e = InflightArea::map(memfd(len), offset, need, 2, 8).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        }
        let e = InflightArea::map(memfd(8192), u64::MAX - 10, need, 2, 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Not a regular file.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = File::from(std::os::fd::OwnedFd::from(a));
        assert!(InflightArea::map(f, 0, need, 2, 8).is_err());
        // A declared size far beyond the layout maps only what the layout needs.
        let area = InflightArea::map(memfd(need as u64), 0, 1 << 40, 2, 8).unwrap();
        assert_eq!(area.len(), need);
        assert_eq!(Arc::new(area).queue(1).unwrap().recover(8, 0).next_avail, 0);
    }

    /// A region written by the frontend cannot make us resubmit heads beyond the queue.
    #[test]
    fn recovery_is_bounded_by_the_queue_size() {
        let area = Arc::new(InflightArea::create(1, 64).unwrap());
        let q = area.queue(0).unwrap();
        q.recover(64, 0);
        for h in 0..64 {
            q.popped(h, u64::from(h) + 1);
        }
        // Restarted with a queue of 8: only heads 0..8 are candidates.
        let r = q.recover(8, 0);
        assert_eq!(r.resubmit, (0..8).collect::<Vec<u16>>());
        assert_eq!(r.next_avail, 8);
    }
}
