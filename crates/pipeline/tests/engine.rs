//! The copy engine against in-memory sources and sinks: contents, digests, retries, rate
//! limits and the release CPU time. The replication flow's tests are the replica's.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cbt::ExtentSet;
use pipeline::conformance::{MemSink, MemSource, pattern};
use pipeline::{BlockSink, BlockSource, CopyOptions, Digests, DiskCopy, Engine, copy_disk};

const MIB: u64 = 1 << 20;

fn digests_of(data: &[u8], g: u64) -> Vec<[u8; 32]> {
    data.chunks(usize::try_from(g).unwrap()).map(|c| *blake3::hash(c).as_bytes()).collect()
}

fn disk_copy(src: Arc<dyn BlockSource>, sink: Arc<dyn BlockSink>) -> DiskCopy {
    let size = src.size();
    let g = sink.granularity().get();
    DiskCopy {
        read: ExtentSet::full(size),
        zero: ExtentSet::new(),
        digests: Digests::zeros(g, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source: src,
        sink,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_is_exact_and_its_digests_describe_the_sink() {
    // An odd size: the last block is short.
    let data = pattern((24 * MIB + 12288) as usize, 1);
    let src = Arc::new(MemSource::new(data.clone()));
    let sink = Arc::new(MemSink::new(data.len(), MIB));
    let opts = CopyOptions { request_size: 3 * MIB, in_flight: 4, ..CopyOptions::default() };
    let r = copy_disk(disk_copy(src, sink.clone()), &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), data);
    assert_eq!(r.digests.as_ref().unwrap().blocks, digests_of(&data, MIB));
    assert_eq!(r.read, data.len() as u64);
    // Every fourth 64 KiB block is zero, but whole 1 MiB blocks never are: nothing skipped.
    assert_eq!((r.written, r.zero), (data.len() as u64, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_blocks_are_skipped_on_a_fresh_sink_and_zeroed_on_a_used_one() {
    let mut data = pattern((8 * MIB) as usize, 2);
    data[(2 * MIB) as usize..(5 * MIB) as usize].fill(0);
    for known_zero in [true, false] {
        let src = Arc::new(MemSource::new(data.clone()));
        let mut sink = MemSink::new(data.len(), MIB);
        *sink.known_zero.get_mut() = known_zero;
        // A used sink holds old data where the source has zeros.
        sink.data.get_mut().unwrap().fill(0xee);
        let sink = Arc::new(sink);
        let r =
            copy_disk(disk_copy(src, sink.clone()), &Engine::new(64 * MIB), &CopyOptions::default(), Arc::default())
                .await
                .unwrap();
        assert_eq!((r.written, r.zero), (5 * MIB, 3 * MIB));
        let out = sink.contents();
        if known_zero {
            // Trusting the claim, nothing was written over the zeros.
            assert!(out[(2 * MIB) as usize..(5 * MIB) as usize].iter().all(|&b| b == 0xee));
        } else {
            assert_eq!(out, data);
        }
        assert_eq!(r.digests.as_ref().unwrap().blocks, digests_of(&data, MIB));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_and_persistent_ones_fail_clearly() {
    let data = pattern((8 * MIB) as usize, 3);
    let src = Arc::new(MemSource::new(data.clone()));
    src.fail_reads.store(3, Ordering::SeqCst);
    let sink = Arc::new(MemSink::new(data.len(), MIB));
    sink.fail_writes.store(2, Ordering::SeqCst);
    let opts = CopyOptions { backoff: std::time::Duration::from_millis(1), ..CopyOptions::default() };
    let r = copy_disk(disk_copy(src, sink.clone()), &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(r.retries, 5);
    assert_eq!(sink.contents(), data);

    let src = Arc::new(MemSource::new(data.clone()));
    src.fail_reads.store(100, Ordering::SeqCst);
    let opts = CopyOptions { retries: 2, ..opts };
    let err = copy_disk(
        disk_copy(src, Arc::new(MemSink::new(data.len(), MIB))),
        &Engine::new(64 * MIB),
        &opts,
        Arc::default(),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("gave up after 3 attempts") && text.contains("reading memory source"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn the_global_rate_limit_holds_across_disks_and_the_job_limit_within_a_job() {
    // Two disks of 8 MiB under a 16 MiB/s process limit, in the runtime's paused clock. A
    // request waits for its own bytes before it starts, so the last one starts after 15 MiB
    // have been paid for, less the 100 ms burst: between 0.84 s and a second.
    let mut engine = Engine::new(64 * MIB);
    engine.global_rate = Some(Arc::new(pipeline::limit::RateLimiter::new(16 * MIB)));
    let jobs = (0..2)
        .map(|i| {
            let data = pattern((8 * MIB) as usize, 40 + i);
            disk_copy(Arc::new(MemSource::new(data)), Arc::new(MemSink::new((8 * MIB) as usize, MIB)))
        })
        .collect();
    let t0 = tokio::time::Instant::now();
    let opts = CopyOptions { request_size: MIB, ..CopyOptions::default() };
    for r in pipeline::copy_disks(jobs, &engine, &opts, 2, Arc::default()).await {
        r.unwrap();
    }
    let elapsed = t0.elapsed();
    let ms = elapsed.as_millis();
    assert!((840..=1000).contains(&ms), "16 MiB at 16 MiB/s took {elapsed:?}");

    // A job limit of 4 MiB/s on one 4 MiB disk, no global limit: 3 MiB paid for before the last
    // request starts, less the burst.
    let engine = Engine::new(64 * MIB);
    let data = pattern((4 * MIB) as usize, 50);
    let opts = CopyOptions {
        request_size: MIB,
        job_rate: Some(Arc::new(pipeline::limit::RateLimiter::new(4 * MIB))),
        ..CopyOptions::default()
    };
    let t0 = tokio::time::Instant::now();
    copy_disk(
        disk_copy(Arc::new(MemSource::new(data)), Arc::new(MemSink::new((4 * MIB) as usize, MIB))),
        &engine,
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    let elapsed = t0.elapsed();
    let ms = elapsed.as_millis();
    assert!((650..=1000).contains(&ms), "4 MiB at 4 MiB/s took {elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn release_cpu_time_sleeps_after_each_request_in_each_stream() {
    // 8 requests of 1 MiB over 2 streams, 50 ms after each: 4 pauses per stream, 200 ms.
    let data = pattern((8 * MIB) as usize, 60);
    let opts = CopyOptions {
        request_size: MIB,
        in_flight: 2,
        release_cpu_time: pipeline::limit::ReleaseCpuTime(50),
        ..CopyOptions::default()
    };
    let t0 = tokio::time::Instant::now();
    let sink = Arc::new(MemSink::new(data.len(), MIB));
    copy_disk(
        disk_copy(Arc::new(MemSource::new(data.clone())), sink.clone()),
        &Engine::new(64 * MIB),
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    let ms = t0.elapsed().as_millis();
    assert!((200..=260).contains(&ms), "took {ms} ms");
    assert_eq!(sink.contents(), data);
}
