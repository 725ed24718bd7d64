//! How a VM's frozen disks are read: over HTTPS from their datastore, through VDDK, or from NBD
//! exports the operator serves.

use std::sync::Arc;

use vsphere::{MoRef, Vm};
use vsphere_io::open_frozen;

use crate::OrchError;
use crate::context::{JobContext, nbd_uri};
use crate::disk::DiskFacts;

/// How a VM's frozen disks are read: over HTTPS from their datastore, through VDDK, or from
/// NBD exports the operator serves.
pub(crate) enum Reader {
    Https { reader: vsphere::datastore::DatastoreReader, datacenter: String },
    Vddk(Arc<vsphere_io::VddkVm>),
    Nbd { template: String, vm: Box<Vm> },
}

impl Reader {
    /// Connects the VM's reader as of `snap` (VDDK when the job has it).
    pub(crate) async fn for_vm(ctx: &JobContext, vm: &Vm, snap: &MoRef, datacenter: &str) -> Result<Self, OrchError> {
        if let Some(template) = &ctx.nbd {
            return Ok(Self::Nbd { template: template.clone(), vm: Box::new(vm.clone()) });
        }
        let Some(vddk) = ctx.vddk.clone() else {
            return Ok(Self::Https { reader: ctx.client.datastore_reader()?, datacenter: datacenter.to_owned() });
        };
        let (client, vm, snap) = (ctx.client.clone(), vm.moref.clone(), snap.clone());
        let conn = tokio::task::spawn_blocking(move || vsphere_io::VddkVm::connect(&vddk, &client, &vm, &snap))
            .await
            .map_err(|e| OrchError::Refused(format!("VDDK's connect did not finish: {e}")))??;
        Ok(Self::Vddk(Arc::new(conn)))
    }

    /// Opens one frozen disk: the source and how it is read.
    pub(crate) async fn open(
        &self,
        f: &DiskFacts,
        snap: &MoRef,
    ) -> Result<(Arc<dyn pipeline::BlockSource>, String), OrchError> {
        match self {
            Self::Https { reader, datacenter } => {
                let (source, layers) =
                    open_frozen(reader.clone(), datacenter, &f.frozen_file, f.disk.capacity, snap.to_string()).await?;
                let how = if layers == 1 { "https".to_owned() } else { format!("https, {layers} layers") };
                Ok((source, how))
            }
            Self::Vddk(conn) => {
                let (conn, path, capacity, id) =
                    (conn.clone(), f.frozen_file.clone(), f.disk.capacity, snap.to_string());
                let source = tokio::task::spawn_blocking(move || conn.open(&path, capacity, id))
                    .await
                    .map_err(|e| OrchError::Refused(format!("VDDK's open did not finish: {e}")))??;
                let how = format!("vddk:{}", source.transport());
                Ok((Arc::new(source), how))
            }
            Self::Nbd { template, vm } => {
                let uri = nbd_uri(template, vm, snap, &f.slot);
                let source = blockio::NbdSource::connect(&uri, 2, Some(snap.to_string()))
                    .await
                    .map_err(|e| OrchError::Refused(format!("{}: the NBD export {uri}: {e}", f.slot)))?;
                if pipeline::BlockSource::size(&source) < f.disk.capacity {
                    return Err(OrchError::Refused(format!(
                        "{}: the NBD export {uri} holds {} bytes, the disk is {}",
                        f.slot,
                        pipeline::BlockSource::size(&source),
                        f.disk.capacity
                    )));
                }
                Ok((Arc::new(source), format!("nbd:{uri}")))
            }
        }
    }
}
