//! `proxy serve` and `proxy config check` against the project's vSphere simulator: stale
//! snapshots of a dead job removed at start, jobs run on request through the HTTP endpoint
//! (status, history and metrics behind a bearer token), a prune after each backup, a replica
//! job beside it, and SIGTERM mid-copy: exit 0, no snapshot left, the history kept. Also the
//! endpoint against hostile clients (garbage, idle and slow connections, descriptor
//! exhaustion), a vCenter that never answers, and `config check` in one pass, side-effect free.
//! Drill jobs: a simulated VM holding the BIOS boot-disk fixture, backed up, then drilled on
//! request (passed and failed runs in the history, the metrics and the repository), and
//! SIGTERM mid-drill leaving no QEMU and no work folder.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use repo::Repo;
use testkit::noise;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimFault, SimTls};

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
gc_grace = "0s"

[[job]]
name = "dr"
vcenter = "sim"
vms = ["{vm0}"]
schedule = "daily 03:00"
replica = "{replicas}"
retries = 1
retry_delay = "1s"

[[job]]
name = "partly-gone"
vcenter = "sim"
vms = ["deleted-vm", "{vm1}"]
schedule = "daily 04:00"
repository = "{repo}"
retries = 1
retry_delay = "1s"
"#,
        token = d.join("token").display(),
        state = d.join("state").display(),
        url = sim.url(),
        pw = d.join("pw").display(),
        thumb = Thumbprint::sha256_of(sim.certificate().unwrap()),
        repo = d.join("repo").display(),
        vm0 = vms[0].name,
        vm1 = vms[1].name,
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

    let mut daemon = serve(&cfg, &d.join("daemon.log"));
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

    // Run the backup job twice, the disks changed between; the prune keeps one restore point
    // per VM, and the gc after it frees the chunks only the pruned points held.
    for round in 1..=2 {
        if round == 2 {
            for (i, v) in vms.iter().enumerate() {
                sim.write(&v.name, v.disks[0].key, 0, &noise(4 * MIB, i as u64 + 50)).unwrap();
            }
        }
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
    let (_, history) = http(&addr, "GET", "/history", Some(TOKEN));
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    let upkeep = &history.as_array().unwrap()[1]["upkeep"];
    assert_eq!(upkeep["pruned"].as_array().map(Vec::len), Some(2), "{upkeep}");
    let removed = upkeep["gc"]["chunks_removed"].as_u64().unwrap_or(0);
    assert!(removed >= 8, "the first points' 4 MiB per VM in 1 MiB chunks freed: {upkeep}");
    let chunk_files = testkit::files_under(&d.join("repo/chunks"));
    assert_eq!(Some(chunk_files.len() as u64), upkeep["gc"]["chunks_in_use"].as_u64(), "only chunks in use: {upkeep}");

    // The replica job, run as an operator would: `proxy job run`, then `proxy status`. Its
    // snapshot fails the first time; the VM is tried again a second later and succeeds.
    sim.faults(|f| f.fail_next_task = Some(SimFault::new("NoDiskSpace", "no room for the delta")));
    let out =
        Command::new(env!("CARGO_BIN_EXE_proxy")).args(["job", "run", "dr", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("queued"), "{out:?}");
    assert_eq!(http(&addr, "POST", "/jobs/nosuch/run", Some(TOKEN)).0, 404);
    let a = addr.clone();
    wait_for("the replica job", move || last_outcome(&a, "dr").is_some()).await;
    assert_eq!(last_outcome(&addr, "dr").as_deref(), Some("succeeded"), "{}", status(&addr));
    let dr = run_of(&addr, "dr", Duration::from_secs(1)).await;
    assert_eq!(dr["vms"][0]["attempts"], 2, "{dr}");
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["status", "--config"]).arg(&cfg).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let dr = table.lines().find(|l| l.starts_with("dr ")).unwrap_or_else(|| panic!("a row for dr: {table}"));
    assert!(dr.contains("daily 03:00") && dr.contains("idle") && dr.contains("succeeded at"), "{table}");
    let (code, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN));
    assert_eq!(code, 200);
    for want in [
        "syncproxy_disks_copied_total 5",
        "syncproxy_disks_copying_peak ",
        "syncproxy_job_last_succeeded{job=\"dr\"} 1",
    ] {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }
    // A job naming a deleted VM: the other VM is backed up, the missing one fails alone.
    assert_eq!(http(&addr, "POST", "/jobs/partly-gone/run", Some(TOKEN)).0, 202);
    let a = addr.clone();
    wait_for("the job naming a deleted VM", move || last_outcome(&a, "partly-gone").is_some()).await;
    assert_eq!(last_outcome(&addr, "partly-gone").as_deref(), Some("partial"), "{}", status(&addr));
    let (_, history) = http(&addr, "GET", "/history", Some(TOKEN));
    assert!(history.contains(r#""vm":"deleted-vm""#) && history.contains(&vms[1].name), "{history}");
    let gone = run_of(&addr, "partly-gone", Duration::from_secs(1)).await;
    let tries: Vec<_> =
        gone["vms"].as_array().unwrap().iter().map(|v| (v["vm"].clone(), v["attempts"].clone())).collect();
    assert!(
        tries.contains(&(serde_json::json!("deleted-vm"), serde_json::json!(2))),
        "only the failed VM retried: {gone}"
    );
    assert!(tries.contains(&(serde_json::json!(vms[1].name), serde_json::json!(1))), "{gone}");
    let (_, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN));
    // Every failed attempt counts: dr's first, and the deleted VM's two.
    assert!(metrics.contains("syncproxy_vms_failed_total 3"), "{metrics}");

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
    assert_eq!(history.lines().count(), 5, "four finished runs and the interrupted one: {history}");
    assert!(!history.contains("simulated"), "no password in the history");
    let log = std::fs::read_to_string(d.join("daemon.log")).unwrap();
    let first = log.lines().next().unwrap_or_default();
    assert!(serde_json::from_str::<serde_json::Value>(first).is_ok(), "JSON log lines: {first}");
    // Fields are values, not Rust's debug text, and a file gets no colour codes.
    assert!(!log.contains("Some(") && !log.contains("\\u001b[") && !log.contains('\u{1b}'), "{log}");
    let done = log.lines().find(|l| l.contains("\"done\"")).expect("a VM's done line");
    let done: serde_json::Value = serde_json::from_str(done).unwrap();
    assert!(done["fields"]["point"].as_str().is_some_and(|p| !p.is_empty() && p != "none"), "{done}");
    assert!(log.contains("removed stale snapshot") && log.contains("SIGTERM"), "{log}");
    assert!(!log.contains("simulated") && !log.contains(TOKEN), "no secret in the log");

    // A restart remembers: the history, each job's last result, when each job and each VM last
    // succeeded. An alert on them does not resolve itself because the daemon restarted.
    let mut daemon = serve(&cfg, &d.join("daemon2.log"));
    wait_for("the endpoint after a restart", || TcpStream::connect(&addr).is_ok()).await;
    let (_, history) = http(&addr, "GET", "/history", Some(TOKEN));
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 5, "{history}");
    assert_eq!(last_outcome(&addr, "dr").as_deref(), Some("succeeded"), "{}", status(&addr));
    assert_eq!(last_outcome(&addr, "partly-gone").as_deref(), Some("partial"), "{}", status(&addr));
    let (_, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN));
    for want in [
        "syncproxy_job_last_succeeded{job=\"dr\"} 1".to_owned(),
        "syncproxy_job_last_succeeded{job=\"nightly\"} 0".to_owned(),
        "syncproxy_job_last_success_timestamp_seconds{job=\"nightly\"} ".to_owned(),
        "syncproxy_job_last_run_duration_seconds{job=\"dr\"} ".to_owned(),
        format!("syncproxy_vm_restore_point_age_seconds{{job=\"nightly\",vm=\"{}\"}} ", vms[0].name),
        format!("syncproxy_vm_last_success_timestamp_seconds{{job=\"partly-gone\",vm=\"{}\"}} ", vms[1].name),
    ] {
        assert!(metrics.contains(&want), "{want} in\n{metrics}");
    }
    assert!(!metrics.contains("vm=\"deleted-vm\""), "a VM that failed has no good point: {metrics}");
    let pid = daemon.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "exit {exit:?}");
}

/// `proxy serve --config CFG`, its log in `log`.
fn serve(cfg: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_proxy"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A `proxy serve` started for one test, killed when the test ends.
struct Daemon {
    child: std::process::Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Writes a configuration in `d` (a token, `[proxy]` with `extra` lines, which may go on
    /// with tables such as `[[drill]]`, and a vCenter at `vcenter` with a job when given) and starts the daemon on it, under `wrapper` when given
    /// (`prlimit --nofile=...`).
    fn start(d: &std::path::Path, extra: &str, vcenter: Option<&str>, wrapper: &[&str]) -> Self {
        std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(d.join("pw"), "simulated\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "[proxy]\nid = \"p1\"\nlisten = \"{addr}\"\ntoken_file = \"{}\"\nstate_dir = \"{}\"\n{extra}\n",
            d.join("token").display(),
            d.join("state").display()
        );
        if let Some(url) = vcenter {
            config.push_str(&format!(
                "[[vcenter]]\nname = \"vc\"\nurl = \"{url}\"\nuser = \"u\"\npassword_file = \"{}\"\ninsecure = true\n\n\
                 [[job]]\nname = \"nightly\"\nvcenter = \"vc\"\nall = true\nschedule = \"daily 03:00\"\nrepository = \"{}\"\n",
                d.join("pw").display(),
                d.join("repo").display()
            ));
        }
        let cfg = d.join("proxy.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = d.join("daemon.log");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_proxy"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_proxy")),
        };
        let child = cmd
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let daemon = Self { child, addr, log };
        for _ in 0..200 {
            if TcpStream::connect(&daemon.addr).is_ok() {
                return daemon;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not listen: {}", daemon.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for the daemon to exit.
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Sends `request` as is; the status (0 when the server closed without answering) and the
/// whole response. Gives up after 10 seconds.
fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no answer to {:?}: {e}", String::from_utf8_lossy(&request[..request.len().min(80)])),
        }
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

/// Whether the server closed `s` within `limit` (end of stream or reset, not a timeout).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn malformed_requests_get_4xx_and_never_panic_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    // The vCenter refuses connections: the job fails fast, which is not what this test is about.
    let daemon = Daemon::start(dir.path(), "", Some("https://127.0.0.1:1/sdk"), &[]);
    let a = daemon.addr.as_str();
    let req = |method: &str, path: &str, auth: &str| {
        raw(a, format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
    };
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    // Paths that look like a job's run, but name none.
    for path in ["/jobs/run", "/jobs//run", "/jobs/run/run", "/jobs/", "/jobs/nightly/run/", "/jobs/%ff%00/run", "/"] {
        let (code, out) = req("POST", path, &auth);
        assert_eq!(code, 404, "POST {path}: {out}");
    }
    // The scheme's name is case-insensitive (RFC 7235).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (code, out) = req("GET", "/status", &format!("Authorization: {scheme} {TOKEN}\r\n"));
        assert_eq!(code, 200, "{scheme}: {out}");
    }
    assert_eq!(req("POST", "/jobs/nightly/run", &format!("Authorization: bearer {TOKEN}\r\n")).0, 202);
    // Credentials that are not the token, or not a bearer token at all.
    for header in [
        "Authorization: Bearer\r\n".to_owned(),
        "Authorization: \r\n".to_owned(),
        format!("Authorization: Basic {TOKEN}\r\n"),
        format!("Authorization: Bearer{TOKEN}\r\n"),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
        format!("Authorization: Bearer {}\r\n", "é".repeat(20)),
    ] {
        let (code, out) = req("GET", "/status", &header);
        assert_eq!(code, 401, "{header:?}: {out}");
    }
    let (code, _) =
        raw(a, b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n");
    assert!(code == 401 || code == 400, "non-UTF-8 credentials: {code}");
    // Garbage, and a head too large: a 4xx or a close, never a hang.
    for garbage in [
        b"\x00\x01\x02 garbage \xff\r\n\r\n".to_vec(),
        b"GET /status HTTP/9.9\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        format!("GET /status HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 << 10)).into_bytes(),
    ] {
        let (code, out) = raw(a, &garbage);
        assert!(code == 0 || (400..500).contains(&code), "{code}: {out}");
    }
    assert_eq!(req("GET", "/status", &auth).0, 200, "still serving");
    let log = daemon.log();
    assert!(!log.contains("panicked"), "no worker panicked: {log}");
}

#[test]
fn idle_connections_past_the_cap_wait_are_closed_and_status_still_answers() {
    const CAP: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("http_connections = {CAP}\nhttp_header_timeout = \"500ms\"\nhttp_idle_timeout = \"1s\"");
    let daemon = Daemon::start(dir.path(), &extra, None, &[]);
    let a = daemon.addr.as_str();
    // Connections that never send a byte, and one that sends its head a byte at a time.
    let mut idle: Vec<TcpStream> = (0..CAP + 50).map(|_| TcpStream::connect(a).unwrap()).collect();
    let mut slow = TcpStream::connect(a).unwrap();
    let trickle = std::thread::spawn(move || {
        for b in b"GET /status HTTP/1.1\r\nHost: x\r\n".iter().cycle().take(200) {
            if slow.write_all(&[*b]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    let t = std::time::Instant::now();
    let (code, out) = http(a, "GET", "/status", Some(TOKEN));
    assert_eq!(code, 200, "{out}");
    assert!(t.elapsed() < Duration::from_secs(20), "/status answered after {:?}", t.elapsed());
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(closed_within(s, Duration::from_secs(10)), "idle connection {i} is still open");
    }
    assert!(trickle.join().unwrap(), "a head sent a byte at a time was cut off");
    assert_eq!(http(a, "GET", "/status", Some(TOKEN)).0, 200);
}

#[test]
fn accept_errors_back_off_and_the_daemon_recovers() {
    let Some(prlimit) = testkit::require_tool("prlimit", "accept_errors_back_off_and_the_daemon_recovers") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A cap above the descriptors the daemon may open: accepting fails with EMFILE.
    let extra = "http_connections = 1000\nhttp_header_timeout = \"2s\"\nhttp_idle_timeout = \"2s\"";
    let daemon = Daemon::start(dir.path(), extra, None, &[prlimit.to_str().unwrap(), "--nofile=64"]);
    let a = daemon.addr.as_str();
    let idle: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(a).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let complaints = daemon.log().matches("accepting an HTTP connection").count();
    assert!((1..=20).contains(&complaints), "{complaints} lines about accept errors in 1.5 s");
    // Once the idle connections time out, the endpoint serves again.
    let mut answered = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ =
            write!(s, "GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        if s.read_to_string(&mut out).is_ok() && out.starts_with("HTTP/1.1 200") {
            answered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(idle);
    assert!(answered, "/status answers again: {}", daemon.log().lines().take(20).collect::<Vec<_>>().join("\n"));
}

#[test]
fn a_vcenter_that_never_answers_holds_neither_the_endpoint_nor_sigterm() {
    // A "vCenter" that accepts connections and never says a word.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/sdk", hung.local_addr().unwrap());
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().take(16) {
            let _ = seen_tx.send(());
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), "", Some(&url), &[]);
    seen_rx.recv_timeout(Duration::from_secs(10)).expect("the startup sweep reached the vCenter");
    let t = std::time::Instant::now();
    let mut s = TcpStream::connect(&daemon.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "/status while the sweep hangs: {out:?} after {:?}", t.elapsed());
    assert!(Command::new("kill").args(["-TERM", &daemon.child.id().to_string()]).status().unwrap().success());
    let exit = daemon.wait(Duration::from_secs(10)).expect("SIGTERM stops the daemon within seconds");
    assert_eq!(exit.code(), Some(0), "the documented exit code: {}", daemon.log());
    assert!(daemon.log().contains("SIGTERM"), "{}", daemon.log());
}

/// `proxy ARGS` run to its end: exit code, stdout, stderr.
fn proxy(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn status_and_job_run_talk_to_the_daemon_without_curl() {
    // A vCenter that refuses connections: the job is queued behind its startup sweep (the
    // run itself is checked against the simulator in the test above).
    let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "", Some(&format!("https://{refused}/sdk")), &[]);
    let cfg = dir.path().join("proxy.toml");
    let cfg = cfg.to_str().unwrap();

    let (code, out, err) = proxy(&["status", "--config", cfg]);
    assert_eq!(code, Some(0), "{err}");
    let table = out.lines().find(|l| l.starts_with("nightly")).unwrap_or_else(|| panic!("a row for the job: {out}"));
    assert!(table.contains("daily 03:00") && table.contains("never run"), "{out}");
    assert!(out.contains("proxy p1"), "{out}");
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN), "the token is never printed");

    let (code, out, err) = proxy(&["job", "run", "nightly", "--config", cfg]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("queued"), "{out}");
    let (code, _, err) = proxy(&["job", "run", "nosuch", "--config", cfg]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no job \"nosuch\"") && err.contains("nightly"), "the choices are named: {err}");
    assert_eq!(proxy(&["job", "run", "../status", "--config", cfg]).0, Some(1), "a name that is a path");

    // No daemon: a clear error, exit 1.
    drop(daemon);
    let (code, _, err) = proxy(&["status", "--config", cfg]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is `proxy serve` running?"), "{err}");
}

#[test]
fn config_check_names_every_problem_at_once_and_creates_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("big-pw"), vec![b'x'; 1 << 20]).unwrap();
    let config = format!(
        r#"
[proxy]
token_file = "{d}/no-token"
state_dir = "{d}/state"
max_vms = 9223372036854775807
rate = "0"

[[vcenter]]
name = "vc"
url = "https://vc.example/sdk"
user = "u"
password_file = "{d}/big-pw"

[[vcenter]]
name = "leaky"
url = "https://admin:s3cret@vc.example/sdk"
user = "u"
password_file = "{d}/big-pw"

[[job]]
name = "nightly"
vcenter = "vc"
all = true
schedule = "daily 03:00"
repository = "{d}/new-repo"

[[job]]
name = "dr"
vcenter = "vc"
all = true
schedule = "every 1h"
replica = "{d}/new-replicas"
"#,
        d = d.display()
    );
    let cfg = d.join("proxy.toml");
    std::fs::write(&cfg, &config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in [
        "max_vms = 9223372036854775807",
        "rate = \"0\"",
        "must not carry credentials",
        "token_file",
        "larger than 64 KiB",
        "no repository at",
    ] {
        assert!(err.contains(want), "{want} in one pass:\n{err}");
    }
    assert!(!err.contains("s3cret"), "{err}");
    for made in ["new-repo", "new-replicas", "state"] {
        assert!(!d.join(made).exists(), "config check created {made}");
    }

    // Usable (the replica folder is made by the first run, not by the check), but the token
    // file is readable by others: a warning naming it, exit 0.
    Repo::init(d.join("repo"), 1 << 20).unwrap();
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(d.join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(d.join("pw"), "pw\n").unwrap();
    std::fs::set_permissions(d.join("pw"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = format!(
        "[proxy]\ntoken_file = \"{d}/token\"\nstate_dir = \"{d}/state\"\n\n[[vcenter]]\nname = \"vc\"\n\
         url = \"https://vc.example/sdk\"\nuser = \"u\"\npassword_file = \"{d}/pw\"\n\n[[job]]\nname = \"n\"\n\
         vcenter = \"vc\"\nall = true\nschedule = \"daily 03:00\"\nrepository = \"{d}/repo\"\n\n\
         [[job]]\nname = \"r\"\nvcenter = \"vc\"\nall = true\nschedule = \"every 1h\"\nreplica = \"{d}/replicas\"\n",
        d = d.display()
    );
    std::fs::write(&cfg, good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let token = d.join("token").display().to_string();
    assert!(err.contains("warning") && err.contains(&token) && err.contains("chmod 600"), "{err}");
    assert!(!err.contains(&d.join("pw").display().to_string()), "no warning for a private file: {err}");
    assert!(!err.contains(TOKEN), "{err}");
    assert!(!d.join("replicas").exists() && !d.join("state").exists(), "config check created a folder");
}

/// A repository holding one restore point of a simulated VM ("bios") whose disk is the BIOS
/// boot-disk fixture, backed up with `proxy backup`; `None` (skipped loudly, failed under
/// CI) when QEMU or the fixture's packages are missing.
async fn bootable_point(d: &std::path::Path, test: &str) -> Option<(testkit::bootdisk::BootDisk, repo::Manifest)> {
    use testkit::bootdisk::{self, Variant};
    testkit::require_tool("qemu-system-x86_64", test)?;
    testkit::require_tool("qemu-img", test)?;
    let disk = bootdisk::require(Variant::Bios, test)?;
    vsphere::tls::install_crypto_provider();
    let toml = format!(
        "user = \"backup@vsphere.local\"\npassword = \"pw\"\n[[datacenter]]\nname = \"DC1\"\n\
         [[datacenter.host]]\nname = \"esx1\"\n[[datacenter.datastore]]\nname = \"ds1\"\n\
         [[datacenter.vm]]\nname = \"bios\"\ncbt = true\ncontroller = \"sata\"\nvmx_extra = '''\n{}'''\n\
         [[datacenter.vm.disk]]\nimage = \"{}\"\n",
        bootdisk::vmx_hardware(Variant::Bios),
        disk.path.display()
    );
    let sim = Sim::start(Config::from_toml(&toml).unwrap(), &d.join("sim"), SimTls::SelfSigned).await.unwrap();
    let thumbprint = Thumbprint::sha256_of(sim.certificate().unwrap()).to_string();
    Repo::init(d.join("repo"), 1 << 20).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_proxy"));
    c.args(["backup", "--url", &sim.url(), "--user", "backup@vsphere.local", "--thumbprint", &thumbprint])
        .arg(d.join("repo"))
        .arg("bios")
        .env("SYNCPROXY_PASSWORD", "pw");
    let out = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    assert!(
        out.status.success(),
        "backup: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let point = Repo::open(d.join("repo")).unwrap().points().unwrap().pop().unwrap();
    assert!(point.files.iter().any(|f| f.name.ends_with(".vmx")), "the .vmx was captured: {point:?}");
    Some((disk, point))
}

/// A `[[drill]]` of the repository in `d`, far from its next scheduled run.
fn drill_section(d: &std::path::Path, name: &str, expect: &str, timeout: &str) -> String {
    format!(
        "\n[[drill]]\nname = \"{name}\"\nrepository = \"{}\"\nschedule = \"every 24h\"\nvms = [\"bios\"]\n\
         timeout = \"{timeout}\"\nexpect = [\"{expect}\"]\n",
        d.join("repo").display()
    )
}

/// The first run of `job` in the daemon's history, once there (polled for up to `limit`).
async fn run_of(addr: &str, job: &str, limit: Duration) -> serde_json::Value {
    nth_run_of(addr, job, 1, limit).await
}

/// The `n`th run of `job` in the daemon's history, once there (polled for up to `limit`).
async fn nth_run_of(addr: &str, job: &str, n: usize, limit: Duration) -> serde_json::Value {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        let (code, body) = http(addr, "GET", "/history", Some(TOKEN));
        assert_eq!(code, 200, "{body}");
        let history: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(run) = history.as_array().unwrap().iter().filter(|r| r["job"] == job).nth(n - 1) {
            return run.clone();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("no run {n} of {job} in the history after {limit:?}");
}

/// The QEMU processes whose arguments name `dir`.
fn qemus_under(dir: &std::path::Path) -> String {
    let ps = Command::new("pgrep").args(["-a", "-f", &format!("qemu-system.*{}", dir.display())]).output().unwrap();
    String::from_utf8_lossy(&ps.stdout).into_owned()
}

/// What is left in the daemon's drill work folder.
fn drill_leftovers(d: &std::path::Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(d.join("state/drills")).unwrap().map(|e| e.unwrap().file_name()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_jobs_boot_the_newest_point_and_report_in_history_metrics_and_the_repository() {
    let test = "drill_jobs_boot_the_newest_point_and_report_in_history_metrics_and_the_repository";
    // A state folder with a long path, as an operator may choose: the drill's sockets under it
    // must still fit a Unix socket's 108 bytes.
    let dir = tempfile::Builder::new().prefix("a-state-folder-named-at-some-length-").tempdir().unwrap();
    let d = dir.path();
    let Some((disk, point)) = bootable_point(d, test).await else { return };
    let extra = format!(
        "{}{}",
        drill_section(d, "weekly", &disk.marker, "5m"),
        drill_section(d, "never", "a line this guest never prints", "20s")
    );
    let daemon = Daemon::start(d, &extra, None, &[]);
    let addr = daemon.addr.clone();

    // config check opens the drilled repository and lists each drill; a missing one is named.
    let cfg = d.join("proxy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(&cfg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("drill weekly: boots the newest point of bios in") && text.contains("2 drill(s)"), "{text}");
    let bad = d.join("bad.toml");
    let config = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&bad, config.replacen(&d.join("repo").display().to_string(), "/nonexistent/repo", 1)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("[[drill]] \"weekly\"") && err.contains("no repository at /nonexistent/repo"), "{err}");

    // The drill that passes: its run in the history, the VM's entry with its boot time.
    let (code, body) = http(&addr, "POST", "/jobs/weekly/run", Some(TOKEN));
    assert_eq!(code, 202, "{body}");
    let run = run_of(&addr, "weekly", Duration::from_secs(360)).await;
    assert_eq!(run["kind"], "drill", "{run}");
    assert_eq!(run["outcome"], "succeeded", "{run}\n{}", daemon.log());
    let drills = run["drills"].as_array().unwrap();
    assert_eq!(drills.len(), 1, "{run}");
    assert_eq!(drills[0]["vm"], "bios");
    assert_eq!(drills[0]["point"], point.id.as_str(), "the newest point: {run}");
    assert_eq!(drills[0]["passed"], true, "{run}");
    assert!(drills[0]["boot_seconds"].as_f64().is_some_and(|s| s > 0.0), "{run}");
    let s = status(&addr);
    let weekly = s["jobs"].as_array().unwrap().iter().find(|j| j["name"] == "weekly").unwrap().clone();
    assert_eq!(weekly["running"], false, "{s}");
    assert_eq!(weekly["last"]["outcome"], "succeeded", "{s}");
    assert!(weekly["next_run"].is_string(), "{s}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (_, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN));
    assert!(metrics.contains("syncproxy_drill_last_passed{job=\"weekly\",vm=\"bios\"} 1"), "{metrics}");
    assert!(metrics.contains("syncproxy_job_last_succeeded{job=\"weekly\"} 1"), "{metrics}");
    let at: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("syncproxy_drill_last_success_timestamp_seconds{job=\"weekly\",vm=\"bios\"} "))
        .unwrap_or_else(|| panic!("a last-success timestamp in\n{metrics}"))
        .parse()
        .unwrap();
    assert!(now.abs_diff(at) < 600, "the last success is now ({now}), not {at}");
    // The report is kept beside the point, and listed.
    let kept = Repo::open(d.join("repo")).unwrap().drill_reports(&point.id).unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].passed && kept[0].boot_seconds.is_some(), "{kept:?}");
    assert_eq!(drills[0]["report"], kept[0].stored_html.as_str(), "{run}");
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(["repo", "list"]).arg(d.join("repo")).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && list.contains("drill "), "{list}");
    assert!(drill_leftovers(d).is_empty(), "work folders left: {:?}", drill_leftovers(d));
    assert!(qemus_under(&d.join("state")).is_empty(), "a QEMU still runs: {}", qemus_under(&d.join("state")));

    // The drill whose text never appears: a failed job, and the daemon serves on.
    assert_eq!(http(&addr, "POST", "/jobs/never/run", Some(TOKEN)).0, 202);
    let run = run_of(&addr, "never", Duration::from_secs(120)).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    assert_eq!(run["drills"][0]["passed"], false, "{run}");
    // The guest powers off after its lines: the reason names the text it never printed.
    let reason = run["drills"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("a line this guest never prints"), "the reason names the check: {run}");
    let (code, metrics) = http(&addr, "GET", "/metrics", Some(TOKEN));
    assert_eq!(code, 200, "still serving");
    assert!(metrics.contains("syncproxy_drill_last_passed{job=\"never\",vm=\"bios\"} 0"), "{metrics}");
    assert!(metrics.contains("syncproxy_job_last_succeeded{job=\"never\"} 0"), "{metrics}");
    assert!(
        !metrics.contains("syncproxy_drill_last_success_timestamp_seconds{job=\"never\""),
        "no success to date: {metrics}"
    );
    assert!(metrics.contains("syncproxy_drill_last_passed{job=\"weekly\",vm=\"bios\"} 1"), "{metrics}");
    let kept = Repo::open(d.join("repo")).unwrap().drill_reports(&point.id).unwrap();
    assert_eq!(kept.iter().filter(|r| !r.passed).count(), 1, "the failure is kept too: {kept:?}");
    assert!(drill_leftovers(d).is_empty(), "work folders left: {:?}", drill_leftovers(d));
    assert!(qemus_under(&d.join("state")).is_empty(), "a QEMU still runs: {}", qemus_under(&d.join("state")));
    let history = std::fs::read_to_string(d.join("state/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 2, "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_drill_stops_the_daemon_its_vm_and_leaves_no_work_folder() {
    let test = "sigterm_mid_drill_stops_the_daemon_its_vm_and_leaves_no_work_folder";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some((_, point)) = bootable_point(d, test).await else { return };
    let mut daemon = Daemon::start(d, &drill_section(d, "weekly", "a line this guest never prints", "5m"), None, &[]);
    assert_eq!(http(&daemon.addr, "POST", "/jobs/weekly/run", Some(TOKEN)).0, 202);
    let state = d.join("state");
    let t = std::time::Instant::now();
    while qemus_under(&state).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "no QEMU started: {}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Mid-boot.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(Command::new("kill").args(["-TERM", &daemon.child.id().to_string()]).status().unwrap().success());
    let t = std::time::Instant::now();
    let exit = daemon.wait(Duration::from_secs(30)).expect("SIGTERM stops the daemon mid-drill within seconds");
    assert_eq!(exit.code(), Some(0), "{}", daemon.log());
    assert!(t.elapsed() < Duration::from_secs(20), "stopped promptly: {:?}", t.elapsed());
    assert!(qemus_under(&state).is_empty(), "a QEMU of the drill still runs: {}", qemus_under(&state));
    assert!(drill_leftovers(d).is_empty(), "work folders left: {:?}", drill_leftovers(d));
    // The interrupted run is in the history, and not as a pass; no report was kept of it.
    let history = std::fs::read_to_string(state.join("history.jsonl")).unwrap();
    let run: serde_json::Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert_eq!(run["job"], "weekly", "{history}");
    assert_eq!(run["outcome"], "failed", "{history}");
    assert_eq!(run["drills"][0]["passed"], false, "{history}");
    assert!(run["error"].as_str().is_some_and(|e| e.contains("stopped")), "said to be stopped: {history}");
    assert!(Repo::open(d.join("repo")).unwrap().drill_reports(&point.id).unwrap().is_empty());
}

/// `proxy ARGS`, which must succeed; its stdout.
fn proxy_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy")).args(args).output().unwrap();
    assert!(out.status.success(), "proxy {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_jobs_find_damage_and_copy_jobs_keep_their_own_retention() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo").display().to_string();
    let long = d.join("long").display().to_string();
    proxy_ok(&["repo", "init", &repo, "--chunk-size", "64K"]);
    // Three restore points of one VM, one of another.
    for (k, name) in ["vmA", "vmA", "vmA", "vmB"].iter().enumerate() {
        let img = d.join(format!("{k}.raw"));
        std::fs::write(&img, noise(1 << 20, k as u64 + 1)).unwrap();
        proxy_ok(&["repo", "backup", &repo, img.to_str().unwrap(), "--name", name]);
    }
    // A webhook that fails its first request: the notification is retried.
    let hook = Webhook::start(1);
    std::fs::write(d.join("hook-token"), "hook-secret-token\n").unwrap();
    let extra = format!(
        "\n[[verify]]\nname = \"check\"\nrepository = \"{repo}\"\nschedule = \"daily 05:00\"\n\n\
         [[verify]]\nname = \"rolling\"\nrepository = \"{repo}\"\nschedule = \"daily 05:00\"\nslices = 4\n\n\
         [[copy]]\nname = \"offsite\"\nrepository = \"{repo}\"\nto = \"{long}\"\nschedule = \"daily 06:00\"\n\
         retention = {{ keep_last = 1 }}\ngc_grace = \"0s\"\n\n\
         [[notify]]\nname = \"ops\"\nwebhook = \"http://{}/hooks/SECRET-PATH\"\ntoken_file = \"{}\"\n\
         jobs = [\"check\"]\non = \"failure\"\n",
        hook.addr,
        d.join("hook-token").display()
    );
    let daemon = Daemon::start(d, &extra, None, &[]);
    let check = proxy_ok(&["config", "check", d.join("proxy.toml").to_str().unwrap()]);
    assert!(check.contains("verify check: reads back every chunk of") && check.contains("next run"), "{check}");
    assert!(check.contains("copy offsite: copies") && check.contains("keeping its own retention"), "{check}");
    let dropin = proxy_ok(&["config", "systemd-paths", d.join("proxy.toml").to_str().unwrap()]);
    let state = d.join("state").display().to_string();
    assert!(dropin.contains("[Service]\nReadWritePaths="), "{dropin}");
    for p in [&repo, &long, &state] {
        assert!(dropin.contains(&format!(" -{p}")) || dropin.contains(&format!("=-{p}")), "{p} in {dropin}");
    }
    let bad = std::fs::read_to_string(d.join("proxy.toml"))
        .unwrap()
        .replace(&format!("to = \"{long}\""), &format!("to = \"{repo}\""));
    std::fs::write(d.join("bad.toml"), bad).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_proxy")).args(["config", "check"]).arg(d.join("bad.toml")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[[copy]] \"offsite\"") && err.contains("the repository it copies from"),
        "{err}"
    );

    // The copy takes only what the tier keeps: the newest point of each VM.
    assert_eq!(http(&daemon.addr, "POST", "/jobs/offsite/run", Some(TOKEN)).0, 202);
    let run = run_of(&daemon.addr, "offsite", Duration::from_secs(60)).await;
    assert_eq!(run["outcome"], "succeeded", "{run}\n{}", daemon.log());
    assert_eq!(run["copy"]["points_copied"].as_array().map(Vec::len), Some(2), "{run}");
    let listed = proxy_ok(&["repo", "list", &long, "--json"]);
    let points: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(points.as_array().map(Vec::len), Some(2), "{listed}");
    // A newer point of vmA replaces the tier's one; the older ones are never sent again.
    let img = d.join("new.raw");
    std::fs::write(&img, noise(1 << 20, 99)).unwrap();
    proxy_ok(&["repo", "backup", &repo, img.to_str().unwrap(), "--name", "vmA"]);
    assert_eq!(http(&daemon.addr, "POST", "/jobs/offsite/run", Some(TOKEN)).0, 202);
    let second = nth_run_of(&daemon.addr, "offsite", 2, Duration::from_secs(60)).await;
    assert_eq!(second["outcome"], "succeeded", "{second}");
    assert_eq!(second["copy"]["points_copied"].as_array().map(Vec::len), Some(1), "only the new point: {second}");
    assert_eq!(second["copy"]["pruned"].as_array().map(Vec::len), Some(1), "the tier's older vmA point: {second}");
    assert!(second["copy"]["gc"]["chunks_removed"].as_u64().unwrap_or(0) > 0, "its chunks freed: {second}");
    let points: serde_json::Value = serde_json::from_str(&proxy_ok(&["repo", "list", &long, "--json"])).unwrap();
    assert_eq!(points.as_array().map(Vec::len), Some(2));
    proxy_ok(&["repo", "verify", &long]);
    // The tier vanishes (a disk not mounted): after a copy has succeeded, none is made anew.
    std::fs::rename(&long, d.join("long.away")).unwrap();
    assert_eq!(http(&daemon.addr, "POST", "/jobs/offsite/run", Some(TOKEN)).0, 202);
    let third = nth_run_of(&daemon.addr, "offsite", 3, Duration::from_secs(60)).await;
    assert_eq!(third["outcome"], "failed", "{third}");
    assert!(third["error"].as_str().is_some_and(|e| e.contains("cannot open the destination")), "{third}");
    assert!(!Path::new(&long).exists(), "no new repository where the tier was");
    std::fs::rename(d.join("long.away"), &long).unwrap();

    // A clean verify passes; after one chunk is damaged, the next fails and names the point.
    assert_eq!(http(&daemon.addr, "POST", "/jobs/check/run", Some(TOKEN)).0, 202);
    let run = run_of(&daemon.addr, "check", Duration::from_secs(60)).await;
    assert_eq!(run["outcome"], "succeeded", "{run}");
    let all = run["verify"]["chunks_checked"].as_u64().unwrap_or(0);
    assert!(all >= 16, "a point is 16 chunks: {run}");
    // A verify in 4 slices reads every chunk once over 4 runs, a slice per run, in turn.
    let mut sum = 0;
    for n in 1..=4 {
        assert_eq!(http(&daemon.addr, "POST", "/jobs/rolling/run", Some(TOKEN)).0, 202);
        let r = nth_run_of(&daemon.addr, "rolling", n, Duration::from_secs(60)).await;
        assert_eq!((r["outcome"].as_str(), r["slice"].as_u64()), (Some("succeeded"), Some(n as u64 - 1)), "{r}");
        let checked = r["verify"]["chunks_checked"].as_u64().unwrap();
        assert!(checked < all, "a slice is a part: {r}");
        sum += checked;
    }
    assert_eq!(sum, all, "the 4 slices read every chunk once");
    let victim = testkit::files_under(&d.join("repo/chunks")).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    assert_eq!(http(&daemon.addr, "POST", "/jobs/check/run", Some(TOKEN)).0, 202);
    let bad = nth_run_of(&daemon.addr, "check", 2, Duration::from_secs(60)).await;
    assert_eq!(bad["outcome"], "failed", "{bad}");
    assert_eq!(bad["verify"]["bad_chunks"], 1, "{bad}");
    assert!(bad["error"].as_str().is_some_and(|e| e.contains("1 damaged")), "{bad}");
    assert!(!bad["verify"]["damaged_points"].as_object().unwrap().is_empty(), "{bad}");
    let (_, metrics) = http(&daemon.addr, "GET", "/metrics", Some(TOKEN));
    for want in [
        "syncproxy_job_last_succeeded{job=\"check\"} 0".to_owned(),
        "syncproxy_verify_bad_chunks{job=\"check\"} 1".to_owned(),
        format!("syncproxy_repository_free_bytes{{repository=\"{repo}\"}} "),
        format!("syncproxy_repository_free_bytes{{repository=\"{long}\"}} "),
    ] {
        assert!(metrics.contains(&want), "{want} in\n{metrics}");
    }

    // The failed verify, and only it, was notified: refused once, delivered on the retry.
    let got = hook.wait_for(2, Duration::from_secs(30));
    assert_eq!(got.len(), 2, "one refused, one delivered: {got:?}");
    for (head, body) in &got {
        assert!(head.starts_with("POST /hooks/SECRET-PATH "), "{head}");
        assert!(head.to_ascii_lowercase().contains("authorization: bearer hook-secret-token"), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!((body["job"].as_str(), body["outcome"].as_str()), (Some("check"), Some("failed")), "{body}");
        assert!(
            body["summary"].as_str().is_some_and(|s| s.contains("check failed") && s.contains("1 damaged")),
            "{body}"
        );
        assert_eq!(body["run"]["verify"]["bad_chunks"], 1, "{body}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hook.received().len(), 2, "no other run was notified");
    let log = daemon.log();
    assert!(
        log.contains("notification delivered") && !log.contains("SECRET-PATH") && !log.contains("hook-secret"),
        "{log}"
    );
}

/// A webhook receiver on loopback: answers 503 to its first `refuse` requests, then 204, and
/// keeps each request's head and body.
struct Webhook {
    addr: String,
    got: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Webhook {
    fn start(refuse: usize) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let (head, body) = loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break (String::new(), String::new());
                    }
                    data.extend_from_slice(&buf[..n]);
                    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&data[..end]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while data.len() < end + 4 + len {
                        let n = s.read(&mut buf).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        data.extend_from_slice(&buf[..n]);
                    }
                    break (head, String::from_utf8_lossy(&data[end + 4..]).into_owned());
                };
                let mut g = kept.lock().unwrap();
                g.push((head, body));
                let status = if g.len() <= refuse { "503 Service Unavailable" } else { "204 No Content" };
                let _ = s.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                );
            }
        });
        Self { addr, got }
    }

    fn received(&self) -> Vec<(String, String)> {
        self.got.lock().unwrap().clone()
    }

    /// The requests, once there are `n` (or when `limit` has passed).
    fn wait_for(&self, n: usize, limit: Duration) -> Vec<(String, String)> {
        let t = std::time::Instant::now();
        while self.received().len() < n && t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.received()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_notifications_go_out_over_starttls_and_never_in_the_clear() {
    let test = "email_notifications_go_out_over_starttls_and_never_in_the_clear";
    let Some(pythonpath) = testkit::smtp::find(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = testkit::pki::TestPki::create(d);
    let smtp = testkit::smtp::SmtpServer::start(&pythonpath, d, &pki, "notifier", "mail-secret");
    // A server that offers no STARTTLS: it must get neither the account nor the mail.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    let heard = Arc::new(std::sync::Mutex::new(String::new()));
    let kept = heard.clone();
    std::thread::spawn(move || {
        for s in plain.incoming().flatten() {
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"220 plain.example ESMTP\r\n");
            for line in std::io::BufRead::lines(std::io::BufReader::new(s)).map_while(Result::ok) {
                kept.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = w.write_all(if line.starts_with("EHLO") {
                    b"250-plain.example\r\n250 AUTH PLAIN\r\n"
                } else {
                    b"250 ok\r\n"
                });
            }
        }
    });

    let repo = d.join("repo").display().to_string();
    proxy_ok(&["repo", "init", &repo, "--chunk-size", "64K"]);
    std::fs::write(d.join("a.raw"), noise(1 << 20, 7)).unwrap();
    proxy_ok(&["repo", "backup", &repo, d.join("a.raw").to_str().unwrap(), "--name", "vmA"]);
    let victim = testkit::files_under(&d.join("repo/chunks")).into_iter().next().unwrap();
    std::fs::write(&victim, b"damaged").unwrap();
    std::fs::write(d.join("mail.pw"), "mail-secret\n").unwrap();
    let email = |name: &str, port: u16, ca: bool| {
        format!(
            "[[notify]]\nname = \"{name}\"\nretries = 0\njobs = [\"check\"]\n\
             email = {{ smtp = \"smtp://127.0.0.1:{port}\", from = \"proxy@example.com\", to = [\"ops@example.com\", \
             \"dr@example.com\"], user = \"notifier\", password_file = \"{}\"{} }}\n\n",
            d.join("mail.pw").display(),
            if ca { format!(", ca_file = \"{}\"", pki.ca.display()) } else { String::new() }
        )
    };
    let extra = format!(
        "\n[[verify]]\nname = \"check\"\nrepository = \"{repo}\"\nschedule = \"daily 05:00\"\n\n{}{}",
        email("mail", smtp.port, true),
        email("cleartext", plain_port, false)
    );
    let daemon = Daemon::start(d, &extra, None, &[]);
    assert_eq!(http(&daemon.addr, "POST", "/jobs/check/run", Some(TOKEN)).0, 202);
    let run = run_of(&daemon.addr, "check", Duration::from_secs(60)).await;
    assert_eq!(run["outcome"], "failed", "{run}");

    let mail = smtp.wait_for(1, Duration::from_secs(30));
    assert_eq!(mail.len(), 1, "{}", daemon.log());
    let m = &mail[0];
    assert!(m.contains("X-Envelope-To: ops@example.com,dr@example.com"), "{m}");
    assert!(m.contains("Subject: syncproxy p1: check failed"), "{m}");
    assert!(m.contains("1 damaged") && m.contains("\"bad_chunks\": 1"), "{m}");
    for _ in 0..100 {
        if daemon.log().contains("cleartext") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.log();
    assert!(log.contains("offers no STARTTLS"), "{log}");
    let said = heard.lock().unwrap().clone();
    assert!(said.starts_with("EHLO") && !said.contains("AUTH") && !said.contains("MAIL"), "in the clear: {said}");
    assert!(!log.contains("mail-secret"), "{log}");
}
