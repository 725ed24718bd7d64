//! Repository locks, as files under `locks/` in the repository itself, so they work the same
//! on a directory and on S3. Prune, verify, restores, copies, and backups at their start and
//! end take shared locks; gc takes the exclusive one. Readers (restores, verify, a copy's
//! source) go on with a warning where the medium refuses their lock file (read-only, full).
//! Each lock names its holder (host, PID, what it does) and is refreshed by a heartbeat; a lock
//! whose heartbeat is older than its expiry, or whose holder was a process on this host that is
//! gone, is stale and is removed by the next taker, with a warning.

use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::RepoError;
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

    fn describe(&self) -> String {
        format!("{} (host {}, PID {}, since {})", self.purpose, self.host, self.pid, unix_to_text(self.started))
    }
}

fn unix_to_text(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

pub(crate) fn now_secs() -> u64 {
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

pub(crate) fn process_alive(pid: u32) -> bool {
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
pub(crate) struct Heartbeat {
    stop: Option<Sender<()>>,
    beat: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Every `every`, writes `render(now)` to `name`.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        name: String,
        every: Duration,
        render: impl Fn(u64) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<Self, RepoError> {
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
            .map_err(|e| RepoError::Invalid(format!("cannot start a heartbeat: {e}")))?;
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
        let Some(why) = crate::store::unwritable(&err) else { return Err(err) };
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

/// The live lock-like files of `dir` (their names inside it, and holders): stale ones are
/// removed with a warning; an unreadable one counts as a live exclusive holder that never
/// expires, so nothing it may guard is touched.
pub(crate) fn live_in(store: &dyn Store, dir: &str, what: &str) -> Result<Vec<(String, LockInfo)>, RepoError> {
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
