//! The sources this crate provides: raw files and block devices, VMDK files and chains, and
//! NBD exports. VDDK and vSphere datastore sources live with their crates.

mod file;
mod nbd;
mod vmdk;

pub use file::{FileSource, data_extents};
pub use nbd::{DEFAULT_WIRE_REQUEST, NbdPool, NbdSource};
pub use vmdk::VmdkSource;

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::BlockError> + Send + 'static,
) -> Result<T, crate::BlockError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| crate::BlockError::Invalid(format!("blocking task: {e}")))?
}
