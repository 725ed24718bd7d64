//! Fuzz entry points for the `vmdk` crate: the descriptor parser, the hosted sparse header and
//! grain-table walk, the streamOptimized marker reader, and the COWD and SEsparse headers.
//!
//! Each forces its format's magic onto the input so the fuzzer spends its time past it, then
//! opens, maps and reads what it can; any error is fine, a panic or an overrun is not.

use std::sync::Arc;

use vmdk::{Descriptor, SparseFile, SparseKind, StreamReader};

/// Most bytes read back from one input, so a huge claimed capacity costs no time.
const READ_BUDGET: u64 = 1 << 20;

/// Descriptor text: parse never panics, and what parses formats to text that parses back equal.
pub fn descriptor(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = Descriptor::parse(&text, "fuzz.vmdk") {
        let again = Descriptor::parse(&d.to_string(), "fuzz.vmdk").expect("formatted descriptor parses");
        assert_eq!(again, d, "descriptor does not round-trip");
    }
}

/// A file with this magic at the front, opened as a sparse extent, mapped and read.
fn sparse_with_magic(data: &[u8], magic: &[u8], kind: SparseKind) {
    let mut img = data.to_vec();
    if img.len() < magic.len() {
        return;
    }
    img[..magic.len()].copy_from_slice(magic);
    let len = img.len() as u64;
    let Ok(file) = SparseFile::open(Arc::new(img), "fuzz.vmdk") else { return };
    assert_eq!(file.kind(), kind);
    let (data_map, zero_map) = file.allocation();
    assert!(data_map.end() <= file.capacity() && zero_map.end() <= file.capacity());
    assert!(data_map.intersection(&zero_map).is_empty(), "a grain is both data and zero");
    // Every data grain lies in the file, so the data map is bounded by the file's size (times
    // the compression a deflated grain may have).
    assert!(data_map.total_bytes() <= len.saturating_mul(1100), "more data mapped than the file can hold");
    let mut budget = READ_BUDGET;
    let mut buf = Vec::new();
    for e in data_map.iter().chain(zero_map.iter()) {
        let n = e.len().min(budget).min(64 << 10);
        if n == 0 {
            break;
        }
        buf.resize(n as usize, 0);
        if file.read_at(&mut buf, e.start()).is_ok() && zero_map.contains(e.start()) {
            assert!(buf.iter().all(|&b| b == 0), "a zeroed grain read as data");
        }
        budget -= n;
    }
    let tail = file.capacity().saturating_sub(4096);
    let mut last = vec![0u8; usize::try_from(file.capacity() - tail).unwrap_or(0)];
    let _ = file.read_at(&mut last, tail);
    assert!(file.read_at(&mut [0u8; 1], file.capacity()).is_err(), "a read past the capacity succeeded");
}

/// Hosted sparse (`KDMV`): header checks and the grain directory and table walk.
pub fn sparse(data: &[u8]) {
    sparse_with_magic(data, b"KDMV", SparseKind::Hosted);
}

/// COWD: header checks and the grain walk.
pub fn cowd(data: &[u8]) {
    sparse_with_magic(data, b"COWD", SparseKind::Cowd);
}

/// SEsparse: constant and volatile header checks and the grain walk.
pub fn sesparse(data: &[u8]) {
    let mut magic = vmdk::sesparse::CONST_MAGIC.to_le_bytes().to_vec();
    magic.extend_from_slice(&vmdk::sesparse::VERSION.to_le_bytes());
    sparse_with_magic(data, &magic, SparseKind::SeSparse);
}

/// streamOptimized read front to back: grains come in order, inside the disk, of grain size.
pub fn stream(data: &[u8]) {
    let mut img = data.to_vec();
    if img.len() < 4 {
        return;
    }
    img[..4].copy_from_slice(b"KDMV");
    let Ok(mut r) = StreamReader::new(&img[..], "fuzz.vmdk") else { return };
    let capacity = r.capacity();
    let grain = r.header().grain_size * 512;
    let mut last: Option<u64> = None;
    while let Ok(Some(g)) = r.next_grain() {
        assert!(g.offset < capacity && g.offset + g.data.len() as u64 <= capacity);
        assert!(g.data.len() as u64 <= grain);
        assert!(last.is_none_or(|l| g.offset > l), "grains out of order");
        last = Some(g.offset);
    }
}
