//! `proxy restore REPO POINT --url ..`: a restore point put back into vSphere, as a new VM
//! (`--name`: disks uploaded over HTTPS and converted on the datastore, its configuration from
//! the captured `.vmx`, read back and compared before it gets its name), into the original VM
//! (`--in-place`: Quick Rollback through VDDK, or whole disks swapped in), or one disk added to
//! a VM (`--disk SLOT --attach-to VM`).
//!
//! Exit codes: 0 restored (and verified); 1 nothing restored (what was made is removed, or
//! named for the next run's sweep; an interrupted write in place is named until run again).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use orchestration::restore_inplace::{self, AttachOptions, InPlaceOptions};
use orchestration::restore_job::{Progress, RestoreOptions, Upload, Verify};
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
    #[arg(long, required_unless_present_any = ["in_place", "attach_to"], conflicts_with_all = ["in_place", "attach_to"])]
    name: Option<String>,
    /// Write the point back into the VM it came from (or `--vm`): Quick Rollback (only what CBT
    /// says changed since the point) with `--vddk-libdir`, else whole disks uploaded and
    /// swapped in. Refused while the VM runs, unless `--power-off`.
    #[arg(long, conflicts_with = "attach_to")]
    in_place: bool,
    /// With `--in-place`: the VM to write into (default: the point's VM, by instance UUID).
    #[arg(long, requires = "in_place")]
    vm: Option<String>,
    /// The point's disks to restore, by slot (`scsi0:1`) or position; repeatable. With
    /// `--in-place`, only these are written (default: all); with `--attach-to`, exactly one.
    #[arg(long)]
    disk: Vec<String>,
    /// Add the point's disk `--disk` to this VM as a new disk (to copy files off it).
    #[arg(long, requires = "disk")]
    attach_to: Option<String>,
    /// With `--in-place`: power a running VM off first.
    #[arg(long, requires = "in_place")]
    power_off: bool,
    /// With `--in-place`: write every byte, even where CBT could name what changed.
    #[arg(long, requires = "in_place")]
    full: bool,
    /// Write through VMware's VDDK from this folder (the one holding `lib64/`): how
    /// `--in-place` writes only what changed. VDDK is not shipped with syncproxy.
    #[arg(long, requires = "in_place")]
    vddk_libdir: Option<PathBuf>,
    /// An InitEx configuration file for VDDK.
    #[arg(long, requires = "vddk_libdir")]
    vddk_config: Option<PathBuf>,
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
    /// Put one disk on another datastore: `--disk-datastore scsi0:1=fast-ds` (repeatable).
    #[arg(long, value_parser = parse_mapping, conflicts_with_all = ["in_place", "attach_to"])]
    disk_datastore: Vec<(String, String)>,
    /// The disks' provisioning: `thin` (default), `thick` or `eager-zeroed`.
    #[arg(long, default_value = "thin", value_parser = parse_provisioning)]
    provisioning: Provisioning,
    /// How disks are sent over HTTPS: `sparse` (default: only data, converted on the datastore;
    /// a server that cannot convert gets them flat, with a note), `flat` (every byte, no
    /// conversion: a thick disk) or `nfc` (a new VM only: an NFC import, `ImportVApp`, each
    /// disk's data as a streamOptimized VMDK).
    #[arg(long, default_value = "sparse", value_parser = parse_upload)]
    upload: Upload,
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

fn parse_upload(s: &str) -> Result<Upload, String> {
    match s {
        "sparse" => Ok(Upload::Sparse),
        "flat" => Ok(Upload::Flat),
        "nfc" => Ok(Upload::Nfc),
        other => Err(format!("{other:?} is not sparse, flat or nfc")),
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
    let vddk = match crate::backup_cmd::load_vddk(args.vddk_libdir.as_deref(), args.vddk_config.as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("proxy restore: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    crate::block_on("restore", restore(args, vddk))
}

/// Prints a restore's progress on stderr: a line per step, a rewritten line per byte count.
fn progress_printer(quiet: bool) -> impl Fn(Progress) + Sync {
    let last = std::sync::Mutex::new((String::new(), Instant::now()));
    move |p: Progress| {
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
    }
}

fn state_dir(args: &Args) -> Result<PathBuf> {
    match &args.state_dir {
        Some(d) => Ok(d.clone()),
        None => default_state_dir(),
    }
}

async fn restore(args: &Args, vddk: Option<Arc<vddk::Vddk>>) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let id = point_id(&repo, &args.point)?;
    let verify = if args.verify { Verify::Full } else { Verify::Sample };
    let Some(name) = &args.name else {
        return into_existing(args, &repo, &id, vddk, verify).await;
    };
    let options = RestoreOptions {
        name: name.clone(),
        datacenter: args.datacenter.clone(),
        host: args.host.clone(),
        cluster: args.cluster.clone(),
        pool: args.pool.clone(),
        folder: args.folder.clone(),
        datastore: args.datastore.clone(),
        disk_datastores: args.disk_datastore.clone(),
        provisioning: args.provisioning,
        upload: args.upload,
        networks: args.network.clone(),
        connect_nics: args.connect_nics,
        keep_identity: args.keep_identity,
        power_on: args.power_on,
        verify,
        state_dir: state_dir(args)?,
        vmx: match &args.vmx {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
            None => None,
        },
    };
    let client = args.server.login().await?;
    let (cancel, watcher) = cancel_on_signal();
    let progress = progress_printer(args.json);
    if !args.json {
        eprintln!("proxy restore: restoring point {id} as VM {name:?}");
    }
    let started = Instant::now();
    let outcome = orchestration::restore_job::restore_new_vm(&client, &repo, &id, &options, &progress, &cancel).await;
    watcher.abort();
    let _ = client.logout().await;
    let outcome = outcome.with_context(|| format!("restore of point {id} as {name:?}"))?;
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

/// Stops the restore cleanly on Ctrl-C: what it made is removed before it returns.
fn cancel_on_signal() -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let cancel = Arc::new(AtomicBool::new(false));
    let on_signal = cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("proxy restore: interrupted; removing what this restore made");
            on_signal.store(true, Ordering::Relaxed);
        }
    });
    (cancel, watcher)
}

/// `--in-place` and `--attach-to`: into a VM that exists.
async fn into_existing(
    args: &Args,
    repo: &repo::Repo,
    id: &str,
    vddk: Option<Arc<vddk::Vddk>>,
    verify: Verify,
) -> Result<ExitCode> {
    let client = Arc::new(args.server.login().await?);
    let (cancel, watcher) = cancel_on_signal();
    let progress = progress_printer(args.json);
    let started = Instant::now();
    let outcome = if let Some(target) = &args.attach_to {
        let [disk] = args.disk.as_slice() else { bail!("--attach-to takes exactly one --disk") };
        if !args.json {
            eprintln!("proxy restore: adding disk {disk} of point {id} to VM {target:?}");
        }
        let options = AttachOptions {
            vm: target.clone(),
            disk: disk.clone(),
            datastore: args.datastore.clone(),
            provisioning: args.provisioning,
            upload: args.upload,
            verify,
            state_dir: state_dir(args)?,
        };
        restore_inplace::attach_disk(&client, repo, id, &options, &progress, &cancel).await
    } else {
        if !args.json {
            eprintln!("proxy restore: writing point {id} back into its VM");
        }
        let options = InPlaceOptions {
            vm: args.vm.clone(),
            disks: args.disk.clone(),
            power_off: args.power_off,
            power_on: args.power_on,
            vddk,
            full: args.full,
            provisioning: args.provisioning,
            upload: args.upload,
            verify,
            state_dir: state_dir(args)?,
        };
        restore_inplace::restore_in_place(&client, repo, id, &options, &progress, &cancel).await
    };
    watcher.abort();
    let _ = client.logout().await;
    let outcome = outcome.with_context(|| format!("restore of point {id}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(ExitCode::SUCCESS);
    }
    for n in &outcome.notes {
        println!("note: {n}");
    }
    for d in &outcome.disks {
        let what = match d.changed {
            Some(c) => {
                format!("{} changed since the point, {} written", human_bytes(c), human_bytes(d.written + d.zeroed))
            }
            None => format!("{} written", human_bytes(d.written + d.zeroed)),
        };
        println!("  {:<10} {}  {}: {what}", d.slot, d.file, d.method);
        if let Some(why) = &d.full_reason {
            println!("             whole disk, because {why}");
        }
    }
    println!("data path: {}", outcome.path);
    println!(
        "restored point {} into VM {} ({}) in {:.1} s; {} read back and equal{}",
        outcome.point,
        outcome.name,
        outcome.vm,
        started.elapsed().as_secs_f64(),
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
