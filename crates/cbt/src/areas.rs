//! Changed-areas lists as text: one `OFFSET LENGTH` pair of byte counts per line, blank lines
//! and `#` comments ignored. This is how a user (or another tool) tells a backup which areas of
//! an image changed; every area must lie within the disk.

use crate::extent::{Extent, ExtentSet};

/// What is wrong with a changed-areas list, by line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AreasError {
    /// Not two fields.
    #[error("line {line}: expected `OFFSET LENGTH`, found {found:?}")]
    Shape {
        /// The line.
        line: usize,
        /// What it held (at most 80 characters).
        found: String,
    },
    /// A field is not a byte count.
    #[error("line {line}: {found:?} is not two byte counts")]
    Number {
        /// The line.
        line: usize,
        /// What it held (at most 80 characters).
        found: String,
    },
    /// The area does not fit the disk.
    #[error("line {line}: [{offset}, +{length}) lies outside the disk of {capacity} bytes")]
    Outside {
        /// The line.
        line: usize,
        /// Where the area starts.
        offset: u64,
        /// Its length.
        length: u64,
        /// The disk's size.
        capacity: u64,
    },
}

fn shown(line: &str) -> String {
    line.chars().take(80).collect()
}

/// Parses a changed-areas list for a disk of `capacity` bytes.
pub fn parse_areas(text: &str, capacity: u64) -> Result<ExtentSet, AreasError> {
    let mut set = ExtentSet::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(o), Some(l), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AreasError::Shape { line: n + 1, found: shown(line) });
        };
        let (Ok(offset), Ok(length)) = (o.parse::<u64>(), l.parse::<u64>()) else {
            return Err(AreasError::Number { line: n + 1, found: shown(line) });
        };
        if offset.checked_add(length).is_none_or(|end| end > capacity) {
            return Err(AreasError::Outside { line: n + 1, offset, length, capacity });
        }
        if let Some(e) = Extent::new(offset, length) {
            set.insert(e);
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_checked_line_by_line() {
        let set = parse_areas("# areas\n0 4096\n\n8192 10 # tail\n0 0\n", 1 << 20).unwrap();
        assert_eq!(set, ExtentSet::from_ranges([(0, 4096), (8192, 10)]));
        let e = |t: &str| parse_areas(t, 1 << 20).unwrap_err();
        assert!(matches!(e("1 2 3"), AreasError::Shape { line: 1, .. }));
        assert!(matches!(e("\n5"), AreasError::Shape { line: 2, .. }));
        assert!(matches!(e("x 1"), AreasError::Number { .. }));
        assert!(matches!(e("-1 1"), AreasError::Number { .. }));
        assert!(matches!(e("0 2000000"), AreasError::Outside { .. }));
        assert!(matches!(e(&format!("{} 2", u64::MAX)), AreasError::Outside { .. }));
        assert!(e(&"x".repeat(10_000)).to_string().len() < 200, "long lines are cut in messages");
    }
}
