//! The simulator's HTTP side on hyper 1.x: `POST /sdk` for SOAP, `PUT`/`POST /nfc/...` for NFC
//! imports, and `GET`/`HEAD /folder/...`
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
use crate::world::World;

pub(crate) type Resp = http::Response<Full<Bytes>>;

pub(crate) fn plain(status: u16, body: impl Into<Bytes>) -> Resp {
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
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let body = match Limited::new(req.into_body(), 16 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return plain(400, format!("reading the request: {e}")),
        };
        let a = handle(state, cookie.as_deref(), host.as_deref(), &body).await;
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
    // NFC: the lease in the path is the credential, as on ESXi and in vcsim.
    if let Some((lease, name)) = path.strip_prefix("/nfc/").and_then(|r| r.split_once('/'))
        && (req.method() == http::Method::PUT || req.method() == http::Method::POST)
    {
        let (lease, name) = (decode(lease).unwrap_or_default(), decode(name).unwrap_or_default());
        return crate::nfc::upload(state, req, &lease, &name).await;
    }
    if let Some(rest) = path.strip_prefix("/folder/")
        && (req.method() == http::Method::GET
            || req.method() == http::Method::HEAD
            || req.method() == http::Method::PUT)
    {
        let delay = state.lock().unwrap_or_else(|p| p.into_inner()).faults.datastore_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let rest = rest.to_owned();
        if req.method() == http::Method::PUT {
            return put(state, req, &rest).await;
        }
        return folder(state, &req, &rest);
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

/// The datastore file a `/folder` request names (its datastore index and path there), after
/// the checks every such request passes: authentication, injected 503s, the parameters, and
/// no hidden or escaping path component.
/// A request refused: its status and why.
type Refusal = (u16, &'static str);

fn locate(w: &mut World, req: &http::Request<Incoming>, rest: &str) -> Result<(usize, String), Refusal> {
    let query = req.uri().query().unwrap_or("");
    let param = |k: &str| {
        query.split('&').find_map(|p| p.split_once('=').filter(|(n, _)| *n == k).and_then(|(_, v)| decode(v)))
    };
    let authed = cookie_of(req, "vmware_soap_session").is_some_and(|c| w.sessions.contains(&c))
        || cookie_of(req, "vmware_cgi_ticket").is_some_and(|c| c.starts_with("vmware_cgi_ticket=cst-"));
    if !authed {
        return Err((401, "not authenticated"));
    }
    if w.faults.http_503 > 0 {
        w.faults.http_503 -= 1;
        return Err((503, "busy"));
    }
    let (Some(ds), Some(dc), Some(rel)) = (param("dsName"), param("dcPath"), decode(rest)) else {
        return Err((400, "need dsName and dcPath"));
    };
    let Some(dsi) = w.datastores.iter().position(|d| d.name == ds && w.datacenters[d.dc].name == dc) else {
        return Err((404, "no such datastore"));
    };
    let hidden = Path::new(&rel).components().any(|c| match c {
        Component::Normal(n) => n.to_str().is_none_or(|n| n.starts_with('.')),
        _ => true,
    });
    if hidden || rel.is_empty() {
        return Err((404, "no such file"));
    }
    Ok((dsi, rel))
}

fn folder(state: &Shared, req: &http::Request<Incoming>, rest: &str) -> Resp {
    let head = req.method() == http::Method::HEAD;
    let file: PathBuf;
    let ignore_range;
    {
        let mut w = state.lock().unwrap_or_else(|p| p.into_inner());
        ignore_range = w.faults.ignore_range;
        let (dsi, rel) = match locate(&mut w, req, rest) {
            Ok(x) => x,
            Err((status, why)) => return plain(status, why),
        };
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

/// `PUT /folder/<path>`: writes the whole file, streamed to a hidden file beside it and renamed
/// into place once complete (an upload cut short leaves nothing). As on ESXi the folder must
/// exist (404 otherwise: `FileManager.MakeDirectory` makes it). 201 for a new file, 200 for a
/// replaced one; 413 past the configured `max_upload`; 403 without `Datastore.FileManagement`
/// on the datastore, or for a disk file of a powered-on VM (ESXi locks those).
async fn put(state: &Shared, req: http::Request<Incoming>, rest: &str) -> Resp {
    let cap = state.lock().unwrap_or_else(|p| p.into_inner()).cfg.max_upload;
    let declared = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|l| l > cap) {
        return plain(413, format!("uploads are limited to {cap} bytes"));
    }
    let (target, temp) = match put_target(state, &req, rest) {
        Ok(x) => x,
        Err((status, why)) => {
            // Read the body before refusing, so a client still sending sees the answer.
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                n += frame.data_ref().map_or(0, |d| d.len() as u64);
                if n > cap {
                    break;
                }
            }
            return plain(status, why);
        }
    };
    let existed = target.exists();
    // hyper drops this future when the client goes away mid-body: the guard removes the hidden
    // file then too, as it does on every failure.
    let guard = Spool(temp);
    let wrote = receive(req.into_body(), &guard.0, cap, declared).await;
    let done =
        wrote.and_then(|()| std::fs::rename(&guard.0, &target).map_err(|e| (500, format!("keeping the upload: {e}"))));
    match done {
        Ok(()) => plain(if existed { 200 } else { 201 }, ""),
        Err((status, why)) => plain(status, why),
    }
}

/// A hidden file an upload is received into, removed when the upload ends whichever way (after
/// a rename it is gone already).
struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where an upload goes (the file, and the hidden file it is received into), or the refusal.
fn put_target(state: &Shared, req: &http::Request<Incoming>, rest: &str) -> Result<(PathBuf, PathBuf), Refusal> {
    let mut w = state.lock().unwrap_or_else(|p| p.into_inner());
    let (dsi, rel) = locate(&mut w, req, rest)?;
    if w.require(&w.datastores[dsi].moref, "Datastore.FileManagement").is_err() {
        return Err((403, "no permission to write this datastore"));
    }
    let locked = w.vms.iter().any(|v| {
        v.power != vsphere::PowerState::PoweredOff
            && v.disks.iter().any(|d| d.ds == dsi && [&d.base_name, &d.flat_name].contains(&&rel))
    });
    if locked {
        return Err((403, "the file is locked by a running VM"));
    }
    let target = w.ds_path(dsi, &rel);
    if !target.parent().is_some_and(Path::is_dir) {
        return Err((404, "no such folder: make it first"));
    }
    if target.is_dir() {
        return Err((409, "a folder of that name exists"));
    }
    let n = w.id();
    let name = target.file_name().and_then(|f| f.to_str()).unwrap_or("upload").to_owned();
    let temp = target.with_file_name(format!(".{name}.upload-{n}"));
    Ok((target, temp))
}

/// Streams a request body into `path`: at most `cap` bytes, exactly `declared` when given.
pub(crate) async fn receive(
    mut body: Incoming,
    path: &Path,
    cap: u64,
    declared: Option<u64>,
) -> Result<(), (u16, String)> {
    use tokio::io::AsyncWriteExt as _;
    let mut out = tokio::fs::File::create(path).await.map_err(|e| (500, format!("creating the file: {e}")))?;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (400, format!("reading the upload: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        n += data.len() as u64;
        if n > cap {
            return Err((413, format!("uploads are limited to {cap} bytes")));
        }
        out.write_all(&data).await.map_err(|e| (500, format!("writing the file: {e}")))?;
    }
    if declared.is_some_and(|d| d != n) {
        return Err((400, format!("{n} bytes came of the {declared:?} announced")));
    }
    out.flush().await.map_err(|e| (500, format!("writing the file: {e}")))?;
    out.sync_all().await.map_err(|e| (500, format!("writing the file: {e}")))
}
