//! When a daemon's job runs: `every 6h`, `daily 02:30` or a five-field cron expression
//! (`cron 30 2 * * 1-5`), the last two in UTC or in a named IANA time zone
//! (`daily 02:30 Europe/Berlin`). A time that a daylight-saving change skips runs as far
//! after the change as it was meant to be into the gap (02:30 on a spring-forward night runs
//! at 03:30, the gap's length later); one that the change repeats runs once, the first time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;

/// The longest interval of an `every` schedule.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * 86_400);

/// How far ahead a cron schedule is searched for its next run (`0 0 29 2 *` waits up to
/// eight years across a century that is not a leap year).
const SEARCH_DAYS: u32 = 8 * 366 + 1;

/// When a job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// `every 6h`: at this interval from the daemon's start.
    Every(Duration),
    /// `daily 02:30 [ZONE]`: once a day at this wall-clock time.
    Daily {
        /// Hour and minute.
        at: (i8, i8),
        /// The zone the time is in (UTC unless named).
        zone: Zone,
    },
    /// `cron MIN HOUR DOM MON DOW [ZONE]`.
    Cron {
        /// The fields, as sets.
        cron: Cron,
        /// The zone the fields are in (UTC unless named).
        zone: Zone,
    },
}

/// A time zone by name (IANA), or UTC.
#[derive(Debug, Clone)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl PartialEq for Zone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Zone {
    /// UTC.
    pub fn utc() -> Self {
        Self { name: "UTC".into(), tz: TimeZone::UTC }
    }

    /// A zone of the IANA database (`Europe/Berlin`), from the system's copy when it has
    /// one, else the copy built in.
    pub fn named(name: &str) -> Result<Self, String> {
        if name.eq_ignore_ascii_case("utc") {
            return Ok(Self::utc());
        }
        TimeZone::get(name).map(|tz| Self { name: name.to_owned(), tz }).map_err(|_| {
            format!("{name:?} is not a time zone of the IANA database (write Europe/Berlin, America/New_York or UTC)")
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The five fields of a cron expression, each as the set of values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Both day fields were restricted: a day matches either (cron's rule).
    either_day: bool,
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field: `*`, `N`, `A-B`, any of them with `/STEP`, comma-separated; as a bit set of
/// the values in `lo..=hi`. `names` are accepted for values from `name_base` up.
fn field(text: &str, what: &str, (lo, hi): (u32, u32), names: &[&str], name_base: u32) -> Result<u64, String> {
    let value = |v: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
            return Ok(name_base + u32::try_from(i).unwrap_or(0));
        }
        let n: u32 = v.parse().map_err(|_| format!("{what} {v:?} is not a number"))?;
        if n < lo || n > hi {
            return Err(format!("{what} {n} is out of {lo} to {hi}"));
        }
        Ok(n)
    };
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("{what} step {s:?} is not a number"))?;
                if step == 0 || step > hi {
                    return Err(format!("{what} step {step} is out of 1 to {hi}"));
                }
                (r, Some(step))
            }
            None => (part, None),
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `5/15` means from 5 to the end, every 15 (and `5/1` every one from 5).
                None if step.is_some() => (value(r)?, hi),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        let step = step.unwrap_or(1);
        if a > b {
            return Err(format!("{what} range {a}-{b} runs backwards"));
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

impl Cron {
    /// Reads `MIN HOUR DOM MON DOW`.
    pub fn parse(fields: &[&str]) -> Result<Self, String> {
        let [m, h, dom, mon, dow] = fields else {
            return Err(format!(
                "a cron expression has 5 fields (minute hour day month weekday), not {}",
                fields.len()
            ));
        };
        let mut weekdays = field(dow, "weekday", (0, 7), &WEEKDAYS, 0)?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        Ok(Self {
            minutes: field(m, "minute", (0, 59), &[], 0)?,
            hours: u32::try_from(field(h, "hour", (0, 23), &[], 0)?).unwrap_or(0),
            days: u32::try_from(field(dom, "day", (1, 31), &[], 0)?).unwrap_or(0),
            months: u16::try_from(field(mon, "month", (1, 12), &MONTHS, 1)?).unwrap_or(0),
            weekdays: u8::try_from(weekdays).unwrap_or(0),
            // As cron has it: a field that starts with `*` (`*/2` too) does not restrict.
            either_day: !dom.starts_with('*') && !dow.starts_with('*'),
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        let month_ok = self.months & (1 << d.month()) != 0;
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        month_ok && if self.either_day { dom || dow } else { dom && dow }
    }
}

impl Schedule {
    /// Reads `every DURATION` (a second to a year), `daily HH:MM [ZONE]` or
    /// `cron MIN HOUR DOM MON DOW [ZONE]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        let zone = |w: Option<&&str>| w.map_or_else(|| Ok(Zone::utc()), |z| Zone::named(z));
        match words.first().copied() {
            Some("every") => {
                let d = humantime::parse_duration(t["every".len()..].trim()).map_err(|e| format!("{s:?}: {e}"))?;
                if d < Duration::from_secs(1) || d > MAX_INTERVAL {
                    return Err(format!("{s:?}: the interval must be between a second and a year"));
                }
                Ok(Self::Every(d))
            }
            Some("daily") if (2..=3).contains(&words.len()) => {
                let (h, m) = words[1].split_once(':').ok_or_else(|| format!("{s:?}: write daily HH:MM"))?;
                let (h, m): (i8, i8) = (
                    h.parse().map_err(|_| format!("{s:?}: the hour is not a number"))?,
                    m.parse().map_err(|_| format!("{s:?}: the minute is not a number"))?,
                );
                if !(0..=23).contains(&h) || !(0..=59).contains(&m) {
                    return Err(format!("{s:?}: no such time of day"));
                }
                Ok(Self::Daily { at: (h, m), zone: zone(words.get(2)).map_err(|e| format!("{s:?}: {e}"))? })
            }
            Some("cron") if (6..=7).contains(&words.len()) => Ok(Self::Cron {
                cron: Cron::parse(&words[1..6]).map_err(|e| format!("{s:?}: {e}"))?,
                zone: zone(words.get(6)).map_err(|e| format!("{s:?}: {e}"))?,
            }),
            Some("cron") => Err(format!("{s:?}: write cron MIN HOUR DAY MONTH WEEKDAY [ZONE]")),
            _ => Err(format!(
                "{s:?}: write \"every 6h\", \"daily 02:30 [ZONE]\" or \"cron 30 2 * * 1-5 [ZONE]\" (UTC unless a zone \
                 such as Europe/Berlin is named)"
            )),
        }
    }

    /// The first run strictly after `after`, for a daemon that started at `start`.
    pub fn next_after(&self, start: SystemTime, after: SystemTime) -> SystemTime {
        match self {
            Self::Every(d) => {
                let since = after.duration_since(start).unwrap_or_default();
                let n = since.as_nanos() / d.as_nanos().max(1) + 1;
                let offset = d.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
                // Past what the clock can say: an interval from now instead.
                start.checked_add(offset).filter(|t| *t > after).or_else(|| after.checked_add(*d)).unwrap_or(after)
            }
            Self::Daily { at, zone } => {
                let every_day = Cron {
                    minutes: 1 << at.1,
                    hours: 1 << at.0,
                    days: u32::MAX,
                    months: u16::MAX,
                    weekdays: u8::MAX,
                    either_day: false,
                };
                next_cron(&every_day, &zone.tz, after)
            }
            Self::Cron { cron, zone } => next_cron(cron, &zone.tz, after),
        }
    }
}

/// The first instant after `after` whose wall-clock time in `tz` matches `cron`; a day later
/// when none does within [`SEARCH_DAYS`] (an expression such as `0 0 31 2 *` never matches).
fn next_cron(cron: &Cron, tz: &TimeZone, after: SystemTime) -> SystemTime {
    let secs = after.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let fallback = after + Duration::from_secs(86_400);
    let Ok(now) = jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(i64::MAX)) else { return fallback };
    // From the day before, in case a time skipped by a DST change lands after midnight.
    let Ok(mut day) = now.to_zoned_datetime(tz.clone()).date().yesterday() else { return fallback };
    for _ in 0..SEARCH_DAYS {
        if cron.day_matches(day) {
            for h in (0..24i8).filter(|h| cron.hours & (1 << h) != 0) {
                for m in (0..60i8).filter(|m| cron.minutes & (1 << m) != 0) {
                    let local: DateTime = day.at(h, m, 0, 0);
                    let Ok(at) = tz.to_ambiguous_timestamp(local).compatible() else { continue };
                    if at.as_second() > now.as_second() {
                        return UNIX_EPOCH + Duration::from_secs(u64::try_from(at.as_second()).unwrap_or(0));
                    }
                }
            }
        }
        match day.tomorrow() {
            Ok(d) => day = d,
            Err(_) => break,
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    fn next(s: &str, after: &str) -> String {
        let t = Schedule::parse(s).unwrap().next_after(at(after), at(after));
        humantime::format_rfc3339_seconds(t).to_string()
    }

    #[test]
    fn daily_times_are_utc_unless_a_zone_is_named_and_follow_its_summer_time() {
        assert_eq!(next("daily 02:30", "2026-12-06T23:00:00Z"), "2026-12-07T02:30:00Z");
        assert_eq!(next("daily 02:30", "2026-12-07T02:30:00Z"), "2026-12-08T02:30:00Z", "strictly after");
        // Berlin is UTC+1 in winter, UTC+2 in summer.
        assert_eq!(next("daily 02:30 Europe/Berlin", "2026-12-06T23:00:00Z"), "2026-12-07T01:30:00Z");
        assert_eq!(next("daily 02:30 Europe/Berlin", "2026-07-01T12:00:00Z"), "2026-07-02T00:30:00Z");
        // 2026-03-29 02:30 does not exist in Berlin: the run is an hour later, 03:30 CEST.
        assert_eq!(next("daily 02:30 Europe/Berlin", "2026-03-28T12:00:00Z"), "2026-03-29T01:30:00Z");
        assert_eq!(next("daily 02:30 Europe/Berlin", "2026-03-29T01:30:00Z"), "2026-03-30T00:30:00Z");
        // 2026-10-25 02:30 happens twice: one run, the first time.
        assert_eq!(next("daily 02:30 Europe/Berlin", "2026-10-24T12:00:00Z"), "2026-10-25T00:30:00Z");
        assert_eq!(next("daily 02:30 Europe/Berlin", "2026-10-25T00:30:00Z"), "2026-10-26T01:30:00Z");
        assert_eq!(next("daily 19:00 America/New_York", "2026-12-06T23:00:00Z"), "2026-12-07T00:00:00Z");
    }

    #[test]
    fn cron_expressions_follow_cron_rules() {
        // Weekdays at 02:30: Friday the 4th, then Monday the 7th.
        assert_eq!(next("cron 30 2 * * 1-5", "2026-12-04T03:00:00Z"), "2026-12-07T02:30:00Z");
        assert_eq!(next("cron 30 2 * * mon-fri", "2026-12-04T03:00:00Z"), "2026-12-07T02:30:00Z");
        assert_eq!(next("cron */15 * * * *", "2026-12-04T03:07:10Z"), "2026-12-04T03:15:00Z");
        assert_eq!(next("cron 0 */6 * * *", "2026-12-04T03:07:00Z"), "2026-12-04T06:00:00Z");
        assert_eq!(next("cron 5/20 1 * * *", "2026-12-04T01:30:00Z"), "2026-12-04T01:45:00Z");
        assert_eq!(next("cron 58/1 1 * * *", "2026-12-04T01:58:00Z"), "2026-12-04T01:59:00Z", "5/1: 5 to the end");
        // `*/1` in the day field does not restrict it: weekdays only, not every day.
        assert_eq!(next("cron 0 2 */1 * 1-5", "2026-12-05T00:00:00Z"), "2026-12-07T02:00:00Z");
        assert_eq!(next("cron 0 0 1,15 * *", "2026-12-04T00:00:00Z"), "2026-12-15T00:00:00Z");
        assert_eq!(next("cron 0 4 * jan,jul sun", "2026-12-04T00:00:00Z"), "2027-01-03T04:00:00Z");
        // Both day fields: either matches (the 1st, or any Sunday).
        assert_eq!(next("cron 0 0 1 * 0", "2026-12-02T00:00:00Z"), "2026-12-06T00:00:00Z");
        assert_eq!(next("cron 0 0 * * 7", "2026-12-02T00:00:00Z"), "2026-12-06T00:00:00Z", "7 is Sunday");
        // The 29th of February: the next leap year.
        assert_eq!(next("cron 0 0 29 2 *", "2026-12-04T00:00:00Z"), "2028-02-29T00:00:00Z");
        assert_eq!(next("cron 0 3 * * 6 Europe/Berlin", "2026-12-04T00:00:00Z"), "2026-12-05T02:00:00Z");
        // Never: a day later, not a hang.
        assert_eq!(next("cron 0 0 31 2 *", "2026-12-04T00:00:00Z"), "2026-12-05T00:00:00Z");
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (s, want) in [
            ("weekly", "write \"every 6h\""),
            ("daily 25:00", "no such time"),
            ("daily 02:30 Mars/Olympus", "not a time zone"),
            ("daily 02:30 Europe/Berlin extra", "write \"every 6h\""),
            ("cron 0 2 * *", "write cron MIN HOUR"),
            ("cron 60 2 * * *", "minute 60 is out of 0 to 59"),
            ("cron 0 2 * * 8", "weekday 8"),
            ("cron 0 2 10-5 * *", "runs backwards"),
            ("cron */0 2 * * *", "step 0"),
            ("cron 0 2 * smarch *", "month \"smarch\""),
            ("every 0s", "between a second and a year"),
        ] {
            let e = Schedule::parse(s).unwrap_err();
            assert!(e.contains(want), "{s}: {want} in {e}");
        }
    }

    #[test]
    fn every_counts_from_the_start() {
        let start = at("2026-12-04T00:00:00Z");
        let s = Schedule::parse("every 6h").unwrap();
        assert_eq!(s.next_after(start, at("2026-12-04T07:00:00Z")), at("2026-12-04T12:00:00Z"));
    }

    #[test]
    fn every_and_daily_in_seconds_since_the_epoch() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let every = Schedule::parse("every 1h").unwrap();
        assert_eq!(every.next_after(start, start), start + Duration::from_secs(3600));
        assert_eq!(every.next_after(start, start + Duration::from_secs(3700)), start + Duration::from_secs(7200));
        let daily = Schedule::parse("daily 02:30").unwrap();
        let day = 86_400 * 20_000;
        let t = UNIX_EPOCH + Duration::from_secs(day + 3600);
        assert_eq!(daily.next_after(start, t), UNIX_EPOCH + Duration::from_secs(day + 9000));
        let t = UNIX_EPOCH + Duration::from_secs(day + 9000);
        assert_eq!(daily.next_after(start, t), UNIX_EPOCH + Duration::from_secs(day + 86_400 + 9000));
        for bad in ["weekly", "every 0s", "every x", "daily 7", "daily 24:00", "daily 1:60", "every 3 32yr6y"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
