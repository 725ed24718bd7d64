//! The copy of a VM's disks under a snapshot: into a repository as a restore point, or onto
//! replica disks, each disk's data durable before what records it is written.

use std::sync::Arc;

use blockio::FileSink;
use cbt::{CopyPlan, Destination};
use pipeline::progress::Progress;
use pipeline::{BlockSink, CopyOptions, Digests, DiskCopy, copy_disk};
use replica::replicate::{SyncJob, sync};
use repo::{Consistency, DiskSpec, Manifest, Repo, SourceInfo};
use vsphere::{MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::plan::{disk_facts, plan_backup, previous_point};
use crate::read::Reader;
use crate::report::{DiskReport, VmReport};
use crate::support::{blocking, datacenter_of, vm_key};
use crate::target::ReplicaTarget;
use crate::vmx::config_files;

pub(crate) async fn copy_under(
    ctx: &JobContext,
    vm: &Vm,
    snap: &MoRef,
    consistency: Consistency,
    job: &str,
    report: &mut VmReport,
) -> Result<Manifest, OrchError> {
    let repo = ctx.repo()?;
    let previous = previous_point(repo, vm).await?;
    let planned = plan_backup(ctx, repo, vm, Some(snap), previous.as_ref(), &mut report.warnings).await?;
    let datacenter = datacenter_of(&ctx.client, vm).await?;
    let parent = previous.as_ref().map(|p| p.id.clone());
    let specs: Vec<DiskSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let (r, key, job, source) = (repo.clone(), vm_key(&ctx.client, vm), job.to_owned(), snap.to_string());
    let (mut backup, mut done, notes) =
        blocking(move || begin_or_resume(&r, key.as_deref(), &job, &source, parent.as_deref(), specs)).await?;
    report.warnings.extend(notes);
    let reader = ctx.client.datastore_reader()?;
    let disks = Reader::for_vm(ctx, vm, snap, &datacenter).await?;
    for (file, data) in config_files(&reader, &datacenter, vm, report).await {
        backup = blocking(move || backup.add_file(&file, &data).map(|()| backup)).await?;
    }
    for (n, p) in planned.into_iter().enumerate() {
        let Some(plan) = p.plan else {
            return Err(OrchError::Refused(format!("{}: no plan under the snapshot", p.facts.slot)));
        };
        let full = matches!(plan, CopyPlan::Full { .. });
        let (read, zero) = match plan {
            CopyPlan::Full { read, zero, .. } | CopyPlan::Incremental { read, zero } => (read, zero),
        };
        let sink = backup.sink(n).ok_or_else(|| OrchError::Refused(format!("no sink for {}", p.facts.slot)))?;
        let progress = Arc::new(Progress::child_of(ctx.metrics.progress.clone()));
        let copying = ctx.metrics.track(format!("{} {}", vm.name, p.facts.slot), progress.clone());
        let (source, transport) = disks.open(&p.facts, snap).await?;
        let job = DiskCopy {
            read,
            zero,
            digests: Digests::zeros(sink.granularity().get(), p.facts.disk.capacity),
            done: done.get_mut(n).map(std::mem::take).unwrap_or_default(),
            checkpoint: backup.checkpointer(n),
            source,
            sink: sink.clone(),
        };
        // A restore point keeps no digests of its own; a plain repository's sink takes them
        // as its chunk IDs anyway, an encrypted one's are keyed.
        let options = CopyOptions { digests: false, ..ctx.options.clone() };
        let r = copy_disk(job, &ctx.engine, &options, progress).await?;
        if r.resumed > 0 {
            report.warnings.push(format!("{}: {} bytes were stored before the interruption", p.facts.slot, r.resumed));
        }
        sink.commit().await?;
        drop(copying);
        ctx.metrics.disk_copied();
        let stats = sink.stats();
        report.disks.push(DiskReport {
            name: p.facts.slot,
            full,
            plan: p.words,
            read: r.read,
            stored_chunks: stats.stored_chunks,
            stored_bytes: stats.stored_bytes,
            transport,
        });
    }
    let source = SourceInfo { name: vm.name.clone(), instance_uuid: vm.instance_uuid.clone() };
    let m = blocking(move || backup.finish(source, consistency)).await?;
    clear_reset(ctx, vm, report).await;
    Ok(m)
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

/// Brings `vm`'s replica disks up to date from `snap`: per disk, the sync state says what the
/// replica holds; CBT's changes since then are copied (all allocated data the first time, or
/// when CBT cannot be trusted); the state is committed only after the replica is durable. A
/// replica interrupted mid-copy stays marked dirty until a sync completes.
pub(crate) async fn replicate_under(
    ctx: &JobContext,
    target: &ReplicaTarget,
    vm: &Vm,
    snap: &MoRef,
    job: &str,
    report: &mut VmReport,
) -> Result<(), OrchError> {
    let vcenter = ctx.client.content().about.instance_uuid.clone();
    let vm_dir = target.vm_dir(vm);
    std::fs::create_dir_all(&vm_dir)
        .map_err(|e| OrchError::Refused(format!("cannot create {}: {e}", vm_dir.display())))?;
    let path_of = |slot: &str| target.disk_path(vm, slot);
    let key_of = |slot: &str| {
        target
            .key(&vcenter, vm, slot)
            .ok_or_else(|| OrchError::Refused(format!("{} has no instance UUID to key its replica by", vm.name)))
    };
    let granularity = target.sink.granularity;
    let facts = disk_facts(
        ctx,
        vm,
        Some(snap),
        |_, slot| {
            let state = target.state.load(&key_of(slot)?)?;
            let committed = state.as_ref().and_then(|s| s.committed.clone());
            let holds_data = path_of(slot).metadata().is_ok_and(|m| m.len() > 0);
            Ok((committed, Destination { granularity, holds_data }))
        },
        &mut report.warnings,
    )
    .await?;
    let datacenter = datacenter_of(&ctx.client, vm).await?;
    let reader = ctx.client.datastore_reader()?;
    let disks = Reader::for_vm(ctx, vm, snap, &datacenter).await?;
    for (file, data) in config_files(&reader, &datacenter, vm, report).await {
        durable::write_atomic(&vm_dir.join(file), &data)?;
    }
    for mut f in facts {
        let Some(changes) = f.changes.take() else {
            return Err(OrchError::Refused(format!("{}: no changes under the snapshot", f.slot)));
        };
        let (path, size, options) = (path_of(&f.slot), f.disk.capacity, target.sink);
        let sink = blocking(move || FileSink::open(path, size, options)).await?;
        let progress = Arc::new(Progress::child_of(ctx.metrics.progress.clone()));
        let copying = ctx.metrics.track(format!("{} {}", vm.name, f.slot), progress.clone());
        let (source, transport) = disks.open(&f, snap).await?;
        let job = SyncJob {
            source,
            sink: Arc::new(sink),
            store: target.state.clone(),
            key: key_of(&f.slot)?,
            job: job.to_owned(),
            current: f.current,
            changes,
        };
        let out = sync(job, &ctx.engine, &ctx.options, progress).await?;
        drop(copying);
        ctx.metrics.disk_copied();
        report.warnings.extend(out.warnings.iter().map(|w| format!("{}: {w}", f.slot)));
        if out.resumed {
            report.warnings.push(format!("{}: resumed from its checkpoint", f.slot));
        }
        report.disks.push(DiskReport {
            name: f.slot,
            full: out.full_reason.is_some(),
            plan: out.full_reason.map_or_else(|| "incremental".to_owned(), |r| format!("full ({r})")),
            read: out.report.read,
            stored_chunks: 0,
            stored_bytes: out.report.written,
            transport,
        });
    }
    report.replica = Some(vm_dir);
    clear_reset(ctx, vm, report).await;
    Ok(())
}

/// Forgets `vm`'s reset mark in this job's target, once its disks were copied in full.
pub(crate) async fn clear_reset(ctx: &JobContext, vm: &Vm, report: &mut VmReport) {
    let Some(key) = vm_key(&ctx.client, vm) else { return };
    let store = ctx.leases();
    if let Err(e) = blocking(move || crate::cbt_reset::clear_reset(&*store, &key)).await {
        report.warnings.push(format!("the CBT reset mark stays (the next copy is full again): {e}"));
    }
}
