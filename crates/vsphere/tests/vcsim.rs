//! Conformance of our client against govmomi's vcsim, a vSphere server nobody here wrote:
//! TLS trust in all three modes, login and its fault, the service content, the VM inventory
//! through a container view, paging and the search index; snapshots and CBT; datastore reads;
//! host, datastore and cluster facts; DRS overrides, privileges and file deletion.

use std::time::Duration;

use testkit::pki::TestPki;
use testkit::vcsim::{Vcsim, find};
use vsphere::tls::ServerTls;
use vsphere::{Client, ConnectOptions, Credentials, FaultKind, Secret, Thumbprint, Trust};

pub(crate) const USER: &str = "backup@vsphere.local";
pub(crate) const PASSWORD: &str = "s3cret&<pass>";

pub(crate) struct Sim {
    _dir: tempfile::TempDir,
    pki: TestPki,
    sim: Vcsim,
}

pub(crate) fn start(test: &str, extra: &[&str]) -> Option<Sim> {
    vsphere::tls::install_crypto_provider();
    let bin = find(test)?;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let (cert, key) = (pki.cert.display().to_string(), pki.key.display().to_string());
    let mut args = vec!["-tlscert", &cert, "-tlskey", &key, "-username", USER, "-password", PASSWORD];
    args.extend_from_slice(extra);
    let sim = Vcsim::start(&bin, &args);
    Some(Sim { _dir: dir, pki, sim })
}

pub(crate) fn options(url: &str, trust: Trust) -> ConnectOptions {
    ConnectOptions { trust, timeout: Duration::from_secs(30), ..ConnectOptions::new(url) }
}

pub(crate) fn creds(password: &str) -> Credentials {
    Credentials { user: USER.into(), password: Secret::new(password) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_trust_by_ca_by_pin_and_refusal() {
    let Some(s) = start("tls_trust_by_ca_by_pin_and_refusal", &[]) else { return };
    // The system bundle does not know our test CA: refused, with the reason.
    let e = Client::connect(&options(&s.sim.url, Trust::default())).await.unwrap_err();
    assert!(matches!(e, vsphere::Error::Tls { .. }), "{e}");
    // As a first contact: in plain words, with what the server presents and the flag that
    // trusts it.
    let text = e.to_string();
    let want = expected_tls(&s.pki.cert_der);
    assert!(text.contains("not trusted: it is signed by a CA this machine does not trust"), "{text}");
    assert!(text.contains("subject:") && text.contains("valid:"), "{text}");
    assert!(text.contains(&format!("SHA-1:    {}", want.sha1)), "{text}");
    assert!(text.contains(&format!("--thumbprint {}", want.sha256)), "{text}");
    // Our CA file: verified, host name included.
    let c = Client::connect(&options(&s.sim.url, Trust::Verified { extra_ca: Some(s.pki.ca.clone()) })).await.unwrap();
    let seen = c.server_tls().unwrap();
    assert_eq!(seen, ServerTls { version: seen.version.clone(), ..expected_tls(&s.pki.cert_der) });
    assert!(seen.version.contains("TLS"), "{}", seen.version);
    // Pinned by SHA-1 as VMware prints it, and by SHA-256.
    for pin in [seen.sha1.to_string(), seen.sha256.to_string().replace(':', "").to_lowercase()] {
        let t = Trust::Pinned(Thumbprint::parse(&pin).unwrap());
        Client::connect(&options(&s.sim.url, t)).await.unwrap();
    }
    // A wrong pin is refused and says what it saw.
    let wrong = Trust::Pinned(Thumbprint::parse(&"00".repeat(20)).unwrap());
    let e = Client::connect(&options(&s.sim.url, wrong)).await.unwrap_err().to_string();
    assert!(e.contains(&seen.sha1.to_string()), "{e}");
    // Insecure connects (and warns).
    Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
}

fn expected_tls(der: &[u8]) -> ServerTls {
    use sha1::Digest as _;
    ServerTls {
        sha1: Thumbprint::Sha1(sha1::Sha1::digest(der).into()),
        sha256: Thumbprint::Sha256(sha2::Sha256::digest(der).into()),
        version: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_inventory_search_and_logout() {
    let Some(s) = start("login_inventory_search_and_logout", &[]) else { return };
    let pin = Trust::Pinned(Thumbprint::parse(&expected_tls(&s.pki.cert_der).sha256.to_string()).unwrap());
    let c = Client::connect(&options(&s.sim.url, pin)).await.unwrap();
    let about = &c.content().about;
    assert_eq!(about.api_type, "VirtualCenter");
    assert_eq!(c.support(), &vsphere::version::Support::Supported);
    assert!(!about.instance_uuid.is_empty());

    // Unauthenticated reads come back in missingSet as NotAuthenticated (a vcsim quirk): an
    // error, never an empty inventory.
    let e = c.vms().await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::NotAuthenticated), "{e}");

    // A wrong password is InvalidLogin, and the password appears nowhere in the error.
    let e = c.login(creds("wrong-password")).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::InvalidLogin), "{e}");
    assert!(!format!("{e} {e:?}").contains("wrong-password"));

    let session = c.login(creds(PASSWORD)).await.unwrap();
    assert_eq!(session.user_name, USER);
    assert!(c.session_cookie().unwrap().starts_with("vmware_soap_session="));

    let vms = c.vms().await.unwrap();
    let mut names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1"]);
    for vm in &vms {
        assert!(vm.instance_uuid.is_some(), "{vm:?}");
        assert_eq!(vm.power_state.as_ref().map(vsphere::PowerState::as_str), Some("poweredOn"));
        assert!(vm.hardware_version.as_deref().is_some_and(|v| v.starts_with("vmx-")));
        assert_eq!(vm.disks.len(), 1, "{vm:?}");
        let d = &vm.disks[0];
        assert_eq!(d.backing, vsphere::BackingKind::Flat);
        // Real servers number disks from 2000; vcsim numbers devices from 200 or so.
        assert!(d.capacity > 0 && d.key > 0 && d.controller_key.is_some(), "{d:?}");
        assert!(d.file_name.starts_with("[LocalDS_0] "), "{d:?}");
        assert!(d.bus_slot.as_deref().is_some_and(|b| b.contains(':')), "{d:?}");
        assert!(!d.independent());
        // vcsim leaves changeTrackingEnabled out until it is set.
        assert_eq!(vm.cbt_enabled, None);
        assert_eq!(vm.snapshot_depth(), 0);
    }

    // The search index finds a VM by instance UUID and by inventory path.
    let vm = &vms[0];
    let found = c.find_vm_by_uuid(vm.instance_uuid.as_deref().unwrap(), true).await.unwrap();
    assert_eq!(found.as_ref(), Some(&vm.moref));
    assert_eq!(c.find_vm_by_uuid("00000000-0000-0000-0000-000000000000", true).await.unwrap(), None);
    let by_path = c.find_by_inventory_path("DC0/vm/DC0_H0_VM0").await.unwrap();
    assert_eq!(by_path.map(|m| m.kind), Some("VirtualMachine".to_owned()));

    let t = c.current_time().await.unwrap();
    assert!(t.len() >= 19 && t.contains('T'), "{t}");

    c.logout().await.unwrap();
    // After logout nothing is readable, and there is no login to renew.
    assert!(c.vms().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_inventory_arrives_whole() {
    // 2 hosts x 1 pool x 150 VMs per pool in the cluster, plus the standalone host's.
    let Some(s) = start("a_large_inventory_arrives_whole", &["-vm", "150", "-host", "2"]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let vms = c.vms().await.unwrap();
    assert_eq!(vms.len(), 300, "vcsim makes 150 per resource pool, in the cluster's and the host's");
    let mut uuids: Vec<_> = vms.iter().filter_map(|v| v.instance_uuid.clone()).collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 300);
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_esxi_host() {
    let Some(s) = start("a_standalone_esxi_host", &["-esx"]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    assert_eq!(c.content().about.api_type, "HostAgent");
    assert_eq!(c.product(), Some(vsphere::version::Product::Esxi));
    c.login(creds(PASSWORD)).await.unwrap();
    let vms = c.vms().await.unwrap();
    assert!(!vms.is_empty());
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbt_snapshots_and_their_faults() {
    let Some(s) = start("cbt_snapshots_and_their_faults", &[]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let vm = c.find_by_inventory_path("DC0/vm/DC0_H0_VM0").await.unwrap().unwrap();

    // CBT on, through ReconfigVM_Task and the task wait; then off again.
    c.set_change_tracking(&vm, true).await.unwrap();
    assert_eq!(one(&c, &vm).await.cbt_enabled, Some(true));

    // A snapshot with our name: created, visible in the tree, removed.
    let name = "syncproxy-test-1";
    let snap = c.create_snapshot(&vm, name, "syncproxy job=test-1", false, None).await.unwrap();
    assert_eq!(snap.kind, "VirtualMachineSnapshot");
    let v = one(&c, &vm).await;
    let all = v.all_snapshots();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].moref.clone(), all[0].name.as_str()), (snap.clone(), name));
    assert_eq!(v.current_snapshot.as_ref(), Some(&snap));
    // The VM's recent tasks can be read (vcsim drops finished ones at once; a vCenter keeps
    // them for minutes): none still runs.
    let recent = c.recent_tasks(&vm).await.unwrap();
    assert!(recent.iter().all(|t| !t.running()), "{recent:?}");
    c.remove_snapshot(&snap, true).await.unwrap();
    assert_eq!(one(&c, &vm).await.snapshot_depth(), 0);

    // Removing it again: the server's fault comes back typed, with the task's context.
    let e = c.remove_snapshot(&snap, true).await.unwrap_err();
    let f = e.fault().expect("a fault");
    assert_eq!(f.kind, FaultKind::ManagedObjectNotFound, "{e}");
    assert_eq!(e.retry(), vsphere::Retry::Never);

    c.set_change_tracking(&vm, false).await.unwrap();
    assert_eq!(one(&c, &vm).await.cbt_enabled, Some(false));

    // vcsim has no CBT: QueryChangedDiskAreas is a typed MethodNotFound, never an empty answer.
    let e = c.query_changed_disk_areas(&vm, None, 2000, 1 << 20, "*").await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::MethodNotFound), "{e}");
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastore_range_reads_of_a_disk_file() {
    use vsphere::datastore::DatastoreFile;
    let Some(s) = start("datastore_range_reads_of_a_disk_file", &[]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let ds = c.inventory("Datastore", &["name", "info.url"]).await.unwrap();
    let local = ds.iter().find(|d| d.text("name") == Some("LocalDS_0")).expect("LocalDS_0");
    let root = std::path::PathBuf::from(local.text("info.url").unwrap());
    let flat = root.join("DC0_H0_VM0/disk1-flat.vmdk");
    assert!(flat.is_file(), "vcsim keeps disks at {}", flat.display());
    let data: Vec<u8> = (0..1u32 << 20).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
    std::fs::write(&flat, &data).unwrap();

    let reader = c.datastore_reader().unwrap();
    let file = DatastoreFile::from_ds_path("DC0", "[LocalDS_0] DC0_H0_VM0/disk1-flat.vmdk").unwrap();
    assert_eq!(reader.size(&file).await.unwrap(), 1 << 20);
    for (offset, len) in [(0usize, 4096usize), (12_345, 65_536), ((1 << 20) - 10, 10)] {
        let got = reader.read(&file, offset as u64, len as u64).await.unwrap();
        assert_eq!(&got[..], &data[offset..offset + len], "{offset}+{len}");
    }
    // Past the end: 416, said so; a missing file: 404, said so.
    let e = reader.read(&file, 2 << 20, 10).await.unwrap_err();
    assert!(matches!(e, vsphere::Error::Http { status: Some(416), .. }), "{e}");
    let missing = DatastoreFile::from_ds_path("DC0", "[LocalDS_0] nowhere/none.vmdk").unwrap();
    let e = reader.size(&missing).await.unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    c.logout().await.unwrap();
}

async fn one(c: &Client, vm: &vsphere::MoRef) -> vsphere::Vm {
    c.vms_by_moref(std::slice::from_ref(vm)).await.unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_datastores_and_drs_of_clusters() {
    let Some(s) = start("hosts_datastores_and_drs_of_clusters", &[]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let hosts = c.hosts().await.unwrap();
    assert_eq!(hosts.len(), 4, "DC0_H0 and the cluster's three");
    assert!(
        hosts.iter().all(|h| h.version.is_some()
            && h.connection_state.as_ref().map(vsphere::ConnectionState::as_str) == Some("connected")),
        "{hosts:?}"
    );
    let ds = c.datastores().await.unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].name, "LocalDS_0");
    assert!(ds[0].kind.is_some() && ds[0].capacity.is_some(), "{ds:?}");
    let clusters = c.clusters().await.unwrap();
    assert_eq!(clusters.len(), 1);
    assert_eq!(clusters[0].name, "DC0_C0");
    // vcsim enables DRS and leaves defaultVmBehavior unset; the model keeps "unset" as None
    // rather than guessing a level.
    assert_eq!(clusters[0].drs_enabled, Some(true), "{clusters:?}");
    c.logout().await.unwrap();
}

/// What `proxy` changes on a server, done against vcsim: a VM's DRS override added, edited and
/// removed in its cluster (`ReconfigureComputeResource_Task`), a privilege question
/// (`HasPrivilegeOnEntity`), and a datastore file deleted through the file manager (the CBT
/// reset's `-ctk.vmdk`), with the fault for one not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drs_overrides_and_datastore_file_deletion() {
    use vsphere::facts::{DrsChange, DrsOverride};
    let Some(s) = start("drs_overrides_and_datastore_file_deletion", &[]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let vm = c.vms().await.unwrap().into_iter().find(|v| v.name == "DC0_C0_RP0_VM0").unwrap();
    let cluster = c.cluster_of(vm.host.as_ref().unwrap()).await.unwrap().expect("a cluster host");
    assert_eq!(cluster.name, "DC0_C0");
    let own = |cl: &vsphere::facts::Cluster| cl.vm_overrides.iter().find(|o| o.vm == vm.moref).cloned();
    assert_eq!(own(&cluster), None);
    let set =
        |behavior: &str| DrsOverride { vm: vm.moref.clone(), enabled: Some(true), behavior: Some(behavior.into()) };
    c.set_drs_override(&cluster.moref, &DrsChange::Add(set("manual"))).await.unwrap();
    let now = c.cluster(&cluster.moref).await.unwrap().unwrap();
    assert_eq!(
        own(&now).and_then(|o| o.behavior).as_ref().map(vsphere::DrsBehavior::as_str),
        Some("manual"),
        "{now:?}"
    );
    assert!(!now.may_move(&vm.moref));
    c.set_drs_override(&cluster.moref, &DrsChange::Edit(set("partiallyAutomated"))).await.unwrap();
    let now = c.cluster(&cluster.moref).await.unwrap().unwrap();
    assert_eq!(
        own(&now).and_then(|o| o.behavior).as_ref().map(vsphere::DrsBehavior::as_str),
        Some("partiallyAutomated"),
        "{now:?}"
    );
    c.set_drs_override(&cluster.moref, &DrsChange::Remove(vm.moref.clone())).await.unwrap();
    let now = c.cluster(&cluster.moref).await.unwrap().unwrap();
    assert_eq!(own(&now), None, "{now:?}");

    // vcsim lists no privileges (an empty privilegeList), but answers HasPrivilegeOnEntity for
    // its administrator: our request is one a third party understands.
    assert!(c.privilege_ids().await.unwrap().is_empty());
    let asked = ["System.View", "VirtualMachine.State.CreateSnapshot"];
    let known = asked.iter().map(|p| (*p).to_owned()).collect();
    let held = c.has_privileges(&vm.moref, &asked, &known).await.unwrap();
    assert_eq!((held.known.len(), held.missing().len()), (2, 0), "{held:?}");

    let ds = c.inventory("Datastore", &["name", "info.url"]).await.unwrap();
    let local = ds.iter().find(|d| d.text("name") == Some("LocalDS_0")).expect("LocalDS_0");
    let root = std::path::PathBuf::from(local.text("info.url").unwrap());
    let ctk = root.join("DC0_H0_VM0/disk1-ctk.vmdk");
    std::fs::write(&ctk, b"change tracking").unwrap();
    let dc = c.datacenters().await.unwrap().into_iter().find(|d| d.name == "DC0").unwrap();
    c.delete_datastore_file("[LocalDS_0] DC0_H0_VM0/disk1-ctk.vmdk", &dc.moref).await.unwrap();
    assert!(!ctk.exists(), "deleted through the file manager");
    let e = c.delete_datastore_file("[LocalDS_0] DC0_H0_VM0/disk1-ctk.vmdk", &dc.moref).await.unwrap_err();
    assert!(e.fault().is_some_and(|f| f.type_name.contains("NotFound")), "{e}");
    c.logout().await.unwrap();
}

#[path = "vcsim/restore.rs"]
mod restore;
