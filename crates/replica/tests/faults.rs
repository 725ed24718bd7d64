//! Replication end to end from NBD sources with nbdkit's error and delay filters injecting
//! faults: retried to the end, or given up without committing.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;

use blockio::{FileSink, FileSinkOptions, NbdSource};
use pipeline::progress::Progress;
use pipeline::{BlockSink, BlockSource, CopyOptions, Engine};
use replica::replicate::{SyncJob, sync};
use replica::state::{StateStore, SyncKey};
use testkit::require_tool;
use testkit::servers::{Listen, Server};

const MIB: u64 = 1 << 20;

fn g(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn key() -> SyncKey {
    SyncKey { vcenter: "local".into(), vm: String::new(), disk: "nbd".into(), destination: "replica".into() }
}

fn disk(size: u64) -> cbt::CurrentDisk {
    cbt::CurrentDisk {
        change_id: None,
        capacity: size,
        hardware_version: 14,
        host_version: None,
        position: cbt::DiskPosition { controller: "scsi".into(), bus: 0, unit: 0 },
        backing: "[ds] a.vmdk".into(),
        allocated: None,
        reverted: false,
        fresh_snapshot: false,
        forced: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_source_faults_are_retried_or_fail_without_committing() {
    let Some(k) = require_tool("nbdkit", "injected_source_faults_are_retried_or_fail_without_committing") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let data = pipeline::conformance::pattern(size as usize, 8);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let file = format!("file={}", raw.display());
    let store = StateStore::open(dir.path().join("state")).unwrap();
    let opts = CopyOptions {
        request_size: 256 << 10,
        backoff: std::time::Duration::from_millis(2),
        retries: 8,
        ..CopyOptions::default()
    };

    // One read in five fails with EIO, and every read is 2 ms late: retried to the end.
    let flaky = Server::nbdkit(
        &k,
        Listen::Unix(dir.path().join("flaky.sock")),
        &["--filter=error", "--filter=delay", "-r", "file", &file, "error-pread-rate=0.2", "error=EIO", "rdelay=2ms"],
    );
    let out = dir.path().join("out.raw");
    let job = |src: Arc<dyn BlockSource>, sink: Arc<dyn BlockSink>, id: &str| SyncJob {
        source: src,
        sink,
        store: store.clone(),
        key: key(),
        job: id.into(),
        current: disk(size),
        changes: cbt::Changes::NotQueried,
    };
    // 64 requests of 256 KiB, each one read on the wire: some fail for certain (all pass with
    // odds of 0.8^64), and none fails nine times running (0.2^9 each). Larger requests split
    // into several wire reads would fail far more often, and could exhaust their retries.
    let src: Arc<dyn BlockSource> = Arc::new(NbdSource::connect(&flaky.uri(), 1, None).await.unwrap());
    let small = FileSinkOptions { granularity: g(256 << 10), direct: false };
    let sink: Arc<dyn BlockSink> = Arc::new(FileSink::open(&out, size, small).unwrap());
    let ok = sync(job(src, sink, "j1"), &Engine::new(64 * MIB), &opts, Arc::new(Progress::default())).await.unwrap();
    assert!(ok.report.retries > 0, "the error filter failed nothing?");
    assert_eq!(read_file(&out), data);
    assert!(ok.state.consistent());

    // Every read fails: the sync gives up with the server's error, and commits nothing new.
    let broken = Server::nbdkit(
        &k,
        Listen::Unix(dir.path().join("broken.sock")),
        &["--filter=error", "-r", "file", &file, "error-pread-rate=1", "error=EIO"],
    );
    let src: Arc<dyn BlockSource> = Arc::new(NbdSource::connect(&broken.uri(), 1, None).await.unwrap());
    let out2 = dir.path().join("out2.raw");
    let sink: Arc<dyn BlockSink> = Arc::new(FileSink::open(&out2, size, FileSinkOptions::default()).unwrap());
    let key2 = SyncKey { destination: "replica-2".into(), ..key() };
    let mut j = job(src, sink, "j2");
    j.key = key2.clone();
    let err = sync(j, &Engine::new(64 * MIB), &CopyOptions { retries: 2, ..opts }, Arc::new(Progress::default()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(err.attempts().is_some() && text.contains("errno 5"), "{text}");
    let state = store.load(&key2).unwrap().unwrap();
    assert!(state.committed.is_none() && !state.consistent(), "{state:?}");
}
