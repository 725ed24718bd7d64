//! A restore into the simulator, driven with plain SOAP bodies in the WSDL's shapes (as pyvmomi
//! and govmomi send them) and raw HTTP for `/folder` uploads: a datastore folder, an uploaded
//! hosted sparse disk copied into a thin VMFS disk, a VM made with two controllers, three
//! disks and two NICs, read back, written to, tracked, powered, reconfigured, renamed,
//! unregistered and registered again, destroyed; and the faults on the way.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vsphere::soap::Request;
use vsphere::xml::Element;
use vsphere::{Client, ConnectOptions, Credentials, MoRef, Secret, Trust};
use vsphere_sim::{Config, NetworkConfig, Sim, SimTls};

const MIB: u64 = 1 << 20;
/// A MiB as an index.
const MI: usize = 1 << 20;

fn estate() -> Config {
    let mut c = Config::small(1, MIB);
    c.datacenters[0].networks =
        vec![NetworkConfig { name: "VM Network".into() }, NetworkConfig { name: "Backup LAN".into() }];
    c.max_upload = 8 * MIB;
    c
}

async fn login(sim: &Sim) -> Client {
    let opts =
        ConnectOptions { trust: Trust::Insecure, timeout: Duration::from_secs(20), ..ConnectOptions::new(&sim.url()) };
    let c = Client::connect(&opts).await.unwrap();
    c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") }).await.unwrap();
    c
}

/// One object's properties: name -> `val` element.
async fn props(c: &Client, obj: &MoRef, paths: &[&str]) -> Vec<(String, Element)> {
    let pc = MoRef::new("PropertyCollector", "propertyCollector");
    let mut r = Request::new("RetrievePropertiesEx", &pc);
    r.open("specSet", None).open("propSet", None).text("type", &obj.kind);
    for p in paths {
        r.text("pathSet", p);
    }
    r.close("propSet").open("objectSet", None).moref("obj", obj).close("objectSet").close("specSet");
    r.open("options", None).close("options");
    let e = c.invoke(r).await.unwrap();
    let objects = e.child("returnval").and_then(|rv| rv.child("objects")).cloned().unwrap_or_else(|| Element::new("x"));
    objects
        .children_named("propSet")
        .filter_map(|p| Some((p.text_of("name")?.to_owned(), p.child("val")?.clone())))
        .collect()
}

async fn prop(c: &Client, obj: &MoRef, path: &str) -> Element {
    props(c, obj, &[path]).await.into_iter().next().map(|(_, v)| v).unwrap_or_else(|| panic!("no {path} on {obj}"))
}

fn moref_of(e: &Element) -> MoRef {
    MoRef::from_element(e).unwrap()
}

/// Calls a `_Task` method and waits: its result, or the fault's type.
async fn task(c: &Client, r: Request) -> Result<Option<Element>, String> {
    let what = r.method().to_owned();
    let e = c.invoke(r).await.map_err(|e| e.fault().map_or(e.to_string(), |f| f.type_name.clone()))?;
    let t = moref_of(e.child("returnval").unwrap());
    c.wait_task(&t, &what, None).await.map_err(|e| e.fault().map_or(e.to_string(), |f| f.type_name.clone()))
}

async fn call(c: &Client, r: Request) -> Result<Element, String> {
    c.invoke(r).await.map_err(|e| e.fault().map_or(e.to_string(), |f| f.type_name.clone()))
}

/// A raw HTTP/1.1 request to the (plain) simulator: its status and body.
async fn http(sim: &Sim, method: &str, path: &str, cookie: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let addr = sim.url().trim_start_matches("http://").trim_end_matches("/sdk").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A server that answers before the body (404, 413) may close on it.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |i| i + 4);
    (status, out[at..].to_vec())
}

fn controller(r: &mut Request, kind: &str, key: i32) {
    r.open("deviceChange", None).text("operation", "add").open("device", Some(kind)).text("key", key);
    r.text("busNumber", 0).close("device").close("deviceChange");
}

fn disk(r: &mut Request, key: i32, ctrl: i32, unit: i32, file: &str, create_kb: Option<u64>) {
    r.open("deviceChange", None).text("operation", "add");
    if create_kb.is_some() {
        r.text("fileOperation", "create");
    }
    r.open("device", Some("VirtualDisk")).text("key", key);
    r.open("backing", Some("VirtualDiskFlatVer2BackingInfo")).text("fileName", file).text("diskMode", "persistent");
    r.text("thinProvisioned", true).close("backing");
    r.text("controllerKey", ctrl).text("unitNumber", unit);
    if let Some(kb) = create_kb {
        r.text("capacityInKB", kb);
    }
    r.close("device").close("deviceChange");
}

fn nic(r: &mut Request, op: &str, kind: &str, key: i32, network: Option<&MoRef>, mac: Option<&str>, connected: bool) {
    r.open("deviceChange", None).text("operation", op).open("device", Some(kind)).text("key", key);
    if let Some(n) = network {
        r.open("backing", Some("VirtualEthernetCardNetworkBackingInfo")).text("deviceName", "ignored");
        r.moref("network", n).close("backing");
    }
    r.open("connectable", None).text("startConnected", connected).text("allowGuestControl", true);
    r.text("connected", connected).close("connectable");
    match mac {
        Some(m) => r.text("addressType", "manual").text("macAddress", m),
        None => r.text("addressType", "generated"),
    };
    r.close("device").close("deviceChange");
}

fn devices_of(e: &Element) -> Vec<Element> {
    e.children.clone()
}

fn qemu_img() -> bool {
    let ok = std::process::Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        testkit::skip("a_restore_through_the_api", "qemu-img is not installed (it makes the uploaded sparse disk)");
    }
    ok
}

/// A 4 MiB raw image with data at 0 and at 3 MiB, and the same as monolithicSparse.
fn images(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut raw = vec![0u8; 4 * MI];
    raw[..4096].fill(0x11);
    raw[3 * MI..3 * MI + 100].fill(0x22);
    std::fs::write(dir.join("src.raw"), &raw).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse"])
        .arg(dir.join("src.raw"))
        .arg(dir.join("src.vmdk"))
        .status()
        .unwrap();
    assert!(st.success());
    (raw, std::fs::read(dir.join("src.vmdk")).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_through_the_api() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (raw, sparse) = images(work.path());
    let sim = Sim::start(estate(), dir.path(), SimTls::Plain).await.unwrap();
    let c = login(&sim).await;
    let cookie = c.session_cookie().unwrap();
    let root = c.content().root_folder.clone();

    // The inventory a placement walks: datacenter, its VM folder and networks, a host's pool.
    let dc = moref_of(&prop(&c, &root, "childEntity").await.children[0]);
    let vm_folder = moref_of(&prop(&c, &dc, "vmFolder").await);
    let nets: Vec<MoRef> = prop(&c, &dc, "network").await.children.iter().map(moref_of).collect();
    let names = names_of(&c, &nets).await;
    assert_eq!(names, ["VM Network", "Backup LAN"]);
    let host_folder = moref_of(&prop(&c, &dc, "hostFolder").await);
    let cr = moref_of(&prop(&c, &host_folder, "childEntity").await.children[0]);
    let pool = moref_of(&prop(&c, &cr, "resourcePool").await);
    assert_eq!(pool.kind, "ResourcePool");
    let host = moref_of(&prop(&c, &cr, "host").await.children[0]);
    assert_eq!(prop(&c, &host, "network").await.children.len(), 2);
    let dcr = |m: &str| {
        let mut r = Request::new(m, &MoRef::new("FileManager", "FileManager"));
        r.text("name", "[ds1] restore").moref("datacenter", &dc);
        r
    };

    // A folder, then uploads into it: a missing parent is 404, too big is 413.
    let mut r = dcr("MakeDirectory");
    r.text("createParentDirectories", false);
    call(&c, r).await.unwrap();
    let mut r = dcr("MakeDirectory");
    r.text("createParentDirectories", false);
    assert_eq!(call(&c, r).await.unwrap_err(), "FileAlreadyExists");
    let q = "?dcPath=DC1&dsName=ds1";
    assert_eq!(http(&sim, "PUT", &format!("/folder/nowhere/src.vmdk{q}"), &cookie, &sparse).await.0, 404);
    assert_eq!(
        http(&sim, "PUT", &format!("/folder/restore/src.vmdk{q}"), "vmware_soap_session=\"bogus\"", &sparse).await.0,
        401
    );
    assert_eq!(http(&sim, "PUT", &format!("/folder/restore/big.bin{q}"), &cookie, &vec![1u8; 9 << 20]).await.0, 413);
    assert!(!dir.path().join("ds1/restore/big.bin").exists());
    // The estate's VM is powered on: its disk is locked against uploads.
    assert_eq!(http(&sim, "PUT", &format!("/folder/vm00000/vm00000-flat.vmdk{q}"), &cookie, b"x").await.0, 403);
    assert_eq!(http(&sim, "PUT", &format!("/folder/restore/src.vmdk{q}"), &cookie, &sparse).await.0, 201);
    assert_eq!(http(&sim, "GET", &format!("/folder/restore/src.vmdk{q}"), &cookie, b"").await.1, sparse);
    assert_eq!(http(&sim, "PUT", &format!("/folder/restore/src.vmdk{q}"), &cookie, &sparse).await.0, 200);
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path().join("ds1/restore")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // The upload into a thin VMFS disk, holes kept; again without force: it exists.
    // ServiceContent names it (our client does not read it yet: pyvmomi's test does).
    let vdm = MoRef::new("VirtualDiskManager", "VirtualDiskManager");
    let copy = |force: bool| {
        let mut r = Request::new("CopyVirtualDisk_Task", &vdm);
        r.text("sourceName", "[ds1] restore/src.vmdk").moref("sourceDatacenter", &dc);
        r.text("destName", "[ds1] restore/data.vmdk").moref("destDatacenter", &dc);
        r.open("destSpec", Some("FileBackedVirtualDiskSpec")).text("diskType", "thin").text("adapterType", "lsiLogic");
        r.close("destSpec").text("force", force);
        r
    };
    task(&c, copy(false)).await.unwrap();
    assert_eq!(task(&c, copy(false)).await.unwrap_err(), "FileAlreadyExists");
    task(&c, copy(true)).await.unwrap();
    let flat = dir.path().join("ds1/restore/data-flat.vmdk");
    assert_eq!(std::fs::read(&flat).unwrap(), raw);
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&flat).unwrap()) * 512;
    assert!(used <= 256 << 10, "{used} bytes allocated for 2 data grains");
    let desc = std::fs::read_to_string(dir.path().join("ds1/restore/data.vmdk")).unwrap();
    assert!(desc.contains("createType=\"vmfs\"") && desc.contains("RW 8192 VMFS \"data-flat.vmdk\""), "{desc}");
    let mut r = Request::new("CreateVirtualDisk_Task", &vdm);
    r.text("name", "[ds1] restore/empty.vmdk").moref("datacenter", &dc);
    r.open("spec", Some("FileBackedVirtualDiskSpec")).text("diskType", "thin").text("adapterType", "lsiLogic");
    r.text("capacityKb", 2048).close("spec");
    task(&c, r).await.unwrap();

    // The VM: two controllers, a new disk and the two existing ones, two NICs.
    let create = |name: &str, extra_device: bool| {
        let mut r = Request::new("CreateVM_Task", &vm_folder);
        r.open("config", None).text("name", name).text("version", "vmx-19").text("guestId", "ubuntu64Guest");
        r.text("uuid", "42301234-5678-9abc-def0-123456789abc");
        r.open("files", None).text("vmPathName", "[ds1]").close("files");
        r.text("numCPUs", 4).text("numCoresPerSocket", 2).text("memoryMB", 2048);
        controller(&mut r, "ParaVirtualSCSIController", -100);
        controller(&mut r, "VirtualAHCIController", -101);
        disk(&mut r, -1, -100, 0, "[ds1]", Some(1024));
        disk(&mut r, -2, -100, 1, "[ds1] restore/data.vmdk", None);
        disk(&mut r, -3, -101, 0, "[ds1] restore/empty.vmdk", None);
        nic(&mut r, "add", "VirtualVmxnet3", -4, Some(&nets[0]), None, true);
        nic(&mut r, "add", "VirtualE1000e", -5, Some(&nets[1]), Some("00:50:56:3f:00:42"), false);
        if extra_device {
            r.open("deviceChange", None).text("operation", "add").open("device", Some("VirtualFloppy"));
            r.text("key", -6).close("device").close("deviceChange");
        }
        r.open("extraConfig", None).text("key", "restored.from").text("value", "point-7").close("extraConfig");
        r.text("firmware", "efi").close("config").moref("pool", &pool);
        r
    };
    assert_eq!(task(&c, create("floppy", true)).await.unwrap_err(), "InvalidDeviceSpec");
    assert!(!dir.path().join("ds1/floppy").exists(), "a failed CreateVM leaves nothing");
    let vm = moref_of(&task(&c, create("restored", false)).await.unwrap().unwrap());
    assert_eq!(task(&c, create("restored", false)).await.unwrap_err(), "DuplicateName");

    let p = props(
        &c,
        &vm,
        &[
            "name",
            "config.hardware.numCPU",
            "config.hardware.memoryMB",
            "config.firmware",
            "config.guestId",
            "config.version",
            "config.uuid",
            "config.instanceUuid",
            "config.files.vmPathName",
            "runtime.powerState",
            "parent",
            "resourcePool",
            "config.extraConfig",
        ],
    )
    .await;
    let get = |n: &str| p.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("{n}"));
    assert_eq!(get("name").text, "restored");
    assert_eq!(
        (get("config.hardware.numCPU").text.as_str(), get("config.hardware.memoryMB").text.as_str()),
        ("4", "2048")
    );
    assert_eq!(get("config.firmware").text, "efi");
    assert_eq!(get("config.guestId").text, "ubuntu64Guest");
    assert_eq!(get("config.version").text, "vmx-19");
    assert_eq!(get("config.uuid").text, "42301234-5678-9abc-def0-123456789abc");
    assert_eq!(get("config.instanceUuid").text.len(), 36);
    assert_eq!(get("config.files.vmPathName").text, "[ds1] restored/restored.vmx");
    assert_eq!(get("runtime.powerState").text, "poweredOff");
    assert_eq!(moref_of(&get("parent")), vm_folder);
    assert_eq!(moref_of(&get("resourcePool")), pool);
    assert_eq!(get("config.extraConfig").children[0].text_of("value"), Some("point-7"));

    let devs = devices_of(&prop(&c, &vm, "config.hardware.device").await);
    let kinds: Vec<&str> = devs.iter().map(Element::type_name).collect();
    assert_eq!(
        kinds,
        [
            "ParaVirtualSCSIController",
            "VirtualAHCIController",
            "VirtualDisk",
            "VirtualDisk",
            "VirtualDisk",
            "VirtualVmxnet3",
            "VirtualE1000e"
        ]
    );
    let key = |e: &Element| e.parse_of::<i32>("key").unwrap();
    assert_eq!((key(&devs[0]), key(&devs[1])), (1000, 15000), "temporary keys become vSphere's");
    let disks: Vec<(i32, i32, i32, u64, String)> = devs[2..5]
        .iter()
        .map(|d| {
            (
                key(d),
                d.parse_of("controllerKey").unwrap(),
                d.parse_of("unitNumber").unwrap(),
                d.parse_of("capacityInBytes").unwrap(),
                d.path("backing.fileName").unwrap().text.clone(),
            )
        })
        .collect();
    assert_eq!(
        disks,
        [
            (2000, 1000, 0, MIB, "[ds1] restored/restored.vmdk".to_owned()),
            (2001, 1000, 1, 4 * MIB, "[ds1] restore/data.vmdk".to_owned()),
            (2002, 15000, 0, 2 * MIB, "[ds1] restore/empty.vmdk".to_owned()),
        ]
    );
    let mac0 = devs[5].text_of("macAddress").unwrap().to_owned();
    assert!(mac0.starts_with("00:50:56:"), "{mac0}");
    assert_eq!(devs[6].text_of("macAddress"), Some("00:50:56:3f:00:42"));
    assert_eq!(devs[6].text_of("addressType"), Some("manual"));
    assert_eq!(moref_of(devs[5].path("backing.network").unwrap()), nets[0]);
    assert_eq!(devs[5].path("backing.deviceName").map(|e| e.text.as_str()), Some("VM Network"));
    assert_eq!(devs[6].path("connectable.startConnected").map(|e| e.text.as_str()), Some("false"));
    let vmx = http(&sim, "GET", &format!("/folder/restored/restored.vmx{q}"), &cookie, b"").await;
    let vmx = String::from_utf8(vmx.1).unwrap();
    for line in [
        "numvcpus = \"4\"",
        "scsi0.virtualDev = \"pvscsi\"",
        "scsi0:1.fileName = \"/vmfs/volumes/ds1/restore/data.vmdk\"",
        "sata0:0.present = \"TRUE\"",
        "ethernet1.address = \"00:50:56:3f:00:42\"",
        "firmware = \"efi\"",
    ] {
        assert!(vmx.contains(line), "{line} in\n{vmx}");
    }
    // The network knows its VM.
    assert_eq!(moref_of(&prop(&c, &nets[1], "vm").await.children[0]), vm);

    // Guest writes, CBT, a snapshot, and changes since it on the powered-off VM (no snapshot).
    sim.write("restored", 2001, MIB, &[9u8; 512]).unwrap();
    c.set_change_tracking(&vm, true).await.unwrap();
    let s1 = c.create_snapshot(&vm, "first", "", false, None).await.unwrap();
    let id = c.snapshot_disks(&s1).await.unwrap().into_iter().find(|d| d.key == 2001).unwrap().change_id.unwrap();
    c.remove_snapshot(&s1, true).await.unwrap();
    sim.write("restored", 2001, 2 * MIB, &[7u8; 512]).unwrap();
    let ch = c.query_changed_disk_areas(&vm, None, 2001, 4 * MIB, &id).await.unwrap();
    assert_eq!(ch.areas, cbt::ExtentSet::from_ranges([(2 * MIB, 64 << 10)]));
    assert_eq!(&std::fs::read(&flat).unwrap()[2 * MI..2 * MI + 4], &[7; 4]);

    // Power: on, on again, destroy while on, off.
    let on = |m: &str| Request::new(m, &vm);
    task(&c, on("PowerOnVM_Task")).await.unwrap();
    assert_eq!(task(&c, on("PowerOnVM_Task")).await.unwrap_err(), "InvalidPowerState");
    assert_eq!(task(&c, on("Destroy_Task")).await.unwrap_err(), "InvalidPowerState");
    let e = c.query_changed_disk_areas(&vm, None, 2001, 4 * MIB, &id).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.type_name.as_str()), Some("InvalidState"), "{e}");
    let devs = devices_of(&prop(&c, &vm, "config.hardware.device").await);
    assert_eq!(devs[5].path("connectable.connected").map(|e| e.text.as_str()), Some("true"));
    task(&c, on("PowerOffVM_Task")).await.unwrap();
    assert_eq!(task(&c, on("PowerOffVM_Task")).await.unwrap_err(), "InvalidPowerState");

    // Reconfigure: the empty disk removed with its files, the second NIC connected at power-on.
    let mut r = Request::new("ReconfigVM_Task", &vm);
    r.open("spec", None);
    r.open("deviceChange", None).text("operation", "remove").text("fileOperation", "destroy");
    r.open("device", Some("VirtualDisk")).text("key", 2002).text("controllerKey", 15000).text("unitNumber", 0);
    r.close("device").close("deviceChange");
    nic(&mut r, "edit", "VirtualE1000e", 4001, None, None, true);
    r.close("spec");
    task(&c, r).await.unwrap();
    assert!(!dir.path().join("ds1/restore/empty-flat.vmdk").exists());
    let devs = devices_of(&prop(&c, &vm, "config.hardware.device").await);
    assert_eq!(devs.iter().filter(|d| d.type_name() == "VirtualDisk").count(), 2);
    let e1000e = devs.iter().find(|d| d.type_name() == "VirtualE1000e").unwrap();
    assert_eq!(e1000e.path("connectable.startConnected").map(|e| e.text.as_str()), Some("true"));
    assert_eq!(e1000e.text_of("macAddress"), Some("00:50:56:3f:00:42"));

    // Rename; unregister (files stay), register the .vmx again.
    let mut r = Request::new("Rename_Task", &vm);
    r.text("newName", "restored-2");
    task(&c, r).await.unwrap();
    assert_eq!(prop(&c, &vm, "name").await.text, "restored-2");
    call(&c, Request::new("UnregisterVM", &vm)).await.unwrap();
    assert_eq!(task(&c, on("PowerOnVM_Task")).await.unwrap_err(), "ManagedObjectNotFound");
    assert!(dir.path().join("ds1/restored/restored.vmx").exists());
    let mut r = Request::new("RegisterVM_Task", &vm_folder);
    r.text("path", "[ds1] restored/restored.vmx").text("asTemplate", false).moref("pool", &pool);
    let vm2 = moref_of(&task(&c, r).await.unwrap().unwrap());
    assert_ne!(vm2, vm);
    assert_eq!(prop(&c, &vm2, "name").await.text, "restored-2");
    assert_eq!(prop(&c, &vm2, "config.uuid").await.text, "42301234-5678-9abc-def0-123456789abc");
    let devs = devices_of(&prop(&c, &vm2, "config.hardware.device").await);
    let files: Vec<String> = devs.iter().filter_map(|d| d.path("backing.fileName").map(|f| f.text.clone())).collect();
    assert_eq!(files, ["[ds1] restored/restored.vmdk", "[ds1] restore/data.vmdk"]);
    assert!(devs.iter().any(|d| d.text_of("macAddress") == Some("00:50:56:3f:00:42")));
    assert_eq!(prop(&c, &vm2, "config.hardware.numCPU").await.text, "4");

    // Destroy: gone from the inventory, its files deleted.
    task(&c, Request::new("Destroy_Task", &vm2)).await.unwrap();
    assert!(c.vms().await.unwrap().iter().all(|v| v.moref != vm2));
    assert!(!dir.path().join("ds1/restored").exists());
    assert!(!flat.exists(), "its disks go with it");
    // The uploaded source is no VM's: deleted through the disk manager.
    let mut r = Request::new("DeleteVirtualDisk_Task", &vdm);
    r.text("name", "[ds1] restore/src.vmdk").moref("datacenter", &dc);
    task(&c, r).await.unwrap();
    assert!(!dir.path().join("ds1/restore/src.vmdk").exists());
    // The estate's own VM is untouched and still backs up.
    let vms = c.vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].disks[0].capacity, MIB);
}

async fn names_of(c: &Client, nets: &[MoRef]) -> Vec<String> {
    let mut out = Vec::new();
    for n in nets {
        out.push(prop(c, n, "name").await.text);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_calls_need_their_privileges() {
    let mut cfg = estate();
    cfg.denied
        .push(vsphere_sim::Denied { entity: "vm".into(), privileges: vec!["VirtualMachine.Inventory.Create".into()] });
    cfg.denied.push(vsphere_sim::Denied { entity: "ds1".into(), privileges: vec!["Datastore.FileManagement".into()] });
    let dir = tempfile::tempdir().unwrap();
    let sim = Sim::start(cfg, dir.path(), SimTls::Plain).await.unwrap();
    let c = login(&sim).await;
    let cookie = c.session_cookie().unwrap();
    let root = c.content().root_folder.clone();
    let dc = moref_of(&prop(&c, &root, "childEntity").await.children[0]);
    let vm_folder = moref_of(&prop(&c, &dc, "vmFolder").await);
    let mut r = Request::new("MakeDirectory", &MoRef::new("FileManager", "FileManager"));
    r.text("name", "[ds1] x").moref("datacenter", &dc).text("createParentDirectories", true);
    let e = c.invoke(r).await.unwrap_err();
    let f = e.fault().unwrap();
    assert_eq!((f.type_name.as_str(), f.privilege.as_deref()), ("NoPermission", Some("Datastore.FileManagement")));
    assert_eq!(http(&sim, "PUT", "/folder/vm00000/x.bin?dcPath=DC1&dsName=ds1", &cookie, b"x").await.0, 403);
    let pool = MoRef::new("ResourcePool", "resgroup-s0");
    let mut r = Request::new("CreateVM_Task", &vm_folder);
    r.open("config", None).text("name", "n").open("files", None).text("vmPathName", "[ds1]").close("files");
    r.close("config").moref("pool", &pool);
    assert_eq!(task(&c, r).await.unwrap_err(), "NoPermission");
}
