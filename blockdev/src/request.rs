//! Requests, completions and device geometry shared by every front end and backend.

use crate::buf::Buffer;

/// A block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes into the buffer.
    Read,
    /// Write the buffer. `fua`: durable before completion.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate the range (reads of it may then return anything the device chooses;
    /// Ember's file backend returns zeros).
    Discard,
    /// Make the range read as zeros. `unmap`: deallocating is allowed.
    WriteZeroes {
        /// Deallocation is allowed (NBD without NO_HOLE, virtio-blk unmap).
        unmap: bool,
    },
}

impl Op {
    /// True for ops that change data.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Discard | Op::WriteZeroes { .. }
        )
    }
}

/// One request to a [`Queue`](crate::Queue).
#[derive(Debug)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (for Read/Write, equal to the buffer's length).
    pub len: u64,
    /// Data buffer (Read/Write only).
    pub buf: Buffer,
    /// The submitter's tag, returned in the completion. Opaque to the device; ring
    /// owners put a [`Tag`](crate::tag::Tag) of their in-flight slot here.
    pub tag: u64,
}

/// The outcome of one [`Request`].
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// `Ok` or a positive errno.
    pub result: Result<(), i32>,
    /// The request's buffer, handed back (filled for reads).
    pub buf: Buffer,
}

impl Completion {
    /// Complete `req` with `result` without doing anything.
    pub fn of(req: Request, result: Result<(), i32>) -> Self {
        Completion {
            tag: req.tag,
            result,
            buf: req.buf,
        }
    }
}

/// Geometry and capabilities of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Smallest I/O unit the device accepts (offsets and lengths are multiples of it).
    pub logical_block_size: u32,
    /// Preferred I/O unit.
    pub physical_block_size: u32,
    /// Largest single read or write in bytes.
    pub max_transfer: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// Discard is supported.
    pub discard: bool,
    /// Write-zeroes is offloaded (no data transfer).
    pub write_zeroes: bool,
    /// Block status reports holes/zeros meaningfully.
    pub block_status: bool,
}

impl DeviceInfo {
    /// A writable device of `size` bytes with 512-byte logical and 4 KiB physical
    /// blocks, single transfers of up to `max_transfer` bytes, and every optional
    /// operation (discard, offloaded write-zeroes, meaningful block status): what the
    /// null device reports, and the device the unit tests and fuzz targets decode against.
    pub fn new(size: u64, max_transfer: u32) -> Self {
        DeviceInfo {
            size,
            logical_block_size: 512,
            physical_block_size: 4096,
            max_transfer,
            read_only: false,
            discard: true,
            write_zeroes: true,
            block_status: true,
        }
    }

    /// Check a request before it is started: flushes always pass, data-changing ops on a
    /// read-only device get `EPERM`, everything else must pass [`check_range`](Self::check_range).
    pub fn check_request(&self, op: Op, offset: u64, len: u64) -> Result<(), i32> {
        if op == Op::Flush {
            Ok(())
        } else if op.is_write() && self.read_only {
            Err(libc::EPERM)
        } else {
            self.check_range(offset, len)
        }
    }

    /// Check that `[offset, offset+len)` is inside the device and aligned to the
    /// logical block size. Returns `EINVAL` otherwise.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), i32> {
        let lbs = u64::from(self.logical_block_size.max(1));
        let end = offset.checked_add(len).ok_or(libc::EINVAL)?;
        if end > self.size || !offset.is_multiple_of(lbs) || !len.is_multiple_of(lbs) {
            return Err(libc::EINVAL);
        }
        Ok(())
    }
}

/// One extent of an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Not allocated (a hole).
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

impl Extent {
    /// The map of a device that keeps no allocation map: `[offset, offset+len)`, clipped
    /// to `size`, is all data. A request that starts at or past the end, or is empty,
    /// is out of bounds.
    pub fn all_data(size: u64, offset: u64, len: u64) -> crate::Result<Vec<Extent>> {
        if offset >= size || len == 0 {
            return Err(crate::Error::new(
                crate::ErrorKind::OutOfBounds,
                "block status past the end",
            ));
        }
        Ok(vec![Extent {
            len: len.min(size - offset),
            hole: false,
            zero: false,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        let i = DeviceInfo::new(1 << 20, 1 << 20);
        assert_eq!(i.check_range(0, 512), Ok(()));
        assert_eq!(i.check_range((1 << 20) - 512, 512), Ok(()));
        assert_eq!(i.check_range(1 << 20, 512), Err(libc::EINVAL));
        assert_eq!(i.check_range(1, 512), Err(libc::EINVAL));
        assert_eq!(i.check_range(0, 100), Err(libc::EINVAL));
        assert_eq!(i.check_range(u64::MAX - 10, 512), Err(libc::EINVAL));
    }
}
