//! The on-disk formats of DESIGN.md: chunk files, indexes and manifests, encoded and decoded
//! with every length checked before use, so a damaged or hostile file is an error, never a
//! panic or an allocation larger than the file.

use serde::{Deserialize, Serialize};

use crate::RepoError;

/// The format this code writes and reads.
pub const FORMAT: u32 = 1;
/// A chunk ID: BLAKE3 of the chunk's plain bytes.
pub type ChunkId = [u8; 32];
/// The index entry of an all-zero chunk (stored as nothing).
pub const ZERO: ChunkId = [0; 32];

const CHUNK_MAGIC: &[u8; 8] = b"SPCHUNK1";
const INDEX_MAGIC: &[u8; 8] = b"SPINDEX1";

/// `chunks/XX/<64 hex>`.
pub fn chunk_name(id: &ChunkId) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("chunks/{}/{hex}", &hex[..2])
}

/// Encodes a chunk: zstd when that is smaller, else stored.
pub fn encode_chunk(plain: &[u8]) -> Vec<u8> {
    // Compression contexts are reused across chunks and threads (a fresh one per chunk costs
    // more than the chunk's own memory; one per thread would keep one in every thread the
    // blocking pool ever used), and at most a few are kept.
    static COMPRESSORS: std::sync::Mutex<Vec<zstd::bulk::Compressor<'static>>> = std::sync::Mutex::new(Vec::new());
    const KEEP: usize = 16;
    let len = u32::try_from(plain.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(16 + plain.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&len.to_le_bytes());
    let taken = COMPRESSORS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
    let mut compressor = taken.or_else(|| zstd::bulk::Compressor::new(1).ok());
    // Compressed straight after the header, in the room the data itself would take: kept only
    // when it is smaller (a compression that does not fit fails, and the data is stored as it is).
    let compressed = compressor.as_mut().and_then(|c| {
        let mut cursor = std::io::Cursor::new(&mut out);
        cursor.set_position(16);
        c.compress_to_buffer(plain, &mut cursor).ok()
    });
    if let Some(c) = compressor {
        let mut kept = COMPRESSORS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < KEEP {
            kept.push(c);
        }
    }
    match compressed {
        Some(n) if n < plain.len() && out.len() == 16 + n => out,
        _ => {
            out.truncate(16);
            out[8] = 0;
            out.extend_from_slice(plain);
            out
        }
    }
}

/// Decodes a chunk and checks it is the chunk `id` names, at most `max_len` bytes.
pub fn decode_chunk(data: &[u8], id: &ChunkId, max_len: u64) -> Result<Vec<u8>, RepoError> {
    decode_chunk_with(data, id, max_len, &|p| *blake3::hash(p).as_bytes())
}

/// [`decode_chunk`] with the repository's chunk hash (keyed when it is encrypted).
pub fn decode_chunk_with(
    data: &[u8],
    id: &ChunkId,
    max_len: u64,
    hash: &dyn Fn(&[u8]) -> ChunkId,
) -> Result<Vec<u8>, RepoError> {
    let name = chunk_name(id);
    let bad = |m: &str| RepoError::Corrupt(format!("{name}: {m}"));
    if data.len() < 16 || &data[..8] != CHUNK_MAGIC {
        return Err(bad("not a chunk file"));
    }
    if data[9..12] != [0, 0, 0] {
        return Err(bad("reserved header bytes are set (damaged, or a newer format)"));
    }
    let len = u64::from(u32::from_le_bytes([data[12], data[13], data[14], data[15]]));
    if len > max_len {
        return Err(bad(&format!("claims {len} bytes, more than a chunk holds")));
    }
    let payload = &data[16..];
    let plain = match data[8] {
        0 => payload.to_vec(),
        1 => zstd::bulk::decompress(payload, usize::try_from(len).unwrap_or(0))
            .map_err(|e| bad(&format!("zstd: {e}")))?,
        k => return Err(bad(&format!("unknown encoding {k}"))),
    };
    if plain.len() as u64 != len {
        return Err(bad(&format!("holds {} bytes, its header says {len}", plain.len())));
    }
    if hash(&plain) != *id {
        return Err(bad("its contents do not match its name (damaged)"));
    }
    Ok(plain)
}

/// One disk's chunks in a restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The chunk size.
    pub chunk_size: u32,
    /// The disk's size.
    pub capacity: u64,
    /// One ID per chunk, [`ZERO`] for an all-zero one.
    pub ids: Vec<ChunkId>,
}

impl Index {
    /// An index of zero chunks.
    pub fn zeroed(capacity: u64, chunk_size: u32) -> Self {
        let n = capacity.div_ceil(u64::from(chunk_size.max(1)));
        Self { chunk_size, capacity, ids: vec![ZERO; usize::try_from(n).unwrap_or(0)] }
    }

    /// The file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 32 * self.ids.len());
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        out.extend_from_slice(&(self.ids.len() as u64).to_le_bytes());
        for id in &self.ids {
            out.extend_from_slice(id);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Reads an index file, checking its checksum, format and sizes.
    pub fn decode(data: &[u8], name: &str) -> Result<Self, RepoError> {
        let bad = |m: String| RepoError::Corrupt(format!("{name}: {m}"));
        if data.len() < 64 || &data[..8] != INDEX_MAGIC {
            return Err(bad("not an index file".into()));
        }
        let (body, sum) = data.split_at(data.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("its checksum does not match (damaged)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or([0; 8]));
        let format = u32_at(8);
        if format != FORMAT {
            return Err(RepoError::NewerFormat { what: name.to_owned(), found: format, known: FORMAT });
        }
        let (chunk_size, capacity, entries) = (u32_at(12), u64_at(16), u64_at(24));
        if chunk_size == 0 || capacity.div_ceil(u64::from(chunk_size)) != entries {
            return Err(bad(format!("{entries} entries do not cover {capacity} bytes in chunks of {chunk_size}")));
        }
        if (body.len() as u64 - 32) != entries.saturating_mul(32) {
            return Err(bad(format!("{} bytes of entries for {entries} entries", body.len() - 32)));
        }
        let ids = body[32..].chunks_exact(32).map(|c| c.try_into().unwrap_or(ZERO)).collect();
        Ok(Self { chunk_size, capacity, ids })
    }
}

/// How consistent a restore point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The guest was quiesced (VMware Tools).
    Application,
    /// As after a power cut.
    Crash,
}

/// What was backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceInfo {
    /// A name (the VM's, or the image's path).
    pub name: String,
    /// The VM's instance UUID, when it is a VM.
    pub instance_uuid: Option<String>,
}

/// One disk of a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// Its name (`scsi0:0`, or an image's file name).
    pub name: String,
    /// Its size.
    pub capacity: u64,
    /// Its index file.
    pub index: String,
    /// BLAKE3 of the index file.
    pub index_blake3: String,
    /// The CBT change ID this copy is as of.
    pub change_id: Option<String>,
    /// What the CBT planner needs of this copy next time (change ID, capacity, position,
    /// backing, epoch taint), when it came from a planned copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<cbt::CommittedDisk>,
    /// Its label in vSphere (`Hard disk 2`), when it came from a VM; restores may name the
    /// disk by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Chunks this backup stored new.
    pub stored_chunks: u64,
    /// Bytes those took in the repository.
    pub stored_bytes: u64,
}

/// A configuration file captured with a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name as the VM has it (`db01.vmx`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Where it is stored (`files/<point>/<n>`).
    pub stored: String,
    /// BLAKE3 of the stored file, checked before it is used.
    pub stored_blake3: String,
}

/// A restore point's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The format.
    pub format: u32,
    /// Its ID.
    pub id: String,
    /// When (UTC, ISO 8601).
    pub time: String,
    /// The restore point an incremental started from.
    pub parent: Option<String>,
    /// What was backed up.
    pub source: SourceInfo,
    /// Application- or crash-consistent.
    pub consistency: Consistency,
    /// The disks.
    pub disks: Vec<DiskEntry>,
    /// The VM's configuration files captured with it (`.vmx`, `.nvram`, ...).
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The disk `which` names: its slot (`scsi0:1`), its vSphere label (`Hard disk 2`, any
    /// case), or its position (`0`). A name that matches none, or labels shared by several
    /// disks, is refused listing what the point holds.
    pub fn disk_index(&self, which: &str) -> Result<usize, RepoError> {
        let w = which.trim();
        let by_label: Vec<usize> = (0..self.disks.len())
            .filter(|&n| self.disks[n].label.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(w)))
            .collect();
        let found = self
            .disks
            .iter()
            .position(|d| d.name == w)
            .or(if let [one] = by_label.as_slice() { Some(*one) } else { None })
            .or_else(|| w.parse::<usize>().ok().filter(|n| *n < self.disks.len()));
        found.ok_or_else(|| {
            let names: Vec<String> = self
                .disks
                .iter()
                .enumerate()
                .map(|(n, d)| match &d.label {
                    Some(l) => format!("{n}: {} ({l})", d.name),
                    None => format!("{n}: {}", d.name),
                })
                .collect();
            let what = if by_label.len() > 1 { "several disks labelled" } else { "no disk" };
            RepoError::Invalid(format!("restore point {} has {what} {which:?}; it has: {}", self.id, names.join(", ")))
        })
    }

    /// Reads a manifest, refusing a newer format by number.
    pub fn decode(data: &[u8], name: &str) -> Result<Self, RepoError> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(data).map_err(|e| RepoError::Corrupt(format!("{name}: {e}")))?;
        if head.format != FORMAT {
            return Err(RepoError::NewerFormat { what: name.to_owned(), found: head.format, known: FORMAT });
        }
        serde_json::from_slice(data).map_err(|e| RepoError::Corrupt(format!("{name}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_any_flipped_byte_is_found() {
        let mut plain = vec![7u8; 1 << 16];
        plain[100] = 1;
        let id = *blake3::hash(&plain).as_bytes();
        let enc = encode_chunk(&plain);
        assert!(enc.len() < plain.len() / 10, "compressible data is compressed");
        assert_eq!(decode_chunk(&enc, &id, 1 << 16).unwrap(), plain);
        for at in [0, 9, 12, 16, enc.len() - 1] {
            let mut bad = enc.clone();
            bad[at] ^= 0x40;
            assert!(decode_chunk(&bad, &id, 1 << 16).is_err(), "byte {at}");
        }
        assert!(decode_chunk(&enc, &id, 100).is_err(), "longer than a chunk");
    }

    #[test]
    fn indexes_round_trip_and_refuse_damage_and_newer_formats() {
        let mut ix = Index::zeroed(10 << 20, 4 << 20);
        assert_eq!(ix.ids.len(), 3);
        ix.ids[1] = [5; 32];
        let enc = ix.encode();
        assert_eq!(Index::decode(&enc, "i").unwrap(), ix);
        let mut bad = enc.clone();
        bad[40] ^= 1;
        assert!(Index::decode(&bad, "i").unwrap_err().to_string().contains("checksum"));
        let mut newer = enc[..enc.len() - 32].to_vec();
        newer[8] = 2;
        let sum = *blake3::hash(&newer).as_bytes();
        newer.extend_from_slice(&sum);
        assert!(matches!(Index::decode(&newer, "i"), Err(RepoError::NewerFormat { found: 2, .. })));
        assert!(Index::decode(&enc[..50], "i").is_err());
    }
}
