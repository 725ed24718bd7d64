//! A backup job over many VMs: the job's lease in the repository (so other proxies sharing it
//! see the job as live), VMs selected by name, moref, instance UUID or inventory path, at most
//! N backed up at once, and an outcome that says whether all, some or none succeeded. On
//! cancellation (Ctrl-C) [`sweep_own_snapshots`] removes whatever snapshot the job still holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use vsphere::{Client, MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::flow::backup_vm;
use crate::hygiene::hygiene;
use crate::report::VmReport;

/// How a VM is named on the command line or in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Its display name.
    Name(String),
    /// Its moref value (`vm-42`).
    Moref(String),
    /// Its instance UUID (vCenter-unique).
    InstanceUuid(String),
    /// Its inventory path (`DC1/vm/Folder/db01`), or a folder's: every VM under it.
    Path(String),
}

impl Selector {
    /// The selector as it was typed.
    pub fn text(&self) -> &str {
        match self {
            Self::Name(t) | Self::Moref(t) | Self::InstanceUuid(t) | Self::Path(t) => t,
        }
    }

    /// Reads `vm-42`, a UUID, a path with `/`, or else a name.
    pub fn parse(text: &str) -> Self {
        let t = text.trim();
        let is_uuid = t.len() == 36
            && t.chars()
                .enumerate()
                .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
        if is_uuid {
            Self::InstanceUuid(t.to_ascii_lowercase())
        } else if t.contains('/') {
            Self::Path(t.to_owned())
        } else if t.strip_prefix("vm-").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())) {
            Self::Moref(t.to_owned())
        } else {
            Self::Name(t.to_owned())
        }
    }
}

/// The VMs `selectors` name, each once, in the order named; `all` takes every VM. A selector
/// that matches nothing, or a name that matches several VMs, is an error naming it.
pub async fn select_vms(client: &Client, selectors: &[Selector], all: bool) -> Result<Vec<Vm>, OrchError> {
    let s = select(client, selectors, all).await?;
    match s.missing.into_iter().next() {
        Some((_, why)) => Err(OrchError::Refused(why)),
        None => Ok(s.vms),
    }
}

/// What a job's selectors found: the VMs, and why each selector that found none failed.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The VMs, each once, in the order named.
    pub vms: Vec<Vm>,
    /// Per selector that matched no VM, or several: the selector as typed, and why.
    pub missing: Vec<(String, String)>,
}

impl Selection {
    /// The VMs' morefs.
    pub fn morefs(&self) -> Vec<MoRef> {
        self.vms.iter().map(|v| v.moref.clone()).collect()
    }
}

/// Like [`select_vms`], but a selector that finds no VM (a VM deleted or renamed, a typo) does
/// not stop the others: it is listed in [`Selection::missing`], for the job to report as a
/// failure of its own while every VM found is protected.
pub async fn select(client: &Client, selectors: &[Selector], all: bool) -> Result<Selection, OrchError> {
    let vms = client.vms().await?;
    if all {
        return Ok(Selection { vms, missing: Vec::new() });
    }
    let mut out: Vec<Vm> = Vec::new();
    let mut missing = Vec::new();
    for s in selectors {
        let found: Vec<&Vm> = match s {
            Selector::Name(n) => vms.iter().filter(|v| &v.name == n).collect(),
            Selector::Moref(m) => vms.iter().filter(|v| &v.moref.value == m).collect(),
            Selector::InstanceUuid(u) => {
                vms.iter().filter(|v| v.instance_uuid.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(u))).collect()
            }
            Selector::Path(p) => match client.find_by_inventory_path(p).await? {
                // A folder (or datacenter, cluster, pool): every VM under it.
                Some(m) if m.kind != "VirtualMachine" => {
                    let inside: Vec<MoRef> = client.vms_in(&m).await?.into_iter().map(|v| v.moref).collect();
                    if inside.is_empty() {
                        missing.push((s.text().to_owned(), format!("{p} ({m}) holds no VMs")));
                        continue;
                    }
                    for v in vms.iter().filter(|v| inside.contains(&v.moref)) {
                        if !out.iter().any(|o| o.moref == v.moref) {
                            out.push(v.clone());
                        }
                    }
                    continue;
                }
                Some(m) => vms.iter().filter(|v| v.moref == m).collect(),
                None => Vec::new(),
            },
        };
        match found.as_slice() {
            [] => missing.push((s.text().to_owned(), format!("no VM matches {s:?}"))),
            [one] => {
                if !out.iter().any(|v| v.moref == one.moref) {
                    out.push((*one).clone());
                }
            }
            many => {
                let refs: Vec<String> = many.iter().map(|v| v.moref.value.clone()).collect();
                missing.push((
                    s.text().to_owned(),
                    format!(
                        "{s:?} matches {} VMs ({}): name one by moref or instance UUID",
                        many.len(),
                        refs.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(Selection { vms: out, missing })
}

/// Adds to `report` a failure for each selector of the job that found no VM, counted in the
/// metrics like any failed VM, so an alert on failures sees it.
pub fn report_missing(ctx: &JobContext, report: &mut JobReport, missing: &[(String, String)]) {
    for (selector, why) in missing {
        ctx.metrics.vm_finished(true, false);
        report.vms.push(VmReport {
            vm: selector.clone(),
            error: Some(format!("{why}: not backed up (the job's other VMs were)")),
            snapshot_removed: true,
            ..VmReport::default()
        });
    }
}

/// What a proxy process needs besides its copy buffers, measured with `cargo xtask bench vms`:
/// about 32 MiB, plus about 1 MiB for each VM worked on at once (its session answers, plans,
/// connections, and the repository's compressed chunks in flight).
pub const BASE_RESERVE: u64 = 32 << 20;
/// See [`BASE_RESERVE`].
pub const PER_VM_RESERVE: u64 = 1 << 20;
/// The copy buffers never get less than this.
pub const MIN_BUFFERS: u64 = 16 << 20;

/// The share of a whole-process memory budget left for copy buffers when `vms` VMs run at
/// once, so the process as a whole stays within `memory`.
pub fn buffer_budget(memory: u64, vms: usize) -> u64 {
    let reserve = BASE_RESERVE + PER_VM_RESERVE.saturating_mul(vms as u64);
    memory.saturating_sub(reserve).max(MIN_BUFFERS)
}

/// Whether a job's VMs succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every VM has a restore point.
    All,
    /// Some do.
    Some,
    /// None does (or there were none).
    None,
}

/// What a job did.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// The job's tag (`<proxy>-<job>`).
    pub job: String,
    /// Per VM, in the order they were named.
    pub vms: Vec<VmReport>,
    /// Wall time.
    pub seconds: f64,
}

impl JobReport {
    /// All, some or none succeeded.
    pub fn outcome(&self) -> Outcome {
        let ok = self.vms.iter().filter(|r| r.error.is_none()).count();
        match ok {
            0 => Outcome::None,
            n if n == self.vms.len() => Outcome::All,
            _ => Outcome::Some,
        }
    }
}

/// Backs up `vms` under one job lease, at most `concurrency` at once (and within the process's
/// `ctx.limits`). Cancelling the engine
/// (`ctx.engine.cancel`) stops it cleanly: copies under way stop, their snapshots are removed
/// and no restore point is written for them; VMs not yet begun are not touched.
pub async fn run_job(ctx: &JobContext, vms: &[MoRef], concurrency: usize) -> Result<JobReport, OrchError> {
    let started = Instant::now();
    let tag = ctx.tag();
    let lease = ctx.lease().await?;
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    // Hosts and datastores, for the per-host and per-datastore limits.
    let facts: HashMap<MoRef, Vm> =
        ctx.client.vms_by_moref(vms).await?.into_iter().map(|v| (v.moref.clone(), v)).collect();
    let facts = Arc::new(facts);
    let mut set = tokio::task::JoinSet::new();
    for (n, vm) in vms.iter().enumerate() {
        let (ctx, vm, gate, facts) = (ctx.clone(), vm.clone(), gate.clone(), facts.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            // The VM first: a job that waits for it holds no host or datastore slot meanwhile.
            let _mine = match ctx.limits.claim_vm(&vm).await {
                Ok(p) => p,
                Err(e) => {
                    ctx.metrics.vm_finished(true, false);
                    let r = VmReport {
                        vm: facts.get(&vm).map_or_else(|| vm.to_string(), |v| v.name.clone()),
                        error: Some(e.to_string()),
                        snapshot_removed: true,
                        ..VmReport::default()
                    };
                    return (n, r);
                }
            };
            let _admitted = ctx.limits.admit(facts.get(&vm)).await;
            if ctx.engine.cancel.is_cancelled() {
                // Cancelled before it began: nothing was touched.
                let r = VmReport {
                    vm: facts.get(&vm).map_or_else(|| vm.to_string(), |v| v.name.clone()),
                    error: Some("cancelled before it started".into()),
                    snapshot_removed: true,
                    ..VmReport::default()
                };
                return (n, r);
            }
            (n, backup_vm(&ctx, &vm).await)
        });
    }
    let mut reports: Vec<(usize, VmReport)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(done) => reports.push(done),
            Err(e) => return Err(OrchError::Refused(format!("a VM's backup task failed: {e}"))),
        }
    }
    reports.sort_by_key(|(n, _)| *n);
    drop(lease);
    Ok(JobReport {
        job: tag,
        vms: reports.into_iter().map(|(_, r)| r).collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Removes the stale snapshots of ours from `vms` (what a daemon does when it starts, before
/// any job runs): per VM, what was removed and what was noticed.
pub async fn clean_stale(ctx: &JobContext, vms: &[MoRef]) -> Result<Vec<VmReport>, OrchError> {
    let mut out = Vec::new();
    for vm in ctx.client.vms_by_moref(vms).await? {
        let mut r = VmReport { vm: vm.name.clone(), snapshot_removed: true, ..VmReport::default() };
        if let Err(e) = hygiene(ctx, &vm, &mut r).await {
            r.error = Some(e.to_string());
        }
        out.push(r);
    }
    Ok(out)
}

/// Removes every snapshot named for this job from `vms` (after a cancelled job: a dropped
/// backup future cannot remove its own), and puts back the DRS settings its flows overrode.
/// Returns what it removed or put back, and what it could not.
pub async fn sweep_own_snapshots(ctx: &JobContext, vms: &[MoRef]) -> (Vec<String>, Vec<String>) {
    let name = ctx.snapshot_name();
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    let found = match ctx.client.vms_by_moref(vms).await {
        Ok(v) => v,
        Err(e) => return (removed, vec![format!("cannot list the job's VMs to remove its snapshots: {e}")]),
    };
    for vm in &found {
        for s in vm.all_snapshots().into_iter().filter(|s| s.name == name) {
            match ctx.client.remove_snapshot(&s.moref, true).await {
                Ok(()) => removed.push(format!("{} of {}", s.name, vm.name)),
                Err(e) => failed.push(format!("{} of {}: {e}", s.name, vm.name)),
            }
        }
    }
    // And the DRS overrides the dropped flows set.
    for note in crate::drs::restore_job_pins(ctx, &found).await {
        if note.starts_with("put back") { removed.push(note) } else { failed.push(note) }
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffers_get_what_the_vms_leave_of_the_budget() {
        assert_eq!(buffer_budget(256 << 20, 100), (256 - 32 - 100) << 20);
        assert_eq!(buffer_budget(256 << 20, 1), (256 - 33) << 20);
        assert_eq!(buffer_budget(64 << 20, 500), MIN_BUFFERS, "never below the floor");
    }

    #[test]
    fn selectors_are_told_apart() {
        assert_eq!(Selector::parse("vm-42"), Selector::Moref("vm-42".into()));
        assert_eq!(Selector::parse("vm-web"), Selector::Name("vm-web".into()));
        assert_eq!(Selector::parse("DC1/vm/db01"), Selector::Path("DC1/vm/db01".into()));
        assert_eq!(
            Selector::parse("5029D8E4-1C3B-4F7A-9B2E-0123456789AB"),
            Selector::InstanceUuid("5029d8e4-1c3b-4f7a-9b2e-0123456789ab".into())
        );
        assert_eq!(Selector::parse("db01"), Selector::Name("db01".into()));
    }
}
