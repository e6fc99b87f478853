//! The null device: reads return zeros, writes are dropped. Completes synchronously.

use crate::buf::Buffer;
use crate::engine::{Cqe, OwnerId, Ring};
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, DeviceInfo, Extent, Op, Request};
use crate::{BlockDevice, Queue};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A device that stores nothing.
#[derive(Debug)]
pub struct NullDevice {
    size: AtomicU64,
    read_only: bool,
}

impl NullDevice {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        NullDevice {
            size: AtomicU64::new(size),
            read_only,
        }
    }
}

impl BlockDevice for NullDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            read_only: self.read_only,
            ..DeviceInfo::new(self.size.load(Ordering::Relaxed), 32 << 20)
        }
    }

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        Ok(Box::new(NullQueue {
            dev: self,
            owner: ring.new_owner(),
        }))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.size.load(Ordering::Relaxed);
        if offset >= size {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                "block status past the end",
            ));
        }
        Ok(vec![Extent {
            len: len.min(size - offset),
            hole: true,
            zero: true,
        }])
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }
}

struct NullQueue {
    dev: Arc<NullDevice>,
    owner: OwnerId,
}

impl Queue for NullQueue {
    fn owner(&self) -> OwnerId {
        self.owner
    }

    fn submit(&mut self, _ring: &mut Ring, mut req: Request, done: &mut Vec<Completion>) {
        let info = self.dev.info();
        let res = info.check_request(req.op, req.offset, req.len);
        if res.is_ok() && req.op == Op::Read {
            match &mut req.buf {
                Buffer::Owned(b) => b.as_mut_slice().fill(0),
                Buffer::Borrowed(v) => v.for_each_mut(|s| s.fill(0)),
                Buffer::None => {}
            }
        }
        done.push(Completion::of(req, res));
    }

    fn complete(&mut self, _ring: &mut Ring, _cqe: Cqe, _done: &mut Vec<Completion>) {}

    fn in_flight(&self) -> usize {
        0
    }
}
