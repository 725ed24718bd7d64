//! Writing a disk's whole contents as a raw image: only the allocated bytes are read, all-zero
//! blocks are left as holes, and two or more threads share the work.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::disk::Disk;
use crate::error::{Result, VmdkError};

/// Bytes per read request.
const CHUNK: u64 = 4 << 20;

/// What an export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStats {
    /// The disk's capacity.
    pub capacity: u64,
    /// Bytes read from the disk (its allocated part, widened to requests).
    pub read: u64,
    /// Bytes written (the rest stayed holes).
    pub written: u64,
}

/// Writes `disk` to `out` as a raw image of its full capacity, sparse where it is zero, with
/// `threads` readers. `out` is truncated to the capacity first; it is not synced.
pub fn export_raw(disk: &Disk, out: &File, threads: usize) -> Result<ExportStats> {
    export_raw_of(disk, &disk.allocation()?.data, out, threads)
}

/// [`export_raw`] reading only `data` (the caller's [`Disk::allocation`]): for callers that
/// already mapped the disk, so the tables are not walked twice.
pub fn export_raw_of(disk: &Disk, data: &cbt::ExtentSet, out: &File, threads: usize) -> Result<ExportStats> {
    let capacity = disk.capacity();
    let io = |e| VmdkError::io("raw output", e);
    out.set_len(0).map_err(io)?;
    out.set_len(capacity).map_err(io)?;
    let chunk = std::num::NonZeroU64::new(CHUNK).unwrap_or(std::num::NonZeroU64::MIN);
    let requests: Vec<cbt::Extent> = data.clamp(capacity).split(chunk).collect();
    let next = AtomicUsize::new(0);
    let read = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let first_error: Mutex<Option<VmdkError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; crate::to_usize(CHUNK)];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = requests.get(i) else { break };
                    let len = crate::to_usize(req.len());
                    let result = disk.read_at(&mut buf[..len], req.start()).and_then(|()| {
                        read.fetch_add(req.len(), Ordering::Relaxed);
                        if buf[..len].iter().any(|&b| b != 0) {
                            out.write_all_at(&buf[..len], req.start()).map_err(io)?;
                            written.fetch_add(req.len(), Ordering::Relaxed);
                        }
                        Ok(())
                    });
                    if let Err(e) = result {
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        // Stop the others at their next request.
                        next.store(requests.len(), Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(ExportStats { capacity, read: read.into_inner(), written: written.into_inner() })
}
