//! The configuration of `proxy serve`, a TOML file: the proxy (listen address, token, limits,
//! bandwidth), the vCenters (credentials from a file or the environment, never in the file
//! itself) and the jobs (VMs, schedule, a repository or replica target, retention). Parsing
//! never panics and checks everything it can without touching the network, naming what is
//! wrong and where.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not TOML, or not the expected shape (with the line and column).
    #[error("{0}")]
    Syntax(String),
    /// Well-formed, but not usable: every problem found, one per line.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// Parses a byte size with an optional K/M/G/T suffix (powers of 1024, `B`/`iB` optional):
/// `4M`, `256MiB`, `1G`, `65536`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size (try 4M, 256MiB, 1G)"))?;
    let shift = match unit.trim().to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration, the one syntax of every time flag and setting: `500ms`, `30s`, `5m`,
/// `1h 30m`, `2days`; a bare `0` is none. Any other bare number is refused, since it would be
/// ambiguous between seconds and milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.chars().all(|c| c.is_ascii_digit()) && !t.is_empty() {
        if t.bytes().all(|b| b == b'0') {
            return Ok(Duration::ZERO);
        }
        return Err(format!("{t:?} has no unit: write {t}ms, {t}s or {t}m"));
    }
    humantime::parse_duration(t).map_err(|e| format!("{s:?} is not a duration ({e}); write 500ms, 30s, 5m or 1h"))
}

/// A pause per request in whole milliseconds (`release_cpu_time`): a duration (`4ms`), or, as
/// the setting was first documented, a bare number of milliseconds.
pub fn parse_millis(s: &str) -> Result<u32, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?}: use whole milliseconds"));
    }
    u32::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

fn millis_or_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Millis(u32),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::Millis(n) => Ok(n),
        Either::Text(t) => parse_millis(&t).map_err(serde::de::Error::custom),
    }
}

pub use crate::schedule::{MAX_INTERVAL, Schedule};

/// `[proxy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// This proxy's ID in snapshot names (default: the host name).
    #[serde(default)]
    pub id: Option<String>,
    /// Where the HTTP endpoint listens.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A file whose first line is the bearer token every HTTP request must carry.
    pub token_file: PathBuf,
    /// Where the job history and replica state live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// VMs backed up at once, over every job.
    #[serde(default = "default_max_vms")]
    pub max_vms: usize,
    /// VMs at once per ESXi host.
    #[serde(default)]
    pub per_host: Option<usize>,
    /// VMs at once per datastore.
    #[serde(default)]
    pub per_datastore: Option<usize>,
    /// The memory budget of the whole process (`256M`): copy buffers get what remains after
    /// about 32 MiB plus 1 MiB per VM at once (`max_vms`).
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Bytes per second over every copy (`200M`); none by default.
    #[serde(default)]
    pub rate: Option<String>,
    /// Milliseconds slept after each request in each stream (0: full speed): `"4ms"`, or a
    /// bare number of milliseconds.
    #[serde(default, deserialize_with = "millis_or_duration")]
    pub release_cpu_time: u32,
    /// The longest a job may run (`24h`).
    #[serde(default = "default_max_job")]
    pub max_job: String,
    /// Read disks through VDDK from this folder instead of HTTPS datastore reads.
    #[serde(default)]
    pub vddk_libdir: Option<PathBuf>,
    /// An InitEx configuration file for VDDK.
    #[serde(default)]
    pub vddk_config: Option<PathBuf>,
    /// `text` or `json` log lines.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// HTTP connections served at once; past them, new connections wait in the listen backlog.
    #[serde(default = "default_http_connections")]
    pub http_connections: usize,
    /// How long a client may take to send a request's headers (`10s`), on a new connection
    /// and between requests of a kept-alive one.
    #[serde(default = "default_http_header_timeout")]
    pub http_header_timeout: String,
    /// How long an HTTP connection may go without a byte in either direction (`60s`).
    #[serde(default = "default_http_idle_timeout")]
    pub http_idle_timeout: String,
}

fn default_listen() -> String {
    "127.0.0.1:9480".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/syncproxy")
}
fn default_pin_drs() -> bool {
    true
}
fn default_max_vms() -> usize {
    100
}
fn default_memory() -> String {
    "256M".into()
}
fn default_max_job() -> String {
    "24h".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_http_connections() -> usize {
    64
}
fn default_http_header_timeout() -> String {
    "10s".into()
}
fn default_http_idle_timeout() -> String {
    "60s".into()
}

/// `[[vcenter]]`: a vCenter or ESXi host and how to log in to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterConfig {
    /// What jobs call it.
    pub name: String,
    /// `https://HOST/sdk`.
    pub url: String,
    /// The user.
    pub user: String,
    /// A file whose first line is the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Or the environment variable that holds it.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Trust the certificate by its SHA-1 or SHA-256 thumbprint.
    #[serde(default)]
    pub thumbprint: Option<String>,
    /// Also trust this CA (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Do not verify the certificate (warned about on every start).
    #[serde(default)]
    pub insecure: bool,
    /// Also accept TLS 1.0 and 1.1.
    #[serde(default)]
    pub legacy_tls: bool,
}

/// `retention` of a job: how many restore points to keep, as `proxy repo prune` counts.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// The newest N.
    #[serde(default)]
    pub keep_last: u32,
    /// The newest in each of the last N hours.
    #[serde(default)]
    pub keep_hourly: u32,
    /// ... days.
    #[serde(default)]
    pub keep_daily: u32,
    /// ... weeks.
    #[serde(default)]
    pub keep_weekly: u32,
    /// ... months.
    #[serde(default)]
    pub keep_monthly: u32,
    /// ... years.
    #[serde(default)]
    pub keep_yearly: u32,
}

impl RetentionConfig {
    /// As the repository counts it.
    pub fn retention(&self) -> repo::Retention {
        repo::Retention {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        }
    }
}

/// `[[job]]`: which VMs, when, and where to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Its name (in snapshot names and the history: letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The `[[vcenter]]` it reads from.
    pub vcenter: String,
    /// VMs by name, moref, instance UUID or inventory path.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Every VM instead.
    #[serde(default)]
    pub all: bool,
    /// `every 6h` or `daily 02:30` (UTC).
    pub schedule: String,
    /// A repository (a directory or `s3://bucket/prefix`) for restore points.
    #[serde(default)]
    pub repository: Option<String>,
    /// Or a directory of replica disks.
    #[serde(default)]
    pub replica: Option<PathBuf>,
    /// The repository's key file, if it is encrypted.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Allow a plain-HTTP S3 endpoint elsewhere than this machine.
    #[serde(default)]
    pub s3_allow_http: bool,
    /// Read each disk from an NBD export the operator serves: a URI template with `{vm}`,
    /// `{moref}`, `{uuid}`, `{snapshot}` and `{disk}`.
    #[serde(default)]
    pub nbd_url: Option<String>,
    /// Copy only these disks of each VM (slot `scsi0:1` or label `Hard disk 2`).
    #[serde(default)]
    pub include_disks: Vec<String>,
    /// Leave these disks out.
    #[serde(default)]
    pub exclude_disks: Vec<String>,
    /// Override each VM's DRS automation to manual while it is read (put back after).
    #[serde(default = "default_pin_drs")]
    pub pin_drs: bool,
    /// Run before each VM's snapshot; its failure aborts that VM's backup.
    #[serde(default)]
    pub pre_freeze: Option<HookConfig>,
    /// Run after each VM's snapshot; its failure is reported loudly.
    #[serde(default)]
    pub post_thaw: Option<HookConfig>,
    /// The guest account for guest hooks: a file with the user on the first line and the
    /// password on the second.
    #[serde(default)]
    pub guest_credentials_file: Option<PathBuf>,
    /// What a prune after each run keeps (repositories only).
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// After a prune that removed restore points, a gc frees their chunks; unused chunks
    /// younger than this stay (`1h`, `0s`; `proxy repo gc --grace`).
    #[serde(default = "default_gc_grace")]
    pub gc_grace: String,
    /// How many times the VMs that failed are tried again in the same run.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The pause before each retry (`10m`, `30s`).
    #[serde(default = "default_retry_delay")]
    pub retry_delay: String,
}

fn default_retries() -> u32 {
    2
}

fn default_retry_delay() -> String {
    "10m".into()
}

/// The most retries of a job's failed VMs in one run.
pub const MAX_RETRIES: u32 = 10;

fn default_gc_grace() -> String {
    "1h".into()
}

/// A freeze hook: a command on the proxy, or a program in the guest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// A command line run on the proxy (`sh -c`).
    #[serde(default)]
    pub command: Option<String>,
    /// A program's path in the guest (run through VMware Tools).
    #[serde(default)]
    pub guest: Option<String>,
    /// The guest program's arguments.
    #[serde(default)]
    pub arguments: String,
    /// How long it may run (`5m`).
    #[serde(default = "default_hook_timeout")]
    pub timeout: String,
}

fn default_hook_timeout() -> String {
    "5m".into()
}

impl HookConfig {
    /// The hook, with the guest account read from `credentials` for a guest hook.
    pub fn hook(&self, credentials: Option<&std::path::Path>) -> Result<crate::hooks::Hook, String> {
        let timeout =
            humantime::parse_duration(&self.timeout).map_err(|e| format!("timeout {:?}: {e}", self.timeout))?;
        let action = match (&self.command, &self.guest) {
            (Some(c), None) => crate::hooks::HookAction::Proxy(c.clone()),
            (None, Some(program)) => {
                let path = credentials.ok_or("a guest hook needs guest_credentials_file")?;
                crate::hooks::HookAction::Guest {
                    program: program.clone(),
                    arguments: self.arguments.clone(),
                    auth: crate::hooks::guest_credentials(path)?,
                }
            }
            _ => return Err("give command (on the proxy) or guest (in the guest), one of them".into()),
        };
        Ok(crate::hooks::Hook { action, timeout })
    }
}

impl JobConfig {
    /// The gc's grace period ([`JobConfig::gc_grace`]; checked by `problems`).
    pub fn gc_grace(&self) -> Duration {
        parse_duration(&self.gc_grace).unwrap_or(Duration::from_secs(3600))
    }

    /// The pause before each retry of failed VMs (checked by `problems`).
    pub fn retry_delay(&self) -> Duration {
        parse_duration(&self.retry_delay).unwrap_or(Duration::from_secs(600))
    }

    /// Opens the job's target: its repository (a directory or `s3://`, with its key file and
    /// the S3 settings of the environment) or its replica folder.
    pub fn open_target(&self) -> Result<crate::Target, crate::OrchError> {
        if let Some(r) = &self.repository {
            return Ok(crate::Target::Repository(open_repo(r, self.key_file.as_deref(), self.s3_allow_http)?));
        }
        match &self.replica {
            Some(dir) => Ok(crate::Target::Replica(crate::ReplicaTarget::open(dir)?)),
            None => Err(crate::OrchError::Refused(format!("job {} has no target", self.name))),
        }
    }

    /// The job's freeze and thaw hooks; a problem names the job and the hook.
    pub fn hooks(&self) -> Result<crate::hooks::Hooks, crate::OrchError> {
        let credentials = self.guest_credentials_file.as_deref();
        let hook = |h: &Option<HookConfig>, which: &str| {
            h.as_ref()
                .map(|h| {
                    h.hook(credentials)
                        .map_err(|e| crate::OrchError::Refused(format!("job {}: {which}: {e}", self.name)))
                })
                .transpose()
        };
        Ok(crate::hooks::Hooks {
            pre_freeze: hook(&self.pre_freeze, "pre_freeze")?,
            post_thaw: hook(&self.post_thaw, "post_thaw")?,
        })
    }
}

/// `[[drill]]`: DR drills of a repository's newest restore points, on a schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Its name (in the history and the metrics: letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The repository (a directory or `s3://bucket/prefix`) whose points are drilled.
    pub repository: String,
    /// The repository's key file, if it is encrypted.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Allow a plain-HTTP S3 endpoint elsewhere than this machine.
    #[serde(default)]
    pub s3_allow_http: bool,
    /// `every 168h` or `daily 03:00` (UTC).
    pub schedule: String,
    /// The VMs (by the name their restore points carry) whose newest point is drilled; empty
    /// means every VM in the repository.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Each drill's time limit.
    #[serde(default = "default_drill_timeout")]
    pub timeout: String,
    /// `auto`, `kvm` or `tcg`.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// The boot disk's controller for the drill only (`sata`, `nvme`, `virtio`).
    #[serde(default)]
    pub boot_controller: Option<String>,
    /// Texts whose appearance on the serial console passes the drill (default: a login
    /// prompt).
    #[serde(default)]
    pub expect: Vec<String>,
}

fn default_drill_timeout() -> String {
    "10m".into()
}

fn default_accel() -> String {
    "auto".into()
}

impl DrillConfig {
    /// Opens its repository.
    pub fn open_repository(&self) -> Result<repo::Repo, crate::OrchError> {
        open_repo(&self.repository, self.key_file.as_deref(), self.s3_allow_http)
    }

    /// Each drill's time limit.
    pub fn timeout(&self) -> Duration {
        humantime::parse_duration(&self.timeout).unwrap_or(Duration::from_secs(600))
    }

    fn problems(&self, out: &mut Vec<String>) {
        let at = format!("[[drill]] {:?}", self.name);
        if !file_name_ok(&self.name) {
            out.push(format!("{at}: use 1 to 64 letters, digits, '.', '_' or '-' in a drill's name"));
        }
        if let Err(e) = Schedule::parse(&self.schedule) {
            out.push(format!("{at}: schedule {e}"));
        }
        match humantime::parse_duration(&self.timeout) {
            Err(e) => out.push(format!("{at}: timeout {:?}: {e}", self.timeout)),
            Ok(d) if d < Duration::from_secs(10) || d > Duration::from_secs(24 * 3600) => {
                out.push(format!("{at}: timeout {:?}: use 10s to 24h", self.timeout));
            }
            Ok(_) => {}
        }
        if !matches!(self.accel.as_str(), "auto" | "kvm" | "tcg") {
            out.push(format!("{at}: accel = {:?}: use \"auto\", \"kvm\" or \"tcg\"", self.accel));
        }
        if let Some(b) = &self.boot_controller
            && !matches!(b.as_str(), "sata" | "nvme" | "virtio")
        {
            out.push(format!("{at}: boot_controller = {b:?}: use \"sata\", \"nvme\" or \"virtio\""));
        }
        if self.expect.iter().any(String::is_empty) {
            out.push(format!("{at}: an empty expect text would match any console"));
        }
    }
}

/// Opens a repository as the daemon's sections name one: a directory or `s3://`, with its
/// key file and the environment's S3 settings.
fn open_repo(
    url: &str,
    key_file: Option<&std::path::Path>,
    s3_allow_http: bool,
) -> Result<repo::Repo, crate::OrchError> {
    let key = key_file.map(repo::RepoKey::from_file).transpose()?;
    let s3 = repo::S3Config { allow_http: s3_allow_http, ..repo::S3Config::from_env() };
    Ok(repo::Repo::open_at(&repo::Location { url: url.to_owned(), s3, key })?)
}

/// `[[verify]]`: every chunk of a repository read back and checked against its name, on a
/// schedule; a damaged chunk fails the run and names the restore points it breaks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Its name (in the history and the metrics: letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The repository (a directory or `s3://bucket/prefix`).
    pub repository: String,
    /// The repository's key file, if it is encrypted.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Allow a plain-HTTP S3 endpoint elsewhere than this machine.
    #[serde(default)]
    pub s3_allow_http: bool,
    /// `every 168h` or `daily 05:00` (UTC).
    pub schedule: String,
    /// Read 1/N of the chunks per run, in turn, so N runs read every chunk once (a daily
    /// verify with 30 reads each chunk every month, at a thirtieth of the cost per run).
    #[serde(default = "default_slices")]
    pub slices: u32,
}

fn default_slices() -> u32 {
    1
}

/// The most slices a verify may be cut into.
pub const MAX_SLICES: u32 = 366;

impl VerifyConfig {
    /// Opens its repository.
    pub fn open_repository(&self) -> Result<repo::Repo, crate::OrchError> {
        open_repo(&self.repository, self.key_file.as_deref(), self.s3_allow_http)
    }
}

/// `[[copy]]`: a repository's restore points copied to a second one (another disk, or object
/// storage), which keeps its own retention: the long-term tier beside a short-term local one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// Its name (in the history and the metrics: letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The repository copied from.
    pub repository: String,
    /// Its key file, if it is encrypted.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The repository copied to (made on the first run, with the source's chunk size).
    pub to: String,
    /// The destination's key file (chunks are re-encoded when the keys differ).
    #[serde(default)]
    pub to_key_file: Option<PathBuf>,
    /// Allow plain-HTTP S3 endpoints elsewhere than this machine.
    #[serde(default)]
    pub s3_allow_http: bool,
    /// `every 24h` or `daily 06:00` (UTC).
    pub schedule: String,
    /// What the destination keeps: only points it would keep are copied, and it is pruned
    /// (then gc'd) by it after each run. Without it, every point is copied and kept.
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// The destination's gc keeps unused chunks this young.
    #[serde(default = "default_gc_grace")]
    pub gc_grace: String,
}

impl CopyConfig {
    /// Opens the repository copied from.
    pub fn open_source(&self) -> Result<repo::Repo, crate::OrchError> {
        open_repo(&self.repository, self.key_file.as_deref(), self.s3_allow_http)
    }

    /// Opens the destination, making it (with `chunk_size`) when it does not exist yet.
    pub fn open_destination(&self, chunk_size: u32) -> Result<repo::Repo, crate::OrchError> {
        match open_repo(&self.to, self.to_key_file.as_deref(), self.s3_allow_http) {
            Err(crate::OrchError::Repo(repo::RepoError::NotFound(_))) => {
                let key = self.to_key_file.as_deref().map(repo::RepoKey::from_file).transpose()?;
                let s3 = repo::S3Config { allow_http: self.s3_allow_http, ..repo::S3Config::from_env() };
                Ok(repo::Repo::init_at(&repo::Location { url: self.to.clone(), s3, key }, chunk_size)?)
            }
            other => other,
        }
    }

    /// Opens the destination, which must exist.
    pub fn open_existing_destination(&self) -> Result<repo::Repo, crate::OrchError> {
        open_repo(&self.to, self.to_key_file.as_deref(), self.s3_allow_http)
    }

    /// The destination's gc grace period (checked by `problems`).
    pub fn gc_grace(&self) -> Duration {
        parse_duration(&self.gc_grace).unwrap_or(Duration::from_secs(3600))
    }
}

/// `[[notify]]`: where a finished run is reported, and which runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Its name (in the log when a notification cannot be delivered).
    pub name: String,
    /// An `https://` (or `http://`) URL the run's record is POSTed to as JSON, retried.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Or an e-mail, through an SMTP server.
    #[serde(default)]
    pub email: Option<EmailConfig>,
    /// A file whose first line is sent as `Authorization: Bearer ...` to the webhook.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Which runs: `failure` (failed or partial), `warning` (those, and runs with warnings)
    /// or `always`.
    #[serde(default = "default_notify_on")]
    pub on: String,
    /// The jobs (of any kind) it reports; empty means every job.
    #[serde(default)]
    pub jobs: Vec<String>,
    /// Attempts after the first when the webhook fails or answers other than 2xx.
    #[serde(default = "default_notify_retries")]
    pub retries: u32,
}

/// `email = { ... }` of a `[[notify]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://host[:587]` (STARTTLS, required: nothing is sent in the clear) or
    /// `smtps://host[:465]` (TLS from the first byte).
    pub smtp: String,
    /// The sender.
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
    /// The account, when the server wants one (AUTH PLAIN, only over TLS).
    #[serde(default)]
    pub user: Option<String>,
    /// A file whose first line is the account's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A CA (PEM) trusted besides the system's, for a server with a private certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl EmailConfig {
    /// The server's host, port, and whether TLS starts at once (`smtps`); checked by `problems`.
    pub fn server(&self) -> Result<(String, u16, bool), String> {
        let bad = || "smtp must be smtp://HOST[:PORT] or smtps://HOST[:PORT]".to_owned();
        let (scheme, rest) = self.smtp.split_once("://").ok_or_else(bad)?;
        let (implicit, default_port) = match scheme {
            "smtp" => (false, 587),
            "smtps" => (true, 465),
            _ => return Err(bad()),
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.contains(['@', '/', '?']) || hostport.is_empty() {
            return Err("smtp is a server's address only (the account goes in user and password_file)".into());
        }
        // `[::1]:25`, `host:25`, `host`, `[::1]`.
        let split = match hostport.rfind(':') {
            Some(i) if !hostport.starts_with('[') || hostport[..i].ends_with(']') => Some(i),
            _ => None,
        };
        match split {
            Some(i) => {
                let p = &hostport[i + 1..];
                let port = p.parse().map_err(|_| format!("smtp port {p:?} is not a number"))?;
                Ok((hostport[..i].to_owned(), port, implicit))
            }
            None => Ok((hostport.to_owned(), default_port, implicit)),
        }
    }
}

/// Whether the host of `rest` (what follows `scheme://`) is this machine.
fn loopback(rest: &str) -> bool {
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit_once(':').filter(|(h, _)| !h.is_empty() && !host.ends_with(']')).map_or(host, |(h, _)| h);
    matches!(host.trim_start_matches('[').trim_end_matches(']'), "localhost" | "::1") || host.starts_with("127.")
}

/// Whether `a` looks like an e-mail address with nothing a header could be forged with.
fn address_ok(a: &str) -> bool {
    let (local, domain) = a.split_once('@').unwrap_or(("", ""));
    !local.is_empty()
        && !domain.is_empty()
        && !a.contains(|c: char| c.is_control() || c.is_whitespace() || "<>,;\"".contains(c))
}

fn default_notify_on() -> String {
    "failure".into()
}

fn default_notify_retries() -> u32 {
    3
}

/// The most retries of one notification.
pub const MAX_NOTIFY_RETRIES: u32 = 10;

impl NotifyConfig {
    /// Whether a run whose record is `rec` is reported.
    pub fn wants(&self, rec: &serde_json::Value) -> bool {
        if !self.jobs.is_empty() && !self.jobs.iter().any(|j| rec["job"] == j.as_str()) {
            return false;
        }
        let failed = rec["outcome"] != "succeeded";
        let warned = rec["vms"]
            .as_array()
            .is_some_and(|vms| vms.iter().any(|v| v["warnings"].as_array().is_some_and(|w| !w.is_empty())));
        match self.on.as_str() {
            "always" => true,
            "warning" => failed || warned,
            _ => failed,
        }
    }
}

/// A whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// `[proxy]`.
    pub proxy: ProxySection,
    /// `[[vcenter]]`.
    #[serde(default, rename = "vcenter")]
    pub vcenters: Vec<VcenterConfig>,
    /// `[[job]]`.
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobConfig>,
    /// `[[drill]]`.
    #[serde(default, rename = "drill")]
    pub drills: Vec<DrillConfig>,
    /// `[[verify]]`.
    #[serde(default, rename = "verify")]
    pub verifies: Vec<VerifyConfig>,
    /// `[[copy]]`.
    #[serde(default, rename = "copy")]
    pub copies: Vec<CopyConfig>,
    /// `[[notify]]`.
    #[serde(default, rename = "notify")]
    pub notify: Vec<NotifyConfig>,
}

/// The largest configuration file read (a config is text of a few kilobytes).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

fn file_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The most VMs at once (`max_vms`, `per_host`, `per_datastore`, `--concurrency`): far above
/// what one proxy can copy, far below what would overflow a semaphore.
pub const MAX_AT_ONCE: usize = 10_000;

/// The most HTTP connections at once `http_connections` may allow.
pub const MAX_HTTP_CONNECTIONS: usize = 10_000;

/// Whether `url` carries a user or password (`https://user:pass@vc/sdk`), which must never be
/// accepted nor repeated in a message.
pub fn url_has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or_default().contains('@')
}

/// An HTTP timeout (`10s`, `500ms`): between 100 milliseconds and an hour.
pub fn http_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
        return Err(format!("{text:?}: use 100ms to 1h"));
    }
    Ok(d)
}

impl ServeConfig {
    /// Parses and checks a configuration.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let (c, problems) = Self::from_toml_with_problems(text)?;
        if problems.is_empty() { Ok(c) } else { Err(ConfigError::Invalid(problems)) }
    }

    /// Parses a configuration and names every problem it has without refusing it, for a check
    /// that goes on to look at files and reports everything in one pass. Only a file that is
    /// not TOML of the right shape is an error.
    pub fn from_toml_with_problems(text: &str) -> Result<(Self, Vec<String>), ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Syntax(format!(
                "the configuration is {} bytes, more than {MAX_CONFIG_BYTES}",
                text.len()
            )));
        }
        let c: Self = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let problems = c.problems();
        Ok((c, problems))
    }

    /// Everything wrong that can be seen without the network or the file system.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let p = &self.proxy;
        if p.listen.parse::<std::net::SocketAddr>().is_err() {
            out.push(format!("[proxy] listen = {:?}: not an address and port (127.0.0.1:9480)", p.listen));
        }
        if let Some(id) = &p.id
            && !file_name_ok(id)
        {
            out.push(format!("[proxy] id = {id:?}: use 1 to 64 letters, digits, '.', '_' or '-'"));
        }
        for (key, n) in [("max_vms", Some(p.max_vms)), ("per_host", p.per_host), ("per_datastore", p.per_datastore)] {
            if let Some(n) = n
                && !(1..=MAX_AT_ONCE).contains(&n)
            {
                out.push(format!("[proxy] {key} = {n}: use 1 to {MAX_AT_ONCE}"));
            }
        }
        if !(1..=MAX_HTTP_CONNECTIONS).contains(&p.http_connections) {
            out.push(format!("[proxy] http_connections = {}: use 1 to {MAX_HTTP_CONNECTIONS}", p.http_connections));
        }
        for (key, text) in
            [("http_header_timeout", &p.http_header_timeout), ("http_idle_timeout", &p.http_idle_timeout)]
        {
            if let Err(e) = http_timeout(text) {
                out.push(format!("[proxy] {key}: {e}"));
            }
        }
        if let Err(e) = parse_size(&p.memory) {
            out.push(format!("[proxy] memory: {e}"));
        }
        match p.rate.as_deref().map(parse_size) {
            Some(Err(e)) => out.push(format!("[proxy] rate: {e}")),
            Some(Ok(0)) => out.push("[proxy] rate = \"0\" would stop every copy: leave rate out for no limit".into()),
            _ => {}
        }
        if let Err(e) = humantime::parse_duration(&p.max_job) {
            out.push(format!("[proxy] max_job = {:?}: {e}", p.max_job));
        }
        if !matches!(p.log_format.as_str(), "text" | "json") {
            out.push(format!("[proxy] log_format = {:?}: use \"text\" or \"json\"", p.log_format));
        }
        let mut names = HashSet::new();
        for v in &self.vcenters {
            let at = format!("[[vcenter]] {:?}", v.name);
            if !names.insert(v.name.as_str()) {
                out.push(format!("{at}: the name is used twice"));
            }
            // A URL with credentials in it is never repeated, here or anywhere else.
            if url_has_credentials(&v.url) {
                out.push(format!(
                    "{at}: the url must not carry credentials; use user and password_file or password_env"
                ));
            } else if !v.url.starts_with("https://") {
                out.push(format!("{at}: url {:?} must start with https://", v.url));
            }
            match (&v.password_file, &v.password_env) {
                (Some(_), Some(_)) => out.push(format!("{at}: give password_file or password_env, not both")),
                (None, None) => out.push(format!("{at}: no password: give password_file or password_env")),
                _ => {}
            }
            if v.insecure && (v.thumbprint.is_some() || v.ca_file.is_some()) {
                out.push(format!("{at}: insecure contradicts thumbprint and ca_file"));
            }
            if let Some(t) = &v.thumbprint
                && let Err(e) = vsphere::Thumbprint::parse(t)
            {
                out.push(format!("{at}: {e}"));
            }
        }
        let mut jobs = HashSet::new();
        for j in &self.jobs {
            let at = format!("[[job]] {:?}", j.name);
            if !file_name_ok(&j.name) {
                out.push(format!("{at}: use 1 to 64 letters, digits, '.', '_' or '-' in a job name"));
            }
            if !jobs.insert(j.name.as_str()) {
                out.push(format!("{at}: the name is used twice"));
            }
            if !names.contains(j.vcenter.as_str()) {
                out.push(format!("{at}: no [[vcenter]] is named {:?}", j.vcenter));
            }
            if j.vms.is_empty() != j.all {
                out.push(format!("{at}: name the VMs (vms = [...]) or set all = true, not both or neither"));
            }
            if let Err(e) = Schedule::parse(&j.schedule) {
                out.push(format!("{at}: schedule {e}"));
            }
            match (&j.repository, &j.replica) {
                (Some(_), Some(_)) => out.push(format!("{at}: give repository or replica, not both")),
                (None, None) => out.push(format!("{at}: no target: give repository or replica")),
                (None, Some(_)) if j.retention.is_some() || j.key_file.is_some() => {
                    out.push(format!("{at}: retention and key_file apply to repositories only"));
                }
                _ => {}
            }
            for (which, h) in [("pre_freeze", &j.pre_freeze), ("post_thaw", &j.post_thaw)] {
                let Some(h) = h else { continue };
                if h.command.is_some() == h.guest.is_some() {
                    out.push(format!(
                        "{at}: {which}: give command (on the proxy) or guest (in the guest), one of them"
                    ));
                }
                if h.guest.is_some() && j.guest_credentials_file.is_none() {
                    out.push(format!("{at}: {which}: a guest hook needs guest_credentials_file"));
                }
                if let Err(e) = humantime::parse_duration(&h.timeout) {
                    out.push(format!("{at}: {which}: timeout {:?}: {e}", h.timeout));
                }
            }
            if let Some(r) = &j.retention
                && r.retention().keeps_nothing()
            {
                out.push(format!("{at}: a retention that keeps nothing would remove every restore point"));
            }
            if let Err(e) = parse_duration(&j.gc_grace) {
                out.push(format!("{at}: gc_grace {e}"));
            }
            if j.retries > MAX_RETRIES {
                out.push(format!("{at}: retries = {}: use 0 to {MAX_RETRIES}", j.retries));
            }
            if let Err(e) = parse_duration(&j.retry_delay) {
                out.push(format!("{at}: retry_delay {e}"));
            }
        }
        for d in &self.drills {
            d.problems(&mut out);
            // Drills and jobs share the history, the metrics and `POST /jobs/NAME/run`.
            if !jobs.insert(d.name.as_str()) {
                out.push(format!("[[drill]] {:?}: the name is used twice (by a job or a drill)", d.name));
            }
        }
        let mut notifiers = HashSet::new();
        for n in &self.notify {
            let at = format!("[[notify]] {:?}", n.name);
            if !notifiers.insert(n.name.as_str()) {
                out.push(format!("{at}: the name is used twice"));
            }
            match (&n.webhook, &n.email) {
                (Some(_), Some(_)) | (None, None) => out.push(format!("{at}: give webhook or email, one of them")),
                (Some(w), None) => {
                    let (scheme, rest) = w.split_once("://").unwrap_or(("", ""));
                    if !matches!(scheme, "https" | "http") || rest.is_empty() {
                        out.push(format!("{at}: webhook must be an https:// or http:// URL"));
                    } else if rest.split('/').next().is_some_and(|host| host.contains('@')) {
                        out.push(format!("{at}: webhook must not carry a user or password (use token_file)"));
                    } else if scheme == "http" && n.token_file.is_some() && !loopback(rest) {
                        out.push(format!(
                            "{at}: a token_file over plain http:// to another machine would cross the network in \
                             the clear: use https://"
                        ));
                    }
                }
                (None, Some(e)) => {
                    if let Err(why) = e.server() {
                        out.push(format!("{at}: {why}"));
                    }
                    for a in std::iter::once(&e.from).chain(&e.to).filter(|a| !address_ok(a)) {
                        out.push(format!("{at}: {a:?} is not an e-mail address"));
                    }
                    if e.to.is_empty() {
                        out.push(format!("{at}: email needs at least one address in to"));
                    }
                    if e.user.is_some() != e.password_file.is_some() {
                        out.push(format!("{at}: email needs user and password_file together"));
                    }
                }
            }
            if !matches!(n.on.as_str(), "failure" | "warning" | "always") {
                out.push(format!("{at}: on = {:?}: use \"failure\", \"warning\" or \"always\"", n.on));
            }
            if n.retries > MAX_NOTIFY_RETRIES {
                out.push(format!("{at}: retries = {}: use 0 to {MAX_NOTIFY_RETRIES}", n.retries));
            }
        }
        for v in self.verifies.iter().filter(|v| !(1..=MAX_SLICES).contains(&v.slices)) {
            out.push(format!("[[verify]] {:?}: slices = {}: use 1 to {MAX_SLICES}", v.name, v.slices));
        }
        // So do verify and copy jobs.
        let upkeep = self.verifies.iter().map(|v| ("verify", &v.name, &v.schedule, None, None));
        let copies = self.copies.iter().map(|c| ("copy", &c.name, &c.schedule, Some(c), c.retention.as_ref()));
        for (section, name, schedule, copy, retention) in upkeep.chain(copies) {
            let at = format!("[[{section}]] {name:?}");
            if !file_name_ok(name) {
                out.push(format!("{at}: use 1 to 64 letters, digits, '.', '_' or '-' in its name"));
            }
            if !jobs.insert(name.as_str()) {
                out.push(format!("{at}: the name is used twice (by a job, drill, verify or copy)"));
            }
            if let Err(e) = Schedule::parse(schedule) {
                out.push(format!("{at}: schedule {e}"));
            }
            if retention.is_some_and(|r| r.retention().keeps_nothing()) {
                out.push(format!("{at}: a retention that keeps nothing would remove every restore point"));
            }
            if let Some(c) = copy {
                if c.to.trim_end_matches('/') == c.repository.trim_end_matches('/') {
                    out.push(format!("{at}: to = {:?} is the repository it copies from", c.to));
                }
                if let Err(e) = parse_duration(&c.gc_grace) {
                    out.push(format!("{at}: gc_grace {e}"));
                }
            }
        }
        for n in &self.notify {
            for j in n.jobs.iter().filter(|j| !jobs.contains(j.as_str())) {
                out.push(format!("[[notify]] {:?}: no job, drill, verify or copy is named {j:?}", n.name));
            }
        }
        out
    }

    /// Every local repository the configuration names (jobs, drills, verifies, both sides of
    /// copies), once each, sorted.
    pub fn local_repositories(&self) -> Vec<String> {
        let named = self
            .jobs
            .iter()
            .filter_map(|j| j.repository.clone())
            .chain(self.drills.iter().map(|d| d.repository.clone()))
            .chain(self.verifies.iter().map(|v| v.repository.clone()))
            .chain(self.copies.iter().flat_map(|c| [c.repository.clone(), c.to.clone()]));
        let mut out: Vec<String> = named.filter(|r| !r.contains("://")).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every folder the daemon writes to: its state folder, the local repositories (readers
    /// take locks and drills keep records there too) and the replica folders.
    pub fn written_paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::iter::once(self.proxy.state_dir.clone())
            .chain(self.local_repositories().into_iter().map(PathBuf::from))
            .chain(self.jobs.iter().filter_map(|j| j.replica.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The memory cap in bytes.
    pub fn memory(&self) -> u64 {
        parse_size(&self.proxy.memory).unwrap_or(256 << 20)
    }

    /// The global rate limit in bytes per second, if any.
    pub fn rate(&self) -> Option<u64> {
        self.proxy.rate.as_deref().and_then(|r| parse_size(r).ok())
    }

    /// The longest a job may run.
    pub fn max_job(&self) -> Duration {
        humantime::parse_duration(&self.proxy.max_job).unwrap_or(Duration::from_secs(24 * 3600))
    }

    /// How long an HTTP client may take to send a request's headers.
    pub fn http_header_timeout(&self) -> Duration {
        http_timeout(&self.proxy.http_header_timeout).unwrap_or(Duration::from_secs(10))
    }

    /// How long an HTTP connection may stay without traffic.
    pub fn http_idle_timeout(&self) -> Duration {
        http_timeout(&self.proxy.http_idle_timeout).unwrap_or(Duration::from_secs(60))
    }

    /// The vCenter a job reads from.
    pub fn vcenter(&self, name: &str) -> Option<&VcenterConfig> {
        self.vcenters.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[proxy]
id = "proxy1"
token_file = "/etc/syncproxy/token"
max_vms = 50
per_host = 4
rate = "200M"

[[vcenter]]
name = "vc1"
url = "https://vc.example/sdk"
user = "backup@vsphere.local"
password_file = "/etc/syncproxy/vc1.pw"
thumbprint = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD"

[[job]]
name = "nightly"
vcenter = "vc1"
vms = ["db01", "DC1/vm/web"]
schedule = "daily 02:30"
repository = "/backups"
retention = { keep_last = 7, keep_daily = 14 }

[[job]]
name = "dr"
vcenter = "vc1"
all = true
schedule = "every 15m"
replica = "/replicas"
"#;

    #[test]
    fn a_good_configuration_parses() {
        let c = ServeConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.jobs.len(), 2);
        assert_eq!(c.rate(), Some(200 << 20));
        assert_eq!(c.memory(), 256 << 20);
        assert_eq!(c.proxy.listen, "127.0.0.1:9480");
        assert_eq!(Schedule::parse(&c.jobs[1].schedule), Ok(Schedule::Every(Duration::from_secs(900))));
        assert_eq!(c.jobs[0].gc_grace(), Duration::from_secs(3600), "the gc after a prune keeps an hour");
        let c = ServeConfig::from_toml(&GOOD.replace("keep_daily = 14 }", "keep_daily = 14 }\ngc_grace = \"10m\""))
            .unwrap();
        assert_eq!(c.jobs[0].gc_grace(), Duration::from_secs(600));
        let e = ServeConfig::from_toml(&GOOD.replace("keep_daily = 14 }", "keep_daily = 14 }\ngc_grace = \"10\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nightly") && e.contains("gc_grace") && e.contains("no unit"), "{e}");
        assert_eq!((c.jobs[0].retries, c.jobs[0].retry_delay()), (2, Duration::from_secs(600)));
        let bad = GOOD.replace("keep_daily = 14 }", "keep_daily = 14 }\nretries = 11\nretry_delay = \"soon\"");
        let e = ServeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("retries = 11") && e.contains("retry_delay"), "{e}");
    }

    #[test]
    fn every_time_is_one_duration_syntax_and_bare_numbers_other_than_zero_are_refused() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        let e = parse_duration("5").unwrap_err();
        assert!(e.contains("no unit") && e.contains("5ms") && e.contains("5s"), "{e}");
        assert!(parse_duration("").is_err() && parse_duration("5 parsecs").is_err() && parse_duration("-1s").is_err());
        assert_eq!(parse_millis("4ms"), Ok(4));
        assert_eq!(parse_millis("2s"), Ok(2000));
        assert!(parse_millis("1500us").unwrap_err().contains("whole milliseconds"));
        assert!(parse_millis("100days").unwrap_err().contains("too long"));
        // The setting: a duration, or the bare milliseconds it was first documented with.
        for (value, ms) in [("\"4ms\"", 4), ("4", 4), ("\"1s\"", 1000), ("\"0\"", 0)] {
            let c = ServeConfig::from_toml(&GOOD.replace("rate = ", &format!("release_cpu_time = {value}\nrate = ")))
                .unwrap();
            assert_eq!(c.proxy.release_cpu_time, ms, "{value}");
        }
        let bad = GOOD.replace("rate = ", "release_cpu_time = \"4\"\nrate = ");
        assert!(ServeConfig::from_toml(&bad).is_err());
    }

    #[test]
    fn notifications_choose_their_runs_and_bad_ones_are_named() {
        let with = |n: &str| GOOD.to_owned() + n;
        let c =
            ServeConfig::from_toml(&with("[[notify]]\nname = \"ops\"\nwebhook = \"https://h.example/x\"\n")).unwrap();
        let mail = with(
            "[[notify]]\nname = \"mail\"\nemail = { smtp = \"smtp://mx.example\", from = \"p@example.com\", to = [\"ops@example.com\"] }\n",
        );
        let e = ServeConfig::from_toml(&mail).unwrap().notify[0].email.clone().unwrap();
        assert_eq!(e.server(), Ok(("mx.example".to_owned(), 587, false)));
        let bad_mail =
            mail.replace("smtp://mx.example", "smtps://u@mx.example:x").replace("ops@example.com", "a\\r\\nBcc: x");
        let err = ServeConfig::from_toml(&bad_mail).unwrap_err().to_string();
        assert!(err.contains("server's address only") && err.contains("is not an e-mail address"), "{err}");
        let e: EmailConfig = toml::from_str("smtp = \"smtps://[::1]:2465\"\nfrom = \"a@b\"\nto = [\"c@d\"]").unwrap();
        assert_eq!(e.server(), Ok(("[::1]".to_owned(), 2465, true)));
        let e: EmailConfig = toml::from_str("smtp = \"smtp://[::1]\"\nfrom = \"a@b\"\nto = [\"c@d\"]").unwrap();
        assert_eq!(e.server(), Ok(("[::1]".to_owned(), 587, false)));
        let n = &c.notify[0];
        assert_eq!((n.on.as_str(), n.retries), ("failure", 3));
        let run = |job: &str, outcome: &str, warnings: &[&str]| serde_json::json!({"job": job, "outcome": outcome, "vms": [{"vm": "a", "warnings": warnings}]});
        assert!(n.wants(&run("nightly", "failed", &[])) && n.wants(&run("dr", "partial", &[])));
        assert!(!n.wants(&run("nightly", "succeeded", &["slow"])));
        let mut w = n.clone();
        w.on = "warning".into();
        assert!(w.wants(&run("nightly", "succeeded", &["slow"])) && !w.wants(&run("nightly", "succeeded", &[])));
        w.on = "always".into();
        w.jobs = vec!["dr".into()];
        assert!(w.wants(&run("dr", "succeeded", &[])) && !w.wants(&run("nightly", "failed", &[])));
        let bad = with(
            "[[notify]]\nname = \"ops\"\nwebhook = \"ftp://h/x\"\non = \"sometimes\"\njobs = [\"nope\"]\nretries = 99\n\n\
             [[notify]]\nname = \"ops\"\nwebhook = \"https://u:p@h/x\"\n",
        );
        let e = ServeConfig::from_toml(&bad).unwrap_err().to_string();
        let leaky = with("[[notify]]\nname = \"x\"\nwebhook = \"http://hooks.example/x\"\ntoken_file = \"/t\"\n");
        assert!(ServeConfig::from_toml(&leaky).unwrap_err().to_string().contains("in the clear"));
        for local in ["http://127.0.0.1:8080/x", "http://localhost/x", "http://[::1]:80/x"] {
            let ok = with(&format!("[[notify]]\nname = \"x\"\nwebhook = \"{local}\"\ntoken_file = \"/t\"\n"));
            assert!(ServeConfig::from_toml(&ok).is_ok(), "{local}");
        }
        for want in ["https:// or http://", "sometimes", "\"nope\"", "retries = 99", "used twice", "user or password"] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }

    #[test]
    fn every_problem_is_named_with_its_place() {
        let bad = GOOD
            .replace("password_file = \"/etc/syncproxy/vc1.pw\"", "")
            .replace("daily 02:30", "daily 25:00")
            .replace("vcenter = \"vc1\"\nall = true", "vcenter = \"vc9\"\nall = true")
            .replace("rate = \"200M\"", "rate = \"fast\"");
        let e = ServeConfig::from_toml(&bad).unwrap_err().to_string();
        for want in ["no password", "25:00", "vc9", "rate"] {
            assert!(e.contains(want), "{want} in {e}");
        }
        let e = ServeConfig::from_toml("[proxy]\ntoken_file = 1\n").unwrap_err().to_string();
        assert!(e.contains("token_file"), "{e}");
        let e = ServeConfig::from_toml(&GOOD.replace("max_vms", "max_vmz")).unwrap_err().to_string();
        assert!(e.contains("max_vmz"), "unknown keys are refused: {e}");
    }

    #[test]
    fn values_that_would_panic_or_stall_the_daemon_are_refused_all_at_once() {
        let bad = GOOD
            .replace("max_vms = 50", "max_vms = 9223372036854775807")
            .replace("per_host = 4", "per_host = 0\nper_datastore = 10001")
            .replace("rate = \"200M\"", "rate = \"0\"\nhttp_connections = 0\nhttp_header_timeout = \"0s\"");
        let e = ServeConfig::from_toml(&bad).unwrap_err().to_string();
        for want in [
            "max_vms = 9223372036854775807",
            "per_host = 0",
            "per_datastore = 10001",
            "rate = \"0\"",
            "http_connections = 0",
            "http_header_timeout",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        let (c, problems) = ServeConfig::from_toml_with_problems(&bad).unwrap();
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert_eq!(c.jobs.len(), 2, "the configuration comes back with its problems");
        let ok = GOOD.replace("rate = \"200M\"", "http_connections = 8\nhttp_header_timeout = \"500ms\"");
        let c = ServeConfig::from_toml(&ok).unwrap();
        assert_eq!(c.http_header_timeout(), Duration::from_millis(500));
        assert_eq!(c.http_idle_timeout(), Duration::from_secs(60));
    }

    #[test]
    fn a_url_with_credentials_is_refused_without_repeating_them() {
        for url in ["https://admin:s3cret@vc.example/sdk", "http://admin:s3cret@vc.example/sdk", "s3cret@vc.example"] {
            let bad = GOOD.replace("https://vc.example/sdk", url);
            let e = ServeConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains("must not carry credentials"), "{url}: {e}");
            assert!(!e.contains("s3cret"), "{url} repeated: {e}");
        }
        assert!(!url_has_credentials("https://vc.example/sdk?user=a@b"));
    }

    #[test]
    fn hooks_are_one_of_command_or_guest_and_guest_needs_credentials() {
        let with = |hooks: &str| GOOD.replace("replica = \"/replicas\"", &format!("replica = \"/replicas\"\n{hooks}"));
        let ok = ServeConfig::from_toml(&with(
            "pin_drs = false\npre_freeze = { command = \"/usr/local/bin/freeze\", timeout = \"30s\" }\n\
             post_thaw = { guest = \"/usr/bin/thaw\", arguments = \"--all\" }\nguest_credentials_file = \"/etc/g\"",
        ))
        .unwrap();
        let j = &ok.jobs[1];
        assert!(!j.pin_drs && ok.jobs[0].pin_drs, "pinning is on unless turned off");
        let pre = j.pre_freeze.as_ref().unwrap().hook(None).unwrap();
        assert_eq!(pre.timeout, Duration::from_secs(30));
        let e = ServeConfig::from_toml(&with("pre_freeze = { command = \"a\", guest = \"b\" }")).unwrap_err();
        assert!(e.to_string().contains("pre_freeze: give command"), "{e}");
        let e = ServeConfig::from_toml(&with("post_thaw = { guest = \"/bin/thaw\" }")).unwrap_err();
        assert!(e.to_string().contains("needs guest_credentials_file"), "{e}");
        let e = ServeConfig::from_toml(&with("post_thaw = { command = \"x\", timeout = \"soon\" }")).unwrap_err();
        assert!(e.to_string().contains("timeout \"soon\""), "{e}");
    }

    const DRILL: &str = r#"
[[drill]]
name = "weekly-drill"
repository = "/backups"
schedule = "every 168h"
vms = ["db01"]
boot_controller = "sata"
"#;

    #[test]
    fn drills_parse_with_defaults_and_their_problems_are_named() {
        let c = ServeConfig::from_toml(&format!("{GOOD}{DRILL}")).unwrap();
        assert_eq!(c.drills.len(), 1);
        let d = &c.drills[0];
        assert_eq!((d.accel.as_str(), d.timeout()), ("auto", Duration::from_secs(600)));
        assert_eq!(d.boot_controller.as_deref(), Some("sata"));
        let bad = DRILL
            .replace("weekly-drill", "nightly")
            .replace("every 168h", "weekly")
            .replace("boot_controller = \"sata\"", "boot_controller = \"pvscsi\"\naccel = \"hvf\"\ntimeout = \"1s\"");
        let e = ServeConfig::from_toml(&format!("{GOOD}{bad}")).unwrap_err().to_string();
        for want in ["used twice", "schedule", "pvscsi", "hvf", "use 10s to 24h"] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
