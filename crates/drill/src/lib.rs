//! DR drills: boots a VM's disks, already served as NBD URIs, under QEMU on emulations of its
//! own VMware hardware (read from its `.vmx`), in isolation, runs checks against it, and keeps
//! the evidence: which checks passed, the time to boot, the serial console, a screenshot, as a
//! JSON report and a self-contained HTML page.
//!
//! It knows neither the repository, nor vSphere, nor the NBD server: it is given the `.vmx`
//! text and one URI per disk slot. [`plan`] maps them to a QEMU command line without touching
//! anything (and refuses what the firmware cannot boot, before booting); [`run`] carries the
//! plan out and always stops QEMU and removes its overlays, on every path.

mod host;
mod plan;
mod qmp;
mod report;
mod run;
pub mod vmx;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use host::HostFacts;
pub use plan::{EfiVars, Overlay, PortForward, QemuPlan, plan};
pub use report::{CheckResult, DrillReport, SERIAL_TAIL_BYTES};
pub use run::{run, run_with_progress};

/// Cancels a running drill: [`run`] stops QEMU, removes the overlays and returns
/// [`DrillError::Cancelled`].
pub type Cancel = tokio_util::sync::CancellationToken;

/// What to drill and how.
#[derive(Debug, Clone)]
pub struct DrillSpec {
    /// A name for the report (the VM and its restore point).
    pub name: String,
    /// The VM's `.vmx` text.
    pub vmx: String,
    /// Each disk slot of the `.vmx` (`scsi0:0`) and the NBD URI serving it.
    pub disks: Vec<DrillDisk>,
    /// The accelerator.
    pub accel: Accel,
    /// Put the boot disk on this controller for the drill only.
    pub boot_controller: Option<BootController>,
    /// The checks; empty means [`default_checks`].
    pub checks: Vec<Check>,
    /// No network, or an isolated user-mode one for the checks.
    pub network: Network,
    /// The whole drill's time limit.
    pub timeout: Duration,
    /// Where the overlays, console log and sockets live while it runs (made if missing; what
    /// the drill put there is removed when it ends).
    pub work_dir: PathBuf,
}

/// One disk of the VM and where it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillDisk {
    /// The `.vmx` device key: `scsi0:0`, `sata0:1`, `nvme0:0`, `ide0:0`.
    pub slot: String,
    /// The NBD URI serving it (`nbd+unix:///name?socket=/path` or `nbd://host:port/name`).
    pub uri: String,
}

/// The accelerator a drill runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM where the host's KVM can run a guest (`kvm_intel` or `kvm_amd` loaded), else TCG.
    #[default]
    Auto,
    /// KVM, or fail at once.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!("{other:?}: use auto, kvm or tcg")),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// A controller the boot disk is moved to for the drill only, when the firmware cannot boot
/// from the original one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootController {
    /// AHCI (`ich9-ahci`).
    Sata,
    /// NVMe.
    Nvme,
    /// virtio-blk (the guest needs virtio drivers).
    Virtio,
}

impl FromStr for BootController {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sata" => Ok(Self::Sata),
            "nvme" => Ok(Self::Nvme),
            "virtio" => Ok(Self::Virtio),
            other => Err(format!("{other:?}: use sata, nvme or virtio")),
        }
    }
}

impl fmt::Display for BootController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sata => "sata",
            Self::Nvme => "nvme",
            Self::Virtio => "virtio",
        })
    }
}

/// The guest's network during a drill. Never bridged to anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// No NIC at all.
    #[default]
    None,
    /// The VM's NICs on a user-mode network with no route out (`restrict=on`), reachable only
    /// through the loopback forwards of the TCP port checks.
    Isolated,
}

/// The default time limit of a serial-console check (the drill's own limit still applies).
pub const SERIAL_TIMEOUT: Duration = Duration::from_secs(600);
/// The default time limit of the other checks, from when they start (after the boot).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// The serial-console text of the default check: a login prompt.
pub const LOGIN_PROMPT: &str = "login:";

/// A check of the booted guest, each with its own time limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// This text appears on the serial console (the first one also times the boot).
    Serial {
        /// The text, matched byte for byte.
        pattern: String,
        /// From QEMU's start.
        timeout: Duration,
    },
    /// This TCP port answers inside the guest (needs [`Network::Isolated`]).
    TcpPort {
        /// The guest's port.
        port: u16,
        /// From the check's start.
        timeout: Duration,
    },
    /// The qemu-guest-agent answers `guest-ping`.
    GuestPing {
        /// From the check's start.
        timeout: Duration,
    },
    /// A script run against the running VM exits 0; its environment names the serial log,
    /// the QMP and guest-agent sockets and the loopback ends of the TCP forwards
    /// (`DRILL_SERIAL_LOG`, `DRILL_QMP_SOCKET`, `DRILL_QGA_SOCKET`, `DRILL_TCP_<port>`).
    Script {
        /// The program.
        path: PathBuf,
        /// From the check's start.
        timeout: Duration,
    },
}

impl Check {
    /// A serial-console pattern with the default time limit.
    pub fn serial(pattern: impl Into<String>) -> Self {
        Self::Serial { pattern: pattern.into(), timeout: SERIAL_TIMEOUT }
    }

    /// A TCP port answering inside the guest, with the default time limit.
    pub fn tcp_port(port: u16) -> Self {
        Self::TcpPort { port, timeout: CHECK_TIMEOUT }
    }

    /// The guest agent's `guest-ping`, with the default time limit.
    pub fn guest_ping() -> Self {
        Self::GuestPing { timeout: CHECK_TIMEOUT }
    }

    /// A script, with the default time limit.
    pub fn script(path: impl Into<PathBuf>) -> Self {
        Self::Script { path: path.into(), timeout: CHECK_TIMEOUT }
    }

    /// The same check with another time limit.
    #[must_use]
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        match &mut self {
            Self::Serial { timeout, .. }
            | Self::TcpPort { timeout, .. }
            | Self::GuestPing { timeout }
            | Self::Script { timeout, .. } => *timeout = limit,
        }
        self
    }

    /// Its time limit.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::Serial { timeout, .. }
            | Self::TcpPort { timeout, .. }
            | Self::GuestPing { timeout }
            | Self::Script { timeout, .. } => *timeout,
        }
    }

    /// Its name in the report.
    pub fn name(&self) -> String {
        match self {
            Self::Serial { pattern, .. } => format!("serial {pattern:?}"),
            Self::TcpPort { port, .. } => format!("tcp port {port}"),
            Self::GuestPing { .. } => "guest-ping".to_owned(),
            Self::Script { path, .. } => format!("script {}", path.display()),
        }
    }
}

/// The checks of a drill that names none: a login prompt on the serial console.
pub fn default_checks() -> Vec<Check> {
    vec![Check::serial(LOGIN_PROMPT)]
}

/// Why a drill could not be attempted or carried out.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The `.vmx` is not one (line 0: the file as a whole).
    #[error("the .vmx cannot be read: line {line}: {reason}")]
    Vmx {
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The plan refuses to boot: a firmware or controller limit, a disk without an export, a
    /// check the network cannot serve, KVM forced where it cannot run a guest.
    #[error("{reason}")]
    Refused {
        /// The limit, in words, with what to do about it.
        reason: String,
        /// What the plan had said before refusing.
        lines: Vec<String>,
    },
    /// QEMU, qemu-img or a firmware file is not installed.
    #[error("{what} is not installed (Debian package {package})")]
    QemuMissing {
        /// The program or file.
        what: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// QEMU exited before it could be reached, or could not be started.
    #[error("QEMU failed to start: {stderr}")]
    QemuStart {
        /// Its error output (the end of it).
        stderr: String,
    },
    /// qemu-img could not make a disk's overlay (its export unreachable, say).
    #[error("cannot make the overlay of disk {slot}: {stderr}")]
    Overlay {
        /// The disk slot.
        slot: String,
        /// qemu-img's error output.
        stderr: String,
    },
    /// The drill was cancelled; QEMU was stopped and the overlays removed.
    #[error("the drill was cancelled; the VM was stopped and its overlays removed")]
    Cancelled,
    /// A file or socket of the drill.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl DrillError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>(), Ok(a));
        }
        for b in [BootController::Sata, BootController::Nvme, BootController::Virtio] {
            assert_eq!(b.to_string().parse::<BootController>(), Ok(b));
        }
        assert!("KVM ".parse::<Accel>().is_ok());
        assert!("hvf".parse::<Accel>().unwrap_err().contains("auto, kvm or tcg"));
        assert!("pvscsi".parse::<BootController>().unwrap_err().contains("sata, nvme or virtio"));
    }

    #[test]
    fn checks_carry_their_own_time_limits() {
        let c = Check::tcp_port(22).with_timeout(Duration::from_secs(7));
        assert_eq!(c.timeout(), Duration::from_secs(7));
        assert_eq!(c.name(), "tcp port 22");
        assert_eq!(default_checks(), vec![Check::Serial { pattern: "login:".into(), timeout: SERIAL_TIMEOUT }]);
        assert_eq!(Check::script("/bin/true").name(), "script /bin/true");
    }
}
