//! `proxy`: the syncproxy proxy. Today `backup` (VMs into a repository, or `--plan`),
//! `replicate` (VMs' disks kept as replicas), `disk-copy` (the block pipeline as a command),
//! the `repo` command tree, `serve` (the daemon) with `config check`, and `demo` (with the
//! default `sim` feature, which a production build leaves out).

mod backup_cmd;
mod cbt_reset_cmd;
mod config_cmd;
mod daemon_cmd;
#[cfg(feature = "sim")]
mod demo;
mod disk_copy;
mod drill_cmd;
mod duration;
mod endpoints;
mod export_cmd;
mod history;
mod logs;
mod notify;
mod progress_view;
mod repo_cmd;
mod restore_cmd;
mod serve;
mod serve_drill;
mod serve_upkeep;
mod server_args;
mod size;
mod smtp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Agentless backup and replication of vSphere disks.
#[derive(Debug, Parser)]
#[command(name = "proxy", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Back up vSphere VMs into a repository: a snapshot, the disks read over HTTPS (only what
    /// CBT says changed after the first time), the snapshot always removed. `--plan` says what
    /// would be copied and why. Exit code 0: every VM succeeded; 3: some did; 1: none did.
    Backup(backup_cmd::Args),
    /// Keep replicas of vSphere VMs' disks in a directory (the DR use): raw files, full the
    /// first time, then only what CBT says changed; a replica interrupted mid-sync is reported
    /// inconsistent until the next sync completes. Exit codes as for backup.
    Replicate(backup_cmd::ReplicateArgs),
    /// Reset changed block tracking on VMs (the documented procedure for their power state),
    /// check that every disk starts a new change-ID epoch, and mark the named repositories and
    /// replica folders so the next copy of those disks is full. Refused under snapshots the
    /// VM's owner made.
    CbtReset(cbt_reset_cmd::Args),
    /// Copy a disk like nbdcopy: SRC is a raw file, block device, VMDK or NBD URI; DST a file,
    /// block device or NBD URI. Only allocated data is read; an interrupted copy resumes.
    DiskCopy(disk_copy::Args),
    /// Run as a daemon: each configured job on its schedule, stale snapshots removed at start,
    /// job status, history and Prometheus metrics over HTTP behind a token; SIGTERM stops
    /// gracefully, removing every snapshot.
    Serve(serve::Args),
    /// Work with a `serve` configuration file (`check`).
    Config {
        #[command(subcommand)]
        command: config_cmd::ConfigCommand,
    },
    /// Ask a running daemon (`--config` names it) how its jobs stand: running or idle, next
    /// run, last result. Exit 0 answered, 1 not reached.
    Status(daemon_cmd::StatusArgs),
    /// Work with a running daemon's jobs (`run NAME`: now, not at its next scheduled time).
    Job {
        #[command(subcommand)]
        command: daemon_cmd::JobCommand,
    },
    /// Run the whole product on the embedded vSphere simulator: full and incremental backups
    /// of a few VMs, restores compared byte for byte, a summary. Nothing to set up.
    #[cfg(feature = "sim")]
    Demo(demo::Args),
    /// Work with a backup repository (a directory or s3://bucket/prefix): init, backup, list,
    /// restore, verify, prune, gc, copy.
    Repo {
        #[command(subcommand)]
        command: repo_cmd::RepoCommand,
    },
    /// Instant recovery: serve the disks of a restore point (REPO POINT) or of a replica
    /// (--replica PATH) over NBD, named by slot, until Ctrl-C or SIGTERM, printing each disk's
    /// URI. Read-only unless --writable (a copy-on-write overlay per disk, discarded at stop
    /// unless --commit stores it as a new restore point). With --tls-cert and --tls-key every
    /// client must use TLS (nbds://); without, loopback and Unix sockets only unless
    /// --allow-remote.
    Export(export_cmd::Args),
    /// Prove a restore point boots: its disks served from the repository over NBD, the VM
    /// booted in isolation under QEMU on its own VMware hardware (from the captured `.vmx`),
    /// checks run (a login prompt by default), a screenshot taken, and the report kept beside
    /// the point. Exit code 0: every check passed; 2: a check failed; 1: no drill was possible.
    Drill(drill_cmd::Args),
    /// Put a restore point back into vSphere: as a new VM (--name; disks uploaded over HTTPS,
    /// sparse and converted, flat, or through an NFC import; the VM from the captured `.vmx`
    /// with a new identity and NICs disconnected unless asked; read back, then named), into
    /// its original VM (--in-place: Quick Rollback through VDDK, or whole disks swapped in),
    /// or one disk added to a VM (--disk SLOT --attach-to VM). Nothing existing is overwritten
    /// unless asked; a failed or killed restore leaves nothing once the next restore has
    /// swept. Exit 0 restored, 1 not.
    Restore(restore_cmd::Args),
}

/// Runs a command's future on a multi-threaded runtime; an error is printed as
/// `proxy COMMAND: ...` with its causes, and exits 1.
pub(crate) fn block_on(command: &str, fut: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Half the cores run the async side (sockets, timers, the engine's bookkeeping); the other
    // half are left to the blocking threads that hash and write, and to a local NBD server. On
    // 2 cores one async thread cut a copy's CPU by a tenth: fewer wake-ups passed between
    // threads. `TOKIO_WORKER_THREADS` still overrides.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        builder.worker_threads((cores / 2).max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxy {command}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("proxy {command}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One subscriber for every command: the daemon sets its own from its configuration; the
    // commands that report as they go log at info, the others print their own progress and
    // log only warnings unless SYNCPROXY_LOG says otherwise.
    match &cli.command {
        Command::Serve(_) => {}
        Command::Repo { .. } | Command::Export(_) | Command::Restore(_) => logs::init("info", false),
        _ => logs::init("warn", false),
    }
    match cli.command {
        Command::Backup(args) => backup_cmd::run(&args),
        Command::Replicate(args) => backup_cmd::run_replicate(&args),
        Command::CbtReset(args) => cbt_reset_cmd::run(&args),
        Command::DiskCopy(args) => disk_copy::run(&args),
        #[cfg(feature = "sim")]
        Command::Demo(args) => demo::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Config { command } => config_cmd::run(&command),
        Command::Status(args) => daemon_cmd::status(&args),
        Command::Job { command } => daemon_cmd::job(&command),
        Command::Repo { command } => repo_cmd::run(command),
        Command::Export(args) => export_cmd::run(&args),
        Command::Drill(args) => drill_cmd::run(&args),
        Command::Restore(args) => restore_cmd::run(&args),
    }
}
