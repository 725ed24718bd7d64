//! A disk of a frozen snapshot read over HTTPS from its datastore (`/folder` range reads), as a
//! pipeline source. The disk's descriptor is read first and parsed by `vmdk`; today a single
//! flat extent (a VMFS or monolithicFlat base disk, the layer a snapshot freezes) is read
//! directly. Sparse and SEsparse layers over HTTPS are not read yet, and are refused by name.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pipeline::{BlockError, BlockSource, IoFuture, SourceAllocation};
use vsphere::datastore::{DatastoreFile, DatastoreReader};

use crate::OrchError;

/// The largest descriptor read (a descriptor is text of a few hundred bytes).
const MAX_DESCRIPTOR: u64 = vmdk::MAX_DESCRIPTOR_BYTES as u64;

/// One disk file read in ranges.
#[derive(Debug, Clone)]
pub struct DatastoreSource {
    reader: DatastoreReader,
    file: DatastoreFile,
    /// The datastore path of the descriptor, for messages.
    name: String,
    /// What identifies the frozen view (the snapshot).
    identity: String,
    size: u64,
}

/// The datastore path of `name` beside `ds_path`: `[ds1] vm/vm.vmdk` and `vm-flat.vmdk` give
/// `[ds1] vm/vm-flat.vmdk`.
fn sibling(ds_path: &str, name: &str) -> String {
    match (ds_path.rfind('/'), ds_path.find("] ")) {
        (Some(i), _) => format!("{}{name}", &ds_path[..=i]),
        (None, Some(i)) => format!("{}{name}", &ds_path[..i + 2]),
        (None, None) => name.to_owned(),
    }
}

/// Reads a whole small file.
async fn read_small(reader: &DatastoreReader, file: &DatastoreFile, max: u64) -> Result<Vec<u8>, OrchError> {
    let size = reader.size(file).await?;
    if size > max {
        return Err(OrchError::Refused(format!("{} is {size} bytes, more than a descriptor may be", file.path)));
    }
    Ok(reader.read(file, 0, size).await?.to_vec())
}

impl DatastoreSource {
    /// Opens the disk whose descriptor is `ds_path` (`[ds1] vm/vm.vmdk`) in `datacenter`, as of
    /// the frozen view `identity` (a snapshot's moref).
    pub async fn open(
        reader: DatastoreReader,
        datacenter: &str,
        ds_path: &str,
        capacity: u64,
        identity: String,
    ) -> Result<Self, OrchError> {
        let descriptor_file = DatastoreFile::from_ds_path(datacenter, ds_path)?;
        let raw = read_small(&reader, &descriptor_file, MAX_DESCRIPTOR).await?;
        let text = String::from_utf8(raw)
            .map_err(|_| OrchError::Refused(format!("{ds_path} is not a text descriptor (a sparse disk?)")))?;
        let d = vmdk::Descriptor::parse(&text, ds_path)?;
        let [extent] = d.extents.as_slice() else {
            return Err(OrchError::Refused(format!(
                "{ds_path} has {} extents; reading several over HTTPS is not supported yet",
                d.extents.len()
            )));
        };
        if !matches!(extent.kind, vmdk::ExtentKind::Flat | vmdk::ExtentKind::Vmfs) || extent.offset.unwrap_or(0) != 0 {
            return Err(OrchError::Refused(format!(
                "{ds_path} is a {:?} extent; only flat disks are read over HTTPS so far",
                extent.kind
            )));
        }
        let extent_name = extent
            .file
            .as_deref()
            .filter(|f| !f.contains('/') && !f.is_empty())
            .ok_or_else(|| OrchError::Refused(format!("{ds_path}: its extent names no file beside it")))?;
        let file = DatastoreFile::from_ds_path(datacenter, &sibling(ds_path, extent_name))?;
        let size = reader.size(&file).await?;
        let sectors = extent.sectors.saturating_mul(512);
        if size < capacity || sectors < capacity {
            return Err(OrchError::Refused(format!(
                "{ds_path}: the extent holds {size} bytes ({sectors} by its descriptor), the disk is {capacity}"
            )));
        }
        Ok(Self { reader, file, name: ds_path.to_owned(), identity, size: capacity })
    }
}

impl BlockSource for DatastoreSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    /// The allocation comes from CBT (`QueryChangedDiskAreas` with `*`), not from the file.
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async { Ok(None) })
    }

    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            let len = buf.len() as u64;
            pipeline::check_range(&self.name, offset, len, self.size)?;
            // Busy hosts answer 503: back off a little, a few times.
            let mut delay = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                match self.reader.read_into(&self.file, offset, &mut buf).await {
                    Ok(()) => return Ok(buf),
                    Err(e) if e.retry() == vsphere::Retry::Backoff && attempt < 5 => {
                        tracing::warn!("{}: {e}; retrying in {delay:?}", self.name);
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                        attempt += 1;
                    }
                    Err(e) => return Err(BlockError::Invalid(format!("{}: {e}", self.name))),
                }
            }
        })
    }
}

/// Shared, for the pipeline.
pub(crate) fn shared(s: DatastoreSource) -> Arc<dyn BlockSource> {
    Arc::new(s)
}

#[cfg(test)]
mod tests {
    use super::sibling;

    #[test]
    fn extents_are_found_beside_their_descriptor() {
        assert_eq!(sibling("[ds1] vm/vm.vmdk", "vm-flat.vmdk"), "[ds1] vm/vm-flat.vmdk");
        assert_eq!(sibling("[ds1] a/b/vm.vmdk", "x.vmdk"), "[ds1] a/b/x.vmdk");
        assert_eq!(sibling("[ds1] vm.vmdk", "vm-flat.vmdk"), "[ds1] vm-flat.vmdk");
    }
}
