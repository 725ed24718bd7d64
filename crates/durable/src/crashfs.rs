//! A file system in memory that loses, at a simulated power cut, everything a real one may
//! lose: file contents not fsynced, and names (new files, renames, links, removals, new
//! directories) whose directory was not fsynced afterwards. Tests put a [`LocalStore`] on it,
//! cut the power after a chosen number of steps, and check what survives, which finds a
//! missing fsync that killing a process never could (the kernel keeps a killed process's
//! writes).
//!
//! [`LocalStore`]: crate::LocalStore

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind};
use std::path::{Component, Path};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::store::{Entry, Fs};

#[derive(Debug, Clone)]
enum Node {
    File { data: Vec<u8>, synced: Option<Vec<u8>>, modified: SystemTime },
    Dir { entries: BTreeMap<String, usize>, synced: BTreeMap<String, usize> },
}

#[derive(Debug)]
struct Inner {
    nodes: Vec<Node>,
    /// Mutating steps left before the power cut; `None`: no cut planned.
    budget: Option<u64>,
    /// The power is off: every call fails until [`CrashFs::crash`].
    down: bool,
    /// Mutating steps taken since creation.
    steps: u64,
    clock: SystemTime,
}

/// The crash-simulating file system. Paths are absolute; `/` exists.
#[derive(Debug)]
pub struct CrashFs {
    inner: Mutex<Inner>,
}

impl Default for CrashFs {
    fn default() -> Self {
        Self::new()
    }
}

fn cut() -> Error {
    Error::other("simulated power cut")
}

impl CrashFs {
    /// An empty file system (just `/`, durable).
    pub fn new() -> Self {
        let root = Node::Dir { entries: BTreeMap::new(), synced: BTreeMap::new() };
        Self {
            inner: Mutex::new(Inner {
                nodes: vec![root],
                budget: None,
                down: false,
                steps: 0,
                clock: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts the power after `steps` more mutating steps (the step that would be number
    /// `steps + 1` fails, and so does everything after it).
    pub fn cut_after(&self, steps: u64) {
        self.lock().budget = Some(steps);
    }

    /// Mutating steps taken so far.
    pub fn steps(&self) -> u64 {
        self.lock().steps
    }

    /// Advances the clock that stamps files' modification times.
    pub fn advance(&self, by: Duration) {
        self.lock().clock += by;
    }

    /// The power comes back: only what was durable remains, and calls work again.
    pub fn crash(&self) {
        let mut g = self.lock();
        let mut stack = vec![0usize];
        let mut seen = vec![false; g.nodes.len()];
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut seen[n], true) {
                continue;
            }
            match &mut g.nodes[n] {
                Node::File { data, synced, .. } => *data = synced.clone().unwrap_or_default(),
                Node::Dir { entries, synced } => {
                    *entries = synced.clone();
                    stack.extend(entries.values().copied());
                }
            }
        }
        g.budget = None;
        g.down = false;
    }
}

impl Inner {
    /// Counts one mutating step, failing it when the power is (or goes) off.
    fn step(&mut self) -> std::io::Result<()> {
        if self.down {
            return Err(cut());
        }
        if let Some(b) = &mut self.budget {
            if *b == 0 {
                self.down = true;
                return Err(cut());
            }
            *b -= 1;
        }
        self.steps += 1;
        self.clock += Duration::from_millis(1);
        Ok(())
    }

    fn up(&self) -> std::io::Result<()> {
        if self.down { Err(cut()) } else { Ok(()) }
    }

    /// The node at `path`.
    fn find(&self, path: &Path) -> std::io::Result<usize> {
        let mut at = 0usize;
        for c in path.components() {
            match c {
                Component::RootDir => at = 0,
                Component::Normal(name) => {
                    let name = name.to_str().ok_or_else(|| Error::from(ErrorKind::InvalidInput))?;
                    at = match &self.nodes[at] {
                        Node::Dir { entries, .. } => {
                            *entries.get(name).ok_or_else(|| Error::from(ErrorKind::NotFound))?
                        }
                        Node::File { .. } => return Err(Error::from(ErrorKind::NotADirectory)),
                    };
                }
                _ => return Err(Error::from(ErrorKind::InvalidInput)),
            }
        }
        Ok(at)
    }

    /// The directory holding `path`, and `path`'s last name.
    fn parent(&self, path: &Path) -> std::io::Result<(usize, String)> {
        let name =
            path.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::from(ErrorKind::InvalidInput))?.to_owned();
        let dir = self.find(path.parent().ok_or_else(|| Error::from(ErrorKind::InvalidInput))?)?;
        match self.nodes[dir] {
            Node::Dir { .. } => Ok((dir, name)),
            Node::File { .. } => Err(Error::from(ErrorKind::NotADirectory)),
        }
    }

    fn entries(&mut self, dir: usize) -> &mut BTreeMap<String, usize> {
        match &mut self.nodes[dir] {
            Node::Dir { entries, .. } => entries,
            Node::File { .. } => unreachable!("parent() returns directories only"),
        }
    }
}

impl Fs for CrashFs {
    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let (dir, name) = g.parent(path)?;
        let modified = g.clock;
        match g.entries(dir).get(&name).copied() {
            Some(n) => match &mut g.nodes[n] {
                Node::File { data: d, modified: m, .. } => {
                    *d = data.to_vec();
                    *m = modified;
                }
                Node::Dir { .. } => return Err(Error::from(ErrorKind::IsADirectory)),
            },
            None => {
                g.nodes.push(Node::File { data: data.to_vec(), synced: None, modified });
                let n = g.nodes.len() - 1;
                g.entries(dir).insert(name, n);
            }
        }
        Ok(())
    }

    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let n = g.find(path)?;
        if let Node::File { data, synced, .. } = &mut g.nodes[n] {
            *synced = Some(data.clone());
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let n = g.find(dir)?;
        match &mut g.nodes[n] {
            Node::Dir { entries, synced } => {
                *synced = entries.clone();
                Ok(())
            }
            Node::File { .. } => Err(Error::from(ErrorKind::NotADirectory)),
        }
    }

    fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let (parent, name) = g.parent(dir)?;
        if g.entries(parent).contains_key(&name) {
            return Err(Error::from(ErrorKind::AlreadyExists));
        }
        g.nodes.push(Node::Dir { entries: BTreeMap::new(), synced: BTreeMap::new() });
        let n = g.nodes.len() - 1;
        g.entries(parent).insert(name, n);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let (fd, fname) = g.parent(from)?;
        let (td, tname) = g.parent(to)?;
        let n = g.entries(fd).remove(&fname).ok_or_else(|| Error::from(ErrorKind::NotFound))?;
        g.entries(td).insert(tname, n);
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let n = g.find(from)?;
        let (td, tname) = g.parent(to)?;
        if g.entries(td).contains_key(&tname) {
            return Err(Error::from(ErrorKind::AlreadyExists));
        }
        g.entries(td).insert(tname, n);
        Ok(())
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        let mut g = self.lock();
        g.step()?;
        let (dir, name) = g.parent(path)?;
        g.entries(dir).remove(&name).map(|_| ()).ok_or_else(|| Error::from(ErrorKind::NotFound))
    }

    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        let g = self.lock();
        g.up()?;
        match &g.nodes[g.find(path)?] {
            Node::File { data, .. } => Ok(data.clone()),
            Node::Dir { .. } => Err(Error::from(ErrorKind::IsADirectory)),
        }
    }

    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<Entry>> {
        let g = self.lock();
        g.up()?;
        match &g.nodes[g.find(dir)?] {
            Node::Dir { entries, .. } => Ok(entries
                .iter()
                .map(|(name, n)| Entry {
                    name: name.clone(),
                    modified: match &g.nodes[*n] {
                        Node::File { modified, .. } => Some(*modified),
                        Node::Dir { .. } => None,
                    },
                })
                .collect()),
            Node::File { .. } => Err(Error::from(ErrorKind::NotADirectory)),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        let g = self.lock();
        g.find(path).is_ok()
    }
}

impl Fs for std::sync::Arc<CrashFs> {
    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        (**self).write(path, data)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        (**self).sync_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        (**self).sync_dir(dir)
    }
    fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
        (**self).create_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        (**self).rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        (**self).hard_link(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        (**self).remove(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        (**self).read(path)
    }
    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<Entry>> {
        (**self).read_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        (**self).exists(path)
    }
}

/// Which fsyncs a [`Forgetful`] file system leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Files' contents are never made durable.
    FileSyncs,
    /// Directories' names are never made durable.
    DirSyncs,
}

/// A [`CrashFs`] that quietly skips one kind of fsync: a store on it loses what it reported as
/// written at a power cut, which a crash test must notice (proof that the test can fail).
#[derive(Debug)]
pub struct Forgetful {
    /// The file system underneath.
    pub fs: std::sync::Arc<CrashFs>,
    /// The fsyncs it skips.
    pub skip: Skip,
}

impl Fs for Forgetful {
    fn write(&self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        self.fs.write(path, data)
    }
    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        if self.skip == Skip::FileSyncs { Ok(()) } else { self.fs.sync_file(path) }
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        if self.skip == Skip::DirSyncs { Ok(()) } else { self.fs.sync_dir(dir) }
    }
    fn create_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.fs.create_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.fs.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.fs.hard_link(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.fs.remove(path)
    }
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.fs.read(path)
    }
    fn read_dir(&self, dir: &Path) -> std::io::Result<Vec<Entry>> {
        self.fs.read_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.fs.exists(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    #[test]
    fn only_what_was_synced_survives() {
        let fs = CrashFs::new();
        fs.create_dir(p("/r")).unwrap();
        fs.sync_dir(p("/")).unwrap();
        // Durable: written, fsynced, renamed, directory fsynced.
        fs.write(p("/r/.t1"), b"kept").unwrap();
        fs.sync_file(p("/r/.t1")).unwrap();
        fs.rename(p("/r/.t1"), p("/r/a")).unwrap();
        fs.sync_dir(p("/r")).unwrap();
        // Not durable: the contents were never fsynced.
        fs.write(p("/r/b"), b"lost contents").unwrap();
        fs.sync_dir(p("/r")).unwrap();
        // Not durable: renamed but the directory was not fsynced afterwards.
        fs.write(p("/r/.t2"), b"new").unwrap();
        fs.sync_file(p("/r/.t2")).unwrap();
        fs.rename(p("/r/.t2"), p("/r/c")).unwrap();
        // Not durable: a directory whose parent was never fsynced.
        fs.create_dir(p("/r/d")).unwrap();
        fs.crash();
        assert_eq!(fs.read(p("/r/a")).unwrap(), b"kept");
        assert_eq!(fs.read(p("/r/b")).unwrap(), b"", "an unsynced file comes back empty");
        assert!(!fs.exists(p("/r/c")), "renamed, but the directory was not fsynced after");
        assert!(!fs.exists(p("/r/.t2")), "created after the last directory fsync");
        assert!(!fs.exists(p("/r/d")));
    }

    #[test]
    fn the_power_cut_fails_that_step_and_every_one_after() {
        let fs = CrashFs::new();
        fs.cut_after(1);
        fs.create_dir(p("/a")).unwrap();
        assert!(fs.create_dir(p("/b")).is_err());
        assert!(fs.read_dir(p("/")).is_err());
        fs.crash();
        assert!(fs.read_dir(p("/")).unwrap().is_empty(), "/a was never made durable");
        assert_eq!(fs.steps(), 1);
    }
}
