//! What a running proxy counts, for progress and for Prometheus: VMs running and finished,
//! disks in the copy phase now and at peak, and the bytes of every copy (through one parent
//! [`Progress`] that every disk's progress adds to).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pipeline::progress::Progress;

/// Counters shared by every VM of every job of a process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Bytes planned, read, written and skipped, over all copies.
    pub progress: Arc<Progress>,
    vms_running: AtomicU64,
    vms_succeeded: AtomicU64,
    vms_warned: AtomicU64,
    vms_failed: AtomicU64,
    disks_copying: AtomicU64,
    disks_copying_peak: AtomicU64,
    disks_copied: AtomicU64,
    snapshots_removed_stale: AtomicU64,
    snapshots_left: AtomicU64,
    /// The disks in the copy phase now, by label, with their own progress.
    active: Mutex<Vec<(u64, String, Arc<Progress>)>>,
    next_id: AtomicU64,
}

/// A disk in the copy phase, counted and shown with its progress, until dropped.
#[derive(Debug)]
pub(crate) struct Tracked<'a> {
    metrics: &'a Metrics,
    id: u64,
    _copying: Running<'a>,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.metrics.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|(i, _, _)| *i != self.id);
    }
}

/// A reading of [`Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// VMs whose backup runs now.
    pub vms_running: u64,
    /// VMs finished without warnings.
    pub vms_succeeded: u64,
    /// VMs finished with warnings.
    pub vms_warned: u64,
    /// VMs failed.
    pub vms_failed: u64,
    /// Disks in the copy phase now.
    pub disks_copying: u64,
    /// The most disks in the copy phase at one moment.
    pub disks_copying_peak: u64,
    /// Disks copied and committed.
    pub disks_copied: u64,
    /// Stale snapshots of ours removed.
    pub snapshots_removed_stale: u64,
    /// Snapshots of ours that could not be removed (the next run removes them).
    pub snapshots_left: u64,
    /// Bytes read from sources.
    pub bytes_read: u64,
    /// Bytes written to sinks.
    pub bytes_written: u64,
}

/// Counts one thing as running while it lives.
#[derive(Debug)]
pub(crate) struct Running<'a> {
    now: &'a AtomicU64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub(crate) fn vm_started(&self) -> Running<'_> {
        self.vms_running.fetch_add(1, Ordering::Relaxed);
        Running { now: &self.vms_running }
    }

    /// A disk enters the copy phase until the returned guard drops.
    pub(crate) fn disk_copying(&self) -> Running<'_> {
        let now = self.disks_copying.fetch_add(1, Ordering::Relaxed) + 1;
        self.disks_copying_peak.fetch_max(now, Ordering::Relaxed);
        Running { now: &self.disks_copying }
    }

    pub(crate) fn disk_copied(&self) {
        self.disks_copied.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn vm_finished(&self, failed: bool, warned: bool) {
        let c = match (failed, warned) {
            (true, _) => &self.vms_failed,
            (false, true) => &self.vms_warned,
            (false, false) => &self.vms_succeeded,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stale_removed(&self) {
        self.snapshots_removed_stale.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot_left(&self) {
        self.snapshots_left.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a disk (`db01 scsi0:0`) in the copy phase and shows it with its progress, until
    /// the guard drops.
    pub(crate) fn track(&self, label: String, progress: Arc<Progress>) -> Tracked<'_> {
        let copying = self.disk_copying();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((id, label, progress));
        Tracked { metrics: self, id, _copying: copying }
    }

    /// The disks copying now: an ID (stable while it copies), its label and its progress.
    pub fn active_disks(&self) -> Vec<(u64, String, Arc<Progress>)> {
        self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let p = self.progress.snapshot();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            vms_running: get(&self.vms_running),
            vms_succeeded: get(&self.vms_succeeded),
            vms_warned: get(&self.vms_warned),
            vms_failed: get(&self.vms_failed),
            disks_copying: get(&self.disks_copying),
            disks_copying_peak: get(&self.disks_copying_peak),
            disks_copied: get(&self.disks_copied),
            snapshots_removed_stale: get(&self.snapshots_removed_stale),
            snapshots_left: get(&self.snapshots_left),
            bytes_read: p.read,
            bytes_written: p.written,
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP syncproxy_{name} {help}\n# TYPE syncproxy_{name} {kind}\nsyncproxy_{name} {value}\n"
            );
        };
        one("vms_running", "gauge", "VMs whose backup runs now.", s.vms_running);
        one("vms_succeeded_total", "counter", "VMs backed up without warnings.", s.vms_succeeded);
        one("vms_warned_total", "counter", "VMs backed up with warnings.", s.vms_warned);
        one("vms_failed_total", "counter", "VMs whose backup failed.", s.vms_failed);
        one("disks_copying", "gauge", "Disks in the copy phase now.", s.disks_copying);
        one("disks_copying_peak", "gauge", "The most disks in the copy phase at one moment.", s.disks_copying_peak);
        one("disks_copied_total", "counter", "Disks copied and committed.", s.disks_copied);
        one("snapshots_removed_stale_total", "counter", "Stale snapshots of ours removed.", s.snapshots_removed_stale);
        one("snapshots_left_total", "counter", "Snapshots of ours that could not be removed.", s.snapshots_left);
        one("read_bytes_total", "counter", "Bytes read from sources.", s.bytes_read);
        one("written_bytes_total", "counter", "Bytes written to targets.", s.bytes_written);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_of_disks_copying_holds_after_they_finish() {
        let m = Metrics::default();
        {
            let _a = m.disk_copying();
            let _b = m.disk_copying();
            assert_eq!(m.snapshot().disks_copying, 2);
        }
        let _c = m.disk_copying();
        let s = m.snapshot();
        assert_eq!((s.disks_copying, s.disks_copying_peak), (1, 2));
        let text = m.render_prometheus();
        assert!(text.contains("syncproxy_disks_copying 1\n"), "{text}");
        assert!(text.contains("syncproxy_disks_copying_peak 2\n"), "{text}");
        assert!(text.contains("# TYPE syncproxy_vms_failed_total counter\n"), "{text}");
    }
}
