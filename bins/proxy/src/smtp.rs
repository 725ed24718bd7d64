//! A small SMTP client for the daemon's e-mail notifications: STARTTLS on `smtp://` (required:
//! a server that does not offer it is refused, so neither the account nor the mail crosses in
//! the clear) or TLS from the first byte on `smtps://`, AUTH PLAIN, one message. The server's
//! replies are read with bounded lines and line counts, and never panic the reader.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// The longest reply line read (RFC 5321 allows 512 bytes).
const MAX_LINE: u64 = 1000;
/// The most lines of one reply.
const MAX_LINES: usize = 100;
/// Each step's time limit.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to send.
pub(crate) struct Server {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// TLS from the first byte (`smtps`), else STARTTLS.
    pub(crate) implicit_tls: bool,
    /// The account and its password.
    pub(crate) login: Option<(String, String)>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// One message.
pub(crate) struct Mail {
    pub(crate) from: String,
    pub(crate) to: Vec<String>,
    pub(crate) subject: String,
    pub(crate) body: String,
}

/// A reply line: its code, whether more lines follow, and its text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, String), String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let code = line.get(..3).filter(|c| c.iter().all(u8::is_ascii_digit)).ok_or_else(|| {
        format!("the server answered {:?}, not an SMTP reply", String::from_utf8_lossy(&line[..line.len().min(80)]))
    })?;
    let code = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let more = match line.get(3) {
        None | Some(b' ') => false,
        Some(b'-') => true,
        Some(_) => return Err(format!("malformed SMTP reply line {:?}", String::from_utf8_lossy(line))),
    };
    Ok((code, more, String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned()))
}

/// Reads one reply: its code and its lines' texts.
async fn reply<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<(u16, Vec<String>), String> {
    let mut texts = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(STEP_TIMEOUT, (&mut *r).take(MAX_LINE).read_until(b'\n', &mut line))
            .await
            .map_err(|_| "the server did not answer in time".to_owned())?
            .map_err(|e| format!("reading the server's reply: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        if !line.ends_with(b"\n") {
            return Err("the server's reply line is too long".into());
        }
        let (code, more, text) = parse_line(&line)?;
        texts.push(text);
        if !more {
            return Ok((code, texts));
        }
        if texts.len() >= MAX_LINES {
            return Err("the server's reply has too many lines".into());
        }
    }
}

/// Sends `cmd` (without its CRLF; `shown` is what an error may repeat of it) and reads the
/// reply, which must have one of the codes in `want`.
async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    cmd: &str,
    shown: &str,
    want: &[u16],
) -> Result<Vec<String>, String> {
    let line = format!("{cmd}\r\n");
    tokio::time::timeout(STEP_TIMEOUT, s.get_mut().write_all(line.as_bytes()))
        .await
        .map_err(|_| format!("{shown}: the server took no data in time"))?
        .map_err(|e| format!("{shown}: {e}"))?;
    expect(s, shown, want).await
}

async fn expect<R: AsyncRead + Unpin>(r: &mut BufReader<R>, what: &str, want: &[u16]) -> Result<Vec<String>, String> {
    let (code, texts) = reply(r).await?;
    if want.contains(&code) {
        Ok(texts)
    } else {
        Err(format!("{what}: the server answered {code} {}", texts.join(" ")))
    }
}

/// Header text with no line breaks (nothing can be added to the headers through it).
fn header(v: &str) -> String {
    v.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The longest subject sent, in characters (a header line may not pass 998 bytes, and a
/// summary can name hundreds of restore points).
const MAX_SUBJECT: usize = 160;

/// A subject: one line, cut to [`MAX_SUBJECT`] characters, and encoded (RFC 2047) when it
/// is not plain ASCII.
fn subject(v: &str) -> String {
    let mut s: String = header(v).chars().take(MAX_SUBJECT).collect();
    if s.chars().count() < header(v).chars().count() {
        s.push_str(" ...");
    }
    if s.is_ascii() {
        return s;
    }
    use base64::Engine as _;
    // Encoded words of at most 45 bytes each (60 encoded), cut between characters.
    let mut words = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if word.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut word));
        }
        word.push(c);
    }
    words.push(word);
    words
        .iter()
        .map(|w| format!("=?UTF-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(w)))
        .collect::<Vec<_>>()
        .join("\r\n ")
}

/// The message: headers, then the body with CRLF line ends and leading dots doubled, then
/// the end marker.
fn message(mail: &Mail, host: &str) -> String {
    let date = httpdate::fmt_http_date(SystemTime::now());
    let id = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut m = format!(
        "From: <{}>\r\nTo: {}\r\nSubject: {}\r\nDate: {date}\r\nMessage-ID: <{id}.syncproxy@{}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        header(&mail.from),
        mail.to.iter().map(|t| format!("<{}>", header(t))).collect::<Vec<_>>().join(", "),
        subject(&mail.subject),
        header(host),
    );
    for line in mail.body.lines() {
        // A bare CR is no line end to a mail server; drop it.
        let line = line.replace('\r', "");
        if line.starts_with('.') {
            m.push('.');
        }
        m.push_str(&line);
        m.push_str("\r\n");
    }
    m.push_str(".\r\n");
    m
}

/// The dialog after TLS is up: EHLO, AUTH, the envelope, the message, QUIT.
async fn dialog<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    server: &Server,
    mail: &Mail,
    me: &str,
) -> Result<(), String> {
    command(s, &format!("EHLO {me}"), "EHLO", &[250]).await?;
    if let Some((user, password)) = &server.login {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        command(s, &format!("AUTH PLAIN {token}"), "AUTH PLAIN (the account)", &[235]).await?;
    }
    command(s, &format!("MAIL FROM:<{}>", header(&mail.from)), "MAIL FROM", &[250]).await?;
    for to in &mail.to {
        command(s, &format!("RCPT TO:<{}>", header(to)), &format!("RCPT TO {to}"), &[250, 251]).await?;
    }
    command(s, "DATA", "DATA", &[354]).await?;
    let text = message(mail, me);
    tokio::time::timeout(STEP_TIMEOUT * 4, s.get_mut().write_all(text.as_bytes()))
        .await
        .map_err(|_| "sending the message: the server took no data in time".to_owned())?
        .map_err(|e| format!("sending the message: {e}"))?;
    expect(s, "the message", &[250]).await?;
    // The mail is accepted; a server that closes without answering QUIT changes nothing.
    let _ = command(s, "QUIT", "QUIT", &[221]).await;
    Ok(())
}

/// Sends `mail` through `server`.
pub(crate) async fn send(server: &Server, mail: &Mail) -> Result<(), String> {
    let at = format!("{}:{}", server.host, server.port);
    let host = server.host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect((host, server.port)))
        .await
        .map_err(|_| format!("connecting to {at}: no answer in time"))?
        .map_err(|e| format!("connecting to {at}: {e}"))?;
    let me = durable::host_name();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{:?} is not a host name TLS can check", server.host))?;
    let connector = tokio_rustls::TlsConnector::from(server.tls.clone());
    let tcp = if server.implicit_tls {
        tcp
    } else {
        let mut plain = BufReader::new(tcp);
        expect(&mut plain, "the greeting", &[220]).await?;
        let ext = command(&mut plain, &format!("EHLO {me}"), "EHLO", &[250]).await?;
        if !ext.iter().any(|e| e.split_whitespace().next().is_some_and(|w| w.eq_ignore_ascii_case("STARTTLS"))) {
            return Err(format!(
                "{at} offers no STARTTLS: nothing is sent to it in the clear (use smtps:// if it takes TLS at once)"
            ));
        }
        command(&mut plain, "STARTTLS", "STARTTLS", &[220]).await?;
        if !plain.buffer().is_empty() {
            return Err(format!("{at} sent data before the TLS handshake (a STARTTLS injection?)"));
        }
        plain.into_inner()
    };
    let tls = tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| format!("TLS with {at}: no handshake in time"))?
        .map_err(|e| format!("TLS with {at}: {e}"))?;
    let mut s = BufReader::new(tls);
    if server.implicit_tls {
        expect(&mut s, "the greeting", &[220]).await?;
    }
    dialog(&mut s, server, mail, &me).await.map_err(|e| format!("{at}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_are_parsed_and_garbage_is_an_error() {
        assert_eq!(parse_line(b"250-STARTTLS\r\n"), Ok((250, true, "STARTTLS".into())));
        assert_eq!(parse_line(b"250 OK\r\n"), Ok((250, false, "OK".into())));
        assert_eq!(parse_line(b"220\r\n"), Ok((220, false, String::new())));
        for bad in [&b""[..], b"\r\n", b"2x0 nope", b"250_x", b"HTTP/1.1 200 OK", b"\xff\xfe\xfd\xfc"] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn replies_are_bounded_in_length_and_lines() {
        let long = vec![b'2'; 5000];
        let mut r = BufReader::new(&long[..]);
        assert!(reply(&mut r).await.unwrap_err().contains("too long"));
        let many = "250-x\r\n".repeat(500);
        let mut r = BufReader::new(many.as_bytes());
        assert!(reply(&mut r).await.unwrap_err().contains("too many lines"));
        let mut r = BufReader::new(&b"250-a\r\n250 b\r\n"[..]);
        assert_eq!(reply(&mut r).await, Ok((250, vec!["a".into(), "b".into()])));
        let mut r = BufReader::new(&b"250-a\r\n"[..]);
        assert!(reply(&mut r).await.unwrap_err().contains("closed"));
    }

    /// Random and mutated replies: an error or a reply, never a panic, and never more lines
    /// than the bound. (A libFuzzer target needs this client in a library crate; until then
    /// this runs on every `cargo test`.)
    #[tokio::test]
    async fn random_replies_never_panic_the_reader() {
        let seeds: [&[u8]; 4] =
            [b"250-a\r\n250 b\r\n", b"220 ready\r\n", b"354 go\r\n", b"250-STARTTLS\r\n250 8BITMIME\r\n"];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000u64 {
            let mut input: Vec<u8> = seeds[usize::try_from(round % 4).unwrap()].to_vec();
            for _ in 0..next() % 8 {
                let at = usize::try_from(next() % (input.len() as u64 + 1)).unwrap();
                match next() % 4 {
                    0 => input.insert(at, next().to_le_bytes()[0]),
                    1 if at < input.len() => {
                        input.remove(at);
                    }
                    2 => input.splice(at..at, b"\r\n250-".iter().copied()).for_each(drop),
                    _ => input.extend(std::iter::repeat_n(b'-', usize::try_from(next() % 2000).unwrap())),
                }
            }
            let mut r = BufReader::new(&input[..]);
            if let Ok((_, lines)) = reply(&mut r).await {
                assert!(lines.len() <= MAX_LINES && lines.iter().all(|l| l.len() as u64 <= MAX_LINE), "{input:?}");
            }
        }
    }

    #[test]
    fn the_message_cannot_gain_headers_and_dots_are_doubled() {
        let mail = Mail {
            from: "p@example.com".into(),
            to: vec!["ops@example.com".into()],
            subject: "nightly failed\r\nBcc: evil@example.com".into(),
            body: "first\n.hidden\n..two".into(),
        };
        let m = message(&mail, "proxy1");
        let (head, body) = m.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("Subject: nightly failed  Bcc: evil@example.com"), "{head}");
        assert!(!head.contains("\r\nBcc:"), "{head}");
        assert_eq!(body, "first\r\n..hidden\r\n...two\r\n.\r\n");
        // A summary naming hundreds of points makes a short subject; one not in ASCII is
        // encoded, in words that never split a character.
        let long = subject(&"p".repeat(5000));
        assert!(long.len() < 200 && long.ends_with(" ..."), "{long}");
        let accented = subject(&"sauvegarde échouée ".repeat(10));
        assert!(accented.is_ascii() && accented.starts_with("=?UTF-8?B?"), "{accented}");
        assert!(accented.split("\r\n ").all(|w| w.len() <= 75), "{accented}");
        let decoded: String = accented
            .split("\r\n ")
            .map(|w| {
                use base64::Engine as _;
                let b64 = w.trim_start_matches("=?UTF-8?B?").trim_end_matches("?=");
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
            })
            .collect();
        assert!(decoded.starts_with("sauvegarde échouée sauvegarde"), "{decoded}");
        let bare = message(&Mail { body: "a\rb".into(), ..mail }, "p");
        assert!(bare.ends_with("\r\n\r\nab\r\n.\r\n"), "{bare:?}");
    }
}
