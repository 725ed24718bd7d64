//! `cargo xtask bench repo`: `proxy repo backup` side by side with restic on the same
//! generated disk image, alternating runs, every timing ending with the data durable (`&& sync`
//! for both). Measures a first backup (ingest throughput and stored size) and an incremental
//! after a few MiB changed: ours from a changed-areas list (reads only the changed chunks), ours
//! without one (reads everything allocated, stores only what differs), and restic (re-reads
//! the whole file). Prints medians and our ratios.
//!
//! restic always encrypts (AES-256-CTR and Poly1305), so the first backup is also measured into
//! an encrypted repository of ours (AES-256-GCM, keyed chunk names).
//!
//! Each first backup of ours also runs with the hidden `--hash-twice` (the copy engine's digest
//! and then the chunk ID, as before the repository took the engine's digest as its ID), into a
//! repository of its own, so one run shows the CPU per GB both ways.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench_copy::{Sample, measure, new_image};

const MIB: u64 = 1 << 20;

/// A disk-like image: `data_pct` % of its MiBs hold data, and each of those is half random
/// bytes and half text-like runs (so compression has something to find, as on real disks).
pub(crate) fn make_image(path: &Path, size: u64, data_pct: u64, seed: u64) -> Result<()> {
    let Some((f, mut next)) = new_image(path, size, seed)? else { return Ok(()) };
    let mut block = vec![0u8; 1 << 20];
    let text = b"syncproxy restore point of a virtual disk, block after block; ";
    for slot in 0..size / MIB {
        if next() % 100 >= data_pct {
            continue;
        }
        let (random, textual) = block.split_at_mut(1 << 19);
        for c in random.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        let shift = usize::try_from(next() % text.len() as u64)?;
        for (i, b) in textual.iter_mut().enumerate() {
            *b = text[(i + shift) % text.len()];
        }
        f.write_all_at(&block, slot * MIB)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Changes `n` scattered 4 KiB areas of `path` (in place) and returns them as a changed-areas
/// list (`OFFSET LENGTH` lines).
fn change(path: &Path, n: u64, seed: u64) -> Result<String> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let size = f.metadata()?.len();
    let mut x = seed | 1;
    let mut list = String::new();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x % (size / 4096)) * 4096;
        f.write_all_at(&x.to_le_bytes().repeat(512), at)?;
        list.push_str(&format!("{at} 4096\n"));
    }
    f.sync_all()?;
    Ok(list)
}

fn du(path: &Path) -> Result<u64> {
    let out = crate::output(Command::new("du").args(["-sb", &path.display().to_string()]))?;
    out.split_whitespace().next().and_then(|s| s.parse().ok()).context("du output")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let small = std::env::var("BENCH_REPO_SMALL").is_ok_and(|v| v == "1");
    let rounds: usize =
        std::env::var("BENCH_REPO_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(if small { 1 } else { 3 });
    let mib: u64 =
        std::env::var("BENCH_REPO_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(if small { 128 } else { 2048 });
    for tool in ["restic", "python3", "du"] {
        crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .with_context(|| format!("bench repo needs {tool} (apt: restic, python3, coreutils)"))?;
    }
    let target = crate::target_dir(root);
    let dir = target.join("bench-repo");
    std::fs::create_dir_all(&dir)?;
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy"])?;
    let proxy = target.join("release/proxy").display().to_string();
    let base = dir.join(format!("img-{mib}m.raw"));
    println!("making a {mib} MiB image (60 % of MiBs hold data, half of each compressible) in {}", dir.display());
    make_image(&base, mib * MIB, 60, 7)?;
    let img = dir.join("work.raw");
    let changes = (mib / 64).max(4);
    // restic's key derivation and cache are not what is measured.
    let restic_env = format!("RESTIC_PASSWORD=bench RESTIC_CACHE_DIR={} ", dir.join("restic-cache").display());
    let (mut ours_full, mut restic_full, mut ours_inc, mut ours_rescan, mut restic_inc) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ours_enc_full = Vec::new();
    // CPU seconds of the first backups: ours plain and encrypted, each hashing once and (as
    // before) twice, and restic's.
    let (mut cpu_plain, mut cpu_plain_twice, mut cpu_enc, mut cpu_enc_twice, mut cpu_restic) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ours_size, mut ours_enc_size, mut restic_size, mut ours_read) = (0, 0, 0, 0u64);
    let (key, key_twice) = (dir.join("bench.key"), dir.join("bench-twice.key"));
    let run_ours = |repo: &Path, extra: &str| -> Result<Sample> {
        measure(&format!("{proxy} repo backup {} {} --name vm {extra} && sync", repo.display(), img.display()), None)
    };
    let run_restic = |repo: &Path| -> Result<Sample> {
        measure(&format!("{restic_env}restic -q -r {} backup {} && sync", repo.display(), img.display()), None)
    };
    for round in 0..rounds {
        let (ours, ours_enc, theirs) = (dir.join("repo-ours"), dir.join("repo-ours-enc"), dir.join("repo-restic"));
        let (twice, enc_twice) = (dir.join("repo-ours-twice"), dir.join("repo-ours-enc-twice"));
        for d in [&ours, &ours_enc, &theirs, &twice, &enc_twice] {
            let _ = std::fs::remove_dir_all(d);
        }
        for (repo, key) in [(&ours_enc, &key), (&enc_twice, &key_twice)] {
            let _ = std::fs::remove_file(key);
            crate::output(Command::new(&proxy).args([
                "repo",
                "init",
                &repo.display().to_string(),
                "--encrypt",
                "--key-file",
                &key.display().to_string(),
            ]))?;
        }
        std::fs::copy(&base, &img)?;
        crate::run(&mut Command::new("sync"))?;
        for repo in [&ours, &twice] {
            crate::output(Command::new(&proxy).args(["repo", "init", &repo.display().to_string()]))?;
        }
        crate::output(
            Command::new("sh")
                .args(["-c", &format!("{restic_env}restic -q -r {} init --repository-version 2", theirs.display())]),
        )?;
        // Alternate who goes first.
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for ours_turn in order {
            if ours_turn {
                // Once and twice alternate who goes first too.
                let enc_args = format!("--key-file {}", key.display());
                let enc_twice_args = format!("--key-file {} --hash-twice", key_twice.display());
                for twice_turn in if round % 2 == 0 { [false, true] } else { [true, false] } {
                    if twice_turn {
                        cpu_plain_twice.push(run_ours(&twice, "--hash-twice")?.cpu());
                        cpu_enc_twice.push(run_ours(&enc_twice, &enc_twice_args)?.cpu());
                    } else {
                        let s = run_ours(&ours, "")?;
                        ours_full.push(s.wall);
                        cpu_plain.push(s.cpu());
                        let s = run_ours(&ours_enc, &enc_args)?;
                        ours_enc_full.push(s.wall);
                        cpu_enc.push(s.cpu());
                    }
                }
            } else {
                let s = run_restic(&theirs)?;
                restic_full.push(s.wall);
                cpu_restic.push(s.cpu());
            }
        }
        ours_size = du(&ours)?;
        ours_enc_size = du(&ours_enc)?;
        restic_size = du(&theirs)?;
        let list = change(&img, changes, 100 + round as u64)?;
        let list_path = dir.join("changed.txt");
        std::fs::write(&list_path, list)?;
        crate::run(&mut Command::new("sync"))?;
        for ours_turn in order {
            if ours_turn {
                let json = crate::output(Command::new(&proxy).args([
                    "repo",
                    "backup",
                    &ours.display().to_string(),
                    &img.display().to_string(),
                    "--name",
                    "vm",
                    "--changed",
                    &list_path.display().to_string(),
                    "--json",
                    "--parent",
                    "latest",
                ]));
                // Timed separately below; this run records what was read.
                let v: serde_json::Value = serde_json::from_str(&json?)?;
                ours_read = v["read"].as_u64().unwrap_or(0);
                ours_inc.push(run_ours(&ours, &format!("--changed {} --parent latest", list_path.display()))?.wall);
                ours_rescan.push(run_ours(&ours, "--parent latest")?.wall);
            } else {
                restic_inc.push(run_restic(&theirs)?.wall);
            }
        }
    }
    let mb = (mib * MIB) as f64 / 1e6;
    let (of, ef, rf) = (median(&mut ours_full), median(&mut ours_enc_full), median(&mut restic_full));
    let (oi, orr, ri) = (median(&mut ours_inc), median(&mut ours_rescan), median(&mut restic_inc));
    println!("\nfirst backup of a {mib} MiB image, durable, median of {rounds} (alternating):");
    println!("  proxy repo backup   {of:7.2} s  {:7.1} MB/s of disk  stored {:>12} bytes", mb / of, ours_size);
    println!("  ... encrypted       {ef:7.2} s  {:7.1} MB/s of disk  stored {:>12} bytes", mb / ef, ours_enc_size);
    println!("  restic backup       {rf:7.2} s  {:7.1} MB/s of disk  stored {:>12} bytes", mb / rf, restic_size);
    println!(
        "  ratio: {:.2}x restic's throughput ({:.2}x encrypted, as restic always is); stored size {:.3} of restic's \
         ({:.3} encrypted)",
        rf / of,
        rf / ef,
        ours_size as f64 / restic_size as f64,
        ours_enc_size as f64 / restic_size as f64
    );
    let gb = (mib * MIB) as f64 / 1e9;
    let (cp, cpt) = (median(&mut cpu_plain) / gb, median(&mut cpu_plain_twice) / gb);
    let (ce, cet, cr) = (median(&mut cpu_enc) / gb, median(&mut cpu_enc_twice) / gb, median(&mut cpu_restic) / gb);
    println!("\nCPU (user + system) per GB of disk, first backup, median of {rounds}:");
    println!("  proxy repo backup, plain, one hash        {cp:6.3} s/GB");
    println!("  ... --hash-twice (engine digest + chunk ID) {cpt:6.3} s/GB  (one hash saves {:.3} s/GB)", cpt - cp);
    println!("  proxy repo backup, encrypted (keyed ID)  {ce:6.3} s/GB");
    println!("  ... --hash-twice (plain digest + keyed ID) {cet:6.3} s/GB  (one hash saves {:.3} s/GB)", cet - ce);
    println!("  restic backup                            {cr:6.3} s/GB");
    println!("\nincremental after {changes} scattered 4 KiB writes, durable:");
    println!(
        "  proxy repo backup --changed   {oi:7.2} s  read {ours_read} bytes ({} chunks of 4 MiB)",
        ours_read / (4 * MIB)
    );
    println!("  proxy repo backup (rescan)    {orr:7.2} s  reads every allocated byte, stores only what differs");
    println!("  restic backup                 {ri:7.2} s  re-reads the whole file");
    println!("  ratio: --changed {:.1}x restic; rescan {:.2}x restic", ri / oi, ri / orr);
    if ours_read > changes * 4 * MIB {
        bail!("the incremental read {ours_read} bytes, more than the {changes} chunks it was told about");
    }
    Ok(())
}
