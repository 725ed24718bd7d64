//! `cargo xtask setup --check`: which of the peers the tests, benches and drills use are missing
//! on this machine (installing them is still `.ci/run`'s job).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

/// Whether `program args` runs and succeeds.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
}

/// Prints one line per peer and fails (exit 1) when any is missing.
pub(crate) fn check() -> Result<()> {
    let cache = cache();
    let py = cache.join("syncproxy-py");
    let peers: Vec<(&str, bool)> = vec![
        ("qemu-img", runs("qemu-img", &["--version"])),
        ("qemu-io", runs("qemu-io", &["--version"])),
        ("qemu-nbd", runs("qemu-nbd", &["--version"])),
        ("nbdkit", runs("nbdkit", &["--version"])),
        ("nbdcopy", runs("nbdcopy", &["--version"])),
        ("restic", runs("restic", &["version"])),
        ("losetup", runs("losetup", &["--version"])),
        ("python3", runs("python3", &["--version"])),
        ("libssl-dev", runs("pkg-config", &["--exists", "openssl"])),
        ("go", runs("go", &["version"])),
        ("govmomi sources", PathBuf::from("/usr/share/gocode/src/github.com/vmware/govmomi/simulator").is_dir()),
        ("vcsim", cache.join("vcsim/vcsim").is_file()),
        (
            "pyvmomi",
            Command::new("python3")
                .env("PYTHONPATH", &py)
                .args(["-c", "import pyVmomi"])
                .status()
                .is_ok_and(|s| s.success()),
        ),
        ("SeaweedFS", cache.join("syncproxy-s3/bin/weed").is_file()),
        ("cargo-fuzz", runs("cargo", &["fuzz", "--version"])),
    ];
    let missing: Vec<&str> = peers.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
    for (name, ok) in &peers {
        println!("{name}: {}", if *ok { "present" } else { "MISSING" });
    }
    if !missing.is_empty() {
        bail!("{} peer(s) missing: {} (run .ci/run to install them)", missing.len(), missing.join(", "));
    }
    println!("every peer is present");
    Ok(())
}
