//! Helpers shared by the vSphere sources' integration tests: the simulator with a flat disk
//! and disks on VMFS and NFS datastores, logged in; a VM by name and its live bytes; the fake
//! VDDK library, initialised once per process.

#![allow(dead_code, reason = "each test binary uses its own subset")]

use std::sync::{Arc, OnceLock};

use vsphere::{Client, ConnectOptions, Credentials, Secret, Trust, Vm};
use vsphere_sim::{Config, Sim, SimTls};

/// One datacenter `DC1` with the datastores `ds1` (default), `vmfs1` and `nfs1`, and one
/// 8 MiB disk per VM: `flat` on ds1, `onvmfs` on vmfs1, `onnfs` on nfs1.
pub(crate) fn estate() -> Config {
    Config::from_toml(
        r#"
user = "backup@vsphere.local"
password = "s3cret"
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.datastore]]
name = "vmfs1"
type = "VMFS"
[[datacenter.datastore]]
name = "nfs1"
type = "NFS"
[[datacenter.vm]]
name = "flat"
[[datacenter.vm.disk]]
capacity = 8388608
[[datacenter.vm]]
name = "onvmfs"
[[datacenter.vm.disk]]
capacity = 8388608
datastore = "vmfs1"
[[datacenter.vm]]
name = "onnfs"
[[datacenter.vm.disk]]
capacity = 8388608
datastore = "nfs1"
"#,
    )
    .unwrap()
}

/// The simulator (its datastores under `sim/` in the directory), logged in.
pub(crate) async fn start() -> (tempfile::TempDir, Sim, Arc<Client>) {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(estate(), &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let opts = ConnectOptions { trust: Trust::Insecure, ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("s3cret") }).await.unwrap();
    (dir, sim, Arc::new(c))
}

pub(crate) async fn vm(client: &Client, name: &str) -> Vm {
    client.vms().await.unwrap().into_iter().find(|v| v.name == name).unwrap()
}

/// The live contents of `v`'s only disk.
pub(crate) fn live(sim: &Sim, v: &Vm) -> Vec<u8> {
    std::fs::read(sim.disk_path(&v.name, v.disks[0].key).unwrap()).unwrap()
}

/// VDDK initialises once per process.
pub(crate) fn vddk() -> &'static vddk::Vddk {
    static VDDK: OnceLock<vddk::Vddk> = OnceLock::new();
    VDDK.get_or_init(|| vddk::Library::load(&vddk_fake::libdir(vddk_fake::Fake::V8)).unwrap().init(None).unwrap())
}
