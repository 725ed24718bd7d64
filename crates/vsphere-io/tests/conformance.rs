//! The shared source conformance suite over the vSphere sources: a snapshot's disk read over
//! HTTPS from the project's simulator, as one flat extent and as delta chains (SEsparse on
//! VMFS, vmfsSparse on NFS), and a disk read through the fake VDDK library with the
//! simulator's session. Each is written to after the snapshot, so a source that read the live
//! disk rather than the frozen one would fail.

mod common;

use common::{live, start, vddk, vm};
use pipeline::conformance::{check_source, check_source_in_units, pattern};
use vsphere::{Client, MoRef, Vm};

const MIB: usize = 1 << 20;

/// Takes a snapshot of `v` and returns it with the file its only disk is frozen in.
async fn freeze(client: &Client, v: &Vm) -> (MoRef, String) {
    let snap = client.create_snapshot(&v.moref, "conformance", "", false, None).await.unwrap();
    let disks = client.snapshot_disks(&snap).await.unwrap();
    (snap, disks[0].file_name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_disk_read_over_https_passes_the_source_suite() {
    let (_dir, sim, client) = start().await;
    let v = vm(&client, "flat").await;
    let (key, capacity) = (v.disks[0].key, v.disks[0].capacity);
    let data = pattern(8 * MIB, 11);
    sim.write("flat", key, 0, &data).unwrap();
    let (snap, file) = freeze(&client, &v).await;
    sim.write("flat", key, 0, &pattern(MIB, 12)).unwrap();
    assert!(live(&sim, &v) != data, "the live disk moved on after the snapshot");

    let reader = client.datastore_reader().unwrap();
    let (src, layers) = vsphere_io::open_frozen(reader, "DC1", &file, capacity, snap.to_string()).await.unwrap();
    assert_eq!(layers, 1, "a VM's only snapshot freezes its flat base disk");
    check_source(&*src, &data).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_chains_read_over_https_pass_the_source_suite() {
    let (_dir, sim, client) = start().await;
    for name in ["onvmfs", "onnfs"] {
        let v = vm(&client, name).await;
        let (key, capacity) = (v.disks[0].key, v.disks[0].capacity);
        // Data under an older snapshot, then overwritten, zeroed and new data above it, at
        // offsets that are not grain-aligned.
        sim.write(name, key, 0, &pattern(2 * MIB, 21)).unwrap();
        client.create_snapshot(&v.moref, "older", "an operator's", false, None).await.unwrap();
        sim.write(name, key, 512 << 10, &pattern(100 << 10, 22)).unwrap();
        sim.write(name, key, 0, &[0u8; 64 << 10]).unwrap();
        sim.write(name, key, 3 * MIB as u64 + 7, &pattern(300 << 10, 23)).unwrap();
        let expected = live(&sim, &v);
        let (snap, file) = freeze(&client, &v).await;
        sim.write(name, key, 6 * MIB as u64, &pattern(MIB, 24)).unwrap();
        assert!(live(&sim, &v) != expected, "{name}: the live disk moved on after the snapshot");

        let reader = client.datastore_reader().unwrap();
        let (src, layers) = vsphere_io::open_frozen(reader, "DC1", &file, capacity, snap.to_string()).await.unwrap();
        assert_eq!(layers, 2, "{name}: the base and the older snapshot's delta");
        check_source(&*src, &expected).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_read_through_vddk_passes_the_source_suite_in_whole_sectors() {
    let (dir, _sim, client) = start().await;
    let v = vm(&client, "flat").await;
    let capacity = v.disks[0].capacity;
    let (snap, _) = freeze(&client, &v).await;
    // The fake reads a disk named by an absolute path as a raw file: the snapshot's contents.
    let data = pattern(usize::try_from(capacity).unwrap(), 31);
    let image = dir.path().join("frozen.raw");
    std::fs::write(&image, &data).unwrap();

    let (c, vm_ref, s) = (client.clone(), v.moref.clone(), snap.clone());
    let conn = tokio::task::spawn_blocking(move || vsphere_io::VddkVm::connect(vddk(), &c, &vm_ref, &s))
        .await
        .unwrap()
        .unwrap();
    let path = image.to_str().unwrap().to_owned();
    let src = tokio::task::spawn_blocking(move || conn.open(&path, capacity, snap.to_string())).await.unwrap().unwrap();
    check_source_in_units(&src, &data, 512).await.unwrap();
}
