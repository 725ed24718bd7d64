//! `probe check --restore-to` end to end against the project's simulator: a fitting target
//! passes every check against a repository's restore point; a withheld privilege is named on
//! its entity; a host too old for the VM's hardware and a datastore too small for its disks
//! are refused; a name that does not resolve says what there is. Exit 0 when nothing failed,
//! 1 when a check did.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use pipeline::BlockSink;
use repo::{Consistency, DiskSpec, Repo, SourceInfo};
use vsphere::Thumbprint;
use vsphere_sim::{Config, Sim, SimTls};

const ESTATE: &str = r#"
user = "probe"
password = "pw"
[[deny]]
entity = "locked"
privileges = ["Datastore.AllocateSpace"]
[[deny]]
entity = "Lab"
privileges = ["Network.Assign"]
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx8"
version = "8.0.2"
[[datacenter.host]]
name = "esx67"
version = "6.7.0"
[[datacenter.cluster]]
name = "C1"
hosts = ["esx8", "esx67"]
[[datacenter.datastore]]
name = "ds1"
[[datacenter.datastore]]
name = "locked"
[[datacenter.network]]
name = "VM Network"
[[datacenter.network]]
name = "Lab"
"#;

const CHUNK: u32 = 64 << 10;

/// A restore point of one 4 MiB disk holding two chunks of data, with a `.vmx` of hardware
/// version 19.
async fn point(dir: &Path) -> String {
    let repo = Repo::init(dir, CHUNK).unwrap();
    let spec = DiskSpec { name: "scsi0:0".into(), capacity: 4 << 20, change_id: None, committed: None, label: None };
    let mut b = repo.begin(None, vec![spec]).unwrap();
    b.add_file("vm.vmx", b"displayName = \"vm\"\nvirtualHW.version = \"19\"\n").unwrap();
    let sink = b.sink(0).unwrap();
    sink.write_at(0, Bytes::from(vec![7u8; 2 * CHUNK as usize])).await.unwrap();
    sink.write_zeroes(2 * u64::from(CHUNK), (4 << 20) - 2 * u64::from(CHUNK)).await.unwrap();
    sink.commit().await.unwrap();
    b.finish(SourceInfo { name: "vm".into(), instance_uuid: None }, Consistency::Application).unwrap().id
}

struct Setup {
    _dir: tempfile::TempDir,
    _sim: Sim,
    base: Vec<String>,
    repo: String,
}

async fn setup() -> Setup {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim =
        Sim::start(Config::from_toml(ESTATE).unwrap(), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let repo = dir.path().join("repo");
    point(&repo).await;
    let thumb = Thumbprint::sha256_of(sim.certificate().unwrap()).to_string();
    let base = ["check", "--restore-to", "--url", &sim.url(), "--user", "probe", "--thumbprint", &thumb]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(["--password-file".to_owned(), pw.display().to_string()])
        .collect();
    Setup { base, repo: repo.display().to_string(), _dir: dir, _sim: sim }
}

/// Runs `probe` off the async workers (the simulator lives on them): exit code, stdout, stderr.
async fn probe(s: &Setup, extra: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_probe"));
    c.args(&s.base).args(extra);
    let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The findings of a `--json` run as (code, subject, level, reason).
fn findings(out: &str) -> Vec<(String, String, String, String)> {
    let j: serde_json::Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            if f["level"] != "pass" {
                assert!(!f["fix"].as_str().unwrap().is_empty(), "every problem says its fix: {f}");
            }
            let s = |k: &str| f[k].as_str().unwrap().to_owned();
            (s("code"), s("subject"), s("level"), s("reason"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fitting_target_passes_every_check_against_a_point() {
    let s = setup().await;
    let args = ["--host", "esx8", "--datastore", "ds1", "--network", "VM Network=VM Network", "--repo", &s.repo];
    let (code, out, err) = probe(&s, &[&args[..], &["--point", "latest", "--json"]].concat()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let f = findings(&out);
    assert!(f.iter().all(|x| x.2 == "pass"), "{f:#?}");
    for (code, subject) in [
        ("restore.target", "target"),
        ("restore.target", "datastore ds1"),
        ("restore.target", "network VM Network"),
        ("restore.privileges", "folder vm"),
        ("restore.privileges", "resource pool Resources"),
        ("restore.privileges", "datastore ds1"),
        ("restore.privileges", "network VM Network"),
        ("restore.space", "datastore ds1"),
        ("restore.hardware", "host esx8"),
    ] {
        assert!(f.iter().any(|x| x.0 == code && x.1 == subject), "no {code} for {subject}: {f:#?}");
    }
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["restore"]["hardware_version"], "vmx-19", "{out}");
    assert_eq!(j["restore"]["disks"][0]["data"], 2 * u64::from(CHUNK), "only the chunks of data count: {out}");
    assert_eq!(j["restore"]["space_needed"], 4 * u64::from(CHUNK), "the data kept and its upload: {out}");
    // Thick disks take their capacity.
    let (code, out, err) = probe(&s, &[&args[..], &["--provisioning", "thick", "--json"]].concat()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["restore"]["space_needed"], (4 << 20) + 2 * u64::from(CHUNK), "{out}");
    // The table says the same, in human units.
    let (code, out, err) = probe(&s, &[&args[..], &["--point", "latest"]].concat()).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("restore of point") && out.contains("vmx-19") && out.contains("128.0 KiB of data"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_privileges_are_named_on_their_entity() {
    let s = setup().await;
    let (code, out, err) =
        probe(&s, &["--host", "esx8", "--datastore", "locked", "--network", "Lab", "--size", "1G", "--json"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    let f = findings(&out);
    let fails: Vec<_> = f.iter().filter(|x| x.2 == "fail").collect();
    assert_eq!(fails.len(), 2, "{f:#?}");
    assert!(
        fails.iter().any(|x| x.0 == "restore.privileges"
            && x.1 == "datastore locked"
            && x.3.contains("Datastore.AllocateSpace")
            && !x.3.contains("Datastore.Browse")),
        "{fails:#?}"
    );
    assert!(
        fails.iter().any(|x| x.0 == "restore.privileges" && x.1 == "network Lab" && x.3.contains("Network.Assign")),
        "{fails:#?}"
    );
    assert!(f.iter().any(|x| x.0 == "restore.privileges" && x.1 == "folder vm" && x.2 == "pass"), "{f:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_host_and_a_small_datastore_are_refused() {
    let s = setup().await;
    // The simulator's datastores have 512 GiB free: a 1 TiB disk does not fit.
    let (code, out, err) =
        probe(&s, &["--host", "esx67", "--datastore", "ds1", "--hardware-version", "vmx-19", "--size", "1T", "--json"])
            .await;
    assert_eq!(code, 1, "{out}\n{err}");
    let f = findings(&out);
    let hw = f.iter().find(|x| x.0 == "restore.hardware").unwrap();
    assert_eq!((hw.1.as_str(), hw.2.as_str()), ("host esx67", "fail"), "{hw:?}");
    assert!(hw.3.contains("ESXi 6.7 is too old for hardware version vmx-19: it needs ESXi 7.0 U2"), "{hw:?}");
    let space = f.iter().find(|x| x.0 == "restore.space").unwrap();
    assert_eq!(space.2, "fail", "{space:?}");
    assert!(space.3.contains("512.0 GiB free") && space.3.contains("2.0 TiB"), "{space:?}");
    // Hardware old enough runs on the old host.
    let (code, out, err) = probe(&s, &["--host", "esx67", "--hardware-version", "14", "--datastore", "ds1"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    // In a cluster, vCenter places the VM: the old host is a warning while another can run it.
    let (code, out, err) =
        probe(&s, &["--cluster", "C1", "--datastore", "ds1", "--hardware-version", "19", "--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let f = findings(&out);
    let hw: Vec<(&str, &str)> =
        f.iter().filter(|x| x.0 == "restore.hardware").map(|x| (x.1.as_str(), x.2.as_str())).collect();
    assert_eq!(hw.len(), 2, "{f:#?}");
    assert!(hw.contains(&("host esx67", "warn")) && hw.contains(&("host esx8", "pass")), "{hw:?}");
    // A name that does not resolve fails the target, listing what there is.
    let (code, out, err) = probe(&s, &["--host", "esx9", "--problems"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("FAIL  restore.target") && out.contains("esx67, esx8"), "{out}");
    // Sizes and a repository together are refused by the arguments.
    let (code, _, err) = probe(&s, &["--size", "1G", "--repo", &s.repo]).await;
    assert_eq!(code, 2, "{err}");
}
