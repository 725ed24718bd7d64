//! `proxy demo` as the README runs it: the embedded simulator, full and incremental backups,
//! every restore compared byte for byte, and a summary.

use std::process::Command;

#[test]
fn the_demo_restores_every_disk_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["demo", "--vms", "2", "--disk-mib", "8", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("restored byte for byte") && text.contains("no snapshot left behind"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("incremental")), "{text}");
    // The repository it made is there and verifies.
    let repo = dir.path().join("repo");
    let v = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["repo", "verify"]).arg(&repo).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let list = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["repo", "list"]).arg(&repo).output().unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert_eq!(listed.lines().count(), 4, "a full and an incremental of each VM: {listed}");
    assert!(listed.contains("application") && listed.contains(".vmx"), "{listed}");
}
