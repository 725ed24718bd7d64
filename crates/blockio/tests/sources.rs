//! The shared source conformance suite over every source this crate has: memory, a sparse raw
//! file, VMDKs made by qemu-img (monolithicSparse and streamOptimized), and NBD exports served
//! by qemu-nbd and nbdkit on a Unix socket and on 127.0.0.1.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use blockio::{FileSource, NbdSource, VmdkSource};
use pipeline::BlockSource;
use pipeline::conformance::{MemSource, check_source, pattern};
use testkit::require_tool;
use testkit::servers::{Listen, Server, free_port};

/// 6 MiB and an odd tail, so the last read is short.
const SIZE: usize = (6 << 20) + 12345;

/// Writes `data` sparsely: all-zero 64 KiB blocks stay holes.
fn sparse_file(path: &Path, data: &[u8]) {
    let f = File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (i, c) in data.chunks(64 << 10).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * (64 << 10)) as u64).unwrap();
        }
    }
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_file_sources_conform() {
    let data = pattern(SIZE, 5);
    check_source(&MemSource::new(data.clone()), &data).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    sparse_file(&path, &data);
    let src = FileSource::open(&path).unwrap();
    check_source(&src, &data).await.unwrap();
    // SEEK_DATA found the holes: a quarter of the 64 KiB blocks are zero and not data.
    let alloc = src.allocation().await.unwrap().unwrap();
    assert!(alloc.data.total_bytes() < (SIZE as u64) * 4 / 5, "holes were not mapped: {}", alloc.data.total_bytes());
    assert!(FileSource::open(dir.path().join("missing")).unwrap_err().to_string().contains("missing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmdk_sources_made_by_qemu_img_conform() {
    let Some(qemu_img) = require_tool("qemu-img", "vmdk_sources_made_by_qemu_img_conform") else { return };
    // qemu-img rounds a VMDK up to whole sectors; keep the size a sector multiple.
    let data = pattern(6 << 20, 6);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    sparse_file(&raw, &data);
    for subformat in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
        let vmdk = dir.path().join(format!("{subformat}.vmdk"));
        testkit::run(
            std::process::Command::new(&qemu_img)
                .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
                .arg(format!("subformat={subformat}"))
                .arg(&raw)
                .arg(&vmdk),
        );
        let src = VmdkSource::open(&vmdk, vmdk::PathPolicy::SameDirectory).unwrap();
        check_source(&src, &data).await.unwrap_or_else(|e| panic!("{subformat}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_sources_conform_with_qemu_nbd_and_nbdkit() {
    // qemu-nbd serves whole 512-byte sectors: a size that is one, but not a whole page.
    let data = pattern((6 << 20) + 12800, 7);
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    sparse_file(&raw, &data);
    let mut servers = Vec::new();
    if let Some(q) = require_tool("qemu-nbd", "nbd_sources_conform_with_qemu_nbd_and_nbdkit") {
        servers.push(Server::qemu_nbd(&q, &raw, Listen::Unix(dir.path().join("q.sock")), &["-r"]));
        servers.push(Server::qemu_nbd(&q, &raw, Listen::Tcp(free_port()), &["-r"]));
    }
    if let Some(k) = require_tool("nbdkit", "nbd_sources_conform_with_qemu_nbd_and_nbdkit") {
        let file = format!("file={}", raw.display());
        servers.push(Server::nbdkit(&k, Listen::Unix(dir.path().join("k.sock")), &["-r", "file", &file]));
        servers.push(Server::nbdkit(&k, Listen::Tcp(free_port()), &["-r", "file", &file]));
    }
    for server in &servers {
        let src = NbdSource::connect(&server.uri(), 2, None).await.unwrap();
        check_source(&src, &data).await.unwrap_or_else(|e| panic!("{}: {e}", server.uri()));
        assert!(src.allocation().await.unwrap().is_some(), "{}: base:allocation", server.uri());
    }
    let refused =
        NbdSource::connect(&format!("nbd+unix:///?socket={}", dir.path().join("none.sock").display()), 1, None).await;
    assert!(refused.unwrap_err().to_string().contains("connecting to nbd+unix"));
}
