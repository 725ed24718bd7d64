//! govmomi's vSphere simulator (vcsim), built from `tests/peers/vcsim/` by `cargo xtask setup`,
//! as a process for conformance tests: started on a free port, stopped with SIGTERM when dropped
//! (SIGKILL would leave its datastore folders behind).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Where the vcsim binary is: `$SYNCPROXY_VCSIM`, else the cache folder `cargo xtask setup` builds
/// it in. Skips the test (fails it under `CI=true`) when there is none.
pub fn find(test: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SYNCPROXY_VCSIM").map(PathBuf::from),
        std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("vcsim/vcsim")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vcsim/vcsim")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    if found.is_none() {
        crate::skip(test, "vcsim is not built (`cargo xtask setup` builds tests/peers/vcsim/; or set SYNCPROXY_VCSIM)");
    }
    found
}

/// A running vcsim.
#[derive(Debug)]
pub struct Vcsim {
    child: Child,
    /// `https://127.0.0.1:PORT/sdk` (no credentials in it).
    pub url: String,
}

impl Vcsim {
    /// Starts `bin` with `args` (`-tlscert`, `-username`, `-esx`, ...) on a free port.
    pub fn start(bin: &std::path::Path, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(["-l", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let out = child.stdout.take().expect("vcsim stdout");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("reading vcsim's first line");
        // export GOVC_URL=https://user:pass@127.0.0.1:PORT/sdk GOVC_SIM_PID=PID
        let raw = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("GOVC_URL="))
            .unwrap_or_else(|| panic!("vcsim printed {line:?}, not its URL"));
        let (scheme, rest) = raw.split_once("://").expect("a URL");
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        Self { child, url: format!("{scheme}://{rest}") }
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
