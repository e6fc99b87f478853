//! TLS for NBD (`NBD_OPT_STARTTLS`): PSK and x509, on OpenSSL, inside the io_uring model.
//!
//! **Why OpenSSL.** Real NBD clients (qemu's `tls-creds-psk`, libnbd's `tls-psk-file`,
//! nbdkit's `--tls-psk`) authenticate with *external* pre-shared keys in GnuTLS's
//! `psktool` format (`identity:hexkey` lines), in TLS 1.3 and 1.2. rustls has no external
//! PSK at all; OpenSSL (the `openssl` crate over Debian's libssl3) has it for both
//! versions, and x509 with client-certificate verification as well, so one library
//! serves every client.
//!
//! **How it fits the I/O threads.** The handshake thread runs the TLS handshake with
//! blocking reads and writes ([`TlsSession::handshake`], under the NBD handshake's one
//! deadline). After `NBD_OPT_GO` it stays on as the connection's *relay* ([`relay`]):
//! the I/O thread gets one end of a Unix socket pair and serves it exactly like a
//! plaintext client (same ring, same limits, same deadlines), while the relay moves
//! bytes between that pair and the client's socket, decrypting and encrypting with
//! OpenSSL over an in-memory stream ([`MemIo`]: ciphertext in, ciphertext out) so that
//! no OpenSSL call ever blocks. It waits in `poll(2)` on both sockets and ends when
//! either side closes: the I/O thread closing its end (detach, a deadline, a protocol
//! violation, shutdown) closes the client's connection, and the client closing (or a
//! TLS error: bad record, bad MAC, an alert) closes the I/O thread's end. This costs a
//! thread and a copy per byte each way; putting OpenSSL into the ring's loop (or kTLS,
//! which the kernels here lack) would save them, and is future work.
//!
//! **Bounds**: the ciphertext input buffer is [`TLS_IN_BYTES`]; at most [`TLS_OUT_BYTES`]
//! of ciphertext waits for the client; the relay's plaintext buffer is
//! [`RELAY_PLAIN_BYTES`]. A client that stops reading stops the relay reading the I/O
//! thread's end, whose send then stalls and meets the connection's send deadline; a
//! client that sends faster than the I/O thread reads meets back-pressure. The relay's
//! memory ([`TLS_CONN_BYTES`]) is taken from the server's memory budget before the
//! connection starts (refused when the budget is spent). Renegotiation, session tickets
//! and the session cache are off: every connection runs a full handshake, so a revoked
//! key is refused at once.
//!
//! **Keys.** A [`PskTable`] maps identities to keys (`Zeroizing`, never logged, never
//! `Debug`). `emberd export --tls-psk FILE` fills it from a psktool file; `emberd
//! serve` adds one identity per NBD attachment and removes it at detach. The identity a
//! client authenticated with is the [`TlsSession::identity`] the export access check
//! ([`super::Access`]) compares.

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};
use zeroize::Zeroizing;

/// Ciphertext buffered per connection before OpenSSL reads it.
pub const TLS_IN_BYTES: usize = 64 * 1024;
/// Ciphertext encrypted ahead of the client's socket per connection.
pub const TLS_OUT_BYTES: usize = 256 * 1024;
/// Plaintext the relay holds each way (decrypted for the I/O thread; read from it to
/// encrypt).
pub const RELAY_PLAIN_BYTES: usize = 64 * 1024;
/// Plaintext handed to one `SSL_write`: whole records, so each call ends on a record.
const WRITE_CHUNK_BYTES: usize = 16 * 1024;
/// How long a relay keeps sending the last replies after the I/O thread closed.
const CLOSE_GRACE_MS: libc::c_int = 5000;
/// Most bytes one `SSL_write` of [`WRITE_CHUNK_BYTES`] adds to the output (a record's
/// header, tag and content type, with room to spare).
const RECORD_OVERHEAD_BYTES: usize = 64;
/// OpenSSL's own buffers and state for one session (a record each way, keys, the
/// handshake's transcript), an upper estimate.
pub const TLS_STATE_BYTES: usize = 96 * 1024;
/// What one TLS connection holds beyond a plaintext one: the input buffer, the output
/// being built and the one being sent (each at most [`TLS_OUT_BYTES`] plus a record),
/// the relay's two plaintext buffers and OpenSSL's state. Taken from the memory budget
/// at the connection's start.
pub const TLS_CONN_BYTES: usize = TLS_IN_BYTES
    + 2 * (TLS_OUT_BYTES + WRITE_CHUNK_BYTES + RECORD_OVERHEAD_BYTES)
    + 2 * RELAY_PLAIN_BYTES
    + TLS_STATE_BYTES;
/// Longest PSK identity accepted (GnuTLS allows 65535; real ones are short).
pub const MAX_IDENTITY_BYTES: usize = 255;
/// Longest PSK accepted, in bytes (OpenSSL's `PSK_MAX_PSK_LEN`).
pub const MAX_PSK_BYTES: usize = 256;

/// When a listener offers or demands TLS (nbdkit's and qemu-nbd's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// Clients may upgrade with `NBD_OPT_STARTTLS`, or stay in plaintext.
    On,
    /// Every option but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD`
    /// until the client upgraded (the protocol's FORCEDTLS mode).
    Require,
}

/// A TLS set-up error (bad credentials, a file that does not parse).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A psktool file line is malformed (the line number; the line is never shown).
    #[error("{path}, line {line}: {why} (expected identity:hexkey)")]
    PskLine {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// OpenSSL refused the configuration.
    #[error("{what}")]
    OpenSsl {
        /// What was being set up.
        what: String,
        /// OpenSSL's error queue.
        #[source]
        source: ErrorStack,
    },
    /// A PSK table with no keys.
    #[error("{0} holds no PSK")]
    NoKeys(String),
}

fn ossl(what: impl Into<String>) -> impl FnOnce(ErrorStack) -> TlsError {
    let what = what.into();
    move |source| TlsError::OpenSsl { what, source }
}

/// Pre-shared keys by identity. Shared by a listener's [`TlsServer`] and whoever adds
/// and revokes keys while it runs (`emberd serve`'s attachments).
#[derive(Default)]
pub struct PskTable {
    keys: RwLock<HashMap<String, Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for PskTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.keys.read().map(|k| k.len()).unwrap_or(0);
        write!(f, "PskTable({n} keys, <redacted>)")
    }
}

impl PskTable {
    /// Parse a GnuTLS `psktool` file: `identity:hexkey` per line; blank lines and `#`
    /// comments are skipped. `path` names the file in errors (which never quote a line).
    pub fn parse(path: &str, text: &str) -> Result<PskTable, TlsError> {
        let t = PskTable::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why| TlsError::PskLine {
                path: path.to_string(),
                line: i + 1,
                why,
            };
            let (id, hexkey) = line.rsplit_once(':').ok_or_else(|| bad("no ':'"))?;
            if id.is_empty() || id.len() > MAX_IDENTITY_BYTES {
                return Err(bad("identity empty or longer than 255 bytes"));
            }
            let key = Zeroizing::new(hex::decode(hexkey).map_err(|_| bad("key is not hex"))?);
            if key.is_empty() || key.len() > MAX_PSK_BYTES {
                return Err(bad("key empty or longer than 256 bytes"));
            }
            t.insert(id, key);
        }
        Ok(t)
    }

    /// Read and parse a psktool file.
    pub fn load(path: &Path) -> Result<PskTable, TlsError> {
        let shown = path.display().to_string();
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                    path: shown.clone(),
                    source,
                })?,
            );
        let t = Self::parse(&shown, &text)?;
        if t.is_empty() {
            return Err(TlsError::NoKeys(shown));
        }
        Ok(t)
    }

    /// Add (or replace) a key.
    pub fn insert(&self, identity: &str, key: Zeroizing<Vec<u8>>) {
        if let Ok(mut k) = self.keys.write() {
            k.insert(identity.to_string(), key);
        }
    }

    /// Revoke a key: new handshakes with it fail (connections made with it are closed by
    /// whoever revokes, e.g. by removing the export).
    pub fn remove(&self, identity: &str) -> bool {
        self.keys
            .write()
            .map(|mut k| k.remove(identity).is_some())
            .unwrap_or(false)
    }

    /// No keys at all.
    pub fn is_empty(&self) -> bool {
        self.keys.read().map(|k| k.is_empty()).unwrap_or(true)
    }

    /// Copy `identity`'s key into `out`; its length, or 0 (unknown identity or too long).
    fn copy_key(&self, identity: &[u8], out: &mut [u8]) -> usize {
        let Ok(id) = std::str::from_utf8(identity) else {
            return 0;
        };
        let Ok(keys) = self.keys.read() else { return 0 };
        match keys.get(id) {
            Some(k) if k.len() <= out.len() => {
                out[..k.len()].copy_from_slice(k);
                k.len()
            }
            _ => 0,
        }
    }
}

/// The PSK identity the server callback accepted, kept on the session.
fn identity_index() -> Option<openssl::ex_data::Index<Ssl, String>> {
    static INDEX: OnceLock<Option<openssl::ex_data::Index<Ssl, String>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index::<String>().ok())
}

/// A listener's TLS credentials: an OpenSSL server context (PSK, x509, or both).
pub struct TlsServer {
    ctx: SslContext,
    psk: Option<Arc<PskTable>>,
    x509: bool,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("psk", &self.psk.is_some())
            .field("x509", &self.x509)
            .finish()
    }
}

/// x509 credentials in qemu's directory layout.
#[derive(Debug, Clone)]
pub struct X509Creds {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (qemu's `tls-creds-x509` dir).
    pub dir: std::path::PathBuf,
    /// Demand a client certificate signed by `ca-cert.pem` (qemu's `verify-peer=on`).
    pub verify_peer: bool,
}

impl TlsServer {
    /// A server with `psk` keys and/or `x509` credentials (at least one).
    pub fn new(psk: Option<Arc<PskTable>>, x509: Option<&X509Creds>) -> Result<Self, TlsError> {
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ossl("TLS context"))?;
        // NBD requires TLS 1.2 at least (the protocol's "TLS versions" section).
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ossl("TLS versions"))?;
        b.set_options(
            SslOptions::NO_RENEGOTIATION
                | SslOptions::NO_TICKET
                | SslOptions::CIPHER_SERVER_PREFERENCE
                | SslOptions::NO_COMPRESSION,
        );
        b.set_session_cache_mode(SslSessionCacheMode::OFF);
        b.set_num_tickets(0).map_err(ossl("TLS tickets"))?;
        // TLS 1.3: AES-GCM first (AES-NI); with PSK OpenSSL can only use SHA-256 suites,
        // so this picks AES-128-GCM rather than ChaCha20.
        b.set_ciphersuites(
            "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        )
        .map_err(ossl("TLS 1.3 cipher suites"))?;
        // Idle sessions give their record buffers back.
        b.set_mode(SslMode::RELEASE_BUFFERS);
        if let Some(x) = x509 {
            let f = |n: &str| x.dir.join(n);
            b.set_certificate_chain_file(f("server-cert.pem"))
                .map_err(ossl(format!(
                    "server certificate {}",
                    f("server-cert.pem").display()
                )))?;
            b.set_private_key_file(f("server-key.pem"), SslFiletype::PEM)
                .map_err(ossl(format!(
                    "server key {}",
                    f("server-key.pem").display()
                )))?;
            b.check_private_key()
                .map_err(ossl("the server key does not match its certificate"))?;
            if x.verify_peer {
                b.set_ca_file(f("ca-cert.pem")).map_err(ossl(format!(
                    "CA certificate {}",
                    f("ca-cert.pem").display()
                )))?;
                b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            } else {
                b.set_verify(SslVerifyMode::NONE);
            }
        }
        if let Some(table) = &psk {
            // TLS 1.2 PSK suites (with and without ephemeral DH) next to the defaults;
            // TLS 1.3 PSK uses the normal suites.
            b.set_cipher_list("DEFAULT:ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL")
                .map_err(ossl("TLS cipher list"))?;
            let t = table.clone();
            b.set_psk_server_callback(move |ssl, identity, out| {
                let Some(id) = identity else { return Ok(0) };
                let n = t.copy_key(id, out);
                if n > 0 {
                    if let (Some(ix), Ok(s)) = (identity_index(), std::str::from_utf8(id)) {
                        ssl.set_ex_data(ix, s.to_string());
                    }
                }
                Ok(n)
            });
        }
        Ok(TlsServer {
            ctx: b.build(),
            psk,
            x509: x509.is_some(),
        })
    }

    /// The keys, if this server takes PSKs.
    pub fn psk_table(&self) -> Option<&Arc<PskTable>> {
        self.psk.as_ref()
    }

    /// A new server-side session over an empty in-memory stream.
    pub fn session(&self) -> io::Result<TlsSession> {
        let ssl = Ssl::new(&self.ctx).map_err(io::Error::other)?;
        let s = SslStream::new(ssl, MemIo::new()).map_err(io::Error::other)?;
        Ok(TlsSession { s })
    }
}

/// The in-memory stream under a session: ciphertext in (filled from the client's socket)
/// and out (drained to it).
pub struct MemIo {
    inb: Box<[u8]>,
    start: usize,
    end: usize,
    out: Vec<u8>,
}

impl MemIo {
    fn new() -> MemIo {
        MemIo {
            inb: vec![0u8; TLS_IN_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            out: Vec::new(),
        }
    }

    /// Room at the end of the input, compacting first.
    fn room(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.inb.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.inb[self.end..]
    }
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.inb[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a decrypting read got.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsRead {
    /// Plaintext bytes.
    Data(usize),
    /// No complete record buffered: receive more ciphertext.
    WantRead,
    /// The client closed the TLS session (`close_notify`).
    Closed,
}

/// One server-side TLS session over [`MemIo`].
pub struct TlsSession {
    s: SslStream<MemIo>,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSession(..)")
    }
}

fn tls_err(e: openssl::ssl::Error) -> io::Error {
    // A protocol failure (bad record, bad MAC, an alert from the client) is the
    // client's fault: say what OpenSSL said, as invalid data.
    let msg = match e.ssl_error() {
        Some(stack) => format!("TLS: {stack}"),
        None => format!("TLS: {e}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl TlsSession {
    /// Run the TLS handshake over a blocking socket (the caller's deadline applies to
    /// each read and write). Ciphertext the client sent beyond the handshake stays
    /// buffered in the session.
    pub fn handshake<S: Read + Write>(&mut self, sock: &mut S) -> io::Result<()> {
        loop {
            match self.s.accept() {
                Ok(()) => return self.flush_to(sock),
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    self.flush_to(sock)?;
                    self.fill_from(sock)?;
                }
                Err(e) if e.code() == ErrorCode::WANT_WRITE => self.flush_to(sock)?,
                Err(e) => {
                    // Let the client see the alert OpenSSL queued, if any.
                    let _ = self.flush_to(sock);
                    return Err(tls_err(e));
                }
            }
        }
    }

    /// Write what OpenSSL produced to a blocking socket.
    fn flush_to<S: Write>(&mut self, sock: &mut S) -> io::Result<()> {
        let out = std::mem::take(&mut self.s.get_mut().out);
        sock.write_all(&out)?;
        sock.flush()
    }

    /// Free room in the ciphertext input.
    fn in_room(&self) -> usize {
        let io = self.s.get_ref();
        io.inb.len() - (io.end - io.start)
    }

    /// Read what the socket has (at least a byte, when blocking) into the input buffer.
    fn fill_from<S: Read>(&mut self, sock: &mut S) -> io::Result<()> {
        let room = self.s.get_mut().room();
        if room.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS input buffer full",
            ));
        }
        let n = sock.read(room)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.s.get_mut().end += n;
        Ok(())
    }

    /// The PSK identity the client authenticated with (PSK handshakes only).
    pub fn identity(&self) -> Option<String> {
        identity_index().and_then(|ix| self.s.ssl().ex_data(ix).cloned())
    }

    /// The negotiated protocol version and cipher, for the logs.
    pub fn describe(&self) -> String {
        let ssl = self.s.ssl();
        let cipher = ssl.current_cipher().map(|c| c.name()).unwrap_or("?");
        format!("{} {cipher}", ssl.version_str())
    }

    /// Decrypt into `buf` from what is buffered.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<TlsRead> {
        match self.s.ssl_read(buf) {
            Ok(0) => Ok(TlsRead::WantRead),
            Ok(n) => Ok(TlsRead::Data(n)),
            Err(e) if e.code() == ErrorCode::WANT_READ => Ok(TlsRead::WantRead),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(TlsRead::Closed),
            Err(e) => Err(tls_err(e)),
        }
    }

    /// Encrypt all of `buf` into the output (in whole records). The caller bounds how
    /// much it hands over ([`TlsSession::out_room`]).
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let end = (done + WRITE_CHUNK_BYTES).min(buf.len());
            match self.s.ssl_write(&buf[done..end]) {
                Ok(n) if n > 0 => done += n,
                Ok(_) => return Err(io::Error::other("TLS write made no progress")),
                Err(e) => return Err(tls_err(e)),
            }
        }
        Ok(())
    }

    /// Plaintext bytes that may still be encrypted before the output is full.
    pub fn out_room(&self) -> usize {
        let used = self.s.get_ref().out.len();
        let records = TLS_OUT_BYTES.saturating_sub(used) / WRITE_CHUNK_BYTES + 1;
        TLS_OUT_BYTES
            .saturating_sub(used)
            .saturating_sub(records * RECORD_OVERHEAD_BYTES)
    }

    /// Ciphertext waiting to be sent.
    pub fn out_len(&self) -> usize {
        self.s.get_ref().out.len()
    }

    /// Swap the output with `v` (empty): the caller sends what it got.
    pub fn take_out(&mut self, v: &mut Vec<u8>) {
        std::mem::swap(&mut self.s.get_mut().out, v);
    }

    /// Queue a `close_notify` alert (the TLS end of a soft disconnect).
    pub fn close_notify(&mut self) {
        let _ = self.s.shutdown();
    }

    /// Ciphertext buffered and not yet read by OpenSSL.
    pub fn buffered(&self) -> usize {
        let io = self.s.get_ref();
        io.end - io.start
    }
}

/// How a relay ended (for the logs).
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client closed its connection or its TLS session.
    Client,
    /// The I/O thread closed its end (detach, a deadline, a violation, shutdown).
    Server,
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Relay one TLS connection: ciphertext on `client` (the socket the handshake ran on),
/// plaintext on `server` (the I/O thread's socket pair end). Returns when either side
/// closes; `Err` for a TLS or socket error (the caller logs it). Both sockets are closed
/// on return.
pub fn relay(client: OwnedFd, server: OwnedFd, mut tls: TlsSession) -> io::Result<RelayEnd> {
    socket2::SockRef::from(&client).set_nonblocking(true)?;
    socket2::SockRef::from(&server).set_nonblocking(true)?;
    let mut net = std::fs::File::from(client);
    let mut loc = std::fs::File::from(server);
    // Decrypted, waiting for the I/O thread: dec[ds..de].
    let mut dec = vec![0u8; RELAY_PLAIN_BYTES];
    let (mut ds, mut de) = (0usize, 0usize);
    // Read from the I/O thread, to encrypt.
    let mut plain = vec![0u8; RELAY_PLAIN_BYTES];
    // Ciphertext being sent: wire[wpos..].
    let mut wire: Vec<u8> = Vec::new();
    let mut wpos = 0usize;
    let mut net_eof = false;
    let mut loc_eof = false;
    loop {
        // Decrypt what is buffered while there is room for the plaintext.
        while !net_eof {
            if de == dec.len() {
                if ds == 0 {
                    break;
                }
                dec.copy_within(ds..de, 0);
                de -= ds;
                ds = 0;
            }
            match tls.read(&mut dec[de..])? {
                TlsRead::Data(n) => de += n,
                TlsRead::WantRead => break,
                TlsRead::Closed => net_eof = true,
            }
        }
        // Hand it to the I/O thread.
        while ds < de {
            match loc.write(&dec[ds..de]) {
                Ok(0) => return Ok(RelayEnd::Server),
                Ok(n) => ds += n,
                Err(e) if would_block(&e) => break,
                Err(_) => return Ok(RelayEnd::Server),
            }
        }
        if ds == de {
            (ds, de) = (0, 0);
        }
        // Encrypt the I/O thread's replies while the output has room.
        while !loc_eof && wire.len() - wpos + tls.out_len() < TLS_OUT_BYTES {
            let room = tls.out_room().min(plain.len());
            if room == 0 {
                break;
            }
            match loc.read(&mut plain[..room]) {
                Ok(0) => loc_eof = true,
                Ok(n) => tls.write(&plain[..n])?,
                Err(e) if would_block(&e) => break,
                Err(_) => loc_eof = true,
            }
        }
        if loc_eof {
            tls.close_notify();
        }
        // Send the ciphertext.
        loop {
            if wpos == wire.len() {
                wire.clear();
                wpos = 0;
                if tls.out_len() == 0 {
                    break;
                }
                tls.take_out(&mut wire);
            }
            match net.write(&wire[wpos..]) {
                Ok(0) => return Ok(RelayEnd::Client),
                Ok(n) => wpos += n,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        let unsent = wire.len() - wpos + tls.out_len();
        if loc_eof {
            // The server side is done: finish sending (best effort) and close.
            if unsent == 0 || net_eof {
                return Ok(RelayEnd::Server);
            }
        } else if net_eof && ds == de {
            return Ok(RelayEnd::Client);
        }
        let mut fds = [
            libc::pollfd {
                fd: net.as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: loc.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        if !net_eof && tls.in_room() > 0 && de < dec.len() {
            fds[0].events |= libc::POLLIN;
        }
        if unsent > 0 {
            fds[0].events |= libc::POLLOUT;
        }
        if !loc_eof && unsent < TLS_OUT_BYTES {
            fds[1].events |= libc::POLLIN;
        }
        if ds < de {
            fds[1].events |= libc::POLLOUT;
        }
        // Once the I/O thread is gone nothing else bounds the wait: give the client a
        // little time to take the last replies.
        let timeout = if loc_eof { CLOSE_GRACE_MS } else { -1 };
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration; the fds
        // are owned by `net` and `loc`, alive until this function returns.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if would_block(&e) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(RelayEnd::Server);
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Ok(RelayEnd::Server);
        }
        if fds[1].revents & libc::POLLHUP != 0 && fds[1].revents & libc::POLLIN == 0 {
            loc_eof = true;
        }
        let nrev = fds[0].revents;
        if nrev & libc::POLLNVAL != 0 {
            return Ok(RelayEnd::Client);
        }
        if nrev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !net_eof {
            if fds[0].events & libc::POLLIN == 0 {
                // Not reading (buffers full), yet the client hung up or failed.
                return Ok(RelayEnd::Client);
            }
            match tls.fill_from(&mut net) {
                Ok(()) => {}
                Err(e) if would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => net_eof = true,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A handshake's stream after `STARTTLS`: options and replies go through the session,
/// whose ciphertext goes over the blocking socket.
pub struct TlsChannel<'a, S> {
    /// The socket (with the handshake's deadline).
    pub sock: &'a mut S,
    /// The session.
    pub tls: TlsSession,
}

impl<S: Read + Write> Read for TlsChannel<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.tls.read(buf)? {
                TlsRead::Data(n) => return Ok(n),
                TlsRead::Closed => return Ok(0),
                TlsRead::WantRead => {
                    self.tls.flush_to(self.sock)?;
                    self.tls.fill_from(self.sock)?;
                }
            }
        }
    }
}

impl<S: Read + Write> Write for TlsChannel<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tls.write(buf)?;
        self.tls.flush_to(self.sock)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tls.flush_to(self.sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psktool_files_parse_and_errors_never_show_keys() {
        let t = PskTable::parse(
            "f",
            "# comment\n\nalice:00112233445566778899aabbccddeeff\nbob:0a0b\n",
        )
        .unwrap();
        let mut out = [0u8; 64];
        assert_eq!(t.copy_key(b"alice", &mut out), 16);
        assert_eq!(&out[..2], &[0x00, 0x11]);
        assert_eq!(t.copy_key(b"bob", &mut out), 2);
        assert_eq!(t.copy_key(b"carol", &mut out), 0);
        assert!(t.remove("bob"));
        assert_eq!(t.copy_key(b"bob", &mut out), 0);
        for bad in ["nocolon", ":00", "x:zz", "x:", "x:abc"] {
            let e = PskTable::parse("f", bad).err().unwrap().to_string();
            assert!(e.contains("line 1"), "{e}");
            assert!(!e.contains(bad) || bad.len() < 3, "{e}");
        }
        assert!(format!("{t:?}").contains("redacted"));
    }
}
