//! `emberd serve`: the full daemon (control plane issue).

use clap::Args;

/// Flags of `emberd serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {}

/// Run the daemon.
pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("emberd serve is not built yet")
}
