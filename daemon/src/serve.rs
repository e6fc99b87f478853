//! `emberd serve`: the full daemon — REST control plane (and, once wired, the data plane).
//!
//! Settings come from flags, then environment variables (`EMBER_*`, shown in `--help`),
//! then the TOML file given by `--config` (same keys as the flags, kebab-case), then the
//! defaults. The REST shim runs on a small tokio runtime; SIGTERM/SIGINT stop accepting
//! requests, let in-flight ones finish and exit 0. The node registers in the database
//! under `--node-name` in cluster `--cluster` with the addresses it serves on, and every
//! `--heartbeat-secs` (or every third of the lock lease, if that is shorter) one tick
//! refreshes its heartbeat row, then renews its lock leases and reaps expired holders
//! ([`ember_control::Control::membership_tick`]); other nodes show it `down` once the
//! heartbeat is older than `--service-down-time`. REST connections are
//! bounded in number (in all and per peer address) and closed when idle
//! ([`crate::rest_listener`]): a peer that sends half a request holds nothing for long.
//!
//! Storage pools come from the config (`[pools.NAME] path = "…"`); the default is one
//! directory pool `default` at `DATA/pools/default`. A pool with `kind = "lun"` is a LUN
//! pool: every LUN of one iSCSI target (`portals`, `target`, CHAP by secret id of the
//! key store: `chap-user`, `chap-secret`, optional `chap-target-user` and
//! `chap-target-secret` for mutual CHAP, `chap-algorithms`, `iscsi-options`) or the
//! host block devices matching `devices` globs (`device-wait-secs`); see the README's
//! configuration reference.
//!
//! The data plane: an NBD server listens on every `--nbd` address (TLS with a key per
//! attachment unless `--nbd-tls off`, see [`crate::dataplane`]); the control plane
//! reaches it only through its typed volume-lifecycle interface,
//! [`ember_control::DataPlane`], implemented by [`EmberDataPlane`]: storage pools, LUKS
//! header work, device stacks, NBD exports and vhost-user sockets in `--vhost-dir`.
//! At start-up a reconciliation pass cleans up after a crash. While it serves, two
//! periodic tasks run: the membership tick above (heartbeat, then lock leases renewed
//! and expired holders reaped), and every `--lun-health-secs` the health check of the
//! attached LUN volumes, whose faults are shown on them
//! ([`ember_control::volumes::manageable::check_health`]). At exit both tasks stop, the
//! data plane stops every attachment, then the runtime waits at most
//! [`BLOCKING_SHUTDOWN`] for blocking work still running (a copy, an unlock).

use crate::dataplane::luns::LunPoolSetup;
use crate::dataplane::EmberDataPlane;
use crate::luks::LimitArgs;
use crate::nbd::{ListenAddr, NbdLimitArgs, NbdLimits, TlsMode};
use crate::rest_listener::{BoundedListener, RestLimits};
use anyhow::Context;
use clap::Args;
use ember_blockdev::backend::iscsi::chap::ChapAlg;
use ember_blockdev::pool::lun::{IscsiTarget, LunSource};
use ember_blockdev::pool::LunPool;
use ember_control::dataplane::ChapRef;
use ember_control::{Control, ControlConfig};
use ember_crypto::UnlockLimits;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Flags of `emberd serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory: admin token, master key, SQLite database, default pool [default: ./ember-data].
    #[arg(long, env = "EMBER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// REST API listen address [default: 127.0.0.1:8776].
    #[arg(long, env = "EMBER_REST", value_name = "ADDR")]
    pub rest: Option<String>,
    /// NBD listen address, HOST:PORT or unix:PATH; repeatable (env: comma separated) [default: 127.0.0.1:10809].
    #[arg(long, env = "EMBER_NBD", value_name = "ADDR", value_delimiter = ',')]
    pub nbd: Vec<String>,
    /// Directory for vhost-user-blk sockets [default: DATA/vhost].
    #[arg(long, env = "EMBER_VHOST_DIR", value_name = "DIR")]
    pub vhost_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or mysql://USER:PASSWORD@HOST[:PORT]/DB [default: sqlite://DATA/ember.db].
    #[arg(long, env = "EMBER_DATABASE", value_name = "URL")]
    pub database: Option<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long, env = "EMBER_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Cluster this node joins: nodes with the same name and database form one cluster
    /// (`GET /v3/{project_id}/clusters`) [default: ember].
    #[arg(long, env = "EMBER_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// Seconds between two heartbeats of this node in the database (Cinder's
    /// report_interval); the same tick renews its lock leases [default: 10].
    #[arg(long, env = "EMBER_HEARTBEAT_SECS", value_name = "SECS")]
    pub heartbeat_secs: Option<u64>,
    /// A node whose last heartbeat is older than this many seconds is shown `down` in
    /// os-services and clusters (Cinder's service_down_time); at least twice
    /// --heartbeat-secs [default: 60].
    #[arg(long, env = "EMBER_SERVICE_DOWN_TIME", value_name = "SECS")]
    pub service_down_time: Option<u64>,
    /// Master key sealing secrets (32 raw bytes or 64 hex chars, mode 0600) [default: DATA/master.key, created if missing].
    #[arg(long, env = "EMBER_MASTER_KEY_FILE", value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// TOML file with the same keys as these flags (kebab-case) plus storage pools: `[pools.NAME] path = "DIR"`, or `kind = "lun"` LUN pools (README: LUN pools).
    #[arg(long, env = "EMBER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Lease of this node's database locks in seconds; the node renews them every third
    /// of it, and a dead node's locks free up after it [default: 30].
    #[arg(long, env = "EMBER_LOCK_LEASE_SECS", value_name = "SECS")]
    pub lock_lease_secs: Option<u64>,
    /// Seconds between health checks of attached LUN volumes (a short iSCSI login or a
    /// read of the host device, plus the faults their I/O saw); a fault shows on the
    /// volume (`lun.health`, `lun.fault`) within about this time [default: 30].
    #[arg(long, env = "EMBER_LUN_HEALTH_SECS", value_name = "SECS")]
    pub lun_health_secs: Option<u64>,
    /// Most REST connections open at a time; past it, new ones wait until one closes
    /// [default: 512].
    #[arg(long, env = "EMBER_REST_MAX_CONNS", value_name = "N")]
    pub rest_max_conns: Option<usize>,
    /// Most REST connections open from one IP address; more are closed at once
    /// [default: 64].
    #[arg(long, env = "EMBER_REST_MAX_CONNS_PER_PEER", value_name = "N")]
    pub rest_max_conns_per_peer: Option<usize>,
    /// Seconds a REST connection may wait with no byte moving (a half-sent request, a
    /// response the peer does not read, an idle keep-alive) before it is closed; keep it
    /// above the slowest request (an unlock at the LUKS cost limits) [default: 120].
    #[arg(long, env = "EMBER_REST_IDLE_TIMEOUT_SECS", value_name = "SECS")]
    pub rest_idle_timeout_secs: Option<u64>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// NBD memory, connection and time limits.
    #[command(flatten)]
    pub nbd_limits: NbdLimitArgs,
    /// NBD TLS on the --nbd listeners: `require` gives each NBD attachment its own
    /// pre-shared key (returned in connection_info.data.tls, kept sealed with the
    /// attachment so it survives a restart) and shows its export only to a client that
    /// authenticated with it; TCP listeners demand TLS, Unix sockets offer it and admit a
    /// plaintext client only to attachments whose connector named its uid/gid; `off`
    /// serves every export to every client of the listeners, without TLS [default:
    /// require].
    #[arg(long, env = "EMBER_NBD_TLS", value_name = "MODE", value_parser = ["off", "require"])]
    pub nbd_tls: Option<String>,
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    pub rest: Option<String>,
    pub nbd: Option<Vec<String>>,
    pub vhost_dir: Option<PathBuf>,
    pub database: Option<String>,
    pub node_name: Option<String>,
    pub cluster: Option<String>,
    pub heartbeat_secs: Option<u64>,
    pub service_down_time: Option<u64>,
    pub lock_lease_secs: Option<u64>,
    pub master_key_file: Option<PathBuf>,
    pub pools: Option<BTreeMap<String, RawPool>>,
    pub max_pbkdf2_iterations: Option<u32>,
    pub max_argon2_time: Option<u32>,
    pub max_argon2_memory: Option<u64>,
    pub max_argon2_lanes: Option<u32>,
    pub max_digest_iterations: Option<u32>,
    pub max_af_stripes: Option<u32>,
    pub max_luks2_metadata: Option<u64>,
    pub max_keyslots_area: Option<u64>,
    pub nbd_memory_mib: Option<u64>,
    pub nbd_conn_memory_mib: Option<u64>,
    pub nbd_max_conns: Option<usize>,
    pub nbd_max_conns_per_peer: Option<usize>,
    pub nbd_handshake_timeout_secs: Option<u64>,
    pub nbd_stall_timeout_secs: Option<u64>,
    pub rest_max_conns: Option<usize>,
    pub rest_max_conns_per_peer: Option<usize>,
    pub rest_idle_timeout_secs: Option<u64>,
    pub nbd_tls: Option<String>,
    pub lun_health_secs: Option<u64>,
}

/// A storage pool (a directory holding volume files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub path: PathBuf,
}

/// A `[pools.NAME]` table of the config file: a directory pool (`path`) or, with
/// `kind = "lun"`, a LUN pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawPool {
    /// `dir` (default) or `lun`.
    pub kind: Option<String>,
    /// Directory pools: the directory.
    pub path: Option<PathBuf>,
    /// iSCSI LUN pools: `host[:port]` of each portal, preferred first.
    pub portals: Option<Vec<String>>,
    /// iSCSI LUN pools: the target IQN.
    pub target: Option<String>,
    /// CHAP user name.
    pub chap_user: Option<String>,
    /// Id of the secret (key store) whose payload is the CHAP secret.
    pub chap_secret: Option<String>,
    /// Mutual CHAP: the target's user name.
    pub chap_target_user: Option<String>,
    /// Mutual CHAP: id of the target's secret.
    pub chap_target_secret: Option<String>,
    /// CHAP algorithms offered, preferred first (`sha256`, `sha1`, `md5`).
    pub chap_algorithms: Option<Vec<String>>,
    /// Query string of `iscsi://` options for every session (digests, timeouts, initiator name).
    pub iscsi_options: Option<String>,
    /// Device LUN pools: absolute path globs of host block devices.
    pub devices: Option<Vec<String>>,
    /// Device LUN pools: how long an open waits for a device path that is not there yet.
    pub device_wait_secs: Option<u64>,
}

/// A LUN pool of the config (see [`RawPool`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunPoolConfig {
    pub source: LunSource,
    pub chap: Option<ChapRef>,
    pub chap_algorithms: Vec<ChapAlg>,
    pub device_wait: Option<Duration>,
}

/// Split the `[pools.*]` tables into directory pools and LUN pools, with clear errors.
fn split_pools(
    raw: BTreeMap<String, RawPool>,
) -> anyhow::Result<(
    BTreeMap<String, PoolConfig>,
    BTreeMap<String, LunPoolConfig>,
)> {
    let mut dirs = BTreeMap::new();
    let mut luns = BTreeMap::new();
    for (name, p) in raw {
        let lun_keys = p.portals.is_some()
            || p.target.is_some()
            || p.chap_user.is_some()
            || p.chap_secret.is_some()
            || p.chap_target_user.is_some()
            || p.chap_target_secret.is_some()
            || p.chap_algorithms.is_some()
            || p.iscsi_options.is_some()
            || p.devices.is_some()
            || p.device_wait_secs.is_some();
        match p.kind.as_deref().unwrap_or("dir") {
            "dir" => {
                anyhow::ensure!(!lun_keys, "pool {name}: LUN pool keys need kind = \"lun\"");
                let path = p
                    .path
                    .with_context(|| format!("pool {name}: `path` is required"))?;
                dirs.insert(name, PoolConfig { path });
            }
            "lun" => {
                anyhow::ensure!(
                    p.path.is_none(),
                    "pool {name}: a LUN pool has no `path` (use `portals`/`target` or `devices`)"
                );
                luns.insert(name.clone(), lun_pool(&name, p)?);
            }
            k => anyhow::bail!("pool {name}: unknown kind {k:?} (use \"dir\" or \"lun\")"),
        }
    }
    Ok((dirs, luns))
}

fn lun_pool(name: &str, p: RawPool) -> anyhow::Result<LunPoolConfig> {
    let iscsi = p.portals.is_some() || p.target.is_some();
    let source = match (iscsi, p.devices) {
        (true, Some(_)) => {
            anyhow::bail!("pool {name}: give either `portals` and `target` or `devices`, not both")
        }
        (true, None) => LunSource::Iscsi(IscsiTarget {
            portals: p
                .portals
                .with_context(|| format!("pool {name}: `portals` is required with `target`"))?,
            target: p
                .target
                .with_context(|| format!("pool {name}: `target` is required with `portals`"))?,
            options: p.iscsi_options.clone().unwrap_or_default(),
        }),
        (false, Some(globs)) => LunSource::Devices { globs },
        (false, None) => anyhow::bail!(
            "pool {name}: a LUN pool needs `portals` and `target` (iSCSI) or `devices` (globs)"
        ),
    };
    let is_iscsi = matches!(source, LunSource::Iscsi(_));
    anyhow::ensure!(
        is_iscsi || (p.chap_user.is_none() && p.chap_secret.is_none() && p.iscsi_options.is_none()),
        "pool {name}: CHAP and iscsi-options are for iSCSI LUN pools"
    );
    anyhow::ensure!(
        !is_iscsi || p.device_wait_secs.is_none(),
        "pool {name}: device-wait-secs is for device LUN pools"
    );
    let chap = match (p.chap_user, p.chap_secret) {
        (Some(user), Some(secret_id)) => {
            anyhow::ensure!(
                p.chap_target_user.is_some() == p.chap_target_secret.is_some(),
                "pool {name}: mutual CHAP needs both chap-target-user and chap-target-secret"
            );
            Some(ChapRef {
                user,
                secret_id,
                target_user: p.chap_target_user,
                target_secret_id: p.chap_target_secret,
            })
        }
        (None, None) => {
            anyhow::ensure!(
                p.chap_target_user.is_none() && p.chap_target_secret.is_none(),
                "pool {name}: mutual CHAP needs chap-user and chap-secret too"
            );
            None
        }
        _ => anyhow::bail!("pool {name}: give both chap-user and chap-secret"),
    };
    let chap_algorithms = match p.chap_algorithms {
        None => vec![ChapAlg::Sha256, ChapAlg::Md5],
        Some(list) => list
            .iter()
            .map(|a| {
                ChapAlg::from_name(a).with_context(|| {
                    format!("pool {name}: unknown CHAP algorithm {a:?} (sha256, sha1, md5)")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    };
    anyhow::ensure!(
        !chap_algorithms.is_empty(),
        "pool {name}: chap-algorithms is empty"
    );
    Ok(LunPoolConfig {
        source,
        chap,
        chap_algorithms,
        device_wait: p.device_wait_secs.map(Duration::from_secs),
    })
}

/// Effective settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub rest: std::net::SocketAddr,
    pub nbd: Vec<ListenAddr>,
    pub nbd_limits: NbdLimits,
    /// `--nbd-tls`: off or require.
    pub nbd_tls: TlsMode,
    pub vhost_dir: PathBuf,
    pub database: String,
    pub node_name: String,
    /// `--cluster`.
    pub cluster: String,
    /// `--heartbeat-secs`.
    pub heartbeat: Duration,
    /// `--service-down-time`.
    pub service_down_time: Duration,
    pub master_key_file: Option<PathBuf>,
    pub pools: BTreeMap<String, PoolConfig>,
    /// LUN pools (`kind = "lun"`).
    pub lun_pools: BTreeMap<String, LunPoolConfig>,
    pub lock_lease: Duration,
    /// Interval of the LUN volumes' health check (`--lun-health-secs`).
    pub lun_health: Duration,
    /// Bounds on REST connections (the `--rest-…` flags).
    pub rest_limits: RestLimits,
    /// Cost limits for LUKS headers (the `--max-…` flags).
    pub unlock_limits: UnlockLimits,
}

/// Default lease of this node's database locks.
pub const DEFAULT_LOCK_LEASE_SECS: u64 = 30;
/// Default interval of the LUN volumes' health check.
pub const DEFAULT_LUN_HEALTH_SECS: u64 = 30;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Merge flags/env, config file and defaults.
pub fn resolve(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let file: ConfigFile = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("read config {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parse config {}", p.display()))?
        }
        None => ConfigFile::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("./ember-data"));
    let rest = args
        .rest
        .or(file.rest)
        .unwrap_or_else(|| "127.0.0.1:8776".into());
    let rest = rest
        .parse()
        .with_context(|| format!("--rest {rest:?}: expected HOST:PORT"))?;
    let nbd_raw = if !args.nbd.is_empty() {
        args.nbd
    } else {
        file.nbd.unwrap_or_else(|| vec!["127.0.0.1:10809".into()])
    };
    let nbd = nbd_raw
        .iter()
        .map(|s| {
            s.parse::<ListenAddr>()
                .with_context(|| format!("--nbd {s:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nbd_limits = NbdLimits::try_from(&args.nbd_limits.or(&NbdLimitArgs {
        nbd_memory_mib: file.nbd_memory_mib,
        nbd_conn_memory_mib: file.nbd_conn_memory_mib,
        nbd_max_conns: file.nbd_max_conns,
        nbd_max_conns_per_peer: file.nbd_max_conns_per_peer,
        nbd_handshake_timeout_secs: file.nbd_handshake_timeout_secs,
        nbd_stall_timeout_secs: file.nbd_stall_timeout_secs,
    }))?;
    let vhost_dir = args
        .vhost_dir
        .or(file.vhost_dir)
        .unwrap_or_else(|| data_dir.join("vhost"));
    let database = args
        .database
        .or(file.database)
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("ember.db").display()));
    anyhow::ensure!(
        ["sqlite:", "mysql:", "mariadb:"]
            .iter()
            .any(|p| database.starts_with(p)),
        "unsupported database URL {:?}: use sqlite://PATH or mysql://USER:PASSWORD@HOST/DB",
        ember_control::store::redact(&database)
    );
    let node_name = args.node_name.or(file.node_name).unwrap_or_else(hostname);
    anyhow::ensure!(
        !node_name.is_empty() && node_name.len() <= 255,
        "--node-name must be 1..255 characters"
    );
    let cluster = args
        .cluster
        .or(file.cluster)
        .unwrap_or_else(|| ember_control::services::DEFAULT_CLUSTER.to_string());
    anyhow::ensure!(
        !cluster.is_empty() && cluster.len() <= 255,
        "--cluster must be 1..255 characters"
    );
    let heartbeat_secs = args
        .heartbeat_secs
        .or(file.heartbeat_secs)
        .unwrap_or(ember_control::services::DEFAULT_HEARTBEAT_SECS);
    anyhow::ensure!(
        (1..=3600).contains(&heartbeat_secs),
        "--heartbeat-secs must be 1..3600"
    );
    let service_down_time = args
        .service_down_time
        .or(file.service_down_time)
        .unwrap_or(ember_control::services::DEFAULT_SERVICE_DOWN_SECS);
    anyhow::ensure!(
        service_down_time >= 2 * heartbeat_secs && service_down_time <= 86_400,
        "--service-down-time must be at least twice --heartbeat-secs ({heartbeat_secs}) and at most 86400"
    );
    let master_key_file = args.master_key_file.or(file.master_key_file);
    let rest_limits = RestLimits {
        max_conns: args
            .rest_max_conns
            .or(file.rest_max_conns)
            .unwrap_or(crate::rest_listener::DEFAULT_MAX_CONNS),
        max_conns_per_peer: args
            .rest_max_conns_per_peer
            .or(file.rest_max_conns_per_peer)
            .unwrap_or(crate::rest_listener::DEFAULT_MAX_CONNS_PER_PEER),
        idle_timeout: Duration::from_secs(
            args.rest_idle_timeout_secs
                .or(file.rest_idle_timeout_secs)
                .unwrap_or(crate::rest_listener::DEFAULT_IDLE_TIMEOUT_SECS),
        ),
    };
    anyhow::ensure!(
        (1..=1_000_000).contains(&rest_limits.max_conns),
        "--rest-max-conns must be 1..1000000"
    );
    anyhow::ensure!(
        (1..=rest_limits.max_conns).contains(&rest_limits.max_conns_per_peer),
        "--rest-max-conns-per-peer must be 1..--rest-max-conns"
    );
    anyhow::ensure!(
        (1..=86_400).contains(&rest_limits.idle_timeout.as_secs()),
        "--rest-idle-timeout-secs must be 1..86400"
    );
    let lease_secs = args
        .lock_lease_secs
        .or(file.lock_lease_secs)
        .unwrap_or(DEFAULT_LOCK_LEASE_SECS);
    anyhow::ensure!(
        (1..=3600).contains(&lease_secs),
        "--lock-lease-secs must be 1..3600"
    );
    let lun_health_secs = args
        .lun_health_secs
        .or(file.lun_health_secs)
        .unwrap_or(DEFAULT_LUN_HEALTH_SECS);
    anyhow::ensure!(
        (1..=3600).contains(&lun_health_secs),
        "--lun-health-secs must be 1..3600"
    );
    let unlock_limits = args
        .limits
        .or(&LimitArgs {
            max_pbkdf2_iterations: file.max_pbkdf2_iterations,
            max_argon2_time: file.max_argon2_time,
            max_argon2_memory: file.max_argon2_memory,
            max_argon2_lanes: file.max_argon2_lanes,
            max_digest_iterations: file.max_digest_iterations,
            max_af_stripes: file.max_af_stripes,
            max_luks2_metadata: file.max_luks2_metadata,
            max_keyslots_area: file.max_keyslots_area,
        })
        .limits();
    let (mut pools, lun_pools) = split_pools(file.pools.unwrap_or_default())?;
    if pools.is_empty() && lun_pools.is_empty() {
        pools.insert(
            "default".into(),
            PoolConfig {
                path: data_dir.join("pools").join("default"),
            },
        );
    }
    let nbd_tls = match args.nbd_tls.or(file.nbd_tls).as_deref() {
        None | Some("require") => TlsMode::Require,
        Some("off") => TlsMode::Off,
        Some(other) => anyhow::bail!("nbd-tls {other:?}: expected off or require"),
    };
    Ok(ServeConfig {
        data_dir,
        rest,
        nbd,
        nbd_limits,
        nbd_tls,
        vhost_dir,
        database,
        node_name,
        cluster,
        heartbeat: Duration::from_secs(heartbeat_secs),
        service_down_time: Duration::from_secs(service_down_time),
        master_key_file,
        pools,
        lun_pools,
        lock_lease: Duration::from_secs(lease_secs),
        lun_health: Duration::from_secs(lun_health_secs),
        rest_limits,
        unlock_limits,
    })
}

/// Run the daemon.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = resolve(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ember-rest")
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let res = rt.block_on(serve(cfg));
    // A copy or an unlock still running on a blocking thread must not hold the exit.
    rt.shutdown_timeout(BLOCKING_SHUTDOWN);
    res
}

/// How long the exit waits for blocking data-plane work still running.
pub const BLOCKING_SHUTDOWN: Duration = Duration::from_secs(10);

fn create_dir(p: &Path, what: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("create {what} {}", p.display()))
}

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    // Install the handlers first: a SIGTERM that arrives while we start is then handled
    // as soon as the server runs, instead of killing the process half-way.
    let signals = Signals::install()?;
    create_dir(&cfg.data_dir, "data dir")?;
    create_dir(&cfg.vhost_dir, "vhost dir")?;
    for (name, pool) in &cfg.pools {
        create_dir(&pool.path, &format!("pool {name}"))?;
    }
    // Absolute paths: the vhost-user socket paths go to clients in other directories.
    let absolute =
        |p: &Path| std::fs::canonicalize(p).with_context(|| format!("resolve {}", p.display()));
    let mut pools = Vec::new();
    for (n, p) in &cfg.pools {
        pools.push((n.clone(), absolute(&p.path)?));
    }
    let vhost_dir = absolute(&cfg.vhost_dir)?;
    let mut luns = Vec::new();
    for (n, l) in &cfg.lun_pools {
        let pool = LunPool::new(n.clone(), l.source.clone(), l.device_wait)
            .with_context(|| format!("LUN pool {n}"))?;
        luns.push(LunPoolSetup {
            pool,
            chap: l.chap.clone(),
            algorithms: l.chap_algorithms.clone(),
        });
    }
    let (dataplane, nbd_bound) = EmberDataPlane::start(
        pools,
        luns,
        &cfg.nbd,
        cfg.nbd_limits.clone(),
        cfg.nbd_tls,
        vhost_dir,
        cfg.unlock_limits,
    )?;
    let dataplane = Arc::new(dataplane);
    let ccfg = ControlConfig {
        data_dir: cfg.data_dir.clone(),
        database: cfg.database.clone(),
        master_key_file: cfg.master_key_file.clone(),
        node_name: cfg.node_name.clone(),
        rest_address: cfg.rest.to_string(),
        cluster: cfg.cluster.clone(),
        nbd_addresses: nbd_bound.clone(),
        service_down_time: cfg.service_down_time,
    };
    let control = match Control::open(&ccfg, dataplane.clone()).await {
        Ok(c) => c,
        Err(e) => {
            dataplane.shutdown();
            return Err(e);
        }
    };
    control.state.locks().set_lease(cfg.lock_lease);
    if let Err(e) = ember_control::volumes::reconcile::reconcile(&control.state).await {
        dataplane.shutdown();
        return Err(e.context("start-up reconciliation"));
    }
    let listener = match tokio::net::TcpListener::bind(cfg.rest).await {
        Ok(l) => l,
        Err(e) => {
            dataplane.shutdown();
            return Err(anyhow::Error::new(e).context(format!("listen on --rest {}", cfg.rest)));
        }
    };
    let addr = listener.local_addr()?;
    tracing::info!(
        rest = %addr,
        node = %cfg.node_name,
        cluster = %cfg.cluster,
        database = %ember_control::store::redact(&cfg.database),
        admin_token_file = %control.admin_token_path.display(),
        pools = ?cfg.pools.keys().collect::<Vec<_>>(),
        lun_pools = ?cfg.lun_pools.keys().collect::<Vec<_>>(),
        "emberd serve: REST API listening"
    );
    tracing::info!(listeners = %nbd_bound.join(" "), "NBD server listening");
    let control = Arc::new(control);
    // Membership: heartbeat, then lease renewal and reaping, on one tick (the leases
    // are renewed only while the heartbeat reaches the database).
    let tick = cfg
        .heartbeat
        .min(cfg.lock_lease / 3)
        .max(Duration::from_millis(100));
    let member = control.clone();
    let membership = tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = member.membership_tick().await {
                tracing::warn!(error = %e, "membership tick failed");
            }
        }
    });
    // LUN volumes' health: faults of attached LUNs shown on their volumes.
    let hc = control.clone();
    let every = cfg.lun_health;
    let health = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = ember_control::volumes::manageable::check_health(&hc.state).await {
                tracing::warn!(error = %e.message, "LUN health check failed");
            }
        }
    });
    let listener = BoundedListener::new(listener, cfg.rest_limits);
    let served = axum_serve(listener, control.router(), signals).await;
    membership.abort();
    health.abort();
    dataplane.shutdown();
    served?;
    tracing::info!("emberd serve: stopped");
    Ok(())
}

async fn axum_serve(
    listener: BoundedListener,
    router: axum_router::Router,
    signals: Signals,
) -> anyhow::Result<()> {
    axum_router::serve(listener, router)
        .with_graceful_shutdown(signals.wait())
        .await
        .context("REST server")
}

use ember_control::axum as axum_router;

/// SIGTERM and SIGINT streams.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            data_dir: None,
            rest: None,
            nbd: vec![],
            vhost_dir: None,
            database: None,
            node_name: Some("n1".into()),
            cluster: None,
            heartbeat_secs: None,
            service_down_time: None,
            master_key_file: None,
            config: None,
            lock_lease_secs: None,
            rest_max_conns: None,
            rest_max_conns_per_peer: None,
            rest_idle_timeout_secs: None,
            lun_health_secs: None,
            limits: LimitArgs::default(),
            nbd_limits: NbdLimitArgs::default(),
            nbd_tls: None,
        }
    }

    #[test]
    fn membership_flags() {
        let c = resolve(args()).unwrap();
        assert_eq!(c.cluster, "ember");
        assert_eq!(c.heartbeat, Duration::from_secs(10));
        assert_eq!(c.service_down_time, Duration::from_secs(60));
        let c = resolve(ServeArgs {
            cluster: Some("east".into()),
            heartbeat_secs: Some(2),
            service_down_time: Some(5),
            ..args()
        })
        .unwrap();
        assert_eq!(
            (
                c.cluster.as_str(),
                c.heartbeat.as_secs(),
                c.service_down_time.as_secs()
            ),
            ("east", 2, 5)
        );
        // A node would flap: down between two heartbeats.
        let e = resolve(ServeArgs {
            heartbeat_secs: Some(10),
            service_down_time: Some(15),
            ..args()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--service-down-time"), "{e}");
        assert!(resolve(ServeArgs {
            cluster: Some(String::new()),
            ..args()
        })
        .is_err());
    }

    #[test]
    fn defaults() {
        let c = resolve(args()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./ember-data"));
        assert_eq!(c.rest.to_string(), "127.0.0.1:8776");
        assert_eq!(c.nbd, vec![ListenAddr::Tcp("127.0.0.1:10809".into())]);
        assert_eq!(c.vhost_dir, PathBuf::from("./ember-data/vhost"));
        assert_eq!(c.nbd_tls, TlsMode::Require);
        assert_eq!(c.database, "sqlite://./ember-data/ember.db");
        assert_eq!(
            c.pools["default"].path,
            PathBuf::from("./ember-data/pools/default")
        );
    }

    #[test]
    fn lun_pools_from_the_config_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ember.toml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap();
            let mut a = args();
            a.config = Some(f.clone());
            resolve(a)
        };
        let c = load(
            "[pools.files]\npath = \"/srv/p\"\n\
             [pools.array]\nkind = \"lun\"\nportals = [\"10.0.0.5:3260\", \"10.0.1.5\"]\n\
             target = \"iqn.1992-08.com.example:a\"\nchap-user = \"ember\"\nchap-secret = \"S1\"\n\
             chap-target-user = \"arr\"\nchap-target-secret = \"S2\"\nchap-algorithms = [\"md5\"]\n\
             iscsi-options = \"header_digest=crc32c\"\n\
             [pools.fc]\nkind = \"lun\"\ndevices = [\"/dev/disk/by-id/wwn-*\"]\ndevice-wait-secs = 30\n",
        )
        .unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.lun_pools.len(), 2);
        let a = &c.lun_pools["array"];
        assert_eq!(
            a.source,
            LunSource::Iscsi(IscsiTarget {
                portals: vec!["10.0.0.5:3260".into(), "10.0.1.5".into()],
                target: "iqn.1992-08.com.example:a".into(),
                options: "header_digest=crc32c".into(),
            })
        );
        let chap = a.chap.as_ref().unwrap();
        assert_eq!(
            (chap.user.as_str(), chap.secret_id.as_str()),
            ("ember", "S1")
        );
        assert_eq!(chap.target_secret_id.as_deref(), Some("S2"));
        assert_eq!(a.chap_algorithms, vec![ChapAlg::Md5]);
        assert_eq!(c.lun_pools["fc"].device_wait, Some(Duration::from_secs(30)));
        // Only LUN pools: no default directory pool is added.
        let c = load("[pools.fc]\nkind = \"lun\"\ndevices = [\"/dev/loop*\"]\n").unwrap();
        assert!(c.pools.is_empty());
        for (bad, needle) in [
            ("[pools.x]\nkind = \"lun\"\n", "needs `portals`"),
            ("[pools.x]\nkind = \"tape\"\n", "unknown kind"),
            ("[pools.x]\nportals = [\"a\"]\npath = \"/p\"\n", "need kind"),
            ("[pools.x]\nkind = \"lun\"\ntarget = \"iqn.x\"\n", "`portals` is required"),
            ("[pools.x]\nkind = \"lun\"\nportals = [\"a\"]\ntarget = \"t\"\ndevices = [\"/d\"]\n", "not both"),
            ("[pools.x]\nkind = \"lun\"\nportals = [\"a\"]\ntarget = \"t\"\nchap-user = \"u\"\n", "both chap-user"),
            ("[pools.x]\nkind = \"lun\"\nportals = [\"a\"]\ntarget = \"t\"\nchap-algorithms = [\"sha3\"]\n", "unknown CHAP"),
            ("[pools.x]\nkind = \"lun\"\ndevices = [\"/d\"]\nchap-user = \"u\"\nchap-secret = \"s\"\n", "for iSCSI"),
            ("[pools.x]\nkind = \"lun\"\nportals = [\"a\"]\ntarget = \"t\"\ncolour = 1\n", "unknown field"),
        ] {
            let e = format!("{:#}", load(bad).unwrap_err());
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn config_file_and_precedence() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ember.toml");
        std::fs::write(
            &f,
            "data-dir = \"/srv/ember\"\nrest = \"0.0.0.0:9000\"\nnbd = [\"unix:/run/e.sock\", \"127.0.0.1:1\"]\n\
             database = \"mysql://u:p@db/ember\"\n[pools.fast]\npath = \"/nvme\"\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        a.rest = Some("127.0.0.1:1234".into());
        let c = resolve(a).unwrap();
        assert_eq!(c.rest.to_string(), "127.0.0.1:1234", "flag beats file");
        assert_eq!(c.data_dir, PathBuf::from("/srv/ember"));
        assert_eq!(c.nbd[0], ListenAddr::Unix("/run/e.sock".into()));
        assert_eq!(c.database, "mysql://u:p@db/ember");
        assert_eq!(c.vhost_dir, PathBuf::from("/srv/ember/vhost"));
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.unlock_limits, UnlockLimits::default());
        // LUKS cost limits: flag over file over default.
        std::fs::write(
            &f,
            "max-pbkdf2-iterations = 5000000\nmax-argon2-memory = 65536\nmax-af-stripes = 8000\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        a.limits.max_argon2_memory = Some(2 << 20);
        let l = resolve(a).unwrap().unlock_limits;
        assert_eq!(
            (l.pbkdf2_iterations, l.argon2_memory_kib, l.af_stripes),
            (5_000_000, 2 << 20, 8000)
        );
        assert_eq!(l.argon2_time, UnlockLimits::default().argon2_time);
        // REST connection bounds: flag over file over default, checked.
        assert_eq!(resolve(args()).unwrap().rest_limits, RestLimits::default());
        std::fs::write(
            &f,
            "rest-max-conns = 100\nrest-max-conns-per-peer = 10\nrest-idle-timeout-secs = 5\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        a.rest_max_conns_per_peer = Some(20);
        let r = resolve(a).unwrap().rest_limits;
        assert_eq!(
            (r.max_conns, r.max_conns_per_peer, r.idle_timeout),
            (100, 20, Duration::from_secs(5))
        );
        let mut a = args();
        a.rest_max_conns = Some(10);
        a.rest_max_conns_per_peer = Some(11);
        assert!(resolve(a).is_err(), "more per peer than in all");
        let mut a = args();
        a.rest_idle_timeout_secs = Some(0);
        assert!(resolve(a).is_err());
        // NBD limits: flag over file over default; the file's values are checked too.
        std::fs::write(
            &f,
            "nbd-max-conns = 64\nnbd-max-conns-per-peer = 8\nnbd-stall-timeout-secs = 30\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        a.nbd_limits.nbd_max_conns_per_peer = Some(4);
        let n = resolve(a).unwrap().nbd_limits;
        assert_eq!((n.max_conns, n.max_conns_per_peer), (64, 4));
        assert_eq!(n.stall_timeout, Duration::from_secs(30));
        assert_eq!(n.memory_bytes, NbdLimits::default().memory_bytes);
        std::fs::write(&f, "nbd-max-conns = 0\n").unwrap();
        let mut a = args();
        a.config = Some(f.clone());
        let e = resolve(a).unwrap_err().to_string();
        assert!(e.contains("--nbd-max-conns"), "{e}");
        std::fs::write(&f, "colour = 1\n").unwrap();
        let mut a = args();
        a.config = Some(f);
        assert!(resolve(a).is_err(), "unknown keys are refused");
        let mut a = args();
        a.nbd = vec!["nonsense".into()];
        assert!(resolve(a).is_err());
    }
}
