//! `cargo xtask bench restore`: `proxy restore` of one VM's restore point back into the
//! project's vSphere simulator (run inside xtask) by every data path, each timed with its CPU
//! and peak RSS: a new VM through a sparse upload converted on the datastore, a flat upload,
//! an NFC import; into the original VM through the fake VDDK, every byte and then Quick
//! Rollback after scattered writes, with the bytes each wrote. The figures are the proxy's own:
//! no peer restores into this simulator, so the line to compare with is the bytes of data.

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

fn estate(disk: u64) -> Result<Config> {
    Ok(Config::from_toml(&format!(
        r#"
user = "backup@vsphere.local"
password = "simulated"
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.vm]]
name = "db"
cbt = true
[[datacenter.vm.disk]]
capacity = {disk}
"#
    ))?)
}

/// One `proxy restore` with `args`, its JSON written to `out`.
fn restore(proxy: &str, common: &str, args: &str, env: &str, out: &Path) -> Result<(Sample, serde_json::Value)> {
    let script =
        format!("{env} SYNCPROXY_PASSWORD=simulated {proxy} restore {common} {args} --json > {}", out.display());
    let s = measure(&script, None)?;
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let j: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("proxy restore {args} printed no JSON: {text}"))?;
    Ok((s, j))
}

fn written(j: &serde_json::Value) -> u64 {
    j["disks"]
        .as_array()
        .map(|d| d.iter().map(|d| d["written"].as_u64().unwrap_or(0) + d["zeroed"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

fn row(what: &str, s: &Sample, bytes: u64) {
    println!(
        "{what:<44} {:>7.2} s {:>7.2} CPU-s {:>7.0} MiB RSS {:>9.1} MiB moved {:>7.0} MB/s",
        s.wall,
        s.cpu(),
        s.rss_mib(),
        bytes as f64 / MIB as f64,
        bytes as f64 / 1e6 / s.wall.max(1e-3)
    );
}

pub(crate) fn run(root: &Path) -> Result<()> {
    let mib: u64 = std::env::var("BENCH_RESTORE_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy"])?;
    let target = crate::target_dir(root);
    let proxy = target.join("release/proxy").display().to_string();
    let dir = target.join("bench-restore");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    vsphere::tls::install_crypto_provider();
    let disk = mib * MIB;
    let sim = rt.block_on(Sim::start(estate(disk)?, &dir.join("sim"), SimTls::SelfSigned))?;
    let thumb = Thumbprint::sha256_of(sim.certificate().context("the simulator's certificate")?).to_string();
    let url = sim.url();
    let client = rt.block_on(async {
        let opts =
            ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(60), ..ConnectOptions::new(&url) };
        let c = Client::connect(&opts).await?;
        c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") }).await?;
        anyhow::Ok(Arc::new(c))
    })?;
    let vm = rt.block_on(client.vms())?.into_iter().find(|v| v.name == "db").context("the VM")?;
    let key = vm.disks[0].key;
    // Data in half of the disk's MiBs, the rest holes.
    let mut data = 0;
    for m in (0..mib).filter(|m| m % 2 == 0) {
        sim.write("db", key, m * MIB, &noise(usize::try_from(MIB)?, m))?;
        data += MIB;
    }
    let repo = dir.join("repo");
    crate::output(Command::new(&proxy).args(["repo", "init", &repo.display().to_string()]))?;
    let backup = format!(
        "SYNCPROXY_PASSWORD=simulated {proxy} backup --url {url} --user backup@vsphere.local --thumbprint {thumb} {} db",
        repo.display()
    );
    measure(&backup, None)?;
    let common = format!(
        "--url {url} --user backup@vsphere.local --thumbprint {thumb} --state-dir {} {} db@latest",
        dir.join("state").display(),
        repo.display()
    );
    println!("a VM with one {mib} MiB disk, {} MiB of it data, restored into the simulator", data / MIB);
    for (name, how) in [("sparse", "sparse"), ("flat", "flat"), ("nfc", "nfc")] {
        let out = dir.join(format!("{name}.json"));
        match restore(&proxy, &common, &format!("--name r-{name} --upload {how}"), "", &out) {
            Ok((s, j)) => {
                let sent: u64 =
                    j["disks"].as_array().map_or(0, |d| d.iter().filter_map(|d| d["uploaded"].as_u64()).sum());
                row(&format!("new VM, {how} upload (bytes sent)"), &s, sent);
            }
            Err(e) => {
                let text = format!("{e:#}");
                let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no reason");
                println!("new VM, {how} upload: failed: {last}");
            }
        }
    }

    // Into the original VM through the fake VDDK, which finds `[ds1] path` under a folder.
    let fake_root = dir.join("fake-datastores");
    let link = fake_root.join("ds1").join(vm.disks[0].base_file_name.strip_prefix("[ds1] ").unwrap_or("db/db.vmdk"));
    std::fs::create_dir_all(link.parent().context("a folder")?)?;
    std::os::unix::fs::symlink(sim.disk_path("db", key)?, &link)?;
    let libdir = vddk_fake::libdir(vddk_fake::Fake::V8);
    let env = format!("FAKE_VDDK_DATASTORES={}", fake_root.display());
    let vddk = format!("--in-place --power-off --vddk-libdir {}", libdir.display());
    let (full, fj) = restore(&proxy, &common, &format!("{vddk} --full"), &env, &dir.join("full.json"))?;
    row("in place, every byte (fake VDDK)", &full, written(&fj));
    // 1,000 scattered 4 KiB writes since the point, then Quick Rollback.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sim.write("db", key, (x % (disk / 4096)) * 4096, &[0x5a; 4096])?;
    }
    let (quick, qj) = restore(&proxy, &common, &vddk, &env, &dir.join("quick.json"))?;
    if qj["disks"][0]["method"] != "quick-rollback" {
        bail!("Quick Rollback was not used: {qj}");
    }
    row("in place, Quick Rollback (fake VDDK)", &quick, written(&qj));
    println!(
        "Quick Rollback after 1,000 scattered 4 KiB writes: CBT named {:.1} MiB, {:.1} MiB written against {:.1} MiB \
         for every byte ({:.1}x less), {:.2}x the time",
        qj["disks"][0]["changed"].as_u64().unwrap_or(0) as f64 / MIB as f64,
        written(&qj) as f64 / MIB as f64,
        written(&fj) as f64 / MIB as f64,
        written(&fj) as f64 / written(&qj).max(1) as f64,
        quick.wall / full.wall.max(1e-3)
    );
    drop(sim);
    Ok(())
}
