//! The per-VM backup flow of reference section 2.13, into a repository: preflight, CBT on when
//! allowed, a snapshot named for this proxy and job (quiesced when VMware Tools run), a plan per
//! disk from `cbt`, the copy over HTTPS datastore reads, the VM's configuration file captured,
//! the restore point written only after every disk is committed, and the snapshot removed on
//! every path, with consolidation when the server asks for it.

use std::sync::Arc;
use std::time::Instant;

use cbt::{ChangeId, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition, QueryFault};
use pipeline::progress::Progress;
use pipeline::state::Digests;
use pipeline::{BlockSink, CopyOptions, DiskCopy, Engine, copy_disk};
use repo::{Consistency, DiskSpec, Manifest, Repo, SourceInfo};
use vsphere::datastore::DatastoreFile;
use vsphere::{Client, MoRef, Vm};

use crate::OrchError;
use crate::source::{DatastoreSource, shared};

/// What every snapshot of ours is named with, first.
pub const SNAPSHOT_PREFIX: &str = "syncproxy";

/// What a backup job shares across its VMs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// A logged-in session.
    pub client: Arc<Client>,
    /// Where restore points go.
    pub repo: Repo,
    /// The datacenter the VMs' datastores are in (for `/folder` reads).
    pub datacenter: String,
    /// This proxy's ID (in snapshot names).
    pub proxy_id: String,
    /// This job's ID (in snapshot names).
    pub job_id: String,
    /// The copy engine (one buffer pool for the process).
    pub engine: Arc<Engine>,
    /// How copies run.
    pub options: CopyOptions,
}

/// What happened to one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskReport {
    /// Its slot (`scsi0:0`).
    pub name: String,
    /// Whether it was copied in full.
    pub full: bool,
    /// The plan, in words: `full (why)` or `incremental`.
    pub plan: String,
    /// Bytes read from the source.
    pub read: u64,
    /// Chunks the repository did not have.
    pub stored_chunks: u64,
    /// Their size in the repository.
    pub stored_bytes: u64,
}

/// What happened to one VM.
#[derive(Debug, Clone, Default)]
pub struct VmReport {
    /// Its name.
    pub vm: String,
    /// The restore point made, when it succeeded.
    pub point: Option<String>,
    /// Quiesced or crash-consistent.
    pub consistency: Option<Consistency>,
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// What was odd but did not stop it.
    pub warnings: Vec<String>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Whether our snapshot was removed (true when none was made).
    pub snapshot_removed: bool,
    /// How long it took.
    pub seconds: f64,
}

/// Backs up one VM into the job's repository. Never leaves its snapshot behind on purpose: it
/// is removed on success and on failure alike (a removal that fails is reported loudly).
pub async fn backup_vm(ctx: &JobContext, vm: &MoRef) -> VmReport {
    let started = Instant::now();
    let mut report = VmReport { vm: vm.to_string(), snapshot_removed: true, ..VmReport::default() };
    if let Err(e) = run(ctx, vm, &mut report).await {
        report.error = Some(e.to_string());
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

async fn one_vm(ctx: &JobContext, vm: &MoRef) -> Result<Vm, OrchError> {
    ctx.client
        .vms_by_moref(std::slice::from_ref(vm))
        .await?
        .pop()
        .ok_or_else(|| OrchError::Refused(format!("{vm} is not a virtual machine on this server")))
}

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

async fn run(ctx: &JobContext, vm_ref: &MoRef, report: &mut VmReport) -> Result<(), OrchError> {
    let vm = one_vm(ctx, vm_ref).await?;
    report.vm = vm.name.clone();
    if vm.key_id.is_some() {
        return Err(OrchError::Refused(format!("{} is encrypted: its disks cannot be read over HTTPS", vm.name)));
    }
    if vm.snapshot_depth() > 0 {
        return Err(OrchError::Refused(format!(
            "{} already has {} snapshot(s); backing up through a snapshot chain is not supported yet",
            vm.name,
            vm.snapshot_depth()
        )));
    }
    if vm.cbt_enabled != Some(true) {
        if vm.cbt_supported == Some(false) {
            report.warnings.push("CBT is not supported: every backup reads the whole disk".into());
        } else {
            // Only while the VM has no snapshots: enabled under one, CBT under-reports.
            ctx.client.set_change_tracking(&vm.moref, true).await?;
            report.warnings.push("CBT was off: turned it on; this backup is full".into());
        }
    }
    let quiesce = matches!(vm.tools.as_deref(), Some("guestToolsRunning" | "toolsOk"));
    let name = format!("{SNAPSHOT_PREFIX}-{}-{}", ctx.proxy_id, ctx.job_id);
    let description = format!(
        "made by syncproxy proxy {} for job {} at {}; removed when the backup ends",
        ctx.proxy_id,
        ctx.job_id,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    let (snap, consistency) = match ctx.client.create_snapshot(&vm.moref, &name, &description, quiesce, None).await {
        Ok(s) => (s, if quiesce { Consistency::Application } else { Consistency::Crash }),
        // Only a quiescing failure (the guest could not freeze) falls back to crash-consistent.
        Err(e)
            if quiesce
                && e.fault().is_some_and(|f| f.type_name.contains("Quiesce") || f.type_name.contains("Tools")) =>
        {
            report.warnings.push(format!("quiescing failed ({e}); this restore point is crash-consistent"));
            (ctx.client.create_snapshot(&vm.moref, &name, &description, false, None).await?, Consistency::Crash)
        }
        Err(e) => return Err(e.into()),
    };
    report.snapshot_removed = false;
    report.consistency = Some(consistency);
    let copied = copy_under(ctx, &vm, &snap, consistency, report).await;
    match ctx.client.remove_snapshot(&snap, true).await {
        Ok(()) => report.snapshot_removed = true,
        Err(e) => {
            report.warnings.push(format!("COULD NOT REMOVE SNAPSHOT {name} ({snap}): {e}; the next run removes it"))
        }
    }
    if let Ok(after) = one_vm(ctx, &vm.moref).await
        && after.consolidation_needed == Some(true)
    {
        match ctx.client.consolidate_disks(&vm.moref).await {
            Ok(()) => report.warnings.push("the server asked for disk consolidation: done".into()),
            Err(e) => report.warnings.push(format!("disk consolidation needed and failed: {e}")),
        }
    }
    copied.map(|m| report.point = Some(m.id))
}

async fn copy_under(
    ctx: &JobContext,
    vm: &Vm,
    snap: &MoRef,
    consistency: Consistency,
    report: &mut VmReport,
) -> Result<Manifest, OrchError> {
    let frozen = ctx.client.snapshot_disks(snap).await?;
    let previous = match &vm.instance_uuid {
        Some(u) => ctx.repo.points()?.into_iter().rev().find(|p| p.source.instance_uuid.as_deref() == Some(u)),
        None => None,
    };
    let chunk = std::num::NonZeroU64::new(u64::from(ctx.repo.config().chunk_size))
        .ok_or_else(|| OrchError::Refused("the repository has no chunk size".into()))?;
    let mut specs = Vec::new();
    let mut plans = Vec::new();
    for d in &vm.disks {
        if d.independent() || d.backing == vsphere::BackingKind::RdmPhysical {
            report.warnings.push(format!(
                "{} ({}) is skipped: independent and physical-mode RDM disks are not in snapshots",
                d.label, d.file_name
            ));
            continue;
        }
        let slot = d.bus_slot.clone().unwrap_or_else(|| format!("disk{}", d.key));
        let now = frozen.iter().find(|f| f.key == d.key);
        let committed: Option<CommittedDisk> =
            previous.as_ref().and_then(|p| p.disks.iter().find(|e| e.name == slot)).and_then(|e| e.committed.clone());
        let mut current = CurrentDisk {
            change_id: now.and_then(|f| f.change_id.as_deref()).map(ChangeId::parse),
            capacity: d.capacity,
            hardware_version: hardware_version(vm),
            host_version: None,
            position: position(&slot),
            backing: d.base_file_name.clone(),
            allocated: None,
            reverted: false,
        };
        let destination = Destination { granularity: chunk, holds_data: committed.is_some() };
        let changes = match cbt::incremental_base(committed.as_ref(), &current, destination) {
            Ok(base) => {
                match ctx.client.query_changed_disk_areas(&vm.moref, Some(snap), d.key, d.capacity, base.as_str()).await
                {
                    Ok(a) => Changes::Areas(a),
                    Err(e) => match e.fault() {
                        Some(f) => Changes::Fault(QueryFault { fault: f.type_name.clone(), message: e.to_string() }),
                        None => return Err(e.into()),
                    },
                }
            }
            Err(_) => {
                // A full copy reads only what is allocated, when CBT can say.
                match ctx.client.query_changed_disk_areas(&vm.moref, Some(snap), d.key, d.capacity, "*").await {
                    Ok(a) => current.allocated = Some(a.areas),
                    Err(e) => report.warnings.push(format!("{slot}: allocated areas unknown ({e}); reading all of it")),
                }
                Changes::NotQueried
            }
        };
        let planned = cbt::plan(committed.as_ref(), &current, &changes, destination);
        report.warnings.extend(planned.warnings.iter().map(|w| format!("{slot}: {w}")));
        specs.push(DiskSpec {
            name: slot.clone(),
            capacity: d.capacity,
            change_id: current.change_id.as_ref().map(|c| c.as_str().to_owned()),
            committed: Some(planned.commit.clone()),
        });
        plans.push((d.clone(), slot, planned.plan));
    }
    let parent = previous.as_ref().map(|p| p.id.as_str());
    let mut backup = ctx.repo.begin(parent, specs)?;
    let reader = ctx.client.datastore_reader()?;
    if let Some(vmx) = &vm.vmx_path {
        match read_file(&reader, &ctx.datacenter, vmx).await {
            Ok(data) => {
                let file = vmx.rsplit('/').next().unwrap_or("vm.vmx");
                backup.add_file(file, &data)?;
            }
            Err(e) => report.warnings.push(format!("the configuration file {vmx} was not captured: {e}")),
        }
    }
    for (n, (d, slot, plan)) in plans.into_iter().enumerate() {
        let (full, words, read, zero) = match plan {
            CopyPlan::Full { reason, read, zero } => (true, format!("full ({reason})"), read, zero),
            CopyPlan::Incremental { read, zero, .. } => (false, "incremental".to_owned(), read, zero),
        };
        let sink = backup.sink(n).ok_or_else(|| OrchError::Refused(format!("no sink for {slot}")))?;
        let source =
            DatastoreSource::open(reader.clone(), &ctx.datacenter, &d.base_file_name, d.capacity, snap.to_string())
                .await?;
        let job = DiskCopy {
            read,
            zero,
            digests: Digests::zeros(sink.granularity().get(), d.capacity),
            done: cbt::ExtentSet::new(),
            checkpoint: None,
            source: shared(source),
            sink: sink.clone(),
        };
        let r = copy_disk(job, &ctx.engine, &ctx.options, Arc::new(Progress::default())).await?;
        sink.commit().await?;
        let stats = sink.stats();
        report.disks.push(DiskReport {
            name: slot,
            full,
            plan: words,
            read: r.read,
            stored_chunks: stats.stored_chunks,
            stored_bytes: stats.stored_bytes,
        });
    }
    let source = SourceInfo { name: vm.name.clone(), instance_uuid: vm.instance_uuid.clone() };
    Ok(backup.finish(source, consistency)?)
}

/// Reads a small datastore file whole (a `.vmx`).
async fn read_file(
    reader: &vsphere::datastore::DatastoreReader,
    dc: &str,
    ds_path: &str,
) -> Result<Vec<u8>, OrchError> {
    let f = DatastoreFile::from_ds_path(dc, ds_path)?;
    let size = reader.size(&f).await?;
    if size > repo::MAX_FILE as u64 {
        return Err(OrchError::Refused(format!("{ds_path} is {size} bytes")));
    }
    Ok(reader.read(&f, 0, size).await?.to_vec())
}
