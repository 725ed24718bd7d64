//! One disk of a restore point as an NBD export: reads by chunk through a bounded LRU cache of
//! decoded chunks, concurrent requests for one chunk sharing one fetch, read-ahead of the next
//! chunks when reads are sequential, zero chunks reported as holes, and every chunk that fails
//! verification while served recorded.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nbd_wire::proto::{errno, state};
use nbd_wire::server::{BoxFuture, ExportError, ExportSource};
use repo::{ChunkId, Index, Repo, RepoError, ZERO, chunk_name};
use tokio::sync::OnceCell;

use crate::InstantError;

/// How much of a restore point is kept decoded in memory, and how far ahead sequential reads
/// fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// The most bytes of decoded chunks kept (chunks being fetched are not counted: at most
    /// the requests in flight plus `read_ahead_chunks` of them).
    pub max_bytes: u64,
    /// Chunks fetched ahead, in the background, when reads are sequential (0: none).
    pub read_ahead_chunks: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, read_ahead_chunks: 4 }
    }
}

/// A chunk that failed verification while it was served: missing, not matching its ID, or
/// undecodable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedChunk {
    /// Its file name in the repository, as `repo verify` names it (`chunks/ab/ab…`).
    pub chunk: String,
    /// Where it starts in the disk.
    pub offset: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Counters of the cache, for tests and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Decoded bytes held now.
    pub bytes: u64,
    /// Chunks held now.
    pub chunks: usize,
    /// The most bytes ever held at once.
    pub peak_bytes: u64,
    /// Chunks fetched from the repository (read-ahead included).
    pub fetches: u64,
    /// Chunk lookups answered from the cache.
    pub hits: u64,
}

/// A fetch in progress or done, shared by everyone who wants the chunk meanwhile.
type Fetch = Arc<OnceCell<Result<Arc<Vec<u8>>, String>>>;

#[derive(Debug, Default)]
struct Cache {
    /// slot → (data, tick of last use)
    ready: HashMap<usize, (Arc<Vec<u8>>, u64)>,
    /// tick → slot, oldest first.
    lru: BTreeMap<u64, usize>,
    pending: HashMap<usize, Fetch>,
    tick: u64,
    stats: CacheStats,
}

impl Cache {
    fn get(&mut self, slot: usize) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        let (data, used) = self.ready.get_mut(&slot)?;
        self.lru.remove(used);
        *used = tick;
        self.lru.insert(tick, slot);
        self.stats.hits += 1;
        Some(data.clone())
    }

    /// Keeps `data` for `slot`, evicting the least recently used until it fits; a chunk larger
    /// than the whole cache is not kept.
    fn insert(&mut self, slot: usize, data: Arc<Vec<u8>>, max: u64) {
        let len = data.len() as u64;
        if len > max || self.ready.contains_key(&slot) {
            return;
        }
        while self.stats.bytes + len > max {
            let Some((_, old)) = self.lru.pop_first() else { break };
            if let Some((d, _)) = self.ready.remove(&old) {
                self.stats.bytes -= d.len() as u64;
            }
        }
        self.tick += 1;
        self.ready.insert(slot, (data, self.tick));
        self.lru.insert(self.tick, slot);
        self.stats.bytes += len;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.bytes);
    }
}

#[derive(Debug)]
struct Inner {
    repo: Repo,
    what: String,
    index: Index,
    config: CacheConfig,
    cache: Mutex<Cache>,
    failed: Mutex<Vec<FailedChunk>>,
    /// The slot after the last one the previous read touched (`u64::MAX` before any read).
    next_slot: AtomicU64,
}

/// One disk of a restore point, served read-only from its chunks.
#[derive(Debug, Clone)]
pub struct PointExport {
    inner: Arc<Inner>,
}

impl PointExport {
    /// Disk `disk` (its position in the restore point) of restore point `point`.
    pub fn open(repo: &Repo, point: &str, disk: usize, cache: CacheConfig) -> Result<Self, InstantError> {
        let m = repo.point(point)?;
        let index = repo.index(&m, disk)?;
        let name = m.disks.get(disk).map_or_else(String::new, |d| d.name.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                repo: repo.clone(),
                what: format!("disk {name} of restore point {}", m.id),
                index,
                config: cache,
                cache: Mutex::new(Cache::default()),
                failed: Mutex::new(Vec::new()),
                next_slot: AtomicU64::new(u64::MAX),
            }),
        })
    }

    /// Every chunk that failed verification while served so far (each once).
    pub fn failed_chunks(&self) -> Vec<FailedChunk> {
        self.inner.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The cache's counters now.
    pub fn cache_stats(&self) -> CacheStats {
        let c = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        CacheStats { chunks: c.ready.len(), ..c.stats }
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.inner.index.chunk_size
    }
}

impl Inner {
    fn chunk_len(&self, slot: usize) -> u64 {
        let chunk = u64::from(self.index.chunk_size);
        let start = slot as u64 * chunk;
        chunk.min(self.index.capacity.saturating_sub(start))
    }

    fn id(&self, slot: usize) -> ChunkId {
        self.index.ids.get(slot).copied().unwrap_or(ZERO)
    }

    /// Reads, checks and decodes one chunk (on a blocking thread), recording a damaged one.
    fn fetch_blocking(&self, slot: usize) -> Result<Arc<Vec<u8>>, String> {
        let id = self.id(slot);
        let offset = slot as u64 * u64::from(self.index.chunk_size);
        let want = self.chunk_len(slot);
        let damaged = |reason: String| {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            let chunk = chunk_name(&id);
            if !failed.iter().any(|f| f.chunk == chunk && f.offset == offset) {
                tracing::warn!("{}: {chunk} at {offset} failed verification: {reason}", self.what);
                failed.push(FailedChunk { chunk, offset, reason: reason.clone() });
            }
            format!("{} at {offset}: {reason}", chunk_name(&id))
        };
        match self.repo.chunk(&id) {
            Ok(data) if data.len() as u64 == want => Ok(Arc::new(data)),
            Ok(data) => Err(damaged(format!("holds {} bytes where {want} belong", data.len()))),
            Err(e @ (RepoError::Corrupt(_) | RepoError::NewerFormat { .. } | RepoError::WrongKey(_))) => {
                Err(damaged(e.to_string()))
            }
            // The store could not be reached or read: not damage, but still no data.
            Err(e) => Err(format!("{} at {offset}: {e}", chunk_name(&id))),
        }
    }

    /// One chunk, from the cache or fetched (sharing a fetch already under way).
    async fn chunk(self: &Arc<Self>, slot: usize) -> Result<Arc<Vec<u8>>, String> {
        let fetch = {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = c.get(slot) {
                return Ok(d);
            }
            c.pending.entry(slot).or_default().clone()
        };
        let me = self.clone();
        let result = fetch
            .get_or_init(|| async move {
                me.cache.lock().unwrap_or_else(|p| p.into_inner()).stats.fetches += 1;
                let me2 = me.clone();
                tokio::task::spawn_blocking(move || me2.fetch_blocking(slot))
                    .await
                    .unwrap_or_else(|e| Err(format!("fetching chunk {slot}: {e}")))
            })
            .await
            .clone();
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.pending.get(&slot).is_some_and(|p| Arc::ptr_eq(p, &fetch)) {
            c.pending.remove(&slot);
            if let Ok(d) = &result {
                c.insert(slot, d.clone(), self.config.max_bytes);
            }
        }
        result
    }

    /// Starts fetching the chunks after `last` in the background, those not held or under way.
    fn read_ahead(self: &Arc<Self>, last: usize) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let slots = self.index.ids.len();
        for slot in (last + 1..slots).take(self.config.read_ahead_chunks) {
            if self.id(slot) == ZERO {
                continue;
            }
            {
                let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if c.ready.contains_key(&slot) || c.pending.contains_key(&slot) {
                    continue;
                }
            }
            let me = self.clone();
            rt.spawn(async move {
                let _ = me.chunk(slot).await;
            });
        }
    }

    async fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let chunk = u64::from(self.index.chunk_size);
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.index.capacity)
            .ok_or_else(|| ExportError::Errno { errno: errno::EINVAL, message: "read past the end".into() })?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = usize::try_from(offset / chunk).unwrap_or(usize::MAX);
        let last = usize::try_from((end - 1) / chunk).unwrap_or(usize::MAX);
        // Sequential: this read starts in the chunk where the previous one ended or in the
        // one before (several requests in flight arrive a little out of order).
        let before = self.next_slot.swap(last as u64 + 1, Ordering::Relaxed);
        if self.config.read_ahead_chunks > 0 && (first as u64 == before || first as u64 + 1 == before) {
            self.read_ahead(last);
        }
        let mut at = offset;
        for slot in first..=last {
            let start = slot as u64 * chunk;
            let stop = end.min(start + chunk);
            let o = usize::try_from(at - offset).unwrap_or(0);
            let n = usize::try_from(stop - at).unwrap_or(0);
            let dst = &mut buf[o..o + n];
            if self.id(slot) == ZERO {
                dst.fill(0);
            } else {
                let data = self.chunk(slot).await.map_err(|message| ExportError::Errno {
                    errno: errno::EIO,
                    message: format!("{}: {message}", self.what),
                })?;
                let within = usize::try_from(at - start).unwrap_or(0);
                dst.copy_from_slice(&data[within..within + n]);
            }
            at = stop;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u32) -> Vec<(u32, u32)> {
        let chunk = u64::from(self.index.chunk_size);
        let end = offset.saturating_add(u64::from(length)).min(self.index.capacity);
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        while at < end {
            let slot = usize::try_from(at / chunk).unwrap_or(usize::MAX);
            let stop = end.min((at / chunk + 1) * chunk);
            let flags = if self.id(slot) == ZERO { state::HOLE | state::ZERO } else { 0 };
            let len = u32::try_from(stop - at).unwrap_or(u32::MAX);
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += len,
                _ => out.push((len, flags)),
            }
            at = stop;
        }
        if out.is_empty() {
            out.push((length, 0));
        }
        out
    }
}

impl ExportSource for PointExport {
    fn size(&self) -> u64 {
        self.inner.index.capacity
    }

    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(self.inner.read(offset, buf))
    }

    fn block_status(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<Vec<(u32, u32)>, ExportError>> {
        let out = self.inner.block_status(offset, length);
        Box::pin(async move { Ok(out) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_evicts_the_least_recently_used_and_stays_within_its_bound() {
        let mut c = Cache::default();
        let max = 3 * 100;
        for slot in 0..3 {
            c.insert(slot, Arc::new(vec![0; 100]), max);
        }
        assert!(c.get(0).is_some(), "0 is now the most recently used");
        c.insert(3, Arc::new(vec![0; 100]), max);
        assert!(c.get(1).is_none(), "1 was the least recently used");
        assert!(c.get(0).is_some() && c.get(2).is_some() && c.get(3).is_some());
        for slot in 4..50 {
            c.insert(slot, Arc::new(vec![0; 100]), max);
            assert!(c.stats.bytes <= max);
        }
        assert_eq!(c.stats.peak_bytes, max);
        c.insert(99, Arc::new(vec![0; 301]), max);
        assert!(c.get(99).is_none(), "a chunk larger than the cache is not kept");
        assert_eq!((c.ready.len(), c.lru.len()), (3, 3));
    }
}
