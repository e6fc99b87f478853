//! What to do with a transmission request, decided from its header alone; and the
//! stream's framing. Pure: no I/O, no allocation beyond the output.
//!
//! [`decide`] is what a connection ([`super::conn`]) runs on every header it receives: it
//! checks flags, the read-only bit, the maximum block size and the range against the
//! export *before* anything is allocated, and says whether a payload follows and whether
//! it must be discarded. [`Framer`] applies the same rules to a byte stream cut anywhere
//! (headers, payloads and discarded payloads); the fuzz targets and the property tests
//! drive it, and the property tests check the server's replies against it.

use super::proto::{self, cmd, cmd_flag, err, ProtoError, RequestHeader};
use ember_blockdev::DeviceInfo;

/// What a connection negotiated and serves (with the export's [`DeviceInfo`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Largest read or write accepted.
    pub max_block: u32,
    /// Writes, trims and write-zeroes are refused.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub meta: bool,
}

/// The decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read `len` (> 0) bytes.
    Read,
    /// Receive the `len`-byte payload (> 0), then write it.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Flush.
    Flush,
    /// Discard the range.
    Trim,
    /// Zero the range, deallocating if `unmap`.
    WriteZeroes {
        /// Holes allowed.
        unmap: bool,
    },
    /// Answer with the allocation map of the range.
    BlockStatus,
    /// `NBD_CMD_DISC`: finish in-flight requests, then close. No reply.
    Disconnect,
    /// Discard `skip` payload bytes, then reply at once with `error` (0: success).
    Reply {
        /// NBD error, 0 for success.
        error: u32,
        /// Payload bytes that follow the header and must be discarded.
        skip: u32,
    },
}

impl Action {
    /// Payload bytes that follow the header on the wire.
    pub fn payload(&self, h: &RequestHeader) -> u32 {
        match self {
            Action::Write { .. } => h.len,
            Action::Reply { skip, .. } => *skip,
            _ => 0,
        }
    }

    /// Whether a reply is sent.
    pub fn replies(&self) -> bool {
        !matches!(self, Action::Disconnect)
    }
}

/// Flag, read-only, size and range checks shared by the data commands.
fn check(h: &RequestHeader, s: &Session, info: &DeviceInfo, write: bool) -> Result<(), u32> {
    if h.flags & !cmd_flag::KNOWN != 0 {
        return Err(err::EINVAL);
    }
    if write && s.read_only {
        return Err(err::EPERM);
    }
    if matches!(h.cmd, cmd::READ | cmd::WRITE) && h.len > s.max_block {
        return Err(err::EOVERFLOW);
    }
    info.check_range(h.offset, u64::from(h.len))
        .map_err(proto::nbd_error)
}

/// Decide what to do with `h`.
pub fn decide(h: &RequestHeader, s: &Session, info: &DeviceInfo) -> Action {
    let reply = |error| Action::Reply { error, skip: 0 };
    match h.cmd {
        cmd::READ => match check(h, s, info, false) {
            Err(e) => reply(e),
            Ok(()) if h.len == 0 => reply(0),
            Ok(()) => Action::Read,
        },
        cmd::WRITE => match check(h, s, info, true) {
            // The payload is on its way anyway: skip it to stay in sync, then answer.
            Err(e) => Action::Reply {
                error: e,
                skip: h.len,
            },
            Ok(()) if h.len == 0 => reply(0),
            Ok(()) => Action::Write {
                fua: h.flags & cmd_flag::FUA != 0,
            },
        },
        cmd::DISC => Action::Disconnect,
        cmd::FLUSH if h.flags & !cmd_flag::KNOWN != 0 => reply(err::EINVAL),
        cmd::FLUSH => Action::Flush,
        cmd::TRIM => match check(h, s, info, true) {
            Err(e) => reply(e),
            Ok(()) if !info.discard => reply(err::ENOTSUP),
            Ok(()) => Action::Trim,
        },
        cmd::WRITE_ZEROES => {
            if let Err(e) = check(h, s, info, true) {
                return reply(e);
            }
            let may_unmap = h.flags & cmd_flag::NO_HOLE == 0;
            // Fast only if it needs no data writes: punching a hole does not; zeroing a
            // range may fall back to writing zeros (tmpfs), so refuse that.
            if h.flags & cmd_flag::FAST_ZERO != 0 && !(may_unmap && info.discard) {
                return reply(err::ENOTSUP);
            }
            Action::WriteZeroes {
                unmap: may_unmap && info.discard,
            }
        }
        cmd::CACHE => reply(check(h, s, info, false).err().unwrap_or(0)),
        cmd::BLOCK_STATUS => {
            let end = h.offset.checked_add(u64::from(h.len));
            if !s.structured
                || !s.meta
                || h.flags & !cmd_flag::KNOWN != 0
                || h.len == 0
                || end.is_none_or(|e| e > info.size)
            {
                reply(err::EINVAL)
            } else {
                Action::BlockStatus
            }
        }
        _ => reply(err::EINVAL),
    }
}

/// One framing event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete header and its decision. A `Write`'s payload follows as [`Event::Data`].
    Request(RequestHeader, Action),
    /// Payload bytes of the last `Write` (in pieces, as they arrive).
    Data(usize),
    /// The payload of the last request is complete (or skipped): it can be carried out.
    Ready,
}

/// `events` with each run of [`Event::Data`] pieces merged into one, so that one stream
/// framed from differently cut reads compares equal (the property tests and the
/// `nbd_transmission` fuzz target check exactly that).
pub fn merge_data(events: Vec<Event>) -> Vec<Event> {
    let mut merged: Vec<Event> = Vec::new();
    for e in events {
        match (merged.last_mut(), &e) {
            (Some(Event::Data(a)), Event::Data(b)) => *a += b,
            _ => merged.push(e),
        }
    }
    merged
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A header (this many bytes of it buffered).
    Header,
    /// Payload bytes of a write.
    Payload(u32),
    /// Payload bytes to discard.
    Skip(u32),
}

/// The transmission stream, framed: headers, payloads and discarded payloads, from bytes
/// that may be cut anywhere. Holds at most one header's bytes.
#[derive(Debug, Clone)]
pub struct Framer {
    session: Session,
    info: DeviceInfo,
    want: Want,
    head: [u8; proto::REQUEST_HEADER_BYTES],
    have: usize,
    closed: bool,
}

impl Framer {
    /// A framer for a connection.
    pub fn new(session: Session, info: DeviceInfo) -> Framer {
        Framer {
            session,
            info,
            want: Want::Header,
            head: [0; proto::REQUEST_HEADER_BYTES],
            have: 0,
            closed: false,
        }
    }

    /// True when the stream is between requests (nothing partial buffered).
    pub fn at_boundary(&self) -> bool {
        self.want == Want::Header && self.have == 0
    }

    /// Feed bytes; events go to `out`. A bad magic is an error and ends the stream (the
    /// server closes the connection); so does anything after `NBD_CMD_DISC`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<Event>) -> Result<(), ProtoError> {
        while !data.is_empty() && !self.closed {
            match self.want {
                Want::Payload(left) | Want::Skip(left) => {
                    let n = data.len().min(left as usize);
                    // n ≤ left, a u32.
                    let rest = left - n as u32;
                    if let Want::Payload(_) = self.want {
                        out.push(Event::Data(n));
                        self.want = Want::Payload(rest);
                    } else {
                        self.want = Want::Skip(rest);
                    }
                    data = &data[n..];
                    if rest == 0 {
                        self.want = Want::Header;
                        out.push(Event::Ready);
                    }
                }
                Want::Header => {
                    let n = data.len().min(self.head.len() - self.have);
                    self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
                    self.have += n;
                    data = &data[n..];
                    if self.have < self.head.len() {
                        break;
                    }
                    self.have = 0;
                    let h = RequestHeader::decode(&self.head)?;
                    let a = decide(&h, &self.session, &self.info);
                    out.push(Event::Request(h, a));
                    match a {
                        Action::Write { .. } => self.want = Want::Payload(h.len),
                        Action::Reply { skip, .. } if skip > 0 => self.want = Want::Skip(skip),
                        Action::Disconnect => {
                            out.push(Event::Ready);
                            self.closed = true;
                        }
                        _ => out.push(Event::Ready),
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::testgen::Rng;

    pub(crate) fn info() -> DeviceInfo {
        DeviceInfo::new(1 << 20, 1 << 20)
    }

    fn session() -> Session {
        Session {
            max_block: 1 << 20,
            read_only: false,
            structured: true,
            meta: true,
        }
    }

    fn h(cmd: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            cmd,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn decisions() {
        let (s, i) = (session(), info());
        let d = |x| decide(&x, &s, &i);
        assert_eq!(d(h(cmd::READ, 0, 0, 4096)), Action::Read);
        assert_eq!(
            d(h(cmd::READ, 0, 0, 0)),
            Action::Reply { error: 0, skip: 0 }
        );
        assert_eq!(
            d(h(cmd::READ, 0, 1 << 20, 512)),
            Action::Reply {
                error: err::EINVAL,
                skip: 0
            }
        );
        assert_eq!(
            d(h(cmd::READ, 0, 0, 2 << 20)),
            Action::Reply {
                error: err::EOVERFLOW,
                skip: 0
            }
        );
        assert_eq!(
            d(h(cmd::WRITE, cmd_flag::FUA, 0, 512)),
            Action::Write { fua: true }
        );
        assert_eq!(
            d(h(cmd::WRITE, 0, 7, 512)),
            Action::Reply {
                error: err::EINVAL,
                skip: 512
            }
        );
        assert_eq!(
            d(h(cmd::WRITE, 0, 0, u32::MAX)),
            Action::Reply {
                error: err::EOVERFLOW,
                skip: u32::MAX
            }
        );
        assert_eq!(d(h(cmd::DISC, 0, 0, 0)), Action::Disconnect);
        assert_eq!(d(h(cmd::FLUSH, 0, 0, 0)), Action::Flush);
        assert_eq!(d(h(cmd::TRIM, 0, 0, 512)), Action::Trim);
        assert_eq!(
            d(h(cmd::WRITE_ZEROES, cmd_flag::NO_HOLE, 0, 512)),
            Action::WriteZeroes { unmap: false }
        );
        assert_eq!(
            d(h(cmd::CACHE, 0, 0, 512)),
            Action::Reply { error: 0, skip: 0 }
        );
        assert_eq!(d(h(cmd::BLOCK_STATUS, 0, 0, 512)), Action::BlockStatus);
        assert_eq!(
            d(h(cmd::BLOCK_STATUS, 0, u64::MAX, 512)),
            Action::Reply {
                error: err::EINVAL,
                skip: 0
            }
        );
        assert_eq!(
            d(h(99, 0, 0, 512)),
            Action::Reply {
                error: err::EINVAL,
                skip: 0
            }
        );
        let ro = Session {
            read_only: true,
            ..s
        };
        assert_eq!(
            decide(&h(cmd::TRIM, 0, 0, 512), &ro, &i),
            Action::Reply {
                error: err::EPERM,
                skip: 0
            }
        );
    }

    /// A random request header, mostly plausible, sometimes wild.
    pub(crate) fn random_header(r: &mut Rng, handle: u64) -> RequestHeader {
        let cmd = if r.below(10) == 0 {
            r.next() as u16
        } else {
            r.below(8) as u16
        };
        let flags = if r.below(8) == 0 {
            r.next() as u16
        } else {
            (r.below(4) as u16) & (cmd_flag::FUA | cmd_flag::NO_HOLE)
        };
        let offset = match r.below(4) {
            0 => r.next(),
            _ => r.below(2048) * 512 + if r.below(10) == 0 { 1 } else { 0 },
        };
        let len = match r.below(6) {
            0 => r.next() as u32,
            1 => 0,
            _ => (r.below(16) as u32) * 512 + if r.below(10) == 0 { 3 } else { 0 },
        };
        RequestHeader {
            flags,
            cmd,
            handle,
            offset,
            len,
        }
    }

    /// A random valid stream: headers, each followed by exactly its payload.
    fn random_stream(r: &mut Rng) -> (Vec<u8>, Vec<(RequestHeader, Action)>) {
        let (s, i) = (session(), info());
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for k in 0..r.below(40) {
            let mut h = random_header(r, k);
            if h.cmd == cmd::DISC {
                h.cmd = cmd::FLUSH;
            }
            let a = decide(&h, &s, &i);
            // Keep payloads small: skip very long ones.
            if a.payload(&h) > 1 << 16 {
                continue;
            }
            bytes.extend_from_slice(&h.encode());
            bytes.extend((0..a.payload(&h)).map(|x| x as u8));
            want.push((h, a));
        }
        (bytes, want)
    }

    fn frame(bytes: &[u8], cuts: &[usize]) -> Vec<Event> {
        let mut f = Framer::new(session(), info());
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let c = c.clamp(at, bytes.len());
            f.feed(&bytes[at..c], &mut out).unwrap();
            at = c;
        }
        assert!(f.at_boundary());
        merge_data(out)
    }

    #[test]
    fn property_framing_does_not_depend_on_how_the_stream_is_cut() {
        let mut r = Rng::new(0x5eed_0001);
        for _ in 0..500 {
            let (bytes, want) = random_stream(&mut r);
            let whole = frame(&bytes, &[]);
            let got: Vec<_> = whole
                .iter()
                .filter_map(|e| match e {
                    Event::Request(h, a) => Some((*h, *a)),
                    _ => None,
                })
                .collect();
            assert_eq!(got, want);
            assert_eq!(
                whole.iter().filter(|e| **e == Event::Ready).count(),
                want.len(),
                "one Ready per request"
            );
            let mut cuts: Vec<usize> = (0..r.below(20))
                .map(|_| r.below(bytes.len() as u64 + 1) as usize)
                .collect();
            cuts.sort_unstable();
            assert_eq!(frame(&bytes, &cuts), whole);
            let bytewise: Vec<usize> = (1..bytes.len()).collect();
            if bytes.len() < 4096 {
                assert_eq!(frame(&bytes, &bytewise), whole);
            }
        }
    }

    #[test]
    fn property_random_bytes_never_panic_and_bad_magic_stops() {
        let mut r = Rng::new(0x5eed_0002);
        for _ in 0..2000 {
            let mut bytes = vec![0u8; r.below(200) as usize];
            r.fill(&mut bytes);
            if r.below(2) == 0 && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
            }
            let mut f = Framer::new(session(), info());
            let mut out = Vec::new();
            let res = f.feed(&bytes, &mut out);
            let requests = out
                .iter()
                .filter(|e| matches!(e, Event::Request(..)))
                .count();
            match res {
                Ok(()) => {}
                Err(ProtoError::BadMagic(_)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(requests <= bytes.len() / proto::REQUEST_HEADER_BYTES);
        }
    }

    #[test]
    fn property_decisions_never_accept_what_the_export_cannot_hold() {
        let mut r = Rng::new(0x5eed_0003);
        let i = info();
        for _ in 0..20000 {
            let s = Session {
                max_block: 1 << 20,
                read_only: r.below(2) == 0,
                structured: r.below(2) == 0,
                meta: r.below(2) == 0,
            };
            let h = random_header(&mut r, 0);
            let a = decide(&h, &s, &i);
            let end = h.offset.checked_add(u64::from(h.len));
            match a {
                Action::Read | Action::Write { .. } => {
                    assert!(h.len > 0 && h.len <= s.max_block, "{h:?}");
                    assert!(end.is_some_and(|e| e <= i.size), "{h:?}");
                    assert_eq!(h.offset % 512, 0);
                }
                Action::Trim | Action::WriteZeroes { .. } | Action::BlockStatus => {
                    assert!(end.is_some_and(|e| e <= i.size), "{h:?}");
                }
                _ => {}
            }
            if s.read_only {
                assert!(
                    !matches!(
                        a,
                        Action::Write { .. } | Action::Trim | Action::WriteZeroes { .. }
                    ),
                    "{h:?}"
                );
            }
            if matches!(a, Action::Reply { skip, .. } if skip > 0) {
                assert_eq!(h.cmd, cmd::WRITE, "only writes carry a payload");
            }
        }
    }
}
