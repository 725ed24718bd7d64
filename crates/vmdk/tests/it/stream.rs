//! streamOptimized: our writer checked by `qemu-img compare`, and the sequential marker reader
//! checked against random access and against qemu-made files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;

use testkit::{run, same_contents};
use vmdk::testing::random_sparse_image;
use vmdk::{Disk, PathPolicy, SparseFile, StreamReader, write_stream_optimized};

use crate::qemu_img;

const MIB: u64 = 1 << 20;

/// Replays a stream front to back into a raw file.
fn replay(stream: &std::path::Path, out: &std::path::Path) -> u64 {
    let mut r = StreamReader::new(std::io::BufReader::new(File::open(stream).unwrap()), "s").unwrap();
    let f = File::create(out).unwrap();
    f.set_len(r.capacity()).unwrap();
    let mut grains = 0;
    while let Some(g) = r.next_grain().unwrap() {
        f.write_all_at(&g.data, g.offset).unwrap();
        grains += 1;
    }
    grains
}

#[test]
fn our_stream_reads_back_sequentially_and_at_random() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 20 * MIB + 3 * 512;
    random_sparse_image(&raw, size, 25, 9).unwrap();
    let vmdk = dir.path().join("out.vmdk");
    let src = File::open(&raw).unwrap();
    let stats = write_stream_optimized(&mut File::create(&vmdk).unwrap(), &src, size, None, "out.vmdk").unwrap();
    assert!(stats.grains > 0 && stats.file_bytes < size);

    let sequential = dir.path().join("seq.raw");
    assert_eq!(replay(&vmdk, &sequential), stats.grains);
    same_contents(&sequential, &raw).unwrap().unwrap();

    let file = SparseFile::open(Arc::new(File::open(&vmdk).unwrap()), "out.vmdk").unwrap();
    assert_eq!(file.capacity(), size);
    crate::assert_reads_as(&vmdk, &raw);
}

#[test]
fn qemu_compares_our_stream_equal_to_its_source() {
    let Some(qemu) = qemu_img("qemu_compares_our_stream_equal_to_its_source") else { return };
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [3 * MIB + 1024, 40 * MIB].into_iter().enumerate() {
        let raw = dir.path().join(format!("src{i}.raw"));
        random_sparse_image(&raw, size, 30, 100 + i as u64).unwrap();
        let vmdk = dir.path().join(format!("ours{i}.vmdk"));
        write_stream_optimized(&mut File::create(&vmdk).unwrap(), &File::open(&raw).unwrap(), size, None, "ours.vmdk")
            .unwrap();
        run(Command::new(&qemu).args(["compare", "-f", "vmdk", "-F", "raw"]).arg(&vmdk).arg(&raw));
        let info = run(Command::new(&qemu).args(["info", "--output=json"]).arg(&vmdk));
        assert!(info.contains("streamOptimized"), "{info}");
    }
}

#[test]
fn qemu_streams_replay_sequentially() {
    let Some(qemu) = qemu_img("qemu_streams_replay_sequentially") else { return };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    random_sparse_image(&raw, 33 * MIB + 512, 25, 3).unwrap();
    let vmdk = dir.path().join("q.vmdk");
    run(Command::new(&qemu).args(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"]).arg(&raw).arg(&vmdk));
    let replayed = dir.path().join("replayed.raw");
    replay(&vmdk, &replayed);
    same_contents(&replayed, &raw).unwrap().unwrap();
    assert!(Disk::open(&vmdk, PathPolicy::SameDirectory).is_ok());
}
