//! The inventory a restore walks and reads back, as properties: folders (`childEntity`), a
//! datacenter's `vmFolder`, `hostFolder` and `network`, compute resources and their root
//! `resourcePool`, resource pools, standard port groups (`Network`), a host's networks, and the
//! VM properties of the configuration a restore sets (CPUs, memory, firmware, extraConfig,
//! parent, pool).

use std::fmt::Write as _;

use vsphere::MoRef;
use vsphere::xml::escape;

use crate::soap::{devices, prop, t, typed_mo};
use crate::world::{SimFault, VmState, World};

fn one(p: &str, m: &MoRef) -> Option<String> {
    Some(format!("<propSet><name>{p}</name>{}</propSet>", typed_mo("val", m)))
}

fn many<'a>(p: &str, ms: impl IntoIterator<Item = &'a MoRef>) -> Option<String> {
    let inner: String = ms.into_iter().map(|m| typed_mo("ManagedObjectReference", m)).collect();
    Some(prop(p, "ArrayOfManagedObjectReference", &inner))
}

fn text(p: &str, v: &str) -> Option<String> {
    Some(prop(p, "xsd:string", &escape(v)))
}

fn not_found(what: &str) -> SimFault {
    SimFault::new("ManagedObjectNotFound", format!("no such {what}"))
}

/// A property of the restore-side inventory, or `None` when `obj`'s type or `p` is not one of
/// these (the caller answers it then).
pub(crate) fn property(w: &World, obj: &MoRef, p: &str) -> Option<Result<Option<String>, SimFault>> {
    let root = if w.esx() { "ha-folder-root" } else { "group-d1" };
    match obj.kind.as_str() {
        "Folder" if obj.value == root => Some(match p {
            "name" => Ok(text(p, "Datacenters")),
            "childEntity" => Ok(many(p, w.datacenters.iter().map(|d| &d.moref))),
            "childType" => Ok(Some(prop(p, "ArrayOfString", "<string>Folder</string><string>Datacenter</string>"))),
            _ => return None,
        }),
        "Folder" => {
            let (dc, vms) = match (0..w.datacenters.len()).find(|&d| w.host_folder(d) == *obj) {
                Some(dc) => (dc, false),
                None => (w.folder_dc(obj)?, true),
            };
            Some(match p {
                "name" => Ok(text(p, if vms { "vm" } else { "host" })),
                "parent" => Ok(one(p, &w.datacenters[dc].moref)),
                "childType" if vms => {
                    Ok(Some(prop(p, "ArrayOfString", "<string>Folder</string><string>VirtualMachine</string>")))
                }
                "childEntity" if vms => Ok(many(p, w.vms.iter().filter(|v| v.dc == dc).map(|v| &v.moref))),
                "childEntity" => {
                    let owners: Vec<MoRef> = w.pools().into_iter().filter(|x| x.dc == dc).map(|x| x.owner).collect();
                    Ok(many(p, &owners))
                }
                _ => Err(SimFault::new("InvalidProperty", format!("no property {p}"))),
            })
        }
        "Datacenter" => {
            let dc = w.datacenters.iter().position(|d| d.moref == *obj)?;
            Some(Ok(match p {
                "vmFolder" => one(p, &w.vm_folder(dc)),
                "hostFolder" => one(p, &w.host_folder(dc)),
                "network" => many(p, w.networks.iter().filter(|n| n.dc == dc).map(|n| &n.moref)),
                "parent" => one(p, &MoRef::new("Folder", root)),
                _ => return None,
            }))
        }
        "HostSystem" => {
            let h = w.hosts.iter().find(|h| h.moref == *obj)?;
            Some(Ok(match p {
                "network" => many(p, w.networks.iter().filter(|n| n.dc == h.dc).map(|n| &n.moref)),
                "datastore" => many(p, w.datastores.iter().filter(|d| d.dc == h.dc).map(|d| &d.moref)),
                "vm" => many(p, w.vms.iter().filter(|v| w.hosts[v.host].moref == h.moref).map(|v| &v.moref)),
                _ => return None,
            }))
        }
        "Network" => {
            let at = w.networks.iter().position(|n| n.moref == *obj);
            let Some(at) = at else { return Some(Err(not_found("network"))) };
            let n = &w.networks[at];
            Some(match p {
                "name" => Ok(text(p, &n.name)),
                "summary" => Ok(Some(prop(
                    p,
                    "NetworkSummary",
                    &format!("{}{}{}", crate::soap::mo("network", &n.moref), t("name", &n.name), t("accessible", true)),
                ))),
                "host" => Ok(many(p, w.hosts.iter().filter(|h| h.dc == n.dc).map(|h| &h.moref))),
                "vm" => {
                    Ok(many(p, w.vms.iter().filter(|v| v.nics.iter().any(|x| x.network == Some(at))).map(|v| &v.moref)))
                }
                _ => Err(SimFault::new("InvalidProperty", format!("no property {p}"))),
            })
        }
        "ResourcePool" => {
            let Some(pool) = w.pools().into_iter().find(|x| x.moref == *obj) else {
                return Some(Err(not_found("resource pool")));
            };
            Some(match p {
                "name" => Ok(text(p, "Resources")),
                "owner" | "parent" => Ok(one(p, &pool.owner)),
                "vm" => Ok(many(p, w.vms.iter().filter(|v| v.pool == pool.moref).map(|v| &v.moref))),
                "resourcePool" => Ok(many(p, [])),
                _ => Err(SimFault::new("InvalidProperty", format!("no property {p}"))),
            })
        }
        "ComputeResource" | "ClusterComputeResource" => {
            let pool = w.pools().into_iter().find(|x| x.owner == *obj);
            let Some(pool) = pool else { return Some(Err(not_found("compute resource"))) };
            Some(match (obj.kind.as_str(), p) {
                (_, "resourcePool") => Ok(one(p, &pool.moref)),
                (_, "parent") => Ok(one(p, &w.host_folder(pool.dc))),
                (_, "datastore") => Ok(many(p, w.datastores.iter().filter(|d| d.dc == pool.dc).map(|d| &d.moref))),
                (_, "network") => Ok(many(p, w.networks.iter().filter(|n| n.dc == pool.dc).map(|n| &n.moref))),
                ("ComputeResource", "name") => {
                    Ok(text(p, pool.hosts.first().map_or("", |&h| w.hosts[h].name.as_str())))
                }
                ("ComputeResource", "host") => Ok(many(p, pool.hosts.iter().map(|&h| &w.hosts[h].moref))),
                ("ComputeResource", _) => Err(SimFault::new("InvalidProperty", format!("no property {p}"))),
                _ => return None,
            })
        }
        _ => None,
    }
}

/// `[ds] vm/vm.vmx`.
pub(crate) fn vm_path(w: &World, v: &VmState) -> String {
    format!("[{}] {}", w.datastores[v.vmx.0].name, v.vmx.1)
}

/// `extraConfig` entries as `tag` elements.
fn extra_config(v: &VmState, tag: &str) -> String {
    let mut out = String::new();
    for (k, val) in &v.extra_config {
        let _ = write!(
            out,
            r#"<{tag} xsi:type="OptionValue">{}<value xsi:type="xsd:string">{}</value></{tag}>"#,
            t("key", k),
            escape(val)
        );
    }
    out
}

/// `config.hardware`'s inside: CPUs, memory, devices (as `tag` elements).
pub(crate) fn hardware(w: &World, v: &VmState, tag: &str) -> String {
    let devices = devices(w, v, None)
        .replace("<VirtualDevice ", &format!("<{tag} "))
        .replace("</VirtualDevice>", &format!("</{tag}>"));
    format!(
        "{}{}{}{devices}",
        t("numCPU", v.num_cpus),
        t("numCoresPerSocket", v.cores_per_socket.unwrap_or(1)),
        t("memoryMB", v.memory_mb)
    )
}

/// A VM property of the configuration a restore sets, or `None` for the caller to answer.
pub(crate) fn vm_property(w: &World, v: &VmState, p: &str) -> Option<String> {
    Some(match p {
        "parent" => one(p, &w.vm_folder(v.dc))?,
        "resourcePool" => one(p, &v.pool)?,
        "network" => {
            let mut nets: Vec<usize> = v.nics.iter().filter_map(|n| n.network).collect();
            nets.sort_unstable();
            nets.dedup();
            many(p, nets.iter().map(|&n| &w.networks[n].moref))?
        }
        "config.hardware.numCPU" => prop(p, "xsd:int", &v.num_cpus.to_string()),
        "config.hardware.numCoresPerSocket" => prop(p, "xsd:int", &v.cores_per_socket.unwrap_or(1).to_string()),
        "config.hardware.memoryMB" => prop(p, "xsd:int", &v.memory_mb.to_string()),
        "config.hardware" => prop(p, "VirtualHardware", &hardware(w, v, "device")),
        "config.firmware" => text(p, &v.firmware)?,
        "config.extraConfig" => prop(p, "ArrayOfOptionValue", &extra_config(v, "OptionValue")),
        "config.files" => prop(p, "VirtualMachineFileInfo", &t("vmPathName", vm_path(w, v))),
        "config.files.vmPathName" => text(p, &vm_path(w, v))?,
        "summary.config.name" => text(p, &v.name)?,
        // The whole runtime, as pyvmomi's `vm.runtime` asks for it.
        "runtime" => prop(
            p,
            "VirtualMachineRuntimeInfo",
            &format!(
                "{}{}{}{}",
                crate::soap::mo("host", &w.hosts[v.host].moref),
                t("connectionState", "connected"),
                t("powerState", v.power.as_str()),
                t("consolidationNeeded", v.consolidation_needed)
            ),
        ),
        _ => return None,
    })
}

/// The whole `config` of a VM, as pyvmomi's `vm.config` asks for it.
pub(crate) fn config(w: &World, v: &VmState) -> String {
    format!(
        "{}{}{}{}{}{}{}{}{}{}<files>{}</files><hardware>{}</hardware>{}{}",
        t("changeVersion", "1"),
        t("modified", crate::world::iso_now()),
        t("name", &v.name),
        t("guestFullName", "Other Linux (64-bit)"),
        t("version", &v.hardware),
        t("uuid", &v.uuid),
        t("instanceUuid", &v.instance_uuid),
        t("changeTrackingEnabled", v.cbt),
        t("guestId", &v.guest),
        t("firmware", &v.firmware),
        t("vmPathName", vm_path(w, v)),
        hardware(w, v, "device"),
        v.key_id
            .as_ref()
            .map(|k| format!("<keyId>{}<providerId><id>sim-kms</id></providerId></keyId>", t("keyId", k)))
            .unwrap_or_default(),
        extra_config(v, "extraConfig"),
    )
}
