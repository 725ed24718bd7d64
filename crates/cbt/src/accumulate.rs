//! Collecting the pages of a paginated `QueryChangedDiskAreas` into one set of changed areas.
//!
//! The server answers each call for a *window* `[startOffset, startOffset+length)` of the disk;
//! the caller asks again from the end of that window until the windows reach the capacity.
//! The windows must tile the disk exactly: a gap or an overlap means the answer cannot be
//! trusted and is an error. Oddities inside a page (areas outside the window or past the disk)
//! are cut to the disk and reported as warnings, never a panic.

use crate::report::Warnings;
use crate::{CbtError, CbtWarning, Extent, ExtentSet};

/// One changed area of a `DiskChangeInfo`, as the server sent it (`xsd:long` fields, bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskChangeExtent {
    /// The first changed byte.
    pub start: i64,
    /// The number of changed bytes.
    pub length: i64,
}

/// One page of a `QueryChangedDiskAreas` answer, as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskChangeInfo {
    /// The first byte of the window this page reports on.
    pub start_offset: i64,
    /// The window's length in bytes.
    pub length: i64,
    /// The changed areas inside the window (may be empty).
    pub changed_area: Vec<DiskChangeExtent>,
}

/// The changed areas of a whole disk, and what was odd about the answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangedAreas {
    /// The changed bytes, cut to the disk.
    pub areas: ExtentSet,
    /// What was odd, at most a few dozen lines.
    pub warnings: Vec<CbtWarning>,
}

/// Accumulates `QueryChangedDiskAreas` pages for a disk of a known capacity.
///
/// ```
/// use cbt::{ChangeAccumulator, DiskChangeExtent, DiskChangeInfo};
/// let mut acc = ChangeAccumulator::new(4096);
/// while let Some(offset) = acc.next_offset() {
///     // Here the caller would ask the server for the window starting at `offset`.
///     let page = DiskChangeInfo {
///         start_offset: offset as i64,
///         length: 2048,
///         changed_area: vec![DiskChangeExtent { start: offset as i64 + 512, length: 512 }],
///     };
///     acc.push(&page).unwrap();
/// }
/// assert_eq!(acc.finish().unwrap().areas.total_bytes(), 1024);
/// ```
#[derive(Debug, Clone)]
pub struct ChangeAccumulator {
    capacity: u64,
    covered: u64,
    areas: Vec<Extent>,
    warnings: Warnings,
}

impl ChangeAccumulator {
    /// Starts collecting pages for a disk of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self { capacity, covered: 0, areas: Vec::new(), warnings: Warnings::default() }
    }

    /// The `startOffset` of the next query, or `None` once the pages cover the whole disk.
    pub fn next_offset(&self) -> Option<u64> {
        (self.covered < self.capacity).then_some(self.covered)
    }

    /// Adds one page. An error means the whole answer is untrustworthy: stop querying, and plan
    /// a full copy of this disk.
    pub fn push(&mut self, page: &DiskChangeInfo) -> Result<(), CbtError> {
        let negative = || CbtError::NegativeWindow { start: page.start_offset, length: page.length };
        let start = u64::try_from(page.start_offset).map_err(|_| negative())?;
        let length = u64::try_from(page.length).map_err(|_| negative())?;
        if self.covered >= self.capacity {
            return Err(CbtError::PageAfterEnd { capacity: self.capacity });
        }
        if start > self.covered {
            return Err(CbtError::WindowGap { expected: self.covered, got: start });
        }
        if start < self.covered {
            return Err(CbtError::WindowOverlap { expected: self.covered, got: start });
        }
        if length == 0 {
            return Err(CbtError::EmptyWindow { offset: start });
        }
        let reported_end = u128::from(start) + u128::from(length);
        if reported_end > u128::from(self.capacity) {
            self.warnings.push(CbtWarning::WindowPastCapacity { start, end: reported_end, capacity: self.capacity });
        }
        // start < capacity here, so the window is not empty.
        let end = u64::try_from(reported_end).unwrap_or(u64::MAX).min(self.capacity);
        let Some(window) = Extent::from_bounds(start, end) else {
            return Err(CbtError::EmptyWindow { offset: start });
        };
        for area in &page.changed_area {
            self.add_area(*area, window);
        }
        self.covered = end;
        Ok(())
    }

    fn add_area(&mut self, area: DiskChangeExtent, window: Extent) {
        let (Ok(start), Ok(length)) = (u64::try_from(area.start), u64::try_from(area.length)) else {
            self.warnings.push(CbtWarning::NegativeArea { start: area.start, length: area.length });
            return;
        };
        let reported_end = u128::from(start) + u128::from(length);
        if reported_end > u128::from(self.capacity) {
            self.warnings.push(CbtWarning::AreaPastCapacity { start, end: reported_end, capacity: self.capacity });
        }
        let end = u64::try_from(reported_end).unwrap_or(u64::MAX).min(self.capacity);
        let Some(area) = Extent::from_bounds(start, end) else { return };
        if area.start() < window.start() || area.end() > window.end() {
            self.warnings.push(CbtWarning::AreaOutsideWindow { area, window });
        }
        self.areas.push(area);
    }

    /// The changed areas of the whole disk; an error when the pages stop short of its end.
    pub fn finish(self) -> Result<ChangedAreas, CbtError> {
        if self.covered < self.capacity {
            return Err(CbtError::Incomplete { covered: self.covered, capacity: self.capacity });
        }
        Ok(ChangedAreas { areas: ExtentSet::from_extents(self.areas), warnings: self.warnings.into_vec() })
    }
}

/// Accumulates a whole list of pages at once (for tests, fuzzing and recorded answers).
pub fn accumulate<'a>(
    capacity: u64,
    pages: impl IntoIterator<Item = &'a DiskChangeInfo>,
) -> Result<ChangedAreas, CbtError> {
    let mut acc = ChangeAccumulator::new(capacity);
    for page in pages {
        acc.push(page)?;
    }
    acc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(start: i64, length: i64, areas: &[(i64, i64)]) -> DiskChangeInfo {
        DiskChangeInfo {
            start_offset: start,
            length,
            changed_area: areas.iter().map(|&(start, length)| DiskChangeExtent { start, length }).collect(),
        }
    }

    #[test]
    fn table_of_page_sequences() {
        use CbtError::*;
        // (capacity, pages, expected (start, len) areas or error, number of warnings)
        type Case = (u64, Vec<DiskChangeInfo>, Result<Vec<(u64, u64)>, CbtError>, usize);
        let cases: Vec<Case> = vec![
            (0, vec![], Ok(vec![]), 0),
            (100, vec![page(0, 100, &[])], Ok(vec![]), 0),
            (100, vec![page(0, 50, &[(10, 5)]), page(50, 50, &[(60, 5), (64, 10)])], Ok(vec![(10, 5), (60, 14)]), 0),
            (100, vec![page(0, 50, &[])], Err(Incomplete { covered: 50, capacity: 100 }), 0),
            (100, vec![page(0, 50, &[]), page(60, 40, &[])], Err(WindowGap { expected: 50, got: 60 }), 0),
            (100, vec![page(0, 50, &[]), page(40, 60, &[])], Err(WindowOverlap { expected: 50, got: 40 }), 0),
            (100, vec![page(10, 90, &[])], Err(WindowGap { expected: 0, got: 10 }), 0),
            (100, vec![page(0, 0, &[])], Err(EmptyWindow { offset: 0 }), 0),
            (100, vec![page(-1, 10, &[])], Err(NegativeWindow { start: -1, length: 10 }), 0),
            (100, vec![page(0, 100, &[]), page(100, 1, &[])], Err(PageAfterEnd { capacity: 100 }), 0),
            // A window past the end is cut, and so are areas past it.
            (100, vec![page(0, i64::MAX, &[(90, 20)])], Ok(vec![(90, 10)]), 2),
            // An area outside its window is kept: false positives are safe, misses are not.
            (100, vec![page(0, 50, &[(40, 20)]), page(50, 50, &[])], Ok(vec![(40, 20)]), 1),
            (100, vec![page(0, 100, &[(-5, 10), (5, -1), (7, 0)])], Ok(vec![]), 2),
            (100, vec![page(0, 100, &[(i64::MAX, i64::MAX)])], Ok(vec![]), 1),
        ];
        for (i, (capacity, pages, expected, warnings)) in cases.into_iter().enumerate() {
            let got = accumulate(capacity, &pages);
            match (got, expected) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got.areas, ExtentSet::from_ranges(want), "case {i}");
                    assert_eq!(got.warnings.len(), warnings, "case {i}: {:?}", got.warnings);
                }
                (got, want) => assert_eq!(got.map(|g| g.areas), want.map(ExtentSet::from_ranges), "case {i}"),
            }
        }
    }

    #[test]
    fn a_flood_of_bad_areas_keeps_a_bounded_warning_list() {
        let areas: Vec<(i64, i64)> = (0..10_000).map(|i| (-i - 1, 1)).collect();
        let got = accumulate(100, &[page(0, 100, &areas)]).unwrap();
        assert_eq!(got.warnings.len(), crate::report::MAX_WARNINGS + 1);
        assert_eq!(got.warnings.last(), Some(&CbtWarning::Suppressed { count: 10_000 - 32 }));
    }
}
