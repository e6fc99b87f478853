//! The narrow interface through which the control plane drives the data plane.
//!
//! The control plane never reaches into front ends; it asks the process that embeds it
//! (`emberd serve`) to open or close the export of a volume. `emberd` implements this
//! trait over its NBD/vhost-user servers; tests use [`NoDataPlane`].

use ember_blockdev::layer::throttle::QosLimits;
use ember_blockdev::pool::Pool;
use ember_blockdev::BackendSpec;
use std::path::PathBuf;
use std::sync::Arc;

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

/// Front-end protocol of an attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// NBD export named by the volume id, on the daemon's NBD listeners.
    #[serde(rename = "nbd")]
    Nbd,
    /// A vhost-user-blk socket of its own.
    #[serde(rename = "vhost-user")]
    VhostUser,
}

impl Protocol {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Nbd => "nbd",
            Protocol::VhostUser => "vhost-user",
        }
    }
}

/// One attachment of a volume to a front end.
#[derive(Clone)]
pub struct AttachSpec {
    /// Volume id (the NBD export name).
    pub volume_id: String,
    /// Attachment id (several attachments of one volume may coexist).
    pub attachment_id: String,
    /// Where the volume's bytes are.
    pub backend: BackendSpec,
    /// Front end.
    pub protocol: Protocol,
    /// Serve read-only.
    pub read_only: bool,
    /// LUKS passphrase when the volume is encrypted (Cinder's rule already applied).
    pub passphrase: Option<ember_crypto::Zeroizing<Vec<u8>>>,
    /// QoS from the type's `qos:` extra specs.
    pub qos: QosLimits,
}

impl std::fmt::Debug for AttachSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachSpec")
            .field("volume_id", &self.volume_id)
            .field("attachment_id", &self.attachment_id)
            .field("backend", &self.backend)
            .field("protocol", &self.protocol)
            .field("read_only", &self.read_only)
            .field("encrypted", &self.passphrase.is_some())
            .field("qos", &self.qos)
            .finish()
    }
}

/// How to format a new encrypted volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksFormat {
    /// 1 (`provider: luks`) or 2 (`luks2`).
    pub version: u8,
    /// LUKS volume key bits as cryptsetup counts them (256: AES-128-XTS, 512: AES-256-XTS).
    pub key_bits: u32,
}

/// Open/close exports of volumes. Implementations must be idempotent.
///
/// The methods with default bodies belong to the volumes API: storage pools, LUKS
/// header work, attachments and live resize. A data plane without them (tests,
/// control-only deployments) refuses those operations with a clear error.
pub trait DataPlane: Send + Sync + 'static {
    /// Start serving a volume.
    fn open_export(&self, spec: &ExportSpec) -> anyhow::Result<()>;
    /// Stop serving a volume (no-op if it was not exported).
    fn close_export(&self, volume_id: &str) -> anyhow::Result<()>;

    /// The storage pools of this node.
    fn pools(&self) -> Vec<Arc<dyn Pool>> {
        Vec::new()
    }

    /// Write a LUKS header with one keyslot for `passphrase` on a new volume.
    fn luks_format(
        &self,
        backend: &BackendSpec,
        passphrase: &[u8],
        f: &LuksFormat,
    ) -> anyhow::Result<()> {
        let _ = (passphrase, f);
        anyhow::bail!("no data plane in this process: cannot format {backend:?}")
    }

    /// Replace the keyslot `old` opens by one for `new` (a clone's own key).
    fn luks_change_key(&self, backend: &BackendSpec, old: &[u8], new: &[u8]) -> anyhow::Result<()> {
        let _ = (old, new);
        anyhow::bail!("no data plane in this process: cannot rekey {backend:?}")
    }

    /// Attach a volume; returns the connection info (`{"driver_volume_type", "data"}`).
    fn attach(&self, spec: &AttachSpec) -> anyhow::Result<serde_json::Value> {
        anyhow::bail!(
            "no data plane in this process: cannot attach volume {}",
            spec.volume_id
        )
    }

    /// End an attachment (no-op if unknown).
    fn detach(&self, volume_id: &str, attachment_id: &str) -> anyhow::Result<()> {
        let _ = (volume_id, attachment_id);
        Ok(())
    }

    /// The backing of an attached volume grew to `new_size` bytes: grow the live devices.
    fn resize(&self, volume_id: &str, new_size: u64) -> anyhow::Result<()> {
        let _ = (volume_id, new_size);
        Ok(())
    }
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
