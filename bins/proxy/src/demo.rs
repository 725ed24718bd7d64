//! `proxy demo`: the whole product on the embedded vSphere simulator, with nothing to set up.
//! It starts the simulator with a few VMs (several disks of varied sizes and data), runs a full
//! backup of each into a new repository, changes data in the disks, runs an incremental,
//! restores every disk of both restore points, compares them byte for byte with what the
//! simulator held at each backup, and prints a summary. When QEMU and the boot disk's
//! packages are installed, one more VM holds a small bootable Debian guest, and the demo ends
//! with a drill: that VM booted straight from its restore point, in isolation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestration::hooks::Hooks;
use orchestration::{Buffers, DiskFilter, Job, JobSpec, Limits, Login, Target, VmReport};
use pipeline::Engine;
use repo::Repo;
use vsphere::{ConnectOptions, Credentials, Secret, Trust};
use vsphere_sim::{Config, Sim, SimTls};

const MIB: u64 = 1 << 20;

/// Options of `proxy demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where the simulator's datastores and the repository go (default: a temporary folder,
    /// removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How many VMs.
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// Size of each VM's first disk, in MiB (the others are half and a quarter of it).
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on("demo", demo(args))
}

/// Pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The name of the VM the demo drills.
const BOOTABLE: &str = "bootable";

/// The bootable VM, from a boot disk built here; why not, when it cannot be.
fn bootable_vm(like: &vsphere_sim::VmConfig) -> Result<vsphere_sim::VmConfig, String> {
    use vsphere_sim::bootdisk::{Variant, build, vmx_hardware};
    let disk = build(Variant::Bios).map_err(|e| e.to_string())?;
    let mut vm = like.clone();
    vm.name = BOOTABLE.into();
    vm.disks.truncate(1);
    vm.disks[0].capacity = 0;
    vm.disks[0].image = Some(disk.path);
    vm.controller = Some(vsphere_sim::ControllerKind::Sata);
    vm.vmx_extra = Some(vmx_hardware(Variant::Bios));
    Ok(vm)
}

fn estate(vms: usize, disk: u64) -> Config {
    let mut c = Config::small(vms, disk);
    for v in &mut c.datacenters[0].vms {
        let first = v.disks[0].clone();
        for size in [disk / 2, disk / 4] {
            let mut d = first.clone();
            d.capacity = size.max(MIB);
            v.disks.push(d);
        }
    }
    c
}

/// Compares each disk of each VM's restore point in `reports` with the simulator's disk now,
/// a piece at a time; returns the bytes compared.
fn compare_all(sim: &Sim, vms: &[vsphere::Vm], repo: &Repo, reports: &[VmReport]) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut compared = 0u64;
    for r in reports {
        let point = r.point.as_deref().context("a restore point")?;
        let v = vms.iter().find(|v| v.name == r.vm).context("the VM")?;
        for (n, d) in v.disks.iter().enumerate() {
            let reader = repo.reader(point, n)?;
            let file = std::fs::File::open(sim.disk_path(&v.name, d.key)?)?;
            let mut want = vec![0u8; 4 << 20];
            let mut at = 0;
            while at < d.capacity {
                let len = (d.capacity - at).min(4 << 20);
                let want = &mut want[..usize::try_from(len)?];
                file.read_exact_at(want, at)?;
                if reader.read(at, len)? != *want {
                    bail!("restore point {point} of {}, disk {n}, differs from the simulator's disk at {at}", v.name);
                }
                at += len;
            }
            compared += d.capacity;
        }
    }
    Ok(compared)
}

/// This process's peak resident memory, from /proc.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Backs up every VM of the simulator at once, as a job named `job`.
async fn back_up_all(
    login: &Login,
    repo: &Repo,
    job: &str,
    engine: &Arc<Engine>,
    metrics: &Arc<orchestration::Metrics>,
    vms: usize,
) -> Result<Vec<VmReport>> {
    let spec = JobSpec {
        login: login.clone(),
        selectors: Vec::new(),
        all: true,
        proxy_id: "demo".into(),
        job_id: job.into(),
        concurrency: vms,
        buffers: Buffers::Shared(engine.clone()),
        options: None,
        limits: Some(Arc::new(Limits::new(vms, None, None))),
        metrics: Some(metrics.clone()),
        max_job: Duration::from_secs(24 * 3600),
        disks: DiskFilter::default(),
        vddk: None,
        nbd: None,
        pin_drs: true,
        hooks: Hooks::default(),
    };
    let job = Job::prepare(spec, || Ok::<_, anyhow::Error>(Target::Repository(repo.clone()))).await?;
    let run = job.run(std::future::pending(), |_| {}).await?;
    let mut reports = run.report.vms;
    reports.sort_by(|a, b| a.vm.cmp(&b.vm));
    for r in &reports {
        if let Some(e) = &r.error {
            bail!("backup of {} failed: {e}", r.vm);
        }
    }
    Ok(reports)
}

async fn demo(args: &Args) -> Result<ExitCode> {
    vsphere::tls::install_crypto_provider();
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir().context("a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    let disk = args.disk_mib.max(4) * MIB;
    println!(
        "starting the vSphere simulator: {} VMs, disks of {} MiB, {} MiB and {} MiB",
        args.vms,
        disk / MIB,
        disk / 2 / MIB,
        disk / 4 / MIB
    );
    let mut config = estate(args.vms, disk);
    let bootable = bootable_vm(&config.datacenters[0].vms[0]);
    match &bootable {
        Ok(vm) => {
            println!("and a VM named {BOOTABLE} with a small bootable Debian guest on SATA, for a drill at the end");
            config.datacenters[0].vms.push(vm.clone());
        }
        Err(why) => println!("no bootable VM, so no drill at the end: {why} (`cargo xtask setup` installs it)"),
    }
    let sim = Sim::start(config, &dir.join("sim"), SimTls::SelfSigned).await?;
    let options = ConnectOptions {
        trust: Trust::Pinned(vsphere::Thumbprint::sha256_of(sim.certificate().context("the simulator's certificate")?)),
        timeout: Duration::from_secs(30),
        ..ConnectOptions::new(&sim.url())
    };
    let login = Login {
        options,
        credentials: Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") },
    };
    let client = login.clone().client().await?;
    let vms = client.vms().await?;
    // Data in about 40 % of each disk's MiBs.
    for (vi, v) in vms.iter().enumerate().filter(|(_, v)| v.name != BOOTABLE) {
        for (di, d) in v.disks.iter().enumerate() {
            for mib in 0..d.capacity / MIB {
                if (mib * 7 + vi as u64 * 3 + di as u64) % 5 < 2 {
                    sim.write(
                        &v.name,
                        d.key,
                        mib * MIB,
                        &noise(1 << 20, mib ^ ((vi as u64) << 32) ^ ((di as u64) << 48)),
                    )?;
                }
            }
        }
    }
    let repo = Repo::init(dir.join("repo"), 1 << 20)?;
    let engine = Arc::new(Engine::new(256 * MIB));
    let metrics = Arc::new(orchestration::Metrics::default());

    let t = Instant::now();
    let full = back_up_all(&login, &repo, "full", &engine, &metrics, vms.len()).await?;
    let full_secs = t.elapsed().as_secs_f64();
    // Every disk of every restore point is compared with the simulator's disk as it was when
    // the point was made, before anything changes it.
    let mut compared = compare_all(&sim, &vms, &repo, &full)?;

    // About 1 % of every disk changes (the bootable one stays as it is).
    for (vi, v) in vms.iter().enumerate().filter(|(_, v)| v.name != BOOTABLE) {
        for d in &v.disks {
            let len = (d.capacity / 100).max(4096);
            sim.write(&v.name, d.key, d.capacity / 3, &noise(len as usize, 1000 + vi as u64))?;
        }
    }
    let t = Instant::now();
    let inc = back_up_all(&login, &repo, "incremental", &engine, &metrics, vms.len()).await?;
    let inc_secs = t.elapsed().as_secs_f64();
    compared += compare_all(&sim, &vms, &repo, &inc)?;
    let verify = repo.verify()?;
    if !verify.damaged_points.is_empty() {
        bail!("verify found damage: {:?}", verify.damaged_points);
    }

    let sum = |rs: &[VmReport], f: fn(&orchestration::DiskReport) -> u64| -> u64 {
        rs.iter().flat_map(|r| r.disks.iter()).map(f).sum()
    };
    let total: u64 = vms.iter().flat_map(|v| v.disks.iter()).map(|d| d.capacity).sum();
    println!("\n{:<12} {:>10} {:>12} {:>12} {:>9} {:>10}", "backup", "disks", "read", "stored", "seconds", "MB/s read");
    for (name, rs, secs) in [("full", &full, full_secs), ("incremental", &inc, inc_secs)] {
        let read = sum(rs, |d| d.read);
        println!(
            "{name:<12} {:>10} {:>12} {:>12} {secs:>9.2} {:>10.1}",
            rs.iter().map(|r| r.disks.len()).sum::<usize>(),
            orchestration::human_bytes(read),
            orchestration::human_bytes(sum(rs, |d| d.stored_bytes)),
            read as f64 / secs.max(1e-9) / 1e6
        );
    }
    println!(
        "\n{} VMs, {} of disk; every disk of both restore points restored byte for byte ({} compared); verify \
         clean; no snapshot left behind",
        vms.len(),
        orchestration::human_bytes(total),
        orchestration::human_bytes(compared)
    );
    println!(
        "at most {} disks were in the copy phase at once; the copy buffers peaked at {} MiB of {} MiB; peak \
         RSS of this process (the simulator included) {} MiB",
        metrics.snapshot().disks_copying_peak,
        engine.pool.peak() / MIB,
        engine.pool.cap() / MIB,
        peak_rss().map_or_else(|| "?".to_owned(), |b| (b / MIB).to_string())
    );
    for r in full.iter().chain(&inc) {
        for w in &r.warnings {
            println!("note: {}: {w}", r.vm);
        }
    }
    if bootable.is_ok() {
        let point = inc.iter().find(|r| r.vm == BOOTABLE).and_then(|r| r.point.clone());
        let point = point.context("the bootable VM's incremental made no restore point")?;
        if !drill_bootable(&repo, &point, &dir).await? {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Boots the bootable VM's restore point from the repository in isolation; says whether it
/// came up (QEMU missing is said, and is not a failure of the demo).
async fn drill_bootable(repo: &Repo, point: &str, dir: &std::path::Path) -> Result<bool> {
    use vsphere_sim::bootdisk::MARKER_PREFIX;
    println!("\ndrill: booting {BOOTABLE}'s restore point {point} straight from the repository (no network) ...");
    let options = orchestration::drill_job::DrillOptions {
        accel: drill::Accel::Auto,
        boot_controller: None,
        checks: vec![drill::Check::serial(MARKER_PREFIX)],
        network: drill::Network::None,
        timeout: Duration::from_secs(300),
        work_root: dir.to_path_buf(),
        keep_report: true,
        cache: instant::CacheConfig::default(),
        vmx: None,
    };
    let outcome = match orchestration::drill_job::run_drill(repo, point, &options, drill::Cancel::new()).await {
        Ok(o) => o,
        Err(orchestration::OrchError::Drill(e @ drill::DrillError::QemuMissing { .. })) => {
            println!("drill skipped: {e}; `cargo xtask setup` installs it");
            return Ok(true);
        }
        Err(e) => return Err(e.into()),
    };
    let r = &outcome.report;
    println!(
        "drill {}: {} on {} with {}, {}; report kept beside the point (`proxy repo list`)",
        if r.passed { "passed" } else { "FAILED" },
        r.machine,
        r.accel,
        r.firmware,
        r.boot_seconds.map_or("no boot marker".to_owned(), |s| format!("the guest came up in {s:.1} s"))
    );
    if let Some(why) = &r.reason {
        println!("reason: {why}");
    }
    Ok(r.passed)
}
