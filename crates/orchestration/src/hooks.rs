//! Freeze hooks around a VM's snapshot: a pre-freeze hook before it (a failure aborts that VM's
//! backup, with no snapshot taken) and a post-thaw hook after it (run whatever became of the
//! snapshot; a failure is reported loudly). A hook is a command run on the proxy (`sh -c`, the
//! VM named in its environment) or a program run in the guest through the guest operations API
//! (VMware Tools), with credentials from a file; both have a timeout, after which they are
//! ended and count as failed.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use vsphere::guest::GuestAuth;
use vsphere::{Client, Secret, Vm};

/// What a hook runs.
#[derive(Debug, Clone)]
pub enum HookAction {
    /// A command line run on the proxy through `sh -c`, with `SYNCPROXY_HOOK` (`pre-freeze` or
    /// `post-thaw`), `SYNCPROXY_VM`, `SYNCPROXY_VM_MOREF` and `SYNCPROXY_VM_UUID` set.
    Proxy(String),
    /// A program run in the guest as the account of `auth`.
    Guest {
        /// The program's path in the guest.
        program: String,
        /// Its arguments, as one string.
        arguments: String,
        /// The guest account.
        auth: GuestAuth,
    },
}

/// One hook.
#[derive(Debug, Clone)]
pub struct Hook {
    /// What it runs.
    pub action: HookAction,
    /// How long it may run.
    pub timeout: Duration,
}

/// A job's hooks.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Before the snapshot.
    pub pre_freeze: Option<Hook>,
    /// After the snapshot.
    pub post_thaw: Option<Hook>,
}

/// The most of a failing command's error output kept in its message.
const MAX_STDERR: usize = 2048;

/// Reads a guest account from a file: the user name on the first line, the password on the
/// second. Errors name the file, never its contents.
pub fn guest_credentials(path: &Path) -> Result<GuestAuth, String> {
    use std::io::Read as _;
    // Two short lines: a bound, so a wrong path such as /dev/zero cannot fill the memory.
    const MAX: u64 = 64 << 10;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX {
        return Err(format!("{}: larger than {} KiB: not a credentials file", path.display(), MAX >> 10));
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    let mut lines = text.lines();
    match (lines.next().map(str::trim).filter(|u| !u.is_empty()), lines.next()) {
        (Some(user), Some(password)) if !password.is_empty() => {
            Ok(GuestAuth { user: user.to_owned(), password: Secret::new(password) })
        }
        _ => {
            Err(format!("{}: expected the guest user on the first line and its password on the second", path.display()))
        }
    }
}

/// Runs `hook` for `vm` in `phase` (`pre-freeze` or `post-thaw`); `Err` says why it failed.
pub async fn run_hook(client: &Client, vm: &Vm, hook: &Hook, phase: &str) -> Result<(), String> {
    match &hook.action {
        HookAction::Proxy(command) => run_on_proxy(command, vm, phase, hook.timeout).await,
        HookAction::Guest { program, arguments, auth } => {
            match client.run_guest_program(&vm.moref, auth, program, arguments, hook.timeout).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("{program} exited with {code} in the guest")),
                Err(e) => Err(format!("{program} in the guest: {e}")),
            }
        }
    }
}

async fn run_on_proxy(command: &str, vm: &Vm, phase: &str, timeout: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("SYNCPROXY_HOOK", phase)
        .env("SYNCPROXY_VM", &vm.name)
        .env("SYNCPROXY_VM_MOREF", &vm.moref.value)
        .env("SYNCPROXY_VM_UUID", vm.instance_uuid.as_deref().unwrap_or(""))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let mut stderr = child.stderr.take();
    let run = async {
        let mut err = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(MAX_STDERR as u64 * 4).read_to_end(&mut err).await;
        }
        (child.wait().await, err)
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(format!("`{command}` ran longer than {timeout:?}: killed")),
        Ok((Err(e), _)) => Err(format!("`{command}`: {e}")),
        Ok((Ok(status), _)) if status.success() => Ok(()),
        Ok((Ok(status), err)) => {
            let text = String::from_utf8_lossy(&err);
            let tail: String =
                text.trim().chars().rev().take(MAX_STDERR).collect::<Vec<_>>().into_iter().rev().collect();
            Err(format!(
                "`{command}` failed ({status}){}",
                if tail.is_empty() { String::new() } else { format!(": {tail}") }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_file_is_read_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
        let e = guest_credentials(&big).unwrap_err();
        assert!(e.contains("larger than 64 KiB") && e.contains("big"), "{e}");
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "root\npw\n").unwrap();
        assert_eq!(guest_credentials(&ok).unwrap().user, "root");
    }
}
