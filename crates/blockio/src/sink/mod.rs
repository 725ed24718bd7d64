//! The sinks this crate provides: a replica in a sparse raw file or on a block device, in an
//! NBD export, and nowhere at all.

mod file;
mod nbd;
mod null;

pub use file::{FileSink, FileSinkOptions};
pub use nbd::NbdSink;
pub use null::NullSink;
