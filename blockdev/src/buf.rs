//! I/O buffers.
//!
//! - [`IoBuf`]: an owned, 4096-byte-aligned allocation (good for O_DIRECT), moved into a
//!   request and handed back in its completion.
//! - [`IoVecs`]: borrowed memory (guest RAM for vhost-user zero copy) described by raw
//!   iovecs. Building one is `unsafe`: the builder promises the memory stays valid and
//!   unaliased until the request completes.
//! - [`BufPool`]: a per-thread free list so the hot path does not allocate.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`]: enough for O_DIRECT on any logical block size.
pub const IO_ALIGN_BYTES: usize = 4096;

/// An owned, aligned, zero-initialised byte buffer with a length ≤ its capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); no other handle exists.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads through `as_slice`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zeroed buffer of `len` bytes (capacity rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).div_ceil(IO_ALIGN_BYTES) * IO_ALIGN_BYTES;
        let Ok(layout) = Layout::from_size_align(cap, IO_ALIGN_BYTES) else {
            // Only reachable for absurd sizes (> isize::MAX); treat as allocation failure.
            alloc::handle_alloc_error(Layout::new::<u8>());
        };
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        IoBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = IoBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (a multiple of [`IO_ALIGN_BYTES`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Set the length, at most the capacity. New bytes keep whatever the buffer held.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.cap);
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap ≥ len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for an SQE. The caller keeps `self` alive until the CQE.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.cap, IO_ALIGN_BYTES) {
            // SAFETY: allocated in `new` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

/// Borrowed memory described by iovecs (e.g. guest RAM). See [`IoVecs::new`].
#[derive(Debug)]
pub struct IoVecs {
    iovs: Vec<libc::iovec>,
    len: usize,
}

// SAFETY: the creator of IoVecs guarantees (see `new`) that the memory is valid and not
// accessed by anyone else until the request completes, whichever thread completes it.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Describe memory by iovecs.
    ///
    /// # Safety
    /// Every iovec must point to memory that is valid for reads and writes of its length,
    /// and stays so (not unmapped, not otherwise accessed) until the request that carries
    /// this `IoVecs` has completed and the `IoVecs` was dropped or taken back.
    pub unsafe fn new(iovs: Vec<libc::iovec>) -> Self {
        let len = iovs.iter().map(|v| v.iov_len).sum();
        IoVecs { iovs, len }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The iovecs, for an SQE.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovs
    }

    /// Copy all bytes out into `dst` (which must be `len()` long).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut off = 0;
        for v in &self.iovs {
            let n = v.iov_len.min(dst.len() - off);
            // SAFETY: the constructor's contract makes each iovec valid for reads.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, n) };
            dst[off..off + n].copy_from_slice(src);
            off += n;
        }
    }

    /// Copy `src` (at most `len()` bytes) into the memory.
    pub fn copy_from(&mut self, src: &[u8]) {
        let mut off = 0;
        for v in &self.iovs {
            if off >= src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - off);
            // SAFETY: the constructor's contract makes each iovec valid for writes, and
            // &mut self means no other Rust reference into it exists.
            let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), n) };
            dst.copy_from_slice(&src[off..off + n]);
            off += n;
        }
    }

    /// The iovecs covering `[offset, offset+len)` of the memory (clamped to its end),
    /// appended to `out`: for a vectored send of part of a buffer.
    pub fn sub_iovecs(&self, offset: usize, len: usize, out: &mut Vec<libc::iovec>) {
        let mut skip = offset;
        let mut left = len;
        for v in &self.iovs {
            if left == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(left);
            out.push(libc::iovec {
                iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
                iov_len: n,
            });
            left -= n;
            skip = 0;
        }
    }

    /// Apply `f` to the contiguous pieces of `[offset, offset+len)` (clamped to the end).
    pub fn for_each_in(&self, offset: usize, len: usize, mut f: impl FnMut(&[u8])) {
        let mut iovs = Vec::new();
        self.sub_iovecs(offset, len, &mut iovs);
        for v in iovs {
            // SAFETY: `v` lies inside one of this IoVecs' iovecs, which the constructor's
            // contract makes valid for reads while `self` lives.
            f(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
    }

    /// Copy `src` into the memory starting at `offset` (clamped to the end).
    pub fn copy_from_at(&mut self, offset: usize, src: &[u8]) {
        let mut iovs = Vec::new();
        self.sub_iovecs(offset, src.len(), &mut iovs);
        let mut done = 0;
        for v in iovs {
            // SAFETY: `v` lies inside one of this IoVecs' iovecs, valid for writes by the
            // constructor's contract; &mut self means no other Rust reference into it.
            let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
            dst.copy_from_slice(&src[done..done + v.iov_len]);
            done += v.iov_len;
        }
    }

    /// Apply `f` to each contiguous piece of the memory, in order.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut [u8])) {
        for v in &self.iovs {
            // SAFETY: as in `copy_from`.
            let s = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
            f(s);
        }
    }
}

/// The data buffer of a request.
#[derive(Debug, Default)]
pub enum Buffer {
    /// No data (flush, discard, write-zeroes).
    #[default]
    None,
    /// An owned buffer.
    Owned(IoBuf),
    /// Borrowed memory (zero copy).
    Borrowed(IoVecs),
}

impl Buffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Buffer::None => 0,
            Buffer::Owned(b) => b.len(),
            Buffer::Borrowed(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take the owned buffer out, if any.
    pub fn into_owned(self) -> Option<IoBuf> {
        match self {
            Buffer::Owned(b) => Some(b),
            _ => None,
        }
    }
}

/// A per-thread free list of [`IoBuf`]s by power-of-two capacity class.
#[derive(Debug, Default)]
pub struct BufPool {
    classes: Vec<Vec<IoBuf>>,
}

/// Buffers kept per class at most; more are freed.
const POOL_MAX_PER_CLASS: usize = 256;

impl BufPool {
    /// An empty pool.
    pub fn new() -> Self {
        BufPool {
            classes: Vec::new(),
        }
    }

    fn class(cap: usize) -> usize {
        cap.max(IO_ALIGN_BYTES).next_power_of_two().trailing_zeros() as usize
    }

    /// A buffer of `len` bytes (contents unspecified: the caller overwrites them).
    pub fn get(&mut self, len: usize) -> IoBuf {
        let c = Self::class(len);
        if let Some(mut b) = self.classes.get_mut(c).and_then(|v| v.pop()) {
            b.set_len(len);
            return b;
        }
        let cap = 1usize << c;
        let mut b = IoBuf::new(cap);
        b.set_len(len);
        b
    }

    /// Give a buffer back.
    pub fn put(&mut self, b: IoBuf) {
        let cap = b.capacity();
        if !cap.is_power_of_two() {
            return;
        }
        let c = Self::class(cap);
        if self.classes.len() <= c {
            self.classes.resize_with(c + 1, Vec::new);
        }
        if self.classes[c].len() < POOL_MAX_PER_CLASS {
            self.classes[c].push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iobuf_is_aligned_and_zeroed() {
        let b = IoBuf::new(1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.capacity(), 4096);
        assert_eq!(b.ptr.as_ptr() as usize % IO_ALIGN_BYTES, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn pool_reuses_buffers() {
        let mut p = BufPool::new();
        let b = p.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        let addr = b.ptr.as_ptr() as usize;
        p.put(b);
        let b2 = p.get(8000);
        assert_eq!(b2.ptr.as_ptr() as usize, addr);
    }

    #[test]
    fn iovecs_copy_roundtrip() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let iovs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 3,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 5,
            },
        ];
        // SAFETY: a and b outlive v and are not touched while v is alive.
        let mut v = unsafe { IoVecs::new(iovs) };
        v.copy_from(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut out = [0u8; 8];
        v.copy_to(&mut out);
        let mut mid = Vec::new();
        v.for_each_in(2, 3, |p| mid.extend_from_slice(p));
        assert_eq!(mid, [3, 4, 5]);
        v.copy_from_at(2, &[9, 9, 9]);
        let mut sub = Vec::new();
        v.sub_iovecs(7, 100, &mut sub);
        assert_eq!(sub.len(), 1);
        assert_eq!(sub[0].iov_len, 1);
        drop(v);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a, [1, 2, 9]);
        assert_eq!(b, [9, 9, 6, 7, 8]);
    }
}
