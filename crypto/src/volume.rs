//! Volume-level operations over either header version: open (unlock), format, add,
//! remove and change keys, dump. Everything goes through a caller-supplied [`Disk`], and
//! every header read is bounded by an [`UnlockLimits`] (see [`crate::limits`]).
//!
//! Header updates never touch the data area, and are ordered so that a power cut at any
//! point leaves a volume that the old or the new passphrase opens (writes between two
//! flushes may land in any order, or not at all):
//!
//! 1. LUKS2: if the two header copies disagree (a damaged or older copy), rewrite the
//!    stale one from the newest first, and flush; a later torn primary then falls back to
//!    the current state, never an older one.
//! 2. Adding a key writes the new keyslot's material into an area no keyslot uses, and
//!    flushes, before any header refers to it.
//! 3. A header update writes (LUKS2) the primary copy, flushes, then the secondary, and
//!    flushes: one copy is always whole. LUKS1 has one copy; each update changes one
//!    keyslot's bytes only, so a torn write cannot damage the keyslot that must open.
//! 4. Removing a key writes the header without it (and flushes) before wiping its
//!    material (then flushes). Changing a key is an add followed by a remove: the header
//!    holds both keyslots in between.
//!
//! cryptsetup orders its own writes the same way for the header copies (primary, sync,
//! secondary, sync) but wipes a keyslot before dropping it from the header; both are safe
//! for the passphrase that remains. `crash` (and `crypto/tests/crash.rs`) replays every
//! state a power cut can leave.

use crate::disk::{read_vec, Disk};
use crate::error::{Error, Result};
use crate::kdf::random;
use crate::keyslot::{random_uuid, KdfParams};
use crate::limits::UnlockLimits;
use crate::xts::SectorCipher;
use crate::{luks1, luks2};
use std::fmt::Write as _;
use zeroize::Zeroizing;

/// Either header version.
#[derive(Debug, Clone)]
pub enum Header {
    /// LUKS1.
    Luks1(Box<luks1::Header>),
    /// LUKS2.
    Luks2(luks2::Header),
}

/// An unlocked volume: what the data path needs. Holds key schedules, never printed.
#[derive(Debug)]
pub struct Unlocked {
    /// The sector cipher keyed with the volume key.
    pub cipher: SectorCipher,
    /// Byte offset of the encrypted data on the device.
    pub data_offset: u64,
    /// Size of the data segment, `None` to the end of the device.
    pub data_size: Option<u64>,
    /// Added to every cipher offset (LUKS2 `iv_tweak` × 512).
    pub iv_offset: u64,
    /// The keyslot that opened.
    pub keyslot: usize,
    /// 1 or 2.
    pub version: u8,
    /// Volume UUID.
    pub uuid: String,
}

/// How to format a volume.
#[derive(Debug, Clone)]
pub struct FormatParams {
    /// 1 or 2.
    pub version: u8,
    /// 32 (XTS-AES-128) or 64 (XTS-AES-256) bytes.
    pub key_bytes: usize,
    /// 512 or 4096 (LUKS2 only for 4096).
    pub sector_size: u32,
    /// KDF of the first keyslot.
    pub kdf: KdfParams,
    /// LUKS2 label.
    pub label: String,
    /// UUID; random when `None`.
    pub uuid: Option<String>,
}

impl Header {
    /// Read whichever LUKS version is on `disk`.
    pub fn read(disk: &mut dyn Disk, limits: &UnlockLimits) -> Result<Self> {
        Self::read_copies(disk, limits).map(|(h, _)| h)
    }

    /// [`read`](Self::read), and whether LUKS2's two copies agree (LUKS1: always).
    fn read_copies(disk: &mut dyn Disk, limits: &UnlockLimits) -> Result<(Self, luks2::Copies)> {
        let first = read_vec(disk, 0, 8)?;
        if first[..6] == luks1::MAGIC {
            match u16::from_be_bytes([first[6], first[7]]) {
                1 => {
                    let raw = read_vec(disk, 0, luks1::HEADER_LEN)?;
                    let h = luks1::Header::parse(&raw, limits)?;
                    return Ok((Header::Luks1(Box::new(h)), luks2::Copies::InSync));
                }
                2 => {}
                v => return Err(Error::UnsupportedVersion(v)),
            }
        }
        let (h, copies) = luks2::Header::read_copies(disk, limits)?;
        Ok((Header::Luks2(h), copies))
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        match self {
            Header::Luks1(_) => 1,
            Header::Luks2(_) => 2,
        }
    }

    /// UUID.
    pub fn uuid(&self) -> &str {
        match self {
            Header::Luks1(h) => &h.uuid,
            Header::Luks2(h) => &h.uuid,
        }
    }

    /// Unlock with `passphrase`.
    pub fn unlock(
        &self,
        disk: &mut dyn Disk,
        passphrase: &[u8],
        limits: &UnlockLimits,
    ) -> Result<(usize, Zeroizing<Vec<u8>>)> {
        match self {
            Header::Luks1(h) => h.unlock(disk, passphrase, limits),
            Header::Luks2(h) => h.unlock(disk, passphrase, limits),
        }
    }

    fn unlocked(&self, keyslot: usize, vk: &[u8]) -> Result<Unlocked> {
        match self {
            Header::Luks1(h) => Ok(Unlocked {
                cipher: SectorCipher::new(vk, 512)?,
                data_offset: u64::from(h.payload_offset) * 512,
                data_size: None,
                iv_offset: 0,
                keyslot,
                version: 1,
                uuid: h.uuid.clone(),
            }),
            Header::Luks2(h) => {
                let s = h.segment()?;
                Ok(Unlocked {
                    cipher: SectorCipher::new(vk, s.sector_size as usize)?,
                    data_offset: s.offset,
                    data_size: s.size,
                    iv_offset: s
                        .iv_tweak
                        .checked_mul(512)
                        .ok_or_else(|| Error::Corrupt("iv_tweak out of range".into()))?,
                    keyslot,
                    version: 2,
                    uuid: h.uuid.clone(),
                })
            }
        }
    }

    /// Write the header (LUKS2: both copies), flushing after each copy.
    fn write(&mut self, disk: &mut dyn Disk) -> Result<()> {
        match self {
            Header::Luks1(h) => h.write(disk),
            Header::Luks2(h) => h.write(disk),
        }
    }

    fn active_slots(&self) -> Vec<usize> {
        match self {
            Header::Luks1(h) => (0..luks1::NUM_SLOTS)
                .filter(|&i| h.slots[i].active)
                .collect(),
            Header::Luks2(h) => h.keyslot_ids(),
        }
    }

    /// Drop keyslot `id`: header first (flushed), then its material is wiped (flushed).
    fn remove_slot(&mut self, disk: &mut dyn Disk, id: usize) -> Result<()> {
        match self {
            Header::Luks1(h) => {
                h.disable_slot(id)?;
                h.write(disk)?;
                h.wipe_slot(disk, id)
            }
            Header::Luks2(h) => {
                let (start, end) = h.slot_area(id)?;
                h.remove_slot(id)?;
                h.write(disk)?;
                crate::disk::wipe(disk, start, end - start)
            }
        }
    }

    /// Add a keyslot: its material first (flushed), then the header.
    fn add_key(
        &mut self,
        disk: &mut dyn Disk,
        vk: &[u8],
        pass: &[u8],
        kdf: KdfParams,
    ) -> Result<usize> {
        let id = match self {
            Header::Luks1(h) => match kdf {
                KdfParams::Pbkdf2 { iterations, .. } => h.add_slot(disk, vk, pass, iterations),
                KdfParams::Argon2 { .. } => Err(Error::InvalidParam(
                    "LUKS1 keyslots only support pbkdf2".into(),
                )),
            },
            Header::Luks2(h) => h.add_slot(disk, vk, pass, kdf),
        }?;
        disk.flush()?;
        self.write(disk)?;
        Ok(id)
    }
}

/// Where [`format`] puts the data for a LUKS `version` (bytes): cryptsetup's layout,
/// 2 MiB for LUKS1 (both key sizes), 16 MiB for LUKS2.
pub fn default_data_offset(version: u8) -> u64 {
    if version == 1 {
        2 << 20
    } else {
        luks2::DEFAULT_DATA_OFFSET
    }
}

/// Unlock the volume on `disk`. Also checks that the data segment lies on the device.
pub fn open(disk: &mut dyn Disk, passphrase: &[u8], limits: &UnlockLimits) -> Result<Unlocked> {
    let h = Header::read(disk, limits)?;
    let (slot, vk) = h.unlock(disk, passphrase, limits)?;
    let u = h.unlocked(slot, &vk)?;
    let dev = disk.size()?;
    let end = match u.data_size {
        Some(n) => u.data_offset.checked_add(n),
        None => Some(u.data_offset),
    };
    if end.is_none_or(|e| e > dev) || u.data_offset >= dev {
        return Err(Error::Corrupt(format!(
            "the data segment (offset {}, size {}) does not fit the {dev}-byte device",
            u.data_offset,
            u.data_size
                .map_or_else(|| "dynamic".to_string(), |n| n.to_string())
        )));
    }
    Ok(u)
}

/// Write a new LUKS header with one keyslot for `passphrase` and a random volume key.
/// The data area is not touched (its old contents become garbage). The device must
/// already be larger than the data offset.
pub fn format(disk: &mut dyn Disk, passphrase: &[u8], p: &FormatParams) -> Result<Unlocked> {
    let mut vk = Zeroizing::new(vec![0u8; p.key_bytes]);
    random(&mut vk)?;
    let uuid = match &p.uuid {
        Some(u) => u.clone(),
        None => random_uuid()?,
    };
    let mut h = match p.version {
        1 => {
            if p.sector_size != 512 {
                return Err(Error::InvalidParam(
                    "LUKS1 only supports 512-byte sectors".into(),
                ));
            }
            let (hash, digest_iter) = match p.kdf {
                KdfParams::Pbkdf2 { hash, iterations } => (hash, iterations / 8),
                KdfParams::Argon2 { .. } => {
                    return Err(Error::InvalidParam("LUKS1 only supports pbkdf2".into()))
                }
            };
            Header::Luks1(Box::new(luks1::Header::new(&vk, hash, digest_iter, uuid)?))
        }
        2 => Header::Luks2(luks2::Header::new(
            &vk,
            p.sector_size,
            uuid,
            p.label.clone(),
            None,
        )?),
        v => return Err(Error::UnsupportedVersion(v.into())),
    };
    let size = disk.size()?;
    let data_offset = h.unlocked(0, &vk)?.data_offset;
    if size <= data_offset {
        return Err(Error::InvalidParam(format!(
            "device of {size} bytes is too small: the data starts at {data_offset}"
        )));
    }
    let slot = h.add_key(disk, &vk, passphrase, p.kdf)?;
    h.unlocked(slot, &vk)
}

/// An unlocked header about to be changed: the header, the keyslot that opened, the
/// volume key, and the state of LUKS2's copies.
struct ForUpdate {
    h: Header,
    id: usize,
    vk: Zeroizing<Vec<u8>>,
    copies: luks2::Copies,
}

impl ForUpdate {
    /// Read the header and unlock it with `passphrase` (the authorisation). Writes nothing.
    fn open(disk: &mut dyn Disk, passphrase: &[u8], limits: &UnlockLimits) -> Result<Self> {
        let (h, copies) = Header::read_copies(disk, limits)?;
        let (id, vk) = h.unlock(disk, passphrase, limits)?;
        Ok(ForUpdate { h, id, vk, copies })
    }

    /// Bring LUKS2's copies in step before the first write (step 1 of the module doc).
    fn repair(&self, disk: &mut dyn Disk) -> Result<()> {
        match &self.h {
            Header::Luks2(h) => h.repair(disk, self.copies),
            Header::Luks1(_) => Ok(()),
        }
    }

    /// Repair, then add a keyslot holding the volume key under `passphrase`. Returns its
    /// id.
    fn add_key(&mut self, disk: &mut dyn Disk, passphrase: &[u8], kdf: KdfParams) -> Result<usize> {
        self.repair(disk)?;
        self.h.add_key(disk, &self.vk, passphrase, kdf)
    }
}

/// Add a keyslot for `new_passphrase`, authorised by `passphrase`. Returns its id.
pub fn add_key(
    disk: &mut dyn Disk,
    passphrase: &[u8],
    new_passphrase: &[u8],
    kdf: KdfParams,
    limits: &UnlockLimits,
) -> Result<usize> {
    ForUpdate::open(disk, passphrase, limits)?.add_key(disk, new_passphrase, kdf)
}

/// Remove the keyslot `passphrase` opens. Refuses to remove the last one.
pub fn remove_key(disk: &mut dyn Disk, passphrase: &[u8], limits: &UnlockLimits) -> Result<usize> {
    let mut u = ForUpdate::open(disk, passphrase, limits)?;
    if u.h.active_slots().len() <= 1 {
        return Err(Error::LastKeyslot);
    }
    u.repair(disk)?;
    u.h.remove_slot(disk, u.id)?;
    Ok(u.id)
}

/// Replace the passphrase of the keyslot `old` opens with `new` (a new keyslot is
/// written, then the old one removed). The data is not touched. Returns the new slot id.
pub fn change_key(
    disk: &mut dyn Disk,
    old: &[u8],
    new: &[u8],
    kdf: KdfParams,
    limits: &UnlockLimits,
) -> Result<usize> {
    let mut u = ForUpdate::open(disk, old, limits)?;
    let new_id = u.add_key(disk, new, kdf)?;
    u.h.remove_slot(disk, u.id)?;
    Ok(new_id)
}

/// A human-readable description of the header (no key material).
pub fn dump(disk: &mut dyn Disk, limits: &UnlockLimits) -> Result<String> {
    let h = Header::read(disk, limits)?;
    let mut s = String::new();
    let w = &mut s;
    match &h {
        Header::Luks1(h) => {
            let _ = writeln!(w, "LUKS header information");
            let _ = writeln!(w, "Version:        1");
            let _ = writeln!(w, "Cipher:         {}", h.cipher_spec());
            let _ = writeln!(w, "Hash spec:      {}", h.hash);
            let _ = writeln!(w, "Payload offset: {} (sectors)", h.payload_offset);
            let _ = writeln!(w, "MK bits:        {}", h.key_bytes * 8);
            let _ = writeln!(w, "MK iterations:  {}", h.mk_iter);
            let _ = writeln!(w, "UUID:           {}", h.uuid);
            for (i, k) in h.slots.iter().enumerate() {
                if k.active {
                    let _ = writeln!(
                        w,
                        "Key Slot {i}: ENABLED  pbkdf2 {} iterations {}, material at sector {}, {} stripes",
                        h.hash, k.iterations, k.key_offset, k.stripes
                    );
                } else {
                    let _ = writeln!(w, "Key Slot {i}: DISABLED");
                }
            }
        }
        Header::Luks2(h) => {
            let seg = h.segment()?;
            let _ = writeln!(w, "LUKS header information");
            let _ = writeln!(w, "Version:        2");
            let _ = writeln!(w, "Epoch:          {}", h.seqid);
            let _ = writeln!(w, "Metadata area:  {} [bytes]", h.hdr_size);
            let _ = writeln!(w, "UUID:           {}", h.uuid);
            let label = if h.label.is_empty() {
                "(no label)"
            } else {
                &h.label
            };
            let _ = writeln!(w, "Label:          {label}");
            let _ = writeln!(w, "Data segment:   offset {} [bytes], length {}, cipher aes-xts-plain64, sector {} [bytes]",
                seg.offset,
                seg.size.map_or("(whole device)".to_string(), |n| format!("{n} [bytes]")),
                seg.sector_size);
            for id in h.keyslot_ids() {
                match h.keyslot(id) {
                    Ok(k) => {
                        let kdf = match k.kdf {
                            KdfParams::Pbkdf2 { hash, iterations } => {
                                format!("pbkdf2 {} iterations {iterations}", hash.name())
                            }
                            KdfParams::Argon2 {
                                kind,
                                time,
                                memory_kib,
                                lanes,
                            } => format!(
                                "{} time {time} memory {memory_kib} KiB threads {lanes}",
                                if kind == crate::kdf::Argon2Type::I {
                                    "argon2i"
                                } else {
                                    "argon2id"
                                }
                            ),
                        };
                        let _ = writeln!(
                            w,
                            "Keyslot {id}: {} bits, {kdf}, area {}+{}",
                            k.key_size * 8,
                            k.area_offset,
                            k.area_size
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(w, "Keyslot {id}: unusable ({e})");
                    }
                }
            }
        }
    }
    Ok(s)
}

/// Cinder's passphrase rule. A `symmetric` secret's raw bytes are hex-encoded (lowercase)
/// and that text is the LUKS passphrase; a `passphrase` secret's bytes are used as-is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// Raw key bytes (Barbican "symmetric").
    Symmetric,
    /// A passphrase.
    Passphrase,
}

/// The LUKS passphrase for a secret (see [`SecretKind`]).
pub fn passphrase_for(kind: SecretKind, secret: &[u8]) -> Zeroizing<Vec<u8>> {
    match kind {
        SecretKind::Passphrase => Zeroizing::new(secret.to_vec()),
        SecretKind::Symmetric => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut out = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
            for b in secret {
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 15)]);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kdf::Hash;

    fn pb() -> KdfParams {
        KdfParams::Pbkdf2 {
            hash: Hash::Sha256,
            iterations: 1000,
        }
    }

    fn params(version: u8, sector_size: u32) -> FormatParams {
        FormatParams {
            version,
            key_bytes: 64,
            sector_size,
            kdf: pb(),
            label: String::new(),
            uuid: None,
        }
    }

    #[test]
    fn passphrase_rule() {
        assert_eq!(
            &passphrase_for(SecretKind::Symmetric, &[0x00, 0xab, 0x1f])[..],
            b"00ab1f"
        );
        assert_eq!(
            &passphrase_for(SecretKind::Passphrase, b"Hunter2\xff")[..],
            b"Hunter2\xff"
        );
        assert_eq!(&passphrase_for(SecretKind::Symmetric, &[])[..], b"");
    }

    #[test]
    fn keys_lifecycle_both_versions() {
        for (v, ss) in [(1u8, 512u32), (2, 512), (2, 4096)] {
            let mut disk = vec![0u8; 17 << 20];
            let u = format(&mut disk, b"one", &params(v, ss)).unwrap();
            assert_eq!(u.version, v);
            assert_eq!(u.cipher.sector_size(), ss as usize);
            let before_data = disk[u.data_offset as usize..].to_vec();
            let o = UnlockLimits::default();
            assert_eq!(add_key(&mut disk, b"one", b"two", pb(), &o).unwrap(), 1);
            assert!(matches!(
                add_key(&mut disk, b"bad", b"x", pb(), &o),
                Err(Error::WrongPassphrase)
            ));
            assert_eq!(remove_key(&mut disk, b"one", &o).unwrap(), 0);
            assert!(matches!(
                open(&mut disk, b"one", &o),
                Err(Error::WrongPassphrase)
            ));
            assert!(matches!(
                remove_key(&mut disk, b"two", &o),
                Err(Error::LastKeyslot)
            ));
            let n = change_key(&mut disk, b"two", b"three", pb(), &o).unwrap();
            assert_eq!(open(&mut disk, b"three", &o).unwrap().keyslot, n);
            assert!(open(&mut disk, b"two", &o).is_err());
            assert_eq!(
                disk[u.data_offset as usize..],
                before_data[..],
                "data untouched"
            );
            let d = dump(&mut disk, &o).unwrap();
            assert!(d.contains(&u.uuid));
        }
    }

    #[test]
    fn format_refuses_tiny_device_and_luks1_4k() {
        let mut small = vec![0u8; 1 << 20];
        assert!(matches!(
            format(&mut small, b"x", &params(2, 512)),
            Err(Error::InvalidParam(_))
        ));
        let mut disk = vec![0u8; 4 << 20];
        assert!(format(&mut disk, b"x", &params(1, 4096)).is_err());
        assert!(matches!(
            Header::read(&mut vec![0u8; 100], &UnlockLimits::default()),
            Err(Error::Truncated { .. }) | Err(Error::NotLuks)
        ));
        assert!(matches!(
            Header::read(&mut vec![0u8; 1 << 20], &UnlockLimits::default()),
            Err(Error::NotLuks)
        ));
    }
}
