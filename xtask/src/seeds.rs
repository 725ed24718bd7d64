//! `cargo xtask fuzz-seeds`: makes the VMDK fuzz targets' seed corpora from real files:
//! qemu-img output of each subformat, and the deltas and streams our own writers make.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use cbt::ExtentSet;

/// A small raw image: 256 KiB with a few runs of data, so the VMDKs made from it stay small.
fn small_raw(path: &Path) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(256 << 10)?;
    for (i, at) in [0u64, 70_000, 200_000].into_iter().enumerate() {
        let data: Vec<u8> = (0..3000u32).map(|j| (j * 7).to_le_bytes()[0] ^ i.to_le_bytes()[0]).collect();
        f.write_all_at(&data, at)?;
    }
    Ok(())
}

pub(crate) fn make(root: &Path) -> Result<()> {
    let seeds = root.join("fuzz/seeds");
    let tmp = crate::target_dir(root).join("fuzz-seeds");
    std::fs::create_dir_all(&tmp)?;
    let raw = tmp.join("small.raw");
    small_raw(&raw)?;
    let qemu = |args: &[&str]| {
        crate::run(Command::new("qemu-img").args(args)).context("qemu-img (apt-get install qemu-utils)")
    };
    let raw_s = raw.to_str().context("path")?;
    for sub in ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse", "monolithicFlat"] {
        let out = tmp.join(format!("{sub}.vmdk"));
        qemu(&["convert", "-O", "vmdk", "-o", &format!("subformat={sub}"), raw_s, out.to_str().context("path")?])?;
    }
    let copy = |from: &str, target: &str, name: &str| -> Result<()> {
        std::fs::create_dir_all(seeds.join(target))?;
        std::fs::copy(tmp.join(from), seeds.join(target).join(name))?;
        Ok(())
    };
    copy("monolithicSparse.vmdk", "vmdk_sparse", "qemu-monolithicSparse")?;
    copy("twoGbMaxExtentSparse-s001.vmdk", "vmdk_sparse", "qemu-twoGbMaxExtentSparse-s001")?;
    copy("streamOptimized.vmdk", "vmdk_stream", "qemu-streamOptimized")?;
    copy("streamOptimized.vmdk", "vmdk_sparse", "qemu-streamOptimized")?;
    copy("twoGbMaxExtentSparse.vmdk", "vmdk_descriptor", "qemu-twoGbMaxExtentSparse")?;
    copy("monolithicFlat.vmdk", "vmdk_descriptor", "qemu-monolithicFlat")?;

    // Our writers: a stream, a COWD and an SEsparse delta over the same bytes.
    let view = File::open(&raw)?;
    let capacity = 256 << 10;
    let written = ExtentSet::from_ranges([(0, 3000), (70_000, 3000), (200_000, 3000)]);
    let zeroed = ExtentSet::from_ranges([(131_072, 8192)]);
    let content = vmdk::DeltaContent { view: &view, capacity, written: &written, zeroed: &zeroed };
    std::fs::create_dir_all(seeds.join("vmdk_cowd"))?;
    std::fs::create_dir_all(seeds.join("vmdk_sesparse"))?;
    vmdk::cowd::write(&mut File::create(seeds.join("vmdk_cowd/ours-grain1"))?, content, 1)?;
    vmdk::cowd::write(&mut File::create(seeds.join("vmdk_cowd/ours-grain8"))?, content, 8)?;
    vmdk::sesparse::write(&mut File::create(seeds.join("vmdk_sesparse/ours"))?, content)?;
    vmdk::write_stream_optimized(
        &mut File::create(seeds.join("vmdk_stream/ours"))?,
        &view,
        capacity,
        None,
        "ours.vmdk",
    )?;
    std::fs::write(seeds.join("vmdk_sparse/tiny-by-hand"), vmdk::testing::tiny_sparse_image())?;
    std::fs::write(
        seeds.join("vmdk_descriptor/ours-sesparse-delta"),
        "# Disk DescriptorFile\nversion=3\nencoding=\"UTF-8\"\nCID=00001002\nparentCID=00001001\nisNativeSnapshot=\"no\"\n\
         createType=\"seSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n# Extent description\nRW 512 SESPARSE \"snap-sesparse.vmdk\"\n\
         \n# Change Tracking File\nchangeTrackPath=\"snap-ctk.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n",
    )?;
    println!("seeds written under {}", seeds.display());
    Ok(())
}
