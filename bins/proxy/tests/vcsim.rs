//! `proxy backup` against govmomi's vcsim, a vSphere server nobody here wrote: a VM whose disk
//! file holds written data is backed up through HTTPS datastore reads (a full copy: vcsim has
//! no CBT, which the backup notes), with the server trusted through its CA, and the restore
//! matches the bytes written; a folder's inventory path selects every VM under it. That restore
//! point is then restored into vcsim as a new VM through the datastore upload path: vcsim
//! converts no hosted sparse disk, so the restore falls back to flat extents and says so, and
//! the new VM's disk on vcsim's datastore holds the bytes backed up. Through an NFC import the
//! lease runs, but vcsim keeps none of the uploaded bytes: the read-back catches it, and the
//! failed restore leaves nothing.

use std::process::Command;

use repo::Repo;
use testkit::pki::TestPki;
use testkit::vcsim::{Vcsim, find};

/// Where vcsim keeps `LocalDS_0` (its `info.url`), asked of vcsim itself: several vcsims may
/// run at once.
fn datastore_root(url: &str, ca: &std::path::Path) -> std::path::PathBuf {
    use vsphere::{Client, ConnectOptions, Credentials, Secret, Trust};
    vsphere::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let opts =
            ConnectOptions { trust: Trust::Verified { extra_ca: Some(ca.to_path_buf()) }, ..ConnectOptions::new(url) };
        let c = Client::connect(&opts).await.unwrap();
        c.login(Credentials { user: "backup".into(), password: Secret::new("pw") }).await.unwrap();
        let ds = c.inventory("Datastore", &["name", "info.url"]).await.unwrap();
        let local = ds.iter().find(|d| d.text("name") == Some("LocalDS_0")).expect("LocalDS_0");
        std::path::PathBuf::from(local.text("info.url").unwrap())
    })
}

#[test]
fn a_vcsim_vm_is_backed_up_over_https_datastore_reads() {
    let Some(bin) = find("a_vcsim_vm_is_backed_up_over_https_datastore_reads") else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (cert, key) = (pki.cert.display().to_string(), pki.key.display().to_string());
    let sim = Vcsim::start(&bin, &["-tlscert", &cert, "-tlskey", &key, "-username", "backup", "-password", "pw"]);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let repo_dir = dir.path().join("repo");
    Repo::init(&repo_dir, 1 << 20).unwrap();

    // vcsim keeps each VM's disk as empty files under its datastore folder, which it names in
    // the datastore's moref: write data, and the descriptor ESXi would have, there.
    let ds_root = datastore_root(&sim.url, &pki.ca);
    let data: Vec<u8> = testkit::noise(1 << 20, 13);
    std::fs::write(ds_root.join("DC0_H0_VM0/disk1-flat.vmdk"), &data).unwrap();
    std::fs::write(
        ds_root.join("DC0_H0_VM0/disk1.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n\
         RW 2048 VMFS \"disk1-flat.vmdk\"\n\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["backup", "--url", &sim.url, "--user", "backup", "--ca-file"])
        .arg(&pki.ca)
        .arg("--password-file")
        .arg(&pw)
        .arg(&repo_dir)
        .args(["DC0_H0_VM0", "--json"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let vm = &j["vms"][0];
    assert_eq!(vm["result"], "warning", "{vm}");
    assert_eq!(vm["consistency"], "crash", "Tools do not run in vcsim: {vm}");
    assert_eq!(vm["disks"][0]["full"], true, "{vm}");
    assert_eq!(vm["disks"][0]["read"], 1 << 20, "{vm}");
    let notes = vm["warnings"].to_string();
    assert!(notes.contains("QueryChangedDiskAreas"), "no CBT in vcsim, said so: {notes}");
    assert_eq!(vm["snapshot_removed"], true);

    let repo = Repo::open(&repo_dir).unwrap();
    let point = vm["restore_point"].as_str().unwrap();
    assert!(repo.reader(point, 0).unwrap().read(0, 1 << 20).unwrap() == data, "the restore matches");
    let m = repo.point(point).unwrap();
    assert_eq!(m.source.name, "DC0_H0_VM0");
    assert!(m.files.iter().any(|f| f.name == "DC0_H0_VM0.vmx"), "{:?}", m.files);

    // A folder names every VM under it: the plan covers all four of vcsim's.
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["backup", "--url", &sim.url, "--user", "backup", "--ca-file"])
        .arg(&pki.ca)
        .arg("--password-file")
        .arg(&pw)
        .arg(&repo_dir)
        .args(["DC0/vm", "--plan", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let plans: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut names: Vec<&str> = plans.as_array().unwrap().iter().filter_map(|p| p["vm"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1"]);
    let vm0 = plans.as_array().unwrap().iter().find(|p| p["vm"] == "DC0_H0_VM0").unwrap();
    assert_eq!(vm0["parent"].as_str(), Some(point), "the next backup of it would start from this one");

    // Back into vcsim as a new VM, through datastore uploads.
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["restore", "--url", &sim.url, "--user", "backup", "--ca-file"])
        .arg(&pki.ca)
        .arg("--password-file")
        .arg(&pw)
        .arg(&repo_dir)
        .args([point, "--name", "restored0", "--datastore", "LocalDS_0", "--host", "DC0_H0", "--verify"])
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("data path: datastore upload"), "{stdout}");
    assert!(stdout.contains("restored VM restored0"), "{stdout}");
    assert!(stdout.contains("as a flat extent"), "the fallback is said: {stdout}");
    let restored = std::fs::read(ds_root.join("restored0/restored0-flat.vmdk")).unwrap();
    assert!(restored == data, "the restored disk on vcsim's datastore holds the bytes backed up");
    let leftovers: Vec<String> = std::fs::read_dir(ds_root.join("restored0"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("upload"))
        .collect();
    assert!(leftovers.is_empty(), "the upload is removed: {leftovers:?}");

    // Through an NFC import: vcsim runs the lease but keeps no byte of what is PUT to it (it
    // only hashes the body), so the read-back finds the disk empty and the restore fails with
    // nothing left behind, as it must when a server loses the data.
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["restore", "--url", &sim.url, "--user", "backup", "--ca-file"])
        .arg(&pki.ca)
        .arg("--password-file")
        .arg(&pw)
        .arg(&repo_dir)
        .args([point, "--name", "nfc0", "--datastore", "LocalDS_0", "--host", "DC0_H0", "--upload", "nfc"])
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("importing the VM (ImportVApp)") && stderr.contains("upload"), "{stderr}");
    assert!(stderr.contains("cannot read back [LocalDS_0] nfc0/nfc0.vmdk"), "the read-back caught it: {stderr}");
    assert!(stderr.contains("removed VM syncproxy-restoring-"), "{stderr}");
    assert!(!ds_root.join("nfc0").exists(), "nothing of the failed import is left on the datastore");
    drop(sim);
}
