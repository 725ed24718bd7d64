//! A minimal client of QEMU's JSON line protocols on a Unix socket: QMP (capabilities,
//! commands, events skipped) and the guest agent's `guest-ping`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The longest reply line read (a `query-*` answer is a few kilobytes).
const MAX_LINE: usize = 1 << 20;

/// A QMP connection, past its greeting and capabilities negotiation.
pub(crate) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

async fn read_json_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<Value, String> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await.map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err("the connection closed".to_owned());
        }
        if line.len() > MAX_LINE {
            return Err("a reply line too long".to_owned());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&line).map_err(|e| format!("not JSON: {e}"));
    }
}

impl Qmp {
    /// Connects and negotiates; `limit` bounds the whole.
    pub(crate) async fn connect(path: &Path, limit: Duration) -> Result<Qmp, String> {
        tokio::time::timeout(limit, async {
            let stream =
                UnixStream::connect(path).await.map_err(|e| format!("connecting to {}: {e}", path.display()))?;
            let (r, writer) = stream.into_split();
            let mut q = Qmp { reader: BufReader::new(r), writer };
            let greeting = read_json_line(&mut q.reader).await?;
            if greeting.get("QMP").is_none() {
                return Err(format!("not a QMP greeting: {greeting}"));
            }
            q.execute("qmp_capabilities", None).await?;
            Ok(q)
        })
        .await
        .map_err(|_| "QMP did not answer in time".to_owned())?
    }

    /// Runs a command and returns its `return` value; an `error` is its description.
    pub(crate) async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).await.map_err(|e| format!("writing: {e}"))?;
        loop {
            let v = read_json_line(&mut self.reader).await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.get("desc").and_then(Value::as_str).unwrap_or("an error").to_owned());
            }
            // An asynchronous event: not the answer.
        }
    }

    /// [`Qmp::execute`] bounded by `limit`.
    pub(crate) async fn execute_within(
        &mut self,
        limit: Duration,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, String> {
        tokio::time::timeout(limit, self.execute(command, arguments))
            .await
            .map_err(|_| format!("QMP {command} did not answer within {} s", limit.as_secs_f64()))?
    }
}

/// One `guest-ping` to the guest agent on `path`: Ok when it answers within `limit`.
pub(crate) async fn guest_ping(path: &Path, limit: Duration) -> Result<(), String> {
    tokio::time::timeout(limit, async {
        let stream = UnixStream::connect(path).await.map_err(|e| format!("connecting: {e}"))?;
        let (r, mut w) = stream.into_split();
        let mut reader = BufReader::new(r);
        w.write_all(b"{\"execute\":\"guest-ping\"}\n").await.map_err(|e| format!("writing: {e}"))?;
        loop {
            let v = read_json_line(&mut reader).await?;
            if v.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("the agent answered with an error: {e}"));
            }
        }
    })
    .await
    .map_err(|_| "no answer".to_owned())?
}

/// Whether QEMU's `info usernet` shows an established guest connection to `guest_port`: the
/// proof that the guest answered, since the loopback side of a forward accepts before the
/// guest does.
pub(crate) fn usernet_established(info: &str, guest_port: u16) -> bool {
    info.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 6 && f[0] == "TCP[ESTABLISHED]" && f[5].parse() == Ok(guest_port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_forwards_from_info_usernet() {
        let info = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  \
                    TCP[HOST_FORWARD]  13       127.0.0.1 40022       10.0.2.15    22     0     0\r\n  \
                    TCP[SYN_SENT]      15       127.0.0.1 40022       10.0.2.15    80     0     0\r\n  \
                    TCP[ESTABLISHED]   16       127.0.0.1 40022       10.0.2.15    22     0     0\r\n";
        assert!(usernet_established(info, 22));
        assert!(!usernet_established(info, 80), "SYN_SENT: the guest has not answered");
        assert!(!usernet_established(info, 443));
        assert!(!usernet_established("", 22));
    }
}
