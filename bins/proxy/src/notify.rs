//! The daemon's notifications: a finished run that a `[[notify]]` wants (failures, warnings
//! or every run, of chosen jobs) is POSTed to its webhook as JSON, or mailed through an SMTP
//! server (`smtp`), retried with a growing pause, in the background so no schedule waits for
//! it. A webhook URL is logged by its host only (such URLs often carry a secret); every
//! certificate is verified.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use orchestration::config::NotifyConfig;
use serde_json::{Value, json};

use crate::server_args::read_secret_file;

/// One attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The pause before the first retry; it doubles each time, up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(60);

/// One `[[notify]]`, ready to send.
pub(crate) struct Notifier {
    config: NotifyConfig,
    how: How,
}

/// Where its notifications go.
enum How {
    Webhook { url: String, client: reqwest::Client, token: Option<String> },
    Email { server: crate::smtp::Server, from: String, to: Vec<String> },
}

/// `scheme://host[:port]` of a URL: what the log may say of it.
fn host_only(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{}", host.rsplit('@').next().unwrap_or_default())
}

/// A line a person reads first (chat integrations show it as is).
fn summary(proxy: &str, rec: &Value) -> String {
    let job = rec["job"].as_str().unwrap_or("?");
    let outcome = rec["outcome"].as_str().unwrap_or("?");
    let mut s = format!("syncproxy {proxy}: {job} {outcome}");
    if let Some(vms) = rec["vms"].as_array() {
        let failed: Vec<&str> = vms.iter().filter(|v| !v["error"].is_null()).filter_map(|v| v["vm"].as_str()).collect();
        if !failed.is_empty() {
            s.push_str(&format!("; failed: {}", failed.join(", ")));
        }
    }
    if let Some(e) = rec["error"].as_str() {
        s.push_str(&format!("; {e}"));
    }
    s
}

impl Notifier {
    /// Reads its token file, if any, and makes its client.
    pub(crate) fn new(config: &NotifyConfig) -> Result<Self> {
        let at = || format!("[[notify]] {:?}", config.name);
        let how = match (&config.webhook, &config.email) {
            (Some(url), _) => {
                let token = config
                    .token_file
                    .as_deref()
                    .map(|f| read_secret_file(f, "notify token file"))
                    .transpose()
                    .with_context(at)?;
                let client = reqwest::Client::builder()
                    .timeout(ATTEMPT_TIMEOUT)
                    .build()
                    .with_context(|| format!("{}: cannot make an HTTP client", at()))?;
                How::Webhook { url: url.clone(), client, token }
            }
            (None, Some(e)) => {
                let (host, port, implicit_tls) = e.server().map_err(anyhow::Error::msg).with_context(at)?;
                let password = e
                    .password_file
                    .as_deref()
                    .map(|f| read_secret_file(f, "SMTP password file"))
                    .transpose()
                    .with_context(at)?;
                let trust = vsphere::Trust::Verified { extra_ca: e.ca_file.clone() };
                let tls = vsphere::tls::client_config(&trust).with_context(at)?;
                let server = crate::smtp::Server {
                    host,
                    port,
                    implicit_tls,
                    login: e.user.clone().zip(password),
                    tls: Arc::new(tls),
                };
                How::Email { server, from: e.from.clone(), to: e.to.clone() }
            }
            (None, None) => anyhow::bail!("{}: give webhook or email", at()),
        };
        Ok(Self { config: config.clone(), how })
    }

    /// Where it sends, as the log may say it.
    fn target(&self) -> String {
        match &self.how {
            How::Webhook { url, .. } => host_only(url),
            How::Email { server, to, .. } => format!("mail to {} via {}:{}", to.join(", "), server.host, server.port),
        }
    }

    /// Sends `rec` in the background when this notifier wants it; the task, to be awaited
    /// at shutdown.
    pub(crate) fn send(self: &Arc<Self>, proxy: &str, rec: &Value) -> Option<tokio::task::JoinHandle<()>> {
        if !self.config.wants(rec) {
            return None;
        }
        let (proxy, rec) = (proxy.to_owned(), rec.clone());
        let me = self.clone();
        Some(tokio::spawn(async move { me.deliver(&proxy, &rec).await }))
    }

    /// One attempt at sending `rec`.
    async fn attempt(&self, proxy: &str, rec: &Value) -> Result<(), String> {
        let line = summary(proxy, rec);
        match &self.how {
            How::Webhook { url, client, token } => {
                let body =
                    json!({"proxy": proxy, "job": rec["job"], "outcome": rec["outcome"], "summary": line, "run": rec});
                let mut req =
                    client.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("answered {}", r.status())),
                    // Without the URL, which may carry a secret.
                    Err(e) => Err(format!("{}", e.without_url())),
                }
            }
            How::Email { server, from, to } => {
                let pretty = serde_json::to_string_pretty(rec).unwrap_or_default();
                let mail = crate::smtp::Mail {
                    from: from.clone(),
                    to: to.clone(),
                    subject: line.clone(),
                    body: format!("{line}\n\nThe run as the daemon's history keeps it:\n\n{pretty}\n"),
                };
                crate::smtp::send(server, &mail).await
            }
        }
    }

    /// Sends `rec`, retrying failures (and webhook answers other than 2xx); logs the outcome.
    async fn deliver(&self, proxy: &str, rec: &Value) {
        let (name, to) = (&self.config.name, self.target());
        let mut pause = FIRST_PAUSE;
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            match self.attempt(proxy, rec).await {
                Ok(()) => {
                    tracing::info!(notify = %name, to = %to, attempt = attempt + 1, "notification delivered");
                    return;
                }
                Err(why) => {
                    tracing::warn!(notify = %name, to = %to, attempt = attempt + 1, "notification not delivered: {why}");
                }
            }
        }
        tracing::error!(notify = %name, to = %to, "notification given up after {} attempt(s)", self.config.retries + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_of_a_webhook_is_ever_logged() {
        assert_eq!(host_only("https://hooks.example/services/T0/B0/SECRET?x=1"), "https://hooks.example");
        assert_eq!(host_only("http://user:pw@h:8080/p"), "http://h:8080");
        assert_eq!(host_only("garbage"), "://garbage");
    }

    #[test]
    fn the_summary_names_the_job_its_outcome_and_what_failed() {
        let rec = json!({"job": "nightly", "outcome": "partial",
            "vms": [{"vm": "a", "error": null}, {"vm": "b", "error": "gone"}], "error": null});
        assert_eq!(summary("p1", &rec), "syncproxy p1: nightly partial; failed: b");
    }
}
