//! [`Slots`]: the one in-flight table of every ring owner.
//!
//! Every owner of io_uring SQEs or device requests (the file backend, the crypt and gate
//! layers, NBD connections and workers, vhost-user queue workers, the iSCSI queue) keeps
//! what an operation needs until its completion in a `Slots<T>`, and sends the [`Key`]
//! it got along in the SQE's `user_data` or the request's tag (packed by
//! [`Tag`](crate::tag::Tag)).
//!
//! Design:
//! - A `Vec` of entries with an intrusive LIFO free list: a vacant entry holds the index
//!   of the next vacant one. Insert and remove are O(1) and allocate only when the table
//!   grows past its high-water mark, so a steady stream of I/O allocates nothing; the
//!   most recently freed entry (warm in cache) is reused first.
//! - A bound, `max`, fixed at construction (at most [`Key::MAX_SLOTS`]): a full table
//!   hands the value back (`Err(value)`) instead of growing, so a client that floods a
//!   queue costs a clear error, never unbounded memory.
//! - A generation per entry, bumped when its value is removed. A [`Key`] is
//!   (index, generation), so the completion of an operation whose slot was freed and
//!   reused since (a stale or forged `user_data` or tag) finds `None` instead of another
//!   request's state. Generations have [`Key::GEN_BITS`] bits and wrap: a stale key is
//!   mistaken for a live one only if its slot was reused exactly a multiple of 2^20 times
//!   meanwhile.
//! - Nothing here panics on a key that came from outside (a CQE, a completion tag): an
//!   index out of range, a vacant entry or a wrong generation all read as `None`.

/// The handle of an occupied slot: its index and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    slot: u32,
    gen: u32,
}

impl Key {
    /// Bits of a slot index: a table holds at most 2^24 entries.
    pub const SLOT_BITS: u32 = 24;
    /// Bits of a generation (they wrap).
    pub const GEN_BITS: u32 = 20;
    /// The most entries a table can have.
    pub const MAX_SLOTS: usize = 1 << Self::SLOT_BITS;
    const SLOT_MASK: u32 = (1 << Self::SLOT_BITS) - 1;
    const GEN_MASK: u32 = (1 << Self::GEN_BITS) - 1;

    /// Slot 0, generation 0: a fixed key for an owner's singleton operations.
    pub const ZERO: Key = Key { slot: 0, gen: 0 };

    /// The key of `slot` at generation `gen`; `None` if either is out of range.
    pub const fn new(slot: u32, gen: u32) -> Option<Key> {
        if slot > Self::SLOT_MASK || gen > Self::GEN_MASK {
            return None;
        }
        Some(Key { slot, gen })
    }

    /// A key from the low bits of `slot` and `gen` (what a packed tag holds).
    pub(crate) const fn masked(slot: u32, gen: u32) -> Key {
        Key {
            slot: slot & Self::SLOT_MASK,
            gen: gen & Self::GEN_MASK,
        }
    }

    /// The slot index.
    pub const fn slot(self) -> u32 {
        self.slot
    }

    /// The generation.
    pub const fn gen(self) -> u32 {
        self.gen
    }
}

/// Index meaning "no next vacant entry".
const NONE: u32 = u32::MAX;

enum Entry<T> {
    Vacant { next: u32 },
    Occupied(T),
}

struct Cell<T> {
    gen: u32,
    entry: Entry<T>,
}

/// A bounded table of in-flight operations, addressed by generation-checked [`Key`]s.
pub struct Slots<T> {
    cells: Vec<Cell<T>>,
    /// First vacant cell, or [`NONE`].
    head: u32,
    len: usize,
    max: usize,
}

impl<T> std::fmt::Debug for Slots<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("len", &self.len)
            .field("allocated", &self.cells.len())
            .field("max", &self.max)
            .finish()
    }
}

impl<T> Slots<T> {
    /// An empty table that holds at most `max` values (capped at [`Key::MAX_SLOTS`]).
    /// Nothing is allocated until the first insert.
    pub const fn new(max: usize) -> Slots<T> {
        let max = if max < Key::MAX_SLOTS {
            max
        } else {
            Key::MAX_SLOTS
        };
        Slots {
            cells: Vec::new(),
            head: NONE,
            len: 0,
            max,
        }
    }

    /// Store `value`; its key, or the value back if the table is full.
    pub fn insert(&mut self, value: T) -> Result<Key, T> {
        let Some(key) = self.vacant_key() else {
            return Err(value);
        };
        self.fill(key, value);
        Ok(key)
    }

    /// Store the value `f` makes from the key it will have (for values that carry their
    /// own key); `None` (without calling `f`) if the table is full, or if `f` returns
    /// `None`.
    pub fn insert_with(&mut self, f: impl FnOnce(Key) -> Option<T>) -> Option<Key> {
        let key = self.vacant_key()?;
        self.fill(key, f(key)?);
        Some(key)
    }

    /// The key the next insert gets: the first vacant cell, else a new one below `max`.
    fn vacant_key(&self) -> Option<Key> {
        if self.head != NONE {
            let cell = self.cells.get(self.head as usize)?;
            return Some(Key {
                slot: self.head,
                gen: cell.gen,
            });
        }
        if self.cells.len() >= self.max {
            return None;
        }
        let slot = u32::try_from(self.cells.len()).ok()?;
        Some(Key { slot, gen: 0 })
    }

    /// Store `value` under `key`, which [`Slots::vacant_key`] just returned.
    fn fill(&mut self, key: Key, value: T) {
        match self.cells.get_mut(key.slot as usize) {
            Some(cell) => {
                debug_assert!(matches!(cell.entry, Entry::Vacant { .. }));
                if let Entry::Vacant { next } = cell.entry {
                    self.head = next;
                }
                cell.entry = Entry::Occupied(value);
            }
            None => self.cells.push(Cell {
                gen: 0,
                entry: Entry::Occupied(value),
            }),
        }
        self.len += 1;
    }

    /// The value under `key`, if it is still there.
    pub fn get(&self, key: Key) -> Option<&T> {
        match self.cells.get(key.slot as usize) {
            Some(Cell {
                gen,
                entry: Entry::Occupied(v),
            }) if *gen == key.gen => Some(v),
            _ => None,
        }
    }

    /// The value under `key`, mutably, if it is still there.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.cells.get_mut(key.slot as usize) {
            Some(Cell {
                gen,
                entry: Entry::Occupied(v),
            }) if *gen == key.gen => Some(v),
            _ => None,
        }
    }

    /// The value in slot `slot` whatever its generation, with its current key, for owners
    /// whose tags carry the index and only part of the generation (the iSCSI session's
    /// 32-bit ITTs): the caller compares the key with what it got.
    pub fn get_by_slot(&self, slot: u32) -> Option<(Key, &T)> {
        match self.cells.get(slot as usize) {
            Some(Cell {
                gen,
                entry: Entry::Occupied(v),
            }) => Some((Key { slot, gen: *gen }, v)),
            _ => None,
        }
    }

    /// The value in slot `slot` whatever its generation, with its current key. For owners
    /// that route by index alone and know the slot cannot have been reused meanwhile
    /// (see the caller's comment).
    pub fn get_by_slot_mut(&mut self, slot: u32) -> Option<(Key, &mut T)> {
        match self.cells.get_mut(slot as usize) {
            Some(Cell {
                gen,
                entry: Entry::Occupied(v),
            }) => Some((Key { slot, gen: *gen }, v)),
            _ => None,
        }
    }

    /// Take the value under `key` out, freeing its slot; `None` if it is not there.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        let cell = self.cells.get_mut(key.slot as usize)?;
        if cell.gen != key.gen || !matches!(cell.entry, Entry::Occupied(_)) {
            return None;
        }
        let old = std::mem::replace(&mut cell.entry, Entry::Vacant { next: self.head });
        cell.gen = (cell.gen + 1) & Key::GEN_MASK;
        self.head = key.slot;
        self.len -= 1;
        match old {
            Entry::Occupied(v) => Some(v),
            Entry::Vacant { .. } => None,
        }
    }

    /// Whether `key` addresses a value.
    pub fn contains(&self, key: Key) -> bool {
        self.get(key).is_some()
    }

    /// Number of values stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No value stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bound given at construction.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The keys of the stored values, in slot order.
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// The stored values with their keys, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.cells
            .iter()
            .zip(0u32..)
            .filter_map(|(c, slot)| match &c.entry {
                Entry::Occupied(v) => Some((Key { slot, gen: c.gen }, v)),
                Entry::Vacant { .. } => None,
            })
    }

    /// The stored values with their keys, mutably, in slot order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.cells
            .iter_mut()
            .zip(0u32..)
            .filter_map(|(c, slot)| match &mut c.entry {
                Entry::Occupied(v) => Some((Key { slot, gen: c.gen }, v)),
                Entry::Vacant { .. } => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn insert_get_remove() {
        let mut s = Slots::new(4);
        let a = s.insert("a").expect("room");
        let b = s.insert("b").expect("room");
        assert_ne!(a, b);
        assert_eq!((s.get(a), s.get(b), s.len()), (Some(&"a"), Some(&"b"), 2));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "a key works once");
        assert_eq!(s.get(a), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_reused_slot_rejects_the_stale_key() {
        let mut s = Slots::new(1);
        let old = s.insert(1).expect("room");
        assert_eq!(s.remove(old), Some(1));
        let new = s.insert(2).expect("room");
        assert_eq!(new.slot(), old.slot(), "the freed slot is reused");
        assert_ne!(new.gen(), old.gen());
        assert_eq!(s.get(old), None);
        assert_eq!(s.get_mut(old), None);
        assert_eq!(s.remove(old), None);
        assert_eq!(s.get(new), Some(&2));
    }

    #[test]
    fn full_hands_the_value_back() {
        let mut s = Slots::new(2);
        s.insert(1).expect("room");
        s.insert(2).expect("room");
        assert_eq!(s.insert(3), Err(3));
        assert_eq!(s.insert_with(|_| Some(4)), None);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn max_is_capped() {
        let s: Slots<u8> = Slots::new(usize::MAX);
        assert_eq!(s.max(), Key::MAX_SLOTS);
    }

    #[test]
    fn foreign_keys_read_as_none() {
        let mut s = Slots::new(8);
        let k = s.insert(5u8).expect("room");
        for bad in [
            Key::masked(7, 0),
            Key::masked(k.slot(), k.gen() + 1),
            Key::masked(u32::MAX, u32::MAX),
        ] {
            assert_eq!(s.get(bad), None);
            assert_eq!(s.remove(bad), None);
        }
        assert_eq!(s.get_by_slot_mut(9).map(|(k, _)| k), None);
        assert_eq!(s.get_by_slot(9).map(|(k, _)| k), None);
        assert_eq!(s.get_by_slot(k.slot()).map(|(k, _)| k), Some(k));
        assert_eq!(s.get_by_slot_mut(k.slot()).map(|(k, _)| k), Some(k));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn insert_with_sees_its_key() {
        let mut s = Slots::new(4);
        let k = s.insert_with(Some).expect("room");
        assert_eq!(s.get(k), Some(&k));
        assert_eq!(s.insert_with(|_| None::<Key>), None);
        assert_eq!(s.len(), 1, "a refused value takes no slot");
        let k2 = s.insert_with(Some).expect("room");
        assert_eq!(s.get(k2), Some(&k2));
    }

    #[test]
    fn generations_wrap() {
        let mut s = Slots::new(1);
        let first = s.insert(0).expect("room");
        s.remove(first);
        for _ in 1..(1u32 << Key::GEN_BITS) {
            let k = s.insert(0).expect("room");
            s.remove(k);
        }
        let again = s.insert(0).expect("room");
        assert_eq!(again, first, "2^20 reuses come back to the first key");
    }

    #[test]
    fn steady_state_does_not_grow() {
        let mut s = Slots::new(64);
        let keys: Vec<Key> = (0..16).map(|i| s.insert(i).expect("room")).collect();
        for k in keys {
            s.remove(k);
        }
        let cap = s.cells.capacity();
        for round in 0..1000 {
            let ks: Vec<Key> = (0..16)
                .map(|i| s.insert(round + i).expect("room"))
                .collect();
            for k in ks {
                s.remove(k);
            }
        }
        assert_eq!((s.cells.len(), s.cells.capacity()), (16, cap));
    }

    /// splitmix64: a deterministic source for the property tests below.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// Property: under any sequence of inserts, removes and lookups (with live, stale
    /// and random keys), the table agrees with a map model, never exceeds its bound and
    /// never hands out a key that is live.
    #[test]
    fn agrees_with_a_model() {
        for seed in 0..200u64 {
            let mut rng = Rng(seed);
            let max = 1 + (rng.next() % 40) as usize;
            let mut s = Slots::new(max);
            let mut model: HashMap<Key, u64> = HashMap::new();
            let mut dead: Vec<Key> = Vec::new();
            for step in 0..2000u64 {
                match rng.next() % 5 {
                    0 | 1 => match s.insert(step) {
                        Ok(k) => {
                            assert!(model.insert(k, step).is_none(), "live key reused");
                        }
                        Err(v) => {
                            assert_eq!(v, step);
                            assert_eq!(model.len(), max, "refused below the bound");
                        }
                    },
                    2 => {
                        let live: Vec<Key> = model.keys().copied().collect();
                        if let Some(&k) = live.get((rng.next() as usize) % live.len().max(1)) {
                            assert_eq!(s.remove(k), model.remove(&k));
                            dead.push(k);
                        }
                    }
                    3 => {
                        if let Some(&k) = dead.get((rng.next() as usize) % dead.len().max(1)) {
                            assert_eq!(s.get(k).copied(), model.get(&k).copied());
                        }
                    }
                    _ => {
                        let r = rng.next();
                        let k = Key::masked(r as u32 % 64, (r >> 32) as u32);
                        assert_eq!(s.get(k).copied(), model.get(&k).copied());
                    }
                }
                assert_eq!(s.len(), model.len());
                assert!(s.len() <= max);
            }
            let mut got: Vec<(Key, u64)> = s.iter().map(|(k, v)| (k, *v)).collect();
            let mut want: Vec<(Key, u64)> = model.into_iter().collect();
            got.sort_by_key(|(k, _)| k.slot());
            want.sort_by_key(|(k, _)| k.slot());
            assert_eq!(got, want);
        }
    }
}
