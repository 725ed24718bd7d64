//! A sink that keeps nothing, for measuring a source alone.

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
