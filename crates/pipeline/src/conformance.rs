//! The conformance suite every source and sink passes, and in-memory implementations with
//! failure injection for engine tests. Behind the `test-utils` feature.

use std::num::NonZeroU64;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Bytes, BytesMut};
use cbt::ExtentSet;

use crate::{BlockError, BlockSink, BlockSource, ErrorKind, IoFuture, SourceAllocation, check_range};

fn eio(what: &str) -> BlockError {
    BlockError::io(what, std::io::Error::from_raw_os_error(5))
}

/// A source in memory, with injectable failures.
#[derive(Debug)]
pub struct MemSource {
    /// The disk.
    pub data: Vec<u8>,
    /// What `allocation` answers.
    pub allocation: Option<SourceAllocation>,
    /// The next this many reads fail with EIO (retryable).
    pub fail_reads: AtomicU32,
    /// The identity it reports.
    pub identity: String,
    /// Whether it claims its identity proves it frozen (true: a snapshot in memory).
    pub frozen: bool,
    /// Every read served: offset and length.
    pub reads: Mutex<Vec<(u64, u64)>>,
}

impl MemSource {
    /// A source of `data` whose allocation is its non-zero 64 KiB blocks.
    pub fn new(data: Vec<u8>) -> Self {
        let mut set = ExtentSet::new();
        for (i, c) in data.chunks(64 << 10).enumerate() {
            if c.iter().any(|&b| b != 0)
                && let Some(e) = cbt::Extent::new(i as u64 * (64 << 10), c.len() as u64)
            {
                set.insert(e);
            }
        }
        Self {
            data,
            allocation: Some(SourceAllocation { data: set, zero: ExtentSet::new() }),
            fail_reads: AtomicU32::new(0),
            identity: "mem:1".into(),
            frozen: true,
            reads: Mutex::new(Vec::new()),
        }
    }
}

impl BlockSource for MemSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn describe(&self) -> String {
        "memory source".into()
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
    fn frozen(&self) -> bool {
        self.frozen
    }
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async move { Ok(self.allocation.clone()) })
    }
    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            check_range("memory source", offset, buf.len() as u64, self.size())?;
            if self.fail_reads.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(eio("reading memory source"));
            }
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            let n = buf.len();
            buf.copy_from_slice(&self.data[at..at + n]);
            self.reads.lock().unwrap_or_else(|p| p.into_inner()).push((offset, n as u64));
            Ok(buf)
        })
    }
}

/// A sink in memory, with injectable failures.
#[derive(Debug)]
pub struct MemSink {
    /// The disk.
    pub data: Mutex<Vec<u8>>,
    /// The granularity.
    pub granularity: NonZeroU64,
    /// Whether it claims to read as zeros: true until the first write or zeroing, like a file
    /// created by the run.
    pub known_zero: std::sync::atomic::AtomicBool,
    /// The next this many writes fail with EIO (retryable)...
    pub fail_writes: AtomicU32,
    /// ...after this many more have succeeded.
    pub pass_writes: AtomicU32,
    /// Flushes so far.
    pub flushes: AtomicU32,
    /// Whether it takes whole blocks only, as a repository does.
    pub whole_blocks: std::sync::atomic::AtomicBool,
    /// Whether it can be read back (true by default).
    pub readable: std::sync::atomic::AtomicBool,
    /// Every data write: offset and length.
    pub writes: Mutex<Vec<(u64, u64)>>,
    /// Every zeroing: offset and length.
    pub zeroings: Mutex<Vec<(u64, u64)>>,
}

impl MemSink {
    /// A zeroed sink of `size` bytes.
    pub fn new(size: usize, granularity: u64) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            granularity: NonZeroU64::new(granularity).unwrap_or(NonZeroU64::MIN),
            known_zero: std::sync::atomic::AtomicBool::new(true),
            fail_writes: AtomicU32::new(0),
            pass_writes: AtomicU32::new(0),
            flushes: AtomicU32::new(0),
            whole_blocks: std::sync::atomic::AtomicBool::new(false),
            readable: std::sync::atomic::AtomicBool::new(true),
            writes: Mutex::new(Vec::new()),
            zeroings: Mutex::new(Vec::new()),
        }
    }

    /// A copy of its contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl BlockSink for MemSink {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
    fn describe(&self) -> String {
        "memory sink".into()
    }
    fn granularity(&self) -> NonZeroU64 {
        self.granularity
    }
    fn known_zero(&self) -> bool {
        self.known_zero.load(Ordering::SeqCst)
    }
    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range("memory sink", offset, data.len() as u64, self.size())?;
            self.known_zero.store(false, Ordering::SeqCst);
            let passing =
                self.pass_writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            if !passing
                && self.fail_writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
            {
                return Err(eio("writing memory sink"));
            }
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            self.data.lock().unwrap_or_else(|p| p.into_inner())[at..at + data.len()].copy_from_slice(&data);
            self.writes.lock().unwrap_or_else(|p| p.into_inner()).push((offset, data.len() as u64));
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range("memory sink", offset, length, self.size())?;
            self.known_zero.store(false, Ordering::SeqCst);
            let (a, n) = (usize::try_from(offset).unwrap_or(0), usize::try_from(length).unwrap_or(0));
            self.data.lock().unwrap_or_else(|p| p.into_inner())[a..a + n].fill(0);
            self.zeroings.lock().unwrap_or_else(|p| p.into_inner()).push((offset, length));
            Ok(())
        })
    }
    fn whole_blocks(&self) -> bool {
        self.whole_blocks.load(Ordering::SeqCst)
    }
    fn can_read_back(&self) -> bool {
        self.readable.load(Ordering::SeqCst)
    }
    fn read_back(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            check_range("memory sink", offset, buf.len() as u64, self.size())?;
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            let n = buf.len();
            buf.copy_from_slice(&self.data.lock().unwrap_or_else(|p| p.into_inner())[at..at + n]);
            Ok(buf)
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

/// Deterministic test bytes: `len` bytes of a xorshift stream seeded by `seed`, with every
/// fourth 64 KiB block zero (so sources have holes and sinks see zeros).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; len];
    for (i, block) in out.chunks_mut(64 << 10).enumerate() {
        if i % 4 == 3 {
            continue;
        }
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x.to_le_bytes()[3];
        }
    }
    out
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Checks a source against the bytes it should hold: size, allocation (every non-zero byte
/// inside `data`, nothing non-zero inside `zero`), aligned and odd reads, a read that ends at
/// the last byte, refusal of reads past the end, and an identity and a frozen claim that no
/// read changes.
pub async fn check_source(src: &dyn BlockSource, expected: &[u8]) -> Result<(), String> {
    check_source_in_units(src, expected, 1).await
}

/// [`check_source`] for a source that reads only whole units of `unit` bytes (VDDK reads whole
/// 512-byte sectors): its odd reads are whole units, and it must refuse a read of part of a
/// unit with [`ErrorKind::InvalidInput`]. `expected` is a whole number of units, of 4096 bytes at
/// most.
pub async fn check_source_in_units(src: &dyn BlockSource, expected: &[u8], unit: u64) -> Result<(), String> {
    let size = expected.len() as u64;
    let u = unit.max(1);
    ensure!(u <= 4096 && size.is_multiple_of(u) && size >= 2 * u, "the expected bytes are not whole units of {u}");
    ensure!(src.size() == size, "size {} != {size}", src.size());
    ensure!(!src.describe().is_empty(), "no description");
    let (identity, frozen) = (src.identity(), src.frozen());
    ensure!(src.identity() == identity && !identity.is_empty(), "identity unstable or empty");
    if let Some(a) = src.allocation().await.map_err(|e| format!("allocation: {e}"))? {
        ensure!(a.data.intersection(&a.zero).is_empty(), "data and zero overlap");
        let outside = a.data.complement(size);
        for e in outside.iter() {
            let bytes = &expected[usize::try_from(e.start()).unwrap_or(0)..usize::try_from(e.end()).unwrap_or(0)];
            ensure!(
                bytes.iter().all(|&b| b == 0),
                "non-zero bytes in [{}, {}) outside the allocation",
                e.start(),
                e.end()
            );
        }
    }
    // The whole disk in 1 MiB requests.
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(1 << 20);
        let got = src
            .read_at(at, BytesMut::zeroed(usize::try_from(n).unwrap_or(0)))
            .await
            .map_err(|e| format!("read at {at}: {e}"))?;
        let a = usize::try_from(at).unwrap_or(0);
        ensure!(got[..] == expected[a..a + got.len()] && got.len() as u64 == n, "read at {at} differs");
        at += n;
    }
    // Odd reads, and the very end (for units of 1: 4095+1, the last byte, the last 70000).
    let tail = 70000 / u * u;
    for (offset, len) in
        [(512.max(u), 4096.max(u)), (4096 - u, u), (size - u, u), (size.saturating_sub(tail), tail), (0, 0)]
    {
        let got = src
            .read_at(offset, BytesMut::zeroed(usize::try_from(len).unwrap_or(0)))
            .await
            .map_err(|e| format!("read {len} at {offset}: {e}"))?;
        let o = usize::try_from(offset).unwrap_or(0);
        ensure!(got[..] == expected[o..o + got.len()], "read {len} at {offset} differs");
    }
    for (offset, len) in [(size, u), (size - u, 2 * u), (u64::MAX - 1, 4)] {
        match src.read_at(offset, BytesMut::zeroed(usize::try_from(len).unwrap_or(0))).await {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {}
            other => return Err(format!("read {len} at {offset} past the end: {other:?}")),
        }
    }
    if u > 1 {
        for (offset, len) in [(1, u), (0, u + 1), (u - 1, u)] {
            match src.read_at(offset, BytesMut::zeroed(usize::try_from(len).unwrap_or(0))).await {
                Err(e) if e.kind() == ErrorKind::InvalidInput => {}
                other => return Err(format!("read {len} at {offset}, part of a unit of {u}: {other:?}")),
            }
        }
    }
    ensure!(src.identity() == identity, "identity changed by reading: {identity} then {}", src.identity());
    ensure!(src.frozen() == frozen, "the frozen claim changed by reading");
    Ok(())
}

/// Checks a sink of `size` bytes (a multiple of 4096 plus any tail) with `read_back` reading
/// what it holds: writes of many sizes in flight at once, zeroing over data, the last byte,
/// refusal past the end with nothing changed, flush and commit.
pub async fn check_sink(
    sink: std::sync::Arc<dyn BlockSink>,
    read_back: impl AsyncFn() -> Vec<u8>,
) -> Result<(), String> {
    let size = sink.size();
    let g = sink.granularity().get();
    ensure!(g.is_power_of_two() || g.is_multiple_of(4096), "granularity {g}");
    ensure!(!sink.describe().is_empty(), "no description");
    let n = usize::try_from(size).map_err(|_| "size")?;
    if sink.known_zero() {
        ensure!(read_back().await.iter().all(|&b| b == 0), "claims to read as zeros but does not");
    }
    let data = pattern(n, 99);
    let mut model = vec![0u8; n];
    // Every byte written, in requests of 4 KiB to 1 MiB, several at a time.
    let mut requests = Vec::new();
    let (mut at, mut k) = (0usize, 0usize);
    while at < n {
        let len = [4096usize, 65536, 1 << 20, 12288][k % 4].min(n - at);
        requests.push((at, len));
        at += len;
        k += 1;
    }
    let bytes = Bytes::from(data.clone());
    for batch in requests.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for &(a, l) in batch {
            let (sink, data) = (sink.clone(), bytes.slice(a..a + l));
            set.spawn(async move { sink.write_at(a as u64, data).await });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| format!("write task: {e}"))?.map_err(|e| format!("write: {e}"))?;
        }
    }
    model.copy_from_slice(&data);
    sink.flush().await.map_err(|e| format!("flush: {e}"))?;
    ensure!(read_back().await == model, "contents differ after writing everything");

    // Several ranges in one batch; a batch with one range past the end changes nothing.
    let other = pattern(n, 7);
    let batch: Vec<(usize, usize)> =
        [(0usize, 4096usize), (n / 2, 12288), (n - 4096, 4096)].into_iter().filter(|&(a, l)| a + l <= n).collect();
    let writes = |extra: Option<(u64, usize)>| {
        let mut w: Vec<(u64, Bytes)> =
            batch.iter().map(|&(a, l)| (a as u64, Bytes::copy_from_slice(&other[a..a + l]))).collect();
        w.extend(extra.map(|(at, l)| (at, Bytes::from(vec![3u8; l]))));
        w
    };
    match sink.write_many(writes(Some((size - 4096, 8192)))).await {
        Err(e) if e.kind() == ErrorKind::InvalidInput => {}
        other => return Err(format!("a batch reaching past the end: {other:?}")),
    }
    sink.flush().await.map_err(|e| format!("flush: {e}"))?;
    ensure!(read_back().await == model, "a refused batch changed the contents");
    sink.write_many(writes(None)).await.map_err(|e| format!("write_many: {e}"))?;
    for &(a, l) in &batch {
        model[a..a + l].copy_from_slice(&other[a..a + l]);
    }
    sink.flush().await.map_err(|e| format!("flush: {e}"))?;
    ensure!(read_back().await == model, "contents differ after a batch of writes");

    // Zero over data: aligned blocks, and the tail up to the last byte.
    let g_us = usize::try_from(g).unwrap_or(4096);
    let zeroes = [(g_us.min(n / 4), g_us.min(n / 4)), (n - 8192.min(n), 8192.min(n))];
    for (a, l) in zeroes {
        sink.write_zeroes(a as u64, l as u64).await.map_err(|e| format!("zero {l} at {a}: {e}"))?;
        model[a..a + l].fill(0);
    }
    // A small write inside a zeroed range, and the very last 4 KiB.
    sink.write_at(size - 4096, Bytes::from(vec![7u8; 4096])).await.map_err(|e| format!("last write: {e}"))?;
    model[n - 4096..].fill(7);
    for (offset, len) in [(size, 4096u64), (size - 4096, 8192)] {
        match sink.write_at(offset, Bytes::from(vec![1u8; usize::try_from(len).unwrap_or(0)])).await {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {}
            other => return Err(format!("write {len} at {offset} past the end: {other:?}")),
        }
        match sink.write_zeroes(offset, len).await {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {}
            other => return Err(format!("zeroing {len} at {offset} past the end: {other:?}")),
        }
    }
    if sink.can_read_back() {
        // The engine's own read back: unaligned ranges, a whole block, the tail, and past the
        // end refused.
        for (a, l) in
            [(4096usize, 12288usize), (0, g_us.min(n)), (n - 8192.min(n), 8192.min(n)), (n / 3, 513.min(n - n / 3))]
        {
            let got = sink
                .read_back(a as u64, BytesMut::zeroed(l))
                .await
                .map_err(|e| format!("reading back {l} at {a}: {e}"))?;
            ensure!(got[..] == model[a..a + l], "read back {l} bytes at {a} differ from what was written");
        }
        match sink.read_back(size - 4096, BytesMut::zeroed(8192)).await {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {}
            other => return Err(format!("read back past the end: {:?}", other.map(|b| b.len()))),
        }
    }
    sink.commit().await.map_err(|e| format!("commit: {e}"))?;
    ensure!(read_back().await == model, "contents differ after zeroing and commit");
    Ok(())
}
