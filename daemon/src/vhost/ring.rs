//! Reading a split virtqueue the guest wrote: which chains are available, and what each
//! chain holds. No threads and no I/O, so the fuzz targets drive it from bytes.
//!
//! The guest writes these structures in shared memory, at any time. Anything a
//! conforming driver can never produce is an *impossible ring state* ([`RingError`]); the
//! worker then treats the queue as a broken device (see [`super::worker`]) instead of
//! guessing. The rules, from virtio 1.2 §2.7 (split virtqueues):
//!
//! - **Outstanding chains**: every chain holds at least one entry of the descriptor
//!   table until the device puts it in the used ring, so a driver never has more than
//!   *queue size* chains available and not yet used: `avail.idx − used.idx ≤ size`
//!   (wrapping u16). A larger gap (e.g. an `avail.idx` bumped far ahead) is refused before
//!   anything is popped, and so is an `avail.idx` moved back behind chains already
//!   popped. This also bounds the work and memory of one pass: at most
//!   *size* chains are in flight at once.
//! - **Heads** index the descriptor table: `head < size`.
//! - **Chain length** (§2.7.5.3.1, "A driver MUST NOT create a descriptor chain longer
//!   than the Queue Size of the device"): at most *size* descriptors, the entries of an
//!   indirect table included (the indirect descriptor itself is not counted). The walk
//!   stops there, so a loop (`next` pointing back) ends as [`RingError::ChainTooLong`],
//!   and a chain costs at most *size* × 16 bytes of bookkeeping (before: an indirect
//!   table of 65,535 entries cost 1 MiB per chain, 1 GiB per kick of a 1024-entry queue).
//! - **Indirect tables** (§2.7.5.3): only with `VIRTIO_RING_F_INDIRECT_DESC`, never
//!   nested, never with `NEXT` on the indirect descriptor, a non-zero multiple of 16
//!   bytes; `next` inside a table stays inside it.
//! - Every descriptor and ring entry is read once, through `vm-memory` (bounds-checked
//!   against the guest memory map); the walk acts on its copies, so a guest changing the
//!   table under us changes nothing but its own request.
//!
//! What the request *means* (header, data, status byte) is [`super::request`]'s job: a
//! well-formed chain with a bad request in it gets a status byte, not a broken queue.

use super::request::Seg;
use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes of one split-ring descriptor.
const DESC_BYTES: u64 = 16;
/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
const F_INDIRECT: u16 = 4;

/// A ring state no conforming driver produces. The queue that shows one is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// `avail.idx` is more than the queue size ahead of the used index.
    AvailAhead {
        /// The guest's `avail.idx`.
        avail: u16,
        /// Our used index.
        used: u16,
        /// Queue size.
        size: u16,
    },
    /// `avail.idx` went back behind chains we already popped.
    AvailBehind {
        /// The guest's `avail.idx`.
        avail: u16,
        /// Our next avail index.
        next_avail: u16,
    },
    /// An avail ring entry names a descriptor beyond the table.
    HeadOutOfRange {
        /// The head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// More descriptors than the queue size (or a loop).
    ChainTooLong {
        /// The chain's head.
        head: u16,
        /// The limit (queue size).
        limit: u16,
    },
    /// `next` points beyond the (direct or indirect) table.
    NextOutOfRange {
        /// The chain's head.
        head: u16,
        /// The bad `next`.
        next: u16,
        /// Entries in the table.
        table_len: u16,
    },
    /// An indirect descriptor without `VIRTIO_RING_F_INDIRECT_DESC`.
    IndirectNotNegotiated {
        /// The chain's head.
        head: u16,
    },
    /// An indirect descriptor inside an indirect table, or with `NEXT` set.
    BadIndirect {
        /// The chain's head.
        head: u16,
    },
    /// An indirect table whose length is zero or not a multiple of 16.
    BadIndirectLen {
        /// The chain's head.
        head: u16,
        /// The table length in bytes.
        len: u32,
    },
    /// A ring or descriptor outside guest memory.
    Memory {
        /// What could not be read or written.
        what: &'static str,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RingError::AvailAhead { avail, used, size } => write!(
                f,
                "avail.idx {avail} is more than the queue size {size} ahead of the used index {used}"
            ),
            RingError::AvailBehind { avail, next_avail } => write!(
                f,
                "avail.idx {avail} went back behind chains already taken (next {next_avail})"
            ),
            RingError::HeadOutOfRange { head, size } => {
                write!(f, "avail ring names descriptor {head} of a {size}-entry table")
            }
            RingError::ChainTooLong { head, limit } => write!(
                f,
                "chain at head {head} is longer than the queue size {limit} (or loops)"
            ),
            RingError::NextOutOfRange {
                head,
                next,
                table_len,
            } => write!(
                f,
                "chain at head {head}: next {next} is outside its {table_len}-entry table"
            ),
            RingError::IndirectNotNegotiated { head } => write!(
                f,
                "chain at head {head}: indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
            ),
            RingError::BadIndirect { head } => write!(
                f,
                "chain at head {head}: nested indirect table or indirect descriptor with NEXT"
            ),
            RingError::BadIndirectLen { head, len } => write!(
                f,
                "chain at head {head}: indirect table of {len} bytes (not a non-zero multiple of 16)"
            ),
            RingError::Memory { what } => write!(f, "{what} is outside guest memory"),
        }
    }
}

impl std::error::Error for RingError {}

/// How many chains the guest made available that we have not popped yet, after checking
/// that the ring is in a possible state (at most `size` chains outstanding).
pub fn pending<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<u16, RingError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| RingError::Memory { what: "avail.idx" })?;
    let used = Wrapping(queue.next_used());
    let next = Wrapping(queue.next_avail());
    let size = queue.size();
    let ahead = (avail - used).0;
    if ahead > size {
        return Err(RingError::AvailAhead {
            avail: avail.0,
            used: used.0,
            size,
        });
    }
    // Chains popped and not yet used (≤ size: ours to keep). The guest may not take
    // back what it made available: `avail.idx` never moves back behind them.
    let popped = (next - used).0;
    if ahead < popped {
        return Err(RingError::AvailBehind {
            avail: avail.0,
            next_avail: next.0,
        });
    }
    Ok(ahead - popped)
}

/// Pop the next available head (the caller checked with [`pending`] that there is one)
/// and advance the queue's next avail index.
pub fn pop_head<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<u16, RingError> {
    let size = queue.size();
    let slot = u64::from(queue.next_avail() % size.max(1));
    let at = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * slot)
        .ok_or(RingError::Memory { what: "avail ring" })?;
    let head = mem
        .load::<u16>(at, Ordering::Acquire)
        .map(u16::from_le)
        .map_err(|_| RingError::Memory { what: "avail ring" })?;
    if head >= size {
        return Err(RingError::HeadOutOfRange { head, size });
    }
    queue.set_next_avail(queue.next_avail().wrapping_add(1));
    Ok(head)
}

/// Walk the chain at `head` of the descriptor table at `desc_table` (a queue of `size`
/// entries) into `out` (cleared first): every descriptor, indirect tables followed.
/// `indirect_ok`: `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
pub fn walk_chain<M: GuestMemory>(
    mem: &M,
    desc_table: u64,
    size: u16,
    head: u16,
    indirect_ok: bool,
    out: &mut Vec<Seg>,
) -> Result<(), RingError> {
    out.clear();
    let mut table = desc_table;
    let mut table_len = size;
    let mut idx = head;
    let mut indirect = false;
    loop {
        if idx >= table_len {
            return Err(if indirect || idx != head {
                RingError::NextOutOfRange {
                    head,
                    next: idx,
                    table_len,
                }
            } else {
                RingError::HeadOutOfRange { head, size }
            });
        }
        if out.len() >= usize::from(size) {
            return Err(RingError::ChainTooLong { head, limit: size });
        }
        let at = table
            .checked_add(u64::from(idx) * DESC_BYTES)
            .ok_or(RingError::Memory {
                what: "descriptor table",
            })?;
        let d: Descriptor = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| RingError::Memory {
                what: "descriptor table",
            })?;
        let flags = d.flags();
        if flags & F_INDIRECT != 0 {
            if !indirect_ok {
                return Err(RingError::IndirectNotNegotiated { head });
            }
            if indirect || flags & F_NEXT != 0 {
                return Err(RingError::BadIndirect { head });
            }
            let len = d.len();
            if len == 0 || u64::from(len) % DESC_BYTES != 0 {
                return Err(RingError::BadIndirectLen { head, len });
            }
            // A table of more than 65,535 entries cannot be indexed by `next`; its tail
            // is unreachable, and the walk is bounded by `size` anyway.
            table_len = u16::try_from(u64::from(len) / DESC_BYTES).unwrap_or(u16::MAX);
            table = d.addr().raw_value();
            idx = 0;
            indirect = true;
            continue;
        }
        out.push(Seg {
            addr: d.addr().raw_value(),
            len: d.len(),
            write: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        idx = d.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testgen::Rng;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x4000;
    const USED: u64 = 0x5000;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap()
    }

    fn put(m: &Mem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        m.write_obj(
            Descriptor::new(addr, len, flags, next),
            GuestAddress(table + u64::from(i) * 16),
        )
        .unwrap();
    }

    fn queue(m: &Mem, size: u16) -> Queue {
        let mut q = Queue::new(1024).unwrap();
        q.set_size(size);
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(m));
        q
    }

    fn walk(m: &Mem, size: u16, head: u16, indirect_ok: bool) -> Result<Vec<Seg>, RingError> {
        let mut out = Vec::new();
        walk_chain(m, DESC, size, head, indirect_ok, &mut out).map(|()| out)
    }

    #[test]
    fn direct_and_indirect_chains() {
        let m = mem();
        put(&m, DESC, 2, 0x8000, 16, F_NEXT, 5);
        put(&m, DESC, 5, 0x9000, 512, F_NEXT | F_WRITE, 7);
        put(&m, DESC, 7, 0xa000, 1, F_WRITE, 0);
        let segs = walk(&m, 8, 2, false).unwrap();
        assert_eq!(segs.len(), 3);
        assert_eq!(
            segs[1],
            Seg {
                addr: 0x9000,
                len: 512,
                write: true
            }
        );
        // Head 0 → an indirect table of 8 entries (as long as the queue: allowed).
        let ind = 0xc000;
        put(&m, DESC, 0, ind, 8 * 16, F_INDIRECT, 0);
        for i in 0..8u16 {
            let last = i == 7;
            put(
                &m,
                ind,
                i,
                0x8000,
                1,
                if last { F_WRITE } else { F_NEXT },
                i + 1,
            );
        }
        assert_eq!(walk(&m, 8, 0, true).unwrap().len(), 8);
        assert_eq!(
            walk(&m, 8, 0, false),
            Err(RingError::IndirectNotNegotiated { head: 0 })
        );
    }

    #[test]
    fn impossible_chains_are_refused() {
        let m = mem();
        // A loop 3 → 4 → 3.
        put(&m, DESC, 3, 0x8000, 16, F_NEXT, 4);
        put(&m, DESC, 4, 0x8000, 16, F_NEXT, 3);
        assert_eq!(
            walk(&m, 8, 3, true),
            Err(RingError::ChainTooLong { head: 3, limit: 8 })
        );
        // next beyond the table; head beyond the table.
        put(&m, DESC, 1, 0x8000, 16, F_NEXT, 8);
        assert!(matches!(
            walk(&m, 8, 1, true),
            Err(RingError::NextOutOfRange { next: 8, .. })
        ));
        assert!(matches!(
            walk(&m, 8, 8, true),
            Err(RingError::HeadOutOfRange { head: 8, .. })
        ));
        // An indirect table longer than the queue, every entry chained: too long, and
        // the walk stops after `size` entries (bounded work and memory).
        let ind = 0xc000;
        put(&m, DESC, 0, ind, 9 * 16, F_INDIRECT, 0);
        for i in 0..9u16 {
            put(&m, ind, i, 0x8000, 1, F_NEXT, i + 1);
        }
        assert_eq!(
            walk(&m, 8, 0, true),
            Err(RingError::ChainTooLong { head: 0, limit: 8 })
        );
        // Nested indirect; indirect with NEXT; bad table lengths.
        put(&m, ind, 0, ind, 32, F_INDIRECT, 0);
        assert_eq!(
            walk(&m, 8, 0, true),
            Err(RingError::BadIndirect { head: 0 })
        );
        put(&m, DESC, 0, ind, 32, F_INDIRECT | F_NEXT, 1);
        assert_eq!(
            walk(&m, 8, 0, true),
            Err(RingError::BadIndirect { head: 0 })
        );
        for len in [0u32, 24] {
            put(&m, DESC, 0, ind, len, F_INDIRECT, 0);
            assert_eq!(
                walk(&m, 8, 0, true),
                Err(RingError::BadIndirectLen { head: 0, len })
            );
        }
        // A table outside guest memory.
        put(&m, DESC, 0, 0xffff_0000, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&m, 8, 0, true),
            Err(RingError::Memory { .. })
        ));
    }

    #[test]
    fn avail_index_far_ahead_is_impossible() {
        let m = mem();
        let mut q = queue(&m, 8);
        q.set_next_avail(100);
        q.set_next_used(100);
        for (avail, want) in [(100u16, Ok(0)), (103, Ok(3)), (108, Ok(8))] {
            m.write_obj(avail, GuestAddress(AVAIL + 2)).unwrap();
            assert_eq!(pending(&q, &m), want);
        }
        m.write_obj(109u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(
            pending(&q, &m),
            Err(RingError::AvailAhead {
                avail: 109,
                used: 100,
                size: 8
            })
        );
        // Behind the used index is as impossible as far ahead (it wraps to a big gap).
        m.write_obj(99u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(pending(&q, &m).is_err());
        // Popped but not used chains count: 5 popped, the guest may add 3 more, not 4.
        q.set_next_avail(105);
        m.write_obj(108u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(pending(&q, &m), Ok(3));
        m.write_obj(109u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(pending(&q, &m).is_err());
        // Found by fuzzing: avail.idx moved back between the used index and the next
        // avail index (it looked like 65,534 chains pending).
        m.write_obj(103u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(
            pending(&q, &m),
            Err(RingError::AvailBehind {
                avail: 103,
                next_avail: 105
            })
        );
        // Wrapping around u16 is fine.
        q.set_next_avail(65534);
        q.set_next_used(65534);
        m.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(pending(&q, &m), Ok(4));
    }

    #[test]
    fn heads_beyond_the_table_are_impossible() {
        let m = mem();
        let mut q = queue(&m, 8);
        m.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(5u16, GuestAddress(AVAIL + 4)).unwrap();
        m.write_obj(8u16, GuestAddress(AVAIL + 6)).unwrap();
        assert_eq!(pending(&q, &m), Ok(2));
        assert_eq!(pop_head(&mut q, &m), Ok(5));
        assert_eq!(
            pop_head(&mut q, &m),
            Err(RingError::HeadOutOfRange { head: 8, size: 8 })
        );
        assert_eq!(q.next_avail(), 1, "a bad head is not consumed");
    }

    /// Property: for random descriptor tables (loops, indirect tables, bad lengths and
    /// indexes) a walk always ends, and never holds more than `size` segments.
    #[test]
    fn random_tables_walk_within_bounds() {
        let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
        let mut rnd = move || rng.next();
        let m = mem();
        let mut out = Vec::new();
        for _ in 0..2000 {
            let size = 1u16 << (rnd() % 6);
            for i in 0..size {
                let r = rnd();
                let flags = (r & 7) as u16 & if r & 0x100 == 0 { 3 } else { 7 };
                let next = ((r >> 16) % (u64::from(size) + 2)) as u16;
                let addr = if flags & F_INDIRECT != 0 {
                    0xc000
                } else {
                    0x8000
                };
                let len = if flags & F_INDIRECT != 0 {
                    ((r >> 32) % 5) as u32 * 16
                } else {
                    (r >> 40) as u32 & 0xfff
                };
                put(&m, DESC, i, addr, len, flags, next);
                let r2 = rnd();
                put(
                    &m,
                    0xc000,
                    i,
                    0x8000,
                    1,
                    (r2 & 7) as u16,
                    ((r2 >> 8) % 6) as u16,
                );
            }
            let head = (rnd() % u64::from(size)) as u16;
            match walk_chain(&m, DESC, size, head, true, &mut out) {
                Ok(()) => {
                    assert!(!out.is_empty() && out.len() <= usize::from(size));
                }
                Err(_) => assert!(out.len() <= usize::from(size)),
            }
        }
    }
}
