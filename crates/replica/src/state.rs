//! Sync state, one concept for every destination: what a destination durably holds of one
//! disk, keyed by (vCenter, VM, disk, destination), plus the per-block digests and the
//! checkpoints of copies in progress. Files are written tmp + fsync + rename, directory synced.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cbt::{CommittedDisk, ExtentSet};
use serde::{Deserialize, Serialize};

use crate::BlockError;

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

/// A BLAKE3 digest per block of a disk, block `i` covering `[i × granularity, …)` (the last one
/// may be short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// The block size.
    pub granularity: u64,
    /// The disk size.
    pub capacity: u64,
    /// One digest per block.
    pub blocks: Vec<[u8; 32]>,
}

const DIGESTS_MAGIC: &[u8; 8] = b"SPDIGST1";

impl Digests {
    /// Digests of a disk that reads as zeros everywhere.
    pub fn zeros(granularity: u64, capacity: u64) -> Self {
        let count = capacity.div_ceil(granularity);
        let full = zero_digest(granularity);
        let mut blocks = vec![full; usize::try_from(count).unwrap_or(0)];
        let tail = capacity % granularity;
        if tail != 0
            && let Some(last) = blocks.last_mut()
        {
            *last = zero_digest(tail);
        }
        Self { granularity, capacity, blocks }
    }

    /// The encoded form: magic, granularity, capacity, then the digests.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.blocks.len() * 32);
        out.extend_from_slice(DIGESTS_MAGIC);
        out.extend_from_slice(&self.granularity.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(b);
        }
        out
    }

    /// Decodes [`Digests::encode`]'s output, checking that the length is exactly what the
    /// header implies before allocating anything.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let header = bytes.get(..24).ok_or("shorter than its header")?;
        if &header[..8] != DIGESTS_MAGIC {
            return Err("not a digest file (bad magic)".into());
        }
        let granularity = u64::from_le_bytes(header[8..16].try_into().map_err(|_| "header")?);
        let capacity = u64::from_le_bytes(header[16..24].try_into().map_err(|_| "header")?);
        if granularity == 0 {
            return Err("granularity 0".into());
        }
        let count = capacity.div_ceil(granularity);
        let body = &bytes[24..];
        if body.len() as u64 != count.saturating_mul(32) {
            return Err(format!("{} bytes of digests for {count} blocks", body.len()));
        }
        let blocks = body.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        Ok(Self { granularity, capacity, blocks })
    }
}

/// The digest of `len` zero bytes.
pub fn zero_digest(len: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        h.update(&zeros[..usize::try_from(n).unwrap_or(0)]);
        left -= n;
    }
    *h.finalize().as_bytes()
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
    /// The source's frozen identity ([`crate::BlockSource::identity`]).
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
    dir: PathBuf,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl StateStore {
    /// A store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BlockError> {
        let dir = dir.into();
        fs::create_dir_all(&dir)
            .map_err(|e| BlockError::io(format!("creating state directory {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &SyncKey, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}.{suffix}", key.stem()))
    }

    fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, BlockError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BlockError::io(format!("reading {}", path.display()), e)),
        };
        let format = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| BlockError::State { path: path.into(), message: format!("not JSON: {e}") })?
            .get("format")
            .and_then(serde_json::Value::as_u64);
        match format {
            Some(f) if f == u64::from(STATE_FORMAT) => {}
            Some(f) => {
                return Err(BlockError::State {
                    path: path.into(),
                    message: format!("format {f}, but this build reads format {STATE_FORMAT}; use a newer syncproxy"),
                });
            }
            None => return Err(BlockError::State { path: path.into(), message: "no format number".into() }),
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BlockError::State { path: path.into(), message: e.to_string() })
    }

    fn check_key(path: &Path, found: &SyncKey, key: &SyncKey) -> Result<(), BlockError> {
        if found != key {
            return Err(BlockError::State { path: path.into(), message: format!("holds {found:?}, not {key:?}") });
        }
        Ok(())
    }

    /// The state of `key`, if any.
    pub fn load(&self, key: &SyncKey) -> Result<Option<SyncState>, BlockError> {
        let path = self.path(key, "state.json");
        let state: Option<SyncState> = Self::read_json(&path)?;
        if let Some(s) = &state {
            Self::check_key(&path, &s.key, key)?;
        }
        Ok(state)
    }

    /// The committed digests of `key`, if any.
    pub fn load_digests(&self, key: &SyncKey) -> Result<Option<Digests>, BlockError> {
        self.read_digests(&self.path(key, "digests"))
    }

    fn read_digests(&self, path: &Path) -> Result<Option<Digests>, BlockError> {
        match fs::read(path) {
            Ok(b) => Digests::decode(&b).map(Some).map_err(|message| BlockError::State { path: path.into(), message }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BlockError::io(format!("reading {}", path.display()), e)),
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
        let path = self.path(key, "digests");
        match digests {
            Some(d) => write_atomic(&path, &d.encode())?,
            None => match fs::remove_file(&path) {
                Ok(()) => sync_dir(&path)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(BlockError::io(format!("removing {}", path.display()), e)),
            },
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
        Ok(state)
    }

    fn save(&self, state: &SyncState) -> Result<(), BlockError> {
        let json = serde_json::to_vec_pretty(state).map_err(|e| BlockError::Invalid(e.to_string()))?;
        write_atomic(&self.path(&state.key, "state.json"), &json)
    }

    /// The checkpoint of an interrupted copy to `key`, with the digests it had computed.
    pub fn load_checkpoint(&self, key: &SyncKey) -> Result<Option<(Checkpoint, Digests)>, BlockError> {
        let path = self.path(key, "checkpoint.json");
        let Some(cp) = Self::read_json::<Checkpoint>(&path)? else { return Ok(None) };
        Self::check_key(&path, &cp.key, key)?;
        let dpath = self.path(key, "checkpoint.digests");
        match self.read_digests(&dpath)? {
            Some(d) => Ok(Some((cp, d))),
            None => Err(BlockError::State { path: dpath, message: "missing beside its checkpoint".into() }),
        }
    }

    /// Saves a checkpoint. The caller has flushed the sink first, so everything in `done` is
    /// durable. The digests go first: a checkpoint never names digests that were not written.
    pub fn save_checkpoint(&self, cp: &Checkpoint, digests: &Digests) -> Result<(), BlockError> {
        write_atomic(&self.path(&cp.key, "checkpoint.digests"), &digests.encode())?;
        let json = serde_json::to_vec(cp).map_err(|e| BlockError::Invalid(e.to_string()))?;
        write_atomic(&self.path(&cp.key, "checkpoint.json"), &json)
    }

    /// Forgets a checkpoint (after a commit, or when its snapshot is gone).
    pub fn drop_checkpoint(&self, key: &SyncKey) -> Result<(), BlockError> {
        for suffix in ["checkpoint.json", "checkpoint.digests"] {
            let path = self.path(key, suffix);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(BlockError::io(format!("removing {}", path.display()), e)),
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a
/// temporary file, fsynced, renamed over, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BlockError> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let io = |what: &str, e| BlockError::io(format!("{what} {}", tmp.display()), e);
    let mut f = fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| BlockError::io(format!("renaming onto {}", path.display()), e))?;
    sync_dir(path)
}

/// Fsyncs the directory holding `path`, so a new or renamed entry survives a crash.
pub fn sync_dir(path: &Path) -> Result<(), BlockError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BlockError::io(format!("syncing directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(d: &str) -> SyncKey {
        SyncKey { vcenter: "vc".into(), vm: "vm".into(), disk: "2000".into(), destination: d.into() }
    }

    #[test]
    fn digests_round_trip_and_refuse_bad_lengths() {
        let d = Digests::zeros(1 << 20, (3 << 20) + 5);
        assert_eq!(d.blocks.len(), 4);
        assert_eq!(d.blocks[3], *blake3::hash(&[0; 5]).as_bytes());
        assert_eq!(Digests::decode(&d.encode()).unwrap(), d);
        let mut bad = d.encode();
        bad.pop();
        assert!(Digests::decode(&bad).unwrap_err().contains("for 4 blocks"));
        // A header claiming a huge disk with no body allocates nothing and is refused.
        let mut huge = Digests::zeros(1, 0).encode();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Digests::decode(&huge).is_err());
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
