//! `VirtualMachineConfigSpec` and its `VirtualDeviceConfigSpec`s as pyvmomi and govmomi send
//! them (`xsi:type` on every device and backing), read into the simulator's terms. Only what
//! a restore sets is read; a device type the simulator does not model is an
//! `InvalidDeviceSpec` naming it.

use vsphere::MoRef;
use vsphere::xml::Element;

use crate::devices::{CtrlKind, NicKind};
use crate::world::SimFault;

/// What a `VirtualMachineConfigSpec` asks for (absent fields: unchanged, or the default).
#[derive(Debug, Default)]
pub(crate) struct VmSpec {
    pub(crate) name: Option<String>,
    pub(crate) guest_id: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) uuid: Option<String>,
    pub(crate) instance_uuid: Option<String>,
    pub(crate) num_cpus: Option<u32>,
    pub(crate) cores_per_socket: Option<u32>,
    pub(crate) memory_mb: Option<u64>,
    pub(crate) firmware: Option<String>,
    /// `files.vmPathName`.
    pub(crate) vm_path: Option<String>,
    pub(crate) change_tracking: Option<bool>,
    pub(crate) extra_config: Vec<(String, String)>,
    pub(crate) devices: Vec<DeviceChange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Add,
    Remove,
    Edit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileOp {
    Create,
    Destroy,
    Replace,
}

/// One `VirtualDeviceConfigSpec`; `index` is its place in `deviceChange` (faults name it).
#[derive(Debug, Clone)]
pub(crate) struct DeviceChange {
    pub(crate) index: usize,
    pub(crate) op: Op,
    pub(crate) file_op: Option<FileOp>,
    pub(crate) device: Device,
}

#[derive(Debug, Clone)]
pub(crate) enum Device {
    Controller { key: i32, kind: CtrlKind, bus: i32 },
    Disk(DiskDevice),
    Nic(NicDevice),
}

impl Device {
    pub(crate) fn key(&self) -> i32 {
        match self {
            Device::Controller { key, .. } => *key,
            Device::Disk(d) => d.key,
            Device::Nic(n) => n.key,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DiskDevice {
    pub(crate) key: i32,
    pub(crate) controller_key: Option<i32>,
    pub(crate) unit: Option<i32>,
    /// Bytes (`capacityInBytes`, else `capacityInKB` × 1024).
    pub(crate) capacity: Option<u64>,
    /// The backing's `fileName` (`[ds] vm/vm.vmdk`, or `[ds]` / empty: vSphere names it).
    pub(crate) file_name: String,
    pub(crate) mode: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct NicDevice {
    pub(crate) key: i32,
    pub(crate) kind: NicKind,
    pub(crate) address_type: Option<String>,
    pub(crate) mac: Option<String>,
    /// The port group by name (`deviceName`) and moref (`network`), when backed.
    pub(crate) network: Option<(String, Option<MoRef>)>,
    pub(crate) connectable: Option<Connectable>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Connectable {
    pub(crate) start_connected: bool,
    pub(crate) connected: bool,
    pub(crate) allow_guest_control: bool,
}

fn flag(e: &Element, name: &str) -> Option<bool> {
    e.text_of(name).map(|v| matches!(v.trim(), "true" | "1"))
}

fn text(e: &Element, name: &str) -> Option<String> {
    e.text_of(name).map(|v| v.trim().to_owned())
}

/// An `InvalidDeviceSpec` about the device at `index`.
pub(crate) fn invalid_device(index: usize, message: impl Into<String>) -> SimFault {
    SimFault::new("InvalidDeviceSpec", message).with_detail(format!(
        "<property>virtualMachineConfigSpec.deviceChange[{index}].device</property><deviceIndex>{index}</deviceIndex>"
    ))
}

/// Reads a `VirtualMachineConfigSpec`.
pub(crate) fn vm_spec(e: &Element) -> Result<VmSpec, SimFault> {
    let mut s = VmSpec {
        name: text(e, "name"),
        guest_id: text(e, "guestId"),
        version: text(e, "version"),
        uuid: text(e, "uuid"),
        instance_uuid: text(e, "instanceUuid"),
        firmware: text(e, "firmware"),
        vm_path: e.child("files").and_then(|f| text(f, "vmPathName")),
        change_tracking: flag(e, "changeTrackingEnabled"),
        ..VmSpec::default()
    };
    let number = |name: &str| -> Result<Option<u64>, SimFault> {
        match e.text_of(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                SimFault::new("InvalidArgument", format!("{name} {v:?} is not a number"))
                    .with_detail(format!("<invalidProperty>{name}</invalidProperty>"))
            }),
        }
    };
    let small = |v: Option<u64>| v.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    s.num_cpus = small(number("numCPUs")?);
    s.cores_per_socket = small(number("numCoresPerSocket")?);
    s.memory_mb = number("memoryMB")?;
    for o in e.children_named("extraConfig") {
        if let Some(k) = text(o, "key") {
            s.extra_config.push((k, o.text_of("value").unwrap_or_default().to_owned()));
        }
    }
    for (index, c) in e.children_named("deviceChange").enumerate() {
        s.devices.push(device_change(index, c)?);
    }
    Ok(s)
}

fn device_change(index: usize, c: &Element) -> Result<DeviceChange, SimFault> {
    let op = match c.text_of("operation").map(str::trim) {
        Some("add") => Op::Add,
        Some("remove") => Op::Remove,
        Some("edit") => Op::Edit,
        other => return Err(invalid_device(index, format!("operation {other:?}"))),
    };
    let file_op = match c.text_of("fileOperation").map(str::trim) {
        None => None,
        Some("create") => Some(FileOp::Create),
        Some("destroy") => Some(FileOp::Destroy),
        Some("replace") => Some(FileOp::Replace),
        Some(other) => return Err(invalid_device(index, format!("fileOperation {other:?}"))),
    };
    let d = c.child("device").ok_or_else(|| invalid_device(index, "no device"))?;
    let ty = d.type_name();
    let key: i32 = d.parse_of("key").ok_or_else(|| invalid_device(index, format!("{ty} without a key")))?;
    let device = if let Some(kind) = CtrlKind::from_wire(ty) {
        Device::Controller { key, kind, bus: d.parse_of("busNumber").unwrap_or(0) }
    } else if ty == "VirtualDisk" {
        let file_name = match d.child("backing") {
            None => String::new(),
            Some(b) if b.type_name() == "VirtualDiskFlatVer2BackingInfo" => text(b, "fileName").unwrap_or_default(),
            Some(b) => {
                return Err(SimFault::new(
                    "InvalidDeviceBacking",
                    format!("the simulator's disks are VirtualDiskFlatVer2BackingInfo, not {}", b.type_name()),
                )
                .with_detail(format!(
                    "<property>virtualMachineConfigSpec.deviceChange[{index}].device.backing</property><deviceIndex>{index}</deviceIndex>"
                )));
            }
        };
        let bytes = d.parse_of::<u64>("capacityInBytes").filter(|b| *b > 0);
        let kb = d.parse_of::<u64>("capacityInKB").filter(|k| *k > 0).and_then(|k| k.checked_mul(1024));
        Device::Disk(DiskDevice {
            key,
            controller_key: d.parse_of("controllerKey"),
            unit: d.parse_of("unitNumber"),
            capacity: bytes.or(kb),
            file_name,
            mode: d.child("backing").and_then(|b| text(b, "diskMode")),
        })
    } else if let Some(kind) = NicKind::from_wire(ty) {
        let network = match d.child("backing") {
            None => None,
            Some(b) if b.type_name() == "VirtualEthernetCardNetworkBackingInfo" => {
                Some((text(b, "deviceName").unwrap_or_default(), b.child("network").and_then(MoRef::from_element)))
            }
            Some(b) => {
                return Err(SimFault::new(
                    "InvalidDeviceBacking",
                    format!("the simulator has standard port groups only, not {}", b.type_name()),
                )
                .with_detail(format!(
                    "<property>virtualMachineConfigSpec.deviceChange[{index}].device.backing</property><deviceIndex>{index}</deviceIndex>"
                )));
            }
        };
        Device::Nic(NicDevice {
            key,
            kind,
            address_type: text(d, "addressType"),
            mac: text(d, "macAddress").filter(|m| !m.is_empty()),
            network,
            connectable: d.child("connectable").map(|c| Connectable {
                start_connected: flag(c, "startConnected").unwrap_or(false),
                connected: flag(c, "connected").unwrap_or(false),
                allow_guest_control: flag(c, "allowGuestControl").unwrap_or(false),
            }),
        })
    } else if op == Op::Remove {
        // Removal needs the key only; the type is whatever the VM has under it.
        Device::Disk(DiskDevice {
            key,
            controller_key: None,
            unit: None,
            capacity: None,
            file_name: String::new(),
            mode: None,
        })
    } else {
        return Err(invalid_device(index, format!("the simulator does not model {ty} devices")));
    };
    Ok(DeviceChange { index, op, file_op, device })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Element {
        let doc =
            format!(r#"<spec xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">{xml}</spec>"#);
        vsphere::xml::parse(doc.as_bytes(), vsphere::xml::Limits::default()).unwrap()
    }

    #[test]
    fn a_config_spec_reads_and_odd_devices_are_named() {
        let e = parse(
            r#"<name>web</name><numCPUs>4</numCPUs><memoryMB>2048</memoryMB><files><vmPathName>[ds1]</vmPathName></files>
            <deviceChange><operation>add</operation><device xsi:type="ParaVirtualSCSIController"><key>-100</key><busNumber>1</busNumber></device></deviceChange>
            <deviceChange><operation>add</operation><fileOperation>create</fileOperation><device xsi:type="VirtualDisk"><key>-101</key>
              <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName></fileName><diskMode>persistent</diskMode></backing>
              <controllerKey>-100</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB></device></deviceChange>
            <deviceChange><operation>add</operation><device xsi:type="VirtualVmxnet3"><key>-102</key>
              <backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName></backing>
              <connectable><startConnected>true</startConnected><allowGuestControl>true</allowGuestControl><connected>false</connected></connectable>
              <addressType>generated</addressType></device></deviceChange>
            <extraConfig><key>a.b</key><value xsi:type="xsd:string">c</value></extraConfig>"#,
        );
        let s = vm_spec(&e).unwrap();
        assert_eq!((s.name.as_deref(), s.num_cpus, s.memory_mb), (Some("web"), Some(4), Some(2048)));
        assert_eq!(s.vm_path.as_deref(), Some("[ds1]"));
        assert_eq!(s.extra_config, vec![("a.b".to_owned(), "c".to_owned())]);
        assert!(matches!(s.devices[0].device, Device::Controller { key: -100, kind: CtrlKind::Pvscsi, bus: 1 }));
        match &s.devices[1].device {
            Device::Disk(d) => assert_eq!((d.controller_key, d.capacity), (Some(-100), Some(1 << 20))),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.devices[1].file_op, Some(FileOp::Create));
        match &s.devices[2].device {
            Device::Nic(n) => {
                assert_eq!(n.network.as_ref().map(|x| x.0.as_str()), Some("VM Network"));
                assert!(n.connectable.is_some_and(|c| c.start_connected && !c.connected));
            }
            other => panic!("{other:?}"),
        }
        let e = parse(
            r#"<deviceChange><operation>add</operation><device xsi:type="VirtualFloppy"><key>8000</key></device></deviceChange>"#,
        );
        let f = vm_spec(&e).unwrap_err();
        assert_eq!(f.kind, "InvalidDeviceSpec");
        assert!(f.message.contains("VirtualFloppy"), "{}", f.message);
        let e = parse("<numCPUs>many</numCPUs>");
        assert_eq!(vm_spec(&e).unwrap_err().kind, "InvalidArgument");
    }
}
