//! The crypto crate's error: one variant per way a volume can fail to open or change.
//! Messages never contain key material or passphrases.

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the header failed (the caller's storage).
    #[error("header i/o")]
    Io(#[source] std::io::Error),
    /// No LUKS magic: not a LUKS volume (or the header was wiped).
    #[error("not a LUKS volume (bad magic)")]
    NotLuks,
    /// A LUKS version we do not read.
    #[error("unsupported LUKS version {0}")]
    UnsupportedVersion(u16),
    /// The storage is shorter than the header says it is.
    #[error("truncated LUKS header: need {need} bytes, the device has {have}")]
    Truncated {
        /// Bytes the header needs.
        need: u64,
        /// Bytes the device has.
        have: u64,
    },
    /// A LUKS2 header copy fails its checksum.
    #[error("LUKS2 header checksum mismatch ({0} copy)")]
    BadChecksum(&'static str),
    /// The header is structurally invalid.
    #[error("corrupt LUKS header: {0}")]
    Corrupt(String),
    /// A cipher or mode other than aes-xts-plain64.
    #[error("unsupported cipher {0:?} (only aes-xts-plain64 is supported)")]
    UnsupportedCipher(String),
    /// A hash we do not implement.
    #[error("unsupported hash {0:?} (sha1, sha256 and sha512 are supported)")]
    UnsupportedHash(String),
    /// A KDF, AF or digest type we do not implement, or a LUKS2 requirement flag.
    #[error("unsupported LUKS feature: {0}")]
    Unsupported(String),
    /// The passphrase opens no keyslot.
    #[error("no keyslot matches the passphrase (wrong passphrase)")]
    WrongPassphrase,
    /// A header field is above its cost limit (see [`crate::limits`]).
    #[error(
        "{what}: {field} is {value}{unit}, above the limit of {limit}{unit} (raise it with {flag})"
    )]
    LimitExceeded {
        /// "keyslot 3", "digest 0", "header".
        what: String,
        /// The header field, as named in the LUKS specification.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The configured cap.
        limit: u64,
        /// " KiB", " bytes" or "".
        unit: &'static str,
        /// The `emberd` flag that sets the cap.
        flag: &'static str,
    },
    /// The KDF rejected its parameters.
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// A volume key that is neither 256 nor 512 bits.
    #[error("unsupported key size {0} bytes (32 or 64 for aes-xts)")]
    BadKeySize(usize),
    /// An encryption sector size other than 512..=4096 (power of two).
    #[error("unsupported encryption sector size {0}")]
    BadSectorSize(u64),
    /// A range not aligned to the encryption sector.
    #[error("range {offset}+{len} is not aligned to the {sector_size}-byte encryption sector")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Encryption sector size.
        sector_size: usize,
    },
    /// Every keyslot is in use.
    #[error("no free keyslot")]
    NoFreeKeyslot,
    /// Removing the only remaining keyslot would lose the data.
    #[error("refusing to remove the last keyslot (the volume would become unreadable)")]
    LastKeyslot,
    /// Bad format parameters.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// The system random generator failed.
    #[error("random number generator failed")]
    Random,
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}
