//! Progress of a copy: counters any thread can read while it runs, with rate and ETA. A disk's
//! counters can feed a job's ([`Progress::child_of`]), so both are read the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters of one job (one disk or many), updated as requests complete.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    planned: AtomicU64,
    resumed: AtomicU64,
    read: AtomicU64,
    read_back: AtomicU64,
    written: AtomicU64,
    kept: AtomicU64,
    zero: AtomicU64,
    retries: AtomicU64,
    checkpoints: AtomicU64,
    /// Where every count is added too.
    parent: Option<Arc<Progress>>,
}

/// A reading of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSnapshot {
    /// Bytes the plans cover (to read or to zero), resumed parts included.
    pub planned: u64,
    /// Bytes a checkpoint showed as done already, not copied again.
    pub resumed: u64,
    /// Bytes read from sources.
    pub read: u64,
    /// Bytes read back from sinks, to complete the blocks an incremental touches.
    pub read_back: u64,
    /// Bytes of data written to sinks.
    pub written: u64,
    /// Bytes of touched blocks left as the sink held them (an incremental's unchanged bytes).
    pub kept: u64,
    /// Bytes written as zeros or skipped as zero (detected in data, or planned as zero).
    pub zero: u64,
    /// Retried requests.
    pub retries: u64,
    /// Checkpoints saved.
    pub checkpoints: u64,
    /// Time since the job started.
    pub elapsed: Duration,
}

impl ProgressSnapshot {
    /// Bytes accounted for: done before, copied, zeroed, or kept.
    pub fn done(&self) -> u64 {
        self.resumed + self.written + self.zero + self.kept
    }

    /// Bytes per second read so far.
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { (self.written + self.zero + self.kept) as f64 / s } else { 0.0 }
    }

    /// Time left at the current rate, when there is one.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        let left = self.planned.saturating_sub(self.done());
        (rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate))
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            planned: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            read: AtomicU64::new(0),
            read_back: AtomicU64::new(0),
            written: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            parent: None,
        }
    }
}

impl Progress {
    /// Counters of their own that also add to `parent` (a disk's, inside a job's).
    pub fn child_of(parent: Arc<Progress>) -> Self {
        Self { parent: Some(parent), ..Self::default() }
    }

    /// The current counts.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            planned: self.planned.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            read: self.read.load(Ordering::Relaxed),
            read_back: self.read_back.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            kept: self.kept.load(Ordering::Relaxed),
            zero: self.zero.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        }
    }

    fn add(&self, counter: fn(&Progress) -> &AtomicU64, n: u64) {
        counter(self).fetch_add(n, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.add(counter, n);
        }
    }

    pub(crate) fn plan(&self, planned: u64, resumed: u64) {
        self.add(|p| &p.planned, planned);
        self.add(|p| &p.resumed, resumed);
    }

    pub(crate) fn read(&self, n: u64) {
        self.add(|p| &p.read, n);
    }

    pub(crate) fn read_back(&self, n: u64) {
        self.add(|p| &p.read_back, n);
    }

    pub(crate) fn kept(&self, n: u64) {
        self.add(|p| &p.kept, n);
    }

    pub(crate) fn written(&self, n: u64) {
        self.add(|p| &p.written, n);
    }

    pub(crate) fn zero(&self, n: u64) {
        self.add(|p| &p.zero, n);
    }

    pub(crate) fn retry(&self) {
        self.add(|p| &p.retries, 1);
    }

    pub(crate) fn checkpoint(&self) {
        self.add(|p| &p.checkpoints, 1);
    }
}
