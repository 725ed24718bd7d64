//! Backups into a repository on S3 (SeaweedFS on 127.0.0.1) through the copy engine. The
//! server stops mid-backup and starts again on the same port and data: object_store's own
//! retries are turned off, so the engine retries the transient write failures, and the backup
//! completes, verifies and reads back byte for byte. Chunk writes that the server refuses (wrong
//! credentials) fail at once, with their kind and the bytes they
//! concerned. In a file of its own: SeaweedFS listens on fixed ports, so two tests of one
//! binary cannot each run one at the same time.

#![cfg(feature = "s3")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cbt::ExtentSet;
use pipeline::conformance::{MemSource, pattern};
use pipeline::limit::RateLimiter;
use pipeline::progress::Progress;
use pipeline::{BlockSink, BlockSource, CopyOptions, Digests, DiskCopy, Engine, ErrorKind, copy_disk};
use repo::{Consistency, DiskSpec, Entry, Location, Repo, S3Config, S3Store, SourceInfo, Store};

const CHUNK: u32 = 64 << 10;
const TEST: &str = "backups_to_s3_outlast_a_server_restart_and_refusals_fail_at_once";

fn s3(endpoint: &str, secret: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.to_owned()),
        access_key: Some(testkit::s3::ACCESS_KEY.into()),
        secret_key: Some(secret.to_owned()),
        request_retries: Some(0),
        request_timeout: None,
        ..S3Config::default()
    }
}

/// A copy of `data` into disk 0 of a new backup in `repo`.
fn backup(repo: &Repo, data: &[u8]) -> (repo::Backup, Arc<dyn BlockSink>, DiskCopy) {
    let size = data.len() as u64;
    let b = repo
        .begin(None, vec![DiskSpec { name: "d".into(), capacity: size, change_id: None, committed: None, label: None }])
        .unwrap();
    let sink: Arc<dyn BlockSink> = b.sink(0).unwrap();
    let source: Arc<dyn BlockSource> = Arc::new(MemSource::new(data.to_vec()));
    let job = DiskCopy {
        read: ExtentSet::full(size),
        zero: ExtentSet::new(),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(u64::from(CHUNK), size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    (b, sink, job)
}

/// A store whose chunk writes (and the existence checks before them) go to `chunks`, and
/// everything else to `rest`: a repository that opens and registers its backup fine, and
/// whose chunks then meet what `chunks` answers.
#[derive(Debug)]
struct ChunksElsewhere {
    rest: Arc<dyn Store>,
    chunks: Arc<dyn Store>,
}

impl Store for ChunksElsewhere {
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, durable::Error> {
        self.chunks.put_new(name, data)
    }
    fn put(&self, name: &str, data: &[u8]) -> Result<(), durable::Error> {
        self.rest.put(name, data)
    }
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, durable::Error> {
        self.rest.get(name)
    }
    fn exists(&self, name: &str) -> Result<bool, durable::Error> {
        self.chunks.exists(name)
    }
    fn list(&self, dir: &str) -> Result<Vec<Entry>, durable::Error> {
        self.rest.list(dir)
    }
    fn delete(&self, name: &str) -> Result<(), durable::Error> {
        self.rest.delete(name)
    }
    fn describe(&self) -> String {
        self.rest.describe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_to_s3_outlast_a_server_restart_and_refusals_fail_at_once() {
    let Some(bin) = testkit::s3::find(TEST) else { return };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("weed");
    let weed = testkit::s3::Weed::start(&bin, &data_dir, "backups");
    let endpoint = weed.endpoint.clone();
    let at = Location {
        url: format!("s3://{}/restart", weed.bucket),
        s3: s3(&endpoint, testkit::s3::SECRET_KEY),
        key: None,
    };
    // The bucket can take a moment after the port answers.
    let mut tries = 0;
    let repo = loop {
        match Repo::init_at(&at, CHUNK) {
            Ok(r) => break r,
            Err(e) => {
                tries += 1;
                assert!(tries < 100, "the bucket never became writable: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // Chunk writes with a wrong secret key: refused (fatal), not retried, and the message
    // names the kind and the bytes of the request.
    let size = 4 << 20;
    let data = pattern(size, 21);
    let chunks = S3Store::open(&format!("s3://{}/restart", weed.bucket), &s3(&endpoint, "not-the-secret")).unwrap();
    let refused = Arc::new(ChunksElsewhere { rest: repo.store().clone(), chunks: Arc::new(chunks) });
    let (_b, _, job) = backup(&Repo::open_with(refused, None).unwrap(), &data);
    let options = CopyOptions { request_size: 1 << 20, in_flight: 1, ..CopyOptions::default() };
    let e = copy_disk(job, &Engine::new(64 << 20), &options, Arc::default()).await.unwrap_err();
    let text = e.to_string();
    // The first write (a run of the first request's blocks) fails, and only it.
    assert_eq!((e.kind(), e.attempts(), e.range().map(|r| r.0)), (ErrorKind::Fatal, None, Some(0)), "{text}");
    assert!(text.contains("at bytes 0+") && text.contains("403") && text.ends_with("(fatal)"), "{text}");

    // 8 MiB at 1 MiB/s: the server stops once 2 MiB are written, and starts again a second
    // later on the same port and data.
    let size = 8 << 20;
    let data = pattern(size, 22);
    let (b, sink, job) = backup(&repo, &data);
    let progress = Arc::new(Progress::default());
    let watch = progress.clone();
    let restart = std::thread::spawn(move || {
        let start = Instant::now();
        while watch.snapshot().written < 2 << 20 {
            assert!(start.elapsed() < Duration::from_secs(60), "the backup never got going");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(weed);
        // Another test's server on the same fixed port (another checkout's, on a shared
        // machine) would serve the writes: nothing here would have gone down.
        let other = std::net::TcpStream::connect("127.0.0.1:8333").is_ok();
        std::thread::sleep(Duration::from_secs(1));
        (testkit::s3::Weed::start(&bin, &data_dir, "backups"), other)
    });
    let options = CopyOptions {
        request_size: 1 << 20,
        in_flight: 2,
        job_rate: Some(Arc::new(RateLimiter::new(1 << 20))),
        retry_for: Duration::from_secs(90),
        ..CopyOptions::default()
    };
    let r = copy_disk(job, &Engine::new(64 << 20), &options, progress).await;
    let (_weed, other) = restart.join().unwrap();
    if other {
        testkit::skip(TEST, "something else still answered on 127.0.0.1:8333 once SeaweedFS stopped");
        return;
    }
    let r = r.unwrap();
    assert!(r.retries > 0, "no write failed while the server was down? {r:?}");
    sink.commit().await.unwrap();
    let point = b.finish(SourceInfo { name: "vm".into(), instance_uuid: None }, Consistency::Crash).unwrap();
    let v = repo.verify().unwrap();
    assert!(v.damaged_points.is_empty() && v.bad_chunks.is_empty() && v.chunks_checked > 0, "{v:?}");
    let back = repo.reader(&point.id, 0).unwrap().read(0, size as u64).unwrap();
    assert!(back == data, "the restore point differs");
}
