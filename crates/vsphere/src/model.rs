//! The typed VM model backup and `probe` need, read from property-collector answers:
//! identity, power and CBT state, disks with their backing kind, mode, sharing and change ID,
//! USB and PCI passthrough devices, the snapshot tree, encryption, Tools and guest free space;
//! and the one rule that says whether and why a disk can be copied from a snapshot.

use crate::enums::{ConnectionState, DiskMode, PowerState, ToolsRunningStatus};
use crate::error::Error;
use crate::pc::ObjectContent;
use crate::session::Client;
use crate::soap::MoRef;
use crate::version::ApiVersion;
use crate::xml::Element;

/// How a virtual disk is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingKind {
    /// A flat VMDK (`VirtualDiskFlatVer2BackingInfo`): the normal case.
    Flat,
    /// Hosted sparse (`VirtualDiskSparseVer2BackingInfo`).
    Sparse,
    /// SEsparse (`VirtualDiskSeSparseBackingInfo`).
    SeSparse,
    /// A raw device mapping in physical mode: no snapshots, no CBT, no agentless backup.
    RdmPhysical,
    /// A raw device mapping in virtual mode.
    RdmVirtual,
    /// A raw disk (`VirtualDiskRawDiskVer2BackingInfo`).
    RawDisk,
    /// Anything else, by type name.
    Other(String),
}

/// One virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The device key (2000 and up).
    pub key: i32,
    /// `Hard disk 1`.
    pub label: String,
    /// Size in bytes.
    pub capacity: u64,
    /// `[datastore] vm/vm.vmdk` (the current layer: a delta while snapshots exist).
    pub file_name: String,
    /// The base of the chain (the stable name to key backups by).
    pub base_file_name: String,
    /// The storage kind.
    pub backing: BackingKind,
    /// `persistent`, `independent_persistent`, ...
    pub mode: DiskMode,
    /// `sharingNone` or `sharingMultiWriter`.
    pub sharing: Option<String>,
    /// The CBT change ID of this state, if CBT is on.
    pub change_id: Option<String>,
    /// Thin provisioned.
    pub thin: Option<bool>,
    /// The datastore that holds it.
    pub datastore: Option<MoRef>,
    /// Its controller's key.
    pub controller_key: Option<i32>,
    /// Its unit on the controller.
    pub unit_number: Option<i32>,
    /// `scsi0:1`, from the controller's bus number.
    pub bus_slot: Option<String>,
    /// The disk's own encryption key, if encrypted.
    pub key_id: Option<String>,
}

/// Why a disk cannot be copied from a snapshot. The one rule, with one wording, that the
/// backup flow (which skips the disk), `cbt-reset` (which leaves it alone) and `probe check`
/// (which reports it) share.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCopyable {
    /// Independent disks are left out of snapshots.
    #[error("independent ({0}): snapshots leave it out, so it is not backed up")]
    Independent(DiskMode),
    /// A physical-mode RDM cannot be snapshotted, tracked or read from a datastore.
    #[error("a physical-mode RDM: no snapshots, no CBT, not readable agentlessly, so it is not backed up")]
    RdmPhysical,
}

impl Disk {
    /// Independent disks are left out of snapshots, so they cannot be backed up this way.
    pub fn independent(&self) -> bool {
        self.mode.independent()
    }

    /// Every reason this disk cannot be copied from a snapshot, in the order [`Disk::copyable`]
    /// names them; none when it can be.
    pub fn not_copyable(&self) -> Vec<NotCopyable> {
        let mut out = Vec::new();
        if self.independent() {
            out.push(NotCopyable::Independent(self.mode.clone()));
        }
        if self.backing == BackingKind::RdmPhysical {
            out.push(NotCopyable::RdmPhysical);
        }
        out
    }

    /// Whether this disk can be copied from a snapshot, and if not, why (the first reason).
    pub fn copyable(&self) -> Result<(), NotCopyable> {
        self.not_copyable().into_iter().next().map_or(Ok(()), Err)
    }
}

/// A node of the snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// When (server clock, ISO 8601).
    pub create_time: String,
    /// Whether the guest was quiesced.
    pub quiesced: bool,
    /// Children.
    pub children: Vec<Snapshot>,
}

impl Snapshot {
    fn depth(&self) -> usize {
        1 + self.children.iter().map(Snapshot::depth).max().unwrap_or(0)
    }

    fn walk<'a>(&'a self, out: &mut Vec<&'a Snapshot>) {
        out.push(self);
        for c in &self.children {
            c.walk(out);
        }
    }
}

/// A guest file system as VMware Tools reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// The mount point or drive.
    pub path: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Free bytes.
    pub free: u64,
}

/// A device that matters to backup besides disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The key.
    pub key: i32,
    /// The device type (`VirtualUSB`, `VirtualPCIPassthrough`).
    pub kind: String,
    /// Its label.
    pub label: String,
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// The moref.
    pub moref: MoRef,
    /// The name.
    pub name: String,
    /// `config.instanceUuid`: the stable identity.
    pub instance_uuid: Option<String>,
    /// `config.uuid` (BIOS; clones may share it).
    pub bios_uuid: Option<String>,
    /// `vmx-19`.
    pub hardware_version: Option<String>,
    /// `poweredOn`, `poweredOff`, `suspended`.
    pub power_state: Option<PowerState>,
    /// `connected`, ...
    pub connection_state: Option<ConnectionState>,
    /// Whether CBT is on; `None` when the server leaves it out (vcsim until it is set).
    pub cbt_enabled: Option<bool>,
    /// Whether the VM can do CBT at all.
    pub cbt_supported: Option<bool>,
    /// Orphaned deltas remain after a failed snapshot removal.
    pub consolidation_needed: Option<bool>,
    /// The VM's encryption key ID, if encrypted.
    pub key_id: Option<String>,
    /// `guestToolsRunning`, `guestToolsNotRunning`, ... (`guest.toolsRunningStatus`).
    pub tools: Option<ToolsRunningStatus>,
    /// The guest OS ID.
    pub guest_id: Option<String>,
    /// `[ds] vm/vm.vmx`.
    pub vmx_path: Option<String>,
    /// The host it runs on.
    pub host: Option<MoRef>,
    /// Its disks.
    pub disks: Vec<Disk>,
    /// USB devices (they do not restore onto another host).
    pub usb: Vec<Device>,
    /// PCI passthrough devices (they prevent snapshots).
    pub pci_passthrough: Vec<Device>,
    /// SCSI controllers with bus sharing (they prevent snapshots).
    pub shared_bus_controllers: Vec<Device>,
    /// The snapshot roots.
    pub snapshots: Vec<Snapshot>,
    /// The current snapshot.
    pub current_snapshot: Option<MoRef>,
    /// Guest file systems.
    pub guest_disks: Vec<GuestDisk>,
}

impl Vm {
    /// The deepest chain of snapshots.
    pub fn snapshot_depth(&self) -> usize {
        self.snapshots.iter().map(Snapshot::depth).max().unwrap_or(0)
    }

    /// Every snapshot, depth first.
    pub fn all_snapshots(&self) -> Vec<&Snapshot> {
        let mut out = Vec::new();
        for s in &self.snapshots {
            s.walk(&mut out);
        }
        out
    }
}

/// The property paths a [`Vm`] is read from, for a server of `api` (older APIs refuse paths
/// they do not know, which fails the whole call).
pub fn vm_paths(api: Option<&ApiVersion>) -> Vec<&'static str> {
    let mut p = vec![
        "name",
        "config.uuid",
        "config.instanceUuid",
        "config.version",
        "config.changeTrackingEnabled",
        "config.hardware.device",
        "config.guestId",
        "config.files.vmPathName",
        "capability.changeTrackingSupported",
        "runtime.powerState",
        "runtime.connectionState",
        "runtime.host",
        "snapshot",
        "guest.toolsRunningStatus",
        "guest.disk",
    ];
    if api.is_none_or(|v| v.at_least(5, 1)) {
        p.push("runtime.consolidationNeeded");
    }
    if api.is_none_or(|v| v.at_least(6, 5)) {
        p.push("config.keyId");
    }
    p
}

impl Client {
    /// Every VM in the inventory.
    pub async fn vms(&self) -> Result<Vec<Vm>, Error> {
        let api = ApiVersion::parse(&self.content().about.api_version);
        let objs = self.inventory("VirtualMachine", &vm_paths(api.as_ref())).await?;
        objs.iter().map(vm_from).collect()
    }

    /// Every VM under a folder, datacenter, cluster or resource pool.
    pub async fn vms_in(&self, container: &MoRef) -> Result<Vec<Vm>, Error> {
        let api = ApiVersion::parse(&self.content().about.api_version);
        let objs = self.inventory_in(container, "VirtualMachine", &vm_paths(api.as_ref())).await?;
        objs.iter().map(vm_from).collect()
    }

    /// Some VMs, by moref.
    pub async fn vms_by_moref(&self, morefs: &[MoRef]) -> Result<Vec<Vm>, Error> {
        let api = ApiVersion::parse(&self.content().about.api_version);
        let spec = crate::pc::FilterSpec {
            kind: "VirtualMachine".into(),
            paths: vm_paths(api.as_ref()).into_iter().map(str::to_owned).collect(),
            objects: crate::pc::Objects::List(morefs.to_vec()),
        };
        self.retrieve(&spec).await?.iter().map(vm_from).collect()
    }
}

impl Client {
    /// The disks as one snapshot froze them: their file names and, above all, the change IDs
    /// to save once the backup of that snapshot is durable (reference 2.9).
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<Disk>, Error> {
        let spec = crate::pc::FilterSpec {
            kind: "VirtualMachineSnapshot".into(),
            paths: vec!["config.hardware.device".into()],
            objects: crate::pc::Objects::List(vec![snapshot.clone()]),
        };
        let objs = self.retrieve(&spec).await?;
        let devices = objs
            .first()
            .and_then(|o| o.get("config.hardware.device"))
            .ok_or_else(|| Error::Protocol(format!("{snapshot} has no devices")))?;
        let mut vm = vm_from(&ObjectContent { obj: snapshot.clone(), props: Vec::new(), missing: Vec::new() })?;
        read_devices(devices, &mut vm);
        Ok(vm.disks)
    }
}

fn bool_of(e: Option<&Element>) -> Option<bool> {
    e.and_then(|e| match e.text.trim() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    })
}

pub(crate) fn some_text(s: Option<&str>) -> Option<String> {
    s.map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Reads one VM from its properties.
pub fn vm_from(o: &ObjectContent) -> Result<Vm, Error> {
    let t = |p: &str| some_text(o.text(p));
    let mut vm = Vm {
        moref: o.obj.clone(),
        name: t("name").unwrap_or_default(),
        instance_uuid: t("config.instanceUuid"),
        bios_uuid: t("config.uuid"),
        hardware_version: t("config.version"),
        power_state: t("runtime.powerState").map(PowerState::from),
        connection_state: t("runtime.connectionState").map(ConnectionState::from),
        cbt_enabled: bool_of(o.get("config.changeTrackingEnabled")),
        cbt_supported: bool_of(o.get("capability.changeTrackingSupported")),
        consolidation_needed: bool_of(o.get("runtime.consolidationNeeded")),
        key_id: o.get("config.keyId").and_then(|k| some_text(k.text_of("keyId"))),
        tools: t("guest.toolsRunningStatus").map(ToolsRunningStatus::from),
        guest_id: t("config.guestId"),
        vmx_path: t("config.files.vmPathName"),
        host: o.get("runtime.host").and_then(MoRef::from_element),
        disks: Vec::new(),
        usb: Vec::new(),
        pci_passthrough: Vec::new(),
        shared_bus_controllers: Vec::new(),
        snapshots: Vec::new(),
        current_snapshot: None,
        guest_disks: Vec::new(),
    };
    if let Some(devices) = o.get("config.hardware.device") {
        read_devices(devices, &mut vm);
    }
    if let Some(s) = o.get("snapshot") {
        vm.current_snapshot = s.child("currentSnapshot").and_then(MoRef::from_element);
        vm.snapshots = s.children_named("rootSnapshotList").filter_map(snapshot_from).collect();
    }
    if let Some(g) = o.get("guest.disk") {
        vm.guest_disks = g
            .children
            .iter()
            .map(|d| GuestDisk {
                path: d.text_of("diskPath").unwrap_or_default().to_owned(),
                capacity: d.parse_of("capacity").unwrap_or(0),
                free: d.parse_of("freeSpace").unwrap_or(0),
            })
            .collect();
    }
    Ok(vm)
}

fn snapshot_from(e: &Element) -> Option<Snapshot> {
    Some(Snapshot {
        moref: e.child("snapshot").and_then(MoRef::from_element)?,
        name: e.text_of("name").unwrap_or_default().to_owned(),
        description: e.text_of("description").unwrap_or_default().to_owned(),
        create_time: e.text_of("createTime").unwrap_or_default().trim().to_owned(),
        quiesced: bool_of(e.child("quiesced")).unwrap_or(false),
        children: e.children_named("childSnapshotList").filter_map(snapshot_from).collect(),
    })
}

fn read_devices(devices: &Element, vm: &mut Vm) {
    // Controllers first: a disk's `scsi0:1` name needs its controller's bus number.
    let mut buses = std::collections::HashMap::new();
    for d in &devices.children {
        let kind = d.type_name();
        let key: i32 = d.parse_of("key").unwrap_or(-1);
        let label = d.child("deviceInfo").and_then(|i| i.text_of("label")).unwrap_or_default().to_owned();
        let bus: Option<i32> = d.parse_of("busNumber");
        if let Some(bus) = bus {
            let prefix = if kind.contains("SCSI") || kind.contains("Lsi") || kind.contains("BusLogic") {
                "scsi"
            } else if kind.contains("SATA") || kind.contains("AHCI") {
                "sata"
            } else if kind.contains("IDE") {
                "ide"
            } else if kind.contains("NVME") {
                "nvme"
            } else {
                ""
            };
            if !prefix.is_empty() {
                buses.insert(key, format!("{prefix}{bus}"));
            }
            if d.text_of("sharedBus").is_some_and(|s| s.trim() != "noSharing") {
                vm.shared_bus_controllers.push(Device { key, kind: kind.to_owned(), label: label.clone() });
            }
        }
        match kind {
            "VirtualUSB" => vm.usb.push(Device { key, kind: kind.to_owned(), label }),
            "VirtualPCIPassthrough" => vm.pci_passthrough.push(Device { key, kind: kind.to_owned(), label }),
            _ => {}
        }
    }
    for d in devices.children.iter().filter(|d| d.type_name() == "VirtualDisk") {
        vm.disks.push(disk_from(d, &buses));
    }
}

fn disk_from(d: &Element, buses: &std::collections::HashMap<i32, String>) -> Disk {
    let b = d.child("backing");
    let bt = |n: &str| b.and_then(|b| some_text(b.text_of(n)));
    let backing = match b.map(Element::type_name) {
        Some("VirtualDiskFlatVer2BackingInfo") => BackingKind::Flat,
        Some("VirtualDiskSparseVer2BackingInfo") => BackingKind::Sparse,
        Some("VirtualDiskSeSparseBackingInfo") => BackingKind::SeSparse,
        Some("VirtualDiskRawDiskMappingVer1BackingInfo") => {
            if bt("compatibilityMode").as_deref() == Some("physicalMode") {
                BackingKind::RdmPhysical
            } else {
                BackingKind::RdmVirtual
            }
        }
        Some("VirtualDiskRawDiskVer2BackingInfo") => BackingKind::RawDisk,
        Some(other) => BackingKind::Other(other.to_owned()),
        None => BackingKind::Other("none".into()),
    };
    // The chain's base: follow `parent` to the end (bounded by the parser's depth limit).
    let mut base = b;
    while let Some(p) = base.and_then(|x| x.child("parent")) {
        base = Some(p);
    }
    let file_name = bt("fileName").or_else(|| bt("descriptorFileName")).unwrap_or_default();
    let capacity = d
        .parse_of::<u64>("capacityInBytes")
        .filter(|c| *c > 0)
        .or_else(|| d.parse_of::<u64>("capacityInKB").map(|k| k.saturating_mul(1024)))
        .unwrap_or(0);
    let controller_key: Option<i32> = d.parse_of("controllerKey");
    let unit_number: Option<i32> = d.parse_of("unitNumber");
    Disk {
        key: d.parse_of("key").unwrap_or(-1),
        label: d.child("deviceInfo").and_then(|i| i.text_of("label")).unwrap_or_default().to_owned(),
        capacity,
        base_file_name: base.and_then(|x| some_text(x.text_of("fileName"))).unwrap_or_else(|| file_name.clone()),
        file_name,
        backing,
        mode: bt("diskMode").map_or(DiskMode::Persistent, DiskMode::from),
        sharing: bt("sharing"),
        change_id: bt("changeId"),
        thin: bool_of(b.and_then(|b| b.child("thinProvisioned"))),
        datastore: b.and_then(|b| b.child("datastore")).and_then(MoRef::from_element),
        controller_key,
        unit_number,
        bus_slot: controller_key
            .and_then(|c| buses.get(&c))
            .zip(unit_number)
            .map(|(bus, unit)| format!("{bus}:{unit}")),
        key_id: b.and_then(|b| b.child("keyId")).and_then(|k| some_text(k.text_of("keyId"))),
    }
}
