//! Test helpers: random sparse raw images with a known layout (feature `test-utils`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cbt::ExtentSet;

/// A small, fast pseudo-random generator (xorshift64) for test data; same seed, same numbers.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Writes a sparse raw image of `capacity` bytes at `path` with `runs` pseudo-random data runs
/// (from `seed`), some of them all zeros, and returns where data was written.
pub fn random_sparse_image(path: &Path, capacity: u64, runs: usize, seed: u64) -> std::io::Result<ExtentSet> {
    let f = File::create(path)?;
    f.set_len(capacity)?;
    let mut next = xorshift(seed);
    let mut written = Vec::new();
    for i in 0..runs {
        // Runs from 1 byte to 1 MiB, anywhere (unaligned on purpose).
        let len = (next() % (1 << 20)).max(1).min(capacity);
        let start = next() % (capacity - len + 1);
        let fill_zero = i % 7 == 3;
        let data: Vec<u8> = (0..len).map(|_| if fill_zero { 0 } else { next().to_le_bytes()[3] }).collect();
        f.write_all_at(&data, start)?;
        written.push((start, len));
    }
    // The last byte too, so the image's end is exercised.
    f.write_all_at(&[0xA5], capacity - 1)?;
    written.push((capacity - 1, 1));
    Ok(ExtentSet::from_ranges(written))
}

/// A small monolithicSparse image built by hand: 128 KiB (two 64 KiB grains), the first grain
/// holding `0x00, 0x01, ...`, the second unallocated; primary and redundant directories and
/// tables; an embedded descriptor. Small enough to seed fuzzers.
pub fn tiny_sparse_image() -> Vec<u8> {
    use crate::kdmv::{FLAG_NL_DETECT, FLAG_RGD, SparseHeader};
    let header = SparseHeader {
        version: 1,
        flags: FLAG_NL_DETECT | FLAG_RGD,
        capacity: 256,
        grain_size: 128,
        descriptor_offset: 1,
        descriptor_size: 2,
        gtes_per_gt: 512,
        rgd_offset: 3,
        gd_offset: 8,
        overhead: 128,
        unclean_shutdown: false,
        compress_algorithm: 0,
    };
    let mut img = vec![0u8; 128 * 512 + 64 * 1024];
    img[..512].copy_from_slice(&header.to_bytes());
    let desc = "# Disk DescriptorFile\nversion=1\nCID=0badf00d\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 256 SPARSE \"tiny.vmdk\"\n";
    img[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
    // Redundant directory at sector 3 -> table at sector 4; primary at 8 -> table at 9.
    for (gd, gt) in [(3u32, 4u32), (8, 9)] {
        img[gd as usize * 512..][..4].copy_from_slice(&gt.to_le_bytes());
        img[gt as usize * 512..][..4].copy_from_slice(&128u32.to_le_bytes());
    }
    for (i, b) in img[128 * 512..].iter_mut().enumerate() {
        *b = i.to_le_bytes()[0];
    }
    img
}

/// The 512-byte sectors inside `within` that hold a non-zero byte.
pub fn nonzero_sectors(path: &Path, within: &ExtentSet) -> std::io::Result<ExtentSet> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut sector = [0u8; 512];
    let mut found = Vec::new();
    let g = std::num::NonZeroU64::new(512).unwrap_or(std::num::NonZeroU64::MIN);
    for e in within.align_outward(g, len).iter() {
        let mut at = e.start();
        while at < e.end() {
            let n = (e.end() - at).min(512) as usize;
            f.read_exact_at(&mut sector[..n], at)?;
            if sector[..n].iter().any(|&b| b != 0) {
                found.push((at, n as u64));
            }
            at += n as u64;
        }
    }
    Ok(ExtentSet::from_ranges(found))
}
