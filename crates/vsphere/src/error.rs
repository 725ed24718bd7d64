//! The client's errors: transport, TLS, XML and vSphere faults with their kind and context,
//! the one place that decides whether an error is retried, and which faults say the guest
//! could not be quiesced.

use crate::xml::{Element, XmlError};

/// The fault types the client acts on; every other one is kept by name in [`Fault::type_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Wrong user name or password.
    InvalidLogin,
    /// The session expired or was never there.
    NotAuthenticated,
    /// The account lacks a privilege.
    NoPermission,
    /// A file problem; CBT reports a change ID it cannot answer for this way.
    FileFault,
    /// A parameter was refused (a malformed change ID, for one).
    InvalidArgument,
    /// The chain of snapshots is as deep as it may be.
    TooManySnapshotLevels,
    /// Another snapshot fault.
    Snapshot,
    /// The object is in the wrong state (power state included).
    InvalidState,
    /// Another task is running on the object.
    TaskInProgress,
    /// The object is gone.
    ManagedObjectNotFound,
    /// The server or the object cannot do it.
    NotSupported,
    /// The server does not know the method.
    MethodNotFound,
    /// The request was cancelled.
    RequestCanceled,
    /// The host is not connected.
    HostNotConnected,
    /// Anything else.
    Other,
}

impl FaultKind {
    /// The kind of a fault type name.
    pub fn of(type_name: &str) -> Self {
        match type_name {
            "InvalidLogin" => Self::InvalidLogin,
            "NotAuthenticated" => Self::NotAuthenticated,
            "NoPermission" => Self::NoPermission,
            "FileFault"
            | "FileNotFound"
            | "FileLocked"
            | "CannotAccessFile"
            | "NoDiskSpace"
            | "FileAlreadyExists"
            | "CannotCreateFile"
            | "CannotDeleteFile"
            | "FileTooLarge"
            | "FileBackedPortNotSupported" => Self::FileFault,
            "InvalidArgument" | "InvalidRequest" => Self::InvalidArgument,
            "TooManySnapshotLevels" => Self::TooManySnapshotLevels,
            "SnapshotFault"
            | "MultipleSnapshotsNotSupported"
            | "SnapshotDisabled"
            | "SnapshotLocked"
            | "SnapshotIncompatibleDeviceInVm"
            | "SnapshotNoChange"
            | "MemorySnapshotOnIndependentDisk"
            | "FilesystemQuiesceFault"
            | "ApplicationQuiesceFault" => Self::Snapshot,
            "InvalidState" | "InvalidPowerState" | "InvalidHostState" | "InvalidDatastoreState" => Self::InvalidState,
            "TaskInProgress" => Self::TaskInProgress,
            "ManagedObjectNotFound" => Self::ManagedObjectNotFound,
            "NotSupported" | "NotImplemented" => Self::NotSupported,
            "MethodNotFound" => Self::MethodNotFound,
            "RequestCanceled" => Self::RequestCanceled,
            "HostNotConnected" => Self::HostNotConnected,
            _ => Self::Other,
        }
    }
}

/// A vSphere fault with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What the client does about it.
    pub kind: FaultKind,
    /// The fault's own type name (`FileNotFound`, `InvalidPowerState`).
    pub type_name: String,
    /// The server's message.
    pub message: String,
    /// The method that failed (or the task's name).
    pub method: String,
    /// The object it was called on.
    pub object: Option<String>,
    /// A privilege the server named (`NoPermission`, `NotAuthenticated`).
    pub privilege: Option<String>,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed", self.method)?;
        if let Some(o) = &self.object {
            write!(f, " on {o}")?;
        }
        write!(f, ": {}", self.type_name)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(p) = &self.privilege {
            write!(f, " (privilege {p})")?;
        }
        Ok(())
    }
}

/// Every fault type of the API that says quiescing failed, or that VMware Tools could not
/// quiesce the guest (unavailable, being installed or upgraded).
const QUIESCE_FAULTS: &[&str] = &[
    "ApplicationQuiesceFault",
    "FilesystemQuiesceFault",
    "QuiesceDatastoreIOForHAFailed",
    "ToolsUnavailable",
    "ToolsInstallationInProgress",
    "VmToolsUpgradeFault",
    "ToolsAlreadyUpgraded",
    "ToolsAutoUpgradeNotSupported",
    "ToolsImageCopyFailed",
    "ToolsImageNotAvailable",
    "ToolsImageSignatureCheckFailed",
    "ToolsUpgradeCancelled",
];

impl Fault {
    /// Whether the fault says the guest could not be quiesced (its quiescing failed, or VMware
    /// Tools could not do it), so that a snapshot without quiescing may still be taken.
    pub fn is_quiesce(&self) -> bool {
        QUIESCE_FAULTS.contains(&self.type_name.as_str())
    }

    /// A fault from its detail element (`<XxxFault xsi:type="Xxx">` or a `fault` child of a
    /// `LocalizedMethodFault`), with the message found beside it.
    pub fn from_detail(detail: Option<&Element>, message: &str, method: &str, object: Option<&str>) -> Self {
        let type_name = detail
            .map(|d| d.xsi_type.clone().unwrap_or_else(|| d.name.trim_end_matches("Fault").to_owned()))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "SystemError".to_owned());
        // A detail may name the object it is about (`ManagedObjectNotFound.obj`).
        let object = object
            .map(str::to_owned)
            .or_else(|| detail.and_then(|d| d.child("obj").or_else(|| d.child("object"))).map(|o| o.text.clone()));
        Self {
            kind: FaultKind::of(&type_name),
            type_name,
            message: message.trim().to_owned(),
            method: method.to_owned(),
            object,
            privilege: detail.and_then(|d| d.text_of("privilegeId")).map(str::to_owned),
        }
    }
}

/// What a caller does with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Log in again and retry once.
    Relogin,
    /// Try again after a pause (a busy server, a dropped connection).
    Backoff,
    /// Give up: retrying cannot help.
    Never,
}

/// Everything that can go wrong talking to vSphere.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL or an option is wrong.
    #[error("{0}")]
    Config(String),
    /// The TLS setup or handshake failed.
    #[error("TLS with {host}: {message}")]
    Tls {
        /// The server.
        host: String,
        /// What failed.
        message: String,
    },
    /// The connection failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// HTTP failed below SOAP.
    #[error("{context}: {message}")]
    Http {
        /// What was being done.
        context: String,
        /// The status or error.
        message: String,
        /// The status, when there was one.
        status: Option<u16>,
    },
    /// The server did not answer within the client's timeout: a deadline for the whole
    /// operation, its attempts, the pauses between them and a re-login included. Retrying it
    /// would only stretch that deadline, so it is never retried.
    #[error("{operation}: the server did not answer within {} s{}", after.as_secs_f64(), last.as_deref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Timeout {
        /// The operation (the SOAP method, or the datastore file read).
        operation: String,
        /// The timeout that passed.
        after: std::time::Duration,
        /// The last failure before the deadline passed, if an attempt failed (a refused
        /// connection, a busy answer).
        last: Option<String>,
    },
    /// The answer is not well-formed XML.
    #[error("{context}: {source}")]
    Xml {
        /// Which call.
        context: String,
        /// The parse error.
        source: XmlError,
    },
    /// The answer is XML but not what the API promises.
    #[error("{0}")]
    Protocol(String),
    /// The body handed to an upload failed, or yielded more or fewer bytes than announced:
    /// the caller's source is at fault, not the server, and the upload did not complete.
    #[error("{context}: {source}")]
    Body {
        /// Which upload.
        context: String,
        /// What the body did (its own error, or `InvalidData` for a wrong length).
        source: std::io::Error,
    },
    /// The server raised a fault.
    #[error("{0}")]
    Fault(Box<Fault>),
    /// A task ended in error.
    #[error("task {task} ({name}) failed: {fault}")]
    Task {
        /// The task's moref.
        task: String,
        /// What the task was.
        name: String,
        /// Its fault.
        fault: Box<Fault>,
    },
}

impl Error {
    /// The fault inside, if the server raised one (directly or through a task).
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            Self::Fault(f) | Self::Task { fault: f, .. } => Some(f),
            _ => None,
        }
    }

    /// Whether the server raised a fault (directly or through a task) saying the guest could
    /// not be quiesced: see [`Fault::is_quiesce`].
    pub fn is_quiesce_fault(&self) -> bool {
        self.fault().is_some_and(Fault::is_quiesce)
    }

    /// Whether the server surely did not act on the request, so sending it again cannot do
    /// anything twice (not even create a task twice): the connection was never made, or the
    /// server answered that it is busy. The client retries these itself, within its deadline.
    pub fn not_acted_on(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Http { status: Some(503 | 429), .. })
    }

    /// Whether to retry: every variant and every fault kind is decided here, in one place.
    pub fn retry(&self) -> Retry {
        match self {
            Self::Config(_)
            | Self::Tls { .. }
            | Self::Xml { .. }
            | Self::Protocol(_)
            | Self::Timeout { .. }
            | Self::Body { .. } => Retry::Never,
            Self::Io { .. } => Retry::Backoff,
            Self::Http { status, .. } => match status {
                Some(503 | 502 | 504 | 429) | None => Retry::Backoff,
                Some(_) => Retry::Never,
            },
            Self::Fault(f) | Self::Task { fault: f, .. } => match f.kind {
                FaultKind::NotAuthenticated => Retry::Relogin,
                FaultKind::TaskInProgress | FaultKind::HostNotConnected => Retry::Backoff,
                FaultKind::InvalidLogin
                | FaultKind::NoPermission
                | FaultKind::FileFault
                | FaultKind::InvalidArgument
                | FaultKind::TooManySnapshotLevels
                | FaultKind::Snapshot
                | FaultKind::InvalidState
                | FaultKind::ManagedObjectNotFound
                | FaultKind::NotSupported
                | FaultKind::MethodNotFound
                | FaultKind::RequestCanceled
                | FaultKind::Other => Retry::Never,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_fault_subtypes_are_file_faults_and_never_retried() {
        for t in ["FileFault", "FileNotFound", "CannotAccessFile", "NoDiskSpace"] {
            let f = Fault::from_detail(None, "", "QueryChangedDiskAreas", Some("vm-1"));
            let f = Fault { kind: FaultKind::of(t), type_name: t.into(), ..f };
            assert_eq!(f.kind, FaultKind::FileFault);
            assert_eq!(Error::Fault(Box::new(f)).retry(), Retry::Never);
        }
        let na = Fault::from_detail(None, "", "X", None);
        let na = Fault { kind: FaultKind::NotAuthenticated, ..na };
        assert_eq!(Error::Fault(Box::new(na)).retry(), Retry::Relogin);
    }

    #[test]
    fn quiesce_faults_are_told_by_their_type_name() {
        let fault = |t: &str| {
            let f = Fault::from_detail(None, "", "CreateSnapshot_Task", Some("vm-1"));
            Fault { kind: FaultKind::of(t), type_name: t.into(), ..f }
        };
        for t in ["ApplicationQuiesceFault", "FilesystemQuiesceFault", "ToolsUnavailable", "ToolsUpgradeCancelled"] {
            let task =
                Error::Task { task: "task-1".into(), name: "CreateSnapshot_Task".into(), fault: Box::new(fault(t)) };
            assert!(task.is_quiesce_fault(), "{t}");
            assert!(Error::Fault(Box::new(fault(t))).is_quiesce_fault(), "{t}");
        }
        for t in ["SnapshotFault", "InvalidPowerState", "NoPermission", "Quiesce", "GuestOperationsUnavailable"] {
            assert!(!Error::Fault(Box::new(fault(t))).is_quiesce_fault(), "{t}");
        }
        assert!(!Error::Protocol("ApplicationQuiesceFault".into()).is_quiesce_fault());
    }

    #[test]
    fn display_names_method_object_type_and_message() {
        let mut d = Element::new("NoPermissionFault");
        d.xsi_type = Some("NoPermission".into());
        let mut p = Element::new("privilegeId");
        p.text = "VirtualMachine.State.CreateSnapshot".into();
        d.children.push(p);
        let f = Fault::from_detail(
            Some(&d),
            " Permission to perform this operation was denied. ",
            "CreateSnapshot_Task",
            Some("vm-7"),
        );
        assert_eq!(
            f.to_string(),
            "CreateSnapshot_Task failed on vm-7: NoPermission: Permission to perform this operation was denied. \
             (privilege VirtualMachine.State.CreateSnapshot)"
        );
    }
}
