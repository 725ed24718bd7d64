//! `proxy repo` as a user runs it: init, a full backup of an image, an incremental from a
//! changed-areas list that reads only the changed chunks, list, restores to a raw file and to
//! a streamOptimized VMDK that qemu-img reads back identically, verify naming a damaged
//! restore point, prune and gc; and backups killed with SIGKILL at random moments that never
//! damage an existing restore point.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy"))
}

fn image(path: &Path, size: u64, seed: u64) -> u64 {
    testkit::sparse_image(path, size, seed)
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn run(args: &[&str]) -> Output {
    proxy().args(args).output().unwrap()
}

fn same(a: &Path, b: &Path) {
    testkit::same_contents(a, b).unwrap().unwrap_or_else(|e| panic!("{} and {} differ: {e}", a.display(), b.display()));
}

#[test]
fn backup_incremental_restore_verify_prune_gc_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (img, repo) = (d("disk.raw"), d("repo"));
    let size = 32 * MIB;
    image(Path::new(&img), size, 7);
    ok(&run(&["repo", "init", &repo, "--chunk-size", "1M"]));
    let e = run(&["repo", "init", &repo]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("already holds a repository"));

    let full = json(&run(&["repo", "backup", &repo, &img, "--name", "vm1", "--json"]));
    assert!(full["parent"].is_null());
    std::fs::copy(&img, d("v1.raw")).unwrap();

    // Change three small areas; tell the backup exactly where.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for at in [100, 5 * MIB + 7, size - 3] {
        f.write_all_at(b"new", at).unwrap();
    }
    std::fs::write(d("changed"), format!("100 3\n{} 3\n{} 3\n", 5 * MIB + 7, size - 3)).unwrap();
    let inc = json(&run(&["repo", "backup", &repo, &img, "--name", "vm1", "--changed", &d("changed"), "--json"]));
    assert_eq!(inc["parent"], full["point"]);
    assert_eq!(inc["read"], 3 * MIB, "only the three changed chunks are read: {inc}");
    assert_eq!(inc["stored_chunks"], 3, "{inc}");
    // Without a list, everything allocated is read and only what differs is stored.
    let again = json(&run(&["repo", "backup", &repo, &img, "--name", "vm1", "--json"]));
    assert_eq!(again["stored_chunks"], 0, "{again}");

    let listed = json(&run(&["repo", "list", &repo, "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 3);

    // Restores: the incremental is a full; the first is untouched.
    ok(&run(&["repo", "restore", &repo, inc["point"].as_str().unwrap(), &d("out.raw")]));
    same(Path::new(&d("out.raw")), Path::new(&img));
    ok(&run(&["repo", "restore", &repo, full["point"].as_str().unwrap(), &d("old.raw")]));
    same(Path::new(&d("old.raw")), Path::new(&d("v1.raw")));
    if let Some(qemu_img) = testkit::require_tool("qemu-img", "repo restore to a streamOptimized VMDK") {
        ok(&run(&["repo", "restore", &repo, "latest", &d("out.vmdk")]));
        let info = testkit::run(Command::new(&qemu_img).args(["info", "--output=json", &d("out.vmdk")]));
        assert!(info.contains("streamOptimized"), "{info}");
        testkit::run(Command::new(&qemu_img).args(["convert", "-O", "raw", &d("out.vmdk"), &d("from-vmdk.raw")]));
        same(Path::new(&d("from-vmdk.raw")), Path::new(&img));
    }

    // Verify: clean (exit 0), then a damaged chunk only the newer points use (exit 2, named).
    ok(&run(&["repo", "verify", &repo]));
    let ix = std::fs::read(Path::new(&repo).join(format!("indexes/{}/0.idx", inc["point"].as_str().unwrap()))).unwrap();
    let first: String = ix[32..64].iter().map(|b| format!("{b:02x}")).collect();
    let chunk = Path::new(&repo).join(format!("chunks/{}/{first}", &first[..2]));
    let mut bytes = std::fs::read(&chunk).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&chunk, &bytes).unwrap();
    let v = run(&["repo", "verify", &repo, "--json"]);
    assert_eq!(v.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let damaged: Vec<&String> = report["damaged_points"].as_object().unwrap().keys().collect();
    assert_eq!(damaged, vec![inc["point"].as_str().unwrap(), again["point"].as_str().unwrap()]);
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&chunk, &bytes).unwrap();

    // Prune to the newest, collect, and the newest still restores exactly.
    let pruned = json(&run(&["repo", "prune", &repo, "--keep-last", "1", "--json"]));
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 2, "{pruned}");
    let gc = json(&run(&["repo", "gc", &repo, "--grace", "0s", "--json"]));
    // What is left is exactly what the kept restore point uses.
    let files: usize = std::fs::read_dir(Path::new(&repo).join("chunks"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(files as u64, gc["chunks_in_use"].as_u64().unwrap(), "{gc}");
    let data_mib = std::fs::read(&img).unwrap().chunks(MIB as usize).filter(|c| c.iter().any(|&b| b != 0)).count();
    assert_eq!(files, data_mib, "one chunk per MiB holding data: {gc}");
    ok(&run(&["repo", "restore", &repo, "latest", &d("last.raw")]));
    same(Path::new(&d("last.raw")), Path::new(&img));
    ok(&run(&["repo", "verify", &repo]));
    let e = run(&["repo", "prune", &repo]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("keeps nothing"), "a policy of nothing is refused");
}

#[test]
fn backups_killed_at_random_moments_never_damage_a_restore_point() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let repo = d("repo");
    let size = 48 * MIB;
    ok(&run(&["repo", "init", &repo, "--chunk-size", "1M"]));
    let scale: u64 = std::env::var("SYNCPROXY_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let rounds = 12 * scale;
    // How long one backup takes here, so the kills land anywhere in one.
    let first = d("first.raw");
    image(Path::new(&first), size, 1000);
    let t = std::time::Instant::now();
    ok(&run(&["repo", "backup", &repo, &first, "--name", "vm"]));
    let span = (t.elapsed().as_millis() as u64 * 6 / 5).max(20);
    let mut images = vec![first];
    let mut x = 0x9E37_79B9u64;
    let (mut killed, mut finished) = (0, 0);
    for round in 0..rounds {
        let img = d(&format!("img{round}.raw"));
        image(Path::new(&img), size, round + 1);
        images.push(img.clone());
        let mut child = proxy()
            .args(["repo", "backup", &repo, &img, "--name", "vm", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(x % span));
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
        let _ = child.wait();
        // Every restore point there is restores to one of the images, and verify is clean.
        let v = run(&["repo", "verify", &repo]);
        assert!(
            v.status.success(),
            "round {round}: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let points = json(&run(&["repo", "list", &repo, "--json"]));
        let newest = points.as_array().unwrap().last().map(|p| p["id"].as_str().unwrap().to_owned());
        if let Some(id) = newest {
            let out = d("check.raw");
            let _ = std::fs::remove_file(&out);
            ok(&run(&["repo", "restore", &repo, &id, &out]));
            let got = std::fs::read(&out).unwrap();
            assert!(
                images.iter().any(|i| std::fs::read(i).unwrap() == got),
                "round {round}: restore point {id} restores to none of the images"
            );
        }
    }
    // The locks the killed processes left are stale (their PIDs are gone): gc proceeds.
    ok(&run(&["repo", "gc", &repo, "--grace", "0s"]));
    ok(&run(&["repo", "verify", &repo]));
    eprintln!("{killed} backups killed, {finished} finished; no restore point damaged");
    assert!(killed > 0, "the loop must kill some backups to test anything");
}

#[test]
fn an_encrypted_repository_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (img, repo, key) = (d("disk.raw"), d("repo"), d("repo.key"));
    image(Path::new(&img), 16 * MIB, 3);
    let init = run(&["repo", "init", &repo, "--encrypt", "--key-file", &key]);
    assert!(String::from_utf8_lossy(&init.stderr).contains("keep a copy"), "init tells where the key is");
    ok(&init);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let key_text = std::fs::read_to_string(&key).unwrap();
    ok(&run(&["repo", "backup", &repo, &img, "--key-file", &key]));
    let e = run(&["repo", "list", &repo]);
    assert!(!e.status.success());
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(msg.contains("is encrypted") && msg.contains("--key-file"), "{msg}");
    ok(&run(&["repo", "restore", &repo, "latest", &d("out.raw"), "--key-file", &key]));
    same(Path::new(&d("out.raw")), Path::new(&img));
    ok(&run(&["repo", "verify", &repo, "--key-file", &key]));
    // The key never appears in anything the commands print.
    let out = run(&["repo", "list", &repo, "--key-file", &key, "--json"]);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains(key_text.trim()));
}

#[test]
fn vmdk_and_nbd_sources_nbd_restores_and_configuration_files() {
    const TEST: &str = "vmdk_and_nbd_sources_nbd_restores_and_configuration_files";
    let Some(qemu_img) = testkit::require_tool("qemu-img", TEST) else { return };
    let Some(qemu_nbd) = testkit::require_tool("qemu-nbd", TEST) else { return };
    use testkit::servers::{Listen, Server};
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (img, repo) = (d("disk.raw"), d("repo"));
    image(Path::new(&img), 24 * MIB, 21);
    ok(&run(&["repo", "init", &repo, "--chunk-size", "1M"]));

    // A VMDK made by qemu-img, with the VM's configuration files beside it.
    testkit::run(Command::new(&qemu_img).args(["convert", "-O", "vmdk", &img, &d("disk.vmdk")]));
    std::fs::write(d("db01.vmx"), "displayName = \"db01\"\n").unwrap();
    std::fs::write(d("db01.nvram"), vec![7u8; 4096]).unwrap();
    let v = json(&run(&[
        "repo",
        "backup",
        &repo,
        &d("disk.vmdk"),
        "--name",
        "db01",
        "--file",
        &d("db01.vmx"),
        "--file",
        &d("db01.nvram"),
        "--json",
    ]));
    ok(&run(&["repo", "restore", &repo, v["point"].as_str().unwrap(), &d("from-vmdk.raw")]));
    same(Path::new(&d("from-vmdk.raw")), Path::new(&img));
    ok(&run(&["repo", "restore", &repo, "latest", &d("restored.vmx"), "--file", "db01.vmx"]));
    assert_eq!(std::fs::read(d("restored.vmx")).unwrap(), std::fs::read(d("db01.vmx")).unwrap());
    let e = run(&["repo", "restore", &repo, "latest", &d("restored.vmx"), "--file", "db01.vmx"]);
    assert!(!e.status.success(), "never over an existing file");
    assert!(ok(&run(&["repo", "list", &repo])).contains("db01.vmx, db01.nvram"));

    // An NBD export as the source (qemu-nbd, read-only), then a restore into another one.
    let src = Server::qemu_nbd(&qemu_nbd, Path::new(&img), Listen::Unix(dir.path().join("s.sock")), &["-r"]);
    ok(&run(&["repo", "backup", &repo, &src.uri(), "--name", "db01-nbd"]));
    let target = d("target.raw");
    File::create(&target).unwrap().set_len(24 * MIB).unwrap();
    // Garbage where the disk has holes: the restore must write zeros there.
    std::fs::OpenOptions::new().write(true).open(&target).unwrap().write_all_at(&vec![0xFF; 4 << 20], 0).unwrap();
    let dst = Server::qemu_nbd(&qemu_nbd, Path::new(&target), Listen::Unix(dir.path().join("t.sock")), &[]);
    ok(&run(&["repo", "restore", &repo, "latest", &dst.uri()]));
    drop(dst);
    same(Path::new(&target), Path::new(&img));
}

#[test]
fn a_failed_restore_leaves_the_target_as_it_was_and_replacing_a_file_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (img, repo) = (d("disk.raw"), d("repo"));
    image(Path::new(&img), 16 * MIB, 31);
    ok(&run(&["repo", "init", &repo, "--chunk-size", "1M"]));
    ok(&run(&["repo", "backup", &repo, &img, "--name", "vm"]));
    let entries = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    // An existing file is replaced only with --force.
    let old = vec![0xab; MIB as usize];
    std::fs::write(d("out.raw"), &old).unwrap();
    let e = run(&["repo", "restore", &repo, "latest", &d("out.raw")]);
    assert!(!e.status.success(), "a restore over an existing file without --force succeeded");
    assert!(String::from_utf8_lossy(&e.stderr).contains("--force"), "{}", String::from_utf8_lossy(&e.stderr));
    assert_eq!(std::fs::read(d("out.raw")).unwrap(), old, "refused, the file is untouched");
    ok(&run(&["repo", "restore", &repo, "latest", &d("out.raw"), "--force"]));
    same(Path::new(&d("out.raw")), Path::new(&img));

    // A chunk that fails its check half-way: the restore fails, the existing file is as it
    // was, a new one never appears, and no temporary file is left behind.
    std::fs::write(d("out.raw"), &old).unwrap();
    let before = entries();
    let point = json(&run(&["repo", "list", &repo, "--json"]))[0]["id"].as_str().unwrap().to_owned();
    let ix = std::fs::read(Path::new(&repo).join(format!("indexes/{point}/0.idx"))).unwrap();
    // The last chunk that holds data (entries follow a 32-byte header; a checksum ends the file).
    let last = ix[32..ix.len() - 32].chunks(32).rev().find(|c| c.iter().any(|&b| b != 0)).unwrap();
    let name: String = last.iter().map(|b| format!("{b:02x}")).collect();
    let chunk = Path::new(&repo).join(format!("chunks/{}/{name}", &name[..2]));
    let mut bytes = std::fs::read(&chunk).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&chunk, &bytes).unwrap();
    for (target, force) in [(d("out.raw"), true), (d("new.raw"), false), (d("new.vmdk"), false)] {
        let mut args = vec!["repo", "restore", &repo, "latest", &target];
        if force {
            args.push("--force");
        }
        let e = run(&args);
        let err = String::from_utf8_lossy(&e.stderr);
        assert!(!e.status.success(), "{target}: a restore from a damaged chunk succeeded");
        assert!(err.contains("is left as it was"), "{target}: {err}");
        assert_eq!(entries(), before, "{target}: nothing appears or is left behind");
    }
    assert_eq!(std::fs::read(d("out.raw")).unwrap(), old, "the failed restore left the file as it was");
}
