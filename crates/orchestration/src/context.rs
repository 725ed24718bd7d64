//! What a job shares across its VMs ([`JobContext`]): the session, the target, the copy engine
//! and options, the limits and counters, the disk selection, how disks are read, the hooks; and
//! the names this job gives its lease and snapshots.

use std::sync::Arc;
use std::time::Duration;

use durable::{JobLease, Store};
use pipeline::{CopyOptions, Engine};
use repo::Repo;
use vsphere::{Client, MoRef, Vm};

use crate::OrchError;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::support::blocking;
use crate::target::{Target, VmWrite};

/// What every snapshot of ours is named with, first.
pub const SNAPSHOT_PREFIX: &str = "syncproxy";

/// What a job shares across its VMs. Built with [`JobContext::builder`] (every setting has a
/// default but the five it takes); read through its getters.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// A logged-in session.
    pub(crate) client: Arc<Client>,
    /// Where the VMs go (and where running jobs hold their leases).
    pub(crate) target: Target,
    /// This proxy's ID (in snapshot names).
    pub(crate) proxy_id: String,
    /// This job's ID (in snapshot names); unique per run.
    pub(crate) job_id: String,
    /// The copy engine (one buffer pool for the process).
    pub(crate) engine: Arc<Engine>,
    /// How copies run; by default a transient failure is retried for [`pipeline::PATIENCE`], so a
    /// busy host or an S3 gateway that restarts does not fail the job.
    pub(crate) options: CopyOptions,
    /// The longest a job may run: an orphaned snapshot of ours younger than this is left alone.
    pub(crate) max_job: Duration,
    /// The process's counters.
    pub(crate) metrics: Arc<Metrics>,
    /// How many VMs may run at once, over every job of the process.
    pub(crate) limits: Arc<Limits>,
    /// Which disks of each VM to copy.
    pub(crate) disks: DiskFilter,
    /// Read disks through VDDK instead of HTTPS datastore reads, when set.
    pub(crate) vddk: Option<Arc<vddk::Vddk>>,
    /// Or read each disk from an NBD export: a URI template with `{vm}`, `{moref}`, `{uuid}`,
    /// `{snapshot}` and `{disk}` (the slot, `scsi0-1`), for NBD servers the operator runs
    /// (nbdkit's VDDK plugin, for instance) over the frozen disks.
    pub(crate) nbd: Option<String>,
    /// Override each VM's DRS automation to manual while it is read, where DRS could move it
    /// (and put it back after); on by default.
    pub(crate) pin_drs: bool,
    /// Freeze hooks around each VM's snapshot.
    pub(crate) hooks: crate::hooks::Hooks,
}

/// Builds a [`JobContext`]: `JobContext::builder(..)`, the settings that differ from the
/// defaults, then [`build`](Self::build).
#[derive(Debug, Clone)]
#[must_use]
pub struct JobContextBuilder(JobContext);

impl JobContextBuilder {
    /// How copies run.
    pub fn options(mut self, options: CopyOptions) -> Self {
        self.0.options = options;
        self
    }

    /// The longest a job may run: an orphaned snapshot of ours younger than this is left alone.
    pub fn max_job(mut self, max_job: Duration) -> Self {
        self.0.max_job = max_job;
        self
    }

    /// The process's counters.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.0.metrics = metrics;
        self
    }

    /// How many VMs may run at once, over every job of the process.
    pub fn limits(mut self, limits: Arc<Limits>) -> Self {
        self.0.limits = limits;
        self
    }

    /// Which disks of each VM to copy.
    pub fn disks(mut self, disks: DiskFilter) -> Self {
        self.0.disks = disks;
        self
    }

    /// Read disks through VDDK instead of HTTPS datastore reads, when set.
    pub fn vddk(mut self, vddk: Option<Arc<vddk::Vddk>>) -> Self {
        self.0.vddk = vddk;
        self
    }

    /// Or read each disk from an NBD export: a URI template with `{vm}`, `{moref}`, `{uuid}`,
    /// `{snapshot}` and `{disk}` (the slot, `scsi0-1`), for NBD servers the operator runs
    /// (nbdkit's VDDK plugin, for instance) over the frozen disks.
    pub fn nbd(mut self, nbd: Option<String>) -> Self {
        self.0.nbd = nbd;
        self
    }

    /// Override each VM's DRS automation to manual while it is read, where DRS could move it
    /// (and put it back after); on by default.
    pub fn pin_drs(mut self, pin_drs: bool) -> Self {
        self.0.pin_drs = pin_drs;
        self
    }

    /// Freeze hooks around each VM's snapshot.
    pub fn hooks(mut self, hooks: crate::hooks::Hooks) -> Self {
        self.0.hooks = hooks;
        self
    }

    /// The context.
    pub fn build(self) -> JobContext {
        self.0
    }
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
    /// A job to `target` with default copy options, a 24-hour longest job, fresh counters and
    /// limits, every disk, HTTPS reads, DRS pinning on and no hooks; the builder's methods
    /// change those.
    pub fn builder(
        client: Arc<Client>,
        target: Target,
        proxy_id: &str,
        job_id: &str,
        engine: Arc<Engine>,
    ) -> JobContextBuilder {
        JobContextBuilder(Self {
            client,
            target,
            proxy_id: proxy_id.to_owned(),
            job_id: job_id.to_owned(),
            engine,
            options: CopyOptions { retry_for: pipeline::PATIENCE, ..CopyOptions::default() },
            max_job: Duration::from_secs(24 * 3600),
            metrics: Arc::new(Metrics::default()),
            limits: Arc::new(Limits::default()),
            disks: DiskFilter::default(),
            vddk: None,
            nbd: None,
            pin_drs: true,
            hooks: crate::hooks::Hooks::default(),
        })
    }

    /// A backup job into `repo` with every default (see [`JobContext::builder`]).
    pub fn new(client: Arc<Client>, repo: Repo, proxy_id: &str, job_id: &str, engine: Arc<Engine>) -> Self {
        Self::builder(client, Target::Repository(repo), proxy_id, job_id, engine).build()
    }

    /// A logged-in session.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Where the VMs go (and where running jobs hold their leases).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// This proxy's ID (in snapshot names).
    pub fn proxy_id(&self) -> &str {
        &self.proxy_id
    }

    /// This job's ID (in snapshot names); unique per run.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The copy engine (one buffer pool for the process).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// How copies run.
    pub fn options(&self) -> &CopyOptions {
        &self.options
    }

    /// The longest a job may run: an orphaned snapshot of ours younger than this is left alone.
    pub fn max_job(&self) -> Duration {
        self.max_job
    }

    /// The process's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How many VMs may run at once, over every job of the process.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Which disks of each VM to copy.
    pub fn disks(&self) -> &DiskFilter {
        &self.disks
    }

    /// Read disks through VDDK instead of HTTPS datastore reads, when set.
    pub fn vddk(&self) -> Option<&Arc<vddk::Vddk>> {
        self.vddk.as_ref()
    }

    /// Or read each disk from an NBD export: a URI template with `{vm}`, `{moref}`, `{uuid}`,
    /// `{snapshot}` and `{disk}` (the slot, `scsi0-1`), for NBD servers the operator runs
    /// (nbdkit's VDDK plugin, for instance) over the frozen disks.
    pub fn nbd(&self) -> Option<&str> {
        self.nbd.as_deref()
    }

    /// Override each VM's DRS automation to manual while it is read, where DRS could move it
    /// (and put it back after); on by default.
    pub fn pin_drs(&self) -> bool {
        self.pin_drs
    }

    /// Freeze hooks around each VM's snapshot.
    pub fn hooks(&self) -> &crate::hooks::Hooks {
        &self.hooks
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
        self.target.backend().leases()
    }

    /// The vCenter's instance UUID (part of the keys of per-VM records).
    pub(crate) fn vcenter(&self) -> String {
        self.client.content().about.instance_uuid.clone()
    }

    /// Opens the copy (or plan) of `vm` in the target.
    pub(crate) async fn open_vm(&self, vm: &Vm) -> Result<Box<dyn VmWrite>, OrchError> {
        let (vcenter, target, vm) = (self.vcenter(), self.target.clone(), vm.clone());
        blocking(move || target.backend().open_vm(&vcenter, &vm)).await
    }

    /// Takes this job's lease.
    pub(crate) async fn lease(&self) -> Result<JobLease, OrchError> {
        let (tag, target) = (self.tag(), self.target.clone());
        blocking(move || target.backend().lease(&tag)).await
    }
}
