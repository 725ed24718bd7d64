//! The one error type of the crate: what went wrong, in which file, and where in it.

use std::io;

/// Why a VMDK could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum VmdkError {
    /// Reading or writing a file failed.
    #[error("{file}: {error}")]
    Io {
        /// The file.
        file: String,
        /// The operating system's error (in the message, so not repeated as a source).
        error: io::Error,
    },
    /// A structure in the file is malformed or out of bounds.
    #[error("{file}: corrupt: {what}")]
    Corrupt {
        /// The file.
        file: String,
        /// What was wrong, with the offset where it matters.
        what: String,
    },
    /// A well-formed file uses something this crate does not read.
    #[error("{file}: unsupported: {what}")]
    Unsupported {
        /// The file.
        file: String,
        /// What it uses.
        what: String,
    },
    /// A descriptor line could not be understood.
    #[error("{file}: descriptor line {line}: {what}")]
    Descriptor {
        /// The descriptor's file.
        file: String,
        /// The line number, from 1.
        line: usize,
        /// What was wrong.
        what: String,
    },
    /// A file name in a descriptor points outside where it may.
    #[error("{file}: refusing file name {name:?}: {why}")]
    Path {
        /// The descriptor that names it.
        file: String,
        /// The name.
        name: String,
        /// Why it is refused.
        why: String,
    },
    /// A snapshot's parent is not the disk it was taken from.
    #[error("{child}: parentCID is {expected:08x}, but the parent {parent} has CID {actual:08x}")]
    CidMismatch {
        /// The child descriptor.
        child: String,
        /// The parent descriptor.
        parent: String,
        /// The child's parentCID.
        expected: u32,
        /// The parent's CID.
        actual: u32,
    },
}

impl VmdkError {
    pub(crate) fn corrupt(file: &str, what: impl Into<String>) -> Self {
        Self::Corrupt { file: file.to_owned(), what: what.into() }
    }

    pub(crate) fn unsupported(file: &str, what: impl Into<String>) -> Self {
        Self::Unsupported { file: file.to_owned(), what: what.into() }
    }

    pub(crate) fn io(file: &str, error: io::Error) -> Self {
        Self::Io { file: file.to_owned(), error }
    }
}

/// The crate's result type.
pub type Result<T, E = VmdkError> = std::result::Result<T, E>;
