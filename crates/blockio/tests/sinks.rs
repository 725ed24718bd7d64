//! The shared sink conformance suite over every sink: memory, a new sparse file, an existing
//! file full of old data, O_DIRECT, and NBD exports served by qemu-nbd and nbdkit.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;

use blockio::{FileSink, FileSinkOptions, NbdSink};
use pipeline::BlockSink;
use pipeline::conformance::{MemSink, check_sink};
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
