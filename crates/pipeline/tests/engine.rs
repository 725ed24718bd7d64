//! The copy engine and the replication flow against in-memory sources and sinks: contents,
//! digests, retries, the memory cap with 100 disks, cancel and resume, full then incremental,
//! and a replica left dirty by a failed sync.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cbt::{ChangeId, ChangedAreas, Changes, CurrentDisk, DiskPosition, ExtentSet};
use pipeline::conformance::{MemSink, MemSource, pattern};
use pipeline::limit::RateLimiter;
use pipeline::progress::Progress;
use pipeline::replicate::{ResumeCheck, SyncJob, sync};
use pipeline::state::{Digests, StateStore, SyncKey};
use pipeline::{BlockError, BlockSink, BlockSource, CopyOptions, DiskCopy, Engine, copy_disk};

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

fn current(size: u64, change_id: &str) -> CurrentDisk {
    CurrentDisk {
        change_id: Some(ChangeId::parse(change_id)),
        capacity: size,
        hardware_version: 14,
        host_version: None,
        position: DiskPosition { controller: "scsi".into(), bus: 0, unit: 0 },
        backing: "[ds1] vm/vm.vmdk".into(),
        allocated: None,
        reverted: false,
        fresh_snapshot: false,
        forced: None,
    }
}

const EPOCH: &str = "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b";

fn job(src: Arc<MemSource>, sink: Arc<MemSink>, store: &StateStore, id: &str, seq: u32, changes: Changes) -> SyncJob {
    let size = src.size();
    SyncJob {
        source: src,
        sink,
        store: store.clone(),
        key: SyncKey { vcenter: "vc-1".into(), vm: "vm-1".into(), disk: "2000".into(), destination: "mem".into() },
        job: id.into(),
        current: current(size, &format!("{EPOCH}/{seq}")),
        changes,
    }
}

fn changed(ranges: &[(u64, u64)]) -> Changes {
    Changes::Areas(ChangedAreas { areas: ExtentSet::from_ranges(ranges.iter().copied()), warnings: Vec::new() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_is_full_then_incremental_and_a_failed_sync_leaves_it_dirty_until_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let size = 16 * MIB;
    let v1 = pattern(size as usize, 10);
    let sink = Arc::new(MemSink::new(size as usize, MIB));
    let engine = Engine::new(64 * MIB);
    let opts = CopyOptions { retries: 0, ..CopyOptions::default() };

    let full = sync(
        job(Arc::new(MemSource::new(v1.clone())), sink.clone(), &store, "j1", 5, Changes::NotQueried),
        &engine,
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    assert!(full.full_reason.is_some());
    assert_eq!(sink.contents(), v1);
    assert!(full.state.consistent());

    // Snapshot 2: 1 MiB changed at 3 MiB and 64 KiB at 9 MiB.
    let mut v2 = v1.clone();
    v2[(3 * MIB) as usize..(4 * MIB) as usize].fill(0x42);
    v2[(9 * MIB) as usize..(9 * MIB + 65536) as usize].fill(0x43);
    let inc = sync(
        job(
            Arc::new(MemSource::new(v2.clone())),
            sink.clone(),
            &store,
            "j2",
            9,
            changed(&[(3 * MIB, MIB), (9 * MIB, 65536)]),
        ),
        &engine,
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    assert_eq!(inc.full_reason, None);
    // Widened to the sink's 1 MiB blocks: two blocks read, nothing else.
    assert_eq!(inc.report.read, 2 * MIB);
    assert_eq!(sink.contents(), v2);
    assert_eq!(inc.report.digests.as_ref().unwrap().blocks, digests_of(&v2, MIB));

    // Snapshot 3: the sync fails part-way (the sink refuses writes) and leaves it dirty.
    let mut v3 = v2.clone();
    v3[..(6 * MIB) as usize].fill(0x44);
    sink.pass_writes.store(3, Ordering::SeqCst);
    sink.fail_writes.store(1, Ordering::SeqCst);
    let err = sync(
        job(Arc::new(MemSource::new(v3.clone())), sink.clone(), &store, "j3", 12, changed(&[(0, 6 * MIB)])),
        &engine,
        &CopyOptions { in_flight: 1, request_size: MIB, ..opts.clone() },
        Arc::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BlockError::Io { .. }), "{err}");
    assert_ne!(sink.contents(), v2, "the failed sync wrote part of its changes");
    let state = store
        .load(&job(Arc::new(MemSource::new(v3.clone())), sink.clone(), &store, "x", 0, Changes::NotQueried).key)
        .unwrap()
        .unwrap();
    assert!(!state.consistent(), "a half-applied incremental must be reported dirty");
    assert_eq!(state.committed.as_ref().unwrap().change_id, Some(ChangeId::parse(&format!("{EPOCH}/9"))));

    // The snapshot of j3 is gone; j4 re-plans from the committed change ID 9 and heals it.
    let mut v4 = v3.clone();
    v4[(12 * MIB) as usize..(13 * MIB) as usize].fill(0x45);
    let healed = sync(
        job(
            Arc::new(MemSource::new(v4.clone())),
            sink.clone(),
            &store,
            "j4",
            15,
            changed(&[(0, 6 * MIB), (12 * MIB, MIB)]),
        ),
        &engine,
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    assert_eq!(healed.full_reason, None);
    assert!(healed.warnings.iter().any(|w| w.contains("left inconsistent by job j3")), "{:?}", healed.warnings);
    assert!(healed.state.consistent());
    assert_eq!(sink.contents(), v4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_copy_resumes_from_its_checkpoint_on_the_same_snapshot_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let size = 32 * MIB;
    let data = pattern(size as usize, 20);
    let sink = Arc::new(MemSink::new(size as usize, MIB));
    let src = Arc::new(MemSource::new(data.clone()));
    let engine = Engine::new(64 * MIB);
    // 32 MiB/s: a second to copy; cancel after ~half.
    let opts = CopyOptions {
        request_size: MIB,
        in_flight: 2,
        checkpoint_bytes: 2 * MIB,
        job_rate: Some(Arc::new(RateLimiter::new(32 * MIB))),
        ..CopyOptions::default()
    };
    let cancel = engine.cancel.clone();
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    tokio::spawn(async move {
        while p.snapshot().written < size / 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        cancel.cancel();
    });
    let err = sync(job(src.clone(), sink.clone(), &store, "j1", 3, Changes::NotQueried), &engine, &opts, progress)
        .await
        .unwrap_err();
    assert!(matches!(err, BlockError::Cancelled));
    let key = job(src.clone(), sink.clone(), &store, "j1", 3, Changes::NotQueried).key;
    let (cp, _) = store.load_checkpoint(&key).unwrap().expect("a checkpoint");
    let done = cp.done_set().total_bytes();
    assert!(done >= size / 2 - 2 * MIB, "checkpoint covers {done}");

    // The same job on the same snapshot reads only what was not done.
    let engine = Engine::new(64 * MIB);
    let opts = CopyOptions { job_rate: None, ..opts };
    let resumed =
        sync(job(src.clone(), sink.clone(), &store, "j1", 3, Changes::NotQueried), &engine, &opts, Arc::default())
            .await
            .unwrap();
    assert!(resumed.resumed);
    assert_eq!(resumed.resume_check, Some(ResumeCheck::Frozen), "a snapshot is trusted, not re-read");
    assert_eq!(resumed.report.read, size - done);
    assert_eq!(sink.contents(), data);
    assert_eq!(resumed.report.digests.as_ref().unwrap().blocks, digests_of(&data, MIB));
    assert!(store.load_checkpoint(&key).unwrap().is_none(), "a commit drops the checkpoint");

    // A checkpoint from another snapshot is dropped, and the copy starts over.
    let other = Arc::new(MemSource { identity: "mem:2".into(), ..MemSource::new(data.clone()) });
    let cancel = engine.cancel.clone();
    cancel.cancel();
    let _ = sync(
        job(src.clone(), Arc::new(MemSink::new(size as usize, MIB)), &store, "j9", 3, Changes::NotQueried),
        &engine,
        &opts,
        Arc::default(),
    )
    .await;
    let engine = Engine::new(64 * MIB);
    let fresh = sync(job(other, sink.clone(), &store, "j9", 3, Changes::NotQueried), &engine, &opts, Arc::default())
        .await
        .unwrap();
    assert!(!fresh.resumed);
    assert!(fresh.warnings.iter().any(|w| w.contains("snapshot is gone")), "{:?}", fresh.warnings);
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

/// Runs `src` to `sink` as job `id` and cancels it once half is written; returns the bytes its
/// checkpoint shows as done.
async fn cancelled_half_way(src: Arc<MemSource>, sink: Arc<MemSink>, store: &StateStore, opts: &CopyOptions) -> u64 {
    let size = src.size();
    let engine = Engine::new(64 * MIB);
    let opts = CopyOptions { job_rate: Some(Arc::new(RateLimiter::new(32 * MIB))), ..opts.clone() };
    let (cancel, progress) = (engine.cancel.clone(), Arc::new(Progress::default()));
    let p = progress.clone();
    tokio::spawn(async move {
        while p.snapshot().written < size / 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        cancel.cancel();
    });
    let key = job(src.clone(), sink.clone(), store, "j1", 3, Changes::NotQueried).key;
    let err = sync(job(src, sink, store, "j1", 3, Changes::NotQueried), &engine, &opts, progress).await.unwrap_err();
    assert!(matches!(err, BlockError::Cancelled));
    store.load_checkpoint(&key).unwrap().expect("a checkpoint").0.done_set().total_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_a_source_that_may_have_changed_rechecks_what_was_done_or_starts_over() {
    let size = 16 * MIB;
    let v1 = pattern(size as usize, 40);
    // A block device written while the copy was down: the same identity, other bytes in the
    // first two MiB (which the interrupted copy had done) and nowhere else.
    let mut v2 = v1.clone();
    v2[100..200].fill(0xee);
    v2[(MIB + MIB / 2) as usize] ^= 1;
    let device = |data: &[u8]| Arc::new(MemSource { frozen: false, allocation: None, ..MemSource::new(data.to_vec()) });
    let opts = CopyOptions { request_size: MIB, in_flight: 2, checkpoint_bytes: 2 * MIB, ..CopyOptions::default() };

    // With digests: the done ranges are read again; the two changed blocks are copied again.
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let sink = Arc::new(MemSink::new(size as usize, MIB));
    let done = cancelled_half_way(device(&v1), sink.clone(), &store, &opts).await;
    assert!(done >= 2 * MIB, "the first two MiB were done: {done}");
    let out = sync(
        job(device(&v2), sink.clone(), &store, "j1", 3, Changes::NotQueried),
        &Engine::new(64 * MIB),
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    assert!(out.resumed);
    assert_eq!(out.resume_check, Some(ResumeCheck::Verified { checked: done, changed: 2 * MIB }));
    assert_eq!(out.report.read, size - done + 2 * MIB);
    assert!(sink.contents() == v2, "the resumed copy equals the source as it is now");
    assert!(out.warnings.iter().any(|w| w.contains("changed in memory source since")), "{:?}", out.warnings);

    // Without digests nothing can be checked: the copy starts over.
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let sink = Arc::new(MemSink::new(size as usize, MIB));
    let bare = CopyOptions { digests: false, ..opts.clone() };
    cancelled_half_way(device(&v1), sink.clone(), &store, &bare).await;
    let out = sync(
        job(device(&v2), sink.clone(), &store, "j1", 3, Changes::NotQueried),
        &Engine::new(64 * MIB),
        &bare,
        Arc::default(),
    )
    .await
    .unwrap();
    assert!(!out.resumed);
    assert_eq!(out.resume_check, Some(ResumeCheck::StartedOver));
    assert_eq!(out.report.read, size);
    assert!(sink.contents() == v2);

    // Its allocation changed too (the first two MiB are now a hole), so the plan did: the copy
    // that started on a zeroed destination left data there, which must be zeroed now.
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let sink = Arc::new(MemSink::new(size as usize, MIB));
    cancelled_half_way(device(&v1), sink.clone(), &store, &opts).await;
    let mut v3 = v1.clone();
    v3[..(2 * MIB) as usize].fill(0);
    let holed = Arc::new(MemSource { frozen: false, ..MemSource::new(v3.clone()) });
    let out = sync(
        job(holed, sink.clone(), &store, "j1", 3, Changes::NotQueried),
        &Engine::new(64 * MIB),
        &opts,
        Arc::default(),
    )
    .await
    .unwrap();
    assert!(!out.resumed);
    assert!(out.warnings.iter().any(|w| w.contains("the plan changed")), "{:?}", out.warnings);
    assert!(sink.contents() == v3, "the hole is zeroed on the destination");
}
