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

/// A delta as one hosted sparse file: the tiny image (first grain data, second unallocated)
/// with `descriptor` over its embedded descriptor area (sectors 1 and 2), and a flat parent
/// `base.vmdk` (CID 0000abcd) that reads as 0x5a everywhere.
fn delta_over_flat_parent(d: &std::path::Path, descriptor: &[u8]) -> std::path::PathBuf {
    std::fs::write(
        d.join("base.vmdk"),
        "version=1\nCID=0000abcd\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 256 FLAT \"base-flat.vmdk\" 0\n",
    )
    .unwrap();
    std::fs::write(d.join("base-flat.vmdk"), vec![0x5a; 128 << 10]).unwrap();
    let mut img = tiny_sparse_image();
    img[512..1536].fill(0);
    img[512..512 + descriptor.len()].copy_from_slice(descriptor);
    let path = d.join("delta.vmdk");
    std::fs::write(&path, img).unwrap();
    path
}

fn delta_descriptor(encoding: Option<&str>, ddb_line: &[u8]) -> Vec<u8> {
    let mut t = b"# Disk DescriptorFile\nversion=1\n".to_vec();
    if let Some(e) = encoding {
        t.extend_from_slice(format!("encoding=\"{e}\"\n").as_bytes());
    }
    t.extend_from_slice(
        b"CID=00001234\nparentCID=0000abcd\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n\
          RW 256 SPARSE \"delta.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n",
    );
    t.extend_from_slice(ddb_line);
    t.push(b'\n');
    t
}

#[test]
fn a_delta_whose_embedded_descriptor_cannot_be_read_is_refused_not_cut_from_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // windows-1252, as older hosted products declare it: é (0xe9) and € (0x80) decode, and the
    // parent's bytes show through the delta's unallocated grain.
    let path = delta_over_flat_parent(d, &delta_descriptor(Some("windows-1252"), b"ddb.comment = \"caf\xe9 \x80\""));
    let disk = Disk::open(&path, PathPolicy::SameDirectory).unwrap();
    assert_eq!(disk.layers().len(), 2, "the delta keeps its parent");
    let top = disk.layers()[0].descriptor.as_ref().unwrap();
    assert_eq!(top.ddb("ddb.comment"), Some("caf\u{e9} \u{20ac}"));
    let mut buf = vec![0u8; 128 << 10];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf[..64 << 10].iter().enumerate().all(|(i, &b)| b == i as u8), "the delta's own grain");
    assert!(buf[64 << 10..].iter().all(|&b| b == 0x5a), "the parent's bytes under the unallocated grain");

    // The same byte without a declared encoding, or under a declared UTF-8, is an error that
    // names the file and the offset; so is a line that does not parse.
    let cases: [(Option<&str>, &[u8], &str); 4] = [
        (None, b"ddb.comment = \"caf\xe9\"", "declares no encoding but is not UTF-8: byte 0xe9"),
        (Some("UTF-8"), b"ddb.comment = \"caf\xe9\"", "declares encoding \"UTF-8\" but is not UTF-8"),
        (Some("Shift_JIS"), b"ddb.comment = \"\x83\x65\"", "unsupported: the descriptor's encoding \"Shift_JIS\""),
        (Some("UTF-8"), b"ddb.comment = \"unterminated", "descriptor line"),
    ];
    for (encoding, line, expected) in cases {
        let path = delta_over_flat_parent(d, &delta_descriptor(encoding, line));
        let err = Disk::open(&path, PathPolicy::SameDirectory).unwrap_err().to_string();
        assert!(err.contains(expected) && err.contains("delta.vmdk"), "{encoding:?}: {err}");
    }

    // A piece of a split disk is named by its descriptor, which is the one that counts: its
    // own broken embedded descriptor stays a warning.
    delta_over_flat_parent(d, b"version=1\ncreateType=\"x\"\nnonsense\n");
    std::fs::write(
        d.join("split.vmdk"),
        "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nRW 256 SPARSE \"delta.vmdk\"\n",
    )
    .unwrap();
    let split = Disk::open(d.join("split.vmdk"), PathPolicy::SameDirectory).unwrap();
    assert!(split.warnings().iter().any(|w| w.contains("embedded descriptor ignored")), "{:?}", split.warnings());
}

#[test]
fn a_symbolic_link_out_of_the_descriptors_directory_is_refused_unless_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let (inside, outside) = (dir.path().join("vm"), dir.path().join("elsewhere"));
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.raw"), vec![7u8; 4096]).unwrap();
    std::fs::write(inside.join("data.raw"), vec![1u8; 4096]).unwrap();
    std::os::unix::fs::symlink("../elsewhere/secret.raw", inside.join("link.raw")).unwrap();
    std::os::unix::fs::symlink("data.raw", inside.join("alias.raw")).unwrap();
    std::os::unix::fs::symlink("../elsewhere", inside.join("sub")).unwrap();
    let desc = |extent: &str, parent: &str| {
        let link = if parent.is_empty() {
            "parentCID=ffffffff\n".to_owned()
        } else {
            format!("parentCID=00000001\nparentFileNameHint=\"{parent}\"\n")
        };
        format!("version=1\nCID=00000002\n{link}createType=\"monolithicFlat\"\nRW 8 FLAT \"{extent}\" 0\n")
    };
    // Names in a parent reached through a link resolve beside the link, as qemu resolves them.
    std::fs::write(
        outside.join("base.vmdk"),
        "version=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"data.raw\" 0\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("../elsewhere/base.vmdk", inside.join("base.vmdk")).unwrap();
    std::fs::write(inside.join("link.vmdk"), desc("link.raw", "")).unwrap();
    std::fs::write(inside.join("subdir.vmdk"), desc("sub/secret.raw", "")).unwrap();
    std::fs::write(inside.join("parent.vmdk"), desc("data.raw", "base.vmdk")).unwrap();
    std::fs::write(inside.join("alias.vmdk"), desc("alias.raw", "")).unwrap();
    for name in ["link.vmdk", "subdir.vmdk", "parent.vmdk"] {
        match Disk::open(inside.join(name), PathPolicy::SameDirectory) {
            Err(e @ VmdkError::Path { .. }) => {
                let text = e.to_string();
                assert!(text.contains("symbolic link") && text.contains("elsewhere"), "{name}: {text}");
            }
            other => panic!("{name}: expected a refused path, got {other:?}"),
        }
        assert!(Disk::open(inside.join(name), PathPolicy::Anywhere).is_ok(), "{name} under PathPolicy::Anywhere");
    }
    // A link that stays inside the directory is followed.
    let disk = Disk::open(inside.join("alias.vmdk"), PathPolicy::SameDirectory).unwrap();
    let mut buf = [0u8; 4096];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1u8; 4096]);
}
