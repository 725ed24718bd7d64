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

use crate::digest::{BlockDigester, Digests, zero_digest};
use crate::io::join_all;
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
    /// Checkpoint after this many bytes completed since the last checkpoint...
    pub checkpoint_bytes: u64,
    /// ...and no sooner than this after the last one (or the start): a checkpoint flushes the
    /// sink, which a copy that ends in a second does not need five times. Zero: bytes alone
    /// decide.
    pub checkpoint_interval: Duration,
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
            checkpoint_interval: Duration::ZERO,
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
    /// The sink blocks the copy writes with data (whole blocks: the unit of digests and of a
    /// repository's chunks, not of I/O, which `fetch` and `keep` decide).
    pub read: ExtentSet,
    /// Bytes to write as zeros without reading (whole sink blocks).
    pub zero: ExtentSet,
    /// Inside `read`, the bytes to read from the source: its own extents, never widened to a
    /// block. `None`: all of `read`. What is neither fetched nor kept reads as zeros.
    pub fetch: Option<ExtentSet>,
    /// Inside `read`, bytes the sink holds already (an incremental's unchanged bytes): never
    /// written. When a whole block is needed (a repository's chunk, a digest), they are read
    /// back from the sink ([`BlockSink::read_back`]), or from the source if it cannot.
    pub keep: ExtentSet,
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
            .field("fetch", &self.fetch.as_ref().map(ExtentSet::total_bytes))
            .field("keep", &self.keep.total_bytes())
            .finish_non_exhaustive()
    }
}

/// What one disk's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes read back from the sink to complete the blocks an incremental touches.
    pub read_back: u64,
    /// Bytes of touched blocks left as the sink held them.
    pub kept: u64,
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
    /// Digests blocks, without hashing the zeros a request is known to hold; `None` when no
    /// digest is kept.
    digester: Option<Arc<BlockDigester>>,
    /// Whether the sink takes each block's digest with its data.
    sink_digests: bool,
    /// Whether the sink takes whole blocks only (else exact ranges).
    whole_blocks: bool,
    /// Whether kept bytes are needed in memory (for whole blocks or digests).
    materialize: bool,
    /// Within `read`, what to take from the source (`None`: everything).
    fetch: Option<ExtentSet>,
    /// Within `read`, what the sink holds already.
    keep: ExtentSet,
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

struct Done {
    set: ExtentSet,
    since_checkpoint: u64,
    /// When the last checkpoint was saved, or the copy started.
    last_checkpoint: Instant,
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
    let fetch = job.fetch.map(|f| f.intersection(&job.read));
    let keep = job.keep.intersection(&job.read);
    for e in read_left.iter() {
        split_aligned(*e, request, |offset, len| match &fetch {
            None => queue.push_back(Work::Read { offset, len }),
            Some(fetch) => narrow(&mut queue, fetch, &keep, sink_g.get(), offset, len),
        });
    }
    let checkpoint = job.checkpoint.map(|to| {
        let plan = plan_digest(&job.read, &job.zero, sink_g.get());
        (to, plan)
    });
    let whole_blocks = job.sink.whole_blocks();
    let digester = (options.digests || job.sink.uses_digests()).then(|| Arc::new(BlockDigester::new(sink_g.get())));
    let disk = Arc::new(Disk {
        known_zero: job.sink.known_zero(),
        sink_digests: job.sink.uses_digests(),
        whole_blocks,
        materialize: whole_blocks || options.digests || job.sink.uses_digests(),
        fetch,
        keep,
        source: job.source,
        sink: job.sink,
        granularity: sink_g,
        zero_block: zero_digest(sink_g.get()),
        digester,
        engine: engine.clone(),
        options: CopyOptions { request_size: request, ..options.clone() },
        progress,
        queue: Mutex::new(queue),
        done: Mutex::new(Done { set: job.done, since_checkpoint: 0, last_checkpoint: Instant::now() }),
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
        read_back: counts.read_back,
        kept: counts.kept,
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

/// Queues one request window `[offset, offset + len)` of whole blocks: the blocks from the
/// first to the last that hold a byte to fetch or keep are read; blocks around them hold
/// neither, so they are zeros, queued as such.
fn narrow(queue: &mut VecDeque<Work>, fetch: &ExtentSet, keep: &ExtentSet, g: u64, offset: u64, len: u64) {
    let Some(window) = Extent::new(offset, len) else { return };
    let first =
        [fetch.within(window).next(), keep.within(window).next()].into_iter().flatten().map(Extent::start).min();
    let last = [fetch.within(window).last(), keep.within(window).last()].into_iter().flatten().map(Extent::end).max();
    let (Some(first), Some(last)) = (first, last) else {
        queue.push_back(Work::Zero { offset, len });
        return;
    };
    let (lo, hi) = ((first - first % g).max(offset), last.div_ceil(g).saturating_mul(g).min(offset + len));
    if lo > offset {
        queue.push_back(Work::Zero { offset, len: lo - offset });
    }
    queue.push_back(Work::Read { offset: lo, len: hi - lo });
    if hi < offset + len {
        queue.push_back(Work::Zero { offset: hi, len: offset + len - hi });
    }
}

/// What one part of a request holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Read from the source.
    Fetch,
    /// What the sink holds already.
    Keep,
    /// Zeros.
    Zero,
}

/// The parts of `range`, in order and covering it: the fetched and kept extents, zeros
/// between them. `fetch` `None` fetches everything.
fn parts(range: Extent, fetch: Option<&ExtentSet>, keep: &ExtentSet) -> Vec<(Part, u64, u64)> {
    let Some(fetch) = fetch else { return vec![(Part::Fetch, range.start(), range.len())] };
    let mut marked: Vec<(Part, Extent)> = fetch.within(range).map(|e| (Part::Fetch, e)).collect();
    marked.extend(keep.within(range).map(|e| (Part::Keep, e)));
    marked.sort_by_key(|(_, e)| e.start());
    let mut out = Vec::with_capacity(marked.len() * 2 + 1);
    let mut at = range.start();
    for (part, e) in marked {
        // `fetch` and `keep` are disjoint; a caller that broke that gets the overlap fetched.
        let start = e.start().max(at);
        if start >= e.end() {
            continue;
        }
        if start > at {
            out.push((Part::Zero, at, start - at));
        }
        out.push((part, start, e.end() - start));
        at = e.end();
    }
    if at < range.end() {
        out.push((Part::Zero, at, range.end() - at));
    }
    out
}

/// The unit zeros are looked for in fetched data written to a sink of exact ranges: a run of
/// zeros this long (aligned) becomes a hole or a write-zeroes, as qemu-img's and nbdcopy's
/// sparse checks do.
const ZERO_UNIT: u64 = 64 << 10;

/// What a sink of exact ranges is sent for one request: data, zeros, or nothing (kept).
fn exact_writes(parts: &[(Part, u64, u64)], offset: u64, buf: &[u8], detect: bool) -> Vec<(Part, u64, u64)> {
    let mut out: Vec<(Part, u64, u64)> = Vec::with_capacity(parts.len());
    let mut push = |part: Part, at: u64, len: u64| match out.last_mut() {
        Some((p, a, l)) if *p == part && *a + *l == at => *l += len,
        _ => out.push((part, at, len)),
    };
    for &(part, at, len) in parts {
        if part != Part::Fetch || !detect {
            push(part, at, len);
            continue;
        }
        let Some(e) = Extent::new(at, len) else { continue };
        split_aligned(e, ZERO_UNIT, |u, n| {
            let from = usize::try_from(u - offset).unwrap_or(usize::MAX);
            let to = usize::try_from(u + n - offset).unwrap_or(usize::MAX);
            let zero = buf.get(from..to).is_some_and(is_zero);
            push(if zero { Part::Zero } else { Part::Fetch }, u, n);
        });
    }
    out
}

/// The zero parts of `parts` (in order, adjacent ones merged) as `(start, end)`.
fn zero_ranges(parts: &[(Part, u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(_, at, len) in parts.iter().filter(|p| p.0 == Part::Zero) {
        match out.last_mut() {
            Some(last) if last.1 == at => last.1 += len,
            _ => out.push((at, at + len)),
        }
    }
    out
}

/// The ranges of `zeros` (absolute, sorted) that meet the block `[at, at + len)`, clipped to
/// it and made relative to its start.
fn within_block(zeros: &[(u64, u64)], at: u64, len: u64) -> Vec<(u64, u64)> {
    let first = zeros.partition_point(|&(_, end)| end <= at);
    zeros
        .get(first..)
        .unwrap_or_default()
        .iter()
        .take_while(|&&(start, _)| start < at + len)
        .map(|&(start, end)| (start.max(at) - at, end.min(at + len) - at))
        .collect()
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
                    // Always a whole request's buffer, passed whole with this request's length
                    // beside it: one size of buffer circulates, and none is faulted in afresh
                    // for a size not seen yet.
                    let mut lease = self.engine.pool.lease(self.options.request_size.max(len), g).await;
                    let buf = lease.take();
                    // Under memory pressure the buffer may be smaller: copy what fits, whole
                    // blocks, and put the rest back.
                    let take = (buf.len() as u64 / g * g).clamp(g.min(len), len);
                    if take < len {
                        self.push_front(Work::Read { offset: offset + take, len: len - take });
                    }
                    let buf = self.copy_one(offset, take, buf).await?;
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

    /// Reads one request of `len` bytes into the start of `buf`: its fetched parts from the
    /// source (at once), its kept parts back from the sink when whole blocks are needed, zeros
    /// elsewhere. The buffer comes back whole, its bytes past `len` untouched, so the pool's
    /// buffers keep one length and are never cleared again to grow back to it.
    async fn assemble(
        &self,
        offset: u64,
        len: u64,
        buf: BytesMut,
    ) -> Result<(BytesMut, Vec<(Part, u64, u64)>), BlockError> {
        let Some(range) = Extent::new(offset, len) else { return Ok((buf, Vec::new())) };
        let mut buf = buf;
        let rest = buf.split_off(usize::try_from(len).unwrap_or(usize::MAX).min(buf.len()));
        let mut parts = parts(range, self.fetch.as_ref(), &self.keep);
        let kept = parts.iter().any(|p| p.0 == Part::Keep);
        let mut filled = false;
        if kept && self.materialize {
            if self.sink.can_read_back() {
                let mut spare = Some(buf);
                buf = self
                    .retrying("reading back", || {
                        let b = spare.take().unwrap_or_else(|| BytesMut::zeroed(usize::try_from(len).unwrap_or(0)));
                        self.sink.read_back(offset, b)
                    })
                    .await?;
                self.progress.read_back(len);
                filled = true;
            } else {
                // The sink cannot give them back: the source has the same bytes.
                for p in parts.iter_mut().filter(|p| p.0 == Part::Keep) {
                    p.0 = Part::Fetch;
                }
            }
        }
        let fetched: u64 = parts.iter().filter(|p| p.0 == Part::Fetch).map(|p| p.2).sum();
        if let Some(r) = &self.engine.global_rate {
            r.take(fetched).await;
        }
        if let Some(r) = &self.options.job_rate {
            r.take(fetched).await;
        }
        let mut pieces: Vec<Option<BytesMut>> = Vec::with_capacity(parts.len());
        let mut reads = Vec::new();
        for &(part, at, plen) in &parts {
            let mut piece = buf.split_to(usize::try_from(plen).unwrap_or(usize::MAX));
            match part {
                Part::Fetch => reads.push((pieces.len(), at)),
                // A sink of whole blocks is sent them, zeros included; a sink of exact ranges is
                // sent only what was fetched, and the digests read the gaps as zeros.
                Part::Zero if self.whole_blocks => piece.fill(0),
                Part::Zero => {}
                // Never written; zeros where they only stand in for what the sink holds.
                Part::Keep if !filled => piece.fill(0),
                Part::Keep => {}
            }
            pieces.push(Some(piece));
        }
        let futures: Vec<crate::IoFuture<'_, (usize, BytesMut)>> = reads
            .into_iter()
            .map(|(i, at)| {
                let piece = pieces.get_mut(i).and_then(Option::take).unwrap_or_default();
                Box::pin(async move { Ok((i, self.read_source(at, piece).await?)) }) as crate::IoFuture<'_, _>
            })
            .collect();
        for (i, piece) in join_all(futures).await? {
            if let Some(slot) = pieces.get_mut(i) {
                *slot = Some(piece);
            }
        }
        let mut whole = BytesMut::new();
        for piece in pieces.into_iter().flatten() {
            if whole.is_empty() {
                whole = piece;
            } else {
                whole.unsplit(piece);
            }
        }
        whole.unsplit(rest);
        Ok((whole, parts))
    }

    /// Reads `buf.len()` bytes of the source at `at`, retrying.
    async fn read_source(&self, at: u64, buf: BytesMut) -> Result<BytesMut, BlockError> {
        let len = buf.len();
        let mut spare = Some(buf);
        let b = self
            .retrying("reading", || {
                let b = spare.take().unwrap_or_else(|| BytesMut::zeroed(len));
                self.source.read_at(at, b)
            })
            .await?;
        self.progress.read(len as u64);
        Ok(b)
    }

    /// Copies the request `[offset, offset + len)` through `buf` (at least `len` long), and
    /// hands the buffer back whole for the pool.
    async fn copy_one(&self, offset: u64, len: u64, buf: BytesMut) -> Result<BytesMut, BlockError> {
        let (buf, parts) = self.assemble(offset, len, buf).await?;
        let full = buf.freeze();
        let whole = full.slice(..usize::try_from(len).unwrap_or(usize::MAX).min(full.len()));
        // Per sink block: its digest, and whether it is all zeros. Hashing a request takes a
        // millisecond or more, so it runs off the async threads, which keep the sockets moving.
        let hashes = if self.whole_blocks {
            // The blocks are written with their digests: hashed first.
            let (zero_flags, hashes) = self.digest_blocks(offset, whole.clone(), parts).await?;
            self.write_blocks(offset, &whole, &zero_flags, &hashes).await?;
            hashes
        } else {
            // Exact ranges: what was fetched is split into data and zero runs, then written
            // while its blocks are hashed, so the disk and the CPU work at once.
            // Zero detection stays on this thread: a data block fails the check at its first
            // bytes, and only blocks that are zeros are scanned whole, once.
            let writes = exact_writes(&parts, offset, &whole, self.options.detect_zeroes);
            let hashing = self.digest_blocks(offset, whole.clone(), writes.clone());
            let (written, hashed) = tokio::join!(self.write_exact(offset, &whole, writes), hashing);
            written?;
            hashed?.1
        };
        {
            let first_block = offset / self.granularity.get();
            let mut d = self.digests.lock().unwrap_or_else(|p| p.into_inner());
            for (k, h) in hashes.into_iter().enumerate() {
                if let Some(slot) = usize::try_from(first_block + k as u64).ok().and_then(|b| d.blocks.get_mut(b)) {
                    *slot = h;
                }
            }
        }
        // Every slice is gone with its finished write, so the buffer is ours again; a sink that
        // kept one costs a fresh buffer next time, nothing else.
        drop(whole);
        Ok(full.try_into_mut().unwrap_or_default())
    }

    /// Per block of `buf` (at `offset`): whether it is all zeros, and its digest. `parts` says
    /// what is known to be zeros: the gaps between what was fetched or kept, and, for exact
    /// ranges, the zero runs found in what was fetched. The digests skip them.
    async fn digest_blocks(
        &self,
        offset: u64,
        buf: bytes::Bytes,
        parts: Vec<(Part, u64, u64)>,
    ) -> Result<(Vec<bool>, Vec<[u8; 32]>), BlockError> {
        let g = usize::try_from(self.granularity.get()).unwrap_or(usize::MAX);
        let digester = self.digester.clone();
        let (detect, zero_block, whole_blocks) = (self.options.detect_zeroes, self.zero_block, self.whole_blocks);
        // Exact ranges without digests neither scan nor hash: no thread to hop to.
        let cheap = digester.is_none() && !whole_blocks;
        let work = move || {
            let zeros = zero_ranges(&parts);
            let mut zero_flags = Vec::with_capacity(buf.len().div_ceil(g));
            let mut hashes = Vec::with_capacity(buf.len().div_ceil(g));
            for (k, block) in buf.chunks(g).enumerate() {
                let blen = block.len() as u64;
                let block_zeros = within_block(&zeros, offset + (k * g) as u64, blen);
                // Whole blocks are scanned; exact ranges were, in `exact_writes`, and their
                // gaps were never cleared, so only what is known counts.
                let zero = match whole_blocks {
                    true => detect && is_zero(block),
                    false => block_zeros.first().is_some_and(|&(a, b)| a == 0 && b == blen),
                };
                hashes.push(match (zero, blen == g as u64, &digester) {
                    (true, true, _) => zero_block,
                    (true, false, _) => zero_digest(blen),
                    (false, _, Some(d)) => d.digest(block, &block_zeros),
                    (false, _, None) => [0; 32],
                });
                zero_flags.push(zero);
            }
            (zero_flags, hashes)
        };
        if cheap {
            return Ok(work());
        }
        tokio::task::spawn_blocking(work).await.map_err(|e| BlockError::fatal("a hashing task").with_source(e))
    }

    /// Writes a request to a sink of exact ranges: its data in one batch, its zero runs beside
    /// it (the sink bounds how many of its writes overlap).
    async fn write_exact(
        &self,
        offset: u64,
        whole: &bytes::Bytes,
        writes: Vec<(Part, u64, u64)>,
    ) -> Result<(), BlockError> {
        let slice = |at: u64, len: u64| {
            let a = usize::try_from(at - offset).unwrap_or(usize::MAX);
            let b = usize::try_from(at + len - offset).unwrap_or(usize::MAX);
            whole.slice(a..b)
        };
        let data: Vec<(u64, bytes::Bytes)> =
            writes.iter().filter(|w| w.0 == Part::Fetch).map(|&(_, at, len)| (at, slice(at, len))).collect();
        let data_bytes: u64 = data.iter().map(|(_, d)| d.len() as u64).sum();
        let mut futures: Vec<crate::IoFuture<'_, ()>> = Vec::new();
        if !data.is_empty() {
            futures.push(Box::pin(async move {
                self.retrying("writing", || self.sink.write_many(data.clone())).await?;
                self.progress.written(data_bytes);
                Ok(())
            }));
        }
        for (part, at, len) in writes {
            match part {
                Part::Fetch => {}
                Part::Zero => futures.push(Box::pin(async move {
                    if !self.known_zero {
                        self.retrying("zeroing", || self.sink.write_zeroes(at, len)).await?;
                    }
                    self.progress.zero(len);
                    Ok(())
                })),
                Part::Keep => self.progress.kept(len),
            }
        }
        join_all(futures).await.map(drop)
    }

    /// Writes whole blocks: runs of equal zero flags become one write or one zeroing each, as
    /// slices of one buffer.
    async fn write_blocks(
        &self,
        offset: u64,
        whole: &bytes::Bytes,
        zero_flags: &[bool],
        hashes: &[[u8; 32]],
    ) -> Result<(), BlockError> {
        let g = usize::try_from(self.granularity.get()).unwrap_or(usize::MAX);
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
        Ok(())
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
                && d.last_checkpoint.elapsed() >= self.options.checkpoint_interval
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
            d.last_checkpoint = Instant::now();
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
