//! `cargo xtask bench vms`: `proxy backup --all` of many VMs at once against the project's
//! vSphere simulator (run inside xtask, so the proxy's own process is what is measured): the
//! wall time, CPU and peak RSS of a full backup of every VM, then of an incremental after 1 % of
//! each disk changed, with the peak of disks in the copy phase and one VM's full against its
//! incremental. Peers have no simulator to run against, so this bench measures us alone.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimTls};

use testkit::noise;

use crate::bench_copy::{Sample, measure};

const MIB: u64 = 1 << 20;

/// One backup of every VM: the measurement and what the proxy reported.
fn backup(
    proxy: &str,
    url: &str,
    thumb: &str,
    repo: &Path,
    out: &Path,
    memory: &str,
) -> Result<(Sample, serde_json::Value)> {
    let script = format!(
        "SYNCPROXY_PASSWORD=simulated {proxy} backup --url {url} --user backup@vsphere.local --thumbprint {thumb} {} \
         --all --concurrency 1000 --memory {memory} --json > {} && sync",
        repo.display(),
        out.display()
    );
    let s = measure(&script, None)?;
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out)?).context("the proxy's JSON")?;
    if j["outcome"] != "all" {
        bail!("not every VM was backed up: {}", j["outcome"]);
    }
    Ok((s, j))
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let vms: usize = std::env::var("BENCH_VMS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let disk_mib: u64 = std::env::var("BENCH_VM_DISK_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    let memory = std::env::var("BENCH_VM_MEMORY").unwrap_or_else(|_| "256M".into());
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy"])?;
    let target = crate::target_dir(root);
    let proxy = target.join("release/proxy").display().to_string();
    let dir = target.join("bench-vms");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    vsphere::tls::install_crypto_provider();
    let disk = disk_mib * MIB;
    let sim = rt.block_on(Sim::start(Config::small(vms, disk), &dir.join("sim"), SimTls::SelfSigned))?;
    let thumb = Thumbprint::sha256_of(sim.certificate().context("the simulator's certificate")?).to_string();
    let url = sim.url();
    let client = rt.block_on(async {
        let opts =
            ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(60), ..ConnectOptions::new(&url) };
        let c = Client::connect(&opts).await?;
        c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") }).await?;
        anyhow::Ok(Arc::new(c))
    })?;
    let all = rt.block_on(client.vms())?;
    println!("{vms} VMs with one {disk_mib} MiB disk each; data in 40 % of each disk's MiBs");
    for (i, v) in all.iter().enumerate() {
        for mib in (0..disk_mib).filter(|m| (m * 7 + i as u64) % 5 < 2) {
            sim.write(&v.name, v.disks[0].key, mib * MIB, &noise(usize::try_from(MIB)?, mib ^ ((i as u64) << 20)))?;
        }
    }
    let repo = dir.join("repo");
    crate::output(Command::new(&proxy).args(["repo", "init", &repo.display().to_string(), "--chunk-size", "1M"]))?;
    let (full, fj) = backup(&proxy, &url, &thumb, &repo, &dir.join("full.json"), &memory)?;
    for (i, v) in all.iter().enumerate() {
        let len = (disk / 100).max(4096);
        sim.write(&v.name, v.disks[0].key, disk / 3, &noise(usize::try_from(len)?, 1000 + i as u64))?;
    }
    let (inc, ij) = backup(&proxy, &url, &thumb, &repo, &dir.join("inc.json"), &memory)?;
    let read = |j: &serde_json::Value| j["bytes_read"].as_u64().unwrap_or(0);
    println!(
        "\n{:<12} {:>9} {:>9} {:>12} {:>14} {:>12}",
        "backup", "wall s", "CPU s", "peak RSS MiB", "bytes read", "disks at once"
    );
    for (name, s, j) in [("full", full, &fj), ("incremental", inc, &ij)] {
        println!(
            "{name:<12} {:>9.2} {:>9.2} {:>12.0} {:>14} {:>12}",
            s.wall,
            s.cpu(),
            s.rss_mib(),
            read(j),
            j["disks_copying_peak"]
        );
    }
    let one = |j: &serde_json::Value| -> (u64, f64) {
        let v = &j["vms"][0];
        (v["disks"][0]["read"].as_u64().unwrap_or(0), v["seconds"].as_f64().unwrap_or(0.0))
    };
    let ((fr, fs), (ir, is)) = (one(&fj), one(&ij));
    println!(
        "one VM ({}): full read {fr} bytes in {fs:.2} s; incremental (1 % changed) read {ir} bytes in {is:.2} s: \
         {:.1} % of the bytes",
        fj["vms"][0]["vm"],
        ir as f64 * 100.0 / fr.max(1) as f64
    );
    let budget = orchestration::config::parse_size(&memory).ok().map(|b| b as f64 / MIB as f64);
    let peak = full.rss_mib().max(inc.rss_mib());
    println!(
        "memory budget of the whole proxy process: {memory} (--memory); peak RSS {peak:.0} MiB: {}",
        if budget.is_some_and(|b| peak <= b) { "within it" } else { "OVER IT" }
    );
    drop(sim);
    drop(rt);
    // The disks and the repository take gigabytes; nothing here is reused by the next run.
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}
