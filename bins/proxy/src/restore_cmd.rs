//! `proxy restore REPO POINT --url .. --name NEW`: a restore point put back into vSphere as a
//! new VM, its disks uploaded over HTTPS and converted on the datastore, its configuration
//! from the captured `.vmx`, read back and compared before it gets its name.
//!
//! Exit codes: 0 restored (and verified); 1 nothing restored (what was made is removed, or
//! named for the next run's sweep).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use orchestration::restore_job::{Progress, RestoreOptions, Verify};
use vsphere::provision::Provisioning;

use crate::repo_cmd::{RepoArg, point_id};
use crate::server_args::ServerArgs;
use orchestration::human_bytes;

/// `proxy restore` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    repo: RepoArg,
    /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`, or `latest`
    /// when the repository holds one VM.
    point: String,
    #[command(flatten)]
    server: ServerArgs,
    /// The new VM's name (refused when a VM or datastore folder of that name exists).
    #[arg(long)]
    name: String,
    /// The datacenter (default: the only one).
    #[arg(long)]
    datacenter: Option<String>,
    /// The host to place the VM on.
    #[arg(long)]
    host: Option<String>,
    /// The cluster to place the VM in.
    #[arg(long)]
    cluster: Option<String>,
    /// The resource pool.
    #[arg(long)]
    pool: Option<String>,
    /// The VM folder, as a path under the datacenter's VM folder (`prod/db`).
    #[arg(long)]
    folder: Option<String>,
    /// The datastore for the VM and its disks (default: the only one).
    #[arg(long)]
    datastore: Option<String>,
    /// The disks' provisioning: `thin` (default), `thick` or `eager-zeroed`.
    #[arg(long, default_value = "thin", value_parser = parse_provisioning)]
    provisioning: Provisioning,
    /// Map a source port group to a target network: `--network "VM Network=Isolated"`.
    /// Unmapped NICs have no network.
    #[arg(long, value_parser = parse_mapping)]
    network: Vec<(String, String)>,
    /// Connect the NICs (by default they are left disconnected, so the restored VM never
    /// collides with its original).
    #[arg(long)]
    connect_nics: bool,
    /// Keep the original's BIOS and instance UUIDs and MAC addresses (for a replacement).
    #[arg(long)]
    keep_identity: bool,
    /// Power the VM on once restored.
    #[arg(long)]
    power_on: bool,
    /// Read back every byte of the restored disks (by default a sample) and compare.
    #[arg(long)]
    verify: bool,
    /// The VM's configuration (`.vmx`) for a point with none captured.
    #[arg(long)]
    vmx: Option<PathBuf>,
    /// Where restores keep their intent records until done (default
    /// `$XDG_STATE_HOME/syncproxy`, or `~/.local/state/syncproxy`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_provisioning(s: &str) -> Result<Provisioning, String> {
    match s {
        "thin" => Ok(Provisioning::Thin),
        "thick" => Ok(Provisioning::Thick),
        "eager-zeroed" | "eagerzeroedthick" => Ok(Provisioning::EagerZeroedThick),
        other => Err(format!("{other:?} is not thin, thick or eager-zeroed")),
    }
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("{s:?} is not SOURCE=TARGET (\"VM Network=Isolated\")"))
}

/// The folder for state kept between runs.
pub(crate) fn default_state_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("syncproxy"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/state/syncproxy")),
        None => bail!("no --state-dir, XDG_STATE_HOME or HOME: cannot tell where to keep restore records"),
    }
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::repo_cmd::init_logs();
    crate::block_on("restore", restore(args))
}

async fn restore(args: &Args) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let id = point_id(&repo, &args.point)?;
    let options = RestoreOptions {
        name: args.name.clone(),
        datacenter: args.datacenter.clone(),
        host: args.host.clone(),
        cluster: args.cluster.clone(),
        pool: args.pool.clone(),
        folder: args.folder.clone(),
        datastore: args.datastore.clone(),
        provisioning: args.provisioning,
        networks: args.network.clone(),
        connect_nics: args.connect_nics,
        keep_identity: args.keep_identity,
        power_on: args.power_on,
        verify: if args.verify { Verify::Full } else { Verify::Sample },
        state_dir: match &args.state_dir {
            Some(d) => d.clone(),
            None => default_state_dir()?,
        },
        vmx: match &args.vmx {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
            None => None,
        },
    };
    let client = args.server.login().await?;
    let cancel = Arc::new(AtomicBool::new(false));
    let on_signal = cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("proxy restore: interrupted; removing what this restore made");
            on_signal.store(true, Ordering::Relaxed);
        }
    });
    let quiet = args.json;
    let last = std::sync::Mutex::new((String::new(), Instant::now()));
    let progress = move |p: Progress| {
        if quiet {
            return;
        }
        let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let new_step = last.0 != p.step;
        if !new_step && last.1.elapsed().as_millis() < 1000 && p.done < p.total {
            return;
        }
        *last = (p.step.clone(), Instant::now());
        if p.total == 0 {
            eprintln!("  {}", p.step);
        } else {
            let pct = p.done.saturating_mul(100) / p.total.max(1);
            eprint!("\r  {}: {} of {} ({pct}%)   ", p.step, human_bytes(p.done), human_bytes(p.total));
            if p.done >= p.total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    };
    if !args.json {
        eprintln!("proxy restore: restoring point {id} as VM {:?}", args.name);
    }
    let started = Instant::now();
    let outcome = orchestration::restore_job::restore_new_vm(&client, &repo, &id, &options, &progress, &cancel).await;
    watcher.abort();
    let _ = client.logout().await;
    let outcome = outcome.with_context(|| format!("restore of point {id} as {:?}", args.name))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(ExitCode::SUCCESS);
    }
    for n in &outcome.notes {
        println!("note: {n}");
    }
    for d in &outcome.disks {
        println!("  {:<10} {}  {} of data, {} sent", d.slot, d.file, human_bytes(d.data), human_bytes(d.uploaded));
    }
    let sent: u64 = outcome.disks.iter().map(|d| d.uploaded).sum();
    println!("data path: {}", outcome.path);
    println!(
        "restored VM {} ({}) from point {} in {:.1} s ({}/s uploaded); {} read back and equal{}",
        outcome.name,
        outcome.vm,
        outcome.point,
        started.elapsed().as_secs_f64(),
        human_bytes(per_second(sent, outcome.upload_seconds)),
        human_bytes(outcome.verified),
        if outcome.powered_on { "; powered on" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Bytes per second, whole.
fn per_second(bytes: u64, seconds: f64) -> u64 {
    let millis = u64::try_from(std::time::Duration::from_secs_f64(seconds.max(0.001)).as_millis()).unwrap_or(u64::MAX);
    bytes.saturating_mul(1000) / millis.max(1)
}
