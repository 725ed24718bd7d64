//! An existing disk of a powered-off VM written through VMware's VDDK, as a pipeline sink: the
//! way back for a restore into vSphere (Quick Rollback writes a restore point's bytes into the
//! VM's current disks). The connection is read-write with no snapshot and reuses the proxy's
//! vSphere session, as [`crate::VddkVm`]'s does; the disk is opened writable by its
//! `[datastore] path`. Checking that the VM is powered off is the caller's.

use bytes::Bytes;
use pipeline::{BlockError, BlockSink, IoFuture};
use std::num::NonZeroU64;
use vddk::{Connection, OpenFlags, SECTOR, Vddk};
use vsphere::{Client, MoRef};

use crate::OpenError;
use crate::vddk_source::{Spare, connect_vm, open_disk, vddk_kind};

/// The most one VDDK write carries: zeros are sent as zero buffers of this size (VDDK has no
/// call to zero a range), and larger writes are split (NBD transports want requests of at most
/// about 2 MiB).
const PIECE: u64 = 1 << 20;

/// VDDK's read-write connection to one VM's current disks (no snapshot).
#[derive(Debug)]
pub struct VddkTarget {
    conn: Connection,
}

impl VddkTarget {
    /// Connects VDDK to `vm`, read-write and with no snapshot, through the server `client` is
    /// logged in to, reusing its session. The VM should be powered off. Blocking (VDDK's
    /// connect is): call it off the async workers.
    pub fn connect(vddk: &Vddk, client: &Client, vm: &MoRef) -> Result<Self, OpenError> {
        Ok(Self { conn: connect_vm(vddk, client, vm, None)? })
    }

    /// Opens one of the VM's disks (its `[datastore] path` from the VM's devices) writable, as
    /// a sink of `capacity` bytes whose plans and digests are in blocks of `granularity` bytes
    /// (whole sectors). Blocking.
    pub fn open(&self, path: &str, capacity: u64, granularity: NonZeroU64) -> Result<VddkSink, OpenError> {
        if !granularity.get().is_multiple_of(SECTOR) {
            return Err(OpenError::Refused(format!("granularity {granularity} is not whole 512-byte sectors")));
        }
        let disk = open_disk(&self.conn, path, capacity, OpenFlags::default())?;
        Ok(VddkSink { disk, name: path.to_owned(), size: capacity, granularity, spare: Spare::default() })
    }
}

/// One existing disk written through VDDK, in whole 512-byte sectors. It is never known to read
/// as zeros, so the engine zeroes what the plan says is zero; VDDK's worker for the disk makes
/// every call in the order asked, and closes the disk (after `Wait`) when the sink is dropped.
#[derive(Debug)]
pub struct VddkSink {
    disk: vddk::Disk,
    name: String,
    size: u64,
    granularity: NonZeroU64,
    /// Write buffers VDDK's worker owns while it writes, kept for the next request.
    spare: Spare,
}

impl VddkSink {
    /// The transport VDDK chose (`nbdssl`, `hotadd`, ...).
    pub fn transport(&self) -> &str {
        self.disk.transport()
    }

    /// Writes `length` bytes at `offset` in pieces of at most [`PIECE`]: `data`'s, or zeros.
    async fn put(&self, offset: u64, length: u64, data: Option<Bytes>) -> Result<(), BlockError> {
        pipeline::check_range(&self.name, offset, length, self.size)?;
        if !offset.is_multiple_of(SECTOR) || !length.is_multiple_of(SECTOR) {
            return Err(
                BlockError::invalid(format!("{}: VDDK writes whole 512-byte sectors", self.name)).at(offset, length)
            );
        }
        let failed = |e: vddk::VddkError| {
            BlockError::new(vddk_kind(&e), format!("writing {}", self.describe())).at(offset, length).with_source(e)
        };
        let mut buf = self.spare.take();
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(PIECE);
            let (a, b) = (usize::try_from(done).unwrap_or(usize::MAX), usize::try_from(done + n).unwrap_or(usize::MAX));
            buf.clear();
            match &data {
                Some(d) => buf.extend_from_slice(&d[a..b]),
                None => buf.resize(b - a, 0),
            }
            let reply = self.disk.write_request((offset + done) / SECTOR, buf).map_err(failed)?;
            buf = reply.await.ok_or(vddk::VddkError::WorkerGone).map_err(failed)?.map_err(failed)?;
            done += n;
        }
        self.spare.keep(buf);
        Ok(())
    }
}

impl BlockSink for VddkSink {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        format!("vddk:{} ({})", self.name, self.disk.transport())
    }

    fn granularity(&self) -> NonZeroU64 {
        self.granularity
    }

    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        // The bytes are copied into the worker's buffer piece by piece; `data` is dropped when
        // the future completes.
        Box::pin(async move { self.put(offset, data.len() as u64, Some(data)).await })
    }

    /// VDDK cannot zero a range: zero buffers are written.
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(self.put(offset, length, None))
    }

    /// `Wait` then `Flush`, after every write asked before it.
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let failed = |e: vddk::VddkError| {
                BlockError::new(vddk_kind(&e), format!("flushing {}", self.describe())).with_source(e)
            };
            let reply = self.disk.flush_request().map_err(failed)?;
            reply.await.ok_or(vddk::VddkError::WorkerGone).map_err(failed)?.map_err(failed)
        })
    }
}
