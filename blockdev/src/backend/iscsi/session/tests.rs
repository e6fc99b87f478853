//! The session against a scripted target (a fake allowed inside this module's tests):
//! the paths the captured tgtd sessions do not take — timeouts and their escalation,
//! target pings, the CmdSN window, and hostile PDUs.

use super::*;
use crate::backend::iscsi::pdu::{
    encode_frame, AsyncMsg, DataIn, Frame, R2t, Reject, ScsiResp, TmfResp,
};
use crate::backend::iscsi::text::{Negotiated, Offer};
use crate::buf::IoBuf;

const T: Timeouts = Timeouts {
    nop_interval: Duration::from_secs(5),
    nop_timeout: Duration::from_secs(5),
    cmd_timeout: Duration::from_secs(30),
    tmf_timeout: Duration::from_secs(10),
};

fn params() -> Negotiated {
    let mut p = Negotiated::defaults(&Offer::default());
    p.max_send_data_segment = 4096;
    p.first_burst = 8192;
    p.max_burst = 65536;
    p
}

fn session(p: Negotiated, now: Instant) -> Session {
    Session::new(p, T, [0, 1, 0, 0, 0, 0, 0, 0], start(40), now)
}

fn start(max_cmd_sn: u32) -> StartSn {
    StartSn {
        cmd_sn: 10,
        exp_stat_sn: 1,
        exp_cmd_sn: 10,
        max_cmd_sn,
    }
}

fn sn(max: u32) -> Sn {
    Sn {
        stat_sn: 1,
        exp_cmd_sn: 10,
        max_cmd_sn: max,
    }
}

/// Everything the session wants to send, as PDUs with their data.
fn sent(s: &mut Session) -> Vec<(Pdu, Vec<u8>)> {
    let mut iovs = Vec::new();
    s.iovecs(&mut iovs, 4096);
    let mut bytes = Vec::new();
    for v in &iovs {
        // SAFETY: the iovecs point into `s` and its commands, untouched until `advance`.
        bytes.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
    }
    s.advance(bytes.len());
    let cfg = pdu::FrameCfg {
        header_digest: s.params().header_digest,
        data_digest: s.params().data_digest,
        max_data: pdu::MAX_DSL,
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let f: Frame = pdu::decode_frame(&bytes[pos..], &cfg)
            .expect("valid PDU")
            .expect("whole PDU");
        out.push((f.pdu, bytes[pos + f.data.start..pos + f.data.end].to_vec()));
        pos += f.len;
    }
    out
}

fn feed(s: &mut Session, p: Pdu, data: &[u8], now: Instant) -> Result<usize, SessionError> {
    let mut b = Vec::new();
    encode_frame(&p, data, &s.rx_cfg(), &mut b);
    s.input(&b, now)
}

fn read(len: u32, cookie: u64) -> Command {
    Command {
        cdb: Cdb::read16(0, len / 512),
        dir: Dir::Read,
        len,
        buf: Buffer::Owned(IoBuf::new(len as usize)),
        cookie,
    }
}

fn write(data: &[u8], cookie: u64) -> Command {
    Command {
        cdb: Cdb::write16(0, data.len() as u32 / 512, false),
        dir: Dir::Write,
        len: data.len() as u32,
        buf: Buffer::Owned(IoBuf::from_slice(data)),
        cookie,
    }
}

fn tur(cookie: u64) -> Command {
    Command {
        cdb: Cdb::test_unit_ready(),
        dir: Dir::None,
        len: 0,
        buf: Buffer::None,
        cookie,
    }
}

fn itt_of(p: &Pdu) -> u32 {
    match p {
        Pdu::ScsiCmd(c) => c.itt,
        other => panic!("not a command: {other:?}"),
    }
}

fn good(itt: u32, stat: u32) -> Pdu {
    Pdu::ScsiResp(ScsiResp {
        flags: 0,
        response: 0,
        status: 0,
        itt,
        sn: Sn {
            stat_sn: stat,
            exp_cmd_sn: 11,
            max_cmd_sn: 50,
        },
        exp_data_sn: 0,
        residual: 0,
    })
}

#[test]
fn write_sends_immediate_unsolicited_and_r2t_data() {
    let now = Instant::now();
    let mut p = params();
    p.initial_r2t = false;
    let mut s = session(p, now);
    let data: Vec<u8> = (0..20480u32).map(|i| (i % 253) as u8).collect();
    s.submit(write(&data, 7), now).unwrap();
    let out = sent(&mut s);
    // Command with 4 KiB immediate, then one unsolicited Data-Out up to FirstBurstLength.
    assert_eq!(out.len(), 2);
    let Pdu::ScsiCmd(c) = out[0].0 else { panic!() };
    assert!(!c.fin && c.write && c.edtl == 20480);
    assert_eq!(out[0].1, data[..4096]);
    let Pdu::DataOut(d) = out[1].0 else { panic!() };
    assert!(d.fin && d.ttt == RESERVED_TAG && d.offset == 4096);
    assert_eq!(out[1].1, data[4096..8192]);
    // The target asks for the rest: three PDUs of at most 4 KiB, DataSN from 0.
    let r2t = Pdu::R2t(R2t {
        lun: c.lun,
        itt: c.itt,
        ttt: 0x77,
        sn: sn(40),
        r2t_sn: 0,
        offset: 8192,
        len: 12288,
    });
    feed(&mut s, r2t, &[], now).unwrap();
    let out = sent(&mut s);
    assert_eq!(out.len(), 3);
    for (i, (p, d)) in out.iter().enumerate() {
        let Pdu::DataOut(h) = p else { panic!() };
        assert_eq!(
            (h.ttt, h.data_sn, h.offset),
            (0x77, i as u32, 8192 + 4096 * i as u32)
        );
        assert_eq!(h.fin, i == 2);
        assert_eq!(&d[..], &data[8192 + 4096 * i..12288 + 4096 * i]);
    }
    feed(&mut s, good(c.itt, 1), &[], now).unwrap();
    let f = s.take_finished();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].cmd.cookie, 7);
    assert_eq!(s.live(), 0);
}

#[test]
fn data_in_lands_in_the_buffer_and_bad_data_in_is_a_protocol_error() {
    let now = Instant::now();
    let mut s = session(params(), now);
    s.submit(read(8192, 1), now).unwrap();
    let itt = itt_of(&sent(&mut s)[0].0);
    let din = |data_sn, offset, status: bool| {
        Pdu::DataIn(DataIn {
            fin: status,
            ack: false,
            flags: u8::from(status),
            status: 0,
            lun: [0; 8],
            itt,
            ttt: RESERVED_TAG,
            sn: sn(40),
            data_sn,
            offset,
            residual: 0,
        })
    };
    feed(&mut s, din(0, 0, false), &[1u8; 4096], now).unwrap();
    feed(&mut s, din(1, 4096, true), &[2u8; 4096], now).unwrap();
    let f = s.take_finished();
    let Buffer::Owned(b) = &f[0].cmd.buf else {
        panic!()
    };
    assert!(b.as_slice()[..4096].iter().all(|&x| x == 1));
    assert!(b.as_slice()[4096..].iter().all(|&x| x == 2));

    // Out of order, past the buffer, for an unknown task, or short of the length.
    for (data_sn, offset, len, status) in
        [(1, 0, 512, false), (0, 8000, 512, false), (0, 0, 512, true)]
    {
        let mut s = session(params(), now);
        s.submit(read(8192, 1), now).unwrap();
        let itt = itt_of(&sent(&mut s)[0].0);
        let p = Pdu::DataIn(DataIn {
            fin: status,
            ack: false,
            flags: u8::from(status),
            status: 0,
            lun: [0; 8],
            itt,
            ttt: RESERVED_TAG,
            sn: sn(40),
            data_sn,
            offset,
            residual: 0,
        });
        let e = feed(&mut s, p, &vec![0u8; len], now);
        assert!(matches!(e, Err(SessionError::Protocol(_))), "{e:?}");
    }
    let mut s = session(params(), now);
    let e = feed(&mut s, din(0, 0, false), &[0u8; 512], now);
    assert!(matches!(e, Err(SessionError::Protocol(_))), "{e:?}");
}

#[test]
fn hostile_pdus_are_errors() {
    let now = Instant::now();
    let mut s = session(params(), now);
    s.submit(read(4096, 1), now).unwrap();
    let c = sent(&mut s);
    let itt = itt_of(&c[0].0);
    // An R2T for a read, or past the end of a write.
    let r2t = Pdu::R2t(R2t {
        lun: [0; 8],
        itt,
        ttt: 1,
        sn: sn(40),
        r2t_sn: 0,
        offset: 0,
        len: 512,
    });
    assert!(matches!(
        feed(&mut s, r2t, &[], now),
        Err(SessionError::Protocol(_))
    ));
    // An initiator opcode from the target.
    let mut s = session(params(), now);
    let bad = Pdu::ScsiCmd(ScsiCmd {
        immediate: false,
        fin: true,
        read: true,
        write: false,
        attr: 1,
        lun: [0; 8],
        itt: 1,
        edtl: 0,
        cmd_sn: 0,
        exp_stat_sn: 0,
        cdb: [0; 16],
    });
    assert!(matches!(
        feed(&mut s, bad, &[], now),
        Err(SessionError::Pdu(PduError::BadOpcode(1)))
    ));
    // A data segment above what we declared.
    let big = vec![0u8; params().max_recv_data_segment as usize + 4];
    assert!(matches!(
        feed(&mut s, good(1, 1), &big, now),
        Err(SessionError::Pdu(PduError::BadLength { .. }))
    ));
    // A reject of something that is not a command of ours.
    let rej = Pdu::Reject(Reject {
        reason: 9,
        sn: sn(40),
        data_sn: 0,
    });
    assert!(feed(&mut s, rej, &[0u8; 48], now).is_err());
}

#[test]
fn cmdsn_window_holds_commands_until_it_opens() {
    let now = Instant::now();
    let mut s = Session::new(params(), T, [0; 8], start(11), now);
    for i in 0..4 {
        s.submit(read(512, i), now).unwrap();
    }
    // CmdSN 10 and 11 fit under MaxCmdSN 11.
    assert_eq!(sent(&mut s).len(), 2);
    // A stale or inconsistent window update is ignored (MaxCmdSN < ExpCmdSN - 1).
    let nop = |exp, max| {
        Pdu::NopIn(Nop {
            immediate: false,
            lun: [0; 8],
            itt: RESERVED_TAG,
            ttt: RESERVED_TAG,
            sn: Sn {
                stat_sn: 1,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
            },
        })
    };
    feed(&mut s, nop(20, 12), &[], now).unwrap();
    assert!(sent(&mut s).is_empty());
    feed(&mut s, nop(11, 13), &[], now).unwrap();
    let out = sent(&mut s);
    assert_eq!(out.len(), 2);
    let Pdu::ScsiCmd(c) = out[1].0 else { panic!() };
    assert_eq!(c.cmd_sn, 13);
}

#[test]
fn target_pings_are_answered_and_our_pings_time_out() {
    let t0 = Instant::now();
    let mut s = session(params(), t0);
    let ping = Pdu::NopIn(Nop {
        immediate: false,
        lun: [0, 1, 0, 0, 0, 0, 0, 0],
        itt: RESERVED_TAG,
        ttt: 0x1234,
        sn: sn(40),
    });
    feed(&mut s, ping, &[], t0).unwrap();
    let out = sent(&mut s);
    let Pdu::NopOut(n) = out[0].0 else {
        panic!("{out:?}")
    };
    assert!(n.immediate && n.itt == RESERVED_TAG && n.ttt == 0x1234);
    // Silence: a ping after nop_interval, the connection dead after nop_timeout.
    s.tick(t0 + Duration::from_secs(6)).unwrap();
    let out = sent(&mut s);
    let Pdu::NopOut(ours) = out[0].0 else {
        panic!("{out:?}")
    };
    assert_ne!(ours.itt, RESERVED_TAG);
    s.tick(t0 + Duration::from_secs(8)).unwrap();
    assert_eq!(
        s.tick(t0 + Duration::from_secs(12)),
        Err(SessionError::Timeout("NOP-Out ping not answered"))
    );
    // Answered in time, it is forgotten.
    let mut s = session(params(), t0);
    s.tick(t0 + Duration::from_secs(6)).unwrap();
    let Pdu::NopOut(ours) = sent(&mut s)[0].0 else {
        panic!()
    };
    let pong = Pdu::NopIn(Nop {
        immediate: false,
        lun: [0; 8],
        itt: ours.itt,
        ttt: RESERVED_TAG,
        sn: sn(40),
    });
    feed(&mut s, pong, &[], t0 + Duration::from_secs(7)).unwrap();
    s.tick(t0 + Duration::from_secs(11)).unwrap();
}

#[test]
fn timeouts_escalate_abort_then_lun_reset_then_connection() {
    let t0 = Instant::now();
    let mut s = session(params(), t0);
    s.submit(read(512, 1), t0).unwrap();
    s.submit(read(512, 2), t0).unwrap();
    let c = sent(&mut s);
    let (a, _b) = (itt_of(&c[0].0), itt_of(&c[1].0));
    let keep = |s: &mut Session, t| {
        // Keep the connection looking alive so only the command timers matter.
        s.last_rx = t;
        s.tick(t)
    };
    // After cmd_timeout: ABORT TASK for the first.
    keep(&mut s, t0 + Duration::from_secs(31)).unwrap();
    let out = sent(&mut s);
    let Pdu::TmfReq(m) = out[0].0 else {
        panic!("{out:?}")
    };
    assert_eq!((m.function, m.ref_itt), (tmf::ABORT_TASK, a));
    // Unanswered: LOGICAL UNIT RESET.
    keep(&mut s, t0 + Duration::from_secs(42)).unwrap();
    let out = sent(&mut s);
    let Pdu::TmfReq(r) = out[0].0 else {
        panic!("{out:?}")
    };
    assert_eq!(r.function, tmf::LUN_RESET);
    // Answered: both commands come back as timed out (to be retried by the driver).
    let done = Pdu::TmfResp(TmfResp {
        response: tmf::COMPLETE,
        itt: r.itt,
        sn: sn(40),
    });
    feed(&mut s, done, &[], t0 + Duration::from_secs(43)).unwrap();
    let f = s.take_finished();
    assert_eq!(f.len(), 2);
    assert!(f.iter().all(|f| f.outcome == Outcome::TimedOut));
    // An unanswered LUN reset ends the connection.
    let mut s = session(params(), t0);
    s.submit(read(512, 1), t0).unwrap();
    sent(&mut s);
    keep(&mut s, t0 + Duration::from_secs(31)).unwrap();
    keep(&mut s, t0 + Duration::from_secs(42)).unwrap();
    assert_eq!(
        keep(&mut s, t0 + Duration::from_secs(53)),
        Err(SessionError::Timeout("LUN reset not answered"))
    );
    // Commands still held come back for replay, in CmdSN order.
    let cmds = s.take_commands();
    assert_eq!(cmds.len(), 1);
}

#[test]
fn abort_success_finishes_the_command_and_sense_is_decoded() {
    let t0 = Instant::now();
    let mut s = session(params(), t0);
    s.submit(read(512, 1), t0).unwrap();
    s.submit(read(512, 2), t0).unwrap();
    let c = sent(&mut s);
    let b = itt_of(&c[1].0);
    s.last_rx = t0 + Duration::from_secs(31);
    s.tick(t0 + Duration::from_secs(31)).unwrap();
    let Pdu::TmfReq(m) = sent(&mut s)[0].0 else {
        panic!()
    };
    let resp = Pdu::TmfResp(TmfResp {
        response: tmf::NO_TASK,
        itt: m.itt,
        sn: sn(40),
    });
    feed(&mut s, resp, &[], t0 + Duration::from_secs(32)).unwrap();
    let f = s.take_finished();
    assert_eq!((f.len(), f[0].outcome), (1, Outcome::TimedOut));
    // CHECK CONDITION with CAPACITY DATA HAS CHANGED sense.
    let mut sense = vec![
        0u8, 18, 0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2a, 0x09, 0, 0, 0, 0,
    ];
    sense.truncate(20);
    let r = Pdu::ScsiResp(ScsiResp {
        flags: 0,
        response: 0,
        status: 2,
        itt: b,
        sn: sn(40),
        exp_data_sn: 0,
        residual: 0,
    });
    feed(&mut s, r, &sense, t0 + Duration::from_secs(33)).unwrap();
    let f = s.take_finished();
    let Outcome::Status {
        sense: Some(se),
        status: 2,
        ..
    } = f[0].outcome
    else {
        panic!("{:?}", f[0].outcome)
    };
    assert_eq!(se.code(), crate::backend::scsi::asc::CAPACITY_CHANGED);
    // Asynchronous events: sense, and a request to log out.
    let ev = Pdu::Async(AsyncMsg {
        lun: [0; 8],
        sn: sn(40),
        event: 0,
        vcode: 0,
        param1: 0,
        param2: 0,
        param3: 0,
    });
    feed(&mut s, ev, &sense, t0).unwrap();
    let bye = Pdu::Async(AsyncMsg {
        lun: [0; 8],
        sn: sn(40),
        event: 1,
        vcode: 0,
        param1: 0,
        param2: 0,
        param3: 3,
    });
    feed(&mut s, bye, &[], t0).unwrap();
    let ev = s.take_events();
    assert!(matches!(ev[0], Event::Sense(se) if se.code() == 0x2a09));
    assert_eq!(
        ev[1],
        Event::Reconnect {
            event: 1,
            wait_s: 3
        }
    );
}

#[test]
fn stale_tags_are_not_taken_for_new_commands() {
    let now = Instant::now();
    let mut s = session(params(), now);
    s.submit(tur(1), now).unwrap();
    let first = itt_of(&sent(&mut s)[0].0);
    feed(&mut s, good(first, 1), &[], now).unwrap();
    assert_eq!(s.take_finished().len(), 1);
    // The slot is reused with a new generation: the old tag's response is ignored.
    s.submit(tur(2), now).unwrap();
    let second = itt_of(&sent(&mut s)[0].0);
    assert_ne!(first, second);
    feed(&mut s, good(first, 2), &[], now).unwrap();
    assert!(s.take_finished().is_empty());
    feed(&mut s, good(second, 3), &[], now).unwrap();
    assert_eq!(s.take_finished()[0].cmd.cookie, 2);
}

#[test]
fn the_task_table_is_bounded_and_forged_itts_find_nothing() {
    let now = Instant::now();
    // A closed window: every command waits in the table.
    let mut s = Session::new(params(), Timeouts::default(), [0; 8], start(9), now);
    for i in 0..super::MAX_TASKS as u64 {
        s.submit(tur(i), now).expect("room");
    }
    let back = s.submit(tur(u64::MAX), now).expect_err("full");
    assert_eq!(
        back.cookie,
        u64::MAX,
        "a full session hands the command back"
    );
    assert_eq!(s.live(), super::MAX_TASKS);
    // ITTs of slots that are vacant, of the ping space, or with another generation:
    // no task, so a response is ignored and a Data-In is a protocol error.
    let mut s = session(params(), now);
    s.submit(tur(1), now).unwrap();
    let itt = itt_of(&sent(&mut s)[0].0);
    for forged in [itt ^ (1 << 16), itt + 1, itt | (1 << 31), 0x7fff_ffff] {
        feed(&mut s, good(forged, 1), &[], now).unwrap();
        assert!(s.take_finished().is_empty(), "{forged:#x}");
    }
    // The connection dies: the command comes back for replay and the table is empty.
    let cmds = s.take_commands();
    assert_eq!((cmds.len(), s.live()), (1, 0));
    feed(&mut s, good(itt, 2), &[], now).unwrap();
    assert!(s.take_finished().is_empty());
}
