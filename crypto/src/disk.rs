//! Storage access for header work: the caller supplies a [`Disk`]; this crate does no I/O
//! of its own (the daemon implements it over files, the block layer over a device).

use std::io;

/// Random-access storage holding a LUKS volume.
pub trait Disk {
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
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
        let end = start + buf.len();
        if self.len() < end {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Read `len` bytes at `offset`, reporting a short device as a truncated header.
pub(crate) fn read_vec(disk: &mut dyn Disk, offset: u64, len: usize) -> crate::Result<Vec<u8>> {
    let have = disk.size()?;
    let need = offset.saturating_add(len as u64);
    if need > have {
        return Err(crate::Error::Truncated { need, have });
    }
    let mut v = vec![0u8; len];
    disk.read_at(offset, &mut v)?;
    Ok(v)
}
