//! `proxy`: the syncproxy proxy. Today `disk-copy` (the block pipeline as a command) and the
//! `repo` command tree; backup, replicate and serve join them as their issues land.

mod disk_copy;
mod endpoints;
mod repo_cmd;
mod size;

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
    /// Copy a disk like nbdcopy: SRC is a raw file, block device, VMDK or NBD URI; DST a file,
    /// block device or NBD URI. Only allocated data is read; an interrupted copy resumes.
    DiskCopy(disk_copy::Args),
    /// Work with a backup repository (a directory or s3://bucket/prefix): init, backup, list,
    /// restore, verify, prune, gc, copy.
    Repo {
        #[command(subcommand)]
        command: repo_cmd::RepoCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DiskCopy(args) => disk_copy::run(&args),
        Command::Repo { command } => repo_cmd::run(command),
    }
}
