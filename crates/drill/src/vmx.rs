//! The VMware `.vmx` file: a total, bounded parser of its `key = "value"` lines, and the
//! virtual hardware a drill needs from it (firmware, CPUs, memory, disk controllers and disks
//! by device key, NICs, the boot disk).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::DrillError;

/// The largest `.vmx` read (real ones are a few kilobytes).
pub const MAX_VMX_BYTES: usize = 1 << 20;

/// A parsed `.vmx`: keys lower-cased (VMware reads them case-insensitively), values with
/// VMware's `|XX` escapes decoded; a key given twice keeps its last value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vmx {
    entries: BTreeMap<String, String>,
}

fn vmx_error(line: usize, reason: impl Into<String>) -> DrillError {
    DrillError::Vmx { line, reason: reason.into() }
}

fn key_char_ok(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !matches!(c, '=' | '"' | '#' | '|')
}

/// Decodes VMware's `|XX` escapes (`|22` is `"`, `|7C` is `|`); a `|` not followed by two
/// hexadecimal digits stays as it is.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'|'
            && let Some(hex) = b.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(v) = u8::from_str_radix(hex, 16)
            && hex.bytes().all(|c| c.is_ascii_hexdigit())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '|' | '#') || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("|{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Vmx {
    /// Parses `.vmx` text: blank lines, `#` comments, `key = "value"` (or an unquoted value),
    /// a `#` comment after a quoted value. Never panics; refuses text over [`MAX_VMX_BYTES`].
    pub fn parse(text: &str) -> Result<Vmx, DrillError> {
        if text.len() > MAX_VMX_BYTES {
            return Err(vmx_error(0, format!("{} bytes, more than a .vmx ever has ({MAX_VMX_BYTES})", text.len())));
        }
        let mut entries = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(vmx_error(line_no, "not a `key = \"value\"` line"));
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(key_char_ok) {
                return Err(vmx_error(line_no, format!("{key:?} is not a key")));
            }
            let value = value.trim();
            let value = if let Some(quoted) = value.strip_prefix('"') {
                let Some((inside, rest)) = quoted.split_once('"') else {
                    return Err(vmx_error(line_no, "the value's closing quote is missing"));
                };
                let rest = rest.trim_start();
                if !rest.is_empty() && !rest.starts_with('#') {
                    return Err(vmx_error(line_no, "text after the quoted value"));
                }
                unescape(inside)
            } else {
                value.to_owned()
            };
            entries.insert(key.to_ascii_lowercase(), value);
        }
        Ok(Vmx { entries })
    }

    /// The text of this `.vmx` (every value quoted and escaped): parsing it gives it back.
    pub fn render(&self) -> String {
        self.entries.iter().map(|(k, v)| format!("{k} = \"{}\"\n", escape(v))).collect()
    }

    /// The value of `key`, case-insensitively.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(&key.to_ascii_lowercase()).map(String::as_str)
    }

    /// `key` as a boolean (`TRUE`/`FALSE`, `yes`/`no`, `1`/`0`), when it is one.
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)?.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        }
    }

    /// Every key (lower-cased) and value, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many keys it has.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no key at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The VM's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// BIOS (SeaBIOS under QEMU).
    Bios,
    /// EFI (OVMF under QEMU).
    Efi {
        /// `uefi.secureBoot.enabled`.
        secure_boot: bool,
    },
}

/// A kind of disk bus, as the `.vmx` names its device keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bus {
    /// `scsiN`.
    Scsi,
    /// `sataN` (AHCI).
    Sata,
    /// `nvmeN`.
    Nvme,
    /// `ideN`.
    Ide,
}

impl Bus {
    const ALL: [Bus; 4] = [Bus::Scsi, Bus::Sata, Bus::Nvme, Bus::Ide];

    /// Its prefix in the `.vmx`.
    pub fn prefix(self) -> &'static str {
        match self {
            Bus::Scsi => "scsi",
            Bus::Sata => "sata",
            Bus::Nvme => "nvme",
            Bus::Ide => "ide",
        }
    }
}

/// A disk's device key: bus, controller number, unit (`scsi0:1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskSlot {
    /// The bus kind.
    pub bus: Bus,
    /// The controller's number (`scsi1` is 1).
    pub controller: u8,
    /// The unit on it.
    pub unit: u8,
}

impl fmt::Display for DiskSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}:{}", self.bus.prefix(), self.controller, self.unit)
    }
}

fn small_number(s: &str) -> Option<u8> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Splits `scsi0` into its bus and number.
fn controller_key(s: &str) -> Option<(Bus, u8)> {
    Bus::ALL.into_iter().find_map(|bus| Some((bus, small_number(s.strip_prefix(bus.prefix())?)?)))
}

impl FromStr for DiskSlot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let parsed = lower.split_once(':').and_then(|(c, u)| {
            let (bus, controller) = controller_key(c)?;
            Some(DiskSlot { bus, controller, unit: small_number(u)? })
        });
        parsed.ok_or_else(|| format!("{s:?} is not a disk slot (scsi0:0, sata0:1, nvme0:0, ide0:0)"))
    }
}

/// What a disk controller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerKind {
    /// VMware Paravirtual SCSI.
    Pvscsi,
    /// LSI Logic SAS (1068).
    LsiSas1068,
    /// LSI Logic parallel (53C1030).
    LsiLogic,
    /// BusLogic.
    BusLogic,
    /// A SCSI controller of another kind (its `virtualDev`).
    OtherScsi(String),
    /// AHCI.
    Sata,
    /// NVMe.
    Nvme,
    /// IDE.
    Ide,
}

impl fmt::Display for ControllerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pvscsi => f.write_str("pvscsi"),
            Self::LsiSas1068 => f.write_str("lsisas1068"),
            Self::LsiLogic => f.write_str("lsilogic"),
            Self::BusLogic => f.write_str("buslogic"),
            Self::OtherScsi(s) => write!(f, "scsi {s:?}"),
            Self::Sata => f.write_str("sata"),
            Self::Nvme => f.write_str("nvme"),
            Self::Ide => f.write_str("ide"),
        }
    }
}

/// A disk controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// Its bus kind.
    pub bus: Bus,
    /// Its number.
    pub number: u8,
    /// What it is.
    pub kind: ControllerKind,
}

/// A virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Its device key.
    pub slot: DiskSlot,
    /// Its `fileName`, when given.
    pub file_name: Option<String>,
}

/// A NIC model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicModel {
    /// Intel E1000.
    E1000,
    /// Intel E1000e.
    E1000e,
    /// VMXNET3.
    Vmxnet3,
    /// AMD PCnet (`vlance`).
    Vlance,
    /// Another (`vmxnet`, `vmxnet2`, `flexible`): its `virtualDev`.
    Other(String),
}

/// A virtual NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// `ethernetN`.
    pub index: u8,
    /// Its model.
    pub model: NicModel,
    /// Its MAC address, when well formed.
    pub mac: Option<String>,
}

/// The virtual hardware of a VM, as a drill needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// The firmware.
    pub firmware: Firmware,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
    /// Disk controllers that are present (including ones implied by a disk), in key order.
    pub controllers: Vec<Controller>,
    /// Hard disks (not CD-ROMs), in slot order.
    pub disks: Vec<Disk>,
    /// NICs, by index.
    pub nics: Vec<Nic>,
    /// The boot disk: the first disk of `bios.hddOrder` or `bios.bootOrder` that is one,
    /// else the first disk in slot order (SCSI, SATA, NVMe, IDE).
    pub boot_disk: Option<DiskSlot>,
    /// `guestOS`.
    pub guest_os: Option<String>,
    /// Defaults taken for keys the `.vmx` lacks, in words.
    pub notes: Vec<String>,
}

#[derive(Default)]
struct DiskKeys {
    present: Option<bool>,
    file_name: Option<String>,
    device_type: Option<String>,
}

#[derive(Default)]
struct NicKeys {
    present: Option<bool>,
    virtual_dev: Option<String>,
    address: Option<String>,
    generated: Option<String>,
    address_type: Option<String>,
}

fn mac_ok(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn number<T: FromStr>(vmx: &Vmx, key: &str) -> Result<Option<T>, DrillError> {
    match vmx.get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| vmx_error(0, format!("{key} = {v:?} is not a number"))),
    }
}

impl Hardware {
    /// Reads the hardware from a parsed `.vmx`. Never panics.
    pub fn from_vmx(vmx: &Vmx) -> Result<Hardware, DrillError> {
        let mut notes = Vec::new();
        let firmware = match vmx.get("firmware").map(|f| f.trim().to_ascii_lowercase()) {
            None => Firmware::Bios,
            Some(f) if f == "bios" || f.is_empty() => Firmware::Bios,
            Some(f) if f == "efi" => {
                Firmware::Efi { secure_boot: vmx.bool("uefi.secureBoot.enabled").unwrap_or(false) }
            }
            Some(f) => return Err(vmx_error(0, format!("firmware = {f:?}: neither bios nor efi"))),
        };
        let memory_mib = match number::<u64>(vmx, "memsize")? {
            Some(0) => return Err(vmx_error(0, "memsize = 0")),
            Some(m) => m,
            None => {
                notes.push("the .vmx has no memsize: 1024 MiB taken".to_owned());
                1024
            }
        };
        let vcpus = number::<u32>(vmx, "numvcpus")?.unwrap_or(1).max(1);
        let cores_per_socket = number::<u32>(vmx, "cpuid.coresPerSocket")?.unwrap_or(1).max(1);

        let mut controllers: BTreeMap<(Bus, u8), (Option<bool>, Option<String>)> = BTreeMap::new();
        let mut disks: BTreeMap<DiskSlot, DiskKeys> = BTreeMap::new();
        let mut nics: BTreeMap<u8, NicKeys> = BTreeMap::new();
        for (key, value) in vmx.entries() {
            let Some((device, attr)) = key.split_once('.') else { continue };
            if let Some(index) = device.strip_prefix("ethernet") {
                let Some(index) = small_number(index) else { continue };
                let n = nics.entry(index).or_default();
                match attr {
                    "present" => n.present = vmx.bool(key),
                    "virtualdev" => n.virtual_dev = Some(value.trim().to_ascii_lowercase()),
                    "address" => n.address = Some(value.trim().to_ascii_lowercase()),
                    "generatedaddress" => n.generated = Some(value.trim().to_ascii_lowercase()),
                    "addresstype" => n.address_type = Some(value.trim().to_ascii_lowercase()),
                    _ => {}
                }
            } else if device.contains(':') {
                let Ok(slot) = device.parse::<DiskSlot>() else { continue };
                let d = disks.entry(slot).or_default();
                match attr {
                    "present" => d.present = vmx.bool(key),
                    "filename" => d.file_name = Some(value.to_owned()),
                    "devicetype" => d.device_type = Some(value.trim().to_ascii_lowercase()),
                    _ => {}
                }
            } else if let Some(c) = controller_key(device) {
                let e = controllers.entry(c).or_default();
                match attr {
                    "present" => e.0 = vmx.bool(key),
                    "virtualdev" => e.1 = Some(value.trim().to_ascii_lowercase()),
                    _ => {}
                }
            }
        }

        let mut out_disks = Vec::new();
        for (slot, d) in disks {
            let controller_present = controllers.get(&(slot.bus, slot.controller)).and_then(|c| c.0);
            let cdrom = d.device_type.as_deref().is_some_and(|t| t.contains("cdrom") || t.contains("floppy"))
                || d.file_name.as_deref().is_some_and(|f| f.to_ascii_lowercase().ends_with(".iso"));
            let declared_disk = d.device_type.as_deref().is_some_and(|t| t.contains("disk"));
            if d.present == Some(false) || controller_present == Some(false) || cdrom {
                continue;
            }
            if d.file_name.is_none() && !declared_disk {
                continue;
            }
            out_disks.push(Disk { slot, file_name: d.file_name });
        }

        let mut out_controllers = Vec::new();
        for (&(bus, number), (present, dev)) in &controllers {
            let has_disk = out_disks.iter().any(|d| (d.slot.bus, d.slot.controller) == (bus, number));
            if *present == Some(false) || (*present != Some(true) && !has_disk) {
                continue;
            }
            out_controllers.push(Controller {
                bus,
                number,
                kind: controller_kind(bus, number, dev.as_deref(), &mut notes),
            });
        }
        for d in &out_disks {
            let (bus, number) = (d.slot.bus, d.slot.controller);
            if !out_controllers.iter().any(|c| (c.bus, c.number) == (bus, number)) {
                let kind = controller_kind(bus, number, None, &mut notes);
                out_controllers.push(Controller { bus, number, kind });
            }
        }
        out_controllers.sort_by_key(|c| (c.bus, c.number));

        let mut out_nics = Vec::new();
        for (index, n) in nics {
            if n.present == Some(false) || (n.present.is_none() && n.virtual_dev.is_none()) {
                continue;
            }
            let model = match n.virtual_dev.as_deref() {
                Some("e1000") => NicModel::E1000,
                Some("e1000e") => NicModel::E1000e,
                Some("vmxnet3") => NicModel::Vmxnet3,
                Some("vlance") => NicModel::Vlance,
                Some(other) => NicModel::Other(other.to_owned()),
                None => {
                    notes.push(format!("ethernet{index} has no virtualDev: e1000 taken"));
                    NicModel::E1000
                }
            };
            let mac = if n.address_type.as_deref() == Some("static") { n.address } else { n.generated.or(n.address) };
            out_nics.push(Nic { index, model, mac: mac.filter(|m| mac_ok(m)) });
        }

        let boot_disk = ["bios.hddOrder", "bios.bootOrder"]
            .iter()
            .filter_map(|k| vmx.get(k))
            .flat_map(|order| order.split(','))
            .filter_map(|t| t.parse::<DiskSlot>().ok())
            .find(|s| out_disks.iter().any(|d| d.slot == *s))
            .or_else(|| out_disks.first().map(|d| d.slot));

        Ok(Hardware {
            firmware,
            memory_mib,
            vcpus,
            cores_per_socket,
            controllers: out_controllers,
            disks: out_disks,
            nics: out_nics,
            boot_disk,
            guest_os: vmx.get("guestOS").map(str::to_owned),
            notes,
        })
    }

    /// The controller a disk is on.
    pub fn controller_of(&self, slot: DiskSlot) -> Option<&Controller> {
        self.controllers.iter().find(|c| (c.bus, c.number) == (slot.bus, slot.controller))
    }
}

fn controller_kind(bus: Bus, number: u8, dev: Option<&str>, notes: &mut Vec<String>) -> ControllerKind {
    match bus {
        Bus::Sata => ControllerKind::Sata,
        Bus::Nvme => ControllerKind::Nvme,
        Bus::Ide => ControllerKind::Ide,
        Bus::Scsi => match dev {
            Some("pvscsi") => ControllerKind::Pvscsi,
            Some("lsisas1068") => ControllerKind::LsiSas1068,
            Some("lsilogic") => ControllerKind::LsiLogic,
            Some("buslogic") => ControllerKind::BusLogic,
            Some(other) => ControllerKind::OtherScsi(other.to_owned()),
            None => {
                notes.push(format!("scsi{number} has no virtualDev: lsilogic taken (VMware's default)"));
                ControllerKind::LsiLogic
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_EFI: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
# a comment
displayName = "web |22one|22 #1"
firmware = "efi"
uefi.secureBoot.enabled = "TRUE"
memSize = "2048"
numvcpus = "4"
cpuid.coresPerSocket = "2"
scsi0.virtualDev = "pvscsi"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web.vmdk"
scsi1.virtualDev = "lsisas1068"
scsi1.present = "TRUE"
scsi1:3.fileName = "data.vmdk"
sata0.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "debian.iso"
sata0:1.present = "TRUE"
nvme0.present = "TRUE"
nvme0:0.fileName = "fast.vmdk"
nvme0:0.present = "TRUE"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:50:56:AB:CD:EF"
ethernet1.present = "FALSE"
ethernet1.virtualDev = "e1000"
guestOS = "debian12-64"
"#;

    #[test]
    fn parses_keys_case_insensitively_with_escapes_and_comments() {
        let v = Vmx::parse(LINUX_EFI).unwrap();
        assert_eq!(v.get("MEMSIZE"), Some("2048"));
        assert_eq!(v.get("displayname"), Some("web \"one\" #1"));
        assert_eq!(v.bool("uefi.secureboot.enabled"), Some(true));
        assert_eq!(Vmx::parse(&v.render()).unwrap(), v);
        let v = Vmx::parse("a = b\r\nB = \"x\" # trailing\n\n  # indented comment\nc=\"\"").unwrap();
        assert_eq!((v.get("a"), v.get("b"), v.get("c"), v.len()), (Some("b"), Some("x"), Some(""), 3));
        assert_eq!(Vmx::parse("").unwrap().len(), 0);
        assert_eq!(Vmx::parse("a = \"|7C|zz|4\"").unwrap().get("a"), Some("||zz|4"));
    }

    #[test]
    fn refuses_what_is_not_a_vmx_with_the_line() {
        for (text, line) in [
            ("a = \"1\"\nno equals sign", 2),
            ("a = \"unterminated", 1),
            ("a = \"x\" junk", 1),
            (" = \"x\"", 1),
            ("a b = \"x\"", 1),
        ] {
            match Vmx::parse(text) {
                Err(DrillError::Vmx { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let huge = "a".repeat(MAX_VMX_BYTES + 1);
        assert!(matches!(Vmx::parse(&huge), Err(DrillError::Vmx { line: 0, .. })));
    }

    #[test]
    fn reads_the_hardware() {
        let hw = Hardware::from_vmx(&Vmx::parse(LINUX_EFI).unwrap()).unwrap();
        assert_eq!(hw.firmware, Firmware::Efi { secure_boot: true });
        assert_eq!((hw.memory_mib, hw.vcpus, hw.cores_per_socket), (2048, 4, 2));
        let slots: Vec<String> = hw.disks.iter().map(|d| d.slot.to_string()).collect();
        assert_eq!(slots, ["scsi0:0", "scsi1:3", "nvme0:0"], "the CD-ROM is no disk");
        let kinds: Vec<(String, ControllerKind)> =
            hw.controllers.iter().map(|c| (format!("{}{}", c.bus.prefix(), c.number), c.kind.clone())).collect();
        assert_eq!(
            kinds,
            [
                ("scsi0".into(), ControllerKind::Pvscsi),
                ("scsi1".into(), ControllerKind::LsiSas1068),
                ("sata0".into(), ControllerKind::Sata),
                ("nvme0".into(), ControllerKind::Nvme)
            ]
        );
        assert_eq!(hw.boot_disk, Some("scsi0:0".parse().unwrap()));
        assert_eq!(hw.nics, [Nic { index: 0, model: NicModel::Vmxnet3, mac: Some("00:50:56:ab:cd:ef".into()) }]);
        assert_eq!(hw.guest_os.as_deref(), Some("debian12-64"));
        assert!(hw.notes.is_empty(), "{:?}", hw.notes);
    }

    #[test]
    fn boot_order_defaults_and_implied_controllers() {
        let text = "memsize = \"512\"\nide0:0.fileName = \"a.vmdk\"\nsata0:2.fileName = \"b.vmdk\"\n\
                    scsi2:1.fileName = \"c.vmdk\"\nbios.hddOrder = \"ide0:0\"\nethernet0.virtualDev = \"vlance\"\n\
                    ethernet1.virtualDev = \"vmxnet2\"\nethernet1.address = \"not-a-mac\"";
        let hw = Hardware::from_vmx(&Vmx::parse(text).unwrap()).unwrap();
        assert_eq!(hw.firmware, Firmware::Bios);
        assert_eq!(hw.boot_disk, Some("ide0:0".parse().unwrap()), "bios.hddOrder names the boot disk");
        assert_eq!(hw.disks.len(), 3);
        let scsi2 = hw.controller_of("scsi2:1".parse().unwrap()).unwrap();
        assert_eq!(scsi2.kind, ControllerKind::LsiLogic, "a SCSI controller without virtualDev");
        assert!(hw.notes.iter().any(|n| n.contains("scsi2 has no virtualDev")));
        assert_eq!(hw.nics[0].model, NicModel::Vlance);
        assert_eq!(hw.nics[1], Nic { index: 1, model: NicModel::Other("vmxnet2".into()), mac: None });
        let hw = Hardware::from_vmx(
            &Vmx::parse(
                "sata0:2.fileName = \"b.vmdk\"\nscsi0:1.fileName = \"c.vmdk\"\nscsi0.virtualDev = \"buslogic\"",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(hw.boot_disk, Some("scsi0:1".parse().unwrap()), "the first disk in slot order");
        assert_eq!(hw.controllers[0].kind, ControllerKind::BusLogic);
        assert!(hw.notes.iter().any(|n| n.contains("memsize")));
    }

    #[test]
    fn absent_controllers_and_disks_are_left_out() {
        let text = "scsi0.present = \"FALSE\"\nscsi0:0.fileName = \"a.vmdk\"\nsata0:0.present = \"FALSE\"\n\
                    sata0:0.fileName = \"b.vmdk\"\nnvme0:0.present = \"TRUE\"\nmemsize = \"64\"";
        let hw = Hardware::from_vmx(&Vmx::parse(text).unwrap()).unwrap();
        assert!(hw.disks.is_empty() && hw.controllers.is_empty() && hw.boot_disk.is_none(), "{hw:?}");
        for bad in ["firmware = \"coreboot\"", "memsize = \"lots\"", "memsize = \"0\"", "numvcpus = \"-1\""] {
            assert!(matches!(Hardware::from_vmx(&Vmx::parse(bad).unwrap()), Err(DrillError::Vmx { .. })), "{bad}");
        }
    }

    #[test]
    fn disk_slots_parse_and_print() {
        for s in ["scsi0:0", "sata3:29", "nvme0:14", "ide1:1"] {
            assert_eq!(s.parse::<DiskSlot>().unwrap().to_string(), s);
        }
        assert_eq!("SCSI0:1".parse::<DiskSlot>().unwrap().to_string(), "scsi0:1");
        for s in ["scsi0", "scsi:0", "usb0:0", "scsi0:256", "scsi0:-1", "scsi0:+1", "", ":"] {
            assert!(s.parse::<DiskSlot>().is_err(), "{s}");
        }
    }
}
