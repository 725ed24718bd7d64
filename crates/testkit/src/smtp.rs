//! A real SMTP server for e-mail tests: aiosmtpd (from PyPI, installed by `cargo xtask setup`
//! into `${XDG_CACHE_HOME:-~/.cache}/syncproxy-smtp`, or `$SYNCPROXY_SMTP_PYTHONPATH`), with
//! STARTTLS required, AUTH PLAIN only over TLS, and every accepted message saved as a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::TestPki;

/// The server, as a Python program: `PORT CERT KEY OUT USER PASSWORD`.
const SERVER: &str = r#"
import os, ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, out, user, password = sys.argv[1:7]

class Save:
    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(out, "%d.eml" % len(os.listdir(out)))
        head = "X-Envelope-From: %s\r\nX-Envelope-To: %s\r\n" % (envelope.mail_from, ",".join(envelope.rcpt_tos))
        with open(path + ".tmp", "wb") as f:
            f.write(head.encode() + envelope.original_content)
        os.rename(path + ".tmp", path)
        return "250 saved"

def auth(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
    return AuthResult(success=ok)

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
c = Controller(Save(), hostname="127.0.0.1", port=int(port), tls_context=ctx, require_starttls=True,
               authenticator=auth, auth_require_tls=True)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

/// Where aiosmtpd imports from, or None (after [`crate::skip`]) when it is not installed.
pub fn find(test: &str) -> Option<PathBuf> {
    let cache = crate::cache_dir().map(|c| c.join("syncproxy-smtp"));
    let path = std::env::var_os("SYNCPROXY_SMTP_PYTHONPATH").map(PathBuf::from).or(cache).unwrap_or_default();
    let ok = Command::new("python3")
        .env("PYTHONPATH", &path)
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        crate::skip(
            test,
            "aiosmtpd is not installed (`cargo xtask setup` installs it; or SYNCPROXY_SMTP_PYTHONPATH=DIR)",
        );
    }
    ok.then_some(path)
}

/// A running aiosmtpd on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct SmtpServer {
    child: Child,
    /// Its port.
    pub port: u16,
    out: PathBuf,
}

impl SmtpServer {
    /// Starts it in `dir` with the certificate of `pki`, taking the account `user`/`password`.
    pub fn start(pythonpath: &Path, dir: &Path, pki: &TestPki, user: &str, password: &str) -> Self {
        let out = dir.join("smtp-mail");
        std::fs::create_dir_all(&out).expect("the mail folder");
        let script = dir.join("smtp_server.py");
        std::fs::write(&script, SERVER).expect("the server script");
        let port = crate::servers::free_port();
        let mut child = Command::new("python3")
            .env("PYTHONPATH", pythonpath)
            .arg(&script)
            .arg(port.to_string())
            .args([&pki.cert, &pki.key, &out])
            .args([user, password])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting aiosmtpd");
        let mut ready = String::new();
        use std::io::BufRead;
        let stdout = child.stdout.take().expect("its stdout");
        let _ = std::io::BufReader::new(stdout).read_line(&mut ready);
        assert_eq!(ready.trim(), "ready", "aiosmtpd did not start");
        Self { child, port, out }
    }

    /// The messages it accepted, each with its envelope as `X-Envelope-*` lines first.
    pub fn messages(&self) -> Vec<String> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        names.iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect()
    }

    /// The messages, once there are `n` (or when `limit` has passed).
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<String> {
        let t = Instant::now();
        while self.messages().len() < n && t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.messages()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
