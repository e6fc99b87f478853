//! Crash consistency: every state a power cut can leave of a header update.
//!
//! [`Recorder`] is a [`Disk`] over an in-memory image that records every write and flush
//! an operation issues. [`for_each_crash_state`] then rebuilds what the device may hold
//! if the power fails at any point, under the usual model of a volatile write cache:
//!
//! - a write is durable once a later flush has returned; the writes issued since the last
//!   flush (a *gap*) may each have landed or not, in any combination: for every gap every
//!   subset of its writes is replayed (in issue order) over everything before it — all
//!   2^n subsets when there are at most [`CrashOptions::max_subsets`], otherwise a
//!   deterministic sample (none, all, each write alone, each one missing, every prefix and
//!   suffix, then subsets drawn from a fixed seed) and the gap is counted in
//!   [`CrashSummary::sampled_gaps`];
//! - a write may also be *torn* at sector boundaries (only 512-byte sectors are atomic):
//!   each multi-sector write of a gap is also replayed with only its first or last 1, n/2
//!   or n−1 sectors landed, alone and on top of every other write of its gap.
//!
//! The caller checks each state (for LUKS: that the old or the new passphrase opens it).

use crate::disk::Disk;
use std::io;

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A write of `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// A flush (write barrier).
    Flush,
}

/// A [`Disk`] over an in-memory image that records every write and flush.
#[derive(Debug, Clone)]
pub struct Recorder {
    image: Vec<u8>,
    ops: Vec<Op>,
}

impl Recorder {
    /// Start recording over `image` (its size is fixed: writes past the end fail).
    pub fn new(image: Vec<u8>) -> Self {
        Recorder {
            image,
            ops: Vec::new(),
        }
    }

    /// The operations recorded so far.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The image with every recorded write applied.
    pub fn image(&self) -> &[u8] {
        &self.image
    }
}

fn range(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    match start.checked_add(n) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

impl Disk for Recorder {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = range(self.image.len(), offset, buf.len())?;
        buf.copy_from_slice(&self.image[r]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = range(self.image.len(), offset, buf.len())?;
        self.image[r].copy_from_slice(buf);
        self.ops.push(Op::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ops.push(Op::Flush);
        Ok(())
    }

    fn size(&mut self) -> io::Result<u64> {
        u64::try_from(self.image.len()).map_err(|_| io::ErrorKind::InvalidData.into())
    }
}

/// How many states to build.
#[derive(Debug, Clone, Copy)]
pub struct CrashOptions {
    /// Largest number of write subsets replayed per gap (all of them below this).
    pub max_subsets: usize,
    /// Also replay torn writes, cut at this sector size (0: never).
    pub sector: usize,
}

impl Default for CrashOptions {
    fn default() -> Self {
        CrashOptions {
            max_subsets: 1024,
            sector: 512,
        }
    }
}

/// Which writes of the gap landed in a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashState {
    /// Flushes that completed before the cut.
    pub flushes: usize,
    /// Index in the gap of each write that landed whole.
    pub landed: Vec<usize>,
    /// A write that landed torn: (index in the gap, landed byte range within it).
    pub torn: Option<(usize, std::ops::Range<usize>)>,
}

/// What [`for_each_crash_state`] replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashSummary {
    /// States visited.
    pub states: usize,
    /// Gaps (runs of writes between flushes, including an empty last one).
    pub gaps: usize,
    /// Writes in the largest gap.
    pub largest_gap: usize,
    /// Gaps whose subsets were sampled rather than all replayed.
    pub sampled_gaps: usize,
    /// Flushes recorded.
    pub flushes: usize,
}

/// A small deterministic generator (xorshift64*): the sample is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The subsets of `n` writes to replay (each a sorted list of indices), and whether they
/// are a sample.
fn subsets(n: usize, max: usize) -> (Vec<Vec<usize>>, bool) {
    if n < usize::BITS as usize && (1usize << n) <= max {
        let all = (0..1usize << n)
            .map(|m| (0..n).filter(|i| m >> i & 1 == 1).collect())
            .collect();
        return (all, false);
    }
    let mut out = std::collections::BTreeSet::new();
    out.insert(Vec::new());
    out.insert((0..n).collect::<Vec<_>>());
    for i in 0..n {
        out.insert(vec![i]);
        out.insert((0..n).filter(|&j| j != i).collect());
        out.insert((0..i).collect());
        out.insert((i..n).collect());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    // 2^n > max here, so random draws fill the budget; the attempt bound only keeps the
    // loop finite whatever happens.
    for _ in 0..max.saturating_mul(8) {
        if out.len() >= max {
            break;
        }
        out.insert((0..n).filter(|_| rng.next() & 1 == 1).collect());
    }
    (out.into_iter().collect(), true)
}

/// Write `data` at `offset` into `image` (clipped to it), saving what it covered in `undo`.
fn apply(image: &mut [u8], offset: u64, data: &[u8], undo: &mut Vec<(usize, Vec<u8>)>) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let end = start.saturating_add(data.len()).min(image.len());
    if start < end {
        undo.push((start, image[start..end].to_vec()));
        image[start..end].copy_from_slice(&data[..end - start]);
    }
}

/// Put back what [`apply`] overwrote, newest first.
fn revert(image: &mut [u8], undo: &mut Vec<(usize, Vec<u8>)>) {
    while let Some((start, old)) = undo.pop() {
        image[start..start + old.len()].copy_from_slice(&old);
    }
}

/// Rebuild every state a power cut can leave after `ops` were issued over `initial` (see
/// the module doc) and call `visit` with each. Stops at the first error `visit` returns.
pub fn for_each_crash_state<E>(
    initial: &[u8],
    ops: &[Op],
    opts: &CrashOptions,
    mut visit: impl FnMut(&CrashState, &[u8]) -> Result<(), E>,
) -> Result<CrashSummary, E> {
    // Split into gaps of writes, separated by flushes.
    let mut gaps: Vec<Vec<(u64, &[u8])>> = vec![Vec::new()];
    for op in ops {
        match op {
            Op::Write { offset, data } => {
                if let Some(g) = gaps.last_mut() {
                    g.push((*offset, data));
                }
            }
            Op::Flush => gaps.push(Vec::new()),
        }
    }
    let mut summary = CrashSummary {
        gaps: gaps.len(),
        flushes: gaps.len() - 1,
        ..CrashSummary::default()
    };
    // One image, changed in place and put back after each state (images can be large).
    let mut img = initial.to_vec();
    let mut undo = Vec::new();
    for (flushes, gap) in gaps.iter().enumerate() {
        summary.largest_gap = summary.largest_gap.max(gap.len());
        let (sets, sampled) = subsets(gap.len(), opts.max_subsets);
        summary.sampled_gaps += usize::from(sampled);
        for landed in sets {
            for &i in &landed {
                apply(&mut img, gap[i].0, gap[i].1, &mut undo);
            }
            summary.states += 1;
            let st = CrashState {
                flushes,
                landed,
                torn: None,
            };
            let r = visit(&st, &img);
            revert(&mut img, &mut undo);
            r?;
        }
        if opts.sector > 0 {
            for (i, &(offset, data)) in gap.iter().enumerate() {
                let sectors = data.len().div_ceil(opts.sector);
                if sectors < 2 {
                    continue;
                }
                let mut cuts = vec![1, sectors / 2, sectors - 1];
                cuts.dedup();
                for k in cuts {
                    let cut = (k * opts.sector).min(data.len());
                    for part in [0..cut, cut..data.len()] {
                        for others in [false, true] {
                            let mut landed = Vec::new();
                            if others {
                                for (j, &(o, d)) in gap.iter().enumerate() {
                                    if j != i {
                                        apply(&mut img, o, d, &mut undo);
                                        landed.push(j);
                                    }
                                }
                            }
                            let at = offset.saturating_add(part.start as u64);
                            apply(&mut img, at, &data[part.clone()], &mut undo);
                            summary.states += 1;
                            let st = CrashState {
                                flushes,
                                landed,
                                torn: Some((i, part.clone())),
                            };
                            let r = visit(&st, &img);
                            revert(&mut img, &mut undo);
                            r?;
                        }
                    }
                }
            }
        }
        // The gap is durable once its flush returned.
        for &(offset, data) in gap {
            apply(&mut img, offset, data, &mut undo);
        }
        undo.clear();
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_subsets_and_tears() {
        let mut r = Recorder::new(vec![0u8; 4096]);
        r.write_at(0, &[1; 1024]).unwrap();
        r.write_at(2048, &[2; 512]).unwrap();
        r.flush().unwrap();
        r.write_at(0, &[3; 512]).unwrap();
        let ops = r.ops().to_vec();
        let mut seen = Vec::new();
        let s = for_each_crash_state(&[0u8; 4096], &ops, &CrashOptions::default(), |st, img| {
            seen.push((st.clone(), img[0], img[600], img[2048]));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(s.gaps, 2);
        assert_eq!(s.flushes, 1);
        assert_eq!(s.sampled_gaps, 0);
        // Gap 0: 4 subsets + the 1024-byte write torn at 1 sector (2 parts × 2).
        // Gap 1: 2 subsets.
        assert_eq!(s.states, 4 + 4 + 2);
        // Before the flush anything goes; after it, the first gap is durable.
        assert!(seen.contains(&(
            CrashState {
                flushes: 0,
                landed: vec![1],
                torn: None
            },
            0,
            0,
            2
        )));
        for (st, a, b, c) in &seen {
            if st.flushes == 1 {
                assert_eq!((*b, *c), (1, 2));
                assert!(*a == 1 || *a == 3);
            }
        }
        // A torn write: its first sector only.
        assert!(seen
            .iter()
            .any(|(st, a, b, _)| st.torn.is_some() && *a == 1 && *b == 0));
    }

    #[test]
    fn large_gaps_are_sampled_deterministically() {
        let (all, sampled) = subsets(4, 64);
        assert_eq!((all.len(), sampled), (16, false));
        let (a, sampled) = subsets(20, 256);
        assert!(sampled);
        assert_eq!(a.len(), 256);
        assert!(a.contains(&vec![]) && a.contains(&(0..20).collect::<Vec<_>>()));
        assert_eq!(subsets(20, 256).0, a, "same sample every run");
    }
}
