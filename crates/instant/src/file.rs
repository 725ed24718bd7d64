//! A replica's disk as an NBD export: a raw file or a block device, read-only, holes found with
//! `SEEK_DATA`/`SEEK_HOLE` (the same mapping `blockio`'s file source uses, `vmdk::ReadAt`'s);
//! and [`replica_disks`], which finds a replica's disks and the sync state recorded for each.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_wire::proto::{errno, state};
use nbd_wire::server::{BoxFuture, ExportError, ExportSource};
use replica::state::SyncState;

use crate::InstantError;

/// A raw disk file or block device, served read-only.
#[derive(Debug, Clone)]
pub struct FileExport {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    regular: bool,
}

impl FileExport {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self, InstantError> {
        let mut file = File::open(path).map_err(|e| InstantError::io(path, e))?;
        let meta = file.metadata().map_err(|e| InstantError::io(path, e))?;
        let regular = meta.file_type().is_file();
        if meta.is_dir() {
            return Err(InstantError::Invalid(format!("{} is a directory, not a disk", path.display())));
        }
        // A block device's size is where its end is.
        let size =
            if regular { meta.len() } else { file.seek(SeekFrom::End(0)).map_err(|e| InstantError::io(path, e))? };
        Ok(Self { file: Arc::new(file), path: path.to_path_buf(), size, regular })
    }

    /// The file served.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Extents of `[offset, end)` from the data ranges inside it: data `0`, the rest holes.
fn extents(offset: u64, end: u64, data: &[(u64, u64)]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut push = |from: u64, to: u64, flags: u32| {
        if to > from {
            let len = u32::try_from(to - from).unwrap_or(u32::MAX);
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += len,
                _ => out.push((len, flags)),
            }
        }
    };
    let mut at = offset;
    for &(a, b) in data {
        let (a, b) = (a.clamp(at, end), b.clamp(at, end));
        push(at, a, state::HOLE | state::ZERO);
        push(a, b, 0);
        at = at.max(b);
    }
    push(at, end, state::HOLE | state::ZERO);
    out
}

impl ExportSource for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        let file = self.file.clone();
        let len = buf.len();
        Box::pin(async move {
            let data = tokio::task::spawn_blocking(move || {
                let mut data = vec![0u8; len];
                file.read_exact_at(&mut data, offset).map(|()| data)
            })
            .await
            .map_err(std::io::Error::other)??;
            buf.copy_from_slice(&data);
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<Vec<(u32, u32)>, ExportError>> {
        let (file, regular) = (self.file.clone(), self.regular);
        let end = offset.saturating_add(u64::from(length)).min(self.size);
        Box::pin(async move {
            if !regular || end <= offset {
                return Ok(vec![(length, 0)]);
            }
            let ranges = tokio::task::spawn_blocking(move || vmdk::ReadAt::data_ranges(&*file, offset, end))
                .await
                .map_err(std::io::Error::other)?
                .map_err(|e| ExportError::Errno { errno: errno::EIO, message: format!("mapping holes: {e}") })?;
            Ok(match ranges {
                Some(r) => extents(offset, end, &r),
                // The file system cannot tell: everything is data.
                None => vec![(length, 0)],
            })
        })
    }
}

/// One disk of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaDisk {
    /// Its slot (`scsi0:0`) when the file is named after one, else the file's name.
    pub name: String,
    /// The raw file (or device).
    pub path: PathBuf,
    /// The sync state recorded for it, when one is found beside the replica.
    pub state: Option<SyncState>,
}

impl ReplicaDisk {
    /// Why the disk is not known to hold a complete copy, if it is not: a sync that was
    /// interrupted (until the next completes, the file mixes two points in time), or no sync
    /// ever committed. `None` when its state says it is consistent, or there is no state.
    pub fn inconsistent(&self) -> Option<String> {
        let s = self.state.as_ref()?;
        match (&s.committed, &s.dirty) {
            (_, Some(d)) => Some(format!(
                "{} is being written by job {} (or was, and it stopped before it finished): it is not a \
                 consistent copy until a sync completes",
                self.path.display(),
                d.job
            )),
            (None, None) => Some(format!("{} has never completed a sync", self.path.display())),
            (Some(_), None) => None,
        }
    }
}

/// The slot a replica file is named after (`scsi0-1.raw` → `scsi0:1`), or its name.
fn slot_name(path: &Path) -> String {
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let is_slot = stem.split_once('-').is_some_and(|(bus, unit)| {
        let digits = bus.trim_start_matches(|c: char| c.is_ascii_lowercase());
        digits.len() < bus.len()
            && !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit())
            && !unit.is_empty()
            && unit.chars().all(|c| c.is_ascii_digit())
    });
    if is_slot { stem.replacen('-', ":", 1) } else { stem }
}

/// The sync states in the replica directory above `disk` (`<dir>/.syncproxy/state`, where
/// `<dir>` is the disk's folder or the one above it), those whose destination is `disk`.
fn state_of(disk: &Path) -> Option<SyncState> {
    let real = std::fs::canonicalize(disk).ok()?;
    let states = real.ancestors().skip(1).take(2).map(|d| d.join(".syncproxy/state")).find(|d| d.is_dir())?;
    let mut found: Option<SyncState> = None;
    for e in std::fs::read_dir(&states).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".state.json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else { continue };
        let Ok(s) = serde_json::from_slice::<SyncState>(&bytes) else { continue };
        if s.format == replica::state::STATE_FORMAT
            && std::fs::canonicalize(&s.key.destination).is_ok_and(|d| d == real)
            && found.as_ref().is_none_or(|f| f.committed_at < s.committed_at)
        {
            found = Some(s);
        }
    }
    found
}

/// The disks of a replica: `path` is one disk (a raw file or a block device), or one VM's
/// replica folder (its `*.raw` files, by name). Each comes with the sync state recorded for it
/// in the replica directory, when there is one.
pub fn replica_disks(path: &Path) -> Result<Vec<ReplicaDisk>, InstantError> {
    let meta = std::fs::metadata(path).map_err(|e| InstantError::io(path, e))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        if path.join(".syncproxy").is_dir() {
            return Err(InstantError::Invalid(format!(
                "{} is a replica directory of many VMs: name one VM's folder in it, or a disk file",
                path.display()
            )));
        }
        for e in std::fs::read_dir(path).map_err(|e| InstantError::io(path, e))? {
            let p = e.map_err(|e| InstantError::io(path, e))?.path();
            if p.extension().is_some_and(|x| x == "raw") && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(InstantError::NotFound(format!("{} holds no replica disk (*.raw)", path.display())));
        }
    } else {
        files.push(path.to_path_buf());
    }
    Ok(files.into_iter().map(|p| ReplicaDisk { name: slot_name(&p), state: state_of(&p), path: p }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back_from_file_names() {
        assert_eq!(slot_name(Path::new("/r/vm_1234/scsi0-1.raw")), "scsi0:1");
        assert_eq!(slot_name(Path::new("/r/vm/nvme12-0.raw")), "nvme12:0");
        for other in ["disk.raw", "my-disk.raw", "scsi-0.raw", "0-1.raw", "scsi0-x.raw"] {
            assert_eq!(slot_name(Path::new(other)), other.trim_end_matches(".raw"), "{other}");
        }
    }

    #[test]
    fn holes_and_data_become_extents() {
        let hz = state::HOLE | state::ZERO;
        assert_eq!(extents(0, 100, &[(10, 20), (50, 100)]), vec![(10, hz), (10, 0), (30, hz), (50, 0)]);
        assert_eq!(extents(15, 60, &[(10, 20), (50, 100)]), vec![(5, 0), (30, hz), (10, 0)]);
        assert_eq!(extents(0, 8, &[]), vec![(8, hz)]);
    }
}
