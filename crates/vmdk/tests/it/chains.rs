//! The independent oracle for deltas: chains of COWD and SEsparse deltas written by our writers
//! over a base made by qemu-img, read by qemu-img and by our reader; both must equal the ground
//! truth image of every layer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use cbt::ExtentSet;
use testkit::{run, same_contents};
use vmdk::testing::{random_sparse_image, xorshift};
use vmdk::{DeltaContent, Descriptor, Disk, PathPolicy, VmdkError};

use crate::{assert_reads_as, qemu_img, qemu_to_raw};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB + 4096;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Cowd,
    SeSparse,
}

/// Applies pseudo-random writes (and, for SEsparse, zeroed ranges) to `truth`; returns them.
fn mutate(truth: &Path, seed: u64) -> (ExtentSet, ExtentSet) {
    let f = std::fs::OpenOptions::new().write(true).open(truth).unwrap();
    let mut next = xorshift(seed);
    let mut written = Vec::new();
    let mut zeroed = Vec::new();
    for i in 0..20 {
        let len = next() % (256 * 1024) + 1;
        let start = next() % (SIZE - len);
        if i % 4 == 0 {
            f.write_all_at(&vec![0; len as usize], start).unwrap();
            zeroed.push((start, len));
        } else {
            let data: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[2]).collect();
            f.write_all_at(&data, start).unwrap();
            written.push((start, len));
        }
    }
    (ExtentSet::from_ranges(written), ExtentSet::from_ranges(zeroed))
}

fn delta_descriptor(kind: Kind, cid: u32, parent_cid: u32, parent: &str, extent: &str) -> String {
    let (create_type, extent_type) = match kind {
        Kind::Cowd => ("vmfsSparse", "VMFSSPARSE"),
        Kind::SeSparse => ("seSparse", "SESPARSE"),
    };
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID={parent_cid:08x}\n\
         isNativeSnapshot=\"no\"\ncreateType=\"{create_type}\"\nparentFileNameHint=\"{parent}\"\n\n\
         # Extent description\nRW {} {extent_type} \"{extent}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.longContentID = \"0123456789abcdef0123456789abcdef\"\n",
        SIZE / 512
    )
}

/// Builds base + 2 deltas of `kind`; checks each layer with qemu-img and with our reader.
fn chain_of(kind: Kind, test: &str) {
    let Some(qemu) = qemu_img(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let truth = d.join("truth.raw");
    random_sparse_image(&truth, SIZE, 15, 42).unwrap();
    run(Command::new(&qemu)
        .args(["convert", "-O", "vmdk", "-o", "subformat=monolithicSparse"])
        .arg(&truth)
        .arg(d.join("base.vmdk")));
    let mut parent = "base.vmdk".to_owned();
    let mut parent_cid = Disk::open(d.join("base.vmdk"), PathPolicy::SameDirectory).unwrap().layers()[0]
        .descriptor
        .as_ref()
        .and_then(Descriptor::cid)
        .unwrap();
    for level in 1..=2u32 {
        let (written, zeroed) = mutate(&truth, u64::from(level) * 977);
        let view = File::open(&truth).unwrap();
        let extent = format!("snap{level}-delta.vmdk");
        let mut out = File::create(d.join(&extent)).unwrap();
        let content = DeltaContent { view: &view, capacity: SIZE, written: &written, zeroed: &zeroed };
        match kind {
            Kind::Cowd => vmdk::cowd::write(&mut out, content, 1).unwrap(),
            Kind::SeSparse => vmdk::sesparse::write(&mut out, content).unwrap(),
        }
        let cid = 0x1000 + level;
        let name = format!("snap{level}.vmdk");
        std::fs::write(d.join(&name), delta_descriptor(kind, cid, parent_cid, &parent, &extent)).unwrap();
        // qemu-img reads the chain: the independent oracle.
        let theirs = d.join(format!("theirs{level}.raw"));
        qemu_to_raw(&qemu, &d.join(&name), &theirs);
        same_contents(&theirs, &truth).unwrap().unwrap_or_else(|e| panic!("{kind:?} level {level}, qemu-img: {e}"));
        // And ours.
        assert_reads_as(&d.join(&name), &truth);
        let disk = Disk::open(d.join(&name), PathPolicy::SameDirectory).unwrap();
        assert_eq!(disk.layers().len(), level as usize + 1);
        (parent, parent_cid) = (name, cid);
    }

    // The same chain through a `Files` that is not the file system (as a datastore over HTTPS
    // is): every file held in memory, under names that exist nowhere on disk.
    let memory = Memory(
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (Path::new("/nowhere").join(p.file_name().unwrap()), std::fs::read(&p).unwrap()))
            .collect(),
    );
    let disk = Disk::open_in(&memory, Path::new("/nowhere").join(&parent), PathPolicy::SameDirectory).unwrap();
    assert_eq!(disk.layers().len(), 3);
    let want = std::fs::read(&truth).unwrap();
    let mut got = vec![0u8; want.len()];
    disk.read_at(&mut got, 0).unwrap();
    assert!(got == want, "{kind:?}: the chain read through memory differs from the truth");

    // A CID that does not match is refused, naming both files.
    let bad = d.join("bad.vmdk");
    std::fs::write(&bad, delta_descriptor(kind, 7, 0xdead_beef, &parent, "snap1-delta.vmdk")).unwrap();
    match Disk::open(&bad, PathPolicy::SameDirectory) {
        Err(VmdkError::CidMismatch { expected: 0xdead_beef, .. }) => {}
        other => panic!("expected a CID mismatch, got {other:?}"),
    }
}

/// Files held in memory by path.
struct Memory(std::collections::HashMap<std::path::PathBuf, Vec<u8>>);

impl vmdk::Files for Memory {
    fn open(&self, path: &Path) -> std::io::Result<std::sync::Arc<dyn vmdk::ReadAt>> {
        let bytes = self.0.get(path).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(std::sync::Arc::new(bytes.clone()))
    }

    fn identity(&self, path: &Path) -> std::io::Result<std::path::PathBuf> {
        Ok(path.to_path_buf())
    }
}

#[test]
fn cowd_chain_matches_qemu_and_truth() {
    chain_of(Kind::Cowd, "cowd_chain_matches_qemu_and_truth");
}

#[test]
fn sesparse_chain_matches_qemu_and_truth() {
    chain_of(Kind::SeSparse, "sesparse_chain_matches_qemu_and_truth");
}
