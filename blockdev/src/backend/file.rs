//! The file backend: a regular file or a host block device, driven through io_uring.
//!
//! - Read/write: `IORING_OP_READ`/`WRITE` for owned buffers, `READV`/`WRITEV` for borrowed
//!   iovecs (zero copy into guest memory). FUA is `RWF_DSYNC` on the write itself.
//!   Short transfers are resubmitted for the remainder.
//! - O_DIRECT when the file system allows it. Borrowed iovecs that are not aligned to the
//!   logical block size go through an aligned bounce buffer, since O_DIRECT needs it.
//! - Flush = `fdatasync`. Discard = `fallocate(PUNCH_HOLE|KEEP_SIZE)` on files and
//!   `BLKDISCARD` on devices. Write-zeroes = punch hole when unmapping is allowed, else
//!   `fallocate(ZERO_RANGE)`; where the file system lacks it (tmpfs), zeros are written.
//! - Block status = `SEEK_DATA`/`SEEK_HOLE`.
//!
//! ## Host block devices (FC and kernel-iSCSI LUNs, `/dev/mapper/…`, loop devices)
//! - Size, logical and physical block size come from `BLKGETSIZE64`, `BLKSSZGET` and
//!   `BLKPBSZGET`. Offsets and lengths must be multiples of the logical block size (the
//!   request gets `EINVAL` otherwise, [`DeviceInfo::check_range`]); with O_DIRECT,
//!   borrowed memory that is not aligned to it goes through a bounce buffer.
//! - Discard is the block layer's discard: `BLOCK_URING_CMD_DISCARD` through the ring
//!   (Linux ≥ 6.12, asynchronous), else the `BLKDISCARD` ioctl on the I/O thread. A
//!   device whose queue reports `discard_max_bytes` 0 does not offer discard.
//! - Write-zeroes is `fallocate` on the device node, which the kernel turns into the same
//!   call as `BLKZEROOUT` (`blkdev_issue_zeroout`), asynchronously through the ring:
//!   `PUNCH_HOLE` (zeroing that may unmap) when unmapping is allowed, `ZERO_RANGE`
//!   otherwise, falling back from the first to the second and then to writing zeros
//!   when the device cannot offload it.
//! - The LUN's identity is read from sysfs (`/sys/dev/block/M:m/device/vpd_pg83`,
//!   `vpd_pg80`, `wwid`; the whole disk's for a partition) and parsed with
//!   [`scsi`](super::scsi): see [`FileDevice::identity`]. Devices without SCSI pages (loop,
//!   device-mapper) have none.
//! - A block device is grown by whoever owns it (the array, `losetup -c`); `resize`
//!   re-reads its size (`BLKGETSIZE64`) and takes it when it is at least the size asked.
//! - A device that ends before the size it serves (its LUN removed, a loop device whose
//!   file shrank) fails reads past its end with `EIO` (a file reads zeros there); the
//!   data plane's health check ([`BlockDevice::check`]) reports it: the size dropped, or
//!   the first block does not read.
//! - Paths that appear late (an FC rescan, a multipath map being built) are waited for
//!   up to [`OpenOptions::wait`] (URI `?wait=SECONDS`), polling every 100 ms.
//! - tmpfs cannot do non-blocking buffered I/O, so io_uring would hand every read and
//!   write to an io-wq kernel thread (a wake-up and a context switch per request). Its
//!   data is in memory, so on tmpfs reads and writes are done inline with
//!   `preadv2`/`pwritev2` instead: a plain copy, several times cheaper. Large requests
//!   still go through io_uring, where the hand-off pays for itself.
//! - Large tmpfs reads carry `IOSQE_ASYNC`. io-wq only adds a worker when all of its
//!   workers sleep; a tmpfs copy never sleeps, so without it every large read of a ring
//!   queued behind one worker on one core (measured: vhost-user-blk 1 MiB reads at QD8
//!   kept one `iou-wrk` thread at 83% of a core while the other core idled). With ASYNC
//!   io-wq starts a worker per queued read, so each ring's io-wq is capped
//!   (`IORING_REGISTER_IOWQ_MAX_WORKERS`; tmpfs reads count as unbounded work) at the CPUs
//!   shared out among the live tmpfs queues: 8 workers on 2 cores had a 3× worse p99
//!   than 2. Writes stay as they were: io-wq serialises buffered writes per inode and
//!   tmpfs holds the inode lock for the copy, so no submission trick parallelises them.

use crate::backend::scsi::{self, LunIdentity};
use crate::backend::{Direct, OpenOptions};
use crate::buf::{Buffer, IoBuf};
use crate::engine::{Cqe, OwnerId, Ring};
use crate::error::{Error, ErrorKind, Result};
use crate::request::{Completion, DeviceInfo, Extent, Op, Request};
use crate::slots::{Key, Slots};
use crate::sys;
use crate::tag::{Kind, Tag};
use crate::{BlockDevice, Queue};
use io_uring::{opcode, squeue, types};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Largest single transfer this backend accepts.
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;
/// Chunk used when write-zeroes has to write real zeros.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// `BLOCK_URING_CMD_DISCARD` (`_IO(0x12, 0)`, Linux ≥ 6.12).
const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;
/// How often a missing path is looked for while waiting for it.
const PATH_POLL_MS: u64 = 100;
/// Largest request done inline on tmpfs. Bigger ones go through io_uring (io-wq), so the
/// copy runs on another core while the submitting thread moves on: a large copy is worth
/// the hand-off, and it overlaps with the front end's socket I/O.
const INLINE_MAX_BYTES: u64 = 128 << 10;
/// `statfs.f_type` of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A regular file or block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: AtomicU64,
    direct: bool,
    read_only: bool,
    block_device: bool,
    logical_block_size: u32,
    physical_block_size: u32,
    /// Discard is offered (files always; devices whose queue has `discard_max_bytes` > 0).
    discard: bool,
    /// The kernel rejected `BLOCK_URING_CMD_DISCARD`: use the ioctl.
    no_uring_discard: std::sync::atomic::AtomicBool,
    /// Identity of the LUN behind a block device (sysfs VPD pages).
    identity: Option<LunIdentity>,
    /// Reads and writes are done inline (tmpfs, see the module doc).
    inline_io: bool,
}

impl FileDevice {
    /// Open `path` with `opts`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        let ctx = || format!("open {}", path.display());
        let meta = wait_for_path(path, opts.wait).map_err(|e| Error::io(ctx(), e))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("{}: not a file", ctx()),
            ));
        }
        let try_open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(!opts.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match opts.direct {
            Direct::Off => (try_open(false).map_err(|e| Error::io(ctx(), e))?, false),
            Direct::On => (try_open(true).map_err(|e| Error::io(ctx(), e))?, true),
            Direct::Auto => match try_open(true) {
                // tmpfs accepts O_DIRECT (Linux ≥ 6.6) but it only costs there: the data
                // lives in the page cache anyway, and it rules out inline I/O.
                Ok(f) if !block_device && is_tmpfs(&f) => {
                    tracing::info!(path = %path.display(), "tmpfs: using buffered inline I/O");
                    (try_open(false).map_err(|e| Error::io(ctx(), e))?, false)
                }
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %path.display(), "O_DIRECT not supported here; using buffered I/O");
                    (try_open(false).map_err(|e| Error::io(ctx(), e))?, false)
                }
                Err(e) => return Err(Error::io(ctx(), e)),
            },
        };
        let (size, lbs, pbs) = if block_device {
            let fd = file.as_fd();
            let size = sys::blk_size(fd).map_err(|e| Error::io(ctx(), e))?;
            let lbs = sys::blk_logical_block_size(fd)
                .map_err(|e| Error::io(format!("{}: logical block size (BLKSSZGET)", ctx()), e))?;
            let pbs = sys::blk_physical_block_size(fd).unwrap_or(0);
            let lbs = u32::try_from(lbs).unwrap_or(0);
            if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("{}: logical block size {lbs} is not supported", ctx()),
                ));
            }
            if !size.is_multiple_of(u64::from(lbs)) {
                tracing::warn!(path = %path.display(), size, lbs, "device size is not a multiple of its block size; the tail is not served");
            }
            (size - size % u64::from(lbs), lbs, pbs.max(lbs))
        } else {
            (meta.len(), 512, 4096)
        };
        let sys = block_device.then(|| sysfs_dir(&meta)).flatten();
        let discard = match &sys {
            Some(d) => read_sys_u64(&d.join("queue/discard_max_bytes")).is_none_or(|n| n > 0),
            None => true,
        };
        let identity = sys.as_deref().and_then(read_identity);
        if block_device {
            tracing::info!(
                path = %path.display(),
                size,
                logical_block_size = lbs,
                physical_block_size = pbs,
                discard,
                identity = %identity.as_ref().map_or_else(|| "none".to_string(), ToString::to_string),
                "opened block device"
            );
        }
        let inline_io = !direct && !block_device && is_tmpfs(&file);
        Ok(FileDevice {
            inline_io,
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            direct,
            read_only: opts.read_only,
            block_device,
            logical_block_size: lbs,
            physical_block_size: pbs,
            discard,
            no_uring_discard: std::sync::atomic::AtomicBool::new(false),
            identity,
        })
    }

    /// The identity of the LUN behind a block device (VPD 0x83 designators and serial
    /// from sysfs); `None` for files and for devices without SCSI pages.
    pub fn identity(&self) -> Option<&LunIdentity> {
        self.identity.as_ref()
    }

    /// Whether this is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether O_DIRECT is in use.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn lseek(&self, off: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        sys::lseek(self.file.as_fd(), off, whence)
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size.load(Ordering::Acquire),
            logical_block_size: self.logical_block_size,
            physical_block_size: self.physical_block_size,
            max_transfer: MAX_TRANSFER_BYTES,
            read_only: self.read_only,
            discard: self.discard,
            write_zeroes: true,
            block_status: !self.block_device,
        }
    }

    fn queue(self: Arc<Self>, ring: &mut Ring) -> Result<Box<dyn Queue>> {
        let owner = ring.new_owner();
        if self.inline_io {
            TMPFS_QUEUES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Box::new(FileQueue {
            dev: self,
            owner,
            slots: Slots::new(Key::MAX_SLOTS),
            iowq_cap: 0,
        }))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.size.load(Ordering::Acquire);
        if offset >= size || len == 0 {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                "block status past the end",
            ));
        }
        let end = offset.saturating_add(len).min(size);
        if self.block_device {
            return Ok(vec![Extent {
                len: end - offset,
                hole: false,
                zero: false,
            }]);
        }
        let io = |e| Error::io(format!("seek {}", self.path.display()), e);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 256 {
            let data = self
                .lseek(pos, libc::SEEK_DATA)
                .map_err(io)?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                out.push(Extent {
                    len: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = self
                .lseek(pos, libc::SEEK_HOLE)
                .map_err(io)?
                .unwrap_or(end)
                .min(end);
            let hole = hole.max(pos + 1).min(end);
            out.push(Extent {
                len: hole - pos,
                hole: false,
                zero: false,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn identity(&self) -> Option<LunIdentity> {
        self.identity.clone()
    }

    /// A block device (a LUN) is checked: its size must not have dropped below the
    /// size it serves (a LUN removed from the host, a loop device whose file went
    /// away and was re-read with `losetup -c`, both read as 0 bytes), and its first
    /// logical block must read (a path that answers `EIO`). Files: nothing to check.
    fn check(&self) -> Result<()> {
        if !self.block_device {
            return Ok(());
        }
        let what = self.path.display();
        let now = sys::blk_size(self.file.as_fd())
            .map_err(|e| Error::io(format!("size of {what}"), e))?;
        let serves = self.size.load(Ordering::Acquire);
        if now < serves {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "{what} is now {now} bytes, not the {serves} it serves (the LUN was removed \
                     or shrunk under the volume)"
                ),
            ));
        }
        let mut buf = IoBuf::new(self.logical_block_size as usize);
        let n = self
            .file
            .read_at(buf.as_mut_slice(), 0)
            .map_err(|e| Error::io(format!("read the first block of {what}"), e))?;
        if n != buf.len() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{what}: the first block reads {n} bytes"),
            ));
        }
        Ok(())
    }

    /// A file is grown (or shrunk) to `new_size`. A block device cannot be resized from
    /// here: the array (or `losetup -c`, a multipath map reload) grows it; this re-reads
    /// its size and takes it when it is at least `new_size`.
    fn resize(&self, new_size: u64) -> Result<()> {
        if self.block_device {
            let size = sys::blk_size(self.file.as_fd())
                .map_err(|e| Error::io(format!("size of {}", self.path.display()), e))?;
            let size = size - size % u64::from(self.logical_block_size);
            if size < new_size {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "{} is {size} bytes; grow it to {new_size} bytes first",
                        self.path.display()
                    ),
                ));
            }
            let old = self.size.swap(size, Ordering::AcqRel);
            if old != size {
                tracing::info!(path = %self.path.display(), old, new = size, "block device grew");
            }
            return Ok(());
        }
        self.file
            .set_len(new_size)
            .map_err(|e| Error::io(format!("resize {}", self.path.display()), e))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

/// One request in flight. Everything an SQE points to lives here until its CQE.
struct Slot {
    tag: u64,
    op: Op,
    offset: u64,
    len: u64,
    /// Bytes already transferred (short I/O, zero-fill fallback).
    done: u64,
    buf: Buffer,
    /// Aligned stand-in for a misaligned borrowed buffer (O_DIRECT).
    bounce: Option<IoBuf>,
    /// Iovecs for a resubmitted remainder of a borrowed transfer.
    iov_rest: Vec<libc::iovec>,
    /// Zeros written when the file system cannot zero a range itself.
    zeros: Option<IoBuf>,
    /// Write-zeroes with unmapping allowed fell back to `ZERO_RANGE`.
    no_punch: bool,
}

struct FileQueue {
    dev: Arc<FileDevice>,
    owner: OwnerId,
    /// Requests in flight, by the key in their SQE's [`Tag`]. Bounded by the front ends'
    /// queue depths; a full table fails the request with `EAGAIN`.
    slots: Slots<Slot>,
    /// io-wq worker limit last set on the ring (tmpfs; 0: not yet).
    iowq_cap: u32,
}

impl Drop for FileQueue {
    fn drop(&mut self) {
        if self.dev.inline_io {
            TMPFS_QUEUES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl FileQueue {
    fn finish(
        &mut self,
        key: Key,
        result: std::result::Result<(), i32>,
        done: &mut Vec<Completion>,
    ) {
        if let Some(mut s) = self.slots.remove(key) {
            if let (Ok(()), Op::Read, Some(b), Buffer::Borrowed(v)) =
                (result, s.op, &s.bounce, &mut s.buf)
            {
                v.copy_from(b.as_slice());
            }
            done.push(Completion {
                tag: s.tag,
                result,
                buf: s.buf,
            });
        }
    }

    /// Build and push the SQE for the current state of slot `key`.
    fn issue(&mut self, ring: &mut Ring, key: Key) -> std::result::Result<(), i32> {
        let fd = types::Fd(self.dev.file.as_raw_fd());
        let ud = Tag::new(self.owner, Kind::IO, key).raw();
        let Some(s) = self.slots.get_mut(key) else {
            return Err(libc::EINVAL);
        };
        let off = s.offset + s.done;
        let rest = s.len - s.done;
        let entry = match s.op {
            Op::Read | Op::Write { .. } => {
                let rest32 = u32::try_from(rest).map_err(|_| libc::EINVAL)?;
                let skip = usize::try_from(s.done).map_err(|_| libc::EINVAL)?;
                let write = s.op != Op::Read;
                let rw_flags = if s.op == (Op::Write { fua: true }) {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                let contiguous: Option<*mut u8> = match (&mut s.bounce, &mut s.buf) {
                    (Some(b), _) | (None, Buffer::Owned(b)) => {
                        // SAFETY: skip < len ≤ buffer length, so the pointer stays inside it.
                        Some(unsafe { b.as_mut_ptr().add(skip) })
                    }
                    _ => None,
                };
                if let Some(ptr) = contiguous {
                    if write {
                        opcode::Write::new(fd, ptr, rest32)
                            .offset(off)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        opcode::Read::new(fd, ptr, rest32).offset(off).build()
                    }
                } else if let Buffer::Borrowed(v) = &s.buf {
                    let (ptr, cnt) = if skip == 0 {
                        (v.iovecs().as_ptr(), v.iovecs().len())
                    } else {
                        s.iov_rest = skip_iovecs(v.iovecs(), skip);
                        (s.iov_rest.as_ptr(), s.iov_rest.len())
                    };
                    let cnt = u32::try_from(cnt).map_err(|_| libc::EINVAL)?;
                    if write {
                        opcode::Writev::new(fd, ptr, cnt)
                            .offset(off)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        opcode::Readv::new(fd, ptr, cnt).offset(off).build()
                    }
                } else {
                    return Err(libc::EINVAL);
                }
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Discard if self.dev.block_device => {
                // The command's 16 bytes overlay the SQE's addr3: the length.
                let mut cmd = [0u8; 16];
                cmd[..8].copy_from_slice(&rest.to_le_bytes());
                opcode::UringCmd16::new(fd, BLOCK_URING_CMD_DISCARD)
                    .addr(Some(off))
                    .cmd(cmd)
                    .build()
            }
            Op::Discard => opcode::Fallocate::new(fd, rest)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Op::WriteZeroes { unmap: true } if !s.no_punch => opcode::Fallocate::new(fd, rest)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Op::WriteZeroes { .. } => {
                if let Some(z) = &mut s.zeros {
                    let n = u32::try_from(rest.min(z.len() as u64)).map_err(|_| libc::EINVAL)?;
                    opcode::Write::new(fd, z.as_mut_ptr(), n)
                        .offset(off)
                        .build()
                } else {
                    opcode::Fallocate::new(fd, rest)
                        .offset(off)
                        .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                        .build()
                }
            }
        };
        let mut entry = entry.user_data(ud);
        if self.dev.inline_io && s.op == Op::Read {
            // tmpfs: the kernel's non-blocking attempt always fails and the read is
            // punted to io-wq anyway. Without ASYNC, io-wq adds a worker only when all of
            // its workers sleep, and a tmpfs copy never sleeps: every large read of the
            // ring would queue behind one worker on one core. ASYNC marks the work
            // concurrent, so io-wq starts workers up to the ring's cap (module doc).
            // Writes gain nothing: io-wq serialises buffered writes per inode.
            entry = entry.flags(squeue::Flags::ASYNC);
        }
        // SAFETY: every pointer in `entry` points into slot `key` (its buffer, bounce
        // buffer, iov_rest or zeros, all heap memory that does not move with the table),
        // which stays in `self.slots` until `complete` reaps the CQE with this user_data;
        // the fd is owned by `self.dev`, kept alive by the Arc.
        unsafe { ring.push(&entry) }.map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))
    }

    fn discard_block_device(&self, offset: u64, len: u64) -> std::result::Result<(), i32> {
        sys::blk_discard(self.dev.file.as_fd(), offset, len)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Live queues of tmpfs-backed devices in this process (one per I/O thread and device).
static TMPFS_QUEUES: AtomicUsize = AtomicUsize::new(0);

/// The io-wq worker cap for a thread serving tmpfs reads: the CPUs shared out among the
/// live tmpfs queues, at least one. More copying threads than cores only adds time
/// slicing and cache misses (8 workers on 2 cores measured a 3× worse p99 than 2).
fn iowq_cap() -> u32 {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cpus = *CPUS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let queues = TMPFS_QUEUES.load(Ordering::Relaxed).max(1);
    u32::try_from((cpus / queues).max(1)).unwrap_or(1)
}

/// Limit the calling thread's io-wq workers (bounded and unbounded: tmpfs reads count as
/// unbounded work) on `ring` to `n`. Best effort: an old kernel without
/// `IORING_REGISTER_IOWQ_MAX_WORKERS` keeps its default. Returns whether it was set.
fn limit_iowq_workers(ring: &mut Ring, n: u32) -> bool {
    match ring.set_iowq_max_workers(n) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("io-wq worker limit not set: {e}");
            false
        }
    }
}

/// Whether `file` lives on tmpfs.
fn is_tmpfs(file: &File) -> bool {
    sys::fs_type(file.as_fd()).is_ok_and(|t| t == TMPFS_MAGIC)
}

/// Read or write `buf` at `offset` with blocking syscalls (see the module doc: tmpfs).
fn inline_rw(fd: i32, op: Op, offset: u64, buf: &mut Buffer) -> std::result::Result<(), i32> {
    let flags = if op == (Op::Write { fua: true }) {
        libc::RWF_DSYNC
    } else {
        0
    };
    let iovs: Vec<libc::iovec> = match buf {
        Buffer::Owned(b) => {
            // The common case: one contiguous buffer, no allocation.
            let one = [libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }];
            return inline_iovecs(fd, op, offset, flags, &one);
        }
        Buffer::Borrowed(v) => v.iovecs().to_vec(),
        Buffer::None => return Ok(()),
    };
    inline_iovecs(fd, op, offset, flags, &iovs)
}

fn inline_iovecs(
    fd: i32,
    op: Op,
    offset: u64,
    flags: libc::c_int,
    iovs: &[libc::iovec],
) -> std::result::Result<(), i32> {
    let total: usize = iovs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    let mut rest: Option<Vec<libc::iovec>> = None;
    while done < total {
        let cur = rest.as_deref().unwrap_or(iovs);
        let off = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or(libc::EINVAL)?;
        let cnt = libc::c_int::try_from(cur.len().min(1024)).map_err(|_| libc::EINVAL)?;
        // SAFETY: the iovecs describe the request's buffer (an owned buffer, or borrowed
        // memory whose creator guaranteed validity until completion), which outlives
        // this call.
        let n = unsafe {
            if op == Op::Read {
                libc::preadv2(fd, cur.as_ptr(), cnt, off, 0)
            } else {
                libc::pwritev2(fd, cur.as_ptr(), cnt, off, flags)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            if op != Op::Read {
                return Err(libc::EIO);
            }
            // End of file (the file shrank under us): the rest reads as zeros.
            for v in skip_iovecs(iovs, done) {
                // SAFETY: as above; the iovec lies inside the request's buffer.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(());
        }
        done += n.unsigned_abs();
        if done < total {
            rest = Some(skip_iovecs(iovs, done));
        }
    }
    Ok(())
}

/// The iovecs of `iovs` after skipping `skip` bytes.
fn skip_iovecs(iovs: &[libc::iovec], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iovs.len());
    for v in iovs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: skip < iov_len, so the result stays inside the iovec's memory.
        let base = unsafe { v.iov_base.cast::<u8>().add(skip) };
        out.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    out
}

fn misaligned(buf: &Buffer, align: usize) -> bool {
    match buf {
        Buffer::Borrowed(v) => v.iovecs().iter().any(|i| {
            !(i.iov_base as usize).is_multiple_of(align) || !i.iov_len.is_multiple_of(align)
        }),
        _ => false,
    }
}

impl Queue for FileQueue {
    fn owner(&self) -> OwnerId {
        self.owner
    }

    fn submit(&mut self, ring: &mut Ring, req: Request, done: &mut Vec<Completion>) {
        let info = self.dev.info();
        let check = info.check_request(req.op, req.offset, req.len);
        let check = check.and_then(|()| match req.op {
            Op::Read | Op::Write { .. } if req.buf.len() as u64 != req.len => Err(libc::EINVAL),
            Op::Read | Op::Write { .. } if req.len > u64::from(info.max_transfer) => {
                Err(libc::EOVERFLOW)
            }
            _ => Ok(()),
        });
        if let Err(e) = check {
            done.push(Completion::of(req, Err(e)));
            return;
        }
        if req.len == 0 && req.op != Op::Flush {
            done.push(Completion::of(req, Ok(())));
            return;
        }
        if req.op == Op::Discard && !self.dev.discard {
            done.push(Completion::of(req, Err(libc::EOPNOTSUPP)));
            return;
        }
        if req.op == Op::Discard
            && self.dev.block_device
            && self.dev.no_uring_discard.load(Ordering::Relaxed)
        {
            let r = self.discard_block_device(req.offset, req.len);
            done.push(Completion::of(req, r));
            return;
        }
        if self.dev.inline_io
            && matches!(req.op, Op::Read | Op::Write { .. })
            && req.len <= INLINE_MAX_BYTES
        {
            let mut req = req;
            let r = inline_rw(self.dev.file.as_raw_fd(), req.op, req.offset, &mut req.buf);
            done.push(Completion::of(req, r));
            return;
        }
        if self.dev.inline_io && req.op == Op::Read {
            let cap = iowq_cap();
            if cap != self.iowq_cap && limit_iowq_workers(ring, cap) {
                self.iowq_cap = cap;
            }
        }
        let mut bounce = None;
        if matches!(req.op, Op::Read | Op::Write { .. })
            && self.dev.direct
            && misaligned(&req.buf, info.logical_block_size as usize)
        {
            let mut b = IoBuf::new(req.buf.len());
            if let (Op::Write { .. }, Buffer::Borrowed(v)) = (req.op, &req.buf) {
                v.copy_to(b.as_mut_slice());
            }
            bounce = Some(b);
        }
        let slot = Slot {
            tag: req.tag,
            op: req.op,
            offset: req.offset,
            len: req.len,
            done: 0,
            buf: req.buf,
            bounce,
            iov_rest: Vec::new(),
            zeros: None,
            no_punch: false,
        };
        let key = match self.slots.insert(slot) {
            Ok(key) => key,
            Err(s) => {
                done.push(Completion {
                    tag: s.tag,
                    result: Err(libc::EAGAIN),
                    buf: s.buf,
                });
                return;
            }
        };
        if let Err(e) = self.issue(ring, key) {
            self.finish(key, Err(e), done);
        }
    }

    fn complete(&mut self, ring: &mut Ring, cqe: Cqe, done: &mut Vec<Completion>) {
        let tag = cqe.tag();
        let key = tag.key();
        let Some(s) = self.slots.get_mut(key).filter(|_| tag.kind() == Kind::IO) else {
            tracing::warn!(user_data = cqe.user_data, "completion for an unknown slot");
            return;
        };
        if cqe.result < 0 {
            let errno = -cqe.result;
            let unsupported = matches!(errno, libc::EOPNOTSUPP | libc::EINVAL);
            if s.op == Op::Discard && self.dev.block_device && unsupported {
                // A kernel without BLOCK_URING_CMD_DISCARD (< 6.12): use the ioctl from
                // now on. (A device without discard fails the same way there.)
                self.dev.no_uring_discard.store(true, Ordering::Relaxed);
                let (offset, len) = (s.offset, s.len);
                let r = self.discard_block_device(offset, len);
                self.finish(key, r, done);
                return;
            }
            if s.op == (Op::WriteZeroes { unmap: true }) && !s.no_punch && unsupported {
                // The device cannot zero by unmapping: zero without it.
                s.no_punch = true;
                if let Err(e) = self.issue(ring, key) {
                    self.finish(key, Err(e), done);
                }
                return;
            }
            let zero_range = matches!(s.op, Op::WriteZeroes { .. }) && s.zeros.is_none();
            if zero_range && unsupported {
                // The file system cannot zero a range (tmpfs): write zeros instead.
                let chunk = usize::try_from(s.len)
                    .unwrap_or(ZERO_CHUNK_BYTES)
                    .min(ZERO_CHUNK_BYTES);
                s.zeros = Some(IoBuf::new(chunk));
                if let Err(e) = self.issue(ring, key) {
                    self.finish(key, Err(e), done);
                }
                return;
            }
            self.finish(key, Err(errno), done);
            return;
        }
        let n = u64::from(cqe.result.unsigned_abs());
        let partial = matches!(s.op, Op::Read | Op::Write { .. }) || s.zeros.is_some();
        if !partial {
            self.finish(key, Ok(()), done);
            return;
        }
        if n == 0 {
            if s.op == Op::Read && !self.dev.block_device {
                // End of file (the file shrank under us): the rest reads as zeros. A
                // block device that ends early lost its LUN (or shrank): EIO, never
                // zeros the volume does not hold.
                let skip = usize::try_from(s.done).unwrap_or(0);
                match (&mut s.bounce, &mut s.buf) {
                    (Some(b), _) | (None, Buffer::Owned(b)) => b.as_mut_slice()[skip..].fill(0),
                    (None, Buffer::Borrowed(v)) => {
                        let mut seen = 0usize;
                        v.for_each_mut(|p| {
                            let from = skip.saturating_sub(seen).min(p.len());
                            p[from..].fill(0);
                            seen += p.len();
                        })
                    }
                    (None, Buffer::None) => {}
                }
                self.finish(key, Ok(()), done);
            } else {
                self.finish(key, Err(libc::EIO), done);
            }
            return;
        }
        s.done += n;
        if s.done >= s.len {
            self.finish(key, Ok(()), done);
        } else if let Err(e) = self.issue(ring, key) {
            self.finish(key, Err(e), done);
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len()
    }
}

/// Wait up to `wait` for `path` to exist (a LUN path that appears late), then stat it.
fn wait_for_path(
    path: &Path,
    wait: Option<std::time::Duration>,
) -> std::io::Result<std::fs::Metadata> {
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    let mut logged = false;
    loop {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(d) = deadline.filter(|d| std::time::Instant::now() < *d) else {
                    if let Some(w) = wait {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("path did not appear within {} s", w.as_secs_f32()),
                        ));
                    }
                    return Err(e);
                };
                if !logged {
                    tracing::info!(path = %path.display(), wait_s = wait.map_or(0.0, |w| w.as_secs_f32()), "waiting for the device path to appear");
                    logged = true;
                }
                let left = d.saturating_duration_since(std::time::Instant::now());
                std::thread::sleep(left.min(std::time::Duration::from_millis(PATH_POLL_MS)));
            }
            r => return r,
        }
    }
}

/// `/sys/dev/block/MAJ:MIN` of a block device, the whole disk's for a partition.
fn sysfs_dir(meta: &std::fs::Metadata) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let dir = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    if dir.join("partition").exists() {
        return dir.parent().map(Path::to_path_buf);
    }
    Some(dir)
}

fn read_sys_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The LUN identity from the VPD pages the kernel keeps in sysfs (SCSI disks), or from
/// the `wwid` attribute (NVMe, and SCSI disks on kernels without the page copies).
fn read_identity(sys: &Path) -> Option<LunIdentity> {
    let dev = sys.join("device");
    let mut id = LunIdentity::default();
    if let Ok(p) = std::fs::read(dev.join("vpd_pg83")) {
        id.designators = scsi::parse_designators(&p).unwrap_or_default();
    }
    if let Ok(p) = std::fs::read(dev.join("vpd_pg80")) {
        id.serial = scsi::parse_serial(&p).filter(|s| !s.is_empty());
    }
    if id.designators.is_empty() {
        let wwid = std::fs::read_to_string(dev.join("wwid"))
            .or_else(|_| std::fs::read_to_string(sys.join("wwid")))
            .ok()
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty());
        if let Some(w) = wwid {
            id.designators.push(scsi::Designator {
                kind: scsi::DesignatorKind::ScsiName,
                value: w.into_bytes(),
            });
        }
    }
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests;
