//! `emberd export`: serve one file or device until SIGINT/SIGTERM.
//!
//! Opens `--file` with the block layer, starts an [`NbdServer`] with `--threads` I/O
//! threads, exports the device under `--name` on every `--nbd` listener, then waits for
//! SIGINT or SIGTERM (blocked in every thread and taken with `sigwait`, so no handler
//! runs in the middle of I/O), shuts the server down, removes its Unix sockets and
//! exits 0. With `--vhost-user SOCKET` the same device is also served to vhost-user-blk
//! frontends (QEMU) by [`crate::vhost::spawn`]. The device stack comes from the one
//! builder, [`ember_blockdev::stack::build`], whatever the backend: `--file` (a file or a
//! host block device) or `--iscsi URI`, a LUN served through Ember's own iSCSI initiator
//! (CHAP credentials from `--chap-file`, never from the URI or argv). With
//! `--passphrase-file` the device is opened as a LUKS1/LUKS2 volume and its plaintext is
//! served (the crypt layer over the backend, within the `--max-…` cost limits); the
//! listeners appear once the keyslot is unlocked.

use crate::nbd::{ListenAddr, NbdLimitArgs, NbdLimits, NbdServer};
use anyhow::Context;
use clap::Args;
use ember_blockdev::layer::throttle::QosLimits;
use ember_blockdev::stack::{self, StackSpec, Unlock};
use ember_blockdev::sys::SignalSet;
use ember_blockdev::{BackendSpec, OpenOptions};
use std::path::PathBuf;

/// Flags of `emberd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// File or block device to serve (a LUKS volume with --passphrase-file).
    #[arg(long, required_unless_present = "iscsi", conflicts_with = "iscsi")]
    pub file: Option<PathBuf>,
    /// iSCSI LUN to serve through Ember's initiator:
    /// `iscsi://[user@]HOST[:PORT]/TARGET-IQN/LUN[?header_digest=crc32c&data_digest=crc32c&…]`.
    #[arg(long)]
    pub iscsi: Option<String>,
    /// With --iscsi: CHAP credentials file (`user = …`, `secret = …`, optional
    /// `target_user`/`target_secret` for mutual CHAP, `algorithms = md5,sha256`).
    #[arg(long, requires = "iscsi")]
    pub chap_file: Option<PathBuf>,
    /// NBD listener: `unix:SOCKET` or `HOST:PORT`. Repeatable.
    #[arg(long)]
    pub nbd: Vec<String>,
    /// NBD export name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// vhost-user-blk socket path to listen on.
    #[arg(long)]
    pub vhost_user: Option<PathBuf>,
    /// Number of vhost-user-blk queues.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// Number of I/O threads (default: number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Open the device (--file or --iscsi) as a LUKS volume with the passphrase in this file.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
    /// With --passphrase-file: cost limits for the LUKS header.
    #[command(flatten)]
    pub limits: crate::luks::LimitArgs,
    /// NBD memory, connection and time limits.
    #[command(flatten)]
    pub nbd_limits: NbdLimitArgs,
}

/// The backend spec of `--iscsi URI` with the CHAP credentials of `chap_file`.
fn iscsi_spec(uri: &str, chap_file: Option<&std::path::Path>) -> anyhow::Result<BackendSpec> {
    let mut cfg = ember_blockdev::backend::iscsi::IscsiConfig::parse_uri(uri)?;
    if let Some(p) = chap_file {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(p)
                .with_context(|| format!("read CHAP credentials {}", p.display()))?,
        );
        let creds = ember_blockdev::backend::iscsi::chap::ChapCredentials::parse_file(&text)
            .map_err(|e| anyhow::anyhow!("CHAP credentials {}: {e}", p.display()))?;
        cfg.chap = Some(creds);
    }
    Ok(BackendSpec::Iscsi(Box::new(cfg)))
}

/// Run the export.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.nbd.is_empty() || args.vhost_user.is_some(),
        "nothing to serve on: give --vhost-user SOCKET and/or --nbd unix:PATH or --nbd HOST:PORT"
    );
    let addrs = args
        .nbd
        .iter()
        .map(|a| a.parse::<ListenAddr>())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let limits = NbdLimits::try_from(&args.nbd_limits)?;
    let passphrase = match &args.passphrase_file {
        Some(p) => Some(crate::luks::read_passphrase(p)?),
        None => None,
    };
    let (backend, what) = match (&args.file, &args.iscsi) {
        (Some(path), _) => (
            BackendSpec::File { path: path.clone() },
            path.display().to_string(),
        ),
        (None, Some(uri)) => (iscsi_spec(uri, args.chap_file.as_deref())?, uri.clone()),
        (None, None) => anyhow::bail!("give --file or --iscsi"),
    };
    let spec = StackSpec {
        backend,
        open: OpenOptions {
            read_only: args.read_only,
            ..OpenOptions::default()
        },
        luks: passphrase.as_ref().map(|p| Unlock {
            passphrase: p,
            limits: args.limits.limits(),
        }),
        qos: QosLimits::default(),
        gate: None,
    };
    let as_luks = if spec.luks.is_some() {
        " as a LUKS volume"
    } else {
        ""
    };
    let dev = stack::build(&spec)
        .with_context(|| format!("open {what}{as_luks}"))?
        .top;
    let size = dev.info().size;

    // Blocked in this thread and every thread it starts later; waited for below.
    let set = SignalSet::block(&[libc::SIGINT, libc::SIGTERM]).context("block signals")?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
    let server = NbdServer::start(threads, limits)?;
    server.add_export(&args.name, dev.clone(), args.read_only)?;
    let mut bound = Vec::new();
    for a in &addrs {
        match server.listen(a) {
            Ok(b) => bound.push(b),
            Err(e) => {
                server.shutdown();
                return Err(e);
            }
        }
    }
    tracing::info!(
        device = %what,
        size,
        name = %args.name,
        read_only = args.read_only,
        threads,
        listeners = %bound.join(" "),
        "NBD export listening"
    );
    let vhost = match &args.vhost_user {
        Some(sock) => {
            let id = if args.name.is_empty() {
                args.file
                    .as_ref()
                    .and_then(|f| f.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                args.name.clone()
            };
            let cfg = crate::vhost::VhostConfig {
                num_queues: args.num_queues,
                read_only: args.read_only,
                id,
            };
            match crate::vhost::spawn(dev.clone(), sock, cfg) {
                Ok(v) => Some(v),
                Err(e) => {
                    server.shutdown();
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let sig = set.wait();
    tracing::info!(signal = sig, "shutting down");
    server.shutdown();
    if let Some(v) = vhost {
        if !v.is_running() {
            tracing::warn!("the vhost-user listener had stopped");
        }
        let _ = std::fs::remove_file(v.socket());
    }
    Ok(())
}
