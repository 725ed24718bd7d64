//! Job leases: a running job's name under `jobs/` in the repository, kept fresh by a heartbeat,
//! so that every proxy sharing the repository can tell the snapshot of a live job from one a
//! dead job left behind. A lease is live until its heartbeat expires or, on this host, its
//! process is gone; the same rules as locks.

use std::sync::Arc;

use crate::lock::{self, Heartbeat, LockInfo, LockKind, LockTiming};
use crate::store::Store;
use crate::{Repo, RepoError};

/// A held job lease; dropping it ends it.
#[derive(Debug)]
pub struct JobLease {
    store: Arc<dyn Store>,
    name: String,
    beat: Option<Heartbeat>,
}

impl Drop for JobLease {
    fn drop(&mut self) {
        drop(self.beat.take());
        if let Err(e) = self.store.delete(&self.name) {
            tracing::warn!("cannot end the job lease {}: {e}", self.name);
        }
    }
}

/// A job name is a file name: letters, digits, `.`, `_` and `-`, at most 128 of them.
fn check_name(job: &str) -> Result<(), RepoError> {
    let ok = !job.is_empty()
        && job.len() <= 128
        && !job.starts_with('.')
        && job.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "job name {job:?}: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

impl JobLease {
    /// Takes the lease of `job` in `store` (a repository's, or any directory a job's
    /// destinations share), or fails if a live job of that name holds it; a stale lease is
    /// replaced, with a warning.
    pub fn take(store: Arc<dyn Store>, timing: LockTiming, job: &str) -> Result<Self, RepoError> {
        check_name(job)?;
        let name = format!("jobs/{job}.json");
        if let Some((_, holder)) = live_jobs_in(&*store)?.into_iter().find(|(n, _)| n == job) {
            return Err(RepoError::Locked(format!(
                "job {job} is already running (host {}, PID {})",
                holder.host, holder.pid
            )));
        }
        let now = lock::now_secs();
        let info = LockInfo {
            kind: LockKind::Shared,
            host: lock::host_name(),
            pid: std::process::id(),
            purpose: format!("job {job}"),
            started: now,
            heartbeat: now,
            expires_after: timing.expiry.as_secs().max(1),
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| RepoError::Invalid(e.to_string()))?;
        store.put(&name, &json)?;
        let beat = Heartbeat::start(store.clone(), name.clone(), timing.heartbeat, move |now| {
            serde_json::to_vec_pretty(&LockInfo { heartbeat: now, ..info.clone() }).ok()
        })?;
        Ok(Self { store, name, beat: Some(beat) })
    }
}

/// The jobs running now in `store`, by name, with their holders. Stale leases are removed on
/// the way (with a warning); an unreadable lease counts as live, so nothing of it is removed.
pub fn live_jobs_in(store: &dyn Store) -> Result<Vec<(String, LockInfo)>, RepoError> {
    Ok(lock::live_in(store, "jobs", "job lease")?
        .into_iter()
        .filter_map(|(file, info)| file.strip_suffix(".json").map(|job| (job.to_owned(), info)))
        .collect())
}

impl Repo {
    /// Takes the lease of `job` in this repository (see [`JobLease::take`]).
    pub fn job_lease(&self, job: &str) -> Result<JobLease, RepoError> {
        JobLease::take(self.store.clone(), self.timing, job)
    }

    /// The jobs running now, by name (see [`live_jobs_in`]).
    pub fn live_jobs(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        live_jobs_in(&*self.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    fn repo() -> (tempfile::TempDir, Repo) {
        let d = tempfile::tempdir().unwrap();
        let r = Repo::init_in(Arc::new(LocalStore::new(d.path())), 1 << 20).unwrap();
        (d, r)
    }

    #[test]
    fn a_lease_is_live_while_held_and_gone_when_dropped() {
        let (_d, r) = repo();
        let lease = r.job_lease("proxy1-job7").unwrap();
        let live = r.live_jobs().unwrap();
        assert_eq!(live.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["proxy1-job7"]);
        let e = r.job_lease("proxy1-job7").unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        drop(lease);
        assert!(r.live_jobs().unwrap().is_empty());
    }

    #[test]
    fn a_dead_jobs_lease_is_stale_and_unreadable_ones_count_as_live() {
        let (_d, r) = repo();
        // A lease left by a process of this host that is gone.
        let dead = LockInfo {
            kind: LockKind::Shared,
            host: lock::host_name(),
            pid: u32::MAX - 1,
            purpose: "job dead".into(),
            started: 1,
            heartbeat: lock::now_secs(),
            expires_after: 300,
        };
        r.store().put("jobs/dead.json", &serde_json::to_vec(&dead).unwrap()).unwrap();
        // A lease from another host whose heartbeat stopped long ago.
        let old = LockInfo { host: "elsewhere".into(), heartbeat: 10, ..dead.clone() };
        r.store().put("jobs/old.json", &serde_json::to_vec(&old).unwrap()).unwrap();
        // A live lease from another host.
        let other = LockInfo { host: "elsewhere".into(), ..dead };
        r.store().put("jobs/other.json", &serde_json::to_vec(&other).unwrap()).unwrap();
        r.store().put("jobs/garbled.json", b"{").unwrap();
        let mut live: Vec<String> = r.live_jobs().unwrap().into_iter().map(|(n, _)| n).collect();
        live.sort();
        assert_eq!(live, ["garbled", "other"]);
        assert!(r.store().get("jobs/dead.json").unwrap().is_none(), "the stale lease is removed");
        assert!(r.store().get("jobs/old.json").unwrap().is_none());
        // A stale lease does not stop a new job of its name.
        r.store().put("jobs/dead.json", &serde_json::to_vec(&LockInfo { heartbeat: 0, ..old }).unwrap()).unwrap();
        drop(r.job_lease("dead").unwrap());
    }

    #[test]
    fn job_names_are_file_names() {
        let (_d, r) = repo();
        for bad in ["", "../x", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
            assert!(r.job_lease(bad).is_err(), "{bad:?}");
        }
    }
}
