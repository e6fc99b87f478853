//! Cost limits for reading a LUKS header someone else wrote.
//!
//! A LUKS header is user-supplied data (an uploaded image, a guest that wrote one onto its
//! own disk). Every field that sets how much Ember allocates or computes before it can
//! tell a right passphrase from a wrong one is checked against an [`UnlockLimits`] first,
//! and a field above its limit is refused with [`Error::LimitExceeded`], which names the
//! header field and the flag that raises the limit. Nothing large is allocated and no KDF
//! runs before the check.
//!
//! The defaults are far above anything cryptsetup or QEMU write, so real volumes open
//! unchanged, and low enough that one hostile header costs bounded memory and time:
//!
//! | limit | cryptsetup writes | default cap |
//! |---|---|---|
//! | PBKDF2 iterations per keyslot | what takes 2 s here (`--iter-time 2000`): about 3.8 M with sha256 on this 2-vCPU EPYC (`cryptsetup benchmark`: 1.89 M/s), minimum 1,000 | 100,000,000 (about 50 s here) |
//! | argon2 time (passes) | 4 with the default 1 GiB; tens to a few hundred only with a forced small `--pbkdf-memory` | 1,000 |
//! | argon2 memory | at most 1 GiB by default (`DEFAULT_LUKS2_MEMORY_KB`), 4 GiB when forced | 1 GiB (the host's memory is shared: raise it for volumes formatted with more) |
//! | argon2 lanes (`cpus`) | at most 4 (cryptsetup's hard maximum) | 16 |
//! | digest iterations (LUKS1 `mk_iter`, LUKS2 digest) | what takes 125 ms, about 240 k here, minimum 1,000 | 10,000,000 |
//! | AF stripes | always 4,000 | 65,536 |
//! | LUKS2 metadata (binary header + JSON) | 16 KiB by default, 4 MiB at most | 4 MiB |
//! | LUKS2 keyslots area | 16 MiB − 32 KiB by default, 128 MiB at most | 128 MiB |
//!
//! Keyslot KDF limits apply per keyslot: a keyslot above one is skipped (another keyslot
//! may still open the volume) and its error is reported only if no keyslot opens. The
//! worst case for a hostile header is therefore every keyslot at its caps (8 for LUKS1,
//! 32 for LUKS2). Limits on the header as a whole (digest iterations, metadata and
//! keyslots area sizes) refuse the volume outright.
//!
//! Fixed rules that are not limits are checked too, whatever the limits: volume and area
//! key sizes are 32 or 64 bytes (the only sizes `aes-xts-plain64` has), keyslot areas lie
//! between the header and the data and never overlap, and arithmetic on header fields is
//! checked.

use crate::error::{Error, Result};

/// Cost limits applied when reading a LUKS header (open, add/change/remove a key).
///
/// Each field's doc names the `emberd` flag that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnlockLimits {
    /// Most PBKDF2 iterations of one keyslot (`--max-pbkdf2-iterations`).
    pub pbkdf2_iterations: u32,
    /// Most argon2 passes of one keyslot (`--max-argon2-time`).
    pub argon2_time: u32,
    /// Most argon2 memory of one keyslot, KiB (`--max-argon2-memory`).
    pub argon2_memory_kib: u64,
    /// Most argon2 lanes of one keyslot (`--max-argon2-lanes`).
    pub argon2_lanes: u32,
    /// Most PBKDF2 iterations of the volume-key digest (`--max-digest-iterations`).
    pub digest_iterations: u32,
    /// Most anti-forensic stripes of one keyslot (`--max-af-stripes`).
    pub af_stripes: u32,
    /// Largest LUKS2 metadata area (binary header + JSON), bytes (`--max-luks2-metadata`).
    pub metadata_bytes: u64,
    /// Largest LUKS2 keyslots area, bytes (`--max-keyslots-area`).
    pub keyslots_area_bytes: u64,
}

/// Default [`UnlockLimits::pbkdf2_iterations`].
pub const DEFAULT_MAX_PBKDF2_ITERATIONS: u32 = 100_000_000;
/// Default [`UnlockLimits::argon2_time`].
pub const DEFAULT_MAX_ARGON2_TIME: u32 = 1_000;
/// Default [`UnlockLimits::argon2_memory_kib`]: 1 GiB, cryptsetup's default maximum.
pub const DEFAULT_MAX_ARGON2_KIB: u64 = 1 << 20;
/// Default [`UnlockLimits::argon2_lanes`].
pub const DEFAULT_MAX_ARGON2_LANES: u32 = 16;
/// Default [`UnlockLimits::digest_iterations`].
pub const DEFAULT_MAX_DIGEST_ITERATIONS: u32 = 10_000_000;
/// Default [`UnlockLimits::af_stripes`].
pub const DEFAULT_MAX_AF_STRIPES: u32 = 65_536;
/// Default [`UnlockLimits::metadata_bytes`]: 4 MiB, the largest LUKS2 metadata size.
pub const DEFAULT_MAX_METADATA_BYTES: u64 = 4 << 20;
/// Default [`UnlockLimits::keyslots_area_bytes`]: 128 MiB, cryptsetup's maximum.
pub const DEFAULT_MAX_KEYSLOTS_AREA_BYTES: u64 = 128 << 20;

impl Default for UnlockLimits {
    fn default() -> Self {
        UnlockLimits {
            pbkdf2_iterations: DEFAULT_MAX_PBKDF2_ITERATIONS,
            argon2_time: DEFAULT_MAX_ARGON2_TIME,
            argon2_memory_kib: DEFAULT_MAX_ARGON2_KIB,
            argon2_lanes: DEFAULT_MAX_ARGON2_LANES,
            digest_iterations: DEFAULT_MAX_DIGEST_ITERATIONS,
            af_stripes: DEFAULT_MAX_AF_STRIPES,
            metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            keyslots_area_bytes: DEFAULT_MAX_KEYSLOTS_AREA_BYTES,
        }
    }
}

/// Which limit a check is against (its flag and unit, for the error message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`UnlockLimits::pbkdf2_iterations`].
    Pbkdf2Iterations,
    /// [`UnlockLimits::argon2_time`].
    Argon2Time,
    /// [`UnlockLimits::argon2_memory_kib`].
    Argon2Memory,
    /// [`UnlockLimits::argon2_lanes`].
    Argon2Lanes,
    /// [`UnlockLimits::digest_iterations`].
    DigestIterations,
    /// [`UnlockLimits::af_stripes`].
    AfStripes,
    /// [`UnlockLimits::metadata_bytes`].
    Metadata,
    /// [`UnlockLimits::keyslots_area_bytes`].
    KeyslotsArea,
}

impl Limit {
    /// The `emberd` flag that sets this limit.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::Pbkdf2Iterations => "--max-pbkdf2-iterations",
            Limit::Argon2Time => "--max-argon2-time",
            Limit::Argon2Memory => "--max-argon2-memory",
            Limit::Argon2Lanes => "--max-argon2-lanes",
            Limit::DigestIterations => "--max-digest-iterations",
            Limit::AfStripes => "--max-af-stripes",
            Limit::Metadata => "--max-luks2-metadata",
            Limit::KeyslotsArea => "--max-keyslots-area",
        }
    }

    /// Unit of the values, with a leading space ("" for counts).
    pub fn unit(self) -> &'static str {
        match self {
            Limit::Argon2Memory => " KiB",
            Limit::Metadata | Limit::KeyslotsArea => " bytes",
            _ => "",
        }
    }

    /// Is this a per-keyslot KDF cost (the keyslot is skipped, others may still open)?
    pub fn per_keyslot(self) -> bool {
        matches!(
            self,
            Limit::Pbkdf2Iterations | Limit::Argon2Time | Limit::Argon2Memory | Limit::Argon2Lanes
        )
    }
}

impl UnlockLimits {
    /// The configured cap for `limit`.
    pub fn cap(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Pbkdf2Iterations => self.pbkdf2_iterations.into(),
            Limit::Argon2Time => self.argon2_time.into(),
            Limit::Argon2Memory => self.argon2_memory_kib,
            Limit::Argon2Lanes => self.argon2_lanes.into(),
            Limit::DigestIterations => self.digest_iterations.into(),
            Limit::AfStripes => self.af_stripes.into(),
            Limit::Metadata => self.metadata_bytes,
            Limit::KeyslotsArea => self.keyslots_area_bytes,
        }
    }

    /// Refuse `value` of header field `field` (of `what`: "keyslot 3", "header") if it is
    /// above `limit`.
    pub fn check(&self, limit: Limit, what: &str, field: &'static str, value: u64) -> Result<()> {
        let cap = self.cap(limit);
        if value > cap {
            return Err(Error::LimitExceeded {
                what: what.to_string(),
                field,
                value,
                limit: cap,
                unit: limit.unit(),
                flag: limit.flag(),
            });
        }
        Ok(())
    }

    /// No limit at all (for headers this process wrote itself, and for tests).
    pub fn unlimited() -> Self {
        UnlockLimits {
            pbkdf2_iterations: u32::MAX,
            argon2_time: u32::MAX,
            argon2_memory_kib: u64::MAX,
            argon2_lanes: u32::MAX,
            digest_iterations: u32::MAX,
            af_stripes: u32::MAX,
            metadata_bytes: u64::MAX,
            keyslots_area_bytes: u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_field_value_limit_and_flag() {
        let l = UnlockLimits::default();
        assert!(l
            .check(Limit::Argon2Memory, "keyslot 1", "kdf.memory", 1 << 20)
            .is_ok());
        let e = l
            .check(
                Limit::Argon2Memory,
                "keyslot 1",
                "kdf.memory",
                (1 << 20) + 1,
            )
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("keyslot 1"), "{m}");
        assert!(m.contains("kdf.memory"), "{m}");
        assert!(m.contains("1048577 KiB"), "{m}");
        assert!(m.contains("1048576 KiB"), "{m}");
        assert!(m.contains("--max-argon2-memory"), "{m}");
    }

    #[test]
    fn defaults_are_above_what_cryptsetup_writes() {
        let l = UnlockLimits::default();
        // cryptsetup's own hard maxima and fixed values.
        assert!(l.argon2_lanes >= 4);
        assert!(l.af_stripes >= 4000);
        assert!(l.metadata_bytes >= 4 << 20);
        assert!(l.keyslots_area_bytes >= 128 << 20);
        assert!(l.argon2_memory_kib >= 1 << 20);
        assert!(l.pbkdf2_iterations >= 10_000_000);
        assert!(l.digest_iterations >= 1_000_000);
    }
}
