//! Fuzz entry point for the repository's files, which may be damaged or tampered with: chunk
//! files, indexes and manifests, each decoded with every length checked.

use repo::{Index, Manifest, decode_chunk};

/// Nothing may panic; what decodes must be consistent and no larger than its file justifies.
pub fn repo_files(data: &[u8]) {
    let id = *blake3::hash(data.get(16..).unwrap_or_default()).as_bytes();
    if let Ok(plain) = decode_chunk(data, &id, 1 << 20) {
        assert!(plain.len() <= 1 << 20);
        assert_eq!(blake3::hash(&plain).as_bytes(), &id);
    }
    let _ = decode_chunk(data, &[0; 32], 64 << 10);
    if let Ok(ix) = Index::decode(data, "fuzz.idx") {
        assert_eq!(ix.ids.len() * 32 + 64, data.len(), "entries come from the file itself");
        assert_eq!(Index::decode(&ix.encode(), "again").ok(), Some(ix));
    }
    let _ = Manifest::decode(data, "fuzz.json");
}
