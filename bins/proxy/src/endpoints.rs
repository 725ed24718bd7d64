//! Opening the two ends of a copy from what a user typed: a source (raw image or block device,
//! VMDK with its chain, NBD URI) and a sink (file, block device, NBD URI, `null:`). Shared by
//! `disk-copy` and `repo backup`/`repo restore`.

use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use blockio::{FileSink, FileSinkOptions, FileSource, NbdSink, NbdSource, NullSink, VmdkSource};
use nbd_wire::Uri;
use pipeline::BlockSink;
use pipeline::BlockSource;

/// How to open a source.
#[derive(Debug, Clone)]
pub(crate) struct SourceOptions {
    /// NBD connections, used only when the server offers multi-conn.
    pub(crate) connections: usize,
    /// Size of one read on the wire from an NBD source.
    pub(crate) nbd_request_size: u64,
    /// Open VMDK parents anywhere, not only beside the child.
    pub(crate) any_path: bool,
}

/// How to open a sink.
#[derive(Debug, Clone)]
pub(crate) struct SinkOptions {
    /// NBD connections, used only when the server offers multi-conn.
    pub(crate) connections: usize,
    /// The NBD destination reads as zeros already.
    pub(crate) target_is_zero: bool,
    /// Write a file with O_DIRECT.
    pub(crate) direct: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        Self { connections: 2, target_is_zero: false, direct: false }
    }
}

/// Whether `path` is a VMDK (by extension or by its first bytes).
fn is_vmdk(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("vmdk")) {
        return true;
    }
    let mut head = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .is_ok_and(|n| head[..n].starts_with(b"KDMV") || head[..n].starts_with(b"# Disk DescriptorFile"))
}

/// Opens a source: an NBD URI, a VMDK, or a raw file or block device.
pub(crate) async fn open_source(src: &str, o: &SourceOptions) -> Result<Arc<dyn BlockSource>> {
    if Uri::is_uri(src) {
        let s = NbdSource::connect(src, o.connections, None).await?;
        return Ok(Arc::new(s.with_wire_request(o.nbd_request_size)));
    }
    let path = Path::new(src);
    if is_vmdk(path) {
        let policy = if o.any_path { vmdk::PathPolicy::Anywhere } else { vmdk::PathPolicy::SameDirectory };
        return Ok(Arc::new(VmdkSource::open(path, policy)?));
    }
    Ok(Arc::new(FileSource::open(path)?))
}

/// Opens a sink of at least `size` bytes: `null:`, an NBD URI, or a file (created sparse if
/// missing) or block device.
pub(crate) async fn open_sink(
    dst: &str,
    size: u64,
    granularity: NonZeroU64,
    o: &SinkOptions,
) -> Result<Arc<dyn BlockSink>> {
    let sink: Arc<dyn BlockSink> = if dst == "null:" {
        Arc::new(NullSink::new(size, granularity))
    } else if Uri::is_uri(dst) {
        Arc::new(NbdSink::connect(dst, o.connections, granularity, o.target_is_zero).await?)
    } else {
        Arc::new(FileSink::open(dst, size, FileSinkOptions { granularity, direct: o.direct })?)
    };
    if sink.size() < size {
        anyhow::bail!("{} holds {} bytes; the source needs {size}", sink.describe(), sink.size());
    }
    Ok(sink)
}

/// A stable name for a path or URI (the canonical path of a file).
pub(crate) fn canonical(s: &str) -> String {
    if Uri::is_uri(s) {
        s.to_owned()
    } else {
        std::fs::canonicalize(s).map_or_else(|_| s.to_owned(), |p| p.display().to_string())
    }
}
