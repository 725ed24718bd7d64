//! A writable copy-on-write layer over a read-only export: written blocks go to a sparse
//! temporary file in a folder the caller names (never into the repository or the replica), a
//! bitmap says which blocks are the overlay's; a write of part of a block first copies the
//! block from the base. The file is removed when the overlay is dropped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cbt::ExtentSet;
use nbd_wire::proto::errno;
use nbd_wire::server::{BoxFuture, ExportError, ExportSource};

use crate::InstantError;

/// Locks serialising the copy of a base block into the overlay (by block number, striped).
const STRIPES: usize = 64;

/// A copy-on-write overlay over `base`.
pub struct Overlay {
    base: Arc<dyn ExportSource>,
    file: Arc<File>,
    /// Keeps the file's name, and removes it when dropped.
    temp: tempfile::TempPath,
    block: u64,
    size: u64,
    /// One bit per block: set once the block's bytes are in the file.
    ours: Vec<AtomicU64>,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("file", &self.temp.display())
            .field("block", &self.block)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn errno_of(e: std::io::Error) -> ExportError {
    let errno = match e.raw_os_error() {
        Some(28) => errno::ENOSPC,
        _ => errno::EIO,
    };
    ExportError::Errno { errno, message: format!("overlay: {e}") }
}

impl Overlay {
    /// An overlay over `base` in a new sparse file in `dir`, tracking writes by blocks of
    /// `block` bytes (a power of two from 512 bytes to 64 MiB).
    pub fn new(base: Arc<dyn ExportSource>, dir: &Path, block: u32) -> Result<Self, InstantError> {
        if !(512..=64 << 20).contains(&block) || !block.is_power_of_two() {
            return Err(InstantError::Invalid(format!(
                "overlay block {block} is not a power of two from 512 bytes to 64 MiB"
            )));
        }
        let size = base.size();
        let temp = tempfile::Builder::new()
            .prefix(".syncproxy-overlay-")
            .tempfile_in(dir)
            .map_err(|e| InstantError::io(dir, e))?;
        temp.as_file().set_len(size).map_err(|e| InstantError::io(temp.path(), e))?;
        let (file, temp) = temp.into_parts();
        let blocks = size.div_ceil(u64::from(block));
        let words = usize::try_from(blocks.div_ceil(64))
            .map_err(|_| InstantError::Invalid(format!("a disk of {size} bytes is too large for an overlay")))?;
        Ok(Self {
            base,
            file: Arc::new(file),
            temp,
            block: u64::from(block),
            size,
            ours: (0..words).map(|_| AtomicU64::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    /// The file holding the written blocks (removed when the overlay is dropped).
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The block size writes are tracked by.
    pub fn block(&self) -> u32 {
        u32::try_from(self.block).unwrap_or(u32::MAX)
    }

    /// The ranges written so far (whole blocks, the last one cut at the disk's end).
    pub fn written(&self) -> ExtentSet {
        let mut ranges = Vec::new();
        for (w, word) in self.ours.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let start = (w as u64 * 64 + u64::from(b)) * self.block;
                ranges.push((start, self.block.min(self.size - start)));
            }
        }
        ExtentSet::from_ranges(ranges)
    }

    fn is_ours(&self, block: u64) -> bool {
        let (w, b) = (usize::try_from(block / 64).unwrap_or(usize::MAX), block % 64);
        self.ours.get(w).is_some_and(|x| x.load(Ordering::Acquire) & (1 << b) != 0)
    }

    fn mark(&self, block: u64) {
        let (w, b) = (usize::try_from(block / 64).unwrap_or(usize::MAX), block % 64);
        if let Some(x) = self.ours.get(w) {
            x.fetch_or(1 << b, Ordering::Release);
        }
    }

    /// Whether the block at `at` is ours, and where the run of blocks like it ends (by `end`).
    fn run_from(&self, at: u64, end: u64) -> (bool, u64) {
        let ours = self.is_ours(at / self.block);
        let mut stop = end.min((at / self.block + 1) * self.block);
        while stop < end && self.is_ours(stop / self.block) == ours {
            stop = end.min((stop / self.block + 1) * self.block);
        }
        (ours, stop)
    }

    fn stripe(&self, block: u64) -> &tokio::sync::Mutex<()> {
        &self.stripes[usize::try_from(block % STRIPES as u64).unwrap_or(0)]
    }

    async fn pwrite(&self, data: Vec<u8>, at: u64) -> Result<(), ExportError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .map_err(std::io::Error::other)?
            .map_err(errno_of)
    }

    async fn pread(&self, at: u64, len: usize) -> Result<Vec<u8>, ExportError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, at).map(|()| buf)
        })
        .await
        .map_err(std::io::Error::other)?
        .map_err(errno_of)
    }

    /// Makes `[at, at + len)` of the file read as zeros: a punched hole (no space taken), or
    /// zeros written where the file system cannot punch.
    async fn punch(&self, at: u64, len: usize) -> Result<(), ExportError> {
        use rustix::fs::{FallocateFlags, fallocate};
        let file = self.file.clone();
        let punched = tokio::task::spawn_blocking(move || {
            fallocate(&*file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, at, len as u64)
        })
        .await
        .map_err(std::io::Error::other)?;
        match punched {
            Ok(()) => Ok(()),
            Err(_) => self.pwrite(vec![0u8; len], at).await,
        }
    }

    /// Writes `piece` (or zeros, for `None`, of `len` bytes) at `at`, inside block `block`.
    async fn write_piece(&self, block: u64, at: u64, piece: Option<&[u8]>, len: usize) -> Result<(), ExportError> {
        let start = block * self.block;
        let block_len = self.block.min(self.size - start);
        let whole = at == start && len as u64 == block_len;
        let bytes = || piece.map_or_else(|| vec![0u8; len], <[u8]>::to_vec);
        if whole || self.is_ours(block) {
            match piece {
                Some(p) => self.pwrite(p.to_vec(), at).await?,
                None => self.punch(at, len).await?,
            }
            self.mark(block);
            return Ok(());
        }
        // Part of a block the base still holds: copy the block in first, under its lock, so
        // two partial writes to one block keep each other's bytes.
        let _held = self.stripe(block).lock().await;
        if self.is_ours(block) {
            return self.pwrite(bytes(), at).await;
        }
        let mut buf = vec![0u8; usize::try_from(block_len).unwrap_or(0)];
        self.base.read_at(start, &mut buf).await?;
        let within = usize::try_from(at - start).unwrap_or(0);
        match piece {
            Some(p) => buf[within..within + len].copy_from_slice(p),
            None => buf[within..within + len].fill(0),
        }
        self.pwrite(buf, start).await?;
        self.mark(block);
        Ok(())
    }

    /// Writes over `[offset, offset + len)`, block by block.
    async fn write(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), ExportError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| ExportError::Errno { errno: errno::ENOSPC, message: "write past the end".into() })?;
        let mut at = offset;
        while at < end {
            let block = at / self.block;
            let stop = end.min((block + 1) * self.block);
            let (from, n) = (usize::try_from(at - offset).unwrap_or(0), usize::try_from(stop - at).unwrap_or(0));
            self.write_piece(block, at, data.map(|d| &d[from..from + n]), n).await?;
            at = stop;
        }
        Ok(())
    }
}

impl ExportSource for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            let end = offset + buf.len() as u64;
            let mut at = offset;
            // Runs of blocks that are all ours, or all the base's.
            while at < end {
                let (ours, stop) = self.run_from(at, end);
                let (o, n) = (usize::try_from(at - offset).unwrap_or(0), usize::try_from(stop - at).unwrap_or(0));
                if ours {
                    buf[o..o + n].copy_from_slice(&self.pread(at, n).await?);
                } else {
                    self.base.read_at(at, &mut buf[o..o + n]).await?;
                }
                at = stop;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<Vec<(u32, u32)>, ExportError>> {
        Box::pin(async move {
            let end = offset.saturating_add(u64::from(length)).min(self.size);
            let mut out: Vec<(u32, u32)> = Vec::new();
            let mut at = offset;
            while at < end {
                let (ours, stop) = self.run_from(at, end);
                let len = u32::try_from(stop - at).unwrap_or(u32::MAX);
                let got = if ours { vec![(len, 0)] } else { self.base.block_status(at, len).await? };
                let covered: u64 = got.iter().map(|&(l, _)| u64::from(l)).sum();
                for (l, f) in got {
                    match out.last_mut() {
                        Some((pl, pf)) if *pf == f => *pl += l,
                        _ => out.push((l, f)),
                    }
                }
                if covered < u64::from(len) || covered == 0 {
                    // The base answered for a prefix: so do we.
                    break;
                }
                at = stop;
            }
            if out.is_empty() {
                out.push((length, 0));
            }
            Ok(out)
        })
    }

    fn writable(&self) -> bool {
        true
    }

    fn write_at<'a>(&'a self, offset: u64, data: &'a [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(self.write(offset, Some(data), data.len() as u64))
    }

    fn write_zeroes(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(self.write(offset, None, u64::from(length)))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(std::io::Error::other)?
                .map_err(errno_of)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_wire::proto::state;
    use nbd_wire::server::MemoryExport;

    fn base() -> (Vec<u8>, Arc<dyn ExportSource>) {
        let mut data = testkit::noise(64 << 10, 3);
        data[32 << 10..48 << 10].fill(0);
        (data.clone(), Arc::new(MemoryExport::new(data, 4096)))
    }

    async fn read_all(o: &Overlay) -> Vec<u8> {
        let mut buf = vec![0u8; usize::try_from(o.size()).unwrap()];
        o.read_at(0, &mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn partial_writes_keep_the_rest_of_the_base_block_and_the_base_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (mut want, b) = base();
        let o = Overlay::new(b.clone(), dir.path(), 4096).unwrap();
        assert!(o.written().is_empty());
        assert_eq!(read_all(&o).await, want);
        // Inside one block, across a boundary, then again into a block already ours.
        for (at, len, seed) in [(100usize, 10usize, 1u64), (4090, 20, 2), (4096 + 7, 3, 3)] {
            let d = testkit::noise(len, seed);
            o.write_at(at as u64, &d).await.unwrap();
            want[at..at + len].copy_from_slice(&d);
        }
        assert_eq!(read_all(&o).await, want);
        assert_eq!(o.written(), ExtentSet::from_ranges([(0, 8192)]));
        let mut from_base = vec![0u8; 64 << 10];
        b.read_at(0, &mut from_base).await.unwrap();
        assert_eq!(from_base, base().0, "the base was never written");
        // Concurrent partial writes to one block that is not ours yet keep each other's bytes.
        let pieces: Vec<(usize, Vec<u8>)> =
            (0..16).map(|i| (20480 + i * 256, testkit::noise(256, 10 + i as u64))).collect();
        testkit::join_all(pieces.iter().map(|(at, d)| o.write_at(*at as u64, d)))
            .await
            .into_iter()
            .for_each(|r| r.unwrap());
        for (at, d) in &pieces {
            want[*at..*at + d.len()].copy_from_slice(d);
        }
        assert_eq!(read_all(&o).await, want);
        assert_eq!(o.written(), ExtentSet::from_ranges([(0, 8192), (20480, 4096)]));
    }

    #[tokio::test]
    async fn zeroes_and_block_status_and_the_file_goes_with_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut want, b) = base();
        let o = Overlay::new(b, dir.path(), 4096).unwrap();
        o.write_zeroes(1000, 10000).await.unwrap();
        want[1000..11000].fill(0);
        o.write_at(40 << 10, &[7u8; 100]).await.unwrap();
        want[40 << 10..(40 << 10) + 100].fill(7);
        assert_eq!(read_all(&o).await, want);
        assert_eq!(o.written(), ExtentSet::from_ranges([(0, 12288), (40960, 4096)]));
        let hz = state::HOLE | state::ZERO;
        // Ours is data; the base's hole at [32K, 48K) shows around the written block.
        assert_eq!(
            o.block_status(0, 64 << 10).await.unwrap(),
            vec![(32768, 0), (8192, hz), (4096, 0), (4096, hz), (16384, 0)]
        );
        assert!(o.write_at((64 << 10) - 1, &[1, 2]).await.is_err(), "past the end");
        let path = o.path().to_path_buf();
        assert!(path.starts_with(dir.path()) && path.exists());
        drop(o);
        assert!(!path.exists(), "the overlay file is removed with the overlay");
        assert!(Overlay::new(Arc::new(MemoryExport::new(vec![0; 10], 1)), dir.path(), 1000).is_err());
    }
}
