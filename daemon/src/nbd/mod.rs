//! NBD server: named exports over TCP and Unix sockets.
//!
//! ```text
//!  listener thread (per socket) ──accept──▶ handshake thread (blocking, per connection)
//!        │ gate: handshakes in all / per peer        │ one deadline; NBD_OPT_GO → gate:
//!        │ (over: closed before the greeting)         │ connections, memory (over: ERR_POLICY)
//!                                                     ▼ round-robin, channel + eventfd wake-up
//!  I/O thread 0..N: one io_uring each ── recv ▶ parse ▶ device queue ▶ sendmsg replies
//!                                        (charged to the connection's memory; tick: deadlines)
//!  TLS: client ══ciphertext══ relay (the handshake thread) ══plaintext══ socket pair ─▶ I/O
//! ```
//!
//! - [`proto`]: the wire format, pure encode/decode.
//! - [`request`]: what to do with a request, from its header alone; the stream's framing.
//!   Pure.
//! - [`handshake`]: option haggling on a blocking socket; it runs once per connection and
//!   is not on the I/O path, so plain blocking I/O keeps it simple.
//! - [`worker`]: the I/O threads. Each owns a [`Ring`](ember_blockdev::Ring), a per-export
//!   device [`Queue`](ember_blockdev::Queue) and its connections; nothing on the I/O path is
//!   shared or locked but the memory budget's counter. Socket I/O goes through the same
//!   ring as the disk I/O, so one `io_uring_enter` per loop iteration submits receives,
//!   disk requests and replies.
//! - [`conn`]: one connection's transmission phase: receive buffer, request parsing,
//!   in-flight table, reply batching, its memory charge and deadlines.
//! - [`gate`]: admission (handshakes and connections, in all and per peer) and the memory
//!   budget; [`limits`]: the flags that set them and their defaults.
//! - [`tls`]: `NBD_OPT_STARTTLS` (PSK and x509 on OpenSSL) and the relay a TLS
//!   connection runs through; [`Access`] says which clients (PSK identity, Unix uid/gid)
//!   may see and open an export, checked at every handshake option that names one.
//!
//! Hostile clients (docs/threat-model.md §2): everything a client can make the server
//! hold is bounded — handshakes (count, per-peer count, one deadline, options), connections
//! (count, per-peer count), memory (per connection and in all, back-pressure beyond), and
//! time (a client that stops reading its replies or stops halfway through a request is
//! dropped). The [`limits`] module lists every bound and its default. A client beyond a
//! bound loses its own connection (logged with the reason), never anyone else's.
//!
//! The export registry (name → device) is read only at handshake time; [`NbdServer`] can
//! add and remove exports while it runs. Removing an export closes its connections (and
//! so, with TLS, their relays and client sockets).

pub mod conn;
pub mod gate;
pub mod handshake;
pub mod limits;
pub mod proto;
pub mod request;
#[cfg(test)]
pub(crate) mod testgen;
pub mod tls;
pub mod worker;

pub use limits::{NbdLimitArgs, NbdLimits};
pub use tls::{PskTable, TlsMode, TlsServer, X509Creds};

use anyhow::Context;
use ember_blockdev::BlockDevice;
use gate::{Gate, HandshakeSlot, LogLimiter, Peer};
use socket2::SockRef;
use std::collections::HashMap;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest request the server accepts (and advertises as maximum block size).
pub const MAX_BLOCK_BYTES: u32 = 32 << 20;
/// How often blocked accept loops look at the stop flag.
const ACCEPT_POLL_MS: i32 = 200;
/// Idle buffers an I/O thread keeps at most (less when the budget is small): twice a
/// QD8 stream of 1 MiB requests, so a connection's working set stays pooled with room for
/// another size class.
const POOL_MAX_BYTES: usize = 16 << 20;
/// Clients turned away before their handshake are logged at most this often.
static REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(5));

/// One export: a named device.
#[derive(Debug)]
pub struct Export {
    /// Unique id (names can be reused after removal).
    pub id: u64,
    /// Export name.
    pub name: String,
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device accepts them.
    pub read_only: bool,
    /// Who may see and use it.
    pub access: Access,
}

/// Who a client proved to be during its handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAuth {
    /// A Unix-socket peer's uid and gid (`SO_PEERCRED`).
    pub unix: Option<(u32, u32)>,
    /// The client completed a TLS handshake (x509 verified, or a known PSK).
    pub tls: bool,
    /// The PSK identity it authenticated with.
    pub psk_identity: Option<String>,
}

/// Which clients may list and open an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every client the listener let through (its TLS mode decides): `emberd export`.
    Any,
    /// One attachment's clients (`emberd serve`): whoever authenticated with its PSK
    /// identity, or a Unix-socket peer with its uid and gid (each when given; at least
    /// one must be). Nobody else.
    Attachment {
        /// The attachment's PSK identity.
        psk_identity: Option<String>,
        /// Unix-socket peers with this uid…
        uid: Option<u32>,
        /// …and this gid.
        gid: Option<u32>,
    },
}

impl Access {
    /// May `c` see and use the export?
    pub fn allows(&self, c: &ClientAuth) -> bool {
        match self {
            Access::Any => true,
            Access::Attachment {
                psk_identity,
                uid,
                gid,
            } => {
                if c.tls && psk_identity.is_some() && c.psk_identity == *psk_identity {
                    return true;
                }
                match c.unix {
                    Some((cu, cg)) => {
                        (uid.is_some() || gid.is_some())
                            && uid.is_none_or(|u| u == cu)
                            && gid.is_none_or(|g| g == cg)
                    }
                    None => false,
                }
            }
        }
    }
}

impl Export {
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.dev.info().read_only
    }

    /// Largest request, in bytes.
    pub fn max_block(&self) -> u32 {
        self.dev.info().max_transfer.clamp(4096, MAX_BLOCK_BYTES)
    }

    /// Transmission flags for a connection with or without structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        use proto::tx;
        let info = self.dev.info();
        let mut f = tx::HAS_FLAGS | tx::SEND_FLUSH | tx::SEND_CACHE | tx::CAN_MULTI_CONN;
        if structured {
            f |= tx::SEND_DF;
        }
        if self.is_read_only() {
            f |= tx::READ_ONLY;
        } else {
            f |= tx::SEND_FUA | tx::SEND_WRITE_ZEROES | tx::SEND_FAST_ZERO;
            if info.discard {
                f |= tx::SEND_TRIM;
            }
        }
        f
    }
}

/// Name → export. Read at handshake time only.
#[derive(Debug, Default)]
pub struct Registry {
    exports: RwLock<HashMap<String, Arc<Export>>>,
}

impl Registry {
    /// Add an export; false if its name is taken.
    pub fn insert(&self, e: Export) -> bool {
        let Ok(mut m) = self.exports.write() else {
            return false;
        };
        if m.contains_key(&e.name) {
            return false;
        }
        m.insert(e.name.clone(), Arc::new(e));
        true
    }

    /// Look an export up.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.read().ok()?.get(name).cloned()
    }

    /// Look an export up for client `c`: `None` when it does not exist or `c` may not
    /// use it (the client cannot tell which).
    pub fn get_for(&self, name: &str, c: &ClientAuth) -> Option<Arc<Export>> {
        self.get(name).filter(|e| e.access.allows(c))
    }

    /// Names of the exports client `c` may use, sorted.
    pub fn names_for(&self, c: &ClientAuth) -> Vec<String> {
        let mut v: Vec<String> = self
            .exports
            .read()
            .map(|m| {
                m.values()
                    .filter(|e| e.access.allows(c))
                    .map(|e| e.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .exports
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Where to listen: `unix:PATH` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(String),
}

impl std::str::FromStr for ListenAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            anyhow::ensure!(!p.is_empty(), "{s:?}: unix: needs a socket path");
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .with_context(|| format!("{s:?}: expected unix:PATH or HOST:PORT"))?;
        anyhow::ensure!(
            port.parse::<u16>().is_ok(),
            "{s:?}: {port:?} is not a port number"
        );
        anyhow::ensure!(!host.is_empty(), "{s:?}: missing host");
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

/// A running NBD server: I/O threads, listeners and the export registry.
pub struct NbdServer {
    registry: Arc<Registry>,
    workers: Arc<Vec<worker::WorkerHandle>>,
    next_worker: Arc<AtomicUsize>,
    next_export_id: AtomicU64,
    gate: Arc<Gate>,
    stop: Arc<AtomicBool>,
    listeners: Mutex<Vec<(JoinHandle<()>, Option<PathBuf>)>>,
    joins: Vec<JoinHandle<()>>,
}

impl NbdServer {
    /// Start `threads` I/O threads (at least one) under `limits`. The memory budget is
    /// split here (see [`gate`]): each thread's idle buffers, every connection's floor,
    /// and a shared rest of at least one maximum-size request, or this fails.
    pub fn start(threads: usize, limits: NbdLimits) -> anyhow::Result<NbdServer> {
        let threads = threads.max(1);
        let pool_bytes = (limits.memory_bytes / 8 / threads).min(POOL_MAX_BYTES);
        let stall = limits.stall_timeout;
        let gate = Arc::new(Gate::new(limits, pool_bytes * threads)?);
        let mut workers = Vec::new();
        let mut joins = Vec::new();
        for i in 0..threads {
            let (h, j) = worker::spawn(i, pool_bytes, stall)
                .with_context(|| format!("start NBD I/O thread {i}"))?;
            workers.push(h);
            joins.push(j);
        }
        Ok(NbdServer {
            registry: Arc::new(Registry::default()),
            workers: Arc::new(workers),
            next_worker: Arc::new(AtomicUsize::new(0)),
            next_export_id: AtomicU64::new(1),
            gate,
            stop: Arc::new(AtomicBool::new(false)),
            listeners: Mutex::new(Vec::new()),
            joins,
        })
    }

    /// The limits the server runs under.
    pub fn limits(&self) -> &NbdLimits {
        self.gate.limits()
    }

    /// Bytes of the memory budget taken now (idle pools, connection floors and charges).
    pub fn memory_used(&self) -> usize {
        self.gate.budget().used()
    }

    /// Connections open (after their handshake).
    pub fn connections(&self) -> usize {
        self.gate.conns()
    }

    /// Handshakes in progress.
    pub fn handshakes(&self) -> usize {
        self.gate.handshakes()
    }

    /// Serve an already negotiated connection on export `name`, as if its handshake had
    /// just chosen it (for in-process tests and the fuzz targets): the same admission and
    /// memory limits apply, with `peer` as its peer.
    pub fn adopt(
        &self,
        fd: OwnedFd,
        name: &str,
        structured: bool,
        meta: bool,
        peer: Peer,
    ) -> anyhow::Result<()> {
        let export = self
            .registry
            .get(name)
            .with_context(|| format!("no export named {name:?}"))?;
        let slot = self.gate.admit(&peer).map_err(|r| anyhow::anyhow!("{r}"))?;
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len().max(1);
        let w = self.workers.get(i).context("no I/O thread")?;
        w.send(worker::Ctl::NewConn(conn::ConnSetup {
            fd,
            peer: peer.to_string(),
            export,
            structured,
            meta,
            slot,
        }));
        Ok(())
    }

    /// Add an export any client may use. Fails if the name is taken.
    pub fn add_export(
        &self,
        name: &str,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> anyhow::Result<()> {
        self.add_export_with(name, dev, read_only, Access::Any)
    }

    /// Add an export for the clients `access` names. Fails if the name is taken.
    pub fn add_export_with(
        &self,
        name: &str,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
        access: Access,
    ) -> anyhow::Result<()> {
        let id = self.next_export_id.fetch_add(1, Ordering::Relaxed);
        anyhow::ensure!(
            self.registry.insert(Export {
                id,
                name: name.to_string(),
                dev,
                read_only,
                access,
            }),
            "export {name:?} already exists"
        );
        Ok(())
    }

    /// Remove an export and close its connections. Returns whether it existed.
    #[allow(dead_code)] // for `emberd serve`
    pub fn remove_export(&self, name: &str) -> bool {
        let removed = self
            .registry
            .exports
            .write()
            .ok()
            .and_then(|mut m| m.remove(name));
        match removed {
            Some(e) => {
                for w in self.workers.iter() {
                    w.send(worker::Ctl::RemoveExport(e.id));
                }
                true
            }
            None => false,
        }
    }

    /// Names of the current exports.
    #[allow(dead_code)] // for `emberd serve`
    pub fn export_names(&self) -> Vec<String> {
        self.registry.names()
    }

    /// Listen on `addr` without TLS (in a background thread). Returns the bound address
    /// for TCP (useful with port 0) or the socket path.
    pub fn listen(&self, addr: &ListenAddr) -> anyhow::Result<String> {
        self.listen_tls(addr, TlsMode::Off, None)
    }

    /// Listen on `addr` with TLS `mode` and credentials `tls` (needed unless `mode` is
    /// off).
    pub fn listen_tls(
        &self,
        addr: &ListenAddr,
        mode: TlsMode,
        tls: Option<Arc<TlsServer>>,
    ) -> anyhow::Result<String> {
        anyhow::ensure!(
            mode == TlsMode::Off || tls.is_some(),
            "TLS mode {mode:?} needs credentials"
        );
        let ctx = Acceptor {
            registry: self.registry.clone(),
            workers: self.workers.clone(),
            next_worker: self.next_worker.clone(),
            stop: self.stop.clone(),
            gate: self.gate.clone(),
            tls: if mode == TlsMode::Off { None } else { tls },
            mode,
        };
        let (join, path, bound) = match addr {
            ListenAddr::Unix(path) => {
                remove_stale_socket(path);
                let l = UnixListener::bind(path)
                    .with_context(|| format!("listen on unix:{}", path.display()))?;
                let bound = format!("unix:{}", path.display());
                let j = std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || ctx.run(l))
                    .context("spawn accept thread")?;
                (j, Some(path.clone()), bound)
            }
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).with_context(|| format!("listen on {a}"))?;
                let bound = l.local_addr().map(|a| a.to_string()).unwrap_or(a.clone());
                let j = std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || ctx.run(l))
                    .context("spawn accept thread")?;
                (j, None, bound)
            }
        };
        if let Ok(mut ls) = self.listeners.lock() {
            ls.push((join, path));
        }
        Ok(bound)
    }

    /// Stop listening (removing Unix sockets), close every connection once its in-flight
    /// requests are done, and join all threads.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let listeners = self
            .listeners
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for (j, path) in listeners {
            let _ = j.join();
            if let Some(p) = path {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove socket");
                }
            }
        }
        for w in self.workers.iter() {
            w.send(worker::Ctl::Shutdown);
        }
        for j in self.joins.drain(..) {
            let _ = j.join();
        }
    }
}

/// Remove `path` if it is a Unix socket nobody listens on (left over by a crash).
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if is_socket && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// What an accept loop needs.
struct Acceptor {
    registry: Arc<Registry>,
    workers: Arc<Vec<worker::WorkerHandle>>,
    next_worker: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    /// The listener's TLS credentials (`None` when its mode is off).
    tls: Option<Arc<TlsServer>>,
    mode: TlsMode,
}

/// What a bounded wait on a listening socket saw.
enum Polled {
    /// A connection is waiting.
    Ready,
    /// The interval passed (or a signal came): look at the stop flag again.
    Idle,
    /// The listener is broken.
    Failed,
}

/// Wait until `fd` is readable or the poll interval passed.
fn poll_readable(fd: i32) -> Polled {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    match ember_blockdev::sys::poll(&mut p, ACCEPT_POLL_MS) {
        Ok(n) if n > 0 => Polled::Ready,
        Ok(_) => Polled::Idle,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Polled::Idle,
        Err(_) => Polled::Failed,
    }
}

impl Acceptor {
    /// Accept clients on `l` until the server stops; each gets a handshake thread.
    fn run<L: Listening>(self, l: L) {
        if let Err(e) = l.set_nonblocking(true) {
            tracing::error!(error = %e, "listener set-up failed");
            return;
        }
        while !self.stop.load(Ordering::SeqCst) {
            match poll_readable(l.as_raw_fd()) {
                Polled::Ready => {}
                Polled::Idle => continue,
                Polled::Failed => {
                    tracing::error!(error = %io::Error::last_os_error(), "listener failed");
                    break;
                }
            }
            match l.accept_client() {
                Ok((s, peer, name, unix)) => match self.gate.begin_handshake(peer) {
                    Ok(slot) => {
                        if s.prepare_handshake().is_ok() {
                            self.handshake(s, slot, name, unix);
                        }
                    }
                    Err(why) => {
                        // Closed before the greeting: the client sees EOF at once. Logged
                        // at most every few seconds (a flood must not flood the log).
                        if let Some(more) = REFUSED_LOG.check() {
                            tracing::warn!(peer = %name, suppressed = more, "dropping NBD client: {why}");
                        }
                    }
                },
                Err(e) => self.accept_error(e),
            }
        }
    }

    fn accept_error(&self, e: io::Error) {
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
            tracing::warn!(error = %e, "accept failed");
            // Out of fds and similar: do not spin.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run the handshake on its own thread (holding `slot`), then hand the socket to an
    /// I/O thread.
    fn handshake<S>(&self, mut s: S, slot: HandshakeSlot, peer: String, unix: Option<(u32, u32)>)
    where
        S: io::Read + io::Write + Into<OwnedFd> + Send + 'static,
        S: SetTimeouts,
    {
        let registry = self.registry.clone();
        let workers = self.workers.clone();
        let next = self.next_worker.clone();
        let gate = self.gate.clone();
        let tls = self.tls.clone();
        let mode = self.mode;
        let spawned = std::thread::Builder::new()
            .name("nbd-handshake".into())
            .spawn(move || {
                let limit = gate.limits().handshake_timeout;
                let who = slot.peer().clone();
                let policy = handshake::Policy {
                    mode,
                    tls: tls.as_deref(),
                    client: ClientAuth {
                        unix,
                        ..ClientAuth::default()
                    },
                };
                let r = handshake::negotiate_with(
                    &mut handshake::Deadline::new(&mut s, limit),
                    &registry,
                    &policy,
                    &mut |_| gate.admit(&who),
                );
                drop(slot);
                let n = match r {
                    Ok(Some(n)) => n,
                    Ok(None) => return tracing::debug!(%peer, "client ended the handshake"),
                    Err(e) => {
                        return tracing::info!(%peer, error = %e, "dropping NBD client: handshake failed");
                    }
                };
                s.clear_timeouts();
                // With TLS this thread stays on as the relay; the I/O thread serves one
                // end of a socket pair (see the tls module doc). Its memory comes out
                // of the budget first.
                let client: OwnedFd = s.into();
                type Relay = (OwnedFd, OwnedFd, Box<tls::TlsSession>, Charge);
                let (fd, relay): (OwnedFd, Option<Relay>) = match n.tls {
                    None => (client, None),
                    Some(session) => {
                        let Some(charge) = Charge::take(gate.budget(), tls::TLS_CONN_BYTES) else {
                            return tracing::warn!(%peer, "dropping NBD TLS client: memory budget spent");
                        };
                        match UnixStream::pair() {
                            Ok((a, b)) => (a.into(), Some((client, b.into(), session, charge))),
                            Err(e) => {
                                return tracing::warn!(%peer, error = %e, "dropping NBD TLS client: no socket pair");
                            }
                        }
                    }
                };
                let i = next.fetch_add(1, Ordering::Relaxed) % workers.len().max(1);
                tracing::debug!(%peer, export = %n.export.name, thread = i, tls = relay.is_some(), "client connected");
                // Hand over under the registry's read lock: an export removed meanwhile is
                // seen here, and one removed later sends its RemoveExport after this
                // NewConn, on the same channel.
                {
                    let Ok(exports) = registry.exports.read() else {
                        return;
                    };
                    if exports.get(&n.export.name).map(|e| e.id) != Some(n.export.id) {
                        tracing::info!(%peer, export = %n.export.name, "export removed during the handshake; dropping client");
                        return;
                    }
                    if let Some(w) = workers.get(i) {
                        w.send(worker::Ctl::NewConn(conn::ConnSetup {
                            fd,
                            peer: peer.clone(),
                            export: n.export,
                            structured: n.structured,
                            meta: n.meta_context,
                            slot: n.admission,
                        }));
                    }
                }
                if let Some((client, server, session, charge)) = relay {
                    match tls::relay(client, server, *session) {
                        Ok(end) => tracing::debug!(%peer, ?end, "TLS connection ended"),
                        Err(e) => tracing::info!(%peer, error = %e, "dropping NBD TLS client"),
                    }
                    drop(charge);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a handshake thread; dropping client");
        }
    }
}

/// Bytes taken from the memory budget, given back on drop.
struct Charge {
    budget: Arc<gate::Budget>,
    bytes: usize,
}

impl Charge {
    fn take(budget: &Arc<gate::Budget>, bytes: usize) -> Option<Charge> {
        budget.try_take(bytes, 0).then(|| Charge {
            budget: budget.clone(),
            bytes,
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// A client socket during and after the handshake.
trait SetTimeouts: AsFd + Sized {
    /// Blocking (the handshake's [`handshake::Deadline`] sets the timeouts).
    fn prepare_handshake(&self) -> io::Result<()> {
        SockRef::from(self).set_nonblocking(false)
    }
    /// No timeouts (the I/O thread takes the socket over).
    fn clear_timeouts(&self) {
        let s = SockRef::from(self);
        let _ = s.set_read_timeout(None);
        let _ = s.set_write_timeout(None);
    }
}

impl SetTimeouts for UnixStream {}
impl SetTimeouts for TcpStream {}

/// The uid, gid and pid of a Unix-socket peer (`SO_PEERCRED`).
fn peer_cred(s: &UnixStream) -> Option<(u32, u32, i32)> {
    let cred = ember_blockdev::sys::peer_cred(s.as_fd()).ok()?;
    Some((cred.uid, cred.gid, cred.pid))
}

/// What the accept loop needs of a listening socket.
trait Listening: AsRawFd {
    type Stream: io::Read + io::Write + Into<OwnedFd> + Send + 'static + SetTimeouts;
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()>;
    /// Accept one client; returns it, its peer for the limits, a name for the logs and
    /// (Unix sockets) its uid and gid.
    #[allow(clippy::type_complexity)]
    fn accept_client(&self) -> io::Result<(Self::Stream, Peer, String, Option<(u32, u32)>)>;
}

impl Listening for UnixListener {
    type Stream = UnixStream;
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, nonblocking)
    }
    fn accept_client(&self) -> io::Result<(UnixStream, Peer, String, Option<(u32, u32)>)> {
        let (s, _) = self.accept()?;
        Ok(match peer_cred(&s) {
            Some((uid, gid, pid)) => {
                let name = format!("unix uid {uid} gid {gid} pid {pid}");
                (s, Peer::Uid(uid), name, Some((uid, gid)))
            }
            None => (s, Peer::Unknown, "unix".to_string(), None),
        })
    }
}

impl Listening for TcpListener {
    type Stream = TcpStream;
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, nonblocking)
    }
    fn accept_client(&self) -> io::Result<(TcpStream, Peer, String, Option<(u32, u32)>)> {
        let (s, peer) = self.accept()?;
        let _ = s.set_nodelay(true);
        Ok((s, Peer::Ip(peer.ip()), peer.to_string(), None))
    }
}

#[cfg(test)]
mod tests;
