//! Backends: where the bytes live. [`open`] is the one way to open a device.
//!
//! Specs are URIs so that one parser rejects unknown parameters:
//! - `file:///path/to/file?direct=auto|on|off&ro=0|1&wait=SECONDS` (or just a path);
//!   host block devices (FC and kernel-iSCSI LUNs) are files too;
//! - `iscsi://[user@]host[:port][,host2[:port]…]/target-iqn/lun?…` (a LUN through
//!   Ember's initiator, through several portals as one [`multipath`] device; see
//!   [`iscsi::IscsiConfig::parse_uri`]; CHAP secrets are set on the parsed config, never
//!   taken from the URI);
//! - `null://?size=BYTES` (reads zeros, discards writes; for measuring overhead).

pub mod file;
pub mod iscsi;
pub mod multipath;
pub mod null;
pub mod scsi;

use crate::error::{Error, ErrorKind, Result};
use crate::BlockDevice;
use std::path::PathBuf;
use std::sync::Arc;

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direct {
    /// O_DIRECT when the file system allows it, else buffered with one log line.
    #[default]
    Auto,
    /// O_DIRECT or fail.
    On,
    /// Buffered I/O.
    Off,
}

/// Options common to every backend.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Page cache policy.
    pub direct: Direct,
    /// Wait up to this long for a device path that is not there yet (a LUN that an FC
    /// rescan or a multipath map brings late). `None`: fail at once.
    pub wait: Option<std::time::Duration>,
}

/// A parsed backend spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A regular file or a host block device.
    File {
        /// Path of the file or device.
        path: PathBuf,
    },
    /// The null device of the given size.
    Null {
        /// Size in bytes.
        size: u64,
    },
    /// A LUN through Ember's iSCSI initiator.
    Iscsi(Box<iscsi::IscsiConfig>),
}

impl BackendSpec {
    /// Parse a spec: a URI (`file://`, `null://`) or a plain path. Options found in the
    /// query string are applied to `opts`; unknown parameters are an error.
    pub fn parse(spec: &str, opts: &mut OpenOptions) -> Result<Self> {
        let bad = |m: String| Error::new(ErrorKind::InvalidConfig, m);
        if spec.starts_with("iscsi://") {
            let c = iscsi::IscsiConfig::parse_uri(spec)?;
            opts.read_only |= c.read_only;
            return Ok(BackendSpec::Iscsi(Box::new(c)));
        }
        let (scheme, rest) = match spec.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("file", spec),
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut size = None;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match (scheme, k) {
                ("file", "direct") => {
                    opts.direct = match v {
                        "auto" => Direct::Auto,
                        "on" | "1" | "true" => Direct::On,
                        "off" | "0" | "false" => Direct::Off,
                        _ => return Err(bad(format!("direct={v}: expected auto, on or off"))),
                    }
                }
                (_, "ro") => opts.read_only = matches!(v, "1" | "true" | "on" | ""),
                ("file", "wait") => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| bad(format!("wait={v}: expected seconds")))?;
                    opts.wait = Some(std::time::Duration::from_secs(secs));
                }
                ("null", "size") => {
                    size = Some(parse_size(v).ok_or_else(|| bad(format!("size={v}: not a size")))?)
                }
                _ => return Err(bad(format!("unknown parameter {k:?} for {scheme}://"))),
            }
        }
        match scheme {
            "file" if !path.is_empty() => Ok(BackendSpec::File {
                path: PathBuf::from(path),
            }),
            "file" => Err(bad("file:// needs a path".into())),
            "null" => Ok(BackendSpec::Null {
                size: size.unwrap_or(1 << 30),
            }),
            other => Err(bad(format!("unknown backend scheme {other:?}"))),
        }
    }
}

/// Parse `123`, `4k`, `10M`, `1G`, `2T` (binary units) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Open a device from a spec.
pub fn open(spec: &BackendSpec, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>> {
    match spec {
        BackendSpec::File { path } => Ok(Arc::new(file::FileDevice::open(path, opts)?)),
        BackendSpec::Null { size } => Ok(Arc::new(null::NullDevice::new(*size, opts.read_only))),
        BackendSpec::Iscsi(c) => {
            let mut c = (**c).clone();
            c.read_only |= opts.read_only;
            if c.extra_portals.is_empty() {
                Ok(Arc::new(iscsi::IscsiDevice::open(c)?))
            } else {
                Ok(Arc::new(multipath::MultipathDevice::open(c)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let mut o = OpenOptions::default();
        assert_eq!(
            BackendSpec::parse("/tmp/x", &mut o).unwrap(),
            BackendSpec::File {
                path: "/tmp/x".into()
            }
        );
        assert_eq!(
            BackendSpec::parse("file:///tmp/x?direct=off&ro=1", &mut o).unwrap(),
            BackendSpec::File {
                path: "/tmp/x".into()
            }
        );
        assert!(o.read_only);
        assert_eq!(o.direct, Direct::Off);
        assert_eq!(
            BackendSpec::parse("null://?size=1G", &mut o).unwrap(),
            BackendSpec::Null { size: 1 << 30 }
        );
        assert!(BackendSpec::parse("file:///x?bogus=1", &mut o).is_err());
        assert!(BackendSpec::parse("nvme://x", &mut o).is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
