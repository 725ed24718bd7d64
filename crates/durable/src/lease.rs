//! Locks and leases as files in a [`Store`]: who holds them (host, PID, purpose), a heartbeat
//! that keeps them fresh, and the rule that tells a live holder from a dead one (a heartbeat
//! older than its expiry, or a process of this host that is gone). Job leases, a running job's
//! name under `jobs/`, let every proxy sharing a repository or a replica directory tell the
//! snapshot of a live job from one a dead job left behind. A repository's shared and exclusive
//! locks are built on the same records (`repo::RepoLock`).

use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::store::Store;

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Many at once (backups, prune).
    Shared,
    /// Alone (gc).
    Exclusive,
}

/// What a lock file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Shared or exclusive.
    pub kind: LockKind,
    /// The holder's host name.
    pub host: String,
    /// The holder's process ID.
    pub pid: u32,
    /// What the holder does (`backup of db01`, `gc`).
    pub purpose: String,
    /// Seconds since the Unix epoch when it was taken.
    pub started: u64,
    /// Seconds since the Unix epoch of the last heartbeat.
    pub heartbeat: u64,
    /// Seconds after the last heartbeat at which it is stale.
    pub expires_after: u64,
}

impl LockInfo {
    /// Why it is stale, if it is.
    pub fn stale(&self, now: u64) -> Option<String> {
        if now.saturating_sub(self.heartbeat) > self.expires_after {
            return Some(format!("no heartbeat for {} s", now.saturating_sub(self.heartbeat)));
        }
        if self.host == host_name() && !process_alive(self.pid) {
            return Some(format!("process {} is gone", self.pid));
        }
        None
    }

    /// Who holds it and why, for messages.
    pub fn describe(&self) -> String {
        format!("{} (host {}, PID {}, since {})", self.purpose, self.host, self.pid, unix_to_text(self.started))
    }
}

fn unix_to_text(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Seconds since the Unix epoch (what lock files record).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// This host's name (for lock files: which machine holds it).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether process `pid` of this host is running.
pub fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// How locks are timed.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    /// How often the holder refreshes its lock.
    pub heartbeat: Duration,
    /// How long after the last heartbeat a lock is stale.
    pub expiry: Duration,
    /// How long a backup waits for a gc to finish before giving up.
    pub max_wait: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(60),
            expiry: Duration::from_secs(300),
            max_wait: Duration::from_secs(3600),
        }
    }
}

/// Rewrites a file every interval until dropped (a lock's or a registration's heartbeat).
#[derive(Debug)]
pub struct Heartbeat {
    stop: Option<Sender<()>>,
    beat: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Every `every`, writes `render(now)` to `name`.
    pub fn start(
        store: Arc<dyn Store>,
        name: String,
        every: Duration,
        render: impl Fn(u64) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<Self, Error> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let beat = std::thread::Builder::new()
            .name("repo-heartbeat".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    let Some(bytes) = render(now_secs()) else { return };
                    if let Err(e) = store.put(&name, &bytes) {
                        tracing::warn!("cannot refresh {name}: {e}");
                    }
                }
            })
            .map_err(Error::Spawn)?;
        Ok(Self { stop: Some(tx), beat: Some(beat) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
    }
}

/// The live lock-like files of `dir` (their names inside it, and holders): stale ones are
/// removed with a warning; an unreadable one counts as a live exclusive holder that never
/// expires, so nothing it may guard is touched.
pub fn live_in(store: &dyn Store, dir: &str, what: &str) -> Result<Vec<(String, LockInfo)>, Error> {
    let now = now_secs();
    let mut out = Vec::new();
    for e in store.list(dir)? {
        let name = format!("{dir}/{}", e.name);
        let Some(raw) = store.get(&name)? else { continue };
        match serde_json::from_slice::<LockInfo>(&raw) {
            Ok(info) => match info.stale(now) {
                Some(why) => {
                    tracing::warn!("removing the stale {what} of {}: {why}", info.describe());
                    // Stale either way: a reader on a read-only medium cannot remove it.
                    if let Err(e) = store.delete(&name) {
                        tracing::warn!("cannot remove {name}: {e}");
                    }
                }
                None => out.push((e.name, info)),
            },
            Err(err) => {
                let info = LockInfo {
                    kind: LockKind::Exclusive,
                    host: "?".into(),
                    pid: 0,
                    purpose: format!("an unreadable {what} file {name} ({err}; remove it by hand if no job runs)"),
                    started: 0,
                    heartbeat: now,
                    expires_after: u64::MAX,
                };
                out.push((e.name, info));
            }
        }
    }
    Ok(out)
}

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
fn check_name(job: &str) -> Result<(), Error> {
    let ok = !job.is_empty()
        && job.len() <= 128
        && !job.starts_with('.')
        && job.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "job name {job:?}: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

impl JobLease {
    /// Takes the lease of `job` in `store` (a repository's, or any directory a job's
    /// destinations share), or fails if a live job of that name holds it; a stale lease is
    /// replaced, with a warning.
    pub fn take(store: Arc<dyn Store>, timing: LockTiming, job: &str) -> Result<Self, Error> {
        check_name(job)?;
        let name = format!("jobs/{job}.json");
        if let Some((_, holder)) = live_jobs_in(&*store)?.into_iter().find(|(n, _)| n == job) {
            return Err(Error::Locked(format!(
                "job {job} is already running (host {}, PID {})",
                holder.host, holder.pid
            )));
        }
        let now = now_secs();
        let info = LockInfo {
            kind: LockKind::Shared,
            host: host_name(),
            pid: std::process::id(),
            purpose: format!("job {job}"),
            started: now,
            heartbeat: now,
            expires_after: timing.expiry.as_secs().max(1),
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| Error::Invalid(e.to_string()))?;
        store.put(&name, &json)?;
        let beat = Heartbeat::start(store.clone(), name.clone(), timing.heartbeat, move |now| {
            serde_json::to_vec_pretty(&LockInfo { heartbeat: now, ..info.clone() }).ok()
        })?;
        Ok(Self { store, name, beat: Some(beat) })
    }
}

/// The jobs running now in `store`, by name, with their holders. Stale leases are removed on
/// the way (with a warning); an unreadable lease counts as live, so nothing of it is removed.
pub fn live_jobs_in(store: &dyn Store) -> Result<Vec<(String, LockInfo)>, Error> {
    Ok(live_in(store, "jobs", "job lease")?
        .into_iter()
        .filter_map(|(file, info)| file.strip_suffix(".json").map(|job| (job.to_owned(), info)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    /// Leases in a directory, as a repository's or a replica directory's.
    struct Leases(Arc<dyn Store>);

    impl Leases {
        fn job_lease(&self, job: &str) -> Result<JobLease, Error> {
            JobLease::take(self.0.clone(), LockTiming::default(), job)
        }
        fn live_jobs(&self) -> Result<Vec<(String, LockInfo)>, Error> {
            live_jobs_in(&*self.0)
        }
        fn store(&self) -> &Arc<dyn Store> {
            &self.0
        }
    }

    fn repo() -> (tempfile::TempDir, Leases) {
        let d = tempfile::tempdir().unwrap();
        let r = Leases(Arc::new(LocalStore::new(d.path())));
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
            host: host_name(),
            pid: u32::MAX - 1,
            purpose: "job dead".into(),
            started: 1,
            heartbeat: now_secs(),
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
