//! Full feature phase of one connection: SCSI commands over iSCSI (RFC 7143 §3.2, §4.2,
//! §11), with no I/O.
//!
//! The driver hands in [`Command`]s, received bytes ([`Session::input`]) and the time
//! ([`Session::tick`]); the session hands out bytes to send ([`Session::iovecs`], then
//! [`Session::advance`]) and [`Finished`] commands. It owns each command's buffer while
//! the command is in flight: write data is sent straight from it (zero copy), Data-In is
//! copied into it.
//!
//! - Tags: the commands in flight live in a [`Slots`] table (at most [`MAX_TASKS`]); a
//!   command's ITT is its [`Key`]: the low 15 bits of the generation (counted from 1)
//!   above the 16-bit slot index, so a late PDU for a reused slot is not taken for the new command (unless
//!   the slot was reused a multiple of 2^15 times meanwhile). ITTs of NOP-Out pings and
//!   task management have the top bit set; command ITTs never do.
//! - CmdSN window (§4.2.2.1): commands wait while `CmdSN > MaxCmdSN`; ExpCmdSN/MaxCmdSN
//!   only move forward, and only from PDUs where `MaxCmdSN ≥ ExpCmdSN − 1`.
//! - Writes: immediate data up to `min(FirstBurstLength, MaxRecvDataSegmentLength)`,
//!   unsolicited Data-Out up to FirstBurstLength when InitialR2T=No, the rest on R2T;
//!   every Data-Out PDU within the target's MaxRecvDataSegmentLength.
//! - Reads: Data-In is checked (tag, DataSN order, offset within the buffer) before a byte
//!   is copied; status may ride the last Data-In (S bit) or come in a SCSI Response.
//! - Timeouts: a NOP-Out ping when nothing was received for `nop_interval`, and the
//!   connection is declared dead when it is not answered within `nop_timeout`. A command
//!   older than `cmd_timeout` is aborted (ABORT TASK); a TMF unanswered within
//!   `tmf_timeout` escalates to LOGICAL UNIT RESET, and an unanswered reset kills the
//!   connection. Every failure of the connection is a [`SessionError`]; the driver then
//!   takes the unfinished commands back ([`Session::take_commands`]) to replay them on a
//!   new session (error recovery level 0: the session is the unit of recovery).

use super::crc32c::Crc32c;
use super::pdu::{
    self, tmf, DataOut, FrameCfg, Nop, Pdu, PduError, ScsiCmd, Sn, TmfReq, BHS_LEN, RESERVED_TAG,
};
use super::text::Negotiated;
use crate::backend::scsi::{Cdb, Sense};
use crate::buf::Buffer;
use crate::slots::{Key, Slots};
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Data direction of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// No data.
    None,
    /// Data-In (target to initiator).
    Read,
    /// Data-Out (initiator to target).
    Write,
}

/// A SCSI command to run.
#[derive(Debug)]
pub struct Command {
    /// The CDB.
    pub cdb: Cdb,
    /// Data direction.
    pub dir: Dir,
    /// Expected data transfer length (≤ the buffer's length).
    pub len: u32,
    /// Data buffer: filled by reads, sent by writes.
    pub buf: Buffer,
    /// The owner's identifier, returned in [`Finished`].
    pub cookie: u64,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered.
    Status {
        /// iSCSI service response (0: completed at the target).
        response: u8,
        /// SCSI status.
        status: u8,
        /// Sense data, with CHECK CONDITION.
        sense: Option<Sense>,
        /// Bytes not transferred (underflow); negative for overflow.
        residual: i64,
    },
    /// The command outlived its timeout and was aborted (ABORT TASK or LUN RESET); the
    /// target no longer has it.
    TimedOut,
    /// The target rejected the command PDU.
    Rejected(u8),
}

/// A command that ended.
#[derive(Debug)]
pub struct Finished {
    /// The command, with its buffer.
    pub cmd: Command,
    /// How it ended.
    pub outcome: Outcome,
}

/// Something the target told the session outside of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A SCSI asynchronous event with sense data (e.g. capacity changed).
    Sense(Sense),
    /// The target asks for a logout (AsyncEvent 1), or will drop the connection (2, 3)
    /// or wants renegotiation (4): the connection should be replaced.
    Reconnect {
        /// AsyncEvent.
        event: u8,
        /// Seconds to wait before logging in again.
        wait_s: u16,
    },
}

/// Why the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// A malformed PDU (bad opcode, length or digest).
    Pdu(PduError),
    /// A PDU that breaks the protocol.
    Protocol(String),
    /// The target stopped answering.
    Timeout(&'static str),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Pdu(e) => write!(f, "bad PDU from the target: {e}"),
            SessionError::Protocol(m) => write!(f, "protocol error: {m}"),
            SessionError::Timeout(m) => write!(f, "timeout: {m}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<PduError> for SessionError {
    fn from(e: PduError) -> Self {
        SessionError::Pdu(e)
    }
}

/// Timers of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Ping after this long without a PDU from the target.
    pub nop_interval: Duration,
    /// The connection is dead when a ping is not answered within this.
    pub nop_timeout: Duration,
    /// A command is aborted when not finished within this.
    pub cmd_timeout: Duration,
    /// A task management request must be answered within this.
    pub tmf_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            nop_interval: Duration::from_secs(5),
            nop_timeout: Duration::from_secs(10),
            cmd_timeout: Duration::from_secs(30),
            tmf_timeout: Duration::from_secs(10),
        }
    }
}

/// Sequence numbers a session starts with (from the last login response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartSn {
    /// CmdSN of the first command.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
    /// ExpCmdSN.
    pub exp_cmd_sn: u32,
    /// MaxCmdSN.
    pub max_cmd_sn: u32,
}

/// Slot bits of an ITT.
const SLOT_BITS: u32 = 16;
/// Generation bits of an ITT (above the slot; bit 31 stays clear).
const ITT_GEN_BITS: u32 = 15;
/// Most commands in flight on one session (slots).
pub const MAX_TASKS: usize = 1 << SLOT_BITS;

/// The ITT of the task under `key` (its slot is below [`MAX_TASKS`]): the generation
/// counts from 1 on the wire (the numbering of the sessions recorded in `testdata/`).
fn itt_of(key: Key) -> u32 {
    let gen = key.gen().wrapping_add(1) & ((1 << ITT_GEN_BITS) - 1);
    (gen << SLOT_BITS) | (key.slot() & ((1 << SLOT_BITS) - 1))
}
/// ITTs of pings have this bit (command ITTs never do).
const PING_BIT: u32 = 1 << 31;
/// ITT of task management requests.
const TMF_ITT: u32 = PING_BIT | (1 << 30);

fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}
fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

struct Task {
    cmd: Command,
    itt: u32,
    cmd_sn: u32,
    /// On the wire (not waiting for the window).
    sent: bool,
    started: Instant,
    /// Next DataSN expected on Data-In.
    data_sn: u32,
    /// Bytes of Data-In received.
    received: u32,
    /// Out PDUs still referencing the buffer.
    queued_out: u32,
    /// Ended while PDUs still referenced its buffer.
    done: Option<Outcome>,
    /// An ABORT TASK for it is outstanding.
    aborting: bool,
}

/// Data of an outgoing PDU.
#[derive(Debug)]
enum OutData {
    None,
    /// A range of a task's buffer.
    Task {
        slot: Key,
        off: usize,
        len: usize,
    },
}

struct OutPdu {
    /// BHS and, with header digests, its CRC.
    hdr: [u8; BHS_LEN + 4],
    hdr_len: usize,
    data: OutData,
    /// Padding and data digest.
    trailer: [u8; 7],
    trailer_len: usize,
}

impl OutPdu {
    fn data_len(&self) -> usize {
        match &self.data {
            OutData::None => 0,
            OutData::Task { len, .. } => *len,
        }
    }
    fn len(&self) -> usize {
        self.hdr_len + self.data_len() + self.trailer_len
    }
}

struct Tmf {
    function: u8,
    /// Key of the task (ABORT TASK).
    slot: Option<Key>,
    deadline: Instant,
}

/// The full feature phase of one connection.
pub struct Session {
    p: Negotiated,
    t: Timeouts,
    lun: [u8; 8],
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    /// Commands submitted and not finished, by the key their ITT carries.
    tasks: Slots<Task>,
    /// Tasks waiting for the CmdSN window, in submission order.
    waiting: VecDeque<Key>,
    out: VecDeque<OutPdu>,
    /// Bytes of the front PDU already sent.
    out_sent: usize,
    finished: Vec<Finished>,
    events: Vec<Event>,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    ping_seq: u32,
    tmf: Option<Tmf>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("cmd_sn", &self.cmd_sn)
            .field("max_cmd_sn", &self.max_cmd_sn)
            .field("exp_stat_sn", &self.exp_stat_sn)
            .field("live", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

/// Apply `f` to the bytes of `[off, off+len)` of `buf`.
fn buf_read(buf: &Buffer, off: usize, len: usize, mut f: impl FnMut(&[u8])) {
    match buf {
        Buffer::Owned(b) => {
            if let Some(s) = b.as_slice().get(off..off.saturating_add(len)) {
                f(s);
            }
        }
        Buffer::Borrowed(v) => v.for_each_in(off, len, f),
        Buffer::None => {}
    }
}

fn buf_write(buf: &mut Buffer, off: usize, src: &[u8]) {
    match buf {
        Buffer::Owned(b) => {
            if let Some(d) = b.as_mut_slice().get_mut(off..off.saturating_add(src.len())) {
                d.copy_from_slice(src);
            }
        }
        Buffer::Borrowed(v) => v.copy_from_at(off, src),
        Buffer::None => {}
    }
}

impl Session {
    /// A session after a login with these parameters and sequence numbers.
    pub fn new(p: Negotiated, t: Timeouts, lun: [u8; 8], sn: StartSn, now: Instant) -> Session {
        Session {
            p,
            t,
            lun,
            cmd_sn: sn.cmd_sn,
            exp_cmd_sn: sn.exp_cmd_sn,
            max_cmd_sn: sn.max_cmd_sn,
            exp_stat_sn: sn.exp_stat_sn,
            tasks: Slots::new(MAX_TASKS),
            waiting: VecDeque::new(),
            out: VecDeque::new(),
            out_sent: 0,
            finished: Vec::new(),
            events: Vec::new(),
            last_rx: now,
            ping: None,
            ping_seq: 0,
            tmf: None,
        }
    }

    /// Framing of what the target sends.
    pub fn rx_cfg(&self) -> FrameCfg {
        FrameCfg {
            header_digest: self.p.header_digest,
            data_digest: self.p.data_digest,
            max_data: self.p.max_recv_data_segment,
        }
    }

    /// The negotiated parameters.
    pub fn params(&self) -> &Negotiated {
        &self.p
    }

    /// Commands submitted and not finished.
    pub fn live(&self) -> usize {
        self.tasks.len()
    }

    /// Whether bytes are waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Start `cmd` (it waits while the CmdSN window is closed). A session full of
    /// commands hands it back.
    pub fn submit(&mut self, cmd: Command, now: Instant) -> Result<(), Command> {
        let task = Task {
            cmd,
            itt: 0,
            cmd_sn: 0,
            sent: false,
            started: now,
            data_sn: 0,
            received: 0,
            queued_out: 0,
            done: None,
            aborting: false,
        };
        let slot = match self.tasks.insert(task) {
            Ok(k) => k,
            Err(t) => return Err(t.cmd),
        };
        if let Some(t) = self.tasks.get_mut(slot) {
            t.itt = itt_of(slot);
        }
        self.waiting.push_back(slot);
        self.issue_waiting();
        Ok(())
    }

    fn issue_waiting(&mut self) {
        while sn_le(self.cmd_sn, self.max_cmd_sn) {
            let Some(slot) = self.waiting.pop_front() else {
                return;
            };
            self.issue(slot);
        }
    }

    fn push_pdu(&mut self, pdu: &Pdu, data: OutData) {
        let dl = match &data {
            OutData::None => 0,
            OutData::Task { len, .. } => *len,
        };
        let dl32 = u32::try_from(dl).unwrap_or(pdu::MAX_DSL);
        let bhs = pdu.to_bhs(0, dl32);
        let mut hdr = [0u8; BHS_LEN + 4];
        hdr[..BHS_LEN].copy_from_slice(&bhs);
        let mut hdr_len = BHS_LEN;
        if self.p.header_digest {
            let c = super::crc32c::crc32c(&bhs);
            hdr[BHS_LEN..].copy_from_slice(&c.to_le_bytes());
            hdr_len += 4;
        }
        let pad = (pdu::padded(dl32) - dl32) as usize;
        let mut trailer = [0u8; 7];
        let mut trailer_len = pad;
        if self.p.data_digest && dl > 0 {
            let mut c = Crc32c::new();
            match &data {
                OutData::Task { slot, off, len } => {
                    if let Some(t) = self.tasks.get(*slot) {
                        buf_read(&t.cmd.buf, *off, *len, |s| c.update(s));
                    }
                }
                OutData::None => {}
            }
            c.update(&[0u8; 3][..pad]);
            trailer[pad..pad + 4].copy_from_slice(&c.finish().to_le_bytes());
            trailer_len += 4;
        }
        if let OutData::Task { slot, .. } = &data {
            if let Some(t) = self.tasks.get_mut(*slot) {
                t.queued_out += 1;
            }
        }
        self.out.push_back(OutPdu {
            hdr,
            hdr_len,
            data,
            trailer,
            trailer_len,
        });
    }

    /// Put the command PDU of `slot` (and its immediate and unsolicited data) on the wire.
    fn issue(&mut self, slot: Key) {
        let cmd_sn = self.cmd_sn;
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        t.cmd_sn = cmd_sn;
        t.sent = true;
        let (itt, dir, edtl, cdb) = (t.itt, t.cmd.dir, t.cmd.len, t.cmd.cdb);
        let write = dir == Dir::Write;
        let burst = self.p.first_burst.min(edtl);
        let imm = if write && self.p.immediate_data {
            burst.min(self.p.max_send_data_segment)
        } else {
            0
        };
        let unsolicited = write && !self.p.initial_r2t && imm < burst;
        // REPORT LUNS goes to LUN 0, which SPC requires to answer it: the session's own
        // LUN may be the one that is missing.
        let lun = if cdb.opcode() == crate::backend::scsi::opcode::REPORT_LUNS {
            [0; 8]
        } else {
            self.lun
        };
        let pdu = Pdu::ScsiCmd(ScsiCmd {
            immediate: false,
            fin: !unsolicited,
            read: dir == Dir::Read,
            write,
            attr: 1,
            lun,
            itt,
            edtl,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: cdb.0,
        });
        let data = if imm > 0 {
            OutData::Task {
                slot,
                off: 0,
                len: imm as usize,
            }
        } else {
            OutData::None
        };
        self.push_pdu(&pdu, data);
        if unsolicited {
            self.data_out(slot, itt, RESERVED_TAG, imm, burst - imm);
        }
    }

    /// Queue Data-Out PDUs for `[off, off+len)` of a task's buffer.
    fn data_out(&mut self, slot: Key, itt: u32, ttt: u32, off: u32, len: u32) {
        let max = self.p.max_send_data_segment.max(512);
        let mut done = 0u32;
        let mut data_sn = 0u32;
        while done < len {
            let n = (len - done).min(max);
            let pdu = Pdu::DataOut(DataOut {
                fin: done + n == len,
                lun: self.lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                offset: off + done,
            });
            self.push_pdu(
                &pdu,
                OutData::Task {
                    slot,
                    off: (off + done) as usize,
                    len: n as usize,
                },
            );
            done += n;
            data_sn += 1;
        }
    }

    /// Append iovecs for the bytes waiting to be sent (at most `max` iovecs) to `out`.
    /// They point into this session (headers) and into command buffers, and stay valid
    /// until the session is next used mutably.
    pub fn iovecs(&self, out: &mut Vec<libc::iovec>, max: usize) {
        let mut skip = self.out_sent;
        for p in &self.out {
            if out.len() + 3 > max {
                break;
            }
            let mut piece = |base: *const u8, len: usize, out: &mut Vec<libc::iovec>| {
                if skip >= len {
                    skip -= len;
                    return;
                }
                out.push(libc::iovec {
                    iov_base: base.wrapping_add(skip) as *mut libc::c_void,
                    iov_len: len - skip,
                });
                skip = 0;
            };
            piece(p.hdr.as_ptr(), p.hdr_len, out);
            match &p.data {
                OutData::None => {}
                OutData::Task { slot, off, len } => {
                    let Some(t) = self.tasks.get(*slot) else {
                        continue;
                    };
                    match &t.cmd.buf {
                        Buffer::Owned(b) => {
                            piece(b.as_slice().as_ptr().wrapping_add(*off), *len, out);
                        }
                        Buffer::Borrowed(v) => {
                            let mut sub = Vec::new();
                            v.sub_iovecs(*off, *len, &mut sub);
                            for s in sub {
                                piece(s.iov_base as *const u8, s.iov_len, out);
                            }
                        }
                        Buffer::None => {}
                    }
                }
            }
            piece(p.trailer.as_ptr(), p.trailer_len, out);
        }
    }

    /// `n` bytes of the output were sent.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.out.front() else {
                return;
            };
            let left = front.len() - self.out_sent;
            if n < left {
                self.out_sent += n;
                return;
            }
            n -= left;
            self.out_sent = 0;
            if let Some(p) = self.out.pop_front() {
                if let OutData::Task { slot, .. } = p.data {
                    self.unref(slot);
                }
            }
        }
    }

    fn unref(&mut self, slot: Key) {
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        t.queued_out = t.queued_out.saturating_sub(1);
        if t.queued_out == 0 {
            if let Some(o) = t.done {
                self.finish(slot, o);
            }
        }
    }

    /// End the task in `slot` (now, or once no queued PDU references its buffer).
    fn finish(&mut self, slot: Key, outcome: Outcome) {
        let Some(t) = self.tasks.get_mut(slot) else {
            return;
        };
        if t.queued_out > 0 {
            t.done = Some(outcome);
            self.drop_unsent(slot);
            let Some(t) = self.tasks.get(slot) else {
                return;
            };
            if t.queued_out > 0 {
                return;
            }
        }
        let Some(t) = self.tasks.remove(slot) else {
            return;
        };
        self.waiting.retain(|&s| s != slot);
        self.finished.push(Finished {
            cmd: t.cmd,
            outcome,
        });
    }

    /// Remove queued PDUs of `slot` that have not started to go out.
    fn drop_unsent(&mut self, slot: Key) {
        let mut removed = 0;
        let mut i = usize::from(self.out_sent > 0);
        while i < self.out.len() {
            if matches!(self.out[i].data, OutData::Task { slot: s, .. } if s == slot) {
                self.out.remove(i);
                removed += 1;
            } else {
                i += 1;
            }
        }
        if let Some(t) = self.tasks.get_mut(slot) {
            t.queued_out = t.queued_out.saturating_sub(removed);
        }
    }

    /// Commands that ended since the last call.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The connection is gone: every unfinished command, in CmdSN order, for replay on
    /// a new session (commands that had ended are in [`take_finished`](Self::take_finished)).
    pub fn take_commands(&mut self) -> Vec<Command> {
        self.out.clear();
        self.out_sent = 0;
        let keys: Vec<Key> = self.tasks.keys().collect();
        let mut ts: Vec<Task> = keys
            .into_iter()
            .filter_map(|k| self.tasks.remove(k))
            .collect();
        self.waiting.clear();
        // Sent ones in CmdSN order first, then those that were waiting.
        ts.sort_by_key(|t| (!t.sent, t.cmd_sn.wrapping_sub(self.exp_cmd_sn)));
        let mut out = Vec::with_capacity(ts.len());
        for t in ts {
            match t.done {
                Some(o) => self.finished.push(Finished {
                    cmd: t.cmd,
                    outcome: o,
                }),
                None => out.push(t.cmd),
            }
        }
        out
    }

    /// The live task an ITT from the target names: the slot's current key, if the
    /// ITT's generation bits are that key's (a stale or forged ITT finds nothing).
    fn task_by_itt(&self, itt: u32) -> Option<Key> {
        if itt & PING_BIT != 0 {
            return None;
        }
        let (key, t) = self.tasks.get_by_slot(itt & ((1 << SLOT_BITS) - 1))?;
        (itt_of(key) == itt && t.done.is_none()).then_some(key)
    }

    fn update_sn(&mut self, sn: Sn, advance_stat: bool) {
        if advance_stat && sn_le(self.exp_stat_sn, sn.stat_sn.wrapping_add(1)) {
            self.exp_stat_sn = sn.stat_sn.wrapping_add(1);
        }
        // §4.2.2.1: ignore both when MaxCmdSN < ExpCmdSN − 1.
        if sn_lt(sn.max_cmd_sn, sn.exp_cmd_sn.wrapping_sub(1)) {
            return;
        }
        if sn_lt(self.exp_cmd_sn, sn.exp_cmd_sn) {
            self.exp_cmd_sn = sn.exp_cmd_sn;
        }
        if sn_lt(self.max_cmd_sn, sn.max_cmd_sn) {
            self.max_cmd_sn = sn.max_cmd_sn;
            self.issue_waiting();
        }
    }

    /// Consume the complete PDUs at the start of `buf`; returns the bytes used.
    pub fn input(&mut self, buf: &[u8], now: Instant) -> Result<usize, SessionError> {
        let cfg = self.rx_cfg();
        let mut used = 0;
        while let Some(f) = pdu::decode_frame(&buf[used..], &cfg)? {
            self.last_rx = now;
            let data = &buf[used + f.data.start..used + f.data.end];
            self.on_pdu(&f.pdu, data)?;
            used += f.len;
        }
        Ok(used)
    }

    fn on_pdu(&mut self, pdu: &Pdu, data: &[u8]) -> Result<(), SessionError> {
        let proto = |m: String| Err(SessionError::Protocol(m));
        match pdu {
            Pdu::ScsiResp(r) => {
                self.update_sn(r.sn, true);
                let Some(slot) = self.task_by_itt(r.itt) else {
                    tracing::debug!(itt = r.itt, "SCSI response for no task");
                    return Ok(());
                };
                let sense = if data.len() >= 2 {
                    let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
                    data.get(2..2 + n).and_then(Sense::parse)
                } else {
                    None
                };
                let residual = if r.underflow() {
                    i64::from(r.residual)
                } else if r.overflow() {
                    -i64::from(r.residual)
                } else {
                    0
                };
                if r.status == 0 {
                    self.check_read_complete(slot, residual)?;
                }
                self.finish(
                    slot,
                    Outcome::Status {
                        response: r.response,
                        status: r.status,
                        sense,
                        residual,
                    },
                );
            }
            Pdu::DataIn(d) => {
                self.update_sn(d.sn, d.has_status());
                let Some(slot) = self.task_by_itt(d.itt) else {
                    return proto(format!("Data-In for unknown task {:#x}", d.itt));
                };
                let Some(t) = self.tasks.get_mut(slot) else {
                    return Ok(());
                };
                if t.cmd.dir != Dir::Read {
                    return proto(format!("Data-In for a non-read task {:#x}", d.itt));
                }
                if d.data_sn != t.data_sn {
                    return proto(format!(
                        "Data-In DataSN {} where {} was expected",
                        d.data_sn, t.data_sn
                    ));
                }
                let end = u64::from(d.offset) + data.len() as u64;
                if end > u64::from(t.cmd.len) || end > t.cmd.buf.len() as u64 {
                    return proto(format!(
                        "Data-In of {} bytes at {} past the {}-byte buffer",
                        data.len(),
                        d.offset,
                        t.cmd.len
                    ));
                }
                t.data_sn = t.data_sn.wrapping_add(1);
                t.received = t.received.saturating_add(data.len() as u32);
                buf_write(&mut t.cmd.buf, d.offset as usize, data);
                if d.has_status() {
                    if !d.fin {
                        return proto("Data-In with status but without F".into());
                    }
                    let residual = if d.underflow() {
                        i64::from(d.residual)
                    } else {
                        0
                    };
                    if d.status == 0 {
                        self.check_read_complete(slot, residual)?;
                    }
                    self.finish(
                        slot,
                        Outcome::Status {
                            response: 0,
                            status: d.status,
                            sense: None,
                            residual,
                        },
                    );
                }
            }
            Pdu::R2t(r) => {
                self.update_sn(r.sn, false);
                let Some(slot) = self.task_by_itt(r.itt) else {
                    return proto(format!("R2T for unknown task {:#x}", r.itt));
                };
                let Some(t) = self.tasks.get(slot) else {
                    return Ok(());
                };
                let end = u64::from(r.offset) + u64::from(r.len);
                if t.cmd.dir != Dir::Write
                    || r.len == 0
                    || r.len > self.p.max_burst
                    || end > u64::from(t.cmd.len)
                {
                    return proto(format!(
                        "R2T for {} bytes at {} of a {}-byte write",
                        r.len, r.offset, t.cmd.len
                    ));
                }
                if t.aborting {
                    return Ok(());
                }
                let itt = t.itt;
                self.data_out(slot, itt, r.ttt, r.offset, r.len);
            }
            Pdu::NopIn(n) => {
                let ours = n.itt != RESERVED_TAG;
                self.update_sn(n.sn, ours);
                if ours {
                    if self.ping.is_some_and(|(itt, _)| itt == n.itt) {
                        self.ping = None;
                    }
                } else if n.ttt != RESERVED_TAG {
                    // The target pings us: answer at once, echoing its tag.
                    let reply = Pdu::NopOut(Nop {
                        immediate: true,
                        lun: n.lun,
                        itt: RESERVED_TAG,
                        ttt: n.ttt,
                        sn: Sn {
                            stat_sn: self.exp_stat_sn,
                            exp_cmd_sn: self.cmd_sn,
                            max_cmd_sn: 0,
                        },
                    });
                    self.push_pdu(&reply, OutData::None);
                }
            }
            Pdu::TmfResp(r) => {
                self.update_sn(r.sn, true);
                if r.itt != TMF_ITT {
                    return Ok(());
                }
                if let Some(t) = self.tmf.take() {
                    self.on_tmf_response(t, r.response);
                }
            }
            Pdu::Async(a) => {
                self.update_sn(a.sn, true);
                match a.event {
                    0 => {
                        let sense = if data.len() >= 2 {
                            let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
                            data.get(2..2 + n).and_then(Sense::parse)
                        } else {
                            None
                        };
                        if let Some(s) = sense {
                            self.events.push(Event::Sense(s));
                        }
                    }
                    1..=4 => self.events.push(Event::Reconnect {
                        event: a.event,
                        wait_s: if a.event == 1 { a.param3 } else { a.param2 },
                    }),
                    _ => tracing::debug!(event = a.event, "vendor async message ignored"),
                }
            }
            Pdu::Reject(r) => {
                self.update_sn(r.sn, true);
                let itt = data
                    .get(..BHS_LEN)
                    .and_then(|h| <[u8; BHS_LEN]>::try_from(h).ok())
                    .map(|h| u32::from_be_bytes([h[16], h[17], h[18], h[19]]));
                tracing::warn!(reason = r.reason, itt = ?itt, "the target rejected a PDU");
                match itt.and_then(|i| self.task_by_itt(i)) {
                    Some(slot) => self.finish(slot, Outcome::Rejected(r.reason)),
                    None => {
                        return proto(format!(
                            "the target rejected a PDU (reason {:#x})",
                            r.reason
                        ))
                    }
                }
            }
            Pdu::LogoutResp(_) | Pdu::TextResp(_) | Pdu::LoginResp(_) => {
                return proto(format!("unexpected {pdu:?} in full feature phase"));
            }
            Pdu::NopOut(_)
            | Pdu::ScsiCmd(_)
            | Pdu::TmfReq(_)
            | Pdu::LoginReq(_)
            | Pdu::TextReq(_)
            | Pdu::DataOut(_)
            | Pdu::LogoutReq(_) => {
                return Err(SessionError::Pdu(PduError::BadOpcode(
                    pdu.to_bhs(0, 0)[0] & 0x3f,
                )));
            }
        }
        Ok(())
    }

    /// A read that ends GOOD must have received every byte not covered by the residual.
    fn check_read_complete(&self, slot: Key, residual: i64) -> Result<(), SessionError> {
        let Some(t) = self.tasks.get(slot) else {
            return Ok(());
        };
        if t.cmd.dir != Dir::Read {
            return Ok(());
        }
        let want = i64::from(t.cmd.len) - residual.max(0);
        if i64::from(t.received) != want {
            return Err(SessionError::Protocol(format!(
                "read ended with {} of {want} bytes received",
                t.received
            )));
        }
        Ok(())
    }

    fn on_tmf_response(&mut self, t: Tmf, response: u8) {
        let ok = matches!(response, tmf::COMPLETE | tmf::NO_TASK);
        match (t.function, t.slot) {
            (tmf::ABORT_TASK, Some(slot)) if ok => {
                tracing::warn!(itt = itt_of(slot), "timed-out command aborted");
                if self.tasks.contains(slot) {
                    self.finish(slot, Outcome::TimedOut);
                }
            }
            (tmf::LUN_RESET, _) if ok => {
                tracing::warn!("logical unit reset done; commands in flight are retried");
                let slots: Vec<Key> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.sent && t.done.is_none())
                    .map(|(k, _)| k)
                    .collect();
                for s in slots {
                    self.finish(s, Outcome::TimedOut);
                }
            }
            _ => {
                tracing::warn!(
                    function = t.function,
                    response,
                    "task management failed; resetting the logical unit"
                );
                self.start_tmf(tmf::LUN_RESET, None, Instant::now());
            }
        }
    }

    fn start_tmf(&mut self, function: u8, slot: Option<Key>, now: Instant) {
        let (ref_itt, ref_cmd_sn) = match slot.and_then(|s| self.tasks.get_mut(s)) {
            Some(t) => {
                t.aborting = true;
                (t.itt, t.cmd_sn)
            }
            None => (RESERVED_TAG, 0),
        };
        let pdu = Pdu::TmfReq(TmfReq {
            immediate: true,
            function,
            lun: self.lun,
            itt: TMF_ITT,
            ref_itt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        });
        self.push_pdu(&pdu, OutData::None);
        self.tmf = Some(Tmf {
            function,
            slot,
            deadline: now + self.t.tmf_timeout,
        });
    }

    /// Run the timers. An error means the connection must be replaced.
    pub fn tick(&mut self, now: Instant) -> Result<(), SessionError> {
        if let Some((_, sent)) = self.ping {
            if now.duration_since(sent) > self.t.nop_timeout {
                return Err(SessionError::Timeout("NOP-Out ping not answered"));
            }
        } else if now.duration_since(self.last_rx) > self.t.nop_interval {
            self.ping_seq = self.ping_seq.wrapping_add(1);
            let itt = PING_BIT | (self.ping_seq & 0x3fff_ffff);
            let pdu = Pdu::NopOut(Nop {
                immediate: true,
                lun: [0; 8],
                itt,
                ttt: RESERVED_TAG,
                sn: Sn {
                    stat_sn: self.exp_stat_sn,
                    exp_cmd_sn: self.cmd_sn,
                    max_cmd_sn: 0,
                },
            });
            self.push_pdu(&pdu, OutData::None);
            self.ping = Some((itt, now));
        }
        if let Some(t) = &self.tmf {
            if now > t.deadline {
                if t.function == tmf::LUN_RESET {
                    return Err(SessionError::Timeout("LUN reset not answered"));
                }
                tracing::warn!("ABORT TASK not answered; resetting the logical unit");
                self.start_tmf(tmf::LUN_RESET, None, now);
            }
            return Ok(());
        }
        let mut expired_waiting = Vec::new();
        let mut to_abort = None;
        for (slot, t) in self.tasks.iter() {
            if t.done.is_none() && !t.aborting && now.duration_since(t.started) > self.t.cmd_timeout
            {
                if t.sent {
                    to_abort.get_or_insert(slot);
                } else {
                    expired_waiting.push(slot);
                }
            }
        }
        for slot in expired_waiting {
            self.finish(slot, Outcome::TimedOut);
        }
        if let Some(slot) = to_abort {
            tracing::warn!(itt = itt_of(slot), "command timed out; aborting it");
            self.start_tmf(tmf::ABORT_TASK, Some(slot), now);
        }
        Ok(())
    }

    /// Ask for a logout (closing the session). The target's answer ends the connection.
    pub fn logout(&mut self) {
        let pdu = Pdu::LogoutReq(pdu::LogoutReq {
            immediate: true,
            reason: 0,
            itt: TMF_ITT | 1,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        self.push_pdu(&pdu, OutData::None);
    }
}

#[cfg(test)]
mod tests;
