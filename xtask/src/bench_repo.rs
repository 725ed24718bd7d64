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
//!
//! Then the rows of issue 26, each one run, from a logging nbdkit so the bytes we read are
//! counted exactly: a first backup of the fragmented image of `bench copy` (bytes read against
//! the source's data), and a scattered incremental (1,000 random 64 KiB writes on a 4 GiB disk;
//! small: 200 on 512 MiB) from the exact changed-areas list (bytes read against the changed
//! bytes, repository growth against restic's). Both restore points are restored and compared
//! with their source; a difference fails the bench.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench_copy::{
    NbdCounts, Sample, allocated, data_extents, fragmented_size, make_fragmented, measure, met, mib, nbdkit_run,
    new_image, same_bytes, xorshift,
};

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

/// Runs `script` under `sh -c`: its wall time and standard output.
fn timed_sh(script: &str) -> Result<(f64, String)> {
    let t = std::time::Instant::now();
    let out = crate::output(Command::new("sh").args(["-c", script]))?;
    Ok((t.elapsed().as_secs_f64(), out))
}

/// A number from the JSON summary `out` (its last line) of `proxy --json` or `restic --json`.
fn json_u64(out: &str, key: &str) -> Result<u64> {
    let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last).with_context(|| format!("a JSON summary, not {last:?}"))?;
    v.get(key).and_then(serde_json::Value::as_u64).with_context(|| format!("no {key} in {last}"))
}

/// A string from the same.
fn json_str(out: &str, key: &str) -> Result<String> {
    let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last).with_context(|| format!("a JSON summary, not {last:?}"))?;
    v.get(key).and_then(serde_json::Value::as_str).map(str::to_owned).with_context(|| format!("no {key} in {last}"))
}

/// Our backup of `img` into `repo`, served by a captive logging nbdkit: the wall time (durable),
/// what nbdkit was asked to read, and our JSON summary.
fn backup_from_nbd(proxy: &str, repo: &Path, img: &Path, log: &Path, extra: &str) -> Result<(f64, NbdCounts, String)> {
    let script =
        nbdkit_run(img, log, true, &format!("{proxy} repo backup {} \"$uri\" --json {extra} && sync", repo.display()));
    let (wall, out) = timed_sh(&script)?;
    Ok((wall, NbdCounts::from_log(log)?, out))
}

/// What restic's backup of `img` into `repo` cost, durable.
struct Restic {
    wall: f64,
    /// `data_added` of its summary: restic 0.14 counts the new blobs before compression.
    data_added: u64,
    /// What the repository grew by on disk (packs, index, snapshot).
    grew: u64,
}

fn restic_backup(restic_env: &str, repo: &Path, img: &Path) -> Result<Restic> {
    let before = du(repo)?;
    let (wall, out) =
        timed_sh(&format!("{restic_env}restic -r {} backup --json {} && sync", repo.display(), img.display()))?;
    Ok(Restic { wall, data_added: json_u64(&out, "data_added")?, grew: du(repo)?.saturating_sub(before) })
}

/// A fresh repository of ours and one of restic's.
fn init_repos(proxy: &str, restic_env: &str, ours: &Path, theirs: &Path) -> Result<()> {
    for d in [ours, theirs] {
        let _ = std::fs::remove_dir_all(d);
    }
    crate::output(Command::new(proxy).args(["repo", "init", &ours.display().to_string()]))?;
    crate::output(
        Command::new("sh")
            .args(["-c", &format!("{restic_env}restic -q -r {} init --repository-version 2", theirs.display())]),
    )?;
    Ok(())
}

/// Restores `point` of `repo` and fails unless it equals `img`.
fn check_restore(proxy: &str, repo: &Path, point: &str, img: &Path, out: &Path) -> Result<()> {
    crate::output(Command::new(proxy).args([
        "repo",
        "restore",
        &repo.display().to_string(),
        point,
        &out.display().to_string(),
        "--force",
    ]))?;
    let r = same_bytes(img, out).with_context(|| format!("the restore of {point} is wrong"));
    let _ = std::fs::remove_file(out);
    r
}

/// Issue 26, first backup: the fragmented image (as in `bench copy`) served by nbdkit, what we
/// read of it against the data it holds, and restic's backup of the same file.
fn fragmented(dir: &Path, proxy: &str, small: bool, restic_env: &str) -> Result<()> {
    let size = fragmented_size(small);
    let img = dir.join(format!("frag-{}m.raw", size >> 20));
    make_fragmented(&img, size, 26)?;
    let extents = data_extents(&img)?;
    let data: u64 = extents.iter().map(|e| e.1).sum();
    let (ours, theirs, log) = (dir.join("repo-frag"), dir.join("repo-frag-restic"), dir.join("frag.log"));
    init_repos(proxy, restic_env, &ours, &theirs)?;
    crate::run(&mut Command::new("sync"))?;
    let before = du(&ours)?;
    let (wall, read, out) = backup_from_nbd(proxy, &ours, &img, &log, "--name frag")?;
    let (stored, point, grew) =
        (json_u64(&out, "stored_bytes")?, json_str(&out, "point")?, du(&ours)?.saturating_sub(before));
    let r = restic_backup(restic_env, &theirs, &img)?;
    check_restore(proxy, &ours, &point, &img, &dir.join("frag-restored.raw"))?;
    let over = read.read as f64 / data as f64 - 1.0;
    println!(
        "\nfirst backup of a fragmented {} MiB image ({} of data in {} extents, some all zeros), from nbdkit, \
         durable, one run:",
        size >> 20,
        mib(data),
        extents.len()
    );
    println!(
        "  proxy repo backup   {wall:7.2} s  read {} in {} requests  stored {} (repository grew {})",
        mib(read.read),
        read.reads,
        mib(stored),
        mib(grew)
    );
    println!(
        "  restic backup       {:7.2} s  reads the whole file  data_added {} (before compression; repository grew {})",
        r.wall,
        mib(r.data_added),
        mib(r.grew)
    );
    println!(
        "  targets: read = source data {:+.1} % (target <= +1 %: {}); restore byte-identical",
        100.0 * over,
        met(over <= 0.01)
    );
    for p in [&ours, &theirs] {
        let _ = std::fs::remove_dir_all(p);
    }
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// Writes `n` distinct random 64 KiB-aligned 64 KiB areas of `path` (in place), each half random
/// bytes and half text-like, as `make_image` fills its MiBs, and returns them as a changed-areas
/// list.
fn scatter(path: &Path, n: u64, seed: u64) -> Result<(String, u64)> {
    const AREA: u64 = 64 << 10;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let slots = f.metadata()?.len() / AREA;
    let mut next = xorshift(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < n.min(slots) {
        picked.insert(next() % slots);
    }
    let text = b"syncproxy restore point of a virtual disk, block after block; ";
    let half = usize::try_from(AREA / 2)?;
    let mut block = vec![0u8; 2 * half];
    let mut list = String::new();
    for slot in &picked {
        let (random, textual) = block.split_at_mut(half);
        for c in random.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        let shift = usize::try_from(next() % text.len() as u64)?;
        for (i, b) in textual.iter_mut().enumerate() {
            *b = text[(i + shift) % text.len()];
        }
        f.write_all_at(&block, slot * AREA)?;
        list.push_str(&format!("{} {AREA}\n", slot * AREA));
    }
    f.sync_all()?;
    Ok((list, picked.len() as u64 * AREA))
}

/// Issue 26, scattered incremental: a sparse disk (40 % of its MiBs data), a first backup by us
/// (from nbdkit) and by restic, then 1,000 (small: 200) random 64 KiB writes; our incremental
/// from the exact changed-areas list, against restic re-reading the file. Fails when our
/// restore of the incremental differs from the disk.
fn scattered(dir: &Path, proxy: &str, small: bool, restic_env: &str) -> Result<()> {
    let (size, n) = if small { (512 * MIB, 200) } else { (4 << 30, 1000) };
    let base = dir.join(format!("scatter-{}m.raw", size >> 20));
    make_image(&base, size, 40, 26)?;
    let img = dir.join("scatter-work.raw");
    crate::output(Command::new("cp").arg("--sparse=always").arg(&base).arg(&img))?;
    let data: u64 = data_extents(&img)?.iter().map(|e| e.1).sum();
    let (ours, theirs, log) = (dir.join("repo-scatter"), dir.join("repo-scatter-restic"), dir.join("scatter.log"));
    init_repos(proxy, restic_env, &ours, &theirs)?;
    crate::run(&mut Command::new("sync"))?;
    let (fwall, fread, fout) = backup_from_nbd(proxy, &ours, &img, &log, "--name scatter")?;
    let fstored = json_u64(&fout, "stored_bytes")?;
    let first = restic_backup(restic_env, &theirs, &img)?;

    let (list, changed) = scatter(&img, n, 2600)?;
    let list_path = dir.join("scatter-changed.txt");
    std::fs::write(&list_path, list)?;
    crate::run(&mut Command::new("sync"))?;
    let before = du(&ours)?;
    let (wall, read, out) = backup_from_nbd(
        proxy,
        &ours,
        &img,
        &log,
        &format!("--name scatter --changed {} --parent latest", list_path.display()),
    )?;
    let (stored, point, grew) =
        (json_u64(&out, "stored_bytes")?, json_str(&out, "point")?, du(&ours)?.saturating_sub(before));
    let r = restic_backup(restic_env, &theirs, &img)?;
    check_restore(proxy, &ours, &point, &img, &dir.join("scatter-restored.raw"))?;
    println!(
        "\nscattered incremental on a {} MiB disk ({} of data, {} allocated), from nbdkit, durable, one run:",
        size >> 20,
        mib(data),
        mib(allocated(&img)?)
    );
    println!(
        "  first backup: proxy {fwall:.2} s, read {}, stored {}; restic {:.2} s, data_added {}, repository grew {}",
        mib(fread.read),
        mib(fstored),
        first.wall,
        mib(first.data_added),
        mib(first.grew)
    );
    println!("  then {n} random 64 KiB writes (half random bytes, half text-like): {} changed", mib(changed));
    println!(
        "  proxy repo backup --changed {wall:7.2} s  read {} in {} requests ({:.2}x changed)  stored {} \
         (repository grew {})",
        mib(read.read),
        read.reads,
        read.read as f64 / changed as f64,
        mib(stored),
        mib(grew)
    );
    println!(
        "  restic backup               {:7.2} s  reads the whole file  data_added {} (before compression; \
         repository grew {})",
        r.wall,
        mib(r.data_added),
        mib(r.grew)
    );
    // Stored is compared as the repositories' growth on disk: restic 0.14's data_added is
    // counted before compression, our stored_bytes after.
    println!(
        "  targets: read {:.2}x changed (target <= 1.05: {}); repository grew {} vs restic's {} (target <= restic's: \
         {}); restore byte-identical",
        read.read as f64 / changed as f64,
        met(read.read as f64 <= 1.05 * changed as f64),
        mib(grew),
        mib(r.grew),
        met(grew <= r.grew)
    );
    for p in [&ours, &theirs] {
        let _ = std::fs::remove_dir_all(p);
    }
    for p in [&img, &log, &list_path] {
        let _ = std::fs::remove_file(p);
    }
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
        "  proxy repo backup --changed   {oi:7.2} s  read {ours_read} bytes (the changes: {} bytes)",
        changes * 4096
    );
    println!("  proxy repo backup (rescan)    {orr:7.2} s  reads every allocated byte, stores only what differs");
    println!("  restic backup                 {ri:7.2} s  re-reads the whole file");
    println!("  ratio: --changed {:.1}x restic; rescan {:.2}x restic", ri / oi, ri / orr);
    fragmented(&dir, &proxy, small, &restic_env)?;
    scattered(&dir, &proxy, small, &restic_env)?;
    if ours_read > changes * 4096 {
        bail!("the incremental read {ours_read} bytes, more than the {changes} areas of 4 KiB it was told about");
    }
    Ok(())
}
