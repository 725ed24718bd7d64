//! streamOptimized VMDKs as a stream: a sequential marker reader for what an export download
//! delivers (no seeking, no footer needed until the end), and a writer whose output qemu reads.

use std::io::{Read, Write};

use cbt::ExtentSet;

use crate::descriptor::{Adapter, embedded_descriptor};
use crate::error::{Result, VmdkError};
use crate::grains::inflate_capped;
use crate::io::ReadAt;
use crate::kdmv::{FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_DETECT, GD_AT_END, SparseHeader};

const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;
/// Longest metadata block skipped in one marker (a grain directory of 64 TiB at 64 KiB grains
/// is 8 MiB): more is corruption, not a bigger disk.
const MAX_METADATA_SECTORS: u64 = 1 << 16;

/// One grain from the stream: where it goes and its inflated bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamGrain {
    /// Its byte offset in the disk.
    pub offset: u64,
    /// Its bytes (a whole grain, or less for the disk's last grain).
    pub data: Vec<u8>,
}

/// Reads a streamOptimized file front to back.
#[derive(Debug)]
pub struct StreamReader<R> {
    input: R,
    name: String,
    header: SparseHeader,
    next_min_lba: u64,
    finished: bool,
    /// Bytes consumed so far.
    position: u64,
}

impl<R: Read> StreamReader<R> {
    /// Reads the header and skips to the first marker.
    pub fn new(mut input: R, name: &str) -> Result<Self> {
        let mut b = [0u8; 512];
        input.read_exact(&mut b).map_err(|e| VmdkError::io(name, e))?;
        let header = SparseHeader::parse(&b, name)?;
        let want = FLAG_COMPRESSED | FLAG_MARKERS;
        if header.flags & want != want {
            return Err(VmdkError::unsupported(name, "not a streamOptimized file (no compressed grains with markers)"));
        }
        let g = header.grain_size;
        if !g.is_power_of_two() || !(8..=1 << 21).contains(&g) {
            return Err(VmdkError::corrupt(name, format!("grain size {g} sectors")));
        }
        if header.capacity > crate::descriptor::MAX_DISK_SECTORS {
            return Err(VmdkError::corrupt(name, format!("capacity of {} sectors is too large", header.capacity)));
        }
        let mut reader = Self { input, name: name.to_owned(), header, next_min_lba: 0, finished: false, position: 512 };
        // Grains start after the metadata; skip the embedded descriptor and padding.
        reader.skip_sectors(header.overhead.max(1) - 1)?;
        Ok(reader)
    }

    /// The header at the front of the stream.
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.header.capacity * 512
    }

    fn skip_sectors(&mut self, sectors: u64) -> Result<()> {
        if sectors > MAX_METADATA_SECTORS.max(self.header.overhead) {
            return Err(VmdkError::corrupt(
                &self.name,
                format!("{sectors} sectors of metadata to skip at byte {}", self.position),
            ));
        }
        let bytes = sectors
            .checked_mul(512)
            .ok_or_else(|| VmdkError::corrupt(&self.name, format!("{sectors} sectors to skip overflow")))?;
        let copied = std::io::copy(&mut (&mut self.input).take(bytes), &mut std::io::sink())
            .map_err(|e| VmdkError::io(&self.name, e))?;
        if copied != bytes {
            return Err(VmdkError::corrupt(
                &self.name,
                format!("the stream ends inside metadata at byte {}", self.position + copied),
            ));
        }
        self.position += bytes;
        Ok(())
    }

    /// The next grain, or `None` at the end-of-stream marker.
    pub fn next_grain(&mut self) -> Result<Option<StreamGrain>> {
        while !self.finished {
            let at = self.position;
            let mut sector = [0u8; 512];
            self.input.read_exact(&mut sector).map_err(|e| VmdkError::io(&self.name, e))?;
            self.position += 512;
            let val = u64::from_le_bytes(sector[0..8].try_into().unwrap_or_default());
            let size = u32::from_le_bytes(sector[8..12].try_into().unwrap_or_default());
            if size > 0 {
                return self.grain(at, val, size, &sector).map(Some);
            }
            match u32::from_le_bytes(sector[12..16].try_into().unwrap_or_default()) {
                MARKER_EOS => self.finished = true,
                MARKER_GT | MARKER_GD | MARKER_FOOTER => self.skip_sectors(val)?,
                other => {
                    return Err(VmdkError::corrupt(&self.name, format!("unknown marker type {other} at byte {at}")));
                }
            }
        }
        Ok(None)
    }

    fn grain(&mut self, at: u64, lba: u64, size: u32, sector: &[u8; 512]) -> Result<StreamGrain> {
        let g = self.header.grain_size;
        let grain_bytes = g * 512;
        let corrupt = |what: String| VmdkError::corrupt(&self.name, format!("grain marker at byte {at}: {what}"));
        if lba >= self.header.capacity || !lba.is_multiple_of(g) {
            return Err(corrupt(format!("sector {lba} is not a grain start inside the disk")));
        }
        if lba < self.next_min_lba {
            return Err(corrupt(format!(
                "sector {lba} comes after sector {} (grains out of order)",
                self.next_min_lba - g
            )));
        }
        let size = u64::from(size);
        if size > 2 * grain_bytes {
            return Err(corrupt(format!("{size} compressed bytes for a grain of {grain_bytes}")));
        }
        // The data starts 12 bytes into the marker sector and is padded to a sector. Read it
        // into memory that grows as bytes arrive, so a marker's claim costs nothing by itself.
        let total = (12 + size).div_ceil(512) * 512;
        let mut data = sector.to_vec();
        (&mut self.input).take(total - 512).read_to_end(&mut data).map_err(|e| VmdkError::io(&self.name, e))?;
        if (data.len() as u64) < total {
            return Err(corrupt(format!("the stream ends inside the grain's {size} compressed bytes")));
        }
        self.position += total - 512;
        let len = grain_bytes.min((self.header.capacity - lba) * 512);
        let out = inflate_capped(&data[12..12 + crate::to_usize(size)], crate::to_usize(len), true).map_err(corrupt)?;
        self.next_min_lba = lba + g;
        Ok(StreamGrain { offset: lba * 512, data: out })
    }
}

/// What a stream write produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Grains written.
    pub grains: u64,
    /// Bytes of the disk those grains hold.
    pub data_bytes: u64,
    /// Bytes written in all.
    pub file_bytes: u64,
}

/// Sectors per grain in what we write (qemu's and VMware's default, 64 KiB).
pub(crate) const GRAIN_SECTORS: u64 = 128;
/// Entries per grain table in what we write (qemu's and VMware's).
pub(crate) const GTES: u64 = 512;
/// Sectors reserved for the embedded descriptor in what we write (qemu's 20).
pub(crate) const DESCRIPTOR_SECTORS: u64 = 20;
/// First grain sector: header, descriptor, padding to a grain.
const OVERHEAD: u64 = 128;

/// Writes the disk `source` of `capacity` bytes as a streamOptimized VMDK. Only grains that
/// overlap `allocation` (all, when `None`) and are not all zeros are stored. `extent_name` is
/// the file name written into the embedded descriptor.
pub fn write_stream_optimized(
    out: &mut impl Write,
    source: &dyn ReadAt,
    capacity: u64,
    allocation: Option<&ExtentSet>,
    extent_name: &str,
) -> Result<StreamStats> {
    let name = "streamOptimized output";
    if !capacity.is_multiple_of(512) || capacity / 512 > crate::descriptor::MAX_DISK_SECTORS {
        return Err(VmdkError::unsupported(
            name,
            format!("a capacity of {capacity} bytes (whole sectors up to 64 TiB)"),
        ));
    }
    let sectors = capacity / 512;
    let grain_bytes = GRAIN_SECTORS * 512;
    let mut w = Counter { out, written: 0 };
    let mut header = SparseHeader {
        version: 3,
        flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity: sectors,
        grain_size: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: DESCRIPTOR_SECTORS,
        gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        overhead: OVERHEAD,
        unclean_shutdown: false,
        compress_algorithm: 1,
    };
    w.put(&header.to_bytes())?;
    let descriptor = embedded_descriptor("streamOptimized", sectors, extent_name, Adapter::Ide);
    let mut desc = descriptor.into_bytes();
    if desc.len() as u64 > DESCRIPTOR_SECTORS * 512 {
        return Err(VmdkError::unsupported(name, "a descriptor longer than 20 sectors"));
    }
    desc.resize(crate::to_usize((OVERHEAD - 1) * 512), 0);
    w.put(&desc)?;

    let grains_total = sectors.div_ceil(GRAIN_SECTORS);
    let gd_entries = grains_total.div_ceil(GTES).max(1);
    let mut gtes =
        vec![0u32; usize::try_from(gd_entries * GTES).map_err(|_| VmdkError::unsupported(name, "disk too large"))?];
    let mut stats = StreamStats::default();
    let g = std::num::NonZeroU64::new(grain_bytes).unwrap_or(std::num::NonZeroU64::MIN);
    let wanted = match allocation {
        Some(a) => a.align_outward(g, capacity),
        None => ExtentSet::full(capacity),
    };
    let mut buf = vec![0u8; crate::to_usize(grain_bytes)];
    let mut packed = Vec::with_capacity(crate::to_usize(grain_bytes) + 1024);
    for e in wanted.split(g) {
        let len = usize::try_from(e.len()).unwrap_or(0);
        source.read_exact_at(&mut buf[..len], e.start()).map_err(|err| VmdkError::io("stream source", err))?;
        if buf[..len].iter().all(|&b| b == 0) {
            continue;
        }
        let lba = e.start() / 512;
        packed.clear();
        packed.extend_from_slice(&lba.to_le_bytes());
        packed.extend_from_slice(&[0; 4]);
        // zlib's fastest level: at the default (6) one core packs about 27 MB/s of incompressible
        // data, slower than the link a restore uploads over; level 1 is several times faster
        // for a few percent more bytes.
        let mut z = flate2::write::ZlibEncoder::new(packed, flate2::Compression::fast());
        z.write_all(&buf[..len]).map_err(|err| VmdkError::io(name, err))?;
        packed = z.finish().map_err(|err| VmdkError::io(name, err))?;
        let size = u32::try_from(packed.len() - 12)
            .map_err(|_| VmdkError::unsupported(name, "a grain that grows past 4 GiB"))?;
        packed[8..12].copy_from_slice(&size.to_le_bytes());
        packed.resize(packed.len().div_ceil(512) * 512, 0);
        let marker_sector = w.sector()?;
        gtes[crate::to_usize(lba / GRAIN_SECTORS)] = marker_sector;
        w.put(&packed)?;
        stats.grains += 1;
        stats.data_bytes += e.len();
    }
    // Grain tables, then the directory, the footer and the end-of-stream marker.
    let mut gd = vec![0u32; crate::to_usize(gd_entries)];
    for (t, table) in gtes.chunks(crate::to_usize(GTES)).enumerate() {
        if table.iter().all(|&s| s == 0) {
            continue;
        }
        w.put(&marker(GTES * 4 / 512, MARKER_GT))?;
        gd[t] = w.sector()?;
        w.put(&table.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>())?;
    }
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    w.put(&marker(gd_sectors, MARKER_GD))?;
    header.gd_offset = u64::from(w.sector()?);
    let mut gd_bytes: Vec<u8> = gd.iter().flat_map(|s| s.to_le_bytes()).collect();
    gd_bytes.resize(crate::to_usize(gd_sectors * 512), 0);
    w.put(&gd_bytes)?;
    w.put(&marker(1, MARKER_FOOTER))?;
    w.put(&header.to_bytes())?;
    w.put(&marker(0, MARKER_EOS))?;
    stats.file_bytes = w.written;
    Ok(stats)
}

fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Counts what is written, so sector numbers are known without seeking.
struct Counter<'a, W> {
    out: &'a mut W,
    written: u64,
}

impl<W: Write> Counter<'_, W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).map_err(|e| VmdkError::io("streamOptimized output", e))?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.written / 512)
            .map_err(|_| VmdkError::unsupported("streamOptimized output", "a file of more than 2^32 sectors"))
    }
}
