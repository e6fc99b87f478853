//! CHAP for iSCSI logins (RFC 7143 §12.1.3, RFC 1994): one-way (the target checks the
//! initiator) and mutual (the initiator checks the target too).
//!
//! Response = H(identifier byte ‖ secret ‖ challenge) with H chosen by `CHAP_A`:
//! 5 = MD5 (the only algorithm RFC 7143 requires), 6 = SHA-1, 7 = SHA-256 (IANA "PPP
//! Authentication Algorithms", as the Linux target and open-iscsi use them). An
//! `iscsi://` URI offers MD5 unless told otherwise (like open-iscsi's default
//! `chap_algs = MD5`); LUN pools of `emberd serve` offer SHA-256 then MD5 by default.
//! tgtd (1.0.85 to 1.0.97, `usr/iscsi/chap.c`) knows only codes 5 and 7 and computes
//! SHA-1 for 7, so a SHA-256 offer fails against it; the login names that cause
//! ([`super::login`]).
//!
//! Secrets live in [`Zeroizing`] buffers and are never logged or put in `Debug` output.

use std::fmt;
use zeroize::Zeroizing;

/// Shortest challenge Ember sends or accepts (RFC 7143 §12.1.3: at least as long as the
/// digest; 16 bytes covers MD5).
pub const MIN_CHALLENGE_BYTES: usize = 16;
/// Longest challenge accepted from a target (RFC 7143 allows 1024 bytes).
pub const MAX_CHALLENGE_BYTES: usize = 1024;
/// Length of the challenges Ember sends for mutual CHAP.
pub const OUR_CHALLENGE_BYTES: usize = 32;

/// A CHAP digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlg {
    /// MD5 (`CHAP_A=5`).
    Md5,
    /// SHA-1 (`CHAP_A=6`).
    Sha1,
    /// SHA-256 (`CHAP_A=7`).
    Sha256,
}

impl ChapAlg {
    /// The `CHAP_A` number.
    pub fn code(self) -> u32 {
        match self {
            ChapAlg::Md5 => 5,
            ChapAlg::Sha1 => 6,
            ChapAlg::Sha256 => 7,
        }
    }

    /// From a `CHAP_A` number.
    pub fn from_code(c: u32) -> Option<ChapAlg> {
        match c {
            5 => Some(ChapAlg::Md5),
            6 => Some(ChapAlg::Sha1),
            7 => Some(ChapAlg::Sha256),
            _ => None,
        }
    }

    /// From a name in a URI (`md5`, `sha1`, `sha256`).
    pub fn from_name(n: &str) -> Option<ChapAlg> {
        match n.to_ascii_lowercase().as_str() {
            "md5" => Some(ChapAlg::Md5),
            "sha1" => Some(ChapAlg::Sha1),
            "sha256" => Some(ChapAlg::Sha256),
            _ => None,
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlg::Md5 => 16,
            ChapAlg::Sha1 => 20,
            ChapAlg::Sha256 => 32,
        }
    }

    /// The CHAP response to `challenge` with `id` and `secret`.
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        fn h<D: md5::Digest>(id: u8, s: &[u8], c: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(s);
            d.update(c);
            d.finalize().to_vec()
        }
        match self {
            ChapAlg::Md5 => h::<md5::Md5>(id, secret, challenge),
            ChapAlg::Sha1 => h::<sha1::Sha1>(id, secret, challenge),
            ChapAlg::Sha256 => h::<sha2::Sha256>(id, secret, challenge),
        }
    }
}

/// CHAP credentials for one target.
#[derive(Clone)]
pub struct ChapCredentials {
    /// Name Ember logs in with (`CHAP_N`).
    pub user: String,
    /// Secret shared with the target.
    pub secret: Zeroizing<Vec<u8>>,
    /// Mutual CHAP: the name and secret the target must answer with.
    pub target: Option<(String, Zeroizing<Vec<u8>>)>,
    /// Algorithms offered, preferred first.
    pub algorithms: Vec<ChapAlg>,
}

impl fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .field("mutual", &self.target.as_ref().map(|t| &t.0))
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl ChapCredentials {
    /// Parse a credentials file: `key = value` lines (`#` comments), keys `user`,
    /// `secret`, optional `target_user` and `target_secret` (mutual CHAP) and
    /// `algorithms` (comma-separated `md5`, `sha1`, `sha256`; default `md5`).
    pub fn parse_file(text: &str) -> Result<ChapCredentials, String> {
        let mut user = None;
        let mut secret = None;
        let mut tuser = None;
        let mut tsecret = None;
        let mut algorithms = vec![ChapAlg::Md5];
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: expected key = value", n + 1))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "user" => user = Some(v.to_string()),
                "secret" => secret = Some(Zeroizing::new(v.as_bytes().to_vec())),
                "target_user" => tuser = Some(v.to_string()),
                "target_secret" => tsecret = Some(Zeroizing::new(v.as_bytes().to_vec())),
                "algorithms" => {
                    algorithms = v
                        .split(',')
                        .map(|a| {
                            ChapAlg::from_name(a.trim())
                                .ok_or_else(|| format!("line {}: unknown algorithm {a:?}", n + 1))
                        })
                        .collect::<Result<_, _>>()?;
                }
                other => return Err(format!("line {}: unknown key {other:?}", n + 1)),
            }
        }
        let user = user.ok_or("missing user")?;
        let secret = secret.ok_or("missing secret")?;
        if secret.is_empty() {
            return Err("empty secret".into());
        }
        let target = match (tuser, tsecret) {
            (Some(u), Some(s)) if !s.is_empty() => Some((u, s)),
            (None, None) => None,
            _ => return Err("mutual CHAP needs both target_user and target_secret".into()),
        };
        if target.as_ref().is_some_and(|t| t.1 == secret) {
            // RFC 7143 §12.1.3: the two directions must use different secrets.
            return Err("target_secret must differ from secret".into());
        }
        if algorithms.is_empty() {
            return Err("no CHAP algorithm".into());
        }
        Ok(ChapCredentials {
            user,
            secret,
            target,
            algorithms,
        })
    }
}

/// Decode a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 2 * MAX_CHALLENGE_BYTES + 1 {
            return None;
        }
        // An odd number of digits has an implied leading zero.
        let padded;
        let h = if h.len() % 2 == 1 {
            padded = format!("0{h}");
            padded.as_str()
        } else {
            h
        };
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect()
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)
    } else {
        None
    }
}

/// Encode bytes as `0x` hex.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = s.trim_end_matches('=');
    if s.len() > MAX_CHALLENGE_BYTES * 4 / 3 + 4 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = A.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_match_reference_digests() {
        // RFC 1994 CHAP: MD5(id ‖ secret ‖ challenge), computed independently with
        // `printf '\x01secretchallenge...' | md5sum` and sha256sum.
        let ch = b"0123456789abcdef";
        assert_eq!(
            encode_hex(&ChapAlg::Md5.response(1, b"secret", ch)),
            "0x1166c5a4d653b5f41cc0431512a91a1c"
        );
        assert_eq!(
            encode_hex(&ChapAlg::Sha256.response(1, b"secret", ch)),
            "0x522793e21c2154b398008b91188ea8e0efecf2e328088117ac4cf13dfc809946"
        );
        assert_eq!(ChapAlg::Sha1.response(1, b"s", ch).len(), 20);
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary(&format!("0x{}", "00".repeat(2000))), None);
        assert_eq!(encode_hex(&[0, 255]), "0x00ff");
    }

    #[test]
    fn credentials_file() {
        let c = ChapCredentials::parse_file(
            "# CHAP for the array\nuser = ember\nsecret = s3cret-s3cret\n\
             target_user = array\ntarget_secret = other-secret\nalgorithms = sha256, md5\n",
        )
        .unwrap();
        assert_eq!(c.user, "ember");
        assert_eq!(c.secret.as_slice(), b"s3cret-s3cret");
        assert_eq!(c.algorithms, vec![ChapAlg::Sha256, ChapAlg::Md5]);
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(ChapCredentials::parse_file("user=a\n").is_err());
        assert!(ChapCredentials::parse_file("user=a\nsecret=b\ntarget_user=t\n").is_err());
        assert!(
            ChapCredentials::parse_file("user=a\nsecret=b\ntarget_user=t\ntarget_secret=b\n")
                .is_err()
        );
        assert!(ChapCredentials::parse_file("user=a\nsecret=b\nalgorithms=crc\n").is_err());
        assert!(ChapCredentials::parse_file("user=a\nsecret=b\nbogus=1\n").is_err());
    }
}
