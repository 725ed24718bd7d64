//! The client against real NBD servers: qemu-nbd (on a Unix socket and on 127.0.0.1) and
//! nbdkit (memory plugin, and its error filter for failures).
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small")]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use nbd_wire::{Client, NbdError, Target, proto::state};
use testkit::require_tool;
use testkit::servers::{Listen, Server};

const MIB: u64 = 1 << 20;

fn target(server: &Server) -> Target {
    match &server.listen {
        Listen::Unix(p) => Target::Unix(p.clone()),
        Listen::Tcp(port) => Target::Tcp(format!("127.0.0.1:{port}")),
    }
}

/// An image with data runs at these (offset, length) pairs, holes elsewhere.
fn image(path: &PathBuf, size: u64, runs: &[(u64, u64)]) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut all = vec![0u8; size as usize];
    for (i, &(at, len)) in runs.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| ((j * 31 + i as u64 * 7) % 251 + 1) as u8).collect();
        f.write_all_at(&data, at).unwrap();
        all[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_reads_holes_block_status_writes_and_zeroes() {
    let Some(tool) = require_tool("qemu-nbd", "qemu_nbd_reads_holes_block_status_writes_and_zeroes") else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut truth = image(&path, 8 * MIB, &[(0, 4096), (MIB, 2 * MIB), (7 * MIB + 512, 10_000)]);
    for listen in [Listen::Unix(dir.path().join("q.sock")), Listen::Tcp(testkit::servers::free_port())] {
        let server = Server::qemu_nbd(&tool, &path, listen, &[]);
        let client = Client::connect(&target(&server), "").await.unwrap();
        let export = *client.export();
        assert_eq!(export.size, 8 * MIB);
        assert!(export.structured, "qemu-nbd negotiates structured replies");
        assert!(export.allocation_context.is_some(), "and base:allocation");
        assert!(!export.read_only());

        // Eight 1 MiB reads in flight at once, holes included (sent as OFFSET_HOLE).
        let reads = (0..8).map(|i| client.read(i * MIB, MIB as u32));
        let got: Vec<u8> = testkit::join_all(reads).await.into_iter().map(Result::unwrap).collect::<Vec<_>>().concat();
        assert!(got == truth, "reads differ from the file");

        // Block status: data where the runs are, holes elsewhere, covering the whole export.
        let mut at = 0;
        let mut data = Vec::new();
        while at < export.size {
            let extents = client.block_status(at, (export.size - at).min(4 * MIB) as u32).await.unwrap();
            for e in extents {
                if e.flags & state::HOLE == 0 {
                    data.push((e.offset, e.length));
                }
                at = e.offset + e.length;
            }
        }
        // Every non-zero byte is inside a data extent; the never-written 5..7 MiB is a hole.
        // (The second pass sees the first pass's writes below, which is why this is computed.)
        let in_data = |b: u64| data.iter().any(|&(o, l)| o <= b && b < o + l);
        assert!(truth.iter().enumerate().step_by(512).all(|(i, &v)| v == 0 || in_data(i as u64)), "{data:?}");
        assert!(!data.iter().any(|&(o, l)| o < 7 * MIB && o + l > 5 * MIB), "a hole reported as data: {data:?}");

        // Writes, zeroes and flush, then read back.
        let pattern = vec![0xAB; 64 * 1024];
        client.write(4 * MIB, &pattern, true).await.unwrap();
        client.write_zeroes(MIB, 4096).await.unwrap();
        client.flush().await.unwrap();
        truth[4 * MIB as usize..4 * MIB as usize + pattern.len()].copy_from_slice(&pattern);
        truth[MIB as usize..MIB as usize + 4096].fill(0);
        assert!(client.read(0, (8 * MIB) as u32).await.unwrap() == truth);
        assert!(matches!(client.read(8 * MIB, 1).await, Err(NbdError::OutOfRange { .. })));
        client.disconnect().await.unwrap();
    }
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk == truth, "writes did not reach the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_and_injected_errors() {
    let Some(tool) = require_tool("nbdkit", "nbdkit_memory_and_injected_errors") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(&tool, Listen::Unix(dir.path().join("m.sock")), &["memory", "4M"]);
    let client = Client::connect(&target(&server), "").await.unwrap();
    assert_eq!(client.export().size, 4 * MIB);
    client.write(MIB, b"hello, nbd", false).await.unwrap();
    assert_eq!(&client.read(MIB, 10).await.unwrap()[..], b"hello, nbd");
    assert!(client.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));

    // Every read fails with EIO: a server error, retryable, on an intact connection.
    let failing = Server::nbdkit(
        &tool,
        Listen::Unix(dir.path().join("e.sock")),
        &["--filter=error", "memory", "1M", "error-pread-rate=1", "error=EIO"],
    );
    let client = Client::connect(&target(&failing), "").await.unwrap();
    match client.read(0, 512).await {
        Err(e @ NbdError::Server { errno: 5, .. }) => assert!(e.is_retryable(), "{e}"),
        other => panic!("expected EIO, got {other:?}"),
    }
    client.write(0, &[1; 512], false).await.unwrap();

    // The server going away fails what is waiting and everything after, clearly.
    drop(failing);
    let e = client.write(0, &[1; 512], false).await.unwrap_err();
    assert!(matches!(e, NbdError::Closed(_) | NbdError::Io(_)), "{e}");
}
