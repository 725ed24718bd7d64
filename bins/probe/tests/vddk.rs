//! `probe vddk` end to end against the fake VixDiskLib: the report, the re-exec that puts
//! VDDK's folder on LD_LIBRARY_PATH (and then restores the caller's value), and a read.

use std::process::Command;

use testkit::run;
use vddk_fake::{Fake, libdir};

fn probe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_probe"))
}

#[test]
fn reports_the_fake_and_reexecutes_once_for_ld_library_path() {
    let dir = libdir(Fake::Distrib);
    let out = run(probe().env_remove("LD_LIBRARY_PATH").args(["vddk", "--json", "--libdir"]).arg(&dir));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["version"], 8);
    assert!(v["library"].as_str().unwrap().ends_with("lib64/libvixDiskLib.so.8"));
    assert_eq!(v["optional_functions"]["QueryAllocatedBlocks"], true);
    assert!(v["transports"].as_str().unwrap().contains("nbdssl"));
    assert_eq!(v["reexecuted"], true, "LD_LIBRARY_PATH lacked lib64, so probe must re-execute");
    assert_eq!(v["ld_library_path"], serde_json::Value::Null, "the caller's (unset) value is restored");

    // Already set: no re-exec, and the value is left alone.
    let lib64 = dir.join("lib64");
    let out = run(probe().env("LD_LIBRARY_PATH", &lib64).args(["vddk", "--json", "--libdir"]).arg(&dir));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reexecuted"], false);
    assert_eq!(v["ld_library_path"].as_str(), lib64.to_str());
}

#[test]
fn reads_a_local_disk_through_the_fake_and_says_what_vddk_6_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.raw");
    std::fs::write(&disk, vec![7u8; 4 << 20]).unwrap();
    let out = run(probe().args(["vddk", "--json", "--libdir"]).arg(libdir(Fake::V8)).arg("--read").arg(&disk));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["read"]["bytes"], 4 << 20);
    let text = run(probe().args(["vddk", "--libdir"]).arg(libdir(Fake::V6)));
    assert!(text.contains("VDDK 6") && text.contains("QueryAllocatedBlocks: no"), "{text}");
    let missing = probe().args(["vddk", "--libdir", "/nonexistent"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/lib64/libvixDiskLib.so.9"));
}
