//! `proxy`: the syncproxy proxy. Today one subcommand, `disk-copy`, the block pipeline as a
//! command; backup, replicate, serve and the repository commands join it as their issues land.

mod disk_copy;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DiskCopy(args) => disk_copy::run(&args),
    }
}
