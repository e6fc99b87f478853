//! The iSCSI initiator's input side, fed what a hostile target could send: the PDU frame
//! decoder (with and without digests), the login state machine, and a full-feature
//! session with a read and a write in flight. Any bytes give PDUs or errors, never a
//! panic; a decoded PDU survives an encode/decode round trip.
//!
//! The first byte picks the digest setting; the rest is the target's byte stream.
#![no_main]

use ember_blockdev::backend::iscsi::login::{Login, LoginConfig};
use ember_blockdev::backend::iscsi::pdu::{self, FrameCfg, Pdu};
use ember_blockdev::backend::iscsi::session::{Command, Dir, Session, StartSn, Timeouts};
use ember_blockdev::backend::iscsi::text::{Negotiated, Offer};
use ember_blockdev::backend::scsi::Cdb;
use ember_blockdev::{Buffer, IoBuf};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let digests = mode & 1 != 0;
    let cfg = FrameCfg {
        header_digest: digests,
        data_digest: digests,
        max_data: 256 << 10,
    };
    // 1. The frame decoder alone.
    let mut pos = 0;
    while let Ok(Some(f)) = pdu::decode_frame(&stream[pos..], &cfg) {
        // Reserved bytes are not kept, so the typed PDU (not the raw header) must survive
        // an encode/decode round trip.
        let again = f.pdu.to_bhs(pdu::ahs_words(&f.bhs), pdu::data_len(&f.bhs));
        assert_eq!(Pdu::parse(&again), Ok(f.pdu));
        assert!(f.data.end <= f.len && f.len <= stream.len() - pos);
        pos += f.len;
    }
    // 2. The login machine on every login response in the stream.
    let plain = FrameCfg {
        header_digest: false,
        data_digest: false,
        max_data: 64 << 10,
    };
    let lcfg = LoginConfig {
        initiator_name: "iqn.2026-01.org.ember:fuzz".into(),
        target_name: "iqn.2026-01.test:t1".into(),
        isid: [0x80, 0, 0, 0, 0, 1],
        chap: None,
        offer: Offer::default(),
    };
    let (mut login, _) = Login::new(lcfg, 1);
    let mut pos = 0;
    while let Ok(Some(f)) = pdu::decode_frame(&stream[pos..], &plain) {
        if let Pdu::LoginResp(r) = f.pdu {
            if login.on_response(&r, &stream[pos + f.data.start..pos + f.data.end]).is_err() {
                break;
            }
        }
        pos += f.len;
    }
    // 3. A session with commands in flight, given the whole stream.
    let mut p = Negotiated::defaults(&Offer::default());
    p.header_digest = digests;
    p.data_digest = digests;
    let now = Instant::now();
    let start = StartSn {
        cmd_sn: 1,
        exp_stat_sn: 1,
        exp_cmd_sn: 1,
        max_cmd_sn: 64,
    };
    let mut s = Session::new(p, Timeouts::default(), [0, 1, 0, 0, 0, 0, 0, 0], start, now);
    let _ = s.submit(
        Command {
            cdb: Cdb::read16(0, 16),
            dir: Dir::Read,
            len: 8192,
            buf: Buffer::Owned(IoBuf::new(8192)),
            cookie: 1,
        },
        now,
    );
    let _ = s.submit(
        Command {
            cdb: Cdb::write16(0, 64, false),
            dir: Dir::Write,
            len: 32768,
            buf: Buffer::Owned(IoBuf::new(32768)),
            cookie: 2,
        },
        now,
    );
    let mut iovs = Vec::new();
    s.iovecs(&mut iovs, 1024);
    let n: usize = iovs.iter().map(|v| v.iov_len).sum();
    s.advance(n);
    let _ = s.input(stream, now);
    let _ = s.tick(now);
    let _ = s.take_finished();
    let _ = s.take_commands();
});
