//! The pure part of a drill: the `.vmx`'s hardware mapped to QEMU's emulation of the same
//! VMware devices, as a command line, with the lines said before booting (firmware limits,
//! warnings) and the substitutions made for the drill only. Nothing is touched.

use std::path::{Path, PathBuf};

use crate::vmx::{Bus, ControllerKind, DiskSlot, Firmware, Hardware, NicModel, Vmx};
use crate::{Accel, BootController, Check, DrillError, DrillSpec, HostFacts, Network, default_checks};

/// The longest Unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest serial pattern.
pub(crate) const MAX_PATTERN: usize = 4096;

/// A disk's throwaway overlay: qcow2 in the work folder, backed by the disk's export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The disk slot.
    pub slot: String,
    /// The export's NBD URI (the overlay's raw backing file).
    pub uri: String,
    /// The overlay file.
    pub path: PathBuf,
}

/// An EFI variable store: a copy of OVMF's template, private to the drill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiVars {
    /// OVMF's template.
    pub template: PathBuf,
    /// The drill's copy.
    pub copy: PathBuf,
}

/// A loopback port forwarded to a guest port (for a TCP port check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// The guest's port.
    pub guest: u16,
    /// The loopback port on the host (0 until [`QemuPlan::set_host_ports`]: the host picks).
    pub host: u16,
}

/// How QEMU will run a drill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPlan {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `qemu-img`, which makes the overlays.
    pub qemu_img: PathBuf,
    /// QEMU's arguments.
    pub args: Vec<String>,
    /// What the drill says before booting: accelerator, machine, disks, warnings.
    pub lines: Vec<String>,
    /// Hardware changed for the drill only, in words.
    pub substitutions: Vec<String>,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// `q35` or `pc` (i440fx, for IDE).
    pub machine: String,
    /// `SeaBIOS`, `OVMF` or `OVMF (secure boot)`.
    pub firmware: String,
    /// The overlays to make before starting QEMU, one per disk.
    pub overlays: Vec<Overlay>,
    /// The EFI variable store to copy, for EFI.
    pub efi_vars: Option<EfiVars>,
    /// The serial console's log.
    pub serial_log: PathBuf,
    /// QMP's socket.
    pub qmp_socket: PathBuf,
    /// The guest agent's socket, when a check asks for it.
    pub qga_socket: Option<PathBuf>,
    /// Where the screenshot is written.
    pub screenshot: PathBuf,
    /// The TCP port checks' forwards.
    pub forwards: Vec<PortForward>,
    /// The checks to run (the spec's, or the defaults).
    pub checks: Vec<Check>,
    /// The index in `args` of the network that carries the forwards.
    netdev_arg: Option<usize>,
}

impl QemuPlan {
    /// Gives the forwards their loopback ports, in order.
    pub fn set_host_ports(&mut self, ports: &[u16]) {
        for (f, &p) in self.forwards.iter_mut().zip(ports) {
            f.host = p;
        }
        if let Some(i) = self.netdev_arg {
            self.args[i] = netdev(0, &self.forwards);
        }
    }
}

/// QEMU's option syntax: a comma inside a value is written twice.
fn opt(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_opt(p: &Path) -> String {
    opt(&p.to_string_lossy())
}

fn netdev(index: usize, forwards: &[PortForward]) -> String {
    let mut s = format!("user,id=net{index},restrict=on");
    for f in forwards {
        s.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
    }
    s
}

fn refused(reason: String, lines: &[String]) -> DrillError {
    DrillError::Refused { reason, lines: lines.to_vec() }
}

fn missing(what: &str, package: &str) -> DrillError {
    DrillError::QemuMissing { what: what.to_owned(), package: package.to_owned() }
}

/// Where a disk goes on QEMU's side.
enum Attach {
    /// On its own controller's emulation.
    Original,
    /// Moved, for the drill only.
    Moved(BootController),
}

/// Maps `spec` to a QEMU command line on `host`. Pure: reads no file, starts nothing.
pub fn plan(spec: &DrillSpec, host: &HostFacts) -> Result<QemuPlan, DrillError> {
    let vmx = Vmx::parse(&spec.vmx)?;
    let hw = Hardware::from_vmx(&vmx)?;
    let mut lines: Vec<String> = Vec::new();
    let mut substitutions: Vec<String> = Vec::new();
    let qemu = host.qemu.clone().ok_or_else(|| missing("qemu-system-x86_64", "qemu-system-x86"))?;
    let qemu_img = host.qemu_img.clone().ok_or_else(|| missing("qemu-img", "qemu-utils"))?;

    // The accelerator.
    let accel = match spec.accel {
        Accel::Tcg => {
            lines.push("accelerator: TCG (asked for)".to_owned());
            "tcg"
        }
        Accel::Kvm if host.kvm_usable() => {
            lines.push("accelerator: KVM (asked for)".to_owned());
            "kvm"
        }
        Accel::Kvm => {
            return Err(refused(
                format!("KVM cannot run a guest on this host: {}; use --accel tcg", host.why_no_kvm()),
                &lines,
            ));
        }
        Accel::Auto if host.kvm_usable() => {
            lines.push("accelerator: KVM".to_owned());
            "kvm"
        }
        Accel::Auto => {
            lines.push(format!("accelerator: TCG, QEMU's emulator ({})", host.why_no_kvm()));
            "tcg"
        }
    };
    for n in &hw.notes {
        lines.push(format!("note: {n}"));
    }

    // The disks: every served slot must be a disk of the VM, and the boot disk must be served.
    let mut served: Vec<(DiskSlot, &str)> = Vec::new();
    for d in &spec.disks {
        let slot: DiskSlot = d.slot.parse().map_err(|e: String| refused(e, &lines))?;
        if !hw.disks.iter().any(|h| h.slot == slot) {
            return Err(refused(format!("disk {slot} is served but the .vmx has no such disk"), &lines));
        }
        if served.iter().any(|(s, _)| *s == slot) {
            return Err(refused(format!("disk {slot} is served twice"), &lines));
        }
        if d.uri.is_empty() || d.uri.chars().any(char::is_control) {
            return Err(refused(format!("disk {slot}: {:?} is not an NBD URI", d.uri), &lines));
        }
        served.push((slot, d.uri.as_str()));
    }
    served.sort_by_key(|(s, _)| *s);
    let Some(boot) = hw.boot_disk else {
        return Err(refused("the .vmx has no hard disk to boot".to_owned(), &lines));
    };
    if !served.iter().any(|(s, _)| *s == boot) {
        return Err(refused(format!("the boot disk {boot} is not served"), &lines));
    }
    for d in hw.disks.iter().filter(|d| !served.iter().any(|(s, _)| *s == d.slot)) {
        lines.push(format!("warning: disk {} is not served: the drill boots without it", d.slot));
    }

    // Firmware, and what it cannot boot from.
    let efi = matches!(hw.firmware, Firmware::Efi { .. });
    let boot_kind = hw.controller_of(boot).map(|c| c.kind.clone()).unwrap_or(ControllerKind::Ide);
    let mut attach_boot = Attach::Original;
    if let Some(to) = spec.boot_controller {
        let why =
            if efi && boot_kind == ControllerKind::Pvscsi { "OVMF has no PVSCSI boot driver" } else { "asked for" };
        substitutions.push(format!(
            "boot disk {boot}: moved from {boot_kind} to {} for the drill only ({why})",
            match to {
                BootController::Sata => "sata (ich9-ahci)",
                BootController::Nvme => "nvme",
                BootController::Virtio => "virtio-blk",
            }
        ));
        attach_boot = Attach::Moved(to);
    } else if efi && boot_kind == ControllerKind::Pvscsi {
        let line = format!(
            "firmware limit: this EFI VM boots from {boot} on pvscsi, and Debian's OVMF has no PVSCSI boot driver, so \
             it cannot boot under QEMU; drill with --boot-controller sata|nvme|virtio to move the boot disk for the \
             drill only (the report records it)"
        );
        lines.push(line.clone());
        return Err(refused(line, &lines));
    }
    for c in &hw.controllers {
        let used = served.iter().any(|(s, _)| {
            (s.bus, s.controller) == (c.bus, c.number) && !(*s == boot && matches!(attach_boot, Attach::Moved(_)))
        });
        if !used {
            continue;
        }
        match &c.kind {
            ControllerKind::BusLogic => {
                let line = format!(
                    "controller limit: scsi{} is BusLogic, which QEMU does not emulate: this VM cannot be drilled \
                     without converting its disks to another controller",
                    c.number
                );
                lines.push(line.clone());
                return Err(refused(line, &lines));
            }
            ControllerKind::OtherScsi(dev) => {
                let line = format!("controller limit: scsi{} is {dev:?}, which QEMU does not emulate", c.number);
                lines.push(line.clone());
                return Err(refused(line, &lines));
            }
            ControllerKind::LsiLogic => lines.push(format!(
                "warning: scsi{} is LSI Logic parallel (53C1030); QEMU emulates the 53C895A instead, a different chip: \
                 Linux needs the sym53c8xx driver and Windows has none",
                c.number
            )),
            _ => {}
        }
    }

    // The work folder's files.
    let wd = &spec.work_dir;
    let serial_log = wd.join("console.log");
    let qmp_socket = wd.join("qmp.sock");
    let screenshot = wd.join("screen.png");
    let mut checks = if spec.checks.is_empty() {
        lines.push("checks: none given, the default (a login prompt on the serial console)".to_owned());
        default_checks()
    } else {
        spec.checks.clone()
    };
    checks.sort_by_key(|c| !matches!(c, Check::Serial { .. }));
    let wants_qga = checks.iter().any(|c| matches!(c, Check::GuestPing { .. }));
    let qga_socket = wants_qga.then(|| wd.join("qga.sock"));
    for s in std::iter::once(&qmp_socket).chain(&qga_socket) {
        if s.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(refused(
                format!("the work folder's path is too long for a Unix socket ({}): use a shorter one", s.display()),
                &lines,
            ));
        }
    }
    for c in &checks {
        if let Check::Serial { pattern, .. } = c
            && (pattern.is_empty() || pattern.len() > MAX_PATTERN)
        {
            return Err(refused(format!("a serial pattern must have 1 to {MAX_PATTERN} bytes"), &lines));
        }
    }
    let forwards: Vec<PortForward> = checks
        .iter()
        .filter_map(|c| match c {
            Check::TcpPort { port, .. } => Some(PortForward { guest: *port, host: 0 }),
            _ => None,
        })
        .collect();

    // Machine, CPUs, memory.
    let has_ide =
        served.iter().any(|(s, _)| s.bus == Bus::Ide && !(*s == boot && matches!(attach_boot, Attach::Moved(_))));
    let machine = if has_ide { "pc" } else { "q35" };
    let secure = matches!(hw.firmware, Firmware::Efi { secure_boot: true });
    let mut args: Vec<String> = Vec::new();
    let mut arg = |a: &str, b: String| {
        args.push(a.to_owned());
        args.push(b);
    };
    arg("-name", spec.name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect());
    arg("-machine", format!("{machine}{}", if secure { ",smm=on" } else { "" }));
    arg("-accel", accel.to_owned());
    arg("-cpu", if accel == "kvm" { "host" } else { "max" }.to_owned());
    let mut memory = hw.memory_mib;
    if let Some(host_mib) = host.memory_mib {
        let cap = (host_mib / 2).max(256);
        if memory > cap {
            substitutions.push(format!("memory: {memory} MiB lowered to {cap} MiB, half of the host's"));
            memory = cap;
        }
    }
    arg("-m", memory.to_string());
    let cores = if hw.vcpus.is_multiple_of(hw.cores_per_socket) { hw.cores_per_socket } else { 1 };
    arg("-smp", format!("cpus={},sockets={},cores={cores},threads=1", hw.vcpus, hw.vcpus / cores));
    args.extend(["-nodefaults", "-no-shutdown", "-display", "none", "-vga", "std"].map(str::to_owned));
    let mut arg = |a: &str, b: String| {
        args.push(a.to_owned());
        args.push(b);
    };
    arg("-serial", format!("file:{}", path_opt(&serial_log)));
    arg("-qmp", format!("unix:{},server=on,wait=off", path_opt(&qmp_socket)));

    // Firmware.
    let (firmware, efi_vars) = match hw.firmware {
        Firmware::Bios => {
            if host.seabios.is_none() {
                return Err(missing("SeaBIOS (bios-256k.bin)", "seabios"));
            }
            ("SeaBIOS".to_owned(), None)
        }
        Firmware::Efi { secure_boot } => {
            let (code, vars) = if secure_boot {
                (host.ovmf_secure_code.clone(), host.ovmf_secure_vars.clone())
            } else {
                (host.ovmf_code.clone(), host.ovmf_vars.clone())
            };
            let code = code.ok_or_else(|| missing("OVMF's code (OVMF_CODE_4M.fd)", "ovmf"))?;
            let template = vars.ok_or_else(|| missing("OVMF's variable store (OVMF_VARS_4M.fd)", "ovmf"))?;
            let copy = wd.join("efi-vars.fd");
            if secure_boot {
                arg("-global", "driver=cfi.pflash01,property=secure,value=on".to_owned());
            }
            arg("-drive", format!("if=pflash,format=raw,unit=0,readonly=on,file={}", path_opt(&code)));
            arg("-drive", format!("if=pflash,format=raw,unit=1,file={}", path_opt(&copy)));
            let name = if secure_boot { "OVMF (secure boot)" } else { "OVMF" };
            (name.to_owned(), Some(EfiVars { template, copy }))
        }
    };
    lines.push(format!(
        "machine: {machine}, {firmware}, {} vCPU(s) ({} socket(s) of {cores} core(s)), {memory} MiB",
        hw.vcpus,
        hw.vcpus / cores
    ));

    // Controllers and disks, the boot disk first in the boot order.
    let mut overlays = Vec::new();
    let mut controllers_added: Vec<(Bus, u8)> = Vec::new();
    let mut nvme_count: Vec<((Bus, u8), usize)> = Vec::new();
    for (s, _) in &served {
        match nvme_count.iter_mut().find(|(k, _)| *k == (s.bus, s.controller)) {
            Some((_, n)) => *n += 1,
            None => nvme_count.push(((s.bus, s.controller), 1)),
        }
    }
    let mut order: Vec<&(DiskSlot, &str)> = served.iter().collect();
    order.sort_by_key(|(s, _)| *s != boot);
    for (bootindex, (slot, uri)) in order.into_iter().enumerate() {
        let n = overlays.len();
        let path = wd.join(format!("overlay-{n}.qcow2"));
        let drive = format!("drive{n}");
        arg("-drive", format!("file={},format=qcow2,if=none,id={drive},cache=unsafe", path_opt(&path)));
        overlays.push(Overlay { slot: slot.to_string(), uri: (*uri).to_owned(), path });
        let moved =
            if *slot == boot { if let Attach::Moved(to) = attach_boot { Some(to) } else { None } } else { None };
        let (device, on) = match moved {
            Some(BootController::Sata) => {
                arg("-device", "ich9-ahci,id=drillsata".to_owned());
                (format!("ide-hd,bus=drillsata.0,drive={drive}"), "sata (moved)".to_owned())
            }
            Some(BootController::Nvme) => (format!("nvme,serial=drill-boot,drive={drive}"), "nvme (moved)".to_owned()),
            Some(BootController::Virtio) => (format!("virtio-blk-pci,drive={drive}"), "virtio-blk (moved)".to_owned()),
            None => {
                let c = hw.controller_of(*slot).map(|c| c.kind.clone()).unwrap_or(ControllerKind::Ide);
                let id = format!("{}{}", slot.bus.prefix(), slot.controller);
                let key = (slot.bus, slot.controller);
                let first = !controllers_added.contains(&key);
                if first {
                    controllers_added.push(key);
                }
                let scsi = |model: &str, max_unit: u8, arg: &mut dyn FnMut(&str, String)| {
                    if slot.unit > max_unit {
                        return Err(refused(format!("disk {slot}: {model} has no unit {}", slot.unit), &lines));
                    }
                    if first {
                        arg("-device", format!("{model},id={id}"));
                    }
                    Ok(format!("scsi-hd,bus={id}.0,channel=0,scsi-id={},lun=0,drive={drive}", slot.unit))
                };
                let device = match c {
                    ControllerKind::Pvscsi => scsi("pvscsi", 63, &mut arg)?,
                    ControllerKind::LsiSas1068 => scsi("mptsas1068", 63, &mut arg)?,
                    ControllerKind::LsiLogic => scsi("lsi53c895a", 6, &mut arg)?,
                    ControllerKind::Sata => {
                        if slot.unit > 5 {
                            return Err(refused(format!("disk {slot}: QEMU's AHCI has ports 0 to 5"), &lines));
                        }
                        if first {
                            arg("-device", format!("ich9-ahci,id={id}"));
                        }
                        format!("ide-hd,bus={id}.{},drive={drive}", slot.unit)
                    }
                    ControllerKind::Nvme => {
                        let many = nvme_count.iter().any(|(k, n)| *k == key && *n > 1);
                        if many {
                            if first {
                                arg("-device", format!("nvme,id={id},serial=drill-{id}"));
                            }
                            format!("nvme-ns,bus={id},nsid={},drive={drive}", u32::from(slot.unit) + 1)
                        } else {
                            format!("nvme,id={id},serial=drill-{id},drive={drive}")
                        }
                    }
                    ControllerKind::Ide => {
                        if slot.controller > 1 || slot.unit > 1 {
                            return Err(refused(format!("disk {slot}: IDE has buses 0 and 1, units 0 and 1"), &lines));
                        }
                        format!("ide-hd,bus=ide.{},unit={},drive={drive}", slot.controller, slot.unit)
                    }
                    // Refused above.
                    ControllerKind::BusLogic | ControllerKind::OtherScsi(_) => {
                        return Err(refused(format!("disk {slot}: its controller cannot be emulated"), &lines));
                    }
                };
                let model = match c {
                    ControllerKind::Pvscsi => "pvscsi",
                    ControllerKind::LsiSas1068 => "mptsas1068",
                    ControllerKind::LsiLogic => "lsi53c895a",
                    ControllerKind::Sata => "ich9-ahci",
                    ControllerKind::Nvme => "nvme",
                    _ => "ide-hd",
                };
                (device, model.to_owned())
            }
        };
        arg("-device", format!("{device},bootindex={bootindex}"));
        lines.push(format!(
            "disk {slot}{} on {on}: {uri} under a throwaway overlay",
            if *slot == boot { " (boot)" } else { "" }
        ));
    }

    // Network: none, or the VM's NICs on an isolated user-mode network.
    let mut netdev_arg = None;
    match spec.network {
        Network::None => {
            if !forwards.is_empty() {
                return Err(refused(
                    "a TCP port check needs the isolated network (Network::Isolated, --isolated-network)".to_owned(),
                    &lines,
                ));
            }
            arg("-nic", "none".to_owned());
            lines.push("network: none".to_owned());
        }
        Network::Isolated if hw.nics.is_empty() => {
            if !forwards.is_empty() {
                return Err(refused("a TCP port check needs a NIC, and the VM has none".to_owned(), &lines));
            }
            arg("-nic", "none".to_owned());
            lines.push("network: isolated asked for, but the VM has no NIC".to_owned());
        }
        Network::Isolated => {
            for (i, nic) in hw.nics.iter().enumerate() {
                let model = match &nic.model {
                    NicModel::E1000 => "e1000",
                    NicModel::E1000e => "e1000e",
                    NicModel::Vmxnet3 => "vmxnet3",
                    NicModel::Vlance => "pcnet",
                    NicModel::Other(dev) => {
                        substitutions.push(format!("ethernet{}: {dev} is not emulated, e1000 instead", nic.index));
                        "e1000"
                    }
                };
                args.push("-netdev".to_owned());
                if i == 0 {
                    netdev_arg = Some(args.len());
                    args.push(netdev(0, &forwards));
                } else {
                    args.push(netdev(i, &[]));
                }
                let mac = nic.mac.as_ref().map(|m| format!(",mac={m}")).unwrap_or_default();
                args.push("-device".to_owned());
                args.push(format!("{model},netdev=net{i}{mac}"));
            }
            lines.push(format!(
                "network: isolated (user-mode, no route out){}",
                if forwards.is_empty() {
                    String::new()
                } else {
                    ", loopback forwards for the TCP port checks".to_owned()
                }
            ));
        }
    }
    if let Some(q) = &qga_socket {
        args.extend([
            "-chardev".to_owned(),
            format!("socket,path={},server=on,wait=off,id=qga0", path_opt(q)),
            "-device".to_owned(),
            "virtio-serial-pci,id=drillvser".to_owned(),
            "-device".to_owned(),
            "virtserialport,bus=drillvser.0,chardev=qga0,name=org.qemu.guest_agent.0".to_owned(),
        ]);
        substitutions.push("a virtio-serial port added for the guest agent (guest-ping)".to_owned());
    }

    Ok(QemuPlan {
        qemu,
        qemu_img,
        args,
        lines,
        substitutions,
        accel: accel.to_owned(),
        machine: machine.to_owned(),
        firmware,
        overlays,
        efi_vars,
        serial_log,
        qmp_socket,
        qga_socket,
        screenshot,
        forwards,
        checks,
        netdev_arg,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::DrillDisk;

    fn host() -> HostFacts {
        HostFacts::example()
    }

    fn spec(vmx: &str, slots: &[&str]) -> DrillSpec {
        DrillSpec {
            name: "web @ p1".into(),
            vmx: vmx.into(),
            disks: slots
                .iter()
                .map(|s| DrillDisk { slot: (*s).into(), uri: format!("nbd+unix:///{s}?socket=/tmp/n.sock") })
                .collect(),
            accel: Accel::Auto,
            boot_controller: None,
            checks: Vec::new(),
            network: Network::None,
            timeout: Duration::from_secs(60),
            work_dir: "/tmp/drill-w".into(),
        }
    }

    fn joined(p: &QemuPlan) -> String {
        p.args.join(" ")
    }

    fn vm(firmware: &str, controller: &str, slot: &str) -> String {
        format!(
            "firmware = \"{firmware}\"\nmemsize = \"1024\"\nnumvcpus = \"2\"\ncpuid.coresPerSocket = \"2\"\n\
             {controller}\n{slot}.present = \"TRUE\"\n{slot}.fileName = \"d.vmdk\"\n"
        )
    }

    #[test]
    fn each_controller_maps_to_its_emulation() {
        for (controller, slot, machine, device, disk) in [
            (
                "scsi0.virtualDev = \"pvscsi\"",
                "scsi0:0",
                "q35",
                "pvscsi,id=scsi0",
                "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0",
            ),
            ("scsi0.virtualDev = \"lsisas1068\"", "scsi0:2", "q35", "mptsas1068,id=scsi0", "scsi-id=2"),
            ("scsi1.virtualDev = \"lsilogic\"", "scsi1:1", "q35", "lsi53c895a,id=scsi1", "bus=scsi1.0"),
            ("sata0.present = \"TRUE\"", "sata0:3", "q35", "ich9-ahci,id=sata0", "ide-hd,bus=sata0.3,drive=drive0"),
            (
                "nvme0.present = \"TRUE\"",
                "nvme0:0",
                "q35",
                "nvme,id=nvme0,serial=drill-nvme0,drive=drive0",
                "bootindex=0",
            ),
            ("", "ide0:1", "pc", "ide-hd,bus=ide.0,unit=1,drive=drive0", "bootindex=0"),
        ] {
            let p = plan(&spec(&vm("bios", controller, slot), &[slot]), &host()).unwrap();
            let a = joined(&p);
            assert!(a.contains(&format!("-machine {machine} ")), "{slot}: {a}");
            assert!(a.contains(device) && a.contains(disk), "{slot}: {a}");
            assert!(a.contains("-drive file=/tmp/drill-w/overlay-0.qcow2,format=qcow2,if=none,id=drive0"), "{a}");
            assert!(!a.contains("readonly=on"), "never a read-only node alone: {a}");
            assert_eq!(p.overlays[0].slot, slot);
            assert_eq!(p.firmware, "SeaBIOS");
            assert!(a.contains("-smp cpus=2,sockets=1,cores=2,threads=1") && a.contains("-m 1024"), "{a}");
            assert!(a.contains("-nic none") && a.contains("-display none"), "{a}");
            assert!(a.contains("-serial file:/tmp/drill-w/console.log"), "{a}");
            assert!(a.contains("-qmp unix:/tmp/drill-w/qmp.sock,server=on,wait=off"), "{a}");
            let lsi_warned = p.lines.iter().any(|l| l.starts_with("warning: scsi1 is LSI Logic parallel"));
            assert_eq!(lsi_warned, slot == "scsi1:1", "{:?}", p.lines);
        }
    }

    #[test]
    fn efi_maps_to_ovmf_with_a_private_variable_store() {
        let p = plan(&spec(&vm("efi", "sata0.present = \"TRUE\"", "sata0:0"), &["sata0:0"]), &host()).unwrap();
        let a = joined(&p);
        assert!(a.contains("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"), "{a}");
        assert!(a.contains("if=pflash,format=raw,unit=1,file=/tmp/drill-w/efi-vars.fd"), "{a}");
        assert_eq!(
            p.efi_vars,
            Some(EfiVars {
                template: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
                copy: "/tmp/drill-w/efi-vars.fd".into()
            })
        );
        assert_eq!(p.firmware, "OVMF");
        let secure = vm("efi", "sata0.present = \"TRUE\"\nuefi.secureBoot.enabled = \"TRUE\"", "sata0:0");
        let p = plan(&spec(&secure, &["sata0:0"]), &host()).unwrap();
        let a = joined(&p);
        assert!(a.contains("-machine q35,smm=on") && a.contains("OVMF_CODE_4M.secboot.fd"), "{a}");
        assert!(a.contains("property=secure,value=on"), "{a}");
        assert_eq!(p.efi_vars.unwrap().template, PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"));
        let no_ovmf = HostFacts { ovmf_code: None, ..host() };
        let e = plan(&spec(&vm("efi", "", "sata0:0"), &["sata0:0"]), &no_ovmf).unwrap_err();
        assert!(matches!(e, DrillError::QemuMissing { ref package, .. } if package == "ovmf"), "{e}");
    }

    #[test]
    fn efi_on_pvscsi_is_refused_before_booting_unless_the_boot_disk_moves() {
        let text = vm("efi", "scsi0.virtualDev = \"pvscsi\"", "scsi0:0");
        let e = plan(&spec(&text, &["scsi0:0"]), &host()).unwrap_err();
        let DrillError::Refused { reason, lines } = e else { panic!("{e:?}") };
        assert!(reason.contains("no PVSCSI boot driver") && reason.contains("--boot-controller sata|nvme|virtio"));
        assert_eq!(lines.last(), Some(&reason), "the limit is said as a line too");
        // BIOS boots from pvscsi.
        assert!(plan(&spec(&vm("bios", "scsi0.virtualDev = \"pvscsi\"", "scsi0:0"), &["scsi0:0"]), &host()).is_ok());
        for (to, device) in [
            (BootController::Sata, "ide-hd,bus=drillsata.0,drive=drive0,bootindex=0"),
            (BootController::Nvme, "nvme,serial=drill-boot,drive=drive0,bootindex=0"),
            (BootController::Virtio, "virtio-blk-pci,drive=drive0,bootindex=0"),
        ] {
            let mut s = spec(&text, &["scsi0:0"]);
            s.boot_controller = Some(to);
            let p = plan(&s, &host()).unwrap();
            let a = joined(&p);
            assert!(a.contains(device), "{a}");
            assert!(!a.contains("pvscsi"), "no disk is left on the controller: {a}");
            assert_eq!(p.substitutions.len(), 1, "{:?}", p.substitutions);
            assert!(p.substitutions[0].contains("boot disk scsi0:0: moved from pvscsi"), "{:?}", p.substitutions);
            assert!(p.substitutions[0].contains("OVMF has no PVSCSI boot driver"));
        }
    }

    #[test]
    fn buslogic_and_unknown_controllers_are_refused() {
        for dev in ["buslogic", "megaraid"] {
            let text = vm("bios", &format!("scsi0.virtualDev = \"{dev}\""), "scsi0:0");
            let e = plan(&spec(&text, &["scsi0:0"]), &host()).unwrap_err();
            let DrillError::Refused { reason, .. } = e else { panic!("{e:?}") };
            assert!(reason.contains("does not emulate"), "{reason}");
        }
        let text = vm("bios", "scsi0.virtualDev = \"buslogic\"", "scsi0:0");
        assert!(plan(&spec(&text, &["scsi0:0"]), &host()).unwrap_err().to_string().contains("without converting"));
    }

    #[test]
    fn accelerator_follows_the_kvm_modules() {
        let text = vm("bios", "", "sata0:0");
        let mut s = spec(&text, &["sata0:0"]);
        let p = plan(&s, &host()).unwrap();
        assert_eq!(p.accel, "tcg", "kvm_pvm alone means TCG on auto");
        assert!(joined(&p).contains("-accel tcg -cpu max"));
        assert!(p.lines[0].contains("kvm_pvm"), "{:?}", p.lines);
        s.accel = Accel::Kvm;
        let e = plan(&s, &host()).unwrap_err();
        assert!(matches!(&e, DrillError::Refused { reason, .. } if reason.contains("kvm_pvm")), "{e}");
        let intel = HostFacts { kvm_modules: vec!["kvm_intel".into(), "kvm".into()], ..host() };
        assert_eq!(plan(&s, &intel).unwrap().accel, "kvm");
        s.accel = Accel::Auto;
        assert!(joined(&plan(&s, &intel).unwrap()).contains("-accel kvm -cpu host"));
        s.accel = Accel::Tcg;
        assert_eq!(plan(&s, &intel).unwrap().accel, "tcg");
        let no_qemu = HostFacts { qemu: None, ..host() };
        assert!(matches!(plan(&s, &no_qemu), Err(DrillError::QemuMissing { .. })));
    }

    #[test]
    fn nics_only_on_the_isolated_network() {
        let text = format!(
            "{}ethernet0.virtualDev = \"e1000e\"\nethernet0.generatedAddress = \"00:50:56:01:02:03\"\n\
             ethernet1.virtualDev = \"vmxnet3\"\nethernet2.virtualDev = \"vlance\"\nethernet3.virtualDev = \"e1000\"\n\
             ethernet4.virtualDev = \"vmxnet2\"\n",
            vm("bios", "", "sata0:0")
        );
        let mut s = spec(&text, &["sata0:0"]);
        let a = joined(&plan(&s, &host()).unwrap());
        assert!(a.contains("-nic none") && !a.contains("-netdev"), "{a}");
        s.checks = vec![Check::serial("login:"), Check::tcp_port(22)];
        assert!(plan(&s, &host()).unwrap_err().to_string().contains("isolated network"));
        s.network = Network::Isolated;
        let mut p = plan(&s, &host()).unwrap();
        let a = joined(&p);
        for device in [
            "e1000e,netdev=net0,mac=00:50:56:01:02:03",
            "vmxnet3,netdev=net1",
            "pcnet,netdev=net2",
            "e1000,netdev=net3",
            "e1000,netdev=net4",
        ] {
            assert!(a.contains(device), "{device}: {a}");
        }
        assert!(a.contains("-netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:0-:22"), "{a}");
        assert!(!a.contains("bridge") && !a.contains("tap"), "{a}");
        assert!(p.substitutions.iter().any(|s| s.contains("ethernet4: vmxnet2")), "{:?}", p.substitutions);
        p.set_host_ports(&[40022]);
        assert!(joined(&p).contains("hostfwd=tcp:127.0.0.1:40022-:22"));
        assert_eq!(p.forwards, [PortForward { guest: 22, host: 40022 }]);
    }

    #[test]
    fn guest_agent_disks_and_boot_order() {
        let text = "memsize = \"512\"\nsata0:0.fileName = \"a.vmdk\"\nnvme0:0.fileName = \"b.vmdk\"\n\
                    nvme0:1.fileName = \"c.vmdk\"\nscsi0:0.fileName = \"d.vmdk\"\nscsi0.virtualDev = \"pvscsi\"\n\
                    bios.hddOrder = \"nvme0:1\"";
        let mut s = spec(text, &["sata0:0", "nvme0:0", "nvme0:1"]);
        s.checks = vec![Check::guest_ping(), Check::serial("ready")];
        let p = plan(&s, &host()).unwrap();
        let a = joined(&p);
        assert!(a.contains("nvme,id=nvme0,serial=drill-nvme0 "), "two namespaces on one controller: {a}");
        assert!(a.contains("nvme-ns,bus=nvme0,nsid=2,drive=drive0,bootindex=0"), "the boot disk first: {a}");
        assert!(a.contains("nvme-ns,bus=nvme0,nsid=1,drive=drive2,bootindex=2"), "{a}");
        assert!(a.contains("org.qemu.guest_agent.0") && a.contains("qga.sock"), "{a}");
        assert!(matches!(p.checks[0], Check::Serial { .. }), "serial checks come first");
        assert!(p.lines.iter().any(|l| l.contains("disk scsi0:0 is not served")), "{:?}", p.lines);
        assert!(!a.contains("pvscsi"), "no controller without disks: {a}");
        // The boot disk must be served; a served slot must exist.
        assert!(plan(&spec(text, &["sata0:0"]), &host()).unwrap_err().to_string().contains("boot disk nvme0:1"));
        assert!(plan(&spec(text, &["nvme0:1", "sata0:5"]), &host()).unwrap_err().to_string().contains("no such disk"));
        assert!(plan(&spec(text, &["nvme0:1", "bogus"]), &host()).is_err());
    }

    #[test]
    fn limits_of_the_emulations_and_the_host() {
        let e = plan(&spec(&vm("bios", "sata0.present = \"TRUE\"", "sata0:9"), &["sata0:9"]), &host()).unwrap_err();
        assert!(e.to_string().contains("ports 0 to 5"), "{e}");
        let e = plan(&spec(&vm("bios", "scsi0.virtualDev = \"lsilogic\"", "scsi0:8"), &["scsi0:8"]), &host());
        assert!(e.unwrap_err().to_string().contains("no unit 8"));
        let big = vm("bios", "", "sata0:0").replace("memsize = \"1024\"", "memsize = \"65536\"");
        let p = plan(&spec(&big, &["sata0:0"]), &host()).unwrap();
        assert!(joined(&p).contains("-m 4096"), "{:?}", p.args);
        assert!(p.substitutions[0].contains("65536 MiB lowered to 4096 MiB"));
        let odd = vm("bios", "", "sata0:0").replace("numvcpus = \"2\"", "numvcpus = \"3\"");
        assert!(joined(&plan(&spec(&odd, &["sata0:0"]), &host()).unwrap()).contains("-smp cpus=3,sockets=3,cores=1"));
        let mut s = spec(&vm("bios", "", "sata0:0"), &["sata0:0"]);
        s.work_dir = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(plan(&s, &host()).unwrap_err().to_string().contains("too long for a Unix socket"));
        let mut s = spec(&vm("bios", "", "sata0:0"), &["sata0:0"]);
        s.work_dir = "/tmp/a,b".into();
        assert!(joined(&plan(&s, &host()).unwrap()).contains("file:/tmp/a,,b/console.log"), "commas doubled");
    }
}
