//! `proxy disk-copy SRC DST`: one disk through the block pipeline, with resume, limits,
//! a progress bar on a terminal and a summary line.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nbd_wire::Uri;
use pipeline::limit::{RateLimiter, ReleaseCpuTime};
use pipeline::progress::Progress;
use pipeline::{CopyOptions, Engine, ErrorKind};
use replica::replicate::{ResumeCheck, SyncJob, sync};
use replica::state::{StateStore, SyncKey};

use crate::{endpoints, size};

/// Options of `proxy disk-copy`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Source: a raw image, block device, VMDK (with its chain), or NBD URI
    /// (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
    src: String,
    /// Destination: a file (created sparse if missing), block device, NBD URI, or `null:`
    /// (discard, to measure a source; needs --state-dir).
    dst: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Size of one request.
    #[arg(long, default_value = "4M", value_parser = size::parse)]
    request_size: u64,
    /// Cap on the memory used for buffers.
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    memory: u64,
    /// Limit in bytes per second (`100M` = 100 MiB/s).
    #[arg(long, value_parser = size::parse)]
    rate: Option<u64>,
    /// How long each stream sleeps after each request, in whole milliseconds (`4ms`; 0: full
    /// speed). With many hosts copying at once, a millisecond per concurrent host is sensible.
    #[arg(long, default_value = "0", value_parser = crate::duration::millis)]
    release_cpu_time: u32,
    /// Size of one read on the wire from an NBD source (requests are split into these).
    #[arg(long, default_value = "256K", value_parser = size::parse)]
    nbd_request_size: u64,
    /// NBD connections per end, used only when the server offers multi-conn.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Digest and planning unit on the destination.
    #[arg(long, default_value = "1M", value_parser = size::parse)]
    granularity: u64,
    /// Write a file destination with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// The NBD destination is fresh and reads as zeros: skip writing zeros.
    #[arg(long)]
    target_is_zero: bool,
    /// Where the sync state and checkpoints go (default: DST.syncproxy/ beside a file,
    /// $XDG_STATE_HOME/syncproxy/disk-copy for NBD).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Checkpoint every this many bytes copied...
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    checkpoint_every: u64,
    /// ...but no more often than this (each checkpoint flushes the destination): `2s`,
    /// `500ms`, `1m`, or `0` for bytes alone.
    #[arg(long, default_value = "2s", value_parser = crate::duration::parse)]
    checkpoint_interval: Duration,
    /// Follow a VMDK's file names anywhere (absolute paths, `..`, symbolic links out of the
    /// descriptor's directory), not only beside it; only for trusted local chains.
    #[arg(long)]
    any_path: bool,
    /// Skip the BLAKE3 digest per block (saves about 0.23 CPU-seconds per GB; nothing to
    /// verify the copy against later).
    #[arg(long)]
    no_digests: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Show no progress (a bar on a terminal, else a line every 10 s).
    #[arg(long)]
    no_progress: bool,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on("disk-copy", copy(args))
}

fn state_dir(args: &Args) -> Result<PathBuf> {
    if let Some(d) = &args.state_dir {
        return Ok(d.clone());
    }
    if !Uri::is_uri(&args.dst) {
        let mut name = Path::new(&args.dst).as_os_str().to_owned();
        name.push(".syncproxy");
        return Ok(PathBuf::from(name));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
        .context("no --state-dir, and neither XDG_STATE_HOME nor HOME is set")?;
    Ok(base.join("syncproxy/disk-copy"))
}

/// Refuses a copy whose destination is its source, by any path (a link, another name of the
/// same inode, two nodes of one block device): it would write over the bytes it has yet to read.
fn refuse_same_file(src: &str, dst: &str) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if Uri::is_uri(src) || Uri::is_uri(dst) {
        return Ok(());
    }
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst))
        && ((a.dev(), a.ino()) == (b.dev(), b.ino())
            || (a.file_type().is_block_device() && b.file_type().is_block_device() && a.rdev() == b.rdev()))
    {
        bail!(
            "{src} and {dst} are the same file (device {}, inode {}): a copy onto its own source would destroy it",
            a.dev(),
            a.ino()
        );
    }
    Ok(())
}

async fn copy(args: &Args) -> Result<ExitCode> {
    let granularity = NonZeroU64::new(args.granularity).context("--granularity must not be 0")?;
    if args.requests == 0 {
        bail!("--requests must be at least 1");
    }
    refuse_same_file(&args.src, &args.dst)?;
    let source = endpoints::open_source(
        &args.src,
        &endpoints::SourceOptions {
            connections: args.connections,
            nbd_request_size: args.nbd_request_size,
            any_path: args.any_path,
        },
    )
    .await?;
    let size = source.size();
    let sink = endpoints::open_sink(
        &args.dst,
        size,
        granularity,
        &endpoints::SinkOptions {
            connections: args.connections,
            target_is_zero: args.target_is_zero,
            direct: args.direct,
        },
    )
    .await?;
    let store = StateStore::open(state_dir(args)?)?;
    let key = SyncKey {
        vcenter: "local".into(),
        vm: String::new(),
        disk: endpoints::canonical(&args.src),
        destination: endpoints::canonical(&args.dst),
    };
    let current = cbt::CurrentDisk {
        change_id: None,
        capacity: size,
        hardware_version: 0,
        host_version: None,
        position: cbt::DiskPosition { controller: "file".into(), bus: 0, unit: 0 },
        backing: key.disk.clone(),
        allocated: None,
        reverted: false,
        fresh_snapshot: false,
        forced: None,
    };
    let job = SyncJob { source, sink, store, key, job: "disk-copy".into(), current, changes: cbt::Changes::NotQueried };

    let engine = Engine::new(args.memory);
    let options = CopyOptions {
        request_size: args.request_size,
        in_flight: args.requests,
        checkpoint_bytes: args.checkpoint_every,
        checkpoint_interval: args.checkpoint_interval,
        job_rate: args.rate.map(|r| Arc::new(RateLimiter::new(r))),
        release_cpu_time: ReleaseCpuTime(args.release_cpu_time),
        digests: !args.no_digests,
        ..CopyOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let view = crate::progress_view::copy(progress.clone(), "copying", args.no_progress || args.json);
    let cancel = engine.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nproxy disk-copy: interrupted; finishing requests in flight and saving a checkpoint");
            cancel.cancel();
        }
    });

    let result = sync(job, &engine, &options, progress.clone()).await;
    drop(view);
    let outcome = match result {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::Cancelled => {
            eprintln!("proxy disk-copy: cancelled; run the same command again to resume");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e.into()),
    };
    for w in &outcome.warnings {
        eprintln!("proxy disk-copy: warning: {w}");
    }
    let r = &outcome.report;
    let secs = r.elapsed.as_secs_f64();
    let rate = if secs > 0.0 { (r.written + r.zero + r.kept) as f64 / secs / 1e6 } else { 0.0 };
    let (checked, changed) = match outcome.resume_check {
        Some(ResumeCheck::Verified { checked, changed }) => (Some(checked), Some(changed)),
        _ => (None, None),
    };
    if args.json {
        let v = serde_json::json!({
            "copied": r.written, "zero": r.zero, "read": r.read, "read_back": r.read_back, "kept": r.kept,
            "resumed": outcome.resumed,
            "resume_check": outcome.resume_check.map(ResumeCheck::as_str),
            "resume_checked_bytes": checked, "resume_changed_bytes": changed,
            "was_inconsistent": outcome.was_dirty,
            "resumed_bytes": r.resumed, "retries": r.retries, "checkpoints": r.checkpoints,
            "seconds": secs, "mb_per_s": rate, "peak_buffer_bytes": engine.pool.peak(),
            "full_reason": outcome.full_reason.map(|f| f.to_string()),
        });
        println!("{v}");
    } else {
        let h = orchestration::human_bytes;
        println!(
            "copied {}, {} skipped as zero, {} read{}, {secs:.2} s, {rate:.1} MB/s",
            h(r.written),
            h(r.zero),
            h(r.read),
            match outcome.resume_check {
                Some(ResumeCheck::Frozen) => format!(" after resuming ({} were done)", h(r.resumed)),
                Some(ResumeCheck::Verified { checked, changed }) => format!(
                    " after resuming ({} done before were read again, as the source may have been written since; \
                     {} of them had changed and were copied again)",
                    h(checked),
                    h(changed)
                ),
                Some(ResumeCheck::StartedOver) => " from the start (the source may have been written since the \
                     interrupted copy, and without digests its copied ranges could not be checked)"
                    .to_owned(),
                None => String::new(),
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}
