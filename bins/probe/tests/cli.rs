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
