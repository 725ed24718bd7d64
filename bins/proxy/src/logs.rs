//! The one log subscriber every command installs, on stderr: filtered by `SYNCPROXY_LOG`
//! (`warn`, `info`, `orchestration=debug`...), JSON lines when `SYNCPROXY_LOG_FORMAT=json` (or the
//! daemon's `log_format = "json"`), colours only when stderr is a terminal.

use std::io::IsTerminal;

/// Installs the subscriber: `default` is the level when `SYNCPROXY_LOG` is unset; `json` asks
/// for JSON lines whatever the environment says.
pub(crate) fn init(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let json = json || std::env::var("SYNCPROXY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
