//! A raw disk image or a block device as a source; its allocation comes from
//! `SEEK_DATA`/`SEEK_HOLE`, so holes are never read.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use cbt::ExtentSet;
use rustix::fs::SeekFrom;

use super::blocking;
use crate::{BlockError, BlockSource, IoFuture, SourceAllocation, check_range};

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
        let identity = format!("file:{}:{}:{}:{}.{}", meta.dev(), meta.ino(), size, meta.mtime(), meta.mtime_nsec());
        Ok(Self { file: Arc::new(file), path, size, identity, regular })
    }
}

/// The data extents of a file from `SEEK_DATA`/`SEEK_HOLE`, or `None` when the file system
/// cannot tell (then everything counts as data).
pub fn data_extents(file: &File, size: u64) -> Result<Option<ExtentSet>, std::io::Error> {
    let mut set = ExtentSet::new();
    let mut at = 0;
    while at < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if let Some(e) = cbt::Extent::from_bounds(start, end) {
            set.insert(e);
        }
        at = end.max(start + 1);
    }
    Ok(Some(set))
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
                let data = data_extents(&file, size).map_err(|e| BlockError::io(format!("mapping {path}"), e))?;
                Ok(data.map(|data| SourceAllocation { data, zero: ExtentSet::new() }))
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
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| BlockError::io(format!("reading {path} at byte {offset}"), e))?;
                Ok(buf)
            })
            .await
        })
    }
}
