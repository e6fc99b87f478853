//! Bounds on the REST API's connections: how many, how many per peer, how long idle.
//!
//! axum's `serve` keeps a connection as long as the peer keeps it open, and hyper waits
//! for a request's head and body without a deadline (no timer is configured). A peer that
//! opens connections and sends half a request would hold a task and a file descriptor
//! each, for ever; file descriptors are shared with the data plane (NBD connections,
//! vhost-user sockets, volume files), so that would reach the other volumes. This listener
//! wraps the TCP listener handed to `axum::serve`:
//!
//! - at most [`RestLimits::max_conns`] connections at a time: past that it stops
//!   accepting (new peers wait in the kernel's backlog) until one closes;
//! - at most [`RestLimits::max_conns_per_peer`] from one IP address: more are closed at
//!   once, so one peer cannot hold every slot;
//! - a connection on which a read or a write has been waiting for
//!   [`RestLimits::idle_timeout`] with no byte moving is ended (a half-sent request, a
//!   peer that does not read its response, an idle keep-alive connection). The timer
//!   restarts on every byte, so a handler's own work is not bounded here: keep the
//!   timeout above the slowest handler (an unlock at the LUKS cost limits, tens of seconds).
//!
//! Each refusal and each idle close is logged with the peer's address.

use axum_router::serve::Listener;
use ember_control::axum as axum_router;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Default of `--rest-max-conns`.
pub const DEFAULT_MAX_CONNS: usize = 512;
/// Default of `--rest-max-conns-per-peer`.
pub const DEFAULT_MAX_CONNS_PER_PEER: usize = 64;
/// Default of `--rest-idle-timeout-secs`.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;

/// The limits (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestLimits {
    pub max_conns: usize,
    pub max_conns_per_peer: usize,
    pub idle_timeout: Duration,
}

impl Default for RestLimits {
    fn default() -> Self {
        RestLimits {
            max_conns: DEFAULT_MAX_CONNS,
            max_conns_per_peer: DEFAULT_MAX_CONNS_PER_PEER,
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
        }
    }
}

/// Open connections per peer address.
type PerPeer = Arc<Mutex<HashMap<IpAddr, usize>>>;

fn lock(p: &PerPeer) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TCP listener that admits connections within [`RestLimits`].
#[derive(Debug)]
pub struct BoundedListener {
    inner: TcpListener,
    limits: RestLimits,
    slots: Arc<Semaphore>,
    per_peer: PerPeer,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, limits: RestLimits) -> BoundedListener {
        BoundedListener {
            inner,
            limits,
            slots: Arc::new(Semaphore::new(limits.max_conns.max(1))),
            per_peer: Arc::default(),
        }
    }
}

impl Listener for BoundedListener {
    type Io = BoundedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (BoundedConn, SocketAddr) {
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(s) => s,
                Err(_) => {
                    tracing::warn!(
                        max = self.limits.max_conns,
                        "REST connections at --rest-max-conns: accepting again when one closes"
                    );
                    match self.slots.clone().acquire_owned().await {
                        Ok(s) => s,
                        // Never closed; if it were, stop admitting for a while.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
            };
            let (stream, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "REST accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ip = addr.ip();
            {
                let mut m = lock(&self.per_peer);
                let n = m.entry(ip).or_insert(0);
                if *n >= self.limits.max_conns_per_peer {
                    drop(m);
                    tracing::warn!(peer = %addr, max = self.limits.max_conns_per_peer,
                        "REST connection refused: the peer is at --rest-max-conns-per-peer");
                    continue;
                }
                *n += 1;
            }
            let conn = BoundedConn {
                stream,
                peer: addr,
                idle: self.limits.idle_timeout,
                deadline: Box::pin(tokio::time::sleep(self.limits.idle_timeout)),
                armed: false,
                _slot: slot,
                per_peer: self.per_peer.clone(),
            };
            return (conn, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One admitted connection: ends itself when I/O waits longer than the idle timeout.
#[derive(Debug)]
pub struct BoundedConn {
    stream: TcpStream,
    peer: SocketAddr,
    idle: Duration,
    /// When the wait that started last gives up.
    deadline: Pin<Box<Sleep>>,
    /// A read or write is waiting and `deadline` counts for it.
    armed: bool,
    _slot: OwnedSemaphorePermit,
    per_peer: PerPeer,
}

impl BoundedConn {
    /// Bytes moved: the next wait gets a fresh deadline.
    fn progressed(&mut self) {
        self.armed = false;
    }

    /// The operation is pending: start its deadline (if not running) and see whether it
    /// passed.
    fn check_idle(&mut self, cx: &mut Context<'_>, what: &str) -> Poll<io::Error> {
        if !self.armed {
            self.armed = true;
            let at = Instant::now() + self.idle;
            self.deadline.as_mut().reset(at);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::warn!(peer = %self.peer, idle_secs = self.idle.as_secs(),
                    "REST connection closed: no {what} progress within --rest-idle-timeout-secs");
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "REST connection idle for too long",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for BoundedConn {
    fn drop(&mut self) {
        let mut m = lock(&self.per_peer);
        let ip = self.peer.ip();
        if let Some(n) = m.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx, "read").map(Err),
        }
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx, "write").map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A flush moves no byte (TCP has nothing to flush): not progress.
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.check_idle(cx, "write").map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check_idle(cx, "write").map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
