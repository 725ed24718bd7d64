//! Crash safety of a replica's sync state, on the crash-simulating file system: a power cut at
//! every step of two syncs' state writes (dirty mark, checkpoint, commit, twice) leaves a state
//! that reads as nothing, the first commit or the second, never a mix or garbage: a consistent
//! state's digests are its own commit's, a checkpoint has its digests beside it, a commit that
//! returned is never lost, and the store takes the next commit.

use std::sync::Arc;

use cbt::{ChangeId, CommittedDisk, DiskPosition, ExtentSet};
use durable::crashfs::{CrashFs, Forgetful, Skip};
use durable::{Fs, LocalStore};
use pipeline::{Digests, Durable, SaveCheckpoint};
use replica::state::{CheckpointTo, StateStore, SyncKey};

const G: u64 = 1 << 20;
const CAPACITY: u64 = 8 * G + 4096;

fn key() -> SyncKey {
    SyncKey { vcenter: "vc-1".into(), vm: "vm-1".into(), disk: "2000".into(), destination: "/replicas/vm.raw".into() }
}

fn committed(seq: u32) -> CommittedDisk {
    CommittedDisk {
        change_id: Some(ChangeId::parse(&format!("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/{seq}"))),
        capacity: CAPACITY,
        hardware_version: 14,
        position: DiskPosition { controller: "scsi".into(), bus: 0, unit: 0 },
        backing: "[ds1] vm/vm.vmdk".into(),
        host_version: None,
        taint: None,
    }
}

/// Digests that differ per `seed`, so a mix of two commits shows.
fn digests(seed: u8) -> Digests {
    let mut d = Digests::zeros(G, CAPACITY);
    for (n, b) in d.blocks.iter_mut().enumerate() {
        *b = *blake3::hash(&[seed, u8::try_from(n).unwrap()]).as_bytes();
    }
    d
}

fn state_on(fs: impl Fs + 'static) -> StateStore {
    StateStore::in_store(Arc::new(LocalStore::with_fs("/state", fs)))
}

/// How far the sequence got: each commit that returned.
#[derive(Debug, Default)]
struct Made {
    first: bool,
    second: bool,
}

/// Two syncs' state writes, as `replicate::sync` makes them; stops at the first error (the
/// power cut).
fn sequence(fs: &Arc<CrashFs>, open: &dyn Fn(Arc<CrashFs>) -> StateStore, made: &mut Made) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    fs.create_dir("/state".as_ref()).map_err(|x| e(&x))?;
    fs.sync_dir("/".as_ref()).map_err(|x| e(&x))?;
    let store = open(fs.clone());
    for (seq, job, made) in [(1u8, "j1", &mut made.first), (2, "j2", &mut made.second)] {
        store.mark_dirty(&key(), G, job).map_err(|x| e(&x))?;
        let cp = CheckpointTo { store: store.clone(), key: key(), job: job.into(), fresh: seq == 1 };
        let durable =
            Durable { source: format!("snap-{seq}"), plan: "p".into(), done: ExtentSet::from_ranges([(0, G)]) };
        cp.save(&durable, &digests(seq + 100)).map_err(|x| e(&x))?;
        store.commit(&key(), committed(seq.into()), G, Some(&digests(seq))).map_err(|x| e(&x))?;
        *made = true;
    }
    Ok(())
}

/// What must hold after the power comes back.
fn check(store: &StateStore, made: &Made) -> Result<(), String> {
    let state = store.load(&key()).map_err(|e| format!("the state does not read: {e}"))?;
    let digests_now = store.load_digests(&key()).map_err(|e| format!("the digests do not read: {e}"))?;
    store.load_checkpoint(&key()).map_err(|e| format!("the checkpoint does not read: {e}"))?;
    let commit = match state.as_ref().and_then(|s| s.committed.as_ref()) {
        None => 0,
        Some(c) if *c == committed(1) => 1,
        Some(c) if *c == committed(2) => 2,
        Some(c) => return Err(format!("a commit that was never made: {c:?}")),
    };
    if made.second && commit != 2 || made.first && commit == 0 {
        return Err(format!("a commit that returned was lost (the state holds commit {commit}, {made:?})"));
    }
    let consistent = state.as_ref().is_some_and(|s| s.consistent());
    if consistent && digests_now != Some(digests(u8::try_from(commit).unwrap())) {
        return Err(format!("commit {commit} is consistent but its digests are not its own"));
    }
    if let Some(d) = &digests_now
        && *d != digests(1)
        && *d != digests(2)
    {
        return Err("digests of neither commit".into());
    }
    Ok(())
}

#[test]
fn a_power_cut_at_any_step_leaves_the_old_commit_or_the_new() {
    let real: &dyn Fn(Arc<CrashFs>) -> StateStore = &|fs| state_on(fs);
    let whole = Arc::new(CrashFs::new());
    sequence(&whole, real, &mut Made::default()).unwrap();
    let total = whole.steps();
    assert!(total > 20, "the sequence takes {total} steps");
    for cut in 0..=total {
        let fs = Arc::new(CrashFs::new());
        fs.cut_after(cut);
        let mut made = Made::default();
        let finished = sequence(&fs, real, &mut made).is_ok();
        assert_eq!(finished, cut == total, "cut at {cut} of {total}");
        fs.crash();
        if !fs.exists("/state".as_ref()) {
            assert!(!made.first, "cut at {cut}: the state directory was lost after a commit");
            continue;
        }
        let store = state_on(fs.clone());
        check(&store, &made).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        // The store takes the next sync: temporary files a cut left are only clutter.
        store.mark_dirty(&key(), G, "j3").unwrap();
        store.commit(&key(), committed(3), G, Some(&digests(3))).unwrap();
        assert_eq!(store.load(&key()).unwrap().unwrap().committed, Some(committed(3)), "cut at {cut}");
        assert_eq!(store.load_digests(&key()).unwrap(), Some(digests(3)), "cut at {cut}");
        assert!(store.load_checkpoint(&key()).unwrap().is_none(), "cut at {cut}");
    }
}

#[test]
fn the_simulation_catches_state_written_without_fsyncs() {
    // A file system that drops file fsyncs: a state renamed into place comes back empty after a
    // power cut, and the check must notice. This proves the loop above can fail.
    let fs = Arc::new(CrashFs::new());
    let mut made = Made::default();
    sequence(&fs, &|fs| state_on(Forgetful { fs, skip: Skip::FileSyncs }), &mut made).unwrap();
    fs.crash();
    let err = check(&state_on(fs), &made).unwrap_err();
    assert!(err.contains("does not read"), "{err}");
}
