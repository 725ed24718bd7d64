//! `proxy backup` and `proxy replicate`: agentless backups of vSphere VMs into a repository (or
//! with `--plan` what they would copy and why, touching nothing), and replicas of their disks
//! kept up to date in a directory. VMs are named by name, moref, instance UUID or inventory
//! path (or `--all`); at most `--concurrency` run at once. Ctrl-C stops the copies cleanly and
//! removes every snapshot; a second Ctrl-C stops at once and still removes them. The exit code
//! is 0 when every VM succeeded, 3 when some did, 1 when none did.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use orchestration::{
    Buffers, DiskFilter, Job, JobContext, JobEvent, JobReport, JobSpec, Outcome, ReplicaTarget, Selector, Target,
    plan_vm, vm_result,
};
use serde_json::json;

use crate::repo_cmd::RepoArg;
use crate::server_args::ServerArgs;
use crate::size;

/// `--concurrency`: 1 to [`orchestration::config::MAX_AT_ONCE`] (past tokio's semaphore limit
/// the job would panic).
fn parse_concurrency(s: &str) -> Result<usize, String> {
    let max = orchestration::config::MAX_AT_ONCE;
    s.parse::<usize>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| format!("use 1 to {max}"))
}

/// What `proxy backup` and `proxy replicate` share.
#[derive(Debug, clap::Args)]
pub(crate) struct JobArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The VMs: names, morefs (`vm-42`), instance UUIDs or inventory paths (`DC1/vm/db01`).
    #[arg(required_unless_present = "all")]
    vms: Vec<String>,
    /// Every VM the account can see.
    #[arg(long, conflicts_with = "vms")]
    all: bool,
    /// VMs worked on at once (1 to 10000).
    #[arg(long, default_value_t = 100, value_parser = parse_concurrency)]
    concurrency: usize,
    /// This proxy's ID in snapshot names (default: the host name).
    #[arg(long)]
    proxy_id: Option<String>,
    /// The longest a job may run: a snapshot of ours whose job is gone is removed only once it
    /// is older than this.
    #[arg(long, default_value = "24h", value_parser = crate::duration::parse)]
    max_job: Duration,
    /// The memory budget of the whole process: copy buffers get what remains after about
    /// 32 MiB plus 1 MiB per VM worked on at once.
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    memory: u64,
    /// Limit the whole job to this many bytes per second (`100M` = 100 MiB/s), over all its
    /// VMs and disks.
    #[arg(long, value_parser = size::parse)]
    rate: Option<u64>,
    /// How long each stream sleeps after each request, in whole milliseconds (`4ms`; 0: full
    /// speed), to leave ESXi hosts CPU time; with --rate, the slower one wins.
    #[arg(long, default_value = "0", value_parser = crate::duration::millis)]
    release_cpu_time: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Copy only these disks of each VM, by slot (`scsi0:1`) or label (`Hard disk 2`);
    /// repeatable.
    #[arg(long)]
    include_disk: Vec<String>,
    /// Leave these disks out (wins over --include-disk); repeatable.
    #[arg(long)]
    exclude_disk: Vec<String>,
    /// Read disks through VMware's VDDK from this folder (the one holding `lib64/`) instead of
    /// HTTPS datastore reads. VDDK is not shipped with syncproxy.
    #[arg(long)]
    vddk_libdir: Option<std::path::PathBuf>,
    /// An InitEx configuration file for VDDK.
    #[arg(long, requires = "vddk_libdir")]
    vddk_config: Option<std::path::PathBuf>,
    /// Read each disk from an NBD export you serve over the frozen disks (nbdkit's VDDK
    /// plugin, for instance): a URI template with {vm}, {moref}, {uuid}, {snapshot} and {disk}
    /// (`scsi0-1`), like `nbd+unix:///?socket=/run/sp/{moref}-{disk}.sock`.
    #[arg(long, conflicts_with = "vddk_libdir")]
    nbd_url: Option<String>,
    /// No progress bars (a line every 10 seconds instead; also when not on a terminal).
    #[arg(long)]
    no_progress: bool,
    /// A command run on the proxy (`sh -c`) before each VM's snapshot, with SYNCPROXY_VM and
    /// SYNCPROXY_VM_MOREF set; if it fails, that VM is not backed up.
    #[arg(long, conflicts_with = "pre_freeze_guest")]
    pre_freeze: Option<String>,
    /// A command run on the proxy after each VM's snapshot; a failure is reported loudly.
    #[arg(long, conflicts_with = "post_thaw_guest")]
    post_thaw: Option<String>,
    /// A program (and its arguments) run in each guest through VMware Tools before the
    /// snapshot, as the account in --guest-credentials.
    #[arg(long, requires = "guest_credentials")]
    pre_freeze_guest: Option<String>,
    /// A program (and its arguments) run in each guest after the snapshot.
    #[arg(long, requires = "guest_credentials")]
    post_thaw_guest: Option<String>,
    /// The guest account for guest hooks: a file with the user on the first line and the
    /// password on the second.
    #[arg(long)]
    guest_credentials: Option<std::path::PathBuf>,
    /// How long a hook may run.
    #[arg(long, default_value = "5m", value_parser = crate::duration::parse)]
    hook_timeout: Duration,
    /// Leave VMs' DRS automation alone (by default a VM DRS could move is overridden to manual
    /// while it is read, and put back after).
    #[arg(long)]
    no_drs_pin: bool,
}

/// Options of `proxy backup`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    repo: RepoArg,
    #[command(flatten)]
    job: JobArgs,
    /// Print, per disk, what would be copied and why (full and its reason, or incremental),
    /// without creating a snapshot or changing anything.
    #[arg(long)]
    plan: bool,
}

/// Options of `proxy replicate`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReplicateArgs {
    /// The directory of the replicas: `DIR/<vm>_<uuid>/<slot>.raw` per disk, the `.vmx` beside
    /// them, sync states in `DIR/.syncproxy/`.
    dir: std::path::PathBuf,
    #[command(flatten)]
    job: JobArgs,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    command("backup", &args.job, args.plan, || Ok(Target::Repository(args.repo.open()?)))
}

pub(crate) fn run_replicate(args: &ReplicateArgs) -> ExitCode {
    command("replicate", &args.job, false, || Ok(Target::Replica(ReplicaTarget::open(&args.dir)?)))
}

/// `proxy backup` or `proxy replicate` (`what`): VDDK loaded first (before any thread starts),
/// then the target opened and the job run.
fn command(what: &str, args: &JobArgs, plan_only: bool, open_target: impl FnOnce() -> Result<Target>) -> ExitCode {
    let vddk = match load_vddk(args.vddk_libdir.as_deref(), args.vddk_config.as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("proxy {what}: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    crate::block_on(what, async { job(args, open_target()?, plan_only, what, vddk).await })
}

/// Loads and initialises VDDK from `libdir`, before any thread starts: VDDK finds its own
/// libraries only on `LD_LIBRARY_PATH`, so the process re-executes itself once to set it.
pub(crate) fn load_vddk(
    libdir: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> Result<Option<Arc<vddk::Vddk>>> {
    let Some(dir) = libdir else { return Ok(None) };
    vddk::ensure_library_path(dir).context("cannot prepare LD_LIBRARY_PATH for VDDK")?;
    let lib = vddk::Library::load(dir)?;
    eprintln!("VDDK {} from {}", lib.version(), lib.path().display());
    Ok(Some(Arc::new(lib.init(config)?)))
}

/// A job ID: the UTC time and 4 random bytes.
fn new_job_id() -> Result<String> {
    let mut r = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut r))
        .context("reading /dev/urandom")?;
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp: String = t.chars().filter(char::is_ascii_alphanumeric).collect();
    Ok(format!("{stamp}-{}", r.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The hooks the flags ask for: a command on the proxy, or a program in the guest (its path,
/// then its arguments).
fn hooks(args: &JobArgs) -> Result<orchestration::hooks::Hooks> {
    use orchestration::hooks::{Hook, HookAction};
    let make = |command: &Option<String>, guest: &Option<String>| -> Result<Option<Hook>> {
        let action = match (command, guest) {
            (Some(c), _) => HookAction::Proxy(c.clone()),
            (None, Some(g)) => {
                let (program, arguments) = g.trim().split_once(char::is_whitespace).unwrap_or((g.trim(), ""));
                let path = args.guest_credentials.as_deref().context("guest hooks need --guest-credentials")?;
                let auth = orchestration::hooks::guest_credentials(path).map_err(anyhow::Error::msg)?;
                HookAction::Guest { program: program.to_owned(), arguments: arguments.trim().to_owned(), auth }
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(Hook { action, timeout: args.hook_timeout }))
    };
    Ok(orchestration::hooks::Hooks {
        pre_freeze: make(&args.pre_freeze, &args.pre_freeze_guest)?,
        post_thaw: make(&args.post_thaw, &args.post_thaw_guest)?,
    })
}

async fn job(
    args: &JobArgs,
    target: Target,
    plan_only: bool,
    what: &str,
    vddk: Option<Arc<vddk::Vddk>>,
) -> Result<ExitCode> {
    let spec = JobSpec {
        login: args.server.login_spec()?,
        selectors: args.vms.iter().map(|v| Selector::parse(v)).collect(),
        all: args.all,
        proxy_id: args.proxy_id.clone().unwrap_or_else(durable::host_name),
        job_id: new_job_id()?,
        concurrency: args.concurrency,
        buffers: Buffers::Memory(args.memory),
        options: Some(pipeline::CopyOptions {
            job_rate: args.rate.map(|r| Arc::new(pipeline::limit::RateLimiter::new(r))),
            release_cpu_time: pipeline::limit::ReleaseCpuTime(args.release_cpu_time),
            retry_for: pipeline::PATIENCE,
            ..pipeline::CopyOptions::default()
        }),
        limits: None,
        metrics: None,
        max_job: args.max_job,
        disks: DiskFilter { include: args.include_disk.clone(), exclude: args.exclude_disk.clone() },
        vddk,
        nbd: args.nbd_url.clone(),
        pin_drs: !args.no_drs_pin,
        hooks: hooks(args)?,
    };
    // A VM that is gone or misnamed fails on its own; the others are protected all the same.
    let job = Job::prepare(spec, || Ok::<_, anyhow::Error>(target)).await?;
    for (_, why) in &job.selection.missing {
        eprintln!("proxy {what}: {why}");
    }
    if job.selection.vms.is_empty() && job.selection.missing.is_empty() {
        bail!("no VMs to {what}");
    }
    if plan_only {
        return plan(&job.ctx, &job.selection.vms, args.json).await;
    }
    let cancel = job.ctx.engine().cancel.clone();
    let abandon = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!(
            "proxy {what}: interrupted: stopping the copies and removing the snapshots (Ctrl-C again to stop now)"
        );
        cancel.cancel();
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("proxy {what}: stopping now");
    };
    let mut view = None;
    let run = job
        .run(abandon, |event| match event {
            JobEvent::Started { tag, vms, concurrency } => {
                eprintln!("proxy {what}: job {tag} of {vms} VM(s), at most {concurrency} at once");
                let quiet = args.no_progress || args.json;
                view = Some(crate::progress_view::start(job.ctx.metrics().clone(), vms, quiet));
            }
            JobEvent::Copied => view = None,
        })
        .await?;
    for s in &run.swept {
        eprintln!("proxy {what}: removed snapshot {s}");
    }
    for f in &run.unswept {
        eprintln!("proxy {what}: COULD NOT REMOVE SNAPSHOT {f}; the next run removes it");
    }
    let report = run.report;
    if report.vms.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    print_report(&report, &job.ctx, args.json)?;
    Ok(match report.outcome() {
        Outcome::All if job.ctx.engine().cancel.is_cancelled() => ExitCode::from(3),
        Outcome::All => ExitCode::SUCCESS,
        Outcome::Some => ExitCode::from(3),
        Outcome::None => ExitCode::FAILURE,
    })
}

async fn plan(ctx: &JobContext, vms: &[vsphere::Vm], json: bool) -> Result<ExitCode> {
    let mut plans = Vec::new();
    for v in vms {
        plans.push(plan_vm(ctx, &v.moref).await.with_context(|| format!("planning {}", v.name))?);
    }
    let mut out = std::io::stdout().lock();
    if json {
        let j: Vec<_> = plans
            .iter()
            .map(|p| {
                json!({
                    "vm": p.vm,
                    "parent": p.parent,
                    "disks": p.disks.iter().map(|d| json!({
                        "name": d.name, "capacity": d.capacity, "plan": d.plan, "read": d.read,
                    })).collect::<Vec<_>>(),
                    "warnings": p.warnings,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for p in &plans {
        writeln!(out, "{} (from {})", p.vm, p.parent.as_deref().unwrap_or("nothing: a first backup"))?;
        for d in &p.disks {
            let read = d.read.map_or_else(|| "?".to_owned(), |r| r.to_string());
            writeln!(out, "  {:<10} {:>14} bytes  read {:>14}  {}", d.name, d.capacity, read, d.plan)?;
        }
        for w in &p.warnings {
            writeln!(out, "  note: {w}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &JobReport, ctx: &JobContext, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let m = ctx.metrics().snapshot();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report.to_json(&m))?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<8} {:<12} {:>5} {:>14} {:>14} {:>8}",
        "VM", "result", "consistency", "disks", "read", "stored", "seconds"
    )?;
    for r in &report.vms {
        let result = match vm_result(r) {
            "failed" => "FAILED",
            word => word,
        };
        let consistency = match r.consistency {
            Some(repo::Consistency::Application) => "application",
            Some(repo::Consistency::Crash) => "crash",
            None => "-",
        };
        writeln!(
            out,
            "{:<24} {result:<8} {consistency:<12} {:>5} {:>14} {:>14} {:>8.1}",
            r.vm,
            r.disks.len(),
            r.disks.iter().map(|d| d.read).sum::<u64>(),
            r.disks.iter().map(|d| d.stored_bytes).sum::<u64>(),
            r.seconds
        )?;
    }
    for r in &report.vms {
        if let Some(e) = &r.error {
            writeln!(out, "{}: FAILED: {e}", r.vm)?;
        }
        for w in &r.warnings {
            writeln!(out, "{}: note: {w}", r.vm)?;
        }
        let disks: Vec<String> = r.disks.iter().map(|d| format!("{} {}", d.name, d.plan)).collect();
        if let Some(p) = &r.point {
            writeln!(out, "{}: restore point {p}: {}", r.vm, disks.join("; "))?;
        }
        if let Some(p) = &r.replica {
            writeln!(out, "{}: replica {} is consistent: {}", r.vm, p.display(), disks.join("; "))?;
        }
    }
    let ok = report.vms.iter().filter(|r| r.error.is_none()).count();
    writeln!(
        out,
        "job {}: {ok} of {} VMs done in {:.1} s; {} bytes read; at most {} disks copying at once",
        report.job,
        report.vms.len(),
        report.seconds,
        m.bytes_read,
        m.disks_copying_peak
    )?;
    Ok(())
}
