//! pyvmomi, a real and strict third-party vSphere client, against our simulator: login, a
//! container view, paged property reads, snapshot create and remove through tasks,
//! `QueryChangedDiskAreas` paging and a datastore download; and a restore (upload, disk copy,
//! a VM made with controllers, disks and NICs, power, rename, destroy, faults; an NFC import
//! through `ImportVApp` of qemu-img's streamOptimized disks). So our client
//! and our simulator cannot share one misunderstanding of the protocol unseen.

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

/// Runs `tests/<script> HOST PORT USER PASSWORD_FILE [args]` against the simulator (the
/// password file goes into `dir`); the JSON it prints.
async fn run_script(
    pythonpath: &str,
    sim: &Sim,
    dir: &std::path::Path,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> serde_json::Value {
    let pw = dir.join("pw");
    std::fs::write(&pw, "simulated\n").unwrap();
    let port = sim.url().rsplit(':').next().unwrap().trim_end_matches("/sdk").to_owned();
    let out = tokio::process::Command::new("python3")
        .env("PYTHONPATH", pythonpath)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script))
        .args(["127.0.0.1", &port, "backup@vsphere.local"])
        .arg(&pw)
        .args(args)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pyvmomi failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
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
    let v = run_script(&pythonpath, &sim, dir.path(), "pyvmomi_client.py", &[]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pyvmomi_restore_into_the_simulator() {
    let Some(pythonpath) = pythonpath() else { return };
    if !std::process::Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success()) {
        testkit::skip("a_pyvmomi_restore_into_the_simulator", "qemu-img is not installed");
        return;
    }
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut raw = vec![0u8; 3 << 20];
    raw[..512].fill(0x5a);
    std::fs::write(work.path().join("src.raw"), &raw).unwrap();
    let sparse = work.path().join("src.vmdk");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse"])
        .arg(work.path().join("src.raw"))
        .arg(&sparse)
        .status()
        .unwrap();
    assert!(st.success());
    // Two streamOptimized disks (qemu-img's) for the NFC import: the 3 MiB image and a 1 MiB one.
    let mut raw1 = vec![0u8; 1 << 20];
    raw1[(1 << 20) - 4096..].fill(0x77);
    std::fs::write(work.path().join("second.raw"), &raw1).unwrap();
    let streams = [("src.raw", "stream0.vmdk"), ("second.raw", "stream1.vmdk")].map(|(from, to)| {
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"])
            .arg(work.path().join(from))
            .arg(work.path().join(to))
            .status()
            .unwrap();
        assert!(st.success());
        work.path().join(to)
    });
    let mut config = Config::small(1, 1 << 20);
    config.datacenters[0].networks = vec![
        vsphere_sim::NetworkConfig { name: "VM Network".into() },
        vsphere_sim::NetworkConfig { name: "Backup LAN".into() },
    ];
    let sim = Sim::start(config, dir.path(), SimTls::SelfSigned).await.unwrap();
    let args = [sparse.as_os_str(), streams[0].as_os_str(), streams[1].as_os_str()];
    let v = run_script(&pythonpath, &sim, work.path(), "pyvmomi_restore.py", &args).await;
    use serde_json::json;
    assert_eq!(v["networks"], json!(["Backup LAN", "VM Network"]));
    assert_eq!(v["dc_networks"], v["networks"]);
    assert_eq!(v["host_networks"], v["networks"]);
    assert_eq!(v["mkdir_again"], "FileAlreadyExists");
    assert_eq!((v["put_missing_parent"].as_u64(), v["put"].as_u64()), (Some(404), Some(201)));
    assert_eq!(v["copy_again"], "FileAlreadyExists");
    assert_eq!(v["created_type"], "vim.VirtualMachine");
    assert_eq!(v["duplicate"], "DuplicateName");
    assert_eq!(v["bad_device"], "InvalidDeviceSpec");
    assert_eq!(
        (v["name"].as_str(), v["num_cpu"].as_u64(), v["memory_mb"].as_u64()),
        (Some("pyrestored"), Some(2), Some(512))
    );
    assert_eq!((v["firmware"].as_str(), v["guest_id"].as_str()), (Some("bios"), Some("ubuntu64Guest")));
    assert_eq!(
        (v["version"].as_str(), v["vm_path"].as_str()),
        (Some("vmx-19"), Some("[ds1] pyrestored/pyrestored.vmx"))
    );
    assert_eq!(v["uuid_len"], 36);
    assert_eq!(v["extra"], json!({"restored.by": "pyvmomi"}));
    assert_eq!(v["power"], "poweredOff");
    assert_eq!((v["parent_is_vm_folder"].as_bool(), v["pool_matches"].as_bool()), (Some(true), Some(true)));
    assert_eq!(
        v["controllers"],
        json!([["ParaVirtualSCSIController", 1000, 0], ["VirtualLsiLogicSASController", 1001, 1]])
    );
    assert_eq!(
        v["disks"],
        json!([
            [2000, 1000, 0, 1 << 20, "[ds1] pyrestored/pyrestored.vmdk"],
            [2001, 1000, 1, 3 << 20, "[ds1] up/data.vmdk"],
            [2002, 1001, 0, 2 << 20, "[ds1] up/second.vmdk"]
        ])
    );
    let nics = v["nics"].as_array().unwrap();
    assert_eq!(nics.len(), 2);
    assert_eq!(nics[0][0], "VirtualVmxnet3");
    assert!(nics[0][1].as_str().is_some_and(|m| m.starts_with("00:50:56:")), "{v}");
    assert_eq!(
        nics[0].as_array().unwrap()[2..],
        json!(["generated", "VM Network", "VM Network", true]).as_array().unwrap()[..]
    );
    assert_eq!(nics[1], json!(["VirtualE1000", "00:50:56:3f:12:34", "manual", "Backup LAN", "Backup LAN", true]));
    assert_eq!((v["power_on"].as_str(), v["power_off"].as_str()), (Some("poweredOn"), Some("poweredOff")));
    assert_eq!(
        (v["power_on_again"].as_str(), v["destroy_on"].as_str()),
        (Some("InvalidPowerState"), Some("InvalidPowerState"))
    );
    assert_eq!(v["renamed"], "pyrenamed");
    assert_eq!(v["vms_after"], json!(["vm00000"]));
    assert!(!dir.path().join("ds1/pyrestored").exists());
    assert!(!dir.path().join("ds1/up/src.vmdk").exists() && !dir.path().join("ds1/up/data-flat.vmdk").exists());

    // The NFC import: a lease pyvmomi reads, qemu-img's streams uploaded, the bytes in place.
    assert_eq!((v["lease_type"].as_str(), v["lease_state"].as_str()), (Some("vim.HttpNfcLease"), Some("ready")));
    assert_eq!((v["lease_entity"].as_str(), v["lease_timeout"].as_u64()), (Some("pyimported"), Some(300)));
    assert_eq!(
        v["device_urls"],
        json!([
            ["disk:0", "/pyimported/disk:0", "pyimported.vmdk", true, "pyimported.vmdk"],
            ["disk:1", "/pyimported/disk:1", "pyimported_1.vmdk", true, "pyimported_1.vmdk"]
        ])
    );
    assert_eq!(v["device_keys_name_vm"], true);
    assert_eq!((v["upload_garbage"].as_u64(), &v["uploads"]), (Some(400), &json!([200, 200])));
    assert_eq!((v["transfer_progress"].as_u64(), v["lease_done"].as_str()), (Some(100), Some("done")));
    assert_eq!(v["complete_again"], "InvalidState");
    assert_eq!(std::fs::read(sim.disk_path("pyimported", 2000).unwrap()).unwrap(), raw);
    assert_eq!(std::fs::read(sim.disk_path("pyimported", 2001).unwrap()).unwrap(), raw1);
    assert_eq!(
        (v["aborted_state"].as_str(), &v["aborted_error"]),
        (Some("error"), &json!(["SystemError", "test abort"]))
    );
    assert_eq!(v["vms_in_pool"], json!(["pyimported", "vm00000"]));
    assert!(!dir.path().join("ds1/pyaborted").exists());
}
