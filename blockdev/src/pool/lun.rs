//! [`LunPool`]: volumes on LUNs that exist already, either every LUN of one iSCSI target
//! (reached through Ember's own initiator) or the host block devices whose paths match a
//! set of globs (FC and kernel-iSCSI LUNs under `/dev/disk/by-path` or `by-id`,
//! device-mapper maps, loop devices).
//!
//! Nothing is allocated, copied or deleted here: the array owns its LUNs. The control
//! plane *manages* a LUN (binds it to a volume and records its identity) and unmanages
//! it; this module finds LUNs and opens them.
//!
//! - [`LunPool::scan`] lists every LUN: its name in the pool (`lun-N` on a target, the
//!   first matching path for host devices), size, identity (VPD 0x83 designators and the
//!   VPD 0x80 serial, [`LunIdentity`]), vendor and product, every path that reaches it,
//!   and why it must not be managed, if so (not a disk, held by the host, unreadable).
//!   - iSCSI: one discovery login (REPORT LUNS, [`iscsi::report_luns`]) on the first
//!     portal that answers, then one probe login per LUN ([`IscsiDevice::open`]). Every
//!     login is bounded by the target's login and command timeouts (the pool's
//!     `iscsi://` options), so a scan of `n` LUNs of a dead target takes at most
//!     `(n + 1) × (login_timeout + timeout)`, and usually one login timeout.
//!   - Host devices: the globs are expanded in the order given (matches sorted within a
//!     glob); paths to one device node, and device nodes with one identity (several
//!     paths to a LUN), are one LUN whose name is its first path. A device another
//!     driver or a mount holds (`open(O_EXCL)` answers `EBUSY`) is listed as not safe.
//! - [`LunPool::open`] opens a LUN by name: through every portal at once as one
//!   [`MultipathDevice`] when the pool has several, else through its portal; a host-device name must match one of the pool's
//!   globs (a manage request cannot open an arbitrary device), and when its path is gone
//!   another path with the recorded identity is used. The caller compares the device's
//!   identity ([`LunPool::identity_of`]) with the one it recorded before serving a byte.
//! - Identity of devices without SCSI pages: a loop device is `loop:<backing file>`, a
//!   device-mapper map `dm:<uuid>` (or `dm-name:<name>`), so a loop LUN re-pointed at
//!   another file is a different LUN, as an array LUN with another WWN is.
//!
//! Glob syntax: `*` (any characters but `/`) and `?` (one character) in any path
//! component; no brackets or `**`. Names starting with `.` only match a component that
//! starts with `.`.
//!
//! All methods block (logins, device opens); async callers run them on a blocking thread.

use crate::backend::iscsi::chap::ChapCredentials;
use crate::backend::iscsi::{self, IscsiConfig, IscsiDevice};
use crate::backend::multipath::MultipathDevice;
use crate::backend::scsi::{Designator, DesignatorKind, LunIdentity};
use crate::backend::{open, BackendSpec, OpenOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::BlockDevice;
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Prefix of an iSCSI LUN's name in its pool (`lun-3`).
pub const ISCSI_NAME_PREFIX: &str = "lun-";
/// Most paths one glob may expand to (a glob of `/*` must not walk the whole tree).
pub const MAX_GLOB_MATCHES: usize = 4096;

/// One iSCSI target whose LUNs a pool offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiTarget {
    /// `host[:port]` of each portal, preferred first.
    pub portals: Vec<String>,
    /// Target IQN.
    pub target: String,
    /// The query string of an `iscsi://` URI (timeouts, digests, initiator name; see
    /// [`IscsiConfig::parse_uri`]), applied to every session of the pool.
    pub options: String,
}

/// Where a pool's LUNs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LunSource {
    /// Every LUN of an iSCSI target.
    Iscsi(IscsiTarget),
    /// Host block devices whose paths match these absolute globs.
    Devices {
        /// The globs, preferred first.
        globs: Vec<String>,
    },
}

/// One LUN as [`LunPool::scan`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundLun {
    /// Its name in the pool: `lun-N`, or its first path.
    pub name: String,
    /// Size in bytes (0 when it could not be read).
    pub size: u64,
    /// Its identity, if it reports one (see the module doc for devices without SCSI
    /// pages).
    pub identity: Option<LunIdentity>,
    /// Vendor (INQUIRY or sysfs).
    pub vendor: Option<String>,
    /// Product (INQUIRY or sysfs).
    pub product: Option<String>,
    /// Every path that reaches it (`iscsi://portal/iqn/lun` per portal, or device paths).
    pub paths: Vec<String>,
    /// Why it must not be managed, if so.
    pub unusable: Option<String>,
}

/// A pool of existing LUNs.
pub struct LunPool {
    name: String,
    source: LunSource,
    /// CHAP credentials for the target's logins (given by the control plane).
    chap: Mutex<Option<ChapCredentials>>,
    /// How long an open waits for a host device path that is not there yet.
    wait: Option<Duration>,
    /// LUN count and bytes of the last scan (statistics without a scan).
    last: Mutex<(usize, u64)>,
}

impl std::fmt::Debug for LunPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LunPool")
            .field("name", &self.name)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

fn invalid(m: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, m)
}

impl LunPool {
    /// A pool named `name` over `source`; host device opens wait up to `wait` for a
    /// late path. The configuration is checked here (portals, target, options, globs).
    pub fn new(name: impl Into<String>, source: LunSource, wait: Option<Duration>) -> Result<Self> {
        let name = name.into();
        match &source {
            LunSource::Iscsi(t) => {
                if t.portals.is_empty() {
                    return Err(invalid(format!("LUN pool {name}: no portal")));
                }
                if t.target.is_empty() || t.target.contains('/') {
                    return Err(invalid(format!(
                        "LUN pool {name}: target {:?} is not an IQN",
                        t.target
                    )));
                }
                for p in &t.portals {
                    if p.is_empty() || p.contains('/') || p.contains('@') {
                        return Err(invalid(format!(
                            "LUN pool {name}: portal {p:?}: expected host[:port]"
                        )));
                    }
                    iscsi_config(t, p, 0)?;
                }
            }
            LunSource::Devices { globs } => {
                if globs.is_empty() {
                    return Err(invalid(format!("LUN pool {name}: no device glob")));
                }
                if let Some(g) = globs
                    .iter()
                    .find(|g| !g.starts_with('/') || g.contains(".."))
                {
                    return Err(invalid(format!(
                        "LUN pool {name}: device glob {g:?} must be an absolute path without `..`"
                    )));
                }
            }
        }
        Ok(LunPool {
            name,
            source,
            chap: Mutex::new(None),
            wait,
            last: Mutex::new((0, 0)),
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its LUNs come from.
    pub fn source(&self) -> &LunSource {
        &self.source
    }

    /// Set (or clear) the CHAP credentials of the target's logins.
    pub fn set_chap(&self, chap: Option<ChapCredentials>) {
        *self.chap.lock().unwrap_or_else(|e| e.into_inner()) = chap;
    }

    fn chap(&self) -> Option<ChapCredentials> {
        self.chap.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// LUN count and total bytes found by the last scan.
    pub fn last_scan(&self) -> (usize, u64) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every LUN of the pool (see the module doc).
    pub fn scan(&self) -> Result<Vec<FoundLun>> {
        let found = match &self.source {
            LunSource::Iscsi(t) => self.scan_iscsi(t)?,
            LunSource::Devices { globs } => scan_devices(globs)?,
        };
        let bytes = found.iter().map(|l| l.size).fold(0u64, u64::saturating_add);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = (found.len(), bytes);
        Ok(found)
    }

    fn scan_iscsi(&self, t: &IscsiTarget) -> Result<Vec<FoundLun>> {
        let chap = self.chap();
        let mut last_err = None;
        let mut luns = None;
        for p in &t.portals {
            let mut cfg = iscsi_config(t, p, 0)?;
            cfg.chap = chap.clone();
            match iscsi::report_luns(cfg) {
                Ok(l) => {
                    luns = Some(l);
                    break;
                }
                Err(e) => {
                    tracing::warn!(pool = %self.name, portal = %p, error = %e, "portal did not list its LUNs");
                    last_err = Some(e);
                }
            }
        }
        let Some(mut luns) = luns else {
            return Err(last_err.unwrap_or_else(|| invalid("no portal".into())));
        };
        luns.sort_unstable();
        luns.dedup();
        let mut out = Vec::with_capacity(luns.len());
        for lun in luns {
            let name = format!("{ISCSI_NAME_PREFIX}{lun}");
            let paths = t
                .portals
                .iter()
                .map(|p| format!("iscsi://{p}/{}/{lun}", t.target))
                .collect();
            match self.open_iscsi(t, lun, true) {
                Ok(dev) => {
                    let i = dev.lun_info();
                    let inq = i.inquiry.as_ref();
                    out.push(FoundLun {
                        name,
                        size: dev.info().size,
                        identity: (!i.identity.is_empty()).then_some(i.identity.clone()),
                        vendor: inq.map(|q| q.vendor.clone()).filter(|s| !s.is_empty()),
                        product: inq.map(|q| q.product.clone()).filter(|s| !s.is_empty()),
                        paths,
                        unusable: None,
                    });
                }
                Err(e) => out.push(FoundLun {
                    name,
                    size: 0,
                    identity: None,
                    vendor: None,
                    product: None,
                    paths,
                    unusable: Some(e.to_string()),
                }),
            }
        }
        Ok(out)
    }

    /// Open LUN `lun` of the target on the first portal that logs in.
    fn open_iscsi(&self, t: &IscsiTarget, lun: u16, read_only: bool) -> Result<IscsiDevice> {
        let chap = self.chap();
        let mut last = None;
        for p in &t.portals {
            let mut cfg = iscsi_config(t, p, lun)?;
            cfg.chap = chap.clone();
            cfg.read_only |= read_only;
            match IscsiDevice::open(cfg) {
                Ok(d) => return Ok(d),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| invalid("no portal".into())))
    }

    /// Open LUN `name` (see the module doc). `opts` are the open options (read-only);
    /// the pool's wait for late device paths applies.
    pub fn open(&self, name: &str, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>> {
        match &self.source {
            LunSource::Iscsi(t) => {
                let lun = parse_iscsi_name(name).ok_or_else(|| {
                    invalid(format!(
                        "{name:?} is not a LUN of pool {}: expected {ISCSI_NAME_PREFIX}N",
                        self.name
                    ))
                })?;
                if t.portals.len() > 1 {
                    // Every portal at once: one multipath device (paths checked to be
                    // the same LUN; at least one must answer).
                    let mut cfg = iscsi_config(t, &t.portals.join(","), lun)?;
                    cfg.chap = self.chap();
                    cfg.read_only |= opts.read_only;
                    return Ok(Arc::new(MultipathDevice::open(cfg)?));
                }
                Ok(Arc::new(self.open_iscsi(t, lun, opts.read_only)?))
            }
            LunSource::Devices { globs } => {
                if !globs.iter().any(|g| glob_match(g, name)) {
                    return Err(invalid(format!(
                        "{name:?} matches no device glob of pool {}",
                        self.name
                    )));
                }
                let mut o = opts.clone();
                if o.wait.is_none() {
                    o.wait = self.wait;
                }
                open(
                    &BackendSpec::File {
                        path: PathBuf::from(name),
                    },
                    &o,
                )
            }
        }
    }

    /// The identity of an opened LUN `name`: what the device reports (VPD pages), or for
    /// host devices without them, the loop or device-mapper substitute.
    pub fn identity_of(&self, dev: &dyn BlockDevice, name: &str) -> Option<LunIdentity> {
        dev.identity().or_else(|| match self.source {
            LunSource::Devices { .. } => std::fs::metadata(name)
                .ok()
                .and_then(|m| substitute_identity(m.rdev())),
            LunSource::Iscsi(_) => None,
        })
    }

    /// Another name of the LUN with identity `id` (its path moved), from a fresh scan.
    pub fn find(&self, id: &LunIdentity) -> Result<Option<FoundLun>> {
        Ok(self
            .scan()?
            .into_iter()
            .find(|l| l.identity.as_ref() == Some(id)))
    }
}

/// The LUN number of an iSCSI LUN name (`lun-3`).
pub fn parse_iscsi_name(name: &str) -> Option<u16> {
    name.strip_prefix(ISCSI_NAME_PREFIX)?
        .parse()
        .ok()
        .filter(|l| *l < 16384)
}

/// The configuration of one session to LUN `lun` of `t` through `portal`.
fn iscsi_config(t: &IscsiTarget, portal: &str, lun: u16) -> Result<IscsiConfig> {
    let q = if t.options.is_empty() {
        String::new()
    } else {
        format!("?{}", t.options.trim_start_matches('?'))
    };
    let c = IscsiConfig::parse_uri(&format!("iscsi://{portal}/{}/{lun}{q}", t.target))?;
    if c.uri_user.is_some() {
        return Err(invalid(
            "a LUN pool's CHAP user comes from its configuration, not the portal".into(),
        ));
    }
    Ok(c)
}

/// `/sys/dev/block/MAJ:MIN` of a device number.
fn sysfs_of(rdev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The identity of a loop device (`loop:<backing file>`) or a device-mapper map
/// (`dm:<uuid>`, `dm-name:<name>`); `None` for other devices.
fn substitute_identity(rdev: u64) -> Option<LunIdentity> {
    let sys = sysfs_of(rdev);
    let name = if let Some(f) = read_trimmed(&sys.join("loop/backing_file")) {
        format!("loop:{f}")
    } else if let Some(u) = read_trimmed(&sys.join("dm/uuid")) {
        format!("dm:{u}")
    } else {
        format!("dm-name:{}", read_trimmed(&sys.join("dm/name"))?)
    };
    Some(LunIdentity {
        designators: vec![Designator {
            kind: DesignatorKind::ScsiName,
            value: name.into_bytes(),
        }],
        serial: None,
    })
}

/// Is the device held by a mount or another driver (`open(O_EXCL)` answers `EBUSY`)?
pub fn held_by_host(path: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
}

fn scan_devices(globs: &[String]) -> Result<Vec<FoundLun>> {
    let mut out: Vec<FoundLun> = Vec::new();
    let mut by_rdev: HashMap<u64, usize> = HashMap::new();
    for g in globs {
        for path in expand_glob(g)? {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.file_type().is_block_device() {
                continue;
            }
            let shown = path.display().to_string();
            if let Some(&i) = by_rdev.get(&meta.rdev()) {
                out[i].paths.push(shown);
                continue;
            }
            let lun = probe_device(&path, meta.rdev());
            // Another device node with the same identity: one more path to that LUN.
            if let Some(i) = lun
                .identity
                .as_ref()
                .and_then(|id| out.iter().position(|l| l.identity.as_ref() == Some(id)))
            {
                by_rdev.insert(meta.rdev(), i);
                out[i].paths.push(shown);
                continue;
            }
            by_rdev.insert(meta.rdev(), out.len());
            out.push(lun);
        }
    }
    Ok(out)
}

/// Size, identity, vendor and product of one host device.
fn probe_device(path: &Path, rdev: u64) -> FoundLun {
    let shown = path.display().to_string();
    let sys = sysfs_of(rdev);
    let mut lun = FoundLun {
        name: shown.clone(),
        size: 0,
        identity: None,
        vendor: read_trimmed(&sys.join("device/vendor")),
        product: read_trimmed(&sys.join("device/model")),
        paths: vec![shown],
        unusable: None,
    };
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    match open(
        &BackendSpec::File {
            path: path.to_path_buf(),
        },
        &opts,
    ) {
        Ok(dev) => {
            lun.size = dev.info().size;
            lun.identity = dev.identity().or_else(|| substitute_identity(rdev));
            if held_by_host(path) {
                lun.unusable =
                    Some("in use by the host (mounted, or held by another driver)".into());
            } else if lun.size == 0 {
                lun.unusable = Some("the device is empty (size 0)".into());
            }
        }
        Err(e) => lun.unusable = Some(format!("cannot be opened: {e}")),
    }
    lun
}

/// Does `name` match glob `pattern` (`*`, `?`; neither matches `/`)?
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(b'?') if n[ni] != b'/' => {
                pi += 1;
                ni += 1;
            }
            Some(&c) if c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` take one more byte (never a `/`).
                Some((sp, sn)) if n[sn] != b'/' => {
                    star = Some((sp, sn + 1));
                    pi = sp + 1;
                    ni = sn + 1;
                }
                _ => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The paths matching an absolute glob, sorted per directory; at most
/// [`MAX_GLOB_MATCHES`].
pub fn expand_glob(pattern: &str) -> Result<Vec<PathBuf>> {
    let mut found = vec![PathBuf::from("/")];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let wild = comp.contains(['*', '?']);
        let mut next = Vec::new();
        for dir in &found {
            if !wild {
                let p = dir.join(comp);
                if std::fs::symlink_metadata(&p).is_ok() {
                    next.push(p);
                }
                continue;
            }
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.') || comp.starts_with('.'))
                .filter(|n| glob_match(comp, n))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
            if next.len() > MAX_GLOB_MATCHES {
                return Err(invalid(format!(
                    "device glob {pattern:?} matches more than {MAX_GLOB_MATCHES} paths"
                )));
            }
        }
        found = next;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_one_component_per_star() {
        assert!(glob_match("/dev/loop*", "/dev/loop0"));
        assert!(glob_match("/dev/loop*", "/dev/loop"));
        assert!(!glob_match("/dev/loop*", "/dev/loop0/x"));
        assert!(glob_match(
            "/dev/disk/by-path/*-lun-*",
            "/dev/disk/by-path/ip-1.2.3.4:3260-iscsi-iqn.x-lun-1"
        ));
        assert!(!glob_match(
            "/dev/disk/by-path/*-lun-*",
            "/dev/disk/by-path/pci-0000:00:1f.2-ata-1"
        ));
        assert!(glob_match("/dev/sd?", "/dev/sdb"));
        assert!(!glob_match("/dev/sd?", "/dev/sdb1"));
        assert!(glob_match("/dev/mapper/*", "/dev/mapper/mpatha"));
        assert!(!glob_match("/dev/mapper/*", "/dev/sda"));
        assert!(glob_match("/a/b", "/a/b"));
        assert!(!glob_match("/a/b", "/a/bc"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxaxxbxx"));
    }

    #[test]
    fn globs_expand_in_order_without_hidden_files() {
        let d = tempfile::tempdir().unwrap();
        for n in ["lun-b", "lun-a", ".lun-hidden", "other"] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/lun-c"), b"").unwrap();
        let g = format!("{}/lun-*", d.path().display());
        let got: Vec<String> = expand_glob(&g)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, ["lun-a", "lun-b"]);
        let g = format!("{}/*/lun-*", d.path().display());
        assert_eq!(expand_glob(&g).unwrap().len(), 1);
        let g = format!("{}/nothing-*", d.path().display());
        assert!(expand_glob(&g).unwrap().is_empty());
    }

    #[test]
    fn configurations_are_checked() {
        let t = |portals: &[&str], target: &str, options: &str| {
            LunSource::Iscsi(IscsiTarget {
                portals: portals.iter().map(|s| s.to_string()).collect(),
                target: target.into(),
                options: options.into(),
            })
        };
        LunPool::new(
            "a",
            t(&["127.0.0.1:3260"], "iqn.x:y", "login_timeout=5"),
            None,
        )
        .unwrap();
        for bad in [
            t(&[], "iqn.x:y", ""),
            t(&["127.0.0.1"], "", ""),
            t(&["127.0.0.1"], "iqn/x", ""),
            t(&["u@127.0.0.1"], "iqn.x", ""),
            t(&["127.0.0.1"], "iqn.x", "bogus=1"),
        ] {
            assert!(LunPool::new("a", bad.clone(), None).is_err(), "{bad:?}");
        }
        let d = |g: &[&str]| LunSource::Devices {
            globs: g.iter().map(|s| s.to_string()).collect(),
        };
        LunPool::new("b", d(&["/dev/loop*"]), None).unwrap();
        assert!(LunPool::new("b", d(&[]), None).is_err());
        assert!(LunPool::new("b", d(&["dev/loop*"]), None).is_err());
        assert!(LunPool::new("b", d(&["/dev/../etc/*"]), None).is_err());
    }

    #[test]
    fn iscsi_names() {
        assert_eq!(parse_iscsi_name("lun-0"), Some(0));
        assert_eq!(parse_iscsi_name("lun-16383"), Some(16383));
        assert_eq!(parse_iscsi_name("lun-16384"), None);
        assert_eq!(parse_iscsi_name("3"), None);
        assert_eq!(parse_iscsi_name("lun-x"), None);
    }

    #[test]
    fn a_device_name_outside_the_globs_is_refused() {
        let p = LunPool::new(
            "b",
            LunSource::Devices {
                globs: vec!["/dev/loop*".into()],
            },
            None,
        )
        .unwrap();
        let e = p.open("/etc/passwd", &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("matches no device glob"), "{e}");
    }
}
