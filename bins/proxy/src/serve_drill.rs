//! The daemon's drill jobs: on its schedule, the newest restore point of each chosen VM is
//! booted in isolation ([`orchestration::drill_job`]), one at a time; a point that does not
//! come up fails the run, and the last successful drill of each VM goes into the metrics.

use crate::history::label;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use orchestration::config::{DrillConfig, Schedule};
use serde_json::{Value, json};
use tokio::sync::watch;

/// One `[[drill]]` of the configuration, ready to run again and again.
pub(crate) struct DrillRunner {
    pub(crate) config: DrillConfig,
    pub(crate) schedule: Schedule,
    pub(crate) work_root: std::path::PathBuf,
}

/// The newest restore point of each VM a drill covers (by the name its points carry),
/// oldest VM name first.
fn newest_points(points: &[repo::Manifest], only: &[String]) -> Vec<(String, String)> {
    let mut newest: BTreeMap<String, String> = BTreeMap::new();
    for p in points {
        if !only.is_empty() && !only.contains(&p.source.name) {
            continue;
        }
        // Points come oldest first: the last one seen wins.
        newest.insert(p.source.name.clone(), p.id.clone());
    }
    newest.into_iter().collect()
}

impl DrillRunner {
    fn options(&self) -> Result<orchestration::drill_job::DrillOptions, String> {
        Ok(orchestration::drill_job::DrillOptions {
            accel: self.config.accel.parse()?,
            boot_controller: self.config.boot_controller.as_deref().map(str::parse).transpose()?,
            checks: self.config.expect.iter().map(drill::Check::serial).collect(),
            network: drill::Network::None,
            timeout: self.config.timeout(),
            work_root: self.work_root.clone(),
            keep_report: true,
            cache: instant::CacheConfig::default(),
            vmx: None,
        })
    }

    /// One run: every chosen VM's newest point drilled, one after the other; `stop` cancels
    /// the drill under way (its VM is stopped and its overlays removed). What the history
    /// keeps of it.
    pub(crate) async fn once(&self, started: SystemTime, mut stop: watch::Receiver<bool>) -> Value {
        let name = &self.config.name;
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let fail = |error: String| {
            json!({"job": name, "kind": "drill", "started": time(started), "finished": time(SystemTime::now()),
                   "outcome": "failed", "error": error, "drills": []})
        };
        let options = match self.options() {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        let config = self.config.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let repo = config.open_repository()?;
            let points = repo.points()?;
            Ok::<_, orchestration::OrchError>((repo, points))
        })
        .await;
        let (repo, points) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return fail(format!("cannot read the repository {}: {e}", self.config.repository)),
            Err(e) => return fail(format!("reading the repository did not finish: {e}")),
        };
        let chosen = newest_points(&points, &self.config.vms);
        if chosen.is_empty() {
            return fail(format!("the repository {} has no restore point to drill", self.config.repository));
        }
        let mut drills = Vec::new();
        for (vm, point) in chosen {
            if *stop.borrow() {
                break;
            }
            let cancel = drill::Cancel::new();
            let on_stop = cancel.clone();
            let mut stop_watch = stop.clone();
            let watcher = tokio::spawn(async move {
                if stop_watch.wait_for(|s| *s).await.is_ok() {
                    on_stop.cancel();
                }
            });
            tracing::info!(drill = %name, vm = %vm, point = %point, "drill starts");
            let outcome = orchestration::drill_job::run_drill(&repo, &point, &options, cancel).await;
            watcher.abort();
            let entry = match outcome {
                Ok(o) => {
                    let r = &o.report;
                    if r.passed {
                        tracing::info!(drill = %name, vm = %vm, point = %point, boot_seconds = r.boot_seconds.unwrap_or(0.0), "drill passed");
                    } else {
                        tracing::error!(drill = %name, vm = %vm, point = %point, reason = %r.reason.as_deref().unwrap_or("no reason given"), "drill failed");
                    }
                    json!({"vm": vm, "point": point, "passed": r.passed, "boot_seconds": r.boot_seconds,
                           "reason": r.reason, "report": o.record.map(|x| x.stored_html)})
                }
                Err(e) => {
                    tracing::error!(drill = %name, vm = %vm, point = %point, "drill could not run: {e}");
                    json!({"vm": vm, "point": point, "passed": false, "reason": e.to_string()})
                }
            };
            drills.push(entry);
        }
        let passed = drills.iter().filter(|d| d["passed"] == true).count();
        let outcome = match passed {
            _ if drills.is_empty() => "failed",
            n if n == drills.len() => "succeeded",
            0 => "failed",
            _ => "partial",
        };
        let stopped = *stop.borrow_and_update();
        json!({
            "job": name,
            "kind": "drill",
            "started": time(started),
            "finished": time(SystemTime::now()),
            "outcome": outcome,
            "error": if stopped { Some("stopped before every VM was drilled") } else { None },
            "drills": drills,
        })
    }
}

/// What the metrics say of one VM's drills: when it last passed (seconds since the epoch),
/// and whether its last drill passed.
type VmDrills = (Option<u64>, bool);

/// The last successful drill of each VM, by drill job, for the metrics.
#[derive(Debug, Default)]
pub(crate) struct DrillStats {
    /// By (job, vm).
    by_vm: Mutex<BTreeMap<(String, String), VmDrills>>,
}

impl DrillStats {
    /// Takes in a finished drill run's record.
    pub(crate) fn record(&self, rec: &Value) {
        let (Some(job), Some(drills)) = (rec["job"].as_str(), rec["drills"].as_array()) else { return };
        // When it finished (a record read back at startup is older than now).
        let finished = rec["finished"].as_str().and_then(|t| humantime::parse_rfc3339_weak(t).ok());
        let now = finished
            .unwrap_or_else(SystemTime::now)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let mut by_vm = self.by_vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for d in drills {
            let (Some(vm), Some(passed)) = (d["vm"].as_str(), d["passed"].as_bool()) else { continue };
            let e = by_vm.entry((job.to_owned(), vm.to_owned())).or_insert((None, false));
            e.1 = passed;
            if passed {
                e.0 = Some(now);
            }
        }
    }

    /// The Prometheus lines.
    pub(crate) fn prometheus(&self) -> String {
        let by_vm = self.by_vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::from(
            "# HELP syncproxy_drill_last_passed Whether the VM's last drill passed.\n\
             # TYPE syncproxy_drill_last_passed gauge\n",
        );
        for ((job, vm), (_, passed)) in by_vm.iter() {
            text.push_str(&format!(
                "syncproxy_drill_last_passed{{job=\"{}\",vm=\"{}\"}} {}\n",
                label(job),
                label(vm),
                u8::from(*passed)
            ));
        }
        text.push_str(
            "# HELP syncproxy_drill_last_success_timestamp_seconds When the VM last passed a drill.\n\
             # TYPE syncproxy_drill_last_success_timestamp_seconds gauge\n",
        );
        for ((job, vm), (at, _)) in by_vm.iter() {
            if let Some(at) = at {
                text.push_str(&format!(
                    "syncproxy_drill_last_success_timestamp_seconds{{job=\"{}\",vm=\"{}\"}} {at}\n",
                    label(job),
                    label(vm)
                ));
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, vm: &str) -> repo::Manifest {
        repo::Manifest {
            format: repo::FORMAT,
            id: id.into(),
            time: String::new(),
            parent: None,
            source: repo::SourceInfo { name: vm.into(), instance_uuid: None },
            consistency: repo::Consistency::Crash,
            disks: vec![],
            files: vec![],
        }
    }

    #[test]
    fn the_newest_point_of_each_chosen_vm_is_drilled() {
        let points = [point("1", "web"), point("2", "db"), point("3", "web"), point("4", "mail")];
        assert_eq!(
            newest_points(&points, &[]),
            vec![("db".into(), "2".into()), ("mail".into(), "4".into()), ("web".into(), "3".into())]
        );
        assert_eq!(newest_points(&points, &["web".into()]), vec![("web".into(), "3".into())]);
        assert!(newest_points(&points, &["gone".into()]).is_empty());
    }

    #[test]
    fn metrics_keep_the_last_pass_through_a_failure() {
        let s = DrillStats::default();
        s.record(
            &json!({"job": "weekly", "drills": [{"vm": "web \"1\"", "passed": true}, {"vm": "db", "passed": false}]}),
        );
        s.record(&json!({"job": "weekly", "drills": [{"vm": "web \"1\"", "passed": false}]}));
        let text = s.prometheus();
        assert!(text.contains("syncproxy_drill_last_passed{job=\"weekly\",vm=\"web \\\"1\\\"\"} 0"), "{text}");
        assert!(text.contains("syncproxy_drill_last_passed{job=\"weekly\",vm=\"db\"} 0"), "{text}");
        assert!(text.contains("syncproxy_drill_last_success_timestamp_seconds{job=\"weekly\",vm=\"web \\\"1\\\"\"}"));
        assert!(!text.contains("syncproxy_drill_last_success_timestamp_seconds{job=\"weekly\",vm=\"db\"}"), "{text}");
    }
}
