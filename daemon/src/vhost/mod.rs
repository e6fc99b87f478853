//! vhost-user-blk front end: QEMU (or any vhost-user frontend) attaches an Ember device.
//!
//! Built on the rust-vmm crates `vhost` (protocol messages), `virtio-queue` (descriptor
//! chains, split rings) and `vm-memory` (guest memory). Our parts:
//! - [`handler`]: the vhost-user message handler (features, memory table, vrings, config
//!   space, inflight area); our own because `vhost-user-backend` lacks inflight tracking;
//! - [`worker`]: one thread per virtqueue with its own io_uring and device queue;
//! - [`ring`]: reading the split ring the guest wrote (available heads, descriptor chains,
//!   indirect tables), refusing impossible ring states;
//! - [`request`]: decoding a chain into a block request with iovecs into guest memory
//!   (zero copy), bad requests → `IOERR`/`UNSUPP`;
//! - [`inflight`]: the shared inflight region that survives a daemon restart;
//! - [`backend_chan`]: the backend → frontend channel, for config-change notices;
//! - [`config`]: feature bits and the virtio-blk config space.
//!
//! [`spawn`] starts the queue workers (`vhost-q<N>` threads) and a listener thread
//! (`vhost-listen`) that serves one frontend connection after another on the Unix socket.
//! The listener waits in `poll` on the socket and a stop eventfd; the connection's
//! messages are handled on the same thread.
//!
//! [`VhostExport::stop`] (also run on drop) ends everything, bounded by a timeout: it sets
//! the stop flag, wakes the listener, and shuts down (`SHUT_RDWR`) our duplicate of the
//! live connection, so the blocked message read fails and the frontend sees EOF. The
//! connection thread then stops every vring the way `GET_VRING_BASE` does, all in
//! parallel: each worker finishes (completes into the used ring) what it already
//! submitted, so an acknowledged write is on the device and nothing is in flight when
//! the device is dropped; chains the guest queued but we never popped stay in the avail
//! ring (and the inflight region, if any) for a later backend. Finally the workers are
//! told to exit and every thread is joined against one deadline (a worker stuck on a
//! hung device is left behind and logged); the socket file is removed.
//!
//! Hostile guests and frontends (see `docs/threat-model.md` §1): an impossible ring state
//! breaks that queue ([`worker`]), a refused message ends that frontend's connection
//! ([`handler`]), memory fds are checked before they are mapped, and every wait on a
//! queue thread is bounded ([`worker::Timeouts`]); the listener then serves the next
//! frontend. Nothing a frontend sends can stop the daemon or another export.
//!
//! [`VhostExport::notifier`] → [`ConfigNotifier::config_changed`] tells a connected
//! frontend that the config space (the capacity, after a resize) changed, over the
//! channel of `BACKEND_REQ`.

pub mod backend_chan;
pub mod config;
pub mod handler;
pub mod inflight;
pub mod request;
pub mod ring;
pub mod worker;

use anyhow::{anyhow, Context};
use backend_chan::BackendChannel;
use ember_blockdev::BlockDevice;
use handler::BlkHandler;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
use vmm_sys_util::eventfd::EventFd;
use worker::{Shared, WorkerHandle};

/// How long [`VhostExport::stop`] (and drop) waits for the threads: the queues' stop
/// at disconnect and the workers' exit are each bounded by the workers' reply timeout
/// (30 s), so a stuck device still lets the export go in time.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(70);
/// How long [`ConfigNotifier::config_changed`] waits for the frontend's ack.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of one vhost-user-blk export.
#[derive(Debug, Clone)]
pub struct VhostConfig {
    /// Number of virtqueues (and worker threads).
    pub num_queues: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// GET_ID answer (the volume id; at most 20 bytes are sent).
    pub id: String,
}

/// State the export handle shares with its listener thread.
#[derive(Debug)]
struct Control {
    /// Set once by `stop`: accept no more, end the session.
    stopping: AtomicBool,
    /// Wakes the listener's poll.
    wake: EventFd,
    /// Our duplicate of the live connection's socket (shut down by `stop`). A duplicate,
    /// so its fd number stays ours until dropped: no fd-reuse race.
    conn: Mutex<Option<UnixStream>>,
    /// The live frontend's backend channel, if it set one up.
    backend: Mutex<Option<BackendChannel>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running vhost-user-blk export. Dropping it stops it (see [`VhostExport::stop`]).
#[derive(Debug)]
pub struct VhostExport {
    socket: PathBuf,
    ctl: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl VhostExport {
    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True while the listener thread runs (until [`VhostExport::stop`]).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stop the export: accept no more frontends, disconnect the connected one, stop its
    /// queues (requests already submitted complete first), join every thread (bounded by
    /// [`STOP_TIMEOUT`]) and remove the socket file.
    pub fn stop(mut self) {
        self.shutdown(STOP_TIMEOUT);
    }

    fn shutdown(&mut self, timeout: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let t0 = Instant::now();
        self.ctl.stopping.store(true, Ordering::SeqCst);
        let _ = self.ctl.wake.write(1);
        let connected = {
            let conn = lock(&self.ctl.conn);
            if let Some(c) = conn.as_ref() {
                // Fails only if already shut down (the frontend left): fine.
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            conn.is_some()
        };
        lock(&self.ctl.backend).take();
        while !thread.is_finished() && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            if thread.join().is_err() {
                tracing::error!(socket = %self.socket.display(), "vhost-user listener thread panicked");
            }
            tracing::info!(
                socket = %self.socket.display(),
                disconnected = connected,
                elapsed_ms = t0.elapsed().as_millis() as u64,
                "vhost-user-blk export stopped"
            );
        } else {
            tracing::error!(
                socket = %self.socket.display(),
                "vhost-user-blk export did not stop within {timeout:?}; its threads are left running"
            );
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(socket = %self.socket.display(), error = %e, "cannot remove the vhost-user socket");
            }
        }
    }

    /// A handle that sends config-change notices to this export's frontend, usable
    /// without holding the export (e.g. outside the data plane's lock).
    pub fn notifier(&self) -> ConfigNotifier {
        ConfigNotifier {
            socket: self.socket.clone(),
            ctl: self.ctl.clone(),
        }
    }
}

/// Sends config-change notices to the frontend of one export (see
/// [`VhostExport::notifier`]).
#[derive(Debug, Clone)]
pub struct ConfigNotifier {
    socket: PathBuf,
    ctl: Arc<Control>,
}

impl ConfigNotifier {
    /// Tell the connected frontend that the config space changed (e.g. the capacity,
    /// after the device grew), so it re-reads it and interrupts the guest. Returns
    /// `Ok(false)` if no frontend with a backend channel is connected. Waits at most
    /// [`NOTIFY_TIMEOUT`] for the frontend's ack; on failure the channel is dropped.
    pub fn config_changed(&self) -> anyhow::Result<bool> {
        let mut g = lock(&self.ctl.backend);
        let Some(ch) = g.as_mut() else {
            return Ok(false);
        };
        match ch.config_changed(NOTIFY_TIMEOUT) {
            Ok(()) => {
                tracing::info!(socket = %self.socket.display(), "notified the vhost-user frontend of a config change");
                Ok(true)
            }
            Err(e) => {
                *g = None;
                Err(anyhow!(
                    "config-change notice to the vhost-user frontend on {}: {e}",
                    self.socket.display()
                ))
            }
        }
    }
}

impl Drop for VhostExport {
    fn drop(&mut self) {
        self.shutdown(STOP_TIMEOUT);
    }
}

/// Start serving `dev` on the Unix socket `socket`. Returns once the socket is bound
/// (so a client may connect right away); serving goes on in background threads.
pub fn spawn(
    dev: Arc<dyn BlockDevice>,
    socket: &Path,
    cfg: VhostConfig,
) -> anyhow::Result<VhostExport> {
    if cfg.num_queues == 0 || cfg.num_queues > 64 {
        anyhow::bail!("--num-queues must be between 1 and 64");
    }
    let shared = Arc::new(Shared {
        dev,
        read_only: cfg.read_only,
        id: config::id_bytes(&cfg.id),
        writeback: AtomicBool::new(true),
        timeouts: worker::Timeouts::default(),
    });
    let mut workers = Vec::new();
    for q in 0..cfg.num_queues {
        workers.push(
            WorkerHandle::spawn(shared.clone(), q)
                .with_context(|| format!("start the worker of queue {q}"))?,
        );
    }
    let ctl = Arc::new(Control {
        stopping: AtomicBool::new(false),
        wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .context("create the stop eventfd")?,
        conn: Mutex::new(None),
        backend: Mutex::new(None),
    });
    let listener =
        Listener::new(socket, true).map_err(|e| anyhow!("listen on {}: {e}", socket.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| anyhow!("listen on {}: {e}", socket.display()))?;
    let path = socket.to_path_buf();
    let ctl2 = ctl.clone();
    let thread = std::thread::Builder::new()
        .name("vhost-listen".into())
        .spawn(move || listen(&path, &shared, workers, &listener, &ctl2))
        .context("spawn vhost listener thread")?;
    tracing::info!(socket = %socket.display(), queues = cfg.num_queues, "vhost-user-blk export listening");
    Ok(VhostExport {
        socket: socket.to_path_buf(),
        ctl,
        thread: Some(thread),
    })
}

/// The listener thread: serve frontends one after another until told to stop, then
/// stop and join the workers.
fn listen(
    path: &Path,
    shared: &Arc<Shared>,
    workers: Vec<WorkerHandle>,
    listener: &Listener,
    ctl: &Control,
) {
    let workers = Arc::new(workers);
    while !ctl.stopping.load(Ordering::SeqCst) {
        match wait_readable(listener, &ctl.wake) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::error!("vhost-user on {}: poll: {e}", path.display());
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("vhost-user on {}: accept: {e}", path.display());
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = serve_one(shared, &workers, stream, ctl) {
            tracing::error!("vhost-user on {}: {e:#}", path.display());
        }
    }
    // Every handler is gone, so the workers are ours alone: stop and join them, all
    // against one deadline (a worker stuck on a hung device is left behind, logged).
    match Arc::try_unwrap(workers) {
        Ok(ws) => {
            let deadline = Instant::now() + worker::DEFAULT_REPLY_TIMEOUT;
            for w in ws {
                w.join(deadline);
            }
        }
        Err(_) => tracing::error!("vhost-user workers still shared at stop"),
    }
}

/// Wait until the listener has a connection (true) or the wake eventfd fired (false).
fn wait_readable(listener: &Listener, wake: &EventFd) -> std::io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    match ember_blockdev::sys::poll(&mut fds, -1) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(false),
        Err(e) => return Err(e),
    }
    if fds[1].revents != 0 {
        let _ = wake.read();
        return Ok(false);
    }
    Ok(fds[0].revents != 0)
}

/// Serve one frontend until it disconnects or the export stops.
fn serve_one(
    shared: &Arc<Shared>,
    workers: &Arc<Vec<WorkerHandle>>,
    stream: UnixStream,
    ctl: &Control,
) -> anyhow::Result<()> {
    stream
        .set_nonblocking(false)
        .context("make the connection blocking")?;
    let peek = stream.try_clone().context("duplicate the connection")?;
    {
        let mut conn = lock(&ctl.conn);
        if ctl.stopping.load(Ordering::SeqCst) {
            // `stop` ran between accept and here: the frontend just sees EOF.
            return Ok(());
        }
        *conn = Some(stream.try_clone().context("duplicate the connection")?);
    }
    let handler = Arc::new(Mutex::new(BlkHandler::new(shared.clone(), workers.clone())));
    let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
    tracing::info!("vhost-user frontend connected");
    let res = loop {
        // Grab our own end of the backend channel when it passes by.
        let chan = backend_chan::peek_backend_fd(&peek);
        if let Err(e) = conn.handle_request() {
            break e;
        }
        if let Some(chan) = chan {
            let h = lock(&handler);
            if h.backend_req_set() {
                let reply_ack = h.reply_ack();
                drop(h);
                tracing::debug!(reply_ack, "vhost-user frontend set up the backend channel");
                *lock(&ctl.backend) = Some(BackendChannel::new(chan, reply_ack));
            }
        }
    };
    let stopping = ctl.stopping.load(Ordering::SeqCst);
    match res {
        _ if stopping => tracing::info!("vhost-user export stopping: frontend disconnected"),
        VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_) => {
            tracing::info!("vhost-user frontend disconnected")
        }
        e => tracing::warn!("vhost-user connection closed: {e}"),
    }
    lock(&ctl.backend).take();
    // Stop the queues (draining what was submitted) before the next frontend or exit.
    lock(&handler).disconnect();
    drop(conn);
    lock(&ctl.conn).take();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_blockdev::backend::null::NullDevice;
    use std::io::{Read, Write};
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures as P};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;

    fn capacity(fe: &mut Frontend) -> u64 {
        let (_, buf) = fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
            .unwrap();
        u64::from_le_bytes(buf[..8].try_into().unwrap())
    }

    /// The vhost crate's frontend: the config change notice arrives on its backend
    /// channel after a resize and GET_CONFIG has the new capacity; `stop` disconnects it,
    /// removes the socket and lets go of the device (every thread is gone).
    #[test]
    fn config_change_then_stop_with_a_connected_frontend() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("v.sock");
        let dev = Arc::new(NullDevice::new(1 << 30, false));
        let cfg = VhostConfig {
            num_queues: 2,
            read_only: false,
            id: "t".into(),
        };
        let export = spawn(dev.clone(), &sock, cfg).unwrap();
        assert!(
            !export.notifier().config_changed().unwrap(),
            "nobody to tell yet"
        );

        let mut fe = Frontend::connect(&sock, 2).unwrap();
        fe.set_owner().unwrap();
        let f = fe.get_features().unwrap();
        fe.set_features(f).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(P::BACKEND_REQ | P::CONFIG | P::REPLY_ACK));
        fe.set_protocol_features(P::CONFIG | P::REPLY_ACK | P::BACKEND_REQ)
            .unwrap();
        let (theirs, ours) = UnixStream::pair().unwrap();
        fe.set_backend_request_fd(&ours).unwrap();
        drop(ours);
        // A reply to a later message means the channel was taken up.
        assert_eq!(capacity(&mut fe), 2 << 20);

        dev.resize(2 << 30).unwrap();
        let frontend = std::thread::spawn(move || {
            let mut h = [0u8; 12];
            (&theirs).read_exact(&mut h).unwrap();
            let code = u32::from_le_bytes(h[0..4].try_into().unwrap());
            let flags = u32::from_le_bytes(h[4..8].try_into().unwrap());
            assert_eq!(code, 2, "CONFIG_CHANGE_MSG");
            assert_ne!(flags & 0x8, 0, "need-reply with REPLY_ACK");
            let mut r = Vec::new();
            for w in [code, 0x1 | 0x4, 8] {
                r.extend_from_slice(&w.to_le_bytes());
            }
            r.extend_from_slice(&0u64.to_le_bytes());
            (&theirs).write_all(&r).unwrap();
            theirs
        });
        assert!(export.notifier().config_changed().unwrap());
        let theirs = frontend.join().unwrap();
        assert_eq!(capacity(&mut fe), 4 << 20, "GET_CONFIG has the new size");

        export.stop();
        assert!(!sock.exists(), "socket removed");
        assert!(fe.get_features().is_err(), "the frontend was disconnected");
        let mut b = [0u8; 1];
        assert_eq!((&theirs).read(&mut b).unwrap(), 0, "backend channel closed");
        assert_eq!(
            Arc::strong_count(&dev),
            1,
            "every handler and worker let go of the device"
        );
    }
}
