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
        fetch: None,
        keep: cbt::ExtentSet::new(),
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
    // Every fourth 64 KiB block is zero: sent as zeros (here skipped, the sink being fresh),
    // the rest as data.
    let zero_units = data.chunks(64 << 10).filter(|c| c.iter().all(|&b| b == 0)).count() as u64;
    assert_eq!((r.written, r.zero), (data.len() as u64 - zero_units * (64 << 10), zero_units * (64 << 10)));
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
        // The 3 MiB run, and pattern's zero 64 KiB blocks in the rest.
        let zero = data.chunks(64 << 10).filter(|c| c.iter().all(|&b| b == 0)).count() as u64 * (64 << 10);
        assert_eq!((r.written, r.zero), (8 * MIB - zero, zero));
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

/// `len` pseudo-random bytes with no zero runs (unlike [`pattern`]'s).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// A disk of `size` bytes with data only in `extents` (4 KiB-aligned, not 1 MiB-aligned),
/// one of them all zeros though allocated.
fn fragmented(size: usize) -> (Vec<u8>, ExtentSet) {
    let extents = [
        (12_288u64, 20_480u64),
        (MIB + 4096, 3 * MIB),
        (5 * MIB - 8192, 16_384),
        (6 * MIB, 65_536),
        (7 * MIB + 36_864, 4096),
    ];
    let noise = noise(size, 7);
    let mut data = vec![0u8; size];
    for &(a, l) in &extents {
        let (a, l) = (a as usize, l as usize);
        data[a..a + l].copy_from_slice(&noise[a..a + l]);
    }
    // Allocated, but zeros: a hole at the destination.
    data[(6 * MIB) as usize..(6 * MIB + 65_536) as usize].fill(0);
    (data, ExtentSet::from_ranges(extents))
}

fn total(v: &std::sync::Mutex<Vec<(u64, u64)>>) -> u64 {
    v.lock().unwrap().iter().map(|(_, l)| l).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_copy_reads_only_the_sources_extents_and_writes_no_zeros() {
    let size = 8 * MIB as usize;
    let (data, extents) = fragmented(size);
    let src = Arc::new(MemSource::new(data.clone()));
    let sink = Arc::new(MemSink::new(size, MIB));
    let mut job = disk_copy(src.clone(), sink.clone());
    job.read = extents.align_outward(std::num::NonZeroU64::new(MIB).unwrap(), size as u64);
    job.fetch = Some(extents.clone());
    let opts = CopyOptions { request_size: 2 * MIB, ..CopyOptions::default() };
    let r = copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), data);
    // Exactly the extents were read: not a byte of the 1 MiB blocks around them.
    assert_eq!(r.read, extents.total_bytes());
    assert_eq!(total(&src.reads), extents.total_bytes());
    // The fresh sink was sent the data only: the allocated zeros were skipped, the holes too.
    let written = total(&sink.writes);
    assert_eq!(written, extents.total_bytes() - 65_536);
    assert_eq!(r.written, written);
    assert!(sink.zeroings.lock().unwrap().is_empty());
    // The digests still describe whole blocks of the result.
    assert_eq!(r.digests.unwrap().blocks, digests_of(&data, MIB));

    // A used sink gets the holes inside touched blocks zeroed, and nothing written twice.
    let mut used = MemSink::new(size, MIB);
    *used.known_zero.get_mut() = false;
    used.data.get_mut().unwrap().fill(0xee);
    let used = Arc::new(used);
    let mut job = disk_copy(src.clone(), used.clone());
    job.read = extents.align_outward(std::num::NonZeroU64::new(MIB).unwrap(), size as u64);
    job.zero = job.read.complement(size as u64);
    job.fetch = Some(extents.clone());
    copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(used.contents(), data);
    assert_eq!(total(&used.writes) + total(&used.zeroings), size as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_every_length_reuse_the_same_few_buffers() {
    // Extents of many lengths, so the requests over them are of many lengths too.
    let size = 64 * MIB as usize;
    let noise = noise(size, 3);
    let mut data = vec![0u8; size];
    let mut extents = Vec::new();
    let (mut at, mut k) = (4096u64, 0u64);
    while at < size as u64 - 2 * MIB {
        let len = 4096 * (1 + (k * 37) % 100);
        data[at as usize..(at + len) as usize].copy_from_slice(&noise[at as usize..(at + len) as usize]);
        extents.push((at, len));
        at += len + 4096 * (1 + (k * 53) % 700);
        k += 1;
    }
    let extents = ExtentSet::from_ranges(extents);
    let src = Arc::new(MemSource::new(data.clone()));
    let sink = Arc::new(MemSink::new(size, MIB));
    let mut job = disk_copy(src, sink.clone());
    job.read = extents.align_outward(std::num::NonZeroU64::new(MIB).unwrap(), size as u64);
    job.fetch = Some(extents);
    let opts = CopyOptions { request_size: 4 * MIB, in_flight: 4, ..CopyOptions::default() };
    let engine = Engine::new(256 * MIB);
    copy_disk(job, &engine, &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), data);
    // One buffer per request in flight, each used again and again: none is allocated for a
    // length not seen before, nor lost to a slice a sink kept.
    assert!(engine.pool.allocated() <= 4, "{} buffers allocated for 4 requests in flight", engine.pool.allocated());
}

/// An incremental: `old` at the sink, `new` at the source, differing only in `changed`.
fn incremental(
    sink_whole: bool,
    readable: bool,
    digests: bool,
) -> (Vec<u8>, Arc<MemSource>, Arc<MemSink>, DiskCopy, CopyOptions) {
    let size = 8 * MIB as usize;
    let old = pattern(size, 11);
    let mut new = old.clone();
    let changed = ExtentSet::from_ranges([(MIB + 4096, 65_536), (3 * MIB - 512, 1024), (6 * MIB, 8192)]);
    let noise = noise(size, 12);
    for e in changed.iter() {
        let (a, b) = (e.start() as usize, e.end() as usize);
        new[a..b].copy_from_slice(&noise[a..b]);
    }
    // One changed area became zeros (trimmed): it is read as zeros, a hole on exact sinks.
    new[(6 * MIB) as usize..(6 * MIB + 8192) as usize].fill(0);
    let src = Arc::new(MemSource::new(new.clone()));
    let mut sink = MemSink::new(size, MIB);
    *sink.known_zero.get_mut() = false;
    *sink.data.get_mut().unwrap() = old;
    *sink.whole_blocks.get_mut() = sink_whole;
    *sink.readable.get_mut() = readable;
    let sink = Arc::new(sink);
    let mut job = disk_copy(src.clone(), sink.clone());
    let read = changed.align_outward(std::num::NonZeroU64::new(MIB).unwrap(), size as u64);
    job.keep = read.difference(&changed);
    job.fetch = Some(changed.difference(&ExtentSet::from_ranges([(6 * MIB, 8192)])));
    job.read = read;
    let opts = CopyOptions { digests, ..CopyOptions::default() };
    (new, src, sink, job, opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_reads_only_the_changed_bytes_and_completes_blocks_from_the_sink() {
    let changed_data = 65_536 + 1024;
    // A sink of exact ranges keeping digests: the changes are written, the rest read back.
    let (new, src, sink, job, opts) = incremental(false, true, true);
    let r = copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), new);
    assert_eq!((r.read, total(&src.reads)), (changed_data, changed_data));
    assert_eq!(total(&sink.writes), changed_data);
    // The touched blocks are 1, 2, 3 (one area crosses into it) and 6, read back whole.
    assert_eq!(r.read_back, 4 * MIB);
    // Digests of the blocks touched (the job started from none for the others).
    let (got, want) = (r.digests.unwrap().blocks, digests_of(&new, MIB));
    for b in [1, 2, 3, 6] {
        assert_eq!(got[b], want[b], "block {b}");
    }

    // Whole blocks (a repository): each touched block is written whole, from the sink's bytes.
    let (new, src, sink, job, opts) = incremental(true, true, false);
    copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), new);
    assert_eq!(total(&src.reads), changed_data);
    assert_eq!(total(&sink.writes) + total(&sink.zeroings), 4 * MIB);

    // A sink that cannot be read back: the source gives the unchanged bytes of those blocks.
    let (new, src, sink, job, opts) = incremental(true, false, false);
    copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), new);
    assert_eq!(total(&src.reads), 4 * MIB - 8192);

    // No digests and exact ranges: nothing is read back at all.
    let (new, src, sink, job, opts) = incremental(false, false, false);
    let r = copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    assert_eq!(sink.contents(), new);
    assert_eq!((total(&src.reads), r.read_back), (changed_data, 0));
    assert_eq!(r.kept, 4 * MIB - changed_data - 8192);
}
