//! API versions (`8.0.2.0`) compared numerically, and the support matrix they are checked
//! against: vCenter 5.1 to 8.0, ESXi 5.0 to 8.0; newer ones run with a warning.

use std::cmp::Ordering;
use std::fmt;

/// An API version: numeric components, missing ones read as 0 (`6.7` == `6.7.0.0`).
#[derive(Debug, Clone)]
pub struct ApiVersion(Vec<u32>);

impl ApiVersion {
    /// Parses `8.0.2.0`; `None` when a component is not a number.
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Option<Vec<u32>> = s.trim().split('.').map(|p| p.parse().ok()).collect();
        parts.filter(|p| !p.is_empty() && p.len() <= 6).map(Self)
    }

    /// The major number.
    pub fn major(&self) -> u32 {
        self.0.first().copied().unwrap_or(0)
    }

    /// The minor number.
    pub fn minor(&self) -> u32 {
        self.at(1)
    }

    fn at(&self, i: usize) -> u32 {
        self.0.get(i).copied().unwrap_or(0)
    }

    /// At least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.at(0), self.at(1)) >= (major, minor)
    }
}

impl PartialEq for ApiVersion {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ApiVersion {}

impl PartialOrd for ApiVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ApiVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.0.len().max(other.0.len());
        (0..n).map(|i| self.at(i).cmp(&other.at(i))).find(|o| o.is_ne()).unwrap_or(Ordering::Equal)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.0.iter().map(u32::to_string).collect();
        f.write_str(&s.join("."))
    }
}

/// What kind of server answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// vCenter (`apiType` `VirtualCenter`).
    VCenter,
    /// A standalone ESXi host (`HostAgent`).
    Esxi,
}

/// Where a server stands against the support matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// Inside the matrix.
    Supported,
    /// Newer than the matrix: it runs, with a warning.
    Untested(String),
    /// Older than the matrix, or unrecognisable.
    Unsupported(String),
}

/// Checks `api_type` and `api_version` (from `ServiceContent.about`) against the matrix.
pub fn support(api_type: &str, api_version: &str) -> (Option<Product>, Support) {
    let product = match api_type {
        "VirtualCenter" => Some(Product::VCenter),
        "HostAgent" => Some(Product::Esxi),
        _ => None,
    };
    let Some(p) = product else {
        return (None, Support::Unsupported(format!("the server's API type {api_type:?} is neither vCenter nor ESXi")));
    };
    let Some(v) = ApiVersion::parse(api_version) else {
        return (product, Support::Unsupported(format!("the API version {api_version:?} is not a version number")));
    };
    let (name, min) = match p {
        Product::VCenter => ("vCenter", (5, 1)),
        Product::Esxi => ("ESXi", (5, 0)),
    };
    let s = if !v.at_least(min.0, min.1) {
        Support::Unsupported(format!("{name} API {v} is older than {}.{}, the oldest supported", min.0, min.1))
    } else if v.major() > 8 {
        Support::Untested(format!("{name} API {v} is newer than 8.0, the newest tested; proceeding"))
    } else {
        Support::Supported
    };
    (product, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically_with_missing_parts_as_zero() {
        let v = |s| ApiVersion::parse(s).unwrap();
        assert!(v("6.7.3") > v("6.7"));
        assert_eq!(v("8.0"), v("8.0.0.0"));
        assert!(v("7.0.10.0") > v("7.0.3.0"));
        assert!(ApiVersion::parse("8.x").is_none());
    }

    #[test]
    fn the_matrix() {
        assert_eq!(support("VirtualCenter", "5.1").1, Support::Supported);
        assert!(matches!(support("VirtualCenter", "5.0").1, Support::Unsupported(_)));
        assert_eq!(support("HostAgent", "5.0").1, Support::Supported);
        assert_eq!(support("HostAgent", "8.0.3.0").1, Support::Supported);
        assert!(matches!(support("VirtualCenter", "9.0.0.0").1, Support::Untested(m) if m.contains("newer")));
        assert!(matches!(support("Other", "8.0").1, Support::Unsupported(_)));
    }
}
