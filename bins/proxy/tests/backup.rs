//! `proxy backup` against the project's vSphere simulator, as an operator runs it: a pinned
//! thumbprint, the password from a file or the environment, VMs by name or `--all`, `--plan`
//! touching nothing, exit codes for all, some and none, and Ctrl-C mid-copy leaving no
//! snapshot, no restore point of the interrupted VM, and a repository that verifies;
//! `proxy replicate` keeping replica disks identical to the VM's, full then incremental.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use repo::Repo;
use testkit::noise;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimTls};

const MIB: u64 = 1 << 20;
const MIB_BYTES: usize = 1 << 20;

fn estate() -> Config {
    Config::from_toml(
        r#"
user = "backup@vsphere.local"
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
[[datacenter.vm.disk]]
capacity = 8388608
[[datacenter.vm.disk]]
capacity = 4194304
[[datacenter.vm]]
name = "web"
cbt = true
[[datacenter.vm.disk]]
capacity = 33554432
[[datacenter.vm]]
name = "vault"
encrypted = true
[[datacenter.vm.disk]]
capacity = 1048576
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
        .login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("pw-from-file") })
        .await
        .unwrap();
    std::fs::write(dir.path().join("pw"), "pw-from-file\n").unwrap();
    Env { dir, sim, client: Arc::new(client), thumbprint }
}

impl Env {
    fn proxy(&self, args: &[&str]) -> Command {
        let mut c = self.proxy_env_password(args);
        c.arg("--password-file").arg(self.dir.path().join("pw"));
        c.env_remove("SYNCPROXY_PASSWORD");
        c
    }

    /// Without `--password-file`: the password comes from SYNCPROXY_PASSWORD.
    fn proxy_env_password(&self, args: &[&str]) -> Command {
        self.command("backup", &self.dir.path().join("repo"), args)
    }

    /// `proxy SUB ... DEST ARGS`, the password in the environment.
    fn command(&self, sub: &str, dest: &std::path::Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_proxy"));
        let url = self.sim.url();
        c.args([sub, "--url", &url, "--user", "backup@vsphere.local", "--thumbprint", &self.thumbprint]);
        c.arg(dest).args(args).env("SYNCPROXY_PASSWORD", "pw-from-file");
        c
    }

    fn repo(&self) -> Repo {
        Repo::open(self.dir.path().join("repo")).unwrap()
    }

    async fn snapshots(&self) -> usize {
        self.client.vms().await.unwrap().iter().map(|v| v.all_snapshots().len()).sum()
    }
}

/// Runs a command off the async workers (the simulator lives on them).
async fn output(mut c: Command) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_plans_and_exit_codes() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let vms = env.client.vms().await.unwrap();
    for v in vms.iter().filter(|v| v.name != "vault") {
        for d in &v.disks {
            env.sim.write(&v.name, d.key, MIB, &noise(2 * MIB_BYTES, u64::from(d.key.unsigned_abs()))).unwrap();
        }
    }
    // Two VMs by name: every one succeeds, exit 0.
    let (code, out, err) = output(env.proxy(&["db", "web"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("job ") && out.contains("2 of 2 VMs done"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("db ") && l.contains("ok") && l.contains("application")), "{out}");
    let points = env.repo().points().unwrap();
    assert_eq!(points.len(), 2);
    for p in &points {
        let v = vms.iter().find(|v| v.name == p.source.name).unwrap();
        for (n, d) in v.disks.iter().enumerate() {
            let want = std::fs::read(env.sim.disk_path(&v.name, d.key).unwrap()).unwrap();
            assert!(env.repo().reader(&p.id, n).unwrap().read(0, d.capacity).unwrap() == want, "{} disk {n}", v.name);
        }
    }

    // A disk named by its label (any case) or its slot; a name it lacks lists what it has.
    let db = vms.iter().find(|v| v.name == "db").unwrap();
    let want = std::fs::read(env.sim.disk_path("db", db.disks[1].key).unwrap()).unwrap();
    let repo_dir = env.dir.path().join("repo");
    for which in [db.disks[1].label.to_lowercase(), "1".to_owned(), db.disks[1].bus_slot.clone().unwrap()] {
        let out = env.dir.path().join("disk1.raw");
        let _ = std::fs::remove_file(&out);
        let c = Command::new(env!("CARGO_BIN_EXE_proxy"))
            .args(["repo", "restore", "--no-progress", "--disk", &which])
            .arg(&repo_dir)
            .arg("db@latest")
            .arg(&out)
            .output()
            .unwrap();
        assert!(c.status.success(), "--disk {which}: {}", String::from_utf8_lossy(&c.stderr));
        assert!(std::fs::read(&out).unwrap() == want, "--disk {which} restored the point's second disk");
    }
    let c = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["repo", "restore", "--disk", "Hard disk 9"])
        .arg(&repo_dir)
        .arg("db@latest")
        .arg(env.dir.path().join("none.raw"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(
        !c.status.success() && err.contains("no disk \"Hard disk 9\"") && err.contains(&db.disks[1].label),
        "{err}"
    );

    // A change, then a plan: incremental, and nothing touched.
    env.sim.write("db", vms[0].disks[0].key, 0, &noise(1000, 99)).unwrap();
    let before = env.client.vms().await.unwrap();
    let (code, out, err) = output(env.proxy(&["--plan", "db"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("incremental since"), "{out}");
    assert_eq!(env.client.vms().await.unwrap(), before, "--plan changed nothing");
    assert_eq!(env.repo().points().unwrap().len(), 2);

    // The password from the environment; JSON; an encrypted VM among them: some, exit 3.
    let (code, out, err) = output(env.proxy_env_password(&["--all", "--json"])).await;
    assert_eq!(code, 3, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["outcome"], "some");
    let vault = j["vms"].as_array().unwrap().iter().find(|v| v["vm"] == "vault").unwrap();
    assert!(vault["error"].as_str().unwrap().contains("encrypted"), "{vault}");
    let db = j["vms"].as_array().unwrap().iter().find(|v| v["vm"] == "db").unwrap();
    assert_eq!(db["disks"][0]["plan"], "incremental", "{db}");
    // The changed area as CBT names it (the simulator's 64 KiB), not the chunk around it.
    assert_eq!(db["disks"][0]["read"], 64 << 10, "{db}");
    assert!(!out.contains("pw-from-file") && !err.contains("pw-from-file"), "the password never prints");

    // Only the encrypted VM: none, exit 1.
    let (code, out, err) = output(env.proxy(&["vault"])).await;
    assert_eq!(code, 1, "{out}\n{err}");
    // A wrong password fails with a clear error, and does not print it.
    std::fs::write(env.dir.path().join("pw"), "wrong-one\n").unwrap();
    let (code, out, err) = output(env.proxy(&["db"])).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("cannot log in") && !err.contains("wrong-one"), "{err}");
    assert_eq!(env.snapshots().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_release_cpu_time_pace_a_backup_and_durations_need_units() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let web = env.client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    env.sim.write("web", web.disks[0].key, 0, &noise(16 * MIB_BYTES, 5)).unwrap();
    // A bare number is ambiguous: refused, naming the units, before anything is touched.
    let (code, _, err) = output(env.proxy(&["--release-cpu-time", "5", "web"])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no unit") && err.contains("5ms"), "{err}");
    assert!(env.repo().points().unwrap().is_empty());
    // 16 MiB at 4 MiB/s: every request but the last waits for its share (less the 100 ms
    // burst), so at least 3 s, whatever the machine.
    let t = std::time::Instant::now();
    let (code, out, err) = output(env.proxy(&["--rate", "4M", "--release-cpu-time", "5ms", "--json", "web"])).await;
    let took = t.elapsed();
    assert_eq!(code, 0, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let read = j["vms"][0]["disks"][0]["read"].as_u64().unwrap();
    assert!(read >= 16 << 20, "{j}");
    let floor = Duration::from_secs_f64((read - (4 << 20)) as f64 / f64::from(4 << 20)) - Duration::from_millis(100);
    assert!(took >= floor, "{read} bytes at 4 MiB/s took {took:?}, under {floor:?}");
    assert_eq!(env.snapshots().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_mid_copy_leaves_no_snapshot_and_an_intact_repository() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let web = env.client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    env.sim.write("web", web.disks[0].key, 0, &noise(32 * MIB_BYTES, 4)).unwrap();
    // A first backup to keep safe.
    let (code, out, err) = output(env.proxy(&["web"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    env.sim.write("web", web.disks[0].key, 0, &noise(32 * MIB_BYTES, 5)).unwrap();
    // Slow storage, so the copy is under way when the interrupt comes.
    env.sim.faults(|f| f.datastore_delay = Duration::from_millis(1000));
    let mut c = env.proxy(&["web"]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = child.id().to_string();
    let mut seen = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if env.snapshots().await > 0 {
            seen = true;
            break;
        }
    }
    assert!(seen, "the backup's snapshot appeared");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stdout.contains("web") && stdout.contains("FAILED") && stdout.contains("cancel"), "{stdout}");
    env.sim.faults(|f| f.datastore_delay = Duration::ZERO);
    assert_eq!(env.snapshots().await, 0, "no snapshot left: {stdout}\n{stderr}");
    let repo = env.repo();
    assert_eq!(repo.points().unwrap().len(), 1, "no restore point of the interrupted copy");
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    assert!(repo.live_jobs().unwrap().is_empty(), "the job's lease ended");
    // The next run succeeds.
    let (code, out, err) = output(env.proxy(&["web"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_keeps_replica_disks_identical() {
    let env = start().await;
    let dest = env.dir.path().join("replicas");
    let db = env.client.vms().await.unwrap().into_iter().find(|v| v.name == "db").unwrap();
    for d in &db.disks {
        env.sim.write("db", d.key, 0, &noise(3 * MIB_BYTES, u64::from(d.key.unsigned_abs()))).unwrap();
    }
    let check = |round: &str| {
        let folder = std::fs::read_dir(&dest)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("db_")))
            .expect("the VM's replica folder");
        for (d, file) in db.disks.iter().zip(["scsi0-0.raw", "scsi0-1.raw"]) {
            let want = std::fs::read(env.sim.disk_path("db", d.key).unwrap()).unwrap();
            assert!(std::fs::read(folder.join(file)).unwrap() == want, "{round}: {file} differs");
        }
    };
    let (code, out, err) = output(env.command("replicate", &dest, &["db"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("replica") && out.contains("is consistent") && out.contains("full"), "{out}");
    check("full");
    env.sim.write("db", db.disks[1].key, 2 * MIB, &noise(777, 3)).unwrap();
    let (code, out, err) = output(env.command("replicate", &dest, &["db", "--json"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let disks = &j["vms"][0]["disks"];
    assert_eq!((disks[0]["read"].as_u64(), disks[1]["read"].as_u64()), (Some(0), Some(64 << 10)), "{disks}");
    check("incremental");
    assert_eq!(env.snapshots().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_through_vddk_with_the_fake_library() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let vms = env.client.vms().await.unwrap();
    // The fake VDDK reads `[ds] path` as a raw file under FAKE_VDDK_DATASTORES: point each
    // disk's name, as the snapshot lists it, at the simulator's data for that disk. The
    // encrypted VM, refused over HTTPS, is read through VDDK too.
    let root = env.dir.path().join("fake-datastores");
    for v in vms.iter().filter(|v| v.name == "db" || v.name == "vault") {
        for (i, d) in v.disks.iter().enumerate() {
            env.sim.write(&v.name, d.key, 0, &noise(MIB_BYTES, 50 + i as u64)).unwrap();
            let rel = d.base_file_name.replacen("[ds1] ", "", 1);
            let link = root.join("ds1").join(rel);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(env.sim.disk_path(&v.name, d.key).unwrap(), &link).unwrap();
        }
    }
    let libdir = vddk_fake::libdir(vddk_fake::Fake::V8);
    let mut c = env.proxy(&["db", "vault", "--json", "--vddk-libdir", libdir.to_str().unwrap()]);
    c.env("FAKE_VDDK_DATASTORES", &root);
    let (code, out, err) = output(c).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("VDDK "), "the library loaded is named: {err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let disks = j["vms"][0]["disks"].as_array().unwrap();
    assert!(disks.iter().all(|d| d["transport"].as_str().unwrap().starts_with("vddk:")), "{disks:?}");
    for (k, name) in ["db", "vault"].into_iter().enumerate() {
        let v = vms.iter().find(|v| v.name == name).unwrap();
        assert_eq!(j["vms"][k]["vm"].as_str(), Some(name), "{j}");
        let point = j["vms"][k]["restore_point"].as_str().unwrap().to_owned();
        for (n, d) in v.disks.iter().enumerate() {
            let want = std::fs::read(env.sim.disk_path(name, d.key).unwrap()).unwrap();
            assert!(env.repo().reader(&point, n).unwrap().read(0, d.capacity).unwrap() == want, "{name} disk {n}");
        }
    }
    assert!(!err.contains("pw-from-file"), "the password never reaches VDDK's logs or ours");
    assert_eq!(env.snapshots().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_from_nbd_exports_of_the_frozen_disks() {
    let Some(qemu_nbd) = testkit::require_tool("qemu-nbd", "backup_from_nbd_exports_of_the_frozen_disks") else {
        return;
    };
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let db = env.client.vms().await.unwrap().into_iter().find(|v| v.name == "db").unwrap();
    // One qemu-nbd per disk, read-only over the disk's data, on a socket the template names.
    let mut servers = Vec::new();
    for (i, d) in db.disks.iter().enumerate() {
        env.sim.write("db", d.key, 0, &noise(3 * MIB_BYTES, 70 + i as u64)).unwrap();
        let slot = d.bus_slot.clone().unwrap().replace(':', "-");
        let sock = env.dir.path().join(format!("{}-{slot}.sock", db.moref.value));
        let image = env.sim.disk_path("db", d.key).unwrap();
        servers.push(testkit::servers::Server::qemu_nbd(
            &qemu_nbd,
            &image,
            testkit::servers::Listen::Unix(sock),
            &["-r", "-f", "raw"],
        ));
    }
    let template = format!("nbd+unix:///?socket={}/{{moref}}-{{disk}}.sock", env.dir.path().display());
    let (code, out, err) = output(env.proxy(&["db", "--json", "--nbd-url", &template])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let disks = j["vms"][0]["disks"].as_array().unwrap();
    assert!(disks.iter().all(|d| d["transport"].as_str().unwrap().starts_with("nbd:")), "{disks:?}");
    let point = j["vms"][0]["restore_point"].as_str().unwrap().to_owned();
    for (n, d) in db.disks.iter().enumerate() {
        let want = std::fs::read(env.sim.disk_path("db", d.key).unwrap()).unwrap();
        assert!(env.repo().reader(&point, n).unwrap().read(0, d.capacity).unwrap() == want, "disk {n}");
    }
    // An export that is not there: the VM fails, naming it, and its snapshot is removed.
    let bad = format!("nbd+unix:///?socket={}/nowhere-{{disk}}.sock", env.dir.path().display());
    let (code, out, err) = output(env.proxy(&["db", "--nbd-url", &bad])).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("NBD export") && out.contains("nowhere-scsi0-0.sock"), "{out}");
    drop(servers);
    assert_eq!(env.snapshots().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_reset_resets_marks_and_refuses_under_foreign_snapshots() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let repo = env.dir.path().join("repo");
    let web = env.client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    let (code, out, err) = output(env.proxy(&["web"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let c = env.command("cbt-reset", std::path::Path::new("web"), &["--repository", repo.to_str().unwrap(), "--json"]);
    let (code, out, err) = output(c).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &j["vms"][0]["report"];
    assert_eq!(r["form"], "running", "{j}");
    let (before, after) = (r["disks"][0][1].as_str().unwrap(), r["disks"][0][2].as_str().unwrap());
    assert_ne!(before.split('/').next(), after.split('/').next(), "a new epoch: {j}");
    assert!(repo.join("resets").read_dir().unwrap().count() == 1, "the repository is marked");
    // The next backup is full and clears the mark.
    let (code, out, err) = output(env.proxy(&["web", "--json"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["vms"][0]["disks"][0]["full"], true, "{j}");
    assert_eq!(repo.join("resets").read_dir().unwrap().count(), 0, "the mark is cleared");
    // Under someone else's snapshot: not reset, exit 1, said why.
    env.client.create_snapshot(&web.moref, "before-upgrade", "", false, None).await.unwrap();
    let c = env.command("cbt-reset", std::path::Path::new("web"), &[]);
    let (code, out, _) = output(c).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NOT RESET") && out.contains("before-upgrade"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_hooks_from_the_command_line() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let log = env.dir.path().join("hooks.log");
    let record = format!("echo \"$SYNCPROXY_HOOK $SYNCPROXY_VM\" >> {}", log.display());
    let (code, out, err) =
        output(env.proxy(&["web", "--pre-freeze", &record, "--post-thaw", &record, "--hook-timeout", "30s"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "pre-freeze web\npost-thaw web\n");
    let (code, out, err) = output(env.proxy(&["web", "--pre-freeze", "echo not now >&2; exit 3"])).await;
    assert_eq!(code, 1, "none succeeded: {out}\n{err}");
    assert!(out.contains("pre-freeze hook failed") && out.contains("not now"), "{out}\n{err}");
    assert_eq!(env.snapshots().await, 0);
    // A guest hook needs the guest account.
    let (code, _, err) = output(env.proxy(&["web", "--pre-freeze-guest", "/bin/true"])).await;
    assert_eq!(code, 2, "clap refuses it: {err}");
    assert!(err.contains("--guest-credentials"), "{err}");
}

/// Starts `c`, kills it with SIGKILL after `after`, and waits for it.
async fn kill_after(mut c: Command, after: Duration) {
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    tokio::time::sleep(after).await;
    let _ = child.kill();
    tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
}

/// Trust: `proxy backup` and `proxy replicate` killed with SIGKILL at random moments (before,
/// during and after `CreateSnapshot`, mid-copy, while committing), each followed by a normal
/// run: that run succeeds (no VM refused), no snapshot is left on any VM, and every restore
/// point and replica holds exactly the disks' data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_and_replications_killed_at_random_moments_leave_nothing_behind() {
    let env = start().await;
    Repo::init(env.dir.path().join("repo"), 1 << 20).unwrap();
    let replicas = env.dir.path().join("replicas");
    let vms: Vec<_> = env.client.vms().await.unwrap().into_iter().filter(|v| v.name != "vault").collect();
    let mut rng = testkit::KillRng::new();
    let n = testkit::kills(20);
    // Slow storage widens the window while a snapshot is held, where most kills should land.
    env.sim.faults(|f| f.datastore_delay = Duration::from_millis(20));
    for (what, dest) in [("backup", env.dir.path().join("repo")), ("replicate", replicas.clone())] {
        // How long one run takes here, so the kills land anywhere in one.
        let started = std::time::Instant::now();
        let (code, out, err) = output(env.command(what, &dest, &["db", "web"])).await;
        assert_eq!(code, 0, "{out}\n{err}");
        let span = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX / 2) + 100;
        let mut left_by_kill = 0;
        for round in 0..n {
            for v in &vms {
                let d = &v.disks[usize::try_from(rng.below(v.disks.len() as u64)).unwrap_or(0)];
                let at = rng.below(d.capacity / MIB) * MIB;
                env.sim.write(&v.name, d.key, at, &noise(64 << 10, round * 7 + 1)).unwrap();
            }
            let after = Duration::from_millis(rng.below(span));
            kill_after(env.command(what, &dest, &["db", "web"]), after).await;
            left_by_kill += u64::from(env.snapshots().await > 0);
            let (code, out, err) = output(env.command(what, &dest, &["db", "web"])).await;
            assert_eq!(code, 0, "{what} round {round} (killed after {after:?}): the next run refused\n{out}\n{err}");
            assert_eq!(env.snapshots().await, 0, "{what} round {round}: a snapshot was left\n{out}\n{err}");
            for v in &vms {
                for (i, d) in v.disks.iter().enumerate() {
                    let want = std::fs::read(env.sim.disk_path(&v.name, d.key).unwrap()).unwrap();
                    let got = if what == "backup" {
                        let repo = env.repo();
                        let p = repo.points().unwrap().into_iter().rev().find(|p| p.source.name == v.name).unwrap();
                        repo.reader(&p.id, i).unwrap().read(0, d.capacity).unwrap()
                    } else {
                        let folder = std::fs::read_dir(&replicas)
                            .unwrap()
                            .filter_map(Result::ok)
                            .map(|e| e.path())
                            .find(|p| {
                                p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&format!("{}_", v.name)))
                            })
                            .unwrap();
                        let slot = d.bus_slot.as_deref().unwrap().replace(':', "-");
                        std::fs::read(folder.join(format!("{slot}.raw"))).unwrap()
                    };
                    assert!(got == want, "{what} round {round}: {} disk {i} differs (killed after {after:?})", v.name);
                }
            }
        }
        eprintln!(
            "{what}: {n} runs killed at random moments within {span} ms ({left_by_kill} left a snapshot), each \
             followed by a clean run"
        );
        // Each kill test must catch some runs holding a snapshot to test anything.
        assert!(n < 5 || left_by_kill > 0, "{what}: no kill landed while a snapshot was held");
    }
    assert!(env.repo().verify().unwrap().damaged_points.is_empty());
}

/// `proxy backup ... ARGS` against nothing that answers (port 9 on this machine); the exit
/// code and standard error.
fn backup_offline(d: &std::path::Path, url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["backup", "--url", url, "--user", "u", "--insecure", "--timeout", "5s"])
        .args(args)
        .arg(d.join("repo"))
        .arg("vm1")
        .env_remove("SYNCPROXY_PASSWORD")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn server_arguments_bound_secret_files_and_refuse_credentials_in_urls() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    Repo::init(d.join("repo"), 1 << 20).unwrap();
    let pw = d.join("pw");
    std::fs::write(&pw, "secret-pw\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pw_arg = pw.to_str().unwrap();
    // Credentials in the URL: refused, and never repeated.
    let (code, err) = backup_offline(d, "https://admin:s3cret@127.0.0.1:9/sdk", &["--password-file", pw_arg]);
    assert_ne!(code, 0);
    assert!(err.contains("must not carry credentials") && !err.contains("s3cret"), "{err}");
    // A password file far larger than a password: a clear error naming it, read with a bound.
    let big = d.join("big");
    std::fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, err) = backup_offline(d, "https://127.0.0.1:9/sdk", &["--password-file", big.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("larger than 64 KiB") && err.contains(big.to_str().unwrap()), "{err}");
    // A password file others may read: a warning naming it.
    let (_, err) = backup_offline(d, "https://127.0.0.1:9/sdk", &["--password-file", pw_arg]);
    assert!(!err.contains("chmod 600"), "no warning for a private file: {err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, err) = backup_offline(d, "https://127.0.0.1:9/sdk", &["--password-file", pw_arg]);
    assert!(err.contains("WARNING") && err.contains("chmod 600") && err.contains(pw_arg), "{err}");
    assert!(!err.contains("secret-pw"), "{err}");
    // --concurrency that would panic the job (or mean nothing): a usage error.
    for n in ["0", "9223372036854775807"] {
        let (code, err) =
            backup_offline(d, "https://127.0.0.1:9/sdk", &["--password-file", pw_arg, "--concurrency", n]);
        assert_eq!(code, 2, "--concurrency {n}: {err}");
        assert!(err.contains("use 1 to 10000"), "{err}");
    }
}
