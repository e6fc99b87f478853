//! SCSI persistent reservations (SPC-4 §5.13, §6.15–6.16): PERSISTENT RESERVE IN and
//! OUT commands and their data, built and decoded from bytes.
//!
//! Registrations belong to an I_T nexus: for iSCSI, one session (initiator name + ISID)
//! to one target portal group. Every session that must write under a "registrants
//! only" reservation registers the node's key on its own nexus; PREEMPT with a dead
//! node's key removes every registration of that key, on every nexus, and its writes
//! then end RESERVATION CONFLICT. Ember sends the 24-byte basic parameter list with
//! SPEC_I_PT, ALL_TG_PT and APTPL clear (tgtd refuses any of them).

use super::Cdb;
use std::fmt;

/// PERSISTENT RESERVE IN operation code.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT operation code.
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// Length of the basic PERSISTENT RESERVE OUT parameter list.
pub const PARAM_LEN: u32 = 24;
/// Data-in Ember allows for READ KEYS / READ RESERVATION (8-byte keys: ~1000 of them).
pub const IN_ALLOC: u16 = 8192;

/// Service actions of PERSISTENT RESERVE IN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrIn {
    /// READ KEYS (00h).
    ReadKeys,
    /// READ RESERVATION (01h).
    ReadReservation,
}

/// Reservation types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrType {
    /// Write Exclusive (1h).
    WriteExclusive,
    /// Exclusive Access (3h).
    ExclusiveAccess,
    /// Write Exclusive – Registrants Only (5h): only registered nexuses may write.
    WriteExclusiveRegistrantsOnly,
    /// Exclusive Access – Registrants Only (6h).
    ExclusiveAccessRegistrantsOnly,
    /// Write Exclusive – All Registrants (7h).
    WriteExclusiveAllRegistrants,
    /// Exclusive Access – All Registrants (8h).
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    /// The TYPE field.
    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Decode the TYPE field.
    pub fn from_code(c: u8) -> Option<PrType> {
        Some(match c & 0x0f {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }
}

impl fmt::Display for PrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrType::WriteExclusive => "write-exclusive",
            PrType::ExclusiveAccess => "exclusive-access",
            PrType::WriteExclusiveRegistrantsOnly => "write-exclusive-registrants-only",
            PrType::ExclusiveAccessRegistrantsOnly => "exclusive-access-registrants-only",
            PrType::WriteExclusiveAllRegistrants => "write-exclusive-all-registrants",
            PrType::ExclusiveAccessAllRegistrants => "exclusive-access-all-registrants",
        })
    }
}

/// A PERSISTENT RESERVE OUT request. Keys are the 8-byte reservation keys; 0 is "no key".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrOut {
    /// REGISTER (00h): register `new` on this nexus (`old` 0 when unregistered), or
    /// unregister with `new` 0.
    Register {
        /// The key this nexus holds now (0: none).
        old: u64,
        /// The key to register (0: unregister).
        new: u64,
    },
    /// REGISTER AND IGNORE EXISTING KEY (06h): register `new` whatever this nexus holds.
    RegisterIgnore {
        /// The key to register (0: unregister).
        new: u64,
    },
    /// RESERVE (01h) with `key` (this nexus's registered key).
    Reserve {
        /// This nexus's key.
        key: u64,
        /// Reservation type.
        ty: PrType,
    },
    /// RELEASE (02h).
    Release {
        /// This nexus's key.
        key: u64,
        /// The type the reservation has.
        ty: PrType,
    },
    /// CLEAR (03h): every registration and the reservation go.
    Clear {
        /// This nexus's key.
        key: u64,
    },
    /// PREEMPT (04h): remove the registrations of `victim` (and take its reservation).
    Preempt {
        /// This nexus's key.
        key: u64,
        /// The key to remove.
        victim: u64,
        /// The reservation type to hold after.
        ty: PrType,
    },
    /// PREEMPT AND ABORT (05h): as PREEMPT, and abort the victim's tasks.
    PreemptAndAbort {
        /// This nexus's key.
        key: u64,
        /// The key to remove.
        victim: u64,
        /// The reservation type to hold after.
        ty: PrType,
    },
}

impl PrOut {
    fn service_action(&self) -> u8 {
        match self {
            PrOut::Register { .. } => 0x00,
            PrOut::Reserve { .. } => 0x01,
            PrOut::Release { .. } => 0x02,
            PrOut::Clear { .. } => 0x03,
            PrOut::Preempt { .. } => 0x04,
            PrOut::PreemptAndAbort { .. } => 0x05,
            PrOut::RegisterIgnore { .. } => 0x06,
        }
    }

    /// The CDB (10 bytes used) and the 24-byte parameter list.
    pub fn encode(&self) -> (Cdb, [u8; PARAM_LEN as usize]) {
        let (key, sa_key, ty) = match *self {
            PrOut::Register { old, new } => (old, new, None),
            PrOut::RegisterIgnore { new } => (0, new, None),
            PrOut::Reserve { key, ty } | PrOut::Release { key, ty } => (key, 0, Some(ty)),
            PrOut::Clear { key } => (key, 0, None),
            PrOut::Preempt { key, victim, ty } | PrOut::PreemptAndAbort { key, victim, ty } => {
                (key, victim, Some(ty))
            }
        };
        let mut c = [0u8; 16];
        c[0] = PERSISTENT_RESERVE_OUT;
        c[1] = self.service_action();
        // Scope 0 (logical unit) in the high nibble.
        c[2] = ty.map_or(0, PrType::code);
        c[5..9].copy_from_slice(&PARAM_LEN.to_be_bytes());
        let mut p = [0u8; PARAM_LEN as usize];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        (Cdb(c), p)
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            PrOut::Register { .. } => "REGISTER",
            PrOut::RegisterIgnore { .. } => "REGISTER AND IGNORE EXISTING KEY",
            PrOut::Reserve { .. } => "RESERVE",
            PrOut::Release { .. } => "RELEASE",
            PrOut::Clear { .. } => "CLEAR",
            PrOut::Preempt { .. } => "PREEMPT",
            PrOut::PreemptAndAbort { .. } => "PREEMPT AND ABORT",
        }
    }
}

/// The CDB of PERSISTENT RESERVE IN, `alloc` bytes of data-in.
pub fn pr_in(action: PrIn, alloc: u16) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = PERSISTENT_RESERVE_IN;
    c[1] = match action {
        PrIn::ReadKeys => 0x00,
        PrIn::ReadReservation => 0x01,
    };
    c[7..9].copy_from_slice(&alloc.to_be_bytes());
    Cdb(c)
}

/// The registered keys (READ KEYS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrKeys {
    /// PRgeneration: bumped by the device server on every registration change.
    pub generation: u32,
    /// One entry per registered I_T nexus (a key appears once per nexus).
    pub keys: Vec<u64>,
}

/// The reservation (READ RESERVATION).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrReservation {
    /// PRgeneration.
    pub generation: u32,
    /// The holder's key (0 for the all-registrants types).
    pub key: u64,
    /// Its type (`None`: a value Ember does not know).
    pub ty: Option<PrType>,
}

/// Decode READ KEYS data. The additional length is checked against what arrived.
pub fn parse_read_keys(b: &[u8]) -> Option<PrKeys> {
    let generation = u32::from_be_bytes(b.get(0..4)?.try_into().ok()?);
    let len = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
    let end = usize::try_from(len).ok()?.saturating_add(8).min(b.len());
    let keys = b
        .get(8..end)
        .unwrap_or(&[])
        .chunks_exact(8)
        .filter_map(|k| k.try_into().ok().map(u64::from_be_bytes))
        .collect();
    Some(PrKeys { generation, keys })
}

/// Decode READ RESERVATION data: `Some(None)` when nothing is reserved.
pub fn parse_read_reservation(b: &[u8]) -> Option<Option<PrReservation>> {
    let generation = u32::from_be_bytes(b.get(0..4)?.try_into().ok()?);
    let len = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
    if len < 16 {
        return Some(None);
    }
    let key = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
    let ty = PrType::from_code(*b.get(21)? & 0x0f);
    Some(Some(PrReservation {
        generation,
        key,
        ty,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pr_out_encoding() {
        let (c, p) = PrOut::Preempt {
            key: 0x1111,
            victim: 0xaaaa_bbbb_cccc_dddd,
            ty: PrType::WriteExclusiveRegistrantsOnly,
        }
        .encode();
        assert_eq!(c.0[..10], [0x5f, 0x04, 0x05, 0, 0, 0, 0, 0, 24, 0]);
        assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), 0x1111);
        assert_eq!(
            u64::from_be_bytes(p[8..16].try_into().unwrap()),
            0xaaaa_bbbb_cccc_dddd
        );
        assert_eq!(p[20], 0, "SPEC_I_PT, ALL_TG_PT, APTPL clear");
        let (c, p) = PrOut::RegisterIgnore { new: 7 }.encode();
        assert_eq!((c.0[1], c.0[2]), (0x06, 0));
        assert_eq!(u64::from_be_bytes(p[8..16].try_into().unwrap()), 7);
        assert_eq!(PrOut::Clear { key: 1 }.encode().0 .0[1], 0x03);
        assert_eq!(
            PrOut::PreemptAndAbort {
                key: 1,
                victim: 2,
                ty: PrType::WriteExclusive
            }
            .encode()
            .0
             .0[..3],
            [0x5f, 0x05, 0x01]
        );
        assert_eq!(
            pr_in(PrIn::ReadReservation, IN_ALLOC).0[..10],
            [0x5e, 0x01, 0, 0, 0, 0, 0, 0x20, 0, 0]
        );
    }

    #[test]
    fn read_keys_and_reservation() {
        // tgtd's READ KEYS layout: generation, length, keys.
        let mut b = vec![0, 0, 0, 3, 0, 0, 0, 16];
        b.extend_from_slice(&0xa1u64.to_be_bytes());
        b.extend_from_slice(&0xb2u64.to_be_bytes());
        let k = parse_read_keys(&b).unwrap();
        assert_eq!(k.generation, 3);
        assert_eq!(k.keys, vec![0xa1, 0xb2]);
        // A length beyond the data is clamped; a partial key is dropped.
        b[7] = 200;
        b.push(1);
        assert_eq!(parse_read_keys(&b).unwrap().keys.len(), 2);
        assert_eq!(parse_read_keys(&b[..5]), None);

        let mut r = vec![0, 0, 0, 9, 0, 0, 0, 16];
        r.extend_from_slice(&0xa1u64.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 0x05, 0, 0]);
        let res = parse_read_reservation(&r).unwrap().unwrap();
        assert_eq!(res.key, 0xa1);
        assert_eq!(res.ty, Some(PrType::WriteExclusiveRegistrantsOnly));
        assert_eq!(
            parse_read_reservation(&[0, 0, 0, 9, 0, 0, 0, 0]),
            Some(None)
        );
        for n in 0..r.len() {
            let _ = parse_read_reservation(&r[..n]);
        }
    }
}
