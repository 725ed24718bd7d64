//! Our client against our simulator, for every call the client makes: TLS pinning, login,
//! paging, the VM model, snapshots and their change IDs, CBT windows, `*`, an epoch change, and
//! each injected fault (session expiry, task failure, `FileFault`, slow answers, 503s,
//! cancellation, no `WaitForUpdatesEx`).

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use cbt::ExtentSet;
use vsphere::datastore::DatastoreFile;
use vsphere::{Client, ConnectOptions, Credentials, FaultKind, MoRef, Retry, Secret, Thumbprint, Trust};
use vsphere_sim::{Config, Sim, SimFault, SimTls};

const MIB: u64 = 1 << 20;

fn estate() -> Config {
    let mut c = Config::from_toml(
        r#"
user = "backup@vsphere.local"
password = "s3cret"
qcda_window = 1048576
page_limit = 40
[[datacenter]]
name = "DC1"
[[datacenter.host]]
name = "esx1"
version = "7.0.3"
[[datacenter.datastore]]
name = "ds1"
[[datacenter.datastore]]
name = "nfs1"
type = "NFS"
[[datacenter.vm]]
name = "db"
cbt = true
usb = 1
encrypted = true
[[datacenter.vm.disk]]
capacity = 4194304
[[datacenter.vm.disk]]
capacity = 2097152
datastore = "nfs1"
backing = "rdm-physical"
mode = "independent_persistent"
[[datacenter.vm]]
name = "gpu"
pci = 1
power = "poweredOff"
[[datacenter.vm.disk]]
capacity = 1048576
"#,
    )
    .unwrap();
    // Plenty of VMs so the inventory spans pages of 40.
    let template = c.datacenters[0].vms[1].clone();
    for i in 0..100 {
        let mut v = template.clone();
        v.name = format!("web{i:03}");
        v.pci = 0;
        c.datacenters[0].vms.push(v);
    }
    c
}

async fn sim() -> (tempfile::TempDir, Sim) {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(estate(), dir.path(), SimTls::SelfSigned).await.unwrap();
    (dir, sim)
}

async fn login(sim: &Sim) -> Client {
    let der = sim.certificate().unwrap();
    let pin = Trust::Pinned(Thumbprint::sha256_of(der));
    let opts = ConnectOptions { trust: pin, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("s3cret") }).await.unwrap();
    c
}

async fn vm_named(c: &Client, name: &str) -> vsphere::Vm {
    c.vms().await.unwrap().into_iter().find(|v| v.name == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_a_paged_inventory_with_every_fact() {
    let (_d, sim) = sim().await;
    let opts = ConnectOptions { trust: Trust::Insecure, ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    assert_eq!(c.content().about.api_version, "8.0.2.0");
    let e =
        c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("nope") }).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::InvalidLogin));
    assert_eq!(c.vms().await.unwrap_err().fault().map(|f| f.kind), Some(FaultKind::NotAuthenticated));

    let c = login(&sim).await;
    let calls = sim.calls();
    let vms = c.vms().await.unwrap();
    assert_eq!(vms.len(), 102);
    // CreateContainerView, RetrievePropertiesEx, two ContinueRetrievePropertiesEx, DestroyView.
    assert_eq!(sim.calls() - calls, 5, "102 VMs in pages of 40");

    let db = vms.iter().find(|v| v.name == "db").unwrap();
    assert_eq!((db.cbt_enabled, db.cbt_supported), (Some(true), Some(true)));
    assert!(db.key_id.is_some());
    assert_eq!(db.usb.len(), 1);
    assert_eq!(db.disks.len(), 2);
    assert_eq!(db.disks[0].capacity, 4 * MIB);
    assert_eq!(db.disks[0].file_name, "[ds1] db/db.vmdk");
    assert!(db.disks[0].change_id.as_deref().is_some_and(|c| c.ends_with("/0")), "{:?}", db.disks[0].change_id);
    assert_eq!(db.disks[1].backing, vsphere::BackingKind::RdmPhysical);
    assert!(db.disks[1].independent());
    let gpu = vms.iter().find(|v| v.name == "gpu").unwrap();
    assert_eq!(gpu.pci_passthrough.len(), 1);
    assert_eq!(gpu.power_state.as_ref().map(vsphere::PowerState::as_str), Some("poweredOff"));
    let by_uuid = c.find_vm_by_uuid(db.instance_uuid.as_deref().unwrap(), true).await.unwrap();
    assert_eq!(by_uuid.as_ref(), Some(&db.moref));
    assert_eq!(c.find_by_inventory_path("DC1/vm/gpu").await.unwrap(), Some(gpu.moref.clone()));
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_across_snapshots_windows_star_and_an_epoch_change() {
    let (_d, sim) = sim().await;
    let c = login(&sim).await;
    let db = vm_named(&c, "db").await;
    let key = db.disks[0].key;
    let capacity = db.disks[0].capacity;

    // First data, then the first backup's snapshot: "*" reports what is allocated.
    sim.write("db", key, 0, &[1u8; 4096]).unwrap();
    sim.write("db", key, 3 * MIB, &[2u8; 8192]).unwrap();
    let s1 = c.create_snapshot(&db.moref, "syncproxy-1", "job 1", true, None).await.unwrap();
    let d1 = c.snapshot_disks(&s1).await.unwrap();
    let id1 = d1[0].change_id.clone().unwrap();
    assert!(id1.ends_with("/1"), "{id1}");
    let all = c.query_changed_disk_areas(&db.moref, Some(&s1), key, capacity, "*").await.unwrap();
    assert_eq!(all.areas, ExtentSet::from_ranges([(0, 4096), (3 * MIB, 8192)]));

    // Under the snapshot the disk is a delta whose parent is the base.
    let under = vm_named(&c, "db").await;
    assert_eq!(under.disks[0].file_name, "[ds1] db/db-000001.vmdk");
    assert_eq!(under.disks[0].base_file_name, "[ds1] db/db.vmdk");
    assert!(under.all_snapshots()[0].quiesced);
    c.remove_snapshot(&s1, true).await.unwrap();

    // Changes since the first snapshot, in windows of 1 MiB, in CBT blocks of 64 KiB.
    sim.write("db", key, 100_000, &[3u8; 10]).unwrap();
    sim.write("db", key, 2 * MIB + 65_536, &[4u8; 65_536]).unwrap();
    let s2 = c.create_snapshot(&db.moref, "syncproxy-2", "job 2", false, None).await.unwrap();
    let changed = c.query_changed_disk_areas(&db.moref, Some(&s2), key, capacity, &id1).await.unwrap();
    assert_eq!(changed.areas, ExtentSet::from_ranges([(65_536, 65_536), (2 * MIB + 65_536, 65_536)]));
    let id2 = c.snapshot_disks(&s2).await.unwrap()[0].change_id.clone().unwrap();
    assert!(id2.ends_with("/2") && id2[..id2.len() - 2] == id1[..id1.len() - 2], "{id1} {id2}");
    // Nothing changed between a snapshot and itself.
    let none = c.query_changed_disk_areas(&db.moref, Some(&s2), key, capacity, &id2).await.unwrap();
    assert!(none.areas.is_empty());
    c.remove_snapshot(&s2, true).await.unwrap();

    // CBT reset: a new epoch, and the old change ID is a FileFault (so: a full copy).
    c.set_change_tracking(&db.moref, false).await.unwrap();
    c.set_change_tracking(&db.moref, true).await.unwrap();
    let s3 = c.create_snapshot(&db.moref, "syncproxy-3", "job 3", false, None).await.unwrap();
    let id3 = c.snapshot_disks(&s3).await.unwrap()[0].change_id.clone().unwrap();
    let old = cbt::ChangeId::parse(&id2);
    let new = cbt::ChangeId::parse(&id3);
    assert_ne!(old.epoch(), new.epoch(), "{id2} {id3}");
    let e = c.query_changed_disk_areas(&db.moref, Some(&s3), key, capacity, &id2).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::FileFault), "{e}");
    assert_eq!(e.retry(), Retry::Never);
    // A malformed change ID is InvalidArgument; a powered-on VM needs a snapshot.
    let e = c.query_changed_disk_areas(&db.moref, Some(&s3), key, capacity, "garbage").await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::InvalidArgument), "{e}");
    let e = c.query_changed_disk_areas(&db.moref, None, key, capacity, "*").await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::InvalidState), "{e}");
    c.remove_snapshot(&s3, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastore_reads_see_the_frozen_base() {
    let (_d, sim) = sim().await;
    let c = login(&sim).await;
    let db = vm_named(&c, "db").await;
    let key = db.disks[0].key;
    sim.write("db", key, 0, b"before the snapshot").unwrap();
    let s = c.create_snapshot(&db.moref, "syncproxy-r", "read", false, None).await.unwrap();
    sim.write("db", key, 0, b"AFTER  the snapshot").unwrap();
    let r = c.datastore_reader().unwrap();
    let f = DatastoreFile::from_ds_path("DC1", "[ds1] db/db-flat.vmdk").unwrap();
    assert_eq!(r.size(&f).await.unwrap(), 4 * MIB);
    assert_eq!(&r.read(&f, 0, 19).await.unwrap()[..], b"before the snapshot");
    c.remove_snapshot(&s, true).await.unwrap();
    assert_eq!(&r.read(&f, 0, 19).await.unwrap()[..], b"AFTER  the snapshot");
    // Busy host: 503, retried with back-off by the client within its timeout.
    sim.faults(|f| f.http_503 = 2);
    assert_eq!(&r.read(&f, 0, 5).await.unwrap()[..], b"AFTER");
    let e = r.read(&f, 8 * MIB, 10).await.unwrap_err();
    assert!(e.to_string().contains("416"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_come_back_typed() {
    let (_d, sim) = sim().await;
    let c = login(&sim).await;
    let db = vm_named(&c, "db").await;

    // Session expiry: the client logs in again and retries, once, unseen by the caller.
    sim.faults(|f| f.expire_sessions = true);
    assert_eq!(c.vms().await.unwrap().len(), 102);
    sim.faults(|f| f.expire_sessions = true);
    c.current_time().await.unwrap();
    c.set_change_tracking(&db.moref, true).await.unwrap();

    // A failing task: its fault, typed, with the task's name.
    sim.faults(|f| f.fail_next_task = Some(SimFault::new("NoDiskSpace", "no room for the delta")));
    let e = c.create_snapshot(&db.moref, "x", "", false, None).await.unwrap_err();
    assert!(matches!(&e, vsphere::Error::Task { name, .. } if name == "VirtualMachine.createSnapshot"), "{e}");
    assert_eq!(e.fault().map(|f| (f.kind, f.type_name.as_str())), Some((FaultKind::FileFault, "NoDiskSpace")));
    let gpu = vm_named(&c, "gpu").await;
    let e = c.create_snapshot(&gpu.moref, "x", "", false, None).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::Snapshot), "{e}");

    // CBT that cannot answer: FileFault.
    let s = c.create_snapshot(&db.moref, "y", "", false, None).await.unwrap();
    sim.faults(|f| f.qcda_file_fault = true);
    let e = c.query_changed_disk_areas(&db.moref, Some(&s), 2000, 4 * MIB, "*").await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::FileFault));
    sim.faults(|f| f.qcda_file_fault = false);

    // A slow task watched by WaitForUpdatesEx, then the same without it (polling).
    sim.faults(|f| f.task_delay = Duration::from_millis(300));
    c.remove_snapshot(&s, true).await.unwrap();
    sim.faults(|f| f.no_wait_for_updates = true);
    let s = c.create_snapshot(&db.moref, "z", "", false, None).await.unwrap();
    c.remove_snapshot(&s, true).await.unwrap();
    sim.faults(|f| f.no_wait_for_updates = false);

    // Cancellation: the task is asked to stop and ends RequestCanceled.
    let cancel = AtomicBool::new(true);
    let e = c.create_snapshot(&db.moref, "c", "", false, Some(&cancel)).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::RequestCanceled), "{e}");
    assert_eq!(vm_named(&c, "db").await.snapshot_depth(), 0);

    // Slow answers past the client's timeout: a Timeout naming the call, never retried (the
    // timeout is the deadline of the call with its retries).
    sim.faults(|f| f.delay = Duration::from_secs(3));
    let impatient =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(1), ..ConnectOptions::new(&sim.url()) };
    let e = Client::connect(&impatient).await.unwrap_err();
    assert!(matches!(&e, vsphere::Error::Timeout { operation, .. } if operation == "RetrieveServiceContent"), "{e}");
    assert_eq!(e.retry(), Retry::Never);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_longer_than_the_timeout_is_waited_for_in_waits_shorter_than_it() {
    let (_d, sim) = sim().await;
    // The timeout bounds each call, so no WaitForUpdatesEx may block on the server that long.
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(2), ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("s3cret") }).await.unwrap();
    let db = vm_named(&c, "db").await;
    sim.faults(|f| f.task_delay = Duration::from_secs(5));
    let s = c.create_snapshot(&db.moref, "long", "", false, None).await.unwrap();
    sim.faults(|f| f.task_delay = Duration::ZERO);
    c.remove_snapshot(&s, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_snapshot_can_leave_consolidation_needed() {
    let (_d, sim) = sim().await;
    let c = login(&sim).await;
    let db = vm_named(&c, "db").await;
    let s = c.create_snapshot(&db.moref, "syncproxy-c", "", false, None).await.unwrap();
    sim.faults(|f| f.leave_consolidation = true);
    c.remove_snapshot(&s, true).await.unwrap();
    assert_eq!(vm_named(&c, "db").await.consolidation_needed, Some(true));
    c.consolidate_disks(&db.moref).await.unwrap();
    assert_eq!(vm_named(&c, "db").await.consolidation_needed, Some(false));
    let gone = MoRef::new("VirtualMachineSnapshot", "snapshot-0");
    assert_eq!(
        c.remove_snapshot(&gone, true).await.unwrap_err().fault().map(|f| f.kind),
        Some(FaultKind::ManagedObjectNotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_5_speaks_only_tls_1_0_and_the_legacy_path_reaches_it() {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::small(2, MIB);
    config.api_version = "5.1".into();
    config.version = "5.1.0".into();
    let sim = Sim::start(config, dir.path(), SimTls::Legacy).await.unwrap();
    let pin = Trust::Pinned(Thumbprint::sha256_of(sim.certificate().unwrap()));
    let opts =
        ConnectOptions { trust: pin.clone(), timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    // rustls refuses TLS 1.0, and the error says what to do.
    let e = Client::connect(&opts).await.unwrap_err().to_string();
    assert!(e.contains("legacy TLS"), "{e}");
    // Opted in: connected, pinned, and the version is reported.
    let c = Client::connect(&ConnectOptions { legacy_tls: true, ..opts.clone() }).await.unwrap();
    assert_eq!(c.server_tls().unwrap().version, "TLSv1");
    assert_eq!(c.content().about.api_version, "5.1");
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") }).await.unwrap();
    assert_eq!(c.vms().await.unwrap().len(), 2);
    // The pin still holds on the legacy path.
    let wrong = Trust::Pinned(Thumbprint::Sha256([0; 32]));
    let e = Client::connect(&ConnectOptions { legacy_tls: true, trust: wrong, ..opts }).await.unwrap_err().to_string();
    assert!(e.contains("not the pinned"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_datastore_facts_and_a_direct_read_from_the_host() {
    let (_d, sim) = sim().await;
    let c = login(&sim).await;
    let hosts = c.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
    let h = &hosts[0];
    assert_eq!((h.name.as_str(), h.version.as_deref()), ("esx1", Some("7.0.3")));
    // One host's version by moref, and that of a VM's host, without reading every host.
    assert_eq!(c.host_version(&h.moref).await.unwrap().as_deref(), Some("7.0.3"));
    let db = vm_named(&c, "db").await;
    assert_eq!(db.host.as_ref(), Some(&h.moref));
    let calls = sim.calls();
    assert_eq!(c.vm_host_version(&db.moref).await.unwrap().as_deref(), Some("7.0.3"));
    assert_eq!(sim.calls() - calls, 2, "runtime.host, then config.product.version");
    let gone = c.host_version(&MoRef::new("HostSystem", "host-404")).await.unwrap_err();
    assert_eq!(gone.fault().map(|f| f.kind), Some(FaultKind::ManagedObjectNotFound), "{gone}");
    // vCenter vouches for the host's certificate: its thumbprint is what a direct read pins.
    let thumb = h.thumbprint.clone().expect("the host's certificate");
    assert_eq!(thumb, c.server_tls().unwrap().sha1);
    let ds = c.datastores().await.unwrap();
    let by = |n: &str| ds.iter().find(|d| d.name == n).unwrap().clone();
    assert_eq!((by("ds1").kind.as_deref(), by("ds1").vmfs_version.as_deref()), (Some("VMFS"), Some("6.82")));
    assert_eq!((by("nfs1").kind.as_deref(), by("nfs1").vmfs_version), (Some("NFS"), None));
    assert!(c.clusters().await.unwrap().is_empty(), "this estate has no clusters");

    // A service ticket, then the read straight from the "host", trusted by that thumbprint.
    sim.write("db", 2000, 0, b"direct").unwrap();
    let file = DatastoreFile::from_ds_path("DC1", "[ds1] db/db-flat.vmdk").unwrap();
    let ticket = c.acquire_ticket(&format!("{}{}", sim.url().trim_end_matches("/sdk"), file.url_path())).await.unwrap();
    let host = sim.url().trim_end_matches("/sdk").to_owned();
    let r = c.host_datastore_reader(&host, &thumb, &ticket, Duration::from_secs(10)).unwrap();
    assert_eq!(&r.read(&file, 0, 6).await.unwrap()[..], b"direct");
    // The vCenter pin is not the host's trust: a wrong host thumbprint is refused.
    let wrong = Thumbprint::Sha1([9; 20]);
    let r = c.host_datastore_reader(&host, &wrong, &ticket, Duration::from_secs(10)).unwrap();
    assert!(r.read(&file, 0, 6).await.unwrap_err().to_string().contains("not the pinned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_too_deep_a_busy_vm_and_an_ignored_range() {
    let (_d, sim) = sim().await;
    let c = std::sync::Arc::new(login(&sim).await);
    let web = vm_named(&c, "web000").await;

    // 32 snapshots deep is the limit; the 33rd is TooManySnapshotLevels, never retried.
    for i in 0..32 {
        c.create_snapshot(&web.moref, &format!("s{i}"), "", false, None).await.unwrap();
    }
    assert_eq!(vm_named(&c, "web000").await.snapshot_depth(), 32);
    let e = c.create_snapshot(&web.moref, "s32", "", false, None).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::TooManySnapshotLevels), "{e}");
    assert_eq!(e.retry(), Retry::Never);

    // One task at a time per VM: the second is TaskInProgress, worth retrying later.
    let db = vm_named(&c, "db").await;
    sim.faults(|f| f.task_delay = Duration::from_millis(600));
    let (c2, vm2) = (c.clone(), db.moref.clone());
    let first = tokio::spawn(async move { c2.create_snapshot(&vm2, "first", "", false, None).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let e = c.create_snapshot(&db.moref, "second", "", false, None).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::TaskInProgress), "{e}");
    assert_eq!(e.retry(), Retry::Backoff);
    first.await.unwrap().unwrap();

    // A server that ignores Range and sends the whole file: refused, never taken as the range.
    sim.faults(|f| f.ignore_range = true);
    let r = c.datastore_reader().unwrap();
    let f = DatastoreFile::from_ds_path("DC1", "[ds1] db/db-flat.vmdk").unwrap();
    let e = r.read(&f, 4096, 4096).await.unwrap_err();
    assert!(e.to_string().contains("ignored the range"), "{e}");
    // The same through the zero-copy read: the whole file would overflow the buffer, which
    // bounds what the answer may take.
    let mut buf = vec![0u8; 4096];
    let e = r.read_into(&f, 4096, &mut buf).await.unwrap_err();
    assert!(e.to_string().contains("ignored the range"), "{e}");
    // Honoured ranges land in the buffer exactly.
    sim.faults(|f| f.ignore_range = false);
    for snap in vm_named(&c, "db").await.all_snapshots() {
        c.remove_snapshot(&snap.moref, true).await.unwrap();
    }
    sim.write("db", db.disks[0].key, 8192, b"hello, range").unwrap();
    let mut buf = vec![0u8; 12];
    r.read_into(&f, 8192, &mut buf).await.unwrap();
    assert_eq!(&buf, b"hello, range");
    let mut past = vec![0u8; 10];
    let e = r.read_into(&f, db.disks[0].capacity, &mut past).await.unwrap_err();
    assert!(e.to_string().contains("416"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileges_are_read_per_entity_and_unknown_ids_are_never_asked() {
    let mut cfg = estate();
    cfg.unknown_privileges = vec!["Cryptographer.Access".into()];
    cfg.denied = vec![vsphere_sim::Denied { entity: "db".into(), privileges: vec!["Datastore.Browse".into()] }];
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(cfg, dir.path(), SimTls::SelfSigned).await.unwrap();
    let c = login(&sim).await;
    let known = c.privilege_ids().await.unwrap();
    assert!(known.contains("VirtualMachine.State.CreateSnapshot") && !known.contains("Cryptographer.Access"));
    let db = vm_named(&c, "db").await;
    let want = ["Datastore.Browse", "VirtualMachine.State.CreateSnapshot", "Cryptographer.Access"];
    let held = c.has_privileges(&db.moref, &want, &known).await.unwrap();
    assert_eq!(held.missing(), ["Datastore.Browse"]);
    assert_eq!(held.unknown, ["Cryptographer.Access"]);
    // Asked unfiltered, the unknown ID fails the whole call, as on older servers.
    let all: std::collections::HashSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let e = c.has_privileges(&db.moref, &want, &all).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::InvalidArgument), "{e}");
    // One per call, as for a server that lists none: the unknown one is set aside.
    let held = c.has_privileges_one_by_one(&db.moref, &want).await.unwrap();
    assert_eq!(
        (held.missing(), held.unknown.clone()),
        (vec!["Datastore.Browse"], vec!["Cryptographer.Access".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_made_from_an_image_serves_its_bytes_on_its_controller() {
    vsphere::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    // Data, a hole and a short tail: the image's size need not be whole MiBs.
    let image = dir.path().join("boot.img");
    let len = 3 * MIB + 4096;
    testkit::sparse_image(&image, 4 * MIB, 7);
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(len).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&image).unwrap(),
        b"tail",
        len - 4,
    )
    .unwrap();
    let want = std::fs::read(&image).unwrap();
    let mut cfg = estate();
    let mut boot = cfg.datacenters[0].vms[1].clone();
    boot.name = "boot".into();
    boot.disks[0].capacity = 0;
    boot.disks[0].image = Some(image.clone());
    boot.controller = Some(vsphere_sim::ControllerKind::Sata);
    boot.vmx_extra = Some("firmware = \"efi\"\nmemsize = \"256\"".into());
    let mut bigger = boot.clone();
    bigger.name = "bigger".into();
    bigger.disks[0].capacity = 8 * MIB;
    bigger.controller = None;
    bigger.vmx_extra = None;
    cfg.datacenters[0].vms.extend([boot, bigger]);
    let sim = Sim::start(cfg, &dir.path().join("sim"), SimTls::SelfSigned).await.unwrap();
    let c = login(&sim).await;
    let r = c.datastore_reader().unwrap();

    let vm = vm_named(&c, "boot").await;
    assert_eq!((vm.disks[0].capacity, vm.disks[0].bus_slot.as_deref()), (len, Some("sata0:0")));
    let flat = DatastoreFile::from_ds_path("DC1", "[ds1] boot/boot-flat.vmdk").unwrap();
    assert!(r.read(&flat, 0, len).await.unwrap() == want, "the disk is the image");
    let vmx = DatastoreFile::from_ds_path("DC1", "[ds1] boot/boot.vmx").unwrap();
    let vmx = String::from_utf8(r.read(&vmx, 0, r.size(&vmx).await.unwrap()).await.unwrap().to_vec()).unwrap();
    for line in
        ["sata0.present = \"TRUE\"\n", "sata0:0.fileName = \"boot.vmdk\"\n", "firmware = \"efi\"\nmemsize = \"256\"\n"]
    {
        assert!(vmx.contains(line), "{line:?} in\n{vmx}");
    }

    // A capacity beyond the image: the image, then zeros; the default controller is PVSCSI.
    let vm = vm_named(&c, "bigger").await;
    assert_eq!((vm.disks[0].capacity, vm.disks[0].bus_slot.as_deref()), (8 * MIB, Some("scsi0:0")));
    let flat = DatastoreFile::from_ds_path("DC1", "[ds1] bigger/bigger-flat.vmdk").unwrap();
    let got = r.read(&flat, 0, 8 * MIB).await.unwrap();
    assert!(got[..want.len()] == want[..] && got[want.len()..].iter().all(|&b| b == 0));

    // An image larger than the capacity given is refused, naming the VM.
    let mut cfg = estate();
    cfg.datacenters[0].vms[1].disks[0].image = Some(image);
    cfg.datacenters[0].vms[1].disks[0].capacity = MIB;
    let e = Sim::start(cfg, &dir.path().join("sim2"), SimTls::SelfSigned).await.unwrap_err().to_string();
    assert!(e.contains("gpu") && e.contains("do not fit"), "{e}");
}
