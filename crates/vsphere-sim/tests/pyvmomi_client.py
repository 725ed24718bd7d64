"""pyvmomi (a real, strict, third-party vSphere client) against the syncproxy simulator.

Usage: pyvmomi_client.py HOST PORT USER PASSWORD_FILE
Prints one JSON object with what it saw; the Rust test checks it.
"""
import json
import ssl
import sys
import urllib.request

from pyVim.connect import SmartConnect, Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim


def connect():
    """Logs in as HOST PORT USER PASSWORD_FILE (the first arguments) say: (si, host, port)."""
    host, port, user, pw_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with open(pw_file) as f:
        pwd = f.readline().rstrip("\n")
    si = SmartConnect(host=host, port=port, user=user, pwd=pwd, disableSslCertValidation=True)
    return si, host, port


def main():
    si, host, port = connect()
    out = {}
    try:
        content = si.RetrieveContent()
        out["api_type"] = content.about.apiType
        out["api_version"] = content.about.apiVersion

        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        vms = list(view.view)
        out["vms"] = sorted(vm.name for vm in vms)
        view.Destroy()

        # The property collector directly, paged.
        pc = content.propertyCollector
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        spec = vim.PropertyCollector.FilterSpec(
            objectSet=[vim.PropertyCollector.ObjectSpec(
                obj=view, skip=True,
                selectSet=[vim.PropertyCollector.TraversalSpec(name="v", type=vim.view.ContainerView, path="view", skip=False)])],
            propSet=[vim.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "config.hardware.device"])])
        result = pc.RetrievePropertiesEx([spec], vim.PropertyCollector.RetrieveOptions(maxObjects=1))
        pages, names = 1, []
        while True:
            names += [o.propSet[0].val for o in result.objects]
            if not result.token:
                break
            result = pc.ContinueRetrievePropertiesEx(result.token)
            pages += 1
        out["paged_names"] = sorted(names)
        out["pages"] = pages
        view.Destroy()

        vm = [v for v in vms if v.name == "db"][0]
        disk = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)][0]
        out["disk_key"] = disk.key
        out["disk_capacity"] = disk.capacityInBytes
        out["disk_backing"] = type(disk.backing).__name__
        out["change_id_before"] = disk.backing.changeId

        task = vm.CreateSnapshot_Task(name="pyvmomi", description="from pyvmomi", memory=False, quiesce=False)
        WaitForTask(task)
        snap = task.info.result
        out["snapshot_names"] = [s.name for s in vm.snapshot.rootSnapshotList]

        areas, off, windows = [], 0, 0
        while off < disk.capacityInBytes:
            info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=off, changeId="*")
            areas += [[a.start, a.length] for a in info.changedArea]
            off = info.startOffset + info.length
            windows += 1
        out["allocated"] = areas
        out["windows"] = windows

        cookie = si._stub.cookie
        url = "https://%s:%d/folder/db/db-flat.vmdk?dcPath=DC1&dsName=ds1" % (host, port)
        req = urllib.request.Request(url, headers={"Cookie": cookie, "Range": "bytes=0-15"})
        ctx = ssl._create_unverified_context()
        with urllib.request.urlopen(req, context=ctx) as r:
            out["download_status"] = r.status
            out["download"] = r.read().decode("latin-1")

        WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True))
        out["snapshots_after"] = 0 if vm.snapshot is None else len(vm.snapshot.rootSnapshotList)
    finally:
        Disconnect(si)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
