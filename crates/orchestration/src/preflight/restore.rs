//! What a restore into vSphere needs, checked before it runs: the target resolved by name (as
//! `proxy restore` takes it), the account's privileges on each entity the restore acts on, the
//! datastore's free space against the point's disks, and the host's ESXi against the VM's
//! virtual hardware. Facts are gathered by [`gather`]; [`check`] is a pure function of them.

use std::collections::HashMap;

use repo::Repo;
use vsphere::facts::{Datastore, Host};
use vsphere::privileges::Held;
use vsphere::version::ApiVersion;
use vsphere::{Client, MoRef};

use super::{Finding, Level, Out, PrivilegeFacts};
use crate::{OrchError, human_bytes};

/// Creating the VM in its folder with its disks attached, renaming it (a restore's commit) and
/// destroying it (undoing a failed restore); granted on the folder, they reach the new VM.
pub const FOLDER_PRIVILEGES: &[&str] = &[
    "VirtualMachine.Inventory.Create",
    "VirtualMachine.Config.AddNewDisk",
    "VirtualMachine.Config.AddExistingDisk",
    "VirtualMachine.Config.Rename",
    "VirtualMachine.Inventory.Delete",
];
/// Uploading the disks, converting them and making the VM's folder on the datastore.
pub const DATASTORE_PRIVILEGES: &[&str] = &["Datastore.AllocateSpace", "Datastore.FileManagement", "Datastore.Browse"];
/// Placing the VM in its resource pool.
pub const POOL_PRIVILEGES: &[&str] = &["Resource.AssignVMToPool"];
/// Putting a NIC on a network.
pub const NETWORK_PRIVILEGES: &[&str] = &["Network.Assign"];

/// Where a restore goes, by name, as `proxy restore` takes it.
#[derive(Debug, Clone, Default)]
pub struct TargetNames {
    /// The datacenter (`None`: the only one).
    pub datacenter: Option<String>,
    /// The host.
    pub host: Option<String>,
    /// The cluster.
    pub cluster: Option<String>,
    /// The resource pool.
    pub pool: Option<String>,
    /// The VM folder, a path under the datacenter's VM folder.
    pub folder: Option<String>,
    /// The datastore (`None`: the only one).
    pub datastore: Option<String>,
    /// The target networks the NICs would join.
    pub networks: Vec<String>,
}

/// One disk the restore would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskNeed {
    /// Its slot or name (`scsi0:0`).
    pub name: String,
    /// Its size.
    pub capacity: u64,
    /// The bytes of data in it (at most `capacity`), when known: a thin disk takes about that.
    pub data: Option<u64>,
}

/// What the restore would put on the target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreNeeds {
    /// Where these come from (`point 3f2a...`, `--size`), for messages.
    pub source: String,
    /// The virtual hardware version (`19` for `vmx-19`), when known.
    pub hardware_version: Option<u32>,
    /// The disks; none when nothing was said about them.
    pub disks: Vec<DiskNeed>,
    /// Thick provisioning: each disk takes its whole capacity.
    pub thick: bool,
}

/// An inventory object and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The moref.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
}

/// The target, resolved.
#[derive(Debug, Clone)]
pub struct TargetFacts {
    /// The datacenter's inventory path.
    pub datacenter: String,
    /// The VM folder.
    pub folder: Named,
    /// The resource pool.
    pub pool: Named,
    /// Whether a host was named or picked (else the hosts are the compute resource's, and
    /// vCenter picks one).
    pub host_chosen: bool,
    /// The hosts the VM may run on: the chosen one, or every host of the pool's compute resource.
    pub hosts: Vec<Host>,
    /// The datastore, or why none was found.
    pub datastore: Result<Datastore, String>,
    /// Each network named: found, or why not.
    pub networks: Vec<Result<Named, String>>,
    /// What the account holds on the folder, pool, datastore and networks.
    pub privileges: PrivilegeFacts,
}

/// Everything [`check`] looks at.
#[derive(Debug, Clone)]
pub struct RestoreFacts {
    /// What the restore would write.
    pub needs: RestoreNeeds,
    /// The target, or why its names did not resolve.
    pub target: Result<TargetFacts, String>,
}

/// `vmx-19` (or `19`) as 19.
pub fn parse_hardware_version(s: &str) -> Option<u32> {
    let s = s.trim();
    s.strip_prefix("vmx-").unwrap_or(s).trim_matches('"').parse().ok().filter(|v| *v > 0)
}

/// What ESXi a virtual hardware version needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardwareNeed {
    /// Any supported host runs it.
    AnyHost,
    /// At least this ESXi (major, minor, update).
    Esxi(u32, u32, u32),
    /// Newer than this table knows.
    Unknown,
}

/// The oldest ESXi that runs virtual hardware `vmx-hw`.
pub fn min_esxi(hw: u32) -> HardwareNeed {
    let (major, minor, update) = match hw {
        0..=12 => return HardwareNeed::AnyHost,
        13 => (6, 5, 0),
        14 => (6, 7, 0),
        15 => (6, 7, 2),
        // 16 is Workstation's alone; the first ESXi past 6.7 U2 is 7.0.
        16 | 17 => (7, 0, 0),
        18 => (7, 0, 1),
        19 => (7, 0, 2),
        20 => (8, 0, 0),
        21 => (8, 0, 2),
        _ => return HardwareNeed::Unknown,
    };
    HardwareNeed::Esxi(major, minor, update)
}

/// The host's ESXi as (major, minor, update): its product version (`7.0.2`), with the update
/// taken from its API version when that is the same release and more precise (ESXi 6.7 U2 says
/// `6.7.0`, API `6.7.2`).
pub fn esxi_version(h: &Host) -> Option<(u32, u32, u32)> {
    let v = ApiVersion::parse(h.version.as_deref()?)?;
    let three = |a: &ApiVersion| {
        let s = a.to_string();
        let mut p = s.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
        (p.next().unwrap_or(0), p.next().unwrap_or(0), p.next().unwrap_or(0))
    };
    let mut out = three(&v);
    if let Some(api) = h.api_version.as_deref().and_then(ApiVersion::parse) {
        let a = three(&api);
        if (a.0, a.1) == (out.0, out.1) && a.2 > out.2 {
            out.2 = a.2;
        }
    }
    Some(out)
}

/// `6.7 U2`, `8.0`.
pub fn esxi_name((major, minor, update): (u32, u32, u32)) -> String {
    if update == 0 { format!("{major}.{minor}") } else { format!("{major}.{minor} U{update}") }
}

/// The datastore space the restore takes at its peak: every disk's final size (its data when
/// thin, its capacity when thick; the capacity when the data is unknown) plus the largest
/// disk's upload, which stays beside its converted copy until the conversion ends.
pub fn space_needed(needs: &RestoreNeeds) -> u64 {
    let data = |d: &DiskNeed| d.data.unwrap_or(d.capacity).min(d.capacity);
    let kept: u64 =
        needs.disks.iter().map(|d| if needs.thick { d.capacity } else { data(d) }).fold(0, u64::saturating_add);
    let upload = needs.disks.iter().map(data).max().unwrap_or(0);
    kept.saturating_add(upload)
}

/// Resolves `names` and asks what the account holds there. A name that is not found is a fact
/// (a finding), not an error; an error is the server failing to answer.
pub async fn gather(client: &Client, names: &TargetNames, needs: RestoreNeeds) -> Result<RestoreFacts, OrchError> {
    let placement = match client
        .placement(
            names.datacenter.as_deref(),
            names.host.as_deref(),
            names.cluster.as_deref(),
            names.pool.as_deref(),
            names.folder.as_deref(),
        )
        .await
    {
        Ok(p) => p,
        Err(vsphere::Error::Config(why)) => return Ok(RestoreFacts { needs, target: Err(why) }),
        Err(e) => return Err(e.into()),
    };
    let folder = named(client, &placement.vm_folder).await?;
    let pool = named(client, &placement.pool).await?;
    let all_hosts = client.hosts().await?;
    let hosts: Vec<Host> = match &placement.host {
        Some(h) => all_hosts.into_iter().filter(|x| &x.moref == h).collect(),
        None => {
            let owner = client.property(&placement.pool, "owner").await?.as_ref().and_then(MoRef::from_element);
            all_hosts.into_iter().filter(|x| owner.is_some() && x.parent == owner).collect()
        }
    };

    let in_dc: Vec<MoRef> = client
        .datacenters()
        .await?
        .into_iter()
        .find(|d| d.moref == placement.datacenter)
        .map(|d| d.datastores)
        .unwrap_or_default();
    let stores: Vec<Datastore> = client.datastores().await?.into_iter().filter(|d| in_dc.contains(&d.moref)).collect();
    let names_of = |v: &[Datastore]| v.iter().map(|d| d.name.clone()).collect::<Vec<_>>().join(", ");
    let datastore = match &names.datastore {
        Some(w) => stores.iter().find(|d| &d.name == w).cloned().ok_or_else(|| {
            format!("no datastore is called {w:?} in {}; there are: {}", placement.datacenter_name, names_of(&stores))
        }),
        None if stores.len() == 1 => Ok(stores[0].clone()),
        None => Err(format!("there are {} datastores ({}); name one", stores.len(), names_of(&stores))),
    };

    let mut networks = Vec::new();
    if !names.networks.is_empty() {
        let all = client.networks(&placement.datacenter).await?;
        for want in &names.networks {
            networks.push(
                all.iter()
                    .find(|n| &n.name == want)
                    .map(|n| Named { moref: n.moref.clone(), name: n.name.clone() })
                    .ok_or_else(|| {
                        let list: Vec<&str> = all.iter().map(|n| n.name.as_str()).collect();
                        format!("no network is called {want:?}; there are: {}", list.join(", "))
                    }),
            );
        }
    }

    let mut asks: Vec<(MoRef, &[&str])> =
        vec![(folder.moref.clone(), FOLDER_PRIVILEGES), (pool.moref.clone(), POOL_PRIVILEGES)];
    if let Ok(d) = &datastore {
        asks.push((d.moref.clone(), DATASTORE_PRIVILEGES));
    }
    for n in networks.iter().flatten() {
        asks.push((n.moref.clone(), NETWORK_PRIVILEGES));
    }
    let privileges = ask_privileges(client, asks).await;
    Ok(RestoreFacts {
        needs,
        target: Ok(TargetFacts {
            datacenter: placement.datacenter_name,
            folder,
            pool,
            host_chosen: placement.host.is_some(),
            hosts,
            datastore,
            networks,
            privileges,
        }),
    })
}

async fn named(client: &Client, m: &MoRef) -> Result<Named, OrchError> {
    let name = client.property(m, "name").await?.map(|e| e.text.trim().to_owned()).unwrap_or_default();
    Ok(Named { moref: m.clone(), name })
}

/// What restoring point `point` (an ID, a prefix, `VM@latest`...) of `repo` would write: its
/// disks with their data (the chunks that are not all zeros) and the hardware version of its
/// captured `.vmx` (or of `vmx`, given instead).
pub fn needs_of_point(repo: &Repo, point: &str, vmx: Option<&str>, thick: bool) -> Result<RestoreNeeds, OrchError> {
    let m = repo.resolve_point(point)?;
    let captured = match vmx {
        Some(v) => Some(v.to_owned()),
        None => match m.files.iter().find(|f| f.name.ends_with(".vmx")) {
            Some(f) => Some(String::from_utf8_lossy(&repo.file(&m, &f.name)?).into_owned()),
            None => None,
        },
    };
    let hardware_version = match captured {
        Some(text) => drill::vmx::Vmx::parse(&text)?.get("virtualHW.version").and_then(parse_hardware_version),
        None => None,
    };
    let mut disks = Vec::new();
    for (n, d) in m.disks.iter().enumerate() {
        let ix = repo.index(&m, n)?;
        let chunk = u64::from(ix.chunk_size);
        let data = ix
            .ids
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != repo::ZERO)
            .map(|(i, _)| chunk.min(ix.capacity.saturating_sub((i as u64).saturating_mul(chunk))))
            .fold(0, u64::saturating_add);
        disks.push(DiskNeed { name: d.name.clone(), capacity: d.capacity, data: Some(data) });
    }
    Ok(RestoreNeeds { source: format!("point {}", m.id), hardware_version, disks, thick })
}

async fn ask_privileges(client: &Client, asks: Vec<(MoRef, &[&str])>) -> PrivilegeFacts {
    let known = match client.privilege_ids().await {
        Ok(k) => k,
        Err(e) => return PrivilegeFacts::Failed(format!("cannot read the server's privilege list: {e}")),
    };
    let mut held: HashMap<MoRef, Held> = HashMap::new();
    for (entity, want) in asks {
        match client.has_privileges(&entity, want, &known).await {
            Ok(h) => {
                // One entity may be asked twice (a network named for two NICs): keep both answers.
                let e = held.entry(entity).or_default();
                e.known.extend(h.known);
                e.unknown.extend(h.unknown);
            }
            Err(e) => return PrivilegeFacts::Failed(format!("cannot check the privileges on {entity}: {e}")),
        }
    }
    PrivilegeFacts::Checked(held)
}

/// Every check of a restore target: `restore.target`, `restore.privileges`, `restore.space`,
/// `restore.hardware`.
pub fn check(facts: &RestoreFacts) -> Vec<Finding> {
    let mut out = Out { list: Vec::new() };
    let t = match &facts.target {
        Ok(t) => t,
        Err(why) => {
            out.add(
                "restore.target",
                Level::Fail,
                "target",
                None,
                why.clone(),
                "name an existing datacenter, host, cluster, resource pool and folder (the reason lists them)",
            );
            return out.list;
        }
    };
    let hosts: Vec<&str> = t.hosts.iter().map(|h| h.name.as_str()).collect();
    let on = match (t.host_chosen, hosts.as_slice()) {
        (true, [h]) => format!("host {h}"),
        (_, []) => "no host".to_owned(),
        (_, many) => format!("a host of {} chosen by vCenter", many.join(", ")),
    };
    out.add(
        "restore.target",
        Level::Pass,
        "target",
        None,
        format!("datacenter {}, folder {}, resource pool {}, on {on}", t.datacenter, t.folder.name, t.pool.name),
        "",
    );
    match &t.datastore {
        Ok(d) => {
            let kind = d.kind.as_deref().map(|k| format!(" ({k})")).unwrap_or_default();
            out.add("restore.target", Level::Pass, &format!("datastore {}", d.name), None, format!("found{kind}"), "");
        }
        Err(why) => out.add(
            "restore.target",
            Level::Fail,
            "datastore",
            None,
            why.clone(),
            "name the datastore with --datastore",
        ),
    }
    for n in &t.networks {
        match n {
            Ok(n) => out.add("restore.target", Level::Pass, &format!("network {}", n.name), None, "found".into(), ""),
            Err(why) => out.add(
                "restore.target",
                Level::Fail,
                "network",
                None,
                why.clone(),
                "map the NICs to networks of the target datacenter",
            ),
        }
    }
    check_privileges(t, &mut out);
    check_space(&facts.needs, t, &mut out);
    check_hardware(&facts.needs, t, &mut out);
    out.list
}

fn check_privileges(t: &TargetFacts, out: &mut Out) {
    let held = match &t.privileges {
        PrivilegeFacts::NotChecked => return,
        PrivilegeFacts::Failed(why) => {
            out.add(
                "restore.privileges",
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
    let mut entities: Vec<(String, &MoRef, &[&str], &str)> = vec![
        (
            format!("folder {}", t.folder.name),
            &t.folder.moref,
            FOLDER_PRIVILEGES,
            "the VM cannot be created, renamed or undone",
        ),
        (
            format!("resource pool {}", t.pool.name),
            &t.pool.moref,
            POOL_PRIVILEGES,
            "the VM cannot be placed in the pool",
        ),
    ];
    if let Ok(d) = &t.datastore {
        entities.push((
            format!("datastore {}", d.name),
            &d.moref,
            DATASTORE_PRIVILEGES,
            "the disks cannot be uploaded and converted there",
        ));
    }
    for n in t.networks.iter().flatten() {
        entities.push((format!("network {}", n.name), &n.moref, NETWORK_PRIVILEGES, "NICs cannot join it"));
    }
    for (subject, moref, wanted, effect) in entities {
        let Some(h) = held.get(moref) else { continue };
        let missing: Vec<&str> = h.missing().into_iter().filter(|p| wanted.contains(p)).collect();
        if missing.is_empty() {
            let unknown = if h.unknown.is_empty() {
                String::new()
            } else {
                format!(" ({} unknown to this server)", h.unknown.join(", "))
            };
            out.add(
                "restore.privileges",
                Level::Pass,
                &subject,
                None,
                format!("{} held{unknown}", wanted.join(", ")),
                "",
            );
        } else {
            out.add(
                "restore.privileges",
                Level::Fail,
                &subject,
                None,
                format!("the account lacks {}: {effect}", missing.join(", ")),
                &format!(
                    "grant {} to the restore account's role on the {subject} (or above it, propagated)",
                    missing.join(", ")
                ),
            );
        }
    }
}

fn disks(n: usize) -> String {
    if n == 1 { "1 disk".into() } else { format!("{n} disks") }
}

fn check_space(needs: &RestoreNeeds, t: &TargetFacts, out: &mut Out) {
    let Ok(d) = &t.datastore else { return };
    if needs.disks.is_empty() {
        return;
    }
    let subject = format!("datastore {}", d.name);
    let need = space_needed(needs);
    let capacity: u64 = needs.disks.iter().map(|d| d.capacity).fold(0, u64::saturating_add);
    let data_known = needs.disks.iter().all(|d| d.data.is_some());
    let what = if needs.thick {
        format!("{} of {}, thick", disks(needs.disks.len()), human_bytes(capacity))
    } else if data_known {
        let data: u64 = needs.disks.iter().filter_map(|d| d.data).fold(0, u64::saturating_add);
        format!("{} of data in {} of {}, thin", human_bytes(data), disks(needs.disks.len()), human_bytes(capacity))
    } else {
        format!("{} of {}, thin, their data unknown: counted whole", disks(needs.disks.len()), human_bytes(capacity))
    };
    let Some(free) = d.free else {
        out.add(
            "restore.space",
            Level::Warn,
            &subject,
            None,
            format!("the datastore's free space is unknown; the restore needs up to {} ({what})", human_bytes(need)),
            "check the datastore's free space in vCenter",
        );
        return;
    };
    // A datastore left under a tenth free fills with the VM's own snapshots and swap.
    let margin = d.capacity.map_or(0, |c| c / 10);
    let (level, fix) = if free < need {
        (Level::Fail, "free space on the datastore, or choose another with --datastore")
    } else if free - need < margin {
        (Level::Warn, "the datastore would be left under 10% free: choose a roomier one, or free space first")
    } else {
        (Level::Pass, "")
    };
    out.add(
        "restore.space",
        level,
        &subject,
        None,
        format!(
            "{} free; the restore needs up to {} at its peak ({what}, plus the largest disk's upload while it converts)",
            human_bytes(free),
            human_bytes(need)
        ),
        fix,
    );
}

fn check_hardware(needs: &RestoreNeeds, t: &TargetFacts, out: &mut Out) {
    let Some(hw) = needs.hardware_version else { return };
    let min = match min_esxi(hw) {
        HardwareNeed::AnyHost => None,
        HardwareNeed::Esxi(major, minor, update) => Some((major, minor, update)),
        HardwareNeed::Unknown => {
            out.add(
                "restore.hardware",
                Level::Warn,
                "target",
                None,
                format!("hardware version vmx-{hw:02} is newer than this check knows (up to vmx-21, ESXi 8.0 U2)"),
                "check VMware's hardware version table (KB 1003746) against the target host",
            );
            return;
        }
    };
    if t.hosts.is_empty() {
        out.add(
            "restore.hardware",
            Level::Warn,
            "target",
            None,
            format!("no host found to run hardware version vmx-{hw:02}"),
            "name the host with --host",
        );
        return;
    }
    let too_old = |h: &Host| match (min, esxi_version(h)) {
        (None, _) => Some(false),
        (Some(m), Some(v)) => Some(v < m),
        (Some(_), None) => None,
    };
    let fit = t.hosts.iter().filter(|h| too_old(h) == Some(false)).count();
    for h in &t.hosts {
        let subject = format!("host {}", h.name);
        let esxi = esxi_version(h).map_or_else(|| format!("{:?}", h.version), |v| format!("ESXi {}", esxi_name(v)));
        let needs_text =
            min.map_or_else(|| "any supported ESXi".to_owned(), |m| format!("ESXi {} or later", esxi_name(m)));
        match too_old(h) {
            Some(false) => out.add(
                "restore.hardware",
                Level::Pass,
                &subject,
                None,
                format!("{esxi} runs hardware version vmx-{hw:02} (needs {needs_text})"),
                "",
            ),
            Some(true) => out.add(
                "restore.hardware",
                // In a cluster, another host may take it; alone, the restore is refused.
                if fit > 0 { Level::Warn } else { Level::Fail },
                &subject,
                None,
                format!(
                    "{esxi} is too old for hardware version vmx-{hw:02}: it needs {needs_text}{}",
                    if fit > 0 { "; only the other hosts can run the VM" } else { "" }
                ),
                "restore onto a newer host (--host), or upgrade this one; a VM's hardware version cannot be lowered",
            ),
            None => out.add(
                "restore.hardware",
                Level::Warn,
                &subject,
                None,
                format!(
                    "the host's version is unknown ({:?}); hardware version vmx-{hw:02} needs {needs_text}",
                    h.version
                ),
                "check that vCenter can reach the host",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn host(name: &str, version: &str, api: &str) -> Host {
        Host {
            moref: MoRef::new("HostSystem", name),
            name: name.into(),
            version: Some(version.into()),
            api_version: Some(api.into()),
            connection_state: None,
            thumbprint: None,
            parent: None,
        }
    }

    fn named(kind: &str, name: &str) -> Named {
        Named { moref: MoRef::new(kind, name), name: name.into() }
    }

    fn datastore(free: u64) -> Datastore {
        Datastore {
            moref: MoRef::new("Datastore", "ds1"),
            name: "ds1".into(),
            kind: Some("VMFS".into()),
            vmfs_version: None,
            capacity: Some(1 << 40),
            free: Some(free),
            url: None,
        }
    }

    fn all_held(wanted: &[&str]) -> Held {
        Held { known: wanted.iter().map(|p| ((*p).to_owned(), true)).collect::<BTreeMap<_, _>>(), unknown: Vec::new() }
    }

    fn facts(hosts: Vec<Host>, free: u64, needs: RestoreNeeds) -> RestoreFacts {
        let (folder, pool, ds, net) =
            (named("Folder", "vm"), named("ResourcePool", "Resources"), datastore(free), named("Network", "Isolated"));
        let held = HashMap::from([
            (folder.moref.clone(), all_held(FOLDER_PRIVILEGES)),
            (pool.moref.clone(), all_held(POOL_PRIVILEGES)),
            (ds.moref.clone(), all_held(DATASTORE_PRIVILEGES)),
            (net.moref.clone(), all_held(NETWORK_PRIVILEGES)),
        ]);
        RestoreFacts {
            needs,
            target: Ok(TargetFacts {
                datacenter: "DC1".into(),
                folder,
                pool,
                host_chosen: hosts.len() == 1,
                hosts,
                datastore: Ok(ds),
                networks: vec![Ok(net)],
                privileges: PrivilegeFacts::Checked(held),
            }),
        }
    }

    fn needs(hw: u32, disks: &[(u64, Option<u64>)]) -> RestoreNeeds {
        RestoreNeeds {
            source: "test".into(),
            hardware_version: Some(hw),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, (capacity, data))| DiskNeed { name: format!("scsi0:{i}"), capacity: *capacity, data: *data })
                .collect(),
            thick: false,
        }
    }

    fn levels(f: &[Finding], code: &str) -> Vec<Level> {
        f.iter().filter(|x| x.code == code).map(|x| x.level).collect()
    }

    #[test]
    fn each_hardware_version_needs_its_esxi() {
        let h = |v: &str, api: &str| esxi_version(&host("h", v, api)).unwrap();
        assert_eq!(h("6.7.0", "6.7.2"), (6, 7, 2), "6.7 U2 says its update in the API version");
        assert_eq!(h("7.0.2", "8.0.2.0"), (7, 0, 2), "an API of another release is not taken");
        assert_eq!(h("8.0.2", "8.0.2.0"), (8, 0, 2));
        for (hw, oldest_ok, newest_refused) in [
            (13, "6.5.0", "6.0.0"),
            (14, "6.7.0", "6.5.0"),
            (15, "6.7.2", "6.7.1"),
            (17, "7.0.0", "6.7.3"),
            (18, "7.0.1", "7.0.0"),
            (19, "7.0.2", "7.0.1"),
            (20, "8.0.0", "7.0.3"),
            (21, "8.0.2", "8.0.1"),
        ] {
            let HardwareNeed::Esxi(a, b, c) = min_esxi(hw) else { panic!("vmx-{hw} needs an ESXi") };
            let m = (a, b, c);
            assert!(h(oldest_ok, "") >= m, "vmx-{hw} on {oldest_ok}");
            assert!(h(newest_refused, "") < m, "vmx-{hw} refused on {newest_refused}");
        }
        for hw in [4, 7, 11, 12] {
            assert_eq!(min_esxi(hw), HardwareNeed::AnyHost, "vmx-{hw} runs anywhere supported");
        }
        assert_eq!(min_esxi(99), HardwareNeed::Unknown);
        assert_eq!(parse_hardware_version("vmx-19"), Some(19));
        assert_eq!(parse_hardware_version("\"21\""), Some(21));
        assert_eq!(parse_hardware_version("vmx-x"), None);
        assert_eq!(esxi_name((6, 7, 2)), "6.7 U2");
        assert_eq!(esxi_name((8, 0, 0)), "8.0");
    }

    #[test]
    fn a_fitting_target_passes() {
        let f =
            check(&facts(vec![host("esx1", "8.0.2", "8.0.2.0")], 500 << 30, needs(21, &[(40 << 30, Some(10 << 30))])));
        assert!(f.iter().all(|x| x.level == Level::Pass), "{f:#?}");
        for code in ["restore.target", "restore.privileges", "restore.space", "restore.hardware"] {
            assert!(!levels(&f, code).is_empty(), "{code}: {f:#?}");
        }
    }

    #[test]
    fn a_host_too_old_is_refused_alone_and_warned_in_a_cluster() {
        let f = check(&facts(vec![host("esx1", "7.0.3", "7.0.3.0")], 100 << 30, needs(20, &[(1 << 30, None)])));
        assert_eq!(levels(&f, "restore.hardware"), [Level::Fail]);
        let why = f.iter().find(|x| x.code == "restore.hardware").unwrap();
        assert!(
            why.reason.contains("ESXi 7.0 U3 is too old for hardware version vmx-20: it needs ESXi 8.0"),
            "{why:?}"
        );
        let f = check(&facts(
            vec![host("esx1", "7.0.3", "7.0.3.0"), host("esx2", "8.0.0", "8.0.0.0")],
            100 << 30,
            needs(20, &[(1 << 30, None)]),
        ));
        assert_eq!(levels(&f, "restore.hardware"), [Level::Warn, Level::Pass]);
        let f = check(&facts(vec![host("esx1", "6.0.0", "6.0")], 100 << 30, needs(11, &[])));
        assert_eq!(levels(&f, "restore.hardware"), [Level::Pass]);
    }

    #[test]
    fn space_counts_data_thin_capacity_thick_and_the_largest_upload() {
        let n = needs(19, &[(100 << 30, Some(10 << 30)), (50 << 30, Some(30 << 30))]);
        assert_eq!(space_needed(&n), 70 << 30, "40 GiB kept and the 30 GiB upload");
        assert_eq!(space_needed(&RestoreNeeds { thick: true, ..n.clone() }), 180 << 30);
        let unknown = needs(19, &[(100 << 30, None)]);
        assert_eq!(space_needed(&unknown), 200 << 30);
        let f = check(&facts(vec![host("esx1", "8.0.2", "8.0.2.0")], 60 << 30, n.clone()));
        let space = f.iter().find(|x| x.code == "restore.space").unwrap();
        assert_eq!(space.level, Level::Fail, "{space:?}");
        assert!(space.reason.contains("60.0 GiB free") && space.reason.contains("70.0 GiB"), "{space:?}");
        // Fits, but leaves the 1 TiB datastore under a tenth free.
        let f = check(&facts(vec![host("esx1", "8.0.2", "8.0.2.0")], 100 << 30, n));
        assert_eq!(levels(&f, "restore.space"), [Level::Warn]);
    }

    #[test]
    fn missing_privileges_are_named_per_entity() {
        let mut f = facts(vec![host("esx1", "8.0.2", "8.0.2.0")], 500 << 30, needs(19, &[(1 << 30, None)]));
        if let Ok(t) = &mut f.target
            && let PrivilegeFacts::Checked(held) = &mut t.privileges
        {
            let ds = held.get_mut(&MoRef::new("Datastore", "ds1")).unwrap();
            ds.known.insert("Datastore.AllocateSpace".into(), false);
            let net = held.get_mut(&MoRef::new("Network", "Isolated")).unwrap();
            net.known.insert("Network.Assign".into(), false);
        }
        let out = check(&f);
        let fails: Vec<(&str, &str)> =
            out.iter().filter(|x| x.level == Level::Fail).map(|x| (x.subject.as_str(), x.reason.as_str())).collect();
        assert_eq!(fails.len(), 2, "{out:#?}");
        assert!(fails[0].0 == "datastore ds1" && fails[0].1.contains("Datastore.AllocateSpace"), "{fails:?}");
        assert!(fails[1].0 == "network Isolated" && fails[1].1.contains("Network.Assign"), "{fails:?}");
        assert!(out.iter().all(|x| x.level == Level::Pass || !x.fix.is_empty()));
    }

    #[test]
    fn names_not_found_fail_the_target() {
        let f = check(&RestoreFacts { needs: RestoreNeeds::default(), target: Err("no host is called \"x\"".into()) });
        assert_eq!(levels(&f, "restore.target"), [Level::Fail]);
        assert_eq!(f.len(), 1);
        let mut facts = facts(vec![], 1 << 40, RestoreNeeds::default());
        if let Ok(t) = &mut facts.target {
            t.datastore = Err("no datastore is called \"big\"".into());
            t.networks = vec![Err("no network is called \"Lab\"".into())];
        }
        let f = check(&facts);
        assert_eq!(levels(&f, "restore.target"), [Level::Pass, Level::Fail, Level::Fail], "{f:#?}");
        assert!(levels(&f, "restore.space").is_empty() && levels(&f, "restore.hardware").is_empty());
    }
}
