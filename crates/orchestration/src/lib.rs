//! Orchestration: the per-VM flow of an agentless backup, which the `proxy` binary drives. It
//! joins the vSphere client (snapshots, CBT, datastore reads), the `cbt` planner, the block
//! pipeline and the repository; it owns the order of the steps and the promise that a snapshot
//! of ours is removed on every path.
//!
//! Today: backups into a repository over HTTPS datastore reads of flat base disks, for VMs
//! without snapshots of their own (issue 8 continues: replication, VDDK and NBD transports,
//! snapshot chains, stale-snapshot hygiene, resume, the daemon).

mod flow;
pub mod source;

pub use flow::{DiskReport, JobContext, SNAPSHOT_PREFIX, VmReport, backup_vm};

/// Why a VM's backup could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum OrchError {
    /// The vSphere server said no, or could not be reached.
    #[error(transparent)]
    Vsphere(#[from] vsphere::Error),
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] repo::RepoError),
    /// A copy failed.
    #[error(transparent)]
    Block(#[from] pipeline::BlockError),
    /// A disk descriptor could not be read.
    #[error(transparent)]
    Vmdk(#[from] vmdk::VmdkError),
    /// The VM or disk is outside what this flow supports, with the reason.
    #[error("{0}")]
    Refused(String),
}
