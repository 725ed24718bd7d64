//! Sources and sinks at the edge of the block pipeline, for disks a proxy reaches without
//! vSphere: a raw file or block device ([`FileSource`], [`FileSink`]), a VMDK file or chain
//! ([`VmdkSource`]), an NBD export ([`NbdSource`], [`NbdSink`], sharing one [`NbdPool`]), and
//! [`NullSink`] for measuring a source alone.
//!
//! Each implements `pipeline`'s `BlockSource` or `BlockSink` and passes its conformance suite.
//! Nothing here plans, orders a job or speaks to vSphere.

pub mod sink;
pub mod source;

pub use sink::{FileSink, FileSinkOptions, NbdSink, NullSink};
pub use source::{DEFAULT_WIRE_REQUEST, FileSource, NbdPool, NbdSource, VmdkSource};

use pipeline::{BlockError, ErrorKind};

/// The digest and planning unit of replicas unless configured: 1 MiB keeps a 2 TiB disk's
/// digests at 64 MiB while widening 64 KiB CBT areas only a little.
pub const DEFAULT_GRANULARITY: u64 = 1 << 20;

/// The kind of an NBD failure, decided once for the NBD source and sink: what
/// [`nbd_wire::NbdError::is_retryable`] says is transient (a lost connection, the server's EIO
/// or EAGAIN), then by the server's errno.
pub fn nbd_kind(e: &nbd_wire::NbdError) -> ErrorKind {
    use nbd_wire::NbdError as E;
    match e {
        e if e.is_retryable() => ErrorKind::Transient,
        // ENOSPC, and EDQUOT from servers that pass it through.
        E::Server { errno: 28 | 122, .. } => ErrorKind::NoSpace,
        // EINVAL, EOVERFLOW, ENOTSUP: the request, not the server.
        E::Server { errno: 22 | 75 | 95, .. } | E::OutOfRange { .. } | E::Unsupported(_) => ErrorKind::InvalidInput,
        // NBD_REP_ERR_UNKNOWN: no export of that name.
        E::Refused { code: 0x8000_0006, .. } => ErrorKind::NotFound,
        E::Server { .. } | E::Io(_) | E::Closed(_) | E::Protocol(_) | E::Refused { .. } => ErrorKind::Fatal,
    }
}

/// An NBD failure while doing `what`, of the kind [`nbd_kind`] says.
pub(crate) fn nbd_error(what: impl Into<String>, source: nbd_wire::NbdError) -> BlockError {
    BlockError::new(nbd_kind(&source), what).with_source(source)
}

/// The kind of a VMDK failure: its file's I/O error's kind (a datastore read's, for a chain
/// read over HTTPS, is the caller's to decide first), else invalid input for what this reader
/// cannot or may not read, and fatal for damaged or mismatched files.
pub fn vmdk_kind(e: &vmdk::VmdkError) -> ErrorKind {
    use vmdk::VmdkError as E;
    match e {
        E::Io { error, .. } => ErrorKind::of_io(error),
        E::Unsupported { .. } | E::Path { .. } => ErrorKind::InvalidInput,
        E::Corrupt { .. } | E::Descriptor { .. } | E::CidMismatch { .. } => ErrorKind::Fatal,
    }
}

/// A VMDK that could not be opened, mapped or read, with what was being done, of the kind
/// [`vmdk_kind`] says.
pub(crate) fn vmdk_error(what: impl Into<String>, source: vmdk::VmdkError) -> BlockError {
    BlockError::new(vmdk_kind(&source), what).with_source(source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_wire::NbdError;

    fn server(errno: u32) -> NbdError {
        NbdError::Server { op: "write", errno, message: String::new(), offset: Some(4096) }
    }

    #[test]
    fn nbd_failures_get_the_kind_the_engine_acts_on() {
        // EIO, ENOMEM, ESHUTDOWN and a lost connection may pass; retried.
        for e in [server(5), server(12), server(108), NbdError::Io(std::io::ErrorKind::ConnectionReset.into())] {
            assert_eq!(nbd_kind(&e), ErrorKind::Transient, "{e}");
        }
        assert_eq!(nbd_kind(&NbdError::Closed("reset".into())), ErrorKind::Transient);
        assert_eq!(nbd_kind(&server(28)), ErrorKind::NoSpace);
        assert_eq!(nbd_kind(&server(122)), ErrorKind::NoSpace);
        assert_eq!(nbd_kind(&server(22)), ErrorKind::InvalidInput);
        assert_eq!(nbd_kind(&NbdError::OutOfRange { offset: 1, length: 2, size: 1 }), ErrorKind::InvalidInput);
        assert_eq!(nbd_kind(&NbdError::Unsupported("trim")), ErrorKind::InvalidInput);
        assert_eq!(nbd_kind(&server(1)), ErrorKind::Fatal);
        assert_eq!(nbd_kind(&NbdError::Protocol("bad magic".into())), ErrorKind::Fatal);
        let unknown = NbdError::Refused { what: "export", code: 0x8000_0006, message: "no such export".into() };
        assert_eq!(nbd_kind(&unknown), ErrorKind::NotFound);
        let policy = NbdError::Refused { what: "export", code: 0x8000_0002, message: "denied".into() };
        assert_eq!(nbd_kind(&policy), ErrorKind::Fatal);
        // The error keeps what was being done and its cause.
        let e = nbd_error("writing nbd://x", server(28)).at(4096, 512);
        assert!(e.to_string().starts_with("writing nbd://x at bytes 4096+512: NBD write failed"), "{e}");
        assert!(e.to_string().ends_with("(no space)"), "{e}");
    }

    #[test]
    fn vmdk_failures_get_the_kind_of_their_file_error_or_of_what_is_wrong() {
        let io = |e: std::io::Error| vmdk::VmdkError::Io { file: "a.vmdk".into(), error: e };
        assert_eq!(vmdk_kind(&io(std::io::Error::from_raw_os_error(5))), ErrorKind::Transient);
        assert_eq!(vmdk_kind(&io(std::io::ErrorKind::NotFound.into())), ErrorKind::NotFound);
        assert_eq!(vmdk_kind(&io(std::io::ErrorKind::PermissionDenied.into())), ErrorKind::Fatal);
        let corrupt = vmdk::VmdkError::Corrupt { file: "a.vmdk".into(), what: "grain table".into() };
        assert_eq!(vmdk_kind(&corrupt), ErrorKind::Fatal);
        let unsupported = vmdk::VmdkError::Unsupported { file: "a.vmdk".into(), what: "streamOptimized".into() };
        assert_eq!(vmdk_kind(&unsupported), ErrorKind::InvalidInput);
        let path = vmdk::VmdkError::Path { file: "a.vmdk".into(), name: "../b".into(), why: "outside".into() };
        assert_eq!(vmdk_kind(&path), ErrorKind::InvalidInput);
        let cid = vmdk::VmdkError::CidMismatch { child: "b".into(), parent: "a".into(), expected: 1, actual: 2 };
        assert_eq!(vmdk_kind(&cid), ErrorKind::Fatal);
    }
}
