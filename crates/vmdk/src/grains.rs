//! The grain directory and grain tables that hosted sparse, COWD and SEsparse extents share:
//! loaded once at open with every entry checked against the file, then looked up without I/O.
//!
//! Only the tables the directory points at are loaded, so memory stays proportional to the
//! metadata actually present in the file.

use std::sync::Arc;

use crate::error::{Result, VmdkError};
use crate::io::ReadAt;

/// Where one grain's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grain {
    /// Not in this extent: the parent's bytes, or zeros without a parent.
    Unallocated,
    /// Explicitly zero (a zeroed grain, an unmapped SEsparse grain): never the parent's bytes.
    Zero,
    /// Plain bytes at this file offset.
    Data(u64),
    /// Deflated bytes; the offset is the grain marker's (with markers) or the data's.
    Compressed(u64),
}

/// Packed form of [`Grain`], 8 bytes a grain: the two low bits are the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed(u64);

impl Packed {
    const UNALLOCATED: Packed = Packed(0);
    const ZERO: Packed = Packed(1);

    fn data(offset: u64) -> Packed {
        Packed(offset << 2 | 2)
    }

    fn compressed(offset: u64) -> Packed {
        Packed(offset << 2 | 3)
    }

    fn unpack(self) -> Grain {
        match self.0 & 3 {
            0 => Grain::Unallocated,
            1 => Grain::Zero,
            2 => Grain::Data(self.0 >> 2),
            _ => Grain::Compressed(self.0 >> 2),
        }
    }
}

/// How a table entry is read, per format.
#[derive(Debug, Clone, Copy)]
pub(crate) enum EntryFormat {
    /// Hosted sparse: u32 sector numbers; 1 is a zeroed grain when the header allows it.
    Kdmv { zero_grain: bool, compressed: bool },
    /// COWD: u32 sector numbers, 0 unallocated.
    Cowd,
    /// SEsparse: u64 entries with a type nibble; data at `grains_offset + index * grain`.
    SeSparse { grains_offset: u64 },
}

/// What the loader needs to know about the extent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Bytes per grain.
    pub(crate) grain_bytes: u64,
    /// Entries per grain table.
    pub(crate) entries_per_table: u64,
    /// The extent's capacity in bytes.
    pub(crate) capacity: u64,
    /// The first byte where grain data may start (metadata ends there).
    pub(crate) data_start: u64,
}

/// Every grain's location, for one extent.
#[derive(Debug)]
pub(crate) struct GrainTables {
    geometry: Geometry,
    /// Per directory entry: 0 for "no table", else 1 + index into `tables`.
    dir: Vec<u32>,
    tables: Vec<Box<[Packed]>>,
}

impl GrainTables {
    /// Loads the tables a directory points at. `table_offsets` holds, per directory entry,
    /// the byte offset of its grain table or `None` when the entry is empty.
    pub(crate) fn load(
        file: &dyn ReadAt,
        name: &str,
        geometry: Geometry,
        format: EntryFormat,
        table_offsets: &[Option<u64>],
    ) -> Result<Self> {
        let file_len = file.len();
        let entry_bytes: u64 = match format {
            EntryFormat::SeSparse { .. } => 8,
            _ => 4,
        };
        let table_bytes = geometry
            .entries_per_table
            .checked_mul(entry_bytes)
            .ok_or_else(|| VmdkError::corrupt(name, "grain table size overflows"))?;
        let table_len = usize::try_from(table_bytes).map_err(|_| VmdkError::corrupt(name, "grain table too large"))?;
        let grains_needed = geometry.capacity.div_ceil(geometry.grain_bytes);
        // Tables must not share or overlap bytes: real files never do, and refusing it keeps
        // the memory for tables below the file's own size.
        let mut placed: Vec<(u64, usize)> =
            table_offsets.iter().enumerate().filter_map(|(i, o)| o.map(|o| (o, i))).collect();
        placed.sort_unstable();
        for w in placed.windows(2) {
            if w[0].0 + table_bytes > w[1].0 {
                return Err(VmdkError::corrupt(
                    name,
                    format!("grain tables {} and {} overlap (at bytes {} and {})", w[0].1, w[1].1, w[0].0, w[1].0),
                ));
            }
        }
        let mut dir = vec![0u32; table_offsets.len()];
        let mut tables = Vec::new();
        let mut raw = vec![0u8; table_len];
        for (i, offset) in table_offsets.iter().enumerate() {
            let Some(offset) = *offset else { continue };
            if offset.checked_add(table_bytes).is_none_or(|end| end > file_len) || offset < 512 {
                return Err(VmdkError::corrupt(
                    name,
                    format!("grain table {i} at byte {offset} lies outside the file ({file_len} bytes)"),
                ));
            }
            file.read_exact_at(&mut raw, offset).map_err(|e| VmdkError::io(name, e))?;
            let first_grain = i as u64 * geometry.entries_per_table;
            let mut table = Vec::with_capacity(raw.len() / crate::to_usize(entry_bytes));
            for (j, bytes) in raw.chunks_exact(crate::to_usize(entry_bytes)).enumerate() {
                let grain = first_grain + j as u64;
                let value = match bytes.len() {
                    8 => u64::from_le_bytes(bytes.try_into().unwrap_or_default()),
                    _ => u64::from(u32::from_le_bytes(bytes.try_into().unwrap_or_default())),
                };
                // Entries past the capacity (the last table's tail) are ignored, whatever holds.
                let packed = if grain >= grains_needed {
                    Packed::UNALLOCATED
                } else {
                    let need = geometry.grain_bytes.min(geometry.capacity - grain * geometry.grain_bytes);
                    decode(value, format, geometry, need, file_len)
                        .map_err(|what| VmdkError::corrupt(name, format!("grain {grain} (table {i}): {what}")))?
                };
                table.push(packed);
            }
            tables.push(table.into_boxed_slice());
            dir[i] = u32::try_from(tables.len()).map_err(|_| VmdkError::corrupt(name, "too many grain tables"))?;
        }
        Ok(Self { geometry, dir, tables })
    }

    /// The geometry the tables were loaded with.
    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Where grain `index` is.
    pub(crate) fn lookup(&self, index: u64) -> Grain {
        let per = self.geometry.entries_per_table;
        let (t, e) = (index / per, index % per);
        let slot = usize::try_from(t).ok().and_then(|t| self.dir.get(t)).copied().unwrap_or(0);
        if slot == 0 {
            return Grain::Unallocated;
        }
        let table = &self.tables[slot as usize - 1];
        usize::try_from(e).ok().and_then(|e| table.get(e)).map_or(Grain::Unallocated, |p| p.unpack())
    }

    /// Grain ranges `(first grain, count, kind)` that are not unallocated, in order; whole
    /// empty tables are skipped without looking at their grains.
    pub(crate) fn present(&self) -> Vec<(u64, u64, Grain)> {
        let mut out: Vec<(u64, u64, Grain)> = Vec::new();
        let per = self.geometry.entries_per_table;
        for (t, &slot) in self.dir.iter().enumerate() {
            if slot == 0 {
                continue;
            }
            for (e, p) in self.tables[slot as usize - 1].iter().enumerate() {
                let g = p.unpack();
                if g == Grain::Unallocated {
                    continue;
                }
                let index = t as u64 * per + e as u64;
                let same_kind = |a: Grain, b: Grain| {
                    matches!(
                        (a, b),
                        (Grain::Zero, Grain::Zero)
                            | (Grain::Data(_), Grain::Data(_))
                            | (Grain::Compressed(_), Grain::Compressed(_))
                    )
                };
                match out.last_mut() {
                    Some((start, count, kind)) if *start + *count == index && same_kind(*kind, g) => *count += 1,
                    _ => out.push((index, 1, g)),
                }
            }
        }
        out
    }
}

/// Checks and packs one table entry.
/// `need` is how many bytes of the grain lie inside the capacity (the last grain may be short).
fn decode(value: u64, format: EntryFormat, geo: Geometry, need: u64, file_len: u64) -> Result<Packed, String> {
    let data_at = |offset: u64, whole: bool| -> Result<Packed, String> {
        let need = if whole { need } else { 12 };
        if offset < geo.data_start {
            return Err(format!("points at byte {offset}, inside the metadata (data starts at {})", geo.data_start));
        }
        if offset.checked_add(need).is_none_or(|end| end > file_len) {
            return Err(format!("points at byte {offset}, past the end of the file ({file_len} bytes)"));
        }
        Ok(if whole { Packed::data(offset) } else { Packed::compressed(offset) })
    };
    match format {
        EntryFormat::Kdmv { zero_grain, compressed } => match value {
            0 => Ok(Packed::UNALLOCATED),
            1 if zero_grain => Ok(Packed::ZERO),
            sector => data_at(sector * 512, !compressed),
        },
        EntryFormat::Cowd => match value {
            0 => Ok(Packed::UNALLOCATED),
            sector => data_at(sector * 512, true),
        },
        EntryFormat::SeSparse { grains_offset } => match value >> 60 {
            0 if value == 0 => Ok(Packed::UNALLOCATED),
            0 => Err(format!("unallocated entry {value:#018x} has stray bits")),
            1 | 2 => Ok(Packed::ZERO),
            3 => {
                let cluster = ((value & 0x0FFF_0000_0000_0000) >> 48) | ((value & 0x0000_FFFF_FFFF_FFFF) << 12);
                let sector = cluster
                    .checked_mul(geo.grain_bytes / 512)
                    .and_then(|s| s.checked_add(grains_offset))
                    .and_then(|s| s.checked_mul(512))
                    .ok_or_else(|| format!("entry {value:#018x} overflows"))?;
                data_at(sector, true)
            }
            n => Err(format!("entry {value:#018x} has unknown type {n:#x}")),
        },
    }
}

/// `(start, length)` byte ranges.
pub(crate) type Ranges = Vec<(u64, u64)>;

/// A sparse extent ready to read: its file and its tables.
#[derive(Debug, Clone)]
pub(crate) struct SparseExtent {
    pub(crate) file: Arc<dyn ReadAt>,
    pub(crate) name: String,
    pub(crate) tables: Arc<GrainTables>,
    /// Grain markers precede compressed data (streamOptimized).
    pub(crate) markers: bool,
}

/// What a read of a run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    /// `len` bytes were read into the buffer.
    Data(usize),
    /// `len` bytes are zeros (filled in).
    Zero(usize),
    /// `len` bytes are not in this extent.
    Unallocated(usize),
}

impl SparseExtent {
    /// This extent's own data and zero grains as `(start, length)` byte ranges, cut at `limit`
    /// bytes (the extent's length in its disk, or its capacity).
    pub(crate) fn allocation(&self, limit: u64) -> (Ranges, Ranges) {
        let g = self.tables.geometry();
        let limit = limit.min(g.capacity);
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        for (first, count, kind) in self.tables.present() {
            let start = first * g.grain_bytes;
            let len = (count * g.grain_bytes).min(limit.saturating_sub(start));
            if len == 0 {
                continue;
            }
            if kind == Grain::Zero { zero.push((start, len)) } else { data.push((start, len)) }
        }
        (data, zero)
    }

    /// Reads from `offset` (relative to the extent) as far as one kind of run goes, at most
    /// `buf.len()` bytes, never past the capacity.
    pub(crate) fn read_run(&self, offset: u64, buf: &mut [u8]) -> Result<Run> {
        let geo = self.tables.geometry();
        let g = geo.grain_bytes;
        let index = offset / g;
        let within = offset % g;
        let first_len =
            usize::try_from((g - within).min(geo.capacity.saturating_sub(offset))).unwrap_or(usize::MAX).min(buf.len());
        match self.tables.lookup(index) {
            kind @ (Grain::Unallocated | Grain::Zero) => {
                // Extend over following grains of the same kind.
                let mut len = first_len;
                let mut next = index + 1;
                while len < buf.len() && next * g < geo.capacity && self.tables.lookup(next) == kind {
                    len = len.saturating_add(usize::try_from(g).unwrap_or(usize::MAX)).min(buf.len());
                    next += 1;
                }
                let len = len.min(usize::try_from(geo.capacity - offset).unwrap_or(usize::MAX));
                if kind == Grain::Zero {
                    buf[..len].fill(0);
                    Ok(Run::Zero(len))
                } else {
                    Ok(Run::Unallocated(len))
                }
            }
            Grain::Data(at) => {
                // Coalesce grains that follow each other in the file into one read.
                let mut len = first_len;
                let mut next = index + 1;
                while len < buf.len()
                    && next * g < geo.capacity
                    && self.tables.lookup(next) == Grain::Data(at + (next - index) * g)
                {
                    len = len.saturating_add(usize::try_from(g).unwrap_or(usize::MAX)).min(buf.len());
                    next += 1;
                }
                let len = len.min(usize::try_from(geo.capacity - offset).unwrap_or(usize::MAX));
                self.file.read_exact_at(&mut buf[..len], at + within).map_err(|e| VmdkError::io(&self.name, e))?;
                Ok(Run::Data(len))
            }
            Grain::Compressed(at) => {
                let grain_len = usize::try_from(g.min(geo.capacity - index * g)).unwrap_or(usize::MAX);
                let start = usize::try_from(within).unwrap_or(0);
                if start == 0 && first_len == grain_len {
                    // The caller's buffer takes the whole grain.
                    let compressed = self.compressed_grain(index, at)?;
                    inflate_exact(&compressed, &mut buf[..grain_len], self.markers)
                } else {
                    // Part of a grain: inflate into memory that grows only as output appears.
                    let compressed = self.compressed_grain(index, at)?;
                    inflate_capped(&compressed, grain_len, self.markers)
                        .map(|whole| buf[..first_len].copy_from_slice(&whole[start..start + first_len]))
                }
                .map_err(|what| VmdkError::corrupt(&self.name, format!("compressed grain at byte {at}: {what}")))?;
                Ok(Run::Data(first_len))
            }
        }
    }

    /// The compressed bytes of grain `index`, whose marker (or data) is at `at`.
    fn compressed_grain(&self, index: u64, at: u64) -> Result<Vec<u8>> {
        let geo = self.tables.geometry();
        let max = geo.grain_bytes.saturating_mul(2);
        let (data_at, size) = if self.markers {
            let mut marker = [0u8; 12];
            self.file.read_exact_at(&mut marker, at).map_err(|e| VmdkError::io(&self.name, e))?;
            let lba = u64::from_le_bytes(marker[..8].try_into().unwrap_or_default());
            let size = u64::from(u32::from_le_bytes(marker[8..].try_into().unwrap_or_default()));
            let expected = index * geo.grain_bytes / 512;
            if lba != expected {
                return Err(VmdkError::corrupt(
                    &self.name,
                    format!(
                        "grain marker at byte {at} says sector {lba}, but its table entry is for sector {expected}"
                    ),
                ));
            }
            (at + 12, size)
        } else {
            (at, max.min(self.file.len().saturating_sub(at)))
        };
        if size == 0 || size > max || data_at.checked_add(size).is_none_or(|end| end > self.file.len()) {
            return Err(VmdkError::corrupt(&self.name, format!("compressed grain at byte {at} has a bad size {size}")));
        }
        // Inside the file (checked above), so the file's size justifies the allocation.
        let mut compressed = vec![0u8; usize::try_from(size).unwrap_or(0)];
        self.file.read_exact_at(&mut compressed, data_at).map_err(|e| VmdkError::io(&self.name, e))?;
        Ok(compressed)
    }
}

/// Inflates a zlib stream into exactly `out.len()` bytes: more is a bomb, less is truncation.
/// With `strict`, bytes after the end of the stream are an error too.
pub(crate) fn inflate_exact(compressed: &[u8], out: &mut [u8], strict: bool) -> Result<(), String> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut z = Decompress::new(true);
    let status = z.decompress(compressed, out, FlushDecompress::Finish).map_err(|e| format!("inflate failed: {e}"))?;
    let produced = usize::try_from(z.total_out()).unwrap_or(usize::MAX);
    match status {
        Status::StreamEnd if produced == out.len() => {}
        Status::StreamEnd => return Err(format!("inflates to {produced} bytes, expected {}", out.len())),
        _ => return Err(format!("inflates to more than {} bytes, or is truncated", out.len())),
    }
    if strict && usize::try_from(z.total_in()).unwrap_or(0) != compressed.len() {
        return Err("bytes after the end of the compressed stream".into());
    }
    Ok(())
}

/// Inflates a zlib stream that must produce exactly `len` bytes, into memory that grows with the
/// output (so a hostile header claiming a huge grain costs nothing until data backs it).
pub(crate) fn inflate_capped(compressed: &[u8], len: usize, strict: bool) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut z = flate2::read::ZlibDecoder::new(compressed);
    let mut out = Vec::new();
    (&mut z).take(len as u64 + 1).read_to_end(&mut out).map_err(|e| format!("inflate failed: {e}"))?;
    if out.len() != len {
        return Err(format!(
            "inflates to {}{} bytes, expected {len}",
            out.len(),
            if out.len() > len { "+" } else { "" }
        ));
    }
    if strict && usize::try_from(z.total_in()).unwrap_or(0) != compressed.len() {
        return Err("bytes after the end of the compressed stream".into());
    }
    Ok(out)
}
