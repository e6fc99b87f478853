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
//! (CHAP credentials from `--chap-file`, never from the URI or argv); a URI with several
//! portals (`iscsi://HOST1,HOST2/…`) serves the LUN through all of them (multipath,
//! [`ember_blockdev::backend::multipath`]). With `pr_key=` in the URI every session
//! registers the node's persistent-reservation key, and `--pr-reserve` / `--pr-preempt`
//! take the LUN's Write Exclusive – Registrants Only reservation before serving (the
//! second one fencing another node by preempting its key). With
//! `--passphrase-file` the device is opened as a LUKS1/LUKS2 volume and its plaintext is
//! served (the crypt layer over the backend, within the `--max-…` cost limits); the
//! listeners appear once the keyslot is unlocked. `--tls-creds`/`--tls-psk` give the NBD
//! listeners TLS credentials (x509 in qemu's layout, psktool keys) and `--tls` the mode
//! (off, on, require; require by default when credentials are given), see
//! [`crate::nbd::tls`]. Every client that passes the listener's TLS rule may use the
//! export (per-client export access is `emberd serve`'s).

use crate::nbd::{
    ListenAddr, NbdLimitArgs, NbdLimits, NbdServer, PskTable, TlsMode, TlsServer, X509Creds,
};
use anyhow::Context;
use clap::Args;
use ember_blockdev::backend::iscsi::IscsiConfig;
use ember_blockdev::backend::multipath::MultipathDevice;
use ember_blockdev::backend::scsi::pr::{PrOut, PrType};
use ember_blockdev::layer::throttle::QosLimits;
use ember_blockdev::stack::{self, StackSpec, Unlock};
use ember_blockdev::sys::SignalSet;
use ember_blockdev::{BackendSpec, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

/// Flags of `emberd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// File or block device to serve (a LUKS volume with --passphrase-file).
    #[arg(long, required_unless_present = "iscsi", conflicts_with = "iscsi")]
    pub file: Option<PathBuf>,
    /// iSCSI LUN to serve through Ember's initiator:
    /// `iscsi://[user@]HOST[:PORT][,HOST2[:PORT]…]/TARGET-IQN/LUN[?PARAMS]`. Several
    /// portals of one target are paths of one LUN, used active-active (multipath; the
    /// LUN identity must match through each). PARAMS: `header_digest`/`data_digest`
    /// (crc32c|none), `initiator` (IQN), `ro`, timers in seconds (`login_timeout`,
    /// `replacement_timeout` — also how long I/O waits with no path —, `request_timeout`,
    /// `timeout`, `nop_interval`, `nop_timeout`), `pr_key` (hex: this node's
    /// persistent-reservation key, registered on every session).
    #[arg(long)]
    pub iscsi: Option<String>,
    /// With --iscsi: CHAP credentials file (`user = …`, `secret = …`, optional
    /// `target_user`/`target_secret` for mutual CHAP, `algorithms = md5,sha256`).
    #[arg(long, requires = "iscsi")]
    pub chap_file: Option<PathBuf>,
    /// With --iscsi and `pr_key` in the URI: reserve the LUN (Write Exclusive –
    /// Registrants Only: every node that registered its key may write, no one else)
    /// before serving. Fails if another node holds the reservation.
    #[arg(long, requires = "iscsi", conflicts_with = "pr_preempt")]
    pub pr_reserve: bool,
    /// With --iscsi and `pr_key` in the URI: fence the node whose key is KEY (hex)
    /// before serving: PREEMPT removes its registrations on every path (its writes then
    /// fail with RESERVATION CONFLICT) and this node takes the reservation.
    #[arg(long, requires = "iscsi", value_name = "KEY")]
    pub pr_preempt: Option<String>,
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
    /// NBD TLS (`NBD_OPT_STARTTLS`): x509 directory in qemu's layout (`ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// With --tls-creds: require a client certificate signed by `ca-cert.pem` (qemu's
    /// `verify-peer=on`).
    #[arg(long, requires = "tls_creds")]
    pub tls_verify_peer: bool,
    /// NBD TLS with pre-shared keys: a GnuTLS psktool file (`identity:hexkey` lines).
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// NBD TLS mode: `off`, `on` (clients may upgrade) or `require` (everything else is
    /// refused with NBD_REP_ERR_TLS_REQD). Default: `require` with --tls-creds or
    /// --tls-psk, else `off` (as qemu-nbd).
    #[arg(long, value_enum)]
    pub tls: Option<TlsMode>,
}

/// The TLS mode and server of `--tls`, `--tls-creds`, `--tls-verify-peer`, `--tls-psk`.
fn tls_server(args: &ExportArgs) -> anyhow::Result<(TlsMode, Option<Arc<TlsServer>>)> {
    let have = args.tls_creds.is_some() || args.tls_psk.is_some();
    let mode = args
        .tls
        .unwrap_or(if have { TlsMode::Require } else { TlsMode::Off });
    if mode == TlsMode::Off {
        return Ok((mode, None));
    }
    anyhow::ensure!(
        have,
        "--tls {} needs credentials: give --tls-creds DIR and/or --tls-psk FILE",
        if mode == TlsMode::On { "on" } else { "require" }
    );
    let psk = match &args.tls_psk {
        Some(p) => Some(Arc::new(PskTable::load(p)?)),
        None => None,
    };
    let x509 = args.tls_creds.as_ref().map(|dir| X509Creds {
        dir: dir.clone(),
        verify_peer: args.tls_verify_peer,
    });
    let server = TlsServer::new(psk, x509.as_ref())?;
    Ok((mode, Some(Arc::new(server))))
}

/// The configuration of `--iscsi URI` with the CHAP credentials of `chap_file`.
fn iscsi_config(uri: &str, chap_file: Option<&std::path::Path>) -> anyhow::Result<IscsiConfig> {
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
    Ok(cfg)
}

/// `--pr-reserve` / `--pr-preempt KEY`: take the LUN's reservation for this node's key
/// (through the first portal that answers), and log the registered keys and holder.
fn reservation(cfg: &IscsiConfig, reserve: bool, preempt: Option<&str>) -> anyhow::Result<()> {
    let victim = match preempt {
        Some(k) => Some(
            u64::from_str_radix(k.strip_prefix("0x").unwrap_or(k), 16)
                .ok()
                .filter(|k| *k != 0)
                .with_context(|| format!("--pr-preempt {k}: expected a non-zero hex key"))?,
        ),
        None => None,
    };
    if !reserve && victim.is_none() {
        return Ok(());
    }
    let key = cfg
        .pr_key
        .context("--pr-reserve/--pr-preempt need this node's key: add pr_key=HEX to the URI")?;
    let dev = MultipathDevice::open(cfg.clone())?;
    let ty = PrType::WriteExclusiveRegistrantsOnly;
    let cmd = match victim {
        Some(victim) => PrOut::Preempt { key, victim, ty },
        None => PrOut::Reserve { key, ty },
    };
    let (keys, holder) = dev
        .pr_out_and_read(cmd)
        .with_context(|| format!("{} with key {key:#x}", cmd.name()))?;
    tracing::info!(
        action = cmd.name(),
        key = format_args!("{key:#x}"),
        victim = ?victim.map(|v| format!("{v:#x}")),
        registered = ?keys.keys.iter().map(|k| format!("{k:#x}")).collect::<Vec<_>>(),
        holder = ?holder.map(|h| format!("{:#x}", h.key)),
        kind = %holder.and_then(|h| h.ty).map_or("none".into(), |t| t.to_string()),
        "persistent reservation taken"
    );
    Ok(())
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
    let (tls_mode, tls) = tls_server(&args)?;
    let passphrase = match &args.passphrase_file {
        Some(p) => Some(crate::luks::read_passphrase(p)?),
        None => None,
    };
    let (backend, what) = match (&args.file, &args.iscsi) {
        (Some(path), _) => (
            BackendSpec::File { path: path.clone() },
            path.display().to_string(),
        ),
        (None, Some(uri)) => {
            let cfg = iscsi_config(uri, args.chap_file.as_deref())?;
            reservation(&cfg, args.pr_reserve, args.pr_preempt.as_deref())?;
            (BackendSpec::Iscsi(Box::new(cfg)), uri.clone())
        }
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
        match server.listen_tls(a, tls_mode, tls.clone()) {
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
        tls = ?tls_mode,
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
