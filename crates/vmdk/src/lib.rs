//! VMware VMDK formats, read and written without VMware's libraries.
//!
//! - [`Descriptor`]: descriptor files, parsed with fixed caps and formatted to round-trip.
//! - [`Disk`]: a virtual disk opened from a descriptor, a monolithicSparse or a
//!   streamOptimized file, with its extents (FLAT, VMFS, SPARSE, ZERO, VMFSSPARSE, SESPARSE) and
//!   its parent chain (CID-checked), read at any offset; [`Disk::allocation`] says where data is.
//! - [`StreamReader`]: a streamOptimized file read front to back, as an export delivers it.
//! - Writers: [`write_stream_optimized`]; [`SparseLayout`], a monolithicSparse file whose size
//!   is known before it is streamed (an upload with a `Content-Length`); and COWD
//!   ([`cowd::write`]) and SEsparse ([`sesparse::write`]) snapshot deltas, so chains can be
//!   built for tests and simulators.
//! - [`export_raw`]: a disk's contents as a sparse raw image.
//!
//! All input is treated as hostile: every offset and size from a file is checked before use,
//! nothing is allocated beyond what the file's size justifies, and nothing panics. No network,
//! no async: callers bring bytes through [`ReadAt`].

pub mod cowd;
mod descriptor;
mod disk;
mod error;
mod export;
mod grains;
mod io;
pub mod kdmv;
pub mod sesparse;
mod sparse_file;
mod sparse_layout;
mod stream;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

// Offsets are u64 and buffers are indexed by usize; on the 64-bit targets this crate is for,
// one converts to the other without loss, so the conversion is written once, here.
const _: () = assert!(usize::BITS == 64, "the vmdk crate needs a 64-bit target");

/// A u64 as a usize (lossless: 64-bit targets only, asserted above).
#[expect(clippy::cast_possible_truncation, reason = "usize is 64 bits (asserted at compile time)")]
pub(crate) const fn to_usize(x: u64) -> usize {
    x as usize
}

pub use cowd::DeltaContent;
pub use descriptor::{
    Access, Descriptor, ExtentKind, ExtentLine, MAX_DESCRIPTOR_BYTES, MAX_DISK_SECTORS, MAX_EXTENTS, NO_PARENT_CID,
    Value, flat_descriptor, parse_cid,
};
pub use disk::{Allocation, Disk, Files, Layer, LayerExtent, LocalFiles, MAX_CHAIN_DEPTH, PathPolicy};
pub use error::{Result, VmdkError};
pub use export::{ExportStats, export_raw, export_raw_of};
pub use io::ReadAt;
pub use kdmv::{KdmvExtent, SparseHeader};
pub use sparse_file::{SparseFile, SparseKind};
pub use sparse_layout::SparseLayout;
pub use stream::{StreamGrain, StreamReader, StreamStats, write_stream_optimized};
