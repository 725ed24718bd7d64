//! A backup through the copy engine's block digests: a plain repository names each chunk by the
//! digest the engine hands with its data (one BLAKE3 per byte), so its IDs are exactly the
//! plain BLAKE3 of the chunks (all-zero ones and the short last one included); it verifies and
//! restores byte for byte, hashing again gives the same chunks, damage is still found, a wrong
//! digest never names a chunk silently, and an encrypted repository keeps its keyed IDs.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use blockio::FileSource;
use bytes::Bytes;
use cbt::ExtentSet;
use pipeline::{
    BlockDigest, BlockSink, BlockSource, CopyOptions, Digests, DiskCopy, Engine, IoFuture, copy_disk,
    progress::Progress,
};
use repo::{Codec, Consistency, DiskSpec, Location, Manifest, Repo, RepoKey, RepoSink, SourceInfo};

const MIB: u64 = 1 << 20;

/// A repository sink that counts how the engine wrote it.
struct Counting {
    inner: Arc<RepoSink>,
    digested: AtomicU32,
    plain: AtomicU32,
}

impl BlockSink for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn granularity(&self) -> NonZeroU64 {
        self.inner.granularity()
    }
    fn known_zero(&self) -> bool {
        self.inner.known_zero()
    }
    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        self.plain.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(offset, data)
    }
    fn uses_digests(&self) -> bool {
        self.inner.uses_digests()
    }
    fn write_at_digested(&self, offset: u64, data: Bytes, digests: &[BlockDigest]) -> IoFuture<'_, ()> {
        self.digested.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at_digested(offset, data, digests)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        self.inner.write_zeroes(offset, length)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn commit(&self) -> IoFuture<'_, ()> {
        self.inner.commit()
    }
}

/// 9 MiB and 12 KiB: data, a MiB of written zeros (data to the source), a hole, and a short
/// last chunk.
fn image(path: &Path) -> Vec<u8> {
    let size = 9 * MIB + 12288;
    let mut bytes = pipeline::conformance::pattern(size as usize, 9);
    bytes[(3 * MIB) as usize..(4 * MIB) as usize].fill(0);
    bytes[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (slot, chunk) in bytes.chunks(MIB as usize).enumerate() {
        if slot != 5 {
            f.write_all_at(chunk, slot as u64 * MIB).unwrap();
        }
    }
    bytes
}

/// Backs `img` up into `repo` with `options`; `again` makes the sink hash every chunk itself.
/// Returns the restore point and how many writes carried digests and how many did not.
async fn backup(repo: &Repo, img: &Path, options: &CopyOptions, again: bool) -> (Manifest, u32, u32) {
    let source: Arc<dyn BlockSource> = Arc::new(FileSource::open(img).unwrap());
    let size = source.size();
    let b = repo
        .begin(
            None,
            vec![DiskSpec { name: "disk0".into(), capacity: size, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    let inner = b.sink(0).unwrap();
    if again {
        inner.hash_chunks_again();
    }
    let sink = Arc::new(Counting { inner, digested: AtomicU32::new(0), plain: AtomicU32::new(0) });
    let g = sink.granularity();
    let alloc = source.allocation().await.unwrap().map_or_else(|| ExtentSet::full(size), |a| a.data);
    let read = alloc.align_outward(g, size);
    let job = DiskCopy {
        zero: read.complement(size),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        read,
        digests: Digests::zeros(g.get(), size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    copy_disk(job, &Engine::new(64 * MIB), options, Arc::new(Progress::default())).await.unwrap();
    sink.commit().await.unwrap();
    let m = b.finish(SourceInfo { name: "disk".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    (m, sink.digested.load(Ordering::SeqCst), sink.plain.load(Ordering::SeqCst))
}

/// Each chunk's expected ID under `id`, or zeros for an all-zero chunk.
fn ids(bytes: &[u8], id: impl Fn(&[u8]) -> [u8; 32]) -> Vec<[u8; 32]> {
    bytes.chunks(MIB as usize).map(|c| if c.iter().all(|&b| b == 0) { [0; 32] } else { id(c) }).collect()
}

fn plain_ids(bytes: &[u8]) -> Vec<[u8; 32]> {
    ids(bytes, |c| *blake3::hash(c).as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_backup_names_chunks_by_the_engines_digests_and_verifies_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let bytes = image(&img);
    let out = dir.path().join("out.raw");
    // Without zero detection the written zeros reach the sink as data, with their digest.
    for (n, detect_zeroes) in [true, false].into_iter().enumerate() {
        let repo = Repo::init(dir.path().join(format!("r{n}")), 1 << 20).unwrap();
        let options = CopyOptions { digests: false, detect_zeroes, request_size: 3 * MIB, ..CopyOptions::default() };
        let (m, digested, plain) = backup(&repo, &img, &options, false).await;
        assert!(digested > 0 && plain == 0, "every write carried digests ({digested} did, {plain} did not)");
        assert_eq!(repo.index(&m, 0).unwrap().ids, plain_ids(&bytes), "IDs are the chunks' plain BLAKE3");
        let v = repo.verify().unwrap();
        assert!(v.damaged_points.is_empty() && v.bad_chunks.is_empty(), "{v:?}");
        assert_eq!(v.chunks_checked, 8, "7 data MiB and the short last chunk");
        repo.restore_disk(&m.id, 0, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes, "detect_zeroes {detect_zeroes}");
    }

    // Hashing every chunk again (as before) names the same chunks.
    let repo = Repo::init(dir.path().join("again"), 1 << 20).unwrap();
    let (m, _, _) = backup(&repo, &img, &CopyOptions::default(), true).await;
    assert_eq!(repo.index(&m, 0).unwrap().ids, plain_ids(&bytes));

    // Damage to a chunk written through the digests is found.
    let repo = Repo::open(dir.path().join("r0")).unwrap();
    let m = repo.points().unwrap().remove(0);
    let victim = dir.path().join("r0").join(repo::chunk_name(&plain_ids(&bytes)[1]));
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&victim).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    let v = repo.verify().unwrap();
    assert_eq!(v.damaged_points.keys().collect::<Vec<_>>(), [&m.id], "{v:?}");
    assert!(repo.restore_disk(&m.id, 0, &out).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_never_names_a_chunk_silently() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(dir.path().join("r"), 1 << 20).unwrap();
    let b = repo
        .begin(
            None,
            vec![DiskSpec { name: "d".into(), capacity: 2 * MIB, change_id: None, committed: None, label: None }],
        )
        .unwrap();
    let sink = b.sink(0).unwrap();
    assert!(sink.uses_digests());
    let data = Bytes::from(vec![0x5a; MIB as usize]);
    // Digests that do not line up with the chunks are not used at all.
    sink.write_at_digested(MIB, data.clone(), &[]).await.unwrap();
    let wrong = [7u8; 32];
    let r = sink.write_at_digested(0, data, &[wrong]).await;
    if cfg!(debug_assertions) {
        // Tests check every digest the sink takes.
        let e = r.unwrap_err().to_string();
        assert!(e.contains("panicked"), "{e}");
    } else {
        // A release build trusts it; verify then names the damage.
        r.unwrap();
        sink.commit().await.unwrap();
        let m = b.finish(SourceInfo { name: "d".into(), instance_uuid: None }, Consistency::Crash).unwrap();
        assert!(repo.verify().unwrap().damaged_points.contains_key(&m.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_repository_keeps_its_keyed_ids() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let bytes = image(&img);
    let key = RepoKey::generate().unwrap();
    let loc =
        Location { url: dir.path().join("enc").display().to_string(), key: Some(key.clone()), ..Default::default() };
    let repo = Repo::init_at(&loc, 1 << 20).unwrap();
    let (m, digested, plain) = backup(&repo, &img, &CopyOptions::default(), false).await;
    assert!(digested == 0 && plain > 0, "an encrypted sink takes no digests");
    let keyed = Codec::keyed(&key).unwrap();
    let expected = ids(&bytes, |c| keyed.chunk_id(c));
    assert_eq!(repo.index(&m, 0).unwrap().ids, expected, "keyed IDs");
    assert_ne!(expected, plain_ids(&bytes));
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    let out = dir.path().join("out.raw");
    repo.restore_disk(&m.id, 0, &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    // Digests handed to it anyway are ignored: the chunk is named by its keyed hash.
    let b = repo
        .begin(None, vec![DiskSpec { name: "d".into(), capacity: MIB, change_id: None, committed: None, label: None }])
        .unwrap();
    let sink = b.sink(0).unwrap();
    assert!(!sink.uses_digests());
    let data = vec![0x33; MIB as usize];
    sink.write_at_digested(0, Bytes::from(data.clone()), &[*blake3::hash(&data).as_bytes()]).await.unwrap();
    sink.commit().await.unwrap();
    let m = b.finish(SourceInfo { name: "d".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    assert_eq!(repo.index(&m, 0).unwrap().ids, [keyed.chunk_id(&data)]);
    assert!(repo.verify().unwrap().damaged_points.is_empty());
}

#[test]
fn hashing_again_turns_the_use_of_digests_off() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::init(dir.path().join("r"), 1 << 20).unwrap();
    let b = repo
        .begin(None, vec![DiskSpec { name: "d".into(), capacity: MIB, change_id: None, committed: None, label: None }]);
    let sink = b.unwrap().sink(0).unwrap();
    assert!(sink.uses_digests());
    sink.hash_chunks_again();
    assert!(!sink.uses_digests());
}
