//! What a backup or replication of one VM did, per disk and in all: the value `backup_vm`
//! returns and the job report collects (serialisable, for JSON reports and the service).

use std::path::PathBuf;

use repo::Consistency;
use serde::{Deserialize, Serialize};

use crate::target::Committed;

/// What happened to one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    /// Its slot (`scsi0:0`).
    pub name: String,
    /// Whether it was copied in full.
    pub full: bool,
    /// The plan, in words: `full (why)` or `incremental`.
    pub plan: String,
    /// Bytes read from the source.
    pub read: u64,
    /// Chunks the repository did not have.
    pub stored_chunks: u64,
    /// Their size in the repository.
    pub stored_bytes: u64,
    /// How it was read: `https`, or `vddk:<mode>`.
    pub transport: String,
}

/// What happened to one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// Its name.
    pub vm: String,
    /// The restore point made, when it succeeded (backups).
    pub point: Option<String>,
    /// The folder of the VM's replica disks, once they are consistent (replication).
    pub replica: Option<PathBuf>,
    /// Quiesced or crash-consistent.
    pub consistency: Option<Consistency>,
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// What was odd but did not stop it.
    pub warnings: Vec<String>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Whether our snapshot was removed (true when none was made).
    pub snapshot_removed: bool,
    /// Stale snapshots of ours removed before the backup.
    pub stale_removed: Vec<String>,
    /// How long it took.
    pub seconds: f64,
}

impl VmReport {
    /// Records what the copy committed.
    pub(crate) fn committed(&mut self, c: Committed) {
        match c {
            Committed::Point(id) => self.point = Some(id),
            Committed::Replica(dir) => self.replica = Some(dir),
        }
    }
}

/// Bytes in binary units for people (`1.5 GiB`); exact counts belong in `--json`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_survives_json() {
        let r = VmReport {
            vm: "db".into(),
            point: Some("p1".into()),
            replica: Some(PathBuf::from("/r/db_1234")),
            consistency: Some(Consistency::Application),
            disks: vec![DiskReport {
                name: "scsi0:0".into(),
                full: true,
                plan: "full (first copy)".into(),
                read: 7,
                stored_chunks: 2,
                stored_bytes: 5,
                transport: "https".into(),
            }],
            warnings: vec!["w".into()],
            error: None,
            snapshot_removed: true,
            stale_removed: vec!["old".into()],
            seconds: 1.5,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"consistency\":\"application\""), "{json}");
        assert_eq!(serde_json::from_str::<VmReport>(&json).unwrap(), r);
    }
}
