//! Which restore points a retention policy keeps: the last N, and the newest in each of the
//! last N hours, days, ISO weeks, months and years (UTC), counted per source (a VM or an
//! image), as restic and Proxmox Backup do. Selection only; removing is [`Repo::prune`].
//!
//! [`Repo::prune`]: crate::Repo::prune

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::format::Manifest;

/// How many restore points to keep, per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// The newest N.
    pub last: u32,
    /// The newest in each of the last N hours that have one.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks (Monday to Sunday).
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
}

impl Retention {
    /// Whether it keeps nothing at all (refused: a prune would remove every restore point).
    pub fn keeps_nothing(&self) -> bool {
        *self == Self::default()
    }
}

/// The decision for one restore point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The restore point.
    pub id: String,
    /// Its source.
    pub source: String,
    /// Why it is kept (`last`, `daily`, ...); empty when it goes.
    pub reasons: Vec<&'static str>,
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The bucket keys of a time (seconds since the epoch): hour, day, ISO week, month, year.
fn buckets(secs: i64) -> [i64; 5] {
    let days = secs.div_euclid(86_400);
    let (y, m, _) = civil(days);
    // 1970-01-01 was a Thursday; weeks start on Monday, so shift by three days.
    [secs.div_euclid(3600), days, (days + 3).div_euclid(7), y * 12 + i64::from(m), y]
}

/// The seconds since the epoch of a manifest's time; `None` when it cannot be read.
fn seconds(m: &Manifest) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(&m.time).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_secs()).ok()
}

/// The source a restore point belongs to, for counting.
pub fn source_key(m: &Manifest) -> String {
    m.source.instance_uuid.clone().unwrap_or_else(|| m.source.name.clone())
}

/// Decides, for every restore point, whether `policy` keeps it and why. A restore point whose
/// time cannot be read is kept (with reason `unreadable-time`): never remove what is not
/// understood.
pub fn select(points: &[Manifest], policy: &Retention) -> Vec<Decision> {
    let mut by_source: BTreeMap<String, Vec<&Manifest>> = BTreeMap::new();
    for m in points {
        by_source.entry(source_key(m)).or_default().push(m);
    }
    let mut out = Vec::new();
    for (source, mut ms) in by_source {
        // Newest first.
        ms.sort_by(|a, b| b.id.cmp(&a.id));
        let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); ms.len()];
        for (i, m) in ms.iter().enumerate() {
            if seconds(m).is_none() {
                reasons[i].push("unreadable-time");
            }
            if i < policy.last as usize {
                reasons[i].push("last");
            }
        }
        let tiers: [(&'static str, u32); 5] = [
            ("hourly", policy.hourly),
            ("daily", policy.daily),
            ("weekly", policy.weekly),
            ("monthly", policy.monthly),
            ("yearly", policy.yearly),
        ];
        for (t, (name, n)) in tiers.into_iter().enumerate() {
            let mut seen = BTreeSet::new();
            for (i, m) in ms.iter().enumerate() {
                if seen.len() >= n as usize {
                    break;
                }
                let Some(s) = seconds(m) else { continue };
                if seen.insert(buckets(s)[t]) {
                    reasons[i].push(name);
                }
            }
        }
        for (m, r) in ms.into_iter().zip(reasons) {
            out.push(Decision { id: m.id.clone(), source: source.clone(), reasons: r });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Consistency, SourceInfo};

    fn point(source: &str, time: &str) -> Manifest {
        Manifest {
            format: 1,
            id: format!("{}-{source}", time.replace(['-', ':'], "")),
            time: time.into(),
            parent: None,
            source: SourceInfo { name: source.into(), instance_uuid: None },
            consistency: Consistency::Crash,
            disks: Vec::new(),
            files: Vec::new(),
        }
    }

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| !d.reasons.is_empty()).map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn calendar_arithmetic_matches_known_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
        // 2024-01-01 was a Monday, 2023-12-31 a Sunday: different ISO weeks.
        assert_ne!(buckets(19_723 * 86_400)[2], buckets(19_722 * 86_400)[2]);
        assert_eq!(buckets(19_723 * 86_400)[2], buckets(19_729 * 86_400)[2]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_per_source() {
        let ps = vec![
            point("a", "2026-11-20T01:00:00Z"),
            point("a", "2026-11-20T23:00:00Z"),
            point("a", "2026-11-21T05:00:00Z"),
            point("a", "2026-11-22T05:00:00Z"),
            point("b", "2026-11-01T05:00:00Z"),
        ];
        let d = select(&ps, &Retention { daily: 2, ..Default::default() });
        assert_eq!(kept(&d), ["20261101T050000Z-b", "20261121T050000Z-a", "20261122T050000Z-a"]);
        let d = select(&ps, &Retention { last: 1, monthly: 1, ..Default::default() });
        assert_eq!(kept(&d), ["20261101T050000Z-b", "20261122T050000Z-a"]);
        let d = select(&ps, &Retention { daily: 3, ..Default::default() });
        assert!(kept(&d).contains(&"20261120T230000Z-a") && !kept(&d).contains(&"20261120T010000Z-a"));
    }

    #[test]
    fn unreadable_times_are_kept() {
        let mut p = point("a", "2026-11-20T01:00:00Z");
        p.time = "yesterday".into();
        let d = select(&[p], &Retention { last: 0, daily: 1, ..Default::default() });
        assert_eq!(d[0].reasons, ["unreadable-time"]);
    }
}
