//! The master key that seals secret payloads at rest (AES-256-GCM, the row id as
//! associated data, so a sealed payload cannot be moved to another row), and the
//! start-up check that the key is the one the database was sealed with.
//!
//! Below the domain modules: [`crate::keys`] stores secrets with it, the volumes
//! module reaches secrets only through `keys`.

use crate::error::{ApiError, ApiResult};
use crate::store::Db;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use anyhow::Context;
use base64::Engine;
use ember_crypto::Zeroizing;
use sqlx::Row;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const SEAL_VERSION: u8 = 1;

/// The master key sealing secret payloads.
pub struct MasterKey {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A key from raw bytes (tests).
    pub fn from_bytes(key: [u8; 32]) -> Self {
        MasterKey {
            key: Zeroizing::new(key),
        }
    }

    /// Load a key file: 32 raw bytes or 64 hex characters.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let data =
            std::fs::read(path).with_context(|| format!("read master key {}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "master key file is readable by group/others; chmod 600 it");
            }
        }
        let data = Zeroizing::new(data);
        let key: Zeroizing<Vec<u8>> = if data.len() == 32 {
            data
        } else {
            let text = String::from_utf8_lossy(&data);
            hex::decode(text.trim())
                .ok()
                .filter(|k| k.len() == 32)
                .map(Zeroizing::new)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "master key {} must hold 32 raw bytes or 64 hex characters",
                        path.display()
                    )
                })?
        };
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&key);
        Ok(MasterKey { key: k })
    }

    /// Load `path`, creating a random key there (0600) if it does not exist.
    pub fn load_or_create(path: &std::path::Path) -> anyhow::Result<Self> {
        if path.exists() {
            return Self::load(path);
        }
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut k[..]).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
        create_private(path, &k[..]).context("create the master key")?;
        tracing::info!(path = %path.display(), "created a new master key; back it up, secrets cannot be read without it");
        Ok(MasterKey { key: k })
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&(*self.key).into())
    }

    /// Seal `plain` bound to `aad`; returns base64 text.
    pub fn seal(&self, aad: &str, plain: &[u8]) -> ApiResult<String> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce)
            .map_err(|e| ApiError::internal(format!("OS random generator failed: {e}")))?;
        let ct = self
            .cipher()
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| ApiError::internal("encryption failed"))?;
        let mut out = Vec::with_capacity(1 + 12 + ct.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(B64.encode(out))
    }

    /// Open what [`MasterKey::seal`] produced.
    pub fn open(&self, aad: &str, sealed: &str) -> ApiResult<Zeroizing<Vec<u8>>> {
        let bad = || {
            ApiError::internal(
                "a sealed secret could not be decrypted (wrong master key or corrupted row)",
            )
        };
        let raw = B64.decode(sealed).map_err(|_| bad())?;
        if raw.len() < 1 + 12 + 16 || raw[0] != SEAL_VERSION {
            return Err(bad());
        }
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&raw[1..13]);
        self.cipher()
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: &raw[13..],
                    aad: aad.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| bad())
    }
}

/// Create `path` (which must not exist) readable by its owner only, holding `data`,
/// synced (the master key, the admin token).
pub fn create_private(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Make sure the master key is the one this database was sealed with.
pub async fn check_master_key(db: &Db, key: &MasterKey) -> anyhow::Result<()> {
    const AAD: &str = "ember-master-key-check";
    let row = sqlx::query("SELECT value FROM settings WHERE name = 'master_key_check'")
        .fetch_optional(&db.pool)
        .await?;
    match row {
        Some(r) => {
            let sealed: String = r.try_get("value")?;
            key.open(AAD, &sealed).map_err(|_| {
                anyhow::anyhow!("the master key does not match this database (was a different master.key used?)")
            })?;
        }
        None => {
            let sealed = key
                .seal(AAD, b"ember")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let r =
                sqlx::query("INSERT INTO settings (name, value) VALUES ('master_key_check', ?)")
                    .bind(sealed)
                    .execute(&db.pool)
                    .await;
            match r {
                Ok(_) => {}
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    // Another node won the race: check against its row.
                    return Box::pin(check_master_key(db, key)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_binding() {
        let k = MasterKey::from_bytes([7u8; 32]);
        let s = k.seal("id-1", b"hello").unwrap();
        assert_eq!(&k.open("id-1", &s).unwrap()[..], b"hello");
        assert!(k.open("id-2", &s).is_err(), "aad binds the row");
        let other = MasterKey::from_bytes([8u8; 32]);
        assert!(other.open("id-1", &s).is_err());
        assert!(!s.contains("hello"));
    }

    #[test]
    fn master_key_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("master.key");
        let k = MasterKey::load_or_create(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let k2 = MasterKey::load(&p).unwrap();
        assert_eq!(*k.key, *k2.key);
        std::fs::write(&p, "short").unwrap();
        assert!(MasterKey::load(&p).is_err());
        std::fs::write(&p, hex::encode([1u8; 32])).unwrap();
        assert_eq!(*MasterKey::load(&p).unwrap().key, [1u8; 32]);
    }
}
