//! `probe`: checks disks and estates against what syncproxy supports, before anything runs.
//! Today: `probe vmdk` describes a VMDK and can write it as raw; `probe vddk` checks a VDDK;
//! `probe inventory` lists a vCenter's or ESXi host's VMs and disks; `probe check` checks an
//! estate against the support matrix, or (`--restore-to`) a restore target.

mod check_cmd;
mod inventory_cmd;
#[path = "../../proxy/src/server_args.rs"]
mod server_args;
mod vddk_cmd;
mod vmdk_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Checks disks and estates before a backup runs.
#[derive(Debug, Parser)]
#[command(name = "probe", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe a VMDK (descriptor, sparse, streamOptimized or snapshot delta): format,
    /// capacity, extents, chain and allocation; optionally write its contents as raw.
    Vmdk(vmdk_cmd::Args),
    /// Check a VDDK installation: the library version and path, its transports and which of
    /// the optional functions it has; `--read FILE` reads a local disk through it.
    Vddk(vddk_cmd::Args),
    /// Log in to vCenter or ESXi and list its VMs with their disks, CBT and snapshots.
    Inventory(inventory_cmd::Args),
    /// Check an estate against the support matrix: versions, TLS, ports 443 and 902, hardware,
    /// disk modes, RDM, shared disks, passthrough and USB devices, CBT, encryption, snapshots,
    /// guest free space, VMware Tools, DRS and transports; pass, warn or fail with the reason and
    /// the fix. With `--restore-to`, a restore target instead: the names resolved, the
    /// privileges on folder, pool, datastore and networks, free space and the host's ESXi
    /// against a point's (or `--size`, `--hardware-version`). Exit 0: nothing failed; 1: a
    /// check failed; 2: the probe could not run.
    Check(Box<check_cmd::Args>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vmdk(args) => vmdk_cmd::run(&args),
        Command::Vddk(args) => vddk_cmd::run(&args),
        Command::Inventory(args) => inventory_cmd::run(&args),
        Command::Check(args) => return check_cmd::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
