//! `emberd export`: serve one file or device until SIGINT/SIGTERM.
//! (Being built under the foundation issue: the NBD listener and the vhost-user socket.)

use clap::Args;
use std::path::PathBuf;

/// Flags of `emberd export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// File or block device to serve (a LUKS volume with --passphrase-file).
    #[arg(long)]
    pub file: PathBuf,
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
    /// Open --file as a LUKS volume with the passphrase in this file.
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
}

/// Run the export.
pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    if !args.nbd.is_empty() {
        anyhow::bail!("--nbd is not built yet");
    }
    let Some(socket) = args.vhost_user.as_deref() else {
        anyhow::bail!("nothing to export: give --vhost-user and/or --nbd");
    };
    let signals = crate::vhost::block_exit_signals();
    let mut opts = ember_blockdev::OpenOptions {
        read_only: args.read_only,
        ..Default::default()
    };
    let spec = ember_blockdev::BackendSpec::parse(&args.file.to_string_lossy(), &mut opts)?;
    let dev = ember_blockdev::open(&spec, &opts)
        .with_context(|| format!("open {}", args.file.display()))?;
    let id = if args.name.is_empty() {
        args.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        args.name.clone()
    };
    let vhost = crate::vhost::spawn(
        dev,
        socket,
        crate::vhost::VhostConfig {
            num_queues: args.num_queues,
            read_only: args.read_only,
            id,
        },
    )?;
    let sig = crate::vhost::wait_exit_signal(&signals);
    tracing::info!(signal = sig, running = vhost.is_running(), "exiting");
    let _ = std::fs::remove_file(vhost.socket());
    Ok(())
}
