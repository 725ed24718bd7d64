//! The vmdk crate's integration tests: images made by the real qemu-img, chains our writers
//! build checked by qemu-img, and hostile input.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the crate is 64-bit only")]

mod chains;
mod hostile;
mod qemu;
mod sparse;
mod stream;

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{require_tool, run, same_contents};

use vmdk::{Disk, PathPolicy, export_raw};

/// Exports `vmdk` with our reader and checks it equals `truth` byte for byte.
pub(crate) fn assert_reads_as(vmdk: &Path, truth: &Path) {
    let disk = Disk::open(vmdk, PathPolicy::SameDirectory).unwrap_or_else(|e| panic!("{}: {e}", vmdk.display()));
    let out = vmdk.with_extension("ours.raw");
    let f = std::fs::File::create(&out).unwrap();
    let stats = export_raw(&disk, &f, 2).unwrap();
    assert_eq!(stats.capacity, std::fs::metadata(truth).unwrap().len(), "{}", vmdk.display());
    same_contents(&out, truth).unwrap().unwrap_or_else(|e| panic!("{}: {e}", vmdk.display()));
    std::fs::remove_file(out).unwrap();
}

/// qemu-img, or `None` when the test should be skipped.
pub(crate) fn qemu_img(test: &str) -> Option<PathBuf> {
    require_tool("qemu-img", test)
}

/// `qemu-img convert -O raw`, our oracle for what a VMDK holds.
pub(crate) fn qemu_to_raw(qemu: &Path, vmdk: &Path, out: &Path) {
    run(Command::new(qemu).args(["convert", "-O", "raw"]).arg(vmdk).arg(out));
}
