//! `probe inventory` end to end against govmomi's vcsim: the table, `--json`, a pinned
//! thumbprint, and clear refusals (wrong pin, wrong password) that never show the password.

use std::process::Command;

use testkit::pki::TestPki;
use testkit::vcsim::{Vcsim, find};

const PASSWORD: &str = "pa55-w0rd!";

fn probe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_probe"))
}

fn sha1_of(der: &[u8]) -> String {
    use sha1::Digest as _;
    sha1::Sha1::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

#[test]
fn lists_vcsim_vms_as_a_table_and_as_json() {
    let Some(bin) = find("lists_vcsim_vms_as_a_table_and_as_json") else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (c, k) = (pki.cert.display().to_string(), pki.key.display().to_string());
    let sim = Vcsim::start(&bin, &["-tlscert", &c, "-tlskey", &k, "-username", "probe", "-password", PASSWORD]);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let thumb = sha1_of(&pki.cert_der);
    let base = |extra: &[&str]| {
        let mut cmd = probe();
        cmd.args(["inventory", "--url", &sim.url, "--user", "probe", "--password-file"]).arg(&pw).args(extra);
        cmd
    };

    let out = testkit::run(&mut base(&["--thumbprint", &thumb]));
    assert!(out.contains("4 VMs") && out.contains("DC0_H0_VM0") && out.contains("[LocalDS_0]"), "{out}");
    assert!(out.contains(&thumb), "the table shows the thumbprint it trusted:\n{out}");

    let json = testkit::run(&mut base(&["--ca-file", &pki.ca.display().to_string(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["server"]["api_type"], "VirtualCenter");
    assert_eq!(v["server"]["thumbprint_sha1"], thumb.as_str());
    assert_eq!(v["clusters"][0]["name"], "DC0_C0");
    assert_eq!(v["hosts"].as_array().unwrap().len(), 4);
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4);
    for vm in vms {
        assert_eq!(vm["disks"].as_array().unwrap().len(), 1, "{vm}");
        assert_eq!(vm["disks"][0]["backing"], "flat");
        assert!(vm["instance_uuid"].is_string());
    }

    // A wrong pin: refused, naming what the server presented.
    let wrong = "00:".repeat(19) + "00";
    let o = base(&["--thumbprint", &wrong]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&thumb), "{err}");

    // A wrong password: InvalidLogin, and no password anywhere in what is printed.
    std::fs::write(&pw, "not-it\n").unwrap();
    let o = base(&["--thumbprint", &thumb]).output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() && all.contains("InvalidLogin"), "{all}");
    assert!(!all.contains("not-it") && !all.contains(PASSWORD), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_the_project_simulator_too() {
    use vsphere_sim::{Config, Sim, SimTls};
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::small(3, 1 << 20);
    config.datacenters[0].vms[1].disks[0].backing = "rdm-physical".into();
    let sim = Sim::start(config, dir.path(), SimTls::SelfSigned).await.unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "simulated\n").unwrap();
    let thumb = sha1_of(sim.certificate().unwrap());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_probe"))
        .args([
            "inventory",
            "--url",
            &sim.url(),
            "--user",
            "backup@vsphere.local",
            "--thumbprint",
            &thumb,
            "--json",
            "--password-file",
        ])
        .arg(&pw)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["server"]["api_version"], "8.0.2.0");
    assert_eq!(v["hosts"][0]["thumbprint_sha1"], thumb.as_str(), "the host's certificate is the simulator's");
    assert_eq!(v["datastores"][0]["type"], "VMFS");
    let vms = v["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    assert_eq!(vms[0]["cbt_enabled"], true);
    assert_eq!(vms[1]["disks"][0]["backing"], "rdm-phys");
    assert!(vms[0]["disks"][0]["change_id"].as_str().is_some_and(|c| c.ends_with("/0")));
}
