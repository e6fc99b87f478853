//! Asymmetric logical unit access (ALUA, SPC-4 §5.16): which target ports of a LUN are
//! active/optimized, active/non-optimized, standby or unavailable, decoded from bytes.
//!
//! A multipath initiator learns, per path, three things:
//! - whether the LUN does ALUA at all: the TPGS field of standard INQUIRY data (byte 5,
//!   bits 5:4; 0 = no ALUA, every port is as good as another);
//! - which target port group the path's port belongs to: the target port group
//!   designator (type 5, association 1 = target port) of VPD page 0x83 as read through
//!   that path, and its relative target port (type 4);
//! - the state of every group: REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action
//!   0x0A), whose descriptors give each group's asymmetric access state and ports.
//!
//! A target reports a state change with the unit attention ASYMMETRIC ACCESS STATE
//! CHANGED (2A/06) or IMPLICIT ASYMMETRIC ACCESS STATE TRANSITION FAILED (2A/07), and a
//! command sent to a port in the wrong state fails NOT READY with 04/0A (transitioning),
//! 04/0B (standby) or 04/0C (unavailable); each is a cue to read the groups again.

use super::Cdb;
use std::fmt;

/// MAINTENANCE IN operation code.
pub const MAINTENANCE_IN: u8 = 0xa3;
/// MAINTENANCE IN service action REPORT TARGET PORT GROUPS.
pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
/// Data-in Ember allows for REPORT TARGET PORT GROUPS (many groups of few ports).
pub const RTPG_ALLOC: u32 = 4096;

/// Additional sense codes of ALUA.
pub mod asc {
    /// ASYMMETRIC ACCESS STATE CHANGED (unit attention).
    pub const STATE_CHANGED: u16 = 0x2a06;
    /// IMPLICIT ASYMMETRIC ACCESS STATE TRANSITION FAILED (unit attention).
    pub const TRANSITION_FAILED: u16 = 0x2a07;
    /// LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (not ready).
    pub const TRANSITIONING: u16 = 0x040a;
    /// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE (not ready).
    pub const STANDBY: u16 = 0x040b;
    /// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE (not ready).
    pub const UNAVAILABLE: u16 = 0x040c;
}

/// The asymmetric access state of a target port group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AluaState {
    /// Active/optimized (0h): the preferred paths.
    ActiveOptimized,
    /// Active/non-optimized (1h): usable, slower (through another controller).
    ActiveNonOptimized,
    /// Standby (2h): no media access commands.
    Standby,
    /// Unavailable (3h).
    Unavailable,
    /// Logical block dependent (4h): treated as non-optimized.
    LbaDependent,
    /// Offline (Eh).
    Offline,
    /// Transitioning (Fh): between states; commands fail NOT READY 04/0A.
    Transitioning,
}

impl AluaState {
    /// Decode the 4-bit state field; reserved values are `None`.
    pub fn from_bits(b: u8) -> Option<AluaState> {
        Some(match b & 0x0f {
            0x0 => AluaState::ActiveOptimized,
            0x1 => AluaState::ActiveNonOptimized,
            0x2 => AluaState::Standby,
            0x3 => AluaState::Unavailable,
            0x4 => AluaState::LbaDependent,
            0xe => AluaState::Offline,
            0xf => AluaState::Transitioning,
            _ => return None,
        })
    }

    /// The 4-bit field value.
    pub fn bits(self) -> u8 {
        match self {
            AluaState::ActiveOptimized => 0x0,
            AluaState::ActiveNonOptimized => 0x1,
            AluaState::Standby => 0x2,
            AluaState::Unavailable => 0x3,
            AluaState::LbaDependent => 0x4,
            AluaState::Offline => 0xe,
            AluaState::Transitioning => 0xf,
        }
    }

    /// Priority for I/O, lower first; `None`: never send media commands there.
    /// Active/optimized first, non-optimized (and LBA dependent) only when no optimized
    /// path is left; standby, unavailable, offline and transitioning never.
    pub fn io_priority(self) -> Option<u8> {
        match self {
            AluaState::ActiveOptimized => Some(0),
            AluaState::ActiveNonOptimized | AluaState::LbaDependent => Some(1),
            AluaState::Standby
            | AluaState::Unavailable
            | AluaState::Offline
            | AluaState::Transitioning => None,
        }
    }
}

impl fmt::Display for AluaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AluaState::ActiveOptimized => "active/optimized",
            AluaState::ActiveNonOptimized => "active/non-optimized",
            AluaState::Standby => "standby",
            AluaState::Unavailable => "unavailable",
            AluaState::LbaDependent => "lba-dependent",
            AluaState::Offline => "offline",
            AluaState::Transitioning => "transitioning",
        })
    }
}

/// The TPGS field of standard INQUIRY data: 0 none, 1 implicit, 2 explicit, 3 both.
pub fn tpgs(std_inquiry: &[u8]) -> u8 {
    std_inquiry.get(5).map_or(0, |b| (b >> 4) & 0x3)
}

/// The target port of a path, from the target-port designators of VPD page 0x83.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortIds {
    /// Target port group (designator type 5).
    pub group: Option<u16>,
    /// Relative target port identifier (designator type 4).
    pub relative_port: Option<u16>,
}

/// The target-port designators (association 1) of VPD page 0x83.
pub fn parse_port_ids(b: &[u8]) -> PortIds {
    let mut ids = PortIds::default();
    if b.get(1) != Some(&0x83) || b.len() < 4 {
        return ids;
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let end = len.saturating_add(4).min(b.len());
    let mut body = &b[4..end];
    while body.len() >= 4 {
        let assoc = (body[1] >> 4) & 0x3;
        let typ = body[1] & 0x0f;
        let n = usize::from(body[3]);
        let Some(v) = body.get(4..4 + n) else {
            break;
        };
        if assoc == 1 && v.len() >= 4 {
            let id = u16::from_be_bytes([v[2], v[3]]);
            match typ {
                4 => ids.relative_port = Some(id),
                5 => ids.group = Some(id),
                _ => {}
            }
        }
        body = &body[4 + n..];
    }
    ids
}

/// One target port group of a REPORT TARGET PORT GROUPS answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    /// Target port group number.
    pub id: u16,
    /// Its asymmetric access state (`None`: a reserved value).
    pub state: Option<AluaState>,
    /// The PREF bit: a preferred group.
    pub preferred: bool,
    /// Relative target port identifiers in the group.
    pub ports: Vec<u16>,
}

/// The CDB of REPORT TARGET PORT GROUPS (length-only header format), `alloc` bytes.
pub fn report_target_port_groups(alloc: u32) -> Cdb {
    let mut c = [0u8; 16];
    c[0] = MAINTENANCE_IN;
    c[1] = SA_REPORT_TARGET_PORT_GROUPS;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    Cdb(c)
}

/// Decode a REPORT TARGET PORT GROUPS answer (either header format). The lengths a
/// target sends are checked against the bytes received: a descriptor that runs past
/// them ends the list. `None` when not even the header is there.
pub fn parse_rtpg(b: &[u8]) -> Option<Vec<PortGroup>> {
    let len = u32::from_be_bytes(b.get(0..4)?.try_into().ok()?);
    // Extended header (format 001b in byte 4): 8 bytes, else 4.
    let extended = b.get(4).is_some_and(|f| (f >> 4) & 0x7 == 1);
    let header = if extended { 8 } else { 4 };
    let end = usize::try_from(len).ok()?.saturating_add(4).min(b.len());
    let mut d = b.get(header..end).unwrap_or(&[]);
    let mut out = Vec::new();
    while d.len() >= 8 {
        let count = usize::from(d[7]);
        let need = 8 + count * 4;
        let Some(ports) = d.get(8..need) else {
            break;
        };
        out.push(PortGroup {
            id: u16::from_be_bytes([d[2], d[3]]),
            state: AluaState::from_bits(d[0] & 0x0f),
            preferred: d[0] & 0x80 != 0,
            ports: ports
                .chunks_exact(4)
                .map(|p| u16::from_be_bytes([p[2], p[3]]))
                .collect(),
        });
        d = &d[need..];
        if out.len() >= 1024 {
            break;
        }
    }
    Some(out)
}

/// The state of the path whose port is `port` (group from VPD 0x83; relative port as a
/// fallback when the group designator is missing) among `groups`.
pub fn state_of(groups: &[PortGroup], port: PortIds) -> Option<AluaState> {
    let g = match port.group {
        Some(id) => groups.iter().find(|g| g.id == id),
        None => port
            .relative_port
            .and_then(|rp| groups.iter().find(|g| g.ports.contains(&rp))),
    }?;
    g.state
}

/// Build a REPORT TARGET PORT GROUPS answer (length-only header) from
/// (group, state bits, preferred, ports): for tests and fuzz seeds.
pub fn encode_rtpg(groups: &[(u16, u8, bool, &[u16])]) -> Vec<u8> {
    let mut d = Vec::new();
    for &(id, state, pref, ports) in groups {
        d.push(if pref { 0x80 } else { 0 } | (state & 0x0f));
        d.push(0x8f); // T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, u8::try_from(ports.len()).unwrap_or(u8::MAX)]);
        for p in ports.iter().take(255) {
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&p.to_be_bytes());
        }
    }
    let mut out = u32::try_from(d.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&d);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VPD 0x83 of an ALUA array as Linux's scsi_dh_alua sees it: an NAA LU designator,
    /// a relative target port (type 4) and a target port group (type 5), both with
    /// association 1 (target port). Shaped after LIO's page for port group 2, port 3.
    fn vpd83_with_ports(group: u16, rel: u16) -> Vec<u8> {
        let mut body = vec![0x01, 0x03, 0x00, 0x08];
        body.extend_from_slice(&[0x60, 1, 2, 3, 4, 5, 6, 7]);
        body.extend_from_slice(&[0x61, 0x14, 0x00, 0x04, 0, 0]);
        body.extend_from_slice(&rel.to_be_bytes());
        body.extend_from_slice(&[0x61, 0x15, 0x00, 0x04, 0, 0]);
        body.extend_from_slice(&group.to_be_bytes());
        let mut p = vec![0x00, 0x83];
        p.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn port_ids_from_vpd83() {
        let p = vpd83_with_ports(2, 3);
        assert_eq!(
            parse_port_ids(&p),
            PortIds {
                group: Some(2),
                relative_port: Some(3)
            }
        );
        // Logical-unit designators (association 0) are not ports.
        assert_eq!(
            crate::backend::scsi::parse_designators(&p).unwrap().len(),
            1
        );
        // Truncated pages stop cleanly.
        for n in 0..p.len() {
            let _ = parse_port_ids(&p[..n]);
        }
        assert_eq!(parse_port_ids(&[0, 0x80, 0, 0]), PortIds::default());
    }

    #[test]
    fn tpgs_bits() {
        let mut inq = [0u8; 36];
        assert_eq!(tpgs(&inq), 0);
        inq[5] = 0x10;
        assert_eq!(tpgs(&inq), 1);
        inq[5] = 0x30 | 0x08;
        assert_eq!(tpgs(&inq), 3);
        assert_eq!(tpgs(&[]), 0);
    }

    #[test]
    fn rtpg_round_trip_and_states() {
        let b = encode_rtpg(&[
            (1, 0x0, true, &[1, 2]),
            (2, 0x1, false, &[3]),
            (3, 0x2, false, &[4]),
        ]);
        let g = parse_rtpg(&b).unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].id, 1);
        assert_eq!(g[0].state, Some(AluaState::ActiveOptimized));
        assert!(g[0].preferred);
        assert_eq!(g[0].ports, vec![1, 2]);
        assert_eq!(g[2].state, Some(AluaState::Standby));
        let port = |group, rel| PortIds {
            group,
            relative_port: rel,
        };
        assert_eq!(
            state_of(&g, port(Some(2), None)),
            Some(AluaState::ActiveNonOptimized)
        );
        // No group designator: found by relative port.
        assert_eq!(state_of(&g, port(None, Some(4))), Some(AluaState::Standby));
        assert_eq!(state_of(&g, port(Some(9), None)), None);
        assert_eq!(
            report_target_port_groups(RTPG_ALLOC).0[..10],
            [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 0x10, 0]
        );
    }

    #[test]
    fn rtpg_extended_header_and_hostile_lengths() {
        // Extended header (format 1): 8 bytes before the descriptors.
        let plain = encode_rtpg(&[(5, 0xf, false, &[7])]);
        let mut ext = plain[..4].to_vec();
        let len = u32::from_be_bytes(plain[..4].try_into().unwrap()) + 4;
        ext[..4].copy_from_slice(&len.to_be_bytes());
        ext.extend_from_slice(&[0x10, 60, 0, 0]);
        ext.extend_from_slice(&plain[4..]);
        let g = parse_rtpg(&ext).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].state, Some(AluaState::Transitioning));
        // A return-data length larger than what arrived is clamped; a port count past
        // the end stops the list.
        let mut b = encode_rtpg(&[(1, 0, false, &[1])]);
        b[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_rtpg(&b).unwrap().len(), 1);
        b[4 + 7] = 200;
        assert_eq!(parse_rtpg(&b).unwrap().len(), 0);
        assert_eq!(parse_rtpg(&[0, 0]), None);
        for n in 0..ext.len() {
            let _ = parse_rtpg(&ext[..n]);
        }
    }

    #[test]
    fn io_priorities() {
        use AluaState::*;
        assert_eq!(ActiveOptimized.io_priority(), Some(0));
        assert_eq!(ActiveNonOptimized.io_priority(), Some(1));
        for s in [Standby, Unavailable, Offline, Transitioning] {
            assert_eq!(s.io_priority(), None, "{s}");
        }
        for b in 0..16u8 {
            if let Some(s) = AluaState::from_bits(b) {
                assert_eq!(s.bits(), b);
            }
        }
    }
}
