//! A job's intent to snapshot a VM, recorded durably in its target before `CreateSnapshot`
//! and forgotten once the snapshot is removed, so that a successor can tell a dead job's
//! snapshot from one whose job may still run, and remove (or adopt) it at once.
//!
//! The record is `intents/<vm moref>.<job tag>.json` in the store where the target's job leases
//! live. A snapshot of ours whose job has such a record here and no live lease belongs to a job
//! that is known to be dead: its lease was taken before the record was written and is released
//! only after the job's snapshots are gone, so a record without a live lease means the job
//! died (its process gone on this host, or its heartbeat expired). A snapshot with no record
//! here was made by a job writing elsewhere, whose liveness this target cannot know: only
//! `--max-job` guards those.

use serde::{Deserialize, Serialize};

use durable::Store;

const DIR: &str = "intents";

/// What a job meant to do to one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The job's tag (`<proxy>-<job>`).
    pub job: String,
    /// The VM's moref value (`vm-42`).
    pub vm: String,
    /// The VM's name then, for messages.
    pub vm_name: String,
    /// The snapshot's name.
    pub snapshot: String,
    /// The host and process that made it.
    pub host: String,
    /// Its process ID.
    pub pid: u32,
    /// When (RFC 3339).
    pub time: String,
}

fn name(vm: &str, job: &str) -> String {
    format!("{DIR}/{vm}.{job}.json")
}

/// Records `intent` durably (before the snapshot is asked for).
pub fn record(store: &dyn Store, intent: &Intent) -> Result<(), durable::Error> {
    let data = serde_json::to_vec_pretty(intent)
        .map_err(|e| durable::Error::Invalid(format!("an intent record could not be written: {e}")))?;
    store.put(&name(&intent.vm, &intent.job), &data)
}

/// Forgets the intent of `job` on the VM `vm` (its snapshot is gone).
pub fn forget(store: &dyn Store, vm: &str, job: &str) -> Result<(), durable::Error> {
    store.delete(&name(vm, job))
}

/// The tags of the jobs that recorded an intent on the VM `vm` in `store`. A record that cannot
/// be read still names its job (its file name does): it counts.
pub fn jobs_on(store: &dyn Store, vm: &str) -> Result<Vec<String>, durable::Error> {
    let prefix = format!("{vm}.");
    Ok(store
        .list(DIR)?
        .into_iter()
        .filter_map(|e| e.name.strip_prefix(&prefix)?.strip_suffix(".json").map(str::to_owned))
        .filter(|job| !job.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn records_are_found_per_vm_and_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(durable::LocalStore::new(d.path()));
        let intent = |vm: &str, job: &str| Intent {
            job: job.into(),
            vm: vm.into(),
            vm_name: "db".into(),
            snapshot: format!("syncproxy-{job}"),
            host: "h".into(),
            pid: 1,
            time: String::new(),
        };
        record(&*store, &intent("vm-4", "p1-j1")).unwrap();
        record(&*store, &intent("vm-4", "p1-j2.x")).unwrap();
        record(&*store, &intent("vm-42", "p1-j3")).unwrap();
        let mut on = jobs_on(&*store, "vm-4").unwrap();
        on.sort();
        assert_eq!(on, ["p1-j1", "p1-j2.x"], "vm-42's record is not vm-4's");
        forget(&*store, "vm-4", "p1-j1").unwrap();
        assert_eq!(jobs_on(&*store, "vm-4").unwrap(), ["p1-j2.x"]);
        assert!(jobs_on(&*store, "vm-7").unwrap().is_empty());
    }
}
