//! The copy planner as a table: one row per situation, with the plan it must produce.

use std::num::NonZeroU64;

use cbt::{
    ChangeId, ChangedAreas, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition, Epoch, ExtentSet,
    Forced, FullReason, HostVersion, Planned, QueryFault, Taint, plan,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CAP: u64 = 64 * MIB;

fn id(epoch: u8, seq: u64) -> Option<ChangeId> {
    Some(ChangeId::tracked(Epoch::from_bytes([epoch; 16]), seq))
}

fn epoch(e: u8) -> Epoch {
    Epoch::from_bytes([e; 16])
}

fn slot(unit: u32) -> DiskPosition {
    DiskPosition { controller: "scsi".into(), bus: 0, unit }
}

fn host(major: u32) -> Option<HostVersion> {
    Some(HostVersion { major, minor: 5, patch: 0 })
}

fn set(ranges: &[(u64, u64)]) -> ExtentSet {
    ExtentSet::from_ranges(ranges.iter().copied())
}

fn prev() -> CommittedDisk {
    CommittedDisk {
        change_id: id(1, 5),
        capacity: CAP,
        hardware_version: 13,
        position: slot(0),
        backing: "[ds1] vm/vm.vmdk".into(),
        host_version: host(7),
        taint: None,
    }
}

fn cur() -> CurrentDisk {
    CurrentDisk {
        change_id: id(1, 6),
        capacity: CAP,
        hardware_version: 13,
        host_version: host(7),
        position: slot(0),
        backing: "[ds1] vm/vm.vmdk".into(),
        // Allocated: the first 16 MiB and 40..48 MiB.
        allocated: Some(set(&[(0, 16 * MIB), (40 * MIB, 8 * MIB)])),
        reverted: false,
        fresh_snapshot: false,
        forced: None,
    }
}

fn areas(ranges: &[(u64, u64)]) -> Changes {
    Changes::Areas(ChangedAreas { areas: set(ranges), warnings: vec![] })
}

fn dest(granularity: u64, holds_data: bool) -> Destination {
    Destination { granularity: NonZeroU64::new(granularity).unwrap(), holds_data }
}

/// What a row expects.
enum Want {
    Incremental { read: Vec<(u64, u64)>, zero: Vec<(u64, u64)> },
    Full { reason: fn(&FullReason) -> bool, read: Vec<(u64, u64)>, zero: Vec<(u64, u64)> },
}

struct Row {
    name: &'static str,
    prev: Option<CommittedDisk>,
    cur: CurrentDisk,
    changes: Changes,
    dest: Destination,
    want: Want,
    /// The taint the commit must carry.
    taint: Option<Taint>,
}

fn check(row: Row) -> Planned {
    let planned = plan(row.prev.as_ref(), &row.cur, &row.changes, row.dest);
    let name = row.name;
    match (&planned.plan, row.want) {
        (CopyPlan::Incremental { read, zero, .. }, Want::Incremental { read: r, zero: z }) => {
            assert_eq!(*read, set(&r), "{name}: read");
            assert_eq!(*zero, set(&z), "{name}: zero");
        }
        (CopyPlan::Full { reason, read, zero, .. }, Want::Full { reason: is, read: r, zero: z }) => {
            assert!(is(reason), "{name}: wrong reason {reason:?} ({reason})");
            assert_eq!(*read, set(&r), "{name}: read");
            assert_eq!(*zero, set(&z), "{name}: zero");
        }
        (got, _) => panic!("{name}: unexpected plan {got:?}"),
    }
    assert_eq!(planned.commit.taint, row.taint, "{name}: taint");
    assert_eq!(planned.commit.change_id, row.cur.change_id, "{name}: commit's change ID");
    planned
}

/// Everything allocated, on a 64 MiB disk: what a full copy of `cur()` reads.
fn allocated() -> Vec<(u64, u64)> {
    vec![(0, 16 * MIB), (40 * MIB, 8 * MIB)]
}

/// Everything unallocated: what a full copy onto a destination with data zeroes.
fn unallocated() -> Vec<(u64, u64)> {
    vec![(16 * MIB, 24 * MIB), (48 * MIB, 16 * MIB)]
}

#[test]
fn every_reason_and_shape() {
    let changed = areas(&[(MIB, 4096), (41 * MIB, MIB)]);
    let rows = vec![
        Row {
            name: "incremental reads changed and allocated, widened to 4 MiB",
            prev: Some(prev()),
            cur: cur(),
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Incremental { read: vec![(0, 4 * MIB), (40 * MIB, 4 * MIB)], zero: vec![] },
            taint: None,
        },
        Row {
            name: "incremental at 4 KiB granularity stays tight",
            prev: Some(prev()),
            cur: cur(),
            changes: changed.clone(),
            dest: dest(4096, true),
            want: Want::Incremental { read: vec![(MIB, 4096), (41 * MIB, MIB)], zero: vec![] },
            taint: None,
        },
        Row {
            name: "whole unmapped granules become zeros; a granule partly unmapped is read",
            prev: Some(prev()),
            cur: cur(),
            // 14..22 MiB changed: 14..16 is allocated, 16..22 was trimmed. The granule 16..20
            // is wholly trimmed (zeros); 20..24 is partly unchanged, so it is read instead.
            changes: areas(&[(14 * MIB, 8 * MIB)]),
            dest: dest(4 * MIB, true),
            want: Want::Incremental {
                read: vec![(12 * MIB, 4 * MIB), (20 * MIB, 4 * MIB)],
                zero: vec![(16 * MIB, 4 * MIB)],
            },
            taint: None,
        },
        Row {
            name: "unknown allocation: read every changed byte, zero nothing",
            prev: Some(prev()),
            cur: CurrentDisk { allocated: None, ..cur() },
            changes: areas(&[(20 * MIB, MIB)]),
            dest: dest(4 * MIB, true),
            want: Want::Incremental { read: vec![(20 * MIB, 4 * MIB)], zero: vec![] },
            taint: None,
        },
        Row {
            name: "nothing changed: an empty incremental",
            prev: Some(prev()),
            cur: cur(),
            changes: areas(&[]),
            dest: dest(4 * MIB, true),
            want: Want::Incremental { read: vec![], zero: vec![] },
            taint: None,
        },
        Row {
            name: "first copy onto an empty destination: allocated only, no zeros",
            prev: None,
            cur: cur(),
            changes: Changes::NotQueried,
            dest: dest(4 * MIB, false),
            want: Want::Full { reason: |r| *r == FullReason::NoPreviousState, read: allocated(), zero: vec![] },
            taint: None,
        },
        Row {
            name: "full copy onto a destination that holds data zeroes all that is unallocated",
            prev: None,
            cur: cur(),
            changes: Changes::NotQueried,
            dest: dest(4 * MIB, true),
            want: Want::Full { reason: |r| *r == FullReason::NoPreviousState, read: allocated(), zero: unallocated() },
            taint: None,
        },
        Row {
            name: "a full copy is widened to the granularity too",
            prev: None,
            cur: CurrentDisk { allocated: Some(set(&[(MIB, 1), (63 * MIB, MIB)])), ..cur() },
            changes: Changes::NotQueried,
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::NoPreviousState,
                read: vec![(0, 4 * MIB), (60 * MIB, 4 * MIB)],
                zero: vec![(4 * MIB, 56 * MIB)],
            },
            taint: None,
        },
        Row {
            name: "unknown allocation on a full copy reads everything",
            prev: None,
            cur: CurrentDisk { allocated: None, ..cur() },
            changes: Changes::NotQueried,
            dest: dest(4 * MIB, true),
            want: Want::Full { reason: |r| *r == FullReason::NoPreviousState, read: vec![(0, CAP)], zero: vec![] },
            taint: None,
        },
        Row {
            name: "state exists but the destination was emptied",
            prev: Some(prev()),
            cur: cur(),
            changes: changed.clone(),
            dest: dest(4 * MIB, false),
            want: Want::Full { reason: |r| *r == FullReason::DestinationEmpty, read: allocated(), zero: vec![] },
            taint: None,
        },
        Row {
            name: "CBT off now",
            prev: Some(prev()),
            cur: CurrentDisk { change_id: None, ..cur() },
            changes: Changes::NotQueried,
            dest: dest(4 * MIB, true),
            want: Want::Full { reason: |r| *r == FullReason::NoChangeId, read: allocated(), zero: unallocated() },
            taint: None,
        },
        Row {
            name: "previous copy had no change ID",
            prev: Some(CommittedDisk { change_id: None, ..prev() }),
            cur: cur(),
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::NoPreviousChangeId,
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "hardware version below 7",
            prev: Some(prev()),
            cur: CurrentDisk { hardware_version: 4, ..cur() },
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::HardwareVersionTooOld { version: 4 },
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "epoch changed (CBT reset)",
            prev: Some(prev()),
            cur: CurrentDisk { change_id: id(2, 1), ..cur() },
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::EpochChanged { previous: epoch(1), current: epoch(2) },
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "sequence went backwards in the same epoch",
            prev: Some(prev()),
            cur: CurrentDisk { change_id: id(1, 2), ..cur() },
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| matches!(r, FullReason::ChangeIdRegressed { .. }),
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "capacity changed (below the 128 GiB boundary: no taint)",
            prev: Some(CommittedDisk { capacity: 32 * MIB, ..prev() }),
            cur: CurrentDisk { host_version: host(5), ..cur() },
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::CapacityChanged { previous: 32 * MIB, current: CAP },
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "controller changed",
            prev: Some(CommittedDisk { position: slot(1), ..prev() }),
            cur: cur(),
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| matches!(r, FullReason::ControllerChanged { .. }),
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "backing changed",
            prev: Some(CommittedDisk { backing: "[ds2] vm/vm.vmdk".into(), ..prev() }),
            cur: cur(),
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| matches!(r, FullReason::BackingChanged { .. }),
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "VM reverted to a snapshot",
            prev: Some(prev()),
            cur: CurrentDisk { reverted: true, ..cur() },
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::RevertedToSnapshot,
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "query fault (FileFault)",
            prev: Some(prev()),
            cur: cur(),
            changes: Changes::Fault(QueryFault { fault: "FileFault".into(), message: "ctk invalid".into() }),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| matches!(r, FullReason::QueryFault(_)),
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "changes not queried",
            prev: Some(prev()),
            cur: cur(),
            changes: Changes::NotQueried,
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| *r == FullReason::ChangesNotQueried,
                read: allocated(),
                zero: unallocated(),
            },
            taint: None,
        },
        Row {
            name: "opaque change IDs never force a full copy by themselves",
            prev: Some(CommittedDisk { change_id: Some(ChangeId::parse("vendor-7")), ..prev() }),
            cur: CurrentDisk { change_id: Some(ChangeId::parse("vendor-8")), ..cur() },
            changes: changed.clone(),
            dest: dest(4 * MIB, true),
            want: Want::Incremental { read: vec![(0, 4 * MIB), (40 * MIB, 4 * MIB)], zero: vec![] },
            taint: None,
        },
    ];
    for row in rows {
        check(row);
    }
}

#[test]
fn a_tainted_epoch_forces_full_copies_until_cbt_is_reset() {
    // A 100 GiB disk on ESXi 5.5 grows to 200 GiB, across the 128 GiB boundary.
    let old = CommittedDisk { capacity: 100 * GIB, host_version: host(5), ..prev() };
    let grown = CurrentDisk { capacity: 200 * GIB, host_version: host(5), allocated: None, ..cur() };
    let taint = Some(Taint { epoch: Some(epoch(1)), boundary: 128 * GIB, grown_from: Some(100 * GIB), host: host(5) });
    let first = check(Row {
        name: "the growth itself",
        prev: Some(old),
        cur: grown.clone(),
        changes: areas(&[]),
        dest: dest(4 * MIB, true),
        want: Want::Full {
            reason: |r| matches!(r, FullReason::CapacityChanged { .. }),
            read: vec![(0, 200 * GIB)],
            zero: vec![],
        },
        taint: taint.clone(),
    });

    // Later snapshots in the same epoch: still full, even with a clean query and a new host.
    let mut committed = first.commit;
    for (seq, major) in [(7, 5), (8, 6), (9, 8)] {
        let next = check(Row {
            name: "a later snapshot in the tainted epoch",
            prev: Some(committed.clone()),
            cur: CurrentDisk { change_id: id(1, seq), host_version: host(major), ..grown.clone() },
            changes: areas(&[(0, 4096)]),
            dest: dest(4 * MIB, true),
            want: Want::Full {
                reason: |r| matches!(r, FullReason::TaintedEpoch(_)),
                read: vec![(0, 200 * GIB)],
                zero: vec![],
            },
            taint: taint.clone(),
        });
        committed = next.commit;
    }

    // CBT reset: a new epoch. One full copy for the epoch change, and the taint is gone.
    let reset = check(Row {
        name: "the CBT reset",
        prev: Some(committed),
        cur: CurrentDisk { change_id: id(2, 1), ..grown.clone() },
        changes: Changes::NotQueried,
        dest: dest(4 * MIB, true),
        want: Want::Full {
            reason: |r| matches!(r, FullReason::EpochChanged { .. }),
            read: vec![(0, 200 * GIB)],
            zero: vec![],
        },
        taint: None,
    });
    check(Row {
        name: "incremental again after the reset",
        prev: Some(reset.commit),
        cur: CurrentDisk { change_id: id(2, 2), ..grown },
        changes: areas(&[(GIB, 4096)]),
        dest: dest(4 * MIB, true),
        want: Want::Incremental { read: vec![(GIB, 4 * MIB)], zero: vec![] },
        taint: None,
    });
}

#[test]
fn crossing_a_boundary_on_a_fixed_host_does_not_taint() {
    let old = CommittedDisk { capacity: 100 * GIB, host_version: host(6), ..prev() };
    let grown = CurrentDisk { capacity: 300 * GIB, host_version: host(7), allocated: None, ..cur() };
    let p = check(Row {
        name: "growth on 6.x and 7.x hosts",
        prev: Some(old),
        cur: grown.clone(),
        changes: Changes::NotQueried,
        dest: dest(4 * MIB, true),
        want: Want::Full {
            reason: |r| matches!(r, FullReason::CapacityChanged { .. }),
            read: vec![(0, 300 * GIB)],
            zero: vec![],
        },
        taint: None,
    });
    check(Row {
        name: "next run is incremental",
        prev: Some(p.commit),
        cur: CurrentDisk { change_id: id(1, 7), ..grown },
        changes: areas(&[(0, 1)]),
        dest: dest(4 * MIB, true),
        want: Want::Incremental { read: vec![(0, 4 * MIB)], zero: vec![] },
        taint: None,
    });
}

#[test]
fn a_large_disk_first_seen_on_an_affected_host_is_tainted_until_reset() {
    let big = CurrentDisk { capacity: 300 * GIB, host_version: host(5), allocated: None, ..cur() };
    let first = plan(None, &big, &Changes::NotQueried, dest(4 * MIB, false));
    let taint = Some(Taint { epoch: Some(epoch(1)), boundary: 256 * GIB, grown_from: None, host: host(5) });
    assert_eq!(first.commit.taint, taint);
    check(Row {
        name: "next snapshot, same epoch",
        prev: Some(first.commit),
        cur: CurrentDisk { change_id: id(1, 7), ..big.clone() },
        changes: areas(&[]),
        dest: dest(4 * MIB, true),
        want: Want::Full {
            reason: |r| matches!(r, FullReason::TaintedEpoch(t) if t.grown_from.is_none()),
            read: vec![(0, 300 * GIB)],
            zero: vec![],
        },
        taint,
    });
    // The same disk first seen on a fixed host is trusted.
    let modern = CurrentDisk { host_version: host(6), ..big };
    assert_eq!(plan(None, &modern, &Changes::NotQueried, dest(4 * MIB, false)).commit.taint, None);
}

#[test]
fn an_unknown_host_version_is_treated_as_affected_and_says_so() {
    let old = CommittedDisk { capacity: 100 * GIB, host_version: None, ..prev() };
    let grown = CurrentDisk { capacity: 130 * GIB, host_version: None, allocated: None, ..cur() };
    let p = plan(Some(&old), &grown, &Changes::NotQueried, dest(4 * MIB, true));
    assert!(p.commit.taint.is_some());
    assert!(p.warnings.contains(&cbt::CbtWarning::UnknownHostVersion));
}

#[test]
fn serde_round_trip_of_committed_state() {
    let state = CommittedDisk {
        taint: Some(Taint { epoch: Some(epoch(3)), boundary: 256 * GIB, grown_from: None, host: host(5) }),
        ..prev()
    };
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"01 01 01 01 01 01 01 01-01 01 01 01 01 01 01 01/5\""), "{json}");
    let back: CommittedDisk = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
}

#[test]
fn an_allocation_map_past_the_disk_is_cut_and_reported() {
    let current = CurrentDisk { allocated: Some(set(&[(60 * MIB, 8 * MIB)])), ..cur() };
    let p = plan(None, &current, &Changes::NotQueried, dest(4 * MIB, false));
    assert_eq!(*p.plan.read(), set(&[(60 * MIB, 4 * MIB)]));
    assert_eq!(
        p.warnings,
        [cbt::CbtWarning::AreaPastCapacity { start: 60 * MIB, end: u128::from(68 * MIB), capacity: CAP }]
    );
}

#[test]
fn a_change_id_repeated_under_a_new_snapshot_is_a_full_copy() {
    // A vCenter restart handed back the committed change ID under a new snapshot: the changes
    // since it cannot be trusted, whatever the query says.
    let repeated = CurrentDisk { change_id: id(1, 5), fresh_snapshot: true, ..cur() };
    check(Row {
        name: "same change ID under a new snapshot",
        prev: Some(prev()),
        cur: repeated.clone(),
        changes: areas(&[]),
        dest: dest(4 * MIB, true),
        want: Want::Full {
            reason: |r| matches!(r, FullReason::ChangeIdRepeated(_)),
            read: allocated(),
            zero: unallocated(),
        },
        taint: None,
    });
    // Planned against the live disks (no new snapshot) the same ID is no warning sign.
    check(Row {
        name: "same change ID without a new snapshot",
        prev: Some(prev()),
        cur: CurrentDisk { fresh_snapshot: false, ..repeated },
        changes: areas(&[]),
        dest: dest(4 * MIB, true),
        want: Want::Incremental { read: vec![], zero: vec![] },
        taint: None,
    });
    // An opaque ID repeated is caught too.
    let opaque = Some(ChangeId::parse("opaque-change-id"));
    let p = plan(
        Some(&CommittedDisk { change_id: opaque.clone(), ..prev() }),
        &CurrentDisk { change_id: opaque, fresh_snapshot: true, ..cur() },
        &areas(&[]),
        dest(4 * MIB, true),
    );
    assert!(matches!(p.plan.full_reason(), Some(FullReason::ChangeIdRepeated(_))), "{:?}", p.plan);
}

#[test]
fn a_forced_copy_is_full_with_its_reason_named() {
    for forced in [Forced::CbtReset, Forced::CbtTurnedOn, Forced::RestoredInPlace] {
        let p = plan(
            Some(&prev()),
            &CurrentDisk { forced: Some(forced), fresh_snapshot: true, ..cur() },
            &Changes::NotQueried,
            dest(4 * MIB, true),
        );
        assert_eq!(p.plan.full_reason(), Some(&FullReason::Forced(forced)));
        let why = p.plan.full_reason().unwrap().to_string();
        assert!(why.contains("CBT") || why.contains("restored in place"), "the reason is named: {why}");
    }
}

#[test]
fn a_reset_never_taints_the_new_epoch() {
    // A 256 GiB disk whose old epoch was tainted on an old host, now on 6.5: after the reset
    // (a new epoch, or one an opaque ID hides) the copy is full and the new epoch is clean.
    let tainted = CommittedDisk {
        capacity: 256 * GIB,
        taint: Some(Taint { epoch: None, boundary: 256 * GIB, grown_from: None, host: host(5) }),
        change_id: Some(ChangeId::parse("opaque-before")),
        ..prev()
    };
    let big = CurrentDisk { capacity: 256 * GIB, host_version: host(6), allocated: None, ..cur() };
    let reset = CurrentDisk {
        change_id: Some(ChangeId::parse("opaque-after")),
        forced: Some(Forced::CbtReset),
        fresh_snapshot: true,
        ..big.clone()
    };
    let first = plan(Some(&tainted), &reset, &Changes::NotQueried, dest(4 * MIB, true));
    assert_eq!(first.plan.full_reason(), Some(&FullReason::Forced(Forced::CbtReset)));
    assert_eq!(first.commit.taint, None, "the reset ends the taint");
    let next = CurrentDisk { change_id: Some(ChangeId::parse("opaque-later")), fresh_snapshot: true, ..big };
    let second = plan(Some(&first.commit), &next, &areas(&[(0, 1)]), dest(4 * MIB, true));
    assert!(matches!(second.plan, CopyPlan::Incremental { .. }), "{:?}", second.plan);
}

#[test]
fn a_large_disk_on_a_known_modern_host_gets_incrementals() {
    let big = CurrentDisk { capacity: 256 * GIB, host_version: host(6), allocated: None, ..cur() };
    let first = plan(None, &big, &Changes::NotQueried, dest(4 * MIB, false));
    assert_eq!(first.commit.taint, None);
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let next = CurrentDisk { change_id: id(1, 7), fresh_snapshot: true, ..big };
    let second = plan(Some(&first.commit), &next, &areas(&[(0, 1)]), dest(4 * MIB, true));
    assert!(matches!(second.plan, CopyPlan::Incremental { .. }), "{:?}", second.plan);
}
