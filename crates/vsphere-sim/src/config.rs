//! The simulated estate, from a small TOML file or built in code: what the server says it is,
//! its datacenters, hosts, datastores and VMs with their disks and devices.

use serde::Deserialize;
use vsphere::{DiskMode, DrsBehavior, PowerState, ToolsRunningStatus};

use crate::SimError;

/// The whole estate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The one account that may log in.
    pub user: String,
    /// Its password.
    pub password: String,
    /// `VirtualCenter` or `HostAgent`.
    #[serde(default = "default_api_type")]
    pub api_type: String,
    /// The API version reported in `about` (`8.0.2.0`).
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// The product version (`8.0.2`).
    #[serde(default = "default_version")]
    pub version: String,
    /// Bytes one `QueryChangedDiskAreas` answer covers (ESXi: about 2 GiB).
    #[serde(default = "default_window")]
    pub qcda_window: u64,
    /// The CBT tracking unit: a write marks whole blocks of this size changed.
    #[serde(default = "default_cbt_block")]
    pub cbt_block: u64,
    /// The most objects one property-collector page holds, whatever the client asks
    /// (servers may send fewer than `maxObjects`).
    #[serde(default = "default_page_limit")]
    pub page_limit: usize,
    /// Datacenters.
    #[serde(default, rename = "datacenter")]
    pub datacenters: Vec<DatacenterConfig>,
    /// Privileges the account lacks, per entity; it holds every other one everywhere.
    #[serde(default, rename = "deny")]
    pub denied: Vec<Denied>,
    /// Privilege IDs this server does not know (an older release): absent from
    /// `privilegeList`, and naming one in `HasPrivilegeOnEntity` fails the whole call.
    #[serde(default)]
    pub unknown_privileges: Vec<String>,
    /// The largest file a datastore upload (`/folder` PUT) may write, in bytes; a bigger one
    /// is refused (413) and nothing of it is kept.
    #[serde(default = "default_max_upload")]
    pub max_upload: u64,
    /// Seconds an NFC import lease (`ResourcePool.ImportVApp`) lives without a
    /// `HttpNfcLeaseProgress` or an upload before it is aborted (vSphere's default: 300).
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout: u64,
}

/// Privileges the account lacks on an entity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Denied {
    /// The entity by name (a VM, datastore, host, datacenter, network, `root` for the root
    /// folder, `vm` for a datacenter's VM folder, `Resources` for a resource pool), or `*` for
    /// every entity.
    pub entity: String,
    /// Privilege IDs (`VirtualMachine.State.CreateSnapshot`).
    pub privileges: Vec<String>,
}

fn default_api_type() -> String {
    "VirtualCenter".into()
}
fn default_api_version() -> String {
    "8.0.2.0".into()
}
fn default_version() -> String {
    "8.0.2".into()
}
fn default_window() -> u64 {
    2 << 30
}
fn default_page_limit() -> usize {
    100
}
fn default_cbt_block() -> u64 {
    64 << 10
}
fn default_max_upload() -> u64 {
    64 << 30
}
fn default_lease_timeout() -> u64 {
    300
}

/// A datacenter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatacenterConfig {
    /// Its name.
    pub name: String,
    /// Hosts.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostConfig>,
    /// Datastores.
    #[serde(default, rename = "datastore")]
    pub datastores: Vec<DatastoreConfig>,
    /// VMs.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
    /// Clusters of its hosts.
    #[serde(default, rename = "cluster")]
    pub clusters: Vec<ClusterConfig>,
    /// Standard port groups (`Network` objects) on every host of the datacenter; none
    /// configured: one called `VM Network`, as a fresh ESXi has.
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkConfig>,
}

/// A standard port group: a `Network` a VM's NIC can be on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Its name (`VM Network`).
    pub name: String,
}

/// A cluster: some of the datacenter's hosts, with DRS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Its name.
    pub name: String,
    /// Its hosts, by name.
    pub hosts: Vec<String>,
    /// DRS on.
    #[serde(default = "default_true")]
    pub drs: bool,
    /// `manual`, `partiallyAutomated` or `fullyAutomated`.
    #[serde(default = "default_drs_behavior")]
    pub behavior: DrsBehavior,
}

fn default_true() -> bool {
    true
}
fn default_drs_behavior() -> DrsBehavior {
    DrsBehavior::FullyAutomated
}

/// An ESXi host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Its name.
    pub name: String,
    /// Its ESXi version.
    #[serde(default = "default_version")]
    pub version: String,
}

/// A datastore (a folder under the simulator's root).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// Its name.
    pub name: String,
    /// `VMFS`, `NFS`, `vsan`. Snapshot deltas are SEsparse on VMFS (as VMFS 6 makes them) and
    /// vmfsSparse elsewhere.
    #[serde(default = "default_ds_type", rename = "type")]
    pub kind: String,
}

fn default_ds_type() -> String {
    "VMFS".into()
}

/// A VM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Its name.
    pub name: String,
    /// The host it runs on (by name; the first host if absent).
    #[serde(default)]
    pub host: Option<String>,
    /// `poweredOn`, `poweredOff` or `suspended`.
    #[serde(default = "default_power")]
    pub power: PowerState,
    /// `vmx-19`.
    #[serde(default = "default_hw")]
    pub hardware: String,
    /// CBT on from the start.
    #[serde(default)]
    pub cbt: bool,
    /// `guestToolsRunning`, `guestToolsNotRunning`.
    #[serde(default = "default_tools")]
    pub tools: ToolsRunningStatus,
    /// The guest OS ID (`ubuntu64Guest`, `windows2019srv_64Guest`).
    #[serde(default = "default_guest")]
    pub guest: String,
    /// The password of the guest's `root` account for guest operations (none: every guest
    /// login fails). Guest programs are simulated: `/bin/true` succeeds, `/bin/false` exits 1,
    /// `/bin/sleep N` runs N seconds.
    #[serde(default)]
    pub guest_password: Option<String>,
    /// Encrypted (a key ID is reported).
    #[serde(default)]
    pub encrypted: bool,
    /// USB devices.
    #[serde(default)]
    pub usb: u32,
    /// PCI passthrough devices.
    #[serde(default)]
    pub pci: u32,
    /// Disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// The controller its disks hang on (none: a PVSCSI controller, not named in the `.vmx`).
    /// Given, the device list reports it and the `.vmx` names it and each disk's slot.
    #[serde(default)]
    pub controller: Option<ControllerKind>,
    /// Lines appended as they are to the VM's `.vmx` (`firmware = "efi"`, `memsize = "256"`).
    #[serde(default)]
    pub vmx_extra: Option<String>,
}

/// A disk controller model, as a `.vmx` names it (`scsi0.virtualDev`, or `sata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    /// VMware paravirtual SCSI (`scsi0`, `ParaVirtualSCSIController`).
    Pvscsi,
    /// LSI Logic SAS (`scsi0`, `VirtualLsiLogicSASController`).
    Lsisas1068,
    /// LSI Logic parallel (`scsi0`, `VirtualLsiLogicController`).
    Lsilogic,
    /// AHCI (`sata0`, `VirtualAHCIController`).
    Sata,
}

impl ControllerKind {
    /// The `.vmx` bus prefix: `scsi` or `sata`.
    pub fn bus(self) -> &'static str {
        match self {
            ControllerKind::Sata => "sata",
            _ => "scsi",
        }
    }

    /// The `scsiN.virtualDev` value (none for SATA).
    pub fn virtual_dev(self) -> Option<&'static str> {
        match self {
            ControllerKind::Pvscsi => Some("pvscsi"),
            ControllerKind::Lsisas1068 => Some("lsisas1068"),
            ControllerKind::Lsilogic => Some("lsilogic"),
            ControllerKind::Sata => None,
        }
    }
}

fn default_power() -> PowerState {
    PowerState::PoweredOn
}
fn default_hw() -> String {
    "vmx-19".into()
}
fn default_guest() -> String {
    "ubuntu64Guest".into()
}
fn default_tools() -> ToolsRunningStatus {
    ToolsRunningStatus::Running
}

/// A virtual disk: a real sparse file of `capacity` bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Bytes (0 with an `image`: the image's size).
    #[serde(default)]
    pub capacity: u64,
    /// A raw image whose bytes are the disk's initial content (its zero MiBs stay holes).
    #[serde(default)]
    pub image: Option<std::path::PathBuf>,
    /// The datastore (by name; the datacenter's first if absent).
    #[serde(default)]
    pub datastore: Option<String>,
    /// `persistent`, `independent_persistent`, ...
    #[serde(default = "default_mode")]
    pub mode: DiskMode,
    /// `flat`, `sesparse`, `rdm-physical`, `rdm-virtual`.
    #[serde(default = "default_backing")]
    pub backing: String,
    /// `sharingNone` or `sharingMultiWriter`.
    #[serde(default = "default_sharing")]
    pub sharing: String,
}

fn default_mode() -> DiskMode {
    DiskMode::Persistent
}
fn default_backing() -> String {
    "flat".into()
}
fn default_sharing() -> String {
    "sharingNone".into()
}

impl Config {
    /// Reads a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self, SimError> {
        let c: Self = toml::from_str(text).map_err(|e| SimError::Config(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// One datacenter with one host and datastore and `vms` powered-on VMs with CBT on and
    /// one disk of `disk_size` bytes each: the quick estate for tests and benches.
    pub fn small(vms: usize, disk_size: u64) -> Self {
        Self {
            user: "backup@vsphere.local".into(),
            password: "simulated".into(),
            api_type: default_api_type(),
            api_version: default_api_version(),
            version: default_version(),
            qcda_window: default_window(),
            cbt_block: default_cbt_block(),
            page_limit: default_page_limit(),
            denied: Vec::new(),
            unknown_privileges: Vec::new(),
            max_upload: default_max_upload(),
            lease_timeout: default_lease_timeout(),
            datacenters: vec![DatacenterConfig {
                name: "DC1".into(),
                hosts: vec![HostConfig { name: "esx1.sim".into(), version: default_version() }],
                datastores: vec![DatastoreConfig { name: "ds1".into(), kind: default_ds_type() }],
                vms: (0..vms)
                    .map(|i| VmConfig {
                        name: format!("vm{i:05}"),
                        host: None,
                        power: default_power(),
                        hardware: default_hw(),
                        cbt: true,
                        tools: default_tools(),
                        guest: default_guest(),
                        guest_password: None,
                        encrypted: false,
                        usb: 0,
                        pci: 0,
                        disks: vec![DiskConfig {
                            capacity: disk_size,
                            image: None,
                            datastore: None,
                            mode: default_mode(),
                            backing: default_backing(),
                            sharing: default_sharing(),
                        }],
                        controller: None,
                        vmx_extra: None,
                    })
                    .collect(),
                clusters: Vec::new(),
                networks: Vec::new(),
            }],
        }
    }

    /// Checks names and sizes.
    pub fn check(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        if !matches!(self.api_type.as_str(), "VirtualCenter" | "HostAgent") {
            return bad(format!("api_type {:?} is neither VirtualCenter nor HostAgent", self.api_type));
        }
        if self.page_limit == 0 || self.qcda_window == 0 || self.cbt_block == 0 || !self.cbt_block.is_power_of_two() {
            return bad("qcda_window must be positive and cbt_block a power of two".into());
        }
        for dc in &self.datacenters {
            if dc.hosts.is_empty() || dc.datastores.is_empty() {
                return bad(format!("datacenter {} needs at least one host and one datastore", dc.name));
            }
            for name in dc.datastores.iter().map(|d| &d.name).chain(dc.vms.iter().map(|v| &v.name)) {
                if name.is_empty() || name.contains(['/', '\\', '[', ']']) || name.starts_with('.') {
                    return bad(format!("{name:?} cannot name a datastore or VM (it becomes a folder)"));
                }
            }
            for vm in &dc.vms {
                for d in &vm.disks {
                    if (d.capacity == 0 && d.image.is_none()) || d.capacity % 512 != 0 {
                        return bad(format!("{}: disk sizes must be positive multiples of 512", vm.name));
                    }
                    if let Some(ds) = &d.datastore
                        && !dc.datastores.iter().any(|x| &x.name == ds)
                    {
                        return bad(format!("{}: no datastore {ds} in {}", vm.name, dc.name));
                    }
                }
                if let Some(h) = &vm.host
                    && !dc.hosts.iter().any(|x| &x.name == h)
                {
                    return bad(format!("{}: no host {h} in {}", vm.name, dc.name));
                }
            }
            for (i, n) in dc.networks.iter().enumerate() {
                if n.name.is_empty() || dc.networks[..i].iter().any(|m| m.name == n.name) {
                    return bad(format!("datacenter {}: network names must be non-empty and unique", dc.name));
                }
            }
            for c in &dc.clusters {
                if let Some(h) = c.hosts.iter().find(|h| !dc.hosts.iter().any(|x| &x.name == *h)) {
                    return bad(format!("cluster {}: no host {h} in {}", c.name, dc.name));
                }
                if let DrsBehavior::Other(b) = &c.behavior {
                    return bad(format!("cluster {}: DRS behavior {b:?}", c.name));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_estate_reads_and_bad_ones_say_why() {
        let c = Config::from_toml(
            r#"
user = "u"
password = "p"
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.vm]]
name = "db"
usb = 1
[[datacenter.vm.disk]]
capacity = 1048576
backing = "rdm-physical"
"#,
        )
        .unwrap();
        assert_eq!(c.datacenters[0].vms[0].disks[0].backing, "rdm-physical");
        assert_eq!(c.qcda_window, 2 << 30);
        let e = Config::from_toml("user = \"u\"\npassword = \"p\"\nbogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let mut c = Config::small(1, 1 << 20);
        c.datacenters[0].vms[0].disks[0].capacity = 1000;
        assert!(c.check().is_err());
    }
}
