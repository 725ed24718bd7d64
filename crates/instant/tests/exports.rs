//! The exports against a real repository and real files: reads equal the image, holes are
//! holes, the cache stays within its bound, damaged chunks fail their reads and are named,
//! overlays commit to a child restore point that restores to what they showed, and a
//! replica's disks are found with their sync state.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use instant::{CacheConfig, FileExport, Overlay, PointExport, commit, replica_disks};
use nbd_wire::proto::{errno, state};
use nbd_wire::server::ExportSource;
use pipeline::BlockSink;
use repo::{Consistency, DiskSpec, Repo, SourceInfo};

const CHUNK: u32 = 64 << 10;

fn us(x: u64) -> usize {
    usize::try_from(x).unwrap()
}

/// Backs `image` up as disk `scsi0:0` of a new restore point (with a `.vmx`), chunk by chunk.
async fn backup(repo: &Repo, image: &Path) -> String {
    let data = std::fs::read(image).unwrap();
    let spec =
        DiskSpec { name: "scsi0:0".into(), capacity: data.len() as u64, change_id: None, committed: None, label: None };
    let mut b = repo.begin(None, vec![spec]).unwrap();
    b.add_file("vm.vmx", b"displayName = \"vm\"\n").unwrap();
    let sink = b.sink(0).unwrap();
    for (n, c) in data.chunks(CHUNK as usize).enumerate() {
        let at = n as u64 * u64::from(CHUNK);
        if c.iter().all(|&b| b == 0) {
            sink.write_zeroes(at, c.len() as u64).await.unwrap();
        } else {
            sink.write_at(at, Bytes::copy_from_slice(c)).await.unwrap();
        }
    }
    sink.commit().await.unwrap();
    b.finish(SourceInfo { name: "vm".into(), instance_uuid: None }, Consistency::Application).unwrap().id
}

async fn read_all(e: &dyn ExportSource, piece: usize) -> Vec<u8> {
    let mut out = vec![0u8; usize::try_from(e.size()).unwrap()];
    for (n, c) in out.chunks_mut(piece).enumerate() {
        e.read_at((n * piece) as u64, c).await.unwrap();
    }
    out
}

/// `(offset, length)` of the holes an export reports over its whole size.
async fn holes(e: &dyn ExportSource) -> Vec<(u64, u64)> {
    let (mut at, mut out) = (0u64, Vec::new());
    while at < e.size() {
        let len = u32::try_from((e.size() - at).min(1 << 30)).unwrap();
        for (l, f) in e.block_status(at, len).await.unwrap() {
            if f == state::HOLE | state::ZERO {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == at => *n += u64::from(l),
                    _ => out.push((at, u64::from(l))),
                }
            }
            at += u64::from(l);
        }
    }
    out
}

fn image_holes(data: &[u8], unit: usize) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (n, c) in data.chunks(unit).enumerate() {
        if c.iter().all(|&b| b == 0) {
            let at = (n * unit) as u64;
            match out.last_mut() {
                Some((s, l)) if *s + *l == at => *l += c.len() as u64,
                _ => out.push((at, c.len() as u64)),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_equal_the_image_holes_are_holes_and_the_cache_stays_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    testkit::sparse_image(&image, 8 << 20, 5);
    let want = std::fs::read(&image).unwrap();
    let repo = Repo::init(dir.path().join("repo"), CHUNK).unwrap();
    let id = backup(&repo, &image).await;
    let max = 4 * u64::from(CHUNK);
    let e = PointExport::open(&repo, &id, 0, CacheConfig { max_bytes: max, read_ahead_chunks: 3 }).unwrap();
    assert_eq!(e.size(), want.len() as u64);
    assert!(read_all(&e, 48 << 10).await == want, "the export reads as the image");
    let s = e.cache_stats();
    assert!(s.peak_bytes <= max && s.bytes <= max, "{s:?} exceeds {max}");
    assert!(s.fetches > 0 && s.hits > 0, "{s:?}");
    assert_eq!(holes(&e).await, image_holes(&want, CHUNK as usize));
    assert!(!holes(&e).await.is_empty(), "the image has holes");
    // Many readers of one chunk at once share one fetch.
    let e = PointExport::open(&repo, &id, 0, CacheConfig { max_bytes: max, read_ahead_chunks: 0 }).unwrap();
    let data_at = (0..want.len()).step_by(CHUNK as usize).find(|&o| want[o] != 0).unwrap() as u64;
    let reads = (0..8).map(|_| {
        let e = e.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            e.read_at(data_at, &mut b).await.map(|()| b)
        })
    });
    for r in testkit::join_all(reads).await {
        assert_eq!(r.unwrap().unwrap(), want[us(data_at)..us(data_at) + 4096]);
    }
    assert_eq!(e.cache_stats().fetches, 1, "{:?}", e.cache_stats());
    assert!(e.failed_chunks().is_empty());
    assert!(PointExport::open(&repo, &id, 1, CacheConfig::default()).is_err(), "no disk 1");
    assert!(PointExport::open(&repo, "nonesuch", 0, CacheConfig::default()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_fails_its_reads_with_eio_and_is_named_as_verify_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, testkit::noise(1 << 20, 9)).unwrap();
    let repo = Repo::init(dir.path().join("repo"), CHUNK).unwrap();
    let id = backup(&repo, &image).await;
    let report = repo.verify().unwrap();
    assert!(report.bad_chunks.is_empty());
    // Damage the chunk of the third slot.
    let ix = repo.index(&repo.point(&id).unwrap(), 0).unwrap();
    let name = repo::chunk_name(&ix.ids[2]);
    let path = dir.path().join("repo").join(&name);
    let mut raw = std::fs::read(&path).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0xff;
    std::fs::write(&path, raw).unwrap();
    let e = PointExport::open(&repo, &id, 0, CacheConfig::default()).unwrap();
    let mut buf = vec![0u8; 8192];
    let err = e.read_at(2 * u64::from(CHUNK) + 100, &mut buf).await.unwrap_err();
    assert_eq!(err.errno(), errno::EIO, "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    e.read_at(0, &mut buf).await.unwrap();
    e.read_at(3 * u64::from(CHUNK), &mut buf).await.unwrap();
    let failed = e.failed_chunks();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!((failed[0].chunk.as_str(), failed[0].offset), (name.as_str(), 2 * u64::from(CHUNK)));
    let report = repo.verify().unwrap();
    assert_eq!(report.bad_chunks.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), [name.as_str()]);
    // A missing one too.
    std::fs::remove_file(&path).unwrap();
    let e = PointExport::open(&repo, &id, 0, CacheConfig::default()).unwrap();
    assert!(e.read_at(2 * u64::from(CHUNK), &mut buf).await.is_err());
    assert!(e.failed_chunks()[0].reason.contains("missing"), "{:?}", e.failed_chunks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_commits_to_a_child_point_storing_only_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    testkit::sparse_image(&image, 4 << 20, 11);
    let repo = Repo::init(dir.path().join("repo"), CHUNK).unwrap();
    let id = backup(&repo, &image).await;
    let base: Arc<dyn ExportSource> = Arc::new(PointExport::open(&repo, &id, 0, CacheConfig::default()).unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let o = Overlay::new(base, scratch.path(), 4096).unwrap();
    // New data inside one chunk, zeros over a whole data chunk, a write across two chunks.
    o.write_at(5000, &testkit::noise(3000, 1)).await.unwrap();
    let data_chunk =
        (0..4u64 << 20).step_by(CHUNK as usize).find(|&at| std::fs::read(&image).unwrap()[us(at)] != 0).unwrap();
    o.write_zeroes(data_chunk, CHUNK).await.unwrap();
    o.write_at(3 * u64::from(CHUNK) - 10, &testkit::noise(20, 2)).await.unwrap();
    let shown = read_all(&o, 1 << 20).await;
    let m = commit(&repo, &id, &[(0, &o)]).await.unwrap();
    assert_eq!(m.parent.as_deref(), Some(id.as_str()));
    assert_eq!(m.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["vm.vmx"]);
    assert_eq!(repo.file(&m, "vm.vmx").unwrap(), b"displayName = \"vm\"\n");
    assert_eq!((m.source.name.as_str(), m.consistency), ("vm", Consistency::Application));
    // Chunks 0, 2 and 3 changed (the zeroed one is stored as a zero chunk, nothing new).
    assert!((1..=3).contains(&m.disks[0].stored_chunks), "{:?}", m.disks[0]);
    let out = dir.path().join("restored.raw");
    repo.restore_disk(&m.id, 0, &out).unwrap();
    assert!(std::fs::read(&out).unwrap() == shown, "the new point restores to what the overlay showed");
    let parent = repo.index(&repo.point(&id).unwrap(), 0).unwrap();
    let child = repo.index(&m, 0).unwrap();
    let changed: Vec<usize> = (0..parent.ids.len()).filter(|&i| parent.ids[i] != child.ids[i]).collect();
    let mut expect = vec![0, 2, 3, usize::try_from(data_chunk / u64::from(CHUNK)).unwrap()];
    expect.sort_unstable();
    expect.dedup();
    assert_eq!(changed, expect, "only the written chunks differ from the parent's");
    assert!(commit(&repo, &id, &[(1, &o)]).await.is_err(), "no disk 1");
    assert!(commit(&repo, &id, &[(0, &o), (0, &o)]).await.is_err(), "one disk twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_disk_is_served_as_it_is_and_found_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm_12345678");
    std::fs::create_dir_all(&vm).unwrap();
    let disk = vm.join("scsi0-1.raw");
    testkit::sparse_image(&disk, 4 << 20, 13);
    let want = std::fs::read(&disk).unwrap();
    let e = FileExport::open(&disk).unwrap();
    assert!(read_all(&e, 100_000).await == want);
    assert!(!e.writable());
    let found = holes(&e).await;
    assert!(!found.is_empty());
    for (at, len) in &found {
        assert!(want[us(*at)..us(*at + *len)].iter().all(|&b| b == 0), "a hole at {at} holds data");
    }
    // The state a replica sync leaves, then one interrupted.
    let states = replica::state::StateStore::open(dir.path().join(".syncproxy/state")).unwrap();
    let key = replica::state::SyncKey {
        vcenter: "vc".into(),
        vm: "uuid".into(),
        disk: "scsi0:1".into(),
        destination: disk.display().to_string(),
    };
    let disks = replica_disks(&vm).unwrap();
    assert_eq!((disks.len(), disks[0].name.as_str()), (1, "scsi0:1"));
    assert!(disks[0].state.is_none() && disks[0].inconsistent().is_none());
    states.mark_dirty(&key, 65536, "job-1").unwrap();
    let disks = replica_disks(&vm).unwrap();
    assert!(disks[0].inconsistent().is_some_and(|w| w.contains("job-1")), "{:?}", disks[0]);
    assert!(replica_disks(dir.path()).is_err(), "the replica directory of many VMs");
    assert!(replica_disks(&disk).unwrap()[0].state.is_some());
}
