//! A disk of a frozen snapshot read through VMware's VDDK, as a pipeline source: the proxy's
//! vSphere session is handed to VDDK as a session cookie (no password leaves the process), the
//! connection names the VM and the snapshot, and each disk is opened by the file name the
//! snapshot's device list gives it. VDDK is loaded at run time (`--vddk-libdir`); it is never
//! shipped.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use pipeline::{BlockError, BlockSource, ErrorKind, IoFuture, SourceAllocation};
use vddk::{ConnectParams, Connection, Credentials, OpenFlags, Vddk};
use vsphere::{Client, MoRef};

use crate::OpenError as OrchError;

/// The kind of a VDDK failure, decided by its [`vddk::ErrorClass`]: a busy object or a network
/// failure is transient, and the copy engine retries it; a read past the end or an argument
/// refused is invalid input; refused credentials and the rest are fatal (the engine cannot log
/// in again).
pub(crate) fn vddk_kind(e: &vddk::VddkError) -> ErrorKind {
    use vddk::ErrorClass as C;
    match e {
        vddk::VddkError::Call { class, .. } => match class {
            C::Busy | C::Network => ErrorKind::Transient,
            C::OutOfRange => ErrorKind::InvalidInput,
            C::Authentication | C::Fatal => ErrorKind::Fatal,
        },
        vddk::VddkError::Invalid(_) => ErrorKind::InvalidInput,
        vddk::VddkError::NotFound { .. }
        | vddk::VddkError::MissingSymbol { .. }
        | vddk::VddkError::AlreadyInitialised
        | vddk::VddkError::WorkerGone => ErrorKind::Fatal,
    }
}

/// VDDK's connection to one VM as of one snapshot.
#[derive(Debug)]
pub struct VddkVm {
    conn: Connection,
}

/// The `vmware_soap_session` cookie's value, without the name and quotes.
fn cookie_value(header: &str) -> String {
    let v = header.split(';').next().unwrap_or("").trim();
    let v = v.strip_prefix("vmware_soap_session=").unwrap_or(v);
    v.trim_matches('"').to_owned()
}

/// Connects VDDK to `vm` through the server `client` is logged in to, reusing its session (as
/// a cookie: no password is handed over). As of `snapshot`, read-only, for reading; with no
/// snapshot, read-write, for writing into the VM's current disks. Blocking (VDDK's connect is).
pub(crate) fn connect_vm(
    vddk: &Vddk,
    client: &Client,
    vm: &MoRef,
    snapshot: Option<&MoRef>,
) -> Result<Connection, OrchError> {
    let endpoint = client.endpoint();
    let tls = client
        .server_tls()
        .ok_or_else(|| OrchError::Refused("VDDK needs the server's certificate thumbprint; none was seen".into()))?;
    let cookie = client.session_cookie().ok_or_else(|| OrchError::Refused("VDDK needs a logged-in session".into()))?;
    let params = ConnectParams {
        server: Some(endpoint.host.clone()),
        thumbprint: Some(tls.sha1.to_string()),
        credentials: Some(Credentials::SessionCookie {
            user: client.user().unwrap_or_default(),
            cookie: cookie_value(&cookie),
            key: None,
        }),
        vm_moref: Some(vm.value.clone()),
        snapshot_moref: snapshot.map(|s| s.value.clone()),
        transports: Vec::new(),
        read_only: snapshot.is_some(),
        port: Some(u32::from(endpoint.port)),
        nfc_port: None,
    };
    vddk.connect(&params).map_err(|e| OrchError::Refused(format!("VDDK: {e}")))
}

impl VddkVm {
    /// Connects VDDK to `vm` as of `snapshot`, read-only, through the server `client` is
    /// logged in to, reusing its session. Blocking (VDDK's connect is): call it off the async
    /// workers.
    pub fn connect(vddk: &Vddk, client: &Client, vm: &MoRef, snapshot: &MoRef) -> Result<Self, OrchError> {
        Ok(Self { conn: connect_vm(vddk, client, vm, Some(snapshot))? })
    }

    /// Opens one disk of the snapshot (its `[datastore] path` from the snapshot's devices).
    /// Blocking.
    pub fn open(&self, path: &str, capacity: u64, identity: String) -> Result<VddkSource, OrchError> {
        let disk = open_disk(&self.conn, path, capacity, OpenFlags { read_only: true, ..Default::default() })?;
        Ok(VddkSource {
            disk: Arc::new(disk),
            name: path.to_owned(),
            identity,
            size: capacity,
            spare: Spare::default(),
        })
    }
}

/// Opens the disk at `path` (`[datastore] path`) on `conn`, which must hold at least `capacity`
/// bytes. Blocking.
pub(crate) fn open_disk(
    conn: &Connection,
    path: &str,
    capacity: u64,
    flags: OpenFlags,
) -> Result<vddk::Disk, OrchError> {
    let disk = conn.open(path, flags).map_err(|e| OrchError::Refused(format!("VDDK cannot open {path}: {e}")))?;
    let size = disk.info().capacity();
    if size < capacity {
        return Err(OrchError::Refused(format!("{path}: VDDK says {size} bytes, the disk is {capacity}")));
    }
    Ok(disk)
}

/// One disk read through VDDK.
#[derive(Debug)]
pub struct VddkSource {
    disk: Arc<vddk::Disk>,
    name: String,
    identity: String,
    size: u64,
    /// Read buffers VDDK's worker owns while it reads, kept for the next request.
    spare: Spare,
}

/// Buffers a disk's worker owned for one request, kept for the next (VDDK's worker takes owned
/// buffers; at most a couple are kept).
#[derive(Debug, Default)]
pub(crate) struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    /// A kept buffer, or a new empty one.
    pub(crate) fn take(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default()
    }

    /// Keeps `buf` for the next request, unless enough are kept.
    pub(crate) fn keep(&self, buf: Vec<u8>) {
        let mut spare = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if spare.len() < 2 {
            spare.push(buf);
        }
    }
}

impl VddkSource {
    /// The transport VDDK chose (`nbdssl`, `hotadd`, ...).
    pub fn transport(&self) -> &str {
        self.disk.transport()
    }
}

impl BlockSource for VddkSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        format!("vddk:{} ({})", self.name, self.disk.transport())
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    /// Read from a snapshot, which nothing writes.
    fn frozen(&self) -> bool {
        true
    }

    /// The allocation comes from CBT, as for every vSphere source.
    fn allocation(&self) -> IoFuture<'_, Option<SourceAllocation>> {
        Box::pin(async { Ok(None) })
    }

    fn read_at(&self, offset: u64, mut buf: BytesMut) -> IoFuture<'_, BytesMut> {
        Box::pin(async move {
            let len = buf.len();
            pipeline::check_range(&self.name, offset, len as u64, self.size)?;
            if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
                return Err(
                    BlockError::invalid(format!("{}: VDDK reads whole sectors", self.name)).at(offset, len as u64)
                );
            }
            if len == 0 {
                // VDDK refuses a read of no sectors; there is nothing to ask it for.
                return Ok(buf);
            }
            let mut tmp = self.spare.take();
            tmp.resize(len, 0);
            let failed = |e: vddk::VddkError| {
                BlockError::new(vddk_kind(&e), format!("reading {}", self.describe()))
                    .at(offset, len as u64)
                    .with_source(e)
            };
            let reply = self.disk.read_request(offset / 512, tmp).map_err(failed)?;
            let data = reply.await.ok_or(vddk::VddkError::WorkerGone).map_err(failed)?.map_err(failed)?;
            buf.copy_from_slice(&data);
            self.spare.keep(data);
            Ok(buf)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cookie_value_is_what_vddk_gets() {
        assert_eq!(super::cookie_value("vmware_soap_session=\"52a1-b2\"; Path=/; HttpOnly"), "52a1-b2");
        assert_eq!(super::cookie_value("52a1-b2"), "52a1-b2");
    }

    #[test]
    fn vddk_failures_get_the_kind_of_their_error_class() {
        use pipeline::ErrorKind;
        let call = |code: u16| vddk::VddkError::Call {
            op: "Read",
            code,
            raw: u64::from(code),
            text: "x".into(),
            class: vddk::ErrorClass::of(code),
        };
        // OBJECT_IS_BUSY, FILE_ALREADY_LOCKED, HOST_TCP_CONN_LOST.
        for code in [5, 15, 14010] {
            assert_eq!(super::vddk_kind(&call(code)), ErrorKind::Transient, "{code}");
        }
        // DISK_OUTOFRANGE; AUTHENTICATION_FAIL (the engine cannot log in again); FILE_ERROR.
        assert_eq!(super::vddk_kind(&call(16007)), ErrorKind::InvalidInput);
        assert_eq!(super::vddk_kind(&call(35)), ErrorKind::Fatal);
        assert_eq!(super::vddk_kind(&call(7)), ErrorKind::Fatal);
        assert_eq!(super::vddk_kind(&vddk::VddkError::Invalid("odd".into())), ErrorKind::InvalidInput);
        assert_eq!(super::vddk_kind(&vddk::VddkError::WorkerGone), ErrorKind::Fatal);
    }
}
