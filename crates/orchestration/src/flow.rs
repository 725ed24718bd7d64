//! The per-VM backup flow of reference section 2.13, into a repository: stale snapshots of ours
//! removed first, preflight, CBT on when allowed, a snapshot named for this proxy and job
//! (quiesced when VMware Tools run), a plan per disk from `cbt`, the copy over HTTPS datastore
//! reads, the VM's configuration file captured, the restore point written only after every
//! disk is committed, and the snapshot removed on every path, with consolidation when the
//! server asks for it. [`plan_vm`] says what a backup would copy without touching anything.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbt::{ChangeId, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition, QueryFault};
use pipeline::progress::Progress;
use pipeline::state::Digests;
use pipeline::{BlockSink, CopyOptions, DiskCopy, Engine, copy_disk};
use repo::{Consistency, DiskSpec, Manifest, Repo, SourceInfo};
use vsphere::datastore::DatastoreFile;
use vsphere::{Client, Disk, MoRef, Vm};

use crate::OrchError;
use crate::hygiene::{clean_vm, parse_server_time};
use crate::metrics::Metrics;
use crate::source::{DatastoreSource, shared};

/// What every snapshot of ours is named with, first.
pub const SNAPSHOT_PREFIX: &str = "syncproxy";

/// What a backup job shares across its VMs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// A logged-in session.
    pub client: Arc<Client>,
    /// Where restore points go (and where running jobs hold their leases).
    pub repo: Repo,
    /// This proxy's ID (in snapshot names).
    pub proxy_id: String,
    /// This job's ID (in snapshot names); unique per run.
    pub job_id: String,
    /// The copy engine (one buffer pool for the process).
    pub engine: Arc<Engine>,
    /// How copies run.
    pub options: CopyOptions,
    /// The longest a job may run: an orphaned snapshot of ours younger than this is left alone.
    pub max_job: Duration,
    /// The process's counters.
    pub metrics: Arc<Metrics>,
}

impl JobContext {
    /// A job with default copy options, a 24-hour longest job and fresh counters.
    pub fn new(client: Arc<Client>, repo: Repo, proxy_id: &str, job_id: &str, engine: Arc<Engine>) -> Self {
        Self {
            client,
            repo,
            proxy_id: proxy_id.to_owned(),
            job_id: job_id.to_owned(),
            engine,
            options: CopyOptions::default(),
            max_job: Duration::from_secs(24 * 3600),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// `<proxy>-<job>`: the job's lease name, and what its snapshots are named after.
    pub fn tag(&self) -> String {
        format!("{}-{}", self.proxy_id, self.job_id)
    }

    /// The name of this job's snapshots.
    pub fn snapshot_name(&self) -> String {
        format!("{SNAPSHOT_PREFIX}-{}", self.tag())
    }
}

/// Runs a repository call on the blocking pool (the repository is synchronous, and on S3 it
/// waits for the network).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, repo::RepoError> + Send + 'static,
) -> Result<T, OrchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OrchError::Refused(format!("a repository call did not finish: {e}")))?
        .map_err(OrchError::from)
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
    /// Stale snapshots of ours removed before the backup.
    pub stale_removed: Vec<String>,
    /// How long it took.
    pub seconds: f64,
}

/// Backs up one VM into the job's repository. Never leaves its snapshot behind on purpose: it
/// is removed on success and on failure alike (a removal that fails is reported loudly).
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

/// The datacenter whose datastores hold `vm`'s disks (its name is part of datastore paths).
async fn datacenter_of(client: &Client, vm: &Vm) -> Result<String, OrchError> {
    let dcs = client.datacenters().await?;
    let ds = vm.disks.iter().find_map(|d| d.datastore.clone());
    let found = match &ds {
        Some(ds) => dcs.iter().find(|dc| dc.datastores.contains(ds)),
        None if dcs.len() == 1 => dcs.first(),
        None => None,
    };
    found
        .map(|dc| dc.name.clone())
        .ok_or_else(|| OrchError::Refused(format!("no datacenter holds the datastore of {}'s disks ({ds:?})", vm.name)))
}

/// Removes stale snapshots of ours from `vm` (see `hygiene`) and says what it did; returns
/// whether anything was removed.
async fn hygiene(ctx: &JobContext, vm: &Vm, report: &mut VmReport) -> Result<bool, OrchError> {
    if vm.snapshots.is_empty() {
        return Ok(false);
    }
    let repo = ctx.repo.clone();
    let mut live: HashSet<String> =
        blocking(move || repo.live_jobs()).await?.into_iter().map(|(name, _)| name).collect();
    live.insert(ctx.tag());
    let now_text = ctx.client.current_time().await?;
    let now = parse_server_time(&now_text)
        .ok_or_else(|| OrchError::Refused(format!("the server's clock reads {now_text:?}, not a time")))?;
    let h = clean_vm(&ctx.client, vm, &live, now, ctx.max_job, &ctx.metrics).await?;
    report.warnings.extend(h.notes);
    let removed = !h.removed.is_empty();
    report.stale_removed = h.removed;
    Ok(removed)
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
    let mut vm = one_vm(ctx, vm_ref).await?;
    report.vm = vm.name.clone();
    if hygiene(ctx, &vm, report).await? {
        vm = one_vm(ctx, vm_ref).await?;
    }
    if vm.key_id.is_some() {
        return Err(OrchError::Refused(format!("{} is encrypted: its disks cannot be read over HTTPS", vm.name)));
    }
    if vm.snapshot_depth() > 0 {
        let names: Vec<&str> = vm.all_snapshots().iter().map(|s| s.name.as_str()).collect();
        return Err(OrchError::Refused(format!(
            "{} has {} snapshot(s) ({}); backing up through a snapshot chain is not supported yet: remove or \
             consolidate them first",
            vm.name,
            names.len(),
            names.join(", ")
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
    let name = ctx.snapshot_name();
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
    // Removed even when the copy failed; a Ctrl-C (the future dropped) is handled by the job,
    // which removes every snapshot named for it before it exits.
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

/// One disk's plan.
struct DiskPlan {
    disk: Disk,
    slot: String,
    spec: DiskSpec,
    /// `None` when only a snapshot can tell (a planning run on a powered-on VM).
    plan: Option<CopyPlan>,
    words: String,
}

/// The newest restore point of `vm` in the repository.
async fn previous_point(ctx: &JobContext, vm: &Vm) -> Result<Option<Manifest>, OrchError> {
    let Some(uuid) = vm.instance_uuid.clone() else { return Ok(None) };
    let repo = ctx.repo.clone();
    let points = blocking(move || repo.points()).await?;
    Ok(points.into_iter().rev().find(|p| p.source.instance_uuid.as_deref() == Some(uuid.as_str())))
}

/// Plans every disk of `vm` that a snapshot holds: under `snap` for a backup, or against the
/// live disks for `--plan` (where CBT answers only for a powered-off VM).
async fn plan_disks(
    ctx: &JobContext,
    vm: &Vm,
    snap: Option<&MoRef>,
    previous: Option<&Manifest>,
    warnings: &mut Vec<String>,
) -> Result<Vec<DiskPlan>, OrchError> {
    let frozen = match snap {
        Some(s) => ctx.client.snapshot_disks(s).await?,
        None => vm.disks.clone(),
    };
    let can_query = snap.is_some() || vm.power_state.as_deref() == Some("poweredOff");
    let chunk = std::num::NonZeroU64::new(u64::from(ctx.repo.config().chunk_size))
        .ok_or_else(|| OrchError::Refused("the repository has no chunk size".into()))?;
    let mut out = Vec::new();
    for d in &vm.disks {
        if d.independent() || d.backing == vsphere::BackingKind::RdmPhysical {
            warnings.push(format!(
                "{} ({}) is skipped: independent and physical-mode RDM disks are not in snapshots",
                d.label, d.file_name
            ));
            continue;
        }
        let slot = d.bus_slot.clone().unwrap_or_else(|| format!("disk{}", d.key));
        let now = frozen.iter().find(|f| f.key == d.key);
        let committed: Option<CommittedDisk> =
            previous.and_then(|p| p.disks.iter().find(|e| e.name == slot)).and_then(|e| e.committed.clone());
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
        let spec_of = |current: &CurrentDisk, commit: Option<CommittedDisk>| DiskSpec {
            name: slot.clone(),
            capacity: d.capacity,
            change_id: current.change_id.as_ref().map(|c| c.as_str().to_owned()),
            committed: commit,
        };
        let changes = match cbt::incremental_base(committed.as_ref(), &current, destination) {
            Ok(base) if !can_query => {
                out.push(DiskPlan {
                    disk: d.clone(),
                    slot: slot.clone(),
                    spec: spec_of(&current, None),
                    plan: None,
                    words: format!(
                        "incremental since {} (its size is known only under the backup's snapshot: the VM is \
                         powered on)",
                        base.as_str()
                    ),
                });
                continue;
            }
            Ok(base) => {
                match ctx.client.query_changed_disk_areas(&vm.moref, snap, d.key, d.capacity, base.as_str()).await {
                    Ok(a) => Changes::Areas(a),
                    Err(e) => match e.fault() {
                        Some(f) => Changes::Fault(QueryFault { fault: f.type_name.clone(), message: e.to_string() }),
                        None => return Err(e.into()),
                    },
                }
            }
            Err(_) => {
                // A full copy reads only what is allocated, when CBT can say.
                if can_query {
                    match ctx.client.query_changed_disk_areas(&vm.moref, snap, d.key, d.capacity, "*").await {
                        Ok(a) => current.allocated = Some(a.areas),
                        Err(e) => warnings.push(format!("{slot}: allocated areas unknown ({e}); reading all of it")),
                    }
                }
                Changes::NotQueried
            }
        };
        let planned = cbt::plan(committed.as_ref(), &current, &changes, destination);
        warnings.extend(planned.warnings.iter().map(|w| format!("{slot}: {w}")));
        let words = match &planned.plan {
            CopyPlan::Full { reason, .. } => format!("full ({reason})"),
            CopyPlan::Incremental { .. } => "incremental".to_owned(),
        };
        let spec = spec_of(&current, Some(planned.commit.clone()));
        out.push(DiskPlan { disk: d.clone(), slot, spec, plan: Some(planned.plan), words });
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
    let vm = one_vm(ctx, vm).await?;
    let mut out = VmPlan { vm: vm.name.clone(), ..VmPlan::default() };
    if vm.key_id.is_some() {
        out.warnings.push("encrypted: refused (its disks cannot be read over HTTPS)".into());
    }
    if vm.snapshot_depth() > 0 {
        out.warnings.push(format!(
            "has {} snapshot(s): stale ones of ours would be removed, any other refuses the backup",
            vm.all_snapshots().len()
        ));
    }
    if vm.cbt_enabled != Some(true) && vm.cbt_supported != Some(false) {
        out.warnings.push("CBT is off: the backup turns it on, and copies every disk in full".into());
    }
    let previous = previous_point(ctx, &vm).await?;
    out.parent = previous.as_ref().map(|p| p.id.clone());
    for p in plan_disks(ctx, &vm, None, previous.as_ref(), &mut out.warnings).await? {
        out.disks.push(DiskPlanReport {
            name: p.slot,
            capacity: p.disk.capacity,
            plan: p.words,
            read: p.plan.as_ref().map(|c| c.read().total_bytes()),
        });
    }
    Ok(out)
}

async fn copy_under(
    ctx: &JobContext,
    vm: &Vm,
    snap: &MoRef,
    consistency: Consistency,
    report: &mut VmReport,
) -> Result<Manifest, OrchError> {
    let previous = previous_point(ctx, vm).await?;
    let planned = plan_disks(ctx, vm, Some(snap), previous.as_ref(), &mut report.warnings).await?;
    let datacenter = datacenter_of(&ctx.client, vm).await?;
    let parent = previous.as_ref().map(|p| p.id.clone());
    let specs: Vec<DiskSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let repo = ctx.repo.clone();
    let mut backup = blocking(move || repo.begin(parent.as_deref(), specs)).await?;
    let reader = ctx.client.datastore_reader()?;
    if let Some(vmx) = &vm.vmx_path {
        match read_file(&reader, &datacenter, vmx).await {
            Ok(data) => {
                let file = vmx.rsplit('/').next().unwrap_or("vm.vmx").to_owned();
                backup = blocking(move || backup.add_file(&file, &data).map(|()| backup)).await?;
            }
            Err(e) => report.warnings.push(format!("the configuration file {vmx} was not captured: {e}")),
        }
    }
    for (n, p) in planned.into_iter().enumerate() {
        let Some(plan) = p.plan else {
            return Err(OrchError::Refused(format!("{}: no plan under the snapshot", p.slot)));
        };
        let full = matches!(plan, CopyPlan::Full { .. });
        let (read, zero) = match plan {
            CopyPlan::Full { read, zero, .. } | CopyPlan::Incremental { read, zero, .. } => (read, zero),
        };
        let sink = backup.sink(n).ok_or_else(|| OrchError::Refused(format!("no sink for {}", p.slot)))?;
        let copying = ctx.metrics.disk_copying();
        let source = DatastoreSource::open(
            reader.clone(),
            &datacenter,
            &p.disk.base_file_name,
            p.disk.capacity,
            snap.to_string(),
        )
        .await?;
        let job = DiskCopy {
            read,
            zero,
            digests: Digests::zeros(sink.granularity().get(), p.disk.capacity),
            done: cbt::ExtentSet::new(),
            checkpoint: None,
            source: shared(source),
            sink: sink.clone(),
        };
        let progress = Arc::new(Progress::child_of(ctx.metrics.progress.clone()));
        let r = copy_disk(job, &ctx.engine, &ctx.options, progress).await?;
        sink.commit().await?;
        drop(copying);
        ctx.metrics.disk_copied();
        let stats = sink.stats();
        report.disks.push(DiskReport {
            name: p.slot,
            full,
            plan: p.words,
            read: r.read,
            stored_chunks: stats.stored_chunks,
            stored_bytes: stats.stored_bytes,
        });
    }
    let source = SourceInfo { name: vm.name.clone(), instance_uuid: vm.instance_uuid.clone() };
    blocking(move || backup.finish(source, consistency)).await
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
