//! The sources this crate provides: raw files and block devices, VMDK files and chains, and
//! NBD exports. VDDK and vSphere datastore sources live with their crates.

mod file;
mod nbd;
mod vmdk;

pub use file::FileSource;
pub use nbd::{DEFAULT_WIRE_REQUEST, NbdPool, NbdSource};
pub use vmdk::VmdkSource;
