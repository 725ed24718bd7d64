//! Inventorying 10,000 VMs: parsing one `RetrievePropertiesEx` answer that lists them with their
//! devices, disks and snapshots into the typed model (parse only), and the whole conversation
//! with the project's simulator over TLS (login, container view, every page, the model).

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

fn inventory_end_to_end(c: &mut Criterion) {
    use vsphere::{Client, ConnectOptions, Credentials, Secret, Trust};
    use vsphere_sim::{Config, Sim, SimTls};
    vsphere::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::small(10_000, 1 << 20);
    // vCenter's own page limit is of this order; the client asks for 500 per page.
    config.page_limit = 500;
    let sim = rt.block_on(Sim::start(config, dir.path(), SimTls::SelfSigned)).unwrap();
    let client = rt.block_on(async {
        let c = Client::connect(&ConnectOptions { trust: Trust::Insecure, ..ConnectOptions::new(&sim.url()) })
            .await
            .unwrap();
        c.login(Credentials { user: "backup@vsphere.local".into(), password: Secret::new("simulated") }).await.unwrap();
        c
    });
    let mut group = c.benchmark_group("inventory_10k_vms_simulator");
    group.sample_size(10);
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("client_vms", |b| {
        b.iter(|| {
            let vms = rt.block_on(client.vms()).unwrap();
            assert_eq!(vms.len(), 10_000);
            vms
        })
    });
    group.finish();
    drop(sim);
}

criterion_group!(benches, inventory, inventory_end_to_end);
criterion_main!(benches);
