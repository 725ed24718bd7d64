//! `probe vmdk` end to end: the real binary on qemu-made images, its JSON, `--to-raw`, and a
//! clear error for a file that is not a VMDK.

use std::process::Command;

use testkit::{require_tool, run, same_contents};
use vmdk::testing::random_sparse_image;

fn probe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_probe"))
}

/// Sizes: not a multiple of the 64 KiB grain; a plain one; over 4 GiB (sparse, so cheap).
const SIZES: [u64; 3] = [(7 << 20) + 4096, 64 << 20, (4 << 30) + (3 << 20) + 512];

#[test]
fn to_raw_reproduces_qemu_images_and_json_describes_them() {
    let Some(qemu) = require_tool("qemu-img", "to_raw_reproduces_qemu_images_and_json_describes_them") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in SIZES.into_iter().enumerate() {
        let raw = dir.path().join(format!("src{i}.raw"));
        random_sparse_image(&raw, size, 10, 31 + i as u64).unwrap();
        for (format, options) in [
            ("monolithicSparse", "subformat=monolithicSparse"),
            ("streamOptimized", "subformat=streamOptimized"),
            ("twoGbMaxExtentSparse", "subformat=twoGbMaxExtentSparse"),
            ("monolithicFlat", "subformat=monolithicFlat"),
            ("monolithicSparse", "subformat=monolithicSparse,compat6=on"),
            ("monolithicSparse", "subformat=monolithicSparse,zeroed_grain=on"),
        ] {
            let vmdk = dir.path().join(format!("d{i}-{}.vmdk", options.replace([',', '='], "-")));
            run(Command::new(&qemu).args(["convert", "-O", "vmdk", "-o", options]).arg(&raw).arg(&vmdk));
            let out = dir.path().join("out.raw");
            let json = run(probe().arg("vmdk").arg(&vmdk).arg("--json").arg("--to-raw").arg(&out));
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["format"], format, "{options}");
            assert_eq!(v["capacity"], size);
            assert_eq!(v["chain"].as_array().unwrap().len(), 1);
            assert!(v["allocation"]["data_bytes"].as_u64().unwrap() > 0);
            same_contents(&out, &raw).unwrap().unwrap_or_else(|e| panic!("{options}: {e}"));
            // The output is sparse: far fewer blocks than its size.
            let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap());
            assert!(blocks * 512 < size, "{options}: output not sparse ({blocks} blocks)");
            std::fs::remove_file(&out).unwrap();
        }
        let text = run(probe().arg("vmdk").arg(dir.path().join(format!("d{i}-subformat-streamOptimized.vmdk"))));
        assert!(text.contains("format:     streamOptimized") && text.contains("allocation:"), "{text}");
    }
}

#[test]
fn a_file_that_is_not_a_vmdk_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.vmdk");
    std::fs::write(&junk, "hello\n").unwrap();
    let out = probe().arg("vmdk").arg(&junk).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.vmdk") && err.contains("expected `key=value`"), "{err}");
}

/// Rewrites the embedded descriptor of the hosted sparse file at `path` with `edit`, in place
/// (NUL-padded to the area the header gives it).
fn patch_embedded_descriptor(path: &std::path::Path, edit: impl Fn(&[u8]) -> Vec<u8>) {
    let mut img = std::fs::read(path).unwrap();
    let sector = |at: usize| usize::try_from(u64::from_le_bytes(img[at..at + 8].try_into().unwrap())).unwrap() * 512;
    let (start, len) = (sector(28), sector(36));
    let area = &img[start..start + len];
    let text = &area[..area.iter().position(|&b| b == 0).unwrap_or(len)];
    let new = edit(text);
    assert!(new.len() <= len && new != text, "the edit must fit and change something");
    img[start..start + len].fill(0);
    img[start..start + new.len()].copy_from_slice(&new);
    std::fs::write(path, img).unwrap();
}

fn replace(text: &[u8], from: &str, to: &[u8]) -> Vec<u8> {
    let at = text.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
    [&text[..at], to, &text[at + from.len()..]].concat()
}

#[test]
fn a_delta_with_an_unreadable_descriptor_fails_and_a_windows_1252_one_keeps_its_parent() {
    let test = "a_delta_with_an_unreadable_descriptor_fails_and_a_windows_1252_one_keeps_its_parent";
    let Some(qemu) = require_tool("qemu-img", test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    random_sparse_image(&raw, 8 << 20, 10, 77).unwrap();
    let base = dir.path().join("base.vmdk");
    run(Command::new(&qemu).args(["convert", "-O", "vmdk"]).arg(&raw).arg(&base));
    let delta = dir.path().join("delta.vmdk");
    let fresh_delta = || {
        let _ = std::fs::remove_file(&delta);
        run(Command::new(&qemu).args(["create", "-f", "vmdk", "-F", "vmdk", "-b", "base.vmdk"]).arg(&delta));
    };
    let out = dir.path().join("out.raw");

    // One windows-1252 byte that the descriptor does not declare, or a line that does not parse:
    // an error naming the file, never an all-zero disk.
    type Edit = fn(&[u8]) -> Vec<u8>;
    let broken: [(Edit, &str); 2] = [
        (|t| replace(t, "# Disk DescriptorFile", b"# Disk Descriptor\xe9ile"), "not UTF-8: byte 0xe9"),
        (|t| replace(t, "createType=", b"nonsense\ncreateType="), "descriptor line 5: expected `key=value`"),
    ];
    for (edit, expected) in broken {
        fresh_delta();
        patch_embedded_descriptor(&delta, edit);
        let o = probe().arg("vmdk").arg(&delta).arg("--to-raw").arg(&out).current_dir(dir.path()).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{expected}: {err}");
        assert!(err.contains("delta.vmdk") && err.contains(expected), "{err}");
    }

    // Declared, the same byte is read, and the parent's data comes through.
    fresh_delta();
    patch_embedded_descriptor(&delta, |t| {
        let t = replace(t, "version=1\n", b"version=1\nencoding=\"windows-1252\"\n");
        replace(&t, "# The Disk Data Base", b"# The Disk Data Base (caf\xe9)")
    });
    let json = run(probe().arg("vmdk").arg(&delta).arg("--json").arg("--to-raw").arg(&out));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["chain"].as_array().unwrap().len(), 2, "{json}");
    same_contents(&out, &raw).unwrap().unwrap();
}

#[test]
fn an_extent_linked_out_of_the_descriptors_directory_needs_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, elsewhere) = (dir.path().join("vm"), dir.path().join("elsewhere"));
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("secret.raw"), vec![7u8; 4096]).unwrap();
    std::os::unix::fs::symlink("../elsewhere/secret.raw", vm.join("disk-flat.vmdk")).unwrap();
    let desc = vm.join("disk.vmdk");
    std::fs::write(
        &desc,
        "version=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"disk-flat.vmdk\" 0\n",
    )
    .unwrap();
    let out = dir.path().join("out.raw");
    let o = probe().arg("vmdk").arg(&desc).arg("--to-raw").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("symbolic link") && err.contains("--any-path"), "{err}");
    assert!(!out.exists(), "nothing written");
    run(probe().arg("vmdk").arg(&desc).arg("--to-raw").arg(&out).arg("--any-path"));
    assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 4096]);
}
