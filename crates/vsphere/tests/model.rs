//! The typed VM model read from a recorded-style `RetrievePropertiesEx` answer that has every
//! case backup cares about: a snapshot chain under a disk, RDM, SEsparse, independent and
//! multi-writer disks, an unknown backing, USB, PCI passthrough, a shared bus, a snapshot tree,
//! encryption, guest disks, a property the account may not read, and a page token.

use vsphere::model::vm_from;
use vsphere::pc::{ObjectContent, parse_result};
use vsphere::soap::{MoRef, parse_response};
use vsphere::xml::Limits;
use vsphere::{BackingKind, DiskMode, FaultKind, NotCopyable, PowerState, ToolsRunningStatus};

/// The objects of the recorded answer, and its page token.
fn recorded() -> (Vec<ObjectContent>, Option<String>) {
    let body = include_bytes!("data/retrieve-vms.xml");
    let pc = MoRef::new("PropertyCollector", "propertyCollector");
    let r = parse_response(body, "RetrievePropertiesEx", &pc, Limits::default()).unwrap();
    parse_result(&r).unwrap()
}

#[test]
fn every_backup_relevant_fact_is_read() {
    let (objects, token) = recorded();
    assert_eq!(token.as_deref(), Some("page-2"));
    assert_eq!(objects.len(), 2);
    let o = &objects[0];
    assert_eq!(o.missing.len(), 1);
    let (path, fault) = &o.missing[0];
    assert_eq!((path.as_str(), fault.kind), ("config.files.vmPathName", FaultKind::NoPermission));
    assert_eq!(fault.privilege.as_deref(), Some("System.Read"));

    let vm = vm_from(o).unwrap();
    assert_eq!(vm.name, "db & app");
    assert_eq!(vm.moref, MoRef::new("VirtualMachine", "vm-42"));
    assert_eq!(vm.hardware_version.as_deref(), Some("vmx-19"));
    assert_eq!((vm.cbt_enabled, vm.consolidation_needed), (Some(true), Some(false)));
    assert_eq!(vm.key_id.as_deref(), Some("key-7"));
    assert_eq!(vm.host, Some(MoRef::new("HostSystem", "host-10")));
    assert_eq!(vm.vmx_path, None, "unreadable, so unknown");
    assert_eq!(vm.guest_disks.len(), 2);
    assert_eq!(vm.guest_disks[1].free, 0);

    assert_eq!(vm.disks.len(), 5);
    let d = &vm.disks[0];
    assert_eq!(d.backing, BackingKind::Flat);
    assert_eq!(d.capacity, 40 << 30);
    assert_eq!(d.file_name, "[ds1] db/db-000002.vmdk");
    assert_eq!(d.base_file_name, "[ds1] db/db.vmdk", "the chain's base keys the backup");
    assert_eq!(d.change_id.as_deref(), Some("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/4"));
    assert_eq!(d.bus_slot.as_deref(), Some("scsi0:0"));
    assert_eq!(d.datastore, Some(MoRef::new("Datastore", "datastore-11")));
    assert_eq!(d.thin, Some(true));

    let rdm = &vm.disks[1];
    assert_eq!(rdm.backing, BackingKind::RdmPhysical);
    assert!(rdm.independent());
    assert_eq!(rdm.capacity, 1 << 30, "capacityInKB when there are no bytes");
    assert_eq!(rdm.bus_slot.as_deref(), Some("scsi1:0"));

    let se = &vm.disks[2];
    assert_eq!((se.backing.clone(), se.bus_slot.as_deref()), (BackingKind::SeSparse, Some("sata0:3")));
    assert_eq!(se.key_id.as_deref(), Some("key-8"));
    assert_eq!(vm.disks[3].sharing.as_deref(), Some("sharingMultiWriter"));
    assert_eq!(vm.disks[4].backing, BackingKind::Other("VirtualDiskSomethingNewBackingInfo".into()));

    assert_eq!(vm.usb.len(), 1);
    assert_eq!(vm.pci_passthrough.len(), 1);
    assert_eq!(vm.shared_bus_controllers.len(), 1);
    assert_eq!(vm.shared_bus_controllers[0].key, 1001);

    assert_eq!(vm.snapshot_depth(), 2);
    let all = vm.all_snapshots();
    assert_eq!(all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["before upgrade", "syncproxy-job-1"]);
    assert!(all[1].quiesced && !all[0].quiesced);
    assert_eq!(all[1].create_time, "2026-11-21T10:00:00Z");
    assert_eq!(vm.current_snapshot, Some(MoRef::new("VirtualMachineSnapshot", "snapshot-2")));

    let empty = vm_from(&objects[1]).unwrap();
    assert_eq!((empty.name.as_str(), empty.disks.len(), empty.cbt_enabled), ("empty", 0, None));
}

#[test]
fn states_are_typed_and_one_rule_says_which_disks_can_be_copied() {
    let (objects, _) = recorded();
    let vm = vm_from(&objects[0]).unwrap();
    assert_eq!(vm.power_state, Some(PowerState::PoweredOn));
    assert_eq!(vm.tools, Some(ToolsRunningStatus::Running));
    assert_eq!(vm.connection_state, None, "not in the answer");

    // The physical RDM is independent too: both reasons, the independence first.
    let rdm = &vm.disks[1];
    assert_eq!(rdm.mode, DiskMode::IndependentPersistent);
    assert_eq!(
        rdm.not_copyable(),
        [NotCopyable::Independent(DiskMode::IndependentPersistent), NotCopyable::RdmPhysical]
    );
    let why = rdm.copyable().unwrap_err();
    assert_eq!(why.to_string(), "independent (independent_persistent): snapshots leave it out, so it is not backed up");
    // A snapshot chain, SEsparse, a multi-writer disk and an unknown backing are all copied.
    for d in [&vm.disks[0], &vm.disks[2], &vm.disks[3], &vm.disks[4]] {
        assert_eq!(d.copyable(), Ok(()), "{}", d.label);
    }
    let mut physical = rdm.clone();
    physical.mode = DiskMode::Persistent;
    assert_eq!(physical.copyable(), Err(NotCopyable::RdmPhysical));
    assert!(physical.copyable().unwrap_err().to_string().starts_with("a physical-mode RDM: no snapshots"));
}
