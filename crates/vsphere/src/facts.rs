//! Facts about the estate around the VMs that `probe` and the backup flow check: host versions
//! and the certificate thumbprints vCenter vouches for (to trust ESXi hosts reached directly),
//! datastore types and versions, clusters' DRS automation, and which datacenter holds each
//! datastore (datastore HTTPS paths name it).

use crate::enums::{ConnectionState, DrsBehavior};
use crate::error::Error;
use crate::pc::{FilterSpec, ObjectContent, Objects};
use crate::session::Client;
use crate::soap::{MoRef, Request};
use crate::tls::{ServerTls, Thumbprint};
use crate::xml::Element;

/// An ESXi host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The moref.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// `8.0.2`.
    pub version: Option<String>,
    /// Its API version.
    pub api_version: Option<String>,
    /// `connected`, `disconnected`, `notResponding`.
    pub connection_state: Option<ConnectionState>,
    /// The SHA-1 thumbprint of the certificate vCenter holds for it.
    pub thumbprint: Option<Thumbprint>,
    /// The cluster or compute resource it belongs to.
    pub parent: Option<MoRef>,
}

/// A datastore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datastore {
    /// The moref.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// `VMFS`, `NFS`, `NFS41`, `vsan`, `VVOL`.
    pub kind: Option<String>,
    /// The VMFS version (`6.82`), for VMFS.
    pub vmfs_version: Option<String>,
    /// Bytes.
    pub capacity: Option<u64>,
    /// Free bytes.
    pub free: Option<u64>,
    /// Where its files are (`ds:///vmfs/volumes/...`).
    pub url: Option<String>,
}

/// A datacenter and the datastores in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datacenter {
    /// The moref.
    pub moref: MoRef,
    /// Its name (the `dcPath` of datastore HTTPS reads).
    pub name: String,
    /// Its datastores.
    pub datastores: Vec<MoRef>,
}

/// A cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The moref.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// DRS on.
    pub drs_enabled: Option<bool>,
    /// `manual`, `partiallyAutomated`, `fullyAutomated`.
    pub drs_behavior: Option<DrsBehavior>,
    /// Per-VM DRS overrides (`drsVmConfig`).
    pub vm_overrides: Vec<DrsOverride>,
}

/// A VM's own DRS setting in its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrsOverride {
    /// The VM.
    pub vm: MoRef,
    /// Whether DRS acts on it at all.
    pub enabled: Option<bool>,
    /// `manual`, `partiallyAutomated`, `fullyAutomated`.
    pub behavior: Option<DrsBehavior>,
}

impl Cluster {
    /// Whether DRS may move `vm` on its own: DRS on, and neither the VM's override nor the
    /// cluster's default says manual (or disabled).
    pub fn may_move(&self, vm: &MoRef) -> bool {
        if self.drs_enabled != Some(true) {
            return false;
        }
        let own = self.vm_overrides.iter().find(|o| &o.vm == vm);
        if own.is_some_and(|o| o.enabled == Some(false)) {
            return false;
        }
        let behavior = own.and_then(|o| o.behavior.as_ref()).or(self.drs_behavior.as_ref());
        behavior != Some(&DrsBehavior::Manual)
    }
}

/// What to do to a VM's DRS override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrsChange {
    /// Add one (the VM had none).
    Add(DrsOverride),
    /// Replace the VM's.
    Edit(DrsOverride),
    /// Remove the VM's.
    Remove(MoRef),
}

fn some(e: Option<&Element>) -> Option<String> {
    crate::model::some_text(e.map(|e| e.text.as_str()))
}

/// The DER certificate inside `HostConfigInfo.certificate` (PEM as an array of signed bytes).
fn certificate_der(val: &Element) -> Option<Vec<u8>> {
    let bytes: Option<Vec<u8>> =
        val.children.iter().map(|b| b.text.trim().parse::<i16>().ok().map(|v| v.to_le_bytes()[0])).collect();
    let pem = bytes?;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(&pem).ok().map(|c| c.to_vec())
}

impl Client {
    /// Every ESXi host with its version and the thumbprint vCenter holds for it.
    pub async fn hosts(&self) -> Result<Vec<Host>, Error> {
        let objs = self
            .inventory(
                "HostSystem",
                &[
                    "name",
                    "config.product.version",
                    "config.product.apiVersion",
                    "runtime.connectionState",
                    "config.certificate",
                    "parent",
                ],
            )
            .await?;
        Ok(objs.iter().map(host_from).collect())
    }

    /// One host's product version (`config.product.version`, `8.0.2`) by its moref: a single
    /// property read, where [`Client::hosts`] reads every host. `None` when the server has no
    /// version for it (a host never connected); a moref the server does not know is a
    /// `ManagedObjectNotFound` fault.
    pub async fn host_version(&self, host: &MoRef) -> Result<Option<String>, Error> {
        Ok(some(self.property(host, "config.product.version").await?.as_ref()))
    }

    /// The product version of the host `vm` runs on (its `runtime.host`, then that host's
    /// version): two property reads. `None` when the VM is on no host or the host has no
    /// version.
    pub async fn vm_host_version(&self, vm: &MoRef) -> Result<Option<String>, Error> {
        let Some(host) = self.property(vm, "runtime.host").await?.as_ref().and_then(MoRef::from_element) else {
            return Ok(None);
        };
        self.host_version(&host).await
    }

    /// Every datastore with its type and, for VMFS, its version.
    pub async fn datastores(&self) -> Result<Vec<Datastore>, Error> {
        let objs = self.inventory("Datastore", &["name", "summary", "info"]).await?;
        Ok(objs.iter().map(datastore_from).collect())
    }

    /// Every datacenter with its datastores.
    pub async fn datacenters(&self) -> Result<Vec<Datacenter>, Error> {
        let objs = self.inventory("Datacenter", &["name", "datastore"]).await?;
        Ok(objs
            .iter()
            .map(|o| Datacenter {
                moref: o.obj.clone(),
                name: o.text("name").unwrap_or_default().to_owned(),
                datastores: o
                    .get("datastore")
                    .map(|a| a.children.iter().filter_map(MoRef::from_element).collect())
                    .unwrap_or_default(),
            })
            .collect())
    }

    /// The cluster `host` belongs to, if it is in one.
    pub async fn cluster_of(&self, host: &MoRef) -> Result<Option<Cluster>, Error> {
        let Some(parent) = self.property(host, "parent").await?.as_ref().and_then(MoRef::from_element) else {
            return Ok(None);
        };
        if parent.kind != "ClusterComputeResource" {
            return Ok(None);
        }
        self.cluster(&parent).await
    }

    /// One cluster's DRS settings, if it exists.
    pub async fn cluster(&self, cluster: &MoRef) -> Result<Option<Cluster>, Error> {
        let spec = FilterSpec {
            kind: "ClusterComputeResource".into(),
            paths: vec!["name".into(), "configurationEx".into()],
            objects: Objects::List(vec![cluster.clone()]),
        };
        Ok(self.retrieve(&spec).await?.first().map(cluster_from))
    }

    /// Adds, edits or removes a VM's DRS override in `cluster`
    /// (`ReconfigureComputeResource_Task`, modifying only that entry).
    pub async fn set_drs_override(&self, cluster: &MoRef, change: &DrsChange) -> Result<(), Error> {
        let mut req = Request::new("ReconfigureComputeResource_Task", cluster);
        req.open("spec", Some("ClusterConfigSpecEx")).open("drsVmConfigSpec", None);
        let info = |req: &mut Request, op: &str, o: &DrsOverride| {
            req.text("operation", op).open("info", None).moref("key", &o.vm);
            req.opt("enabled", o.enabled).opt("behavior", o.behavior.as_ref());
            req.close("info");
        };
        match change {
            DrsChange::Add(o) => info(&mut req, "add", o),
            DrsChange::Edit(o) => info(&mut req, "edit", o),
            DrsChange::Remove(vm) => {
                req.text("operation", "remove").any_moref("removeKey", vm);
            }
        }
        req.close("drsVmConfigSpec").close("spec").text("modify", true);
        self.run_task(req, None).await.map(|_| ())
    }

    /// Every cluster with its DRS automation level.
    pub async fn clusters(&self) -> Result<Vec<Cluster>, Error> {
        let objs = self.inventory("ClusterComputeResource", &["name", "configurationEx"]).await?;
        Ok(objs.iter().map(cluster_from).collect())
    }
}

/// A host from its properties.
pub fn host_from(o: &ObjectContent) -> Host {
    Host {
        moref: o.obj.clone(),
        name: o.text("name").unwrap_or_default().to_owned(),
        version: some(o.get("config.product.version")),
        api_version: some(o.get("config.product.apiVersion")),
        connection_state: some(o.get("runtime.connectionState")).map(ConnectionState::from),
        thumbprint: o
            .get("config.certificate")
            .and_then(certificate_der)
            .map(|der| ServerTls::of(&der, String::new()).sha1),
        parent: o.get("parent").and_then(MoRef::from_element),
    }
}

/// A datastore from its properties.
pub fn datastore_from(o: &ObjectContent) -> Datastore {
    let summary = o.get("summary");
    let info = o.get("info");
    Datastore {
        moref: o.obj.clone(),
        name: o.text("name").unwrap_or_default().to_owned(),
        kind: some(summary.and_then(|s| s.child("type"))),
        vmfs_version: some(info.and_then(|i| i.path("vmfs.version"))),
        capacity: summary.and_then(|s| s.parse_of("capacity")),
        free: summary.and_then(|s| s.parse_of("freeSpace")),
        url: some(summary.and_then(|s| s.child("url"))).or_else(|| some(info.and_then(|i| i.child("url")))),
    }
}

/// A cluster from its properties.
pub fn cluster_from(o: &ObjectContent) -> Cluster {
    let drs = o.get("configurationEx").and_then(|c| c.child("drsConfig"));
    Cluster {
        moref: o.obj.clone(),
        name: o.text("name").unwrap_or_default().to_owned(),
        drs_enabled: drs.and_then(|d| d.text_of("enabled")).map(|t| t.trim() == "true"),
        drs_behavior: some(drs.and_then(|d| d.child("defaultVmBehavior"))).map(DrsBehavior::from),
        vm_overrides: o
            .get("configurationEx")
            .map(|c| {
                c.children_named("drsVmConfig")
                    .filter_map(|v| {
                        Some(DrsOverride {
                            vm: v.child("key").and_then(MoRef::from_element)?,
                            enabled: v.text_of("enabled").map(|t| t.trim() == "true"),
                            behavior: some(v.child("behavior")).map(DrsBehavior::from),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
