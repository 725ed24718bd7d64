//! Images of every subformat made by the real qemu-img from random sparse raw images, read back
//! byte for byte.

use std::process::Command;

use testkit::{require_tool, run};
use vmdk::testing::{nonzero_sectors, random_sparse_image};
use vmdk::{Disk, PathPolicy};

use crate::{assert_reads_as, qemu_img};

const MIB: u64 = 1 << 20;

/// Sizes: not a multiple of the 64 KiB grain; a plain one; and over 4 GiB (sparse, so cheap).
const SIZES: [u64; 3] = [10 * MIB + 12 * 1024, 64 * MIB, 4 * 1024 * MIB + 3 * MIB + 512];

#[test]
fn every_qemu_subformat_reads_back_byte_for_byte() {
    let Some(qemu) = qemu_img("every_qemu_subformat_reads_back_byte_for_byte") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (i, &size) in SIZES.iter().enumerate() {
        let raw = dir.path().join(format!("src{i}.raw"));
        let written = random_sparse_image(&raw, size, 12, 0x1000 + i as u64).unwrap();
        let nonzero = nonzero_sectors(&raw, &written).unwrap();
        for (name, options) in [
            ("monolithicSparse", "subformat=monolithicSparse"),
            ("streamOptimized", "subformat=streamOptimized"),
            ("twoGbMaxExtentSparse", "subformat=twoGbMaxExtentSparse"),
            ("monolithicFlat", "subformat=monolithicFlat"),
            ("compat6", "subformat=monolithicSparse,compat6=on"),
            ("zeroedGrain", "subformat=monolithicSparse,zeroed_grain=on"),
        ] {
            let vmdk = dir.path().join(format!("d{i}-{name}.vmdk"));
            run(Command::new(&qemu).args(["convert", "-O", "vmdk", "-o", options]).arg(&raw).arg(&vmdk));
            let disk = Disk::open(&vmdk, PathPolicy::SameDirectory).unwrap();
            assert_eq!(disk.capacity(), size, "{name}");
            let expected_type = if name == "compat6" || name == "zeroedGrain" { "monolithicSparse" } else { name };
            assert_eq!(disk.layers()[0].create_type, expected_type);
            // The allocation map covers every non-zero sector (qemu may store more, never less).
            let data = disk.allocation().unwrap().data;
            assert!(
                nonzero.difference(&data).is_empty(),
                "{name}: data outside the map: {:?}",
                nonzero.difference(&data)
            );
            assert!(data.end() <= size);
            assert_reads_as(&vmdk, &raw);
        }
    }
}

#[test]
fn zeroed_grains_written_by_qemu_io_read_as_zeros_and_are_reported() {
    let Some(qemu) = qemu_img("zeroed_grains_written_by_qemu_io_read_as_zeros_and_are_reported") else { return };
    let Some(qemu_io) = require_tool("qemu-io", "zeroed_grains_written_by_qemu_io_read_as_zeros_and_are_reported")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 16 * MIB;
    random_sparse_image(&raw, size, 30, 77).unwrap();
    // Fill the first 4 MiB completely, so the zero writes below hit allocated grains.
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5a; 4 << 20], 0).unwrap();
    let vmdk = dir.path().join("z.vmdk");
    run(Command::new(&qemu)
        .args(["convert", "-O", "vmdk", "-o", "subformat=monolithicSparse,zeroed_grain=on"])
        .arg(&raw)
        .arg(&vmdk));
    // Whole grains (64 KiB) zeroed through the zeroed-grain table entry.
    for (off, len) in [(0u64, 128 * 1024u64), (MIB, 64 * 1024), (12 * MIB, MIB)] {
        run(Command::new(&qemu_io).args(["-f", "vmdk", "-c", &format!("write -z {off} {len}")]).arg(&vmdk));
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0; len as usize], off).unwrap();
    }
    let disk = Disk::open(&vmdk, PathPolicy::SameDirectory).unwrap();
    let zero = disk.allocation().unwrap().zero;
    assert!(zero.contains(0) && zero.contains(MIB) && zero.contains(12 * MIB), "zeroed grains: {zero:?}");
    assert_reads_as(&vmdk, &raw);
}

#[test]
fn a_damaged_primary_grain_directory_is_read_through_the_redundant_one() {
    let Some(qemu) = qemu_img("a_damaged_primary_grain_directory_is_read_through_the_redundant_one") else { return };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    random_sparse_image(&raw, 48 * MIB, 20, 5).unwrap();
    let vmdk = dir.path().join("d.vmdk");
    run(Command::new(&qemu).args(["convert", "-O", "vmdk", "-o", "subformat=monolithicSparse"]).arg(&raw).arg(&vmdk));
    let header = std::fs::read(&vmdk).unwrap();
    let gd_sector = u64::from_le_bytes(header[56..64].try_into().unwrap());
    // Scribble over the primary directory's entries.
    let f = std::fs::OpenOptions::new().write(true).open(&vmdk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xEE; 8], gd_sector * 512).unwrap();
    let disk = Disk::open(&vmdk, PathPolicy::SameDirectory).unwrap();
    assert!(disk.warnings().iter().any(|w| w.contains("redundant")), "{:?}", disk.warnings());
    assert_reads_as(&vmdk, &raw);
}
