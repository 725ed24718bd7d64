//! The repository on a real S3 server (SeaweedFS on 127.0.0.1): a copy from a local,
//! unencrypted repository to an encrypted one on S3 (chunks re-encoded under its key) that is
//! interrupted and resumes sending only what is missing; restore points that read back
//! byte for byte from S3; backups, locks, verify, prune and gc on S3; create-only chunk writes.

#![cfg(feature = "s3")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use repo::{Entry, Location, LockKind, Repo, RepoError, RepoKey, Retention, S3Config, Store};

const CHUNK: u32 = 64 << 10;

/// A store that fails every create after the first `left`, as a dropped connection would.
#[derive(Debug)]
struct Interrupted {
    inner: Arc<dyn Store>,
    left: AtomicU64,
}

impl Store for Interrupted {
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, durable::Error> {
        if self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
            let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset (simulated)");
            return Err(durable::Error::Remote { what: name.to_owned(), source: reset });
        }
        self.inner.put_new(name, data)
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<(), durable::Error> {
        self.inner.put(name, data)
    }
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, durable::Error> {
        self.inner.get(name)
    }
    fn exists(&self, name: &str) -> Result<bool, durable::Error> {
        self.inner.exists(name)
    }
    fn list(&self, dir: &str) -> Result<Vec<Entry>, durable::Error> {
        self.inner.list(dir)
    }
    fn delete(&self, name: &str) -> Result<(), durable::Error> {
        self.inner.delete(name)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_s3_resumes_and_the_repository_works_on_s3() {
    const TEST: &str = "copy_to_s3_resumes_and_the_repository_works_on_s3";
    let Some(bin) = testkit::s3::find(TEST) else { return };
    let dir = tempfile::tempdir().unwrap();
    let weed = testkit::s3::Weed::start(&bin, &dir.path().join("weed"), "backups");
    let s3 = S3Config {
        endpoint: Some(weed.endpoint.clone()),
        access_key: Some(testkit::s3::ACCESS_KEY.into()),
        secret_key: Some(testkit::s3::SECRET_KEY.into()),
        region: None,
        allow_http: false,
        request_retries: None,
        request_timeout: None,
    };
    let key = RepoKey::generate().unwrap();
    let at = |prefix: &str| Location {
        url: format!("s3://{}/{prefix}", weed.bucket),
        s3: s3.clone(),
        key: Some(key.clone()),
    };

    // The bucket can take a moment after the port answers.
    let probe = at("probe").store().unwrap();
    let mut tries = 0;
    while let Err(e) = probe.put("ready", b"1") {
        tries += 1;
        assert!(tries < 100, "the bucket never became writable: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A local repository with two restore points.
    let len = 20 * CHUNK as usize + 777;
    let a = common::image(len, CHUNK as usize, 1);
    let mut b = a.clone();
    b[..CHUNK as usize].fill(0x5A);
    let local = Repo::init(dir.path().join("local"), CHUNK).unwrap();
    let pa = common::backup_bytes(&local, None, &a).await.unwrap();
    let pb = common::backup_bytes(&local, Some(&pa.id), &b).await.unwrap();

    // The copy to S3 is cut after 5 chunks: no restore point appears there.
    let remote = Repo::init_at(&at("offsite"), CHUNK).unwrap();
    assert!(matches!(Repo::init_at(&at("offsite"), CHUNK), Err(RepoError::Invalid(_))), "init twice");
    let cut: Arc<dyn Store> = Arc::new(Interrupted { inner: remote.store().clone(), left: AtomicU64::new(5) });
    let flaky = Repo::open_with(cut, Some(&key)).unwrap();
    let e = local.copy_to(&flaky, None).unwrap_err();
    assert!(e.to_string().contains("connection reset"), "{e}");
    assert!(remote.points().unwrap().is_empty(), "an interrupted copy shows no restore point");

    // Run again: only what is missing is sent.
    let report = local.copy_to(&remote, None).unwrap();
    assert_eq!(report.points_copied, vec![pa.id.clone(), pb.id.clone()]);
    assert_eq!(report.chunks_present, 5, "{report:?}");
    let chunks_in_a = a.chunks(CHUNK as usize).filter(|c| c.iter().any(|&x| x != 0)).count() as u64;
    assert_eq!(report.chunks_copied + report.chunks_present, chunks_in_a + 1, "{report:?}");
    let again = local.copy_to(&remote, None).unwrap();
    assert_eq!((again.points_present, again.chunks_copied), (2, 0), "{again:?}");

    // Without its key the S3 copy cannot be opened; with it, both restore points read back
    // exactly, and verify clean there.
    let keyless = Location { key: None, ..at("offsite") };
    assert!(matches!(Repo::open_at(&keyless), Err(RepoError::KeyNeeded(_))));
    let remote = Repo::open_at(&at("offsite")).unwrap();
    assert_eq!(remote.reader(&pa.id, 0).unwrap().read(0, len as u64).unwrap(), a);
    assert_eq!(remote.reader(&pb.id, 0).unwrap().read(0, len as u64).unwrap(), b);
    let v = remote.verify().unwrap();
    assert!(v.damaged_points.is_empty() && v.chunks_checked == chunks_in_a + 1, "{v:?}");

    // Chunks are create-only on S3 too.
    // (The copy's manifest, not the local one: re-encoding changed the index.)
    let pa_remote = remote.point(&pa.id).unwrap();
    assert_ne!(pa_remote.disks[0].index_blake3, pa.disks[0].index_blake3);
    let some = repo::chunk_name(&remote.index(&pa_remote, 0).unwrap().ids[0]);
    let before = remote.store().get(&some).unwrap().unwrap();
    assert!(!remote.store().put_new(&some, b"overwrite?").unwrap());
    assert_eq!(remote.store().get(&some).unwrap().unwrap(), before);

    // A backup straight to S3, under a shared lock that keeps gc out.
    let mut c = b.clone();
    c[3 * CHUNK as usize..4 * CHUNK as usize].fill(0x77);
    let guard = remote.lock(LockKind::Shared, "a test's backup").unwrap();
    let e = remote.gc(Duration::ZERO, false).unwrap_err().to_string();
    assert!(e.contains("a test's backup"), "{e}");
    drop(guard);
    let pc = common::backup_bytes(&remote, Some(&pb.id), &c).await.unwrap();
    assert_eq!(pc.disks[0].stored_chunks, 1);

    // Prune to the last one and collect: it still reads back exactly, and verifies clean.
    let pruned = remote.prune(&Retention { last: 1, ..Default::default() }, false).unwrap();
    assert_eq!(pruned.removed, vec![pa.id.clone(), pb.id.clone()]);
    let gc = remote.gc(Duration::ZERO, false).unwrap();
    assert_eq!(gc.chunks_removed, 2, "the first chunk of a and b and the fourth of b: {gc:?}");
    assert_eq!(remote.reader(&pc.id, 0).unwrap().read(0, len as u64).unwrap(), c);
    assert!(remote.verify().unwrap().damaged_points.is_empty());
    let left = remote.store().list("locks").unwrap();
    assert!(left.is_empty(), "every lock released: {left:?}");
}
