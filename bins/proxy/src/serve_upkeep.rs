//! The daemon's repository jobs: `[[verify]]` reads every chunk back and checks it against
//! its name (a damaged chunk fails the run, naming the restore points it breaks), and
//! `[[copy]]` sends restore points to a second repository that keeps its own retention (the
//! long-term tier), then prunes and gc's that one. Both stop at their next step on SIGTERM.

use std::sync::Arc;
use std::time::SystemTime;

use orchestration::config::{CopyConfig, Schedule, VerifyConfig};
use serde_json::{Value, json};
use tokio::sync::watch;

/// The most damaged chunks a run's record lists (the count is always whole).
const LISTED: usize = 20;

/// What a repository job does.
pub(crate) enum Upkeep {
    Verify(VerifyConfig),
    Copy(CopyConfig),
}

/// One `[[verify]]` or `[[copy]]`, ready to run again and again.
pub(crate) struct UpkeepRunner {
    pub(crate) name: String,
    pub(crate) schedule: Schedule,
    pub(crate) what: Upkeep,
}

impl UpkeepRunner {
    /// One run, as the history keeps it; `stop` stops it at its next step. `may_create`: a
    /// copy may make its destination (no copy of this job has succeeded yet); `last`: this
    /// job's newest run (a sliced verify takes the slice after its).
    pub(crate) async fn once(
        &self,
        started: SystemTime,
        mut stop: watch::Receiver<bool>,
        may_create: bool,
        last: Option<&Value>,
    ) -> Value {
        let steps = Arc::new(repo::Steps::default());
        let on_stop = steps.clone();
        let watcher = tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                on_stop.stop();
            }
        });
        let mut slice_run = None;
        let (kind, result) = match &self.what {
            Upkeep::Verify(c) => {
                // The slice after the last run's when that one read its slice through (whatever
                // it found), the same slice again when it did not; the first run takes slice 0.
                let slices = c.slices.max(1);
                let slice =
                    last.and_then(|r| Some((r["slice"].as_u64()?, r["verify"].is_object()))).map_or(0, |(s, done)| {
                        let s = u32::try_from(s).unwrap_or(0);
                        if done { s.wrapping_add(1) % slices } else { s % slices }
                    });
                slice_run = Some(slice);
                let (c, s) = (c.clone(), steps.clone());
                ("verify", tokio::task::spawn_blocking(move || verify(&c, &s, slice)).await)
            }
            Upkeep::Copy(c) => {
                let (c, s, create) = (c.clone(), steps.clone(), may_create);
                ("copy", tokio::task::spawn_blocking(move || copy(&c, &s, create)).await)
            }
        };
        watcher.abort();
        let (outcome, error, detail) = match result {
            Ok(Ok((detail, None))) => ("succeeded", None, detail),
            Ok(Ok((detail, Some(problem)))) => ("failed", Some(problem), detail),
            Ok(Err(e)) => ("failed", Some(e), Value::Null),
            Err(e) => ("failed", Some(format!("the {kind} did not finish: {e}")), Value::Null),
        };
        match &error {
            Some(e) => tracing::error!(job = %self.name, kind, "{e}"),
            None => tracing::info!(job = %self.name, kind, detail = %detail, "done"),
        }
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let mut rec = json!({
            "job": self.name,
            "kind": kind,
            "started": time(started),
            "finished": time(SystemTime::now()),
            "seconds": started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            "outcome": outcome,
            "error": error,
        });
        rec[kind] = detail;
        if let Some(s) = slice_run {
            rec["slice"] = json!(s);
        }
        rec
    }
}

/// A verify (of slice `slice` of the job's slices): what it found, and the problem when a
/// restore point is damaged.
fn verify(c: &VerifyConfig, steps: &repo::Steps, slice: u32) -> Result<(Value, Option<String>), String> {
    let repo = c.open_repository().map_err(|e| format!("cannot open the repository {}: {e}", c.repository))?;
    let r = repo.verify_slice(steps, slice, c.slices).map_err(|e| format!("verifying {}: {e}", c.repository))?;
    let detail = json!({
        "repository": c.repository,
        "slice": slice,
        "slices": c.slices,
        "chunks_checked": r.chunks_checked,
        "bad_chunks": r.bad_chunks.len(),
        "bad_chunks_listed": r.bad_chunks.iter().take(LISTED).map(|(name, why)| json!({"chunk": name, "why": why})).collect::<Vec<_>>(),
        "damaged_points": r.damaged_points,
    });
    let problem = (!r.bad_chunks.is_empty()).then(|| {
        format!(
            "{} damaged or missing chunk(s) in {}; restore points that cannot be restored whole: {}",
            r.bad_chunks.len(),
            c.repository,
            match r.damaged_points.is_empty() {
                true => "none".to_owned(),
                false => r.damaged_points.keys().cloned().collect::<Vec<_>>().join(", "),
            }
        )
    });
    Ok((detail, problem))
}

/// A copy to the second tier, point by point (one that cannot be copied, a damaged one, is
/// named and the others still go), then the tier's prune and gc by its own retention.
/// `may_create`: whether a missing destination is made (only until a copy has succeeded: a
/// tier that vanished later is an unmounted disk or a mistyped prefix, not a new tier).
fn copy(c: &CopyConfig, steps: &repo::Steps, may_create: bool) -> Result<(Value, Option<String>), String> {
    let src = c.open_source().map_err(|e| format!("cannot open the repository {}: {e}", c.repository))?;
    let dest = match may_create {
        true => c.open_destination(src.config().chunk_size),
        false => c.open_existing_destination(),
    }
    .map_err(|e| format!("cannot open the destination {}: {e}", c.to))?;
    let keep = c.retention.map(|r| r.retention());
    let todo = match &keep {
        Some(k) => src.points_to_copy(&dest, k),
        None => src.points_to_copy(&dest, &repo::Retention { last: u32::MAX, ..Default::default() }),
    }
    .map_err(|e| format!("choosing what to copy: {e}"))?;
    let mut copied = repo::CopyReport::default();
    let mut failed = Vec::new();
    for id in &todo {
        match src.copy_to_with(&dest, Some(std::slice::from_ref(id)), steps) {
            Ok(r) => {
                copied.points_copied.extend(r.points_copied);
                copied.chunks_copied += r.chunks_copied;
                copied.bytes_copied += r.bytes_copied;
            }
            Err(e @ repo::RepoError::Stopped(_)) => return Err(format!("copying to {}: {e}", c.to)),
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    let mut detail = json!({
        "from": c.repository,
        "to": c.to,
        "points_copied": copied.points_copied,
        "chunks_copied": copied.chunks_copied,
        "bytes_copied": copied.bytes_copied,
        "points_failed": failed,
    });
    if let Some(k) = keep {
        let pruned = dest.prune(&k, false).map_err(|e| format!("pruning {}: {e}", c.to))?;
        detail["pruned"] = json!(pruned.removed);
        if !pruned.removed.is_empty() {
            detail["gc"] = match dest.gc_with(c.gc_grace(), false, steps) {
                Ok(g) => json!({"chunks_removed": g.chunks_removed, "chunks_in_use": g.chunks_in_use}),
                // The points are gone either way; only their space waits for the next run.
                Err(e) => json!({"error": e.to_string()}),
            };
        }
    }
    let problem = (!failed.is_empty())
        .then(|| format!("{} restore point(s) could not be copied to {}: {}", failed.len(), c.to, failed.join("; ")));
    Ok((detail, problem))
}
