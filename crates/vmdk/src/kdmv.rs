//! Hosted sparse extents (`KDMV`): monolithicSparse, twoGbMaxExtentSparse pieces and
//! streamOptimized files read at random through the footer's grain directory.
//!
//! Every header field is checked against the file before anything is allocated from it. The
//! primary grain directory is used unless it is damaged (a table or grain outside the file, or
//! inside the metadata), in which case the redundant copy is. When both copies are valid but
//! disagree, the primary wins: comparing them would double the metadata read at every open.
//! Flag bits this crate does not know are ignored, as qemu ignores them.

use std::sync::Arc;

use crate::descriptor::Descriptor;
use crate::error::{Result, VmdkError};
use crate::grains::{EntryFormat, Geometry, GrainTables, SparseExtent};
use crate::io::ReadAt;

/// `KDMV` read as a little-endian u32.
pub const KDMV_MAGIC: u32 = 0x564D_444B;
/// The grain directory is in the footer (streamOptimized).
pub const GD_AT_END: u64 = u64::MAX;
/// Flag: newline detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1;
/// Flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: a table entry of 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are deflated.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: grains and metadata are preceded by markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Largest grain qemu accepts: 2^21 sectors (1 GiB).
const MAX_GRAIN_SECTORS: u64 = 1 << 21;
/// Most grain directory entries (qemu's L1 cap).
const MAX_GD_ENTRIES: u64 = 32 << 20;

/// The 512-byte header (or footer) of a hosted sparse extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 or 3.
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_size: u64,
    /// Embedded descriptor position, in sectors (0 if none).
    pub descriptor_offset: u64,
    /// Embedded descriptor size, in sectors.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Redundant grain directory, in sectors.
    pub rgd_offset: u64,
    /// Primary grain directory, in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// Whether the file was not closed cleanly.
    pub unclean_shutdown: bool,
    /// 0 none, 1 deflate.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Reads a header from its 512 bytes; checks the magic and the fields that need no file.
    pub fn parse(b: &[u8; 512], name: &str) -> Result<Self> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        if u32_at(0) != KDMV_MAGIC {
            return Err(VmdkError::corrupt(name, "no KDMV magic"));
        }
        let h = SparseHeader {
            version: u32_at(4),
            flags: u32_at(8),
            capacity: u64_at(12),
            grain_size: u64_at(20),
            descriptor_offset: u64_at(28),
            descriptor_size: u64_at(36),
            gtes_per_gt: u32_at(44),
            rgd_offset: u64_at(48),
            gd_offset: u64_at(56),
            overhead: u64_at(64),
            unclean_shutdown: b[72] != 0,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(VmdkError::unsupported(name, format!("sparse header version {}", h.version)));
        }
        if h.compress_algorithm > 1 {
            return Err(VmdkError::unsupported(name, format!("compression algorithm {}", h.compress_algorithm)));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress_algorithm != 1 {
            return Err(VmdkError::unsupported(name, "compressed grains without deflate"));
        }
        Ok(h)
    }

    /// The header as 512 bytes.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&KDMV_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Checks the geometry against a file of `file_len` bytes; returns the number of grain
    /// directory entries.
    fn check(&self, name: &str, file_len: u64) -> Result<u64> {
        let bad = |what: String| Err(VmdkError::corrupt(name, what));
        let g = self.grain_size;
        if !g.is_power_of_two() || !(8..=MAX_GRAIN_SECTORS).contains(&g) {
            return bad(format!("grain size {g} sectors is not a power of two from 8 to {MAX_GRAIN_SECTORS}"));
        }
        if !(1..=512).contains(&self.gtes_per_gt) {
            return bad(format!("{} entries per grain table (1 to 512 allowed)", self.gtes_per_gt));
        }
        let coverage = u64::from(self.gtes_per_gt) * g;
        let gd_entries = self.capacity.div_ceil(coverage);
        if gd_entries > MAX_GD_ENTRIES || self.capacity > crate::descriptor::MAX_DISK_SECTORS {
            return bad(format!("capacity of {} sectors is too large", self.capacity));
        }
        let file_sectors = file_len / 512;
        if self.overhead > file_sectors {
            return bad(format!(
                "metadata of {} sectors is longer than the file ({file_sectors} sectors)",
                self.overhead
            ));
        }
        if self.descriptor_offset != 0
            && self.descriptor_offset.checked_add(self.descriptor_size).is_none_or(|end| end > file_sectors)
        {
            return bad("the embedded descriptor lies outside the file".into());
        }
        Ok(gd_entries)
    }
}

/// A hosted sparse extent, opened.
#[derive(Debug, Clone)]
pub struct KdmvExtent {
    pub(crate) header: SparseHeader,
    pub(crate) extent: SparseExtent,
    pub(crate) descriptor: Option<Descriptor>,
    /// What was odd but readable (a damaged primary directory, say).
    pub(crate) warnings: Vec<String>,
}

impl KdmvExtent {
    /// Opens a hosted sparse file as an extent that a descriptor names (a piece of a split
    /// disk): its own embedded descriptor, if any, is not the one that counts, so a broken one
    /// is only a warning.
    pub fn open(file: Arc<dyn ReadAt>, name: &str) -> Result<Self> {
        Self::open_as(file, name, false)
    }

    /// Opens a hosted sparse file that stands for a whole layer (a monolithicSparse or
    /// streamOptimized file, or a delta): its embedded descriptor carries the CID and the link
    /// to a parent, so one the header points at must be readable. Read past it, a delta would
    /// lose its parent and read as zeros where the parent holds data.
    pub fn open_layer(file: Arc<dyn ReadAt>, name: &str) -> Result<Self> {
        Self::open_as(file, name, true)
    }

    fn open_as(file: Arc<dyn ReadAt>, name: &str, layer: bool) -> Result<Self> {
        let file_len = file.len();
        let mut first = [0u8; 512];
        file.read_exact_at(&mut first, 0).map_err(|e| VmdkError::io(name, e))?;
        let mut header = SparseHeader::parse(&first, name)?;
        let mut warnings = Vec::new();
        let descriptor = match read_embedded_descriptor(&*file, &header, name) {
            Ok(d) => d,
            Err(e) if layer => return Err(e),
            Err(e) => {
                warnings.push(format!("embedded descriptor ignored: {e}"));
                None
            }
        };
        if header.gd_offset == GD_AT_END {
            header = read_footer(&*file, name)?;
        }
        if header.capacity == 0 {
            // A descriptor-only file: the caller opens the descriptor instead.
            return Err(VmdkError::unsupported(name, "sparse file with capacity 0 (descriptor only)"));
        }
        let gd_entries = header.check(name, file_len)?;
        let compressed = header.flags & FLAG_COMPRESSED != 0;
        let geometry = Geometry {
            grain_bytes: header.grain_size * 512,
            entries_per_table: u64::from(header.gtes_per_gt),
            capacity: header.capacity * 512,
            data_start: header.overhead.max(1) * 512,
        };
        let format =
            EntryFormat::Kdmv { zero_grain: header.flags & FLAG_ZERO_GRAIN != 0 && header.version >= 2, compressed };
        let load = |gd_sector: u64| -> Result<GrainTables> {
            let offsets = read_directory(&*file, name, gd_sector, gd_entries)?;
            GrainTables::load(&*file, name, geometry, format, &offsets)
        };
        // The redundant copy is a fallback whenever it exists, whether or not FLAG_RGD says to
        // prefer it.
        let has_rgd = header.rgd_offset != 0;
        let tables = match load(header.gd_offset) {
            Ok(t) => t,
            Err(primary) if has_rgd => match load(header.rgd_offset) {
                Ok(t) => {
                    warnings.push(format!("primary grain directory is damaged ({primary}); using the redundant copy"));
                    t
                }
                Err(_) => return Err(primary),
            },
            Err(primary) => return Err(primary),
        };
        let markers = header.flags & FLAG_MARKERS != 0;
        let extent = SparseExtent { file, name: name.to_owned(), tables: Arc::new(tables), markers };
        Ok(Self { header, extent, descriptor, warnings })
    }

    /// The header in effect (the footer's, for streamOptimized files).
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The embedded descriptor, when the file has one.
    pub fn descriptor(&self) -> Option<&Descriptor> {
        self.descriptor.as_ref()
    }
}

/// The directory's table offsets in bytes (`None` for empty entries).
fn read_directory(file: &dyn ReadAt, name: &str, gd_sector: u64, entries: u64) -> Result<Vec<Option<u64>>> {
    let bytes = entries * 4;
    let start = gd_sector.checked_mul(512).filter(|&s| s >= 512);
    let Some(start) = start.filter(|s| s.checked_add(bytes).is_some_and(|end| end <= file.len())) else {
        return Err(VmdkError::corrupt(
            name,
            format!("grain directory at sector {gd_sector} ({entries} entries) lies outside the file"),
        ));
    };
    let mut raw = vec![0u8; usize::try_from(bytes).map_err(|_| VmdkError::corrupt(name, "grain directory too large"))?];
    file.read_exact_at(&mut raw, start).map_err(|e| VmdkError::io(name, e))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| {
            let sector = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            (sector != 0).then(|| u64::from(sector) * 512)
        })
        .collect())
}

/// The footer of a streamOptimized file: footer marker, footer, end-of-stream marker.
fn read_footer(file: &dyn ReadAt, name: &str) -> Result<SparseHeader> {
    let len = file.len();
    if len < 1536 + 512 {
        return Err(VmdkError::corrupt(name, "too short for a streamOptimized footer"));
    }
    let mut tail = [0u8; 1536];
    file.read_exact_at(&mut tail, len - 1536).map_err(|e| VmdkError::io(name, e))?;
    let marker = |b: &[u8]| {
        (
            u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
            u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
            u32::from_le_bytes(b[12..16].try_into().unwrap_or_default()),
        )
    };
    let (_, fsize, ftype) = marker(&tail[..512]);
    let (eval, esize, etype) = marker(&tail[1024..]);
    if fsize != 0 || ftype != 3 || eval != 0 || esize != 0 || etype != 0 {
        return Err(VmdkError::corrupt(name, "the streamOptimized footer or end-of-stream marker is missing"));
    }
    let footer: &[u8; 512] = tail[512..1024].try_into().map_err(|_| VmdkError::corrupt(name, "footer"))?;
    let header = SparseHeader::parse(footer, name)?;
    if header.gd_offset == GD_AT_END {
        return Err(VmdkError::corrupt(name, "the footer does not say where the grain directory is"));
    }
    Ok(header)
}

fn read_embedded_descriptor(file: &dyn ReadAt, header: &SparseHeader, name: &str) -> Result<Option<Descriptor>> {
    if header.descriptor_offset == 0 || header.descriptor_size == 0 {
        return Ok(None);
    }
    let bytes = header
        .descriptor_size
        .checked_mul(512)
        .filter(|&b| b <= crate::descriptor::MAX_DESCRIPTOR_BYTES as u64)
        .ok_or_else(|| VmdkError::corrupt(name, "embedded descriptor is too large"))?;
    let start =
        header.descriptor_offset.checked_mul(512).filter(|s| s.checked_add(bytes).is_some_and(|e| e <= file.len()));
    let Some(start) = start else {
        return Err(VmdkError::corrupt(name, "the embedded descriptor lies outside the file"));
    };
    let mut raw = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
    file.read_exact_at(&mut raw, start).map_err(|e| VmdkError::io(name, e))?;
    let text = crate::descriptor::decode_text(&raw, name)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    Descriptor::parse(&text, name).map(Some)
}
