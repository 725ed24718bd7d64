//! The simulator's bootable guest disks (`vsphere_sim::bootdisk`), and how a test asks for
//! one: skipped loudly when a prerequisite is missing, failed under `CI=true`.

pub use vsphere_sim::bootdisk::*;

/// Builds a disk, or skips the test loudly (fails it under `CI=true`) when a prerequisite is
/// missing. A build that fails for another reason fails the test.
pub fn require(variant: Variant, test: &str) -> Option<BootDisk> {
    match build(variant) {
        Ok(disk) => Some(disk),
        Err(BuildError::Missing(why)) => {
            crate::skip(test, &format!("cannot build the {} boot disk: {why}", variant.name()));
            None
        }
        Err(e) => panic!("{test}: building the {} boot disk: {e}", variant.name()),
    }
}
