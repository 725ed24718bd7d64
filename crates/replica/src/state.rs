//! Sync state, one concept for every destination: what a destination durably holds of one
//! disk, keyed by (vCenter, VM, disk, destination), plus the per-block digests and the
//! checkpoints of copies in progress. Files are written through a `durable` store (tmp +
//! fsync + rename, directory synced), so a crash leaves each file old or new, never torn.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cbt::{CommittedDisk, ExtentSet};
use durable::{LocalStore, Store};
use pipeline::{BlockError, Digests, Durable, SaveCheckpoint};
use serde::{Deserialize, Serialize};

/// The format of state and checkpoint files; a newer one is refused, not misread.
pub const STATE_FORMAT: u32 = 1;

/// Whose state this is. Two destinations of one disk (a repository and a replica) have two keys
/// and two states that never mix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SyncKey {
    /// The vCenter's instance UUID (or `local` for copies that do not come from vSphere).
    pub vcenter: String,
    /// The VM's instance UUID (empty for a bare disk).
    pub vm: String,
    /// The disk's identity within the VM (its device key or backing), or a source path.
    pub disk: String,
    /// The destination: a replica path, an NBD URI, a repository.
    pub destination: String,
}

impl SyncKey {
    /// The file name stem the key is stored under: a digest, so any key is a safe name.
    pub fn stem(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        blake3::hash(text.as_bytes()).to_hex()[..32].to_owned()
    }
}

/// A copy in progress that has written to the destination: until it commits, the destination
/// does not hold a consistent image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirty {
    /// The job that is writing.
    pub job: String,
    /// When it started writing (seconds since the Unix epoch).
    pub since: u64,
}

/// What a destination durably holds of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// Whose state.
    pub key: SyncKey,
    /// The facts of the last committed copy (its change ID, capacity, ...), `None` before the
    /// first commit.
    pub committed: Option<CommittedDisk>,
    /// When the last commit happened (seconds since the Unix epoch).
    pub committed_at: Option<u64>,
    /// The digest unit in bytes.
    pub granularity: u64,
    /// Set before the first write of a copy, cleared by its commit.
    pub dirty: Option<Dirty>,
}

impl SyncState {
    /// A state with nothing committed.
    pub fn new(key: SyncKey, granularity: u64) -> Self {
        Self { format: STATE_FORMAT, key, committed: None, committed_at: None, granularity, dirty: None }
    }

    /// Whether the destination holds a complete image of the last committed copy.
    pub fn consistent(&self) -> bool {
        self.committed.is_some() && self.dirty.is_none()
    }
}

/// What a copy in progress has made durable, so a restart of the same job on the same frozen
/// source continues from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// Whose copy.
    pub key: SyncKey,
    /// The job.
    pub job: String,
    /// The source's frozen identity ([`pipeline::BlockSource::identity`]).
    pub source: String,
    /// A digest of the plan; a different plan cannot reuse the progress of another.
    pub plan: String,
    /// The ranges already durable on the destination, as `(start, length)`.
    pub done: Vec<(u64, u64)>,
    /// Whether the destination read as zeros when the job started (so the plan wrote no
    /// zeros); a resumed copy plans the same way although the destination now holds data.
    pub fresh: bool,
}

impl Checkpoint {
    /// The done ranges as a set.
    pub fn done_set(&self) -> ExtentSet {
        ExtentSet::from_ranges(self.done.iter().copied())
    }
}

/// A directory of sync states, digests and checkpoints.
#[derive(Debug, Clone)]
pub struct StateStore {
    store: Arc<dyn Store>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl StateStore {
    /// A store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BlockError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| BlockError::io(format!("creating state directory {}", dir.display()), e))?;
        Ok(Self::in_store(Arc::new(LocalStore::new(dir))))
    }

    /// The states in `store` (a directory on the real file system, or in tests on the
    /// crash-simulating one).
    pub fn in_store(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// A state file's name in the store.
    fn name(key: &SyncKey, suffix: &str) -> String {
        format!("{}.{suffix}", key.stem())
    }

    /// A state file's path, for messages.
    fn path(&self, name: &str) -> PathBuf {
        Path::new(&self.store.describe()).join(name)
    }

    /// Runs a store call, saying what it was doing on which file when it fails.
    fn call<T>(&self, what: &str, name: &str, r: Result<T, durable::Error>) -> Result<T, BlockError> {
        r.map_err(|e| match e {
            durable::Error::Io { path, source } => BlockError::io(format!("{what} {}", path.display()), source),
            e => BlockError::state(&self.path(name), format!("{what}: {e}")),
        })
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, BlockError> {
        let path = &self.path(name);
        let Some(bytes) = self.call("reading", name, self.store.get(name))? else { return Ok(None) };
        let format = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| BlockError::state(path, format!("not JSON: {e}")))?
            .get("format")
            .and_then(serde_json::Value::as_u64);
        match format {
            Some(f) if f == u64::from(STATE_FORMAT) => {}
            Some(f) => {
                return Err(BlockError::state(
                    path,
                    format!("format {f}, but this build reads format {STATE_FORMAT}; use a newer syncproxy"),
                ));
            }
            None => return Err(BlockError::state(path, "no format number")),
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| BlockError::state(path, e.to_string()))
    }

    fn check_key(path: &Path, found: &SyncKey, key: &SyncKey) -> Result<(), BlockError> {
        if found != key {
            return Err(BlockError::state(path, format!("holds {found:?}, not {key:?}")));
        }
        Ok(())
    }

    /// The state of `key`, if any.
    pub fn load(&self, key: &SyncKey) -> Result<Option<SyncState>, BlockError> {
        let name = Self::name(key, "state.json");
        let state: Option<SyncState> = self.read_json(&name)?;
        if let Some(s) = &state {
            Self::check_key(&self.path(&name), &s.key, key)?;
        }
        Ok(state)
    }

    /// The committed digests of `key`, if any.
    pub fn load_digests(&self, key: &SyncKey) -> Result<Option<Digests>, BlockError> {
        self.read_digests(&Self::name(key, "digests"))
    }

    fn read_digests(&self, name: &str) -> Result<Option<Digests>, BlockError> {
        match self.call("reading", name, self.store.get(name))? {
            Some(b) => Digests::decode(&b).map(Some).map_err(|message| BlockError::state(&self.path(name), message)),
            None => Ok(None),
        }
    }

    /// Records that `job` is about to write to the destination: call before its first write.
    pub fn mark_dirty(&self, key: &SyncKey, granularity: u64, job: &str) -> Result<SyncState, BlockError> {
        let mut state = self.load(key)?.unwrap_or_else(|| SyncState::new(key.clone(), granularity));
        state.dirty = Some(Dirty { job: job.to_owned(), since: now() });
        self.save(&state)?;
        Ok(state)
    }

    /// Records a completed copy. Call only once the sink's commit has made the data durable:
    /// the digests are written first, then the state that refers to them. A copy without
    /// digests removes stale ones, so they never describe other data.
    pub fn commit(
        &self,
        key: &SyncKey,
        committed: CommittedDisk,
        granularity: u64,
        digests: Option<&Digests>,
    ) -> Result<SyncState, BlockError> {
        let name = Self::name(key, "digests");
        match digests {
            Some(d) => self.call("writing", &name, self.store.put(&name, &d.encode()))?,
            None => self.call("removing", &name, self.store.delete(&name))?,
        }
        let state = SyncState {
            format: STATE_FORMAT,
            key: key.clone(),
            committed: Some(committed),
            committed_at: Some(now()),
            granularity,
            dirty: None,
        };
        self.save(&state)?;
        self.drop_checkpoint(key)?;
        self.sweep_temps(key);
        Ok(state)
    }

    /// Removes the temporary files that writers of `key`'s files left when they were killed
    /// between writing and renaming (their process is gone): never read, but nothing else would
    /// ever collect them. Best effort: litter left behind costs a few bytes, nothing more.
    fn sweep_temps(&self, key: &SyncKey) {
        let own = format!("{}.", key.stem());
        let Ok(entries) = self.store.list_all("") else { return };
        for e in entries {
            if let Some((pid, name)) = durable::temp_writer(&e.name)
                && name.starts_with(&own)
                && !durable::process_alive(pid)
            {
                let _ = self.store.delete(&e.name);
            }
        }
    }

    fn save(&self, state: &SyncState) -> Result<(), BlockError> {
        let json =
            serde_json::to_vec_pretty(state).map_err(|e| BlockError::fatal("encoding sync state").with_source(e))?;
        let name = Self::name(&state.key, "state.json");
        self.call("writing", &name, self.store.put(&name, &json))
    }

    /// The checkpoint of an interrupted copy to `key`, with the digests it had computed.
    pub fn load_checkpoint(&self, key: &SyncKey) -> Result<Option<(Checkpoint, Digests)>, BlockError> {
        let name = Self::name(key, "checkpoint.json");
        let Some(cp) = self.read_json::<Checkpoint>(&name)? else { return Ok(None) };
        Self::check_key(&self.path(&name), &cp.key, key)?;
        let dname = Self::name(key, "checkpoint.digests");
        match self.read_digests(&dname)? {
            Some(d) => Ok(Some((cp, d))),
            None => Err(BlockError::state(&self.path(&dname), "missing beside its checkpoint")),
        }
    }

    /// Saves a checkpoint. The caller has flushed the sink first, so everything in `done` is
    /// durable. The digests go first: a checkpoint never names digests that were not written.
    pub fn save_checkpoint(&self, cp: &Checkpoint, digests: &Digests) -> Result<(), BlockError> {
        let dname = Self::name(&cp.key, "checkpoint.digests");
        self.call("writing", &dname, self.store.put(&dname, &digests.encode()))?;
        let json = serde_json::to_vec(cp).map_err(|e| BlockError::fatal("encoding a checkpoint").with_source(e))?;
        let name = Self::name(&cp.key, "checkpoint.json");
        self.call("writing", &name, self.store.put(&name, &json))
    }

    /// Forgets a checkpoint (after a commit, or when its snapshot is gone).
    pub fn drop_checkpoint(&self, key: &SyncKey) -> Result<(), BlockError> {
        for suffix in ["checkpoint.json", "checkpoint.digests"] {
            let name = Self::name(key, suffix);
            self.call("removing", &name, self.store.delete(&name))?;
        }
        Ok(())
    }
}

/// Checkpoints kept in a [`StateStore`], beside the destination's sync state.
#[derive(Debug, Clone)]
pub struct CheckpointTo {
    /// The store.
    pub store: StateStore,
    /// The destination's key.
    pub key: SyncKey,
    /// The job.
    pub job: String,
    /// Whether the destination read as zeros when the job started.
    pub fresh: bool,
}

impl SaveCheckpoint for CheckpointTo {
    fn save(&self, durable: &Durable, digests: &Digests) -> Result<(), BlockError> {
        let cp = Checkpoint {
            format: STATE_FORMAT,
            key: self.key.clone(),
            job: self.job.clone(),
            source: durable.source.clone(),
            plan: durable.plan.clone(),
            done: durable.done.iter().map(|e| (e.start(), e.len())).collect(),
            fresh: self.fresh,
        };
        self.store.save_checkpoint(&cp, digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn key(d: &str) -> SyncKey {
        SyncKey { vcenter: "vc".into(), vm: "vm".into(), disk: "2000".into(), destination: d.into() }
    }

    #[test]
    fn a_commit_removes_what_killed_writers_of_its_own_files_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let (mine, other) = (key("/replicas/a.raw"), key("/replicas/b.raw"));
        // PIDs above Linux's limit (2^22) belong to no process; ours is alive.
        let dead_mine = format!(".tmp-4000000000-3-{}.checkpoint.json", mine.stem());
        let live_mine = format!(".tmp-{}-4-{}.checkpoint.json", std::process::id(), mine.stem());
        let dead_other = format!(".tmp-4000000000-5-{}.checkpoint.json", other.stem());
        for name in [&dead_mine, &live_mine, &dead_other] {
            fs::write(dir.path().join(name), b"{").unwrap();
        }
        store.mark_dirty(&mine, 1 << 20, "job-1").unwrap();
        let committed = cbt::CommittedDisk {
            change_id: None,
            capacity: 1 << 20,
            hardware_version: 14,
            position: cbt::DiskPosition { controller: "scsi".into(), bus: 0, unit: 0 },
            backing: "[ds] a.vmdk".into(),
            host_version: None,
            taint: None,
        };
        store.commit(&mine, committed, 1 << 20, None).unwrap();
        assert!(!dir.path().join(&dead_mine).exists(), "a dead writer's file of this key stays");
        assert!(dir.path().join(&live_mine).exists(), "a live writer's file was removed");
        assert!(dir.path().join(&dead_other).exists(), "another key's file was removed");
    }

    #[test]
    fn two_destinations_of_one_disk_never_mix_and_newer_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let (repo, replica) = (key("repo:/backups"), key("/replicas/vm.raw"));
        let dirty = store.mark_dirty(&replica, 1 << 20, "job-1").unwrap();
        assert!(!dirty.consistent());
        assert_eq!(store.load(&repo).unwrap(), None);
        let path = dir.path().join(format!("{}.state.json", replica.stem()));
        let text = fs::read_to_string(&path).unwrap().replace("\"format\": 1", "\"format\": 9");
        fs::write(&path, text).unwrap();
        let err = store.load(&replica).unwrap_err().to_string();
        assert!(err.contains("format 9") && err.contains("newer syncproxy"), "{err}");
    }
}
