//! This job's snapshot around the copy: taken between the freeze hooks with its intent recorded
//! first, a failed creation looked into (the server may have made it all the same), removed
//! with its intent forgotten, and the disks consolidated when the server asks.

use std::time::Duration;

use repo::Consistency;
use vsphere::{MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::support::{blocking, one_vm};

/// Records in the job's target, durably, that this job is about to snapshot `vm` as `name`.
pub(crate) async fn record_intent(ctx: &JobContext, vm: &Vm, name: &str) -> Result<(), OrchError> {
    let intent = crate::intent::Intent {
        job: ctx.tag(),
        vm: vm.moref.value.clone(),
        vm_name: vm.name.clone(),
        snapshot: name.to_owned(),
        host: durable::host_name(),
        pid: std::process::id(),
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let store = ctx.leases();
    blocking(move || crate::intent::record(&*store, &intent)).await
}

/// Forgets the intents of `jobs` on `vm` (their snapshots are gone); a failure only leaves a
/// record that the next run forgets.
pub(crate) async fn forget_intents(ctx: &JobContext, vm: &Vm, jobs: Vec<String>) {
    if jobs.is_empty() {
        return;
    }
    let (store, moref) = (ctx.leases(), vm.moref.value.clone());
    let r = blocking(move || jobs.iter().try_for_each(|j| crate::intent::forget(&*store, &moref, j))).await;
    if let Err(e) = r {
        tracing::warn!("{}: an intent record stays (the next run forgets it): {e}", vm.name);
    }
}

/// Removes every snapshot of `vm` named `name`; returns how many there were.
pub(crate) async fn remove_named(ctx: &JobContext, vm: &MoRef, name: &str) -> Result<usize, OrchError> {
    let found = one_vm(&ctx.client, vm).await?;
    let mine: Vec<MoRef> = found.all_snapshots().iter().filter(|s| s.name == name).map(|s| s.moref.clone()).collect();
    for s in &mine {
        ctx.client.remove_snapshot(s, true).await?;
    }
    Ok(mine.len())
}

/// Takes this job's snapshot of `vm`, between the freeze hooks, quiesced when VMware Tools run
/// (crash-consistent when the guest cannot freeze), its intent recorded first. On failure,
/// returns the error and whether a snapshot may be left (see [`after_failed_create`]).
pub(crate) async fn take(
    ctx: &JobContext,
    vm: &Vm,
    warnings: &mut Vec<String>,
) -> Result<(MoRef, Consistency), (OrchError, bool)> {
    let quiesce = vm.tools.as_ref().is_some_and(vsphere::ToolsRunningStatus::running);
    let name = ctx.snapshot_name();
    let description = format!(
        "made by syncproxy proxy {} for job {} at {}; removed when the backup ends",
        ctx.proxy_id,
        ctx.job_id,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    if let Some(h) = &ctx.hooks.pre_freeze
        && let Err(e) = crate::hooks::run_hook(&ctx.client, vm, h, "pre-freeze").await
    {
        // What the hook froze before it failed is thawed all the same.
        warnings.extend(post_thaw(ctx, vm).await);
        return Err((OrchError::Refused(format!("the pre-freeze hook failed: {e}; no snapshot was taken")), false));
    }
    // Recorded before the snapshot is asked for: a successor that finds the snapshot and no
    // live lease of this job removes it at once.
    if let Err(e) = record_intent(ctx, vm, &name).await {
        warnings.extend(post_thaw(ctx, vm).await);
        return Err((e, false));
    }
    let created = match ctx.client.create_snapshot(&vm.moref, &name, &description, quiesce, None).await {
        Ok(s) => Ok((s, if quiesce { Consistency::Application } else { Consistency::Crash })),
        // Only a quiescing failure (the guest could not freeze) falls back to crash-consistent.
        Err(e) if quiesce && e.is_quiesce_fault() => {
            warnings.push(format!("quiescing failed ({e}); this restore point is crash-consistent"));
            ctx.client
                .create_snapshot(&vm.moref, &name, &description, false, None)
                .await
                .map(|s| (s, Consistency::Crash))
        }
        Err(e) => Err(e),
    };
    warnings.extend(post_thaw(ctx, vm).await);
    match created {
        Ok(x) => Ok(x),
        Err(e) => Err(after_failed_create(ctx, vm, &name, e, warnings).await),
    }
}

/// Removes the snapshot `snap` (named `name`) that `job` made for its copy, and forgets the
/// job's intent on `vm`; returns whether it is gone (if not, a loud warning says so, and the
/// next run removes it).
pub(crate) async fn release(
    ctx: &JobContext,
    vm: &Vm,
    snap: &MoRef,
    name: &str,
    job: &str,
    warnings: &mut Vec<String>,
) -> bool {
    match ctx.client.remove_snapshot(snap, true).await {
        Ok(()) => {
            forget_intents(ctx, vm, vec![job.to_owned()]).await;
            true
        }
        Err(e) => {
            warnings.push(format!("COULD NOT REMOVE SNAPSHOT {name} ({snap}): {e}; the next run removes it"));
            false
        }
    }
}

/// Consolidates `vm`'s disks when the server asks for it (after a snapshot's removal).
pub(crate) async fn consolidate(ctx: &JobContext, vm: &Vm, warnings: &mut Vec<String>) {
    if let Ok(after) = one_vm(&ctx.client, &vm.moref).await
        && after.consolidation_needed == Some(true)
    {
        match ctx.client.consolidate_disks(&vm.moref).await {
            Ok(()) => warnings.push("the server asked for disk consolidation: done".into()),
            Err(e) => warnings.push(format!("disk consolidation needed and failed: {e}")),
        }
    }
}

/// After `CreateSnapshot` failed: the server may have made the snapshot all the same (a call
/// that timed out while the server worked on), so this job's snapshot is looked up by name and
/// removed, and `warnings` say what really happened. Returns the error to report, and whether
/// the snapshot may be left (made and not removed, or not known).
pub(crate) async fn after_failed_create(
    ctx: &JobContext,
    vm: &Vm,
    name: &str,
    e: vsphere::Error,
    warnings: &mut Vec<String>,
) -> (OrchError, bool) {
    // A fault is the server's own "no": the task failed and made nothing. Anything else (a
    // timeout, a lost connection) leaves the outcome unknown.
    let answered = e.fault().is_some();
    if !answered {
        wait_for_creations(ctx, vm, warnings).await;
    }
    let mut left = false;
    match remove_named(ctx, &vm.moref, name).await {
        Ok(0) if answered => forget_intents(ctx, vm, vec![ctx.tag()]).await,
        Ok(0) => {
            left = true;
            warnings.push(format!(
                "the snapshot {name:?} was asked for and the server did not answer ({e}): it may still make it;                  this job removes it when it ends, or else the next run does"
            ));
        }
        Ok(n) => {
            warnings.push(format!("the snapshot {name:?} was made although its creation failed ({e}): removed ({n})"));
            forget_intents(ctx, vm, vec![ctx.tag()]).await;
        }
        Err(r) => {
            left = true;
            warnings.push(format!(
                "COULD NOT CHECK OR REMOVE SNAPSHOT {name:?} after its creation failed ({e}): {r}; the next run \
                 removes it"
            ));
        }
    }
    (e.into(), left)
}

/// The longest a job waits for a snapshot creation the server still runs after the call that
/// asked for it went unanswered.
pub(crate) const CREATION_WAIT: Duration = Duration::from_secs(15 * 60);

/// Waits (at most [`CREATION_WAIT`]) for the snapshot creations the server still runs on `vm`,
/// as its `recentTask` lists them, so that what they make can be removed now.
pub(crate) async fn wait_for_creations(ctx: &JobContext, vm: &Vm, warnings: &mut Vec<String>) {
    let tasks = match ctx.client.recent_tasks(&vm.moref).await {
        Ok(t) => t,
        Err(e) => {
            warnings.push(format!("the VM's recent tasks could not be read ({e})"));
            return;
        }
    };
    for t in tasks.iter().filter(|t| t.running() && t.description_id == "VirtualMachine.createSnapshot") {
        tracing::info!("{}: waiting for the snapshot creation {} the server still runs", vm.name, t.moref);
        match tokio::time::timeout(CREATION_WAIT, ctx.client.wait_task(&t.moref, "CreateSnapshot_Task", None)).await {
            Ok(_) => {}
            Err(_) => warnings.push(format!(
                "the snapshot creation {} still ran after {}",
                t.moref,
                humantime::format_duration(CREATION_WAIT)
            )),
        }
    }
}

/// Runs the job's post-thaw hook, if any; a failure is returned as a loud warning, and the
/// backup goes on (the snapshot is taken: the data is consistent, the guest is what needs
/// attention).
pub(crate) async fn post_thaw(ctx: &JobContext, vm: &Vm) -> Option<String> {
    let h = ctx.hooks.post_thaw.as_ref()?;
    let e = crate::hooks::run_hook(&ctx.client, vm, h, "post-thaw").await.err()?;
    tracing::error!("{}: the post-thaw hook failed: {e}", vm.name);
    Some(format!("POST-THAW HOOK FAILED: {e}; check the guest's applications"))
}
