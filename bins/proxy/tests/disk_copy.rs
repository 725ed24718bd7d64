//! `proxy disk-copy` as a user runs it: file, VMDK and NBD sources and destinations, compared
//! with `cmp`; a copy killed with SIGKILL past half-way that resumes; clear errors.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::require_tool;
use testkit::servers::{Listen, Server, free_port};

const MIB: u64 = 1 << 20;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy"))
}

fn image(path: &Path, size: u64, seed: u64) -> u64 {
    testkit::sparse_image(path, size, seed)
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn same(a: &Path, b: &Path) {
    testkit::same_contents(a, b).unwrap().unwrap();
}

#[test]
fn files_and_vmdks_copy_exactly_and_a_second_copy_rewrites_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let data = image(&src, 64 * MIB, 3);
    let s = summary(&proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--json").output().unwrap());
    assert_eq!(s["copied"], data);
    assert_eq!(s["read"], data, "only allocated data is read");
    same(&src, &dst);
    // Sparse on disk: the holes stayed holes.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).unwrap());
    assert!(blocks * 512 < data + 8 * MIB, "{} bytes allocated for {data} of data", blocks * 512);

    // The destination now holds other data: a second copy zeroes what is not in the source.
    let f = File::options().write(true).open(&dst).unwrap();
    for i in 0..64 {
        f.write_all_at(&[0xff; 4096], i * MIB).unwrap();
    }
    let s = summary(&proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--json").output().unwrap());
    assert_eq!(s["zero"], 64 * MIB - data);
    same(&src, &dst);

    if let Some(qemu_img) =
        require_tool("qemu-img", "files_and_vmdks_copy_exactly_and_a_second_copy_rewrites_the_target")
    {
        let vmdk = dir.path().join("src.vmdk");
        testkit::run(
            Command::new(&qemu_img)
                .args(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"])
                .arg(&src)
                .arg(&vmdk),
        );
        let out = dir.path().join("from-vmdk.raw");
        summary(&proxy().arg("disk-copy").arg(&vmdk).arg(&out).arg("--json").output().unwrap());
        same(&src, &out);
    }
}

#[test]
fn nbd_sources_and_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    image(&src, 32 * MIB, 5);
    let mut pairs: Vec<(Server, Option<PathBuf>)> = Vec::new();
    if let Some(k) = require_tool("nbdkit", "nbd_sources_and_destinations") {
        let file = format!("file={}", src.display());
        pairs.push((Server::nbdkit(&k, Listen::Tcp(free_port()), &["-r", "file", &file]), None));
    }
    if let Some(q) = require_tool("qemu-nbd", "nbd_sources_and_destinations") {
        pairs.push((Server::qemu_nbd(&q, &src, Listen::Unix(dir.path().join("q.sock")), &["-r"]), None));
        let target = dir.path().join("target.raw");
        File::create(&target).unwrap().set_len(32 * MIB).unwrap();
        pairs.push((Server::qemu_nbd(&q, &target, Listen::Unix(dir.path().join("t.sock")), &[]), Some(target)));
    }
    for (i, (server, target)) in pairs.iter().enumerate() {
        match target {
            None => {
                let out = dir.path().join(format!("out{i}.raw"));
                summary(&proxy().arg("disk-copy").arg(server.uri()).arg(&out).arg("--json").output().unwrap());
                same(&src, &out);
            }
            Some(file) => {
                let state = dir.path().join("state");
                let s = summary(
                    &proxy()
                        .arg("disk-copy")
                        .arg(&src)
                        .arg(server.uri())
                        .arg("--state-dir")
                        .arg(&state)
                        .arg("--json")
                        .output()
                        .unwrap(),
                );
                assert!(s["zero"].as_u64().unwrap() > 0, "an NBD target is zeroed where the source has holes");
                same(&src, file);
            }
        }
    }
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = proxy().arg("disk-copy").arg(dir.path().join("nope.raw")).arg(dir.path().join("o.raw")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.raw"));
    let out = proxy().args(["disk-copy", "nbd://host:port/x", "/dev/null"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("port is not a number"));
    let out = proxy().args(["disk-copy", "a", "b", "--request-size", "4X"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
}

/// The state file in `state` whose name ends with `suffix`: the one the store renamed into
/// place, never a writer's temporary file (`.tmp-<pid>-<n>-<name>`, see `durable::TEMP_PREFIX`).
/// A temporary file ends the same way, and one a killed copy left behind holds progress that was
/// never saved: the resumed copy does not read it, so neither may the test.
fn state_file(state: &Path, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(state).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(suffix) && !n.starts_with(durable::TEMP_PREFIX))
    })
}

fn checkpoint_done(state: &Path) -> Option<u64> {
    let p = state_file(state, ".checkpoint.json")?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some(v["done"].as_array()?.iter().map(|r| r[1].as_u64().unwrap_or(0)).sum())
}

#[test]
fn a_copy_killed_past_half_way_resumes_and_reads_only_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let scale: u64 = std::env::var("SYNCPROXY_SOAK_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let data = image(&src, 256 * MIB * scale, 9);
    let interval = 8 * MIB;
    let state = dir.path().join("dst.raw.syncproxy");
    // 64 MiB/s: a few seconds, long enough to kill it in the middle.
    let mut child = proxy()
        .arg("disk-copy")
        .arg(&src)
        .arg(&dst)
        .args(["--rate", "64M", "--checkpoint-every", "8M", "--checkpoint-interval", "0", "--json"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let done_at_kill = loop {
        if let Some(done) = checkpoint_done(&state)
            && done >= data / 2
        {
            child.kill().unwrap(); // SIGKILL
            break done;
        }
        assert!(child.try_wait().unwrap().is_none(), "the copy finished before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint past half-way");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.wait().unwrap();
    // The killed process may have saved one more checkpoint while dying: read it again.
    let done = checkpoint_done(&state).unwrap();
    assert!(done >= done_at_kill);

    let s = summary(&proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--json").output().unwrap());
    assert_eq!(s["resumed"], true);
    let read = s["read"].as_u64().unwrap();
    assert!(read <= data - done + interval, "read {read} after resuming; {} was left", data - done);
    assert_eq!(s["resumed_bytes"], done);
    same(&src, &dst);
    if let Some(qemu_img) = require_tool("qemu-img", "a_copy_killed_past_half_way_resumes_and_reads_only_what_is_left")
    {
        testkit::run(Command::new(qemu_img).args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&dst));
    }
    assert!(checkpoint_done(&state).is_none(), "the finished copy dropped its checkpoint");
}

#[test]
fn a_replica_killed_while_being_updated_is_reported_inconsistent_until_a_copy_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let data = image(&src, 128 * MIB, 11);
    summary(&proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--json").output().unwrap());
    let state = dir.path().join("dst.raw.syncproxy");
    let state_json = || -> serde_json::Value {
        let p = state_file(&state, ".state.json").unwrap();
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    assert!(state_json()["dirty"].is_null());

    // The source changes everywhere; the update in place is killed part-way.
    image(&src, 128 * MIB, 12);
    let mut child = proxy()
        .arg("disk-copy")
        .arg(&src)
        .arg(&dst)
        .args(["--rate", "32M", "--checkpoint-every", "4M", "--checkpoint-interval", "0"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while checkpoint_done(&state).is_none_or(|d| d < data / 4) {
        assert!(child.try_wait().unwrap().is_none(), "the update finished before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(state_json()["dirty"].is_object(), "a replica half-updated must be marked inconsistent");
    assert!(testkit::same_contents(&src, &dst).unwrap().is_err(), "the kill left it half-updated");

    let s = summary(&proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--json").output().unwrap());
    assert_eq!(s["was_inconsistent"], true);
    assert!(state_json()["dirty"].is_null());
    same(&src, &dst);
}

#[test]
fn copies_killed_at_random_moments_from_a_changing_source_are_never_silently_wrong() {
    // A fragmented source (data in about half its MiBs, extents of 4 KiB to a MiB, some data
    // written as zeros), changed between runs as a live disk would be; each run killed with
    // SIGKILL at a random moment, the next one resuming; then a clean run must equal it.
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    let state = dir.path().join("dst.raw.syncproxy");
    let size = 64 * MIB;
    image(&src, size, 21);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let mut rng = testkit::KillRng::new();
    let n = testkit::kills(8);
    let span = 1000; // ms: about one whole copy at 32 MiB/s
    let (mut completed, mut changed) = (0, 0);
    for round in 0..n {
        if round > 0 && rng.below(2) == 0 {
            // Scattered writes: data, and data overwritten with zeros.
            for _ in 0..1 + rng.below(16) {
                let at = rng.below(size / 4096 - 16) * 4096;
                let len = usize::try_from(4096 * (1 + rng.below(16))).unwrap();
                let bytes = if rng.below(4) == 0 { vec![0u8; len] } else { testkit::noise(len, at) };
                f.write_all_at(&bytes, at).unwrap();
            }
            f.sync_all().unwrap();
            changed += 1;
        }
        let mut child = proxy()
            .arg("disk-copy")
            .arg(&src)
            .arg(&dst)
            .args(["--rate", "32M", "--checkpoint-every", "2M", "--checkpoint-interval", "0", "--no-progress"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(span)));
        let _ = child.kill();
        let exit = child.wait().unwrap();
        // A run that finished before its kill claims a complete copy: it must be one.
        if exit.success() {
            completed += 1;
            let p = state_file(&state, ".state.json").unwrap();
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            assert!(v["dirty"].is_null(), "round {round}: a finished copy is not marked inconsistent");
            assert!(checkpoint_done(&state).is_none(), "round {round}: a finished copy keeps no checkpoint");
            same(&src, &dst);
        }
    }
    eprintln!(
        "{n} copies killed at random moments within {span} ms ({completed} finished first, source changed {changed} times)"
    );
    let s = summary(&proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--json").output().unwrap());
    same(&src, &dst);
    if let Some(qemu_img) = require_tool("qemu-img", "copies_killed_at_random_moments_from_a_changing_source") {
        testkit::run(Command::new(qemu_img).args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&dst));
    }
    assert!(s["read"].as_u64().is_some(), "{s}");
    // The digests kept for the next copy describe what the copy holds: each is the BLAKE3 of
    // its 1 MiB block (a resume that kept a stale one would pass a later check it should fail).
    let kept = std::fs::read(state_file(&state, ".digests").expect("the copy keeps its digests")).unwrap();
    let digests = pipeline::Digests::decode(&kept).unwrap();
    let copy = std::fs::read(&dst).unwrap();
    let want: Vec<[u8; 32]> = copy.chunks(usize::try_from(MIB).unwrap()).map(|b| *blake3::hash(b).as_bytes()).collect();
    assert!(digests.blocks == want, "the kept digests differ from the copy's blocks");
    assert!(completed < n || n < 4, "no kill landed mid-copy in {n} rounds: the loop tested nothing");
}

/// Puts one undeclared windows-1252 byte into the embedded descriptor of the hosted sparse
/// file at `path` (a comment line, changed in place).
fn spoil_embedded_descriptor(path: &Path) {
    let mut img = std::fs::read(path).unwrap();
    let sector = |at: usize| usize::try_from(u64::from_le_bytes(img[at..at + 8].try_into().unwrap())).unwrap() * 512;
    let (start, len) = (sector(28), sector(36));
    let from = b"# Disk DescriptorFile";
    let at = img[start..start + len].windows(from.len()).position(|w| w == from).unwrap() + start;
    img[at + 17] = 0xe9; // "# Disk Descriptor\xe9ile"
    std::fs::write(path, img).unwrap();
}

#[test]
fn a_vmdk_delta_whose_descriptor_cannot_be_read_is_refused_not_copied_as_zeros() {
    let test = "a_vmdk_delta_whose_descriptor_cannot_be_read_is_refused_not_copied_as_zeros";
    let Some(qemu_img) = require_tool("qemu-img", test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    image(&d("base.raw"), 8 * MIB, 13);
    testkit::run(Command::new(&qemu_img).args(["convert", "-O", "vmdk"]).arg(d("base.raw")).arg(d("base.vmdk")));
    testkit::run(
        Command::new(&qemu_img).args(["create", "-f", "vmdk", "-F", "vmdk", "-b", "base.vmdk"]).arg(d("delta.vmdk")),
    );
    // Sound, the delta reads as its parent.
    summary(&proxy().arg("disk-copy").arg(d("delta.vmdk")).arg(d("good.raw")).arg("--json").output().unwrap());
    same(&d("base.raw"), &d("good.raw"));

    spoil_embedded_descriptor(&d("delta.vmdk"));
    let out = proxy().arg("disk-copy").arg(d("delta.vmdk")).arg(d("bad.raw")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "disk-copy of a delta cut from its parent succeeded: {err}");
    assert!(err.contains("delta.vmdk") && err.contains("not UTF-8: byte 0xe9"), "{err}");

    let repo = d("repo");
    assert!(proxy().args(["repo", "init", "--chunk-size", "1M"]).arg(&repo).status().unwrap().success());
    let out = proxy().args(["repo", "backup"]).arg(&repo).arg(d("delta.vmdk")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "repo backup of a delta cut from its parent succeeded: {err}");
    assert!(err.contains("delta.vmdk") && err.contains("not UTF-8"), "{err}");
}

#[test]
fn a_copy_onto_its_own_source_is_refused_by_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    image(&src, 8 * MIB, 17);
    let before = std::fs::read(&src).unwrap();
    std::fs::hard_link(&src, dir.path().join("hard.raw")).unwrap();
    std::os::unix::fs::symlink("src.raw", dir.path().join("soft.raw")).unwrap();
    let same_dir = dir.path().join(".").join("src.raw");
    for dst in [src.clone(), dir.path().join("hard.raw"), dir.path().join("soft.raw"), same_dir] {
        let out = proxy().arg("disk-copy").arg(&src).arg(&dst).arg("--no-progress").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: a copy onto its own source succeeded", dst.display());
        assert!(err.contains("are the same file"), "{}: {err}", dst.display());
    }
    assert_eq!(std::fs::read(&src).unwrap(), before, "the source is untouched");
    assert!(!dir.path().join("src.raw.syncproxy").exists(), "nothing was started");
}

/// The ranges the checkpoint in `state` shows as done.
fn checkpoint_ranges(state: &Path) -> Vec<(u64, u64)> {
    let p = state_file(state, ".checkpoint.json").unwrap_or_else(|| panic!("no checkpoint in {}", state.display()));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["done"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap())).collect()
}

#[test]
fn a_resume_from_a_source_written_meanwhile_rechecks_what_was_done_and_ends_equal_to_it() {
    let test = "a_resume_from_a_source_written_meanwhile_rechecks_what_was_done_and_ends_equal_to_it";
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut kinds = vec!["file"];
    let nbdkit = require_tool("nbdkit", test);
    if nbdkit.is_some() {
        kinds.push("nbd");
    }
    for kind in kinds {
        let data = image(&src, 128 * MIB, 23);
        // nbdkit serves the file read-only, and sees it change.
        let server = nbdkit.as_ref().filter(|_| kind == "nbd").map(|k| {
            let file = format!("file={}", src.display());
            Server::nbdkit(k, Listen::Tcp(free_port()), &["-r", "file", &file])
        });
        let from = server.as_ref().map_or_else(|| src.display().to_string(), Server::uri);
        let dst = dir.path().join(format!("{kind}.raw"));
        let state = dir.path().join(format!("{kind}.raw.syncproxy"));
        let mut child = proxy()
            .arg("disk-copy")
            .arg(&from)
            .arg(&dst)
            .args(["--rate", "32M", "--checkpoint-every", "4M", "--checkpoint-interval", "0", "--no-progress"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while checkpoint_done(&state).is_none_or(|d| d < data / 4) {
            assert!(child.try_wait().unwrap().is_none(), "{kind}: the copy finished before it could be killed");
            assert!(started.elapsed() < Duration::from_secs(60), "{kind}: no checkpoint past a quarter");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();

        // The source is written where the copy had been, in place (its allocation stays), and
        // a file's modification time is set back: nothing in its identity shows the change.
        let f = File::options().write(true).read(true).open(&src).unwrap();
        let mtime = f.metadata().unwrap().modified().unwrap();
        let mut changed = 0;
        for (start, len) in checkpoint_ranges(&state) {
            for mib in (start.div_ceil(MIB)..(start + len) / MIB).take(3) {
                let mut b = [0u8; 1];
                f.read_exact_at(&mut b, mib * MIB + 12345).unwrap();
                if b[0] != 0 {
                    f.write_all_at(&[!b[0]], mib * MIB + 12345).unwrap();
                    changed += 1;
                }
            }
        }
        assert!(changed > 0, "{kind}: the checkpoint covers data to change");
        f.set_times(std::fs::FileTimes::new().set_modified(mtime)).unwrap();
        f.sync_all().unwrap();
        drop(f);

        let s = summary(&proxy().arg("disk-copy").arg(&from).arg(&dst).arg("--json").output().unwrap());
        testkit::same_contents(&src, &dst).unwrap().unwrap_or_else(|e| panic!("{kind}: a mixed image: {e}"));
        assert_eq!(s["resumed"], true, "{kind}: {s}");
        assert_eq!(s["resume_check"], "verified", "{kind}: {s}");
        assert_eq!(s["resume_changed_bytes"], changed * MIB, "{kind}: {s}");
    }
}

#[test]
fn a_vmdk_extent_linked_out_of_its_directory_needs_any_path_in_disk_copy_and_repo_backup() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    std::fs::create_dir_all(d("vm")).unwrap();
    std::fs::create_dir_all(d("elsewhere")).unwrap();
    image(&d("elsewhere/secret.raw"), 4 * MIB, 29);
    std::os::unix::fs::symlink("../elsewhere/secret.raw", d("vm/disk-flat.vmdk")).unwrap();
    std::fs::write(
        d("vm/disk.vmdk"),
        "version=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8192 FLAT \"disk-flat.vmdk\" 0\n",
    )
    .unwrap();
    let refused = |out: std::process::Output, what: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} followed a link out of the directory");
        assert!(err.contains("symbolic link") && err.contains("--any-path"), "{what}: {err}");
    };
    refused(proxy().arg("disk-copy").arg(d("vm/disk.vmdk")).arg(d("out.raw")).output().unwrap(), "disk-copy");
    summary(
        &proxy()
            .arg("disk-copy")
            .arg(d("vm/disk.vmdk"))
            .arg(d("out.raw"))
            .args(["--any-path", "--json"])
            .output()
            .unwrap(),
    );
    same(&d("elsewhere/secret.raw"), &d("out.raw"));

    let repo = d("repo");
    assert!(proxy().args(["repo", "init", "--chunk-size", "1M"]).arg(&repo).status().unwrap().success());
    refused(proxy().args(["repo", "backup"]).arg(&repo).arg(d("vm/disk.vmdk")).output().unwrap(), "repo backup");
    let out = proxy().args(["repo", "backup"]).arg(&repo).arg(d("vm/disk.vmdk")).arg("--any-path").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
