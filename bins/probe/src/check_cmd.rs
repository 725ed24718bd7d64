//! `probe check`: runs every check of the support matrix against vCenter or ESXi, for every VM
//! or the ones named, and prints pass, warn or fail per server, host, VM and disk, each with
//! its reason and fix, as a table or `--json` with a stable code per finding; the proxy host
//! itself is checked too (OS, cores, memory, free space where it writes, throttling). The exit code is
//! 0 when nothing failed, 1 when a check failed, 2 when the probe could not run.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use orchestration::config::ServeConfig;
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
    /// Only warnings and failures.
    #[arg(long)]
    problems: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    print(&findings, args.json)?;
    Ok(failed)
}

fn print(findings: &[Finding], json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    if json {
        let j = json!({
            "findings": findings,
            "summary": {"pass": count(Level::Pass), "warn": count(Level::Warn), "fail": count(Level::Fail)},
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
        return Ok(());
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
