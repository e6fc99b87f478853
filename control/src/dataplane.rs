//! The narrow interface through which the control plane drives the data plane.
//!
//! The control plane never reaches into front ends; it asks the process that embeds it
//! (`emberd serve`) to open or close the export of a volume. `emberd` implements this
//! trait over its NBD/vhost-user servers; tests use [`NoDataPlane`].

use std::path::PathBuf;

/// What the data plane needs to export one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Volume id (also the NBD export name).
    pub volume_id: String,
    /// Backing file or device.
    pub path: PathBuf,
    /// Serve read-only.
    pub read_only: bool,
    /// LUKS passphrase when the volume is encrypted (see `keys::passphrase_for`).
    pub passphrase: Option<Vec<u8>>,
}

/// Open/close exports of volumes. Implementations must be idempotent.
pub trait DataPlane: Send + Sync + 'static {
    /// Start serving a volume.
    fn open_export(&self, spec: &ExportSpec) -> anyhow::Result<()>;
    /// Stop serving a volume (no-op if it was not exported).
    fn close_export(&self, volume_id: &str) -> anyhow::Result<()>;
}

/// A data plane that exports nothing (control-plane-only deployments and tests).
#[derive(Debug, Default)]
pub struct NoDataPlane;

impl DataPlane for NoDataPlane {
    fn open_export(&self, spec: &ExportSpec) -> anyhow::Result<()> {
        anyhow::bail!(
            "no data plane in this process: cannot export volume {}",
            spec.volume_id
        )
    }
    fn close_export(&self, _volume_id: &str) -> anyhow::Result<()> {
        Ok(())
    }
}
