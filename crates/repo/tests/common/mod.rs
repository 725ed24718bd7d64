//! Helpers shared by the repository's integration tests: images with holes, and backups of
//! bytes in memory through a restore point's sink.

#![allow(dead_code, reason = "each test binary uses its own subset")]

use bytes::Bytes;
use pipeline::BlockSink;
use repo::{Consistency, DiskSpec, Manifest, Repo, SourceInfo};

/// An image of `len` bytes in chunks of `chunk`: every third chunk a hole, the rest
/// pseudo-random from `seed`.
pub(crate) fn image(len: usize, chunk: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for (i, c) in v.chunks_mut(chunk).enumerate() {
        if i % 3 == 1 {
            continue;
        }
        for b in c {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[0];
        }
    }
    v
}

/// Backs up `data` as one disk, writing one chunk at a time in order.
pub(crate) async fn backup_bytes(repo: &Repo, parent: Option<&str>, data: &[u8]) -> Result<Manifest, String> {
    let chunk = repo.config().chunk_size as usize;
    let len = data.len() as u64;
    let b = repo
        .begin(
            parent,
            vec![DiskSpec { name: "d".into(), capacity: len, change_id: None, committed: None, label: None }],
        )
        .map_err(|e| e.to_string())?;
    let sink = b.sink(0).ok_or("no sink")?;
    for (i, c) in data.chunks(chunk).enumerate() {
        let at = (i * chunk) as u64;
        let r = if c.iter().all(|&b| b == 0) {
            sink.write_zeroes(at, c.len() as u64).await
        } else {
            sink.write_at(at, Bytes::copy_from_slice(c)).await
        };
        r.map_err(|e| e.to_string())?;
    }
    sink.commit().await.map_err(|e| e.to_string())?;
    b.finish(SourceInfo { name: "vm".into(), instance_uuid: None }, Consistency::Crash).map_err(|e| e.to_string())
}
