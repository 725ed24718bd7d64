//! Carrying a drill out: overlays made, QEMU started, the serial console watched, the other
//! checks run, a screenshot taken, and QEMU always stopped and every file the drill made
//! removed, on every path (a guard that also acts when the future is dropped).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::plan::QemuPlan;
use crate::qmp::{self, Qmp};
use crate::report::{CheckResult, DrillReport, SERIAL_TAIL_BYTES};
use crate::{Cancel, Check, DrillError, DrillSpec, HostFacts};

/// How much of QEMU's error output is kept.
const STDERR_TAIL: usize = 8 << 10;
/// The most the drill waits for QEMU's QMP socket after starting it.
const QMP_WAIT: Duration = Duration::from_secs(30);
/// How often the serial log is read.
const POLL: Duration = Duration::from_millis(100);
/// The PNG signature.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Runs a drill: see [`run_with_progress`].
pub async fn run(spec: &DrillSpec, cancel: Cancel) -> Result<DrillReport, DrillError> {
    run_with_progress(spec, cancel, &|_| {}).await
}

/// Runs a drill, telling `progress` what it does (it prints nothing itself). A guest that
/// does not come up, or a check that fails, is a report whose `passed` is false; an error is a
/// drill that could not be attempted (plan refused, QEMU missing or failing to start, an
/// overlay that cannot be made) or was cancelled. QEMU is stopped and the overlays, sockets
/// and logs removed on every path; the report keeps the evidence.
pub async fn run_with_progress(
    spec: &DrillSpec,
    cancel: Cancel,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<DrillReport, DrillError> {
    let plan = crate::plan(spec, &HostFacts::detect())?;
    for l in &plan.lines {
        progress(l);
    }
    let t0 = Instant::now();
    let deadline = t0 + spec.timeout;
    let mut report = DrillReport::new(&spec.name, humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    report.accel = plan.accel.clone();
    report.machine = plan.machine.clone();
    report.firmware = plan.firmware.clone();
    report.lines = plan.lines.clone();
    report.substitutions = plan.substitutions.clone();
    let mut vm = Vm::new(&spec.work_dir, &plan)?;

    enum End {
        Done(Result<(), DrillError>),
        TimedOut,
        Cancelled,
    }
    let end = tokio::select! {
        biased;
        () = cancel.cancelled() => End::Cancelled,
        r = tokio::time::timeout_at(deadline, drive(spec, plan, &mut vm, &mut report, deadline, progress)) => {
            match r { Ok(r) => End::Done(r), Err(_) => End::TimedOut }
        }
    };
    if let End::TimedOut = end {
        report.fail(format!(
            "the drill took longer than its {} s limit (while {})",
            spec.timeout.as_secs_f64(),
            vm.stage
        ));
    }
    progress("stopping the VM and removing its overlays");
    vm.stop().await;
    report.serial_tail = vm.console.tail_text();
    report.seconds = t0.elapsed().as_secs_f64();
    match end {
        End::Cancelled => return Err(DrillError::Cancelled),
        End::Done(Err(e)) => return Err(e),
        End::Done(Ok(())) | End::TimedOut => {}
    }
    if report.checks.iter().any(|c| !c.passed) && report.reason.is_none() {
        report.fail("a check failed");
    }
    report.passed = report.reason.is_none() && !report.checks.is_empty() && report.checks.iter().all(|c| c.passed);
    Ok(report)
}

/// The running parts of a drill, stopped and removed by [`Vm::stop`] or, if the drill's
/// future is dropped, by `Drop`.
struct Vm {
    work_dir: Option<PathBuf>,
    files: Vec<PathBuf>,
    child: Option<Child>,
    stderr: Arc<Mutex<Vec<u8>>>,
    qmp: Option<Qmp>,
    console: Console,
    stage: &'static str,
}

impl Vm {
    fn new(work_dir: &Path, plan: &QemuPlan) -> Result<Vm, DrillError> {
        let created = !work_dir.exists();
        std::fs::create_dir_all(work_dir).map_err(DrillError::io(format!("cannot make {}", work_dir.display())))?;
        let patterns = plan
            .checks
            .iter()
            .filter_map(|c| match c {
                Check::Serial { pattern, .. } => Some(pattern.as_bytes().to_vec()),
                _ => None,
            })
            .collect();
        let mut files: Vec<PathBuf> = plan.overlays.iter().map(|o| o.path.clone()).collect();
        files.extend(plan.efi_vars.iter().map(|v| v.copy.clone()));
        files.extend([plan.serial_log.clone(), plan.qmp_socket.clone(), plan.screenshot.clone()]);
        files.extend(plan.qga_socket.clone());
        Ok(Vm {
            work_dir: created.then(|| work_dir.to_owned()),
            files,
            child: None,
            stderr: Arc::default(),
            qmp: None,
            console: Console::new(plan.serial_log.clone(), patterns),
            stage: "planning",
        })
    }

    fn stderr_text(&self) -> String {
        let b = self.stderr.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&b).trim().to_owned()
    }

    /// Whether QEMU has exited, with how.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Quits QEMU (killing it when it does not go), reads the console a last time and removes
    /// every file the drill made.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(q) = self.qmp.as_mut()
                && matches!(child.try_wait(), Ok(None))
            {
                let _ = q.execute_within(Duration::from_secs(2), "quit", None).await;
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        self.qmp = None;
        self.console.poll().await;
        self.remove_files();
    }

    fn remove_files(&mut self) {
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = self.work_dir.take() {
            // Only when the drill made it, and only when empty.
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        self.remove_files();
    }
}

/// The serial log, read as it grows: its end, and when each pattern first appeared.
struct Console {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    tail: Vec<u8>,
    patterns: Vec<(Vec<u8>, Option<Instant>)>,
}

impl Console {
    fn new(path: PathBuf, patterns: Vec<Vec<u8>>) -> Self {
        Console { path, file: None, tail: Vec::new(), patterns: patterns.into_iter().map(|p| (p, None)).collect() }
    }

    async fn poll(&mut self) {
        if self.file.is_none() {
            self.file = tokio::fs::File::open(&self.path).await.ok();
        }
        let Some(file) = self.file.as_mut() else { return };
        let mut buf = vec![0u8; 64 << 10];
        // Bounded per poll, so a flood cannot hold the drill.
        for _ in 0..64 {
            let n = match file.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            for (pattern, seen) in self.patterns.iter_mut().filter(|(_, s)| s.is_none()) {
                let keep = self.tail.len().min(pattern.len().saturating_sub(1));
                let mut window = self.tail[self.tail.len() - keep..].to_vec();
                window.extend_from_slice(&buf[..n]);
                if window.windows(pattern.len()).any(|w| w == pattern.as_slice()) {
                    *seen = Some(now);
                }
            }
            self.tail.extend_from_slice(&buf[..n]);
            if self.tail.len() > SERIAL_TAIL_BYTES {
                self.tail.drain(..self.tail.len() - SERIAL_TAIL_BYTES);
            }
        }
    }

    fn seen(&self, pattern: &str) -> Option<Instant> {
        self.patterns.iter().find(|(p, _)| p == pattern.as_bytes()).and_then(|(_, s)| *s)
    }

    fn tail_text(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
    }
}

/// Runs `cmd` to its end: its exit status and its output (error output first).
async fn output_text(cmd: &mut Command) -> std::io::Result<(std::process::ExitStatus, String)> {
    let out = cmd.stdin(Stdio::null()).kill_on_drop(true).output().await?;
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    Ok((out.status, text.trim().to_owned()))
}

/// Milliseconds since the Unix epoch (`None` for a clock set before it, or absurdly late).
fn unix_ms(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_millis()).ok())
}

fn free_loopback_port() -> Result<u16, DrillError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(DrillError::io("cannot find a free loopback port"))?;
    Ok(l.local_addr().map_err(DrillError::io("cannot find a free loopback port"))?.port())
}

fn last_chars(s: &str, n: usize) -> String {
    let skip = s.chars().count().saturating_sub(n);
    s.chars().skip(skip).collect()
}

async fn drive(
    spec: &DrillSpec,
    mut plan: QemuPlan,
    vm: &mut Vm,
    report: &mut DrillReport,
    deadline: Instant,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), DrillError> {
    // Files of an earlier drill in the same folder would confuse this one.
    for f in &vm.files {
        let _ = std::fs::remove_file(f);
    }
    vm.stage = "making the overlays";
    if let Some(v) = &plan.efi_vars {
        std::fs::copy(&v.template, &v.copy).map_err(DrillError::io(format!(
            "cannot copy {} to {}",
            v.template.display(),
            v.copy.display()
        )))?;
    }
    for o in &plan.overlays {
        progress(&format!("making the overlay of {}", o.slot));
        let (ok, text) = output_text(
            Command::new(&plan.qemu_img).args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &o.uri]).arg(&o.path),
        )
        .await
        .map_err(DrillError::io(format!("cannot run {}", plan.qemu_img.display())))?;
        if !ok.success() {
            return Err(DrillError::Overlay { slot: o.slot.clone(), stderr: text });
        }
    }
    let ports = plan.forwards.iter().map(|_| free_loopback_port()).collect::<Result<Vec<u16>, _>>()?;
    plan.set_host_ports(&ports);

    vm.stage = "starting QEMU";
    progress("starting QEMU");
    let mut child = qemu_command(&plan.qemu)
        .args(&plan.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DrillError::QemuStart { stderr: format!("cannot run {}: {e}", plan.qemu.display()) })?;
    let started = Instant::now();
    report.qemu_started_unix_ms = unix_ms(SystemTime::now());
    let drain = child.stderr.take().map(|mut err| {
        let sink = vm.stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.extend_from_slice(&buf[..n]);
                    let excess = s.len().saturating_sub(STDERR_TAIL);
                    s.drain(..excess);
                }
            }
        })
    });
    vm.child = Some(child);

    loop {
        if let Some(status) = vm.exited() {
            if let Some(d) = drain {
                let _ = tokio::time::timeout(Duration::from_secs(2), d).await;
            }
            return Err(DrillError::QemuStart { stderr: format!("{} ({status})", vm.stderr_text()) });
        }
        // QMP greets before the devices are made; the machine runs once `query-status`
        // answers (QEMU exits instead when it refuses a device).
        if plan.qmp_socket.exists()
            && let Ok(mut q) = Qmp::connect(&plan.qmp_socket, Duration::from_secs(5)).await
            && q.execute_within(Duration::from_secs(5), "query-status", None).await.is_ok()
        {
            vm.qmp = Some(q);
            break;
        }
        if started.elapsed() > QMP_WAIT {
            return Err(DrillError::QemuStart {
                stderr: format!("its QMP socket did not answer within {} s; {}", QMP_WAIT.as_secs(), vm.stderr_text()),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(&format!("QEMU started ({}, {}, {})", plan.accel, plan.machine, plan.firmware));

    // Keep time for the screenshot and the report at the end.
    let reserve = (spec.timeout / 5).min(Duration::from_secs(10));
    let checks_end = deadline.checked_sub(reserve).unwrap_or(deadline);
    let mut not_run: Option<String> = None;
    for check in &plan.checks {
        let name = check.name();
        if let Some(why) = &not_run {
            report.checks.push(CheckResult { name, passed: false, seconds: 0.0, detail: format!("not run: {why}") });
            continue;
        }
        vm.stage = "running the checks";
        progress(&format!("check {name}"));
        let begun = Instant::now();
        let limit_at = match check {
            Check::Serial { timeout, .. } => started + *timeout,
            _ => begun + check.timeout(),
        }
        .min(checks_end);
        let (passed, detail) = match check {
            Check::Serial { pattern, .. } => {
                let (passed, detail) = serial_check(vm, pattern, started, limit_at).await;
                if passed {
                    if report.boot_seconds.is_none() {
                        report.boot_seconds = vm.console.seen(pattern).map(|t| (t - started).as_secs_f64());
                    }
                } else {
                    not_run = Some("the guest did not show what the serial check waited for".to_owned());
                }
                (passed, detail)
            }
            Check::TcpPort { port, .. } => {
                let host = plan.forwards.iter().find(|f| f.guest == *port).map_or(0, |f| f.host);
                tcp_check(vm, *port, host, limit_at).await
            }
            Check::GuestPing { .. } => match &plan.qga_socket {
                Some(path) => ping_check(path, limit_at).await,
                None => (false, "no guest agent channel".to_owned()),
            },
            Check::Script { path, .. } => script_check(spec, &plan, path, limit_at).await,
        };
        let seconds = match check {
            Check::Serial { pattern, .. } => {
                vm.console.seen(pattern).unwrap_or_else(Instant::now).duration_since(started).as_secs_f64()
            }
            _ => begun.elapsed().as_secs_f64(),
        };
        progress(&format!("check {name}: {} ({detail})", if passed { "passed" } else { "FAILED" }));
        if !passed {
            report.fail(format!("{name}: {detail}"));
        }
        report.checks.push(CheckResult { name, passed, seconds, detail });
    }

    vm.stage = "taking the screenshot";
    if vm.exited().is_none()
        && let Some(q) = vm.qmp.as_mut()
    {
        let path = plan.screenshot.to_string_lossy().into_owned();
        let limit = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(10));
        match q.execute_within(limit, "screendump", Some(json!({ "filename": path, "format": "png" }))).await {
            Ok(_) => match std::fs::read(&plan.screenshot) {
                Ok(png) if png.starts_with(PNG) => report.screenshot_png = Some(png),
                Ok(_) => report.add_warning("the screenshot is not a PNG".to_owned()),
                Err(e) => report.add_warning(format!("the screenshot cannot be read: {e}")),
            },
            Err(e) => report.add_warning(format!("no screenshot: {e}")),
        }
    } else {
        report.add_warning(format!("no screenshot: QEMU had exited; {}", vm.stderr_text()));
    }
    Ok(())
}

async fn serial_check(vm: &mut Vm, pattern: &str, started: Instant, limit_at: Instant) -> (bool, String) {
    let mut next_status = Instant::now();
    loop {
        vm.console.poll().await;
        if let Some(t) = vm.console.seen(pattern) {
            return (true, format!("seen {:.1} s after QEMU started", (t - started).as_secs_f64()));
        }
        if let Some(status) = vm.exited() {
            return (
                false,
                format!("QEMU exited ({status}) before it appeared: {}", last_chars(&vm.stderr_text(), 400)),
            );
        }
        let now = Instant::now();
        if now >= next_status {
            next_status = now + Duration::from_secs(1);
            if let Some(q) = vm.qmp.as_mut()
                && let Ok(s) = q.execute_within(Duration::from_secs(2), "query-status", None).await
            {
                let status = s.get("status").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                if matches!(status.as_str(), "shutdown" | "guest-panicked" | "internal-error") {
                    vm.console.poll().await;
                    if vm.console.seen(pattern).is_none() {
                        return (
                            false,
                            format!("the guest stopped ({status}) before it appeared on the serial console"),
                        );
                    }
                    continue;
                }
            }
        }
        if now >= limit_at {
            return (
                false,
                format!("not on the serial console within {:.1} s of QEMU's start", (now - started).as_secs_f64()),
            );
        }
        tokio::time::sleep(POLL.min(limit_at.saturating_duration_since(now).max(Duration::from_millis(1)))).await;
    }
}

async fn tcp_check(vm: &mut Vm, guest: u16, host: u16, limit_at: Instant) -> (bool, String) {
    let mut last = "no connection yet".to_owned();
    while Instant::now() < limit_at {
        let connect = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(("127.0.0.1", host)));
        let stream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                last = format!("the loopback forward refused: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(_) => {
                last = "the loopback forward did not accept".to_owned();
                continue;
            }
        };
        // The forward accepts before the guest does: the guest answered only when QEMU shows
        // the connection established; it refused when QEMU closes ours.
        last = format!("the guest did not answer a connection to port {guest}");
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(q) = vm.qmp.as_mut()
                && let Ok(info) = q
                    .execute_within(
                        Duration::from_secs(2),
                        "human-monitor-command",
                        Some(json!({ "command-line": "info usernet" })),
                    )
                    .await
                && qmp::usernet_established(info.as_str().unwrap_or_default(), guest)
            {
                return (true, format!("port {guest} answered (through 127.0.0.1:{host})"));
            }
            let mut byte = [0u8; 1];
            match stream.try_read(&mut byte) {
                Ok(0) => {
                    last = format!("port {guest} refused the connection");
                    break;
                }
                Ok(_) => return (true, format!("port {guest} answered (through 127.0.0.1:{host})")),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    last = format!("port {guest}: {e}");
                    break;
                }
            }
            if Instant::now() >= limit_at {
                break;
            }
        }
        drop(stream);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (false, format!("port {guest} did not answer in time ({last})"))
}

async fn ping_check(path: &Path, limit_at: Instant) -> (bool, String) {
    let mut last = String::from("no answer");
    loop {
        let left = limit_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (false, format!("the guest agent did not answer guest-ping in time ({last})"));
        }
        match qmp::guest_ping(path, left.min(Duration::from_secs(3))).await {
            Ok(()) => return (true, "the guest agent answered guest-ping".to_owned()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500).min(left)).await;
    }
}

async fn script_check(spec: &DrillSpec, plan: &QemuPlan, path: &Path, limit_at: Instant) -> (bool, String) {
    let mut cmd = Command::new(path);
    cmd.env("DRILL_NAME", &spec.name)
        .env("DRILL_WORK_DIR", &spec.work_dir)
        .env("DRILL_SERIAL_LOG", &plan.serial_log)
        .env("DRILL_QMP_SOCKET", &plan.qmp_socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(q) = &plan.qga_socket {
        cmd.env("DRILL_QGA_SOCKET", q);
    }
    for f in &plan.forwards {
        cmd.env(format!("DRILL_TCP_{}", f.guest), format!("127.0.0.1:{}", f.host));
    }
    match tokio::time::timeout_at(limit_at, output_text(&mut cmd)).await {
        Err(_) => (false, "it did not finish in time (stopped)".to_owned()),
        Ok(Err(e)) => (false, format!("it cannot be run: {e}")),
        Ok(Ok((status, text))) => {
            let tail = last_chars(&text, 400);
            let said = if tail.is_empty() { String::new() } else { format!(": {tail}") };
            (status.success(), format!("{status}{said}"))
        }
    }
}

/// QEMU's command: under `setpriv --pdeathsig KILL` where util-linux has it, so that a
/// proxy killed with SIGKILL (which runs no clean-up) takes its VM with it instead of
/// leaving a guest running on the host; the kernel sends the signal when the thread that
/// started QEMU ends, and the drill starts it from a thread that lives as long as the run.
fn qemu_command(qemu: &Path) -> Command {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().map(Path::new).find(|p| p.is_file());
    match setpriv {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(qemu);
            c
        }
        None => Command::new(qemu),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn the_console_finds_patterns_across_reads_and_keeps_a_bounded_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut console = Console::new(path.clone(), vec![b"login:".to_vec(), b"never".to_vec()]);
        console.poll().await;
        assert!(console.seen("login:").is_none(), "no file yet");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![b'x'; SERIAL_TAIL_BYTES * 2]).unwrap();
        f.write_all(b"debian log").unwrap();
        console.poll().await;
        assert!(console.seen("login:").is_none());
        f.write_all(b"in: \r\n").unwrap();
        console.poll().await;
        assert!(console.seen("login:").is_some(), "the pattern spans two reads");
        assert!(console.seen("never").is_none());
        assert_eq!(console.tail.len(), SERIAL_TAIL_BYTES);
        assert!(console.tail_text().ends_with("debian login: \r\n"));
    }
}
