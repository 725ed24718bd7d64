//! Finding and loading VixDiskLib, `InitEx` once per process, and connections: everything that
//! VDDK requires to be serialised process-wide runs under one lock here.

use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vddk_sys::{VIX_OK, VixDiskLib, VixDiskLibConnectParams, VixDiskLibConnection, VixError};

use crate::error::{ErrorClass, VddkError};

/// Open, Close, ConnectEx, Disconnect (and the rest of what VDDK wants serialised) take this.
static OPEN_CLOSE: Mutex<()> = Mutex::new(());
/// `InitEx` may run once per process.
static INITIALISED: AtomicBool = AtomicBool::new(false);

pub(crate) fn open_close_lock() -> MutexGuard<'static, ()> {
    OPEN_CLOSE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sonames tried, newest first; VDDK 9 is ABI-compatible with 8.
const VERSIONS: [u32; 4] = [9, 8, 7, 6];

/// A function's field in the generated wrapper, and whether a loaded library has it.
type Probe = (&'static str, fn(&VixDiskLib) -> bool);

/// One table entry per function, named once: the field name is also the reported name.
macro_rules! probes {
    ($($field:ident),* $(,)?) => {
        [$((stringify!($field), |s: &VixDiskLib| s.$field.is_ok())),*]
    };
}

/// Functions every VDDK from 6.5 has.
const REQUIRED: [Probe; 23] = probes![
    VixDiskLib_InitEx,
    VixDiskLib_Exit,
    VixDiskLib_ListTransportModes,
    VixDiskLib_ConnectEx,
    VixDiskLib_Disconnect,
    VixDiskLib_Cleanup,
    VixDiskLib_PrepareForAccess,
    VixDiskLib_EndAccess,
    VixDiskLib_Open,
    VixDiskLib_Close,
    VixDiskLib_GetTransportMode,
    VixDiskLib_GetInfo,
    VixDiskLib_FreeInfo,
    VixDiskLib_Read,
    VixDiskLib_Write,
    VixDiskLib_ReadAsync,
    VixDiskLib_WriteAsync,
    VixDiskLib_Wait,
    VixDiskLib_Flush,
    VixDiskLib_GetMetadataKeys,
    VixDiskLib_ReadMetadata,
    VixDiskLib_GetErrorText,
    VixDiskLib_FreeErrorText,
];

/// Late additions (6.7): without them allocation maps degrade to "read everything".
const OPTIONAL: [Probe; 4] = probes![
    VixDiskLib_QueryAllocatedBlocks,
    VixDiskLib_FreeBlockList,
    VixDiskLib_AllocateConnectParams,
    VixDiskLib_FreeConnectParams,
];

/// A function's name without the `VixDiskLib_` prefix, as users read it.
fn short(field: &'static str) -> &'static str {
    field.strip_prefix("VixDiskLib_").unwrap_or(field)
}

/// A loaded, not yet initialised VixDiskLib.
pub struct Library {
    sys: Arc<VixDiskLib>,
    version: u32,
    path: PathBuf,
    libdir: PathBuf,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library").field("version", &self.version).field("path", &self.path).finish()
    }
}

impl Library {
    /// Loads VixDiskLib from `libdir` (a VDDK distribution folder, or a folder holding the
    /// library itself): `lib64/libvixDiskLib.so.N` then `libvixDiskLib.so.N`, for N = 9, 8, 7, 6.
    pub fn load(libdir: &Path) -> Result<Self, VddkError> {
        let mut tried = Vec::new();
        for version in VERSIONS {
            for path in
                [libdir.join("lib64"), libdir.to_path_buf()].map(|d| d.join(format!("libvixDiskLib.so.{version}")))
            {
                if !path.exists() {
                    tried.push((path, "no such file".to_owned()));
                    continue;
                }
                // SAFETY: the file is named as VixDiskLib, which is what the user pointed us at;
                // it is loaded before any fork (callers load at start-up).
                match unsafe { vddk_sys::load(&path) } {
                    Ok(sys) => {
                        if let Some((field, _)) = REQUIRED.iter().find(|(_, has)| !has(&sys)) {
                            return Err(VddkError::MissingSymbol { path, symbol: short(field) });
                        }
                        return Ok(Self { sys: Arc::new(sys), version, path, libdir: libdir.to_path_buf() });
                    }
                    Err(e) => tried.push((path, with_causes(&e))),
                }
            }
        }
        Err(VddkError::NotFound { libdir: libdir.to_path_buf(), tried })
    }

    /// The major version, from the soname (9, 8, 7 or 6).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The file that was loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Each optional function and whether this library has it.
    pub fn optional_functions(&self) -> Vec<(&'static str, bool)> {
        OPTIONAL.iter().map(|(field, has)| (short(field), has(&self.sys))).collect()
    }

    /// Runs `InitEx` (once per process), with VDDK's logs routed into `tracing`. Call it after
    /// any fork: VDDK starts threads.
    pub fn init(self, config_file: Option<&Path>) -> Result<Vddk, VddkError> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(VddkError::AlreadyInitialised);
        }
        let libdir = cstring(&self.libdir.to_string_lossy(), "libdir")?;
        let config = config_file.map(|c| cstring(&c.to_string_lossy(), "config file")).transpose()?;
        let (major, minor) = if self.version >= 7 { (self.version, 0) } else { (6, 5) };
        let _guard = open_close_lock();
        // SAFETY: InitEx runs once (checked above); the callbacks match VixDiskLibGenericLogFunc
        // and are thread-safe; the strings live across the call.
        let err = unsafe {
            self.sys.VixDiskLib_InitEx(
                major,
                minor,
                Some(crate::logging::log_info),
                Some(crate::logging::log_warn),
                Some(crate::logging::log_panic),
                libdir.as_ptr(),
                config.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if err != VIX_OK {
            INITIALISED.store(false, Ordering::SeqCst);
            return Err(call_error(&self.sys, "InitEx", err));
        }
        Ok(Vddk { inner: Arc::new(VddkInner { lib: self }) })
    }
}

/// An error and its causes, `: `-separated (libloading keeps dlopen's reason in the source).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

pub(crate) fn cstring(s: &str, what: &str) -> Result<CString, VddkError> {
    CString::new(s).map_err(|_| VddkError::Invalid(format!("{what} contains a NUL byte")))
}

/// Turns a failed `VixError` into the crate's error, with VDDK's own text.
pub(crate) fn call_error(sys: &VixDiskLib, op: &'static str, err: VixError) -> VddkError {
    let code = vddk_sys::vix_error_code(err);
    // SAFETY: GetErrorText takes any error value and a NULL locale; its result is freed only
    // with FreeErrorText, once.
    let text = unsafe {
        let p = sys.VixDiskLib_GetErrorText(err, std::ptr::null());
        if p.is_null() {
            format!("error {code}")
        } else {
            let t = CStr::from_ptr(p).to_string_lossy().into_owned();
            sys.VixDiskLib_FreeErrorText(p);
            t
        }
    };
    VddkError::Call { op, code, raw: err, text, class: ErrorClass::of(code) }
}

#[derive(Debug)]
struct VddkInner {
    lib: Library,
}

impl Drop for VddkInner {
    fn drop(&mut self) {
        let _guard = open_close_lock();
        // SAFETY: the last reference: every connection and disk holds one, so none is open.
        unsafe { self.lib.sys.VixDiskLib_Exit() };
        INITIALISED.store(false, Ordering::SeqCst);
    }
}

/// An initialised VixDiskLib. `Exit` runs when the last clone, connection and disk are gone.
#[derive(Debug, Clone)]
pub struct Vddk {
    inner: Arc<VddkInner>,
}

/// Credentials for a connection. `Debug` never shows the secrets.
#[derive(Clone)]
pub enum Credentials {
    /// User name and password.
    Password {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// An existing vSphere session's `vmware_soap_session` cookie.
    SessionCookie {
        /// The user.
        user: String,
        /// The cookie value.
        cookie: String,
        /// What VDDK calls the session key (VMware's samples pass the password).
        key: Option<String>,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Password { user, .. } => write!(f, "Password {{ user: {user:?}, password: *** }}"),
            Self::SessionCookie { user, .. } => write!(f, "SessionCookie {{ user: {user:?}, cookie: *** }}"),
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectParams {
    /// vCenter or ESXi; `None` for local files.
    pub server: Option<String>,
    /// The server's SHA-1 thumbprint, `AA:BB:...`.
    pub thumbprint: Option<String>,
    /// How to log in.
    pub credentials: Option<Credentials>,
    /// The VM's moref value (`vm-123`), sent as `moref=vm-123`.
    pub vm_moref: Option<String>,
    /// The snapshot's moref value (`snapshot-42`), to read the disks as of that snapshot.
    pub snapshot_moref: Option<String>,
    /// Transports to try in order (`hotadd`, `nbdssl`, ...); empty for VDDK's default.
    pub transports: Vec<String>,
    /// Read-only (faster paths, and what a backup needs).
    pub read_only: bool,
    /// The HTTPS port (443 when `None`).
    pub port: Option<u32>,
    /// The NFC port (902 when `None`).
    pub nfc_port: Option<u32>,
}

/// The C form of [`ConnectParams`], with the strings it points at.
pub(crate) struct NativeParams {
    ptr: *mut VixDiskLibConnectParams,
    allocated_by_library: bool,
    _strings: Vec<CString>,
    sys: Arc<VixDiskLib>,
}

// SAFETY: the struct and strings are owned exclusively by this value and only read by VDDK
// during calls made while it is borrowed.
unsafe impl Send for NativeParams {}
// SAFETY: as above; nothing mutates them after construction.
unsafe impl Sync for NativeParams {}

impl NativeParams {
    fn new(sys: &Arc<VixDiskLib>, p: &ConnectParams) -> Result<Self, VddkError> {
        let allocated_by_library =
            sys.VixDiskLib_AllocateConnectParams.is_ok() && sys.VixDiskLib_FreeConnectParams.is_ok();
        let ptr = if allocated_by_library {
            // SAFETY: the library allocates a zeroed struct of its own size; freed in Drop.
            unsafe { sys.VixDiskLib_AllocateConnectParams() }
        } else {
            // Older libraries: a zeroed 128-byte struct; they ignore what lies past their end.
            Box::into_raw(Box::new(VixDiskLibConnectParams::default()))
        };
        if ptr.is_null() {
            return Err(VddkError::Invalid("VixDiskLib_AllocateConnectParams returned NULL".into()));
        }
        let mut strings = Vec::new();
        let mut keep = |s: &str, what: &str| -> Result<*mut c_char, VddkError> {
            let c = cstring(s, what)?;
            let p = c.as_ptr().cast_mut();
            strings.push(c);
            Ok(p)
        };
        // SAFETY: ptr points at a valid, exclusively owned struct (allocated just above).
        let n = unsafe { &mut *ptr };
        if let Some(vm) = &p.vm_moref {
            n.vmxSpec = keep(&format!("moref={vm}"), "vm moref")?;
        }
        if let Some(s) = &p.server {
            n.serverName = keep(s, "server")?;
        }
        if let Some(t) = &p.thumbprint {
            n.thumbPrint = keep(t, "thumbprint")?;
        }
        match &p.credentials {
            Some(Credentials::Password { user, password }) => {
                n.credType = vddk_sys::VIXDISKLIB_CRED_UID;
                n.creds.uid.userName = keep(user, "user")?;
                n.creds.uid.password = keep(password, "password")?;
            }
            Some(Credentials::SessionCookie { user, cookie, key }) => {
                n.credType = vddk_sys::VIXDISKLIB_CRED_SESSIONID;
                n.creds.sessionId.userName = keep(user, "user")?;
                n.creds.sessionId.cookie = keep(cookie, "cookie")?;
                if let Some(k) = key {
                    n.creds.sessionId.key = keep(k, "session key")?;
                }
            }
            None => {}
        }
        n.port = p.port.unwrap_or(0);
        n.nfcHostPort = p.nfc_port.unwrap_or(0);
        n.specType = vddk_sys::VIXDISKLIB_SPEC_VMX;
        Ok(Self { ptr, allocated_by_library, _strings: strings, sys: sys.clone() })
    }
}

impl Drop for NativeParams {
    fn drop(&mut self) {
        if self.allocated_by_library {
            // SAFETY: allocated by AllocateConnectParams, freed once.
            unsafe { self.sys.VixDiskLib_FreeConnectParams(self.ptr) };
        } else {
            // SAFETY: allocated by Box::into_raw above, freed once.
            drop(unsafe { Box::from_raw(self.ptr) });
        }
    }
}

impl Vddk {
    pub(crate) fn sys(&self) -> &Arc<VixDiskLib> {
        &self.inner.lib.sys
    }

    /// The loaded library.
    pub fn library(&self) -> &Library {
        &self.inner.lib
    }

    /// The transports this library offers (`file:san:hotadd:nbdssl:nbd`).
    pub fn transport_modes(&self) -> String {
        // SAFETY: returns a static string, or NULL.
        let p = unsafe { self.sys().VixDiskLib_ListTransportModes() };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: a NUL-terminated static string owned by the library.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Connects (`ConnectEx`), serialised with every Open and Close in the process.
    pub fn connect(&self, params: &ConnectParams) -> Result<Connection, VddkError> {
        let native = NativeParams::new(self.sys(), params)?;
        let snapshot = params.snapshot_moref.as_deref().map(|s| cstring(s, "snapshot moref")).transpose()?;
        let transports =
            (!params.transports.is_empty()).then(|| cstring(&params.transports.join(":"), "transports")).transpose()?;
        let mut conn: VixDiskLibConnection = std::ptr::null_mut();
        let err = {
            let _guard = open_close_lock();
            // SAFETY: native outlives the call; the optional strings are NULL or live
            // CStrings; conn is a valid out-pointer.
            unsafe {
                self.sys().VixDiskLib_ConnectEx(
                    native.ptr,
                    vddk_sys::Bool::from(params.read_only),
                    snapshot.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    transports.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                    &mut conn,
                )
            }
        };
        if err != VIX_OK {
            return Err(call_error(self.sys(), "ConnectEx", err));
        }
        Ok(Connection { inner: Arc::new(ConnectionInner { vddk: self.clone(), conn, _params: native }) })
    }

    /// Tells vCenter a VM's disks are about to be read, so it blocks Storage vMotion
    /// (`PrepareForAccess`). `identity` names the application (at most 50 characters).
    pub fn prepare_for_access(&self, params: &ConnectParams, identity: &str) -> Result<(), VddkError> {
        self.access_call(params, identity, true)
    }

    /// The matching `EndAccess`, after the disks are closed and the snapshot removed.
    pub fn end_access(&self, params: &ConnectParams, identity: &str) -> Result<(), VddkError> {
        self.access_call(params, identity, false)
    }

    fn access_call(&self, params: &ConnectParams, identity: &str, prepare: bool) -> Result<(), VddkError> {
        let native = NativeParams::new(self.sys(), params)?;
        let id = cstring(identity, "identity")?;
        // SAFETY: both pointers are valid for the call.
        let err = unsafe {
            if prepare {
                self.sys().VixDiskLib_PrepareForAccess(native.ptr, id.as_ptr())
            } else {
                self.sys().VixDiskLib_EndAccess(native.ptr, id.as_ptr())
            }
        };
        if err != VIX_OK {
            return Err(call_error(self.sys(), if prepare { "PrepareForAccess" } else { "EndAccess" }, err));
        }
        Ok(())
    }

    /// Removes state an unclean exit left behind (HotAdd disks); returns (cleaned, remaining).
    pub fn cleanup(&self, params: &ConnectParams) -> Result<(u32, u32), VddkError> {
        let mut p = params.clone();
        p.vm_moref = None;
        let native = NativeParams::new(self.sys(), &p)?;
        let (mut cleaned, mut remaining) = (0u32, 0u32);
        let _guard = open_close_lock();
        // SAFETY: valid params and out-pointers for the call.
        let err = unsafe { self.sys().VixDiskLib_Cleanup(native.ptr, &mut cleaned, &mut remaining) };
        if err != VIX_OK {
            return Err(call_error(self.sys(), "Cleanup", err));
        }
        Ok((cleaned, remaining))
    }
}

pub(crate) struct ConnectionInner {
    pub(crate) vddk: Vddk,
    pub(crate) conn: VixDiskLibConnection,
    /// Owned so the strings VDDK points at outlive the connection; dropped after Disconnect.
    _params: NativeParams,
}

// SAFETY: a VDDK connection handle may be used from any thread; the calls that need it
// (Open, Disconnect) are serialised by the open/close lock.
unsafe impl Send for ConnectionInner {}
// SAFETY: as above.
unsafe impl Sync for ConnectionInner {}

impl Drop for ConnectionInner {
    fn drop(&mut self) {
        let _guard = open_close_lock();
        // SAFETY: the last reference: every disk of this connection holds one, so all are
        // closed; the params outlive the connection.
        // (The params are a field, so they are dropped after this, outliving the connection.)
        unsafe { self.vddk.sys().VixDiskLib_Disconnect(self.conn) };
    }
}

/// A connection to a server (or to local files). Disks opened from it keep it alive.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<ConnectionInner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connection")
    }
}
