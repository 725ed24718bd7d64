//! The per-VM flow of reference section 2.13, into a repository or onto replica disks: stale
//! snapshots of ours removed first, preflight, CBT on when allowed, a snapshot named for this
//! proxy and job (quiesced when VMware Tools run), per disk the facts `cbt` plans from, the copy
//! over HTTPS datastore reads, the VM's configuration file captured, the restore point (or each
//! replica's sync state) written only after the data is durable, and the snapshot removed on
//! every path, with consolidation when the server asks for it. [`plan_vm`] says what a backup
//! would copy without touching anything.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockio::{FileSink, FileSinkOptions};
use cbt::{ChangeId, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition, QueryFault};
use durable::{JobLease, LocalStore, LockTiming, Store};
use pipeline::progress::Progress;
use pipeline::{BlockSink, CopyOptions, Digests, DiskCopy, Engine, copy_disk};
use replica::replicate::{SyncJob, sync};
use replica::state::{StateStore, SyncKey};
use repo::{Consistency, DiskSpec, Manifest, Repo, SourceInfo};
use vsphere::datastore::DatastoreFile;
use vsphere::{Client, Disk, MoRef, Vm};
use vsphere_io::open_frozen;

use crate::OrchError;
use crate::hygiene::{clean_vm, parse_server_time};
use crate::metrics::Metrics;

/// What every snapshot of ours is named with, first.
pub const SNAPSHOT_PREFIX: &str = "syncproxy";

/// Replica disks under a directory: `<dir>/<vm>_<uuid8>/<slot>.raw`, one sparse raw file per
/// disk, brought up to date in place; the sync states and the job leases live in
/// `<dir>/.syncproxy/`.
#[derive(Debug, Clone)]
pub struct ReplicaTarget {
    /// The directory.
    pub dir: PathBuf,
    /// The sync states (one per disk), written only after the data is durable.
    pub state: StateStore,
    /// Where jobs writing here hold their leases.
    pub leases: Arc<dyn Store>,
    /// How replica files are written.
    pub sink: FileSinkOptions,
}

impl ReplicaTarget {
    /// Opens (creating) a replica directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, OrchError> {
        let dir = dir.into();
        let meta = dir.join(".syncproxy");
        std::fs::create_dir_all(&meta)
            .map_err(|e| OrchError::Refused(format!("cannot create {}: {e}", meta.display())))?;
        let state = StateStore::open(meta.join("state"))?;
        Ok(Self { dir, state, leases: Arc::new(LocalStore::new(&meta)), sink: FileSinkOptions::default() })
    }

    /// The folder of one VM's replica disks: its name made safe for a file name, then the
    /// start of its instance UUID (two VMs may share a name).
    pub fn vm_dir(&self, vm: &Vm) -> PathBuf {
        let safe: String = vm
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
            .collect();
        let uuid: String = vm.instance_uuid.as_deref().unwrap_or("nouuid").chars().take(8).collect();
        self.dir.join(format!("{}_{uuid}", safe.trim_start_matches('.')))
    }

    /// The replica file of the disk in `slot` (`scsi0:1`) of `vm`.
    pub fn disk_path(&self, vm: &Vm, slot: &str) -> PathBuf {
        self.vm_dir(vm).join(format!("{}.raw", slot.replace(':', "-")))
    }

    /// The sync-state key of that disk, from the vCenter `vcenter` (its instance UUID); `None`
    /// for a VM without an instance UUID.
    pub fn key(&self, vcenter: &str, vm: &Vm, slot: &str) -> Option<SyncKey> {
        Some(SyncKey {
            vcenter: vcenter.to_owned(),
            vm: vm.instance_uuid.clone()?,
            disk: slot.to_owned(),
            destination: self.disk_path(vm, slot).display().to_string(),
        })
    }
}

/// Where a job's VMs go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Restore points in a repository (which also holds the job leases).
    Repository(Repo),
    /// Replica disks, brought up to date in place.
    Replica(ReplicaTarget),
}

/// What a job shares across its VMs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// A logged-in session.
    pub client: Arc<Client>,
    /// Where the VMs go (and where running jobs hold their leases).
    pub target: Target,
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
    /// How many VMs may run at once, over every job of the process.
    pub limits: Arc<crate::Limits>,
    /// Which disks of each VM to copy.
    pub disks: DiskFilter,
    /// Read disks through VDDK instead of HTTPS datastore reads, when set.
    pub vddk: Option<Arc<vddk::Vddk>>,
    /// Or read each disk from an NBD export: a URI template with `{vm}`, `{moref}`, `{uuid}`,
    /// `{snapshot}` and `{disk}` (the slot, `scsi0-1`), for NBD servers the operator runs
    /// (nbdkit's VDDK plugin, for instance) over the frozen disks.
    pub nbd: Option<String>,
    /// Override each VM's DRS automation to manual while it is read, where DRS could move it
    /// (and put it back after); on by default.
    pub pin_drs: bool,
    /// Freeze hooks around each VM's snapshot.
    pub hooks: crate::hooks::Hooks,
}

/// The NBD URI of one frozen disk, from a template.
pub fn nbd_uri(template: &str, vm: &Vm, snapshot: &MoRef, slot: &str) -> String {
    template
        .replace("{vm}", &vm.name)
        .replace("{moref}", &vm.moref.value)
        .replace("{uuid}", vm.instance_uuid.as_deref().unwrap_or(""))
        .replace("{snapshot}", &snapshot.value)
        .replace("{disk}", &slot.replace(':', "-"))
}

/// Which disks of a VM a job copies: by slot (`scsi0:1`) or label (`Hard disk 2`). Empty
/// `include` means every disk; `exclude` wins over `include`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskFilter {
    /// Only these.
    pub include: Vec<String>,
    /// Never these.
    pub exclude: Vec<String>,
}

impl DiskFilter {
    /// Whether the disk in `slot` labelled `label` is copied.
    pub fn wants(&self, slot: &str, label: &str) -> bool {
        let named =
            |list: &[String]| list.iter().any(|x| x.eq_ignore_ascii_case(slot) || x.eq_ignore_ascii_case(label));
        (self.include.is_empty() || named(&self.include)) && !named(&self.exclude)
    }
}

impl JobContext {
    /// A backup job into `repo`, with default copy options, a 24-hour longest job and fresh
    /// counters.
    pub fn new(client: Arc<Client>, repo: Repo, proxy_id: &str, job_id: &str, engine: Arc<Engine>) -> Self {
        Self::with_target(client, Target::Repository(repo), proxy_id, job_id, engine)
    }

    /// A job to `target`, with default copy options, a 24-hour longest job and fresh counters.
    pub fn with_target(client: Arc<Client>, target: Target, proxy_id: &str, job_id: &str, engine: Arc<Engine>) -> Self {
        Self {
            client,
            target,
            proxy_id: proxy_id.to_owned(),
            job_id: job_id.to_owned(),
            engine,
            options: CopyOptions::default(),
            max_job: Duration::from_secs(24 * 3600),
            metrics: Arc::new(Metrics::default()),
            limits: Arc::new(crate::Limits::default()),
            disks: DiskFilter::default(),
            vddk: None,
            nbd: None,
            pin_drs: true,
            hooks: crate::hooks::Hooks::default(),
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

    /// Where leases of jobs writing to this target live.
    pub(crate) fn leases(&self) -> Arc<dyn Store> {
        match &self.target {
            Target::Repository(r) => r.store().clone(),
            Target::Replica(r) => r.leases.clone(),
        }
    }

    /// Takes this job's lease.
    pub(crate) async fn lease(&self) -> Result<JobLease, OrchError> {
        let tag = self.tag();
        match &self.target {
            Target::Repository(r) => {
                let r = r.clone();
                blocking(move || r.job_lease(&tag)).await
            }
            Target::Replica(r) => {
                let store = r.leases.clone();
                blocking(move || JobLease::take(store, LockTiming::default(), &tag)).await
            }
        }
    }

    fn repo(&self) -> Result<&Repo, OrchError> {
        match &self.target {
            Target::Repository(r) => Ok(r),
            Target::Replica(_) => Err(OrchError::Refused("this job writes replicas, not restore points".into())),
        }
    }
}

/// Runs a repository, lease or block-layer call on the blocking pool (the repository is
/// synchronous, and on S3 it waits for the network).
pub(crate) async fn blocking<T: Send + 'static, E: Into<OrchError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, OrchError> {
    pipeline::blocking_as(move || f().map_err(Into::into)).await
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
    /// How it was read: `https`, or `vddk:<mode>`.
    pub transport: String,
}

/// What happened to one VM.
#[derive(Debug, Clone, Default)]
pub struct VmReport {
    /// Its name.
    pub vm: String,
    /// The restore point made, when it succeeded (backups).
    pub point: Option<String>,
    /// The folder of the VM's replica disks, once they are consistent (replication).
    pub replica: Option<PathBuf>,
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

/// Backs up one VM into the job's repository, or brings its replica disks up to date. Never
/// leaves its snapshot behind on purpose: it is removed on success and on failure alike (a
/// removal that fails is reported loudly).
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
    Ok(datacenter_for(client, vm).await?.name)
}

/// The datacenter whose datastores hold `vm`'s disks.
pub(crate) async fn datacenter_for(client: &Client, vm: &Vm) -> Result<vsphere::facts::Datacenter, OrchError> {
    let mut dcs = client.datacenters().await?;
    let ds = vm.disks.iter().find_map(|d| d.datastore.clone());
    let found = match &ds {
        Some(ds) => dcs.iter().position(|dc| dc.datastores.contains(ds)),
        None if dcs.len() == 1 => Some(0),
        None => None,
    };
    found
        .map(|i| dcs.swap_remove(i))
        .ok_or_else(|| OrchError::Refused(format!("no datacenter holds the datastore of {}'s disks ({ds:?})", vm.name)))
}

/// Removes stale snapshots of ours from `vm` (see `hygiene`) and says what it did; returns
/// whether anything was removed.
pub(crate) async fn hygiene(ctx: &JobContext, vm: &Vm, report: &mut VmReport) -> Result<bool, OrchError> {
    let (leases, moref) = (ctx.leases(), vm.moref.value.clone());
    let (running, recorded) = blocking(move || {
        Ok::<_, durable::Error>((durable::live_jobs_in(&*leases)?, crate::intent::jobs_on(&*leases, &moref)?))
    })
    .await?;
    let mut live: HashSet<String> = running.into_iter().map(|(name, _)| name).collect();
    live.insert(ctx.tag());
    // A job that recorded its intent here and holds no live lease is dead.
    let dead: HashSet<String> = recorded.into_iter().filter(|j| !live.contains(j)).collect();
    let present: HashSet<&str> = vm.all_snapshots().iter().filter_map(|s| crate::hygiene::job_of(&s.name)).collect();
    // Dead jobs whose snapshot is already gone: their records have served.
    let mut done: Vec<String> = dead.iter().filter(|j| !present.contains(j.as_str())).cloned().collect();
    let mut removed = Vec::new();
    if !vm.snapshots.is_empty() {
        let now_text = ctx.client.current_time().await?;
        let now = parse_server_time(&now_text)
            .ok_or_else(|| OrchError::Refused(format!("the server's clock reads {now_text:?}, not a time")))?;
        let h = clean_vm(&ctx.client, vm, &live, &dead, now, ctx.max_job, &ctx.metrics).await?;
        report.warnings.extend(h.notes);
        done.extend(h.removed.iter().filter_map(|n| crate::hygiene::job_of(n)).map(str::to_owned));
        removed = h.removed;
    }
    forget_intents(ctx, vm, done).await;
    let any = !removed.is_empty();
    report.stale_removed = removed;
    Ok(any)
}

/// Records in the job's target, durably, that this job is about to snapshot `vm` as `name`.
async fn record_intent(ctx: &JobContext, vm: &Vm, name: &str) -> Result<(), OrchError> {
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
async fn forget_intents(ctx: &JobContext, vm: &Vm, jobs: Vec<String>) {
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
async fn remove_named(ctx: &JobContext, vm: &MoRef, name: &str) -> Result<usize, OrchError> {
    let found = one_vm(ctx, vm).await?;
    let mine: Vec<MoRef> = found.all_snapshots().iter().filter(|s| s.name == name).map(|s| s.moref.clone()).collect();
    for s in &mine {
        ctx.client.remove_snapshot(s, true).await?;
    }
    Ok(mine.len())
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
    crate::drs::restore_left(ctx, &vm, report).await?;
    let pinned = crate::drs::pin(ctx, &vm, report).await?;
    let r = run_vm(ctx, vm, report).await;
    if let Some(p) = pinned {
        crate::drs::unpin(ctx, p, report).await;
    }
    r
}

/// The flow of one VM, as fetched by [`run`].
async fn run_vm(ctx: &JobContext, mut vm: Vm, report: &mut VmReport) -> Result<(), OrchError> {
    // A dead job's copy that made progress under its snapshot is finished under it; any other
    // snapshot of a dead job goes first.
    if let Some(adopted) = adoptable(ctx, &vm).await? {
        return resume_under(ctx, &vm, adopted, report).await;
    }
    if hygiene(ctx, &vm, report).await? {
        vm = one_vm(ctx, &vm.moref).await?;
    }
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
        report.warnings.push(format!(
            "the VM has {depth} older snapshot(s) ({}): its disks are read through their chain",
            names.join(", ")
        ));
    }
    if vm.cbt_enabled != Some(true) {
        if vm.cbt_supported == Some(false) {
            report.warnings.push("CBT is not supported: every backup reads the whole disk".into());
        } else if depth > 0 {
            // Enabled under a snapshot, CBT under-reports silently (reference §2.9).
            report.warnings.push(
                "CBT is off and is not turned on while the VM has snapshots: this backup reads every disk whole".into(),
            );
        } else {
            // Only while the VM has no snapshots: enabled under one, CBT under-reports. Marked
            // first: whatever was written while CBT was off is in no change set, so every disk
            // is copied in full, by this run or, if it dies, by the next.
            if let Some(key) = vm_key(&ctx.client, &vm) {
                let (store, name) = (ctx.leases(), vm.name.clone());
                blocking(move || crate::cbt_reset::mark_turned_on(&*store, &key, &name)).await?;
            }
            ctx.client.set_change_tracking(&vm.moref, true).await?;
            report.warnings.push("CBT was off: turned it on; this backup is full".into());
        }
    }
    let quiesce = vm.tools.as_ref().is_some_and(vsphere::ToolsRunningStatus::running);
    let name = ctx.snapshot_name();
    let description = format!(
        "made by syncproxy proxy {} for job {} at {}; removed when the backup ends",
        ctx.proxy_id,
        ctx.job_id,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    if let Some(h) = &ctx.hooks.pre_freeze
        && let Err(e) = crate::hooks::run_hook(&ctx.client, &vm, h, "pre-freeze").await
    {
        // What the hook froze before it failed is thawed all the same.
        post_thaw(ctx, &vm, report).await;
        return Err(OrchError::Refused(format!("the pre-freeze hook failed: {e}; no snapshot was taken")));
    }
    // Recorded before the snapshot is asked for: a successor that finds the snapshot and no
    // live lease of this job removes it at once.
    if let Err(e) = record_intent(ctx, &vm, &name).await {
        post_thaw(ctx, &vm, report).await;
        return Err(e);
    }
    let created = match ctx.client.create_snapshot(&vm.moref, &name, &description, quiesce, None).await {
        Ok(s) => Ok((s, if quiesce { Consistency::Application } else { Consistency::Crash })),
        // Only a quiescing failure (the guest could not freeze) falls back to crash-consistent.
        Err(e) if quiesce && e.is_quiesce_fault() => {
            report.warnings.push(format!("quiescing failed ({e}); this restore point is crash-consistent"));
            ctx.client
                .create_snapshot(&vm.moref, &name, &description, false, None)
                .await
                .map(|s| (s, Consistency::Crash))
        }
        Err(e) => Err(e),
    };
    post_thaw(ctx, &vm, report).await;
    let (snap, consistency) = match created {
        Ok(x) => x,
        Err(e) => return Err(after_failed_create(ctx, &vm, &name, e, report).await),
    };
    report.snapshot_removed = false;
    report.consistency = Some(consistency);
    let copied = match &ctx.target {
        Target::Repository(_) => {
            copy_under(ctx, &vm, &snap, consistency, &ctx.tag(), report).await.map(|m| report.point = Some(m.id))
        }
        Target::Replica(r) => replicate_under(ctx, r, &vm, &snap, &ctx.tag(), report).await,
    };
    // Removed even when the copy failed; a Ctrl-C (the future dropped) is handled by the job,
    // which removes every snapshot named for it before it exits.
    match ctx.client.remove_snapshot(&snap, true).await {
        Ok(()) => {
            report.snapshot_removed = true;
            forget_intents(ctx, &vm, vec![ctx.tag()]).await;
        }
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
    copied
}

/// After `CreateSnapshot` failed: the server may have made the snapshot all the same (a call
/// that timed out while the server worked on), so this job's snapshot is looked up by name and
/// removed, and the report says what really happened. Returns the error to report.
async fn after_failed_create(
    ctx: &JobContext,
    vm: &Vm,
    name: &str,
    e: vsphere::Error,
    report: &mut VmReport,
) -> OrchError {
    // A fault is the server's own "no": the task failed and made nothing. Anything else (a
    // timeout, a lost connection) leaves the outcome unknown.
    let answered = e.fault().is_some();
    if !answered {
        wait_for_creations(ctx, vm, report).await;
    }
    match remove_named(ctx, &vm.moref, name).await {
        Ok(0) if answered => forget_intents(ctx, vm, vec![ctx.tag()]).await,
        Ok(0) => {
            report.snapshot_removed = false;
            report.warnings.push(format!(
                "the snapshot {name:?} was asked for and the server did not answer ({e}): it may still make it;                  this job removes it when it ends, or else the next run does"
            ));
        }
        Ok(n) => {
            report
                .warnings
                .push(format!("the snapshot {name:?} was made although its creation failed ({e}): removed ({n})"));
            forget_intents(ctx, vm, vec![ctx.tag()]).await;
        }
        Err(r) => {
            report.snapshot_removed = false;
            report.warnings.push(format!(
                "COULD NOT CHECK OR REMOVE SNAPSHOT {name:?} after its creation failed ({e}): {r}; the next run \
                 removes it"
            ));
        }
    }
    e.into()
}

/// The longest a job waits for a snapshot creation the server still runs after the call that
/// asked for it went unanswered.
const CREATION_WAIT: Duration = Duration::from_secs(15 * 60);

/// Waits (at most [`CREATION_WAIT`]) for the snapshot creations the server still runs on `vm`,
/// as its `recentTask` lists them, so that what they make can be removed now.
async fn wait_for_creations(ctx: &JobContext, vm: &Vm, report: &mut VmReport) {
    let tasks = match ctx.client.recent_tasks(&vm.moref).await {
        Ok(t) => t,
        Err(e) => {
            report.warnings.push(format!("the VM's recent tasks could not be read ({e})"));
            return;
        }
    };
    for t in tasks.iter().filter(|t| t.running() && t.description_id == "VirtualMachine.createSnapshot") {
        tracing::info!("{}: waiting for the snapshot creation {} the server still runs", vm.name, t.moref);
        match tokio::time::timeout(CREATION_WAIT, ctx.client.wait_task(&t.moref, "CreateSnapshot_Task", None)).await {
            Ok(_) => {}
            Err(_) => report.warnings.push(format!(
                "the snapshot creation {} still ran after {}",
                t.moref,
                humantime::format_duration(CREATION_WAIT)
            )),
        }
    }
}

/// Runs the job's post-thaw hook, if any; a failure is reported loudly, and the backup goes on
/// (the snapshot is taken: the data is consistent, the guest is what needs attention).
async fn post_thaw(ctx: &JobContext, vm: &Vm, report: &mut VmReport) {
    if let Some(h) = &ctx.hooks.post_thaw
        && let Err(e) = crate::hooks::run_hook(&ctx.client, vm, h, "post-thaw").await
    {
        tracing::error!("{}: the post-thaw hook failed: {e}", vm.name);
        report.warnings.push(format!("POST-THAW HOOK FAILED: {e}; check the guest's applications"));
    }
}

/// What `cbt` plans one disk from: the disk, its slot, what the destination holds of it, and
/// the changes since (when they can be asked).
struct DiskFacts {
    disk: Disk,
    /// The disk's file as the snapshot lists it (what VDDK opens under the snapshot).
    frozen_file: String,
    slot: String,
    committed: Option<CommittedDisk>,
    current: CurrentDisk,
    destination: Destination,
    /// `None` when only a snapshot can tell (a planning run on a powered-on VM); then `base`
    /// says since which change ID.
    changes: Option<Changes>,
    base: Option<String>,
}

/// The slot of a disk (`scsi0:1`), its stable name in restore points and replicas.
fn slot_of(d: &Disk) -> String {
    d.bus_slot.clone().unwrap_or_else(|| format!("disk{}", d.key))
}

/// Gathers the planning facts of every disk of `vm` that a snapshot holds: under `snap` for a
/// copy, or against the live disks for a plan (where CBT answers only for a powered-off VM).
/// `destination(disk, slot)` says what the destination holds of each disk.
async fn disk_facts(
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

/// A snapshot of ours that a dead job left while copying into this replica target, with the
/// checkpoint it left: the copy can go on under it.
struct Adopted {
    snap: MoRef,
    name: String,
    job: String,
    quiesced: bool,
}

/// The snapshot of a dead job of ours that `vm` still has, when it is the VM's only snapshot and
/// the target holds progress that job made under it (a replica's checkpoint, a repository's
/// session): the interrupted copy resumes under the very state it started from. Any other
/// snapshot leaves the VM to the usual rules.
async fn adoptable(ctx: &JobContext, vm: &Vm) -> Result<Option<Adopted>, OrchError> {
    let [s] = vm.all_snapshots()[..] else { return Ok(None) };
    let Some(job) = crate::hygiene::job_of(&s.name) else { return Ok(None) };
    let leases = ctx.leases();
    let live = blocking(move || durable::live_jobs_in(&*leases)).await?;
    if job == ctx.tag() || live.iter().any(|(n, _)| n == job) {
        return Ok(None);
    }
    let identity = s.moref.to_string();
    let made_progress = match &ctx.target {
        Target::Replica(target) => {
            let vcenter = ctx.client.content().about.instance_uuid.clone();
            let mut found = false;
            for d in &vm.disks {
                let Some(key) = target.key(&vcenter, vm, &slot_of(d)) else { continue };
                if let Some((cp, _)) = target.state.load_checkpoint(&key)? {
                    found |= cp.job == job && cp.source == identity;
                }
            }
            found
        }
        Target::Repository(repo) => match vm_key(&ctx.client, vm) {
            Some(key) => {
                let repo = repo.clone();
                let session = blocking(move || repo.session(&key)).await?;
                session.is_some_and(|x| x.job == job && x.source == identity)
            }
            None => false,
        },
    };
    Ok(made_progress.then(|| Adopted {
        snap: s.moref.clone(),
        name: s.name.clone(),
        job: job.to_owned(),
        quiesced: s.quiesced,
    }))
}

/// Finishes the copy a dead job left under `adopted`, then removes its snapshot.
async fn resume_under(ctx: &JobContext, vm: &Vm, adopted: Adopted, report: &mut VmReport) -> Result<(), OrchError> {
    report.warnings.push(format!(
        "resuming the copy that job {} left unfinished, under its snapshot {:?}",
        adopted.job, adopted.name
    ));
    report.snapshot_removed = false;
    let consistency = if adopted.quiesced { Consistency::Application } else { Consistency::Crash };
    report.consistency = Some(consistency);
    let copied = match &ctx.target {
        Target::Repository(_) => copy_under(ctx, vm, &adopted.snap, consistency, &adopted.job, report)
            .await
            .map(|m| report.point = Some(m.id)),
        Target::Replica(r) => replicate_under(ctx, r, vm, &adopted.snap, &adopted.job, report).await,
    };
    match ctx.client.remove_snapshot(&adopted.snap, true).await {
        Ok(()) => {
            report.snapshot_removed = true;
            forget_intents(ctx, vm, vec![adopted.job.clone()]).await;
        }
        Err(e) => report.warnings.push(format!(
            "COULD NOT REMOVE SNAPSHOT {} ({}): {e}; the next run removes it",
            adopted.name, adopted.snap
        )),
    }
    copied
}

/// The name of `vm` in a target's per-VM records (sessions, reset marks): the vCenter's
/// instance UUID and the VM's (none without an instance UUID to name it by).
pub fn vm_key(client: &vsphere::Client, vm: &Vm) -> Option<String> {
    let uuid = vm.instance_uuid.as_deref().filter(|u| !u.is_empty())?;
    let vcenter = &client.content().about.instance_uuid;
    let key: String = format!("{}-{uuid}", if vcenter.is_empty() { "esx" } else { vcenter })
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(128)
        .collect();
    Some(key)
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

/// Forgets `vm`'s reset mark in this job's target, once its disks were copied in full.
async fn clear_reset(ctx: &JobContext, vm: &Vm, report: &mut VmReport) {
    let Some(key) = vm_key(&ctx.client, vm) else { return };
    let store = ctx.leases();
    if let Err(e) = blocking(move || crate::cbt_reset::clear_reset(&*store, &key)).await {
        report.warnings.push(format!("the CBT reset mark stays (the next copy is full again): {e}"));
    }
}

/// One disk's plan for a backup.
struct DiskPlan {
    facts: DiskFacts,
    spec: DiskSpec,
    /// `None` when only a snapshot can tell.
    plan: Option<CopyPlan>,
    words: String,
}

/// The newest restore point of `vm` in the repository.
async fn previous_point(repo: &Repo, vm: &Vm) -> Result<Option<Manifest>, OrchError> {
    let Some(uuid) = vm.instance_uuid.clone() else { return Ok(None) };
    let repo = repo.clone();
    let points = blocking(move || repo.points()).await?;
    Ok(points.into_iter().rev().find(|p| p.source.instance_uuid.as_deref() == Some(uuid.as_str())))
}

/// Plans every disk of a backup of `vm` into `repo` (see [`disk_facts`]).
async fn plan_backup(
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
    let vm = one_vm(ctx, vm).await?;
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

/// How a VM's frozen disks are read: over HTTPS from their datastore, through VDDK, or from
/// NBD exports the operator serves.
enum Reader {
    Https { reader: vsphere::datastore::DatastoreReader, datacenter: String },
    Vddk(Arc<vsphere_io::VddkVm>),
    Nbd { template: String, vm: Box<Vm> },
}

impl Reader {
    /// Connects the VM's reader as of `snap` (VDDK when the job has it).
    async fn for_vm(ctx: &JobContext, vm: &Vm, snap: &MoRef, datacenter: &str) -> Result<Self, OrchError> {
        if let Some(template) = &ctx.nbd {
            return Ok(Self::Nbd { template: template.clone(), vm: Box::new(vm.clone()) });
        }
        let Some(vddk) = ctx.vddk.clone() else {
            return Ok(Self::Https { reader: ctx.client.datastore_reader()?, datacenter: datacenter.to_owned() });
        };
        let (client, vm, snap) = (ctx.client.clone(), vm.moref.clone(), snap.clone());
        let conn = tokio::task::spawn_blocking(move || vsphere_io::VddkVm::connect(&vddk, &client, &vm, &snap))
            .await
            .map_err(|e| OrchError::Refused(format!("VDDK's connect did not finish: {e}")))??;
        Ok(Self::Vddk(Arc::new(conn)))
    }

    /// Opens one frozen disk: the source and how it is read.
    async fn open(&self, f: &DiskFacts, snap: &MoRef) -> Result<(Arc<dyn pipeline::BlockSource>, String), OrchError> {
        match self {
            Self::Https { reader, datacenter } => {
                let (source, layers) =
                    open_frozen(reader.clone(), datacenter, &f.frozen_file, f.disk.capacity, snap.to_string()).await?;
                let how = if layers == 1 { "https".to_owned() } else { format!("https, {layers} layers") };
                Ok((source, how))
            }
            Self::Vddk(conn) => {
                let (conn, path, capacity, id) =
                    (conn.clone(), f.frozen_file.clone(), f.disk.capacity, snap.to_string());
                let source = tokio::task::spawn_blocking(move || conn.open(&path, capacity, id))
                    .await
                    .map_err(|e| OrchError::Refused(format!("VDDK's open did not finish: {e}")))??;
                let how = format!("vddk:{}", source.transport());
                Ok((Arc::new(source), how))
            }
            Self::Nbd { template, vm } => {
                let uri = nbd_uri(template, vm, snap, &f.slot);
                let source = blockio::NbdSource::connect(&uri, 2, Some(snap.to_string()))
                    .await
                    .map_err(|e| OrchError::Refused(format!("{}: the NBD export {uri}: {e}", f.slot)))?;
                if pipeline::BlockSource::size(&source) < f.disk.capacity {
                    return Err(OrchError::Refused(format!(
                        "{}: the NBD export {uri} holds {} bytes, the disk is {}",
                        f.slot,
                        pipeline::BlockSource::size(&source),
                        f.disk.capacity
                    )));
                }
                Ok((Arc::new(source), format!("nbd:{uri}")))
            }
        }
    }
}

async fn copy_under(
    ctx: &JobContext,
    vm: &Vm,
    snap: &MoRef,
    consistency: Consistency,
    job: &str,
    report: &mut VmReport,
) -> Result<Manifest, OrchError> {
    let repo = ctx.repo()?;
    let previous = previous_point(repo, vm).await?;
    let planned = plan_backup(ctx, repo, vm, Some(snap), previous.as_ref(), &mut report.warnings).await?;
    let datacenter = datacenter_of(&ctx.client, vm).await?;
    let parent = previous.as_ref().map(|p| p.id.clone());
    let specs: Vec<DiskSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let (r, key, job, source) = (repo.clone(), vm_key(&ctx.client, vm), job.to_owned(), snap.to_string());
    let (mut backup, mut done, notes) =
        blocking(move || begin_or_resume(&r, key.as_deref(), &job, &source, parent.as_deref(), specs)).await?;
    report.warnings.extend(notes);
    let reader = ctx.client.datastore_reader()?;
    let disks = Reader::for_vm(ctx, vm, snap, &datacenter).await?;
    for (file, data) in config_files(&reader, &datacenter, vm, report).await {
        backup = blocking(move || backup.add_file(&file, &data).map(|()| backup)).await?;
    }
    for (n, p) in planned.into_iter().enumerate() {
        let Some(plan) = p.plan else {
            return Err(OrchError::Refused(format!("{}: no plan under the snapshot", p.facts.slot)));
        };
        let full = matches!(plan, CopyPlan::Full { .. });
        let (read, zero) = match plan {
            CopyPlan::Full { read, zero, .. } | CopyPlan::Incremental { read, zero } => (read, zero),
        };
        let sink = backup.sink(n).ok_or_else(|| OrchError::Refused(format!("no sink for {}", p.facts.slot)))?;
        let progress = Arc::new(Progress::child_of(ctx.metrics.progress.clone()));
        let copying = ctx.metrics.track(format!("{} {}", vm.name, p.facts.slot), progress.clone());
        let (source, transport) = disks.open(&p.facts, snap).await?;
        let job = DiskCopy {
            read,
            zero,
            digests: Digests::zeros(sink.granularity().get(), p.facts.disk.capacity),
            done: done.get_mut(n).map(std::mem::take).unwrap_or_default(),
            checkpoint: backup.checkpointer(n),
            source,
            sink: sink.clone(),
        };
        // A restore point keeps no digests of its own; a plain repository's sink takes them
        // as its chunk IDs anyway, an encrypted one's are keyed.
        let options = CopyOptions { digests: false, ..ctx.options.clone() };
        let r = copy_disk(job, &ctx.engine, &options, progress).await?;
        if r.resumed > 0 {
            report.warnings.push(format!("{}: {} bytes were stored before the interruption", p.facts.slot, r.resumed));
        }
        sink.commit().await?;
        drop(copying);
        ctx.metrics.disk_copied();
        let stats = sink.stats();
        report.disks.push(DiskReport {
            name: p.facts.slot,
            full,
            plan: p.words,
            read: r.read,
            stored_chunks: stats.stored_chunks,
            stored_bytes: stats.stored_bytes,
            transport,
        });
    }
    let source = SourceInfo { name: vm.name.clone(), instance_uuid: vm.instance_uuid.clone() };
    let m = blocking(move || backup.finish(source, consistency)).await?;
    clear_reset(ctx, vm, report).await;
    Ok(m)
}

/// Begins the backup into `repo`, keeping its progress in session `key`; or finishes the backup
/// that session holds, when `job` made it under the same frozen `source` on the same `parent`,
/// returning per disk what is already stored. Any other session of the VM is dropped: its
/// snapshot is gone, and the copy is planned again from the last restore point.
fn begin_or_resume(
    repo: &Repo,
    key: Option<&str>,
    job: &str,
    source: &str,
    parent: Option<&str>,
    specs: Vec<DiskSpec>,
) -> Result<(repo::Backup, Vec<cbt::ExtentSet>, Vec<String>), repo::RepoError> {
    let none = vec![cbt::ExtentSet::new(); specs.len()];
    let Some(key) = key else { return Ok((repo.begin(parent, specs)?, none, Vec::new())) };
    let mut notes = Vec::new();
    if let Some(s) = repo.session(key)? {
        if s.job == job && s.source == source && s.parent.as_deref() == parent {
            match repo.resume(key, specs.clone()) {
                Ok((backup, done)) => {
                    let stored: u64 = done.iter().map(cbt::ExtentSet::total_bytes).sum();
                    notes.push(format!("finishing the backup job {job} began: {stored} bytes were already stored"));
                    return Ok((backup, done, notes));
                }
                Err(repo::RepoError::Conflict(why)) => notes.push(why),
                Err(e) => return Err(e),
            }
        } else {
            notes.push(format!(
                "dropped the unfinished backup of job {} (its snapshot is gone); planned from the last restore point",
                s.job
            ));
        }
        repo.drop_session(key)?;
    }
    let mut backup = repo.begin(parent, specs)?;
    backup.keep_progress(key, job, source)?;
    Ok((backup, none, notes))
}

/// Brings `vm`'s replica disks up to date from `snap`: per disk, the sync state says what the
/// replica holds; CBT's changes since then are copied (all allocated data the first time, or
/// when CBT cannot be trusted); the state is committed only after the replica is durable. A
/// replica interrupted mid-copy stays marked dirty until a sync completes.
async fn replicate_under(
    ctx: &JobContext,
    target: &ReplicaTarget,
    vm: &Vm,
    snap: &MoRef,
    job: &str,
    report: &mut VmReport,
) -> Result<(), OrchError> {
    let vcenter = ctx.client.content().about.instance_uuid.clone();
    let vm_dir = target.vm_dir(vm);
    std::fs::create_dir_all(&vm_dir)
        .map_err(|e| OrchError::Refused(format!("cannot create {}: {e}", vm_dir.display())))?;
    let path_of = |slot: &str| target.disk_path(vm, slot);
    let key_of = |slot: &str| {
        target
            .key(&vcenter, vm, slot)
            .ok_or_else(|| OrchError::Refused(format!("{} has no instance UUID to key its replica by", vm.name)))
    };
    let granularity = target.sink.granularity;
    let facts = disk_facts(
        ctx,
        vm,
        Some(snap),
        |_, slot| {
            let state = target.state.load(&key_of(slot)?)?;
            let committed = state.as_ref().and_then(|s| s.committed.clone());
            let holds_data = path_of(slot).metadata().is_ok_and(|m| m.len() > 0);
            Ok((committed, Destination { granularity, holds_data }))
        },
        &mut report.warnings,
    )
    .await?;
    let datacenter = datacenter_of(&ctx.client, vm).await?;
    let reader = ctx.client.datastore_reader()?;
    let disks = Reader::for_vm(ctx, vm, snap, &datacenter).await?;
    for (file, data) in config_files(&reader, &datacenter, vm, report).await {
        durable::write_atomic(&vm_dir.join(file), &data)?;
    }
    for mut f in facts {
        let Some(changes) = f.changes.take() else {
            return Err(OrchError::Refused(format!("{}: no changes under the snapshot", f.slot)));
        };
        let (path, size, options) = (path_of(&f.slot), f.disk.capacity, target.sink);
        let sink = blocking(move || FileSink::open(path, size, options)).await?;
        let progress = Arc::new(Progress::child_of(ctx.metrics.progress.clone()));
        let copying = ctx.metrics.track(format!("{} {}", vm.name, f.slot), progress.clone());
        let (source, transport) = disks.open(&f, snap).await?;
        let job = SyncJob {
            source,
            sink: Arc::new(sink),
            store: target.state.clone(),
            key: key_of(&f.slot)?,
            job: job.to_owned(),
            current: f.current,
            changes,
        };
        let out = sync(job, &ctx.engine, &ctx.options, progress).await?;
        drop(copying);
        ctx.metrics.disk_copied();
        report.warnings.extend(out.warnings.iter().map(|w| format!("{}: {w}", f.slot)));
        if out.resumed {
            report.warnings.push(format!("{}: resumed from its checkpoint", f.slot));
        }
        report.disks.push(DiskReport {
            name: f.slot,
            full: out.full_reason.is_some(),
            plan: out.full_reason.map_or_else(|| "incremental".to_owned(), |r| format!("full ({r})")),
            read: out.report.read,
            stored_chunks: 0,
            stored_bytes: out.report.written,
            transport,
        });
    }
    report.replica = Some(vm_dir);
    clear_reset(ctx, vm, report).await;
    Ok(())
}

/// The VM's configuration files, by file name: its `.vmx` (a warning when it cannot be read)
/// and the `.nvram` beside it (its firmware settings; a VM that never booted may have none).
async fn config_files(
    reader: &vsphere::datastore::DatastoreReader,
    datacenter: &str,
    vm: &Vm,
    report: &mut VmReport,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Some(vmx) = &vm.vmx_path else { return out };
    let name_of = |path: &str| path.rsplit('/').next().unwrap_or(path).trim_start_matches("] ").to_owned();
    match read_file(reader, datacenter, vmx).await {
        Ok(data) => out.push((name_of(vmx), data)),
        Err(e) => report.warnings.push(format!("the configuration file {vmx} was not captured: {e}")),
    }
    if let Some(stem) = vmx.strip_suffix(".vmx") {
        let nvram = format!("{stem}.nvram");
        match read_file(reader, datacenter, &nvram).await {
            Ok(data) => out.push((name_of(&nvram), data)),
            Err(e) => tracing::info!("{}: no firmware settings captured ({nvram}: {e})", vm.name),
        }
    }
    out
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
