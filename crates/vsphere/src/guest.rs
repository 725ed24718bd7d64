//! Programs run inside a guest through the guest operations API (VMware Tools): start one,
//! follow it to its exit code, end it. For freeze scripts around a snapshot. The guest
//! account's password is a `Secret`: it goes only into the SOAP body, never into errors.

use std::time::Duration;

use crate::error::Error;
use crate::session::{Client, Secret};
use crate::soap::{MoRef, Request};

/// A guest account.
#[derive(Debug, Clone)]
pub struct GuestAuth {
    /// Its user name.
    pub user: String,
    /// Its password.
    pub password: Secret,
}

/// Where a guest program stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestProcess {
    /// Still running.
    Running,
    /// Ended with this exit code.
    Exited(i32),
    /// The guest no longer lists it.
    Gone,
}

fn auth(req: &mut Request, a: &GuestAuth) {
    req.open("auth", Some("NamePasswordAuthentication"))
        .text("interactiveSession", false)
        .text("username", &a.user)
        .text("password", a.password.expose())
        .close("auth");
}

impl Client {
    async fn process_manager(&self) -> Result<MoRef, Error> {
        let gom = self
            .content()
            .guest_operations_manager
            .clone()
            .ok_or_else(|| Error::Protocol("the server has no guest operations manager".into()))?;
        self.property(&gom, "processManager")
            .await?
            .as_ref()
            .and_then(MoRef::from_element)
            .ok_or_else(|| Error::Protocol("the guest operations manager has no process manager".into()))
    }

    /// Starts `program` with `arguments` in `vm`'s guest; returns its pid.
    pub async fn start_guest_program(
        &self,
        vm: &MoRef,
        who: &GuestAuth,
        program: &str,
        arguments: &str,
    ) -> Result<i64, Error> {
        let pm = self.process_manager().await?;
        let mut req = Request::new("StartProgramInGuest", &pm);
        req.moref("vm", vm);
        auth(&mut req, who);
        req.open("spec", Some("GuestProgramSpec")).text("programPath", program).text("arguments", arguments);
        req.close("spec");
        let r = self.invoke(req).await?;
        r.child("returnval")
            .and_then(|v| v.text.trim().parse().ok())
            .ok_or_else(|| Error::Protocol(format!("StartProgramInGuest on {vm} returned no pid")))
    }

    /// Where guest program `pid` stands.
    pub async fn guest_process(&self, vm: &MoRef, who: &GuestAuth, pid: i64) -> Result<GuestProcess, Error> {
        let pm = self.process_manager().await?;
        let mut req = Request::new("ListProcessesInGuest", &pm);
        req.moref("vm", vm);
        auth(&mut req, who);
        req.text("pids", pid);
        let r = self.invoke(req).await?;
        let Some(p) = r.children_named("returnval").find(|p| p.parse_of::<i64>("pid") == Some(pid)) else {
            return Ok(GuestProcess::Gone);
        };
        if p.child("endTime").is_none() {
            return Ok(GuestProcess::Running);
        }
        Ok(GuestProcess::Exited(p.parse_of("exitCode").unwrap_or(-1)))
    }

    /// Ends guest program `pid`.
    pub async fn terminate_guest_process(&self, vm: &MoRef, who: &GuestAuth, pid: i64) -> Result<(), Error> {
        let pm = self.process_manager().await?;
        let mut req = Request::new("TerminateProcessInGuest", &pm);
        req.moref("vm", vm);
        auth(&mut req, who);
        req.text("pid", pid);
        self.invoke(req).await.map(|_| ())
    }

    /// Runs `program` in the guest to its end, at most `timeout` (then it is ended and this
    /// fails); returns its exit code.
    pub async fn run_guest_program(
        &self,
        vm: &MoRef,
        who: &GuestAuth,
        program: &str,
        arguments: &str,
        timeout: Duration,
    ) -> Result<i32, Error> {
        let pid = self.start_guest_program(vm, who, program, arguments).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wait = Duration::from_millis(100);
        loop {
            match self.guest_process(vm, who, pid).await? {
                GuestProcess::Exited(code) => return Ok(code),
                GuestProcess::Gone => {
                    return Err(Error::Protocol(format!(
                        "{program} (pid {pid}) vanished from the guest's process list"
                    )));
                }
                GuestProcess::Running if tokio::time::Instant::now() >= deadline => {
                    let _ = self.terminate_guest_process(vm, who, pid).await;
                    return Err(Error::Protocol(format!("{program} ran longer than {timeout:?} in the guest: ended")));
                }
                GuestProcess::Running => {
                    tokio::time::sleep(wait.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
