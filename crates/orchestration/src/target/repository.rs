//! A repository as a target: each VM's copy becomes a restore point, planned in full from the
//! newest point of the VM before it begins (the point names its disks up front), its progress
//! kept in a session so that a dead job's copy under the same snapshot can be finished, and the
//! manifest written only once every disk is stored.

use std::num::NonZeroU64;
use std::sync::Arc;

use cbt::{CommittedDisk, CopyPlan, Destination};
use durable::{JobLease, Store};
use pipeline::{BlockSink, CopyOptions, Digests, DiskCopy, copy_disk};
use repo::{Consistency, DiskSpec, Manifest, Repo, SourceInfo};
use vsphere::Vm;

use super::{Backend, Committed, Copying, DiskCopied, DiskJob, VmWrite};
use crate::OrchError;
use crate::disk::{DiskFacts, DiskPlan, plan_disk};
use crate::support::vm_key_in;

impl Backend for Repo {
    fn leases(&self) -> Arc<dyn Store> {
        self.store().clone()
    }

    fn lease(&self, tag: &str) -> Result<JobLease, OrchError> {
        Ok(self.job_lease(tag)?)
    }

    fn progress_of(&self, vcenter: &str, vm: &Vm, job: &str, source: &str) -> Result<bool, OrchError> {
        let Some(key) = vm_key_in(vcenter, vm) else { return Ok(false) };
        Ok(self.session(&key)?.is_some_and(|x| x.job == job && x.source == source))
    }

    fn open_vm(&self, vcenter: &str, vm: &Vm) -> Result<Box<dyn VmWrite>, OrchError> {
        let previous = newest_point(self, vm)?;
        let chunk = NonZeroU64::new(u64::from(self.config().chunk_size))
            .ok_or_else(|| OrchError::Refused("the repository has no chunk size".into()))?;
        Ok(Box::new(PointWrite {
            repo: self.clone(),
            key: vm_key_in(vcenter, vm),
            chunk,
            previous,
            planned: Vec::new(),
            backup: None,
            done: Vec::new(),
        }))
    }
}

/// The newest restore point of `vm` in the repository.
fn newest_point(repo: &Repo, vm: &Vm) -> Result<Option<Manifest>, OrchError> {
    let Some(uuid) = vm.instance_uuid.as_deref() else { return Ok(None) };
    let points = repo.points()?;
    Ok(points.into_iter().rev().find(|p| p.source.instance_uuid.as_deref() == Some(uuid)))
}

/// One VM's copy into a restore point.
struct PointWrite {
    repo: Repo,
    /// The VM's session key ([`crate::vm_key`]); none without an instance UUID.
    key: Option<String>,
    chunk: NonZeroU64,
    /// The point an incremental starts from.
    previous: Option<Manifest>,
    /// Per disk, in the order of the facts.
    planned: Vec<DiskPlan>,
    /// Once begun.
    backup: Option<repo::Backup>,
    /// Per disk, what a dead job already stored.
    done: Vec<cbt::ExtentSet>,
}

impl PointWrite {
    fn backup(&mut self) -> Result<&mut repo::Backup, OrchError> {
        self.backup.as_mut().ok_or_else(|| OrchError::Refused("the restore point was not begun".into()))
    }
}

impl VmWrite for PointWrite {
    fn committed(&self, slot: &str) -> Result<(Option<CommittedDisk>, Destination), OrchError> {
        let committed = self
            .previous
            .as_ref()
            .and_then(|p| p.disks.iter().find(|e| e.name == slot))
            .and_then(|e| e.committed.clone());
        let holds_data = committed.is_some();
        Ok((committed, Destination { granularity: self.chunk, holds_data }))
    }

    fn parent(&self) -> Option<&str> {
        self.previous.as_ref().map(|p| p.id.as_str())
    }

    fn plan(&mut self, facts: &[DiskFacts], warnings: &mut Vec<String>) {
        self.planned = facts.iter().map(|f| plan_disk(f, warnings)).collect();
    }

    fn begin(&mut self, job: &str, source: &str) -> Result<Vec<String>, OrchError> {
        let specs: Vec<DiskSpec> = self.planned.iter().map(|p| p.spec.clone()).collect();
        let parent = self.parent().map(str::to_owned);
        let (backup, done, notes) =
            begin_or_resume(&self.repo, self.key.as_deref(), job, source, parent.as_deref(), specs)?;
        (self.backup, self.done) = (Some(backup), done);
        Ok(notes)
    }

    fn add_file(&mut self, name: &str, data: &[u8]) -> Result<(), OrchError> {
        Ok(self.backup()?.add_file(name, data)?)
    }

    fn copy_disk<'a>(&'a mut self, disk: DiskJob<'a>, warnings: &'a mut Vec<String>) -> Copying<'a> {
        Box::pin(async move {
            let (n, slot) = (disk.n, &disk.facts.slot);
            let Some((plan, words)) = self.planned.get_mut(n).and_then(|p| Some((p.plan.take()?, p.words.clone())))
            else {
                return Err(OrchError::Refused(format!("{slot}: no plan under the snapshot")));
            };
            let full = matches!(plan, CopyPlan::Full { .. });
            let (fetch, keep) = (plan.fetch().clone(), plan.keep().clone());
            let (read, zero) = match plan {
                CopyPlan::Full { read, zero, .. } | CopyPlan::Incremental { read, zero, .. } => (read, zero),
            };
            let done = self.done.get_mut(n).map(std::mem::take).unwrap_or_default();
            let backup = self.backup()?;
            let sink = backup.sink(n).ok_or_else(|| OrchError::Refused(format!("no sink for {slot}")))?;
            let job = DiskCopy {
                read,
                zero,
                fetch: Some(fetch),
                keep,
                digests: Digests::zeros(sink.granularity().get(), disk.facts.disk.capacity),
                done,
                checkpoint: backup.checkpointer(n),
                source: disk.source,
                sink: sink.clone(),
            };
            // A restore point keeps no digests of its own; a plain repository's sink takes them
            // as its chunk IDs anyway, an encrypted one's are keyed.
            let options = CopyOptions { digests: false, ..disk.options.clone() };
            let r = copy_disk(job, disk.engine, &options, disk.progress).await?;
            if r.resumed > 0 {
                warnings.push(format!("{slot}: {} bytes were stored before the interruption", r.resumed));
            }
            sink.commit().await?;
            let stats = sink.stats();
            Ok(DiskCopied {
                full,
                plan: words,
                read: r.read,
                stored_chunks: stats.stored_chunks,
                stored_bytes: stats.stored_bytes,
            })
        })
    }

    fn finish(self: Box<Self>, source: SourceInfo, consistency: Consistency) -> Result<Committed, OrchError> {
        let backup = self.backup.ok_or_else(|| OrchError::Refused("the restore point was not begun".into()))?;
        Ok(Committed::Point(backup.finish(source, consistency)?.id))
    }
}

/// Begins the backup into `repo`, keeping its progress in session `key`; or finishes the backup
/// that session holds, when `job` made it under the same frozen `source` on the same `parent`,
/// returning per disk what is already stored. Any other session of the VM is dropped: its
/// snapshot is gone, and the copy is planned again from the last restore point.
fn begin_or_resume(
    repo: &Repo,
    key: Option<&str>,
    job: &str,
    source: &str,
    parent: Option<&str>,
    specs: Vec<DiskSpec>,
) -> Result<(repo::Backup, Vec<cbt::ExtentSet>, Vec<String>), repo::RepoError> {
    let none = vec![cbt::ExtentSet::new(); specs.len()];
    let Some(key) = key else { return Ok((repo.begin(parent, specs)?, none, Vec::new())) };
    let mut notes = Vec::new();
    if let Some(s) = repo.session(key)? {
        if s.job == job && s.source == source && s.parent.as_deref() == parent {
            match repo.resume(key, specs.clone()) {
                Ok((backup, done)) => {
                    let stored: u64 = done.iter().map(cbt::ExtentSet::total_bytes).sum();
                    notes.push(format!("finishing the backup job {job} began: {stored} bytes were already stored"));
                    return Ok((backup, done, notes));
                }
                Err(repo::RepoError::Conflict(why)) => notes.push(why),
                Err(e) => return Err(e),
            }
        } else {
            notes.push(format!(
                "dropped the unfinished backup of job {} (its snapshot is gone); planned from the last restore point",
                s.job
            ));
        }
        repo.drop_session(key)?;
    }
    let mut backup = repo.begin(parent, specs)?;
    backup.keep_progress(key, job, source)?;
    Ok((backup, none, notes))
}
