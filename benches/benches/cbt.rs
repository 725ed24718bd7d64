//! Benchmarks of the CBT core: extent-set algebra over a million areas, and planning a 2 TiB
//! disk with a million changed areas (target: under 50 ms).

use std::hint::black_box;
use std::num::NonZeroU64;

use benches::{as_pages, scattered_extents};
use cbt::{
    ChangeId, Changes, CommittedDisk, CurrentDisk, Destination, DiskPosition, Epoch, HostVersion, accumulate, plan,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TIB: u64 = 1 << 40;
const MILLION: u64 = 1_000_000;

fn extent_ops(c: &mut Criterion) {
    let a = scattered_extents(MILLION, 2 * TIB, 1);
    let b = scattered_extents(MILLION, 2 * TIB, 2);
    let mut group = c.benchmark_group("extent_set_1m");
    group.throughput(Throughput::Elements(2 * MILLION));
    group.bench_function("union", |bench| bench.iter(|| black_box(&a).union(black_box(&b))));
    group.bench_function("intersection", |bench| bench.iter(|| black_box(&a).intersection(black_box(&b))));
    group.bench_function("difference", |bench| bench.iter(|| black_box(&a).difference(black_box(&b))));
    group.throughput(Throughput::Elements(MILLION));
    let g = NonZeroU64::new(4 << 20).unwrap();
    group.bench_function("align_outward_4mib", |bench| bench.iter(|| black_box(&a).align_outward(g, 2 * TIB)));
    group.bench_function("split_2mib", |bench| {
        bench.iter(|| black_box(&a).split(NonZeroU64::new(2 << 20).unwrap()).count())
    });
    group.finish();
}

fn planning(c: &mut Criterion) {
    let capacity = 2 * TIB;
    let changed = scattered_extents(MILLION, capacity, 3);
    // Allocated: a coarser map, most of the disk in half a million runs.
    let allocated = scattered_extents(MILLION / 2, capacity, 4).coalesce_gaps_below(64 << 10);
    let epoch = Epoch::from_bytes([7; 16]);
    let position = DiskPosition { controller: "scsi".into(), bus: 0, unit: 0 };
    let previous = CommittedDisk {
        change_id: Some(ChangeId::tracked(epoch, 41)),
        capacity,
        hardware_version: 19,
        position: position.clone(),
        backing: "[ds1] vm/vm.vmdk".into(),
        host_version: Some(HostVersion { major: 8, minor: 0, patch: 3 }),
        taint: None,
    };
    let current = CurrentDisk {
        change_id: Some(ChangeId::tracked(epoch, 42)),
        capacity,
        hardware_version: 19,
        host_version: Some(HostVersion { major: 8, minor: 0, patch: 3 }),
        position,
        backing: "[ds1] vm/vm.vmdk".into(),
        allocated: Some(allocated),
        reverted: false,
        fresh_snapshot: false,
        forced: None,
    };
    // ESXi answers in windows of about 2 GiB.
    let pages = as_pages(&changed, capacity, 2 << 30);
    let areas = accumulate(capacity, &pages).expect("pages tile the disk");
    let changes = Changes::Areas(areas);
    let dest = Destination { granularity: NonZeroU64::new(4 << 20).unwrap(), holds_data: true };

    let mut group = c.benchmark_group("plan_2tib_1m_areas");
    group.sample_size(20);
    group.bench_function("accumulate_pages", |bench| bench.iter(|| accumulate(capacity, black_box(&pages))));
    group.bench_function("plan", |bench| {
        bench.iter(|| plan(Some(black_box(&previous)), black_box(&current), black_box(&changes), dest))
    });
    group.bench_function("accumulate_and_plan", |bench| {
        bench.iter(|| {
            let areas = accumulate(capacity, black_box(&pages)).expect("pages tile the disk");
            plan(Some(&previous), &current, &Changes::Areas(areas), dest)
        })
    });
    group.finish();
}

criterion_group!(benches, extent_ops, planning);
criterion_main!(benches);
