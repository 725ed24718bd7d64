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

use pipeline::BlockError;

/// The digest and planning unit of replicas unless configured: 1 MiB keeps a 2 TiB disk's
/// digests at 64 MiB while widening 64 KiB CBT areas only a little.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;

/// An NBD failure with what was being done, retryable when NBD says it is.
pub(crate) fn nbd_error(what: impl Into<String>, source: nbd_wire::NbdError) -> BlockError {
    BlockError::Transport { what: what.into(), retryable: source.is_retryable(), source: Box::new(source) }
}

/// A VMDK that could not be opened, mapped or read, with what was being done: its files are
/// local, so trying again would not help.
pub(crate) fn vmdk_error(what: impl Into<String>, source: vmdk::VmdkError) -> BlockError {
    BlockError::Transport { what: what.into(), retryable: false, source: Box::new(source) }
}
