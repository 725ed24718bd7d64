//! `proxy export` against real NBD clients: a restore point of a sparse image served on a Unix
//! socket compares equal with `qemu-img compare`, copies byte for byte with `nbdcopy`, shows its
//! holes in `nbdinfo --map`; a damaged chunk fails its reads with EIO and is named at stop; a
//! writable export written with `qemu-io` and stopped with `--commit` yields a restore point
//! that restores to what the export showed; a replica's raw file serves as it is; a TLS export
//! serves `nbdinfo`, `nbdcopy` and `qemu-img` over TLS and refuses plaintext clients and client
//! certificates from another CA.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MIB: u64 = 1 << 20;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy"))
}

/// The tools these tests drive; `None` (skipped loudly) when one is missing.
fn tools(test: &str) -> Option<()> {
    for t in ["qemu-img", "nbdcopy", "nbdinfo", "qemu-io"] {
        testkit::require_tool(t, test)?;
    }
    Some(())
}

/// A running `proxy export --json`, and the URIs it printed (by disk name).
struct Exporting {
    child: Child,
    uris: Vec<(String, String)>,
    out: BufReader<std::process::ChildStdout>,
}

impl Exporting {
    fn start(args: &[&str], disks: usize) -> Self {
        let mut child = proxy()
            .arg("export")
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut uris = Vec::new();
        for _ in 0..disks {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                let o = child.wait_with_output().unwrap();
                panic!("proxy export stopped: {}", String::from_utf8_lossy(&o.stderr));
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            uris.push((v["disk"].as_str().unwrap().to_owned(), v["uri"].as_str().unwrap().to_owned()));
        }
        Self { child, uris, out }
    }

    fn uri(&self) -> &str {
        &self.uris[0].1
    }

    /// SIGTERM, then what it printed after and its stderr, and whether it succeeded.
    fn stop(mut self) -> (Vec<serde_json::Value>, String, bool) {
        testkit::run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        let mut rest = Vec::new();
        let mut line = String::new();
        while self.out.read_line(&mut line).unwrap() > 0 {
            rest.push(serde_json::from_str(&line).unwrap());
            line.clear();
        }
        let o = self.child.wait_with_output().unwrap();
        (rest, String::from_utf8_lossy(&o.stderr).into_owned(), o.status.success())
    }
}

/// A repository with one restore point of a 32 MiB sparse image (chunks of 1 MiB, so the
/// image's holes are whole chunks); returns (repository, image, point ID).
fn repository(dir: &Path) -> (PathBuf, PathBuf, String) {
    let (repo, image, vmx) = (dir.join("repo"), dir.join("disk.raw"), dir.join("vm.vmx"));
    testkit::sparse_image(&image, 32 * MIB, 21);
    std::fs::write(&vmx, "displayName = \"vm\"\n").unwrap();
    testkit::run(proxy().args(["repo", "init", repo.to_str().unwrap(), "--chunk-size", "1M"]));
    let out = testkit::run(proxy().args([
        "repo",
        "backup",
        repo.to_str().unwrap(),
        image.to_str().unwrap(),
        "--name",
        "vm",
        "--file",
        vmx.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (repo, image, v["point"].as_str().unwrap().to_owned())
}

/// `qemu-img compare` of a raw file and an export: it fails the test unless they are equal.
fn compare(file: &Path, uri: &str) {
    testkit::run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", file.to_str().unwrap(), uri]));
}

/// The holes `nbdinfo --map` shows, as (offset, length).
fn mapped_holes(uri: &str) -> Vec<(u64, u64)> {
    let out = testkit::run(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (off, len, ty) =
            (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap());
        if ty & 1 != 0 {
            match holes.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => holes.push((off, len)),
            }
        }
    }
    holes
}

/// The all-zero MiBs of `image`, merged, as (offset, length).
fn zero_mibs(image: &Path) -> Vec<(u64, u64)> {
    let data = std::fs::read(image).unwrap();
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for (n, c) in data.chunks(1 << 20).enumerate() {
        if c.iter().all(|&b| b == 0) {
            let off = n as u64 * MIB;
            match holes.last_mut() {
                Some((o, l)) if *o + *l == off => *l += MIB,
                _ => holes.push((off, MIB)),
            }
        }
    }
    holes
}

#[test]
fn a_restore_point_served_compares_copies_and_maps_like_the_image() {
    let test = "a_restore_point_served_compares_copies_and_maps_like_the_image";
    let Some(()) = tools(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repo, image, id) = repository(dir.path());
    let socket = dir.path().join("nbd.sock");
    let e = Exporting::start(&[repo.to_str().unwrap(), "latest", "--socket", socket.to_str().unwrap()], 1);
    assert_eq!(e.uris[0].0, "vm");
    assert_eq!(e.uri(), format!("nbd+unix:///vm?socket={}", socket.display()));
    compare(&image, e.uri());
    let copy = dir.path().join("copy.raw");
    testkit::run(Command::new("nbdcopy").args([e.uri(), copy.to_str().unwrap()]));
    testkit::same_contents(&image, &copy).unwrap().unwrap();
    let holes = mapped_holes(e.uri());
    assert!(!holes.is_empty(), "the image has holes");
    assert_eq!(holes, zero_mibs(&image), "nbdinfo --map shows the image's holes");
    // Another restore point by ID, one disk chosen by position: the same bytes.
    let (rest, stderr, ok) = e.stop();
    assert!(ok && rest.is_empty(), "{stderr}");
    assert!(!socket.exists(), "the socket is removed at stop");
    let e = Exporting::start(&[repo.to_str().unwrap(), &id, "--disk", "0", "--socket", socket.to_str().unwrap()], 1);
    compare(&image, e.uri());
    assert!(e.stop().2);
    // A non-loopback address needs --allow-remote.
    let out = proxy().args(["export", repo.to_str().unwrap(), "latest", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

#[test]
fn a_damaged_chunk_fails_its_reads_and_is_named_at_stop() {
    let test = "a_damaged_chunk_fails_its_reads_and_is_named_at_stop";
    let Some(()) = tools(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repo, image, id) = repository(dir.path());
    // The first MiB that holds data: damage its chunk.
    let data = std::fs::read(&image).unwrap();
    let n = data.chunks(1 << 20).position(|c| c.iter().any(|&b| b != 0)).unwrap();
    let r = repo::Repo::open(&repo).unwrap();
    let name = repo::chunk_name(&r.index(&r.point(&id).unwrap(), 0).unwrap().ids[n]);
    let chunk = repo.join(&name);
    let mut raw = std::fs::read(&chunk).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x55;
    std::fs::write(&chunk, raw).unwrap();
    let socket = dir.path().join("nbd.sock");
    let e = Exporting::start(&[repo.to_str().unwrap(), "latest", "--socket", socket.to_str().unwrap()], 1);
    let at = format!("{}", n as u64 * MIB + 4096);
    let out =
        Command::new("qemu-io").args(["-r", "-f", "raw", "-c", &format!("read {at} 4096"), e.uri()]).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("Input/output error"), "{said}");
    // The rest still reads.
    let other = data.chunks(1 << 20).enumerate().position(|(i, c)| i != n && c.iter().any(|&b| b != 0)).unwrap();
    testkit::run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        &format!("read {} 4096", other as u64 * MIB),
        e.uri(),
    ]));
    let (_, stderr, ok) = e.stop();
    assert!(!ok, "a damaged chunk served makes the export end in failure");
    assert!(stderr.contains(&name), "{stderr}");
    let verify = proxy().args(["repo", "verify", repo.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&verify.stdout).contains(&name), "repo verify names it too");
}

#[test]
fn a_writable_export_commits_what_it_showed_and_discards_otherwise() {
    let test = "a_writable_export_commits_what_it_showed_and_discards_otherwise";
    let Some(()) = tools(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (repo, image, id) = repository(dir.path());
    let overlays = dir.path().join("overlays");
    std::fs::create_dir(&overlays).unwrap();
    let socket = dir.path().join("nbd.sock");
    let args = |commit: bool| {
        let mut a = vec![
            repo.to_str().unwrap().to_owned(),
            id.clone(),
            "--socket".into(),
            socket.to_str().unwrap().into(),
            "--writable".into(),
            "--overlay-dir".into(),
            overlays.to_str().unwrap().into(),
        ];
        if commit {
            a.push("--commit".into());
        }
        a
    };
    let write = |uri: &str| {
        testkit::run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000 5000",
            "-c",
            "write -z 3M 1M",
            "-c",
            "write -P 0x11 20M 4096",
            uri,
        ]));
    };
    // Discarded: the repository keeps one restore point, the overlay file is gone.
    let a = args(false);
    let e = Exporting::start(&a.iter().map(String::as_str).collect::<Vec<_>>(), 1);
    write(e.uri());
    assert_eq!(std::fs::read_dir(&overlays).unwrap().count(), 1, "one overlay file while serving");
    let (rest, stderr, ok) = e.stop();
    assert!(ok, "{stderr}");
    assert!(rest[0]["discarded"].as_u64().unwrap() > 0, "{rest:?}");
    assert_eq!(std::fs::read_dir(&overlays).unwrap().count(), 0, "the overlay is removed at stop");
    let list = testkit::run(proxy().args(["repo", "list", repo.to_str().unwrap(), "--json"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap().as_array().unwrap().len(),
        1,
        "nothing stored"
    );
    // Committed.
    let a = args(true);
    let e = Exporting::start(&a.iter().map(String::as_str).collect::<Vec<_>>(), 1);
    write(e.uri());
    let shown = dir.path().join("shown.raw");
    testkit::run(Command::new("nbdcopy").args([e.uri(), shown.to_str().unwrap()]));
    assert!(testkit::same_contents(&image, &shown).unwrap().is_err(), "the writes show");
    let (rest, stderr, ok) = e.stop();
    assert!(ok, "{stderr}");
    let new = rest[0]["committed"].as_str().unwrap().to_owned();
    assert_eq!(rest[0]["parent"], id.as_str());
    let restored = dir.path().join("restored.raw");
    testkit::run(proxy().args(["repo", "restore", repo.to_str().unwrap(), &new, restored.to_str().unwrap()]));
    testkit::same_contents(&shown, &restored).unwrap().unwrap();
    let list = testkit::run(proxy().args(["repo", "list", repo.to_str().unwrap(), "--json"]));
    let points: serde_json::Value = serde_json::from_str(&list).unwrap();
    let p = points.as_array().unwrap().iter().find(|p| p["id"] == new.as_str()).unwrap();
    assert_eq!(p["parent"], id.as_str());
    assert_eq!(p["files"][0]["name"], "vm.vmx", "the captured files come along");
    // Written: MiBs 0, 3 (zeros) and 20; only non-zero chunks are stored anew.
    assert!((1..=2).contains(&p["disks"][0]["stored_chunks"].as_u64().unwrap()), "{p}");
}

#[test]
fn a_replica_disk_serves_as_the_file_it_is() {
    let test = "a_replica_disk_serves_as_the_file_it_is";
    let Some(()) = tools(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm_0123abcd");
    std::fs::create_dir(&vm).unwrap();
    let (a, b) = (vm.join("scsi0-0.raw"), vm.join("scsi0-1.raw"));
    testkit::sparse_image(&a, 16 * MIB, 1);
    testkit::sparse_image(&b, 8 * MIB, 2);
    let socket = dir.path().join("nbd.sock");
    let e = Exporting::start(&["--replica", vm.to_str().unwrap(), "--socket", socket.to_str().unwrap()], 2);
    assert_eq!(e.uris.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["scsi0:0", "scsi0:1"]);
    for ((_, uri), file) in e.uris.iter().zip([&a, &b]) {
        compare(file, uri);
        assert_eq!(mapped_holes(uri), zero_mibs(file));
    }
    let ro = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4096", e.uri()]).output().unwrap();
    assert!(!ro.status.success(), "a replica is served read-only");
    assert!(e.stop().2);
}

/// A folder laid out as libnbd and QEMU look for TLS files: `ca-cert.pem`, and
/// `client-cert.pem` and `client-key.pem` when `client` is given.
fn tls_dir(dir: &Path, ca: &Path, client: Option<(&Path, &Path)>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca, dir.join("ca-cert.pem")).unwrap();
    if let Some((cert, key)) = client {
        std::fs::copy(cert, dir.join("client-cert.pem")).unwrap();
        std::fs::copy(key, dir.join("client-key.pem")).unwrap();
    }
    dir.to_owned()
}

/// `nbdinfo --size` of `uri` with the TLS files of `certs`: the size, or `None` when refused.
fn tls_size(uri: &str, certs: &Path) -> Option<u64> {
    let uri = format!("{uri}?tls-certificates={}", certs.display());
    let out = Command::new("nbdinfo").args(["--size", &uri]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse().unwrap())
}

#[test]
fn a_tls_export_serves_tls_clients_only() {
    let test = "a_tls_export_serves_tls_clients_only";
    let Some(()) = tools(test) else { return };
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (repo, image, _) = repository(dir.path());
    let (pki_dir, other_dir) = (dir.path().join("pki"), dir.path().join("other"));
    std::fs::create_dir_all(&pki_dir).unwrap();
    std::fs::create_dir_all(&other_dir).unwrap();
    let pki = testkit::pki::TestPki::create(&pki_dir);
    let other = testkit::pki::TestPki::create(&other_dir);
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tls = ["--tls-cert", pki.cert.to_str().unwrap(), "--tls-key", pki.key.to_str().unwrap()];
    let e = Exporting::start(&[&[repo.to_str().unwrap(), "latest", "--listen", "127.0.0.1:0"][..], &tls].concat(), 1);
    let uri = e.uri().to_owned();
    assert!(uri.starts_with("nbds://127.0.0.1:") && uri.ends_with("/vm"), "{uri}");
    let server_only = tls_dir(&dir.path().join("certs"), &pki.ca, None);
    assert_eq!(tls_size(&uri, &server_only), Some(32 * MIB));
    // The bytes over TLS: nbdcopy to a file, and qemu-img compare with QEMU's TLS.
    let copy = dir.path().join("copy.raw");
    let with_certs = format!("{uri}?tls-certificates={}", server_only.display());
    testkit::run(Command::new("nbdcopy").args([&with_certs, copy.to_str().unwrap()]));
    testkit::same_contents(&image, &copy).unwrap().unwrap();
    let port = uri.trim_start_matches("nbds://127.0.0.1:").trim_end_matches("/vm");
    testkit::run(Command::new("qemu-img").args([
        "compare",
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", server_only.display()),
        "--image-opts",
        &format!("driver=raw,file.filename={}", image.display()),
        &format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vm,tls-creds=tls0"),
    ]));
    // A plaintext client is refused, and so is one that does not trust the server's CA.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    assert!(!Command::new("nbdinfo").args(["--size", &plain]).output().unwrap().status.success());
    assert_eq!(tls_size(&uri, &tls_dir(&dir.path().join("wrong-ca"), &other.ca, None)), None);
    let (rest, stderr, ok) = e.stop();
    assert!(ok && rest.is_empty(), "{stderr}");
    assert!(stderr.contains("WARNING") && stderr.contains("TLS key"), "a readable key is warned about: {stderr}");
    let key_text = std::fs::read_to_string(&pki.key).unwrap();
    assert!(!stderr.contains(key_text.lines().nth(1).unwrap()), "key material in the output");

    // With a client CA, on every address (no --allow-remote needed with TLS): only clients with
    // a certificate from that CA are served.
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let args = [repo.to_str().unwrap(), "latest", "--listen", "0.0.0.0:0", "--tls-client-ca", pki.ca.to_str().unwrap()];
    let e = Exporting::start(&[&args[..], &tls].concat(), 1);
    let uri = e.uri().replacen("0.0.0.0", "127.0.0.1", 1);
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let ours = tls_dir(&dir.path().join("ours"), &pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let foreign = tls_dir(&dir.path().join("foreign"), &pki.ca, Some((&other.client_cert, &other.client_key)));
    assert_eq!(tls_size(&uri, &ours), Some(32 * MIB));
    assert_eq!(tls_size(&uri, &server_only), None, "no client certificate");
    assert_eq!(tls_size(&uri, &foreign), None, "a client certificate from another CA");
    let (_, stderr, ok) = e.stop();
    assert!(ok && !stderr.contains("WARNING"), "{stderr}");
}
