//! `cargo xtask bench drill`: a DR drill's time to the guest's boot marker side by side with
//! bare `qemu-system-x86_64` booting the same disk from a raw file, under TCG. For each
//! boot-disk fixture (BIOS on SATA, EFI on SATA, BIOS on PVSCSI) the image is backed up with
//! `proxy repo backup`; then, alternating who goes first in each round: a bare boot of a copy
//! of the raw image (`vsphere_sim::bootdisk::boot_bare`, timed from QEMU's spawn), and
//! `proxy drill REPO latest --vmx FIXTURE.vmx --accel tcg --expect MARKER`, timed from spawning
//! the command to the marker. The drill's report says when it started QEMU (wall clock) and how
//! long after that the marker appeared, so the marker's moment needs no guess about the work
//! the command does after it. Prints each round and the medians, with the ratio (target: 1.3
//! or less); fails only when something cannot be run, never on a ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use vsphere_sim::bootdisk::{self, BootDisk, Variant};

/// The most a bare boot or a drill may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One round of one variant.
struct Round {
    /// Bare QEMU, from its spawn to the marker.
    bare: f64,
    /// `proxy drill`, from the command's spawn to the marker.
    drill: f64,
    /// The drill's own QEMU start to the marker (its report's `boot_seconds`).
    drill_boot: f64,
    /// From the command's spawn to the drill's QEMU start: opening the repository, serving
    /// the point over NBD, the overlay, QEMU's spawn.
    drill_setup: f64,
}

/// What one drill took: seconds from the command's spawn to QEMU's start, and from QEMU's start
/// to the marker.
fn drill_once(proxy: &Path, repo: &Path, vmx: &Path, disk: &BootDisk, tmp: &Path) -> Result<(f64, f64)> {
    let mut cmd = Command::new(proxy);
    cmd.arg("drill")
        .arg(repo)
        .args(["latest", "--accel", "tcg", "--expect", &disk.marker, "--timeout", "2m", "--json", "--vmx"])
        .arg(vmx)
        .env("TMPDIR", tmp);
    let spawned = SystemTime::now();
    let out = cmd.output().with_context(|| format!("could not start {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!("{cmd:?} ({}) printed no report: {text}{}", out.status, String::from_utf8_lossy(&out.stderr))
    })?;
    if !out.status.success() || report["passed"] != true {
        bail!("the drill of the {} fixture failed ({}): {}", disk.variant.name(), out.status, report["reason"]);
    }
    let boot = report["boot_seconds"].as_f64().context("the drill's report has no boot_seconds")?;
    let qemu_ms = report["qemu_started_unix_ms"].as_u64().context("the drill's report has no qemu_started_unix_ms")?;
    let spawned_ms = spawned.duration_since(SystemTime::UNIX_EPOCH)?.as_millis();
    // Milliseconds, both from this machine's clock.
    let setup = (i128::from(qemu_ms) - i128::try_from(spawned_ms)?) as f64 / 1e3;
    if !(0.0..TIMEOUT.as_secs_f64()).contains(&setup) {
        bail!("the drill says it started QEMU {setup:.3} s after its command: did the clock jump?");
    }
    Ok((setup, boot))
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let rounds: usize = std::env::var("BENCH_DRILL_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    for tool in ["qemu-system-x86_64", "qemu-img"] {
        crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .with_context(|| format!("bench drill needs {tool} (`cargo xtask setup` installs it)"))?;
    }
    let target = crate::target_dir(root);
    let dir = target.join("bench-drill");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy"])?;
    let proxy = target.join("release/proxy");
    let result = measure(&proxy, &dir, rounds);
    // The repositories and image copies are the bench's own: never left in the target folder.
    let _ = std::fs::remove_dir_all(&dir);
    let results = result?;

    println!("\nTCG, {rounds} round(s), alternating; seconds to the guest's boot marker:");
    println!(
        "  {:<12} {:>6} {:>8} {:>8} {:>7} {:>18} {:>16}",
        "variant", "round", "bare s", "drill s", "ratio", "drill QEMU→mark s", "drill →QEMU s"
    );
    let row = |name: &str, round: &str, r: &Round| {
        println!(
            "  {:<12} {:>6} {:>8.2} {:>8.2} {:>7.2} {:>18.2} {:>16.2}",
            name,
            round,
            r.bare,
            r.drill,
            r.drill / r.bare,
            r.drill_boot,
            r.drill_setup
        );
    };
    for (variant, rs) in &results {
        for (i, r) in rs.iter().enumerate() {
            row(variant.name(), &(i + 1).to_string(), r);
        }
        let m = |f: fn(&Round) -> f64| crate::median(&mut rs.iter().map(f).collect::<Vec<_>>());
        let median = Round {
            bare: m(|r| r.bare),
            drill: m(|r| r.drill),
            drill_boot: m(|r| r.drill_boot),
            drill_setup: m(|r| r.drill_setup),
        };
        row(variant.name(), "median", &median);
    }
    println!(
        "  ratio = drill s / bare s (target 1.3 or less); bare s: bare QEMU from its spawn; drill s: from \
         spawning `proxy drill` (setup, then QEMU's start to the marker)"
    );
    Ok(())
}

/// Backs each fixture up and times its rounds.
fn measure(proxy: &Path, dir: &Path, rounds: usize) -> Result<Vec<(Variant, Vec<Round>)>> {
    let mut prepared = Vec::new();
    for variant in Variant::ALL {
        let disk = bootdisk::build(variant).with_context(|| format!("building the {} boot disk", variant.name()))?;
        let vdir = dir.join(variant.name());
        // The drill's work folder (its NBD and QMP sockets) goes under TMPDIR: a short one, as
        // a Unix socket's path must fit in 108 bytes.
        let tmp = std::env::temp_dir().join(format!("bench-drill-{}-{}", std::process::id(), variant.name()));
        let (repo, bare) = (vdir.join("repo"), vdir.join("bare"));
        for d in [&tmp, &bare] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let vmx = vdir.join("vm.vmx");
        std::fs::write(&vmx, &disk.vmx).with_context(|| format!("writing {}", vmx.display()))?;
        crate::output(Command::new(proxy).arg("repo").arg("init").arg(&repo))?;
        crate::output(
            Command::new(proxy).args(["repo", "backup"]).arg(&repo).arg(&disk.path).args(["--name", variant.name()]),
        )?;
        println!("{}: {} backed up into {}", variant.name(), disk.path.display(), repo.display());
        prepared.push((disk, repo, tmp, bare, vmx));
    }
    let result = rounds_of(proxy, &prepared, rounds);
    for p in &prepared {
        let _ = std::fs::remove_dir_all(&p.2);
    }
    result
}

/// The fixture, its repository, the drill's TMPDIR, the bare boot's folder, the `.vmx` file.
type Prepared = (BootDisk, PathBuf, PathBuf, PathBuf, PathBuf);

/// Times `rounds` rounds of each prepared fixture.
fn rounds_of(proxy: &Path, prepared: &[Prepared], rounds: usize) -> Result<Vec<(Variant, Vec<Round>)>> {
    let mut results: Vec<(Variant, Vec<Round>)> = prepared.iter().map(|p| (p.0.variant, Vec::new())).collect();
    for round in 0..rounds {
        for ((disk, repo, tmp, bare_dir, vmx), (_, rs)) in prepared.iter().zip(&mut results) {
            let bare = || -> Result<f64> {
                let b = bootdisk::boot_bare(disk, Path::new("qemu-system-x86_64"), bare_dir, TIMEOUT)
                    .map_err(|e| anyhow::anyhow!("bare boot of the {} fixture: {e}", disk.variant.name()))?;
                Ok(b.to_marker.as_secs_f64())
            };
            let drill = || drill_once(proxy, repo, vmx, disk, tmp);
            // Alternate who goes first, so neither always boots on a warmer machine.
            let (bare, (setup, boot)) = if round % 2 == 0 {
                let b = bare()?;
                (b, drill()?)
            } else {
                let d = drill()?;
                (bare()?, d)
            };
            let left: Vec<_> = std::fs::read_dir(tmp)?.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
            if !left.is_empty() {
                bail!("the drill left {left:?} in {}", tmp.display());
            }
            let r = Round { bare, drill: setup + boot, drill_boot: boot, drill_setup: setup };
            println!(
                "round {} {}: bare {:.2} s, drill {:.2} s ({:.2} s to QEMU + {:.2} s to the marker), ratio {:.2}",
                round + 1,
                disk.variant.name(),
                r.bare,
                r.drill,
                setup,
                boot,
                r.drill / r.bare
            );
            rs.push(r);
        }
    }
    Ok(results)
}
