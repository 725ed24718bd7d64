//! DRS pinning: while a VM is read, its DRS automation is overridden to manual (a per-VM
//! override in its cluster), so DRS does not vMotion it mid-read; the previous setting is put
//! back afterwards on every path. Before the override is set, a record of what to put back is
//! written to the target (`pins/<key>.json`); the record goes once the setting is back. A proxy
//! killed in between leaves the record, and the next run on that target puts the setting back
//! (as does the sweep after a cancelled job).

use serde::{Deserialize, Serialize};
use vsphere::facts::{Cluster, DrsChange, DrsOverride};
use vsphere::{DrsBehavior, MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::support::{blocking, vm_key};

/// What a pin changed, to put back.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PinRecord {
    /// The job that pinned.
    job: String,
    /// The cluster's moref value.
    cluster: String,
    /// The VM's moref value.
    vm: String,
    /// The VM's override before (none: it had none).
    previous: Option<(Option<bool>, Option<DrsBehavior>)>,
    /// When (RFC 3339).
    time: String,
}

/// A VM pinned by this job.
#[derive(Debug)]
pub(crate) struct Pinned {
    key: String,
    record: PinRecord,
}

fn record_name(key: &str) -> String {
    format!("pins/{key}.json")
}

async fn load(ctx: &JobContext, key: &str) -> Result<Option<PinRecord>, OrchError> {
    let (store, name) = (ctx.leases(), record_name(key));
    let raw = blocking(move || store.get(&name)).await?;
    Ok(raw.and_then(|r| serde_json::from_slice(&r).ok()))
}

async fn save(ctx: &JobContext, key: &str, r: &PinRecord) -> Result<(), OrchError> {
    let json = serde_json::to_vec_pretty(r).map_err(|e| OrchError::Refused(e.to_string()))?;
    let (store, name) = (ctx.leases(), record_name(key));
    blocking(move || store.put(&name, &json)).await
}

async fn forget(ctx: &JobContext, key: &str) -> Result<(), OrchError> {
    let (store, name) = (ctx.leases(), record_name(key));
    blocking(move || store.delete(&name)).await
}

/// Puts back the override `r` replaced.
async fn put_back(ctx: &JobContext, r: &PinRecord) -> Result<(), OrchError> {
    let (cluster, vm) = (MoRef::new("ClusterComputeResource", &r.cluster), MoRef::new("VirtualMachine", &r.vm));
    let Some(now) = ctx.client.cluster(&cluster).await? else { return Ok(()) };
    let has = now.vm_overrides.iter().any(|o| o.vm == vm);
    let change = match (&r.previous, has) {
        (None, true) => DrsChange::Remove(vm),
        (None, false) => return Ok(()),
        (Some((enabled, behavior)), has) => {
            let o = DrsOverride { vm, enabled: *enabled, behavior: behavior.clone() };
            if has { DrsChange::Edit(o) } else { DrsChange::Add(o) }
        }
    };
    Ok(ctx.client.set_drs_override(&cluster, &change).await?)
}

/// Puts back the DRS setting a dead job's pin left on `vm` (its record names a job that holds
/// no lease); says so when it did.
pub(crate) async fn restore_left(ctx: &JobContext, vm: &Vm) -> Result<Option<String>, OrchError> {
    let Some(key) = vm_key(&ctx.client, vm) else { return Ok(None) };
    let Some(r) = load(ctx, &key).await? else { return Ok(None) };
    let leases = ctx.leases();
    let live = blocking(move || durable::live_jobs_in(&*leases)).await?;
    if r.job != ctx.tag() && live.iter().any(|(n, _)| *n == r.job) {
        return Ok(None);
    }
    put_back(ctx, &r).await?;
    forget(ctx, &key).await?;
    Ok(Some(format!("put back the DRS setting job {} left overridden", r.job)))
}

/// Overrides `vm`'s DRS automation to manual while it is read, when DRS could move it and the
/// job pins (`JobContext::pin_drs`). Without the privilege to, the copy goes on, with a warning
/// in `warnings` (as is a pin that was set).
pub(crate) async fn pin(ctx: &JobContext, vm: &Vm, warnings: &mut Vec<String>) -> Result<Option<Pinned>, OrchError> {
    if !ctx.pin_drs {
        return Ok(None);
    }
    let (Some(host), Some(key)) = (vm.host.as_ref(), vm_key(&ctx.client, vm)) else { return Ok(None) };
    let Some(cluster): Option<Cluster> = ctx.client.cluster_of(host).await? else { return Ok(None) };
    if !cluster.may_move(&vm.moref) {
        return Ok(None);
    }
    let own = cluster.vm_overrides.iter().find(|o| o.vm == vm.moref);
    let record = PinRecord {
        job: ctx.tag(),
        cluster: cluster.moref.value.clone(),
        vm: vm.moref.value.clone(),
        previous: own.map(|o| (o.enabled, o.behavior.clone())),
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    // The record first: a crash after the change leaves what is needed to undo it.
    save(ctx, &key, &record).await?;
    let manual = DrsOverride { vm: vm.moref.clone(), enabled: Some(true), behavior: Some(DrsBehavior::Manual) };
    let change = if own.is_some() { DrsChange::Edit(manual) } else { DrsChange::Add(manual) };
    match ctx.client.set_drs_override(&cluster.moref, &change).await {
        Ok(()) => {
            warnings.push(format!("DRS set to manual for this VM in cluster {} while it is read", cluster.name));
            Ok(Some(Pinned { key, record }))
        }
        Err(e) => {
            forget(ctx, &key).await?;
            warnings.push(format!(
                "DRS may move this VM during the copy: its override could not be set ({e}); grant \
                 Host.Inventory.EditCluster on cluster {}",
                cluster.name
            ));
            Ok(None)
        }
    }
}

/// Puts back what [`pin`] changed; says so loudly when it could not.
pub(crate) async fn unpin(ctx: &JobContext, pinned: Pinned) -> Option<String> {
    let done = async {
        put_back(ctx, &pinned.record).await?;
        forget(ctx, &pinned.key).await
    };
    let e = done.await.err()?;
    Some(format!("COULD NOT PUT BACK THE VM'S DRS SETTING: {e}; the next run does"))
}

/// Puts back every DRS setting this job changed on `vms` (after a cancel, when the per-VM flows
/// were dropped mid-way).
pub(crate) async fn restore_job_pins(ctx: &JobContext, vms: &[Vm]) -> Vec<String> {
    let mut out = Vec::new();
    for vm in vms {
        let Some(key) = vm_key(&ctx.client, vm) else { continue };
        match load(ctx, &key).await {
            Ok(Some(r)) if r.job == ctx.tag() => match async {
                put_back(ctx, &r).await?;
                forget(ctx, &key).await
            }
            .await
            {
                Ok(()) => out.push(format!("put back the DRS setting of {}", vm.name)),
                Err(e) => out.push(format!("could not put back the DRS setting of {}: {e}", vm.name)),
            },
            Ok(_) => {}
            Err(e) => out.push(format!("{}: {e}", vm.name)),
        }
    }
    out
}
