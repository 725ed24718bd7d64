//! The support lists kept as data in the repository, not code: guest operating systems
//! (`data/guest-os.toml`) and the snapshots other backup products leave
//! (`data/backup-products.toml`). Both are compiled in and parsed once; a test parses them.

use std::sync::LazyLock;

use serde::Deserialize;

/// How a guest operating system is backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestSupport {
    /// Image backups, quiesced through VMware Tools.
    Supported,
    /// Image backups work; the guest cannot be quiesced reliably.
    CrashConsistent,
    /// Not backed up this way.
    Unsupported,
}

/// One entry of the guest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// guestId patterns (`*` matches any run of characters).
    pub ids: Vec<String>,
    /// `windows`, `linux`, `other`.
    pub family: String,
    /// How it is backed up.
    pub support: GuestSupport,
    /// Why, in a few words.
    pub note: String,
}

/// Another backup product, recognised by words in its snapshots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Its name.
    pub name: String,
    /// Words in a snapshot's name or description that mark it as this product's.
    pub words: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Guests {
    guest: Vec<Guest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Products {
    product: Vec<Product>,
}

const GUESTS_TOML: &str = include_str!("../data/guest-os.toml");
const PRODUCTS_TOML: &str = include_str!("../data/backup-products.toml");

// A list that does not parse is caught by the tests below; a build with one would match nothing.
static GUESTS: LazyLock<Vec<Guest>> =
    LazyLock::new(|| toml::from_str::<Guests>(GUESTS_TOML).map(|g| g.guest).unwrap_or_default());
static PRODUCTS: LazyLock<Vec<Product>> =
    LazyLock::new(|| toml::from_str::<Products>(PRODUCTS_TOML).map(|p| p.product).unwrap_or_default());

/// Whether `pattern` (with `*` wildcards) matches all of `text`.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let tail: Vec<&str> = parts.collect();
    let Some((last, middle)) = tail.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The guest list's entry for `guest_id`, if any pattern matches it.
pub fn guest(guest_id: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.ids.iter().any(|p| glob(p, guest_id)))
}

/// The backup product whose snapshot this is, when its name or description says so.
pub fn product_of(name: &str, description: &str) -> Option<&'static str> {
    let (name, description) = (name.to_lowercase(), description.to_lowercase());
    PRODUCTS
        .iter()
        .find(|p| p.words.iter().map(|w| w.to_lowercase()).any(|w| name.contains(&w) || description.contains(&w)))
        .map(|p| p.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_parse_and_are_not_empty() {
        let g: Guests = toml::from_str(GUESTS_TOML).unwrap();
        let p: Products = toml::from_str(PRODUCTS_TOML).unwrap();
        assert!(g.guest.len() >= 5 && p.product.len() >= 5);
        assert!(g.guest.iter().all(|x| !x.ids.is_empty() && !x.note.is_empty()));
        assert!(p.product.iter().all(|x| !x.words.is_empty()));
    }

    #[test]
    fn globs_match_whole_ids() {
        assert!(glob("windows2019srv*", "windows2019srvNext_64Guest"));
        assert!(glob("other*Linux*", "other5xLinux64Guest"));
        assert!(glob("otherGuest", "otherGuest"));
        assert!(!glob("otherGuest", "otherGuest64"));
        assert!(!glob("rhel*", "xrhel9_64Guest"));
        assert!(glob("*", ""));
        assert!(!glob("a*a", "a"));
    }

    #[test]
    fn guests_and_products_are_recognised() {
        assert_eq!(guest("windows2019srvNext_64Guest").map(|g| g.support), Some(GuestSupport::Supported));
        assert_eq!(guest("ubuntu64Guest").map(|g| g.family.as_str()), Some("linux"));
        assert_eq!(guest("rhel5_64Guest").map(|g| g.support), Some(GuestSupport::CrashConsistent));
        assert_eq!(guest("rhel9_64Guest").map(|g| g.support), Some(GuestSupport::Supported));
        assert_eq!(guest("win95Guest").map(|g| g.support), Some(GuestSupport::Unsupported));
        assert!(guest("madeUpGuest").is_none());
        assert_eq!(product_of("VEEAM BACKUP TEMPORARY SNAPSHOT", ""), Some("Veeam Backup & Replication"));
        assert_eq!(product_of("x", "made by rubrik"), Some("Rubrik"));
        assert_eq!(product_of("before-upgrade", "an operator's"), None);
    }
}
