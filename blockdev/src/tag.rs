//! [`Tag`]: the one packing of an io_uring `user_data` and of a request tag.
//!
//! ```text
//!  63        48 47   44 43            24 23              0
//!  ┌──────────┬───────┬────────────────┬─────────────────┐
//!  │ route 16 │ kind 4│ generation 20  │ slot 24         │
//!  └──────────┴───────┴────────────────┴─────────────────┘
//! ```
//!
//! - **route**: in a `user_data`, the [`OwnerId`] the event loop routes the CQE by (0 is
//!   the event loop itself); in a [`Request`](crate::Request) tag, whatever the front end
//!   routes completions by (the NBD worker: the connection's slot; otherwise 0).
//! - **kind**: what an operation of that owner is, for owners with more than one kind of
//!   SQE (a socket receive or send, a timer). [`Kind::IO`] is a device request. The
//!   stacking layers share their backend's owner id and keep their own timers apart with
//!   the reserved [`Kind::THROTTLE`] and [`Kind::GATE`], which backends never use.
//! - **generation** and **slot**: the [`Key`] of the operation in its owner's
//!   [`Slots`](crate::slots::Slots) table, so a completion whose slot was reused since is
//!   recognised as stale.
//!
//! Every `u64` decodes (the fields are bit ranges), so a tag that came back from the
//! kernel or a peer is never a panic: at worst its key finds nothing.

use crate::engine::OwnerId;
use crate::slots::Key;

/// What an SQE of an owner is (4 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind(u8);

impl Kind {
    /// Bits of a kind.
    pub const BITS: u32 = 4;
    /// A device request (the default).
    pub const IO: Kind = Kind(0);
    /// The throttle layer's timer, on its backend's owner id.
    pub const THROTTLE: Kind = Kind(15);
    /// The gate layer's timer, on its backend's owner id.
    pub const GATE: Kind = Kind(14);

    /// Kind `k`. Evaluated in a `const`, a `k` of 16 or more fails the build.
    pub const fn new(k: u8) -> Kind {
        assert!(k < 1 << Self::BITS, "a tag kind has 4 bits");
        Kind(k)
    }

    /// Its number.
    pub const fn get(self) -> u8 {
        self.0
    }
}

/// A packed route, kind and [`Key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(u64);

const SLOT_SHIFT: u32 = 0;
const GEN_SHIFT: u32 = Key::SLOT_BITS;
const KIND_SHIFT: u32 = GEN_SHIFT + Key::GEN_BITS;
const ROUTE_SHIFT: u32 = KIND_SHIFT + Kind::BITS;
const _: () = assert!(ROUTE_SHIFT + OwnerId::BITS == u64::BITS);

impl Tag {
    /// Pack `route`, `kind` and `key`.
    pub const fn new(route: OwnerId, kind: Kind, key: Key) -> Tag {
        Tag((route as u64) << ROUTE_SHIFT
            | (kind.0 as u64) << KIND_SHIFT
            | (key.gen() as u64) << GEN_SHIFT
            | (key.slot() as u64) << SLOT_SHIFT)
    }

    /// A device request's tag for `key` (route 0, [`Kind::IO`]).
    pub const fn of(key: Key) -> Tag {
        Tag::new(0, Kind::IO, key)
    }

    /// Decode a raw `user_data` or request tag (any value decodes).
    pub const fn from_raw(raw: u64) -> Tag {
        Tag(raw)
    }

    /// The packed value, for `user_data` or [`Request::tag`](crate::Request::tag).
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The route (owner id of a `user_data`).
    pub const fn route(self) -> OwnerId {
        (self.0 >> ROUTE_SHIFT) as OwnerId
    }

    /// The kind.
    pub const fn kind(self) -> Kind {
        Kind(((self.0 >> KIND_SHIFT) & ((1 << Kind::BITS) - 1)) as u8)
    }

    /// The key (slot and generation).
    pub const fn key(self) -> Key {
        Key::masked((self.0 >> SLOT_SHIFT) as u32, (self.0 >> GEN_SHIFT) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::Slots;

    /// splitmix64, for the property tests.
    fn next(s: &mut u64) -> u64 {
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn packs_each_field_where_the_layout_says() {
        let key = Key::new(0x00ab_cdef, 0x0007_1234).expect("in range");
        let t = Tag::new(0xbeef, Kind::new(9), key);
        assert_eq!(t.raw(), 0xbeef_9712_34ab_cdef);
        assert_eq!((t.route(), t.kind(), t.key()), (0xbeef, Kind::new(9), key));
        assert_eq!(Tag::of(key).raw(), 0x0000_0712_34ab_cdef);
    }

    #[test]
    fn extremes_round_trip() {
        let max = Key::new((1 << 24) - 1, (1 << 20) - 1).expect("in range");
        for (route, kind, key) in [
            (0, Kind::IO, Key::ZERO),
            (u16::MAX, Kind::new(15), max),
            (u16::MAX, Kind::IO, Key::ZERO),
            (0, Kind::new(15), max),
        ] {
            let t = Tag::from_raw(Tag::new(route, kind, key).raw());
            assert_eq!((t.route(), t.kind(), t.key()), (route, kind, key));
        }
        assert_eq!(Key::new(1 << 24, 0), None);
        assert_eq!(Key::new(0, 1 << 20), None);
    }

    #[test]
    fn reserved_kinds_differ_from_io() {
        assert_ne!(Kind::THROTTLE, Kind::GATE);
        assert_ne!(Kind::THROTTLE, Kind::IO);
        assert_ne!(Kind::GATE, Kind::IO);
    }

    /// Property: encode ∘ decode is the identity on fields, decode ∘ encode on `u64`.
    #[test]
    fn encode_decode_round_trip() {
        let mut s = 1u64;
        for _ in 0..100_000 {
            let r = next(&mut s);
            let t = Tag::from_raw(r);
            let again = Tag::new(t.route(), t.kind(), t.key());
            assert_eq!(again.raw(), r, "{r:#x}");

            let route = (r >> 7) as u16;
            let kind = Kind::new((r % 16) as u8);
            let key = Key::masked((r >> 17) as u32, (r >> 41) as u32);
            let t = Tag::from_raw(Tag::new(route, kind, key).raw());
            assert_eq!((t.route(), t.kind(), t.key()), (route, kind, key));
        }
    }

    /// Property: a tag of a key from a table finds its value; once the slot is reused,
    /// the old tag finds nothing, whatever the route and kind around it.
    #[test]
    fn tags_of_reused_slots_are_stale() {
        let mut s = 7u64;
        let mut slots = Slots::new(8);
        let mut live: Vec<(Tag, u64)> = Vec::new();
        let mut stale: Vec<Tag> = Vec::new();
        for i in 0..20_000u64 {
            let r = next(&mut s);
            if r.is_multiple_of(2) || live.is_empty() {
                if let Ok(k) = slots.insert(i) {
                    live.push((Tag::new((r >> 8) as u16, Kind::new((r % 16) as u8), k), i));
                }
            } else {
                let (t, v) = live.swap_remove((r as usize >> 3) % live.len());
                assert_eq!(slots.remove(Tag::from_raw(t.raw()).key()), Some(v));
                stale.push(t);
            }
            for t in stale.iter().rev().take(4) {
                assert_eq!(slots.get(t.key()), None, "stale {t:?}");
            }
        }
    }
}
