//! Whether a VM can be copied now, before its snapshot is taken: the refusals (an encrypted VM
//! read over HTTPS, another job's snapshot, a chain too deep for one more level) with what is
//! odd but allowed, and CBT turned on where that is safe.

use vsphere::Vm;

use crate::OrchError;
use crate::context::JobContext;
use crate::support::{blocking, vm_key};

/// Refuses `vm` when it cannot be copied now; what is odd but allowed goes to `warnings`.
pub(crate) fn admit(ctx: &JobContext, vm: &Vm, warnings: &mut Vec<String>) -> Result<(), OrchError> {
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
        warnings.push(format!(
            "the VM has {depth} older snapshot(s) ({}): its disks are read through their chain",
            names.join(", ")
        ));
    }
    Ok(())
}

/// Turns CBT on for `vm` when it is off and that is safe (no snapshots), marking its next copy
/// full first; otherwise says why the copy reads every disk whole.
pub(crate) async fn cbt_on(ctx: &JobContext, vm: &Vm, warnings: &mut Vec<String>) -> Result<(), OrchError> {
    if vm.cbt_enabled != Some(true) {
        if vm.cbt_supported == Some(false) {
            warnings.push("CBT is not supported: every backup reads the whole disk".into());
        } else if vm.snapshot_depth() > 0 {
            // Enabled under a snapshot, CBT under-reports silently (reference §2.9).
            warnings.push(
                "CBT is off and is not turned on while the VM has snapshots: this backup reads every disk whole".into(),
            );
        } else {
            // Only while the VM has no snapshots: enabled under one, CBT under-reports. Marked
            // first: whatever was written while CBT was off is in no change set, so every disk
            // is copied in full, by this run or, if it dies, by the next.
            if let Some(key) = vm_key(&ctx.client, vm) {
                let (store, name) = (ctx.leases(), vm.name.clone());
                blocking(move || crate::cbt_reset::mark_turned_on(&*store, &key, &name)).await?;
            }
            ctx.client.set_change_tracking(&vm.moref, true).await?;
            warnings.push("CBT was off: turned it on; this backup is full".into());
        }
    }
    Ok(())
}
