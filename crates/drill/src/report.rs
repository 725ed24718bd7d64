//! A drill's evidence: each check's result, the time to boot, the end of the serial log and
//! the console's screenshot, as JSON and as a self-contained HTML page.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The most of the serial log a report keeps (its end).
pub const SERIAL_TAIL_BYTES: usize = 64 << 10;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The check, in words (`serial "login:"`, `tcp port 22`).
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// How long it took (for a serial check: from QEMU's start).
    pub seconds: f64,
    /// What was seen.
    pub detail: String,
}

/// What a drill found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    /// The VM and restore point.
    pub name: String,
    /// When it started, UTC, RFC 3339.
    pub started: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// QEMU's machine (`q35`, `pc`).
    pub machine: String,
    /// `SeaBIOS`, `OVMF`, `OVMF (secure boot)`.
    pub firmware: String,
    /// What the drill said before booting.
    pub lines: Vec<String>,
    /// Hardware changed for the drill only.
    pub substitutions: Vec<String>,
    /// Each check's outcome, in the order run.
    pub checks: Vec<CheckResult>,
    /// Seconds from QEMU's start to the first serial pattern, when it appeared.
    pub boot_seconds: Option<f64>,
    /// When QEMU was started, milliseconds since the Unix epoch (absent when it never was):
    /// with `boot_seconds`, when the guest came up, for comparing with clocks outside the
    /// drill (the time from a command's start to the marker, say).
    #[serde(default)]
    pub qemu_started_unix_ms: Option<u64>,
    /// The drill's whole time, seconds.
    pub seconds: f64,
    /// The end of the serial console's log (at most [`SERIAL_TAIL_BYTES`]).
    pub serial_tail: String,
    /// The console's screenshot, PNG (kept out of the JSON; inline in the HTML).
    #[serde(skip)]
    pub screenshot_png: Option<Vec<u8>>,
    /// True only when every check passed and nothing else was found.
    pub passed: bool,
    /// Why not, in words: the first failure, then the findings.
    pub reason: Option<String>,
    /// Facts found outside the guest that fail the drill (damaged chunks served, say).
    pub findings: Vec<String>,
    /// Things worth knowing that do not fail it.
    pub warnings: Vec<String>,
}

impl DrillReport {
    /// An empty report, before anything ran.
    pub(crate) fn new(name: &str, started: String) -> Self {
        DrillReport {
            name: name.to_owned(),
            started,
            accel: String::new(),
            machine: String::new(),
            firmware: String::new(),
            lines: Vec::new(),
            substitutions: Vec::new(),
            checks: Vec::new(),
            boot_seconds: None,
            qemu_started_unix_ms: None,
            seconds: 0.0,
            serial_tail: String::new(),
            screenshot_png: None,
            passed: false,
            reason: None,
            findings: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Records the first failure as the reason (later ones are in the checks).
    pub(crate) fn fail(&mut self, why: impl Into<String>) {
        if self.reason.is_none() {
            self.reason = Some(why.into());
        }
        self.passed = false;
    }

    /// Adds a fact found outside the guest that fails the drill (a guest that read damaged data
    /// proves nothing, whatever it printed); it is added to the reason.
    pub fn add_finding(&mut self, finding: String) {
        self.reason = Some(match self.reason.take() {
            Some(r) => format!("{r}; {finding}"),
            None => finding.clone(),
        });
        self.findings.push(finding);
        self.passed = false;
    }

    /// Adds something worth knowing that does not fail the drill.
    pub fn add_warning(&mut self, warning: String) {
        self.warnings.push(warning);
    }

    /// One line: passed or failed, the time to boot, the checks, the reason.
    pub fn summary(&self) -> String {
        let ok = self.checks.iter().filter(|c| c.passed).count();
        let boot = self.boot_seconds.map_or("no boot marker".to_owned(), |s| format!("booted in {s:.1} s"));
        let head = format!(
            "{} ({}, {boot}, {ok}/{} checks)",
            if self.passed { "passed" } else { "failed" },
            self.accel,
            self.checks.len()
        );
        match &self.reason {
            Some(r) => format!("{head}: {r}"),
            None => head,
        }
    }

    /// The report as pretty JSON (without the screenshot).
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and vectors always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads a report back from [`DrillReport::to_json`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// A self-contained HTML page: the summary, the checks, what was said and changed, the
    /// screenshot inline and the serial log's end.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let title = format!("Drill of {}: {}", self.name, if self.passed { "passed" } else { "FAILED" });
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
        h.push_str(&format!("<title>{}</title>\n", esc(&title)));
        h.push_str(
            "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}\
             td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.ok{color:#060}.fail{color:#b00}\
             pre{background:#f4f4f4;padding:1em;overflow:auto;max-height:40em}img{border:1px solid #888}</style>\n",
        );
        h.push_str("</head><body>\n");
        h.push_str(&format!("<h1 class=\"{}\">{}</h1>\n", if self.passed { "ok" } else { "fail" }, esc(&title)));
        h.push_str(&format!("<p>{}</p>\n", esc(&self.summary())));
        h.push_str(&format!(
            "<p>Started {} UTC; {:.1} s in all; {} on {}, {}.</p>\n",
            esc(&self.started),
            self.seconds,
            esc(&self.accel),
            esc(&self.machine),
            esc(&self.firmware)
        ));
        h.push_str("<h2>Checks</h2>\n<table><tr><th>check</th><th>result</th><th>seconds</th><th>detail</th></tr>\n");
        for c in &self.checks {
            h.push_str(&format!(
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{:.1}</td><td>{}</td></tr>\n",
                esc(&c.name),
                if c.passed { "ok" } else { "fail" },
                if c.passed { "passed" } else { "FAILED" },
                c.seconds,
                esc(&c.detail)
            ));
        }
        h.push_str("</table>\n");
        for (heading, items) in [
            ("Findings", &self.findings),
            ("Before booting", &self.lines),
            ("Substitutions for the drill", &self.substitutions),
            ("Warnings", &self.warnings),
        ] {
            if items.is_empty() {
                continue;
            }
            h.push_str(&format!("<h2>{heading}</h2>\n<ul>\n"));
            for i in items {
                h.push_str(&format!("<li>{}</li>\n", esc(i)));
            }
            h.push_str("</ul>\n");
        }
        h.push_str("<h2>Console</h2>\n");
        match &self.screenshot_png {
            Some(png) => h.push_str(&format!(
                "<img alt=\"the console at the end of the drill\" src=\"data:image/png;base64,{}\">\n",
                base64::engine::general_purpose::STANDARD.encode(png)
            )),
            None => h.push_str("<p>No screenshot was taken.</p>\n"),
        }
        h.push_str(&format!("<h2>Serial console (end)</h2>\n<pre>{}</pre>\n", esc(&self.serial_tail)));
        h.push_str("</body></html>\n");
        h
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> DrillReport {
        let mut r = DrillReport::new("web <1> @ p", "2026-12-05T12:00:00Z".into());
        r.accel = "tcg".into();
        r.checks.push(CheckResult {
            name: "serial \"login:\"".into(),
            passed: true,
            seconds: 5.25,
            detail: "seen".into(),
        });
        r.boot_seconds = Some(5.25);
        r.qemu_started_unix_ms = Some(1_796_472_000_250);
        r.passed = true;
        r.serial_tail = "Debian login: \u{1b}[0m".into();
        r.screenshot_png = Some(b"\x89PNG\r\n\x1a\nrest".to_vec());
        r
    }

    #[test]
    fn findings_fail_the_drill_and_extend_the_reason() {
        let mut r = report();
        assert_eq!(r.summary(), "passed (tcg, booted in 5.2 s, 1/1 checks)");
        r.add_warning("not kept".into());
        assert!(r.passed);
        r.add_finding("2 chunk(s) failed verification".into());
        assert!(!r.passed);
        assert_eq!(r.reason.as_deref(), Some("2 chunk(s) failed verification"));
        let mut r = report();
        r.fail("no \"login:\" on the console");
        r.fail("a later failure");
        r.add_finding("chunks that failed verification while served: c1".into());
        assert_eq!(
            r.reason.as_deref(),
            Some("no \"login:\" on the console; chunks that failed verification while served: c1")
        );
        assert!(r.summary().starts_with("failed (tcg"), "{}", r.summary());
    }

    #[test]
    fn json_round_trips_without_the_screenshot_and_html_inlines_it() {
        let r = report();
        let json = r.to_json();
        assert!(!json.contains("screenshot"), "{json}");
        let back = DrillReport::from_json(&json).unwrap();
        assert_eq!(back, DrillReport { screenshot_png: None, ..r.clone() });
        assert!(json.contains("\"qemu_started_unix_ms\": 1796472000250"), "{json}");
        // Reports kept before QEMU's start was recorded still read.
        let old = json.replace("\"qemu_started_unix_ms\": 1796472000250,", "");
        assert_ne!(old, json);
        assert_eq!(DrillReport::from_json(&old).unwrap().qemu_started_unix_ms, None);
        let html = r.to_html();
        assert!(html.contains("data:image/png;base64,iVBORw0KGgpyZXN0"), "{html}");
        assert!(html.contains("web &lt;1&gt; @ p") && !html.contains("<1>"));
        assert!(html.contains("Debian login: \u{FFFD}[0m"));
        assert!(!html.contains("src=\"http"), "self-contained");
    }
}
