//! One disk as the planner sees it: its slot (its stable name in restore points and replicas),
//! the facts `cbt` plans from, and the plan of a copy into a restore point. Below both the
//! targets and the flow, so each can name a disk without importing the other.

use cbt::{Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition};
use repo::DiskSpec;
use vsphere::{Disk, Vm};

/// The VM's hardware version (`vmx-19`: 19), 0 when unknown.
pub(crate) fn hardware_version(vm: &Vm) -> u32 {
    vm.hardware_version.as_deref().and_then(|v| v.strip_prefix("vmx-")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// `scsi0:1` as a position.
pub(crate) fn position(slot: &str) -> DiskPosition {
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

/// One disk's plan for a backup.
pub(crate) struct DiskPlan {
    pub(crate) spec: DiskSpec,
    /// `None` when only a snapshot can tell.
    pub(crate) plan: Option<CopyPlan>,
    pub(crate) words: String,
}

/// Plans one disk of a backup into a restore point from its facts; the planner's warnings go
/// to `warnings`, named by the disk's slot.
pub(crate) fn plan_disk(f: &DiskFacts, warnings: &mut Vec<String>) -> DiskPlan {
    let spec_of = |commit: Option<CommittedDisk>| DiskSpec {
        name: f.slot.clone(),
        capacity: f.disk.capacity,
        change_id: f.current.change_id.as_ref().map(|c| c.as_str().to_owned()),
        committed: commit,
        label: Some(f.disk.label.clone()).filter(|l| !l.is_empty()),
    };
    let Some(changes) = &f.changes else {
        let words = format!(
            "incremental since {} (its size is known only under the backup's snapshot: the VM is powered on)",
            f.base.as_deref().unwrap_or("?")
        );
        return DiskPlan { spec: spec_of(None), plan: None, words };
    };
    let planned = cbt::plan(f.committed.as_ref(), &f.current, changes, f.destination);
    warnings.extend(planned.warnings.iter().map(|w| format!("{}: {w}", f.slot)));
    let words = match &planned.plan {
        CopyPlan::Full { reason, .. } => format!("full ({reason})"),
        CopyPlan::Incremental { .. } => "incremental".to_owned(),
    };
    DiskPlan { spec: spec_of(Some(planned.commit.clone())), plan: Some(planned.plan), words }
}
