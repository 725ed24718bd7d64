//! The client's timeout is one deadline per operation, its retries, their back-off and a
//! re-login included: against plain TCP listeners on 127.0.0.1 standing in for a vCenter that
//! is stopped (port closed), hung (accepts, never answers) or busy (503 every time).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use vsphere::datastore::DatastoreFile;
use vsphere::{Client, ConnectOptions, Credentials, Error, Retry, Secret, Trust};

/// What the fake server does with one request.
enum Reply {
    /// Keeps the connection open and never answers.
    Silence,
    /// Answers after a pause: status, extra headers, body.
    After(Duration, u16, &'static str, String),
}

type Handler = Arc<dyn Fn(&str, &str) -> Reply + Send + Sync>;

/// Serves HTTP/1.1 on 127.0.0.1 with `handler(path, body)`, a thread per connection; its port.
fn serve(handler: Handler) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let handler = handler.clone();
            std::thread::spawn(move || connection(tcp, handler));
        }
    });
    port
}

fn connection(mut tcp: TcpStream, handler: Handler) {
    let mut data = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        while data.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&data[head_end..head_end + length]).into_owned();
        data.drain(..head_end + length);
        match handler(&path, &body) {
            // Holds the connection open far longer than any test runs.
            Reply::Silence => std::thread::sleep(Duration::from_secs(600)),
            Reply::After(pause, status, headers, body) => {
                std::thread::sleep(pause);
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n{headers}\r\n{body}",
                    body.len()
                );
                if tcp.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

/// The answers of a healthy vCenter to `RetrieveServiceContent` and `Login`.
fn healthy(body: &str) -> Option<Reply> {
    if body.contains("<RetrieveServiceContent") {
        return Some(Reply::After(
            Duration::ZERO,
            200,
            "",
            envelope(
                r#"<RetrieveServiceContentResponse xmlns="urn:vim25"><returnval><rootFolder type="Folder">group-d1</rootFolder><propertyCollector type="PropertyCollector">propertyCollector</propertyCollector><sessionManager type="SessionManager">SessionManager</sessionManager><searchIndex type="SearchIndex">SearchIndex</searchIndex><about><name>VMware vCenter Server</name><fullName>VMware vCenter Server 8.0.2</fullName><version>8.0.2</version><build>1</build><apiType>VirtualCenter</apiType><apiVersion>8.0.2.0</apiVersion><instanceUuid>u-1</instanceUuid></about></returnval></RetrieveServiceContentResponse>"#,
            ),
        ));
    }
    if body.contains("<Login") {
        return Some(Reply::After(
            Duration::ZERO,
            200,
            "Set-Cookie: vmware_soap_session=\"s-1\"; Path=/\r\n",
            envelope(
                r#"<LoginResponse xmlns="urn:vim25"><returnval><key>k-1</key><userName>backup</userName><fullName>Backup</fullName></returnval></LoginResponse>"#,
            ),
        ));
    }
    None
}

fn options(port: u16, timeout: Duration) -> ConnectOptions {
    ConnectOptions { trust: Trust::Insecure, timeout, ..ConnectOptions::new(&format!("http://127.0.0.1:{port}/sdk")) }
}

fn creds() -> Credentials {
    Credentials { user: "backup".into(), password: Secret::new("pw") }
}

/// Asserts `e` is a timeout of `operation` after `after`, never retried, and returns its last
/// failure.
fn timeout_of(e: &Error, operation: &str, after: Duration) -> Option<String> {
    let Error::Timeout { operation: op, after: a, last } = e else { panic!("not a timeout: {e}") };
    assert!(op.contains(operation) && *a == after, "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("did not answer within {} s", after.as_secs_f64())), "{text}");
    assert_eq!(e.retry(), Retry::Never, "a timeout already spent the deadline: {e}");
    last.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_retried_with_back_off_until_the_deadline_then_times_out() {
    vsphere::tls::install_crypto_provider();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let timeout = Duration::from_secs(1);
    let start = Instant::now();
    let e = Client::connect(&options(port, timeout)).await.unwrap_err();
    let took = start.elapsed();
    let last = timeout_of(&e, "RetrieveServiceContent", timeout);
    assert!(last.is_some_and(|l| l.contains("connecting to 127.0.0.1")), "{e}");
    // Retried until the deadline (not given up at the first refusal), and stopped there.
    assert!(took >= timeout - Duration::from_millis(50) && took < 3 * timeout, "{took:?}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_fails_once_within_the_timeout() {
    vsphere::tls::install_crypto_provider();
    let port = serve(Arc::new(|_: &str, _: &str| Reply::Silence));
    let timeout = Duration::from_secs(1);
    let start = Instant::now();
    let e = Client::connect(&options(port, timeout)).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(timeout_of(&e, "RetrieveServiceContent", timeout), None, "{e}");
    assert!(took < 3 * timeout, "{took:?}: {e}");

    // The same for a datastore read from a server that answered the login and then hangs.
    let port = serve(Arc::new(|_: &str, body: &str| healthy(body).unwrap_or(Reply::Silence)));
    let c = Client::connect(&options(port, timeout)).await.unwrap();
    c.login(creds()).await.unwrap();
    let f = DatastoreFile::from_ds_path("DC1", "[ds1] vm/vm-flat.vmdk").unwrap();
    let start = Instant::now();
    let e = c.datastore_reader().unwrap().read(&f, 0, 4096).await.unwrap_err();
    let took = start.elapsed();
    timeout_of(&e, "vm/vm-flat.vmdk", timeout);
    assert!(took < 3 * timeout, "{took:?}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_503_every_time_is_retried_until_the_deadline() {
    vsphere::tls::install_crypto_provider();
    let busy = || Reply::After(Duration::ZERO, 503, "", String::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let port = serve(Arc::new(move |_: &str, _: &str| {
        counted.fetch_add(1, Ordering::SeqCst);
        busy()
    }));
    let timeout = Duration::from_secs(1);
    let start = Instant::now();
    let e = Client::connect(&options(port, timeout)).await.unwrap_err();
    let took = start.elapsed();
    let last = timeout_of(&e, "RetrieveServiceContent", timeout);
    assert!(last.is_some_and(|l| l.contains("503")), "{e}");
    assert!(calls.load(Ordering::SeqCst) >= 3, "retried with back-off: {} calls", calls.load(Ordering::SeqCst));
    assert!(took >= timeout - Duration::from_millis(50) && took < 3 * timeout, "{took:?}: {e}");

    // Datastore reads from a busy host: the same.
    let port =
        serve(Arc::new(
            move |path: &str, body: &str| {
                if path.starts_with("/folder") { busy() } else { healthy(body).unwrap_or(Reply::Silence) }
            },
        ));
    let c = Client::connect(&options(port, timeout)).await.unwrap();
    c.login(creds()).await.unwrap();
    let f = DatastoreFile::from_ds_path("DC1", "[ds1] vm/vm-flat.vmdk").unwrap();
    let start = Instant::now();
    let e = c.datastore_reader().unwrap().read(&f, 0, 4096).await.unwrap_err();
    let took = start.elapsed();
    let last = timeout_of(&e, "vm/vm-flat.vmdk", timeout);
    assert!(last.is_some_and(|l| l.contains("503")), "{e}");
    assert!(took >= timeout - Duration::from_millis(50) && took < 3 * timeout, "{took:?}: {e}");
    let start = Instant::now();
    let e = c.datastore_reader().unwrap().size(&f).await.unwrap_err();
    timeout_of(&e, "HEAD vm/vm-flat.vmdk", timeout);
    assert!(start.elapsed() < 3 * timeout, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relogin_after_an_expired_session_fits_in_the_same_deadline() {
    vsphere::tls::install_crypto_provider();
    // Logs in once; then a call is answered NotAuthenticated late, and the re-login hangs.
    let logins = Arc::new(AtomicUsize::new(0));
    let counted = logins.clone();
    let port = serve(Arc::new(move |_: &str, body: &str| {
        if body.contains("<Login") && counted.fetch_add(1, Ordering::SeqCst) > 0 {
            return Reply::Silence;
        }
        healthy(body).unwrap_or_else(|| {
            Reply::After(
                Duration::from_millis(1600),
                500,
                "",
                envelope(
                    r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The session is not authenticated.</faultstring><detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"><object type="Folder">group-d1</object><privilegeId>System.View</privilegeId></NotAuthenticatedFault></detail></soapenv:Fault>"#,
                ),
            )
        })
    }));
    let timeout = Duration::from_secs(2);
    let c = Client::connect(&options(port, timeout)).await.unwrap();
    c.login(creds()).await.unwrap();
    let start = Instant::now();
    let e = c.current_time().await.unwrap_err();
    let took = start.elapsed();
    timeout_of(&e, "CurrentTime", timeout);
    assert_eq!(logins.load(Ordering::SeqCst), 2, "logged in again: {e}");
    // One deadline: 2 s, not 1.6 s for the call and then 2 s more for the re-login.
    assert!(took < Duration::from_millis(3000), "{took:?}: {e}");
}
