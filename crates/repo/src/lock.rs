//! Repository locks, as files under `locks/` in the repository itself, so they work the same
//! on a directory and on S3. Prune, verify, restores, copies, and backups at their start and
//! end take shared locks; gc takes the exclusive one. Readers (restores, verify, a copy's
//! source) go on with a warning where the medium refuses their lock file (read-only, full).
//! Each lock names its holder (host, PID, what it does) and is refreshed by a heartbeat; a lock
//! whose heartbeat is older than its expiry, or whose holder was a process on this host that is
//! gone, is stale and is removed by the next taker, with a warning.

use std::sync::Arc;
use std::time::Duration;

use durable::{Heartbeat, LockInfo, LockKind, LockTiming, Store, host_name, live_in, now_secs};

use crate::RepoError;

/// A held lock; dropping it releases it. A reader's lock may be held without a file, when
/// the medium refuses one ([`RepoLock::acquire_reading`]).
#[derive(Debug)]
pub struct RepoLock {
    store: Arc<dyn Store>,
    name: String,
    beat: Option<Heartbeat>,
    /// Whether its file was written.
    written: bool,
}

impl RepoLock {
    /// Takes a lock of `kind` for `purpose`, or fails naming every holder in the way.
    pub fn acquire(
        store: Arc<dyn Store>,
        kind: LockKind,
        purpose: &str,
        timing: LockTiming,
    ) -> Result<Self, RepoError> {
        let now = now_secs();
        let info = LockInfo {
            kind,
            host: host_name(),
            pid: std::process::id(),
            purpose: purpose.to_owned(),
            started: now,
            heartbeat: now,
            expires_after: timing.expiry.as_secs().max(1),
        };
        let kind_name = match kind {
            LockKind::Shared => "shared",
            LockKind::Exclusive => "exclusive",
        };
        let name = format!("locks/{kind_name}-{}-{}-{}.json", info.host, info.pid, crate::random_hex(4));
        let json = serde_json::to_vec_pretty(&info).map_err(|e| RepoError::Invalid(e.to_string()))?;
        store.put(&name, &json)?;
        // Written first, then checked: of two takers racing, at least one sees the other.
        let in_way: Vec<String> = holders(&*store)?
            .into_iter()
            .filter(|(n, other)| *n != name && (kind == LockKind::Exclusive || other.kind == LockKind::Exclusive))
            .map(|(_, other)| other.describe())
            .collect();
        if !in_way.is_empty() {
            store.delete(&name)?;
            return Err(RepoError::Locked(format!("{} is locked by {}", store.describe(), in_way.join("; "))));
        }
        let beat = Heartbeat::start(store.clone(), name.clone(), timing.heartbeat, move |now| {
            serde_json::to_vec_pretty(&LockInfo { heartbeat: now, ..info.clone() }).ok()
        })?;
        Ok(Self { store, name, beat: Some(beat), written: true })
    }

    /// A reader's shared lock (a restore, verify, the source of a copy): like
    /// [`RepoLock::acquire`], but when the lock file cannot be written because the medium is
    /// read-only, not ours to write, or full (a WORM copy, a snapshot, a full disk), the reader
    /// goes on without one, with a warning that says why. It still refuses while a live
    /// exclusive lock (a gc) is in the way. Writers never go on without their lock.
    pub fn acquire_reading(store: Arc<dyn Store>, purpose: &str, timing: LockTiming) -> Result<Self, RepoError> {
        let err = match Self::acquire(store.clone(), LockKind::Shared, purpose, timing) {
            Err(e) => e,
            held => return held,
        };
        let Some(why) = crate::unwritable(&err) else { return Err(err) };
        let in_way: Vec<String> = holders(&*store)?
            .into_iter()
            .filter(|(_, other)| other.kind == LockKind::Exclusive)
            .map(|(_, other)| other.describe())
            .collect();
        if !in_way.is_empty() {
            return Err(RepoError::Locked(format!("{} is locked by {}", store.describe(), in_way.join("; "))));
        }
        tracing::warn!("{purpose}: reading {} without a lock, because {why} ({err})", store.describe());
        Ok(Self { store, name: String::new(), beat: None, written: false })
    }

    /// Whether its file was written (a reader on a read-only medium holds none).
    pub fn written(&self) -> bool {
        self.written
    }

    /// Like [`RepoLock::acquire`], but while the way is blocked it waits (up to
    /// `timing.max_wait`), saying once what it waits for.
    pub fn acquire_waiting(
        store: Arc<dyn Store>,
        kind: LockKind,
        purpose: &str,
        timing: LockTiming,
    ) -> Result<Self, RepoError> {
        let start = std::time::Instant::now();
        let mut said = false;
        loop {
            match Self::acquire(store.clone(), kind, purpose, timing) {
                Err(RepoError::Locked(why)) if start.elapsed() < timing.max_wait => {
                    if !said {
                        tracing::info!("{purpose}: waiting, because {why}");
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// The lock file's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        drop(self.beat.take());
        if !self.written {
            return;
        }
        if let Err(e) = self.store.delete(&self.name) {
            tracing::warn!("cannot release repository lock {}: {e}", self.name);
        }
    }
}

/// The live locks (name, holder); stale ones are removed on the way, with a warning, and
/// unreadable ones are counted as live (better a refused job than two writers).
pub fn holders(store: &dyn Store) -> Result<Vec<(String, LockInfo)>, RepoError> {
    Ok(live_in(store, "locks", "repository lock")?.into_iter().map(|(n, info)| (format!("locks/{n}"), info)).collect())
}

impl crate::Repo {
    /// Takes the lease of `job` in this repository (see [`durable::JobLease::take`]).
    pub fn job_lease(&self, job: &str) -> Result<durable::JobLease, RepoError> {
        Ok(durable::JobLease::take(self.store().clone(), self.timing, job)?)
    }

    /// The jobs running now, by name (see [`durable::live_jobs_in`]).
    pub fn live_jobs(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        Ok(durable::live_jobs_in(&**self.store())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(LocalStore::new(d.path()));
        (d, s)
    }

    #[test]
    fn shared_locks_coexist_and_exclusive_ones_do_not() {
        let (_d, s) = store();
        let t = LockTiming::default();
        let a = RepoLock::acquire(s.clone(), LockKind::Shared, "backup of a", t).unwrap();
        let b = RepoLock::acquire(s.clone(), LockKind::Shared, "backup of b", t).unwrap();
        let e = RepoLock::acquire(s.clone(), LockKind::Exclusive, "gc", t).unwrap_err().to_string();
        assert!(e.contains("backup of a") && e.contains("backup of b"), "{e}");
        assert_eq!(holders(&*s).unwrap().len(), 2, "the refused taker removed its own file");
        drop((a, b));
        let g = RepoLock::acquire(s.clone(), LockKind::Exclusive, "gc", t).unwrap();
        let e = RepoLock::acquire(s.clone(), LockKind::Shared, "backup of c", t).unwrap_err().to_string();
        assert!(e.contains("gc"), "{e}");
        drop(g);
        assert!(holders(&*s).unwrap().is_empty());
    }

    #[test]
    fn stale_locks_are_detected_and_removed() {
        let (_d, s) = store();
        let now = now_secs();
        let dead = LockInfo {
            kind: LockKind::Exclusive,
            host: host_name(),
            pid: u32::MAX - 1,
            purpose: "gc".into(),
            started: now,
            heartbeat: now,
            expires_after: 300,
        };
        assert!(dead.stale(now).unwrap().contains("gone"));
        let silent = LockInfo { host: "elsewhere".into(), heartbeat: now - 301, ..dead.clone() };
        assert!(silent.stale(now).unwrap().contains("heartbeat"));
        let live = LockInfo { host: "elsewhere".into(), ..dead.clone() };
        assert_eq!(live.stale(now), None);
        s.put("locks/exclusive-dead.json", &serde_json::to_vec(&dead).unwrap()).unwrap();
        s.put("locks/exclusive-live.json", &serde_json::to_vec(&live).unwrap()).unwrap();
        let e = RepoLock::acquire(s.clone(), LockKind::Shared, "backup", LockTiming::default()).unwrap_err();
        assert!(e.to_string().contains("elsewhere"), "{e}");
        assert!(!s.exists("locks/exclusive-dead.json").unwrap(), "the dead holder's lock is gone");
        s.delete("locks/exclusive-live.json").unwrap();
        RepoLock::acquire(s, LockKind::Shared, "backup", LockTiming::default()).unwrap();
    }

    #[test]
    fn the_heartbeat_refreshes_the_file() {
        let (_d, s) = store();
        let t = LockTiming { heartbeat: Duration::from_millis(50), ..LockTiming::default() };
        let l = RepoLock::acquire(s.clone(), LockKind::Shared, "backup", t).unwrap();
        let first = s.get(l.name()).unwrap().unwrap();
        let mut info: LockInfo = serde_json::from_slice(&first).unwrap();
        info.heartbeat = 0;
        s.put(l.name(), &serde_json::to_vec(&info).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let again: LockInfo = serde_json::from_slice(&s.get(l.name()).unwrap().unwrap()).unwrap();
        assert!(again.heartbeat > 0, "the heartbeat rewrote it");
    }
}
