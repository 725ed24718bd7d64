//! Fuzz entry point for the `proxy serve` configuration: any text either parses into a
//! configuration whose every schedule, size and duration can be used, or is refused with a
//! message; it never panics.

use std::time::{Duration, UNIX_EPOCH};

use orchestration::config::{Schedule, ServeConfig};

/// Parses arbitrary text as a configuration.
pub fn serve_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match ServeConfig::from_toml(&text) {
        Ok(c) => {
            let _ = (c.memory(), c.rate(), c.max_job());
            let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            for j in &c.jobs {
                let s = Schedule::parse(&j.schedule).expect("an accepted configuration has valid schedules");
                let next = s.next_after(start, start + Duration::from_secs(12_345));
                assert!(next > start, "{s:?}");
                assert!(c.vcenter(&j.vcenter).is_some(), "an accepted job names a known vCenter");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // Schedules on their own.
    if let Ok(s) = Schedule::parse(&text) {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(s.next_after(t, t) > t, "{s:?}");
    }
}
