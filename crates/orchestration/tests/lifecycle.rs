//! The job lifecycle every caller runs, against the project's vSphere simulator: a login
//! refused with a typed error that never carries the password; a selector that finds no VM
//! reported as a failure of its own while the others are backed up; and a run abandoned
//! mid-copy whose snapshot is swept all the same.

use std::sync::Arc;
use std::time::Duration;

use orchestration::hooks::Hooks;
use orchestration::{
    Buffers, DiskFilter, Job, JobEvent, JobSpec, Login, OrchError, Outcome, SNAPSHOT_PREFIX, Selector, Target,
};
use pipeline::Engine;
use pipeline::limit::RateLimiter;
use repo::Repo;
use vsphere::{ConnectOptions, Credentials, Secret, Trust};
use vsphere_sim::{Config, Sim, SimTls};

const MIB: u64 = 1 << 20;

async fn start() -> (tempfile::TempDir, Sim, Repo) {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(Config::small(1, 16 * MIB), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let repo = Repo::init(dir.path().join("repo"), 1 << 20).unwrap();
    (dir, sim, repo)
}

fn login(sim: &Sim, password: &str) -> Login {
    Login {
        options: ConnectOptions {
            trust: Trust::Insecure,
            timeout: Duration::from_secs(20),
            ..ConnectOptions::new(&sim.url())
        },
        credentials: Credentials { user: "backup@vsphere.local".into(), password: Secret::new(password) },
    }
}

fn spec(login: Login, vms: &[&str], engine: Arc<Engine>) -> JobSpec {
    JobSpec {
        login,
        selectors: vms.iter().map(|v| Selector::parse(v)).collect(),
        all: false,
        proxy_id: "test-proxy".into(),
        job_id: "j1".into(),
        concurrency: 4,
        buffers: Buffers::Shared(engine),
        options: None,
        limits: None,
        metrics: None,
        max_job: Duration::from_secs(3600),
        disks: DiskFilter::default(),
        vddk: None,
        nbd: None,
        pin_drs: true,
        hooks: Hooks::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_typed_and_never_carries_the_password() {
    let (_dir, sim, repo) = start().await;
    let engine = Arc::new(Engine::new(64 * MIB));
    let err = Job::prepare(spec(login(&sim, "wrong-one"), &["vm00000"], engine), || {
        Ok::<_, OrchError>(Target::Repository(repo))
    })
    .await
    .unwrap_err();
    assert!(matches!(err, OrchError::LoginRefused { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("cannot log in to") && text.contains("backup@vsphere.local"), "{text}");
    assert!(!format!("{err:?}").contains("wrong-one"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_is_gone_fails_alone_and_the_others_are_backed_up() {
    let (_dir, sim, repo) = start().await;
    let engine = Arc::new(Engine::new(64 * MIB));
    let job = Job::prepare(spec(login(&sim, "simulated"), &["vm00000", "deleted-vm"], engine), || {
        Ok::<_, OrchError>(Target::Repository(repo.clone()))
    })
    .await
    .unwrap();
    assert_eq!(job.selection.vms.len(), 1);
    let mut events = Vec::new();
    let run = job
        .run(std::future::pending(), |e| {
            events.push(match e {
                JobEvent::Started { tag, vms, concurrency } => format!("started {tag} {vms} {concurrency}"),
                JobEvent::Copied => "copied".to_owned(),
            });
        })
        .await
        .unwrap();
    assert_eq!(events, ["started test-proxy-j1 1 4", "copied"]);
    assert!(!run.abandoned);
    assert_eq!(run.report.outcome(), Outcome::Some);
    let names: Vec<&str> = run.report.vms.iter().map(|v| v.vm.as_str()).collect();
    assert_eq!(names, ["vm00000", "deleted-vm"]);
    assert!(run.report.vms[0].error.is_none() && run.report.vms[0].point.is_some(), "{:?}", run.report.vms[0]);
    assert!(run.report.vms[1].error.as_deref().is_some_and(|e| e.contains("not backed up")));
    assert_eq!(repo.points().unwrap().len(), 1);
    let json = run.report.to_json(&job.ctx.metrics().snapshot());
    assert_eq!(json["outcome"], "some");
    assert_eq!(json["vms"][1]["result"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_run_still_sweeps_its_snapshot() {
    let (_dir, sim, repo) = start().await;
    // 16 MiB at 2 MiB/s: the copy is under way long enough to be abandoned mid-way.
    let mut engine = Engine::new(64 * MIB);
    engine.global_rate = Some(Arc::new(RateLimiter::new(2 * MIB)));
    let job = Job::prepare(spec(login(&sim, "simulated"), &["vm00000"], Arc::new(engine)), || {
        Ok::<_, OrchError>(Target::Repository(repo.clone()))
    })
    .await
    .unwrap();
    let disk = job.selection.vms[0].disks[0].key;
    sim.write("vm00000", disk, 0, &testkit::noise(16 << 20, 7)).unwrap();
    let client = job.ctx.client().clone();
    let vms = job.morefs();
    let ours = format!("{SNAPSHOT_PREFIX}-test-proxy-j1");
    let snapshot_taken = async {
        loop {
            let found = client.vms_by_moref(&vms).await.unwrap();
            if found.iter().any(|v| v.all_snapshots().iter().any(|s| s.name == ours)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let run = tokio::time::timeout(Duration::from_secs(60), job.run(snapshot_taken, |_| {})).await.unwrap().unwrap();
    assert!(run.abandoned);
    assert!(run.report.vms.is_empty(), "{:?}", run.report.vms);
    assert!(run.swept.iter().any(|s| s.contains(&ours)), "{:?}", run.swept);
    assert!(run.unswept.is_empty(), "{:?}", run.unswept);
    let after = client.vms_by_moref(&vms).await.unwrap();
    assert!(after.iter().all(|v| v.all_snapshots().is_empty()), "no snapshot left");
    assert!(repo.points().unwrap().is_empty(), "no restore point of an abandoned copy");
}
