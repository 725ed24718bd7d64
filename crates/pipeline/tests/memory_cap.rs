//! The memory cap with 100 disks copied at once, alone in its process so the process's peak
//! memory (VmHWM) is this test's.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::sync::Arc;

use bytes::BytesMut;
use cbt::ExtentSet;
use pipeline::Digests;
use pipeline::progress::Progress;
use pipeline::{BlockSink, BlockSource, CopyOptions, DiskCopy, Engine, IoFuture, SourceAllocation, copy_disks};

const MIB: u64 = 1 << 20;

/// A source that makes its bytes up (a function of the offset), so 100 disks need no memory.
struct Generated(u64);

impl BlockSource for Generated {
    fn size(&self) -> u64 {
        self.0
    }
    fn describe(&self) -> String {
        "generated".into()
    }
    fn identity(&self) -> String {
        "generated".into()
    }
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async { Ok(None) })
    }
    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            // Cheap in a debug build: a byte per 4 KiB page, stamped with its offset.
            for (i, c) in buf.chunks_mut(4096).enumerate() {
                let at = offset + i as u64 * 4096;
                c.fill((at >> 12) as u8 | 1);
                c[..8].copy_from_slice(&at.to_le_bytes());
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            Ok(buf)
        })
    }
}

/// A sink that keeps nothing.
struct Discard(u64);

impl BlockSink for Discard {
    fn size(&self) -> u64 {
        self.0
    }
    fn describe(&self) -> String {
        "discard".into()
    }
    fn granularity(&self) -> std::num::NonZeroU64 {
        std::num::NonZeroU64::new(MIB).unwrap()
    }
    fn write_at(&self, _: u64, _: bytes::Bytes) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_disks_at_once_stay_under_the_memory_cap() {
    // The default cap, and requests that would need 100 × 8 × 4 MiB = 3.2 GiB without it.
    let scale: u64 = std::env::var("SYNCPROXY_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let cap = 256 * MIB;
    let engine = Engine::new(cap);
    let size = 24 * MIB * scale;
    let jobs = (0..100)
        .map(|_| DiskCopy {
            source: Arc::new(Generated(size)),
            sink: Arc::new(Discard(size)),
            read: ExtentSet::full(size),
            zero: ExtentSet::new(),
            fetch: None,
            keep: cbt::ExtentSet::new(),
            digests: Digests::zeros(MIB, size),
            done: ExtentSet::new(),
            checkpoint: None,
        })
        .collect();
    let before = vm_hwm_kib();
    let progress = Arc::new(Progress::default());
    let results = copy_disks(jobs, &engine, &CopyOptions::default(), 100, progress.clone()).await;
    for r in &results {
        assert_eq!(r.as_ref().unwrap().read, size);
    }
    assert_eq!(progress.snapshot().read, 100 * size);
    let hwm = vm_hwm_kib();
    eprintln!(
        "100 disks of {} MiB: buffer peak {} MiB of a {} MiB cap; process VmHWM {} MiB (was {} MiB before)",
        size >> 20,
        engine.pool.peak() >> 20,
        cap >> 20,
        hwm >> 10,
        before >> 10
    );
    assert!(engine.pool.peak() <= cap);
    // The process as a whole: the cap, plus what the allocator keeps and the test's own.
    assert!((hwm - before) * 1024 < cap + 32 * MIB, "VmHWM grew from {before} kB to {hwm} kB");
}
