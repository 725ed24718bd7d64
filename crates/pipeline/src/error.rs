//! The pipeline's one error type, in the shape of Cloud Hypervisor's block errors: a small
//! [`ErrorKind`] that the engine and its callers act on, what was being done and on which
//! bytes, and the cause. Each source and sink classifies its own failures once, where it makes
//! them; the engine retries [`ErrorKind::Transient`] ones and nothing else.

use std::fmt;
use std::path::Path;

/// What a caller can do about a failure. Every kind calls for something different.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Trying the same request again after a pause may succeed: an I/O error, a lost, reset
    /// or refused connection, a busy server, a timeout. The engine retries these, with
    /// backoff, up to its patience.
    Transient,
    /// The request cannot be served as asked: outside the disk, misaligned, a source that does
    /// not fit its sink, a bad argument. Retrying the same request cannot help; the plan or
    /// the configuration is wrong.
    InvalidInput,
    /// What was asked for is not there (a file, an object, an export, a disk).
    NotFound,
    /// The destination is full (ENOSPC, EDQUOT): free room, then run again. Every other disk
    /// bound for the same place will fail the same way.
    NoSpace,
    /// The copy was cancelled; what completed is checkpointed.
    Cancelled,
    /// Retrying cannot help: refused credentials, damaged or foreign data, a broken worker.
    Fatal,
}

impl ErrorKind {
    /// The kind of an OS or socket error: by errno where there is one, else by its
    /// `io::ErrorKind`.
    pub fn of_io(e: &std::io::Error) -> Self {
        use rustix::io::Errno;
        use std::io::ErrorKind as K;
        if let Some(raw) = e.raw_os_error() {
            let errno = Errno::from_raw_os_error(raw);
            if errno == Errno::NOSPC || errno == Errno::DQUOT {
                return Self::NoSpace;
            }
            if errno == Errno::IO {
                return Self::Transient;
            }
        }
        match e.kind() {
            K::NotFound => Self::NotFound,
            K::StorageFull | K::QuotaExceeded => Self::NoSpace,
            K::Interrupted
            | K::TimedOut
            | K::WouldBlock
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::NotConnected
            | K::BrokenPipe
            | K::NetworkUnreachable
            | K::HostUnreachable
            | K::NetworkDown
            | K::ResourceBusy => Self::Transient,
            K::InvalidInput | K::FileTooLarge | K::Unsupported => Self::InvalidInput,
            _ => Self::Fatal,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::InvalidInput => "invalid input",
            Self::NotFound => "not found",
            Self::NoSpace => "no space",
            Self::Cancelled => "cancelled",
            Self::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The cause of a [`BlockError`], boxed whatever its type.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a block operation, a copy or a state file failed: its [`ErrorKind`], what was being
/// done, the bytes it concerned where known, the cause, and how many attempts the engine made
/// before it gave up on a transient failure.
///
/// Its message names all of them: `reading [ds1] db/db-flat.vmdk at bytes 4096+65536: HTTP 503:
/// the host is busy (transient, gave up after 6 attempts)`.
#[derive(Debug)]
pub struct BlockError {
    kind: ErrorKind,
    what: String,
    range: Option<(u64, u64)>,
    attempts: Option<u32>,
    source: Option<Cause>,
}

impl BlockError {
    /// A failure of `kind` while doing `what` (a phrase: `reading /dev/sdb`).
    pub fn new(kind: ErrorKind, what: impl Into<String>) -> Self {
        Self { kind, what: what.into(), range: None, attempts: None, source: None }
    }

    /// The bytes it concerned: `len` bytes at `offset`.
    #[must_use]
    pub fn at(mut self, offset: u64, len: u64) -> Self {
        self.range = Some((offset, len));
        self
    }

    /// Its cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Cause>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An I/O failure while doing `what`, classified by [`ErrorKind::of_io`].
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::new(ErrorKind::of_io(&source), what).with_source(source)
    }

    /// A request that cannot be served as asked.
    pub fn invalid(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, what)
    }

    /// Something retrying cannot mend (a broken worker, a damaged file).
    pub fn fatal(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, what)
    }

    /// The copy was cancelled.
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "the copy was cancelled")
    }

    /// A sync-state or checkpoint file that is unreadable or was written by something else.
    pub fn state(path: &Path, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, format!("state file {}: {}", path.display(), message.into()))
    }

    /// The same failure, after the engine tried `attempts` times in all and gave up.
    #[must_use]
    pub fn gave_up_after(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// What the caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What was being done.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The bytes it concerned, `(offset, len)`, where known.
    pub fn range(&self) -> Option<(u64, u64)> {
        self.range
    }

    /// How many attempts the engine made before it gave up, if it retried at all.
    pub fn attempts(&self) -> Option<u32> {
        self.attempts
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if let Some((offset, len)) = self.range {
            write!(f, " at bytes {offset}+{len}")?;
        }
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        if self.kind == ErrorKind::Cancelled && self.source.is_none() {
            return Ok(());
        }
        write!(f, " ({}", self.kind)?;
        if let Some(n) = self.attempts {
            write!(f, ", gave up after {n} attempts")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for BlockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_and_io_kinds_become_kinds() {
        let raw = |n| ErrorKind::of_io(&std::io::Error::from_raw_os_error(n));
        assert_eq!(raw(rustix::io::Errno::NOSPC.raw_os_error()), ErrorKind::NoSpace);
        assert_eq!(raw(rustix::io::Errno::DQUOT.raw_os_error()), ErrorKind::NoSpace);
        assert_eq!(raw(rustix::io::Errno::NOENT.raw_os_error()), ErrorKind::NotFound);
        assert_eq!(raw(rustix::io::Errno::IO.raw_os_error()), ErrorKind::Transient);
        assert_eq!(raw(rustix::io::Errno::CONNRESET.raw_os_error()), ErrorKind::Transient);
        assert_eq!(raw(rustix::io::Errno::TIMEDOUT.raw_os_error()), ErrorKind::Transient);
        assert_eq!(raw(rustix::io::Errno::ACCESS.raw_os_error()), ErrorKind::Fatal);
        assert_eq!(raw(rustix::io::Errno::INVAL.raw_os_error()), ErrorKind::InvalidInput);
        let kind = |k| ErrorKind::of_io(&std::io::Error::from(k));
        assert_eq!(kind(std::io::ErrorKind::ConnectionRefused), ErrorKind::Transient);
        assert_eq!(kind(std::io::ErrorKind::InvalidData), ErrorKind::Fatal);
    }

    #[test]
    fn the_message_names_what_range_cause_kind_and_attempts() {
        let e = BlockError::io("reading /dev/sdb", std::io::Error::from_raw_os_error(5)).at(4096, 512);
        let text = e.to_string();
        assert!(text.starts_with("reading /dev/sdb at bytes 4096+512: "), "{text}");
        assert!(text.ends_with(" (transient)"), "{text}");
        let text = e.gave_up_after(3).to_string();
        assert!(text.ends_with("(transient, gave up after 3 attempts)"), "{text}");
        assert_eq!(BlockError::cancelled().to_string(), "the copy was cancelled");
        assert_eq!(BlockError::invalid("x is too large").to_string(), "x is too large (invalid input)");
        let src = std::error::Error::source(&BlockError::fatal("a").with_source("b")).map(ToString::to_string);
        assert_eq!(src.as_deref(), Some("b"));
    }
}
