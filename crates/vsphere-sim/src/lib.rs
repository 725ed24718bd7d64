//! A vSphere simulator with CBT, in-process, for tests and (later) `proxy demo`. It speaks the
//! SOAP subset backup needs over hyper, keeps each VM disk as a real sparse file, and behaves
//! like ESXi where it matters: writes through [`Sim::write`] mark CBT blocks; a snapshot
//! freezes a readable view and advances the change ID (`<epoch>/<sequence>`); turning CBT off
//! and on starts a new epoch; `QueryChangedDiskAreas` answers in windows (2 GiB by default) and
//! `*` returns allocated areas; faults can be injected ([`Faults`]). Datastore `/folder` reads
//! serve the disks (a base disk frozen under its oldest snapshot, and the deltas between
//! snapshots as ESXi keeps them: SEsparse on VMFS datastores, vmfsSparse on NFS).
//!
//! A restore can target it (see `provision`): `/folder` PUT (the folder must exist, as on
//! ESXi), `MakeDirectory`, `CreateVM_Task` and `RegisterVM_Task` (a `.vmx` written and read,
//! see `vmx`), device add/remove/edit through `ReconfigVM_Task`, `Create/Copy/DeleteVirtualDisk_Task`,
//! power on/off, `Destroy_Task`, `UnregisterVM`, `Rename_Task`, named port groups (`Network`),
//! and NFC import (see `nfc`): `ResourcePool.ImportVApp` of a `VirtualMachineImportSpec`
//! answers an `HttpNfcLease` whose device URLs (`/nfc/<lease>/<disk file>`) take
//! streamOptimized VMDKs, with `HttpNfcLeaseProgress`/`Complete`/`Abort` and a lease timeout
//! ([`Config::lease_timeout`]) that destroys an abandoned import.
//! `QueryChangedDiskAreas` without a snapshot answers for a powered-off VM and is
//! `InvalidState` on a running one.
//!
//! Not simulated: the newest (running) delta's bytes (live writes go to the flat file),
//! revert, memory snapshots, templates, preallocated disks (every disk is thin), device
//! changes on a VM with snapshots, distributed port groups.

pub mod bootdisk;
mod config;
mod devices;
mod inventory;
mod nfc;
mod provision;
mod server;
mod soap;
mod spec;
mod vmx;
mod world;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use config::{
    ClusterConfig, Config, ControllerKind, DatacenterConfig, DatastoreConfig, Denied, DiskConfig, HostConfig,
    NetworkConfig, VmConfig,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
pub use world::{Faults, GuestRun, SimFault};

/// Errors starting or driving the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration is wrong.
    #[error("simulator configuration: {0}")]
    Config(String),
    /// A file could not be made or written.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A VM, disk or range that does not exist.
    #[error("the simulator has no {0}")]
    NoSuch(String),
    /// A change the simulated server would refuse, with its reason.
    #[error("the simulator refused: {0}")]
    Refused(String),
    /// TLS setup failed.
    #[error("simulator TLS: {0}")]
    Tls(String),
}

impl SimError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// Whether the simulator speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimTls {
    /// TLS 1.2/1.3 with a freshly generated self-signed certificate.
    SelfSigned,
    /// TLS 1.0 only (OpenSSL, security level 0), as vCenter 5.1 and ESXi 5.x speak it, with a
    /// freshly generated self-signed certificate.
    Legacy,
    /// Plain HTTP.
    Plain,
}

/// A running simulator; it stops when dropped.
#[derive(Debug)]
pub struct Sim {
    state: Arc<Mutex<world::World>>,
    addr: SocketAddr,
    tls: bool,
    cert: Option<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sim {
    /// Starts on 127.0.0.1 (a free port), keeping the datastores under `root`. Must be called
    /// inside a tokio runtime.
    pub async fn start(config: Config, root: &Path, tls: SimTls) -> Result<Self, SimError> {
        let mut world = world::World::new(config, root)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| SimError::io(Path::new("127.0.0.1:0"), e))?;
        let addr = listener.local_addr().map_err(|e| SimError::io(Path::new("127.0.0.1:0"), e))?;
        let (server_tls, cert) = match tls {
            SimTls::Plain => (server::ServerTls::Plain, None),
            SimTls::SelfSigned | SimTls::Legacy => {
                let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                    .map_err(|e| SimError::Tls(e.to_string()))?;
                let der = ck.cert.der().to_vec();
                world.cert_pem = Some(ck.cert.pem());
                world.thumbprint =
                    openssl::sha::sha1(ck.cert.der()).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
                let server = if tls == SimTls::Legacy {
                    server::ServerTls::Legacy(Arc::new(legacy_acceptor(&der, &ck.signing_key.serialize_pem())?))
                } else {
                    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
                    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                    let cfg = rustls::ServerConfig::builder_with_provider(provider)
                        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                        .map_err(|e| SimError::Tls(e.to_string()))?
                        .with_no_client_auth()
                        .with_single_cert(vec![CertificateDer::from(der.clone())], key)
                        .map_err(|e| SimError::Tls(e.to_string()))?;
                    server::ServerTls::Modern(Arc::new(cfg))
                };
                (server, Some(der))
            }
        };
        world.endpoint = (if tls == SimTls::Plain { "http" } else { "https" }, addr.to_string());
        let state = Arc::new(Mutex::new(world));
        let task = tokio::spawn(server::serve(listener, server_tls, state.clone()));
        Ok(Self { state, addr, tls: tls != SimTls::Plain, cert, task })
    }

    /// `https://127.0.0.1:PORT/sdk` (or `http://`).
    pub fn url(&self) -> String {
        format!("{}://{}/sdk", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// The server certificate (DER), to pin its thumbprint.
    pub fn certificate(&self) -> Option<&[u8]> {
        self.cert.as_deref()
    }

    fn world(&self) -> std::sync::MutexGuard<'_, world::World> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the injected faults.
    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.world().faults);
    }

    /// Writes into a VM's disk as its guest would; CBT marks the blocks.
    pub fn write(&self, vm: &str, disk_key: i32, offset: u64, data: &[u8]) -> Result<(), SimError> {
        let mut w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        w.write(vi, disk_key, offset, data)
    }

    /// The live contents of a VM's disk file (its path), for tests to compare against.
    pub fn disk_path(&self, vm: &str, disk_key: i32) -> Result<PathBuf, SimError> {
        let w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        let d = w.vms[vi]
            .disks
            .iter()
            .find(|d| d.key == disk_key)
            .ok_or_else(|| SimError::NoSuch(format!("disk {disk_key}")))?;
        Ok(w.ds_path(d.ds, &d.flat_name))
    }

    /// Sets a VM's power state (`poweredOn`, `poweredOff`, `suspended`).
    pub fn set_power(&self, vm: &str, state: impl Into<vsphere::PowerState>) -> Result<(), SimError> {
        let mut w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        w.vms[vi].power = state.into();
        Ok(())
    }

    /// Starts a new change-ID epoch on one disk of a VM, the others untouched.
    pub fn new_epoch(&self, vm: &str, disk_key: i32) -> Result<(), SimError> {
        let mut w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        w.new_epoch(vi, disk_key).map_err(|f| SimError::Refused(f.message))
    }

    /// Grows one disk of a VM to `capacity` bytes.
    pub fn grow_disk(&self, vm: &str, disk_key: i32, capacity: u64) -> Result<(), SimError> {
        let mut w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        w.grow_disk(vi, disk_key, capacity).map_err(|f| SimError::Refused(f.message))
    }

    /// The programs started in a VM's guest, in order.
    pub fn guest_runs(&self, vm: &str) -> Result<Vec<GuestRun>, SimError> {
        let w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        Ok(w.vms[vi].guest_runs.clone())
    }

    /// Backdates a VM's snapshot by `age` (as if it had been taken that long ago), so tests
    /// can make stale and day-old snapshots without waiting.
    pub fn age_snapshot(&self, vm: &str, snapshot: &str, age: std::time::Duration) -> Result<(), SimError> {
        let mut w = self.world();
        let vi = w.vm_by_name(vm).ok_or_else(|| SimError::NoSuch(format!("VM {vm}")))?;
        let rec = w.vms[vi]
            .snapshots
            .iter_mut()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| SimError::NoSuch(format!("snapshot {snapshot} of {vm}")))?;
        let when = std::time::SystemTime::now().checked_sub(age).unwrap_or(std::time::UNIX_EPOCH);
        rec.create_time = humantime::format_rfc3339_seconds(when).to_string();
        Ok(())
    }

    /// SOAP calls answered so far.
    pub fn calls(&self) -> u64 {
        self.world().calls
    }
}

/// An OpenSSL acceptor that speaks TLS 1.0 and nothing newer.
fn legacy_acceptor(cert_der: &[u8], key_pem: &str) -> Result<openssl::ssl::SslAcceptor, SimError> {
    use openssl::ssl::{SslAcceptor, SslMethod, SslVersion};
    let e = |e: openssl::error::ErrorStack| SimError::Tls(e.to_string());
    let mut b = SslAcceptor::mozilla_intermediate(SslMethod::tls()).map_err(e)?;
    b.set_security_level(0);
    b.set_cipher_list("DEFAULT:@SECLEVEL=0").map_err(e)?;
    b.set_min_proto_version(Some(SslVersion::TLS1)).map_err(e)?;
    b.set_max_proto_version(Some(SslVersion::TLS1)).map_err(e)?;
    let cert = openssl::x509::X509::from_der(cert_der).map_err(e)?;
    let key = openssl::pkey::PKey::private_key_from_pem(key_pem.as_bytes()).map_err(e)?;
    b.set_certificate(&cert).map_err(e)?;
    b.set_private_key(&key).map_err(e)?;
    Ok(b.build())
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.task.abort();
    }
}
