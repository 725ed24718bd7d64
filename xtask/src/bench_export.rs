//! `cargo xtask bench export`: instant recovery's exports side by side with `qemu-nbd` serving
//! the same bytes from a raw file. A generated image (60 % of its MiBs data, half of each
//! compressible) is backed up into a repository; then, each from a freshly started server on a
//! Unix socket, alternating: the time until the socket is up, the time to first byte (a client
//! connecting and reading 4 KiB of data), and sequential throughput of the whole export
//! (`nbdcopy URI null:`, which reads what block status calls data). Subjects: `proxy export`
//! from the repository, `proxy export --replica` of the raw file, and `qemu-nbd -r -f raw` of
//! the same file. Everything is read warm (page cache), for every subject alike. Prints
//! medians and our ratios against qemu-nbd (targets: 0.8 from the repository, 1.0 from the
//! replica).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench_copy::measure;
use crate::bench_repo::make_image;

const MIB: u64 = 1 << 20;

/// One server under test.
struct Subject {
    name: &'static str,
    /// The command that serves the image on `socket` (the export named `disk`).
    start: Box<dyn Fn(&Path) -> Command>,
}

/// What one round measured of one subject.
struct Round {
    ready: f64,
    first_byte: f64,
    copy: f64,
    server_cpu: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Starts a server and waits for its socket (at most 30 s); returns it and the seconds taken.
fn start(cmd: &mut Command, socket: &Path) -> Result<(Child, f64)> {
    let _ = std::fs::remove_file(socket);
    let t = Instant::now();
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().with_context(|| format!("{cmd:?}"))?;
    while !socket.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{cmd:?} exited with {status} before serving");
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("{cmd:?} did not serve within 30 s");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok((child, t.elapsed().as_secs_f64()))
}

fn stop(mut child: Child) -> Result<()> {
    crate::output(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    child.wait()?;
    Ok(())
}

fn run_round(s: &Subject, socket: &Path, first_data: u64) -> Result<Round> {
    let (child, ready) = start(&mut (s.start)(socket), socket)?;
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let first = measure(&format!("qemu-io -r -f raw -c 'read {first_data} 4096' '{uri}'"), None)?;
    // A fresh server for the copy would re-measure the start; the first read's chunk is one of
    // 512 MiB, so what it left in a cache does not matter.
    let copy = measure(&format!("nbdcopy '{uri}' null:"), Some(child.id()))?;
    stop(child)?;
    Ok(Round { ready, first_byte: first.wall, copy: copy.wall, server_cpu: copy.server_cpu })
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let rounds: usize = std::env::var("BENCH_EXPORT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mib: u64 = std::env::var("BENCH_EXPORT_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(512);
    for tool in ["qemu-nbd", "qemu-io", "nbdcopy", "python3"] {
        crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .with_context(|| format!("bench export needs {tool} (apt: qemu-utils, libnbd-bin, python3)"))?;
    }
    let target = crate::target_dir(root);
    let dir = target.join("bench-export");
    std::fs::create_dir_all(&dir)?;
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy"])?;
    let proxy = target.join("release/proxy");
    let image = dir.join(format!("img-{mib}m.raw"));
    println!("making a {mib} MiB image (60 % of MiBs hold data, half of each compressible) in {}", dir.display());
    make_image(&image, mib * MIB, 60, 11)?;
    // Served under the export name `disk`, like the others.
    let disk = dir.join("vm/disk.raw");
    std::fs::create_dir_all(dir.join("vm"))?;
    let _ = std::fs::remove_file(&disk);
    std::fs::hard_link(&image, &disk).or_else(|_| std::fs::copy(&image, &disk).map(|_| ()))?;
    let repo = dir.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    crate::output(Command::new(&proxy).args(["repo", "init", &repo.display().to_string()]))?;
    crate::output(Command::new(&proxy).args([
        "repo",
        "backup",
        &repo.display().to_string(),
        &disk.display().to_string(),
        "--name",
        "disk",
    ]))?;
    let first_data = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&image)?;
        let mut b = vec![0u8; 4096];
        (0..mib)
            .map(|m| m * MIB)
            .find(|&at| f.read_exact_at(&mut b, at).is_ok() && b.iter().any(|&x| x != 0))
            .context("the image holds no data")?
    };
    let (p1, p2, r, d) = (proxy.clone(), proxy.clone(), repo.clone(), disk.clone());
    let subjects = [
        Subject {
            name: "proxy export (repository)",
            start: Box::new(move |s| {
                let mut c = Command::new(&p1);
                c.arg("export").arg(&r).args(["latest", "--socket"]).arg(s);
                c
            }),
        },
        Subject {
            name: "proxy export --replica",
            start: Box::new(move |s| {
                let mut c = Command::new(&p2);
                c.args(["export", "--replica"]).arg(&d).arg("--socket").arg(s);
                c
            }),
        },
        Subject {
            name: "qemu-nbd -r -f raw",
            start: Box::new({
                let d = disk.clone();
                move |s| {
                    let mut c = Command::new("qemu-nbd");
                    c.args(["-r", "-f", "raw", "-t", "--shared=16", "-x", "disk", "-k"]).arg(s).arg(&d);
                    c
                }
            }),
        },
    ];
    let socket = dir.join("nbd.sock");
    let mut results: Vec<Vec<Round>> = subjects.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        // Rotate who goes first.
        for k in 0..subjects.len() {
            let i = (k + round) % subjects.len();
            results[i].push(run_round(&subjects[i], &socket, first_data)?);
        }
    }
    let mb = (mib * MIB) as f64 / 1e6;
    println!("\n{mib} MiB image, 60 % data, warm, median of {rounds} (alternating), Unix socket:");
    println!(
        "  {:<28} {:>10} {:>15} {:>10} {:>14} {:>12}",
        "server", "ready ms", "first 4K ms", "copy s", "MB/s of disk", "server CPU s"
    );
    let mut rates = Vec::new();
    for (s, rs) in subjects.iter().zip(&mut results) {
        let ready = median(&mut rs.iter().map(|r| r.ready).collect::<Vec<_>>());
        let first = median(&mut rs.iter().map(|r| r.first_byte).collect::<Vec<_>>());
        let copy = median(&mut rs.iter().map(|r| r.copy).collect::<Vec<_>>());
        let cpu = median(&mut rs.iter().map(|r| r.server_cpu).collect::<Vec<_>>());
        println!(
            "  {:<28} {:>10.1} {:>15.1} {:>10.2} {:>14.1} {:>12.2}",
            s.name,
            ready * 1e3,
            first * 1e3,
            copy,
            mb / copy,
            cpu
        );
        rates.push((mb / copy, first));
    }
    let (q, qf) = rates[2];
    println!(
        "  ratio to qemu-nbd's throughput: repository {:.2} (target 0.8), replica {:.2} (target 1.0); first byte \
         {:.2}x and {:.2}x qemu-nbd's time (qemu-io's own start included in all three)",
        rates[0].0 / q,
        rates[1].0 / q,
        rates[0].1 / qf,
        rates[1].1 / qf
    );
    Ok(())
}
