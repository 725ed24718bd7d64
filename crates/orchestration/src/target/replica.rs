//! A replica directory as a target: per disk, a sparse raw file brought up to date in place by
//! `replica::replicate::sync`, which plans, copies and commits the disk's sync state as one
//! step (the state only after the data is durable; a replica interrupted mid-copy stays marked
//! dirty until a sync completes), so this target plans nothing ahead and finishes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use blockio::{FileSink, FileSinkOptions};
use cbt::{CommittedDisk, Destination};
use durable::{JobLease, LocalStore, LockTiming, Store};
use replica::replicate::{SyncJob, sync};
use replica::state::{StateStore, SyncKey};
use repo::{Consistency, SourceInfo};
use vsphere::Vm;

use super::{Backend, Committed, Copying, DiskCopied, DiskJob, VmWrite};
use crate::OrchError;
use crate::disk::{DiskFacts, slot_of};
use crate::support::blocking;

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

impl Backend for ReplicaTarget {
    fn leases(&self) -> Arc<dyn Store> {
        self.leases.clone()
    }

    fn lease(&self, tag: &str) -> Result<JobLease, OrchError> {
        Ok(JobLease::take(self.leases.clone(), LockTiming::default(), tag)?)
    }

    fn progress_of(&self, vcenter: &str, vm: &Vm, job: &str, source: &str) -> Result<bool, OrchError> {
        let mut found = false;
        for d in &vm.disks {
            let Some(key) = self.key(vcenter, vm, &slot_of(d)) else { continue };
            if let Some((cp, _)) = self.state.load_checkpoint(&key)? {
                found |= cp.job == job && cp.source == source;
            }
        }
        Ok(found)
    }

    fn open_vm(&self, vcenter: &str, vm: &Vm) -> Result<Box<dyn VmWrite>, OrchError> {
        let vm_dir = self.vm_dir(vm);
        std::fs::create_dir_all(&vm_dir)
            .map_err(|e| OrchError::Refused(format!("cannot create {}: {e}", vm_dir.display())))?;
        Ok(Box::new(ReplicaWrite {
            target: self.clone(),
            vcenter: vcenter.to_owned(),
            vm: vm.clone(),
            vm_dir,
            job: String::new(),
        }))
    }
}

/// One VM's replica disks being brought up to date.
struct ReplicaWrite {
    target: ReplicaTarget,
    vcenter: String,
    vm: Vm,
    vm_dir: PathBuf,
    /// The job whose copy this is, once begun.
    job: String,
}

impl ReplicaWrite {
    fn key_of(&self, slot: &str) -> Result<SyncKey, OrchError> {
        self.target
            .key(&self.vcenter, &self.vm, slot)
            .ok_or_else(|| OrchError::Refused(format!("{} has no instance UUID to key its replica by", self.vm.name)))
    }
}

impl VmWrite for ReplicaWrite {
    fn committed(&self, slot: &str) -> Result<(Option<CommittedDisk>, Destination), OrchError> {
        let state = self.target.state.load(&self.key_of(slot)?)?;
        let committed = state.as_ref().and_then(|s| s.committed.clone());
        let holds_data = self.target.disk_path(&self.vm, slot).metadata().is_ok_and(|m| m.len() > 0);
        Ok((committed, Destination { granularity: self.target.sink.granularity, holds_data }))
    }

    fn parent(&self) -> Option<&str> {
        None
    }

    fn plan(&mut self, _: &[DiskFacts], _: &mut Vec<String>) {}

    fn begin(&mut self, job: &str, _: &str) -> Result<Vec<String>, OrchError> {
        job.clone_into(&mut self.job);
        Ok(Vec::new())
    }

    fn add_file(&mut self, name: &str, data: &[u8]) -> Result<(), OrchError> {
        Ok(durable::write_atomic(&self.vm_dir.join(name), data)?)
    }

    fn copy_disk<'a>(&'a mut self, disk: DiskJob<'a>, warnings: &'a mut Vec<String>) -> Copying<'a> {
        Box::pin(async move {
            let mut f = disk.facts;
            let Some(changes) = f.changes.take() else {
                return Err(OrchError::Refused(format!("{}: no changes under the snapshot", f.slot)));
            };
            let (path, size, sink_options) =
                (self.target.disk_path(&self.vm, &f.slot), f.disk.capacity, self.target.sink);
            let sink = blocking(move || FileSink::open(path, size, sink_options)).await?;
            let job = SyncJob {
                source: disk.source,
                sink: Arc::new(sink),
                store: self.target.state.clone(),
                key: self.key_of(&f.slot)?,
                job: self.job.clone(),
                current: f.current,
                changes,
            };
            let out = sync(job, disk.engine, disk.options, disk.progress).await?;
            warnings.extend(out.warnings.iter().map(|w| format!("{}: {w}", f.slot)));
            if out.resumed {
                warnings.push(format!("{}: resumed from its checkpoint", f.slot));
            }
            Ok(DiskCopied {
                full: out.full_reason.is_some(),
                plan: out.full_reason.map_or_else(|| "incremental".to_owned(), |r| format!("full ({r})")),
                read: out.report.read,
                stored_chunks: 0,
                stored_bytes: out.report.written,
            })
        })
    }

    fn finish(self: Box<Self>, _: SourceInfo, _: Consistency) -> Result<Committed, OrchError> {
        Ok(Committed::Replica(self.vm_dir))
    }
}
