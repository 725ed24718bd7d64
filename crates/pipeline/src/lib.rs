//! The transport-neutral block pipeline: [`BlockSource`] and [`BlockSink`], and a copy engine
//! that moves a `cbt` plan between them under one process-wide memory cap, keeping per-block
//! [`Digests`] and saving checkpoints through [`SaveCheckpoint`] for resume.
//!
//! It knows nothing of vSphere or VDDK: those plug in as sources from their own crates. Sync
//! state and the replication flow are the replica's (`replica::state`, `replica::replicate`).

mod digest;
mod engine;
mod error;
mod io;
pub mod limit;
pub mod pool;
pub mod progress;

#[cfg(feature = "test-utils")]
pub mod conformance;

pub use digest::{BlockDigester, Digests, zero_digest};
pub use engine::{
    Cancel, CopyOptions, CopyReport, DiskCopy, Durable, Engine, PATIENCE, SaveCheckpoint, copy_disk, copy_disks,
    is_zero, plan_digest,
};
pub use error::{BlockError, Cause, ErrorKind};
pub use io::{BlockDigest, BlockSink, BlockSource, IoFuture, SourceAllocation, check_range};

/// Runs blocking work (file I/O, fsync, state files) on tokio's blocking threads, off the async
/// ones, for every source, sink and state operation that is not async by nature.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlockError> + Send + 'static,
) -> Result<T, BlockError> {
    blocking_as(f).await
}

/// [`blocking`] for work whose error is the caller's own type (any that a [`BlockError`]
/// converts into): a repository call, a lease.
pub async fn blocking_as<T: Send + 'static, E: From<BlockError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f).await.map_err(|e| E::from(BlockError::fatal("a blocking task").with_source(e)))?
}
