//! A raw disk image or a block device as a source; its allocation comes from
//! `SEEK_DATA`/`SEEK_HOLE`, so holes are never read.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use cbt::ExtentSet;
use rustix::fs::SeekFrom;

use pipeline::blocking;
use pipeline::{BlockError, BlockSource, IoFuture, SourceAllocation, check_range};

/// A raw image file or a block device, read-only.
#[derive(Debug)]
pub struct FileSource {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    identity: String,
    regular: bool,
}

impl FileSource {
    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BlockError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| BlockError::io(format!("opening {}", path.display()), e))?;
        let meta = file.metadata().map_err(|e| BlockError::io(format!("examining {}", path.display()), e))?;
        let regular = meta.file_type().is_file();
        let size = if regular {
            meta.len()
        } else {
            // A block device's size is where its end is.
            rustix::fs::seek(&file, SeekFrom::End(0))
                .map_err(|e| BlockError::io(format!("sizing {}", path.display()), e.into()))?
        };
        // Device, inode, size and modification time tell another file or a written one apart
        // most of the time, but prove nothing: a block device's node keeps its time while the
        // device is written, and a file's time can be set back. So a file source is never
        // `frozen`: a resumed copy checks what it had done against its digests.
        let identity = format!("file:{}:{}:{}:{}.{}", meta.dev(), meta.ino(), size, meta.mtime(), meta.mtime_nsec());
        Ok(Self { file: Arc::new(file), path, size, identity, regular })
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        let (file, size, regular, path) = (self.file.clone(), self.size, self.regular, self.describe());
        Box::pin(async move {
            if !regular {
                return Ok(None);
            }
            blocking(move || {
                // `SEEK_DATA`/`SEEK_HOLE`, as the VMDK reader maps flat extents.
                let ranges = vmdk::ReadAt::data_ranges(&*file, 0, size)
                    .map_err(|e| BlockError::io(format!("mapping {path}"), e))?;
                Ok(ranges.map(|r| SourceAllocation {
                    data: ExtentSet::from_extents(r.into_iter().filter_map(|(a, b)| cbt::Extent::from_bounds(a, b))),
                    zero: ExtentSet::new(),
                }))
            })
            .await
        })
    }

    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        let file = self.file.clone();
        Box::pin(async move {
            check_range(&self.describe(), offset, buf.len() as u64, self.size)?;
            let path = self.describe();
            blocking(move || {
                let len = buf.len() as u64;
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| BlockError::io(format!("reading {path}"), e).at(offset, len))?;
                Ok(buf)
            })
            .await
        })
    }
}
