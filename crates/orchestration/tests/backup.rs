//! The per-VM backup flow end to end against the project's vSphere simulator: full then
//! incremental backups of multi-disk VMs over HTTPS datastore reads, restores byte for byte
//! against the simulator's disks, the configuration file captured, a CBT reset forcing full
//! copies, a failing snapshot task, a session expiring mid-job, and never a snapshot left;
//! stale snapshots of dead jobs removed while a live job's stay; plans that touch nothing; a
//! job of 100 VMs at once.

#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::sync::Arc;
use std::time::Duration;

use orchestration::{
    JobContext, JobContextBuilder, Outcome, ReplicaTarget, Selector, Target, backup_vm, plan_vm, run_job, select_vms,
};
use pipeline::{CopyOptions, Engine};
use repo::Repo;
use testkit::noise;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Trust};
use vsphere_sim::{Config, Sim, SimFault, SimTls};

const MIB: u64 = 1 << 20;
/// The unit the simulator's CBT names changes in: what an incremental reads for a small write.
const CBT_UNIT: u64 = 64 << 10;

/// One datacenter `DC1` with host `esx1`, the account `backup@vsphere.local`, and `rest`
/// (datastores and VMs) as TOML.
fn estate_with(rest: &str) -> Config {
    let head = "user = \"backup@vsphere.local\"\npassword = \"s3cret\"\n[[datacenter]]\nname = \"DC1\"\n\
                [[datacenter.host]]\nname = \"esx1\"\n";
    Config::from_toml(&format!("{head}{rest}")).unwrap()
}

fn estate() -> Config {
    Config::from_toml(
        r#"
user = "backup@vsphere.local"
password = "s3cret"
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
version = "8.0.2"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.vm]]
name = "db"
cbt = false
[[datacenter.vm.disk]]
capacity = 16777216
[[datacenter.vm.disk]]
capacity = 6291456
[[datacenter.vm]]
name = "web"
cbt = true
[[datacenter.vm.disk]]
capacity = 8388608
"#,
    )
    .unwrap()
}

async fn start() -> (tempfile::TempDir, Sim, Arc<Client>) {
    start_with(estate()).await
}

/// The simulator of `estate` (its disks under `sim/` in the directory), logged in.
async fn start_with(estate: Config) -> (tempfile::TempDir, Sim, Arc<Client>) {
    start_timed(estate, Duration::from_secs(20)).await
}

/// The same, with the client's `timeout`.
async fn start_timed(estate: Config, timeout: Duration) -> (tempfile::TempDir, Sim, Arc<Client>) {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(estate, &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts = ConnectOptions { trust: Trust::Insecure, timeout, ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("s3cret") }).await.unwrap();
    (dir, sim, Arc::new(c))
}

fn ctx(client: &Arc<Client>, repo: &Repo, job: &str) -> JobContext {
    JobContext::new(client.clone(), repo.clone(), "test-proxy", job, Arc::new(Engine::new(64 * MIB)))
}

fn builder(client: &Arc<Client>, repo: &Repo, job: &str) -> JobContextBuilder {
    JobContext::builder(
        client.clone(),
        Target::Repository(repo.clone()),
        "test-proxy",
        job,
        Arc::new(Engine::new(64 * MIB)),
    )
}

/// Every disk of every restore point of `vm` matches the simulator's disk now.
async fn restores_match(sim: &Sim, client: &Client, repo: &Repo, vm: &str, point: &str) {
    let v = client.vms().await.unwrap().into_iter().find(|v| v.name == vm).unwrap();
    let m = repo.point(point).unwrap();
    for (n, d) in v.disks.iter().enumerate() {
        let want = std::fs::read(sim.disk_path(vm, d.key).unwrap()).unwrap();
        let got = repo.reader(point, n).unwrap().read(0, d.capacity).unwrap();
        assert!(got == want, "{vm} disk {} of {point} differs from the simulator's", m.disks[n].name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_backups_of_multi_disk_vms() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    for v in &vms {
        for (i, d) in v.disks.iter().enumerate() {
            // Data in a few places; the rest stays a hole.
            sim.write(&v.name, d.key, 0, &noise(3 * MIB as usize, i as u64 + 1)).unwrap();
            sim.write(&v.name, d.key, d.capacity - MIB, &noise(MIB as usize, i as u64 + 9)).unwrap();
        }
    }
    // The first run: full copies (db had CBT off; it is turned on).
    let mut firsts = Vec::new();
    for v in &vms {
        let r = backup_vm(&ctx(&client, &repo, "job1"), &v.moref).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(r.snapshot_removed);
        assert!(r.disks.iter().all(|d| d.full), "{r:?}");
        assert_eq!(r.consistency, Some(repo::Consistency::Application), "VMware Tools run in the simulator");
        if v.name == "db" {
            assert!(r.warnings.iter().any(|w| w.contains("CBT was off")), "{r:?}");
        }
        // Only the allocated areas were read (4 MiB of data per disk, in 1 MiB chunks).
        for d in &r.disks {
            assert_eq!(d.read, 4 * MIB, "{d:?}");
        }
        let point = r.point.clone().unwrap();
        restores_match(&sim, &client, &repo, &v.name, &point).await;
        let m = repo.point(&point).unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        let (vmx, nvram) = (format!("{}.vmx", v.name), format!("{}.nvram", v.name));
        assert_eq!(names, [vmx.as_str(), nvram.as_str()], "the .vmx and .nvram are captured");
        assert!(String::from_utf8(repo.file(&m, &vmx).unwrap()).unwrap().contains(&v.name));
        assert_eq!(repo.file(&m, &nvram).unwrap(), format!("NVRAM of {}\n", v.name).as_bytes());
        firsts.push(point);
    }

    // 1 % of db's first disk changes; the second run copies only that.
    let db = vms.iter().find(|v| v.name == "db").unwrap();
    sim.write("db", db.disks[0].key, 5 * MIB + 100, &noise(160 << 10, 77)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "job2"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.disks.iter().map(|d| d.full).collect::<Vec<_>>(), [false, false], "{r:?}");
    // Only what CBT names (the simulator's 64 KiB units), not the chunk around it.
    assert_eq!(r.disks[0].read, 192 << 10, "the changed areas: {r:?}");
    assert_eq!(r.disks[1].read, 0, "{r:?}");
    let inc = r.point.clone().unwrap();
    assert_eq!(repo.point(&inc).unwrap().parent.as_deref(), Some(firsts[0].as_str()));
    restores_match(&sim, &client, &repo, "db", &inc).await;

    // A CBT reset: a new epoch, so the next copy is full, and still exact.
    client.set_change_tracking(&db.moref, false).await.unwrap();
    client.set_change_tracking(&db.moref, true).await.unwrap();
    let r = backup_vm(&ctx(&client, &repo, "job3"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.disks.iter().all(|d| d.full && d.plan.contains("full")), "{r:?}");
    restores_match(&sim, &client, &repo, "db", r.point.as_deref().unwrap()).await;
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    for v in client.vms().await.unwrap() {
        assert_eq!(v.snapshot_depth(), 0, "{} has a snapshot left", v.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_names_its_proxy_job_and_start_time() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    // A slow task keeps the snapshot visible while a second session looks.
    sim.faults(|f| f.task_delay = Duration::from_millis(400));
    let job = tokio::spawn({
        let (client, repo) = (client.clone(), repo.clone());
        async move { backup_vm(&ctx(&client, &repo, "job-42"), &web.moref).await }
    });
    let mut seen = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let v = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
        if let Some(s) = v.all_snapshots().first() {
            seen = Some((s.name.clone(), s.description.clone()));
            break;
        }
    }
    let r = job.await.unwrap();
    assert!(r.error.is_none() && r.snapshot_removed, "{r:?}");
    let (name, description) = seen.expect("the snapshot was seen while the backup ran");
    assert_eq!(name, "syncproxy-test-proxy-job-42");
    assert!(description.contains("job-42") && description.contains("test-proxy"), "{description}");
    let at = description.split(" at ").nth(1).and_then(|t| t.split(';').next()).unwrap_or("");
    assert!(humantime::parse_rfc3339(at).is_ok(), "an RFC 3339 start time in {description:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_mid_job_leave_no_snapshot_and_no_restore_point() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.write("web", web.disks[0].key, 0, &noise(MIB as usize, 3)).unwrap();

    // The snapshot task fails: nothing to remove, nothing written, the reason reported.
    sim.faults(|f| f.fail_next_task = Some(SimFault::new("NoDiskSpace", "no room for the delta")));
    let r = backup_vm(&ctx(&client, &repo, "f1"), &web.moref).await;
    assert!(r.error.as_deref().is_some_and(|e| e.contains("no room")), "{r:?}");
    assert!(r.point.is_none() && r.snapshot_removed);

    // CBT cannot answer mid-job: the copy fails, the snapshot is still removed.
    sim.faults(|f| f.qcda_file_fault = true);
    let r = backup_vm(&ctx(&client, &repo, "f2"), &web.moref).await;
    sim.faults(|f| f.qcda_file_fault = false);
    assert!(r.snapshot_removed, "{r:?}");
    assert_eq!(client.vms().await.unwrap().iter().map(|v| v.snapshot_depth()).sum::<usize>(), 0);

    // The session expires mid-job: the client logs in again and the backup succeeds.
    sim.faults(|f| f.expire_sessions = true);
    let r = backup_vm(&ctx(&client, &repo, "f3"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    restores_match(&sim, &client, &repo, "web", r.point.as_deref().unwrap()).await;
    assert!(repo.points().unwrap().len() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_snapshots_of_dead_jobs_go_and_live_ones_stay() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.write("web", web.disks[0].key, 0, &noise(MIB as usize, 5)).unwrap();
    // A proxy killed mid-job left its snapshot two days ago; no lease names its job.
    client.create_snapshot(&web.moref, "syncproxy-other-dead", "left behind", false, None).await.unwrap();
    sim.age_snapshot("web", "syncproxy-other-dead", Duration::from_secs(48 * 3600)).unwrap();
    // Another proxy's job is running: its lease is live, its snapshot is as old.
    let live = repo.job_lease("other-live").unwrap();
    client.create_snapshot(&web.moref, "syncproxy-other-live", "running", false, None).await.unwrap();
    sim.age_snapshot("web", "syncproxy-other-live", Duration::from_secs(48 * 3600)).unwrap();

    let r = backup_vm(&ctx(&client, &repo, "j1"), &web.moref).await;
    assert_eq!(r.stale_removed, ["syncproxy-other-dead"], "{r:?}");
    // The live job's snapshot stays, so this backup is refused, naming it; and it is reported
    // as more than a day old.
    let e = r.error.clone().unwrap_or_default();
    assert!(e.contains("syncproxy-other-live") && r.point.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("syncproxy-other-live") && w.contains("2days")), "{r:?}");
    let names: Vec<String> = client
        .vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.name == "web")
        .unwrap()
        .all_snapshots()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["syncproxy-other-live"]);

    // A dead job's snapshot younger than the longest job is left alone too.
    drop(live);
    let c = builder(&client, &repo, "j2").max_job(Duration::from_secs(72 * 3600)).build();
    let r = backup_vm(&c, &web.moref).await;
    assert!(r.stale_removed.is_empty() && r.error.is_some(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("left for now")), "{r:?}");
    // Once the job has been gone for longer than that, the next run removes it and succeeds.
    sim.age_snapshot("web", "syncproxy-other-live", Duration::from_secs(73 * 3600)).unwrap();
    let r = backup_vm(&c, &web.moref).await;
    assert_eq!(r.stale_removed, ["syncproxy-other-live"], "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(c.metrics().snapshot().snapshots_removed_stale, 1);
    restores_match(&sim, &client, &repo, "web", r.point.as_deref().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_says_full_or_incremental_and_touches_nothing() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    let db = vms.iter().find(|v| v.name == "db").unwrap();
    let web = vms.iter().find(|v| v.name == "web").unwrap();
    let calls_before = client.vms().await.unwrap();
    let p = plan_vm(&ctx(&client, &repo, "p1"), &db.moref).await.unwrap();
    assert_eq!(p.disks.len(), 2, "{p:?}");
    assert!(p.disks.iter().all(|d| d.plan.starts_with("full")), "{p:?}");
    assert!(p.warnings.iter().any(|w| w.contains("CBT is off")), "{p:?}");
    assert_eq!(client.vms().await.unwrap(), calls_before, "planning changed nothing: CBT still off, no snapshot");

    sim.write("web", web.disks[0].key, 0, &noise(2 * MIB as usize, 8)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b1"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    sim.write("web", web.disks[0].key, 3 * MIB, &noise(1000, 9)).unwrap();
    // Powered on: incremental, with its size left to the snapshot.
    let p = plan_vm(&ctx(&client, &repo, "p2"), &web.moref).await.unwrap();
    assert_eq!(p.parent, r.point);
    assert!(p.disks[0].plan.starts_with("incremental since") && p.disks[0].read.is_none(), "{p:?}");
    // Powered off: CBT answers without a snapshot, so the size is known.
    sim.set_power("web", "poweredOff").unwrap();
    let p = plan_vm(&ctx(&client, &repo, "p3"), &web.moref).await.unwrap();
    assert_eq!((p.disks[0].plan.as_str(), p.disks[0].read), ("incremental", Some(MIB)), "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_selects_vms_and_says_whether_all_some_or_none_succeeded() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    let web = vms.iter().find(|v| v.name == "web").unwrap();
    let by_uuid = Selector::parse(web.instance_uuid.as_deref().unwrap());
    let picked =
        select_vms(&client, &[Selector::parse("db"), by_uuid, Selector::parse(&web.moref.value)], false).await.unwrap();
    assert_eq!(picked.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["db", "web"], "each VM once");
    let e = select_vms(&client, &[Selector::parse("nosuch")], false).await.unwrap_err().to_string();
    assert!(e.contains("nosuch"), "{e}");
    let refs: Vec<_> = picked.iter().map(|v| v.moref.clone()).collect();

    let c = ctx(&client, &repo, "all");
    let r = run_job(&c, &refs, 4).await.unwrap();
    assert_eq!(r.outcome(), Outcome::All, "{r:?}");
    assert!(repo.live_jobs().unwrap().is_empty(), "the lease ends with the job");
    // The next snapshot fails for one VM: some succeeded.
    sim.faults(|f| f.fail_next_task = Some(SimFault::new("NoDiskSpace", "no room")));
    let r = run_job(&ctx(&client, &repo, "some"), &refs, 1).await.unwrap();
    assert_eq!(r.outcome(), Outcome::Some, "{r:?}");
    let encrypted = Config::from_toml(
        r#"
user = "u"
password = "p"
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.vm]]
name = "secret"
encrypted = true
[[datacenter.vm.disk]]
capacity = 1048576
"#,
    )
    .unwrap();
    let sim2 = Sim::start(encrypted, &dir.path().join("sim2"), SimTls::SelfSigned).await.unwrap();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim2.url()) };
    let c2 = Arc::new(Client::connect(&opts).await.unwrap());
    c2.login(Credentials { user: "u".into(), password: Secret::new("p") }).await.unwrap();
    let all = select_vms(&c2, &[], true).await.unwrap();
    let r =
        run_job(&ctx(&c2, &repo, "none"), &all.iter().map(|v| v.moref.clone()).collect::<Vec<_>>(), 2).await.unwrap();
    assert_eq!(r.outcome(), Outcome::None, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_vms_at_once_copy_together_under_the_memory_cap() {
    let scale: usize = std::env::var("SYNCPROXY_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let vms = 100 * scale;
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(Config::small(vms, 4 * MIB), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(60), ..ConnectOptions::new(&sim.url()) };
    let client = Arc::new(Client::connect(&opts).await.unwrap());
    client
        .login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") })
        .await
        .unwrap();
    let all = client.vms().await.unwrap();
    for (i, v) in all.iter().enumerate() {
        sim.write(&v.name, v.disks[0].key, 0, &noise(2 * MIB as usize, i as u64 + 1)).unwrap();
    }
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    // Slow storage: each datastore read waits, so every copy is under way at the same time.
    sim.faults(|f| f.datastore_delay = Duration::from_millis(1500));
    let cap = 256 * MIB;
    let c = JobContext::new(client.clone(), repo.clone(), "p", "hundred", Arc::new(Engine::new(cap)));
    let refs: Vec<_> = all.iter().map(|v| v.moref.clone()).collect();
    let r = run_job(&c, &refs, vms).await.unwrap();
    assert_eq!(r.outcome(), Outcome::All, "{:?}", r.vms.iter().find(|v| v.error.is_some()));
    let m = c.metrics().snapshot();
    assert!(m.disks_copying_peak >= vms as u64, "peak of disks copying at once: {m:?}");
    assert_eq!((m.disks_copying, m.vms_running, m.disks_copied), (0, 0, vms as u64), "{m:?}");
    assert_eq!(m.bytes_read, vms as u64 * 2 * MIB, "{m:?}");
    assert!(c.engine().pool.peak() <= cap, "the buffer pool stayed under its cap: {}", c.engine().pool.peak());
    println!(
        "{vms} VMs in {:.2} s; {} disks copying at peak; pool peak {} MiB",
        r.seconds,
        m.disks_copying_peak,
        c.engine().pool.peak() / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_or_a_grown_disk_forces_a_full_copy_of_that_disk_only() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let db = client.vms().await.unwrap().into_iter().find(|v| v.name == "db").unwrap();
    let (k0, k1) = (db.disks[0].key, db.disks[1].key);
    sim.write("db", k0, 0, &noise(2 * MIB as usize, 1)).unwrap();
    sim.write("db", k1, 0, &noise(2 * MIB as usize, 2)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "e1"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");

    // The second disk starts a new change-ID epoch; both disks change a little.
    sim.new_epoch("db", k1).unwrap();
    sim.write("db", k0, 4 * MIB, &noise(1000, 3)).unwrap();
    sim.write("db", k1, 4 * MIB, &noise(1000, 4)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "e2"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.disks.iter().map(|d| d.full).collect::<Vec<_>>(), [false, true], "{r:?}");
    assert!(r.disks[1].plan.contains("full"), "{r:?}");
    assert_eq!(r.disks[0].read, CBT_UNIT, "only the changed area of the first disk: {r:?}");
    restores_match(&sim, &client, &repo, "db", r.point.as_deref().unwrap()).await;

    // The first disk grows: it alone is copied in full, at its new size.
    sim.grow_disk("db", k0, 20 * MIB).unwrap();
    sim.write("db", k0, 18 * MIB, &noise(1000, 5)).unwrap();
    sim.write("db", k1, 5 * MIB, &noise(1000, 6)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "e3"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.disks.iter().map(|d| d.full).collect::<Vec<_>>(), [true, false], "{r:?}");
    assert_eq!(r.disks[1].read, CBT_UNIT, "{r:?}");
    let point = r.point.unwrap();
    assert_eq!(repo.point(&point).unwrap().disks[0].capacity, 20 * MIB);
    restores_match(&sim, &client, &repo, "db", &point).await;
}

/// Every disk of `vm`'s replica matches the simulator's disk now.
async fn replica_matches(sim: &Sim, client: &Client, target: &ReplicaTarget, vm: &str) {
    let v = client.vms().await.unwrap().into_iter().find(|v| v.name == vm).unwrap();
    for d in &v.disks {
        let want = std::fs::read(sim.disk_path(vm, d.key).unwrap()).unwrap();
        let slot = d.bus_slot.clone().unwrap();
        let got = std::fs::read(target.disk_path(&v, &slot)).unwrap();
        assert!(got == want, "{vm} {slot}: the replica differs from the simulator's disk");
    }
}

fn replica_ctx(client: &Arc<Client>, target: &ReplicaTarget, job: &str) -> JobContext {
    replica_builder(client, target, job).build()
}

fn replica_builder(client: &Arc<Client>, target: &ReplicaTarget, job: &str) -> JobContextBuilder {
    JobContext::builder(
        client.clone(),
        Target::Replica(target.clone()),
        "test-proxy",
        job,
        Arc::new(Engine::new(64 * MIB)),
    )
}

/// Copy options that make a copy slow enough to cut: one request of 1 MiB at a time.
fn one_at_a_time() -> CopyOptions {
    CopyOptions { in_flight: 1, request_size: MIB, ..CopyOptions::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_full_then_incremental_beside_backups_that_never_mix() {
    let (dir, sim, client) = start().await;
    let target = ReplicaTarget::open(dir.path().join("replicas")).unwrap();
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    for v in &vms {
        for (i, d) in v.disks.iter().enumerate() {
            sim.write(&v.name, d.key, MIB, &noise(3 * MIB as usize, i as u64 + 20)).unwrap();
        }
    }
    let refs: Vec<_> = vms.iter().map(|v| v.moref.clone()).collect();
    let r = run_job(&replica_ctx(&client, &target, "r1"), &refs, 2).await.unwrap();
    assert_eq!(r.outcome(), Outcome::All, "{r:?}");
    for v in &r.vms {
        assert!(v.disks.iter().all(|d| d.full) && v.replica.is_some() && v.snapshot_removed, "{v:?}");
        assert!(v.disks.iter().all(|d| d.read == 3 * MIB), "only allocated data: {v:?}");
        replica_matches(&sim, &client, &target, &v.vm).await;
    }
    let db = vms.iter().find(|v| v.name == "db").unwrap();
    assert!(target.vm_dir(db).join("db.vmx").is_file(), "the .vmx beside the replica");
    assert!(target.vm_dir(db).join("db.nvram").is_file(), "and the .nvram");

    // A backup of the same VM into a repository: a state of its own, full the first time.
    let b = backup_vm(&ctx(&client, &repo, "b1"), &db.moref).await;
    assert!(b.error.is_none() && b.disks.iter().all(|d| d.full), "{b:?}");

    // A small change: the replica's incremental copies only it.
    sim.write("db", db.disks[0].key, 8 * MIB, &noise(5000, 31)).unwrap();
    let r = backup_vm(&replica_ctx(&client, &target, "r2"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.disks.iter().map(|d| (d.full, d.read)).collect::<Vec<_>>(), [(false, CBT_UNIT), (false, 0)], "{r:?}");
    replica_matches(&sim, &client, &target, "db").await;
    // And the repository's next backup still sees the change (its state never moved).
    let b = backup_vm(&ctx(&client, &repo, "b2"), &db.moref).await;
    assert_eq!(b.disks.iter().map(|d| (d.full, d.read)).collect::<Vec<_>>(), [(false, CBT_UNIT), (false, 0)], "{b:?}");
    restores_match(&sim, &client, &repo, "db", b.point.as_deref().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_interrupted_mid_incremental_is_dirty_until_the_next_sync() {
    let (dir, sim, client) = start().await;
    let target = ReplicaTarget::open(dir.path().join("replicas")).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.write("web", web.disks[0].key, 0, &noise(8 * MIB as usize, 40)).unwrap();
    let r = backup_vm(&replica_ctx(&client, &target, "r1"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    // The whole disk changes, and the sync is cancelled part-way.
    sim.write("web", web.disks[0].key, 0, &noise(8 * MIB as usize, 41)).unwrap();
    sim.faults(|f| f.datastore_delay = Duration::from_millis(100));
    let c = replica_builder(&client, &target, "r2").options(one_at_a_time()).build();
    let cancel = c.engine().cancel.clone();
    let job = tokio::spawn({
        let c = c.clone();
        let m = web.moref.clone();
        async move { backup_vm(&c, &m).await }
    });
    // Cut once the copy has written into the replica.
    for _ in 0..400 {
        if c.metrics().snapshot().bytes_read >= 2 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    let r = job.await.unwrap();
    assert!(r.error.is_some() && r.replica.is_none() && r.snapshot_removed, "{r:?}");
    sim.faults(|f| f.datastore_delay = Duration::ZERO);
    let vcenter = client.content().about.instance_uuid.clone();
    let key = target.key(&vcenter, &web, "scsi0:0").unwrap();
    let state = target.state.load(&key).unwrap().unwrap();
    assert!(!state.consistent() && state.dirty.is_some(), "reported dirty: {state:?}");

    // The next sync makes it whole and identical.
    let r = backup_vm(&replica_ctx(&client, &target, "r3"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("inconsistent")), "{r:?}");
    replica_matches(&sim, &client, &target, "web").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_and_per_datastore_limits_hold_across_jobs() {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(Config::small(6, 4 * MIB), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let client = Arc::new(Client::connect(&opts).await.unwrap());
    client
        .login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") })
        .await
        .unwrap();
    let all = client.vms().await.unwrap();
    for (i, v) in all.iter().enumerate() {
        sim.write(&v.name, v.disks[0].key, 0, &noise(MIB as usize, i as u64 + 1)).unwrap();
    }
    sim.faults(|f| f.datastore_delay = Duration::from_millis(100));
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let limits = Arc::new(orchestration::Limits::new(100, Some(2), None));
    let metrics = Arc::new(orchestration::Metrics::default());
    // Two jobs at once, three VMs each, one host: never more than two VMs copy at a time.
    let mut jobs = Vec::new();
    for (name, vms) in [("a", &all[..3]), ("b", &all[3..])] {
        let c = builder(&client, &repo, name).limits(limits.clone()).metrics(metrics.clone()).build();
        let refs: Vec<_> = vms.iter().map(|v| v.moref.clone()).collect();
        jobs.push(tokio::spawn(async move { run_job(&c, &refs, 10).await.unwrap() }));
    }
    for j in jobs {
        assert_eq!(j.await.unwrap().outcome(), Outcome::All);
    }
    let m = metrics.snapshot();
    assert_eq!(m.disks_copied, 6, "{m:?}");
    assert!(m.disks_copying_peak <= 2 && m.disks_copying_peak >= 1, "per-host limit of 2: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_are_included_and_excluded_by_slot_or_label() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let db = client.vms().await.unwrap().into_iter().find(|v| v.name == "db").unwrap();
    for d in &db.disks {
        sim.write("db", d.key, 0, &noise(MIB as usize, u64::from(d.key.unsigned_abs()))).unwrap();
    }
    let only = |disks| builder(&client, &repo, "x1").disks(disks).build();
    let c = only(orchestration::DiskFilter { include: Vec::new(), exclude: vec!["scsi0:1".into()] });
    let r = backup_vm(&c, &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["scsi0:0"], "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("scsi0:1") && w.contains("left out")), "{r:?}");
    let m = repo.point(r.point.as_deref().unwrap()).unwrap();
    assert_eq!(m.disks.len(), 1);
    let want = std::fs::read(sim.disk_path("db", db.disks[0].key).unwrap()).unwrap();
    assert!(repo.reader(&m.id, 0).unwrap().read(0, db.disks[0].capacity).unwrap() == want);
    // By label, include wins only where exclude does not name the disk.
    let label = db.disks[1].label.clone();
    let c = only(orchestration::DiskFilter { include: vec![label], exclude: Vec::new() });
    let r = backup_vm(&c, &db.moref).await;
    assert_eq!(r.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["scsi0:1"], "{r:?}");
}

/// Runs `c` on `vm` slowly, a checkpoint every MiB, and cuts it once a few MiB are across, as a
/// proxy killed mid-copy: its snapshot stays behind (the removal fails). Returns the bytes it
/// read.
async fn cut_mid_copy(sim: &Sim, client: &Client, c: JobContextBuilder, vm: &vsphere::MoRef) -> u64 {
    sim.faults(|f| f.datastore_delay = Duration::from_millis(100));
    let c = c.options(CopyOptions { checkpoint_bytes: MIB, ..one_at_a_time() }).build();
    let cancel = c.engine().cancel.clone();
    let job = tokio::spawn({
        let (c, m) = (c.clone(), vm.clone());
        async move { backup_vm(&c, &m).await }
    });
    for _ in 0..400 {
        if c.metrics().snapshot().bytes_read >= 3 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.faults(|f| f.fail_next_task = Some(SimFault::new("FileLocked", "the delta is locked")));
    cancel.cancel();
    let r = job.await.unwrap();
    sim.faults(|f| f.datastore_delay = Duration::ZERO);
    assert!(r.error.is_some() && !r.snapshot_removed && r.point.is_none(), "{r:?}");
    let left = client.vms_by_moref(std::slice::from_ref(vm)).await.unwrap().pop().unwrap();
    assert_eq!(left.all_snapshots().len(), 1, "the dead job's snapshot is still there");
    let read = c.metrics().snapshot().bytes_read;
    assert!(read > 0 && read < 8 * MIB, "the cut came mid-copy: {read}");
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_left_by_a_dead_proxy_resumes_under_its_snapshot() {
    let (dir, sim, client) = start().await;
    let target = ReplicaTarget::open(dir.path().join("replicas")).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.write("web", web.disks[0].key, 0, &noise(8 * MIB as usize, 60)).unwrap();
    let r = backup_vm(&replica_ctx(&client, &target, "r1"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");

    // The whole disk changes; the next sync is cut off part-way and, like a proxy killed
    // mid-copy, leaves its snapshot behind (its removal fails) with a checkpoint.
    sim.write("web", web.disks[0].key, 0, &noise(8 * MIB as usize, 61)).unwrap();
    let c = replica_builder(&client, &target, "r2");
    let before = cut_mid_copy(&sim, &client, c, &web.moref).await;

    // The next job adopts it: the copy goes on from the checkpoint, under the same frozen state.
    let r = backup_vm(&replica_ctx(&client, &target, "r3"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("resuming the copy that job test-proxy-r2 left")), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("resumed from its checkpoint")), "{r:?}");
    assert!(r.disks[0].read <= 8 * MIB - before + MIB, "only what was left, and one checkpoint interval: {r:?}");
    assert!(r.snapshot_removed, "{r:?}");
    // The replica holds the disk as it was frozen: the data now.
    replica_matches(&sim, &client, &target, "web").await;
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()));
    // And the next sync is an ordinary incremental.
    sim.write("web", web.disks[0].key, 0, &noise(1000, 62)).unwrap();
    let r = backup_vm(&replica_ctx(&client, &target, "r4"), &web.moref).await;
    assert_eq!(r.disks.iter().map(|d| (d.full, d.read)).collect::<Vec<_>>(), [(false, CBT_UNIT)], "{r:?}");
    replica_matches(&sim, &client, &target, "web").await;
}

/// A VM under older snapshots (another product's, an operator's) is read through its delta
/// chain over HTTPS: SEsparse deltas on VMFS, vmfsSparse on NFS, as the simulator writes them.
/// Full then incremental, each restore exact; the older snapshots stay; with CBT off it is
/// not turned on under them, and the copy is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_under_older_snapshots_are_read_through_their_delta_chains() {
    let cfg = estate_with(
        r#"
[[datacenter.datastore]]
name = "vmfs1"
type = "VMFS"
[[datacenter.datastore]]
name = "nfs1"
type = "NFS"
[[datacenter.vm]]
name = "onvmfs"
cbt = true
[[datacenter.vm.disk]]
capacity = 8388608
datastore = "vmfs1"
[[datacenter.vm]]
name = "onnfs"
cbt = true
[[datacenter.vm.disk]]
capacity = 8388608
datastore = "nfs1"
[[datacenter.vm]]
name = "nocbt"
cbt = false
[[datacenter.vm.disk]]
capacity = 8388608
datastore = "vmfs1"
"#,
    );
    let (dir, sim, client) = start_with(cfg).await;
    let root = dir.path().join("sim");
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    for v in &vms {
        let key = v.disks[0].key;
        sim.write(&v.name, key, 0, &noise(2 * MIB as usize, 1)).unwrap();
        client.create_snapshot(&v.moref, "before-upgrade", "an operator's", false, None).await.unwrap();
        // Overwritten, zeroed and new data above the first snapshot.
        sim.write(&v.name, key, 512 << 10, &noise(100 << 10, 2)).unwrap();
        sim.write(&v.name, key, 0, &[0u8; 64 << 10]).unwrap();
        sim.write(&v.name, key, 3 * MIB + 7, &noise(300 << 10, 3)).unwrap();
        client.create_snapshot(&v.moref, "VeeamSnapshot", "another product's", false, None).await.unwrap();
        sim.write(&v.name, key, 6 * MIB, &noise(MIB as usize, 4)).unwrap();
        sim.write(&v.name, key, MIB + 3, &noise(4096, 5)).unwrap();
    }
    // The simulator keeps the deltas as ESXi does, in the format of the datastore.
    assert!(root.join("vmfs1/onvmfs/onvmfs-000001-sesparse.vmdk").exists());
    assert!(root.join("nfs1/onnfs/onnfs-000001-delta.vmdk").exists());

    for v in &vms {
        let r = backup_vm(&ctx(&client, &repo, "chain1"), &v.moref).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(r.snapshot_removed, "{r:?}");
        assert!(r.warnings.iter().any(|w| w.contains("2 older snapshot(s)")), "{r:?}");
        assert!(r.disks[0].full, "{r:?}");
        assert_eq!(r.disks[0].transport, "https, 3 layers", "the base and two deltas: {r:?}");
        restores_match(&sim, &client, &repo, &v.name, r.point.as_deref().unwrap()).await;
        if v.name == "nocbt" {
            assert!(r.warnings.iter().any(|w| w.contains("not turned on while the VM has snapshots")), "{r:?}");
            assert_eq!(r.disks[0].read, 8 * MIB, "no CBT: the whole disk is read");
        }
        let after = client.vms_by_moref(std::slice::from_ref(&v.moref)).await.unwrap().pop().unwrap();
        let names: Vec<&str> = after.all_snapshots().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["before-upgrade", "VeeamSnapshot"], "only ours is removed");
    }
    // Changes under the chain: an incremental reads only them, and restores exactly.
    for v in vms.iter().filter(|v| v.name != "nocbt") {
        sim.write(&v.name, v.disks[0].key, 4 * MIB + 11, &noise(8192, 6)).unwrap();
        let r = backup_vm(&ctx(&client, &repo, "chain2"), &v.moref).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(!r.disks[0].full && r.disks[0].read == CBT_UNIT, "one changed area: {r:?}");
        restores_match(&sim, &client, &repo, &v.name, r.point.as_deref().unwrap()).await;
    }
}

/// A repository backup cut short by a dead proxy is finished by the next run under the dead
/// job's snapshot, from the session it kept: only what was not stored is read, the restore
/// point builds on the same parent and restores exactly. A session whose snapshot is gone is
/// dropped and the disk planned again from the last restore point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_left_by_a_dead_proxy_is_finished_from_its_session() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let sessions = dir.path().join("repo/sessions");
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    let key = web.disks[0].key;
    sim.write("web", key, 0, &noise(8 * MIB as usize, 70)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b1"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    let first = r.point.unwrap();
    assert!(std::fs::read_dir(&sessions).unwrap().next().is_none(), "a finished backup leaves no session");

    sim.write("web", key, 0, &noise(8 * MIB as usize, 71)).unwrap();
    let before = cut_mid_copy(&sim, &client, builder(&client, &repo, "b2"), &web.moref).await;
    assert_eq!(repo.points().unwrap().len(), 1, "no restore point from the cut backup");
    let r = backup_vm(&ctx(&client, &repo, "b3"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("resuming the copy that job test-proxy-b2 left")), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("finishing the backup job test-proxy-b2 began")), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("stored before the interruption")), "{r:?}");
    assert!(r.disks[0].read <= 8 * MIB - before + MIB, "only what was left, and one checkpoint interval: {r:?}");
    assert!(r.snapshot_removed, "{r:?}");
    let point = r.point.unwrap();
    assert_eq!(repo.point(&point).unwrap().parent.as_deref(), Some(first.as_str()));
    restores_match(&sim, &client, &repo, "web", &point).await;
    assert!(std::fs::read_dir(&sessions).unwrap().next().is_none(), "the session is gone once finished");

    // Cut again, and this time the snapshot is removed by hand: nothing to resume under.
    sim.write("web", key, 0, &noise(8 * MIB as usize, 72)).unwrap();
    cut_mid_copy(&sim, &client, builder(&client, &repo, "b4"), &web.moref).await;
    let left = client.vms_by_moref(std::slice::from_ref(&web.moref)).await.unwrap().pop().unwrap();
    client.remove_snapshot(&left.all_snapshots()[0].moref, true).await.unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b5"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("dropped the unfinished backup of job test-proxy-b4")), "{r:?}");
    assert_eq!(r.disks[0].read, 8 * MIB, "planned again from the last restore point: {r:?}");
    restores_match(&sim, &client, &repo, "web", r.point.as_deref().unwrap()).await;
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()));
}

/// `cbt-reset` in both forms: a running VM (CBT off, a snapshot's stun, CBT on, another stun)
/// and a powered-off one (CBT off, its `-ctk.vmdk` deleted, CBT on), each leaving a new epoch
/// on every disk and no snapshot; a VM with someone else's snapshot refused. The repository
/// it marks makes the next backup full, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_reset_in_both_forms_gives_a_new_epoch_and_a_full_next_backup() {
    let cfg = estate_with(
        r#"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.vm]]
name = "web"
cbt = true
[[datacenter.vm.disk]]
capacity = 4194304
[[datacenter.vm]]
name = "cold"
cbt = true
power = "poweredOff"
[[datacenter.vm.disk]]
capacity = 4194304
[[datacenter.vm]]
name = "snapped"
cbt = true
[[datacenter.vm.disk]]
capacity = 4194304
"#,
    );
    let (dir, sim, client) = start_with(cfg).await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    let by = |n: &str| vms.iter().find(|v| v.name == n).unwrap().clone();
    let (web, cold, snapped) = (by("web"), by("cold"), by("snapped"));
    for v in [&web, &cold] {
        sim.write(&v.name, v.disks[0].key, 0, &noise(2 * MIB as usize, 90)).unwrap();
        let r = backup_vm(&ctx(&client, &repo, "before"), &v.moref).await;
        assert!(r.error.is_none(), "{r:?}");
    }
    let epoch = |c: Option<&str>| c.map(|c| c.split('/').next().unwrap().to_owned());
    let marks = [repo.store().clone()];

    // Powered off: turning CBT off and on again with the ctk file in place keeps the old
    // tracking (the epoch stays): the reason the reset deletes it.
    client.set_change_tracking(&cold.moref, false).await.unwrap();
    client.set_change_tracking(&cold.moref, true).await.unwrap();
    let again = client.vms_by_moref(std::slice::from_ref(&cold.moref)).await.unwrap().pop().unwrap();
    assert_eq!(epoch(again.disks[0].change_id.as_deref()), epoch(cold.disks[0].change_id.as_deref()));
    let r = orchestration::cbt_reset::cbt_reset(&client, &cold.moref, &marks).await.unwrap();
    assert_eq!(r.form, "powered-off");
    assert!(r.steps.iter().any(|s| s == "deleted [ds1] cold/cold-ctk.vmdk"), "{r:?}");
    assert!(dir.path().join("sim/ds1/cold/cold-ctk.vmdk").exists(), "tracking starts over in a new file");

    // Running: two stuns, no snapshot left.
    let r2 = orchestration::cbt_reset::cbt_reset(&client, &web.moref, &marks).await.unwrap();
    assert_eq!(r2.form, "running");
    assert_eq!(r2.steps.iter().filter(|s| s.contains("a snapshot created and removed")).count(), 2, "{r2:?}");
    for rep in [&r, &r2] {
        for (slot, before, after) in &rep.disks {
            assert!(after.is_some() && epoch(before.as_deref()) != epoch(after.as_deref()), "{slot}: {rep:?}");
        }
    }
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()));

    // Someone else's snapshot: refused, nothing changed.
    client.create_snapshot(&snapped.moref, "before-upgrade", "", false, None).await.unwrap();
    let e = orchestration::cbt_reset::cbt_reset(&client, &snapped.moref, &marks).await.unwrap_err();
    assert!(e.to_string().contains("before-upgrade"), "{e}");
    let still = client.vms_by_moref(std::slice::from_ref(&snapped.moref)).await.unwrap().pop().unwrap();
    assert_eq!(still.cbt_enabled, Some(true));

    // The next backup of a reset VM is full, says why, and restores; the one after is an
    // ordinary incremental.
    for v in [&web, &cold] {
        let r = backup_vm(&ctx(&client, &repo, "after"), &v.moref).await;
        assert!(r.error.is_none(), "{r:?}");
        assert!(r.disks[0].full && r.warnings.iter().any(|w| w.contains("CBT was reset")), "{r:?}");
        restores_match(&sim, &client, &repo, &v.name, r.point.as_deref().unwrap()).await;
        sim.write(&v.name, v.disks[0].key, MIB, &noise(1000, 91)).unwrap();
        let r = backup_vm(&ctx(&client, &repo, "later"), &v.moref).await;
        assert!(r.error.is_none() && !r.disks[0].full && r.disks[0].read == CBT_UNIT, "{r:?}");
    }
}

/// The DRS override of a VM in a fully automated cluster while it is read: set to manual, put
/// back afterwards (removed, or the VM's own setting restored); a job dropped mid-copy leaves
/// it set, and the next run puts it back; without the privilege, the copy goes on with a
/// warning; pinning can be turned off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drs_is_pinned_while_a_vm_is_read_and_put_back_even_after_a_crash() {
    let mut cfg = estate_with(
        r#"
[[datacenter.host]]
name = "esx2"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.cluster]]
name = "C1"
hosts = ["esx1"]
[[datacenter.cluster]]
name = "C2"
hosts = ["esx2"]
[[datacenter.vm]]
name = "a"
cbt = true
[[datacenter.vm.disk]]
capacity = 8388608
[[datacenter.vm]]
name = "b"
cbt = true
[[datacenter.vm.disk]]
capacity = 4194304
[[datacenter.vm]]
name = "c"
host = "esx2"
cbt = true
[[datacenter.vm.disk]]
capacity = 4194304
"#,
    );
    cfg.denied =
        vec![vsphere_sim::Denied { entity: "C2".into(), privileges: vec!["Host.Inventory.EditCluster".into()] }];
    let (dir, sim, client) = start_with(cfg).await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    let by = |n: &str| vms.iter().find(|v| v.name == n).unwrap().clone();
    let (a, b, c) = (by("a"), by("b"), by("c"));
    let cluster = client.cluster_of(a.host.as_ref().unwrap()).await.unwrap().unwrap();
    let own = |vm: &vsphere::Vm| {
        let (client, cl, vm) = (client.clone(), cluster.moref.clone(), vm.moref.clone());
        async move {
            let c = client.cluster(&cl).await.unwrap().unwrap();
            c.vm_overrides
                .into_iter()
                .find(|o| o.vm == vm)
                .map(|o| o.behavior.map(|b| b.to_string()).unwrap_or_default())
        }
    };
    for v in [&a, &b, &c] {
        sim.write(&v.name, v.disks[0].key, 0, &noise(4 * MIB as usize, 7)).unwrap();
    }
    // b has a setting of its own, which must come back as it was.
    let mine = vsphere::facts::DrsOverride {
        vm: b.moref.clone(),
        enabled: Some(true),
        behavior: Some("partiallyAutomated".into()),
    };
    client.set_drs_override(&cluster.moref, &vsphere::facts::DrsChange::Add(mine)).await.unwrap();

    // a is read slowly: manual while it is, nothing of ours after.
    sim.faults(|f| f.datastore_delay = Duration::from_millis(50));
    let job = tokio::spawn({
        let (c, m) = (ctx(&client, &repo, "p1"), a.moref.clone());
        async move { backup_vm(&c, &m).await }
    });
    let mut seen = None;
    for _ in 0..400 {
        seen = own(&a).await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.as_deref(), Some("manual"), "pinned while read");
    let r = job.await.unwrap();
    sim.faults(|f| f.datastore_delay = Duration::ZERO);
    assert!(r.error.is_none() && r.warnings.iter().any(|w| w.contains("DRS set to manual")), "{r:?}");
    assert_eq!(own(&a).await, None, "no override left");
    let r = backup_vm(&ctx(&client, &repo, "p2"), &b.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(own(&b).await.as_deref(), Some("partiallyAutomated"), "its own setting is back");

    // Dropped mid-copy (as a killed proxy): the override stays, and the record of what to put
    // back; the next run puts it back.
    sim.write("a", a.disks[0].key, 0, &noise(4 * MIB as usize, 8)).unwrap();
    sim.faults(|f| f.datastore_delay = Duration::from_millis(100));
    let job = tokio::spawn({
        let (c, m) = (ctx(&client, &repo, "p3"), a.moref.clone());
        async move { backup_vm(&c, &m).await }
    });
    for _ in 0..400 {
        if own(&a).await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    job.abort();
    let _ = job.await;
    sim.faults(|f| f.datastore_delay = Duration::ZERO);
    assert_eq!(own(&a).await.as_deref(), Some("manual"), "left set by the dead job");
    assert_eq!(std::fs::read_dir(dir.path().join("repo/pins")).unwrap().count(), 1);
    // (Its snapshot too, if it got that far: removed by hand here, as hygiene would once it is
    // older than the longest job.)
    let left = client.vms_by_moref(std::slice::from_ref(&a.moref)).await.unwrap().pop().unwrap();
    for snap in left.all_snapshots() {
        client.remove_snapshot(&snap.moref, true).await.unwrap();
    }
    let r = backup_vm(&ctx(&client, &repo, "p4"), &a.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("put back the DRS setting job test-proxy-p3 left")), "{r:?}");
    assert_eq!(own(&a).await, None);
    assert_eq!(std::fs::read_dir(dir.path().join("repo/pins")).unwrap().count(), 0);

    // No privilege on C2: the copy goes on, and says DRS may move the VM.
    let r = backup_vm(&ctx(&client, &repo, "p5"), &c.moref).await;
    assert!(r.error.is_none() && r.warnings.iter().any(|w| w.contains("DRS may move this VM")), "{r:?}");
    // Turned off: nothing is pinned.
    let off = builder(&client, &repo, "p6").pin_drs(false).build();
    let r = backup_vm(&off, &a.moref).await;
    assert!(r.error.is_none() && !r.warnings.iter().any(|w| w.contains("DRS")), "{r:?}");
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()));
}

/// Freeze hooks around the snapshot, on the proxy and in the guest: both run, in order, each
/// knowing its VM; a failing or slow pre-freeze hook aborts the VM's backup with no snapshot
/// taken (the post-thaw hook still thaws); a failing post-thaw hook is reported loudly while the
/// backup completes; guest credentials never show in an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_hooks_run_around_the_snapshot_and_a_failing_pre_freeze_aborts_cleanly() {
    use orchestration::hooks::{Hook, HookAction, Hooks, guest_credentials};
    let cfg = estate_with(
        r#"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.vm]]
name = "db"
cbt = true
guest_password = "guest-s3cret"
[[datacenter.vm.disk]]
capacity = 2097152
[[datacenter.vm]]
name = "notools"
cbt = true
tools = "guestToolsNotRunning"
guest_password = "guest-s3cret"
[[datacenter.vm.disk]]
capacity = 2097152
"#,
    );
    let (dir, sim, client) = start_with(cfg).await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let vms = client.vms().await.unwrap();
    let (db, notools) =
        (vms.iter().find(|v| v.name == "db").unwrap(), vms.iter().find(|v| v.name == "notools").unwrap());
    let log = dir.path().join("hooks.log");
    let on_proxy =
        |cmd: &str, ms: u64| Hook { action: HookAction::Proxy(cmd.to_owned()), timeout: Duration::from_millis(ms) };
    let record = format!("echo \"$SYNCPROXY_HOOK $SYNCPROXY_VM $SYNCPROXY_VM_MOREF\" >> {}", log.display());
    let with = |hooks: Hooks, job: &str| builder(&client, &repo, job).hooks(hooks).build();
    let snapshots = || async { client.vms().await.unwrap().iter().map(|v| v.all_snapshots().len()).sum::<usize>() };

    // Both hooks on the proxy: run, in order, each knowing its VM.
    let hooks = Hooks { pre_freeze: Some(on_proxy(&record, 5000)), post_thaw: Some(on_proxy(&record, 5000)) };
    let r = backup_vm(&with(hooks, "h1"), &db.moref).await;
    assert!(r.error.is_none() && r.point.is_some(), "{r:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text, format!("pre-freeze db {0}\npost-thaw db {0}\n", db.moref.value));

    // A failing pre-freeze hook: no snapshot, no restore point, the reason, and still a thaw.
    std::fs::remove_file(&log).unwrap();
    let fail = "echo 'the database refused to freeze' >&2; exit 3";
    let hooks = Hooks { pre_freeze: Some(on_proxy(fail, 5000)), post_thaw: Some(on_proxy(&record, 5000)) };
    let points = repo.points().unwrap().len();
    let r = backup_vm(&with(hooks, "h2"), &db.moref).await;
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("pre-freeze hook failed") && e.contains("refused to freeze") && e.contains("no snapshot"),
        "{r:?}"
    );
    assert_eq!((repo.points().unwrap().len(), snapshots().await), (points, 0));
    assert!(std::fs::read_to_string(&log).unwrap().starts_with("post-thaw db"), "thawed all the same");
    // Too slow: ended, and the same.
    let hooks = Hooks { pre_freeze: Some(on_proxy("sleep 30", 300)), post_thaw: None };
    let r = backup_vm(&with(hooks, "h3"), &db.moref).await;
    assert!(r.error.as_deref().is_some_and(|e| e.contains("ran longer than")), "{r:?}");
    assert_eq!(snapshots().await, 0);
    // A failing post-thaw hook: loud, and the backup completes.
    let hooks = Hooks { pre_freeze: None, post_thaw: Some(on_proxy("exit 1", 5000)) };
    let r = backup_vm(&with(hooks, "h4"), &db.moref).await;
    assert!(r.error.is_none() && r.point.is_some(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.starts_with("POST-THAW HOOK FAILED")), "{r:?}");

    // In the guest, through VMware Tools, with credentials from a file.
    let cred = dir.path().join("guest-cred");
    std::fs::write(&cred, "root\nguest-s3cret\n").unwrap();
    let auth = guest_credentials(&cred).unwrap();
    let in_guest = |program: &str, args: &str, ms: u64, auth: &vsphere::guest::GuestAuth| Hook {
        action: HookAction::Guest { program: program.into(), arguments: args.into(), auth: auth.clone() },
        timeout: Duration::from_millis(ms),
    };
    let hooks = Hooks {
        pre_freeze: Some(in_guest("/bin/true", "--freeze", 5000, &auth)),
        post_thaw: Some(in_guest("/bin/true", "--thaw", 5000, &auth)),
    };
    let r = backup_vm(&with(hooks, "g1"), &db.moref).await;
    assert!(r.error.is_none() && r.point.is_some(), "{r:?}");
    let runs: Vec<String> = sim.guest_runs("db").unwrap().iter().map(|g| g.arguments.clone()).collect();
    assert_eq!(runs, ["--freeze", "--thaw"]);
    let hooks = Hooks { pre_freeze: Some(in_guest("/bin/false", "", 5000, &auth)), post_thaw: None };
    let r = backup_vm(&with(hooks, "g2"), &db.moref).await;
    assert!(r.error.as_deref().is_some_and(|e| e.contains("exited with 1")), "{r:?}");
    let hooks = Hooks { pre_freeze: Some(in_guest("/bin/sleep", "30", 300, &auth)), post_thaw: None };
    let r = backup_vm(&with(hooks, "g3"), &db.moref).await;
    assert!(r.error.as_deref().is_some_and(|e| e.contains("ran longer than")), "{r:?}");
    assert!(sim.guest_runs("db").unwrap().last().unwrap().terminated, "the slow program was ended");
    let wrong = vsphere::guest::GuestAuth { user: "root".into(), password: vsphere::Secret::new("not-it") };
    let hooks = Hooks { pre_freeze: Some(in_guest("/bin/true", "", 5000, &wrong)), post_thaw: None };
    let r = backup_vm(&with(hooks, "g4"), &db.moref).await;
    let e = r.error.clone().unwrap_or_default();
    assert!(e.contains("InvalidGuestLogin") || e.contains("authenticate"), "{r:?}");
    assert!(!e.contains("not-it") && !format!("{r:?}").contains("not-it"), "no password in errors");
    let hooks = Hooks { pre_freeze: Some(in_guest("/bin/true", "", 5000, &auth)), post_thaw: None };
    let r = backup_vm(&with(hooks, "g5"), &notools.moref).await;
    assert!(r.error.as_deref().is_some_and(|e| e.contains("Tools")), "{r:?}");
    assert_eq!(snapshots().await, 0);
    assert!(guest_credentials(&dir.path().join("missing")).is_err());
}

/// The newest restore point's disk `n` of `vm` holds `want` at `offset`.
fn point_holds(repo: &Repo, point: &str, n: usize, offset: u64, want: &[u8]) {
    let got = repo.reader(point, n).unwrap().read(offset, want.len() as u64).unwrap();
    assert!(got == want, "{point} disk {n} at {offset} differs");
}

/// Trust, item 1: a 256 GiB thin disk on an ESXi 6.5 host gets an incremental on its second
/// backup (the host's version is known, so the first sighting is not tainted), and again on
/// the second backup after a CBT reset (the reset's full copy never re-taints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_gib_disk_on_esxi_6_5_gets_incrementals_before_and_after_a_cbt_reset() {
    let head = "user = \"backup@vsphere.local\"\npassword = \"s3cret\"\n[[datacenter]]\nname = \"DC1\"\n\
                [[datacenter.host]]\nname = \"esx65\"\nversion = \"6.5.0\"\n";
    let cfg = Config::from_toml(&format!(
        "{head}[[datacenter.datastore]]\nname = \"ds1\"\n[[datacenter.vm]]\nname = \"big\"\ncbt = true\n\
         [[datacenter.vm.disk]]\ncapacity = {}\n",
        256u64 << 30
    ))
    .unwrap();
    let (dir, sim, client) = start_with(cfg).await;
    let repo = Repo::init(dir.path().join("repo"), 4 << 20).unwrap();
    let big = client.vms().await.unwrap().into_iter().find(|v| v.name == "big").unwrap();
    let key = big.disks[0].key;
    let (a, b) = (noise(MIB as usize, 1), noise(4096, 2));
    sim.write("big", key, 0, &a).unwrap();
    sim.write("big", key, 200 << 30, &a).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b1"), &big.moref).await;
    assert!(r.error.is_none() && r.disks[0].full, "{r:?}");
    assert!(!r.warnings.iter().any(|w| w.contains("2090639")), "the host's version is known: {r:?}");
    sim.write("big", key, 100 << 30, &b).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b2"), &big.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(!r.disks[0].full && r.disks[0].plan == "incremental", "{r:?}");
    assert_eq!(r.disks[0].read, CBT_UNIT, "one area changed: read it, not its chunk");
    point_holds(&repo, r.point.as_deref().unwrap(), 0, 100 << 30, &b);

    let marks = [repo.store().clone()];
    orchestration::cbt_reset::cbt_reset(&client, &big.moref, &marks).await.unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b3"), &big.moref).await;
    assert!(r.error.is_none() && r.disks[0].full && r.disks[0].plan.contains("cbt-reset"), "{r:?}");
    sim.write("big", key, 50 << 30, &b).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "b4"), &big.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(!r.disks[0].full, "the reset's new epoch is clean: {r:?}");
    let point = r.point.unwrap();
    for (offset, data) in [(0, &a[..]), (200 << 30, &a[..]), (100 << 30, &b[..]), (50 << 30, &b[..])] {
        point_holds(&repo, &point, 0, offset, data);
    }
}

/// Trust, item 2: a run that has to turn CBT on copies every disk in full (what was written
/// while CBT was off is in no change set), and a change ID handed back unchanged under a new
/// snapshot (a vCenter restart) is a full copy with its reason, never an empty incremental.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_turned_on_or_a_repeated_change_id_means_a_full_copy() {
    let cfg = estate_with(
        "[[datacenter.datastore]]\nname = \"ds1\"\n[[datacenter.vm]]\nname = \"cold\"\ncbt = true\n\
         power = \"poweredOff\"\n[[datacenter.vm.disk]]\ncapacity = 8388608\n",
    );
    let (dir, sim, client) = start_with(cfg).await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let cold = client.vms().await.unwrap().into_iter().find(|v| v.name == "cold").unwrap();
    let key = cold.disks[0].key;
    sim.write("cold", key, 0, &noise(2 * MIB as usize, 3)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "c1"), &cold.moref).await;
    assert!(r.error.is_none(), "{r:?}");

    // CBT off (the ctk file stays, as on a powered-off VM), a write nobody tracks, CBT found
    // off by the next backup and turned on again: the old epoch resumes, blind to the write.
    client.set_change_tracking(&cold.moref, false).await.unwrap();
    sim.write("cold", key, 5 * MIB, &noise(4096, 4)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "c2"), &cold.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("CBT was off")), "{r:?}");
    assert!(r.disks[0].full && r.disks[0].plan.contains("turned it on"), "{r:?}");
    restores_match(&sim, &client, &repo, "cold", r.point.as_deref().unwrap()).await;
    // Then ordinary incrementals again.
    sim.write("cold", key, 6 * MIB, &noise(4096, 5)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "c3"), &cold.moref).await;
    assert!(r.error.is_none() && !r.disks[0].full && r.disks[0].read == CBT_UNIT, "{r:?}");
    restores_match(&sim, &client, &repo, "cold", r.point.as_deref().unwrap()).await;

    // A restart hands back the committed change ID under the next snapshot, the changes lost.
    sim.write("cold", key, 7 * MIB, &noise(4096, 6)).unwrap();
    sim.faults(|f| f.repeat_change_id = true);
    let r = backup_vm(&ctx(&client, &repo, "c4"), &cold.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert!(r.disks[0].full && r.disks[0].plan.contains("change ID of the previous copy"), "{r:?}");
    restores_match(&sim, &client, &repo, "cold", r.point.as_deref().unwrap()).await;
}

/// Trust, item 3: a proxy killed after `CreateSnapshot` and before its first checkpoint left
/// its snapshot and intent record, and no live lease: the next run removes the snapshot at
/// once, whatever its age, and backs the VM up. A snapshot of a job that recorded no intent
/// here (another target's) is still guarded by `--max-job`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_jobs_young_snapshot_is_removed_at_once_when_its_intent_is_recorded() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.write("web", web.disks[0].key, 0, &noise(MIB as usize, 5)).unwrap();
    let intent = orchestration::intent::Intent {
        job: "test-proxy-dead".into(),
        vm: web.moref.value.clone(),
        vm_name: "web".into(),
        snapshot: "syncproxy-test-proxy-dead".into(),
        host: "here".into(),
        pid: 1,
        time: String::new(),
    };
    orchestration::intent::record(&**repo.store(), &intent).unwrap();
    client.create_snapshot(&web.moref, "syncproxy-test-proxy-dead", "left", false, None).await.unwrap();
    let r = backup_vm(&ctx(&client, &repo, "next"), &web.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.stale_removed, ["syncproxy-test-proxy-dead"], "{r:?}");
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()));
    assert!(orchestration::intent::jobs_on(&**repo.store(), &web.moref.value).unwrap().is_empty(), "records forgotten");
    restores_match(&sim, &client, &repo, "web", r.point.as_deref().unwrap()).await;

    // No record here: another target's job, which may be alive; left until --max-job.
    client.create_snapshot(&web.moref, "syncproxy-elsewhere-job", "", false, None).await.unwrap();
    let r = backup_vm(&ctx(&client, &repo, "next2"), &web.moref).await;
    assert!(r.error.is_some() && r.stale_removed.is_empty(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("left for now")), "{r:?}");
}

/// Trust, item 4: `CreateSnapshot_Task` that times out while the server still makes the
/// snapshot: the job finds it by name, removes it, and says so; never "removed" when it was
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_made_after_its_creation_timed_out_is_found_and_removed() {
    let (dir, sim, client) = start_timed(estate(), Duration::from_secs(2)).await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.faults(|f| f.late_answer = Some(("CreateSnapshot_Task".into(), Duration::from_secs(5))));
    let r = backup_vm(&ctx(&client, &repo, "slow"), &web.moref).await;
    assert!(r.error.is_some() && r.point.is_none(), "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains("was made although its creation failed")), "{r:?}");
    assert!(r.snapshot_removed, "{r:?}");
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()), "nothing left");

    // The snapshot appears only after the call went unanswered (its task still runs): the job
    // finds the task in the VM's recent tasks, waits for it, and removes what it made.
    sim.faults(|f| {
        f.late_answer = Some(("CreateSnapshot_Task".into(), Duration::from_secs(5)));
        f.task_delay = Duration::from_secs(3);
    });
    let r = backup_vm(&ctx(&client, &repo, "slower"), &web.moref).await;
    assert!(r.error.is_some(), "{r:?}");
    assert!(r.snapshot_removed && r.warnings.iter().any(|w| w.contains("was made although")), "{r:?}");
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()), "nothing left");
    sim.faults(|f| f.task_delay = Duration::ZERO);
    let r = backup_vm(&ctx(&client, &repo, "after"), &web.moref).await;
    assert!(r.error.is_none() && r.stale_removed.is_empty(), "{r:?}");
}

/// Trust, item 5: two jobs of one process that name the same VM at once: the second waits for
/// the first, then runs; neither fails on the other's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_naming_one_vm_take_turns() {
    let (dir, sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let web = client.vms().await.unwrap().into_iter().find(|v| v.name == "web").unwrap();
    sim.write("web", web.disks[0].key, 0, &noise(4 * MIB as usize, 7)).unwrap();
    sim.faults(|f| f.datastore_delay = Duration::from_millis(100));
    let limits = Arc::new(orchestration::Limits::default());
    let a = builder(&client, &repo, "ja").limits(limits.clone()).build();
    let b = builder(&client, &repo, "jb").limits(limits).build();
    let refs = [web.moref.clone()];
    let (ra, rb) = tokio::join!(run_job(&a, &refs, 1), run_job(&b, &refs, 1));
    for r in [ra.unwrap(), rb.unwrap()] {
        assert_eq!(r.outcome(), Outcome::All, "{r:?}");
    }
    assert_eq!(repo.points().unwrap().len(), 2);
}

/// Trust, item 6: a job naming a VM that does not exist protects the others and reports the
/// missing one as a failure of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_vm_fails_alone_and_the_others_are_backed_up() {
    let (dir, _sim, client) = start().await;
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    let sel = [Selector::parse("web"), Selector::parse("deleted-vm"), Selector::parse("db")];
    let s = orchestration::select(&client, &sel, false).await.unwrap();
    assert_eq!(s.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["web", "db"]);
    assert_eq!(s.missing.len(), 1);
    let c = ctx(&client, &repo, "m1");
    let mut report = run_job(&c, &s.morefs(), 2).await.unwrap();
    orchestration::report_missing(&c, &mut report, &s.missing);
    assert_eq!(report.outcome(), Outcome::Some, "{report:?}");
    let failed: Vec<_> = report.vms.iter().filter(|v| v.error.is_some()).collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].error.as_deref().unwrap().contains("deleted-vm") && failed[0].vm == "deleted-vm", "{failed:?}");
    assert_eq!(c.metrics().snapshot().vms_failed, 1);
    assert_eq!(repo.points().unwrap().len(), 2);
}
