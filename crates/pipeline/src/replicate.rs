//! The replication flow: bring one destination up to date with one frozen source, full the
//! first time and incremental from CBT afterwards, resuming an interrupted copy of the same job
//! and snapshot, and committing the sync state only once the sink has made the data durable.

use std::sync::Arc;

use cbt::{Changes, CopyPlan, CurrentDisk, Destination, FullReason};

use crate::progress::Progress;
use crate::state::{Digests, StateStore, SyncKey, SyncState};
use crate::{
    BlockError, BlockSink, BlockSource, CheckpointTo, CopyOptions, CopyReport, DiskCopy, Engine, copy_disk, plan_digest,
};

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
        return Err(BlockError::Mismatch(format!(
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
    // Whether the destination held anything is decided when the job starts: a resumed job's
    // own writes do not count.
    let fresh = match &checkpoint {
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
    let (read, zero) = (planned.plan.read().clone(), planned.plan.zero().clone());
    let plan_id = plan_digest(&read, &zero, g.get());

    let mut done = cbt::ExtentSet::new();
    let mut resumed = false;
    if let Some((cp, cp_digests)) = checkpoint {
        if cp.plan == plan_id && cp_digests.blocks.len() == digests.blocks.len() {
            done = cp.done_set();
            digests = cp_digests;
            resumed = true;
        } else {
            warnings.push(format!("dropped the checkpoint of job {}: the plan changed", cp.job));
            on_store(&store, &job.key, |s, k| s.drop_checkpoint(k)).await?;
        }
    }

    let j = job.job.clone();
    on_store(&store, &job.key, move |s, k| s.mark_dirty(k, g.get(), &j)).await?;
    let disk = DiskCopy {
        source: job.source.clone(),
        sink: job.sink.clone(),
        read,
        zero,
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
    crate::blocking(move || f(&s, &k)).await
}
