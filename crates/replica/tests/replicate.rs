//! The replication flow against in-memory sources and sinks: full then incremental, a replica
//! left dirty by a failed sync, cancel and resume on the same snapshot only, and the resume of
//! a source that may have changed.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use cbt::{ChangeId, ChangedAreas, Changes, CurrentDisk, DiskPosition, ExtentSet};
use pipeline::conformance::{MemSink, MemSource, pattern};
use pipeline::limit::RateLimiter;
use pipeline::progress::Progress;
use pipeline::{BlockSource, CopyOptions, Engine, ErrorKind};
use replica::replicate::{ResumeCheck, SyncJob, sync};
use replica::state::{StateStore, SyncKey};

const MIB: u64 = 1 << 20;

fn digests_of(data: &[u8], g: u64) -> Vec<[u8; 32]> {
    data.chunks(usize::try_from(g).unwrap()).map(|c| *blake3::hash(c).as_bytes()).collect()
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
    // Only the changed bytes are read from the source; the rest of the block the 64 KiB
    // change touches (for its digest) is read back from the replica itself, while the block
    // changed whole needs nothing of it.
    assert_eq!(inc.report.read, MIB + 65536);
    assert_eq!(inc.report.read_back, MIB);
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
    let io = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
    assert!(io && err.kind() == ErrorKind::Transient && err.attempts().is_none(), "{err}");
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
    assert!(err.kind() == ErrorKind::Cancelled);
    let key = job(src.clone(), sink.clone(), &store, "j1", 3, Changes::NotQueried).key;
    let (cp, _) = store.load_checkpoint(&key).unwrap().expect("a checkpoint");
    let done_set = cp.done_set();
    let done = done_set.total_bytes();
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
    // What was not done, and of that only the source's data (its zero blocks are holes).
    let data_left = src.allocation.as_ref().unwrap().data.difference(&done_set).total_bytes();
    assert_eq!(resumed.report.read, data_left);
    assert!(data_left < size - done);
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
    assert!(err.kind() == ErrorKind::Cancelled);
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
