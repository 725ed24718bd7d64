//! `probe check` end to end: against the project's simulator, an estate built to break each
//! check fails or warns exactly where it should and passes on a healthy VM, with a stable code
//! per finding and an exit code that says whether anything failed; against govmomi's vcsim it
//! runs and reports on every VM.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use testkit::pki::TestPki;
use testkit::vcsim::{Vcsim, find};
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimTls};

const ESTATE: &str = r#"
user = "probe"
password = "pw"
# An older server that does not know Cryptographer.Access: asking about it would fail the
# whole privilege check, so it is filtered out.
unknown_privileges = ["Cryptographer.Access"]
[[deny]]
entity = "noperm"
privileges = ["VirtualMachine.State.CreateSnapshot", "VirtualMachine.GuestOperations.Execute"]
[[deny]]
entity = "locked"
privileges = ["Datastore.Browse"]
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "127.0.0.1"
version = "8.0.2"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.datastore]]
name = "locked"
[[datacenter.host]]
name = "127.0.0.2"
[[datacenter.cluster]]
name = "C1"
hosts = ["127.0.0.2"]
[[datacenter.vm]]
name = "roamer"
host = "127.0.0.2"
cbt = true
[[datacenter.vm.disk]]
capacity = 1048576
[[datacenter.vm]]
name = "noperm"
cbt = true
[[datacenter.vm.disk]]
capacity = 1048576
datastore = "locked"
[[datacenter.vm]]
name = "healthy"
cbt = true
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "passthrough"
cbt = true
pci = 1
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "usb"
cbt = true
usb = 1
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "vault"
cbt = true
encrypted = true
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "old"
hardware = "vmx-04"
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "notools"
cbt = true
tools = "guestToolsNotRunning"
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "indep"
cbt = true
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm.disk]]
capacity = 1048576
mode = "independent_persistent"
[[datacenter.vm]]
name = "rdm"
cbt = true
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm.disk]]
capacity = 1048576
backing = "rdm-physical"
[[datacenter.vm]]
name = "shared"
cbt = true
[[datacenter.vm.disk]]
capacity = 1073741824
sharing = "sharingMultiWriter"
[[datacenter.vm]]
name = "snapped"
cbt = true
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "ancient"
guest = "win95Guest"
cbt = true
[[datacenter.vm.disk]]
capacity = 1048576
[[datacenter.vm]]
name = "oddguest"
guest = "madeUpGuest"
cbt = true
[[datacenter.vm.disk]]
capacity = 1048576
[[datacenter.vm]]
name = "deep"
cbt = true
[[datacenter.vm.disk]]
capacity = 1048576
[[datacenter.vm]]
name = "leftover"
cbt = true
[[datacenter.vm.disk]]
capacity = 1073741824
[[datacenter.vm]]
name = "small"
cbt = true
[[datacenter.vm.disk]]
capacity = 104857600
"#;

/// Runs a command off the async workers (the simulator lives on them).
async fn run(mut c: Command) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_check_fails_or_warns_where_it_should_and_passes_a_healthy_vm() {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim =
        Sim::start(Config::from_toml(ESTATE).unwrap(), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let client = Client::connect(&opts).await.unwrap();
    client.login(Credentials { user: "probe".into(), password: Secret::new("pw") }).await.unwrap();
    let vms = client.vms().await.unwrap();
    let by_name = |n: &str| vms.iter().find(|v| v.name == n).unwrap().moref.clone();
    // Another product's snapshot, 30 hours old; and one a dead job of ours left.
    let veeam = "VEEAM BACKUP TEMPORARY SNAPSHOT";
    let why = "Please do not delete this snapshot. It is being used by Veeam Backup.";
    client.create_snapshot(&by_name("snapped"), veeam, why, false, None).await.unwrap();
    sim.age_snapshot("snapped", veeam, Duration::from_secs(30 * 3600)).unwrap();
    for i in 0..30 {
        client.create_snapshot(&by_name("deep"), &format!("level{i}"), "", false, None).await.unwrap();
    }
    client.create_snapshot(&by_name("leftover"), "syncproxy-p-deadjob", "", false, None).await.unwrap();
    // The host's ports answer (listeners stand in for ESXi's 443 and 902).
    let https = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nfc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let thumb = Thumbprint::sha256_of(sim.certificate().unwrap()).to_string();
    let probe = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_probe"));
        c.args(["check", "--url", &sim.url(), "--user", "probe", "--thumbprint", &thumb, "--password-file"]);
        c.arg(&pw).args(extra);
        c
    };
    let (hp, np) = (https.local_addr().unwrap().port().to_string(), nfc.local_addr().unwrap().port().to_string());
    let target = dir.path().to_str().unwrap().to_owned();
    let (code, out, err) = run(probe(&["--json", "--https-port", &hp, "--nfc-port", &np, "--target", &target])).await;
    assert_eq!(code, 1, "something failed: {out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut got: HashMap<(String, String), Vec<String>> = HashMap::new();
    for f in j["findings"].as_array().unwrap() {
        let key = (f["subject"].as_str().unwrap().to_owned(), f["code"].as_str().unwrap().to_owned());
        got.entry(key).or_default().push(f["level"].as_str().unwrap().to_owned());
        if f["level"] != "pass" {
            assert!(!f["fix"].as_str().unwrap().is_empty(), "every problem says its fix: {f}");
        }
    }
    let level = |subject: &str, code: &str| -> String {
        let l = got.get(&(subject.to_owned(), code.to_owned())).unwrap_or_else(|| panic!("no {code} for {subject}"));
        if l.iter().any(|x| x == "fail") {
            "fail".into()
        } else if l.iter().any(|x| x == "warn") {
            "warn".into()
        } else {
            "pass".into()
        }
    };
    // The healthy VM passes everything.
    for ((subject, code), levels) in &got {
        if subject == "healthy" {
            assert!(levels.iter().all(|l| l == "pass"), "healthy: {code} {levels:?}");
        }
    }
    for (subject, code, want) in [
        ("server", "server.version", "pass"),
        ("host 127.0.0.1", "host.version", "pass"),
        ("host 127.0.0.1", "host.port.https", "pass"),
        ("host 127.0.0.1", "host.port.nfc", "pass"),
        ("passthrough", "vm.pci_passthrough", "fail"),
        ("usb", "vm.usb", "warn"),
        ("vault", "vm.encryption", "fail"),
        ("vault", "disk.transport", "fail"),
        ("old", "vm.hardware", "warn"),
        ("old", "vm.cbt_active", "warn"),
        ("notools", "vm.tools", "warn"),
        ("indep", "disk.mode", "warn"),
        ("rdm", "disk.rdm", "fail"),
        ("shared", "disk.sharing", "fail"),
        ("snapped", "vm.snapshots", "warn"),
        ("snapped", "vm.foreign_backup", "warn"),
        ("healthy", "vm.privileges", "pass"),
        ("vault", "vm.privileges", "pass"),
        ("noperm", "vm.privileges", "fail"),
        ("noperm", "vm.privileges_guest", "warn"),
        ("datastore locked", "datastore.privileges", "fail"),
        ("datastore ds1", "datastore.privileges", "pass"),
        ("server", "server.privileges", "pass"),
        ("roamer", "vm.drs", "warn"),
        ("cluster C1", "cluster.privileges", "pass"),
        ("ancient", "vm.guest_os", "fail"),
        ("oddguest", "vm.guest_os", "warn"),
        ("healthy", "vm.guest_os", "pass"),
        ("deep", "vm.snapshots", "fail"),
        ("snapped", "vm.snapshot_old", "warn"),
        ("leftover", "vm.snapshots", "pass"),
        ("leftover", "vm.snapshot_stale", "warn"),
        ("small", "vm.guest_space", "warn"),
    ] {
        assert_eq!(level(subject, code), want, "{subject} {code}");
    }
    // The proxy host is checked too; its levels depend on the machine, so only their presence
    // and the free space of a real folder are asserted here (the rules are unit-tested).
    for code in ["proxy.os", "proxy.cores", "proxy.memory", "proxy.free_space", "proxy.throttle"] {
        assert!(got.contains_key(&("proxy".to_owned(), code.to_owned())), "no {code}: {out}");
    }
    assert_ne!(level("proxy", "proxy.free_space"), "fail", "{out}");
    let summary = &j["summary"];
    assert!(summary["fail"].as_u64().unwrap() >= 6 && summary["pass"].as_u64().unwrap() > 20, "{summary}");

    // Only the healthy VM: nothing fails, exit 0; the table names each check.
    let (code, out, err) = run(probe(&["--vm", "healthy", "--https-port", &hp, "--nfc-port", &np])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("vm.cbt_active") && out.contains("0 failed"), "{out}");
    // Closed ports on a vCenter without VDDK: a warning, not a failure.
    drop((https, nfc));
    let (code, out, err) = run(probe(&["--vm", "healthy", "--problems", "--https-port", &hp, "--nfc-port", &np])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("WARN  host.port.nfc") && !out.contains("pass "), "{out}");
    // A VDDK folder that does not load is said so, and HTTPS still reaches the disks.
    let none = dir.path().join("no-vddk");
    std::fs::create_dir_all(&none).unwrap();
    let (code, out, err) =
        run(probe(&["--vm", "healthy", "--json", "--vddk-libdir", none.to_str().unwrap(), "--port-timeout", "1s"]))
            .await;
    assert!(code == 1 || code == 0, "{out}\n{err}");
    assert!(out.contains("VDDK:") && out.contains("reachable by HTTPS"), "{out}");
}

#[test]
fn runs_and_reports_on_vcsim_vms() {
    let Some(bin) = find("runs_and_reports_on_vcsim_vms") else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (c, k) = (pki.cert.display().to_string(), pki.key.display().to_string());
    let sim = Vcsim::start(&bin, &["-tlscert", &c, "-tlskey", &k, "-username", "probe", "-password", "pw"]);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_probe"))
        .args(["check", "--url", &sim.url, "--user", "probe", "--ca-file"])
        .arg(&pki.ca)
        .arg("--password-file")
        .arg(&pw)
        .args(["--json", "--port-timeout", "1s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let findings = j["findings"].as_array().unwrap();
    let subjects: std::collections::HashSet<&str> = findings.iter().filter_map(|f| f["subject"].as_str()).collect();
    for vm in ["DC0_H0_VM0", "DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"] {
        assert!(subjects.contains(vm), "{vm} is reported: {subjects:?}");
    }
    let server = findings.iter().find(|f| f["code"] == "server.version").unwrap();
    assert_eq!(server["level"], "pass", "vcsim speaks the vCenter 6.5 API: {server}");
    // vcsim's hosts have names nothing resolves: their ports are reported, not skipped.
    assert!(findings.iter().any(|f| f["code"] == "host.port.nfc"), "{stdout}");
    // vcsim lists no privileges: they are asked one per call, and its administrator holds them.
    let privileges = findings.iter().find(|f| f["code"] == "vm.privileges" && f["subject"] == "DC0_H0_VM0");
    assert_eq!(privileges.map(|p| p["level"].clone()), Some(serde_json::json!("pass")), "{stdout}");
    drop(sim);
}
