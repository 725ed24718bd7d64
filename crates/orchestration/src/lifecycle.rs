//! A job's lifecycle, the one every caller runs (`proxy backup`, `proxy replicate`, each run of
//! the `serve` daemon): log in, select the VMs (a selector that finds none is reported as a
//! failure of its own, not fatal), build the job's context, then either remove the stale
//! snapshots of ours or run the job within its limits, sweep whatever snapshot the job still
//! holds (a cancelled or abandoned run), and report. Callers only turn their arguments or
//! configuration into a [`JobSpec`] and print or record the [`JobRun`].

use std::sync::Arc;
use std::time::Duration;

use pipeline::{CopyOptions, Engine};
use serde::Serialize;
use serde_json::Value;
use vsphere::{Client, ConnectOptions, Credentials, MoRef};

use crate::OrchError;
use crate::context::{DiskFilter, JobContext};
use crate::hooks::Hooks;
use crate::job::{JobReport, Selection, Selector, buffer_budget, clean_stale, report_missing};
use crate::job::{run_job, select, sweep_own_snapshots};
use crate::limits::Limits;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::report::VmReport;
use crate::target::Target;

/// How to reach and log in to a vSphere server.
#[derive(Debug, Clone)]
pub struct Login {
    /// The server and how it is trusted.
    pub options: ConnectOptions,
    /// The account.
    pub credentials: Credentials,
}

impl Login {
    /// Connects and logs in.
    pub async fn client(self) -> Result<Client, OrchError> {
        let url = self.options.url.clone();
        let client = Client::connect(&self.options)
            .await
            .map_err(|source| OrchError::Unreachable { url: url.clone(), source })?;
        let user = self.credentials.user.clone();
        client.login(self.credentials).await.map_err(|source| OrchError::LoginRefused { url, user, source })?;
        Ok(client)
    }
}

/// Where a job's copy buffers come from.
#[derive(Debug, Clone)]
pub enum Buffers {
    /// An engine shared with other jobs (the daemon's).
    Shared(Arc<Engine>),
    /// A whole-process memory budget in bytes: the buffers get what the VMs worked on at once
    /// leave of it ([`buffer_budget`]).
    Memory(u64),
}

/// What a job is: the server, the VMs, and how they are copied.
#[derive(Debug)]
pub struct JobSpec {
    /// The server.
    pub login: Login,
    /// The VMs named.
    pub selectors: Vec<Selector>,
    /// Every VM the account can see instead.
    pub all: bool,
    /// This proxy's ID in snapshot and lease names.
    pub proxy_id: String,
    /// This run's ID.
    pub job_id: String,
    /// VMs worked on at once by this job.
    pub concurrency: usize,
    /// The copy buffers.
    pub buffers: Buffers,
    /// Copy options (default: [`CopyOptions::default`]).
    pub options: Option<CopyOptions>,
    /// Limits shared with the process's other jobs (default: a job's own).
    pub limits: Option<Arc<Limits>>,
    /// Counters shared with the process's other jobs (default: the job's own).
    pub metrics: Option<Arc<Metrics>>,
    /// The longest a job may run.
    pub max_job: Duration,
    /// Which disks of each VM.
    pub disks: DiskFilter,
    /// Read through VDDK instead of HTTPS.
    pub vddk: Option<Arc<vddk::Vddk>>,
    /// Read through NBD exports: the URI template.
    pub nbd: Option<String>,
    /// Pin DRS-movable VMs while they are read.
    pub pin_drs: bool,
    /// The freeze and thaw hooks.
    pub hooks: Hooks,
}

/// A job logged in, with its VMs found and its context built, ready to run.
#[derive(Debug)]
pub struct Job {
    /// The job's context (client, target, engine, limits, counters).
    pub ctx: JobContext,
    /// The VMs found, and the selectors that found none.
    pub selection: Selection,
    concurrency: usize,
}

/// What a running job tells its caller, for progress views and logs.
#[derive(Debug, Clone, Copy)]
pub enum JobEvent<'a> {
    /// The copies start.
    Started {
        /// The job's tag (`<proxy>-<job>`).
        tag: &'a str,
        /// How many VMs.
        vms: usize,
        /// At most this many at once.
        concurrency: usize,
    },
    /// The copies ended (or were abandoned); the sweep of the job's snapshots comes next.
    Copied,
}

/// What a run did.
#[derive(Debug)]
pub struct JobRun {
    /// Per VM (the selectors that found none included, as failures).
    pub report: JobReport,
    /// The caller stopped waiting for the copies (the report then holds only the selectors
    /// that found none).
    pub abandoned: bool,
    /// Snapshots of the job removed, and DRS settings put back, after the copies.
    pub swept: Vec<String>,
    /// What could not be removed or put back (the next run's hygiene removes it).
    pub unswept: Vec<String>,
}

/// The context of a job: the one place a [`JobContext`] is built from a [`JobSpec`].
fn context(spec: JobSpec, client: Arc<Client>, target: Target, engine: Arc<Engine>) -> JobContext {
    let mut b = JobContext::builder(client, target, &spec.proxy_id, &spec.job_id, engine)
        .max_job(spec.max_job)
        .disks(spec.disks)
        .vddk(spec.vddk)
        .nbd(spec.nbd)
        .pin_drs(spec.pin_drs)
        .hooks(spec.hooks);
    if let Some(options) = spec.options {
        b = b.options(options);
    }
    if let Some(limits) = spec.limits {
        b = b.limits(limits);
    }
    if let Some(metrics) = spec.metrics {
        b = b.metrics(metrics);
    }
    b.build()
}

impl Job {
    /// Logs in, selects the VMs, opens the target (after the login and selection, so a
    /// server that cannot be reached is what is reported first) and builds the context.
    pub async fn prepare<E: From<OrchError>>(
        spec: JobSpec,
        open_target: impl FnOnce() -> Result<Target, E>,
    ) -> Result<Self, E> {
        let client = Arc::new(spec.login.clone().client().await?);
        let selection = select(&client, &spec.selectors, spec.all).await?;
        let target = open_target()?;
        let concurrency = spec.concurrency;
        let engine = match &spec.buffers {
            Buffers::Shared(engine) => engine.clone(),
            Buffers::Memory(memory) => {
                Arc::new(Engine::new(buffer_budget(*memory, concurrency.min(selection.vms.len().max(1)))))
            }
        };
        Ok(Self { ctx: context(spec, client, target, engine), selection, concurrency })
    }

    /// The VMs' morefs.
    pub fn morefs(&self) -> Vec<MoRef> {
        self.selection.morefs()
    }

    /// Removes the stale snapshots of ours that dead jobs left on the job's VMs (what a daemon
    /// does when it starts): per VM, what was removed and what was noticed.
    pub async fn clean_stale(&self) -> Result<Vec<VmReport>, OrchError> {
        clean_stale(&self.ctx, &self.morefs()).await
    }

    /// Runs the job: at most its concurrency at once, within the context's limits. Cancelling
    /// the engine stops the copies cleanly; once `abandon` completes the copies are dropped
    /// where they are. Either way every snapshot of the job is then swept, and each selector
    /// that found no VM is added to the report as a failure.
    pub async fn run(
        &self,
        abandon: impl Future<Output = ()>,
        mut on_event: impl FnMut(JobEvent<'_>),
    ) -> Result<JobRun, OrchError> {
        let refs = self.morefs();
        let tag = self.ctx.tag();
        on_event(JobEvent::Started { tag: &tag, vms: refs.len(), concurrency: self.concurrency });
        let (mut report, abandoned) = tokio::select! {
            r = run_job(&self.ctx, &refs, self.concurrency) => (r?, false),
            () = abandon => (JobReport { job: tag, vms: Vec::new(), seconds: 0.0 }, true),
        };
        on_event(JobEvent::Copied);
        // Whatever ended the job, no snapshot of it may stay.
        let (swept, unswept) = sweep_own_snapshots(&self.ctx, &refs).await;
        report_missing(&self.ctx, &mut report, &self.selection.missing);
        Ok(JobRun { report, abandoned, swept, unswept })
    }
}

/// A VM's result in a word: `failed`, `warning` (done, with notes) or `ok`.
pub fn vm_result(r: &VmReport) -> &'static str {
    if r.error.is_some() {
        "failed"
    } else if r.warnings.is_empty() {
        "ok"
    } else {
        "warning"
    }
}

/// What every record of a VM's result says.
#[derive(Serialize)]
struct VmRecord<'a> {
    vm: &'a str,
    result: &'static str,
    restore_point: Option<&'a str>,
    replica: Option<String>,
    consistency: Option<String>,
    warnings: &'a [String],
    error: Option<&'a str>,
    snapshot_removed: bool,
    seconds: f64,
}

impl<'a> VmRecord<'a> {
    fn of(r: &'a VmReport) -> Self {
        Self {
            vm: &r.vm,
            result: vm_result(r),
            restore_point: r.point.as_deref(),
            replica: r.replica.as_ref().map(|p| p.display().to_string()),
            consistency: r.consistency.map(|c| format!("{c:?}").to_lowercase()),
            warnings: &r.warnings,
            error: r.error.as_deref(),
            snapshot_removed: r.snapshot_removed,
            seconds: r.seconds,
        }
    }
}

/// A VM in a job's full report: per disk what was copied.
#[derive(Serialize)]
struct VmDetail<'a> {
    #[serde(flatten)]
    record: VmRecord<'a>,
    disks: Vec<DiskDetail<'a>>,
    stale_snapshots_removed: &'a [String],
}

#[derive(Serialize)]
struct DiskDetail<'a> {
    name: &'a str,
    full: bool,
    plan: &'a str,
    read: u64,
    transport: &'a str,
    stored_chunks: u64,
    stored_bytes: u64,
}

/// A VM in a run's history: totals over its disks.
#[derive(Serialize)]
struct VmTotals<'a> {
    #[serde(flatten)]
    record: VmRecord<'a>,
    read: u64,
    stored: u64,
    full_disks: usize,
    disks: usize,
}

#[derive(Serialize)]
struct JobDetail<'a> {
    job: &'a str,
    outcome: String,
    seconds: f64,
    vms: Vec<VmDetail<'a>>,
    disks_copying_peak: u64,
    bytes_read: u64,
}

/// Turns a record into JSON (a plain structure of strings, numbers and lists cannot fail).
fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

impl JobReport {
    /// The whole report as JSON (what `--json` prints): the outcome, and per VM its result,
    /// restore point or replica and what each disk copied; `m` adds the job's counters.
    pub fn to_json(&self, m: &MetricsSnapshot) -> Value {
        let vms = self
            .vms
            .iter()
            .map(|r| VmDetail {
                record: VmRecord::of(r),
                disks: r
                    .disks
                    .iter()
                    .map(|d| DiskDetail {
                        name: &d.name,
                        full: d.full,
                        plan: &d.plan,
                        read: d.read,
                        transport: &d.transport,
                        stored_chunks: d.stored_chunks,
                        stored_bytes: d.stored_bytes,
                    })
                    .collect(),
                stale_snapshots_removed: &r.stale_removed,
            })
            .collect();
        to_value(JobDetail {
            job: &self.job,
            outcome: format!("{:?}", self.outcome()).to_lowercase(),
            seconds: self.seconds,
            vms,
            disks_copying_peak: m.disks_copying_peak,
            bytes_read: m.bytes_read,
        })
    }

    /// Per VM, its result with totals over its disks (what a daemon's history keeps).
    pub fn vm_totals(&self) -> Vec<Value> {
        self.vms
            .iter()
            .map(|r| {
                to_value(VmTotals {
                    record: VmRecord::of(r),
                    read: r.disks.iter().map(|d| d.read).sum(),
                    stored: r.disks.iter().map(|d| d.stored_bytes).sum(),
                    full_disks: r.disks.iter().filter(|d| d.full).count(),
                    disks: r.disks.len(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::DiskReport;

    fn report() -> JobReport {
        let disk = |full, read| DiskReport {
            name: "scsi0:0".into(),
            full,
            plan: "full: first backup".into(),
            read,
            stored_chunks: 2,
            stored_bytes: 7,
            transport: "https".into(),
        };
        JobReport {
            job: "p-j".into(),
            vms: vec![
                VmReport {
                    vm: "a".into(),
                    point: Some("a-1".into()),
                    disks: vec![disk(true, 10), disk(false, 5)],
                    warnings: vec!["cbt".into()],
                    snapshot_removed: true,
                    seconds: 1.5,
                    ..VmReport::default()
                },
                VmReport { vm: "b".into(), error: Some("gone".into()), ..VmReport::default() },
            ],
            seconds: 2.0,
        }
    }

    #[test]
    fn the_json_report_names_each_vm_and_disk() {
        let m = MetricsSnapshot { disks_copying_peak: 3, bytes_read: 15, ..MetricsSnapshot::default() };
        let j = report().to_json(&m);
        assert_eq!(j["outcome"], "some");
        assert_eq!(j["disks_copying_peak"], 3);
        assert_eq!(j["vms"][0]["result"], "warning");
        assert_eq!(j["vms"][0]["restore_point"], "a-1");
        assert_eq!(j["vms"][0]["disks"][1]["read"], 5);
        assert_eq!(j["vms"][0]["disks"][0]["transport"], "https");
        assert_eq!(j["vms"][1]["result"], "failed");
        assert_eq!(j["vms"][1]["error"], "gone");
        assert!(j["vms"][1]["replica"].is_null());
    }

    #[test]
    fn the_history_keeps_totals_per_vm() {
        let v = report().vm_totals();
        assert_eq!(v[0]["read"], 15);
        assert_eq!(v[0]["stored"], 14);
        assert_eq!(v[0]["full_disks"], 1);
        assert_eq!(v[0]["disks"], 2);
        assert_eq!(v[1]["result"], "failed");
        assert!(v[1].get("stale_snapshots_removed").is_none());
    }
}
