"""A restore into the syncproxy simulator with pyvmomi (a real, strict, third-party client).

Usage: pyvmomi_restore.py HOST PORT USER PASSWORD_FILE SPARSE_VMDK [STREAM_VMDK STREAM_VMDK]
Uploads SPARSE_VMDK (monolithicSparse), copies it into a thin disk, creates a VM with two
controllers, three disks and two NICs, reads it back, powers it on and off, renames and
destroys it, and tries the faults. Given two streamOptimized VMDKs (3 MiB and 1 MiB), imports
a VM of two disks through ImportVApp and its HttpNfcLease with them, and aborts another import. Prints one JSON object; the Rust test checks it.
"""
import json
import ssl
import sys
import time
import urllib.error
import urllib.request

from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from pyvmomi_client import connect


def fault_of(fn):
    try:
        fn()
    except vim.fault.VimFault as e:
        return type(e).__name__.split(".")[-1]
    except Exception as e:  # noqa: BLE001 - any other fault type, by name
        return type(e).__name__.split(".")[-1]
    return None


def put(host, port, cookie, path, data):
    url = "https://%s:%d/folder/%s?dcPath=DC1&dsName=ds1" % (host, port, path)
    req = urllib.request.Request(url, data=data, method="PUT",
                                 headers={"Cookie": cookie, "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, context=ssl._create_unverified_context()) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def nfc_upload(url, data, method="PUT"):
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/x-vnd.vmware-streamVmdk"})
    try:
        with urllib.request.urlopen(req, context=ssl._create_unverified_context()) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def nfc_import(out, host, port, dc, pool, streams):
    """ImportVApp of a two-disk VM, a streamOptimized upload per device URL, progress and
    complete; then one more import, aborted."""
    dev = vim.vm.device

    def spec(name, sizes_kb):
        changes = [dev.VirtualDeviceSpec(operation="add", device=dev.ParaVirtualSCSIController(
            key=-100, busNumber=0, sharedBus="noSharing"))]
        for i, kb in enumerate(sizes_kb):
            d = dev.VirtualDisk(key=-1 - i, controllerKey=-100, unitNumber=i, capacityInKB=kb,
                                backing=dev.VirtualDisk.FlatVer2BackingInfo(fileName="[ds1]", diskMode="persistent",
                                                                           thinProvisioned=True))
            changes.append(dev.VirtualDeviceSpec(operation="add", fileOperation="create", device=d))
        config = vim.vm.ConfigSpec(name=name, guestId="otherGuest64", version="vmx-19", memoryMB=256,
                                   files=vim.vm.FileInfo(vmPathName="[ds1]"), deviceChange=changes)
        return vim.vm.VmImportSpec(configSpec=config)

    def wait_ready(lease):
        for _ in range(100):
            if lease.state != vim.HttpNfcLease.State.initializing:
                break
            time.sleep(0.05)
        return lease.state

    lease = pool.ImportVApp(spec=spec("pyimported", [3072, 1024]), folder=dc.vmFolder)
    out["lease_type"] = type(lease).__name__
    out["lease_state"] = wait_ready(lease)
    info = lease.info
    out["lease_entity"] = info.entity.name
    out["lease_timeout"] = info.leaseTimeout
    out["device_urls"] = [[u.key.split("/", 2)[2], u.importKey, u.targetId, u.disk,
                           u.url.replace("https://%s:%d/nfc/%s/" % (host, port, lease._moId), "")]
                          for u in info.deviceUrl]
    out["device_keys_name_vm"] = all(u.key.startswith("/%s/" % info.entity._moId) for u in info.deviceUrl)
    statuses = []
    for u, path in zip(info.deviceUrl, streams):
        with open(path, "rb") as f:
            statuses.append(nfc_upload(u.url, f.read()))
    out["upload_garbage"] = nfc_upload(info.deviceUrl[0].url, b"not a vmdk" * 100)
    out["uploads"] = statuses
    lease.HttpNfcLeaseProgress(percent=100)
    out["transfer_progress"] = lease.transferProgress
    lease.HttpNfcLeaseComplete()
    out["lease_done"] = lease.state
    out["complete_again"] = fault_of(lambda: lease.HttpNfcLeaseComplete())

    lease = pool.ImportVApp(spec=spec("pyaborted", [1024]))
    wait_ready(lease)
    lease.HttpNfcLeaseAbort(fault=vmodl.fault.SystemError(reason="test", msg="test abort"))
    out["aborted_state"] = lease.state
    # pyvmomi reads a LocalizedMethodFault as the fault itself, its message as msg.
    err = lease.error
    out["aborted_error"] = [type(err).__name__.split(".")[-1], err.msg]
    view = pool.vm
    out["vms_in_pool"] = sorted(v.name for v in view)


def main():
    si, host, port = connect()
    sparse = sys.argv[5]
    out = {}
    try:
        content = si.RetrieveContent()
        dc = content.rootFolder.childEntity[0]
        fm, vdm = content.fileManager, content.virtualDiskManager
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Network], True)
        nets = {n.name: n for n in view.view}
        view.Destroy()
        out["networks"] = sorted(nets)
        out["dc_networks"] = sorted(n.name for n in dc.network)
        cr = dc.hostFolder.childEntity[0]
        pool = cr.resourcePool
        host_obj = cr.host[0]
        out["host_networks"] = sorted(n.name for n in host_obj.network)

        fm.MakeDirectory(name="[ds1] up", datacenter=dc, createParentDirectories=False)
        out["mkdir_again"] = fault_of(lambda: fm.MakeDirectory(name="[ds1] up", datacenter=dc,
                                                               createParentDirectories=False))
        cookie = si._stub.cookie
        with open(sparse, "rb") as f:
            data = f.read()
        out["put_missing_parent"] = put(host, port, cookie, "nowhere/src.vmdk", data)
        out["put"] = put(host, port, cookie, "up/src.vmdk", data)

        spec = vim.VirtualDiskManager.FileBackedVirtualDiskSpec(diskType="thin", adapterType="lsiLogic")
        WaitForTask(vdm.CopyVirtualDisk_Task(sourceName="[ds1] up/src.vmdk", sourceDatacenter=dc,
                                             destName="[ds1] up/data.vmdk", destDatacenter=dc, destSpec=spec,
                                             force=False))
        out["copy_again"] = fault_of(lambda: WaitForTask(vdm.CopyVirtualDisk_Task(
            sourceName="[ds1] up/src.vmdk", sourceDatacenter=dc, destName="[ds1] up/data.vmdk",
            destDatacenter=dc, destSpec=spec, force=False)))
        cspec = vim.VirtualDiskManager.FileBackedVirtualDiskSpec(diskType="thin", adapterType="lsiLogic",
                                                                 capacityKb=2048)
        WaitForTask(vdm.CreateVirtualDisk_Task(name="[ds1] up/second.vmdk", datacenter=dc, spec=cspec))

        dev = vim.vm.device
        changes = [
            dev.VirtualDeviceSpec(operation="add", device=dev.ParaVirtualSCSIController(key=-100, busNumber=0,
                                                                                  sharedBus="noSharing")),
            dev.VirtualDeviceSpec(operation="add", device=dev.VirtualLsiLogicSASController(key=-101, busNumber=1,
                                                                                     sharedBus="noSharing")),
        ]

        def disk(key, ctrl, unit, name, kb=None):
            d = dev.VirtualDisk(key=key, controllerKey=ctrl, unitNumber=unit,
                                backing=dev.VirtualDisk.FlatVer2BackingInfo(fileName=name, diskMode="persistent",
                                                                           thinProvisioned=True))
            s = dev.VirtualDeviceSpec(operation="add", device=d)
            if kb:
                d.capacityInKB = kb
                s.fileOperation = "create"
            return s

        changes += [disk(-1, -100, 0, "[ds1]", 1024), disk(-2, -100, 1, "[ds1] up/data.vmdk"),
                    disk(-3, -101, 0, "[ds1] up/second.vmdk")]

        def nic(cls, key, net, mac=None):
            n = cls(key=key, backing=dev.VirtualEthernetCard.NetworkBackingInfo(deviceName=net.name, network=net),
                    connectable=dev.VirtualDevice.ConnectInfo(startConnected=True, connected=False,
                                                              allowGuestControl=True))
            n.addressType = "manual" if mac else "generated"
            if mac:
                n.macAddress = mac
            return dev.VirtualDeviceSpec(operation="add", device=n)

        changes += [nic(dev.VirtualVmxnet3, -4, nets["VM Network"]),
                    nic(dev.VirtualE1000, -5, nets["Backup LAN"], "00:50:56:3f:12:34")]
        config = vim.vm.ConfigSpec(name="pyrestored", guestId="ubuntu64Guest", version="vmx-19", numCPUs=2,
                                   numCoresPerSocket=1, memoryMB=512, firmware="bios",
                                   files=vim.vm.FileInfo(vmPathName="[ds1]"), deviceChange=changes,
                                   extraConfig=[vim.option.OptionValue(key="restored.by", value="pyvmomi")])
        task = dc.vmFolder.CreateVM_Task(config=config, pool=pool, host=host_obj)
        WaitForTask(task)
        vm = task.info.result
        out["created_type"] = type(vm).__name__
        out["duplicate"] = fault_of(lambda: WaitForTask(dc.vmFolder.CreateVM_Task(config=config, pool=pool)))
        bad = vim.vm.ConfigSpec(name="bad", files=vim.vm.FileInfo(vmPathName="[ds1]"), deviceChange=[
            dev.VirtualDeviceSpec(operation="add", device=dev.VirtualFloppy(key=-1))])
        out["bad_device"] = fault_of(lambda: WaitForTask(dc.vmFolder.CreateVM_Task(config=bad, pool=pool)))

        c = vm.config
        out["name"] = vm.name
        out["num_cpu"] = c.hardware.numCPU
        out["memory_mb"] = c.hardware.memoryMB
        out["firmware"] = c.firmware
        out["guest_id"] = c.guestId
        out["version"] = c.version
        out["vm_path"] = c.files.vmPathName
        out["uuid_len"] = len(c.uuid)
        out["extra"] = {o.key: o.value for o in c.extraConfig}
        out["power"] = vm.runtime.powerState
        out["parent_is_vm_folder"] = vm.parent == dc.vmFolder
        out["pool_matches"] = vm.resourcePool == pool
        out["controllers"] = [[type(d).__name__.split(".")[-1], d.key, d.busNumber]
                              for d in c.hardware.device if isinstance(d, dev.VirtualController)]
        out["disks"] = [[d.key, d.controllerKey, d.unitNumber, d.capacityInBytes, d.backing.fileName]
                        for d in c.hardware.device if isinstance(d, dev.VirtualDisk)]
        out["nics"] = [[type(d).__name__.split(".")[-1], d.macAddress, d.addressType, d.backing.deviceName,
                        d.backing.network.name, d.connectable.startConnected]
                       for d in c.hardware.device if isinstance(d, dev.VirtualEthernetCard)]

        WaitForTask(vm.PowerOnVM_Task())
        out["power_on"] = vm.runtime.powerState
        out["power_on_again"] = fault_of(lambda: WaitForTask(vm.PowerOnVM_Task()))
        out["destroy_on"] = fault_of(lambda: WaitForTask(vm.Destroy_Task()))
        WaitForTask(vm.PowerOffVM_Task())
        out["power_off"] = vm.runtime.powerState
        WaitForTask(vm.Rename_Task(newName="pyrenamed"))
        out["renamed"] = vm.name
        WaitForTask(vm.Destroy_Task())
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        out["vms_after"] = sorted(v.name for v in view.view)
        view.Destroy()
        if len(sys.argv) > 7:
            nfc_import(out, host, port, dc, pool, sys.argv[6:8])
        WaitForTask(vdm.DeleteVirtualDisk_Task(name="[ds1] up/src.vmdk", datacenter=dc))
    finally:
        Disconnect(si)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
