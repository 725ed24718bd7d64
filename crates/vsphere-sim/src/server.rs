//! The simulator's HTTP side on hyper 1.x: `POST /sdk` for SOAP and `GET`/`HEAD /folder/...`
//! for datastore files (ranged, with 206, 416 and injected 503s), over TLS with a generated
//! certificate or plain HTTP.

use std::convert::Infallible;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::soap::{Shared, handle};

type Resp = http::Response<Full<Bytes>>;

fn plain(status: u16, body: impl Into<Bytes>) -> Resp {
    let mut r = http::Response::new(Full::new(body.into()));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// The largest answer to a `GET` without a range (clients read disks in ranges).
const MAX_WHOLE: u64 = 256 << 20;

/// How connections are encrypted.
#[derive(Clone)]
pub(crate) enum ServerTls {
    /// TLS 1.2 and 1.3 through rustls.
    Modern(Arc<rustls::ServerConfig>),
    /// TLS 1.0 only, through OpenSSL at security level 0: what vSphere 5.x speaks.
    Legacy(Arc<openssl::ssl::SslAcceptor>),
    /// None.
    Plain,
}

pub(crate) async fn serve(listener: TcpListener, tls: ServerTls, state: Shared) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                ServerTls::Modern(cfg) => {
                    if let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                ServerTls::Legacy(acceptor) => {
                    let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else { return };
                    let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, tcp) else { return };
                    if std::pin::Pin::new(&mut stream).accept().await.is_ok() {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                ServerTls::Plain => {
                    let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

fn cookie_of(req: &http::Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let c = c.trim();
            c.split_once('=').filter(|(n, _)| *n == name).map(|_| c.to_owned())
        })
}

async fn route(state: &Shared, req: http::Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    if req.method() == http::Method::POST && path == "/sdk" {
        let cookie = cookie_of(&req, "vmware_soap_session");
        let body = match Limited::new(req.into_body(), 16 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return plain(400, format!("reading the request: {e}")),
        };
        let a = handle(state, cookie.as_deref(), &body).await;
        let mut r = plain(a.status, a.body);
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/xml; charset=utf-8"));
        if let Some(c) = a.set_cookie.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(http::header::SET_COOKIE, c);
        }
        return r;
    }
    if req.method() == http::Method::GET && path == "/sdk/vimServiceVersions.xml" {
        let version = state.lock().unwrap_or_else(|p| p.into_inner()).cfg.api_version.clone();
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n<namespaces version=\"1.0\"><namespace><name>urn:vim25</name><version>{version}</version><priorVersions><version>8.0.1.0</version><version>8.0.0.0</version><version>7.0.3.0</version><version>6.7</version><version>6.5</version></priorVersions></namespace></namespaces>\n"
        );
        let mut r = plain(200, body);
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/xml"));
        return r;
    }
    if let Some(rest) = path.strip_prefix("/folder/")
        && (req.method() == http::Method::GET || req.method() == http::Method::HEAD)
    {
        let delay = state.lock().unwrap_or_else(|p| p.into_inner()).faults.datastore_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        return folder(state, &req, rest);
    }
    plain(404, "not found")
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn folder(state: &Shared, req: &http::Request<Incoming>, rest: &str) -> Resp {
    let head = req.method() == http::Method::HEAD;
    let query = req.uri().query().unwrap_or("");
    let param = |k: &str| {
        query.split('&').find_map(|p| p.split_once('=').filter(|(n, _)| *n == k).and_then(|(_, v)| decode(v)))
    };
    let file: PathBuf;
    let ignore_range;
    {
        let mut w = state.lock().unwrap_or_else(|p| p.into_inner());
        let authed = cookie_of(req, "vmware_soap_session").is_some_and(|c| w.sessions.contains(&c))
            || cookie_of(req, "vmware_cgi_ticket").is_some_and(|c| c.starts_with("vmware_cgi_ticket=cst-"));
        if !authed {
            return plain(401, "not authenticated");
        }
        ignore_range = w.faults.ignore_range;
        if w.faults.http_503 > 0 {
            w.faults.http_503 -= 1;
            return plain(503, "busy");
        }
        let (Some(ds), Some(dc), Some(rel)) = (param("dsName"), param("dcPath"), decode(rest)) else {
            return plain(400, "need dsName and dcPath");
        };
        let Some(dsi) = w.datastores.iter().position(|d| d.name == ds && w.datacenters[d.dc].name == dc) else {
            return plain(404, "no such datastore");
        };
        let relp = Path::new(&rel);
        let hidden = relp.components().any(|c| match c {
            Component::Normal(n) => n.to_str().is_none_or(|n| n.starts_with('.')),
            _ => true,
        });
        if hidden {
            return plain(404, "no such file");
        }
        // A disk under snapshots: its base is frozen as of the oldest snapshot.
        let frozen = w.vms.iter().find_map(|v| {
            let d = v.disks.iter().find(|d| d.ds == dsi && d.flat_name == rel)?;
            v.snapshots.first()?.disks.iter().find(|s| s.key == d.key).map(|s| s.frozen.clone())
        });
        file = frozen.unwrap_or_else(|| w.ds_path(dsi, &rel));
    }
    let Ok(f) = File::open(&file) else { return plain(404, "no such file") };
    let Ok(meta) = f.metadata() else { return plain(404, "no such file") };
    if meta.is_dir() {
        let mut r = plain(200, "<html><body>directory</body></html>");
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/html"));
        return r;
    }
    let len = meta.len();
    let range = if ignore_range { None } else { req.headers().get(http::header::RANGE) };
    let range = range
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, z)| Some((a.parse::<u64>().ok()?, z.parse::<u64>().ok())));
    let (status, start, end) = match range {
        Some((a, _)) if a >= len => {
            let mut r = plain(416, "");
            if let Ok(v) = http::HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(http::header::CONTENT_RANGE, v);
            }
            return r;
        }
        Some((a, z)) => (206, a, z.map_or(len, |z| z.saturating_add(1).min(len))),
        None if len > MAX_WHOLE && !head => return plain(416, "read large files in ranges"),
        None => (200, 0, len),
    };
    let body = if head {
        Bytes::new()
    } else {
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        if f.read_exact_at(&mut buf, start).is_err() {
            return plain(500, "read failed");
        }
        Bytes::from(buf)
    };
    let mut r = plain(status, body);
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
    if head {
        h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    if status == 206
        && let Ok(v) = http::HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1))
    {
        h.insert(http::header::CONTENT_RANGE, v);
    }
    r
}
