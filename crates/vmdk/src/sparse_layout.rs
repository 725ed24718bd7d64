//! A monolithicSparse (hosted sparse, `KDMV`) file written front to back when its size must be
//! known before the first byte: the whole layout follows from the capacity and the allocated
//! extents, so an upload can announce its `Content-Length` and then stream the metadata and the
//! grains without staging a file.
//!
//! The layout is qemu's (`qemu-img convert -O vmdk`, which follows VMware Workstation's): the
//! header, a 20-sector embedded descriptor, the redundant grain directory and all its grain
//! tables, the primary directory and all its tables, zeros up to a grain boundary, then the
//! grains in ascending disk order. Every grain table exists (as VMware and qemu preallocate them),
//! so the metadata costs 4 KiB per 32 MiB of capacity (128 KiB per GiB) whatever is stored.

use std::io::{self, Write};
use std::num::NonZeroU64;

use cbt::ExtentSet;

use crate::descriptor::{Adapter, MAX_DISK_SECTORS, embedded_descriptor};
use crate::error::{Result, VmdkError};
use crate::kdmv::{FLAG_NL_DETECT, FLAG_RGD, SparseHeader};
use crate::stream::{DESCRIPTOR_SECTORS, GRAIN_SECTORS, GTES};

/// The name errors give the file being laid out.
const WHAT: &str = "monolithicSparse output";
/// The extent name in the embedded descriptor unless [`SparseLayout::with_name`] sets another.
const DEFAULT_NAME: &str = "disk.vmdk";
/// Longest extent name accepted (the descriptor must fit in its 20 sectors).
const MAX_NAME: usize = 255;
/// The redundant grain directory follows the header and the descriptor.
const RGD_SECTOR: u64 = 1 + DESCRIPTOR_SECTORS;
/// Sectors per grain table (512 entries of 4 bytes).
const GT_SECTORS: u64 = GTES * 4 / 512;
/// Grain table entries are u32 sector numbers, so no grain may start past this sector.
const MAX_FILE_SECTORS: u64 = 1 << 32;

/// The layout of a monolithicSparse file for a disk of `capacity` bytes: what to send first
/// ([`prefix`](Self::prefix)) and which disk ranges follow ([`grains`](Self::grains)).
///
/// The file is `prefix()` followed by one [`GRAIN`](Self::GRAIN)-sized block per item of
/// `grains()`, in that order, nothing else; [`len`](Self::len) is its size. Each block holds the
/// disk's bytes at the grain's offset. When the capacity is not a multiple of `GRAIN`, the last
/// grain reports fewer bytes (those of the disk), and its block is padded with zeros to the full
/// grain, as qemu stores it and as VMware, which reads grains whole, expects.
///
/// Memory is proportional to the number of allocated extents; [`write_prefix`](Self::write_prefix)
/// streams the grain tables one at a time, while [`prefix`](Self::prefix) builds them in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseLayout {
    /// Bytes.
    capacity: u64,
    /// The embedded descriptor's text.
    descriptor: String,
    /// The stored grains: `allocated` widened to whole grains (the last ends at the capacity).
    stored: ExtentSet,
    /// How many grains are stored.
    grains: u64,
    /// Grain tables per copy (one per directory entry).
    tables: u64,
    /// Sectors of one grain directory.
    gd_sectors: u64,
    /// The first grain's sector.
    overhead: u64,
}

impl SparseLayout {
    /// Bytes per grain: 128 sectors, VMware's and qemu's default.
    pub const GRAIN: u64 = GRAIN_SECTORS * 512;

    /// Lays out a disk of `capacity` bytes (a whole number of sectors, up to 64 TiB) whose data
    /// lies in `allocated`: every grain that holds an allocated byte is stored. The embedded
    /// descriptor names the extent `disk.vmdk`; see [`with_name`](Self::with_name).
    ///
    /// Fails if the capacity is 0 or not whole sectors, if `allocated` reaches past it, or if
    /// the file would pass 2 TiB (grain table entries are 32-bit sector numbers).
    pub fn new(capacity: u64, allocated: &ExtentSet) -> Result<SparseLayout> {
        if capacity == 0 || !capacity.is_multiple_of(512) || capacity / 512 > MAX_DISK_SECTORS {
            return Err(VmdkError::unsupported(
                WHAT,
                format!("a capacity of {capacity} bytes (whole sectors, from 1 up to 64 TiB)"),
            ));
        }
        if allocated.end() > capacity {
            return Err(VmdkError::unsupported(
                WHAT,
                format!("data up to byte {} on a disk of {capacity} bytes", allocated.end()),
            ));
        }
        let stored = allocated.align_outward(grain(), capacity);
        let grains = stored.iter().map(|e| e.len().div_ceil(Self::GRAIN)).sum::<u64>();
        let sectors = capacity / 512;
        let tables = sectors.div_ceil(GRAIN_SECTORS).div_ceil(GTES);
        let gd_sectors = (tables * 4).div_ceil(512);
        let metadata_end = RGD_SECTOR + 2 * (gd_sectors + tables * GT_SECTORS);
        let overhead = metadata_end.next_multiple_of(GRAIN_SECTORS);
        let file_sectors = overhead + grains * GRAIN_SECTORS;
        if file_sectors > MAX_FILE_SECTORS {
            return Err(VmdkError::unsupported(
                WHAT,
                format!("a file of {file_sectors} sectors (a hosted sparse file stops at 2^32 sectors, 2 TiB)"),
            ));
        }
        let descriptor = embedded_descriptor("monolithicSparse", sectors, DEFAULT_NAME, Adapter::LsiLogic);
        Ok(SparseLayout { capacity, descriptor, stored, grains, tables, gd_sectors, overhead })
    }

    /// The same layout with `name` as the extent's file name in the embedded descriptor: the
    /// name the file will have on the datastore (`restored.vmdk`, no directory). Printable
    /// ASCII without `"`, up to 255 bytes.
    pub fn with_name(mut self, name: &str) -> Result<SparseLayout> {
        let printable = name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'/');
        if name.is_empty() || name.len() > MAX_NAME || !printable {
            return Err(VmdkError::unsupported(
                WHAT,
                format!("extent name {name:?} (printable ASCII without '\"' or '/', 1 to {MAX_NAME} bytes)"),
            ));
        }
        self.descriptor = embedded_descriptor("monolithicSparse", self.capacity / 512, name, Adapter::LsiLogic);
        Ok(self)
    }

    /// The disk's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The whole file's size in bytes: the prefix and one full grain per stored grain.
    #[expect(clippy::len_without_is_empty, reason = "a sparse file always has a header")]
    pub fn len(&self) -> u64 {
        (self.overhead + self.grains * GRAIN_SECTORS) * 512
    }

    /// The header the file starts with.
    pub fn header(&self) -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: self.capacity / 512,
            grain_size: GRAIN_SECTORS,
            descriptor_offset: 1,
            descriptor_size: DESCRIPTOR_SECTORS,
            gtes_per_gt: 512,
            rgd_offset: RGD_SECTOR,
            gd_offset: self.gd_offset(),
            overhead: self.overhead,
            unclean_shutdown: false,
            compress_algorithm: 0,
        }
    }

    /// The primary grain directory's sector: after the redundant copy and its tables.
    fn gd_offset(&self) -> u64 {
        RGD_SECTOR + self.gd_sectors + self.tables * GT_SECTORS
    }

    /// Everything before the first grain, in memory (see [`write_prefix`](Self::write_prefix)
    /// to stream it instead): `len() - data` bytes, 128 KiB per GiB of capacity and up to 64 KiB
    /// of padding.
    pub fn prefix(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(crate::to_usize(self.overhead * 512));
        // Writing into a Vec cannot fail.
        let _: io::Result<()> = self.write_prefix(&mut out);
        out
    }

    /// Writes [`prefix`](Self::prefix) to `out`, one grain table at a time: the header, the
    /// embedded descriptor, the redundant grain directory and tables, the primary directory and
    /// tables, and zeros up to the first grain.
    pub fn write_prefix(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.header().to_bytes())?;
        let mut descriptor = self.descriptor.as_bytes().to_vec();
        descriptor.resize(crate::to_usize(DESCRIPTOR_SECTORS * 512), 0);
        out.write_all(&descriptor)?;
        let mut table = vec![0u8; crate::to_usize(GT_SECTORS * 512)];
        for gd in [RGD_SECTOR, self.gd_offset()] {
            let first_table = gd + self.gd_sectors;
            let mut directory: Vec<u8> =
                (0..self.tables).flat_map(|t| sector32(first_table + t * GT_SECTORS).to_le_bytes()).collect();
            directory.resize(crate::to_usize(self.gd_sectors * 512), 0);
            out.write_all(&directory)?;
            // Grain k in file order is at sector overhead + k * GRAIN_SECTORS.
            let mut next = self.grains().map(|(offset, _)| offset / Self::GRAIN).zip(0u64..).peekable();
            for t in 0..self.tables {
                table.fill(0);
                while let Some((index, k)) = next.next_if(|&(index, _)| index < (t + 1) * GTES) {
                    let entry = crate::to_usize((index - t * GTES) * 4);
                    table[entry..entry + 4].copy_from_slice(&sector32(self.overhead + k * GRAIN_SECTORS).to_le_bytes());
                }
                out.write_all(&table)?;
            }
        }
        let metadata_end = self.gd_offset() + self.gd_sectors + self.tables * GT_SECTORS;
        out.write_all(&vec![0u8; crate::to_usize((self.overhead - metadata_end) * 512)])?;
        Ok(())
    }

    /// The stored grains as `(disk offset, bytes of the disk)`, in file order (ascending
    /// offsets). The length is [`GRAIN`](Self::GRAIN) except for a last grain that the capacity
    /// cuts short; that grain still takes a full `GRAIN` in the file, padded with zeros.
    pub fn grains(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.stored.split(grain()).map(|e| (e.start(), e.len()))
    }

    /// How many grains are stored.
    pub fn grain_count(&self) -> u64 {
        self.grains
    }

    /// Bytes of the disk the grains hold: the sum of the lengths [`grains`](Self::grains) gives.
    pub fn data_bytes(&self) -> u64 {
        self.stored.total_bytes()
    }

    /// Writes the whole file to `out`: the prefix, then each grain as `read(offset, buf)` fills
    /// it from the disk, padded to a full grain. Returns the bytes written ([`len`](Self::len)).
    /// One grain of memory besides the tables.
    pub fn write(&self, out: &mut impl Write, mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>) -> Result<u64> {
        self.write_prefix(out).map_err(|e| VmdkError::io(WHAT, e))?;
        let mut buf = vec![0u8; crate::to_usize(Self::GRAIN)];
        for (offset, len) in self.grains() {
            let (data, pad) = buf.split_at_mut(crate::to_usize(len));
            read(offset, data).map_err(|e| VmdkError::io(&format!("disk source at byte {offset}"), e))?;
            pad.fill(0);
            out.write_all(&buf).map_err(|e| VmdkError::io(WHAT, e))?;
        }
        Ok(self.len())
    }
}

/// [`SparseLayout::GRAIN`] as the granularity `ExtentSet` takes.
fn grain() -> NonZeroU64 {
    NonZeroU64::new(SparseLayout::GRAIN).unwrap_or(NonZeroU64::MIN)
}

/// A sector number as a grain directory or table entry holds it.
#[expect(clippy::cast_possible_truncation, reason = "SparseLayout::new refuses files past 2^32 sectors")]
const fn sector32(sector: u64) -> u32 {
    sector as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1 << 20;

    #[test]
    fn header_fields_are_qemus_for_a_small_disk() {
        // 10 MiB + 12 KiB: 20504 sectors, 161 grains, one table, a one-sector directory.
        let allocated = ExtentSet::from_ranges([(5, 1), (10 * MIB + 8 * KIB, 512)]);
        let layout = SparseLayout::new(10 * MIB + 12 * KIB, &allocated).unwrap();
        let h = layout.header();
        assert_eq!((h.version, h.flags, h.capacity, h.grain_size), (1, 3, 20504, 128));
        assert_eq!((h.descriptor_offset, h.descriptor_size, h.gtes_per_gt), (1, 20, 512));
        // Redundant directory at 21, its table at 22..26; primary at 26, table at 27..31.
        assert_eq!((h.rgd_offset, h.gd_offset, h.overhead), (21, 26, 128));
        assert_eq!(layout.grains().collect::<Vec<_>>(), [(0, 65536), (160 * 65536, 12 * KIB)]);
        assert_eq!((layout.grain_count(), layout.data_bytes()), (2, 65536 + 12 * KIB));
        assert_eq!(layout.len(), (128 + 2 * 128) * 512);
        let prefix = layout.prefix();
        assert_eq!(prefix.len() as u64, 128 * 512);
        assert_eq!(&prefix[..512], &h.to_bytes());
        assert_eq!(&prefix[73..77], b"\n \r\n");
        let le = |at: usize| u32::from_le_bytes(prefix[at..at + 4].try_into().unwrap());
        assert_eq!((le(21 * 512), le(26 * 512)), (22, 27));
        for table in [22 * 512, 27 * 512] {
            assert_eq!((le(table), le(table + 160 * 4)), (128, 256));
            assert_eq!(le(table + 4), 0);
        }
        let text = std::str::from_utf8(&prefix[512..21 * 512]).unwrap().trim_end_matches('\0');
        for line in [
            "createType=\"monolithicSparse\"",
            "RW 20504 SPARSE \"disk.vmdk\"",
            "ddb.adapterType = \"lsilogic\"",
            "ddb.geometry.heads = \"255\"",
            "ddb.geometry.sectors = \"63\"",
            "ddb.geometry.cylinders = \"1\"",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn directories_and_tables_grow_with_the_capacity_not_the_data() {
        // 3 TiB: 98304 tables, a 768-sector directory; nothing stored.
        let layout = SparseLayout::new(3 << 40, &ExtentSet::new()).unwrap();
        let h = layout.header();
        assert_eq!(h.gd_offset, 21 + 768 + 98304 * 4);
        let end = h.gd_offset + 768 + 98304 * 4;
        assert_eq!(h.overhead, end.next_multiple_of(128));
        assert_eq!(layout.len(), h.overhead * 512);
        assert_eq!(layout.grains().count(), 0);
        let mut sink = Counting(0);
        layout.write_prefix(&mut sink).unwrap();
        assert_eq!(sink.0, layout.len());
    }

    #[test]
    fn names_are_checked_and_written() {
        let layout = SparseLayout::new(MIB, &ExtentSet::full(MIB)).unwrap();
        for bad in ["", "a\"b.vmdk", "dir/x.vmdk", "new\nline.vmdk", "é.vmdk", &"x".repeat(256)] {
            assert!(matches!(layout.clone().with_name(bad), Err(VmdkError::Unsupported { .. })), "{bad:?}");
        }
        let named = layout.with_name("restored disk.vmdk").unwrap();
        let prefix = named.prefix();
        let text = String::from_utf8_lossy(&prefix[512..21 * 512]).into_owned();
        assert!(text.contains("RW 2048 SPARSE \"restored disk.vmdk\"\n"), "{text}");
    }

    #[test]
    fn impossible_layouts_are_refused() {
        let none = ExtentSet::new();
        for capacity in [0, 511, MIB + 1, (MAX_DISK_SECTORS + 1) * 512] {
            assert!(matches!(SparseLayout::new(capacity, &none), Err(VmdkError::Unsupported { .. })), "{capacity}");
        }
        let past = ExtentSet::from_ranges([(MIB - 512, 513)]);
        assert!(matches!(SparseLayout::new(MIB, &past), Err(VmdkError::Unsupported { .. })));
        // 3 TiB all allocated: more grains than 32-bit sector numbers reach.
        assert!(matches!(SparseLayout::new(3 << 40, &ExtentSet::full(3 << 40)), Err(VmdkError::Unsupported { .. })));
        // Just under 2 TiB of grains fits.
        assert!(SparseLayout::new(3 << 40, &ExtentSet::full(2040 << 30)).is_ok());
    }

    #[test]
    fn write_pads_the_short_last_grain_and_reports_read_errors() {
        let capacity = 3 * 65536 + 1024;
        let layout = SparseLayout::new(capacity, &ExtentSet::from_ranges([(3 * 65536 + 7, 1)])).unwrap();
        let mut out = Vec::new();
        let mut asked = Vec::new();
        let n = layout
            .write(&mut out, |offset, buf| {
                asked.push((offset, buf.len()));
                buf.fill(0xee);
                Ok(())
            })
            .unwrap();
        assert_eq!((n, out.len() as u64), (layout.len(), layout.len()));
        assert_eq!(asked, [(3 * 65536, 1024)]);
        let grain = &out[crate::to_usize(layout.header().overhead * 512)..];
        assert!(grain[..1024].iter().all(|&b| b == 0xee) && grain[1024..].iter().all(|&b| b == 0));
        let failed = layout.write(&mut Vec::new(), |_, _| Err(io::Error::other("gone")));
        assert!(matches!(failed, Err(VmdkError::Io { .. })));
    }

    /// Counts bytes, keeps none.
    struct Counting(u64);

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
