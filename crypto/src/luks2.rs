//! LUKS2: two copies of (4096-byte binary header + JSON metadata area), then keyslot areas,
//! then the data segment.
//!
//! Binary header (big-endian): magic (`LUKS\xba\xbe` primary, `SKUL\xba\xbe` secondary) at 0,
//! version 2 at 6, `hdr_size` (binary + JSON) at 8, `seqid` at 16, label[48] at 24,
//! checksum_alg[32] at 72, salt[64] at 104, uuid[40] at 168, subsystem[48] at 208,
//! `hdr_offset` at 256, checksum[64] at 448. The checksum is SHA-256 over the whole
//! `hdr_size` bytes with the checksum field zeroed. The secondary copy sits at `hdr_size`.
//!
//! The JSON is kept as a [`serde_json::Value`] so that fields we do not interpret (tokens,
//! priorities, flags) survive an update byte-for-byte in meaning; typed views are parsed
//! from it on demand. Updates bump `seqid` and rewrite both copies.

use crate::disk::{read_vec, Disk};
use crate::error::{Error, Result};
use crate::kdf::{ct_eq, random, sha256, Argon2Type, Hash};
use crate::keyslot::{check_cipher, material_len, seal, unseal, KdfParams, AF_STRIPES};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

const MAGIC1: [u8; 6] = *b"LUKS\xba\xbe";
const MAGIC2: [u8; 6] = *b"SKUL\xba\xbe";
const BIN_LEN: usize = 4096;
/// Metadata sizes cryptsetup accepts (binary + JSON), smallest first.
const HDR_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];
/// Default data offset (cryptsetup's): 16 MiB.
pub const DEFAULT_DATA_OFFSET: u64 = 16 << 20;
/// LUKS2 allows up to 32 keyslots.
pub const MAX_SLOTS: usize = 32;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn corrupt(m: impl Into<String>) -> Error {
    Error::Corrupt(m.into())
}

/// A LUKS2 header: binary fields of the copy we trust plus the JSON metadata.
#[derive(Debug, Clone)]
pub struct Header {
    /// Binary header + JSON area size.
    pub hdr_size: u64,
    /// Update counter.
    pub seqid: u64,
    /// Label (may be empty).
    pub label: String,
    /// Subsystem (may be empty).
    pub subsystem: String,
    /// UUID.
    pub uuid: String,
    /// The JSON metadata.
    pub json: Value,
}

/// The data segment: where the ciphertext is and how it is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset of the data on the device.
    pub offset: u64,
    /// Byte size, `None` for "dynamic" (to the end of the device).
    pub size: Option<u64>,
    /// IV offset in 512-byte units.
    pub iv_tweak: u64,
    /// Encryption sector size.
    pub sector_size: u32,
}

/// One keyslot's parameters.
#[derive(Debug, Clone)]
pub struct Keyslot {
    /// Keyslot id.
    pub id: usize,
    /// Volume key size in bytes.
    pub key_size: usize,
    /// AF stripes.
    pub stripes: u32,
    /// AF hash.
    pub af_hash: Hash,
    /// Area offset in bytes.
    pub area_offset: u64,
    /// Area size in bytes.
    pub area_size: u64,
    /// Area key size in bytes.
    pub area_key_size: usize,
    /// KDF.
    pub kdf: KdfParams,
    /// KDF salt.
    pub salt: Vec<u8>,
    /// Priority: 0 ignore, 1 normal, 2 high.
    pub priority: u8,
}

fn get<'a>(v: &'a Value, k: &str, what: &str) -> Result<&'a Value> {
    v.get(k)
        .ok_or_else(|| corrupt(format!("{what}: missing {k:?}")))
}

fn get_str<'a>(v: &'a Value, k: &str, what: &str) -> Result<&'a str> {
    get(v, k, what)?
        .as_str()
        .ok_or_else(|| corrupt(format!("{what}: {k:?} is not a string")))
}

fn get_u64_str(v: &Value, k: &str, what: &str) -> Result<u64> {
    get_str(v, k, what)?
        .parse()
        .map_err(|_| corrupt(format!("{what}: {k:?} is not a number")))
}

fn get_u32(v: &Value, k: &str, what: &str) -> Result<u32> {
    get(v, k, what)?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| corrupt(format!("{what}: {k:?} is not a small integer")))
}

fn get_b64(v: &Value, k: &str, what: &str) -> Result<Vec<u8>> {
    b64()
        .decode(get_str(v, k, what)?)
        .map_err(|_| corrupt(format!("{what}: {k:?} is not base64")))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parse and verify one copy; `raw` is the whole `hdr_size` bytes.
fn parse_copy(raw: &[u8], magic: [u8; 6], at: u64) -> Result<Header> {
    if raw.len() < BIN_LEN || raw[..6] != magic {
        return Err(Error::NotLuks);
    }
    let version = u16::from_be_bytes([raw[6], raw[7]]);
    if version != 2 {
        return Err(Error::UnsupportedVersion(version));
    }
    let hdr_size = be64(raw, 8);
    if !HDR_SIZES.contains(&hdr_size) || raw.len() as u64 != hdr_size {
        return Err(corrupt(format!("bad LUKS2 header size {hdr_size}")));
    }
    if be64(raw, 256) != at {
        return Err(corrupt(format!(
            "header copy at {at} claims offset {}",
            be64(raw, 256)
        )));
    }
    let alg = cstr(&raw[72..104]);
    if alg != "sha256" {
        return Err(Error::UnsupportedHash(alg));
    }
    let mut copy = raw.to_vec();
    copy[448..512].fill(0);
    let sum = sha256(&[&copy]);
    if !ct_eq(&sum, &raw[448..480]) {
        return Err(Error::BadChecksum(if at == 0 {
            "primary"
        } else {
            "secondary"
        }));
    }
    let json_area = &raw[BIN_LEN..];
    let end = json_area
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(json_area.len());
    let json: Value = serde_json::from_slice(&json_area[..end])
        .map_err(|e| corrupt(format!("JSON metadata: {e}")))?;
    let h = Header {
        hdr_size,
        seqid: be64(raw, 16),
        label: cstr(&raw[24..72]),
        subsystem: cstr(&raw[208..256]),
        uuid: cstr(&raw[168..208]),
        json,
    };
    h.validate()?;
    Ok(h)
}

impl Header {
    /// Read the newest valid header copy from `disk`.
    pub fn read(disk: &mut dyn Disk) -> Result<Self> {
        let first = read_vec(disk, 0, BIN_LEN)?;
        let mut errors = Vec::new();
        let mut found: Vec<Header> = Vec::new();
        // Primary at 0, with its own size; secondary at that size (or, if the primary is
        // damaged, at any size cryptsetup may have used).
        let mut second_at: Vec<u64> = HDR_SIZES.to_vec();
        if first[..6] == MAGIC1 {
            let size = be64(&first, 8);
            if HDR_SIZES.contains(&size) {
                second_at.retain(|&s| s != size);
                second_at.insert(0, size);
                match read_vec(disk, 0, size as usize).and_then(|raw| parse_copy(&raw, MAGIC1, 0)) {
                    Ok(h) => found.push(h),
                    Err(e) => errors.push(e),
                }
            } else {
                errors.push(corrupt(format!("bad LUKS2 header size {size}")));
            }
        } else if first[..6] != MAGIC2 {
            // Neither magic at 0: not LUKS2 unless a secondary exists.
            errors.push(Error::NotLuks);
        }
        let dev = disk.size()?;
        for at in second_at {
            if at + BIN_LEN as u64 > dev {
                continue;
            }
            let bin = read_vec(disk, at, BIN_LEN)?;
            if bin[..6] != MAGIC2 {
                continue;
            }
            let size = be64(&bin, 8);
            if size != at {
                continue;
            }
            match read_vec(disk, at, size as usize).and_then(|raw| parse_copy(&raw, MAGIC2, at)) {
                Ok(h) => found.push(h),
                Err(e) => errors.push(e),
            }
            break;
        }
        if let Some(best) = found.into_iter().max_by_key(|h| h.seqid) {
            return Ok(best);
        }
        // Prefer the most telling error: a checksum or corruption over "not LUKS".
        let mut errors = errors.into_iter();
        let first_err = errors.next().unwrap_or(Error::NotLuks);
        Err(match first_err {
            Error::NotLuks => errors.next().unwrap_or(Error::NotLuks),
            e => e,
        })
    }

    fn validate(&self) -> Result<()> {
        for k in ["keyslots", "segments", "digests", "config", "tokens"] {
            if !get(&self.json, k, "metadata")?.is_object() {
                return Err(corrupt(format!("metadata: {k:?} is not an object")));
            }
        }
        let config = &self.json["config"];
        let json_size = get_u64_str(config, "json_size", "config")?;
        if json_size != self.hdr_size - BIN_LEN as u64 {
            return Err(corrupt("config.json_size does not match the header size"));
        }
        if let Some(req) = config.get("requirements").and_then(|r| r.get("mandatory")) {
            if req.as_array().is_some_and(|a| !a.is_empty()) {
                return Err(Error::Unsupported(format!("LUKS2 requirements {req}")));
            }
        }
        self.segment()?;
        Ok(())
    }

    /// The data segment ("0", or the lowest-numbered crypt segment).
    pub fn segment(&self) -> Result<Segment> {
        let segs = self.json["segments"]
            .as_object()
            .ok_or_else(|| corrupt("no segments"))?;
        let mut ids: Vec<(u64, &Value)> = segs
            .iter()
            .filter_map(|(k, v)| k.parse().ok().map(|n| (n, v)))
            .collect();
        ids.sort_by_key(|(n, _)| *n);
        if ids.len() != 1 {
            return Err(Error::Unsupported(format!(
                "{} data segments (reencryption in progress?)",
                ids.len()
            )));
        }
        let s = ids[0].1;
        let ty = get_str(s, "type", "segment")?;
        if ty != "crypt" {
            return Err(Error::Unsupported(format!("segment type {ty:?}")));
        }
        if s.get("integrity").is_some() {
            return Err(Error::Unsupported(
                "authenticated encryption (integrity)".into(),
            ));
        }
        check_cipher(get_str(s, "encryption", "segment")?)?;
        let size = match get_str(s, "size", "segment")? {
            "dynamic" => None,
            n => Some(
                n.parse()
                    .map_err(|_| corrupt("segment size is not a number"))?,
            ),
        };
        let sector_size = get_u32(s, "sector_size", "segment")?;
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(Error::BadSectorSize(sector_size.into()));
        }
        let offset = get_u64_str(s, "offset", "segment")?;
        if offset % u64::from(sector_size) != 0 || offset < 2 * self.hdr_size {
            return Err(corrupt(format!("segment offset {offset}")));
        }
        Ok(Segment {
            offset,
            size,
            iv_tweak: get_u64_str(s, "iv_tweak", "segment")?,
            sector_size,
        })
    }

    /// Parse keyslot `id`.
    pub fn keyslot(&self, id: usize) -> Result<Keyslot> {
        let what = format!("keyslot {id}");
        let k = get(&self.json["keyslots"], &id.to_string(), &what)?;
        let ty = get_str(k, "type", &what)?;
        if ty != "luks2" {
            return Err(Error::Unsupported(format!("{what}: type {ty:?}")));
        }
        let af = get(k, "af", &what)?;
        if get_str(af, "type", &what)? != "luks1" {
            return Err(Error::Unsupported(format!("{what}: AF type")));
        }
        let area = get(k, "area", &what)?;
        if get_str(area, "type", &what)? != "raw" {
            return Err(Error::Unsupported(format!("{what}: area type")));
        }
        check_cipher(get_str(area, "encryption", &what)?)?;
        let kdf_v = get(k, "kdf", &what)?;
        let kdf = match get_str(kdf_v, "type", &what)? {
            "pbkdf2" => KdfParams::Pbkdf2 {
                hash: Hash::parse(get_str(kdf_v, "hash", &what)?)?,
                iterations: get_u32(kdf_v, "iterations", &what)?,
            },
            t @ ("argon2i" | "argon2id") => KdfParams::Argon2 {
                kind: if t == "argon2i" {
                    Argon2Type::I
                } else {
                    Argon2Type::Id
                },
                time: get_u32(kdf_v, "time", &what)?,
                memory_kib: get_u32(kdf_v, "memory", &what)?,
                lanes: get_u32(kdf_v, "cpus", &what)?,
            },
            t => return Err(Error::Unsupported(format!("{what}: KDF {t:?}"))),
        };
        let key_size = get_u32(k, "key_size", &what)? as usize;
        let stripes = get_u32(af, "stripes", &what)?;
        let area_offset = get_u64_str(area, "offset", &what)?;
        let area_size = get_u64_str(area, "size", &what)?;
        let area_key_size = get_u32(area, "key_size", &what)? as usize;
        if key_size == 0 || key_size > 512 || stripes == 0 || stripes > 100_000 {
            return Err(corrupt(format!("{what}: key size or stripes out of range")));
        }
        if (material_len(key_size, stripes) as u64) > area_size
            || area_offset < 2 * self.hdr_size
            || area_offset.saturating_add(area_size) > self.keyslots_end()?
        {
            return Err(corrupt(format!("{what}: area outside the keyslots area")));
        }
        Ok(Keyslot {
            id,
            key_size,
            stripes,
            af_hash: Hash::parse(get_str(af, "hash", &what)?)?,
            area_offset,
            area_size,
            area_key_size,
            kdf,
            salt: get_b64(kdf_v, "salt", &what)?,
            priority: k.get("priority").and_then(Value::as_u64).unwrap_or(1) as u8,
        })
    }

    fn keyslots_end(&self) -> Result<u64> {
        Ok(2 * self.hdr_size + get_u64_str(&self.json["config"], "keyslots_size", "config")?)
    }

    /// Ids of the keyslots, ascending.
    pub fn keyslot_ids(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.json["keyslots"]
            .as_object()
            .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// The digest object covering keyslot `id`.
    fn digest_for(&self, id: usize) -> Option<(&String, &Value)> {
        let sid = Value::String(id.to_string());
        self.json["digests"]
            .as_object()?
            .iter()
            .find(|(_, d)| d["keyslots"].as_array().is_some_and(|a| a.contains(&sid)))
    }

    /// Does `key` match the digest of keyslot `id`?
    fn verify_key(&self, id: usize, key: &[u8]) -> Result<bool> {
        let (_, d) = self
            .digest_for(id)
            .ok_or_else(|| corrupt(format!("keyslot {id} has no digest")))?;
        if get_str(d, "type", "digest")? != "pbkdf2" {
            return Err(Error::Unsupported("digest type".into()));
        }
        let hash = Hash::parse(get_str(d, "hash", "digest")?)?;
        let want = get_b64(d, "digest", "digest")?;
        if want.is_empty() || want.len() > 64 {
            return Err(corrupt("digest length"));
        }
        let mut got = vec![0u8; want.len()];
        hash.pbkdf2(
            key,
            &get_b64(d, "salt", "digest")?,
            get_u32(d, "iterations", "digest")?,
            &mut got,
        );
        Ok(ct_eq(&got, &want))
    }

    /// Try each keyslot (high priority first, never priority 0).
    pub fn unlock(
        &self,
        disk: &mut dyn Disk,
        passphrase: &[u8],
        max_argon2_kib: u64,
    ) -> Result<(usize, Zeroizing<Vec<u8>>)> {
        let mut slots = Vec::new();
        for id in self.keyslot_ids() {
            match self.keyslot(id) {
                Ok(k) if k.priority > 0 => slots.push(k),
                Ok(_) => {}
                Err(Error::Unsupported(_)) => {}
                Err(e) => return Err(e),
            }
        }
        slots.sort_by_key(|k| std::cmp::Reverse(k.priority));
        let mut too_big = None;
        for k in slots {
            let mut slot_key = Zeroizing::new(vec![0u8; k.area_key_size]);
            match k
                .kdf
                .derive(passphrase, &k.salt, &mut slot_key, max_argon2_kib, k.id)
            {
                Ok(()) => {}
                Err(e @ Error::KdfMemoryTooHigh { .. }) => {
                    too_big.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let material = Zeroizing::new(read_vec(
                disk,
                k.area_offset,
                material_len(k.key_size, k.stripes),
            )?);
            let vk = unseal(&material, &slot_key, k.key_size, k.stripes, k.af_hash)?;
            if self.verify_key(k.id, &vk)? {
                return Ok((k.id, vk));
            }
        }
        Err(too_big.unwrap_or(Error::WrongPassphrase))
    }

    /// Serialize one copy (`second`: the copy at `hdr_size`).
    fn copy_bytes(&self, second: bool) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; self.hdr_size as usize];
        raw[..6].copy_from_slice(if second { &MAGIC2 } else { &MAGIC1 });
        raw[6..8].copy_from_slice(&2u16.to_be_bytes());
        raw[8..16].copy_from_slice(&self.hdr_size.to_be_bytes());
        raw[16..24].copy_from_slice(&self.seqid.to_be_bytes());
        put(&mut raw[24..72], &self.label)?;
        put(&mut raw[72..104], "sha256")?;
        random(&mut raw[104..168])?;
        put(&mut raw[168..208], &self.uuid)?;
        put(&mut raw[208..256], &self.subsystem)?;
        let at = if second { self.hdr_size } else { 0 };
        raw[256..264].copy_from_slice(&at.to_be_bytes());
        let text = serde_json::to_vec(&self.json).map_err(|e| corrupt(e.to_string()))?;
        if text.len() >= raw.len() - BIN_LEN {
            return Err(Error::InvalidParam(
                "LUKS2 metadata does not fit the JSON area".into(),
            ));
        }
        raw[BIN_LEN..BIN_LEN + text.len()].copy_from_slice(&text);
        let sum = sha256(&[&raw]);
        raw[448..480].copy_from_slice(&sum);
        Ok(raw)
    }

    /// Bump the sequence id and write both copies.
    pub fn write(&mut self, disk: &mut dyn Disk) -> Result<()> {
        self.validate()?;
        self.seqid += 1;
        let a = self.copy_bytes(false)?;
        let b = self.copy_bytes(true)?;
        disk.write_at(0, &a)?;
        disk.write_at(self.hdr_size, &b)?;
        Ok(())
    }

    /// A fresh header with a data segment and no keyslot.
    pub fn new(
        volume_key: &[u8],
        sector_size: u32,
        uuid: String,
        label: String,
        data_size: Option<u64>,
    ) -> Result<Self> {
        if volume_key.len() != 32 && volume_key.len() != 64 {
            return Err(Error::BadKeySize(volume_key.len()));
        }
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(Error::BadSectorSize(sector_size.into()));
        }
        let hdr_size: u64 = 16 << 10;
        let mut salt = [0u8; 32];
        random(&mut salt)?;
        let iterations = 1000;
        let mut digest = [0u8; 32];
        Hash::Sha256.pbkdf2(volume_key, &salt, iterations, &mut digest);
        let size = data_size.map_or_else(|| "dynamic".to_string(), |s| s.to_string());
        let json = json!({
            "keyslots": {},
            "tokens": {},
            "segments": {"0": {
                "type": "crypt",
                "offset": DEFAULT_DATA_OFFSET.to_string(),
                "size": size,
                "iv_tweak": "0",
                "encryption": "aes-xts-plain64",
                "sector_size": sector_size,
            }},
            "digests": {"0": {
                "type": "pbkdf2",
                "keyslots": [],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": iterations,
                "salt": b64().encode(salt),
                "digest": b64().encode(digest),
            }},
            "config": {
                "json_size": (hdr_size - BIN_LEN as u64).to_string(),
                "keyslots_size": (DEFAULT_DATA_OFFSET - 2 * hdr_size).to_string(),
            },
        });
        Ok(Header {
            hdr_size,
            seqid: 0,
            label,
            subsystem: String::new(),
            uuid,
            json,
        })
    }

    /// Store `volume_key` under `passphrase` in a new keyslot (writes the material; the
    /// caller then writes the header). Returns the keyslot id.
    pub fn add_slot(
        &mut self,
        disk: &mut dyn Disk,
        volume_key: &[u8],
        passphrase: &[u8],
        kdf: KdfParams,
    ) -> Result<usize> {
        let ids = self.keyslot_ids();
        let id = (0..MAX_SLOTS)
            .find(|i| !ids.contains(i))
            .ok_or(Error::NoFreeKeyslot)?;
        let key_size = volume_key.len();
        let area_size = (material_len(key_size, AF_STRIPES) as u64).div_ceil(4096) * 4096;
        // First fit in the keyslots area.
        let mut used: Vec<(u64, u64)> = Vec::new();
        for i in &ids {
            let k = self.keyslot(*i)?;
            used.push((k.area_offset, k.area_offset + k.area_size));
        }
        used.sort_unstable();
        let mut at = 2 * self.hdr_size;
        for (s, e) in &used {
            if at + area_size <= *s {
                break;
            }
            at = at.max(*e);
        }
        if at + area_size > self.keyslots_end()? {
            return Err(Error::NoFreeKeyslot);
        }
        let mut salt = [0u8; 32];
        random(&mut salt)?;
        let mut slot_key = Zeroizing::new(vec![0u8; key_size]);
        kdf.derive(passphrase, &salt, &mut slot_key, u64::MAX, id)?;
        let material = seal(volume_key, &slot_key, AF_STRIPES, Hash::Sha256)?;
        disk.write_at(at, &material)?;
        let kdf_json = match kdf {
            KdfParams::Pbkdf2 { hash, iterations } => json!({
                "type": "pbkdf2", "hash": hash.name(), "iterations": iterations,
                "salt": b64().encode(salt),
            }),
            KdfParams::Argon2 {
                kind,
                time,
                memory_kib,
                lanes,
            } => json!({
                "type": if kind == Argon2Type::I { "argon2i" } else { "argon2id" },
                "time": time, "memory": memory_kib, "cpus": lanes,
                "salt": b64().encode(salt),
            }),
        };
        let slot = json!({
            "type": "luks2",
            "key_size": key_size,
            "af": {"type": "luks1", "stripes": AF_STRIPES, "hash": "sha256"},
            "area": {
                "type": "raw",
                "offset": at.to_string(),
                "size": area_size.to_string(),
                "encryption": "aes-xts-plain64",
                "key_size": key_size,
            },
            "kdf": kdf_json,
        });
        obj(&mut self.json["keyslots"])?.insert(id.to_string(), slot);
        // Attach to the digest that verifies this volume key.
        let seg_id = self.json["segments"]
            .as_object()
            .and_then(|m| m.keys().next().cloned())
            .ok_or_else(|| corrupt("no segment"))?;
        let seg = Value::String(seg_id);
        let dig_id = self.json["digests"]
            .as_object()
            .and_then(|m| {
                m.iter()
                    .find(|(_, d)| d["segments"].as_array().is_some_and(|a| a.contains(&seg)))
                    .map(|(k, _)| k.clone())
            })
            .ok_or_else(|| corrupt("no digest covers the data segment"))?;
        let list = self.json["digests"][&dig_id]["keyslots"]
            .as_array_mut()
            .ok_or_else(|| corrupt("digest keyslots is not a list"))?;
        list.push(Value::String(id.to_string()));
        Ok(id)
    }

    /// Remove keyslot `id` and overwrite its area with random bytes.
    pub fn kill_slot(&mut self, disk: &mut dyn Disk, id: usize) -> Result<()> {
        let k = self.keyslot(id)?;
        let mut junk = vec![0u8; k.area_size as usize];
        random(&mut junk)?;
        disk.write_at(k.area_offset, &junk)?;
        obj(&mut self.json["keyslots"])?.remove(&id.to_string());
        let sid = Value::String(id.to_string());
        if let Some(digests) = self.json["digests"].as_object_mut() {
            for d in digests.values_mut() {
                if let Some(a) = d["keyslots"].as_array_mut() {
                    a.retain(|v| *v != sid);
                }
            }
        }
        Ok(())
    }
}

fn obj(v: &mut Value) -> Result<&mut Map<String, Value>> {
    v.as_object_mut().ok_or_else(|| corrupt("not an object"))
}

fn put(dst: &mut [u8], s: &str) -> Result<()> {
    if s.len() >= dst.len() {
        return Err(Error::InvalidParam(format!(
            "{s:?} is too long for its header field"
        )));
    }
    dst[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(disk: &mut Vec<u8>) -> Header {
        let vk = [3u8; 64];
        let mut h = Header::new(
            &vk,
            4096,
            "5b1e7c4e-2d2b-4e8c-9d36-2a0f6b1c9e77".into(),
            "lbl".into(),
            None,
        )
        .unwrap();
        h.add_slot(
            disk,
            &vk,
            b"pw",
            KdfParams::Pbkdf2 {
                hash: Hash::Sha256,
                iterations: 1000,
            },
        )
        .unwrap();
        h.write(disk).unwrap();
        h
    }

    #[test]
    fn roundtrip_unlock_and_checksums() {
        let mut disk = vec![0u8; DEFAULT_DATA_OFFSET as usize];
        fresh(&mut disk);
        let h = Header::read(&mut disk).unwrap();
        assert_eq!(h.label, "lbl");
        assert_eq!(h.seqid, 1);
        let seg = h.segment().unwrap();
        assert_eq!(seg.sector_size, 4096);
        assert_eq!(seg.offset, DEFAULT_DATA_OFFSET);
        let (id, vk) = h.unlock(&mut disk, b"pw", 1 << 20).unwrap();
        assert_eq!((id, &vk[..]), (0, &[3u8; 64][..]));
        assert!(matches!(
            h.unlock(&mut disk, b"x", 1 << 20),
            Err(Error::WrongPassphrase)
        ));

        // A damaged primary falls back to the secondary copy.
        let mut d2 = disk.clone();
        d2[5000] ^= 1;
        assert!(Header::read(&mut d2).is_ok());
        // Both damaged: checksum error.
        d2[16384 + 5000] ^= 1;
        assert!(matches!(Header::read(&mut d2), Err(Error::BadChecksum(_))));
        // Truncated.
        let mut short = disk[..8000].to_vec();
        assert!(matches!(
            Header::read(&mut short),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn add_and_kill_slots() {
        let mut disk = vec![0u8; DEFAULT_DATA_OFFSET as usize];
        let mut h = fresh(&mut disk);
        let vk = [3u8; 64];
        let id = h
            .add_slot(
                &mut disk,
                &vk,
                b"second",
                KdfParams::Argon2 {
                    kind: Argon2Type::Id,
                    time: 1,
                    memory_kib: 64,
                    lanes: 1,
                },
            )
            .unwrap();
        assert_eq!(id, 1);
        assert_eq!(h.keyslot(1).unwrap().area_offset, 32768 + 258048);
        h.write(&mut disk).unwrap();
        let h2 = Header::read(&mut disk).unwrap();
        assert_eq!(h2.unlock(&mut disk, b"second", 1 << 20).unwrap().0, 1);
        // The memory cap refuses the argon2 slot with a clear error.
        assert!(matches!(
            h2.unlock(&mut disk, b"second", 32),
            Err(Error::KdfMemoryTooHigh { .. })
        ));
        let mut h3 = h2.clone();
        h3.kill_slot(&mut disk, 0).unwrap();
        h3.write(&mut disk).unwrap();
        let h4 = Header::read(&mut disk).unwrap();
        assert!(matches!(
            h4.unlock(&mut disk, b"pw", 1 << 20),
            Err(Error::WrongPassphrase)
        ));
        assert_eq!(h4.keyslot_ids(), vec![1]);
        // Slot 0's area is reused first.
        let mut h5 = h4.clone();
        h5.add_slot(
            &mut disk,
            &vk,
            b"third",
            KdfParams::Pbkdf2 {
                hash: Hash::Sha512,
                iterations: 1000,
            },
        )
        .unwrap();
        assert_eq!(h5.keyslot(0).unwrap().area_offset, 32768);
    }
}
