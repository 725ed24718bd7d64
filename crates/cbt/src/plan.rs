//! The copy planner: from what a destination holds and what the disk is now, exactly which bytes
//! to read, which to write as zeros, and whether CBT can be trusted at all.
//!
//! The rule is "never a silent wrong incremental": whenever anything suggests the change
//! information may be incomplete, the answer is a full copy with the reason named. The planner
//! is pure and total: every input, however odd, yields a plan.

use std::fmt;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use crate::extent::push_range;
use crate::report::Warnings;
use crate::{CbtError, CbtWarning, ChangeId, ChangedAreas, Epoch, ExtentSet};

/// Lowest virtual hardware version with changed block tracking (`vmx-07`).
pub const MIN_CBT_HARDWARE_VERSION: u32 = 7;

/// The smallest capacity boundary of the ESXi CBT bug of KB 2090639: a disk that grows across
/// 128 GiB, or across any power-of-two multiple of it, may get wrong changed areas afterwards.
pub const BOUNDARY_BUG_BASE: u64 = 128 << 30;

/// Where a disk hangs in the VM: its controller's kind and bus, and its unit on that bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskPosition {
    /// The controller kind as vSphere names its family, for example `scsi`, `sata`, `ide`, `nvme`.
    pub controller: String,
    /// The controller's bus number.
    pub bus: u32,
    /// The disk's unit number on the controller.
    pub unit: u32,
}

impl fmt::Display for DiskPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}:{}", self.controller, self.bus, self.unit)
    }
}

/// An ESXi version, as `about.version` spells it (`6.7.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostVersion {
    /// The major version.
    pub major: u32,
    /// The minor version.
    pub minor: u32,
    /// The update or patch number (third component; 0 when absent).
    pub patch: u32,
}

impl HostVersion {
    /// Reads `major.minor[.patch]`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        parts.next().is_none().then_some(Self { major, minor, patch })
    }

    /// Whether this host may lose changes when a disk grows across a 128 GiB power-of-two
    /// boundary (KB 2090639). Patches late in 5.x fixed it, but the build that carries the fix
    /// is not in the version string, so every host before 6.0 is treated as affected.
    pub fn has_boundary_bug(self) -> bool {
        self.major < 6
    }
}

impl fmt::Display for HostVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A CBT epoch that cannot be trusted for incremental copies, however its change IDs look.
///
/// It is set when a disk grows across a 128 GiB power-of-two boundary on an affected host and
/// lasts until the disk's epoch changes (a CBT reset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taint {
    /// The tainted epoch; `None` when the change ID was opaque, in which case only a change ID
    /// that parses into an epoch clears the taint (an opaque ID cannot show a reset).
    pub epoch: Option<Epoch>,
    /// The capacity boundary that was crossed.
    pub boundary: u64,
    /// The capacity the disk grew from, or `None` when the disk was first seen at or above the
    /// boundary on an affected host, so whether and when it grew is unknown.
    pub grown_from: Option<u64>,
    /// The host version at the time, when known.
    pub host: Option<HostVersion>,
}

/// What a destination holds of one disk, as committed after the last durable copy to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedDisk {
    /// The change ID of the snapshot that copy was taken from, if CBT was on.
    pub change_id: Option<ChangeId>,
    /// The disk's capacity in bytes then.
    pub capacity: u64,
    /// The VM's virtual hardware version then (the number in `vmx-NN`).
    pub hardware_version: u32,
    /// Where the disk hung then.
    pub position: DiskPosition,
    /// The base disk's backing file (not the snapshot delta), e.g. `[ds1] vm/vm.vmdk`.
    pub backing: String,
    /// The version of the host the VM ran on then, when known.
    pub host_version: Option<HostVersion>,
    /// A tainted CBT epoch, carried until the epoch changes.
    pub taint: Option<Taint>,
}

/// The disk as it is now, in the backup snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentDisk {
    /// The snapshot's change ID for this disk (`None` when CBT is off).
    pub change_id: Option<ChangeId>,
    /// The capacity in bytes.
    pub capacity: u64,
    /// The VM's virtual hardware version.
    pub hardware_version: u32,
    /// The version of the host running the VM, when known.
    pub host_version: Option<HostVersion>,
    /// Where the disk hangs.
    pub position: DiskPosition,
    /// The base disk's backing file (not the snapshot delta).
    pub backing: String,
    /// The allocated areas (`QueryAllocatedBlocks` or `*`), when known; unknown means "all".
    pub allocated: Option<ExtentSet>,
    /// Whether the VM was reverted to a snapshot since the last copy.
    pub reverted: bool,
    /// Whether the change ID was read under a snapshot made for this copy. Every snapshot
    /// advances a disk's change ID, so under a new one an ID equal to the committed one means
    /// the tracking state was lost and restored (a vCenter or host restart, CBT turned off and
    /// on): [`FullReason::ChangeIdRepeated`]. Against the live disks (a plan) it may be equal.
    pub fresh_snapshot: bool,
    /// A full copy the caller requires, whatever CBT says.
    pub forced: Option<Forced>,
}

/// Why a caller requires a full copy of a disk, whatever its change IDs say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// CBT was reset by the operator (`proxy cbt-reset`): the new epoch starts with a full
    /// copy, and whatever tainted the old epoch does not carry over.
    CbtReset,
    /// This run found CBT off and turned it on: whatever was written while it was off is in
    /// no change set.
    CbtTurnedOn,
    /// The disk was written back in place from a restore point (`proxy restore --in-place`):
    /// whether its change tracking saw those writes depends on the transport, so the next copy
    /// trusts no change set that spans them.
    RestoredInPlace,
}

/// The result of asking `QueryChangedDiskAreas` for the changes since the committed change ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// The query was not made (for instance because [`incremental_base`] ruled it out).
    NotQueried,
    /// The changed areas of the whole disk.
    Areas(ChangedAreas),
    /// The query failed, or its pages did not add up.
    Fault(QueryFault),
}

/// A failed `QueryChangedDiskAreas`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryFault {
    /// The fault's type as the server named it (`FileFault`, `InvalidArgument`, ...), or
    /// `InconsistentPages` for an answer whose pages did not tile the disk.
    pub fault: String,
    /// The message that came with it.
    pub message: String,
}

impl From<CbtError> for QueryFault {
    fn from(e: CbtError) -> Self {
        Self { fault: "InconsistentPages".into(), message: e.to_string() }
    }
}

/// What a destination is like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    /// Its unit of writing: a repository chunk, a replica's block. Plans are widened to it.
    pub granularity: NonZeroU64,
    /// Whether it already holds data of this disk (an earlier copy, or anything else).
    pub holds_data: bool,
}

/// Why a disk must be copied in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullReason {
    /// Nothing has been committed for this disk at this destination.
    NoPreviousState,
    /// A previous state exists, but the destination holds none of its data.
    DestinationEmpty,
    /// CBT is off for this disk now (no change ID in the snapshot).
    NoChangeId,
    /// The previous copy has no change ID to ask changes since.
    NoPreviousChangeId,
    /// The virtual hardware version is below 7, which has no CBT.
    HardwareVersionTooOld {
        /// The VM's version.
        version: u32,
    },
    /// CBT was reinitialised: the change IDs belong to different epochs.
    EpochChanged {
        /// The committed epoch.
        previous: Epoch,
        /// The current epoch.
        current: Epoch,
    },
    /// The sequence number went backwards within one epoch.
    ChangeIdRegressed {
        /// The committed change ID.
        previous: ChangeId,
        /// The current change ID.
        current: ChangeId,
    },
    /// The disk's capacity changed.
    CapacityChanged {
        /// The committed capacity.
        previous: u64,
        /// The current capacity.
        current: u64,
    },
    /// The disk moved to another controller, bus or unit.
    ControllerChanged {
        /// The committed position.
        previous: DiskPosition,
        /// The current position.
        current: DiskPosition,
    },
    /// The disk's backing file is another file.
    BackingChanged {
        /// The committed backing.
        previous: String,
        /// The current backing.
        current: String,
    },
    /// The VM was reverted to a snapshot, which makes CBT inconsistent.
    RevertedToSnapshot,
    /// The epoch is tainted by a capacity boundary crossing on an affected host.
    TaintedEpoch(Taint),
    /// A change ID under a new snapshot equal to the committed one: the tracking state was
    /// lost and restored, so the changes since cannot be trusted.
    ChangeIdRepeated(ChangeId),
    /// The caller required it.
    Forced(Forced),
    /// `QueryChangedDiskAreas` failed.
    QueryFault(QueryFault),
    /// The changed areas were not asked for.
    ChangesNotQueried,
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPreviousState => write!(f, "first copy of this disk to this destination"),
            Self::DestinationEmpty => write!(f, "the destination holds no data of this disk"),
            Self::NoChangeId => write!(f, "changed block tracking is off for this disk"),
            Self::NoPreviousChangeId => write!(f, "the previous copy has no change ID"),
            Self::HardwareVersionTooOld { version } => {
                write!(f, "virtual hardware vmx-{version:02} is below vmx-07, which CBT needs")
            }
            Self::EpochChanged { previous, current } => {
                write!(f, "CBT was reset (epoch {previous} became {current})")
            }
            Self::ChangeIdRegressed { previous, current } => {
                write!(f, "the change ID went backwards ({previous} became {current})")
            }
            Self::CapacityChanged { previous, current } => {
                write!(f, "the disk's capacity changed from {previous} to {current} bytes")
            }
            Self::ControllerChanged { previous, current } => {
                write!(f, "the disk moved from {previous} to {current}")
            }
            Self::BackingChanged { previous, current } => {
                write!(f, "the disk's backing changed from {previous:?} to {current:?}")
            }
            Self::RevertedToSnapshot => write!(f, "the VM was reverted to a snapshot"),
            Self::TaintedEpoch(t) if t.grown_from.is_some() => write!(
                f,
                "the disk grew across {} GiB on an ESXi host with the CBT boundary bug \
                 (KB 2090639); full copies until CBT is reset",
                t.boundary >> 30
            ),
            Self::TaintedEpoch(t) => write!(
                f,
                "the disk is at least {} GiB on an ESXi host with the CBT boundary bug \
                 (KB 2090639) and may have grown across it before its first copy; full copies \
                 until CBT is reset",
                t.boundary >> 30
            ),
            Self::ChangeIdRepeated(id) => write!(
                f,
                "the new snapshot has the change ID of the previous copy ({id}): CBT's state was lost and \
                 restored, so its changes cannot be trusted"
            ),
            Self::Forced(Forced::CbtReset) => write!(f, "CBT was reset (proxy cbt-reset)"),
            Self::Forced(Forced::CbtTurnedOn) => {
                write!(f, "CBT was off and this run turned it on: writes made while it was off are in no change set")
            }
            Self::Forced(Forced::RestoredInPlace) => write!(
                f,
                "the disk was restored in place (proxy restore --in-place): no change set since the last copy is trusted \
                 to hold those writes"
            ),
            Self::QueryFault(q) => write!(f, "QueryChangedDiskAreas failed: {}: {}", q.fault, q.message),
            Self::ChangesNotQueried => write!(f, "the changed areas were not queried"),
        }
    }
}

/// What to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyPlan {
    /// Copy the whole disk (its allocated part).
    Full {
        /// Why CBT was not used.
        reason: FullReason,
        /// The destination granules the copy touches with data: whole granules, for the
        /// digests and chunks kept per granule. Not the unit of I/O: see `fetch`.
        read: ExtentSet,
        /// The bytes to write as zeros without reading, whole destination granules.
        zero: ExtentSet,
        /// The bytes to read from the source: exactly the data the source names, never widened
        /// to a granule. The rest of `read` is zeros.
        fetch: ExtentSet,
    },
    /// Copy what changed since the committed change ID.
    Incremental {
        /// The destination granules the copy touches: whole granules, for the digests and
        /// chunks kept per granule. Not the unit of I/O: see `fetch` and `keep`.
        read: ExtentSet,
        /// The bytes to write as zeros without reading, whole destination granules.
        zero: ExtentSet,
        /// The bytes to read from the source: exactly the changed and allocated bytes, never
        /// widened to a granule.
        fetch: ExtentSet,
        /// The bytes of `read` that did not change: the destination holds them already. The
        /// rest of `read` (changed but unallocated) is zeros.
        keep: ExtentSet,
    },
}

impl CopyPlan {
    /// The bytes to read.
    pub fn read(&self) -> &ExtentSet {
        match self {
            Self::Full { read, .. } | Self::Incremental { read, .. } => read,
        }
    }

    /// The bytes to write as zeros without reading.
    pub fn zero(&self) -> &ExtentSet {
        match self {
            Self::Full { zero, .. } | Self::Incremental { zero, .. } => zero,
        }
    }

    /// The bytes to read from the source, inside [`read`](Self::read): the source's own
    /// extents (its data, or its changed data), not widened.
    pub fn fetch(&self) -> &ExtentSet {
        match self {
            Self::Full { fetch, .. } | Self::Incremental { fetch, .. } => fetch,
        }
    }

    /// The bytes inside [`read`](Self::read) the destination already holds (an
    /// incremental's unchanged bytes around its changes); empty for a full copy.
    pub fn keep(&self) -> &ExtentSet {
        static NONE: ExtentSet = ExtentSet::new();
        match self {
            Self::Full { .. } => &NONE,
            Self::Incremental { keep, .. } => keep,
        }
    }

    /// Why the copy is full, or `None` for an incremental.
    pub fn full_reason(&self) -> Option<&FullReason> {
        match self {
            Self::Full { reason, .. } => Some(reason),
            Self::Incremental { .. } => None,
        }
    }
}

/// A plan and the state to commit once the data it describes is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// What to copy.
    pub plan: CopyPlan,
    /// What to record for this disk and destination, **only after** the copy is durable.
    pub commit: CommittedDisk,
    /// What was odd on the way, for the log.
    pub warnings: Vec<CbtWarning>,
}

/// The change ID to ask `QueryChangedDiskAreas` for changes since, or why an incremental copy is
/// out of the question whatever the query says. Call this before querying.
pub fn incremental_base<'a>(
    previous: Option<&'a CommittedDisk>,
    current: &CurrentDisk,
    destination: Destination,
) -> Result<&'a ChangeId, FullReason> {
    let Some(prev) = previous else { return Err(FullReason::NoPreviousState) };
    if let Some(forced) = current.forced {
        return Err(FullReason::Forced(forced));
    }
    if !destination.holds_data {
        return Err(FullReason::DestinationEmpty);
    }
    let Some(cur_id) = current.change_id.as_ref().filter(|id| !id.is_all_allocated()) else {
        return Err(FullReason::NoChangeId);
    };
    if current.hardware_version < MIN_CBT_HARDWARE_VERSION {
        return Err(FullReason::HardwareVersionTooOld { version: current.hardware_version });
    }
    let Some(prev_id) = prev.change_id.as_ref().filter(|id| !id.is_all_allocated()) else {
        return Err(FullReason::NoPreviousChangeId);
    };
    if let (Some(previous), Some(current)) = (prev_id.epoch(), cur_id.epoch())
        && previous != current
    {
        return Err(FullReason::EpochChanged { previous, current });
    }
    if let (Some(p), Some(c)) = (prev_id.sequence(), cur_id.sequence())
        && c < p
    {
        return Err(FullReason::ChangeIdRegressed { previous: prev_id.clone(), current: cur_id.clone() });
    }
    if current.fresh_snapshot && prev_id == cur_id {
        return Err(FullReason::ChangeIdRepeated(cur_id.clone()));
    }
    if prev.capacity != current.capacity {
        return Err(FullReason::CapacityChanged { previous: prev.capacity, current: current.capacity });
    }
    if prev.position != current.position {
        return Err(FullReason::ControllerChanged {
            previous: prev.position.clone(),
            current: current.position.clone(),
        });
    }
    if prev.backing != current.backing {
        return Err(FullReason::BackingChanged { previous: prev.backing.clone(), current: current.backing.clone() });
    }
    if current.reverted {
        return Err(FullReason::RevertedToSnapshot);
    }
    if let Some(taint) = surviving_taint(prev.taint.as_ref(), current) {
        return Err(FullReason::TaintedEpoch(taint));
    }
    Ok(prev_id)
}

/// Plans the copy of one disk to one destination.
pub fn plan(
    previous: Option<&CommittedDisk>,
    current: &CurrentDisk,
    changes: &Changes,
    destination: Destination,
) -> Planned {
    let mut warnings = Warnings::default();
    let capacity = current.capacity;
    let g = destination.granularity;
    for id in [previous.and_then(|p| p.change_id.as_ref()), current.change_id.as_ref()].into_iter().flatten() {
        warnings.extend(id.warning().map(CbtWarning::OpaqueChangeId));
    }
    let allocated = current.allocated.as_ref().map(|a| {
        if let Some(first_past) = a.iter().find(|e| e.end() > capacity) {
            warnings.push(CbtWarning::AreaPastCapacity {
                start: first_past.start(),
                end: u128::from(a.end()),
                capacity,
            });
        }
        a.clamp(capacity)
    });

    let decision = incremental_base(previous, current, destination).and_then(|_| match changes {
        Changes::Areas(areas) => Ok(areas),
        Changes::Fault(fault) => Err(FullReason::QueryFault(fault.clone())),
        Changes::NotQueried => Err(FullReason::ChangesNotQueried),
    });
    let plan = match decision {
        Ok(changed) => {
            warnings.extend(changed.warnings.iter().cloned());
            let (read, zero) = incremental_geometry(&changed.areas, allocated.as_ref(), g, capacity);
            let changed = changed.areas.clamp(capacity);
            let data = match &allocated {
                Some(a) => changed.intersection(a),
                None => changed.clone(),
            };
            let fetch = data.intersection(&read);
            let keep = read.difference(&changed);
            CopyPlan::Incremental { read, zero, fetch, keep }
        }
        Err(reason) => {
            let fetch = allocated.clone().unwrap_or_else(|| ExtentSet::full(capacity));
            let read = fetch.align_outward(g, capacity);
            // Whatever the destination holds where the disk is unallocated must become zeros.
            let zero = if destination.holds_data { read.complement(capacity) } else { ExtentSet::new() };
            CopyPlan::Full { reason, read, zero, fetch }
        }
    };

    let taint = next_taint(previous, current, &mut warnings);
    let commit = CommittedDisk {
        change_id: current.change_id.clone().filter(|id| !id.is_all_allocated()),
        capacity,
        hardware_version: current.hardware_version,
        position: current.position.clone(),
        backing: current.backing.clone(),
        host_version: current.host_version,
        taint,
    };
    Planned { plan, commit, warnings: warnings.into_vec() }
}

/// The read and zero sets of an incremental copy, both whole granules and disjoint.
///
/// Changed and allocated bytes are read. Changed but unallocated bytes (trimmed or unmapped) are
/// written as zeros, but only where they fill whole granules: a granule that is partly zero and
/// partly anything else is read instead, which is always correct because the snapshot is frozen
/// and unallocated bytes read as zeros.
///
/// One pass over both sets (the 2 TiB, million-area case is benchmarked): each changed extent
/// is split into a head granule it only partly covers (read), an interior of whole granules
/// (read where an allocated byte falls, zero elsewhere), and a partly covered tail granule
/// (read). The changed set is merged, so a partly covered granule is never completed by a
/// neighbouring extent.
pub fn incremental_geometry(
    changed: &ExtentSet,
    allocated: Option<&ExtentSet>,
    granularity: NonZeroU64,
    capacity: u64,
) -> (ExtentSet, ExtentSet) {
    let Some(allocated) = allocated else {
        return (changed.align_outward(granularity, capacity), ExtentSet::new());
    };
    let g = granularity.get();
    let down = |x: u64| x - x % g;
    let up = |x: u64| x.div_ceil(g).checked_mul(g).map_or(capacity, |v| v.min(capacity));
    let allocated = allocated.as_slice();
    let mut next_alloc = 0;
    let mut read = Vec::new();
    let mut zero = Vec::new();
    for e in changed.iter().take_while(|e| e.start() < capacity) {
        let (start, end) = (e.start(), e.end().min(capacity));
        let interior_start = up(start);
        let interior_end = if end == capacity { end } else { down(end) };
        if interior_start >= interior_end {
            // Inside at most two granules, covering neither whole.
            push_range(&mut read, down(start), up(end));
            continue;
        }
        push_range(&mut read, down(start), interior_start);
        // The interior: whole granules, each read if any allocated byte falls in it.
        while allocated.get(next_alloc).is_some_and(|a| a.end() <= interior_start) {
            next_alloc += 1;
        }
        let mut cursor = interior_start;
        let mut i = next_alloc;
        while let Some(a) = allocated.get(i).filter(|a| a.start() < interior_end) {
            let read_start = down(a.start()).max(interior_start);
            let read_end = up(a.end()).min(interior_end);
            push_range(&mut zero, cursor, read_start);
            push_range(&mut read, read_start, read_end);
            cursor = cursor.max(read_end);
            if a.end() > interior_end {
                break; // It may reach into the next changed extent too.
            }
            i += 1;
        }
        next_alloc = i;
        push_range(&mut zero, cursor, interior_end);
        push_range(&mut read, interior_end, up(end));
    }
    (ExtentSet::from_sorted(read), ExtentSet::from_sorted(zero))
}

/// The committed taint, unless the disk's epoch has moved on from it.
fn surviving_taint(taint: Option<&Taint>, current: &CurrentDisk) -> Option<Taint> {
    let taint = taint?;
    let current_epoch = current.change_id.as_ref().and_then(ChangeId::epoch);
    match (taint.epoch, current_epoch) {
        (Some(tainted), Some(now)) if tainted != now => None,
        // An opaque taint is cleared by the first change ID that names an epoch: a reset is the
        // only thing the operator can do about it, and without an epoch it cannot be seen.
        (None, Some(_)) => None,
        _ => Some(taint.clone()),
    }
}

/// The taint to commit: the surviving one, or a new one if the disk grew across a boundary on a
/// host that has the bug.
///
/// Between two copies the growth happened on the host at one end or the other, so both count.
/// Before the first copy the disk's history is unknown: a disk at or above 128 GiB first seen
/// on an affected host may already have crossed a boundary there, so it is tainted too. What
/// stays invisible is a host between the two ends (a VM moved to an old host and back), or an
/// old host before the first copy when that copy runs on a new one; KB 2090639's own advice,
/// a CBT reset after upgrading, covers those.
fn next_taint(previous: Option<&CommittedDisk>, current: &CurrentDisk, warnings: &mut Warnings) -> Option<Taint> {
    let (hosts, boundary, grown_from) = match previous {
        Some(prev) => (
            [prev.host_version, current.host_version],
            crossed_boundary(prev.capacity, current.capacity),
            Some(prev.capacity),
        ),
        None => ([None, current.host_version], crossed_boundary(0, current.capacity), None),
    };
    if let Some(boundary) = boundary {
        let affected = if hosts.iter().all(Option::is_none) {
            warnings.push(CbtWarning::UnknownHostVersion);
            true
        } else {
            hosts.iter().flatten().any(|v| v.has_boundary_bug())
        };
        if affected {
            let host = hosts.into_iter().flatten().find(|v| v.has_boundary_bug());
            let epoch = current.change_id.as_ref().and_then(ChangeId::epoch);
            return Some(Taint { epoch, boundary, grown_from, host });
        }
    }
    if current.forced == Some(Forced::CbtReset) {
        // The operator's reset is KB 2090639's own remedy: the old epoch's taint ends with it.
        return None;
    }
    surviving_taint(previous?.taint.as_ref(), current)
}

/// The largest boundary `128 GiB * 2^k` with `previous < boundary <= current`, if any.
pub fn crossed_boundary(previous: u64, current: u64) -> Option<u64> {
    if current <= previous || current < BOUNDARY_BUG_BASE {
        return None;
    }
    // The largest boundary at or below `current`.
    let shift = (current / BOUNDARY_BUG_BASE).ilog2();
    let boundary = BOUNDARY_BUG_BASE << shift;
    (boundary > previous).then_some(boundary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        const GIB: u64 = 1 << 30;
        assert_eq!(crossed_boundary(100 * GIB, 127 * GIB), None);
        assert_eq!(crossed_boundary(100 * GIB, 128 * GIB), Some(128 * GIB));
        assert_eq!(crossed_boundary(128 * GIB, 200 * GIB), None);
        assert_eq!(crossed_boundary(200 * GIB, 300 * GIB), Some(256 * GIB));
        assert_eq!(crossed_boundary(100 * GIB, 600 * GIB), Some(512 * GIB));
        assert_eq!(crossed_boundary(600 * GIB, 100 * GIB), None);
        assert_eq!(crossed_boundary(0, u64::MAX), Some(BOUNDARY_BUG_BASE << 26));
    }

    #[test]
    fn host_versions() {
        assert_eq!(HostVersion::parse("5.5.0"), Some(HostVersion { major: 5, minor: 5, patch: 0 }));
        assert_eq!(HostVersion::parse("8.0"), Some(HostVersion { major: 8, minor: 0, patch: 0 }));
        assert_eq!(HostVersion::parse("8.0.x"), None);
        assert_eq!(HostVersion::parse("8.0.1.2"), None);
        assert!(HostVersion::parse("5.1.0").unwrap().has_boundary_bug());
        assert!(!HostVersion::parse("6.0.0").unwrap().has_boundary_bug());
    }
}
