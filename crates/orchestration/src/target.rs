//! Where a job's VMs go: restore points in a repository, or replica disks in a directory.

use std::path::PathBuf;
use std::sync::Arc;

use blockio::FileSinkOptions;
use durable::{LocalStore, Store};
use replica::state::{StateStore, SyncKey};
use repo::Repo;
use vsphere::Vm;

use crate::OrchError;

/// Replica disks under a directory: `<dir>/<vm>_<uuid8>/<slot>.raw`, one sparse raw file per
/// disk, brought up to date in place; the sync states and the job leases live in
/// `<dir>/.syncproxy/`.
#[derive(Debug, Clone)]
pub struct ReplicaTarget {
    /// The directory.
    pub dir: PathBuf,
    /// The sync states (one per disk), written only after the data is durable.
    pub state: StateStore,
    /// Where jobs writing here hold their leases.
    pub leases: Arc<dyn Store>,
    /// How replica files are written.
    pub sink: FileSinkOptions,
}

impl ReplicaTarget {
    /// Opens (creating) a replica directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, OrchError> {
        let dir = dir.into();
        let meta = dir.join(".syncproxy");
        std::fs::create_dir_all(&meta)
            .map_err(|e| OrchError::Refused(format!("cannot create {}: {e}", meta.display())))?;
        let state = StateStore::open(meta.join("state"))?;
        Ok(Self { dir, state, leases: Arc::new(LocalStore::new(&meta)), sink: FileSinkOptions::default() })
    }

    /// The folder of one VM's replica disks: its name made safe for a file name, then the
    /// start of its instance UUID (two VMs may share a name).
    pub fn vm_dir(&self, vm: &Vm) -> PathBuf {
        let safe: String = vm
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
            .collect();
        let uuid: String = vm.instance_uuid.as_deref().unwrap_or("nouuid").chars().take(8).collect();
        self.dir.join(format!("{}_{uuid}", safe.trim_start_matches('.')))
    }

    /// The replica file of the disk in `slot` (`scsi0:1`) of `vm`.
    pub fn disk_path(&self, vm: &Vm, slot: &str) -> PathBuf {
        self.vm_dir(vm).join(format!("{}.raw", slot.replace(':', "-")))
    }

    /// The sync-state key of that disk, from the vCenter `vcenter` (its instance UUID); `None`
    /// for a VM without an instance UUID.
    pub fn key(&self, vcenter: &str, vm: &Vm, slot: &str) -> Option<SyncKey> {
        Some(SyncKey {
            vcenter: vcenter.to_owned(),
            vm: vm.instance_uuid.clone()?,
            disk: slot.to_owned(),
            destination: self.disk_path(vm, slot).display().to_string(),
        })
    }
}

/// Where a job's VMs go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Restore points in a repository (which also holds the job leases).
    Repository(Repo),
    /// Replica disks, brought up to date in place.
    Replica(ReplicaTarget),
}
