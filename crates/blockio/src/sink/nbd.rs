//! A replica in an NBD export (a disk served by qemu-nbd or nbdkit): writes split to the
//! server's maximum, zeros sent as `NBD_CMD_WRITE_ZEROES`, durability by `NBD_CMD_FLUSH`.

use std::num::NonZeroU64;

use bytes::Bytes;
use pipeline::{BlockError, BlockSink, IoFuture, check_range};

use crate::nbd_error;
use crate::source::NbdPool;

/// An NBD export to write into.
#[derive(Debug)]
pub struct NbdSink {
    pool: NbdPool,
    granularity: NonZeroU64,
    known_zero: bool,
}

impl NbdSink {
    /// Connects to `uri` with up to `connections` connections (several only with multi-conn).
    /// `known_zero` says the export is fresh and reads as zeros, so zeros need not be written
    /// (nbdcopy's `--target-is-zero`).
    pub async fn connect(
        uri: &str,
        connections: usize,
        granularity: NonZeroU64,
        known_zero: bool,
    ) -> Result<Self, BlockError> {
        let pool = NbdPool::connect(uri, connections).await?;
        if pool.export().read_only() {
            return Err(BlockError::invalid(format!("{uri} is read-only")));
        }
        if pool.export().flags & nbd_wire::proto::tflag::SEND_FLUSH == 0 {
            return Err(BlockError::invalid(format!(
                "{uri} cannot flush, so nothing written to it could be called durable"
            )));
        }
        let min = pool.export().block_size.map_or(1, |(min, _, _)| u64::from(min));
        if !granularity.get().is_multiple_of(min) {
            return Err(BlockError::invalid(format!(
                "granularity {granularity} is not a multiple of {uri}'s block size {min}"
            )));
        }
        Ok(Self { pool, granularity, known_zero })
    }

    fn max(&self) -> usize {
        usize::try_from(self.pool.max_payload().unwrap_or(32 << 20)).unwrap_or(32 << 20)
    }
}

impl BlockSink for NbdSink {
    fn size(&self) -> u64 {
        self.pool.export().size
    }

    fn describe(&self) -> String {
        self.pool.uri().to_owned()
    }

    fn granularity(&self) -> NonZeroU64 {
        self.granularity
    }

    fn known_zero(&self) -> bool {
        self.known_zero
    }

    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.pool.uri(), offset, data.len() as u64, self.size())?;
            let mut at = offset;
            for piece in data.chunks(self.max()) {
                self.pool
                    .client()
                    .write(at, piece, false)
                    .await
                    .map_err(|e| nbd_error(format!("writing {}", self.pool.uri()), e).at(at, piece.len() as u64))?;
                at += piece.len() as u64;
            }
            Ok(())
        })
    }

    fn can_read_back(&self) -> bool {
        true
    }

    /// The export's bytes, read in pieces of the server's maximum.
    fn read_back(&self, offset: u64, buf: bytes::BytesMut) -> IoFuture<'_, bytes::BytesMut> {
        Box::pin(async move {
            check_range(self.pool.uri(), offset, buf.len() as u64, self.size())?;
            let mut buf = buf;
            let mut done = bytes::BytesMut::new();
            let mut at = offset;
            while !buf.is_empty() {
                let piece = buf.split_to(buf.len().min(self.max()));
                let n = piece.len() as u64;
                let piece = self
                    .pool
                    .client()
                    .read_into(at, piece)
                    .await
                    .map_err(|e| nbd_error(format!("reading back {}", self.pool.uri()), e).at(at, n))?;
                done.unsplit(piece);
                at += n;
            }
            Ok(done)
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(self.pool.uri(), offset, length, self.size())?;
            let supported = self.pool.export().flags & nbd_wire::proto::tflag::SEND_WRITE_ZEROES != 0;
            let step = if supported { 1 << 30 } else { self.max() as u64 };
            let zeros = if supported { Bytes::new() } else { Bytes::from(vec![0u8; self.max()]) };
            let mut at = offset;
            while at < offset + length {
                let n = (offset + length - at).min(step);
                let c = self.pool.client();
                let r = if supported {
                    c.write_zeroes(at, u32::try_from(n).unwrap_or(1 << 30)).await
                } else {
                    c.write(at, &zeros[..usize::try_from(n).unwrap_or(0)], false).await
                };
                r.map_err(|e| nbd_error(format!("zeroing {}", self.pool.uri()), e).at(at, n))?;
                at += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // With multi-conn one flush covers every connection; without it there is one.
            self.pool.clients()[0].flush().await.map_err(|e| nbd_error(format!("flushing {}", self.pool.uri()), e))
        })
    }
}
