//! A simulated VM's controllers and network adapters: their wire types (`ParaVirtualSCSIController`,
//! `VirtualVmxnet3`), their `.vmx` spellings (`scsi0.virtualDev = "pvscsi"`,
//! `ethernet0.virtualDev = "vmxnet3"`), and the keys and slots vSphere gives them.

use crate::config::ControllerKind;

/// A disk controller model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CtrlKind {
    Pvscsi,
    LsiLogicSas,
    LsiLogic,
    BusLogic,
    Ahci,
    Nvme,
    Ide,
}

const CONTROLLERS: &[(CtrlKind, &str, &str, Option<&str>, &str)] = &[
    (CtrlKind::Pvscsi, "ParaVirtualSCSIController", "scsi", Some("pvscsi"), "VMware paravirtual SCSI"),
    (CtrlKind::LsiLogicSas, "VirtualLsiLogicSASController", "scsi", Some("lsisas1068"), "LSI Logic SAS"),
    (CtrlKind::LsiLogic, "VirtualLsiLogicController", "scsi", Some("lsilogic"), "LSI Logic"),
    (CtrlKind::BusLogic, "VirtualBusLogicController", "scsi", Some("buslogic"), "BusLogic"),
    (CtrlKind::Ahci, "VirtualAHCIController", "sata", None, "AHCI"),
    (CtrlKind::Nvme, "VirtualNVMEController", "nvme", None, "NVME controller"),
    (CtrlKind::Ide, "VirtualIDEController", "ide", None, "IDE"),
];

impl CtrlKind {
    fn row(self) -> &'static (CtrlKind, &'static str, &'static str, Option<&'static str>, &'static str) {
        CONTROLLERS.iter().find(|r| r.0 == self).unwrap_or(&CONTROLLERS[0])
    }

    /// From the wire type (`ParaVirtualSCSIController`).
    pub(crate) fn from_wire(t: &str) -> Option<Self> {
        CONTROLLERS.iter().find(|r| r.1 == t).map(|r| r.0)
    }

    /// From a `.vmx` bus prefix and its `virtualDev` (SCSI only; none: LSI Logic, as ESXi reads it).
    pub(crate) fn from_vmx(bus: &str, virtual_dev: Option<&str>) -> Option<Self> {
        match bus {
            "scsi" => {
                CONTROLLERS.iter().find(|r| r.3.is_some() && r.3 == virtual_dev.or(Some("lsilogic"))).map(|r| r.0)
            }
            _ => CONTROLLERS.iter().find(|r| r.2 == bus).map(|r| r.0),
        }
    }

    /// The wire type.
    pub(crate) fn wire(self) -> &'static str {
        self.row().1
    }

    /// The `.vmx` bus prefix: `scsi`, `sata`, `nvme`, `ide`.
    pub(crate) fn bus(self) -> &'static str {
        self.row().2
    }

    /// `scsiN.virtualDev` (SCSI only).
    pub(crate) fn virtual_dev(self) -> Option<&'static str> {
        self.row().3
    }

    pub(crate) fn summary(self) -> &'static str {
        self.row().4
    }

    /// `SCSI controller 0`, `SATA controller 0`, `NVME controller 0`, `IDE 0`.
    pub(crate) fn label(self, bus: i32) -> String {
        match self.bus() {
            "scsi" => format!("SCSI controller {bus}"),
            "sata" => format!("SATA controller {bus}"),
            "nvme" => format!("NVME controller {bus}"),
            _ => format!("IDE {bus}"),
        }
    }

    /// The first key vSphere gives this kind (the bus number is added).
    pub(crate) fn base_key(self) -> i32 {
        match self.bus() {
            "scsi" => 1000,
            "sata" => 15000,
            "nvme" => 31000,
            _ => 200,
        }
    }

    /// Whether `unit` is a slot a disk can take (SCSI's unit 7 is the controller's own).
    pub(crate) fn disk_unit(self, unit: i32) -> bool {
        match self.bus() {
            "scsi" => (0..16).contains(&unit) && unit != 7,
            "sata" => (0..30).contains(&unit),
            "nvme" => (0..15).contains(&unit),
            _ => (0..2).contains(&unit),
        }
    }
}

impl From<ControllerKind> for CtrlKind {
    fn from(k: ControllerKind) -> Self {
        match k {
            ControllerKind::Pvscsi => CtrlKind::Pvscsi,
            ControllerKind::Lsisas1068 => CtrlKind::LsiLogicSas,
            ControllerKind::Lsilogic => CtrlKind::LsiLogic,
            ControllerKind::Sata => CtrlKind::Ahci,
        }
    }
}

/// A disk controller of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Controller {
    pub(crate) key: i32,
    pub(crate) kind: CtrlKind,
    pub(crate) bus: i32,
}

/// A network adapter model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NicKind {
    E1000,
    E1000e,
    Vmxnet3,
    Vmxnet2,
    Pcnet32,
}

const NICS: &[(NicKind, &str, &str)] = &[
    (NicKind::E1000, "VirtualE1000", "e1000"),
    (NicKind::E1000e, "VirtualE1000e", "e1000e"),
    (NicKind::Vmxnet3, "VirtualVmxnet3", "vmxnet3"),
    (NicKind::Vmxnet2, "VirtualVmxnet2", "vmxnet2"),
    (NicKind::Pcnet32, "VirtualPCNet32", "vlance"),
];

impl NicKind {
    fn row(self) -> &'static (NicKind, &'static str, &'static str) {
        NICS.iter().find(|r| r.0 == self).unwrap_or(&NICS[0])
    }

    pub(crate) fn from_wire(t: &str) -> Option<Self> {
        NICS.iter().find(|r| r.1 == t).map(|r| r.0)
    }

    /// From `ethernetN.virtualDev` (none: `vlance`, as ESXi reads it).
    pub(crate) fn from_vmx(dev: Option<&str>) -> Option<Self> {
        let dev = dev.unwrap_or("vlance");
        NICS.iter().find(|r| r.2 == dev).map(|r| r.0)
    }

    pub(crate) fn wire(self) -> &'static str {
        self.row().1
    }

    pub(crate) fn virtual_dev(self) -> &'static str {
        self.row().2
    }
}

/// A network adapter of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Nic {
    pub(crate) key: i32,
    pub(crate) kind: NicKind,
    /// `00:50:56:xx:xx:xx`.
    pub(crate) mac: String,
    /// `manual`, `generated` or `assigned`, as it was asked for.
    pub(crate) address_type: String,
    /// The port group, an index into the world's networks.
    pub(crate) network: Option<usize>,
    pub(crate) start_connected: bool,
    pub(crate) connected: bool,
    pub(crate) allow_guest_control: bool,
}

/// The first key vSphere gives network adapters.
pub(crate) const NIC_BASE_KEY: i32 = 4000;
/// The first key vSphere gives disks.
pub(crate) const DISK_BASE_KEY: i32 = 2000;

/// A MAC address in VMware's range for addresses vCenter assigns (`00:50:56`), from `n`.
pub(crate) fn generated_mac(n: u64) -> String {
    let b = n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes();
    // The fourth byte stays below 0x40: the upper part of the range is for manual addresses.
    format!("00:50:56:{:02x}:{:02x}:{:02x}", b[0] & 0x3f, b[1], b[2])
}

/// Whether `mac` is six colon-separated hex bytes.
pub(crate) fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_the_wire_and_the_vmx() {
        for r in CONTROLLERS {
            assert_eq!(CtrlKind::from_wire(r.1), Some(r.0));
            assert_eq!(CtrlKind::from_vmx(r.0.bus(), r.0.virtual_dev()), Some(r.0));
        }
        assert_eq!(CtrlKind::from_vmx("scsi", None), Some(CtrlKind::LsiLogic));
        assert_eq!(CtrlKind::from_wire("VirtualFloppy"), None);
        for r in NICS {
            assert_eq!(NicKind::from_wire(r.1), Some(r.0));
            assert_eq!(NicKind::from_vmx(Some(r.0.virtual_dev())), Some(r.0));
        }
        assert!(!CtrlKind::Pvscsi.disk_unit(7) && CtrlKind::Ahci.disk_unit(7));
        let mac = generated_mac(12345);
        assert!(valid_mac(&mac) && mac.starts_with("00:50:56:"), "{mac}");
        assert!(!valid_mac("00:50:56:zz:00:00") && !valid_mac("00:50:56"));
    }
}
