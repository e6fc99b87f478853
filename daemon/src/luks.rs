//! `emberd luks`: format, inspect and manage keyslots of LUKS1/LUKS2 volumes.
//!
//! Passphrases come only from files (never argv or the environment) and are used
//! byte-for-byte, like `cryptsetup --key-file` and QEMU's `secret,file=`: a trailing
//! newline is part of the passphrase ([`read_passphrase`], also used by `emberd export
//! --passphrase-file`). All header work goes through `ember-crypto`, on the device
//! through the one LUKS header adapter ([`ember_blockdev::stack::header_disk`], the same
//! the crypt layer and the data plane use); this module only maps flags.
//!
//! Every command that reads a header takes the cost limits of [`LimitArgs`] (the same
//! flags on `emberd export` and `emberd serve`), mapped to `ember_crypto::UnlockLimits`;
//! their defaults and what cryptsetup writes are in `ember_crypto::limits`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use ember_blockdev::layer::crypt::DeviceDisk;
use ember_blockdev::BackendSpec;
use ember_crypto::kdf::{Argon2Type, Hash};
use ember_crypto::limits as lim;
use ember_crypto::{Disk, FormatParams, KdfParams, UnlockLimits, Zeroizing};
use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `emberd luks`.
#[derive(Debug, Args)]
pub struct LuksArgs {
    #[command(subcommand)]
    cmd: LuksCmd,
}

#[derive(Debug, Subcommand)]
enum LuksCmd {
    /// Write a new LUKS header (with one keyslot) to PATH. The data area is not wiped.
    Format(FormatArgs),
    /// Print the header (no key material).
    Dump {
        /// The volume.
        path: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Add a keyslot for a new passphrase.
    AddKey(AddKeyArgs),
    /// Remove the keyslot the passphrase opens (never the last one).
    RemoveKey(RemoveKeyArgs),
    /// Replace a passphrase (a new keyslot replaces the old one; data untouched).
    ChangeKey(AddKeyArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LuksType {
    Luks1,
    Luks2,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Pbkdf {
    Pbkdf2,
    Argon2i,
    Argon2id,
}

/// Key-derivation flags shared by format and add-key.
#[derive(Debug, Args)]
struct KdfArgs {
    /// Key derivation function (LUKS1: pbkdf2 only). Default: argon2id for LUKS2.
    #[arg(long)]
    pbkdf: Option<Pbkdf>,
    /// PBKDF2 hash (sha1, sha256, sha512).
    #[arg(long, default_value = "sha256")]
    hash: String,
    /// Target unlock time in milliseconds for PBKDF2 when no iteration count is forced.
    #[arg(long, default_value_t = 2000)]
    iter_time: u64,
    /// PBKDF2 iterations (at least 1000) or argon2 time cost (at least 4), instead of
    /// benchmarking.
    #[arg(long)]
    pbkdf_force_iterations: Option<u32>,
    /// Argon2 memory cost in KiB.
    #[arg(long, default_value_t = 262_144)]
    pbkdf_memory: u32,
    /// Argon2 lanes.
    #[arg(long, default_value_t = 4)]
    pbkdf_parallel: u32,
}

#[derive(Debug, Args)]
struct FormatArgs {
    /// The file or block device to format.
    path: PathBuf,
    /// File holding the passphrase (used byte-for-byte).
    #[arg(long)]
    passphrase_file: PathBuf,
    /// LUKS version.
    #[arg(long = "type", value_enum, default_value = "luks2")]
    luks_type: LuksType,
    /// Volume key size in bits: 256 (XTS-AES-128) or 512 (XTS-AES-256).
    #[arg(long, default_value_t = 512)]
    key_size: u32,
    /// Encryption sector size (4096: LUKS2 only).
    #[arg(long, default_value_t = 512)]
    sector_size: u32,
    /// Plaintext size in bytes: the file is created or resized to data offset + SIZE.
    #[arg(long)]
    size: Option<u64>,
    /// LUKS2 label.
    #[arg(long, default_value = "")]
    label: String,
    /// UUID (random by default).
    #[arg(long)]
    uuid: Option<String>,
    /// Format even if PATH already holds a LUKS header (its keys, and so its data, are lost).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    kdf: KdfArgs,
}

#[derive(Debug, Args)]
struct AddKeyArgs {
    /// The volume.
    path: PathBuf,
    /// File holding an existing passphrase.
    #[arg(long)]
    passphrase_file: PathBuf,
    /// File holding the new passphrase.
    #[arg(long)]
    new_passphrase_file: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    kdf: KdfArgs,
}

#[derive(Debug, Args)]
struct RemoveKeyArgs {
    /// The volume.
    path: PathBuf,
    /// File holding the passphrase of the keyslot to remove.
    #[arg(long)]
    passphrase_file: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Cost limits for reading a LUKS header someone else wrote: a keyslot above a KDF limit
/// is skipped (another may open), a header above a size or digest limit is refused, each
/// with an error naming the field and the flag. The defaults are far above what
/// cryptsetup and QEMU write (table in `ember_crypto::limits`).
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Refuse LUKS keyslots with more PBKDF2 iterations than this [default: 100000000].
    #[arg(long, env = "EMBER_MAX_PBKDF2_ITERATIONS", value_name = "N")]
    pub max_pbkdf2_iterations: Option<u32>,
    /// Refuse LUKS2 argon2 keyslots with more passes (time cost) than this [default: 1000].
    #[arg(long, env = "EMBER_MAX_ARGON2_TIME", value_name = "N")]
    pub max_argon2_time: Option<u32>,
    /// Refuse LUKS2 argon2 keyslots needing more memory than this, KiB [default: 1048576].
    #[arg(long, env = "EMBER_MAX_ARGON2_MEMORY", value_name = "KIB")]
    pub max_argon2_memory: Option<u64>,
    /// Refuse LUKS2 argon2 keyslots with more lanes (cpus) than this [default: 16].
    #[arg(long, env = "EMBER_MAX_ARGON2_LANES", value_name = "N")]
    pub max_argon2_lanes: Option<u32>,
    /// Refuse LUKS headers whose volume-key digest has more PBKDF2 iterations than this
    /// [default: 10000000].
    #[arg(long, env = "EMBER_MAX_DIGEST_ITERATIONS", value_name = "N")]
    pub max_digest_iterations: Option<u32>,
    /// Refuse LUKS2 keyslots with more anti-forensic stripes than this [default: 65536].
    #[arg(long, env = "EMBER_MAX_AF_STRIPES", value_name = "N")]
    pub max_af_stripes: Option<u32>,
    /// Refuse LUKS2 headers with a larger metadata area (binary header + JSON), bytes
    /// [default: 4194304].
    #[arg(long, env = "EMBER_MAX_LUKS2_METADATA", value_name = "BYTES")]
    pub max_luks2_metadata: Option<u64>,
    /// Refuse LUKS2 headers with a larger keyslots area, bytes [default: 134217728].
    #[arg(long, env = "EMBER_MAX_KEYSLOTS_AREA", value_name = "BYTES")]
    pub max_keyslots_area: Option<u64>,
}

impl LimitArgs {
    /// Each limit given here, else the one in `fallback` (a config file), else the default.
    pub fn or(&self, fallback: &LimitArgs) -> LimitArgs {
        LimitArgs {
            max_pbkdf2_iterations: self
                .max_pbkdf2_iterations
                .or(fallback.max_pbkdf2_iterations),
            max_argon2_time: self.max_argon2_time.or(fallback.max_argon2_time),
            max_argon2_memory: self.max_argon2_memory.or(fallback.max_argon2_memory),
            max_argon2_lanes: self.max_argon2_lanes.or(fallback.max_argon2_lanes),
            max_digest_iterations: self
                .max_digest_iterations
                .or(fallback.max_digest_iterations),
            max_af_stripes: self.max_af_stripes.or(fallback.max_af_stripes),
            max_luks2_metadata: self.max_luks2_metadata.or(fallback.max_luks2_metadata),
            max_keyslots_area: self.max_keyslots_area.or(fallback.max_keyslots_area),
        }
    }

    /// The limits, defaults filled in.
    pub fn limits(&self) -> UnlockLimits {
        UnlockLimits {
            pbkdf2_iterations: self
                .max_pbkdf2_iterations
                .unwrap_or(lim::DEFAULT_MAX_PBKDF2_ITERATIONS),
            argon2_time: self.max_argon2_time.unwrap_or(lim::DEFAULT_MAX_ARGON2_TIME),
            argon2_memory_kib: self
                .max_argon2_memory
                .unwrap_or(lim::DEFAULT_MAX_ARGON2_KIB),
            argon2_lanes: self
                .max_argon2_lanes
                .unwrap_or(lim::DEFAULT_MAX_ARGON2_LANES),
            digest_iterations: self
                .max_digest_iterations
                .unwrap_or(lim::DEFAULT_MAX_DIGEST_ITERATIONS),
            af_stripes: self.max_af_stripes.unwrap_or(lim::DEFAULT_MAX_AF_STRIPES),
            metadata_bytes: self
                .max_luks2_metadata
                .unwrap_or(lim::DEFAULT_MAX_METADATA_BYTES),
            keyslots_area_bytes: self
                .max_keyslots_area
                .unwrap_or(lim::DEFAULT_MAX_KEYSLOTS_AREA_BYTES),
        }
    }
}

/// `path` (a file or block device) for header work.
fn header_disk(path: &Path, write: bool) -> anyhow::Result<DeviceDisk> {
    ember_blockdev::stack::header_disk(
        &BackendSpec::File {
            path: path.to_path_buf(),
        },
        !write,
    )
    .with_context(|| format!("open {}", path.display()))
}

/// Make written headers durable.
fn sync(disk: &mut DeviceDisk) -> anyhow::Result<()> {
    disk.flush().context("sync")
}

/// Largest passphrase file accepted (cryptsetup's default key file limit).
const MAX_PASSPHRASE_BYTES: u64 = 8 << 20;

/// Read a passphrase file byte-for-byte into zeroizing memory.
pub fn read_passphrase(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("read passphrase file {}", path.display()))?
        .len();
    if len > MAX_PASSPHRASE_BYTES {
        bail!(
            "passphrase file {} is larger than {MAX_PASSPHRASE_BYTES} bytes",
            path.display()
        );
    }
    let p = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("read passphrase file {}", path.display()))?,
    );
    if p.is_empty() {
        bail!("passphrase file {} is empty", path.display());
    }
    Ok(p)
}

/// Iterations of PBKDF2-`hash` that take about `ms` milliseconds here (at least 1000).
fn calibrate_pbkdf2(hash: Hash, ms: u64) -> u32 {
    let probe = 20_000u32;
    let mut out = [0u8; 64];
    let t = Instant::now();
    hash.pbkdf2(b"calibrate", &[0u8; 32], probe, &mut out);
    let per_ms = f64::from(probe) / t.elapsed().as_secs_f64().max(1e-6) / 1000.0;
    ((per_ms * ms as f64) as u64).clamp(1000, u64::from(u32::MAX)) as u32
}

impl KdfArgs {
    fn params(&self, luks2: bool) -> anyhow::Result<KdfParams> {
        let pbkdf = self.pbkdf.unwrap_or(if luks2 {
            Pbkdf::Argon2id
        } else {
            Pbkdf::Pbkdf2
        });
        Ok(match pbkdf {
            Pbkdf::Pbkdf2 => {
                let hash = Hash::parse(&self.hash)?;
                KdfParams::Pbkdf2 {
                    hash,
                    // cryptsetup's minimum is 1000.
                    iterations: self
                        .pbkdf_force_iterations
                        .unwrap_or_else(|| calibrate_pbkdf2(hash, self.iter_time))
                        .max(1000),
                }
            }
            Pbkdf::Argon2i | Pbkdf::Argon2id => {
                if !luks2 {
                    bail!("LUKS1 supports only --pbkdf pbkdf2");
                }
                KdfParams::Argon2 {
                    kind: if matches!(pbkdf, Pbkdf::Argon2i) {
                        Argon2Type::I
                    } else {
                        Argon2Type::Id
                    },
                    // cryptsetup's minimum time cost is 4.
                    time: self.pbkdf_force_iterations.unwrap_or(4).max(4),
                    memory_kib: self.pbkdf_memory,
                    lanes: self.pbkdf_parallel.max(1),
                }
            }
        })
    }
}

fn format(a: FormatArgs) -> anyhow::Result<()> {
    let pass = read_passphrase(&a.passphrase_file)?;
    let version = match a.luks_type {
        LuksType::Luks1 => 1,
        LuksType::Luks2 => 2,
    };
    if a.key_size != 256 && a.key_size != 512 {
        bail!("--key-size must be 256 or 512");
    }
    if a.sector_size != 512 && !(version == 2 && a.sector_size == 4096) {
        bail!("--sector-size must be 512 (or 4096 with --type luks2)");
    }
    let params = FormatParams {
        version,
        key_bytes: a.key_size as usize / 8,
        sector_size: a.sector_size,
        kdf: a.kdf.params(version == 2)?,
        label: a.label,
        uuid: a.uuid,
    };
    if a.size.is_some() {
        // Created if missing; sized below, once its old contents were looked at.
        FsOpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&a.path)
            .with_context(|| format!("open {}", a.path.display()))?;
    }
    if !a.force && has_luks_magic(&mut header_disk(&a.path, false)?) {
        bail!(
            "{} already holds a LUKS header: formatting would lose its data (use --force)",
            a.path.display()
        );
    }
    if let Some(size) = a.size {
        if size % u64::from(a.sector_size) != 0 {
            bail!("--size must be a multiple of the sector size");
        }
        let total = ember_crypto::default_data_offset(version) + size;
        let f = FsOpenOptions::new()
            .write(true)
            .open(&a.path)
            .with_context(|| format!("open {}", a.path.display()))?;
        if f.metadata()?.is_file() {
            f.set_len(total).context("resize the file")?;
        }
    }
    let mut disk = header_disk(&a.path, true)?;
    let u = ember_crypto::format(&mut disk, &pass, &params)
        .with_context(|| format!("format {}", a.path.display()))?;
    sync(&mut disk)?;
    println!(
        "formatted {} as LUKS{} (UUID {}), data at offset {}",
        a.path.display(),
        u.version,
        u.uuid,
        u.data_offset
    );
    Ok(())
}

/// Either LUKS magic at offset 0 (a LUKS2 secondary alone is caught by the header read).
fn has_luks_magic(disk: &mut DeviceDisk) -> bool {
    let mut m = [0u8; 6];
    disk.read_at(0, &mut m).is_ok() && (&m == b"LUKS\xba\xbe" || &m == b"SKUL\xba\xbe")
}

fn is_luks2(disk: &mut DeviceDisk, limits: &UnlockLimits) -> anyhow::Result<bool> {
    Ok(ember_crypto::Header::read(disk, limits)?.version() == 2)
}

/// The signature of `ember_crypto::add_key` and `change_key`.
type NewKeyOp =
    fn(&mut dyn Disk, &[u8], &[u8], KdfParams, &UnlockLimits) -> ember_crypto::Result<usize>;

/// `luks add-key` and `luks change-key`: read both passphrases, pick the KDF for the
/// header's version, run `op` (errors say `what` the path), flush. Returns the new keyslot.
fn new_key(a: &AddKeyArgs, what: &str, op: NewKeyOp) -> anyhow::Result<usize> {
    let pass = read_passphrase(&a.passphrase_file)?;
    let new = read_passphrase(&a.new_passphrase_file)?;
    let mut disk = header_disk(&a.path, true)?;
    let limits = a.limits.limits();
    let kdf = a.kdf.params(is_luks2(&mut disk, &limits)?)?;
    let id = op(&mut disk, &pass, &new, kdf, &limits)
        .with_context(|| format!("{what} {}", a.path.display()))?;
    sync(&mut disk)?;
    Ok(id)
}

/// Run a LUKS subcommand.
pub fn run(args: LuksArgs) -> anyhow::Result<()> {
    match args.cmd {
        LuksCmd::Format(a) => format(a),
        LuksCmd::Dump { path, limits } => {
            let mut disk = header_disk(&path, false)?;
            print!(
                "{}",
                ember_crypto::dump(&mut disk, &limits.limits())
                    .with_context(|| format!("{}", path.display()))?
            );
            Ok(())
        }
        LuksCmd::AddKey(a) => {
            let id = new_key(&a, "add a key to", ember_crypto::add_key)?;
            println!("added keyslot {id}");
            Ok(())
        }
        LuksCmd::ChangeKey(a) => {
            let id = new_key(&a, "change a key of", ember_crypto::change_key)?;
            println!("passphrase changed, now in keyslot {id}");
            Ok(())
        }
        LuksCmd::RemoveKey(a) => {
            let pass = read_passphrase(&a.passphrase_file)?;
            let mut disk = header_disk(&a.path, true)?;
            let id = ember_crypto::remove_key(&mut disk, &pass, &a.limits.limits())
                .with_context(|| format!("remove a key from {}", a.path.display()))?;
            sync(&mut disk)?;
            println!("removed keyslot {id}");
            Ok(())
        }
    }
}
