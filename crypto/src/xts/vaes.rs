//! The fast path: XTS with VAES (two AES blocks per 256-bit instruction) on AVX2.
//!
//! This is the crate's only unsafe code (the intrinsics). Per 16-block step it loads
//! eight 256-bit words, XORs tweak and round key 0, runs the AES rounds on all eight
//! (so the AES units stay busy), and folds the final tweak XOR into the last round key
//! (`aesenclast(x, k ⊕ T) = aesenclast(x, k) ⊕ T`). Tweaks advance by α^16 per lane with
//! byte shifts: `T·x^16 = (T << 16) ⊕ (T >> 112)·0x87`, where the carry-less product with
//! 0x87 = x^7+x^2+x+1 is four shifted XORs (the high part has only 16 bits).
//!
//! Safety argument, in one place: every `unsafe` here is either a call to a
//! `#[target_feature]` function or an intrinsic inside one. [`Keys`] can only be built by
//! [`Keys::new`], which checks at run time that the CPU has AES-NI, VAES and AVX2, and the
//! only entry points ([`Keys::run`]) take `&Keys`; so the features are present whenever
//! that code runs. Memory is accessed only through unaligned loads/stores within slices
//! whose length was checked to be a multiple of 256 bytes.

#![allow(unsafe_code)]

use std::arch::x86_64::*;
use zeroize::Zeroize;

/// Expanded AES round keys (encryption and decryption), zeroized on drop.
pub(super) struct Keys {
    enc: [u128; 15],
    dec: [u128; 15],
    rounds: usize,
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
    }
}

impl Clone for Keys {
    fn clone(&self) -> Self {
        Keys {
            enc: self.enc,
            dec: self.dec,
            rounds: self.rounds,
        }
    }
}

/// Does this CPU have what the fast path needs?
pub(super) fn available() -> bool {
    is_x86_feature_detected!("aes")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("avx2")
}

macro_rules! prefix_xor {
    ($k:expr) => {{
        let k = $k;
        let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        _mm_xor_si128(k, _mm_slli_si128::<8>(k))
    }};
}

#[target_feature(enable = "aes,sse2")]
fn expand128(key: &[u8; 16], rk: &mut [__m128i; 15]) {
    macro_rules! step {
        ($i:expr, $rcon:expr) => {{
            let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
            rk[$i] = _mm_xor_si128(prefix_xor!(rk[$i - 1]), t);
        }};
    }
    // SAFETY: reading 16 bytes from a 16-byte array.
    rk[0] = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
    step!(1, 0x01);
    step!(2, 0x02);
    step!(3, 0x04);
    step!(4, 0x08);
    step!(5, 0x10);
    step!(6, 0x20);
    step!(7, 0x40);
    step!(8, 0x80);
    step!(9, 0x1b);
    step!(10, 0x36);
}

#[target_feature(enable = "aes,sse2")]
fn expand256(key: &[u8; 32], rk: &mut [__m128i; 15]) {
    macro_rules! even {
        ($i:expr, $rcon:expr) => {{
            let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
            rk[$i] = _mm_xor_si128(prefix_xor!(rk[$i - 2]), t);
        }};
    }
    macro_rules! odd {
        ($i:expr) => {{
            let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(rk[$i - 1]));
            rk[$i] = _mm_xor_si128(prefix_xor!(rk[$i - 2]), t);
        }};
    }
    // SAFETY: reading 2 × 16 bytes from a 32-byte array.
    unsafe {
        rk[0] = _mm_loadu_si128(key.as_ptr().cast());
        rk[1] = _mm_loadu_si128(key.as_ptr().add(16).cast());
    }
    even!(2, 0x01);
    odd!(3);
    even!(4, 0x02);
    odd!(5);
    even!(6, 0x04);
    odd!(7);
    even!(8, 0x08);
    odd!(9);
    even!(10, 0x10);
    odd!(11);
    even!(12, 0x20);
    odd!(13);
    even!(14, 0x40);
}

#[target_feature(enable = "aes,sse2")]
fn expand(key: &[u8], enc: &mut [u128; 15], dec: &mut [u128; 15]) -> usize {
    let mut rk = [_mm_setzero_si128(); 15];
    let rounds = if let Ok(k) = <&[u8; 32]>::try_from(key) {
        expand256(k, &mut rk);
        14
    } else if let Ok(k) = <&[u8; 16]>::try_from(key) {
        expand128(k, &mut rk);
        10
    } else {
        return 0;
    };
    let mut d = [_mm_setzero_si128(); 15];
    d[0] = rk[rounds];
    for i in 1..rounds {
        d[i] = _mm_aesimc_si128(rk[rounds - i]);
    }
    d[rounds] = rk[0];
    for i in 0..=rounds {
        // SAFETY: __m128i and u128 have the same size; unaligned store into a u128.
        unsafe {
            _mm_storeu_si128(std::ptr::from_mut(&mut enc[i]).cast(), rk[i]);
            _mm_storeu_si128(std::ptr::from_mut(&mut dec[i]).cast(), d[i]);
        }
    }
    rk.iter_mut()
        .chain(d.iter_mut())
        .for_each(|r| *r = _mm_setzero_si128());
    rounds
}

/// `T · x^16` in each 128-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
fn mul_a16(t: __m256i) -> __m256i {
    let hi = _mm256_bsrli_epi128::<14>(t);
    let lo = _mm256_bslli_epi128::<2>(t);
    let red = _mm256_xor_si256(
        _mm256_xor_si256(hi, _mm256_slli_epi64::<1>(hi)),
        _mm256_xor_si256(_mm256_slli_epi64::<2>(hi), _mm256_slli_epi64::<7>(hi)),
    );
    _mm256_xor_si256(lo, red)
}

/// `t · x^i` for `i ≤ 16`, scalar.
#[inline]
fn mul_ai(t: u128, i: u32) -> u128 {
    if i == 0 {
        return t;
    }
    let h = t >> (128 - i);
    (t << i) ^ h ^ (h << 1) ^ (h << 2) ^ (h << 7)
}

impl Keys {
    /// Expand `key` (16 or 32 bytes) if the CPU supports the fast path.
    pub(super) fn new(key: &[u8]) -> Option<Keys> {
        if !available() || (key.len() != 16 && key.len() != 32) {
            return None;
        }
        let mut k = Keys {
            enc: [0; 15],
            dec: [0; 15],
            rounds: 0,
        };
        // SAFETY: `available()` confirmed AES-NI (and SSE2 is baseline on x86_64).
        k.rounds = unsafe { expand(key, &mut k.enc, &mut k.dec) };
        Some(k)
    }

    /// En- or decrypt consecutive sectors of `sector_size` bytes whose first tweaks
    /// (already encrypted with key 2) are `t0s`: from `src` into `data` when `src` is given
    /// (same length), else in place.
    pub(super) fn run(
        &self,
        encrypt: bool,
        src: Option<&[u8]>,
        data: &mut [u8],
        t0s: &[u128],
        sector_size: usize,
    ) {
        assert!(sector_size.is_multiple_of(256), "sector size");
        assert_eq!(data.len(), t0s.len() * sector_size, "data length");
        assert!(src.is_none_or(|s| s.len() == data.len()), "source length");
        // SAFETY: a `Keys` exists only if `available()` returned true (see module docs);
        // the lengths were checked just above.
        unsafe {
            if encrypt {
                self.run_impl::<true>(src, data, t0s, sector_size)
            } else {
                self.run_impl::<false>(src, data, t0s, sector_size)
            }
        }
    }

    #[target_feature(enable = "aes,vaes,avx2")]
    fn run_impl<const ENC: bool>(
        &self,
        src: Option<&[u8]>,
        data: &mut [u8],
        t0s: &[u128],
        sector_size: usize,
    ) {
        let keys = if ENC { &self.enc } else { &self.dec };
        let nr = self.rounds;
        let mut rk = [_mm256_setzero_si256(); 15];
        for (r, k) in rk.iter_mut().zip(keys.iter()).take(nr + 1) {
            // SAFETY: reading 16 bytes from a u128.
            *r = _mm256_broadcastsi128_si256(unsafe {
                _mm_loadu_si128(std::ptr::from_ref(k).cast())
            });
        }
        let rk0 = rk[0];
        let rkl = rk[nr];
        let len = data.len();
        let dst_base = data.as_mut_ptr();
        // In place: read from the destination itself (every 256-byte step is loaded
        // completely before any of it is stored).
        let src_base = src.map_or(dst_base.cast_const(), <[u8]>::as_ptr);
        for (s, &t0) in t0s.iter().enumerate().take(len / sector_size) {
            let mut tw = [0u128; 16];
            for (i, t) in tw.iter_mut().enumerate() {
                *t = mul_ai(t0, i as u32);
            }
            let mut t = [_mm256_setzero_si256(); 8];
            for (i, v) in t.iter_mut().enumerate() {
                // SAFETY: reading 32 bytes (two u128) at index 2i < 16.
                *v = unsafe { _mm256_loadu_si256(tw.as_ptr().add(2 * i).cast()) };
            }
            for step in 0..sector_size / 256 {
                let at = s * sector_size + step * 256;
                debug_assert!(at + 256 <= len);
                let mut x = [_mm256_setzero_si256(); 8];
                for i in 0..8 {
                    // SAFETY: 32-byte load at `at + 32i`, inside the source (same length as
                    // `data`, checked by `run`): at + 256 <= len.
                    let v = unsafe { _mm256_loadu_si256(src_base.add(at + 32 * i).cast()) };
                    x[i] = _mm256_xor_si256(v, _mm256_xor_si256(t[i], rk0));
                }
                for k in &rk[1..nr] {
                    for xi in x.iter_mut() {
                        *xi = if ENC {
                            _mm256_aesenc_epi128(*xi, *k)
                        } else {
                            _mm256_aesdec_epi128(*xi, *k)
                        };
                    }
                }
                for i in 0..8 {
                    let last = _mm256_xor_si256(rkl, t[i]);
                    let v = if ENC {
                        _mm256_aesenclast_epi128(x[i], last)
                    } else {
                        _mm256_aesdeclast_epi128(x[i], last)
                    };
                    // SAFETY: 32-byte store at `at + 32i` inside `data` (at + 256 <= len).
                    unsafe { _mm256_storeu_si256(dst_base.add(at + 32 * i).cast(), v) };
                    t[i] = mul_a16(t[i]);
                }
            }
        }
    }
}
