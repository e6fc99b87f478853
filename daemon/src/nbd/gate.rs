//! Admission and memory accounting, shared by a server's listeners and I/O threads.
//!
//! - [`Budget`]: the bytes all connections together may hold (`--nbd-memory-mib`), one
//!   atomic counter, split when the server starts ([`Gate::new`]):
//!
//!   ```text
//!   | idle-buffer pools | max_conns × connection floor | shared: charged request by request |
//!   | threads × ≤16 MiB | (reserved: admission never   | (≥ one maximum-size request)       |
//!   |                   |  waits for memory)           |                                    |
//!   ```
//! - [`Gate`]: counts handshakes and connections, in all and per [`Peer`] (a TCP client's
//!   IP address, a Unix-socket client's uid from `SO_PEERCRED`). A handshake beyond its
//!   bounds is closed before the greeting; a connection beyond its bounds is refused at
//!   `NBD_OPT_GO` with a message ([`Refusal`]).
//! - [`ConnSlot`]: what an admitted connection holds. Its floor (its fixed part: receive
//!   buffer, bookkeeping; and [`FLOOR_IO_BYTES`](super::conn::FLOOR_IO_BYTES) of requests)
//!   was reserved at start, so a new connection and its small requests always make
//!   progress, however much the others hold. Anything beyond the floor is charged request
//!   by request ([`ConnSlot::try_charge`]) and taken from the shared part in
//!   [`GRAIN_BYTES`] grains; a connection that cannot get more stops reading until its own
//!   replies drain (or, when it holds nothing, until its I/O thread's next tick). The
//!   shared part holds at least one maximum-size request, so any single request is served
//!   once the others' charges drain (they do: their clients read, or are dropped at their
//!   stall deadline). Dropping the slot gives its grants back.
//!
//! So the daemon's NBD memory is at most the budget, whatever the clients do; one
//! connection's at most `--nbd-conn-memory-mib`.

use super::limits::{NbdLimits, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_PEER};
use ember_blockdev::IoBuf;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Budget is taken and given back in grains of this size (fewer atomic operations).
pub const GRAIN_BYTES: usize = 1 << 20;
/// A connection keeps at most this much of unused grant before giving it back.
const SLACK_BYTES: usize = 4 << 20;

/// Bytes shared by all connections of a server.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Take `n` bytes if, after that, at least `headroom` bytes are left.
    pub fn try_take(&self, n: usize, headroom: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let Some(after) = cur.checked_add(n) else {
                return false;
            };
            if after.checked_add(headroom).is_none_or(|x| x > self.limit) {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Give `n` bytes back.
    pub fn give(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Who a client is, for per-peer bounds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A Unix-socket client: its uid (`SO_PEERCRED`).
    Uid(u32),
    /// A TCP client: its IP address (the port is not part of it).
    Ip(IpAddr),
    /// A Unix-socket client whose credentials could not be read.
    Unknown,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Uid(u) => write!(f, "uid {u}"),
            Peer::Ip(a) => write!(f, "{a}"),
            Peer::Unknown => f.write_str("unknown unix peer"),
        }
    }
}

/// Why a client was turned away. `Display` is the text the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// [`MAX_HANDSHAKES`] handshakes are in progress.
    Handshakes,
    /// [`MAX_HANDSHAKES_PER_PEER`] handshakes of this peer are in progress.
    PeerHandshakes,
    /// `--nbd-max-conns` connections are open.
    Conns(usize),
    /// `--nbd-max-conns-per-peer` connections of this peer are open.
    PeerConns(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Handshakes => write!(f, "too many NBD handshakes in progress"),
            Refusal::PeerHandshakes => {
                write!(f, "too many NBD handshakes in progress from this peer")
            }
            Refusal::Conns(n) => write!(f, "server busy: too many NBD connections (limit {n})"),
            Refusal::PeerConns(n) => write!(
                f,
                "server busy: too many NBD connections from this client (limit {n})"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct PeerUse {
    handshakes: usize,
    conns: usize,
}

#[derive(Debug, Default)]
struct GateState {
    handshakes: usize,
    conns: usize,
    peers: HashMap<Peer, PeerUse>,
}

/// Admission of handshakes and connections (see the module doc).
#[derive(Debug)]
pub struct Gate {
    limits: NbdLimits,
    budget: Arc<Budget>,
    state: Mutex<GateState>,
}

/// Bytes reserved per connection at start: its fixed part and its request floor.
pub const CONN_FLOOR_BYTES: usize = super::conn::FIXED_BYTES + super::conn::FLOOR_IO_BYTES;

impl Gate {
    /// A gate for `limits`, whose budget first holds `pools` bytes of idle buffers and
    /// every connection's floor; fails if what is left cannot hold one maximum-size
    /// request.
    pub fn new(limits: NbdLimits, pools: usize) -> anyhow::Result<Gate> {
        let budget = Arc::new(Budget::new(limits.memory_bytes));
        let floors = limits.max_conns.saturating_mul(CONN_FLOOR_BYTES);
        let reserved = pools.saturating_add(floors);
        let shared = super::MAX_BLOCK_BYTES as usize;
        anyhow::ensure!(
            budget.try_take(reserved, shared),
            "--nbd-memory-mib {} cannot hold {} MiB of I/O thread buffers, {} connections \
             (--nbd-max-conns) of {} KiB each and one {} MiB request: give at least {} MiB",
            limits.memory_bytes >> 20,
            pools >> 20,
            limits.max_conns,
            CONN_FLOOR_BYTES >> 10,
            shared >> 20,
            reserved.saturating_add(shared).div_ceil(1 << 20)
        );
        Ok(Gate {
            limits,
            budget,
            state: Mutex::new(GateState::default()),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &NbdLimits {
        &self.limits
    }

    /// The memory budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state is plain counters, consistent after any panic: take it back.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshakes in progress.
    pub fn handshakes(&self) -> usize {
        self.state().handshakes
    }

    /// Connections open.
    pub fn conns(&self) -> usize {
        self.state().conns
    }

    /// Start a handshake for `peer`, or say why not.
    pub fn begin_handshake(self: &Arc<Self>, peer: Peer) -> Result<HandshakeSlot, Refusal> {
        let mut st = self.state();
        if st.handshakes >= MAX_HANDSHAKES {
            return Err(Refusal::Handshakes);
        }
        let u = st.peers.entry(peer.clone()).or_default();
        if u.handshakes >= MAX_HANDSHAKES_PER_PEER {
            return Err(Refusal::PeerHandshakes);
        }
        u.handshakes += 1;
        st.handshakes += 1;
        Ok(HandshakeSlot {
            gate: self.clone(),
            peer,
        })
    }

    /// Admit a connection of `peer` (at `NBD_OPT_GO`), or say why not.
    pub fn admit(self: &Arc<Self>, peer: &Peer) -> Result<ConnSlot, Refusal> {
        let mut st = self.state();
        if st.conns >= self.limits.max_conns {
            return Err(Refusal::Conns(self.limits.max_conns));
        }
        if st
            .peers
            .get(peer)
            .is_some_and(|u| u.conns >= self.limits.max_conns_per_peer)
        {
            return Err(Refusal::PeerConns(self.limits.max_conns_per_peer));
        }
        st.conns += 1;
        st.peers.entry(peer.clone()).or_default().conns += 1;
        Ok(ConnSlot {
            gate: self.clone(),
            peer: peer.clone(),
            data_cap: self
                .limits
                .conn_memory_bytes
                .saturating_sub(super::conn::FIXED_BYTES),
            granted: 0,
            held: 0,
        })
    }

    fn release(&self, peer: &Peer, handshake: bool) {
        let mut st = self.state();
        if handshake {
            st.handshakes = st.handshakes.saturating_sub(1);
        } else {
            st.conns = st.conns.saturating_sub(1);
        }
        if let Some(u) = st.peers.get_mut(peer) {
            if handshake {
                u.handshakes = u.handshakes.saturating_sub(1);
            } else {
                u.conns = u.conns.saturating_sub(1);
            }
            if u.handshakes == 0 && u.conns == 0 {
                st.peers.remove(peer);
            }
        }
    }
}

/// A handshake in progress; dropping it frees its place.
#[derive(Debug)]
pub struct HandshakeSlot {
    gate: Arc<Gate>,
    peer: Peer,
}

impl HandshakeSlot {
    /// The peer.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.gate.release(&self.peer, true);
    }
}

/// An admitted connection: its place and its memory (see the module doc).
#[derive(Debug)]
pub struct ConnSlot {
    gate: Arc<Gate>,
    peer: Peer,
    /// Most bytes `held` may reach (the connection's limit less its fixed part).
    data_cap: usize,
    /// Taken from the budget beyond the floor.
    granted: usize,
    /// Charged now.
    held: usize,
}

impl ConnSlot {
    /// The peer.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Charge `n` bytes, taking budget if needed. False: over this connection's limit, or
    /// the budget is spent; nothing was charged.
    pub fn try_charge(&mut self, n: usize) -> bool {
        let Some(new) = self.held.checked_add(n) else {
            return false;
        };
        if new > self.data_cap {
            return false;
        }
        let covered = super::conn::FLOOR_IO_BYTES + self.granted;
        if new > covered {
            let want = (new - covered).div_ceil(GRAIN_BYTES) * GRAIN_BYTES;
            if !self.gate.budget.try_take(want, 0) {
                return false;
            }
            self.granted += want;
        }
        self.held = new;
        true
    }

    /// Give back `n` charged bytes (and any grant no longer needed beyond a little slack).
    pub fn uncharge(&mut self, n: usize) {
        self.held = self.held.saturating_sub(n);
        let need = self
            .held
            .saturating_sub(super::conn::FLOOR_IO_BYTES)
            .div_ceil(GRAIN_BYTES)
            * GRAIN_BYTES;
        let keep = if need == 0 {
            0
        } else {
            need.saturating_add(SLACK_BYTES)
        };
        if self.granted > keep {
            self.gate.budget.give(self.granted - keep);
            self.granted = keep;
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        // The floor stays reserved for the next connection.
        self.gate.budget.give(self.granted);
        self.gate.release(&self.peer, false);
    }
}

/// Buffers up to this size are pooled (in power-of-two classes); bigger ones get exactly
/// their size (rounded to 4 KiB) and are freed after use.
pub const POOLED_MAX_BYTES: usize = 1 << 20;

/// The capacity a buffer of `len` bytes gets from a [`Pool`]: what to charge for it.
pub fn buf_bytes(len: usize) -> usize {
    if len <= POOLED_MAX_BYTES {
        len.max(ember_blockdev::buf::IO_ALIGN_BYTES)
            .next_power_of_two()
    } else {
        len.div_ceil(ember_blockdev::buf::IO_ALIGN_BYTES) * ember_blockdev::buf::IO_ALIGN_BYTES
    }
}

/// An I/O thread's idle buffers, at most `cap` bytes of them (taken from the budget when
/// the server starts), in power-of-two size classes.
///
/// A buffer given back to a full pool first evicts idle buffers of the size class used
/// least recently (never its own): the pool follows the sizes in use now. Without that, a
/// pool filled by one workload (say 32 × 4 KiB) kept the next one's buffers out (the
/// eighth 1 MiB buffer of a QD8 sequential read), and each miss cost a fresh zeroed
/// allocation: an `mmap`, 256 page faults and an `munmap` per 1 MiB read.
#[derive(Debug)]
pub struct Pool {
    classes: Vec<Class>,
    idle: usize,
    cap: usize,
    /// Counts `get`s: the recency of a class's last use.
    clock: u64,
}

#[derive(Debug, Default)]
struct Class {
    bufs: Vec<IoBuf>,
    /// `clock` at this class's last `get`.
    used: u64,
}

impl Pool {
    /// A pool keeping at most `cap` idle bytes.
    pub fn new(cap: usize) -> Pool {
        Pool {
            classes: Vec::new(),
            idle: 0,
            cap,
            clock: 0,
        }
    }

    fn class(cap: usize) -> usize {
        cap.trailing_zeros() as usize
    }

    /// A buffer of `len` bytes, capacity [`buf_bytes`]`(len)`, contents unspecified.
    pub fn get(&mut self, len: usize) -> IoBuf {
        let cap = buf_bytes(len);
        if cap <= POOLED_MAX_BYTES {
            let i = Self::class(cap);
            if self.classes.len() <= i {
                self.classes.resize_with(i + 1, Class::default);
            }
            self.clock += 1;
            let c = &mut self.classes[i];
            c.used = self.clock;
            if let Some(mut b) = c.bufs.pop() {
                self.idle -= b.capacity();
                b.set_len(len);
                return b;
            }
        }
        let mut b = IoBuf::new(cap);
        b.set_len(len);
        b
    }

    /// Give a buffer back: kept if pooled-size and there is room (made by evicting other
    /// classes' idle buffers, least recently used class first), else freed.
    pub fn put(&mut self, b: IoBuf) {
        let cap = b.capacity();
        if cap > POOLED_MAX_BYTES || !cap.is_power_of_two() || cap > self.cap {
            return;
        }
        let c = Self::class(cap);
        if self.idle + cap > self.cap && !self.evict(c, self.idle + cap - self.cap) {
            return;
        }
        if self.classes.len() <= c {
            self.classes.resize_with(c + 1, Class::default);
        }
        self.idle += cap;
        self.classes[c].bufs.push(b);
    }

    /// Free at least `need` idle bytes of classes other than `keep`, least recently used
    /// class first; false (nothing freed) if they do not hold that much.
    fn evict(&mut self, keep: usize, need: usize) -> bool {
        let others: usize = self
            .classes
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != keep)
            .map(|(i, c)| c.bufs.len() << i)
            .sum();
        if others < need {
            return false;
        }
        let mut freed = 0;
        while freed < need {
            let lru = self
                .classes
                .iter()
                .enumerate()
                .filter(|&(i, c)| i != keep && !c.bufs.is_empty())
                .min_by_key(|&(_, c)| c.used)
                .map(|(i, _)| i);
            let Some(b) = lru.and_then(|i| self.classes[i].bufs.pop()) else {
                break;
            };
            freed += b.capacity();
            self.idle -= b.capacity();
        }
        true
    }

    /// Idle bytes held.
    pub fn idle(&self) -> usize {
        self.idle
    }
}

/// Logs a repeated event at most once per interval, with the count of those not logged.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)`: log now, `n` earlier events were not logged. `None`: stay quiet.
    pub fn check(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match st.0 {
            Some(t) if now.duration_since(t) < self.every => {
                st.1 += 1;
                None
            }
            _ => {
                let n = st.1;
                *st = (Some(now), 0);
                Some(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::conn::{FIXED_BYTES, FLOOR_IO_BYTES};

    fn gate(memory: usize, conns: usize, per_peer: usize) -> Arc<Gate> {
        let limits = NbdLimits {
            memory_bytes: memory,
            conn_memory_bytes: 40 << 20,
            max_conns: conns,
            max_conns_per_peer: per_peer,
            ..NbdLimits::default()
        };
        Arc::new(Gate::new(limits, 0).unwrap())
    }

    #[test]
    fn budget_never_overdraws() {
        let b = Budget::new(100);
        assert!(b.try_take(60, 0));
        assert!(!b.try_take(41, 0));
        assert!(!b.try_take(30, 20));
        assert!(b.try_take(40, 0));
        assert!(!b.try_take(1, 0));
        assert!(!b.try_take(usize::MAX, 0));
        b.give(100);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn connections_are_capped_in_all_and_per_peer() {
        let g = gate(1 << 30, 3, 2);
        let a = Peer::Uid(1);
        let b = Peer::Ip("127.0.0.2".parse().unwrap());
        let a1 = g.admit(&a).unwrap();
        let _a2 = g.admit(&a).unwrap();
        assert_eq!(g.admit(&a).unwrap_err(), Refusal::PeerConns(2));
        let _b1 = g.admit(&b).unwrap();
        assert_eq!(g.admit(&b).unwrap_err(), Refusal::Conns(3));
        assert!(g.admit(&b).unwrap_err().to_string().contains("too many"));
        drop(a1);
        let _b2 = g.admit(&b).unwrap();
        assert_eq!(g.conns(), 3);
        assert_eq!(
            g.budget().used(),
            3 * CONN_FLOOR_BYTES,
            "the floors are reserved at start, admission takes nothing more"
        );
    }

    #[test]
    fn handshakes_are_capped_per_peer_and_freed_on_drop() {
        let g = gate(1 << 30, 10, 10);
        let p = Peer::Uid(7);
        let slots: Vec<_> = (0..MAX_HANDSHAKES_PER_PEER)
            .map(|_| g.begin_handshake(p.clone()).unwrap())
            .collect();
        assert_eq!(
            g.begin_handshake(p.clone()).unwrap_err(),
            Refusal::PeerHandshakes
        );
        // Another peer still gets in.
        let other = g.begin_handshake(Peer::Uid(8)).unwrap();
        drop(slots);
        drop(other);
        assert_eq!(g.handshakes(), 0);
        assert!(g.state().peers.is_empty(), "peer entries are removed");
        let all: Vec<_> = (0..MAX_HANDSHAKES)
            .map(|i| g.begin_handshake(Peer::Uid(1000 + i as u32)).unwrap())
            .collect();
        assert_eq!(
            g.begin_handshake(Peer::Unknown).unwrap_err(),
            Refusal::Handshakes
        );
        drop(all);
    }

    #[test]
    fn the_budget_is_split_at_start_and_charges_share_the_rest() {
        let max = crate::nbd::MAX_BLOCK_BYTES as usize;
        let limits = |memory| NbdLimits {
            memory_bytes: memory,
            conn_memory_bytes: 40 << 20,
            max_conns: 2,
            max_conns_per_peer: 2,
            ..NbdLimits::default()
        };
        // Two floors and less than one maximum request: refused at start.
        let e = Gate::new(limits(2 * CONN_FLOOR_BYTES + max - 1), 0).unwrap_err();
        assert!(e.to_string().contains("give at least"), "{e}");
        assert!(Gate::new(limits(2 * CONN_FLOOR_BYTES + max), 1).is_err());
        // Room for the floors and one maximum request and a half.
        let g = Arc::new(Gate::new(limits(2 * CONN_FLOOR_BYTES + max + max / 2), 0).unwrap());
        let mut a = g.admit(&Peer::Uid(1)).unwrap();
        let mut b = g.admit(&Peer::Uid(2)).unwrap();
        // Within the floor: no budget taken.
        let used = g.budget().used();
        assert!(a.try_charge(FLOOR_IO_BYTES));
        assert_eq!(g.budget().used(), used);
        a.uncharge(FLOOR_IO_BYTES);
        // One maximum request fits in the shared part; a second, on another connection,
        // does not until the first is given back.
        assert!(a.try_charge(max));
        assert!(!b.try_charge(max));
        assert_eq!(b.held(), 0);
        // Small requests of the other connection still go through (its floor).
        assert!(b.try_charge(64 << 10));
        a.uncharge(max);
        assert_eq!(g.budget().used(), used, "an idle connection keeps no grant");
        assert!(b.try_charge(max));
        drop((a, b));
        assert_eq!(g.budget().used(), used, "the floors stay reserved");
    }

    #[test]
    fn one_connection_stays_under_its_own_limit() {
        let g = gate(1 << 30, 10, 10);
        let mut a = g.admit(&Peer::Uid(1)).unwrap();
        let cap = (40 << 20) - FIXED_BYTES;
        assert!(a.try_charge(cap - 100));
        assert!(!a.try_charge(101));
        assert!(a.try_charge(100));
        a.uncharge(cap);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn pool_keeps_at_most_its_cap() {
        let mut p = Pool::new(64 << 10);
        let bufs: Vec<_> = (0..5).map(|_| p.get(16 << 10)).collect();
        assert!(bufs
            .iter()
            .all(|b| b.capacity() == 16 << 10 && b.len() == 16 << 10));
        for b in bufs {
            p.put(b);
        }
        assert_eq!(p.idle(), 64 << 10);
        let b = p.get(10 << 10);
        assert_eq!((b.len(), b.capacity()), (10 << 10, 16 << 10));
        assert_eq!(p.idle(), 48 << 10);
        // Big buffers are exact and never pooled.
        let big = p.get((2 << 20) + 1);
        assert_eq!(big.capacity(), (2 << 20) + 4096);
        p.put(big);
        assert_eq!(p.idle(), 48 << 10);
        assert_eq!(buf_bytes(0), 4096);
        assert_eq!(buf_bytes(5000), 8192);
    }

    #[test]
    fn a_full_pool_makes_room_for_the_sizes_in_use() {
        let mut p = Pool::new(8 << 20);
        // A 4 KiB random workload leaves its buffers...
        let small: Vec<_> = (0..32).map(|_| p.get(4096)).collect();
        small.into_iter().for_each(|b| p.put(b));
        assert_eq!(p.idle(), 128 << 10);
        // ...then QD8 of 1 MiB: all eight are kept, the 4 KiB ones make room.
        let big: Vec<_> = (0..8).map(|_| p.get(1 << 20)).collect();
        let addrs: Vec<usize> = big.iter().map(|b| b.as_slice().as_ptr() as usize).collect();
        big.into_iter().for_each(|b| p.put(b));
        assert_eq!(p.idle(), 8 << 20);
        let again: Vec<_> = (0..8).map(|_| p.get(1 << 20)).collect();
        let mut got: Vec<usize> = again
            .iter()
            .map(|b| b.as_slice().as_ptr() as usize)
            .collect();
        let mut want = addrs;
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "every 1 MiB buffer came from the pool");
        again.into_iter().for_each(|b| p.put(b));
        // A class never evicts itself: a ninth 1 MiB buffer is freed, the cap holds.
        let extra = IoBuf::new(1 << 20);
        p.put(extra);
        assert_eq!(p.idle(), 8 << 20);
        // A 4 KiB buffer evicts from the other class (one 1 MiB buffer), not the cap.
        let b = p.get(4096);
        p.put(b);
        assert_eq!(p.idle(), (7 << 20) + 4096);
    }

    #[test]
    fn log_limiter_counts_what_it_swallows() {
        let l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        let l2 = LogLimiter::new(Duration::ZERO);
        assert_eq!(l2.check(), Some(0));
        assert_eq!(l2.check(), Some(0));
    }
}
