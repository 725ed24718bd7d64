//! Inputs for the criterion benchmarks in `benches/benches/`, built deterministically so every
//! run measures the same work.

use cbt::{DiskChangeExtent, DiskChangeInfo, ExtentSet};

/// `count` extents spread over about `span` bytes, with pseudo-random 512-byte-aligned lengths
/// and gaps (each up to half the average stride): what a busy disk's CBT answer looks like.
pub fn scattered_extents(count: u64, span: u64, seed: u64) -> ExtentSet {
    let stride = (span / count.max(1)).max(1024);
    let half_sectors = (stride / 2 / 512).max(1);
    let mut state = seed | 1;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state >> 17
    };
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let gap = (next() % half_sectors + 1) * 512;
        let len = (next() % half_sectors + 1) * 512;
        offset += gap;
        ranges.push((offset, len));
        offset += len;
    }
    ExtentSet::from_ranges(ranges)
}

/// `areas` as the pages of a `QueryChangedDiskAreas` answer with windows of `window` bytes.
pub fn as_pages(areas: &ExtentSet, capacity: u64, window: u64) -> Vec<DiskChangeInfo> {
    let long = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut pages = Vec::new();
    let mut iter = areas.iter().peekable();
    let mut start = 0;
    while start < capacity {
        let end = (start + window).min(capacity);
        let mut changed_area = Vec::new();
        while let Some(e) = iter.next_if(|e| e.start() < end) {
            changed_area.push(DiskChangeExtent { start: long(e.start()), length: long(e.len()) });
        }
        pages.push(DiskChangeInfo { start_offset: long(start), length: long(end - start), changed_area });
        start = end;
    }
    pages
}

/// A `RetrievePropertiesEx` answer listing `vms` VMs the way vCenter does: each with the
/// properties the inventory asks for, two controllers, two disks (one with a snapshot chain) and
/// a NIC, as typed `xsi:type` elements. About 4.5 KB per VM.
pub fn inventory_response(vms: usize) -> String {
    let mut s = String::with_capacity(vms * 4600 + 512);
    s.push_str(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval>"#,
    );
    for i in 0..vms {
        let p = |name: &str, ty: &str, val: &str| {
            format!(r#"<propSet><name>{name}</name><val xsi:type="{ty}">{val}</val></propSet>"#)
        };
        s.push_str(&format!(r#"<objects><obj type="VirtualMachine">vm-{i}</obj>"#));
        s.push_str(&p("name", "xsd:string", &format!("app-server-{i:05}")));
        s.push_str(&p("config.uuid", "xsd:string", &format!("4203{i:04x}-aaaa-bbbb-cccc-0000{i:08x}")));
        s.push_str(&p("config.instanceUuid", "xsd:string", &format!("5003{i:04x}-aaaa-bbbb-cccc-0000{i:08x}")));
        s.push_str(&p("config.version", "xsd:string", "vmx-19"));
        s.push_str(&p("config.changeTrackingEnabled", "xsd:boolean", "true"));
        s.push_str(&p("config.guestId", "xsd:string", "rhel9_64Guest"));
        s.push_str(&p(
            "config.files.vmPathName",
            "xsd:string",
            &format!("[vsanDatastore] app-server-{i:05}/app-server-{i:05}.vmx"),
        ));
        s.push_str(&p("capability.changeTrackingSupported", "xsd:boolean", "true"));
        s.push_str(&p("runtime.powerState", "VirtualMachinePowerState", "poweredOn"));
        s.push_str(&p("runtime.connectionState", "VirtualMachineConnectionState", "connected"));
        s.push_str(&p("runtime.consolidationNeeded", "xsd:boolean", "false"));
        s.push_str(r#"<propSet><name>runtime.host</name><val type="HostSystem" xsi:type="ManagedObjectReference">host-12</val></propSet>"#);
        s.push_str(&p("guest.toolsRunningStatus", "xsd:string", "guestToolsRunning"));
        s.push_str(&p(
            "guest.disk",
            "ArrayOfGuestDiskInfo",
            r#"<GuestDiskInfo xsi:type="GuestDiskInfo"><diskPath>/</diskPath><capacity>53660876800</capacity><freeSpace>21474836480</freeSpace></GuestDiskInfo>"#,
        ));
        s.push_str(&p("snapshot", "VirtualMachineSnapshotInfo", &format!(
            r#"<currentSnapshot type="VirtualMachineSnapshot">snapshot-{i}</currentSnapshot><rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-{i}</snapshot><vm type="VirtualMachine">vm-{i}</vm><name>syncproxy-job-7</name><description>syncproxy proxy=p1 job=7</description><id>1</id><createTime>2026-11-21T10:00:00.123Z</createTime><state>poweredOn</state><quiesced>true</quiesced></rootSnapshotList>"#
        )));
        s.push_str(&p("config.hardware.device", "ArrayOfVirtualDevice", &format!(
            r#"<VirtualDevice xsi:type="VirtualIDEController"><key>200</key><deviceInfo><label>IDE 0</label><summary>IDE 0</summary></deviceInfo><busNumber>0</busNumber></VirtualDevice><VirtualDevice xsi:type="ParaVirtualSCSIController"><key>1000</key><deviceInfo><label>SCSI controller 0</label><summary>VMware paravirtual SCSI</summary></deviceInfo><controllerKey>100</controllerKey><unitNumber>3</unitNumber><busNumber>0</busNumber><device>2000</device><device>2001</device><hotAddRemove>true</hotAddRemove><sharedBus>noSharing</sharedBus><scsiCtlrUnitNumber>7</scsiCtlrUnitNumber></VirtualDevice><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label><summary>52,428,800 KB</summary></deviceInfo><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[vsanDatastore] app-server-{i:05}/app-server-{i:05}-000001.vmdk</fileName><datastore type="Datastore">datastore-31</datastore><backingObjectId>52a1-{i}</backingObjectId><diskMode>persistent</diskMode><split>false</split><writeThrough>false</writeThrough><thinProvisioned>true</thinProvisioned><uuid>6000C29{i:09x}</uuid><contentId>a1b2c3d4e5f6{i:08x}</contentId><changeId>52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/{i}</changeId><parent xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[vsanDatastore] app-server-{i:05}/app-server-{i:05}.vmdk</fileName><datastore type="Datastore">datastore-31</datastore><diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></parent><sharing>sharingNone</sharing></backing><controllerKey>1000</controllerKey><unitNumber>0</unitNumber><capacityInKB>52428800</capacityInKB><capacityInBytes>53687091200</capacityInBytes><shares><shares>1000</shares><level>normal</level></shares><storageIOAllocation><limit>-1</limit></storageIOAllocation><diskObjectId>{i}-2000</diskObjectId><nativeUnmanagedLinkedClone>false</nativeUnmanagedLinkedClone></VirtualDevice><VirtualDevice xsi:type="VirtualDisk"><key>2001</key><deviceInfo><label>Hard disk 2</label><summary>104,857,600 KB</summary></deviceInfo><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[vsanDatastore] app-server-{i:05}/app-server-{i:05}_1.vmdk</fileName><datastore type="Datastore">datastore-31</datastore><diskMode>persistent</diskMode><thinProvisioned>false</thinProvisioned><eagerlyScrub>true</eagerlyScrub><changeId>52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7c/{i}</changeId><sharing>sharingNone</sharing></backing><controllerKey>1000</controllerKey><unitNumber>1</unitNumber><capacityInKB>104857600</capacityInKB><capacityInBytes>107374182400</capacityInBytes></VirtualDevice><VirtualDevice xsi:type="VirtualVmxnet3"><key>4000</key><deviceInfo><label>Network adapter 1</label><summary>VM Network</summary></deviceInfo><backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName></backing><connectable><startConnected>true</startConnected><allowGuestControl>true</allowGuestControl><connected>true</connected></connectable><controllerKey>100</controllerKey><unitNumber>7</unitNumber><addressType>assigned</addressType><macAddress>00:50:56:{:02x}:{:02x}:{:02x}</macAddress></VirtualDevice>"#,
            (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff
        )));
        s.push_str("</objects>");
    }
    s.push_str("</returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>");
    s
}
