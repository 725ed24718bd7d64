//! The VDDK sink against the fake library and the simulator's session: an existing disk, named
//! `[datastore] path` as the VM's devices list it, passes the shared sink suite; a pattern with
//! holes copied into it by the engine over old data reads back byte for byte; writes of part of
//! a sector are refused with nothing changed.
//!
//! The fake finds `[ds] path` under `FAKE_VDDK_DATASTORES`, which a test cannot set in its own
//! process without `unsafe` (and which is process-global): each test re-runs itself alone in a
//! child process with it pointing at a fresh folder.

mod common;

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cbt::ExtentSet;
use common::{start, vddk, vm};
use pipeline::conformance::{MemSource, check_sink, pattern};
use pipeline::{BlockSink, CopyOptions, Digests, DiskCopy, Engine, ErrorKind, copy_disk};
use vsphere::{Client, Vm};
use vsphere_io::{OpenError, VddkSink, VddkTarget};
use vsphere_sim::Sim;

const MIB: u64 = 1 << 20;
const ENV: &str = "FAKE_VDDK_DATASTORES";

fn us(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

/// In the child, the fake's datastore folder. In the parent, `None` once the child ran `test`
/// alone with a fresh folder and passed.
fn datastores(test: &str) -> Option<PathBuf> {
    if let Some(root) = std::env::var_os(ENV) {
        return Some(root.into());
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ENV, dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} in its child process:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child did not run {test}:\n{stdout}");
    None
}

/// `v`'s only disk as the fake VDDK sees it: its `[ds1] path` under `root`, a link to the
/// simulator's data for it. Returns that name and the data's file.
fn expose(root: &Path, sim: &Sim, v: &Vm) -> (String, PathBuf) {
    let name = v.disks[0].base_file_name.clone();
    let file = sim.disk_path(&v.name, v.disks[0].key).unwrap();
    let link = root.join("ds1").join(name.strip_prefix("[ds1] ").unwrap());
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&file, &link).unwrap();
    (name, file)
}

/// The disk named `name` of `v` opened writable through VDDK, in blocks of `granularity`.
async fn open(client: &Arc<Client>, v: &Vm, name: &str, granularity: u64) -> Result<VddkSink, OpenError> {
    let (c, moref, name, capacity) = (client.clone(), v.moref.clone(), name.to_owned(), v.disks[0].capacity);
    tokio::task::spawn_blocking(move || {
        VddkTarget::connect(vddk(), &c, &moref)?.open(&name, capacity, NonZeroU64::new(granularity).unwrap())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_disk_written_through_vddk_passes_the_sink_suite() {
    let Some(root) = datastores("an_existing_disk_written_through_vddk_passes_the_sink_suite") else { return };
    let (_dir, sim, client) = start().await;
    let v = vm(&client, "flat").await;
    sim.write("flat", v.disks[0].key, 0, &pattern(us(8 * MIB), 41)).unwrap();
    let (name, file) = expose(&root, &sim, &v);
    let sink = open(&client, &v, &name, MIB).await.unwrap();
    assert!(!sink.known_zero(), "an existing disk holds old data");
    assert!(sink.describe().contains(&name), "{}", sink.describe());
    check_sink(Arc::new(sink), async || std::fs::read(&file).unwrap()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_with_holes_copied_into_vddk_over_old_data_reads_back_exactly() {
    let Some(root) = datastores("a_pattern_with_holes_copied_into_vddk_over_old_data_reads_back_exactly") else {
        return;
    };
    let (_dir, sim, client) = start().await;
    let v = vm(&client, "flat").await;
    let size = v.disks[0].capacity;
    // Old data everywhere, so a hole the copy skipped would show.
    sim.write("flat", v.disks[0].key, 0, &vec![0xa5; us(size)]).unwrap();
    let (name, file) = expose(&root, &sim, &v);
    let g = 64 << 10;
    let sink = Arc::new(open(&client, &v, &name, g).await.unwrap());

    // Holes of 64 KiB every 256 KiB, and one of 3 MiB (more than one zero buffer).
    let mut data = pattern(us(size), 42);
    data[us(2 * MIB)..us(5 * MIB)].fill(0);
    let src = Arc::new(MemSource::new(data.clone()));
    let read = src.allocation.clone().unwrap().data;
    let zero = read.complement(size);
    assert!(zero.iter().any(|e| e.len() >= 3 * MIB), "{zero:?}");
    let job = DiskCopy {
        read: read.clone(),
        zero: zero.clone(),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(g, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source: src,
        sink: sink.clone(),
    };
    let opts = CopyOptions { request_size: 2 * MIB, in_flight: 4, ..CopyOptions::default() };
    let report = copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await.unwrap();
    sink.commit().await.unwrap();
    assert_eq!((report.written, report.zero), (read.total_bytes(), zero.total_bytes()), "{report:?}");
    assert!(std::fs::read(&file).unwrap() == data, "the disk differs from the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_part_of_a_sector_are_refused_and_change_nothing() {
    let Some(root) = datastores("writes_of_part_of_a_sector_are_refused_and_change_nothing") else { return };
    let (_dir, sim, client) = start().await;
    let v = vm(&client, "flat").await;
    let before = pattern(us(8 * MIB), 43);
    sim.write("flat", v.disks[0].key, 0, &before).unwrap();
    let (name, file) = expose(&root, &sim, &v);
    let sink = open(&client, &v, &name, MIB).await.unwrap();
    for (offset, len) in [(100u64, 512u64), (0, 100), (512, 1000), (8 * MIB - 512, 511)] {
        let e = sink.write_at(offset, vec![1u8; us(len)].into()).await.unwrap_err();
        assert_eq!((e.kind(), e.range()), (ErrorKind::InvalidInput, Some((offset, len))), "{e}");
        assert!(e.to_string().contains("whole 512-byte sectors"), "{e}");
        let e = sink.write_zeroes(offset, len).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    sink.flush().await.unwrap();
    assert!(std::fs::read(&file).unwrap() == before, "a refused write changed the disk");

    // A granularity of part of a sector, and a disk that is not there, are refused on open.
    let e = open(&client, &v, &name, 4000).await.unwrap_err();
    assert!(e.to_string().contains("granularity 4000"), "{e}");
    let e = open(&client, &v, "[ds1] flat/missing.vmdk", MIB).await.unwrap_err();
    assert!(e.to_string().contains("VDDK cannot open [ds1] flat/missing.vmdk"), "{e}");
}
