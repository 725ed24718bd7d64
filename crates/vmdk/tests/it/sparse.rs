//! monolithicSparse files laid out before they are written ([`SparseLayout`]): random disks
//! written through the layout and read back by our reader byte for byte, and checked by qemu-img.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cbt::ExtentSet;
use testkit::run;
use vmdk::testing::xorshift;
use vmdk::{Disk, PathPolicy, SparseLayout};

use crate::qemu_img;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const GRAIN: u64 = SparseLayout::GRAIN;

/// The source disk's bytes at `offset`: a function of the offset and `seed`.
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64) ^ seed.rotate_left(29);
        *b = (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
    }
}

/// Writes the disk through `layout` to `path`.
fn write(layout: &SparseLayout, seed: u64, path: &Path) {
    let mut out = BufWriter::new(File::create(path).unwrap());
    let n = layout
        .write(&mut out, |offset, buf| {
            pattern(seed, offset, buf);
            Ok(())
        })
        .unwrap();
    out.flush().unwrap();
    assert_eq!(n, layout.len());
}

/// A random disk: a capacity of whole sectors (small, medium, or over 2 GiB with little data)
/// and up to `max_runs` unaligned allocated runs (none for some seeds).
fn random_disk(seed: u64, max_runs: u64) -> (u64, ExtentSet) {
    let mut next = xorshift(seed);
    let sectors = match seed % 3 {
        0 => 1 + next() % 8192,
        1 => 1 + next() % (128 * 2048),
        _ => 2 * GIB / 512 + next() % (4 * GIB / 512),
    };
    let capacity = sectors * 512;
    let runs = if seed.is_multiple_of(5) { 0 } else { next() % (max_runs + 1) };
    let allocated = ExtentSet::from_ranges((0..runs).map(|_| {
        let len = (1 + next() % (3 * GRAIN)).min(capacity);
        (next() % (capacity - len + 1), len)
    }));
    (capacity, allocated)
}

/// Opens `path` with our reader and checks it against the source: every byte (the pattern in
/// stored grains, zeros elsewhere), the allocation map, the header and the descriptor.
fn assert_reads_back(path: &Path, layout: &SparseLayout, allocated: &ExtentSet, seed: u64) {
    let capacity = layout.capacity();
    assert_eq!(std::fs::metadata(path).unwrap().len(), layout.len());
    let disk = Disk::open(path, PathPolicy::SameDirectory).unwrap();
    assert_eq!(disk.capacity(), capacity);
    assert_eq!(disk.layers()[0].create_type, "monolithicSparse");
    assert!(disk.warnings().is_empty(), "{:?}", disk.warnings());
    let stored = ExtentSet::from_ranges(layout.grains());
    let g = std::num::NonZeroU64::new(GRAIN).unwrap();
    assert_eq!(stored, allocated.align_outward(g, capacity));
    assert!(allocated.difference(&stored).is_empty());
    let allocation = disk.allocation().unwrap();
    assert_eq!(allocation.data, stored);
    assert!(allocation.zero.is_empty());
    assert_eq!(layout.data_bytes(), stored.total_bytes());

    let chunk = 8 * MIB;
    let mut got = vec![0u8; chunk as usize];
    let mut want = vec![0u8; chunk as usize];
    let mut at = 0;
    while at < capacity {
        let len = chunk.min(capacity - at);
        let (got, want) = (&mut got[..len as usize], &mut want[..len as usize]);
        disk.read_at(got, at).unwrap();
        want.fill(0);
        for e in stored.intersection(&ExtentSet::from_ranges([(at, len)])).iter() {
            pattern(seed, e.start(), &mut want[(e.start() - at) as usize..(e.end() - at) as usize]);
        }
        if got != want {
            let i = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{}: byte {} differs", path.display(), at + i as u64);
        }
        at += len;
    }
}

#[test]
fn random_layouts_read_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut large = 0;
    for seed in 0..15 {
        let (capacity, allocated) = random_disk(seed, 6);
        let layout = SparseLayout::new(capacity, &allocated).unwrap();
        let path = dir.path().join(format!("d{seed}.vmdk"));
        write(&layout, seed, &path);
        assert_reads_back(&path, &layout, &allocated, seed);
        if capacity > 2 * GIB {
            large += 1;
            // Metadata of 128 KiB per GiB and at most 6 runs of 3 grains (each over 2 grains).
            assert!(layout.len() < capacity / GIB * 128 * 1024 + 2 * GRAIN + 6 * 4 * GRAIN, "{}", layout.len());
        }
        std::fs::remove_file(&path).unwrap();
    }
    assert!(large >= 4, "{large} large disks");
}

#[test]
fn whole_disks_and_short_last_grains_read_back() {
    let dir = tempfile::tempdir().unwrap();
    for (i, capacity) in [512, GRAIN, GRAIN + 512, 3 * MIB + 7 * 512, 33 * MIB].into_iter().enumerate() {
        let all = ExtentSet::full(capacity);
        let layout = SparseLayout::new(capacity, &all).unwrap();
        assert_eq!(layout.grain_count(), capacity.div_ceil(GRAIN));
        assert_eq!(layout.data_bytes(), capacity);
        let path = dir.path().join(format!("full{i}.vmdk"));
        write(&layout, 40 + i as u64, &path);
        assert_reads_back(&path, &layout, &all, 40 + i as u64);
    }
}

#[test]
fn the_redundant_directory_and_tables_stand_in_for_a_damaged_primary() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 70 * MIB + 512;
    let allocated = ExtentSet::from_ranges([(0, 1), (33 * MIB, 5 * GRAIN), (capacity - 1, 1)]);
    let layout = SparseLayout::new(capacity, &allocated).unwrap();
    let path = dir.path().join("r.vmdk");
    write(&layout, 7, &path);
    let h = layout.header();
    let prefix = layout.prefix();
    // Three tables a copy, after a one-sector directory: the copies' tables are the same bytes.
    let (rgt, gt) = ((h.rgd_offset + 1) as usize * 512, (h.gd_offset + 1) as usize * 512);
    assert_eq!(prefix[rgt..rgt + 3 * 2048], prefix[gt..gt + 3 * 2048]);
    assert!(prefix[gt..gt + 3 * 2048].iter().any(|&b| b != 0));
    // Point the primary directory's first entry past the end of the file.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&u32::MAX.to_le_bytes(), h.gd_offset * 512).unwrap();
    let disk = Disk::open(&path, PathPolicy::SameDirectory).unwrap();
    assert!(disk.warnings().iter().any(|w| w.contains("redundant")), "{:?}", disk.warnings());
    let mut got = vec![0u8; 5 * GRAIN as usize];
    let mut want = got.clone();
    disk.read_at(&mut got, 33 * MIB).unwrap();
    pattern(7, 33 * MIB, &mut want);
    assert!(got == want);
}

/// Writes the raw image the layout's file stands for: the pattern in stored grains.
fn write_raw(layout: &SparseLayout, seed: u64, path: &Path) {
    let f = File::create(path).unwrap();
    f.set_len(layout.capacity()).unwrap();
    for (offset, len) in layout.grains() {
        let mut buf = vec![0u8; len as usize];
        pattern(seed, offset, &mut buf);
        f.write_all_at(&buf, offset).unwrap();
    }
}

/// `qemu-img check`, `compare` against the raw image, and `info`.
fn assert_qemu_agrees(qemu: &Path, layout: &SparseLayout, seed: u64, dir: &Path, name: &str) {
    let vmdk = dir.join(format!("{name}.vmdk"));
    let raw = dir.join(format!("{name}.raw"));
    write(layout, seed, &vmdk);
    write_raw(layout, seed, &raw);
    run(Command::new(qemu).args(["check", "-f", "vmdk"]).arg(&vmdk));
    run(Command::new(qemu).args(["compare", "-f", "vmdk", "-F", "raw"]).arg(&vmdk).arg(&raw));
    let info = run(Command::new(qemu).args(["info", "-f", "vmdk", "--output=json"]).arg(&vmdk));
    assert!(info.contains(&format!("\"virtual-size\": {}", layout.capacity())), "{info}");
    assert!(info.contains("\"create-type\": \"monolithicSparse\""), "{info}");
    std::fs::remove_file(&raw).unwrap();
}

#[test]
fn qemu_checks_and_compares_a_fixed_layout() {
    let Some(qemu) = qemu_img("qemu_checks_and_compares_a_fixed_layout") else { return };
    let dir = tempfile::tempdir().unwrap();
    let capacity = 10 * MIB + 12 * 1024;
    let allocated = ExtentSet::from_ranges([(0, 1), (3 * MIB + 5, 200 * 1024), (capacity - 512, 512)]);
    let layout = SparseLayout::new(capacity, &allocated).unwrap().with_name("fixed.vmdk").unwrap();
    assert_eq!(layout.grain_count(), 1 + 4 + 1);
    assert_qemu_agrees(&qemu, &layout, 1, dir.path(), "fixed");
}

#[test]
fn qemu_checks_and_compares_random_layouts() {
    let Some(qemu) = qemu_img("qemu_checks_and_compares_random_layouts") else { return };
    let dir = tempfile::tempdir().unwrap();
    // One of each kind of capacity, the large one over 2 GiB.
    for seed in [101, 102, 103] {
        let (capacity, allocated) = random_disk(seed, 8);
        let layout = SparseLayout::new(capacity, &allocated).unwrap();
        assert_qemu_agrees(&qemu, &layout, seed, dir.path(), &format!("r{seed}"));
    }
}
