//! Property tests: every set operation and the planner's geometry against per-unit boolean
//! models, and the planner driven by a simulated disk whose copy must always match.

use std::num::NonZeroU64;

use cbt::oracle::{BlockModel, SimDisk, SimEvent, naive_geometry, split_violation};
use cbt::{CopyPlan, ExtentSet, HostVersion, incremental_geometry};
use proptest::prelude::*;

/// Most units in a model disk.
const MAX_UNITS: usize = 300;

/// A unit size (1 byte, or a power of two up to 1 GiB, so real-sized offsets are exercised too),
/// a number of units, and a set of unit-aligned ranges inside (and a little past) them.
fn model_and_set() -> impl Strategy<Value = (u64, usize, ExtentSet)> {
    (prop_oneof![Just(1u64), (9u32..=30).prop_map(|s| 1u64 << s)], 0..MAX_UNITS).prop_flat_map(|(unit, units)| {
        let ranges = prop::collection::vec((0..=units as u64 + 4, 0u64..20), 0..24);
        (
            Just(unit),
            Just(units),
            ranges.prop_map(move |r| ExtentSet::from_ranges(r.into_iter().map(|(s, l)| (s * unit, l * unit)))),
        )
    })
}

fn pair() -> impl Strategy<Value = (u64, usize, ExtentSet, ExtentSet)> {
    model_and_set().prop_flat_map(|(unit, units, a)| {
        let ranges = prop::collection::vec((0..=units as u64 + 4, 0u64..20), 0..24);
        (
            Just(unit),
            Just(units),
            Just(a),
            ranges.prop_map(move |r| ExtentSet::from_ranges(r.into_iter().map(|(s, l)| (s * unit, l * unit)))),
        )
    })
}

fn normalised(s: &ExtentSet) -> bool {
    s.as_slice().windows(2).all(|w| w[0].end() < w[1].start())
}

/// 512 cases unless `PROPTEST_CASES` asks for more (or fewer).
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { default.cases } else { 512 };
    ProptestConfig { cases, ..default }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn inserting_extents_one_by_one_is_their_union((_unit, _units, a, b) in pair()) {
        let mut got = a.clone();
        for e in b.iter() {
            got.insert(*e);
        }
        prop_assert_eq!(&got, &a.union(&b));
        prop_assert!(normalised(&got));
    }

    #[test]
    fn binary_operations_match_the_model((unit, units, a, b) in pair()) {
        let cap = units as u64 * unit;
        let (a, b) = (a.clamp(cap), b.clamp(cap));
        let (ma, mb) = (BlockModel::from_set(&a, units, unit), BlockModel::from_set(&b, units, unit));
        prop_assert_eq!(ma.to_set(), a.clone(), "the model round-trips");
        for (got, want) in [
            (a.union(&b), ma.union(&mb)),
            (a.intersection(&b), ma.intersection(&mb)),
            (a.difference(&b), ma.difference(&mb)),
            (b.difference(&a), mb.difference(&ma)),
        ] {
            prop_assert!(normalised(&got));
            prop_assert_eq!(got, want.to_set());
        }
    }

    #[test]
    fn unary_operations_match_the_model(
        (unit, units, a) in model_and_set(),
        g in 1usize..10,
        threshold in 0usize..6,
    ) {
        let cap = units as u64 * unit;
        let m = BlockModel::from_set(&a.clamp(cap), units, unit);
        let gran = NonZeroU64::new(g as u64 * unit).unwrap();
        prop_assert_eq!(a.clamp(cap).total_bytes(), m.bits.iter().filter(|b| **b).count() as u64 * unit);
        prop_assert_eq!(a.complement(cap), m.complement().to_set());
        prop_assert_eq!(a.align_outward(gran, cap), m.align_outward(g).to_set());
        prop_assert_eq!(a.align_inward(gran, cap), m.align_inward(g).to_set());
        prop_assert_eq!(
            a.clamp(cap).coalesce_gaps_below(threshold as u64 * unit),
            m.coalesce_gaps_below(threshold).to_set()
        );
        for offset in [0, unit.saturating_mul(3), cap.saturating_sub(1)] {
            prop_assert_eq!(a.clamp(cap).contains(offset), m.to_set().contains(offset));
        }
        for set in [a.align_outward(gran, cap), a.align_inward(gran, cap), a.coalesce_gaps_below(threshold as u64)] {
            prop_assert!(normalised(&set));
        }
    }

    #[test]
    fn split_tiles_the_set(
        (unit, _, a) in model_and_set(),
        max in prop_oneof![1u64..5000, Just(4 << 20), Just(u64::MAX)],
    ) {
        // At least a unit per request, or a set of gigabyte units would split into billions.
        let max = NonZeroU64::new(max.max(unit)).unwrap();
        prop_assert_eq!(split_violation(&a, max), None);
    }

    #[test]
    fn planner_geometry_matches_the_model(
        (unit, units, changed, allocated) in pair(),
        g in 1usize..10,
        known in any::<bool>(),
    ) {
        let cap = units as u64 * unit;
        let gran = NonZeroU64::new(g as u64 * unit).unwrap();
        let allocated = known.then(|| allocated.clamp(cap));
        let model = |s: &ExtentSet| BlockModel::from_set(&s.clamp(cap), units, unit);
        let (read, zero) = incremental_geometry(&changed, allocated.as_ref(), gran, cap);
        let (mread, mzero) = naive_geometry(false, &model(&changed), allocated.as_ref().map(model).as_ref(), g, true);
        prop_assert_eq!(read, mread.to_set());
        prop_assert_eq!(zero, mzero.to_set());
    }

    /// The end-to-end oracle: whatever happens to the disk (writes, trims, growth across
    /// 128 GiB on old hosts, CBT resets, reverts, wiped destinations, failed queries), every
    /// planned copy leaves the destination identical to the disk.
    #[test]
    fn simulated_backups_always_match_the_disk(events in prop::collection::vec(sim_event(), 1..80)) {
        let mut disk = SimDisk::new(100, 1 << 30, 2, HostVersion { major: 5, minor: 5, patch: 0 });
        for event in &events {
            if let Err(e) = disk.apply(event) {
                return Err(TestCaseError::fail(format!("{event:?}: {e}")));
            }
        }
    }
}

fn sim_event() -> impl Strategy<Value = SimEvent> {
    prop_oneof![
        6 => (0usize..400).prop_map(SimEvent::Write),
        2 => (0usize..400).prop_map(SimEvent::Unmap),
        1 => (1usize..120).prop_map(SimEvent::Grow),
        1 => Just(SimEvent::ResetCbt),
        1 => Just(SimEvent::Revert),
        1 => Just(SimEvent::WipeDestination),
        1 => Just(SimEvent::MoveSlot),
        1 => (5u32..=8).prop_map(|major| SimEvent::MoveToHost(HostVersion { major, minor: 0, patch: 0 })),
        4 => (any::<bool>(), 1usize..40, any::<bool>()).prop_map(|(f, p, a)| SimEvent::Backup {
            query_fails: f && p % 5 == 0,
            page_units: p,
            allocation_known: a,
        }),
    ]
}

/// The simulator is not vacuous: a quiet disk on a modern host gets incremental copies, and the
/// boundary bug it simulates really does corrupt a copy when the planner is not told the truth.
#[test]
fn the_simulator_exercises_incrementals_and_can_catch_a_wrong_plan() {
    let backup = SimEvent::Backup { query_fails: false, page_units: 7, allocation_known: true };
    let mut disk = SimDisk::new(50, 4096, 2, HostVersion { major: 7, minor: 0, patch: 0 });
    let mut kinds = Vec::new();
    for event in
        [SimEvent::Write(3), backup.clone(), SimEvent::Write(9), SimEvent::Unmap(3), backup.clone(), backup.clone()]
    {
        if let Some(b) = disk.apply(&event).unwrap() {
            kinds.push(matches!(b.planned.plan, CopyPlan::Incremental { .. }));
        }
    }
    assert_eq!(kinds, [false, true, true]);

    // A 5.5 host, a disk growing across 128 GiB: the simulated CBT loses changes afterwards.
    // The planner must stay on full copies (taint); if the taint were dropped from the committed
    // state, the next incremental would miss the write and the simulator would report it.
    let mut disk = SimDisk::new(100, 1 << 30, 2, HostVersion { major: 5, minor: 5, patch: 0 });
    disk.apply(&backup).unwrap();
    disk.apply(&SimEvent::Grow(50)).unwrap();
    disk.apply(&backup).unwrap();
    assert!(disk.committed().unwrap().taint.is_some());
    let mut forgetful = disk.clone();
    disk.apply(&SimEvent::Write(120)).unwrap();
    let b = disk.apply(&backup).unwrap().unwrap();
    assert!(matches!(b.planned.plan, CopyPlan::Full { .. }), "{:?}", b.planned.plan);

    forgetful.tamper_with_commit(|c| c.taint = None);
    forgetful.apply(&SimEvent::Write(120)).unwrap();
    let err = forgetful.apply(&backup).unwrap_err();
    assert!(err.contains("differs from the disk"), "{err}");
}
