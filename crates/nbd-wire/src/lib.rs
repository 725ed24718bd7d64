//! NBD (network block device) for syncproxy: the wire protocol of both sides as pure, fuzzable
//! functions ([`proto`]); an async client ([`Client`]) with fixed-newstyle negotiation,
//! structured replies, `base:allocation` block status and many requests in flight; and an
//! async server ([`server::Server`]) for instant recovery, which serves named
//! [`server::ExportSource`]s (read-only unless a source takes writes) on Unix sockets and
//! loopback TCP with holes as holes, bounded connections, requests and memory, and idle
//! time-outs, with optional or required TLS ([`tls`], rustls) for exports that leave the
//! machine.
//!
//! The `nbd` crate on crates.io is synchronous and has neither structured replies nor block
//! status, so this crate writes its own (see ARCHITECTURE.md).

mod client;
pub mod proto;
pub mod server;
pub mod tls;
mod uri;

pub use client::{Client, Export, Extent, Target};
/// The TLS library of [`server::ServerConfig::tls`], so users name the same version.
pub use rustls;
pub use uri::{DEFAULT_PORT, Uri};

#[cfg(test)]
mod tests {
    #[test]
    fn negotiation_from_recorded_server_bytes() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/nbd_reply");
        let modern = super::negotiate_from_bytes(&std::fs::read(seeds.join("negotiation")).unwrap()).unwrap();
        assert_eq!((modern.size, modern.structured, modern.allocation_context), (8 << 20, true, Some(1)));
        assert_eq!(modern.block_size, Some((1, 4096, 32 << 20)));
        let old = super::negotiate_from_bytes(&std::fs::read(seeds.join("old-server")).unwrap()).unwrap();
        assert_eq!((old.size, old.structured, old.allocation_context), (1 << 20, false, None));
        assert!(super::negotiate_from_bytes(b"NBDMAGIC").is_err());
    }
}

/// Why an NBD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection failed.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol; the connection is unusable.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused negotiation or the export.
    #[error("NBD server refused the {what}: {message} (reply {code:#x})")]
    Refused {
        /// What was refused.
        what: &'static str,
        /// The option reply type.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// The server failed a request.
    #[error("NBD {op} failed on the server: errno {errno}{}{}", if message.is_empty() { String::new() } else { format!(": {message}") }, offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Server {
        /// The request.
        op: &'static str,
        /// The NBD error number (errno values: 5 EIO, 28 ENOSPC, ...).
        errno: u32,
        /// The server's message, when it sent one.
        message: String,
        /// Where, when the server said.
        offset: Option<u64>,
    },
    /// The export does not offer this.
    #[error("not supported by this NBD export: {0}")]
    Unsupported(&'static str),
    /// A request outside the export.
    #[error("request [{offset}, +{length}) is outside the export of {size} bytes")]
    OutOfRange {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// The connection is closed.
    #[error("the NBD connection is closed: {0}")]
    Closed(String),
}

impl NbdError {
    /// Whether retrying (on a new connection, for `Io` and `Closed`) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            // EIO and friends may be transient on the server; a lost connection can be redone.
            Self::Io(_) | Self::Closed(_) => true,
            Self::Server { errno, .. } => matches!(errno, 5 | 12 | 108),
            // A broken server, a refusal, a missing feature or a bad request will not change.
            Self::Protocol(_) | Self::Refused { .. } | Self::Unsupported(_) | Self::OutOfRange { .. } => false,
        }
    }
}

/// Drives negotiation over an in-memory exchange: the server's bytes are `server`, the
/// client's are discarded. For fuzzing the negotiation parser without sockets or a runtime.
pub fn negotiate_from_bytes(server: &[u8]) -> Result<Export, NbdError> {
    struct Fake<'a>(&'a [u8]);
    impl tokio::io::AsyncRead for Fake<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = buf.remaining().min(self.0.len());
            buf.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }
    impl tokio::io::AsyncWrite for Fake<'_> {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    let mut stream = Fake(server);
    let fut = client::negotiate(&mut stream, "");
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        // Every read is ready at once, so a pending future cannot happen.
        std::task::Poll::Pending => Err(NbdError::Protocol("negotiation did not finish".into())),
    }
}
