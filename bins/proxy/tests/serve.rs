//! `proxy serve` and `proxy config check` against the project's vSphere simulator: stale
//! snapshots of a dead job removed at start, jobs run on request through the HTTP endpoint
//! (status, history and metrics behind a bearer token), a prune after each backup, a replica
//! job beside it, and SIGTERM mid-copy: exit 0, no snapshot left, the history kept.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use repo::Repo;
use testkit::noise;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimTls};

const MIB: usize = 1 << 20;
const TOKEN: &str = "a-long-enough-test-token";

/// One HTTP/1.1 request; the status and the body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn status(addr: &str) -> serde_json::Value {
    let (code, body) = http(addr, "GET", "/status", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn last_outcome(addr: &str, job: &str) -> Option<String> {
    let s = status(addr);
    let j = s["jobs"].as_array()?.iter().find(|j| j["name"] == job)?.clone();
    j["last"]["outcome"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_jobs_serves_status_and_stops_cleanly() {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sim = Sim::start(Config::small(2, 8 << 20), &d.join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let client = Arc::new(Client::connect(&opts).await.unwrap());
    client
        .login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") })
        .await
        .unwrap();
    let vms = client.vms().await.unwrap();
    for (i, v) in vms.iter().enumerate() {
        sim.write(&v.name, v.disks[0].key, 0, &noise(4 * MIB, i as u64 + 1)).unwrap();
    }
    // A dead job of ours left a snapshot two days ago.
    client.create_snapshot(&vms[0].moref, "syncproxy-p1-olddead", "left", false, None).await.unwrap();
    sim.age_snapshot(&vms[0].name, "syncproxy-p1-olddead", Duration::from_secs(48 * 3600)).unwrap();

    Repo::init(d.join("repo"), 1 << 20).unwrap();
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(d.join("pw"), "simulated\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        r#"
[proxy]
id = "p1"
listen = "{addr}"
token_file = "{token}"
state_dir = "{state}"
max_vms = 10
per_datastore = 4
log_format = "json"

[[vcenter]]
name = "sim"
url = "{url}"
user = "backup@vsphere.local"
password_file = "{pw}"
thumbprint = "{thumb}"

[[job]]
name = "nightly"
vcenter = "sim"
all = true
schedule = "every 6h"
repository = "{repo}"
retention = {{ keep_last = 1 }}

[[job]]
name = "dr"
vcenter = "sim"
vms = ["{vm0}"]
schedule = "daily 03:00"
replica = "{replicas}"
"#,
        token = d.join("token").display(),
        state = d.join("state").display(),
        url = sim.url(),
        pw = d.join("pw").display(),
        thumb = Thumbprint::sha256_of(sim.certificate().unwrap()),
        repo = d.join("repo").display(),
        vm0 = vms[0].name,
        replicas = d.join("replicas").display(),
    );
    let cfg = d.join("proxy.toml");
    std::fs::write(&cfg, &config).unwrap();

    // config check: usable, each job and its next run listed; a broken one names its problem.
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(&cfg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("job nightly: backs up to") && text.contains("next run"), "{text}");
    let bad = d.join("bad.toml");
    std::fs::write(&bad, config.replace("every 6h", "weekly")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nightly") && err.contains("weekly"), "{err}");

    let mut daemon = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for("the endpoint", || TcpStream::connect(&addr).is_ok()).await;
    // Startup removed the dead job's snapshot.
    let c2 = client.clone();
    let mut gone = false;
    for _ in 0..200 {
        if c2.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the stale snapshot was removed at startup");

    // Without the token: 401.
    assert_eq!(http(&addr, "GET", "/status", None).0, 401);
    assert_eq!(http(&addr, "GET", "/metrics", Some("wrong-token-of-some-length")).0, 401);

    // Run the backup job twice; the prune keeps one restore point per VM.
    for round in 1..=2 {
        let (code, body) = http(&addr, "POST", "/jobs/nightly/run", Some(TOKEN));
        assert_eq!(code, 202, "{body}");
        let a = addr.clone();
        wait_for("the backup job", move || {
            let h = http(&a, "GET", "/history", Some(TOKEN)).1;
            serde_json::from_str::<serde_json::Value>(&h).unwrap().as_array().unwrap().len() >= round
        })
        .await;
        assert_eq!(last_outcome(&addr, "nightly").as_deref(), Some("succeeded"), "{}", status(&addr));
    }
    let repo = Repo::open(d.join("repo")).unwrap();
    assert_eq!(repo.points().unwrap().len(), 2, "keep_last = 1 per VM");
    assert!(repo.verify().unwrap().damaged_points.is_empty());

    // The replica job.
    assert_eq!(http(&addr, "POST", "/jobs/dr/run", Some(TOKEN)).0, 202);
    assert_eq!(http(&addr, "POST", "/jobs/nosuch/run", Some(TOKEN)).0, 404);
    let a = addr.clone();
    wait_for("the replica job", move || last_outcome(&a, "dr").is_some()).await;
    assert_eq!(last_outcome(&addr, "dr").as_deref(), Some("succeeded"), "{}", status(&addr));
    let (code, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN));
    assert_eq!(code, 200);
    for want in [
        "syncproxy_disks_copied_total 5",
        "syncproxy_disks_copying_peak ",
        "syncproxy_job_last_succeeded{job=\"dr\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }

    // SIGTERM mid-copy: it stops, removes the snapshot and exits 0.
    sim.faults(|f| f.datastore_delay = Duration::from_millis(300));
    sim.write(&vms[1].name, vms[1].disks[0].key, 0, &noise(4 * MIB, 9)).unwrap();
    assert_eq!(http(&addr, "POST", "/jobs/nightly/run", Some(TOKEN)).0, 202);
    let a = addr.clone();
    wait_for("a disk in the copy phase", move || status(&a)["disks_copying"].as_u64().unwrap_or(0) > 0).await;
    let pid = daemon.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "exit {exit:?}");
    sim.faults(|f| f.datastore_delay = Duration::ZERO);
    assert!(client.vms().await.unwrap().iter().all(|v| v.snapshots.is_empty()), "no snapshot left");
    assert!(repo.verify().unwrap().damaged_points.is_empty());
    let history = std::fs::read_to_string(d.join("state/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 4, "three finished runs and the interrupted one: {history}");
    assert!(!history.contains("simulated"), "no password in the history");
    let log = std::fs::read_to_string(d.join("daemon.log")).unwrap();
    let first = log.lines().next().unwrap_or_default();
    assert!(serde_json::from_str::<serde_json::Value>(first).is_ok(), "JSON log lines: {first}");
    assert!(log.contains("removed stale snapshot") && log.contains("SIGTERM"), "{log}");
    assert!(!log.contains("simulated") && !log.contains(TOKEN), "no secret in the log");
}
