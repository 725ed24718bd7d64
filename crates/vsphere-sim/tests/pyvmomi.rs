//! pyvmomi, a real and strict third-party vSphere client, against our simulator: login, a
//! container view, paged property reads, snapshot create and remove through tasks,
//! `QueryChangedDiskAreas` paging and a datastore download. So our client and our simulator
//! cannot share one misunderstanding of the protocol unseen.

use std::process::Command;

use vsphere_sim::{Config, Sim, SimTls};

/// Where pyvmomi is: `$SYNCPROXY_PYTHONPATH`, else the cache folder `cargo xtask setup` installs it
/// into (`$XDG_CACHE_HOME/syncproxy-py` or `~/.cache/syncproxy-py`), else wherever python3 finds it.
fn pythonpath() -> Option<String> {
    let cache = std::env::var("XDG_CACHE_HOME")
        .ok()
        .or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.cache")))
        .map(|c| format!("{c}/syncproxy-py"));
    let path = std::env::var("SYNCPROXY_PYTHONPATH").ok().or(cache).unwrap_or_default();
    let ok = Command::new("python3")
        .env("PYTHONPATH", &path)
        .args(["-c", "import pyVmomi"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        testkit::skip(
            "pyvmomi_against_the_simulator",
            "pyvmomi is not installed (`cargo xtask setup` installs it; or SYNCPROXY_PYTHONPATH=DIR)",
        );
    }
    ok.then_some(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyvmomi_against_the_simulator() {
    let Some(pythonpath) = pythonpath() else { return };
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::small(3, 3 << 20);
    config.qcda_window = 1 << 20;
    config.datacenters[0].vms[0].name = "db".into();
    let sim = Sim::start(config, dir.path(), SimTls::SelfSigned).await.unwrap();
    sim.write("db", 2000, 0, b"written by guest").unwrap();
    sim.write("db", 2000, (2 << 20) + 4096, &[7u8; 512]).unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "simulated\n").unwrap();
    let port = sim.url().rsplit(':').next().unwrap().trim_end_matches("/sdk").to_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pyvmomi_client.py");
    let out = tokio::process::Command::new("python3")
        .env("PYTHONPATH", pythonpath)
        .arg(script)
        .args(["127.0.0.1", &port, "backup@vsphere.local"])
        .arg(&pw)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pyvmomi failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["api_type"], "VirtualCenter");
    assert_eq!(v["vms"], serde_json::json!(["db", "vm00001", "vm00002"]));
    assert_eq!(v["paged_names"], v["vms"]);
    assert_eq!(v["pages"], 3, "maxObjects=1 over three VMs");
    assert_eq!(v["disk_key"], 2000);
    assert_eq!(v["disk_capacity"], 3 << 20);
    assert_eq!(v["disk_backing"], "vim.vm.device.VirtualDisk.FlatVer2BackingInfo");
    assert!(v["change_id_before"].as_str().is_some_and(|c| c.ends_with("/0")), "{v}");
    assert_eq!(v["snapshot_names"], serde_json::json!(["pyvmomi"]));
    assert_eq!(v["windows"], 3, "1 MiB windows over 3 MiB");
    // "*" answers in the file system's blocks (4 KiB), like ESXi in its own.
    assert_eq!(v["allocated"], serde_json::json!([[0, 4096], [(2 << 20) + 4096, 4096]]));
    assert_eq!((v["download_status"].as_u64(), v["download"].as_str()), (Some(206), Some("written by guest")));
    assert_eq!(v["snapshots_after"], 0);
}
