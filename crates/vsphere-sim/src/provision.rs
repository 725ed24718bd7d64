//! What a restore into vSphere does to the simulator: folders and pools, making VMs from a
//! config spec or a registered `.vmx`, adding and removing their devices, power, destroying,
//! unregistering and renaming them, datastore folders, and virtual disks made, copied (a
//! hosted sparse upload into a thin VMFS disk) and deleted. Every call checks the privileges
//! vSphere checks for it against the configured denials.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vsphere::{DiskMode, MoRef, PowerState, ToolsRunningStatus};

use crate::devices::{Controller, DISK_BASE_KEY, NIC_BASE_KEY, Nic, generated_mac, valid_mac};
use crate::spec::{Device, DeviceChange, DiskDevice, FileOp, NicDevice, Op, VmSpec, invalid_device};
use crate::world::{DiskState, SimFault, Track, VmState, World, ctk_name, descriptor, now_nanos, uuid_of};

/// A resource pool: a cluster's or a standalone host's root pool.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    pub(crate) moref: MoRef,
    pub(crate) dc: usize,
    /// The cluster or compute resource that owns it.
    pub(crate) owner: MoRef,
    /// Its hosts (indexes into the world's hosts).
    pub(crate) hosts: Vec<usize>,
}

/// A disk a device change adds.
#[derive(Debug)]
struct NewDisk {
    key: i32,
    controller_key: i32,
    unit: i32,
    ds: usize,
    base: String,
    flat: String,
    capacity: u64,
    mode: DiskMode,
    /// The files are made (`fileOperation` create), not found.
    create: bool,
}

impl NewDisk {
    /// A disk's files; its key and slot are set once planned.
    fn at(ds: usize, base: String, flat: String, capacity: u64, create: bool) -> Self {
        Self { key: 0, controller_key: 0, unit: 0, ds, base, flat, capacity, mode: DiskMode::Persistent, create }
    }
}

/// A checked set of device changes, not yet carried out.
#[derive(Debug, Default)]
struct Plan {
    controllers: Vec<Controller>,
    nics: Vec<Nic>,
    /// Disk keys to detach, and whether their files go too.
    remove: Vec<(i32, bool)>,
    add: Vec<NewDisk>,
}

/// Where a VM's own files go: its datastore and folder in it.
#[derive(Debug, Clone)]
struct Home {
    dc: usize,
    ds: usize,
    dir: String,
    name: String,
}

fn file_fault(kind: &str, file: &str) -> SimFault {
    let message = match kind {
        "FileAlreadyExists" => {
            format!("Cannot complete the operation because the file or folder {file} already exists")
        }
        "FileNotFound" => format!("File {file} was not found"),
        "FileLocked" => format!("Unable to access file {file} since it is locked"),
        _ => format!("Error caused by file {file}"),
    };
    SimFault::new(kind, message)
}

fn io_fault(path: &Path, e: &std::io::Error) -> SimFault {
    SimFault::new("FileFault", format!("{}: {e}", path.display()))
}

fn power_fault(requested: PowerState, existing: &PowerState) -> SimFault {
    SimFault::new("InvalidPowerState", "The attempted operation cannot be performed in the current state.").with_detail(
        format!(
            "<requestedState>{}</requestedState><existingState>{}</existingState>",
            requested.as_str(),
            existing.as_str()
        ),
    )
}

impl World {
    pub(crate) fn esx(&self) -> bool {
        self.cfg.api_type == "HostAgent"
    }

    /// A datacenter's VM folder.
    pub(crate) fn vm_folder(&self, dc: usize) -> MoRef {
        if self.esx() {
            MoRef::new("Folder", "ha-folder-vm")
        } else {
            MoRef::new("Folder", &format!("group-v{}", dc + 1))
        }
    }

    /// A datacenter's host folder.
    pub(crate) fn host_folder(&self, dc: usize) -> MoRef {
        if self.esx() {
            MoRef::new("Folder", "ha-folder-host")
        } else {
            MoRef::new("Folder", &format!("group-h{}", dc + 1))
        }
    }

    /// The datacenter whose VM folder `folder` is.
    pub(crate) fn folder_dc(&self, folder: &MoRef) -> Option<usize> {
        (0..self.datacenters.len()).find(|&dc| self.vm_folder(dc) == *folder)
    }

    /// The compute resource of a datacenter's hosts outside clusters.
    pub(crate) fn standalone_resource(&self, dc: usize) -> MoRef {
        MoRef::new("ComputeResource", &format!("domain-s{dc}"))
    }

    /// Every resource pool: one per cluster, one per datacenter for its hosts outside clusters.
    pub(crate) fn pools(&self) -> Vec<Pool> {
        let mut out = Vec::new();
        for dc in 0..self.datacenters.len() {
            let clustered = |h: usize| self.clusters.iter().any(|c| c.hosts.contains(&self.hosts[h].moref));
            let alone: Vec<usize> =
                (0..self.hosts.len()).filter(|&h| self.hosts[h].dc == dc && !clustered(h)).collect();
            if !alone.is_empty() {
                let id = if self.esx() { "ha-root-pool".to_owned() } else { format!("resgroup-s{dc}") };
                out.push(Pool {
                    moref: MoRef::new("ResourcePool", &id),
                    dc,
                    owner: self.standalone_resource(dc),
                    hosts: alone,
                });
            }
        }
        for (ci, c) in self.clusters.iter().enumerate() {
            let hosts: Vec<usize> = (0..self.hosts.len()).filter(|&h| c.hosts.contains(&self.hosts[h].moref)).collect();
            let dc = hosts.first().map_or(0, |&h| self.hosts[h].dc);
            out.push(Pool {
                moref: MoRef::new("ResourcePool", &format!("resgroup-c{ci}")),
                dc,
                owner: c.moref.clone(),
                hosts,
            });
        }
        out
    }

    /// The root pool a host's VMs run in.
    pub(crate) fn pool_of_host(&self, host: usize) -> MoRef {
        self.pools()
            .into_iter()
            .find(|p| p.hosts.contains(&host))
            .map_or_else(|| MoRef::new("ResourcePool", "resgroup-none"), |p| p.moref)
    }

    /// `NoPermission` unless the account holds `privilege` on `entity`.
    pub(crate) fn require(&self, entity: &MoRef, privilege: &str) -> Result<(), SimFault> {
        let name = self.entity_name(entity);
        let denied = self.cfg.denied.iter().any(|d| {
            (d.entity == "*" || Some(&d.entity) == name.as_ref()) && d.privileges.iter().any(|p| p == privilege)
        });
        if denied {
            return Err(SimFault::new("NoPermission", "Permission to perform this operation was denied.").with_detail(
                format!(
                    r#"<object type="{}">{}</object><privilegeId>{privilege}</privilegeId>"#,
                    vsphere::xml::escape(&entity.kind),
                    vsphere::xml::escape(&entity.value)
                ),
            ));
        }
        Ok(())
    }

    /// `[ds] path` (or `[ds]`) in datacenter `dc` (any, when none is named): the datastore and
    /// the path inside it (empty for the datastore's root).
    pub(crate) fn resolve_ds_path(&self, path: &str, dc: Option<usize>) -> Result<(usize, String), SimFault> {
        let bad = || SimFault::new("InvalidDatastorePath", format!("Invalid datastore path '{path}'"));
        let rest = path.trim().strip_prefix('[').ok_or_else(bad)?;
        let (ds, rel) = rest.split_once(']').ok_or_else(bad)?;
        let rel = rel.trim().trim_end_matches('/');
        if !rel.is_empty() && rel.split('/').any(|c| c.is_empty() || c == ".." || c == "." || c.starts_with('.')) {
            return Err(bad());
        }
        let dsi = self
            .datastores
            .iter()
            .position(|d| d.name == ds && dc.is_none_or(|dc| d.dc == dc))
            .ok_or_else(|| SimFault::new("InvalidDatastore", format!("no datastore {ds}")))?;
        Ok((dsi, rel.to_owned()))
    }

    fn dc_of(&self, datacenter: Option<&MoRef>) -> Result<Option<usize>, SimFault> {
        datacenter
            .map(|m| {
                self.datacenters
                    .iter()
                    .position(|d| d.moref == *m)
                    .ok_or_else(|| SimFault::new("ManagedObjectNotFound", format!("no datacenter {}", m.value)))
            })
            .transpose()
    }

    /// `FileManager.MakeDirectory`.
    pub(crate) fn make_directory(&self, name: &str, dc: Option<&MoRef>, parents: bool) -> Result<(), SimFault> {
        let (ds, rel) = self.resolve_ds_path(name, self.dc_of(dc)?)?;
        self.require(&self.datastores[ds].moref, "Datastore.FileManagement")?;
        let path = self.ds_path(ds, &rel);
        if rel.is_empty() || (path.exists() && !parents) {
            return Err(file_fault("FileAlreadyExists", name));
        }
        if parents {
            std::fs::create_dir_all(&path).map_err(|e| io_fault(&path, &e))
        } else {
            std::fs::create_dir(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => file_fault("FileNotFound", name),
                _ => io_fault(&path, &e),
            })
        }
    }

    /// `Folder.CreateVM_Task` (`register`: None) or `Folder.RegisterVM_Task` (the `.vmx`, which
    /// is kept as it is).
    pub(crate) fn create_vm(
        &mut self,
        folder: &MoRef,
        spec: VmSpec,
        pool: &MoRef,
        host: Option<&MoRef>,
        register: Option<(usize, String)>,
    ) -> Result<MoRef, SimFault> {
        let dc = self.folder_dc(folder).ok_or_else(|| {
            SimFault::new("NotSupported", format!("{} is not a datacenter's VM folder", folder.value))
        })?;
        let privilege =
            if register.is_some() { "VirtualMachine.Inventory.Register" } else { "VirtualMachine.Inventory.Create" };
        self.require(folder, privilege)?;
        let p =
            self.pools().into_iter().find(|p| p.moref == *pool && p.dc == dc).ok_or_else(|| {
                SimFault::new("ManagedObjectNotFound", format!("no resource pool {} here", pool.value))
            })?;
        self.require(pool, "Resource.AssignVMToPool")?;
        let host = match host {
            Some(h) => p.hosts.iter().copied().find(|&i| self.hosts[i].moref == *h).ok_or_else(|| {
                SimFault::new("InvalidArgument", format!("host {} is not in pool {}", h.value, pool.value))
                    .with_detail("<invalidProperty>host</invalidProperty>")
            })?,
            None => p.hosts.first().copied().ok_or_else(|| SimFault::new("InvalidArgument", "the pool has no host"))?,
        };
        let name = spec.name.clone().filter(|n| !n.trim().is_empty()).ok_or_else(|| {
            SimFault::new("InvalidArgument", "a VM needs a name").with_detail("<invalidProperty>name</invalidProperty>")
        })?;
        if self.vms.iter().any(|v| v.dc == dc && v.name == name) {
            return Err(SimFault::new("DuplicateName", format!("The name '{name}' already exists."))
                .with_detail(format!("<name>{}</name>{}", vsphere::xml::escape(&name), folder_xml(folder))));
        }
        let hardware = spec.version.clone().unwrap_or_else(|| "vmx-19".into());
        if hardware.strip_prefix("vmx-").is_none_or(|n| n.parse::<u32>().is_err()) {
            return Err(SimFault::new("InvalidArgument", format!("version {hardware:?}"))
                .with_detail("<invalidProperty>version</invalidProperty>"));
        }
        let registering = register.is_some();
        let (vmx_ds, vmx) = match register {
            Some(r) => r,
            None => {
                let path = spec.vm_path.as_deref().ok_or_else(|| {
                    SimFault::new("InvalidArgument", "files.vmPathName is required")
                        .with_detail("<invalidProperty>files.vmPathName</invalidProperty>")
                })?;
                let (ds, rel) = self.resolve_ds_path(path, Some(dc))?;
                let vmx = if rel.is_empty() {
                    format!("{name}/{name}.vmx")
                } else if rel.ends_with(".vmx") {
                    rel
                } else {
                    format!("{rel}/{name}.vmx")
                };
                if self.ds_path(ds, &vmx).exists() {
                    return Err(file_fault("FileAlreadyExists", &format!("[{}] {vmx}", self.datastores[ds].name)));
                }
                self.require(&self.datastores[ds].moref, "Datastore.AllocateSpace")?;
                (ds, vmx)
            }
        };
        if self.vms.iter().any(|v| v.vmx == (vmx_ds, vmx.clone())) {
            return Err(SimFault::new(
                "AlreadyExists",
                format!("[{}] {vmx} is registered", self.datastores[vmx_ds].name),
            )
            .with_detail(format!("<name>{}</name>", vsphere::xml::escape(&vmx))));
        }
        let dir = vmx.rsplit_once('/').map_or(String::new(), |(d, _)| d.to_owned());
        let home = Home { dc, ds: vmx_ds, dir, name: name.clone() };
        let plan = self.plan(folder, &home, &[], &[], &[], &spec.devices)?;
        let n = self.id();
        let instance_uuid = spec
            .instance_uuid
            .clone()
            .filter(|u| !self.vms.iter().any(|v| v.instance_uuid == *u))
            .unwrap_or_else(|| uuid_of(n, now_nanos() ^ 3));
        let moref = MoRef::new("VirtualMachine", &if self.esx() { n.to_string() } else { format!("vm-{n}") });
        let dir_path = self.ds_path(vmx_ds, &home.dir);
        std::fs::create_dir_all(&dir_path).map_err(|e| io_fault(&dir_path, &e))?;
        self.push_vm(VmState {
            moref: moref.clone(),
            name,
            dc,
            host,
            uuid: spec.uuid.clone().unwrap_or_else(|| uuid_of(n, now_nanos() ^ 2)),
            instance_uuid,
            power: PowerState::PoweredOff,
            hardware,
            cbt: false,
            tools: ToolsRunningStatus::NotRunning,
            guest: spec.guest_id.clone().unwrap_or_else(|| "otherGuest".into()),
            key_id: None,
            usb: 0,
            pci: 0,
            disks: Vec::new(),
            snapshots: Vec::new(),
            current: None,
            consolidation_needed: false,
            api_made: true,
            guest_password: None,
            guest_runs: Vec::new(),
            controllers: Vec::new(),
            nics: Vec::new(),
            num_cpus: spec.num_cpus.unwrap_or(1).max(1),
            cores_per_socket: spec.cores_per_socket,
            memory_mb: spec.memory_mb.unwrap_or(1024),
            firmware: spec.firmware.clone().unwrap_or_else(|| "bios".into()),
            extra_config: spec.extra_config.clone(),
            vmx: (vmx_ds, vmx),
            pool: pool.clone(),
        });
        let vi = self.vms.len() - 1;
        if let Err(f) = self.apply(vi, plan) {
            self.remove_vm(vi);
            return Err(f);
        }
        if spec.change_tracking == Some(true) {
            self.set_cbt(vi, true);
        }
        if !registering {
            self.write_vmx(vi)?;
        }
        Ok(moref)
    }

    /// `Folder.RegisterVM_Task`: the `.vmx` at `path`, read (see [`crate::vmx`]), as a VM.
    pub(crate) fn register_vm(
        &mut self,
        folder: &MoRef,
        path: &str,
        name: Option<&str>,
        pool: &MoRef,
        host: Option<&MoRef>,
    ) -> Result<MoRef, SimFault> {
        let dc = self.folder_dc(folder);
        let (ds, rel) = self.resolve_ds_path(path, dc)?;
        if !rel.ends_with(".vmx") {
            return Err(SimFault::new("InvalidArgument", format!("{path} is not a .vmx"))
                .with_detail("<invalidProperty>path</invalidProperty>"));
        }
        let file = self.ds_path(ds, &rel);
        let text = File::open(&file)
            .and_then(|f| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::Read::take(f, crate::vmx::MAX_VMX), &mut s).map(|_| s)
            })
            .map_err(|_| file_fault("FileNotFound", path))?;
        let x = crate::vmx::Vmx::parse(&text).map_err(|e| SimFault::new("InvalidVmConfig", format!("{path}: {e}")))?;
        let dir = rel.rsplit_once('/').map_or("", |(d, _)| d);
        let mut spec = crate::vmx::to_spec(&x, &self.datastores[ds].name, dir)?;
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            spec.name = Some(n.to_owned());
        }
        if spec.name.is_none() {
            spec.name = Path::new(&rel).file_stem().and_then(|s| s.to_str()).map(str::to_owned);
        }
        self.create_vm(folder, spec, pool, host, Some((ds, rel)))
    }

    /// `ReconfigVM_Task`'s device changes and hardware fields.
    pub(crate) fn reconfigure_vm(&mut self, vi: usize, spec: &VmSpec) -> Result<(), SimFault> {
        let v = &self.vms[vi];
        if !spec.devices.is_empty() {
            if !v.snapshots.is_empty() {
                return Err(SimFault::new(
                    "InvalidState",
                    "the simulator changes no devices of a VM with snapshots (remove them first)",
                ));
            }
            let home = Home {
                dc: v.dc,
                ds: v.vmx.0,
                dir: v.vmx.1.rsplit_once('/').map_or(String::new(), |(d, _)| d.to_owned()),
                name: v.name.clone(),
            };
            let disks: Vec<(i32, i32, i32)> = v.disks.iter().map(|d| (d.key, d.controller_key, d.unit)).collect();
            let plan = self.plan(&v.moref, &home, &v.controllers, &disks, &v.nics, &spec.devices)?;
            self.apply(vi, plan)?;
        }
        let v = &mut self.vms[vi];
        if let Some(n) = spec.num_cpus {
            v.num_cpus = n.max(1);
        }
        if let Some(m) = spec.memory_mb {
            v.memory_mb = m;
        }
        for (k, val) in &spec.extra_config {
            v.extra_config.retain(|(x, _)| x != k);
            if !val.is_empty() {
                v.extra_config.push((k.clone(), val.clone()));
            }
        }
        if let Some(on) = spec.change_tracking {
            self.set_cbt(vi, on);
        }
        self.write_vmx(vi)
    }

    /// Rewrites an API-made VM's `.vmx` from its configuration.
    fn write_vmx(&self, vi: usize) -> Result<(), SimFault> {
        let v = &self.vms[vi];
        if !v.api_made {
            return Ok(());
        }
        let path = self.ds_path(v.vmx.0, &v.vmx.1);
        std::fs::write(&path, crate::vmx::render(self, v)).map_err(|e| io_fault(&path, &e))
    }

    /// Checks device changes against a VM's devices (`controllers`, disks as `(key,
    /// controller key, unit)`, `nics`) and works out what they make, without touching
    /// anything. Privileges are checked on `entity` (the VM, or the folder it is made in).
    fn plan(
        &self,
        entity: &MoRef,
        home: &Home,
        controllers: &[Controller],
        disks: &[(i32, i32, i32)],
        nics: &[Nic],
        changes: &[DeviceChange],
    ) -> Result<Plan, SimFault> {
        let mut plan = Plan { controllers: controllers.to_vec(), nics: nics.to_vec(), ..Plan::default() };
        let mut slots: Vec<(i32, i32, i32)> = disks.to_vec();
        let mut used: HashSet<i32> = controllers
            .iter()
            .map(|c| c.key)
            .chain(disks.iter().map(|d| d.0))
            .chain(nics.iter().map(|n| n.key))
            .collect();
        let mut keymap: HashMap<i32, i32> = HashMap::new();
        let mut files: HashSet<(usize, String)> = HashSet::new();
        let assign = |wanted: i32, base: i32, used: &mut HashSet<i32>, keymap: &mut HashMap<i32, i32>| {
            let key = if wanted > 0 && !used.contains(&wanted) {
                wanted
            } else {
                (base..).find(|k| !used.contains(k)).unwrap_or(base)
            };
            used.insert(key);
            keymap.insert(wanted, key);
            key
        };
        // Controllers first: disks name them by their (temporary) keys.
        let mut ordered: Vec<&DeviceChange> = changes.iter().collect();
        ordered.sort_by_key(|c| !(c.op == Op::Add && matches!(c.device, Device::Controller { .. })));
        let mut mac_seed = self.next_id_hint();
        for ch in ordered {
            let i = ch.index;
            match (ch.op, &ch.device) {
                (Op::Add, Device::Controller { key, kind, bus }) => {
                    if plan.controllers.iter().any(|c| c.kind.bus() == kind.bus() && c.bus == *bus) {
                        return Err(invalid_device(i, format!("{}{bus} exists already", kind.bus())));
                    }
                    let real = assign(*key, kind.base_key() + bus, &mut used, &mut keymap);
                    plan.controllers.push(Controller { key: real, kind: *kind, bus: *bus });
                }
                (Op::Add, Device::Disk(d)) => {
                    let ck = d.controller_key.ok_or_else(|| invalid_device(i, "a disk needs a controllerKey"))?;
                    let ck = keymap.get(&ck).copied().unwrap_or(ck);
                    let ctrl = plan
                        .controllers
                        .iter()
                        .find(|c| c.key == ck)
                        .ok_or_else(|| invalid_device(i, format!("no controller {ck}")))?;
                    let taken = |u: i32| slots.iter().any(|s| s.1 == ck && s.2 == u);
                    let unit = match d.unit {
                        Some(u) if !ctrl.kind.disk_unit(u) || taken(u) => {
                            return Err(invalid_device(i, format!("unit {u} of controller {ck} is not free")));
                        }
                        Some(u) => u,
                        None => (0..30)
                            .find(|&u| ctrl.kind.disk_unit(u) && !taken(u))
                            .ok_or_else(|| invalid_device(i, format!("controller {ck} is full")))?,
                    };
                    let mut disk = match ch.file_op {
                        Some(FileOp::Create) => {
                            self.require(entity, "VirtualMachine.Config.AddNewDisk")?;
                            self.plan_new_disk(i, home, d, &files)?
                        }
                        None => {
                            self.require(entity, "VirtualMachine.Config.AddExistingDisk")?;
                            self.existing_disk(home.dc, &d.file_name)?
                        }
                        Some(_) => return Err(invalid_device(i, "a disk is added with fileOperation create or none")),
                    };
                    if !files.insert((disk.ds, disk.base.clone())) {
                        return Err(invalid_device(i, format!("{} is added twice", d.file_name)));
                    }
                    disk.key = assign(d.key, DISK_BASE_KEY, &mut used, &mut keymap);
                    disk.controller_key = ck;
                    disk.unit = unit;
                    disk.mode = DiskMode::parse(d.mode.as_deref().unwrap_or("persistent"));
                    slots.push((disk.key, ck, unit));
                    plan.add.push(disk);
                }
                (Op::Add, Device::Nic(n)) => {
                    let key = assign(n.key, NIC_BASE_KEY, &mut used, &mut keymap);
                    mac_seed += 1;
                    let nic = self.plan_nic(i, home.dc, key, n, None, mac_seed)?;
                    plan.nics.push(nic);
                }
                (Op::Edit, Device::Nic(n)) => {
                    self.require(entity, "VirtualMachine.Config.EditDevice")?;
                    let at = plan
                        .nics
                        .iter()
                        .position(|x| x.key == n.key)
                        .ok_or_else(|| invalid_device(i, format!("no network adapter {}", n.key)))?;
                    plan.nics[at] = self.plan_nic(i, home.dc, n.key, n, Some(&plan.nics[at]), 0)?;
                }
                (Op::Edit, dev) => {
                    return Err(SimFault::new(
                        "NotSupported",
                        format!("the simulator edits network adapters only, not device {}", dev.key()),
                    ));
                }
                (Op::Remove, dev) => {
                    let key = dev.key();
                    if let Some(at) = slots.iter().position(|s| s.0 == key) {
                        self.require(entity, "VirtualMachine.Config.RemoveDisk")?;
                        slots.remove(at);
                        plan.add.retain(|d| d.key != key);
                        plan.remove.push((key, ch.file_op == Some(FileOp::Destroy)));
                    } else if let Some(at) = plan.nics.iter().position(|n| n.key == key) {
                        self.require(entity, "VirtualMachine.Config.EditDevice")?;
                        plan.nics.remove(at);
                    } else if let Some(at) = plan.controllers.iter().position(|c| c.key == key) {
                        if slots.iter().any(|s| s.1 == key) {
                            return Err(invalid_device(i, format!("controller {key} still has disks")));
                        }
                        plan.controllers.remove(at);
                    } else {
                        return Err(invalid_device(i, format!("no device {key}")));
                    }
                }
            }
        }
        Ok(plan)
    }

    /// A hint for generated MACs: differs between calls.
    fn next_id_hint(&self) -> u64 {
        now_nanos() ^ (self.vms.len() as u64).wrapping_mul(0x1000_0001)
    }

    /// Where a disk made by `fileOperation` create goes: the `fileName` asked for, or (empty,
    /// or just `[ds]`) `<vm>.vmdk`, `<vm>_1.vmdk`... in the VM's folder as vSphere names them.
    fn plan_new_disk(
        &self,
        i: usize,
        home: &Home,
        d: &DiskDevice,
        planned: &HashSet<(usize, String)>,
    ) -> Result<NewDisk, SimFault> {
        let capacity = d.capacity.filter(|c| c % 512 == 0).ok_or_else(|| {
            invalid_device(i, "a new disk needs a capacity (capacityInBytes or capacityInKB), a multiple of 512 bytes")
        })?;
        let (ds, base) = if d.file_name.trim().is_empty() {
            (home.ds, String::new())
        } else {
            self.resolve_ds_path(&d.file_name, Some(home.dc))?
        };
        let base = if base.is_empty() {
            let dir = if ds == home.ds { home.dir.clone() } else { home.name.clone() };
            let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
            (0..)
                .map(|k| {
                    if k == 0 {
                        format!("{prefix}{}.vmdk", home.name)
                    } else {
                        format!("{prefix}{}_{k}.vmdk", home.name)
                    }
                })
                .find(|b| !self.ds_path(ds, b).exists() && !planned.contains(&(ds, b.clone())))
                .unwrap_or_default()
        } else if base.ends_with(".vmdk") {
            base
        } else {
            return Err(invalid_device(i, format!("{} does not name a .vmdk", d.file_name)));
        };
        let name = format!("[{}] {base}", self.datastores[ds].name);
        if self.ds_path(ds, &base).exists() {
            return Err(file_fault("FileAlreadyExists", &name));
        }
        self.require(&self.datastores[ds].moref, "Datastore.AllocateSpace")?;
        let flat = format!("{}-flat.vmdk", base.strip_suffix(".vmdk").unwrap_or(&base));
        Ok(NewDisk::at(ds, base, flat, capacity, true))
    }

    /// An existing disk, as a VM would be given it: a VMFS (or flat) descriptor over one
    /// extent file on the same datastore. A hosted sparse disk is refused here (ESXi would
    /// refuse to power it on): convert it with `CopyVirtualDisk_Task` first.
    fn existing_disk(&self, dc: usize, file_name: &str) -> Result<NewDisk, SimFault> {
        let (ds, base) = self.resolve_ds_path(file_name, Some(dc))?;
        let path = self.ds_path(ds, &base);
        if base.is_empty() || !path.is_file() {
            return Err(file_fault("FileNotFound", file_name));
        }
        let disk = vmdk::Disk::open(&path, vmdk::PathPolicy::SameDirectory)
            .map_err(|e| SimFault::new("InvalidDiskFormat", format!("{file_name}: {e}")))?;
        let layer = &disk.layers()[0];
        let flat = match (disk.layers().len(), layer.extents.as_slice()) {
            (1, [e]) if matches!(e.kind, vmdk::ExtentKind::Vmfs | vmdk::ExtentKind::Flat) && e.start == 0 => {
                e.file.clone()
            }
            _ => None,
        };
        let flat = flat.filter(|f| f != &path).ok_or_else(|| {
            SimFault::new(
                "InvalidDiskFormat",
                format!(
                    "{file_name} ({}) is not a VMFS disk: copy it with CopyVirtualDisk_Task first",
                    layer.create_type
                ),
            )
        })?;
        let root = self.ds_path(ds, "");
        let flat = flat
            .strip_prefix(&root)
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_owned)
            .ok_or_else(|| SimFault::new("InvalidDiskFormat", format!("{file_name}: its extent is elsewhere")))?;
        Ok(NewDisk::at(ds, base, flat, disk.capacity(), false))
    }

    /// A network adapter as asked (`was`: the one being edited).
    fn plan_nic(
        &self,
        i: usize,
        dc: usize,
        key: i32,
        n: &NicDevice,
        was: Option<&Nic>,
        seed: u64,
    ) -> Result<Nic, SimFault> {
        let network = match &n.network {
            None => was.and_then(|w| w.network),
            Some((name, moref)) => {
                let at = self
                    .networks
                    .iter()
                    .position(|x| x.dc == dc && (moref.as_ref() == Some(&x.moref) || (moref.is_none() && x.name == *name)))
                    .ok_or_else(|| {
                        SimFault::new("InvalidDeviceBacking", format!("no network {name:?} in this datacenter")).with_detail(
                            format!(
                                "<property>virtualMachineConfigSpec.deviceChange[{i}].device.backing</property><deviceIndex>{i}</deviceIndex>"
                            ),
                        )
                    })?;
                self.require(&self.networks[at].moref, "Network.Assign")?;
                Some(at)
            }
        };
        let (mac, address_type) = match was {
            Some(w) => (w.mac.clone(), w.address_type.clone()),
            None => {
                let t = n.address_type.clone().unwrap_or_else(|| "generated".into());
                if t.eq_ignore_ascii_case("manual") {
                    let mac = n.mac.clone().filter(|m| valid_mac(m)).ok_or_else(|| {
                        invalid_device(i, format!("a manual address needs a MAC address, not {:?}", n.mac))
                    })?;
                    (mac.to_ascii_lowercase(), t)
                } else {
                    (generated_mac(seed), t)
                }
            }
        };
        let c = n.connectable;
        Ok(Nic {
            key,
            kind: was.map_or(n.kind, |w| w.kind),
            mac,
            address_type,
            network,
            start_connected: c.map_or(was.is_some_and(|w| w.start_connected), |c| c.start_connected),
            connected: c.map_or(was.is_some_and(|w| w.connected), |c| c.connected),
            allow_guest_control: c.map_or(was.is_none_or(|w| w.allow_guest_control), |c| c.allow_guest_control),
        })
    }

    /// Carries out a plan on VM `vi`.
    fn apply(&mut self, vi: usize, plan: Plan) -> Result<(), SimFault> {
        for (key, destroy) in &plan.remove {
            let Some(at) = self.vms[vi].disks.iter().position(|d| d.key == *key) else { continue };
            let d = self.vms[vi].disks.remove(at);
            if *destroy {
                for f in [&d.base_name, &d.flat_name, &ctk_name(&d.base_name)] {
                    let _ = std::fs::remove_file(self.ds_path(d.ds, f));
                }
            }
        }
        let cbt = self.vms[vi].cbt;
        for nd in plan.add {
            if nd.create {
                let flat = self.ds_path(nd.ds, &nd.flat);
                let desc = self.ds_path(nd.ds, &nd.base);
                if let Some(parent) = desc.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io_fault(parent, &e))?;
                }
                File::create_new(&flat).and_then(|f| f.set_len(nd.capacity)).map_err(|e| io_fault(&flat, &e))?;
                let stem = Path::new(&nd.base).file_stem().and_then(|s| s.to_str()).unwrap_or("disk").to_owned();
                std::fs::write(&desc, descriptor(&stem, nd.capacity)).map_err(|e| io_fault(&desc, &e))?;
            }
            let n = self.id();
            let track = cbt.then(|| Track::new(n));
            if track.is_some() {
                let _ = std::fs::write(self.ds_path(nd.ds, &ctk_name(&nd.base)), b"change tracking\n");
            }
            self.vms[vi].disks.push(DiskState {
                key: nd.key,
                controller_key: nd.controller_key,
                unit: nd.unit,
                capacity: nd.capacity,
                ds: nd.ds,
                mode: nd.mode,
                backing: "flat".into(),
                sharing: "sharingNone".into(),
                base_name: nd.base,
                flat_name: nd.flat,
                track,
                parked: None,
            });
        }
        let v = &mut self.vms[vi];
        v.controllers = plan.controllers;
        v.nics = plan.nics;
        v.disks.sort_by_key(|d| (d.controller_key, d.unit));
        Ok(())
    }

    /// `PowerOnVM_Task` / `PowerOffVM_Task`.
    pub(crate) fn set_power_api(&mut self, vi: usize, on: bool) -> Result<(), SimFault> {
        let (want, privilege) = if on {
            (PowerState::PoweredOn, "VirtualMachine.Interact.PowerOn")
        } else {
            (PowerState::PoweredOff, "VirtualMachine.Interact.PowerOff")
        };
        self.require(&self.vms[vi].moref, privilege)?;
        let v = &mut self.vms[vi];
        if v.power == want {
            return Err(power_fault(if on { PowerState::PoweredOff } else { PowerState::PoweredOn }, &v.power));
        }
        v.power = want;
        for n in &mut v.nics {
            n.connected = on && n.start_connected;
        }
        Ok(())
    }

    /// `Destroy_Task` on a VM: off the inventory, and its files deleted (disks, deltas, change
    /// tracking, `.vmx`, `.nvram`; its folder too once empty).
    pub(crate) fn destroy_vm(&mut self, vi: usize) -> Result<(), SimFault> {
        self.require(&self.vms[vi].moref, "VirtualMachine.Inventory.Delete")?;
        if self.vms[vi].power != PowerState::PoweredOff {
            return Err(power_fault(PowerState::PoweredOff, &self.vms[vi].power));
        }
        for s in std::mem::take(&mut self.vms[vi].snapshots) {
            for d in s.disks {
                let _ = std::fs::remove_file(d.frozen);
            }
        }
        self.vms[vi].current = None;
        self.write_deltas(vi).map_err(|e| SimFault::new("FileFault", e.to_string()))?;
        self.discard_vm(vi);
        Ok(())
    }

    /// Takes VM `vi` off the inventory and deletes its files (its folder too once empty),
    /// with no checks: what `Destroy_Task` ends with, and what an aborted import leaves.
    pub(crate) fn discard_vm(&mut self, vi: usize) {
        let v = self.remove_vm(vi);
        for d in &v.disks {
            for f in [&d.base_name, &d.flat_name, &ctk_name(&d.base_name)] {
                let _ = std::fs::remove_file(self.ds_path(d.ds, f));
            }
        }
        let vmx = self.ds_path(v.vmx.0, &v.vmx.1);
        let _ = std::fs::remove_file(vmx.with_extension("nvram"));
        let _ = std::fs::remove_file(&vmx);
        if let Some(dir) = vmx.parent().filter(|d| *d != self.ds_path(v.vmx.0, "")) {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// `UnregisterVM`: off the inventory, files kept.
    pub(crate) fn unregister_vm(&mut self, vi: usize) -> Result<(), SimFault> {
        self.require(&self.vms[vi].moref, "VirtualMachine.Inventory.Unregister")?;
        if self.vms[vi].power != PowerState::PoweredOff {
            return Err(power_fault(PowerState::PoweredOff, &self.vms[vi].power));
        }
        self.remove_vm(vi);
        Ok(())
    }

    /// `Rename_Task` on a VM (its display name; files keep their names, as on vSphere).
    pub(crate) fn rename_vm(&mut self, vi: usize, name: &str) -> Result<(), SimFault> {
        self.require(&self.vms[vi].moref, "VirtualMachine.Config.Rename")?;
        let name = name.trim();
        if name.is_empty() || name.len() > 80 {
            return Err(SimFault::new("InvalidName", format!("{name:?} cannot name a VM"))
                .with_detail(format!("<name>{}</name>", vsphere::xml::escape(name))));
        }
        let dc = self.vms[vi].dc;
        if self.vms.iter().enumerate().any(|(i, v)| i != vi && v.dc == dc && v.name == name) {
            return Err(SimFault::new("DuplicateName", format!("The name '{name}' already exists.")).with_detail(
                format!("<name>{}</name>{}", vsphere::xml::escape(name), folder_xml(&self.vm_folder(dc))),
            ));
        }
        self.vms[vi].name = name.to_owned();
        self.write_vmx(vi)
    }

    /// The virtual disk `[ds] path.vmdk` in `dc`, to make: its descriptor and flat paths.
    fn new_disk_paths(
        &self,
        name: &str,
        dc: Option<&MoRef>,
        force: bool,
    ) -> Result<(usize, PathBuf, PathBuf), SimFault> {
        let (ds, rel) = self.resolve_ds_path(name, self.dc_of(dc)?)?;
        self.require(&self.datastores[ds].moref, "Datastore.FileManagement")?;
        self.require(&self.datastores[ds].moref, "Datastore.AllocateSpace")?;
        let stem = rel
            .strip_suffix(".vmdk")
            .ok_or_else(|| SimFault::new("InvalidDatastorePath", format!("{name} does not name a .vmdk")))?;
        let (desc, flat) = (self.ds_path(ds, &rel), self.ds_path(ds, &format!("{stem}-flat.vmdk")));
        if !desc.parent().is_some_and(Path::is_dir) {
            return Err(file_fault("FileNotFound", name));
        }
        if desc.exists() && !force {
            return Err(file_fault("FileAlreadyExists", name));
        }
        if self.vms.iter().flat_map(|v| &v.disks).any(|d| d.ds == ds && d.base_name == rel) {
            return Err(file_fault("FileLocked", name));
        }
        Ok((ds, desc, flat))
    }

    /// `VirtualDiskManager.CreateVirtualDisk_Task`: an empty thin disk (every `diskType` is
    /// made thin: the simulator keeps no preallocated disks).
    pub(crate) fn create_virtual_disk(&self, name: &str, dc: Option<&MoRef>, capacity: u64) -> Result<(), SimFault> {
        if capacity == 0 || !capacity.is_multiple_of(512) {
            return Err(SimFault::new("InvalidArgument", format!("capacity {capacity} bytes"))
                .with_detail("<invalidProperty>spec.capacityKb</invalidProperty>"));
        }
        let (_, desc, flat) = self.new_disk_paths(name, dc, false)?;
        write_flat_disk(&desc, &flat, capacity, |_| Ok(()))
    }

    /// `VirtualDiskManager.CopyVirtualDisk_Task`: any disk the `vmdk` crate reads (a hosted
    /// sparse upload, a flat or VMFS descriptor) into a thin VMFS disk, holes kept: only
    /// allocated, non-zero data is written.
    pub(crate) fn copy_virtual_disk(
        &self,
        source: &str,
        source_dc: Option<&MoRef>,
        dest: &str,
        dest_dc: Option<&MoRef>,
        force: bool,
    ) -> Result<(), SimFault> {
        let (sds, srel) = self.resolve_ds_path(source, self.dc_of(source_dc)?)?;
        self.require(&self.datastores[sds].moref, "Datastore.FileManagement")?;
        let spath = self.ds_path(sds, &srel);
        if srel.is_empty() || !spath.is_file() {
            return Err(file_fault("FileNotFound", source));
        }
        let disk = vmdk::Disk::open(&spath, vmdk::PathPolicy::SameDirectory)
            .map_err(|e| SimFault::new("InvalidDiskFormat", format!("{source}: {e}")))?;
        let (_, desc, flat) = self.new_disk_paths(dest, dest_dc.or(source_dc), force)?;
        if desc == spath {
            return Err(file_fault("FileAlreadyExists", dest));
        }
        let data = disk.allocation().map_err(|e| SimFault::new("InvalidDiskFormat", format!("{source}: {e}")))?.data;
        write_flat_disk(&desc, &flat, disk.capacity(), |out| {
            const PIECE: usize = 1 << 20;
            const GRAIN: usize = 64 << 10;
            let mut buf = vec![0u8; PIECE];
            for e in data.clamp(disk.capacity()).iter() {
                let mut at = e.start();
                while at < e.end() {
                    let n = usize::try_from(e.end() - at).map_or(PIECE, |left| left.min(PIECE));
                    disk.read_at(&mut buf[..n], at)
                        .map_err(|e| SimFault::new("InvalidDiskFormat", format!("{source}: {e}")))?;
                    for (k, g) in buf[..n].chunks(GRAIN).enumerate() {
                        if g.iter().any(|&b| b != 0) {
                            let off = at + (k * GRAIN) as u64;
                            out.write_all_at(g, off).map_err(|e| io_fault(&flat, &e))?;
                        }
                    }
                    at += n as u64;
                }
            }
            Ok(())
        })
    }

    /// `VirtualDiskManager.DeleteVirtualDisk_Task`: the descriptor and its extents (and change
    /// tracking file). A disk a VM has is locked.
    pub(crate) fn delete_virtual_disk(&self, name: &str, dc: Option<&MoRef>) -> Result<(), SimFault> {
        let (ds, rel) = self.resolve_ds_path(name, self.dc_of(dc)?)?;
        self.require(&self.datastores[ds].moref, "Datastore.FileManagement")?;
        let path = self.ds_path(ds, &rel);
        if rel.is_empty() || !path.is_file() {
            return Err(file_fault("FileNotFound", name));
        }
        if self.vms.iter().flat_map(|v| &v.disks).any(|d| d.ds == ds && (d.base_name == rel || d.flat_name == rel)) {
            return Err(file_fault("FileLocked", name));
        }
        let disk = vmdk::Disk::open(&path, vmdk::PathPolicy::SameDirectory)
            .map_err(|e| SimFault::new("InvalidDiskFormat", format!("{name}: {e}")))?;
        let mut files: Vec<PathBuf> = disk.layers()[0].extents.iter().filter_map(|e| e.file.clone()).collect();
        files.push(self.ds_path(ds, &ctk_name(&rel)));
        files.push(path);
        for f in files {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// Takes VM `vi` off the inventory.
    fn remove_vm(&mut self, vi: usize) -> VmState {
        let v = self.vms.remove(vi);
        self.reindex_vms();
        v
    }
}

fn folder_xml(folder: &MoRef) -> String {
    format!(r#"<object type="Folder">{}</object>"#, vsphere::xml::escape(&folder.value))
}

/// Writes a thin VMFS disk: the descriptor `desc` over the sparse `flat` of `capacity` bytes,
/// whose data `fill` writes. Nothing is left of it when `fill` fails.
fn write_flat_disk(
    desc: &Path,
    flat: &Path,
    capacity: u64,
    fill: impl FnOnce(&File) -> Result<(), SimFault>,
) -> Result<(), SimFault> {
    let out = File::create(flat).and_then(|f| f.set_len(0).and(f.set_len(capacity)).map(|()| f));
    let out = out.map_err(|e| io_fault(flat, &e))?;
    let stem = desc.file_stem().and_then(|s| s.to_str()).unwrap_or("disk").to_owned();
    let done = fill(&out)
        .and_then(|()| out.sync_all().map_err(|e| io_fault(flat, &e)))
        .and_then(|()| std::fs::write(desc, descriptor(&stem, capacity)).map_err(|e| io_fault(desc, &e)));
    if done.is_err() {
        let _ = std::fs::remove_file(flat);
        let _ = std::fs::remove_file(desc);
    }
    done
}
