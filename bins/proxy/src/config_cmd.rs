//! `proxy config check FILE`: validates a `proxy serve` configuration without running anything
//! that touches vSphere: the file itself, then what the proxy can check locally (the token, the
//! password files or variables, the CA files, the key files, the targets), and prints what each
//! job would do and when it runs next.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use orchestration::config::Schedule;

use crate::serve::{load, open_target, read_token};

/// Configuration commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a configuration file: exit 0 when it is usable, 1 naming every problem when not.
    Check {
        /// The file.
        file: PathBuf,
    },
}

pub(crate) fn run(cmd: &ConfigCommand) -> ExitCode {
    let ConfigCommand::Check { file } = cmd;
    let config = match load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy config check: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut problems = Vec::new();
    if let Err(e) = read_token(&config.proxy.token_file) {
        problems.push(format!("[proxy] token_file: {e:#}"));
    }
    for v in &config.vcenters {
        if let Some(f) = &v.password_file
            && let Err(e) = vsphere::Secret::from_file(f)
        {
            problems.push(format!("[[vcenter]] {:?}: {e}", v.name));
        }
        if let Some(var) = &v.password_env
            && std::env::var(var).map_or(true, |p| p.is_empty())
        {
            problems.push(format!("[[vcenter]] {:?}: the environment variable {var} is not set", v.name));
        }
        if let Some(ca) = &v.ca_file
            && !ca.is_file()
        {
            problems.push(format!("[[vcenter]] {:?}: no CA file {}", v.name, ca.display()));
        }
    }
    let now = SystemTime::now();
    let mut lines = Vec::new();
    for j in &config.jobs {
        if let Err(e) = open_target(j) {
            problems.push(format!("[[job]] {:?}: its target cannot be opened: {e:#}", j.name));
        }
        let next = Schedule::parse(&j.schedule).map(|s| s.next_after(now, now)).unwrap_or(now);
        let what = match (&j.repository, &j.replica) {
            (Some(r), _) => format!("backs up to {r}"),
            (_, Some(d)) => format!("replicates into {}", d.display()),
            _ => String::new(),
        };
        let vms = if j.all { "every VM".to_owned() } else { j.vms.join(", ") };
        lines.push(format!(
            "job {}: {what} from {} ({vms}), {}; next run {}",
            j.name,
            j.vcenter,
            j.schedule,
            humantime::format_rfc3339_seconds(next)
        ));
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("proxy config check: {p}");
        }
        return ExitCode::FAILURE;
    }
    for l in lines {
        println!("{l}");
    }
    println!("{}: usable ({} vCenter(s), {} job(s))", file.display(), config.vcenters.len(), config.jobs.len());
    ExitCode::SUCCESS
}
