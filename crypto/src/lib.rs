//! # ember-crypto: LUKS headers and the AES-XTS sector cipher
//!
//! Everything Ember needs to serve LUKS volumes, with no I/O of its own:
//! - [`xts`]: `aes-xts-plain64`, multi-block, 256/512-bit keys, 512..4096-byte sectors;
//! - [`luks1`], [`luks2`]: read and write both header formats byte-compatibly with
//!   cryptsetup and QEMU (LUKS2: both copies, checksums, JSON metadata);
//! - [`keyslot`], [`kdf`]: PBKDF2 / Argon2 keyslots and the anti-forensic splitter;
//! - [`volume`]: open, format, add/remove/change keys, dump, over a caller-supplied [`Disk`],
//!   ordered so that a power cut leaves the old or the new passphrase working; and
//!   Cinder's passphrase rule ([`passphrase_for`]);
//! - [`limits`]: the cost limits ([`UnlockLimits`]) every header read is checked against,
//!   since a LUKS header is user-supplied data;
//! - [`crash`]: the recording [`Disk`] and crash-image enumeration that prove the ordering.
//!
//! Key material lives in `Zeroizing` buffers or in key schedules that zeroize on drop, and
//! no type holding it prints it.

// Unsafe code is denied everywhere but the fenced VAES kernel (`xts::vaes`).
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod crash;
pub mod disk;
pub mod error;
pub mod kdf;
pub mod keyslot;
pub mod limits;
pub mod luks1;
pub mod luks2;
#[cfg(test)]
mod testrng;
pub mod volume;
pub mod xts;

pub use disk::Disk;
pub use error::{Error, Result};
pub use keyslot::KdfParams;
pub use limits::UnlockLimits;
pub use volume::{
    add_key, change_key, default_data_offset, dump, format, open, passphrase_for, remove_key,
    FormatParams, Header, SecretKind, Unlocked,
};
pub use xts::SectorCipher;
pub use zeroize::Zeroizing;
