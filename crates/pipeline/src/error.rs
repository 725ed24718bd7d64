//! The pipeline's one error type, with the retryable/permanent split the engine acts on.

use std::path::PathBuf;

/// Why a block operation, a copy or a state file failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A local read, write or sync failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path and offset.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A transport's request failed (an NBD request, a VMDK read), classified by the crate
    /// that speaks it: the pipeline knows no transport's error type.
    #[error("{what}: {source}")]
    Transport {
        /// What was being done.
        what: String,
        /// The transport's failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// Whether the transport says the same request may succeed if tried again.
        retryable: bool,
    },
    /// A request the source or sink cannot serve (outside the disk, misaligned, too large).
    #[error("{0}")]
    Invalid(String),
    /// The source and the sink, or a checkpoint and its job, do not fit together.
    #[error("{0}")]
    Mismatch(String),
    /// A sync-state or checkpoint file is unreadable or was written by something else.
    #[error("state file {path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The copy was cancelled; what completed is checkpointed.
    #[error("the copy was cancelled")]
    Cancelled,
    /// A retryable error that kept failing.
    #[error("{source} (gave up after {attempts} attempts)")]
    Exhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: Box<BlockError>,
    },
}

impl BlockError {
    /// An I/O failure with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }

    /// Whether trying the same request again may succeed.
    pub fn is_retryable(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            Self::Io { source, .. } => {
                matches!(
                    source.kind(),
                    K::Interrupted | K::TimedOut | K::WouldBlock | K::ConnectionReset | K::ConnectionAborted
                ) || source.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error())
            }
            Self::Transport { retryable, .. } => *retryable,
            Self::Invalid(_) | Self::Mismatch(_) | Self::State { .. } | Self::Cancelled | Self::Exhausted { .. } => {
                false
            }
        }
    }
}
