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
}
