//! Naive models that property tests and fuzz targets check the real code against.
//!
//! [`BlockModel`] is one boolean per unit of a small disk: every set operation is a loop over it,
//! too slow for use and too simple to be wrong. [`naive_geometry`] classifies each destination
//! granule by looking at its units. [`SimDisk`] is a toy disk with CBT that behaves the way
//! vSphere's does, failure modes included (resets, reverts, the 128 GiB boundary bug): a planner
//! driven by it must always leave the destination identical to the disk.
//!
//! Compiled only for tests and with the `test-utils` feature; nothing here is for production.
#![expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "the models are small simulated disks (thousands of units of at most 1 GiB), where unit counts fit usize and byte offsets fit i64"
)]

use std::num::NonZeroU64;

use crate::{
    ChangeAccumulator, ChangeId, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskChangeExtent,
    DiskChangeInfo, DiskPosition, Epoch, ExtentSet, HostVersion, Planned, QueryFault, incremental_base, plan,
};

/// One boolean per unit of `unit` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockModel {
    /// The unit, in bytes, that one boolean stands for.
    pub unit: u64,
    /// Whether each unit is in the set.
    pub bits: Vec<bool>,
}

impl BlockModel {
    /// An empty model of `len` units.
    pub fn empty(len: usize, unit: u64) -> Self {
        Self { unit, bits: vec![false; len] }
    }

    /// The units whose first byte `set` contains (exact for sets aligned to the unit).
    pub fn from_set(set: &ExtentSet, len: usize, unit: u64) -> Self {
        let bits = (0..len).map(|i| set.contains(i as u64 * unit)).collect();
        Self { unit, bits }
    }

    /// The model as an extent set, in bytes.
    pub fn to_set(&self) -> ExtentSet {
        let ranges = self.bits.iter().enumerate().filter(|(_, b)| **b);
        ExtentSet::from_ranges(ranges.map(|(i, _)| (i as u64 * self.unit, self.unit)))
    }

    /// The number of units.
    pub fn len(&self) -> usize {
        self.bits.len()
    }

    /// Whether the model has no units.
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    fn zip(&self, other: &Self, f: impl Fn(bool, bool) -> bool) -> Self {
        let bits = self.bits.iter().zip(&other.bits).map(|(a, b)| f(*a, *b)).collect();
        Self { unit: self.unit, bits }
    }

    /// Units in either.
    pub fn union(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a || b)
    }

    /// Units in both.
    pub fn intersection(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a && b)
    }

    /// Units in `self` and not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a && !b)
    }

    /// Units not in `self`.
    pub fn complement(&self) -> Self {
        Self { unit: self.unit, bits: self.bits.iter().map(|b| !b).collect() }
    }

    /// Fills every run of unset units lying between two set units that is shorter than
    /// `threshold` units.
    pub fn coalesce_gaps_below(&self, threshold: usize) -> Self {
        let mut bits = self.bits.clone();
        let mut last_set: Option<usize> = None;
        for i in 0..bits.len() {
            if self.bits[i] {
                if let Some(j) = last_set
                    && i - j - 1 < threshold
                {
                    bits[j + 1..i].iter_mut().for_each(|b| *b = true);
                }
                last_set = Some(i);
            }
        }
        Self { unit: self.unit, bits }
    }

    /// Each granule of `g` units (the last may be short) is set if any unit in it is.
    pub fn align_outward(&self, g: usize) -> Self {
        self.by_granule(g, |granule| granule.iter().any(|b| *b))
    }

    /// Each granule of `g` units (the last may be short) is set if every unit in it is.
    pub fn align_inward(&self, g: usize) -> Self {
        self.by_granule(g, |granule| granule.iter().all(|b| *b))
    }

    fn by_granule(&self, g: usize, keep: impl Fn(&[bool]) -> bool) -> Self {
        let mut bits = Vec::with_capacity(self.bits.len());
        for granule in self.bits.chunks(g.max(1)) {
            bits.extend(std::iter::repeat_n(keep(granule), granule.len()));
        }
        Self { unit: self.unit, bits }
    }
}

/// How the naive model classifies each granule of a planned copy.
///
/// Incremental: a granule wholly changed-and-unallocated is zeroed; any other granule with a
/// changed unit is read. Full: a granule with an allocated unit is read; when the destination
/// holds data, every other granule is zeroed. Unknown allocation means "all allocated".
pub fn naive_geometry(
    full: bool,
    changed: &BlockModel,
    allocated: Option<&BlockModel>,
    g: usize,
    holds_data: bool,
) -> (BlockModel, BlockModel) {
    let len = changed.len();
    let all = BlockModel { unit: changed.unit, bits: vec![true; len] };
    let allocated = allocated.unwrap_or(&all);
    let mut read = BlockModel::empty(len, changed.unit);
    let mut zero = BlockModel::empty(len, changed.unit);
    for start in (0..len).step_by(g.max(1)) {
        let end = (start + g.max(1)).min(len);
        let units = start..end;
        let (is_read, is_zero) = if full {
            let any_alloc = units.clone().any(|i| allocated.bits[i]);
            (any_alloc, !any_alloc && holds_data)
        } else {
            let all_unmapped = units.clone().all(|i| changed.bits[i] && !allocated.bits[i]);
            let any_changed = units.clone().any(|i| changed.bits[i]);
            (any_changed && !all_unmapped, all_unmapped)
        };
        for i in units {
            read.bits[i] = is_read;
            zero.bits[i] = is_zero;
        }
    }
    (read, zero)
}

/// Checks what [`ExtentSet::split`] produced: the pieces tile the set exactly, in order, each at
/// most `max_len` bytes, none crossing a multiple of `max_len`. Returns the first violation.
pub fn split_violation(set: &ExtentSet, max_len: NonZeroU64) -> Option<String> {
    let max = max_len.get();
    let pieces: Vec<_> = set.split(max_len).collect();
    for w in pieces.windows(2) {
        if w[0].end() > w[1].start() {
            return Some(format!("pieces {:?} and {:?} overlap or are out of order", w[0], w[1]));
        }
    }
    for p in &pieces {
        if p.len() > max {
            return Some(format!("piece {p:?} is longer than {max}"));
        }
        if p.start() / max != (p.end() - 1) / max {
            return Some(format!("piece {p:?} crosses a multiple of {max}"));
        }
    }
    let rejoined = ExtentSet::from_extents(pieces.iter().copied());
    (rejoined != *set).then(|| format!("pieces {pieces:?} do not rejoin into {set:?}"))
}

/// The structural promises of any plan: whole granules, disjoint, inside the disk; on an
/// incremental, every changed and allocated byte is read.
pub fn plan_violation(
    planned: &Planned,
    current: &CurrentDisk,
    changes: &Changes,
    dest: Destination,
) -> Option<String> {
    let capacity = current.capacity;
    let (read, zero) = (planned.plan.read(), planned.plan.zero());
    if read.end() > capacity || zero.end() > capacity {
        return Some(format!("plan runs past the capacity {capacity}: read {read:?} zero {zero:?}"));
    }
    if !read.intersection(zero).is_empty() {
        return Some(format!("read {read:?} and zero {zero:?} overlap"));
    }
    for set in [read, zero] {
        if set.align_outward(dest.granularity, capacity) != *set {
            return Some(format!("{set:?} is not whole granules of {}", dest.granularity));
        }
    }
    let (fetch, keep) = (planned.plan.fetch(), planned.plan.keep());
    if !fetch.difference(read).is_empty() || !keep.difference(read).is_empty() {
        return Some(format!("fetch {fetch:?} or keep {keep:?} reaches outside read {read:?}"));
    }
    if !fetch.intersection(keep).is_empty() {
        return Some(format!("fetch {fetch:?} and keep {keep:?} overlap"));
    }
    let alloc = current.allocated.clone().unwrap_or_else(|| ExtentSet::full(capacity));
    if !fetch.difference(&alloc).is_empty() {
        return Some(format!("fetch {fetch:?} reads unallocated bytes"));
    }
    if let CopyPlan::Full { .. } = &planned.plan
        && *fetch != alloc.clamp(capacity)
    {
        return Some(format!("a full copy fetches {fetch:?}, not the allocated bytes"));
    }
    if let (CopyPlan::Incremental { .. }, Changes::Areas(changed)) = (&planned.plan, changes) {
        let changed = changed.areas.clamp(capacity);
        if *fetch != changed.intersection(&alloc) || *keep != read.difference(&changed) {
            return Some(format!("fetch {fetch:?} is not the changed data, or keep {keep:?} not the unchanged"));
        }
    }
    if let (CopyPlan::Incremental { .. }, Changes::Areas(changed)) = (&planned.plan, changes) {
        let alloc = current.allocated.clone().unwrap_or_else(|| ExtentSet::full(capacity));
        let must = changed.areas.clamp(capacity).intersection(&alloc);
        if !must.difference(read).is_empty() {
            return Some(format!("changed and allocated bytes {:?} are not read", must.difference(read)));
        }
        let covered = read.union(zero);
        if !changed.areas.clamp(capacity).difference(&covered).is_empty() {
            return Some("changed bytes are neither read nor zeroed".into());
        }
    }
    if planned.commit.capacity != capacity
        || planned.commit.change_id != current.change_id.clone().filter(|c| !c.is_all_allocated())
    {
        return Some("the commit does not describe the current disk".into());
    }
    None
}

/// One thing that happens to a simulated disk between backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEvent {
    /// The guest writes this unit (wrapped to the capacity).
    Write(usize),
    /// The guest trims this unit (wrapped to the capacity).
    Unmap(usize),
    /// The disk grows by this many units.
    Grow(usize),
    /// CBT is reset: a new epoch.
    ResetCbt,
    /// The VM goes back to the contents it had at an earlier backup; CBT does not notice.
    Revert,
    /// The VM moves to a host of this version just before the next backup. (Moves between
    /// backups that leave no trace at either end are beyond what the planner can see.)
    MoveToHost(HostVersion),
    /// The destination loses everything it held (a replica file deleted, say).
    WipeDestination,
    /// The disk moves to another controller slot.
    MoveSlot,
    /// A backup: snapshot, plan, copy, compare, commit.
    Backup {
        /// Whether `QueryChangedDiskAreas` fails this time.
        query_fails: bool,
        /// The page size of the simulated answers, in units.
        page_units: usize,
        /// Whether the allocation map is known to the planner.
        allocation_known: bool,
    },
}

/// What one simulated backup did.
#[derive(Debug, Clone)]
pub struct SimBackup {
    /// The plan.
    pub planned: Planned,
}

/// A toy disk with CBT as vSphere has it, and the destination a planner copies it to.
///
/// Units stand for `unit` bytes each. Contents are numbers (0 = zeros). CBT marks each write
/// with the sequence number of the next snapshot; answers may contain false positives (all
/// "changed" granules are whole pages at the simulator's choice), and on a host with the
/// boundary bug an epoch in which the disk crossed a boundary *loses* changes afterwards, as
/// KB 2090639 describes. A revert restores old contents without telling CBT.
#[derive(Debug, Clone)]
pub struct SimDisk {
    unit: u64,
    granularity: NonZeroU64,
    contents: Vec<u64>,
    allocated: Vec<bool>,
    /// For each unit, the sequence number of the snapshot after which it was last written.
    tags: Vec<u64>,
    epoch: u8,
    sequence: u64,
    lossy_epoch: bool,
    host: HostVersion,
    /// The host the VM moves to at the next backup (hosts are seen only at backups).
    pending_host: Option<HostVersion>,
    slot: u32,
    reverted: bool,
    history: Vec<(Vec<u64>, Vec<bool>)>,
    next_value: u64,
    destination: Vec<u64>,
    dest_holds_data: bool,
    committed: Option<CommittedDisk>,
}

impl SimDisk {
    /// A disk of `units` units of `unit` bytes on a host of this version, with an empty
    /// destination of the given granularity (a multiple of `unit`).
    pub fn new(units: usize, unit: u64, granularity_units: u64, host: HostVersion) -> Self {
        Self {
            unit,
            granularity: NonZeroU64::new(granularity_units.max(1) * unit).unwrap_or(NonZeroU64::MIN),
            contents: vec![0; units],
            allocated: vec![false; units],
            tags: vec![0; units],
            epoch: 1,
            sequence: 1,
            lossy_epoch: false,
            host,
            pending_host: None,
            slot: 0,
            reverted: false,
            history: Vec::new(),
            next_value: 1,
            destination: Vec::new(),
            dest_holds_data: false,
            committed: None,
        }
    }

    /// The committed state.
    pub fn committed(&self) -> Option<&CommittedDisk> {
        self.committed.as_ref()
    }

    /// Edits the committed state behind the planner's back: for tests that prove the simulator
    /// catches a planner that forgets something.
    pub fn tamper_with_commit(&mut self, f: impl FnOnce(&mut CommittedDisk)) {
        if let Some(c) = self.committed.as_mut() {
            f(c);
        }
    }

    fn capacity(&self) -> u64 {
        self.contents.len() as u64 * self.unit
    }

    fn change_id(&self) -> ChangeId {
        ChangeId::tracked(Epoch::from_bytes([self.epoch; 16]), self.sequence)
    }

    /// Applies one event. A backup returns its plan, or an error naming how the destination
    /// came to differ from the disk.
    pub fn apply(&mut self, event: &SimEvent) -> Result<Option<SimBackup>, String> {
        let units = self.contents.len();
        match *event {
            SimEvent::Write(u) if units > 0 => {
                let u = u % units;
                self.contents[u] = self.next_value;
                self.next_value += 1;
                self.allocated[u] = true;
                if !self.lossy_epoch {
                    self.tags[u] = self.sequence;
                }
            }
            SimEvent::Unmap(u) if units > 0 => {
                let u = u % units;
                self.contents[u] = 0;
                self.allocated[u] = false;
                if !self.lossy_epoch {
                    self.tags[u] = self.sequence;
                }
            }
            SimEvent::Write(_) | SimEvent::Unmap(_) => {}
            SimEvent::Grow(n) => {
                let before = self.capacity();
                let n = n.min(4096);
                self.contents.extend(std::iter::repeat_n(0, n));
                self.allocated.extend(std::iter::repeat_n(false, n));
                self.tags.extend(std::iter::repeat_n(self.sequence, n));
                if crate::crossed_boundary(before, self.capacity()).is_some() && self.host.has_boundary_bug() {
                    self.lossy_epoch = true;
                }
            }
            SimEvent::ResetCbt => {
                self.epoch = self.epoch.wrapping_add(1);
                self.sequence = 1;
                self.tags.iter_mut().for_each(|t| *t = 0);
                self.lossy_epoch = false;
            }
            SimEvent::Revert => {
                if let Some((contents, allocated)) = self.history.first().cloned() {
                    // Reverting never changes the capacity in vSphere (a disk cannot grow with
                    // snapshots present), so only restore a same-sized image.
                    if contents.len() == self.contents.len() {
                        self.contents = contents;
                        self.allocated = allocated;
                        self.reverted = true;
                    }
                }
            }
            SimEvent::MoveToHost(v) => self.pending_host = Some(v),
            SimEvent::WipeDestination => {
                self.destination.clear();
                self.dest_holds_data = false;
            }
            SimEvent::MoveSlot => self.slot += 1,
            SimEvent::Backup { query_fails, page_units, allocation_known } => {
                return self.backup(query_fails, page_units, allocation_known).map(Some);
            }
        }
        Ok(None)
    }

    fn backup(&mut self, query_fails: bool, page_units: usize, allocation_known: bool) -> Result<SimBackup, String> {
        // Hosts before the first copy are invisible to the planner (see `plan::next_taint`), so
        // the simulated VM stays on its first host until then.
        if self.committed.is_some()
            && let Some(host) = self.pending_host.take()
        {
            self.host = host;
        }
        // The snapshot: its change ID names the state now; later writes get the next number.
        let change_id = self.change_id();
        let snapshot_sequence = self.sequence;
        self.sequence += 1;
        let capacity = self.capacity();
        let allocated = allocation_known.then(|| BlockModel { unit: self.unit, bits: self.allocated.clone() }.to_set());
        let current = CurrentDisk {
            change_id: Some(change_id),
            capacity,
            hardware_version: 13,
            host_version: Some(self.host),
            position: DiskPosition { controller: "scsi".into(), bus: 0, unit: self.slot },
            backing: "[ds1] vm/vm.vmdk".into(),
            allocated,
            reverted: self.reverted,
            fresh_snapshot: false,
            forced: None,
        };
        let dest = Destination { granularity: self.granularity, holds_data: self.dest_holds_data };
        let changes = match incremental_base(self.committed.as_ref(), &current, dest) {
            Err(_) => Changes::NotQueried,
            Ok(_) if query_fails => {
                Changes::Fault(QueryFault { fault: "FileFault".into(), message: "simulated".into() })
            }
            Ok(since) => self.query(since, snapshot_sequence, page_units),
        };
        let planned = plan(self.committed.as_ref(), &current, &changes, dest);
        if let Some(v) = plan_violation(&planned, &current, &changes, dest) {
            return Err(v);
        }
        // Copy: the destination takes the disk's size, then the plan's bytes.
        self.destination.resize(self.contents.len(), 0);
        let unit = self.unit;
        let units_of = |set: &ExtentSet| -> Vec<usize> {
            set.iter().flat_map(|e| (e.start() / unit) as usize..e.end().div_ceil(unit) as usize).collect()
        };
        for u in units_of(planned.plan.read()) {
            self.destination[u] = self.contents[u];
        }
        for u in units_of(planned.plan.zero()) {
            self.destination[u] = 0;
        }
        if self.destination != self.contents {
            let bad = (0..self.contents.len()).find(|&u| self.destination[u] != self.contents[u]);
            return Err(format!("after {:?} unit {bad:?} differs from the disk", planned.plan));
        }
        self.dest_holds_data = true;
        self.committed = Some(planned.commit.clone());
        self.history.push((self.contents.clone(), self.allocated.clone()));
        self.reverted = false;
        Ok(SimBackup { planned })
    }

    /// A paginated `QueryChangedDiskAreas` since `since`, as vSphere would answer it.
    fn query(&self, since: &ChangeId, upto: u64, page_units: usize) -> Changes {
        if since.epoch() != Some(Epoch::from_bytes([self.epoch; 16])) {
            return Changes::Fault(QueryFault { fault: "FileFault".into(), message: "another epoch".into() });
        }
        let since = since.sequence().unwrap_or(0);
        let unit = self.unit;
        let page_units = page_units.clamp(1, 1 << 20);
        let mut acc = ChangeAccumulator::new(self.capacity());
        while let Some(offset) = acc.next_offset() {
            let first = (offset / unit) as usize;
            let last = (first + page_units).min(self.contents.len());
            let changed_area = (first..last)
                .filter(|&u| self.tags[u] > since && self.tags[u] <= upto)
                .map(|u| DiskChangeExtent { start: (u as u64 * unit) as i64, length: unit as i64 })
                .collect();
            let page = DiskChangeInfo {
                start_offset: offset as i64,
                length: ((last - first) as u64 * unit) as i64,
                changed_area,
            };
            if let Err(e) = acc.push(&page) {
                return Changes::Fault(e.into());
            }
        }
        match acc.finish() {
            Ok(areas) => Changes::Areas(areas),
            Err(e) => Changes::Fault(e.into()),
        }
    }
}

/// Whether an incremental copy is allowed, written as one conjunction of the rules (the real
/// planner is a chain of early returns with reasons; the two must agree).
pub fn naive_allows_incremental(
    previous: Option<&CommittedDisk>,
    current: &CurrentDisk,
    changes: &Changes,
    dest: Destination,
) -> bool {
    let Some(prev) = previous else { return false };
    let usable = |id: &Option<ChangeId>| id.as_ref().is_some_and(|i| !i.is_all_allocated());
    let (p, c) = (prev.change_id.as_ref(), current.change_id.as_ref());
    let same_epoch = match (p.and_then(ChangeId::epoch), c.and_then(ChangeId::epoch)) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    let not_backwards = match (p.and_then(ChangeId::sequence), c.and_then(ChangeId::sequence)) {
        (Some(a), Some(b)) => b >= a,
        _ => true,
    };
    let taint_gone = match &prev.taint {
        None => true,
        Some(t) => match (t.epoch, c.and_then(ChangeId::epoch)) {
            (Some(a), Some(b)) => a != b,
            (None, Some(_)) => true,
            (_, None) => false,
        },
    };
    dest.holds_data
        && usable(&prev.change_id)
        && usable(&current.change_id)
        && current.hardware_version >= crate::MIN_CBT_HARDWARE_VERSION
        && same_epoch
        && not_backwards
        && prev.capacity == current.capacity
        && prev.position == current.position
        && prev.backing == current.backing
        && !current.reverted
        && taint_gone
        && matches!(changes, Changes::Areas(_))
}
