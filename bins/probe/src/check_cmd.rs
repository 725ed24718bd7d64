//! `probe check`: runs every check of the support matrix against vCenter or ESXi, for every VM
//! or the ones named, and prints pass, warn or fail per server, host, VM and disk, each with
//! its reason and fix, as a table or `--json` with a stable code per finding; the proxy host
//! itself is checked too (OS, cores, memory, free space where it writes, throttling). With
//! `--restore-to` it checks a restore target instead: the names resolved as `proxy restore`
//! resolves them, the privileges there, the datastore's free space and the host's ESXi against
//! a restore point (or `--size` and `--hardware-version`). The exit code is 0 when nothing
//! failed, 1 when a check failed, 2 when the probe could not run.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use orchestration::config::ServeConfig;
use orchestration::preflight::restore::{DiskNeed, RestoreNeeds, TargetNames};
use orchestration::preflight::{self, Finding, Level, VddkFacts};
use orchestration::proxy_host::ProxyFacts;
use orchestration::{Selector, select_vms};
use serde_json::json;

use crate::server_args::ServerArgs;

/// Arguments of `probe check`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Check only these VMs (names, morefs, instance UUIDs or inventory paths; repeatable).
    #[arg(long)]
    vm: Vec<String>,
    /// The VDDK folder the proxy would use: checked to load, and counted as a transport.
    #[arg(long)]
    vddk_libdir: Option<PathBuf>,
    /// The port of ESXi hosts for HTTPS datastore reads.
    #[arg(long, default_value_t = 443)]
    https_port: u16,
    /// The port of ESXi hosts for VDDK's NBD transport (NFC).
    #[arg(long, default_value_t = 902)]
    nfc_port: u16,
    /// How long a port check waits.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    port_timeout: Duration,
    /// Where the proxy writes backups or replicas: its free space is checked (repeatable).
    #[arg(long)]
    target: Vec<PathBuf>,
    /// The `proxy serve` configuration: its VMs at once, `release_cpu_time` and the local
    /// repositories and replica folders of its jobs are checked.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check a restore into vSphere instead of backups: the target named by `--datacenter`,
    /// `--host`, `--cluster`, `--pool`, `--folder`, `--datastore` and `--network` (as `proxy
    /// restore` takes them), against `--repo` and `--point`, or `--size` and
    /// `--hardware-version`.
    #[arg(long, conflicts_with_all = ["vm", "vddk_libdir", "target", "config"])]
    restore_to: bool,
    #[command(flatten)]
    restore: RestoreArgs,
    /// Only warnings and failures.
    #[arg(long)]
    problems: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The restore target and what is restored, for `--restore-to`.
#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The datacenter (default: the only one).
    #[arg(long, requires = "restore_to")]
    datacenter: Option<String>,
    /// The host to restore onto.
    #[arg(long, requires = "restore_to")]
    host: Option<String>,
    /// The cluster to restore into.
    #[arg(long, requires = "restore_to")]
    cluster: Option<String>,
    /// The resource pool.
    #[arg(long, requires = "restore_to")]
    pool: Option<String>,
    /// The VM folder, as a path under the datacenter's VM folder (`prod/db`).
    #[arg(long, requires = "restore_to")]
    folder: Option<String>,
    /// The datastore (default: the only one).
    #[arg(long, requires = "restore_to")]
    datastore: Option<String>,
    /// A network the NICs would join: `Isolated`, or a `proxy restore` mapping
    /// `"VM Network=Isolated"` (repeatable).
    #[arg(long, requires = "restore_to")]
    network: Vec<String>,
    /// The disks' provisioning: `thin` (default: a disk takes its data), `thick` or
    /// `eager-zeroed` (a disk takes its capacity).
    #[arg(long = "provisioning", value_name = "KIND", action = clap::ArgAction::Set, default_value = "thin", value_parser = parse_thick, requires = "restore_to")]
    thick: bool,
    /// A local repository holding the restore point (`--point`, default `latest`).
    #[arg(long, requires = "restore_to")]
    repo: Option<PathBuf>,
    /// The key file of an encrypted repository.
    #[arg(long, requires = "repo")]
    key_file: Option<PathBuf>,
    /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`, or `latest`.
    #[arg(long, requires = "repo")]
    point: Option<String>,
    /// The VM's configuration (`.vmx`) for a point with none captured: its hardware version.
    #[arg(long, requires = "repo")]
    vmx: Option<PathBuf>,
    /// Without a repository: a disk's size (`40G`; repeatable, one per disk), counted whole.
    #[arg(long, value_parser = orchestration::config::parse_size, conflicts_with = "repo", requires = "restore_to")]
    size: Vec<u64>,
    /// Without a repository: the VM's virtual hardware version (`19` or `vmx-19`).
    #[arg(long, value_parser = parse_hardware, conflicts_with = "repo", requires = "restore_to")]
    hardware_version: Option<u32>,
}

fn parse_thick(s: &str) -> Result<bool, String> {
    match s {
        "thin" => Ok(false),
        "thick" | "eager-zeroed" | "eagerzeroedthick" => Ok(true),
        other => Err(format!("{other:?} is not thin, thick or eager-zeroed")),
    }
}

fn parse_hardware(s: &str) -> Result<u32, String> {
    preflight::restore::parse_hardware_version(s).ok_or_else(|| format!("{s:?} is not a hardware version (19, vmx-19)"))
}

pub(crate) fn run(args: &Args) -> ExitCode {
    let vddk = vddk_facts(args.vddk_libdir.as_deref());
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("probe check: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(check(args, &vddk)) {
        Ok(failed) => ExitCode::from(u8::from(failed)),
        Err(e) => {
            eprintln!("probe check: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Loads VDDK, when a folder is given, for its version.
fn vddk_facts(libdir: Option<&std::path::Path>) -> VddkFacts {
    let Some(dir) = libdir else { return VddkFacts::NotConfigured };
    if let Err(e) = vddk::ensure_library_path(dir) {
        return VddkFacts::Broken(format!("cannot prepare LD_LIBRARY_PATH for {}: {e}", dir.display()));
    }
    match vddk::Library::load(dir) {
        Ok(lib) => VddkFacts::Found(lib.version().to_string()),
        Err(e) => VddkFacts::Broken(format!("{} does not load: {e}", dir.display())),
    }
}

/// This host's facts, with the targets and throttling of `--config` when given.
fn proxy_facts(args: &Args) -> Result<ProxyFacts> {
    let mut targets = args.target.clone();
    let (mut max_vms, mut release) = (100, 0);
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let c = ServeConfig::from_toml(&text)
            .with_context(|| format!("{} is not a valid configuration", path.display()))?;
        (max_vms, release) = (c.proxy.max_vms, c.proxy.release_cpu_time);
        for j in &c.jobs {
            // Object storage has no free space to check.
            targets.extend(j.repository.as_deref().filter(|r| !r.contains("://")).map(PathBuf::from));
            targets.extend(j.replica.clone());
        }
        targets.sort();
        targets.dedup();
    }
    Ok(ProxyFacts::gather(&targets, max_vms, release))
}

/// Runs the checks and prints them; returns whether any failed.
async fn check(args: &Args, vddk: &VddkFacts) -> Result<bool> {
    if args.restore_to {
        return check_restore(args).await;
    }
    let client = args.server.login().await?;
    let result = async {
        let vms = if args.vm.is_empty() {
            None
        } else {
            let selectors: Vec<Selector> = args.vm.iter().map(|v| Selector::parse(v)).collect();
            Some(select_vms(&client, &selectors, false).await?)
        };
        let estate = preflight::gather(&client, vms).await.context("cannot read the estate")?;
        let mut findings = preflight::check_proxy(&proxy_facts(args)?, &estate);
        findings.extend(preflight::check(&estate, vddk, &HashSet::new()));
        findings.extend(preflight::check_ports(&estate, vddk, args.https_port, args.nfc_port, args.port_timeout).await);
        anyhow::Ok(findings)
    }
    .await;
    if let Err(e) = client.logout().await {
        eprintln!("probe: logging out: {e}");
    }
    let mut findings = result?;
    if args.problems {
        findings.retain(|f| f.level != Level::Pass);
    }
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    print(&findings, args.json, None)?;
    Ok(failed)
}

/// What `--restore-to` compares against: a point's disks and hardware, or the sizes and
/// version given.
fn restore_needs(r: &RestoreArgs) -> Result<RestoreNeeds> {
    let Some(path) = &r.repo else {
        let disks = r
            .size
            .iter()
            .enumerate()
            .map(|(i, s)| DiskNeed { name: format!("disk{i}"), capacity: *s, data: None })
            .collect();
        return Ok(RestoreNeeds {
            source: "the sizes given".into(),
            hardware_version: r.hardware_version,
            disks,
            thick: r.thick,
        });
    };
    let key = r.key_file.as_deref().map(repo::RepoKey::from_file).transpose()?;
    let location = repo::Location { url: path.display().to_string(), s3: repo::S3Config::from_env(), key };
    let repo =
        repo::Repo::open_at(&location).with_context(|| format!("cannot open the repository {}", path.display()))?;
    let vmx = match &r.vmx {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let point = r.point.as_deref().unwrap_or("latest");
    preflight::restore::needs_of_point(&repo, point, vmx.as_deref(), r.thick)
        .with_context(|| format!("cannot read restore point {point:?}"))
}

/// `--restore-to`: the restore target's checks; returns whether any failed.
async fn check_restore(args: &Args) -> Result<bool> {
    let r = &args.restore;
    let needs = restore_needs(r)?;
    let names = TargetNames {
        datacenter: r.datacenter.clone(),
        host: r.host.clone(),
        cluster: r.cluster.clone(),
        pool: r.pool.clone(),
        folder: r.folder.clone(),
        datastore: r.datastore.clone(),
        // A `proxy restore` mapping names its target after the `=`.
        networks: r
            .network
            .iter()
            .map(|n| n.rsplit_once('=').map_or(n.as_str(), |(_, to)| to).trim().to_owned())
            .collect(),
    };
    let client = args.server.login().await?;
    let facts = preflight::restore::gather(&client, &names, needs).await;
    if let Err(e) = client.logout().await {
        eprintln!("probe: logging out: {e}");
    }
    let facts = facts.context("cannot read the restore target")?;
    let mut findings = preflight::restore::check(&facts);
    if args.problems {
        findings.retain(|f| f.level != Level::Pass);
    }
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    let n = &facts.needs;
    let about = json!({
        "source": n.source,
        "hardware_version": n.hardware_version.map(|v| format!("vmx-{v:02}")),
        "disks": n.disks.iter().map(|d| json!({"name": d.name, "capacity": d.capacity, "data": d.data})).collect::<Vec<_>>(),
        "thick": n.thick,
        "space_needed": (!n.disks.is_empty()).then(|| preflight::restore::space_needed(n)),
    });
    print(&findings, args.json, Some(about))?;
    Ok(failed)
}

fn print(findings: &[Finding], json: bool, restore: Option<serde_json::Value>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    if json {
        let mut j = json!({
            "findings": findings,
            "summary": {"pass": count(Level::Pass), "warn": count(Level::Warn), "fail": count(Level::Fail)},
        });
        if let Some(r) = restore {
            j["restore"] = r;
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
        return Ok(());
    }
    if let Some(r) = &restore {
        let hw = r["hardware_version"].as_str();
        let disks = r["disks"].as_array().map_or(0, Vec::len);
        if hw.is_none() && disks == 0 {
            writeln!(out, "restore target only (no --repo, --size or --hardware-version to compare against)\n")?;
        } else {
            let hw = hw.unwrap_or("hardware version not given");
            let disks = if disks == 1 { "1 disk".to_owned() } else { format!("{disks} disks") };
            writeln!(out, "restore of {} ({hw}, {disks})\n", r["source"].as_str().unwrap_or("?"))?;
        }
    }
    writeln!(out, "{:<5} {:<20} {:<24} {:<8} REASON", "", "CHECK", "SUBJECT", "DISK")?;
    for f in findings {
        let mark = match f.level {
            Level::Pass => "pass",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        writeln!(
            out,
            "{mark:<5} {:<20} {:<24} {:<8} {}",
            f.code,
            f.subject,
            f.disk.as_deref().unwrap_or("-"),
            f.reason
        )?;
        if !f.fix.is_empty() {
            writeln!(out, "{:<60}fix: {}", "", f.fix)?;
        }
    }
    writeln!(out, "\n{} passed, {} warnings, {} failed", count(Level::Pass), count(Level::Warn), count(Level::Fail))?;
    Ok(())
}
