//! A backup's durable progress, `sessions/<key>`, kept while it copies so that a backup cut
//! short (the proxy killed, its host rebooted) is finished by the next run under the same frozen
//! source instead of read again from the start.
//!
//! A session names what it builds on (parent, disks, the frozen source, the gc generation when
//! it began) in `sessions/<key>.json`; each checkpoint of a disk writes that disk's index as
//! written so far (`sessions/<key>/<n>.idx`, sealed like every index) and then the ranges known
//! durable (`sessions/<key>/<n>.json`), in that order, so the ranges never name chunks the
//! index lacks. A gc between the interruption and the resume may have removed chunks only the
//! session referenced: such a session is refused, and the copy starts over.

use std::sync::Arc;

use cbt::ExtentSet;
use pipeline::Digests;
use pipeline::{BlockError, Durable, SaveCheckpoint};
use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::format::Index;
use crate::sink::RepoSink;
use crate::{Backup, DiskSpec, Repo, RepoError};
use durable::Store;

/// The session format this code writes and reads.
pub const SESSION_FORMAT: u32 = 1;

/// The longest session key.
const MAX_KEY: usize = 128;

/// What an interrupted backup was making.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// [`SESSION_FORMAT`].
    pub format: u32,
    /// The caller's name for what is backed up (one session per key, such as a VM).
    pub key: String,
    /// The job that began it.
    pub job: String,
    /// The frozen source's identity (a snapshot's moref).
    pub source: String,
    /// The restore point it builds on.
    pub parent: Option<String>,
    /// Its disks by name and capacity, in order.
    pub disks: Vec<(String, u64)>,
    /// The gc generation when it began (hex), or none before the first gc.
    pub generation: Option<String>,
}

/// One disk's durable ranges.
#[derive(Debug, Serialize, Deserialize)]
struct DiskProgress {
    format: u32,
    plan: String,
    done: Vec<(u64, u64)>,
}

/// Keys are file names: letters, digits, `-`, `_` and `.`, not starting with a dot.
fn check_key(key: &str) -> Result<(), RepoError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && !key.starts_with('.')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "{key:?} is not a session key (1 to {MAX_KEY} letters, digits, '-', '_' or '.', not starting with '.')"
        )))
    }
}

fn hex(bytes: Option<&[u8]>) -> Option<String> {
    bytes.map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, RepoError> {
    serde_json::to_vec_pretty(value).map_err(|e| RepoError::Invalid(e.to_string()))
}

/// Saves one disk's checkpoints into its session.
#[derive(Debug)]
struct SessionCheckpoint {
    store: Arc<dyn Store>,
    codec: Arc<Codec>,
    key: String,
    n: usize,
    sink: Arc<RepoSink>,
}

impl SaveCheckpoint for SessionCheckpoint {
    /// The copy's digest table is not kept: the index saved here holds the chunk IDs, which in
    /// a plain repository are those very digests (the sink took them as IDs).
    fn save(&self, durable: &Durable, _digests: &Digests) -> Result<(), BlockError> {
        let fail = |e: RepoError| {
            BlockError::new(e.kind(), format!("saving the progress of session {}", self.key)).with_source(e)
        };
        // The index first: everything `done` names is in it (writes finish before they count as
        // done; a slot written since is the same frozen source's data, and is simply rewritten
        // by a resume).
        let idx = format!("sessions/{}/{}.idx", self.key, self.n);
        let sealed = self.codec.seal(&idx, self.sink.index_snapshot().encode()).map_err(fail)?;
        self.store.put(&idx, &sealed).map_err(|e| fail(e.into()))?;
        let progress = DiskProgress {
            format: SESSION_FORMAT,
            plan: durable.plan.clone(),
            done: durable.done.iter().map(|e| (e.start(), e.len())).collect(),
        };
        self.store
            .put(&format!("sessions/{}/{}.json", self.key, self.n), &json(&progress).map_err(fail)?)
            .map_err(|e| fail(e.into()))
    }
}

impl Backup {
    /// Keeps this backup's progress as session `key`, made by `job` from the frozen source
    /// `source`; each disk's copy checkpoints through [`Backup::checkpointer`], and
    /// [`Backup::finish`] drops the session. An older session under the key is replaced.
    pub fn keep_progress(&mut self, key: &str, job: &str, source: &str) -> Result<(), RepoError> {
        check_key(key)?;
        let s = Session {
            format: SESSION_FORMAT,
            key: key.to_owned(),
            job: job.to_owned(),
            source: source.to_owned(),
            parent: self.parent.clone(),
            disks: self.disks.iter().map(|d| (d.name.clone(), d.capacity)).collect(),
            generation: hex(self.generation.as_deref()),
        };
        if self.session.as_deref() != Some(key) {
            self.repo.drop_session(key)?;
        }
        self.repo.store.put(&format!("sessions/{key}.json"), &json(&s)?)?;
        self.session = Some(key.to_owned());
        Ok(())
    }

    /// Where disk `n`'s copy saves its checkpoints, once [`Backup::keep_progress`] was called.
    pub fn checkpointer(&self, n: usize) -> Option<Arc<dyn SaveCheckpoint>> {
        Some(Arc::new(SessionCheckpoint {
            store: self.repo.store.clone(),
            codec: self.repo.codec.clone(),
            key: self.session.clone()?,
            n,
            sink: self.sinks.get(n)?.clone(),
        }))
    }
}

impl Repo {
    /// The interrupted backup kept under `key`, if any.
    pub fn session(&self, key: &str) -> Result<Option<Session>, RepoError> {
        check_key(key)?;
        let name = format!("sessions/{key}.json");
        let Some(raw) = self.store.get(&name)? else { return Ok(None) };
        let s: Session = serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt(format!("{name}: {e}")))?;
        if s.format > SESSION_FORMAT {
            return Err(RepoError::NewerFormat { what: name, found: s.format, known: SESSION_FORMAT });
        }
        Ok(Some(s))
    }

    /// Forgets the session `key` (its backup finished, or its source is gone).
    pub fn drop_session(&self, key: &str) -> Result<(), RepoError> {
        check_key(key)?;
        for f in self.store.list(&format!("sessions/{key}"))? {
            self.store.delete(&format!("sessions/{key}/{}", f.name))?;
        }
        self.store.delete(&format!("sessions/{key}"))?;
        Ok(self.store.delete(&format!("sessions/{key}.json"))?)
    }

    /// Begins a backup that finishes session `key`: a new backup of `disks` on the session's
    /// parent, where each disk the session holds under the same name and size starts from the
    /// index it saved, and returns with it the ranges of each disk already durable (empty for
    /// a disk the session lacks). Checkpoints go on into the same session. Refused when a gc ran
    /// since the session began (it may have removed chunks only the session referenced).
    pub fn resume(&self, key: &str, disks: Vec<DiskSpec>) -> Result<(Backup, Vec<ExtentSet>), RepoError> {
        let s = self.session(key)?.ok_or_else(|| RepoError::NotFound(format!("no session {key}")))?;
        let mut backup = self.begin(s.parent.as_deref(), disks)?;
        if hex(backup.generation.as_deref()) != s.generation {
            return Err(RepoError::Conflict(format!(
                "a gc ran since session {key} began; its progress cannot be trusted and the copy starts over"
            )));
        }
        let mut done = Vec::new();
        for (n, d) in backup.disks.iter().enumerate() {
            let same = s.disks.get(n).is_some_and(|(name, cap)| *name == d.name && *cap == d.capacity);
            let progress = if same { self.load_progress(key, n)? } else { None };
            match progress {
                Some((index, ranges)) if index.capacity == d.capacity && index.chunk_size == self.config.chunk_size => {
                    backup.sinks[n].restart_from(index);
                    done.push(ranges);
                }
                Some(_) => {
                    return Err(RepoError::Corrupt(format!(
                        "sessions/{key}/{n}.idx describes another disk than {}",
                        d.name
                    )));
                }
                None => done.push(ExtentSet::new()),
            }
        }
        backup.session = Some(key.to_owned());
        Ok((backup, done))
    }

    /// Disk `n`'s saved index and durable ranges, if it saved any.
    fn load_progress(&self, key: &str, n: usize) -> Result<Option<(Index, ExtentSet)>, RepoError> {
        let name = format!("sessions/{key}/{n}.json");
        let Some(raw) = self.store.get(&name)? else { return Ok(None) };
        let p: DiskProgress = serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt(format!("{name}: {e}")))?;
        if p.format > SESSION_FORMAT {
            return Err(RepoError::NewerFormat { what: name, found: p.format, known: SESSION_FORMAT });
        }
        let index = self.index_file(&format!("sessions/{key}/{n}.idx"), None)?;
        let ranges = ExtentSet::from_ranges(p.done.iter().copied().filter(|&(s, l)| s.checked_add(l).is_some()));
        Ok(Some((index, ranges)))
    }
}

#[cfg(test)]
mod tests {
    use super::check_key;

    #[test]
    fn keys_are_plain_file_names() {
        for good in ["vc-1234_vm-5678", "a", "x.y"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"k".repeat(129)] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }
}
