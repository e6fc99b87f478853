//! Text keys (RFC 7143 §6): `key=value` pairs separated by NUL bytes, as login and text
//! PDUs carry them, and the operational parameters they negotiate.
//!
//! [`Keys::parse`] bounds what a target can make us keep (number and length of keys);
//! [`Negotiated::apply`] checks each answer against what was offered (a target that
//! answers outside the offer is a protocol error, RFC 7143 §6.2) and applies the
//! result functions: list, boolean AND/OR, numeric min, declarative.

use std::fmt;

/// Most keys kept from one login or text exchange.
pub const MAX_KEYS: usize = 256;
/// Longest key name (RFC 7143 §6.1: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value kept (RFC 7143 §6.1: 8192 bytes, binary values excepted; CHAP
/// challenges in hex stay far below).
pub const MAX_VALUE_LEN: usize = 8192;

/// A text negotiation problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextError {
    /// Not `key=value`, or too long, or too many keys.
    Malformed(String),
    /// The target answered a key with a value outside what was offered.
    BadAnswer {
        /// The key.
        key: String,
        /// The value received.
        value: String,
    },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::Malformed(m) => write!(f, "malformed text keys: {m}"),
            TextError::BadAnswer { key, value } => {
                write!(f, "target answered {key}={value}, which was not offered")
            }
        }
    }
}

impl std::error::Error for TextError {}

/// An ordered list of `key=value` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys(pub Vec<(String, String)>);

impl Keys {
    /// An empty list.
    pub fn new() -> Self {
        Keys(Vec::new())
    }

    /// Append a pair.
    pub fn push(&mut self, k: &str, v: impl Into<String>) {
        self.0.push((k.to_string(), v.into()));
    }

    /// The value of `k` (the last one if repeated).
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// Encode as NUL-terminated `key=value` strings.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    /// Parse a data segment of NUL-separated pairs (a missing final NUL is tolerated).
    pub fn parse(data: &[u8]) -> Result<Keys, TextError> {
        let mut out = Vec::new();
        for item in data.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            if out.len() >= MAX_KEYS {
                return Err(TextError::Malformed(format!("more than {MAX_KEYS} keys")));
            }
            let s = std::str::from_utf8(item)
                .map_err(|_| TextError::Malformed("key or value is not UTF-8".into()))?;
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| TextError::Malformed(format!("no '=' in {:?}", trunc(s))))?;
            if k.is_empty() || k.len() > MAX_KEY_LEN || v.len() > MAX_VALUE_LEN {
                return Err(TextError::Malformed(format!(
                    "key or value too long: {:?}",
                    trunc(k)
                )));
            }
            out.push((k.to_string(), v.to_string()));
        }
        Ok(Keys(out))
    }
}

fn trunc(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What Ember offers in the operational stage of a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Offer CRC32C header digests (preferred over None).
    pub header_digest: bool,
    /// Offer CRC32C data digests (preferred over None).
    pub data_digest: bool,
    /// MaxRecvDataSegmentLength Ember declares (what the target may send in one PDU).
    pub max_recv_data_segment: u32,
    /// MaxBurstLength offered.
    pub max_burst: u32,
    /// FirstBurstLength offered.
    pub first_burst: u32,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 256 << 10,
            // The largest multiple of 1 KiB below the 2^24 limit (open-iscsi's value).
            max_burst: (1 << 24) - 1024,
            first_burst: 256 << 10,
        }
    }
}

impl Offer {
    /// The keys of the operational stage.
    pub fn keys(&self) -> Keys {
        let digest = |on: bool| if on { "CRC32C,None" } else { "None" };
        let mut k = Keys::new();
        k.push("HeaderDigest", digest(self.header_digest));
        k.push("DataDigest", digest(self.data_digest));
        k.push("ErrorRecoveryLevel", "0");
        k.push("InitialR2T", "No");
        k.push("ImmediateData", "Yes");
        k.push("MaxBurstLength", self.max_burst.to_string());
        k.push("FirstBurstLength", self.first_burst.to_string());
        k.push(
            "MaxRecvDataSegmentLength",
            self.max_recv_data_segment.to_string(),
        );
        k.push("MaxConnections", "1");
        k.push("MaxOutstandingR2T", "1");
        k.push("DataPDUInOrder", "Yes");
        k.push("DataSequenceInOrder", "Yes");
        k.push("DefaultTime2Wait", "0");
        k.push("DefaultTime2Retain", "0");
        k.push("IFMarker", "No");
        k.push("OFMarker", "No");
        k
    }
}

/// The operational parameters in force on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// Largest data segment Ember may send (the target's MaxRecvDataSegmentLength).
    pub max_send_data_segment: u32,
    /// Largest data segment the target may send (Ember's declaration).
    pub max_recv_data_segment: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// InitialR2T: no unsolicited Data-Out.
    pub initial_r2t: bool,
    /// ImmediateData: data may ride in the command PDU.
    pub immediate_data: bool,
    /// MaxOutstandingR2T.
    pub max_outstanding_r2t: u32,
    /// MaxConnections.
    pub max_connections: u32,
    /// DataPDUInOrder.
    pub data_pdu_in_order: bool,
    /// DataSequenceInOrder.
    pub data_sequence_in_order: bool,
    /// ErrorRecoveryLevel.
    pub error_recovery_level: u32,
}

impl Negotiated {
    /// RFC 7143's defaults (§13), with Ember's own receive limit.
    pub fn defaults(offer: &Offer) -> Self {
        Negotiated {
            header_digest: false,
            data_digest: false,
            max_send_data_segment: 8192,
            max_recv_data_segment: offer.max_recv_data_segment,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }

    /// Apply the target's answers (and declarations) to `self`; returns the keys the
    /// target offered on its own that need an answer from us.
    pub fn apply(&mut self, offer: &Offer, answer: &Keys) -> Result<Keys, TextError> {
        let mut reply = Keys::new();
        for (k, v) in &answer.0 {
            let bad = || TextError::BadAnswer {
                key: k.clone(),
                value: v.clone(),
            };
            let num = |lo: u32, hi: u32| -> Result<u32, TextError> {
                let n: u32 = v.parse().map_err(|_| bad())?;
                if n < lo || n > hi {
                    return Err(bad());
                }
                Ok(n)
            };
            if matches!(v.as_str(), "Reject" | "Irrelevant" | "NotUnderstood") {
                // The key keeps its default (RFC 7143 §6.2).
                tracing::debug!(key = %k, answer = %v, "login key not negotiated");
                continue;
            }
            let yes_no = || match v.as_str() {
                "Yes" => Ok(true),
                "No" => Ok(false),
                _ => Err(bad()),
            };
            match k.as_str() {
                "HeaderDigest" | "DataDigest" => {
                    let offered = if k == "HeaderDigest" {
                        offer.header_digest
                    } else {
                        offer.data_digest
                    };
                    let on = match v.as_str() {
                        "CRC32C" if offered => true,
                        "None" => false,
                        _ => return Err(bad()),
                    };
                    if k == "HeaderDigest" {
                        self.header_digest = on;
                    } else {
                        self.data_digest = on;
                    }
                }
                // Declarative: the most the target receives in one PDU (512..2^24-1).
                "MaxRecvDataSegmentLength" => {
                    self.max_send_data_segment = num(512, (1 << 24) - 1)?;
                }
                "MaxBurstLength" => self.max_burst = num(512, offer.max_burst)?,
                "FirstBurstLength" => self.first_burst = num(512, offer.first_burst)?,
                // Boolean OR: the target may insist on R2Ts.
                "InitialR2T" => self.initial_r2t = yes_no()?,
                // Boolean AND: the target may refuse immediate data.
                "ImmediateData" => self.immediate_data = yes_no()?,
                "MaxOutstandingR2T" => self.max_outstanding_r2t = num(1, 1)?,
                "MaxConnections" => self.max_connections = num(1, 1)?,
                "ErrorRecoveryLevel" => self.error_recovery_level = num(0, 0)?,
                "DataPDUInOrder" => {
                    if !yes_no()? {
                        return Err(bad());
                    }
                }
                "DataSequenceInOrder" => {
                    if !yes_no()? {
                        return Err(bad());
                    }
                }
                "DefaultTime2Wait" | "DefaultTime2Retain" => {
                    num(0, 3600)?;
                }
                "IFMarker" | "OFMarker" => {
                    if yes_no()? {
                        return Err(bad());
                    }
                }
                // Informational keys a target sends during login.
                "TargetPortalGroupTag" | "TargetAlias" | "TargetAddress" => {}
                // Keys the target offers that Ember never asked about.
                "MaxXmitDataSegmentLength" => {}
                _ => reply.push(k, "NotUnderstood"),
            }
        }
        if self.first_burst > self.max_burst {
            return Err(TextError::BadAnswer {
                key: "FirstBurstLength".into(),
                value: format!("{} > MaxBurstLength {}", self.first_burst, self.max_burst),
            });
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bounds() {
        let mut k = Keys::new();
        k.push("InitiatorName", "iqn.2026-01.org.ember:host");
        k.push("SessionType", "Normal");
        let b = k.encode();
        assert_eq!(Keys::parse(&b), Ok(k.clone()));
        assert_eq!(k.get("SessionType"), Some("Normal"));
        // A missing final NUL is fine; an item without '=' is not.
        assert_eq!(Keys::parse(b"A=1\0B=2").unwrap().get("B"), Some("2"));
        assert!(Keys::parse(b"A=1\0junk\0").is_err());
        assert!(Keys::parse(&[b'A', b'=', 0xff, 0]).is_err());
        let many: Vec<u8> = (0..MAX_KEYS + 1).flat_map(|_| b"K=v\0".to_vec()).collect();
        assert!(Keys::parse(&many).is_err());
        let long = format!("{}=1", "k".repeat(64));
        assert!(Keys::parse(long.as_bytes()).is_err());
    }

    #[test]
    fn tgtd_answers_are_applied() {
        // The operational answer tgtd 1.0.85 gave to Ember's offer with digests (from
        // testdata/ember-digest-probe-target.bin). tgtd does not declare its
        // MaxRecvDataSegmentLength, so the RFC's default of 8192 stands.
        let offer = Offer {
            header_digest: true,
            data_digest: true,
            ..Offer::default()
        };
        let ans = Keys::parse(
            b"HeaderDigest=CRC32C\0DataDigest=CRC32C\0ErrorRecoveryLevel=0\0InitialR2T=Yes\0\
              ImmediateData=Yes\0MaxBurstLength=262144\0FirstBurstLength=65536\0\
              MaxConnections=1\0MaxOutstandingR2T=1\0DataPDUInOrder=Yes\0\
              DataSequenceInOrder=Yes\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0IFMarker=No\0\
              OFMarker=No\0",
        )
        .unwrap();
        let mut n = Negotiated::defaults(&offer);
        let reply = n.apply(&offer, &ans).unwrap();
        assert!(reply.0.is_empty());
        assert!(n.header_digest && n.data_digest && n.initial_r2t && n.immediate_data);
        assert_eq!(n.max_send_data_segment, 8192);
        assert_eq!(n.max_recv_data_segment, 256 << 10);
        assert_eq!((n.first_burst, n.max_burst), (65536, 262_144));
    }

    #[test]
    fn answers_outside_the_offer_are_refused() {
        let offer = Offer::default();
        for bad in [
            &b"HeaderDigest=CRC32C\0"[..],
            b"MaxBurstLength=99999999\0",
            b"MaxConnections=4\0",
            b"ErrorRecoveryLevel=2\0",
            b"DataPDUInOrder=No\0",
            b"ImmediateData=Maybe\0",
            b"MaxRecvDataSegmentLength=12\0",
            b"FirstBurstLength=262144\0MaxBurstLength=4096\0",
        ] {
            let mut n = Negotiated::defaults(&offer);
            let k = Keys::parse(bad).unwrap();
            assert!(
                n.apply(&offer, &k).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut n = Negotiated::defaults(&offer);
        let r = n
            .apply(&offer, &Keys::parse(b"X-com.example.Foo=1\0").unwrap())
            .unwrap();
        assert_eq!(r.get("X-com.example.Foo"), Some("NotUnderstood"));
    }
}
