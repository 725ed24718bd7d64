//! Sources and sinks at the edge of the block pipeline, for disks a proxy reaches without
//! vSphere: a raw file or block device ([`FileSource`], [`FileSink`]), a VMDK file or chain
//! ([`VmdkSource`]), an NBD export ([`NbdSource`], [`NbdSink`], sharing one [`NbdPool`]), and
//! [`NullSink`] for measuring a source alone.
//!
//! Each implements `pipeline`'s `BlockSource` or `BlockSink` and passes its conformance suite.
//! Nothing here plans, orders a job or speaks to vSphere.

pub mod sink;
pub mod source;

pub use sink::{FileSink, FileSinkOptions, NbdSink, NullSink};
pub use source::{DEFAULT_WIRE_REQUEST, FileSource, NbdPool, NbdSource, VmdkSource};

/// The digest and planning unit of replicas unless configured: 1 MiB keeps a 2 TiB disk's
/// digests at 64 MiB while widening 64 KiB CBT areas only a little.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;
