//! vSphere CBT change IDs: `52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/17` and `*`.
//!
//! The UUID part is the CBT *epoch*: it changes whenever change tracking is reinitialised, and a
//! change in it means earlier change IDs no longer describe this disk. The number after the `/`
//! grows with every snapshot. A string that does not parse is kept, verbatim, as an *opaque*
//! change ID: it can still be sent back to `QueryChangedDiskAreas` and compared for equality,
//! but an epoch change cannot be seen in it, so the planner relies on the query's faults instead.
//! Parsing never fails and never panics: it only decides how much we can tell from the string.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The UUID part of a change ID, which names one CBT epoch of a disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch([u8; 16]);

impl Epoch {
    /// The epoch with these 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes of the epoch's UUID.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Epoch {
    /// VMware's own spelling: lowercase byte pairs, spaces, and a `-` after the eighth byte.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            let sep = match i {
                0 => "",
                8 => "-",
                _ => " ",
            };
            write!(f, "{sep}{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({self})")
    }
}

impl Serialize for Epoch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let mut cursor = Cursor { bytes: text.as_bytes(), pos: 0 };
        match cursor.epoch() {
            Ok(epoch) if cursor.pos == text.len() => Ok(epoch),
            _ => Err(serde::de::Error::custom(format!("not a CBT epoch: {text:?}"))),
        }
    }
}

/// What a change ID's text tells us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeIdKind {
    /// `*`: not a point in time but the request "every allocated area" (for a first copy).
    AllAllocated,
    /// A parsed change ID: the epoch and the sequence number within it.
    Tracked {
        /// The CBT epoch (the UUID part).
        epoch: Epoch,
        /// The number after the `/`.
        sequence: u64,
    },
    /// A string that does not have the documented shape; kept as it is.
    Opaque(OpaqueReason),
}

/// Why a change ID was kept as an opaque string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpaqueReason {
    /// The byte offset in the (trimmed) text where parsing stopped.
    pub column: usize,
    /// What was expected there.
    pub expected: &'static str,
}

impl fmt::Display for OpaqueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected {} at column {}", self.expected, self.column)
    }
}

/// A CBT change ID as vSphere reported it, with what could be parsed out of it.
///
/// The original text is always kept and is what [`ChangeId::as_str`] returns and what is
/// serialised, so the exact string goes back to the server.
#[derive(Clone, Debug)]
pub struct ChangeId {
    raw: String,
    kind: ChangeIdKind,
}

/// Longest text parsed for structure. Longer strings are kept (they are the input) but opaque.
const MAX_PARSED_LEN: usize = 128;

impl ChangeId {
    /// Reads a change ID. Never fails: text without the documented shape becomes
    /// [`ChangeIdKind::Opaque`], and [`ChangeId::warning`] says why.
    pub fn parse(text: &str) -> Self {
        let trimmed = text.trim_ascii();
        let kind = if trimmed == "*" {
            ChangeIdKind::AllAllocated
        } else if trimmed.len() > MAX_PARSED_LEN {
            ChangeIdKind::Opaque(OpaqueReason { column: MAX_PARSED_LEN, expected: "a shorter change ID" })
        } else {
            let mut cursor = Cursor { bytes: trimmed.as_bytes(), pos: 0 };
            match cursor.tracked() {
                Ok((epoch, sequence)) => ChangeIdKind::Tracked { epoch, sequence },
                Err(reason) => ChangeIdKind::Opaque(reason),
            }
        };
        Self { raw: text.to_owned(), kind }
    }

    /// The `*` change ID, which asks `QueryChangedDiskAreas` for the allocated areas.
    pub fn all_allocated() -> Self {
        Self::parse("*")
    }

    /// A change ID from its parts, spelled as VMware spells it.
    pub fn tracked(epoch: Epoch, sequence: u64) -> Self {
        Self { raw: format!("{epoch}/{sequence}"), kind: ChangeIdKind::Tracked { epoch, sequence } }
    }

    /// The text exactly as it was received: the string to send back to the server.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// What the text tells us.
    pub fn kind(&self) -> &ChangeIdKind {
        &self.kind
    }

    /// The epoch, when the change ID parsed.
    pub fn epoch(&self) -> Option<Epoch> {
        match self.kind {
            ChangeIdKind::Tracked { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// The sequence number, when the change ID parsed.
    pub fn sequence(&self) -> Option<u64> {
        match self.kind {
            ChangeIdKind::Tracked { sequence, .. } => Some(sequence),
            _ => None,
        }
    }

    /// Whether this is `*` rather than a point in time.
    pub fn is_all_allocated(&self) -> bool {
        self.kind == ChangeIdKind::AllAllocated
    }

    /// Why this change ID is opaque, as a sentence for the log; `None` when it parsed.
    pub fn warning(&self) -> Option<String> {
        match &self.kind {
            ChangeIdKind::Opaque(reason) => Some(format!(
                "change ID {:?} has an unknown format ({reason}); it is used as an opaque string, \
                 so a CBT reset can only be noticed through QueryChangedDiskAreas faults",
                self.raw
            )),
            _ => None,
        }
    }
}

impl PartialEq for ChangeId {
    /// Parsed IDs compare by epoch and sequence (so spelling does not matter); anything else
    /// compares by its text.
    fn eq(&self, other: &Self) -> bool {
        match (&self.kind, &other.kind) {
            (ChangeIdKind::Tracked { .. }, ChangeIdKind::Tracked { .. }) => self.kind == other.kind,
            (ChangeIdKind::AllAllocated, ChangeIdKind::AllAllocated) => true,
            _ => self.raw == other.raw,
        }
    }
}

impl Eq for ChangeId {}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Serialize for ChangeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for ChangeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self::parse(&s))
    }
}

/// A byte cursor over the trimmed text; every step checks bounds and reports where it stopped.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn tracked(&mut self) -> Result<(Epoch, u64), OpaqueReason> {
        let epoch = self.epoch()?;
        self.expect(b'/', "'/' after the epoch")?;
        let sequence = self.decimal()?;
        if self.pos != self.bytes.len() {
            return Err(self.fail("the end after the sequence number"));
        }
        Ok((epoch, sequence))
    }

    fn epoch(&mut self) -> Result<Epoch, OpaqueReason> {
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            match i {
                0 => {}
                8 => self.expect(b'-', "'-' after the eighth byte")?,
                _ => self.expect(b' ', "a space between bytes")?,
            }
            *b = self.hex_byte()?;
        }
        Ok(Epoch(bytes))
    }

    fn hex_byte(&mut self) -> Result<u8, OpaqueReason> {
        let hi = self.hex_digit()?;
        let lo = self.hex_digit()?;
        Ok(hi << 4 | lo)
    }

    fn hex_digit(&mut self) -> Result<u8, OpaqueReason> {
        let digit = self.bytes.get(self.pos).and_then(|&c| (c as char).to_digit(16));
        let digit = digit.ok_or_else(|| self.fail("a hex digit"))?;
        self.pos += 1;
        // A hex digit is below 16.
        Ok(u8::try_from(digit).unwrap_or(0))
    }

    fn decimal(&mut self) -> Result<u64, OpaqueReason> {
        let start = self.pos;
        let mut value: u64 = 0;
        while let Some(&c) = self.bytes.get(self.pos).filter(|c| c.is_ascii_digit()) {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or_else(|| self.fail("a sequence number below 2^64"))?;
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.fail("a decimal sequence number"));
        }
        Ok(value)
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), OpaqueReason> {
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.fail(expected))
        }
    }

    fn fail(&self, expected: &'static str) -> OpaqueReason {
        OpaqueReason { column: self.pos, expected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/17";

    #[test]
    fn parses_the_documented_shape() {
        let id = ChangeId::parse(SAMPLE);
        assert_eq!(id.sequence(), Some(17));
        assert_eq!(id.epoch().unwrap().to_string(), SAMPLE[..SAMPLE.len() - 3]);
        assert_eq!(id.as_str(), SAMPLE);
        assert!(id.warning().is_none());
        assert_eq!(ChangeId::tracked(id.epoch().unwrap(), 17).as_str(), SAMPLE);
    }

    #[test]
    fn table_of_shapes() {
        // (text, parsed?, column where an opaque one stopped)
        let cases: &[(&str, Option<u64>, Option<usize>)] = &[
            (SAMPLE, Some(17), None),
            ("52 2D 7B 8F AC 61 51 CC-77 4C 7B EC 91 50 BB 7B/0", Some(0), None),
            (" 52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/3\n", Some(3), None),
            ("", None, Some(0)),
            ("52 2d 7b 8f ac 61 51 cc 77 4c 7b ec 91 50 bb 7b/17", None, Some(23)),
            ("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b", None, Some(47)),
            ("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/", None, Some(48)),
            ("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/17x", None, Some(50)),
            ("52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/99999999999999999999", None, Some(67)),
            ("5 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/1", None, Some(1)),
            ("vendor-specific-id-42", None, Some(0)),
            ("é2 2d", None, Some(0)),
        ];
        for &(text, sequence, column) in cases {
            let id = ChangeId::parse(text);
            assert_eq!(id.sequence(), sequence, "{text:?}");
            match id.kind() {
                ChangeIdKind::Opaque(r) => assert_eq!(Some(r.column), column, "{text:?}: {r}"),
                _ => assert_eq!(column, None, "{text:?}"),
            }
            assert_eq!(id.as_str(), text, "the text is kept verbatim");
            assert_eq!(id.warning().is_some(), column.is_some());
        }
    }

    #[test]
    fn star_and_equality() {
        assert!(ChangeId::parse("*").is_all_allocated());
        assert_eq!(ChangeId::parse(SAMPLE), ChangeId::parse(&SAMPLE.to_uppercase()));
        assert_ne!(ChangeId::parse(SAMPLE), ChangeId::parse(&SAMPLE.replace("/17", "/18")));
        assert_eq!(ChangeId::parse("opaque-1"), ChangeId::parse("opaque-1"));
        assert_ne!(ChangeId::parse("opaque-1"), ChangeId::parse("opaque-2"));
    }

    #[test]
    fn serde_keeps_the_original_text() {
        for text in [SAMPLE, "*", "opaque-1"] {
            let json = serde_json::to_string(&ChangeId::parse(text)).unwrap();
            let back: ChangeId = serde_json::from_str(&json).unwrap();
            assert_eq!(back.as_str(), text);
        }
        let epoch = ChangeId::parse(SAMPLE).epoch().unwrap();
        let back: Epoch = serde_json::from_str(&serde_json::to_string(&epoch).unwrap()).unwrap();
        assert_eq!(back, epoch);
        assert!(serde_json::from_str::<Epoch>("\"52 2d\"").is_err());
    }
}
