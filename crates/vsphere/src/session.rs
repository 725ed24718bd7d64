//! The session: `RetrieveServiceContent`, `Login`/`Logout`, the `vmware_soap_session`
//! cookie, and one re-login and retry when the server says `NotAuthenticated`. A call is sent
//! again after a refused connection or a busy answer; the timeout bounds the whole call, those
//! retries and the re-login included.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::error::{Error, FaultKind};
use crate::http::{Deadline, Endpoint, Http, Retries};
use crate::soap::{MoRef, Request, parse_response};
use crate::tls::{ServerTls, Trust};
use crate::version::{Product, Support, support};
use crate::xml::{Element, Limits};

/// A password, kept out of `Debug`, `Display` and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Reads a password from the first line of a file (never from the command line, where
    /// every user of the host can see it).
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading the password file {}: {e}", path.display())))?;
        let line = s.lines().next().unwrap_or_default();
        if line.is_empty() {
            return Err(Error::Config(format!("the password file {} is empty", path.display())));
        }
        Ok(Self(line.to_owned()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A user name and its password.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The user (`administrator@vsphere.local`, `root`).
    pub user: String,
    /// The password.
    pub password: Secret,
}

/// How to reach a server.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `https://host[:port]/sdk`.
    pub url: String,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// The longest a call may take, its retries, their back-off and a re-login included.
    pub timeout: Duration,
    /// Parser limits for answers.
    pub limits: Limits,
    /// Also accept TLS 1.0 and 1.1 through OpenSSL, for vCenter 5.1 and ESXi 5.x. Off by
    /// default; every connection made this way logs a warning.
    pub legacy_tls: bool,
}

impl ConnectOptions {
    /// Defaults: verified TLS, a 5-minute timeout, the default limits.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            trust: Trust::default(),
            timeout: Duration::from_secs(300),
            limits: Limits::default(),
            legacy_tls: false,
        }
    }
}

/// `ServiceContent.about`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct About {
    /// `VMware vCenter Server`.
    pub name: String,
    /// The long name with build.
    pub full_name: String,
    /// `8.0.2`.
    pub version: String,
    /// The build number.
    pub build: String,
    /// `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// `8.0.2.0`.
    pub api_version: String,
    /// The vCenter instance UUID (part of every sync state's key).
    pub instance_uuid: String,
}

/// The managed objects a session starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    /// The inventory root.
    pub root_folder: MoRef,
    /// The property collector.
    pub property_collector: MoRef,
    /// The view manager (absent on very old hosts).
    pub view_manager: Option<MoRef>,
    /// The session manager.
    pub session_manager: MoRef,
    /// The authorization manager (privileges).
    pub authorization_manager: Option<MoRef>,
    /// The search index.
    pub search_index: MoRef,
    /// The file manager.
    pub file_manager: Option<MoRef>,
    /// The virtual disk manager (create, copy and delete disks).
    pub virtual_disk_manager: Option<MoRef>,
    /// The task manager.
    pub task_manager: Option<MoRef>,
    /// The guest operations manager (vCenter and ESXi 5.0 and later).
    pub guest_operations_manager: Option<MoRef>,
    /// What the server is.
    pub about: About,
}

impl ServiceContent {
    fn parse(r: &Element) -> Result<Self, Error> {
        let m = |name: &str| r.child(name).and_then(MoRef::from_element);
        let need = |name: &str| m(name).ok_or_else(|| Error::Protocol(format!("ServiceContent has no {name}")));
        let a = r.child("about").ok_or_else(|| Error::Protocol("ServiceContent has no about".into()))?;
        let t = |n: &str| a.text_of(n).unwrap_or_default().to_owned();
        Ok(Self {
            root_folder: need("rootFolder")?,
            property_collector: need("propertyCollector")?,
            view_manager: m("viewManager"),
            session_manager: need("sessionManager")?,
            authorization_manager: m("authorizationManager"),
            search_index: need("searchIndex")?,
            file_manager: m("fileManager"),
            virtual_disk_manager: m("virtualDiskManager"),
            task_manager: m("taskManager"),
            guest_operations_manager: m("guestOperationsManager"),
            about: About {
                name: t("name"),
                full_name: t("fullName"),
                version: t("version"),
                build: t("build"),
                api_type: t("apiType"),
                api_version: t("apiVersion"),
                instance_uuid: t("instanceUuid"),
            },
        })
    }
}

/// The logged-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSession {
    /// The session key.
    pub key: String,
    /// The user.
    pub user_name: String,
    /// The full name.
    pub full_name: String,
}

/// A connection to vCenter or ESXi.
#[derive(Debug)]
pub struct Client {
    http: std::sync::Arc<Http>,
    content: ServiceContent,
    product: Option<Product>,
    support: Support,
    cookie: Mutex<Option<String>>,
    credentials: Mutex<Option<Credentials>>,
    /// The key of the current session (privilege checks name it).
    session_key: Mutex<Option<String>>,
    limits: Limits,
}

impl Client {
    /// Connects and reads the service content (no login yet). A server outside the support
    /// matrix is refused; a newer one is accepted with a warning.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, Error> {
        let endpoint = Endpoint::parse(&options.url)?;
        let max_body = options.limits.max_bytes;
        let http = std::sync::Arc::new(Http::with_legacy(
            endpoint,
            &options.trust,
            options.timeout,
            max_body,
            options.legacy_tls,
        )?);
        let mut client = Self {
            http,
            content: ServiceContent {
                root_folder: MoRef::new("Folder", ""),
                property_collector: MoRef::new("PropertyCollector", ""),
                view_manager: None,
                session_manager: MoRef::new("SessionManager", ""),
                authorization_manager: None,
                search_index: MoRef::new("SearchIndex", ""),
                file_manager: None,
                virtual_disk_manager: None,
                task_manager: None,
                guest_operations_manager: None,
                about: About::default(),
            },
            product: None,
            support: Support::Supported,
            cookie: Mutex::new(None),
            credentials: Mutex::new(None),
            session_key: Mutex::new(None),
            limits: options.limits,
        };
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let r = client.call(Request::new("RetrieveServiceContent", &si)).await?;
        let rv =
            r.child("returnval").ok_or_else(|| Error::Protocol("RetrieveServiceContent returned nothing".into()))?;
        client.content = ServiceContent::parse(rv)?;
        let (product, s) = support(&client.content.about.api_type, &client.content.about.api_version);
        match &s {
            Support::Supported => {}
            Support::Untested(why) => tracing::warn!("{}: untested version: {why}", client.http.endpoint().host),
            Support::Unsupported(why) => {
                return Err(Error::Config(format!("{}: unsupported server: {why}", client.http.endpoint().host)));
            }
        }
        client.product = product;
        client.support = s;
        Ok(client)
    }

    /// The service content.
    pub fn content(&self) -> &ServiceContent {
        &self.content
    }

    /// vCenter or ESXi.
    pub fn product(&self) -> Option<Product> {
        self.product
    }

    /// Where the server stands against the matrix.
    pub fn support(&self) -> &Support {
        &self.support
    }

    /// The server's TLS as last seen (none over plain HTTP).
    pub fn server_tls(&self) -> Option<ServerTls> {
        self.http.server_tls()
    }

    /// The connection pool (shared with datastore readers of the same server).
    pub(crate) fn http_arc(&self) -> std::sync::Arc<Http> {
        self.http.clone()
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        self.http.endpoint()
    }

    /// The timeout: how long one call may take, its retries and a re-login included.
    pub fn timeout(&self) -> Duration {
        self.http.timeout()
    }

    /// The deadline of a call starting now.
    pub(crate) fn deadline(&self) -> Deadline {
        Deadline::after(self.http.timeout())
    }

    /// The session cookie (`vmware_soap_session="..."`), for datastore reads and VDDK.
    pub fn session_cookie(&self) -> Option<String> {
        self.cookie.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key of the current session, once logged in.
    pub fn session_key(&self) -> Option<String> {
        self.session_key.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The user this session logged in as, if it has.
    pub fn user(&self) -> Option<String> {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.user.clone())
    }

    /// Logs in; the credentials are kept (in memory only) to log in again when the session
    /// expires.
    pub async fn login(&self, credentials: Credentials) -> Result<UserSession, Error> {
        let session = self.login_once(&credentials, self.deadline()).await?;
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = Some(credentials);
        Ok(session)
    }

    async fn login_once(&self, c: &Credentials, deadline: Deadline) -> Result<UserSession, Error> {
        let mut req = Request::new("Login", &self.content.session_manager);
        req.text("userName", &c.user).text("password", c.password.expose());
        let r = self.call_by(req, deadline).await?;
        let rv = r.child("returnval").ok_or_else(|| Error::Protocol("Login returned no session".into()))?;
        if self.session_cookie().is_none() {
            return Err(Error::Protocol("Login succeeded but the server set no vmware_soap_session cookie".into()));
        }
        let key = rv.text_of("key").unwrap_or_default().to_owned();
        *self.session_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        Ok(UserSession {
            key,
            user_name: rv.text_of("userName").unwrap_or_default().to_owned(),
            full_name: rv.text_of("fullName").unwrap_or_default().to_owned(),
        })
    }

    /// Logs out (vCenter caps sessions: always log out) and forgets the credentials.
    pub async fn logout(&self) -> Result<(), Error> {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).take();
        let r = self.call(Request::new("Logout", &self.content.session_manager)).await;
        self.cookie.lock().unwrap_or_else(|p| p.into_inner()).take();
        r.map(|_| ())
    }

    /// Calls a method; on `NotAuthenticated`, logs in again and retries once. The timeout is
    /// the deadline of all of it: a server that does not answer in time is a
    /// [`Error::Timeout`] naming the method.
    pub async fn invoke(&self, req: Request) -> Result<Element, Error> {
        let deadline = self.deadline();
        let method = req.method().to_owned();
        let this = req.this().clone();
        let body = req.finish();
        match self.post_retrying(&method, &this, &body, deadline).await {
            Err(e) if e.fault().is_some_and(|f| f.kind == FaultKind::NotAuthenticated) && self.can_relogin() => {
                self.relogin(&method, deadline).await.map_err(|e| match e {
                    Error::Timeout { after, last, .. } => {
                        Error::Timeout { operation: format!("{method} (logging in again)"), after, last }
                    }
                    e => e,
                })?;
                self.post_retrying(&method, &this, &body, deadline).await
            }
            r => r,
        }
    }

    /// Whether there is a login to renew.
    pub(crate) fn can_relogin(&self) -> bool {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Logs in again with the kept credentials (after a `NotAuthenticated`), by `deadline`.
    pub(crate) async fn relogin(&self, method: &str, deadline: Deadline) -> Result<(), Error> {
        let creds = self.credentials.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(c) = creds else {
            return Err(Error::Protocol(format!(
                "{method}: the session is not authenticated and there is no login to renew"
            )));
        };
        tracing::info!("{}: session expired; logging in again", self.http.endpoint().host);
        self.cookie.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.login_once(&c, deadline).await.map(|_| ())
    }

    async fn call(&self, req: Request) -> Result<Element, Error> {
        self.call_by(req, self.deadline()).await
    }

    async fn call_by(&self, req: Request, deadline: Deadline) -> Result<Element, Error> {
        let method = req.method().to_owned();
        let this = req.this().clone();
        self.post_retrying(&method, &this, &req.finish(), deadline).await
    }

    /// Posts a call, again after a refused connection or a busy answer (the server did not
    /// act on it, so even a task is never created twice), until `deadline`.
    async fn post_retrying(
        &self,
        method: &str,
        this: &MoRef,
        body: &str,
        deadline: Deadline,
    ) -> Result<Element, Error> {
        let mut retries = Retries::new(deadline, method);
        loop {
            match self.post(method, this, body.to_owned(), deadline).await {
                Err(e) => retries.after(e, Error::not_acted_on).await?,
                done => return done,
            }
        }
    }

    async fn post(&self, method: &str, this: &MoRef, body: String, deadline: Deadline) -> Result<Element, Error> {
        let endpoint = self.http.endpoint();
        let version = &self.content.about.api_version;
        let action = if version.is_empty() { "urn:vim25".to_owned() } else { format!("urn:vim25/{version}") };
        let mut b = http::Request::post(endpoint.path.as_str())
            .header(http::header::CONTENT_TYPE, "text/xml; charset=\"utf-8\"")
            .header("SOAPAction", action)
            .header(http::header::USER_AGENT, concat!("syncproxy/", env!("CARGO_PKG_VERSION")));
        if let Some(c) = self.session_cookie() {
            b = b.header(http::header::COOKIE, c);
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::Config(format!("building the {method} request: {e}")))?;
        let resp = self.http.send_by(req, method, deadline).await?;
        for v in resp.headers.get_all(http::header::SET_COOKIE) {
            if let Some(c) = v.to_str().ok().and_then(soap_session_cookie) {
                *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
            }
        }
        match resp.status {
            200 | 500 => parse_response(&resp.body, method, this, self.limits),
            s => Err(Error::Http {
                context: format!("{method} on {}", endpoint.host),
                message: format!("HTTP status {s}"),
                status: Some(s),
            }),
        }
    }
}

/// `vmware_soap_session="..."` out of a `Set-Cookie` header.
fn soap_session_cookie(header: &str) -> Option<String> {
    let first = header.split(';').next()?.trim();
    let (name, value) = first.split_once('=')?;
    (name.trim() == "vmware_soap_session" && !value.is_empty()).then(|| first.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_picked_out_of_set_cookie() {
        let h = r#"vmware_soap_session="52a1b2c3"; Path=/; HttpOnly; Secure;"#;
        assert_eq!(soap_session_cookie(h).as_deref(), Some(r#"vmware_soap_session="52a1b2c3""#));
        assert_eq!(soap_session_cookie("other=1; Path=/"), None);
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        let c = Credentials { user: "root".into(), password: s };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
