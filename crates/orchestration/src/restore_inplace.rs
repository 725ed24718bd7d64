//! A restore point written back into an existing VM: in place, through VDDK (Quick Rollback:
//! only the areas CBT says changed since the point, or every byte with the reason said), or
//! without VDDK by uploading whole disks and swapping them in; and one disk of a point added to
//! another VM as a new disk, to copy files off it. Each is recorded like a new VM's restore
//! (`restore_job`'s intent records), so a failed or killed run leaves no file of ours behind
//! once swept, and a write in place that died is named until it is run again.

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cbt::{ChangeId, ExtentSet};
use pipeline::{CopyOptions, Digests, DiskCopy, Engine};
use repo::{Manifest, Repo};
use serde::Serialize;
use vsphere::provision::{DiskSpec, Provisioning};
use vsphere::{Client, MoRef, PowerState, Vm};

use crate::OrchError;
use crate::restore_job::{
    Intent, NewFile, Progress, RestoredDisk, Upload, Verify, Where, Work, check, forget, new_id, save, sweep, undo,
    upload_disk, verify_disk,
};

/// The unit of a write in place: changed areas are widened to it (the point's own bytes are
/// written over the widening, so it changes nothing), and the sink's blocks are of it.
const BLOCK: u64 = 64 << 10;

/// How to restore into an existing VM.
#[derive(Clone)]
pub struct InPlaceOptions {
    /// The VM to write into (`None`: the point's own VM, found by instance UUID, else by name).
    pub vm: Option<String>,
    /// The disks, by slot (`scsi0:1`); empty: every disk of the point.
    pub disks: Vec<String>,
    /// Power the VM off first when it runs (otherwise a running VM is refused).
    pub power_off: bool,
    /// Power it on once restored.
    pub power_on: bool,
    /// VDDK, for writes into the existing disks (Quick Rollback); without it whole disks are
    /// uploaded and swapped in.
    pub vddk: Option<Arc<vddk::Vddk>>,
    /// Write every byte even when CBT could name what changed.
    pub full: bool,
    /// The provisioning of disks uploaded to be swapped in.
    pub provisioning: Provisioning,
    /// How disks to be swapped in are sent.
    pub upload: Upload,
    /// How much to read back.
    pub verify: Verify,
    /// Where intent records live.
    pub state_dir: PathBuf,
}

impl std::fmt::Debug for InPlaceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPlaceOptions")
            .field("vm", &self.vm)
            .field("disks", &self.disks)
            .field("vddk", &self.vddk.is_some())
            .field("full", &self.full)
            .finish_non_exhaustive()
    }
}

/// How to add one disk of a point to a VM.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The VM that gets the disk.
    pub vm: String,
    /// The point's disk, by slot (`scsi0:1`) or position (`0`).
    pub disk: String,
    /// The datastore for the new disk (`None`: the VM's own folder).
    pub datastore: Option<String>,
    /// Its provisioning.
    pub provisioning: Provisioning,
    /// How it is sent.
    pub upload: Upload,
    /// How much to read back.
    pub verify: Verify,
    /// Where intent records live.
    pub state_dir: PathBuf,
}

/// One disk written back.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenDisk {
    /// Its slot.
    pub slot: String,
    /// Its datastore path once restored.
    pub file: String,
    /// Its size.
    pub capacity: u64,
    /// `quick-rollback`, `full-write`, `swapped-in` or `attached`.
    pub method: String,
    /// Why it was written whole, when Quick Rollback was not possible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// Bytes CBT named as changed since the point (Quick Rollback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<u64>,
    /// Bytes of data written (through VDDK) or sent (an upload).
    pub written: u64,
    /// Bytes written as zeros.
    pub zeroed: u64,
}

/// What a restore into an existing VM did.
#[derive(Debug, Clone, Serialize)]
pub struct InPlaceOutcome {
    /// The restore point.
    pub point: String,
    /// The VM, by moref value.
    pub vm: String,
    /// Its name.
    pub name: String,
    /// The data path, in words.
    pub path: String,
    /// The disks.
    pub disks: Vec<WrittenDisk>,
    /// Bytes read back and compared.
    pub verified: u64,
    /// Seconds spent writing or uploading.
    pub write_seconds: f64,
    /// Whether it was powered on at the end.
    pub powered_on: bool,
    /// What deserves attention.
    pub notes: Vec<String>,
}

fn refused(text: impl Into<String>) -> OrchError {
    OrchError::Refused(text.into())
}

/// The point's own VM on this server (by instance UUID, else by name), or the one named.
async fn find_vm(client: &Client, manifest: &Manifest, named: Option<&str>) -> Result<Vm, OrchError> {
    let all = client.vms().await?;
    let found = match named {
        Some(n) => all.into_iter().find(|v| v.name == n),
        None => {
            let uuid = manifest.source.instance_uuid.as_deref().filter(|u| !u.is_empty());
            let by_uuid = uuid.and_then(|u| all.iter().position(|v| v.instance_uuid.as_deref() == Some(u)));
            let at = by_uuid.or_else(|| all.iter().position(|v| v.name == manifest.source.name));
            at.and_then(|i| all.into_iter().nth(i))
        }
    };
    found.ok_or_else(|| match named {
        Some(n) => refused(format!("no VM named {n:?} on this server")),
        None => refused(format!(
            "VM {:?} of restore point {} is not on this server (by instance UUID or name): name the VM to write \
             into with --vm, or restore as a new VM with --name",
            manifest.source.name, manifest.id
        )),
    })
}

/// The point's disk for `slot` (a slot name, a label or a position).
fn point_disk(manifest: &Manifest, slot: &str) -> Result<usize, OrchError> {
    manifest.disk_index(slot).map_err(|e| refused(e.to_string()))
}

/// The datastore folder of a `[ds] dir/file` path.
fn folder_of(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(d, _)| d)
}

/// Restores point `point` of `repo` into an existing VM's disks. Quick Rollback when VDDK is
/// given and CBT can say what changed since the point; else every byte through VDDK; without
/// VDDK, whole disks uploaded and swapped in (the VM's disk files then have new names).
pub async fn restore_in_place(
    client: &Arc<Client>,
    repo: &Repo,
    point: &str,
    options: &InPlaceOptions,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<InPlaceOutcome, OrchError> {
    let manifest = repo.point(point)?;
    let mut notes = sweep(client, &options.state_dir).await?;
    let vm = find_vm(client, &manifest, options.vm.as_deref()).await?;
    if !vm.snapshots.is_empty() {
        return Err(refused(format!(
            "VM {} has snapshots: a restore in place writes its base disks, which the snapshots depend on; remove \
             them first (or restore as a new VM with --name)",
            vm.name
        )));
    }
    let slots: Vec<String> = if options.disks.is_empty() {
        manifest.disks.iter().map(|d| d.name.clone()).collect()
    } else {
        options.disks.clone()
    };
    let mut pairs = Vec::new();
    for slot in &slots {
        let n = point_disk(&manifest, slot)?;
        let name = &manifest.disks[n].name;
        let disk = vm.disks.iter().find(|d| d.bus_slot.as_deref() == Some(name)).ok_or_else(|| {
            refused(format!("VM {} has no disk at {name}, which the point has: restore as a new VM instead", vm.name))
        })?;
        pairs.push((n, disk.clone()));
    }
    let running = vm.power_state != Some(PowerState::PoweredOff);
    if running && !options.power_off {
        return Err(refused(format!(
            "VM {} is not powered off: a restore in place overwrites its disks (give --power-off to power it off first)",
            vm.name
        )));
    }
    let dc = crate::support::datacenter_for(client, &vm).await?;
    let id = new_id();
    let at = Where { datacenter: &dc.moref, datacenter_name: &dc.name };
    let mut intent = Intent::begin(client, &id, at, &vm.name, Work::NewVm);
    let started = Instant::now();
    let ran = match &options.vddk {
        Some(vddk) => {
            rollback(client, vddk, repo, &manifest, &vm, &pairs, options, &mut intent, running, progress, cancel).await
        }
        None => swap(client, repo, &manifest, &vm, &pairs, options, at, &mut intent, running, progress, cancel).await,
    };
    let (path, disks, mut more, checked) = match ran {
        Ok(r) => r,
        Err(e) => {
            let mut undone = Vec::new();
            match undo(client, &intent, &mut undone).await {
                Ok(false) => forget(&options.state_dir, &id),
                Ok(true) => {}
                Err(u) => tracing::warn!("restore {id} could not be undone now ({u}); the next restore sweeps it"),
            }
            for line in undone {
                tracing::info!("{line}");
            }
            return Err(e);
        }
    };
    let write_seconds = started.elapsed().as_secs_f64();
    notes.append(&mut more);
    let verified = match checked {
        Some(v) => v,
        None => {
            let mut verified = 0;
            for (n, d) in &disks {
                check(cancel)?;
                let point = repo.reader(&manifest.id, *n)?;
                let restored = RestoredDisk {
                    slot: d.slot.clone(),
                    file: d.file.clone(),
                    capacity: d.capacity,
                    uploaded: 0,
                    data: 0,
                };
                verified += verify_disk(client, &dc.name, &restored, &point, options.verify, progress).await?;
            }
            verified
        }
    };
    forget(&options.state_dir, &id);
    // Interrupted writes into this VM are mended now.
    forget_rollbacks(&options.state_dir, &vm.moref.value, &mut notes);
    let powered_on = options.power_on && power_on(client, &vm.moref, &mut notes).await;
    Ok(InPlaceOutcome {
        point: manifest.id.clone(),
        vm: vm.moref.value.clone(),
        name: vm.name.clone(),
        path,
        disks: disks.into_iter().map(|(_, d)| d).collect(),
        verified,
        write_seconds,
        powered_on,
        notes,
    })
}

async fn power_on(client: &Client, vm: &MoRef, notes: &mut Vec<String>) -> bool {
    match client.power_on(vm).await {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!("the VM was restored but did not power on: {e}"));
            false
        }
    }
}

/// Drops the records of earlier writes into `vm` that died: this run wrote the same disks whole
/// or by CBT since the point, which mends them.
fn forget_rollbacks(state_dir: &std::path::Path, vm: &str, notes: &mut Vec<String>) {
    let dir = state_dir.join("restores");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let Ok(data) = std::fs::read(e.path()) else { continue };
        let Ok(intent) = serde_json::from_slice::<Intent>(&data) else { continue };
        if let Work::Rollback { vm: v, point } = &intent.work
            && v == vm
            && !crate::restore_job::owner_alive(&intent.owner)
        {
            notes.push(format!(
                "the interrupted in-place restore {} (point {point}) is superseded by this one",
                intent.id
            ));
            forget(state_dir, &intent.id);
        }
    }
}

/// The data path in words, the disks written, notes, and the bytes read back when the path
/// verified its disks itself (a swap verifies before its commit).
type Written = (String, Vec<(usize, WrittenDisk)>, Vec<String>, Option<u64>);

/// Why a disk must be written whole rather than by Quick Rollback, if it must.
fn full_reason(manifest: &Manifest, n: usize, vm: &Vm, disk: &vsphere::Disk, full: bool) -> Option<String> {
    let d = &manifest.disks[n];
    if full {
        return Some("asked for (--full)".into());
    }
    let Some(point_id) = d.change_id.as_deref() else {
        return Some("the restore point has no CBT change ID for it".into());
    };
    if vm.cbt_enabled != Some(true) {
        return Some("CBT is off on the VM".into());
    }
    let Some(now) = disk.change_id.as_deref() else {
        return Some("the disk reports no CBT change ID".into());
    };
    let (then, now) = (ChangeId::parse(point_id).epoch(), ChangeId::parse(now).epoch());
    if then.is_none() || then != now {
        return Some("the disk's CBT epoch differs from the point's (CBT was reset, or the disk replaced)".into());
    }
    if let Some(c) = &d.committed
        && c.backing != disk.base_file_name
    {
        return Some(format!("the disk's file is now {}, not {}", disk.base_file_name, c.backing));
    }
    None
}

/// Writes the point's disks into the VM's through VDDK: each disk's changed areas since the
/// point (Quick Rollback), or all of it.
#[expect(clippy::too_many_arguments, reason = "the steps of one restore share its resolved facts")]
async fn rollback(
    client: &Arc<Client>,
    vddk: &Arc<vddk::Vddk>,
    repo: &Repo,
    manifest: &Manifest,
    vm: &Vm,
    pairs: &[(usize, vsphere::Disk)],
    options: &InPlaceOptions,
    intent: &mut Intent,
    running: bool,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<Written, OrchError> {
    for (n, disk) in pairs {
        let want = manifest.disks[*n].capacity;
        if disk.capacity != want {
            return Err(refused(format!(
                "disk {} of VM {} is {} bytes, and was {want} at the point: a write in place needs the same size \
                 (restore without --vddk-libdir to swap in a disk of the point's size, or as a new VM)",
                manifest.disks[*n].name, vm.name, disk.capacity
            )));
        }
    }
    let mut notes = Vec::new();
    if running {
        progress(Progress { step: format!("powering off VM {}", vm.name), done: 0, total: 0 });
        client.power_off(&vm.moref).await?;
        notes.push(format!("VM {} was powered off for the restore", vm.name));
    }
    // What to write, per disk: CBT asked only now that the VM is off (QueryChangedDiskAreas
    // without a snapshot answers only for a powered-off VM).
    let mut plans = Vec::new();
    for (n, disk) in pairs {
        let d = &manifest.disks[*n];
        let mut reason = full_reason(manifest, *n, vm, disk, options.full);
        let mut changed = None;
        if reason.is_none() {
            let since = d.change_id.as_deref().unwrap_or_default();
            match client.query_changed_disk_areas(&vm.moref, None, disk.key, d.capacity, since).await {
                Ok(c) => changed = Some(c.areas),
                Err(e) => reason = Some(format!("QueryChangedDiskAreas since the point's change ID failed: {e}")),
            }
        }
        plans.push((reason, changed));
    }
    // The next backup into this repository copies these disks whole: whether CBT saw writes
    // made through VDDK depends on the transport. Marked before writing, so a run that dies
    // half-way leaves the mark too.
    if let Some(key) = crate::support::vm_key(client, vm) {
        let store = repo.store().clone();
        let slots: Vec<String> = pairs.iter().map(|(n, _)| manifest.disks[*n].name.clone()).collect();
        let name = vm.name.clone();
        crate::support::blocking(move || {
            crate::cbt_reset::mark_full(&*store, &key, &name, &slots, crate::cbt_reset::RESTORED_IN_PLACE)
        })
        .await?;
        notes.push("the next backup of these disks into this repository reads them whole".into());
    }
    intent.work = Work::Rollback { vm: vm.moref.value.clone(), point: manifest.id.clone() };
    save(&options.state_dir, intent)?;

    let target = {
        let (vddk, client, moref) = (vddk.clone(), client.clone(), vm.moref.clone());
        tokio::task::spawn_blocking(move || vsphere_io::VddkTarget::connect(&vddk, &client, &moref))
            .await
            .map_err(|e| refused(format!("VDDK's connection stopped: {e}")))?
            .map_err(|e| refused(format!("VDDK cannot open VM {}'s disks for writing: {e}", vm.name)))?
    };
    let target = Arc::new(target);
    let mut out = Vec::new();
    let mut transport = String::new();
    for ((n, disk), (reason, changed)) in pairs.iter().zip(plans) {
        check(cancel)?;
        let d = &manifest.disks[*n];
        let cap = d.capacity;
        let g = NonZeroU64::new(BLOCK).unwrap_or(NonZeroU64::MIN);
        let point = repo.reader(&manifest.id, *n)?;
        let data = crate::restore_job::allocation(&point).await?.align_outward(g, cap);
        let write = match &changed {
            Some(areas) => areas.align_outward(g, cap),
            None => ExtentSet::full(cap),
        };
        let read = write.intersection(&data);
        let zero = write.difference(&read);
        let sink = {
            let (target, file) = (target.clone(), disk.base_file_name.clone());
            tokio::task::spawn_blocking(move || target.open(&file, cap, g))
                .await
                .map_err(|e| refused(format!("VDDK's open stopped: {e}")))?
                .map_err(|e| refused(format!("VDDK cannot open {} for writing: {e}", disk.base_file_name)))?
        };
        transport = sink.transport().to_owned();
        let sink = Arc::new(sink);
        let job = DiskCopy {
            read: read.clone(),
            zero: zero.clone(),
            fetch: None,
            keep: cbt::ExtentSet::new(),
            digests: Digests::zeros(BLOCK, cap),
            done: ExtentSet::new(),
            checkpoint: None,
            source: Arc::new(point),
            sink: sink.clone(),
        };
        let opts = CopyOptions { request_size: 2 << 20, in_flight: 4, digests: false, ..CopyOptions::default() };
        let step = format!("disk {}: {}", d.name, if changed.is_some() { "quick rollback" } else { "full write" });
        let report = copy(job, &opts, &step, progress, cancel).await?;
        pipeline::BlockSink::commit(&*sink).await?;
        drop(sink);
        out.push((
            *n,
            WrittenDisk {
                slot: d.name.clone(),
                file: disk.base_file_name.clone(),
                capacity: cap,
                method: if changed.is_some() { "quick-rollback" } else { "full-write" }.into(),
                full_reason: reason,
                changed: changed.map(|c| c.total_bytes()),
                written: report.written,
                zeroed: report.zero,
            },
        ));
    }
    drop(target);
    let path =
        format!("VDDK writes into the VM's disks ({transport}), only what changed since the point where CBT says it");
    Ok((path, out, notes, None))
}

/// Runs one disk's copy, reporting progress and stopping on cancel.
async fn copy(
    job: DiskCopy,
    opts: &CopyOptions,
    step: &str,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<pipeline::CopyReport, OrchError> {
    let total = job.read.total_bytes() + job.zero.total_bytes();
    let counters = Arc::new(pipeline::progress::Progress::default());
    let engine = Engine::new(64 << 20);
    let run = pipeline::copy_disk(job, &engine, opts, counters.clone());
    tokio::pin!(run);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    progress(Progress { step: step.to_owned(), done: 0, total });
    loop {
        tokio::select! {
            r = &mut run => {
                let r = r?;
                progress(Progress { step: step.to_owned(), done: total, total });
                return Ok(r);
            }
            _ = tick.tick() => {
                check(cancel)?;
                progress(Progress { step: step.to_owned(), done: counters.snapshot().done().min(total), total });
            }
        }
    }
}

/// Uploads the point's disks beside the VM's, reads them back, and swaps them in for the VM's
/// disks in one reconfiguration (the commit); the replaced files are deleted after.
#[expect(clippy::too_many_arguments, reason = "the steps of one restore share its resolved facts")]
async fn swap(
    client: &Client,
    repo: &Repo,
    manifest: &Manifest,
    vm: &Vm,
    pairs: &[(usize, vsphere::Disk)],
    options: &InPlaceOptions,
    at: Where<'_>,
    intent: &mut Intent,
    running: bool,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<Written, OrchError> {
    let id = intent.id.clone();
    let mut files = Vec::new();
    for (n, disk) in pairs {
        let dir = folder_of(&disk.base_file_name);
        let upload = format!("{dir}/{}-upload-{id}-{n}.vmdk", vm.name);
        let file = format!("{dir}/{}-restored-{id}_{n}.vmdk", vm.name);
        intent.folders.push(upload);
        files.push(NewFile { file, replaces: Some(disk.base_file_name.clone()) });
    }
    intent.work = Work::Disks { vm: vm.moref.value.clone(), files: files.clone() };
    save(&options.state_dir, intent)?;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (k, (n, _)) in pairs.iter().enumerate() {
        check(cancel)?;
        let (r, note) = upload_disk(
            client,
            repo,
            manifest,
            *n,
            at,
            &intent.folders[k],
            &files[k].file,
            options.provisioning,
            options.upload,
            progress,
            cancel,
        )
        .await?;
        notes.extend(note);
        out.push((*n, r));
    }
    let mut verified = 0;
    for (n, r) in &out {
        check(cancel)?;
        let point = repo.reader(&manifest.id, *n)?;
        verified += verify_disk(client, at.datacenter_name, r, &point, options.verify, progress).await?;
    }
    check(cancel)?;
    if running {
        progress(Progress { step: format!("powering off VM {}", vm.name), done: 0, total: 0 });
        client.power_off(&vm.moref).await?;
        notes.push(format!("VM {} was powered off for the restore", vm.name));
    }
    let hw = client.hardware(&vm.moref).await?;
    let mut swaps = Vec::new();
    for (k, (_, disk)) in pairs.iter().enumerate() {
        let old = hw
            .disks
            .iter()
            .find(|d| d.key == disk.key)
            .ok_or_else(|| refused(format!("VM {}'s disk {} went away during the restore", vm.name, disk.label)))?;
        let new = DiskSpec {
            key: -100 - i32::try_from(k).unwrap_or(0),
            file: files[k].file.clone(),
            capacity: out[k].1.capacity,
            ..old.clone()
        };
        swaps.push((old.clone(), new));
    }
    progress(Progress { step: format!("swapping the restored disks into VM {}", vm.name), done: 0, total: 0 });
    // The commit: from here the VM has the point's disks.
    client.swap_disks(&vm.moref, &swaps).await?;
    intent.complete = true;
    save(&options.state_dir, intent)?;
    for (old, _) in &swaps {
        if let Err(e) = client.delete_virtual_disk(&old.file, at.datacenter).await
            && !crate::restore_job::is_not_found(&e)
        {
            notes.push(format!(
                "the replaced disk {} could not be deleted now ({e}); the next restore's sweep does",
                old.file
            ));
            return Err(e.into());
        }
    }
    let written = out
        .into_iter()
        .map(|(n, r)| {
            (
                n,
                WrittenDisk {
                    slot: r.slot,
                    file: r.file,
                    capacity: r.capacity,
                    method: "swapped-in".into(),
                    full_reason: Some("no VDDK: whole disks are uploaded and swapped in".into()),
                    changed: None,
                    written: r.uploaded,
                    zeroed: 0,
                },
            )
        })
        .collect();
    let path = "datastore upload: whole disks as hosted sparse VMDKs over HTTPS (/folder PUT), converted on the \
                datastore (CopyVirtualDisk), swapped in for the VM's disks in one reconfiguration"
        .to_owned();
    Ok((path, written, notes, Some(verified)))
}

/// The bus of a controller kind as slots name it (`scsi0:1`).
fn bus_name(kind: vsphere::provision::ControllerKind) -> &'static str {
    use vsphere::provision::ControllerKind as K;
    match kind {
        K::Ahci => "sata",
        K::Nvme => "nvme",
        K::Ide => "ide",
        _ => "scsi",
    }
}

/// The first free unit on `vm`'s controllers for a new disk: SCSI first (unit 7 is the
/// controller's own), then SATA, NVMe, IDE.
fn free_slot(hw: &vsphere::provision::Hardware) -> Option<(i32, i32)> {
    use vsphere::provision::ControllerKind as K;
    let mut controllers = hw.controllers.clone();
    controllers.sort_by_key(|c| (!c.kind.scsi(), c.kind != K::Ahci, c.kind != K::Nvme, c.bus));
    for c in controllers {
        let units: Vec<i32> = if c.kind.scsi() {
            (0..16).filter(|u| *u != 7).collect()
        } else {
            match c.kind {
                K::Ahci => (0..30).collect(),
                K::Nvme => (0..15).collect(),
                _ => (0..2).collect(),
            }
        };
        if let Some(u) = units.into_iter().find(|u| !hw.disks.iter().any(|d| d.controller_key == c.key && d.unit == *u))
        {
            return Some((c.key, u));
        }
    }
    None
}

/// Adds one disk of point `point` to VM `options.vm` as a new disk (uploaded beside it,
/// converted, read back, attached as the commit).
pub async fn attach_disk(
    client: &Client,
    repo: &Repo,
    point: &str,
    options: &AttachOptions,
    progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<InPlaceOutcome, OrchError> {
    let manifest = repo.point(point)?;
    let mut notes = sweep(client, &options.state_dir).await?;
    let vm = find_vm(client, &manifest, Some(&options.vm)).await?;
    let n = point_disk(&manifest, &options.disk)?;
    let hw = client.hardware(&vm.moref).await?;
    let (controller_key, unit) = free_slot(&hw)
        .ok_or_else(|| refused(format!("VM {} has no free unit on its disk controllers for another disk", vm.name)))?;
    let dc = crate::support::datacenter_for(client, &vm).await?;
    let dir = match &options.datastore {
        Some(ds) => format!("[{ds}] {}", vm.name),
        None => match vm.vmx_path.as_deref() {
            Some(p) => folder_of(p).to_owned(),
            None => return Err(refused(format!("VM {} names no folder: give --datastore", vm.name))),
        },
    };
    let id = new_id();
    let slot = manifest.disks[n].name.replace(':', "-");
    let file = format!("{dir}/{}-{slot}-restored-{id}.vmdk", vm.name);
    let at = Where { datacenter: &dc.moref, datacenter_name: &dc.name };
    let work = Work::Disks { vm: vm.moref.value.clone(), files: vec![NewFile { file: file.clone(), replaces: None }] };
    let intent = Intent {
        folders: vec![format!("{dir}/{}-upload-{id}.vmdk", vm.name)],
        ..Intent::begin(client, &id, at, &vm.name, work)
    };
    save(&options.state_dir, &intent)?;
    let started = Instant::now();
    let ran = async {
        client.make_directory(&dir, &dc.moref).await?;
        let (r, note) = upload_disk(
            client,
            repo,
            &manifest,
            n,
            at,
            &intent.folders[0],
            &file,
            options.provisioning,
            options.upload,
            progress,
            cancel,
        )
        .await?;
        let write_seconds = started.elapsed().as_secs_f64();
        check(cancel)?;
        let point = repo.reader(&manifest.id, n)?;
        let verified = verify_disk(client, &dc.name, &r, &point, options.verify, progress).await?;
        check(cancel)?;
        let spec = DiskSpec { key: -100, controller_key, unit, capacity: r.capacity, file: file.clone(), label: None };
        // The commit: the VM has the disk.
        client.attach_disk(&vm.moref, &spec).await?;
        Ok::<_, OrchError>((r, verified, write_seconds, note))
    }
    .await;
    match ran {
        Ok((r, verified, write_seconds, note)) => {
            forget(&options.state_dir, &id);
            notes.extend(note);
            let unit_name = hw
                .controllers
                .iter()
                .find(|c| c.key == controller_key)
                .map(|c| format!("{}{}:{unit}", bus_name(c.kind), c.bus))
                .unwrap_or_else(|| format!("controller {controller_key} unit {unit}"));
            notes.push(format!("disk {} of the point is now {unit_name} of VM {}", r.slot, vm.name));
            Ok(InPlaceOutcome {
                point: manifest.id.clone(),
                vm: vm.moref.value.clone(),
                name: vm.name.clone(),
                path: "datastore upload: a hosted sparse VMDK over HTTPS (/folder PUT), converted on the datastore \
                       (CopyVirtualDisk), attached as a new disk"
                    .into(),
                disks: vec![WrittenDisk {
                    slot: r.slot,
                    file: r.file,
                    capacity: r.capacity,
                    method: "attached".into(),
                    full_reason: None,
                    changed: None,
                    written: r.uploaded,
                    zeroed: 0,
                }],
                verified,
                write_seconds,
                powered_on: false,
                notes,
            })
        }
        Err(e) => {
            let mut undone = Vec::new();
            match undo(client, &intent, &mut undone).await {
                Ok(_) => forget(&options.state_dir, &id),
                Err(u) => tracing::warn!("restore {id} could not be undone now ({u}); the next restore sweeps it"),
            }
            for line in undone {
                tracing::info!("{line}");
            }
            Err(e)
        }
    }
}
