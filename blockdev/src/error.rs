//! The block layer's error: a small matchable kind, context, and a source.

use std::fmt;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely; front ends map it to their wire status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error from the kernel or the device.
    Io,
    /// The request lies outside the device or is misaligned.
    OutOfBounds,
    /// The device or backend does not support the operation.
    Unsupported,
    /// The spec or configuration is invalid (bad URI, unknown parameter).
    InvalidConfig,
    /// A write to a read-only device.
    ReadOnly,
    /// No space left.
    NoSpace,
    /// The device is busy (a pause could not drain its writes in time).
    Busy,
}

impl ErrorKind {
    /// The errno closest to this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io => libc::EIO,
            ErrorKind::OutOfBounds => libc::EINVAL,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::InvalidConfig => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Busy => libc::EBUSY,
        }
    }
}

/// A block-layer error: kind, context (what and where), and the cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// A new error of `kind` with a short context (e.g. "open /path").
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An I/O error with its cause.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) => ErrorKind::NoSpace,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            Some(libc::EROFS) | Some(libc::EPERM) => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Attach a cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Io => "i/o error",
            ErrorKind::OutOfBounds => "out of bounds",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidConfig => "invalid configuration",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::NoSpace => "no space",
            ErrorKind::Busy => "busy",
        };
        write!(f, "{kind}: {}", self.context)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}
