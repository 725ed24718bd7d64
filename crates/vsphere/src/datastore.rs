//! Datastore files over HTTPS (`/folder/<path>?dcPath=..&dsName=..`): `HEAD` for the size,
//! ranged `GET`s and whole-file `PUT`s streamed from the caller's body, through vCenter with the session cookie or straight from the ESXi host with
//! a generic service ticket, trusted by the host's own thumbprint. A `200` answer to a ranged
//! request means the range was ignored, and is never taken as the range. A read is retried
//! after a busy answer or a lost connection, all within the client's timeout; an upload is
//! never retried (its body is consumed as it goes), and is bounded by progress, not by time.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};

use crate::error::{Error, Retry};
use crate::http::{Deadline, Endpoint, Http, Retries};
use crate::session::Client;
use crate::soap::Request;
use crate::tls::{Thumbprint, Trust};

/// A ticket for one HTTP request straight to an ESXi host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The ticket (sent as cookie `vmware_cgi_ticket`).
    pub id: String,
    /// The host to send it to, if the server said.
    pub host_name: Option<String>,
    /// The host's SHA-1 thumbprint, if the server said.
    pub ssl_thumbprint: Option<String>,
}

/// What a service ticket lets its holder do with the URL it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketMethod {
    /// Read it (`httpGet`).
    HttpGet,
    /// Upload it (`httpPut`).
    HttpPut,
}

impl TicketMethod {
    fn wire(self) -> &'static str {
        match self {
            Self::HttpGet => "httpGet",
            Self::HttpPut => "httpPut",
        }
    }
}

/// Where one datastore file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastoreFile {
    /// The datacenter's inventory path (`DC0`; `ha-datacenter` on ESXi).
    pub datacenter: String,
    /// The datastore's name.
    pub datastore: String,
    /// The path inside the datastore (`vm/vm-flat.vmdk`).
    pub path: String,
}

impl DatastoreFile {
    /// Splits `[datastore] path` as vSphere names disk files.
    pub fn from_ds_path(datacenter: &str, ds_path: &str) -> Result<Self, Error> {
        let rest = ds_path.trim().strip_prefix('[').ok_or_else(|| bad_ds_path(ds_path))?;
        let (ds, path) = rest.split_once(']').ok_or_else(|| bad_ds_path(ds_path))?;
        let path = path.trim_start();
        if ds.is_empty() || path.is_empty() {
            return Err(bad_ds_path(ds_path));
        }
        Ok(Self { datacenter: datacenter.to_owned(), datastore: ds.to_owned(), path: path.to_owned() })
    }

    /// The request path and query.
    pub fn url_path(&self) -> String {
        format!(
            "/folder/{}?dcPath={}&dsName={}",
            encode(&self.path, true),
            encode(&self.datacenter, false),
            encode(&self.datastore, false)
        )
    }
}

fn bad_ds_path(p: &str) -> Error {
    Error::Config(format!("{p:?} is not a datastore path like \"[datastore] folder/file.vmdk\""))
}

/// Percent-encodes everything but unreserved characters (and `/` in paths).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads datastore files from one server (vCenter, or an ESXi host through a ticket).
#[derive(Debug, Clone)]
pub struct DatastoreReader {
    http: Arc<Http>,
    cookie: String,
}

impl DatastoreReader {
    /// The file's size (`HEAD`). A directory listing (HTML) is refused by name. ESXi answers
    /// files as `application/octet-stream`; vcsim by extension (`application/x-vmdk-disk`).
    pub async fn size(&self, file: &DatastoreFile) -> Result<u64, Error> {
        let deadline = Deadline::after(self.http.timeout());
        let what = || format!("HEAD {}", file.path);
        let operation = what();
        let mut retries = Retries::new(deadline, &operation);
        let r = loop {
            let attempt = self.request(http::Method::HEAD, file, deadline).await.and_then(|r| match r.status {
                200 => Ok(r),
                s => Err(status_error(&what(), s)),
            });
            match attempt {
                Ok(r) => break r,
                Err(e) => retries.after(e, |e| e.retry() == Retry::Backoff).await?,
            }
        };
        let kind = r.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if kind.starts_with("text/html") {
            return Err(Error::Protocol(format!("{}: the server answers {kind:?}: a directory, not a file", what())));
        }
        r.headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::Protocol(format!("{}: no Content-Length", what())))
    }

    /// Reads `len` bytes at `offset` (a ranged `GET`, answered 206 with a matching
    /// `Content-Range`).
    pub async fn read(&self, file: &DatastoreFile, offset: u64, len: u64) -> Result<Bytes, Error> {
        let len = usize::try_from(len).map_err(|_| Error::Config(format!("a read of {len} bytes is too large")))?;
        let mut buf = vec![0u8; len];
        self.read_into(file, offset, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Reads `buf.len()` bytes at `offset` straight into `buf` (a ranged `GET`, answered 206
    /// with a matching `Content-Range`): what a disk copy uses, so a read holds one buffer.
    pub async fn read_into(&self, file: &DatastoreFile, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let Some((last, what)) = last_byte(file, offset, buf.len())? else { return Ok(()) };
        let deadline = Deadline::after(self.http.timeout());
        let mut retries = Retries::new(deadline, &what);
        loop {
            match self.read_once(file, offset, last, buf, &what, deadline).await {
                Ok(()) => return Ok(()),
                Err(e) => retries.after(e, |e| e.retry() == Retry::Backoff).await?,
            }
        }
    }

    /// [`DatastoreReader::read_into`] without its retries: one attempt, within the client's
    /// timeout, whose busy answer or lost connection comes back at once, for a caller that
    /// retries with a policy of its own (the copy engine).
    pub async fn read_into_once(&self, file: &DatastoreFile, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let Some((last, what)) = last_byte(file, offset, buf.len())? else { return Ok(()) };
        self.read_once(file, offset, last, buf, &what, Deadline::after(self.http.timeout())).await
    }

    /// One attempt of [`DatastoreReader::read_into`].
    async fn read_once(
        &self,
        file: &DatastoreFile,
        offset: u64,
        last: u64,
        buf: &mut [u8],
        what: &str,
        deadline: Deadline,
    ) -> Result<(), Error> {
        let len = buf.len() as u64;
        let req = http::Request::builder()
            .method(http::Method::GET)
            .uri(file.url_path())
            .header(http::header::COOKIE, &self.cookie)
            .header(http::header::RANGE, format!("bytes={offset}-{last}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Config(format!("building a datastore request for {}: {e}", file.path)))?;
        let context = format!("datastore {}", file.path);
        let (status, headers, filled) = match self.http.send_into(req, &context, buf, deadline).await {
            Ok(x) => x,
            // A 200 with the whole file overflows the buffer: say what happened.
            Err(Error::Protocol(m)) if m.contains("longer than") => {
                return Err(Error::Protocol(format!("{what}: the server ignored the range and sent more")));
            }
            Err(e) => return Err(e),
        };
        match status {
            206 => {
                let range = headers.get(http::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
                let want = format!("bytes {offset}-{last}/");
                if !range.starts_with(&want) || filled as u64 != len {
                    return Err(Error::Protocol(format!("{what}: the server sent {range:?} with {filled} bytes")));
                }
                Ok(())
            }
            200 => Err(Error::Protocol(format!("{what}: the server ignored the range and sent the whole file"))),
            s => Err(status_error(what, s)),
        }
    }

    async fn request(
        &self,
        method: http::Method,
        file: &DatastoreFile,
        deadline: Deadline,
    ) -> Result<crate::http::Response, Error> {
        let req = http::Request::builder()
            .method(method)
            .uri(file.url_path())
            .header(http::header::COOKIE, &self.cookie)
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Config(format!("building a datastore request for {}: {e}", file.path)))?;
        self.http.send_by(req, &format!("datastore {}", file.path), deadline).await
    }
}

/// The last byte of a read of `len` bytes at `offset` and how to name the read, or `None` for
/// an empty read.
fn last_byte(file: &DatastoreFile, offset: u64, len: usize) -> Result<Option<(u64, String)>, Error> {
    let Some(minus_one) = (len as u64).checked_sub(1) else { return Ok(None) };
    let last = offset.checked_add(minus_one).ok_or_else(|| Error::Config("the range overflows".into()))?;
    Ok(Some((last, format!("GET {} bytes {offset}-{last}", file.path))))
}

fn status_error(what: &str, status: u16) -> Error {
    let why = match status {
        404 => "no such file",
        416 => "the range lies beyond the end of the file",
        401 | 403 => "not allowed (session, ticket or privilege Datastore.Browse, or FileManagement to write)",
        503 => "the host is busy; try again with fewer requests at once",
        _ => "unexpected answer",
    };
    Error::Http { context: what.to_owned(), message: format!("HTTP {status}: {why}"), status: Some(status) }
}

impl Client {
    /// Reads datastore files through this server, with the session cookie.
    pub fn datastore_reader(&self) -> Result<DatastoreReader, Error> {
        let cookie =
            self.session_cookie().ok_or_else(|| Error::Protocol("datastore reads need a logged-in session".into()))?;
        Ok(DatastoreReader { http: self.http_arc(), cookie })
    }

    /// A ticket for one `httpGet` of `url` straight from the ESXi host holding it.
    pub async fn acquire_ticket(&self, url: &str) -> Result<Ticket, Error> {
        self.acquire_ticket_for(url, TicketMethod::HttpGet).await
    }

    /// A ticket for one request of `method` on `url` straight to the ESXi host holding it.
    pub async fn acquire_ticket_for(&self, url: &str, method: TicketMethod) -> Result<Ticket, Error> {
        let mut req = Request::new("AcquireGenericServiceTicket", &self.content().session_manager);
        req.open("spec", Some("SessionManagerHttpServiceRequestSpec"))
            .text("method", method.wire())
            .text("url", url)
            .close("spec");
        let r = self.invoke(req).await?;
        let rv = r
            .child("returnval")
            .ok_or_else(|| Error::Protocol("AcquireGenericServiceTicket returned nothing".into()))?;
        let opt = |n: &str| rv.text_of(n).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        Ok(Ticket {
            id: opt("id").ok_or_else(|| Error::Protocol("a service ticket without an id".into()))?,
            host_name: opt("hostName"),
            ssl_thumbprint: opt("sslThumbprint"),
        })
    }

    /// Reads from the ESXi host at `host` (`https://esx1:443`) with `ticket`, trusting the
    /// host by `thumbprint` (the one vCenter reports for it), not by the vCenter's pin.
    pub fn host_datastore_reader(
        &self,
        host: &str,
        thumbprint: &Thumbprint,
        ticket: &Ticket,
        timeout: Duration,
    ) -> Result<DatastoreReader, Error> {
        let (http, cookie) = host_http(host, thumbprint, ticket, timeout)?;
        Ok(DatastoreReader { http, cookie })
    }

    /// Datastore uploads (`/folder` PUT) through this server, with the session cookie.
    pub fn datastore_writer(&self) -> Result<DatastoreWriter, Error> {
        let cookie = self
            .session_cookie()
            .ok_or_else(|| Error::Protocol("datastore uploads need a logged-in session".into()))?;
        Ok(DatastoreWriter { http: self.http_arc(), cookie })
    }

    /// Uploads straight to the ESXi host at `host` with `ticket` (one acquired for
    /// [`TicketMethod::HttpPut`] of the file's URL), trusting the host by `thumbprint`.
    pub fn host_datastore_writer(
        &self,
        host: &str,
        thumbprint: &Thumbprint,
        ticket: &Ticket,
        timeout: Duration,
    ) -> Result<DatastoreWriter, Error> {
        let (http, cookie) = host_http(host, thumbprint, ticket, timeout)?;
        Ok(DatastoreWriter { http, cookie })
    }
}

/// Connections to an ESXi host trusted by its thumbprint, and the ticket's cookie.
fn host_http(
    host: &str,
    thumbprint: &Thumbprint,
    ticket: &Ticket,
    timeout: Duration,
) -> Result<(Arc<Http>, String), Error> {
    let endpoint = Endpoint::parse(host)?;
    let http = Http::new(endpoint, &Trust::Pinned(thumbprint.clone()), timeout, 64 << 20)?;
    Ok((Arc::new(http), format!("vmware_cgi_ticket={}", ticket.id)))
}

/// Uploads whole datastore files to one server (vCenter, or an ESXi host through a ticket).
#[derive(Debug, Clone)]
pub struct DatastoreWriter {
    http: Arc<Http>,
    cookie: String,
}

impl DatastoreWriter {
    /// A writer over `http` sending `cookie` (empty: none) with each upload.
    pub(crate) fn new(http: Arc<Http>, cookie: String) -> Self {
        Self { http, cookie }
    }

    /// PUTs a whole file of exactly `len` bytes streamed from `body` (`Content-Length: len`,
    /// `Content-Type: application/octet-stream`), holding no more of it than a frame at a time;
    /// 200 or 201 is success. A body that fails, or yields fewer or more bytes than `len`, is
    /// an [`Error::Body`] and the request is cut short (the server may keep a partial file:
    /// put it again or delete it). Never retried: the body is consumed as it goes. No deadline
    /// bounds the whole upload (a large file takes its time); it fails with a timeout when no
    /// byte moves, or no answer comes, for the client's timeout.
    pub async fn put(
        &self,
        file: &DatastoreFile,
        len: u64,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<(), Error> {
        self.put_to(&file.url_path(), &file.path, "application/octet-stream", len, body).await
    }

    /// PUTs `len` bytes from `body` to `uri_path` (a path and query on this writer's server)
    /// as `content_type`, as [`DatastoreWriter::put`] does; `name` names it in errors.
    pub async fn put_to(
        &self,
        uri_path: &str,
        name: &str,
        content_type: &str,
        len: u64,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<(), Error> {
        let what = format!("PUT {name}");
        let progress = Arc::new(Progress::default());
        let body = Counted { stream: Box::pin(body), len, sent: 0, progress: progress.clone() };
        let req = http::Request::builder()
            .method(http::Method::PUT)
            .uri(uri_path)
            .header(http::header::COOKIE, &self.cookie)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, len)
            .body(body.boxed_unsync())
            .map_err(|e| Error::Config(format!("building an upload of {name}: {e}")))?;
        let exchange = async {
            let (sender, resp) = self.http.exchange(req, &what).await?;
            self.http.read_answer(sender, resp, &what).await
        };
        let mut exchange = std::pin::pin!(exchange);
        let idle = self.http.timeout();
        let mut seen = 0;
        let answer = loop {
            if let Ok(r) = tokio::time::timeout(idle, &mut exchange).await {
                break r;
            }
            let now = progress.sent.load(Ordering::Relaxed);
            if now == seen {
                return Err(Error::Timeout {
                    operation: what.clone(),
                    after: idle,
                    last: Some(format!("{now} of {len} bytes sent, then nothing moved")),
                });
            }
            seen = now;
        };
        // The body's own failure says more than the broken request it caused.
        if let Some(source) = progress.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(Error::Body { context: what.clone(), source });
        }
        match answer?.status {
            200 | 201 => Ok(()),
            s => Err(status_error(&what, s)),
        }
    }
}

/// How far an upload's body got, and why it failed if it did.
#[derive(Debug, Default)]
struct Progress {
    sent: AtomicU64,
    failure: Mutex<Option<std::io::Error>>,
}

/// An upload's body: the caller's stream, held to the length announced.
struct Counted {
    stream: Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
    len: u64,
    sent: u64,
    progress: Arc<Progress>,
}

impl Counted {
    /// Records why the body failed and hands hyper an error that ends the request.
    fn fail(&self, e: std::io::Error) -> Box<dyn std::error::Error + Send + Sync> {
        let copy = std::io::Error::new(e.kind(), e.to_string());
        *self.progress.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        Box::new(copy)
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let wrong = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        match ready!(this.stream.as_mut().poll_next(cx)) {
            Some(Ok(data)) => {
                let sent = this.sent.saturating_add(data.len() as u64);
                if sent > this.len {
                    let m = format!("the body yields more than the {} bytes announced", this.len);
                    return Poll::Ready(Some(Err(this.fail(wrong(m)))));
                }
                this.sent = sent;
                this.progress.sent.store(sent, Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(this.fail(e)))),
            None if this.sent < this.len => {
                let m = format!("the body ended after {} of the {} bytes announced", this.sent, this.len);
                Poll::Ready(Some(Err(this.fail(wrong(m)))))
            }
            None => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len.saturating_sub(self.sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths_split_and_encode() {
        let f = DatastoreFile::from_ds_path("DC 1", "[ds-ssd 1] my vm/my vm#1-flat.vmdk").unwrap();
        assert_eq!((f.datastore.as_str(), f.path.as_str()), ("ds-ssd 1", "my vm/my vm#1-flat.vmdk"));
        assert_eq!(f.url_path(), "/folder/my%20vm/my%20vm%231-flat.vmdk?dcPath=DC%201&dsName=ds-ssd%201");
        for bad in ["ds/file", "[] file", "[ds]", "[ds file"] {
            assert!(DatastoreFile::from_ds_path("DC", bad).is_err(), "{bad}");
        }
    }
}
