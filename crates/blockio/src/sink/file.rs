//! A replica in a raw file (kept sparse: zeros become punched holes) or on a block device,
//! optionally written with `O_DIRECT` from the pool's aligned buffers.

use std::fs::{File, OpenOptions};
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use pipeline::{BlockError, BlockSink, IoFuture, blocking, check_range};
use rustix::fs::FallocateFlags;

/// How to open a file sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSinkOptions {
    /// The digest and planning unit (a multiple of 4096).
    pub granularity: NonZeroU64,
    /// Write aligned data with `O_DIRECT`, past the page cache.
    pub direct: bool,
}

impl Default for FileSinkOptions {
    fn default() -> Self {
        Self { granularity: NonZeroU64::new(crate::DEFAULT_GRANULARITY).unwrap_or(NonZeroU64::MIN), direct: false }
    }
}

/// A raw file or block device to write a replica into.
#[derive(Debug)]
pub struct FileSink {
    file: Arc<File>,
    direct: Option<Arc<File>>,
    path: PathBuf,
    size: u64,
    created: bool,
    device: bool,
    granularity: NonZeroU64,
    /// Buffered writes from many threads into one file spin on its inode lock (measured: 6 %
    /// of the copy's CPU with 8): two at a time keep one copying while the other waits. O_DIRECT
    /// writes may overlap more, for queue depth.
    writers: tokio::sync::Semaphore,
    /// Ranges written through the cache whose writeback was started, oldest first: evicted
    /// once [`EVICT_BEHIND`] bytes are newer, by when they are clean.
    written: Arc<std::sync::Mutex<Behind>>,
}

/// Ranges written through the page cache and not yet evicted.
#[derive(Debug, Default)]
struct Behind {
    ranges: std::collections::VecDeque<(u64, u64)>,
    bytes: u64,
}

/// How far behind the newest buffered write eviction runs. Writeback of each write is started
/// at once, but its pages can only be dropped once clean: asked at once, the kernel keeps them
/// (nbdcopy waits the same way, a few windows behind).
const EVICT_BEHIND: u64 = 32 << 20;

const DIRECT_ALIGN: u64 = 4096;

impl FileSink {
    /// Opens `path` to hold a disk of `size` bytes. A missing file is created sparse (and is
    /// known to read as zeros); an existing file is resized to `size`; a block device must be
    /// at least `size` bytes.
    pub fn open(path: impl AsRef<Path>, size: u64, options: FileSinkOptions) -> Result<Self, BlockError> {
        let path = path.as_ref().to_path_buf();
        let p = path.display().to_string();
        if !options.granularity.get().is_multiple_of(DIRECT_ALIGN) {
            return Err(BlockError::invalid(format!("granularity {} is not a multiple of 4096", options.granularity)));
        }
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| BlockError::io(format!("opening {p} for writing"), e))?;
        let meta = file.metadata().map_err(|e| BlockError::io(format!("examining {p}"), e))?;
        let device = meta.file_type().is_block_device_like();
        let mut created = !existed;
        if device {
            let have = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| BlockError::io(format!("sizing {p}"), e.into()))?;
            if have < size {
                return Err(BlockError::invalid(format!("{p} holds {have} bytes, the disk needs {size}")));
            }
        } else {
            created |= meta.len() == 0;
            if meta.len() != size {
                file.set_len(size).map_err(|e| BlockError::io(format!("sizing {p} to {size} bytes"), e))?;
            }
        }
        let direct = if options.direct {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(i32::try_from(rustix::fs::OFlags::DIRECT.bits()).unwrap_or(0))
                .open(&path)
                .map_err(|e| BlockError::io(format!("opening {p} with O_DIRECT"), e))?;
            Some(Arc::new(f))
        } else {
            None
        };
        let writers = tokio::sync::Semaphore::new(if options.direct { 4 } else { 2 });
        Ok(Self {
            file: Arc::new(file),
            direct,
            path,
            size,
            created,
            device,
            granularity: options.granularity,
            writers,
            written: Arc::default(),
        })
    }

    /// Whether this run created the file (so it reads as zeros and holds nothing).
    pub fn created(&self) -> bool {
        self.created
    }
}

trait DeviceLike {
    fn is_block_device_like(&self) -> bool;
}

impl DeviceLike for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_block_device(self)
    }
}

/// Writes zeros the slow way, when the file system cannot punch or zero a range.
fn write_zero_bytes(file: &File, offset: u64, length: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; usize::try_from(length.min(1 << 20)).unwrap_or(1 << 20)];
    let mut at = offset;
    while at < offset + length {
        let n = (offset + length - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..usize::try_from(n).unwrap_or(0)], at)?;
        at += n;
    }
    Ok(())
}

/// Writes `data` at `offset`: with `O_DIRECT` when open so and aligned, else through the page
/// cache, starting its writeback at once and evicting what is [`EVICT_BEHIND`] behind.
fn write_one(
    file: &File,
    direct: Option<&File>,
    written: &std::sync::Mutex<Behind>,
    path: &str,
    offset: u64,
    data: &[u8],
) -> Result<(), BlockError> {
    let aligned = data.as_ptr().addr().is_multiple_of(4096)
        && offset.is_multiple_of(DIRECT_ALIGN)
        && (data.len() as u64).is_multiple_of(DIRECT_ALIGN);
    let f = match direct {
        Some(d) if aligned => d,
        _ => file,
    };
    f.write_all_at(data, offset)
        .map_err(|e| BlockError::io(format!("writing {path}"), e).at(offset, data.len() as u64))?;
    if direct.is_some() && aligned {
        return Ok(());
    }
    // Start writing this range out now (DONTNEED begins writeback without waiting, then drops
    // what is clean, which fresh writes are not): the disk works during the copy rather than
    // all at the final fsync. Ranges far enough behind are written by now, and asked again they
    // leave the cache, which a backup nobody will read should not fill. nbdcopy does the same
    // with sync_file_range.
    let evict = |at: u64, len: u64| {
        let _ = rustix::fs::fadvise(file, at, NonZeroU64::new(len), rustix::fs::Advice::DontNeed);
    };
    let len = data.len() as u64;
    evict(offset, len);
    let due = {
        let mut w = written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.ranges.push_back((offset, len));
        w.bytes += len;
        let mut due = Vec::new();
        while w.bytes > EVICT_BEHIND
            && let Some((at, n)) = w.ranges.pop_front()
        {
            w.bytes -= n;
            due.push((at, n));
        }
        due
    };
    for (at, n) in due {
        evict(at, n);
    }
    Ok(())
}

impl BlockSink for FileSink {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn granularity(&self) -> NonZeroU64 {
        self.granularity
    }

    fn known_zero(&self) -> bool {
        self.created
    }

    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        self.write_many(vec![(offset, data)])
    }

    /// The ranges one after another on one blocking thread: one hop per request, not per range.
    fn write_many(&self, writes: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
        let (file, direct, path) = (self.file.clone(), self.direct.clone(), self.describe());
        let written = self.written.clone();
        Box::pin(async move {
            for (offset, data) in &writes {
                check_range(&path, *offset, data.len() as u64, self.size)?;
            }
            let _turn = self.writers.acquire().await.map_err(|_| BlockError::fatal("the writer gate is closed"))?;
            blocking(move || {
                for (offset, data) in writes {
                    write_one(&file, direct.as_deref(), &written, &path, offset, &data)?;
                }
                Ok(())
            })
            .await
        })
    }

    fn can_read_back(&self) -> bool {
        true
    }

    /// The file's or device's bytes, as the last copy left them.
    fn read_back(&self, offset: u64, mut buf: bytes::BytesMut) -> IoFuture<'_, bytes::BytesMut> {
        let (file, path) = (self.file.clone(), self.describe());
        Box::pin(async move {
            check_range(&path, offset, buf.len() as u64, self.size)?;
            blocking(move || {
                let len = buf.len() as u64;
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| BlockError::io(format!("reading back {path}"), e).at(offset, len))?;
                Ok(buf)
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        let (file, path, device) = (self.file.clone(), self.describe(), self.device);
        Box::pin(async move {
            check_range(&path, offset, length, self.size)?;
            blocking(move || {
                // A hole reads as zeros in a file; a block device zeroes the range in place.
                let flags = if device {
                    FallocateFlags::ZERO_RANGE
                } else {
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
                };
                match rustix::fs::fallocate(&*file, flags, offset, length) {
                    Ok(()) => Ok(()),
                    Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                        write_zero_bytes(&file, offset, length)
                            .map_err(|e| BlockError::io(format!("zeroing {path}"), e).at(offset, length))
                    }
                    Err(e) => Err(BlockError::io(format!("zeroing {path}"), e.into()).at(offset, length)),
                }
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        let (file, path) = (self.file.clone(), self.describe());
        Box::pin(blocking(move || file.sync_data().map_err(|e| BlockError::io(format!("syncing {path}"), e))))
    }

    fn commit(&self) -> IoFuture<'_, ()> {
        let (file, path, created) = (self.file.clone(), self.path.clone(), self.created);
        Box::pin(blocking(move || {
            file.sync_all().map_err(|e| BlockError::io(format!("syncing {}", path.display()), e))?;
            if created {
                durable::sync_parent(&path).map_err(|e| BlockError::io("syncing the directory", e.into()))?;
            }
            Ok(())
        }))
    }
}
