//! What an NBD server lets its clients cost: the flags, their defaults and checks.
//!
//! Every NBD client is hostile (docs/threat-model.md §2). These limits bound what all of
//! them together, and each of them alone, can make the server hold:
//!
//! | limit | default | flag |
//! |---|---|---|
//! | memory of all connections (buffers, replies, receive buffers, idle buffer pools; split at start, see [`super::gate`]) | 1024 MiB | `--nbd-memory-mib` |
//! | memory of one connection | 64 MiB | `--nbd-conn-memory-mib` |
//! | connections after the handshake | 256 | `--nbd-max-conns` |
//! | connections of one peer (TCP: its IP address; Unix socket: its uid) | 128 | `--nbd-max-conns-per-peer` |
//! | the whole handshake, greeting to `NBD_OPT_GO` | 10 s | `--nbd-handshake-timeout-secs` |
//! | a reply left unread, or a request left half sent | 120 s | `--nbd-stall-timeout-secs` |
//! | handshakes in progress | 128 | [`MAX_HANDSHAKES`] |
//! | handshakes in progress of one peer | 8 | [`MAX_HANDSHAKES_PER_PEER`] |
//! | options in one handshake | 1024 | [`super::handshake::MAX_OPTIONS`] |
//! | requests of one connection not yet answered | 512 | [`super::conn::MAX_REQUESTS`] |
//!
//! The same flags exist on `emberd export` and `emberd serve` ([`NbdLimitArgs`], flattened
//! into both; each also an `EMBER_NBD_*` variable and, for `serve`, a key of its
//! `--config` file: `nbd-memory-mib = 2048`); [`NbdLimits`] is the checked form the
//! server takes.

use clap::Args;
use std::time::Duration;

/// Default of `--nbd-memory-mib`.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
/// Default of `--nbd-conn-memory-mib`: 32 MiB of requests in flight plus one maximum-size
/// request, the bound the server always had.
pub const DEFAULT_CONN_MEMORY_MIB: u64 = 64;
/// Default of `--nbd-max-conns`.
pub const DEFAULT_MAX_CONNS: usize = 256;
/// Default of `--nbd-max-conns-per-peer`: half the connections, so one peer cannot take
/// them all.
pub const DEFAULT_MAX_CONNS_PER_PEER: usize = 128;
/// Default of `--nbd-handshake-timeout-secs`. Real clients finish in milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default of `--nbd-stall-timeout-secs`. Long enough for a client paused by a debugger or
/// a loaded host; a client that reads nothing for two minutes is broken or hostile.
pub const DEFAULT_STALL_TIMEOUT_SECS: u64 = 120;
/// Handshakes in progress at once (each holds a thread until its deadline); more clients
/// are closed at once, before the greeting.
pub const MAX_HANDSHAKES: usize = 128;
/// Handshakes in progress at once from one peer.
pub const MAX_HANDSHAKES_PER_PEER: usize = 8;

const MIB: u64 = 1 << 20;

/// NBD resource flags, shared by `emberd export` and `emberd serve` (where each is also a
/// key of the `--config` file). A limit not given is its default ([`NbdLimits::try_from`]
/// fills it in).
#[derive(Debug, Clone, Default, Args)]
pub struct NbdLimitArgs {
    /// Memory all NBD connections together may hold (request and reply buffers, receive
    /// buffers, idle buffer pools), in MiB. Split at start: idle buffers, a floor of about
    /// 1.5 MiB per --nbd-max-conns connection, and a shared rest of at least 32 MiB (else
    /// emberd does not start). Connections that find the shared rest spent stop reading
    /// until memory frees [default: 1024].
    #[arg(long, env = "EMBER_NBD_MEMORY_MIB", value_name = "MIB")]
    pub nbd_memory_mib: Option<u64>,
    /// Memory one NBD connection may hold, in MiB (at least 34: one 32 MiB request, the
    /// receive buffer and bookkeeping). Over it the connection stops reading until its
    /// replies drain [default: 64].
    #[arg(long, env = "EMBER_NBD_CONN_MEMORY_MIB", value_name = "MIB")]
    pub nbd_conn_memory_mib: Option<u64>,
    /// Most NBD connections at once; a client beyond it is refused at NBD_OPT_GO with
    /// NBD_REP_ERR_POLICY ("too many connections") [default: 256].
    #[arg(long, env = "EMBER_NBD_MAX_CONNS", value_name = "N")]
    pub nbd_max_conns: Option<usize>,
    /// Most NBD connections of one peer: a TCP client's IP address, a Unix-socket
    /// client's uid (SO_PEERCRED) [default: 128].
    #[arg(long, env = "EMBER_NBD_MAX_CONNS_PER_PEER", value_name = "N")]
    pub nbd_max_conns_per_peer: Option<usize>,
    /// Time an NBD client has for its whole handshake (greeting to NBD_OPT_GO), in seconds
    /// [default: 10].
    #[arg(long, env = "EMBER_NBD_HANDSHAKE_TIMEOUT_SECS", value_name = "SECS")]
    pub nbd_handshake_timeout_secs: Option<u64>,
    /// Drop an NBD client that leaves a reply unread, or a request half sent, this long
    /// (seconds). Idle clients between requests are never dropped [default: 120].
    #[arg(long, env = "EMBER_NBD_STALL_TIMEOUT_SECS", value_name = "SECS")]
    pub nbd_stall_timeout_secs: Option<u64>,
}

impl NbdLimitArgs {
    /// Each limit given here, else the one in `fallback` (a config file).
    pub fn or(&self, fallback: &NbdLimitArgs) -> NbdLimitArgs {
        NbdLimitArgs {
            nbd_memory_mib: self.nbd_memory_mib.or(fallback.nbd_memory_mib),
            nbd_conn_memory_mib: self.nbd_conn_memory_mib.or(fallback.nbd_conn_memory_mib),
            nbd_max_conns: self.nbd_max_conns.or(fallback.nbd_max_conns),
            nbd_max_conns_per_peer: self
                .nbd_max_conns_per_peer
                .or(fallback.nbd_max_conns_per_peer),
            nbd_handshake_timeout_secs: self
                .nbd_handshake_timeout_secs
                .or(fallback.nbd_handshake_timeout_secs),
            nbd_stall_timeout_secs: self
                .nbd_stall_timeout_secs
                .or(fallback.nbd_stall_timeout_secs),
        }
    }
}

/// Checked NBD limits (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdLimits {
    /// Bytes all connections together may hold.
    pub memory_bytes: usize,
    /// Bytes one connection may hold, everything included.
    pub conn_memory_bytes: usize,
    /// Connections after the handshake.
    pub max_conns: usize,
    /// Connections of one peer.
    pub max_conns_per_peer: usize,
    /// The whole handshake.
    pub handshake_timeout: Duration,
    /// An unread reply or a half-sent request.
    pub stall_timeout: Duration,
}

impl Default for NbdLimits {
    fn default() -> Self {
        // The defaults pass the checks.
        match NbdLimits::try_from(&NbdLimitArgs::default()) {
            Ok(l) => l,
            Err(_) => NbdLimits {
                memory_bytes: (DEFAULT_MEMORY_MIB * MIB) as usize,
                conn_memory_bytes: (DEFAULT_CONN_MEMORY_MIB * MIB) as usize,
                max_conns: DEFAULT_MAX_CONNS,
                max_conns_per_peer: DEFAULT_MAX_CONNS_PER_PEER,
                handshake_timeout: Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT_SECS),
                stall_timeout: Duration::from_secs(DEFAULT_STALL_TIMEOUT_SECS),
            },
        }
    }
}

/// Bytes one connection needs at least: its fixed part and one maximum-size request.
pub fn min_conn_bytes() -> usize {
    super::conn::FIXED_BYTES + super::conn::FLOOR_IO_BYTES + super::MAX_BLOCK_BYTES as usize
}

fn mib(flag: &str, v: u64) -> anyhow::Result<usize> {
    v.checked_mul(MIB)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| anyhow::anyhow!("{flag} {v} is too large"))
}

impl TryFrom<&NbdLimitArgs> for NbdLimits {
    type Error = anyhow::Error;

    fn try_from(a: &NbdLimitArgs) -> anyhow::Result<NbdLimits> {
        let memory_mib = a.nbd_memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        let conn_memory_mib = a.nbd_conn_memory_mib.unwrap_or(DEFAULT_CONN_MEMORY_MIB);
        let max_conns = a.nbd_max_conns.unwrap_or(DEFAULT_MAX_CONNS);
        let max_conns_per_peer = a
            .nbd_max_conns_per_peer
            .unwrap_or(DEFAULT_MAX_CONNS_PER_PEER);
        let handshake_secs = a
            .nbd_handshake_timeout_secs
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_SECS);
        let stall_secs = a
            .nbd_stall_timeout_secs
            .unwrap_or(DEFAULT_STALL_TIMEOUT_SECS);
        let memory_bytes = mib("--nbd-memory-mib", memory_mib)?;
        let conn_memory_bytes = mib("--nbd-conn-memory-mib", conn_memory_mib)?;
        let min_conn = min_conn_bytes();
        anyhow::ensure!(
            conn_memory_bytes >= min_conn,
            "--nbd-conn-memory-mib must be at least {} (one {} MiB request and the receive buffer)",
            min_conn.div_ceil(MIB as usize),
            super::MAX_BLOCK_BYTES >> 20
        );
        anyhow::ensure!(
            memory_bytes >= conn_memory_bytes,
            "--nbd-memory-mib ({memory_mib}) must be at least --nbd-conn-memory-mib \
             ({conn_memory_mib})"
        );
        anyhow::ensure!(max_conns >= 1, "--nbd-max-conns must be at least 1");
        anyhow::ensure!(
            (1..=max_conns).contains(&max_conns_per_peer),
            "--nbd-max-conns-per-peer must be 1..=--nbd-max-conns"
        );
        anyhow::ensure!(
            (1..=3600).contains(&handshake_secs),
            "--nbd-handshake-timeout-secs must be 1..3600"
        );
        anyhow::ensure!(
            (1..=86400).contains(&stall_secs),
            "--nbd-stall-timeout-secs must be 1..86400"
        );
        Ok(NbdLimits {
            memory_bytes,
            conn_memory_bytes,
            max_conns,
            max_conns_per_peer,
            handshake_timeout: Duration::from_secs(handshake_secs),
            stall_timeout: Duration::from_secs(stall_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_bad_values_fail_clearly() {
        let d = NbdLimits::try_from(&NbdLimitArgs::default()).unwrap();
        assert_eq!(d, NbdLimits::default());
        assert_eq!(d.memory_bytes, 1 << 30);
        assert_eq!(d.conn_memory_bytes, 64 << 20);
        let bad = |f: fn(&mut NbdLimitArgs)| {
            let mut a = NbdLimitArgs::default();
            f(&mut a);
            NbdLimits::try_from(&a).unwrap_err().to_string()
        };
        assert!(bad(|a| a.nbd_conn_memory_mib = Some(8)).contains("--nbd-conn-memory-mib"));
        assert!(bad(|a| a.nbd_memory_mib = Some(40)).contains("--nbd-memory-mib"));
        assert!(bad(|a| a.nbd_memory_mib = Some(u64::MAX)).contains("too large"));
        assert!(bad(|a| a.nbd_max_conns = Some(0)).contains("--nbd-max-conns"));
        assert!(bad(|a| a.nbd_max_conns_per_peer = Some(1000)).contains("per-peer"));
        assert!(bad(|a| a.nbd_handshake_timeout_secs = Some(0)).contains("handshake"));
        assert!(bad(|a| a.nbd_stall_timeout_secs = Some(0)).contains("stall"));
    }
}
