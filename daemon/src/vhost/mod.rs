//! vhost-user-blk front end: QEMU (or any vhost-user frontend) attaches an Ember device.
//!
//! Built on the rust-vmm crates `vhost` (protocol messages), `virtio-queue` (descriptor
//! chains, split rings) and `vm-memory` (guest memory). Our parts:
//! - [`handler`]: the vhost-user message handler (features, memory table, vrings, config
//!   space, inflight area); our own because `vhost-user-backend` lacks inflight tracking;
//! - [`worker`]: one thread per virtqueue with its own io_uring and device queue;
//! - [`request`]: decoding a chain into a block request with iovecs into guest memory
//!   (zero copy), bad requests → `IOERR`/`UNSUPP`;
//! - [`inflight`]: the shared inflight region that survives a daemon restart;
//! - [`config`]: feature bits and the virtio-blk config space.
//!
//! [`spawn`] starts the queue workers (they live as long as the export) and a listener
//! thread that serves one frontend connection after another on the Unix socket.

pub mod config;
pub mod handler;
pub mod inflight;
pub mod request;
pub mod worker;

use anyhow::{anyhow, Context};
use ember_blockdev::BlockDevice;
use handler::BlkHandler;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vhost::vhost_user::{BackendListener, Error as VuError, Listener};
use worker::{Shared, WorkerHandle};

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

/// A running vhost-user-blk export.
#[derive(Debug)]
pub struct VhostExport {
    socket: PathBuf,
    thread: JoinHandle<()>,
}

impl VhostExport {
    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True while the listener thread runs (it never stops on its own).
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
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
    });
    let mut workers = Vec::new();
    for q in 0..cfg.num_queues {
        workers.push(
            WorkerHandle::spawn(shared.clone(), q)
                .with_context(|| format!("start the worker of queue {q}"))?,
        );
    }
    let workers = Arc::new(workers);
    let mut listener =
        Listener::new(socket, true).map_err(|e| anyhow!("listen on {}: {e}", socket.display()))?;
    let path = socket.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("vhost-listen".into())
        .spawn(move || loop {
            if let Err(e) = serve_one(&shared, &workers, &mut listener) {
                tracing::error!("vhost-user on {}: {e:#}", path.display());
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
        .context("spawn vhost listener thread")?;
    tracing::info!(socket = %socket.display(), queues = cfg.num_queues, "vhost-user-blk export listening");
    Ok(VhostExport {
        socket: socket.to_path_buf(),
        thread,
    })
}

/// Accept one frontend and serve it until it disconnects.
fn serve_one(
    shared: &Arc<Shared>,
    workers: &Arc<Vec<WorkerHandle>>,
    listener: &mut Listener,
) -> anyhow::Result<()> {
    let handler = Arc::new(Mutex::new(BlkHandler::new(shared.clone(), workers.clone())));
    let mut bl = BackendListener::new(listener, handler.clone())
        .map_err(|e| anyhow!("backend listener: {e}"))?;
    let mut conn = loop {
        match bl.accept() {
            Ok(Some(c)) => break c,
            Ok(None) => continue,
            Err(e) => return Err(anyhow!("accept: {e}")),
        }
    };
    tracing::info!("vhost-user frontend connected");
    let res = loop {
        if let Err(e) = conn.handle_request() {
            break e;
        }
    };
    match res {
        VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_) => {
            tracing::info!("vhost-user frontend disconnected")
        }
        e => tracing::warn!("vhost-user connection closed: {e}"),
    }
    drop(conn);
    handler
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .disconnect();
    Ok(())
}
