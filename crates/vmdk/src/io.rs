//! Positioned reads from the files a disk is made of: a real file, or bytes in memory (for
//! tests and fuzzing). Every read is exact; a short read is an error naming the offset.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A source of bytes at offsets, shared between threads.
pub trait ReadAt: Send + Sync + std::fmt::Debug {
    /// The length in bytes.
    fn len(&self) -> u64;

    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from `offset`; an error if the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The ranges `(start, end)` within `[start, end)` that may hold data, when the source can
    /// tell (a sparse file's `SEEK_DATA`/`SEEK_HOLE`); `None` when it cannot.
    fn data_ranges(&self, _start: u64, _end: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

impl ReadAt for File {
    fn len(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        use rustix::fs::{SeekFrom, seek};
        let mut ranges = Vec::new();
        let mut pos = start;
        while pos < end {
            let data = match seek(self, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // ENXIO: no data at or after pos.
                Err(rustix::io::Errno::NXIO) => break,
                // The file system cannot tell: say so, and the caller treats all as data.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let hole = seek(self, SeekFrom::Hole(data))?;
            ranges.push((data, hole.min(end)));
            pos = hole;
        }
        Ok(Some(ranges))
    }
}

impl ReadAt for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= <[u8]>::len(self));
        let src = start.and_then(|s| self.get(s..s.checked_add(buf.len())?));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {} bytes at {offset} runs past the end ({} bytes)", buf.len(), <[u8]>::len(self)),
            )),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}
