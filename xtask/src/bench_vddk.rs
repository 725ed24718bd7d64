//! `cargo xtask bench-vddk`: reading a 4 GiB disk through the VDDK binding (the fake library,
//! 2 MiB requests through the disk's worker thread) against reading the same file directly
//! with `dd bs=2M`, in alternating runs, so the binding is shown never to be the bottleneck.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;

use anyhow::Result;

pub(crate) fn run(root: &std::path::Path) -> Result<()> {
    let mib: u64 = std::env::var("BENCH_VDDK_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(4096);
    let rounds: usize = std::env::var("BENCH_VDDK_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let size = mib << 20;
    crate::cargo(&["build", "--release", "--locked", "-p", "probe"])?;
    let probe = crate::target_dir(root).join("release/probe");
    let dir = crate::target_dir(root).join("bench-vddk");
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join(format!("disk-{mib}m.raw"));
    if !disk.metadata().is_ok_and(|m| m.len() == size) {
        let f = File::create(&disk)?;
        let chunk: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24).to_le_bytes()[0]).collect();
        for i in 0..size / chunk.len() as u64 {
            f.write_all_at(&chunk, i * chunk.len() as u64)?;
        }
        f.sync_all()?;
    }
    let fake = vddk_fake::libdir(vddk_fake::Fake::V8);
    let (mut ours, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(crate::timed(Command::new(&probe).arg("vddk").arg("--libdir").arg(&fake).arg("--read").arg(&disk))?);
        direct.push(crate::timed(
            Command::new("dd").arg(format!("if={}", disk.display())).args(["of=/dev/null", "bs=2M"]),
        )?);
    }
    let (o, d) = (crate::median(&mut ours), crate::median(&mut direct));
    println!("reading a {mib} MiB disk, {rounds} alternating rounds, medians (page cache warm for both)");
    println!("through VDDK binding (fake library): {o:.3} s  {:.0} MB/s", size as f64 / 1e6 / o);
    println!("directly (dd bs=2M):                 {d:.3} s  {:.0} MB/s", size as f64 / 1e6 / d);
    println!("direct/binding time ratio: {:.2} (1.0 = no overhead)", d / o);
    Ok(())
}
