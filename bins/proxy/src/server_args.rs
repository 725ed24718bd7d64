//! How `proxy` and `probe` reach and trust a vSphere server from the command line: the URL
//! (never with credentials in it), the user, the password from a file read with a bound (warned
//! about when others may read it) or the environment (never an argument), and the TLS trust
//! (system CAs, an extra CA, a pinned thumbprint, or a loud `--insecure`). Included by `probe`
//! from here with `#[path]`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use orchestration::Login;
use vsphere::{Client, ConnectOptions, Credentials, Secret, Thumbprint, Trust};

/// The environment variable a password may come from instead of `--password-file`.
pub(crate) const PASSWORD_ENV: &str = "SYNCPROXY_PASSWORD";

/// The largest secret file read: a password or token is one line, and a wrong path such as
/// `/dev/zero` must not fill the memory.
pub(crate) const MAX_SECRET_BYTES: u64 = 64 << 10;

/// The first line of a secret file (`what` says which, for messages), read with a bound;
/// empty or larger than [`MAX_SECRET_BYTES`] is an error naming the file, never quoting it.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read the {what} {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        bail!("the {what} {} is larger than {} KiB: not a {what}", path.display(), MAX_SECRET_BYTES >> 10);
    }
    let Ok(text) = String::from_utf8(bytes) else {
        bail!("the {what} {} is not UTF-8 text", path.display());
    };
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        bail!("the {what} {} is empty", path.display());
    }
    Ok(line.to_owned())
}

/// A warning when a secret file may be read by others, or by its group unless root owns it
/// (root:service 0640, as the package installs the token, is how a service's secrets are
/// kept: only root chose who is in that group).
pub(crate) fn secret_file_warning(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    let root_group_read = meta.uid() == 0 && mode & 0o037 == 0;
    (mode & 0o077 != 0 && !root_group_read).then(|| {
        format!(
            "the {what} {} may be read by its group or others (mode {:04o}); chmod 600 it (or 640 owned by \
             root, its group the service's)",
            path.display(),
            mode & 0o7777
        )
    })
}

/// Whether `url` carries a user or password (`https://user:pass@vc/sdk`), which is refused and
/// never repeated.
pub(crate) fn url_has_credentials(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or_default().contains('@')
}

/// How to reach and trust a vSphere server (shared by every command that talks to one).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerArgs {
    /// `https://HOST[:PORT]/sdk` of vCenter or ESXi (no credentials in it).
    #[arg(long)]
    pub(crate) url: String,
    /// The user name.
    #[arg(long)]
    pub(crate) user: String,
    /// A file whose first line is the password (never a command-line argument, where every
    /// user of the host could read it). Without it, the password is read from the environment
    /// variable SYNCPROXY_PASSWORD.
    #[arg(long)]
    pub(crate) password_file: Option<PathBuf>,
    /// Trust the server by its certificate's SHA-1 (`AA:BB:...`) or SHA-256 thumbprint.
    #[arg(long, conflicts_with_all = ["ca_file", "insecure"])]
    pub(crate) thumbprint: Option<String>,
    /// Also trust this CA (PEM) besides the system's.
    #[arg(long, conflicts_with = "insecure")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Do not verify the server's certificate at all. Anyone on the path can then read the
    /// credentials; every connection logs a warning.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Also accept TLS 1.0 and 1.1 (vCenter 5.1, ESXi 5.0 and 5.1 speak nothing newer), through
    /// OpenSSL with weak ciphers allowed for this server only; each connection warns.
    #[arg(long)]
    pub(crate) legacy_tls: bool,
    /// How long one call may take (`30s`, `5m`).
    #[arg(long, default_value = "5m", value_parser = orchestration::config::parse_duration)]
    pub(crate) timeout: Duration,
    /// The environment variable holding the password (from a configuration file; the command
    /// line always uses SYNCPROXY_PASSWORD).
    #[arg(skip)]
    pub(crate) password_env: Option<String>,
    /// The caller already warned about the password file's permissions (the daemon, once at
    /// start rather than at every login).
    #[arg(skip)]
    pub(crate) permissions_warned: bool,
}

impl ServerArgs {
    /// The password: from `--password-file`, else from SYNCPROXY_PASSWORD.
    fn password(&self) -> Result<Secret> {
        if let Some(f) = &self.password_file {
            let password = read_secret_file(f, "password file")?;
            if let Some(w) = secret_file_warning(f, "password file").filter(|_| !self.permissions_warned) {
                eprintln!("{}: WARNING: {w}", env!("CARGO_BIN_NAME"));
            }
            return Ok(Secret::new(password));
        }
        let var = self.password_env.as_deref().unwrap_or(PASSWORD_ENV);
        match std::env::var(var) {
            Ok(p) if !p.is_empty() => Ok(Secret::new(p)),
            _ => bail!("no password: give --password-file FILE, or set {var}"),
        }
    }

    /// How to connect and log in: the trust, the password (read now) and the timeout.
    pub(crate) fn login_spec(&self) -> Result<Login> {
        if url_has_credentials(&self.url) {
            bail!("the server's URL must not carry credentials (user:password@); give --user and --password-file");
        }
        vsphere::tls::install_crypto_provider();
        let trust = if self.insecure {
            eprintln!("{}: WARNING: --insecure: the server's certificate is not checked", env!("CARGO_BIN_NAME"));
            Trust::Insecure
        } else if let Some(t) = &self.thumbprint {
            Trust::Pinned(Thumbprint::parse(t)?)
        } else {
            Trust::Verified { extra_ca: self.ca_file.clone() }
        };
        let password = self.password()?;
        let options = ConnectOptions {
            trust,
            timeout: self.timeout,
            legacy_tls: self.legacy_tls,
            ..ConnectOptions::new(&self.url)
        };
        Ok(Login { options, credentials: Credentials { user: self.user.clone(), password } })
    }

    /// Connects and logs in.
    pub(crate) async fn login(&self) -> Result<Client> {
        Ok(self.login_spec()?.client().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_owned_secret_its_group_may_read_is_not_warned_about() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "secret\n").unwrap();
        let mode = |m: u32| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o600);
        assert!(secret_file_warning(&f, "token file").is_none());
        for m in [0o644, 0o660, 0o604] {
            mode(m);
            assert!(secret_file_warning(&f, "token file").is_some_and(|w| w.contains("chmod 600")), "{m:o}");
        }
        mode(0o640);
        let root = std::fs::metadata(&f).unwrap().uid() == 0;
        assert_eq!(secret_file_warning(&f, "token file").is_none(), root, "root:group 0640 is how a service reads it");
    }
}
