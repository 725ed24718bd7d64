//! Fuzz entry point for the `.vmx` a drill boots from: any text either parses into keys that
//! render and parse back the same, and into hardware whose plan never panics, or is refused
//! with a message.

use std::time::Duration;

use drill::vmx::{Hardware, Vmx};
use drill::{Accel, DrillDisk, DrillSpec, HostFacts, Network};

/// Parses arbitrary text as a `.vmx`, reads its hardware and plans a drill of every disk.
pub fn vmx(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let v = match Vmx::parse(&text) {
        Ok(v) => v,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(Vmx::parse(&v.render()).expect("rendered text parses"), v, "a render parses back the same");
    let Ok(hw) = Hardware::from_vmx(&v) else { return };
    if let Some(boot) = hw.boot_disk {
        assert!(hw.disks.iter().any(|d| d.slot == boot), "the boot disk is a disk");
    }
    for d in &hw.disks {
        assert!(hw.controller_of(d.slot).is_some(), "every disk has its controller");
    }
    let host = HostFacts::example();
    let spec = DrillSpec {
        name: "fuzz".into(),
        vmx: text.into_owned(),
        disks: hw
            .disks
            .iter()
            .map(|d| DrillDisk { slot: d.slot.to_string(), uri: "nbd+unix:///d?socket=/tmp/n.sock".into() })
            .collect(),
        accel: Accel::Auto,
        boot_controller: None,
        checks: Vec::new(),
        network: Network::Isolated,
        timeout: Duration::from_secs(60),
        work_dir: "/tmp/drill-fuzz".into(),
    };
    match drill::plan(&spec, &host) {
        Ok(p) => {
            assert_eq!(p.overlays.len(), hw.disks.len(), "one overlay per disk");
            assert_eq!(p.accel, "tcg");
            assert!(!p.args.iter().any(|a| a.contains("readonly=on") && !a.contains("pflash")));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
