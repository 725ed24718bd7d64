//! Inputs for the criterion benchmarks in `benches/benches/`, built deterministically so every
//! run measures the same work.

use cbt::ExtentSet;

/// `count` extents of pseudo-random lengths and gaps (1 to 64 KiB, in 512-byte sectors),
/// starting at `seed`-dependent offsets: what a busy disk's CBT answer looks like.
pub fn scattered_extents(count: usize, seed: u64) -> ExtentSet {
    let mut state = seed | 1;
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let gap = ((state >> 33) % 128 + 1) * 512;
        let len = ((state >> 17) % 128 + 1) * 512;
        offset += gap;
        ranges.push((offset, len));
        offset += len;
    }
    ExtentSet::from_ranges(ranges)
}
