//! The crate-boundary rules that ARCHITECTURE.md states, checked against `cargo tree` and the
//! sources, so that an innocent-looking dependency cannot quietly erode them.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// A rule: which library crates it covers, what their normal (non-dev) dependency tree must not
/// contain, which source text is banned in them, and why.
struct Rule {
    covers: fn(&str) -> bool,
    forbidden_deps: &'static [&'static str],
    forbidden_source: &'static [&'static str],
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        covers: |name| name == "cbt",
        forbidden_deps: &["tokio", "hyper", "hyper-util", "reqwest", "rustls", "quick-xml", "libloading", "bytes"],
        forbidden_source: &["std::fs", "std::net", "std::io", "std::process", "std::thread", "std::time", "std::env"],
        why: "cbt is pure: no I/O, no clock, no async runtime, no SOAP, no VDDK",
    },
    Rule {
        covers: |name| name == "vmdk",
        forbidden_deps: &["tokio", "hyper", "hyper-util", "reqwest", "rustls", "quick-xml", "libloading"],
        forbidden_source: &["std::net", "std::process"],
        why: "vmdk parses bytes it is given: no network, no async runtime, no VDDK",
    },
    Rule {
        covers: |name| name.starts_with("vddk"),
        forbidden_deps: &["tokio", "hyper", "hyper-util", "reqwest", "quick-xml", "vmdk", "cbt"],
        forbidden_source: &["std::net"],
        why: "the VDDK binding wraps the C library only: no async runtime, no SOAP, no formats",
    },
    Rule {
        covers: |name| name == "nbd-wire",
        forbidden_deps: &["cbt", "vmdk", "vddk", "vddk-sys", "quick-xml", "hyper"],
        forbidden_source: &[],
        why: "nbd-wire speaks NBD: bytes and offsets, no formats, no CBT, no VDDK",
    },
    Rule {
        covers: |name| name == "pipeline",
        forbidden_deps: &[
            "nbd-wire",
            "vmdk",
            "vsphere",
            "vddk",
            "vddk-sys",
            "libloading",
            "hyper",
            "quick-xml",
            "rustls",
            "blockio",
            "vsphere-io",
            "repo",
            "replica",
            "orchestration",
            "durable",
        ],
        forbidden_source: &[
            "vixDiskLib",
            "VixDiskLib",
            "nbd_wire::",
            "vmdk::",
            "vsphere::",
            "vddk::",
            "repo::",
            "orchestration::",
        ],
        why: "the pipeline is transport-neutral: traits and engine only, no transport, no source or sink of its own beyond tests, no target, no state files",
    },
    Rule {
        covers: |name| name == "blockio",
        forbidden_deps: &[
            "vsphere",
            "vddk",
            "vddk-sys",
            "libloading",
            "hyper",
            "quick-xml",
            "repo",
            "replica",
            "orchestration",
        ],
        // rustls comes with nbd-wire (its server's TLS); this crate must not speak TLS itself.
        forbidden_source: &["VixDiskLib", "vsphere::", "vddk::", "repo::", "replica::", "orchestration::", "rustls"],
        why: "sources and sinks at the edge move bytes for the pipeline: no vSphere, no VDDK, no target, no job",
    },
    Rule {
        covers: |name| name == "vsphere-io",
        // vddk-sys comes with the safe VDDK binding; this crate must use only `vddk`'s safe API.
        forbidden_deps: &["repo", "replica", "orchestration"],
        forbidden_source: &[
            "VixDiskLib",
            "vddk_sys::",
            "libloading::",
            "quick_xml::",
            "unsafe ",
            "repo::",
            "replica::",
            "orchestration::",
        ],
        why: "the vSphere sources read frozen disks for the pipeline: no target, no job, SOAP and the C API stay in their crates",
    },
    Rule {
        covers: |name| name == "replica",
        forbidden_deps: &[
            "vddk",
            "vddk-sys",
            "libloading",
            "hyper",
            "quick-xml",
            "rustls",
            "orchestration",
            "vsphere",
            "repo",
        ],
        forbidden_source: &["VixDiskLib", "vsphere::", "repo::"],
        why: "the replica target writes, records and syncs one disk it is given: no VDDK, no vSphere, no orchestration, no repository",
    },
    Rule {
        covers: |name| name == "durable",
        forbidden_deps: &[
            "pipeline",
            "repo",
            "replica",
            "orchestration",
            "vsphere",
            "cbt",
            "tokio",
            "nbd-wire",
            "vmdk",
        ],
        forbidden_source: &["tokio::"],
        why: "durable files are the floor under the repository and the replica: no disks, no plans, no async runtime",
    },
    Rule {
        covers: |name| name == "vsphere",
        forbidden_deps: &["vddk", "vddk-sys", "libloading", "pipeline", "replica", "nbd-wire", "vmdk", "ring"],
        forbidden_source: &["VixDiskLib", "std::process"],
        why: "the vSphere client speaks SOAP and HTTPS: no VDDK, no disk formats, no copying, one crypto provider",
    },
    Rule {
        covers: |name| name == "orchestration",
        // quick-xml comes with the vSphere client and vddk-sys with the safe VDDK binding; this
        // crate must use neither itself: only `vddk`'s safe API.
        forbidden_deps: &[],
        forbidden_source: &["VixDiskLib", "vddk_sys::", "libloading::", "quick_xml::", "soapenv", "unsafe "],
        why: "orchestration orders the steps: SOAP is the vSphere client's, the C API the VDDK binding's",
    },
    Rule {
        covers: |name| name == "repo",
        // hyper and quick-xml come with object_store's S3 client: the repository must not use
        // them itself.
        forbidden_deps: &["vsphere", "vddk", "vddk-sys", "libloading", "nbd-wire", "vmdk", "blockio", "vsphere-io"],
        forbidden_source: &["VixDiskLib", "nbd_wire::", "vmdk::", "vsphere::"],
        why: "the repository stores disks it is given through the pipeline: it uses no vSphere, VDDK, NBD or VMDK itself",
    },
    Rule {
        covers: |name| name == "instant",
        forbidden_deps: &["vsphere", "vsphere-io", "orchestration", "quick-xml", "vddk", "vddk-sys", "libloading"],
        forbidden_source: &["VixDiskLib", "vsphere::", "orchestration::", "qemu-system", "soapenv"],
        why: "instant recovery serves restore points and replicas as bytes: no vSphere, VDDK, SOAP or QEMU",
    },
    Rule {
        covers: |name| name == "vsphere-sim",
        // It writes snapshot deltas with vmdk's writers (whose output qemu-img, an independent
        // reader, checks in vmdk's own tests). It reads VMDK with `vmdk::Disk` only where a
        // restore hands it disks to convert (`CopyVirtualDisk_Task`) or attach, as ESXi reads
        // them; it never parses descriptors or streams itself, and backups read what it
        // writes, not what it reads.
        forbidden_deps: &["vddk", "vddk-sys", "libloading", "pipeline", "replica", "nbd-wire", "ring"],
        forbidden_source: &[
            "vsphere::pc::",
            "vsphere::model::",
            "vsphere::task::",
            "vsphere::session::",
            "vmdk::StreamReader",
            "vmdk::Descriptor",
            "vmdk::Files",
        ],
        why: "the simulator answers the protocol on its own: it shares only the XML tree, MoRef and the API's enumerated values with the client",
    },
    Rule {
        covers: |name| name == "drill",
        forbidden_deps: &[
            "repo",
            "replica",
            "orchestration",
            "pipeline",
            "blockio",
            "vsphere",
            "vsphere-io",
            "vddk",
            "vddk-sys",
            "libloading",
            "nbd-wire",
            "vmdk",
            "cbt",
            "hyper",
            "quick-xml",
            "rustls",
        ],
        forbidden_source: &[
            "repo::",
            "replica::",
            "orchestration::",
            "vsphere::",
            "nbd_wire::",
            "pipeline::",
            "VixDiskLib",
            "soapenv",
        ],
        why: "a drill boots the NBD URIs it is given under QEMU: it knows neither the repository, nor vSphere, nor the NBD server",
    },
    Rule {
        covers: |_| true,
        forbidden_deps: &["anyhow"],
        forbidden_source: &[],
        why: "library crates own typed errors (thiserror); anyhow is for bins/ and xtask/",
    },
    Rule {
        covers: |name| !matches!(name, "fuzzing" | "testkit" | "vddk-fake"),
        forbidden_deps: &["fuzzing", "testkit", "vddk-fake", "proptest", "arbitrary", "libfuzzer-sys"],
        forbidden_source: &[],
        why: "test generators and oracles stay out of what ships (dev-dependencies only)",
    },
];

pub(crate) fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let libraries = package_dirs(root, "crates")?;
    let binaries = package_dirs(root, "bins")?;
    for (dir, name) in libraries.iter().chain(&binaries) {
        if dir != name {
            problems.push(format!("{dir}: the package is named {name:?}; directory name and package name must match"));
        }
    }
    for (_, name) in &libraries {
        let tree = crate::output(
            Command::new("cargo")
                .args(["tree", "--locked", "-p", name, "-e", "normal", "--prefix", "none", "--format", "{p}"]),
        )?;
        let deps: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
        for (_, bin) in &binaries {
            if deps.contains(&bin.as_str()) {
                problems
                    .push(format!("crates/{name} depends on bins/{bin}: nothing in crates/ may depend on a binary"));
            }
        }
        for rule in RULES.iter().filter(|r| (r.covers)(name)) {
            for dep in rule.forbidden_deps.iter().filter(|d| deps.contains(d)) {
                problems.push(format!("crates/{name} depends on {dep}: {}", rule.why));
            }
            for needle in rule.forbidden_source {
                for file in sources(&root.join("crates").join(name).join("src"))? {
                    if std::fs::read_to_string(&file)?.contains(needle) {
                        problems.push(format!("{} uses {needle}: {}", file.display(), rule.why));
                    }
                }
            }
        }
    }
    // A production proxy (`--no-default-features`) carries no simulator.
    let production = crate::output(Command::new("cargo").args([
        "tree",
        "--locked",
        "-p",
        "proxy",
        "--no-default-features",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]))?;
    if production.lines().any(|l| l.split_whitespace().next() == Some("vsphere-sim")) {
        problems.push("bins/proxy without default features depends on vsphere-sim: the simulator and `demo` belong behind the `sim` feature, so a production build leaves them out".into());
    }
    if !problems.is_empty() {
        bail!("crate boundaries broken:\n  {}", problems.join("\n  "));
    }
    println!("crate boundaries hold for {} libraries and {} binaries", libraries.len(), binaries.len());
    Ok(())
}

/// `(directory name, package name)` of each package under `root/dir`.
fn package_dirs(root: &Path, dir: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root.join(dir)) else { return Ok(out) };
    for e in entries {
        let path = e?.path();
        let Ok(manifest) = std::fs::read_to_string(path.join("Cargo.toml")) else { continue };
        let name = manifest
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = ").map(|n| n.trim_matches('"').to_owned()))
            .unwrap_or_default();
        out.push((path.file_name().unwrap_or_default().to_string_lossy().into_owned(), name));
    }
    out.sort();
    Ok(out)
}

fn sources(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(out) };
    for e in entries {
        let path = e?.path();
        if path.is_dir() {
            out.extend(sources(&path)?);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}
