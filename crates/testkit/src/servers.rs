//! NBD servers for tests: qemu-nbd and nbdkit processes on a Unix socket or 127.0.0.1,
//! killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// 127.0.0.1 on this port.
    Tcp(u16),
}

impl Listen {
    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        match self {
            Self::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Self::Tcp(port) => format!("nbd://127.0.0.1:{port}"),
        }
    }

    fn up(&self) -> bool {
        match self {
            Self::Unix(p) => p.exists() && std::os::unix::net::UnixStream::connect(p).is_ok(),
            Self::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(10809)
}

/// A server process, killed when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Where it listens.
    pub listen: Listen,
}

impl Server {
    /// The NBD URI of its export.
    pub fn uri(&self) -> String {
        self.listen.uri()
    }

    fn start(mut cmd: Command, listen: Listen) -> Self {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
        let mut server = Self { child, listen };
        let started = Instant::now();
        while !server.listen.up() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{cmd:?} exited with {status} before listening");
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{cmd:?} did not come up on {:?}", server.listen);
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// qemu-nbd (at `tool`) serving the raw `image`, writable, multi-conn, with extra args.
    pub fn qemu_nbd(tool: &Path, image: &Path, listen: Listen, extra: &[&str]) -> Self {
        let mut cmd = Command::new(tool);
        cmd.args(["-f", "raw", "--persistent", "--shared=8", "--cache=writeback"]).args(extra);
        match &listen {
            Listen::Unix(p) => cmd.arg("-k").arg(p),
            Listen::Tcp(port) => cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]),
        };
        cmd.arg(image);
        Self::start(cmd, listen)
    }

    /// nbdkit (at `tool`) with `args` (plugin, filters, parameters).
    pub fn nbdkit(tool: &Path, listen: Listen, args: &[&str]) -> Self {
        let mut cmd = Command::new(tool);
        cmd.arg("--foreground").arg("--exit-with-parent");
        match &listen {
            Listen::Unix(p) => cmd.arg("-U").arg(p),
            Listen::Tcp(port) => cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]),
        };
        cmd.args(args);
        Self::start(cmd, listen)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
