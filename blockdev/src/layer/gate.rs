//! The gate layer: pause a volume's writes for a point-in-time copy.
//!
//! A clone or snapshot of a volume that clients are writing must equal the volume at
//! one instant; on a file system without reflinks the copy reads the live file for
//! seconds, so without a pause the first blocks of the copy are older than the last
//! ones (a torn copy). [`Gate::pause`] makes the instant: new writes (every op
//! that changes data: write, discard, write-zeroes) are **held** in their queue, the
//! writes already **in flight** are waited for (bounded by the caller's deadline),
//! and the returned [`Pause`] guard holds the gate shut until it is dropped. Reads and
//! flushes pass (a flush covers writes that completed, and a held write has not).
//!
//! The [`Gate`] (the switch) exists apart from the [`GateDevice`] that obeys it, so a
//! copy can shut the gate of a volume whose stack is not built yet: a stack built
//! during the copy starts with its writes held.
//!
//! Mechanics, lock-free on the I/O path:
//! - The gate's state: `pauses` (how many pauses are in force) and `writes` (writes
//!   submitted to the inner device and not completed, over every queue). A queue counts
//!   a write in *before* it looks at `pauses`, and a pause raises `pauses` *before* it
//!   reads `writes` (all `SeqCst`): so either the pause sees the write and waits for it,
//!   or the queue sees the pause and holds the write (the store-buffer pattern).
//! - Each queue re-tags what it passes down (a [`Slots`] entry per request: the caller's
//!   tag and whether it is a write), so it knows which completions end writes.
//! - Held requests keep their order. While a queue holds any, an io_uring timeout of
//!   [`HOLD_POLL`] wakes it (its tag has the reserved kind [`Kind::GATE`], which the
//!   throttle layer above passes down) to release them once the gate opens; a new request behind held ones
//!   waits behind them.
//!
//! Memory: held requests are those the front ends already admitted (bounded by their
//! queue depths); the gate allocates nothing per held request.

use crate::engine::{Cqe, OwnerId, Ring};
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, Request};
use crate::slots::{Key, Slots};
use crate::tag::{Kind, Tag};
use crate::{BlockDevice, Queue};
use io_uring::{opcode, types};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a queue holding requests looks whether the gate opened.
pub const HOLD_POLL: Duration = Duration::from_millis(1);

/// The switch of a gate, shared by the [`GateDevice`]s (and their queues) it governs.
#[derive(Debug, Default)]
pub struct Gate {
    /// Pauses in force (several copies of one volume may overlap).
    pauses: AtomicU64,
    /// Writes submitted to the inner device and not completed, over every queue.
    writes: AtomicU64,
}

/// The gate is shut while this lives (held writes go on when the last pause ends).
#[derive(Debug)]
#[must_use = "the volume's writes resume when the pause is dropped"]
pub struct Pause {
    state: Arc<Gate>,
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.state.pauses.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// Hold new writes and wait until every write in flight has completed: from the
    /// return until the [`Pause`] is dropped, no device behind this gate changes a
    /// byte. Fails with [`ErrorKind::Busy`] (and reopens) when writes are still in
    /// flight after `drain_timeout`.
    pub fn pause(self: &Arc<Self>, drain_timeout: Duration) -> Result<Pause> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        let pause = Pause {
            state: self.clone(),
        };
        let deadline = Instant::now() + drain_timeout;
        loop {
            let n = self.writes.load(Ordering::SeqCst);
            if n == 0 {
                return Ok(pause);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("{n} write(s) still in flight after {drain_timeout:?}"),
                ));
            }
            std::thread::sleep(HOLD_POLL);
        }
    }
}

/// A device whose writes a [`Gate`] can pause.
#[derive(Debug)]
pub struct GateDevice {
    inner: Arc<dyn BlockDevice>,
    state: Arc<Gate>,
}

impl GateDevice {
    /// Put `inner` behind `gate`.
    pub fn new(inner: Arc<dyn BlockDevice>, gate: Arc<Gate>) -> Self {
        GateDevice { inner, state: gate }
    }

    /// The gate.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.state
    }
}

impl BlockDevice for GateDevice {
    super::pass_down_geometry!();

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        Ok(Box::new(GateQueue {
            inner: self.inner.clone().queue(ring)?,
            state: self.state.clone(),
            passed: Passed {
                slots: Slots::new(Key::MAX_SLOTS),
                scratch: Vec::new(),
            },
            held: VecDeque::new(),
            timer: None,
        }))
    }
}

/// The requests a queue passed down: per slot (whose [`Tag`] it gave the inner queue),
/// the caller's tag and whether it is a write. Bounded by the front ends' queue depths.
struct Passed {
    slots: Slots<(u64, bool)>,
    /// Completions of the inner queue, before their tags are mapped back.
    scratch: Vec<Completion>,
}

impl Passed {
    /// Map `inner`'s completions back to the callers' tags into `done`; count writes
    /// out of `gate`.
    fn finish(&mut self, gate: &Gate, done: &mut Vec<Completion>) {
        for mut c in self.scratch.drain(..) {
            // The inner queue returns the tags it got: anything else is not ours.
            let Some((tag, write)) = self.slots.remove(Tag::from_raw(c.tag).key()) else {
                continue;
            };
            if write {
                gate.writes.fetch_sub(1, Ordering::SeqCst);
            }
            c.tag = tag;
            done.push(c);
        }
    }
}

struct GateQueue {
    inner: Box<dyn Queue>,
    state: Arc<Gate>,
    passed: Passed,
    held: VecDeque<Request>,
    /// The armed timeout's timespec (boxed: its address is stable while armed).
    timer: Option<Box<types::Timespec>>,
}

impl GateQueue {
    /// Pass `req` down now, or give it back when the gate is shut.
    fn try_pass(
        &mut self,
        ring: &mut Ring,
        req: Request,
        done: &mut Vec<Completion>,
    ) -> std::result::Result<(), Request> {
        let write = req.op.is_write();
        if write {
            self.state.writes.fetch_add(1, Ordering::SeqCst);
            if self.state.pauses.load(Ordering::SeqCst) > 0 {
                self.state.writes.fetch_sub(1, Ordering::SeqCst);
                return Err(req);
            }
        }
        let Ok(key) = self.passed.slots.insert((req.tag, write)) else {
            if write {
                self.state.writes.fetch_sub(1, Ordering::SeqCst);
            }
            done.push(Completion::of(req, Err(libc::EAGAIN)));
            return Ok(());
        };
        let r = Request {
            tag: Tag::of(key).raw(),
            ..req
        };
        self.inner.submit(ring, r, &mut self.passed.scratch);
        self.passed.finish(&self.state, done);
        Ok(())
    }

    /// Pass held requests down, in order, while the gate is open.
    fn release(&mut self, ring: &mut Ring, done: &mut Vec<Completion>) {
        while let Some(req) = self.held.pop_front() {
            if let Err(req) = self.try_pass(ring, req, done) {
                self.held.push_front(req);
                break;
            }
        }
        self.arm(ring, done);
    }

    /// Keep a timeout armed while requests are held.
    fn arm(&mut self, ring: &mut Ring, done: &mut Vec<Completion>) {
        if self.timer.is_some() || self.held.is_empty() {
            return;
        }
        let timer = Box::new(types::Timespec::new().nsec(HOLD_POLL.subsec_nanos()));
        let e = opcode::Timeout::new(std::ptr::addr_of!(*timer))
            .build()
            .user_data(Tag::new(self.inner.owner(), Kind::GATE, Key::ZERO).raw());
        // SAFETY: the timespec is boxed and kept in `self.timer` untouched until the
        // timeout's CQE takes it out (in_flight() counts it meanwhile, so front ends keep
        // the queue until it is reaped).
        match unsafe { ring.push(&e) } {
            Ok(()) => self.timer = Some(timer),
            Err(_) => {
                // No timer: fail the held requests rather than strand them.
                for req in self.held.drain(..) {
                    done.push(Completion::of(req, Err(libc::EAGAIN)));
                }
            }
        }
    }
}

impl Queue for GateQueue {
    fn owner(&self) -> OwnerId {
        self.inner.owner()
    }

    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        if !self.held.is_empty() {
            // Keep the order: behind the held ones (released as soon as the gate opens).
            self.held.push_back(req);
            self.release(ring, done);
            return;
        }
        if let Err(req) = self.try_pass(ring, req, done) {
            self.held.push_back(req);
            self.arm(ring, done);
        }
    }

    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>) {
        if cqe.tag().kind() == Kind::GATE {
            self.timer = None;
            self.release(ring, done);
            return;
        }
        self.inner.complete(ring, cqe, &mut self.passed.scratch);
        self.passed.finish(&self.state, done);
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len() + usize::from(self.timer.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::SyncDevice;
    use crate::test_util::file_device;
    use std::os::unix::fs::FileExt;

    fn file_dev(dir: &tempfile::TempDir) -> (std::path::PathBuf, Arc<GateDevice>) {
        let (path, dev) = file_device(dir, "v.img", &[0; 1 << 20], false);
        (path, Arc::new(GateDevice::new(dev, Arc::default())))
    }

    #[test]
    fn a_pause_holds_writes_and_lets_reads_through() {
        let dir = tempfile::tempdir().unwrap();
        let (path, gate) = file_dev(&dir);
        let pause = gate.gate().pause(Duration::from_secs(30)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gate.clone();
        let writer = std::thread::spawn(move || {
            let mut d = SyncDevice::new(g).unwrap();
            // A read passes while the gate is shut.
            assert_eq!(d.read_at(0, 4096).unwrap().as_slice(), &[0; 4096][..]);
            tx.send("read").unwrap();
            d.write_at(0, &[0x5a; 4096]).unwrap();
            tx.send("written").unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), "read");
        // The write is held: give it ample time to (wrongly) go through.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        let f = std::fs::File::open(&path).unwrap();
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0), "a held write reached the file");
        drop(pause);
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), "written");
        writer.join().unwrap();
        f.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn held_writes_all_complete_with_their_tags() {
        let dir = tempfile::tempdir().unwrap();
        let (_, gate) = file_dev(&dir);
        let pause = gate.gate().pause(Duration::from_secs(30)).unwrap();
        let g = gate.clone();
        let writer = std::thread::spawn(move || {
            let mut d = SyncDevice::new(g).unwrap();
            let reqs = (0..3u8)
                .map(|i| Request {
                    op: crate::request::Op::Write { fua: false },
                    offset: u64::from(i) * 4096,
                    len: 4096,
                    buf: crate::buf::Buffer::Owned(crate::buf::IoBuf::from_slice(&[i; 4096])),
                    tag: 100 + u64::from(i),
                })
                .collect();
            let done = d.run(reqs).unwrap();
            let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            assert_eq!(tags, vec![100, 101, 102]);
            assert!(done.iter().all(|c| c.result.is_ok()));
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(pause);
        writer.join().unwrap();
    }

    #[test]
    fn a_stack_built_during_a_pause_starts_shut() {
        let dir = tempfile::tempdir().unwrap();
        let (_, first) = file_dev(&dir);
        let gate = first.gate().clone();
        let pause = gate.pause(Duration::from_secs(30)).unwrap();
        let (_, dev) = file_device(&dir, "v.img", &[], false);
        let later = Arc::new(GateDevice::new(dev, gate));
        let (tx, rx) = std::sync::mpsc::channel();
        let w = std::thread::spawn(move || {
            SyncDevice::new(later)
                .unwrap()
                .write_at(0, &[7; 4096])
                .unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "held");
        drop(pause);
        rx.recv_timeout(Duration::from_secs(60)).unwrap();
        w.join().unwrap();
    }

    #[test]
    fn open_gate_counts_nothing_left_over() {
        let dir = tempfile::tempdir().unwrap();
        let (_, gate) = file_dev(&dir);
        let mut d = SyncDevice::new(gate.clone()).unwrap();
        for i in 0..8u64 {
            d.write_at(i * 4096, &[1; 4096]).unwrap();
        }
        assert_eq!(gate.state.writes.load(Ordering::SeqCst), 0);
        // With nothing in flight a pause is immediate.
        drop(gate.gate().pause(Duration::from_millis(1)).unwrap());
    }
}
