//! `emberd luks`: LUKS tools (LUKS issue).

use clap::Args;

/// Flags of `emberd luks`.
#[derive(Debug, Args)]
pub struct LuksArgs {}

/// Run a LUKS subcommand.
pub fn run(_args: LuksArgs) -> anyhow::Result<()> {
    anyhow::bail!("emberd luks is not built yet")
}
