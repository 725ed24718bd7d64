//! `proxy repo ...`: the one command tree for repository work, over a local path or an
//! `s3://bucket/prefix` URL (credentials from the `AWS_*` environment variables, never from
//! arguments): init, backup of an image, VMDK or NBD export, list, restore, verify, prune, gc
//! and copy.

use std::io::BufWriter;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cbt::ExtentSet;
use nbd_wire::Uri;
use orchestration::human_bytes;
use pipeline::Digests;
use pipeline::progress::Progress;
use pipeline::{BlockSink, BlockSource, CopyOptions, DiskCopy, Engine, copy_disk};
use repo::{Consistency, DiskSpec, Location, Repo, RepoKey, Retention, S3Config, SourceInfo};

use crate::endpoints;
use crate::size;

/// Where a repository is.
#[derive(Debug, clap::Args)]
pub(crate) struct RepoArg {
    /// The repository: a directory, or `s3://bucket/prefix` (endpoint and keys from
    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
    pub(crate) repo: String,
    /// Allow a plain-HTTP S3 endpoint that is not on this machine (the data would cross the
    /// network unencrypted).
    #[arg(long)]
    s3_allow_http: bool,
    /// The key file of an encrypted repository (64 hex digits; keep a copy away from the
    /// repository: without it nothing in the repository can be read).
    #[arg(long)]
    key_file: Option<PathBuf>,
}

impl RepoArg {
    fn s3(&self) -> S3Config {
        S3Config { allow_http: self.s3_allow_http, ..S3Config::from_env() }
    }

    fn location(&self) -> Result<Location> {
        let key = self.key_file.as_deref().map(RepoKey::from_file).transpose()?;
        Ok(Location { url: self.repo.clone(), s3: self.s3(), key })
    }

    pub(crate) fn open(&self) -> Result<Repo> {
        Ok(Repo::open_at(&self.location()?)?)
    }
}

/// Repository commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum RepoCommand {
    /// Make a new, empty repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
        /// The chunk size: a power of two from 64K to 64M. Every chunk an incremental touches
        /// is stored whole, so smaller chunks store less for scattered changes, at the cost of
        /// a larger index and more chunk files.
        #[arg(long, default_value = "1M", value_parser = size::parse)]
        chunk_size: u64,
        /// Encrypt it (AES-256-GCM, keyed chunk names) with the key in --key-file, which is
        /// made (readable by its owner only) when it does not exist.
        #[arg(long, requires = "key_file")]
        encrypt: bool,
    },
    /// Back up a disk image, VMDK (with its chain) or NBD export as a new restore point.
    Backup(BackupArgs),
    /// List the restore points, grouped by VM (or image), oldest first.
    List {
        #[command(flatten)]
        repo: RepoArg,
        /// Only this VM's (or image's) points.
        #[arg(long)]
        vm: Option<String>,
        /// Only points from this UTC time on: `2026-12-01`, `2026-12-01T02`, or a full time.
        #[arg(long)]
        since: Option<String>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove one restore point (refused while it is protected); `repo gc` then frees the
    /// chunks no other point uses.
    Forget {
        #[command(flatten)]
        repo: RepoArg,
        /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`.
        point: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// What the repository holds: per VM its points and the data they added, in all the
    /// logical bytes its points reference, the unique bytes behind them (deduplication), what
    /// the chunk files take (compression, for a local repository), and the growth per day.
    Stats {
        #[command(flatten)]
        repo: RepoArg,
        /// As JSON (exact bytes).
        #[arg(long)]
        json: bool,
    },
    /// Protect a restore point from prune and forget, with a note saying why.
    Protect {
        #[command(flatten)]
        repo: RepoArg,
        /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`.
        point: String,
        /// Why it is kept (shown by `repo list`).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Remove a restore point's protection.
    Unprotect {
        #[command(flatten)]
        repo: RepoArg,
        /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`.
        point: String,
    },
    /// Restore a disk of a restore point to a raw file (sparse), a block device, an NBD
    /// export, or a streamOptimized VMDK (when DST ends in `.vmdk`). A file is written beside
    /// DST under a temporary name and renamed over DST only once complete and synced, so a
    /// failed restore leaves DST as it was; a block device or an NBD export is written in
    /// place, and a failed restore leaves it partly written.
    Restore {
        #[command(flatten)]
        repo: RepoArg,
        /// The restore point: its ID (or a unique prefix), `VM@latest`, `VM@2026-12-01`, or
        /// `latest` when the repository holds one VM.
        point: String,
        /// Where to.
        dst: String,
        /// Replace DST when it is an existing file (a block device or NBD export needs no
        /// --force: it is written in place).
        #[arg(long)]
        force: bool,
        /// Which disk of the restore point: its slot (`scsi0:1`), its label (`Hard disk 2`), or
        /// its position (`0`, the first).
        #[arg(long, default_value = "0")]
        disk: String,
        /// Show no progress (a bar on a terminal, else a line every 10 s).
        #[arg(long)]
        no_progress: bool,
        /// Restore this configuration file of the restore point to DST instead of a disk.
        #[arg(long, conflicts_with = "disk")]
        file: Option<String>,
    },
    /// Re-read and re-hash every chunk; name the restore points that are damaged.
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// Show no progress (a bar on a terminal, else a line every 10 s).
        #[arg(long)]
        no_progress: bool,
    },
    /// Remove the restore points a retention policy does not keep (per source).
    Prune {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keep: KeepArgs,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove chunks no restore point needs (waits for no backup; refuses while one runs).
    Gc {
        #[command(flatten)]
        repo: RepoArg,
        /// Unused chunks younger than this stay (`1h`, `30m`, `0s`).
        #[arg(long, default_value = "1h", value_parser = crate::duration::parse)]
        grace: Duration,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// Show no progress (a bar on a terminal, else a line every 10 s).
        #[arg(long)]
        no_progress: bool,
    },
    /// Copy restore points to another repository (an S3 copy for 3-2-1); resumable.
    Copy {
        #[command(flatten)]
        repo: RepoArg,
        /// The destination repository (made if it does not exist, with the source's chunk size).
        dst: String,
        /// Only these restore points (repeatable); all by default.
        #[arg(long)]
        point: Vec<String>,
        /// The destination's key file, when it is encrypted (chunks are re-encoded when the
        /// keys differ). A destination made by the copy is encrypted with it.
        #[arg(long)]
        dst_key_file: Option<PathBuf>,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// Show no progress (a bar on a terminal, else a line every 10 s).
        #[arg(long)]
        no_progress: bool,
    },
}

/// A retention policy.
#[derive(Debug, clap::Args)]
pub(crate) struct KeepArgs {
    /// The newest N.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// The newest in each of the last N hours.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// ... days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// ... weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// ... months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// ... years.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

/// Options of `proxy repo backup`.
#[derive(Debug, clap::Args)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// A raw image or block device, a VMDK, or an NBD URI.
    src: String,
    /// The source's name in the repository (default: the path or URI).
    #[arg(long)]
    name: Option<String>,
    /// The restore point to start from: an ID, `latest` (the newest of the same name and
    /// size; the default) or `none` (a full backup).
    #[arg(long, default_value = "latest")]
    parent: String,
    /// A file of changed areas, one `OFFSET LENGTH` pair in bytes per line (`#` comments):
    /// only those are read, everything else comes from the parent. Without it everything
    /// allocated is read and only chunks that differ are stored.
    #[arg(long)]
    changed: Option<PathBuf>,
    /// Record the restore point as application-consistent (the guest was quiesced).
    #[arg(long)]
    application_consistent: bool,
    /// A configuration file to keep with the restore point (`.vmx`, `.nvram`; repeatable).
    #[arg(long)]
    file: Vec<PathBuf>,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Cap on the memory used for buffers.
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    memory: u64,
    /// NBD connections, used only when the server offers multi-conn.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Follow a VMDK's file names anywhere (absolute paths, `..`, symbolic links out of the
    /// descriptor's directory), not only beside it; only for trusted local chains.
    #[arg(long)]
    any_path: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Show no progress (a bar on a terminal, else a line every 10 s).
    #[arg(long)]
    no_progress: bool,
    /// Hash every byte twice, as before the repository took the copy engine's digests as its
    /// chunk IDs: only for `cargo xtask bench repo`'s before-and-after.
    #[arg(long, hide = true)]
    hash_twice: bool,
}

pub(crate) fn run(cmd: RepoCommand) -> ExitCode {
    crate::block_on("repo", dispatch(cmd))
}

async fn dispatch(cmd: RepoCommand) -> Result<ExitCode> {
    match cmd {
        RepoCommand::Init { repo, chunk_size, encrypt } => init(&repo, chunk_size, encrypt),
        RepoCommand::Backup(args) => backup(&args).await,
        RepoCommand::List { repo, vm, since, json } => list(&repo.open()?, vm.as_deref(), since.as_deref(), json),
        RepoCommand::Forget { repo, point, json } => {
            let r = repo.open()?;
            let m = r.resolve_point(&point)?;
            r.forget(&m.id)?;
            if json {
                println!("{}", serde_json::json!({"forgotten": m.id, "source": m.source.name, "time": m.time}));
            } else {
                println!(
                    "forgot restore point {} of {} ({}); `proxy repo gc` frees its chunks",
                    m.id, m.source.name, m.time
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Stats { repo, json } => {
            let local = (!repo.repo.starts_with("s3://")).then(|| PathBuf::from(&repo.repo));
            stats(&repo.open()?, local.as_deref(), json)
        }
        RepoCommand::Protect { repo, point, note } => {
            let r = repo.open()?;
            let m = r.resolve_point(&point)?;
            r.protect(&m.id, &note)?;
            println!("protected restore point {} of {} ({}) from prune and forget", m.id, m.source.name, m.time);
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Unprotect { repo, point } => {
            let r = repo.open()?;
            let m = r.resolve_point(&point)?;
            let was = r.unprotect(&m.id)?;
            println!(
                "restore point {} of {} {}",
                m.id,
                m.source.name,
                if was { "is no longer protected" } else { "was not protected" }
            );
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Restore { repo, point, dst, disk, file, force, no_progress } => {
            let r = repo.open()?;
            match file {
                Some(name) => restore_file(&r, &point, &name, Path::new(&dst)),
                None => restore(&r, &point, &dst, &disk, force, no_progress).await,
            }
        }
        RepoCommand::Verify { repo, json, no_progress } => verify(&repo.open()?, json, no_progress || json),
        RepoCommand::Prune { repo, keep, dry_run, json } => prune(&repo.open()?, &keep, dry_run, json),
        RepoCommand::Gc { repo, grace, dry_run, json, no_progress } => {
            gc(&repo.open()?, grace, dry_run, json, no_progress || json)
        }
        RepoCommand::Copy { repo, dst, point, dst_key_file, json, no_progress } => {
            let src = repo.open()?;
            let key = dst_key_file.as_deref().map(RepoKey::from_file).transpose()?;
            let dst_loc = Location { url: dst.clone(), s3: repo.s3(), key };
            let dest = match Repo::open_at(&dst_loc) {
                Ok(r) => r,
                Err(repo::RepoError::NotFound(_)) => Repo::init_at(&dst_loc, src.config().chunk_size)?,
                Err(e) => return Err(e.into()),
            };
            let only = (!point.is_empty()).then_some(point.as_slice());
            let steps = Arc::new(repo::Steps::default());
            let view = crate::progress_view::steps(steps.clone(), no_progress || json);
            let r = src.copy_to_with(&dest, only, &steps)?;
            drop(view);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"points_copied": r.points_copied, "points_present": r.points_present,
                    "chunks_copied": r.chunks_copied, "chunks_present": r.chunks_present, "bytes_copied": r.bytes_copied})
                );
            } else {
                println!(
                    "copied {} restore points to {dst} ({} chunks, {}; {} chunks and {} restore points were \
                     already there)",
                    r.points_copied.len(),
                    r.chunks_copied,
                    human_bytes(r.bytes_copied),
                    r.chunks_present,
                    r.points_present
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `init`: nothing is written (no key file either) unless the repository can be made.
fn init(repo: &RepoArg, chunk_size: u64, encrypt: bool) -> Result<ExitCode> {
    let chunk = u32::try_from(chunk_size).context("--chunk-size is too large")?;
    let mut loc = Location { url: repo.repo.clone(), s3: repo.s3(), key: None };
    let r = match (&repo.key_file, encrypt) {
        (Some(path), true) if !path.exists() => {
            let r = Repo::init_with_new_key(&loc, chunk, path)?;
            eprintln!(
                "proxy repo: made the key file {}; keep a copy somewhere safe and apart from the repository: \
                 without it, nothing in the repository can be restored",
                path.display()
            );
            r
        }
        (Some(path), true) => {
            loc.key = Some(RepoKey::from_file(path)?);
            Repo::init_at(&loc, chunk)?
        }
        (Some(_), false) => bail!("--key-file at init needs --encrypt"),
        (None, _) => Repo::init_at(&loc, chunk)?,
    };
    println!(
        "initialised {}repository {} at {} (chunks of {chunk} bytes)",
        if encrypt { "encrypted " } else { "" },
        r.config().id,
        repo.repo
    );
    Ok(ExitCode::SUCCESS)
}

async fn backup(args: &BackupArgs) -> Result<ExitCode> {
    if args.requests == 0 {
        bail!("--requests must be at least 1");
    }
    let repo = args.repo.open()?;
    let opts = endpoints::SourceOptions {
        connections: args.connections,
        nbd_request_size: 256 << 10,
        any_path: args.any_path,
    };
    let source = endpoints::open_source(&args.src, &opts).await?;
    let size = source.size();
    let name = args.name.clone().unwrap_or_else(|| endpoints::canonical(&args.src));
    let parent = match args.parent.as_str() {
        "none" => None,
        "latest" => repo
            .points()?
            .into_iter()
            .rev()
            .find(|p| p.source.name == name && p.disks.first().is_some_and(|d| d.capacity == size))
            .map(|p| p.id),
        id => Some(repo.point(id)?.id),
    };
    let changed = match &args.changed {
        Some(path) => {
            if parent.is_none() {
                bail!("--changed needs a parent restore point to take the unchanged areas from");
            }
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(cbt::parse_areas(&text, size).with_context(|| format!("{}", path.display()))?)
        }
        None => None,
    };
    let disk_name = Path::new(&name).file_name().map_or_else(|| name.clone(), |n| n.to_string_lossy().into_owned());
    let mut b = repo.begin(
        parent.as_deref(),
        vec![DiskSpec { name: disk_name, capacity: size, change_id: None, committed: None, label: None }],
    )?;
    for path in &args.file {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().context("--file needs a file name")?.to_string_lossy();
        b.add_file(&name, &data)?;
    }
    let repo_sink = b.sink(0).context("the backup has no sink")?;
    if args.hash_twice {
        repo_sink.hash_chunks_again();
    }
    let sink: Arc<dyn BlockSink> = repo_sink.clone();
    let g = sink.granularity();
    // Only the source's own extents are read (of those, only the changed ones for an
    // incremental); chunks are completed with zeros, or from the parent for what did not change.
    let data = match source.allocation().await? {
        Some(a) => a.data.clamp(size),
        None => ExtentSet::full(size),
    };
    let (read, zero, fetch, keep) = match changed {
        Some(c) => {
            let read = c.align_outward(g, size);
            let keep = read.difference(&c);
            (read, ExtentSet::new(), c.intersection(&data), keep)
        }
        None => {
            let read = data.align_outward(g, size);
            let zero = read.complement(size);
            (read, zero, data, ExtentSet::new())
        }
    };
    let job = DiskCopy {
        read: read.clone(),
        zero,
        fetch: Some(fetch),
        keep,
        digests: Digests::zeros(g.get(), size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    let engine = Engine::new(args.memory);
    // The copy keeps no digests: a plain repository's sink takes them as its chunk IDs anyway.
    let options = CopyOptions {
        in_flight: args.requests,
        digests: args.hash_twice,
        retry_for: pipeline::PATIENCE,
        ..CopyOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let view =
        crate::progress_view::copy(progress.clone(), &format!("backing up {name}"), args.no_progress || args.json);
    let report = copy_disk(job, &engine, &options, progress).await?;
    drop(view);
    sink.commit().await?;
    let stats = repo_sink.stats();
    let consistency = if args.application_consistent { Consistency::Application } else { Consistency::Crash };
    let m = b.finish(SourceInfo { name, instance_uuid: None }, consistency)?;
    let secs = report.elapsed.as_secs_f64();
    let rate = if secs > 0.0 { report.read as f64 / secs / 1e6 } else { 0.0 };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"point": m.id, "parent": m.parent, "read": report.read, "read_back": report.read_back, "planned": read.total_bytes(),
            "stored_chunks": stats.stored_chunks, "stored_bytes": stats.stored_bytes,
            "deduplicated_chunks": stats.deduplicated, "seconds": secs, "mb_per_s": rate})
        );
    } else {
        println!(
            "restore point {} ({}): read {}, stored {} new chunks ({}), {} already stored, {secs:.2} s, {rate:.1} MB/s",
            m.id,
            m.parent.as_deref().map_or_else(|| "full".to_owned(), |p| format!("incremental from {p}")),
            human_bytes(report.read),
            stats.stored_chunks,
            human_bytes(stats.stored_bytes),
            stats.deduplicated
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list(repo: &Repo, vm: Option<&str>, since: Option<&str>, json: bool) -> Result<ExitCode> {
    let all = repo.points()?;
    let points: Vec<&repo::Manifest> = all
        .iter()
        .filter(|p| vm.is_none_or(|v| p.source.name == v))
        .filter(|p| since.is_none_or(|s| p.time.as_str() >= s))
        .collect();
    if let Some(v) = vm
        && points.is_empty()
        && !all.iter().any(|p| p.source.name == v)
    {
        let mut names: Vec<&str> = all.iter().map(|p| p.source.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        bail!("no restore points of {v:?}; the repository has points of: {}", names.join(", "));
    }
    let drills: Vec<Vec<repo::DrillRecord>> =
        points.iter().map(|p| repo.drill_reports(&p.id)).collect::<Result<_, _>>()?;
    let protections: Vec<Option<repo::Protection>> =
        points.iter().map(|p| repo.protection(&p.id)).collect::<Result<_, _>>()?;
    if json {
        // Each manifest as it is stored, with the drills and protection of the point beside it.
        let mut out = Vec::new();
        for ((p, d), prot) in points.iter().zip(&drills).zip(&protections) {
            let mut v = serde_json::to_value(p)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("drills".into(), serde_json::to_value(d)?);
                o.insert("protected".into(), serde_json::to_value(prot)?);
            }
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if points.is_empty() {
        println!("no restore points");
        return Ok(ExitCode::SUCCESS);
    }
    let mut by_vm: std::collections::BTreeMap<&str, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        by_vm.entry(p.source.name.as_str()).or_default().push(i);
    }
    for (name, idx) in &by_vm {
        let newest = idx.last().map_or("", |&i| points[i].time.get(..19).unwrap_or(&points[i].time));
        println!("{name}: {} restore point(s), newest {newest}", idx.len());
        println!(
            "  {:<36}  {:<20}  {:<11}  {:>9}  {:>9}  DISKS",
            "ID", "TIME (UTC)", "CONSISTENCY", "SIZE", "NEW DATA"
        );
        for &i in idx {
            let p = points[i];
            let size: u64 = p.disks.iter().map(|d| d.capacity).sum();
            let stored: u64 = p.disks.iter().map(|d| d.stored_bytes).sum();
            let disks: Vec<String> = p
                .disks
                .iter()
                .map(|d| match &d.label {
                    Some(l) => format!("{} ({l})", d.name),
                    None => d.name.clone(),
                })
                .collect();
            let consistency = match p.consistency {
                Consistency::Application => "application",
                Consistency::Crash => "crash",
            };
            println!(
                "  {:<36}  {:<20}  {consistency:<11}  {:>9}  {:>9}  {}{}",
                p.id,
                p.time.get(..19).unwrap_or(&p.time),
                orchestration::human_bytes(size),
                orchestration::human_bytes(stored),
                disks.join(", "),
                if p.files.is_empty() {
                    String::new()
                } else {
                    format!("  files: {}", p.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "))
                }
            );
            if let Some(prot) = &protections[i] {
                println!(
                    "      protected since {}{}",
                    if prot.time.is_empty() { "?" } else { &prot.time },
                    if prot.note.is_empty() { String::new() } else { format!(": {}", prot.note) }
                );
            }
            if let Some(d) = drills[i].last() {
                println!(
                    "      drill {}: {}{}",
                    d.time,
                    d.summary,
                    if drills[i].len() > 1 { format!(" ({} drills in all)", drills[i].len()) } else { String::new() }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The restore point `point` names: an ID or a unique prefix of one, `VM@latest`, `VM@DATE`,
/// or `latest` where the repository holds one VM's points only.
pub(crate) fn point_id(repo: &Repo, point: &str) -> Result<String> {
    Ok(repo.resolve_point(point)?.id)
}

fn restore_file(repo: &Repo, point: &str, name: &str, dst: &Path) -> Result<ExitCode> {
    let id = point_id(repo, point)?;
    let _lock = repo.lock(repo::LockKind::Shared, &format!("restore of {id}"))?;
    let m = repo.point(&id)?;
    let data = repo.file(&m, name)?;
    let mut f =
        std::fs::File::create_new(dst).with_context(|| format!("creating {} (never over a file)", dst.display()))?;
    std::io::Write::write_all(&mut f, &data)?;
    f.sync_all()?;
    println!("restored {name} of {id} to {} ({} bytes)", dst.display(), data.len());
    Ok(ExitCode::SUCCESS)
}

/// Where a disk restore writes.
enum RestoreTarget {
    /// A block device or an NBD export, written in place.
    InPlace,
    /// A file, written as `tmp` beside `target` and renamed over it at the end.
    File { target: PathBuf, tmp: PathBuf, permissions: Option<std::fs::Permissions> },
}

/// Decides where a restore to `dst` writes: in place on a device or an NBD export; through a
/// temporary file beside it otherwise, over an existing file only with `force`.
fn restore_target(dst: &str) -> Result<RestoreTarget> {
    if Uri::is_uri(dst) {
        return Ok(RestoreTarget::InPlace);
    }
    let path = Path::new(dst);
    let (target, permissions) = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!("{dst} is a directory; name the file to restore to"),
        Ok(m) if !m.is_file() => return Ok(RestoreTarget::InPlace),
        // Through a link, the file it leads to is the one replaced.
        Ok(m) => (std::fs::canonicalize(path).with_context(|| format!("resolving {dst}"))?, Some(m.permissions())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (path.to_path_buf(), None),
        Err(e) => return Err(e).with_context(|| format!("examining {dst}")),
    };
    let name = target.file_name().with_context(|| format!("{dst} names no file"))?.to_string_lossy();
    let tmp = target.with_file_name(format!(".{name}.restore-{}.tmp", std::process::id()));
    Ok(RestoreTarget::File { target, tmp, permissions })
}

async fn restore(repo: &Repo, point: &str, dst: &str, which: &str, force: bool, quiet: bool) -> Result<ExitCode> {
    let target = restore_target(dst)?;
    if let RestoreTarget::File { permissions: Some(_), .. } = &target
        && !force
    {
        bail!("{dst} exists; pass --force to replace it (it is replaced only once the restore is complete)");
    }
    let id = point_id(repo, point)?;
    let _lock = repo.lock(repo::LockKind::Shared, &format!("restore of {id}"))?;
    let m = repo.point(&id)?;
    let n = m.disk_index(which)?;
    let disk = match &m.disks[n].label {
        Some(label) => format!("{} ({label})", m.disks[n].name),
        None => m.disks[n].name.clone(),
    };
    let reader = repo.reader(&id, n)?;
    let RestoreTarget::File { target, tmp, permissions } = target else {
        let report = restore_disk(reader, dst, quiet).await?;
        println!(
            "restored {id} disk {disk} to {dst} (in place): {} of data, {} of zeros",
            human_bytes(report.written),
            human_bytes(report.zero)
        );
        return Ok(ExitCode::SUCCESS);
    };
    let written = async {
        let what = if dst.to_ascii_lowercase().ends_with(".vmdk") {
            // The descriptor names the extent by the file's final name.
            let extent = target.file_name().map_or_else(|| "disk.vmdk".into(), |n| n.to_string_lossy().into_owned());
            let stats = restore_vmdk(reader, tmp.clone(), extent).await?;
            format!("streamOptimized VMDK, {} bytes", stats.file_bytes)
        } else {
            let report = restore_disk(reader, &tmp.display().to_string(), quiet).await?;
            format!("{} of data, {} of zeros", human_bytes(report.written), human_bytes(report.zero))
        };
        if let Some(p) = permissions {
            std::fs::set_permissions(&tmp, p)
                .with_context(|| format!("setting the permissions of {}", tmp.display()))?;
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("renaming {} onto {}", tmp.display(), target.display()))?;
        durable::sync_parent(&target)?;
        anyhow::Ok(what)
    }
    .await;
    match written {
        Ok(what) => {
            println!("restored {id} disk {disk} to {dst}: {what}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("restoring {id} disk {disk}: {dst} is left as it was")))
        }
    }
}

/// Writes a restore point's disk as a streamOptimized VMDK at `out`.
async fn restore_vmdk(reader: repo::PointReader, out: PathBuf, extent: String) -> Result<vmdk::StreamStats> {
    let size = reader.size();
    let alloc = reader.allocation().await?.map(|a| a.data);
    tokio::task::spawn_blocking(move || -> Result<vmdk::StreamStats> {
        let f = std::fs::File::create_new(&out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::new(f);
        let stats = vmdk::write_stream_optimized(
            &mut w,
            &orchestration::restore_job::PointAt::new(reader),
            size,
            alloc.as_ref(),
            &extent,
        )?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(stats)
    })
    .await?
}

/// Copies a restore point's disk onto `dst` (a file, block device or NBD export) through the
/// pipeline, and commits the sink.
async fn restore_disk(reader: repo::PointReader, dst: &str, quiet: bool) -> Result<pipeline::CopyReport> {
    let size = reader.size();
    let granularity = NonZeroU64::new(1 << 20).context("granularity")?;
    let sink = endpoints::open_sink(dst, size, granularity, &endpoints::SinkOptions::default()).await?;
    let source: Arc<dyn BlockSource> = Arc::new(reader);
    let alloc = source.allocation().await?.unwrap_or_default();
    let job = DiskCopy {
        read: alloc.data.align_outward(granularity, size),
        zero: alloc.zero.difference(&alloc.data.align_outward(granularity, size)),
        fetch: Some(alloc.data.clone()),
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(granularity.get(), size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    let progress = Arc::new(Progress::default());
    let view = crate::progress_view::copy(progress.clone(), "restoring", quiet);
    let report = copy_disk(job, &Engine::new(256 << 20), &CopyOptions::default(), progress).await?;
    drop(view);
    sink.commit().await?;
    Ok(report)
}

fn verify(repo: &Repo, json: bool, quiet: bool) -> Result<ExitCode> {
    let steps = Arc::new(repo::Steps::default());
    let view = crate::progress_view::steps(steps.clone(), quiet);
    let r = repo.verify_with(&steps)?;
    drop(view);
    if json {
        println!(
            "{}",
            serde_json::json!({"chunks_checked": r.chunks_checked,
            "bad_chunks": r.bad_chunks.iter().map(|(n, why)| serde_json::json!({"file": n, "error": why})).collect::<Vec<_>>(),
            "damaged_points": r.damaged_points})
        );
    } else {
        for (file, why) in &r.bad_chunks {
            println!("damaged: {file}: {why}");
        }
        for (point, disks) in &r.damaged_points {
            println!("restore point {point} cannot be restored whole (disks: {})", disks.join(", "));
        }
        println!(
            "{} chunks checked; {} damaged files; {} damaged restore points",
            r.chunks_checked,
            r.bad_chunks.len(),
            r.damaged_points.len()
        );
    }
    Ok(if r.damaged_points.is_empty() && r.bad_chunks.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

/// `gc`: exits 2, naming them, while manifests that cannot be read keep it from sweeping.
fn gc(repo: &Repo, grace: Duration, dry_run: bool, json: bool, quiet: bool) -> Result<ExitCode> {
    let steps = Arc::new(repo::Steps::default());
    let view = crate::progress_view::steps(steps.clone(), quiet);
    let r = repo.gc_with(grace, dry_run, &steps)?;
    drop(view);
    let verb = if dry_run { "would remove" } else { "removed" };
    if json {
        println!(
            "{}",
            serde_json::json!({"dry_run": dry_run, "chunks_in_use": r.chunks_in_use,
            "chunks_removed": r.chunks_removed, "chunks_in_grace": r.chunks_in_grace,
            "indexes_removed": r.indexes_removed, "registrations_removed": r.registrations_removed,
            "temporaries_removed": r.temporaries_removed, "markers_removed": r.markers_removed,
            "unreadable": r.unreadable})
        );
    } else {
        for bad in &r.unreadable {
            eprintln!("proxy repo gc: cannot read {bad}");
        }
        if !r.unreadable.is_empty() {
            eprintln!(
                "proxy repo gc: swept nothing: the chunks only an unreadable manifest names cannot be told from \
                 garbage; restore those manifests (from a copy) or remove them, then run gc again"
            );
        }
        println!(
            "{} chunks in use; {verb} {} unused chunks, {} index folders, {} abandoned backup registrations, {} \
             temporary files and {} protection markers of points that are gone; {} unused chunks are within the \
             grace period",
            r.chunks_in_use,
            r.chunks_removed,
            r.indexes_removed,
            r.registrations_removed,
            r.temporaries_removed,
            r.markers_removed,
            r.chunks_in_grace
        );
    }
    Ok(if r.unreadable.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn prune(repo: &Repo, keep: &KeepArgs, dry_run: bool, json: bool) -> Result<ExitCode> {
    let policy = Retention {
        last: keep.keep_last,
        hourly: keep.keep_hourly,
        daily: keep.keep_daily,
        weekly: keep.keep_weekly,
        monthly: keep.keep_monthly,
        yearly: keep.keep_yearly,
    };
    let r = repo.prune(&policy, dry_run)?;
    if json {
        let d: Vec<_> = r
            .decisions
            .iter()
            .map(|d| serde_json::json!({"point": d.id, "source": d.source, "keep": !d.reasons.is_empty(), "reasons": d.reasons}))
            .collect();
        println!("{}", serde_json::json!({"dry_run": dry_run, "decisions": d, "removed": r.removed}));
    } else {
        for d in &r.decisions {
            if d.reasons.is_empty() {
                println!("{} {}  {}", if dry_run { "would remove" } else { "removed" }, d.id, d.source);
            } else {
                println!("keep {}  {}  ({})", d.id, d.source, d.reasons.join(", "));
            }
        }
        println!("run `proxy repo gc` to free the chunks only removed restore points used");
    }
    Ok(ExitCode::SUCCESS)
}

/// The bytes of every file under `dir` (a local repository's chunk files).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn stats(repo: &Repo, local: Option<&Path>, json: bool) -> Result<ExitCode> {
    use std::collections::{BTreeMap, HashSet};
    let points = repo.points()?;
    let chunk = u64::from(repo.config().chunk_size);
    let mut unique: HashSet<[u8; 32]> = HashSet::new();
    let mut logical = 0u64;
    // Per VM: points, newest time, the newest point's data, the bytes its points added.
    let mut vms: BTreeMap<&str, (u64, &str, u64, u64)> = BTreeMap::new();
    let mut per_day: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &points {
        let mut data = 0u64;
        for n in 0..p.disks.len() {
            let ix = repo.index(p, n)?;
            for id in ix.ids.iter().filter(|id| **id != repo::ZERO) {
                data += chunk;
                unique.insert(*id);
            }
        }
        logical += data;
        let added: u64 = p.disks.iter().map(|d| d.stored_bytes).sum();
        let e = vms.entry(p.source.name.as_str()).or_insert((0, "", 0, 0));
        *e = (e.0 + 1, p.time.as_str(), data, e.3 + added);
        *per_day.entry(p.time.get(..10).unwrap_or(&p.time)).or_default() += added;
    }
    let unique_bytes = unique.len() as u64 * chunk;
    let stored = local.map(|d| tree_bytes(&d.join("chunks")));
    let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    if json {
        let v = serde_json::json!({
            "points": points.len(), "chunk_size": chunk, "logical_bytes": logical,
            "unique_chunks": unique.len(), "unique_bytes": unique_bytes, "stored_bytes": stored,
            "dedup_factor": ratio(logical, unique_bytes),
            "compression_factor": stored.map(|s| ratio(unique_bytes, s)),
            "vms": vms.iter().map(|(name, (n, newest, data, added))| serde_json::json!({
                "name": name, "points": n, "newest": newest, "newest_data_bytes": data, "added_bytes": added,
            })).collect::<Vec<_>>(),
            "added_per_day": per_day,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let h = orchestration::human_bytes;
    println!("{} restore point(s) of {} VM(s) or image(s), chunks of {}", points.len(), vms.len(), h(chunk));
    println!("  referenced by the points   {:>10}  (their data chunks, counted in each point)", h(logical));
    println!(
        "  unique data                {:>10}  in {} chunks: deduplication {:.1}x",
        h(unique_bytes),
        unique.len(),
        ratio(logical, unique_bytes)
    );
    match stored {
        Some(s) => println!("  chunk files                {:>10}  compression {:.1}x", h(s), ratio(unique_bytes, s)),
        None => println!("  chunk files                (not measured for an S3 repository)"),
    }
    if !vms.is_empty() {
        println!("\n  {:<24} {:>6}  {:<20} {:>10} {:>10}", "VM", "POINTS", "NEWEST (UTC)", "NEWEST", "ADDED");
        for (name, (n, newest, data, added)) in &vms {
            println!(
                "  {name:<24} {n:>6}  {:<20} {:>10} {:>10}",
                newest.get(..19).unwrap_or(newest),
                h(*data),
                h(*added)
            );
        }
        println!("\n  added per day (UTC), last 7 days with points:");
        for (day, added) in per_day.iter().rev().take(7).collect::<Vec<_>>().into_iter().rev() {
            println!("    {day}  {:>10}", h(*added));
        }
    }
    Ok(ExitCode::SUCCESS)
}
