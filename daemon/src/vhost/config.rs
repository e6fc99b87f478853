//! virtio-blk feature bits and the device config space (`struct virtio_blk_config`).
//!
//! The config space is built byte by byte in little endian (virtio 1.x is always LE), so
//! the layout is explicit here rather than hidden in a `#[repr(C, packed)]` struct:
//!
//! ```text
//!  0 capacity u64 (512-byte sectors)   8 size_max u32        12 seg_max u32
//! 16 geometry (c u16, h u8, s u8)     20 blk_size u32
//! 24 physical_block_exp u8, alignment_offset u8, min_io_size u16, opt_io_size u32
//! 32 writeback u8, unused u8, num_queues u16
//! 36 max_discard_sectors u32  40 max_discard_seg u32  44 discard_sector_alignment u32
//! 48 max_write_zeroes_sectors u32  52 max_write_zeroes_seg u32  56 write_zeroes_may_unmap u8
//! 60 max_secure_erase_sectors u32  64 max_secure_erase_seg u32  68 secure_erase_sector_alignment
//! ```

use ember_blockdev::DeviceInfo;
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of the config space we know (up to the secure-erase fields).
pub const CONFIG_LEN: usize = 72;
/// Offset of the `writeback` byte (CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;
/// Data segments per request we accept (and advertise as `seg_max`). With the header
/// and the status byte a request is `SEG_MAX + 2` descriptors, which must not exceed the
/// queue size (virtio 1.2 §2.7.5.3.1; Linux builds indirect chains of up to
/// `seg_max + 2` whatever the queue size): 126 fits QEMU's default vhost-user-blk queue
/// of 128 entries, as QEMU's own virtio-blk does (`seg_max = queue_size - 2`).
pub const SEG_MAX: u32 = 126;
/// Discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 1;
/// Largest discard / write-zeroes range, in 512-byte sectors (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// Bit of `VHOST_USER_F_PROTOCOL_FEATURES` in the feature word.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Feature bits offered to the driver for a device with `info`.
pub fn features(info: &DeviceInfo, read_only: bool, num_queues: u16) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        | bit(vb::VIRTIO_BLK_F_SEG_MAX)
        | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
        | bit(vb::VIRTIO_BLK_F_FLUSH)
        | bit(vb::VIRTIO_BLK_F_TOPOLOGY)
        | bit(vb::VIRTIO_BLK_F_CONFIG_WCE);
    if num_queues > 1 {
        f |= bit(vb::VIRTIO_BLK_F_MQ);
    }
    if read_only || info.read_only {
        f |= bit(vb::VIRTIO_BLK_F_RO);
    } else {
        if info.discard {
            f |= bit(vb::VIRTIO_BLK_F_DISCARD);
        }
        f |= bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// The config space for a device with `info`.
pub fn config_space(info: &DeviceInfo, num_queues: u16, writeback: bool) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
        c[off..off + 4].copy_from_slice(&v.to_le_bytes());
    };
    c[0..8].copy_from_slice(&(info.size / 512).to_le_bytes());
    put32(&mut c, 12, SEG_MAX);
    let lbs = info.logical_block_size.max(512);
    put32(&mut c, 20, lbs);
    let pbs = info.physical_block_size.max(lbs);
    c[24] = (pbs / lbs).trailing_zeros() as u8;
    c[25] = 0;
    let min_io = u16::try_from(pbs / lbs).unwrap_or(u16::MAX);
    c[26..28].copy_from_slice(&min_io.to_le_bytes());
    put32(&mut c, 28, 0);
    c[WRITEBACK_OFFSET] = u8::from(writeback);
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, MAX_DISCARD_SEG);
    put32(&mut c, 44, lbs / 512);
    put32(&mut c, 48, MAX_DISCARD_SECTORS);
    put32(&mut c, 52, MAX_DISCARD_SEG);
    c[56] = u8::from(info.discard);
    c
}

/// The GET_ID answer: the volume id, truncated or zero-padded to 20 bytes.
pub fn id_bytes(id: &str) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    let n = id.len().min(ID_BYTES);
    out[..n].copy_from_slice(&id.as_bytes()[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo::new(1 << 30, 32 << 20)
    }

    #[test]
    fn config_layout() {
        let c = config_space(&info(), 4, true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "4096/512 = 2^3");
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 1);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn feature_bits() {
        let f = features(&info(), false, 2);
        assert_ne!(f & bit(vb::VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & bit(vb::VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(vb::VIRTIO_BLK_F_RO), 0);
        let ro = features(&info(), true, 1);
        assert_ne!(ro & bit(vb::VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro & bit(vb::VIRTIO_BLK_F_MQ), 0);
        assert_eq!(ro & bit(vb::VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn ids_are_padded_and_truncated() {
        assert_eq!(&id_bytes("vol")[..4], b"vol\0");
        assert_eq!(
            &id_bytes("0123456789abcdefghijKLMN")[..],
            b"0123456789abcdefghij"
        );
    }
}
