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
//!
//! **Reading a header someone else wrote.** Each copy is checked on its own (magic,
//! version, size, offset, checksum, then the JSON) and the valid copy with the higher
//! `seqid` wins, as in cryptsetup; a damaged copy falls back to the other. The JSON is
//! parsed strictly: a duplicate key anywhere is refused (two parsers could otherwise read
//! two different headers from one text), and serde_json bounds nesting at 128 levels.
//! Unknown keys are kept and never interpreted (tokens, flags, newer fields).
//! Structure checked before anything is used: object ids are canonical decimal numbers
//! below 32; `json_size` matches the header size; the keyslots area (a multiple of 4096)
//! starts after both copies and ends at or before the data segment; every keyslot area
//! lies inside it, holds its material and overlaps no other; the one data segment is
//! `aes-xts-plain64` with a 512..4096 power-of-two sector size, an aligned offset, an
//! aligned size or `dynamic`, and an `iv_tweak` whose byte offset fits 64 bits; digests
//! name existing keyslots and segments, each keyslot at most once. Then the
//! [`UnlockLimits`] that apply to the whole header (metadata and keyslots area size,
//! digest iterations); the per-keyslot KDF and stripe limits apply when a keyslot is tried
//! (it is skipped when above them). A keyslot of another type, cipher or key size (32 or
//! 64 bytes are all `aes-xts-plain64` has) is left alone and never tried, and so is one
//! whose digest does not cover the data segment. All arithmetic on header fields is
//! checked.
//!
//! **Writing.** [`Header::write`] writes the primary copy, flushes, writes the secondary
//! and flushes again, so at most one copy is ever being written: a power cut leaves the
//! other one valid. [`Header::repair`] first rewrites a stale or damaged copy from the
//! good one (see `volume` for the order of a whole keyslot change).

use crate::disk::{read_vec, Disk};
use crate::error::{Error, Result};
use crate::kdf::{ct_eq, random, sha256, Argon2Type, Hash};
use crate::keyslot::{check_cipher, material_len, seal, unseal, KdfParams, AF_STRIPES};
use crate::limits::{Limit, UnlockLimits};
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
/// Ids of keyslots, segments, digests and tokens are below this (cryptsetup's limit).
const MAX_OBJECT_ID: usize = 32;
/// The keyslots area and keyslot areas are aligned to this.
const AREA_ALIGN: u64 = 4096;

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

/// Which header copies were valid when a header was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copies {
    /// Both valid, same `seqid`.
    InSync,
    /// The primary is damaged or older than the secondary.
    PrimaryStale,
    /// The secondary is damaged, missing or older than the primary.
    SecondaryStale,
}

/// The data segment: where the ciphertext is and how it is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Segment id (its key in `segments`).
    pub id: usize,
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
    /// Volume key size in bytes (32 or 64).
    pub key_size: usize,
    /// AF stripes.
    pub stripes: u32,
    /// AF hash.
    pub af_hash: Hash,
    /// Area offset in bytes.
    pub area_offset: u64,
    /// Area size in bytes.
    pub area_size: u64,
    /// Area key size in bytes (32 or 64).
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

/// A canonical decimal number: digits only, no sign, no leading zero (except "0").
fn decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

fn get_u64_str(v: &Value, k: &str, what: &str) -> Result<u64> {
    decimal(get_str(v, k, what)?)
        .ok_or_else(|| corrupt(format!("{what}: {k:?} is not a decimal number")))
}

fn get_u32(v: &Value, k: &str, what: &str) -> Result<u32> {
    get(v, k, what)?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| corrupt(format!("{what}: {k:?} is not a 32-bit integer")))
}

fn get_b64(v: &Value, k: &str, what: &str) -> Result<Vec<u8>> {
    b64()
        .decode(get_str(v, k, what)?)
        .map_err(|_| corrupt(format!("{what}: {k:?} is not base64")))
}

/// The ids of a JSON section ("keyslots", ...): canonical decimals below 32, ascending.
fn object_ids(json: &Value, section: &str) -> Result<Vec<usize>> {
    let m = json[section]
        .as_object()
        .ok_or_else(|| corrupt(format!("metadata: {section:?} is not an object")))?;
    let mut ids = Vec::with_capacity(m.len());
    for k in m.keys() {
        match decimal(k).and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n < MAX_OBJECT_ID => ids.push(n),
            _ => {
                return Err(corrupt(format!(
                    "{section}: id {k:?} is not a number below {MAX_OBJECT_ID}"
                )))
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// A list of object ids given as strings (a digest's "keyslots" or "segments").
fn id_list(v: &Value, k: &str, what: &str) -> Result<Vec<usize>> {
    let a = get(v, k, what)?
        .as_array()
        .ok_or_else(|| corrupt(format!("{what}: {k:?} is not a list")))?;
    a.iter()
        .map(|x| {
            x.as_str()
                .and_then(decimal)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n < MAX_OBJECT_ID)
                .ok_or_else(|| corrupt(format!("{what}: {k:?} holds a bad id {x}")))
        })
        .collect()
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

/// JSON parsing that refuses duplicate object keys (serde_json keeps the last one).
mod strict {
    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    pub(super) struct Strict(pub(super) Value);

    impl<'de> Deserialize<'de> for Strict {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(V).map(Strict)
        }
    }

    struct V;

    impl<'de> Visitor<'de> for V {
        type Value = Value;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
            Ok(Value::Number(v.into()))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E: de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut v = Vec::new();
            while let Some(Strict(x)) = seq.next_element()? {
                v.push(x);
            }
            Ok(Value::Array(v))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut m = Map::new();
            while let Some(k) = map.next_key::<String>()? {
                if m.contains_key(&k) {
                    return Err(de::Error::custom(format!("duplicate key {k:?}")));
                }
                let Strict(v) = map.next_value()?;
                m.insert(k, v);
            }
            Ok(Value::Object(m))
        }
    }
}

/// Parse JSON metadata strictly (see [`strict`]).
fn parse_json(text: &[u8]) -> Result<Value> {
    serde_json::from_slice::<strict::Strict>(text)
        .map(|s| s.0)
        .map_err(|e| corrupt(format!("JSON metadata: {e}")))
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
    let json = parse_json(&json_area[..end])?;
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
    pub fn read(disk: &mut dyn Disk, limits: &UnlockLimits) -> Result<Self> {
        Self::read_copies(disk, limits).map(|(h, _)| h)
    }

    /// Read the newest valid header copy from `disk`, and say whether the other copy is
    /// in step with it.
    pub fn read_copies(disk: &mut dyn Disk, limits: &UnlockLimits) -> Result<(Self, Copies)> {
        let first = read_vec(disk, 0, BIN_LEN)?;
        let mut errors = Vec::new();
        let mut primary = None;
        // Primary at 0, with its own size; the secondary at that size, or, if the primary
        // is unusable, at any size cryptsetup may have used.
        let mut second_at: Vec<u64> = HDR_SIZES.to_vec();
        if first[..6] == MAGIC1 {
            let size = be64(&first, 8);
            if HDR_SIZES.contains(&size) {
                limits.check(Limit::Metadata, "primary header", "hdr_size", size)?;
                second_at = vec![size];
                let len = usize::try_from(size).map_err(|_| corrupt("header size"))?;
                match read_vec(disk, 0, len).and_then(|raw| parse_copy(&raw, MAGIC1, 0)) {
                    Ok(h) => primary = Some(h),
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
        let mut secondary = None;
        for at in second_at {
            if at.saturating_add(BIN_LEN as u64) > dev {
                continue;
            }
            let bin = read_vec(disk, at, BIN_LEN)?;
            if bin[..6] != MAGIC2 || be64(&bin, 8) != at {
                continue;
            }
            limits.check(Limit::Metadata, "secondary header", "hdr_size", at)?;
            let len = usize::try_from(at).map_err(|_| corrupt("header size"))?;
            match read_vec(disk, at, len).and_then(|raw| parse_copy(&raw, MAGIC2, at)) {
                Ok(h) => secondary = Some(h),
                Err(e) => errors.push(e),
            }
            break;
        }
        let (best, copies) = match (primary, secondary) {
            (Some(p), Some(s)) if s.seqid > p.seqid => (s, Copies::PrimaryStale),
            (Some(p), Some(s)) if s.seqid < p.seqid => (p, Copies::SecondaryStale),
            (Some(p), Some(_)) => (p, Copies::InSync),
            (Some(p), None) => (p, Copies::SecondaryStale),
            (None, Some(s)) => (s, Copies::PrimaryStale),
            (None, None) => {
                // Prefer the most telling error: a checksum or corruption over "not LUKS".
                let mut errors = errors.into_iter();
                let first_err = errors.next().unwrap_or(Error::NotLuks);
                return Err(match first_err {
                    Error::NotLuks => errors.next().unwrap_or(Error::NotLuks),
                    e => e,
                });
            }
        };
        best.check_limits(limits)?;
        Ok((best, copies))
    }

    /// The limits that apply to the header as a whole.
    fn check_limits(&self, limits: &UnlockLimits) -> Result<()> {
        limits.check(Limit::Metadata, "header", "hdr_size", self.hdr_size)?;
        limits.check(
            Limit::KeyslotsArea,
            "config",
            "keyslots_size",
            self.keyslots_size()?,
        )?;
        for id in object_ids(&self.json, "digests")? {
            let d = &self.json["digests"][id.to_string()];
            if let Some(n) = d.get("iterations").and_then(Value::as_u64) {
                limits.check(
                    Limit::DigestIterations,
                    &format!("digest {id}"),
                    "iterations",
                    n,
                )?;
            }
        }
        Ok(())
    }

    fn keyslots_size(&self) -> Result<u64> {
        get_u64_str(&self.json["config"], "keyslots_size", "config")
    }

    /// Structural checks (see the module doc); no limits.
    fn validate(&self) -> Result<()> {
        for k in ["keyslots", "segments", "digests", "config", "tokens"] {
            if !get(&self.json, k, "metadata")?.is_object() {
                return Err(corrupt(format!("metadata: {k:?} is not an object")));
            }
        }
        let config = &self.json["config"];
        let json_size = get_u64_str(config, "json_size", "config")?;
        if Some(json_size) != self.hdr_size.checked_sub(BIN_LEN as u64) {
            return Err(corrupt("config.json_size does not match the header size"));
        }
        if let Some(req) = config.get("requirements").and_then(|r| r.get("mandatory")) {
            if req.as_array().is_none_or(|a| !a.is_empty()) {
                return Err(Error::Unsupported(format!("LUKS2 requirements {req}")));
            }
        }
        let keyslots_size = self.keyslots_size()?;
        if keyslots_size % AREA_ALIGN != 0 {
            return Err(corrupt(format!(
                "config.keyslots_size {keyslots_size} is not a multiple of {AREA_ALIGN}"
            )));
        }
        self.keyslots_end()?;
        for section in ["keyslots", "segments", "digests", "tokens"] {
            object_ids(&self.json, section)?;
        }
        let seg = self.segment()?;
        // Keyslot areas: inside the keyslots area, pairwise disjoint.
        let mut areas = Vec::new();
        for id in self.keyslot_ids() {
            areas.push((self.area(id)?, id));
            match self.keyslot(id) {
                Ok(_) | Err(Error::Unsupported(_)) => {}
                Err(e) => return Err(e),
            }
        }
        areas.sort_unstable();
        for w in areas.windows(2) {
            if w[1].0 .0 < w[0].0 .1 {
                return Err(corrupt(format!(
                    "keyslots {} and {} have overlapping areas",
                    w[0].1, w[1].1
                )));
            }
        }
        // Digests: name existing objects; a keyslot belongs to one digest at most.
        let keyslots = self.keyslot_ids();
        let segments = object_ids(&self.json, "segments")?;
        let mut owned = Vec::new();
        for id in object_ids(&self.json, "digests")? {
            let what = format!("digest {id}");
            let d = &self.json["digests"][id.to_string()];
            get_str(d, "type", &what)?;
            for k in id_list(d, "keyslots", &what)? {
                if !keyslots.contains(&k) || owned.contains(&k) {
                    return Err(corrupt(format!(
                        "{what}: keyslot {k} is missing or in two digests"
                    )));
                }
                owned.push(k);
            }
            for s in id_list(d, "segments", &what)? {
                if !segments.contains(&s) {
                    return Err(corrupt(format!("{what}: no segment {s}")));
                }
            }
        }
        debug_assert!(segments.contains(&seg.id));
        Ok(())
    }

    /// End of the keyslots area (it starts after both header copies).
    fn keyslots_end(&self) -> Result<u64> {
        self.hdr_size
            .checked_mul(2)
            .and_then(|m| m.checked_add(self.keyslots_size().ok()?))
            .ok_or_else(|| corrupt("config.keyslots_size is out of range"))
    }

    /// The raw `[offset, end)` of keyslot `id`'s area, checked to lie in the keyslots area
    /// (whatever the keyslot's type).
    fn area(&self, id: usize) -> Result<(u64, u64)> {
        let what = format!("keyslot {id}");
        let k = get(&self.json["keyslots"], &id.to_string(), &what)?;
        let area = get(k, "area", &what)?;
        let offset = get_u64_str(area, "offset", &what)?;
        let size = get_u64_str(area, "size", &what)?;
        let end = offset
            .checked_add(size)
            .ok_or_else(|| corrupt(format!("{what}: area end overflows")))?;
        if size == 0 || offset < 2 * self.hdr_size || end > self.keyslots_end()? {
            return Err(corrupt(format!(
                "{what}: area [{offset}, {end}) is outside the keyslots area [{}, {})",
                2 * self.hdr_size,
                self.keyslots_end()?
            )));
        }
        Ok((offset, end))
    }

    /// The data segment (the one numbered segment; several mean a reencryption).
    pub fn segment(&self) -> Result<Segment> {
        let ids = object_ids(&self.json, "segments")?;
        let [id] = ids[..] else {
            return Err(Error::Unsupported(format!(
                "{} data segments (reencryption in progress?)",
                ids.len()
            )));
        };
        let s = &self.json["segments"][id.to_string()];
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
        let sector_size = get_u32(s, "sector_size", "segment")?;
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(Error::BadSectorSize(sector_size.into()));
        }
        let ss = u64::from(sector_size);
        let offset = get_u64_str(s, "offset", "segment")?;
        if offset % ss != 0 || offset < self.keyslots_end()? {
            return Err(corrupt(format!(
                "segment offset {offset}: not aligned to {ss} bytes or inside the keyslots \
                 area (which ends at {})",
                self.keyslots_end()?
            )));
        }
        let size = match get_str(s, "size", "segment")? {
            "dynamic" => None,
            n => {
                let n = decimal(n).ok_or_else(|| corrupt("segment size is not a number"))?;
                if n == 0 || n % ss != 0 || offset.checked_add(n).is_none() {
                    return Err(corrupt(format!(
                        "segment size {n}: zero, not a multiple of {ss}, or past 2^64"
                    )));
                }
                Some(n)
            }
        };
        let iv_tweak = get_u64_str(s, "iv_tweak", "segment")?;
        if iv_tweak.checked_mul(512).is_none() {
            return Err(corrupt(format!("segment iv_tweak {iv_tweak} out of range")));
        }
        Ok(Segment {
            id,
            offset,
            size,
            iv_tweak,
            sector_size,
        })
    }

    /// Parse keyslot `id`. A keyslot Ember cannot use (another type, AF, cipher, KDF or key
    /// size) is [`Error::Unsupported`].
    pub fn keyslot(&self, id: usize) -> Result<Keyslot> {
        let what = format!("keyslot {id}");
        let unsupported = |m: &str| Error::Unsupported(format!("{what}: {m}"));
        let k = get(&self.json["keyslots"], &id.to_string(), &what)?;
        let ty = get_str(k, "type", &what)?;
        if ty != "luks2" {
            return Err(unsupported(&format!("type {ty:?}")));
        }
        let (area_offset, area_end) = self.area(id)?;
        let area_size = area_end - area_offset;
        let af = get(k, "af", &what)?;
        if get_str(af, "type", &what)? != "luks1" {
            return Err(unsupported("AF type"));
        }
        let area = get(k, "area", &what)?;
        if get_str(area, "type", &what)? != "raw" {
            return Err(unsupported("area type"));
        }
        let enc = get_str(area, "encryption", &what)?;
        if check_cipher(enc).is_err() {
            return Err(unsupported(&format!("area cipher {enc:?}")));
        }
        let kdf_v = get(k, "kdf", &what)?;
        let kdf = match get_str(kdf_v, "type", &what)? {
            "pbkdf2" => {
                let h = get_str(kdf_v, "hash", &what)?;
                KdfParams::Pbkdf2 {
                    hash: Hash::parse(h).map_err(|_| unsupported(&format!("hash {h:?}")))?,
                    iterations: get_u32(kdf_v, "iterations", &what)?,
                }
            }
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
            t => return Err(unsupported(&format!("KDF {t:?}"))),
        };
        // aes-xts-plain64 has 32- and 64-byte keys only: any other size is not a key we
        // can use, and is refused before anything of that size is allocated.
        let key_size = get_u32(k, "key_size", &what)?;
        if key_size != 32 && key_size != 64 {
            return Err(unsupported(&format!("{key_size}-byte volume key")));
        }
        let area_key_size = get_u32(area, "key_size", &what)?;
        if area_key_size != 32 && area_key_size != 64 {
            return Err(unsupported(&format!("{area_key_size}-byte area key")));
        }
        let stripes = get_u32(af, "stripes", &what)?;
        if stripes == 0 {
            return Err(corrupt(format!("{what}: zero AF stripes")));
        }
        let af_h = get_str(af, "hash", &what)?;
        let af_hash = Hash::parse(af_h).map_err(|_| unsupported(&format!("AF hash {af_h:?}")))?;
        let need = material_len(key_size as usize, stripes)?;
        if u64::try_from(need).map_or(true, |n| n > area_size) {
            return Err(corrupt(format!(
                "{what}: {need} bytes of key material do not fit its {area_size}-byte area"
            )));
        }
        let priority = match k.get("priority") {
            None => 1,
            Some(p) => p
                .as_u64()
                .and_then(|p| u8::try_from(p).ok())
                .filter(|&p| p <= 2)
                .ok_or_else(|| corrupt(format!("{what}: priority {p} is not 0, 1 or 2")))?,
        };
        Ok(Keyslot {
            id,
            key_size: key_size as usize,
            stripes,
            af_hash,
            area_offset,
            area_size,
            area_key_size: area_key_size as usize,
            kdf,
            salt: get_b64(kdf_v, "salt", &what)?,
            priority,
        })
    }

    /// Ids of the keyslots, ascending (empty if the header is not valid).
    pub fn keyslot_ids(&self) -> Vec<usize> {
        object_ids(&self.json, "keyslots").unwrap_or_default()
    }

    /// The digest that covers the data segment and keyslot `id`, if any.
    fn data_digest_for(&self, id: usize) -> Result<Option<(usize, &Value)>> {
        let seg = self.segment()?.id;
        for d in object_ids(&self.json, "digests")? {
            let v = &self.json["digests"][d.to_string()];
            let what = format!("digest {d}");
            if id_list(v, "keyslots", &what)?.contains(&id) {
                let covers = id_list(v, "segments", &what)?.contains(&seg);
                return Ok(covers.then_some((d, v)));
            }
        }
        Ok(None)
    }

    /// Does `key` match digest `d`?
    fn verify_key(&self, d: (usize, &Value), key: &[u8], limits: &UnlockLimits) -> Result<bool> {
        let what = format!("digest {}", d.0);
        let d = d.1;
        if get_str(d, "type", &what)? != "pbkdf2" {
            return Err(Error::Unsupported(format!("{what}: digest type")));
        }
        let hash = Hash::parse(get_str(d, "hash", &what)?)?;
        let want = get_b64(d, "digest", &what)?;
        if want.is_empty() || want.len() > 64 {
            return Err(corrupt(format!("{what}: digest length {}", want.len())));
        }
        let iterations = get_u32(d, "iterations", &what)?;
        if iterations == 0 {
            return Err(corrupt(format!("{what}: zero iterations")));
        }
        limits.check(
            Limit::DigestIterations,
            &what,
            "iterations",
            iterations.into(),
        )?;
        let mut got = vec![0u8; want.len()];
        hash.pbkdf2(key, &get_b64(d, "salt", &what)?, iterations, &mut got);
        Ok(ct_eq(&got, &want))
    }

    /// Try each keyslot (high priority first, never priority 0). A keyslot above one of
    /// the per-keyslot `limits` is skipped; its error is returned if no keyslot opens.
    pub fn unlock(
        &self,
        disk: &mut dyn Disk,
        passphrase: &[u8],
        limits: &UnlockLimits,
    ) -> Result<(usize, Zeroizing<Vec<u8>>)> {
        let mut slots = Vec::new();
        for id in self.keyslot_ids() {
            match self.keyslot(id) {
                Ok(k) if k.priority > 0 => slots.push(k),
                Ok(_) | Err(Error::Unsupported(_)) => {}
                Err(e) => return Err(e),
            }
        }
        slots.sort_by_key(|k| std::cmp::Reverse(k.priority));
        let mut skipped = None;
        let mut tried = 0usize;
        for k in slots {
            let what = format!("keyslot {}", k.id);
            let Some(digest) = self.data_digest_for(k.id)? else {
                continue;
            };
            tried += 1;
            let costs = k.kdf.check(limits, &what).and_then(|()| {
                limits.check(Limit::AfStripes, &what, "af.stripes", k.stripes.into())
            });
            match costs {
                Ok(()) => {}
                Err(e @ Error::LimitExceeded { .. }) => {
                    skipped.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            let mut slot_key = Zeroizing::new(vec![0u8; k.area_key_size]);
            k.kdf
                .derive(passphrase, &k.salt, &mut slot_key, limits, &what)?;
            let material = Zeroizing::new(read_vec(
                disk,
                k.area_offset,
                material_len(k.key_size, k.stripes)?,
            )?);
            let vk = unseal(&material, &slot_key, k.key_size, k.stripes, k.af_hash)?;
            if self.verify_key(digest, &vk, limits)? {
                return Ok((k.id, vk));
            }
        }
        if tried == 0 {
            // Nothing could even be tried: say why rather than "wrong passphrase".
            return Err(Error::Unsupported(format!(
                "no usable keyslot ({})",
                self.unusable_keyslots().join("; ")
            )));
        }
        Err(skipped.unwrap_or(Error::WrongPassphrase))
    }

    /// Why each keyslot Ember cannot try is unusable.
    fn unusable_keyslots(&self) -> Vec<String> {
        let mut why = Vec::new();
        for id in self.keyslot_ids() {
            match self.keyslot(id) {
                Err(e) => why.push(e.to_string()),
                Ok(k) if k.priority == 0 => why.push(format!("keyslot {id}: priority 0")),
                Ok(_) => {
                    if !matches!(self.data_digest_for(id), Ok(Some(_))) {
                        why.push(format!(
                            "keyslot {id}: its digest does not cover the data segment"
                        ));
                    }
                }
            }
        }
        if why.is_empty() {
            why.push("the header has no keyslot".into());
        }
        why
    }

    /// Serialize one copy (`second`: the copy at `hdr_size`).
    fn copy_bytes(&self, second: bool) -> Result<Vec<u8>> {
        let len = usize::try_from(self.hdr_size).map_err(|_| corrupt("header size"))?;
        let mut raw = vec![0u8; len];
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

    /// Write one copy as it is (same `seqid`) and flush.
    fn write_copy(&self, disk: &mut dyn Disk, second: bool) -> Result<()> {
        let raw = self.copy_bytes(second)?;
        disk.write_at(if second { self.hdr_size } else { 0 }, &raw)?;
        disk.flush()?;
        Ok(())
    }

    /// Bump the sequence id and write both copies, primary first, each followed by a
    /// flush (so a power cut tears at most one copy).
    pub fn write(&mut self, disk: &mut dyn Disk) -> Result<()> {
        self.validate()?;
        self.seqid = self
            .seqid
            .checked_add(1)
            .ok_or_else(|| corrupt("seqid overflow"))?;
        self.write_copy(disk, false)?;
        self.write_copy(disk, true)
    }

    /// Rewrite a stale or damaged copy from this (the newest) one, same `seqid`: after
    /// it, both copies agree, so a later update torn in its primary falls back to this
    /// state and never to an older one.
    pub fn repair(&self, disk: &mut dyn Disk, copies: Copies) -> Result<()> {
        match copies {
            Copies::InSync => Ok(()),
            Copies::PrimaryStale => self.write_copy(disk, false),
            Copies::SecondaryStale => self.write_copy(disk, true),
        }
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
        let h = Header {
            hdr_size,
            seqid: 0,
            label,
            subsystem: String::new(),
            uuid,
            json,
        };
        h.validate()?;
        Ok(h)
    }

    /// Store `volume_key` under `passphrase` in a new keyslot: writes the material only
    /// (into an area no keyslot of this header uses; the caller flushes, then writes the
    /// header). Returns the keyslot id.
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
        let area_size = u64::try_from(material_len(key_size, AF_STRIPES)?)
            .map_err(|_| Error::BadKeySize(key_size))?
            .next_multiple_of(AREA_ALIGN);
        // First fit in the keyslots area, among every keyslot's area (any type).
        let mut used = Vec::with_capacity(ids.len());
        for i in &ids {
            used.push(self.area(*i)?);
        }
        used.sort_unstable();
        let mut at = 2 * self.hdr_size;
        for (s, e) in &used {
            if at.saturating_add(area_size) <= *s {
                break;
            }
            at = at
                .max(*e)
                .checked_next_multiple_of(AREA_ALIGN)
                .ok_or(Error::NoFreeKeyslot)?;
        }
        if at.saturating_add(area_size) > self.keyslots_end()? {
            return Err(Error::NoFreeKeyslot);
        }
        let seg = Value::String(self.segment()?.id.to_string());
        let dig_id = self.json["digests"]
            .as_object()
            .and_then(|m| {
                m.iter()
                    .find(|(_, d)| d["segments"].as_array().is_some_and(|a| a.contains(&seg)))
                    .map(|(k, _)| k.clone())
            })
            .ok_or_else(|| corrupt("no digest covers the data segment"))?;
        let mut salt = [0u8; 32];
        random(&mut salt)?;
        let mut slot_key = Zeroizing::new(vec![0u8; key_size]);
        // Our own parameters: the caller chose them, no limit applies.
        kdf.derive(
            passphrase,
            &salt,
            &mut slot_key,
            &UnlockLimits::unlimited(),
            "new keyslot",
        )?;
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
        let list = self.json["digests"][&dig_id]["keyslots"]
            .as_array_mut()
            .ok_or_else(|| corrupt("digest keyslots is not a list"))?;
        list.push(Value::String(id.to_string()));
        Ok(id)
    }

    /// The `[start, end)` bytes keyslot `id` owns (to wipe once it is removed).
    pub fn slot_area(&self, id: usize) -> Result<(u64, u64)> {
        self.area(id)
    }

    /// Remove keyslot `id` from this in-memory header (nothing is written).
    pub fn remove_slot(&mut self, id: usize) -> Result<()> {
        obj(&mut self.json["keyslots"])?
            .remove(&id.to_string())
            .ok_or_else(|| Error::InvalidParam(format!("no keyslot {id}")))?;
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
        let h = Header::read(&mut disk, &UnlockLimits::default()).unwrap();
        assert_eq!(h.label, "lbl");
        assert_eq!(h.seqid, 1);
        let seg = h.segment().unwrap();
        assert_eq!(seg.sector_size, 4096);
        assert_eq!(seg.offset, DEFAULT_DATA_OFFSET);
        let (id, vk) = h
            .unlock(&mut disk, b"pw", &UnlockLimits::default())
            .unwrap();
        assert_eq!((id, &vk[..]), (0, &[3u8; 64][..]));
        assert!(matches!(
            h.unlock(&mut disk, b"x", &UnlockLimits::default()),
            Err(Error::WrongPassphrase)
        ));

        // A damaged primary falls back to the secondary copy.
        let mut d2 = disk.clone();
        d2[5000] ^= 1;
        assert!(Header::read(&mut d2, &UnlockLimits::default()).is_ok());
        // Both damaged: checksum error.
        d2[16384 + 5000] ^= 1;
        assert!(matches!(
            Header::read(&mut d2, &UnlockLimits::default()),
            Err(Error::BadChecksum(_))
        ));
        // Truncated.
        let mut short = disk[..8000].to_vec();
        assert!(matches!(
            Header::read(&mut short, &UnlockLimits::default()),
            Err(Error::Truncated { .. })
        ));
    }

    /// Property: a header with random label, sector size, segment size and keyslots of
    /// random KDFs writes and reads back the same (both copies; JSON equal; every keyslot
    /// parses to what was written), and each keyslot's passphrase opens it.
    #[test]
    fn write_read_roundtrip_property() {
        let mut rng = crate::testrng::Rng::new(4);
        let l = UnlockLimits::default();
        for case in 0..12 {
            let kb = rng.pick(&[32usize, 64]);
            let vk = rng.bytes(kb);
            let label: String = (0..rng.range(0, 47))
                .map(|_| rng.pick(b"aZ 9") as char)
                .collect();
            let ss = rng.pick(&[512u32, 1024, 2048, 4096]);
            let size = if rng.next().is_multiple_of(2) {
                None
            } else {
                Some(rng.range(1, 64) * 4096)
            };
            let mut h = Header::new(&vk, ss, "uuid-x".into(), label.clone(), size).unwrap();
            let mut disk = vec![0u8; DEFAULT_DATA_OFFSET as usize + (256 << 10)];
            let mut kdfs = Vec::new();
            for _ in 0..rng.range(1, 3) {
                let kdf = if rng.next().is_multiple_of(2) {
                    KdfParams::Pbkdf2 {
                        hash: rng.pick(&[Hash::Sha1, Hash::Sha256, Hash::Sha512]),
                        iterations: rng.range(1000, 1500) as u32,
                    }
                } else {
                    KdfParams::Argon2 {
                        kind: rng.pick(&[Argon2Type::I, Argon2Type::Id]),
                        time: rng.range(1, 2) as u32,
                        memory_kib: rng.range(8, 64) as u32,
                        lanes: 1,
                    }
                };
                let id = h
                    .add_slot(&mut disk, &vk, &[id_pass(kdfs.len())], kdf)
                    .unwrap();
                kdfs.push((id, kdf));
            }
            h.write(&mut disk).unwrap();
            let (r, copies) = Header::read_copies(&mut disk, &l).unwrap();
            assert_eq!(copies, Copies::InSync, "case {case}");
            assert_eq!(r.json, h.json, "case {case}");
            assert_eq!((r.label.as_str(), r.seqid), (label.as_str(), 1));
            let seg = r.segment().unwrap();
            assert_eq!((seg.sector_size, seg.size), (ss, size));
            for (n, (id, kdf)) in kdfs.iter().enumerate() {
                assert_eq!(r.keyslot(*id).unwrap().kdf, *kdf);
                let (got, key) = r.unlock(&mut disk, &[id_pass(n)], &l).unwrap();
                assert_eq!((got, &key[..]), (*id, &vk[..]));
            }
        }
    }

    #[test]
    fn whole_header_and_keyslot_limits() {
        let mut disk = vec![0u8; DEFAULT_DATA_OFFSET as usize];
        fresh(&mut disk);
        let lim = |f: fn(&mut UnlockLimits)| {
            let mut l = UnlockLimits::default();
            f(&mut l);
            l
        };
        let field = |r: Result<Header>| match r {
            Err(Error::LimitExceeded { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let l = lim(|l| l.metadata_bytes = 8192);
        assert_eq!(field(Header::read(&mut disk, &l)), "hdr_size");
        let l = lim(|l| l.keyslots_area_bytes = 1 << 20);
        assert_eq!(field(Header::read(&mut disk, &l)), "keyslots_size");
        let l = lim(|l| l.digest_iterations = 999);
        assert_eq!(field(Header::read(&mut disk, &l)), "iterations");
        let h = Header::read(&mut disk, &UnlockLimits::default()).unwrap();
        for (l, f) in [
            (lim(|l| l.af_stripes = 3999), "af.stripes"),
            (lim(|l| l.pbkdf2_iterations = 999), "kdf.iterations"),
        ] {
            match h.unlock(&mut disk, b"pw", &l) {
                Err(Error::LimitExceeded { field, .. }) => assert_eq!(field, f),
                other => panic!("{other:?}"),
            }
        }
    }

    fn id_pass(n: usize) -> u8 {
        b'a' + n as u8
    }

    /// Property: random byte changes anywhere in both header copies never panic the
    /// reader; a damaged copy falls back to the other one.
    #[test]
    fn mutated_headers_read_or_fail_cleanly() {
        let mut rng = crate::testrng::Rng::new(5);
        let mut disk = vec![0u8; DEFAULT_DATA_OFFSET as usize];
        fresh(&mut disk);
        let l = UnlockLimits::default();
        let hdr: Vec<u8> = disk[..32768].to_vec();
        for _ in 0..300 {
            for _ in 0..rng.range(1, 8) {
                let at = rng.range(0, 32767) as usize;
                disk[at] = rng.next() as u8;
            }
            match Header::read_copies(&mut disk, &l) {
                Ok((h, Copies::InSync)) => assert_eq!(h.seqid, 1),
                Ok((h, _)) => assert!(h.unlock(&mut disk, b"pw", &l).is_ok()),
                Err(_) => {}
            }
            disk[..32768].copy_from_slice(&hdr);
        }
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
        let h2 = Header::read(&mut disk, &UnlockLimits::default()).unwrap();
        assert_eq!(
            h2.unlock(&mut disk, b"second", &UnlockLimits::default())
                .unwrap()
                .0,
            1
        );
        // The memory cap refuses the argon2 slot with a clear error.
        assert!(matches!(
            h2.unlock(
                &mut disk,
                b"second",
                &UnlockLimits {
                    argon2_memory_kib: 32,
                    ..UnlockLimits::default()
                }
            ),
            Err(Error::LimitExceeded { .. })
        ));
        let mut h3 = h2.clone();
        let (a, b) = h3.slot_area(0).unwrap();
        h3.remove_slot(0).unwrap();
        h3.write(&mut disk).unwrap();
        crate::disk::wipe(&mut disk, a, b - a).unwrap();
        let h4 = Header::read(&mut disk, &UnlockLimits::default()).unwrap();
        assert!(matches!(
            h4.unlock(&mut disk, b"pw", &UnlockLimits::default()),
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
