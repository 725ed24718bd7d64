//! The per-VM backup flow end to end against the project's vSphere simulator: full then
//! incremental backups of multi-disk VMs over HTTPS datastore reads, restores byte for byte
//! against the simulator's disks, the configuration file captured, a CBT reset forcing full
//! copies, a failing snapshot task, a session expiring mid-job, and never a snapshot left.

#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::sync::Arc;
use std::time::Duration;

use orchestration::{JobContext, backup_vm};
use pipeline::{CopyOptions, Engine};
use repo::Repo;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Trust};
use vsphere_sim::{Config, Sim, SimFault, SimTls};

const MIB: u64 = 1 << 20;

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
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(estate(), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("s3cret") }).await.unwrap();
    (dir, sim, Arc::new(c))
}

/// Pseudo-random data, `len` bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn ctx(client: &Arc<Client>, repo: &Repo, job: &str) -> JobContext {
    JobContext {
        client: client.clone(),
        repo: repo.clone(),
        datacenter: "DC1".into(),
        proxy_id: "test-proxy".into(),
        job_id: job.into(),
        engine: Arc::new(Engine::new(64 * MIB)),
        options: CopyOptions::default(),
    }
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
        assert_eq!(m.files.len(), 1, "the .vmx is captured");
        assert!(String::from_utf8(repo.file(&m, &m.files[0].name).unwrap()).unwrap().contains(&v.name));
        firsts.push(point);
    }

    // 1 % of db's first disk changes; the second run copies only that.
    let db = vms.iter().find(|v| v.name == "db").unwrap();
    sim.write("db", db.disks[0].key, 5 * MIB + 100, &noise(160 << 10, 77)).unwrap();
    let r = backup_vm(&ctx(&client, &repo, "job2"), &db.moref).await;
    assert!(r.error.is_none(), "{r:?}");
    assert_eq!(r.disks.iter().map(|d| d.full).collect::<Vec<_>>(), [false, false], "{r:?}");
    assert_eq!(r.disks[0].read, MIB, "the one changed chunk: {r:?}");
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
