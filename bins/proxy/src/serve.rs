//! `proxy serve --config FILE`: the daemon. It runs each configured job on its schedule (a
//! repository backup with a prune after it, or a replica sync), removes stale snapshots of
//! ours when it starts (in the background, per vCenter, before that vCenter's jobs), and
//! serves job status, history and Prometheus metrics over HTTP behind a bearer token, with
//! bounded connections and timeouts. Drill jobs (`[[drill]]`) boot the newest restore point of
//! each chosen VM on their own schedule (`serve_drill`). SIGTERM or Ctrl-C stops it
//! gracefully: no new job starts, running copies stop, every snapshot is removed, a drill's VM
//! is stopped, and it exits 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use orchestration::config::{JobConfig, Schedule, ServeConfig, VcenterConfig};
use orchestration::{Buffers, Job, JobEvent, JobReport, JobSpec, Limits, Metrics, Outcome, Selector, Target};
use pipeline::Engine;
use pipeline::limit::{RateLimiter, ReleaseCpuTime};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::history::{History, label};
use crate::notify::Notifier;
use crate::serve_drill::{DrillRunner, DrillStats};
use crate::serve_upkeep::{Upkeep, UpkeepRunner};
use crate::server_args::{ServerArgs, read_secret_file, secret_file_warning};

/// Options of `proxy serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The configuration file (TOML; see `proxy config check`).
    #[arg(long)]
    config: PathBuf,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    // VDDK, when configured, is loaded before any thread starts (it may re-execute the process).
    let loaded = load(&args.config).and_then(|c| {
        let vddk = crate::backup_cmd::load_vddk(c.proxy.vddk_libdir.as_deref(), c.proxy.vddk_config.as_deref())?;
        Ok((c, vddk))
    });
    let (config, vddk) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("proxy serve: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    crate::block_on("serve", serve(config, vddk))
}

/// Reads and checks a configuration file (bounded: a configuration is small).
pub(crate) fn load(path: &Path) -> Result<ServeConfig> {
    let (config, problems) = load_with_problems(path)?;
    if !problems.is_empty() {
        bail!("{} is not a valid configuration: {}", path.display(), problems.join("\n"));
    }
    Ok(config)
}

/// Reads a configuration file with a bound, and parses it; every problem comes back with it.
pub(crate) fn load_with_problems(path: &Path) -> Result<(ServeConfig, Vec<String>)> {
    use std::io::Read as _;
    let max = orchestration::config::MAX_CONFIG_BYTES as u64;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} is larger than {max} bytes: not a configuration file", path.display());
    }
    let text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    ServeConfig::from_toml_with_problems(&text)
        .with_context(|| format!("{} is not a valid configuration", path.display()))
}

/// The token from its file (first line, the file read with a bound), refused when short.
pub(crate) fn read_token(path: &Path) -> Result<String> {
    let token = read_secret_file(path, "token file")?.trim().to_owned();
    if token.len() < 16 {
        bail!("the token in {} is shorter than 16 characters", path.display());
    }
    Ok(token)
}

/// A warning for each secret file of `config` its group or others may read.
pub(crate) fn secret_file_warnings(config: &ServeConfig) -> Vec<String> {
    let token = secret_file_warning(&config.proxy.token_file, "token file");
    let passwords = config
        .vcenters
        .iter()
        .filter_map(|v| v.password_file.as_deref())
        .map(|f| secret_file_warning(f, "password file"));
    let guests = config
        .jobs
        .iter()
        .filter_map(|j| j.guest_credentials_file.as_deref())
        .map(|f| secret_file_warning(f, "guest credentials file"));
    let notify = config.notify.iter().flat_map(|n| {
        let token = n.token_file.as_deref().map(|f| secret_file_warning(f, "notify token file"));
        let smtp = n
            .email
            .as_ref()
            .and_then(|e| e.password_file.as_deref())
            .map(|f| secret_file_warning(f, "SMTP password file"));
        [token, smtp].into_iter().flatten()
    });
    let mut warnings: Vec<String> =
        std::iter::once(token).chain(passwords).chain(guests).chain(notify).flatten().collect();
    warnings.sort();
    warnings.dedup();
    warnings
}

/// How a configured vCenter is reached, as the command line would say it.
pub(crate) fn server_args(v: &VcenterConfig) -> ServerArgs {
    ServerArgs {
        url: v.url.clone(),
        user: v.user.clone(),
        password_file: v.password_file.clone(),
        thumbprint: v.thumbprint.clone(),
        ca_file: v.ca_file.clone(),
        insecure: v.insecure,
        legacy_tls: v.legacy_tls,
        timeout: Duration::from_secs(300),
        password_env: v.password_env.clone(),
        permissions_warned: true,
    }
}

/// One finished run, as the history keeps it.
fn record(job: &str, started: SystemTime, run: RunResult) -> Value {
    let RunResult { report, error, upkeep, attempts } = run;
    let report = report.as_ref();
    let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let mut vms = report.map(JobReport::vm_totals).unwrap_or_default();
    for (i, v) in vms.iter_mut().enumerate() {
        v["attempts"] = json!(attempts.get(i).copied().unwrap_or(1));
    }
    let outcome = match (report.map(JobReport::outcome), &error) {
        (_, Some(_)) | (None, None) => "failed",
        (Some(Outcome::All), None) => "succeeded",
        (Some(Outcome::Some), None) => "partial",
        (Some(Outcome::None), None) => "failed",
    };
    json!({
        "job": job,
        "run": report.map(|r| r.job.clone()),
        "started": time(started),
        "finished": time(SystemTime::now()),
        "seconds": started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        "outcome": outcome,
        "error": error,
        "vms": vms,
        "upkeep": upkeep,
    })
}

/// What the daemon shares between its schedulers and its HTTP endpoint.
struct State {
    proxy_id: String,
    started: SystemTime,
    metrics: Arc<Metrics>,
    /// Finished runs: in the state folder's `history.jsonl`, its newest part read at startup.
    history: Mutex<History>,
    /// Per job: its schedule text, target, next run, and whether it runs now.
    jobs: Mutex<HashMap<String, JobStatus>>,
    /// Jobs asked to run now (`POST /jobs/NAME/run`).
    triggers: HashMap<String, tokio::sync::Notify>,
    /// The last drill of each VM.
    drills: DrillStats,
    /// `[[notify]]`s, and their deliveries under way (awaited, for a while, at shutdown).
    notifiers: Vec<Arc<Notifier>>,
    deliveries: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The local repositories the configuration names (their free space is in the metrics).
    repositories: Vec<String>,
}

#[derive(Debug, Clone)]
struct JobStatus {
    schedule: String,
    target: String,
    next: Option<SystemTime>,
    running: bool,
    last: Option<Value>,
}

impl State {
    fn finish(&self, job: &str, rec: Value) {
        if rec["kind"] == "drill" {
            self.drills.record(&rec);
        }
        if let Some(s) = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(job) {
            s.running = false;
            s.last = Some(rec.clone());
        }
        let sent: Vec<_> = self.notifiers.iter().filter_map(|n| n.send(&self.proxy_id, &rec)).collect();
        if !sent.is_empty() {
            let mut d = self.deliveries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            d.retain(|h| !h.is_finished());
            d.extend(sent);
        }
        if let Some(why) = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner).append(rec) {
            tracing::warn!("{why}");
        }
    }

    fn status(&self) -> Value {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut names: Vec<&String> = jobs.keys().collect();
        names.sort();
        let m = self.metrics.snapshot();
        json!({
            "proxy": self.proxy_id,
            "started": humantime::format_rfc3339_seconds(self.started).to_string(),
            "jobs": names.iter().map(|n| {
                let s = &jobs[*n];
                json!({
                    "name": n,
                    "schedule": s.schedule,
                    "target": s.target,
                    "running": s.running,
                    "next_run": s.next.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    "last": s.last,
                })
            }).collect::<Vec<_>>(),
            "vms_running": m.vms_running,
            "disks_copying": m.disks_copying,
            "disks_copying_peak": m.disks_copying_peak,
        })
    }

    fn prometheus(&self) -> String {
        let mut text = self.metrics.render_prometheus();
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        text.push_str("# HELP syncproxy_job_running Whether the job runs now.\n# TYPE syncproxy_job_running gauge\n");
        let mut names: Vec<&String> = jobs.keys().collect();
        names.sort();
        for n in &names {
            text.push_str(&format!("syncproxy_job_running{{job=\"{n}\"}} {}\n", u8::from(jobs[*n].running)));
        }
        text.push_str(
            "# HELP syncproxy_job_last_succeeded Whether the job's last run backed up every VM.\n\
             # TYPE syncproxy_job_last_succeeded gauge\n",
        );
        for n in &names {
            if let Some(last) = &jobs[*n].last {
                text.push_str(&format!(
                    "syncproxy_job_last_succeeded{{job=\"{n}\"}} {}\n",
                    u8::from(last["outcome"] == "succeeded")
                ));
            }
        }
        text.push_str(&self.drills.prometheus());
        text.push_str(&self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner).prometheus(&names));
        text.push_str(
            "# HELP syncproxy_repository_free_bytes Space left to an unprivileged writer on a local repository's \
             filesystem.\n# TYPE syncproxy_repository_free_bytes gauge\n",
        );
        for r in &self.repositories {
            // A repository that cannot be looked at now has no line: absent, not zero.
            if let Ok(s) = rustix::fs::statvfs(r.as_str()) {
                let free = s.f_bavail.saturating_mul(s.f_frsize);
                text.push_str(&format!("syncproxy_repository_free_bytes{{repository=\"{}\"}} {free}\n", label(r)));
            }
        }
        text
    }
}

/// Everything one job needs to run again and again.
struct Runner {
    job: JobConfig,
    vcenter: VcenterConfig,
    schedule: Schedule,
    proxy_id: String,
    engine: Arc<Engine>,
    options: pipeline::CopyOptions,
    max_job: Duration,
    max_vms: usize,
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    vddk: Option<Arc<vddk::Vddk>>,
}

impl Runner {
    /// What one run is: the VMs of the job, on its vCenter, with the process's shared engine,
    /// limits and counters.
    fn spec(&self, run_id: &str, only: Option<&[Selector]>) -> Result<JobSpec> {
        let selectors = match only {
            Some(these) => these.to_vec(),
            None => self.job.vms.iter().map(|v| Selector::parse(v)).collect(),
        };
        Ok(JobSpec {
            login: server_args(&self.vcenter).login_spec()?,
            selectors,
            all: self.job.all && only.is_none(),
            proxy_id: self.proxy_id.clone(),
            job_id: format!("{}-{run_id}", self.job.name),
            concurrency: self.max_vms,
            buffers: Buffers::Shared(self.engine.clone()),
            options: Some(self.options.clone()),
            limits: Some(self.limits.clone()),
            metrics: Some(self.metrics.clone()),
            max_job: self.max_job,
            disks: orchestration::DiskFilter {
                include: self.job.include_disks.clone(),
                exclude: self.job.exclude_disks.clone(),
            },
            vddk: self.vddk.clone(),
            nbd: self.job.nbd_url.clone(),
            pin_drs: self.job.pin_drs,
            hooks: self.job.hooks()?,
        })
    }

    /// Logs in and selects one run's VMs (a deleted VM fails alone; the others run).
    async fn prepare(&self, run_id: &str) -> Result<Job> {
        Ok(Job::prepare(self.spec(run_id, None)?, || self.job.open_target()).await?)
    }

    /// One run: the job, its failed VMs tried again (`retries`, `retry_delay`) unless `stop`
    /// says otherwise, then (for a repository with retention) a prune, and a gc when the
    /// prune removed restore points, so retention frees space.
    async fn once(&self, run_id: &str, mut stop: watch::Receiver<bool>) -> RunResult {
        let begun = std::time::Instant::now();
        let (job, mut report, mut found_by) = match self.attempt(run_id, None).await {
            Ok(x) => x,
            Err(e) => return RunResult { error: Some(e), ..RunResult::default() },
        };
        let mut attempts = vec![1u32; report.vms.len()];
        for n in 1..=self.job.retries {
            // Each failed VM again by what found it this time (a VM by its moref, so another
            // VM of the same name is never taken for it; a selector that found none as typed).
            let failed: Vec<usize> = (0..report.vms.len()).filter(|&i| report.vms[i].error.is_some()).collect();
            let Some(again): Option<Vec<Selector>> = failed.iter().map(|&i| found_by.get(i).cloned()).collect() else {
                break;
            };
            if failed.is_empty() || *stop.borrow() {
                break;
            }
            let delay = self.job.retry_delay();
            let names: Vec<&str> = failed.iter().map(|&i| report.vms[i].vm.as_str()).collect();
            tracing::warn!(job = %self.job.name, vms = %names.join(", "), "retry {n} of {} in {}", self.job.retries, humantime::format_duration(delay));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            match self.attempt(&format!("{run_id}r{n}"), Some(&again)).await {
                Ok((_, retried, retried_by)) => {
                    let slots = Slots { vms: &mut report.vms, found_by: &mut found_by, attempts: &mut attempts };
                    merge_retry(slots, &failed, retried.vms, retried_by);
                }
                Err(e) => tracing::warn!(job = %self.job.name, "retry {n} could not start: {e}"),
            }
        }
        report.seconds = begun.elapsed().as_secs_f64();
        let stopping = *stop.borrow();
        let (error, upkeep) = self.after(&job, &report, stopping).await;
        tracing::info!(job = %self.job.name, outcome = %format!("{:?}", report.outcome()).to_lowercase(), seconds = report.seconds, "job ends");
        RunResult { report: Some(report), error, upkeep, attempts }
    }

    /// One attempt at the job's VMs, or only at those `only` selects: the job, its report,
    /// and per entry of the report the selector that finds that VM again (its moref, or for
    /// a selector that found none, that selector).
    async fn attempt(
        &self,
        run_id: &str,
        only: Option<&[Selector]>,
    ) -> Result<(Job, JobReport, Vec<Selector>), String> {
        let spec = self.spec(run_id, only).map_err(|e| format!("{e:#}"))?;
        let job = Job::prepare(spec, || self.job.open_target()).await.map_err(|e| format!("{e:#}"))?;
        let name = &self.job.name;
        let started = |e: JobEvent<'_>| {
            if let JobEvent::Started { tag, vms, .. } = e {
                tracing::info!(job = %name, run = %tag, vms, "job starts");
            }
        };
        // SIGTERM cancels the engine: the copies stop and the run ends on its own.
        let run = match job.run(std::future::pending(), started).await {
            Ok(r) => r,
            Err(e) => return Err(e.to_string()),
        };
        for s in run.swept {
            tracing::warn!(job = %name, "removed snapshot {s} after the run");
        }
        for f in run.unswept {
            tracing::error!(job = %name, "COULD NOT REMOVE SNAPSHOT {f}; the next run removes it");
        }
        let report = run.report;
        let found_by: Vec<Selector> = job
            .selection
            .vms
            .iter()
            .map(|v| Selector::Moref(v.moref.value.clone()))
            .chain(job.selection.missing.iter().map(|(typed, _)| Selector::parse(typed)))
            .collect();
        // The report lists the VMs found, in order, then the selectors that found none; when
        // it does not (abandoned), nothing is retried.
        let found_by = if found_by.len() == report.vms.len() { found_by } else { Vec::new() };
        for v in &report.vms {
            match &v.error {
                Some(e) => tracing::error!(job = %name, vm = %v.vm, "failed: {e}"),
                None => tracing::info!(job = %name, vm = %v.vm, point = %v.point.as_deref().unwrap_or("none"),
                    replica = %v.replica.as_deref().map_or_else(|| "none".into(), |p| p.display().to_string()),
                    warnings = v.warnings.len(), seconds = v.seconds, "done"),
            }
        }
        Ok((job, report, found_by))
    }

    /// After the run: the prune and gc of a repository with retention (no gc when the daemon
    /// is stopping: it could outlast the stop timeout). Why that failed, and what they did.
    async fn after(&self, job: &Job, report: &JobReport, stopping: bool) -> (Option<String>, Value) {
        let ctx = &job.ctx;
        let mut error = None;
        let mut upkeep = Value::Null;
        if let (Target::Repository(repo), Some(keep)) = (ctx.target(), &self.job.retention)
            && report.outcome() != Outcome::None
        {
            let (repo, keep, grace) = (repo.clone(), keep.retention(), self.job.gc_grace());
            let gc = (!stopping).then_some(grace);
            match tokio::task::spawn_blocking(move || upkeep_after(&repo, &keep, gc)).await {
                Ok(Ok(u)) => upkeep = u,
                Ok(Err(e)) => error = Some(format!("the prune after the run failed: {e}")),
                Err(e) => error = Some(format!("the prune after the run did not finish: {e}")),
            }
            tracing::info!(job = %self.job.name, upkeep = %upkeep, "prune and gc after the run");
        }
        (error, upkeep)
    }
}

/// A run's report as retries update it: per entry its VM's result, the selector that finds
/// that VM again, and how many times it was tried.
struct Slots<'a> {
    vms: &'a mut [orchestration::VmReport],
    found_by: &'a mut [Selector],
    attempts: &'a mut [u32],
}

/// Puts a retry's results (`retried`, each with the selector that found its VM) into the
/// entries `failed` of the run's report. Each goes to the failed entry its selector names,
/// each entry taken once; a VM that a typed selector finds only now (it had no moref yet)
/// goes to the first such entry still unanswered. A result that answers no entry is dropped.
fn merge_retry(slots: Slots<'_>, failed: &[usize], retried: Vec<orchestration::VmReport>, retried_by: Vec<Selector>) {
    let mut pool = failed.to_vec();
    for (v, by) in retried.into_iter().zip(retried_by) {
        let typed = |i: &usize| !matches!(slots.found_by.get(*i), Some(Selector::Moref(_)));
        let Some(k) =
            pool.iter().position(|&i| slots.found_by.get(i) == Some(&by)).or_else(|| pool.iter().position(typed))
        else {
            continue;
        };
        let i = pool.remove(k);
        if let (Some(slot), Some(a), Some(f)) =
            (slots.vms.get_mut(i), slots.attempts.get_mut(i), slots.found_by.get_mut(i))
        {
            *slot = v;
            *a += 1;
            *f = by;
        }
    }
}

/// What a job's run gives the history.
#[derive(Default)]
struct RunResult {
    report: Option<JobReport>,
    /// Why the run failed as a whole.
    error: Option<String>,
    /// What the prune and gc after it did.
    upkeep: Value,
    /// Per entry of the report, how many times that VM was tried.
    attempts: Vec<u32>,
}

/// The prune after a run, then a gc (with grace `gc`, unless None) when it removed restore
/// points. A prune or gc that finds the repository held by another job (its backup starting
/// or ending, another job's gc) is postponed to the next run, not a failure of this one; a
/// gc that fails is reported and left to the next run: the restore points are safe either
/// way, only their space waits.
fn upkeep_after(repo: &repo::Repo, keep: &repo::Retention, gc: Option<Duration>) -> Result<Value, repo::RepoError> {
    let pruned = match repo.prune(keep, false) {
        Ok(p) => p,
        Err(e @ repo::RepoError::Locked(_)) => {
            tracing::warn!("the prune after the run is postponed to the next run: {e}");
            return Ok(json!({"postponed": e.to_string()}));
        }
        Err(e) => return Err(e),
    };
    let gc = match (pruned.removed.is_empty(), gc) {
        (true, _) => Value::Null,
        (false, None) => json!({"skipped": "the daemon is stopping"}),
        (false, Some(grace)) => match repo.gc(grace, false) {
            Ok(g) => json!({
                "chunks_removed": g.chunks_removed,
                "chunks_in_use": g.chunks_in_use,
                "chunks_in_grace": g.chunks_in_grace,
                "unreadable": g.unreadable,
            }),
            Err(e) => {
                tracing::warn!("the gc after the prune did not run: {e}; the next run's gc frees the space");
                json!({"error": e.to_string()})
            }
        },
    };
    Ok(json!({"pruned": pruned.removed, "gc": gc}))
}

/// Removes the stale snapshots of ours that dead jobs left, job by job of one vCenter.
async fn sweep_at_start(runners: &[Arc<Runner>]) {
    for r in runners {
        match r.prepare("startup").await {
            Ok(job) => match job.clean_stale().await {
                Ok(reports) => {
                    for v in reports {
                        for s in &v.stale_removed {
                            tracing::warn!(job = %r.job.name, vm = %v.vm, "removed stale snapshot {s} at startup");
                        }
                    }
                }
                Err(e) => tracing::warn!(job = %r.job.name, "stale-snapshot check at startup failed: {e}"),
            },
            Err(e) => tracing::warn!(job = %r.job.name, "cannot reach its vCenter at startup: {e:#}"),
        }
    }
}

/// What a schedule runs: a backup or replica job, a drill, or a verify or copy job.
#[derive(Clone)]
enum Work {
    Job(Arc<Runner>),
    Drill(Arc<DrillRunner>),
    Upkeep(Arc<UpkeepRunner>),
}

impl Work {
    fn name(&self) -> &str {
        match self {
            Self::Job(r) => &r.job.name,
            Self::Drill(d) => &d.config.name,
            Self::Upkeep(u) => &u.name,
        }
    }

    fn schedule(&self) -> &Schedule {
        match self {
            Self::Job(r) => &r.schedule,
            Self::Drill(d) => &d.schedule,
            Self::Upkeep(u) => &u.schedule,
        }
    }

    /// One run, as the history records it. `ever_succeeded`: whether a run of it has reached
    /// its target before (a copy job makes its destination only until then); `last`: its
    /// newest run before this one.
    async fn once(
        &self,
        run_id: &str,
        started: SystemTime,
        stop: watch::Receiver<bool>,
        ever_succeeded: bool,
        last: Option<Value>,
    ) -> Value {
        match self {
            Self::Job(r) => record(&r.job.name, started, r.once(run_id, stop).await),
            Self::Drill(d) => d.once(started, stop).await,
            Self::Upkeep(u) => u.once(started, stop, !ever_succeeded, last.as_ref()).await,
        }
    }
}

/// Runs `work` on its schedule, once its vCenter's startup sweep is over (`swept`), until
/// `stop` says so.
async fn schedule_loop(
    work: Work,
    state: Arc<State>,
    mut swept: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = swept.wait_for(|done| *done) => {}
        _ = stop.changed() => return,
    }
    let name = work.name().to_owned();
    // An `every` schedule counts from the job's last run when the history has one, so that a
    // daemon restarted more often than the interval still runs it; one overdue runs now.
    // A start in the future (a clock set back) counts as now.
    let last = state
        .history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .last_started(&name)
        .map(|l| l.min(SystemTime::now()));
    let start = last.unwrap_or(state.started);
    let mut overdue = match (work.schedule(), last) {
        (Schedule::Every(d), Some(l)) => l.checked_add(*d).is_some_and(|due| due <= SystemTime::now()),
        _ => false,
    };
    let mut runs = 0u64;
    loop {
        let next = match std::mem::take(&mut overdue) {
            true => SystemTime::now(),
            false => work.schedule().next_after(start, SystemTime::now()),
        };
        if let Some(s) = state.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(&name) {
            s.next = Some(next);
        }
        let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
        let trigger = state.triggers.get(&name);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = async { match trigger { Some(t) => t.notified().await, None => std::future::pending().await } } => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        runs += 1;
        if let Some(s) = state.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(&name) {
            s.running = true;
        }
        let started = SystemTime::now();
        let stamp: String = humantime::format_rfc3339_seconds(started)
            .to_string()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let (ever_succeeded, last) = {
            let h = state.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (h.reached_target(&name), h.last_of(&name).cloned())
        };
        let rec = work.once(&format!("{stamp}-{runs}"), started, stop.clone(), ever_succeeded, last).await;
        state.finish(&name, rec);
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials of an `Authorization` header of the Bearer scheme, whose name is
/// case-insensitive (RFC 7235): `Bearer TOKEN`, `bearer TOKEN`.
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let split = header.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = header.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// `NAME` of `/jobs/NAME/run` (which may be empty: no job has that name).
fn job_to_run(path: &str) -> Option<&str> {
    path.strip_prefix("/jobs/").and_then(|r| r.strip_suffix("/run"))
}

fn route(state: &State, token: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| bearer(v.as_bytes())).unwrap_or(b"");
    if !same(given, token.as_bytes()) {
        let mut r = text(StatusCode::UNAUTHORIZED, "text/plain", "a bearer token is required\n".into());
        r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path();
    match (req.method().as_str(), path) {
        ("GET", "/metrics") => text(StatusCode::OK, "text/plain; version=0.0.4", state.prometheus()),
        ("GET", "/status") => text(StatusCode::OK, "application/json", state.status().to_string()),
        ("GET", "/history") => {
            let h = state.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            text(StatusCode::OK, "application/json", Value::Array(h.recent().cloned().collect()).to_string())
        }
        ("POST", p) if job_to_run(p).is_some() => {
            let name = job_to_run(p).unwrap_or_default();
            match state.triggers.get(name) {
                Some(t) => {
                    t.notify_one();
                    text(StatusCode::ACCEPTED, "application/json", json!({"job": name, "queued": true}).to_string())
                }
                None => text(StatusCode::NOT_FOUND, "text/plain", format!("no job {name:?}\n")),
            }
        }
        _ => {
            text(StatusCode::NOT_FOUND, "text/plain", "GET /status, /history or /metrics; POST /jobs/NAME/run\n".into())
        }
    }
}

/// How the HTTP endpoint bounds its clients.
#[derive(Debug, Clone, Copy)]
struct HttpLimits {
    /// Connections served at once; the rest wait in the listen backlog.
    connections: usize,
    /// The time to send a request's headers.
    header_timeout: Duration,
    /// The time a connection may go without a byte either way.
    idle_timeout: Duration,
}

/// The first and the longest pause after a failed accept (out of descriptors: every retry
/// would fail at once, spinning and filling the log).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The largest request head read (hyper answers 431 past it).
const MAX_REQUEST_HEAD: usize = 16 << 10;

async fn http(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    token: String,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let token = Arc::new(token);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut backoff = Duration::ZERO;
    loop {
        // A slot before accepting: past the cap, connections wait in the kernel's backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    stream
                }
                Err(e) => {
                    backoff = (backoff * 2).clamp(ACCEPT_BACKOFF.0, ACCEPT_BACKOFF.1);
                    tracing::warn!("accepting an HTTP connection: {e}; pausing {} ms", backoff.as_millis());
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => continue,
                        _ = stop.changed() => return,
                    }
                }
            },
            _ = stop.changed() => return,
        };
        tokio::spawn(connection(stream, permit, state.clone(), token.clone(), limits));
    }
}

/// Serves one connection, holding its slot, until it ends, sends no head in time, or goes idle.
async fn connection(
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    state: Arc<State>,
    token: Arc<String>,
    limits: HttpLimits,
) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let r = route(&state, &token, &req);
        async move { Ok::<_, std::convert::Infallible>(r) }
    });
    let last = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let io = hyper_util::rt::TokioIo::new(Watched { inner: stream, last: last.clone() });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let conn = builder.serve_connection(io, service);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!("HTTP connection: {e}");
        },
        () = idle(&last, limits.idle_timeout) => tracing::debug!("HTTP connection idle: closed"),
    }
}

/// Returns once nothing moved on a connection for `timeout`.
async fn idle(last: &Mutex<tokio::time::Instant>, timeout: Duration) {
    loop {
        let deadline = *last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) + timeout;
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream that notes when a byte last moved either way.
struct Watched {
    inner: tokio::net::TcpStream,
    last: Arc<Mutex<tokio::time::Instant>>,
}

impl Watched {
    fn moved(&self) {
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tokio::time::Instant::now();
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.moved();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.moved();
        }
        r
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How long shutdown waits for notifications under way.
const NOTIFY_AT_EXIT: Duration = Duration::from_secs(20);

/// Awaits every task.
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

async fn serve(config: ServeConfig, vddk: Option<Arc<vddk::Vddk>>) -> Result<ExitCode> {
    crate::logs::init("info", config.proxy.log_format == "json");
    // Signals first: whatever happens next (a vCenter that never answers), SIGTERM stops it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let token = read_token(&config.proxy.token_file)?;
    for w in secret_file_warnings(&config) {
        tracing::warn!("{w}");
    }
    let listen: SocketAddr = config.proxy.listen.parse().context("[proxy] listen")?;
    std::fs::create_dir_all(&config.proxy.state_dir)
        .with_context(|| format!("cannot create {}", config.proxy.state_dir.display()))?;
    vsphere::tls::install_crypto_provider();
    let proxy_id = config.proxy.id.clone().unwrap_or_else(durable::host_name);
    // The budget is the whole process's; the buffers get what the VMs at once leave.
    let mut engine = Engine::new(orchestration::buffer_budget(config.memory(), config.proxy.max_vms));
    if let Some(rate) = config.rate() {
        engine.global_rate = Some(Arc::new(RateLimiter::new(rate)));
    }
    let engine = Arc::new(engine);
    let options = pipeline::CopyOptions {
        release_cpu_time: ReleaseCpuTime(config.proxy.release_cpu_time),
        retry_for: pipeline::PATIENCE,
        ..Default::default()
    };
    let limits = Arc::new(Limits::new(config.proxy.max_vms, config.proxy.per_host, config.proxy.per_datastore));
    let metrics = Arc::new(Metrics::default());
    let mut runners = Vec::new();
    for job in &config.jobs {
        let vcenter = config.vcenter(&job.vcenter).context("a job's vCenter")?.clone();
        if vcenter.insecure {
            tracing::warn!(vcenter = %vcenter.name, "insecure = true: the server's certificate is not checked");
        }
        runners.push(Arc::new(Runner {
            job: job.clone(),
            vcenter,
            schedule: Schedule::parse(&job.schedule).map_err(anyhow::Error::msg)?,
            proxy_id: proxy_id.clone(),
            engine: engine.clone(),
            options: options.clone(),
            max_job: config.max_job(),
            max_vms: config.proxy.max_vms,
            limits: limits.clone(),
            metrics: metrics.clone(),
            vddk: vddk.clone(),
        }));
    }
    let mut drills = Vec::new();
    for d in &config.drills {
        drills.push(Arc::new(DrillRunner {
            config: d.clone(),
            schedule: Schedule::parse(&d.schedule).map_err(anyhow::Error::msg)?,
            work_root: config.proxy.state_dir.join("drills"),
        }));
    }
    if !drills.is_empty() {
        let root = config.proxy.state_dir.join("drills");
        std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    }
    let mut upkeep = Vec::new();
    for v in &config.verifies {
        let schedule = Schedule::parse(&v.schedule).map_err(anyhow::Error::msg)?;
        upkeep.push(Arc::new(UpkeepRunner { name: v.name.clone(), schedule, what: Upkeep::Verify(v.clone()) }));
    }
    for c in &config.copies {
        let schedule = Schedule::parse(&c.schedule).map_err(anyhow::Error::msg)?;
        upkeep.push(Arc::new(UpkeepRunner { name: c.name.clone(), schedule, what: Upkeep::Copy(c.clone()) }));
    }
    let status = |schedule: &str, target: String| JobStatus {
        schedule: schedule.to_owned(),
        target,
        next: None,
        running: false,
        last: None,
    };
    // What the daemon knew before its restart: each job's last run, each VM's last good point.
    let (history, warnings) = History::load(config.proxy.state_dir.join("history.jsonl"));
    for w in warnings {
        tracing::warn!("{w}");
    }
    let drill_stats = DrillStats::default();
    for rec in history.recent().filter(|r| r["kind"] == "drill") {
        drill_stats.record(rec);
    }
    let mut jobs: HashMap<String, JobStatus> = config
        .jobs
        .iter()
        .map(|j| {
            let target = j.repository.clone().or_else(|| j.replica.as_ref().map(|p| p.display().to_string()));
            (j.name.clone(), status(&j.schedule, target.unwrap_or_default()))
        })
        .chain(config.drills.iter().map(|d| (d.name.clone(), status(&d.schedule, d.repository.clone()))))
        .chain(config.verifies.iter().map(|v| (v.name.clone(), status(&v.schedule, v.repository.clone()))))
        .chain(
            config
                .copies
                .iter()
                .map(|c| (c.name.clone(), status(&c.schedule, format!("{} to {}", c.repository, c.to)))),
        )
        .collect();
    for (name, s) in &mut jobs {
        s.last = history.last_of(name).cloned();
    }
    let state = Arc::new(State {
        proxy_id: proxy_id.clone(),
        started: SystemTime::now(),
        metrics: metrics.clone(),
        history: Mutex::new(history),
        jobs: Mutex::new(jobs),
        triggers: config
            .jobs
            .iter()
            .map(|j| &j.name)
            .chain(config.drills.iter().map(|d| &d.name))
            .chain(config.verifies.iter().map(|v| &v.name))
            .chain(config.copies.iter().map(|c| &c.name))
            .map(|n| (n.clone(), tokio::sync::Notify::new()))
            .collect(),
        drills: drill_stats,
        notifiers: config.notify.iter().map(|n| Notifier::new(n).map(Arc::new)).collect::<Result<_>>()?,
        deliveries: Mutex::default(),
        repositories: config.local_repositories(),
    });
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(proxy = %proxy_id, listen = %listener.local_addr()?, jobs = runners.len(), drills = drills.len(), "serving");
    let (stop_tx, stop_rx) = watch::channel(false);
    let http_limits = HttpLimits {
        connections: config.proxy.http_connections,
        header_timeout: config.http_header_timeout(),
        idle_timeout: config.http_idle_timeout(),
    };
    let server = tokio::spawn(http(listener, state.clone(), token, http_limits, stop_rx.clone()));

    // What dead jobs of ours left behind goes before each job's first run: per vCenter in the
    // background, so one that hangs holds neither the endpoint nor the others' jobs.
    let mut tasks = tokio::task::JoinSet::new();
    let mut vcenters: Vec<&str> = runners.iter().map(|r| r.vcenter.name.as_str()).collect();
    vcenters.sort_unstable();
    vcenters.dedup();
    for name in vcenters {
        let (swept_tx, swept_rx) = watch::channel(false);
        let theirs: Vec<Arc<Runner>> = runners.iter().filter(|r| r.vcenter.name == name).cloned().collect();
        for r in &theirs {
            tasks.spawn(schedule_loop(Work::Job(r.clone()), state.clone(), swept_rx.clone(), stop_rx.clone()));
        }
        let mut stop = stop_rx.clone();
        let name = name.to_owned();
        tasks.spawn(async move {
            tokio::select! {
                () = sweep_at_start(&theirs) => {}
                _ = stop.changed() => tracing::info!(vcenter = %name, "startup snapshot sweep stopped"),
            }
            let _ = swept_tx.send(true);
        });
    }

    // Drills, verifies and copies touch no vCenter: nothing to sweep before them.
    let (_no_sweep_tx, no_sweep) = watch::channel(true);
    for d in drills {
        tasks.spawn(schedule_loop(Work::Drill(d), state.clone(), no_sweep.clone(), stop_rx.clone()));
    }
    for u in upkeep {
        tasks.spawn(schedule_loop(Work::Upkeep(u), state.clone(), no_sweep.clone(), stop_rx.clone()));
    }

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("interrupted: stopping"),
    }
    // No new job starts; running copies stop; each job removes its snapshots as it ends.
    let _ = stop_tx.send(true);
    engine.cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = server.await;
    // The last runs' notifications (an interrupted run is a failure) get a while to go out.
    let deliveries = std::mem::take(&mut *state.deliveries.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    if tokio::time::timeout(NOTIFY_AT_EXIT, futures_join(deliveries)).await.is_err() {
        tracing::warn!("notifications still under way after {} s at shutdown: given up", NOTIFY_AT_EXIT.as_secs());
    }
    tracing::info!("stopped; every job has ended and removed its snapshots");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestration::VmReport;

    fn vm(name: &str, error: Option<&str>) -> VmReport {
        VmReport { vm: name.into(), error: error.map(Into::into), ..VmReport::default() }
    }

    #[test]
    fn a_retry_answers_each_failed_vm_once_and_never_a_vm_of_the_same_name() {
        // Two VMs named web (vm-1 succeeded, vm-2 failed), a name that found nothing, and a
        // path that found nothing.
        let mut vms = vec![
            vm("web", None),
            vm("web", Some("snapshot failed")),
            vm("ghost", Some("not found")),
            vm("DC/vm/x", Some("not found")),
        ];
        let mut found_by = vec![
            Selector::Moref("vm-1".into()),
            Selector::Moref("vm-2".into()),
            Selector::Name("ghost".into()),
            Selector::Path("DC/vm/x".into()),
        ];
        let mut attempts = vec![1; 4];
        let failed = [1, 2, 3];
        // The retry: vm-2 now backed up; ghost found now (as vm-9), the path still nothing.
        let retried = vec![vm("web", None), vm("ghost", None), vm("DC/vm/x", Some("not found"))];
        let by = vec![Selector::Moref("vm-2".into()), Selector::Moref("vm-9".into()), Selector::Path("DC/vm/x".into())];
        merge_retry(Slots { vms: &mut vms, found_by: &mut found_by, attempts: &mut attempts }, &failed, retried, by);
        assert!(vms[0].error.is_none() && attempts[0] == 1, "the other web untouched");
        assert!(vms[1].error.is_none() && attempts[1] == 2);
        assert!(vms[2].error.is_none() && attempts[2] == 2 && found_by[2] == Selector::Moref("vm-9".into()));
        assert!(vms[3].error.is_some() && attempts[3] == 2);
        // A path that finds its VM only now: the VM, keyed by its moref, answers the path.
        let slots = Slots { vms: &mut vms, found_by: &mut found_by, attempts: &mut attempts };
        merge_retry(slots, &[3], vec![vm("x", None)], vec![Selector::Moref("vm-5".into())]);
        assert!(vms[3].vm == "x" && vms[3].error.is_none() && attempts[3] == 3);
        // A result that answers no entry (only morefs were asked for) is dropped.
        vms[1].error = Some("failed again".into());
        let slots = Slots { vms: &mut vms, found_by: &mut found_by, attempts: &mut attempts };
        merge_retry(slots, &[1], vec![vm("stray", None)], vec![Selector::Moref("vm-77".into())]);
        assert!(vms[1].vm == "web" && vms[1].error.is_some() && attempts[1] == 2);
        assert_eq!(vms[0].vm, "web");
    }
}
