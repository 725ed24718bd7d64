//! The project's automation entry point: `cargo xtask ci` is what CI and the README run.

mod bench_copy;
mod bench_drill;
mod bench_export;
mod bench_repo;
mod bench_restore;
mod bench_vddk;
mod bench_vmdk;
mod bench_vms;
mod boundaries;
mod codegen;
mod fuzz;
mod package;
mod seeds;
mod setup;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const HELP: &str = "\
cargo xtask COMMAND

  ci                      everything CI checks: format, clippy (and the proxy built without
                          its simulator), tests, tidy, crate boundaries,
                          every fuzz target for a short run, benches built and run once,
                          `bench copy`, `bench repo`, `bench vms` and `bench drill` once on
                          small inputs
  setup                   install every peer the tests, demo, benches and drills use (apt packages,
                          vcsim, pyvmomi, SeaweedFS, cargo-fuzz); says what and why; idempotent
  setup --check           list the peers that are missing, install nothing (exit 1 if any)
  package                 the .deb (syncproxy-proxy, syncproxy-probe, the systemd unit, sysusers.d
                          and tmpfiles.d entries, a default configuration) in target/deb
  package --install-test  (root) build it, install it, check what it installed (systemd-analyze
                          verify, the user, the folders, the binaries and the default
                          configuration run), install it again as an upgrade, purge it, check
                          nothing is left
  tidy                    the repository rules (module docs, no stubs, unsafe only in vddk crates)
  boundaries              the crate-boundary rules ARCHITECTURE.md states
  codegen [--check]       regenerate crates/vddk-sys/src/generated.rs (--check: fail if stale)
  fuzz [TARGET] [SECONDS] run one fuzz target (or all) for SECONDS each (default 60)
  fuzz-seeds              remake the VMDK fuzz seeds from qemu-img output and our writers
  bench [ARGS...]         the criterion benchmarks (ARGS go to criterion)
  bench copy              proxy disk-copy against nbdcopy, qemu-img convert and cp on generated
                          4 GiB (50 % data) and 16 GiB (10 %) images, and a fragmented 2 GiB
                          one (40 % data in 1,400 extents, some allocated zeros) with bytes
                          read, written, zeroed and allocated beside nbdcopy's; durable,
                          alternating (BENCH_COPY_ROUNDS, default 3; BENCH_COPY_SMALL=1 for a
                          quick run; BENCH_COPY_ONLY=TEXT for the rows whose name contains TEXT)
  bench repo              proxy repo backup against restic on a generated 2 GiB image: first
                          backup (throughput, stored size) and an incremental; a fragmented
                          image's first backup and 1,000 scattered 64 KiB writes on a 4 GiB
                          disk (bytes read against the changes, stored against restic's
                          growth); durable (BENCH_REPO_MIB, BENCH_REPO_ROUNDS; BENCH_REPO_SMALL=1)
  bench export            proxy export (from a repository, and --replica) against qemu-nbd on a
                          generated 512 MiB image: time to first byte and nbdcopy throughput
                          (BENCH_EXPORT_MIB, BENCH_EXPORT_ROUNDS, default 3)
  bench drill             proxy drill of a repository restore point against bare qemu booting the
                          same raw disk, to the guest's marker, TCG, for the BIOS, EFI and
                          BIOS-pvscsi fixtures, alternating (BENCH_DRILL_ROUNDS, default 3)
  bench vms               proxy backup --all of 100 VMs at once against the simulator: time, CPU,
                          peak RSS, disks copying at once; full, then 1 % changed (BENCH_VMS,
                          BENCH_VM_DISK_MIB, default 64; BENCH_VM_MEMORY, default 256M)
  bench restore           proxy restore of a 1 GiB VM (half data) into the simulator by every path:
                          new VM by sparse upload, flat upload and NFC import; in place through
                          the fake VDDK, every byte, then Quick Rollback after 1,000 scattered
                          writes: time, CPU, RSS, bytes moved (BENCH_RESTORE_MIB, default 1024)
  bench-vddk              a 4 GiB disk read through the VDDK binding (fake library) against dd
                          (BENCH_VDDK_MIB, default 4096; BENCH_VDDK_ROUNDS, default 3)
  bench-vmdk              VMDK to raw: probe vmdk --to-raw against qemu-img convert, same files
                          (BENCH_VMDK_MIB, default 1024; BENCH_VMDK_ROUNDS, default 3)

Environment: SYNCPROXY_FUZZ_SECONDS sets the seconds per target in `ci` (default 30).";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("tidy") => tidy::check(&root),
        Some("setup") if args.get(1).is_some_and(|a| a == "--check") => setup::check(),
        Some("setup") if args.len() == 1 => setup::install(&root),
        Some("boundaries") => boundaries::check(&root),
        Some("fuzz") => {
            let seconds = match args.get(2) {
                Some(s) => s.parse().with_context(|| format!("SECONDS must be a number, not {s:?}"))?,
                None => 60,
            };
            fuzz::run(&root, args.get(1).map(String::as_str), seconds)
        }
        Some("package") if args.get(1).is_some_and(|a| a == "--install-test") => package::install_test(&root),
        Some("package") if args.len() == 1 => package::build(&root).map(drop),
        Some("bench-vddk") => bench_vddk::run(&root),
        Some("bench-vmdk") => bench_vmdk::run(&root),
        Some("codegen") => codegen::run(&root, args.get(1).is_some_and(|a| a == "--check")),
        Some("fuzz-seeds") => seeds::make(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "copy") => bench_copy::run(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "repo") => bench_repo::run(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "vms") => bench_vms::run(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "export") => bench_export::run(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "drill") => bench_drill::run(&root),
        Some("bench") if args.get(1).is_some_and(|a| a == "restore") => bench_restore::run(&root),
        Some("bench") => cargo(
            &["bench", "--locked", "-p", "benches", "--"]
                .iter()
                .copied()
                .chain(args[1..].iter().map(String::as_str))
                .collect::<Vec<_>>(),
        ),
        Some("help" | "--help" | "-h") | None => {
            println!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n\n{HELP}"),
    }
}

fn ci(root: &Path) -> Result<()> {
    let fuzz_seconds: u64 = match std::env::var("SYNCPROXY_FUZZ_SECONDS") {
        Ok(s) => s.parse().with_context(|| format!("SYNCPROXY_FUZZ_SECONDS must be a number, not {s:?}"))?,
        Err(_) => 30,
    };
    let fuzz_manifest = root.join("fuzz/Cargo.toml");
    let fuzz_manifest = fuzz_manifest.to_str().context("non-UTF-8 path")?;
    step("format", || {
        cargo(&["fmt", "--all", "--", "--check"])?;
        cargo(&["fmt", "--manifest-path", fuzz_manifest, "--", "--check"])
    })?;
    step("tidy", || tidy::check(root))?;
    step("crate boundaries", || boundaries::check(root))?;
    step("codegen is fresh", || codegen::run(root, true))?;
    step("clippy", || {
        cargo(&["clippy", "--locked", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
        cargo(&["clippy", "--locked", "--manifest-path", fuzz_manifest, "--", "-D", "warnings"])
    })?;
    // The production proxy leaves the simulator and `demo` out (the `sim` feature, on by
    // default): it must keep building, and without warnings, that way.
    step("proxy without the simulator", || {
        cargo(&["clippy", "--locked", "-p", "proxy", "--no-default-features", "--", "-D", "warnings"])
    })?;
    // --all-targets builds the benches too and runs each once (criterion's test mode).
    // Tests that need a missing outside tool record themselves here (they fail under CI=true).
    // The log lives in the target folder, wherever CARGO_TARGET_DIR puts it.
    let target = target_dir(root);
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let skip_log = target.join("skipped-tests.log");
    let _ = std::fs::remove_file(&skip_log);
    let skip_env = [("SYNCPROXY_SKIP_LOG", skip_log.as_os_str())];
    let tested = step("tests", || {
        run(cargo_cmd(&["test", "--locked", "--workspace", "--all-targets"]).envs(skip_env))?;
        run(cargo_cmd(&["test", "--locked", "--workspace", "--doc"]).envs(skip_env))
    });
    let skipped = std::fs::read_to_string(&skip_log).unwrap_or_default();
    let skipped_count = skipped.lines().count();
    if skipped_count > 0 {
        println!(
            "SKIPPED {skipped_count} test(s) for want of an outside tool (`cargo xtask setup` installs them):\n{skipped}"
        );
    }
    tested?;
    // The copy bench on small images, once: it must keep working, but its figures come from a
    // full `cargo xtask bench copy` on a quiet machine.
    step("bench copy (small, one round)", || {
        run(cargo_cmd(&["xtask", "bench", "copy"]).env("BENCH_COPY_SMALL", "1").env("BENCH_COPY_ROUNDS", "1"))
    })?;
    step("bench repo (small, one round)", || {
        run(cargo_cmd(&["xtask", "bench", "repo"]).env("BENCH_REPO_SMALL", "1").env("BENCH_REPO_ROUNDS", "1"))
    })?;
    step("bench vms (10 VMs, once)", || {
        run(cargo_cmd(&["xtask", "bench", "vms"]).env("BENCH_VMS", "10").env("BENCH_VM_DISK_MIB", "8"))
    })?;
    step("bench restore (64 MiB, once)", || {
        run(cargo_cmd(&["xtask", "bench", "restore"]).env("BENCH_RESTORE_MIB", "64"))
    })?;
    // The package changes the machine (a user, a service), which only root may do: CI runs as
    // root; elsewhere it is built and the install test is skipped, loudly.
    step("package (built, installed, upgraded, purged)", || {
        if output(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0") {
            package::install_test(root)
        } else if std::env::var("CI").as_deref() == Ok("true") {
            bail!("the package's install test needs root, and under CI=true nothing may be skipped")
        } else {
            println!("SKIPPED the package's install test: not root (the package is built)");
            package::build(root).map(drop)
        }
    })?;
    step("bench drill (one round)", || run(cargo_cmd(&["xtask", "bench", "drill"]).env("BENCH_DRILL_ROUNDS", "1")))?;
    // The benches' images are gigabytes that nothing after them reads: a CI machine's disk
    // is not always large.
    for e in std::fs::read_dir(&target).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("bench-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    step("fuzz", || fuzz::run(root, None, fuzz_seconds))?;
    println!("xtask ci: every step passed; {skipped_count} test(s) skipped for want of an outside tool");
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("==> {name}");
    let started = std::time::Instant::now();
    let result = f().with_context(|| format!("step `{name}` failed"));
    // A full disk fails a build with a linker's bus error; the free space after each step
    // says at once whether that is what happened.
    let free = disk_free(Path::new("."));
    match &result {
        Ok(()) => println!("<== {name}: ok in {:.1?} ({free} free on disk)", started.elapsed()),
        Err(_) => println!("<== {name}: FAILED after {:.1?} ({free} free on disk)", started.elapsed()),
    }
    result
}

/// Free space on the filesystem holding `dir`, as `df -h` prints it, or why that is unknown.
fn disk_free(dir: &Path) -> String {
    match Command::new("df").args(["-h", "--output=avail"]).arg(dir).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .map_or_else(|| "unknown".to_owned(), |l| l.trim().to_owned()),
        _ => "unknown (df failed)".to_owned(),
    }
}

/// Runs cargo with these arguments, failing when it does.
fn cargo(args: &[&str]) -> Result<()> {
    run(&mut cargo_cmd(args))
}

/// A cargo command with these arguments.
fn cargo_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args);
    cmd
}

/// Runs a command with inherited output, failing with the command line when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs a command and returns its wall time in seconds.
fn timed(cmd: &mut Command) -> Result<f64> {
    let started = std::time::Instant::now();
    output(cmd)?;
    Ok(started.elapsed().as_secs_f64())
}

/// The median of some timings.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Where cargo builds: `CARGO_TARGET_DIR` when set (relative to the root), else `target`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(PathBuf::from(d)))
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}
