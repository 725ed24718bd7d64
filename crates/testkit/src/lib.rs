//! Helpers for tests across the workspace: outside tools that a test needs (fail under CI,
//! skip loudly elsewhere), NBD servers, running commands, and comparing files. Dev-dependency
//! only.

pub mod bootdisk;
pub mod pki;
pub mod s3;
pub mod servers;
pub mod smtp;
pub mod vcsim;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Finds an outside tool a test needs. Under `CI=true` a missing tool fails the test (CI
/// installs it); elsewhere the test is skipped loudly, and counted: the skip is appended to the
/// file named by `SYNCPROXY_SKIP_LOG` when set (`cargo xtask ci` sets it and reports the count).
pub fn require_tool(tool: &str, test: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file());
    if found.is_none() {
        skip(test, &format!("`{tool}` is not installed"));
    }
    found
}

/// Skips a test for want of something outside it (a tool, a loop device): under `CI=true` this
/// fails the test instead, since CI provides everything; elsewhere it says so loudly and is
/// counted (appended to the file named by `SYNCPROXY_SKIP_LOG`). The caller returns after it.
pub fn skip(test: &str, why: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: {why}, and under CI=true nothing may be skipped");
    eprintln!("SKIPPED {test}: {why}");
    if let Some(log) = std::env::var_os("SYNCPROXY_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// Writes a sparse image of `size` bytes at `path`: pseudo-random data (from `seed`) in about
/// half of its MiBs, chosen pseudo-randomly, holes in the rest. Returns the bytes of data.
pub fn sparse_image(path: &Path, size: u64, seed: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(size).expect("sizing the image");
    let mut x = seed | 1;
    let mut data = 0;
    for i in 0..size / MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(2) {
            let tag = (i ^ x).to_le_bytes()[0];
            let block: Vec<u8> = (0..MIB).map(|j| j.to_le_bytes()[0] ^ tag | 1).collect();
            f.write_all_at(&block, i * MIB).expect("writing the image");
            data += MIB;
        }
    }
    data
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether two files have the same bytes (compared in 4 MiB pieces; holes read as zeros).
pub fn same_contents(a: &Path, b: &Path) -> std::io::Result<Result<(), String>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Ok(Err(format!("{} is {la} bytes, {} is {lb}", a.display(), b.display())));
    }
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < la {
        let n = (la - off).min(4 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            return Ok(Err(format!("{} and {} differ at byte {}", a.display(), b.display(), off + i as u64)));
        }
        off += n as u64;
    }
    Ok(Ok(()))
}

/// Polls futures together until all are done (a tiny `join_all`, so tests need no futures
/// dependency); whatever requests they make are in flight at once.
pub async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// `len` pseudo-random bytes from `seed` (xorshift): data that neither compresses nor
/// deduplicates, the same on every run.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The random moments of a kill loop: a small xorshift seeded from the clock, its seed printed
/// so a failing run can be replayed with `SYNCPROXY_KILL_SEED`.
#[derive(Debug)]
pub struct KillRng(u64);

impl KillRng {
    /// Seeded from `SYNCPROXY_KILL_SEED`, else the clock.
    pub fn new() -> Self {
        let seed = std::env::var("SYNCPROXY_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::from(d.subsec_nanos()) ^ d.as_secs())
                | 1
        });
        eprintln!("kill loop seed: {seed} (SYNCPROXY_KILL_SEED replays it)");
        Self(seed)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

impl Default for KillRng {
    fn default() -> Self {
        Self::new()
    }
}

/// How many kills a loop makes: `SYNCPROXY_KILLS` (at least 1), else `default`.
pub fn kills(default: u64) -> u64 {
    std::env::var("SYNCPROXY_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(default).max(1)
}

/// The cache folder `cargo xtask setup` installs peers into: `$XDG_CACHE_HOME` when set and
/// not empty, else `~/.cache` (None without either).
pub fn cache_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|c| !c.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
}

/// Every file under `dir`, in no particular order (none when `dir` is missing).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}
