//! The daemon's run history: each finished run is appended to `history.jsonl` in the state
//! folder, and its newest part is read back when the daemon starts, so the last results,
//! the last-success times and the metrics built on them (a VM's restore-point age, its RPO)
//! survive a restart instead of resetting every alert.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// How many finished runs are kept in memory and served by `/history` (the file keeps all).
pub(crate) const IN_MEMORY: usize = 1000;

/// How much of the file's end is read at startup: enough for far more than [`IN_MEMORY`]
/// runs, and a bound on what a huge or foreign file can make the daemon allocate.
const TAIL_BYTES: u64 = 16 << 20;

/// What the history says of one job.
#[derive(Debug, Default, Clone)]
struct JobTimes {
    /// Its newest run's record.
    last: Option<Value>,
    /// When its newest run finished (Unix seconds).
    finished: Option<u64>,
    /// How long its newest run took.
    seconds: Option<f64>,
    /// When a run of it last succeeded for every VM (Unix seconds).
    succeeded: Option<u64>,
    /// For a verify job: per slice, the damaged or missing chunks the newest run of that
    /// slice found (a whole verify is slice 0 of 1).
    bad_by_slice: BTreeMap<u64, u64>,
    /// The number of slices `bad_by_slice` is for.
    slices: u64,
    /// Whether a run of it ever reached its target (a copy opened its destination).
    reached: bool,
    /// The VMs of its newest run that had any: a VM no longer in the job leaves the metrics.
    vms_now: BTreeSet<String>,
}

/// The runs the daemon remembers.
#[derive(Debug)]
pub(crate) struct History {
    file: PathBuf,
    recent: VecDeque<Value>,
    jobs: BTreeMap<String, JobTimes>,
    /// By (job, VM): when the VM last got a good restore point or replica (Unix seconds).
    vms: BTreeMap<(String, String), u64>,
}

/// Unix seconds of an RFC 3339 time in a record.
fn unix(v: &Value) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(v.as_str()?).ok()?;
    t.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

impl History {
    /// An empty history that appends to `file` (nothing read).
    pub(crate) fn new(file: PathBuf) -> Self {
        Self { file, recent: VecDeque::new(), jobs: BTreeMap::new(), vms: BTreeMap::new() }
    }

    /// Reads the newest part of `file` (a missing file is an empty history). Returns what an
    /// operator should hear of: lines that are not JSON (a run cut short by a crash), a file
    /// that cannot be read. A last line cut short is ended, so the next run's line stays whole.
    pub(crate) fn load(file: PathBuf) -> (Self, Vec<String>) {
        let mut h = Self::new(file);
        let mut warnings = Vec::new();
        let text = match h.read_tail() {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (h, warnings),
            Err(e) => {
                warnings.push(format!("cannot read the history {}: {e}; starting without it", h.file.display()));
                return (h, warnings);
            }
        };
        let mut bad = 0usize;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()) {
            match serde_json::from_slice::<Value>(line) {
                Ok(rec) if rec["job"].is_string() => h.take_in(rec),
                _ => bad += 1,
            }
        }
        if bad > 0 {
            warnings.push(format!(
                "{bad} line(s) of {} are not runs (a run cut short by a crash?); skipped",
                h.file.display()
            ));
        }
        if text.last().is_some_and(|&b| b != b'\n')
            && let Err(e) = std::fs::OpenOptions::new().append(true).open(&h.file).and_then(|mut f| f.write_all(b"\n"))
        {
            warnings.push(format!("cannot end the cut last line of {}: {e}", h.file.display()));
        }
        (h, warnings)
    }

    /// The file's last [`TAIL_BYTES`], from the start of a line.
    fn read_tail(&self) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&self.file)?;
        let len = f.metadata()?.len();
        let from = len.saturating_sub(TAIL_BYTES);
        f.seek(std::io::SeekFrom::Start(from))?;
        let mut text = Vec::new();
        f.take(TAIL_BYTES).read_to_end(&mut text)?;
        if from > 0 {
            // Started mid-line: that line's end is not a run.
            let cut = text.iter().position(|&b| b == b'\n').map_or(text.len(), |p| p + 1);
            text.drain(..cut);
        }
        Ok(text)
    }

    /// Appends a finished run to the file (synced) and takes it in. Returns why the file
    /// could not be written, if it could not: the run is still remembered until a restart.
    pub(crate) fn append(&mut self, rec: Value) -> Option<String> {
        let line = format!("{rec}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|()| f.sync_data()));
        self.take_in(rec);
        written.err().map(|e| format!("cannot append to {}: {e}", self.file.display()))
    }

    fn take_in(&mut self, rec: Value) {
        let Some(job) = rec["job"].as_str().map(str::to_owned) else { return };
        let finished = unix(&rec["finished"]);
        let seconds = rec["seconds"].as_f64().or_else(|| Some(finished?.saturating_sub(unix(&rec["started"])?) as f64));
        let t = self.jobs.entry(job.clone()).or_default();
        t.finished = finished;
        t.seconds = seconds;
        if rec["outcome"] == "succeeded" {
            t.succeeded = finished.or(t.succeeded);
        }
        if let Some(n) = rec["verify"]["bad_chunks"].as_u64() {
            let (slice, slices) =
                (rec["verify"]["slice"].as_u64().unwrap_or(0), rec["verify"]["slices"].as_u64().unwrap_or(1));
            if slices != t.slices {
                t.bad_by_slice.clear();
                t.slices = slices;
            }
            t.bad_by_slice.insert(slice, n);
        }
        if rec["copy"].is_object() || rec["outcome"] == "succeeded" {
            t.reached = true;
        }
        // A VM's restore point or replica is good when its own result has no error, even in a
        // run where other VMs failed.
        // The job's VMs: exactly those of a run where every VM succeeded; a run with failures
        // only adds (a VM that failed, or was never reached, keeps its age rising).
        if let Some(vms) = rec["vms"].as_array().filter(|v| !v.is_empty()) {
            let names = vms.iter().filter_map(|v| v["vm"].as_str().map(str::to_owned));
            match rec["outcome"] == "succeeded" {
                true => t.vms_now = names.collect(),
                false => t.vms_now.extend(names),
            }
        }
        if let (Some(at), Some(vms)) = (finished, rec["vms"].as_array()) {
            for v in vms {
                if let Some(vm) = v["vm"].as_str()
                    && v["error"].is_null()
                    && (v["restore_point"].is_string() || v["replica"].is_string())
                {
                    self.vms.insert((job.clone(), vm.to_owned()), at);
                }
            }
        }
        t.last = Some(rec.clone());
        self.recent.push_back(rec);
        while self.recent.len() > IN_MEMORY {
            self.recent.pop_front();
        }
    }

    /// The remembered runs, oldest first.
    pub(crate) fn recent(&self) -> impl Iterator<Item = &Value> {
        self.recent.iter()
    }

    /// The newest run of `job`.
    pub(crate) fn last_of(&self, job: &str) -> Option<&Value> {
        self.jobs.get(job)?.last.as_ref()
    }

    /// When the newest run of `job` started.
    pub(crate) fn last_started(&self, job: &str) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(self.last_of(job)?["started"].as_str()?).ok()
    }

    /// Whether a run of `job` has ever reached its target: succeeded, or (a copy) opened its
    /// destination (as far as the history read reaches).
    pub(crate) fn reached_target(&self, job: &str) -> bool {
        self.jobs.get(job).is_some_and(|t| t.reached)
    }

    /// The Prometheus lines for jobs in `names` (others are in the file but no longer
    /// configured): last run, its duration, last success, and per VM its newest good
    /// restore point's time and age.
    pub(crate) fn prometheus(&self, names: &[&String]) -> String {
        let now = now();
        let mut text = String::new();
        let mut family = |name: &str, help: &str, rows: Vec<(String, String)>| {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for (labels, value) in rows {
                text.push_str(&format!("{name}{{{labels}}} {value}\n"));
            }
        };
        let per_job = |f: &dyn Fn(&JobTimes) -> Option<String>| -> Vec<(String, String)> {
            names
                .iter()
                .filter_map(|n| Some((format!("job=\"{}\"", label(n)), f(self.jobs.get(n.as_str())?)?)))
                .collect()
        };
        family(
            "syncproxy_job_last_run_timestamp_seconds",
            "When the job's last run finished.",
            per_job(&|t| t.finished.map(|s| s.to_string())),
        );
        family(
            "syncproxy_job_last_run_duration_seconds",
            "How long the job's last run took.",
            per_job(&|t| t.seconds.map(|s| format!("{s:.3}"))),
        );
        family(
            "syncproxy_job_last_success_timestamp_seconds",
            "When a run of the job last succeeded for every VM.",
            per_job(&|t| t.succeeded.map(|s| s.to_string())),
        );
        family(
            "syncproxy_verify_bad_chunks",
            "Damaged or missing chunks the verify job found: its newest complete run of each slice.",
            per_job(&|t| (!t.bad_by_slice.is_empty()).then(|| t.bad_by_slice.values().sum::<u64>().to_string())),
        );
        let vms: Vec<_> = self
            .vms
            .iter()
            .filter(|((job, vm), _)| names.contains(&job) && self.jobs.get(job).is_some_and(|t| t.vms_now.contains(vm)))
            .collect();
        let vm_labels = |job: &str, vm: &str| format!("job=\"{}\",vm=\"{}\"", label(job), label(vm));
        family(
            "syncproxy_vm_last_success_timestamp_seconds",
            "When the VM last got a good restore point or replica from the job.",
            vms.iter().map(|((j, v), at)| (vm_labels(j, v), at.to_string())).collect(),
        );
        family(
            "syncproxy_vm_restore_point_age_seconds",
            "How old the VM's newest good restore point or replica from the job is (its RPO now).",
            vms.iter().map(|((j, v), at)| (vm_labels(j, v), now.saturating_sub(**at).to_string())).collect(),
        );
        text
    }
}

/// A Prometheus label value, escaped.
pub(crate) fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(job: &str, finished: &str, outcome: &str, vms: Value) -> Value {
        json!({"job": job, "started": "2026-12-01T03:00:00Z", "finished": finished, "outcome": outcome, "vms": vms})
    }

    #[test]
    fn a_restart_remembers_last_runs_and_each_vms_last_good_point() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.jsonl");
        let mut h = History::new(file.clone());
        let good = |vm: &str| json!({"vm": vm, "restore_point": "p1", "error": null});
        let bad = |vm: &str| json!({"vm": vm, "restore_point": null, "error": "gone"});
        assert!(h.append(run("nightly", "2026-12-01T03:10:00Z", "succeeded", json!([good("a"), good("b")]))).is_none());
        assert!(h.append(run("nightly", "2026-12-02T03:10:00Z", "partial", json!([good("a"), bad("b")]))).is_none());
        // A crash cut the next line short.
        std::fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(b"{\"job\": \"nigh").unwrap();

        let (mut h, warnings) = History::load(file.clone());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("1 line(s)"), "{warnings:?}");
        assert_eq!(h.recent().count(), 2);
        assert_eq!(h.last_of("nightly").unwrap()["outcome"], "partial");
        let names = [&"nightly".to_owned()];
        let m = h.prometheus(&names);
        assert!(m.contains("syncproxy_job_last_success_timestamp_seconds{job=\"nightly\"} 1796094600"), "{m}");
        assert!(m.contains("syncproxy_job_last_run_timestamp_seconds{job=\"nightly\"} 1796181000"), "{m}");
        assert!(m.contains("syncproxy_job_last_run_duration_seconds{job=\"nightly\"} 87000.000"), "{m}");
        assert!(m.contains("syncproxy_vm_last_success_timestamp_seconds{job=\"nightly\",vm=\"a\"} 1796181000"), "{m}");
        assert!(m.contains("syncproxy_vm_last_success_timestamp_seconds{job=\"nightly\",vm=\"b\"} 1796094600"), "{m}");
        assert!(m.contains("syncproxy_vm_restore_point_age_seconds{job=\"nightly\",vm=\"b\"} "), "{m}");
        // The cut line was ended: the next run's line is whole and read back.
        assert!(h.append(run("nightly", "2026-12-03T03:10:00Z", "succeeded", json!([good("b")]))).is_none());
        let (h, warnings) = History::load(file);
        assert_eq!(h.recent().count(), 3, "{warnings:?}");
        assert!(h.prometheus(&names).contains("vm=\"b\"} 1796267400"));
        // A job no longer configured is not in the metrics; nor is a VM no longer in the job
        // (the newest run named b only), while a run that reached no VM changes nothing.
        assert!(!h.prometheus(&[]).contains("nightly"));
        assert!(!h.prometheus(&names).contains("vm=\"a\""));
        let mut h = h;
        assert!(h.append(run("nightly", "2026-12-04T03:10:00Z", "failed", json!([]))).is_none());
        assert!(h.prometheus(&names).contains("vm=\"b\"} 1796267400"));
    }

    #[test]
    fn only_the_tail_of_a_huge_history_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.jsonl");
        let line = format!("{}\n", run("j", "2026-12-01T03:10:00Z", "succeeded", json!([])));
        let lines = (usize::try_from(TAIL_BYTES).unwrap() / line.len()) * 2;
        std::fs::write(&file, line.repeat(lines)).unwrap();
        let (h, warnings) = History::load(file);
        assert!(warnings.is_empty(), "the line cut by the tail's start is not reported: {warnings:?}");
        assert_eq!(h.recent().count(), IN_MEMORY);
        // Garbage is skipped, never a panic.
        let file = dir.path().join("garbage.jsonl");
        std::fs::write(&file, b"\xff\xfe[1,2]\n{}\n\"x\"\n").unwrap();
        let (h, warnings) = History::load(file);
        assert_eq!(h.recent().count(), 0);
        assert!(warnings[0].contains("3 line(s)"), "{warnings:?}");
    }
}
