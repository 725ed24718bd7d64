//! Parsing a `RetrievePropertiesEx` answer that lists 10,000 VMs with their devices, disks and
//! snapshots into the typed model: the client's side of inventorying a large vCenter.

use std::hint::black_box;

use benches::inventory_response;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vsphere::model::vm_from;
use vsphere::pc::parse_result;
use vsphere::soap::{MoRef, parse_response};
use vsphere::xml::Limits;

fn inventory(c: &mut Criterion) {
    let body = inventory_response(10_000);
    let pc = MoRef::new("PropertyCollector", "propertyCollector");
    let mut group = c.benchmark_group("soap_inventory_10k_vms");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("xml_tree", |b| b.iter(|| vsphere::xml::parse(black_box(body.as_bytes()), Limits::default())));
    group.bench_function("typed_vms", |b| {
        b.iter(|| {
            let r = parse_response(black_box(body.as_bytes()), "RetrievePropertiesEx", &pc, Limits::default()).unwrap();
            let (objects, _) = parse_result(&r).unwrap();
            let vms: Vec<_> = objects.iter().map(|o| vm_from(o).unwrap()).collect();
            assert_eq!(vms.len(), 10_000);
            vms
        })
    });
    group.finish();
}

criterion_group!(benches, inventory);
criterion_main!(benches);
