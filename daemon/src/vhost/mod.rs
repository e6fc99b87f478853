//! vhost-user-blk front end: QEMU (or any vhost-user frontend) attaches an Ember device.
//!
//! Built on the rust-vmm crates: `vhost` (protocol), `vhost-user-backend` (message handler,
//! vrings, one epoll thread per queue), `virtio-queue` (descriptor chains), `vm-memory`
//! (guest memory mapping). Our parts:
//! - [`config`]: feature bits and the virtio-blk config space;
//! - [`request`]: decoding a descriptor chain into a block request with iovecs pointing
//!   into guest memory (zero copy), bad requests → `IOERR`/`UNSUPP`;
//! - [`backend`]: the `VhostUserBackend`: per-queue worker with its own io_uring and
//!   device queue, kicks and completions both wake it through its epoll.
//!
//! [`spawn`] listens on a Unix socket and serves one frontend at a time, forever: when a
//! frontend disconnects (or QEMU restarts), the socket is bound again for the next one.

pub mod backend;
pub mod config;
pub mod request;

use anyhow::{anyhow, Context};
use backend::{ring_event, BlkBackend, BlkConfig};
use ember_blockdev::BlockDevice;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

pub use backend::BlkConfig as VhostConfig;

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
/// (so a client may connect right away); serving goes on in a background thread.
pub fn spawn(
    dev: Arc<dyn BlockDevice>,
    socket: &Path,
    cfg: BlkConfig,
) -> anyhow::Result<VhostExport> {
    if cfg.num_queues == 0 || cfg.num_queues > 64 {
        anyhow::bail!("--num-queues must be between 1 and 64");
    }
    // Fail early (before binding) if the backend cannot be built, e.g. no io_uring.
    drop(BlkBackend::new(dev.clone(), cfg.clone()).context("vhost-user-blk backend")?);
    let mut listener = vhost::vhost_user::Listener::new(socket, true)
        .map_err(|e| anyhow!("listen on {}: {e}", socket.display()))?;
    let path = socket.to_path_buf();
    let nq = cfg.num_queues;
    let thread = std::thread::Builder::new()
        .name("vhost-listen".into())
        .spawn(move || serve_forever(dev, cfg, &mut listener, &path))
        .context("spawn vhost listener thread")?;
    tracing::info!(socket = %socket.display(), queues = nq, "vhost-user-blk export listening");
    Ok(VhostExport {
        socket: socket.to_path_buf(),
        thread,
    })
}

/// One frontend connection after another. Every connection gets a fresh backend and
/// handler (vrings, memory table, worker threads), so nothing of a previous frontend's
/// state leaks into the next one; the old worker threads exit when it disconnects.
fn serve_forever(
    dev: Arc<dyn BlockDevice>,
    cfg: BlkConfig,
    listener: &mut vhost::vhost_user::Listener,
    path: &Path,
) {
    loop {
        if let Err(e) = serve_one(dev.clone(), cfg.clone(), listener) {
            tracing::error!("vhost-user on {}: {e:#}", path.display());
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

fn serve_one(
    dev: Arc<dyn BlockDevice>,
    cfg: BlkConfig,
    listener: &mut vhost::vhost_user::Listener,
) -> anyhow::Result<()> {
    let nq = cfg.num_queues;
    let backend = Arc::new(BlkBackend::new(dev, cfg).context("vhost-user-blk backend")?);
    let mut daemon = VhostUserDaemon::new(
        "ember-vhost".to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| anyhow!("vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    let stop_workers = || handlers.iter().for_each(|h| h.send_exit_event());
    for (q, handler) in handlers.iter().enumerate() {
        let fd = backend
            .ring_fd(q)
            .ok_or_else(|| anyhow!("queue {q} has no ring"))?;
        if let Err(e) = handler.register_listener(fd, EventSet::IN, u64::from(ring_event(nq))) {
            stop_workers();
            return Err(anyhow!("register ring of queue {q}: {e}"));
        }
    }
    if let Err(e) = daemon.start(listener) {
        stop_workers();
        return Err(anyhow!("accept: {e}"));
    }
    tracing::info!("vhost-user frontend connected");
    let res = daemon.wait();
    stop_workers();
    match res {
        Ok(()) => tracing::info!("vhost-user frontend disconnected"),
        Err(e) => tracing::warn!("vhost-user connection ended: {e}"),
    }
    Ok(())
}

/// Block SIGINT and SIGTERM in the calling thread (call before spawning threads, so they
/// inherit the mask) and return the set for [`wait_exit_signal`].
pub fn block_exit_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only changes this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    }
}

/// Wait for one of the signals blocked by [`block_exit_signals`]; returns its number.
pub fn wait_exit_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
    while unsafe { libc::sigwait(set, &raw mut sig) } != 0 {}
    sig
}
