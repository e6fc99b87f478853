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
pub fn run(_args: ExportArgs) -> anyhow::Result<()> {
    anyhow::bail!("emberd export is not built yet")
}
