//! SCSI for LUN backends: command descriptor blocks, sense decoding, and the parsers of
//! the pages Ember reads (READ CAPACITY(16), REPORT LUNS, VPD 0x80/0x83/0xB0/0xB2).
//!
//! No I/O: everything here builds or decodes bytes, so it is tested from bytes (pages
//! captured from tgtd, and the sysfs copies of a host LUN's VPD pages). The iSCSI
//! initiator sends these CDBs; the block-device backend parses the same VPD 0x83 page
//! from sysfs to record a host LUN's identity. References: SPC-4 (INQUIRY, VPD pages,
//! sense), SBC-3 (READ/WRITE(16), UNMAP, WRITE SAME(16), READ CAPACITY(16)).

pub mod alua;
pub mod pr;

use std::fmt;

/// SCSI status byte values (SAM-5).
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data follows.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// CONDITION MET.
    pub const CONDITION_MET: u8 = 0x04;
    /// BUSY: retry later.
    pub const BUSY: u8 = 0x08;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    /// TASK SET FULL: retry later.
    pub const TASK_SET_FULL: u8 = 0x28;
    /// ACA ACTIVE.
    pub const ACA_ACTIVE: u8 = 0x30;
    /// TASK ABORTED.
    pub const TASK_ABORTED: u8 = 0x40;
}

/// Sense keys (SPC-4 table 27).
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// RECOVERED ERROR: the command succeeded.
    pub const RECOVERED_ERROR: u8 = 0x1;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xb;
}

/// Operation codes of the commands Ember sends.
pub mod opcode {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8a;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16) (READ CAPACITY(16) is its action 0x10).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xa0;
}

/// A command descriptor block of up to 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cdb(pub [u8; 16]);

impl fmt::Debug for Cdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cdb({:02x}", self.0[0])?;
        for b in &self.0[1..] {
            write!(f, " {b:02x}")?;
        }
        write!(f, ")")
    }
}

impl Cdb {
    /// The operation code.
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }

    fn lba_len(op: u8, flags: u8, lba: u64, blocks: u32) -> Cdb {
        let mut c = [0u8; 16];
        c[0] = op;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&blocks.to_be_bytes());
        Cdb(c)
    }

    /// READ(16) of `blocks` blocks at `lba`.
    pub fn read16(lba: u64, blocks: u32) -> Cdb {
        Cdb::lba_len(opcode::READ_16, 0, lba, blocks)
    }

    /// WRITE(16); `fua`: force unit access (durable before the status).
    pub fn write16(lba: u64, blocks: u32, fua: bool) -> Cdb {
        Cdb::lba_len(opcode::WRITE_16, if fua { 0x08 } else { 0 }, lba, blocks)
    }

    /// SYNCHRONIZE CACHE(16) of the whole medium.
    pub fn sync_cache16() -> Cdb {
        Cdb::lba_len(opcode::SYNCHRONIZE_CACHE_16, 0, 0, 0)
    }

    /// WRITE SAME(16) of one block of data-out over `blocks` blocks; `unmap`: the target
    /// may deallocate them.
    pub fn write_same16(lba: u64, blocks: u32, unmap: bool) -> Cdb {
        Cdb::lba_len(
            opcode::WRITE_SAME_16,
            if unmap { 0x08 } else { 0 },
            lba,
            blocks,
        )
    }

    /// UNMAP with a parameter list of `param_len` bytes (see [`unmap_parameters`]).
    pub fn unmap(param_len: u16) -> Cdb {
        let mut c = [0u8; 16];
        c[0] = opcode::UNMAP;
        c[7..9].copy_from_slice(&param_len.to_be_bytes());
        Cdb(c)
    }

    /// READ CAPACITY(16) (32 bytes of data-in).
    pub fn read_capacity16() -> Cdb {
        let mut c = [0u8; 16];
        c[0] = opcode::SERVICE_ACTION_IN_16;
        c[1] = 0x10;
        c[10..14].copy_from_slice(&READ_CAPACITY16_LEN.to_be_bytes());
        Cdb(c)
    }

    /// INQUIRY: standard data (`page` None) or a VPD page, `alloc` bytes at most.
    pub fn inquiry(page: Option<u8>, alloc: u16) -> Cdb {
        let mut c = [0u8; 16];
        c[0] = opcode::INQUIRY;
        if let Some(p) = page {
            c[1] = 1;
            c[2] = p;
        }
        c[3..5].copy_from_slice(&alloc.to_be_bytes());
        Cdb(c)
    }

    /// REPORT LUNS (all LUNs), `alloc` bytes at most.
    pub fn report_luns(alloc: u32) -> Cdb {
        let mut c = [0u8; 16];
        c[0] = opcode::REPORT_LUNS;
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        Cdb(c)
    }

    /// TEST UNIT READY.
    pub fn test_unit_ready() -> Cdb {
        Cdb([0; 16])
    }
}

/// Bytes of READ CAPACITY(16) data Ember asks for.
pub const READ_CAPACITY16_LEN: u32 = 32;

/// The UNMAP parameter list for `ranges` of (lba, blocks).
pub fn unmap_parameters(ranges: &[(u64, u32)]) -> Vec<u8> {
    let desc_len = ranges.len() * 16;
    let mut p = Vec::with_capacity(8 + desc_len);
    p.extend_from_slice(
        &u16::try_from(6 + desc_len)
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    p.extend_from_slice(&u16::try_from(desc_len).unwrap_or(u16::MAX).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&blocks.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

/// Decoded sense data (fixed or descriptor format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// Decode sense bytes; `None` when they are too short or of an unknown format.
    pub fn parse(b: &[u8]) -> Option<Sense> {
        match b.first()? & 0x7f {
            0x70 | 0x71 => Some(Sense {
                key: b.get(2)? & 0x0f,
                asc: b.get(12).copied().unwrap_or(0),
                ascq: b.get(13).copied().unwrap_or(0),
            }),
            0x72 | 0x73 => Some(Sense {
                key: b.get(1)? & 0x0f,
                asc: b.get(2).copied().unwrap_or(0),
                ascq: b.get(3).copied().unwrap_or(0),
            }),
            _ => None,
        }
    }

    /// ASC and ASCQ as one number (0x2a09: capacity data has changed).
    pub fn code(&self) -> u16 {
        u16::from(self.asc) << 8 | u16::from(self.ascq)
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.key {
            key::NO_SENSE => "no sense",
            key::RECOVERED_ERROR => "recovered error",
            key::NOT_READY => "not ready",
            key::MEDIUM_ERROR => "medium error",
            key::HARDWARE_ERROR => "hardware error",
            key::ILLEGAL_REQUEST => "illegal request",
            key::UNIT_ATTENTION => "unit attention",
            key::DATA_PROTECT => "data protect",
            key::ABORTED_COMMAND => "aborted command",
            _ => "sense",
        };
        write!(
            f,
            "{k} (key {:#x}, asc/ascq {:#06x})",
            self.key,
            self.code()
        )
    }
}

/// Additional sense codes Ember acts on.
pub mod asc {
    /// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE / BECOMING READY (0x04xx).
    pub const NOT_READY: u8 = 0x04;
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: u16 = 0x2000;
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: u16 = 0x2100;
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: u16 = 0x2400;
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: u16 = 0x2500;
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (any qualifier of 0x29).
    pub const POWER_ON_RESET: u8 = 0x29;
    /// CAPACITY DATA HAS CHANGED.
    pub const CAPACITY_CHANGED: u16 = 0x2a09;
    /// REGISTRATIONS PREEMPTED (persistent reservations: this nexus lost its key).
    pub const REGISTRATIONS_PREEMPTED: u16 = 0x2a05;
    /// SPACE ALLOCATION FAILED WRITE PROTECT (thin pool full).
    pub const SPACE_ALLOCATION_FAILED: u16 = 0x2707;
    /// INQUIRY DATA HAS CHANGED.
    pub const INQUIRY_DATA_CHANGED: u16 = 0x3f03;
    /// REPORTED LUNS DATA HAS CHANGED.
    pub const REPORTED_LUNS_CHANGED: u16 = 0x3f0e;
}

/// Parsed READ CAPACITY(16) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Number of logical blocks.
    pub blocks: u64,
    /// Logical block length in bytes.
    pub block_len: u32,
    /// Logical blocks per physical block, as a power of two.
    pub phys_exp: u8,
    /// Logical block provisioning management enabled (thin).
    pub lbpme: bool,
    /// Unmapped blocks read as zeros.
    pub lbprz: bool,
}

impl Capacity {
    /// Parse the 32-byte response (at least 14 bytes are needed).
    pub fn parse(b: &[u8]) -> Option<Capacity> {
        let last = u64::from_be_bytes(b.get(0..8)?.try_into().ok()?);
        let block_len = u32::from_be_bytes(b.get(8..12)?.try_into().ok()?);
        let p13 = *b.get(13)?;
        let p14 = b.get(14).copied().unwrap_or(0);
        Some(Capacity {
            blocks: last.checked_add(1)?,
            block_len,
            phys_exp: p13 & 0x0f,
            lbpme: p14 & 0x80 != 0,
            lbprz: p14 & 0x40 != 0,
        })
    }

    /// Size in bytes, if it fits.
    pub fn bytes(&self) -> Option<u64> {
        self.blocks.checked_mul(u64::from(self.block_len))
    }

    /// Physical block size in bytes.
    pub fn physical_block_len(&self) -> u32 {
        self.block_len
            .checked_shl(u32::from(self.phys_exp))
            .unwrap_or(self.block_len)
    }
}

/// Encode a LUN number as the 8-byte SAM LUN field (peripheral addressing below 256,
/// flat space addressing up to 16383).
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        b[1] = lun as u8;
    }
    b
}

/// Decode an 8-byte SAM LUN field (peripheral or flat addressing); `None` for the other
/// addressing methods.
pub fn decode_lun(b: [u8; 8]) -> Option<u16> {
    match b[0] >> 6 {
        0 => Some(u16::from(b[0] & 0x3f) << 8 | u16::from(b[1])),
        1 => Some(u16::from(b[0] & 0x3f) << 8 | u16::from(b[1])),
        _ => None,
    }
}

/// The LUN numbers of a REPORT LUNS response.
pub fn parse_report_luns(b: &[u8]) -> Option<Vec<u16>> {
    let list_len = u32::from_be_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let body = b.get(8..)?;
    let n = list_len.min(body.len()) / 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e: [u8; 8] = body[i * 8..i * 8 + 8].try_into().ok()?;
        if let Some(l) = decode_lun(e) {
            out.push(l);
        }
    }
    Some(out)
}

/// Standard INQUIRY data Ember looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdInquiry {
    /// Peripheral qualifier (0: connected; 3: no LUN here).
    pub qualifier: u8,
    /// Peripheral device type (0: direct access block device).
    pub device_type: u8,
    /// Vendor identification, trimmed.
    pub vendor: String,
    /// Product identification, trimmed.
    pub product: String,
}

impl StdInquiry {
    /// Parse standard INQUIRY data (at least 36 bytes for vendor and product).
    pub fn parse(b: &[u8]) -> Option<StdInquiry> {
        let p0 = *b.first()?;
        let text = |r: std::ops::Range<usize>| {
            b.get(r)
                .map(|s| String::from_utf8_lossy(s).trim().to_string())
                .unwrap_or_default()
        };
        Some(StdInquiry {
            qualifier: p0 >> 5,
            device_type: p0 & 0x1f,
            vendor: text(8..16),
            product: text(16..32),
        })
    }
}

/// The body of a VPD page after checking its header: (page code, payload).
fn vpd_body(b: &[u8], want: u8) -> Option<&[u8]> {
    if *b.get(1)? != want {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]));
    let end = 4usize.checked_add(len)?.min(b.len());
    b.get(4..end)
}

/// The page codes listed by VPD page 0x00.
pub fn parse_supported_vpd(b: &[u8]) -> Option<Vec<u8>> {
    vpd_body(b, 0x00).map(<[u8]>::to_vec)
}

/// The unit serial number of VPD page 0x80, trimmed.
pub fn parse_serial(b: &[u8]) -> Option<String> {
    let body = vpd_body(b, 0x80)?;
    let s = String::from_utf8_lossy(body)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string();
    Some(s)
}

/// Kind of a VPD 0x83 designator Ember records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesignatorKind {
    /// NAA (type 3): the world-wide name arrays use.
    Naa,
    /// EUI-64 based (type 2).
    Eui64,
    /// SCSI name string (type 8).
    ScsiName,
    /// T10 vendor identification (type 1).
    T10,
}

/// One logical-unit designator of VPD page 0x83.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Designator {
    /// Its kind.
    pub kind: DesignatorKind,
    /// Its bytes as sent.
    pub value: Vec<u8>,
}

impl Designator {
    /// Preference as a world-wide name, lowest first (after the Linux kernel's order):
    /// NAA IEEE Registered Extended, 16-byte EUI-64, NAA IEEE Registered, shorter
    /// EUI-64, other NAA, SCSI name string, T10 vendor id.
    fn rank(&self) -> u8 {
        let naa = self.value.first().map_or(0, |b| b >> 4);
        match (self.kind, self.value.len()) {
            (DesignatorKind::Naa, _) if naa == 6 => 0,
            (DesignatorKind::Eui64, 16) => 1,
            (DesignatorKind::Naa, _) if naa == 5 => 2,
            (DesignatorKind::Eui64, 12) => 3,
            (DesignatorKind::Eui64, _) => 4,
            (DesignatorKind::Naa, _) => 5,
            (DesignatorKind::ScsiName, _) => 6,
            (DesignatorKind::T10, _) => 7,
        }
    }
}

impl fmt::Display for Designator {
    /// The Linux `wwid` spelling: `naa.<hex>`, `eui.<hex>`, `t10.<text>`, or the name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex =
            |f: &mut fmt::Formatter<'_>| self.value.iter().try_for_each(|b| write!(f, "{b:02x}"));
        let text = || {
            String::from_utf8_lossy(&self.value)
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string()
        };
        match self.kind {
            DesignatorKind::Naa => {
                write!(f, "naa.")?;
                hex(f)
            }
            DesignatorKind::Eui64 => {
                write!(f, "eui.")?;
                hex(f)
            }
            DesignatorKind::T10 => write!(f, "t10.{}", text()),
            DesignatorKind::ScsiName => write!(f, "{}", text()),
        }
    }
}

/// A LUN's identity: what makes two paths (or two logins) the same logical unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LunIdentity {
    /// Logical-unit designators of VPD 0x83, best first (NAA, EUI-64, name, T10).
    pub designators: Vec<Designator>,
    /// Unit serial number (VPD 0x80), if the device reports one.
    pub serial: Option<String>,
}

impl LunIdentity {
    /// The preferred world-wide identifier (`naa.…`), if any designator was found.
    pub fn wwid(&self) -> Option<String> {
        self.designators.first().map(ToString::to_string)
    }

    /// True when nothing identifies the unit.
    pub fn is_empty(&self) -> bool {
        self.designators.is_empty() && self.serial.is_none()
    }
}

impl fmt::Display for LunIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.wwid(), &self.serial) {
            (Some(w), Some(s)) => write!(f, "{w} (serial {s:?})"),
            (Some(w), None) => write!(f, "{w}"),
            (None, Some(s)) => write!(f, "serial {s:?}"),
            (None, None) => write!(f, "no identity"),
        }
    }
}

/// The logical-unit designators (association 0) of VPD page 0x83, best first.
pub fn parse_designators(b: &[u8]) -> Option<Vec<Designator>> {
    let mut body = vpd_body(b, 0x83)?;
    let mut out = Vec::new();
    while body.len() >= 4 {
        let assoc = (body[1] >> 4) & 0x3;
        let typ = body[1] & 0x0f;
        let len = usize::from(body[3]);
        let Some(value) = body.get(4..4 + len) else {
            break;
        };
        let kind = match typ {
            1 => Some(DesignatorKind::T10),
            2 => Some(DesignatorKind::Eui64),
            3 => Some(DesignatorKind::Naa),
            8 => Some(DesignatorKind::ScsiName),
            _ => None,
        };
        if let (0, Some(kind)) = (assoc, kind) {
            out.push(Designator {
                kind,
                value: value.to_vec(),
            });
        }
        body = &body[4 + len..];
    }
    out.sort_by(|a, b| a.rank().cmp(&b.rank()).then_with(|| a.value.cmp(&b.value)));
    Some(out)
}

/// Block limits (VPD 0xB0), in logical blocks; 0 means "not reported".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    /// MAXIMUM TRANSFER LENGTH.
    pub max_transfer: u32,
    /// OPTIMAL TRANSFER LENGTH.
    pub optimal_transfer: u32,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_lba: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY.
    pub unmap_granularity: u32,
    /// MAXIMUM WRITE SAME LENGTH.
    pub max_write_same: u64,
}

impl BlockLimits {
    /// Parse VPD page 0xB0 (short pages leave the missing fields at 0).
    pub fn parse(b: &[u8]) -> Option<BlockLimits> {
        let body = vpd_body(b, 0xb0)?;
        // Offsets are the page's (SBC-3 table 209); the body starts at page byte 4.
        let u32_at = |o: usize| {
            body.get(o - 4..o)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u32::from_be_bytes)
        };
        let u64_at = |o: usize| {
            body.get(o - 4..o + 4)
                .and_then(|s| s.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        Some(BlockLimits {
            max_transfer: u32_at(8),
            optimal_transfer: u32_at(12),
            max_unmap_lba: u32_at(20),
            max_unmap_descriptors: u32_at(24),
            unmap_granularity: u32_at(28),
            max_write_same: u64_at(36),
        })
    }
}

/// Logical block provisioning (VPD 0xB2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// UNMAP is supported (LBPU).
    pub unmap: bool,
    /// WRITE SAME(16) with the UNMAP bit is supported (LBPWS).
    pub write_same_unmap: bool,
    /// Unmapped blocks read as zeros (LBPRZ).
    pub zeroes_after_unmap: bool,
    /// Provisioning type: 0 full or unreported, 1 resource, 2 thin.
    pub kind: u8,
}

impl Provisioning {
    /// Parse VPD page 0xB2.
    pub fn parse(b: &[u8]) -> Option<Provisioning> {
        let body = vpd_body(b, 0xb2)?;
        let f = body.get(1).copied().unwrap_or(0);
        Some(Provisioning {
            unmap: f & 0x80 != 0,
            write_same_unmap: f & 0x40 != 0,
            zeroes_after_unmap: f & 0x04 != 0,
            kind: body.get(2).copied().unwrap_or(0) & 0x07,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VPD 0x83 as tgtd 1.0.85 sent it for LUN 1 of target 1 (captured through
    /// tests/iscsi/capture.py from `iscsi-inq -e 1 -c 131`).
    const TGT_VPD83: &[u8] = &[
        0x00, 0x83, 0x00, 0x48, 0x02, 0x01, 0x00, 0x24, 0x49, 0x45, 0x54, 0x20, 0x20, 0x20, 0x20,
        0x20, 0x30, 0x30, 0x30, 0x31, 0x30, 0x30, 0x30, 0x31, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        0x03, 0x00, 0x08, 0x30, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x01, 0x03, 0x00, 0x10,
        0x60, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
        0x01,
    ];

    #[test]
    fn cdbs_are_encoded_big_endian() {
        let c = Cdb::read16(0x0102_0304_0506_0708, 0x0a0b_0c0d);
        assert_eq!(
            c.0,
            [0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0]
        );
        assert_eq!(Cdb::write16(1, 2, true).0[1], 0x08);
        assert_eq!(Cdb::write_same16(1, 2, true).0[1], 0x08);
        assert_eq!(
            Cdb::inquiry(Some(0x83), 255).0[..5],
            [0x12, 1, 0x83, 0, 255]
        );
        assert_eq!(Cdb::read_capacity16().0[1], 0x10);
        assert_eq!(Cdb::read_capacity16().0[13], 32);
        let p = unmap_parameters(&[(8, 16), (100, 1)]);
        assert_eq!(p.len(), 8 + 32);
        assert_eq!(&p[0..4], &[0, 38, 0, 32]);
        assert_eq!(&p[8..20], &[0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16]);
    }

    #[test]
    fn sense_fixed_and_descriptor() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = 0x06;
        fixed[12] = 0x2a;
        fixed[13] = 0x09;
        let s = Sense::parse(&fixed).unwrap();
        assert_eq!(s.key, key::UNIT_ATTENTION);
        assert_eq!(s.code(), asc::CAPACITY_CHANGED);
        let desc = [0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0];
        let s = Sense::parse(&desc).unwrap();
        assert_eq!(
            (s.key, s.code()),
            (key::ILLEGAL_REQUEST, asc::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(Sense::parse(&[0x70]), None);
        assert_eq!(Sense::parse(&[0x12, 0, 0]), None);
        assert_eq!(Sense::parse(&[]), None);
    }

    #[test]
    fn capacity_and_luns() {
        let mut rc = [0u8; 32];
        rc[0..8].copy_from_slice(&131_071u64.to_be_bytes());
        rc[8..12].copy_from_slice(&512u32.to_be_bytes());
        rc[13] = 3;
        let c = Capacity::parse(&rc).unwrap();
        assert_eq!(c.bytes(), Some(64 << 20));
        assert_eq!(c.physical_block_len(), 4096);
        rc[0..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(Capacity::parse(&rc), None);
        for lun in [0u16, 1, 255, 256, 16383] {
            assert_eq!(decode_lun(encode_lun(lun)), Some(lun));
        }
        let mut rl = vec![0, 0, 0, 16, 0, 0, 0, 0];
        rl.extend_from_slice(&encode_lun(0));
        rl.extend_from_slice(&encode_lun(1));
        assert_eq!(parse_report_luns(&rl), Some(vec![0, 1]));
        // A list length larger than the data is clamped, not trusted.
        rl[3] = 200;
        assert_eq!(parse_report_luns(&rl), Some(vec![0, 1]));
    }

    #[test]
    fn tgtd_vpd83_identity() {
        let d = parse_designators(TGT_VPD83).unwrap();
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[0].to_string(), "naa.60000000000000000e00000000010001");
        assert_eq!(d[1].to_string(), "naa.3000000100000001");
        assert_eq!(d[2].to_string(), "t10.IET     00010001");
        // Truncated pages stop cleanly.
        for n in 0..TGT_VPD83.len() {
            let _ = parse_designators(&TGT_VPD83[..n]);
        }
        assert_eq!(parse_designators(&[0, 0x80, 0, 0]), None);
    }

    #[test]
    fn limits_and_provisioning() {
        let mut b0 = vec![0u8; 64];
        b0[1] = 0xb0;
        b0[3] = 0x3c;
        b0[8..12].copy_from_slice(&2048u32.to_be_bytes());
        b0[20..24].copy_from_slice(&4096u32.to_be_bytes());
        b0[24..28].copy_from_slice(&16u32.to_be_bytes());
        b0[36..44].copy_from_slice(&65536u64.to_be_bytes());
        let l = BlockLimits::parse(&b0).unwrap();
        assert_eq!(l.max_transfer, 2048);
        assert_eq!(l.max_unmap_lba, 4096);
        assert_eq!(l.max_unmap_descriptors, 16);
        assert_eq!(l.max_write_same, 65536);
        assert_eq!(BlockLimits::parse(&b0[..10]).unwrap().max_unmap_lba, 0);
        let b2 = [0, 0xb2, 0, 4, 0, 0xc4, 2, 0];
        let p = Provisioning::parse(&b2).unwrap();
        assert!(p.unmap && p.write_same_unmap && p.zeroes_after_unmap);
        assert_eq!(p.kind, 2);
    }
}
