//! SEsparse snapshot deltas (VMFS 6, and disks of 2 TiB and more): the constant and volatile
//! headers with every check qemu makes, grain lookup, and a writer for tests and the simulator.
//!
//! The format is not documented by VMware; the facts here are those qemu relies on.

use std::io::Write;
use std::sync::Arc;

use crate::cowd::DeltaContent;
use crate::error::{Result, VmdkError};
use crate::grains::{EntryFormat, Geometry, GrainTables, SparseExtent};
use crate::io::ReadAt;

/// The constant header's magic.
pub const CONST_MAGIC: u64 = 0xCAFE_BABE;
/// The volatile header's magic.
pub const VOLATILE_MAGIC: u64 = 0xCAFE_CAFE;
/// The only version qemu reads.
pub const VERSION: u64 = 0x0000_0002_0000_0001;
/// Sectors per grain (fixed: 4 KiB).
const GRAIN_SECTORS: u64 = 8;
/// Sectors per grain table (fixed: 4096 u64 entries).
const GT_SECTORS: u64 = 64;
const GTES_PER_GT: u64 = GT_SECTORS * 512 / 8;

/// The constant header's offsets and sizes, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeSparseHeader {
    /// Capacity in sectors.
    pub capacity: u64,
    /// Volatile header position and size.
    pub volatile_header: (u64, u64),
    /// Journal header position and size.
    pub journal_header: (u64, u64),
    /// Journal position and size.
    pub journal: (u64, u64),
    /// Grain directory position and size.
    pub grain_dir: (u64, u64),
    /// Grain tables position and size.
    pub grain_tables: (u64, u64),
    /// Free bitmap position and size.
    pub free_bitmap: (u64, u64),
    /// Back map position and size.
    pub backmap: (u64, u64),
    /// Grains position and size.
    pub grains: (u64, u64),
}

impl SeSparseHeader {
    /// Reads the constant header, enforcing every constant.
    pub fn parse(b: &[u8; 512], name: &str) -> Result<Self> {
        let q = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        if q(0) != CONST_MAGIC {
            return Err(VmdkError::corrupt(name, "no SEsparse magic"));
        }
        let unsupported = |what: String| Err(VmdkError::unsupported(name, what));
        if q(1) != VERSION {
            return unsupported(format!("SEsparse version {:#018x}", q(1)));
        }
        if q(3) != GRAIN_SECTORS || q(4) != GT_SECTORS {
            return unsupported(format!("grain size {} and grain table size {} (8 and 64 expected)", q(3), q(4)));
        }
        if q(5) != 0 || (6..10).any(|i| q(i) != 0) || b[208..].iter().any(|&x| x != 0) {
            return unsupported("non-zero flags, reserved fields or padding".into());
        }
        Ok(Self {
            capacity: q(2),
            volatile_header: (q(10), q(11)),
            journal_header: (q(12), q(13)),
            journal: (q(14), q(15)),
            grain_dir: (q(16), q(17)),
            grain_tables: (q(18), q(19)),
            free_bitmap: (q(20), q(21)),
            backmap: (q(22), q(23)),
            grains: (q(24), q(25)),
        })
    }

    fn to_bytes(self) -> [u8; 512] {
        let mut b = [0u8; 512];
        let fields = [
            CONST_MAGIC,
            VERSION,
            self.capacity,
            GRAIN_SECTORS,
            GT_SECTORS,
            0,
            0,
            0,
            0,
            0,
            self.volatile_header.0,
            self.volatile_header.1,
            self.journal_header.0,
            self.journal_header.1,
            self.journal.0,
            self.journal.1,
            self.grain_dir.0,
            self.grain_dir.1,
            self.grain_tables.0,
            self.grain_tables.1,
            self.free_bitmap.0,
            self.free_bitmap.1,
            self.backmap.0,
            self.backmap.1,
            self.grains.0,
            self.grains.1,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Opens an SEsparse extent file.
pub(crate) fn open(file: Arc<dyn ReadAt>, name: &str) -> Result<SparseExtent> {
    let len = file.len();
    let mut b = [0u8; 512];
    file.read_exact_at(&mut b, 0).map_err(|e| VmdkError::io(name, e))?;
    let h = SeSparseHeader::parse(&b, name)?;
    let corrupt = |what: String| VmdkError::corrupt(name, what);
    let inside = |(offset, size): (u64, u64)| {
        offset.checked_add(size).and_then(|e| e.checked_mul(512)).is_some_and(|e| e <= len)
    };
    let mut v = [0u8; 512];
    if !inside((h.volatile_header.0, 1)) {
        return Err(corrupt("the volatile header lies outside the file".into()));
    }
    file.read_exact_at(&mut v, h.volatile_header.0 * 512).map_err(|e| VmdkError::io(name, e))?;
    let vq = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    if vq(0) != VOLATILE_MAGIC {
        return Err(corrupt("no SEsparse volatile header magic".into()));
    }
    if vq(3) != 0 {
        return Err(VmdkError::unsupported(
            name,
            "the journal needs replaying (the image is dirty); read it through VDDK",
        ));
    }
    if v[32..].iter().any(|&x| x != 0) {
        return Err(VmdkError::unsupported(name, "non-zero volatile header padding"));
    }
    if h.capacity > crate::descriptor::MAX_DISK_SECTORS {
        return Err(corrupt(format!("capacity of {} sectors is too large", h.capacity)));
    }
    let gd_entries = h.grain_dir.1.saturating_mul(512 / 8);
    let needed = h.capacity.div_ceil(GTES_PER_GT * GRAIN_SECTORS);
    if gd_entries < needed || !inside(h.grain_dir) {
        return Err(corrupt(format!(
            "grain directory ({} sectors at {}) cannot cover the disk or lies outside the file",
            h.grain_dir.1, h.grain_dir.0
        )));
    }
    let mut raw = vec![0u8; usize::try_from(needed * 8).map_err(|_| corrupt("grain directory too large".into()))?];
    file.read_exact_at(&mut raw, h.grain_dir.0 * 512).map_err(|e| VmdkError::io(name, e))?;
    let mut offsets = Vec::with_capacity(raw.len() / 8);
    for (i, c) in raw.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(c.try_into().unwrap_or_default());
        if e == 0 {
            offsets.push(None);
            continue;
        }
        if e & 0xFFFF_FFFF_0000_0000 != 0x1000_0000_0000_0000 {
            return Err(corrupt(format!("grain directory entry {i} is {e:#018x}")));
        }
        let sector = (e & 0xFFFF_FFFF)
            .checked_mul(GT_SECTORS)
            .and_then(|s| s.checked_add(h.grain_tables.0))
            .filter(|&s| s <= 0xFFFF_FFFF)
            .ok_or_else(|| corrupt(format!("grain table {i} lies beyond what qemu can address")))?;
        offsets.push(Some(sector * 512));
    }
    let data_start = h
        .grains
        .0
        .max(1)
        .checked_mul(512)
        .ok_or_else(|| corrupt(format!("grains at sector {} overflow", h.grains.0)))?;
    let geometry = Geometry {
        grain_bytes: GRAIN_SECTORS * 512,
        entries_per_table: GTES_PER_GT,
        capacity: h.capacity * 512,
        data_start,
    };
    let tables =
        GrainTables::load(&*file, name, geometry, EntryFormat::SeSparse { grains_offset: h.grains.0 }, &offsets)?;
    Ok(SparseExtent { file, name: name.to_owned(), tables: Arc::new(tables), markers: false })
}

/// Writes an SEsparse delta: grains around `written` as data, whole grains of `zeroed` (not
/// also written) as zero grains.
pub fn write(out: &mut impl Write, content: DeltaContent<'_>) -> Result<()> {
    let io = |e| VmdkError::io("SEsparse delta", e);
    let grain_bytes = GRAIN_SECTORS * 512;
    let g = std::num::NonZeroU64::new(grain_bytes).unwrap_or(std::num::NonZeroU64::MIN);
    let data = content.written.align_outward(g, content.capacity);
    let zero = content.zeroed.align_inward(g, content.capacity).difference(&data);
    // Zeroed bytes in grains that are not wholly zeroed are stored as data.
    let data = data.union(&content.zeroed.difference(&zero).align_outward(g, content.capacity));
    let grains_of = |s: &cbt::ExtentSet| -> Vec<u64> {
        s.iter().flat_map(|e| e.start() / grain_bytes..e.end().div_ceil(grain_bytes)).collect()
    };
    let (data_grains, zero_grains) = (grains_of(&data), grains_of(&zero));
    let capacity_sectors = content.capacity / 512;
    let gd_entries = capacity_sectors.div_ceil(GTES_PER_GT * GRAIN_SECTORS).max(1);
    let gd_sectors = (gd_entries * 8).div_ceil(512);
    let mut tables: Vec<u64> = data_grains.iter().chain(&zero_grains).map(|g| g / GTES_PER_GT).collect();
    tables.sort_unstable();
    tables.dedup();
    let gd_start = 8;
    let tables_start = gd_start + gd_sectors;
    let grains_start = tables_start + tables.len() as u64 * GT_SECTORS;
    let header = SeSparseHeader {
        capacity: capacity_sectors,
        volatile_header: (1, 1),
        journal_header: (2, 2),
        journal: (4, 4),
        grain_dir: (gd_start, gd_sectors),
        grain_tables: (tables_start, tables.len() as u64 * GT_SECTORS),
        free_bitmap: (0, 0),
        backmap: (0, 0),
        grains: (grains_start, data_grains.len() as u64 * GRAIN_SECTORS),
    };
    out.write_all(&header.to_bytes()).map_err(io)?;
    let mut volatile = [0u8; 512];
    volatile[..8].copy_from_slice(&VOLATILE_MAGIC.to_le_bytes());
    volatile[8..16].copy_from_slice(&(tables.len() as u64).to_le_bytes());
    out.write_all(&volatile).map_err(io)?;
    out.write_all(&[0u8; 6 * 512]).map_err(io)?;
    let mut gd = vec![0u8; usize::try_from(gd_sectors * 512).unwrap_or(0)];
    for (i, t) in tables.iter().enumerate() {
        gd[crate::to_usize(*t) * 8..][..8].copy_from_slice(&(0x1000_0000_0000_0000 | i as u64).to_le_bytes());
    }
    out.write_all(&gd).map_err(io)?;
    for t in &tables {
        let mut gt = vec![0u8; crate::to_usize(GT_SECTORS * 512)];
        let mut set = |grain: u64, value: u64| {
            gt[crate::to_usize(grain % GTES_PER_GT) * 8..][..8].copy_from_slice(&value.to_le_bytes())
        };
        for (k, &grain) in data_grains.iter().enumerate().filter(|(_, g)| **g / GTES_PER_GT == *t) {
            let k = k as u64;
            set(grain, 0x3000_0000_0000_0000 | (k & 0xFFF) << 48 | k >> 12);
        }
        for &grain in zero_grains.iter().filter(|g| **g / GTES_PER_GT == *t) {
            set(grain, 0x2000_0000_0000_0000);
        }
        out.write_all(&gt).map_err(io)?;
    }
    crate::cowd::write_grains(out, content, &data_grains, grain_bytes)
}
