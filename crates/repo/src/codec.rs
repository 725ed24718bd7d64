//! Encryption of a repository's files, when it has a key: chunk IDs become keyed BLAKE3 (so a
//! chunk's name reveals nothing about its content), and chunks, indexes and manifests are
//! sealed with AES-256-GCM under a random nonce, bound to their file name (a file moved to
//! another name does not open). Without a key every call is the identity and IDs are plain
//! BLAKE3. The key is 32 random bytes kept in a file of 64 hex digits, outside the repository.

use std::io::Write;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::RepoError;
use crate::format::{ChunkId, ZERO};

const SEAL_MAGIC: &[u8; 8] = b"SPSEAL01";
const TAG_LEN: usize = 16;

/// The most a key file may hold: a key is 65 bytes, with room for comments or whitespace.
pub const MAX_KEY_FILE: u64 = 4096;

/// A repository key. `Debug` never shows it.
#[derive(Clone)]
pub struct RepoKey([u8; 32]);

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoKey(<redacted>)")
    }
}

impl RepoKey {
    /// A new random key.
    pub fn generate() -> Result<Self, RepoError> {
        let mut k = [0u8; 32];
        aws_lc_rs::rand::fill(&mut k).map_err(|_| RepoError::Invalid("the system has no random numbers".into()))?;
        Ok(Self(k))
    }

    /// Reads a key file (64 hex digits; surrounding whitespace ignored). At most
    /// [`MAX_KEY_FILE`] bytes are read, so a wrong path (`/dev/zero`, an image) fails at once
    /// instead of filling memory. A key file that its group or others may read or write is
    /// used, with a warning naming it (the key itself never appears in a message).
    pub fn from_file(path: &Path) -> Result<Self, RepoError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let f = std::fs::File::open(path).map_err(|e| RepoError::io(path, e))?;
        if let Ok(meta) = f.metadata()
            && meta.is_file()
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "the key file {} is open to its group or others (mode {:o}); make it readable by its owner \
                 only (chmod 600)",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let mut raw = Vec::new();
        f.take(MAX_KEY_FILE + 1).read_to_end(&mut raw).map_err(|e| RepoError::io(path, e))?;
        let bad = || RepoError::Invalid(format!("{}: not a syncproxy repository key (64 hex digits)", path.display()));
        if raw.len() as u64 > MAX_KEY_FILE {
            return Err(RepoError::Invalid(format!(
                "{}: longer than {MAX_KEY_FILE} bytes, so not a syncproxy repository key (64 hex digits)",
                path.display()
            )));
        }
        let hex = std::str::from_utf8(&raw).map_err(|_| bad())?.trim();
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(bad)?;
        }
        Ok(Self(k))
    }

    /// Writes the key to a new file `path` (never over an existing one), readable by its owner
    /// only, durably.
    pub fn write_new(&self, path: &Path) -> Result<(), RepoError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| RepoError::io(path, e))?;
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        f.write_all(format!("{hex}\n").as_bytes()).and_then(|()| f.sync_all()).map_err(|e| RepoError::io(path, e))?;
        Ok(durable::sync_parent(path)?)
    }
}

struct Keys {
    id: [u8; 32],
    aead: LessSafeKey,
    check: String,
}

/// How a repository's files are encoded: plain, or encrypted with a key.
pub struct Codec {
    keys: Option<Keys>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("encrypted", &self.keys.is_some()).finish()
    }
}

/// What `config` says of the encryption.
pub(crate) const ALGORITHM: &str = "aes-256-gcm";

impl Codec {
    /// No encryption.
    pub fn plain() -> Self {
        Self { keys: None }
    }

    /// Encryption with `key`.
    pub fn keyed(key: &RepoKey) -> Result<Self, RepoError> {
        let enc = blake3::derive_key("syncproxy repository 1 file encryption", &key.0);
        let unbound = UnboundKey::new(&AES_256_GCM, &enc)
            .map_err(|_| RepoError::Invalid("the encryption key was refused".into()))?;
        let check = blake3::derive_key("syncproxy repository 1 key check", &key.0);
        Ok(Self {
            keys: Some(Keys {
                id: blake3::derive_key("syncproxy repository 1 chunk id", &key.0),
                aead: LessSafeKey::new(unbound),
                check: check.iter().map(|b| format!("{b:02x}")).collect(),
            }),
        })
    }

    /// Whether files are encrypted.
    pub fn encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// What identifies the key without revealing it (`None` when plain).
    pub fn key_check(&self) -> Option<&str> {
        self.keys.as_ref().map(|k| k.check.as_str())
    }

    /// A chunk's ID: [`ZERO`] for an all-zero one, else (keyed) BLAKE3 of its bytes.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        if plain.iter().all(|&b| b == 0) { ZERO } else { self.hash(plain) }
    }

    /// (Keyed) BLAKE3 of `plain`.
    pub fn hash(&self, plain: &[u8]) -> ChunkId {
        match &self.keys {
            Some(k) => *blake3::keyed_hash(&k.id, plain).as_bytes(),
            None => *blake3::hash(plain).as_bytes(),
        }
    }

    /// Seals the contents of file `name` (the identity when plain).
    pub fn seal(&self, name: &str, mut data: Vec<u8>) -> Result<Vec<u8>, RepoError> {
        let Some(k) = &self.keys else { return Ok(data) };
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| RepoError::Invalid("the system has no random numbers".into()))?;
        k.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| RepoError::Invalid(format!("{name}: encryption failed")))?;
        let mut out = Vec::with_capacity(8 + NONCE_LEN + data.len());
        out.extend_from_slice(SEAL_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens the sealed contents of file `name` (the identity when plain).
    pub fn open(&self, name: &str, data: Vec<u8>) -> Result<Vec<u8>, RepoError> {
        let Some(k) = &self.keys else { return Ok(data) };
        if data.len() < 8 + NONCE_LEN + TAG_LEN || &data[..8] != SEAL_MAGIC {
            return Err(RepoError::Corrupt(format!("{name}: not an encrypted file")));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&data[8..8 + NONCE_LEN]);
        let mut body = data;
        body.drain(..8 + NONCE_LEN);
        let plain_len = k
            .aead
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| {
                RepoError::Corrupt(format!("{name}: does not decrypt (damaged, or not this repository's file)"))
            })?
            .len();
        body.truncate(plain_len);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_files_open_only_with_their_key_and_name() {
        let key = RepoKey::generate().unwrap();
        let c = Codec::keyed(&key).unwrap();
        let sealed = c.seal("chunks/ab/x", b"secret bytes".to_vec()).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(c.open("chunks/ab/x", sealed.clone()).unwrap(), b"secret bytes");
        assert!(c.open("chunks/ab/y", sealed.clone()).is_err(), "bound to its name");
        let other = Codec::keyed(&RepoKey::generate().unwrap()).unwrap();
        assert!(other.open("chunks/ab/x", sealed.clone()).is_err(), "another key");
        for at in [0, 10, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(c.open("chunks/ab/x", bad).is_err(), "byte {at}");
        }
        assert!(c.open("x", vec![1, 2, 3]).is_err());
        // Keyed IDs differ from plain ones and between keys.
        assert_ne!(c.hash(b"data"), Codec::plain().hash(b"data"));
        assert_ne!(c.hash(b"data"), other.hash(b"data"));
        assert_eq!(c.chunk_id(&[0; 64]), ZERO);
        let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!format!("{key:?}{c:?}").contains(&hex));
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        let k = RepoKey::generate().unwrap();
        k.write_new(&p).unwrap();
        assert!(k.write_new(&p).is_err(), "never over an existing key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(RepoKey::from_file(&p).unwrap().0, k.0);
        std::fs::write(&p, "abc").unwrap();
        assert!(RepoKey::from_file(&p).unwrap_err().to_string().contains("64 hex digits"));
        assert_eq!(format!("{k:?}"), "RepoKey(<redacted>)");
    }

    #[test]
    fn key_files_are_read_with_a_small_bound() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        let k = RepoKey::generate().unwrap();
        let hex: String = k.0.iter().map(|b| format!("{b:02x}")).collect();
        // A key followed by more than a key file holds: refused, though the rest is whitespace.
        std::fs::write(&p, format!("{hex}{}", " ".repeat(1 << 20))).unwrap();
        let e = RepoKey::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("longer than 4096 bytes") && e.contains("key"), "{e}");
        assert!(!e.contains(&hex), "{e}");
        // An endless file fails at once (an unbounded read would fill memory instead).
        let t = std::time::Instant::now();
        let e = RepoKey::from_file(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("/dev/zero") && e.contains("longer than"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
