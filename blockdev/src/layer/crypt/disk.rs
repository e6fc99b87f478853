//! [`DeviceDisk`]: any block device as a LUKS header [`Disk`] — the one adapter all
//! LUKS header work goes through: the crypt layer's unlock, `emberd luks` (format,
//! dump, keyslots) and the data plane's format and rekey of new volumes.
//!
//! Header reads and writes are small and unaligned; the device (opened with O_DIRECT
//! where the file system allows it) takes whole logical blocks. Reads are rounded out
//! to blocks; a write that does not cover whole blocks reads the blocks it touches,
//! patches them and writes them back. [`DeviceDisk::flush`] makes written headers
//! durable.

use crate::error::Result;
use crate::request::Op;
use crate::sync::SyncDevice;
use crate::BlockDevice;
use ember_crypto::Disk;
use std::io;
use std::sync::Arc;

/// A block device driven synchronously for header work.
#[derive(Debug)]
pub struct DeviceDisk {
    dev: SyncDevice,
    lbs: u64,
}

impl DeviceDisk {
    /// Header access to `dev` (its own private ring).
    pub fn new(dev: Arc<dyn BlockDevice>) -> Result<Self> {
        let lbs = u64::from(dev.info().logical_block_size.max(1));
        Ok(DeviceDisk {
            dev: SyncDevice::new(dev)?,
            lbs,
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        self.dev.device()
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        self.dev.op(Op::Flush, 0, 0)
    }

    /// `[offset, offset+len)` rounded out to whole blocks, never past the device (a
    /// last partial block is taken as it is): the aligned start, its length, and where
    /// the range starts in it. Checked arithmetic: a range past the end is `EOF`.
    fn aligned(&self, offset: u64, len: usize) -> io::Result<(u64, usize, usize)> {
        let eof = || io::Error::from(io::ErrorKind::UnexpectedEof);
        let size = self.dev.device().info().size;
        let end = u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .filter(|&e| e <= size)
            .ok_or_else(eof)?;
        let start = offset - offset % self.lbs;
        let aligned_end = end
            .checked_next_multiple_of(self.lbs)
            .map_or(size, |e| e.min(size));
        let n = usize::try_from(aligned_end - start).map_err(|_| eof())?;
        let skip = usize::try_from(offset - start).map_err(|_| eof())?;
        Ok((start, n, skip))
    }
}

impl Disk for DeviceDisk {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let (start, n, skip) = self.aligned(offset, buf.len())?;
        let data = self.dev.read_at(start, n).map_err(io::Error::other)?;
        let src = data
            .as_slice()
            .get(skip..skip + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.dev.device().info().read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let (start, n, skip) = self.aligned(offset, buf.len())?;
        if skip == 0 && n == buf.len() {
            return self.dev.write_at(offset, buf).map_err(io::Error::other);
        }
        let mut block = self.dev.read_at(start, n).map_err(io::Error::other)?;
        block
            .as_mut_slice()
            .get_mut(skip..skip + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?
            .copy_from_slice(buf);
        self.dev
            .write_at(start, block.as_slice())
            .map_err(io::Error::other)
    }

    /// The inherent [`DeviceDisk::flush`]: a `Flush` through the device (`fdatasync` on a
    /// file or block device), so the keyslot ordering of `ember_crypto::volume` holds
    /// across a power cut.
    fn flush(&mut self) -> io::Result<()> {
        DeviceDisk::flush(self).map_err(io::Error::other)
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.dev.device().info().size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::file_device;

    #[test]
    fn unaligned_writes_patch_whole_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (path, dev) = file_device(&dir, "d.img", &[0x11; 64 << 10], false);
        let mut d = DeviceDisk::new(dev).unwrap();
        d.write_at(4000, &[0xab; 200]).unwrap();
        d.write_at(8192, &[0xcd; 4096]).unwrap();
        // The trait's flush (what ember-crypto orders keyslot writes with) is the device's.
        Disk::flush(&mut d).unwrap();
        let mut b = vec![0u8; 300];
        d.read_at(3950, &mut b).unwrap();
        let want = [&[0x11; 50][..], &[0xab; 200], &[0x11; 50]].concat();
        assert_eq!(b, want);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[3950..4250], &want[..]);
        assert!(raw[8192..12288].iter().all(|&x| x == 0xcd));
        assert_eq!(d.size().unwrap(), 64 << 10);
        assert!(
            d.read_at((64 << 10) - 10, &mut [0u8; 20]).is_err(),
            "past the end"
        );
        let (_, ro) = file_device(&dir, "d.img", &[], true);
        let mut r = DeviceDisk::new(ro).unwrap();
        assert!(r.write_at(0, &[0; 512]).is_err(), "read-only");
    }
}
