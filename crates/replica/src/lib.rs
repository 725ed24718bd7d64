//! The target writer: sinks that hold a replica of a disk, for the block pipeline. A sparse
//! raw file or block device ([`FileSink`]) and an NBD export ([`NbdSink`]).
//!
//! Sinks know how to write, zero and make durable; the sync state beside a replica is the
//! pipeline's (`pipeline::state`), written only after a sink's commit.

mod file;
mod nbd;

pub use file::{FileSink, FileSinkOptions};
pub use nbd::NbdSink;

/// The digest and planning unit of replicas unless configured: 1 MiB keeps a 2 TiB disk's
/// digests at 64 MiB while widening 64 KiB CBT areas only a little.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;
