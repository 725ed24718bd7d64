//! NFC import into the simulator with plain SOAP bodies and raw HTTP: `ImportVApp` with a
//! two-disk config spec, the lease read back, a streamOptimized VMDK `PUT` (and one chunked
//! `POST`) per device URL, progress, complete, and the disks' bytes compared; garbage and a
//! wrong capacity refused with the disk unchanged; an abort and a timeout leaving nothing.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vsphere::soap::Request;
use vsphere::xml::Element;
use vsphere::{Client, ConnectOptions, Credentials, MoRef, Secret, Trust};
use vsphere_sim::{Config, Denied, Sim, SimTls};

const MI: usize = 1 << 20;

async fn login(sim: &Sim) -> Client {
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") }).await.unwrap();
    c
}

/// One property of one object (its `val`), or None when unset.
async fn prop(c: &Client, obj: &MoRef, path: &str) -> Option<Element> {
    let pc = MoRef::new("PropertyCollector", "propertyCollector");
    let mut r = Request::new("RetrievePropertiesEx", &pc);
    r.open("specSet", None).open("propSet", None).text("type", &obj.kind).text("pathSet", path).close("propSet");
    r.open("objectSet", None).moref("obj", obj).close("objectSet").close("specSet");
    r.open("options", None).close("options");
    let e = c.invoke(r).await.unwrap();
    let objects = e.child("returnval")?.child("objects")?;
    objects.children_named("propSet").find(|p| p.text_of("name") == Some(path)).and_then(|p| p.child("val")).cloned()
}

async fn call(c: &Client, r: Request) -> Result<Element, String> {
    c.invoke(r).await.map_err(|e| e.fault().map_or(e.to_string(), |f| f.type_name.clone()))
}

/// A raw HTTP/1.1 request to the (plain) simulator, the body sized or chunked: its status and
/// body.
async fn http(addr: &str, method: &str, path: &str, body: &[u8], chunked: bool) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let length =
        if chunked { "Transfer-Encoding: chunked".to_owned() } else { format!("Content-Length: {}", body.len()) };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-vnd.vmware-streamVmdk\r\n{length}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    if chunked {
        for piece in body.chunks(100_000) {
            let _ = s.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await;
            let _ = s.write_all(piece).await;
            let _ = s.write_all(b"\r\n").await;
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    } else {
        let _ = s.write_all(body).await;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn addr_of(sim: &Sim) -> String {
    sim.url().trim_start_matches("http://").trim_end_matches("/sdk").to_owned()
}

/// `ImportVApp` of a VM `name` with a PVSCSI controller and disks of these sizes (KiB), each
/// with `fileOperation` create and a backing of just `[ds1]`.
fn import(name: &str, disks_kb: &[u64]) -> Request {
    let mut r = Request::new("ImportVApp", &MoRef::new("ResourcePool", "resgroup-s0"));
    r.open("spec", Some("VirtualMachineImportSpec")).open("configSpec", None);
    r.text("name", name).text("version", "vmx-19").text("guestId", "otherGuest64");
    r.open("files", None).text("vmPathName", "[ds1]").close("files");
    r.text("numCPUs", 1).text("memoryMB", 256);
    r.open("deviceChange", None).text("operation", "add").open("device", Some("ParaVirtualSCSIController"));
    r.text("key", -100).text("busNumber", 0).close("device").close("deviceChange");
    for (i, kb) in disks_kb.iter().enumerate() {
        let key = -1 - i32::try_from(i).unwrap();
        r.open("deviceChange", None).text("operation", "add").text("fileOperation", "create");
        r.open("device", Some("VirtualDisk")).text("key", key);
        r.open("backing", Some("VirtualDiskFlatVer2BackingInfo")).text("fileName", "[ds1]");
        r.text("diskMode", "persistent").text("thinProvisioned", true).close("backing");
        r.text("controllerKey", -100).text("unitNumber", i).text("capacityInKB", kb).close("device");
        r.close("deviceChange");
    }
    r.close("configSpec").close("spec").moref("folder", &MoRef::new("Folder", "group-v1"));
    r
}

fn stream_of(raw: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    vmdk::write_stream_optimized(&mut out, &raw.to_vec(), raw.len() as u64, None, name).unwrap();
    out
}

fn lease_call(method: &str, lease: &MoRef) -> Request {
    Request::new(method, lease)
}

async fn state_of(c: &Client, lease: &MoRef) -> String {
    prop(c, lease, "state").await.unwrap().text
}

fn allocated_bytes(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_through_an_nfc_lease() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(Config::small(1, MI as u64), dir.path(), SimTls::Plain).await.unwrap();
    let c = login(&sim).await;
    let addr = addr_of(&sim);

    let e = call(&c, import("imported", &[1024, 2048])).await.unwrap();
    let lease = MoRef::from_element(e.child("returnval").unwrap()).unwrap();
    assert_eq!(lease.kind, "HttpNfcLease");
    assert_eq!(state_of(&c, &lease).await, "ready");
    let info = prop(&c, &lease, "info").await.unwrap();
    assert_eq!(info.xsi_type.as_deref(), Some("HttpNfcLeaseInfo"));
    let vm = MoRef::from_element(info.child("entity").unwrap()).unwrap();
    assert_eq!(vm.kind, "VirtualMachine");
    assert_eq!(MoRef::from_element(info.child("lease").unwrap()).unwrap(), lease);
    assert_eq!(info.text_of("leaseTimeout"), Some("300"));
    assert_eq!(info.text_of("totalDiskCapacityInKB"), Some("3072"));
    let urls: Vec<&Element> = info.children_named("deviceUrl").collect();
    assert_eq!(urls.len(), 2);
    for (n, (u, target)) in urls.iter().zip(["imported.vmdk", "imported_1.vmdk"]).enumerate() {
        assert_eq!(u.xsi_type.as_deref(), Some("HttpNfcLeaseDeviceUrl"));
        assert_eq!(u.text_of("key"), Some(format!("/{}/disk:{n}", vm.value).as_str()));
        assert_eq!(u.text_of("importKey"), Some(format!("/imported/disk:{n}").as_str()));
        assert_eq!(u.text_of("targetId"), Some(target));
        assert_eq!(u.text_of("url"), Some(format!("http://{addr}/nfc/{}/{target}", lease.value).as_str()));
        assert_eq!((u.text_of("disk"), u.text_of("fileSize")), (Some("true"), Some("0")));
        assert!(u.text_of("datastoreKey").is_some_and(|k| k.starts_with("datastore-")), "{u:?}");
        assert!(u.child("sslThumbprint").is_some());
    }
    assert!(dir.path().join("ds1/imported/imported.vmx").exists());
    assert_eq!(prop(&c, &lease, "error").await, None);
    assert_eq!(prop(&c, &lease, "initializeProgress").await.unwrap().text, "100");

    let mut raw0 = vec![0u8; MI];
    raw0[..4096].fill(0x11);
    raw0[700 << 10..(700 << 10) + 100].fill(0x22);
    let mut raw1 = vec![0u8; 2 * MI];
    raw1[3 * MI / 2..3 * MI / 2 + 65536].fill(0x33);
    let path = |t: &str| format!("/nfc/{}/{t}", lease.value);
    let disk0 = sim.disk_path("imported", 2000).unwrap();

    // Refused, the disk left as it was: garbage, the wrong capacity, no such lease or name.
    let (status, why) = http(&addr, "PUT", &path("imported.vmdk"), &[0xa5u8; 70_000], false).await;
    assert_eq!(status, 400, "{why}");
    let (status, why) = http(&addr, "PUT", &path("imported.vmdk"), &stream_of(&raw1, "x.vmdk"), false).await;
    assert_eq!(status, 400, "{why}");
    assert!(why.contains("capacity"), "{why}");
    let mut cut = stream_of(&raw0, "imported.vmdk");
    cut.truncate(cut.len() - 1500);
    assert_eq!(http(&addr, "PUT", &path("imported.vmdk"), &cut, false).await.0, 400);
    assert_eq!(std::fs::read(&disk0).unwrap(), vec![0u8; MI]);
    assert_eq!(allocated_bytes(&disk0), 0);
    let s0 = stream_of(&raw0, "imported.vmdk");
    assert_eq!(http(&addr, "PUT", "/nfc/lease-999999/imported.vmdk", &s0, false).await.0, 404);
    assert_eq!(http(&addr, "PUT", &path("other.vmdk"), &s0, false).await.0, 404);
    assert_eq!(http(&addr, "PUT", &path("imported.vmdk"), &vec![0u8; 4 * MI + (8 << 20)], false).await.0, 413);
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path().join(".nfc")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The uploads: one sized PUT, one chunked POST.
    let (status, why) = http(&addr, "PUT", &path("imported.vmdk"), &s0, false).await;
    assert_eq!(status, 200, "{why}");
    let s1 = stream_of(&raw1, "imported_1.vmdk");
    let (status, why) = http(&addr, "POST", &path("imported_1.vmdk"), &s1, true).await;
    assert_eq!(status, 200, "{why}");
    let mut r = lease_call("HttpNfcLeaseProgress", &lease);
    r.text("percent", 50);
    call(&c, r).await.unwrap();
    assert_eq!(prop(&c, &lease, "transferProgress").await.unwrap().text, "50");
    let mut r = lease_call("HttpNfcLeaseProgress", &lease);
    r.text("percent", 101);
    assert_eq!(call(&c, r).await.unwrap_err(), "InvalidArgument");
    call(&c, lease_call("HttpNfcLeaseComplete", &lease)).await.unwrap();
    assert_eq!(state_of(&c, &lease).await, "done");

    assert_eq!(std::fs::read(&disk0).unwrap(), raw0);
    assert_eq!(std::fs::read(sim.disk_path("imported", 2001).unwrap()).unwrap(), raw1);
    assert!(allocated_bytes(&disk0) <= 256 << 10, "holes stay holes: {}", allocated_bytes(&disk0));
    // The lease is over: calls fault, uploads find nothing; the VM stays.
    assert_eq!(call(&c, lease_call("HttpNfcLeaseComplete", &lease)).await.unwrap_err(), "InvalidState");
    assert_eq!(call(&c, lease_call("HttpNfcLeaseAbort", &lease)).await.unwrap_err(), "InvalidState");
    assert_eq!(http(&addr, "PUT", &path("imported.vmdk"), &s0, false).await.0, 404);
    assert_eq!(prop(&c, &vm, "name").await.unwrap().text, "imported");
    // A second import of the same name is refused as CreateVM_Task refuses it.
    assert_eq!(call(&c, import("imported", &[1024])).await.unwrap_err(), "DuplicateName");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_import_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(Config::small(1, MI as u64), dir.path(), SimTls::Plain).await.unwrap();
    let c = login(&sim).await;
    let addr = addr_of(&sim);
    let e = call(&c, import("aborted", &[1024, 1024])).await.unwrap();
    let lease = MoRef::from_element(e.child("returnval").unwrap()).unwrap();
    let mut raw = vec![0u8; MI];
    raw[..512].fill(1);
    let (status, why) =
        http(&addr, "PUT", &format!("/nfc/{}/aborted.vmdk", lease.value), &stream_of(&raw, "a.vmdk"), false).await;
    assert_eq!(status, 200, "{why}");
    assert!(dir.path().join("ds1/aborted").is_dir());
    let mut r = lease_call("HttpNfcLeaseAbort", &lease);
    r.open("fault", None).open("fault", Some("SystemError")).text("reason", "client gave up").close("fault");
    r.text("localizedMessage", "client gave up").close("fault");
    call(&c, r).await.unwrap();
    assert_eq!(state_of(&c, &lease).await, "error");
    let err = prop(&c, &lease, "error").await.unwrap();
    assert_eq!(err.child("fault").and_then(|f| f.xsi_type.as_deref()), Some("SystemError"));
    assert_eq!(err.text_of("localizedMessage"), Some("client gave up"));
    assert!(sim.disk_path("aborted", 2000).is_err());
    assert!(!dir.path().join("ds1/aborted").exists(), "the VM's folder is gone");
    assert_eq!(call(&c, lease_call("HttpNfcLeaseComplete", &lease)).await.unwrap_err(), "InvalidState");

    // Without VApp.Import on the pool, nothing is made.
    drop(c);
    drop(sim);
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::small(1, MI as u64);
    config.denied = vec![Denied { entity: "Resources".into(), privileges: vec!["VApp.Import".into()] }];
    let sim = Sim::start(config, dir.path(), SimTls::Plain).await.unwrap();
    let c = login(&sim).await;
    assert_eq!(call(&c, import("denied", &[1024])).await.unwrap_err(), "NoPermission");
    assert!(!dir.path().join("ds1/denied").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_lease_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::small(1, MI as u64);
    config.lease_timeout = 1;
    let sim = Sim::start(config, dir.path(), SimTls::Plain).await.unwrap();
    let c = login(&sim).await;
    let e = call(&c, import("slow", &[1024])).await.unwrap();
    let lease = MoRef::from_element(e.child("returnval").unwrap()).unwrap();
    assert_eq!(prop(&c, &lease, "info").await.unwrap().text_of("leaseTimeout"), Some("1"));
    // Progress keeps it alive past its timeout...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut r = lease_call("HttpNfcLeaseProgress", &lease);
        r.text("percent", 10);
        call(&c, r).await.unwrap();
    }
    assert_eq!(state_of(&c, &lease).await, "ready");
    // ...silence aborts it, with no request to notice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!dir.path().join("ds1/slow").exists(), "the VM's folder is gone");
    assert!(sim.disk_path("slow", 2000).is_err());
    assert_eq!(state_of(&c, &lease).await, "error");
    let err = prop(&c, &lease, "error").await.unwrap();
    assert_eq!(err.child("fault").and_then(|f| f.xsi_type.as_deref()), Some("Timedout"));
    let mut r = lease_call("HttpNfcLeaseProgress", &lease);
    r.text("percent", 20);
    assert_eq!(call(&c, r).await.unwrap_err(), "InvalidState");
}
