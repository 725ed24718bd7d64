//! `proxy restore` against the project's vSphere simulator: a three-disk VM backed up,
//! changed, and restored as a new VM (disks byte-identical to the restore point, hardware as
//! its `.vmx` says, NICs disconnected, a new identity); nothing existing overwritten; and
//! restores killed at random moments (datastore uploads and NFC imports) leaving, once the next
//! restore has swept, each VM complete or absent with no folder of theirs left on the datastore. Into the original VM:
//! Quick Rollback through the fake VDDK writing only what CBT says changed since the point
//! (and a full write for comparison), whole disks swapped in without VDDK (also killed at
//! random moments: the VM keeps all its old disks or gets all the point's), and one disk of
//! the point attached to another VM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo::Repo;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimTls};

const MIB: u64 = 1 << 20;

fn estate() -> Config {
    Config::from_toml(
        r#"
user = "restore@vsphere.local"
password = "pw-from-file"
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.datastore]]
name = "ds2"
[[datacenter.vm]]
name = "db"
cbt = true
controller = "lsisas1068"
vmx_extra = """
guestOS = "debian12-64"
numvcpus = "2"
memsize = "1536"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:50:56:01:02:03"
"""
[[datacenter.vm.disk]]
capacity = 16777216
[[datacenter.vm.disk]]
capacity = 8388608
[[datacenter.vm.disk]]
capacity = 4194304
[[datacenter.vm]]
name = "app"
cbt = true
[[datacenter.vm.disk]]
capacity = 4194304
"#,
    )
    .unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    sim: Sim,
    client: Arc<Client>,
    thumbprint: String,
}

async fn start() -> Env {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(estate(), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let thumbprint = Thumbprint::sha256_of(sim.certificate().unwrap()).to_string();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let client = Client::connect(&opts).await.unwrap();
    client
        .login(Credentials { user: "restore@vsphere.local".into(), password: Secret::new("pw-from-file") })
        .await
        .unwrap();
    std::fs::write(dir.path().join("pw"), "pw-from-file\n").unwrap();
    Env { dir, sim, client: Arc::new(client), thumbprint }
}

/// A pattern that differs per disk and per MiB, with holes between.
fn fill(sim: &Sim, vm: &str, key: i32, capacity: u64, salt: u8) {
    for mib in (0..capacity / MIB).step_by(2) {
        let byte = salt.wrapping_mul(31).wrapping_add(mib.to_le_bytes()[0]) | 1;
        sim.write(vm, key, mib * MIB + 4096, &vec![byte; 200_000]).unwrap();
    }
}

impl Env {
    fn proxy(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_proxy"));
        c.args(args)
            .arg("--url")
            .arg(self.sim.url())
            .arg("--user")
            .arg("restore@vsphere.local")
            .arg("--thumbprint")
            .arg(&self.thumbprint)
            .arg("--password-file")
            .arg(self.dir.path().join("pw"))
            .env_remove("SYNCPROXY_PASSWORD")
            .env("XDG_STATE_HOME", self.dir.path().join("state"));
        c
    }

    fn repo_path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn ds_dir(&self) -> PathBuf {
        self.dir.path().join("sim").join("ds1")
    }

    fn backup(&self) -> String {
        let repo = self.repo_path();
        if !repo.exists() {
            let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["repo", "init"]).arg(&repo).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let out = self.proxy(&["backup", repo.to_str().unwrap(), "db"]).output().unwrap();
        assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
        let r = Repo::open(&repo).unwrap();
        r.points().unwrap().last().unwrap().id.clone()
    }

    fn restore(&self, point: &str, name: &str, extra: &[&str]) -> std::process::Output {
        let repo = self.repo_path();
        let mut args = vec!["restore", repo.to_str().unwrap(), point, "--name", name];
        args.extend_from_slice(extra);
        self.proxy(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap()
    }

    /// The restored disks of VM `name` are the point's, byte for byte.
    fn assert_disks_equal(&self, name: &str, point: &str) {
        let repo = Repo::open(self.repo_path()).unwrap();
        let m = repo.point(point).unwrap();
        for (n, d) in m.disks.iter().enumerate() {
            let want = self.dir.path().join(format!("want-{n}.raw"));
            repo.restore_disk(point, n, &want).unwrap();
            let file = if n == 0 { format!("{name}-flat.vmdk") } else { format!("{name}_{n}-flat.vmdk") };
            // On ds1, or on ds2 where --disk-datastore put it.
            let mut got = self.ds_dir().join(name).join(&file);
            if !got.exists() {
                got = self.ds_dir().with_file_name("ds2").join(name).join(&file);
            }
            let (a, b) = (std::fs::read(&want).unwrap(), std::fs::read(&got).unwrap());
            assert_eq!(a.len() as u64, d.capacity, "{}", d.name);
            assert!(a == b, "disk {} of {name} differs from point {point}", d.name);
        }
    }
}

impl Env {
    /// `proxy restore REPO POINT` with `extra`, its output and JSON (when it printed some).
    fn run(&self, point: &str, extra: &[&str], vddk: Option<&Path>) -> (i32, serde_json::Value, String) {
        let repo = self.repo_path();
        let mut args = vec!["restore", repo.to_str().unwrap(), point];
        args.extend_from_slice(extra);
        let mut c = self.proxy(&args);
        if let Some(root) = vddk {
            let libdir = vddk_fake::libdir(vddk_fake::Fake::V8);
            c.arg("--vddk-libdir").arg(libdir).env("FAKE_VDDK_DATASTORES", root);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap_or(-1), json, format!("{stdout}\n{stderr}"))
    }

    /// VM `vm` as the server has it now.
    async fn vm(&self, vm: &str) -> vsphere::Vm {
        self.client.vms().await.unwrap().into_iter().find(|v| v.name == vm).unwrap()
    }

    /// VM `vm`'s disk files, in slot order.
    async fn disk_files(&self, vm: &str) -> Vec<String> {
        self.vm(vm).await.disks.into_iter().map(|d| d.base_file_name).collect()
    }

    /// VM `vm`'s disks as the fake VDDK finds them: `[ds1] path` under the folder returned, a
    /// link to the simulator's data for each.
    async fn expose(&self, vm: &str) -> PathBuf {
        let root = self.dir.path().join("fake-datastores");
        let v = self.vm(vm).await;
        for d in &v.disks {
            let link = root.join("ds1").join(d.base_file_name.strip_prefix("[ds1] ").unwrap());
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(self.sim.disk_path(vm, d.key).unwrap(), &link).unwrap();
        }
        root
    }

    /// VM `vm`'s disks (in slot order) hold point `point`'s disks `slots`, byte for byte.
    async fn assert_vm_holds(&self, vm: &str, point: &str, slots: &[usize]) {
        let repo = Repo::open(self.repo_path()).unwrap();
        let m = repo.point(point).unwrap();
        let v = self.vm(vm).await;
        for &n in slots {
            let d = v.disks.iter().find(|d| d.bus_slot.as_deref() == Some(m.disks[n].name.as_str())).unwrap();
            let got = std::fs::read(self.sim.disk_path(vm, d.key).unwrap()).unwrap();
            let want = repo.reader(point, n).unwrap().read(0, m.disks[n].capacity).unwrap();
            assert!(got == want, "disk {} of {vm} differs from point {point}", m.disks[n].name);
        }
    }
}

/// The next number of a xorshift sequence.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Scattered writes after the point: `count` pieces of 4 KiB on disk `key`.
fn scatter(sim: &Sim, vm: &str, key: i32, capacity: u64, count: u64, salt: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ salt;
    for _ in 0..count {
        next(&mut x);
        let at = (x % (capacity / 4096)) * 4096;
        sim.write(vm, key, at, &[u8::try_from(x % 251).unwrap() | 1; 4096]).unwrap();
    }
    count * 4096
}

fn folders(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_vm_is_restored_as_a_new_vm_identical_to_its_point() {
    let env = start().await;
    for (key, cap, salt) in [(2000, 16 * MIB, 1u8), (2001, 8 * MIB, 2), (2002, 4 * MIB, 3)] {
        fill(&env.sim, "db", key, cap, salt);
    }
    let point = env.backup();
    // Changed after the point: the restore must not see this.
    env.sim.write("db", 2000, 0, &[0xee; 65536]).unwrap();
    env.sim.write("db", 2002, 3 * MIB, &[0xdd; 4096]).unwrap();

    let out = env.restore("db@latest", "db-restored", &["--datastore", "ds1", "--disk-datastore", "scsi0:2=ds2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("data path: datastore upload"), "{stdout}");
    assert!(stdout.contains("disconnected"), "{stdout}");
    env.assert_disks_equal("db-restored", &point);
    let on_ds2 = env.ds_dir().with_file_name("ds2").join("db-restored/db-restored_2-flat.vmdk");
    assert!(on_ds2.exists(), "--disk-datastore put scsi0:2 on ds2");

    // Its hardware is the .vmx's, with a new identity and the NIC disconnected.
    let vm = env.client.find_by_inventory_path("DC1/vm/db-restored").await.unwrap().expect("the restored VM");
    let hw = env.client.hardware(&vm).await.unwrap();
    assert_eq!((hw.num_cpus, hw.memory_mb), (2, 1536));
    assert_eq!(hw.guest_id.as_deref(), Some("debian12_64Guest"));
    assert_eq!(hw.disks.len(), 3);
    let units: Vec<i32> = hw.disks.iter().map(|d| d.unit).collect();
    assert_eq!(units, vec![0, 1, 2]);
    assert!(
        matches!(
            hw.controllers.iter().find(|c| c.bus == 0 && c.key >= 1000 && c.key < 1100).map(|c| &c.kind),
            Some(vsphere::provision::ControllerKind::LsiLogicSas)
        ),
        "{:?}",
        hw.controllers
    );
    assert_eq!(hw.nics.len(), 1);
    assert!(!hw.nics[0].connected);
    assert_ne!(hw.nics[0].mac.as_deref(), Some("00:50:56:01:02:03"), "a copy gets a new MAC");
    let original = env.client.find_by_inventory_path("DC1/vm/db").await.unwrap().unwrap();
    let original = env.client.hardware(&original).await.unwrap();
    assert_ne!(hw.instance_uuid, original.instance_uuid);

    // Nothing existing is overwritten: the same name again is refused, and changes nothing.
    let before = std::fs::read(env.ds_dir().join("db-restored/db-restored-flat.vmdk")).unwrap();
    let again = env.restore(&point, "db-restored", &["--datastore", "ds1"]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("exists already"), "{err}");
    assert!(before == std::fs::read(env.ds_dir().join("db-restored/db-restored-flat.vmdk")).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_restored_through_an_nfc_import() {
    let env = start().await;
    for (key, cap, salt) in [(2000, 16 * MIB, 21u8), (2001, 8 * MIB, 22), (2002, 4 * MIB, 23)] {
        fill(&env.sim, "db", key, cap, salt);
    }
    let point = env.backup();
    let args = ["--name", "db-nfc", "--datastore", "ds1", "--disk-datastore", "scsi0:1=ds2", "--upload", "nfc"];
    let (code, j, out) = env.run(&point, &[&args[..], &["--verify", "--json"]].concat(), None);
    assert_eq!(code, 0, "{out}");
    assert!(j["path"].as_str().unwrap().starts_with("NFC import"), "{j}");
    env.assert_disks_equal("db-nfc", &point);
    assert!(env.ds_dir().with_file_name("ds2").join("db-nfc/db-nfc_1-flat.vmdk").exists(), "scsi0:1 on ds2");
    assert_eq!(env.vm("db-nfc").await.disks.len(), 3);
    // Only the data went over the wire (streamOptimized, compressed): far less than the disks.
    let sent: u64 = j["disks"].as_array().unwrap().iter().map(|d| d["uploaded"].as_u64().unwrap()).sum();
    assert!(sent < 4 * MIB, "{sent} bytes sent for 28 MiB of disks holding 2.8 MB of data");
    assert_eq!(j["verified"].as_u64(), Some(28 * MIB), "{j}");
    // An NFC import makes new VMs only.
    let (code, _, text) = env.run(&point, &["--in-place", "--power-off", "--upload", "nfc"], None);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("new VMs only"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_killed_at_random_moments_leave_a_complete_vm_or_nothing() {
    let env = start().await;
    for (key, cap, salt) in [(2000, 16 * MIB, 4u8), (2001, 8 * MIB, 5), (2002, 4 * MIB, 6)] {
        fill(&env.sim, "db", key, cap, salt);
    }
    let point = env.backup();
    // How long a whole restore takes here, to kill within it.
    let t = Instant::now();
    let out = env.restore(&point, "timed", &["--datastore", "ds1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    let rounds: u64 = std::env::var("SYNCPROXY_RESTORE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8).max(1);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ whole;
    let mut names = Vec::new();
    for round in 0..rounds {
        next(&mut seed);
        let name = format!("k{round}");
        let repo = env.repo_path();
        // Every other one through an NFC import.
        let upload = if round % 2 == 0 { "sparse" } else { "nfc" };
        let mut child = env
            .proxy(&[
                "restore",
                repo.to_str().unwrap(),
                &point,
                "--name",
                &name,
                "--datastore",
                "ds1",
                "--upload",
                upload,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(seed % (whole + 200)));
        let _ = child.kill();
        let _ = child.wait();
        names.push(name);
    }
    // The next restore sweeps what the killed ones left.
    let out = env.restore(&point, "after", &["--datastore", "ds1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut complete = 0;
    for name in &names {
        let vm = env.client.find_by_inventory_path(&format!("DC1/vm/{name}")).await.unwrap();
        let folder = env.ds_dir().join(name);
        match vm {
            Some(_) => {
                env.assert_disks_equal(name, &point);
                complete += 1;
            }
            None => assert!(!folder.exists(), "{name}: no VM, yet its folder {} is left", folder.display()),
        }
    }
    let leftovers: Vec<String> = folders(&env.ds_dir())
        .into_iter()
        .filter(|f| {
            f.starts_with("syncproxy") || (!names.contains(f) && !["db", "app", "timed", "after"].contains(&f.as_str()))
        })
        .collect();
    assert!(leftovers.is_empty(), "folders left: {leftovers:?}");
    let vms: Vec<String> = env.client.vms().await.unwrap().into_iter().map(|v| v.name).collect();
    assert!(!vms.iter().any(|n| n.starts_with(orchestration::restore_job::TEMP_PREFIX)), "{vms:?}");
    eprintln!("{rounds} killed restores: {complete} finished before the kill, the rest left nothing");
    let records = env.dir.path().join("state/syncproxy/restores");
    let left: Vec<_> = std::fs::read_dir(&records).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "restore records left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_rollback_writes_back_only_what_changed_since_the_point() {
    let env = start().await;
    for (key, cap, salt) in [(2000, 16 * MIB, 7u8), (2001, 8 * MIB, 8), (2002, 4 * MIB, 9)] {
        fill(&env.sim, "db", key, cap, salt);
    }
    let point = env.backup();
    // After the point: scattered writes on two disks, none on the third.
    let changed = scatter(&env.sim, "db", 2000, 16 * MIB, 40, 1) + scatter(&env.sim, "db", 2001, 8 * MIB, 5, 2);
    let root = env.expose("db").await;

    // A running VM is refused, and nothing is written.
    let (code, _, out) = env.run(&point, &["--in-place", "--json"], Some(&root));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not powered off") && out.contains("--power-off"), "{out}");

    let (code, j, out) = env.run(&point, &["--in-place", "--power-off", "--json"], Some(&root));
    assert_eq!(code, 0, "{out}");
    assert!(j["path"].as_str().unwrap().starts_with("VDDK writes"), "{j}");
    let disks = j["disks"].as_array().unwrap();
    assert!(disks.iter().all(|d| d["method"] == "quick-rollback"), "{j}");
    let written: u64 = disks.iter().map(|d| d["written"].as_u64().unwrap() + d["zeroed"].as_u64().unwrap()).sum();
    let named: u64 = disks.iter().map(|d| d["changed"].as_u64().unwrap()).sum();
    assert!(named >= changed && named <= changed + 45 * 64 * 1024, "CBT named {named} for {changed} written");
    assert!(written <= 45 * 64 * 1024, "Quick Rollback wrote {written} bytes for 45 changed blocks");
    assert_eq!(disks[2]["written"].as_u64(), Some(0), "the unchanged disk is not written: {j}");
    env.assert_vm_holds("db", &point, &[0, 1, 2]).await;

    // The same restore with every byte written, for the comparison.
    scatter(&env.sim, "db", 2000, 16 * MIB, 40, 3);
    let (code, j, out) = env.run(&point, &["--in-place", "--full", "--json"], Some(&root));
    assert_eq!(code, 0, "{out}");
    let full: u64 = j["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["written"].as_u64().unwrap() + d["zeroed"].as_u64().unwrap())
        .sum();
    assert_eq!(full, 28 * MIB, "a full write covers every disk whole: {j}");
    assert!(j["disks"][0]["full_reason"].as_str().unwrap().contains("--full"), "{j}");
    env.assert_vm_holds("db", &point, &[0, 1, 2]).await;
    eprintln!("Quick Rollback wrote {written} bytes ({named} named changed by CBT); a full write {full}");

    // The next backup reads the disks whole, with the reason said.
    let repo = env.repo_path();
    let out = env.proxy(&["backup", repo.to_str().unwrap(), "db", "--json"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("restored in place"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_vddk_whole_disks_are_swapped_in_and_the_old_ones_removed() {
    let env = start().await;
    for (key, cap, salt) in [(2000, 16 * MIB, 10u8), (2001, 8 * MIB, 11), (2002, 4 * MIB, 12)] {
        fill(&env.sim, "db", key, cap, salt);
    }
    let point = env.backup();
    scatter(&env.sim, "db", 2001, 8 * MIB, 10, 4);
    let before = env.disk_files("db").await;
    let (code, j, out) = env.run(&point, &["--in-place", "--power-off", "--disk", "scsi0:1", "--json"], None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(j["disks"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["disks"][0]["method"], "swapped-in", "{j}");
    env.assert_vm_holds("db", &point, &[1]).await;
    let after = env.disk_files("db").await;
    assert_eq!(
        (after[0].as_str(), after[2].as_str()),
        (before[0].as_str(), before[2].as_str()),
        "only scsi0:1 changes"
    );
    assert_ne!(after[1], before[1]);
    let old = env.ds_dir().join(before[1].strip_prefix("[ds1] ").unwrap());
    assert!(!old.exists(), "the replaced disk {} is removed", old.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_killed_at_random_moments_leave_the_old_disks_or_the_points() {
    let env = start().await;
    for (key, cap, salt) in [(2000, 16 * MIB, 13u8), (2001, 8 * MIB, 14), (2002, 4 * MIB, 15)] {
        fill(&env.sim, "db", key, cap, salt);
    }
    let point = env.backup();
    let repo = env.repo_path();
    let t = Instant::now();
    let (code, _, out) = env.run(&point, &["--in-place", "--power-off"], None);
    assert_eq!(code, 0, "{out}");
    let whole = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    let rounds: u64 = std::env::var("SYNCPROXY_RESTORE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8).max(1);
    let mut seed = 0x1234_5678_9abc_def1_u64 ^ whole;
    let mut kept = 0;
    for round in 0..rounds {
        // Each round starts from a state that differs from the point (the keys change with
        // each swap).
        let first = env.vm("db").await.disks[0].key;
        scatter(&env.sim, "db", first, 16 * MIB, 4, round);
        let old: Vec<Vec<u8>> = {
            let v = env.vm("db").await;
            v.disks.iter().map(|d| std::fs::read(env.sim.disk_path("db", d.key).unwrap()).unwrap()).collect()
        };
        next(&mut seed);
        let mut child = env
            .proxy(&["restore", repo.to_str().unwrap(), &point, "--in-place", "--power-off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(seed % (whole + 200)));
        let _ = child.kill();
        let _ = child.wait();
        // The next run's sweep: every restore sweeps first; this one then stops, refused (the
        // point has no such disk), so what is checked is the sweep's work alone.
        let (code, _, out) = env.run(&point, &["--disk", "scsi9:9", "--attach-to", "app"], None);
        assert!(code == 1 && out.contains("no disk \"scsi9:9\""), "round {round}: {out}");
        let v = env.vm("db").await;
        let now: Vec<Vec<u8>> =
            v.disks.iter().map(|d| std::fs::read(env.sim.disk_path("db", d.key).unwrap()).unwrap()).collect();
        if now == old {
            kept += 1;
        } else {
            env.assert_vm_holds("db", &point, &[0, 1, 2]).await;
        }
        // No file of ours is left beside the VM: its folder holds its disks and its own files.
        let disks: Vec<String> =
            v.disks.iter().map(|d| d.base_file_name.strip_prefix("[ds1] db/").unwrap().to_owned()).collect();
        // The simulator receives an upload into a hidden file it drops once it sees the killed
        // client's connection close, which may be a moment after the kill.
        let hidden = || {
            std::fs::read_dir(env.ds_dir().join("db"))
                .unwrap()
                .flatten()
                .any(|f| f.file_name().to_string_lossy().starts_with('.'))
        };
        let until = Instant::now() + Duration::from_secs(10);
        while hidden() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!hidden(), "round {round}: the simulator kept a partial upload");
        for f in std::fs::read_dir(env.ds_dir().join("db")).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.contains("-restored-") || name.contains("-upload-") {
                let stem = name.replace("-flat.vmdk", ".vmdk").replace("-ctk.vmdk", ".vmdk");
                assert!(disks.contains(&stem), "round {round}: {name} is left beside the VM ({disks:?})");
            }
        }
        let _ = env.client.power_on(&v.moref).await;
    }
    eprintln!("{rounds} killed swaps: {kept} left the old disks, {} the point's", rounds - kept);
    let records = env.dir.path().join("state/syncproxy/restores");
    let left: Vec<_> = std::fs::read_dir(&records).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "restore records left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_disk_of_a_point_is_attached_to_another_vm() {
    let env = start().await;
    fill(&env.sim, "db", 2001, 8 * MIB, 16);
    let point = env.backup();
    let (code, j, out) = env.run(&point, &["--disk", "scsi0:1", "--attach-to", "app", "--json"], None);
    assert_eq!(code, 0, "{out}");
    assert_eq!(j["disks"][0]["method"], "attached", "{j}");
    let app = env.vm("app").await;
    assert_eq!(app.disks.len(), 2, "{:?}", app.disks);
    let repo = Repo::open(env.repo_path()).unwrap();
    let want = repo.reader(&point, 1).unwrap().read(0, 8 * MIB).unwrap();
    let got = std::fs::read(env.sim.disk_path("app", app.disks[1].key).unwrap()).unwrap();
    assert!(got == want, "the attached disk is the point's scsi0:1");
    // The original VM is untouched.
    let db = env.vm("db").await;
    assert_eq!(db.power_state, Some(vsphere::PowerState::PoweredOn));
    // A disk the point does not have is refused by name.
    let (code, _, out) = env.run(&point, &["--disk", "scsi3:9", "--attach-to", "app"], None);
    assert_eq!(code, 1);
    assert!(out.contains("no disk \"scsi3:9\"") && out.contains("scsi0:0"), "{out}");
}
