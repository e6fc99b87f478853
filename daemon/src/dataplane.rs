//! The data plane of `emberd serve`, as the control plane sees it ([`DataPlane`]).
//!
//! - Pools: the configured [`DirPool`]s.
//! - LUKS header work (format, rekey of a clone) through `ember_crypto` on the file.
//! - Attachments: one device stack per attached volume, built by its first attachment and
//!   shared by all of them, so the type's QoS limits the volume as a whole:
//!   `throttle (type's qos:) → crypt (LUKS, key from the control plane) → file`.
//!   Every attachment has its own front end, so its access mode is its own and ending it
//!   ends exactly its clients: an NBD attachment is the export `<volume>-<attachment>` on
//!   the daemon's NBD listeners (removing it closes its connections); a vhost-user
//!   attachment is the socket `VHOST_DIR/<volume>-<attachment8>.sock`.
//!   Detaching a vhost-user attachment stops its export: the connected frontend is
//!   disconnected, its queues drained and the export's threads joined.
//! - Resize: the file already grew (the pool did it); the live stack's base device is
//!   told, and the layers above derive their size from it. Connected vhost-user
//!   frontends get a config-change notice (QEMU then re-reads the capacity and interrupts
//!   the guest); NBD clients see the new size on their next connection.

use crate::luks::FileDisk;
use crate::nbd::{ListenAddr, NbdLimits, NbdServer};
use crate::vhost::{self, VhostConfig, VhostExport};
use anyhow::{bail, Context};
use ember_blockdev::layer::crypt::CryptDevice;
use ember_blockdev::layer::throttle::ThrottleDevice;
use ember_blockdev::pool::{DirPool, Pool};
use ember_blockdev::{open, BackendSpec, BlockDevice, OpenOptions};
use ember_control::dataplane::{AttachSpec, LuksFormat, Protocol};
use ember_control::{DataPlane, ExportSpec};
use ember_crypto::kdf::Hash;
use ember_crypto::{FormatParams, KdfParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// PBKDF2-SHA256 iterations of keyslots Ember writes. Ember's own keys are 256+ random
/// bits, so the KDF adds no strength to them; this keeps unlocks fast while staying well
/// above cryptsetup's minimum of 1000.
pub const KEYSLOT_PBKDF2_ITERATIONS: u32 = 20_000;
/// Virtqueues of a vhost-user attachment.
pub const VHOST_QUEUES: u16 = 2;

/// One attachment.
enum Attachment {
    /// The NBD export of this attachment (by name).
    Nbd {
        export: String,
    },
    Vhost {
        export: VhostExport,
    },
}

/// An attached volume.
struct Attached {
    /// The backend (file) device.
    base: Arc<dyn BlockDevice>,
    /// The stack every front end of the volume serves (`base` plus layers).
    stack: Arc<dyn BlockDevice>,
    attachments: HashMap<String, Attachment>,
}

/// Where NBD clients reach the daemon.
#[derive(Debug, Clone)]
enum NbdEndpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

/// `emberd serve`'s data plane.
pub struct EmberDataPlane {
    pools: Vec<Arc<dyn Pool>>,
    /// `None` once shut down.
    nbd: Mutex<Option<NbdServer>>,
    nbd_endpoints: Vec<NbdEndpoint>,
    vhost_dir: PathBuf,
    volumes: Mutex<HashMap<String, Attached>>,
}

impl EmberDataPlane {
    /// Open the pools (name → directory), start the NBD server listening on `listen`
    /// under `nbd_limits`, and put vhost-user sockets in `vhost_dir`. Returns the bound
    /// NBD addresses too.
    pub fn start(
        pools: Vec<(String, PathBuf)>,
        listen: &[ListenAddr],
        nbd_limits: NbdLimits,
        vhost_dir: PathBuf,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        let mut ps: Vec<Arc<dyn Pool>> = Vec::new();
        for (name, dir) in pools {
            let p = DirPool::open(name.clone(), &dir)
                .with_context(|| format!("open pool {name} at {}", dir.display()))?;
            ps.push(Arc::new(p));
        }
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let server = NbdServer::start(threads, nbd_limits)?;
        let mut bound = Vec::new();
        let mut endpoints = Vec::new();
        for a in listen {
            match server.listen(a) {
                Ok(b) => {
                    endpoints.push(match a {
                        ListenAddr::Unix(p) => NbdEndpoint::Unix(p.clone()),
                        ListenAddr::Tcp(_) => NbdEndpoint::Tcp(b.clone()),
                    });
                    bound.push(b);
                }
                Err(e) => {
                    server.shutdown();
                    return Err(e);
                }
            }
        }
        Ok((
            EmberDataPlane {
                pools: ps,
                nbd: Mutex::new(Some(server)),
                nbd_endpoints: endpoints,
                vhost_dir,
                volumes: Mutex::new(HashMap::new()),
            },
            bound,
        ))
    }

    /// Stop every vhost-user export (their submitted requests complete first), stop
    /// listening for NBD, close NBD connections and join the I/O threads.
    pub fn shutdown(&self) {
        let volumes: Vec<String> = lock(&self.volumes).keys().cloned().collect();
        for volume in volumes {
            // The detach path of every attachment: one way to stop a front end.
            if let Err(e) = self.close_export(&volume) {
                tracing::warn!(volume = %volume, "{e:#}");
            }
        }
        let server = lock(&self.nbd).take();
        if let Some(s) = server {
            s.shutdown();
        }
    }

    fn with_nbd<T>(&self, f: impl FnOnce(&NbdServer) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let g = lock(&self.nbd);
        let server = g.as_ref().context("the NBD server is shut down")?;
        f(server)
    }

    fn nbd_info(&self, export: &str) -> serde_json::Value {
        let uris: Vec<String> = self
            .nbd_endpoints
            .iter()
            .map(|e| match e {
                NbdEndpoint::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
                NbdEndpoint::Tcp(a) => format!("nbd://{a}/{export}"),
            })
            .collect();
        serde_json::json!({
            "driver_volume_type": "nbd",
            "data": {
                "export_name": export,
                "uri": uris.first(),
                "uris": uris,
            }
        })
    }
}

fn file_disk(backend: &BackendSpec) -> anyhow::Result<FileDisk> {
    let BackendSpec::File { path } = backend else {
        bail!("LUKS header work needs a file backend, not {backend:?}");
    };
    FileDisk::open(path, true)
}

fn kdf() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: Hash::Sha256,
        iterations: KEYSLOT_PBKDF2_ITERATIONS,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// NBD export name of an attachment (ids are UUIDs: no characters a URI must escape).
fn nbd_export_name(volume_id: &str, attachment_id: &str) -> String {
    format!("{volume_id}-{attachment_id}")
}

/// Socket path of a vhost-user attachment (short: Unix socket paths are limited).
fn vhost_socket(dir: &Path, volume_id: &str, attachment_id: &str) -> PathBuf {
    let short: String = attachment_id.chars().take(8).collect();
    dir.join(format!("{volume_id}-{short}.sock"))
}

impl DataPlane for EmberDataPlane {
    /// A bare NBD export of a file (no attachment bookkeeping); idempotent.
    fn open_export(&self, spec: &ExportSpec) -> anyhow::Result<()> {
        self.with_nbd(|server| {
            if server.export_names().contains(&spec.volume_id) {
                return Ok(());
            }
            let opts = OpenOptions {
                read_only: spec.read_only,
                ..OpenOptions::default()
            };
            let mut dev = open(
                &BackendSpec::File {
                    path: spec.path.clone(),
                },
                &opts,
            )
            .with_context(|| format!("open {}", spec.path.display()))?;
            if let Some(pass) = &spec.passphrase {
                dev = Arc::new(
                    CryptDevice::open(dev, pass, &ember_crypto::OpenOptions::default())
                        .context("unlock the LUKS volume")?,
                );
            }
            server.add_export(&spec.volume_id, dev, spec.read_only)
        })
    }

    /// End every attachment and export of a volume.
    fn close_export(&self, volume_id: &str) -> anyhow::Result<()> {
        let ids: Vec<String> = lock(&self.volumes)
            .get(volume_id)
            .map(|a| a.attachments.keys().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.detach(volume_id, &id)?;
        }
        if let Some(s) = lock(&self.nbd).as_ref() {
            s.remove_export(volume_id);
        }
        Ok(())
    }

    fn pools(&self) -> Vec<Arc<dyn Pool>> {
        self.pools.clone()
    }

    fn luks_format(
        &self,
        backend: &BackendSpec,
        passphrase: &[u8],
        f: &LuksFormat,
    ) -> anyhow::Result<()> {
        if f.key_bits != 256 && f.key_bits != 512 {
            bail!("LUKS key size {} bits: use 256 or 512", f.key_bits);
        }
        let mut disk = file_disk(backend)?;
        let p = FormatParams {
            version: f.version,
            key_bytes: (f.key_bits / 8) as usize,
            sector_size: 512,
            kdf: kdf(),
            label: String::new(),
            uuid: None,
        };
        ember_crypto::format(&mut disk, passphrase, &p).context("write the LUKS header")?;
        disk.sync().context("sync the LUKS header")?;
        Ok(())
    }

    fn luks_change_key(&self, backend: &BackendSpec, old: &[u8], new: &[u8]) -> anyhow::Result<()> {
        let mut disk = file_disk(backend)?;
        ember_crypto::change_key(
            &mut disk,
            old,
            new,
            kdf(),
            &ember_crypto::OpenOptions::default(),
        )
        .context("give the copy its own keyslot")?;
        disk.sync().context("sync the LUKS header")?;
        Ok(())
    }

    fn attach(&self, spec: &AttachSpec) -> anyhow::Result<serde_json::Value> {
        let mut vols = lock(&self.volumes);
        if !vols.contains_key(&spec.volume_id) {
            // The first attachment builds the stack: crypt, then throttle.
            let base = open(&spec.backend, &OpenOptions::default()).context("open the volume")?;
            let mut stack = base.clone();
            if let Some(pass) = &spec.passphrase {
                stack = Arc::new(
                    CryptDevice::open(stack, pass, &ember_crypto::OpenOptions::default())
                        .context("unlock the LUKS volume")?,
                );
            }
            if !spec.qos.is_unlimited() {
                stack = Arc::new(ThrottleDevice::new(stack, &spec.qos));
            }
            vols.insert(
                spec.volume_id.clone(),
                Attached {
                    base,
                    stack,
                    attachments: HashMap::new(),
                },
            );
        }
        let Some(a) = vols.get_mut(&spec.volume_id) else {
            bail!("volume {} vanished", spec.volume_id);
        };
        if a.attachments.contains_key(&spec.attachment_id) {
            bail!(
                "attachment {} of volume {} exists already",
                spec.attachment_id,
                spec.volume_id
            );
        }
        let res = match spec.protocol {
            Protocol::Nbd => {
                let name = nbd_export_name(&spec.volume_id, &spec.attachment_id);
                self.with_nbd(|s| s.add_export(&name, a.stack.clone(), spec.read_only))
                    .context("add the NBD export")
                    .map(|()| {
                        let info = self.nbd_info(&name);
                        (Attachment::Nbd { export: name }, info)
                    })
            }
            Protocol::VhostUser => {
                let socket = vhost_socket(&self.vhost_dir, &spec.volume_id, &spec.attachment_id);
                vhost::spawn(
                    a.stack.clone(),
                    &socket,
                    VhostConfig {
                        num_queues: VHOST_QUEUES,
                        read_only: spec.read_only,
                        id: spec.volume_id.clone(),
                    },
                )
                .context("start the vhost-user export")
                .map(|export| {
                    let info = serde_json::json!({
                        "driver_volume_type": "vhost-user",
                        "data": { "socket_path": socket, "num_queues": VHOST_QUEUES }
                    });
                    (Attachment::Vhost { export }, info)
                })
            }
        };
        let (att, info) = match res {
            Ok(x) => x,
            Err(e) => {
                if a.attachments.is_empty() {
                    vols.remove(&spec.volume_id);
                }
                return Err(e);
            }
        };
        a.attachments.insert(spec.attachment_id.clone(), att);
        tracing::info!(volume = %spec.volume_id, attachment = %spec.attachment_id, protocol = spec.protocol.as_str(), read_only = spec.read_only, "attached");
        Ok(info)
    }

    fn detach(&self, volume_id: &str, attachment_id: &str) -> anyhow::Result<()> {
        let mut vols = lock(&self.volumes);
        let Some(a) = vols.get_mut(volume_id) else {
            return Ok(());
        };
        let mut vhost_stop = None;
        match a.attachments.remove(attachment_id) {
            Some(Attachment::Nbd { export }) => {
                // Removing the export closes its connections.
                if let Some(s) = lock(&self.nbd).as_ref() {
                    s.remove_export(&export);
                }
            }
            Some(Attachment::Vhost { export }) => {
                // Stopped below, without holding the volumes lock.
                vhost_stop = Some(export);
            }
            None => {}
        }
        if a.attachments.is_empty() {
            vols.remove(volume_id);
        }
        drop(vols);
        if let Some(export) = vhost_stop {
            // Disconnects the frontend, drains its queues, joins the threads and removes
            // the socket (bounded; see `VhostExport::stop`).
            export.stop();
        }
        tracing::info!(volume = %volume_id, attachment = %attachment_id, "detached");
        Ok(())
    }

    fn resize(&self, volume_id: &str, new_size: u64) -> anyhow::Result<()> {
        let notifiers: Vec<(String, vhost::ConfigNotifier)> = {
            let vols = lock(&self.volumes);
            let Some(a) = vols.get(volume_id) else {
                return Ok(());
            };
            a.base.resize(new_size).context("grow the live device")?;
            a.attachments
                .iter()
                .filter_map(|(id, att)| match att {
                    Attachment::Vhost { export } => Some((id.clone(), export.notifier())),
                    Attachment::Nbd { .. } => None,
                })
                .collect()
        };
        // vhost-user frontends learn the new capacity in band (NBD clients see it on
        // their next connection). Told outside the lock: a frontend slow to ack must not
        // hold up other attachments. One that cannot be told is no reason to fail the
        // resize: it already happened.
        for (id, n) in notifiers {
            if let Err(e) = n.config_changed() {
                tracing::warn!(volume = %volume_id, attachment = %id, "{e:#}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_blockdev::layer::throttle::QosLimits;

    fn names(dp: &EmberDataPlane) -> Vec<String> {
        dp.with_nbd(|s| Ok(s.export_names())).unwrap()
    }

    #[test]
    fn exports_attachments_luks_and_shutdown() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("nbd.sock");
        std::fs::create_dir(d.path().join("vhost")).unwrap();
        let (dp, bound) = EmberDataPlane::start(
            vec![("default".into(), d.path().join("pool"))],
            &[ListenAddr::Unix(sock.clone())],
            NbdLimits::default(),
            d.path().join("vhost"),
        )
        .unwrap();
        assert_eq!(bound, vec![format!("unix:{}", sock.display())]);
        let pool = dp.pools().pop().unwrap();
        let spec = pool.create("v1", 32 << 20).unwrap();

        // LUKS format, then a clone-style rekey.
        let f = LuksFormat {
            version: 2,
            key_bits: 512,
        };
        dp.luks_format(&spec, b"old", &f).unwrap();
        dp.luks_change_key(&spec, b"old", b"new").unwrap();
        assert!(
            dp.luks_change_key(&spec, b"old", b"x").is_err(),
            "old key removed"
        );
        assert!(dp
            .luks_format(
                &spec,
                b"p",
                &LuksFormat {
                    version: 2,
                    key_bits: 100
                }
            )
            .is_err());

        // Each NBD attachment is its own export with its own access mode; all share
        // the volume's one device stack.
        let att = |id: &str, pass: &[u8], read_only: bool| AttachSpec {
            volume_id: "v1".into(),
            attachment_id: id.into(),
            backend: spec.clone(),
            protocol: Protocol::Nbd,
            read_only,
            passphrase: Some(ember_crypto::Zeroizing::new(pass.to_vec())),
            qos: QosLimits {
                total_iops_sec: Some(1000),
                ..Default::default()
            },
        };
        assert!(
            dp.attach(&att("a0", b"wrong", false)).is_err(),
            "wrong passphrase"
        );
        assert!(
            lock(&dp.volumes).is_empty(),
            "a failed attach leaves nothing"
        );
        let info = dp.attach(&att("a1", b"new", false)).unwrap();
        assert_eq!(info["driver_volume_type"], "nbd");
        assert_eq!(info["data"]["export_name"], "v1-a1");
        assert_eq!(
            info["data"]["uri"],
            format!("nbd+unix:///v1-a1?socket={}", sock.display())
        );
        assert!(
            dp.attach(&att("a1", b"new", false)).is_err(),
            "an attachment id is used once"
        );
        dp.attach(&att("a2", b"new", true)).unwrap();
        assert_eq!(names(&dp), vec!["v1-a1".to_string(), "v1-a2".to_string()]);
        {
            let vols = lock(&dp.volumes);
            let v = &vols["v1"];
            assert_eq!(v.attachments.len(), 2);
        }
        dp.detach("v1", "a1").unwrap();
        assert_eq!(names(&dp), vec!["v1-a2".to_string()]);
        dp.detach("v1", "a2").unwrap();
        dp.detach("v1", "a2").unwrap();
        assert!(names(&dp).is_empty());
        assert!(lock(&dp.volumes).is_empty());
        dp.resize("v1", 64 << 20).unwrap();

        // Bare exports (open/close_export) are idempotent.
        let e = ExportSpec {
            volume_id: "v1".into(),
            path: d.path().join("pool").join("v1.img"),
            read_only: true,
            passphrase: Some(b"new".to_vec()),
        };
        dp.open_export(&e).unwrap();
        dp.open_export(&e).unwrap();
        assert_eq!(names(&dp), vec!["v1".to_string()]);
        dp.close_export("v1").unwrap();
        assert!(names(&dp).is_empty());

        // A vhost-user attachment is stopped by shutdown: its socket goes.
        let vinfo = dp
            .attach(&AttachSpec {
                protocol: Protocol::VhostUser,
                ..att("a3", b"new", false)
            })
            .unwrap();
        let vsock = PathBuf::from(vinfo["data"]["socket_path"].as_str().unwrap());
        assert!(vsock.exists());

        dp.shutdown();
        assert!(!sock.exists(), "the socket is removed at shutdown");
        assert!(
            !vsock.exists(),
            "vhost-user exports are stopped at shutdown"
        );
        assert!(lock(&dp.volumes).is_empty());
        assert!(dp.open_export(&e).is_err());
    }
}
