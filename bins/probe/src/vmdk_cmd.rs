//! `probe vmdk FILE`: what a VMDK is and holds, as text or JSON, and `--to-raw` to write its
//! whole contents as a sparse raw image.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use vmdk::{Disk, PathPolicy, export_raw_of};

/// Arguments of `probe vmdk`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The VMDK: a descriptor, or a monolithicSparse or streamOptimized file.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Write the disk's whole contents to this raw file (sparse where zero), made durable.
    #[arg(long, value_name = "OUT")]
    to_raw: Option<PathBuf>,
    /// Reader threads for --to-raw (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Follow a VMDK's file names anywhere (absolute paths, `..`, symbolic links out of the
    /// descriptor's directory), not only beside it; only for trusted local chains.
    #[arg(long)]
    any_path: bool,
}

pub(crate) fn run(args: &Args) -> Result<()> {
    let policy = if args.any_path { PathPolicy::Anywhere } else { PathPolicy::SameDirectory };
    let disk = Disk::open(&args.file, policy).with_context(|| format!("cannot open {}", args.file.display()))?;
    let allocation = disk.allocation().context("cannot map the disk's allocation")?;
    let report = describe(&disk, &allocation);
    let export = match &args.to_raw {
        Some(out) => Some(to_raw(&disk, &allocation, out, args.threads)?),
        None => None,
    };
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let mut report = report;
        if let Some(e) = export {
            report["to_raw"] = e;
        }
        writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_text(&mut stdout, &report)?;
        if let Some(e) = export {
            writeln!(
                stdout,
                "to_raw:     {} ({} bytes read, {} written, {:.1} s, {:.0} MB/s)",
                e["path"].as_str().unwrap_or(""),
                e["read_bytes"],
                e["written_bytes"],
                e["seconds"].as_f64().unwrap_or(0.0),
                e["mb_per_second"].as_f64().unwrap_or(0.0)
            )?;
        }
    }
    Ok(())
}

fn describe(disk: &Disk, allocation: &vmdk::Allocation) -> Value {
    let top = &disk.layers()[0];
    let chain: Vec<Value> = disk
        .layers()
        .iter()
        .map(|l| {
            let d = l.descriptor.as_ref();
            json!({
                "file": l.path.display().to_string(),
                "create_type": l.create_type,
                "cid": d.and_then(vmdk::Descriptor::cid).map(|c| format!("{c:08x}")),
                "parent_cid": d.map(|d| format!("{:08x}", d.parent_cid())),
                "parent_hint": d.and_then(vmdk::Descriptor::parent_file_name_hint),
            })
        })
        .collect();
    let extents: Vec<Value> = top
        .extents
        .iter()
        .map(|e| {
            json!({
                "start": e.start,
                "length": e.len,
                "type": e.kind.keyword(),
                "file": e.file.as_ref().map(|p| p.display().to_string()),
            })
        })
        .collect();
    let ddb = |key: &str| top.descriptor.as_ref().and_then(|d| d.ddb(key)).map(str::to_owned);
    json!({
        "file": top.path.display().to_string(),
        "format": top.create_type,
        "capacity": disk.capacity(),
        "adapter_type": ddb("ddb.adapterType"),
        "hardware_version": ddb("ddb.virtualHWVersion"),
        "change_tracking": top.descriptor.as_ref().and_then(|d| d.change_track_path.as_ref()).map(|v| v.text.clone()),
        "extents": extents,
        "chain": chain,
        "allocation": {
            "data_bytes": allocation.data.total_bytes(),
            "data_ranges": allocation.data.len(),
            "zeroed_bytes": allocation.zero.total_bytes(),
            "unallocated_bytes": disk.capacity() - allocation.data.total_bytes() - allocation.zero.total_bytes(),
        },
        "warnings": disk.warnings(),
    })
}

fn print_text(out: &mut impl Write, r: &Value) -> Result<()> {
    let capacity = r["capacity"].as_u64().unwrap_or(0);
    writeln!(out, "file:       {}", r["file"].as_str().unwrap_or(""))?;
    writeln!(out, "format:     {}", r["format"].as_str().unwrap_or(""))?;
    writeln!(out, "capacity:   {capacity} bytes ({})", human(capacity))?;
    if let Some(a) = r["adapter_type"].as_str() {
        writeln!(out, "adapter:    {a}")?;
    }
    if let Some(c) = r["change_tracking"].as_str() {
        writeln!(out, "cbt file:   {c}")?;
    }
    writeln!(out, "extents:")?;
    for e in r["extents"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  {:>14} +{:<14} {:<10} {}",
            e["start"].as_u64().unwrap_or(0),
            e["length"].as_u64().unwrap_or(0),
            e["type"].as_str().unwrap_or(""),
            e["file"].as_str().unwrap_or("-")
        )?;
    }
    let chain = r["chain"].as_array().cloned().unwrap_or_default();
    writeln!(out, "chain:      {} layer(s), top first", chain.len())?;
    for l in &chain {
        writeln!(
            out,
            "  {:<22} CID {}  parentCID {}  {}",
            l["create_type"].as_str().unwrap_or(""),
            l["cid"].as_str().unwrap_or("-"),
            l["parent_cid"].as_str().unwrap_or("-"),
            l["file"].as_str().unwrap_or("")
        )?;
    }
    let a = &r["allocation"];
    let data = a["data_bytes"].as_u64().unwrap_or(0);
    writeln!(
        out,
        "allocation: {} of data in {} range(s), {} zeroed, {} unallocated",
        human(data),
        a["data_ranges"],
        human(a["zeroed_bytes"].as_u64().unwrap_or(0)),
        human(a["unallocated_bytes"].as_u64().unwrap_or(0))
    )?;
    for w in r["warnings"].as_array().into_iter().flatten() {
        writeln!(out, "warning:    {}", w.as_str().unwrap_or(""))?;
    }
    Ok(())
}

fn to_raw(disk: &Disk, allocation: &vmdk::Allocation, out: &PathBuf, threads: Option<usize>) -> Result<Value> {
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let started = Instant::now();
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let stats = export_raw_of(disk, &allocation.data, &file, threads)
        .with_context(|| format!("cannot write {}", out.display()))?;
    file.sync_all().with_context(|| format!("cannot make {} durable", out.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "path": out.display().to_string(),
        "read_bytes": stats.read,
        "written_bytes": stats.written,
        "seconds": seconds,
        "mb_per_second": stats.capacity as f64 / 1e6 / seconds.max(1e-9),
    }))
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
