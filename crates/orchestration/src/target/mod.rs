//! Where a job's VMs go, and what the copy asks of it: a [`Target`] is the operator's choice
//! (restore points in a repository, or replica disks in a directory), and [`Backend`] with its
//! per-VM [`VmWrite`] is what every step needs of any target: leases, the progress a dead job
//! left, what is committed of each disk, its plan, a sink per disk, and the commit.

mod replica;
mod repository;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use cbt::{CommittedDisk, Destination};
use durable::{JobLease, Store};
use pipeline::progress::Progress;
use pipeline::{BlockSource, CopyOptions, Engine};
use repo::{Consistency, Repo, SourceInfo};
use vsphere::Vm;

pub use replica::ReplicaTarget;

use crate::OrchError;
use crate::disk::DiskFacts;

/// Where a job's VMs go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Restore points in a repository (which also holds the job leases).
    Repository(Repo),
    /// Replica disks, brought up to date in place.
    Replica(ReplicaTarget),
}

impl Target {
    /// What the flow asks of this target. The one place that names each kind of target.
    pub(crate) fn backend(&self) -> &dyn Backend {
        match self {
            Self::Repository(r) => r,
            Self::Replica(r) => r,
        }
    }

    /// The repository, when this target is one (a plan of restore points needs it).
    pub(crate) fn repository(&self) -> Option<&Repo> {
        match self {
            Self::Repository(r) => Some(r),
            Self::Replica(_) => None,
        }
    }
}

/// A boxed future that may move between threads (the jobs' VMs run on a multi-threaded runtime).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a target asks of the flow and offers it. Implemented by each kind of target (a
/// repository, a replica directory); a new kind implements this and [`VmWrite`], adds a
/// [`Target`] variant, and one arm in [`Target::backend`].
///
/// Object-safe, reached as `&dyn Backend` through [`Target::backend`], rather than a trait
/// dispatched by matching on the enum in every method: then no code but `backend` names the
/// kinds, and the enum stays what the binaries build from flags and configuration (`Clone`,
/// `Debug`, no generics in `JobContext`). The methods that touch storage are synchronous (the
/// repository, the lease store and the sync-state store are), so the caller runs them on the
/// blocking pool; only the copy of a disk is async, as a [`BoxFuture`].
pub(crate) trait Backend: Send + Sync {
    /// Where the leases, intents, DRS pins and CBT-reset marks of jobs writing here live.
    fn leases(&self) -> Arc<dyn Store>;

    /// Takes the lease of the job `tag` (blocking).
    fn lease(&self, tag: &str) -> Result<JobLease, OrchError>;

    /// Whether `job` left progress here on `vm` under the very snapshot `source` (its moref): a
    /// repository's session, a replica's checkpoint; then the copy can be finished under it
    /// (blocking). `vcenter` is the vCenter's instance UUID, part of per-VM keys.
    fn progress_of(&self, vcenter: &str, vm: &Vm, job: &str, source: &str) -> Result<bool, OrchError>;

    /// Opens the copy (or the plan) of `vm`: what the target holds of it so far (blocking).
    fn open_vm(&self, vcenter: &str, vm: &Vm) -> Result<Box<dyn VmWrite>, OrchError>;
}

/// One VM's copy into a target, in the order the copy skeleton (`copy::copy_vm`) calls it:
/// [`committed`](Self::committed) per disk while the facts are gathered, [`plan`](Self::plan),
/// [`begin`](Self::begin), [`add_file`](Self::add_file) per configuration file,
/// [`copy_disk`](Self::copy_disk) per disk, [`finish`](Self::finish). `Sync` because the facts
/// are gathered, across calls to the server, while it answers `committed`.
pub(crate) trait VmWrite: Send + Sync {
    /// What the target holds of the disk in `slot`: its committed state (change ID, epoch), and
    /// how the destination stores it, for the planner.
    fn committed(&self, slot: &str) -> Result<(Option<CommittedDisk>, Destination), OrchError>;

    /// The restore point an incremental starts from, when the target keeps points.
    fn parent(&self) -> Option<&str>;

    /// Plans the disks from their facts, when the target plans them all before the copy (a
    /// restore point names its disks up front); a target that plans each disk as it copies
    /// it does nothing here. The planner's warnings go to `warnings`.
    fn plan(&mut self, facts: &[DiskFacts], warnings: &mut Vec<String>);

    /// Begins the copy of `job` under the snapshot `source` (its moref), or takes up what a
    /// dead job stored under the same snapshot; returns what to report of it (blocking).
    fn begin(&mut self, job: &str, source: &str) -> Result<Vec<String>, OrchError>;

    /// Keeps one of the VM's configuration files (`.vmx`, `.nvram`) with the copy (blocking).
    fn add_file(&mut self, name: &str, data: &[u8]) -> Result<(), OrchError>;

    /// Copies one disk from its source into its sink and commits it: once this returns, the
    /// disk's data is durable and recorded. What was odd goes to `warnings`.
    fn copy_disk<'a>(&'a mut self, disk: DiskJob<'a>, warnings: &'a mut Vec<String>) -> Copying<'a>;

    /// Commits the VM once every disk is (blocking): a restore point's manifest; for replicas,
    /// whose disks commit one by one, what holds them.
    fn finish(self: Box<Self>, source: SourceInfo, consistency: Consistency) -> Result<Committed, OrchError>;
}

/// The copy of one disk under way: what it did, once done.
pub(crate) type Copying<'a> = BoxFuture<'a, Result<DiskCopied, OrchError>>;

/// One disk to copy: which, its facts, its frozen source, where its progress is counted, and
/// the job's engine and options.
pub(crate) struct DiskJob<'a> {
    /// Its place in the order of the facts (and of a restore point's disks).
    pub(crate) n: usize,
    /// What it was planned from.
    pub(crate) facts: DiskFacts,
    /// The disk as the snapshot froze it.
    pub(crate) source: Arc<dyn BlockSource>,
    /// Its progress.
    pub(crate) progress: Arc<Progress>,
    /// The copy engine.
    pub(crate) engine: &'a Engine,
    /// How the job copies.
    pub(crate) options: &'a CopyOptions,
}

/// What the copy of one disk did.
#[derive(Debug, Clone)]
pub(crate) struct DiskCopied {
    /// Whether it was copied in full.
    pub(crate) full: bool,
    /// The plan, in words.
    pub(crate) plan: String,
    /// Bytes read from the source.
    pub(crate) read: u64,
    /// Chunks the target did not have (0 where it keeps no chunks).
    pub(crate) stored_chunks: u64,
    /// Bytes stored.
    pub(crate) stored_bytes: u64,
}

/// What a VM's finished copy made.
#[derive(Debug, Clone)]
pub(crate) enum Committed {
    /// A restore point, by ID.
    Point(String),
    /// The folder of the VM's replica disks, now consistent.
    Replica(PathBuf),
}
