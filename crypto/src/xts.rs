//! AES-XTS sector cipher (`aes-xts-plain64`), multi-block.
//!
//! XTS (IEEE 1619) encrypts block `j` of a data unit as `C = E_k1(P ⊕ T_j) ⊕ T_j` with
//! `T_0 = E_k2(iv)` and `T_{j+1} = T_j · α` in GF(2^128). The LUKS IV is *plain64*: the
//! sector's byte offset within the data segment divided by 512, little-endian, even when
//! the encryption sector is 4096 bytes (cryptsetup does not set `iv_large_sectors` for
//! LUKS2), so a 4096-byte sector at offset `o` uses `iv = o / 512`.
//!
//! Speed: rather than one AES call per block, we work on chunks of up to
//! [`CHUNK_BLOCKS`] blocks (several small sectors at once): encrypt every sector's IV in one
//! multi-block call, expand the tweaks with 128-bit shifts, XOR them in, run the `aes`
//! crate's multi-block `encrypt_blocks` (AES-NI / VAES pipelined), XOR them again.
//! On x86_64 CPUs with VAES and AVX2 the bulk work goes to [`vaes`], our own kernel that
//! keeps tweak XORs inside the AES pipeline (the crate's only unsafe code); elsewhere, a
//! portable path over the `aes` crate's multi-block calls.

use crate::error::{Error, Result};
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256, Block};

#[cfg(target_arch = "x86_64")]
mod vaes;

/// Sectors per call into the fast kernel (16 KiB of 512-byte sectors).
#[cfg(target_arch = "x86_64")]
const FAST_SECTORS: usize = 32;

/// Blocks processed per inner chunk (4 KiB: fits L1 with its tweaks).
const CHUNK_BLOCKS: usize = 256;
/// AES block size.
const BLOCK: usize = 16;

/// One AES key schedule, 128 or 256 bits.
#[derive(Clone)]
enum AesKey {
    A128(Box<Aes128>),
    A256(Box<Aes256>),
}

impl AesKey {
    fn new(key: &[u8]) -> Result<Self> {
        match key.len() {
            16 => Ok(AesKey::A128(Box::new(
                Aes128::new_from_slice(key).map_err(|_| Error::BadKeySize(key.len() * 2))?,
            ))),
            32 => Ok(AesKey::A256(Box::new(
                Aes256::new_from_slice(key).map_err(|_| Error::BadKeySize(key.len() * 2))?,
            ))),
            n => Err(Error::BadKeySize(n * 2)),
        }
    }

    #[inline]
    fn encrypt_blocks(&self, b: &mut [Block]) {
        match self {
            AesKey::A128(k) => k.encrypt_blocks(b),
            AesKey::A256(k) => k.encrypt_blocks(b),
        }
    }

    #[inline]
    fn decrypt_blocks(&self, b: &mut [Block]) {
        match self {
            AesKey::A128(k) => k.decrypt_blocks(b),
            AesKey::A256(k) => k.decrypt_blocks(b),
        }
    }
}

/// The `aes-xts-plain64` cipher of one LUKS volume: a volume key and a sector size.
///
/// Not `Debug` on purpose (it holds key schedules); the `aes` key schedules zeroize on drop.
#[derive(Clone)]
pub struct SectorCipher {
    k1: AesKey,
    k2: AesKey,
    sector_size: usize,
    /// Key 1 expanded for the VAES kernel, when the CPU has it.
    #[cfg(target_arch = "x86_64")]
    fast: Option<Box<vaes::Keys>>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("key_bits", &self.key_bits())
            .field("sector_size", &self.sector_size)
            .finish_non_exhaustive()
    }
}

#[inline]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ (((t as i128) >> 127) as u128 & 0x87)
}

impl SectorCipher {
    /// A cipher for `key` (32 bytes: XTS-AES-128, 64 bytes: XTS-AES-256) and an encryption
    /// sector of 512..=4096 bytes (a power of two).
    pub fn new(key: &[u8], sector_size: usize) -> Result<Self> {
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(Error::BadSectorSize(sector_size as u64));
        }
        if key.len() != 32 && key.len() != 64 {
            return Err(Error::BadKeySize(key.len()));
        }
        let (a, b) = key.split_at(key.len() / 2);
        Ok(SectorCipher {
            k1: AesKey::new(a)?,
            k2: AesKey::new(b)?,
            sector_size,
            #[cfg(target_arch = "x86_64")]
            fast: vaes::Keys::new(a).map(Box::new),
        })
    }

    /// Encryption sector size in bytes.
    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    /// Volume key size in bits (256 or 512).
    pub fn key_bits(&self) -> usize {
        let half = match self.k1 {
            AesKey::A128(_) => 128,
            AesKey::A256(_) => 256,
        };
        half * 2
    }

    fn check(&self, len: usize, offset: u64) -> Result<()> {
        let ss = self.sector_size as u64;
        if !(len as u64).is_multiple_of(ss) || !offset.is_multiple_of(ss) {
            return Err(Error::Misaligned {
                offset,
                len: len as u64,
                sector_size: self.sector_size,
            });
        }
        Ok(())
    }

    /// Encrypt `data` in place. `offset` is the byte offset of `data[0]` within the data
    /// segment; both it and the length must be multiples of the sector size.
    pub fn encrypt(&self, data: &mut [u8], offset: u64) -> Result<()> {
        self.check(data.len(), offset)?;
        self.run(data, offset, true);
        Ok(())
    }

    /// Decrypt `data` in place (see [`encrypt`](Self::encrypt)).
    pub fn decrypt(&self, data: &mut [u8], offset: u64) -> Result<()> {
        self.check(data.len(), offset)?;
        self.run(data, offset, false);
        Ok(())
    }

    /// Encrypt `src` into `dst` (same length), leaving `src` untouched.
    pub fn encrypt_to(&self, src: &[u8], dst: &mut [u8], offset: u64) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::Misaligned {
                offset,
                len: dst.len() as u64,
                sector_size: self.sector_size,
            });
        }
        self.check(dst.len(), offset)?;
        self.run_from(Some(src), dst, offset, true);
        Ok(())
    }

    fn run(&self, data: &mut [u8], offset: u64, encrypt: bool) {
        self.run_from(None, data, offset, encrypt);
    }

    /// En- or decrypt `data` in place, or `src` into `data` (same length, checked).
    fn run_from(&self, src: Option<&[u8]>, data: &mut [u8], offset: u64, encrypt: bool) {
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = &self.fast {
            let ss = self.sector_size;
            let mut ivs = [Block::default(); FAST_SECTORS];
            let mut t0s = [0u128; FAST_SECTORS];
            let mut iv = offset / 512;
            let iv_step = (ss / 512) as u64;
            for (ci, chunk) in data.chunks_mut(ss * FAST_SECTORS).enumerate() {
                let n = chunk.len() / ss;
                let start = ci * ss * FAST_SECTORS;
                let from = src.and_then(|s| s.get(start..start + chunk.len()));
                for b in ivs.iter_mut().take(n) {
                    let mut x = [0u8; BLOCK];
                    x[..8].copy_from_slice(&iv.to_le_bytes());
                    *b = Block::from(x);
                    iv = iv.wrapping_add(iv_step);
                }
                self.k2.encrypt_blocks(&mut ivs[..n]);
                for (t, b) in t0s.iter_mut().zip(&ivs[..n]) {
                    *t = u128::from_le_bytes(b.0);
                }
                fast.run(encrypt, from, chunk, &t0s[..n], ss);
            }
            return;
        }
        if let Some(s) = src {
            data.copy_from_slice(s);
        }
        self.run_portable(data, offset, encrypt);
    }

    fn run_portable(&self, data: &mut [u8], offset: u64, encrypt: bool) {
        let ss = self.sector_size;
        // A chunk holds whole sectors: one 4096-byte sector or several smaller ones.
        let chunk_bytes = (CHUNK_BLOCKS * BLOCK).max(ss);
        let sectors_per_chunk = chunk_bytes / ss;
        let blocks_per_sector = ss / BLOCK;
        let mut tweaks = [0u128; CHUNK_BLOCKS];
        let mut ivs = [Block::default(); CHUNK_BLOCKS * BLOCK / 512];
        let mut iv = offset / 512;
        let iv_step = (ss / 512) as u64;
        for chunk in data.chunks_mut(chunk_bytes) {
            let n_sectors = chunk.len() / ss;
            debug_assert!(n_sectors <= sectors_per_chunk);
            // First tweak of every sector in one multi-block call.
            for s in ivs.iter_mut().take(n_sectors) {
                let mut b = [0u8; BLOCK];
                b[..8].copy_from_slice(&iv.to_le_bytes());
                *s = Block::from(b);
                iv = iv.wrapping_add(iv_step);
            }
            self.k2.encrypt_blocks(&mut ivs[..n_sectors]);
            for (s, t0) in ivs.iter().take(n_sectors).enumerate() {
                let mut t = u128::from_le_bytes(t0.0);
                for tw in &mut tweaks[s * blocks_per_sector..(s + 1) * blocks_per_sector] {
                    *tw = t;
                    t = mul_alpha(t);
                }
            }
            let nblocks = chunk.len() / BLOCK;
            let (blocks, _) = Block::slice_as_chunks_mut(chunk);
            xor_tweaks(blocks, &tweaks[..nblocks]);
            if encrypt {
                self.k1.encrypt_blocks(blocks);
            } else {
                self.k1.decrypt_blocks(blocks);
            }
            xor_tweaks(blocks, &tweaks[..nblocks]);
        }
    }
}

#[inline]
fn xor_tweaks(blocks: &mut [Block], tweaks: &[u128]) {
    for (b, t) in blocks.iter_mut().zip(tweaks) {
        let v = u128::from_le_bytes(b.0) ^ t;
        b.0 = v.to_le_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '\n'], "")).unwrap()
    }

    /// Plain single-block reference XTS, written straight from IEEE 1619.
    fn reference(key: &[u8], data: &mut [u8], iv: u64) {
        let (a, b) = key.split_at(key.len() / 2);
        let k1 = AesKey::new(a).unwrap();
        let k2 = AesKey::new(b).unwrap();
        let mut t = [Block::default()];
        t[0][..8].copy_from_slice(&iv.to_le_bytes());
        k2.encrypt_blocks(&mut t);
        let mut t = u128::from_le_bytes(t[0].0);
        for c in data.chunks_mut(16) {
            let mut b = [Block::from(
                (u128::from_le_bytes(c.try_into().unwrap()) ^ t).to_le_bytes(),
            )];
            k1.encrypt_blocks(&mut b);
            c.copy_from_slice(&(u128::from_le_bytes(b[0].0) ^ t).to_le_bytes());
            t = mul_alpha(t);
        }
    }

    /// Check an IEEE 1619-2007 Annex B vector (whole blocks only): the data unit is the
    /// whole buffer and its sequence number `iv` (our API takes byte offsets: iv × 512).
    fn run_unit(key: &[u8], iv: u64, pt: &[u8], ct: &[u8]) {
        // Units of 32 bytes are below the fast kernel's 256-byte step: portable path.
        let c = SectorCipher {
            k1: AesKey::new(&key[..key.len() / 2]).unwrap(),
            k2: AesKey::new(&key[key.len() / 2..]).unwrap(),
            sector_size: pt.len(),
            #[cfg(target_arch = "x86_64")]
            fast: None,
        };
        let mut d = pt.to_vec();
        c.run_portable(&mut d, iv * 512, true);
        assert_eq!(hex::encode(&d), hex::encode(ct));
        c.run_portable(&mut d, iv * 512, false);
        assert_eq!(d, pt);
        let mut r = pt.to_vec();
        reference(key, &mut r, iv);
        assert_eq!(r, ct);
    }

    #[test]
    fn ieee1619_vector_1() {
        run_unit(
            &[0u8; 32],
            0,
            &[0u8; 32],
            &h("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
        );
    }

    #[test]
    fn ieee1619_vector_2() {
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        run_unit(
            &key,
            0x33_3333_3333,
            &[0x44u8; 32],
            &h("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
        );
    }

    #[test]
    fn ieee1619_vector_3() {
        let key = h("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222");
        run_unit(
            &key,
            0x33_3333_3333,
            &[0x44u8; 32],
            &h("af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89"),
        );
    }

    fn seq512() -> Vec<u8> {
        (0..512).map(|i| (i % 256) as u8).collect()
    }

    #[test]
    fn ieee1619_vector_4_512_byte_unit() {
        let key = h("2718281828459045235360287471352631415926535897932384626433832795");
        let ct = h(
            "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c
            c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412
            328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce
            93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265
            5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8
            a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434
            1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c
            5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e
            94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc
            1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3
            e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344
            b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd
            74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752
            afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e
            bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d
            eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568",
        );
        run_unit(&key, 0, &seq512(), &ct);
        // The same through the public API: one 512-byte sector at offset 0.
        let c = SectorCipher::new(&key, 512).unwrap();
        let mut d = seq512();
        c.encrypt(&mut d, 0).unwrap();
        assert_eq!(d, ct);
    }

    #[test]
    fn ieee1619_vector_10_xts_aes_256() {
        // XTS-AES-256, data unit sequence number 0xff, 512-byte unit.
        let key = h("27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592");
        let ct_prefix = h("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b");
        let c = SectorCipher::new(&key, 512).unwrap();
        let mut d = seq512();
        c.encrypt(&mut d, 0xff * 512).unwrap();
        assert_eq!(&d[..32], &ct_prefix[..]);
        let mut r = seq512();
        reference(&key, &mut r, 0xff);
        assert_eq!(d, r);
        c.decrypt(&mut d, 0xff * 512).unwrap();
        assert_eq!(d, seq512());
    }

    #[test]
    fn multi_sector_matches_reference_all_sizes() {
        for key_len in [32, 64] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 7 + 3) as u8).collect();
            for ss in [512usize, 1024, 2048, 4096] {
                let c = SectorCipher::new(&key, ss).unwrap();
                let data: Vec<u8> = (0..ss * 19).map(|i| (i * 31 % 251) as u8).collect();
                let offset = (ss * 5) as u64;
                let mut enc = data.clone();
                c.encrypt(&mut enc, offset).unwrap();
                for (i, s) in data.chunks(ss).enumerate() {
                    let mut r = s.to_vec();
                    // plain64 in 512-byte units even for large sectors.
                    reference(&key, &mut r, (offset + (i * ss) as u64) / 512);
                    assert_eq!(&enc[i * ss..(i + 1) * ss], &r[..], "ss {ss} sector {i}");
                }
                let mut out = vec![0u8; data.len()];
                c.encrypt_to(&data, &mut out, offset).unwrap();
                assert_eq!(out, enc);
                // Portable and fast paths agree.
                let mut p = data.clone();
                c.run_portable(&mut p, offset, true);
                assert_eq!(p, enc);
                c.run_portable(&mut p, offset, false);
                assert_eq!(p, data);
                c.decrypt(&mut enc, offset).unwrap();
                assert_eq!(enc, data);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fast_path_is_used_when_available() {
        let c = SectorCipher::new(&[1u8; 64], 512).unwrap();
        assert_eq!(c.fast.is_some(), vaes::available());
    }

    #[test]
    fn encrypt_to_over_many_chunks_matches_in_place() {
        let key: Vec<u8> = (0..64u8).rev().collect();
        for ss in [512usize, 4096] {
            let c = SectorCipher::new(&key, ss).unwrap();
            let src: Vec<u8> = (0..ss * 70).map(|i| (i * 7 % 253) as u8).collect();
            let mut inplace = src.clone();
            c.encrypt(&mut inplace, 4096 * 3).unwrap();
            let mut out = vec![0u8; src.len()];
            c.encrypt_to(&src, &mut out, 4096 * 3).unwrap();
            assert_eq!(out, inplace);
            let mut p = src.clone();
            c.run_portable(&mut p, 4096 * 3, true);
            assert_eq!(p, inplace);
            assert!(c.encrypt_to(&src[..ss], &mut out, 0).is_err());
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            SectorCipher::new(&[0; 48], 512),
            Err(Error::BadKeySize(48))
        ));
        assert!(SectorCipher::new(&[0; 64], 8192).is_err());
        let c = SectorCipher::new(&[0; 64], 4096).unwrap();
        assert!(c.encrypt(&mut [0; 512], 0).is_err());
        assert!(c.encrypt(&mut [0; 4096], 512).is_err());
        assert_eq!(c.key_bits(), 512);
        assert!(!format!("{c:?}").contains("k1"));
    }
}
