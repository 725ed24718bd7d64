//! Durable files, one implementation for the repository and the replica: atomic writes
//! (a temporary file, fsynced, renamed over, the directory fsynced), a [`Store`] of named files
//! on a [`Fs`] (the real one, or in tests the crash-simulating `crashfs`), and locks and job
//! leases kept as files in a store.
//!
//! It knows nothing of repositories, replicas, disks or vSphere, and needs no async runtime:
//! callers run it on their blocking threads.

#[cfg(any(test, feature = "test-utils"))]
pub mod crashfs;
mod lease;
mod store;

use std::path::{Path, PathBuf};

pub use lease::{
    Heartbeat, JobLease, LockInfo, LockKind, LockTiming, host_name, live_in, live_jobs_in, now_secs, process_alive,
};
pub use store::{
    Entry, Fs, LocalStore, RealFs, Store, TEMP_PREFIX, check_name, sync_parent, temp_writer, write_atomic,
};

/// Why a durable write, a store call, a lock or a lease failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written or synced ([`Error::unwritable`] tells a medium that
    /// takes no writes at all).
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A name that is not a file inside the store (absolute, empty, `.` or `..` parts): a
    /// tampered index or manifest, never to be followed.
    #[error("{0:?} is not a file name inside the store")]
    BadName(String),
    /// A live holder is in the way (a running job of that name, a lock).
    #[error("{0}")]
    Locked(String),
    /// A request that makes no sense (a job name that is no file name).
    #[error("{0}")]
    Invalid(String),
    /// An object store answered with an error, or could not be reached. The store classifies
    /// it once, as the kind of `source`: a refused, reset or timed-out connection or a busy
    /// server (`ResourceBusy`) may pass, a missing object or bucket is `NotFound`, refused
    /// credentials are `PermissionDenied`.
    #[error("object storage: {what}: {source}")]
    Remote {
        /// The object or operation.
        what: String,
        /// The store's error, of the kind the store decided.
        source: std::io::Error,
    },
    /// The thread that refreshes a lock or lease could not be started.
    #[error("cannot start a heartbeat: {0}")]
    Spawn(#[source] std::io::Error),
}

impl Error {
    /// An I/O failure at `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    /// Why this error means the medium cannot take a write at all, if it does.
    pub fn unwritable(&self) -> Option<&'static str> {
        match self {
            Self::Io { source, .. } => unwritable(source),
            _ => None,
        }
    }
}

/// For callers whose errors wrap an I/O error: the kind is kept, and the path goes into the
/// message.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { path, source } => Self::new(source.kind(), format!("{}: {source}", path.display())),
            Error::Spawn(source) => source,
            Error::Remote { what, source } => Self::new(source.kind(), format!("object storage: {what}: {source}")),
            e => Self::other(e),
        }
    }
}

/// Why an I/O error means the medium cannot take a write at all (a read-only medium, no write
/// permission, a full disk or quota), if it does.
pub fn unwritable(e: &std::io::Error) -> Option<&'static str> {
    match e.kind() {
        std::io::ErrorKind::ReadOnlyFilesystem => Some("the file system is read-only"),
        std::io::ErrorKind::PermissionDenied => Some("writing is not permitted"),
        std::io::ErrorKind::StorageFull => Some("the disk is full"),
        std::io::ErrorKind::QuotaExceeded => Some("the disk quota is exhausted"),
        _ => None,
    }
}
