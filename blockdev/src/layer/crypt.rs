//! The crypt layer: serves the plaintext of a LUKS volume stored on any inner device.
//!
//! - Offsets are shifted by the header's data offset; the size is the data segment's.
//! - **Writes** are encrypted into a bounce buffer from the queue's [`BufPool`] and the
//!   bounce is written; the client's buffer (owned or guest memory) is never modified and
//!   is handed back unchanged in the completion.
//! - **Reads** go straight into the client's buffer and are decrypted in place when the
//!   inner read completes. With borrowed iovecs a sector may straddle two iovecs: those
//!   sectors are gathered, decrypted and scattered back.
//! - **Write-zeroes** must read back as zeros *after decryption*, so it becomes an
//!   encrypted write of zeros, in chunks of [`ZERO_CHUNK`] bytes one after another (bounded
//!   memory whatever the range). **Discard** passes down, as dm-crypt does (a discarded
//!   range then reads as garbage). **Flush** passes down.
//! - **Block status** reports everything as allocated data: a hole or zero range on the
//!   inner device does not read as zeros through the cipher.
//! - **Hostile headers**: opening goes through `ember_crypto::open` with the caller's
//!   [`UnlockLimits`]; the layer then refuses a data segment that does not fit the device
//!   (offset, fixed size, size alignment) and an IV offset (`iv_tweak` × 512) whose sum
//!   with any device offset would overflow 64 bits. Request arithmetic (offset + data
//!   offset, offset + IV offset, offset + length) is checked in release builds too: an
//!   overflow fails that request with `EINVAL`.
//!
//! The sector cipher is shared by every queue (it is immutable); each queue has its own
//! bounce pool and in-flight table (a [`Slots`] whose [`Tag`]s are the tags of the inner
//! requests; a full table fails the request with `EAGAIN`), so the I/O path takes no
//! lock. En/decryptions of
//! [`split::SPLIT_MIN`] bytes and more (owned buffers) are shared with one helper thread
//! per device ([`split`]): the I/O thread and the helper take 64 KiB chunks from a shared
//! counter, so a 1 MiB read's decrypt uses the second core when it is free and never
//! waits for it when it is not. NBD over a Unix socket, 1M sequential QD8 on tmpfs, A/B in
//! one run on 2 cores (benches/README.md): LUKS reads 1.3-1.6x, writes 1.2-1.4x faster.

use crate::buf::{BufPool, Buffer, IoBuf};
use crate::engine::{Cqe, OwnerId, Ring};
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, DeviceInfo, Extent, Op, Request};
use crate::slots::{Key, Slots};
use crate::tag::Tag;
use crate::{BlockDevice, Queue};
use ember_crypto::{SectorCipher, UnlockLimits, Unlocked};
use split::Splitter;
use std::sync::Arc;

mod disk;
mod split;

pub use disk::DeviceDisk;

/// Write-zeroes is done as encrypted writes of at most this many bytes at a time.
pub const ZERO_CHUNK: usize = 1 << 20;

/// A LUKS volume's plaintext view of an inner device.
pub struct CryptDevice {
    inner: Arc<dyn BlockDevice>,
    cipher: Arc<SectorCipher>,
    split: Splitter,
    data_offset: u64,
    data_size: Option<u64>,
    iv_offset: u64,
    version: u8,
}

impl std::fmt::Debug for CryptDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptDevice")
            .field("inner", &self.inner)
            .field("luks_version", &self.version)
            .field("data_offset", &self.data_offset)
            .field("sector_size", &self.cipher.sector_size())
            .finish_non_exhaustive()
    }
}

impl CryptDevice {
    /// Wrap `inner` with an already unlocked volume.
    pub fn new(inner: Arc<dyn BlockDevice>, u: Unlocked) -> Result<Self> {
        let info = inner.info();
        let bad = |m: String| Err(Error::new(ErrorKind::InvalidConfig, m));
        if info.size <= u.data_offset {
            return bad(format!(
                "LUKS data offset {} is beyond the device size {}",
                u.data_offset, info.size
            ));
        }
        let ss = u.cipher.sector_size() as u64;
        if !u.data_offset.is_multiple_of(ss) || !u.iv_offset.is_multiple_of(512) {
            return bad("LUKS data offset not aligned to the encryption sector".into());
        }
        if let Some(n) = u.data_size {
            let fits = u.data_offset.checked_add(n).is_some_and(|e| e <= info.size);
            if !fits || n == 0 || !n.is_multiple_of(ss) {
                return bad(format!(
                    "LUKS data segment of {n} bytes at {} does not fit the {}-byte device \
                     in whole {ss}-byte sectors",
                    u.data_offset, info.size
                ));
            }
        }
        if u.iv_offset.checked_add(info.size).is_none() {
            return bad(format!(
                "LUKS IV offset {} plus the device size overflows 64 bits",
                u.iv_offset
            ));
        }
        let cipher = Arc::new(u.cipher);
        Ok(CryptDevice {
            inner,
            split: Splitter::new(cipher.clone()),
            cipher,
            data_offset: u.data_offset,
            data_size: u.data_size,
            iv_offset: u.iv_offset,
            version: u.version,
        })
    }

    /// Read the LUKS header on `inner`, unlock it with `passphrase` and wrap `inner`.
    pub fn open(
        inner: Arc<dyn BlockDevice>,
        passphrase: &[u8],
        limits: &UnlockLimits,
    ) -> Result<Self> {
        let mut disk = DeviceDisk::new(inner.clone())?;
        let u = ember_crypto::open(&mut disk, passphrase, limits)
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, "open LUKS volume").with_source(e))?;
        Self::new(inner, u)
    }

    /// LUKS version of the volume.
    pub fn luks_version(&self) -> u8 {
        self.version
    }

    /// Byte offset of the ciphertext on the inner device.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    fn size(&self, inner_size: u64) -> u64 {
        let avail = inner_size.saturating_sub(self.data_offset);
        let ss = self.cipher.sector_size() as u64;
        let size = self.data_size.map_or(avail, |s| s.min(avail));
        size - size % ss
    }
}

impl BlockDevice for CryptDevice {
    fn info(&self) -> DeviceInfo {
        let i = self.inner.info();
        let ss = self.cipher.sector_size() as u32;
        let lbs = i.logical_block_size.max(ss);
        DeviceInfo {
            size: self.size(i.size),
            logical_block_size: lbs,
            physical_block_size: i.physical_block_size.max(lbs),
            max_transfer: (i.max_transfer - i.max_transfer % lbs).max(lbs),
            read_only: i.read_only,
            discard: i.discard,
            // Done as encrypted writes of zeros: not an offload.
            write_zeroes: false,
            block_status: false,
        }
    }

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        let inner = self.inner.clone().queue(ring)?;
        Ok(Box::new(CryptQueue {
            dev: self,
            inner,
            pool: BufPool::new(),
            slots: Slots::new(Key::MAX_SLOTS),
            in_flight: 0,
            scratch: Vec::new(),
            backlog: std::collections::VecDeque::new(),
            draining: false,
        }))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Extent::all_data(self.info().size, offset, len)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.data_size.is_some() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "resize of a LUKS2 volume with a fixed segment size",
            ));
        }
        let total = new_size
            .checked_add(self.data_offset)
            .ok_or_else(|| Error::new(ErrorKind::InvalidConfig, "size overflow"))?;
        self.inner.resize(total)
    }
}

/// What an inner request is doing for us.
enum Pending {
    /// A read of the client's buffer at this plaintext offset; decrypt on completion.
    Read { tag: u64, offset: u64 },
    /// A write of a bounce buffer; hand the client's buffer back on completion.
    Write { tag: u64, client: Buffer },
    /// A pass-through op (flush, discard).
    Pass { tag: u64 },
    /// Write-zeroes in progress: `[next, end)` still to write.
    Zeroes { tag: u64, next: u64, end: u64 },
}

struct CryptQueue {
    dev: Arc<CryptDevice>,
    inner: Box<dyn Queue>,
    pool: BufPool,
    /// What each inner request is doing for us; bounded by the front ends' queue depths.
    slots: Slots<Pending>,
    in_flight: usize,
    scratch: Vec<Completion>,
    /// Inner completions waiting to be handled; drained iteratively so that a chain of
    /// synchronous completions (write-zeroes chunks on a synchronous device) cannot
    /// recurse.
    backlog: std::collections::VecDeque<Completion>,
    draining: bool,
}

impl CryptQueue {
    /// Record `p`; the tag for its inner request, or `p` back if the table is full.
    fn insert(&mut self, p: Pending) -> std::result::Result<u64, Pending> {
        self.slots.insert(p).map(|k| Tag::of(k).raw())
    }

    /// The cipher's offset (plain64 IV × 512) of plaintext `offset`; `None` past 2^64.
    fn cipher_offset(&self, offset: u64) -> Option<u64> {
        offset.checked_add(self.dev.iv_offset)
    }

    /// Submit one request to the inner queue and handle any synchronous completions.
    fn submit_inner(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        let mut tmp = std::mem::take(&mut self.scratch);
        self.inner.submit(ring, req, &mut tmp);
        self.backlog.extend(tmp.drain(..));
        self.scratch = tmp;
        self.drain(ring, done);
    }

    /// Handle queued inner completions (unless an outer call is already doing so).
    fn drain(&mut self, ring: &mut Ring, done: &mut Vec<Completion>) {
        if self.draining {
            return;
        }
        self.draining = true;
        while let Some(c) = self.backlog.pop_front() {
            self.finish(ring, c, done);
        }
        self.draining = false;
    }

    /// End a write-zeroes: give its chunk's bounce back and complete it.
    fn end_zeroes(
        &mut self,
        tag: u64,
        bounce: Option<IoBuf>,
        result: std::result::Result<(), i32>,
        done: &mut Vec<Completion>,
    ) {
        if let Some(b) = bounce {
            self.pool.put(b);
        }
        self.in_flight -= 1;
        done.push(Completion {
            tag,
            result,
            buf: Buffer::None,
        });
    }

    /// Start the next chunk of a write-zeroes (or complete it).
    fn zero_chunk(
        &mut self,
        ring: &mut Ring,
        tag: u64,
        next: u64,
        end: u64,
        done: &mut Vec<Completion>,
    ) {
        if next >= end {
            return self.end_zeroes(tag, None, Ok(()), done);
        }
        let len = (end - next).min(ZERO_CHUNK as u64) as usize;
        let mut bounce = self.pool.get(len);
        bounce.as_mut_slice().fill(0);
        let (Some(off), Some(inner_off)) = (
            self.cipher_offset(next),
            next.checked_add(self.dev.data_offset),
        ) else {
            return self.end_zeroes(tag, Some(bounce), Err(libc::EINVAL), done);
        };
        if self
            .dev
            .split
            .run(None, bounce.as_mut_slice(), off, true)
            .is_err()
        {
            return self.end_zeroes(tag, Some(bounce), Err(libc::EINVAL), done);
        }
        let Ok(slot) = self.insert(Pending::Zeroes {
            tag,
            next: next + len as u64,
            end,
        }) else {
            return self.end_zeroes(tag, Some(bounce), Err(libc::EAGAIN), done);
        };
        let req = Request {
            op: Op::Write { fua: false },
            offset: inner_off,
            len: len as u64,
            buf: Buffer::Owned(bounce),
            tag: slot,
        };
        self.submit_inner(ring, req, done);
    }

    /// An inner completion arrived.
    fn finish(&mut self, ring: &mut Ring, c: Completion, done: &mut Vec<Completion>) {
        let Some(p) = self.slots.remove(Tag::from_raw(c.tag).key()) else {
            tracing::error!(tag = c.tag, "crypt: completion for an unknown slot");
            return;
        };
        match p {
            Pending::Read { tag, offset } => {
                let mut buf = c.buf;
                let mut result = c.result;
                if result.is_ok() {
                    result = self.decrypt(&mut buf, offset);
                }
                self.in_flight -= 1;
                done.push(Completion { tag, result, buf });
            }
            Pending::Write { tag, client } => {
                if let Buffer::Owned(b) = c.buf {
                    self.pool.put(b);
                }
                self.in_flight -= 1;
                done.push(Completion {
                    tag,
                    result: c.result,
                    buf: client,
                });
            }
            Pending::Pass { tag } => {
                self.in_flight -= 1;
                done.push(Completion {
                    tag,
                    result: c.result,
                    buf: c.buf,
                });
            }
            Pending::Zeroes { tag, next, end } => {
                if let Buffer::Owned(b) = c.buf {
                    self.pool.put(b);
                }
                match c.result {
                    Ok(()) => self.zero_chunk(ring, tag, next, end, done),
                    Err(e) => self.end_zeroes(tag, None, Err(e), done),
                }
            }
        }
    }

    fn decrypt(&self, buf: &mut Buffer, offset: u64) -> Result<(), i32> {
        let cipher = &self.dev.cipher;
        let off = self.cipher_offset(offset).ok_or(libc::EINVAL)?;
        match buf {
            Buffer::Owned(b) => self
                .dev
                .split
                .run(None, b.as_mut_slice(), off, false)
                .map_err(|_| libc::EIO),
            Buffer::Borrowed(v) => decrypt_iovecs(cipher, v, off),
            Buffer::None => Ok(()),
        }
    }
}

/// Decrypt borrowed memory in place. Whole sectors inside one iovec are decrypted where
/// they lie; a sector straddling iovecs is gathered (first pass), decrypted, and
/// scattered back (second pass).
fn decrypt_iovecs(
    cipher: &SectorCipher,
    v: &mut crate::buf::IoVecs,
    offset: u64,
) -> Result<(), i32> {
    let ss = cipher.sector_size();
    let mut pos = 0usize; // byte position in the request
    let mut carry: Vec<u8> = Vec::new(); // partial straddling sector being gathered
    let mut straddlers: Vec<(usize, Vec<u8>)> = Vec::new(); // (position, plaintext)
    let mut err = None;
    v.for_each_mut(|piece| {
        let mut i = 0usize;
        while i < piece.len() {
            let at = pos + i;
            if !carry.is_empty() || !(at.is_multiple_of(ss)) || piece.len() - i < ss {
                // Part of a straddling sector: gather.
                let sector_start = at - at % ss;
                let need = ss - carry.len();
                let take = need.min(piece.len() - i);
                carry.extend_from_slice(&piece[i..i + take]);
                i += take;
                if carry.len() == ss {
                    let mut s = std::mem::take(&mut carry);
                    if cipher
                        .decrypt(&mut s, offset + sector_start as u64)
                        .is_err()
                    {
                        err = Some(libc::EIO);
                    }
                    straddlers.push((sector_start, s));
                }
            } else {
                let whole = (piece.len() - i) / ss * ss;
                if cipher
                    .decrypt(&mut piece[i..i + whole], offset + at as u64)
                    .is_err()
                {
                    err = Some(libc::EIO);
                }
                i += whole;
            }
        }
        pos += piece.len();
    });
    if !carry.is_empty() {
        return Err(libc::EINVAL);
    }
    if let Some(e) = err {
        return Err(e);
    }
    if straddlers.is_empty() {
        return Ok(());
    }
    let mut pos = 0usize;
    let mut next = 0usize;
    v.for_each_mut(|piece| {
        let (pstart, pend) = (pos, pos + piece.len());
        // Straddlers are in increasing order; write every part that overlaps this piece.
        while next < straddlers.len() {
            let (s_start, ref plain) = straddlers[next];
            let s_end = s_start + plain.len();
            if s_start >= pend {
                break;
            }
            let a = s_start.max(pstart);
            let b = s_end.min(pend);
            if a < b {
                piece[a - pstart..b - pstart].copy_from_slice(&plain[a - s_start..b - s_start]);
            }
            if s_end <= pend {
                next += 1;
            } else {
                break;
            }
        }
        pos = pend;
    });
    Ok(())
}

impl Queue for CryptQueue {
    fn owner(&self) -> OwnerId {
        self.inner.owner()
    }

    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        let info = self.dev.info();
        if req.op == Op::Flush {
            let Ok(slot) = self.insert(Pending::Pass { tag: req.tag }) else {
                done.push(Completion::of(req, Err(libc::EAGAIN)));
                return;
            };
            self.in_flight += 1;
            let r = Request { tag: slot, ..req };
            self.submit_inner(ring, r, done);
            return;
        }
        if let Err(e) = info.check_request(req.op, req.offset, req.len) {
            done.push(Completion::of(req, Err(e)));
            return;
        }
        let (Some(inner_off), Some(off), Some(end)) = (
            req.offset.checked_add(self.dev.data_offset),
            self.cipher_offset(req.offset),
            req.offset.checked_add(req.len),
        ) else {
            done.push(Completion::of(req, Err(libc::EINVAL)));
            return;
        };
        if matches!(req.op, Op::Read | Op::Write { .. }) && req.buf.len() as u64 != req.len {
            done.push(Completion::of(req, Err(libc::EINVAL)));
            return;
        }
        self.in_flight += 1;
        match req.op {
            Op::Read => {
                let Ok(slot) = self.insert(Pending::Read {
                    tag: req.tag,
                    offset: req.offset,
                }) else {
                    self.in_flight -= 1;
                    done.push(Completion::of(req, Err(libc::EAGAIN)));
                    return;
                };
                let r = Request {
                    offset: inner_off,
                    tag: slot,
                    ..req
                };
                self.submit_inner(ring, r, done);
            }
            Op::Write { fua } => {
                let len = req.len as usize;
                let mut bounce: IoBuf = self.pool.get(len);
                let cipher = &self.dev.cipher;
                let res = match &req.buf {
                    // One pass: encrypt straight from the client's buffer into the bounce.
                    Buffer::Owned(b) => {
                        self.dev
                            .split
                            .run(Some(b.as_slice()), bounce.as_mut_slice(), off, true)
                    }
                    Buffer::Borrowed(v) => {
                        v.copy_to(bounce.as_mut_slice());
                        cipher.encrypt(bounce.as_mut_slice(), off)
                    }
                    Buffer::None => cipher.encrypt(bounce.as_mut_slice(), off),
                };
                if res.is_err() {
                    self.pool.put(bounce);
                    self.in_flight -= 1;
                    done.push(Completion::of(req, Err(libc::EINVAL)));
                    return;
                }
                let slot = match self.insert(Pending::Write {
                    tag: req.tag,
                    client: req.buf,
                }) {
                    Ok(slot) => slot,
                    Err(p) => {
                        self.pool.put(bounce);
                        self.in_flight -= 1;
                        let buf = match p {
                            Pending::Write { client, .. } => client,
                            _ => Buffer::None,
                        };
                        done.push(Completion {
                            tag: req.tag,
                            result: Err(libc::EAGAIN),
                            buf,
                        });
                        return;
                    }
                };
                let r = Request {
                    op: Op::Write { fua },
                    offset: inner_off,
                    len: req.len,
                    buf: Buffer::Owned(bounce),
                    tag: slot,
                };
                self.submit_inner(ring, r, done);
            }
            Op::Discard => {
                let Ok(slot) = self.insert(Pending::Pass { tag: req.tag }) else {
                    self.in_flight -= 1;
                    done.push(Completion::of(req, Err(libc::EAGAIN)));
                    return;
                };
                let r = Request {
                    offset: inner_off,
                    tag: slot,
                    ..req
                };
                self.submit_inner(ring, r, done);
            }
            Op::WriteZeroes { .. } => {
                self.zero_chunk(ring, req.tag, req.offset, end, done);
            }
            Op::Flush => {}
        }
    }

    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>) {
        let mut tmp = std::mem::take(&mut self.scratch);
        self.inner.complete(ring, cqe, &mut tmp);
        self.backlog.extend(tmp.drain(..));
        self.scratch = tmp;
        self.drain(ring, done);
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests;
