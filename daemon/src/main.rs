//! `emberd`: Ember's storage daemon.
//!
//! Subcommands:
//! - `emberd export`: serve one file or device over NBD and/or vhost-user-blk until
//!   SIGINT/SIGTERM (like qemu-nbd / qemu-storage-daemon, for users and benches);
//! - `emberd serve`: the full daemon, data plane plus REST control plane;
//! - `emberd luks …`: format, inspect and manage keyslots of LUKS volumes.
//!
//! `main` only parses arguments, installs logging and dispatches; each subcommand lives
//! in its own module with its `*Args` and a `run` function.

use ember_daemon::{export, logging, luks, serve};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Ember storage daemon: block volumes over NBD and vhost-user-blk, on io_uring.
#[derive(Debug, Parser)]
#[command(name = "emberd", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one file, block device or iSCSI LUN over NBD and/or vhost-user-blk until
    /// SIGINT/SIGTERM.
    Export(export::ExportArgs),
    /// Run the full daemon: data plane and REST control plane.
    Serve(serve::ServeArgs),
    /// Format, inspect and manage LUKS volumes.
    Luks(luks::LuksArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let result = match cli.command {
        Command::Export(a) => export::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Luks(a) => luks::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emberd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
