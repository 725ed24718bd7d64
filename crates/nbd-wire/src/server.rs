//! An async NBD server: fixed-newstyle negotiation (`NBD_OPT_GO`/`INFO`/`LIST`, the old
//! `NBD_OPT_EXPORT_NAME`, structured replies, `base:allocation`), then requests served from an
//! [`ExportSource`] with bounded concurrency and replies written one at a time. Exports are
//! read-only unless their source says it takes writes. Connections are bounded, idle clients
//! are dropped, and a client's garbage ends its own connection only.
//!
//! TLS is optional ([`ServerConfig::tls`], made by [`crate::tls::server_config`]): a client
//! sends `NBD_OPT_STARTTLS`, the server acknowledges it, the TLS handshake follows on the same
//! stream and the remaining options (negotiated afresh) and requests go over TLS. With
//! [`ServerConfig::tls_required`] every other option before TLS is answered
//! `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME`, which has no error reply, closes). Without
//! TLS, `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP`. The server binds only loopback
//! addresses and Unix sockets unless TLS is required or [`ServerConfig::allow_remote`] says
//! otherwise. The handshake counts against the negotiation's idle timeout, and a failed one
//! ends its own connection only.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::NbdError;
use crate::proto::{self, Request, cflag, chunk, cmd, errno, info, opt, rep, state, tflag};

/// A boxed future, so that [`ExportSource`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a source could not serve a request; the client is told the errno.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the data failed (sent as `EIO`).
    #[error("export I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A failure with a specific NBD errno (`proto::errno`).
    #[error("export error {errno}: {message}")]
    Errno {
        /// The errno sent to the client.
        errno: u32,
        /// Why (sent to clients with structured replies).
        message: String,
    },
}

impl ExportError {
    /// The errno the client is sent.
    pub fn errno(&self) -> u32 {
        match self {
            Self::Io(_) => errno::EIO,
            Self::Errno { errno, .. } => *errno,
        }
    }
}

/// What an export serves: a disk of a fixed size, read-only unless [`ExportSource::writable`].
pub trait ExportSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`; the server has checked that the range is inside
    /// the export.
    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), ExportError>>;

    /// `base:allocation` from `offset`: `(length, proto::state flags)` extents for a prefix of
    /// `[offset, offset+length)` (at least one, none empty). Extents flagged `state::ZERO` are
    /// sent as holes in reads. The default says everything is data.
    fn block_status(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<Vec<(u32, u32)>, ExportError>> {
        let _ = offset;
        Box::pin(async move { Ok(vec![(length, 0)]) })
    }

    /// Whether clients may write. The default is no: the server refuses writes with `EPERM`.
    fn writable(&self) -> bool {
        false
    }

    /// Writes `data` at `offset` (inside the export); called only when [`Self::writable`].
    fn write_at<'a>(&'a self, offset: u64, data: &'a [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        let _ = (offset, data);
        Box::pin(async { Err(ExportError::Errno { errno: errno::EPERM, message: "read-only export".into() }) })
    }

    /// Writes `length` zeros at `offset`; the default writes them in pieces of up to 1 MiB.
    fn write_zeroes(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let piece = length.min(1 << 20);
            let zeros = vec![0u8; piece as usize];
            let mut done = 0u32;
            while done < length {
                let n = (length - done).min(piece);
                self.write_at(offset + u64::from(done), &zeros[..n as usize]).await?;
                done += n;
            }
            Ok(())
        })
    }

    /// Makes every write completed so far durable, whichever connection made it (the server
    /// advertises multi-conn, which promises that). The default has nothing to do.
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async { Ok(()) })
    }
}

/// An export held in memory; whole blocks of zeros are reported as holes. For tests, fuzzing,
/// and small images.
#[derive(Debug, Clone)]
pub struct MemoryExport {
    data: Arc<std::sync::RwLock<Vec<u8>>>,
    block: usize,
    writable: bool,
}

impl MemoryExport {
    /// Serves `data` read-only, reporting holes by blocks of `block` bytes (at least 1).
    pub fn new(data: Vec<u8>, block: usize) -> Self {
        Self { data: Arc::new(std::sync::RwLock::new(data)), block: block.max(1), writable: false }
    }

    /// Serves `data` and takes writes into it.
    pub fn writable(data: Vec<u8>, block: usize) -> Self {
        Self { writable: true, ..Self::new(data, block) }
    }

    fn data(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl ExportSource for MemoryExport {
    fn size(&self) -> u64 {
        self.data().len() as u64
    }

    fn read_at<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            let data = self.data();
            let start = usize::try_from(offset).ok().filter(|&s| s <= data.len());
            match start.and_then(|s| data.get(s..s + buf.len())) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(ExportError::Errno { errno: errno::EINVAL, message: "read past the end".into() }),
            }
        })
    }

    fn block_status(&self, offset: u64, length: u32) -> BoxFuture<'_, Result<Vec<(u32, u32)>, ExportError>> {
        Box::pin(async move {
            let data = self.data();
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
            let end = start.saturating_add(length as usize).min(data.len());
            let mut out: Vec<(u32, u32)> = Vec::new();
            let mut at = start;
            while at < end {
                let block_end = ((at / self.block + 1) * self.block).min(end);
                let flags = if data[at..block_end].iter().all(|&b| b == 0) { state::HOLE | state::ZERO } else { 0 };
                let len = u32::try_from(block_end - at).unwrap_or(u32::MAX);
                match out.last_mut() {
                    Some((l, f)) if *f == flags => *l += len,
                    _ => out.push((len, flags)),
                }
                at = block_end;
            }
            Ok(out)
        })
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_at<'a>(&'a self, offset: u64, src: &'a [u8]) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
            let start = usize::try_from(offset).ok().filter(|&s| self.writable && s <= data.len());
            match start.and_then(|s| data.get_mut(s..s + src.len())) {
                Some(dst) => {
                    dst.copy_from_slice(src);
                    Ok(())
                }
                None => Err(ExportError::Errno { errno: errno::EPERM, message: "not writable there".into() }),
            }
        })
    }
}

/// Limits and options of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A client that has not finished negotiating after this long, or sends nothing for this
    /// long with no request in flight, is disconnected; so is one that does not read its
    /// replies for this long.
    pub idle_timeout: Duration,
    /// Largest READ accepted (also advertised as the maximum block size; BLOCK_STATUS may ask
    /// for more, and is answered for a prefix of at most 65,536 extents).
    pub max_request: u32,
    /// Requests of one connection served at once.
    pub requests_in_flight: usize,
    /// Bytes of read data held in memory at once, over all connections.
    pub max_buffered: u32,
    /// Options accepted in one negotiation before the client is disconnected.
    pub max_options: u32,
    /// Whether [`Server::serve_tcp`] may bind an address other than loopback. Off by default:
    /// without TLS an export should not leave the machine unless someone says so. Not needed
    /// when TLS is required.
    pub allow_remote: bool,
    /// TLS offered through `NBD_OPT_STARTTLS` (see [`crate::tls::server_config`]); none by
    /// default.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether clients must start TLS before anything else (the NBD spec's "TLS mandatory");
    /// needs [`Self::tls`].
    pub tls_required: bool,
}

impl ServerConfig {
    /// Whether every client must speak TLS before it sees an export.
    fn tls_enforced(&self) -> bool {
        self.tls.is_some() && self.tls_required
    }

    /// Refuses `tls_required` without a TLS configuration (no client could ever connect).
    fn check_tls(&self) -> Result<(), NbdError> {
        if self.tls_required && self.tls.is_none() {
            return Err(NbdError::Unsupported("ServerConfig::tls_required without ServerConfig::tls"));
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout: Duration::from_secs(60),
            max_request: 32 << 20,
            requests_in_flight: 16,
            max_buffered: 256 << 20,
            max_options: 256,
            allow_remote: false,
            tls: None,
            tls_required: false,
        }
    }
}

/// The address [`Server::serve_tcp`] is meant for by default: loopback, the NBD port.
pub const DEFAULT_TCP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), crate::DEFAULT_PORT);

/// The `base:allocation` context id this server hands out.
const ALLOCATION_ID: u32 = 1;
/// Preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// Most block status descriptors sent in one reply.
const MAX_DESCRIPTORS: usize = 1 << 16;

struct Inner {
    config: ServerConfig,
    /// Exports by name, in the order `NBD_OPT_LIST` shows them; `""` is the first one unless
    /// an export is named `""`.
    exports: BTreeMap<String, Arc<dyn ExportSource>>,
    default_export: Option<String>,
    connections: Arc<Semaphore>,
    buffered: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
    sockets: Mutex<Vec<PathBuf>>,
}

/// An NBD server for named exports. Clones share listeners, limits and shutdown; dropping
/// them does not stop the listeners, [`Server::shutdown`] does.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.inner.config)
            .field("exports", &self.inner.exports.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Server {
    /// A server for `exports` (name, source); the first is also the default export `""`.
    pub fn new(config: ServerConfig, exports: Vec<(String, Arc<dyn ExportSource>)>) -> Self {
        let default_export = exports.first().map(|(n, _)| n.clone());
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let buffered = Arc::new(Semaphore::new(config.max_buffered.max(config.max_request) as usize));
        Self {
            inner: Arc::new(Inner {
                exports: exports.into_iter().collect(),
                default_export,
                connections,
                buffered,
                shutdown: watch::channel(false).0,
                listeners: Mutex::new(Vec::new()),
                sockets: Mutex::new(Vec::new()),
                config,
            }),
        }
    }

    /// Listens on a Unix socket at `path` (which must not exist); the socket is removed at
    /// shutdown.
    pub async fn serve_unix(&self, path: &Path) -> Result<(), NbdError> {
        self.inner.config.check_tls()?;
        let listener = tokio::net::UnixListener::bind(path)?;
        self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner()).push(path.to_owned());
        self.spawn_accept_loop(listener);
        Ok(())
    }

    /// Listens on TCP at `addr` (port 0 picks one) and returns the bound address. Only loopback
    /// addresses unless TLS is required or the config's `allow_remote` is set.
    pub async fn serve_tcp(&self, addr: SocketAddr) -> Result<SocketAddr, NbdError> {
        let config = &self.inner.config;
        config.check_tls()?;
        if !addr.ip().is_loopback() && !config.allow_remote && !config.tls_enforced() {
            return Err(NbdError::Unsupported(
                "serving NBD on a non-loopback address without TLS required or ServerConfig::allow_remote",
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        self.spawn_accept_loop(listener);
        Ok(bound)
    }

    /// Accepts until shutdown, a task per connection within the connection limit.
    fn spawn_accept_loop<L: Listener>(&self, listener: L) {
        let server = self.clone();
        let task = tokio::spawn(async move {
            let mut shutdown = server.inner.shutdown.subscribe();
            let mut sessions = JoinSet::new();
            loop {
                while sessions.try_join_next().is_some() {}
                let accepted = tokio::select! {
                    _ = shutdown.wait_for(|&s| s) => break,
                    a = listener.accept_split() => a,
                };
                match accepted {
                    Ok((r, w)) => match server.inner.connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let server = server.clone();
                            sessions.spawn(async move {
                                server.serve_connection(r, w).await;
                                drop(permit);
                            });
                        }
                        // Over the limit: closed at once, costing nothing but the accept.
                        Err(_) => drop((r, w)),
                    },
                    // Out of file descriptors and the like: wait rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            while sessions.join_next().await.is_some() {}
        });
        self.inner.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    }

    /// Closes the listeners and every connection, and waits until they are gone.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let listeners = std::mem::take(&mut *self.inner.listeners.lock().unwrap_or_else(|p| p.into_inner()));
        for l in listeners {
            let _ = l.await;
        }
        for path in std::mem::take(&mut *self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Serves one client on an already connected stream (not counted against the connection
    /// limit), until it disconnects, breaks the protocol, idles out or the server shuts down.
    pub async fn serve_connection<R, W>(&self, r: R, w: W)
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut shutdown = self.inner.shutdown.subscribe();
        if *shutdown.borrow() {
            return;
        }
        let idle = self.inner.config.idle_timeout;
        // A whole negotiation, TLS handshake included, within the idle timeout: a client
        // trickling bytes cannot hold a connection for longer.
        let deadline = tokio::time::Instant::now() + idle;
        let mut r = BufReader::with_capacity(16 << 10, r);
        let mut w = w;
        let plain = async {
            let no_zeroes = greet(&self.inner, &mut r, &mut w).await?;
            let mut limits = Limits { no_zeroes, options_left: self.inner.config.max_options };
            negotiate(&self.inner, &mut r, &mut w, &mut limits, false).await.map(|n| (n, limits))
        };
        let negotiated = tokio::select! {
            _ = shutdown.wait_for(|&s| s) => return,
            n = tokio::time::timeout_at(deadline, plain) => n.unwrap_or_else(|_| Err(NbdError::Io(timed_out()))),
        };
        let (session, mut limits) = match negotiated {
            Ok((Negotiated::Session(session), _)) => return transmission(&self.inner, session, r, w, shutdown).await,
            Ok((Negotiated::StartTls(tls), limits)) => (tls, limits),
            Ok((Negotiated::Ended, _)) | Err(_) => {
                let _ = within(idle, w.shutdown()).await;
                return;
            }
        };
        // STARTTLS was acknowledged: the handshake, then the options again, over TLS.
        let secure = async {
            let stream = tokio_rustls::TlsAcceptor::from(session).accept(tokio::io::join(r, w)).await?;
            let (tr, mut tw) = tokio::io::split(stream);
            let mut tr = BufReader::with_capacity(16 << 10, tr);
            match negotiate(&self.inner, &mut tr, &mut tw, &mut limits, true).await? {
                Negotiated::Session(s) => Ok(Some((s, tr, tw))),
                Negotiated::StartTls(_) | Negotiated::Ended => {
                    let _ = within(idle, tw.shutdown()).await;
                    Ok(None)
                }
            }
        };
        let negotiated: Result<_, NbdError> = tokio::select! {
            _ = shutdown.wait_for(|&s| s) => return,
            n = tokio::time::timeout_at(deadline, secure) => n.unwrap_or_else(|_| Err(NbdError::Io(timed_out()))),
        };
        // A failed handshake or negotiation drops the stream, which closes the connection.
        if let Ok(Some((session, tr, tw))) = negotiated {
            transmission(&self.inner, session, tr, tw, shutdown).await;
        }
    }

    /// Runs one whole session over `input` (the client's bytes, then end of file) on a
    /// runtime of its own, and returns what the server sent. For fuzzing the server without
    /// sockets; it must not be called from inside a tokio runtime.
    pub fn session_from_bytes(&self, input: &[u8]) -> Vec<u8> {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
            return Vec::new();
        };
        let out = Arc::new(Mutex::new(Vec::new()));
        rt.block_on(self.serve_connection(std::io::Cursor::new(input.to_vec()), SharedVec(out.clone())));
        std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A writer into a shared buffer (for [`Server::session_from_bytes`]).
struct SharedVec(Arc<Mutex<Vec<u8>>>);

impl AsyncWrite for SharedVec {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
        std::task::Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A listening socket whose connections are split into owned halves (no lock between them).
trait Listener: Send + Sync + 'static {
    type R: AsyncRead + Send + Unpin + 'static;
    type W: AsyncWrite + Send + Unpin + 'static;
    fn accept_split(&self) -> impl Future<Output = std::io::Result<(Self::R, Self::W)>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    async fn accept_split(&self) -> std::io::Result<(Self::R, Self::W)> {
        Ok(self.accept().await?.0.into_split())
    }
}

impl Listener for tokio::net::TcpListener {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    async fn accept_split(&self) -> std::io::Result<(Self::R, Self::W)> {
        let (s, _) = self.accept().await?;
        s.set_nodelay(true)?;
        Ok(s.into_split())
    }
}

/// What negotiation chose.
struct Session {
    export: Arc<dyn ExportSource>,
    structured: bool,
    allocation: bool,
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "the client idled too long")
}

/// `fut`, or a time-out error after the idle timeout.
async fn within<T>(d: Duration, fut: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(d, fut).await.unwrap_or_else(|_| Err(timed_out()))
}

impl Inner {
    fn export(&self, name: &str) -> Option<(&str, &Arc<dyn ExportSource>)> {
        let name = match (name, self.exports.contains_key("")) {
            ("", false) => self.default_export.as_deref()?,
            (n, _) => n,
        };
        self.exports.get_key_value(name).map(|(k, v)| (k.as_str(), v))
    }

    fn flags(export: &dyn ExportSource, structured: bool) -> u16 {
        let df = if structured { tflag::SEND_DF } else { 0 };
        let access = if export.writable() { tflag::SEND_FUA | tflag::SEND_WRITE_ZEROES } else { tflag::READ_ONLY };
        tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN | df | access
    }
}

/// What the options phase ended with.
enum Negotiated {
    /// The client chose an export.
    Session(Session),
    /// STARTTLS was acknowledged: the handshake comes next, with this configuration.
    StartTls(Arc<rustls::ServerConfig>),
    /// The client ended it (ABORT, an unknown export or one asked for before TLS under
    /// `EXPORT_NAME`).
    Ended,
}

/// What one connection's negotiation carries across a STARTTLS.
struct Limits {
    /// The client asked for no zero padding after `NBD_OPT_EXPORT_NAME`.
    no_zeroes: bool,
    /// Options the client may still send.
    options_left: u32,
}

/// Sends the fixed-newstyle hello and reads the client's flags: whether it wants no zeroes.
async fn greet<R, W>(inner: &Inner, r: &mut R, w: &mut W) -> Result<bool, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let idle = inner.config.idle_timeout;
    within(idle, async {
        w.write_all(&proto::encode_server_hello(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)).await?;
        w.flush().await
    })
    .await?;
    let mut flags = [0u8; 4];
    within(idle, r.read_exact(&mut flags)).await?;
    proto::parse_client_flags(&flags)
}

/// The options of a fixed-newstyle negotiation, before TLS (`secure` false) or after it.
/// Errors are I/O errors, time-outs and protocol violations, after which the connection is
/// closed.
async fn negotiate<R, W>(
    inner: &Inner,
    r: &mut R,
    w: &mut W,
    limits: &mut Limits,
    secure: bool,
) -> Result<Negotiated, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let idle = inner.config.idle_timeout;
    let no_zeroes = limits.no_zeroes;
    let tls_first = inner.config.tls_enforced() && !secure;
    let (mut structured, mut allocation) = (false, false);
    while limits.options_left > 0 {
        limits.options_left -= 1;
        let mut header = [0u8; 16];
        within(idle, r.read_exact(&mut header)).await?;
        let (option, len) = proto::parse_option_header(&header)?;
        let reply = |kind: u32, payload: &[u8]| proto::encode_option_reply(option, kind, payload);
        if len > proto::MAX_OPTION_DATA {
            // The data is not worth reading: say why, and close.
            let out = reply(rep::ERR_TOO_BIG, b"option data too large");
            within(idle, async { w.write_all(&out).await.and(w.flush().await) }).await?;
            return Err(NbdError::Protocol(format!("option {option} with {len} bytes of data")));
        }
        let mut data = Vec::new();
        within(idle, (&mut *r).take(u64::from(len)).read_to_end(&mut data)).await?;
        if data.len() != len as usize {
            return Err(NbdError::Protocol("option data cut short".into()));
        }
        let mut out = Vec::new();
        let mut chosen = None;
        match option {
            // No error reply exists for this option: before a required TLS it closes.
            opt::EXPORT_NAME if tls_first => return Ok(Negotiated::Ended),
            opt::EXPORT_NAME => {
                // No error reply exists for this option: an unknown export closes.
                let name = String::from_utf8_lossy(&data);
                let Some((_, export)) = inner.export(&name) else { return Ok(Negotiated::Ended) };
                out = proto::encode_export_name_reply(export.size(), Inner::flags(&**export, structured), no_zeroes);
                chosen = Some(export.clone());
            }
            opt::ABORT => {
                out = reply(rep::ACK, &[]);
                let _ = within(idle, async { w.write_all(&out).await.and(w.flush().await) }).await;
                return Ok(Negotiated::Ended);
            }
            opt::STARTTLS => match (&inner.config.tls, secure) {
                (None, _) => out = reply(rep::ERR_UNSUP, b"TLS is not offered by this server"),
                (Some(_), true) => out = reply(rep::ERR_INVALID, b"TLS is already in use"),
                (Some(_), false) if !data.is_empty() => out = reply(rep::ERR_INVALID, b"this option takes no data"),
                (Some(tls), false) => {
                    within(idle, async { w.write_all(&reply(rep::ACK, &[])).await.and(w.flush().await) }).await?;
                    return Ok(Negotiated::StartTls(tls.clone()));
                }
            },
            _ if tls_first => out = reply(rep::ERR_TLS_REQD, b"this server requires TLS first (NBD_OPT_STARTTLS)"),
            opt::LIST if data.is_empty() => {
                for name in inner.exports.keys() {
                    out.extend(reply(rep::SERVER, &proto::encode_rep_server(name)));
                }
                out.extend(reply(rep::ACK, &[]));
            }
            opt::INFO | opt::GO => match proto::parse_export_request(&data) {
                Err(e) => out = reply(rep::ERR_INVALID, e.to_string().as_bytes()),
                Ok(req) => match inner.export(&req.name) {
                    None => out = reply(rep::ERR_UNKNOWN, b"no such export"),
                    Some((name, export)) => {
                        let size = export.size();
                        out.extend(reply(
                            rep::INFO,
                            &proto::encode_info_export(size, Inner::flags(&**export, structured)),
                        ));
                        if req.infos.contains(&info::NAME) {
                            out.extend(reply(rep::INFO, &proto::encode_info_name(name)));
                        }
                        let block = proto::encode_info_block_size(1, PREFERRED_BLOCK, inner.config.max_request);
                        out.extend(reply(rep::INFO, &block));
                        out.extend(reply(rep::ACK, &[]));
                        if option == opt::GO {
                            chosen = Some(export.clone());
                        }
                    }
                },
            },
            opt::STRUCTURED_REPLY if data.is_empty() => {
                structured = true;
                out = reply(rep::ACK, &[]);
            }
            opt::SET_META_CONTEXT | opt::LIST_META_CONTEXT if !structured => {
                out = reply(rep::ERR_INVALID, b"structured replies first");
            }
            opt::SET_META_CONTEXT | opt::LIST_META_CONTEXT => match proto::parse_meta_context_request(&data) {
                Err(e) => out = reply(rep::ERR_INVALID, e.to_string().as_bytes()),
                Ok(req) if inner.export(&req.export).is_none() => out = reply(rep::ERR_UNKNOWN, b"no such export"),
                Ok(req) => {
                    let listing = option == opt::LIST_META_CONTEXT;
                    let matches = |q: &str| q == proto::BASE_ALLOCATION || (listing && q == "base:");
                    let offered =
                        if listing && req.queries.is_empty() { true } else { req.queries.iter().any(|q| matches(q)) };
                    if !listing {
                        allocation = offered;
                    }
                    if offered {
                        out.extend(reply(
                            rep::META_CONTEXT,
                            &proto::encode_rep_meta_context(ALLOCATION_ID, "base:allocation"),
                        ));
                    }
                    out.extend(reply(rep::ACK, &[]));
                }
            },
            opt::LIST | opt::STRUCTURED_REPLY => out = reply(rep::ERR_INVALID, b"this option takes no data"),
            _ => out = reply(rep::ERR_UNSUP, b"option not supported"),
        }
        within(idle, async { w.write_all(&out).await.and(w.flush().await) }).await?;
        if let Some(export) = chosen {
            return Ok(Negotiated::Session(Session { export, structured, allocation }));
        }
    }
    Err(NbdError::Protocol(format!("more than {} options", inner.config.max_options)))
}

/// The reply side of a connection, shared by the request tasks: one reply at a time, and a
/// signal that the connection must end (the client stopped reading).
struct Replies<W> {
    writer: tokio::sync::Mutex<W>,
    broken: watch::Sender<bool>,
    idle: Duration,
}

impl<W: AsyncWrite + Unpin> Replies<W> {
    /// Writes whole reply `parts` together; a failure or a client that does not read for the
    /// idle timeout breaks the connection.
    async fn send(&self, parts: &[&[u8]]) {
        let mut w = self.writer.lock().await;
        let sent = within(self.idle, async {
            for p in parts {
                w.write_all(p).await?;
            }
            w.flush().await
        })
        .await;
        if sent.is_err() {
            self.broken.send_replace(true);
        }
    }

    async fn error(&self, req: &Request, structured: bool, errno: u32, message: &str) {
        // READ and BLOCK_STATUS errors go in a chunk when replies are structured.
        if structured && matches!(req.kind, cmd::READ | cmd::BLOCK_STATUS) {
            self.send(&[&proto::encode_error_chunk(req.cookie, errno, message)]).await;
        } else {
            self.send(&[&proto::encode_simple_reply(req.cookie, errno)]).await;
        }
    }
}

/// Serves requests until the client disconnects, breaks the protocol, idles out, stops
/// reading, or the server shuts down. Requests already accepted are answered first, except at
/// shutdown or when the connection broke.
async fn transmission<R, W>(
    inner: &Arc<Inner>,
    session: Session,
    mut r: BufReader<R>,
    w: W,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let config = &inner.config;
    let replies = Arc::new(Replies {
        writer: tokio::sync::Mutex::new(w),
        broken: watch::channel(false).0,
        idle: config.idle_timeout,
    });
    let mut broken = replies.broken.subscribe();
    let in_flight = Arc::new(Semaphore::new(config.requests_in_flight.max(1)));
    let session = Arc::new(session);
    let mut tasks = JoinSet::new();
    let mut stopped = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let mut header = [0u8; 28];
        let got = {
            let mut read = std::pin::pin!(r.read_exact(&mut header));
            loop {
                tokio::select! {
                    got = &mut read => break Some(got),
                    _ = shutdown.wait_for(|&s| s) => { stopped = true; break None }
                    _ = broken.wait_for(|&b| b) => { stopped = true; break None }
                    () = tokio::time::sleep(config.idle_timeout) => {
                        // Idle only when nothing is being answered.
                        while tasks.try_join_next().is_some() {}
                        if tasks.is_empty() { break None }
                    }
                }
            }
        };
        let Some(Ok(_)) = got else { break };
        let Ok(req) = proto::parse_request(&header) else { break };
        let size = session.export.size();
        let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= size);
        let writable = session.export.writable();
        let read_only = (errno::EPERM, "read-only export");
        match req.kind {
            cmd::DISC => break,
            cmd::WRITE if !writable || !in_range || req.length == 0 || req.length > config.max_request => {
                // The payload follows the header: skip it (bounded), or close if it is too large.
                if req.length > config.max_request {
                    break;
                }
                let (mut payload, mut sink) = ((&mut r).take(u64::from(req.length)), tokio::io::sink());
                match within(config.idle_timeout, tokio::io::copy(&mut payload, &mut sink)).await {
                    Ok(n) if n == u64::from(req.length) => {}
                    _ => break,
                }
                let (e, why) = if writable { (errno::EINVAL, "bad write range") } else { read_only };
                replies.error(&req, session.structured, e, why).await;
            }
            cmd::WRITE => {
                // Counted against the server's memory like a read, until the write is done.
                let Ok(bytes) = inner.buffered.clone().acquire_many_owned(req.length).await else { break };
                let mut data = vec![0u8; req.length as usize];
                if within(config.idle_timeout, r.read_exact(&mut data)).await.is_err() {
                    break;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let (replies, session) = (replies.clone(), session.clone());
                tasks.spawn(async move {
                    let done = session.export.write_at(req.offset, &data).await;
                    drop(bytes);
                    plain_reply(&replies, &session, &req, done).await;
                    drop(permit);
                });
            }
            cmd::WRITE_ZEROES | cmd::TRIM if !writable => {
                replies.error(&req, session.structured, read_only.0, read_only.1).await;
            }
            cmd::WRITE_ZEROES | cmd::TRIM if !in_range => {
                replies.error(&req, session.structured, errno::EINVAL, "request outside the export").await;
            }
            // TRIM is advisory: keeping the data is a valid way to honour it.
            cmd::TRIM | cmd::CACHE => replies.send(&[&proto::encode_simple_reply(req.cookie, 0)]).await,
            cmd::WRITE_ZEROES | cmd::FLUSH => {
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let (replies, session) = (replies.clone(), session.clone());
                tasks.spawn(async move {
                    let done = if req.kind == cmd::FLUSH {
                        session.export.flush().await
                    } else {
                        session.export.write_zeroes(req.offset, req.length).await
                    };
                    plain_reply(&replies, &session, &req, done).await;
                    drop(permit);
                });
            }
            cmd::READ | cmd::BLOCK_STATUS => {
                let problem = if req.length == 0 {
                    Some((errno::EINVAL, "empty request"))
                } else if req.kind == cmd::READ && req.length > config.max_request {
                    // Block status carries no data: clients may map more than a block at once.
                    Some((errno::EOVERFLOW, "request larger than the maximum block size"))
                } else if !in_range {
                    Some((errno::EINVAL, "request outside the export"))
                } else if req.kind == cmd::BLOCK_STATUS && !session.allocation {
                    Some((errno::EINVAL, "base:allocation was not negotiated"))
                } else {
                    None
                };
                if let Some((e, why)) = problem {
                    replies.error(&req, session.structured, e, why).await;
                    continue;
                }
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let (replies, session, buffered) = (replies.clone(), session.clone(), inner.buffered.clone());
                tasks.spawn(async move {
                    if req.kind == cmd::READ {
                        // Held until the reply is written: bounds the data in memory.
                        if let Ok(_bytes) = buffered.acquire_many_owned(req.length).await {
                            serve_read(&replies, &session, &req).await;
                        }
                    } else {
                        serve_block_status(&replies, &session, &req).await;
                    }
                    drop(permit);
                });
            }
            _ => replies.error(&req, session.structured, errno::EINVAL, "unknown command").await,
        }
        if *replies.broken.borrow() {
            stopped = true;
            break;
        }
    }
    if stopped {
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
    let mut w = replies.writer.lock().await;
    let _ = within(config.idle_timeout, w.shutdown()).await;
}

/// Answers a request that returns no data: after a FUA write, flushes first.
async fn plain_reply<W: AsyncWrite + Unpin>(
    replies: &Replies<W>,
    session: &Session,
    req: &Request,
    done: Result<(), ExportError>,
) {
    let fua = req.flags & cflag::FUA != 0 && req.kind != cmd::FLUSH;
    let done = match done {
        Ok(()) if fua => session.export.flush().await,
        d => d,
    };
    match done {
        Ok(()) => replies.send(&[&proto::encode_simple_reply(req.cookie, 0)]).await,
        Err(e) => replies.error(req, session.structured, e.errno(), &e.to_string()).await,
    }
}

/// Extents covering `[offset, offset+length)` from the source (the first call's only, with
/// `one`), merged and clipped to the range, at most `MAX_DESCRIPTORS` of them; an error if the
/// source returns none or an empty one.
async fn extents(
    export: &dyn ExportSource,
    offset: u64,
    length: u32,
    one: bool,
) -> Result<Vec<(u32, u32)>, ExportError> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut done = 0u32;
    while done < length && out.len() < MAX_DESCRIPTORS {
        let got = export.block_status(offset + u64::from(done), length - done).await?;
        if got.is_empty() || got.iter().any(|&(l, _)| l == 0) {
            return Err(ExportError::Errno {
                errno: errno::EIO,
                message: "the export's block status is malformed".into(),
            });
        }
        for (len, flags) in got {
            let len = len.min(length - done);
            if len == 0 {
                break;
            }
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += len,
                _ => out.push((len, flags)),
            }
            done += len;
        }
        if one {
            break;
        }
    }
    Ok(out)
}

async fn serve_block_status<W: AsyncWrite + Unpin>(replies: &Replies<W>, session: &Session, req: &Request) {
    let one = req.flags & cflag::REQ_ONE != 0;
    match extents(&*session.export, req.offset, req.length, one).await {
        Ok(mut e) => {
            if one {
                e.truncate(1);
            }
            let reply = proto::encode_block_status_chunk(req.cookie, chunk::FLAG_DONE, ALLOCATION_ID, &e);
            replies.send(&[&reply]).await;
        }
        Err(e) => replies.error(req, true, e.errno(), &e.to_string()).await,
    }
}

async fn serve_read<W: AsyncWrite + Unpin>(replies: &Replies<W>, session: &Session, req: &Request) {
    let export = &*session.export;
    let mut buf = vec![0u8; req.length as usize];
    if !session.structured || req.flags & cflag::DF != 0 {
        // One piece of data: a simple reply, or one data chunk.
        match export.read_at(req.offset, &mut buf).await {
            Ok(()) if session.structured => {
                let h = proto::encode_data_chunk_header(req.cookie, chunk::FLAG_DONE, req.offset, req.length);
                replies.send(&[&h, &buf]).await;
            }
            Ok(()) => replies.send(&[&proto::encode_simple_reply(req.cookie, 0), &buf]).await,
            Err(e) => replies.error(req, session.structured, e.errno(), &e.to_string()).await,
        }
        return;
    }
    // Structured: zero extents become hole chunks and are not read; the data is read in runs.
    let map = match extents(export, req.offset, req.length, false).await {
        Ok(m) => m,
        Err(e) => return replies.error(req, true, e.errno(), &e.to_string()).await,
    };
    let covered: u64 = map.iter().map(|&(l, _)| u64::from(l)).sum();
    let mut runs: Vec<(u32, u32, bool)> = Vec::new(); // (start within request, length, hole)
    let mut at = 0u32;
    for (len, flags) in map {
        let hole = flags & state::ZERO != 0;
        match runs.last_mut() {
            Some((_, l, h)) if *h == hole => *l += len,
            _ => runs.push((at, len, hole)),
        }
        at += len;
    }
    if covered < u64::from(req.length) {
        // The descriptor cap was hit: the rest is read as data.
        runs.push((at, req.length - at, false));
    }
    for &(start, len, hole) in &runs {
        if !hole {
            let piece = &mut buf[start as usize..(start + len) as usize];
            if let Err(e) = export.read_at(req.offset + u64::from(start), piece).await {
                return replies.error(req, true, e.errno(), &e.to_string()).await;
            }
        }
    }
    let mut headers = Vec::with_capacity(runs.len());
    for (i, &(start, len, hole)) in runs.iter().enumerate() {
        let flags = if i + 1 == runs.len() { chunk::FLAG_DONE } else { 0 };
        let offset = req.offset + u64::from(start);
        if hole {
            headers.push(proto::encode_hole_chunk(req.cookie, flags, offset, len).to_vec());
        } else {
            headers.push(proto::encode_data_chunk_header(req.cookie, flags, offset, len).to_vec());
        }
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(runs.len() * 2);
    for (h, &(start, len, hole)) in headers.iter().zip(&runs) {
        parts.push(h);
        if !hole {
            parts.push(&buf[start as usize..(start + len) as usize]);
        }
    }
    replies.send(&parts).await;
}
