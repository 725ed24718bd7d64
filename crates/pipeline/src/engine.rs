//! The copy engine: moves a plan's extents from a source to a sink with many requests in
//! flight per disk and many disks at once, buffers from one bounded pool, zero detection,
//! a BLAKE3 digest per sink block (when the copy keeps them or the sink uses them), rate
//! limits, retries with backoff, clean cancellation and checkpoints that let an interrupted
//! copy resume.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cbt::{Extent, ExtentSet};

use crate::digest::{Digests, zero_digest};
use crate::limit::{RateLimiter, ReleaseCpuTime};
use crate::pool::BufferPool;
use crate::progress::Progress;
use crate::{BlockError, BlockSink, BlockSource, ErrorKind};

/// How long a job's copies keep retrying a request that fails transiently
/// ([`CopyOptions::retry_for`]): long enough for a busy host to calm down or an S3 gateway or
/// NBD server to restart. The default options leave it at zero, `retries` alone deciding.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// How a copy runs.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// The size of one request in bytes (rounded to whole sink blocks).
    pub request_size: u64,
    /// Requests in flight per disk.
    pub in_flight: usize,
    /// Retries of a transient failure ([`ErrorKind::Transient`]) before the copy fails, at
    /// least.
    pub retries: u32,
    /// And beyond `retries`, how long a request may keep failing transiently before the copy
    /// fails: the engine's patience, for a server restarting (an S3 gateway, an NBD export).
    /// Zero: `retries` alone decides.
    pub retry_for: Duration,
    /// The first backoff; each retry doubles it, up to 5 s.
    pub backoff: Duration,
    /// Checkpoint after this many bytes completed since the last checkpoint.
    pub checkpoint_bytes: u64,
    /// Bytes per second for this job, across its disks.
    pub job_rate: Option<Arc<RateLimiter>>,
    /// Milliseconds each stream sleeps after each request.
    pub release_cpu_time: ReleaseCpuTime,
    /// Look for all-zero blocks in data read and write them as zeros (or skip them).
    pub detect_zeroes: bool,
    /// Keep a BLAKE3 digest per sink block (about 0.23 CPU-seconds per GB on the machines the
    /// bench runs on). Without them the report has none, and the replication flow plans the
    /// next sync in full. A sink that [uses digests](BlockSink::uses_digests) gets them
    /// either way (it would hash the same bytes itself otherwise), so for it they cost nothing.
    pub digests: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            request_size: 4 << 20,
            in_flight: 8,
            retries: 5,
            retry_for: Duration::ZERO,
            backoff: Duration::from_millis(100),
            checkpoint_bytes: 256 << 20,
            job_rate: None,
            release_cpu_time: ReleaseCpuTime(0),
            detect_zeroes: true,
            digests: true,
        }
    }
}

/// A flag that stops copies cleanly: requests in flight finish, the progress is checkpointed,
/// and the copy returns an error of kind [`ErrorKind::Cancelled`].
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Stops every copy sharing this flag (workers look before each request).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the engine shares across every copy of a process: the buffer pool and the global
/// rate limit.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The one buffer pool.
    pub pool: Arc<BufferPool>,
    /// The process-wide rate limit.
    pub global_rate: Option<Arc<RateLimiter>>,
    /// Cancels every copy.
    pub cancel: Cancel,
}

impl Engine {
    /// An engine with a memory cap of `memory` bytes and no global rate limit.
    pub fn new(memory: u64) -> Self {
        Self { pool: BufferPool::new(memory), global_rate: None, cancel: Cancel::default() }
    }
}

/// What a checkpoint records: the ranges durable at the destination, read from which frozen
/// source under which plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    /// The source's frozen identity ([`crate::BlockSource::identity`]).
    pub source: String,
    /// A digest of the plan ([`plan_digest`]).
    pub plan: String,
    /// The ranges already durable.
    pub done: ExtentSet,
}

/// Where a copy saves its checkpoints: a replica's state store (`replica::CheckpointTo`), or any
/// destination that keeps its own (a repository's backup in progress). Called on a blocking
/// thread after the sink's flush, so everything in `durable.done` is durable.
pub trait SaveCheckpoint: Send + Sync + std::fmt::Debug {
    /// Records `durable`, with the sink's digests as of then.
    fn save(&self, durable: &Durable, digests: &Digests) -> Result<(), BlockError>;
}

/// One disk to copy.
pub struct DiskCopy {
    /// Where from.
    pub source: Arc<dyn BlockSource>,
    /// Where to.
    pub sink: Arc<dyn BlockSink>,
    /// Bytes to read and write (whole sink blocks).
    pub read: ExtentSet,
    /// Bytes to write as zeros without reading (whole sink blocks).
    pub zero: ExtentSet,
    /// The sink's digests before the copy (the last committed ones, or all-zero ones when the
    /// sink is new); updated block by block.
    pub digests: Digests,
    /// Ranges a checkpoint shows as durable already.
    pub done: ExtentSet,
    /// Where to checkpoint, if anywhere.
    pub checkpoint: Option<Arc<dyn SaveCheckpoint>>,
}

impl std::fmt::Debug for DiskCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCopy")
            .field("source", &self.source.describe())
            .field("sink", &self.sink.describe())
            .field("read", &self.read.total_bytes())
            .field("zero", &self.zero.total_bytes())
            .finish_non_exhaustive()
    }
}

/// What one disk's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes of data written.
    pub written: u64,
    /// Bytes written as zeros or skipped as zero.
    pub zero: u64,
    /// Bytes a checkpoint showed as done, not copied again.
    pub resumed: u64,
    /// Retried requests.
    pub retries: u64,
    /// Checkpoints saved.
    pub checkpoints: u64,
    /// The sink's digests after the copy, unless the options turned them off.
    pub digests: Option<Digests>,
    /// The wall time.
    pub elapsed: Duration,
}

/// A digest of a plan, so a checkpoint is only reused by the same plan.
pub fn plan_digest(read: &ExtentSet, zero: &ExtentSet, granularity: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&granularity.to_le_bytes());
    for (tag, set) in [(b'r', read), (b'z', zero)] {
        for e in set.iter() {
            h.update(&[tag]);
            h.update(&e.start().to_le_bytes());
            h.update(&e.len().to_le_bytes());
        }
    }
    h.finalize().to_hex()[..32].to_owned()
}

#[derive(Debug, Clone, Copy)]
enum Work {
    Read { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// The most one write-zeroes request covers (NBD lengths are 32-bit).
const MAX_ZERO_REQUEST: u64 = 1 << 30;

struct Disk {
    source: Arc<dyn BlockSource>,
    sink: Arc<dyn BlockSink>,
    granularity: NonZeroU64,
    /// The digest of one all-zero block, computed once.
    zero_block: [u8; 32],
    /// Whether the sink takes each block's digest with its data.
    sink_digests: bool,
    known_zero: bool,
    engine: Engine,
    options: CopyOptions,
    progress: Arc<Progress>,
    queue: Mutex<VecDeque<Work>>,
    done: Mutex<Done>,
    digests: Mutex<Digests>,
    checkpoint: Option<(Arc<dyn SaveCheckpoint>, String)>,
    checkpointing: tokio::sync::Mutex<()>,
    failed: AtomicBool,
}

#[derive(Default)]
struct Done {
    set: ExtentSet,
    since_checkpoint: u64,
}

/// Copies one disk. `progress` may be shared by the disks of one job.
pub async fn copy_disk(
    job: DiskCopy,
    engine: &Engine,
    options: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<CopyReport, BlockError> {
    let started = Instant::now();
    let sink_g = job.sink.granularity();
    if job.source.size() > job.sink.size() {
        return Err(BlockError::invalid(format!(
            "{} ({} bytes) does not fit in {} ({} bytes)",
            job.source.describe(),
            job.source.size(),
            job.sink.describe(),
            job.sink.size()
        )));
    }
    if job.digests.granularity != sink_g.get() || job.digests.capacity != job.source.size() {
        return Err(BlockError::invalid(format!(
            "the digests describe {} bytes in {}-byte blocks, the copy {} bytes in {}-byte blocks",
            job.digests.capacity,
            job.digests.granularity,
            job.source.size(),
            sink_g
        )));
    }
    let mut request = options.request_size.max(sink_g.get()) / sink_g.get() * sink_g.get();
    if let Some(max) = job.source.max_request() {
        request = request.min(max.max(sink_g.get()) / sink_g.get() * sink_g.get()).max(sink_g.get());
    }
    let read_left = job.read.difference(&job.done);
    let zero_left = job.zero.difference(&job.done);
    let resumed = job.read.union(&job.zero).intersection(&job.done).total_bytes();
    // This disk's own counts, which also add up in the job's.
    let progress = Arc::new(Progress::child_of(progress));
    progress.plan(job.read.total_bytes() + job.zero.total_bytes(), resumed);

    let mut queue = VecDeque::new();
    // Zeroing first: it is cheap, and a replica's stale data goes away early.
    for e in zero_left.iter() {
        split_aligned(*e, MAX_ZERO_REQUEST / sink_g.get() * sink_g.get(), |offset, len| {
            queue.push_back(Work::Zero { offset, len })
        });
    }
    for e in read_left.iter() {
        split_aligned(*e, request, |offset, len| queue.push_back(Work::Read { offset, len }));
    }
    let checkpoint = job.checkpoint.map(|to| {
        let plan = plan_digest(&job.read, &job.zero, sink_g.get());
        (to, plan)
    });
    let disk = Arc::new(Disk {
        known_zero: job.sink.known_zero(),
        sink_digests: job.sink.uses_digests(),
        source: job.source,
        sink: job.sink,
        granularity: sink_g,
        zero_block: zero_digest(sink_g.get()),
        engine: engine.clone(),
        options: CopyOptions { request_size: request, ..options.clone() },
        progress,
        queue: Mutex::new(queue),
        done: Mutex::new(Done { set: job.done, since_checkpoint: 0 }),
        digests: Mutex::new(job.digests),
        checkpoint,
        checkpointing: tokio::sync::Mutex::new(()),
        failed: AtomicBool::new(false),
    });

    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.in_flight.max(1) {
        let d = disk.clone();
        workers.spawn(async move { d.worker().await });
    }
    let mut first_error = None;
    while let Some(r) = workers.join_next().await {
        let r = r.unwrap_or_else(|e| Err(BlockError::fatal("a copy worker panicked").with_source(e)));
        if let Err(e) = r {
            disk.failed.store(true, Ordering::SeqCst);
            first_error.get_or_insert(e);
        }
    }
    let cancelled = engine.cancel.is_cancelled();
    if first_error.is_some() || cancelled {
        // Keep what is durable for the next attempt; a failure to do so is secondary.
        if let Err(e) = disk.save_checkpoint(true).await {
            tracing::warn!("could not save the checkpoint of {}: {e}", disk.sink.describe());
        }
        return Err(first_error.unwrap_or_else(BlockError::cancelled));
    }
    let counts = disk.progress.snapshot();
    let digests = options.digests.then(|| disk.digests.lock().unwrap_or_else(|p| p.into_inner()).clone());
    Ok(CopyReport {
        read: counts.read,
        written: counts.written,
        zero: counts.zero,
        resumed,
        retries: counts.retries,
        checkpoints: counts.checkpoints,
        digests,
        elapsed: started.elapsed(),
    })
}

/// Copies many disks, at most `at_once` at a time, all drawing on the engine's one pool.
pub async fn copy_disks(
    jobs: Vec<DiskCopy>,
    engine: &Engine,
    options: &CopyOptions,
    at_once: usize,
    progress: Arc<Progress>,
) -> Vec<Result<CopyReport, BlockError>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(at_once.max(1)));
    let mut tasks = Vec::new();
    for job in jobs {
        let (gate, engine, options, progress) = (gate.clone(), engine.clone(), options.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await.map_err(|_| BlockError::cancelled())?;
            copy_disk(job, &engine, &options, progress).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(BlockError::fatal("a copy task panicked").with_source(e))));
    }
    out
}

/// Splits `e` at multiples of `step` (absolute offsets), so requests stay aligned.
fn split_aligned(e: Extent, step: u64, mut f: impl FnMut(u64, u64)) {
    let mut at = e.start();
    while at < e.end() {
        let next = ((at / step) + 1).saturating_mul(step).min(e.end());
        f(at, next - at);
        at = next;
    }
}

/// Whether `buf` is all zeros. Checks a small prefix first, since data rarely starts with a
/// long zero run, then the rest in vectorisable blocks.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, rest) = buf.split_at(buf.len().min(64));
    head.iter().all(|&b| b == 0) && rest.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl Disk {
    fn stopping(&self) -> bool {
        self.failed.load(Ordering::Relaxed) || self.engine.cancel.is_cancelled()
    }

    fn next(&self) -> Option<Work> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
    }

    fn push_front(&self, w: Work) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push_front(w);
    }

    /// Sets the digests of the blocks in `[offset, offset + len)` to those of zero blocks.
    fn zeroed_digests(&self, offset: u64, len: u64) {
        let g = self.granularity.get();
        let mut d = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        for block in offset / g..(offset + len).div_ceil(g) {
            let blen = g.min(d.capacity - block * g);
            let digest = if blen == g { self.zero_block } else { zero_digest(blen) };
            if let Some(slot) = usize::try_from(block).ok().and_then(|b| d.blocks.get_mut(b)) {
                *slot = digest;
            }
        }
    }

    async fn worker(&self) -> Result<(), BlockError> {
        while !self.stopping() {
            let Some(work) = self.next() else { return Ok(()) };
            match work {
                Work::Zero { offset, len } => {
                    if !self.known_zero {
                        self.retrying("zeroing", || self.sink.write_zeroes(offset, len)).await?;
                    }
                    // A zeroed block's digest is the zero block's, whatever the sink held.
                    self.zeroed_digests(offset, len);
                    self.progress.zero(len);
                    self.completed(offset, len).await?;
                }
                Work::Read { offset, len } => {
                    let g = self.granularity.get();
                    let mut lease = self.engine.pool.lease(len, g).await;
                    let mut buf = lease.take();
                    // Under memory pressure the buffer may be smaller: copy what fits, whole
                    // blocks, and put the rest back.
                    let take = (buf.len() as u64 / g * g).clamp(g.min(len), len);
                    if take < len {
                        self.push_front(Work::Read { offset: offset + take, len: len - take });
                    }
                    buf.truncate(usize::try_from(take).unwrap_or(usize::MAX));
                    let buf = self.copy_one(offset, buf).await?;
                    if !buf.is_empty() {
                        lease.put(buf);
                    }
                    drop(lease);
                    self.completed(offset, take).await?;
                }
            }
            self.options.release_cpu_time.pause().await;
        }
        Ok(())
    }

    async fn copy_one(&self, offset: u64, mut buf: BytesMut) -> Result<BytesMut, BlockError> {
        let len = buf.len() as u64;
        if let Some(r) = &self.engine.global_rate {
            r.take(len).await;
        }
        if let Some(r) = &self.options.job_rate {
            r.take(len).await;
        }
        let mut spare = Some(buf);
        buf = self
            .retrying("reading", || {
                let b = spare.take().unwrap_or_else(|| BytesMut::zeroed(usize::try_from(len).unwrap_or(0)));
                self.source.read_at(offset, b)
            })
            .await?;
        self.progress.read(len);

        // Per sink block: its digest, and whether it is all zeros. Hashing a request takes a
        // millisecond or more, so it runs off the async threads, which keep the sockets moving.
        let g = usize::try_from(self.granularity.get()).unwrap_or(usize::MAX);
        let first_block = offset / self.granularity.get();
        let digests = self.options.digests || self.sink_digests;
        let (detect, zero_block) = (self.options.detect_zeroes, self.zero_block);
        let (buf, zero_flags, hashes) = tokio::task::spawn_blocking(move || {
            let mut zero_flags = Vec::with_capacity(buf.len().div_ceil(g));
            let mut hashes = Vec::with_capacity(buf.len().div_ceil(g));
            for block in buf.chunks(g) {
                let zero = detect && is_zero(block);
                hashes.push(match (zero, block.len() == g) {
                    (true, true) => zero_block,
                    (true, false) => zero_digest(block.len() as u64),
                    (false, _) if digests => *blake3::hash(block).as_bytes(),
                    (false, _) => [0; 32],
                });
                zero_flags.push(zero);
            }
            (buf, zero_flags, hashes)
        })
        .await
        .map_err(|e| BlockError::fatal("a hashing task").with_source(e))?;
        // Runs of equal flags become one write or one zeroing each, as slices of one buffer.
        let whole = buf.freeze();
        let mut i = 0;
        while i < zero_flags.len() {
            let mut j = i;
            while j < zero_flags.len() && zero_flags[j] == zero_flags[i] {
                j += 1;
            }
            let (a, b) = (i * g, (j * g).min(whole.len()));
            let at = offset + a as u64;
            let plen = (b - a) as u64;
            if zero_flags[i] {
                if !self.known_zero {
                    self.retrying("zeroing", || self.sink.write_zeroes(at, plen)).await?;
                }
                self.progress.zero(plen);
            } else {
                // The run starts on a block boundary, so its blocks' digests are `hashes[i..j]`.
                let run = &hashes[i..j];
                self.retrying("writing", || match self.sink_digests {
                    true => self.sink.write_at_digested(at, whole.slice(a..b), run),
                    false => self.sink.write_at(at, whole.slice(a..b)),
                })
                .await?;
                self.progress.written(plen);
            }
            i = j;
        }
        {
            let mut d = self.digests.lock().unwrap_or_else(|p| p.into_inner());
            for (k, h) in hashes.into_iter().enumerate() {
                if let Some(slot) = usize::try_from(first_block + k as u64).ok().and_then(|b| d.blocks.get_mut(b)) {
                    *slot = h;
                }
            }
        }
        // Every slice is gone with its finished write, so the buffer is ours again; a sink that
        // kept one costs a fresh buffer next time, nothing else.
        Ok(whole.try_into_mut().unwrap_or_default())
    }

    /// The engine's one retry loop: a [`ErrorKind::Transient`] failure is tried again after a
    /// backoff that doubles up to 5 s, at least `retries` times and for at least `retry_for`;
    /// any other kind fails at once. Every request it wraps is idempotent: reads, writes of
    /// the same bytes to the same place, zeroing, flushes.
    async fn retrying<'a, T, F>(&'a self, what: &str, mut attempt: F) -> Result<T, BlockError>
    where
        F: FnMut() -> crate::IoFuture<'a, T>,
    {
        let mut tries = 0u32;
        let mut failing_since = None;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.kind() == ErrorKind::Transient && !self.stopping() && {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        tries < self.options.retries || since.elapsed() < self.options.retry_for
                    } =>
                {
                    let wait = self.options.backoff.saturating_mul(1 << tries.min(6)).min(Duration::from_secs(5));
                    tracing::warn!("{what} {}: {e}; retrying in {wait:?}", self.source.describe());
                    self.progress.retry();
                    tries += 1;
                    tokio::time::sleep(wait).await;
                }
                Err(e) if tries > 0 => return Err(e.gave_up_after(tries + 1)),
                Err(e) => return Err(e),
            }
        }
    }

    async fn completed(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let due = {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = Extent::new(offset, len) {
                d.set.insert(e);
            }
            d.since_checkpoint += len;
            d.since_checkpoint >= self.options.checkpoint_bytes
        };
        if due { self.save_checkpoint(false).await } else { Ok(()) }
    }

    /// Flushes the sink, then records what was done before the flush as durable. With `wait`
    /// false, a checkpoint already being saved by another worker makes this one unnecessary.
    async fn save_checkpoint(&self, wait: bool) -> Result<(), BlockError> {
        let Some((to, plan)) = &self.checkpoint else { return Ok(()) };
        let _one = if wait {
            self.checkpointing.lock().await
        } else {
            match self.checkpointing.try_lock() {
                Ok(g) => g,
                Err(_) => return Ok(()),
            }
        };
        let (done, digests) = {
            let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
            d.since_checkpoint = 0;
            (d.set.clone(), self.digests.lock().unwrap_or_else(|p| p.into_inner()).clone())
        };
        // A flush makes durable what was written; asking again is harmless.
        self.retrying("flushing", || self.sink.flush()).await?;
        let durable = Durable { source: self.source.identity(), plan: plan.clone(), done };
        let to = to.clone();
        tokio::task::spawn_blocking(move || to.save(&durable, &digests))
            .await
            .map_err(|e| BlockError::fatal("a checkpoint task").with_source(e))??;
        self.progress.checkpoint();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_finds_one_stray_byte_anywhere() {
        let mut b = vec![0u8; 1 << 20];
        assert!(is_zero(&b));
        for at in [0, 63, 64, 4095, 4096, (1 << 20) - 1] {
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at}");
            b[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn requests_split_at_absolute_multiples() {
        let mut got = Vec::new();
        split_aligned(Extent::new(3 << 20, 6 << 20).unwrap(), 4 << 20, |o, l| got.push((o >> 20, l >> 20)));
        assert_eq!(got, [(3, 1), (4, 4), (8, 1)]);
    }
}
