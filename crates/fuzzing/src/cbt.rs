//! Fuzz entry points for the `cbt` crate: the change-ID parser, and changed-area paging plus the
//! copy planner checked against the naive models of `cbt::oracle`.
//!
//! Each entry point takes raw bytes and panics on a violated promise, which is what libFuzzer
//! reports; `cargo test` runs the same functions on pseudo-random bytes and on the corpora.
#![expect(clippy::cast_possible_wrap, reason = "units are at most 2^30 bytes, which fits i64")]

use std::num::NonZeroU64;

use arbitrary::{Arbitrary, Unstructured};
use cbt::oracle::{
    BlockModel, SimDisk, SimEvent, naive_allows_incremental, naive_geometry, plan_violation, split_violation,
};
use cbt::{
    ChangeId, ChangeIdKind, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskChangeExtent,
    DiskChangeInfo, DiskPosition, Epoch, ExtentSet, HostVersion, QueryFault, Taint, accumulate, plan,
};

/// Parses arbitrary text as a changed-areas list: never panics, and what parses lies within
/// the disk and is no more areas than the text has lines.
pub fn areas(data: &[u8]) {
    let (cap, text) = data.split_at(data.len().min(8));
    let mut c = [0u8; 8];
    c[..cap.len()].copy_from_slice(cap);
    let capacity = u64::from_le_bytes(c);
    let text = String::from_utf8_lossy(text);
    if let Ok(set) = cbt::parse_areas(&text, capacity) {
        assert!(set.end() <= capacity);
        assert!(set.len() <= text.lines().count());
    }
}

/// Parses arbitrary text as a change ID: never panics, keeps the text, and a parsed ID spelled
/// VMware's way parses back to itself.
pub fn change_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let id = ChangeId::parse(&text);
    assert_eq!(id.as_str(), text, "the text must be kept verbatim");
    match id.kind() {
        ChangeIdKind::Tracked { epoch, sequence } => {
            let canonical = ChangeId::tracked(*epoch, *sequence);
            assert_eq!(ChangeId::parse(canonical.as_str()), id);
            assert!(id.warning().is_none());
        }
        ChangeIdKind::AllAllocated => assert_eq!(text.trim_ascii(), "*"),
        ChangeIdKind::Opaque(reason) => {
            assert!(reason.column <= text.len());
            assert!(id.warning().is_some());
            assert_eq!(id, ChangeId::parse(&text), "an opaque ID equals itself");
        }
    }
    let json = serde_json::to_string(&id).expect("a change ID serialises");
    let back: ChangeId = serde_json::from_str(&json).expect("and reads back");
    assert_eq!(back.as_str(), id.as_str());
}

/// A page as the fuzzer describes it: in units, or raw `xsd:long` values from a hostile server.
#[derive(Debug, Arbitrary)]
enum PageSpec {
    Units { window: u8, areas: Vec<(u16, u8)> },
    Raw { start: i64, length: i64, areas: Vec<(i64, i64)> },
}

/// A change ID drawn from a small space, so that equal epochs and sequences happen often.
#[derive(Debug, Arbitrary)]
enum IdSpec {
    None,
    Star,
    Tracked { epoch: u8, sequence: u8 },
    Opaque(u8),
}

impl IdSpec {
    fn build(&self) -> Option<ChangeId> {
        match *self {
            Self::None => None,
            Self::Star => Some(ChangeId::all_allocated()),
            Self::Tracked { epoch, sequence } => {
                Some(ChangeId::tracked(Epoch::from_bytes([epoch % 3; 16]), u64::from(sequence % 4)))
            }
            Self::Opaque(n) => Some(ChangeId::parse(&format!("opaque-{}", n % 3))),
        }
    }
}

/// One planning problem: the committed state, the disk now, the pages of the answer.
#[derive(Debug, Arbitrary)]
struct PlanInput {
    unit_shift: u8,
    capacity_units: u16,
    granularity_units: u8,
    holds_data: bool,
    previous: Option<PreviousSpec>,
    current_id: IdSpec,
    hardware_version: u8,
    host_major: Option<u8>,
    slot: u8,
    backing: bool,
    reverted: bool,
    allocated: Option<Vec<(u16, u8)>>,
    query: QuerySpec,
}

#[derive(Debug, Arbitrary)]
struct PreviousSpec {
    id: IdSpec,
    capacity_delta: i8,
    slot: u8,
    backing: bool,
    host_major: Option<u8>,
    taint: Option<Option<u8>>,
}

#[derive(Debug, Arbitrary)]
enum QuerySpec {
    NotQueried,
    Fault,
    Pages(Vec<PageSpec>),
}

/// Pages accumulated and a plan made from arbitrary states: the plan keeps its structural
/// promises, agrees with the naive decision rule, and (when the input is unit-aligned) equals
/// the naive per-granule geometry. Then the remaining bytes drive the CBT simulator.
pub fn plan_and_accumulate(data: &[u8]) {
    let mut u = Unstructured::new(data);
    if let Ok(input) = PlanInput::arbitrary(&mut u) {
        check_plan(&input);
    }
    if let Ok(events) = sim_events(&mut u) {
        run_sim(&events);
    }
}

fn check_plan(input: &PlanInput) {
    let unit = 1u64 << (input.unit_shift % 31);
    let units = usize::from(input.capacity_units % 1024);
    let capacity = units as u64 * unit;
    let g_units = u64::from(input.granularity_units % 9).max(1);
    let granularity = NonZeroU64::new(g_units * unit).expect("non-zero");
    let ranges =
        |v: &[(u16, u8)]| ExtentSet::from_ranges(v.iter().map(|&(s, l)| (u64::from(s) * unit, u64::from(l) * unit)));
    let allocated = input.allocated.as_deref().map(ranges);
    let host = |m: Option<u8>| m.map(|m| HostVersion { major: u32::from(m % 9), minor: 0, patch: 0 });
    let position = |slot: u8| DiskPosition { controller: "scsi".into(), bus: 0, unit: u32::from(slot % 2) };
    let backing = |b: bool| if b { "[ds1] a.vmdk" } else { "[ds1] b.vmdk" }.to_owned();
    let current = CurrentDisk {
        change_id: input.current_id.build(),
        capacity,
        hardware_version: u32::from(input.hardware_version % 12),
        host_version: host(input.host_major),
        position: position(input.slot),
        backing: backing(input.backing),
        allocated: allocated.clone(),
        reverted: input.reverted,
        fresh_snapshot: false,
        forced: None,
    };
    let previous = input.previous.as_ref().map(|p| CommittedDisk {
        change_id: p.id.build(),
        capacity: capacity.saturating_add_signed(i64::from(p.capacity_delta % 2) << 37),
        hardware_version: 13,
        position: position(p.slot),
        backing: backing(p.backing),
        host_version: host(p.host_major),
        taint: p.taint.map(|e| Taint {
            epoch: e.map(|e| Epoch::from_bytes([e % 3; 16])),
            boundary: cbt::BOUNDARY_BUG_BASE,
            grown_from: None,
            host: None,
        }),
    });
    let mut aligned = true;
    let changes = match &input.query {
        QuerySpec::NotQueried => Changes::NotQueried,
        QuerySpec::Fault => Changes::Fault(QueryFault { fault: "FileFault".into(), message: "fuzz".into() }),
        QuerySpec::Pages(specs) => {
            let mut offset: i64 = 0;
            let mut pages = Vec::with_capacity(specs.len());
            for spec in specs {
                let page = match spec {
                    PageSpec::Units { window, areas } => {
                        let start = offset;
                        let length = i64::from(*window) * unit as i64;
                        let area = |&(s, l): &(u16, u8)| DiskChangeExtent {
                            start: i64::from(s) * unit as i64,
                            length: i64::from(l) * unit as i64,
                        };
                        DiskChangeInfo { start_offset: start, length, changed_area: areas.iter().map(area).collect() }
                    }
                    PageSpec::Raw { start, length, areas } => {
                        aligned = false;
                        let area = |&(start, length): &(i64, i64)| DiskChangeExtent { start, length };
                        DiskChangeInfo {
                            start_offset: *start,
                            length: *length,
                            changed_area: areas.iter().map(area).collect(),
                        }
                    }
                };
                offset = page.start_offset.saturating_add(page.length);
                pages.push(page);
            }
            match accumulate(capacity, &pages) {
                Ok(areas) => Changes::Areas(areas),
                Err(e) => Changes::Fault(e.into()),
            }
        }
    };
    let dest = Destination { granularity, holds_data: input.holds_data };
    let planned = plan(previous.as_ref(), &current, &changes, dest);
    if let Some(v) = plan_violation(&planned, &current, &changes, dest) {
        panic!("plan broke a promise: {v}\ninput {input:?}\nplan {planned:?}");
    }
    let incremental = matches!(planned.plan, CopyPlan::Incremental { .. });
    assert_eq!(
        incremental,
        naive_allows_incremental(previous.as_ref(), &current, &changes, dest),
        "planner and naive rule disagree: {planned:?}"
    );
    if let Some(v) = split_violation(planned.plan.read(), granularity) {
        panic!("split: {v}");
    }
    if aligned {
        let changed = match &changes {
            Changes::Areas(a) => a.areas.clone(),
            _ => ExtentSet::new(),
        };
        let model = |s: &ExtentSet| BlockModel::from_set(s, units, unit);
        let alloc_model = allocated.as_ref().map(model);
        let (read, zero) = naive_geometry(
            !incremental,
            &model(&changed),
            alloc_model.as_ref(),
            usize::try_from(g_units).unwrap_or(1),
            input.holds_data,
        );
        assert_eq!(planned.plan.read(), &read.to_set(), "read differs from the naive model");
        assert_eq!(planned.plan.zero(), &zero.to_set(), "zero differs from the naive model");
    }
}

/// A sequence of events for the simulator, from the fuzzer's bytes.
fn sim_events(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<SimEvent>> {
    let mut events = Vec::new();
    while !u.is_empty() && events.len() < 200 {
        let event = match u.int_in_range(0..=9u8)? {
            0..=2 => SimEvent::Write(usize::from(u.arbitrary::<u16>()?)),
            3 => SimEvent::Unmap(usize::from(u.arbitrary::<u16>()?)),
            4 => SimEvent::Grow(usize::from(u.int_in_range(1..=200u16)?)),
            5 => match u.int_in_range(0..=3u8)? {
                0 => SimEvent::ResetCbt,
                1 => SimEvent::Revert,
                2 => SimEvent::WipeDestination,
                _ => SimEvent::MoveSlot,
            },
            6 => SimEvent::MoveToHost(HostVersion { major: u.int_in_range(5..=8)?, minor: 0, patch: 0 }),
            _ => SimEvent::Backup {
                query_fails: u.ratio(1, 8)?,
                page_units: usize::from(u.int_in_range(1..=64u8)?),
                allocation_known: u.arbitrary()?,
            },
        };
        events.push(event);
    }
    Ok(events)
}

/// Runs a simulated disk through `events` with 1 GiB units, so that capacities of a few hundred
/// units cross the 128 GiB boundaries; panics if the destination ever differs from the disk.
pub fn run_sim(events: &[SimEvent]) {
    let host = HostVersion { major: 5, minor: 5, patch: 0 };
    let mut disk = SimDisk::new(100, 1 << 30, 2, host);
    for (i, event) in events.iter().enumerate() {
        if let Err(e) = disk.apply(event) {
            panic!("event {i} {event:?} of {events:?}: {e}");
        }
    }
}
