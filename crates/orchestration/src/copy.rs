//! The copy of a VM's disks under a snapshot into the job's target, the same skeleton for every
//! kind of target: what the target holds of each disk, the facts and plan, the copy begun, the
//! VM's configuration files kept, each disk read from its frozen source and written and
//! committed by the target, then the VM committed (a restore point's manifest, a replica's
//! folder) only after every disk is durable.

use std::sync::Arc;

use pipeline::progress::Progress;
use repo::{Consistency, SourceInfo};
use vsphere::{MoRef, Vm};

use crate::OrchError;
use crate::context::JobContext;
use crate::plan::disk_facts;
use crate::read::Reader;
use crate::report::{DiskReport, VmReport};
use crate::support::{blocking, datacenter_of, vm_key};
use crate::target::{Committed, DiskJob};
use crate::vmx::config_files;

/// Copies `vm`'s disks as frozen by `snap` into the job's target, as the copy of `job` (this
/// job's tag, or the dead job's whose copy is adopted); returns what the target committed.
pub(crate) async fn copy_vm(
    ctx: &JobContext,
    vm: &Vm,
    snap: &MoRef,
    consistency: Consistency,
    job: &str,
    report: &mut VmReport,
) -> Result<Committed, OrchError> {
    let mut w = ctx.open_vm(vm).await?;
    let facts = disk_facts(ctx, vm, Some(snap), |_, slot| w.committed(slot), &mut report.warnings).await?;
    w.plan(&facts, &mut report.warnings);
    let datacenter = datacenter_of(&ctx.client, vm).await?;
    let (job, source) = (job.to_owned(), snap.to_string());
    let (mut w, notes) = blocking(move || w.begin(&job, &source).map(|notes| (w, notes))).await?;
    report.warnings.extend(notes);
    let reader = ctx.client.datastore_reader()?;
    let disks = Reader::for_vm(ctx, vm, snap, &datacenter).await?;
    for (file, data) in config_files(&reader, &datacenter, vm, &mut report.warnings).await {
        w = blocking(move || w.add_file(&file, &data).map(|()| w)).await?;
    }
    for (n, facts) in facts.into_iter().enumerate() {
        let progress = Arc::new(Progress::child_of(ctx.metrics.progress.clone()));
        let copying = ctx.metrics.track(format!("{} {}", vm.name, facts.slot), progress.clone());
        let (source, transport) = disks.open(&facts, snap).await?;
        let name = facts.slot.clone();
        let disk = DiskJob { n, facts, source, progress, engine: &ctx.engine, options: &ctx.options };
        let d = w.copy_disk(disk, &mut report.warnings).await?;
        drop(copying);
        ctx.metrics.disk_copied();
        report.disks.push(DiskReport {
            name,
            full: d.full,
            plan: d.plan,
            read: d.read,
            stored_chunks: d.stored_chunks,
            stored_bytes: d.stored_bytes,
            transport,
        });
    }
    let source = SourceInfo { name: vm.name.clone(), instance_uuid: vm.instance_uuid.clone() };
    let committed = blocking(move || w.finish(source, consistency)).await?;
    report.warnings.extend(clear_reset(ctx, vm).await);
    Ok(committed)
}

/// Forgets `vm`'s reset mark in this job's target, once its disks were copied in full; says so
/// when the mark stays.
async fn clear_reset(ctx: &JobContext, vm: &Vm) -> Option<String> {
    let key = vm_key(&ctx.client, vm)?;
    let store = ctx.leases();
    let e = blocking(move || crate::cbt_reset::clear_reset(&*store, &key)).await.err()?;
    Some(format!("the CBT reset mark stays (the next copy is full again): {e}"))
}
