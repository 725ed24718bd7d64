//! `probe vddk --libdir DIR`: which VixDiskLib a folder holds and what it can do, and with
//! `--read FILE` how fast a local disk reads through it (the binding must never be the
//! bottleneck).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;
use vddk::{ConnectParams, Library, LibraryPath, OpenFlags};

/// Arguments of `probe vddk`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The VDDK folder (the one holding `lib64/`), or a folder holding the library itself.
    #[arg(long)]
    libdir: PathBuf,
    /// An InitEx configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read this local disk (a raw file, absolute path) through VDDK and report the speed.
    #[arg(long, value_name = "FILE")]
    read: Option<PathBuf>,
    /// Bytes per read request for --read.
    #[arg(long, default_value_t = 2 << 20)]
    request: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &Args) -> Result<()> {
    // First: VDDK loads its own libraries by bare name, so its folder must be on
    // LD_LIBRARY_PATH from process start; this re-executes once if it is not.
    let reexec = vddk::ensure_library_path(&args.libdir).context("cannot prepare LD_LIBRARY_PATH for VDDK")?;
    let lib = Library::load(&args.libdir)?;
    let (version, path, optional) = (lib.version(), lib.path().to_path_buf(), lib.optional_functions());
    let vddk = lib.init(args.config.as_deref())?;
    let transports = vddk.transport_modes();
    let mut report = json!({
        "library": path.display().to_string(),
        "version": version,
        "transports": transports,
        "optional_functions": optional.iter().map(|(n, p)| (n.to_string(), json!(p))).collect::<serde_json::Map<_, _>>(),
        "reexecuted": reexec == LibraryPath::Reexecuted,
        "ld_library_path": std::env::var("LD_LIBRARY_PATH").ok(),
    });
    if let Some(file) = &args.read {
        let file = std::fs::canonicalize(file).with_context(|| format!("cannot find {}", file.display()))?;
        let conn =
            vddk.connect(&ConnectParams { vm_moref: Some("local".into()), read_only: true, ..Default::default() })?;
        let disk =
            conn.open(file.to_str().context("non-UTF-8 path")?, OpenFlags { read_only: true, ..Default::default() })?;
        let capacity = disk.info().capacity();
        let request = (args.request / 512).max(1) * 512;
        let started = Instant::now();
        let mut buf = vec![0u8; usize::try_from(request)?];
        let mut at = 0;
        while at < capacity {
            let n = request.min(capacity - at);
            buf.resize(usize::try_from(n)?, 0);
            buf = disk.read(at / 512, buf)?;
            at += n;
        }
        let seconds = started.elapsed().as_secs_f64();
        report["read"] = json!({
            "file": file.display().to_string(),
            "bytes": capacity,
            "transport": disk.transport(),
            "seconds": seconds,
            "mb_per_second": capacity as f64 / 1e6 / seconds.max(1e-9),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("library:    {} (VDDK {version})", path.display());
        println!("transports: {transports}");
        for (name, present) in &optional {
            println!(
                "optional:   {name}: {}",
                if *present { "yes" } else { "no (allocation maps unavailable: full reads)" }
            );
        }
        if let Some(r) = report.get("read") {
            println!(
                "read:       {} bytes via {} in {:.2} s ({:.0} MB/s)",
                r["bytes"],
                r["transport"].as_str().unwrap_or(""),
                r["seconds"].as_f64().unwrap_or(0.0),
                r["mb_per_second"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
