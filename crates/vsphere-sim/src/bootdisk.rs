//! Small bootable raw disks for drill tests, built from Debian packages: a Debian kernel and a
//! busybox initramfs whose `/init` loads the disk controller's drivers, prints a marker on the
//! serial console, hashes a payload region of its own disk, prints the hash and powers off; a VM
//! with an e1000 NIC first brings it up on QEMU's user-mode network, serves a page on port 80,
//! tries to reach the host, says whether it could, and stays up a while for network checks.
//! Built once per content and kept under `${XDG_CACHE_HOME:-~/.cache}/syncproxy-fixtures`.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// The whole disk.
pub const DISK_SIZE: u64 = 64 * MIB;
/// Where the boot partition (FAT) starts.
const PART_START: u64 = MIB;
/// Where it ends (exclusive); the payload follows.
const PART_END: u64 = 48 * MIB;
/// Where the payload the guest hashes starts, in bytes.
pub const PAYLOAD_OFFSET: u64 = 48 * MIB;
/// How long the payload is, in bytes.
pub const PAYLOAD_LEN: u64 = 8 * MIB;
/// Where a test may write a TCP port (ASCII digits, then a newline): a guest with a network
/// tries to reach that port on QEMU's user-mode host address ([`NET_GATEWAY`]) and prints
/// [`NET_ESCAPED`] when it connects, else [`NET_CONTAINED`]. Past the payload, so the hash the
/// guest prints does not change.
pub const PROBE_OFFSET: u64 = PAYLOAD_OFFSET + PAYLOAD_LEN;
const _: () = assert!(PROBE_OFFSET + 512 <= DISK_SIZE);
/// Bumped whenever the layout changes, so cached disks are rebuilt (the init script and the
/// module lists are part of the cache key by content).
const BUILD_REVISION: &str = "bootdisk-1";

/// Which firmware and boot controller a disk is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// SYSLINUX on FAT, BIOS (SeaBIOS), the boot disk on SATA (AHCI).
    Bios,
    /// SYSLINUX's EFI loader as `\EFI\BOOT\BOOTX64.EFI` on an EFI system partition, EFI (OVMF),
    /// the boot disk on SATA (AHCI). Not on LSI SAS: Debian's OVMF has no boot driver for
    /// `mptsas1068` (nor for `pvscsi`) and falls to its shell.
    Efi,
    /// Like [`Variant::Bios`], the boot disk on a VMware paravirtual SCSI controller.
    BiosPvscsi,
}

/// The disk controller a variant's boot disk hangs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// AHCI (`sata0` in a `.vmx`, `ich9-ahci` in QEMU).
    Sata,
    /// VMware PVSCSI (`scsi0.virtualDev = "pvscsi"`, `pvscsi` in QEMU).
    Pvscsi,
}

impl Controller {
    /// Its name as a `.vmx` (`scsi0.virtualDev`) and the simulator's `controller` spell it:
    /// `sata` or `pvscsi`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Sata => "sata",
            Controller::Pvscsi => "pvscsi",
        }
    }
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 3] = [Variant::Bios, Variant::Efi, Variant::BiosPvscsi];

    /// A short lower-case name: `bios`, `efi`, `bios-pvscsi`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Bios => "bios",
            Variant::Efi => "efi",
            Variant::BiosPvscsi => "bios-pvscsi",
        }
    }

    /// Whether the disk boots with EFI firmware (else BIOS).
    pub fn efi(self) -> bool {
        self == Variant::Efi
    }

    /// The controller of the boot disk.
    pub fn controller(self) -> Controller {
        match self {
            Variant::Bios | Variant::Efi => Controller::Sata,
            Variant::BiosPvscsi => Controller::Pvscsi,
        }
    }

    /// The kernel modules the guest loads (their dependencies come along): the controller's and
    /// the NIC's.
    fn modules(self) -> &'static [&'static str] {
        match self.controller() {
            Controller::Sata => &["ahci", "sd_mod", "e1000"],
            Controller::Pvscsi => &["vmw_pvscsi", "sd_mod", "e1000"],
        }
    }
}

/// A built disk and what a test needs to boot and check it.
#[derive(Debug, Clone)]
pub struct BootDisk {
    /// The variant it was built as.
    pub variant: Variant,
    /// The raw image (in the cache: copy it before writing to it).
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The SHA-256 (lower-case hex) of the payload region, as the guest prints it.
    pub payload_sha256: String,
    /// The line the guest prints on its serial console once its drivers are loaded.
    pub marker: String,
    /// A `.vmx` describing the VM this disk belongs to (firmware, memory, CPUs, controller, the
    /// disk's slot with `fileName`, guest OS).
    pub vmx: String,
    /// The disk's slot key in the `.vmx`, `sata0:0` or `scsi0:0`.
    pub slot: String,
}

impl BootDisk {
    /// The line the guest prints with the payload's hash, for this disk's payload.
    pub fn payload_line(&self) -> String {
        format!("{PAYLOAD_PREFIX} {}", self.payload_sha256)
    }
}

/// What the guest prints before the payload's hash.
pub const PAYLOAD_PREFIX: &str = "SYNCPROXY-PAYLOAD-SHA256";
/// What the guest prints before the variant's name once it is up.
pub const MARKER_PREFIX: &str = "SYNCPROXY-BOOT-OK";
/// What a guest with a NIC prints once its address is set and its web server (port 80, a page
/// holding its boot marker) runs; it then stays up two minutes before powering off.
pub const NET_UP: &str = "SYNCPROXY-NET-UP";
/// What a guest prints when it reached the port written at [`PROBE_OFFSET`] on the host.
pub const NET_ESCAPED: &str = "SYNCPROXY-NET-ESCAPED";
/// What a guest prints when it could not reach that port.
pub const NET_CONTAINED: &str = "SYNCPROXY-NET-CONTAINED";
/// The guest's static address on QEMU's user-mode network, with its prefix length.
pub const NET_ADDRESS: &str = "10.0.2.15/24";
/// QEMU's user-mode gateway, which stands for the host.
pub const NET_GATEWAY: &str = "10.0.2.2";

/// Why a disk could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Something the build needs is not on this machine (a tool, a package, the kernel's
    /// `.deb`): a test skips (fails under `CI=true`).
    #[error("{0}")]
    Missing(String),
    /// A tool ran and failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The command.
        tool: String,
        /// Its status and output.
        detail: String,
    },
    /// The kernel package lacks something the guest needs.
    #[error("kernel package {deb}: {detail}")]
    Kernel {
        /// The package file.
        deb: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading or writing a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { what, path, source }
}

/// The folder fixtures are cached in: `$XDG_CACHE_HOME/syncproxy-fixtures`, else
/// `~/.cache/syncproxy-fixtures` (where `cargo xtask setup` puts the kernel package).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("syncproxy-fixtures")
}

/// Host files the build reads (besides the kernel package), with the package they come from.
const MBR_BIN: (&str, &str) = ("/usr/lib/syslinux/mbr/mbr.bin", "syslinux-common");
const BUSYBOX: (&str, &str) = ("/bin/busybox", "busybox-static");
const SYSLINUX_EFI: (&str, &str) = ("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi", "syslinux-efi");
const LDLINUX_E64: (&str, &str) = ("/usr/lib/syslinux/modules/efi64/ldlinux.e64", "syslinux-common");

fn host_file((path, package): (&str, &str)) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|e| BuildError::Missing(format!("{path} ({package}): {e}")))
}

fn tool(name: &str, package: &str) -> Result<PathBuf, BuildError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| BuildError::Missing(format!("`{name}` is not installed (package {package})")))
}

/// Builds (or finds in the cache) the disk for `variant`.
pub fn build(variant: Variant) -> Result<BootDisk, BuildError> {
    let cache = cache_dir();
    let deb = kernel_deb(&cache)?;
    let busybox = host_file(BUSYBOX)?;
    let mbr = host_file(MBR_BIN)?;
    let efi_files = if variant.efi() { Some((host_file(SYSLINUX_EFI)?, host_file(LDLINUX_E64)?)) } else { None };
    let mtools = [tool("mformat", "mtools")?, tool("mmd", "mtools")?, tool("mcopy", "mtools")?];
    let syslinux = if variant.efi() { None } else { Some(tool("syslinux", "syslinux")?) };

    let mut key = Sha256::new();
    key.update(BUILD_REVISION.as_bytes());
    key.update(variant.name().as_bytes());
    key.update(init_script(variant, &[]).as_bytes());
    key.update(variant.modules().join(",").as_bytes());
    key.update(deb.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
    key.update(&busybox);
    key.update(&mbr);
    if let Some((efi, ldlinux)) = &efi_files {
        key.update(efi);
        key.update(ldlinux);
    }
    if let Some(s) = &syslinux {
        key.update(std::fs::read(s).map_err(io_err("reading", s))?);
    }
    let key = hex(&key.finalize()[..8]);
    let path = cache.join(format!("bootdisk-{}-{key}.img", variant.name()));
    let payload = payload(variant);
    let payload_sha256 = hex(&Sha256::digest(&payload));
    let disk = BootDisk {
        variant,
        size: DISK_SIZE,
        payload_sha256,
        marker: format!("{MARKER_PREFIX} {}", variant.name()),
        vmx: vmx(variant, &format!("syncproxy-bootdisk-{}.vmdk", variant.name())),
        slot: slot(variant).to_string(),
        path,
    };
    if cached_ok(&disk.path, &payload) {
        return Ok(disk);
    }

    let kernel = extract_kernel(&cache, &deb)?;
    let initrd = initramfs(variant, &kernel, &busybox, &deb)?;
    let tmp = unique(&cache, "img");
    let result = (|| {
        write_image(&tmp, &mbr, variant, &payload)?;
        fat_contents(&tmp, &mtools, &kernel.vmlinuz, &initrd, efi_files.as_ref())?;
        if let Some(syslinux) = &syslinux {
            run(Command::new(syslinux).arg("--install").arg("--offset").arg(PART_START.to_string()).arg(&tmp))?;
        }
        std::fs::rename(&tmp, &disk.path).map_err(io_err("renaming", &tmp))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| disk)
}

/// The `.vmx` key of the boot disk's slot.
fn slot(variant: Variant) -> &'static str {
    match variant.controller() {
        Controller::Sata => "sata0:0",
        Controller::Pvscsi => "scsi0:0",
    }
}

/// The `.vmx` lines of a variant's VM besides its controller and disk: firmware, memory, CPUs,
/// guest OS (what a simulated VM's `vmx_extra` takes).
pub fn vmx_hardware(variant: Variant) -> String {
    let mut v = String::new();
    for (k, val) in [
        ("guestOS", "debian12-64"),
        ("firmware", if variant.efi() { "efi" } else { "bios" }),
        ("memsize", "256"),
        ("numvcpus", "1"),
    ] {
        let _ = writeln!(v, "{k} = \"{val}\"");
    }
    v
}

/// A `.vmx` for a VM whose only disk is this variant's, named `file_name`.
pub fn vmx(variant: Variant, file_name: &str) -> String {
    let mut v = String::new();
    let mut line = |k: &str, val: &str| {
        let _ = writeln!(v, "{k} = \"{val}\"");
    };
    line(".encoding", "UTF-8");
    line("config.version", "8");
    line("virtualHW.version", "19");
    line("displayName", &format!("syncproxy-bootdisk-{}", variant.name()));
    match variant.controller() {
        Controller::Sata => line("sata0.present", "TRUE"),
        Controller::Pvscsi => {
            line("scsi0.present", "TRUE");
            line("scsi0.virtualDev", "pvscsi");
        }
    }
    let slot = slot(variant);
    line(&format!("{slot}.present"), "TRUE");
    line(&format!("{slot}.fileName"), file_name);
    v + &vmx_hardware(variant)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The payload's bytes: deterministic noise seeded by the variant's name.
fn payload(variant: Variant) -> Vec<u8> {
    let mut x =
        variant.name().bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
    let mut out = Vec::with_capacity(usize::try_from(PAYLOAD_LEN).unwrap_or(0));
    while (out.len() as u64) < PAYLOAD_LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Whether a cached image is there, whole, with the expected payload.
fn cached_ok(path: &Path, payload: &[u8]) -> bool {
    let Ok(f) = File::open(path) else { return false };
    if f.metadata().map(|m| m.len()).ok() != Some(DISK_SIZE) {
        return false;
    }
    let mut got = vec![0; payload.len()];
    f.read_exact_at(&mut got, PAYLOAD_OFFSET).is_ok() && got == payload
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A path in `dir` no other build (thread or process) uses.
fn unique(dir: &Path, ext: &str) -> PathBuf {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp-{}-{n}.{ext}", std::process::id()))
}

fn run(cmd: &mut Command) -> Result<String, BuildError> {
    cmd.env("MTOOLS_SKIP_CHECK", "1");
    let out = cmd.output().map_err(|e| BuildError::Tool { tool: format!("{cmd:?}"), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(BuildError::Tool {
            tool: format!("{cmd:?}"),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest `linux-image-*-amd64_*.deb` in the cache (`cargo xtask setup` downloads it).
pub fn kernel_deb(cache: &Path) -> Result<PathBuf, BuildError> {
    let missing = || {
        BuildError::Missing(format!(
            "no linux-image-*-amd64_*.deb in {} (`cargo xtask setup` downloads it)",
            cache.display()
        ))
    };
    let entries = std::fs::read_dir(cache).map_err(|_| missing())?;
    let mut debs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("linux-image-")
                    && n.ends_with("_amd64.deb")
                    && n.split('_').next().is_some_and(|s| s.ends_with("-amd64"))
            })
        })
        .collect();
    debs.sort();
    debs.pop().ok_or_else(missing)
}

/// The parts of a kernel package the guest needs, extracted once.
#[derive(Debug)]
struct Kernel {
    vmlinuz: PathBuf,
    /// `lib/modules/<version>`.
    modules: PathBuf,
}

/// The module folders extracted from the package: enough for the SATA, SCSI and SAS drivers,
/// the e1000 NIC's, and everything they depend on.
const MODULE_DIRS: [&str; 7] = [
    "kernel/drivers/scsi",
    "kernel/drivers/ata",
    "kernel/drivers/message",
    "kernel/drivers/net/ethernet/intel/e1000",
    "kernel/block",
    "kernel/lib",
    "kernel/crypto",
];

fn extract_kernel(cache: &Path, deb: &Path) -> Result<Kernel, BuildError> {
    let stem = deb.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
    // Named by the folders it holds: a build that needs others extracts afresh, beside the
    // folders older builds (still) use.
    let dirs = hex(&Sha256::digest(MODULE_DIRS.join(",").as_bytes())[..4]);
    let dir = cache.join(format!("{stem}.{dirs}.extracted"));
    if !dir.is_dir() {
        tool("dpkg-deb", "dpkg")?;
        let tmp = unique(cache, "extract");
        std::fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
        let script = format!(
            "dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards './boot/vmlinuz-*' {}",
            MODULE_DIRS.iter().map(|d| format!("'./lib/modules/*/{d}'")).collect::<Vec<_>>().join(" ")
        );
        let r = run(Command::new("sh").arg("-c").arg(script).arg("sh").arg(deb).arg(&tmp));
        if let Err(e) = r {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another build got there first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let kernel_err = |detail: &str| BuildError::Kernel { deb: deb.to_path_buf(), detail: detail.to_string() };
    let first = |p: PathBuf, prefix: &str| -> Option<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
            .collect();
        v.sort();
        v.pop()
    };
    let vmlinuz = first(dir.join("boot"), "vmlinuz-").ok_or_else(|| kernel_err("no boot/vmlinuz-*"))?;
    let modules = first(dir.join("lib/modules"), "").ok_or_else(|| kernel_err("no lib/modules/<version>"))?;
    Ok(Kernel { vmlinuz, modules })
}

/// A module's name as the kernel spells it in `depends=`: its file name without `.ko`, with
/// `-` read as `_`.
fn module_name(file: &str) -> Option<String> {
    file.strip_suffix(".ko").map(|s| s.replace('-', "_"))
}

/// Every `.ko` under `dir`, by module name.
fn index_modules(dir: &Path, out: &mut std::collections::BTreeMap<String, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, out);
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            out.insert(name, p);
        }
    }
}

/// The `depends=` list from a module's `.modinfo` strings (empty when there is none).
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else { return Vec::new() };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect()
}

/// The modules to load for `roots`, dependencies first, each once.
fn load_order(
    roots: &[&str],
    index: &std::collections::BTreeMap<String, PathBuf>,
) -> Result<Vec<(String, PathBuf)>, String> {
    fn visit(
        name: &str,
        index: &std::collections::BTreeMap<String, PathBuf>,
        seen: &mut Vec<String>,
        out: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> Result<(), String> {
        if seen.iter().any(|s| s == name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(format!("module dependencies too deep at {name}"));
        }
        let path = index.get(name).ok_or_else(|| format!("module {name} is not in the package"))?;
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, seen, out, depth + 1)?;
        }
        seen.push(name.to_string());
        out.push((name.to_string(), path.clone()));
        Ok(())
    }
    let (mut seen, mut out) = (Vec::new(), Vec::new());
    for root in roots {
        visit(root, index, &mut seen, &mut out, 0)?;
    }
    Ok(out)
}

/// The guest's `/init`: the drivers, the marker, the payload's hash; with a NIC, the network
/// (see [`NET_UP`], [`PROBE_OFFSET`]); then power-off.
fn init_script(variant: Variant, modules: &[(String, PathBuf)]) -> String {
    let loads: String = modules.iter().map(|(name, _)| format!("insmod /lib/modules/{name}.ko\n")).collect();
    format!(
        r#"#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{loads}i=0
while [ ! -b /dev/sda ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
if [ ! -b /dev/sda ]; then
  echo "SYNCPROXY-BOOT-FAILED {name}: no /dev/sda"
  poweroff -f
fi
echo "{MARKER_PREFIX} {name}"
sum=$(dd if=/dev/sda bs=1048576 skip={skip} count={count} 2>/dev/null | sha256sum)
echo "{PAYLOAD_PREFIX} ${{sum%% *}}"
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip addr add {NET_ADDRESS} dev eth0
  ip link set eth0 up
  ip route add default via {NET_GATEWAY}
  i=0
  while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  mkdir -p /www
  echo "{MARKER_PREFIX} {name}" > /www/index.html
  httpd -p 80 -h /www
  port=$(dd if=/dev/sda bs=512 skip={probe} count=1 2>/dev/null | head -n 1 | tr -cd 0-9)
  if [ -n "$port" ]; then
    # Bounded by `timeout`: busybox 1.35's `wget -T` crashes.
    if timeout 10 wget -q -O /dev/null "http://{NET_GATEWAY}:$port/"; then
      echo "{NET_ESCAPED}"
    else
      echo "{NET_CONTAINED}"
    fi
  fi
  echo "{NET_UP}"
  sleep 120
fi
poweroff -f
"#,
        name = variant.name(),
        skip = PAYLOAD_OFFSET / MIB,
        count = PAYLOAD_LEN / MIB,
        probe = PROBE_OFFSET / 512,
    )
}

/// A `newc` cpio archive, written by hand (no `cpio` tool needed).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

fn initramfs(variant: Variant, kernel: &Kernel, busybox: &[u8], deb: &Path) -> Result<Vec<u8>, BuildError> {
    let mut index = std::collections::BTreeMap::new();
    index_modules(&kernel.modules, &mut index);
    let modules = load_order(variant.modules(), &index)
        .map_err(|detail| BuildError::Kernel { deb: deb.to_path_buf(), detail })?;
    let mut c = Cpio { out: Vec::new(), ino: 0 };
    for dir in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        c.entry(dir, 0o040_755, (0, 0), &[]);
    }
    c.entry("dev/console", 0o020_600, (5, 1), &[]);
    c.entry("bin/busybox", 0o100_755, (0, 0), busybox);
    c.entry("bin/sh", 0o120_777, (0, 0), b"busybox");
    for (name, path) in &modules {
        let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
        c.entry(&format!("lib/modules/{name}.ko"), 0o100_644, (0, 0), &bytes);
    }
    c.entry("init", 0o100_755, (0, 0), init_script(variant, &modules).as_bytes());
    c.entry("TRAILER!!!", 0, (0, 0), &[]);
    Ok(c.out)
}

/// Writes the sparse image: the MBR (boot code and one partition), the payload.
fn write_image(path: &Path, mbr_code: &[u8], variant: Variant, payload: &[u8]) -> Result<(), BuildError> {
    let f = File::create(path).map_err(io_err("creating", path))?;
    f.set_len(DISK_SIZE).map_err(io_err("sizing", path))?;
    let mut mbr = [0u8; 512];
    let code = &mbr_code[..mbr_code.len().min(440)];
    mbr[..code.len()].copy_from_slice(code);
    mbr[440..444].copy_from_slice(&0x5359_4e43u32.to_le_bytes()); // disk signature "SYNC"
    let start = u32::try_from(PART_START / 512).unwrap_or(0);
    let sectors = u32::try_from((PART_END - PART_START) / 512).unwrap_or(0);
    let entry = &mut mbr[446..462];
    entry[0] = 0x80; // active
    entry[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]); // CHS: use LBA
    // EFI system partition, else FAT16 (LBA).
    entry[4] = if variant.efi() { 0xEF } else { 0x0E };
    entry[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    f.write_all_at(&mbr, 0).map_err(io_err("writing", path))?;
    f.write_all_at(payload, PAYLOAD_OFFSET).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

/// Makes the FAT file system and copies the kernel, the initramfs and the loader's config in.
fn fat_contents(
    img: &Path,
    [mformat, mmd, mcopy]: &[PathBuf; 3],
    vmlinuz: &Path,
    initrd: &[u8],
    efi: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<(), BuildError> {
    let target = format!("{}@@{PART_START}", img.display());
    let sectors = (PART_END - PART_START) / 512;
    run(Command::new(mformat)
        .args(["-i", &target, "-T", &sectors.to_string(), "-h", "64", "-s", "32", "-H"])
        .arg((PART_START / 512).to_string())
        .args(["-v", "SYNCBOOT", "::"]))?;
    let staging = unique(img.parent().unwrap_or(Path::new(".")), "files");
    std::fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
    let result = (|| {
        let put = |name: &str, data: &[u8]| -> Result<PathBuf, BuildError> {
            let p = staging.join(name);
            std::fs::write(&p, data).map_err(io_err("writing", &p))?;
            Ok(p)
        };
        let config = "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd\n  APPEND console=ttyS0 quiet loglevel=3 panic=-1\n";
        let copy = |from: &Path, to: &str| run(Command::new(mcopy).args(["-o", "-i", &target]).arg(from).arg(to));
        copy(vmlinuz, "::/vmlinuz")?;
        copy(&put("initrd", initrd)?, "::/initrd")?;
        match efi {
            Some((loader, ldlinux)) => {
                run(Command::new(mmd).args(["-i", &target, "::/EFI", "::/EFI/BOOT"]))?;
                copy(&put("BOOTX64.EFI", loader)?, "::/EFI/BOOT/BOOTX64.EFI")?;
                copy(&put("ldlinux.e64", ldlinux)?, "::/EFI/BOOT/ldlinux.e64")?;
                copy(&put("syslinux.cfg", config.as_bytes())?, "::/EFI/BOOT/syslinux.cfg")?;
            }
            None => {
                copy(&put("syslinux.cfg", config.as_bytes())?, "::/syslinux.cfg")?;
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// What a bare QEMU boot of a disk showed.
#[derive(Debug)]
pub struct BareBoot {
    /// From QEMU's start to the marker on the serial console.
    pub to_marker: std::time::Duration,
    /// The payload hash the guest printed, if it did.
    pub payload_sha256: Option<String>,
    /// The serial console's text.
    pub console: String,
}

/// QEMU's arguments for booting `image` (a raw file, written to: pass a copy) as `variant`'s
/// hardware: SeaBIOS or OVMF (`ovmf_vars` is a writable copy of `OVMF_VARS_4M.fd`), the boot
/// controller, the serial console into `serial`, TCG, no display, no network, no reboot.
pub fn qemu_args(variant: Variant, image: &Path, serial: &Path, ovmf_vars: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> =
        ["-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-nic", "none", "-no-reboot"]
            .map(String::from)
            .to_vec();
    a.push("-serial".into());
    a.push(format!("file:{}", serial.display()));
    if variant.efi() {
        a.extend(["-machine".into(), "q35".into(), "-drive".into()]);
        a.push(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"));
        if let Some(vars) = ovmf_vars {
            a.push("-drive".into());
            a.push(format!("if=pflash,format=raw,file={}", vars.display()));
        }
    } else if variant.controller() == Controller::Sata {
        a.extend(["-machine".into(), "q35".into()]);
    }
    a.push("-drive".into());
    a.push(format!("if=none,id=d0,format=raw,file={}", image.display()));
    match variant.controller() {
        Controller::Sata => a.extend(
            ["-device", "ich9-ahci,id=sata", "-device", "ide-hd,drive=d0,bus=sata.0,bootindex=0"].map(String::from),
        ),
        Controller::Pvscsi => a.extend(
            ["-device", "pvscsi,id=scsi", "-device", "scsi-hd,drive=d0,bus=scsi.0,bootindex=0"].map(String::from),
        ),
    }
    a
}

/// OVMF's code, as Debian's `ovmf` installs it.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's variable store template, as Debian's `ovmf` installs it (boot a copy).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Boots a copy of `disk` in `dir` with bare `qemu-system-x86_64` under TCG until the guest
/// powers off or `timeout` passes, timing the marker.
pub fn boot_bare(disk: &BootDisk, qemu: &Path, dir: &Path, timeout: std::time::Duration) -> Result<BareBoot, String> {
    let image = dir.join(format!("{}.img", disk.variant.name()));
    std::fs::copy(&disk.path, &image).map_err(|e| format!("copying {}: {e}", disk.path.display()))?;
    let vars = dir.join("OVMF_VARS.fd");
    if disk.variant.efi() {
        std::fs::copy(OVMF_VARS, &vars).map_err(|e| format!("copying {OVMF_VARS}: {e}"))?;
    }
    let serial = dir.join(format!("{}.console", disk.variant.name()));
    std::fs::write(&serial, b"").map_err(|e| format!("creating {}: {e}", serial.display()))?;
    let args = qemu_args(disk.variant, &image, &serial, disk.variant.efi().then_some(vars.as_path()));
    let start = std::time::Instant::now();
    let mut child = Command::new(qemu)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let mut to_marker = None;
    let status = loop {
        let console = std::fs::read_to_string(&serial).unwrap_or_default();
        if to_marker.is_none() && console.contains(&disk.marker) {
            to_marker = Some(start.elapsed());
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let Some(status) = status else {
        return Err(format!("no power-off within {timeout:?}; console:\n{console}"));
    };
    if !status.success() {
        return Err(format!("qemu {args:?} exited {status}: {stderr}\nconsole:\n{console}"));
    }
    let to_marker = to_marker.ok_or_else(|| format!("no `{}` on the console:\n{console}", disk.marker))?;
    let payload_sha256 =
        console.lines().find_map(|l| l.trim().strip_prefix(PAYLOAD_PREFIX)).map(|h| h.trim().to_string());
    Ok(BareBoot { to_marker, payload_sha256, console })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=scsi_mod,t10-pi\0retpoline=Y\0";
        assert_eq!(module_depends(ko), ["scsi_mod", "t10_pi"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"no modinfo here").is_empty());
        assert!(module_depends(b"\0depends=unterminated").len() == 1);
    }

    #[test]
    fn payload_differs_per_variant_and_has_its_length() {
        let a = payload(Variant::Bios);
        assert_eq!(a.len() as u64, PAYLOAD_LEN);
        assert_ne!(a, payload(Variant::Efi));
        assert_eq!(a, payload(Variant::Bios));
    }

    #[test]
    fn vmx_names_the_slot_and_firmware() {
        let v = vmx(Variant::BiosPvscsi, "d.vmdk");
        assert!(v.contains("scsi0.virtualDev = \"pvscsi\"\n"), "{v}");
        assert!(v.contains("scsi0:0.fileName = \"d.vmdk\"\n"), "{v}");
        assert!(v.contains("firmware = \"bios\"\n"), "{v}");
        let e = vmx(Variant::Efi, "e.vmdk");
        assert!(e.contains("firmware = \"efi\"\n") && e.contains("sata0:0.fileName = \"e.vmdk\"\n"), "{e}");
    }
}
