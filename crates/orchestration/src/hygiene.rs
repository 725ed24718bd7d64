//! Snapshot hygiene before each VM's backup (reference 2.13): a snapshot of ours is stale when
//! the job named in it is no longer running (no live lease in the target, which every proxy
//! sharing it sees) and either that job is known to be dead (it recorded its intent in this
//! target: see `intent`) or the snapshot is older than the longest allowed job; stale ones are
//! removed, a live job's never. Any snapshot older than a day by the server's clock is
//! reported, ours or not.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use vsphere::{Client, Vm};

use crate::OrchError;
use crate::context::{JobContext, SNAPSHOT_PREFIX};
use crate::metrics::Metrics;
use crate::report::VmReport;
use crate::snapshot::forget_intents;
use crate::support::blocking;

/// Snapshots older than this are reported, whoever made them.
pub const OLD_SNAPSHOT: Duration = Duration::from_secs(24 * 3600);

/// A vSphere `xsd:dateTime` (`2026-11-22T10:00:00.123Z`, or with a `+01:00` offset), as a time.
pub fn parse_server_time(text: &str) -> Option<SystemTime> {
    let t = text.trim();
    // A numeric offset at the end: `+hh:mm` or `-hh:mm`.
    let (base, offset_secs) = match t.len().checked_sub(6).and_then(|i| t.get(i..).map(|tail| (i, tail))) {
        Some((i, tail))
            if (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes().get(3) == Some(&b':') =>
        {
            let h: i64 = tail.get(1..3)?.parse().ok()?;
            let m: i64 = tail.get(4..6)?.parse().ok()?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (t.get(..i)?, sign * (h * 3600 + m * 60))
        }
        _ => (t.strip_suffix('Z').unwrap_or(t), 0),
    };
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    // `base` was local to the offset: UTC is local minus the offset.
    if offset_secs >= 0 {
        local.checked_sub(Duration::from_secs(offset_secs.unsigned_abs()))
    } else {
        local.checked_add(Duration::from_secs(offset_secs.unsigned_abs()))
    }
}

/// What hygiene did on one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hygiene {
    /// Stale snapshots of ours removed (names).
    pub removed: Vec<String>,
    /// What to tell the operator (kept snapshots, old ones, removals that failed).
    pub notes: Vec<String>,
}

/// The job tag inside a snapshot name of ours (`syncproxy-<proxy>-<job>` gives
/// `<proxy>-<job>`).
pub fn job_of(snapshot_name: &str) -> Option<&str> {
    snapshot_name.strip_prefix(SNAPSHOT_PREFIX)?.strip_prefix('-').filter(|t| !t.is_empty())
}

/// Removes `vm`'s stale snapshots of ours; `live` holds the tags of running jobs (this one's
/// among them), `dead` those of jobs known to be dead (whose snapshots go whatever their age),
/// `now` is the server's clock, `max_job` the longest a job may run.
pub async fn clean_vm(
    client: &Client,
    vm: &Vm,
    live: &HashSet<String>,
    dead: &HashSet<String>,
    now: SystemTime,
    max_job: Duration,
    metrics: &Metrics,
) -> Result<Hygiene, OrchError> {
    let mut out = Hygiene::default();
    for s in vm.all_snapshots() {
        let age = parse_server_time(&s.create_time).and_then(|t| now.duration_since(t).ok());
        let age_text = age.map_or_else(
            || format!("of unknown age ({:?})", s.create_time),
            |a| format!("{} old", humantime::format_duration(Duration::from_secs(a.as_secs()))),
        );
        if age.is_some_and(|a| a > OLD_SNAPSHOT) {
            out.notes.push(format!(
                "snapshot {:?} of {} is {age_text} by the server's clock: old snapshots grow and slow the VM",
                s.name, vm.name
            ));
        }
        let Some(job) = job_of(&s.name) else { continue };
        if live.contains(job) {
            continue;
        }
        let known_dead = dead.contains(job);
        if !known_dead && age.is_none_or(|a| a <= max_job) {
            out.notes.push(format!(
                "snapshot {:?} of {} is ours and its job is not running, but it is {age_text}, not older than the \
                 longest job ({}) and it was made for another target, so whether its job is dead cannot be \
                 known here: left for now",
                s.name,
                vm.name,
                humantime::format_duration(max_job)
            ));
            continue;
        }
        match client.remove_snapshot(&s.moref, true).await {
            Ok(()) => {
                let why = if known_dead { "its job died" } else { "older than the longest job" };
                tracing::warn!(
                    "removed stale snapshot {:?} of {} ({age_text}; job {job} is not running: {why})",
                    s.name,
                    vm.name
                );
                metrics.stale_removed();
                out.removed.push(s.name.clone());
            }
            Err(e) => out.notes.push(format!("COULD NOT REMOVE stale snapshot {:?} of {}: {e}", s.name, vm.name)),
        }
    }
    Ok(out)
}

/// Removes stale snapshots of ours from `vm` (see `hygiene`) and says what it did; returns
/// whether anything was removed.
pub(crate) async fn hygiene(ctx: &JobContext, vm: &Vm, report: &mut VmReport) -> Result<bool, OrchError> {
    let (leases, moref) = (ctx.leases(), vm.moref.value.clone());
    let (running, recorded) = blocking(move || {
        Ok::<_, durable::Error>((durable::live_jobs_in(&*leases)?, crate::intent::jobs_on(&*leases, &moref)?))
    })
    .await?;
    let mut live: HashSet<String> = running.into_iter().map(|(name, _)| name).collect();
    live.insert(ctx.tag());
    // A job that recorded its intent here and holds no live lease is dead.
    let dead: HashSet<String> = recorded.into_iter().filter(|j| !live.contains(j)).collect();
    let present: HashSet<&str> = vm.all_snapshots().iter().filter_map(|s| crate::hygiene::job_of(&s.name)).collect();
    // Dead jobs whose snapshot is already gone: their records have served.
    let mut done: Vec<String> = dead.iter().filter(|j| !present.contains(j.as_str())).cloned().collect();
    let mut removed = Vec::new();
    if !vm.snapshots.is_empty() {
        let now_text = ctx.client.current_time().await?;
        let now = parse_server_time(&now_text)
            .ok_or_else(|| OrchError::Refused(format!("the server's clock reads {now_text:?}, not a time")))?;
        let h = clean_vm(&ctx.client, vm, &live, &dead, now, ctx.max_job, &ctx.metrics).await?;
        report.warnings.extend(h.notes);
        done.extend(h.removed.iter().filter_map(|n| crate::hygiene::job_of(n)).map(str::to_owned));
        removed = h.removed;
    }
    forget_intents(ctx, vm, done).await;
    let any = !removed.is_empty();
    report.stale_removed = removed;
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_times_parse_with_and_without_offsets() {
        let z = parse_server_time("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(parse_server_time("2026-11-22T10:00:00.250Z").unwrap(), z + Duration::from_millis(250));
        assert_eq!(parse_server_time("2026-11-22T11:30:00+01:30").unwrap(), z);
        assert_eq!(parse_server_time("2026-11-22T08:00:00-02:00").unwrap(), z);
        assert_eq!(parse_server_time(" 2026-11-22T10:00:00 ").unwrap(), z);
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-22T10:00:00+1:00", "+01:00"] {
            assert_eq!(parse_server_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_our_prefix_names_a_job() {
        assert_eq!(job_of("syncproxy-p1-job7"), Some("p1-job7"));
        assert_eq!(job_of("syncproxy-"), None);
        assert_eq!(job_of("syncproxyX-a"), None);
        assert_eq!(job_of("VeeamSnapshot"), None);
    }
}
