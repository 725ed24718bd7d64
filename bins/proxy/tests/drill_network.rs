//! `proxy drill --tcp-port` against a real guest: a simulated VM with an e1000 NIC whose boot
//! disk (the BIOS fixture) brings its network up and serves port 80, backed up with `proxy
//! backup`, then drilled on the isolated user-mode network. Port 80 passes, a port nothing
//! listens on fails the drill naming that check, and the guest cannot reach the host: its try
//! at a listener on the host's loopback fails and the listener never sees a connection, while
//! the same guest on an unrestricted user-mode network (the control) does reach it.

mod drill_env;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use drill_env::{Env, Guest, guests, output};
use testkit::bootdisk::{self, Variant};

/// One drill at a time: TCG guests competing for the cores would miss their time limits.
static ONE_DRILL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A web server on the host's loopback that counts the connections it gets.
struct HostListener {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostListener {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (connections.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = c.read(&mut [0u8; 1024]);
                        let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nescaped\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, connections, stop, thread: Some(thread) }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The BIOS fixture with an e1000 NIC in its `.vmx`, its disk a copy in `dir` that asks the
/// guest to try the host's `probe_port`; `None` when the test is skipped.
fn networked_guest(test: &str, dir: &Path, probe_port: u16) -> Option<Guest> {
    let mut guest = guests(test, &[("web", Variant::Bios, "sata", Variant::Bios)])?.remove(0);
    let copy = dir.join("web.img");
    std::fs::copy(&guest.disk.path, &copy).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.write_all_at(format!("{probe_port}\n").as_bytes(), bootdisk::PROBE_OFFSET).unwrap();
    guest.disk.path = copy;
    guest.vmx_extra.push_str("ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"e1000\"\n");
    Some(guest)
}

/// The drill's JSON report from `proxy drill --json`'s output.
fn report(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not a JSON report ({e}):\n{out}"))
}

/// The check named `name` in a report: whether it passed, and its detail.
fn check<'a>(report: &'a serde_json::Value, name: &str) -> (bool, &'a str) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"));
    (c["passed"].as_bool().unwrap(), c["detail"].as_str().unwrap())
}

/// Boots `image` with bare QEMU on an unrestricted user-mode network until the guest says
/// whether it reached the host, and returns the console.
fn boot_unrestricted(qemu: &Path, image: &Path, dir: &Path) -> String {
    let serial = dir.join("control.console");
    std::fs::write(&serial, b"").unwrap();
    let mut args = bootdisk::qemu_args(Variant::Bios, image, &serial, None);
    let nic = args.iter().position(|a| a == "-nic").unwrap();
    args[nic + 1] = "user,model=e1000".to_owned();
    let mut child = std::process::Command::new(qemu)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let console = loop {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if console.contains(bootdisk::NET_UP) || start.elapsed() > Duration::from_secs(180) {
            break console;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    console
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_serving_port_80_passes_its_tcp_check_and_cannot_reach_the_host() {
    let test = "a_guest_serving_port_80_passes_its_tcp_check_and_cannot_reach_the_host";
    let host = HostListener::start();
    let dir = tempfile::tempdir().unwrap();
    let Some(guest) = networked_guest(test, dir.path(), host.port) else { return };
    let _one = ONE_DRILL.lock().await;

    // The control: on QEMU's unrestricted user-mode network the guest's try reaches the host,
    // so the probe can tell.
    let qemu = testkit::require_tool("qemu-system-x86_64", test).unwrap();
    let control = dir.path().join("control.img");
    std::fs::copy(&guest.disk.path, &control).unwrap();
    let cdir = dir.path().to_path_buf();
    let console = tokio::task::spawn_blocking(move || boot_unrestricted(&qemu, &control, &cdir)).await.unwrap();
    assert!(console.contains(bootdisk::NET_ESCAPED), "the control guest reached the host:\n{console}");
    assert!(host.connections() > 0, "the host's listener saw the control guest");
    let before = host.connections();

    let env = Env::start(std::slice::from_ref(&guest)).await;
    env.backup().await;
    let point = env.point(guest.name);
    let t = Instant::now();
    let c = env.drill(&point.id, &["--expect", bootdisk::NET_UP, "--tcp-port", "80", "--timeout", "3m", "--json"]);
    let (code, out, err) = output(c).await;
    assert_eq!(code, 0, "drill failed:\n{out}\n{err}");
    let r = report(&out);
    eprintln!("{test}: {:#}", r["checks"]);
    assert_eq!(r["passed"], true, "{r:#}");
    assert!(check(&r, &format!("serial {:?}", bootdisk::NET_UP)).0, "{r:#}");
    let (passed, detail) = check(&r, "tcp port 80");
    assert!(passed, "{detail}\n{r:#}");
    assert!(
        r["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("isolated (user-mode, no route out)")),
        "{r:#}"
    );
    let tail = r["serial_tail"].as_str().unwrap();
    assert!(tail.contains(bootdisk::NET_CONTAINED), "the guest could not reach the host:\n{tail}");
    assert!(!tail.contains(bootdisk::NET_ESCAPED), "{tail}");
    assert_eq!(host.connections(), before, "the host's listener saw the drilled guest");
    eprintln!(
        "{test}: drill passed in {:.1} s (QEMU to {}: {:.1} s)",
        t.elapsed().as_secs_f64(),
        bootdisk::NET_UP,
        r["boot_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    env.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nothing_listens_on_fails_the_drill_naming_the_tcp_check() {
    let test = "a_port_nothing_listens_on_fails_the_drill_naming_the_tcp_check";
    let dir = tempfile::tempdir().unwrap();
    let host = HostListener::start();
    let Some(guest) = networked_guest(test, dir.path(), host.port) else { return };
    let _one = ONE_DRILL.lock().await;
    let env = Env::start(std::slice::from_ref(&guest)).await;
    env.backup().await;
    let point = env.point(guest.name);
    let t = Instant::now();
    let c = env.drill(
        &point.id,
        &["--expect", bootdisk::NET_UP, "--tcp-port", "80", "--tcp-port", "81", "--timeout", "90s", "--json"],
    );
    let (code, out, err) = output(c).await;
    assert_eq!(code, 2, "the drill ran and failed:\n{out}\n{err}");
    assert!(t.elapsed() < Duration::from_secs(120), "it costs no more than its timeout: {:?}", t.elapsed());
    let r = report(&out);
    eprintln!("{test}: drill failed in {:.1} s: {:#}", t.elapsed().as_secs_f64(), r["checks"]);
    assert_eq!(r["passed"], false, "{r:#}");
    assert!(check(&r, &format!("serial {:?}", bootdisk::NET_UP)).0, "the guest came up: {r:#}");
    assert!(check(&r, "tcp port 80").0, "port 80 answered: {r:#}");
    let (passed, detail) = check(&r, "tcp port 81");
    assert!(!passed, "{r:#}");
    assert!(detail.contains("port 81"), "{detail}");
    assert!(r["reason"].as_str().unwrap().contains("tcp port 81"), "the reason names the check: {r:#}");
    assert_eq!(host.connections(), 0, "the host's listener saw the drilled guest");
    env.assert_nothing_left();
}
