//! The engine's block digests as an observer a sink may use: a sink that uses them gets each
//! written block's BLAKE3 with its data, aligned to its blocks (the short last one included),
//! even when the copy keeps no digests of its own; a sink that does not is written as before.
#![expect(clippy::cast_possible_truncation, reason = "test sizes are small and the tests run on 64-bit machines")]

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cbt::ExtentSet;
use pipeline::Digests;
use pipeline::conformance::{MemSink, MemSource, pattern};
use pipeline::{BlockDigest, BlockSink, BlockSource, CopyOptions, DiskCopy, Engine, IoFuture, copy_disk};

const MIB: u64 = 1 << 20;

/// One write as the sink saw it: offset, length, and the digests handed with it.
type Write = (u64, u64, Option<Vec<BlockDigest>>);

/// A memory sink that records how it was written: `(offset, length, digests)` per write, the
/// digests `None` for a plain `write_at`.
struct Recording {
    inner: MemSink,
    uses: bool,
    writes: Mutex<Vec<Write>>,
}

impl Recording {
    fn new(size: usize, uses: bool) -> Self {
        Self { inner: MemSink::new(size, MIB), uses, writes: Mutex::new(Vec::new()) }
    }
}

impl BlockSink for Recording {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn describe(&self) -> String {
        "recording sink".into()
    }
    fn granularity(&self) -> NonZeroU64 {
        self.inner.granularity()
    }
    fn write_at(&self, offset: u64, data: Bytes) -> IoFuture<'_, ()> {
        self.writes.lock().unwrap().push((offset, data.len() as u64, None));
        self.inner.write_at(offset, data)
    }
    fn uses_digests(&self) -> bool {
        self.uses
    }
    fn write_at_digested(&self, offset: u64, data: Bytes, digests: &[BlockDigest]) -> IoFuture<'_, ()> {
        self.writes.lock().unwrap().push((offset, data.len() as u64, Some(digests.to_vec())));
        self.inner.write_at(offset, data)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        self.inner.write_zeroes(offset, length)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
}

async fn copy(data: &[u8], sink: Arc<Recording>, options: &CopyOptions) -> pipeline::CopyReport {
    let size = data.len() as u64;
    let source: Arc<dyn BlockSource> = Arc::new(MemSource::new(data.to_vec()));
    let job = DiskCopy {
        read: ExtentSet::full(size),
        zero: ExtentSet::new(),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(MIB, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source,
        sink: sink.clone(),
    };
    copy_disk(job, &Engine::new(64 * MIB), options, Arc::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_uses_digests_gets_each_blocks_blake3_with_its_data() {
    // An odd size (the last block is short), and a whole zero block in the middle.
    let mut data = pattern((13 * MIB + 12288) as usize, 5);
    data[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
    for detect_zeroes in [true, false] {
        // The copy keeps no digests of its own: the sink's use of them is enough.
        let options = CopyOptions { request_size: 3 * MIB, digests: false, detect_zeroes, ..CopyOptions::default() };
        let sink = Arc::new(Recording::new(data.len(), true));
        let report = copy(&data, sink.clone(), &options).await;
        assert_eq!(sink.inner.contents(), data);
        assert!(report.digests.is_none(), "the copy asked for none");
        let writes = sink.writes.lock().unwrap().clone();
        let mut covered = 0;
        for (offset, len, digests) in writes {
            let digests = digests.expect("every write of a sink that uses digests carries them");
            assert_eq!(offset % MIB, 0, "writes start on a block boundary");
            assert_eq!(digests.len() as u64, len.div_ceil(MIB));
            for (k, d) in digests.iter().enumerate() {
                let at = (offset + k as u64 * MIB) as usize;
                let end = (at + MIB as usize).min((offset + len) as usize);
                assert_eq!(*d, *blake3::hash(&data[at..end]).as_bytes(), "block at {at}, {} bytes", end - at);
            }
            covered += len;
        }
        // Without zero detection the zero block is data, with its digest; with it, it is zeroed.
        let zero_bytes = if detect_zeroes { MIB } else { 0 };
        assert_eq!(covered, data.len() as u64 - zero_bytes, "detect_zeroes {detect_zeroes}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_does_not_use_digests_is_written_as_before() {
    let data = pattern((6 * MIB + 4096) as usize, 6);
    for keep in [true, false] {
        let options = CopyOptions { request_size: 2 * MIB, digests: keep, ..CopyOptions::default() };
        let sink = Arc::new(Recording::new(data.len(), false));
        let report = copy(&data, sink.clone(), &options).await;
        assert_eq!(sink.inner.contents(), data);
        assert!(sink.writes.lock().unwrap().iter().all(|w| w.2.is_none()), "only write_at");
        assert_eq!(report.digests.is_some(), keep);
        if keep {
            let expected: Vec<BlockDigest> = data.chunks(MIB as usize).map(|c| *blake3::hash(c).as_bytes()).collect();
            assert_eq!(report.digests.unwrap().blocks, expected);
        }
    }
}
