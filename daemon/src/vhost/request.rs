//! Decoding one virtio-blk request from a descriptor chain.
//!
//! The driver's chain is treated as one byte stream without framing assumptions
//! (virtio 1.x, 2.7.4): the first 16 bytes are the device-readable header `{type u32,
//! reserved u32, sector u64}`, the last byte is the device-writable status, and whatever
//! lies between is the data. Data segments become iovecs that point straight into guest
//! memory (zero copy); every address is checked against the guest memory map first.
//!
//! A request the device cannot serve is never an error of the daemon: it decodes to a
//! [`Bad`] carrying the status to report (`IOERR` or `UNSUPP`).

use super::config::{ID_BYTES, MAX_DISCARD_SECTORS, SEG_MAX};
use ember_blockdev::{DeviceInfo, Op};
use virtio_bindings::virtio_blk as vb;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory as mapped by the vhost-user handler.
pub type Mem = GuestMemoryMmap<()>;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

const HEADER_LEN: usize = 16;
const SECTOR: u64 = 512;

/// One guest-physical byte range of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A decoded request.
#[derive(Debug)]
pub enum Decoded {
    /// A block-layer operation. `iovs` point into guest memory (valid while the memory
    /// mapping the caller decoded against stays mapped).
    Io {
        /// The operation.
        op: Op,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Host iovecs of the data (empty for flush/discard/write-zeroes).
        iovs: Vec<libc::iovec>,
        /// Where the status byte goes.
        status: GuestAddress,
        /// Bytes written to device-writable memory on success (data + status).
        used_len: u32,
    },
    /// A request answered without I/O (GET_ID): already done, status to write.
    Done {
        /// Where the status byte goes.
        status: GuestAddress,
        /// The status.
        code: u8,
        /// Bytes written to device-writable memory.
        used_len: u32,
    },
}

/// A request that fails without reaching the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bad {
    /// Where the status byte goes (None: the chain has no writable byte at all).
    pub status: Option<GuestAddress>,
    /// `S_IOERR` or `S_UNSUPP`.
    pub code: u8,
    /// Why (for the debug log).
    pub why: &'static str,
}

/// Per-device facts the decoder needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Device geometry.
    pub info: DeviceInfo,
    /// The export refuses writes.
    pub read_only: bool,
    /// Write-through cache mode: every write is FUA.
    pub writethrough: bool,
    /// GET_ID answer.
    pub id: [u8; ID_BYTES],
}

/// Decode a chain's segments against guest memory `mem`.
pub fn decode(segs: &[Seg], mem: &Mem, ctx: &Ctx) -> Result<Decoded, Bad> {
    let mut segs: Vec<Seg> = segs.iter().copied().filter(|s| s.len > 0).collect();
    // Status: the last byte, which must be device-writable.
    let status = match segs.last_mut() {
        Some(last) if last.write => {
            let addr = GuestAddress(last.addr.wrapping_add(u64::from(last.len) - 1));
            last.len -= 1;
            addr
        }
        _ => {
            return Err(Bad {
                status: None,
                code: S_IOERR,
                why: "no writable status byte",
            })
        }
    };
    if mem.check_range_backend(status, 1).is_none() {
        return Err(Bad {
            status: None,
            code: S_IOERR,
            why: "status byte outside guest memory",
        });
    }
    let bad = |code, why| Bad {
        status: Some(status),
        code,
        why,
    };
    // Header: the first 16 bytes, device-readable.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut first_data = 0;
    for (i, s) in segs.iter_mut().enumerate() {
        if s.write {
            return Err(bad(S_IOERR, "header not device-readable"));
        }
        let n = (s.len as usize).min(HEADER_LEN - got);
        mem.read_slice(&mut header[got..got + n], GuestAddress(s.addr))
            .map_err(|_| bad(S_IOERR, "header outside guest memory"))?;
        got += n;
        s.addr = s.addr.wrapping_add(n as u64);
        s.len -= n as u32;
        first_data = i + usize::from(s.len == 0);
        if got == HEADER_LEN {
            break;
        }
    }
    if got < HEADER_LEN {
        return Err(bad(S_IOERR, "request header shorter than 16 bytes"));
    }
    let data: Vec<Seg> = segs[first_data..]
        .iter()
        .copied()
        .filter(|s| s.len > 0)
        .collect();
    let rtype = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    let all_write = data.iter().all(|s| s.write);
    let all_read = data.iter().all(|s| !s.write);
    let writes_refused = ctx.read_only || ctx.info.read_only;

    match rtype {
        vb::VIRTIO_BLK_T_IN | vb::VIRTIO_BLK_T_OUT => {
            let is_read = rtype == vb::VIRTIO_BLK_T_IN;
            if (is_read && !all_write) || (!is_read && !all_read) {
                return Err(bad(S_IOERR, "data descriptor with the wrong direction"));
            }
            if !is_read && writes_refused {
                return Err(bad(S_IOERR, "write to a read-only export"));
            }
            if data.len() > SEG_MAX as usize {
                return Err(bad(S_IOERR, "too many data segments"));
            }
            if data_len > u64::from(ctx.info.max_transfer) {
                return Err(bad(
                    S_IOERR,
                    "request larger than the device's max transfer",
                ));
            }
            let offset = sector
                .checked_mul(SECTOR)
                .ok_or(bad(S_IOERR, "sector overflow"))?;
            ctx.info
                .check_range(offset, data_len)
                .map_err(|_| bad(S_IOERR, "range outside the device or misaligned"))?;
            let iovs = host_iovecs(&data, mem).ok_or(bad(S_IOERR, "data outside guest memory"))?;
            let op = if is_read {
                Op::Read
            } else {
                Op::Write {
                    fua: ctx.writethrough,
                }
            };
            Ok(Decoded::Io {
                op,
                offset,
                len: data_len,
                iovs,
                status,
                used_len: if is_read { data_len as u32 + 1 } else { 1 },
            })
        }
        vb::VIRTIO_BLK_T_FLUSH => Ok(Decoded::Io {
            op: Op::Flush,
            offset: 0,
            len: 0,
            iovs: Vec::new(),
            status,
            used_len: 1,
        }),
        vb::VIRTIO_BLK_T_GET_ID => {
            if !all_write {
                return Err(bad(S_IOERR, "GET_ID buffer not device-writable"));
            }
            let mut written = 0usize;
            for s in &data {
                if written == ID_BYTES {
                    break;
                }
                let n = (s.len as usize).min(ID_BYTES - written);
                mem.write_slice(&ctx.id[written..written + n], GuestAddress(s.addr))
                    .map_err(|_| bad(S_IOERR, "GET_ID buffer outside guest memory"))?;
                written += n;
            }
            Ok(Decoded::Done {
                status,
                code: S_OK,
                used_len: written as u32 + 1,
            })
        }
        vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = rtype == vb::VIRTIO_BLK_T_DISCARD;
            if discard && !ctx.info.discard {
                return Err(bad(S_UNSUPP, "discard not supported by the device"));
            }
            if writes_refused {
                return Err(bad(S_IOERR, "discard/write-zeroes on a read-only export"));
            }
            if !all_read || data_len != 16 {
                return Err(bad(
                    S_IOERR,
                    "discard/write-zeroes needs exactly one 16-byte segment",
                ));
            }
            let mut seg = [0u8; 16];
            let mut got = 0;
            for s in &data {
                let n = s.len as usize;
                mem.read_slice(&mut seg[got..got + n], GuestAddress(s.addr))
                    .map_err(|_| bad(S_IOERR, "segment outside guest memory"))?;
                got += n;
            }
            let start = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let unmap = flags & vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
                return Err(bad(S_UNSUPP, "unknown discard/write-zeroes flags"));
            }
            if count > MAX_DISCARD_SECTORS {
                return Err(bad(S_IOERR, "discard/write-zeroes range too large"));
            }
            let offset = start
                .checked_mul(SECTOR)
                .ok_or(bad(S_IOERR, "sector overflow"))?;
            let len = u64::from(count) * SECTOR;
            ctx.info
                .check_range(offset, len)
                .map_err(|_| bad(S_IOERR, "range outside the device"))?;
            let op = if discard {
                Op::Discard
            } else {
                Op::WriteZeroes { unmap }
            };
            Ok(Decoded::Io {
                op,
                offset,
                len,
                iovs: Vec::new(),
                status,
                used_len: 1,
            })
        }
        _ => Err(bad(S_UNSUPP, "unknown request type")),
    }
}

/// Host iovecs for `data`, or None if any byte is outside guest memory. A segment that
/// crosses a memory-region boundary becomes several iovecs.
fn host_iovecs(data: &[Seg], mem: &Mem) -> Option<Vec<libc::iovec>> {
    let mut iovs = Vec::with_capacity(data.len());
    for s in data {
        for slice in mem.get_slices(GuestAddress(s.addr), s.len as usize) {
            let slice = slice.ok()?;
            iovs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(iovs)
}

/// Range check helper on the backend trait (kept apart so the call site reads plainly).
trait CheckRange {
    fn check_range_backend(&self, addr: GuestAddress, len: usize) -> Option<()>;
}

impl CheckRange for Mem {
    fn check_range_backend(&self, addr: GuestAddress, len: usize) -> Option<()> {
        GuestMemoryBackend::check_range(self, addr, len).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testgen::Rng;

    const BASE: u64 = 0x10000;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), 0x10000)]).unwrap()
    }

    fn ctx() -> Ctx {
        Ctx {
            info: DeviceInfo::new(1 << 20, 32 << 20),
            read_only: false,
            writethrough: false,
            id: super::super::config::id_bytes("vol-1"),
        }
    }

    fn header(m: &Mem, at: u64, rtype: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&rtype.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn seg(addr: u64, len: u32, write: bool) -> Seg {
        Seg { addr, len, write }
    }

    /// A three-descriptor chain: the header at `BASE`, `data`, the status byte at
    /// `BASE + 0x100`.
    fn chain(data: Seg) -> [Seg; 3] {
        [seg(BASE, 16, false), data, seg(BASE + 0x100, 1, true)]
    }

    #[test]
    fn read_request_maps_into_guest_memory() {
        let m = mem();
        header(&m, BASE, vb::VIRTIO_BLK_T_IN, 2);
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x1000, 4096, true),
            seg(BASE + 0x3000, 1, true),
        ];
        match decode(&segs, &m, &ctx()).unwrap() {
            Decoded::Io {
                op,
                offset,
                len,
                iovs,
                status,
                used_len,
            } => {
                assert_eq!(op, Op::Read);
                assert_eq!((offset, len, used_len), (1024, 4096, 4097));
                assert_eq!(iovs.len(), 1);
                assert_eq!(status, GuestAddress(BASE + 0x3000));
                let host = m.get_host_address(GuestAddress(BASE + 0x1000)).unwrap();
                assert_eq!(iovs[0].iov_base, host.cast());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_and_status_may_share_descriptors_with_data() {
        let m = mem();
        header(&m, BASE, vb::VIRTIO_BLK_T_OUT, 0);
        // Header and data in one readable descriptor, status alone.
        let segs = [seg(BASE, 16 + 512, false), seg(BASE + 0x2000, 1, true)];
        match decode(&segs, &m, &ctx()).unwrap() {
            Decoded::Io { op, len, .. } => {
                assert_eq!(op, Op::Write { fua: false });
                assert_eq!(len, 512);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_get_a_status() {
        let m = mem();
        let c = ctx();
        // Unknown type.
        header(&m, BASE, 77, 0);
        let e = decode(&[seg(BASE, 16, false), seg(BASE + 0x100, 1, true)], &m, &c).unwrap_err();
        assert_eq!(e.code, S_UNSUPP);
        // Data outside guest memory.
        header(&m, BASE, vb::VIRTIO_BLK_T_IN, 0);
        let e = decode(&chain(seg(0x9000_0000, 512, true)), &m, &c).unwrap_err();
        assert_eq!(
            (e.code, e.status),
            (S_IOERR, Some(GuestAddress(BASE + 0x100)))
        );
        // Short header.
        let e = decode(&[seg(BASE, 8, false), seg(BASE + 0x100, 1, true)], &m, &c).unwrap_err();
        assert_eq!(e.code, S_IOERR);
        // Beyond the device.
        header(&m, BASE, vb::VIRTIO_BLK_T_IN, 1 << 20);
        let e = decode(&chain(seg(BASE + 0x1000, 512, true)), &m, &c).unwrap_err();
        assert_eq!(e.code, S_IOERR);
        // Too many segments.
        header(&m, BASE, vb::VIRTIO_BLK_T_IN, 0);
        let mut many = vec![seg(BASE, 16, false)];
        many.extend((0..SEG_MAX + 1).map(|i| seg(BASE + 0x1000 + u64::from(i) * 512, 512, true)));
        many.push(seg(BASE + 0x100, 1, true));
        assert_eq!(decode(&many, &m, &c).unwrap_err().code, S_IOERR);
        // No status byte at all.
        let e = decode(&[seg(BASE, 16, false)], &m, &c).unwrap_err();
        assert_eq!(e.status, None);
        // Status byte outside memory.
        let e = decode(&[seg(BASE, 16, false), seg(0x9000_0000, 1, true)], &m, &c).unwrap_err();
        assert_eq!(e.status, None);
    }

    #[test]
    fn read_only_refuses_writes_and_discards() {
        let m = mem();
        let mut c = ctx();
        c.read_only = true;
        header(&m, BASE, vb::VIRTIO_BLK_T_OUT, 0);
        let e = decode(&chain(seg(BASE + 0x1000, 512, false)), &m, &c).unwrap_err();
        assert_eq!(e.code, S_IOERR);
    }

    #[test]
    fn write_zeroes_and_get_id() {
        let m = mem();
        let c = ctx();
        header(&m, BASE, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&8u64.to_le_bytes());
        s[8..12].copy_from_slice(&16u32.to_le_bytes());
        s[12..16].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&s, GuestAddress(BASE + 0x200)).unwrap();
        match decode(&chain(seg(BASE + 0x200, 16, false)), &m, &c).unwrap() {
            Decoded::Io {
                op, offset, len, ..
            } => {
                assert_eq!(op, Op::WriteZeroes { unmap: true });
                assert_eq!((offset, len), (4096, 8192));
            }
            other => panic!("{other:?}"),
        }
        header(&m, BASE, vb::VIRTIO_BLK_T_GET_ID, 0);
        match decode(&chain(seg(BASE + 0x400, 20, true)), &m, &c).unwrap() {
            Decoded::Done { code, used_len, .. } => assert_eq!((code, used_len), (S_OK, 21)),
            other => panic!("{other:?}"),
        }
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(BASE + 0x400)).unwrap();
        assert_eq!(&id[..6], b"vol-1\0");
    }
    /// Property: any chain over any memory decodes to a request or a status without
    /// panicking; a decoded I/O's iovecs lie in guest memory and add up to its length,
    /// and the bytes reported written never exceed the chain's writable bytes.
    #[test]
    fn random_chains_decode_within_bounds() {
        let mut rng = Rng::new(0x2545_F491_4F6C_DD1D);
        let mut rnd = move || rng.next();
        let m = mem();
        let lo = m.get_host_address(GuestAddress(BASE)).unwrap() as usize;
        let hi = lo + 0x10000;
        for i in 0..20_000u32 {
            let mut c = ctx();
            c.read_only = i % 7 == 0;
            let rtype = [0u32, 1, 4, 8, 11, 13, 99][(rnd() % 7) as usize];
            let sector = match rnd() % 4 {
                0 => rnd(),
                1 => (1 << 20) / 512 - 1,
                _ => rnd() % 64,
            };
            header(&m, BASE + (rnd() % 0x100) * 16, rtype, sector);
            let n = (rnd() % 6) as usize;
            let segs: Vec<Seg> = (0..n)
                .map(|_| {
                    let r = rnd();
                    let addr = match r % 5 {
                        0 => r >> 8,
                        1 => BASE + 0x10000 - (r >> 40) % 64,
                        _ => BASE + (r >> 20) % 0x10000,
                    };
                    let len = match (r >> 3) % 4 {
                        0 => 1,
                        1 => 16,
                        2 => 512 * ((r >> 48) as u32 % 9),
                        _ => (r >> 32) as u32 % 0x2_0000,
                    };
                    seg(addr, len, r & 4 != 0)
                })
                .collect();
            let writable: u64 = segs
                .iter()
                .filter(|s| s.write)
                .map(|s| u64::from(s.len))
                .sum();
            match decode(&segs, &m, &c) {
                Ok(Decoded::Io {
                    iovs,
                    len,
                    used_len,
                    op,
                    ..
                }) => {
                    let total: usize = iovs.iter().map(|v| v.iov_len).sum();
                    if matches!(op, Op::Read | Op::Write { .. }) {
                        assert_eq!(total as u64, len);
                    }
                    for v in &iovs {
                        let b = v.iov_base as usize;
                        assert!(b >= lo && b + v.iov_len <= hi, "iovec outside guest memory");
                    }
                    assert!(u64::from(used_len) <= writable);
                }
                Ok(Decoded::Done { used_len, .. }) => assert!(u64::from(used_len) <= writable),
                Err(bad) => assert!(bad.code == S_IOERR || bad.code == S_UNSUPP),
            }
        }
    }
}
