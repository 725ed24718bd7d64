//! A VMDK file or snapshot chain as a source, read through `crates/vmdk`; its allocation is
//! the union of the chain's grain tables, so unallocated grains are never read.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;

use pipeline::blocking;
use pipeline::{BlockError, BlockSource, IoFuture, SourceAllocation, check_range};

use crate::vmdk_error;

/// An opened VMDK chain.
#[derive(Debug)]
pub struct VmdkSource {
    disk: Arc<vmdk::Disk>,
    name: String,
    identity: String,
}

impl VmdkSource {
    /// Opens the VMDK at `path` with its parents, under `policy`.
    pub fn open(path: impl AsRef<Path>, policy: vmdk::PathPolicy) -> Result<Self, BlockError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let disk = vmdk::Disk::open(path, policy).map_err(|e| vmdk_error(format!("opening {name}"), e))?;
        // The chain's files as they are now, and each layer's CID (which VMware and qemu change
        // on the first write to a layer): a resumed copy must see the same ones.
        let mut identity = String::from("vmdk");
        for layer in disk.layers() {
            if let Some(cid) = layer.descriptor.as_ref().and_then(vmdk::Descriptor::cid) {
                identity.push_str(&format!(":cid={cid:08x}"));
            }
            let files = std::iter::once(&layer.path).chain(layer.extents.iter().filter_map(|e| e.file.as_ref()));
            for p in files {
                let meta = std::fs::metadata(p).map_err(|e| BlockError::io(format!("examining {}", p.display()), e))?;
                identity.push_str(&format!(":{}:{}@{}.{}", meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec()));
            }
        }
        Ok(Self { disk: Arc::new(disk), name, identity })
    }
}

impl BlockSource for VmdkSource {
    fn size(&self) -> u64 {
        self.disk.capacity()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    /// The CIDs and the files' times and sizes in the identity: a layer written since changes
    /// them.
    fn frozen(&self) -> bool {
        true
    }

    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        let (disk, name) = (self.disk.clone(), self.name.clone());
        Box::pin(blocking(move || {
            let a = disk.allocation().map_err(|e| vmdk_error(format!("mapping {name}"), e))?;
            Ok(Some(SourceAllocation { data: a.data, zero: a.zero }))
        }))
    }

    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        let (disk, name) = (self.disk.clone(), self.name.clone());
        Box::pin(async move {
            check_range(&name, offset, buf.len() as u64, disk.capacity())?;
            blocking(move || {
                let len = buf.len() as u64;
                disk.read_at(&mut buf, offset).map_err(|e| vmdk_error(format!("reading {name}"), e).at(offset, len))?;
                Ok(buf)
            })
            .await
        })
    }
}
