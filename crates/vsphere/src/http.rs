//! HTTPS to one vSphere endpoint on hyper 1.x: a small pool of kept-alive connections, TLS
//! through rustls with the chosen trust, bounded bodies, and what the server's TLS looked like.
//! The timeout is a [`Deadline`] for a whole operation: its attempts, the back-off between
//! them and a re-login all fit in it, so a dead server fails within the timeout, not within
//! some multiple of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::tls::{ServerTls, Trust, client_config, server_name};

/// Where a client talks to: scheme, host, port and path (`https://vc.example:443/sdk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https` (or `http`, allowed only with [`Trust::Insecure`]).
    pub tls: bool,
    /// The host name or address.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The SOAP path (`/sdk`).
    pub path: String,
}

impl Endpoint {
    /// Parses `https://host[:port][/path]`; a bare host means `https://host/sdk`.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let with_scheme = if url.contains("://") { url.to_owned() } else { format!("https://{url}") };
        let uri: http::Uri = with_scheme.parse().map_err(|e| Error::Config(format!("{url:?} is not a URL: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(Error::Config(format!("{url:?}: the scheme must be https, not {other:?}"))),
        };
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(Error::Config(format!(
                "{}: put no user or password in the URL (they would end up in logs); use --user and a password file",
                uri.host().unwrap_or("the URL")
            )));
        }
        let host = uri.host().ok_or_else(|| Error::Config(format!("{url:?} has no host")))?.to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = match uri.path() {
            "" | "/" => "/sdk".to_owned(),
            p => p.to_owned(),
        };
        Ok(Self { tls, host, port, path })
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// When a whole operation must be over: every attempt, the pauses between them and a
/// re-login count against it.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: tokio::time::Instant,
    budget: Duration,
}

impl Deadline {
    /// `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self { at: tokio::time::Instant::now() + budget, budget }
    }

    /// The time left (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(tokio::time::Instant::now())
    }

    /// The error saying `operation` got no answer in time, with the last failure seen.
    pub(crate) fn expired(&self, operation: &str, last: Option<&Error>) -> Error {
        Error::Timeout { operation: operation.to_owned(), after: self.budget, last: last.map(ToString::to_string) }
    }

    /// Runs `work` until the deadline.
    async fn bound<T>(&self, operation: &str, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::time::timeout_at(self.at, work).await.unwrap_or_else(|_| Err(self.expired(operation, None)))
    }
}

/// The first pause before a retry; each one doubles it, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The retries of one operation within its deadline: after each failed attempt,
/// [`Retries::after`] pauses (longer each time) and lets another attempt go, or says what to
/// return: the error itself when it is not worth retrying, a timeout naming the last failure
/// once the deadline has passed.
#[derive(Debug)]
pub(crate) struct Retries<'a> {
    deadline: Deadline,
    operation: &'a str,
    pause: Duration,
    last: Option<Error>,
}

impl<'a> Retries<'a> {
    /// Retries of `operation` until `deadline`.
    pub(crate) fn new(deadline: Deadline, operation: &'a str) -> Self {
        Self { deadline, operation, pause: FIRST_PAUSE, last: None }
    }

    /// After an attempt failed with `e`: `Ok` once it is time for the next attempt, else the
    /// error to give up with.
    pub(crate) async fn after(&mut self, e: Error, retryable: impl Fn(&Error) -> bool) -> Result<(), Error> {
        if !retryable(&e) {
            return Err(match e {
                // An attempt cut short by the deadline: named as the operation, with what
                // failed before it.
                Error::Timeout { last: None, .. } => self.deadline.expired(self.operation, self.last.as_ref()),
                e => e,
            });
        }
        let left = self.deadline.remaining();
        if left.is_zero() {
            return Err(self.deadline.expired(self.operation, Some(&e)));
        }
        let wait = self.pause.min(left);
        tracing::warn!("{}: {e}; retrying in {wait:?}", self.operation);
        tokio::time::sleep(wait).await;
        if self.deadline.remaining().is_zero() {
            return Err(self.deadline.expired(self.operation, Some(&e)));
        }
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        self.last = Some(e);
        Ok(())
    }
}

/// A request body: a whole one ([`Full`]) or a stream (an upload), boxed so that one pool of
/// connections carries both.
pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A whole body as a [`Body`].
pub(crate) fn full(req: http::Request<Full<Bytes>>) -> http::Request<Body> {
    req.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A response, read whole.
#[derive(Debug)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// Connections to one endpoint.
#[derive(Debug)]
pub struct Http {
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    legacy: Option<crate::legacy::Legacy>,
    idle: Mutex<Vec<SendRequest<Body>>>,
    seen: Mutex<Option<ServerTls>>,
    timeout: Duration,
    max_body: usize,
}

/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 8;

impl Http {
    /// A pool for `endpoint` trusting as `trust` says.
    pub fn new(endpoint: Endpoint, trust: &Trust, timeout: Duration, max_body: usize) -> Result<Self, Error> {
        Self::with_legacy(endpoint, trust, timeout, max_body, false)
    }

    /// The same, and with `legacy` TLS 1.0 and 1.1 through OpenSSL (vSphere 5.x only).
    pub fn with_legacy(
        endpoint: Endpoint,
        trust: &Trust,
        timeout: Duration,
        max_body: usize,
        legacy: bool,
    ) -> Result<Self, Error> {
        let legacy = if legacy && endpoint.tls {
            tracing::warn!("{}: legacy TLS 1.0/1.1 enabled by request", endpoint.host);
            Some(crate::legacy::Legacy::new(trust, &endpoint.host)?)
        } else {
            None
        };
        let tls = if endpoint.tls {
            Some(Arc::new(client_config(trust)?))
        } else if *trust == Trust::Insecure {
            tracing::warn!(
                "talking plain HTTP to {}: credentials and data cross the network unencrypted",
                endpoint.host
            );
            None
        } else {
            return Err(Error::Config(format!(
                "http://{} is unencrypted; use https, or opt in to no security with the insecure mode",
                endpoint.authority()
            )));
        };
        Ok(Self { endpoint, tls, legacy, idle: Mutex::new(Vec::new()), seen: Mutex::new(None), timeout, max_body })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The timeout: how long one operation may take, its retries included.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The server's TLS as seen on the last connection made.
    pub fn server_tls(&self) -> Option<ServerTls> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn connect(&self) -> Result<SendRequest<Body>, Error> {
        let what = format!("connecting to {}", self.endpoint.authority());
        let tcp = TcpStream::connect((self.endpoint.host.trim_matches(['[', ']']), self.endpoint.port))
            .await
            .map_err(|source| Error::Io { context: what.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match (&self.legacy, &self.tls) {
            (Some(legacy), _) => {
                let (stream, seen) = legacy.connect(&self.endpoint.host, tcp).await?;
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
                Box::new(stream)
            }
            (None, Some(cfg)) => {
                let name = server_name(&self.endpoint.host)?;
                let tls = match tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        let mut message = e.to_string();
                        if message.contains("ProtocolVersion") || message.contains("peer is incompatible") {
                            message.push_str(
                                " (vCenter 5.1 and ESXi 5.x speak only TLS 1.0/1.1: connect with the legacy TLS opt-in)",
                            );
                        } else if message.contains("certificate") || message.contains("Signature") {
                            // A first contact, as ssh has one: what the server presents, and
                            // the flag that trusts it.
                            let reason = crate::tls::plain_reason(&message);
                            let seen =
                                crate::tls::first_contact(&self.endpoint.host, self.endpoint.port, self.timeout).await;
                            message = match seen {
                                Some(c) => format!(
                                    "the server's certificate is not trusted: {reason} ({message}). It presents:{}",
                                    c.explain()
                                ),
                                None => format!("the server's certificate is not trusted: {reason} ({message})"),
                            };
                        }
                        return Err(Error::Tls { host: self.endpoint.host.clone(), message });
                    }
                };
                let (_, conn) = tls.get_ref();
                if let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) {
                    let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
                    *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(ServerTls::of(cert, version));
                }
                Box::new(tls)
            }
            (None, None) => Box::new(tcp),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| Error::Http { context: what, message: e.to_string(), status: None })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn sender(&self) -> Result<SendRequest<Body>, Error> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                Some(_) => {}
                None => return self.connect().await,
            }
        }
    }

    /// Sends a request (its URI is a path; the host is filled in): the connection it went out
    /// on (to hand back with [`Http::release`] once the body is read) and the answer.
    pub(crate) async fn exchange(
        &self,
        mut req: http::Request<Body>,
        context: &str,
    ) -> Result<(SendRequest<Body>, http::Response<hyper::body::Incoming>), Error> {
        let host = http::HeaderValue::from_str(&self.endpoint.authority())
            .map_err(|_| Error::Config(format!("{} is not a valid host", self.endpoint.host)))?;
        req.headers_mut().insert(http::header::HOST, host);
        let mut sender = self.sender().await?;
        let resp = sender.send_request(req).await.map_err(|e| Error::Http {
            context: context.to_owned(),
            message: e.to_string(),
            status: None,
        })?;
        Ok((sender, resp))
    }

    /// Keeps a connection whose answer was read whole, for the next request.
    pub(crate) fn release(&self, sender: SendRequest<Body>) {
        if !sender.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
        }
    }

    /// Sends a request (its URI is a path; the host is filled in) and reads the whole answer,
    /// refusing bodies larger than the pool's limit: one attempt, within the timeout.
    pub async fn send(&self, req: http::Request<Full<Bytes>>, context: &str) -> Result<Response, Error> {
        self.send_by(req, context, Deadline::after(self.timeout)).await
    }

    /// The same, one attempt of an operation that must be over by `deadline`.
    pub async fn send_by(
        &self,
        req: http::Request<Full<Bytes>>,
        context: &str,
        deadline: Deadline,
    ) -> Result<Response, Error> {
        let work = async {
            let (sender, resp) = self.exchange(full(req), context).await?;
            self.read_answer(sender, resp, context).await
        };
        deadline.bound(context, work).await
    }

    /// Reads an answer's body whole (up to the pool's limit) and hands the connection back.
    pub(crate) async fn read_answer(
        &self,
        sender: SendRequest<Body>,
        resp: http::Response<hyper::body::Incoming>,
        context: &str,
    ) -> Result<Response, Error> {
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, self.max_body).collect().await.map_err(|e| Error::Http {
            context: context.to_owned(),
            message: format!("reading the answer: {e}"),
            status: Some(parts.status.as_u16()),
        })?;
        self.release(sender);
        Ok(Response { status: parts.status.as_u16(), headers: parts.headers, body: body.to_bytes() })
    }

    /// Sends a request and streams its answer's body straight into `buf` (no second copy of a
    /// large read): the status, the headers, and how many bytes came. A successful body longer
    /// than `buf` is an error, so `buf` bounds what the answer may allocate; the body of an
    /// error status is read and dropped (0 bytes). One attempt, which must be over by
    /// `deadline`.
    pub async fn send_into(
        &self,
        req: http::Request<Full<Bytes>>,
        context: &str,
        buf: &mut [u8],
        deadline: Deadline,
    ) -> Result<(u16, http::HeaderMap, usize), Error> {
        let work = async {
            let (sender, resp) = self.exchange(full(req), context).await?;
            let (parts, mut body) = resp.into_parts();
            let status = parts.status.as_u16();
            let mut filled = 0usize;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| Error::Http {
                    context: context.to_owned(),
                    message: format!("reading the answer: {e}"),
                    status: Some(status),
                })?;
                let Ok(data) = frame.into_data() else { continue };
                // An error's explanation is not the data asked for: read past it, keep nothing.
                if !(200..300).contains(&status) {
                    continue;
                }
                let end = filled + data.len();
                let Some(dst) = buf.get_mut(filled..end) else {
                    return Err(Error::Protocol(format!(
                        "{context}: the answer is longer than the {} bytes asked for",
                        buf.len()
                    )));
                };
                dst.copy_from_slice(&data);
                filled = end;
            }
            self.release(sender);
            Ok((status, parts.headers, filled))
        };
        deadline.bound(context, work).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_refuse_credentials() {
        let e = Endpoint::parse("vc.example").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port, e.path.as_str()), (true, "vc.example", 443, "/sdk"));
        let e = Endpoint::parse("https://127.0.0.1:8989/sdk").unwrap();
        assert_eq!((e.port, e.authority()), (8989, "127.0.0.1:8989".to_owned()));
        let err = Endpoint::parse("https://root:secret@vc/sdk").unwrap_err().to_string();
        assert!(err.contains("no user or password") && !err.contains("secret"), "{err}");
        assert!(Endpoint::parse("ftp://vc").is_err());
    }

    #[test]
    fn plain_http_needs_the_insecure_opt_in() {
        let e = Endpoint::parse("http://127.0.0.1:1/sdk").unwrap();
        assert!(Http::new(e.clone(), &Trust::default(), Duration::from_secs(1), 1).is_err());
        assert!(Http::new(e, &Trust::Insecure, Duration::from_secs(1), 1).is_ok());
    }
}
