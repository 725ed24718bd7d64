//! vmfsSparse (COWD) snapshot deltas, VMFS 5's `-delta.vmdk` redo logs: header checks, grain
//! lookup, and a writer that builds such deltas for tests and the vSphere simulator.

use std::io::Write;
use std::sync::Arc;

use cbt::ExtentSet;

use crate::error::{Result, VmdkError};
use crate::grains::{EntryFormat, Geometry, GrainTables, SparseExtent};
use crate::io::ReadAt;

/// `COWD` read as a little-endian u32.
pub const COWD_MAGIC: u32 = 0x4457_4F43;
/// Entries per COWD grain table (fixed by the format).
const GTES_PER_GT: u64 = 4096;
/// Header size in bytes.
const HEADER_BYTES: u64 = 2048;

/// The fields of a COWD header that reading needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowdHeader {
    /// The format version (1).
    pub version: u32,
    /// Flags (3 seen).
    pub flags: u32,
    /// Capacity in sectors.
    pub sectors: u32,
    /// Sectors per grain.
    pub grain_size: u32,
    /// Grain directory, in sectors.
    pub gd_offset: u32,
    /// Grain directory entries.
    pub gd_entries: u32,
    /// The next free sector.
    pub free_sector: u32,
}

impl CowdHeader {
    /// Reads and checks a header against a file of `file_len` bytes.
    pub fn parse(b: &[u8; 2048], name: &str, file_len: u64) -> Result<Self> {
        let u = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if u(0) != COWD_MAGIC {
            return Err(VmdkError::corrupt(name, "no COWD magic"));
        }
        let h = Self {
            version: u(4),
            flags: u(8),
            sectors: u(12),
            grain_size: u(16),
            gd_offset: u(20),
            gd_entries: u(24),
            free_sector: u(28),
        };
        let bad = |what: String| Err(VmdkError::corrupt(name, what));
        if h.version != 1 {
            return Err(VmdkError::unsupported(name, format!("COWD version {}", h.version)));
        }
        if h.grain_size == 0 || h.grain_size > 1 << 21 {
            return bad(format!("grain size of {} sectors", h.grain_size));
        }
        // In u128: 2^32 entries x 4096 x 2^21 sectors does not fit a u64 (found by fuzzing).
        let coverage = u128::from(h.gd_entries) * u128::from(GTES_PER_GT) * u128::from(h.grain_size);
        if coverage < u128::from(h.sectors) {
            return bad(format!("{} directory entries cannot cover {} sectors", h.gd_entries, h.sectors));
        }
        let gd_end = u64::from(h.gd_offset) * 512 + u64::from(h.gd_entries) * 4;
        if u64::from(h.gd_offset) * 512 < HEADER_BYTES || gd_end > file_len {
            return bad(format!("grain directory at sector {} lies outside the file", h.gd_offset));
        }
        Ok(h)
    }
}

/// Opens a COWD extent file.
pub(crate) fn open(file: Arc<dyn ReadAt>, name: &str) -> Result<SparseExtent> {
    let mut b = [0u8; 2048];
    file.read_exact_at(&mut b, 0).map_err(|e| VmdkError::io(name, e))?;
    let h = CowdHeader::parse(&b, name, file.len())?;
    let mut raw = vec![0u8; h.gd_entries as usize * 4];
    file.read_exact_at(&mut raw, u64::from(h.gd_offset) * 512).map_err(|e| VmdkError::io(name, e))?;
    let offsets: Vec<Option<u64>> = raw
        .chunks_exact(4)
        .map(|c| Some(u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))).filter(|&s| s != 0).map(|s| s * 512))
        .collect();
    let geometry = Geometry {
        grain_bytes: u64::from(h.grain_size) * 512,
        entries_per_table: GTES_PER_GT,
        capacity: u64::from(h.sectors) * 512,
        data_start: u64::from(h.gd_offset) * 512 + raw.len() as u64,
    };
    let tables = GrainTables::load(&*file, name, geometry, EntryFormat::Cowd, &offsets)?;
    Ok(SparseExtent { file, name: name.to_owned(), tables: Arc::new(tables), markers: false })
}

/// What a delta holds: whole grains around `written`, taken from `view`, the full contents the
/// disk has with the delta applied.
#[derive(Debug, Clone, Copy)]
pub struct DeltaContent<'a> {
    /// The disk's full contents with this delta applied (a raw image).
    pub view: &'a dyn ReadAt,
    /// The capacity in bytes (a multiple of 512).
    pub capacity: u64,
    /// The bytes this delta holds; widened to whole grains, whose other bytes come from `view`.
    pub written: &'a ExtentSet,
    /// Bytes this delta marks as zeros without storing them (SEsparse only; COWD stores zeros).
    pub zeroed: &'a ExtentSet,
}

/// Writes a COWD delta with grains of `grain_sectors` sectors (ESX uses 1).
pub fn write(out: &mut impl Write, content: DeltaContent<'_>, grain_sectors: u32) -> Result<()> {
    let io = |e| VmdkError::io("COWD delta", e);
    let sectors = u32::try_from(content.capacity / 512)
        .map_err(|_| VmdkError::unsupported("COWD delta", "capacity of 2 TiB or more (use SEsparse)"))?;
    let grain_bytes = u64::from(grain_sectors.max(1)) * 512;
    let g = std::num::NonZeroU64::new(grain_bytes).unwrap_or(std::num::NonZeroU64::MIN);
    // COWD has no zero grains: zeroed bytes are stored as data.
    let present = content.written.union(content.zeroed).align_outward(g, content.capacity);
    let grains: Vec<u64> =
        present.iter().flat_map(|e| e.start() / grain_bytes..e.end().div_ceil(grain_bytes)).collect();
    let coverage = GTES_PER_GT * grain_bytes;
    let gd_entries = content.capacity.div_ceil(coverage).max(1);
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    let mut tables: Vec<u64> = grains.iter().map(|g| g / GTES_PER_GT).collect();
    tables.dedup();
    let gt_sectors = GTES_PER_GT * 4 / 512;
    let tables_start = 4 + gd_sectors;
    let grains_start = tables_start + tables.len() as u64 * gt_sectors;
    let end_sector = grains_start + grains.len() as u64 * (grain_bytes / 512);
    let too_big = || VmdkError::unsupported("COWD delta", "more than 2^32 sectors of metadata and grains");
    let mut header = [0u8; 2048];
    let mut put = |o: usize, v: u32| header[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put(0, COWD_MAGIC);
    put(4, 1);
    put(8, 3);
    put(12, sectors);
    put(16, grain_sectors.max(1));
    put(20, 4);
    put(24, u32::try_from(gd_entries).map_err(|_| too_big())?);
    put(28, u32::try_from(end_sector).map_err(|_| too_big())?);
    put(1060, 1);
    out.write_all(&header).map_err(io)?;
    let mut gd = vec![0u8; usize::try_from(gd_sectors * 512).map_err(|_| too_big())?];
    for (i, t) in tables.iter().enumerate() {
        let sector = u32::try_from(tables_start + i as u64 * gt_sectors).map_err(|_| too_big())?;
        gd[crate::to_usize(*t) * 4..][..4].copy_from_slice(&sector.to_le_bytes());
    }
    out.write_all(&gd).map_err(io)?;
    for t in &tables {
        let mut gt = vec![0u8; crate::to_usize(GTES_PER_GT * 4)];
        for (k, grain) in grains.iter().enumerate().filter(|(_, g)| *g / GTES_PER_GT == *t) {
            let sector = u32::try_from(grains_start + k as u64 * (grain_bytes / 512)).map_err(|_| too_big())?;
            gt[crate::to_usize(grain % GTES_PER_GT) * 4..][..4].copy_from_slice(&sector.to_le_bytes());
        }
        out.write_all(&gt).map_err(io)?;
    }
    write_grains(out, content, &grains, grain_bytes)
}

/// Writes each grain's bytes from the view (zeros past the capacity).
pub(crate) fn write_grains(
    out: &mut impl Write,
    content: DeltaContent<'_>,
    grains: &[u64],
    grain_bytes: u64,
) -> Result<()> {
    let mut buf = vec![0u8; usize::try_from(grain_bytes).unwrap_or(0)];
    for &grain in grains {
        let start = grain * grain_bytes;
        let len = grain_bytes.min(content.capacity - start);
        buf.fill(0);
        content
            .view
            .read_exact_at(&mut buf[..crate::to_usize(len)], start)
            .map_err(|e| VmdkError::io("delta source", e))?;
        out.write_all(&buf).map_err(|e| VmdkError::io("delta", e))?;
    }
    Ok(())
}
