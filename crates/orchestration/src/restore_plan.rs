//! A restore point's captured `.vmx` read as the configuration of a new VM: CPUs, memory,
//! firmware, guest OS, controllers, disks in their slots and NICs, with a new identity and
//! NICs disconnected unless asked. Pure: no I/O.

use drill::vmx::{Bus, ControllerKind as VmxController, Firmware as VmxFirmware, Hardware, NicModel, Vmx};
use vsphere::MoRef;
use vsphere::provision::{ControllerKind, ControllerSpec, DiskSpec, Firmware, NicKind, NicSpec, VmSpec};

use crate::OrchError;

/// What the new VM is, beyond its `.vmx`.
#[derive(Debug, Clone)]
pub struct NewVm {
    /// Its name.
    pub name: String,
    /// `files.vmPathName`: `[ds] name/name.vmx`.
    pub vmx_path: String,
    /// Per disk of the point: its slot in the `.vmx`, its size and the datastore path of its
    /// restored file.
    pub disks: Vec<(String, u64, String)>,
    /// Source port group → target network; a NIC whose port group is not mapped has no network.
    pub networks: Vec<(String, (String, MoRef))>,
    /// Connect the NICs at power-on (off by default, so a restored VM never collides with its
    /// original).
    pub connect_nics: bool,
    /// Keep the BIOS and instance UUIDs and the MAC addresses (a replacement of the original,
    /// not a copy beside it).
    pub keep_identity: bool,
}

/// The configuration of the new VM, and notes for the operator (defaults taken, what changed).
pub fn vm_spec(vmx_text: &str, new: &NewVm) -> Result<(VmSpec, Vec<String>), OrchError> {
    let vmx = Vmx::parse(vmx_text)?;
    let hw = Hardware::from_vmx(&vmx)?;
    let mut notes = hw.notes.clone();

    let mut controllers = Vec::new();
    for c in &hw.controllers {
        let kind = match (&c.kind, c.bus) {
            (VmxController::Pvscsi, _) => ControllerKind::Pvscsi,
            (VmxController::LsiSas1068, _) => ControllerKind::LsiLogicSas,
            (VmxController::LsiLogic, _) => ControllerKind::LsiLogic,
            (VmxController::BusLogic, _) => ControllerKind::BusLogic,
            (VmxController::OtherScsi(dev), _) => {
                return Err(OrchError::Refused(format!(
                    "scsi{} is a {dev:?} controller, which a new VM cannot be given",
                    c.number
                )));
            }
            (VmxController::Sata, _) => ControllerKind::Ahci,
            (VmxController::Nvme, _) => ControllerKind::Nvme,
            (VmxController::Ide, _) => ControllerKind::Ide,
        };
        controllers.push(ControllerSpec { key: controller_key(c.bus, c.number), kind, bus: i32::from(c.number) });
    }

    let mut disks = Vec::new();
    for (n, (slot, capacity, file)) in new.disks.iter().enumerate() {
        let parsed: drill::vmx::DiskSlot = slot.parse().map_err(|e: String| {
            OrchError::Refused(format!("disk {slot} of the restore point: {e}; restore it as a single disk instead"))
        })?;
        if !hw.disks.iter().any(|d| d.slot == parsed) {
            notes.push(format!("{slot} is not a disk in the .vmx: attached there all the same"));
        }
        let key = controller_key(parsed.bus, parsed.controller);
        if !controllers.iter().any(|c| c.key == key) {
            // A .vmx that names no controller for a disk of the point (one a server wrote
            // sparsely, or the operator's own): the bus's usual one, said.
            let kind = match parsed.bus {
                Bus::Scsi => ControllerKind::LsiLogicSas,
                Bus::Sata => ControllerKind::Ahci,
                Bus::Nvme => ControllerKind::Nvme,
                Bus::Ide => ControllerKind::Ide,
            };
            notes.push(format!(
                "the .vmx names no controller for {slot}: the new VM gets a {} controller there",
                kind.wire()
            ));
            controllers.push(ControllerSpec { key, kind, bus: i32::from(parsed.controller) });
        }
        disks.push(DiskSpec {
            key: 2000 + i32::try_from(n).unwrap_or(0),
            controller_key: controller_key(parsed.bus, parsed.controller),
            unit: i32::from(parsed.unit),
            capacity: *capacity,
            file: file.clone(),
            label: None,
        });
    }

    let mut nics = Vec::new();
    for (n, nic) in hw.nics.iter().enumerate() {
        let kind = match &nic.model {
            NicModel::E1000 => NicKind::E1000,
            NicModel::E1000e => NicKind::E1000e,
            NicModel::Vmxnet3 => NicKind::Vmxnet3,
            NicModel::Vlance => NicKind::Pcnet32,
            NicModel::Other(m) if m == "vmxnet2" || m == "vmxnet" => NicKind::Vmxnet2,
            NicModel::Other(m) => {
                notes.push(format!("ethernet{}: a {m:?} NIC is restored as vmxnet3", nic.index));
                NicKind::Vmxnet3
            }
        };
        let port_group = vmx.get(&format!("ethernet{}.networkName", nic.index)).map(str::to_owned);
        let network = port_group.as_ref().and_then(|pg| new.networks.iter().find(|(from, _)| from == pg));
        match (&port_group, network) {
            (Some(pg), None) => notes.push(format!("ethernet{} ({pg}) is mapped to no network", nic.index)),
            (None, _) => notes.push(format!("ethernet{} names no port group: it has no network", nic.index)),
            _ => {}
        }
        nics.push(NicSpec {
            key: 4000 + i32::try_from(n).unwrap_or(0),
            kind,
            network: network.map(|(_, to)| to.clone()),
            mac: if new.keep_identity { nic.mac.clone() } else { None },
            connected: new.connect_nics,
        });
    }
    if !new.connect_nics && !nics.is_empty() {
        notes.push(format!("{} NIC(s) left disconnected (--connect-nics connects them)", nics.len()));
    }

    let guest_os = hw.guest_os.clone().unwrap_or_default();
    let guest_id = guest_id(&guest_os).unwrap_or_else(|| {
        let fallback = if guest_os.contains("64") { "otherGuest64" } else { "otherGuest" };
        notes.push(format!("guest OS {guest_os:?} has no known vSphere guest ID: {fallback} taken"));
        fallback
    });
    let identity = |key: &str| if new.keep_identity { vmx.get(key).map(normalise_uuid) } else { None };
    let spec = VmSpec {
        name: new.name.clone(),
        guest_id: guest_id.to_owned(),
        hardware_version: vmx.get("virtualHW.version").map(|v| format!("vmx-{:0>2}", v.trim())),
        num_cpus: hw.vcpus,
        cores_per_socket: Some(hw.cores_per_socket),
        memory_mb: hw.memory_mib,
        firmware: match hw.firmware {
            VmxFirmware::Bios => Firmware::Bios,
            VmxFirmware::Efi { .. } => Firmware::Efi,
        },
        vm_path: new.vmx_path.clone(),
        uuid: identity("uuid.bios"),
        instance_uuid: identity("vc.uuid"),
        controllers,
        disks,
        nics,
        extra_config: Vec::new(),
    };
    Ok((spec, notes))
}

/// The device key of controller `number` on `bus`, as vSphere numbers them (IDE controllers
/// are the VM's own: 200 and 201).
pub fn controller_key(bus: Bus, number: u8) -> i32 {
    let base = match bus {
        Bus::Scsi => 1000,
        Bus::Sata => 15000,
        Bus::Nvme => 31000,
        Bus::Ide => 200,
    };
    base + i32::from(number)
}

/// `56 4d 12 ...-... 9a` (the `.vmx` form) as `564d12..-....` (the API's).
fn normalise_uuid(v: &str) -> String {
    let hex: String = v.chars().filter(char::is_ascii_hexdigit).collect();
    if hex.len() != 32 {
        return v.trim().to_owned();
    }
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The API's guest ID for a `.vmx` `guestOS` value: the common ones by table, the regular
/// rest by rule (`rhel9-64` → `rhel9_64Guest`).
pub fn guest_id(guest_os: &str) -> Option<&'static str> {
    const TABLE: &[(&str, &str)] = &[
        ("other", "otherGuest"),
        ("other-64", "otherGuest64"),
        ("otherlinux", "otherLinuxGuest"),
        ("otherlinux-64", "otherLinux64Guest"),
        ("other24xlinux", "other24xLinuxGuest"),
        ("other24xlinux-64", "other24xLinux64Guest"),
        ("other26xlinux", "other26xLinuxGuest"),
        ("other26xlinux-64", "other26xLinux64Guest"),
        ("other3xlinux", "other3xLinuxGuest"),
        ("other3xlinux-64", "other3xLinux64Guest"),
        ("other4xlinux", "other4xLinuxGuest"),
        ("other4xlinux-64", "other4xLinux64Guest"),
        ("other5xlinux", "other5xLinuxGuest"),
        ("other5xlinux-64", "other5xLinux64Guest"),
        ("other6xlinux", "other6xLinuxGuest"),
        ("other6xlinux-64", "other6xLinux64Guest"),
        ("ubuntu", "ubuntuGuest"),
        ("ubuntu-64", "ubuntu64Guest"),
        ("debian10", "debian10Guest"),
        ("debian10-64", "debian10_64Guest"),
        ("debian11", "debian11Guest"),
        ("debian11-64", "debian11_64Guest"),
        ("debian12", "debian12Guest"),
        ("debian12-64", "debian12_64Guest"),
        ("centos7-64", "centos7_64Guest"),
        ("centos8-64", "centos8_64Guest"),
        ("rhel7-64", "rhel7_64Guest"),
        ("rhel8-64", "rhel8_64Guest"),
        ("rhel9-64", "rhel9_64Guest"),
        ("sles15-64", "sles15_64Guest"),
        ("windows9", "windows9Guest"),
        ("windows9-64", "windows9_64Guest"),
        ("windows2019srv-64", "windows2019srv_64Guest"),
        ("windows2019srvnext-64", "windows2019srvNext_64Guest"),
        ("windows2022srvnext-64", "windows2022srvNext_64Guest"),
        ("windows8srv-64", "windows8Server64Guest"),
        ("windows7srv-64", "windows7Server64Guest"),
        ("freebsd-64", "freebsd64Guest"),
        ("freebsd13-64", "freebsd13_64Guest"),
    ];
    let key = guest_os.trim().to_ascii_lowercase();
    TABLE.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = r#".encoding = "UTF-8"
displayName = "db01"
guestOS = "debian12-64"
virtualHW.version = "19"
firmware = "efi"
memsize = "2048"
numvcpus = "4"
cpuid.coresPerSocket = "2"
uuid.bios = "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc"
vc.uuid = "52 11 22 33 44 55 66 77-88 99 aa bb cc dd ee ff"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "db01.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "db01_1.vmdk"
sata0.present = "TRUE"
sata0:0.present = "TRUE"
sata0:0.fileName = "db01_2.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:50:56:aa:bb:cc"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000e"
ethernet1.networkName = "Backup LAN"
"#;

    fn new_vm() -> NewVm {
        NewVm {
            name: "db01-restored".into(),
            vmx_path: "[ds1] db01-restored/db01-restored.vmx".into(),
            disks: vec![
                ("scsi0:0".into(), 8 << 30, "[ds1] db01-restored/db01-restored.vmdk".into()),
                ("scsi0:1".into(), 1 << 30, "[ds1] db01-restored/db01-restored_1.vmdk".into()),
                ("sata0:0".into(), 1 << 20, "[ds1] db01-restored/db01-restored_2.vmdk".into()),
            ],
            networks: vec![("VM Network".into(), ("Isolated".into(), MoRef::new("Network", "network-7")))],
            connect_nics: false,
            keep_identity: false,
        }
    }

    #[test]
    fn a_vmx_becomes_the_same_hardware_with_a_new_identity_and_nics_disconnected() {
        let (spec, notes) = vm_spec(VMX, &new_vm()).unwrap();
        assert_eq!((spec.num_cpus, spec.cores_per_socket, spec.memory_mb), (4, Some(2), 2048));
        assert_eq!(spec.guest_id, "debian12_64Guest");
        assert_eq!(spec.hardware_version.as_deref(), Some("vmx-19"));
        assert!(matches!(spec.firmware, Firmware::Efi));
        let ctl: Vec<(i32, i32)> = spec.controllers.iter().map(|c| (c.key, c.bus)).collect();
        assert_eq!(ctl, vec![(1000, 0), (15000, 0)]);
        assert!(matches!(spec.controllers[0].kind, ControllerKind::Pvscsi));
        assert!(matches!(spec.controllers[1].kind, ControllerKind::Ahci));
        let disks: Vec<(i32, i32, u64)> = spec.disks.iter().map(|d| (d.controller_key, d.unit, d.capacity)).collect();
        assert_eq!(disks, vec![(1000, 0, 8 << 30), (1000, 1, 1 << 30), (15000, 0, 1 << 20)]);
        assert_eq!(spec.disks[2].file, "[ds1] db01-restored/db01-restored_2.vmdk");
        assert_eq!(spec.nics.len(), 2);
        assert!(spec.nics.iter().all(|n| !n.connected && n.mac.is_none()));
        assert_eq!(spec.nics[0].network.as_ref().map(|n| n.0.as_str()), Some("Isolated"));
        assert!(spec.nics[1].network.is_none());
        assert!(matches!(spec.nics[1].kind, NicKind::E1000e));
        assert!(spec.uuid.is_none() && spec.instance_uuid.is_none());
        assert!(notes.iter().any(|n| n.contains("Backup LAN") && n.contains("no network")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("disconnected")), "{notes:?}");
    }

    #[test]
    fn keeping_identity_keeps_uuids_and_macs() {
        let mut new = new_vm();
        new.keep_identity = true;
        new.connect_nics = true;
        let (spec, _) = vm_spec(VMX, &new).unwrap();
        assert_eq!(spec.uuid.as_deref(), Some("564d1234-5678-9abc-def0-123456789abc"));
        assert_eq!(spec.instance_uuid.as_deref(), Some("52112233-4455-6677-8899-aabbccddeeff"));
        assert_eq!(spec.nics[0].mac.as_deref(), Some("00:50:56:aa:bb:cc"));
        assert!(spec.nics.iter().all(|n| n.connected));
    }

    #[test]
    fn a_disk_without_its_controller_gets_one_and_one_without_a_slot_is_refused_by_name() {
        let mut new = new_vm();
        new.disks[0].0 = "nvme3:0".into();
        let (spec, notes) = vm_spec(VMX, &new).unwrap();
        let c =
            spec.controllers.iter().find(|c| c.kind == ControllerKind::Nvme && c.bus == 3).expect("an NVMe controller");
        assert_eq!(spec.disks[0].controller_key, c.key);
        assert!(notes.iter().any(|n| n.contains("no controller for nvme3:0")), "{notes:?}");
        new.disks[0].0 = "disk.raw".into();
        let e = vm_spec(VMX, &new).unwrap_err().to_string();
        assert!(e.contains("disk.raw"), "{e}");
    }

    #[test]
    fn unknown_guests_fall_back_with_a_note() {
        let text = VMX.replace("debian12-64", "plan9-64");
        let (spec, notes) = vm_spec(&text, &new_vm()).unwrap();
        assert_eq!(spec.guest_id, "otherGuest64");
        assert!(notes.iter().any(|n| n.contains("plan9-64")), "{notes:?}");
        assert_eq!(guest_id("Other4xLinux-64"), Some("other4xLinux64Guest"));
    }
}
