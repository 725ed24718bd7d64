//! Per-block digests of a disk: what a copy's sink holds, block by block, so an incremental
//! copy or a resume can tell which blocks it must not trust.

/// A BLAKE3 digest per block of a disk, block `i` covering `[i × granularity, …)` (the last one
/// may be short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// The block size.
    pub granularity: u64,
    /// The disk size.
    pub capacity: u64,
    /// One digest per block.
    pub blocks: Vec<[u8; 32]>,
}

const DIGESTS_MAGIC: &[u8; 8] = b"SPDIGST1";

impl Digests {
    /// Digests of a disk that reads as zeros everywhere.
    pub fn zeros(granularity: u64, capacity: u64) -> Self {
        let count = capacity.div_ceil(granularity);
        let full = zero_digest(granularity);
        let mut blocks = vec![full; usize::try_from(count).unwrap_or(0)];
        let tail = capacity % granularity;
        if tail != 0
            && let Some(last) = blocks.last_mut()
        {
            *last = zero_digest(tail);
        }
        Self { granularity, capacity, blocks }
    }

    /// The encoded form: magic, granularity, capacity, then the digests.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.blocks.len() * 32);
        out.extend_from_slice(DIGESTS_MAGIC);
        out.extend_from_slice(&self.granularity.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        for b in &self.blocks {
            out.extend_from_slice(b);
        }
        out
    }

    /// Decodes [`Digests::encode`]'s output, checking that the length is exactly what the
    /// header implies before allocating anything.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let header = bytes.get(..24).ok_or("shorter than its header")?;
        if &header[..8] != DIGESTS_MAGIC {
            return Err("not a digest file (bad magic)".into());
        }
        let granularity = u64::from_le_bytes(header[8..16].try_into().map_err(|_| "header")?);
        let capacity = u64::from_le_bytes(header[16..24].try_into().map_err(|_| "header")?);
        if granularity == 0 {
            return Err("granularity 0".into());
        }
        let count = capacity.div_ceil(granularity);
        let body = &bytes[24..];
        if body.len() as u64 != count.saturating_mul(32) {
            return Err(format!("{} bytes of digests for {count} blocks", body.len()));
        }
        let blocks = body.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        Ok(Self { granularity, capacity, blocks })
    }
}

/// The digest of `len` zero bytes.
pub fn zero_digest(len: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        h.update(&zeros[..usize::try_from(n).unwrap_or(0)]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// Digests blocks of one size without hashing the parts already known to be zeros.
///
/// A block's digest is BLAKE3 of its bytes, exactly [`blake3::hash`]'s. BLAKE3 is a tree over
/// 1 KiB chunks whose shape depends only on the length, so the chaining value of an all-zero
/// subtree at a given place in a block is the same in every block: they are computed once, and a
/// block whose gaps the copy left as zeros (the holes between a fragmented disk's extents,
/// zero runs found in what was read) costs only its data.
#[derive(Debug)]
pub struct BlockDigester {
    len: u64,
    /// The chaining value of each all-zero subtree of a full block, by (offset, length).
    zero: std::collections::HashMap<(u64, u64), blake3::hazmat::ChainingValue>,
    /// The digest of a full block of zeros.
    zero_block: [u8; 32],
}

/// The smallest subtree the digester looks into for zeros: below it, zeros are simply hashed.
const DIGEST_LEAF: u64 = LEAF_BYTES as u64;
const LEAF_BYTES: usize = 4096;

/// Blocks larger than this are hashed whole (their table would be large and such blocks rare).
const DIGEST_TABLE_MAX: u64 = 16 << 20;

impl BlockDigester {
    /// A digester for blocks of `len` bytes (shorter blocks are hashed whole).
    pub fn new(len: u64) -> Self {
        let mut zero = std::collections::HashMap::new();
        if len > blake3::CHUNK_LEN as u64 && len <= DIGEST_TABLE_MAX {
            Self::zero_subtree(0, len, &mut zero);
        }
        Self { len, zero, zero_block: zero_digest(len) }
    }

    fn zero_subtree(
        offset: u64,
        len: u64,
        table: &mut std::collections::HashMap<(u64, u64), blake3::hazmat::ChainingValue>,
    ) -> blake3::hazmat::ChainingValue {
        use blake3::hazmat::{HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};
        let cv = if len <= blake3::CHUNK_LEN as u64 {
            let zeros = [0u8; blake3::CHUNK_LEN];
            blake3::Hasher::new()
                .set_input_offset(offset)
                .update(&zeros[..usize::try_from(len).unwrap_or(0)])
                .finalize_non_root()
        } else {
            let left = left_subtree_len(len);
            let l = Self::zero_subtree(offset, left, table);
            let r = Self::zero_subtree(offset + left, len - left, table);
            merge_subtrees_non_root(&l, &r, Mode::Hash)
        };
        if len >= DIGEST_LEAF {
            table.insert((offset, len), cv);
        }
        cv
    }

    /// The BLAKE3 digest of `block` with its ranges `zeros` (offsets into the block, sorted,
    /// disjoint, adjacent ones merged) read as zeros, whatever the buffer holds there: a copy
    /// that never writes its gaps need not clear them either.
    pub fn digest(&self, block: &[u8], zeros: &[(u64, u64)]) -> [u8; 32] {
        use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_root};
        let len = block.len() as u64;
        if !overlaps(zeros, 0, len) {
            return *blake3::hash(block).as_bytes();
        }
        if len != self.len || self.zero.is_empty() {
            // A short block: hashed whole, with its zeros put in.
            let mut copy = block.to_vec();
            clear(&mut copy, 0, zeros);
            return *blake3::hash(&copy).as_bytes();
        }
        if covered(zeros, 0, len) {
            return self.zero_block;
        }
        let left = left_subtree_len(len);
        let l = self.subtree(block, 0, left, zeros);
        let r = self.subtree(block, left, len - left, zeros);
        *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
    }

    fn subtree(&self, block: &[u8], offset: u64, len: u64, zeros: &[(u64, u64)]) -> blake3::hazmat::ChainingValue {
        use blake3::hazmat::{HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};
        if let Some(cv) = self.zero.get(&(offset, len)).filter(|_| covered(zeros, offset, len)) {
            return *cv;
        }
        let from = usize::try_from(offset).unwrap_or(usize::MAX);
        let to = usize::try_from(offset + len).unwrap_or(usize::MAX);
        let bytes = block.get(from..to).unwrap_or_default();
        if !overlaps(zeros, offset, len) {
            return blake3::Hasher::new().set_input_offset(offset).update(bytes).finalize_non_root();
        }
        if len <= DIGEST_LEAF {
            // A small subtree partly zeros: hashed with its zeros put in.
            let mut leaf = [0u8; LEAF_BYTES];
            let leaf = leaf.get_mut(..bytes.len()).unwrap_or_default();
            leaf.copy_from_slice(bytes);
            clear(leaf, offset, zeros);
            return blake3::Hasher::new().set_input_offset(offset).update(leaf).finalize_non_root();
        }
        let left = left_subtree_len(len);
        let l = self.subtree(block, offset, left, zeros);
        let r = self.subtree(block, offset + left, len - left, zeros);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
}

/// Zeros the ranges of `zeros` (offsets into the block) that meet `buf`, which starts at `at`.
fn clear(buf: &mut [u8], at: u64, zeros: &[(u64, u64)]) {
    let end = at + buf.len() as u64;
    let first = zeros.partition_point(|&(_, e)| e <= at);
    for &(s, e) in zeros.get(first..).unwrap_or_default().iter().take_while(|&&(s, _)| s < end) {
        let from = usize::try_from(s.max(at) - at).unwrap_or(usize::MAX);
        let to = usize::try_from(e.min(end) - at).unwrap_or(usize::MAX);
        if let Some(r) = buf.get_mut(from..to) {
            r.fill(0);
        }
    }
}

/// Whether one of the sorted, disjoint ranges `zeros` covers all of `[at, at + len)`.
fn covered(zeros: &[(u64, u64)], at: u64, len: u64) -> bool {
    let i = zeros.partition_point(|&(start, _)| start <= at);
    i > 0 && zeros.get(i - 1).is_some_and(|&(_, end)| end >= at + len)
}

/// Whether one of the sorted, disjoint ranges `zeros` meets `[at, at + len)`.
fn overlaps(zeros: &[(u64, u64)], at: u64, len: u64) -> bool {
    let i = zeros.partition_point(|&(_, end)| end <= at);
    zeros.get(i).is_some_and(|&(start, _)| start < at + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_and_refuse_bad_lengths() {
        let d = Digests::zeros(1 << 20, (3 << 20) + 5);
        assert_eq!(d.blocks.len(), 4);
        assert_eq!(d.blocks[3], *blake3::hash(&[0; 5]).as_bytes());
        assert_eq!(Digests::decode(&d.encode()).unwrap(), d);
        let mut bad = d.encode();
        bad.pop();
        assert!(Digests::decode(&bad).unwrap_err().contains("for 4 blocks"));
        // A header claiming a huge disk with no body allocates nothing and is refused.
        let mut huge = Digests::zeros(1, 0).encode();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Digests::decode(&huge).is_err());
    }

    #[test]
    fn the_digester_gives_blake3_of_the_block_whatever_zeros_it_is_told_of() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [1u64 << 20, 64 << 10, 8 << 10, 5 << 10, 1000] {
            let digester = BlockDigester::new(len);
            for _ in 0..40 {
                let mut block: Vec<u8> = (0..len).map(|_| (next() % 251) as u8 + 1).collect();
                // Zero ranges of any length at any offset, some 4 KiB-aligned, some not, some
                // touching: they are zeroed in the block, then named to the digester merged.
                let mut zeros: Vec<(u64, u64)> = Vec::new();
                let mut garbage = Vec::new();
                let mut at = next() % (len / 4 + 1);
                while at < len {
                    let mut n = 1 + next() % (len / 3 + 1);
                    if next() % 2 == 0 && zeros.last().is_none_or(|l| at - at % 4096 >= l.0) {
                        at -= at % 4096;
                        n = n.div_ceil(4096) * 4096;
                    }
                    let end = (at + n).min(len);
                    block[usize::try_from(at).unwrap()..usize::try_from(end).unwrap()].fill(0);
                    garbage.push((at, end));
                    match zeros.last_mut() {
                        Some(last) if last.1 >= at => last.1 = last.1.max(end),
                        _ => zeros.push((at, end)),
                    }
                    at = end + next() % (len / 4 + 1) * u64::from(next() % 4 != 0);
                }
                let want = *blake3::hash(&block).as_bytes();
                assert_eq!(digester.digest(&block, &zeros), want, "{len} {zeros:?}");
                assert_eq!(digester.digest(&block, &[]), want);
                // What the buffer holds in the named ranges does not matter.
                for (a, b) in garbage {
                    block[usize::try_from(a).unwrap()..usize::try_from(b).unwrap()].fill(0xa5);
                }
                assert_eq!(digester.digest(&block, &zeros), want, "with garbage: {len} {zeros:?}");
            }
            let zero = vec![0u8; usize::try_from(len).unwrap()];
            assert_eq!(digester.digest(&zero, &[(0, len)]), *blake3::hash(&zero).as_bytes());
        }
    }

    #[test]
    fn a_named_range_reads_as_zeros_in_any_block() {
        let digester = BlockDigester::new(1 << 20);
        for (len, zeros) in [(1u64 << 20, (8192u64, 16384u64)), (1 << 20, (1000, 70_000)), (5000, (10, 20))] {
            let block = vec![7u8; usize::try_from(len).unwrap()];
            let mut cleared = block.clone();
            cleared[usize::try_from(zeros.0).unwrap()..usize::try_from(zeros.1).unwrap()].fill(0);
            assert_eq!(digester.digest(&block, &[zeros]), *blake3::hash(&cleared).as_bytes());
            assert_ne!(digester.digest(&block, &[zeros]), *blake3::hash(&block).as_bytes());
        }
    }
}
