//! The shared sink conformance suite over every sink: memory, a new sparse file, an existing
//! file full of old data, O_DIRECT, and NBD exports served by qemu-nbd and nbdkit; then the
//! pipeline end to end from NBD sources with nbdkit's error and delay filters injecting faults.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;

use blockio::{FileSink, FileSinkOptions, NbdSink, NbdSource};
use pipeline::conformance::{MemSink, check_sink};
use pipeline::progress::Progress;
use pipeline::replicate::{SyncJob, sync};
use pipeline::state::{StateStore, SyncKey};
use pipeline::{BlockError, BlockSink, BlockSource, CopyOptions, Engine};
use testkit::require_tool;
use testkit::servers::{Listen, Server, free_port};

const MIB: u64 = 1 << 20;
/// Whole pages (O_DIRECT), not whole granules, so the last block is short.
const SIZE: u64 = 6 * MIB + 12288;

fn g(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap()
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_file_sinks_conform() {
    let mem = Arc::new(MemSink::new(SIZE as usize, MIB));
    let m = mem.clone();
    check_sink(mem, async || m.contents()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    // A file this run creates: sparse, known to read as zeros.
    let new = dir.path().join("new.raw");
    let sink = Arc::new(FileSink::open(&new, SIZE, FileSinkOptions::default()).unwrap());
    assert!(sink.known_zero());
    check_sink(sink, async || read_file(&new)).await.unwrap();

    // An existing file of the wrong size, full of old data: resized, not known to be zero.
    let old = dir.path().join("old.raw");
    std::fs::write(&old, vec![0x5a; (SIZE + 4096) as usize]).unwrap();
    let sink = Arc::new(FileSink::open(&old, SIZE, FileSinkOptions::default()).unwrap());
    assert!(!sink.known_zero());
    assert_eq!(std::fs::metadata(&old).unwrap().len(), SIZE);
    check_sink(sink, async || read_file(&old)).await.unwrap();

    // O_DIRECT with 64 KiB blocks.
    let direct = dir.path().join("direct.raw");
    let sink =
        Arc::new(FileSink::open(&direct, SIZE, FileSinkOptions { granularity: g(65536), direct: true }).unwrap());
    check_sink(sink, async || read_file(&direct)).await.unwrap();

    let bad = FileSink::open(dir.path().join("x.raw"), SIZE, FileSinkOptions { granularity: g(1000), direct: false });
    assert!(bad.unwrap_err().to_string().contains("granularity 1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_sinks_conform_with_qemu_nbd_and_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let mut targets = Vec::new();
    if let Some(q) = require_tool("qemu-nbd", "nbd_sinks_conform_with_qemu_nbd_and_nbdkit") {
        for (i, listen) in [Listen::Unix(dir.path().join("q.sock")), Listen::Tcp(free_port())].into_iter().enumerate() {
            let file = dir.path().join(format!("q{i}.raw"));
            std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
            targets.push((Server::qemu_nbd(&q, &file, listen, &[]), file));
        }
    }
    if let Some(k) = require_tool("nbdkit", "nbd_sinks_conform_with_qemu_nbd_and_nbdkit") {
        for (i, listen) in [Listen::Unix(dir.path().join("k.sock")), Listen::Tcp(free_port())].into_iter().enumerate() {
            let file = dir.path().join(format!("k{i}.raw"));
            std::fs::File::create(&file).unwrap().set_len(SIZE).unwrap();
            let arg = format!("file={}", file.display());
            targets.push((Server::nbdkit(&k, listen, &["file", &arg]), file));
        }
    }
    for (server, file) in &targets {
        let sink = Arc::new(NbdSink::connect(&server.uri(), 2, g(MIB), false).await.unwrap());
        check_sink(sink, async || read_file(file)).await.unwrap_or_else(|e| panic!("{}: {e}", server.uri()));
    }
    if let Some(k) = require_tool("nbdkit", "nbd_sinks_conform_with_qemu_nbd_and_nbdkit") {
        let ro = Server::nbdkit(&k, Listen::Unix(dir.path().join("ro.sock")), &["-r", "memory", "1M"]);
        let err = NbdSink::connect(&ro.uri(), 1, g(MIB), false).await.unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
    }
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
    assert!(matches!(err, BlockError::Exhausted { .. }) && text.contains("errno 5"), "{text}");
    let state = store.load(&key2).unwrap().unwrap();
    assert!(state.committed.is_none() && !state.consistent(), "{state:?}");
}
