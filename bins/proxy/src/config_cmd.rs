//! `proxy config check FILE`: validates a `proxy serve` configuration without side effects
//! (it creates no folder and contacts nothing: no vCenter, no S3): the file itself, then what
//! the proxy can check locally (the token, the password files or variables, the CA files, the
//! targets and drilled, verified or copied repositories that already exist), naming every problem in one pass,
//! warning about secret files others may read, and printing what each job and drill would do
//! and when it runs next.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use orchestration::config::{JobConfig, Schedule};
use repo::{Location, Repo, RepoKey, S3Config};

use crate::serve::{load_with_problems, read_token, secret_file_warnings};
use crate::server_args::read_secret_file;

/// Configuration commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a configuration file without side effects: exit 0 when it is usable, 1 naming
    /// every problem when not.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print a systemd drop-in that lets the service write every folder the configuration
    /// names (its state, local repositories, replica folders), for
    /// `/etc/systemd/system/syncproxy-proxy.service.d/paths.conf`.
    SystemdPaths {
        /// The file.
        file: PathBuf,
    },
}

/// A folder that must be a directory if it exists (serve creates it when it does not).
fn folder_problem(path: &Path) -> Option<String> {
    (path.exists() && !path.is_dir()).then(|| format!("{} exists and is not a folder", path.display()))
}

/// What is wrong with the repository at `url` (a job's target or a drill's source), looked at
/// without creating or contacting anything.
fn repository_problem(url: &str, key_file: Option<&Path>) -> Option<String> {
    if url.starts_with("s3://") {
        // Opening it would contact the bucket; serve reports it at the first run.
        return None;
    }
    if url.contains("://") {
        return Some(format!("{url}: repositories are a local path or s3://"));
    }
    if !Path::new(url).is_dir() {
        return Some(format!("no repository at {url} (create it with proxy repo init)"));
    }
    // Opening an existing local repository only reads it.
    let key = match key_file.map(RepoKey::from_file).transpose() {
        Ok(k) => k,
        Err(e) => return Some(format!("key_file: {e}")),
    };
    let location = Location { url: url.to_owned(), s3: S3Config::default(), key };
    Repo::open_at(&location).err().map(|e| e.to_string())
}

/// What is wrong with a job's target, looked at without creating or contacting anything.
fn target_problem(job: &JobConfig) -> Option<String> {
    match &job.repository {
        Some(url) => repository_problem(url, job.key_file.as_deref()),
        None => job.replica.as_deref().and_then(folder_problem),
    }
}

/// When `schedule` next runs from now, as the listing says it.
fn next_run(schedule: &str, now: SystemTime) -> String {
    let next = Schedule::parse(schedule).map(|s| s.next_after(now, now)).unwrap_or(now);
    humantime::format_rfc3339_seconds(next).to_string()
}

/// The drop-in of `config systemd-paths`.
fn systemd_paths(file: &Path) -> ExitCode {
    let config = match load_with_problems(file) {
        Ok((c, problems)) if problems.is_empty() => c,
        Ok(_) => {
            eprintln!("proxy config systemd-paths: {} has problems: run proxy config check on it", file.display());
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("proxy config systemd-paths: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (plain, spaced): (Vec<String>, Vec<String>) =
        config.written_paths().iter().map(|p| p.display().to_string()).partition(|p| !p.contains(char::is_whitespace));
    for p in &spaced {
        eprintln!("proxy config systemd-paths: warning: {p:?} has white space; add it to the drop-in by hand, quoted");
    }
    let paths: Vec<String> = plain.iter().map(|p| format!("-{p}")).collect();
    println!(
        "# The folders {} writes to; made by `syncproxy-proxy config systemd-paths`.\n\
         # A leading - lets the service start while a folder does not exist yet.\n[Service]\nReadWritePaths={}",
        file.display(),
        paths.join(" ")
    );
    ExitCode::SUCCESS
}

pub(crate) fn run(cmd: &ConfigCommand) -> ExitCode {
    let file = match cmd {
        ConfigCommand::Check { file } => file,
        ConfigCommand::SystemdPaths { file } => return systemd_paths(file),
    };
    let (config, mut problems) = match load_with_problems(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy config check: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = read_token(&config.proxy.token_file) {
        problems.push(format!("[proxy] token_file: {e:#}"));
    }
    if let Some(p) = folder_problem(&config.proxy.state_dir) {
        problems.push(format!("[proxy] state_dir: {p}"));
    }
    for v in &config.vcenters {
        if let Some(f) = &v.password_file
            && let Err(e) = read_secret_file(f, "password file")
        {
            problems.push(format!("[[vcenter]] {:?}: {e:#}", v.name));
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
        if let Some(p) = target_problem(j) {
            problems.push(format!("[[job]] {:?}: its target cannot be used: {p}", j.name));
        }
        let what = match (&j.repository, &j.replica) {
            (Some(r), _) if r.starts_with("s3://") => format!("backs up to {r} (not contacted by this check)"),
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
            next_run(&j.schedule, now)
        ));
    }
    for d in &config.drills {
        if let Some(p) = repository_problem(&d.repository, d.key_file.as_deref()) {
            problems.push(format!("[[drill]] {:?}: its repository cannot be used: {p}", d.name));
        }
        let from = if d.repository.starts_with("s3://") { " (not contacted by this check)" } else { "" };
        let vms = if d.vms.is_empty() { "every VM".to_owned() } else { d.vms.join(", ") };
        lines.push(format!(
            "drill {}: boots the newest point of {vms} in {}{from}, {}; next run {}",
            d.name,
            d.repository,
            d.schedule,
            next_run(&d.schedule, now)
        ));
    }
    for n in &config.notify {
        let secrets = [
            (n.token_file.as_deref(), "notify token file"),
            (n.email.as_ref().and_then(|e| e.password_file.as_deref()), "SMTP password file"),
        ];
        for (f, what) in secrets {
            if let Some(f) = f
                && let Err(e) = read_secret_file(f, what)
            {
                problems.push(format!("[[notify]] {:?}: {e:#}", n.name));
            }
        }
        if let Some(ca) = n.email.as_ref().and_then(|e| e.ca_file.as_ref())
            && !ca.is_file()
        {
            problems.push(format!("[[notify]] {:?}: no CA file {}", n.name, ca.display()));
        }
    }
    let not_contacted = |url: &str| if url.starts_with("s3://") { " (not contacted by this check)" } else { "" };
    for v in &config.verifies {
        if let Some(p) = repository_problem(&v.repository, v.key_file.as_deref()) {
            problems.push(format!("[[verify]] {:?}: its repository cannot be used: {p}", v.name));
        }
        lines.push(format!(
            "verify {}: reads back every chunk of {}{}, {}; next run {}",
            v.name,
            v.repository,
            not_contacted(&v.repository),
            v.schedule,
            next_run(&v.schedule, now)
        ));
    }
    for c in &config.copies {
        if let Some(p) = repository_problem(&c.repository, c.key_file.as_deref()) {
            problems.push(format!("[[copy]] {:?}: its repository cannot be used: {p}", c.name));
        }
        // The destination is made by the first run: only a local path that is not a folder,
        // or a folder that is not a repository, is wrong now.
        if !c.to.starts_with("s3://")
            && Path::new(&c.to).exists()
            && let Some(p) = repository_problem(&c.to, c.to_key_file.as_deref())
        {
            problems.push(format!("[[copy]] {:?}: its destination cannot be used: {p}", c.name));
        }
        let keeps = match &c.retention {
            Some(_) => "keeping its own retention",
            None => "keeping every point",
        };
        lines.push(format!(
            "copy {}: copies {}{} to {}{}, {keeps}, {}; next run {}",
            c.name,
            c.repository,
            not_contacted(&c.repository),
            c.to,
            not_contacted(&c.to),
            c.schedule,
            next_run(&c.schedule, now)
        ));
    }
    for w in secret_file_warnings(&config) {
        eprintln!("proxy config check: warning: {w}");
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
    println!(
        "{}: usable ({} vCenter(s), {} job(s), {} drill(s), {} verify and {} copy job(s))",
        file.display(),
        config.vcenters.len(),
        config.jobs.len(),
        config.drills.len(),
        config.verifies.len(),
        config.copies.len()
    );
    ExitCode::SUCCESS
}
