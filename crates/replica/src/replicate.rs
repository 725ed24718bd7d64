//! The replication flow: bring one destination up to date with one frozen source, full the
//! first time and incremental from CBT afterwards, resuming an interrupted copy of the same job
//! and snapshot, and committing the sync state only once the sink has made the data durable.

use std::sync::Arc;

use bytes::BytesMut;

use cbt::{Changes, CopyPlan, CurrentDisk, Destination, FullReason};

use pipeline::progress::Progress;
use pipeline::{
    BlockError, BlockSink, BlockSource, CopyOptions, CopyReport, Digests, DiskCopy, Engine, copy_disk, plan_digest,
};

use crate::state::{CheckpointTo, StateStore, SyncKey, SyncState};

/// One disk to bring up to date at one destination.
pub struct SyncJob {
    /// The frozen source (a snapshot).
    pub source: Arc<dyn BlockSource>,
    /// The destination.
    pub sink: Arc<dyn BlockSink>,
    /// Where states and checkpoints live.
    pub store: StateStore,
    /// Whose state.
    pub key: SyncKey,
    /// The job ID: a restart of the same job on the same snapshot resumes.
    pub job: String,
    /// The disk as it is in the snapshot. When `allocated` is `None`, the source's own
    /// allocation map is used.
    pub current: CurrentDisk,
    /// The changed areas since the committed change ID, if they were queried.
    pub changes: Changes,
}

impl std::fmt::Debug for SyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncJob").field("key", &self.key).field("job", &self.job).finish_non_exhaustive()
    }
}

/// What a sync did.
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    /// Why the copy was full, or `None` for an incremental.
    pub full_reason: Option<FullReason>,
    /// Bytes the plan covered.
    pub planned: u64,
    /// Whether it continued an interrupted copy.
    pub resumed: bool,
    /// How the ranges an interrupted copy had done were trusted, when there was one of this
    /// job and source to continue.
    pub resume_check: Option<ResumeCheck>,
    /// Whether the destination was left inconsistent by an earlier copy that did not finish
    /// (this sync has made it whole).
    pub was_dirty: bool,
    /// What the engine did.
    pub report: CopyReport,
    /// The committed state.
    pub state: SyncState,
    /// What was odd on the way, for the log.
    pub warnings: Vec<String>,
}

/// How a resumed copy knows that the ranges its checkpoint shows as done still hold the source's
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeCheck {
    /// The source's identity proves it frozen (a snapshot, a VMDK's CIDs): trusted as they are.
    Frozen,
    /// The source may have been written (a block device, an NBD export, a raw file): the done
    /// ranges were read again and compared with their digests; blocks that differ are copied
    /// again.
    Verified {
        /// Bytes read again.
        checked: u64,
        /// Bytes whose digest differed, copied again.
        changed: u64,
    },
    /// The source may have been written and the copy keeps no digests to check against: the
    /// checkpoint was dropped and the copy started over.
    StartedOver,
}

impl ResumeCheck {
    /// A short name for JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Frozen => "frozen",
            Self::Verified { .. } => "verified",
            Self::StartedOver => "started_over",
        }
    }
}

/// Runs one sync to completion, or fails leaving the destination marked dirty and the progress
/// checkpointed.
pub async fn sync(
    mut job: SyncJob,
    engine: &Engine,
    options: &CopyOptions,
    progress: Arc<Progress>,
) -> Result<SyncOutcome, BlockError> {
    let g = job.sink.granularity();
    let capacity = job.current.capacity;
    if capacity != job.source.size() {
        return Err(BlockError::invalid(format!(
            "the disk's capacity is {capacity} bytes but {} has {}",
            job.source.describe(),
            job.source.size()
        )));
    }
    let mut warnings = Vec::new();
    let store = job.store.clone();
    let previous = on_store(&store, &job.key, |s, k| s.load(k)).await?;
    let was_dirty = previous.as_ref().is_some_and(|p| p.dirty.is_some());
    if let Some(p) = &previous
        && let Some(d) = &p.dirty
    {
        warnings.push(format!(
            "{} was left inconsistent by job {} (since {}); this sync makes it whole",
            job.sink.describe(),
            d.job,
            d.since
        ));
    }
    if job.current.allocated.is_none() {
        job.current.allocated = job.source.allocation().await?.map(|a| a.data);
    }
    // A checkpoint of this job on this snapshot is resumed; any other is stale.
    let mut checkpoint = on_store(&store, &job.key, |s, k| s.load_checkpoint(k)).await?;
    if let Some((cp, _)) = &checkpoint
        && (cp.job != job.job || cp.source != job.source.identity())
    {
        warnings.push(format!(
            "dropped the checkpoint of job {} ({}); re-planned from the last committed state",
            cp.job,
            if cp.source != job.source.identity() { "its snapshot is gone" } else { "another job" }
        ));
        checkpoint = None;
        on_store(&store, &job.key, |s, k| s.drop_checkpoint(k)).await?;
    }
    // A source that may have changed under the same identity can only be resumed by checking
    // the done ranges against their digests; without digests, nothing can be checked.
    let mut resume_check = None;
    if checkpoint.is_some() && !job.source.frozen() && !options.digests {
        warnings.push(format!(
            "{} cannot be proven unchanged since the interrupted copy, and without digests its copied ranges \
             cannot be checked: starting over",
            job.source.describe()
        ));
        checkpoint = None;
        resume_check = Some(ResumeCheck::StartedOver);
        on_store(&store, &job.key, |s, k| s.drop_checkpoint(k)).await?;
    }
    // Whether the destination held anything is decided when the job starts: a resumed job's
    // own writes do not count.
    let mut fresh = match &checkpoint {
        Some((cp, _)) => cp.fresh,
        None => job.sink.known_zero(),
    };

    let committed = previous.as_ref().and_then(|p| p.committed.as_ref());
    let destination = Destination { granularity: g, holds_data: !fresh };
    let mut planned = cbt::plan(committed, &job.current, &job.changes, destination);
    warnings.extend(planned.warnings.iter().map(ToString::to_string));

    // An incremental needs the digests of the blocks it does not touch.
    let mut digests = Digests::zeros(g.get(), capacity);
    if matches!(planned.plan, CopyPlan::Incremental { .. }) {
        match on_store(&store, &job.key, |s, k| s.load_digests(k)).await? {
            Some(d) if d.granularity == g.get() && d.capacity == capacity => digests = d,
            _ => {
                warnings
                    .push("the digests of the last copy are missing or of another geometry; copying in full".into());
                planned = cbt::plan(None, &job.current, &job.changes, destination);
            }
        }
    }
    let plan_id = plan_digest(planned.plan.read(), planned.plan.zero(), g.get());

    let mut done = cbt::ExtentSet::new();
    let mut resumed = false;
    if let Some((cp, cp_digests)) = checkpoint {
        if cp.plan == plan_id && cp_digests.blocks.len() == digests.blocks.len() {
            done = cp.done_set();
            if job.source.frozen() {
                resume_check = Some(ResumeCheck::Frozen);
            } else {
                tracing::info!(
                    "{} may have been written since the interrupted copy: reading the {} bytes it had done again \
                     to check them against their digests",
                    job.source.describe(),
                    done.total_bytes()
                );
                let (kept, checked) = verify_done(&*job.source, &done, &cp_digests, options).await?;
                let changed = done.total_bytes() - kept.total_bytes();
                if changed > 0 {
                    warnings.push(format!(
                        "{changed} of the {checked} bytes the interrupted copy had done changed in {} since; \
                         copying them again",
                        job.source.describe()
                    ));
                }
                resume_check = Some(ResumeCheck::Verified { checked, changed });
                done = kept;
            }
            digests = cp_digests;
            resumed = true;
        } else {
            warnings.push(format!("dropped the checkpoint of job {}: the plan changed", cp.job));
            on_store(&store, &job.key, |s, k| s.drop_checkpoint(k)).await?;
            if fresh && !job.sink.known_zero() {
                // The dropped copy wrote to a destination that read as zeros: it holds data now,
                // so the new plan must write the zeros too.
                fresh = false;
                let destination = Destination { granularity: g, holds_data: true };
                planned = cbt::plan(committed, &job.current, &job.changes, destination);
                digests = Digests::zeros(g.get(), capacity);
                if matches!(planned.plan, CopyPlan::Incremental { .. }) {
                    planned = cbt::plan(None, &job.current, &job.changes, destination);
                }
            }
        }
    }
    let (read, zero) = (planned.plan.read().clone(), planned.plan.zero().clone());

    let j = job.job.clone();
    on_store(&store, &job.key, move |s, k| s.mark_dirty(k, g.get(), &j)).await?;
    let disk = DiskCopy {
        source: job.source.clone(),
        sink: job.sink.clone(),
        read,
        zero,
        fetch: Some(planned.plan.fetch().clone()),
        keep: planned.plan.keep().clone(),
        digests,
        done,
        checkpoint: Some(Arc::new(CheckpointTo {
            store: store.clone(),
            key: job.key.clone(),
            job: job.job.clone(),
            fresh,
        })),
    };
    let report = copy_disk(disk, engine, options, progress).await?;
    job.sink.commit().await?;
    let (c, d) = (planned.commit.clone(), report.digests.clone());
    let state = on_store(&store, &job.key, move |s, k| s.commit(k, c, g.get(), d.as_ref())).await?;
    Ok(SyncOutcome {
        full_reason: planned.plan.full_reason().cloned(),
        planned: planned.plan.read().total_bytes() + planned.plan.zero().total_bytes(),
        resumed,
        resume_check,
        was_dirty,
        report,
        state,
        warnings,
    })
}

/// Runs one state-store operation on a blocking thread (they read, write and fsync files).
async fn on_store<T: Send + 'static>(
    store: &StateStore,
    key: &SyncKey,
    f: impl FnOnce(&StateStore, &SyncKey) -> Result<T, BlockError> + Send + 'static,
) -> Result<T, BlockError> {
    let (s, k) = (store.clone(), key.clone());
    pipeline::blocking(move || f(&s, &k)).await
}

/// Reads again the blocks of `done` and keeps those whose bytes still have the digest in
/// `digests` (the blocks a checkpoint shows as done are whole sink blocks). Returns what is
/// kept and how many bytes were read.
async fn verify_done(
    source: &dyn BlockSource,
    done: &cbt::ExtentSet,
    digests: &Digests,
    options: &CopyOptions,
) -> Result<(cbt::ExtentSet, u64), BlockError> {
    let g = digests.granularity;
    let capacity = digests.capacity;
    let mut request = options.request_size.max(g) / g * g;
    if let Some(max) = source.max_request() {
        request = request.min(max.max(g) / g * g).max(g);
    }
    let mut kept = Vec::new();
    let mut checked = 0u64;
    for e in done.iter() {
        // Whole blocks only: a block partly done is copied again.
        let first = e.start().div_ceil(g);
        let end = if e.end() == capacity { capacity.div_ceil(g) } else { e.end() / g };
        let mut block = first;
        while block < end {
            let n = (request / g).min(end - block);
            let at = block * g;
            let len = (n * g).min(capacity - at);
            let buf = BytesMut::zeroed(usize::try_from(len).unwrap_or(0));
            let buf = source.read_at(at, buf).await?;
            checked += len;
            let recorded: Vec<[u8; 32]> = (block..block + n)
                .map(|b| usize::try_from(b).ok().and_then(|b| digests.blocks.get(b)).copied().unwrap_or([0; 32]))
                .collect();
            let g_usize = usize::try_from(g).unwrap_or(usize::MAX);
            let same: Vec<bool> = pipeline::blocking(move || {
                Ok(buf.chunks(g_usize).zip(recorded).map(|(c, d)| *blake3::hash(c).as_bytes() == d).collect())
            })
            .await?;
            for (k, ok) in same.into_iter().enumerate() {
                if ok {
                    let s = at + k as u64 * g;
                    kept.push((s, g.min(capacity - s)));
                }
            }
            block += n;
        }
    }
    Ok((cbt::ExtentSet::from_ranges(kept), checked))
}
