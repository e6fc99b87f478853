//! Storage access for header work: the caller supplies a [`Disk`]; this crate does no I/O
//! of its own (`ember_blockdev::layer::crypt::DeviceDisk` implements it over any block
//! device, for the crypt layer, `emberd luks` and the data plane alike).
//!
//! Header updates are ordered with [`Disk::flush`]: a write is only known to be on stable
//! storage once a later flush returned, and writes between two flushes may land in any
//! order, or some not at all, if the power fails (see `volume` for the ordering and
//! `crash` for the test that replays every such outcome).

use std::io;

/// Random-access storage holding a LUKS volume.
pub trait Disk {
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `buf` at `offset` (not necessarily durable before [`flush`](Self::flush)).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every write issued so far durable (a write barrier: `fdatasync`).
    fn flush(&mut self) -> io::Result<()>;
    /// Size in bytes.
    fn size(&mut self) -> io::Result<u64>;
}

/// An in-memory disk (tests, staging a header before writing it).
impl Disk for Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if self.len() < end {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn size(&mut self) -> io::Result<u64> {
        u64::try_from(self.len()).map_err(|_| io::ErrorKind::InvalidData.into())
    }
}

/// Read `len` bytes at `offset`, reporting a short device as a truncated header.
pub(crate) fn read_vec(disk: &mut dyn Disk, offset: u64, len: usize) -> crate::Result<Vec<u8>> {
    let have = disk.size()?;
    let need = u64::try_from(len)
        .ok()
        .and_then(|l| offset.checked_add(l))
        .unwrap_or(u64::MAX);
    if need > have {
        return Err(crate::Error::Truncated { need, have });
    }
    let mut v = vec![0u8; len];
    disk.read_at(offset, &mut v)?;
    Ok(v)
}

/// Overwrite `[offset, offset + len)` with random bytes, 64 KiB at a time (bounded memory
/// whatever the area size), then flush.
pub(crate) fn wipe(disk: &mut dyn Disk, offset: u64, len: u64) -> crate::Result<()> {
    const CHUNK: u64 = 64 << 10;
    let mut junk = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        crate::kdf::random(&mut junk[..n])?;
        let at = offset
            .checked_add(done)
            .ok_or_else(|| crate::Error::Corrupt("wipe range overflows".into()))?;
        disk.write_at(at, &junk[..n])?;
        done += n as u64;
    }
    disk.flush()?;
    Ok(())
}
