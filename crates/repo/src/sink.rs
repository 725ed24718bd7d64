//! A restore point's disk as a sink of the block pipeline: each whole chunk written is hashed,
//! stored once (compressed) if the repository lacks it, and recorded in the disk's index; the
//! index is written at the sink's commit. Incrementals start from the parent's index, so the
//! result is a synthetic full.
//!
//! The sink's granularity is the chunk size, so the copy engine's blocks are its chunks, and a
//! plain repository's chunk ID is the plain BLAKE3 of the chunk's bytes, which is exactly the
//! engine's block digest: a plain sink takes the digests written with the data
//! ([`BlockSink::write_at_digested`]) and hashes nothing itself. An encrypted repository's IDs
//! are keyed, so it hashes every chunk (once: the copy keeps no digests of its own).

use std::collections::HashSet;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pipeline::{BlockDigest, BlockError, BlockSink, IoFuture, blocking, check_range, is_zero};

use crate::codec::Codec;
use crate::format::{ChunkId, Index, ZERO, chunk_name, encode_chunk};
use durable::Store;

/// Counts of what a sink stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Chunks written new to the repository.
    pub stored_chunks: u64,
    /// Their size in the repository.
    pub stored_bytes: u64,
    /// Chunks the repository already had.
    pub deduplicated: u64,
}

#[derive(Debug)]
struct State {
    index: Index,
    known: HashSet<ChunkId>,
    stats: SinkStats,
    committed: Option<String>,
}

/// One disk of a backup in progress.
#[derive(Debug)]
pub struct RepoSink {
    store: Arc<dyn Store>,
    codec: Arc<Codec>,
    name: String,
    index_name: String,
    fresh: bool,
    /// Ignore the digests written with the data (see [`RepoSink::hash_chunks_again`]).
    rehash: AtomicBool,
    state: Arc<Mutex<State>>,
}

impl RepoSink {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        codec: Arc<Codec>,
        name: String,
        index_name: String,
        start: Index,
        fresh: bool,
    ) -> Self {
        let known = start.ids.iter().copied().filter(|i| *i != ZERO).collect();
        let state = State { index: start, known, stats: SinkStats::default(), committed: None };
        Self {
            store,
            codec,
            name,
            index_name,
            fresh,
            rehash: AtomicBool::new(false),
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Hashes every chunk itself, ignoring the copy engine's digests, as before the sink took
    /// them: only so that `cargo xtask bench repo` can measure both ways in one run.
    pub fn hash_chunks_again(&self) {
        self.rehash.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What it stored so far.
    pub fn stats(&self) -> SinkStats {
        self.lock().stats
    }

    /// Starts over from `index` (a session's, as an interrupted backup left it): the chunks it
    /// references are known to be stored.
    pub(crate) fn restart_from(&self, index: Index) {
        let mut s = self.lock();
        s.known = index.ids.iter().copied().filter(|i| *i != ZERO).collect();
        s.index = index;
    }

    /// The index as written so far.
    pub(crate) fn index_snapshot(&self) -> Index {
        self.lock().index.clone()
    }

    /// Every chunk its index references (once each).
    pub(crate) fn referenced(&self) -> std::collections::BTreeSet<ChunkId> {
        self.lock().index.ids.iter().copied().filter(|i| *i != ZERO).collect()
    }

    /// The committed index's file name and BLAKE3, once committed.
    pub(crate) fn committed(&self) -> Option<(String, String)> {
        self.lock().committed.clone().map(|sum| (self.index_name.clone(), sum))
    }

    /// Reads `len` bytes at `offset` of the disk as written so far (random reads of a restore
    /// point being made; a finished one reads the same way through its index).
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, crate::RepoError> {
        read_written(&*self.store, &self.codec, &self.state, offset, len)
    }

    fn chunk_size(&self) -> u64 {
        u64::from(self.lock().index.chunk_size)
    }

    /// Writes `data` at `offset`, naming whole chunks by `digests` when there are some.
    fn write(&self, offset: u64, data: Bytes, digests: Vec<BlockDigest>) -> IoFuture<'_, ()> {
        let (store, codec, state, what) = (self.store.clone(), self.codec.clone(), self.state.clone(), self.describe());
        Box::pin(async move {
            let capacity = state.lock().unwrap_or_else(|p| p.into_inner()).index.capacity;
            check_range(&what, offset, data.len() as u64, capacity)?;
            let _permit = encoders().acquire().await;
            let len = data.len() as u64;
            blocking(move || write_range(&*store, &codec, &state, &what, offset, Some((&data, &digests)), len))
                .await
                .map_err(|e| e.at(offset, len))
        })
    }
}

/// Reads `[offset, offset + len)` of a disk as written so far, through its index: what
/// [`RepoSink::read`] and the engine's read back share.
fn read_written(
    store: &dyn Store,
    codec: &Codec,
    state: &Mutex<State>,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, crate::RepoError> {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let (chunk_size, capacity) = {
        let s = lock();
        (s.index.chunk_size, s.index.capacity)
    };
    let lookup = |slot: usize| lock().index.ids.get(slot).copied().unwrap_or(ZERO);
    crate::read_chunks(store, codec, chunk_size, capacity, lookup, offset, len)
}

/// Writes `data` (or zeros, for `None`) over `[offset, offset + len)`. Whole chunks are hashed
/// and stored without holding the lock (the pipeline writes only whole chunks); a partial
/// chunk is read, patched and stored again under the lock, so two partial writes to one chunk
/// cannot lose each other's bytes. `data` comes with the plain BLAKE3 of each chunk it covers,
/// or none (`offset` is on a chunk boundary when there are some); a whole chunk's ID is then
/// its digest, with no second hash of its bytes.
fn write_range(
    store: &dyn Store,
    codec: &Codec,
    state: &Mutex<State>,
    what: &str,
    offset: u64,
    data: Option<(&[u8], &[BlockDigest])>,
    len: u64,
) -> Result<(), BlockError> {
    let (chunk, capacity) = {
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        (u64::from(s.index.chunk_size), s.index.capacity)
    };
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let slot = at / chunk;
        let chunk_start = slot * chunk;
        let chunk_len = chunk.min(capacity - chunk_start);
        let piece_end = end.min(chunk_start + chunk_len);
        let from = usize::try_from(at - offset).unwrap_or(0);
        let to = usize::try_from(piece_end - offset).unwrap_or(0);
        let slot = usize::try_from(slot).unwrap_or(usize::MAX);
        if at == chunk_start && piece_end == chunk_start + chunk_len {
            match data {
                Some((d, digests)) => {
                    // Digest `k` covers `d[k × chunk ..]` to the next chunk boundary or the end
                    // of `d`: this piece exactly, unless the caller broke that rule.
                    let digest = digests
                        .get(from / usize::try_from(chunk).unwrap_or(usize::MAX))
                        .filter(|_| (to - from) as u64 == chunk.min((d.len() - from) as u64));
                    store_chunk(store, codec, state, what, slot, &d[from..to], digest)?
                }
                None => set_id(state, what, slot, ZERO, None)?,
            }
        } else {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            let current = s.index.ids.get(slot).copied().unwrap_or(ZERO);
            let mut buf = if current == ZERO {
                vec![0u8; usize::try_from(chunk_len).unwrap_or(0)]
            } else {
                crate::get_chunk(store, codec, &current, chunk).map_err(|e| repo_err(what, e))?
            };
            let within = usize::try_from(at - chunk_start).unwrap_or(0);
            let n = to - from;
            match data {
                Some((d, _)) => buf[within..within + n].copy_from_slice(&d[from..to]),
                None => buf[within..within + n].fill(0),
            }
            // Still under the lock: a concurrent partial write to this chunk waits, so neither
            // loses the other's bytes.
            store_chunk_locked(store, codec, &mut s, what, slot, &buf)?;
        }
        at = piece_end;
    }
    Ok(())
}

/// A whole chunk's ID. Given `digest`, the plain BLAKE3 of `piece` (the engine's digest of the
/// same block), a plain repository's ID is that digest ([`ZERO`] for zeros) with no second
/// hash; an encrypted repository's is keyed, so it is hashed here whatever is given.
fn chunk_id(codec: &Codec, piece: &[u8], digest: Option<&BlockDigest>) -> ChunkId {
    match digest {
        Some(_) if is_zero(piece) => ZERO,
        Some(d) if !codec.encrypted() => {
            // Tests (debug builds) check every digest taken; a wrong one would name a chunk
            // by other bytes, which `verify` and every read of it then report as damaged.
            debug_assert_eq!(*d, codec.chunk_id(piece), "a block digest that is not the chunk's plain BLAKE3");
            *d
        }
        _ => codec.chunk_id(piece),
    }
}

/// Stores one whole chunk's bytes (unless known) and points the index at it.
fn store_chunk(
    store: &dyn Store,
    codec: &Codec,
    state: &Mutex<State>,
    what: &str,
    slot: usize,
    piece: &[u8],
    digest: Option<&BlockDigest>,
) -> Result<(), BlockError> {
    let id = chunk_id(codec, piece, digest);
    let known = id == ZERO || state.lock().unwrap_or_else(|p| p.into_inner()).known.contains(&id);
    let stored = put_unless(store, codec, what, &id, piece, known)?;
    set_id(state, what, slot, id, stored)
}

fn store_chunk_locked(
    store: &dyn Store,
    codec: &Codec,
    s: &mut State,
    what: &str,
    slot: usize,
    piece: &[u8],
) -> Result<(), BlockError> {
    let id = codec.chunk_id(piece);
    let known = id == ZERO || s.known.contains(&id);
    let stored = put_unless(store, codec, what, &id, piece, known)?;
    record(s, what, slot, id, stored)
}

/// Writes a chunk file unless `known`, and if absent; `None` when nothing was tried, else the
/// bytes it took (0 when it was there already).
fn put_unless(
    store: &dyn Store,
    codec: &Codec,
    what: &str,
    id: &ChunkId,
    piece: &[u8],
    known: bool,
) -> Result<Option<u64>, BlockError> {
    if known {
        return Ok(None);
    }
    let name = chunk_name(id);
    // Only chunks the repository lacks are compressed and sealed.
    if store.exists(&name).map_err(|e| repo_err(what, e.into()))? {
        return Ok(Some(0));
    }
    let enc = codec.seal(&name, encode_chunk(piece)).map_err(|e| repo_err(what, e))?;
    let created = store.put_new(&name, &enc).map_err(|e| repo_err(what, e.into()))?;
    Ok(Some(if created { enc.len() as u64 } else { 0 }))
}

fn set_id(state: &Mutex<State>, what: &str, slot: usize, id: ChunkId, stored: Option<u64>) -> Result<(), BlockError> {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    record(&mut s, what, slot, id, stored)
}

fn record(s: &mut State, what: &str, slot: usize, id: ChunkId, stored: Option<u64>) -> Result<(), BlockError> {
    match stored {
        Some(n) if n > 0 => {
            s.stats.stored_chunks += 1;
            s.stats.stored_bytes += n;
        }
        _ if id != ZERO => s.stats.deduplicated += 1,
        _ => {}
    }
    if id != ZERO {
        s.known.insert(id);
    }
    match s.index.ids.get_mut(slot) {
        Some(e) => {
            *e = id;
            Ok(())
        }
        None => Err(BlockError::invalid(format!("{what}: chunk {slot} is past the end"))),
    }
}

/// A repository failure while writing to `what`, of the kind [`crate::RepoError::kind`] says:
/// an S3 server restarting is transient, so the engine retries the write.
fn repo_err(what: &str, e: crate::RepoError) -> BlockError {
    BlockError::new(e.kind(), format!("writing {what}")).with_source(e)
}

/// Writes being hashed, compressed, sealed and stored at once in the whole process. Each holds
/// a compressed copy of its chunks and a zstd context outside the copy engine's buffer pool;
/// more of them than the cores can run (or than a store takes in parallel) only costs memory.
fn encoders() -> &'static tokio::sync::Semaphore {
    static ENCODERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    ENCODERS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        tokio::sync::Semaphore::new((cores * 2).max(8))
    })
}

impl BlockSink for RepoSink {
    fn size(&self) -> u64 {
        self.lock().index.capacity
    }

    fn describe(&self) -> String {
        format!("{}:{}", self.store.describe(), self.name)
    }

    fn granularity(&self) -> NonZeroU64 {
        NonZeroU64::new(self.chunk_size()).unwrap_or(NonZeroU64::MIN)
    }

    /// A first backup's index starts all zero, so zero chunks need no work at all.
    fn known_zero(&self) -> bool {
        self.fresh
    }

    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        self.write(offset, data, Vec::new())
    }

    /// Chunks are stored whole, whatever the repository's codec.
    fn whole_blocks(&self) -> bool {
        true
    }

    fn can_read_back(&self) -> bool {
        true
    }

    /// The disk as written so far: an incremental's parent (its index is where this one
    /// starts), each chunk checked against its ID as it is read.
    fn read_back(&self, offset: u64, mut buf: bytes::BytesMut) -> IoFuture<'_, bytes::BytesMut> {
        let (store, codec, state, what) = (self.store.clone(), self.codec.clone(), self.state.clone(), self.describe());
        Box::pin(blocking(move || {
            let len = buf.len() as u64;
            let data = read_written(&*store, &codec, &state, offset, len).map_err(|e| {
                BlockError::new(e.kind(), format!("reading back {what}")).at(offset, len).with_source(e)
            })?;
            buf.copy_from_slice(&data);
            Ok(buf)
        }))
    }

    /// A plain repository names chunks by their plain BLAKE3, the engine's block digest.
    fn uses_digests(&self) -> bool {
        !self.codec.encrypted() && !self.rehash.load(Ordering::Relaxed)
    }

    fn write_at_digested(&self, offset: u64, data: Bytes, digests: &[BlockDigest]) -> IoFuture<'_, ()> {
        let g = self.chunk_size();
        // Digests that do not line up with the chunks (or an encrypted repository) are not
        // used: the chunks are hashed here instead.
        let fits = offset.is_multiple_of(g) && digests.len() as u64 == (data.len() as u64).div_ceil(g);
        let digests = if fits && self.uses_digests() { digests.to_vec() } else { Vec::new() };
        self.write(offset, data, digests)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        let (store, codec, state, what) = (self.store.clone(), self.codec.clone(), self.state.clone(), self.describe());
        Box::pin(async move {
            let capacity = state.lock().unwrap_or_else(|p| p.into_inner()).index.capacity;
            check_range(&what, offset, length, capacity)?;
            blocking(move || write_range(&*store, &codec, &state, &what, offset, None, length))
                .await
                .map_err(|e| e.at(offset, length))
        })
    }

    /// Chunks are durable when their write returns (fsynced and linked in); nothing to do.
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Writes the disk's index, atomically and durably.
    fn commit(&self) -> IoFuture<'_, ()> {
        let (store, codec, state, name, what) =
            (self.store.clone(), self.codec.clone(), self.state.clone(), self.index_name.clone(), self.describe());
        Box::pin(blocking(move || {
            let plain = state.lock().unwrap_or_else(|p| p.into_inner()).index.encode();
            let bytes = codec.seal(&name, plain).map_err(|e| repo_err(&what, e))?;
            store.put(&name, &bytes).map_err(|e| repo_err(&what, e.into()))?;
            state.lock().unwrap_or_else(|p| p.into_inner()).committed = Some(blake3::hash(&bytes).to_hex().to_string());
            Ok(())
        }))
    }
}
