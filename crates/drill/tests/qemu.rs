//! Drills under a real QEMU of disks served by qemu-nbd: an empty disk never shows a login
//! prompt, so the drill fails with a reason, yet keeps a screenshot and a report; a cancelled
//! drill stops at once. Either way no QEMU and no overlay is left behind.

use std::path::Path;
use std::time::{Duration, Instant};

use drill::{Accel, Cancel, Check, DrillDisk, DrillError, DrillSpec, Network};
use testkit::require_tool;
use testkit::servers::{Listen, Server};

const BIOS_SATA: &str = "firmware = \"bios\"\nmemsize = \"128\"\nnumvcpus = \"1\"\nsata0.present = \"TRUE\"\n\
                         sata0:0.present = \"TRUE\"\nsata0:0.fileName = \"empty.vmdk\"\n";

/// The tools a drill needs, or `None` after a loud skip.
fn tools(test: &str) -> Option<std::path::PathBuf> {
    require_tool("qemu-system-x86_64", test)?;
    require_tool("qemu-img", test)?;
    require_tool("qemu-nbd", test)
}

/// An empty 16 MiB raw disk, served read-only by qemu-nbd on a Unix socket in `dir`.
fn serve_empty_disk(qemu_nbd: &Path, dir: &Path) -> Server {
    let image = dir.join("empty.raw");
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    Server::qemu_nbd(qemu_nbd, &image, Listen::Unix(dir.join("nbd.sock")), &["-r"])
}

fn spec(server: &Server, work_dir: &Path, timeout: Duration) -> DrillSpec {
    DrillSpec {
        name: "empty @ test".into(),
        vmx: BIOS_SATA.into(),
        disks: vec![DrillDisk { slot: "sata0:0".into(), uri: server.uri() }],
        accel: Accel::Auto,
        boot_controller: None,
        checks: Vec::new(),
        network: Network::None,
        timeout,
        work_dir: work_dir.to_owned(),
    }
}

/// No QEMU whose command line names `work_dir`, and nothing left in it.
fn nothing_left(work_dir: &Path) {
    let pgrep = std::process::Command::new("pgrep").arg("-f").arg(work_dir).output().unwrap();
    assert!(pgrep.stdout.is_empty(), "a QEMU is left: {}", String::from_utf8_lossy(&pgrep.stdout));
    if work_dir.exists() {
        let left: Vec<_> = std::fs::read_dir(work_dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "left in the work folder: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_of_an_empty_disk_fails_with_a_reason_and_keeps_the_evidence() {
    let Some(qemu_nbd) = tools("drill_of_an_empty_disk_fails_with_a_reason_and_keeps_the_evidence") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = serve_empty_disk(&qemu_nbd, dir.path());
    let work_dir = dir.path().join("vm");
    let mut s = spec(&server, &work_dir, Duration::from_secs(20));
    s.checks = vec![Check::serial("login:")];
    let t = Instant::now();
    let said = std::sync::Mutex::new(Vec::new());
    let report =
        drill::run_with_progress(&s, Cancel::new(), &|l| said.lock().unwrap().push(l.to_owned())).await.unwrap();
    let took = t.elapsed();
    eprintln!("drill of an empty disk: {:.1} s; {}", took.as_secs_f64(), report.summary());
    assert!(took < Duration::from_secs(25), "the drill's limit holds: {took:?}");
    assert!(!report.passed);
    let reason = report.reason.clone().unwrap();
    assert!(reason.contains("serial \"login:\"") && reason.contains("not on the serial console"), "{reason}");
    assert_eq!(report.accel, "tcg", "kvm_intel/kvm_amd are not loaded on these machines");
    assert_eq!((report.machine.as_str(), report.firmware.as_str()), ("q35", "SeaBIOS"));
    assert_eq!(report.checks.len(), 1);
    assert!(report.boot_seconds.is_none());
    let png = report.screenshot_png.as_deref().expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 100, "{} bytes", png.len());
    assert!(report.serial_tail.len() <= drill::SERIAL_TAIL_BYTES);
    assert!(said.lock().unwrap().iter().any(|l| l.starts_with("starting QEMU")));
    let back = drill::DrillReport::from_json(&report.to_json()).unwrap();
    assert_eq!((back.passed, back.reason.as_deref()), (false, Some(reason.as_str())));
    assert!(report.to_html().contains("data:image/png;base64,iVBORw0KGgo"));
    nothing_left(&work_dir);
    assert!(!work_dir.exists(), "the work folder the drill made is removed");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_drill_stops_qemu_and_removes_its_overlays() {
    let Some(qemu_nbd) = tools("a_cancelled_drill_stops_qemu_and_removes_its_overlays") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = serve_empty_disk(&qemu_nbd, dir.path());
    let work_dir = dir.path().join("work");
    std::fs::create_dir(&work_dir).unwrap();
    let s = spec(&server, &work_dir, Duration::from_secs(120));
    let cancel = Cancel::new();
    let later = cancel.clone();
    let w = work_dir.clone();
    let watcher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        // QEMU is running and its overlay exists when the cancel comes.
        let overlays = std::fs::read_dir(&w)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "qcow2"))
            .count();
        let running = std::process::Command::new("pgrep").arg("-f").arg(&w).output().unwrap().stdout;
        later.cancel();
        (overlays, !running.is_empty())
    });
    let t = Instant::now();
    let e = drill::run(&s, cancel).await.unwrap_err();
    let took = t.elapsed();
    eprintln!("cancelled at 3 s, returned after {:.1} s", took.as_secs_f64());
    assert!(matches!(e, DrillError::Cancelled), "{e}");
    assert_eq!(watcher.await.unwrap(), (1, true), "an overlay and a QEMU existed before the cancel");
    assert!(took < Duration::from_secs(10), "cancelled at 3 s, stopped at {took:?}");
    nothing_left(&work_dir);
    assert!(work_dir.exists(), "a work folder the caller made stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_export_is_an_overlay_error_and_leaves_nothing() {
    let Some(_) = tools("an_unreachable_export_is_an_overlay_error_and_leaves_nothing") else { return };
    let dir = tempfile::tempdir().unwrap();
    let work_dir = dir.path().join("vm");
    let mut s = DrillSpec {
        name: "gone".into(),
        vmx: BIOS_SATA.into(),
        disks: vec![DrillDisk {
            slot: "sata0:0".into(),
            uri: format!("nbd+unix:///?socket={}", dir.path().join("nobody.sock").display()),
        }],
        accel: Accel::Tcg,
        boot_controller: None,
        checks: Vec::new(),
        network: Network::None,
        timeout: Duration::from_secs(30),
        work_dir: work_dir.clone(),
    };
    let e = drill::run(&s, Cancel::new()).await.unwrap_err();
    assert!(matches!(&e, DrillError::Overlay { slot, .. } if slot == "sata0:0"), "{e}");
    nothing_left(&work_dir);
    assert!(!work_dir.exists());
    // Refused by the plan before anything is made.
    s.vmx = s.vmx.replace("bios", "efi").replace("sata0.present = \"TRUE\"", "sata0.present = \"FALSE\"");
    assert!(matches!(drill::run(&s, Cancel::new()).await, Err(DrillError::Refused { .. })));
    assert!(!work_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_efi_drill_runs_ovmf_on_a_private_variable_store() {
    let Some(qemu_nbd) = tools("an_efi_drill_runs_ovmf_on_a_private_variable_store") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = serve_empty_disk(&qemu_nbd, dir.path());
    let work_dir = dir.path().join("vm");
    let mut s = spec(&server, &work_dir, Duration::from_secs(20));
    s.vmx = BIOS_SATA.replace("bios", "efi");
    let report = drill::run(&s, Cancel::new()).await.unwrap();
    eprintln!("EFI drill of an empty disk: {:.1} s; {}", report.seconds, report.summary());
    assert_eq!(report.firmware, "OVMF");
    assert!(!report.passed && report.reason.as_deref().unwrap_or_default().contains("login:"), "{report:?}");
    assert!(report.screenshot_png.as_deref().is_some_and(|p| p.starts_with(b"\x89PNG\r\n\x1a\n")));
    nothing_left(&work_dir);
    drop(server);
}

fn unix_ms() -> u64 {
    u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// A drill whose only check is a script that passes at once: it ends as soon as QEMU runs,
/// so it proves cheaply that QEMU accepts the plan's devices.
fn starts(
    server: &Server,
    dir: &Path,
    vmx: &str,
    slot: &str,
    boot: Option<drill::BootController>,
) -> drill::DrillReport {
    let work_dir = dir.join(format!("vm-{}", slot.replace(':', "-")));
    let mut s = spec(server, &work_dir, Duration::from_secs(30));
    s.vmx = vmx.into();
    s.disks[0].slot = slot.into();
    s.boot_controller = boot;
    s.checks = vec![Check::script("/bin/true")];
    let before = unix_ms();
    let report = tokio::runtime::Handle::current()
        .block_on(drill::run(&s, Cancel::new()))
        .unwrap_or_else(|e| panic!("{slot} {boot:?}: {e}"));
    let after = unix_ms();
    let started = report.qemu_started_unix_ms.unwrap_or_else(|| panic!("{slot}: no QEMU start in {report:?}"));
    assert!(before <= started && started <= after, "{slot}: QEMU started at {started}, not in [{before}, {after}]");
    nothing_left(&work_dir);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_accepts_every_controller_mapping() {
    let Some(qemu_nbd) = tools("qemu_accepts_every_controller_mapping") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = serve_empty_disk(&qemu_nbd, dir.path());
    let cases: &[(&str, &str, &str, Option<drill::BootController>)] = &[
        ("bios", "scsi0.virtualDev = \"pvscsi\"", "scsi0:0", None),
        ("bios", "scsi0.virtualDev = \"lsisas1068\"", "scsi0:3", None),
        ("bios", "scsi1.virtualDev = \"lsilogic\"", "scsi1:1", None),
        ("efi", "nvme0.present = \"TRUE\"", "nvme0:0", None),
        ("bios", "", "ide1:1", None),
        ("efi", "scsi0.virtualDev = \"pvscsi\"", "scsi0:0", Some(drill::BootController::Sata)),
        ("efi", "scsi0.virtualDev = \"pvscsi\"", "scsi0:0", Some(drill::BootController::Nvme)),
        (
            "efi",
            "scsi0.virtualDev = \"pvscsi\"\nuefi.secureBoot.enabled = \"TRUE\"",
            "scsi0:0",
            Some(drill::BootController::Virtio),
        ),
    ];
    let dir_path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        for (firmware, controller, slot, boot) in cases {
            let vmx = format!(
                "firmware = \"{firmware}\"\nmemsize = \"128\"\n{controller}\n{slot}.present = \"TRUE\"\n{slot}.fileName = \"d.vmdk\"\n"
            );
            let t = Instant::now();
            let r = starts(&server, &dir_path, &vmx, slot, *boot);
            eprintln!("{firmware} {slot} {boot:?}: {} ({:.1} s)", r.summary(), t.elapsed().as_secs_f64());
            assert!(r.passed, "{slot} {boot:?}: {r:?}");
            assert!(r.checks[0].detail.contains("exit status: 0"), "{:?}", r.checks);
            assert_eq!(r.substitutions.len(), usize::from(boot.is_some()), "{:?}", r.substitutions);
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_get_the_drill_s_facts_and_silent_agents_and_ports_fail() {
    let Some(qemu_nbd) = tools("scripts_get_the_drill_s_facts_and_silent_agents_and_ports_fail") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = serve_empty_disk(&qemu_nbd, dir.path());
    let script = dir.path().join("check.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ -S \"$DRILL_QMP_SOCKET\" ] && [ -S \"$DRILL_QGA_SOCKET\" ] && [ -f \"$DRILL_SERIAL_LOG\" ] && \
         [ -n \"$DRILL_TCP_22\" ] && echo \"facts ok $DRILL_TCP_22\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let work_dir = dir.path().join("vm");
    let mut s = spec(&server, &work_dir, Duration::from_secs(40));
    s.vmx = format!("{BIOS_SATA}ethernet0.virtualDev = \"e1000\"\n");
    s.network = Network::Isolated;
    s.checks = vec![
        Check::script(&script),
        Check::guest_ping().with_timeout(Duration::from_secs(3)),
        Check::tcp_port(22).with_timeout(Duration::from_secs(3)),
    ];
    let report = drill::run(&s, Cancel::new()).await.unwrap();
    eprintln!("{}", report.to_json());
    assert!(!report.passed);
    let [script, ping, tcp] = &report.checks[..] else { panic!("{:?}", report.checks) };
    assert!(script.passed && script.detail.contains("facts ok 127.0.0.1:"), "{script:?}");
    assert!(!ping.passed && ping.detail.contains("did not answer"), "{ping:?}");
    assert!(!tcp.passed && tcp.detail.contains("the guest did not answer a connection to port 22"), "{tcp:?}");
    assert!(report.reason.as_deref().unwrap().starts_with("guest-ping: "), "{:?}", report.reason);
    assert!(report.screenshot_png.is_some());
    nothing_left(&work_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_of_the_boot_disk_fixtures_see_the_marker_and_the_guest_s_hash() {
    let test = "drills_of_the_boot_disk_fixtures_see_the_marker_and_the_guest_s_hash";
    let Some(qemu_nbd) = tools(test) else { return };
    for variant in testkit::bootdisk::Variant::ALL {
        let Some(disk) = testkit::bootdisk::require(variant, test) else { return };
        let dir = tempfile::tempdir().unwrap();
        let server = Server::qemu_nbd(&qemu_nbd, &disk.path, Listen::Unix(dir.path().join("nbd.sock")), &["-r"]);
        let work_dir = dir.path().join("vm");
        let s = DrillSpec {
            name: format!("fixture {}", variant.name()),
            vmx: disk.vmx.clone(),
            disks: vec![DrillDisk { slot: disk.slot.clone(), uri: server.uri() }],
            accel: Accel::Auto,
            boot_controller: None,
            checks: vec![Check::serial(&disk.marker), Check::serial(disk.payload_line())],
            network: Network::None,
            timeout: Duration::from_secs(120),
            work_dir: work_dir.clone(),
        };
        let report = drill::run(&s, Cancel::new()).await.unwrap();
        eprintln!("{}: {} in {:.1} s", variant.name(), report.summary(), report.seconds);
        assert!(report.passed, "{}", report.to_json());
        assert_eq!(report.firmware, if variant.efi() { "OVMF" } else { "SeaBIOS" });
        assert!(report.serial_tail.contains(&disk.payload_line()), "the guest read the served bytes");
        assert!(report.boot_seconds.is_some_and(|s| s > 0.0));
        assert!(report.screenshot_png.as_deref().is_some_and(|p| p.starts_with(b"\x89PNG\r\n\x1a\n")));
        nothing_left(&work_dir);
    }
}
