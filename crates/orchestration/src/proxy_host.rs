//! Facts about the proxy host itself, for `probe check`: its operating system, cores, memory,
//! free space where it writes, and the throttling it is configured with. Gathered from
//! `/etc/os-release`, `/proc/meminfo` and `statvfs`; judged by `preflight::check_proxy`.

use std::path::{Path, PathBuf};

/// The proxy host as `probe check` sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyFacts {
    /// `ID` of `/etc/os-release` (`ubuntu`).
    pub os_id: Option<String>,
    /// `VERSION_ID` (`24.04`).
    pub os_version: Option<String>,
    /// `PRETTY_NAME`.
    pub os_name: Option<String>,
    /// CPUs this process may use.
    pub cores: usize,
    /// Bytes of memory (`MemTotal`).
    pub memory: Option<u64>,
    /// Where backups or replicas are written, with the bytes free there (`None`: unknown).
    pub targets: Vec<(PathBuf, Option<u64>)>,
    /// VMs at once (the daemon's `max_vms`).
    pub max_vms: usize,
    /// Milliseconds slept per request per stream (`release_cpu_time`).
    pub release_cpu_time: u32,
}

/// A value of an `os-release` line (`KEY=value` or `KEY="value"`).
fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').to_owned()).filter(|v| !v.is_empty())
    })
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The bytes free to an unprivileged writer in the file system holding `path` (or its nearest
/// existing parent, for a target not made yet).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let st = rustix::fs::statvfs(existing).ok()?;
    st.f_bavail.checked_mul(st.f_frsize)
}

impl ProxyFacts {
    /// Reads this host's facts; `targets` are where it writes, `max_vms` and
    /// `release_cpu_time` what it is configured with.
    pub fn gather(targets: &[PathBuf], max_vms: usize, release_cpu_time: u32) -> Self {
        let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        Self {
            os_id: os_release_value(&os, "ID"),
            os_version: os_release_value(&os, "VERSION_ID"),
            os_name: os_release_value(&os, "PRETTY_NAME"),
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            memory: std::fs::read_to_string("/proc/meminfo").ok().as_deref().and_then(mem_total),
            targets: targets.iter().map(|t| (t.clone(), free_bytes(t))).collect(),
            max_vms,
            release_cpu_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_and_meminfo_are_read() {
        let os =
            "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nID=ubuntu\nID_LIKE=debian\nPRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\n";
        assert_eq!(os_release_value(os, "ID").as_deref(), Some("ubuntu"));
        assert_eq!(os_release_value(os, "VERSION_ID").as_deref(), Some("24.04"));
        assert_eq!(os_release_value(os, "PRETTY_NAME").as_deref(), Some("Ubuntu 24.04.1 LTS"));
        assert_eq!(os_release_value(os, "VARIANT"), None);
        assert_eq!(mem_total("MemTotal:       25165824 kB\nMemFree: 1 kB\n"), Some(24 << 30));
        assert_eq!(mem_total("nothing"), None);
        let here = ProxyFacts::gather(&[std::env::temp_dir().join("not-made-yet/x")], 100, 0);
        assert!(here.cores >= 1 && here.memory.is_some_and(|m| m > 0));
        assert!(here.targets[0].1.is_some(), "free space of the nearest existing parent");
    }
}
