//! The simulator's state and how it behaves like ESXi where backup cares: real sparse disk
//! files, writes that CBT tracks in blocks, snapshots that freeze a readable view and advance
//! the change ID, epochs that change when CBT is reset, `QueryChangedDiskAreas` in windows with
//! `*` for allocated areas, and the faults a test can inject.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cbt::{Extent, ExtentSet};
use vsphere::{DiskMode, DrsBehavior, MoRef, PowerState, ToolsRunningStatus};

use crate::SimError;
use crate::config::{Config, ControllerKind};
use crate::devices::{Controller, CtrlKind, Nic};

/// A fault the simulator answers with: its type and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFault {
    /// The fault type (`FileFault`, `InvalidArgument`).
    pub kind: String,
    /// The message.
    pub message: String,
    /// The fault's own fields as XML (`<file>...</file>`); empty: the usual ones for its kind.
    pub detail: String,
}

impl SimFault {
    /// A fault.
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self { kind: kind.to_owned(), message: message.into(), detail: String::new() }
    }

    /// The same fault with these fields (XML, in WSDL order).
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// Faults a test switches on; each says how long it lasts.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next authenticated call finds every session gone (`NotAuthenticated`).
    pub expire_sessions: bool,
    /// The next task fails with this fault.
    pub fail_next_task: Option<SimFault>,
    /// Every `QueryChangedDiskAreas` fails with a `FileFault`, as after a CBT reset ESXi does.
    pub qcda_file_fault: bool,
    /// Every SOAP answer is this late.
    pub delay: Duration,
    /// Every datastore request (`/folder`) is this late: slow storage.
    pub datastore_delay: Duration,
    /// The next this many datastore requests are answered 503 (host busy).
    pub http_503: u32,
    /// Datastore reads ignore `Range` and answer 200 with the whole file, as some proxies do.
    pub ignore_range: bool,
    /// Tasks run this long before they finish (so they can be watched and cancelled).
    pub task_delay: Duration,
    /// `WaitForUpdatesEx` does not exist (clients must poll).
    pub no_wait_for_updates: bool,
    /// The next snapshot removal leaves `consolidationNeeded` set.
    pub leave_consolidation: bool,
    /// The answer to the next call of this method (`CreateSnapshot_Task`) comes this late,
    /// after the call was carried out: a client that gives up meanwhile does not learn that it
    /// was.
    pub late_answer: Option<(String, Duration)>,
    /// The next snapshot gets the change IDs of the one before (sequence numbers do not
    /// advance), as after a vCenter restart that restored an older tracking state.
    pub repeat_change_id: bool,
}

#[derive(Debug)]
pub(crate) struct Track {
    pub(crate) epoch: [u8; 16],
    pub(crate) seq: u64,
    /// Changes that made each sequence number: `(seq, blocks changed since seq - 1)`.
    pub(crate) history: Vec<(u64, ExtentSet)>,
    pub(crate) pending: ExtentSet,
    /// Enabled while snapshots existed: ESXi then under-reports silently (reference 2.8).
    pub(crate) unreliable: bool,
}

impl Track {
    pub(crate) fn new(n: u64) -> Self {
        let mut epoch = [0u8; 16];
        let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ now_nanos();
        for b in &mut epoch {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
        Self { epoch, seq: 0, history: Vec::new(), pending: ExtentSet::new(), unreliable: false }
    }

    pub(crate) fn epoch_text(&self) -> String {
        let h: Vec<String> = self.epoch.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{}", h[..8].join(" "), h[8..].join(" "))
    }

    pub(crate) fn change_id(&self) -> String {
        format!("{}/{}", self.epoch_text(), self.seq)
    }
}

pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0))
        .unwrap_or(0)
}

/// The server's clock as ISO 8601.
/// The descriptor of a VMFS flat disk `<stem>.vmdk` over `<stem>-flat.vmdk`.
pub(crate) fn descriptor(stem: &str, capacity: u64) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\nRW {} VMFS \"{stem}-flat.vmdk\"\n",
        capacity / 512
    )
}

pub(crate) fn iso_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[derive(Debug)]
pub(crate) struct DiskState {
    pub(crate) key: i32,
    /// The key of the controller it hangs on.
    pub(crate) controller_key: i32,
    pub(crate) unit: i32,
    pub(crate) capacity: u64,
    pub(crate) ds: usize,
    pub(crate) mode: DiskMode,
    pub(crate) backing: String,
    pub(crate) sharing: String,
    /// `vm/vm.vmdk`, inside the datastore.
    pub(crate) base_name: String,
    /// `vm/vm-flat.vmdk`, inside the datastore: the live data.
    pub(crate) flat_name: String,
    pub(crate) track: Option<Track>,
    /// The tracking a powered-off VM's `-ctk.vmdk` still holds after CBT was turned off: turned
    /// on again with that file in place, ESXi carries on with it (the reason a reset deletes it).
    pub(crate) parked: Option<Track>,
}

#[derive(Debug)]
pub(crate) struct SnapDisk {
    pub(crate) key: i32,
    pub(crate) frozen: PathBuf,
    pub(crate) change_id: Option<String>,
    pub(crate) seq: u64,
    pub(crate) file_name: String,
}

#[derive(Debug)]
pub(crate) struct SnapRec {
    pub(crate) moref: MoRef,
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) create_time: String,
    pub(crate) quiesced: bool,
    pub(crate) parent: Option<MoRef>,
    pub(crate) disks: Vec<SnapDisk>,
}

#[derive(Debug)]
pub(crate) struct VmState {
    pub(crate) moref: MoRef,
    pub(crate) name: String,
    pub(crate) dc: usize,
    pub(crate) host: usize,
    pub(crate) uuid: String,
    pub(crate) instance_uuid: String,
    pub(crate) power: PowerState,
    pub(crate) hardware: String,
    pub(crate) cbt: bool,
    pub(crate) tools: ToolsRunningStatus,
    pub(crate) guest: String,
    pub(crate) key_id: Option<String>,
    pub(crate) usb: u32,
    pub(crate) pci: u32,
    pub(crate) disks: Vec<DiskState>,
    pub(crate) snapshots: Vec<SnapRec>,
    pub(crate) current: Option<MoRef>,
    pub(crate) consolidation_needed: bool,
    /// Made through the API (`CreateVM_Task`, `RegisterVM_Task`): its `.vmx` follows its
    /// configuration. A configured VM's `.vmx` stays as the estate wrote it.
    pub(crate) api_made: bool,
    pub(crate) guest_password: Option<String>,
    /// Programs started in the guest, in order.
    pub(crate) guest_runs: Vec<GuestRun>,
    /// Disk controllers (a configured VM has one).
    pub(crate) controllers: Vec<Controller>,
    pub(crate) nics: Vec<Nic>,
    pub(crate) num_cpus: u32,
    pub(crate) cores_per_socket: Option<u32>,
    pub(crate) memory_mb: u64,
    /// `bios` or `efi`.
    pub(crate) firmware: String,
    /// `config.extraConfig` as set through the API.
    pub(crate) extra_config: Vec<(String, String)>,
    /// The `.vmx`: its datastore and its path there (`vm/vm.vmx`).
    pub(crate) vmx: (usize, String),
    /// The resource pool it runs in.
    pub(crate) pool: MoRef,
}

/// A program started in a guest through the guest operations API.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Its pid.
    pub pid: i64,
    /// The program's path.
    pub program: String,
    /// Its arguments.
    pub arguments: String,
    /// When it ends (or ended).
    pub(crate) ends: SystemTime,
    /// Its exit code once ended.
    pub exit_code: i32,
    /// Terminated before its end.
    pub terminated: bool,
}

#[derive(Debug)]
pub(crate) struct Named {
    pub(crate) moref: MoRef,
    pub(crate) name: String,
    pub(crate) dc: usize,
    pub(crate) extra: String,
}

/// A cluster: its hosts, DRS, and per-VM DRS overrides.
#[derive(Debug, Clone)]
pub(crate) struct ClusterState {
    pub(crate) moref: MoRef,
    pub(crate) name: String,
    pub(crate) hosts: Vec<MoRef>,
    pub(crate) drs: bool,
    pub(crate) behavior: DrsBehavior,
    /// `(vm, enabled, behavior)`.
    pub(crate) overrides: Vec<(MoRef, Option<bool>, Option<DrsBehavior>)>,
}

#[derive(Debug, Clone)]
pub(crate) struct TaskRec {
    pub(crate) moref: MoRef,
    pub(crate) description: String,
    pub(crate) entity: MoRef,
    pub(crate) state: &'static str,
    pub(crate) result: Option<MoRef>,
    pub(crate) error: Option<SimFault>,
    pub(crate) cancelled: bool,
}

/// One `WaitForUpdatesEx` collector: what it watches and what it has told.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    /// Filter ID -> the objects it watches.
    pub(crate) filters: HashMap<String, Vec<MoRef>>,
    pub(crate) told: HashMap<String, &'static str>,
    pub(crate) version: u64,
}

#[derive(Debug)]
pub(crate) struct World {
    pub(crate) cfg: Config,
    pub(crate) root: PathBuf,
    pub(crate) instance_uuid: String,
    next: u64,
    pub(crate) sessions: HashSet<String>,
    pub(crate) datacenters: Vec<Named>,
    pub(crate) hosts: Vec<Named>,
    pub(crate) datastores: Vec<Named>,
    pub(crate) clusters: Vec<ClusterState>,
    /// Standard port groups (`extra`: unused).
    pub(crate) networks: Vec<Named>,
    pub(crate) vms: Vec<VmState>,
    /// VM moref value -> index in `vms`, rebuilt when a VM is removed.
    vm_ids: HashMap<String, usize>,
    /// Container view -> the managed object types it lists (its members are looked up live,
    /// as a server's views follow the inventory).
    pub(crate) views: HashMap<String, Vec<String>>,
    pub(crate) tasks: HashMap<String, TaskRec>,
    pub(crate) collectors: HashMap<String, Collector>,
    /// Token -> the objects still to send, and the page size the client asked for.
    pub(crate) pages: HashMap<String, (Vec<String>, usize)>,
    pub(crate) faults: Faults,
    pub(crate) calls: u64,
    /// The server's certificate (PEM), reported as every host's.
    pub(crate) cert_pem: Option<String>,
    /// The server certificate's SHA-1 thumbprint (`AB:CD:...`), empty without TLS.
    pub(crate) thumbprint: String,
    /// `https` or `http`, and the address listened on: what NFC device URLs name when a
    /// request carries no `Host`.
    pub(crate) endpoint: (&'static str, String),
    /// NFC leases by moref value, finished ones kept (calls on them fault `InvalidState`).
    pub(crate) leases: HashMap<String, crate::nfc::Lease>,
}

pub(crate) fn uuid_of(n: u64, salt: u64) -> String {
    let a = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
    let b = a.rotate_left(17).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

impl World {
    pub(crate) fn new(cfg: Config, root: &Path) -> Result<Self, SimError> {
        cfg.check()?;
        let salt = now_nanos();
        let mut w = Self {
            instance_uuid: uuid_of(1, salt),
            root: root.to_path_buf(),
            next: 100,
            sessions: HashSet::new(),
            clusters: Vec::new(),
            datacenters: Vec::new(),
            hosts: Vec::new(),
            datastores: Vec::new(),
            networks: Vec::new(),
            vms: Vec::new(),
            vm_ids: HashMap::new(),
            views: HashMap::new(),
            tasks: HashMap::new(),
            collectors: HashMap::new(),
            pages: HashMap::new(),
            faults: Faults::default(),
            calls: 0,
            cert_pem: None,
            thumbprint: String::new(),
            endpoint: ("https", "127.0.0.1".into()),
            leases: HashMap::new(),
            cfg: cfg.clone(),
        };
        let esx = cfg.api_type == "HostAgent";
        for (di, dc) in cfg.datacenters.iter().enumerate() {
            let dc_ref = if esx { "ha-datacenter".to_owned() } else { format!("datacenter-{}", w.id()) };
            w.datacenters.push(Named {
                moref: MoRef::new("Datacenter", &dc_ref),
                name: dc.name.clone(),
                dc: di,
                extra: String::new(),
            });
            for h in &dc.hosts {
                let id = if esx { "ha-host".to_owned() } else { format!("host-{}", w.id()) };
                w.hosts.push(Named {
                    moref: MoRef::new("HostSystem", &id),
                    name: h.name.clone(),
                    dc: di,
                    extra: h.version.clone(),
                });
            }
            for c in &dc.clusters {
                let id = format!("domain-c{}", w.id());
                let hosts = w
                    .hosts
                    .iter()
                    .filter(|h| h.dc == di && c.hosts.contains(&h.name))
                    .map(|h| h.moref.clone())
                    .collect();
                w.clusters.push(ClusterState {
                    moref: MoRef::new("ClusterComputeResource", &id),
                    name: c.name.clone(),
                    hosts,
                    drs: c.drs,
                    behavior: c.behavior.clone(),
                    overrides: Vec::new(),
                });
            }
            let default_network = [crate::config::NetworkConfig { name: "VM Network".into() }];
            let networks = if dc.networks.is_empty() { &default_network[..] } else { &dc.networks };
            for n in networks {
                let id = if esx { format!("HaNetwork-{}", n.name) } else { format!("network-{}", w.id()) };
                w.networks.push(Named {
                    moref: MoRef::new("Network", &id),
                    name: n.name.clone(),
                    dc: di,
                    extra: String::new(),
                });
            }
            for d in &dc.datastores {
                let dir = root.join(&d.name);
                std::fs::create_dir_all(&dir).map_err(|e| SimError::io(&dir, e))?;
                let id = format!("datastore-{}", w.id());
                w.datastores.push(Named {
                    moref: MoRef::new("Datastore", &id),
                    name: d.name.clone(),
                    dc: di,
                    extra: d.kind.clone(),
                });
            }
            for v in &dc.vms {
                let n = w.id();
                let host = v
                    .host
                    .as_ref()
                    .and_then(|h| w.hosts.iter().position(|x| x.dc == di && &x.name == h))
                    .or_else(|| w.hosts.iter().position(|x| x.dc == di))
                    .unwrap_or(0);
                let moref = MoRef::new("VirtualMachine", &if esx { n.to_string() } else { format!("vm-{n}") });
                let kind = v.controller.map_or(CtrlKind::Pvscsi, CtrlKind::from);
                let ctrl = Controller { key: kind.base_key(), kind, bus: 0 };
                let mut disks = Vec::new();
                for (i, d) in v.disks.iter().enumerate() {
                    let ds = d
                        .datastore
                        .as_ref()
                        .and_then(|name| w.datastores.iter().position(|x| x.dc == di && &x.name == name))
                        .or_else(|| w.datastores.iter().position(|x| x.dc == di))
                        .unwrap_or(0);
                    let stem = if i == 0 { v.name.clone() } else { format!("{}_{i}", v.name) };
                    let base_name = format!("{}/{stem}.vmdk", v.name);
                    let flat_name = format!("{}/{stem}-flat.vmdk", v.name);
                    let dir = root.join(&w.datastores[ds].name).join(&v.name);
                    std::fs::create_dir_all(&dir).map_err(|e| SimError::io(&dir, e))?;
                    let flat = root.join(&w.datastores[ds].name).join(&flat_name);
                    let f = File::create(&flat).map_err(|e| SimError::io(&flat, e))?;
                    let capacity = match &d.image {
                        Some(image) => fill_from_image(&f, image, d.capacity).map_err(|e| {
                            SimError::Config(format!("{}: disk image {}: {e}", v.name, image.display()))
                        })?,
                        None => d.capacity,
                    };
                    f.set_len(capacity).map_err(|e| SimError::io(&flat, e))?;
                    let dpath = root.join(&w.datastores[ds].name).join(&base_name);
                    std::fs::write(&dpath, descriptor(&stem, capacity)).map_err(|e| SimError::io(&dpath, e))?;
                    // Unit 7 is a SCSI controller's own.
                    let di = i32::try_from(i).map_err(|_| SimError::Config(format!("{}: too many disks", v.name)))?;
                    let unit = if di >= 7 && v.controller != Some(ControllerKind::Sata) { di + 1 } else { di };
                    let tracked = v.cbt && d.backing != "rdm-physical";
                    disks.push(DiskState {
                        key: 2000 + di,
                        controller_key: ctrl.key,
                        unit,
                        capacity,
                        ds,
                        mode: d.mode.clone(),
                        backing: d.backing.clone(),
                        sharing: d.sharing.clone(),
                        base_name,
                        flat_name,
                        track: tracked.then(|| Track::new(n * 31 + i as u64)),
                        parked: None,
                    });
                    if tracked {
                        let ctk = root.join(&w.datastores[ds].name).join(ctk_name(&disks[disks.len() - 1].base_name));
                        std::fs::write(&ctk, b"change tracking\n").map_err(|e| SimError::io(&ctk, e))?;
                    }
                }
                // The VM's configuration file, as a backup captures it.
                if let Some(first) = disks.first() {
                    let vmx = root.join(&w.datastores[first.ds].name).join(&v.name).join(format!("{}.vmx", v.name));
                    let mut text = format!(
                        ".encoding = \"UTF-8\"\ndisplayName = \"{}\"\nvirtualHW.version = \"{}\"\n",
                        v.name,
                        v.hardware.trim_start_matches("vmx-")
                    );
                    let bus = v.controller.map_or("scsi", ControllerKind::bus);
                    if let Some(c) = v.controller {
                        text.push_str(&format!("{bus}0.present = \"TRUE\"\n"));
                        if let Some(dev) = c.virtual_dev() {
                            text.push_str(&format!("{bus}0.virtualDev = \"{dev}\"\n"));
                        }
                    }
                    for d in &disks {
                        if v.controller.is_some() {
                            text.push_str(&format!("{bus}0:{}.present = \"TRUE\"\n", d.unit));
                        }
                        text.push_str(&format!(
                            "{bus}0:{}.fileName = \"{}\"\n",
                            d.unit,
                            d.base_name.rsplit('/').next().unwrap_or("")
                        ));
                    }
                    if let Some(extra) = &v.vmx_extra {
                        text.push_str(extra);
                        if !extra.ends_with('\n') {
                            text.push('\n');
                        }
                    }
                    std::fs::write(&vmx, text).map_err(|e| SimError::io(&vmx, e))?;
                    // Its firmware settings (the BIOS or EFI variables), beside it.
                    let nvram = vmx.with_extension("nvram");
                    std::fs::write(&nvram, format!("NVRAM of {}\n", v.name)).map_err(|e| SimError::io(&nvram, e))?;
                }
                let firmware = v
                    .vmx_extra
                    .as_deref()
                    .and_then(|x| crate::vmx::Vmx::parse(x).ok())
                    .and_then(|x| x.get("firmware").map(str::to_owned))
                    .unwrap_or_else(|| "bios".into());
                let vmx = (disks.first().map_or(0, |d| d.ds), format!("{0}/{0}.vmx", v.name));
                let pool = w.pool_of_host(host);
                w.push_vm(VmState {
                    moref,
                    name: v.name.clone(),
                    dc: di,
                    host,
                    uuid: uuid_of(n, salt ^ 2),
                    instance_uuid: uuid_of(n, salt ^ 3),
                    power: v.power.clone(),
                    hardware: v.hardware.clone(),
                    cbt: v.cbt,
                    tools: v.tools.clone(),
                    guest: v.guest.clone(),
                    key_id: v.encrypted.then(|| format!("key-{n}")),
                    usb: v.usb,
                    pci: v.pci,
                    disks,
                    snapshots: Vec::new(),
                    current: None,
                    consolidation_needed: false,
                    api_made: false,
                    guest_password: v.guest_password.clone(),
                    guest_runs: Vec::new(),
                    controllers: vec![ctrl],
                    nics: Vec::new(),
                    num_cpus: 2,
                    cores_per_socket: None,
                    memory_mb: 4096,
                    firmware,
                    extra_config: Vec::new(),
                    vmx,
                    pool,
                });
            }
        }
        Ok(w)
    }

    pub(crate) fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Adds a VM to the inventory.
    pub(crate) fn push_vm(&mut self, v: VmState) {
        self.vm_ids.insert(v.moref.value.clone(), self.vms.len());
        self.vms.push(v);
    }

    /// Rebuilds the moref index after a VM left `vms`.
    pub(crate) fn reindex_vms(&mut self) {
        self.vm_ids = self.vms.iter().enumerate().map(|(i, v)| (v.moref.value.clone(), i)).collect();
    }

    pub(crate) fn vm_index(&self, moref: &MoRef) -> Option<usize> {
        self.vm_ids.get(&moref.value).copied().filter(|i| self.vms[*i].moref.kind == moref.kind)
    }

    pub(crate) fn vm_by_name(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.name == name)
    }

    pub(crate) fn snapshot_owner(&self, snap: &MoRef) -> Option<(usize, usize)> {
        self.vms
            .iter()
            .enumerate()
            .find_map(|(vi, v)| v.snapshots.iter().position(|s| s.moref == *snap).map(|si| (vi, si)))
    }

    /// The privilege IDs this server knows: every one backup needs, less the configured
    /// unknown ones.
    pub(crate) fn privilege_ids(&self) -> Vec<&'static str> {
        PRIVILEGES.iter().copied().filter(|p| !self.cfg.unknown_privileges.iter().any(|u| u == p)).collect()
    }

    /// An entity's name as the configuration names it (`root` for the root folder).
    pub(crate) fn entity_name(&self, m: &MoRef) -> Option<String> {
        if m.kind == "Folder" {
            return Some(if self.folder_dc(m).is_some() { "vm" } else { "root" }.into());
        }
        if m.kind == "ResourcePool" {
            return Some("Resources".into());
        }
        let named = self.datastores.iter().chain(&self.hosts).chain(&self.datacenters).chain(&self.networks);
        named
            .map(|n| (&n.moref, &n.name))
            .chain(self.vms.iter().map(|v| (&v.moref, &v.name)))
            .chain(self.clusters.iter().map(|c| (&c.moref, &c.name)))
            .find(|(x, _)| *x == m)
            .map(|(_, n)| n.clone())
    }

    pub(crate) fn ds_path(&self, ds: usize, name: &str) -> PathBuf {
        self.root.join(&self.datastores[ds].name).join(name)
    }

    /// `[ds] vm/vm.vmdk` or, under snapshots, the newest delta's name.
    pub(crate) fn disk_file_name(&self, vm: &VmState, d: &DiskState) -> String {
        let ds = &self.datastores[d.ds].name;
        match vm.snapshots.len() {
            0 => format!("[{ds}] {}", d.base_name),
            n => format!("[{ds}] {}", delta_name(&d.base_name, n)),
        }
    }

    /// Writes `data` at `offset` of a VM's disk (the simulator's test API): the live file
    /// changes, and CBT marks the blocks.
    pub(crate) fn write(&mut self, vm: usize, key: i32, offset: u64, data: &[u8]) -> Result<(), SimError> {
        let block = self.cfg.cbt_block;
        let (ds, flat, capacity) = {
            let d = self.vms[vm]
                .disks
                .iter()
                .find(|d| d.key == key)
                .ok_or_else(|| SimError::NoSuch(format!("disk {key}")))?;
            (d.ds, d.flat_name.clone(), d.capacity)
        };
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > capacity) {
            return Err(SimError::NoSuch(format!("bytes {offset}+{} of a {capacity}-byte disk", data.len())));
        }
        let path = self.ds_path(ds, &flat);
        let f = OpenOptions::new().write(true).open(&path).map_err(|e| SimError::io(&path, e))?;
        f.write_all_at(data, offset).map_err(|e| SimError::io(&path, e))?;
        if let Some(t) = self.vms[vm].disks.iter_mut().find(|d| d.key == key).and_then(|d| d.track.as_mut())
            && let Some(e) =
                Extent::from_bounds(offset / block * block, (offset + data.len() as u64).div_ceil(block) * block)
        {
            t.pending.insert(e);
        }
        Ok(())
    }

    pub(crate) fn create_snapshot(
        &mut self,
        vm: usize,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, SimFault> {
        if self.vms[vm].pci > 0 {
            return Err(SimFault::new("SnapshotIncompatibleDeviceInVm", "a PCI passthrough device prevents snapshots"));
        }
        if self.vms[vm].snapshots.len() >= 32 {
            return Err(SimFault::new("TooManySnapshotLevels", "the snapshot chain is 32 deep"));
        }
        let id = self.id();
        let moref = MoRef::new("VirtualMachineSnapshot", &format!("snapshot-{id}"));
        let depth = self.vms[vm].snapshots.len() + 1;
        let repeat = std::mem::take(&mut self.faults.repeat_change_id);
        let mut disks = Vec::new();
        for di in 0..self.vms[vm].disks.len() {
            let (ds, flat, base, mode) = {
                let d = &self.vms[vm].disks[di];
                (d.ds, d.flat_name.clone(), d.base_name.clone(), d.mode.clone())
            };
            if mode.independent() {
                continue;
            }
            let live = self.ds_path(ds, &flat);
            let frozen =
                live.with_file_name(format!(".{id}-{}", live.file_name().and_then(|n| n.to_str()).unwrap_or("disk")));
            sparse_copy(&live, &frozen)
                .map_err(|e| SimFault::new("FileFault", format!("freezing {}: {e}", live.display())))?;
            let d = &mut self.vms[vm].disks[di];
            let (change_id, seq) = match d.track.as_mut() {
                Some(t) => {
                    let pending = std::mem::take(&mut t.pending);
                    if repeat {
                        // The changes since are lost with the state that was restored.
                        drop(pending);
                    } else {
                        t.seq += 1;
                        t.history.push((t.seq, pending));
                    }
                    (Some(t.change_id()), t.seq)
                }
                None => (None, 0),
            };
            let file_name =
                format!("[{}] {}", self.datastores[ds].name, delta_name(&base, depth - 1).replace("-000000", ""));
            disks.push(SnapDisk { key: d.key, frozen, change_id, seq, file_name });
        }
        let quiesced =
            quiesce && self.vms[vm].power == PowerState::PoweredOn && self.vms[vm].tools == ToolsRunningStatus::Running;
        let parent = self.vms[vm].current.clone();
        let v = &mut self.vms[vm];
        v.snapshots.push(SnapRec {
            moref: moref.clone(),
            id,
            name: name.to_owned(),
            description: description.to_owned(),
            create_time: iso_now(),
            quiesced,
            parent,
            disks,
        });
        v.current = Some(moref.clone());
        self.write_deltas(vm).map_err(|e| SimFault::new("FileFault", e.to_string()))?;
        Ok(moref)
    }

    pub(crate) fn remove_snapshot(&mut self, snap: &MoRef) -> Result<(), SimFault> {
        let (vi, si) = self
            .snapshot_owner(snap)
            .ok_or_else(|| SimFault::new("ManagedObjectNotFound", format!("no snapshot {}", snap.value)))?;
        let leave = std::mem::take(&mut self.faults.leave_consolidation);
        let v = &mut self.vms[vi];
        let removed = v.snapshots.remove(si);
        for d in &removed.disks {
            let _ = std::fs::remove_file(&d.frozen);
        }
        for s in &mut v.snapshots {
            if s.parent.as_ref() == Some(snap) {
                s.parent = removed.parent.clone();
            }
        }
        if v.current.as_ref() == Some(snap) {
            v.current = removed.parent.clone();
        }
        v.consolidation_needed |= leave;
        self.write_deltas(vi).map_err(|e| SimFault::new("FileFault", e.to_string()))?;
        Ok(())
    }

    /// Writes the delta files of `vm`'s snapshot chain as ESXi keeps them, so a reader of the
    /// datastore sees what a backup product sees: under `n` snapshots, deltas `1..n` each hold
    /// what changed between one snapshot and the next (`vm-000001.vmdk` over
    /// `vm-000001-sesparse.vmdk` on VMFS, `vm-000001-delta.vmdk` on NFS), each naming its
    /// parent by CID; the newest snapshot's file is the one the snapshot lists. Deltas past the
    /// chain (after a removal) are deleted.
    pub(crate) fn write_deltas(&self, vm: usize) -> Result<(), SimError> {
        let v = &self.vms[vm];
        let n = v.snapshots.len();
        for d in v.disks.iter().filter(|d| !d.mode.independent()) {
            let sesparse = self.datastores[d.ds].extra != "NFS";
            let frozen: Vec<&Path> = v
                .snapshots
                .iter()
                .filter_map(|s| s.disks.iter().find(|f| f.key == d.key).map(|f| f.frozen.as_path()))
                .collect();
            let mut parent_cid = 0xffff_fffe_u32;
            for k in 1..frozen.len() {
                let cid = delta_cid(d.key, k);
                let name = delta_name(&d.base_name, k);
                let extent = format!(
                    "{}-{}.vmdk",
                    name.strip_suffix(".vmdk").unwrap_or(&name),
                    if sesparse { "sesparse" } else { "delta" }
                );
                let parent = if k == 1 { d.base_name.clone() } else { delta_name(&d.base_name, k - 1) };
                let (written, zeroed) =
                    differences(frozen[k - 1], frozen[k], d.capacity).map_err(|e| SimError::io(frozen[k], e))?;
                let view = File::open(frozen[k]).map_err(|e| SimError::io(frozen[k], e))?;
                let path = self.ds_path(d.ds, &extent);
                let mut out = std::io::BufWriter::new(File::create(&path).map_err(|e| SimError::io(&path, e))?);
                let content =
                    vmdk::DeltaContent { view: &view, capacity: d.capacity, written: &written, zeroed: &zeroed };
                let wrote = if sesparse {
                    vmdk::sesparse::write(&mut out, content)
                } else {
                    vmdk::cowd::write(&mut out, content, 1)
                };
                wrote.map_err(|e| SimError::io(&path, std::io::Error::other(e.to_string())))?;
                std::io::Write::flush(&mut out).map_err(|e| SimError::io(&path, e))?;
                let file = |p: &str| Path::new(p).file_name().and_then(|f| f.to_str()).unwrap_or(p).to_owned();
                let text = format!(
                    "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID={parent_cid:08x}\n\
                     isNativeSnapshot=\"no\"\ncreateType=\"{}\"\nparentFileNameHint=\"{}\"\n\n\
                     # Extent description\nRW {} {} \"{}\"\n",
                    if sesparse { "seSparse" } else { "vmfsSparse" },
                    file(&parent),
                    d.capacity / 512,
                    if sesparse { "SESPARSE" } else { "VMFSSPARSE" },
                    file(&extent),
                );
                let desc = self.ds_path(d.ds, &name);
                std::fs::write(&desc, text).map_err(|e| SimError::io(&desc, e))?;
                parent_cid = cid;
            }
            // Deltas of a longer chain that no longer exists.
            for k in n.max(1).. {
                let name = delta_name(&d.base_name, k);
                let desc = self.ds_path(d.ds, &name);
                if !desc.exists() {
                    break;
                }
                let stem = name.strip_suffix(".vmdk").unwrap_or(&name).to_owned();
                for gone in [
                    desc,
                    self.ds_path(d.ds, &format!("{stem}-sesparse.vmdk")),
                    self.ds_path(d.ds, &format!("{stem}-delta.vmdk")),
                ] {
                    let _ = std::fs::remove_file(gone);
                }
            }
        }
        Ok(())
    }

    /// Starts a new change-ID epoch on one disk (as ESXi does after, for instance, a storage
    /// migration of that disk), leaving the VM's other disks alone.
    pub(crate) fn new_epoch(&mut self, vm: usize, key: i32) -> Result<(), SimFault> {
        let n = self.id();
        let d = self.vms[vm]
            .disks
            .iter_mut()
            .find(|d| d.key == key)
            .ok_or_else(|| SimFault::new("InvalidArgument", format!("deviceKey {key}")))?;
        if d.track.is_some() {
            d.track = Some(Track::new(n * 31 + 7));
        }
        Ok(())
    }

    /// Grows one disk to `capacity` bytes (an administrator extending it): the file grows and
    /// CBT keeps tracking, so only the size tells a backup that its old state no longer fits.
    pub(crate) fn grow_disk(&mut self, vm: usize, key: i32, capacity: u64) -> Result<(), SimFault> {
        let (path, desc_path) = {
            let d = self.vms[vm]
                .disks
                .iter()
                .find(|d| d.key == key)
                .ok_or_else(|| SimFault::new("InvalidArgument", format!("deviceKey {key}")))?;
            if capacity < d.capacity {
                return Err(SimFault::new("InvalidArgument", "a disk cannot shrink"));
            }
            (self.ds_path(d.ds, &d.flat_name), self.ds_path(d.ds, &d.base_name))
        };
        // ESXi rewrites the descriptor's extent size with the file.
        let stem = desc_path.file_stem().and_then(|n| n.to_str()).unwrap_or("disk").to_owned();
        std::fs::write(&desc_path, descriptor(&stem, capacity))
            .map_err(|e| SimFault::new("FileFault", format!("rewriting {}: {e}", desc_path.display())))?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(capacity))
            .map_err(|e| SimFault::new("FileFault", format!("growing {}: {e}", path.display())))?;
        if let Some(d) = self.vms[vm].disks.iter_mut().find(|d| d.key == key) {
            d.capacity = capacity;
        }
        Ok(())
    }

    /// Turns CBT on or off. Each tracked disk has a `-ctk.vmdk` beside it. On a running VM, off
    /// removes it (at the stun that follows) and on starts a new epoch. On a powered-off VM, off
    /// leaves the file and the tracking in it; on again with the file still there resumes that
    /// tracking, the same epoch; with the file deleted it starts a new one.
    pub(crate) fn set_cbt(&mut self, vm: usize, on: bool) {
        let n = self.id();
        let paths: Vec<PathBuf> =
            self.vms[vm].disks.iter().map(|d| self.ds_path(d.ds, &ctk_name(&d.base_name))).collect();
        let v = &mut self.vms[vm];
        let with_snapshots = !v.snapshots.is_empty();
        let off = v.power == PowerState::PoweredOff;
        if on && !v.cbt {
            for (i, d) in v.disks.iter_mut().enumerate() {
                if d.backing == "rdm-physical" {
                    continue;
                }
                let kept = d.parked.take().filter(|_| off && paths[i].exists());
                d.track = Some(kept.unwrap_or_else(|| {
                    let mut t = Track::new(n * 31 + i as u64);
                    t.unreliable = with_snapshots;
                    t
                }));
                let _ = std::fs::write(&paths[i], b"change tracking\n");
            }
        } else if !on {
            for (i, d) in v.disks.iter_mut().enumerate() {
                let t = d.track.take();
                if off {
                    d.parked = t.or(d.parked.take());
                } else {
                    d.parked = None;
                    let _ = std::fs::remove_file(&paths[i]);
                }
            }
        }
        v.cbt = on;
    }

    /// `ReconfigureComputeResource_Task` with `drsVmConfigSpec` entries: `(operation, vm,
    /// enabled, behavior)`, applied in order as a vCenter does (add when absent, edit or remove
    /// when present).
    pub(crate) fn reconfigure_cluster(
        &mut self,
        cluster: &MoRef,
        specs: Vec<(String, MoRef, Option<bool>, Option<DrsBehavior>)>,
    ) -> Result<(), SimFault> {
        self.require(cluster, "Host.Inventory.EditCluster")?;
        let c = self
            .clusters
            .iter_mut()
            .find(|c| c.moref == *cluster)
            .ok_or_else(|| SimFault::new("ManagedObjectNotFound", "no such cluster"))?;
        for (op, vm, enabled, behavior) in specs {
            let at = c.overrides.iter().position(|o| o.0 == vm);
            match (op.as_str(), at) {
                ("add", None) => c.overrides.push((vm, enabled, behavior)),
                ("edit", Some(i)) => {
                    c.overrides[i] = (vm, enabled.or(c.overrides[i].1), behavior.or(c.overrides[i].2.clone()))
                }
                ("remove", Some(i)) => {
                    c.overrides.remove(i);
                }
                _ => {
                    return Err(SimFault::new(
                        "InvalidArgument",
                        format!("drsVmConfigSpec {op} for {}: no such override, or one already", vm.value),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `StartProgramInGuest`: checks Tools and the guest login, then "runs" the program.
    pub(crate) fn start_guest_program(
        &mut self,
        vm: usize,
        user: &str,
        password: &str,
        program: &str,
        arguments: &str,
    ) -> Result<i64, SimFault> {
        let pid = i64::try_from(self.id()).unwrap_or(i64::MAX);
        let v = &mut self.vms[vm];
        if v.power != PowerState::PoweredOn || v.tools != ToolsRunningStatus::Running {
            return Err(SimFault::new("GuestOperationsUnavailable", "VMware Tools are not running in the guest"));
        }
        if user != "root" || v.guest_password.as_deref() != Some(password) {
            return Err(SimFault::new("InvalidGuestLogin", "Failed to authenticate with the guest operating system"));
        }
        let (seconds, exit_code) = match program {
            "/bin/true" => (0, 0),
            "/bin/false" => (0, 1),
            "/bin/sleep" => (arguments.trim().parse::<u64>().unwrap_or(0), 0),
            _ => {
                return Err(SimFault::new("GuestPermissionDenied", format!("{program}: no such program in the guest")));
            }
        };
        v.guest_runs.push(GuestRun {
            pid,
            program: program.to_owned(),
            arguments: arguments.to_owned(),
            ends: SystemTime::now() + Duration::from_secs(seconds),
            exit_code,
            terminated: false,
        });
        Ok(pid)
    }

    /// `DeleteDatastoreFile_Task`: removes `[ds] path` in the datacenter `dc`.
    pub(crate) fn delete_datastore_file(&mut self, name: &str, dc: &MoRef) -> Result<(), SimFault> {
        let not_found = || SimFault::new("FileNotFound", format!("File {name} was not found"));
        let (ds, rel) = name.strip_prefix('[').and_then(|x| x.split_once("] ")).ok_or_else(not_found)?;
        let dci = self.datacenters.iter().position(|d| d.moref == *dc).ok_or_else(not_found)?;
        let dsi = self.datastores.iter().position(|d| d.dc == dci && d.name == ds).ok_or_else(not_found)?;
        if rel.split('/').any(|c| c.is_empty() || c == "..") {
            return Err(SimFault::new("InvalidDatastorePath", name.to_owned()));
        }
        // A folder goes with everything in it, as on ESXi.
        let path = self.ds_path(dsi, rel);
        if path.is_dir() {
            return std::fs::remove_dir_all(&path)
                .map_err(|e| SimFault::new("CannotDeleteFile", format!("{name}: {e}")));
        }
        std::fs::remove_file(path).map_err(|_| not_found())
    }

    /// `QueryChangedDiskAreas`: one window of the answer.
    pub(crate) fn qcda(
        &self,
        vm: usize,
        snapshot: Option<&MoRef>,
        key: i32,
        start: u64,
        change_id: &str,
    ) -> Result<(u64, u64, ExtentSet), SimFault> {
        let v = &self.vms[vm];
        let d = v
            .disks
            .iter()
            .find(|d| d.key == key)
            .ok_or_else(|| SimFault::new("InvalidArgument", format!("deviceKey {key}")))?;
        let file_fault = || {
            SimFault::new(
                "FileFault",
                format!("Error caused by file /vmfs/volumes/{}/{}", self.datastores[d.ds].name, d.base_name),
            )
        };
        if self.faults.qcda_file_fault {
            return Err(file_fault());
        }
        let t = d.track.as_ref().ok_or_else(file_fault)?;
        if start >= d.capacity {
            return Err(SimFault::new("InvalidArgument", format!("startOffset {start} is past the disk's end")));
        }
        let (frozen, snap_seq) = match snapshot {
            Some(s) => {
                let rec = v
                    .snapshots
                    .iter()
                    .find(|r| r.moref == *s)
                    .ok_or_else(|| SimFault::new("ManagedObjectNotFound", format!("no snapshot {}", s.value)))?;
                let sd = rec.disks.iter().find(|x| x.key == key).ok_or_else(file_fault)?;
                (sd.frozen.clone(), sd.seq)
            }
            None if v.power == PowerState::PoweredOff => (self.ds_path(d.ds, &d.flat_name), t.seq),
            None => return Err(SimFault::new("InvalidState", "the VM is powered on: name a snapshot")),
        };
        let end = start.saturating_add(self.cfg.qcda_window).min(d.capacity);
        let window = ExtentSet::from_extents(Extent::from_bounds(start, end));
        let areas = if change_id.trim() == "*" {
            allocated(&frozen, d.capacity).map_err(|e| SimFault::new("FileFault", e.to_string()))?
        } else {
            let (epoch, seq) = change_id
                .rsplit_once('/')
                .ok_or_else(|| SimFault::new("InvalidArgument", "A specified parameter was not correct: changeId"))?;
            let seq: u64 = seq
                .trim()
                .parse()
                .map_err(|_| SimFault::new("InvalidArgument", "A specified parameter was not correct: changeId"))?;
            if epoch != t.epoch_text() {
                return Err(file_fault());
            }
            if seq > snap_seq {
                return Err(SimFault::new("InvalidArgument", "A specified parameter was not correct: changeId"));
            }
            if t.unreliable {
                ExtentSet::new()
            } else {
                let since = t
                    .history
                    .iter()
                    .filter(|(s, _)| *s > seq && *s <= snap_seq)
                    .fold(ExtentSet::new(), |acc, (_, e)| acc.union(e));
                // Without a snapshot (a powered-off VM) the live disk is asked: writes since the
                // last snapshot count too.
                if snapshot.is_none() { since.union(&t.pending) } else { since }
            }
        };
        Ok((start, end - start, areas.clamp(d.capacity).intersection(&window)))
    }
}

/// `vm/vm.vmdk` -> `vm/vm-00000N.vmdk`.
/// The privileges the simulator knows (a real server knows a few hundred).
const PRIVILEGES: &[&str] = &[
    "System.Anonymous",
    "System.View",
    "System.Read",
    "Global.DisableMethods",
    "Global.EnableMethods",
    "Global.Licenses",
    "Datastore.AllocateSpace",
    "Datastore.Browse",
    "Datastore.FileManagement",
    "Host.Inventory.EditCluster",
    "Network.Assign",
    "Resource.AssignVMToPool",
    "VApp.Import",
    "VirtualMachine.Config.AddExistingDisk",
    "VirtualMachine.Config.AddNewDisk",
    "VirtualMachine.Config.RemoveDisk",
    "VirtualMachine.Config.EditDevice",
    "VirtualMachine.Config.Rename",
    "VirtualMachine.Inventory.Create",
    "VirtualMachine.Inventory.Register",
    "VirtualMachine.Inventory.Delete",
    "VirtualMachine.Inventory.Unregister",
    "VirtualMachine.Interact.PowerOn",
    "VirtualMachine.Interact.PowerOff",
    "VirtualMachine.Config.ChangeTracking",
    "VirtualMachine.Config.DiskLease",
    "VirtualMachine.Provisioning.DiskRandomRead",
    "VirtualMachine.Provisioning.DiskRandomAccess",
    "VirtualMachine.Provisioning.GetVmFiles",
    "VirtualMachine.State.CreateSnapshot",
    "VirtualMachine.State.RemoveSnapshot",
    "VirtualMachine.GuestOperations.Query",
    "VirtualMachine.GuestOperations.Modify",
    "VirtualMachine.GuestOperations.Execute",
    "Cryptographer.Access",
];

/// `vm/vm.vmdk`'s change tracking file, `vm/vm-ctk.vmdk`.
pub(crate) fn ctk_name(base: &str) -> String {
    format!("{}-ctk.vmdk", base.strip_suffix(".vmdk").unwrap_or(base))
}

/// The CID of a disk's `k`th delta: any number but the two reserved ones.
fn delta_cid(key: i32, k: usize) -> u32 {
    0x5100_0000 ^ (key.unsigned_abs() << 8) ^ u32::try_from(k).unwrap_or(0)
}

/// Copies a raw image into a new disk file, leaving its all-zero MiBs as holes; returns the
/// disk's capacity: `capacity`, or the image's size when that is 0.
fn fill_from_image(disk: &File, image: &Path, capacity: u64) -> Result<u64, String> {
    let src = File::open(image).map_err(|e| e.to_string())?;
    let len = src.metadata().map_err(|e| e.to_string())?.len();
    let capacity = if capacity == 0 { len } else { capacity };
    if capacity == 0 || capacity % 512 != 0 {
        return Err(format!("{capacity} bytes is not a positive multiple of 512"));
    }
    if len > capacity {
        return Err(format!("{len} bytes do not fit a {capacity}-byte disk"));
    }
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = usize::try_from(PIECE.min(len - at)).unwrap_or(buf.len());
        src.read_exact_at(&mut buf[..n], at).map_err(|e| e.to_string())?;
        if buf[..n].iter().any(|&b| b != 0) {
            disk.write_all_at(&buf[..n], at).map_err(|e| e.to_string())?;
        }
        at += PIECE;
    }
    Ok(capacity)
}

/// Where `new` differs from `old` (both raw images of `capacity` bytes), in 4 KiB blocks: the
/// blocks that now hold data, and those that became zeros.
fn differences(old: &Path, new: &Path, capacity: u64) -> std::io::Result<(ExtentSet, ExtentSet)> {
    const BLOCK: usize = 4096;
    let (a, b) = (File::open(old)?, File::open(new)?);
    let candidates = allocated(old, capacity)?.union(&allocated(new, capacity)?);
    let mut written = Vec::new();
    let mut zeroed = Vec::new();
    let (mut x, mut y) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let g = std::num::NonZeroU64::new(BLOCK as u64).unwrap_or(std::num::NonZeroU64::MIN);
    for e in candidates.align_outward(g, capacity).iter() {
        let mut at = e.start();
        while at < e.end() {
            let n = usize::try_from(e.end() - at).map_or(BLOCK, |left| left.min(BLOCK));
            a.read_exact_at(&mut x[..n], at)?;
            b.read_exact_at(&mut y[..n], at)?;
            if x[..n] != y[..n] {
                if y[..n].iter().all(|&c| c == 0) {
                    zeroed.push((at, n as u64));
                } else {
                    written.push((at, n as u64));
                }
            }
            at += n as u64;
        }
    }
    Ok((ExtentSet::from_ranges(written), ExtentSet::from_ranges(zeroed)))
}

fn delta_name(base: &str, n: usize) -> String {
    let stem = base.strip_suffix(".vmdk").unwrap_or(base);
    format!("{stem}-{n:06}.vmdk")
}

/// The data extents of a sparse file (`SEEK_DATA`/`SEEK_HOLE`).
pub(crate) fn allocated(path: &Path, capacity: u64) -> std::io::Result<ExtentSet> {
    let f = File::open(path)?;
    let mut out = ExtentSet::new();
    let mut at = 0u64;
    while at < capacity {
        let data = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(data)).map_err(std::io::Error::from)?;
        if let Some(e) = Extent::from_bounds(data, hole.min(capacity)) {
            out.insert(e);
        }
        at = hole;
    }
    Ok(out)
}

/// Copies `from` to `to` keeping holes.
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    for e in allocated(from, len)?.iter() {
        let mut at = e.start();
        while at < e.end() {
            let n = usize::try_from((e.end() - at).min(buf.len() as u64)).unwrap_or(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}
