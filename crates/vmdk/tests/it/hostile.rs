//! Hostile input: broken headers, tables that point outside the file, descriptors that reach
//! outside their directory, loops and over-deep chains. Each gets a clear error, never a panic.

use std::sync::Arc;

use vmdk::testing::tiny_sparse_image;
use vmdk::{Disk, PathPolicy, SparseFile, VmdkError};

fn open(img: Vec<u8>) -> Result<SparseFile, VmdkError> {
    SparseFile::open(Arc::new(img), "t.vmdk")
}

fn patched(at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut img = tiny_sparse_image();
    img[at..at + bytes.len()].copy_from_slice(bytes);
    img
}

#[test]
fn the_tiny_image_reads_right() {
    let f = open(tiny_sparse_image()).unwrap();
    assert_eq!(f.capacity(), 128 * 1024);
    let mut buf = vec![0xffu8; 128 * 1024];
    f.read_at(&mut buf, 0).unwrap();
    assert!(buf[..65536].iter().enumerate().all(|(i, &b)| b == i.to_le_bytes()[0]));
    assert!(buf[65536..].iter().all(|&b| b == 0));
    assert_eq!(f.allocation().0, cbt::ExtentSet::from_ranges([(0, 65536)]));
}

#[test]
fn table_of_broken_headers() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic", patched(0, b"XXXX"), "not a KDMV"),
        ("version", patched(4, &4u32.to_le_bytes()), "version 4"),
        ("grain size", patched(20, &3u64.to_le_bytes()), "grain size 3"),
        ("grain size huge", patched(20, &(1u64 << 40).to_le_bytes()), "grain size"),
        ("no table entries", patched(44, &0u32.to_le_bytes()), "entries per grain table"),
        ("too many table entries", patched(44, &513u32.to_le_bytes()), "entries per grain table"),
        ("capacity", patched(12, &(1u64 << 62).to_le_bytes()), "too large"),
        ("overhead", patched(64, &(1u64 << 40).to_le_bytes()), "metadata"),
        ("descriptor outside", patched(28, &(1u64 << 50).to_le_bytes()), "descriptor"),
        ("compression", patched(8, &(1u32 << 16).to_le_bytes()), "deflate"),
        (
            "both directories outside",
            {
                let mut i = patched(56, &(1u64 << 40).to_le_bytes());
                i[48..56].copy_from_slice(&(1u64 << 40).to_le_bytes());
                i
            },
            "outside the file",
        ),
        (
            "grain past the end",
            {
                let mut i = patched(9 * 512, &1_000_000u32.to_le_bytes());
                i[4 * 512..4 * 512 + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
                i
            },
            "past the end",
        ),
        (
            "grain inside metadata",
            {
                let mut i = patched(9 * 512, &2u32.to_le_bytes());
                i[4 * 512..4 * 512 + 4].copy_from_slice(&2u32.to_le_bytes());
                i
            },
            "inside the metadata",
        ),
        (
            "shared tables",
            {
                // Two directory entries (a 64 MiB disk), both pointing at one table, in both copies.
                let mut i = patched(12, &(2u64 * 65536).to_le_bytes());
                i[8 * 512 + 4..8 * 512 + 8].copy_from_slice(&9u32.to_le_bytes());
                i[3 * 512 + 4..3 * 512 + 8].copy_from_slice(&4u32.to_le_bytes());
                i
            },
            "overlap",
        ),
        ("truncated", tiny_sparse_image()[..1000].to_vec(), ""),
        ("empty", Vec::new(), "too short"),
    ];
    for (name, img, expected) in cases {
        let err = open(img).expect_err(name).to_string();
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn a_damaged_primary_directory_falls_back_to_the_redundant_copy() {
    // The primary table points past the end; the redundant one is intact.
    let f = open(patched(9 * 512, &1_000_000u32.to_le_bytes())).unwrap();
    assert!(f.warnings()[0].contains("redundant"), "{:?}", f.warnings());
    let mut buf = vec![0u8; 512];
    f.read_at(&mut buf, 512).unwrap();
    assert_eq!(buf[0], 0);
    assert_eq!(buf[1], 1);
}

#[test]
fn random_corruption_never_panics() {
    let mut next = vmdk::testing::xorshift(0x9e37_79b9_7f4a_7c15);
    let clean = tiny_sparse_image();
    for _ in 0..3000 {
        let mut img = clean.clone();
        for _ in 0..(next() % 8 + 1) {
            // Mostly metadata (first 5 KiB), sometimes anywhere.
            let at = if next().is_multiple_of(4) { next() % img.len() as u64 } else { next() % 5120 } as usize;
            img[at] = next().to_le_bytes()[0];
        }
        if let Ok(f) = open(img) {
            let mut buf = vec![0u8; f.capacity().min(1 << 20) as usize];
            let _ = f.read_at(&mut buf, 0);
            let _ = f.allocation();
        }
    }
}

#[test]
fn descriptors_cannot_reach_outside_their_directory_loop_or_nest_too_deep() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: String| std::fs::write(d.join(name), text).unwrap();
    let desc = |cid: u32, parent_cid: u32, hint: &str, extent: &str| {
        format!(
            "version=1\nCID={cid:08x}\nparentCID={parent_cid:08x}\ncreateType=\"vmfsSparse\"\nparentFileNameHint=\"{hint}\"\nRW 8 {extent}\n"
        )
    };
    write("up.vmdk", desc(1, 0xffff_ffff, "", "FLAT \"../etc/passwd\" 0"));
    write("abs.vmdk", desc(1, 0xffff_ffff, "", "FLAT \"/etc/passwd\" 0"));
    for name in ["up.vmdk", "abs.vmdk"] {
        match Disk::open(d.join(name), PathPolicy::SameDirectory) {
            Err(VmdkError::Path { .. }) => {}
            other => panic!("{name}: expected a refused path, got {other:?}"),
        }
    }
    write("loop.vmdk", desc(5, 5, "loop.vmdk", "ZERO"));
    let err = Disk::open(d.join("loop.vmdk"), PathPolicy::SameDirectory).unwrap_err().to_string();
    assert!(err.contains("loops"), "{err}");
    // 40 layers, each the parent of the next.
    write("l0.vmdk", desc(100, 0xffff_ffff, "", "ZERO"));
    for i in 1..40 {
        write(&format!("l{i}.vmdk"), desc(100 + i, 100 + i - 1, &format!("l{}.vmdk", i - 1), "ZERO"));
    }
    let err = Disk::open(d.join("l39.vmdk"), PathPolicy::SameDirectory).unwrap_err().to_string();
    assert!(err.contains("deeper than 32"), "{err}");
    let ok = Disk::open(d.join("l20.vmdk"), PathPolicy::SameDirectory).unwrap();
    assert_eq!(ok.layers().len(), 21);
}

#[test]
fn a_stream_claiming_huge_grains_fails_without_allocating_them() {
    use vmdk::StreamReader;
    // A streamOptimized header with 1 GiB grains, then one marker claiming 2 GiB of data.
    let header = vmdk::SparseHeader {
        version: 3,
        flags: 1 | 1 << 16 | 1 << 17,
        capacity: 1 << 30,
        grain_size: 1 << 21,
        descriptor_offset: 0,
        descriptor_size: 0,
        gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: u64::MAX,
        overhead: 1,
        unclean_shutdown: false,
        compress_algorithm: 1,
    };
    let mut img = header.to_bytes().to_vec();
    let mut marker = [0u8; 512];
    marker[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    img.extend_from_slice(&marker);
    let mut r = StreamReader::new(&img[..], "huge").unwrap();
    let err = r.next_grain().unwrap_err().to_string();
    assert!(err.contains("compressed bytes"), "{err}");
    marker[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    img.truncate(512);
    img.extend_from_slice(&marker);
    let mut r = StreamReader::new(&img[..], "huge").unwrap();
    let err = r.next_grain().unwrap_err().to_string();
    assert!(err.contains("ends inside"), "{err}");
}
