//! The fixed-newstyle handshake, on a blocking socket.
//!
//! The server greets, reads the client flags, then answers options until `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME` selects an export (→ transmission) or the client aborts. It reads
//! exactly the bytes of each option, never more, so requests the client pipelines after
//! `GO` stay in the socket for the I/O thread. Unknown options get `NBD_REP_ERR_UNSUP`.
//!
//! TLS ([`Policy`], [`super::tls`]): with the listener's mode off, `NBD_OPT_STARTTLS` is
//! refused (`NBD_REP_ERR_POLICY`). Otherwise it is acknowledged and the TLS handshake runs
//! on the same socket under the same deadline; every option after it goes through the
//! session, and what was negotiated before it (structured replies, meta contexts) is
//! forgotten, as a man in the middle may have sent it. In `require` mode everything
//! before `STARTTLS` but `ABORT` gets `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` (which
//! has no error reply) closes the connection. A second `STARTTLS` is
//! `NBD_REP_ERR_INVALID`. With TLS, the client's session (and any ciphertext it already
//! sent past `GO`) goes to the I/O thread in [`Negotiated::tls`].
//!
//! Access ([`super::Access`]): an export the client has not authenticated for (its PSK
//! identity, its Unix uid and gid) is absent for it: `LIST` does not name it, and
//! `INFO`, `GO`, the meta-context options and `EXPORT_NAME` answer as for an unknown
//! name, byte for byte ([`no_such_export`]: the reply names only what the client
//! sent), so a client learns nothing of other attachments. The daemon's log tells the
//! operator which it was (a refused peer with its uid/gid or PSK identity, at most one
//! line per [`REFUSED_LOG`] interval).
//!
//! Bounds: option data ([`MAX_OPTION_BYTES`]; more is answered `NBD_REP_ERR_TOO_BIG` and
//! ends the connection), options per handshake ([`MAX_OPTIONS`], then the connection
//! ends), and time: the caller wraps the socket in a [`Deadline`], one deadline for the
//! whole handshake however the client spreads its bytes. At `NBD_OPT_GO` (or
//! `EXPORT_NAME`) the caller's `admit` decides whether the connection may start (its
//! connection and memory limits, [`super::gate`]); a refusal is answered
//! `NBD_REP_ERR_POLICY` with the reason, and the client may try another option or leave.
//!
//! [`negotiate`] is generic over the stream: the fuzz target `nbd_handshake` runs it on
//! bytes in memory.

use super::gate::{LogLimiter, Refusal};
use super::proto::{self, info, opt, rep};
use super::tls::{TlsChannel, TlsMode, TlsServer, TlsSession};
use super::{ClientAuth, Export, Registry};
use socket2::SockRef;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest option payload accepted (names and queries are at most 4 KiB each).
pub const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Options accepted before the client must pick an export: real clients use a handful
/// (`nbdinfo --list` about four per export listed).
pub const MAX_OPTIONS: usize = 1024;
/// Context id of `base:allocation` once selected.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Clients refused an export they may not use are logged at most this often.
static REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(5));

/// Log a client that named an export it may not use (the wire says only "unknown").
fn log_refusal(registry: &Registry, name: &str, client: &ClientAuth) {
    if registry.get(name).is_none() {
        return;
    }
    if let Some(missed) = REFUSED_LOG.check() {
        tracing::info!(export = %name, unix_peer = ?client.unix, tls = client.tls,
            psk_identity = ?client.psk_identity, missed,
            "refused a client an export it may not use (its attachment admits other credentials)");
    }
}

/// The one reply for an export that does not exist and one the client may not use.
fn no_such_export<S: Write>(
    s: &mut S,
    option: u32,
    name: &str,
    registry: &Registry,
    client: &ClientAuth,
) -> io::Result<()> {
    log_refusal(registry, name, client);
    let msg = format!("no export named {name:?} for this client");
    reply(s, option, rep::ERR_UNKNOWN, msg.as_bytes())
}

/// Outcome of a successful handshake.
#[derive(Debug)]
pub struct Negotiated<A> {
    /// The selected export.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected (its context id is [`BASE_ALLOCATION_ID`]).
    pub meta_context: bool,
    /// What `admit` gave for it.
    pub admission: A,
    /// The TLS session, when the client upgraded (boxed: it moves between threads).
    pub tls: Option<Box<TlsSession>>,
}

/// A listener's TLS rules and what is known of the client before it speaks.
#[derive(Debug, Clone)]
pub struct Policy<'a> {
    /// Off, on or require.
    pub mode: TlsMode,
    /// Credentials (needed unless the mode is off).
    pub tls: Option<&'a TlsServer>,
    /// The client as accepted (its Unix credentials); TLS fills in the rest.
    pub client: ClientAuth,
}

impl Policy<'_> {
    /// No TLS, no credentials: every export with [`super::Access::Any`].
    pub fn plain() -> Policy<'static> {
        Policy {
            mode: TlsMode::Off,
            tls: None,
            client: ClientAuth::default(),
        }
    }
}

/// The handshake's stream: plaintext, then (after `STARTTLS`) TLS over the same socket.
enum Chan<'a, S> {
    Plain(&'a mut S),
    Tls(TlsChannel<'a, S>),
    /// Only while switching.
    Gone,
}

impl<S: Read + Write> Read for Chan<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Chan::Plain(s) => s.read(buf),
            Chan::Tls(t) => t.read(buf),
            Chan::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<S: Read + Write> Write for Chan<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Chan::Plain(s) => s.write(buf),
            Chan::Tls(t) => t.write(buf),
            Chan::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Chan::Plain(s) => s.flush(),
            Chan::Tls(t) => t.flush(),
            Chan::Gone => Ok(()),
        }
    }
}

impl<S> Chan<'_, S> {
    fn take_tls(self) -> Option<Box<TlsSession>> {
        match self {
            Chan::Tls(t) => Some(Box::new(t.tls)),
            _ => None,
        }
    }
}

/// A socket whose every read and write must finish before one deadline: each call gets
/// the time left as its socket timeout, and fails with `TimedOut` once none is left.
#[derive(Debug)]
pub struct Deadline<'a, S> {
    s: &'a mut S,
    at: Instant,
}

impl<'a, S: AsFd> Deadline<'a, S> {
    /// `s` until `now + limit`.
    pub fn new(s: &'a mut S, limit: Duration) -> Self {
        Deadline {
            s,
            at: Instant::now() + limit,
        }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        // A zero timeout would mean "none": at least a millisecond.
        Ok(left.max(Duration::from_millis(1)))
    }
}

fn timed_out(e: io::Error) -> io::Error {
    // A socket timeout reads as WouldBlock: say what it is.
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed")
    } else {
        e
    }
}

impl<S: AsFd + Read> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        SockRef::from(&*self.s).set_read_timeout(Some(self.left()?))?;
        self.s.read(buf).map_err(timed_out)
    }
}

impl<S: AsFd + Write> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        SockRef::from(&*self.s).set_write_timeout(Some(self.left()?))?;
        self.s.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn reply<S: Write>(s: &mut S, option: u32, ty: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    proto::encode_option_reply(option, ty, data, &mut out);
    s.write_all(&out)
}

/// Run the handshake without TLS ([`Policy::plain`]); see [`negotiate_with`].
pub fn negotiate<S: Read + Write, A>(
    s: &mut S,
    registry: &Registry,
    admit: &mut dyn FnMut(&Arc<Export>) -> Result<A, Refusal>,
) -> io::Result<Option<Negotiated<A>>> {
    negotiate_with(s, registry, &Policy::plain(), admit)
}

/// Run the handshake under `policy`; `admit` decides whether the chosen export's
/// connection may start. `Ok(None)`: the client ended it (abort, unknown or refused
/// `EXPORT_NAME`, or `EXPORT_NAME` before a required `STARTTLS`).
pub fn negotiate_with<S: Read + Write, A>(
    sock: &mut S,
    registry: &Registry,
    policy: &Policy<'_>,
    admit: &mut dyn FnMut(&Arc<Export>) -> Result<A, Refusal>,
) -> io::Result<Option<Negotiated<A>>> {
    let mut chan = Chan::Plain(sock);
    let s = &mut chan;
    s.write_all(&proto::greeting())?;
    let mut fl = [0u8; 4];
    s.read_exact(&mut fl)?;
    let client_flags = u32::from_be_bytes(fl);
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Err(invalid(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    // The export name `SET_META_CONTEXT` was given, if it selected base:allocation.
    let mut meta_for: Option<String> = None;
    let mut client = policy.client.clone();

    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; proto::OPTION_HEADER_BYTES];
        s.read_exact(&mut h)?;
        let (option, len) = proto::decode_option_header(&h).map_err(|e| invalid(e.to_string()))?;
        if len > MAX_OPTION_BYTES {
            // Tell the client why, then hang up: skipping megabytes is not worth it.
            let _ = reply(s, option, rep::ERR_TOO_BIG, b"option data too large");
            return Err(invalid(format!("option {option} with {len} bytes of data")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if policy.mode == TlsMode::Require && !client.tls {
            match option {
                opt::STARTTLS | opt::ABORT => {}
                opt::EXPORT_NAME => {
                    // No error reply exists for this option: the protocol says close.
                    tracing::info!("client chose an export without the TLS this listener requires");
                    return Ok(None);
                }
                _ => {
                    reply(s, option, rep::ERR_TLS_REQD, b"TLS is required")?;
                    continue;
                }
            }
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = registry.get_for(&name, &client) else {
                    // No error path exists for this option: just close.
                    log_refusal(registry, &name, &client);
                    tracing::debug!(export = %name, "client asked for an unknown export (or one it may not use)");
                    return Ok(None);
                };
                let admission = match admit(&export) {
                    Ok(a) => a,
                    Err(why) => {
                        tracing::info!(export = %name, "refusing the client: {why}");
                        return Ok(None);
                    }
                };
                let info = export.dev.info();
                s.write_all(&proto::export_name_reply(
                    info.size,
                    export.transmission_flags(structured),
                    no_zeroes,
                ))?;
                let meta_context = meta_for.as_deref() == Some(name.as_str());
                s.flush()?;
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    meta_context,
                    admission,
                    tls: chan.take_tls(),
                }));
            }
            opt::ABORT => {
                // The client may already have gone; the ACK is a courtesy.
                let _ = reply(s, option, rep::ACK, &[]);
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(s, option, rep::ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in registry.names_for(&client) {
                    reply(s, option, rep::SERVER, &proto::rep_server(&name))?;
                }
                reply(s, option, rep::ACK, &[])?;
            }
            opt::STARTTLS => {
                let Some(server) = policy.tls.filter(|_| policy.mode != TlsMode::Off) else {
                    reply(s, option, rep::ERR_POLICY, b"TLS is not configured")?;
                    continue;
                };
                if client.tls {
                    reply(s, option, rep::ERR_INVALID, b"TLS is already on")?;
                    continue;
                }
                if !data.is_empty() {
                    reply(s, option, rep::ERR_INVALID, b"STARTTLS takes no data")?;
                    continue;
                }
                reply(s, option, rep::ACK, &[])?;
                let mut session = server.session()?;
                let Chan::Plain(sock) = std::mem::replace(s, Chan::Gone) else {
                    return Err(invalid("STARTTLS on a TLS channel"));
                };
                session.handshake(sock)?;
                client.tls = true;
                client.psk_identity = session.identity();
                tracing::debug!(identity = ?client.psk_identity, tls = %session.describe(), "TLS handshake done");
                *s = Chan::Tls(TlsChannel { sock, tls: session });
                // Nothing negotiated in plaintext survives the upgrade.
                structured = false;
                meta_for = None;
            }
            opt::INFO | opt::GO => {
                let Ok((name, wanted)) = proto::decode_info_request(&data) else {
                    reply(s, option, rep::ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(export) = registry.get_for(&name, &client) else {
                    no_such_export(s, option, &name, registry, &client)?;
                    continue;
                };
                // Admission comes before any reply of GO, so a refusal is its only reply.
                let admission = if option == opt::GO {
                    match admit(&export) {
                        Ok(a) => Some(a),
                        Err(why) => {
                            tracing::info!(export = %name, "refusing the client: {why}");
                            reply(s, option, rep::ERR_POLICY, why.to_string().as_bytes())?;
                            continue;
                        }
                    }
                } else {
                    None
                };
                let dinfo = export.dev.info();
                let flags = export.transmission_flags(structured);
                reply(s, option, rep::INFO, &proto::info_export(dinfo.size, flags))?;
                for w in &wanted {
                    match *w {
                        info::NAME => {
                            reply(s, option, rep::INFO, &proto::info_string(info::NAME, &name))?
                        }
                        info::DESCRIPTION => reply(
                            s,
                            option,
                            rep::INFO,
                            &proto::info_string(info::DESCRIPTION, "Ember volume"),
                        )?,
                        _ => {}
                    }
                }
                // Always sent: clients that did not ask may ignore it (qemu does the same).
                let min = dinfo.logical_block_size.max(1);
                let pref = dinfo.physical_block_size.max(min);
                reply(
                    s,
                    option,
                    rep::INFO,
                    &proto::info_block_size(min, pref, export.max_block()),
                )?;
                reply(s, option, rep::ACK, &[])?;
                if let Some(admission) = admission {
                    let meta_context = meta_for.as_deref() == Some(name.as_str());
                    return Ok(Some(Negotiated {
                        export,
                        structured,
                        meta_context,
                        admission,
                        tls: chan.take_tls(),
                    }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        s,
                        option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                structured = true;
                reply(s, option, rep::ACK, &[])?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if set && !structured {
                    reply(
                        s,
                        option,
                        rep::ERR_INVALID,
                        b"SET_META_CONTEXT needs structured replies",
                    )?;
                    continue;
                }
                let Ok((name, queries)) = proto::decode_meta_request(&data) else {
                    reply(
                        s,
                        option,
                        rep::ERR_INVALID,
                        b"malformed meta context request",
                    )?;
                    continue;
                };
                if registry.get_for(&name, &client).is_none() {
                    no_such_export(s, option, &name, registry, &client)?;
                    continue;
                }
                let matches = if set {
                    queries.iter().any(|q| q == proto::BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
                };
                if set {
                    meta_for = matches.then(|| name.clone());
                }
                if matches {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    reply(
                        s,
                        option,
                        rep::META_CONTEXT,
                        &proto::rep_meta_context(id, proto::BASE_ALLOCATION),
                    )?;
                }
                reply(s, option, rep::ACK, &[])?;
            }
            _ => reply(s, option, rep::ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(invalid(format!("more than {MAX_OPTIONS} options")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_blockdev::{open, BackendSpec, OpenOptions};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn registry() -> Arc<Registry> {
        let r = Arc::new(Registry::default());
        let dev = open(
            &BackendSpec::Null { size: 1 << 20 },
            &OpenOptions::default(),
        )
        .unwrap();
        r.exports.write().unwrap().insert(
            "vol".into(),
            Arc::new(Export {
                id: 1,
                name: "vol".into(),
                dev,
                read_only: false,
                access: crate::nbd::Access::Any,
            }),
        );
        r
    }

    fn send_opt(c: &mut UnixStream, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b).unwrap();
    }

    /// Read one option reply: (option, type, data).
    fn read_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let l = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; l as usize];
        c.read_exact(&mut d).unwrap();
        (o, t, d)
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        d
    }

    #[test]
    fn full_negotiation_over_a_socket_pair() {
        let reg = registry();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let r2 = reg.clone();
        let server = std::thread::spawn(move || negotiate(&mut s, &r2, &mut |_| Ok(())));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        assert_eq!(g, proto::greeting());
        c.write_all(&3u32.to_be_bytes()).unwrap();

        send_opt(&mut c, 99, b"junk");
        assert_eq!(read_reply(&mut c).1, rep::ERR_UNSUP);
        send_opt(&mut c, opt::STARTTLS, &[]);
        assert_eq!(read_reply(&mut c).1, rep::ERR_POLICY);
        send_opt(&mut c, opt::LIST, &[]);
        assert_eq!(
            read_reply(&mut c),
            (opt::LIST, rep::SERVER, proto::rep_server("vol"))
        );
        assert_eq!(read_reply(&mut c).1, rep::ACK);
        send_opt(&mut c, opt::GO, &go_data("nope"));
        assert_eq!(read_reply(&mut c).1, rep::ERR_UNKNOWN);
        send_opt(&mut c, opt::GO, &[1, 2, 3]);
        assert_eq!(read_reply(&mut c).1, rep::ERR_INVALID);

        // SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
        let mut meta = Vec::new();
        meta.extend_from_slice(&3u32.to_be_bytes());
        meta.extend_from_slice(b"vol");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
        send_opt(&mut c, opt::SET_META_CONTEXT, &meta);
        assert_eq!(read_reply(&mut c).1, rep::ERR_INVALID);
        send_opt(&mut c, opt::STRUCTURED_REPLY, &[]);
        assert_eq!(read_reply(&mut c).1, rep::ACK);
        send_opt(&mut c, opt::SET_META_CONTEXT, &meta);
        let (_, t, d) = read_reply(&mut c);
        assert_eq!(t, rep::META_CONTEXT);
        assert_eq!(d, proto::rep_meta_context(1, proto::BASE_ALLOCATION));
        assert_eq!(read_reply(&mut c).1, rep::ACK);

        send_opt(&mut c, opt::GO, &go_data("vol"));
        let (_, t, d) = read_reply(&mut c);
        assert_eq!(t, rep::INFO);
        assert_eq!(&d[..2], &info::EXPORT.to_be_bytes());
        assert_eq!(&d[2..10], &(1u64 << 20).to_be_bytes());
        let flags = u16::from_be_bytes([d[10], d[11]]);
        assert_ne!(flags & proto::tx::CAN_MULTI_CONN, 0);
        assert_ne!(flags & proto::tx::SEND_DF, 0);
        assert_eq!(read_reply(&mut c).2, proto::info_string(info::NAME, "vol"));
        let (_, t, d) = read_reply(&mut c);
        assert_eq!(
            (t, &d[..2]),
            (rep::INFO, &info::BLOCK_SIZE.to_be_bytes()[..])
        );
        assert_eq!(read_reply(&mut c).1, rep::ACK);

        let n = server.join().unwrap().unwrap().unwrap();
        assert!(n.structured && n.meta_context);
        assert_eq!(n.export.name, "vol");
    }

    /// Exports a client may not use are absent for it; `require` refuses everything but
    /// `STARTTLS`/`ABORT` before TLS; `EXPORT_NAME` then closes.
    #[test]
    fn access_filters_exports_and_require_refuses_plaintext() {
        let reg = registry();
        let dev = open(
            &BackendSpec::Null { size: 1 << 20 },
            &OpenOptions::default(),
        )
        .unwrap();
        reg.exports.write().unwrap().insert(
            "att".into(),
            Arc::new(Export {
                id: 2,
                name: "att".into(),
                dev,
                read_only: false,
                access: crate::nbd::Access::Attachment {
                    psk_identity: Some("alice".into()),
                    uid: Some(1000),
                    gid: None,
                },
            }),
        );
        let keys = crate::nbd::PskTable::parse("t", "alice:00112233").unwrap();
        let tls = TlsServer::new(Some(Arc::new(keys)), None).unwrap();
        let tls = Arc::new(tls);
        let run = |mode: TlsMode, unix: Option<(u32, u32)>| {
            let (mut c, mut s) = UnixStream::pair().unwrap();
            let (r2, t2) = (reg.clone(), tls.clone());
            let server = std::thread::spawn(move || {
                let policy = Policy {
                    mode,
                    tls: Some(&t2),
                    client: ClientAuth {
                        unix,
                        ..ClientAuth::default()
                    },
                };
                negotiate_with(&mut s, &r2, &policy, &mut |_| Ok(())).map(|n| n.is_some())
            });
            let mut g = [0u8; 18];
            c.read_exact(&mut g).unwrap();
            c.write_all(&3u32.to_be_bytes()).unwrap();
            (c, server)
        };
        let list = |c: &mut UnixStream| {
            send_opt(c, opt::LIST, &[]);
            let mut names = Vec::new();
            loop {
                let (_, t, d) = read_reply(c);
                if t == rep::ACK {
                    return names;
                }
                assert_eq!(t, rep::SERVER);
                names.push(String::from_utf8_lossy(&d[4..]).into_owned());
            }
        };
        // The attachment's uid sees and opens it; another uid, or TCP, does not.
        let (mut c, server) = run(TlsMode::On, Some((1000, 1000)));
        assert_eq!(list(&mut c), ["att", "vol"]);
        send_opt(&mut c, opt::ABORT, &[]);
        assert_eq!(read_reply(&mut c).1, rep::ACK);
        assert!(!server.join().unwrap().unwrap());
        for unix in [Some((1001, 1000)), None] {
            let (mut c, server) = run(TlsMode::On, unix);
            assert_eq!(list(&mut c), ["vol"]);
            send_opt(&mut c, opt::INFO, &go_data("att"));
            assert_eq!(read_reply(&mut c).1, rep::ERR_UNKNOWN);
            send_opt(&mut c, opt::EXPORT_NAME, b"att");
            assert!(!server.join().unwrap().unwrap());
        }
        // Require: TLS_REQD for everything but STARTTLS and ABORT; EXPORT_NAME closes.
        let (mut c, server) = run(TlsMode::Require, Some((1000, 1000)));
        for (o, d) in [
            (opt::LIST, vec![]),
            (opt::GO, go_data("vol")),
            (opt::INFO, go_data("vol")),
            (opt::STRUCTURED_REPLY, vec![]),
        ] {
            send_opt(&mut c, o, &d);
            assert_eq!(read_reply(&mut c).1, rep::ERR_TLS_REQD, "option {o}");
        }
        send_opt(&mut c, opt::EXPORT_NAME, b"vol");
        assert!(!server.join().unwrap().unwrap());
        // STARTTLS with data is invalid; then garbage instead of a ClientHello fails.
        let (mut c, server) = run(TlsMode::Require, None);
        send_opt(&mut c, opt::STARTTLS, b"x");
        assert_eq!(read_reply(&mut c).1, rep::ERR_INVALID);
        send_opt(&mut c, opt::STARTTLS, &[]);
        assert_eq!(read_reply(&mut c).1, rep::ACK);
        c.write_all(&[0x42; 64]).unwrap();
        assert!(server.join().unwrap().is_err());
    }

    /// An export the client may not use and one that does not exist get the same bytes
    /// (names of equal length, swapped), for a TLS client with another attachment's
    /// PSK identity and for a Unix peer with another uid; LIST names neither.
    #[test]
    fn hidden_and_unknown_exports_get_identical_replies() {
        let reg = Arc::new(Registry::default());
        let dev = open(
            &BackendSpec::Null { size: 1 << 20 },
            &OpenOptions::default(),
        )
        .unwrap();
        let (hidden, unknown) = ("vol-aaaa", "vol-bbbb");
        reg.exports.write().unwrap().insert(
            hidden.into(),
            Arc::new(Export {
                id: 1,
                name: hidden.into(),
                dev,
                read_only: false,
                access: crate::nbd::Access::Attachment {
                    psk_identity: Some("alice".into()),
                    uid: Some(1000),
                    gid: Some(1000),
                },
            }),
        );
        let meta = |name: &str| {
            let mut m = Vec::new();
            m.extend_from_slice(&(name.len() as u32).to_be_bytes());
            m.extend_from_slice(name.as_bytes());
            m.extend_from_slice(&1u32.to_be_bytes());
            m.extend_from_slice(&15u32.to_be_bytes());
            m.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
            m
        };
        // Every reply byte the client gets for `name`'s options, then the end.
        let transcript = |client: ClientAuth, name: &str| -> (Vec<u8>, bool) {
            let (mut c, mut s) = UnixStream::pair().unwrap();
            let r2 = reg.clone();
            let server = std::thread::spawn(move || {
                let policy = Policy {
                    mode: TlsMode::On,
                    tls: None,
                    client,
                };
                negotiate_with(&mut s, &r2, &policy, &mut |_| Ok(())).map(|n| n.is_some())
            });
            let mut g = [0u8; 18];
            c.read_exact(&mut g).unwrap();
            c.write_all(&3u32.to_be_bytes()).unwrap();
            for (o, d) in [
                (opt::LIST, vec![]),
                (opt::INFO, go_data(name)),
                (opt::GO, go_data(name)),
                (opt::LIST_META_CONTEXT, meta(name)),
                (opt::STRUCTURED_REPLY, vec![]),
                (opt::SET_META_CONTEXT, meta(name)),
            ] {
                send_opt(&mut c, o, &d);
            }
            send_opt(&mut c, opt::EXPORT_NAME, name.as_bytes());
            c.shutdown(std::net::Shutdown::Write).unwrap();
            // Until the end (a server that opened the export leaves options unread, and
            // its close may then reset the socket).
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = c.read(&mut buf) {
                all.extend_from_slice(&buf[..n]);
            }
            (all, server.join().unwrap().unwrap())
        };
        let swap = |b: &[u8]| -> Vec<u8> {
            let (from, to) = (unknown.as_bytes(), hidden.as_bytes());
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                if b[i..].starts_with(from) {
                    out.extend_from_slice(to);
                    i += from.len();
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            out
        };
        let clients = [
            ClientAuth {
                tls: true,
                psk_identity: Some("bob".into()),
                ..ClientAuth::default()
            },
            ClientAuth {
                unix: Some((1001, 1000)),
                ..ClientAuth::default()
            },
            ClientAuth::default(),
        ];
        for client in clients {
            let (h, opened) = transcript(client.clone(), hidden);
            assert!(!opened, "{client:?} opened {hidden}");
            let (u, _) = transcript(client.clone(), unknown);
            assert_eq!(h, swap(&u), "{client:?}");
            assert!(String::from_utf8_lossy(&h).contains("no export named"));
        }
        // The attachment's own credentials do open it.
        for client in [
            ClientAuth {
                tls: true,
                psk_identity: Some("alice".into()),
                ..ClientAuth::default()
            },
            ClientAuth {
                unix: Some((1000, 1000)),
                ..ClientAuth::default()
            },
        ] {
            let (h, opened) = transcript(client.clone(), hidden);
            assert!(opened);
            assert_ne!(h, swap(&transcript(client, unknown).0));
        }
    }

    #[test]
    fn abort_and_garbage() {
        let reg = registry();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let r2 = reg.clone();
        let server = std::thread::spawn(move || negotiate(&mut s, &r2, &mut |_| Ok(())));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&1u32.to_be_bytes()).unwrap();
        send_opt(&mut c, opt::ABORT, &[]);
        assert_eq!(read_reply(&mut c).1, rep::ACK);
        assert!(server.join().unwrap().unwrap().is_none());

        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || negotiate(&mut s, &reg, &mut |_| Ok(())));
        c.read_exact(&mut g).unwrap();
        c.write_all(&1u32.to_be_bytes()).unwrap();
        c.write_all(b"GARBAGE!GARBAGE!GARBAGE!").unwrap();
        assert!(server.join().unwrap().is_err());
    }

    #[test]
    fn one_deadline_for_the_whole_handshake_however_the_bytes_trickle() {
        let reg = registry();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        let server = std::thread::spawn(move || {
            negotiate(
                &mut Deadline::new(&mut s, Duration::from_millis(1500)),
                &reg,
                &mut |_| Ok(()),
            )
        });
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        // A byte every 200 ms: each read is quick, the handshake never ends by itself.
        let trickle = std::thread::spawn(move || {
            let mut b = Vec::from(3u32.to_be_bytes());
            for _ in 0..20 {
                b.extend_from_slice(b"IHAVEOPT\0\0\0\x63\0\0\0\0");
            }
            for x in b {
                if c.write_all(&[x]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let e = server.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        trickle.join().unwrap();
    }

    #[test]
    fn options_are_bounded() {
        let reg = registry();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || negotiate(&mut s, &reg, &mut |_| Ok(())));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&3u32.to_be_bytes()).unwrap();
        let reader = {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut n = 0;
                let mut h = [0u8; 20];
                while c.read_exact(&mut h).is_ok() {
                    let l = u32::from_be_bytes(h[16..20].try_into().unwrap());
                    let mut d = vec![0u8; l as usize];
                    c.read_exact(&mut d).unwrap();
                    n += 1;
                }
                n
            })
        };
        for _ in 0..MAX_OPTIONS + 10 {
            let mut b = Vec::new();
            b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&99u32.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
            if c.write_all(&b).is_err() {
                break;
            }
        }
        let e = server.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("options"), "{e}");
        drop(c);
        assert_eq!(reader.join().unwrap(), MAX_OPTIONS);
    }

    #[test]
    fn a_refusal_at_go_is_err_policy_with_the_reason_and_the_client_may_go_on() {
        let reg = registry();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let mut n = 0;
        let server = std::thread::spawn(move || {
            negotiate(&mut s, &reg, &mut |_| {
                n += 1;
                if n == 1 {
                    Err(Refusal::Conns(7))
                } else {
                    Ok(n)
                }
            })
        });
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&3u32.to_be_bytes()).unwrap();
        send_opt(&mut c, opt::GO, &go_data("vol"));
        let (o, t, d) = read_reply(&mut c);
        assert_eq!((o, t), (opt::GO, rep::ERR_POLICY));
        assert_eq!(
            String::from_utf8(d).unwrap(),
            "server busy: too many NBD connections (limit 7)"
        );
        // INFO is not admission; a second GO is admitted.
        send_opt(&mut c, opt::INFO, &go_data("vol"));
        while read_reply(&mut c).1 != rep::ACK {}
        send_opt(&mut c, opt::GO, &go_data("vol"));
        while read_reply(&mut c).1 != rep::ACK {}
        let got = server.join().unwrap().unwrap().unwrap();
        assert_eq!(got.admission, 2);
    }

    #[test]
    fn huge_option_lengths_are_refused_before_any_allocation() {
        let reg = registry();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || negotiate(&mut s, &reg, &mut |_| Ok(())));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&3u32.to_be_bytes()).unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt::GO.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&b).unwrap();
        assert_eq!(read_reply(&mut c).1, rep::ERR_TOO_BIG);
        assert!(server.join().unwrap().is_err());
    }

    /// Bytes in, bytes out: a whole client conversation in memory.
    struct Mem<'a> {
        input: &'a [u8],
        out: Vec<u8>,
    }

    impl Read for Mem<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Mem<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A random option: a known one with plausible or random data, or anything.
    fn random_option(r: &mut crate::nbd::testgen::Rng, out: &mut Vec<u8>) {
        let known = [
            opt::EXPORT_NAME,
            opt::ABORT,
            opt::LIST,
            opt::STARTTLS,
            opt::INFO,
            opt::GO,
            opt::STRUCTURED_REPLY,
            opt::LIST_META_CONTEXT,
            opt::SET_META_CONTEXT,
        ];
        let option = if r.below(10) == 0 {
            r.next() as u32
        } else {
            known[r.below(known.len() as u64) as usize]
        };
        let data = match r.below(4) {
            0 => {
                let mut d = vec![0u8; r.below(64) as usize];
                r.fill(&mut d);
                d
            }
            1 => go_data(if r.below(2) == 0 { "vol" } else { "nope" }),
            2 => {
                let mut d = Vec::new();
                d.extend_from_slice(&3u32.to_be_bytes());
                d.extend_from_slice(b"vol");
                let n = r.below(3) as u32;
                d.extend_from_slice(&n.to_be_bytes());
                for _ in 0..n {
                    let q = if r.below(2) == 0 {
                        proto::BASE_ALLOCATION
                    } else {
                        "base:"
                    };
                    d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                    d.extend_from_slice(q.as_bytes());
                }
                d
            }
            _ => Vec::new(),
        };
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
    }

    #[test]
    fn property_any_option_sequence_gets_well_formed_replies() {
        let reg = registry();
        let mut r = crate::nbd::testgen::Rng::new(0x5eed_0005);
        for _ in 0..3000 {
            let mut input = Vec::from(3u32.to_be_bytes());
            for _ in 0..r.below(12) {
                random_option(&mut r, &mut input);
            }
            // Sometimes cut the conversation short, or flip a byte.
            if r.below(4) == 0 && !input.is_empty() {
                let cut = r.below(input.len() as u64) as usize;
                input.truncate(cut);
            }
            if r.below(4) == 0 && !input.is_empty() {
                let at = r.below(input.len() as u64) as usize;
                input[at] ^= 1 << r.below(8);
            }
            let mut m = Mem {
                input: &input,
                out: Vec::new(),
            };
            let res = negotiate(&mut m, &reg, &mut |_| Ok(()));
            // The output: the greeting, then option replies; after EXPORT_NAME its reply.
            let out = m.out;
            assert_eq!(&out[..18], &proto::greeting());
            let mut pos = 18;
            while pos < out.len() {
                if out.len() - pos >= 20
                    && out[pos..pos + 8] == proto::OPT_REPLY_MAGIC.to_be_bytes()
                {
                    let l = u32::from_be_bytes(out[pos + 16..pos + 20].try_into().unwrap());
                    assert!(l <= 64 * 1024);
                    pos += 20 + l as usize;
                } else {
                    // Only the EXPORT_NAME reply has no magic; it ends the handshake.
                    assert!(matches!(res, Ok(Some(_))), "stray bytes");
                    assert!(matches!(out.len() - pos, 10 | 134));
                    pos = out.len();
                }
            }
            assert_eq!(pos, out.len(), "a reply cut short");
        }
    }

    #[test]
    fn property_option_data_decoders_reject_garbage_and_round_trip() {
        let mut r = crate::nbd::testgen::Rng::new(0x5eed_0006);
        for _ in 0..20000 {
            let mut b = vec![0u8; r.below(40) as usize];
            r.fill(&mut b);
            if r.below(2) == 0 && b.len() >= 4 {
                // A plausible length prefix.
                let n = r.below(b.len() as u64) as u32;
                b[..4].copy_from_slice(&n.to_be_bytes());
            }
            // Never panics; what decodes re-encodes to the same bytes.
            if let Ok((name, infos)) = proto::decode_info_request(&b) {
                let mut e = Vec::new();
                e.extend_from_slice(&(name.len() as u32).to_be_bytes());
                e.extend_from_slice(name.as_bytes());
                e.extend_from_slice(&(infos.len() as u16).to_be_bytes());
                for i in infos {
                    e.extend_from_slice(&i.to_be_bytes());
                }
                assert_eq!(e, b);
            }
            if let Ok((name, queries)) = proto::decode_meta_request(&b) {
                let mut e = Vec::new();
                e.extend_from_slice(&(name.len() as u32).to_be_bytes());
                e.extend_from_slice(name.as_bytes());
                e.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                for q in queries {
                    e.extend_from_slice(&(q.len() as u32).to_be_bytes());
                    e.extend_from_slice(q.as_bytes());
                }
                assert_eq!(e, b);
            }
        }
    }
}
