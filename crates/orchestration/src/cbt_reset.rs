//! `proxy cbt-reset`: the documented CBT reset (reference 2.8) as one command. A running VM:
//! CBT off, a snapshot created and removed (the stun that stops tracking), CBT on, a second
//! snapshot created and removed (tracking restarts). A powered-off VM: CBT off, each disk's
//! `-ctk.vmdk` deleted through the datastore file manager (left in place, it would carry the
//! old tracking on), CBT on. Refused while the VM has snapshots it did not make. Afterwards each
//! disk must report a new change-ID epoch; and every backup target named gets a reset mark, so
//! its next copy of those disks is full whatever CBT says.

use std::collections::HashSet;
use std::sync::Arc;

use cbt::ChangeId;
use durable::Store;
use serde::{Deserialize, Serialize};
use vsphere::{Client, MoRef, PowerState, Vm};

use crate::OrchError;

/// The prefix of the snapshots a reset makes (and removes).
pub const RESET_SNAPSHOT: &str = "syncproxy-cbt-reset";

/// What a reset did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResetReport {
    /// The VM.
    pub vm: String,
    /// `running` or `powered-off`.
    pub form: &'static str,
    /// Each step, in order, as done.
    pub steps: Vec<String>,
    /// Per disk: its slot, the change ID before and after.
    pub disks: Vec<(String, Option<String>, Option<String>)>,
    /// What deserves attention.
    pub warnings: Vec<String>,
}

/// A target's mark that a VM's CBT was reset: `resets/<key>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResetMark {
    /// The VM's name when it was reset.
    pub vm: String,
    /// The disks' slots.
    pub disks: Vec<String>,
    /// When (RFC 3339).
    pub time: String,
    /// Why the next copy is full: absent for a reset, `cbt-turned-on` when a backup found CBT
    /// off and turned it on (whatever was written while it was off is in no change set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The mark's reason when a backup turned CBT on.
pub const TURNED_ON: &str = "cbt-turned-on";

/// The mark's reason when a restore wrote the VM's disks back in place.
pub const RESTORED_IN_PLACE: &str = "restored-in-place";

fn mark_name(key: &str) -> String {
    format!("resets/{key}.json")
}

/// The slots of `key`'s disks whose next copy must be full (`*`: every disk), from `store`'s
/// mark, and why.
pub fn reset_slots(store: &dyn Store, key: &str) -> Result<(HashSet<String>, cbt::Forced), durable::Error> {
    let Some(raw) = store.get(&mark_name(key))? else { return Ok((HashSet::new(), cbt::Forced::CbtReset)) };
    // A mark that cannot be read still says "reset": every disk is copied in full.
    let mark: ResetMark = serde_json::from_slice(&raw).unwrap_or_else(|_| ResetMark {
        vm: String::new(),
        disks: vec!["*".into()],
        time: String::new(),
        reason: None,
    });
    let why = match mark.reason.as_deref() {
        Some(TURNED_ON) => cbt::Forced::CbtTurnedOn,
        Some(RESTORED_IN_PLACE) => cbt::Forced::RestoredInPlace,
        _ => cbt::Forced::CbtReset,
    };
    Ok((mark.disks.into_iter().collect(), why))
}

/// Marks every disk of `vm` (named `key` in the target) in `store` for a full copy because
/// this run turns CBT on: written before CBT is turned on, so a run that dies in between still
/// leaves the next one a full copy. An existing mark (a reset) is kept: it already says full.
pub fn mark_turned_on(store: &dyn Store, key: &str, vm: &str) -> Result<(), durable::Error> {
    mark_full(store, key, vm, &["*".to_owned()], TURNED_ON)
}

/// Marks disks `slots` of `vm` (named `key` in the target) in `store` for a full copy, for
/// `reason` (one of this module's reasons). An existing mark keeps its reason and gains the
/// slots it lacks (one it cannot read already says every disk).
pub fn mark_full(store: &dyn Store, key: &str, vm: &str, slots: &[String], reason: &str) -> Result<(), durable::Error> {
    if let Some(raw) = store.get(&mark_name(key))? {
        let Ok(mut mark) = serde_json::from_slice::<ResetMark>(&raw) else { return Ok(()) };
        if mark.disks.iter().any(|d| d == "*") || slots.iter().all(|s| mark.disks.contains(s)) {
            return Ok(());
        }
        let missing: Vec<String> = slots.iter().filter(|s| !mark.disks.contains(s)).cloned().collect();
        mark.disks.extend(missing);
        let json = serde_json::to_vec_pretty(&mark)
            .map_err(|e| durable::Error::Invalid(format!("a CBT mark could not be written: {e}")))?;
        return store.put(&mark_name(key), &json);
    }
    let mark = ResetMark {
        vm: vm.to_owned(),
        disks: slots.to_vec(),
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        reason: Some(reason.to_owned()),
    };
    let json = serde_json::to_vec_pretty(&mark)
        .map_err(|e| durable::Error::Invalid(format!("a CBT mark could not be written: {e}")))?;
    store.put(&mark_name(key), &json)
}

/// Removes `key`'s reset mark from `store` (its disks were copied in full).
pub fn clear_reset(store: &dyn Store, key: &str) -> Result<(), durable::Error> {
    store.delete(&mark_name(key))
}

fn epoch(change_id: Option<&str>) -> Option<cbt::Epoch> {
    change_id.map(ChangeId::parse).and_then(|c| c.epoch())
}

async fn fetch(client: &Client, vm: &MoRef) -> Result<Vm, OrchError> {
    client
        .vms_by_moref(std::slice::from_ref(vm))
        .await?
        .pop()
        .ok_or_else(|| OrchError::Refused(format!("{vm} is not a virtual machine on this server")))
}

/// The slot of a disk (`scsi0:1`).
fn slot(d: &vsphere::Disk) -> String {
    d.bus_slot.clone().unwrap_or_else(|| format!("disk{}", d.key))
}

/// `[ds1] vm/vm.vmdk`'s change-tracking file, `[ds1] vm/vm-ctk.vmdk`.
pub fn ctk_path(base: &str) -> String {
    format!("{}-ctk.vmdk", base.strip_suffix(".vmdk").unwrap_or(base))
}

/// Resets CBT on `vm` and marks its disks in each of `marks` (backup targets' stores) so their
/// next copy is full.
pub async fn cbt_reset(client: &Client, vm: &MoRef, marks: &[Arc<dyn Store>]) -> Result<ResetReport, OrchError> {
    let mut v = fetch(client, vm).await?;
    let mut report = ResetReport { vm: v.name.clone(), ..ResetReport::default() };
    // A reset killed half-way leaves its own snapshot: that one goes.
    for s in v.all_snapshots().into_iter().filter(|s| s.name.starts_with(RESET_SNAPSHOT)) {
        client.remove_snapshot(&s.moref, true).await?;
        report.steps.push(format!("removed {:?}, left by an earlier reset", s.name));
    }
    v = fetch(client, vm).await?;
    if v.snapshot_depth() > 0 {
        let names: Vec<&str> = v.all_snapshots().iter().map(|s| s.name.as_str()).collect();
        return Err(OrchError::Refused(format!(
            "{} has snapshots it did not make ({}): CBT must not be reset under them; remove or consolidate them first",
            v.name,
            names.join(", ")
        )));
    }
    if v.cbt_supported == Some(false) {
        return Err(OrchError::Refused(format!("{} cannot track changes (hardware vmx-07 or later needed)", v.name)));
    }
    // Disks no snapshot holds are left alone (`probe check` and the backup name them).
    let disks: Vec<&vsphere::Disk> = v.disks.iter().filter(|d| d.copyable().is_ok()).collect();
    let before: Vec<(String, Option<String>)> = disks.iter().map(|d| (slot(d), d.change_id.clone())).collect();
    match &v.power_state {
        Some(PowerState::PoweredOff) => {
            report.form = "powered-off";
            let datacenter = crate::support::datacenter_for(client, &v).await?.moref;
            client.set_change_tracking(vm, false).await?;
            report.steps.push("CBT turned off".into());
            for d in &disks {
                let ctk = ctk_path(&d.base_file_name);
                match client.delete_datastore_file(&ctk, &datacenter).await {
                    Ok(()) => report.steps.push(format!("deleted {ctk}")),
                    Err(e) if e.fault().is_some_and(|f| f.type_name.contains("NotFound")) => {
                        report.steps.push(format!("{ctk} was not there"));
                    }
                    Err(e) => {
                        report.warnings.push(format!("CBT IS OFF on {}: re-enable it or run the reset again", v.name));
                        return Err(e.into());
                    }
                }
            }
            client.set_change_tracking(vm, true).await?;
            report.steps.push("CBT turned on".into());
        }
        Some(PowerState::PoweredOn) => {
            report.form = "running";
            client.set_change_tracking(vm, false).await?;
            report.steps.push("CBT turned off".into());
            stun(client, vm, "stops tracking", &mut report).await?;
            client.set_change_tracking(vm, true).await?;
            report.steps.push("CBT turned on".into());
            stun(client, vm, "restarts tracking", &mut report).await?;
        }
        other => {
            return Err(OrchError::Refused(format!(
                "{} is {}: reset CBT on a running or powered-off VM",
                v.name,
                other.as_ref().map_or("in an unknown power state", PowerState::as_str)
            )));
        }
    }
    let after = fetch(client, vm).await?;
    for (slot_name, old) in before {
        let new = after.disks.iter().find(|d| slot(d) == slot_name).and_then(|d| d.change_id.clone());
        match (epoch(old.as_deref()), epoch(new.as_deref())) {
            (Some(a), Some(b)) if a == b => {
                return Err(OrchError::Refused(format!(
                    "{} {slot_name}: the change-ID epoch did not change ({}): the reset did not take",
                    v.name,
                    new.unwrap_or_default()
                )));
            }
            (_, None) => report.warnings.push(format!(
                "{slot_name}: no change ID yet (tracking starts at the next power-on); its next backup is full"
            )),
            _ => {}
        }
        report.disks.push((slot_name, old, new));
    }
    let mark = ResetMark {
        vm: v.name.clone(),
        disks: report.disks.iter().map(|(s, _, _)| s.clone()).collect(),
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        reason: None,
    };
    let json = serde_json::to_vec_pretty(&mark).map_err(|e| OrchError::Refused(e.to_string()))?;
    let key = crate::support::vm_key(client, &v);
    for store in marks {
        let key = key
            .clone()
            .ok_or_else(|| OrchError::Refused(format!("{} has no instance UUID to mark its backups by", v.name)))?;
        let what = store.describe();
        let (store, json) = (store.clone(), json.clone());
        crate::support::blocking(move || store.put(&mark_name(&key), &json)).await?;
        report.steps.push(format!("marked the next copy of its disks as full in {what}"));
    }
    Ok(report)
}

/// A snapshot created and removed: the stun that makes a CBT change take effect.
async fn stun(client: &Client, vm: &MoRef, why: &str, report: &mut ResetReport) -> Result<(), OrchError> {
    let name = format!("{RESET_SNAPSHOT}-{}", report.steps.len());
    let snap = client.create_snapshot(vm, &name, "made by syncproxy cbt-reset; removed at once", false, None).await?;
    client.remove_snapshot(&snap, true).await?;
    report.steps.push(format!("a snapshot created and removed: the stun {why}"));
    Ok(())
}
