//! `proxy cbt-reset VM...`: resets changed block tracking on each VM, in the form its power
//! state calls for, reports each step, checks that every disk has a new change-ID epoch, and
//! marks the named repositories and replica folders so the next copy of those disks is full.
//! Exit code 0 when every VM was reset, 1 otherwise.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};
use orchestration::cbt_reset::cbt_reset;
use orchestration::{ReplicaTarget, Selector, select_vms};
use repo::{Location, S3Config, Store};

use crate::server_args::ServerArgs;

/// Arguments of `proxy cbt-reset`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// The VMs (names, morefs, instance UUIDs or inventory paths).
    #[arg(required = true)]
    vms: Vec<String>,
    /// A repository (a directory or s3://bucket/prefix) whose next backup of these VMs must
    /// be full (repeatable).
    #[arg(long)]
    repository: Vec<String>,
    /// A replica folder (of `proxy replicate`) whose next sync of these VMs must be full
    /// (repeatable).
    #[arg(long)]
    replica: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on("cbt-reset", reset(args))
}

/// The stores to mark: each repository's and each replica folder's.
fn marks(args: &Args) -> Result<Vec<Arc<dyn Store>>> {
    let mut out = Vec::new();
    for url in &args.repository {
        let store = Location { url: url.clone(), s3: S3Config::from_env(), key: None }.store()?;
        if store.get("config")?.is_none() {
            bail!("{url} is not a repository (no config): nothing marked, nothing reset");
        }
        out.push(store);
    }
    for dir in &args.replica {
        out.push(ReplicaTarget::open(dir)?.leases.clone());
    }
    Ok(out)
}

async fn reset(args: &Args) -> Result<ExitCode> {
    let marks = marks(args)?;
    let client = args.server.login().await?;
    let result = async {
        let selectors: Vec<Selector> = args.vms.iter().map(|v| Selector::parse(v)).collect();
        let vms = select_vms(&client, &selectors, false).await?;
        let mut reports = Vec::new();
        let mut failed = 0;
        for vm in &vms {
            match cbt_reset(&client, &vm.moref, &marks).await {
                Ok(r) => reports.push(serde_json::json!({"vm": r.vm, "ok": true, "report": r})),
                Err(e) => {
                    failed += 1;
                    reports.push(serde_json::json!({"vm": vm.name, "ok": false, "error": e.to_string()}));
                }
            }
        }
        anyhow::Ok((reports, failed))
    }
    .await;
    if let Err(e) = client.logout().await {
        eprintln!("proxy cbt-reset: logging out: {e}");
    }
    let (reports, failed) = result?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&serde_json::json!({"vms": reports}))?)?;
    } else {
        for r in &reports {
            if r["ok"] == true {
                let rep = &r["report"];
                writeln!(out, "{} ({}):", r["vm"].as_str().unwrap_or(""), rep["form"].as_str().unwrap_or(""))?;
                for s in rep["steps"].as_array().into_iter().flatten() {
                    writeln!(out, "  - {}", s.as_str().unwrap_or(""))?;
                }
                for d in rep["disks"].as_array().into_iter().flatten() {
                    writeln!(out, "  {}: change ID {} -> {}", d[0], d[1], d[2])?;
                }
                for w in rep["warnings"].as_array().into_iter().flatten() {
                    writeln!(out, "  WARNING: {}", w.as_str().unwrap_or(""))?;
                }
            } else {
                writeln!(out, "{}: NOT RESET: {}", r["vm"].as_str().unwrap_or(""), r["error"].as_str().unwrap_or(""))?;
            }
        }
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
