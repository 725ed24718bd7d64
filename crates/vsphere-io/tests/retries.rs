//! The copy engine is the one retry loop for the vSphere sources: a transient failure injected
//! into a datastore read (the simulator's 503s, on a flat disk and on a delta chain) or a VDDK
//! read (the fake library's `busy-read`) is retried by the engine and the copy completes; a
//! permanent one (a 404, a missing layer, the fake's `fail-read`) fails at once, its message
//! naming its kind and the bytes it concerned.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cbt::ExtentSet;
use common::{live, start, vddk, vm};
use pipeline::conformance::{MemSink, pattern};
use pipeline::{BlockError, BlockSource, CopyOptions, CopyReport, Digests, DiskCopy, Engine, ErrorKind, copy_disk};
use vsphere::{Client, MoRef, Vm};
use vsphere_sim::Sim;

const MIB: u64 = 1 << 20;

/// Copies all of `src` into memory in 1 MiB requests, one at a time, with short backoffs and
/// the engine's default of 5 retries.
async fn copy(src: Arc<dyn BlockSource>) -> (Result<CopyReport, BlockError>, Arc<MemSink>) {
    let size = src.size();
    let sink = Arc::new(MemSink::new(usize::try_from(size).unwrap(), MIB));
    let job = DiskCopy {
        read: ExtentSet::full(size),
        zero: ExtentSet::new(),
        fetch: None,
        keep: cbt::ExtentSet::new(),
        digests: Digests::zeros(MIB, size),
        done: ExtentSet::new(),
        checkpoint: None,
        source: src,
        sink: sink.clone(),
    };
    let opts = CopyOptions {
        request_size: MIB,
        in_flight: 1,
        backoff: Duration::from_millis(10),
        detect_zeroes: false,
        ..CopyOptions::default()
    };
    (copy_disk(job, &Engine::new(64 * MIB), &opts, Arc::default()).await, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_datastore_reads_are_retried_by_the_engine_and_a_missing_file_fails_at_once() {
    let (_dir, sim, c) = start().await;
    let v = vm(&c, "flat").await;
    let disk = &v.disks[0];
    sim.write("flat", disk.key, 0, &pattern(8 << 20, 7)).unwrap();
    let want = live(&sim, &v);
    let reader = c.datastore_reader().unwrap();
    let (src, layers) =
        vsphere_io::open_frozen(reader, "DC1", &disk.base_file_name, disk.capacity, "snap".into()).await.unwrap();
    assert_eq!(layers, 1);

    // Three 503s: each is one failed attempt that the engine counts and retries (the source
    // makes one request per attempt, with no retry loop of its own), and the copy completes.
    sim.faults(|f| f.http_503 = 3);
    let (r, sink) = copy(src.clone()).await;
    let r = r.unwrap();
    assert_eq!(r.retries, 3, "{r:?}");
    assert!(sink.contents() == want, "the copy differs");

    // More 503s than the engine's patience: it gives up after 1 + 5 attempts, saying so.
    sim.faults(|f| f.http_503 = 100);
    let (e, _) = copy(src.clone()).await;
    let e = e.unwrap_err();
    assert_eq!((e.kind(), e.attempts()), (ErrorKind::Transient, Some(6)), "{e}");
    assert!(e.to_string().contains("503") && e.to_string().contains("gave up after 6 attempts"), "{e}");
    sim.faults(|f| f.http_503 = 0);

    // The file gone: not found, never retried, and the message says where.
    std::fs::remove_file(sim.disk_path("flat", disk.key).unwrap()).unwrap();
    let (e, _) = copy(src).await;
    let e = e.unwrap_err();
    let text = e.to_string();
    assert_eq!((e.kind(), e.attempts(), e.range()), (ErrorKind::NotFound, None, Some((0, MIB))), "{text}");
    assert!(text.contains("at bytes 0+1048576") && text.contains("404") && text.contains("(not found)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_reads_of_a_delta_chain_are_retried_by_the_engine_and_a_missing_layer_fails_at_once() {
    let (dir, sim, c) = start().await;
    let v = vm(&c, "onvmfs").await;
    let key = v.disks[0].key;
    sim.write("onvmfs", key, 0, &pattern(8 << 20, 8)).unwrap();
    c.create_snapshot(&v.moref, "older", "", false, None).await.unwrap();
    sim.write("onvmfs", key, 3 * MIB + 7, &pattern(300 << 10, 9)).unwrap();
    let want = live(&sim, &v);
    let snap = c.create_snapshot(&v.moref, "backup", "", false, None).await.unwrap();
    let file = c.snapshot_disks(&snap).await.unwrap()[0].file_name.clone();
    let reader = c.datastore_reader().unwrap();
    let (src, layers) =
        vsphere_io::open_frozen(reader, "DC1", &file, v.disks[0].capacity, snap.to_string()).await.unwrap();
    assert_eq!(layers, 2, "the base and the older snapshot's delta");

    // Once the chain is open its files are read once per attempt: the 503s reach the engine.
    sim.faults(|f| f.http_503 = 2);
    let (r, sink) = copy(src.clone()).await;
    let r = r.unwrap();
    assert_eq!(r.retries, 2, "{r:?}");
    assert!(sink.contents() == want, "the copy differs");

    // The older snapshot's delta file gone: its grains (written at 3 MiB) are not found,
    // through `vmdk`, and fail at once, naming the request.
    let delta = std::fs::read_dir(dir.path().join("sim/vmfs1/onvmfs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-sesparse.vmdk"))
        .expect("a SEsparse delta");
    std::fs::remove_file(&delta).unwrap();
    let (e, _) = copy(src).await;
    let e = e.unwrap_err();
    let text = e.to_string();
    assert_eq!((e.kind(), e.attempts(), e.range()), (ErrorKind::NotFound, None, Some((3 * MIB, MIB))), "{text}");
    assert!(text.contains("404") && text.contains("(not found)"), "{text}");
}

/// The disk of `v` through the fake VDDK (which reads a disk named by an absolute path as a
/// raw file), with `faults` in the connection's vmxSpec after the moref.
async fn through_vddk(sim: &Sim, c: &Arc<Client>, v: &Vm, faults: &str) -> Arc<dyn BlockSource> {
    let path = sim.disk_path(&v.name, v.disks[0].key).unwrap().display().to_string();
    let capacity = v.disks[0].capacity;
    let moref = MoRef::new("VirtualMachine", &format!("{};{faults}", v.moref.value));
    let c = c.clone();
    let src = tokio::task::spawn_blocking(move || {
        let conn = vsphere_io::VddkVm::connect(vddk(), &c, &moref, &MoRef::new("VirtualMachineSnapshot", "snapshot-1"))
            .unwrap();
        conn.open(&path, capacity, "snap".into()).unwrap()
    })
    .await
    .unwrap();
    Arc::new(src)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_vddk_read_is_retried_by_the_engine_and_a_failed_one_fails_at_once() {
    let (_dir, sim, c) = start().await;
    let v = vm(&c, "flat").await;
    sim.write("flat", v.disks[0].key, 0, &pattern(8 << 20, 10)).unwrap();
    let want = live(&sim, &v);

    // The second read answers VIX_E_OBJECT_IS_BUSY once: retried, and the copy completes.
    let src = through_vddk(&sim, &c, &v, "busy-read=2").await;
    let (r, sink) = copy(src).await;
    let r = r.unwrap();
    assert_eq!(r.retries, 1, "{r:?}");
    assert!(sink.contents() == want, "the copy differs");

    // The third read fails with VIX_E_FILE_ERROR: fatal, not retried, and the message names
    // the kind and the bytes (the third 1 MiB request).
    let src = through_vddk(&sim, &c, &v, "fail-read=3").await;
    let (e, _) = copy(src).await;
    let e = e.unwrap_err();
    let text = e.to_string();
    assert_eq!((e.kind(), e.attempts(), e.range()), (ErrorKind::Fatal, None, Some((2 * MIB, MIB))), "{text}");
    assert!(text.contains("at bytes 2097152+1048576") && text.contains("(fatal)"), "{text}");
}
