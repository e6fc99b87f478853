//! The NBD transmission stream's framing and request decisions (`request::Framer`,
//! `request::decide`), fed from bytes. The first input byte picks the session
//! (structured replies, `base:allocation`, read-only) and how the rest is cut into
//! pieces; the rest is the client's byte stream after the handshake.
//!
//! Checked: no panic; the events do not depend on how the stream is cut (fed whole, in
//! the chosen pieces, and byte by byte for short inputs); a read or write is only ever
//! accepted within the export, the maximum block size, and for writes a writable export;
//! only refused writes carry a payload to skip. Seeds: the client side of real
//! conversations after the handshake (qemu-io, nbdinfo, nbdcopy, fio), captured through
//! a proxy.
#![no_main]

use ember_blockdev::DeviceInfo;
use ember_daemon::nbd::proto::cmd;
use ember_daemon::nbd::request::{merge_data, Action, Event, Framer, Session};
use libfuzzer_sys::fuzz_target;

fn info() -> DeviceInfo {
    DeviceInfo::new(64 << 20, 32 << 20)
}

fn run(s: Session, bytes: &[u8], cuts: impl Iterator<Item = usize>) -> Vec<Event> {
    let mut f = Framer::new(s, info());
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts.chain(std::iter::once(bytes.len())) {
        let c = c.clamp(at, bytes.len());
        if f.feed(&bytes[at..c], &mut out).is_err() {
            break;
        }
        at = c;
    }
    merge_data(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else {
        return;
    };
    let s = Session {
        max_block: 32 << 20,
        read_only: ctl & 1 != 0,
        structured: ctl & 2 != 0,
        meta: ctl & 4 != 0,
    };
    let step = usize::from(ctl >> 3) + 1;
    let whole = run(s, bytes, std::iter::empty());
    let pieces = run(s, bytes, (1..).map(|k| k * step).take_while(|&c| c < bytes.len()));
    assert_eq!(whole, pieces);
    if bytes.len() <= 512 {
        assert_eq!(whole, run(s, bytes, 1..bytes.len()));
    }
    let i = info();
    for e in &whole {
        let Event::Request(h, a) = e else { continue };
        let end = h.offset.checked_add(u64::from(h.len));
        match a {
            Action::Read | Action::Write { .. } => {
                assert!(h.len > 0 && h.len <= s.max_block);
                assert!(end.is_some_and(|e| e <= i.size));
                assert_eq!(h.offset % 512, 0);
                assert_eq!(h.len % 512, 0);
            }
            Action::Trim | Action::WriteZeroes { .. } | Action::BlockStatus => {
                assert!(end.is_some_and(|e| e <= i.size));
            }
            Action::Reply { skip, .. } if *skip > 0 => assert_eq!(h.cmd, cmd::WRITE),
            _ => {}
        }
        if s.read_only {
            assert!(!matches!(
                a,
                Action::Write { .. } | Action::Trim | Action::WriteZeroes { .. }
            ));
        }
    }
});
