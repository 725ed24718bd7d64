//! `proxy restore` against the project's vSphere simulator: a three-disk VM backed up,
//! changed, and restored as a new VM (disks byte-identical to the restore point, hardware as
//! its `.vmx` says, NICs disconnected, a new identity); nothing existing overwritten; and
//! restores killed at random moments leaving, once the next restore has swept, each VM
//! complete or absent with no folder of theirs left on the datastore.

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
            let got = self.ds_dir().join(name).join(file);
            let (a, b) = (std::fs::read(&want).unwrap(), std::fs::read(&got).unwrap());
            assert_eq!(a.len() as u64, d.capacity, "{}", d.name);
            assert!(a == b, "disk {} of {name} differs from point {point}", d.name);
        }
    }
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

    let out = env.restore("db@latest", "db-restored", &["--datastore", "ds1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("data path: datastore upload"), "{stdout}");
    assert!(stdout.contains("disconnected"), "{stdout}");
    env.assert_disks_equal("db-restored", &point);

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
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let name = format!("k{round}");
        let repo = env.repo_path();
        let mut child = env
            .proxy(&["restore", repo.to_str().unwrap(), &point, "--name", &name, "--datastore", "ds1"])
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
            f.starts_with("syncproxy") || (!names.contains(f) && !["db", "timed", "after"].contains(&f.as_str()))
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
