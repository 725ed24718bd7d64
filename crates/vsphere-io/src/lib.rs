//! vSphere sources for the block pipeline: a disk of a frozen snapshot read over HTTPS from its
//! datastore ([`datastore`]: one flat extent straight, anything else as a `vmdk` chain whose
//! files are read in ranges), or through VMware's VDDK ([`vddk_source`]); and one sink, an
//! existing disk of a powered-off VM written through VDDK ([`vddk_sink`]), for restores.
//!
//! Each implements `pipeline::BlockSource` or `BlockSink` and passes its conformance suite. Nothing here
//! plans, orders a job or stores a backup: orchestration opens these and hands them to the
//! engine.

pub mod datastore;
pub mod vddk_sink;
pub mod vddk_source;

pub use datastore::{ChainSource, DatastoreSource, open_frozen};
pub use vddk_sink::{VddkSink, VddkTarget};
pub use vddk_source::{VddkSource, VddkVm};

/// Why a vSphere disk could not be opened as a source or a sink.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The vSphere server said no, or could not be reached.
    #[error(transparent)]
    Vsphere(#[from] vsphere::Error),
    /// A disk descriptor or chain could not be read.
    #[error(transparent)]
    Vmdk(#[from] vmdk::VmdkError),
    /// The disk is outside what these sources read, with the reason.
    #[error("{0}")]
    Refused(String),
}
