//! Inputs for the criterion benchmarks in `benches/benches/`, built deterministically so every
//! run measures the same work.

use cbt::{DiskChangeExtent, DiskChangeInfo, ExtentSet};

/// `count` extents spread over about `span` bytes, with pseudo-random 512-byte-aligned lengths
/// and gaps (each up to half the average stride): what a busy disk's CBT answer looks like.
pub fn scattered_extents(count: u64, span: u64, seed: u64) -> ExtentSet {
    let stride = (span / count.max(1)).max(1024);
    let half_sectors = (stride / 2 / 512).max(1);
    let mut state = seed | 1;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state >> 17
    };
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let gap = (next() % half_sectors + 1) * 512;
        let len = (next() % half_sectors + 1) * 512;
        offset += gap;
        ranges.push((offset, len));
        offset += len;
    }
    ExtentSet::from_ranges(ranges)
}

/// `areas` as the pages of a `QueryChangedDiskAreas` answer with windows of `window` bytes.
pub fn as_pages(areas: &ExtentSet, capacity: u64, window: u64) -> Vec<DiskChangeInfo> {
    let long = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut pages = Vec::new();
    let mut iter = areas.iter().peekable();
    let mut start = 0;
    while start < capacity {
        let end = (start + window).min(capacity);
        let mut changed_area = Vec::new();
        while let Some(e) = iter.next_if(|e| e.start() < end) {
            changed_area.push(DiskChangeExtent { start: long(e.start()), length: long(e.len()) });
        }
        pages.push(DiskChangeInfo { start_offset: long(start), length: long(end - start), changed_area });
        start = end;
    }
    pages
}
