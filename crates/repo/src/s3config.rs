//! How to reach S3-compatible object storage: endpoint, keys and region, from the environment
//! (never from arguments). Kept apart from the S3 store itself, which is an optional feature.

/// How to reach the object store. Credentials come from the environment or a file, never
/// from arguments; `Debug` never shows the secret.
#[derive(Clone, Default)]
pub struct S3Config {
    /// `https://host:port` of an S3-compatible server; `None`: AWS.
    pub endpoint: Option<String>,
    /// The access key ID.
    pub access_key: Option<String>,
    /// The secret access key.
    pub secret_key: Option<String>,
    /// The region (`us-east-1` when unset).
    pub region: Option<String>,
    /// Allow a plain-HTTP endpoint that is not on this machine.
    pub allow_http: bool,
    /// How often object_store retries a failed request itself before the error reaches the
    /// caller (the copy engine retries transient ones again, so this layer is kept short);
    /// `None`: 2.
    pub request_retries: Option<usize>,
    /// How long one HTTP request may take, connecting included; `None`:
    /// 30 s. A call with its retries is bounded by
    /// [`S3Config::call_deadline`], so a server that accepts and never answers fails the call.
    pub request_timeout: Option<std::time::Duration>,
}

/// Retries of one request inside object_store before its error reaches the caller.
pub(crate) const DEFAULT_REQUEST_RETRIES: usize = 2;

/// How long one HTTP request to the object store may take.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<redacted>"))
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("request_retries", &self.request_retries)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl S3Config {
    /// From `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` (or `AWS_DEFAULT_REGION`).
    pub fn from_env() -> Self {
        let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
        Self {
            endpoint: var(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]),
            access_key: var(&["AWS_ACCESS_KEY_ID"]),
            secret_key: var(&["AWS_SECRET_ACCESS_KEY"]),
            region: var(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            allow_http: false,
            request_retries: None,
            request_timeout: None,
        }
    }

    /// One request's timeout.
    pub fn timeout(&self) -> std::time::Duration {
        self.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }

    /// Retries of one request inside object_store.
    pub fn retries(&self) -> usize {
        self.request_retries.unwrap_or(DEFAULT_REQUEST_RETRIES)
    }

    /// The longest one store call may take with object_store's own retries: each attempt's
    /// timeout, plus a second of backoff between attempts. Past it the call fails as timed out
    /// (transient), and the one retry loop that owns the job's patience, the copy engine's,
    /// decides what next: retries nested inside retries once turned a stalled server into a
    /// wait of most of an hour.
    pub fn call_deadline(&self) -> std::time::Duration {
        let attempts = u32::try_from(self.retries()).unwrap_or(u32::MAX).saturating_add(1);
        self.timeout().saturating_mul(attempts).saturating_add(std::time::Duration::from_secs(attempts.into()))
    }
}
