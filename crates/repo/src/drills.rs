//! Drill reports kept beside the restore point they tried to boot: the evidence that a point
//! comes up (or why it did not), shown by `repo list` and removed by gc with the point.
//!
//! A report is two files under `drills/<point>/`: `<stamp>.json` (a small record, then the
//! drill's own JSON report) and `<stamp>.html` (the self-contained page, screenshot inline),
//! both sealed like every other file of the repository, so an encrypted repository keeps its
//! drill evidence encrypted too.

use serde::{Deserialize, Serialize};

use crate::{Repo, RepoError};

/// The largest report file kept (a report with an inline screenshot is some hundreds of KiB).
pub const MAX_DRILL_FILE: usize = 16 << 20;

/// One drill of a restore point, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// The restore point drilled.
    pub point: String,
    /// When the drill ran (UTC, RFC 3339).
    pub time: String,
    /// Whether every check passed.
    pub passed: bool,
    /// One line: what passed, or the first reason it failed.
    pub summary: String,
    /// Seconds from the start of the guest to its boot marker, when it was seen.
    #[serde(default)]
    pub boot_seconds: Option<f64>,
    /// The stored JSON record's name in the repository.
    pub stored: String,
    /// The stored HTML page's name in the repository.
    pub stored_html: String,
}

/// What is stored in `<stamp>.json`: the record, and the drill's report as it wrote it.
#[derive(Serialize, Deserialize)]
struct Stored {
    record: DrillRecord,
    report: serde_json::Value,
}

impl Repo {
    /// Keeps a drill's report (`json`, the drill's own JSON; `html`, its page) beside restore
    /// point `point`, which must exist.
    pub fn add_drill_report(
        &self,
        point: &str,
        passed: bool,
        summary: &str,
        boot_seconds: Option<f64>,
        json: &[u8],
        html: &[u8],
    ) -> Result<DrillRecord, RepoError> {
        self.point(point)?;
        if json.len() > MAX_DRILL_FILE || html.len() > MAX_DRILL_FILE {
            return Err(RepoError::Invalid(format!(
                "a drill report of {} + {} bytes is larger than the {MAX_DRILL_FILE} bytes kept",
                json.len(),
                html.len()
            )));
        }
        let report: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| RepoError::Invalid(format!("the drill report is not JSON: {e}")))?;
        let _lock = self.lock_to_write(crate::LockKind::Shared, &format!("drill report of {point}"))?;
        let now = std::time::SystemTime::now();
        let time = humantime::format_rfc3339_seconds(now).to_string();
        // Sortable, unique enough for reports of one point (two in one nanosecond collide).
        let stamp = humantime::format_rfc3339_nanos(now).to_string().replace([':', '.'], "");
        let stored = format!("drills/{point}/{stamp}.json");
        let stored_html = format!("drills/{point}/{stamp}.html");
        let record = DrillRecord {
            point: point.to_owned(),
            time,
            passed,
            summary: summary.to_owned(),
            boot_seconds,
            stored: stored.clone(),
            stored_html: stored_html.clone(),
        };
        let body = serde_json::to_vec_pretty(&Stored { record: record.clone(), report })
            .map_err(|e| RepoError::Invalid(e.to_string()))?;
        // The page first: a record is listed only once what it names exists.
        self.store.put(&stored_html, &self.codec.seal(&stored_html, html.to_vec())?)?;
        self.store.put(&stored, &self.codec.seal(&stored, body)?)?;
        Ok(record)
    }

    /// The drills of restore point `point`, oldest first. A record that cannot be read is
    /// skipped with a warning: evidence that is damaged is not evidence.
    pub fn drill_reports(&self, point: &str) -> Result<Vec<DrillRecord>, RepoError> {
        let mut out = Vec::new();
        for e in self.store.list(&format!("drills/{point}"))? {
            if !e.name.ends_with(".json") {
                continue;
            }
            let name = format!("drills/{point}/{}", e.name);
            match self.drill_file(&name).and_then(|raw| {
                serde_json::from_slice::<Stored>(&raw).map_err(|err| RepoError::Corrupt(format!("{name}: {err}")))
            }) {
                Ok(s) if s.record.point == point && s.record.stored == name => out.push(s.record),
                Ok(_) => tracing::warn!("skipping {name}: it is the record of another drill"),
                Err(err) => tracing::warn!("skipping the drill record {name}: {err}"),
            }
        }
        out.sort_by(|a, b| a.stored.cmp(&b.stored));
        Ok(out)
    }

    /// A stored drill file (a record's `stored` or `stored_html`), opened.
    pub fn drill_file(&self, name: &str) -> Result<Vec<u8>, RepoError> {
        if !name.starts_with("drills/") || name.contains("..") {
            return Err(RepoError::Invalid(format!("{name} is not a drill report")));
        }
        let raw = self.store.get(name)?.ok_or_else(|| RepoError::NotFound(format!("no drill report {name}")))?;
        if raw.len() > MAX_DRILL_FILE + 4096 {
            return Err(RepoError::Corrupt(format!("{name} is {} bytes, more than a report may be", raw.len())));
        }
        self.codec.open(name, raw)
    }

    /// The drill's own JSON report from a record.
    pub fn drill_report_json(&self, record: &DrillRecord) -> Result<serde_json::Value, RepoError> {
        let raw = self.drill_file(&record.stored)?;
        let s: Stored =
            serde_json::from_slice(&raw).map_err(|e| RepoError::Corrupt(format!("{}: {e}", record.stored)))?;
        Ok(s.report)
    }
}
