//! Crash safety, on the crash-simulating file system: a power cut at every kind of step of an
//! init, a full and an incremental backup, then a prune and a gc, never damages a restore point
//! whose manifest survives, never loses an earlier one, and leaves a repository that opens,
//! verifies clean, collects its garbage and takes the next backup. The loop's length scales
//! with `SYNCPROXY_SOAK_SCALE`.

use std::sync::Arc;
use std::time::Duration;

mod common;

use durable::crashfs::{CrashFs, Forgetful, Skip};
use repo::{Fs, LocalStore, Manifest, Repo, RepoError, Retention, Store};

const CHUNK: u32 = 64 << 10;

fn image(len: usize, seed: u64) -> Vec<u8> {
    common::image(len, CHUNK as usize, seed)
}

fn store(fs: &Arc<CrashFs>) -> Arc<dyn Store> {
    Arc::new(LocalStore::with_fs("/repo", fs.clone()))
}

async fn backup(repo: &Repo, parent: Option<&str>, data: &[u8]) -> Result<Manifest, String> {
    common::backup_bytes(repo, parent, data).await
}

/// The whole sequence under test; stops at the first error (the power cut). `made` gets each
/// restore point whose backup reported success, and loses the one prune removed.
async fn sequence(fs: &Arc<CrashFs>, a: &[u8], b: &[u8], made: &mut Vec<String>) -> Result<(), String> {
    fs.create_dir("/repo".as_ref()).map_err(|e| e.to_string())?;
    fs.sync_dir("/".as_ref()).map_err(|e| e.to_string())?;
    let repo = Repo::init_in(store(fs), CHUNK).map_err(|e| e.to_string())?;
    let first = backup(&repo, None, a).await?;
    made.push(first.id.clone());
    let second = backup(&repo, Some(&first.id), b).await?;
    made.push(second.id.clone());
    repo.prune(&Retention { last: 1, ..Default::default() }, false).map_err(|e| e.to_string())?;
    made.remove(0);
    fs.advance(Duration::from_secs(3600));
    repo.gc(Duration::ZERO, false).map_err(|e| e.to_string())?;
    Ok(())
}

/// After the power comes back: the crashed process is gone (its lock files are removed here,
/// as the PID check does on a real host), and whatever exists must be whole.
async fn check(fs: &Arc<CrashFs>, a: &[u8], b: &[u8], c: &[u8], cut: u64, made: &[String]) {
    let s = store(fs);
    for l in s.list("locks").unwrap() {
        s.delete(&format!("locks/{}", l.name)).unwrap();
    }
    let repo = match Repo::open_in(s) {
        Ok(r) => r,
        Err(RepoError::NotFound(_)) if made.is_empty() => return, // the cut came before init finished
        Err(e) => panic!("cut at {cut}: the repository does not open: {e}"),
    };
    let points = repo.points().unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
    for id in made {
        assert!(points.iter().any(|p| p.id == *id), "cut at {cut}: restore point {id} was made, then lost");
    }
    let report = repo.verify().unwrap();
    assert!(report.damaged_points.is_empty(), "cut at {cut}: {report:?}");
    for p in &points {
        let got = repo.reader(&p.id, 0).unwrap().read(0, a.len() as u64).unwrap();
        assert!(got == a || got == b, "cut at {cut}: {} restores to neither image", p.id);
    }
    // Garbage is collectable and the repository takes the next backup, which restores.
    fs.advance(Duration::from_secs(3600));
    repo.gc(Duration::ZERO, false).unwrap_or_else(|e| panic!("cut at {cut}: gc: {e}"));
    let parent = points.last().map(|p| p.id.clone());
    let m = backup(&repo, parent.as_deref(), c).await.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
    assert_eq!(repo.reader(&m.id, 0).unwrap().read(0, c.len() as u64).unwrap(), c, "cut at {cut}");
    for p in &points {
        let got = repo.reader(&p.id, 0).unwrap().read(0, a.len() as u64).unwrap();
        assert!(got == a || got == b, "cut at {cut}: {} damaged by the gc or the next backup", p.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_at_any_step_damages_no_restore_point() {
    let len = 16 * CHUNK as usize + 4096;
    let a = image(len, 1);
    // The incremental changes a few chunks and shares the rest.
    let mut b = a.clone();
    b[5 * CHUNK as usize..6 * CHUNK as usize].copy_from_slice(&image(CHUNK as usize, 7));
    b[len - 10..].fill(0xEE);
    let c = image(len, 3);

    let whole = Arc::new(CrashFs::new());
    sequence(&whole, &a, &b, &mut Vec::new()).await.unwrap();
    let total = whole.steps();
    assert!(total > 100, "the sequence takes {total} steps");

    let scale: u64 = std::env::var("SYNCPROXY_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    // Every step once, then random ones.
    let mut cuts: Vec<u64> = (0..total).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..200 * scale {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cuts.push(x % total);
    }
    let mut survived = 0;
    for cut in cuts {
        let fs = Arc::new(CrashFs::new());
        fs.cut_after(cut);
        // A cut in the last steps (releasing gc's lock, which only warns) lets it finish.
        let mut made = Vec::new();
        let _ = sequence(&fs, &a, &b, &mut made).await;
        fs.crash();
        check(&fs, &a, &b, &c, cut, &made).await;
        survived += 1;
    }
    eprintln!("{survived} power cuts over a sequence of {total} steps; every surviving restore point whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulation_catches_a_store_that_skips_an_fsync() {
    // A file system that drops directory fsyncs: the sequence then loses restore points it
    // reported as made, and the check must notice. This proves the loop above can fail.
    let fs = Arc::new(CrashFs::new());
    fs.create_dir("/repo".as_ref()).unwrap();
    fs.sync_dir("/".as_ref()).unwrap();
    let repo = Repo::init_in(
        Arc::new(LocalStore::with_fs("/repo", Forgetful { fs: fs.clone(), skip: Skip::DirSyncs })),
        CHUNK,
    )
    .unwrap();
    let m = backup(&repo, None, &image(4 * CHUNK as usize, 1)).await.unwrap();
    drop(repo);
    fs.crash();
    let after = Repo::open_in(store(&fs)).map(|r| r.reader(&m.id, 0).and_then(|p| p.read(0, p.size())).is_ok());
    assert!(!matches!(after, Ok(true)), "a restore point made without directory fsyncs survived a power cut");
}
