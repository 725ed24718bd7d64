//! An NBD export as a source, over one connection or several when the server offers
//! multi-conn; allocation from `base:allocation` block status. [`NbdPool`] is shared with the
//! NBD sink in the target-writer crate.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use cbt::{Extent, ExtentSet};
use nbd_wire::{Client, Export, Uri};

use pipeline::{BlockError, BlockSource, IoFuture, SourceAllocation, check_range};

use crate::nbd_error;

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
        let parsed = Uri::parse(uri).map_err(BlockError::invalid)?;
        let first = Client::connect(&parsed.target, &parsed.export)
            .await
            .map_err(|e| nbd_error(format!("connecting to {uri}"), e))?;
        let want = if first.export().multi_conn() { connections.max(1) } else { 1 };
        let mut clients = vec![first];
        while clients.len() < want {
            clients.push(
                Client::connect(&parsed.target, &parsed.export)
                    .await
                    .map_err(|e| nbd_error(format!("connecting to {uri}"), e))?,
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

/// The size of one NBD read on the wire unless set: a request of the engine is split into
/// pieces of this size, all in flight at once. Servers allocate a buffer per request, and
/// megabyte ones cost nbdkit measurably more CPU than nbdcopy's 256 KiB.
pub const DEFAULT_WIRE_REQUEST: u64 = 256 << 10;

/// An NBD export to copy from.
#[derive(Debug)]
pub struct NbdSource {
    pool: NbdPool,
    identity: String,
    /// Whether the identity was given (a snapshot ID) rather than made from the URI.
    frozen: bool,
    wire_request: u64,
}

impl NbdSource {
    /// Connects to `uri`. NBD cannot prove an export is frozen, so `identity` (a snapshot ID,
    /// or at least the URI) is what a resumed copy compares. Only a given identity makes the
    /// source [`frozen`](BlockSource::frozen): the caller vouches that it names a snapshot.
    pub async fn connect(uri: &str, connections: usize, identity: Option<String>) -> Result<Self, BlockError> {
        let pool = NbdPool::connect(uri, connections).await?;
        let frozen = identity.is_some();
        let identity = identity.unwrap_or_else(|| format!("nbd:{uri}:{}", pool.export().size));
        Ok(Self { pool, identity, frozen, wire_request: DEFAULT_WIRE_REQUEST })
    }

    /// Sets the size of one read on the wire (clamped to what the server accepts).
    pub fn with_wire_request(mut self, bytes: u64) -> Self {
        self.wire_request = bytes.max(512);
        self
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

    fn frozen(&self) -> bool {
        self.frozen
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
                let extents =
                    self.pool.client().block_status(at, len).await.map_err(|e| {
                        nbd_error(format!("block status of {}", self.pool.uri), e).at(at, u64::from(len))
                    })?;
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
                    return Err(nbd_error(
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
            let piece = self.wire_request.min(self.pool.max_payload().unwrap_or(32 << 20));
            let piece = usize::try_from(piece).unwrap_or(usize::MAX);
            let read = |at: u64, b: BytesMut| async move {
                let len = b.len() as u64;
                self.pool
                    .client()
                    .read_into(at, b)
                    .await
                    .map_err(|e| nbd_error(format!("reading {}", self.pool.uri), e).at(at, len))
            };
            if buf.len() <= piece {
                return read(offset, buf).await;
            }
            // Pieces of the one buffer, all in flight at once, then joined back (no copy: they
            // are adjacent parts of one allocation).
            let mut buf = buf;
            let mut pieces = Vec::with_capacity(buf.len().div_ceil(piece));
            let mut at = offset;
            while !buf.is_empty() {
                let p = buf.split_to(buf.len().min(piece));
                let n = p.len() as u64;
                pieces.push(read(at, p));
                at += n;
            }
            let mut out: Option<BytesMut> = None;
            for r in join_in_order(pieces).await {
                let p = r?;
                match &mut out {
                    Some(o) => o.unsplit(p),
                    None => out = Some(p),
                }
            }
            Ok(out.unwrap_or_default())
        })
    }
}

/// Polls futures together and returns their outputs in order (no futures dependency).
async fn join_in_order<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}
