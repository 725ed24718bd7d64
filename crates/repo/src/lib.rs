//! The backup repository: restore points of disks in fixed, disk-aligned chunks, content
//! addressed by BLAKE3, compressed with zstd, stored once however many restore points share
//! them. Every restore point is a synthetic full. The format is DESIGN.md, byte by byte.
//!
//! A repository lives in a local directory ([`LocalStore`]) or in S3-compatible object storage
//! ([`S3Store`]). Backups go through the block pipeline ([`RepoSink`]) under a shared lock;
//! `ops` has prune, gc (under the exclusive lock) and copy; `codec` encrypts when a key is
//! given. The store, its atomic writes, and the job leases that tell a live job from a dead one
//! are `durable`'s, shared with the replica.

pub mod address;
mod codec;
mod drills;
mod format;
pub mod lock;
mod ops;
mod protect;
pub mod prune;
#[cfg(feature = "s3")]
mod s3;
mod s3config;
mod session;
mod sink;
mod steps;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use codec::{Codec, MAX_KEY_FILE, RepoKey};
pub use drills::{DrillRecord, MAX_DRILL_FILE};
pub use format::{
    ChunkId, Consistency, DiskEntry, FORMAT, FileEntry, Index, Manifest, SourceInfo, ZERO, chunk_name, decode_chunk,
    decode_chunk_with, encode_chunk,
};
// The store and lock types of this crate's API are `durable`'s.
pub use durable::{Entry, Fs, JobLease, LocalStore, LockInfo, LockKind, LockTiming, RealFs, Store, TEMP_PREFIX};
pub use lock::RepoLock;
pub use ops::{CopyReport, GcReport, PruneReport};
pub use protect::{MAX_NOTE, Protection};
pub use prune::Retention;
#[cfg(feature = "s3")]
pub use s3::S3Store;
pub use s3config::S3Config;
pub use session::{SESSION_FORMAT, Session};
pub use sink::{RepoSink, SinkStats};
pub use steps::Steps;

/// Everything that can go wrong with a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Written by a newer syncproxy: refused rather than misread.
    #[error("{what} is repository format {found}; this syncproxy reads format {known} only (upgrade syncproxy)")]
    NewerFormat {
        /// Which file.
        what: String,
        /// Its format.
        found: u32,
        /// Ours.
        known: u32,
    },
    /// A file is damaged or not what it should be.
    #[error("damaged repository: {0}")]
    Corrupt(String),
    /// There is no repository there, or no such restore point or disk.
    #[error("{0}")]
    NotFound(String),
    /// The request makes no sense (an existing repository to init, a bad chunk size).
    #[error("{0}")]
    Invalid(String),
    /// The repository is encrypted and no key was given.
    #[error("{0} is encrypted: give its key file (--key-file); without the key nothing in it can be read")]
    KeyNeeded(String),
    /// The key given is not the repository's.
    #[error("the key given is not the key of {0} (its key check differs)")]
    WrongKey(String),
    /// A gc ran during a backup and removed a chunk it reuses: run the backup again.
    #[error("{0}")]
    Conflict(String),
    /// Another job holds a lock in the way.
    #[error("{0}")]
    Locked(String),
    /// Stopped on request ([`Steps::stop`]) before it finished; what it did so far is safe.
    #[error("{0}: stopped before it finished")]
    Stopped(String),
    /// The object store answered with an error, or could not be reached; the kind of `source`
    /// is the store's classification (see `durable::Error::Remote`).
    #[error("object storage: {what}: {source}")]
    Remote {
        /// The object or operation.
        what: String,
        /// The store's error.
        source: std::io::Error,
    },
}

impl RepoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    /// What a copy into or out of the repository does about it: the one place repository
    /// errors are classified.
    pub fn kind(&self) -> pipeline::ErrorKind {
        use pipeline::ErrorKind as K;
        match self {
            Self::Io { source, .. } | Self::Remote { source, .. } => K::of_io(source),
            Self::NotFound(_) => K::NotFound,
            Self::Invalid(_) => K::InvalidInput,
            // Damaged or foreign data, a missing or wrong key, a gc or another job in the
            // way: the copy cannot go on; the job may be run again.
            Self::NewerFormat { .. }
            | Self::Corrupt(_)
            | Self::KeyNeeded(_)
            | Self::WrongKey(_)
            | Self::Conflict(_)
            | Self::Locked(_)
            | Self::Stopped(_) => K::Fatal,
        }
    }
}

impl From<durable::Error> for RepoError {
    fn from(e: durable::Error) -> Self {
        match e {
            durable::Error::Io { path, source } => Self::Io { path, source },
            durable::Error::BadName(name) => Self::Corrupt(format!("{name:?} is not a repository file name")),
            durable::Error::Locked(why) => Self::Locked(why),
            durable::Error::Invalid(why) => Self::Invalid(why),
            durable::Error::Remote { what, source } => Self::Remote { what, source },
            e @ durable::Error::Spawn(_) => Self::Invalid(e.to_string()),
        }
    }
}

/// Whether an error is a full disk (or an exhausted quota).
pub(crate) fn full(e: &RepoError) -> bool {
    matches!(e, RepoError::Io { source, .. }
        if matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded))
}

/// Why an error means the store cannot take a write at all (a read-only medium, no write
/// permission, a full disk or quota), if it does.
pub fn unwritable(e: &RepoError) -> Option<&'static str> {
    let RepoError::Io { source, .. } = e else { return None };
    durable::unwritable(source)
}

/// Manifests that cannot be read: their file names, and why.
pub type Unreadable = Vec<(String, String)>;

/// The repository's `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// The format.
    pub format: u32,
    /// A random ID.
    pub id: String,
    /// The chunk size (the pipeline sink's granularity).
    pub chunk_size: u32,
    /// `zstd`.
    pub compression: String,
    /// `null`, or how files are encrypted (`algorithm`, and a `key_check` that tells whether
    /// a key is this repository's without revealing it).
    pub encryption: Option<Encryption>,
}

/// A repository's encryption, as its `config` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `aes-256-gcm`.
    pub algorithm: String,
    /// `BLAKE3-derive-key("syncproxy repository 1 key check", key)`, hex.
    pub key_check: String,
}

/// The default chunk size: 1 MiB. A scattered incremental stores every chunk it touches whole,
/// so the chunk size sets what a small change costs: 1,000 random 64 KiB writes on a 4 GiB
/// disk stored 568 MB at 4 MiB, 203 MB at 1 MiB and 67 MB at 256 KiB, while a first backup
/// took the same time at 4 MiB and 1 MiB and a third longer at 256 KiB. Below 1 MiB the
/// index (32 bytes per chunk of every restore point: 64 MiB for a 2 TiB disk at 1 MiB) and
/// the number of chunk files (S3 requests) grow faster than the savings.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repo {
    store: Arc<dyn Store>,
    config: RepoConfig,
    timing: LockTiming,
    codec: Arc<Codec>,
}

/// Where a repository is: a local path, or `s3://bucket/prefix`.
#[derive(Debug, Clone, Default)]
pub struct Location {
    /// The path or URL.
    pub url: String,
    /// How to reach the object store, for `s3://`.
    pub s3: S3Config,
    /// The key of an encrypted repository.
    pub key: Option<RepoKey>,
}

impl Location {
    /// The store it names.
    pub fn store(&self) -> Result<Arc<dyn Store>, RepoError> {
        if self.url.starts_with("s3://") {
            #[cfg(feature = "s3")]
            return Ok(Arc::new(S3Store::open(&self.url, &self.s3)?));
            #[cfg(not(feature = "s3"))]
            return Err(RepoError::Invalid(format!("{}: this build has no S3 support (feature `s3`)", self.url)));
        }
        if self.url.contains("://") {
            return Err(RepoError::Invalid(format!("{}: repositories are a local path or s3://", self.url)));
        }
        // Opening creates nothing: a mistyped path is reported missing, not made an empty
        // folder. [`Location::create`] makes it, for `init`.
        Ok(Arc::new(LocalStore::new(Path::new(&self.url))))
    }

    /// The store it names, its folder made first when it is local and missing.
    pub fn create(&self) -> Result<Arc<dyn Store>, RepoError> {
        let store = self.store()?;
        if store.file_system() {
            let path = Path::new(&self.url);
            std::fs::create_dir_all(path).map_err(|e| RepoError::io(path, e))?;
        }
        Ok(store)
    }
}

/// A backup's registration, `writers/<id>.json`: while it exists, gc keeps the chunks of the
/// backup's parent and of its own committed indexes, so a backup that died can be resumed or
/// inspected within the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Registration {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    /// Seconds since the Unix epoch.
    pub(crate) started: u64,
    pub(crate) parent: Option<String>,
    /// The parent's index files (kept even if the parent is pruned meanwhile).
    pub(crate) parent_indexes: Vec<String>,
    /// Seconds since the Unix epoch of the last heartbeat (rewritten every minute while the
    /// backup runs).
    pub(crate) heartbeat: u64,
}

/// The file gc rewrites before it removes anything; a backup that sees it change between its
/// start and its end checks that every chunk it references still exists.
const GC_GENERATION: &str = "gc/generation";

/// Space kept for gc: a file of [`GC_RESERVE_SIZE`] random (so incompressible) bytes, made by
/// init and by each gc, that a gc finding the disk full removes so that it can write its lock
/// and `gc/generation` before it frees anything.
pub(crate) const GC_RESERVE: &str = "gc/reserve";

/// How much space [`GC_RESERVE`] keeps: many times the few small files gc writes.
pub(crate) const GC_RESERVE_SIZE: usize = 1 << 20;

/// The contents of a new [`GC_RESERVE`].
pub(crate) fn reserve_bytes() -> Vec<u8> {
    let seed = random_hex(16);
    let mut out = vec![0u8; GC_RESERVE_SIZE];
    blake3::Hasher::new_derive_key("syncproxy repository 1 gc reserve")
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// `bytes` random bytes as hex (repository, restore-point, lock and gc-generation IDs), from
/// the system's generator, the one the keys come from. Should it ever fail, time and PID are
/// hashed instead: the IDs need to be unique, not secret.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut raw = [0u8; 32];
    let n = bytes.min(raw.len());
    if aws_lc_rs::rand::fill(&mut raw[..n]).is_err() {
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        h.update(&format!("{:?}", std::time::SystemTime::now()).into_bytes());
        raw = *h.finalize().as_bytes();
    }
    raw[..n].iter().map(|b| format!("{b:02x}")).collect()
}

/// UTC now as `(YYYYMMDDTHHMMSSnnnnnnnnnZ, YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ)`: to the nanosecond,
/// so restore points taken within one second still sort in the order they were begun.
fn now_utc() -> (String, String) {
    let iso = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
    (iso.replace(['-', ':', '.'], ""), iso)
}

/// Refuses a chunk size that is not a power of two from 64 KiB to 64 MiB.
fn check_chunk_size(chunk_size: u32) -> Result<(), RepoError> {
    if !(64 << 10..=64 << 20).contains(&chunk_size) || !chunk_size.is_power_of_two() {
        return Err(RepoError::Invalid(format!("chunk size {chunk_size} is not a power of two from 64 KiB to 64 MiB")));
    }
    Ok(())
}

/// A disk to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Its name.
    pub name: String,
    /// Its size.
    pub capacity: u64,
    /// The change ID it will be as of.
    pub change_id: Option<String>,
    /// What the CBT planner should know of this copy next time; recorded in the manifest,
    /// which is written only once every disk is committed.
    pub committed: Option<cbt::CommittedDisk>,
    /// Its label in vSphere (`Hard disk 2`), when it came from a VM.
    pub label: Option<String>,
}

/// A backup in progress: a sink per disk; [`Backup::finish`] writes the manifest.
#[derive(Debug)]
pub struct Backup {
    repo: Repo,
    beat: Option<durable::Heartbeat>,
    /// What [`GC_GENERATION`] said when the backup began.
    generation: Option<Vec<u8>>,
    id: String,
    time: String,
    parent: Option<String>,
    disks: Vec<DiskSpec>,
    sinks: Vec<Arc<RepoSink>>,
    files: Vec<FileEntry>,
    /// The session its progress is kept in, if any (`session`).
    session: Option<String>,
}

/// The largest configuration file a restore point takes (a `.vmx` is kilobytes, an `.nvram`
/// hundreds of them).
pub const MAX_FILE: usize = 16 << 20;

impl Backup {
    /// Captures a configuration file (`.vmx`, `.nvram`) into the restore point, so a restored
    /// VM can boot as it was. `name` is a plain file name.
    pub fn add_file(&mut self, name: &str, data: &[u8]) -> Result<(), RepoError> {
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) || name == "." || name == ".." {
            return Err(RepoError::Invalid(format!("{name:?} is not a plain file name")));
        }
        if data.len() > MAX_FILE {
            return Err(RepoError::Invalid(format!(
                "{name} is {} bytes; configuration files are at most {MAX_FILE}",
                data.len()
            )));
        }
        if self.files.iter().any(|f| f.name == name) {
            return Err(RepoError::Invalid(format!("{name} is already in restore point {}", self.id)));
        }
        let stored = format!("files/{}/{}", self.id, self.files.len());
        let sealed = self.repo.codec.seal(&stored, data.to_vec())?;
        self.repo.store.put(&stored, &sealed)?;
        self.files.push(FileEntry {
            name: name.to_owned(),
            size: data.len() as u64,
            stored_blake3: blake3::hash(&sealed).to_hex().to_string(),
            stored,
        });
        Ok(())
    }

    /// The restore point's ID-to-be.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sink of disk `n`.
    pub fn sink(&self, n: usize) -> Option<Arc<RepoSink>> {
        self.sinks.get(n).cloned()
    }

    /// Writes the manifest (last: the restore point exists from this moment). Every disk's
    /// sink must have been committed. Under a shared lock, so no gc runs meanwhile; if a gc ran
    /// since the backup began, every chunk it references is first checked to exist (one it
    /// found already stored may have been removed since), and a missing one fails the backup
    /// with nothing written: run it again.
    pub fn finish(mut self, source: SourceInfo, consistency: Consistency) -> Result<Manifest, RepoError> {
        let _lock = self.repo.lock_waiting(LockKind::Shared, &format!("backup {} (finishing)", self.id))?;
        if self.repo.store.get(GC_GENERATION)? != self.generation {
            for (d, s) in self.disks.iter().zip(&self.sinks) {
                for id in s.referenced() {
                    if !self.repo.store.exists(&chunk_name(&id))? {
                        return Err(RepoError::Conflict(format!(
                            "a gc that ran during backup {} removed {}, which disk {} reuses; nothing was \
                             written: run the backup again",
                            self.id,
                            chunk_name(&id),
                            d.name
                        )));
                    }
                }
            }
        }
        let mut disks = Vec::new();
        for (d, s) in self.disks.iter().zip(&self.sinks) {
            let (index, sum) = s
                .committed()
                .ok_or_else(|| RepoError::Invalid(format!("disk {} of {} was never committed", d.name, self.id)))?;
            let stats = s.stats();
            disks.push(DiskEntry {
                name: d.name.clone(),
                capacity: d.capacity,
                index,
                index_blake3: sum,
                change_id: d.change_id.clone(),
                committed: d.committed.clone(),
                label: d.label.clone(),
                stored_chunks: stats.stored_chunks,
                stored_bytes: stats.stored_bytes,
            });
        }
        let m = Manifest {
            format: FORMAT,
            id: self.id.clone(),
            time: self.time,
            parent: self.parent,
            source,
            consistency,
            disks,
            files: std::mem::take(&mut self.files),
        };
        self.repo.put_manifest(&m)?;
        // Stopped first, so that no late heartbeat writes the registration back.
        drop(self.beat.take());
        self.repo.drop_registration(&m.id)?;
        if let Some(key) = self.session.take()
            && let Err(e) = self.repo.drop_session(&key)
        {
            tracing::warn!("backup {} finished, but its session {key} stays: {e}", m.id);
        }
        Ok(m)
    }
}

/// Reads `[offset, offset + len)` of a disk of `capacity` bytes whose chunk IDs `lookup`
/// gives by slot (so a read touches only the entries it needs).
pub(crate) fn read_chunks(
    store: &dyn Store,
    codec: &Codec,
    chunk_size: u32,
    capacity: u64,
    lookup: impl Fn(usize) -> ChunkId,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, RepoError> {
    let end = offset
        .checked_add(len)
        .filter(|e| *e <= capacity)
        .ok_or_else(|| RepoError::Invalid(format!("[{offset}, +{len}) is outside a disk of {capacity} bytes")))?;
    let chunk = u64::from(chunk_size);
    let mut out = vec![0u8; usize::try_from(len).map_err(|_| RepoError::Invalid("read too large".into()))?];
    let mut at = offset;
    while at < end {
        let slot = at / chunk;
        let start = slot * chunk;
        let stop = end.min(start + chunk);
        let id = lookup(usize::try_from(slot).unwrap_or(usize::MAX));
        if id != ZERO {
            let data = get_chunk(store, codec, &id, chunk)?;
            let (a, b) = (usize::try_from(at - start).unwrap_or(0), usize::try_from(stop - start).unwrap_or(0));
            let piece =
                data.get(a..b).ok_or_else(|| RepoError::Corrupt(format!("{} is too short", chunk_name(&id))))?;
            let o = usize::try_from(at - offset).unwrap_or(0);
            out[o..o + piece.len()].copy_from_slice(piece);
        }
        at = stop;
    }
    Ok(out)
}

/// Random reads of a restore point's disk; also a pipeline source, for restores to any sink.
#[derive(Debug, Clone)]
pub struct PointReader {
    store: Arc<dyn Store>,
    codec: Arc<Codec>,
    index: Index,
    name: String,
}

impl pipeline::BlockSource for PointReader {
    fn size(&self) -> u64 {
        self.index.capacity
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    /// A restore point never changes: its name is its identity.
    fn identity(&self) -> String {
        self.name.clone()
    }

    fn frozen(&self) -> bool {
        true
    }

    /// Zero chunks are known zeros; every other chunk is data.
    fn allocation(&self) -> pipeline::IoFuture<'_, Option<pipeline::SourceAllocation>> {
        let chunk = u64::from(self.index.chunk_size);
        let cap = self.index.capacity;
        let data = cbt::ExtentSet::from_ranges(
            self.index
                .ids
                .iter()
                .enumerate()
                .filter(|(_, id)| **id != ZERO)
                .map(|(n, _)| (n as u64 * chunk, chunk.min(cap - n as u64 * chunk))),
        );
        let zero = data.complement(cap);
        Box::pin(async move { Ok(Some(pipeline::SourceAllocation { data, zero })) })
    }

    fn read_at(&self, offset: u64, mut buf: bytes::BytesMut) -> pipeline::IoFuture<'_, bytes::BytesMut> {
        let me = self.clone();
        Box::pin(pipeline::blocking(move || {
            let len = buf.len() as u64;
            let data = me.read(offset, len).map_err(|e| {
                pipeline::BlockError::new(e.kind(), format!("reading {}", me.name)).at(offset, len).with_source(e)
            })?;
            buf.copy_from_slice(&data);
            Ok(buf)
        }))
    }
}

impl PointReader {
    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.index.capacity
    }

    /// Reads `len` bytes at `offset`, fetching only the chunks they cover.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, RepoError> {
        let ids = &self.index.ids;
        let lookup = |slot: usize| ids.get(slot).copied().unwrap_or(ZERO);
        read_chunks(&*self.store, &self.codec, self.index.chunk_size, self.index.capacity, lookup, offset, len)
    }
}

/// Reads, opens and checks one chunk.
pub(crate) fn get_chunk(store: &dyn Store, codec: &Codec, id: &ChunkId, max: u64) -> Result<Vec<u8>, RepoError> {
    let name = chunk_name(id);
    let raw = store.get(&name)?.ok_or_else(|| RepoError::Corrupt(format!("{name} is missing")))?;
    let raw = codec.open(&name, raw)?;
    format::decode_chunk_with(&raw, id, max, &|p| codec.hash(p))
}

/// What [`Repo::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks read and re-hashed.
    pub chunks_checked: u64,
    /// Damaged or missing chunks (their file names, and why).
    pub bad_chunks: Vec<(String, String)>,
    /// Restore points that cannot be restored whole, with their damaged disks (`manifest`
    /// when the manifest itself cannot be read).
    pub damaged_points: BTreeMap<String, Vec<String>>,
}

impl Repo {
    /// Makes a new repository in the empty or missing directory `path`.
    pub fn init(path: impl AsRef<Path>, chunk_size: u32) -> Result<Self, RepoError> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|e| RepoError::io(path, e))?;
        Self::init_in(Arc::new(LocalStore::new(path)), chunk_size)
    }

    /// Makes a new repository at `location` (encrypted when it carries a key).
    pub fn init_at(location: &Location, chunk_size: u32) -> Result<Self, RepoError> {
        Self::init_with(location.create()?, chunk_size, location.key.as_ref())
    }

    /// Makes a new repository at `location`, encrypted with a new key that is written to the
    /// new file `key_file` (readable by its owner only). Nothing is written unless the
    /// repository can be made: the chunk size, the key file's absence and the absence of a
    /// repository are checked first; the key is written before the repository's `config`, so
    /// no repository ever exists whose key was not saved; and should the repository still not
    /// be made, the new key file, which then locks nothing, is removed again.
    pub fn init_with_new_key(location: &Location, chunk_size: u32, key_file: &Path) -> Result<Self, RepoError> {
        check_chunk_size(chunk_size)?;
        if key_file.exists() {
            return Err(RepoError::Invalid(format!("{} exists: a new key never replaces a file", key_file.display())));
        }
        let dir = key_file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(RepoError::NotFound(format!(
                "{}: no directory {} to write the key file in",
                key_file.display(),
                dir.display()
            )));
        }
        let store = location.create()?;
        if store.exists("config")? {
            return Err(RepoError::Invalid(format!("{} already holds a repository", store.describe())));
        }
        let key = RepoKey::generate()?;
        key.write_new(key_file)?;
        let made = Self::init_with(store.clone(), chunk_size, Some(&key));
        if made.is_err() {
            // Kept when a config that this key opens may exist (it could not be read back).
            let check = Codec::keyed(&key)?.key_check().map(str::to_owned);
            let useless = match store.get("config") {
                Ok(None) => true,
                Ok(Some(raw)) => {
                    serde_json::from_slice::<RepoConfig>(&raw).is_ok_and(|c| c.encryption.map(|e| e.key_check) != check)
                }
                Err(_) => false,
            };
            if useless && let Err(e) = std::fs::remove_file(key_file) {
                tracing::warn!("cannot remove the unused key file {}: {e}", key_file.display());
            }
        }
        made
    }

    /// Makes a new, unencrypted repository in `store`, which must not hold one.
    pub fn init_in(store: Arc<dyn Store>, chunk_size: u32) -> Result<Self, RepoError> {
        Self::init_with(store, chunk_size, None)
    }

    /// Makes a new repository in `store`, encrypted with `key` when there is one.
    pub fn init_with(store: Arc<dyn Store>, chunk_size: u32, key: Option<&RepoKey>) -> Result<Self, RepoError> {
        check_chunk_size(chunk_size)?;
        let taken = || RepoError::Invalid(format!("{} already holds a repository", store.describe()));
        if store.exists("config")? {
            return Err(taken());
        }
        let codec = match key {
            Some(k) => Codec::keyed(k)?,
            None => Codec::plain(),
        };
        let encryption =
            codec.key_check().map(|c| Encryption { algorithm: codec::ALGORITHM.into(), key_check: c.to_owned() });
        let config =
            RepoConfig { format: FORMAT, id: random_hex(16), chunk_size, compression: "zstd".into(), encryption };
        let json = serde_json::to_vec_pretty(&config).map_err(|e| RepoError::Invalid(e.to_string()))?;
        if !store.put_new("config", &json)? {
            return Err(taken());
        }
        if store.file_system()
            && let Err(e) = store.put(GC_RESERVE, &reserve_bytes())
        {
            tracing::warn!("{}: no room for gc's reserve {GC_RESERVE}: {e}", store.describe());
        }
        Ok(Self { store, config, timing: LockTiming::default(), codec: Arc::new(codec) })
    }

    /// Opens the repository in `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RepoError> {
        Self::open_in(Arc::new(LocalStore::new(path.as_ref())))
    }

    /// Opens the repository at `location` (with its key, if it carries one).
    pub fn open_at(location: &Location) -> Result<Self, RepoError> {
        Self::open_with(location.store()?, location.key.as_ref())
    }

    /// Opens the unencrypted repository in `store`.
    pub fn open_in(store: Arc<dyn Store>) -> Result<Self, RepoError> {
        Self::open_with(store, None)
    }

    /// Opens the repository in `store`; an encrypted one needs its `key`.
    pub fn open_with(store: Arc<dyn Store>, key: Option<&RepoKey>) -> Result<Self, RepoError> {
        let raw = store
            .get("config")?
            .ok_or_else(|| RepoError::NotFound(format!("{} is not a repository (no config)", store.describe())))?;
        let v: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt(format!("config: {e}")))?;
        let format = v.get("format").and_then(serde_json::Value::as_u64).unwrap_or(0);
        if format != u64::from(FORMAT) {
            return Err(RepoError::NewerFormat {
                what: format!("{}/config", store.describe()),
                found: u32::try_from(format).unwrap_or(u32::MAX),
                known: FORMAT,
            });
        }
        let config: RepoConfig = serde_json::from_value(v).map_err(|e| RepoError::Corrupt(format!("config: {e}")))?;
        if !(64 << 10..=64 << 20).contains(&config.chunk_size) || !config.chunk_size.is_power_of_two() {
            return Err(RepoError::Corrupt(format!("config: chunk size {}", config.chunk_size)));
        }
        let codec = match (&config.encryption, key) {
            (None, None) => Codec::plain(),
            (None, Some(_)) => {
                return Err(RepoError::Invalid(format!("{} is not encrypted, but a key was given", store.describe())));
            }
            (Some(_), None) => return Err(RepoError::KeyNeeded(store.describe())),
            (Some(e), Some(k)) => {
                if e.algorithm != codec::ALGORITHM {
                    return Err(RepoError::Corrupt(format!("config: unknown encryption {:?}", e.algorithm)));
                }
                let c = Codec::keyed(k)?;
                if c.key_check() != Some(e.key_check.as_str()) {
                    return Err(RepoError::WrongKey(store.describe()));
                }
                c
            }
        };
        Ok(Self { store, config, timing: LockTiming::default(), codec: Arc::new(codec) })
    }

    /// Sets how its locks are timed (tests shorten them).
    pub fn with_lock_timing(mut self, timing: LockTiming) -> Self {
        self.timing = timing;
        self
    }

    /// Its store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// How its files are encoded.
    pub fn codec(&self) -> &Arc<Codec> {
        &self.codec
    }

    /// Removes a backup's registration and the indexes its heartbeats saved.
    pub(crate) fn drop_registration(&self, id: &str) -> Result<(), RepoError> {
        self.store.delete(&format!("writers/{id}.json"))?;
        // With the temporary files a heartbeat that died half-way left, or the folder stays.
        for f in self.store.list_all(&format!("writers/{id}"))? {
            self.store.delete(&format!("writers/{id}/{}", f.name))?;
        }
        Ok(self.store.delete(&format!("writers/{id}"))?)
    }

    pub(crate) fn put_manifest(&self, m: &Manifest) -> Result<(), RepoError> {
        let name = format!("points/{}.json", m.id);
        let json = serde_json::to_vec_pretty(m).map_err(|e| RepoError::Invalid(e.to_string()))?;
        Ok(self.store.put(&name, &self.codec.seal(&name, json)?)?)
    }

    /// An index file's contents, checked against `blake3` (of the stored bytes) and opened.
    pub(crate) fn index_file(&self, name: &str, blake3_hex: Option<&str>) -> Result<Index, RepoError> {
        let raw = self.store.get(name)?.ok_or_else(|| RepoError::Corrupt(format!("{name} is missing")))?;
        if blake3_hex.is_some_and(|sum| blake3::hash(&raw).to_hex().as_str() != sum) {
            return Err(RepoError::Corrupt(format!("{name} does not match its manifest (damaged)")));
        }
        Index::decode(&self.codec.open(name, raw)?, name)
    }

    /// Takes a lock on it. A shared lock taken here is a reader's (a restore, verify, the
    /// source of a copy): on a medium that refuses the lock file (read-only, full), the reader
    /// goes on with a warning ([`RepoLock::acquire_reading`]). Writers use
    /// [`Repo::lock_to_write`].
    pub fn lock(&self, kind: LockKind, purpose: &str) -> Result<RepoLock, RepoError> {
        match kind {
            LockKind::Shared => RepoLock::acquire_reading(self.store.clone(), purpose, self.timing),
            LockKind::Exclusive => self.lock_to_write(kind, purpose),
        }
    }

    /// Takes a lock on it for a writer: it fails unless the lock file is written.
    pub fn lock_to_write(&self, kind: LockKind, purpose: &str) -> Result<RepoLock, RepoError> {
        RepoLock::acquire(self.store.clone(), kind, purpose, self.timing)
    }

    /// Takes a lock on it, waiting while something holds one in the way.
    pub fn lock_waiting(&self, kind: LockKind, purpose: &str) -> Result<RepoLock, RepoError> {
        RepoLock::acquire_waiting(self.store.clone(), kind, purpose, self.timing)
    }

    /// Its configuration.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Every restore point, oldest first. A manifest that cannot be read (damaged, cut short,
    /// of a newer format) is skipped with a warning naming it, so that one bad file stops
    /// neither listing, restoring, pruning nor the backups of any source; `verify` reports it
    /// as damage, and gc sweeps nothing while there is one ([`Repo::points_and_unreadable`]).
    pub fn points(&self) -> Result<Vec<Manifest>, RepoError> {
        let (points, unreadable) = self.points_and_unreadable()?;
        for (name, why) in unreadable {
            tracing::warn!("skipping {name}, a restore point whose manifest cannot be read: {why}");
        }
        Ok(points)
    }

    /// Every restore point whose manifest can be read, oldest first, and the manifests that
    /// cannot (their file names, and why). Only what is wrong with a manifest's contents makes
    /// it unreadable; a store that cannot be read at all is an error.
    pub fn points_and_unreadable(&self) -> Result<(Vec<Manifest>, Unreadable), RepoError> {
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        for e in self.store.list("points")? {
            let Some(id) = e.name.strip_suffix(".json") else { continue };
            match self.point(id) {
                Ok(m) => out.push(m),
                // Removed since the listing (a prune).
                Err(RepoError::NotFound(_)) => {}
                Err(err @ (RepoError::Corrupt(_) | RepoError::NewerFormat { .. })) => {
                    unreadable.push((format!("points/{}", e.name), err.to_string()));
                }
                Err(err) => return Err(err),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((out, unreadable))
    }

    /// One restore point.
    pub fn point(&self, id: &str) -> Result<Manifest, RepoError> {
        let name = format!("points/{id}.json");
        let raw = self.store.get(&name)?.ok_or_else(|| RepoError::NotFound(format!("no restore point {id}")))?;
        Manifest::decode(&self.codec.open(&name, raw)?, &name)
    }

    /// The index of one disk of a restore point, checked against the manifest.
    pub fn index(&self, m: &Manifest, disk: usize) -> Result<Index, RepoError> {
        let d = m.disks.get(disk).ok_or_else(|| RepoError::NotFound(format!("{} has no disk {disk}", m.id)))?;
        let ix = self.index_file(&d.index, Some(&d.index_blake3))?;
        if ix.capacity != d.capacity || ix.chunk_size != self.config.chunk_size {
            return Err(RepoError::Corrupt(format!("{} describes another disk than its manifest", d.index)));
        }
        Ok(ix)
    }

    /// Starts a backup of `disks`. With a `parent`, each disk that the parent has under the same
    /// name and size starts from the parent's chunks (an incremental that is still a full
    /// restore point); any other disk starts empty.
    ///
    /// The backup registers itself in `writers/` (with a heartbeat) before it stores anything,
    /// so that a gc running meanwhile keeps its parent's chunks and those of its committed
    /// indexes. It holds no lock while it copies, so gc need not wait for it; see
    /// [`Backup::finish`] for how the two are reconciled.
    pub fn begin(&self, parent: Option<&str>, disks: Vec<DiskSpec>) -> Result<Backup, RepoError> {
        let (stamp, time) = now_utc();
        let id = format!("{stamp}-{}", random_hex(4));
        let (parent_m, generation, reg) = {
            // No gc may be half-way through while the backup registers and reads its parent.
            let _lock = self.lock_waiting(LockKind::Shared, &format!("backup {id} (starting)"))?;
            let parent_m = parent.map(|p| self.point(p)).transpose()?;
            let now = durable::now_secs();
            let reg = Registration {
                id: id.clone(),
                host: durable::host_name(),
                pid: std::process::id(),
                started: now,
                parent: parent.map(str::to_owned),
                parent_indexes: parent_m.iter().flat_map(|m| m.disks.iter().map(|d| d.index.clone())).collect(),
                heartbeat: now,
            };
            let json = serde_json::to_vec_pretty(&reg).map_err(|e| RepoError::Invalid(e.to_string()))?;
            self.store.put(&format!("writers/{id}.json"), &json)?;
            (parent_m, self.store.get(GC_GENERATION)?, reg)
        };
        let mut sinks = Vec::new();
        for (n, d) in disks.iter().enumerate() {
            let same = parent_m.as_ref().and_then(|pm| {
                pm.disks.iter().position(|pd| pd.name == d.name && pd.capacity == d.capacity).map(|i| (pm, i))
            });
            let start = match same {
                Some((pm, i)) => Some(self.index(pm, i)?),
                None => None,
            };
            let fresh = start.is_none();
            let start = start.unwrap_or_else(|| Index::zeroed(d.capacity, self.config.chunk_size));
            let index_name = format!("indexes/{id}/{n}.idx");
            sinks.push(Arc::new(RepoSink::new(
                self.store.clone(),
                self.codec.clone(),
                d.name.clone(),
                index_name,
                start,
                fresh,
            )));
        }
        // Each heartbeat also saves the indexes as written so far (when they changed), so a gc
        // keeps the chunks of a backup that runs longer than its grace period.
        let (store, codec, snap_sinks, snap_id) = (self.store.clone(), self.codec.clone(), sinks.clone(), id.clone());
        let last = std::sync::Mutex::new(vec![SinkStats::default(); snap_sinks.len()]);
        let beat = durable::Heartbeat::start(
            self.store.clone(),
            format!("writers/{id}.json"),
            self.timing.heartbeat,
            move |now| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                for (n, s) in snap_sinks.iter().enumerate() {
                    let stats = s.stats();
                    if stats == last[n] {
                        continue;
                    }
                    let name = format!("writers/{snap_id}/{n}.idx");
                    let saved = codec.seal(&name, s.index_snapshot().encode()).and_then(|b| Ok(store.put(&name, &b)?));
                    match saved {
                        Ok(()) => last[n] = stats,
                        Err(e) => tracing::warn!("cannot save {name}: {e}"),
                    }
                }
                serde_json::to_vec_pretty(&Registration { heartbeat: now, ..reg.clone() }).ok()
            },
        )?;
        Ok(Backup {
            repo: self.clone(),
            beat: Some(beat),
            generation,
            id,
            time,
            parent: parent.map(str::to_owned),
            disks,
            sinks,
            files: Vec::new(),
            session: None,
        })
    }

    /// Random reads of one disk of a restore point, through its index (what instant recovery
    /// will serve).
    pub fn reader(&self, id: &str, disk: usize) -> Result<PointReader, RepoError> {
        let m = self.point(id)?;
        let index = self.index(&m, disk)?;
        let name = format!("{}:{id}/{disk}", self.store.describe());
        Ok(PointReader { store: self.store.clone(), codec: self.codec.clone(), index, name })
    }

    /// A configuration file captured with restore point `m`.
    pub fn file(&self, m: &Manifest, name: &str) -> Result<Vec<u8>, RepoError> {
        let f = m
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| RepoError::NotFound(format!("restore point {} has no file {name}", m.id)))?;
        let raw = self.store.get(&f.stored)?.ok_or_else(|| RepoError::Corrupt(format!("{} is missing", f.stored)))?;
        if blake3::hash(&raw).to_hex().as_str() != f.stored_blake3 {
            return Err(RepoError::Corrupt(format!("{} does not match its manifest (damaged)", f.stored)));
        }
        let data = self.codec.open(&f.stored, raw)?;
        if data.len() as u64 != f.size {
            return Err(RepoError::Corrupt(format!("{} holds {} bytes, not {}", f.stored, data.len(), f.size)));
        }
        Ok(data)
    }

    /// Reads one chunk (checked against its ID).
    pub fn chunk(&self, id: &ChunkId) -> Result<Vec<u8>, RepoError> {
        get_chunk(&*self.store, &self.codec, id, u64::from(self.config.chunk_size))
    }

    /// Restores disk `disk` of restore point `id` into a sparse raw file at `out`, durably.
    /// Returns the bytes of data written (zero chunks become holes).
    pub fn restore_disk(&self, id: &str, disk: usize, out: &Path) -> Result<u64, RepoError> {
        let _lock = self.lock(LockKind::Shared, &format!("restore of {id}"))?;
        let m = self.point(id)?;
        let ix = self.index(&m, disk)?;
        let f = File::create(out).map_err(|e| RepoError::io(out, e))?;
        f.set_len(ix.capacity).map_err(|e| RepoError::io(out, e))?;
        let mut written = 0;
        for (n, cid) in ix.ids.iter().enumerate() {
            if *cid == ZERO {
                continue;
            }
            let data = self.chunk(cid)?;
            let at = n as u64 * u64::from(ix.chunk_size);
            let want = (ix.capacity - at).min(u64::from(ix.chunk_size));
            if data.len() as u64 != want {
                return Err(RepoError::Corrupt(format!(
                    "{} holds {} bytes where {want} belong",
                    chunk_name(cid),
                    data.len()
                )));
            }
            f.write_all_at(&data, at).map_err(|e| RepoError::io(out, e))?;
            written += data.len() as u64;
        }
        f.sync_all().map_err(|e| RepoError::io(out, e))?;
        durable::sync_parent(out)?;
        Ok(written)
    }

    /// Re-reads and re-hashes every chunk any restore point references (each once), and names
    /// the restore points a damaged or missing chunk or index makes unrestorable.
    pub fn verify(&self) -> Result<VerifyReport, RepoError> {
        self.verify_with(&Steps::default())
    }

    /// [`verify`](Self::verify), telling `steps` how far it has come: reading the indexes (one
    /// step per disk), then checking the chunks (one step each).
    pub fn verify_with(&self, steps: &Steps) -> Result<VerifyReport, RepoError> {
        self.verify_slice(steps, 0, 1)
    }

    /// [`verify_with`](Self::verify_with) for slice `slice` of `slices` of the chunks (by
    /// their names, so each chunk is in one slice, for good): `slices` runs with slices 0 to
    /// `slices - 1` read every chunk once, each a fraction of the time. Every manifest, file
    /// and index is read on every run.
    pub fn verify_slice(&self, steps: &Steps, slice: u32, slices: u32) -> Result<VerifyReport, RepoError> {
        let slices = slices.max(1);
        let _lock = self.lock(LockKind::Shared, "verify")?;
        let mut report = VerifyReport::default();
        let mut users: BTreeMap<ChunkId, Vec<(String, String)>> = BTreeMap::new();
        let (points, unreadable) = self.points_and_unreadable()?;
        for (name, why) in unreadable {
            let id = name.trim_start_matches("points/").trim_end_matches(".json").to_owned();
            report.bad_chunks.push((name, why));
            report.damaged_points.entry(id).or_default().push("manifest".into());
        }
        steps.phase("reading indexes", points.iter().map(|m| m.disks.len() as u64).sum());
        for m in points {
            for f in &m.files {
                if let Err(e) = self.file(&m, &f.name) {
                    report.bad_chunks.push((f.stored.clone(), e.to_string()));
                    report.damaged_points.entry(m.id.clone()).or_default().push(f.name.clone());
                }
            }
            for (n, d) in m.disks.iter().enumerate() {
                steps.step()?;
                match self.index(&m, n) {
                    Ok(ix) => {
                        for id in ix.ids.into_iter().filter(|i| *i != ZERO) {
                            users.entry(id).or_default().push((m.id.clone(), d.name.clone()));
                        }
                    }
                    Err(e) => {
                        report.bad_chunks.push((d.index.clone(), e.to_string()));
                        report.damaged_points.entry(m.id.clone()).or_default().push(d.name.clone());
                    }
                }
            }
        }
        let mine = |id: &ChunkId| u32::from(u16::from_le_bytes([id[0], id[1]])) % slices == slice % slices;
        users.retain(|id, _| mine(id));
        steps.phase("checking chunks", users.len() as u64);
        for (id, who) in users {
            steps.step()?;
            report.chunks_checked += 1;
            if let Err(e) = self.chunk(&id) {
                report.bad_chunks.push((chunk_name(&id), e.to_string()));
                for (point, disk) in who {
                    let disks = report.damaged_points.entry(point).or_default();
                    if !disks.contains(&disk) {
                        disks.push(disk);
                    }
                }
            }
        }
        Ok(report)
    }
}
