//! `proxy drill` end to end, as an operator runs it: VMs of the simulator that hold bootable
//! Debian guests (BIOS on SATA, BIOS on PVSCSI, EFI on SATA) backed up with `proxy backup`,
//! then each restore point booted straight from the repository under QEMU (TCG here): the
//! guest prints the hash of what it read, which must be the original disk's. An EFI VM on
//! PVSCSI gets the firmware's limit in one line, not a hang; a point whose kernel chunk is
//! damaged fails its drill naming that chunk (and `repo verify` names it too); Ctrl-C stops
//! the VM and leaves nothing behind, and SIGKILL takes the VM with it.

mod drill_env;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drill_env::{Env, guests, output};
use repo::Repo;
use testkit::bootdisk::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fixture_backed_up_from_vsphere_boots_from_its_restore_point_and_reads_its_bytes() {
    let test = "each_fixture_backed_up_from_vsphere_boots_from_its_restore_point_and_reads_its_bytes";
    let Some(guests) = guests(
        test,
        &[
            ("bios", Variant::Bios, "sata", Variant::Bios),
            ("pvscsi", Variant::BiosPvscsi, "pvscsi", Variant::BiosPvscsi),
            ("efi", Variant::Efi, "sata", Variant::Efi),
        ],
    ) else {
        return;
    };
    let env = Env::start(&guests).await;
    env.backup().await;
    for g in &guests {
        let point = env.point(g.name);
        assert!(point.files.iter().any(|f| f.name.ends_with(".vmx")), "{}: the .vmx was captured", g.name);
        // The guest's hash of its payload is the pattern: the drill passes only when the guest
        // read exactly the bytes the VM held.
        let report_dir = env.dir.path().join(format!("report-{}", g.name));
        let c = env.drill(
            &point.id,
            &["--expect", &g.disk.payload_line(), "--timeout", "3m", "--report-dir", &report_dir.display().to_string()],
        );
        let (code, out, err) = output(c).await;
        assert_eq!(code, 0, "{}: drill failed:\n{out}\n{err}", g.name);
        assert!(out.contains("PASSED"), "{out}");
        assert!(out.contains(if g.disk.variant.efi() { "OVMF" } else { "SeaBIOS" }), "{out}");
        let json = std::fs::read_to_string(report_dir.join(format!("drill-{}.json", point.id))).unwrap();
        let report: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(report["passed"], true);
        assert_eq!(report["accel"], "tcg", "this host's KVM cannot run firmware: {json}");
        assert!(report["serial_tail"].as_str().unwrap().contains(&g.disk.marker), "{json}");
        let html = std::fs::read_to_string(report_dir.join(format!("drill-{}.html", point.id))).unwrap();
        assert!(html.contains("data:image/png;base64,"), "the screenshot is inline");
        eprintln!("{}: booted in {:.1} s", g.name, report["boot_seconds"].as_f64().unwrap());
        // Kept beside the point, and listed.
        let repo = Repo::open(env.repo_path()).unwrap();
        let kept = repo.drill_reports(&point.id).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].passed);
        env.assert_nothing_left();
    }
    let (code, list, _) = output(env.proxy(&["repo", "list", &env.repo_path().display().to_string()])).await;
    assert_eq!(code, 0);
    assert_eq!(list.matches("drill ").count(), 3, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_efi_vm_on_pvscsi_gets_the_firmware_limit_at_once_not_a_hang() {
    let test = "an_efi_vm_on_pvscsi_gets_the_firmware_limit_at_once_not_a_hang";
    let Some(guests) = guests(test, &[("efi-pv", Variant::BiosPvscsi, "pvscsi", Variant::Efi)]) else { return };
    let env = Env::start(&guests).await;
    env.backup().await;
    let point = env.point("efi-pv");
    let t = Instant::now();
    let (code, out, err) = output(env.drill(&point.id, &["--timeout", "3m"])).await;
    assert_eq!(code, 1, "refused before booting:\n{out}\n{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "refused at once, not after a hang: {:?}", t.elapsed());
    assert!(err.contains("pvscsi") || err.contains("PVSCSI"), "{err}");
    assert!(err.contains("--boot-controller"), "the way out is offered: {err}");
    env.assert_nothing_left();
}

/// Where the kernel starts in a fixture: the bzImage header's `HdrS` at 0x202 of a sector.
fn kernel_offset(image: &Path) -> u64 {
    let data = std::fs::read(image).unwrap();
    let at = (0..data.len() / 512)
        .map(|s| s * 512)
        .find(|&at| data.get(at + 0x202..at + 0x206) == Some(b"HdrS"))
        .expect("a kernel in the fixture");
    at as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_kernel_chunk_fails_the_drill_naming_it_and_verify_names_it_too() {
    let test = "a_damaged_kernel_chunk_fails_the_drill_naming_it_and_verify_names_it_too";
    let Some(guests) = guests(test, &[("bios", Variant::Bios, "sata", Variant::Bios)]) else { return };
    let env = Env::start(&guests).await;
    env.backup().await;
    let point = env.point("bios");
    let repo = Repo::open(env.repo_path()).unwrap();
    let index = repo.index(&point, 0).unwrap();
    let slot = kernel_offset(&guests[0].disk.path) / u64::from(index.chunk_size);
    let chunk = repo::chunk_name(&index.ids[usize::try_from(slot).unwrap()]);
    let file = env.repo_path().join(&chunk);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, bytes).unwrap();

    let t = Instant::now();
    let (code, out, err) =
        output(env.drill(&point.id, &["--expect", &guests[0].disk.marker, "--timeout", "60s"])).await;
    assert_eq!(code, 2, "the drill ran and failed:\n{out}\n{err}");
    assert!(t.elapsed() < Duration::from_secs(90), "it costs no more than its timeout: {:?}", t.elapsed());
    assert!(out.contains("failed verification"), "{out}");
    assert!(out.contains(&chunk), "the reason names the damaged chunk {chunk}:\n{out}");
    let kept = repo.drill_reports(&point.id).unwrap();
    assert!(!kept[0].passed && kept[0].summary.contains(&chunk), "{kept:?}");
    env.assert_nothing_left();

    let (code, out, err) = output(env.proxy(&["repo", "verify", &env.repo_path().display().to_string()])).await;
    assert_ne!(code, 0, "verify finds the damage:\n{out}\n{err}");
    assert!(format!("{out}{err}").contains(&chunk), "verify names {chunk}:\n{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_mid_boot_stops_the_vm_and_leaves_nothing_behind() {
    let test = "ctrl_c_mid_boot_stops_the_vm_and_leaves_nothing_behind";
    let Some(guests) = guests(test, &[("bios", Variant::Bios, "sata", Variant::Bios)]) else { return };
    let env = Env::start(&guests).await;
    env.backup().await;
    let point = env.point("bios");
    // At moments from before QEMU starts to mid-boot.
    for after in [300, 1500, 3000] {
        let mut c = env.drill(&point.id, &["--expect", "never printed", "--timeout", "3m", "--no-keep"]);
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        let child = c.spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(after)).await;
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        let t = Instant::now();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "stopped promptly: {:?}", t.elapsed());
        assert_ne!(out.status.code(), Some(0), "an interrupted drill is not a pass");
        env.assert_nothing_left();
    }
    assert!(Repo::open(env.repo_path()).unwrap().drill_reports(&point.id).unwrap().is_empty());

    // SIGKILL runs no clean-up: QEMU dies with the proxy all the same, and the next drill
    // removes the work folder the dead one left.
    let mut c = env.drill(&point.id, &["--expect", "never printed", "--timeout", "3m", "--no-keep"]);
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    child.kill().unwrap();
    tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let tmp = env.tmp().display().to_string();
    let t = Instant::now();
    while !Command::new("pgrep").args(["-f", &tmp]).output().unwrap().stdout.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "QEMU outlived the proxy killed with SIGKILL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read_dir(env.tmp()).unwrap().count(), 1, "the dead drill's folder is there until the next");
    let (code, out, err) =
        output(env.drill(&point.id, &["--expect", &guests[0].disk.marker, "--timeout", "3m", "--no-keep"])).await;
    assert_eq!(code, 0, "{out}\n{err}");
    env.assert_nothing_left();
}
