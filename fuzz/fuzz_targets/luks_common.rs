//! What the LUKS targets share: the input is a whole disk image seen through an in-memory
//! [`Disk`] (the bytes given, then zeros up to a virtual size, with writes kept aside),
//! opened with the passphrase "fuzz" under low cost limits (so the fuzzer never sits in a
//! KDF); when it opens, a key is added, changed and removed, and every write must stay in
//! the header area while the remaining passphrases keep opening the same volume key.

use ember_crypto::kdf::Hash;
use ember_crypto::{Disk, KdfParams, UnlockLimits};
use std::io;

pub const PASS: &[u8] = b"fuzz";
const NEW: &[u8] = b"new fuzz";
/// The disk's virtual size: room for the LUKS2 data offset (16 MiB) and a little data.
const VIRTUAL: u64 = 17 << 20;

/// Low caps: the seeds use 1000 PBKDF2 iterations (QEMU's 1 ms: ~4000) and argon2 with
/// 32-64 KiB, 4 passes.
pub fn limits() -> UnlockLimits {
    UnlockLimits {
        pbkdf2_iterations: 10_000,
        argon2_time: 8,
        argon2_memory_kib: 256,
        argon2_lanes: 4,
        digest_iterations: 10_000,
        af_stripes: 8_000,
        metadata_bytes: 4 << 20,
        keyslots_area_bytes: 128 << 20,
    }
}

/// The input, zeros past it, and the writes made since (in order).
#[derive(Clone)]
pub struct FuzzDisk<'a> {
    base: &'a [u8],
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl<'a> FuzzDisk<'a> {
    pub fn new(base: &'a [u8]) -> Self {
        FuzzDisk {
            base,
            writes: Vec::new(),
        }
    }

    fn virtual_size(&self) -> u64 {
        VIRTUAL.max(self.base.len() as u64)
    }
}

impl Disk for FuzzDisk<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.virtual_size())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.fill(0);
        let b = self.base.len() as u64;
        if offset < b {
            let n = (end.min(b) - offset) as usize;
            buf[..n].copy_from_slice(&self.base[offset as usize..offset as usize + n]);
        }
        for (o, d) in &self.writes {
            let (s, e) = (*o.max(&offset), (o + d.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - o) as usize..(e - o) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.virtual_size())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        self.writes.push((offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.virtual_size())
    }
}

/// One sector of zeros through the volume key (tells volume keys apart).
fn fingerprint(disk: &mut FuzzDisk<'_>, pass: &[u8]) -> Option<Vec<u8>> {
    let u = ember_crypto::open(disk, pass, &limits()).ok()?;
    let mut s = vec![0u8; u.cipher.sector_size()];
    u.cipher.encrypt(&mut s, 0).ok()?;
    Some(s)
}

fn writes_below(disk: &FuzzDisk<'_>, data_offset: u64, what: &str) {
    for (o, d) in &disk.writes {
        assert!(
            o + d.len() as u64 <= data_offset,
            "{what} wrote [{o}, +{}) at or past the data offset {data_offset}",
            d.len()
        );
    }
}

/// Parse, dump, open; when it opens, add, change and remove keys.
pub fn run(image: &[u8]) {
    let l = limits();
    let mut disk = FuzzDisk::new(image);
    let _ = ember_crypto::dump(&mut disk, &l);
    let Ok(u) = ember_crypto::open(&mut disk, PASS, &l) else {
        return;
    };
    let data_offset = u.data_offset;
    let Some(key) = fingerprint(&mut disk, PASS) else {
        panic!("opened once but not twice");
    };
    let kdf = KdfParams::Pbkdf2 {
        hash: Hash::Sha256,
        iterations: 1000,
    };

    let mut d = disk.clone();
    if ember_crypto::add_key(&mut d, PASS, NEW, kdf, &l).is_ok() {
        writes_below(&d, data_offset, "add_key");
        assert_eq!(fingerprint(&mut d, PASS).as_ref(), Some(&key), "old lost");
        assert_eq!(fingerprint(&mut d, NEW).as_ref(), Some(&key), "new missing");
        let mut r = d.clone();
        if ember_crypto::remove_key(&mut r, NEW, &l).is_ok() {
            writes_below(&r, data_offset, "remove_key");
            assert_eq!(fingerprint(&mut r, PASS).as_ref(), Some(&key), "remove lost old");
        }
    }
    let mut c = disk.clone();
    if ember_crypto::change_key(&mut c, PASS, NEW, kdf, &l).is_ok() {
        writes_below(&c, data_offset, "change_key");
        assert_eq!(fingerprint(&mut c, NEW).as_ref(), Some(&key), "change lost new");
    }
}

/// Recompute the SHA-256 checksums of both LUKS2 header copies (when their size field is
/// sane), so mutations reach the JSON instead of stopping at the checksum.
#[allow(dead_code)] // luks1_open does not use it
pub fn fix_luks2_checksums(img: &mut [u8]) {
    let mut at = 0usize;
    for _ in 0..2 {
        if img.len() < at + 4096 {
            return;
        }
        let size = u64::from_be_bytes(img[at + 8..at + 16].try_into().unwrap_or_default());
        let Ok(size) = usize::try_from(size) else {
            return;
        };
        if !(16384..=4 << 20).contains(&size) || img.len() < at + size {
            return;
        }
        let copy = &mut img[at..at + size];
        copy[448..512].fill(0);
        let sum = ember_crypto::kdf::sha256(&[copy]);
        copy[448..480].copy_from_slice(&sum);
        at += size;
    }
}
