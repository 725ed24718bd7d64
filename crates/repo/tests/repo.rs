//! The repository end to end: the sink conformance suite, backups through the pipeline engine,
//! byte-identical restores, incrementals that store only what changed and still restore whole,
//! old restore points that restore while newer ones exist, deduplication, verify naming exactly
//! the damaged restore points, a newer format refused, and an unfinished backup leaving no
//! restore point behind.

use std::path::Path;
use std::sync::Arc;

use blockio::FileSource;
use cbt::ExtentSet;
use pipeline::Digests;
use pipeline::{BlockSink, BlockSource, CopyOptions, DiskCopy, Engine, copy_disk, progress::Progress};
use repo::{Consistency, DiskSpec, Repo, RepoError, SourceInfo};

const MIB: u64 = 1 << 20;
const MIB32: u32 = 1 << 20;

fn image(path: &Path, size: u64, seed: u8) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    // Data in some MiB, holes in others, and a partial chunk at the end.
    for (i, at) in (0..size).step_by(1 << 20).enumerate() {
        if i % 3 == 2 {
            continue;
        }
        let n = usize::try_from((size - at).min(MIB)).unwrap();
        let tag = u8::try_from(i % 251).unwrap().wrapping_add(seed);
        let data: Vec<u8> = (0..n).map(|k| k.to_le_bytes()[0].wrapping_mul(31).wrapping_add(tag)).collect();
        f.write_all_at(&data, at).unwrap();
    }
}

async fn backup(repo: &Repo, parent: Option<&str>, src: &Path, read: Option<ExtentSet>) -> repo::Manifest {
    let source: Arc<dyn BlockSource> = Arc::new(FileSource::open(src).unwrap());
    let size = source.size();
    let b = repo
        .begin(
            parent,
            vec![DiskSpec { name: "disk0".into(), capacity: size, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    let sink: Arc<dyn BlockSink> = b.sink(0).unwrap();
    let g = sink.granularity().get();
    let job = DiskCopy {
        read: read.unwrap_or_else(|| ExtentSet::full(size)).align_outward(sink.granularity(), size),
        zero: ExtentSet::new(),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(g, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    copy_disk(job, &Engine::new(64 * MIB), &CopyOptions::default(), Arc::new(Progress::default())).await.unwrap();
    sink.commit().await.unwrap();
    b.finish(SourceInfo { name: src.display().to_string(), instance_uuid: None }, Consistency::Crash).unwrap()
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_passes_the_pipeline_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(dir.path().join("r"), 64 << 10).unwrap();
    // Not a whole number of chunks, so the last one is partial.
    let size = 3 * MIB + 8192;
    let b = repo
        .begin(None, vec![DiskSpec { name: "d".into(), capacity: size, change_id: None, committed: None, label: None }])
        .unwrap();
    let sink = b.sink(0).unwrap();
    let reader = sink.clone();
    pipeline::conformance::check_sink(sink, async move || reader.read(0, size).unwrap()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incremental_old_and_new_restore_points_restore_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (img, repo_dir) = (dir.path().join("disk.raw"), dir.path().join("repo"));
    let size = 24 * MIB + 4096;
    image(&img, size, 1);
    let repo = Repo::init(&repo_dir, MIB32).unwrap();
    let first = backup(&repo, None, &img, None).await;
    assert_eq!(first.disks[0].stored_chunks, 17, "16 data MiB plus the 4 KiB tail; the holes stored as nothing");
    std::fs::copy(&img, dir.path().join("v1.raw")).unwrap();

    // Change three chunks, including the tail, and back up only those areas.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for at in [0, 2 * MIB + 100, size - 10] {
            f.write_all_at(b"changed!!!", at).unwrap();
        }
    }
    let changed = ExtentSet::from_ranges([(0, 10), (2 * MIB + 100, 10), (size - 10, 10)]);
    let second = backup(&repo, Some(&first.id), &img, Some(changed)).await;
    assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
    assert_eq!(second.disks[0].stored_chunks, 3, "only the changed chunks are new");

    // Both restore exactly; the old one while the newer exists.
    let out = dir.path().join("out.raw");
    repo.restore_disk(&second.id, 0, &out).unwrap();
    assert!(same(&out, &img), "the incremental restores as a full");
    repo.restore_disk(&first.id, 0, &out).unwrap();
    assert!(same(&out, &dir.path().join("v1.raw")), "the first restore point is untouched");

    // The same image again: every chunk is already there.
    let third = backup(&repo, None, &img, None).await;
    assert_eq!(third.disks[0].stored_chunks, 0);
    assert_eq!(repo.points().unwrap().len(), 3);

    // SYNCPROXY_REPO_SEEDS=DIR keeps one file of each kind there (fuzz seeds).
    if let Some(seeds) = std::env::var_os("SYNCPROXY_REPO_SEEDS") {
        let seeds = Path::new(&seeds);
        let ix = repo.index(&second, 0).unwrap();
        std::fs::copy(repo_dir.join(repo::chunk_name(&ix.ids[0])), seeds.join("chunk-zstd")).unwrap();
        std::fs::copy(repo_dir.join(&second.disks[0].index), seeds.join("index")).unwrap();
        std::fs::copy(repo_dir.join(format!("points/{}.json", second.id)), seeds.join("manifest.json")).unwrap();
    }

    // Verify: clean, then a flipped byte in a chunk only the newer points use.
    let clean = repo.verify().unwrap();
    assert!(clean.bad_chunks.is_empty() && clean.damaged_points.is_empty(), "{clean:?}");
    let ix_new = repo.index(&second, 0).unwrap();
    let ix_old = repo.index(&first, 0).unwrap();
    let only_new = ix_new.ids[0];
    assert_ne!(only_new, ix_old.ids[0]);
    let path = repo_dir.join(repo::chunk_name(&only_new));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let report = repo.verify().unwrap();
    assert_eq!(report.bad_chunks.len(), 1, "{report:?}");
    let damaged: Vec<&String> = report.damaged_points.keys().collect();
    assert_eq!(damaged, vec![&second.id, &third.id], "exactly the points that use it, in order");
    assert_eq!(
        repo.points().unwrap().iter().map(|p| &p.id).collect::<Vec<_>>(),
        vec![&first.id, &second.id, &third.id]
    );
    assert!(repo.restore_disk(&second.id, 0, &out).unwrap_err().to_string().contains("damaged"));
    repo.restore_disk(&first.id, 0, &out).unwrap();
    assert!(same(&out, &dir.path().join("v1.raw")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_backup_leaves_no_restore_point_and_newer_formats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, repo_dir) = (dir.path().join("disk.raw"), dir.path().join("repo"));
    image(&img, 8 * MIB, 3);
    let repo = Repo::init(&repo_dir, MIB32).unwrap();
    let done = backup(&repo, None, &img, None).await;
    // Chunks and even an index written, but no manifest: as after a crash before the end.
    let b = repo
        .begin(
            Some(&done.id),
            vec![DiskSpec { name: "d".into(), capacity: 8 * MIB, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    let sink = b.sink(0).unwrap();
    sink.write_at(0, bytes::Bytes::from(vec![9u8; 1 << 20])).await.unwrap();
    sink.commit().await.unwrap();
    drop(b);
    let points = repo.points().unwrap();
    assert_eq!(points.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), vec![done.id.clone()]);
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    assert!(Repo::init(&repo_dir, MIB32).is_err(), "init refuses an existing repository");

    // A repository written by a newer syncproxy: refused by number.
    let cfg = repo_dir.join("config");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"format\": 1", "\"format\": 2");
    std::fs::write(&cfg, text).unwrap();
    let e = Repo::open(&repo_dir).unwrap_err();
    assert!(matches!(e, RepoError::NewerFormat { found: 2, known: 1, .. }), "{e}");
    assert!(e.to_string().contains("upgrade syncproxy"), "{e}");
    assert!(matches!(Repo::open(dir.path()), Err(RepoError::NotFound(_))));
}

/// Sets a file's modification time into the past, as if written `ago` earlier.
fn age(path: &Path, ago: std::time::Duration) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - ago).unwrap();
}

fn age_tree(dir: &Path, ago: std::time::Duration) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { age_tree(&p, ago) } else { age(&p, ago) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_and_gc_keep_every_chunk_a_kept_point_or_a_running_backup_needs() {
    use repo::Retention;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (img, repo_dir) = (dir.path().join("disk.raw"), dir.path().join("repo"));
    let size = 12 * MIB;
    // Heartbeats every 50 ms, so a running backup's progress is saved before the gc below.
    let timing = repo::LockTiming { heartbeat: Duration::from_millis(50), ..Default::default() };
    let repo = Repo::init(&repo_dir, MIB32).unwrap().with_lock_timing(timing);
    // Five restore points of a disk that changes a little each time.
    let mut ids = Vec::new();
    let mut copies = Vec::new();
    image(&img, size, 0);
    for round in 0..5u8 {
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            // The first MiB differs every time: pruned points leave garbage behind.
            f.write_all_at(&vec![round + 1; 1 << 20], 0).unwrap();
        }
        let m = backup(&repo, ids.last().map(String::as_str), &img, None).await;
        let copy = dir.path().join(format!("v{round}.raw"));
        std::fs::copy(&img, &copy).unwrap();
        ids.push(m.id);
        copies.push(copy);
    }
    let hour = Duration::from_secs(3600);

    let disk =
        || vec![DiskSpec { name: "disk0".into(), capacity: size, change_id: None, committed: None, label: None }];
    // A backup in progress from ids[0] keeps going while prune and gc run beside it.
    let running = repo.begin(Some(&ids[0]), disk()).unwrap();
    let sink = running.sink(0).unwrap();
    sink.write_at(0, bytes::Bytes::from(vec![0xAB; 1 << 20])).await.unwrap();
    // Another dies after committing an index of its own: its registration protects its chunks
    // (and its parent's) for the grace period, even once its parent is pruned.
    let dying = repo.begin(Some(&ids[0]), disk()).unwrap();
    let sink2 = dying.sink(0).unwrap();
    sink2.write_at(0, bytes::Bytes::from(vec![0xCD; 1 << 20])).await.unwrap();
    sink2.commit().await.unwrap();
    let dead = dying.id().to_owned();
    drop(dying);

    let pruned = repo.prune(&Retention { last: 2, ..Default::default() }, false).unwrap();
    assert_eq!(pruned.removed, ids[..3].to_vec());
    // Long enough for a heartbeat to save the running backup's index so far.
    tokio::time::sleep(Duration::from_millis(300)).await;
    age_tree(&repo_dir.join("chunks"), 2 * hour);
    let report = repo.gc(hour, false).unwrap();
    assert!(report.chunks_removed > 0, "{report:?}");
    assert_eq!(report.registrations_removed, 0, "the dead backup is still within the grace period");
    // The dead backup's chunks (its parent is ids[0], pruned) are all still there.
    let reg_index =
        repo::Index::decode(&std::fs::read(repo_dir.join(format!("indexes/{dead}/0.idx"))).unwrap(), "i").unwrap();
    for id in reg_index.ids.iter().filter(|i| **i != repo::ZERO) {
        repo.chunk(id).unwrap_or_else(|e| panic!("a chunk the registered backup needs is gone: {e}"));
    }
    // The running backup finishes after the gc: the gc's generation changed, so it checks
    // that every chunk it reuses is still there, and it restores exactly.
    sink.commit().await.unwrap();
    let finished = running.finish(SourceInfo { name: "vm".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    let out = dir.path().join("out.raw");
    repo.restore_disk(&finished.id, 0, &out).unwrap();
    let mut want = std::fs::read(&copies[0]).unwrap();
    want[..1 << 20].fill(0xAB);
    assert!(std::fs::read(&out).unwrap() == want, "the backup that ran beside the gc restores exactly");
    // The kept points restore exactly and verify clean.
    for (id, copy) in ids[3..].iter().zip(&copies[3..]) {
        repo.restore_disk(id, 0, &out).unwrap();
        assert!(same(&out, copy), "{id}");
    }
    assert!(repo.verify().unwrap().damaged_points.is_empty());

    // Past the grace period the dead backup's registration goes, and its chunks with it;
    // the kept points still restore.
    age_tree(&repo_dir.join("writers"), 2 * hour);
    age_tree(&repo_dir.join("indexes"), 2 * hour);
    let later = {
        // The registration records when the backup started, in seconds; make it old too.
        let reg = repo_dir.join(format!("writers/{dead}.json"));
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&reg).unwrap()).unwrap();
        v["started"] = serde_json::json!(0);
        v["heartbeat"] = serde_json::json!(0);
        std::fs::write(&reg, serde_json::to_vec(&v).unwrap()).unwrap();
        age(&reg, 2 * hour);
        repo.gc(hour, false).unwrap()
    };
    assert_eq!(later.registrations_removed, 1, "{later:?}");
    assert!(later.chunks_removed > 0, "{later:?}");
    assert!(later.indexes_removed >= 1, "{later:?}");
    for (id, copy) in ids[3..].iter().zip(&copies[3..]) {
        repo.restore_disk(id, 0, &out).unwrap();
        assert!(same(&out, copy), "{id}");
    }
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    // A prune that keeps nothing is refused.
    assert!(repo.prune(&Retention::default(), true).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_repository_hides_content_and_names_and_needs_its_key() {
    use repo::{Location, RepoKey};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    image(&img, 8 * MIB, 4);
    let key = RepoKey::generate().unwrap();
    let loc = |name: &str, key: Option<RepoKey>| Location {
        url: dir.path().join(name).display().to_string(),
        key,
        ..Default::default()
    };
    let enc = Repo::init_at(&loc("enc", Some(key.clone())), MIB32).unwrap();
    let m = backup(&enc, None, &img, None).await;
    let out = dir.path().join("out.raw");
    enc.restore_disk(&m.id, 0, &out).unwrap();
    assert!(same(&out, &img));
    assert!(enc.verify().unwrap().damaged_points.is_empty());

    // Names are keyed: no chunk is named by the plain BLAKE3 of a MiB of the image, and no
    // file holds a MiB's bytes or the manifest's text.
    let raw = std::fs::read(&img).unwrap();
    let first_data = raw.chunks(1 << 20).find(|c| c.iter().any(|&b| b != 0)).unwrap();
    let plain_name = repo::chunk_name(blake3::hash(first_data).as_bytes());
    assert!(!dir.path().join("enc").join(&plain_name).exists());
    let manifest = std::fs::read(dir.path().join(format!("enc/points/{}.json", m.id))).unwrap();
    assert!(!manifest.windows(8).any(|w| w == b"capacity"), "the manifest is sealed");

    // No key, the wrong key, and a key for a plain repository are refused clearly.
    let e = Repo::open_at(&loc("enc", None)).unwrap_err().to_string();
    assert!(e.contains("encrypted") && e.contains("key"), "{e}");
    let e = Repo::open_at(&loc("enc", Some(RepoKey::generate().unwrap()))).unwrap_err().to_string();
    assert!(e.contains("not the key"), "{e}");
    Repo::init_at(&loc("plain", None), MIB32).unwrap();
    assert!(Repo::open_at(&loc("plain", Some(key.clone()))).is_err());

    // A copy to a plain repository re-encodes every chunk; the copy restores exactly.
    let plain = Repo::open_at(&loc("plain", None)).unwrap();
    let r = enc.copy_to(&plain, None).unwrap();
    assert_eq!(r.points_copied, vec![m.id.clone()]);
    assert!(dir.path().join("plain").join(&plain_name).exists(), "plain names in the plain copy");
    plain.restore_disk(&m.id, 0, &out).unwrap();
    assert!(same(&out, &img));
    assert!(plain.verify().unwrap().damaged_points.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_that_removes_a_chunk_a_running_backup_reuses_fails_that_backup_cleanly() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (one, two, repo_dir) = (dir.path().join("one.raw"), dir.path().join("two.raw"), dir.path().join("repo"));
    let size = 8 * MIB;
    image(&one, size, 1);
    std::fs::write(&two, vec![0x42; usize::try_from(size).unwrap()]).unwrap();
    let repo = Repo::init(&repo_dir, MIB32).unwrap();
    let gone = backup(&repo, None, &one, None).await;
    let kept = backup(&repo, None, &two, None).await;
    // The first restore point is removed (as a prune of its source would).
    repo.store().delete(&format!("points/{}.json", gone.id)).unwrap();

    // A new backup of `one` finds its first chunk already stored (unreferenced now) and reuses
    // it; a gc then removes that chunk before the backup finishes.
    let b = repo
        .begin(None, vec![DiskSpec { name: "d".into(), capacity: size, change_id: None, committed: None, label: None }])
        .unwrap();
    let sink = b.sink(0).unwrap();
    let first = std::fs::read(&one).unwrap()[..1 << 20].to_vec();
    sink.write_at(0, bytes::Bytes::from(first)).await.unwrap();
    assert_eq!(sink.stats().deduplicated, 1, "the chunk was already there");
    age_tree(&repo_dir.join("chunks"), Duration::from_secs(7200));
    let gc = repo.gc(Duration::from_secs(3600), false).unwrap();
    assert!(gc.chunks_removed > 0, "{gc:?}");
    sink.commit().await.unwrap();
    let e = b.finish(SourceInfo { name: "vm".into(), instance_uuid: None }, Consistency::Crash).unwrap_err();
    assert!(matches!(e, RepoError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("run the backup again"), "{e}");
    let ids: Vec<String> = repo.points().unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![kept.id.clone()], "the failed backup wrote no restore point");
    assert!(repo.verify().unwrap().damaged_points.is_empty());

    // Run again, it stores what it needs and restores exactly.
    let again = backup(&repo, None, &one, None).await;
    let out = dir.path().join("out.raw");
    repo.restore_disk(&again.id, 0, &out).unwrap();
    assert!(same(&out, &one));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_files_travel_with_their_restore_point() {
    use repo::{Location, RepoKey, Retention};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    image(&img, 4 * MIB, 5);
    let key = RepoKey::generate().unwrap();
    let at = |name: &str, key: Option<RepoKey>| Location {
        url: dir.path().join(name).display().to_string(),
        key,
        ..Default::default()
    };
    let repo = Repo::init_at(&at("r", None), MIB32).unwrap();
    let vmx = b"displayName = \"db01\"\nscsi0:0.fileName = \"db01.vmdk\"\n".to_vec();
    let nvram = vec![0xA5u8; 8192];
    let mut b = repo
        .begin(
            None,
            vec![DiskSpec { name: "d".into(), capacity: 4 * MIB, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    b.add_file("db01.vmx", &vmx).unwrap();
    b.add_file("db01.nvram", &nvram).unwrap();
    assert!(b.add_file("../x", b"").is_err() && b.add_file("db01.vmx", b"").is_err());
    assert!(b.add_file("big", &vec![0; repo::MAX_FILE + 1]).is_err());
    let sink = b.sink(0).unwrap();
    sink.write_at(0, bytes::Bytes::from(std::fs::read(&img).unwrap())).await.unwrap();
    sink.commit().await.unwrap();
    let m = b.finish(SourceInfo { name: "db01".into(), instance_uuid: None }, Consistency::Application).unwrap();
    assert_eq!(repo.file(&m, "db01.vmx").unwrap(), vmx);
    assert_eq!(repo.file(&m, "db01.nvram").unwrap(), nvram);
    assert!(matches!(repo.file(&m, "other.vmx"), Err(RepoError::NotFound(_))));

    // Copied (re-encoded into an encrypted repository) with the point.
    let enc = Repo::init_at(&at("enc", Some(key.clone())), MIB32).unwrap();
    repo.copy_to(&enc, None).unwrap();
    let em = enc.point(&m.id).unwrap();
    assert_eq!(enc.file(&em, "db01.vmx").unwrap(), vmx);
    assert!(enc.verify().unwrap().damaged_points.is_empty());

    // A damaged file makes its restore point damaged, by name.
    let stored = dir.path().join("r").join(&m.files[0].stored);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();
    let v = repo.verify().unwrap();
    assert_eq!(v.damaged_points.get(&m.id).map(Vec::as_slice), Some(&["db01.vmx".to_owned()][..]), "{v:?}");
    bytes[0] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();

    // When the point is pruned (a newer one of the same source kept), gc removes its files.
    let mut b2 = repo
        .begin(
            Some(&m.id),
            vec![DiskSpec { name: "d".into(), capacity: 4 * MIB, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    b2.add_file("db01.vmx", &vmx).unwrap();
    b2.sink(0).unwrap().commit().await.unwrap();
    b2.finish(SourceInfo { name: "db01".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    let pruned = repo.prune(&Retention { last: 1, ..Default::default() }, false).unwrap();
    assert_eq!(pruned.removed, vec![m.id.clone()]);
    repo.gc(std::time::Duration::ZERO, false).unwrap();
    assert!(!stored.exists(), "the files of a removed restore point are collected");
}

/// A backup cut short after some checkpoints is finished from its session: the resumed copy
/// reads only what was not durable, the restore point restores exactly, and the session is
/// gone. A gc in between makes the session untrusted: the resume is refused, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_resumes_from_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let (img, repo_dir) = (dir.path().join("disk.raw"), dir.path().join("repo"));
    image(&img, 12 * MIB, 5);
    let repo = Repo::init(&repo_dir, MIB32).unwrap();
    let spec =
        || vec![DiskSpec { name: "disk0".into(), capacity: 12 * MIB, change_id: None, committed: None, label: None }];
    let source: Arc<dyn BlockSource> = Arc::new(FileSource::open(&img).unwrap());
    let options = CopyOptions { checkpoint_bytes: MIB, ..CopyOptions::default() };
    let copy = |b: &repo::Backup, read: ExtentSet, done: ExtentSet| DiskCopy {
        read,
        zero: ExtentSet::new(),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(MIB, 12 * MIB),
        done,
        checkpoint: b.checkpointer(0),
        source: source.clone(),
        sink: b.sink(0).unwrap(),
    };

    // The first run copies 7 MiB of 12, checkpointing, then its process dies (no commit).
    let mut b = repo.begin(None, spec()).unwrap();
    assert!(b.checkpointer(0).is_none(), "no session, no checkpoints");
    b.keep_progress("vc1-vm1", "job-a", "snapshot-7").unwrap();
    let first = copy(&b, ExtentSet::full(7 * MIB), ExtentSet::new());
    copy_disk(first, &Engine::new(64 * MIB), &options, Arc::new(Progress::default())).await.unwrap();
    drop(b);
    let s = repo.session("vc1-vm1").unwrap().expect("the session stays after the crash");
    assert_eq!((s.job.as_str(), s.source.as_str(), s.parent.as_deref()), ("job-a", "snapshot-7", None));
    assert!(repo.points().unwrap().is_empty());

    // The next run resumes: what was durable is not read again.
    let (b, done) = repo.resume("vc1-vm1", spec()).unwrap();
    let durable = done[0].total_bytes();
    // Requests finish in any order, and a checkpoint is skipped while another is being saved:
    // some of the 7 MiB is durable, nothing beyond it.
    assert!(durable >= MIB && done[0].difference(&ExtentSet::full(7 * MIB)).is_empty(), "{done:?}");
    let r = copy_disk(
        copy(&b, ExtentSet::full(12 * MIB), done[0].clone()),
        &Engine::new(64 * MIB),
        &options,
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(r.read, 12 * MIB - durable, "only what was not durable is read");
    b.sink(0).unwrap().commit().await.unwrap();
    let m = b.finish(SourceInfo { name: "vm1".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    let out = dir.path().join("restored.raw");
    repo.restore_disk(&m.id, 0, &out).unwrap();
    assert!(same(&img, &out), "the resumed restore point restores exactly");
    assert!(repo.session("vc1-vm1").unwrap().is_none(), "finishing drops the session");

    // A session across a gc is not trusted.
    let mut b = repo.begin(Some(&m.id), spec()).unwrap();
    b.keep_progress("vc1-vm1", "job-b", "snapshot-8").unwrap();
    drop(b);
    repo.gc(std::time::Duration::ZERO, false).unwrap();
    let e = repo.resume("vc1-vm1", spec()).unwrap_err();
    assert!(matches!(e, RepoError::Conflict(_)) && e.to_string().contains("a gc ran"), "{e}");
    repo.drop_session("vc1-vm1").unwrap();
    assert!(repo.session("vc1-vm1").unwrap().is_none());
    assert!(matches!(repo.session("../etc"), Err(RepoError::Invalid(_))));
}

/// An incremental that reads only the changed bytes: each touched chunk is completed from the
/// parent point (read back, checked by its ID), so the new point restores exactly while the
/// source gave nothing but the changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_patched_from_its_parent_restores_exactly() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (img, repo_dir) = (dir.path().join("disk.raw"), dir.path().join("repo"));
    let size = 12 * MIB + 4096;
    image(&img, size, 3);
    let repo = Repo::init(&repo_dir, MIB32).unwrap();
    let first = backup(&repo, None, &img, None).await;
    std::fs::copy(&img, dir.path().join("v1.raw")).unwrap();

    // Small writes: inside a chunk, across a chunk boundary, into a hole, the tail, and one
    // that zeroes a chunk's data.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let areas = [(MIB + 4096, 65_536u64), (4 * MIB - 512, 1024), (5 * MIB + 8192, 4096), (size - 100, 100)];
    for (k, &(at, len)) in areas.iter().enumerate() {
        let bytes: Vec<u8> =
            (0..len).map(|i| i.to_le_bytes()[0].wrapping_mul(7).wrapping_add(k.to_le_bytes()[0] + 1) | 1).collect();
        f.write_all_at(&bytes, at).unwrap();
    }
    f.write_all_at(&vec![0u8; 8192], 9 * MIB).unwrap();
    let mut changed = ExtentSet::from_ranges(areas);
    changed.insert(cbt::Extent::new(9 * MIB, 8192).unwrap());

    let source: Arc<dyn BlockSource> = Arc::new(FileSource::open(&img).unwrap());
    let b = repo
        .begin(
            Some(&first.id),
            vec![DiskSpec { name: "disk0".into(), capacity: size, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    let sink: Arc<dyn BlockSink> = b.sink(0).unwrap();
    let read = changed.align_outward(sink.granularity(), size);
    let job = DiskCopy {
        keep: read.difference(&changed),
        fetch: Some(changed.clone()),
        read: read.clone(),
        zero: ExtentSet::new(),
        digests: Digests::zeros(MIB, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    let options = CopyOptions { digests: false, ..CopyOptions::default() };
    let r = copy_disk(job, &Engine::new(64 * MIB), &options, Arc::new(Progress::default())).await.unwrap();
    sink.commit().await.unwrap();
    let second = b.finish(SourceInfo { name: "disk".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    assert_eq!(r.read, changed.total_bytes(), "only the changed bytes were read from the source");
    assert_eq!(r.read_back, read.total_bytes(), "the touched chunks were completed from the parent");

    let out = dir.path().join("out.raw");
    repo.restore_disk(&second.id, 0, &out).unwrap();
    assert!(same(&out, &img), "the patched chunks restore exactly");
    repo.restore_disk(&first.id, 0, &out).unwrap();
    assert!(same(&out, &dir.path().join("v1.raw")), "the parent is untouched");
    let report = repo.verify().unwrap();
    assert!(report.bad_chunks.is_empty() && report.damaged_points.is_empty(), "{report:?}");

    // A damaged parent chunk is never patched into a new point: the read back fails.
    let ix = repo.index(&second, 0).unwrap();
    let victim = repo_dir.join(repo::chunk_name(&ix.ids[1]));
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    f.write_all_at(b"again", MIB + 10).unwrap();
    let source: Arc<dyn BlockSource> = Arc::new(FileSource::open(&img).unwrap());
    let b = repo
        .begin(
            Some(&second.id),
            vec![DiskSpec { name: "disk0".into(), capacity: size, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    let sink: Arc<dyn BlockSink> = b.sink(0).unwrap();
    let changed = ExtentSet::from_ranges([(MIB + 10, 5)]);
    let read = changed.align_outward(sink.granularity(), size);
    let job = DiskCopy {
        keep: read.difference(&changed),
        fetch: Some(changed),
        read,
        zero: ExtentSet::new(),
        digests: Digests::zeros(MIB, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink,
    };
    let e = copy_disk(job, &Engine::new(64 * MIB), &options, Arc::new(Progress::default())).await.unwrap_err();
    assert!(e.to_string().contains("reading back"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_gc_and_copy_say_how_far_they_have_come() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(dir.path().join("repo"), MIB32).unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    image(&a, 6 * MIB + 4096, 1);
    image(&b, 5 * MIB, 2);
    let first = backup(&repo, None, &a, None).await;
    backup(&repo, None, &b, None).await;

    // Verify: every index read, then every chunk checked, each counted once.
    let steps = repo::Steps::default();
    let report = repo.verify_with(&steps).unwrap();
    assert_eq!(steps.snapshot(), ("checking chunks".to_owned(), report.chunks_checked, report.chunks_checked));
    assert!(report.chunks_checked > 0);
    // Stopped (a daemon shutting down): it returns at its next step, saying so.
    let stopped = repo::Steps::default();
    stopped.stop();
    let e = repo.verify_with(&stopped).unwrap_err();
    assert!(matches!(e, repo::RepoError::Stopped(_)) && e.to_string().contains("stopped"), "{e}");

    // Copy: one step per chunk reference of the points copied (zero chunks included).
    let dest = Repo::init(dir.path().join("copy"), MIB32).unwrap();
    let steps = repo::Steps::default();
    repo.copy_to_with(&dest, Some(std::slice::from_ref(&first.id)), &steps).unwrap();
    let (phase, done, total) = steps.snapshot();
    assert!(phase.starts_with("copying restore point 1 of 1") && phase.contains(&first.id), "{phase}");
    assert_eq!((done, total), (7, 7), "7 chunks of 1 MiB cover 6 MiB + 4 KiB");

    // gc: every chunk folder swept.
    let steps = repo::Steps::default();
    repo.gc_with(std::time::Duration::ZERO, true, &steps).unwrap();
    let (phase, done, total) = steps.snapshot();
    assert_eq!(phase, "sweeping chunk folders");
    assert!(total > 0 && done == total, "{done} of {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_to_a_tier_with_its_own_retention_sends_only_what_that_tier_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(dir.path().join("repo"), MIB32).unwrap();
    let dest = Repo::init(dir.path().join("long"), MIB32).unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    image(&a, 3 * MIB, 1);
    image(&b, 2 * MIB, 2);
    let mut ids = Vec::new();
    for seed in 1..=3 {
        image(&a, 3 * MIB, seed);
        ids.push(backup(&repo, None, &a, None).await.id);
    }
    let b1 = backup(&repo, None, &b, None).await.id;
    let keep = repo::Retention { last: 1, ..Default::default() };
    // The newest point of each VM; the older ones of `a` would only be pruned again.
    let todo = repo.points_to_copy(&dest, &keep).unwrap();
    assert_eq!(todo, vec![ids[2].clone(), b1.clone()]);
    repo.copy_to(&dest, Some(&todo)).unwrap();
    assert!(dest.prune(&keep, false).unwrap().removed.is_empty());
    // Nothing new: nothing to send, and the older points are not sent again.
    assert!(repo.points_to_copy(&dest, &keep).unwrap().is_empty());
    // A newer point replaces the tier's one of that VM; without a policy a copy takes all.
    image(&a, 3 * MIB, 9);
    let a4 = backup(&repo, None, &a, None).await.id;
    assert_eq!(repo.points_to_copy(&dest, &keep).unwrap(), vec![a4.clone()]);
    let all = repo::Retention { last: 100, ..Default::default() };
    assert_eq!(repo.points_to_copy(&dest, &all).unwrap().len(), 3, "{ids:?} and {a4}, less the one there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_the_protection_markers_of_points_that_are_gone_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(dir.path().join("repo"), MIB32).unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    image(&a, 3 * MIB, 5);
    image(&b, 3 * MIB, 6);
    let (gone, kept) = (backup(&repo, None, &a, None).await, backup(&repo, None, &b, None).await);
    repo.protect(&gone.id, "until the audit").unwrap();
    repo.protect(&kept.id, "keep").unwrap();
    // The manifest removed by hand (protected points cannot be forgotten): its marker is
    // left over.
    std::fs::remove_file(dir.path().join("repo/points").join(format!("{}.json", gone.id))).unwrap();
    let dry = repo.gc(std::time::Duration::ZERO, true).unwrap();
    assert_eq!(dry.markers_removed, 1);
    assert!(dir.path().join("repo/protected").join(format!("{}.json", gone.id)).exists(), "a dry run removes nothing");
    // Within the grace period it stays.
    assert_eq!(repo.gc(std::time::Duration::from_secs(3600), false).unwrap().markers_removed, 0);
    let r = repo.gc(std::time::Duration::ZERO, false).unwrap();
    assert_eq!(r.markers_removed, 1);
    assert!(!dir.path().join("repo/protected").join(format!("{}.json", gone.id)).exists());
    assert_eq!(repo.protection(&kept.id).unwrap().map(|p| p.note), Some("keep".to_owned()));
    assert!(repo.forget(&kept.id).is_err(), "the living point is still protected");
}
