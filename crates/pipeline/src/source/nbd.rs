//! An NBD export as a source, over one connection or several when the server offers
//! multi-conn; allocation from `base:allocation` block status. [`NbdPool`] is shared with the
//! NBD sink in the target-writer crate.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use cbt::{Extent, ExtentSet};
use nbd_wire::{Client, Export, Uri};

use crate::{BlockError, BlockSource, IoFuture, SourceAllocation, check_range};

/// Connections to one export, used round-robin.
#[derive(Debug)]
pub struct NbdPool {
    clients: Vec<Client>,
    next: AtomicUsize,
    uri: String,
}

impl NbdPool {
    /// Connects to `uri` with up to `connections` connections: more than one only when the
    /// server says all of them see the same data (multi-conn).
    pub async fn connect(uri: &str, connections: usize) -> Result<Self, BlockError> {
        let parsed = Uri::parse(uri).map_err(BlockError::Invalid)?;
        let first = Client::connect(&parsed.target, &parsed.export)
            .await
            .map_err(|e| BlockError::nbd(format!("connecting to {uri}"), e))?;
        let want = if first.export().multi_conn() { connections.max(1) } else { 1 };
        let mut clients = vec![first];
        while clients.len() < want {
            clients.push(
                Client::connect(&parsed.target, &parsed.export)
                    .await
                    .map_err(|e| BlockError::nbd(format!("connecting to {uri}"), e))?,
            );
        }
        Ok(Self { clients, next: AtomicUsize::new(0), uri: uri.to_owned() })
    }

    /// The next connection to use.
    pub fn client(&self) -> &Client {
        &self.clients[self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len()]
    }

    /// Every connection (a flush must go to each, unless multi-conn makes one enough).
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// What negotiation established.
    pub fn export(&self) -> &Export {
        self.clients[0].export()
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The largest payload the server accepts, if it said.
    pub fn max_payload(&self) -> Option<u64> {
        self.export().block_size.map(|(_, _, max)| u64::from(max))
    }
}

/// An NBD export to copy from.
#[derive(Debug)]
pub struct NbdSource {
    pool: NbdPool,
    identity: String,
}

impl NbdSource {
    /// Connects to `uri`. NBD cannot prove an export is frozen, so `identity` (a snapshot ID,
    /// or at least the URI) is what a resumed copy compares.
    pub async fn connect(uri: &str, connections: usize, identity: Option<String>) -> Result<Self, BlockError> {
        let pool = NbdPool::connect(uri, connections).await?;
        let identity = identity.unwrap_or_else(|| format!("nbd:{uri}:{}", pool.export().size));
        Ok(Self { pool, identity })
    }

    /// The connections.
    pub fn pool(&self) -> &NbdPool {
        &self.pool
    }
}

impl BlockSource for NbdSource {
    fn size(&self) -> u64 {
        self.pool.export().size
    }

    fn describe(&self) -> String {
        self.pool.uri.clone()
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn max_request(&self) -> Option<u64> {
        self.pool.max_payload()
    }

    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async move {
            if self.pool.export().allocation_context.is_none() {
                return Ok(None);
            }
            let size = self.size();
            let (mut data, mut zero) = (ExtentSet::new(), ExtentSet::new());
            let mut at = 0;
            while at < size {
                let len = u32::try_from((size - at).min(1 << 31)).unwrap_or(1 << 31);
                let extents = self
                    .pool
                    .client()
                    .block_status(at, len)
                    .await
                    .map_err(|e| BlockError::nbd(format!("block status of {} at byte {at}", self.pool.uri), e))?;
                let mut next = at;
                for e in extents {
                    let end = e.offset.saturating_add(e.length).min(size);
                    if let Some(x) = Extent::from_bounds(next.max(e.offset), end) {
                        // Flag bit 1 (NBD_STATE_ZERO): reads as zeros, nothing to read.
                        if e.flags & 2 != 0 { zero.insert(x) } else { data.insert(x) }
                    }
                    next = next.max(end);
                }
                if next <= at {
                    return Err(BlockError::nbd(
                        format!("block status of {}", self.pool.uri),
                        nbd_wire::NbdError::Protocol(format!("no progress at byte {at}")),
                    ));
                }
                at = next;
            }
            Ok(Some(SourceAllocation { data, zero }))
        })
    }

    fn read_at(&self, offset: u64, buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            check_range(&self.pool.uri, offset, buf.len() as u64, self.size())?;
            let mut buf = buf;
            let max = self.pool.max_payload().unwrap_or(32 << 20);
            if buf.len() as u64 <= max {
                return self
                    .pool
                    .client()
                    .read_into(offset, buf)
                    .await
                    .map_err(|e| BlockError::nbd(format!("reading {} at byte {offset}", self.pool.uri), e));
            }
            // Larger than the server takes in one request: in pieces, into the same buffer.
            let mut out = BytesMut::new();
            let mut at = offset;
            while !buf.is_empty() {
                let piece = buf.split_to(buf.len().min(usize::try_from(max).unwrap_or(usize::MAX)));
                let n = piece.len() as u64;
                let piece = self
                    .pool
                    .client()
                    .read_into(at, piece)
                    .await
                    .map_err(|e| BlockError::nbd(format!("reading {} at byte {at}", self.pool.uri), e))?;
                out.unsplit(piece);
                at += n;
            }
            Ok(out)
        })
    }
}
