//! Fuzz entry point for the vSphere client: a SOAP response as a server sends it, through the
//! XML tree, the envelope and fault reader, the property-collector page, the VM, host,
//! datastore and cluster models, and a `QueryChangedDiskAreas` page into `cbt`.

use vsphere::facts::{cluster_from, datastore_from, host_from};
use vsphere::model::vm_from;
use vsphere::pc::parse_result;
use vsphere::soap::{MoRef, parse_response};
use vsphere::task::change_info;
use vsphere::xml::{self, Element, Limits};

/// Small limits, so the fuzzer also explores refusals.
const LIMITS: Limits = Limits { max_bytes: 1 << 20, max_depth: 64, max_elements: 100_000 };

fn size(e: &Element) -> (usize, usize) {
    e.children.iter().map(size).fold((1, e.text.len() + e.name.len()), |(n, t), (cn, ct)| (n + cn, t + ct))
}

/// Nothing may panic, and the tree may not outgrow its input: every element costs at least
/// `<a/>` (4 bytes) of it, and text and names come out no longer than they went in.
pub fn soap_response(data: &[u8]) {
    if let Ok(root) = xml::parse(data, LIMITS) {
        let (elements, text) = size(&root);
        assert!(elements * 4 <= data.len(), "{elements} elements from {} bytes", data.len());
        assert!(text <= data.len(), "{text} bytes of text and names from {} bytes", data.len());
    }
    let pc = MoRef::new("PropertyCollector", "propertyCollector");
    // A QueryChangedDiskAreas page goes to the cbt accumulator, which refuses what is odd.
    if let Ok(r) = parse_response(data, "QueryChangedDiskAreas", &pc, LIMITS)
        && let Some(rv) = r.child("returnval")
    {
        let page = change_info(rv);
        let mut acc = cbt::ChangeAccumulator::new(1 << 40);
        let _ = acc.push(&page);
    }
    for method in ["RetrievePropertiesEx", "RetrieveServiceContent", "Login"] {
        if let Ok(r) = parse_response(data, method, &pc, LIMITS)
            && let Ok((objects, _)) = parse_result(&r)
        {
            for o in &objects {
                if let Ok(vm) = vm_from(o) {
                    assert!(vm.snapshot_depth() <= LIMITS.max_depth);
                }
                let _ = (host_from(o), datastore_from(o), cluster_from(o));
            }
        }
    }
}
