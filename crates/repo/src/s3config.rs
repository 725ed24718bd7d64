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
    /// caller (the copy engine retries transient ones again); `None`: its default, 10 times
    /// within 3 minutes.
    pub request_retries: Option<usize>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<redacted>"))
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("request_retries", &self.request_retries)
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
        }
    }
}
