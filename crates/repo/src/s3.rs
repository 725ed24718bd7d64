//! A repository in S3-compatible object storage, through the `object_store` crate. Objects are
//! written whole (a PUT is atomic), chunks with `If-None-Match: *` so that nothing is ever
//! overwritten. Credentials and the endpoint come from the standard `AWS_*` environment
//! variables, never from arguments. The [`Store`] trait is synchronous; this store runs its
//! requests on a small runtime of its own, so it can be called from anywhere.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::RepoError;
use crate::S3Config;
use durable::{Entry, Store, check_name};

/// A repository under `s3://bucket/prefix`.
#[derive(Debug)]
pub struct S3Store {
    url: String,
    prefix: String,
    s3: Arc<AmazonS3>,
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
    /// The longest one call may take ([`S3Config::call_deadline`]).
    deadline: std::time::Duration,
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // Dropped maybe from inside someone else's async code, where a blocking shutdown
        // would panic; nothing is in flight once the last call returned.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// An object store error, classified once, as the kind of the I/O error it becomes (which
/// `pipeline::ErrorKind::of_io` reads): what object_store's own retries did not get past, a
/// connection refused, reset or timed out or a busy server (a 5xx or 429 answer), is
/// transient; a missing object or bucket is not found; a bad path or an unsupported call is
/// invalid input; refused credentials and the rest are fatal.
fn s3_err(what: &str, e: object_store::Error) -> durable::Error {
    durable::Error::Remote { what: what.to_owned(), source: std::io::Error::new(s3_kind(&e), e) }
}

/// The I/O error kind that says what can be done about `e` (see [`s3_err`]).
fn s3_kind(e: &object_store::Error) -> std::io::ErrorKind {
    use object_store::Error as E;
    use std::io::ErrorKind as K;
    match e {
        E::NotFound { .. } => K::NotFound,
        E::InvalidPath { .. } | E::NotSupported { .. } | E::UnknownConfigurationKey { .. } => K::InvalidInput,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => K::PermissionDenied,
        E::Generic { source, .. } => generic_kind(source.as_ref()),
        _ => K::Other,
    }
}

/// The kind of object_store's catch-all error, from its causes: the HTTP client's failure to
/// connect or to finish a request, or the server's status (object_store names no type for
/// it, so it is read from the message: `... status code: 503 ...`).
fn generic_kind(source: &(dyn std::error::Error + 'static)) -> std::io::ErrorKind {
    use object_store::client::HttpErrorKind as H;
    use std::io::ErrorKind as K;
    let mut cause = Some(source);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            return match h.kind() {
                H::Connect => K::ConnectionRefused,
                H::Request | H::Interrupted => K::ConnectionReset,
                H::Timeout => K::TimedOut,
                _ => K::Other,
            };
        }
        if let Some(status) = status_in(&c.to_string()) {
            return match status {
                429 | 500..=599 => K::ResourceBusy,
                _ => K::Other,
            };
        }
        cause = c.source();
    }
    K::Other
}

/// The error of a call that outlived its deadline: a timeout, which the engine retries.
fn timed_out(deadline: std::time::Duration) -> object_store::Error {
    let cause = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the object store within {} s", deadline.as_secs()),
    );
    let http = object_store::client::HttpError::new(object_store::client::HttpErrorKind::Timeout, cause);
    object_store::Error::Generic { store: "S3", source: Box::new(http) }
}

/// The HTTP status in object_store's message for a non-2xx answer, if it is one.
fn status_in(message: &str) -> Option<u16> {
    let (_, rest) = message.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// Whether an endpoint URL points at this machine.
fn loopback(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

impl S3Store {
    /// Opens `s3://bucket[/prefix]` as `config` says. A plain `http://` endpoint is allowed
    /// only on this machine, or with `allow_http`, and always warned about.
    pub fn open(url: &str, config: &S3Config) -> Result<Self, RepoError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| RepoError::Invalid(format!("{url} is not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(RepoError::Invalid(format!("{url} names no bucket")));
        }
        let prefix = prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            check_name(&prefix).map_err(|_| RepoError::Invalid(format!("{url}: {prefix:?} is not a usable prefix")))?;
        }
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
        // Client options first: the settings below (plain HTTP) are kept in them.
        let timeout = config.timeout();
        b = b
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout.min(std::time::Duration::from_secs(5))),
            )
            .with_retry(object_store::RetryConfig {
                max_retries: config.retries(),
                retry_timeout: config.call_deadline(),
                backoff: object_store::BackoffConfig {
                    init_backoff: std::time::Duration::from_millis(100),
                    max_backoff: std::time::Duration::from_secs(1),
                    base: 2.0,
                },
            });
        if let (Some(k), Some(s)) = (&config.access_key, &config.secret_key) {
            b = b.with_access_key_id(k.clone()).with_secret_access_key(s.clone());
        }
        if let Some(ep) = &config.endpoint {
            if ep.contains('@') {
                return Err(RepoError::Invalid("the S3 endpoint URL must not carry credentials".into()));
            }
            b = b.with_endpoint(ep.clone());
            if ep.starts_with("http://") {
                if !config.allow_http && !loopback(ep) {
                    return Err(RepoError::Invalid(format!(
                        "the S3 endpoint {ep} is plain HTTP: the backup data would cross the network unencrypted \
                         (use https://, or opt in explicitly)"
                    )));
                }
                tracing::warn!("S3 endpoint {ep} is plain HTTP, not TLS: backup data travels unencrypted");
                b = b.with_allow_http(true);
            }
        }
        let s3 = b.build().map_err(|e| s3_err(url, e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("repo-s3")
            .enable_all()
            .build()
            .map_err(|e| RepoError::Invalid(format!("cannot start the S3 runtime: {e}")))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            prefix,
            s3: Arc::new(s3),
            rt: Some(rt),
            deadline: config.call_deadline(),
        })
    }

    fn key(&self, name: &str) -> Result<ObjPath, durable::Error> {
        check_name(name)?;
        let full = if self.prefix.is_empty() { name.to_owned() } else { format!("{}/{name}", self.prefix) };
        ObjPath::parse(&full).map_err(|e| durable::Error::Invalid(format!("{full}: {e}")))
    }

    /// Runs `f` on the store's runtime and waits for it, from any thread (async or not), for
    /// at most the store's deadline: past it the call fails as timed out.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, object_store::Error> {
        let stopped = || object_store::Error::NotImplemented {
            operation: "an S3 call after the store was dropped".into(),
            implementer: "repo".into(),
        };
        let rt = self.rt.as_ref().ok_or_else(stopped)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = self.deadline;
        rt.spawn(async move {
            let r = tokio::time::timeout(deadline, f).await.unwrap_or_else(|_| Err(timed_out(deadline)));
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }
}

impl Store for S3Store {
    fn put_new(&self, name: &str, data: &[u8]) -> Result<bool, durable::Error> {
        let (s3, key, payload) = (self.s3.clone(), self.key(name)?, PutPayload::from(data.to_vec()));
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.run(async move { s3.put_opts(&key, payload, opts).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(s3_err(name, e)),
        }
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), durable::Error> {
        let (s3, key, payload) = (self.s3.clone(), self.key(name)?, PutPayload::from(data.to_vec()));
        self.run(async move { s3.put(&key, payload).await }).map(|_| ()).map_err(|e| s3_err(name, e))
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, durable::Error> {
        let (s3, key) = (self.s3.clone(), self.key(name)?);
        match self.run(async move { s3.get(&key).await?.bytes().await }) {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err(name, e)),
        }
    }

    fn exists(&self, name: &str) -> Result<bool, durable::Error> {
        let (s3, key) = (self.s3.clone(), self.key(name)?);
        match self.run(async move { s3.head(&key).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s3_err(name, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>, durable::Error> {
        let (s3, key) = (self.s3.clone(), self.key(dir)?);
        let prefix = key.clone();
        let listed =
            self.run(async move { s3.list_with_delimiter(Some(&prefix)).await }).map_err(|e| s3_err(dir, e))?;
        // Some servers (SeaweedFS) list a folder's own marker object inside it: not an entry.
        let mut out: Vec<Entry> = listed
            .common_prefixes
            .iter()
            .filter(|p| **p != key)
            .filter_map(|p| p.filename().map(|n| Entry { name: n.to_owned(), modified: None }))
            .chain(listed.objects.iter().filter(|o| o.location != key).filter_map(|o| {
                o.location.filename().map(|n| Entry { name: n.to_owned(), modified: Some(o.last_modified.into()) })
            }))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), durable::Error> {
        let (s3, key) = (self.s3.clone(), self.key(name)?);
        match self.run(async move { s3.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_err(name, e)),
        }
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_endpoints_count_as_local() {
        for ep in ["http://127.0.0.1:8333", "http://localhost", "http://[::1]:9000/x"] {
            assert!(loopback(ep), "{ep}");
        }
        for ep in ["http://10.0.0.1:8333", "http://localhost.evil.com", "http://127.0.0.1.nip.io"] {
            assert!(!loopback(ep), "{ep}");
        }
    }

    #[test]
    fn urls_are_checked() {
        let c = S3Config::default();
        assert!(S3Store::open("file:///x", &c).is_err());
        assert!(S3Store::open("s3:///x", &c).is_err());
        assert!(S3Store::open("s3://b/../x", &c).is_err());
        let far = S3Config { endpoint: Some("http://10.1.2.3:8333".into()), ..Default::default() };
        let e = S3Store::open("s3://b/p", &far).unwrap_err().to_string();
        assert!(e.contains("plain HTTP"), "{e}");
        assert!(S3Store::open("s3://b/p", &S3Config { allow_http: true, ..far }).is_ok());
        let secret = S3Config { secret_key: Some("hunter2".into()), ..Default::default() };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn a_server_that_accepts_and_never_answers_fails_each_call_within_its_deadline() {
        // Accepts every connection and holds it, silent: a stalled gateway, a full disk.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in listener.incoming() {
                held.push(c);
            }
        });
        let config = S3Config {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            access_key: Some("k".into()),
            secret_key: Some("s".into()),
            request_retries: Some(1),
            request_timeout: Some(std::time::Duration::from_millis(300)),
            ..Default::default()
        };
        let deadline = config.call_deadline();
        assert_eq!(deadline, std::time::Duration::from_millis(2600));
        let store = S3Store::open("s3://b/p", &config).unwrap();
        for (what, call) in [
            ("put", Box::new(|| store.put("x", b"1")) as Box<dyn Fn() -> Result<(), durable::Error>>),
            ("get", Box::new(|| store.get("x").map(|_| ()))),
            ("list", Box::new(|| store.list("chunks").map(|_| ()))),
        ] {
            let started = std::time::Instant::now();
            let e = RepoError::from(call().unwrap_err());
            let took = started.elapsed();
            assert!(took <= deadline + std::time::Duration::from_secs(1), "{what} took {took:?}");
            assert_eq!(e.kind(), pipeline::ErrorKind::Transient, "{what}: {e}");
        }
        // The defaults bound a call too: 30 s per request, 3 attempts.
        assert_eq!(S3Config::default().call_deadline(), std::time::Duration::from_secs(93));
    }

    #[test]
    fn object_store_failures_get_the_kind_the_engine_acts_on() {
        use object_store::Error as E;
        use object_store::client::{HttpError, HttpErrorKind as H};
        use pipeline::ErrorKind as K;
        let kind = |e: E| RepoError::from(s3_err("chunks/ab/abcd", e)).kind();
        let generic = |source: Box<dyn std::error::Error + Send + Sync>| E::Generic { store: "S3", source };
        let http = |k| generic(Box::new(HttpError::new(k, std::io::Error::other("tcp"))));
        // The server down or restarting, a dropped request, a timeout: retried by the engine.
        assert_eq!(kind(http(H::Connect)), K::Transient);
        assert_eq!(kind(http(H::Request)), K::Transient);
        assert_eq!(kind(http(H::Timeout)), K::Transient);
        assert_eq!(kind(http(H::Decode)), K::Fatal);
        // A busy or failing server past object_store's own retries; a bad request.
        let status =
            |s: &str| generic(format!("Error performing PUT - Server returned non-2xx status code: {s}").into());
        assert_eq!(kind(status("503 Service Unavailable: ")), K::Transient);
        assert_eq!(kind(status("429 Too Many Requests: ")), K::Transient);
        assert_eq!(kind(status("400 Bad Request: ")), K::Fatal);
        assert_eq!(kind(generic("no status here".into())), K::Fatal);
        // Refused credentials, a missing object, an unusable path.
        let path = || "restart/chunks/ab/abcd".to_owned();
        assert_eq!(kind(E::PermissionDenied { path: path(), source: "403".into() }), K::Fatal);
        assert_eq!(kind(E::Unauthenticated { path: path(), source: "401".into() }), K::Fatal);
        assert_eq!(kind(E::NotFound { path: path(), source: "404".into() }), K::NotFound);
        assert_eq!(kind(E::NotSupported { source: "no".into() }), K::InvalidInput);
        // The message keeps what was being done and the store's own words.
        let e = RepoError::from(s3_err("chunks/ab/abcd", http(H::Connect))).to_string();
        assert!(e.starts_with("object storage: chunks/ab/abcd: ") && e.contains("tcp"), "{e}");
    }
}
