//! The calls a restore into vSphere needs, against vcsim: placement by name and its errors,
//! networks, datastore folders, `/folder` uploads read back, virtual disks made and copied, a
//! VM created from a spec and read back, disks attached and detached, power, rename,
//! unregister and register, destroy.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use vsphere::datastore::{DatastoreFile, DatastoreReader};
use vsphere::provision::{
    ControllerKind, ControllerSpec, DiskSpec, Firmware, NicKind, NicSpec, Placement, Provisioning, VmSpec,
};
use vsphere::soap::Request;
use vsphere::{Client, Error, FaultKind, MoRef, Trust};

use super::{PASSWORD, creds, options, start};

/// A body of ready chunks.
struct Chunks(VecDeque<Result<Bytes, std::io::Error>>);

impl futures_core::Stream for Chunks {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.pop_front())
    }
}

/// `data` in chunks of 64 KiB.
fn chunks(data: &[u8]) -> Chunks {
    Chunks(data.chunks(64 << 10).map(|c| Ok(Bytes::copy_from_slice(c))).collect())
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect()
}

async fn read_back(reader: &DatastoreReader, file: &DatastoreFile) -> Vec<u8> {
    let len = reader.size(file).await.unwrap();
    reader.read(file, 0, len).await.unwrap().to_vec()
}

/// A monolithicSparse VMDK of `raw` made by qemu-img, or `raw` itself without qemu-img.
fn sparse_vmdk(dir: &std::path::Path, raw: &[u8]) -> Vec<u8> {
    let (input, output) = (dir.join("disk.raw"), dir.join("disk.vmdk"));
    std::fs::write(&input, raw).unwrap();
    let made = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse"])
        .args([&input, &output])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        std::fs::read(&output).unwrap()
    } else {
        eprintln!("qemu-img is not here: uploading raw bytes instead of a sparse VMDK");
        raw.to_vec()
    }
}

async fn power(c: &Client, vm: &MoRef) -> String {
    c.property(vm, "runtime.powerState").await.unwrap().unwrap().text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_by_name_and_its_errors() {
    let Some(s) = start("placement_by_name_and_its_errors", &[]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let dc = c.find_by_inventory_path("DC0").await.unwrap().unwrap();
    let vm_folder = c.find_by_inventory_path("DC0/vm").await.unwrap().unwrap();
    let root_pool = |cr: &str| {
        let c = &c;
        let cr = cr.to_owned();
        async move {
            let cr = c.find_by_inventory_path(&format!("DC0/host/{cr}")).await.unwrap().unwrap();
            MoRef::from_element(&c.property(&cr, "resourcePool").await.unwrap().unwrap()).unwrap()
        }
    };

    // Nothing named: the only datacenter, the first host by name (the cluster's), its pool.
    let p = c.placement(None, None, None, None, None).await.unwrap();
    let first = c.find_by_inventory_path("DC0/host/DC0_C0/DC0_C0_H0").await.unwrap().unwrap();
    assert_eq!(
        p,
        Placement {
            datacenter: dc.clone(),
            datacenter_name: "DC0".into(),
            vm_folder: vm_folder.clone(),
            pool: root_pool("DC0_C0").await,
            host: Some(first),
        }
    );
    // A standalone host by name: its compute resource's root pool.
    let p = c.placement(Some("DC0"), Some("DC0_H0"), None, None, None).await.unwrap();
    assert_eq!(p.pool, root_pool("DC0_H0").await);
    assert_eq!(p.host.as_ref().map(|h| h.kind.as_str()), Some("HostSystem"));
    // A cluster alone: its root pool, the host left to DRS.
    let p = c.placement(None, None, Some("DC0_C0"), None, None).await.unwrap();
    assert_eq!((p.pool.clone(), p.host), (root_pool("DC0_C0").await, None));
    // A pool by name inside the cluster.
    let p = c.placement(None, None, Some("DC0_C0"), Some("Resources"), None).await.unwrap();
    assert_eq!(p.pool, root_pool("DC0_C0").await);
    // A folder by path under the VM folder.
    let mut req = Request::new("CreateFolder", &vm_folder);
    req.text("name", "Restored");
    let restored = MoRef::from_element(c.invoke(req).await.unwrap().child("returnval").unwrap()).unwrap();
    let mut req = Request::new("CreateFolder", &restored);
    req.text("name", "Web & DB");
    let web = MoRef::from_element(c.invoke(req).await.unwrap().child("returnval").unwrap()).unwrap();
    let p = c.placement(None, Some("DC0_H0"), None, None, Some("/Restored/Web & DB")).await.unwrap();
    assert_eq!(p.vm_folder, web);

    // What is not there is named, with the choices.
    let e = c.placement(Some("DC9"), None, None, None, None).await.unwrap_err().to_string();
    assert!(e.contains("\"DC9\"") && e.contains("DC0"), "{e}");
    let e = c.placement(None, Some("esx9"), None, None, None).await.unwrap_err().to_string();
    assert!(e.contains("esx9") && e.contains("DC0_H0") && e.contains("DC0_C0_H1"), "{e}");
    let e = c.placement(None, None, Some("C9"), None, None).await.unwrap_err().to_string();
    assert!(e.contains("C9") && e.contains("DC0_C0"), "{e}");
    let e = c.placement(None, Some("DC0_H0"), Some("DC0_C0"), None, None).await.unwrap_err().to_string();
    assert!(e.contains("not in cluster"), "{e}");
    let e = c.placement(None, None, None, Some("Gold"), None).await.unwrap_err().to_string();
    assert!(e.contains("Gold") && e.contains("Resources"), "{e}");
    // Every compute resource has a root pool called Resources: ambiguous without a host.
    let e = c.placement(None, None, None, Some("Resources"), None).await.unwrap_err().to_string();
    assert!(e.contains("name one more precisely"), "{e}");
    let e = c.placement(None, None, None, None, Some("Restored/Nope")).await.unwrap_err();
    assert!(matches!(&e, Error::Config(m) if m.contains("Nope") && m.contains("Web & DB")), "{e}");

    // Networks of the datacenter, by name.
    let nets = c.networks(&dc).await.unwrap();
    let vm_network = nets.iter().find(|n| n.name == "VM Network").expect("VM Network");
    assert_eq!(vm_network.moref.kind, "Network");
    assert!(nets.windows(2).all(|w| w[0].name <= w[1].name), "{nets:?}");
    c.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_disks_and_a_vm_from_a_spec() {
    let Some(s) = start("uploads_disks_and_a_vm_from_a_spec", &[]) else { return };
    let c = Client::connect(&options(&s.sim.url, Trust::Insecure)).await.unwrap();
    c.login(creds(PASSWORD)).await.unwrap();
    let p = c.placement(Some("DC0"), Some("DC0_H0"), None, None, None).await.unwrap();
    let dc = p.datacenter.clone();
    let file = |path: &str| DatastoreFile::from_ds_path(&p.datacenter_name, path).unwrap();

    // A folder (twice: one that exists is fine), and an upload into it read back whole.
    c.make_directory("[LocalDS_0] restore/web", &dc).await.unwrap();
    c.make_directory("[LocalDS_0] restore/web", &dc).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vmdk = sparse_vmdk(dir.path(), &pattern(3 << 20));
    let writer = c.datastore_writer().unwrap();
    let reader = c.datastore_reader().unwrap();
    let up = file("[LocalDS_0] restore/web/upload.vmdk");
    writer.put(&up, vmdk.len() as u64, chunks(&vmdk)).await.unwrap();
    assert_eq!(read_back(&reader, &up).await, vmdk);

    // A body shorter or longer than announced, or failing, is the caller's error, typed.
    let short = file("[LocalDS_0] restore/web/short.bin");
    let e = writer.put(&short, 10, chunks(b"12345")).await.unwrap_err();
    assert!(matches!(&e, Error::Body { source, .. } if source.to_string().contains("5 of the 10")), "{e}");
    let e = writer.put(&short, 4, chunks(b"12345")).await.unwrap_err();
    assert!(matches!(&e, Error::Body { source, .. } if source.to_string().contains("more than the 4")), "{e}");
    let failing = Chunks(VecDeque::from([Ok(Bytes::from_static(b"12")), Err(std::io::Error::other("disk gone"))]));
    let e = writer.put(&short, 10, failing).await.unwrap_err();
    assert!(matches!(&e, Error::Body { source, .. } if source.to_string() == "disk gone"), "{e}");
    // A datastore that does not exist: the server's status, typed.
    let nowhere = DatastoreFile { datastore: "NoSuchDS".into(), ..file("[LocalDS_0] restore/x.bin") };
    let e = writer.put(&nowhere, 3, chunks(b"abc")).await.unwrap_err();
    assert!(matches!(e, Error::Http { status: Some(s), .. } if s >= 400), "{e}");
    // The writer's connections stay usable after those.
    let small = file("[LocalDS_0] restore/web/small.bin");
    writer.put(&small, 5, chunks(b"hello")).await.unwrap();
    assert_eq!(read_back(&reader, &small).await, b"hello");

    // Disks: one made empty, copied to thin (vcsim copies `x.vmdk` and `x-flat.vmdk`).
    c.create_virtual_disk("[LocalDS_0] restore/web/empty.vmdk", &dc, 1 << 20, Provisioning::Thin).await.unwrap();
    c.copy_virtual_disk(
        "[LocalDS_0] restore/web/empty.vmdk",
        "[LocalDS_0] restore/web/web.vmdk",
        &dc,
        Provisioning::Thin,
        None,
    )
    .await
    .unwrap();
    assert!(reader.size(&file("[LocalDS_0] restore/web/web.vmdk")).await.is_ok());
    let e = c
        .copy_virtual_disk(
            "[LocalDS_0] restore/none.vmdk",
            "[LocalDS_0] restore/n2.vmdk",
            &dc,
            Provisioning::Thin,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::FileFault), "{e}");

    // A VM from a spec, its name needing escapes, read back as asked.
    let net = c.networks(&dc).await.unwrap().into_iter().find(|n| n.name == "VM Network").unwrap();
    let spec = VmSpec {
        name: "web <&> 'restored'".into(),
        guest_id: "otherLinux64Guest".into(),
        hardware_version: Some("vmx-19".into()),
        num_cpus: 2,
        cores_per_socket: Some(1),
        memory_mb: 1024,
        firmware: Firmware::Efi,
        vm_path: "[LocalDS_0] restore/web/web.vmx".into(),
        uuid: Some("42100000-0000-0000-0000-000000000001".into()),
        instance_uuid: Some("50100000-0000-0000-0000-000000000001".into()),
        controllers: vec![ControllerSpec { key: -100, kind: ControllerKind::Pvscsi, bus: 0 }],
        disks: vec![DiskSpec {
            key: -200,
            controller_key: -100,
            unit: 0,
            capacity: 1 << 20,
            file: "[LocalDS_0] restore/web/web.vmdk".into(),
            label: None,
        }],
        nics: vec![
            NicSpec {
                key: -300,
                kind: NicKind::Vmxnet3,
                network: Some((net.name.clone(), net.moref.clone())),
                mac: Some("00:50:56:3f:00:01".into()),
                connected: false,
            },
            NicSpec { key: -301, kind: NicKind::E1000e, network: None, mac: None, connected: false },
        ],
        extra_config: vec![("guestinfo.restored".into(), "yes & <no>".into())],
    };
    let vm = c.create_vm(&p, &spec).await.unwrap();
    assert_eq!(vm.kind, "VirtualMachine");
    let hw = c.hardware(&vm).await.unwrap();
    assert_eq!(hw.name, spec.name);
    assert_eq!(hw.guest_id.as_deref(), Some("otherLinux64Guest"));
    assert_eq!((hw.num_cpus, hw.memory_mb, hw.firmware), (2, 1024, Some(Firmware::Efi)));
    assert_eq!(hw.hardware_version.as_deref(), Some("vmx-19"));
    assert_eq!(hw.uuid, spec.uuid);
    assert_eq!(hw.instance_uuid, spec.instance_uuid);
    let pvscsi: Vec<&ControllerSpec> = hw.controllers.iter().filter(|c| c.kind == ControllerKind::Pvscsi).collect();
    assert_eq!(pvscsi.len(), 1, "{hw:?}");
    assert_eq!(pvscsi[0].bus, 0);
    assert!(pvscsi[0].key >= 0, "the server assigns keys: {hw:?}");
    assert_eq!(hw.disks.len(), 1, "{hw:?}");
    let d = &hw.disks[0];
    assert_eq!((d.controller_key, d.unit, d.capacity), (pvscsi[0].key, 0, 1 << 20), "{d:?}");
    assert_eq!(d.file, "[LocalDS_0] restore/web/web.vmdk");
    assert_eq!(hw.nics.len(), 2, "{hw:?}");
    let (vmx3, e1000e) = (&hw.nics[0], &hw.nics[1]);
    assert_eq!((vmx3.kind, e1000e.kind), (NicKind::Vmxnet3, NicKind::E1000e));
    assert_eq!(vmx3.network, Some((net.name.clone(), net.moref.clone())));
    assert_eq!(vmx3.mac.as_deref(), Some("00:50:56:3f:00:01"));
    assert!(!vmx3.connected && !e1000e.connected, "{hw:?}");

    // A .vmx path in use: a file fault. (vCenter also refuses a second VM of the same name
    // in a folder, DuplicateName; vcsim accepts it, so that is not tested here.)
    let dup = VmSpec { name: "other".into(), disks: Vec::new(), ..spec.clone() };
    let e = c.create_vm(&p, &dup).await.unwrap_err();
    assert_eq!(
        e.fault().map(|f| (f.kind, f.type_name.as_str())),
        Some((FaultKind::FileFault, "FileAlreadyExists")),
        "{e}"
    );

    // Another disk attached at unit 1, detached keeping its file, attached again, detached
    // with its file destroyed.
    c.create_virtual_disk("[LocalDS_0] restore/web/data.vmdk", &dc, 2 << 20, Provisioning::Thin).await.unwrap();
    let data = DiskSpec {
        key: -201,
        controller_key: pvscsi[0].key,
        unit: 1,
        capacity: 2 << 20,
        file: "[LocalDS_0] restore/web/data.vmdk".into(),
        label: Some("Hard disk 2".into()),
    };
    c.attach_disk(&vm, &data).await.unwrap();
    let hw = c.hardware(&vm).await.unwrap();
    let added = hw.disks.iter().find(|d| d.unit == 1).unwrap_or_else(|| panic!("{hw:?}")).clone();
    assert_eq!((added.file.as_str(), added.capacity), (data.file.as_str(), 2 << 20));
    c.detach_disk(&vm, added.key, false).await.unwrap();
    assert_eq!(c.hardware(&vm).await.unwrap().disks.len(), 1);
    let data_file = file("[LocalDS_0] restore/web/data.vmdk");
    assert!(reader.size(&data_file).await.is_ok(), "detached, not deleted");
    let e = c.detach_disk(&vm, added.key, false).await.unwrap_err();
    assert!(matches!(&e, Error::Config(m) if m.contains("no disk with key")), "{e}");
    c.attach_disk(&vm, &data).await.unwrap();
    let key = c.hardware(&vm).await.unwrap().disks.iter().find(|d| d.unit == 1).map(|d| d.key).unwrap();
    c.detach_disk(&vm, key, true).await.unwrap();
    assert_eq!(c.hardware(&vm).await.unwrap().disks.len(), 1);
    assert!(reader.size(&data_file).await.is_err(), "detached and destroyed");
    // A virtual disk deleted by itself, descriptor and extent.
    c.delete_virtual_disk("[LocalDS_0] restore/web/empty.vmdk", &dc).await.unwrap();
    assert!(reader.size(&file("[LocalDS_0] restore/web/empty.vmdk")).await.is_err());
    assert!(reader.size(&file("[LocalDS_0] restore/web/empty-flat.vmdk")).await.is_err());
    let e = c.delete_virtual_disk("[LocalDS_0] restore/web/empty.vmdk", &dc).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::FileFault), "{e}");

    // Power, rename.
    c.power_on(&vm).await.unwrap();
    assert_eq!(power(&c, &vm).await, "poweredOn");
    c.power_off(&vm).await.unwrap();
    assert_eq!(power(&c, &vm).await, "poweredOff");
    c.rename(&vm, "web & restored").await.unwrap();
    assert_eq!(c.hardware(&vm).await.unwrap().name, "web & restored");

    // Unregistered (gone from the inventory, files kept), then registered again from its
    // .vmx. vcsim looks for `<name>.nvram` beside the .vmx (real vSphere reads the .vmx), so
    // the name is the one the VM was created with.
    let vmx = c.property(&vm, "config.files.vmPathName").await.unwrap().unwrap().text;
    c.unregister_vm(&vm).await.unwrap();
    let e = c.hardware(&vm).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::ManagedObjectNotFound), "{e}");
    let again = c.register_vm(&p, &vmx, &spec.name).await.unwrap();
    assert_ne!(again, vm);
    // vcsim does not read the .vmx: the registered VM has its default hardware, not ours.
    assert_eq!(c.hardware(&again).await.unwrap().name, spec.name);

    // A VM on a datastore that is not there fails. (Real vSphere faults; vcsim's handler
    // panics and drops the connection, which the client reports and does not retry.)
    let bad = VmSpec { name: "elsewhere".into(), vm_path: "[NoSuchDS] x/x.vmx".into(), ..spec.clone() };
    let e = c.create_vm(&p, &bad).await.unwrap_err();
    assert!(e.fault().is_some() || matches!(e, Error::Http { .. }), "{e}");

    // Destroyed: gone from the inventory.
    c.destroy(&again).await.unwrap();
    let e = c.hardware(&again).await.unwrap_err();
    assert_eq!(e.fault().map(|f| f.kind), Some(FaultKind::ManagedObjectNotFound), "{e}");
    c.logout().await.unwrap();
}
