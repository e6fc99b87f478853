//! Plain data of the LUN-pool half of [`super::DataPlane`]: what a LUN pool needs from
//! the key store ([`ChapRef`] → [`ChapSecret`]), what a listing shows
//! ([`ManageableLun`]), and the bind request and answer ([`ManageLun`],
//! [`ManagedLun`]). Identities are strings (`naa.…`, `eui.…`, `loop:/path`), compared
//! as a whole.

use super::{LuksFormat, ObjectRef, Passphrase};

/// A LUN pool of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunPoolInfo {
    /// The pool's name.
    pub name: String,
    /// The CHAP secrets its logins need (iSCSI pools with `chap-user`).
    pub chap: Option<ChapRef>,
}

/// CHAP credentials as the configuration names them: user names and secret ids of
/// the key store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapRef {
    /// The name Ember logs in with.
    pub user: String,
    /// The secret (its payload is the CHAP secret).
    pub secret_id: String,
    /// Mutual CHAP: the name the target answers with.
    pub target_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    pub target_secret_id: Option<String>,
}

/// CHAP credentials with the secrets' payloads.
#[derive(Debug, Clone)]
pub struct ChapSecret {
    /// The name Ember logs in with.
    pub user: String,
    /// Its secret.
    pub secret: Passphrase,
    /// Mutual CHAP: the target's name and secret.
    pub target: Option<(String, Passphrase)>,
}

/// One LUN of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManageableLun {
    /// The pool.
    pub pool: String,
    /// Its name in the pool (`lun-N` on an iSCSI target, a device path otherwise):
    /// Cinder's `source-name`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Its identity (`naa.…`), if it reports one.
    pub identity: Option<String>,
    /// Vendor and product, if known.
    pub vendor: Option<String>,
    /// Product.
    pub product: Option<String>,
    /// Every path that reaches it.
    pub paths: Vec<String>,
    /// The volume it is bound to on this node, if any.
    pub volume_id: Option<String>,
    /// Why it must not be managed, if so.
    pub unusable: Option<String>,
}

/// [`super::DataPlane::manage`]: bind a volume to a LUN.
#[derive(Debug, Clone)]
pub struct ManageLun {
    /// The volume (its pool is the LUN pool).
    pub volume: ObjectRef,
    /// The LUN's name in the pool.
    pub lun: String,
    /// The identity recorded when it was first managed: a LUN that reports another
    /// one is refused ([`super::DataPlaneError::LunUnavailable`]).
    pub identity: Option<String>,
    /// Write a LUKS header with one keyslot (first manage of an encrypted volume; the
    /// LUN must be blank: its first 16 MiB, where the header goes, all zeros).
    pub luks: Option<LuksFormat>,
}

/// What [`super::DataPlane::manage`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedLun {
    /// The LUN's name in the pool (another path of the same LUN when the recorded one
    /// moved).
    pub lun: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its identity, if it reports one.
    pub identity: Option<String>,
}

/// [`super::DataPlane::check_luns`]: the health of one attached LUN volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunHealth {
    /// The volume.
    pub volume: ObjectRef,
    /// Why its LUN cannot serve now (its I/O fails), or `None`.
    pub fault: Option<String>,
}

impl std::fmt::Display for ChapRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CHAP user {} (secret {})", self.user, self.secret_id)
    }
}
