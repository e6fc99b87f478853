//! QoS: the throttle layer (per-volume IOPS and bytes/s limits).
//!
//! Design: generic cell-rate algorithm (GCRA) limiters with *reservation*. Each limiter
//! keeps a theoretical arrival time (`tat`, ns) in an `AtomicU64`; a request of cost `c`
//! moves it to `max(tat, now) + c·T` with one CAS and is released after
//! `delay = max(0, new_tat − now − τ)`, where `T = 1/rate` and `τ` is the burst window
//! (one second of rate). Limiters are shared by all I/O threads of the volume without a
//! lock: the only shared write is that CAS.
//!
//! A delayed request waits in its thread's queue (a min-heap by release time); one
//! io_uring timeout per queue wakes it. The timeout SQE's [`Tag`] has the inner queue's
//! owner id and the reserved kind [`Kind::THROTTLE`], so the front end routes it to this
//! queue like any other CQE of the stack, and the layer recognises it.

use crate::buf::Buffer;
use crate::engine::{Cqe, OwnerId, Ring};
use crate::error::Result;
use crate::request::{Completion, Op, Request};
use crate::slots::Key;
use crate::tag::{Kind, Tag};
use crate::{BlockDevice, Queue};
use io_uring::{opcode, types};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// QoS limits of a volume; `None` means unlimited. Mirrors Cinder's `qos:` specs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    /// `qos:read_iops_sec`
    pub read_iops_sec: Option<u64>,
    /// `qos:write_iops_sec`
    pub write_iops_sec: Option<u64>,
    /// `qos:total_iops_sec`
    pub total_iops_sec: Option<u64>,
    /// `qos:read_bytes_sec`
    pub read_bytes_sec: Option<u64>,
    /// `qos:write_bytes_sec`
    pub write_bytes_sec: Option<u64>,
    /// `qos:total_bytes_sec`
    pub total_bytes_sec: Option<u64>,
}

impl QosLimits {
    /// True when no limit is set (the layer is then not worth stacking).
    pub fn is_unlimited(&self) -> bool {
        *self == QosLimits::default()
    }
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let e = EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One GCRA limiter: `rate` units per second with a one-second burst.
#[derive(Debug)]
struct Gcra {
    /// Nanoseconds per unit, scaled by 2^16 for sub-ns precision at high byte rates.
    interval_scaled: u64,
    burst_ns: u64,
    tat: AtomicU64,
}

const SCALE_BITS: u32 = 16;

impl Gcra {
    fn new(rate_per_sec: u64) -> Self {
        let interval_scaled =
            ((1_000_000_000u128 << SCALE_BITS) / u128::from(rate_per_sec.max(1))) as u64;
        Gcra {
            interval_scaled: interval_scaled.max(1),
            burst_ns: 1_000_000_000,
            tat: AtomicU64::new(0),
        }
    }

    /// Reserve `units` at `now`; returns how long the caller must wait (ns).
    fn reserve(&self, now: u64, units: u64) -> u64 {
        let cost = ((u128::from(units) * u128::from(self.interval_scaled)) >> SCALE_BITS) as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(cost);
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return new_tat.saturating_sub(now).saturating_sub(self.burst_ns),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// Limiters of one volume, shared by all its queues.
#[derive(Debug, Default)]
struct Limiters {
    read_iops: Option<Gcra>,
    write_iops: Option<Gcra>,
    total_iops: Option<Gcra>,
    read_bytes: Option<Gcra>,
    write_bytes: Option<Gcra>,
    total_bytes: Option<Gcra>,
}

impl Limiters {
    fn new(l: &QosLimits) -> Self {
        Limiters {
            read_iops: l.read_iops_sec.map(Gcra::new),
            write_iops: l.write_iops_sec.map(Gcra::new),
            total_iops: l.total_iops_sec.map(Gcra::new),
            read_bytes: l.read_bytes_sec.map(Gcra::new),
            write_bytes: l.write_bytes_sec.map(Gcra::new),
            total_bytes: l.total_bytes_sec.map(Gcra::new),
        }
    }

    /// Delay (ns) before `op` of `bytes` may start. Flushes are never throttled.
    fn delay(&self, now: u64, op: Op, bytes: u64) -> u64 {
        let (iops, bw) = match op {
            Op::Flush => return 0,
            Op::Read => (&self.read_iops, &self.read_bytes),
            _ => (&self.write_iops, &self.write_bytes),
        };
        // Data-less writes (discard, write-zeroes) count as one op and no bytes.
        let bytes = if matches!(op, Op::Read | Op::Write { .. }) {
            bytes
        } else {
            0
        };
        let mut d = 0;
        for (lim, units) in [
            (iops, 1),
            (&self.total_iops, 1),
            (bw, bytes),
            (&self.total_bytes, bytes),
        ] {
            if let (Some(g), true) = (lim, units > 0) {
                d = d.max(g.reserve(now, units));
            }
        }
        d
    }
}

/// A device that delays requests to keep within [`QosLimits`].
#[derive(Debug)]
pub struct ThrottleDevice {
    inner: Arc<dyn BlockDevice>,
    limits: Arc<Limiters>,
}

impl ThrottleDevice {
    /// Wrap `inner` with `limits`.
    pub fn new(inner: Arc<dyn BlockDevice>, limits: &QosLimits) -> Self {
        ThrottleDevice {
            inner,
            limits: Arc::new(Limiters::new(limits)),
        }
    }
}

impl BlockDevice for ThrottleDevice {
    super::pass_down_geometry!();

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        let inner = self.inner.clone().queue(ring)?;
        Ok(Box::new(ThrottleQueue {
            inner,
            limits: self.limits.clone(),
            waiting: BinaryHeap::new(),
            seq: 0,
            timer: Box::new(types::Timespec::new()),
            timer_armed: false,
        }))
    }
}

struct Waiting {
    release_ns: u64,
    seq: u64,
    req: Request,
}

impl PartialEq for Waiting {
    fn eq(&self, o: &Self) -> bool {
        (self.release_ns, self.seq) == (o.release_ns, o.seq)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiting {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.release_ns, self.seq).cmp(&(o.release_ns, o.seq))
    }
}

struct ThrottleQueue {
    inner: Box<dyn Queue>,
    limits: Arc<Limiters>,
    waiting: BinaryHeap<Reverse<Waiting>>,
    seq: u64,
    /// The armed timeout's timespec; boxed so its address is stable while armed.
    timer: Box<types::Timespec>,
    timer_armed: bool,
}

impl ThrottleQueue {
    fn release_due(&mut self, ring: &mut Ring, done: &mut Vec<Completion>) {
        let now = now_ns();
        while self.waiting.peek().is_some_and(|w| w.0.release_ns <= now) {
            if let Some(Reverse(w)) = self.waiting.pop() {
                self.inner.submit(ring, w.req, done);
            }
        }
        self.arm(ring, now, done);
    }

    fn arm(&mut self, ring: &mut Ring, now: u64, done: &mut Vec<Completion>) {
        if self.timer_armed {
            return;
        }
        let Some(next) = self.waiting.peek().map(|w| w.0.release_ns) else {
            return;
        };
        let wait = next.saturating_sub(now).max(10_000);
        *self.timer = types::Timespec::new()
            .sec(wait / 1_000_000_000)
            .nsec((wait % 1_000_000_000) as u32);
        let e = opcode::Timeout::new(std::ptr::addr_of!(*self.timer))
            .build()
            .user_data(Tag::new(self.inner.owner(), Kind::THROTTLE, Key::ZERO).raw());
        // SAFETY: the timespec is boxed in self and not touched until the timeout's CQE
        // (timer_armed stays true until then); the queue outlives its in-flight SQEs
        // because front ends drain a queue before dropping it.
        match unsafe { ring.push(&e) } {
            Ok(()) => self.timer_armed = true,
            Err(_) => {
                // Cannot arm a timer: release everything now rather than strand requests.
                while let Some(Reverse(w)) = self.waiting.pop() {
                    self.inner.submit(ring, w.req, done);
                }
            }
        }
    }
}

impl Queue for ThrottleQueue {
    fn owner(&self) -> OwnerId {
        self.inner.owner()
    }

    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        let now = now_ns();
        let bytes = match &req.buf {
            Buffer::None => 0,
            b => b.len() as u64,
        };
        let delay = self.limits.delay(now, req.op, bytes);
        if delay == 0 && self.waiting.is_empty() {
            self.inner.submit(ring, req, done);
            return;
        }
        self.seq += 1;
        self.waiting.push(Reverse(Waiting {
            release_ns: now + delay,
            seq: self.seq,
            req,
        }));
        self.arm(ring, now, done);
    }

    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>) {
        if cqe.tag().kind() == Kind::THROTTLE {
            self.timer_armed = false;
            self.release_due(ring, done);
            return;
        }
        self.inner.complete(ring, cqe, done);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.waiting.len() + usize::from(self.timer_armed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::null::NullDevice;
    use crate::buf::IoBuf;
    use crate::sync::SyncDevice;

    #[test]
    fn gcra_allows_a_burst_then_paces() {
        let g = Gcra::new(100); // 100 units/s, 1 s burst
        let now = 5_000_000_000;
        // The first 100 units fit in the burst window.
        for _ in 0..100 {
            assert_eq!(g.reserve(now, 1), 0);
        }
        // The next one must wait about 10 ms.
        let d = g.reserve(now, 1);
        assert!((9_000_000..=11_000_000).contains(&d), "{d}");
    }

    #[test]
    fn limiters_pick_the_largest_delay_and_ignore_flush() {
        let l = Limiters::new(&QosLimits {
            write_bytes_sec: Some(1 << 20),
            ..Default::default()
        });
        assert_eq!(l.delay(1_000_000_000, Op::Write { fua: false }, 1 << 20), 0);
        let d = l.delay(1_000_000_000, Op::Write { fua: false }, 1 << 20);
        assert!(d >= 900_000_000, "{d}");
        assert_eq!(l.delay(1_000_000_000, Op::Flush, 0), 0);
        assert_eq!(l.delay(1_000_000_000, Op::Read, 1 << 30), 0);
    }

    #[test]
    fn throttled_requests_all_complete_paced() {
        let inner: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 20, false));
        let dev: Arc<dyn BlockDevice> = Arc::new(ThrottleDevice::new(
            inner,
            &QosLimits {
                read_iops_sec: Some(50),
                ..Default::default()
            },
        ));
        let mut s = SyncDevice::new(dev).expect("ring");
        let reqs = (0..60)
            .map(|i| Request {
                op: Op::Read,
                offset: 0,
                len: 512,
                buf: Buffer::Owned(IoBuf::new(512)),
                tag: i,
            })
            .collect();
        let t = Instant::now();
        let c = s.run(reqs).expect("run");
        assert_eq!(c.len(), 60);
        assert!(c.iter().all(|c| c.result.is_ok()));
        // 50 fit in the burst, the last 10 are paced at 50/s: at least ~150 ms in all.
        assert!(t.elapsed().as_millis() >= 150, "{:?}", t.elapsed());
    }
}
