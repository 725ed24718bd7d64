//! Overlays stored as a new restore point: an incremental of the point they were served over
//! (`Repo::begin` with it as parent, so every chunk no overlay wrote keeps the parent's ID),
//! storing only the chunks overlays wrote, with the point's captured files, source and
//! consistency carried over.

use std::num::NonZeroU64;

use bytes::Bytes;
use nbd_wire::server::ExportSource;
use pipeline::{BlockSink, is_zero};
use repo::{DiskSpec, Manifest, Repo};

use crate::{InstantError, Overlay};

/// Stores what `overlays` (each over disk `n` of restore point `point`) show as a new restore
/// point whose parent is `point`, and returns its manifest. Disks without an overlay, and every
/// chunk no overlay wrote, reuse the parent's chunks; a written chunk that reads as zeros is
/// stored as a zero chunk. A disk an overlay wrote loses its change ID (its bytes are no longer
/// what the VM's change tracking describes, so the next backup of the VM copies it whole); the
/// others keep theirs. Nothing exists in the repository until every disk is stored.
pub async fn commit(repo: &Repo, point: &str, overlays: &[(usize, &Overlay)]) -> Result<Manifest, InstantError> {
    let m = repo.point(point)?;
    for (i, (n, o)) in overlays.iter().enumerate() {
        let d = m.disks.get(*n).ok_or_else(|| InstantError::NotFound(format!("{} has no disk {n}", m.id)))?;
        if o.size() != d.capacity {
            return Err(InstantError::Invalid(format!(
                "the overlay of disk {} is {} bytes, the disk {}",
                d.name,
                o.size(),
                d.capacity
            )));
        }
        if overlays[..i].iter().any(|(other, _)| other == n) {
            return Err(InstantError::Invalid(format!("two overlays of disk {}", d.name)));
        }
    }
    let written = |n: usize| overlays.iter().find(|(d, _)| *d == n).map(|(_, o)| o.written()).unwrap_or_default();
    let specs: Vec<DiskSpec> = m
        .disks
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let same = written(n).is_empty();
            DiskSpec {
                name: d.name.clone(),
                capacity: d.capacity,
                change_id: d.change_id.clone().filter(|_| same),
                committed: d.committed.clone().filter(|_| same),
                label: d.label.clone(),
            }
        })
        .collect();
    let (r, parent) = (repo.clone(), m.id.clone());
    let mut backup = blocking(move || r.begin(Some(&parent), specs)).await?;
    for f in &m.files {
        let data = repo.file(&m, &f.name)?;
        backup.add_file(&f.name, &data)?;
    }
    let chunk = u64::from(repo.config().chunk_size);
    for (n, d) in m.disks.iter().enumerate() {
        let sink = backup.sink(n).ok_or_else(|| InstantError::NotFound(format!("no sink for disk {}", d.name)))?;
        let store_err = |source| InstantError::Store { what: format!("disk {}", d.name), source };
        if let Some((_, o)) = overlays.iter().find(|(k, _)| *k == n) {
            let g = NonZeroU64::new(chunk).unwrap_or(NonZeroU64::MIN);
            for piece in o.written().align_outward(g, d.capacity).split(g) {
                let (at, len) = (piece.start(), piece.len());
                let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                o.read_at(at, &mut buf).await.map_err(|source| InstantError::Read {
                    what: format!("the overlay of disk {} at {at}", d.name),
                    source,
                })?;
                if is_zero(&buf) {
                    sink.write_zeroes(at, len).await.map_err(store_err)?;
                } else {
                    sink.write_at(at, Bytes::from(buf)).await.map_err(store_err)?;
                }
            }
        }
        sink.commit().await.map_err(store_err)?;
    }
    let (source, consistency) = (m.source.clone(), m.consistency);
    blocking(move || backup.finish(source, consistency)).await
}

/// Runs repository work that may wait (on a lock, on storage) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, repo::RepoError> + Send + 'static,
) -> Result<T, InstantError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| InstantError::Invalid(format!("a repository task failed: {e}")))?
        .map_err(InstantError::from)
}
