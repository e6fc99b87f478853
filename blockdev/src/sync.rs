//! A blocking driver over a device: its own ring and queue, one request at a time or a
//! batch. For control-plane work (copies, formatting), tools and tests; never the hot path.

use crate::buf::{Buffer, IoBuf};
use crate::engine::Ring;
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, Op, Request};
use crate::{BlockDevice, Queue};
use std::sync::Arc;

/// A device with a private ring, driven synchronously.
pub struct SyncDevice {
    ring: Ring,
    queue: Box<dyn Queue>,
    dev: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for SyncDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncDevice")
            .field("dev", &self.dev)
            .finish()
    }
}

fn errno_error(op: &str, offset: u64, errno: i32) -> Error {
    Error::io(
        format!("{op} at {offset}"),
        std::io::Error::from_raw_os_error(errno),
    )
}

impl SyncDevice {
    /// Drive `dev` with a new ring of 256 entries.
    pub fn new(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        let mut ring = Ring::new(256).map_err(|e| Error::io("io_uring setup", e))?;
        let queue = dev.clone().queue(&mut ring)?;
        Ok(SyncDevice { ring, queue, dev })
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Run a batch of requests; returns their completions (in completion order).
    pub fn run(&mut self, reqs: Vec<Request>) -> Result<Vec<Completion>> {
        let want = reqs.len();
        let mut done = Vec::with_capacity(want);
        for r in reqs {
            self.queue.submit(&mut self.ring, r, &mut done);
        }
        let mut cqes = Vec::new();
        while done.len() < want {
            self.ring
                .submit_and_wait(1)
                .map_err(|e| Error::io("io_uring wait", e))?;
            cqes.clear();
            self.ring.reap(&mut cqes);
            for c in cqes.drain(..) {
                if c.owner() == self.queue.owner() {
                    self.queue.complete(&mut self.ring, c, &mut done);
                }
            }
        }
        Ok(done)
    }

    fn one(&mut self, op: Op, offset: u64, len: u64, buf: Buffer) -> Result<Buffer> {
        let mut c = self.run(vec![Request {
            op,
            offset,
            len,
            buf,
            tag: 0,
        }])?;
        let c = c
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Io, "lost completion"))?;
        match c.result {
            Ok(()) => Ok(c.buf),
            Err(e) => Err(errno_error(&format!("{op:?}"), offset, e)),
        }
    }

    /// Read `len` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<IoBuf> {
        let b = self.one(Op::Read, offset, len as u64, Buffer::Owned(IoBuf::new(len)))?;
        b.into_owned()
            .ok_or_else(|| Error::new(ErrorKind::Io, "read lost its buffer"))
    }

    /// Write `data` at `offset`.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.one(
            Op::Write { fua: false },
            offset,
            len,
            Buffer::Owned(IoBuf::from_slice(data)),
        )
        .map(drop)
    }

    /// Any non-data op (flush, discard, write-zeroes).
    pub fn op(&mut self, op: Op, offset: u64, len: u64) -> Result<()> {
        self.one(op, offset, len, Buffer::None).map(drop)
    }
}
