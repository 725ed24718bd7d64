//! `.vmx` files of VMs made through the API: written as ESXi spells the keys a restore and a
//! drill read, and read back (modestly) when a `.vmx` is registered.
//!
//! Read on `RegisterVM_Task`: `displayName`, `guestOS`, `virtualHW.version`, `numvcpus`,
//! `cpuid.coresPerSocket`, `memsize`, `firmware`, `uuid.bios`, `vc.uuid`, `ctkEnabled`,
//! `{scsi,sata,nvme,ide}N.present` (and `scsiN.virtualDev`), `{bus}N:M.present`, `.fileName`
//! (relative to the `.vmx`'s folder, or `/vmfs/volumes/<datastore>/<path>`), `.mode`,
//! `ethernetN.present`, `.virtualDev`, `.networkName`, `.addressType`, `.address` /
//! `.generatedAddress`, `.startConnected`. Everything else is ignored.

use std::fmt::Write as _;

use crate::devices::{CtrlKind, NicKind};
use crate::spec::{Connectable, Device, DeviceChange, DiskDevice, NicDevice, Op, VmSpec};
use crate::world::{SimFault, VmState, World};

/// The largest `.vmx` read.
pub(crate) const MAX_VMX: u64 = 1 << 20;

/// A `.vmx` as `key = "value"` pairs, in order.
#[derive(Debug, Default)]
pub(crate) struct Vmx {
    pairs: Vec<(String, String)>,
}

impl Vmx {
    /// Reads `key = "value"` lines; `#` comments and blank lines are skipped, a line of
    /// another shape is an error.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: no `=`", n + 1))?;
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            pairs.push((k.trim().to_ascii_lowercase(), v.to_owned()));
        }
        Ok(Self { pairs })
    }

    /// The value of `key` (keys compare without case, as VMware's do); the last one wins.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        let key = key.to_ascii_lowercase();
        self.pairs.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }

    fn on(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.get(key).and_then(|v| v.trim().parse().ok())
    }
}

/// `4230....-....` as a `.vmx` writes it: `42 30 .. ..-.. ..`.
fn vmx_uuid(uuid: &str) -> String {
    let hex: Vec<String> = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| c.iter().collect())
        .collect();
    if hex.len() != 16 {
        return uuid.to_owned();
    }
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// A `.vmx` UUID back in the API's form (`42301234-...`).
fn api_uuid(vmx: &str) -> Option<String> {
    let hex: String = vmx.chars().filter(char::is_ascii_hexdigit).collect();
    (hex.len() == 32).then(|| format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..]))
}

fn yes(b: bool) -> &'static str {
    if b { "TRUE" } else { "FALSE" }
}

/// The `.vmx` of `v` as ESXi would write it for the same configuration.
pub(crate) fn render(w: &World, v: &VmState) -> String {
    let mut s = String::new();
    let mut kv = |k: &str, val: &str| {
        let _ = writeln!(s, "{k} = \"{}\"", val.replace('"', "|22"));
    };
    kv(".encoding", "UTF-8");
    kv("config.version", "8");
    kv("virtualHW.version", v.hardware.trim_start_matches("vmx-"));
    kv("displayName", &v.name);
    kv("guestOS", &v.guest);
    kv("firmware", &v.firmware);
    kv("numvcpus", &v.num_cpus.to_string());
    if let Some(c) = v.cores_per_socket {
        kv("cpuid.coresPerSocket", &c.to_string());
    }
    kv("memsize", &v.memory_mb.to_string());
    kv("uuid.bios", &vmx_uuid(&v.uuid));
    kv("vc.uuid", &vmx_uuid(&v.instance_uuid));
    kv("ctkEnabled", yes(v.cbt));
    let vmx_dir = v.vmx.1.rsplit_once('/').map_or("", |(d, _)| d);
    for c in &v.controllers {
        let bus = format!("{}{}", c.kind.bus(), c.bus);
        kv(&format!("{bus}.present"), "TRUE");
        if let Some(dev) = c.kind.virtual_dev() {
            kv(&format!("{bus}.virtualDev"), dev);
        }
        for d in v.disks.iter().filter(|d| d.controller_key == c.key) {
            let slot = format!("{bus}:{}", d.unit);
            let (dir, file) = d.base_name.rsplit_once('/').unwrap_or(("", &d.base_name));
            let name = if d.ds == v.vmx.0 && dir == vmx_dir {
                file.to_owned()
            } else {
                format!("/vmfs/volumes/{}/{}", w.datastores[d.ds].name, d.base_name)
            };
            kv(&format!("{slot}.present"), "TRUE");
            kv(&format!("{slot}.fileName"), &name);
            kv(&format!("{slot}.mode"), d.mode.as_str());
            if d.track.is_some() {
                kv(&format!("{slot}.ctkEnabled"), "TRUE");
            }
        }
    }
    for (i, n) in v.nics.iter().enumerate() {
        let e = format!("ethernet{i}");
        kv(&format!("{e}.present"), "TRUE");
        kv(&format!("{e}.virtualDev"), n.kind.virtual_dev());
        if let Some(net) = n.network {
            kv(&format!("{e}.networkName"), &w.networks[net].name);
        }
        if n.address_type.eq_ignore_ascii_case("manual") {
            kv(&format!("{e}.addressType"), "static");
            kv(&format!("{e}.address"), &n.mac);
        } else {
            kv(&format!("{e}.addressType"), "generated");
            kv(&format!("{e}.generatedAddress"), &n.mac);
        }
        kv(&format!("{e}.startConnected"), yes(n.start_connected));
    }
    for (k, val) in &v.extra_config {
        kv(k, val);
    }
    s
}

/// What a `.vmx` describes, as the config spec that would make it: disks are attached as
/// they are (no file operation), addresses kept, keys numbered as vSphere numbers them.
pub(crate) fn to_spec(x: &Vmx, vmx_ds: &str, vmx_dir: &str) -> Result<VmSpec, SimFault> {
    let mut s = VmSpec {
        name: x.get("displayName").map(str::to_owned),
        guest_id: x.get("guestOS").map(str::to_owned),
        version: x.get("virtualHW.version").map(|v| format!("vmx-{v}")),
        uuid: x.get("uuid.bios").and_then(api_uuid),
        instance_uuid: x.get("vc.uuid").and_then(api_uuid),
        num_cpus: x.number("numvcpus"),
        cores_per_socket: x.number("cpuid.coresPerSocket"),
        memory_mb: x.number("memsize"),
        firmware: x.get("firmware").map(str::to_owned),
        change_tracking: x.get("ctkEnabled").map(|_| x.on("ctkEnabled")),
        ..VmSpec::default()
    };
    let mut add = |device: Device| {
        let index = s.devices.len();
        s.devices.push(DeviceChange { index, op: Op::Add, file_op: None, device });
    };
    let mut disk_key = crate::devices::DISK_BASE_KEY;
    for bus in ["scsi", "sata", "nvme", "ide"] {
        for n in 0..4 {
            let prefix = format!("{bus}{n}");
            // IDE controllers exist without a `present` line.
            if !x.on(&format!("{prefix}.present")) && bus != "ide" {
                continue;
            }
            let kind = CtrlKind::from_vmx(bus, x.get(&format!("{prefix}.virtualDev")))
                .ok_or_else(|| SimFault::new("InvalidArgument", format!("{prefix}: an unknown controller")))?;
            let slots: Vec<i32> = (0..30).filter(|u| x.on(&format!("{prefix}:{u}.present"))).collect();
            if bus == "ide" && slots.is_empty() {
                continue;
            }
            let key = kind.base_key() + n;
            add(Device::Controller { key, kind, bus: n });
            for u in slots {
                let Some(file) = x.get(&format!("{prefix}:{u}.fileName")) else { continue };
                if !file.ends_with(".vmdk") {
                    continue; // a CD image or a device
                }
                let file_name = match file.strip_prefix("/vmfs/volumes/") {
                    Some(rest) => {
                        let (ds, path) = rest.split_once('/').unwrap_or((rest, ""));
                        format!("[{ds}] {path}")
                    }
                    None if vmx_dir.is_empty() => format!("[{vmx_ds}] {file}"),
                    None => format!("[{vmx_ds}] {vmx_dir}/{file}"),
                };
                add(Device::Disk(DiskDevice {
                    key: disk_key,
                    controller_key: Some(key),
                    unit: Some(u),
                    capacity: None,
                    file_name,
                    mode: x.get(&format!("{prefix}:{u}.mode")).map(str::to_owned),
                }));
                disk_key += 1;
            }
        }
    }
    for i in 0..10 {
        let e = format!("ethernet{i}");
        if !x.on(&format!("{e}.present")) {
            continue;
        }
        let kind = NicKind::from_vmx(x.get(&format!("{e}.virtualDev")))
            .ok_or_else(|| SimFault::new("InvalidArgument", format!("{e}: an unknown adapter")))?;
        let manual = x.get(&format!("{e}.addressType")).is_some_and(|t| t.eq_ignore_ascii_case("static"));
        let mac = x.get(&format!("{e}.address")).or(x.get(&format!("{e}.generatedAddress"))).map(str::to_owned);
        let start = x.get(&format!("{e}.startConnected")).is_none_or(|_| x.on(&format!("{e}.startConnected")));
        add(Device::Nic(NicDevice {
            key: crate::devices::NIC_BASE_KEY + i,
            kind,
            address_type: Some(if manual { "manual" } else { "generated" }.to_owned()),
            mac,
            network: x.get(&format!("{e}.networkName")).map(|n| (n.to_owned(), None)),
            connectable: Some(Connectable { start_connected: start, connected: false, allow_guest_control: true }),
        }));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmx_reads_into_a_spec() {
        let x = Vmx::parse(
            "# made by hand\n.encoding = \"UTF-8\"\ndisplayName = \"web\"\nvirtualHW.version = \"19\"\nnumvcpus = \"4\"\n\
             memsize = \"2048\"\nfirmware = \"efi\"\nuuid.bios = \"42 30 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc\"\n\
             scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"web.vmdk\"\n\
             scsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"/vmfs/volumes/ds2/data/d.vmdk\"\n\
             ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"vmxnet3\"\nethernet0.networkName = \"VM Network\"\n\
             ethernet0.addressType = \"static\"\nethernet0.address = \"00:50:56:3f:00:01\"\n",
        )
        .unwrap();
        let s = to_spec(&x, "ds1", "web").unwrap();
        assert_eq!((s.name.as_deref(), s.num_cpus, s.memory_mb), (Some("web"), Some(4), Some(2048)));
        assert_eq!(s.version.as_deref(), Some("vmx-19"));
        assert_eq!(s.uuid.as_deref(), Some("42301234-5678-9abc-def0-123456789abc"));
        assert_eq!(vmx_uuid(s.uuid.as_deref().unwrap()), "42 30 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc");
        let files: Vec<String> = s
            .devices
            .iter()
            .filter_map(|d| match &d.device {
                Device::Disk(d) => Some(d.file_name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(files, ["[ds1] web/web.vmdk", "[ds2] data/d.vmdk"]);
        assert!(
            s.devices
                .iter()
                .any(|d| matches!(&d.device, Device::Nic(n) if n.mac.as_deref() == Some("00:50:56:3f:00:01")))
        );
        assert!(Vmx::parse("no equals sign").is_err());
    }
}
