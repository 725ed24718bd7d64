//! The transport-neutral block pipeline: [`BlockSource`] and [`BlockSink`], a copy engine that
//! moves a `cbt` plan between them under one process-wide memory cap, sync state that only a
//! commit writes, checkpoints for resume, and the replication flow built from them.
//!
//! It knows nothing of vSphere or VDDK: those plug in as sources from their own crates.

mod engine;
mod error;
mod io;
pub mod limit;
pub mod pool;
pub mod progress;
pub mod replicate;
pub mod source;
pub mod state;

#[cfg(feature = "test-utils")]
pub mod conformance;

pub use engine::{
    Cancel, CheckpointTo, CopyOptions, CopyReport, DiskCopy, Durable, Engine, SaveCheckpoint, copy_disk, copy_disks,
    is_zero, plan_digest,
};
pub use error::BlockError;
pub use io::{BlockDigest, BlockSink, BlockSource, IoFuture, SourceAllocation, check_range};

/// Runs blocking work (file I/O, fsync, state files) on tokio's blocking threads, off the async
/// ones, for every source, sink and state operation that is not async by nature.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlockError> + Send + 'static,
) -> Result<T, BlockError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BlockError::Invalid(format!("blocking task: {e}")))?
}
