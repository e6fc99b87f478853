//! The iSCSI PDU codec (RFC 7143 §11): basic header segments to typed PDUs and back,
//! and the framing of a whole PDU (header, AHS, digests, data segment, padding).
//!
//! No I/O and no session state: [`Pdu::parse`] turns 48 bytes into a typed PDU (or a
//! [`PduError`]), [`Pdu::to_bhs`] turns one back into the same 48 bytes, and
//! [`decode_frame`] finds one complete PDU at the start of a byte buffer, checking its
//! lengths and digests against the connection's limits. Everything a target sends is
//! hostile: lengths are bounded before anything is allocated, and a bad opcode, length or
//! digest is an error for the session to act on (it drops the connection), never a panic.

use super::crc32c::{crc32c, Crc32c};
use std::fmt;

/// Length of a basic header segment.
pub const BHS_LEN: usize = 48;
/// Length of a digest.
pub const DIGEST_LEN: usize = 4;
/// The reserved task tag (no task).
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest data segment length the 24-bit field can carry.
pub const MAX_DSL: u32 = (1 << 24) - 1;

/// What is wrong with a PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduError {
    /// An opcode this side never receives (or an unknown one).
    BadOpcode(u8),
    /// A data segment longer than this side declared it accepts.
    BadLength {
        /// Data segment length announced.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// Additional header segments, which no PDU Ember accepts carries.
    UnexpectedAhs(u8),
    /// The header digest does not match.
    HeaderDigest {
        /// Digest received.
        got: u32,
        /// Digest computed.
        want: u32,
    },
    /// The data digest does not match.
    DataDigest {
        /// Digest received.
        got: u32,
        /// Digest computed.
        want: u32,
    },
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::BadOpcode(o) => write!(f, "unexpected opcode {o:#04x}"),
            PduError::BadLength { len, max } => {
                write!(f, "data segment of {len} bytes exceeds the limit of {max}")
            }
            PduError::UnexpectedAhs(n) => write!(f, "unexpected AHS of {n} words"),
            PduError::HeaderDigest { got, want } => {
                write!(f, "header digest {got:#010x}, expected {want:#010x}")
            }
            PduError::DataDigest { got, want } => {
                write!(f, "data digest {got:#010x}, expected {want:#010x}")
            }
        }
    }
}

impl std::error::Error for PduError {}

/// Opcodes (RFC 7143 §11.1.1).
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TMF_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Sequence numbers most target PDUs carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sn {
    /// StatSN.
    pub stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

/// Login stages (CSG/NSG).
pub mod stage {
    /// SecurityNegotiation.
    pub const SECURITY: u8 = 0;
    /// LoginOperationalNegotiation.
    pub const OPERATIONAL: u8 = 1;
    /// FullFeaturePhase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Task management functions (RFC 7143 §11.5.1).
pub mod tmf {
    /// ABORT TASK.
    pub const ABORT_TASK: u8 = 1;
    /// LOGICAL UNIT RESET.
    pub const LUN_RESET: u8 = 5;
    /// Response: function complete.
    pub const COMPLETE: u8 = 0;
    /// Response: task does not exist.
    pub const NO_TASK: u8 = 1;
}

/// A SCSI Command (initiator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCmd {
    /// Immediate delivery.
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub fin: bool,
    /// R: data-in expected.
    pub read: bool,
    /// W: data-out expected.
    pub write: bool,
    /// Task attribute (1: simple).
    pub attr: u8,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag.
    pub itt: u32,
    /// Expected data transfer length.
    pub edtl: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// The CDB.
    pub cdb: [u8; 16],
}

/// A SCSI Response (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiResp {
    /// Flags byte (o, u, O, U bits).
    pub flags: u8,
    /// iSCSI service response (0: command completed at target).
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub sn: Sn,
    /// ExpDataSN.
    pub exp_data_sn: u32,
    /// Residual count (see the flags for its sense).
    pub residual: u32,
}

impl ScsiResp {
    /// Residual underflow: fewer bytes moved than expected.
    pub fn underflow(&self) -> bool {
        self.flags & 0x02 != 0
    }
    /// Residual overflow: the command wanted more than expected.
    pub fn overflow(&self) -> bool {
        self.flags & 0x04 != 0
    }
}

/// SCSI Data-In (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataIn {
    /// F: last PDU of the sequence.
    pub fin: bool,
    /// A: acknowledgement requested (ERL > 0 only).
    pub ack: bool,
    /// Flags byte (O, U, S bits).
    pub flags: u8,
    /// SCSI status when the S bit is set.
    pub status: u8,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// Sequence numbers (StatSN valid with S).
    pub sn: Sn,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer offset.
    pub offset: u32,
    /// Residual count.
    pub residual: u32,
}

impl DataIn {
    /// S: the PDU carries the command's status.
    pub fn has_status(&self) -> bool {
        self.flags & 0x01 != 0
    }
    /// Residual underflow.
    pub fn underflow(&self) -> bool {
        self.flags & 0x02 != 0
    }
}

/// SCSI Data-Out (initiator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    /// F: last PDU of the sequence.
    pub fin: bool,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag (0xffffffff for unsolicited data).
    pub ttt: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// DataSN.
    pub data_sn: u32,
    /// Buffer offset.
    pub offset: u32,
}

/// Ready To Transfer (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// Sequence numbers (StatSN not advanced).
    pub sn: Sn,
    /// R2TSN.
    pub r2t_sn: u32,
    /// Buffer offset.
    pub offset: u32,
    /// Desired data transfer length.
    pub len: u32,
}

/// NOP-Out (initiator) or NOP-In (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nop {
    /// Immediate (NOP-Out).
    pub immediate: bool,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// NOP-Out: CmdSN, ExpStatSN in `sn.stat_sn`; NOP-In: StatSN, ExpCmdSN, MaxCmdSN.
    pub sn: Sn,
}

/// Task Management Function Request (initiator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfReq {
    /// Immediate delivery.
    pub immediate: bool,
    /// The function.
    pub function: u8,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag of this request.
    pub itt: u32,
    /// Referenced task tag (ABORT TASK).
    pub ref_itt: u32,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// RefCmdSN.
    pub ref_cmd_sn: u32,
    /// ExpDataSN.
    pub exp_data_sn: u32,
}

/// Task Management Function Response (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmfResp {
    /// Response (0: function complete, 1: task does not exist, ...).
    pub response: u8,
    /// Initiator task tag of the request.
    pub itt: u32,
    /// Sequence numbers.
    pub sn: Sn,
}

/// Login Request (initiator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginReq {
    /// T: transit to the next stage.
    pub transit: bool,
    /// C: text continues in the next PDU.
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// Initiator session id.
    pub isid: [u8; 6],
    /// Target session identifying handle (0 for a new session).
    pub tsih: u16,
    /// Initiator task tag.
    pub itt: u32,
    /// Connection id.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// Login Response (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginResp {
    /// T: transit to the next stage.
    pub transit: bool,
    /// C: text continues.
    pub cont: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-active.
    pub version_active: u8,
    /// Initiator session id.
    pub isid: [u8; 6],
    /// Target session identifying handle.
    pub tsih: u16,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub sn: Sn,
    /// Status-Class (0 success, 1 redirect, 2 initiator error, 3 target error).
    pub status_class: u8,
    /// Status-Detail.
    pub status_detail: u8,
}

/// Text Request (initiator) or Text Response (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text {
    /// Immediate (request).
    pub immediate: bool,
    /// F: final.
    pub fin: bool,
    /// C: continue.
    pub cont: bool,
    /// LUN field.
    pub lun: [u8; 8],
    /// Initiator task tag.
    pub itt: u32,
    /// Target transfer tag.
    pub ttt: u32,
    /// Request: CmdSN (`stat_sn` holds ExpStatSN); response: StatSN, ExpCmdSN, MaxCmdSN.
    pub sn: Sn,
}

/// Logout Request (initiator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutReq {
    /// Immediate delivery.
    pub immediate: bool,
    /// Reason (0: close the session).
    pub reason: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Connection id.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// Logout Response (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogoutResp {
    /// Response (0: closed successfully).
    pub response: u8,
    /// Initiator task tag.
    pub itt: u32,
    /// Sequence numbers.
    pub sn: Sn,
    /// Time2Wait.
    pub time2wait: u16,
    /// Time2Retain.
    pub time2retain: u16,
}

/// Asynchronous Message (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncMsg {
    /// LUN field.
    pub lun: [u8; 8],
    /// Sequence numbers.
    pub sn: Sn,
    /// AsyncEvent (0 SCSI event, 1 logout requested, 2 dropping the connection, 3
    /// dropping all connections, 4 renegotiation requested).
    pub event: u8,
    /// AsyncVCode.
    pub vcode: u8,
    /// Parameter1.
    pub param1: u16,
    /// Parameter2.
    pub param2: u16,
    /// Parameter3.
    pub param3: u16,
}

/// Reject (target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// Reason code.
    pub reason: u8,
    /// Sequence numbers.
    pub sn: Sn,
    /// DataSN/R2TSN.
    pub data_sn: u32,
}

/// A typed PDU of either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdu {
    /// NOP-Out.
    NopOut(Nop),
    /// SCSI Command.
    ScsiCmd(ScsiCmd),
    /// Task Management Function Request.
    TmfReq(TmfReq),
    /// Login Request.
    LoginReq(LoginReq),
    /// Text Request.
    TextReq(Text),
    /// SCSI Data-Out.
    DataOut(DataOut),
    /// Logout Request.
    LogoutReq(LogoutReq),
    /// NOP-In.
    NopIn(Nop),
    /// SCSI Response.
    ScsiResp(ScsiResp),
    /// Task Management Function Response.
    TmfResp(TmfResp),
    /// Login Response.
    LoginResp(LoginResp),
    /// Text Response.
    TextResp(Text),
    /// SCSI Data-In.
    DataIn(DataIn),
    /// Logout Response.
    LogoutResp(LogoutResp),
    /// Ready To Transfer.
    R2t(R2t),
    /// Asynchronous Message.
    Async(AsyncMsg),
    /// Reject.
    Reject(Reject),
}

fn u32_at(b: &[u8; BHS_LEN], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u16_at(b: &[u8; BHS_LEN], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn lun_at(b: &[u8; BHS_LEN]) -> [u8; 8] {
    let mut l = [0u8; 8];
    l.copy_from_slice(&b[8..16]);
    l
}
fn put32(b: &mut [u8; BHS_LEN], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put16(b: &mut [u8; BHS_LEN], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_be_bytes());
}
fn sn_at(b: &[u8; BHS_LEN]) -> Sn {
    Sn {
        stat_sn: u32_at(b, 24),
        exp_cmd_sn: u32_at(b, 28),
        max_cmd_sn: u32_at(b, 32),
    }
}
fn put_sn(b: &mut [u8; BHS_LEN], sn: Sn) {
    put32(b, 24, sn.stat_sn);
    put32(b, 28, sn.exp_cmd_sn);
    put32(b, 32, sn.max_cmd_sn);
}
fn bit(v: u8, mask: u8) -> bool {
    v & mask != 0
}
fn flag(on: bool, mask: u8) -> u8 {
    if on {
        mask
    } else {
        0
    }
}

/// The opcode of a BHS.
pub fn opcode(b: &[u8; BHS_LEN]) -> u8 {
    b[0] & 0x3f
}

/// TotalAHSLength (in 4-byte words) of a BHS.
pub fn ahs_words(b: &[u8; BHS_LEN]) -> u8 {
    b[4]
}

/// DataSegmentLength of a BHS.
pub fn data_len(b: &[u8; BHS_LEN]) -> u32 {
    u32::from_be_bytes([0, b[5], b[6], b[7]])
}

/// `n` rounded up to a multiple of 4 (the data segment padding).
pub fn padded(n: u32) -> u32 {
    n.div_ceil(4) * 4
}

impl Pdu {
    /// Decode a basic header segment.
    pub fn parse(b: &[u8; BHS_LEN]) -> Result<Pdu, PduError> {
        let imm = bit(b[0], 0x40);
        let f = b[1];
        Ok(match opcode(b) {
            op::NOP_OUT => Pdu::NopOut(Nop {
                immediate: imm,
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                sn: Sn {
                    stat_sn: u32_at(b, 28),
                    exp_cmd_sn: u32_at(b, 24),
                    max_cmd_sn: 0,
                },
            }),
            op::SCSI_CMD => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                Pdu::ScsiCmd(ScsiCmd {
                    immediate: imm,
                    fin: bit(f, 0x80),
                    read: bit(f, 0x40),
                    write: bit(f, 0x20),
                    attr: f & 0x07,
                    lun: lun_at(b),
                    itt: u32_at(b, 16),
                    edtl: u32_at(b, 20),
                    cmd_sn: u32_at(b, 24),
                    exp_stat_sn: u32_at(b, 28),
                    cdb,
                })
            }
            op::TMF_REQ => Pdu::TmfReq(TmfReq {
                immediate: imm,
                function: f & 0x7f,
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ref_itt: u32_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
                ref_cmd_sn: u32_at(b, 32),
                exp_data_sn: u32_at(b, 36),
            }),
            op::LOGIN_REQ => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Pdu::LoginReq(LoginReq {
                    transit: bit(f, 0x80),
                    cont: bit(f, 0x40),
                    csg: (f >> 2) & 3,
                    nsg: f & 3,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: u16_at(b, 14),
                    itt: u32_at(b, 16),
                    cid: u16_at(b, 20),
                    cmd_sn: u32_at(b, 24),
                    exp_stat_sn: u32_at(b, 28),
                })
            }
            op::TEXT_REQ => Pdu::TextReq(Text {
                immediate: imm,
                fin: bit(f, 0x80),
                cont: bit(f, 0x40),
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                sn: Sn {
                    stat_sn: u32_at(b, 28),
                    exp_cmd_sn: u32_at(b, 24),
                    max_cmd_sn: 0,
                },
            }),
            op::DATA_OUT => Pdu::DataOut(DataOut {
                fin: bit(f, 0x80),
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                exp_stat_sn: u32_at(b, 28),
                data_sn: u32_at(b, 36),
                offset: u32_at(b, 40),
            }),
            op::LOGOUT_REQ => Pdu::LogoutReq(LogoutReq {
                immediate: imm,
                reason: f & 0x7f,
                itt: u32_at(b, 16),
                cid: u16_at(b, 20),
                cmd_sn: u32_at(b, 24),
                exp_stat_sn: u32_at(b, 28),
            }),
            op::NOP_IN => Pdu::NopIn(Nop {
                immediate: false,
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                sn: sn_at(b),
            }),
            op::SCSI_RESP => Pdu::ScsiResp(ScsiResp {
                flags: f & 0x7f,
                response: b[2],
                status: b[3],
                itt: u32_at(b, 16),
                sn: sn_at(b),
                exp_data_sn: u32_at(b, 36),
                residual: u32_at(b, 44),
            }),
            op::TMF_RESP => Pdu::TmfResp(TmfResp {
                response: b[2],
                itt: u32_at(b, 16),
                sn: sn_at(b),
            }),
            op::LOGIN_RESP => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Pdu::LoginResp(LoginResp {
                    transit: bit(f, 0x80),
                    cont: bit(f, 0x40),
                    csg: (f >> 2) & 3,
                    nsg: f & 3,
                    version_max: b[2],
                    version_active: b[3],
                    isid,
                    tsih: u16_at(b, 14),
                    itt: u32_at(b, 16),
                    sn: sn_at(b),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            op::TEXT_RESP => Pdu::TextResp(Text {
                immediate: false,
                fin: bit(f, 0x80),
                cont: bit(f, 0x40),
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                sn: sn_at(b),
            }),
            op::DATA_IN => Pdu::DataIn(DataIn {
                fin: bit(f, 0x80),
                ack: bit(f, 0x40),
                flags: f & 0x07,
                status: b[3],
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                sn: sn_at(b),
                data_sn: u32_at(b, 36),
                offset: u32_at(b, 40),
                residual: u32_at(b, 44),
            }),
            op::LOGOUT_RESP => Pdu::LogoutResp(LogoutResp {
                response: b[2],
                itt: u32_at(b, 16),
                sn: sn_at(b),
                time2wait: u16_at(b, 40),
                time2retain: u16_at(b, 42),
            }),
            op::R2T => Pdu::R2t(R2t {
                lun: lun_at(b),
                itt: u32_at(b, 16),
                ttt: u32_at(b, 20),
                sn: sn_at(b),
                r2t_sn: u32_at(b, 36),
                offset: u32_at(b, 40),
                len: u32_at(b, 44),
            }),
            op::ASYNC => Pdu::Async(AsyncMsg {
                lun: lun_at(b),
                sn: sn_at(b),
                event: b[36],
                vcode: b[37],
                param1: u16_at(b, 38),
                param2: u16_at(b, 40),
                param3: u16_at(b, 42),
            }),
            op::REJECT => Pdu::Reject(Reject {
                reason: b[2],
                sn: sn_at(b),
                data_sn: u32_at(b, 36),
            }),
            other => return Err(PduError::BadOpcode(other)),
        })
    }

    /// True for the PDUs a target sends.
    pub fn from_target(&self) -> bool {
        matches!(
            self,
            Pdu::NopIn(_)
                | Pdu::ScsiResp(_)
                | Pdu::TmfResp(_)
                | Pdu::LoginResp(_)
                | Pdu::TextResp(_)
                | Pdu::DataIn(_)
                | Pdu::LogoutResp(_)
                | Pdu::R2t(_)
                | Pdu::Async(_)
                | Pdu::Reject(_)
        )
    }

    /// Encode as a basic header segment with the given TotalAHSLength and
    /// DataSegmentLength (which must fit 24 bits; larger values are clamped, and the
    /// session never builds one).
    pub fn to_bhs(&self, ahs_words: u8, data_len: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        b[4] = ahs_words;
        let dl = data_len.min(MAX_DSL).to_be_bytes();
        b[5..8].copy_from_slice(&dl[1..4]);
        match self {
            Pdu::NopOut(p) => {
                b[0] = op::NOP_OUT | flag(p.immediate, 0x40);
                b[1] = 0x80;
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.sn.exp_cmd_sn);
                put32(&mut b, 28, p.sn.stat_sn);
            }
            Pdu::ScsiCmd(p) => {
                b[0] = op::SCSI_CMD | flag(p.immediate, 0x40);
                b[1] =
                    flag(p.fin, 0x80) | flag(p.read, 0x40) | flag(p.write, 0x20) | (p.attr & 0x07);
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.edtl);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                b[32..48].copy_from_slice(&p.cdb);
            }
            Pdu::TmfReq(p) => {
                b[0] = op::TMF_REQ | flag(p.immediate, 0x40);
                b[1] = 0x80 | (p.function & 0x7f);
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ref_itt);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 32, p.ref_cmd_sn);
                put32(&mut b, 36, p.exp_data_sn);
            }
            Pdu::LoginReq(p) => {
                b[0] = op::LOGIN_REQ | 0x40;
                b[1] =
                    flag(p.transit, 0x80) | flag(p.cont, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
                b[2] = p.version_max;
                b[3] = p.version_min;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Pdu::TextReq(p) => {
                b[0] = op::TEXT_REQ | flag(p.immediate, 0x40);
                b[1] = flag(p.fin, 0x80) | flag(p.cont, 0x40);
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 24, p.sn.exp_cmd_sn);
                put32(&mut b, 28, p.sn.stat_sn);
            }
            Pdu::DataOut(p) => {
                b[0] = op::DATA_OUT;
                b[1] = flag(p.fin, 0x80);
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put32(&mut b, 28, p.exp_stat_sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.offset);
            }
            Pdu::LogoutReq(p) => {
                b[0] = op::LOGOUT_REQ | flag(p.immediate, 0x40);
                b[1] = 0x80 | (p.reason & 0x7f);
                put32(&mut b, 16, p.itt);
                put16(&mut b, 20, p.cid);
                put32(&mut b, 24, p.cmd_sn);
                put32(&mut b, 28, p.exp_stat_sn);
            }
            Pdu::NopIn(p) => {
                b[0] = op::NOP_IN;
                b[1] = 0x80;
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put_sn(&mut b, p.sn);
            }
            Pdu::ScsiResp(p) => {
                b[0] = op::SCSI_RESP;
                b[1] = 0x80 | p.flags;
                b[2] = p.response;
                b[3] = p.status;
                put32(&mut b, 16, p.itt);
                put_sn(&mut b, p.sn);
                put32(&mut b, 36, p.exp_data_sn);
                put32(&mut b, 44, p.residual);
            }
            Pdu::TmfResp(p) => {
                b[0] = op::TMF_RESP;
                b[1] = 0x80;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put_sn(&mut b, p.sn);
            }
            Pdu::LoginResp(p) => {
                b[0] = op::LOGIN_RESP;
                b[1] =
                    flag(p.transit, 0x80) | flag(p.cont, 0x40) | ((p.csg & 3) << 2) | (p.nsg & 3);
                b[2] = p.version_max;
                b[3] = p.version_active;
                b[8..14].copy_from_slice(&p.isid);
                put16(&mut b, 14, p.tsih);
                put32(&mut b, 16, p.itt);
                put_sn(&mut b, p.sn);
                b[36] = p.status_class;
                b[37] = p.status_detail;
            }
            Pdu::TextResp(p) => {
                b[0] = op::TEXT_RESP;
                b[1] = flag(p.fin, 0x80) | flag(p.cont, 0x40);
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put_sn(&mut b, p.sn);
            }
            Pdu::DataIn(p) => {
                b[0] = op::DATA_IN;
                b[1] = flag(p.fin, 0x80) | flag(p.ack, 0x40) | (p.flags & 0x07);
                b[3] = p.status;
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put_sn(&mut b, p.sn);
                put32(&mut b, 36, p.data_sn);
                put32(&mut b, 40, p.offset);
                put32(&mut b, 44, p.residual);
            }
            Pdu::LogoutResp(p) => {
                b[0] = op::LOGOUT_RESP;
                b[1] = 0x80;
                b[2] = p.response;
                put32(&mut b, 16, p.itt);
                put_sn(&mut b, p.sn);
                put16(&mut b, 40, p.time2wait);
                put16(&mut b, 42, p.time2retain);
            }
            Pdu::R2t(p) => {
                b[0] = op::R2T;
                b[1] = 0x80;
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, p.itt);
                put32(&mut b, 20, p.ttt);
                put_sn(&mut b, p.sn);
                put32(&mut b, 36, p.r2t_sn);
                put32(&mut b, 40, p.offset);
                put32(&mut b, 44, p.len);
            }
            Pdu::Async(p) => {
                b[0] = op::ASYNC;
                b[1] = 0x80;
                b[8..16].copy_from_slice(&p.lun);
                put32(&mut b, 16, RESERVED_TAG);
                put_sn(&mut b, p.sn);
                b[36] = p.event;
                b[37] = p.vcode;
                put16(&mut b, 38, p.param1);
                put16(&mut b, 40, p.param2);
                put16(&mut b, 42, p.param3);
            }
            Pdu::Reject(p) => {
                b[0] = op::REJECT;
                b[1] = 0x80;
                b[2] = p.reason;
                put32(&mut b, 16, RESERVED_TAG);
                put_sn(&mut b, p.sn);
                put32(&mut b, 36, p.data_sn);
            }
        }
        b
    }
}

/// Framing settings of one direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCfg {
    /// A CRC32C header digest follows the header.
    pub header_digest: bool,
    /// A CRC32C data digest follows a non-empty data segment.
    pub data_digest: bool,
    /// Largest data segment accepted (the MaxRecvDataSegmentLength this side declared).
    pub max_data: u32,
}

/// A complete PDU found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The raw header.
    pub bhs: [u8; BHS_LEN],
    /// The decoded header.
    pub pdu: Pdu,
    /// Where the data segment (without padding) lies in the buffer.
    pub data: std::ops::Range<usize>,
    /// Bytes the whole PDU occupies (header, digests, data, padding).
    pub len: usize,
}

/// Bytes of the header part (BHS, AHS, header digest) of a PDU with this BHS.
pub fn header_len(bhs: &[u8; BHS_LEN], cfg: &FrameCfg) -> usize {
    BHS_LEN + usize::from(ahs_words(bhs)) * 4 + if cfg.header_digest { DIGEST_LEN } else { 0 }
}

/// Find one complete PDU at the start of `buf`. `Ok(None)` means more bytes are needed
/// (at most [`max_frame_len`] in all). Checks the opcode, the data segment length against
/// the limit, the absence of AHS and both digests before returning.
pub fn decode_frame(buf: &[u8], cfg: &FrameCfg) -> Result<Option<Frame>, PduError> {
    let Some(head) = buf.get(..BHS_LEN) else {
        return Ok(None);
    };
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(head);
    if ahs_words(&bhs) != 0 {
        return Err(PduError::UnexpectedAhs(ahs_words(&bhs)));
    }
    let hlen = header_len(&bhs, cfg);
    if buf.len() < hlen {
        return Ok(None);
    }
    if cfg.header_digest {
        let got = u32::from_le_bytes([buf[hlen - 4], buf[hlen - 3], buf[hlen - 2], buf[hlen - 1]]);
        let want = crc32c(&buf[..hlen - 4]);
        if got != want {
            return Err(PduError::HeaderDigest { got, want });
        }
    }
    let pdu = Pdu::parse(&bhs)?;
    let dl = data_len(&bhs);
    if dl > cfg.max_data {
        return Err(PduError::BadLength {
            len: dl,
            max: cfg.max_data,
        });
    }
    let dl = dl as usize;
    let pad = padded(dl as u32) as usize;
    let dd = if cfg.data_digest && dl > 0 {
        DIGEST_LEN
    } else {
        0
    };
    let total = hlen + pad + dd;
    if buf.len() < total {
        return Ok(None);
    }
    if dd > 0 {
        let o = hlen + pad;
        let got = u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let want = crc32c(&buf[hlen..hlen + pad]);
        if got != want {
            return Err(PduError::DataDigest { got, want });
        }
    }
    Ok(Some(Frame {
        bhs,
        pdu,
        data: hlen..hlen + dl,
        len: total,
    }))
}

/// The largest PDU [`decode_frame`] accepts with `cfg` (no AHS).
pub fn max_frame_len(cfg: &FrameCfg) -> usize {
    BHS_LEN + 2 * DIGEST_LEN + padded(cfg.max_data) as usize
}

/// Encode a whole PDU (header, digests, data, padding) into `out`: for login, text and
/// the tests. The data path builds the same layout around borrowed data instead.
pub fn encode_frame(pdu: &Pdu, data: &[u8], cfg: &FrameCfg, out: &mut Vec<u8>) {
    let dl = u32::try_from(data.len()).unwrap_or(MAX_DSL).min(MAX_DSL);
    let bhs = pdu.to_bhs(0, dl);
    out.extend_from_slice(&bhs);
    if cfg.header_digest {
        out.extend_from_slice(&crc32c(&bhs).to_le_bytes());
    }
    if dl > 0 {
        let data = &data[..dl as usize];
        out.extend_from_slice(data);
        let pad = (padded(dl) - dl) as usize;
        out.extend_from_slice(&[0u8; 3][..pad]);
        if cfg.data_digest {
            let mut c = Crc32c::new();
            c.update(data);
            c.update(&[0u8; 3][..pad]);
            out.extend_from_slice(&c.finish().to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: FrameCfg = FrameCfg {
        header_digest: false,
        data_digest: false,
        max_data: 8192,
    };
    const DIGESTS: FrameCfg = FrameCfg {
        header_digest: true,
        data_digest: true,
        max_data: 8192,
    };

    fn every_kind() -> Vec<Pdu> {
        let lun = [0, 1, 0, 0, 0, 0, 0, 0];
        let sn = Sn {
            stat_sn: 7,
            exp_cmd_sn: 8,
            max_cmd_sn: 40,
        };
        vec![
            Pdu::NopOut(Nop {
                immediate: true,
                lun,
                itt: 5,
                ttt: RESERVED_TAG,
                sn: Sn {
                    stat_sn: 3,
                    exp_cmd_sn: 9,
                    max_cmd_sn: 0,
                },
            }),
            Pdu::ScsiCmd(ScsiCmd {
                immediate: false,
                fin: true,
                read: true,
                write: false,
                attr: 1,
                lun,
                itt: 0x0102_0304,
                edtl: 4096,
                cmd_sn: 11,
                exp_stat_sn: 12,
                cdb: [0x88, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
            }),
            Pdu::TmfReq(TmfReq {
                immediate: true,
                function: tmf::ABORT_TASK,
                lun,
                itt: 77,
                ref_itt: 5,
                cmd_sn: 13,
                exp_stat_sn: 14,
                ref_cmd_sn: 10,
                exp_data_sn: 0,
            }),
            Pdu::LoginReq(LoginReq {
                transit: true,
                cont: false,
                csg: stage::OPERATIONAL,
                nsg: stage::FULL_FEATURE,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 1, 2, 3, 0, 1],
                tsih: 0,
                itt: 0,
                cid: 0,
                cmd_sn: 1,
                exp_stat_sn: 0,
            }),
            Pdu::TextReq(Text {
                immediate: true,
                fin: true,
                cont: false,
                lun: [0; 8],
                itt: 3,
                ttt: RESERVED_TAG,
                sn: Sn {
                    stat_sn: 2,
                    exp_cmd_sn: 4,
                    max_cmd_sn: 0,
                },
            }),
            Pdu::DataOut(DataOut {
                fin: true,
                lun,
                itt: 9,
                ttt: 0x55,
                exp_stat_sn: 3,
                data_sn: 2,
                offset: 16384,
            }),
            Pdu::LogoutReq(LogoutReq {
                immediate: true,
                reason: 0,
                itt: 4,
                cid: 0,
                cmd_sn: 20,
                exp_stat_sn: 21,
            }),
            Pdu::NopIn(Nop {
                immediate: false,
                lun,
                itt: RESERVED_TAG,
                ttt: 99,
                sn,
            }),
            Pdu::ScsiResp(ScsiResp {
                flags: 0x02,
                response: 0,
                status: 2,
                itt: 5,
                sn,
                exp_data_sn: 1,
                residual: 512,
            }),
            Pdu::TmfResp(TmfResp {
                response: tmf::NO_TASK,
                itt: 77,
                sn,
            }),
            Pdu::LoginResp(LoginResp {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version_active: 0,
                isid: [0x80, 1, 2, 3, 0, 1],
                tsih: 0x1234,
                itt: 0,
                sn,
                status_class: 2,
                status_detail: 1,
            }),
            Pdu::TextResp(Text {
                immediate: false,
                fin: true,
                cont: false,
                lun: [0; 8],
                itt: 3,
                ttt: RESERVED_TAG,
                sn,
            }),
            Pdu::DataIn(DataIn {
                fin: true,
                ack: false,
                flags: 0x01,
                status: 0,
                lun: [0; 8],
                itt: 5,
                ttt: RESERVED_TAG,
                sn,
                data_sn: 3,
                offset: 8192,
                residual: 0,
            }),
            Pdu::LogoutResp(LogoutResp {
                response: 0,
                itt: 4,
                sn,
                time2wait: 2,
                time2retain: 20,
            }),
            Pdu::R2t(R2t {
                lun,
                itt: 9,
                ttt: 0x55,
                sn,
                r2t_sn: 0,
                offset: 8192,
                len: 65536,
            }),
            Pdu::Async(AsyncMsg {
                lun,
                sn,
                event: 1,
                vcode: 0,
                param1: 0,
                param2: 2,
                param3: 20,
            }),
            Pdu::Reject(Reject {
                reason: 9,
                sn,
                data_sn: 0,
            }),
        ]
    }

    #[test]
    fn every_pdu_round_trips() {
        for p in every_kind() {
            let b = p.to_bhs(0, 12);
            assert_eq!(data_len(&b), 12);
            assert_eq!(Pdu::parse(&b), Ok(p), "{p:?}");
            assert_eq!(Pdu::parse(&b).map(|q| q.to_bhs(0, 12)), Ok(b));
        }
    }

    #[test]
    fn frames_with_and_without_digests() {
        for cfg in [PLAIN, DIGESTS] {
            for p in every_kind().into_iter().filter(Pdu::from_target) {
                for data in [&b""[..], b"a", b"abcd", b"abcdefg"] {
                    let mut out = Vec::new();
                    encode_frame(&p, data, &cfg, &mut out);
                    assert_eq!(out.len() % 4, 0);
                    // Every prefix asks for more; the whole thing decodes.
                    for n in 0..out.len() {
                        assert_eq!(decode_frame(&out[..n], &cfg), Ok(None));
                    }
                    out.extend_from_slice(b"next");
                    let f = decode_frame(&out, &cfg).unwrap().unwrap();
                    assert_eq!(f.pdu, p);
                    assert_eq!(&out[f.data.clone()], data);
                    assert_eq!(f.len, out.len() - 4);
                }
            }
        }
    }

    #[test]
    fn bad_digests_lengths_and_opcodes_are_errors() {
        let p = every_kind()[8];
        let mut out = Vec::new();
        encode_frame(&p, b"sense", &DIGESTS, &mut out);
        let mut bad = out.clone();
        bad[3] ^= 1;
        assert!(matches!(
            decode_frame(&bad, &DIGESTS),
            Err(PduError::HeaderDigest { .. })
        ));
        let mut bad = out.clone();
        bad[BHS_LEN + 4] ^= 1;
        assert!(matches!(
            decode_frame(&bad, &DIGESTS),
            Err(PduError::DataDigest { .. })
        ));
        let mut big = Vec::new();
        encode_frame(&p, &[0u8; 9000], &PLAIN, &mut big);
        assert_eq!(
            decode_frame(&big, &PLAIN),
            Err(PduError::BadLength {
                len: 9000,
                max: 8192
            })
        );
        let mut b = p.to_bhs(0, 0);
        b[0] = 0x1e;
        assert_eq!(decode_frame(&b, &PLAIN), Err(PduError::BadOpcode(0x1e)));
        let b = p.to_bhs(2, 0);
        assert_eq!(decode_frame(&b, &PLAIN), Err(PduError::UnexpectedAhs(2)));
    }
}
