//! `cargo xtask package`: the `.deb` for Debian 12 and Ubuntu 24.04 (the release binaries as
//! `syncproxy-proxy` and `syncproxy-probe`, the systemd unit, a system user from sysusers.d,
//! state and configuration folders from tmpfiles.d, a default configuration and a token made
//! at install). `--install-test` (root) then installs it, checks what it installed (the unit
//! with `systemd-analyze verify`, the user, the folders, the binaries and the configuration
//! run), installs it again as an upgrade, and purges it, checking that nothing is left.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

const PACKAGE: &str = "syncproxy";
const UNIT: &str = "syncproxy-proxy.service";

/// The default `/etc/syncproxy/proxy.toml`: a daemon with no job yet, which `config check`
/// accepts once the install has made the token.
const DEFAULT_CONFIG: &str = r#"# syncproxy: the daemon's configuration (`syncproxy-proxy config check` checks it).
# Every setting and an example of each job kind: README, "Run it". After editing:
#   syncproxy-proxy config check /etc/syncproxy/proxy.toml && systemctl restart syncproxy-proxy
# Repositories and replica folders outside /var/lib/syncproxy and /srv/syncproxy need a
# drop-in that lets the service write there: systemctl edit syncproxy-proxy, then
#   [Service]
#   ReadWritePaths=/backups

[proxy]
listen = "127.0.0.1:9480"
token_file = "/etc/syncproxy/token"   # made at install; the bearer token of the HTTP API
state_dir = "/var/lib/syncproxy"
log_format = "json"

# [[vcenter]]
# name = "vc1"
# url = "https://vc.example/sdk"
# user = "backup@vsphere.local"
# password_file = "/etc/syncproxy/vc1.pw"
#
# [[job]]
# name = "nightly"
# vcenter = "vc1"
# all = true
# schedule = "daily 02:30 Europe/Berlin"
# repository = "/srv/syncproxy/backups"
# retention = { keep_last = 7, keep_daily = 14 }
"#;

const SYSUSERS: &str =
    "# The user syncproxy-proxy.service runs as.\nu syncproxy - \"syncproxy backup proxy\" /var/lib/syncproxy\n";

const TMPFILES: &str = "# syncproxy's state, configuration and default target folders.\n\
d /var/lib/syncproxy 0750 syncproxy syncproxy -\n\
d /etc/syncproxy 0750 root syncproxy -\n\
d /srv/syncproxy 0750 syncproxy syncproxy -\n";

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /usr/lib/sysusers.d/syncproxy.conf
    elif ! getent passwd syncproxy >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/syncproxy --no-create-home \
            --shell /usr/sbin/nologin --comment "syncproxy backup proxy" syncproxy
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create /usr/lib/tmpfiles.d/syncproxy.conf
    else
        install -d -m 0750 -o syncproxy -g syncproxy /var/lib/syncproxy /srv/syncproxy
        install -d -m 0750 -o root -g syncproxy /etc/syncproxy
    fi
    # The configuration may have been removed by its administrator; the token is made once,
    # and its group and mode set on every run (a run cut short must not leave it root-only).
    if [ -e /etc/syncproxy/proxy.toml ]; then
        chgrp syncproxy /etc/syncproxy/proxy.toml
        chmod 0640 /etc/syncproxy/proxy.toml
    fi
    if [ ! -s /etc/syncproxy/token ]; then
        umask 0077
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/syncproxy/token.new
        echo >> /etc/syncproxy/token.new
        mv /etc/syncproxy/token.new /etc/syncproxy/token
    fi
    chgrp syncproxy /etc/syncproxy/token
    chmod 0640 /etc/syncproxy/token
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
        if systemctl is-active --quiet syncproxy-proxy.service; then
            systemctl restart syncproxy-proxy.service || true
        fi
    fi
    echo "syncproxy: configure /etc/syncproxy/proxy.toml, then: systemctl enable --now syncproxy-proxy"
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop syncproxy-proxy.service >/dev/null 2>&1 || true
    systemctl disable syncproxy-proxy.service >/dev/null 2>&1 || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    # The token made at install and the daemon's own state (its history, its drills' work
    # folders); anything else there, a repository put there by hand, is the operator's and
    # stays, as does /srv/syncproxy. The user stays too (files elsewhere may be its).
    rm -f /etc/syncproxy/token /etc/syncproxy/token.new
    rmdir /etc/syncproxy 2>/dev/null || true
    rm -f /var/lib/syncproxy/history.jsonl
    rm -rf /var/lib/syncproxy/drills
    rmdir /var/lib/syncproxy 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
exit 0
"#;

/// The package's version: the workspace's, with the commit count and hash, so every commit's
/// package upgrades the one before.
fn version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let base = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \"").and_then(|v| v.strip_suffix('"')))
        .context("no version in Cargo.toml")?
        .to_owned();
    let git = |args: &[&str]| crate::output(Command::new("git").args(args)).map(|s| s.trim().to_owned());
    match (git(&["rev-list", "--count", "HEAD"]), git(&["rev-parse", "--short=8", "HEAD"])) {
        (Ok(n), Ok(h)) => Ok(format!("{base}+{n}.g{h}")),
        _ => Ok(base),
    }
}

/// Writes `text` at `root/rel` with `mode`.
fn put(root: &Path, rel: &str, text: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().context("a file has a folder")?)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Builds the package; its path.
pub(crate) fn build(root: &Path) -> Result<PathBuf> {
    crate::cargo(&["build", "--release", "--locked", "-p", "proxy", "-p", "probe"])?;
    let target = crate::target_dir(root);
    let version = version(root)?;
    let stage = target.join("deb").join("stage");
    let _ = std::fs::remove_dir_all(&stage);
    for (bin, name) in [("proxy", "syncproxy-proxy"), ("probe", "syncproxy-probe")] {
        let bytes = std::fs::read(target.join("release").join(bin)).with_context(|| format!("the {bin} binary"))?;
        let staged = format!("usr/bin/{name}");
        put(&stage, &staged, &bytes, 0o755)?;
        // The line tables the release build keeps for backtraces are most of its size.
        crate::run(Command::new("strip").arg("--strip-debug").arg(stage.join(&staged)))?;
    }
    let unit = std::fs::read(root.join("bins/proxy/systemd").join(UNIT))?;
    put(&stage, &format!("usr/lib/systemd/system/{UNIT}"), &unit, 0o644)?;
    put(&stage, "usr/lib/sysusers.d/syncproxy.conf", SYSUSERS.as_bytes(), 0o644)?;
    put(&stage, "usr/lib/tmpfiles.d/syncproxy.conf", TMPFILES.as_bytes(), 0o644)?;
    put(&stage, "etc/syncproxy/proxy.toml", DEFAULT_CONFIG.as_bytes(), 0o640)?;
    let readme = std::fs::read(root.join("README.md"))?;
    put(&stage, "usr/share/doc/syncproxy/README.md", &readme, 0o644)?;
    let size_kib = crate::output(Command::new("du").args(["-sk"]).arg(&stage))?
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_owned();
    let control = format!(
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: amd64\nMaintainer: syncproxy developers <syncproxy@localhost>\n\
         Installed-Size: {size_kib}\nDepends: libc6 (>= 2.36), libssl3 | libssl3t64\nRecommends: systemd\n\
         Section: admin\nPriority: optional\n\
         Description: agentless backup and disaster recovery proxy for VMware vSphere\n \
         syncproxy-proxy copies every VM's disks off vSphere, point in time and\n \
         incrementally, into a deduplicating repository or replica folders, and\n \
         brings VMs back: instant recovery over NBD, drills that boot restore\n \
         points, restores into vSphere. syncproxy-probe checks a vSphere estate\n \
         against the support matrix. The daemon runs as the syncproxy user.\n"
    );
    put(&stage, "DEBIAN/control", control.as_bytes(), 0o644)?;
    put(&stage, "DEBIAN/conffiles", b"/etc/syncproxy/proxy.toml\n", 0o644)?;
    put(&stage, "DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put(&stage, "DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put(&stage, "DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    let deb = target.join("deb").join(format!("{PACKAGE}_{version}_amd64.deb"));
    crate::run(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    println!("package: {}", deb.display());
    Ok(deb)
}

/// Runs `cmd` and fails naming it unless it succeeds; its stdout.
fn ok(cmd: &mut Command) -> Result<String> {
    crate::output(cmd)
}

/// Installs, checks, upgrades and purges the package (root only: it changes the machine).
pub(crate) fn install_test(root: &Path) -> Result<()> {
    ensure!(ok(Command::new("id").arg("-u"))?.trim() == "0", "the install test installs a package: run it as root");
    let deb = build(root)?;
    let deb = deb.to_str().context("non-UTF-8 path")?;
    // Any state but unknown or not-installed (installed, unpacked, config-files) is someone's.
    let status = ok(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", PACKAGE])).unwrap_or_default();
    if !status.trim().is_empty() && status.trim() != "not-installed" {
        bail!("{PACKAGE} is on this machine already ({}): the install test will not touch it", status.trim());
    }
    let result = check_install(deb);
    // Whatever happened, the machine is left without the package.
    let purged = crate::run(Command::new("dpkg").args(["--purge", PACKAGE]));
    result?;
    purged?;
    for gone in [
        "/usr/bin/syncproxy-proxy",
        "/usr/bin/syncproxy-probe",
        "/usr/lib/systemd/system/syncproxy-proxy.service",
        "/etc/syncproxy",
        "/var/lib/syncproxy",
    ] {
        ensure!(!Path::new(gone).exists(), "{gone} is left after the purge");
    }
    println!("package: installed, verified, upgraded and purged cleanly");
    Ok(())
}

fn check_install(deb: &str) -> Result<()> {
    crate::run(Command::new("dpkg").args(["-i", deb]))?;
    ok(Command::new("getent").args(["passwd", "syncproxy"])).context("the syncproxy user was not made")?;
    for (dir, owner) in [
        ("/var/lib/syncproxy", "syncproxy:syncproxy 750"),
        ("/etc/syncproxy", "root:syncproxy 750"),
        ("/srv/syncproxy", "syncproxy:syncproxy 750"),
    ] {
        let got = ok(Command::new("stat").args(["-c", "%U:%G %a", dir]))?;
        ensure!(got.trim() == owner, "{dir} is {}, not {owner}", got.trim());
    }
    let token = ok(Command::new("stat").args(["-c", "%U:%G %a %s", "/etc/syncproxy/token"]))?;
    ensure!(token.starts_with("root:syncproxy 640 "), "the token is {}", token.trim());
    crate::run(Command::new("systemd-analyze").args(["verify", &format!("/usr/lib/systemd/system/{UNIT}")]))
        .context("systemd-analyze verify refused the unit")?;
    let version = ok(Command::new("/usr/bin/syncproxy-proxy").arg("--version"))?;
    ensure!(version.contains("proxy"), "syncproxy-proxy --version printed {version:?}");
    ok(Command::new("/usr/bin/syncproxy-probe").arg("--help"))?;
    // The default configuration is accepted as the service's user reads it.
    let check = Command::new("runuser")
        .args(["-u", "syncproxy", "--", "/usr/bin/syncproxy-proxy", "config", "check", "/etc/syncproxy/proxy.toml"])
        .output()?;
    let (said, warned) = (String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    ensure!(check.status.success() && said.contains("usable"), "config check as the syncproxy user: {said}{warned}");
    ensure!(warned.trim().is_empty(), "config check of the installed files warns: {warned}");
    // An upgrade (the same package again) keeps the token and an edited configuration.
    let before = std::fs::read("/etc/syncproxy/token")?;
    std::fs::write("/etc/syncproxy/proxy.toml", DEFAULT_CONFIG.replace("9480", "9481"))?;
    crate::run(Command::new("dpkg").args(["--force-confold", "-i", deb]))?;
    ensure!(std::fs::read("/etc/syncproxy/token")? == before, "the upgrade replaced the token");
    ensure!(
        std::fs::read_to_string("/etc/syncproxy/proxy.toml")?.contains("9481"),
        "the upgrade lost an edited configuration"
    );
    Ok(())
}
