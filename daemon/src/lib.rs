//! `emberd`'s modules as a library, so that the fuzz targets (`fuzz/`) and benches can
//! reach the front ends' decoders. The binaries (`emberd`, `emberctl`) are thin `main`s over
//! it.
//!
//! - [`nbd`]: the NBD server (handshake, transmission, per-thread workers);
//! - [`vhost`]: the vhost-user-blk backend (message handler, virtqueue workers, inflight);
//! - [`dataplane`]: `emberd serve`'s data plane, the control plane's [`ember_control::DataPlane`];
//! - [`export`], [`serve`], [`luks`]: the subcommands (`*Args` and `run`);
//! - [`logging`]: the tracing subscriber.

pub mod dataplane;
pub mod export;
pub mod logging;
pub mod luks;
pub mod nbd;
pub mod rest_listener;
pub mod serve;
pub mod vhost;
