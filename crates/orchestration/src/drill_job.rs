//! A DR drill of one restore point: its disks served from the repository over NBD on a
//! private Unix socket, booted by `drill` in isolation, the chunks that failed verification
//! while served added to the reasons, and the report kept beside the point.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use repo::{DrillRecord, Manifest, Repo};

use crate::OrchError;

/// How to drill, beyond the restore point.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The accelerator (`auto` takes KVM only where it can run a guest).
    pub accel: drill::Accel,
    /// The boot disk's controller for the drill only, when the firmware cannot boot the
    /// original one.
    pub boot_controller: Option<drill::BootController>,
    /// The checks; empty means the drill's defaults (a login prompt on the serial console).
    pub checks: Vec<drill::Check>,
    /// No network, or an isolated one for the checks.
    pub network: drill::Network,
    /// The whole drill's time limit.
    pub timeout: Duration,
    /// Where the overlays, console log and sockets live while it runs (a temporary folder
    /// under it is made and removed).
    pub work_root: PathBuf,
    /// Whether to keep the report in the repository beside the point.
    pub keep_report: bool,
    /// The chunk cache of the exports.
    pub cache: instant::CacheConfig,
    /// The VM's configuration, for a point that has none captured (an image backed up with
    /// `repo backup`) or to boot it otherwise; `None` takes the captured `.vmx`.
    pub vmx: Option<String>,
}

/// What a drill found.
#[derive(Debug)]
pub struct DrillOutcome {
    /// The restore point drilled.
    pub point: Manifest,
    /// The drill's report, with the failed chunks among its findings.
    pub report: drill::DrillReport,
    /// Chunks that failed verification while the guest read them.
    pub failed_chunks: Vec<instant::FailedChunk>,
    /// The report as kept in the repository, when it was.
    pub record: Option<DrillRecord>,
}

/// The name of a disk's export: its slot, with `:` (which URIs and QEMU's option parser
/// treat specially) as `-`.
fn export_name(slot: &str) -> String {
    slot.replace(':', "-")
}

/// Drills restore point `point` of `repo`. Fails only when the drill could not be attempted
/// (no `.vmx` captured, a disk that cannot be opened, QEMU missing, a plan refused); a guest
/// that does not come up is a report whose `passed` is false. The VM is stopped and every
/// overlay removed on every path, `cancel` included.
pub async fn run_drill(
    repo: &Repo,
    point: &str,
    options: &DrillOptions,
    cancel: drill::Cancel,
) -> Result<DrillOutcome, OrchError> {
    let manifest = repo.point(point)?;
    let vmx = match &options.vmx {
        Some(text) => text.clone(),
        None => {
            let vmx_file = manifest.files.iter().find(|f| f.name.ends_with(".vmx")).ok_or_else(|| {
                OrchError::Refused(format!(
                    "restore point {} has no captured .vmx: a drill needs the VM's configuration to build its \
                     hardware (give one with --vmx)",
                    manifest.id
                ))
            })?;
            String::from_utf8_lossy(&repo.file(&manifest, &vmx_file.name)?).into_owned()
        }
    };

    sweep_stale(&options.work_root);
    let work = tempfile_dir(&options.work_root)?;
    // Who owns the folder, so that a later drill can tell it from one of a live process.
    let owner = work.path().join(OWNER);
    std::fs::write(&owner, process_identity(std::process::id()).unwrap_or_default())
        .map_err(|e| OrchError::Refused(format!("cannot write {}: {e}", owner.display())))?;
    let socket = work.path().join("nbd.sock");
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(OrchError::Refused(format!(
            "the drill's work folder {} is too long a path for a Unix socket: use a shorter one",
            work.path().display()
        )));
    }
    let mut exports: Vec<(String, Arc<instant::PointExport>)> = Vec::new();
    for (n, d) in manifest.disks.iter().enumerate() {
        let e = instant::PointExport::open(repo, &manifest.id, n, options.cache)?;
        exports.push((export_name(&d.name), Arc::new(e)));
    }
    let server = nbd_wire::server::Server::new(
        nbd_wire::server::ServerConfig::default(),
        exports.iter().map(|(n, e)| (n.clone(), e.clone() as Arc<dyn nbd_wire::server::ExportSource>)).collect(),
    );
    server.serve_unix(&socket).await?;

    let slots = disk_slots(&manifest, &vmx)?;
    let disks = manifest
        .disks
        .iter()
        .zip(slots)
        .map(|(d, slot)| drill::DrillDisk {
            slot,
            uri: format!("nbd+unix:///{}?socket={}", export_name(&d.name), socket.display()),
        })
        .collect();
    let spec = drill::DrillSpec {
        name: format!("{} @ {}", manifest.source.name, manifest.id),
        vmx,
        disks,
        accel: options.accel,
        boot_controller: options.boot_controller,
        checks: if options.checks.is_empty() { drill::default_checks() } else { options.checks.clone() },
        network: options.network,
        timeout: options.timeout,
        work_dir: work.path().join("vm"),
    };
    let ran = drill::run(&spec, cancel).await;
    server.shutdown().await;
    let mut report = ran?;

    let failed_chunks: Vec<instant::FailedChunk> = exports.iter().flat_map(|(_, e)| e.failed_chunks()).collect();
    if !failed_chunks.is_empty() {
        let names: Vec<String> =
            failed_chunks.iter().take(8).map(|c| format!("{} at byte {} ({})", c.chunk, c.offset, c.reason)).collect();
        let more = failed_chunks.len().saturating_sub(names.len());
        // A guest that read damaged data proves nothing, whatever it printed.
        report.add_finding(format!(
            "{} chunk(s) failed verification while the guest read them: {}{}; `proxy repo verify` names every \
             damaged chunk",
            failed_chunks.len(),
            names.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        ));
    }

    let record = if options.keep_report {
        let json = report.to_json();
        let html = report.to_html();
        let summary = report.summary();
        match repo.add_drill_report(
            &manifest.id,
            report.passed,
            &summary,
            report.boot_seconds,
            json.as_bytes(),
            html.as_bytes(),
        ) {
            Ok(r) => Some(r),
            Err(e) => {
                report.add_warning(format!("the report was not kept in the repository: {e}"));
                None
            }
        }
    } else {
        None
    };
    Ok(DrillOutcome { point: manifest, report, failed_chunks, record })
}

/// The `.vmx` slot of each disk of the point: its own name when the `.vmx` has that slot (a
/// VM's backup names disks by slot), else the `.vmx`'s disks not named so, in order (an
/// image backed up with `repo backup` is named by its file).
fn disk_slots(manifest: &Manifest, vmx: &str) -> Result<Vec<String>, OrchError> {
    let hardware = drill::vmx::Hardware::from_vmx(&drill::vmx::Vmx::parse(vmx)?)?;
    let all: Vec<String> = hardware.disks.iter().map(|d| d.slot.to_string()).collect();
    let named: Vec<&String> = manifest.disks.iter().map(|d| &d.name).filter(|n| all.contains(n)).collect();
    let mut free = all.iter().filter(|s| !named.contains(s));
    manifest
        .disks
        .iter()
        .map(|d| {
            if all.contains(&d.name) {
                Ok(d.name.clone())
            } else {
                free.next().cloned().ok_or_else(|| {
                    OrchError::Refused(format!(
                        "disk {} of restore point {} has no slot in the .vmx (it names {})",
                        d.name,
                        manifest.id,
                        if all.is_empty() { "no disk".to_owned() } else { all.join(", ") }
                    ))
                })
            }
        })
        .collect()
}

/// The prefix of a drill's work folder.
const WORK_PREFIX: &str = "syncproxy-drill-";
/// The file in a work folder naming the process that made it.
const OWNER: &str = "owner";

/// A process as `/proc` knows it: its ID and start time (in clock ticks since boot), which
/// together tell it from a later process that reuses the ID.
pub(crate) fn process_identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last `)`.
    let after = &stat[stat.rfind(')')? + 1..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Removes the work folders of drills whose process is gone (killed with SIGKILL: its QEMU
/// died with it, but its overlays and logs stayed). A folder whose owner still runs, or that
/// names no owner, is left alone.
fn sweep_stale(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(WORK_PREFIX) {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(e.path().join(OWNER)) else { continue };
        let alive = owner
            .split_whitespace()
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .and_then(process_identity)
            .is_some_and(|now| now == owner.trim());
        if !alive {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::warn!("removed {}, left by a drill whose process is gone", e.path().display()),
                Err(err) => tracing::warn!("cannot remove {}, left by a dead drill: {err}", e.path().display()),
            }
        }
    }
}

/// The longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A work folder under `root`, its name short (no point ID in it): the sockets in it must fit
/// a Unix socket's path under a root of some length (`serve`'s state folder).
fn tempfile_dir(root: &std::path::Path) -> Result<tempfile::TempDir, OrchError> {
    tempfile::Builder::new()
        .prefix(WORK_PREFIX)
        .tempdir_in(root)
        .map_err(|e| OrchError::Refused(format!("cannot make a work folder under {}: {e}", root.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_of_dead_drills_are_swept_and_live_or_foreign_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let make = |name: &str, owner: Option<String>| {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("overlay.qcow2"), b"x").unwrap();
            if let Some(o) = owner {
                std::fs::write(d.join(OWNER), o).unwrap();
            }
            d
        };
        let me = process_identity(std::process::id()).unwrap();
        let live = make("syncproxy-drill-a-1", Some(me.clone()));
        // The same ID with another start time: a process that reused a dead drill's ID.
        let reused = make("syncproxy-drill-b-2", Some(format!("{} 1", std::process::id())));
        let gone = make("syncproxy-drill-c-3", Some("4194304 7".into()));
        let unowned = make("syncproxy-drill-d-4", None);
        let foreign = make("someone-else", Some("4194304 7".into()));
        sweep_stale(root.path());
        assert!(live.exists() && unowned.exists() && foreign.exists());
        assert!(!reused.exists() && !gone.exists());
    }
}
