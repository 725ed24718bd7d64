//! Instant recovery: any restore point of the repository, or a replica's disk, served as an
//! NBD export (`nbd_wire::server::ExportSource`) without copying it back first.
//!
//! - [`PointExport`]: one disk of a restore point, read by chunk through a bounded cache of
//!   decoded chunks with read-ahead for sequential scans; all-zero chunks are holes; every chunk
//!   that fails verification while served is recorded ([`PointExport::failed_chunks`]) and its
//!   reads fail with `EIO`.
//! - [`FileExport`]: a replica's disk (a raw file or a block device), read-only, holes from
//!   `SEEK_DATA`/`SEEK_HOLE`; [`replica_disks`] finds a replica's disks and their sync state.
//! - [`Overlay`]: a writable copy-on-write layer over any read-only export, kept in a sparse
//!   temporary file outside the repository and the replica, removed when dropped.
//! - [`commit`]: what overlays show, stored as a new restore point whose parent is the one
//!   served (only written chunks are stored).
//!
//! Nothing here knows vSphere, QEMU or SOAP: bytes, chunks and files only.

mod commit;
mod file;
mod overlay;
mod point;

use std::path::PathBuf;

pub use commit::commit;
pub use file::{FileExport, ReplicaDisk, replica_disks};
pub use overlay::Overlay;
pub use point::{CacheConfig, CacheStats, FailedChunk, PointExport};

/// Why an export could not be opened, or overlays not stored.
#[derive(Debug, thiserror::Error)]
pub enum InstantError {
    /// The repository refused (no such restore point or disk, damage, a lock, a key); its
    /// [`repo::RepoError::kind`] says what to do.
    #[error(transparent)]
    Repo(#[from] repo::RepoError),
    /// A file (a replica's disk, an overlay) could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// There is no such disk (a replica folder without disks, an overlay for a disk the
    /// restore point lacks).
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense (a block size that is not a power of two, an overlay of
    /// another size than its disk, the same disk twice).
    #[error("{0}")]
    Invalid(String),
    /// Reading what an overlay shows failed while storing it: nothing was stored.
    #[error("reading {what}: {source}")]
    Read {
        /// Which disk and range.
        what: String,
        /// Why.
        source: nbd_wire::server::ExportError,
    },
    /// Storing a chunk or an index of the new restore point failed: no restore point was
    /// made; its kind says whether trying again may help.
    #[error("storing {what}: {source}")]
    Store {
        /// Which disk.
        what: String,
        /// Why.
        source: pipeline::BlockError,
    },
}

impl InstantError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
