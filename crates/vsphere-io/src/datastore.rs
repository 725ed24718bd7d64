//! A disk of a frozen snapshot read over HTTPS from its datastore (`/folder` range reads), as a
//! pipeline source. The disk's descriptor is read first and parsed by `vmdk`. A single flat
//! extent with no parent (a VMFS or monolithicFlat base disk: the layer a VM's only snapshot
//! freezes) is read straight into the pipeline's buffers. Anything else (the deltas of older
//! snapshots over the base, in SEsparse or vmfsSparse, or sparse extents) is opened as a
//! `vmdk::Disk` chain whose files are read in ranges over the same HTTPS connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use pipeline::{BlockError, BlockSource, ErrorKind, IoFuture, SourceAllocation};
use vsphere::datastore::{DatastoreFile, DatastoreReader};

use crate::OpenError as OrchError;

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

/// The kind of a datastore read's failure, decided by [`vsphere::Error::retry`]: what the
/// client would back off from (a busy host's 503, a lost connection) is transient, and the
/// copy engine retries it; so is a timeout, which for one read of one attempt is the host
/// being slow, not an operation's deadline. A missing file is not found; a range the file
/// does not have is invalid input; the rest (refused access, a broken answer) is fatal.
fn vsphere_kind(e: &vsphere::Error) -> ErrorKind {
    match (e.retry(), e) {
        (vsphere::Retry::Backoff, _) | (_, vsphere::Error::Timeout { .. }) => ErrorKind::Transient,
        (_, vsphere::Error::Http { status: Some(404), .. }) => ErrorKind::NotFound,
        (_, vsphere::Error::Http { status: Some(416), .. } | vsphere::Error::Config(_)) => ErrorKind::InvalidInput,
        (vsphere::Retry::Relogin | vsphere::Retry::Never, _) => ErrorKind::Fatal,
    }
}

/// Opens the frozen disk whose descriptor is `ds_path` (`[ds1] vm/vm.vmdk`, or a snapshot's
/// `[ds1] vm/vm-000001.vmdk`) in `datacenter`, as of the frozen view `identity` (a snapshot's
/// moref): read straight when it is one flat extent, else as a chain. Also says how many layers
/// it has.
pub async fn open_frozen(
    reader: DatastoreReader,
    datacenter: &str,
    ds_path: &str,
    capacity: u64,
    identity: String,
) -> Result<(Arc<dyn BlockSource>, usize), OrchError> {
    let descriptor_file = DatastoreFile::from_ds_path(datacenter, ds_path)?;
    let size = reader.size(&descriptor_file).await?;
    let flat = if size <= MAX_DESCRIPTOR {
        let raw = reader.read(&descriptor_file, 0, size).await?;
        match std::str::from_utf8(&raw) {
            Ok(text) => {
                let d = vmdk::Descriptor::parse(text, ds_path)?;
                single_flat_extent(&d).map(str::to_owned)
            }
            // A sparse file with its descriptor inside: a chain of one.
            Err(_) => None,
        }
    } else {
        None
    };
    match flat {
        Some(extent) => {
            let file = DatastoreFile::from_ds_path(datacenter, &sibling(ds_path, &extent))?;
            let size = reader.size(&file).await?;
            if size < capacity {
                return Err(OrchError::Refused(format!(
                    "{ds_path}: its extent holds {size} bytes, the disk is {capacity}"
                )));
            }
            Ok((Arc::new(DatastoreSource { reader, file, name: ds_path.to_owned(), identity, size: capacity }), 1))
        }
        None => {
            let chain = ChainSource::open(reader, datacenter, ds_path, capacity, identity).await?;
            let layers = chain.layers();
            Ok((Arc::new(chain), layers))
        }
    }
}

/// The file of a descriptor's only extent, when it is flat from its start with no parent and
/// names a file beside the descriptor.
fn single_flat_extent(d: &vmdk::Descriptor) -> Option<&str> {
    let [extent] = d.extents.as_slice() else { return None };
    let plain = matches!(extent.kind, vmdk::ExtentKind::Flat | vmdk::ExtentKind::Vmfs)
        && extent.offset.unwrap_or(0) == 0
        && d.parent_cid() == vmdk::NO_PARENT_CID;
    extent.file.as_deref().filter(|f| plain && !f.contains('/') && !f.is_empty())
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

    /// Read from a snapshot, which nothing writes.
    fn frozen(&self) -> bool {
        true
    }

    /// The allocation comes from CBT (`QueryChangedDiskAreas` with `*`), not from the file.
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async { Ok(None) })
    }

    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            let len = buf.len() as u64;
            pipeline::check_range(&self.name, offset, len, self.size)?;
            // One attempt: the engine retries what is transient, with its own patience.
            self.reader.read_into_once(&self.file, offset, &mut buf).await.map_err(|e| {
                BlockError::new(vsphere_kind(&e), format!("reading {}", self.name)).at(offset, len).with_source(e)
            })?;
            Ok(buf)
        })
    }
}

/// A datastore's files as `vmdk` sees files: paths inside the datastore (`vm/vm.vmdk`), each
/// read in ranges over HTTPS. Its reads block, so they run on blocking threads only.
struct DatastoreFiles {
    reader: DatastoreReader,
    datacenter: String,
    datastore: String,
    runtime: tokio::runtime::Handle,
    /// Set once the chain is open: from then on its files are read for the copy engine.
    opened: Arc<AtomicBool>,
}

impl vmdk::Files for DatastoreFiles {
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn vmdk::ReadAt>> {
        let name = format!("[{}] {}", self.datastore, path.display());
        let file = DatastoreFile::from_ds_path(&self.datacenter, &name).map_err(std::io::Error::other)?;
        let len = self.runtime.block_on(self.reader.size(&file)).map_err(|e| match e {
            vsphere::Error::Http { status: Some(404), .. } => {
                std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
            }
            e => std::io::Error::other(e),
        })?;
        Ok(Arc::new(DatastoreFileReader {
            reader: self.reader.clone(),
            file,
            name,
            len,
            runtime: self.runtime.clone(),
            opened: self.opened.clone(),
        }))
    }

    fn identity(&self, path: &Path) -> std::io::Result<PathBuf> {
        // Descriptors' names are followed only beside them (no `..`), so the path is the file.
        Ok(path.to_path_buf())
    }
}

/// One datastore file read in ranges, as `vmdk` reads files.
struct DatastoreFileReader {
    reader: DatastoreReader,
    file: DatastoreFile,
    name: String,
    len: u64,
    runtime: tokio::runtime::Handle,
    opened: Arc<AtomicBool>,
}

impl std::fmt::Debug for DatastoreFileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes, over HTTPS)", self.name, self.len)
    }
}

impl vmdk::ReadAt for DatastoreFileReader {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        // While the chain is opened, outside the copy engine, with the client's retries within
        // its timeout; once it is open, one attempt, as for a flat disk: the engine retries what
        // `ChainSource::read_at` classifies as transient.
        let read = if self.opened.load(Ordering::Acquire) {
            self.runtime.block_on(self.reader.read_into_once(&self.file, offset, buf))
        } else {
            self.runtime.block_on(self.reader.read_into(&self.file, offset, buf))
        };
        read.map_err(std::io::Error::other)
    }
}

/// A frozen disk that is a chain of layers (snapshot deltas over a base), opened by `vmdk` with
/// every file read over HTTPS.
#[derive(Debug, Clone)]
pub struct ChainSource {
    disk: Arc<vmdk::Disk>,
    name: String,
    identity: String,
    size: u64,
}

impl ChainSource {
    /// Opens the chain whose top is `ds_path`; `capacity` is what vSphere says the disk holds.
    pub async fn open(
        reader: DatastoreReader,
        datacenter: &str,
        ds_path: &str,
        capacity: u64,
        identity: String,
    ) -> Result<Self, OrchError> {
        let (datastore, path) = ds_path
            .strip_prefix('[')
            .and_then(|p| p.split_once("] "))
            .ok_or_else(|| OrchError::Refused(format!("{ds_path} is not a datastore path ([ds] dir/file.vmdk)")))?;
        let files = DatastoreFiles {
            reader,
            datacenter: datacenter.to_owned(),
            datastore: datastore.to_owned(),
            runtime: tokio::runtime::Handle::current(),
            opened: Arc::new(AtomicBool::new(false)),
        };
        let opened = files.opened.clone();
        let top = PathBuf::from(path);
        let disk =
            tokio::task::spawn_blocking(move || vmdk::Disk::open_in(&files, top, vmdk::PathPolicy::SameDirectory))
                .await
                .map_err(|e| OrchError::Refused(format!("opening {ds_path} did not finish: {e}")))??;
        if disk.capacity() < capacity {
            return Err(OrchError::Refused(format!(
                "{ds_path}: the chain holds {} bytes, the disk is {capacity}",
                disk.capacity()
            )));
        }
        opened.store(true, Ordering::Release);
        let layers = disk.layers().len();
        tracing::info!("{ds_path}: reading a chain of {layers} layer(s) over HTTPS");
        Ok(Self { disk: Arc::new(disk), name: ds_path.to_owned(), identity, size: capacity })
    }

    /// How many layers the chain has, the frozen top first.
    pub fn layers(&self) -> usize {
        self.disk.layers().len()
    }
}

impl BlockSource for ChainSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        format!("{} (a chain of {} layers)", self.name, self.layers())
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    /// Read from a snapshot, which nothing writes.
    fn frozen(&self) -> bool {
        true
    }

    /// The allocation comes from CBT, as for a flat disk.
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async { Ok(None) })
    }

    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        let disk = self.disk.clone();
        let name = self.name.clone();
        Box::pin(async move {
            pipeline::check_range(&name, offset, buf.len() as u64, self.size)?;
            pipeline::blocking(move || {
                let len = buf.len() as u64;
                disk.read_at(&mut buf, offset).map_err(|e| {
                    // A datastore read's failure inside is classified as one, else as VMDK's.
                    let kind = match &e {
                        vmdk::VmdkError::Io { error, .. } => {
                            error.get_ref().and_then(|c| c.downcast_ref::<vsphere::Error>()).map(vsphere_kind)
                        }
                        _ => None,
                    };
                    let kind = kind.unwrap_or_else(|| blockio::vmdk_kind(&e));
                    BlockError::new(kind, format!("reading {name}")).at(offset, len).with_source(e)
                })?;
                Ok(buf)
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{sibling, vsphere_kind};
    use pipeline::ErrorKind;

    #[test]
    fn extents_are_found_beside_their_descriptor() {
        assert_eq!(sibling("[ds1] vm/vm.vmdk", "vm-flat.vmdk"), "[ds1] vm/vm-flat.vmdk");
        assert_eq!(sibling("[ds1] a/b/vm.vmdk", "x.vmdk"), "[ds1] a/b/x.vmdk");
        assert_eq!(sibling("[ds1] vm.vmdk", "vm-flat.vmdk"), "[ds1] vm-flat.vmdk");
    }

    #[test]
    fn datastore_read_failures_get_the_kind_the_engine_acts_on() {
        let http = |status| vsphere::Error::Http { context: "GET".into(), message: "x".into(), status: Some(status) };
        for s in [503, 502, 504, 429] {
            assert_eq!(vsphere_kind(&http(s)), ErrorKind::Transient, "{s}");
        }
        assert_eq!(vsphere_kind(&http(404)), ErrorKind::NotFound);
        assert_eq!(vsphere_kind(&http(416)), ErrorKind::InvalidInput);
        assert_eq!(vsphere_kind(&http(403)), ErrorKind::Fatal);
        assert_eq!(vsphere_kind(&http(401)), ErrorKind::Fatal);
        let reset = vsphere::Error::Io { context: "GET".into(), source: std::io::ErrorKind::ConnectionReset.into() };
        assert_eq!(vsphere_kind(&reset), ErrorKind::Transient);
        let slow =
            vsphere::Error::Timeout { operation: "GET".into(), after: std::time::Duration::from_secs(20), last: None };
        assert_eq!(vsphere_kind(&slow), ErrorKind::Transient);
        assert_eq!(vsphere_kind(&vsphere::Error::Protocol("no Content-Range".into())), ErrorKind::Fatal);
        assert_eq!(vsphere_kind(&vsphere::Error::Config("the range overflows".into())), ErrorKind::InvalidInput);
    }
}
