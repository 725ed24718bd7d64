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

fn chunk_count(repo: &str) -> usize {
    testkit::files_under(&Path::new(repo).join("chunks")).len()
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
    // Only the nine changed bytes are read; the rest of their three chunks comes from the parent.
    assert_eq!(inc["read"], 9, "only the changed bytes are read: {inc}");
    assert_eq!(inc["read_back"], 3 * MIB, "{inc}");
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
    let mut images = vec![first.clone()];
    let mut newest_image = Some(first);
    let mut rng = testkit::KillRng::new();
    let (mut killed, mut finished, mut incrementals) = (0, 0, 0);
    for round in 0..rounds {
        let img = d(&format!("img{round}.raw"));
        let mut args =
            vec!["repo".to_owned(), "backup".into(), repo.clone(), img.clone(), "--name".into(), "vm".into()];
        match &newest_image {
            // Every other round an incremental: the newest point's image with scattered
            // changes, named in a --changed file; the rest of each touched chunk comes from
            // the parent point, so a wrong patch restores to none of the images.
            Some(parent) if round % 2 == 1 => {
                std::fs::copy(parent, &img).unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
                let mut changed = String::new();
                for k in 0..40u64 {
                    let at = rng.below(size / 4096 - 16) * 4096;
                    let len = 4096 * (1 + k % 16);
                    let seed = rng.below(u64::MAX);
                    std::os::unix::fs::FileExt::write_all_at(&f, &testkit::noise(len as usize, seed), at).unwrap();
                    changed.push_str(&format!("{at} {len}\n"));
                }
                std::fs::write(d("changed"), changed).unwrap();
                args.extend(["--changed".into(), d("changed")]);
                incrementals += 1;
            }
            _ => {
                image(Path::new(&img), size, round + 1);
            }
        }
        images.push(img.clone());
        let mut child =
            proxy().args(&args).arg("--json").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(span)));
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
            newest_image = images.iter().find(|i| std::fs::read(i).unwrap() == got).cloned();
            assert!(newest_image.is_some(), "round {round}: restore point {id} restores to none of the images");
        }
    }
    // The locks the killed processes left are stale (their PIDs are gone): gc proceeds, and
    // collects the temporary files and the chunks the killed backups left.
    let gc = json(&run(&["repo", "gc", &repo, "--grace", "0s", "--json"]));
    let left = testkit::files_under(Path::new(&repo));
    let temporaries: Vec<_> = left.iter().filter(|p| p.to_string_lossy().contains("/.tmp-")).collect();
    assert!(temporaries.is_empty(), "{temporaries:?}");
    let chunks = left.iter().filter(|p| p.starts_with(Path::new(&repo).join("chunks"))).count();
    assert_eq!(chunks as u64, gc["chunks_in_use"].as_u64().unwrap(), "{gc}");
    ok(&run(&["repo", "verify", &repo]));
    eprintln!(
        "{killed} backups killed, {finished} finished ({incrementals} of them incrementals with --changed); no restore \
         point damaged"
    );
    assert!(incrementals > 0, "the loop must try incrementals");
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
    // `latest` alone would be refused here: two sources have points.
    ok(&run(&["repo", "restore", &repo, "db01-nbd@latest", &dst.uri()]));
    drop(dst);
    same(Path::new(&target), Path::new(&img));
}

#[test]
fn init_writes_no_key_unless_it_makes_the_repository_and_takes_a_bare_key_name() {
    let dir = tempfile::tempdir().unwrap();
    let here = |args: &[&str]| proxy().current_dir(dir.path()).args(args).output().unwrap();
    let err = |out: &Output| {
        assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A bare relative name, in the working directory.
    ok(&here(&["repo", "init", "repo", "--encrypt", "--key-file", "k"]));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.path().join("k")).unwrap().permissions().mode() & 0o777, 0o600);
    ok(&here(&["repo", "list", "repo", "--key-file", "k"]));
    // An existing repository, or a chunk size that cannot be: refused, and no key written.
    let e = err(&here(&["repo", "init", "repo", "--encrypt", "--key-file", "k2"]));
    assert!(e.contains("already holds a repository"), "{e}");
    assert!(!dir.path().join("k2").exists(), "a new key for a repository that was not made");
    let e = err(&here(&["repo", "init", "other", "--encrypt", "--key-file", "k3", "--chunk-size", "3M"]));
    assert!(e.contains("chunk size"), "{e}");
    assert!(!dir.path().join("k3").exists());
    // A key file others can read works, with a warning that names it.
    std::fs::set_permissions(dir.path().join("k"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = here(&["repo", "list", "repo", "--key-file", "k"]);
    ok(&out);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(warned.contains("key file k is open to its group or others"), "{warned}");
    // An endless key file fails at once, with what was wrong.
    let e = err(&here(&["repo", "list", "repo", "--key-file", "/dev/zero"]));
    assert!(e.contains("/dev/zero: longer than 4096 bytes"), "{e}");
}

#[test]
fn one_unreadable_manifest_is_skipped_by_every_command_named_by_verify_and_stops_gc_sweeping() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (img, repo) = (d("disk.raw"), d("repo"));
    image(Path::new(&img), 8 * MIB, 5);
    ok(&run(&["repo", "init", &repo, "--chunk-size", "1M"]));
    let first = json(&run(&["repo", "backup", &repo, &img, "--name", "vm1", "--json"]));
    std::fs::copy(&img, d("v1.raw")).unwrap();
    image(Path::new(&img), 8 * MIB, 6);
    let second = json(&run(&["repo", "backup", &repo, &img, "--name", "vm1", "--json"]));
    let bad = second["point"].as_str().unwrap();
    let manifest = Path::new(&repo).join(format!("points/{bad}.json"));
    let whole = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &whole[..whole.len() / 2]).unwrap();
    let named = |out: &Output| {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(&format!("points/{bad}.json")), "{e}");
    };
    let chunks = chunk_count(&repo);

    let out = run(&["repo", "list", &repo, "--json"]);
    assert_eq!(json(&out).as_array().unwrap().len(), 1);
    named(&out);
    let out = run(&["repo", "verify", &repo, "--json"]);
    assert_eq!(out.status.code(), Some(2), "damage, as for a damaged chunk");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["damaged_points"][bad], serde_json::json!(["manifest"]), "{v}");
    let out = run(&["repo", "prune", &repo, "--keep-last", "1", "--json"]);
    assert!(json(&out)["removed"].as_array().unwrap().is_empty());
    named(&out);
    assert!(manifest.exists());
    let out = run(&["repo", "gc", &repo, "--grace", "0s", "--json"]);
    assert_eq!(out.status.code(), Some(2), "gc refuses to sweep");
    let gc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(gc["unreadable"][0].as_str().unwrap().contains(bad), "{gc}");
    assert_eq!((gc["chunks_removed"].as_u64(), chunk_count(&repo)), (Some(0), chunks), "{gc}");
    let out = run(&["repo", "restore", &repo, "latest", &d("out.raw")]);
    ok(&out);
    named(&out);
    same(Path::new(&d("out.raw")), Path::new(&d("v1.raw")));
    let out = run(&["repo", "backup", &repo, &img, "--name", "vm1", "--json"]);
    assert_eq!(json(&out)["parent"], first["point"]);
    ok(&run(&["repo", "backup", &repo, &d("v1.raw"), "--name", "vm2"]));
    // Repaired, it is a restore point like the others again.
    std::fs::write(&manifest, &whole).unwrap();
    ok(&run(&["repo", "restore", &repo, bad, &d("bad.raw")]));
    ok(&run(&["repo", "verify", &repo]));
    ok(&run(&["repo", "gc", &repo, "--grace", "0s"]));
}

#[test]
fn restore_and_verify_work_on_a_repository_they_cannot_write() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let (img, repo) = (d("disk.raw"), d("repo"));
    image(Path::new(&img), 8 * MIB, 9);
    ok(&run(&["repo", "init", &repo, "--chunk-size", "1M"]));
    ok(&run(&["repo", "backup", &repo, &img, "--name", "vm1"]));
    ok(&run(&["repo", "verify", &repo]));
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    // Root writes whatever the modes say: then the commands run as nobody.
    let root = std::fs::metadata(dir.path()).unwrap().uid() == 0;
    mode(dir.path(), 0o755);
    std::fs::create_dir(d("out")).unwrap();
    mode(Path::new(&d("out")), 0o777);
    let mut dirs = vec![std::path::PathBuf::from(&repo)];
    dirs.extend(testkit::files_under(Path::new(&repo)).iter().filter_map(|f| f.parent().map(Path::to_path_buf)));
    dirs.sort();
    dirs.dedup();
    for p in &dirs {
        mode(p, 0o555);
    }
    let reader = |args: &[&str]| {
        let mut c = proxy();
        c.args(args);
        if root {
            c.uid(65534).gid(65534);
        }
        c.output().unwrap()
    };
    let out = reader(&["repo", "verify", &repo]);
    ok(&out);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(warned.contains("without a lock, because writing is not permitted"), "{warned}");
    ok(&reader(&["repo", "restore", &repo, "latest", &d("out/out.raw")]));
    same(Path::new(&d("out/out.raw")), Path::new(&img));
    // Writers still need their lock.
    assert!(!reader(&["repo", "backup", &repo, &img, "--name", "vm1"]).status.success());
    assert!(!reader(&["repo", "gc", &repo]).status.success());
    assert!(!reader(&["repo", "prune", &repo, "--keep-last", "1"]).status.success());
    for p in &dirs {
        mode(p, 0o755);
    }
    assert!(testkit::files_under(&Path::new(&repo).join("locks")).is_empty(), "no lock was left behind");
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

/// A repository of two VMs as an operator meets it: `repo list` grouped by VM with readable
/// sizes and filters, a bare `latest` refused with the choices named, `vmA@latest` restoring
/// vmA's disk, and a protected point kept by prune and refused by forget until unprotected.
#[test]
fn two_vms_points_by_name_protection_and_forget() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let repo = d("repo");
    ok(&run(&["repo", "init", &repo]));
    assert!(image(Path::new(&d("a.raw")), 16 * MIB, 5) > 0);
    assert!(image(Path::new(&d("b.raw")), 16 * MIB, 6) > 0);
    let a1 = json(&run(&["repo", "backup", &repo, &d("a.raw"), "--name", "vmA", "--json"]));
    json(&run(&["repo", "backup", &repo, &d("b.raw"), "--name", "vmB", "--json"]));
    let a2 = json(&run(&["repo", "backup", &repo, &d("a.raw"), "--name", "vmA", "--json"]));

    // A bare `latest` would be vmB's newest point or vmA's: refused, naming both.
    let e = run(&["repo", "restore", &repo, "latest", &d("out.raw")]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("vmA@latest") && err.contains("vmB@latest"), "{err}");
    assert!(!Path::new(&d("out.raw")).exists());
    ok(&run(&["repo", "restore", &repo, "vmA@latest", &d("out.raw")]));
    same(Path::new(&d("a.raw")), Path::new(&d("out.raw")));

    // Grouped, with a header per VM and human units; filters by VM and by time.
    let list = ok(&run(&["repo", "list", &repo]));
    assert!(list.contains("vmA: 2 restore point(s)") && list.contains("vmB: 1 restore point(s)"), "{list}");
    assert!(list.contains("16.0 MiB") && list.contains("crash"), "{list}");
    let only_b = ok(&run(&["repo", "list", &repo, "--vm", "vmB"]));
    assert!(only_b.contains("vmB:") && !only_b.contains("vmA:"), "{only_b}");
    let e = run(&["repo", "list", &repo, "--vm", "vmC"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("vmA, vmB"));
    let count =
        |since: &str| json(&run(&["repo", "list", &repo, "--since", since, "--json"])).as_array().unwrap().len();
    assert_eq!((count("2000-01-01"), count("2099")), (3, 0));
    assert!(a2["point"].is_string());

    // Stats: vmA's second point references the same chunks as its first.
    let st = json(&run(&["repo", "stats", &repo, "--json"]));
    let (logical, unique) = (st["logical_bytes"].as_u64().unwrap(), st["unique_bytes"].as_u64().unwrap());
    assert!(unique > 0 && logical >= unique * 3 / 2, "{st}");
    assert_eq!(st["vms"].as_array().unwrap().len(), 2, "{st}");
    assert!(st["stored_bytes"].as_u64().unwrap() > 0 && st["compression_factor"].as_f64().unwrap() > 0.0, "{st}");
    let text = ok(&run(&["repo", "stats", &repo]));
    assert!(text.contains("deduplication") && text.contains("vmA"), "{text}");

    // Protected: prune keeps it although the policy would not, forget refuses it.
    let first = a1["point"].as_str().unwrap();
    ok(&run(&["repo", "protect", &repo, first, "--note", "before the incident"]));
    let list = ok(&run(&["repo", "list", &repo, "--vm", "vmA"]));
    assert!(list.contains("protected since") && list.contains("before the incident"), "{list}");
    let pruned = json(&run(&["repo", "prune", &repo, "--keep-last", "1", "--json"]));
    let removed: Vec<&str> = pruned["removed"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(!removed.contains(&first), "{pruned}");
    let e = run(&["repo", "forget", &repo, first]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("protected"));
    ok(&run(&["repo", "unprotect", &repo, first]));
    let gone = json(&run(&["repo", "forget", &repo, first, "--json"]));
    assert_eq!(gone["forgotten"], first);
    let left = json(&run(&["repo", "list", &repo, "--json"]));
    assert!(left.as_array().unwrap().iter().all(|p| p["id"] != first), "{left}");
    ok(&run(&["repo", "gc", &repo, "--grace", "0s"]));
    ok(&run(&["repo", "restore", &repo, "vmA@latest", &d("out2.raw")]));
    same(Path::new(&d("a.raw")), Path::new(&d("out2.raw")));
}

#[test]
fn commands_that_only_read_create_nothing_at_a_mistyped_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo/repo");
    let m = missing.to_str().unwrap();
    let out = dir.path().join("out.raw");
    for args in [
        vec!["repo", "list", m],
        vec!["repo", "stats", m],
        vec!["repo", "verify", m],
        vec!["repo", "gc", m],
        vec!["repo", "prune", m, "--keep-last", "1"],
        vec!["repo", "restore", m, "latest", out.to_str().unwrap()],
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded on a missing repository");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not a repository"), "{args:?}: {err}");
        assert!(!dir.path().join("typo").exists(), "{args:?} created {}", dir.path().join("typo").display());
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // init makes it.
    ok(&run(&["repo", "init", m]));
    assert!(missing.join("config").exists());
    ok(&run(&["repo", "list", m]));
}
