//! What the CBT core reports: errors that make a result unusable, and warnings that do not.

use crate::Extent;

/// A `QueryChangedDiskAreas` answer that cannot be trusted as a whole.
///
/// Any of these means the changed areas are unknown; the caller records it as a query fault and
/// the planner falls back to a full copy of that disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbtError {
    /// A page's window starts after the end of the previous one, so some bytes were never
    /// reported on.
    #[error("changed-area page starts at byte {got}, but the previous page ended at {expected}: the pages leave a gap")]
    WindowGap {
        /// Where the page should have started.
        expected: u64,
        /// Where it started.
        got: u64,
    },
    /// A page's window starts before the end of the previous one.
    #[error(
        "changed-area page starts at byte {got}, but the previous page already covered up to {expected}: the pages overlap"
    )]
    WindowOverlap {
        /// Where the page should have started.
        expected: u64,
        /// Where it started.
        got: u64,
    },
    /// A page's window has a negative start or length.
    #[error("changed-area page has a negative window (startOffset {start}, length {length})")]
    NegativeWindow {
        /// The page's `startOffset`.
        start: i64,
        /// The page's `length`.
        length: i64,
    },
    /// A page's window is empty, so the paging loop would never advance.
    #[error("changed-area page at byte {offset} covers no bytes: the query would never advance")]
    EmptyWindow {
        /// Where the empty page started.
        offset: u64,
    },
    /// A page arrived after the pages had already covered the whole disk.
    #[error("changed-area page arrived after the pages already covered the disk's {capacity} bytes")]
    PageAfterEnd {
        /// The disk's capacity.
        capacity: u64,
    },
    /// The pages stop before the end of the disk.
    #[error("changed-area pages cover only {covered} of the disk's {capacity} bytes")]
    Incomplete {
        /// How far the pages reached.
        covered: u64,
        /// The disk's capacity.
        capacity: u64,
    },
}

/// Something odd that did not stop the work; worth a line in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbtWarning {
    /// A page's window ran past the disk's end; it was cut at the capacity.
    #[error("changed-area page [{start}, {end}) runs past the disk's capacity {capacity}; cut there")]
    WindowPastCapacity {
        /// The window's start.
        start: u64,
        /// The window's end as reported.
        end: u128,
        /// The disk's capacity.
        capacity: u64,
    },
    /// A changed area had a negative start or length; it was dropped.
    #[error("changed area (start {start}, length {length}) is negative; dropped")]
    NegativeArea {
        /// The area's `start`.
        start: i64,
        /// The area's `length`.
        length: i64,
    },
    /// A changed area lay partly or wholly outside its page's window. It is kept (cut to the
    /// disk): a false positive costs one read, a dropped change would cost a corrupt backup.
    #[error(
        "changed area {area} lies outside its page's window {window}; kept, since dropping a change could corrupt the backup"
    )]
    AreaOutsideWindow {
        /// The area as reported (cut to the disk).
        area: Extent,
        /// The page's window.
        window: Extent,
    },
    /// A changed or allocated area ran past the disk's capacity; it was cut there.
    #[error("area [{start}, {end}) runs past the disk's capacity {capacity}; cut there")]
    AreaPastCapacity {
        /// The area's start.
        start: u64,
        /// The area's end as reported.
        end: u128,
        /// The disk's capacity.
        capacity: u64,
    },
    /// More warnings of these kinds were seen than are kept.
    #[error("{count} more warnings like these were not kept")]
    Suppressed {
        /// How many were dropped.
        count: u64,
    },
    /// A change ID did not have the documented shape.
    #[error("{0}")]
    OpaqueChangeId(String),
    /// The host's version is unknown, so it is treated as one with the 128 GiB boundary bug.
    #[error("the host's ESXi version is unknown; treating it as affected by the CBT boundary bug (KB 2090639)")]
    UnknownHostVersion,
}

/// Most warnings kept from one source; a hostile server sending a million bad areas gets a
/// handful of lines and a count, not a million allocations.
pub(crate) const MAX_WARNINGS: usize = 32;

/// A bounded list of warnings.
#[derive(Debug, Default, Clone)]
pub(crate) struct Warnings {
    kept: Vec<CbtWarning>,
    suppressed: u64,
}

impl Warnings {
    pub(crate) fn push(&mut self, w: CbtWarning) {
        if self.kept.len() < MAX_WARNINGS {
            self.kept.push(w);
        } else {
            self.suppressed += 1;
        }
    }

    pub(crate) fn extend(&mut self, ws: impl IntoIterator<Item = CbtWarning>) {
        for w in ws {
            self.push(w);
        }
    }

    pub(crate) fn into_vec(mut self) -> Vec<CbtWarning> {
        if self.suppressed > 0 {
            self.kept.push(CbtWarning::Suppressed { count: self.suppressed });
        }
        self.kept
    }
}
