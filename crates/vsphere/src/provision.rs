//! The calls a restore into vSphere needs (reference 2.14): where a new VM goes (datacenter,
//! compute resource, pool, folder, by name, with the choices listed when one is not found), the
//! networks it may join, `CreateVM_Task` from a [`VmSpec`] rendered as the WSDL's
//! `VirtualMachineConfigSpec` (elements in WSDL order, `xsi:type` on every device and backing),
//! `RegisterVM_Task`, disks attached and detached, datastore folders and virtual disks made,
//! copied and deleted, power, rename, destroy, and the VM's hardware read back to check it.

use std::sync::atomic::AtomicBool;

use crate::error::{Error, FaultKind};
use crate::pc::{FilterSpec, ObjectContent, Objects};
use crate::session::Client;
use crate::soap::{MoRef, Request};
use crate::xml::Element;

/// How a VM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS.
    Bios,
    /// UEFI.
    Efi,
}

impl Firmware {
    /// The wire value (`bios`, `efi`).
    pub fn wire(self) -> &'static str {
        match self {
            Self::Bios => "bios",
            Self::Efi => "efi",
        }
    }

    /// From the wire value; `None` for anything else.
    pub fn from_wire(s: &str) -> Option<Self> {
        match s.trim() {
            "bios" => Some(Self::Bios),
            "efi" => Some(Self::Efi),
            _ => None,
        }
    }
}

/// A disk controller's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    /// VMware Paravirtual SCSI.
    Pvscsi,
    /// LSI Logic SAS.
    LsiLogicSas,
    /// LSI Logic parallel.
    LsiLogic,
    /// BusLogic.
    BusLogic,
    /// SATA (AHCI).
    Ahci,
    /// NVMe.
    Nvme,
    /// IDE. A new VM already has two (keys 200 and 201, buses 0 and 1): put IDE disks on
    /// those rather than adding another, which vSphere refuses.
    Ide,
}

const CONTROLLERS: [(ControllerKind, &str); 7] = [
    (ControllerKind::Pvscsi, "ParaVirtualSCSIController"),
    (ControllerKind::LsiLogicSas, "VirtualLsiLogicSASController"),
    (ControllerKind::LsiLogic, "VirtualLsiLogicController"),
    (ControllerKind::BusLogic, "VirtualBusLogicController"),
    (ControllerKind::Ahci, "VirtualAHCIController"),
    (ControllerKind::Nvme, "VirtualNVMEController"),
    (ControllerKind::Ide, "VirtualIDEController"),
];

impl ControllerKind {
    /// The wire type (`ParaVirtualSCSIController`).
    pub fn wire(self) -> &'static str {
        CONTROLLERS.iter().find(|(k, _)| *k == self).map_or("VirtualController", |(_, w)| w)
    }

    /// From the wire type; `None` for any other device.
    pub fn from_wire(s: &str) -> Option<Self> {
        CONTROLLERS.iter().find(|(_, w)| *w == s).map(|(k, _)| *k)
    }

    /// Whether it is a SCSI controller (these carry `sharedBus`).
    pub fn scsi(self) -> bool {
        matches!(self, Self::Pvscsi | Self::LsiLogicSas | Self::LsiLogic | Self::BusLogic)
    }
}

/// A disk controller of a new VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerSpec {
    /// Its key (in a spec, a negative number of the caller's; vSphere assigns the real one).
    pub key: i32,
    /// Its type.
    pub kind: ControllerKind,
    /// Its bus number.
    pub bus: i32,
}

/// How a virtual disk's space is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    /// Allocated as written (`thin`).
    Thin,
    /// Allocated up front, zeroed on first write (`preallocated`).
    Thick,
    /// Allocated and zeroed up front (`eagerZeroedThick`).
    EagerZeroedThick,
}

impl Provisioning {
    /// The `VirtualDiskType` on the wire.
    pub fn wire(self) -> &'static str {
        match self {
            Self::Thin => "thin",
            Self::Thick => "preallocated",
            Self::EagerZeroedThick => "eagerZeroedThick",
        }
    }
}

/// A virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Its key.
    pub key: i32,
    /// Its controller's key.
    pub controller_key: i32,
    /// Its unit on the controller.
    pub unit: i32,
    /// Its size in bytes.
    pub capacity: u64,
    /// An existing disk file (`[ds1] vm/vm.vmdk`), attached as it is (no `fileOperation`).
    pub file: String,
    /// Its label (`Hard disk 1`); vSphere names it when `None`.
    pub label: Option<String>,
}

/// A network adapter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicKind {
    /// Intel E1000.
    E1000,
    /// Intel E1000e.
    E1000e,
    /// VMXNET 3.
    Vmxnet3,
    /// VMXNET 2 (enhanced).
    Vmxnet2,
    /// AMD PCnet32.
    Pcnet32,
}

const NICS: [(NicKind, &str); 5] = [
    (NicKind::E1000, "VirtualE1000"),
    (NicKind::E1000e, "VirtualE1000e"),
    (NicKind::Vmxnet3, "VirtualVmxnet3"),
    (NicKind::Vmxnet2, "VirtualVmxnet2"),
    (NicKind::Pcnet32, "VirtualPCNet32"),
];

impl NicKind {
    /// The wire type (`VirtualVmxnet3`).
    pub fn wire(self) -> &'static str {
        NICS.iter().find(|(k, _)| *k == self).map_or("VirtualEthernetCard", |(_, w)| w)
    }

    /// From the wire type; `None` for any other device.
    pub fn from_wire(s: &str) -> Option<Self> {
        NICS.iter().find(|(_, w)| *w == s).map(|(k, _)| *k)
    }
}

/// A network adapter of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// Its key.
    pub key: i32,
    /// Its type.
    pub kind: NicKind,
    /// A standard port group's network (name and moref); `None`: no backing network.
    pub network: Option<(String, MoRef)>,
    /// A manual MAC (`00:50:56:...`); `None`: vSphere generates one. Read back, the address
    /// the adapter has, generated or not.
    pub mac: Option<String>,
    /// Connected at power-on (`connectable.startConnected`; sent as `connected` too).
    pub connected: bool,
}

/// What a new VM is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Its name.
    pub name: String,
    /// The guest OS (`otherLinux64Guest`).
    pub guest_id: String,
    /// The hardware version (`vmx-19`); the host's default when `None`.
    pub hardware_version: Option<String>,
    /// Virtual CPUs.
    pub num_cpus: u32,
    /// Cores per socket.
    pub cores_per_socket: Option<u32>,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// BIOS or EFI.
    pub firmware: Firmware,
    /// `files.vmPathName`: `[ds1]` (vSphere makes the folder) or `[ds1] folder/name.vmx`.
    pub vm_path: String,
    /// The BIOS UUID; vSphere makes one when `None`.
    pub uuid: Option<String>,
    /// The instance UUID; vSphere makes one when `None`.
    pub instance_uuid: Option<String>,
    /// Disk controllers to add.
    pub controllers: Vec<ControllerSpec>,
    /// Existing disk files to attach.
    pub disks: Vec<DiskSpec>,
    /// Network adapters.
    pub nics: Vec<NicSpec>,
    /// `extraConfig` keys and values.
    pub extra_config: Vec<(String, String)>,
}

/// Where a new VM goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The datacenter.
    pub datacenter: MoRef,
    /// Its inventory path (`DC0`, `Folder/DC0`): the `dcPath` of datastore URLs.
    pub datacenter_name: String,
    /// The VM folder the VM is created in.
    pub vm_folder: MoRef,
    /// The resource pool.
    pub pool: MoRef,
    /// The host, when one was named or picked (a cluster named alone leaves it to DRS).
    pub host: Option<MoRef>,
}

/// A network a VM can join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The moref (`Network`, `DistributedVirtualPortgroup`, ...).
    pub moref: MoRef,
    /// Its name.
    pub name: String,
}

/// What a VM is configured with now (read back to verify a restore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// Its name.
    pub name: String,
    /// The guest OS.
    pub guest_id: Option<String>,
    /// Virtual CPUs.
    pub num_cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// BIOS or EFI, when the server says one of them.
    pub firmware: Option<Firmware>,
    /// `vmx-19`.
    pub hardware_version: Option<String>,
    /// The BIOS UUID.
    pub uuid: Option<String>,
    /// The instance UUID.
    pub instance_uuid: Option<String>,
    /// Its disk controllers of the kinds [`ControllerKind`] knows.
    pub controllers: Vec<ControllerSpec>,
    /// Its virtual disks (`file` is the backing's current file).
    pub disks: Vec<DiskSpec>,
    /// Its network adapters of the kinds [`NicKind`] knows (network: name and moref when the
    /// backing is a network).
    pub nics: Vec<NicSpec>,
}

/// The property paths [`Hardware`] is read from.
pub const HARDWARE_PATHS: [&str; 9] = [
    "name",
    "config.guestId",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.firmware",
    "config.version",
    "config.uuid",
    "config.instanceUuid",
    "config.hardware.device",
];

/// Renders `spec` as a `VirtualMachineConfigSpec` in `<tag>`, its elements in WSDL order:
/// name, version, uuid, instanceUuid, guestId, files, numCPUs, numCoresPerSocket, memoryMB,
/// deviceChange, extraConfig, firmware.
pub fn config_spec(req: &mut Request, tag: &str, spec: &VmSpec) {
    config_spec_with(req, tag, spec, false);
}

/// [`config_spec`], with the disks made new and empty (`fileOperation` create) when
/// `new_disks`, as an import's are.
pub fn config_spec_with(req: &mut Request, tag: &str, spec: &VmSpec, new_disks: bool) {
    req.open(tag, None)
        .text("name", &spec.name)
        .opt("version", spec.hardware_version.as_ref())
        .opt("uuid", spec.uuid.as_ref())
        .opt("instanceUuid", spec.instance_uuid.as_ref())
        .text("guestId", &spec.guest_id)
        .open("files", None)
        .text("vmPathName", &spec.vm_path)
        .close("files")
        .text("numCPUs", spec.num_cpus)
        .opt("numCoresPerSocket", spec.cores_per_socket)
        .text("memoryMB", spec.memory_mb);
    for c in &spec.controllers {
        device_change(req, "add", None, |r| controller_device(r, c));
    }
    for d in &spec.disks {
        device_change(req, "add", new_disks.then_some("create"), |r| disk_device(r, d));
    }
    for n in &spec.nics {
        device_change(req, "add", None, |r| nic_device(r, n));
    }
    for (k, v) in &spec.extra_config {
        req.open("extraConfig", Some("OptionValue"))
            .text("key", k)
            .open("value", Some("xsd:string"))
            .content(v)
            .close("value")
            .close("extraConfig");
    }
    req.text("firmware", spec.firmware.wire()).close(tag);
}

/// One `<deviceChange>`: operation, fileOperation, then the device `device` renders.
fn device_change(req: &mut Request, op: &str, file_op: Option<&str>, device: impl FnOnce(&mut Request)) {
    req.open("deviceChange", None).text("operation", op).opt("fileOperation", file_op);
    device(req);
    req.close("deviceChange");
}

/// `deviceInfo` (a `Description`: label and summary, both required).
fn device_info(req: &mut Request, label: Option<&String>) {
    if let Some(l) = label {
        req.open("deviceInfo", None).text("label", l).text("summary", l).close("deviceInfo");
    }
}

fn controller_device(req: &mut Request, c: &ControllerSpec) {
    req.open("device", Some(c.kind.wire())).text("key", c.key).text("busNumber", c.bus);
    if c.kind.scsi() {
        req.text("sharedBus", "noSharing");
    }
    req.close("device");
}

fn disk_device(req: &mut Request, d: &DiskSpec) {
    req.open("device", Some("VirtualDisk")).text("key", d.key);
    device_info(req, d.label.as_ref());
    req.open("backing", Some("VirtualDiskFlatVer2BackingInfo"))
        .text("fileName", &d.file)
        .text("diskMode", "persistent")
        .text("thinProvisioned", true)
        .close("backing")
        .text("controllerKey", d.controller_key)
        .text("unitNumber", d.unit)
        .text("capacityInKB", d.capacity / 1024);
    if d.capacity > 0 {
        req.text("capacityInBytes", d.capacity);
    }
    req.close("device");
}

fn nic_device(req: &mut Request, n: &NicSpec) {
    req.open("device", Some(n.kind.wire())).text("key", n.key);
    if let Some((name, moref)) = &n.network {
        req.open("backing", Some("VirtualEthernetCardNetworkBackingInfo"))
            .text("deviceName", name)
            .moref("network", moref)
            .close("backing");
    }
    req.open("connectable", None)
        .text("startConnected", n.connected)
        .text("allowGuestControl", true)
        .text("connected", n.connected)
        .close("connectable");
    match &n.mac {
        Some(mac) => req.text("addressType", "manual").text("macAddress", mac),
        None => req.text("addressType", "generated"),
    };
    req.close("device");
}

/// A `VirtualDiskSpec` (copy) or `FileBackedVirtualDiskSpec` with a capacity (create).
fn disk_spec(req: &mut Request, tag: &str, to: Provisioning, capacity: Option<u64>) {
    let kind = if capacity.is_some() { "FileBackedVirtualDiskSpec" } else { "VirtualDiskSpec" };
    req.open(tag, Some(kind)).text("diskType", to.wire()).text("adapterType", "lsiLogic");
    if let Some(c) = capacity {
        req.text("capacityKb", c.div_ceil(1024));
    }
    req.close(tag);
}

/// Picks the one object called `want` among `items` (or the only one, when `want` is `None`);
/// otherwise an error naming what was not found and listing the choices.
fn choose<'a>(what: &str, want: Option<&str>, items: &[&'a ObjectContent]) -> Result<&'a ObjectContent, Error> {
    let name = |o: &ObjectContent| o.text("name").unwrap_or_default().to_owned();
    let mut names: Vec<String> = items.iter().map(|o| name(o)).collect();
    names.sort();
    let list = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
    let found: Vec<&ObjectContent> = match want {
        Some(w) => items.iter().copied().filter(|o| o.text("name") == Some(w)).collect(),
        None => items.to_vec(),
    };
    match (found.as_slice(), want) {
        ([one], _) => Ok(one),
        ([], Some(w)) => Err(Error::Config(format!("no {what} is called {w:?}; there are: {list}"))),
        (_, Some(w)) => Err(Error::Config(format!(
            "{} {what}s are called {w:?}: {}; name one more precisely",
            found.len(),
            found.iter().map(|o| o.obj.to_string()).collect::<Vec<_>>().join(", ")
        ))),
        (_, None) => Err(Error::Config(format!("there are {} {what}s ({list}); name one", found.len()))),
    }
}

fn moref_of(o: &ObjectContent, path: &str) -> Option<MoRef> {
    o.get(path).and_then(MoRef::from_element)
}

fn no_manager(what: &str) -> Error {
    Error::Protocol(format!("the server has no {what}"))
}

impl Client {
    /// Resolves a placement: the datacenter by name (`None`: the only one, else an error
    /// listing them); the host, cluster or resource pool by name (a host's or cluster's root
    /// pool; a pool named with a host or cluster is looked for in it; `None` for all three: the
    /// first host's, by name, compute resource's root pool, on that host); the folder by path
    /// under the datacenter's VM folder (`Restored/Web`; `None`: the VM folder itself). Errors
    /// name what was not found and list the choices.
    pub async fn placement(
        &self,
        datacenter: Option<&str>,
        host: Option<&str>,
        cluster: Option<&str>,
        pool: Option<&str>,
        folder: Option<&str>,
    ) -> Result<Placement, Error> {
        let dcs = self.inventory("Datacenter", &["name", "vmFolder"]).await?;
        let dc = choose("datacenter", datacenter, &dcs.iter().collect::<Vec<_>>())?;
        let dc_ref = dc.obj.clone();
        let vm_root =
            moref_of(dc, "vmFolder").ok_or_else(|| Error::Protocol(format!("datacenter {dc_ref} has no vmFolder")))?;

        let hosts = self.inventory_in(&dc_ref, "HostSystem", &["name", "parent"]).await?;
        let mut computes = self.inventory_in(&dc_ref, "ComputeResource", &["name", "resourcePool"]).await?;
        for c in self.inventory_in(&dc_ref, "ClusterComputeResource", &["name", "resourcePool"]).await? {
            if !computes.iter().any(|x| x.obj == c.obj) {
                computes.push(c);
            }
        }
        let clusters: Vec<&ObjectContent> =
            computes.iter().filter(|c| c.obj.kind == "ClusterComputeResource").collect();
        let cluster = match cluster {
            Some(c) => Some(choose("cluster", Some(c), &clusters)?),
            None => None,
        };
        let host = match host {
            Some(h) => Some(choose("host", Some(h), &hosts.iter().collect::<Vec<_>>())?),
            None if cluster.is_none() && pool.is_none() => {
                let mut sorted: Vec<&ObjectContent> = hosts.iter().collect();
                sorted.sort_by(|a, b| a.text("name").cmp(&b.text("name")));
                Some(*sorted.first().ok_or_else(|| Error::Config(format!("datacenter {dc_ref} has no host")))?)
            }
            None => None,
        };
        let compute: Option<MoRef> = match (host, cluster) {
            (Some(h), c) => {
                let parent = moref_of(h, "parent");
                if let Some(c) = c
                    && parent.as_ref() != Some(&c.obj)
                {
                    return Err(Error::Config(format!(
                        "host {:?} is not in cluster {:?}",
                        h.text("name").unwrap_or_default(),
                        c.text("name").unwrap_or_default()
                    )));
                }
                Some(parent.ok_or_else(|| Error::Protocol(format!("host {} has no parent", h.obj)))?)
            }
            (None, Some(c)) => Some(c.obj.clone()),
            (None, None) => None,
        };
        let pool_ref = match pool {
            Some(p) => {
                let pools = self.inventory_in(&dc_ref, "ResourcePool", &["name", "owner"]).await?;
                let inside: Vec<&ObjectContent> = pools
                    .iter()
                    .filter(|o| compute.is_none() || moref_of(o, "owner").as_ref() == compute.as_ref())
                    .collect();
                choose("resource pool", Some(p), &inside)?.obj.clone()
            }
            None => {
                let c = compute.as_ref().ok_or_else(|| Error::Protocol("no compute resource chosen".into()))?;
                let cr = computes
                    .iter()
                    .find(|x| &x.obj == c)
                    .ok_or_else(|| Error::Protocol(format!("the compute resource {c} is not in {dc_ref}")))?;
                moref_of(cr, "resourcePool").ok_or_else(|| Error::Protocol(format!("{c} has no resource pool")))?
            }
        };
        let vm_folder = match folder.map(|f| f.trim_matches('/')).filter(|f| !f.is_empty()) {
            Some(path) => self.folder_at(&vm_root, path).await?,
            None => vm_root,
        };
        Ok(Placement {
            datacenter_name: self.inventory_path(&dc_ref, dc.text("name").unwrap_or_default()).await?,
            datacenter: dc_ref,
            vm_folder,
            pool: pool_ref,
            host: host.map(|h| h.obj.clone()),
        })
    }

    /// The folder at `path` (`a/b`) under `root`, a step at a time; the first step not found
    /// is an error listing the folders there.
    async fn folder_at(&self, root: &MoRef, path: &str) -> Result<MoRef, Error> {
        let mut at = root.clone();
        for step in path.split('/') {
            let mut req = Request::new("FindChild", &self.content().search_index);
            req.moref("entity", &at).text("name", step);
            let child = self.invoke(req).await?.child("returnval").and_then(MoRef::from_element);
            match child {
                Some(c) if c.kind == "Folder" => at = c,
                _ => {
                    let children = self.property(&at, "childEntity").await?;
                    let folders: Vec<MoRef> = children
                        .iter()
                        .flat_map(|e| e.children.iter())
                        .filter_map(MoRef::from_element)
                        .filter(|m| m.kind == "Folder")
                        .collect();
                    let mut names = Vec::new();
                    if !folders.is_empty() {
                        let spec = FilterSpec {
                            kind: "Folder".into(),
                            paths: vec!["name".into()],
                            objects: Objects::List(folders),
                        };
                        names = self
                            .retrieve(&spec)
                            .await?
                            .iter()
                            .filter_map(|o| o.text("name").map(str::to_owned))
                            .collect();
                    }
                    names.sort();
                    let list = if names.is_empty() { "none".to_owned() } else { names.join(", ") };
                    return Err(Error::Config(format!(
                        "no VM folder {step:?} (of {path:?}); the folders there are: {list}"
                    )));
                }
            }
        }
        Ok(at)
    }

    /// The inventory path of a datacenter called `name`: its parent folders' names below the
    /// root folder, then its own.
    async fn inventory_path(&self, dc: &MoRef, name: &str) -> Result<String, Error> {
        let root = &self.content().root_folder;
        let mut parts = vec![name.to_owned()];
        let mut at = dc.clone();
        // Bounded: a folder loop on a broken server ends here, not in a hang.
        for _ in 0..64 {
            let Some(parent) = self.property(&at, "parent").await?.as_ref().and_then(MoRef::from_element) else {
                break;
            };
            if &parent == root {
                break;
            }
            let n = self.property(&parent, "name").await?.map(|e| e.text).unwrap_or_default();
            parts.push(n);
            at = parent;
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    /// The networks of `datacenter`, by name.
    pub async fn networks(&self, datacenter: &MoRef) -> Result<Vec<Network>, Error> {
        let list = self.property(datacenter, "network").await?;
        let morefs: Vec<MoRef> = list.iter().flat_map(|e| e.children.iter()).filter_map(MoRef::from_element).collect();
        let mut kinds: Vec<&str> = morefs.iter().map(|m| m.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut out = Vec::new();
        for kind in kinds {
            let objs = morefs.iter().filter(|m| m.kind == kind).cloned().collect();
            let spec = FilterSpec { kind: kind.to_owned(), paths: vec!["name".into()], objects: Objects::List(objs) };
            for o in self.retrieve(&spec).await? {
                out.push(Network { name: o.text("name").unwrap_or_default().to_owned(), moref: o.obj });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.moref.cmp(&b.moref)));
        Ok(out)
    }

    /// Creates a VM from `spec` (`Folder.CreateVM_Task`) and returns it.
    pub async fn create_vm(&self, placement: &Placement, spec: &VmSpec) -> Result<MoRef, Error> {
        let mut req = Request::new("CreateVM_Task", &placement.vm_folder);
        config_spec(&mut req, "config", spec);
        req.moref("pool", &placement.pool);
        if let Some(h) = &placement.host {
            req.moref("host", h);
        }
        self.task_moref(req, "CreateVM_Task").await
    }

    /// Registers the VM whose configuration is `vmx_path` (`[ds1] vm/vm.vmx`) as `name`
    /// (`Folder.RegisterVM_Task`) and returns it.
    pub async fn register_vm(&self, placement: &Placement, vmx_path: &str, name: &str) -> Result<MoRef, Error> {
        let mut req = Request::new("RegisterVM_Task", &placement.vm_folder);
        req.text("path", vmx_path).text("name", name).text("asTemplate", false).moref("pool", &placement.pool);
        if let Some(h) = &placement.host {
            req.moref("host", h);
        }
        self.task_moref(req, "RegisterVM_Task").await
    }

    async fn task_moref(&self, req: Request, what: &str) -> Result<MoRef, Error> {
        let this = req.this().clone();
        let result = self.run_task(req, None).await?;
        result
            .as_ref()
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol(format!("{what} on {this} finished without the new VM")))
    }

    /// Attaches an existing disk file to `vm` (`ReconfigVM_Task`, add, no `fileOperation`).
    pub async fn attach_disk(&self, vm: &MoRef, disk: &DiskSpec) -> Result<(), Error> {
        let mut req = Request::new("ReconfigVM_Task", vm);
        req.open("spec", None);
        device_change(&mut req, "add", None, |r| disk_device(r, disk));
        req.close("spec");
        self.run_task(req, None).await.map(|_| ())
    }

    /// Detaches disk `key` from `vm` (`ReconfigVM_Task`, remove), deleting its file too when
    /// `destroy_file` (`fileOperation` destroy). A key the VM has no disk with is an error.
    pub async fn detach_disk(&self, vm: &MoRef, key: i32, destroy_file: bool) -> Result<(), Error> {
        let hw = self.hardware(vm).await?;
        let disk = hw
            .disks
            .iter()
            .find(|d| d.key == key)
            .ok_or_else(|| Error::Config(format!("{vm} has no disk with key {key}")))?;
        let mut req = Request::new("ReconfigVM_Task", vm);
        req.open("spec", None);
        device_change(&mut req, "remove", destroy_file.then_some("destroy"), |r| disk_device(r, disk));
        req.close("spec");
        self.run_task(req, None).await.map(|_| ())
    }

    /// Replaces disks of `vm` in one `ReconfigVM_Task`: each `(old, new)` pair removes `old`
    /// (its file kept) and adds the existing file `new.file` at `old`'s controller and unit, so
    /// the VM has either every old disk or every new one. `new.key` is taken as given (a
    /// negative key lets the server choose).
    pub async fn swap_disks(&self, vm: &MoRef, pairs: &[(DiskSpec, DiskSpec)]) -> Result<(), Error> {
        let mut req = Request::new("ReconfigVM_Task", vm);
        req.open("spec", None);
        for (old, _) in pairs {
            device_change(&mut req, "remove", None, |r| disk_device(r, old));
        }
        for (old, new) in pairs {
            let new = DiskSpec { controller_key: old.controller_key, unit: old.unit, ..new.clone() };
            device_change(&mut req, "add", None, |r| disk_device(r, &new));
        }
        req.close("spec");
        self.run_task(req, None).await.map(|_| ())
    }

    /// Makes a datastore folder (`[ds1] a/b`) and its parents (`FileManager.MakeDirectory`).
    /// One that exists already is not an error.
    pub async fn make_directory(&self, ds_path: &str, datacenter: &MoRef) -> Result<(), Error> {
        let fm = self.content().file_manager.clone().ok_or_else(|| no_manager("file manager"))?;
        let mut req = Request::new("MakeDirectory", &fm);
        req.text("name", ds_path).moref("datacenter", datacenter).text("createParentDirectories", true);
        match self.invoke(req).await {
            Err(e) if e.fault().is_some_and(|f| f.type_name == "FileAlreadyExists") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Copies the virtual disk `src` to `dst` (`[ds1] vm/disk.vmdk`), converting it to `to`
    /// (`VirtualDiskManager.CopyVirtualDisk_Task` with a `destSpec`: a `VirtualDiskSpec`, the
    /// adapter type `lsiLogic`): how a hosted sparse upload becomes a VMFS disk. `cancel` asks
    /// the task to stop.
    ///
    /// vCenter does not implement `destSpec` (only ESXi does; govc sends none through
    /// vCenter, and vcsim as a vCenter answers `NotImplemented`): when the server refuses it
    /// so, the copy is made again without one, in the server's default format (thick for a
    /// sparse source), with a warning. Reach the host itself for a thin copy.
    pub async fn copy_virtual_disk(
        &self,
        src: &str,
        dst: &str,
        datacenter: &MoRef,
        to: Provisioning,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), Error> {
        let vdm = self.content().virtual_disk_manager.clone().ok_or_else(|| no_manager("virtual disk manager"))?;
        let request = |spec: bool| {
            let mut req = Request::new("CopyVirtualDisk_Task", &vdm);
            req.text("sourceName", src)
                .moref("sourceDatacenter", datacenter)
                .text("destName", dst)
                .moref("destDatacenter", datacenter);
            if spec {
                disk_spec(&mut req, "destSpec", to, None);
            }
            req
        };
        match self.run_task(request(true), cancel).await {
            Err(e) if e.fault().is_some_and(|f| f.kind == FaultKind::NotSupported) => {
                tracing::warn!(
                    "copying {src} to {dst}: the server does not take a disk type ({e}); copying in its default format, not {}",
                    to.wire()
                );
                self.run_task(request(false), cancel).await.map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// Creates an empty virtual disk of `capacity` bytes (rounded up to KiB) at `path`
    /// (`VirtualDiskManager.CreateVirtualDisk_Task`, adapter type `lsiLogic`).
    pub async fn create_virtual_disk(
        &self,
        path: &str,
        datacenter: &MoRef,
        capacity: u64,
        to: Provisioning,
    ) -> Result<(), Error> {
        let vdm = self.content().virtual_disk_manager.clone().ok_or_else(|| no_manager("virtual disk manager"))?;
        let mut req = Request::new("CreateVirtualDisk_Task", &vdm);
        req.text("name", path).moref("datacenter", datacenter);
        disk_spec(&mut req, "spec", to, Some(capacity));
        self.run_task(req, None).await.map(|_| ())
    }

    /// Deletes a virtual disk and its extents (`VirtualDiskManager.DeleteVirtualDisk_Task`).
    pub async fn delete_virtual_disk(&self, path: &str, datacenter: &MoRef) -> Result<(), Error> {
        let vdm = self.content().virtual_disk_manager.clone().ok_or_else(|| no_manager("virtual disk manager"))?;
        let mut req = Request::new("DeleteVirtualDisk_Task", &vdm);
        req.text("name", path).moref("datacenter", datacenter);
        self.run_task(req, None).await.map(|_| ())
    }

    /// Powers a VM on (`PowerOnVM_Task`).
    pub async fn power_on(&self, vm: &MoRef) -> Result<(), Error> {
        self.run_task(Request::new("PowerOnVM_Task", vm), None).await.map(|_| ())
    }

    /// Powers a VM off (`PowerOffVM_Task`), hard, without asking the guest.
    pub async fn power_off(&self, vm: &MoRef) -> Result<(), Error> {
        self.run_task(Request::new("PowerOffVM_Task", vm), None).await.map(|_| ())
    }

    /// Destroys an entity (`Destroy_Task`): a VM is unregistered and its files deleted.
    pub async fn destroy(&self, entity: &MoRef) -> Result<(), Error> {
        self.run_task(Request::new("Destroy_Task", entity), None).await.map(|_| ())
    }

    /// Removes a VM from the inventory, leaving its files (`UnregisterVM`).
    pub async fn unregister_vm(&self, vm: &MoRef) -> Result<(), Error> {
        self.invoke(Request::new("UnregisterVM", vm)).await.map(|_| ())
    }

    /// Renames an entity (`Rename_Task`).
    pub async fn rename(&self, entity: &MoRef, name: &str) -> Result<(), Error> {
        let mut req = Request::new("Rename_Task", entity);
        req.text("newName", name);
        self.run_task(req, None).await.map(|_| ())
    }

    /// What `vm` is configured with now.
    pub async fn hardware(&self, vm: &MoRef) -> Result<Hardware, Error> {
        let spec = FilterSpec {
            kind: "VirtualMachine".into(),
            paths: HARDWARE_PATHS.iter().map(|p| (*p).to_owned()).collect(),
            objects: Objects::List(vec![vm.clone()]),
        };
        let objs = self.retrieve(&spec).await?;
        let o = objs.first().ok_or_else(|| Error::Protocol(format!("{vm}: the server returned no properties")))?;
        // Without its devices this is not the VM's hardware: say why the server left them out.
        if o.get("config.hardware.device").is_none() {
            return Err(match o.missing.first() {
                Some((_, f)) => Error::Fault(Box::new(f.clone())),
                None => Error::Protocol(format!("{vm} has no config.hardware.device")),
            });
        }
        Ok(hardware_from(o))
    }
}

fn some(o: &ObjectContent, path: &str) -> Option<String> {
    crate::model::some_text(o.text(path))
}

/// A VM's [`Hardware`] from its properties ([`HARDWARE_PATHS`]); whatever is missing or
/// malformed is left out or zero, never a panic.
pub fn hardware_from(o: &ObjectContent) -> Hardware {
    let mut hw = Hardware {
        name: o.text("name").unwrap_or_default().to_owned(),
        guest_id: some(o, "config.guestId"),
        num_cpus: o.text("config.hardware.numCPU").and_then(|t| t.trim().parse().ok()).unwrap_or(0),
        memory_mb: o.text("config.hardware.memoryMB").and_then(|t| t.trim().parse().ok()).unwrap_or(0),
        firmware: o.text("config.firmware").and_then(Firmware::from_wire),
        hardware_version: some(o, "config.version"),
        uuid: some(o, "config.uuid"),
        instance_uuid: some(o, "config.instanceUuid"),
        controllers: Vec::new(),
        disks: Vec::new(),
        nics: Vec::new(),
    };
    let Some(devices) = o.get("config.hardware.device") else { return hw };
    for d in &devices.children {
        let Some(key) = d.parse_of::<i32>("key") else { continue };
        let kind = d.type_name();
        if let Some(kind) = ControllerKind::from_wire(kind) {
            hw.controllers.push(ControllerSpec { key, kind, bus: d.parse_of("busNumber").unwrap_or(-1) });
        } else if kind == "VirtualDisk" {
            hw.disks.push(disk_from(d, key));
        } else if let Some(kind) = NicKind::from_wire(kind) {
            hw.nics.push(nic_from(d, key, kind));
        }
    }
    hw
}

fn label_of(d: &Element) -> Option<String> {
    crate::model::some_text(d.child("deviceInfo").and_then(|i| i.text_of("label")))
}

fn disk_from(d: &Element, key: i32) -> DiskSpec {
    let capacity = d
        .parse_of::<u64>("capacityInBytes")
        .filter(|c| *c > 0)
        .or_else(|| d.parse_of::<u64>("capacityInKB").map(|k| k.saturating_mul(1024)))
        .unwrap_or(0);
    DiskSpec {
        key,
        controller_key: d.parse_of("controllerKey").unwrap_or(-1),
        unit: d.parse_of("unitNumber").unwrap_or(-1),
        capacity,
        file: d.child("backing").and_then(|b| b.text_of("fileName")).unwrap_or_default().trim().to_owned(),
        label: label_of(d),
    }
}

fn nic_from(d: &Element, key: i32, kind: NicKind) -> NicSpec {
    let b = d.child("backing");
    let name = b.and_then(|b| crate::model::some_text(b.text_of("deviceName")));
    let net = b.and_then(|b| b.child("network")).and_then(MoRef::from_element);
    let c = d.child("connectable");
    NicSpec {
        key,
        kind,
        network: name.zip(net),
        mac: crate::model::some_text(d.text_of("macAddress")),
        connected: c.and_then(|c| c.text_of("startConnected")).is_some_and(|t| t.trim() == "true"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::{Limits, parse};

    fn spec() -> VmSpec {
        VmSpec {
            name: "web <&> 'one'".into(),
            guest_id: "otherLinux64Guest".into(),
            hardware_version: Some("vmx-19".into()),
            num_cpus: 4,
            cores_per_socket: Some(2),
            memory_mb: 8192,
            firmware: Firmware::Efi,
            vm_path: "[ds1] web/web.vmx".into(),
            uuid: Some("4210aaaa-bbbb-cccc-dddd-eeeeffff0000".into()),
            instance_uuid: Some("5010aaaa-bbbb-cccc-dddd-eeeeffff0000".into()),
            controllers: vec![ControllerSpec { key: -100, kind: ControllerKind::Pvscsi, bus: 0 }],
            disks: vec![DiskSpec {
                key: -200,
                controller_key: -100,
                unit: 0,
                capacity: 10 << 30,
                file: "[ds1] web/disk & data.vmdk".into(),
                label: Some("Hard disk 1".into()),
            }],
            nics: vec![
                NicSpec {
                    key: -300,
                    kind: NicKind::Vmxnet3,
                    network: Some(("VM Network".into(), MoRef::new("Network", "network-7"))),
                    mac: Some("00:50:56:01:02:03".into()),
                    connected: false,
                },
                NicSpec { key: -301, kind: NicKind::E1000e, network: None, mac: None, connected: true },
            ],
            extra_config: vec![("guestinfo.note".into(), "a<b & c".into())],
        }
    }

    fn rendered(s: &VmSpec) -> String {
        let mut r = Request::new("CreateVM_Task", &MoRef::new("Folder", "group-v3"));
        config_spec(&mut r, "config", s);
        r.moref("pool", &MoRef::new("ResourcePool", "resgroup-1"));
        r.finish()
    }

    /// The names of `e`'s children in order.
    fn names(e: &Element) -> Vec<&str> {
        e.children.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn the_config_spec_follows_the_wsdl_order_and_types() {
        let xml = rendered(&spec());
        let root = parse(xml.as_bytes(), Limits::default()).unwrap();
        let call = root.path("Body.CreateVM_Task").unwrap();
        assert_eq!(names(call), ["_this", "config", "pool"]);
        let config = call.child("config").unwrap();
        assert_eq!(
            names(config),
            [
                "name",
                "version",
                "uuid",
                "instanceUuid",
                "guestId",
                "files",
                "numCPUs",
                "numCoresPerSocket",
                "memoryMB",
                "deviceChange",
                "deviceChange",
                "deviceChange",
                "deviceChange",
                "extraConfig",
                "firmware"
            ]
        );
        assert_eq!(config.text_of("name"), Some("web <&> 'one'"));
        assert_eq!(config.text_of("firmware"), Some("efi"));
        let changes: Vec<&Element> = config.children_named("deviceChange").collect();
        for c in &changes {
            assert_eq!(names(c), ["operation", "device"], "no fileOperation for existing files");
        }
        let ctl = changes[0].child("device").unwrap();
        assert_eq!(ctl.xsi_type.as_deref(), Some("ParaVirtualSCSIController"));
        assert_eq!(names(ctl), ["key", "busNumber", "sharedBus"]);
        assert_eq!(ctl.text_of("sharedBus"), Some("noSharing"));
        let disk = changes[1].child("device").unwrap();
        assert_eq!(disk.xsi_type.as_deref(), Some("VirtualDisk"));
        assert_eq!(
            names(disk),
            ["key", "deviceInfo", "backing", "controllerKey", "unitNumber", "capacityInKB", "capacityInBytes"]
        );
        let b = disk.child("backing").unwrap();
        assert_eq!(b.xsi_type.as_deref(), Some("VirtualDiskFlatVer2BackingInfo"));
        assert_eq!(names(b), ["fileName", "diskMode", "thinProvisioned"]);
        assert_eq!(b.text_of("fileName"), Some("[ds1] web/disk & data.vmdk"));
        assert_eq!(disk.text_of("capacityInKB"), Some("10485760"));
        let nic = changes[2].child("device").unwrap();
        assert_eq!(nic.xsi_type.as_deref(), Some("VirtualVmxnet3"));
        assert_eq!(names(nic), ["key", "backing", "connectable", "addressType", "macAddress"]);
        let nb = nic.child("backing").unwrap();
        assert_eq!(nb.xsi_type.as_deref(), Some("VirtualEthernetCardNetworkBackingInfo"));
        assert_eq!(names(nb), ["deviceName", "network"]);
        assert_eq!(nb.child("network").and_then(MoRef::from_element), Some(MoRef::new("Network", "network-7")));
        let conn = nic.child("connectable").unwrap();
        assert_eq!(names(conn), ["startConnected", "allowGuestControl", "connected"]);
        assert_eq!(nic.text_of("addressType"), Some("manual"));
        let plain = changes[3].child("device").unwrap();
        assert_eq!(names(plain), ["key", "connectable", "addressType"]);
        assert_eq!(plain.text_of("addressType"), Some("generated"));
        let extra = config.child("extraConfig").unwrap();
        assert_eq!(extra.xsi_type.as_deref(), Some("OptionValue"));
        let v = extra.child("value").unwrap();
        assert_eq!((v.xsi_type.as_deref(), v.text.as_str()), (Some("string"), "a<b & c"));
    }

    #[test]
    fn names_and_values_are_escaped() {
        let xml = rendered(&spec());
        assert!(xml.contains("<name>web &lt;&amp;&gt; &apos;one&apos;</name>"), "{xml}");
        assert!(xml.contains("<fileName>[ds1] web/disk &amp; data.vmdk</fileName>"), "{xml}");
        assert!(xml.contains(r#"<value xsi:type="xsd:string">a&lt;b &amp; c</value>"#), "{xml}");
        assert!(!xml.contains("web <&>"));
    }

    #[test]
    fn optional_fields_are_left_out_not_sent_empty() {
        let s = VmSpec {
            hardware_version: None,
            cores_per_socket: None,
            uuid: None,
            instance_uuid: None,
            controllers: Vec::new(),
            disks: Vec::new(),
            nics: Vec::new(),
            extra_config: Vec::new(),
            firmware: Firmware::Bios,
            ..spec()
        };
        let root = parse(rendered(&s).as_bytes(), Limits::default()).unwrap();
        let config = root.path("Body.CreateVM_Task.config").unwrap();
        assert_eq!(names(config), ["name", "guestId", "files", "numCPUs", "memoryMB", "firmware"]);
    }

    #[test]
    fn disk_specs_for_copy_and_create() {
        let mut r = Request::new("CopyVirtualDisk_Task", &MoRef::new("VirtualDiskManager", "vdm"));
        disk_spec(&mut r, "destSpec", Provisioning::Thin, None);
        disk_spec(&mut r, "spec", Provisioning::EagerZeroedThick, Some(1025));
        let xml = r.finish();
        assert!(
            xml.contains(
                r#"<destSpec xsi:type="VirtualDiskSpec"><diskType>thin</diskType><adapterType>lsiLogic</adapterType></destSpec>"#
            ),
            "{xml}"
        );
        assert!(xml.contains(r#"<spec xsi:type="FileBackedVirtualDiskSpec"><diskType>eagerZeroedThick</diskType><adapterType>lsiLogic</adapterType><capacityKb>2</capacityKb></spec>"#), "{xml}");
        assert_eq!(Provisioning::Thick.wire(), "preallocated");
    }

    fn object(devices: &str) -> ObjectContent {
        let doc =
            format!(r#"<val xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">{devices}</val>"#);
        let val = parse(doc.as_bytes(), Limits::default()).unwrap();
        let text = |t: &str| {
            let mut e = Element::new("val");
            e.text = t.into();
            e
        };
        ObjectContent {
            obj: MoRef::new("VirtualMachine", "vm-1"),
            props: vec![
                ("name".into(), text("web")),
                ("config.hardware.numCPU".into(), text("4")),
                ("config.hardware.memoryMB".into(), text("8192")),
                ("config.firmware".into(), text("efi")),
                ("config.hardware.device".into(), val),
            ],
            missing: Vec::new(),
        }
    }

    #[test]
    fn hardware_reads_controllers_disks_and_nics() {
        let hw = hardware_from(&object(
            r#"<VirtualDevice xsi:type="ParaVirtualSCSIController"><key>1000</key><busNumber>0</busNumber><sharedBus>noSharing</sharedBus></VirtualDevice>
            <VirtualDevice xsi:type="VirtualIDEController"><key>200</key><busNumber>0</busNumber></VirtualDevice>
            <VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>x</summary></deviceInfo>
              <backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web.vmdk</fileName></backing>
              <controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></VirtualDevice>
            <VirtualDevice xsi:type="VirtualVmxnet3"><key>4000</key>
              <backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName><network type="Network">network-7</network></backing>
              <connectable><startConnected>true</startConnected><connected>false</connected></connectable>
              <addressType>generated</addressType><macAddress>00:50:56:aa:bb:cc</macAddress></VirtualDevice>
            <VirtualDevice xsi:type="VirtualKeyboard"><key>600</key></VirtualDevice>"#,
        ));
        assert_eq!((hw.name.as_str(), hw.num_cpus, hw.memory_mb, hw.firmware), ("web", 4, 8192, Some(Firmware::Efi)));
        assert_eq!(
            hw.controllers,
            [
                ControllerSpec { key: 1000, kind: ControllerKind::Pvscsi, bus: 0 },
                ControllerSpec { key: 200, kind: ControllerKind::Ide, bus: 0 }
            ]
        );
        assert_eq!(
            hw.disks,
            [DiskSpec {
                key: 2000,
                controller_key: 1000,
                unit: 0,
                capacity: 1 << 20,
                file: "[ds1] web/web.vmdk".into(),
                label: Some("Hard disk 1".into())
            }]
        );
        assert_eq!(
            hw.nics,
            [NicSpec {
                key: 4000,
                kind: NicKind::Vmxnet3,
                network: Some(("VM Network".into(), MoRef::new("Network", "network-7"))),
                mac: Some("00:50:56:aa:bb:cc".into()),
                connected: true
            }]
        );
    }

    #[test]
    fn odd_hardware_never_panics() {
        for devices in [
            "",
            "<d/>",
            r#"<d xsi:type="VirtualDisk"/>"#,
            r#"<d xsi:type="VirtualDisk"><key>x</key></d>"#,
            r#"<d xsi:type="VirtualDisk"><key>99999999999</key></d>"#,
            r#"<d xsi:type="VirtualDisk"><key>1</key><capacityInKB>18446744073709551615</capacityInKB><backing/></d>"#,
            r#"<d xsi:type="VirtualVmxnet3"><key>1</key><backing><network>n</network></backing><connectable/></d>"#,
            r#"<d xsi:type="ParaVirtualSCSIController"><key>-1</key><busNumber>z</busNumber></d>"#,
        ] {
            let hw = hardware_from(&object(devices));
            assert!(hw.disks.len() + hw.nics.len() + hw.controllers.len() <= 1, "{devices}");
        }
        let big = hardware_from(&object(
            r#"<d xsi:type="VirtualDisk"><key>1</key><capacityInKB>18446744073709551615</capacityInKB></d>"#,
        ));
        assert_eq!(big.disks[0].capacity, u64::MAX);
        let empty = hardware_from(&ObjectContent {
            obj: MoRef::new("VirtualMachine", "vm-1"),
            props: Vec::new(),
            missing: Vec::new(),
        });
        assert_eq!((empty.name.as_str(), empty.num_cpus, empty.firmware), ("", 0, None));
    }

    #[test]
    fn wire_names_round_trip() {
        for (k, w) in CONTROLLERS {
            assert_eq!((k.wire(), ControllerKind::from_wire(w)), (w, Some(k)));
        }
        for (k, w) in NICS {
            assert_eq!((k.wire(), NicKind::from_wire(w)), (w, Some(k)));
        }
        assert_eq!(ControllerKind::from_wire("VirtualSCSIController"), None);
        assert_eq!(Firmware::from_wire(" efi "), Some(Firmware::Efi));
    }
}
