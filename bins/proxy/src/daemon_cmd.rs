//! `proxy status` and `proxy job run NAME`: talk to a running `proxy serve` through its HTTP
//! API, with the address and token its configuration file names, so an operator never needs
//! curl. Exit codes: 0 done, 1 the daemon could not be reached or refused (the reason said).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the daemon is: its configuration file.
#[derive(Debug, clap::Args)]
pub(crate) struct DaemonArg {
    /// The daemon's configuration file (its `listen` address and `token_file` are used).
    #[arg(long, default_value = "/etc/syncproxy/proxy.toml")]
    config: PathBuf,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `proxy status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    daemon: DaemonArg,
}

/// Job commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum JobCommand {
    /// Run a configured job now (queued if it is running): exit 0 once the daemon accepted it.
    Run {
        /// The job's name, as in the configuration.
        name: String,
        #[command(flatten)]
        daemon: DaemonArg,
    },
}

/// How long the daemon may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The most of an answer read (the status of thousands of jobs fits many times over).
const MAX_ANSWER: u64 = 64 << 20;

/// The daemon's address, as a client reaches it (a wildcard listen address means this host),
/// and its token.
fn endpoint(arg: &DaemonArg) -> Result<(SocketAddr, String)> {
    let config = crate::serve::load(&arg.config)?;
    let mut addr: SocketAddr =
        config.proxy.listen.parse().with_context(|| format!("[proxy] listen in {}", arg.config.display()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok((addr, crate::serve::read_token(&config.proxy.token_file)?))
}

/// One request on its own connection: the status code and the body.
async fn call(addr: SocketAddr, token: &str, method: &str, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach the daemon at {addr} (is `proxy serve` running?)"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.context("sending the request")?;
        let mut answer = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut answer).await.context("reading the answer")?;
        Ok::<_, anyhow::Error>(answer)
    };
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("the daemon at {addr} did not answer within {ANSWER_TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").context("the daemon's answer has no end of headers")?;
    let code =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| {
            format!("the daemon's answer has no status: {:?}", head.lines().next().unwrap_or_default())
        })?;
    Ok((code, body.to_owned()))
}

/// What a finished run says in one line: its outcome, when, and why it failed.
fn last_run(last: &Value) -> String {
    if last.is_null() {
        return "never run".into();
    }
    let s = |k: &str| last.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let mut line = format!("{} at {}", s("outcome"), s("finished"));
    if let Some(e) = last.get("error").and_then(Value::as_str) {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// The status as a table.
fn print_status(v: &Value) {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "proxy {}, up since {}: {} VM(s) running, {} disk(s) copying",
        s(v, "proxy"),
        s(v, "started"),
        n("vms_running"),
        n("disks_copying")
    );
    let jobs = v.get("jobs").and_then(Value::as_array).cloned().unwrap_or_default();
    if jobs.is_empty() {
        println!("no jobs configured");
        return;
    }
    let rows: Vec<[String; 6]> = jobs
        .iter()
        .map(|j| {
            let state = if j.get("running").and_then(Value::as_bool).unwrap_or(false) { "running" } else { "idle" };
            [
                s(j, "name"),
                s(j, "schedule"),
                s(j, "target"),
                state.to_owned(),
                s(j, "next_run"),
                last_run(j.get("last").unwrap_or(&Value::Null)),
            ]
        })
        .collect();
    let header = ["JOB", "SCHEDULE", "TARGET", "STATE", "NEXT RUN", "LAST RUN"].map(str::to_owned);
    let mut width = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (w, cell) in width.iter().zip(row) {
            line.push_str(&format!("{cell:<w$}  "));
        }
        line.push_str(&row[5]);
        println!("{line}");
    }
}

pub(crate) fn status(args: &StatusArgs) -> ExitCode {
    crate::block_on("status", async {
        let (addr, token) = endpoint(&args.daemon)?;
        let (code, body) = call(addr, &token, "GET", "/status").await?;
        if code != 200 {
            bail!("the daemon answered {code}: {}", body.trim());
        }
        let v: Value = serde_json::from_str(&body).context("the daemon's status is not JSON")?;
        if args.daemon.json {
            println!("{v:#}");
        } else {
            print_status(&v);
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn job(command: &JobCommand) -> ExitCode {
    let JobCommand::Run { name, daemon } = command;
    crate::block_on("job run", async {
        let (addr, token) = endpoint(daemon)?;
        // The name goes into the path: refuse what would change its meaning there.
        if name.is_empty() || name.contains(['/', '?', '#', '%', ' ']) || name.chars().any(char::is_control) {
            bail!("{name:?} is not a job name");
        }
        let (code, body) = call(addr, &token, "POST", &format!("/jobs/{name}/run")).await?;
        match code {
            202 => {
                if daemon.json {
                    println!("{}", body.trim());
                } else {
                    println!("job {name} queued; `proxy status` shows when it ends");
                }
                Ok(ExitCode::SUCCESS)
            }
            404 => {
                let (_, status) = call(addr, &token, "GET", "/status").await?;
                let names: Vec<String> = serde_json::from_str::<Value>(&status)
                    .ok()
                    .and_then(|v| v.get("jobs").and_then(Value::as_array).cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|j| j.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect();
                bail!("the daemon has no job {name:?}; its jobs: {}", names.join(", "))
            }
            _ => bail!("the daemon answered {code}: {}", body.trim()),
        }
    })
}
