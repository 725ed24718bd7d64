//! Where a repository's files live. [`LocalStore`], a directory, writes every file to a
//! temporary name, fsyncs it, moves it into place and fsyncs the directory; chunks are created
//! only if absent (a hard link, which fails when the name exists), so nothing is overwritten.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::RepoError;

/// A repository's storage: named files, written atomically.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Creates `name` with `data` unless it exists; says whether it created it.
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, RepoError>;
    /// Writes `name` with `data`, replacing it atomically.
    fn put(&self, name: &str, data: &[u8]) -> Result<(), RepoError>;
    /// Reads `name`; `None` when it does not exist.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, RepoError>;
    /// Whether `name` exists.
    fn exists(&self, name: &str) -> Result<bool, RepoError>;
    /// The names directly inside the folder `dir`.
    fn list(&self, dir: &str) -> Result<Vec<String>, RepoError>;
    /// Where it is, for messages.
    fn describe(&self) -> String;
}

/// A repository in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

static TMP: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// The store rooted at `root` (which must exist).
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self { root: root.as_ref().to_path_buf() }
    }

    fn path(&self, name: &str) -> Result<PathBuf, RepoError> {
        // Names come from the repository itself, but an index or manifest could be tampered
        // with: nothing may leave the root.
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
            return Err(RepoError::Corrupt(format!("{name:?} is not a repository file name")));
        }
        Ok(self.root.join(name))
    }

    /// Writes `data` to a temporary file beside `path`, fsynced; returns its path.
    fn temp(&self, path: &Path, data: &[u8]) -> Result<PathBuf, RepoError> {
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| RepoError::io(dir, e))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(".tmp-{}-{}-{name}", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
        let mut f = File::create(&tmp).map_err(|e| RepoError::io(&tmp, e))?;
        f.write_all(data).map_err(|e| RepoError::io(&tmp, e))?;
        f.sync_all().map_err(|e| RepoError::io(&tmp, e))?;
        Ok(tmp)
    }
}

/// Fsyncs the directory holding `path`, so a rename or link in it is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<(), RepoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| RepoError::io(dir, e))
}

impl Store for LocalStore {
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, RepoError> {
        let path = self.path(name)?;
        if path.exists() {
            return Ok(false);
        }
        let tmp = self.temp(&path, data)?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_parent(&path)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(RepoError::io(&path, e)),
        }
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), RepoError> {
        let path = self.path(name)?;
        let tmp = self.temp(&path, data)?;
        std::fs::rename(&tmp, &path).map_err(|e| RepoError::io(&path, e))?;
        sync_parent(&path)
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, RepoError> {
        let path = self.path(name)?;
        match std::fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&path, e)),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, RepoError> {
        Ok(self.path(name)?.exists())
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, RepoError> {
        let path = self.path(dir)?;
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RepoError::io(&path, e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| RepoError::io(&path, e))?;
            if let Some(n) = e.file_name().to_str().filter(|n| !n.starts_with('.')) {
                out.push(n.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_only_never_overwrites_and_names_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalStore::new(d.path());
        assert!(s.put_new("chunks/ab/x", b"one").unwrap());
        assert!(!s.put_new("chunks/ab/x", b"two").unwrap());
        assert_eq!(s.get("chunks/ab/x").unwrap().unwrap(), b"one");
        s.put("points/p.json", b"{}").unwrap();
        s.put("points/p.json", b"[]").unwrap();
        assert_eq!(s.get("points/p.json").unwrap().unwrap(), b"[]");
        assert_eq!(s.list("points").unwrap(), ["p.json"]);
        assert_eq!(s.get("nothing").unwrap(), None);
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(s.get(bad).is_err(), "{bad}");
        }
    }
}
