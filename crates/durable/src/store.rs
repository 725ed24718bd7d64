//! Named files written atomically. [`LocalStore`], a directory, writes every file to a
//! temporary name, fsyncs it, moves it into place and fsyncs the directory (and the parent of
//! any directory it creates); [`Store::put_new`] creates a file only if absent (a hard link,
//! which fails when the name exists), so nothing is overwritten. The file system under it is a
//! [`Fs`], so the crash-simulating one of `crashfs` can stand in for the real one in tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::Error;

/// One name in a folder of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name, without the folder.
    pub name: String,
    /// When it was last written, for files (a folder has none).
    pub modified: Option<SystemTime>,
}

/// Storage of named files, written atomically (a repository's, a replica's sync states).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Creates `name` with `data` unless it exists; says whether it created it.
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, Error>;
    /// Writes `name` with `data`, replacing it atomically.
    fn put(&self, name: &str, data: &[u8]) -> Result<(), Error>;
    /// Reads `name`; `None` when it does not exist.
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Whether `name` exists.
    fn exists(&self, name: &str) -> Result<bool, Error>;
    /// The files and folders directly inside the folder `dir` (`""`: the root), sorted by name.
    fn list(&self, dir: &str) -> Result<Vec<Entry>, Error>;
    /// Like [`Store::list`], with the temporary files too (names starting with `.tmp-`) that a
    /// writer that died between writing and renaming leaves, for gc to collect. Object stores,
    /// whose writes are atomic, have none.
    fn list_all(&self, dir: &str) -> Result<Vec<Entry>, Error> {
        self.list(dir)
    }
    /// Removes `name`: a file, or a folder once it is empty (object stores have no folders to
    /// remove); removing what is not there is not an error.
    fn delete(&self, name: &str) -> Result<(), Error>;
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// Whether it is a file system, where a writer that dies leaves temporary files and the
    /// disk can fill up, rather than an object store, whose writes are atomic and whose space
    /// does not run out.
    fn file_system(&self) -> bool {
        false
    }
}

/// Checks a store file name: relative, no empty, `.` or `..` parts. Names come from the
/// store's owner, but an index or manifest could be tampered with: nothing may leave the root.
pub fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.starts_with('/') || name.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        return Err(Error::BadName(name.to_owned()));
    }
    Ok(())
}

/// The file-system operations [`LocalStore`] needs, each one step, so that a simulation can
/// tell which steps were made durable.
pub trait Fs: Send + Sync + std::fmt::Debug {
    /// Creates (or truncates) `path` and writes `data`; not yet durable.
    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()>;
    /// Makes `path`'s contents durable (fsync).
    fn sync_file(&self, path: &Path) -> std::io::Result<()>;
    /// Makes the names in directory `dir` durable (fsync of the directory).
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()>;
    /// Creates directory `dir` (its parent exists); `AlreadyExists` when it does.
    fn create_dir(&self, dir: &Path) -> std::io::Result<()>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Links `to` to `from`'s file; `AlreadyExists` when `to` exists.
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Removes file `path`, or folder `path` once it is empty.
    fn remove(&self, path: &Path) -> std::io::Result<()>;
    /// Reads file `path`.
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    /// The entries of `dir` (name, modification time for files).
    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<Entry>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl Fs for RealFs {
    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        std::fs::File::create(path)?.write_all(data)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::hard_link(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path) {
            Err(_) if path.is_dir() => std::fs::remove_dir(path),
            done => done,
        }
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let Some(name) = e.file_name().to_str().map(str::to_owned) else { continue };
            let meta = match e.metadata() {
                Ok(m) => m,
                // Renamed or removed since the listing (a writer's temporary file).
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            out.push(Entry { name, modified: if meta.is_file() { meta.modified().ok() } else { None } });
        }
        Ok(out)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// A store in a local directory.
#[derive(Debug)]
pub struct LocalStore<F: Fs = RealFs> {
    root: PathBuf,
    fs: F,
}

static TMP: AtomicU64 = AtomicU64::new(0);

/// How the names of temporary files begin (`.tmp-<pid>-<n>-<name>`).
pub const TEMP_PREFIX: &str = ".tmp-";

/// The writer's process ID and the file a temporary file was to become, from its name
/// (`.tmp-<pid>-<n>-<name>`); `None` for any other name.
pub fn temp_writer(name: &str) -> Option<(u32, &str)> {
    let mut parts = name.strip_prefix(TEMP_PREFIX)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let _n: u64 = parts.next()?.parse().ok()?;
    Some((pid, parts.next()?))
}

impl LocalStore<RealFs> {
    /// The store rooted at `root` (which must exist).
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self::with_fs(root, RealFs)
    }
}

impl<F: Fs> LocalStore<F> {
    /// The store rooted at `root` of file system `fs`.
    pub fn with_fs(root: impl AsRef<Path>, fs: F) -> Self {
        Self { root: root.as_ref().to_path_buf(), fs }
    }

    fn path(&self, name: &str) -> Result<PathBuf, Error> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    /// Creates `dir` and any missing parents below the root, fsyncing the parent of each one
    /// it creates (a new directory is a name in its parent, lost in a crash like any other).
    fn ensure_dir(&self, dir: &Path) -> Result<(), Error> {
        if dir == self.root || self.fs.exists(dir) {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(&self.root);
        self.ensure_dir(parent)?;
        match self.fs.create_dir(dir) {
            Ok(()) => self.fs.sync_dir(parent).map_err(|e| Error::io(parent, e)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io(dir, e)),
        }
    }

    /// Writes `data` to a temporary file beside `path`, fsynced; returns its path.
    fn temp(&self, path: &Path, data: &[u8]) -> Result<PathBuf, Error> {
        let dir = path.parent().unwrap_or(&self.root);
        self.ensure_dir(dir)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp =
            dir.join(format!("{TEMP_PREFIX}{}-{}-{name}", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
        if let Err(e) = self.fs.write(&tmp, data).and_then(|()| self.fs.sync_file(&tmp)) {
            // A full disk leaves a partial file behind: never keep one.
            let _ = self.fs.remove(&tmp);
            return Err(Error::io(&tmp, e));
        }
        Ok(tmp)
    }

    fn sync_parent(&self, path: &Path) -> Result<(), Error> {
        let dir = path.parent().unwrap_or(&self.root);
        self.fs.sync_dir(dir).map_err(|e| Error::io(dir, e))
    }
}

/// Fsyncs the directory holding `path`, so a rename or link in it (or a file created there)
/// is durable.
pub fn sync_parent(path: &Path) -> Result<(), Error> {
    let dir = parent(path);
    RealFs.sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// The directory holding `path`: a bare relative name (`key`) has the empty path as its
/// parent, which is `.`.
fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes `data` to `path` so that a crash leaves either the old file or the new one: a
/// temporary file beside it, fsynced, renamed over it, and the directory fsynced (the
/// [`LocalStore`] write, for a file outside any store).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::BadName(path.display().to_string()))?;
    LocalStore::new(parent(path)).put(name, data)
}

impl<F: Fs> Store for LocalStore<F> {
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, Error> {
        let path = self.path(name)?;
        if self.fs.exists(&path) {
            return Ok(false);
        }
        let tmp = self.temp(&path, data)?;
        let linked = self.fs.hard_link(&tmp, &path);
        let _ = self.fs.remove(&tmp);
        match linked {
            Ok(()) => {
                self.sync_parent(&path)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), Error> {
        let path = self.path(name)?;
        let tmp = self.temp(&path, data)?;
        if let Err(e) = self.fs.rename(&tmp, &path) {
            let _ = self.fs.remove(&tmp);
            return Err(Error::io(&path, e));
        }
        self.sync_parent(&path)
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(name)?;
        match self.fs.read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, Error> {
        Ok(self.fs.exists(&self.path(name)?))
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>, Error> {
        let mut out = self.list_all(dir)?;
        // Temporary files are half-written by definition.
        out.retain(|e| !e.name.starts_with('.'));
        Ok(out)
    }

    fn list_all(&self, dir: &str) -> Result<Vec<Entry>, Error> {
        let path = if dir.is_empty() { self.root.clone() } else { self.path(dir)? };
        let mut out = match self.fs.read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&path, e)),
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), Error> {
        let path = self.path(name)?;
        match self.fs.remove(&path) {
            Ok(()) => self.sync_parent(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn file_system(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_file_names_its_writer_and_what_it_was_to_become() {
        assert_eq!(temp_writer(".tmp-123-7-a.b-c.json"), Some((123, "a.b-c.json")));
        for name in ["a.json", ".tmp-x-7-a.json", ".tmp-123-a.json", ".tmp-123-7", ".tmp-99999999999-1-a"] {
            assert_eq!(temp_writer(name), None, "{name}");
        }
    }

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
        let listed = s.list("points").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "p.json");
        assert!(listed[0].modified.is_some());
        assert_eq!(s.list("chunks").unwrap()[0], Entry { name: "ab".into(), modified: None });
        s.delete("points/p.json").unwrap();
        s.delete("points/p.json").unwrap();
        assert_eq!(s.get("points/p.json").unwrap(), None);
        assert_eq!(s.get("nothing").unwrap(), None);
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(s.get(bad).is_err(), "{bad}");
        }
    }
}
