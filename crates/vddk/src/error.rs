//! VDDK's errors, mapped in one place: every `VixError` becomes a [`VddkError::Call`] with the
//! library's own text and a [`ErrorClass`] that says what a caller can do about it.

use std::path::PathBuf;

/// What a caller can do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The network or the host went away: reconnect and retry.
    Network,
    /// The credentials or session were refused: log in again, then retry.
    Authentication,
    /// The object is locked or busy: back off and retry.
    Busy,
    /// The request ran past the end of the disk.
    OutOfRange,
    /// Retrying will not help.
    Fatal,
}

impl ErrorClass {
    /// Whether retrying (after reconnecting or re-logging in, or waiting) may succeed.
    pub fn is_retryable(self) -> bool {
        match self {
            Self::Network | Self::Authentication | Self::Busy => true,
            Self::OutOfRange | Self::Fatal => false,
        }
    }

    /// The class of a VIX error code (its low 16 bits), per the reference's retry classes.
    pub fn of(code: u16) -> Self {
        match code {
            // HOST_CONNECTION_LOST, HOST_NOT_CONNECTED, HOST_NETWORK_CONN_REFUSED,
            // HOST_TCP_SOCKET_ERROR, HOST_TCP_CONN_LOST, CANNOT_CONNECT_TO_HOST,
            // NET_HTTP_COULDNT_CONNECT, NET_HTTP_OPERATION_TIMEDOUT.
            36 | 26 | 14009 | 14010 | 14011 | 18000 | 30007 | 30028 => Self::Network,
            // AUTHENTICATION_FAIL.
            35 => Self::Authentication,
            // OBJECT_IS_BUSY, FILE_ALREADY_LOCKED.
            5 | 15 => Self::Busy,
            // DISK_OUTOFRANGE.
            16007 => Self::OutOfRange,
            // Everything else is fatal for the disk (the reference's default).
            _ => Self::Fatal,
        }
    }
}

/// Why a VDDK operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VddkError {
    /// No library could be loaded; every path tried is listed with why it failed.
    #[error("no VixDiskLib could be loaded from {libdir}:{}", tried.iter().map(|(p, e)| format!("\n  {}: {e}", p.display())).collect::<String>())]
    NotFound {
        /// The folder given.
        libdir: PathBuf,
        /// Each candidate path and why it did not load.
        tried: Vec<(PathBuf, String)>,
    },
    /// The library lacks a function every VDDK from 6.5 has.
    #[error("{path}: {symbol} is missing; VDDK 6.5 or later is needed")]
    MissingSymbol {
        /// The library.
        path: PathBuf,
        /// The function.
        symbol: &'static str,
    },
    /// `InitEx` already ran in this process (VDDK allows it once).
    #[error("VDDK is already initialised in this process")]
    AlreadyInitialised,
    /// A VDDK call returned an error.
    #[error("VixDiskLib_{op} failed: {text} (VIX error {code}, {class:?})")]
    Call {
        /// The function, without its prefix.
        op: &'static str,
        /// The error code (low 16 bits).
        code: u16,
        /// The whole `VixError`.
        raw: u64,
        /// VDDK's own text (display only).
        text: String,
        /// What can be done about it.
        class: ErrorClass,
    },
    /// An argument this binding refuses before calling VDDK.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The disk's worker thread is gone (it panicked, or the disk was closed).
    #[error("the disk's worker thread has stopped")]
    WorkerGone,
}

impl VddkError {
    /// The class of a failed call; `Fatal` for errors that are not calls.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Call { class, .. } => *class,
            _ => ErrorClass::Fatal,
        }
    }
}
