//! `cargo xtask fuzz`: runs the libFuzzer targets in `fuzz/` on the stable toolchain, and keeps
//! whatever they find as a regression input that `cargo test` replays.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Targets whose code under test holds `unsafe`; they run under AddressSanitizer (stable
/// rustc ships its runtime; `RUSTC_BOOTSTRAP` unlocks the flag). The rest run without a
/// sanitizer: safe Rust cannot go out of bounds, and panics and overflows are caught anyway.
const ASAN_TARGETS: &[&str] = &[];

pub(crate) fn run(root: &Path, only: Option<&str>, seconds: u64) -> Result<()> {
    let listing = crate::output(Command::new("cargo").args(["fuzz", "list", "--fuzz-dir", "fuzz"]))
        .context("is cargo-fuzz installed? `cargo install cargo-fuzz --locked`")?;
    let targets: Vec<&str> = listing.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let chosen: Vec<&str> = match only {
        Some(t) if targets.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; there are: {}", targets.join(", ")),
        None => targets,
    };
    for target in chosen {
        run_one(root, target, seconds)?;
    }
    Ok(())
}

fn run_one(root: &Path, target: &str, seconds: u64) -> Result<()> {
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let asan = ASAN_TARGETS.contains(&target);
    let mut cmd = Command::new("cargo");
    cmd.args(["fuzz", "run", "--fuzz-dir", "fuzz", "--debug-assertions"]);
    if asan {
        // Stable rustc accepts -Zsanitizer only with RUSTC_BOOTSTRAP; a cached probe from a
        // build without it would make cargo refuse, so drop the cache.
        cmd.env("RUSTC_BOOTSTRAP", "1");
        let _ = std::fs::remove_file(root.join("fuzz/target/.rustc_info.json"));
    } else {
        cmd.args(["--sanitizer", "none"]);
    }
    cmd.arg(target).arg(&corpus).arg(&seeds).args([
        "--".to_owned(),
        format!("-max_total_time={seconds}"),
        "-seed=1".to_owned(),
        "-print_final_stats=1".to_owned(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    println!("fuzzing {target} for {seconds} s{}", if asan { " under AddressSanitizer" } else { "" });
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if status.success() {
        return Ok(());
    }
    // Keep what it found where `cargo test -p fuzzing` replays it.
    let regressions = root.join("crates/fuzzing/regressions").join(target);
    std::fs::create_dir_all(&regressions)?;
    let mut kept = Vec::new();
    for e in std::fs::read_dir(&artifacts)? {
        let path = e?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, regressions.join(name))?;
            kept.push(regressions.join(name).display().to_string());
        }
    }
    bail!("fuzz target {target} failed ({status}); inputs kept for regression tests:\n  {}", kept.join("\n  "))
}
