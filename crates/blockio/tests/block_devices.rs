//! Block devices through the same conformance suites: a loop device as a source and as a
//! replica sink. Needs `losetup` and the right to attach loop devices (root); elsewhere the
//! test is skipped loudly, and under `CI=true` it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blockio::{FileSink, FileSinkOptions, FileSource};
use pipeline::conformance::{check_sink, check_source, pattern};
use pipeline::{BlockSink, BlockSource};
use testkit::require_tool;

/// A loop device over a file, detached when dropped.
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(losetup: &Path, file: &Path, test: &str) -> Option<Loop> {
    let out = Command::new(losetup).args(["-f", "--show"]).arg(file).output().unwrap();
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: cannot attach a loop device under CI=true: {why}"
        );
        eprintln!("SKIPPED {test}: cannot attach a loop device ({why})");
        if let Some(log) = std::env::var_os("SYNCPROXY_SKIP_LOG") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "{test}: no loop device ({why})");
            }
        }
        return None;
    }
    Some(Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_device_conforms_as_source_and_as_sink() {
    const TEST: &str = "a_loop_device_conforms_as_source_and_as_sink";
    let Some(losetup) = require_tool("losetup", TEST) else { return };
    let dir = tempfile::tempdir().unwrap();
    // Loop devices are whole 512-byte sectors; keep it a whole number of pages too (O_DIRECT).
    let size = (6 << 20) + 12288;
    let data = pattern(size, 31);
    let backing = dir.path().join("backing.raw");
    std::fs::write(&backing, &data).unwrap();
    let Some(dev) = attach(&losetup, &backing, TEST) else { return };

    let src = FileSource::open(&dev.0).unwrap();
    assert_eq!(src.size(), size as u64, "a device's size is where its end is");
    // A device has no SEEK_DATA: no map, so everything counts as data.
    assert!(src.allocation().await.unwrap().is_none());
    check_source(&src, &data).await.unwrap();
    drop(src);

    let sink = Arc::new(FileSink::open(&dev.0, size as u64, FileSinkOptions::default()).unwrap());
    assert!(!sink.known_zero(), "a device holds whatever it held");
    let path = dev.0.clone();
    check_sink(sink, async || std::fs::read(&path).unwrap()).await.unwrap();
    // A device smaller than the disk is refused, naming both sizes.
    let err = FileSink::open(&dev.0, size as u64 + 4096, FileSinkOptions::default()).unwrap_err().to_string();
    assert!(err.contains(&size.to_string()), "{err}");
}
