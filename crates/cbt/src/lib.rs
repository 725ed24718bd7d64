//! The CBT changed-area calculator: decides exactly which bytes of a disk to copy, and when
//! changed block tracking cannot be trusted.
//!
//! This crate is pure: no I/O, no clocks, no async runtime, no knowledge of SOAP, VDDK or any
//! destination format. Callers hand it what vSphere said (change IDs, `DiskChangeInfo` pages,
//! allocated areas) and what the destination holds, and get back a [`CopyPlan`] and the state
//! to commit once the copy is durable.
//!
//! - [`ChangeId`]: parses change IDs into an epoch and a sequence, keeping unknown shapes opaque.
//! - [`ExtentSet`]: normalised byte-range sets and the operations plans are made of.
//! - [`ChangeAccumulator`]: checks and joins the pages of a paginated `QueryChangedDiskAreas`.
//! - [`plan()`]: the copy planner, full or incremental, with the reason for every full copy.

mod accumulate;
mod areas;
mod change_id;
mod extent;
mod plan;
mod report;

#[cfg(any(test, feature = "test-utils"))]
pub mod oracle;

pub use accumulate::{ChangeAccumulator, ChangedAreas, DiskChangeExtent, DiskChangeInfo, accumulate};
pub use areas::{AreasError, parse_areas};
pub use change_id::{ChangeId, ChangeIdKind, Epoch, OpaqueReason};
pub use extent::{Extent, ExtentSet, Split};
pub use plan::{
    BOUNDARY_BUG_BASE, Changes, CommittedDisk, CopyPlan, CurrentDisk, Destination, DiskPosition, Forced, FullReason,
    HostVersion, MIN_CBT_HARDWARE_VERSION, Planned, QueryFault, Taint, crossed_boundary, incremental_base,
    incremental_geometry, plan,
};
pub use report::{CbtError, CbtWarning};
