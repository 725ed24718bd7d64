//! The replica target: sinks that hold a replica of a disk, for the block pipeline (a sparse
//! raw file or block device, [`FileSink`], and an NBD export, [`NbdSink`]), the sync state
//! beside a replica ([`state`]), written through `durable` only after a sink's commit, and the
//! replication flow that plans, copies, checkpoints and commits one disk ([`replicate`]).

mod file;
mod nbd;
pub mod replicate;
pub mod state;

pub use file::{FileSink, FileSinkOptions};
pub use nbd::NbdSink;

/// The digest and planning unit of replicas unless configured: 1 MiB keeps a 2 TiB disk's
/// digests at 64 MiB while widening 64 KiB CBT areas only a little.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;

/// A sink that keeps nothing, like nbdcopy's `null:`: for measuring sources alone. It claims to
/// read as zeros, so zeros are not even sent.
#[derive(Debug)]
pub struct NullSink {
    size: u64,
    granularity: std::num::NonZeroU64,
}

impl NullSink {
    /// A null sink of `size` bytes.
    pub fn new(size: u64, granularity: std::num::NonZeroU64) -> Self {
        Self { size, granularity }
    }
}

impl pipeline::BlockSink for NullSink {
    fn size(&self) -> u64 {
        self.size
    }
    fn describe(&self) -> String {
        "null:".into()
    }
    fn granularity(&self) -> std::num::NonZeroU64 {
        self.granularity
    }
    fn known_zero(&self) -> bool {
        true
    }
    fn write_at(&self, offset: u64, data: bytes::Bytes) -> pipeline::IoFuture<'_, ()> {
        Box::pin(async move { pipeline::check_range("null:", offset, data.len() as u64, self.size) })
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> pipeline::IoFuture<'_, ()> {
        Box::pin(async move { pipeline::check_range("null:", offset, length, self.size) })
    }
    fn flush(&self) -> pipeline::IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
