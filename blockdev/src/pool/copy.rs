//! A pipelined, sparse-aware copy between two devices over one io_uring.
//!
//! The source's allocation map ([`BlockDevice::block_status`]) is walked lazily: holes are
//! skipped (or turned into write-zeroes when the destination is not known to be zero
//! already), data extents are cut into chunks. Up to [`CopyOptions::depth`] chunks are in
//! flight at once; each chunk is a read from the source whose buffer, once filled, becomes
//! the write to the destination, so no byte is copied in user space. A chunk that reads
//! as all zeros is not written to a zeroed destination, which keeps clones of
//! preallocated-but-empty files sparse. The destination is flushed at the end.
//!
//! Both devices get a queue on the same private ring; CQEs are routed by owner id.

use crate::buf::{Buffer, IoBuf};
use crate::engine::{Cqe, Ring};
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, Op, Request};
use crate::{BlockDevice, Queue};
use std::collections::VecDeque;
use std::sync::Arc;

/// Default size of one copy chunk.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default number of chunks in flight.
pub const DEFAULT_DEPTH: usize = 8;

/// Tuning of [`copy_device`].
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    /// Bytes per request (rounded down to the block size and the devices' max transfer).
    pub chunk_bytes: usize,
    /// Chunks in flight.
    pub depth: usize,
    /// The destination already reads as zeros (a fresh sparse file): holes and all-zero
    /// chunks are not written at all.
    pub dst_zeroed: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            depth: DEFAULT_DEPTH,
            dst_zeroed: false,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
    /// Bytes not transferred: holes, and all-zero chunks on a zeroed destination.
    pub bytes_skipped: u64,
}

/// One unit of work.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    Data { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// Walks the source's allocation map and yields aligned chunks in order.
struct Planner {
    len: u64,
    block: u64,
    chunk: u64,
    /// Everything below `pos` has been planned.
    pos: u64,
    /// Where the next block-status query starts (unaligned extent ends).
    scan: u64,
    /// Aligned ranges not yet cut into chunks: (start, end, data?).
    ranges: VecDeque<(u64, u64, bool)>,
}

fn round_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a)
}

impl Planner {
    fn next(&mut self, src: &dyn BlockDevice) -> Option<Chunk> {
        loop {
            if let Some((start, end, data)) = self.ranges.front_mut() {
                let data = *data;
                let len = (*end - *start).min(if data { self.chunk } else { u64::MAX });
                let offset = *start;
                *start += len;
                if *start >= *end {
                    self.ranges.pop_front();
                }
                return Some(if data {
                    Chunk::Data { offset, len }
                } else {
                    Chunk::Zero { offset, len }
                });
            }
            if self.pos >= self.len {
                return None;
            }
            self.refill(src);
        }
    }

    fn refill(&mut self, src: &dyn BlockDevice) {
        let extents = if self.scan < self.len {
            src.block_status(self.scan, self.len - self.scan)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if extents.is_empty() {
            // No map (or an error getting it): copy the rest as data.
            self.push(self.pos, self.len, true);
            self.scan = self.len;
            return;
        }
        for e in extents {
            let b = self.scan.saturating_add(e.len).min(self.len);
            self.scan = b;
            if e.hole || e.zero {
                // Round inward: partial blocks at the edges belong to the data around.
                let end = round_down(b, self.block);
                self.push(self.pos, end, false);
            } else {
                let end = round_up(b, self.block).min(self.len);
                self.push(self.pos, end, true);
            }
            if self.scan >= self.len {
                break;
            }
        }
    }

    fn push(&mut self, start: u64, end: u64, data: bool) {
        let start = start.max(self.pos);
        if end <= start {
            return;
        }
        match self.ranges.back_mut() {
            Some((_, e, d)) if *d == data && *e == start => *e = end,
            _ => self.ranges.push_back((start, end, data)),
        }
        self.pos = end;
    }
}

/// True when every byte is zero.
fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let all = words
        .by_ref()
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0);
    all && words.remainder().iter().all(|&x| x == 0)
}

fn completion_error(c: &Completion, what: &str) -> Option<Error> {
    c.result.err().map(|errno| {
        Error::io(
            format!("{what} at {}", c.tag),
            std::io::Error::from_raw_os_error(errno),
        )
    })
}

/// Copy the first `len` bytes of `src` to `dst`. See the module docs.
pub fn copy_device(
    src: &Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    len: u64,
    opts: &CopyOptions,
) -> Result<CopyStats> {
    let (si, di) = (src.info(), dst.info());
    let block = u64::from(si.logical_block_size.max(di.logical_block_size).max(1));
    if len > si.size || len > di.size || !len.is_multiple_of(block) {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!(
                "copy of {len} bytes: source has {}, destination {}, block size {block}",
                si.size, di.size
            ),
        ));
    }
    if di.read_only {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            "copy to a read-only device",
        ));
    }
    let max_transfer = u64::from(si.max_transfer.min(di.max_transfer)).max(block);
    let chunk = round_down((opts.chunk_bytes as u64).min(max_transfer), block).max(block);
    let depth = opts.depth.clamp(1, 256);
    let mut ring = Ring::new(128).map_err(|e| Error::io("io_uring setup", e))?;
    let mut qs = src.clone().queue(&mut ring)?;
    let mut qd = dst.clone().queue(&mut ring)?;
    let mut planner = Planner {
        len,
        block,
        chunk,
        pos: 0,
        scan: 0,
        ranges: VecDeque::new(),
    };
    let mut stats = CopyStats::default();
    let mut spare: Vec<IoBuf> = Vec::new();
    let mut done_s: Vec<Completion> = Vec::new();
    let mut done_d: Vec<Completion> = Vec::new();
    let mut cqes: Vec<Cqe> = Vec::new();
    let mut in_flight = 0usize;
    let mut failure: Option<Error> = None;
    let mut exhausted = false;

    loop {
        // Start new chunks while there is room and nothing has failed.
        while failure.is_none() && !exhausted && in_flight < depth {
            match planner.next(src.as_ref()) {
                None => exhausted = true,
                Some(Chunk::Zero { offset, len }) => {
                    stats.bytes_skipped += len;
                    if !opts.dst_zeroed {
                        in_flight += 1;
                        let req = Request {
                            op: Op::WriteZeroes { unmap: true },
                            offset,
                            len,
                            buf: Buffer::None,
                            tag: offset,
                        };
                        qd.submit(&mut ring, req, &mut done_d);
                    }
                }
                Some(Chunk::Data { offset, len }) => {
                    in_flight += 1;
                    let mut buf = spare.pop().unwrap_or_else(|| IoBuf::new(chunk as usize));
                    // `len` ≤ chunk = the buffers' length, so this only shortens.
                    buf.set_len(len as usize);
                    let req = Request {
                        op: Op::Read,
                        offset,
                        len,
                        buf: Buffer::Owned(buf),
                        tag: offset,
                    };
                    qs.submit(&mut ring, req, &mut done_s);
                }
            }
        }
        // Handle completions (synchronous ones first, then reaped CQEs).
        while !done_s.is_empty() || !done_d.is_empty() {
            for c in std::mem::take(&mut done_s) {
                if let Some(e) = completion_error(&c, "read") {
                    failure.get_or_insert(e);
                    in_flight -= 1;
                    continue;
                }
                let Some(buf) = c.buf.into_owned() else {
                    failure.get_or_insert(Error::new(ErrorKind::Io, "read lost its buffer"));
                    in_flight -= 1;
                    continue;
                };
                let n = buf.len() as u64;
                stats.bytes_read += n;
                if failure.is_some() || (opts.dst_zeroed && is_zero(buf.as_slice())) {
                    if failure.is_none() {
                        stats.bytes_skipped += n;
                    }
                    spare.push(buf);
                    in_flight -= 1;
                    continue;
                }
                let req = Request {
                    op: Op::Write { fua: false },
                    offset: c.tag,
                    len: n,
                    buf: Buffer::Owned(buf),
                    tag: c.tag,
                };
                qd.submit(&mut ring, req, &mut done_d);
            }
            for c in std::mem::take(&mut done_d) {
                in_flight -= 1;
                if let Some(e) = completion_error(&c, "write") {
                    failure.get_or_insert(e);
                }
                if let Buffer::Owned(b) = c.buf {
                    stats.bytes_written += b.len() as u64;
                    spare.push(b);
                }
            }
        }
        if in_flight == 0 && (exhausted || failure.is_some()) {
            break;
        }
        if in_flight == 0 {
            continue;
        }
        ring.submit_and_wait(1)
            .map_err(|e| Error::io("io_uring wait", e))?;
        cqes.clear();
        ring.reap(&mut cqes);
        for c in cqes.drain(..) {
            let owner = c.owner();
            if owner == qs.owner() {
                qs.complete(&mut ring, c, &mut done_s);
            } else if owner == qd.owner() {
                qd.complete(&mut ring, c, &mut done_d);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    flush(&mut ring, qd.as_mut())?;
    Ok(stats)
}

fn flush(ring: &mut Ring, q: &mut dyn Queue) -> Result<()> {
    let mut done = Vec::new();
    q.submit(
        ring,
        Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
            buf: Buffer::None,
            tag: 0,
        },
        &mut done,
    );
    let mut cqes = Vec::new();
    while done.is_empty() {
        ring.submit_and_wait(1)
            .map_err(|e| Error::io("io_uring wait", e))?;
        cqes.clear();
        ring.reap(&mut cqes);
        for c in cqes.drain(..) {
            if c.owner() == q.owner() {
                q.complete(ring, c, &mut done);
            }
        }
    }
    match done.pop().and_then(|c| completion_error(&c, "flush")) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{open, BackendSpec, OpenOptions};
    use crate::SyncDevice;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    fn dev(path: &std::path::Path) -> Arc<dyn BlockDevice> {
        open(
            &BackendSpec::File {
                path: path.to_path_buf(),
            },
            &OpenOptions::default(),
        )
        .unwrap()
    }

    fn pattern(off: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((off as usize + i) * 7 % 251) as u8 | 1)
            .collect()
    }

    /// A 64 MiB sparse file with data at a few places (some unaligned to the chunk).
    fn sparse_source(dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("src");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(64 * MIB).unwrap();
        for (off, len) in [
            (0u64, 4096usize),
            (3 * MIB + 8192, 2 << 20),
            (63 * MIB, 1 << 20),
        ] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&pattern(off, len)).unwrap();
        }
        // An allocated but all-zero megabyte.
        f.seek(SeekFrom::Start(40 * MIB)).unwrap();
        f.write_all(&vec![0u8; MIB as usize]).unwrap();
        f.sync_all().unwrap();
        p
    }

    #[test]
    fn copies_data_and_keeps_the_destination_sparse() {
        let t = tempfile::tempdir().unwrap();
        let src = sparse_source(t.path());
        let dst = t.path().join("dst");
        std::fs::File::create(&dst)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let opts = CopyOptions {
            dst_zeroed: true,
            chunk_bytes: 256 << 10,
            ..Default::default()
        };
        let stats = copy_device(&dev(&src), &dev(&dst), 64 * MIB, &opts).unwrap();
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&dst).unwrap(),
            "contents differ"
        );
        // Only the data (≈3 MiB + the zero MiB) was read; nothing near 64 MiB.
        assert!(stats.bytes_read < 8 * MIB, "{stats:?}");
        assert!(stats.bytes_written <= 4 * MIB, "{stats:?}");
        assert_eq!(
            stats.bytes_written + stats.bytes_skipped,
            64 * MIB,
            "{stats:?}"
        );
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks <= 5 * MIB, "destination not sparse: {blocks} bytes");
    }

    #[test]
    fn overwrites_a_dirty_destination() {
        let t = tempfile::tempdir().unwrap();
        let src = sparse_source(t.path());
        let dst = t.path().join("dst");
        std::fs::write(&dst, vec![0xAAu8; (64 * MIB) as usize]).unwrap();
        let stats = copy_device(&dev(&src), &dev(&dst), 64 * MIB, &CopyOptions::default()).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(stats.bytes_skipped > 0);
    }

    #[test]
    fn copies_a_prefix_into_a_larger_device() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let data = pattern(0, 3 * 4096);
        std::fs::write(&src, &data).unwrap();
        let dst = t.path().join("dst");
        std::fs::File::create(&dst).unwrap().set_len(MIB).unwrap();
        copy_device(&dev(&src), &dev(&dst), 3 * 4096, &CopyOptions::default()).unwrap();
        let mut d = SyncDevice::new(dev(&dst)).unwrap();
        assert_eq!(d.read_at(0, data.len()).unwrap().as_slice(), &data[..]);
        assert!(is_zero(d.read_at(3 * 4096, 4096).unwrap().as_slice()));
    }

    #[test]
    fn refuses_bad_lengths() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::File::create(&src).unwrap().set_len(MIB).unwrap();
        let dst = t.path().join("dst");
        std::fs::File::create(&dst)
            .unwrap()
            .set_len(MIB / 2)
            .unwrap();
        let e = copy_device(&dev(&src), &dev(&dst), MIB, &CopyOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfBounds);
        let e = copy_device(&dev(&src), &dev(&dst), 100, &CopyOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfBounds);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 13]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
