//! The support matrix as findings: facts gathered from vCenter or ESXi (server, hosts,
//! datastores, clusters, VMs) are checked one by one, each giving pass, warn or fail with a
//! stable code, the reason and the fix. `probe check` prints them; the checks themselves are
//! pure functions of the facts, so they are tested without a server.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use vsphere::facts::{Cluster, Datastore, Host};
use vsphere::privileges::Held;
use vsphere::version::{ApiVersion, Support, support};
use vsphere::{BackingKind, Client, ConnectionState, MoRef, NotCopyable, PowerState, ToolsRunningStatus, Vm};

use crate::OrchError;
use crate::catalog::GuestSupport;
use crate::hygiene::{OLD_SNAPSHOT, job_of, parse_server_time};

pub mod restore;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fine.
    Pass,
    /// Works, with a caveat the operator should know.
    Warn,
    /// Will not work (or not safely) until fixed.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A stable code (`vm.cbt_active`): scripts match on it; it never changes meaning.
    pub code: &'static str,
    /// Pass, warn or fail.
    pub level: Level,
    /// What it is about: `server`, `host esx1`, or a VM's name.
    pub subject: String,
    /// The disk's slot, for disk checks.
    pub disk: Option<String>,
    /// What was found.
    pub reason: String,
    /// What to do about it (empty on a pass).
    pub fix: String,
}

/// The server the probe talked to.
#[derive(Debug, Clone, Default)]
pub struct ServerFacts {
    /// `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// `8.0.2.0`.
    pub api_version: String,
    /// `8.0.2`.
    pub version: String,
    /// The negotiated TLS version (`TLSv1_3`), when known.
    pub tls_version: Option<String>,
}

/// What VDDK the proxy would use, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VddkFacts {
    /// None was configured.
    NotConfigured,
    /// Loaded: its version (`8.0.2`).
    Found(String),
    /// Configured but could not be loaded: why.
    Broken(String),
}

/// Everything the checks look at.
#[derive(Debug, Clone, Default)]
pub struct Estate {
    /// The server.
    pub server: ServerFacts,
    /// ESXi hosts.
    pub hosts: Vec<Host>,
    /// Datastores.
    pub datastores: Vec<Datastore>,
    /// Clusters.
    pub clusters: Vec<Cluster>,
    /// The VMs to check.
    pub vms: Vec<Vm>,
    /// The server's clock.
    pub now: Option<SystemTime>,
    /// What the account may do where the backup acts.
    pub privileges: PrivilegeFacts,
}

/// The account's privileges, per entity.
#[derive(Debug, Clone, Default)]
pub enum PrivilegeFacts {
    /// Not asked.
    #[default]
    NotChecked,
    /// Asking failed: why.
    Failed(String),
    /// What the session holds on each entity asked about.
    Checked(HashMap<MoRef, Held>),
}

/// What a backup does to a VM: CBT, snapshots, disk reads (VDDK's leases and random access;
/// HTTPS's file reads).
pub const VM_PRIVILEGES: &[&str] = &[
    "VirtualMachine.Config.ChangeTracking",
    "VirtualMachine.Config.DiskLease",
    "VirtualMachine.Provisioning.DiskRandomRead",
    "VirtualMachine.Provisioning.DiskRandomAccess",
    "VirtualMachine.Provisioning.GetVmFiles",
    "VirtualMachine.State.CreateSnapshot",
    "VirtualMachine.State.RemoveSnapshot",
];
/// Guest freeze scripts run through the guest operations API.
pub const GUEST_PRIVILEGES: &[&str] = &[
    "VirtualMachine.GuestOperations.Query",
    "VirtualMachine.GuestOperations.Modify",
    "VirtualMachine.GuestOperations.Execute",
];
/// Reading an encrypted VM's disks.
pub const CRYPTO_PRIVILEGES: &[&str] = &["Cryptographer.Access"];
/// Reading disk files from a datastore, and removing `-ctk.vmdk` files in a CBT reset.
pub const DATASTORE_PRIVILEGES: &[&str] = &["Datastore.Browse", "Datastore.FileManagement"];
/// VDDK's PrepareForAccess and EndAccess (they disable and enable a VM's relocation).
pub const GLOBAL_PRIVILEGES: &[&str] = &["Global.DisableMethods", "Global.EnableMethods"];
/// The per-VM DRS override that keeps a VM in place while it is read.
pub const CLUSTER_PRIVILEGES: &[&str] = &["Host.Inventory.EditCluster"];

/// Asks what the session holds on every entity the checked VMs' backups touch: each VM, its
/// datastores, its host's cluster, and (on vCenter) the root folder.
pub async fn gather_privileges(client: &Client, estate: &Estate) -> PrivilegeFacts {
    // A server that lists no privileges (vcsim does) is asked one privilege per call (the
    // client does that for an empty list), so an unknown one cannot fail the rest.
    let known = match client.privilege_ids().await {
        Ok(k) => k,
        Err(e) => return PrivilegeFacts::Failed(format!("cannot read the server's privilege list: {e}")),
    };
    let mut asks: Vec<(MoRef, Vec<&str>)> = Vec::new();
    for vm in &estate.vms {
        let mut want: Vec<&str> = VM_PRIVILEGES.iter().chain(GUEST_PRIVILEGES).copied().collect();
        if vm.key_id.is_some() {
            want.extend(CRYPTO_PRIVILEGES);
        }
        asks.push((vm.moref.clone(), want));
    }
    let datastores: HashSet<&MoRef> =
        estate.vms.iter().flat_map(|v| v.disks.iter().filter_map(|d| d.datastore.as_ref())).collect();
    asks.extend(datastores.into_iter().map(|d| (d.clone(), DATASTORE_PRIVILEGES.to_vec())));
    let clusters: HashSet<&MoRef> = estate
        .vms
        .iter()
        .filter_map(|v| v.host.as_ref())
        .filter_map(|h| estate.hosts.iter().find(|x| &x.moref == h)?.parent.as_ref())
        .filter(|p| p.kind == "ClusterComputeResource")
        .collect();
    asks.extend(clusters.into_iter().map(|c| (c.clone(), CLUSTER_PRIVILEGES.to_vec())));
    if estate.server.api_type == "VirtualCenter" {
        asks.push((client.content().root_folder.clone(), GLOBAL_PRIVILEGES.to_vec()));
    }
    let mut held = HashMap::new();
    for (entity, want) in asks {
        match client.has_privileges(&entity, &want, &known).await {
            Ok(h) => {
                held.insert(entity, h);
            }
            Err(e) => return PrivilegeFacts::Failed(format!("cannot check the privileges on {entity}: {e}")),
        }
    }
    PrivilegeFacts::Checked(held)
}

/// The snapshot depth at which a backup is refused (32 is the limit; ours needs one level).
pub const MAX_SNAPSHOT_DEPTH: usize = 30;
/// The free space a guest file system needs for quiescing (VSS, freeze journals).
pub const MIN_GUEST_FREE: u64 = 100 << 20;
const TWO_TB: u64 = 2 << 40;

/// Reads the estate: the server, its hosts, datastores and clusters, and `vms` (every VM when
/// `None`).
pub async fn gather(client: &Client, vms: Option<Vec<Vm>>) -> Result<Estate, OrchError> {
    let about = &client.content().about;
    let server = ServerFacts {
        api_type: about.api_type.clone(),
        api_version: about.api_version.clone(),
        version: about.version.clone(),
        tls_version: client.server_tls().map(|t| t.version),
    };
    let vms = match vms {
        Some(v) => v,
        None => client.vms().await?,
    };
    let now = parse_server_time(&client.current_time().await?);
    let mut estate = Estate {
        server,
        hosts: client.hosts().await?,
        datastores: client.datastores().await?,
        clusters: client.clusters().await.unwrap_or_default(),
        vms,
        now,
        privileges: PrivilegeFacts::NotChecked,
    };
    estate.privileges = gather_privileges(client, &estate).await;
    Ok(estate)
}

struct Out {
    list: Vec<Finding>,
}

impl Out {
    fn add(&mut self, code: &'static str, level: Level, subject: &str, disk: Option<&str>, reason: String, fix: &str) {
        let fix = if level == Level::Pass { String::new() } else { fix.to_owned() };
        self.list.push(Finding {
            code,
            level,
            subject: subject.to_owned(),
            disk: disk.map(str::to_owned),
            reason,
            fix,
        });
    }
}

/// Every check of the estate: the server, each host that runs a checked VM, each VM and disk.
/// `live_jobs` are the jobs running now (their snapshots are not stale).
pub fn check(estate: &Estate, vddk: &VddkFacts, live_jobs: &HashSet<String>) -> Vec<Finding> {
    let mut out = Out { list: Vec::new() };
    check_server(estate, &mut out);
    check_vddk(estate, vddk, &mut out);
    let hosts: HashMap<&MoRef, &Host> = estate.hosts.iter().map(|h| (&h.moref, h)).collect();
    let mut seen = HashSet::new();
    for vm in &estate.vms {
        if let Some(h) = vm.host.as_ref().and_then(|m| hosts.get(m))
            && seen.insert(&h.moref)
        {
            check_host(h, &mut out);
        }
    }
    for vm in &estate.vms {
        check_vm(estate, vm, vddk, live_jobs, &mut out);
    }
    check_privileges(estate, vddk, &mut out);
    out.list
}

/// What the account lacks where the backup acts, by entity.
fn check_privileges(estate: &Estate, vddk: &VddkFacts, out: &mut Out) {
    let held = match &estate.privileges {
        PrivilegeFacts::NotChecked => return,
        PrivilegeFacts::Failed(why) => {
            out.add(
                "server.privileges",
                Level::Warn,
                "server",
                None,
                why.clone(),
                "let the account read its own privileges (System.View), then check again",
            );
            return;
        }
        PrivilegeFacts::Checked(h) => h,
    };
    let note = |h: &Held| {
        if h.unknown.is_empty() { String::new() } else { format!(" ({} unknown to this server)", h.unknown.join(", ")) }
    };
    let lacks = |what: &[&str], among: &[&str]| -> Vec<String> {
        what.iter().filter(|p| among.contains(p)).map(|p| (*p).to_owned()).collect()
    };
    for vm in &estate.vms {
        let Some(h) = held.get(&vm.moref) else { continue };
        let missing = h.missing();
        let required = [VM_PRIVILEGES, CRYPTO_PRIVILEGES].concat();
        let needed = lacks(&missing, &required);
        if needed.is_empty() {
            out.add("vm.privileges", Level::Pass, &vm.name, None, format!("the account may back it up{}", note(h)), "");
        } else {
            out.add(
                "vm.privileges",
                Level::Fail,
                &vm.name,
                None,
                format!("the account lacks {} on this VM", needed.join(", ")),
                "grant them to the backup account's role on the VM (or a folder above it, propagated)",
            );
        }
        let guest = lacks(&missing, GUEST_PRIVILEGES);
        if !guest.is_empty() {
            out.add(
                "vm.privileges_guest",
                Level::Warn,
                &vm.name,
                None,
                format!("the account lacks {}: guest freeze scripts cannot run", guest.join(", ")),
                "grant the guest operations privileges if this VM uses guest hooks",
            );
        }
    }
    let mut entities: Vec<(&MoRef, &Held)> = held.iter().collect();
    entities.sort_by(|a, b| (&a.0.kind, &a.0.value).cmp(&(&b.0.kind, &b.0.value)));
    for (entity, h) in entities {
        let missing = h.missing();
        match entity.kind.as_str() {
            "Datastore" => {
                let name =
                    estate.datastores.iter().find(|d| &d.moref == entity).map_or(entity.value.as_str(), |d| &d.name);
                let subject = format!("datastore {name}");
                if missing.is_empty() {
                    out.add(
                        "datastore.privileges",
                        Level::Pass,
                        &subject,
                        None,
                        format!("browse and manage files{}", note(h)),
                        "",
                    );
                } else {
                    out.add(
                        "datastore.privileges",
                        Level::Fail,
                        &subject,
                        None,
                        format!(
                            "the account lacks {}: disks cannot be read over HTTPS, nor CBT files reset",
                            missing.join(", ")
                        ),
                        "grant them on the datastore",
                    );
                }
            }
            "ClusterComputeResource" => {
                let name =
                    estate.clusters.iter().find(|c| &c.moref == entity).map_or(entity.value.as_str(), |c| &c.name);
                let subject = format!("cluster {name}");
                if missing.is_empty() {
                    out.add(
                        "cluster.privileges",
                        Level::Pass,
                        &subject,
                        None,
                        "may pin VMs against DRS moves".into(),
                        "",
                    );
                } else {
                    out.add(
                        "cluster.privileges",
                        Level::Warn,
                        &subject,
                        None,
                        format!(
                            "the account lacks {}: VMs are not pinned against DRS moves while read",
                            missing.join(", ")
                        ),
                        "grant Host.Inventory.EditCluster on the cluster, or set its DRS to manual during backups",
                    );
                }
            }
            "Folder" => {
                let level = match (missing.is_empty(), vddk) {
                    (true, _) => Level::Pass,
                    (false, VddkFacts::Found(_)) => Level::Fail,
                    (false, _) => Level::Warn,
                };
                let reason = if missing.is_empty() {
                    format!("global privileges held{}", note(h))
                } else {
                    format!("the account lacks {}: VDDK cannot prepare VMs for access", missing.join(", "))
                };
                out.add("server.privileges", level, "server", None, reason, "grant them at the vCenter root");
            }
            // VMs were judged above.
            _ => {}
        }
    }
}

fn check_server(estate: &Estate, out: &mut Out) {
    let s = &estate.server;
    let (_, verdict) = support(&s.api_type, &s.api_version);
    let what =
        format!("{} {} (API {})", if s.api_type == "HostAgent" { "ESXi" } else { "vCenter" }, s.version, s.api_version);
    match verdict {
        Support::Supported => {
            out.add("server.version", Level::Pass, "server", None, format!("{what} is supported"), "")
        }
        Support::Untested(why) => out.add(
            "server.version",
            Level::Warn,
            "server",
            None,
            format!("{what}: {why}"),
            "report problems with this version; it has not been tested",
        ),
        Support::Unsupported(why) => out.add(
            "server.version",
            Level::Fail,
            "server",
            None,
            format!("{what}: {why}"),
            "upgrade to vCenter 5.1 or later (ESXi 5.0 or later)",
        ),
    }
    match s.tls_version.as_deref() {
        Some(v) if v.contains("1_0") || v.contains("1_1") || v.contains("1.0") || v.contains("1.1") => out.add(
            "server.tls",
            Level::Warn,
            "server",
            None,
            format!("the server speaks only {v}, which is broken cryptography"),
            "upgrade the server; until then --legacy-tls allows it for this server only",
        ),
        Some(v) => out.add("server.tls", Level::Pass, "server", None, format!("TLS {v}"), ""),
        None => out.add("server.tls", Level::Pass, "server", None, "TLS version not reported".into(), ""),
    }
}

/// The cores and memory the proxy should have (the seed's Sync Proxy: 4 cores, 8 GB).
pub const MIN_PROXY_CORES: usize = 4;
/// See [`MIN_PROXY_CORES`].
pub const MIN_PROXY_MEMORY: u64 = 8 << 30;
/// Below this much free space where the proxy writes, nothing can be written safely.
pub const MIN_TARGET_FREE: u64 = 1 << 30;

/// Releases the proxy is tested on (`ID`, `VERSION_ID` of os-release).
const TESTED_OS: &[(&str, &[&str])] = &[
    ("ubuntu", &["22.04", "24.04"]),
    ("debian", &["12", "13"]),
    ("rhel", &["8", "9"]),
    ("rocky", &["8", "9"]),
    ("almalinux", &["8", "9"]),
];

/// The proxy host: its OS, cores and memory, free space where it writes against what the
/// checked VMs' disks may need, and whether its throttling suits the VMs it runs at once.
pub fn check_proxy(p: &crate::proxy_host::ProxyFacts, estate: &Estate) -> Vec<Finding> {
    let mut out = Out { list: Vec::new() };
    let s = "proxy";
    let name = p.os_name.clone().unwrap_or_else(|| "an unknown Linux".into());
    let major = |v: &str| v.split('.').next().unwrap_or(v).to_owned();
    let tested = match (p.os_id.as_deref(), p.os_version.as_deref()) {
        (Some(id), Some(v)) => TESTED_OS
            .iter()
            .any(|(i, vs)| *i == id && vs.iter().any(|t| *t == v || (!t.contains('.') && *t == major(v)))),
        _ => false,
    };
    if tested {
        out.add("proxy.os", Level::Pass, s, None, name, "");
    } else {
        out.add(
            "proxy.os",
            Level::Warn,
            s,
            None,
            format!("{name} is not among the tested releases"),
            "run the proxy on Ubuntu 22.04 or 24.04, Debian 12 or 13, or RHEL 8 or 9 (or a rebuild)",
        );
    }
    let level = if p.cores >= MIN_PROXY_CORES { Level::Pass } else { Level::Warn };
    out.add(
        "proxy.cores",
        level,
        s,
        None,
        format!("{} core(s)", p.cores),
        "give the proxy at least 4 cores: hashing and compression run on them",
    );
    match p.memory {
        Some(m) => out.add(
            "proxy.memory",
            if m >= MIN_PROXY_MEMORY { Level::Pass } else { Level::Warn },
            s,
            None,
            format!("{} MiB of memory", m >> 20),
            "give the proxy at least 8 GB, or lower --memory and the VMs at once",
        ),
        None => out.add("proxy.memory", Level::Warn, s, None, "memory unknown".into(), "check /proc/meminfo"),
    }
    let need: u64 = estate.vms.iter().flat_map(|v| v.disks.iter()).map(|d| d.capacity).sum();
    for (path, free) in &p.targets {
        let (level, reason) = match free {
            None => (Level::Warn, format!("{}: free space unknown", path.display())),
            Some(f) if *f < MIN_TARGET_FREE => (Level::Fail, format!("{}: only {} MiB free", path.display(), f >> 20)),
            Some(f) if *f < need => (
                Level::Warn,
                format!(
                    "{}: {} GiB free; the checked VMs' disks hold up to {} GiB (a first full copy, before \
                     compression and deduplication)",
                    path.display(),
                    f >> 30,
                    need >> 30
                ),
            ),
            Some(f) => (Level::Pass, format!("{}: {} GiB free", path.display(), f >> 30)),
        };
        out.add("proxy.free_space", level, s, None, reason, "free space there, or write somewhere larger");
    }
    let hosts: HashSet<&MoRef> = estate.vms.iter().filter_map(|v| v.host.as_ref()).collect();
    let at_once = p.max_vms.min(estate.vms.len()).max(1);
    let busy_hosts = hosts.len().min(at_once).max(1);
    let t = p.release_cpu_time;
    let (level, reason, fix) = if t == 0 && at_once > MIN_PROXY_CORES.max(p.cores) * 4 && busy_hosts > 1 {
        (
            Level::Warn,
            format!(
                "release_cpu_time is 0 with up to {at_once} VMs at once on {busy_hosts} hosts: the streams may \
                 starve each other and the hosts' storage"
            ),
            format!("set release_cpu_time to the number of hosts read at once ({busy_hosts})"),
        )
    } else if t as usize > 4 * busy_hosts {
        (
            Level::Warn,
            format!(
                "release_cpu_time is {t} ms per request with {busy_hosts} host(s) read at once: slower than needed"
            ),
            format!("lower release_cpu_time to about {busy_hosts} (0 for full speed)"),
        )
    } else {
        (
            Level::Pass,
            format!("release_cpu_time {t} ms per request, up to {at_once} VMs at once on {busy_hosts} host(s)"),
            String::new(),
        )
    };
    out.add("proxy.throttle", level, s, None, reason, &fix);
    out.list
}

/// Where a vSphere release stands in the order VDDK's support policy counts in.
fn release_index(major: u32, minor: u32) -> Option<i64> {
    Some(match (major, minor) {
        (5, m) if m >= 5 => 0,
        (6, 0..=4) => 1,
        (6, 5..=6) => 2,
        (6, _) => 3,
        (7, _) => 4,
        (8, _) => 5,
        (9, _) => 6,
        _ => return None,
    })
}

/// VDDK N supports vSphere N-2 to N+1 (reference 1.8): VDDK 8.0 reads 6.7, 7.0 and 8.x. The
/// library's soname gives its major version; `.so.6` is taken as 6.7, the last of that line.
fn check_vddk(estate: &Estate, vddk: &VddkFacts, out: &mut Out) {
    let VddkFacts::Found(v) = vddk else {
        if let VddkFacts::Broken(e) = vddk {
            out.add(
                "vddk.compatible",
                Level::Fail,
                "server",
                None,
                format!("VDDK: {e}"),
                "point --vddk-libdir at VDDK's folder",
            );
        }
        return;
    };
    let major: Option<u32> = v.split('.').next().and_then(|m| m.trim().parse().ok());
    let lib = major.and_then(|m| release_index(m, if m == 6 { 7 } else { 0 }));
    let server = ApiVersion::parse(&estate.server.api_version).and_then(|a| release_index(a.major(), a.minor()));
    match (lib, server) {
        (Some(l), Some(s)) if (l - 2..=l + 1).contains(&s) => out.add(
            "vddk.compatible",
            Level::Pass,
            "server",
            None,
            format!("VDDK {v} supports vSphere API {}", estate.server.api_version),
            "",
        ),
        (Some(_), Some(_)) => out.add(
            "vddk.compatible",
            Level::Fail,
            "server",
            None,
            format!("VDDK {v} does not support vSphere API {} (VDDK N supports N-2 to N+1)", estate.server.api_version),
            "install the VDDK release that matches the vCenter",
        ),
        _ => out.add(
            "vddk.compatible",
            Level::Warn,
            "server",
            None,
            format!("cannot tell whether VDDK {v} supports vSphere API {}", estate.server.api_version),
            "check VMware's interoperability matrix",
        ),
    }
}

fn check_host(h: &Host, out: &mut Out) {
    let subject = format!("host {}", h.name);
    // The host's product version judged by the same matrix as a standalone ESXi's API.
    match h.version.as_deref().filter(|v| ApiVersion::parse(v).is_some()) {
        None => out.add(
            "host.version",
            Level::Warn,
            &subject,
            None,
            format!("the host's version is unknown ({:?})", h.version),
            "check that vCenter can reach the host",
        ),
        Some(v) => match support("HostAgent", v).1 {
            Support::Supported => out.add("host.version", Level::Pass, &subject, None, format!("ESXi {v}"), ""),
            Support::Untested(why) => {
                out.add("host.version", Level::Warn, &subject, None, why, "report problems with this version")
            }
            Support::Unsupported(why) => {
                out.add("host.version", Level::Fail, &subject, None, why, "upgrade the host to ESXi 5.0 or later")
            }
        },
    }
    match &h.connection_state {
        Some(ConnectionState::Connected) | None => {}
        Some(state) => out.add(
            "host.connection",
            Level::Fail,
            &subject,
            None,
            format!("the host is {state}"),
            "reconnect the host in vCenter",
        ),
    }
}

fn hardware(vm: &Vm) -> Option<u32> {
    vm.hardware_version.as_deref()?.strip_prefix("vmx-")?.parse().ok()
}

fn check_vm(estate: &Estate, vm: &Vm, vddk: &VddkFacts, live_jobs: &HashSet<String>, out: &mut Out) {
    let n = vm.name.as_str();
    let host = vm.host.as_ref().and_then(|m| estate.hosts.iter().find(|h| &h.moref == m));
    let hw = hardware(vm);
    match hw {
        Some(v) if v < 4 => out.add(
            "vm.hardware",
            Level::Fail,
            n,
            None,
            format!("hardware version vmx-{v:02}"),
            "upgrade the VM's hardware",
        ),
        Some(v) if v < 7 => out.add(
            "vm.hardware",
            Level::Warn,
            n,
            None,
            format!("hardware version vmx-{v:02} has no CBT: every backup is a full copy"),
            "upgrade the VM's hardware to vmx-07 or later",
        ),
        Some(v) => out.add("vm.hardware", Level::Pass, n, None, format!("hardware version vmx-{v:02}"), ""),
        None => out.add(
            "vm.hardware",
            Level::Warn,
            n,
            None,
            format!("hardware version unknown ({:?})", vm.hardware_version),
            "check the VM's configuration",
        ),
    }
    match &vm.power_state {
        Some(PowerState::Suspended) => out.add(
            "vm.power",
            Level::Warn,
            n,
            None,
            "suspended: snapshots of a suspended VM include its memory on older hosts".into(),
            "resume or power off the VM before backing it up",
        ),
        Some(p) => out.add("vm.power", Level::Pass, n, None, p.to_string(), ""),
        None => {}
    }
    if vm.pci_passthrough.is_empty() {
        out.add("vm.pci_passthrough", Level::Pass, n, None, "no PCI passthrough devices".into(), "");
    } else {
        out.add(
            "vm.pci_passthrough",
            Level::Fail,
            n,
            None,
            format!("{} PCI passthrough device(s): the VM cannot be snapshotted", vm.pci_passthrough.len()),
            "remove the passthrough devices, or back this VM up from inside the guest",
        );
    }
    if !vm.usb.is_empty() {
        out.add(
            "vm.usb",
            Level::Warn,
            n,
            None,
            format!("{} USB device(s): not backed up, and they do not follow a restore to another host", vm.usb.len()),
            "reattach USB devices after a restore",
        );
    }
    if vm.shared_bus_controllers.is_empty() {
        out.add("vm.shared_bus", Level::Pass, n, None, "no SCSI bus sharing".into(), "");
    } else {
        out.add(
            "vm.shared_bus",
            Level::Fail,
            n,
            None,
            "a SCSI controller shares its bus (a cluster node): such VMs cannot be snapshotted".into(),
            "back the cluster's shared disks up another way; set bus sharing to none where possible",
        );
    }
    if vm.key_id.is_some() {
        // VDDK decrypts; the datastore holds only ciphertext.
        let (level, fix) = if matches!(vddk, VddkFacts::Found(_)) {
            (Level::Warn, "read through VDDK: the account needs Cryptographer.Access")
        } else {
            (Level::Fail, "configure VDDK (--vddk-libdir): HTTPS reads cannot decrypt")
        };
        out.add("vm.encryption", level, n, None, "the VM is encrypted".into(), fix);
    } else {
        out.add("vm.encryption", Level::Pass, n, None, "not encrypted".into(), "");
    }
    check_snapshots(estate, vm, live_jobs, out);
    if vm.consolidation_needed == Some(true) {
        out.add(
            "vm.consolidation",
            Level::Warn,
            n,
            None,
            "the VM needs disk consolidation (deltas left by a failed snapshot removal)".into(),
            "consolidate the VM's disks; the backup consolidates after its own snapshot",
        );
    } else {
        out.add("vm.consolidation", Level::Pass, n, None, "no consolidation needed".into(), "");
    }
    match &vm.tools {
        Some(t) if t.running() => {
            out.add("vm.tools", Level::Pass, n, None, "VMware Tools run: backups are quiesced".into(), "")
        }
        other => out.add(
            "vm.tools",
            Level::Warn,
            n,
            None,
            format!(
                "VMware Tools are not running ({}): backups are crash-consistent",
                other.as_ref().map_or("unknown", ToolsRunningStatus::as_str)
            ),
            "install and start VMware Tools for application-consistent backups",
        ),
    }
    check_guest_os(vm, out);
    for g in &vm.guest_disks {
        let level = if g.free < MIN_GUEST_FREE { Level::Warn } else { Level::Pass };
        out.add(
            "vm.guest_space",
            level,
            n,
            None,
            format!("{} has {} MiB free", g.path, g.free >> 20),
            "free at least 100 MiB: quiescing needs room in the guest",
        );
    }
    let cluster = host.and_then(|h| h.parent.as_ref()).and_then(|p| estate.clusters.iter().find(|c| &c.moref == p));
    if let Some(c) = cluster
        && c.may_move(&vm.moref)
    {
        // The backup pins the VM (a per-VM override to manual) while it reads it, given
        // Host.Inventory.EditCluster (`cluster.privileges` says whether the account has it).
        out.add(
            "vm.drs",
            Level::Warn,
            n,
            None,
            format!(
                "cluster {} may move this VM on its own (DRS): backups override it to manual while they read, \
                 and put it back",
                c.name
            ),
            "grant Host.Inventory.EditCluster on the cluster so the override can be set, or keep DRS manual",
        );
    }
    match (vm.cbt_supported, hw) {
        (Some(false), _) => out.add(
            "vm.cbt_supported",
            Level::Warn,
            n,
            None,
            "the VM cannot track changed blocks: every backup is a full copy".into(),
            "upgrade the VM's hardware to vmx-07 or later",
        ),
        (_, Some(v)) if v < 7 => {}
        _ => out.add("vm.cbt_supported", Level::Pass, n, None, "CBT is possible".into(), ""),
    }
    let all_ids = vm.disks.iter().all(|d| d.change_id.is_some());
    match vm.cbt_enabled {
        Some(true) if all_ids => {
            out.add("vm.cbt_active", Level::Pass, n, None, "CBT is on with a change ID per disk".into(), "")
        }
        Some(true) => out.add(
            "vm.cbt_active",
            Level::Warn,
            n,
            None,
            "CBT is on but not every disk has a change ID yet".into(),
            "the first backup's snapshot activates it; nothing to do",
        ),
        _ => out.add(
            "vm.cbt_active",
            Level::Warn,
            n,
            None,
            "CBT is off: the first backup turns it on and copies in full".into(),
            "nothing to do, or enable CBT while the VM has no snapshots",
        ),
    }
    for d in &vm.disks {
        check_disk(estate, vm, d, host, vddk, out);
    }
}

/// The guest operating system against the support list (`data/guest-os.toml`).
fn check_guest_os(vm: &Vm, out: &mut Out) {
    let n = vm.name.as_str();
    let Some(id) = vm.guest_id.as_deref().filter(|g| !g.is_empty()) else {
        out.add(
            "vm.guest_os",
            Level::Warn,
            n,
            None,
            "the guest operating system is not set".into(),
            "set the VM's guest OS in its settings",
        );
        return;
    };
    match crate::catalog::guest(id) {
        Some(g) => {
            let (level, fix) = match g.support {
                GuestSupport::Supported => (Level::Pass, ""),
                GuestSupport::CrashConsistent => {
                    (Level::Warn, "expect crash-consistent restore points, or quiesce the applications with a hook")
                }
                GuestSupport::Unsupported => (Level::Fail, "back this guest up from inside, or accept untested copies"),
            };
            out.add("vm.guest_os", level, n, None, format!("{id} ({}): {}", g.family, g.note), fix);
        }
        None => out.add(
            "vm.guest_os",
            Level::Warn,
            n,
            None,
            format!("{id} is not in the guest support list"),
            "check the guest's support, then add it to data/guest-os.toml",
        ),
    }
}

fn check_snapshots(estate: &Estate, vm: &Vm, live_jobs: &HashSet<String>, out: &mut Out) {
    let n = vm.name.as_str();
    let depth = vm.snapshot_depth();
    let all = vm.all_snapshots();
    let foreign: Vec<&str> = all.iter().filter(|s| job_of(&s.name).is_none()).map(|s| s.name.as_str()).collect();
    if depth >= MAX_SNAPSHOT_DEPTH {
        out.add(
            "vm.snapshots",
            Level::Fail,
            n,
            None,
            format!("the snapshot chain is {depth} deep (the limit is 32)"),
            "delete snapshots, then consolidate",
        );
    } else if !foreign.is_empty() {
        out.add(
            "vm.snapshots",
            Level::Warn,
            n,
            None,
            format!(
                "{} snapshot(s) not made by syncproxy: {}; backups read through the chain (over HTTPS, each delta \
                 layer is read in ranges), and CBT cannot be turned on while they exist",
                foreign.len(),
                foreign.join(", ")
            ),
            "delete snapshots nobody needs: every snapshot grows and slows the VM",
        );
    } else {
        out.add("vm.snapshots", Level::Pass, n, None, format!("{} snapshot(s)", all.len()), "");
    }
    for s in &all {
        if let Some(product) = crate::catalog::product_of(&s.name, &s.description) {
            out.add(
                "vm.foreign_backup",
                Level::Warn,
                n,
                None,
                format!("snapshot {:?} was made by {product}, which backs this VM up too", s.name),
                "back each VM up with one product: two that use CBT and snapshots on one VM get in each other's way",
            );
        }
    }
    for s in all {
        let age = estate.now.zip(parse_server_time(&s.create_time)).and_then(|(now, t)| now.duration_since(t).ok());
        let age_text = age.map_or_else(
            || "of unknown age".to_owned(),
            |a| format!("{} old", humantime::format_duration(Duration::from_secs(a.as_secs()))),
        );
        if age.is_some_and(|a| a > OLD_SNAPSHOT) {
            out.add(
                "vm.snapshot_old",
                Level::Warn,
                n,
                None,
                format!("snapshot {:?} is {age_text} by the server's clock", s.name),
                "delete snapshots older than a day: they grow and slow the VM",
            );
        }
        if let Some(job) = job_of(&s.name) {
            let (level, reason) = if live_jobs.contains(job) {
                (Level::Pass, format!("snapshot {:?} ({age_text}) belongs to job {job}, running now", s.name))
            } else {
                (Level::Warn, format!("snapshot {:?} ({age_text}) was left by job {job}, which is not running", s.name))
            };
            out.add(
                "vm.snapshot_stale",
                level,
                n,
                None,
                reason,
                "the next backup removes it once it is older than the longest job",
            );
        }
    }
}

fn check_disk(estate: &Estate, vm: &Vm, d: &vsphere::Disk, host: Option<&Host>, vddk: &VddkFacts, out: &mut Out) {
    let n = vm.name.as_str();
    let slot = d.bus_slot.clone().unwrap_or_else(|| format!("disk{}", d.key));
    let s = Some(slot.as_str());
    if !d.independent() {
        out.add("disk.mode", Level::Pass, n, s, d.mode.to_string(), "");
    }
    // Whether the disk can be copied at all: the rule the backup and `cbt-reset` follow too.
    for why in d.not_copyable() {
        let (code, level, fix) = match why {
            NotCopyable::Independent(_) => {
                ("disk.mode", Level::Warn, "set the disk to dependent (persistent) mode if it must be backed up")
            }
            NotCopyable::RdmPhysical => {
                ("disk.rdm", Level::Fail, "convert it to virtual mode, or back the LUN up on the storage side")
            }
        };
        out.add(code, level, n, s, format!("{} is {why}", d.label), fix);
    }
    if d.backing == BackingKind::RdmVirtual {
        out.add("disk.rdm", Level::Pass, n, s, "a virtual-mode RDM (snapshots and CBT work)".into(), "");
    }
    if d.sharing.as_deref().is_some_and(|x| x != "sharingNone") {
        out.add(
            "disk.sharing",
            Level::Fail,
            n,
            s,
            format!("the disk is shared ({}) with other VMs", d.sharing.as_deref().unwrap_or("")),
            "a shared (multi-writer) disk cannot be snapshotted: make it non-shared, or back it up another way",
        );
    }
    let old_host =
        host.and_then(|h| h.version.as_deref()).and_then(ApiVersion::parse).is_some_and(|v| !v.at_least(5, 5));
    if d.capacity > TWO_TB && old_host {
        out.add(
            "disk.size",
            Level::Fail,
            n,
            s,
            format!("{} bytes, over 2 TB, on ESXi before 5.5", d.capacity),
            "move the VM to ESXi 5.5 or later",
        );
    }
    let ds = d.datastore.as_ref().and_then(|m| estate.datastores.iter().find(|x| &x.moref == m));
    let kind = ds.and_then(|x| x.kind.clone()).unwrap_or_default();
    let k = kind.to_ascii_lowercase();
    if !kind.is_empty() {
        if k == "vmfs" || k.starts_with("nfs") || k == "vsan" || k == "vvol" {
            out.add("disk.cbt_storage", Level::Pass, n, s, format!("on {kind} storage, which tracks changes"), "");
        } else {
            out.add(
                "disk.cbt_storage",
                Level::Warn,
                n,
                s,
                format!("on {kind} storage: changed-block tracking may not work there"),
                "keep disks on VMFS or NFS datastores",
            );
        }
    }
    if vm.cbt_enabled == Some(true) && d.change_id.is_none() && !d.independent() {
        out.add(
            "disk.cbt",
            Level::Warn,
            n,
            s,
            "no change ID: CBT does not track this disk yet".into(),
            "the next snapshot activates tracking; if it stays, reset CBT",
        );
    }
    // Which transports reach the disk.
    let mut ways = Vec::new();
    let mut why_not = Vec::new();
    if k == "vsan" || k == "vvol" {
        why_not.push(format!("HTTPS: not for {kind} datastores"));
    } else if d.key_id.is_some() || vm.key_id.is_some() {
        why_not.push("HTTPS: not for encrypted disks".to_owned());
    } else {
        ways.push("HTTPS".to_owned());
    }
    match vddk {
        VddkFacts::Found(v) => ways.push(format!("VDDK {v}")),
        VddkFacts::NotConfigured => why_not.push("VDDK: not configured (--vddk-libdir)".into()),
        VddkFacts::Broken(e) => why_not.push(format!("VDDK: {e}")),
    }
    let level = if ways.is_empty() { Level::Fail } else { Level::Pass };
    let reason = if why_not.is_empty() {
        format!("reachable by {}", ways.join(", "))
    } else if ways.is_empty() {
        format!("no transport reaches it ({})", why_not.join("; "))
    } else {
        format!("reachable by {} ({})", ways.join(", "), why_not.join("; "))
    };
    out.add("disk.transport", level, n, s, reason, "configure VDDK for this disk (--vddk-libdir)");
}

/// Whether `host:port` accepts a TCP connection within `timeout`.
pub async fn reachable(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}

/// Port checks: each host that runs a checked VM, on `https` (443: datastore reads straight
/// from the host; through vCenter they still work, more slowly) and `nfc` (902: VDDK's NBD
/// transport, needed only when VDDK is used).
pub async fn check_ports(estate: &Estate, vddk: &VddkFacts, https: u16, nfc: u16, timeout: Duration) -> Vec<Finding> {
    let mut out = Out { list: Vec::new() };
    let involved: HashSet<&MoRef> = estate.vms.iter().filter_map(|v| v.host.as_ref()).collect();
    let vcenter = estate.server.api_type == "VirtualCenter";
    let uses_vddk = matches!(vddk, VddkFacts::Found(_));
    for h in estate.hosts.iter().filter(|h| involved.contains(&h.moref)) {
        let subject = format!("host {}", h.name);
        let checks = [
            ("host.port.https", https, "datastore reads straight from the host", !vcenter),
            ("host.port.nfc", nfc, "VDDK's NBD transport (NFC)", uses_vddk),
        ];
        for (code, port, what, needed) in checks {
            match reachable(&h.name, port, timeout).await {
                Ok(()) => out.add(code, Level::Pass, &subject, None, format!("port {port} answers ({what})"), ""),
                Err(e) => out.add(
                    code,
                    if needed { Level::Fail } else { Level::Warn },
                    &subject,
                    None,
                    format!(
                        "port {port} of {} cannot be reached: {e}; {what} will not work{}",
                        h.name,
                        if needed { "" } else { " (not needed by the configured transports)" }
                    ),
                    "open the port from the proxy to the host (firewall), and make the host's name resolve",
                ),
            }
        }
    }
    out.list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> Vm {
        Vm {
            moref: MoRef::new("VirtualMachine", name),
            name: name.into(),
            instance_uuid: Some("u".into()),
            bios_uuid: None,
            hardware_version: Some("vmx-19".into()),
            power_state: Some("poweredOn".into()),
            connection_state: Some("connected".into()),
            cbt_enabled: Some(true),
            cbt_supported: Some(true),
            consolidation_needed: Some(false),
            key_id: None,
            tools: Some("guestToolsRunning".into()),
            guest_id: Some("ubuntu64Guest".into()),
            vmx_path: None,
            host: None,
            disks: Vec::new(),
            usb: Vec::new(),
            pci_passthrough: Vec::new(),
            shared_bus_controllers: Vec::new(),
            snapshots: Vec::new(),
            current_snapshot: None,
            guest_disks: Vec::new(),
        }
    }

    fn disk_of(capacity: u64) -> vsphere::Disk {
        vsphere::Disk {
            key: 2000,
            label: "Hard disk 1".into(),
            capacity,
            file_name: "[ds1] v/v.vmdk".into(),
            base_file_name: "[ds1] v/v.vmdk".into(),
            backing: BackingKind::Flat,
            mode: "persistent".into(),
            sharing: None,
            change_id: Some("52 aa/1".into()),
            thin: Some(true),
            datastore: None,
            controller_key: None,
            unit_number: None,
            bus_slot: Some("scsi0:0".into()),
            key_id: None,
        }
    }

    fn codes(f: &[Finding], level: Level) -> Vec<&'static str> {
        f.iter().filter(|x| x.level == level).map(|x| x.code).collect()
    }

    #[test]
    fn a_healthy_vm_passes_and_an_old_server_fails() {
        let estate = Estate {
            server: ServerFacts {
                api_type: "VirtualCenter".into(),
                api_version: "8.0.2.0".into(),
                version: "8.0.2".into(),
                tls_version: Some("TLSv1_3".into()),
            },
            vms: vec![vm("good")],
            ..Estate::default()
        };
        let f = check(&estate, &VddkFacts::NotConfigured, &HashSet::new());
        assert!(codes(&f, Level::Fail).is_empty() && codes(&f, Level::Warn).is_empty(), "{f:#?}");
        let old = Estate {
            server: ServerFacts { api_version: "5.0".into(), version: "5.0.0".into(), ..estate.server.clone() },
            ..estate
        };
        let f = check(&old, &VddkFacts::NotConfigured, &HashSet::new());
        assert_eq!(codes(&f, Level::Fail), ["server.version"], "{f:#?}");
        assert!(f.iter().all(|x| x.level == Level::Pass || !x.fix.is_empty()), "every problem says its fix");
    }

    #[test]
    fn the_proxy_host_is_judged_by_its_size_space_and_throttle() {
        use crate::proxy_host::ProxyFacts;
        let mut vms: Vec<Vm> = (0..40).map(|i| vm(&format!("v{i}"))).collect();
        for (i, v) in vms.iter_mut().enumerate() {
            v.host = Some(MoRef::new("HostSystem", &format!("host-{}", i % 5)));
            v.disks.push(disk_of(10 << 30));
        }
        let estate = Estate { vms, ..Estate::default() };
        let big = ProxyFacts {
            os_id: Some("ubuntu".into()),
            os_version: Some("24.04".into()),
            os_name: Some("Ubuntu 24.04.1 LTS".into()),
            cores: 8,
            memory: Some(16 << 30),
            targets: vec![("/big".into(), Some(1 << 40))],
            max_vms: 100,
            release_cpu_time: 5,
        };
        let f = check_proxy(&big, &estate);
        assert!(f.iter().all(|x| x.level == Level::Pass), "{f:#?}");
        let small = ProxyFacts {
            os_id: Some("gentoo".into()),
            cores: 2,
            memory: Some(4 << 30),
            targets: vec![("/tiny".into(), Some(100 << 20)), ("/half".into(), Some(200 << 30))],
            release_cpu_time: 0,
            ..big.clone()
        };
        let f = check_proxy(&small, &estate);
        let level = |code: &str, n: usize| f.iter().filter(|x| x.code == code).nth(n).map(|x| x.level);
        assert_eq!(level("proxy.os", 0), Some(Level::Warn));
        assert_eq!(level("proxy.cores", 0), Some(Level::Warn));
        assert_eq!(level("proxy.memory", 0), Some(Level::Warn));
        assert_eq!(level("proxy.free_space", 0), Some(Level::Fail), "under 1 GiB: {f:#?}");
        assert_eq!(level("proxy.free_space", 1), Some(Level::Warn), "less than the 400 GiB of disks");
        assert_eq!(level("proxy.throttle", 0), Some(Level::Warn), "40 VMs on 5 hosts at full speed");
        let slow = ProxyFacts { release_cpu_time: 100, ..big };
        let f = check_proxy(&slow, &estate);
        assert!(f.iter().any(|x| x.code == "proxy.throttle" && x.level == Level::Warn && x.fix.contains("about 5")));
    }

    #[test]
    fn vddk_n_supports_vsphere_n_minus_2_to_n_plus_1() {
        let estate = |api: &str| Estate {
            server: ServerFacts { api_type: "VirtualCenter".into(), api_version: api.into(), ..ServerFacts::default() },
            ..Estate::default()
        };
        let level = |api: &str, v: &str| {
            check(&estate(api), &VddkFacts::Found(v.into()), &HashSet::new())
                .into_iter()
                .find(|f| f.code == "vddk.compatible")
                .map(|f| f.level)
        };
        assert_eq!(level("8.0.2.0", "8"), Some(Level::Pass));
        assert_eq!(level("6.7.3", "8"), Some(Level::Pass));
        assert_eq!(level("6.5", "8"), Some(Level::Fail));
        assert_eq!(level("8.0", "6"), Some(Level::Fail));
        assert_eq!(level("7.0.3.0", "6"), Some(Level::Pass), "6.7's VDDK reads 7.0");
        assert_eq!(level("4.1", "8"), Some(Level::Warn));
        assert_eq!(level("8.0", "x"), Some(Level::Warn));
        let none = check(&estate("8.0"), &VddkFacts::NotConfigured, &HashSet::new());
        assert!(none.iter().all(|f| f.code != "vddk.compatible"));
    }

    #[test]
    fn hardware_power_tools_and_cbt_warn() {
        let mut v = vm("old");
        v.hardware_version = Some("vmx-04".into());
        v.tools = Some("guestToolsNotRunning".into());
        v.cbt_enabled = None;
        v.power_state = Some("suspended".into());
        let estate = Estate { vms: vec![v], ..Estate::default() };
        let f = check(&estate, &VddkFacts::NotConfigured, &HashSet::new());
        let warns = codes(&f, Level::Warn);
        for c in ["vm.hardware", "vm.power", "vm.tools", "vm.cbt_active"] {
            assert!(warns.contains(&c), "{c} in {warns:?}");
        }
    }
}
