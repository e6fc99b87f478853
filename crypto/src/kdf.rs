//! Hashes, key derivation (PBKDF2, Argon2) and the LUKS anti-forensic splitter.
//!
//! The AF splitter stretches a key of `n` bytes into `n * stripes` bytes so that wiping
//! any part of the stored material destroys the key: every stripe but the last is random,
//! each is XORed into an accumulator that is then *diffused* (hashed block by block, each
//! hash prefixed by its big-endian block index), and the last stripe is `key ⊕ acc`.

use crate::error::{Error, Result};
use sha2::Digest;
use zeroize::Zeroizing;

/// A hash usable for PBKDF2, LUKS1 digests and the AF splitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-1 (LUKS1 legacy).
    Sha1,
    /// SHA-256 (the default).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Hash {
    /// Parse a cryptsetup hash name.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            _ => Err(Error::UnsupportedHash(name.to_string())),
        }
    }

    /// The cryptsetup name.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
            Hash::Sha512 => "sha512",
        }
    }

    /// Digest size in bytes.
    pub fn size(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    /// Hash the concatenation of `parts` into `out` (truncated to `out.len()`).
    fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            let d = h.finalize();
            let n = out.len().min(d.len());
            out[..n].copy_from_slice(&d[..n]);
        }
        match self {
            Hash::Sha1 => run::<sha1::Sha1>(parts, out),
            Hash::Sha256 => run::<sha2::Sha256>(parts, out),
            Hash::Sha512 => run::<sha2::Sha512>(parts, out),
        }
    }

    /// PBKDF2-HMAC with this hash.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        }
    }
}

/// SHA-256 of `data` (LUKS2 header checksums).
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hash::Sha256.digest_into(parts, &mut out);
    out
}

/// Argon2 flavour of a LUKS2 keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Argon2Type {
    /// argon2i.
    I,
    /// argon2id.
    Id,
}

/// Argon2 (version 0x13) of `password` into `out`.
pub fn argon2(
    kind: Argon2Type,
    password: &[u8],
    salt: &[u8],
    time: u32,
    memory_kib: u32,
    lanes: u32,
    out: &mut [u8],
) -> Result<()> {
    let params = argon2::Params::new(memory_kib, time, lanes, Some(out.len()))
        .map_err(|e| Error::Kdf(format!("argon2 parameters: {e}")))?;
    let alg = match kind {
        Argon2Type::I => argon2::Algorithm::Argon2i,
        Argon2Type::Id => argon2::Algorithm::Argon2id,
    };
    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
        .hash_password_into(password, salt, out)
        .map_err(|e| Error::Kdf(format!("argon2: {e}")))
}

/// Fill `buf` from the system random generator.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|_| Error::Random)
}

/// The AF diffuse function, in place.
fn diffuse(hash: Hash, buf: &mut [u8]) {
    let ds = hash.size();
    let mut tmp = Zeroizing::new([0u8; 64]);
    for (i, block) in buf.chunks_mut(ds).enumerate() {
        // Keys are at most a few hundred bytes: the block index always fits (saturating
        // only to keep this function total).
        let idx = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        hash.digest_into(&[&idx, block], &mut tmp[..ds]);
        let n = block.len();
        block.copy_from_slice(&tmp[..n]);
    }
}

/// `key_len * stripes` in bytes, or an error if it does not fit memory arithmetic.
pub fn af_len(key_len: usize, stripes: u32) -> Result<usize> {
    usize::try_from(stripes)
        .ok()
        .and_then(|s| key_len.checked_mul(s))
        .ok_or_else(|| Error::Corrupt(format!("{key_len}-byte key × {stripes} stripes overflows")))
}

/// Split `key` into `key.len() * stripes` bytes of anti-forensic material.
pub fn af_split(key: &[u8], stripes: u32, hash: Hash) -> Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    if stripes == 0 || n == 0 {
        return Err(Error::InvalidParam(
            "AF split needs a key and at least one stripe".into(),
        ));
    }
    let total = af_len(n, stripes)?;
    let random_len = total - n; // stripes >= 1
    let mut out = Zeroizing::new(vec![0u8; total]);
    random(&mut out[..random_len])?;
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for s in out[..random_len].chunks(n) {
        acc.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut acc);
    }
    let last = &mut out[random_len..];
    for ((o, a), k) in last.iter_mut().zip(acc.iter()).zip(key) {
        *o = a ^ k;
    }
    Ok(out)
}

/// Merge anti-forensic material back into a key of `key_len` bytes. `material` may be
/// longer than `key_len * stripes` (a keyslot area); the rest is ignored.
pub fn af_merge(
    material: &[u8],
    key_len: usize,
    stripes: u32,
    hash: Hash,
) -> Result<Zeroizing<Vec<u8>>> {
    let total = af_len(key_len, stripes)?;
    if stripes == 0 || key_len == 0 || material.len() < total {
        return Err(Error::Corrupt(
            "key material shorter than key size × stripes".into(),
        ));
    }
    let random_len = total - key_len;
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for s in material[..random_len].chunks(key_len) {
        acc.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut acc);
    }
    let last = &material[random_len..total];
    acc.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    Ok(acc)
}

/// Constant-time comparison.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_rfc6070_sha1() {
        let mut out = [0u8; 20];
        Hash::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(hex::encode(out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
        Hash::Sha1.pbkdf2(b"password", b"salt", 4096, &mut out);
        assert_eq!(hex::encode(out), "4b007901b765489abead49d926f721d065a429c1");
    }

    #[test]
    fn pbkdf2_sha256_and_sha512_vectors() {
        let mut out = [0u8; 32];
        Hash::Sha256.pbkdf2(b"password", b"salt", 1, &mut out);
        assert_eq!(
            hex::encode(out),
            "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"
        );
        let mut out = [0u8; 64];
        Hash::Sha512.pbkdf2(b"password", b"salt", 1, &mut out);
        assert_eq!(
            hex::encode(out),
            "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
             c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
        );
    }

    #[test]
    fn argon2_reference_vectors() {
        // RFC 9106's vectors use a secret and associated data, which LUKS never does;
        // these are from the reference implementation (Debian's `argon2` CLI,
        // phc-winner-argon2): `echo -n password | argon2 somesalt -id -t 2 -m 16 -p 1 -l 32 -r`
        // (and `-i` for Argon2i). The output is as long as the expected hex says.
        for (kind, lanes, want) in [
            (
                Argon2Type::Id,
                1,
                "09316115d5cf24ed5a15a31a3ba326e5cf32edc24702987c02b6566f61913cf7",
            ),
            (
                Argon2Type::I,
                1,
                "c1628832147d9720c5bd1cfd61367078729f6dfb6f8fea9ff98158e0d7816ed0",
            ),
            // Four lanes (LUKS2 "cpus": 4): `argon2 somesalt -i -t 2 -m 16 -p 4 -l 24 -r`.
            (
                Argon2Type::I,
                4,
                "45d7ac72e76f242b20b77b9bf9bf9d5915894e669a24e6c6",
            ),
        ] {
            let mut out = vec![0u8; want.len() / 2];
            argon2(kind, b"password", b"somesalt", 2, 65536, lanes, &mut out).unwrap();
            assert_eq!(hex::encode(&out), want, "{kind:?}, {lanes} lanes");
        }
    }

    #[test]
    fn af_roundtrip_all_hashes() {
        let key: Vec<u8> = (0..64).collect();
        for h in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            for n in [32usize, 64] {
                let m = af_split(&key[..n], 4000, h).unwrap();
                assert_eq!(m.len(), n * 4000);
                assert_eq!(&af_merge(&m, n, 4000, h).unwrap()[..], &key[..n]);
                let mut bad = m.clone();
                bad[5] ^= 1;
                assert_ne!(&af_merge(&bad, n, 4000, h).unwrap()[..], &key[..n]);
            }
        }
    }

    /// Property: merge(split(k)) == k for any key length, stripe count and hash; extra
    /// trailing material is ignored; changing any byte of the material changes the key.
    #[test]
    fn af_split_merge_property() {
        let mut rng = crate::testrng::Rng::new(1);
        for case in 0..300 {
            let n = rng.range(1, 128) as usize;
            let stripes = if case % 50 == 0 {
                4000
            } else {
                rng.range(1, 64) as u32
            };
            let h = rng.pick(&[Hash::Sha1, Hash::Sha256, Hash::Sha512]);
            let key = rng.bytes(n);
            let m = af_split(&key, stripes, h).unwrap();
            assert_eq!(m.len(), n * stripes as usize);
            assert_eq!(
                &af_merge(&m, n, stripes, h).unwrap()[..],
                &key[..],
                "case {case}"
            );
            let mut longer = m.to_vec();
            let extra = rng.range(0, 600) as usize;
            longer.extend(rng.bytes(extra));
            assert_eq!(&af_merge(&longer, n, stripes, h).unwrap()[..], &key[..]);
            let at = rng.range(0, m.len() as u64 - 1) as usize;
            let mut bad = m.to_vec();
            bad[at] ^= 1 << rng.range(0, 7);
            // A flip in the last stripe reaches the key directly; one in an earlier
            // stripe goes through the diffusion hash, which maps a short key back onto
            // itself by chance (1 in 256 for a 1-byte key, and af_split's stripes are
            // random), so only keys of 8 bytes or more are held to that.
            if at >= (stripes as usize - 1) * n || n >= 8 {
                assert_ne!(
                    &af_merge(&bad, n, stripes, h).unwrap()[..],
                    &key[..],
                    "case {case}"
                );
            }
            assert!(af_merge(&m[..m.len() - 1], n, stripes, h).is_err());
        }
        assert!(af_split(&[1, 2], 0, Hash::Sha1).is_err());
        assert!(af_merge(&[0; 64], 0, 1, Hash::Sha1).is_err());
        assert!(af_merge(&[0; 64], 64, 0, Hash::Sha1).is_err());
        assert!(af_merge(&[0; 64], usize::MAX, u32::MAX, Hash::Sha1).is_err());
    }

    #[test]
    fn hash_names() {
        assert_eq!(Hash::parse("SHA256").unwrap(), Hash::Sha256);
        assert!(matches!(
            Hash::parse("ripemd160"),
            Err(Error::UnsupportedHash(_))
        ));
    }
}
