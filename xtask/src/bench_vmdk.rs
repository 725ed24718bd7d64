//! `cargo xtask bench-vmdk`: VMDK to raw, our `probe vmdk --to-raw` against
//! `qemu-img convert -O raw`, on the same monolithicSparse and streamOptimized files, in
//! alternating runs; both outputs are made durable (fsync) inside the timing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// A raw image of `size` bytes that looks like a used disk: per MiB, a fifth zeros, two fifths
/// random (incompressible), two fifths text (compressible).
fn make_source(path: &Path, size: u64) -> Result<()> {
    if path.metadata().is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let f = File::create(path)?;
    f.set_len(size)?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        match i % 5 {
            0 => continue,
            1 | 2 => chunk.iter_mut().for_each(|b| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state.to_le_bytes()[0];
            }),
            _ => {
                let text = format!("block {i}: the quick brown fox jumps over the lazy dog; syncproxy bench line\n");
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
        }
        f.write_all_at(&chunk, i << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let size: u64 = std::env::var("BENCH_VMDK_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024) << 20;
    let rounds: usize = std::env::var("BENCH_VMDK_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = crate::target_dir(root).join("bench-vmdk");
    std::fs::create_dir_all(&dir)?;
    crate::cargo(&["build", "--release", "--locked", "-p", "probe"])?;
    let probe = crate::target_dir(root).join("release/probe");
    let mib = size >> 20;
    let src = dir.join(format!("src-{mib}m.raw"));
    make_source(&src, size)?;
    println!("VMDK to raw, {} MiB disk, {rounds} alternating rounds, durable output", size >> 20);
    println!("{:<18} {:>10} {:>10} {:>8} {:>8}", "format", "ours s", "qemu s", "MB/s", "qemu/us");
    for sub in ["monolithicSparse", "streamOptimized"] {
        let vmdk = dir.join(format!("{sub}-{mib}m.vmdk"));
        if !vmdk.exists() {
            crate::run(
                Command::new("qemu-img")
                    .args(["convert", "-O", "vmdk", "-o", &format!("subformat={sub}")])
                    .arg(&src)
                    .arg(&vmdk),
            )
            .context("qemu-img (apt-get install qemu-utils)")?;
        }
        let (ours_out, qemu_out) = (dir.join("ours.raw"), dir.join("qemu.raw"));
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let _ = std::fs::remove_file(&ours_out);
            ours.push(crate::timed(Command::new(&probe).arg("vmdk").arg(&vmdk).arg("--to-raw").arg(&ours_out))?);
            let _ = std::fs::remove_file(&qemu_out);
            let started = Instant::now();
            crate::output(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&vmdk).arg(&qemu_out))?;
            crate::output(Command::new("sync").arg(&qemu_out))?;
            theirs.push(started.elapsed().as_secs_f64());
        }
        if crate::output(Command::new("cmp").arg(&ours_out).arg(&qemu_out)).is_err() {
            bail!("{sub}: our output differs from qemu-img's");
        }
        let (o, q) = (crate::median(&mut ours), crate::median(&mut theirs));
        println!("{sub:<18} {o:>10.3} {q:>10.3} {:>8.0} {:>8.2}", size as f64 / 1e6 / o, q / o);
    }
    println!("(qemu/us > 1 means we are faster; medians of the rounds; outputs compared equal)");
    Ok(())
}
