//! The per-VM flow of reference section 2.13, into a repository or onto replica disks, as an
//! order of steps: stale snapshots of ours removed first (or a dead job's copy adopted and
//! finished), preflight, CBT on when allowed, a snapshot named for this proxy and job (quiesced
//! when VMware Tools run), the copy (`copy`), and the snapshot removed on every path, with
//! consolidation when the server asks for it. What each step does lives in its own module:
//! `hygiene`, `drs`, `gate`, `snapshot`, `copy` (over the job's `target`, with `plan`, `read`
//! and `vmx`); what the job shares is in `context`.

use std::time::Instant;

use repo::Consistency;
use vsphere::{MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::copy::copy_vm;
use crate::hygiene::hygiene;
use crate::report::VmReport;
use crate::snapshot::{consolidate, release, take};
use crate::support::{blocking, one_vm};

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
    crate::gate::admit(ctx, &vm, &mut report.warnings)?;
    crate::gate::cbt_on(ctx, &vm, &mut report.warnings).await?;
    let (snap, consistency) = match take(ctx, &vm, &mut report.warnings).await {
        Ok(x) => x,
        Err((e, left)) => {
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
    report.snapshot_removed = release(ctx, &vm, &snap, &ctx.snapshot_name(), &ctx.tag(), &mut report.warnings).await;
    consolidate(ctx, &vm, &mut report.warnings).await;
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
    report.snapshot_removed = release(ctx, vm, &adopted.snap, &adopted.name, &adopted.job, &mut report.warnings).await;
    copied
}
