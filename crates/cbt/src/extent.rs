//! Sets of byte ranges on a disk, the currency of every copy decision.
//!
//! An [`ExtentSet`] is always normalised: its extents are sorted, non-empty, and neither overlap
//! nor touch (touching extents are merged). Every operation is a linear merge over that order,
//! so sets of millions of extents combine in milliseconds, and no operation can produce a set
//! that breaks the invariant.

use std::fmt;
use std::num::NonZeroU64;

/// A non-empty, half-open byte range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    start: u64,
    end: u64,
}

impl Extent {
    /// The range of `len` bytes at `start`; `None` when it is empty or would end past `u64::MAX`.
    pub fn new(start: u64, len: u64) -> Option<Self> {
        let end = start.checked_add(len)?;
        Self::from_bounds(start, end)
    }

    /// The range `[start, end)`; `None` when it is empty (`end <= start`).
    pub fn from_bounds(start: u64, end: u64) -> Option<Self> {
        (start < end).then_some(Self { start, end })
    }

    /// The first byte of the range.
    pub fn start(self) -> u64 {
        self.start
    }

    /// One past the last byte of the range.
    pub fn end(self) -> u64 {
        self.end
    }

    /// The number of bytes in the range (never zero).
    #[expect(clippy::len_without_is_empty, reason = "an extent is never empty")]
    pub fn len(self) -> u64 {
        self.end - self.start
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// A normalised set of byte ranges: sorted, non-overlapping, with touching ranges merged.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ExtentSet {
    extents: Vec<Extent>,
}

impl fmt::Debug for ExtentSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(&self.extents).finish()
    }
}

impl ExtentSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self { extents: Vec::new() }
    }

    /// The parts of the set inside `range`, in order, found by binary search (so a copy can
    /// ask for each request's share of a large set).
    pub fn within(&self, range: Extent) -> impl Iterator<Item = Extent> + '_ {
        let first = self.extents.partition_point(|e| e.end <= range.start);
        self.extents[first..]
            .iter()
            .take_while(move |e| e.start < range.end)
            .filter_map(move |e| Extent::from_bounds(e.start.max(range.start), e.end.min(range.end)))
    }

    /// The whole of a disk of `capacity` bytes (empty when the capacity is zero).
    pub fn full(capacity: u64) -> Self {
        Self { extents: Extent::from_bounds(0, capacity).into_iter().collect() }
    }

    /// A set from extents in any order, overlapping or not.
    pub fn from_extents(extents: impl IntoIterator<Item = Extent>) -> Self {
        let mut extents: Vec<Extent> = extents.into_iter().collect();
        // Already-sorted input (the common case: CBT pages arrive in order) costs one pass.
        if !extents.is_sorted() {
            extents.sort_unstable();
        }
        let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
        for e in extents {
            push_merged(&mut out, e);
        }
        out.shrink_to_fit();
        Self { extents: out }
    }

    /// A set from extents already sorted by start and merged, as a single pass produces them
    /// (checked in debug builds; out-of-order input is sorted rather than trusted).
    pub(crate) fn from_sorted(extents: Vec<Extent>) -> Self {
        let sorted = extents.windows(2).all(|w| w[0].end < w[1].start);
        debug_assert!(sorted, "from_sorted given unsorted extents");
        if sorted { Self { extents } } else { Self::from_extents(extents) }
    }

    /// A set from `(start, length)` pairs; empty ranges are dropped and lengths that would run
    /// past `u64::MAX` are cut there.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        Self::from_extents(
            ranges.into_iter().filter_map(|(start, len)| Extent::from_bounds(start, start.saturating_add(len))),
        )
    }

    /// The extents in ascending order.
    pub fn as_slice(&self) -> &[Extent] {
        &self.extents
    }

    /// Iterates over the extents in ascending order.
    pub fn iter(&self) -> std::slice::Iter<'_, Extent> {
        self.extents.iter()
    }

    /// The number of extents (not bytes: see [`ExtentSet::total_bytes`]).
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether the set holds no byte at all.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The number of bytes in the set.
    pub fn total_bytes(&self) -> u64 {
        // Disjoint ranges below u64::MAX cannot sum past it.
        self.extents.iter().map(|e| e.len()).sum()
    }

    /// One past the last byte in the set, or 0 when it is empty.
    pub fn end(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.end)
    }

    /// Whether the byte at `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.extents.partition_point(|e| e.end <= offset);
        self.extents.get(i).is_some_and(|e| e.start <= offset)
    }

    /// Adds one range to the set, in place: it merges with the extents it overlaps or touches,
    /// found by binary search, so recording completions one by one stays cheap.
    pub fn insert(&mut self, extent: Extent) {
        // Sorted, disjoint and non-touching, so both predicates are monotone along the vector.
        let lo = self.extents.partition_point(|e| e.end < extent.start);
        let hi = self.extents.partition_point(|e| e.start <= extent.end);
        if lo == hi {
            self.extents.insert(lo, extent);
            return;
        }
        let merged =
            Extent { start: extent.start.min(self.extents[lo].start), end: extent.end.max(self.extents[hi - 1].end) };
        self.extents.splice(lo..hi, [merged]);
    }

    /// The bytes in either set.
    pub fn union(&self, other: &Self) -> Self {
        let mut out = Vec::with_capacity(self.extents.len() + other.extents.len());
        let (mut a, mut b) = (self.extents.iter().peekable(), other.extents.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.start <= y.start => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            if let Some(&e) = next {
                push_merged(&mut out, e);
            }
        }
        Self { extents: out }
    }

    /// The bytes in both sets.
    pub fn intersection(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while let (Some(x), Some(y)) = (self.extents.get(i), other.extents.get(j)) {
            if let Some(e) = Extent::from_bounds(x.start.max(y.start), x.end.min(y.end)) {
                out.push(e);
            }
            // Advance whichever ends first; it cannot meet anything further in the other set.
            if x.end <= y.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        Self { extents: out }
    }

    /// The bytes in `self` but not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        let mut out = Vec::with_capacity(self.extents.len());
        let mut j = 0;
        for &x in &self.extents {
            let mut cursor = x.start;
            // Skip the subtrahends that end before this extent starts.
            while other.extents.get(j).is_some_and(|y| y.end <= cursor) {
                j += 1;
            }
            let mut k = j;
            while let Some(y) = other.extents.get(k) {
                if y.start >= x.end {
                    break;
                }
                if let Some(e) = Extent::from_bounds(cursor, y.start) {
                    out.push(e);
                }
                cursor = cursor.max(y.end);
                if y.end > x.end {
                    break;
                }
                k += 1;
            }
            if let Some(e) = Extent::from_bounds(cursor, x.end) {
                out.push(e);
            }
        }
        Self { extents: out }
    }

    /// The bytes of `[0, capacity)` that are not in the set.
    pub fn complement(&self, capacity: u64) -> Self {
        Self::full(capacity).difference(self)
    }

    /// The set cut to `[0, capacity)`.
    pub fn clamp(&self, capacity: u64) -> Self {
        let keep = self.extents.partition_point(|e| e.end <= capacity);
        let mut extents = self.extents[..keep].to_vec();
        if let Some(e) = self.extents.get(keep).and_then(|e| Extent::from_bounds(e.start, e.end.min(capacity))) {
            extents.push(e);
        }
        Self { extents }
    }

    /// The extents cut to `[0, capacity)`, without copying the set.
    fn clamped(&self, capacity: u64) -> impl Iterator<Item = Extent> + '_ {
        self.extents
            .iter()
            .take_while(move |e| e.start < capacity)
            .map(move |e| Extent { start: e.start, end: e.end.min(capacity) })
    }

    /// The set with every gap shorter than `threshold` bytes filled, so that nearby ranges
    /// become one request. A threshold of 0 or 1 changes nothing (touching ranges are already
    /// merged).
    pub fn coalesce_gaps_below(&self, threshold: u64) -> Self {
        let mut out: Vec<Extent> = Vec::with_capacity(self.extents.len());
        for &e in &self.extents {
            match out.last_mut() {
                Some(last) if e.start - last.end < threshold => last.end = e.end,
                _ => out.push(e),
            }
        }
        Self { extents: out }
    }

    /// The smallest set of whole granules of `granularity` bytes that covers this set, on a disk
    /// of `capacity` bytes. The last granule of a disk whose capacity is not a multiple of the
    /// granularity ends at the capacity. Bytes past the capacity are dropped first.
    pub fn align_outward(&self, granularity: NonZeroU64, capacity: u64) -> Self {
        let g = granularity.get();
        let mut out: Vec<Extent> = Vec::with_capacity(self.extents.len());
        for e in self.clamped(capacity) {
            let start = e.start - e.start % g;
            let end = round_up(e.end, g).map_or(capacity, |end| end.min(capacity));
            if let Some(e) = Extent::from_bounds(start, end) {
                push_merged(&mut out, e);
            }
        }
        Self { extents: out }
    }

    /// The largest set of whole granules of `granularity` bytes inside this set, on a disk of
    /// `capacity` bytes (the last granule may be short: it ends at the capacity).
    pub fn align_inward(&self, granularity: NonZeroU64, capacity: u64) -> Self {
        let g = granularity.get();
        let mut out = Vec::with_capacity(self.extents.len());
        for e in self.clamped(capacity) {
            let Some(start) = round_up(e.start, g) else { continue };
            let end = if e.end == capacity { capacity } else { e.end - e.end % g };
            if let Some(e) = Extent::from_bounds(start, end) {
                out.push(e);
            }
        }
        // Inward alignment only shrinks disjoint ranges, so they stay sorted and apart.
        Self { extents: out }
    }

    /// Splits the set into requests of at most `max_len` bytes. Pieces break at multiples of
    /// `max_len`, so requests of aligned sets stay aligned and map onto whole destination blocks.
    pub fn split(&self, max_len: NonZeroU64) -> Split<'_> {
        Split { extents: self.extents.iter(), current: None, max_len: max_len.get() }
    }
}

impl<'a> IntoIterator for &'a ExtentSet {
    type Item = &'a Extent;
    type IntoIter = std::slice::Iter<'a, Extent>;

    fn into_iter(self) -> Self::IntoIter {
        self.extents.iter()
    }
}

impl FromIterator<Extent> for ExtentSet {
    fn from_iter<T: IntoIterator<Item = Extent>>(iter: T) -> Self {
        Self::from_extents(iter)
    }
}

/// The iterator returned by [`ExtentSet::split`].
#[derive(Debug, Clone)]
pub struct Split<'a> {
    extents: std::slice::Iter<'a, Extent>,
    current: Option<Extent>,
    max_len: u64,
}

impl Iterator for Split<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let e = match self.current.take() {
            Some(e) => e,
            None => *self.extents.next()?,
        };
        // The next multiple of max_len above start; past u64::MAX means "no break".
        let boundary =
            (e.start / self.max_len).checked_add(1).and_then(|n| n.checked_mul(self.max_len)).unwrap_or(u64::MAX);
        if boundary < e.end {
            self.current = Extent::from_bounds(boundary, e.end);
            Extent::from_bounds(e.start, boundary)
        } else {
            Some(e)
        }
    }
}

/// Appends `[start, end)` (if not empty) to extents built in ascending order of start, merging
/// on overlap or contact.
pub(crate) fn push_range(out: &mut Vec<Extent>, start: u64, end: u64) {
    if let Some(e) = Extent::from_bounds(start, end) {
        push_merged(out, e);
    }
}

/// Appends `e`, which starts at or after the last extent's start, merging on overlap or contact.
fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    match out.last_mut() {
        Some(last) if e.start <= last.end => last.end = last.end.max(e.end),
        _ => out.push(e),
    }
}

/// `x` rounded up to a multiple of `g`, or `None` past `u64::MAX`.
fn round_up(x: u64, g: u64) -> Option<u64> {
    x.div_ceil(g).checked_mul(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> ExtentSet {
        ExtentSet::from_ranges(ranges.iter().copied())
    }

    fn g(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[test]
    fn normalises_unsorted_overlapping_and_touching_input() {
        let s = set(&[(10, 5), (0, 3), (3, 2), (12, 10), (40, 0)]);
        assert_eq!(s.as_slice(), set(&[(0, 5), (10, 12)]).as_slice());
        assert_eq!(s.total_bytes(), 17);
        assert!(s.contains(4) && !s.contains(5) && s.contains(21) && !s.contains(22));
    }

    #[test]
    fn set_algebra_on_a_small_case() {
        let a = set(&[(0, 10), (20, 10)]);
        let b = set(&[(5, 20)]);
        assert_eq!(a.union(&b), set(&[(0, 30)]));
        assert_eq!(a.intersection(&b), set(&[(5, 5), (20, 5)]));
        assert_eq!(a.difference(&b), set(&[(0, 5), (25, 5)]));
        assert_eq!(b.difference(&a), set(&[(10, 10)]));
        assert_eq!(a.complement(40), set(&[(10, 10), (30, 10)]));
    }

    #[test]
    fn alignment_and_the_short_last_granule() {
        let s = set(&[(5, 2), (17, 1)]);
        assert_eq!(s.align_outward(g(8), 20), set(&[(0, 8), (16, 4)]));
        assert_eq!(set(&[(3, 17)]).align_inward(g(8), 20), set(&[(8, 12)]));
        assert_eq!(set(&[(3, 14)]).align_inward(g(8), 20), set(&[(8, 8)]));
        assert_eq!(set(&[(3, 4)]).align_inward(g(8), 20), ExtentSet::new());
    }

    #[test]
    fn split_breaks_at_multiples_of_the_request_size() {
        let pieces: Vec<_> = set(&[(3, 20)]).split(g(8)).map(|e| (e.start(), e.len())).collect();
        assert_eq!(pieces, [(3, 5), (8, 8), (16, 7)]);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let s = set(&[(u64::MAX - 3, 10)]);
        assert_eq!(s.total_bytes(), 3);
        assert_eq!(s.align_outward(g(1 << 40), u64::MAX).end(), u64::MAX);
        assert_eq!(s.split(g(u64::MAX)).count(), 1);
        assert_eq!(s.complement(u64::MAX).total_bytes(), u64::MAX - 3);
    }
}
