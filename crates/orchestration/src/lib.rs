//! Orchestration: the per-VM flow of an agentless backup, which the `proxy` binary drives. It
//! joins the vSphere client (snapshots, CBT, datastore reads), the `cbt` planner, the block
//! pipeline and the repository; it owns the order of the steps, the promise that a snapshot of
//! ours is removed on every path, and the hygiene that removes what a dead job left.
//!
//! Backups into a repository and replicas, over HTTPS datastore reads (flat disks and the delta
//! chains of older snapshots), VDDK or NBD; plans that touch nothing; job leases, stale-snapshot
//! removal, resuming what a dead proxy left, limits and metrics; the support matrix as
//! findings (`preflight`), with the guest and backup-product lists kept as data (`catalog`).

pub mod catalog;
pub mod cbt_reset;
pub mod config;
mod context;
mod copy;
mod disk;
pub mod drill_job;
mod drs;
mod flow;
mod gate;
pub mod hooks;
pub mod hygiene;
pub mod intent;
mod job;
pub mod lifecycle;
mod limits;
pub mod metrics;
mod plan;
pub mod preflight;
pub mod proxy_host;
mod read;
mod report;
pub mod restore_inplace;
pub mod restore_job;
pub mod restore_plan;
pub mod schedule;
mod snapshot;
mod support;
mod target;
mod vmx;

pub use context::{DiskFilter, JobContext, JobContextBuilder, SNAPSHOT_PREFIX, nbd_uri};
pub use flow::backup_vm;
pub use job::{
    BASE_RESERVE, JobReport, MIN_BUFFERS, Outcome, PER_VM_RESERVE, Selection, Selector, buffer_budget, clean_stale,
    report_missing, run_job, select, select_vms, sweep_own_snapshots,
};
pub use lifecycle::{Buffers, Job, JobEvent, JobRun, JobSpec, Login, vm_result};
pub use limits::Limits;
pub use metrics::{Metrics, MetricsSnapshot};
pub use plan::{DiskPlanReport, VmPlan, plan_vm};
pub use report::{DiskReport, VmReport, human_bytes};
pub use support::vm_key;
pub use target::{ReplicaTarget, Target};

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
    /// A durable file (a lease, an intent record, a replica's configuration file) could not be
    /// read or written.
    #[error(transparent)]
    Durable(#[from] durable::Error),
    /// A disk descriptor could not be read.
    #[error(transparent)]
    Vmdk(#[from] vmdk::VmdkError),
    /// The vSphere server could not be reached.
    #[error("cannot reach {url}")]
    Unreachable {
        /// The server's URL.
        url: String,
        /// Why.
        #[source]
        source: vsphere::Error,
    },
    /// The server refused the login (the password is never part of it).
    #[error("cannot log in to {url} as {user}")]
    LoginRefused {
        /// The server's URL.
        url: String,
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: vsphere::Error,
    },
    /// The VM or disk is outside what this flow supports, with the reason.
    #[error("{0}")]
    Refused(String),
    /// A restore point could not be served for instant recovery.
    #[error(transparent)]
    Instant(#[from] instant::InstantError),
    /// Serving disks over NBD failed.
    #[error(transparent)]
    Nbd(#[from] nbd_wire::NbdError),
    /// A drill could not be attempted (QEMU missing, a plan refused, its work folder).
    #[error(transparent)]
    Drill(#[from] drill::DrillError),
}

impl From<vsphere_io::OpenError> for OrchError {
    fn from(e: vsphere_io::OpenError) -> Self {
        match e {
            vsphere_io::OpenError::Vsphere(e) => Self::Vsphere(e),
            vsphere_io::OpenError::Vmdk(e) => Self::Vmdk(e),
            vsphere_io::OpenError::Refused(why) => Self::Refused(why),
        }
    }
}
