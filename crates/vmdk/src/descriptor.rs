//! VMDK descriptor files: header keys, extent lines, the change-tracking line and the disk
//! database, parsed with fixed caps from untrusted text and formatted so that a parse of the
//! output gives the same descriptor back.

use std::borrow::Cow;
use std::fmt;

use crate::error::{Result, VmdkError};

/// Largest descriptor read (qemu reads at most 1 MiB - 1).
pub const MAX_DESCRIPTOR_BYTES: usize = (1 << 20) - 1;
/// Longest line accepted.
const MAX_LINE: usize = 4096;
/// Most extents in one descriptor (a 64 TiB disk split in 2 GB pieces needs 32 768).
pub const MAX_EXTENTS: usize = 65_536;
/// Longest extent file name (qemu's limit).
const MAX_FILE_NAME: usize = 511;
/// Largest virtual disk: 64 TiB, in sectors.
pub const MAX_DISK_SECTORS: u64 = 64 << 31;
/// The parentCID of a disk without a parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// How an extent may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and write.
    ReadWrite,
    /// Read only.
    ReadOnly,
    /// No access.
    NoAccess,
}

/// What an extent is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Plain bytes in a file (hosted).
    Flat,
    /// A hosted sparse (`KDMV`) file.
    Sparse,
    /// No file: reads as zeros.
    Zero,
    /// Plain bytes in a file on VMFS.
    Vmfs,
    /// A COWD redo log (snapshot delta on VMFS 5).
    VmfsSparse,
    /// An SEsparse delta (VMFS 6 and large disks).
    SeSparse,
    /// A virtual-mode raw device mapping.
    VmfsRdm,
    /// A raw device.
    VmfsRaw,
    /// A vSAN sparse delta.
    VsanSparse,
}

impl ExtentKind {
    const ALL: [(ExtentKind, &'static str); 9] = [
        (Self::Flat, "FLAT"),
        (Self::Sparse, "SPARSE"),
        (Self::Zero, "ZERO"),
        (Self::Vmfs, "VMFS"),
        (Self::VmfsSparse, "VMFSSPARSE"),
        (Self::SeSparse, "SESPARSE"),
        (Self::VmfsRdm, "VMFSRDM"),
        (Self::VmfsRaw, "VMFSRAW"),
        (Self::VsanSparse, "VSANSPARSE"),
    ];

    /// The keyword in a descriptor.
    pub fn keyword(self) -> &'static str {
        Self::ALL.iter().find(|(k, _)| *k == self).map_or("?", |(_, s)| s)
    }

    fn parse(word: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, s)| s.eq_ignore_ascii_case(word)).map(|(k, _)| *k)
    }
}

impl Access {
    fn keyword(self) -> &'static str {
        match self {
            Self::ReadWrite => "RW",
            Self::ReadOnly => "RDONLY",
            Self::NoAccess => "NOACCESS",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        [Self::ReadWrite, Self::ReadOnly, Self::NoAccess].into_iter().find(|a| a.keyword().eq_ignore_ascii_case(word))
    }
}

/// One extent line: `RW 2048 SPARSE "disk.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// The access mode.
    pub access: Access,
    /// The extent's size in sectors (never zero).
    pub sectors: u64,
    /// What the extent is made of.
    pub kind: ExtentKind,
    /// The file, relative to the descriptor unless absolute (none for `ZERO`).
    pub file: Option<String>,
    /// The offset in sectors into the file (FLAT).
    pub offset: Option<u64>,
    /// Anything after the offset (device extents carry `partitionUUID ...`), kept verbatim.
    pub extra: Vec<String>,
}

/// A value in the header or the disk database, and whether it was quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The text without its quotes.
    pub text: String,
    /// Whether it was written in double quotes.
    pub quoted: bool,
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Header keys in their order (`version`, `CID`, `parentCID`, `createType`, ...), unknown
    /// ones included.
    pub header: Vec<(String, Value)>,
    /// The extents, in order; the disk is their concatenation.
    pub extents: Vec<ExtentLine>,
    /// The `changeTrackPath`, when CBT is on (quoted or not, as written).
    pub change_track_path: Option<Value>,
    /// The disk database (`ddb.*` keys), in order, unknown keys kept verbatim.
    pub ddb: Vec<(String, Value)>,
}

impl Descriptor {
    /// Parses descriptor text. `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let err = |line: usize, what: String| VmdkError::Descriptor { file: file.to_owned(), line, what };
        if text.len() > MAX_DESCRIPTOR_BYTES {
            return Err(err(
                0,
                format!("{} bytes is more than a descriptor may be ({MAX_DESCRIPTOR_BYTES})", text.len()),
            ));
        }
        let mut d = Descriptor { header: Vec::new(), extents: Vec::new(), change_track_path: None, ddb: Vec::new() };
        let mut total_sectors: u64 = 0;
        for (i, raw) in text.split('\n').enumerate() {
            let n = i + 1;
            if raw.len() > MAX_LINE {
                return Err(err(n, format!("line of {} bytes is longer than {MAX_LINE}", raw.len())));
            }
            let line = raw.trim_matches(|c: char| c.is_ascii_whitespace());
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.chars().any(|c| c.is_control() && c != '\t') {
                return Err(err(n, "control character in the line".into()));
            }
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if let Some(access) = Access::parse(first) {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(err(n, format!("more than {MAX_EXTENTS} extents")));
                }
                let extent = parse_extent(access, line).map_err(|what| err(n, what))?;
                total_sectors = total_sectors
                    .checked_add(extent.sectors)
                    .filter(|&t| t <= MAX_DISK_SECTORS)
                    .ok_or_else(|| err(n, "the extents add up to more than 64 TiB".into()))?;
                d.extents.push(extent);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(err(n, format!("expected `key=value` or an extent line, found {line:?}")));
            };
            // ASCII trimming only, as for the line: a Unicode-trimmed key could come out
            // starting with `#` and read back as a comment (found by fuzzing).
            let key = key.trim_ascii();
            if key.is_empty() || key.contains(|c: char| c.is_ascii_whitespace() || c == '"') {
                return Err(err(n, format!("bad key {key:?}")));
            }
            let value = parse_value(value.trim_ascii()).map_err(|what| err(n, what))?;
            // Byte-wise: a key may hold multi-byte characters, and slicing a str at 4 could
            // split one (found by fuzzing).
            if key.len() > 4 && key.as_bytes()[..4].eq_ignore_ascii_case(b"ddb.") {
                d.ddb.push((key.to_owned(), value));
            } else if key.eq_ignore_ascii_case("changeTrackPath") {
                d.change_track_path = Some(value);
            } else {
                d.header.push((key.to_owned(), value));
            }
        }
        d.validate(file)?;
        Ok(d)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let bad = |what: String| VmdkError::Descriptor { file: file.to_owned(), line: 0, what };
        match self.get("version") {
            Some("1" | "2" | "3") => {}
            Some(v) => return Err(bad(format!("version {v:?} is not 1, 2 or 3"))),
            None => return Err(bad("no `version` line".into())),
        }
        for key in ["CID", "parentCID"] {
            if let Some(v) = self.get(key) {
                parse_cid(v).ok_or_else(|| bad(format!("{key} {v:?} is not 1 to 8 hex digits")))?;
            }
        }
        if self.get("createType").is_none() {
            return Err(bad("no `createType` line".into()));
        }
        Ok(())
    }

    /// A header value by key (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.header.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.text.as_str())
    }

    /// A disk-database value by key (with its `ddb.` prefix, case-insensitive).
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.text.as_str())
    }

    /// The `createType`.
    pub fn create_type(&self) -> &str {
        self.get("createType").unwrap_or("")
    }

    /// The content ID (`CID`), when present.
    pub fn cid(&self) -> Option<u32> {
        self.get("CID").and_then(parse_cid)
    }

    /// The parent's content ID, or [`NO_PARENT_CID`].
    pub fn parent_cid(&self) -> u32 {
        self.get("parentCID").and_then(parse_cid).unwrap_or(NO_PARENT_CID)
    }

    /// The parent's file name, for a delta.
    pub fn parent_file_name_hint(&self) -> Option<&str> {
        self.get("parentFileNameHint")
    }

    /// The virtual disk's size in sectors: the sum of the extents.
    pub fn sectors(&self) -> u64 {
        // Checked against MAX_DISK_SECTORS while parsing.
        self.extents.iter().map(|e| e.sectors).sum()
    }

    /// Sets a header key, keeping its place if present.
    pub fn set(&mut self, key: &str, text: &str, quoted: bool) {
        let value = Value { text: text.to_owned(), quoted };
        match self.header.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(key)) {
            Some((_, v)) => *v = value,
            None => self.header.push((key.to_owned(), value)),
        }
    }
}

/// Descriptor text from raw bytes: everything before the first NUL (descriptors, embedded or
/// standalone, are NUL-padded to a sector), decoded as the descriptor's `encoding` key says.
/// ESXi writes `UTF-8`; older hosted products wrote `windows-1252` (read here as the WHATWG
/// label does, ISO-8859-1 included). Without the key the text must be UTF-8; under any other
/// declared encoding it must be ASCII. `file` names the file in errors.
pub(crate) fn decode_text<'a>(raw: &'a [u8], file: &str) -> Result<Cow<'a, str>> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let raw = &raw[..end];
    let declared = declared_encoding(raw);
    let label = declared.as_deref().map(str::to_ascii_lowercase);
    match label.as_deref() {
        Some("windows-1252" | "cp1252" | "iso-8859-1" | "iso8859-1" | "latin1" | "us-ascii" | "ascii") => {
            Ok(Cow::Owned(raw.iter().map(|&b| windows_1252(b)).collect()))
        }
        None | Some("utf-8" | "utf8") => std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|e| {
            let said = declared
                .as_deref()
                .map_or_else(|| "declares no encoding".to_owned(), |d| format!("declares encoding {d:?}"));
            VmdkError::corrupt(
                file,
                format!(
                    "the descriptor {said} but is not UTF-8: byte {:#04x} at offset {}",
                    raw[e.valid_up_to()],
                    e.valid_up_to()
                ),
            )
        }),
        Some(_) => match raw.iter().position(|b| !b.is_ascii()) {
            None => Ok(Cow::Borrowed(std::str::from_utf8(raw).unwrap_or_default())),
            Some(at) => Err(VmdkError::unsupported(
                file,
                format!(
                    "the descriptor's encoding {:?} (non-ASCII byte {:#04x} at offset {at}); UTF-8 and windows-1252 are read",
                    declared.unwrap_or_default(),
                    raw[at]
                ),
            )),
        },
    }
}

/// The controller an embedded descriptor we write names, which sets its BIOS geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Adapter {
    /// IDE: 16 heads, at most 65535 cylinders (what our streamOptimized files say).
    Ide,
    /// LSI Logic SCSI: 255 heads, as VMware gives SCSI disks, cylinders unbounded.
    LsiLogic,
}

/// The descriptor embedded in a hosted sparse file we write: one `SPARSE` extent of `sectors`
/// named `extent_name`, no parent, and the geometry VMware tools expect for `adapter`.
pub(crate) fn embedded_descriptor(create_type: &str, sectors: u64, extent_name: &str, adapter: Adapter) -> String {
    descriptor_text(create_type, "SPARSE", sectors, extent_name, adapter)
}

/// The descriptor of a VMFS flat disk of `capacity` bytes (whole sectors) whose one extent is
/// the raw file `extent_name` beside it (`disk-flat.vmdk`): what a thick disk uploaded to a
/// datastore as two files needs. A SCSI (LSI Logic) geometry.
pub fn flat_descriptor(capacity: u64, extent_name: &str) -> String {
    descriptor_text("vmfs", "VMFS", capacity / 512, extent_name, Adapter::LsiLogic)
}

fn descriptor_text(create_type: &str, kind: &str, sectors: u64, extent_name: &str, adapter: Adapter) -> String {
    // A content ID derived from the size and name: stable for the same input.
    let seed = sectors.to_le_bytes().into_iter().chain(extent_name.bytes());
    let cid = seed.fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    let (heads, cylinders, adapter) = match adapter {
        Adapter::Ide => (16, (sectors / (16 * 63)).clamp(1, 65535), "ide"),
        Adapter::LsiLogic => (255, (sectors / (255 * 63)).max(1), "lsilogic"),
    };
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
         # Extent description\nRW {sectors} {kind} \"{extent_name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"{adapter}\"\n"
    )
}

/// The value of the `encoding` key, found in the raw bytes before they can be decoded.
fn declared_encoding(raw: &[u8]) -> Option<String> {
    raw.split(|&b| b == b'\n').find_map(|line| {
        let (key, value) = line.trim_ascii().split_at_checked(8)?;
        if !key.eq_ignore_ascii_case(b"encoding") {
            return None;
        }
        let value = value.trim_ascii().strip_prefix(b"=")?.trim_ascii();
        let value = value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value);
        Some(String::from_utf8_lossy(value).into_owned())
    })
}

/// One windows-1252 byte as a character: Latin-1, except the printable characters at
/// 0x80-0x9F (the five bytes windows-1252 leaves undefined map to C1 controls, as in WHATWG).
fn windows_1252(b: u8) -> char {
    const HIGH: [u16; 32] = [
        0x20ac, 0x0081, 0x201a, 0x0192, 0x201e, 0x2026, 0x2020, 0x2021, 0x02c6, 0x2030, 0x0160, 0x2039, 0x0152, 0x008d,
        0x017d, 0x008f, 0x0090, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x02dc, 0x2122, 0x0161, 0x203a,
        0x0153, 0x009d, 0x017e, 0x0178,
    ];
    match b {
        0x80..=0x9f => char::from_u32(u32::from(HIGH[usize::from(b - 0x80)])).unwrap_or('\u{fffd}'),
        _ => char::from(b),
    }
}

/// Reads a CID: up to 8 hex digits (VMware pads to 8; qemu does not).
pub fn parse_cid(text: &str) -> Option<u32> {
    ((1..=8).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(text, 16).ok())?
}

fn parse_value(text: &str) -> Result<Value, String> {
    if let Some(rest) = text.strip_prefix('"') {
        let inner = rest.strip_suffix('"').ok_or("unterminated quoted value")?;
        if inner.contains('"') {
            return Err("a quote inside a quoted value".into());
        }
        Ok(Value { text: inner.to_owned(), quoted: true })
    } else {
        Ok(Value { text: text.to_owned(), quoted: false })
    }
}

fn parse_extent(access: Access, line: &str) -> Result<ExtentLine, String> {
    // ACCESS SECTORS TYPE ["FILE" [OFFSET [extra...]]]
    let mut rest = line.trim_start();
    let mut word = || -> Option<&str> {
        let t = rest.trim_start();
        let end = t.find(|c: char| c.is_ascii_whitespace()).unwrap_or(t.len());
        let (w, r) = t.split_at(end);
        rest = r;
        (!w.is_empty()).then_some(w)
    };
    word();
    let sectors = word().ok_or("extent line without a size")?;
    let sectors: u64 = sectors.parse().map_err(|_| format!("extent size {sectors:?} is not a whole number"))?;
    if sectors == 0 {
        return Err("extent of zero sectors".into());
    }
    let kind_word = word().ok_or("extent line without a type")?;
    let kind = ExtentKind::parse(kind_word).ok_or_else(|| format!("unknown extent type {kind_word:?}"))?;
    let tail = rest.trim_start();
    let (file, after) = if let Some(q) = tail.strip_prefix('"') {
        let end = q.find('"').ok_or("unterminated file name")?;
        let name = &q[..end];
        if name.is_empty() || name.len() > MAX_FILE_NAME {
            return Err(format!("file name of {} bytes (1 to {MAX_FILE_NAME} allowed)", name.len()));
        }
        (Some(name.to_owned()), &q[end + 1..])
    } else if tail.is_empty() {
        (None, "")
    } else {
        return Err(format!("expected a quoted file name, found {tail:?}"));
    };
    let mut words = after.split_ascii_whitespace();
    let offset = match words.next() {
        Some(o) => Some(o.parse::<u64>().map_err(|_| format!("extent offset {o:?} is not a whole number"))?),
        None => None,
    };
    let extra: Vec<String> = words.map(str::to_owned).collect();
    if kind != ExtentKind::Zero && file.is_none() {
        return Err(format!("{} extent without a file", kind.keyword()));
    }
    Ok(ExtentLine { access, sectors, kind, file, offset, extra })
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.quoted { write!(f, "\"{}\"", self.text) } else { f.write_str(&self.text) }
    }
}

impl fmt::Display for ExtentLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.access.keyword(), self.sectors, self.kind.keyword())?;
        if let Some(file) = &self.file {
            write!(f, " \"{file}\"")?;
            if let Some(offset) = self.offset {
                write!(f, " {offset}")?;
            }
            for x in &self.extra {
                write!(f, " {x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Descriptor {
    /// The layout VMware and qemu write: header, extents, change tracking, disk database.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# Disk DescriptorFile")?;
        for (k, v) in &self.header {
            writeln!(f, "{k}={v}")?;
        }
        writeln!(f, "\n# Extent description")?;
        for e in &self.extents {
            writeln!(f, "{e}")?;
        }
        if let Some(ctk) = &self.change_track_path {
            writeln!(f, "\n# Change Tracking File\nchangeTrackPath={ctk}")?;
        }
        writeln!(f, "\n# The Disk Data Base\n#DDB\n")?;
        for (k, v) in &self.ddb {
            writeln!(f, "{k} = {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_descriptor_reads_back_as_one_vmfs_extent_of_the_size() {
        let text = flat_descriptor(8 << 20, "d-flat.vmdk");
        let d = Descriptor::parse(&text, "d.vmdk").unwrap();
        assert_eq!((d.create_type(), d.sectors()), ("vmfs", (8 << 20) / 512));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].kind, ExtentKind::Vmfs);
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
    }

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=52e3b1c4\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 2048 SPARSE \"t.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"2\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_and_round_trips_what_qemu_writes() {
        let d = Descriptor::parse(QEMU, "t.vmdk").unwrap();
        assert_eq!(d.cid(), Some(0x52e3_b1c4));
        assert_eq!(d.parent_cid(), NO_PARENT_CID);
        assert_eq!(d.create_type(), "monolithicSparse");
        assert_eq!(d.extents[0].kind, ExtentKind::Sparse);
        assert_eq!(d.sectors(), 2048);
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        let again = Descriptor::parse(&d.to_string(), "t.vmdk").unwrap();
        assert_eq!(again, d);
        assert_eq!(again.to_string(), d.to_string());
    }

    #[test]
    fn reads_deltas_ctk_crlf_and_device_extents() {
        let text = "version=3\r\nCID=0000000a\r\nparentCID=00000009\r\ncreateType=\"vmfsSparse\"\r\nparentFileNameHint=\"base.vmdk\"\r\nRW 100 VMFSSPARSE \"d-delta.vmdk\"\r\nrdonly 8 zero\r\nRW 16 FLAT \"\\\\.\\PhysicalDrive0\" 63 partitionUUID 1234\r\nchangeTrackPath=\"d-ctk.vmdk\"\r\nddb.custom = \"kept\"\r\n";
        let d = Descriptor::parse(text, "d.vmdk").unwrap();
        assert_eq!(d.parent_cid(), 9);
        assert_eq!(d.parent_file_name_hint(), Some("base.vmdk"));
        assert_eq!(d.change_track_path.as_ref().map(|v| v.text.as_str()), Some("d-ctk.vmdk"));
        // Found by fuzzing: an unquoted value with a quote in it must stay unquoted.
        let odd = Descriptor::parse("version=1\ncreateType=x\nchangeTrackPath=a\"b\n", "x").unwrap();
        assert_eq!(Descriptor::parse(&odd.to_string(), "x").unwrap(), odd);
        assert_eq!(d.extents.len(), 3);
        assert_eq!(
            d.extents[1],
            ExtentLine {
                access: Access::ReadOnly,
                sectors: 8,
                kind: ExtentKind::Zero,
                file: None,
                offset: None,
                extra: vec![]
            }
        );
        assert_eq!(d.extents[2].offset, Some(63));
        assert_eq!(d.extents[2].extra, ["partitionUUID", "1234"]);
        assert_eq!(Descriptor::parse(&d.to_string(), "d.vmdk").unwrap(), d);
    }

    #[test]
    fn declared_encodings_decode_and_anything_else_is_refused_without_panicking() {
        let text = b"version=1\r\n  ENCODING = windows-1252\r\nddb.x = \"\x80\x81\x9f\xe9\xff\"\0junk\xff";
        let d = decode_text(text, "x").unwrap();
        assert!(d.ends_with("\"\u{20ac}\u{81}\u{178}\u{e9}\u{ff}\""), "{d:?}");
        assert!(matches!(decode_text(b"version=1\n\xe9", "x"), Err(VmdkError::Corrupt { .. })));
        assert!(matches!(decode_text(b"encoding=\"GBK\"\n\xe9", "x"), Err(VmdkError::Unsupported { .. })));
        assert_eq!(decode_text(b"encoding=\"GBK\"\nversion=1", "x").unwrap(), "encoding=\"GBK\"\nversion=1");
        // Every byte value, under every label, decodes or is refused; nothing panics.
        let all: Vec<u8> = (1..=255).collect();
        let labels: [&[u8]; 5] =
            [b"", b"encoding=\"UTF-8\"\n", b"encoding=\"windows-1252\"\n", b"encoding=\"x\"\n", b"encoding=\xff\n"];
        for label in labels {
            let _ = decode_text(&[label, &all].concat(), "x");
        }
    }

    #[test]
    fn table_of_refusals() {
        let cases = [
            ("CID=1\ncreateType=\"x\"\n", "no `version`"),
            ("version=4\ncreateType=\"x\"\n", "not 1, 2 or 3"),
            ("version=1\nCID=123456789\ncreateType=\"x\"\n", "not 1 to 8 hex digits"),
            ("version=1\nparentCID=xyz\ncreateType=\"x\"\n", "not 1 to 8 hex digits"),
            ("version=1\n", "no `createType`"),
            ("version=1\ncreateType=\"x\"\nRW 0 FLAT \"f\" 0\n", "zero sectors"),
            ("version=1\ncreateType=\"x\"\nRW -1 FLAT \"f\" 0\n", "not a whole number"),
            ("version=1\ncreateType=\"x\"\nRW 1 BOGUS \"f\"\n", "unknown extent type"),
            ("version=1\ncreateType=\"x\"\nRW 1 FLAT \"f\n", "unterminated"),
            ("version=1\ncreateType=\"x\"\nRW 1 FLAT\n", "without a file"),
            ("version=1\ncreateType=\"x\"\nRW 137438953472 FLAT \"a\"\nRW 1 FLAT \"b\"\n", "64 TiB"),
            ("version=1\ncreateType=\"x\nbroken\n", "unterminated quoted"),
            ("version=1\ncreateType=\"x\"\nnonsense\n", "expected `key=value`"),
            ("version=1\ncreateType=\"x\"\nkey=\u{1}\n", "control character"),
        ];
        for (text, expected) in cases {
            let e = Descriptor::parse(text, "x.vmdk").unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        // Found by fuzzing: a key behind a non-breaking space must not turn into a comment.
        let nbsp = Descriptor::parse("version=1\ncreateType=x\n\u{a0}#k=v\n", "x").unwrap();
        assert_eq!(Descriptor::parse(&nbsp.to_string(), "x").unwrap(), nbsp);
        // Found by fuzzing: a multi-byte character across byte 4 of a key.
        assert!(Descriptor::parse("version=1\ncre\u{e1}teType=\"x\"\n", "x").is_err());
        let d = Descriptor::parse("version=1\ncreateType=\"x\"\nd\u{e1}b.x = \"y\"\n", "x").unwrap();
        assert_eq!(d.get("d\u{e1}b.x"), Some("y"));
        let huge = "#".repeat(MAX_DESCRIPTOR_BYTES + 1);
        assert!(Descriptor::parse(&huge, "x").is_err());
    }
}
