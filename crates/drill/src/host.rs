//! What the host offers a drill: which KVM modules are loaded, where QEMU, qemu-img and the
//! firmware files are, how much memory there is.

use std::path::PathBuf;

/// Facts about the host that decide a drill's plan. [`HostFacts::detect`] reads them; tests
/// make their own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Loaded kernel modules whose names start with `kvm` (`kvm`, `kvm_intel`, `kvm_pvm`).
    pub kvm_modules: Vec<String>,
    /// `qemu-system-x86_64`.
    pub qemu: Option<PathBuf>,
    /// `qemu-img`.
    pub qemu_img: Option<PathBuf>,
    /// SeaBIOS (`bios-256k.bin`).
    pub seabios: Option<PathBuf>,
    /// OVMF's code, without secure boot.
    pub ovmf_code: Option<PathBuf>,
    /// OVMF's variable store template, without secure boot.
    pub ovmf_vars: Option<PathBuf>,
    /// OVMF's code with secure boot (SMM).
    pub ovmf_secure_code: Option<PathBuf>,
    /// OVMF's variable store template with Microsoft's keys enrolled.
    pub ovmf_secure_vars: Option<PathBuf>,
    /// The host's memory in MiB, when known.
    pub memory_mib: Option<u64>,
}

fn first_file(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|p| p.is_file())
}

/// The names of the loaded modules starting with `kvm`, from `/proc/modules` text.
fn kvm_modules_in(proc_modules: &str) -> Vec<String> {
    proc_modules
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| m.starts_with("kvm"))
        .map(str::to_owned)
        .collect()
}

fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl HostFacts {
    /// Reads the host: `/proc/modules` (or `/sys/module` where there is no `/proc/modules`),
    /// `PATH`, the Debian and Fedora firmware paths, `/proc/meminfo`.
    pub fn detect() -> HostFacts {
        let kvm_modules = match std::fs::read_to_string("/proc/modules") {
            Ok(text) => kvm_modules_in(&text),
            Err(_) => {
                let mut names: Vec<String> = std::fs::read_dir("/sys/module")
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|m| m.starts_with("kvm"))
                    .collect();
                names.sort();
                names
            }
        };
        HostFacts {
            kvm_modules,
            qemu: on_path("qemu-system-x86_64"),
            qemu_img: on_path("qemu-img"),
            seabios: first_file(&["/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/bios-256k.bin"]),
            ovmf_code: first_file(&[
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_CODE.fd",
                "/usr/share/edk2/ovmf/OVMF_CODE.fd",
            ]),
            ovmf_vars: first_file(&[
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
                "/usr/share/OVMF/OVMF_VARS.fd",
                "/usr/share/edk2/ovmf/OVMF_VARS.fd",
            ]),
            ovmf_secure_code: first_file(&[
                "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
                "/usr/share/OVMF/OVMF_CODE.secboot.fd",
                "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",
            ]),
            ovmf_secure_vars: first_file(&[
                "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
                "/usr/share/OVMF/OVMF_VARS.ms.fd",
                "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd",
            ]),
            memory_mib: std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(mem_total_mib),
        }
    }

    /// The facts of a Debian host with QEMU, qemu-img, SeaBIOS and OVMF at their usual paths,
    /// 8 GiB of memory and only a paravirtual KVM (`kvm_pvm`), as on the machines here: for
    /// tests and fuzzing of plans, which read none of these files.
    pub fn example() -> HostFacts {
        HostFacts {
            kvm_modules: vec!["kvm_pvm".into(), "kvm".into()],
            qemu: Some("/usr/bin/qemu-system-x86_64".into()),
            qemu_img: Some("/usr/bin/qemu-img".into()),
            seabios: Some("/usr/share/seabios/bios-256k.bin".into()),
            ovmf_code: Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into()),
            ovmf_vars: Some("/usr/share/OVMF/OVMF_VARS_4M.fd".into()),
            ovmf_secure_code: Some("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd".into()),
            ovmf_secure_vars: Some("/usr/share/OVMF/OVMF_VARS_4M.ms.fd".into()),
            memory_mib: Some(8192),
        }
    }

    /// Whether the host's KVM can run a guest: `kvm_intel` or `kvm_amd` is loaded. A
    /// `/dev/kvm` that opens is not enough (a paravirtual `kvm_pvm` cannot boot firmware).
    pub fn kvm_usable(&self) -> bool {
        self.kvm_modules.iter().any(|m| m == "kvm_intel" || m == "kvm_amd")
    }

    /// Why KVM cannot run a guest here, in words.
    pub fn why_no_kvm(&self) -> String {
        let others: Vec<&str> = self.kvm_modules.iter().map(String::as_str).filter(|m| *m != "kvm").collect();
        if others.is_empty() {
            "neither kvm_intel nor kvm_amd is loaded".to_owned()
        } else {
            format!(
                "neither kvm_intel nor kvm_amd is loaded, only {}: a KVM on which firmware cannot boot (SeaBIOS stops \
                 with an emulation failure, OVMF hangs)",
                others.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kvm_modules_and_memory() {
        let modules = "kvm_pvm 90112 0 - Live 0x0\nkvm 1146880 1 kvm_pvm, Live 0x0\nfuse 1 0 - Live 0\n";
        let facts = HostFacts { kvm_modules: kvm_modules_in(modules), ..HostFacts::default() };
        assert_eq!(facts.kvm_modules, ["kvm_pvm", "kvm"]);
        assert!(!facts.kvm_usable());
        assert!(facts.why_no_kvm().contains("only kvm_pvm"), "{}", facts.why_no_kvm());
        let intel = HostFacts { kvm_modules: kvm_modules_in("kvm_intel 1 0\nkvm 2 1 kvm_intel\n"), ..facts };
        assert!(intel.kvm_usable());
        assert_eq!(mem_total_mib("MemTotal:       24684544 kB\nMemFree: 1 kB\n"), Some(24106));
        assert_eq!(mem_total_mib("nothing"), None);
        assert!(HostFacts::default().why_no_kvm().starts_with("neither"));
    }
}
