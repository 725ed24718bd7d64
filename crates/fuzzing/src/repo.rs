//! Fuzz entry point for the repository's files, which may be damaged or tampered with: chunk
//! files, indexes and manifests, each decoded with every length checked, and sealed files of an
//! encrypted repository opened.

use std::sync::OnceLock;

use repo::{Codec, Index, Manifest, RepoKey, decode_chunk};

fn codec() -> &'static Codec {
    static C: OnceLock<Codec> = OnceLock::new();
    C.get_or_init(|| Codec::keyed(&RepoKey::generate().expect("random key")).expect("a codec"))
}

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
    // A sealed file made by someone without the key never opens, and never panics.
    assert!(codec().open("points/x.json", data.to_vec()).is_err(), "forged sealed file opened");
    // One of ours opens exactly, and only under its own name.
    let sealed = codec().seal("indexes/p/0.idx", data.to_vec()).expect("seal");
    assert_eq!(codec().open("indexes/p/0.idx", sealed.clone()).ok().as_deref(), Some(data));
    assert!(codec().open("indexes/p/1.idx", sealed).is_err());
}
