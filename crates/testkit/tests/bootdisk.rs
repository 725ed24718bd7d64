//! Boots each boot-disk fixture with bare `qemu-system-x86_64` under TCG (the raw file, the
//! variant's firmware and controller) and checks the marker and that the guest read the payload
//! the build wrote; prints each boot's time to the marker.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use testkit::bootdisk::{self, Variant};

/// One boot at a time: TCG guests competing for the cores would time each other.
static ONE_BOOT: Mutex<()> = Mutex::new(());

fn boots(variant: Variant, test: &str) {
    let Some(qemu) = testkit::require_tool("qemu-system-x86_64", test) else { return };
    if variant.efi() && !Path::new(bootdisk::OVMF_CODE).is_file() {
        testkit::skip(test, "OVMF is not installed (package ovmf)");
        return;
    }
    let Some(disk) = bootdisk::require(variant, test) else { return };
    assert_eq!(std::fs::metadata(&disk.path).expect("the image").len(), disk.size);
    let dir = tempfile::tempdir().expect("a temp dir");
    let _one = ONE_BOOT.lock().unwrap_or_else(|p| p.into_inner());
    let boot = bootdisk::boot_bare(&disk, &qemu, dir.path(), Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(
        boot.payload_sha256.as_deref(),
        Some(disk.payload_sha256.as_str()),
        "the guest's hash of its payload; console:\n{}",
        boot.console
    );
    eprintln!("{test}: bare TCG boot of {} to the marker in {:.2} s", variant.name(), boot.to_marker.as_secs_f64());
}

#[test]
fn bios_disk_boots_on_sata() {
    boots(Variant::Bios, "bios_disk_boots_on_sata");
}

#[test]
fn efi_disk_boots_on_sata() {
    boots(Variant::Efi, "efi_disk_boots_on_sata");
}

#[test]
fn bios_disk_boots_on_pvscsi() {
    boots(Variant::BiosPvscsi, "bios_disk_boots_on_pvscsi");
}

#[test]
fn builds_are_cached_by_content() {
    let test = "builds_are_cached_by_content";
    let Some(a) = bootdisk::require(Variant::Bios, test) else { return };
    let modified = std::fs::metadata(&a.path).and_then(|m| m.modified()).expect("the image's time");
    let b = bootdisk::build(Variant::Bios).expect("a second build");
    assert_eq!(a.path, b.path);
    assert_eq!(std::fs::metadata(&b.path).and_then(|m| m.modified()).expect("the image's time"), modified);
    assert_eq!(a.payload_sha256, b.payload_sha256);
}
