//! `proxy drill REPO POINT`: boots a restore point straight from the repository, in
//! isolation, on QEMU's emulation of its own VMware hardware, runs the checks, and keeps the
//! evidence (JSON and an HTML page with the console's screenshot) beside the point.
//!
//! Exit codes: 0 every check passed; 2 the drill ran and a check failed (the report says
//! which, and why); 1 the drill could not be attempted (no `.vmx`, QEMU missing, a firmware
//! limit, a bad argument).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::repo_cmd::{RepoArg, point_id};

/// `proxy drill` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    repo: RepoArg,
    /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`, or `latest`
    /// when the repository holds one VM.
    point: String,
    /// The accelerator: `auto` takes KVM only where the host's KVM can run a guest
    /// (kvm_intel or kvm_amd loaded), else TCG; `kvm` fails at once where it cannot.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    accel: drill::Accel,
    /// Put the boot disk on this controller for the drill only (`sata`, `nvme` or
    /// `virtio`), when the firmware cannot boot the original one (OVMF and pvscsi).
    #[arg(long, value_parser = parse_boot_controller)]
    boot_controller: Option<drill::BootController>,
    /// Pass when this text appears on the serial console (default: a login prompt).
    #[arg(long)]
    expect: Vec<String>,
    /// Pass when this TCP port answers inside the guest (implies the isolated network).
    #[arg(long)]
    tcp_port: Vec<u16>,
    /// Pass when the qemu-guest-agent answers `guest-ping`.
    #[arg(long)]
    guest_agent: bool,
    /// Run this script against the running VM (it gets the drill's facts in its environment);
    /// pass when it exits 0.
    #[arg(long)]
    script: Vec<PathBuf>,
    /// Give the guest a user-mode network with no route out, for the checks only.
    #[arg(long)]
    isolated_network: bool,
    /// The whole drill's time limit (`90s`, `5m`).
    #[arg(long, default_value = "5m", value_parser = crate::duration::parse)]
    timeout: Duration,
    /// Also write the report (`drill-POINT.json`, `drill-POINT.html`) into this folder.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// The VM's configuration (`.vmx`) to boot the point with, when it has none captured (an
    /// image backed up with `repo backup`) or to boot it otherwise.
    #[arg(long)]
    vmx: Option<PathBuf>,
    /// Do not keep the report in the repository.
    #[arg(long)]
    no_keep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_accel(s: &str) -> Result<drill::Accel, String> {
    s.parse()
}

fn parse_boot_controller(s: &str) -> Result<drill::BootController, String> {
    s.parse()
}

/// The checks the arguments ask for; empty means the drill's defaults.
fn checks(args: &Args) -> Vec<drill::Check> {
    let mut out: Vec<drill::Check> = args.expect.iter().map(drill::Check::serial).collect();
    out.extend(args.tcp_port.iter().map(|&port| drill::Check::tcp_port(port)));
    if args.guest_agent {
        out.push(drill::Check::guest_ping());
    }
    out.extend(args.script.iter().map(drill::Check::script));
    if !out.is_empty() && args.expect.is_empty() {
        // The boot itself stays a check: the others are meaningless if the guest never came up.
        out.insert(0, drill::default_checks().remove(0));
    }
    out
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on("drill", drill(args))
}

async fn drill(args: &Args) -> Result<ExitCode> {
    let repo = args.repo.open()?;
    let id = point_id(&repo, &args.point)?;
    let options = orchestration::drill_job::DrillOptions {
        accel: args.accel,
        boot_controller: args.boot_controller,
        checks: checks(args),
        network: if args.isolated_network || !args.tcp_port.is_empty() {
            drill::Network::Isolated
        } else {
            drill::Network::None
        },
        timeout: args.timeout,
        work_root: std::env::temp_dir(),
        keep_report: !args.no_keep,
        cache: instant::CacheConfig::default(),
        vmx: match &args.vmx {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
            None => None,
        },
    };
    let cancel = drill::Cancel::new();
    let on_signal = cancel.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("proxy drill: interrupted; stopping the VM and removing its overlays");
            on_signal.cancel();
        }
    });
    if !args.json {
        eprintln!("proxy drill: booting restore point {id} from {}", args.repo.repo);
    }
    let outcome = orchestration::drill_job::run_drill(&repo, &id, &options, cancel).await;
    watcher.abort();
    let outcome = outcome.with_context(|| format!("drill of restore point {id}"))?;
    let report = &outcome.report;
    if let Some(dir) = &args.report_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
        let json = dir.join(format!("drill-{id}.json"));
        let html = dir.join(format!("drill-{id}.html"));
        std::fs::write(&json, report.to_json()).with_context(|| format!("cannot write {}", json.display()))?;
        std::fs::write(&html, report.to_html()).with_context(|| format!("cannot write {}", html.display()))?;
        if !args.json {
            println!("report: {} and {}", json.display(), html.display());
        }
    }
    if args.json {
        println!("{}", report.to_json());
    } else {
        for line in &report.lines {
            println!("{line}");
        }
        for c in &report.checks {
            println!("  {} {:<28} {:>6.1} s  {}", if c.passed { "ok  " } else { "FAIL" }, c.name, c.seconds, c.detail);
        }
        println!(
            "drill of {} @ {}: {} ({}, {})",
            outcome.point.source.name,
            id,
            if report.passed { "PASSED" } else { "FAILED" },
            report.accel,
            report.boot_seconds.map_or("no boot marker".to_owned(), |s| format!("booted in {s:.1} s"))
        );
        if let Some(why) = &report.reason {
            println!("reason: {why}");
        }
        match &outcome.record {
            Some(r) => println!("kept in the repository as {} (shown by `proxy repo list`)", r.stored_html),
            None if args.no_keep => {}
            None => println!("the report was not kept in the repository (see the warnings above)"),
        }
    }
    Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
