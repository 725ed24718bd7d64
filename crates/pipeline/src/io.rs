//! The two traits every transport implements: [`BlockSource`] and [`BlockSink`].
//!
//! Reads move an owned [`BytesMut`] in and out, writes take shared [`Bytes`] slices of it, so
//! a buffer can cross into a blocking thread or an NBD connection and come back to the pool
//! without a copy.

use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use cbt::ExtentSet;

use crate::BlockError;

/// The future every trait method returns: boxed so sources and sinks can be chosen at run
/// time (`dyn BlockSource`). One allocation per request of megabytes costs nothing.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlockError>> + Send + 'a>>;

/// The BLAKE3 digest of one sink block's bytes (`blake3::hash`), as the engine computes it.
pub type BlockDigest = [u8; 32];

/// Where a source's bytes are, as far as it knows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceAllocation {
    /// Bytes that may hold data. Everything else reads as zeros.
    pub data: ExtentSet,
    /// Bytes known to read as zeros (a subset of the complement of `data`, maybe empty).
    pub zero: ExtentSet,
}

/// A disk to copy from: a frozen view that does not change while it is read.
pub trait BlockSource: Send + Sync {
    /// The disk's size in bytes.
    fn size(&self) -> u64;

    /// A short name for messages (path, URI).
    fn describe(&self) -> String;

    /// What identifies this frozen view, so a resumed copy can tell it is reading the same
    /// bytes (a snapshot ID; for a file, its device, inode, size and modification time).
    fn identity(&self) -> String;

    /// Whether [`identity`](Self::identity) proves the bytes unchanged since a checkpoint that
    /// recorded it: a snapshot, a VMDK chain with its CIDs, a restore point. A source that
    /// anyone may write under the same identity (a block device, an NBD export without a
    /// snapshot ID, a raw file) is not frozen, and a copy resumed from it re-reads the ranges
    /// the checkpoint shows as done and checks them against their digests.
    fn frozen(&self) -> bool {
        false
    }

    /// The largest request it serves well, when it has a limit (an NBD server's maximum).
    fn max_request(&self) -> Option<u64> {
        None
    }

    /// Where the data is, when the source can tell (`SEEK_DATA`, `base:allocation`, grain
    /// tables); `None` means "assume everything".
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>>;

    /// Fills `buf` (its whole length) from `offset` and hands it back. The range is inside
    /// the disk; a source refuses anything else with [`crate::ErrorKind::InvalidInput`].
    fn read_at(&self, offset: u64, buf: BytesMut) -> IoFuture<'_, BytesMut>;
}

/// A disk to copy to.
pub trait BlockSink: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;

    /// A short name for messages.
    fn describe(&self) -> String;

    /// The unit plans are widened to and digests are kept per.
    fn granularity(&self) -> NonZeroU64;

    /// Whether the sink is known to read as zeros everywhere (a file this run created), so
    /// zeros need not be written at all.
    fn known_zero(&self) -> bool {
        false
    }

    /// Writes `data` at `offset`. The data is shared (a slice of the request's buffer, so a
    /// retry can send it again); a sink drops its references before the future completes, so
    /// the buffer can go back to the pool.
    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()>;

    /// Writes several disjoint ranges of one request, as [`write_at`](Self::write_at) each. A
    /// range outside the disk refuses the whole batch before anything is written. The default
    /// writes them all at once; a sink that pays per call (a file's thread hop) does them in
    /// one.
    fn write_many(&self, writes: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let what = self.describe();
            for (offset, data) in &writes {
                check_range(&what, *offset, data.len() as u64, self.size())?;
            }
            let futures = writes.into_iter().map(|(offset, data)| self.write_at(offset, data)).collect();
            join_all(futures).await.map(drop)
        })
    }

    /// Whether the sink would hash the blocks it is written anyway and can take their digests
    /// instead ([`write_at_digested`](Self::write_at_digested)), so the engine computes them
    /// for it even when the copy keeps none (a plain repository, whose chunk IDs are plain
    /// BLAKE3 of the chunk's bytes).
    fn uses_digests(&self) -> bool {
        false
    }

    /// [`write_at`](Self::write_at), with the digest of each sink block `data` covers:
    /// `offset` is a multiple of [`granularity`](Self::granularity), and `digests[k]` is the
    /// [`BlockDigest`] of `data[k × granularity ..]` up to the next block boundary or the end of
    /// `data`. The engine calls it only on a sink that [`uses_digests`](Self::uses_digests);
    /// the default ignores them.
    fn write_at_digested(&self, offset: u64, data: Bytes, digests: &[BlockDigest]) -> IoFuture<'_, ()> {
        let _ = digests;
        self.write_at(offset, data)
    }

    /// Whether the sink stores whole blocks only (a repository's chunks): the engine then
    /// hands it whole blocks, completed where needed with bytes [read back](Self::read_back).
    /// Any other sink is written exactly the data the plan fetched (zeros in it as zeros),
    /// and nothing where the plan keeps what the sink holds.
    fn whole_blocks(&self) -> bool {
        self.uses_digests()
    }

    /// Whether [`read_back`](Self::read_back) works.
    fn can_read_back(&self) -> bool {
        false
    }

    /// Fills `buf` with the sink's bytes at `offset` as they are now (a repository's parent
    /// point, a replica's last sync): a local read that completes the blocks an incremental
    /// touches, so only the changed bytes cross the network. A sink that cannot refuses
    /// with [`crate::ErrorKind::InvalidInput`], and the engine reads the source instead.
    fn read_back(&self, offset: u64, buf: BytesMut) -> IoFuture<'_, BytesMut> {
        let _ = buf;
        Box::pin(
            async move { Err(BlockError::invalid(format!("{} cannot be read back (at {offset})", self.describe()))) },
        )
    }

    /// Makes `[offset, offset + length)` read as zeros, without sending zeros when the
    /// transport allows (a punched hole, `NBD_CMD_WRITE_ZEROES`; never a TRIM, whose
    /// contents are undefined afterwards).
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// The end of a copy: everything written is durable (data, size, and the directory entry
    /// of a new file) before this returns. Only after it may a sync state be committed.
    fn commit(&self) -> IoFuture<'_, ()> {
        self.flush()
    }
}

/// Checks that `[offset, offset + length)` lies within `size`.
pub fn check_range(what: &str, offset: u64, length: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::invalid(format!("{what}: [{offset}, +{length}) is outside the disk of {size} bytes"))),
    }
}

/// Polls every future at once on this task; the first error wins.
pub(crate) async fn join_all<T>(mut futures: Vec<IoFuture<'_, T>>) -> Result<Vec<T>, BlockError> {
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if o.is_some() {
                continue;
            }
            match f.as_mut().poll(cx) {
                std::task::Poll::Ready(Ok(v)) => *o = Some(v),
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => pending = true,
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(Ok(())) }
    })
    .await?;
    Ok(out.into_iter().flatten().collect())
}
