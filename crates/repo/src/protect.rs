//! Protected restore points and forgetting one: a protected point is kept by every prune and
//! refused by `forget` until it is unprotected (a point under investigation, a legal hold, the
//! last good one before an incident), and carries the operator's note.
//!
//! A protection is one sealed file, `protected/<point>.json`, beside the immutable manifest,
//! so marking and unmarking never rewrite the restore point itself.

use serde::{Deserialize, Serialize};

use crate::{LockKind, Repo, RepoError};

/// The longest note kept with a protection.
pub const MAX_NOTE: usize = 4096;

/// A protection, as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// The restore point.
    pub point: String,
    /// When it was protected (UTC, RFC 3339).
    pub time: String,
    /// Why, in the operator's words (may be empty).
    pub note: String,
}

fn name(point: &str) -> String {
    format!("protected/{point}.json")
}

impl Repo {
    /// Protects restore point `point` (an exact ID) with `note`, replacing an earlier note.
    pub fn protect(&self, point: &str, note: &str) -> Result<Protection, RepoError> {
        self.point(point)?;
        if note.len() > MAX_NOTE {
            return Err(RepoError::Invalid(format!(
                "a note of {} bytes is longer than the {MAX_NOTE} kept",
                note.len()
            )));
        }
        let _lock = self.lock_to_write(LockKind::Shared, &format!("protecting {point}"))?;
        let p = Protection {
            point: point.to_owned(),
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            note: note.to_owned(),
        };
        let body = serde_json::to_vec_pretty(&p).map_err(|e| RepoError::Invalid(e.to_string()))?;
        let n = name(point);
        self.store.put(&n, &self.codec.seal(&n, body)?)?;
        Ok(p)
    }

    /// Removes the protection of `point`; says whether there was one.
    pub fn unprotect(&self, point: &str) -> Result<bool, RepoError> {
        let n = name(point);
        if !self.store.exists(&n)? {
            return Ok(false);
        }
        let _lock = self.lock_to_write(LockKind::Shared, &format!("unprotecting {point}"))?;
        self.store.delete(&n)?;
        Ok(true)
    }

    /// The protection of `point`, if it has one. One that cannot be read still protects: a
    /// damaged marker must not let a prune remove what someone meant to keep.
    pub fn protection(&self, point: &str) -> Result<Option<Protection>, RepoError> {
        let n = name(point);
        let Some(raw) = self.store.get(&n)? else { return Ok(None) };
        let opened = self.codec.open(&n, raw).and_then(|b| {
            serde_json::from_slice::<Protection>(&b).map_err(|e| RepoError::Corrupt(format!("{n}: {e}")))
        });
        Ok(Some(match opened {
            Ok(p) if p.point == point => p,
            Ok(_) | Err(_) => {
                tracing::warn!("{n} cannot be read; the point stays protected");
                Protection { point: point.to_owned(), time: String::new(), note: "(the note cannot be read)".into() }
            }
        }))
    }

    /// Removes restore point `point` (an exact ID): its manifest goes, and with it the point;
    /// gc frees the chunks no other point uses. A protected point is refused.
    pub fn forget(&self, point: &str) -> Result<(), RepoError> {
        self.point(point)?;
        if let Some(p) = self.protection(point)? {
            return Err(RepoError::Invalid(format!(
                "restore point {point} is protected{}; `proxy repo unprotect` it first",
                if p.note.is_empty() { String::new() } else { format!(" ({})", p.note) }
            )));
        }
        let _lock = self.lock_to_write(LockKind::Shared, &format!("forgetting {point}"))?;
        self.store.delete(&format!("points/{point}.json"))?;
        Ok(())
    }
}
