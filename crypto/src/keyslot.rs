//! What LUKS1 and LUKS2 keyslots share: the KDF that turns a passphrase into a slot key,
//! and sealing (AF split, then aes-xts-plain64 with 512-byte sectors and IVs counted from
//! the start of the keyslot area) or unsealing the volume key.

use crate::error::{Error, Result};
use crate::kdf::{af_merge, af_split, argon2, Argon2Type, Hash};
use crate::xts::SectorCipher;
use zeroize::Zeroizing;

/// Stripes of the anti-forensic splitter, as cryptsetup and QEMU use.
pub const AF_STRIPES: u32 = 4000;

/// Default cap on argon2 memory when opening a volume (KiB): 1 GiB, what cryptsetup
/// allows by default.
pub const DEFAULT_MAX_ARGON2_KIB: u64 = 1 << 20;

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
    /// Derive `out.len()` bytes from `passphrase`. `limit_kib` caps argon2 memory.
    pub fn derive(
        &self,
        passphrase: &[u8],
        salt: &[u8],
        out: &mut [u8],
        limit_kib: u64,
        slot: usize,
    ) -> Result<()> {
        match *self {
            KdfParams::Pbkdf2 { hash, iterations } => {
                if iterations == 0 {
                    return Err(Error::Corrupt(format!(
                        "keyslot {slot}: zero PBKDF2 iterations"
                    )));
                }
                hash.pbkdf2(passphrase, salt, iterations, out);
                Ok(())
            }
            KdfParams::Argon2 {
                kind,
                time,
                memory_kib,
                lanes,
            } => {
                if u64::from(memory_kib) > limit_kib {
                    return Err(Error::KdfMemoryTooHigh {
                        slot,
                        need_kib: memory_kib.into(),
                        limit_kib,
                    });
                }
                argon2(kind, passphrase, salt, time, memory_kib, lanes, out)
            }
        }
    }
}

/// Bytes of keyslot material for a key of `key_len` bytes, rounded up to 512.
pub fn material_len(key_len: usize, stripes: u32) -> usize {
    (key_len * stripes as usize).div_ceil(512) * 512
}

/// AF-split `volume_key` and encrypt it with `slot_key`: the bytes to store.
pub fn seal(
    volume_key: &[u8],
    slot_key: &[u8],
    stripes: u32,
    af_hash: Hash,
) -> Result<Zeroizing<Vec<u8>>> {
    let split = af_split(volume_key, stripes, af_hash)?;
    let mut out = Zeroizing::new(vec![0u8; material_len(volume_key.len(), stripes)]);
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
    let len = material_len(key_len, stripes);
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

    #[test]
    fn argon2_memory_cap() {
        let k = KdfParams::Argon2 {
            kind: Argon2Type::Id,
            time: 1,
            memory_kib: 65536,
            lanes: 1,
        };
        let mut out = [0u8; 32];
        let e = k.derive(b"x", &[0; 32], &mut out, 1024, 3).unwrap_err();
        assert!(matches!(
            e,
            Error::KdfMemoryTooHigh {
                slot: 3,
                need_kib: 65536,
                limit_kib: 1024
            }
        ));
        assert!(e.to_string().contains("65536"));
    }

    #[test]
    fn uuid_shape() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
