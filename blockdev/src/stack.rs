//! The one way to assemble a volume's device stack, for every caller (`emberd export`,
//! `emberd serve`'s attachments, the LUKS commands):
//!
//! ```text
//!   top ─▶ throttle (QoS, if limited) ─▶ crypt (LUKS, if a passphrase) ─▶ gate (if
//!          given) ─▶ base (backend: file | null | iscsi)   [later: mirror under crypt]
//! ```
//!
//! The gate sits right above the backend, so a pause stops exactly the writes that
//! change the bytes a copy of the backing object reads (ciphertext, for LUKS volumes);
//! throttle on top, so QoS counts what clients ask for.
//! Unlocking LUKS runs the key derivation here, in the caller's thread: callers that
//! hold locks must build the stack before taking them.

use crate::backend::{open, BackendSpec, OpenOptions};
use crate::error::Result;
use crate::layer::crypt::{CryptDevice, DeviceDisk};
use crate::layer::gate::{Gate, GateDevice};
use crate::layer::throttle::{QosLimits, ThrottleDevice};
use crate::BlockDevice;
use std::sync::Arc;

/// LUKS unlock parameters.
pub struct Unlock<'a> {
    /// The passphrase, byte for byte.
    pub passphrase: &'a [u8],
    /// Cost limits the header is read within (a hostile header is refused before any
    /// large allocation or key derivation).
    pub limits: ember_crypto::UnlockLimits,
}

impl std::fmt::Debug for Unlock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unlock")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What to stack over which backend.
#[derive(Debug)]
pub struct StackSpec<'a> {
    /// Where the bytes are.
    pub backend: BackendSpec,
    /// How to open it (read-only, page cache).
    pub open: OpenOptions,
    /// Serve a LUKS volume's plaintext.
    pub luks: Option<Unlock<'a>>,
    /// QoS limits (unlimited: no throttle layer).
    pub qos: QosLimits,
    /// Put the backend behind this gate, so its writes can be paused for
    /// point-in-time copies.
    pub gate: Option<Arc<Gate>>,
}

/// A built stack.
#[derive(Debug, Clone)]
pub struct Stack {
    /// The backend device (resize it to grow the volume; the layers follow).
    pub base: Arc<dyn BlockDevice>,
    /// What front ends serve.
    pub top: Arc<dyn BlockDevice>,
}

/// Open the backend and stack the layers `spec` asks for.
pub fn build(spec: &StackSpec<'_>) -> Result<Stack> {
    let base = open(&spec.backend, &spec.open)?;
    build_on(base, spec)
}

/// Stack the layers `spec` asks for over `base`, a backend the caller opened already
/// (`spec.backend` and `spec.open` are not used): a LUN whose identity the caller checks
/// between the open and the unlock.
pub fn build_on(base: Arc<dyn BlockDevice>, spec: &StackSpec<'_>) -> Result<Stack> {
    let mut top = base.clone();
    if let Some(g) = &spec.gate {
        top = Arc::new(GateDevice::new(top, g.clone()));
    }
    if let Some(u) = &spec.luks {
        top = Arc::new(CryptDevice::open(top, u.passphrase, &u.limits)?);
    }
    if !spec.qos.is_unlimited() {
        top = Arc::new(ThrottleDevice::new(top, &spec.qos));
    }
    Ok(Stack { base, top })
}

/// Open `backend` for LUKS header work (format, dump, keyslots).
pub fn header_disk(backend: &BackendSpec, read_only: bool) -> Result<DeviceDisk> {
    let dev = open(
        backend,
        &OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )?;
    DeviceDisk::new(dev)
}
