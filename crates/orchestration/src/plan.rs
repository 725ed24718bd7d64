//! Planning: per disk, the facts `cbt` plans from (what the target holds of it, the disk as it
//! is now, the changes since), and for a backup into a repository the plan of every disk;
//! [`plan_vm`] says what a backup would copy without touching anything.

use std::collections::HashSet;

use cbt::{ChangeId, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition, QueryFault};
use repo::{DiskSpec, Manifest, Repo};
use vsphere::{Disk, MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::support::{blocking, one_vm, vm_key};

fn hardware_version(vm: &Vm) -> u32 {
    vm.hardware_version.as_deref().and_then(|v| v.strip_prefix("vmx-")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// `scsi0:1` as a position.
fn position(slot: &str) -> DiskPosition {
    let (ctl, unit) = slot.split_once(':').unwrap_or((slot, "0"));
    let digits = ctl.find(|c: char| c.is_ascii_digit()).unwrap_or(ctl.len());
    DiskPosition {
        controller: ctl[..digits].to_owned(),
        bus: ctl[digits..].parse().unwrap_or(0),
        unit: unit.parse().unwrap_or(0),
    }
}

/// What `cbt` plans one disk from: the disk, its slot, what the destination holds of it, and
/// the changes since (when they can be asked).
pub(crate) struct DiskFacts {
    pub(crate) disk: Disk,
    /// The disk's file as the snapshot lists it (what VDDK opens under the snapshot).
    pub(crate) frozen_file: String,
    pub(crate) slot: String,
    pub(crate) committed: Option<CommittedDisk>,
    pub(crate) current: CurrentDisk,
    pub(crate) destination: Destination,
    /// `None` when only a snapshot can tell (a planning run on a powered-on VM); then `base`
    /// says since which change ID.
    pub(crate) changes: Option<Changes>,
    pub(crate) base: Option<String>,
}

/// The slot of a disk (`scsi0:1`), its stable name in restore points and replicas.
pub(crate) fn slot_of(d: &Disk) -> String {
    d.bus_slot.clone().unwrap_or_else(|| format!("disk{}", d.key))
}

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

/// One disk's plan for a backup.
pub(crate) struct DiskPlan {
    pub(crate) facts: DiskFacts,
    pub(crate) spec: DiskSpec,
    /// `None` when only a snapshot can tell.
    pub(crate) plan: Option<CopyPlan>,
    pub(crate) words: String,
}

/// The newest restore point of `vm` in the repository.
pub(crate) async fn previous_point(repo: &Repo, vm: &Vm) -> Result<Option<Manifest>, OrchError> {
    let Some(uuid) = vm.instance_uuid.clone() else { return Ok(None) };
    let repo = repo.clone();
    let points = blocking(move || repo.points()).await?;
    Ok(points.into_iter().rev().find(|p| p.source.instance_uuid.as_deref() == Some(uuid.as_str())))
}

/// Plans every disk of a backup of `vm` into `repo` (see [`disk_facts`]).
pub(crate) async fn plan_backup(
    ctx: &JobContext,
    repo: &Repo,
    vm: &Vm,
    snap: Option<&MoRef>,
    previous: Option<&Manifest>,
    warnings: &mut Vec<String>,
) -> Result<Vec<DiskPlan>, OrchError> {
    let chunk = std::num::NonZeroU64::new(u64::from(repo.config().chunk_size))
        .ok_or_else(|| OrchError::Refused("the repository has no chunk size".into()))?;
    let facts = disk_facts(
        ctx,
        vm,
        snap,
        |_, slot| {
            let committed =
                previous.and_then(|p| p.disks.iter().find(|e| e.name == slot)).and_then(|e| e.committed.clone());
            let holds_data = committed.is_some();
            Ok((committed, Destination { granularity: chunk, holds_data }))
        },
        warnings,
    )
    .await?;
    let mut out = Vec::new();
    for f in facts {
        let spec_of = |commit: Option<CommittedDisk>| DiskSpec {
            name: f.slot.clone(),
            capacity: f.disk.capacity,
            change_id: f.current.change_id.as_ref().map(|c| c.as_str().to_owned()),
            committed: commit,
        };
        let Some(changes) = &f.changes else {
            let words = format!(
                "incremental since {} (its size is known only under the backup's snapshot: the VM is powered on)",
                f.base.as_deref().unwrap_or("?")
            );
            let spec = spec_of(None);
            out.push(DiskPlan { facts: f, spec, plan: None, words });
            continue;
        };
        let planned = cbt::plan(f.committed.as_ref(), &f.current, changes, f.destination);
        warnings.extend(planned.warnings.iter().map(|w| format!("{}: {w}", f.slot)));
        let words = match &planned.plan {
            CopyPlan::Full { reason, .. } => format!("full ({reason})"),
            CopyPlan::Incremental { .. } => "incremental".to_owned(),
        };
        let spec = spec_of(Some(planned.commit.clone()));
        out.push(DiskPlan { facts: f, spec, plan: Some(planned.plan), words });
    }
    Ok(out)
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
    let repo = ctx.repo()?;
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
    let previous = previous_point(repo, &vm).await?;
    out.parent = previous.as_ref().map(|p| p.id.clone());
    for p in plan_backup(ctx, repo, &vm, None, previous.as_ref(), &mut out.warnings).await? {
        out.disks.push(DiskPlanReport {
            name: p.facts.slot,
            capacity: p.facts.disk.capacity,
            plan: p.words,
            read: p.plan.as_ref().map(|c| c.read().total_bytes()),
        });
    }
    Ok(out)
}
