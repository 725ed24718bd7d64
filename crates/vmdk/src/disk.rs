//! A virtual disk as a chain of layers: the descriptor (or sparse file) named by the caller, its
//! extents, and its parents through `parentFileNameHint`, each checked by CID. Reads fall
//! through a layer's unallocated grains to its parent; zeroed grains stop there. The files come
//! through [`Files`]: the local file system, or anything else that reads at offsets (a
//! datastore over HTTPS).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cbt::ExtentSet;

use crate::descriptor::{Descriptor, ExtentKind, NO_PARENT_CID};
use crate::error::{Result, VmdkError};
use crate::grains::{Run, SparseExtent};
use crate::io::ReadAt;
use crate::kdmv::{KDMV_MAGIC, KdmvExtent};

/// Deepest chain opened (vSphere allows 32 snapshots).
pub const MAX_CHAIN_DEPTH: usize = 32;

/// How far file names in descriptors may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathPolicy {
    /// Only names inside the directory of the descriptor that names them (no absolute paths,
    /// no `..`): the safe choice for files that came from elsewhere.
    #[default]
    SameDirectory,
    /// Any path; for trusted local chains only.
    Anywhere,
}

/// Where a chain's files come from.
pub trait Files {
    /// Opens `path` for positioned reads.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>>;

    /// One name for every path that leads to the same file, so a chain that loops is caught.
    fn identity(&self, path: &Path) -> io::Result<PathBuf>;
}

/// The local file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalFiles;

impl Files for LocalFiles {
    fn open(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(File::open(path)?))
    }

    fn identity(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
}

/// One layer of a chain.
#[derive(Debug)]
pub struct Layer {
    /// The file that was opened for this layer.
    pub path: PathBuf,
    /// Its descriptor (embedded or standalone), when it has one.
    pub descriptor: Option<Descriptor>,
    /// What kind of file it is (`monolithicSparse`, `streamOptimized`, `vmfsSparse`, ...).
    pub create_type: String,
    /// The extents in order.
    pub extents: Vec<LayerExtent>,
    /// What was odd but readable.
    pub warnings: Vec<String>,
}

/// One extent of a layer.
#[derive(Debug)]
pub struct LayerExtent {
    /// Where it starts in the virtual disk, in bytes.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its kind as the descriptor names it.
    pub kind: ExtentKind,
    /// The file, if any.
    pub file: Option<PathBuf>,
    source: Source,
}

#[derive(Debug)]
enum Source {
    Flat { file: Arc<dyn ReadAt>, name: String, offset: u64 },
    Zero,
    Sparse(SparseExtent),
}

/// Where a disk's bytes are, across the chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allocation {
    /// Bytes that may hold data (read them).
    pub data: ExtentSet,
    /// Bytes a layer marks as zeros.
    pub zero: ExtentSet,
}

/// An opened virtual disk: the top layer first, then its parents.
#[derive(Debug)]
pub struct Disk {
    layers: Vec<Layer>,
    capacity: u64,
}

impl Disk {
    /// Opens the disk at `path` (a descriptor, or a monolithicSparse or streamOptimized file),
    /// with its parents.
    pub fn open(path: impl AsRef<Path>, policy: PathPolicy) -> Result<Self> {
        Self::open_in(&LocalFiles, path, policy)
    }

    /// Opens the disk at `path` with its parents, every file read through `files`.
    pub fn open_in(files: &dyn Files, path: impl AsRef<Path>, policy: PathPolicy) -> Result<Self> {
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let mut next = Some(path.as_ref().to_path_buf());
        let mut expected_cid: Option<(u32, String)> = None;
        while let Some(path) = next.take() {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(VmdkError::unsupported(
                    &path.display().to_string(),
                    format!("a chain deeper than {MAX_CHAIN_DEPTH}"),
                ));
            }
            let canonical = files.identity(&path).map_err(|e| VmdkError::io(&path.display().to_string(), e))?;
            if !seen.insert(canonical) {
                return Err(VmdkError::corrupt(&path.display().to_string(), "the parent chain loops back on itself"));
            }
            let layer = open_layer(files, &path, policy)?;
            let name = path.display().to_string();
            if let Some((cid, child)) = expected_cid.take() {
                let actual = layer.descriptor.as_ref().and_then(Descriptor::cid);
                if actual != Some(cid) {
                    return Err(VmdkError::CidMismatch {
                        child,
                        parent: name,
                        expected: cid,
                        actual: actual.unwrap_or(0),
                    });
                }
            }
            if let Some(d) = &layer.descriptor
                && d.parent_cid() != NO_PARENT_CID
            {
                let hint = d
                    .parent_file_name_hint()
                    .ok_or_else(|| VmdkError::corrupt(&name, "has a parentCID but no parentFileNameHint"))?;
                next = Some(resolve(files, &path, hint, policy)?);
                expected_cid = Some((d.parent_cid(), name.clone()));
            }
            layers.push(layer);
        }
        let capacity = layers[0].extents.iter().map(|e| e.len).sum();
        for l in &layers[1..] {
            let c: u64 = l.extents.iter().map(|e| e.len).sum();
            if c != capacity {
                return Err(VmdkError::unsupported(
                    &l.path.display().to_string(),
                    format!("a parent of {c} bytes under a child of {capacity} bytes"),
                ));
            }
        }
        Ok(Self { layers, capacity })
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The layers, top (the file opened) first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Fills `buf` with the disk's bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.capacity);
        if end.is_none() {
            return Err(VmdkError::corrupt(
                &self.layers[0].path.display().to_string(),
                format!("read of {} bytes at {offset} runs past the capacity {}", buf.len(), self.capacity),
            ));
        }
        self.read_layer(0, buf, offset)
    }

    fn read_layer(&self, level: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let layer = &self.layers[level];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = layer.extents.partition_point(|e| e.start + e.len <= pos);
            let Some(ext) = layer.extents.get(i) else {
                buf[done..].fill(0);
                return Ok(());
            };
            let rel = pos - ext.start;
            let max = usize::try_from(ext.len - rel).unwrap_or(usize::MAX).min(buf.len() - done);
            let chunk = &mut buf[done..done + max];
            let n = match &ext.source {
                Source::Zero => {
                    chunk.fill(0);
                    max
                }
                Source::Flat { file, name, offset: base } => {
                    read_flat(&**file, name, base.saturating_add(rel), chunk)?;
                    max
                }
                Source::Sparse(s) => match s.read_run(rel, chunk)? {
                    Run::Data(n) | Run::Zero(n) => n,
                    Run::Unallocated(n) => {
                        if level + 1 < self.layers.len() {
                            self.read_layer(level + 1, &mut chunk[..n], pos)?;
                        } else {
                            chunk[..n].fill(0);
                        }
                        n
                    }
                },
            };
            if n == 0 {
                return Err(VmdkError::corrupt(
                    &layer.path.display().to_string(),
                    format!("no progress reading at {pos}"),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Which bytes may hold data and which are marked zero, across the chain.
    pub fn allocation(&self) -> Result<Allocation> {
        let mut data = ExtentSet::new();
        let mut zero = ExtentSet::new();
        let mut covered = ExtentSet::new();
        for layer in &self.layers {
            let (d, z) = layer.allocation()?;
            data = data.union(&d.difference(&covered));
            zero = zero.union(&z.difference(&covered));
            covered = covered.union(&d).union(&z);
        }
        Ok(Allocation { data, zero })
    }

    /// Warnings from every layer.
    pub fn warnings(&self) -> Vec<String> {
        self.layers.iter().flat_map(|l| l.warnings.iter().cloned()).collect()
    }
}

impl Layer {
    /// This layer's own data and zero bytes (not its parents').
    fn allocation(&self) -> Result<(ExtentSet, ExtentSet)> {
        let mut data = Vec::new();
        let mut zero = Vec::new();
        for e in &self.extents {
            match &e.source {
                Source::Zero => zero.push((e.start, e.len)),
                Source::Flat { file, name, offset } => {
                    let end = offset.saturating_add(e.len).min(file.len());
                    match file.data_ranges(*offset, end).map_err(|err| VmdkError::io(name, err))? {
                        Some(ranges) => data.extend(ranges.into_iter().map(|(s, t)| (e.start + s - offset, t - s))),
                        None => data.push((e.start, end.saturating_sub(*offset))),
                    }
                }
                Source::Sparse(s) => {
                    let (d, z) = s.allocation(e.len);
                    data.extend(d.into_iter().map(|(start, len)| (e.start + start, len)));
                    zero.extend(z.into_iter().map(|(start, len)| (e.start + start, len)));
                }
            }
        }
        Ok((ExtentSet::from_ranges(data), ExtentSet::from_ranges(zero)))
    }
}

/// Reads a flat extent; bytes past the end of a shorter file read as zeros, as qemu reads them.
fn read_flat(file: &dyn ReadAt, name: &str, at: u64, buf: &mut [u8]) -> Result<()> {
    let len = file.len();
    let avail = usize::try_from(len.saturating_sub(at)).unwrap_or(usize::MAX).min(buf.len());
    file.read_exact_at(&mut buf[..avail], at).map_err(|e| VmdkError::io(name, e))?;
    buf[avail..].fill(0);
    Ok(())
}

fn open_layer(files: &dyn Files, path: &Path, policy: PathPolicy) -> Result<Layer> {
    let open_file = |p: &Path| files.open(p).map_err(|e| VmdkError::io(&p.display().to_string(), e));
    let name = path.display().to_string();
    let file = open_file(path)?;
    let mut magic = [0u8; 4];
    let len = file.len();
    if len >= 4 {
        file.read_exact_at(&mut magic, 0).map_err(|e| VmdkError::io(&name, e))?;
    }
    match u32::from_le_bytes(magic) {
        KDMV_MAGIC => {
            let k = KdmvExtent::open_layer(file.clone(), &name)?;
            let create_type = k.descriptor().map_or("monolithicSparse", Descriptor::create_type).to_owned();
            let len = k.header.capacity * 512;
            let extent = LayerExtent {
                start: 0,
                len,
                kind: ExtentKind::Sparse,
                file: Some(path.to_path_buf()),
                source: Source::Sparse(k.extent),
            };
            Ok(Layer {
                path: path.to_path_buf(),
                descriptor: k.descriptor,
                create_type,
                extents: vec![extent],
                warnings: k.warnings,
            })
        }
        crate::cowd::COWD_MAGIC => {
            Err(VmdkError::unsupported(&name, "a COWD delta extent: open the descriptor that names it"))
        }
        _ if magic == crate::sesparse::CONST_MAGIC.to_le_bytes()[..4] => {
            Err(VmdkError::unsupported(&name, "an SEsparse delta extent: open the descriptor that names it"))
        }
        _ => {
            if len > crate::descriptor::MAX_DESCRIPTOR_BYTES as u64 {
                return Err(VmdkError::corrupt(&name, "neither a sparse file nor a descriptor (too large for one)"));
            }
            let mut raw = vec![0u8; crate::to_usize(len)];
            file.read_exact_at(&mut raw, 0).map_err(|e| VmdkError::io(&name, e))?;
            let text = crate::descriptor::decode_text(&raw, &name)?;
            let descriptor = Descriptor::parse(&text, &name)?;
            let mut extents = Vec::new();
            let mut warnings = Vec::new();
            let mut start = 0u64;
            for line in &descriptor.extents {
                let len = line.sectors * 512;
                let file_path = line.file.as_deref().map(|f| resolve(files, path, f, policy)).transpose()?;
                let ext_name = file_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                let source = match (line.kind, &file_path) {
                    (ExtentKind::Zero, _) => Source::Zero,
                    (ExtentKind::Flat | ExtentKind::Vmfs, Some(p)) => Source::Flat {
                        file: open_file(p)?,
                        name: ext_name.clone(),
                        offset: line.offset.unwrap_or(0).saturating_mul(512),
                    },
                    (ExtentKind::Sparse, Some(p)) => {
                        let k = KdmvExtent::open(open_file(p)?, &ext_name)?;
                        if k.header.capacity * 512 < len {
                            return Err(VmdkError::corrupt(
                                &ext_name,
                                format!(
                                    "holds {} sectors, but the descriptor gives it {}",
                                    k.header.capacity, line.sectors
                                ),
                            ));
                        }
                        warnings.extend(k.warnings);
                        Source::Sparse(k.extent)
                    }
                    (ExtentKind::VmfsSparse, Some(p)) => Source::Sparse(crate::cowd::open(open_file(p)?, &ext_name)?),
                    (ExtentKind::SeSparse, Some(p)) => Source::Sparse(crate::sesparse::open(open_file(p)?, &ext_name)?),
                    (kind, _) => {
                        return Err(VmdkError::unsupported(
                            &name,
                            format!("{} extents (raw devices and vSAN): read them through VDDK", kind.keyword()),
                        ));
                    }
                };
                if let Source::Sparse(s) = &source
                    && s.tables.geometry().capacity < len
                {
                    return Err(VmdkError::corrupt(
                        &ext_name,
                        format!("covers {} bytes, but the descriptor gives it {len}", s.tables.geometry().capacity),
                    ));
                }
                extents.push(LayerExtent { start, len, kind: line.kind, file: file_path, source });
                start += len;
            }
            let create_type = descriptor.create_type().to_owned();
            Ok(Layer { path: path.to_path_buf(), descriptor: Some(descriptor), create_type, extents, warnings })
        }
    }
}

/// A file name from a descriptor, resolved against the directory of `from`, within `policy`.
/// Under [`PathPolicy::SameDirectory`] the name must stay inside that directory both as written
/// (no absolute path, no `..`) and as the file system resolves it: a symbolic link (the file or
/// a directory on the way) that leads out is refused too.
fn resolve(files: &dyn Files, from: &Path, name: &str, policy: PathPolicy) -> Result<PathBuf> {
    let refuse = |why: String| VmdkError::Path { file: from.display().to_string(), name: name.to_owned(), why };
    if name.chars().any(char::is_control) {
        return Err(refuse("it contains a control character".into()));
    }
    let candidate = Path::new(name);
    let dir = from.parent().unwrap_or(Path::new("."));
    let joined = dir.join(candidate);
    if policy == PathPolicy::SameDirectory {
        if candidate.is_absolute() {
            return Err(refuse("absolute paths are not followed (PathPolicy::SameDirectory)".into()));
        }
        if candidate.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(refuse("`..` is not followed (PathPolicy::SameDirectory)".into()));
        }
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let home = files.identity(dir).map_err(|e| VmdkError::io(&dir.display().to_string(), e))?;
        let target = files.identity(&joined).map_err(|e| VmdkError::io(&joined.display().to_string(), e))?;
        // A name that resolves to itself was not redirected: as written, it is inside.
        if target != joined && !target.starts_with(&home) {
            return Err(refuse(format!(
                "it leads to {} through a symbolic link, outside {} (PathPolicy::SameDirectory; --any-path \
                 follows it)",
                target.display(),
                home.display()
            )));
        }
    }
    Ok(joined)
}
