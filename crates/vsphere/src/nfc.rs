//! NFC import, the way vSphere takes whole VMs in: `ResourcePool.ImportVApp` with a VM's
//! configuration (its disks created empty) returns an `HttpNfcLease`; once it is `ready`, each
//! disk's streamOptimized VMDK is PUT to the lease's device URL; `HttpNfcLeaseProgress` keeps
//! the lease alive; `HttpNfcLeaseComplete` keeps the VM, `HttpNfcLeaseAbort` removes it.

use std::sync::Arc;
use std::time::Duration;

use crate::datastore::DatastoreWriter;
use crate::http::{Endpoint, Http};
use crate::pc::{FilterSpec, Objects};
use crate::provision::{Placement, VmSpec, config_spec_with};
use crate::soap::Request;
use crate::tls::{Thumbprint, Trust};
use crate::xml::Element;
use crate::{Client, Error, MoRef};

/// The content type of a streamOptimized VMDK upload.
pub const STREAM_VMDK: &str = "application/x-vnd.vmware-streamVmdk";

/// One place a lease takes a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUrl {
    /// The device's key (`/vm-42/disk:0` on vcsim).
    pub key: String,
    /// The key the import names it by (`/name/disk:0`).
    pub import_key: String,
    /// Where to PUT it (`https://*/nfc/52.../disk-0.vmdk`: `*` is the server connected to).
    pub url: String,
    /// The host's certificate thumbprint, when the URL is another host's.
    pub ssl_thumbprint: Option<String>,
    /// Whether it is a disk.
    pub disk: bool,
    /// The file's name as the import names it (`name.vmdk`).
    pub target_id: Option<String>,
}

/// A ready lease's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The VM being imported.
    pub entity: MoRef,
    /// Where each file goes.
    pub devices: Vec<DeviceUrl>,
    /// Seconds without progress after which the server gives up on the lease.
    pub timeout: Option<u64>,
}

impl LeaseInfo {
    /// The URL for disk `n` (in the configuration's order) whose file is `file_name`: by its
    /// target name, else by an import key ending `disk:n`, else the `n`th disk URL.
    pub fn disk_url(&self, n: usize, file_name: &str) -> Option<&DeviceUrl> {
        let disks: Vec<&DeviceUrl> = self.devices.iter().filter(|d| d.disk).collect();
        disks
            .iter()
            .find(|d| d.target_id.as_deref() == Some(file_name))
            .or_else(|| disks.iter().find(|d| d.import_key.ends_with(&format!("disk:{n}"))))
            .or_else(|| disks.get(n))
            .copied()
    }
}

fn device_url(e: &Element) -> Option<DeviceUrl> {
    let text = |n: &str| e.text_of(n).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    Some(DeviceUrl {
        key: text("key").unwrap_or_default(),
        import_key: text("importKey").unwrap_or_default(),
        url: text("url")?,
        ssl_thumbprint: text("sslThumbprint"),
        disk: text("disk").is_some_and(|d| d == "true"),
        target_id: text("targetId"),
    })
}

/// Reads `info` (an `HttpNfcLeaseInfo`).
pub fn lease_info(info: &Element) -> Result<LeaseInfo, Error> {
    let entity = info
        .child("entity")
        .and_then(MoRef::from_element)
        .ok_or_else(|| Error::Protocol("an NFC lease's info names no entity".into()))?;
    Ok(LeaseInfo {
        entity,
        devices: info.children_named("deviceUrl").filter_map(device_url).collect(),
        timeout: info.parse_of("leaseTimeout"),
    })
}

impl Client {
    /// Starts importing a VM of `spec` (`ResourcePool.ImportVApp` with a
    /// `VirtualMachineImportSpec`; its disks created empty, thin) into `placement`; returns the
    /// lease.
    pub async fn import_vapp(&self, placement: &Placement, spec: &VmSpec) -> Result<MoRef, Error> {
        let mut req = Request::new("ImportVApp", &placement.pool);
        req.open("spec", Some("VirtualMachineImportSpec"));
        config_spec_with(&mut req, "configSpec", spec, true);
        req.close("spec");
        req.moref("folder", &placement.vm_folder);
        if let Some(h) = &placement.host {
            req.moref("host", h);
        }
        let r = self.invoke(req).await?;
        r.child("returnval")
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol("ImportVApp returned no lease".into()))
    }

    /// Waits until `lease` is ready (or gives up after `timeout`) and returns its facts; a lease
    /// in `error` is the server's fault, returned.
    pub async fn wait_lease(&self, lease: &MoRef, timeout: Duration) -> Result<LeaseInfo, Error> {
        let spec = FilterSpec {
            kind: "HttpNfcLease".into(),
            paths: vec!["state".into(), "info".into(), "error".into()],
            objects: Objects::List(vec![lease.clone()]),
        };
        let until = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let objs = self.retrieve(&spec).await?;
            let o = objs.first().ok_or_else(|| Error::Protocol(format!("{lease}: the server returned no state")))?;
            match o.text("state").map(str::trim) {
                Some("ready") => {
                    let info =
                        o.get("info").ok_or_else(|| Error::Protocol(format!("{lease} is ready with no info")))?;
                    return lease_info(info);
                }
                Some("error") => {
                    let error = o.get("error");
                    let message = error.and_then(|e| e.text_of("localizedMessage")).map(str::trim);
                    let fault = error.and_then(|e| e.child("fault")).map(|f| f.type_name().to_owned());
                    let why = match (fault, message) {
                        (Some(f), Some(m)) if !m.is_empty() => format!("{f}: {m}"),
                        (Some(f), _) => f,
                        (None, Some(m)) if !m.is_empty() => m.to_owned(),
                        _ => "no reason given".into(),
                    };
                    return Err(Error::Protocol(format!("NFC lease {lease} failed: {why}")));
                }
                Some("done") => return Err(Error::Protocol(format!("NFC lease {lease} is over already"))),
                _ => {}
            }
            if tokio::time::Instant::now() >= until {
                return Err(Error::Timeout {
                    operation: format!("waiting for NFC lease {lease}"),
                    after: timeout,
                    last: o.text("state").map(str::to_owned),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Reports `percent` done on `lease` (`HttpNfcLeaseProgress`), which keeps it alive.
    pub async fn lease_progress(&self, lease: &MoRef, percent: u8) -> Result<(), Error> {
        let mut req = Request::new("HttpNfcLeaseProgress", lease);
        req.text("percent", percent.min(100));
        self.invoke(req).await.map(|_| ())
    }

    /// Ends `lease` well (`HttpNfcLeaseComplete`): the imported VM stays.
    pub async fn lease_complete(&self, lease: &MoRef) -> Result<(), Error> {
        self.invoke(Request::new("HttpNfcLeaseComplete", lease)).await.map(|_| ())
    }

    /// Gives `lease` up (`HttpNfcLeaseAbort`): the server removes what the import made.
    pub async fn lease_abort(&self, lease: &MoRef) -> Result<(), Error> {
        self.invoke(Request::new("HttpNfcLeaseAbort", lease)).await.map(|_| ())
    }

    /// A writer for `device`'s URL and the path to PUT to: this session's connection when the
    /// URL names this server (or `*`), else a connection to the host it names, trusted only by
    /// the thumbprint the lease gave (none given: refused).
    pub fn lease_writer(&self, device: &DeviceUrl) -> Result<(DatastoreWriter, String), Error> {
        // `*` stands for the server connected to, and is no host name a URI may carry.
        let any_host = device.url.contains("://*/") || device.url.contains("://*:");
        let text = if any_host { device.url.replacen("://*", "://localhost", 1) } else { device.url.clone() };
        let uri: http::Uri = text.parse().map_err(|e| Error::Protocol(format!("{}: {e}", device.url)))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let host = uri.host().unwrap_or_default();
        let here = self.endpoint();
        if any_host || (host == here.host && uri.port_u16().unwrap_or(443) == here.port) {
            return Ok((self.datastore_writer()?, path));
        }
        let thumbprint = device.ssl_thumbprint.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "the NFC lease sends {} to another host ({host}) without its certificate's thumbprint: not trusted",
                device.key
            ))
        })?;
        let thumbprint = Thumbprint::parse(thumbprint)?;
        let endpoint = Endpoint::parse(&format!("https://{}:{}", host, uri.port_u16().unwrap_or(443)))?;
        let http = Http::new(endpoint, &Trust::Pinned(thumbprint), self.timeout(), 64 << 20)?;
        // The lease's URL is its own credential: this session's cookie stays with its server.
        Ok((DatastoreWriter::new(Arc::new(http), String::new()), path))
    }
}
