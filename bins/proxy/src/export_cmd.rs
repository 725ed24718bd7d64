//! `proxy export`: instant recovery. Serves the disks of a restore point (or of a replica) over
//! NBD, named by slot, until Ctrl-C or SIGTERM; prints each disk's NBD URI. Read-only unless
//! `--writable`, which puts a copy-on-write overlay per disk in a temporary folder apart from
//! the repository and the replica; at stop the overlays are stored as a new restore point
//! (`--commit`) or discarded. With `--tls-cert`/`--tls-key` every client must speak TLS
//! (`nbds://` URIs), with client certificates from `--tls-client-ca` when given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use instant::{CacheConfig, FileExport, Overlay, PointExport};
use nbd_wire::server::{ExportSource, Server, ServerConfig};

use crate::repo_cmd::{self, RepoArg};
use crate::server_args::secret_file_warning;
use crate::size;

/// Options of `proxy export`.
#[derive(Debug, clap::Args)]
#[command(override_usage = "proxy export [OPTIONS] REPO POINT (--socket PATH | --listen ADDR)\n       \
                            proxy export [OPTIONS] --replica PATH (--socket PATH | --listen ADDR)")]
pub(crate) struct Args {
    #[command(flatten)]
    repo: Option<RepoArg>,
    /// The restore point: its ID, or `latest`.
    #[arg(requires = "repo")]
    point: Option<String>,
    /// Serve a replica instead: one VM's replica folder (its disks) or one disk file or device.
    #[arg(long, conflicts_with_all = ["repo", "point", "commit"], required_unless_present = "point")]
    replica: Option<PathBuf>,
    /// Serve only this disk: its slot (`scsi0:0`) or its position (`0`); repeatable. All by
    /// default.
    #[arg(long)]
    disk: Vec<String>,
    /// Listen on a new Unix socket at this path (removed at stop).
    #[arg(long, required_unless_present = "listen", conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on TCP at this address (`127.0.0.1:10809`; port 0 picks one). Without TLS,
    /// anything but a loopback address needs --allow-remote, and the disks then cross the
    /// network unencrypted and unauthenticated.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Allow --listen on an address other than loopback without TLS (anyone who can reach it
    /// reads the disks).
    #[arg(long)]
    allow_remote: bool,
    /// Serve over TLS with this certificate chain (PEM): every client must start TLS before
    /// anything else, and a non-loopback --listen needs no --allow-remote.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert; a warning when others may read it.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require TLS clients to present a certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Take writes, into a copy-on-write overlay per disk (never into the repository or the
    /// replica); discarded at stop unless --commit.
    #[arg(long)]
    writable: bool,
    /// At stop, store what the overlays show as a new restore point whose parent is POINT
    /// (only written chunks are stored) and print its ID.
    #[arg(long, requires = "writable")]
    commit: bool,
    /// Where the overlays go (default: the system's temporary folder); never inside the
    /// repository or the replica.
    #[arg(long, requires = "writable")]
    overlay_dir: Option<PathBuf>,
    /// Decoded chunks kept in memory, per disk.
    #[arg(long, default_value = "64M", value_parser = size::parse)]
    cache: u64,
    /// Chunks fetched ahead when reads are sequential.
    #[arg(long, default_value_t = 4)]
    read_ahead: usize,
    /// Serve a replica disk whose last sync did not complete (it mixes two points in time).
    #[arg(long)]
    allow_inconsistent: bool,
    /// Print the exports (and at stop, the outcome) as JSON lines.
    #[arg(long)]
    json: bool,
}

/// Overlays track writes by blocks of this size (a write of part of one copies it first).
const OVERLAY_BLOCK: u32 = 64 << 10;

/// One disk being served.
struct Served {
    name: String,
    index: usize,
    export: Arc<dyn ExportSource>,
    point: Option<PointExport>,
    overlay: Option<Arc<Overlay>>,
}

pub(crate) fn run(args: &Args) -> ExitCode {
    crate::block_on("export", serve(args))
}

/// Which of `names` `--disk` chooses (all when it chooses none): by name, else by position.
fn choose(names: &[String], wanted: &[String]) -> Result<Vec<usize>> {
    if wanted.is_empty() {
        return Ok((0..names.len()).collect());
    }
    let mut out = Vec::new();
    for w in wanted {
        let n = match names.iter().position(|n| n == w) {
            Some(n) => n,
            None => match w.parse::<usize>() {
                Ok(n) if n < names.len() => n,
                _ => bail!("there is no disk {w:?} (the disks: {})", names.join(", ")),
            },
        };
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// `s` escaped for an NBD URI's path or query (RFC 3986 unreserved characters, `:` and `/`
/// stay).
fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The TLS configuration of `--tls-cert`, `--tls-key` and `--tls-client-ca`, if given; warns
/// when the key file may be read by others. Errors name the files, never what is in them.
fn tls_config(args: &Args) -> Result<Option<Arc<nbd_wire::rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    if let Some(w) = secret_file_warning(key, "TLS key") {
        eprintln!("proxy export: WARNING: {w}");
    }
    let config = nbd_wire::tls::server_config(cert, key, args.tls_client_ca.as_deref())?;
    Ok(Some(config))
}

/// Refuses an overlay folder inside `protected` (the repository or the replica).
fn check_apart(overlay_dir: &Path, protected: &Path) -> Result<()> {
    let (o, p) = (std::fs::canonicalize(overlay_dir), std::fs::canonicalize(protected));
    if let (Ok(o), Ok(p)) = (o, p) {
        let p = if p.is_dir() { p } else { p.parent().map(Path::to_path_buf).unwrap_or(p) };
        if o.starts_with(&p) {
            bail!("the overlay folder {} is inside {}: overlays never go there", o.display(), p.display());
        }
    }
    Ok(())
}

async fn serve(args: &Args) -> Result<ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    if let Some(a) = args.listen
        && !a.ip().is_loopback()
        && !args.allow_remote
        && args.tls_cert.is_none()
    {
        bail!("--listen {a} is not a loopback address: that needs TLS (--tls-cert, --tls-key) or --allow-remote");
    }
    let tls = tls_config(args)?;
    let cache = CacheConfig { max_bytes: args.cache, read_ahead_chunks: args.read_ahead };
    let overlay_dir = args.overlay_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut disks: Vec<Served> = Vec::new();
    // Held while serving: no gc removes a chunk of the point meanwhile.
    let mut _lock = None;
    let mut origin = None;
    match (&args.repo, &args.point, &args.replica) {
        (Some(r), Some(point), None) => {
            let repo = r.open()?;
            let id = repo_cmd::point_id(&repo, point)?;
            _lock = Some(repo.lock(repo::LockKind::Shared, &format!("export of {id}"))?);
            let m = repo.point(&id)?;
            if args.writable && !r.repo.contains("://") {
                check_apart(&overlay_dir, Path::new(&r.repo))?;
            }
            let names: Vec<String> = m.disks.iter().map(|d| d.name.clone()).collect();
            for n in choose(&names, &args.disk)? {
                let p = PointExport::open(&repo, &id, n, cache)?;
                disks.push(Served {
                    name: names[n].clone(),
                    index: n,
                    export: Arc::new(p.clone()),
                    point: Some(p),
                    overlay: None,
                });
            }
            origin = Some((repo, id));
        }
        (None, None, Some(path)) => {
            let found = instant::replica_disks(path)?;
            let names: Vec<String> = found.iter().map(|d| d.name.clone()).collect();
            for n in choose(&names, &args.disk)? {
                let d = &found[n];
                if let Some(why) = d.inconsistent() {
                    if !args.allow_inconsistent {
                        bail!("{why}; --allow-inconsistent serves it anyway");
                    }
                    eprintln!("proxy export: warning: {why}");
                }
                if args.writable {
                    check_apart(&overlay_dir, &d.path)?;
                }
                let export: Arc<dyn ExportSource> = Arc::new(FileExport::open(&d.path)?);
                disks.push(Served { name: d.name.clone(), index: n, export, point: None, overlay: None });
            }
        }
        _ => bail!("name a repository and a restore point, or --replica PATH"),
    }
    if args.writable {
        for d in &mut disks {
            let o = Arc::new(Overlay::new(d.export.clone(), &overlay_dir, OVERLAY_BLOCK)?);
            d.export = o.clone();
            d.overlay = Some(o);
        }
    }
    let tls_required = tls.is_some();
    let config = ServerConfig { allow_remote: args.allow_remote, tls, tls_required, ..ServerConfig::default() };
    let scheme = if tls_required { "nbds" } else { "nbd" };
    let server = Server::new(config, disks.iter().map(|d| (d.name.clone(), d.export.clone())).collect());
    let uri_of: Box<dyn Fn(&str) -> String> = match (&args.socket, args.listen) {
        (Some(path), _) => {
            server.serve_unix(path).await.with_context(|| format!("listening on {}", path.display()))?;
            let socket = escape(&path.display().to_string());
            Box::new(move |name| format!("{scheme}+unix:///{}?socket={socket}", escape(name)))
        }
        (None, Some(addr)) => {
            let bound = server.serve_tcp(addr).await.with_context(|| format!("listening on {addr}"))?;
            Box::new(move |name| format!("{scheme}://{bound}/{}", escape(name)))
        }
        (None, None) => bail!("--socket PATH or --listen ADDR"),
    };
    for d in &disks {
        let uri = uri_of(&d.name);
        if args.json {
            println!(
                "{}",
                serde_json::json!({"disk": d.name, "index": d.index, "uri": uri, "size": d.export.size(),
                "writable": d.overlay.is_some()})
            );
        } else {
            println!(
                "disk {} ({} bytes{}): {uri}",
                d.name,
                d.export.size(),
                if d.overlay.is_some() { ", writable" } else { ", read-only" }
            );
        }
    }
    if !args.json {
        println!("serving until Ctrl-C or SIGTERM");
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    server.shutdown().await;
    let mut code = ExitCode::SUCCESS;
    for d in &disks {
        let failed = d.point.as_ref().map(PointExport::failed_chunks).unwrap_or_default();
        for f in &failed {
            eprintln!(
                "proxy export: disk {}: chunk {} (at {}) failed verification: {}",
                d.name, f.chunk, f.offset, f.reason
            );
        }
        if !failed.is_empty() {
            code = ExitCode::FAILURE;
        }
    }
    let overlays: Vec<(usize, &Overlay)> =
        disks.iter().filter_map(|d| d.overlay.as_deref().map(|o| (d.index, o))).collect();
    let written: u64 = overlays.iter().map(|(_, o)| o.written().total_bytes()).sum();
    match (&origin, args.commit) {
        (Some((repo, id)), true) => {
            let m = instant::commit(repo, id, &overlays).await.context("storing the overlays")?;
            if args.json {
                println!("{}", serde_json::json!({"committed": m.id, "parent": id, "written": written}));
            } else {
                println!("stored the overlays ({written} bytes written) as restore point {} (parent {id})", m.id);
            }
        }
        _ if args.writable => {
            if args.json {
                println!("{}", serde_json::json!({"discarded": written}));
            } else {
                println!("discarded the overlays: {written} bytes written were not kept (--commit keeps them)");
            }
        }
        _ => {}
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_chosen_by_slot_or_position() {
        let names: Vec<String> = ["scsi0:0", "scsi0:1", "nvme0:0"].map(String::from).to_vec();
        assert_eq!(choose(&names, &[]).unwrap(), [0, 1, 2]);
        assert_eq!(choose(&names, &["nvme0:0".into(), "1".into(), "scsi0:1".into()]).unwrap(), [2, 1]);
        assert!(choose(&names, &["3".into()]).is_err());
        assert!(choose(&names, &["sata0:0".into()]).is_err());
    }

    #[test]
    fn uris_escape_what_they_must() {
        assert_eq!(escape("scsi0:0"), "scsi0:0");
        assert_eq!(escape("/tmp/a b/s?.sock"), "/tmp/a%20b/s%3F.sock");
        let uri = format!("nbd+unix:///{}?socket={}", escape("my disk"), escape("/tmp/x y.sock"));
        let parsed = nbd_wire::Uri::parse(&uri).unwrap();
        assert_eq!(parsed.export, "my disk");
        assert_eq!(parsed.target, nbd_wire::Target::Unix("/tmp/x y.sock".into()));
    }
}
