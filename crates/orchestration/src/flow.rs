//! The per-VM flow of reference section 2.13, into a repository or onto replica disks, as an
//! order of steps: stale snapshots of ours removed first (or a dead job's copy adopted and
//! finished), preflight, CBT on when allowed, a snapshot named for this proxy and job (quiesced
//! when VMware Tools run), the copy (`copy`), and the snapshot removed on every path, with
//! consolidation when the server asks for it. What each step does lives in its own module:
//! `context`, `plan`, `copy`, `read`, `vmx`, `snapshot`, `hygiene`, `drs`.

use std::time::Instant;

use repo::Consistency;
use vsphere::{MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::copy::copy_vm;
use crate::hygiene::hygiene;
use crate::report::VmReport;
use crate::snapshot::{after_failed_create, forget_intents, post_thaw, record_intent};
use crate::support::{blocking, one_vm, vm_key};

/// Backs up one VM into the job's repository, or brings its replica disks up to date. Never
/// leaves its snapshot behind on purpose: it is removed on success and on failure alike (a
/// removal that fails is reported loudly).
pub async fn backup_vm(ctx: &JobContext, vm: &MoRef) -> VmReport {
    let started = Instant::now();
    let running = ctx.metrics.vm_started();
    let mut report = VmReport { vm: vm.to_string(), snapshot_removed: true, ..VmReport::default() };
    if let Err(e) = run(ctx, vm, &mut report).await {
        report.error = Some(e.to_string());
    }
    if !report.snapshot_removed {
        ctx.metrics.snapshot_left();
    }
    drop(running);
    ctx.metrics.vm_finished(report.error.is_some(), !report.warnings.is_empty());
    report.seconds = started.elapsed().as_secs_f64();
    report
}

async fn run(ctx: &JobContext, vm_ref: &MoRef, report: &mut VmReport) -> Result<(), OrchError> {
    let vm = one_vm(&ctx.client, vm_ref).await?;
    report.vm = vm.name.clone();
    report.warnings.extend(crate::drs::restore_left(ctx, &vm).await?);
    let pinned = crate::drs::pin(ctx, &vm, &mut report.warnings).await?;
    let r = run_vm(ctx, vm, report).await;
    if let Some(p) = pinned {
        report.warnings.extend(crate::drs::unpin(ctx, p).await);
    }
    r
}

/// The flow of one VM, as fetched by [`run`].
async fn run_vm(ctx: &JobContext, mut vm: Vm, report: &mut VmReport) -> Result<(), OrchError> {
    // A dead job's copy that made progress under its snapshot is finished under it; any other
    // snapshot of a dead job goes first.
    if let Some(adopted) = adoptable(ctx, &vm).await? {
        return resume_under(ctx, &vm, adopted, report).await;
    }
    if hygiene(ctx, &vm, report).await? {
        vm = one_vm(&ctx.client, &vm.moref).await?;
    }
    // VDDK decrypts (given Cryptographer.Access), as does an NBD server built on it; the
    // datastore holds only ciphertext.
    if vm.key_id.is_some() && ctx.vddk.is_none() && ctx.nbd.is_none() {
        return Err(OrchError::Refused(format!(
            "{} is encrypted: its disks cannot be read over HTTPS; read it through VDDK (--vddk-libdir)",
            vm.name
        )));
    }
    // Another job's snapshot (running elsewhere, or dead but not stale yet): its removal would
    // rewrite the chain under this copy, so the VM waits for it.
    if let Some((s, job)) = vm.all_snapshots().iter().find_map(|s| Some((s, crate::hygiene::job_of(&s.name)?))) {
        return Err(OrchError::Refused(format!(
            "{} has snapshot {:?} of syncproxy job {job}, which may still be running; it is removed once no \
             lease names its job and it is older than the longest job (--max-job)",
            vm.name, s.name
        )));
    }
    let depth = vm.snapshot_depth();
    if depth >= crate::preflight::MAX_SNAPSHOT_DEPTH {
        return Err(OrchError::Refused(format!(
            "{}'s snapshot chain is {depth} deep; the limit is 32 and a backup needs one more level: delete \
             snapshots, then consolidate",
            vm.name
        )));
    }
    if depth > 0 {
        let names: Vec<&str> = vm.all_snapshots().iter().map(|s| s.name.as_str()).collect();
        report.warnings.push(format!(
            "the VM has {depth} older snapshot(s) ({}): its disks are read through their chain",
            names.join(", ")
        ));
    }
    if vm.cbt_enabled != Some(true) {
        if vm.cbt_supported == Some(false) {
            report.warnings.push("CBT is not supported: every backup reads the whole disk".into());
        } else if depth > 0 {
            // Enabled under a snapshot, CBT under-reports silently (reference §2.9).
            report.warnings.push(
                "CBT is off and is not turned on while the VM has snapshots: this backup reads every disk whole".into(),
            );
        } else {
            // Only while the VM has no snapshots: enabled under one, CBT under-reports. Marked
            // first: whatever was written while CBT was off is in no change set, so every disk
            // is copied in full, by this run or, if it dies, by the next.
            if let Some(key) = vm_key(&ctx.client, &vm) {
                let (store, name) = (ctx.leases(), vm.name.clone());
                blocking(move || crate::cbt_reset::mark_turned_on(&*store, &key, &name)).await?;
            }
            ctx.client.set_change_tracking(&vm.moref, true).await?;
            report.warnings.push("CBT was off: turned it on; this backup is full".into());
        }
    }
    let quiesce = vm.tools.as_ref().is_some_and(vsphere::ToolsRunningStatus::running);
    let name = ctx.snapshot_name();
    let description = format!(
        "made by syncproxy proxy {} for job {} at {}; removed when the backup ends",
        ctx.proxy_id,
        ctx.job_id,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    if let Some(h) = &ctx.hooks.pre_freeze
        && let Err(e) = crate::hooks::run_hook(&ctx.client, &vm, h, "pre-freeze").await
    {
        // What the hook froze before it failed is thawed all the same.
        report.warnings.extend(post_thaw(ctx, &vm).await);
        return Err(OrchError::Refused(format!("the pre-freeze hook failed: {e}; no snapshot was taken")));
    }
    // Recorded before the snapshot is asked for: a successor that finds the snapshot and no
    // live lease of this job removes it at once.
    if let Err(e) = record_intent(ctx, &vm, &name).await {
        report.warnings.extend(post_thaw(ctx, &vm).await);
        return Err(e);
    }
    let created = match ctx.client.create_snapshot(&vm.moref, &name, &description, quiesce, None).await {
        Ok(s) => Ok((s, if quiesce { Consistency::Application } else { Consistency::Crash })),
        // Only a quiescing failure (the guest could not freeze) falls back to crash-consistent.
        Err(e) if quiesce && e.is_quiesce_fault() => {
            report.warnings.push(format!("quiescing failed ({e}); this restore point is crash-consistent"));
            ctx.client
                .create_snapshot(&vm.moref, &name, &description, false, None)
                .await
                .map(|s| (s, Consistency::Crash))
        }
        Err(e) => Err(e),
    };
    report.warnings.extend(post_thaw(ctx, &vm).await);
    let (snap, consistency) = match created {
        Ok(x) => x,
        Err(e) => {
            let (e, left) = after_failed_create(ctx, &vm, &name, e, &mut report.warnings).await;
            if left {
                report.snapshot_removed = false;
            }
            return Err(e);
        }
    };
    report.snapshot_removed = false;
    report.consistency = Some(consistency);
    let copied = copy_vm(ctx, &vm, &snap, consistency, &ctx.tag(), report).await.map(|c| report.committed(c));
    // Removed even when the copy failed; a Ctrl-C (the future dropped) is handled by the job,
    // which removes every snapshot named for it before it exits.
    match ctx.client.remove_snapshot(&snap, true).await {
        Ok(()) => {
            report.snapshot_removed = true;
            forget_intents(ctx, &vm, vec![ctx.tag()]).await;
        }
        Err(e) => {
            report.warnings.push(format!("COULD NOT REMOVE SNAPSHOT {name} ({snap}): {e}; the next run removes it"))
        }
    }
    if let Ok(after) = one_vm(&ctx.client, &vm.moref).await
        && after.consolidation_needed == Some(true)
    {
        match ctx.client.consolidate_disks(&vm.moref).await {
            Ok(()) => report.warnings.push("the server asked for disk consolidation: done".into()),
            Err(e) => report.warnings.push(format!("disk consolidation needed and failed: {e}")),
        }
    }
    copied
}

/// A snapshot of ours that a dead job left while copying into this replica target, with the
/// checkpoint it left: the copy can go on under it.
struct Adopted {
    snap: MoRef,
    name: String,
    job: String,
    quiesced: bool,
}

/// The snapshot of a dead job of ours that `vm` still has, when it is the VM's only snapshot and
/// the target holds progress that job made under it (a replica's checkpoint, a repository's
/// session): the interrupted copy resumes under the very state it started from. Any other
/// snapshot leaves the VM to the usual rules.
async fn adoptable(ctx: &JobContext, vm: &Vm) -> Result<Option<Adopted>, OrchError> {
    let [s] = vm.all_snapshots()[..] else { return Ok(None) };
    let Some(job) = crate::hygiene::job_of(&s.name) else { return Ok(None) };
    let leases = ctx.leases();
    let live = blocking(move || durable::live_jobs_in(&*leases)).await?;
    if job == ctx.tag() || live.iter().any(|(n, _)| n == job) {
        return Ok(None);
    }
    let (vcenter, target, v) = (ctx.vcenter(), ctx.target.clone(), vm.clone());
    let (job_name, identity) = (job.to_owned(), s.moref.to_string());
    let made_progress = blocking(move || target.backend().progress_of(&vcenter, &v, &job_name, &identity)).await?;
    Ok(made_progress.then(|| Adopted {
        snap: s.moref.clone(),
        name: s.name.clone(),
        job: job.to_owned(),
        quiesced: s.quiesced,
    }))
}

/// Finishes the copy a dead job left under `adopted`, then removes its snapshot.
async fn resume_under(ctx: &JobContext, vm: &Vm, adopted: Adopted, report: &mut VmReport) -> Result<(), OrchError> {
    report.warnings.push(format!(
        "resuming the copy that job {} left unfinished, under its snapshot {:?}",
        adopted.job, adopted.name
    ));
    report.snapshot_removed = false;
    let consistency = if adopted.quiesced { Consistency::Application } else { Consistency::Crash };
    report.consistency = Some(consistency);
    let copied = copy_vm(ctx, vm, &adopted.snap, consistency, &adopted.job, report).await.map(|c| report.committed(c));
    match ctx.client.remove_snapshot(&adopted.snap, true).await {
        Ok(()) => {
            report.snapshot_removed = true;
            forget_intents(ctx, vm, vec![adopted.job.clone()]).await;
        }
        Err(e) => report.warnings.push(format!(
            "COULD NOT REMOVE SNAPSHOT {} ({}): {e}; the next run removes it",
            adopted.name, adopted.snap
        )),
    }
    copied
}
