//! LUKS1: a 592-byte big-endian header at offset 0, eight fixed keyslots, PBKDF2 only.
//!
//! ```text
//! 0   magic "LUKS\xba\xbe"   6   version=1        8   cipher_name[32]   40  cipher_mode[32]
//! 72  hash_spec[32]          104 payload_offset (512-byte sectors)      108 key_bytes
//! 112 mk_digest[20]          132 mk_digest_salt[32]                     164 mk_digest_iter
//! 168 uuid[40]               208 8 × keyslot{active, iterations, salt[32], key_offset, stripes}
//! ```
//! The volume key is verified by `PBKDF2(hash, key, mk_salt, mk_iter)[..20] == mk_digest`.
//! Keyslot material (AF-split key, encrypted with the volume cipher) starts at
//! `key_offset * 512`; cryptsetup places slot 0 at 4096 and aligns slots to 4096 bytes.
//!
//! Validation (a header is user-supplied): the cipher is aes-xts-plain64, the key 32 or 64
//! bytes, the digest iterations within [`UnlockLimits`]; every keyslot area, active or not
//! (a free slot's area is where a new key will be written), lies after the 592-byte
//! header and before the payload, and no two overlap, so adding or removing a key can
//! never write into the data or another keyslot. A payload offset of 0 (a detached
//! header) is refused: Ember keeps the header on the volume. Every slot has 4000 AF
//! stripes (cryptsetup and QEMU write nothing else, and cryptsetup refuses other counts).
//! Active keyslots' PBKDF2 iterations are checked against the limits when they are tried.
//!
//! There is one header copy. Power safety relies on each update changing one keyslot's
//! bytes only (see `volume`), so a torn header write cannot damage another keyslot.

use crate::disk::{read_vec, Disk};
use crate::error::{Error, Result};
use crate::kdf::{ct_eq, random, Hash};
use crate::keyslot::{material_len, seal, unseal, KdfParams, AF_STRIPES};
use crate::limits::{Limit, UnlockLimits};
use zeroize::Zeroizing;

/// Magic of a LUKS header (both versions).
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// On-disk size of the LUKS1 header.
pub const HEADER_LEN: usize = 592;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Number of keyslots.
pub const NUM_SLOTS: usize = 8;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;

/// One LUKS1 keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// In use.
    pub active: bool,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors.
    pub key_offset: u32,
    /// AF stripes.
    pub stripes: u32,
}

/// A parsed LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// e.g. "aes".
    pub cipher_name: String,
    /// e.g. "xts-plain64".
    pub cipher_mode: String,
    /// PBKDF2 / AF hash.
    pub hash: String,
    /// Start of the encrypted data, in 512-byte sectors.
    pub payload_offset: u32,
    /// Volume key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the volume key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_iter: u32,
    /// UUID string.
    pub uuid: String,
    /// The eight keyslots.
    pub slots: [Slot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn cstr(b: &[u8]) -> Result<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(str::to_string)
        .map_err(|_| Error::Corrupt("non-UTF-8 text field".into()))
}

fn put_cstr(dst: &mut [u8], s: &str) -> Result<()> {
    if s.len() >= dst.len() {
        return Err(Error::InvalidParam(format!(
            "{s:?} is too long for its header field"
        )));
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

impl Header {
    /// Parse the first [`HEADER_LEN`] bytes of a volume and check it against `limits`.
    pub fn parse(b: &[u8], limits: &UnlockLimits) -> Result<Self> {
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated {
                need: HEADER_LEN as u64,
                have: b.len() as u64,
            });
        }
        if b[..6] != MAGIC {
            return Err(Error::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::UnsupportedVersion(version));
        }
        let mut slots = [Slot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: 0,
        }; NUM_SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let o = 208 + i * 48;
            s.active = match be32(b, o) {
                SLOT_ENABLED => true,
                SLOT_DISABLED => false,
                x => return Err(Error::Corrupt(format!("keyslot {i}: bad state {x:#x}"))),
            };
            s.iterations = be32(b, o + 4);
            s.salt.copy_from_slice(&b[o + 8..o + 40]);
            s.key_offset = be32(b, o + 40);
            s.stripes = be32(b, o + 44);
        }
        let mut mk_digest = [0; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_salt = [0; SALT_LEN];
        mk_salt.copy_from_slice(&b[132..164]);
        let h = Header {
            cipher_name: cstr(&b[8..40])?,
            cipher_mode: cstr(&b[40..72])?,
            hash: cstr(&b[72..104])?,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest,
            mk_salt,
            mk_iter: be32(b, 164),
            uuid: cstr(&b[168..208])?,
            slots,
        };
        h.validate(limits)?;
        Ok(h)
    }

    /// The byte range keyslot `i` owns (active or free: a free slot's area is where
    /// [`add_slot`](Self::add_slot) writes).
    fn slot_area(&self, i: usize) -> Result<(u64, u64)> {
        let s = self
            .slots
            .get(i)
            .ok_or_else(|| Error::InvalidParam(format!("no keyslot {i}")))?;
        let start = u64::from(s.key_offset) * 512;
        let len = u64::try_from(material_len(self.key_bytes as usize, AF_STRIPES)?)
            .map_err(|_| Error::Corrupt(format!("keyslot {i}: material size overflows")))?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::Corrupt(format!("keyslot {i}: material end overflows")))?;
        Ok((start, end))
    }

    fn validate(&self, limits: &UnlockLimits) -> Result<()> {
        crate::keyslot::check_cipher(&self.cipher_spec())?;
        Hash::parse(&self.hash)?;
        if self.key_bytes != 32 && self.key_bytes != 64 {
            return Err(Error::BadKeySize(self.key_bytes as usize));
        }
        if self.mk_iter == 0 {
            return Err(Error::Corrupt("zero volume-key digest iterations".into()));
        }
        limits.check(
            Limit::DigestIterations,
            "header",
            "mk_digest_iter",
            self.mk_iter.into(),
        )?;
        if self.payload_offset == 0 {
            return Err(Error::Unsupported(
                "detached LUKS1 header (payload offset 0)".into(),
            ));
        }
        let payload = u64::from(self.payload_offset) * 512;
        let mut areas = Vec::with_capacity(NUM_SLOTS);
        for (i, s) in self.slots.iter().enumerate() {
            // cryptsetup and QEMU write 4000 stripes in every slot, and cryptsetup refuses
            // anything else; so do we (the AF stripes limit is for LUKS2).
            if s.stripes != AF_STRIPES {
                return Err(Error::Corrupt(format!(
                    "keyslot {i}: {} AF stripes (LUKS1 has {AF_STRIPES})",
                    s.stripes
                )));
            }
            let (start, end) = self.slot_area(i)?;
            if start < HEADER_LEN as u64 || end > payload {
                return Err(Error::Corrupt(format!(
                    "keyslot {i}: key material [{start}, {end}) is outside the header area \
                     [{HEADER_LEN}, {payload})"
                )));
            }
            areas.push((start, end, i));
        }
        areas.sort_unstable();
        for w in areas.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::Corrupt(format!(
                    "keyslots {} and {} overlap",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(())
    }

    /// "aes-xts-plain64".
    pub fn cipher_spec(&self) -> String {
        format!("{}-{}", self.cipher_name, self.cipher_mode)
    }

    /// Serialize to [`HEADER_LEN`] bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_cstr(&mut b[8..40], &self.cipher_name)?;
        put_cstr(&mut b[40..72], &self.cipher_mode)?;
        put_cstr(&mut b[72..104], &self.hash)?;
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iter.to_be_bytes());
        put_cstr(&mut b[168..208], &self.uuid)?;
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[o..o + 4].copy_from_slice(&state.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        Ok(b)
    }

    fn hash_fn(&self) -> Result<Hash> {
        Hash::parse(&self.hash)
    }

    /// Does `key` match the volume-key digest? (The digest iterations were checked
    /// against the limits when the header was parsed.)
    pub fn verify_key(&self, key: &[u8]) -> Result<bool> {
        let mut d = [0u8; DIGEST_LEN];
        self.hash_fn()?
            .pbkdf2(key, &self.mk_salt, self.mk_iter, &mut d);
        Ok(ct_eq(&d, &self.mk_digest))
    }

    /// Try every active keyslot; returns the slot and the volume key. A keyslot whose KDF
    /// cost is above `limits` is skipped; its error is returned if no keyslot opens.
    pub fn unlock(
        &self,
        disk: &mut dyn Disk,
        passphrase: &[u8],
        limits: &UnlockLimits,
    ) -> Result<(usize, Zeroizing<Vec<u8>>)> {
        let hash = self.hash_fn()?;
        let kb = self.key_bytes as usize;
        let mut skipped = None;
        for (i, s) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            let what = format!("keyslot {i}");
            let kdf = KdfParams::Pbkdf2 {
                hash,
                iterations: s.iterations,
            };
            match kdf.check(limits, &what) {
                Ok(()) => {}
                Err(e @ Error::LimitExceeded { .. }) => {
                    skipped.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let (start, end) = self.slot_area(i)?;
            let mut slot_key = Zeroizing::new(vec![0u8; kb]);
            kdf.derive(passphrase, &s.salt, &mut slot_key, limits, &what)?;
            let len = usize::try_from(end - start)
                .map_err(|_| Error::Corrupt(format!("{what}: material too large")))?;
            let material = Zeroizing::new(read_vec(disk, start, len)?);
            let vk = unseal(&material, &slot_key, kb, s.stripes, hash)?;
            if self.verify_key(&vk)? {
                return Ok((i, vk));
            }
        }
        Err(skipped.unwrap_or(Error::WrongPassphrase))
    }

    /// Sectors per keyslot as cryptsetup lays them out (4096-byte aligned).
    fn slot_sectors(key_bytes: usize) -> Result<u32> {
        let bytes = material_len(key_bytes, AF_STRIPES)?.div_ceil(4096) * 4096;
        u32::try_from(bytes / 512).map_err(|_| Error::BadKeySize(key_bytes))
    }

    /// A new header for `volume_key` with no active keyslot.
    pub fn new(volume_key: &[u8], hash: Hash, digest_iter: u32, uuid: String) -> Result<Self> {
        let key_bytes = match volume_key.len() {
            32 => 32u32,
            64 => 64,
            n => return Err(Error::BadKeySize(n)),
        };
        let per = Self::slot_sectors(volume_key.len())?;
        let mut slots = [Slot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: AF_STRIPES,
        }; NUM_SLOTS];
        let mut at = 8u32;
        for s in slots.iter_mut() {
            s.key_offset = at;
            at += per;
        }
        let payload_offset = at.div_ceil(2048) * 2048;
        let mut mk_salt = [0u8; SALT_LEN];
        random(&mut mk_salt)?;
        let mut h = Header {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash: hash.name().into(),
            payload_offset,
            key_bytes,
            mk_digest: [0; DIGEST_LEN],
            mk_salt,
            mk_iter: digest_iter.max(1000),
            uuid,
            slots,
        };
        let mut d = [0u8; DIGEST_LEN];
        hash.pbkdf2(volume_key, &h.mk_salt, h.mk_iter, &mut d);
        h.mk_digest = d;
        Ok(h)
    }

    /// Store `volume_key` under `passphrase` in the first free slot: writes the material
    /// only (the caller flushes, then writes the header). Returns the slot.
    pub fn add_slot(
        &mut self,
        disk: &mut dyn Disk,
        volume_key: &[u8],
        passphrase: &[u8],
        iterations: u32,
    ) -> Result<usize> {
        let i = self
            .slots
            .iter()
            .position(|s| !s.active)
            .ok_or(Error::NoFreeKeyslot)?;
        let hash = self.hash_fn()?;
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes as usize]);
        let iterations = iterations.max(1000);
        // Our own parameters: the caller chose them, no limit applies.
        KdfParams::Pbkdf2 { hash, iterations }.derive(
            passphrase,
            &salt,
            &mut slot_key,
            &UnlockLimits::unlimited(),
            "new keyslot",
        )?;
        let material = seal(volume_key, &slot_key, AF_STRIPES, hash)?;
        // The free slot's area (checked at parse to lie in the header area, overlapping
        // nothing) is exactly what `material` covers.
        disk.write_at(u64::from(self.slots[i].key_offset) * 512, &material)?;
        self.slots[i] = Slot {
            active: true,
            iterations,
            salt,
            key_offset: self.slots[i].key_offset,
            stripes: AF_STRIPES,
        };
        Ok(i)
    }

    /// Mark slot `i` free in this in-memory header (nothing is written).
    pub fn disable_slot(&mut self, i: usize) -> Result<()> {
        let s = self
            .slots
            .get_mut(i)
            .ok_or_else(|| Error::InvalidParam(format!("no keyslot {i}")))?;
        s.active = false;
        s.iterations = 0;
        s.salt = [0; SALT_LEN];
        Ok(())
    }

    /// Overwrite the material area of slot `i` with random bytes (once the header no
    /// longer refers to it).
    pub fn wipe_slot(&self, disk: &mut dyn Disk, i: usize) -> Result<()> {
        let (start, end) = self.slot_area(i)?;
        crate::disk::wipe(disk, start, end - start)
    }

    /// Write the header to offset 0 and flush it.
    pub fn write(&self, disk: &mut dyn Disk) -> Result<()> {
        disk.write_at(0, &self.to_bytes()?)?;
        disk.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_unlock() {
        let vk = [5u8; 64];
        let mut h = Header::new(
            &vk,
            Hash::Sha256,
            1000,
            "0e5b3a56-1c6d-4f3e-9a7b-2b2c1d0e9f8a".into(),
        )
        .unwrap();
        assert_eq!(h.payload_offset, 4096);
        let mut disk = vec![0u8; 4096 * 512];
        assert_eq!(h.add_slot(&mut disk, &vk, b"pass", 1000).unwrap(), 0);
        assert_eq!(h.add_slot(&mut disk, &vk, b"other", 1000).unwrap(), 1);
        h.write(&mut disk).unwrap();
        let l = UnlockLimits::default();
        let p = Header::parse(&disk[..HEADER_LEN], &l).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.unlock(&mut disk, b"other", &l).unwrap().0, 1);
        assert_eq!(&p.unlock(&mut disk, b"pass", &l).unwrap().1[..], &vk[..]);
        assert!(matches!(
            p.unlock(&mut disk, b"nope", &l),
            Err(Error::WrongPassphrase)
        ));
    }

    /// Property: any header we can build (random key size, hash, digest cost, UUID, slots
    /// active with random costs and salts) serializes and parses back to itself.
    #[test]
    fn header_roundtrip_property() {
        let mut rng = crate::testrng::Rng::new(2);
        let l = UnlockLimits::default();
        for case in 0..200 {
            let kb = rng.pick(&[32usize, 64]);
            let hash = rng.pick(&[Hash::Sha1, Hash::Sha256, Hash::Sha512]);
            let uuid: String = (0..rng.range(0, 39))
                .map(|_| rng.pick(b"a0-f") as char)
                .collect();
            let mut h =
                Header::new(&rng.bytes(kb), hash, rng.range(1000, 3000) as u32, uuid).unwrap();
            // Digest cost as read back (the KDF above is kept cheap).
            h.mk_iter = rng.range(1, l.digest_iterations.into()) as u32;
            for s in h.slots.iter_mut() {
                if rng.next().is_multiple_of(2) {
                    s.active = true;
                    s.iterations = rng.range(1, l.pbkdf2_iterations.into()) as u32;
                    s.salt.copy_from_slice(&rng.bytes(SALT_LEN));
                }
            }
            let b = h.to_bytes().unwrap();
            assert_eq!(b.len(), HEADER_LEN);
            assert_eq!(Header::parse(&b, &l).unwrap(), h, "case {case}");
        }
    }

    /// Property: flipping bytes of a valid header never panics the parser, and what it
    /// accepts serializes back to the same bytes.
    #[test]
    fn mutated_headers_parse_or_fail_cleanly() {
        let mut rng = crate::testrng::Rng::new(3);
        let l = UnlockLimits::default();
        let h = Header::new(&[7u8; 64], Hash::Sha256, 1000, "u".into()).unwrap();
        let good = h.to_bytes().unwrap();
        for _ in 0..5000 {
            let mut b = good.clone();
            for _ in 0..rng.range(1, 4) {
                let at = rng.range(0, HEADER_LEN as u64 - 1) as usize;
                b[at] = rng.next() as u8;
            }
            if let Ok(p) = Header::parse(&b, &l) {
                let again = p.to_bytes().unwrap();
                assert_eq!(Header::parse(&again, &l).unwrap(), p);
            }
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Header::parse(&[0u8; HEADER_LEN], &UnlockLimits::default()),
            Err(Error::NotLuks)
        ));
        assert!(matches!(
            Header::parse(&MAGIC, &UnlockLimits::default()),
            Err(Error::Truncated { .. })
        ));
        let h = Header::new(&[1u8; 32], Hash::Sha1, 1000, "u".into()).unwrap();
        let mut b = h.to_bytes().unwrap();
        b[8..11].copy_from_slice(b"des");
        assert!(matches!(
            Header::parse(&b, &UnlockLimits::default()),
            Err(Error::UnsupportedCipher(_))
        ));
    }
}
