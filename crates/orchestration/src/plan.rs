//! Planning: per disk, the facts `cbt` plans from (what the target holds of it, the disk as it
//! is now, the changes since, the marks that force a full copy, the host's version); and
//! [`plan_vm`], which says what a backup would copy without touching anything.

use std::collections::HashSet;

use cbt::{ChangeId, Changes, CommittedDisk, CurrentDisk, Destination, QueryFault};
use vsphere::{Disk, MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::disk::{DiskFacts, hardware_version, plan_disk, position, slot_of};
use crate::support::{blocking, one_vm, vm_key};

/// Gathers the planning facts of every disk of `vm` that a snapshot holds: under `snap` for a
/// copy, or against the live disks for a plan (where CBT answers only for a powered-off VM).
/// `destination(disk, slot)` says what the destination holds of each disk.
pub(crate) async fn disk_facts(
    ctx: &JobContext,
    vm: &Vm,
    snap: Option<&MoRef>,
    mut destination: impl FnMut(&Disk, &str) -> Result<(Option<CommittedDisk>, Destination), OrchError>,
    warnings: &mut Vec<String>,
) -> Result<Vec<DiskFacts>, OrchError> {
    let frozen = match snap {
        Some(s) => ctx.client.snapshot_disks(s).await?,
        None => vm.disks.clone(),
    };
    let can_query = snap.is_some() || vm.power_state == Some(vsphere::PowerState::PoweredOff);
    let (resets, forced_by) = reset_slots(ctx, vm).await?;
    let host_version = host_version(ctx, vm, warnings).await;
    let mut out = Vec::new();
    for d in &vm.disks {
        if let Err(why) = d.copyable() {
            warnings.push(format!("{} ({}) is {why}", d.label, d.file_name));
            continue;
        }
        let slot = slot_of(d);
        if !ctx.disks.wants(&slot, &d.label) {
            warnings.push(format!("{slot} ({}) is left out by the job's disk selection", d.label));
            continue;
        }
        let now = frozen.iter().find(|f| f.key == d.key);
        let (committed, dest) = destination(d, &slot)?;
        // The committed state stays: the planner needs it to see that the reset's new epoch is
        // clean (dropping it would make a first sighting, tainted on an unknown host).
        let forced = (resets.contains(&slot) || resets.contains("*")).then_some(forced_by);
        if let Some(f) = forced {
            warnings.push(format!("{slot}: {}: this copy is full", cbt::FullReason::Forced(f)));
        }
        let mut current = CurrentDisk {
            change_id: now.and_then(|f| f.change_id.as_deref()).map(ChangeId::parse),
            capacity: d.capacity,
            hardware_version: hardware_version(vm),
            host_version,
            position: position(&slot),
            backing: d.base_file_name.clone(),
            allocated: None,
            reverted: false,
            // Under the snapshot this copy made (or a dead job's that it adopts): every
            // snapshot advances the change ID, so an equal one cannot be trusted.
            fresh_snapshot: snap.is_some(),
            forced,
        };
        let (changes, base) = match cbt::incremental_base(committed.as_ref(), &current, dest) {
            Ok(base) if !can_query => (None, Some(base.as_str().to_owned())),
            Ok(base) => {
                let asked =
                    ctx.client.query_changed_disk_areas(&vm.moref, snap, d.key, d.capacity, base.as_str()).await;
                let changes = match asked {
                    Ok(a) => Changes::Areas(a),
                    Err(e) => match e.fault() {
                        Some(f) => Changes::Fault(QueryFault { fault: f.type_name.clone(), message: e.to_string() }),
                        None => return Err(e.into()),
                    },
                };
                (Some(changes), Some(base.as_str().to_owned()))
            }
            Err(_) => {
                // A full copy reads only what is allocated, when CBT can say.
                if can_query {
                    match ctx.client.query_changed_disk_areas(&vm.moref, snap, d.key, d.capacity, "*").await {
                        Ok(a) => current.allocated = Some(a.areas),
                        Err(e) => warnings.push(format!("{slot}: allocated areas unknown ({e}); reading all of it")),
                    }
                }
                (Some(Changes::NotQueried), None)
            }
        };
        let frozen_file = now.map_or_else(|| d.base_file_name.clone(), |f| f.file_name.clone());
        out.push(DiskFacts {
            disk: d.clone(),
            frozen_file,
            slot,
            committed,
            current,
            destination: dest,
            changes,
            base,
        });
    }
    Ok(out)
}

/// The disks of `vm` whose next copy into this job's target must be full, and why: `proxy
/// cbt-reset` marked them, or a backup that turned CBT on did.
async fn reset_slots(ctx: &JobContext, vm: &Vm) -> Result<(HashSet<String>, cbt::Forced), OrchError> {
    let Some(key) = vm_key(&ctx.client, vm) else { return Ok((HashSet::new(), cbt::Forced::CbtReset)) };
    let store = ctx.leases();
    blocking(move || crate::cbt_reset::reset_slots(&*store, &key)).await
}

/// The version of the ESXi host that runs `vm` (`runtime.host`, `config.product.version`), for
/// the planner's KB 2090639 rule; when it cannot be known, a warning says why, since on an
/// unknown host a disk of 128 GiB or more is treated as affected.
async fn host_version(ctx: &JobContext, vm: &Vm, warnings: &mut Vec<String>) -> Option<cbt::HostVersion> {
    let why = match &vm.host {
        None => "the server names no host for the VM".to_owned(),
        Some(h) => match ctx.client.host_version(h).await {
            Ok(Some(text)) => match cbt::HostVersion::parse(&text) {
                Some(v) => return Some(v),
                None => format!("its host {h} reports the version {text:?}, which does not parse"),
            },
            Ok(None) => format!("its host {h} reports no version"),
            Err(e) => format!("its host {h} could not be asked: {e}"),
        },
    };
    if vm.disks.iter().any(|d| d.capacity >= cbt::BOUNDARY_BUG_BASE) {
        warnings.push(format!(
            "the ESXi version of {}'s host is unknown ({why}): disks of 128 GiB or more are treated as on a host \
             with the CBT boundary bug (KB 2090639) and copied in full",
            vm.name
        ));
    }
    None
}

/// What a backup of one disk would copy, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlanReport {
    /// Its slot (`scsi0:0`).
    pub name: String,
    /// Its size.
    pub capacity: u64,
    /// `full (why)` or `incremental ...`.
    pub plan: String,
    /// Bytes to read, when known without a snapshot.
    pub read: Option<u64>,
}

/// What a backup of one VM would do, without touching it.
#[derive(Debug, Clone, Default)]
pub struct VmPlan {
    /// Its name.
    pub vm: String,
    /// The restore point an incremental would start from.
    pub parent: Option<String>,
    /// Per disk.
    pub disks: Vec<DiskPlanReport>,
    /// What the backup would warn about or refuse.
    pub warnings: Vec<String>,
}

/// Plans a backup of `vm` without creating a snapshot or changing anything: per disk, a full
/// copy and its reason, or an incremental and (for a powered-off VM) its size.
pub async fn plan_vm(ctx: &JobContext, vm: &MoRef) -> Result<VmPlan, OrchError> {
    if ctx.target.repository().is_none() {
        return Err(OrchError::Refused("this job writes replicas, not restore points".into()));
    }
    let vm = one_vm(&ctx.client, vm).await?;
    let mut out = VmPlan { vm: vm.name.clone(), ..VmPlan::default() };
    if vm.key_id.is_some() && ctx.vddk.is_none() && ctx.nbd.is_none() {
        out.warnings.push("encrypted: refused (its disks cannot be read over HTTPS; read it through VDDK)".into());
    }
    if vm.snapshot_depth() > 0 {
        out.warnings.push(format!(
            "has {} snapshot(s): stale ones of ours would be removed, a live job's refuses the backup, and \
             the disks of any other are read through their chain",
            vm.all_snapshots().len()
        ));
    }
    if vm.cbt_enabled != Some(true) && vm.cbt_supported != Some(false) {
        out.warnings.push("CBT is off: the backup turns it on, and copies every disk in full".into());
    }
    let held = ctx.open_vm(&vm).await?;
    out.parent = held.parent().map(str::to_owned);
    for f in disk_facts(ctx, &vm, None, |_, slot| held.committed(slot), &mut out.warnings).await? {
        let p = plan_disk(&f, &mut out.warnings);
        out.disks.push(DiskPlanReport {
            name: f.slot,
            capacity: f.disk.capacity,
            plan: p.words,
            read: p.plan.as_ref().map(|c| c.read().total_bytes()),
        });
    }
    Ok(out)
}
