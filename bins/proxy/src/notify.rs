//! The daemon's notifications: a finished run that a `[[notify]]` wants (failures, warnings
//! or every run, of chosen jobs) is POSTed to its webhook as JSON, retried with a growing
//! pause, in the background so no schedule waits for it. The URL is logged by its host only
//! (webhook URLs often carry a secret), and the certificate is verified.

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
    client: reqwest::Client,
    token: Option<String>,
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
        let token = config
            .token_file
            .as_deref()
            .map(|f| read_secret_file(f, "notify token file"))
            .transpose()
            .with_context(|| format!("[[notify]] {:?}", config.name))?;
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .with_context(|| format!("[[notify]] {:?}: cannot make an HTTP client", config.name))?;
        Ok(Self { config: config.clone(), client, token })
    }

    /// Sends `rec` in the background when this notifier wants it; the task, to be awaited
    /// at shutdown.
    pub(crate) fn send(self: &Arc<Self>, proxy: &str, rec: &Value) -> Option<tokio::task::JoinHandle<()>> {
        if !self.config.wants(rec) {
            return None;
        }
        let body = json!({
            "proxy": proxy,
            "job": rec["job"],
            "outcome": rec["outcome"],
            "summary": summary(proxy, rec),
            "run": rec,
        })
        .to_string();
        let me = self.clone();
        Some(tokio::spawn(async move { me.deliver(body).await }))
    }

    /// POSTs `body`, retrying failures and answers other than 2xx; logs the outcome.
    async fn deliver(&self, body: String) {
        let (name, to) = (&self.config.name, host_only(&self.config.webhook));
        let mut pause = FIRST_PAUSE;
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            let mut req = self
                .client
                .post(&self.config.webhook)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let why = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(notify = %name, to = %to, attempt = attempt + 1, "notification delivered");
                    return;
                }
                Ok(r) => format!("answered {}", r.status()),
                // Without the URL, which may carry a secret.
                Err(e) => format!("{}", e.without_url()),
            };
            tracing::warn!(notify = %name, to = %to, attempt = attempt + 1, "notification not delivered: {why}");
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
