//! Repositories where things went wrong around them: a medium that refuses writes (read-only,
//! not ours, full) still restores and verifies while writers are refused; gc runs on a full
//! disk; the temporary files and chunks of writers that died are collected; and one manifest
//! that cannot be read is skipped by everything but verify, which names it, and gc, which
//! sweeps nothing while it exists.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use repo::{Entry, Fs, LocalStore, LockKind, RealFs, Repo, RepoError, Retention};

const CHUNK: u32 = 64 << 10;
const EROFS: i32 = 30;
const EACCES: i32 = 13;
const ENOSPC: i32 = 28;

/// The real file system, with every change refused with `errno` (a read-only mount, a
/// directory we may not write, a full disk that frees nothing).
#[derive(Debug)]
struct Refusing(i32);

impl Refusing {
    fn no(&self) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(self.0))
    }
}

impl Fs for Refusing {
    fn write(&self, _: &Path, _: &[u8]) -> std::io::Result<()> {
        self.no()
    }
    fn sync_file(&self, p: &Path) -> std::io::Result<()> {
        RealFs.sync_file(p)
    }
    fn sync_dir(&self, d: &Path) -> std::io::Result<()> {
        RealFs.sync_dir(d)
    }
    fn create_dir(&self, _: &Path) -> std::io::Result<()> {
        self.no()
    }
    fn rename(&self, _: &Path, _: &Path) -> std::io::Result<()> {
        self.no()
    }
    fn hard_link(&self, _: &Path, _: &Path) -> std::io::Result<()> {
        self.no()
    }
    fn remove(&self, _: &Path) -> std::io::Result<()> {
        self.no()
    }
    fn read(&self, p: &Path) -> std::io::Result<Vec<u8>> {
        RealFs.read(p)
    }
    fn read_dir(&self, d: &Path) -> std::io::Result<Vec<Entry>> {
        RealFs.read_dir(d)
    }
    fn exists(&self, p: &Path) -> bool {
        RealFs.exists(p)
    }
}

/// The real file system on a disk with `free` bytes left: a write that does not fit leaves an
/// empty file and fails with ENOSPC, as a real one does; removing a file frees its size.
#[derive(Debug)]
struct Full {
    free: Mutex<u64>,
}

impl Full {
    fn freed(&self, p: &Path) {
        if let Ok(m) = std::fs::metadata(p)
            && m.is_file()
        {
            *self.free.lock().unwrap() += m.len();
        }
    }
}

impl Fs for Full {
    fn write(&self, p: &Path, data: &[u8]) -> std::io::Result<()> {
        let mut free = self.free.lock().unwrap();
        if data.len() as u64 > *free {
            std::fs::File::create(p)?;
            return Err(std::io::Error::from_raw_os_error(ENOSPC));
        }
        *free -= data.len() as u64;
        RealFs.write(p, data)
    }
    fn sync_file(&self, p: &Path) -> std::io::Result<()> {
        RealFs.sync_file(p)
    }
    fn sync_dir(&self, d: &Path) -> std::io::Result<()> {
        RealFs.sync_dir(d)
    }
    fn create_dir(&self, d: &Path) -> std::io::Result<()> {
        RealFs.create_dir(d)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.freed(to);
        RealFs.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        RealFs.hard_link(from, to)
    }
    fn remove(&self, p: &Path) -> std::io::Result<()> {
        self.freed(p);
        RealFs.remove(p)
    }
    fn read(&self, p: &Path) -> std::io::Result<Vec<u8>> {
        RealFs.read(p)
    }
    fn read_dir(&self, d: &Path) -> std::io::Result<Vec<Entry>> {
        RealFs.read_dir(d)
    }
    fn exists(&self, p: &Path) -> bool {
        RealFs.exists(p)
    }
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(files(&p)) } else { out.push(p) }
    }
    out
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    files(dir).into_iter().filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(".tmp-")).collect()
}

fn chunk_files(dir: &Path) -> usize {
    files(&dir.join("chunks")).len()
}

fn age_tree(dir: &Path, ago: Duration) {
    for p in files(dir) {
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() - ago).unwrap();
    }
}

/// A repository with two restore points of different data; returns their IDs and images.
async fn two_points(root: &Path) -> (Repo, Vec<(String, Vec<u8>)>) {
    let repo = Repo::init(root, CHUNK).unwrap();
    let mut out = Vec::new();
    let mut parent = None;
    for seed in [1, 2] {
        let data = common::image(16 * CHUNK as usize, CHUNK as usize, seed);
        let m = common::backup_bytes(&repo, parent.as_deref(), &data).await.unwrap();
        parent = Some(m.id.clone());
        out.push((m.id, data));
    }
    (repo, out)
}

fn restored(repo: &Repo, id: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("out-{id}.raw"));
    let _ = std::fs::remove_file(&out);
    repo.restore_disk(id, 0, &out).unwrap();
    std::fs::read(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_verify_read_a_repository_whose_medium_refuses_writes_and_writers_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let (_, points) = two_points(&root).await;
    for errno in [EROFS, EACCES, ENOSPC] {
        let ro = Repo::open_in(Arc::new(LocalStore::with_fs(&root, Refusing(errno)))).unwrap();
        let v = ro.verify().unwrap_or_else(|e| panic!("errno {errno}: verify: {e}"));
        assert!(v.chunks_checked > 0 && v.bad_chunks.is_empty() && v.damaged_points.is_empty(), "{v:?}");
        for (id, data) in &points {
            assert!(restored(&ro, id, dir.path()) == *data, "errno {errno}: {id} restores exactly");
        }
        let reader = ro.lock(LockKind::Shared, "a restore").unwrap();
        assert!(files(&root.join("locks")).is_empty(), "held without a file");
        drop(reader);
        // Writers still need their lock, and say why they have none.
        let e = ro.prune(&Retention { last: 1, ..Default::default() }, false).unwrap_err();
        let os = std::io::Error::from_raw_os_error(errno).to_string();
        assert!(matches!(&e, RepoError::Io { .. }) && e.to_string().contains(&os), "errno {errno}: {e}");
        assert!(ro.begin(None, Vec::new()).is_err());
        assert!(ro.gc(Duration::ZERO, false).is_err(), "errno {errno}: gc cannot lock");
    }
    assert!(temporaries(&root).is_empty(), "refused writes leave no temporary files");
    // A reader without a lock file still gives way to a gc holding the exclusive lock.
    let rw = Repo::open(&root).unwrap();
    let gc = rw.lock(LockKind::Exclusive, "gc").unwrap();
    let ro = Repo::open_in(Arc::new(LocalStore::with_fs(&root, Refusing(EROFS)))).unwrap();
    let e = ro.verify().unwrap_err();
    assert!(matches!(e, RepoError::Locked(_)) && e.to_string().contains("gc"), "{e}");
    drop(gc);
    ro.verify().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_runs_on_a_full_disk_and_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let (repo, points) = two_points(&root).await;
    repo.prune(&Retention { last: 1, ..Default::default() }, false).unwrap();
    age_tree(&root.join("chunks"), Duration::from_secs(7200));
    let before = chunk_files(&root);
    // Not a byte left.
    let full = Repo::open_in(Arc::new(LocalStore::with_fs(&root, Full { free: Mutex::new(0) }))).unwrap();
    assert!(full.begin(None, Vec::new()).is_err(), "the disk is full");
    let r = full.gc(Duration::from_secs(3600), false).unwrap();
    assert!(r.chunks_removed > 0 && chunk_files(&root) < before, "{r:?}");
    assert!(temporaries(&root).is_empty(), "the failed lock write left nothing behind");
    assert!(root.join("gc/reserve").exists(), "made again from the space the sweep freed");
    assert!(root.join("gc/generation").exists(), "backups running beside it are told");
    let (id, data) = &points[1];
    assert!(restored(&repo, id, dir.path()) == *data);
    assert!(repo.verify().unwrap().damaged_points.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_collects_the_temporary_files_and_chunks_of_writers_that_died() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let (repo, points) = two_points(&root).await;
    let in_use = chunk_files(&root);
    // A backup that stored chunks and died.
    let dying = repo
        .begin(
            Some(&points[1].0),
            vec![repo::DiskSpec {
                name: "d".into(),
                capacity: 4 * u64::from(CHUNK),
                change_id: None,
                committed: None,
                label: None,
            }],
        )
        .unwrap();
    let sink = dying.sink(0).unwrap();
    use pipeline::BlockSink;
    sink.write_at(0, bytes::Bytes::from(common::image(4 * CHUNK as usize, CHUNK as usize, 9))).await.unwrap();
    let id = dying.id().to_owned();
    drop(dying);
    assert!(chunk_files(&root) > in_use);
    let reg = root.join(format!("writers/{id}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&reg).unwrap()).unwrap();
    // It began long ago, on this host, in a process that is gone; its heartbeat looks fresh.
    v["pid"] = serde_json::json!(u32::MAX - 1);
    v["started"] = serde_json::json!(0);
    v["heartbeat"] =
        serde_json::json!(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    std::fs::write(&reg, serde_json::to_vec(&v).unwrap()).unwrap();
    // And the temporary files killed writers leave, in chunk folders and elsewhere.
    for (n, d) in ["chunks/ab", "points", "indexes", "locks"].iter().enumerate() {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join(format!(".tmp-4242-{n}-x")), vec![1u8; 4096]).unwrap();
    }
    // Within the grace period they stay.
    repo.gc(Duration::from_secs(3600), false).unwrap();
    assert_eq!(temporaries(&root).len(), 4);
    age_tree(&root, Duration::from_secs(7200));
    let r = repo.gc(Duration::from_secs(3600), false).unwrap();
    assert!(temporaries(&root).is_empty(), "{r:?}");
    assert_eq!(r.registrations_removed, 1, "the dead writer's registration: {r:?}");
    assert_eq!(chunk_files(&root), in_use, "and its chunks: {r:?}");
    for (id, data) in &points {
        assert!(restored(&repo, id, dir.path()) == *data);
    }
    assert!(repo.verify().unwrap().damaged_points.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_manifest_is_skipped_named_by_verify_and_stops_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let (repo, points) = two_points(&root).await;
    let (bad, bad_data) = &points[1];
    let manifest = root.join(format!("points/{bad}.json"));
    let whole = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &whole[..whole.len() / 2]).unwrap();
    age_tree(&root, Duration::from_secs(7200));
    let chunks = chunk_files(&root);

    let listed: Vec<String> = repo.points().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(listed, [points[0].0.clone()], "the readable one is listed");
    let v = repo.verify().unwrap();
    assert_eq!(v.damaged_points.get(bad.as_str()), Some(&vec!["manifest".to_owned()]), "{v:?}");
    assert!(v.bad_chunks.iter().any(|(f, _)| *f == format!("points/{bad}.json")), "{v:?}");
    let p = repo.prune(&Retention { last: 1, ..Default::default() }, false).unwrap();
    assert!(p.removed.is_empty(), "{p:?}");
    assert!(manifest.exists(), "prune never removes what it cannot read");
    // The chunks only the unreadable manifest names look like garbage: none may go.
    let r = repo.gc(Duration::from_secs(60), false).unwrap();
    assert!(format!("{r:?}").contains(&format!("points/{bad}.json")), "the report names it: {r:?}");
    assert_eq!((r.chunks_removed, r.indexes_removed, chunk_files(&root)), (0, 0, chunks), "{r:?}");
    // A backup still starts from the readable one.
    let next = common::backup_bytes(&repo, Some(&points[0].0), &points[0].1).await.unwrap();
    // Repaired (from a copy, say), the restore point restores whole.
    std::fs::write(&manifest, &whole).unwrap();
    assert!(restored(&repo, bad, dir.path()) == *bad_data);
    assert_eq!(repo.points().unwrap().len(), 3);
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    assert!(!format!("{:?}", repo.gc(Duration::from_secs(60), false).unwrap()).contains("points/"));
    assert!(restored(&repo, &next.id, dir.path()) == points[0].1);
}
