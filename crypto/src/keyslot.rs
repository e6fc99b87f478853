//! What LUKS1 and LUKS2 keyslots share: the KDF that turns a passphrase into a slot key,
//! and sealing (AF split, then aes-xts-plain64 with 512-byte sectors and IVs counted from
//! the start of the keyslot area) or unsealing the volume key.

use crate::error::{Error, Result};
use crate::kdf::{af_len, af_merge, af_split, argon2, Argon2Type, Hash};
use crate::limits::{Limit, UnlockLimits};
use crate::xts::SectorCipher;
use zeroize::Zeroizing;

/// Stripes of the anti-forensic splitter, as cryptsetup and QEMU use.
pub const AF_STRIPES: u32 = 4000;

/// Default cap on argon2 memory when opening a volume (KiB); see [`crate::limits`].
pub const DEFAULT_MAX_ARGON2_KIB: u64 = crate::limits::DEFAULT_MAX_ARGON2_KIB;

/// How a keyslot derives its key from the passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfParams {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The HMAC hash.
        hash: Hash,
        /// Iteration count.
        iterations: u32,
    },
    /// Argon2i or argon2id (LUKS2 only).
    Argon2 {
        /// i or id.
        kind: Argon2Type,
        /// Passes (LUKS2 "time").
        time: u32,
        /// Memory in KiB (LUKS2 "memory").
        memory_kib: u32,
        /// Lanes (LUKS2 "cpus").
        lanes: u32,
    },
}

impl KdfParams {
    /// Refuse parameters above `limits` (or impossible ones) before any work is done.
    /// `what` names the keyslot in errors ("keyslot 3").
    pub fn check(&self, limits: &UnlockLimits, what: &str) -> Result<()> {
        match *self {
            KdfParams::Pbkdf2 { iterations, .. } => {
                if iterations == 0 {
                    return Err(Error::Corrupt(format!("{what}: zero PBKDF2 iterations")));
                }
                limits.check(
                    Limit::Pbkdf2Iterations,
                    what,
                    "kdf.iterations",
                    iterations.into(),
                )
            }
            KdfParams::Argon2 {
                time,
                memory_kib,
                lanes,
                ..
            } => {
                if time == 0 || lanes == 0 || memory_kib == 0 {
                    return Err(Error::Corrupt(format!(
                        "{what}: argon2 time, memory and cpus must be at least 1"
                    )));
                }
                limits.check(Limit::Argon2Memory, what, "kdf.memory", memory_kib.into())?;
                limits.check(Limit::Argon2Time, what, "kdf.time", time.into())?;
                limits.check(Limit::Argon2Lanes, what, "kdf.cpus", lanes.into())
            }
        }
    }

    /// Derive `out.len()` bytes from `passphrase`, after [`check`](Self::check)ing the
    /// parameters against `limits`.
    pub fn derive(
        &self,
        passphrase: &[u8],
        salt: &[u8],
        out: &mut [u8],
        limits: &UnlockLimits,
        what: &str,
    ) -> Result<()> {
        self.check(limits, what)?;
        match *self {
            KdfParams::Pbkdf2 { hash, iterations } => {
                hash.pbkdf2(passphrase, salt, iterations, out);
                Ok(())
            }
            KdfParams::Argon2 {
                kind,
                time,
                memory_kib,
                lanes,
            } => argon2(kind, passphrase, salt, time, memory_kib, lanes, out),
        }
    }
}

/// Bytes of keyslot material for a key of `key_len` bytes, rounded up to 512.
pub fn material_len(key_len: usize, stripes: u32) -> Result<usize> {
    af_len(key_len, stripes)?
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::Corrupt("keyslot material size overflows".into()))
}

/// AF-split `volume_key` and encrypt it with `slot_key`: the bytes to store.
pub fn seal(
    volume_key: &[u8],
    slot_key: &[u8],
    stripes: u32,
    af_hash: Hash,
) -> Result<Zeroizing<Vec<u8>>> {
    let split = af_split(volume_key, stripes, af_hash)?;
    let mut out = Zeroizing::new(vec![0u8; material_len(volume_key.len(), stripes)?]);
    out[..split.len()].copy_from_slice(&split);
    SectorCipher::new(slot_key, 512)?.encrypt(&mut out, 0)?;
    Ok(out)
}

/// Decrypt stored material with `slot_key` and merge it into a candidate volume key.
pub fn unseal(
    material: &[u8],
    slot_key: &[u8],
    key_len: usize,
    stripes: u32,
    af_hash: Hash,
) -> Result<Zeroizing<Vec<u8>>> {
    let len = material_len(key_len, stripes)?;
    if material.len() < len {
        return Err(Error::Corrupt("keyslot area too small".into()));
    }
    let mut plain = Zeroizing::new(material[..len].to_vec());
    SectorCipher::new(slot_key, 512)?.decrypt(&mut plain, 0)?;
    af_merge(&plain, key_len, stripes, af_hash)
}

/// Check that a cipher spec is aes-xts-plain64 (the only one Ember serves).
pub fn check_cipher(spec: &str) -> Result<()> {
    if spec.eq_ignore_ascii_case("aes-xts-plain64") {
        Ok(())
    } else {
        Err(Error::UnsupportedCipher(spec.to_string()))
    }
}

/// A random version-4 UUID, lowercase.
pub fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    crate::kdf::random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_unseal_roundtrip() {
        let vk = [7u8; 64];
        let sk = [9u8; 64];
        let m = seal(&vk, &sk, AF_STRIPES, Hash::Sha256).unwrap();
        assert_eq!(m.len(), 256000);
        let got = unseal(&m, &sk, 64, AF_STRIPES, Hash::Sha256).unwrap();
        assert_eq!(&got[..], &vk[..]);
        let wrong = unseal(&m, &[1u8; 64], 64, AF_STRIPES, Hash::Sha256).unwrap();
        assert_ne!(&wrong[..], &vk[..]);
    }

    /// The error deriving a 32-byte key with `kdf` under `limits` (it must fail).
    fn derive_err(kdf: &KdfParams, limits: &UnlockLimits, slot: &str) -> Error {
        let mut out = [0u8; 32];
        kdf.derive(b"x", &[0; 32], &mut out, limits, slot)
            .unwrap_err()
    }

    #[test]
    fn kdf_caps_refuse_before_any_work() {
        let k = KdfParams::Argon2 {
            kind: Argon2Type::Id,
            time: 1,
            memory_kib: 65536,
            lanes: 1,
        };
        let limits = UnlockLimits {
            argon2_memory_kib: 1024,
            ..UnlockLimits::default()
        };
        let e = derive_err(&k, &limits, "keyslot 3");
        assert!(matches!(
            e,
            Error::LimitExceeded {
                field: "kdf.memory",
                value: 65536,
                limit: 1024,
                ..
            }
        ));
        let m = e.to_string();
        assert!(m.contains("keyslot 3") && m.contains("65536 KiB"), "{m}");
        // A PBKDF2 count of u32::MAX would run for half an hour: refused at once.
        let p = KdfParams::Pbkdf2 {
            hash: Hash::Sha256,
            iterations: u32::MAX,
        };
        let t = std::time::Instant::now();
        let e = derive_err(&p, &UnlockLimits::default(), "keyslot 0");
        assert!(e.to_string().contains("--max-pbkdf2-iterations"), "{e}");
        assert!(t.elapsed().as_secs() < 5);
        // Argon2 passes and lanes.
        for (time, memory_kib, lanes, limit) in [
            (u32::MAX, 64, 1, "kdf.time"),
            (1, 1 << 20, 1 << 20, "kdf.cpus"),
        ] {
            let a = KdfParams::Argon2 {
                kind: Argon2Type::I,
                time,
                memory_kib,
                lanes,
            };
            let e = derive_err(&a, &UnlockLimits::default(), "keyslot 1");
            assert!(
                matches!(e, Error::LimitExceeded { field, .. } if field == limit),
                "{e}"
            );
        }
        // Zero costs are corrupt, not "free".
        let z = KdfParams::Pbkdf2 {
            hash: Hash::Sha1,
            iterations: 0,
        };
        assert!(matches!(
            derive_err(&z, &UnlockLimits::default(), "keyslot 0"),
            Error::Corrupt(_)
        ));
    }

    #[test]
    fn material_len_is_checked() {
        assert_eq!(material_len(64, 4000).unwrap(), 256000);
        assert_eq!(material_len(32, 4000).unwrap(), 128000);
        assert_eq!(material_len(20, 1).unwrap(), 512);
        assert!(material_len(usize::MAX, 2).is_err());
        assert!(material_len(usize::MAX - 10, 1).is_err()); // rounding up to 512 overflows
    }

    #[test]
    fn uuid_shape() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
