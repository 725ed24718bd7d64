//! An open virtual disk, served by one owned worker thread that makes every VDDK call for its
//! handle, in order: VDDK's rule that a handle is used by one thread at a time holds by
//! construction, and `QueryAllocatedBlocks` runs on the thread that opened the disk.
//! Callers send a closed set of commands and block on, or await, the reply.

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vddk_sys::{VIX_ASYNC, VIX_OK, VixDiskLib, VixDiskLibHandle, VixDiskLibInfo, VixError};

use crate::error::VddkError;
use crate::library::{Connection, ConnectionInner, call_error, cstring, open_close_lock};
use crate::reply::{ReplyRx, ReplyTx, reply};

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Longest metadata value or key list accepted from the library.
const MAX_METADATA: usize = 1 << 16;
/// Smallest chunk `QueryAllocatedBlocks` takes, in sectors.
const MIN_CHUNK: u64 = 128;
/// Most chunks per `QueryAllocatedBlocks` call.
const MAX_CHUNKS: u64 = 512 * 1024;

/// Open flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenFlags {
    /// Read only (what a backup needs).
    pub read_only: bool,
    /// Only this link of a chain, not its parents (unallocated then means "not here").
    pub single_link: bool,
    /// Bypass the host cache.
    pub unbuffered: bool,
}

impl OpenFlags {
    fn bits(self) -> u32 {
        let mut b = 0;
        if self.unbuffered {
            b |= vddk_sys::VIXDISKLIB_FLAG_OPEN_UNBUFFERED;
        }
        if self.single_link {
            b |= vddk_sys::VIXDISKLIB_FLAG_OPEN_SINGLE_LINK;
        }
        if self.read_only {
            b |= vddk_sys::VIXDISKLIB_FLAG_OPEN_READ_ONLY;
        }
        b
    }
}

/// What `GetInfo` says about a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in sectors.
    pub capacity_sectors: u64,
    /// BIOS geometry (cylinders, heads, sectors).
    pub bios_geometry: (u32, u32, u32),
    /// The adapter type (1 IDE, 2 BusLogic, 3 LSI Logic, 256 unknown).
    pub adapter_type: u32,
    /// Links in the chain (base plus redo logs).
    pub links: i32,
    /// The disk's UUID, when given.
    pub uuid: Option<String>,
    /// Logical and physical sector sizes (VDDK 7 and later only).
    pub sector_sizes: Option<(u32, u32)>,
}

impl DiskInfo {
    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity_sectors * SECTOR
    }
}

/// Allocated `(first sector, sectors)` ranges, or `None` when the library cannot tell.
pub type Blocks = Option<Vec<(u64, u64)>>;

enum Command {
    Read { sector: u64, buf: Vec<u8>, reply: ReplyTx<Result<Vec<u8>, VddkError>> },
    ReadAsync { requests: Vec<(u64, Vec<u8>)>, reply: ReplyTx<Result<Vec<Vec<u8>>, VddkError>> },
    Write { sector: u64, buf: Vec<u8>, reply: ReplyTx<Result<Vec<u8>, VddkError>> },
    Flush { reply: ReplyTx<Result<(), VddkError>> },
    Allocated { start: u64, count: u64, chunk: u64, reply: ReplyTx<Result<Blocks, VddkError>> },
    MetadataKeys { reply: ReplyTx<Result<Vec<String>, VddkError>> },
    ReadMetadata { key: String, reply: ReplyTx<Result<Option<String>, VddkError>> },
}

/// An open disk. Dropping it stops its worker, which waits for outstanding I/O and closes the
/// handle under the process-wide open/close lock.
#[derive(Debug)]
pub struct Disk {
    commands: Option<mpsc::Sender<Command>>,
    worker: Option<JoinHandle<()>>,
    info: DiskInfo,
    transport: String,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl Connection {
    /// Opens the disk at `path` (`[datastore] vm/vm.vmdk`, from the snapshot's device list) on a
    /// new worker thread.
    pub fn open(&self, path: &str, flags: OpenFlags) -> Result<Disk, VddkError> {
        let path = cstring(path, "disk path")?;
        let conn = self.inner.clone();
        let (opened_tx, opened_rx) = reply::<Result<(DiskInfo, String), VddkError>>();
        let (commands, inbox) = mpsc::channel::<Command>();
        let worker = std::thread::Builder::new()
            .name("vddk-disk".into())
            .spawn(move || {
                let handle = match Handle::open(conn, &path, flags.bits()) {
                    Ok(h) => h,
                    Err(e) => return opened_tx.send(Err(e)),
                };
                match handle.info().map(|i| (i, handle.transport())) {
                    Ok(x) => opened_tx.send(Ok(x)),
                    Err(e) => return opened_tx.send(Err(e)),
                }
                for command in inbox {
                    handle.serve(command);
                }
                // The sender is gone: Drop of `handle` waits and closes.
            })
            .map_err(|e| VddkError::Invalid(format!("cannot start a worker thread: {e}")))?;
        let (info, transport) = opened_rx.wait().ok_or(VddkError::WorkerGone)??;
        Ok(Disk { commands: Some(commands), worker: Some(worker), info, transport })
    }
}

impl Disk {
    /// What `GetInfo` said.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// The transport VDDK chose (`file`, `san`, `hotadd`, `nbd`, `nbdssl`).
    pub fn transport(&self) -> &str {
        &self.transport
    }

    fn send<T>(&self, make: impl FnOnce(ReplyTx<T>) -> Command) -> Result<ReplyRx<T>, VddkError> {
        let (tx, rx) = reply();
        self.commands.as_ref().ok_or(VddkError::WorkerGone)?.send(make(tx)).map_err(|_| VddkError::WorkerGone)?;
        Ok(rx)
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector`; returns the filled buffer.
    pub fn read(&self, sector: u64, buf: Vec<u8>) -> Result<Vec<u8>, VddkError> {
        self.read_request(sector, buf)?.wait().ok_or(VddkError::WorkerGone)?
    }

    /// The same read, as a future (for the block pipeline); the worker does the work.
    pub fn read_request(&self, sector: u64, buf: Vec<u8>) -> Result<ReplyRx<Result<Vec<u8>, VddkError>>, VddkError> {
        check_sectors(buf.len())?;
        self.send(|reply| Command::Read { sector, buf, reply })
    }

    /// Several reads issued with `ReadAsync` and retired by `Wait`: as many in flight as the
    /// transport allows (really asynchronous on NBDSSL).
    pub fn read_async(&self, requests: Vec<(u64, Vec<u8>)>) -> Result<Vec<Vec<u8>>, VddkError> {
        for (_, b) in &requests {
            check_sectors(b.len())?;
        }
        self.send(|reply| Command::ReadAsync { requests, reply })?.wait().ok_or(VddkError::WorkerGone)?
    }

    /// Writes `buf` (whole sectors) at `sector`; returns the buffer for reuse.
    pub fn write(&self, sector: u64, buf: Vec<u8>) -> Result<Vec<u8>, VddkError> {
        self.write_request(sector, buf)?.wait().ok_or(VddkError::WorkerGone)?
    }

    /// The same write, as a future (for the block pipeline's sinks); the worker does the work,
    /// in the order the requests were made.
    pub fn write_request(&self, sector: u64, buf: Vec<u8>) -> Result<ReplyRx<Result<Vec<u8>, VddkError>>, VddkError> {
        check_sectors(buf.len())?;
        self.send(|reply| Command::Write { sector, buf, reply })
    }

    /// `Wait` then `Flush`.
    pub fn flush(&self) -> Result<(), VddkError> {
        self.flush_request()?.wait().ok_or(VddkError::WorkerGone)?
    }

    /// The same flush, as a future: it runs after every request made before it.
    pub fn flush_request(&self) -> Result<ReplyRx<Result<(), VddkError>>, VddkError> {
        self.send(|reply| Command::Flush { reply })
    }

    /// The allocated ranges `(first sector, sectors)` of `[start, start+count)` at `chunk`
    /// sectors' granularity (at least 128), asked in pieces of at most 512 Ki chunks. `None`
    /// when the library is older than 6.7: then everything must be read.
    pub fn allocated_blocks(&self, start: u64, count: u64, chunk: u64) -> Result<Blocks, VddkError> {
        self.send(|reply| Command::Allocated { start, count, chunk, reply })?.wait().ok_or(VddkError::WorkerGone)?
    }

    /// The disk database keys (without `ddb.`).
    pub fn metadata_keys(&self) -> Result<Vec<String>, VddkError> {
        self.send(|reply| Command::MetadataKeys { reply })?.wait().ok_or(VddkError::WorkerGone)?
    }

    /// One disk database value, `None` if the key is absent.
    pub fn read_metadata(&self, key: &str) -> Result<Option<String>, VddkError> {
        let key = key.to_owned();
        self.send(|reply| Command::ReadMetadata { key, reply })?.wait().ok_or(VddkError::WorkerGone)?
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn check_sectors(len: usize) -> Result<(), VddkError> {
    if !(len as u64).is_multiple_of(SECTOR) || len == 0 {
        return Err(VddkError::Invalid(format!("a buffer of {len} bytes is not a whole number of sectors")));
    }
    Ok(())
}

/// The handle, owned by the worker thread.
struct Handle {
    conn: Arc<ConnectionInner>,
    handle: VixDiskLibHandle,
}

impl Handle {
    fn sys(&self) -> &VixDiskLib {
        self.conn.vddk.sys()
    }

    fn check(&self, op: &'static str, err: VixError) -> Result<(), VddkError> {
        if err == VIX_OK { Ok(()) } else { Err(call_error(self.sys(), op, err)) }
    }

    fn open(conn: Arc<ConnectionInner>, path: &CStr, flags: u32) -> Result<Self, VddkError> {
        let mut handle: VixDiskLibHandle = std::ptr::null_mut();
        let err = {
            let _guard = open_close_lock();
            // SAFETY: a live connection, a NUL-terminated path and a valid out-pointer; Open is
            // serialised by the lock.
            unsafe { conn.vddk.sys().VixDiskLib_Open(conn.conn, path.as_ptr(), flags, &mut handle) }
        };
        if err != VIX_OK {
            return Err(call_error(conn.vddk.sys(), "Open", err));
        }
        Ok(Self { conn, handle })
    }

    fn transport(&self) -> String {
        // SAFETY: a live handle; the result is a static string or NULL.
        let p = unsafe { self.sys().VixDiskLib_GetTransportMode(self.handle) };
        if p.is_null() {
            return String::new();
        }
        // SAFETY: NUL-terminated and owned by the library.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn info(&self) -> Result<DiskInfo, VddkError> {
        let mut info: *mut VixDiskLibInfo = std::ptr::null_mut();
        // SAFETY: a live handle and a valid out-pointer.
        self.check("GetInfo", unsafe { self.sys().VixDiskLib_GetInfo(self.handle, &mut info) })?;
        if info.is_null() {
            return Err(VddkError::Invalid("GetInfo returned no info".into()));
        }
        let version = self.conn.vddk.library().version();
        // SAFETY: the library returned a VixDiskLibInfo of its own version's size: the first
        // 56 bytes always exist, the sector sizes only from VDDK 7, so they are read only then
        // (reading them on 6.x runs past the allocation).
        let result = unsafe {
            let i = &*info.cast::<VixDiskLibInfoPrefix>();
            let uuid = (!i.uuid.is_null()).then(|| CStr::from_ptr(i.uuid).to_string_lossy().into_owned());
            let sector_sizes = (version >= 7).then(|| ((*info).logicalSectorSize, (*info).physicalSectorSize));
            DiskInfo {
                capacity_sectors: i.capacity,
                bios_geometry: (i.bios.cylinders, i.bios.heads, i.bios.sectors),
                adapter_type: i.adapter_type,
                links: i.num_links,
                uuid,
                sector_sizes,
            }
        };
        // SAFETY: freed once, with the library's own function.
        unsafe { self.sys().VixDiskLib_FreeInfo(info) };
        result.capacity_sectors.checked_mul(SECTOR).ok_or_else(|| VddkError::Invalid("capacity overflows".into()))?;
        Ok(result)
    }

    fn serve(&self, command: Command) {
        match command {
            Command::Read { sector, mut buf, reply } => {
                let n = buf.len() as u64 / SECTOR;
                // SAFETY: buf holds exactly n sectors and outlives the synchronous call.
                let err = unsafe { self.sys().VixDiskLib_Read(self.handle, sector, n, buf.as_mut_ptr()) };
                reply.send(self.check("Read", err).map(|()| buf));
            }
            Command::ReadAsync { requests, reply } => reply.send(self.read_async(requests)),
            Command::Write { sector, buf, reply } => {
                let n = buf.len() as u64 / SECTOR;
                // SAFETY: buf holds exactly n sectors and outlives the synchronous call.
                let err = unsafe { self.sys().VixDiskLib_Write(self.handle, sector, n, buf.as_ptr()) };
                reply.send(self.check("Write", err).map(|()| buf));
            }
            Command::Flush { reply } => {
                // SAFETY: a live handle.
                let result = self
                    .check("Wait", unsafe { self.sys().VixDiskLib_Wait(self.handle) })
                    // SAFETY: a live handle with nothing outstanding.
                    .and_then(|()| self.check("Flush", unsafe { self.sys().VixDiskLib_Flush(self.handle) }));
                reply.send(result);
            }
            Command::Allocated { start, count, chunk, reply } => reply.send(self.allocated(start, count, chunk)),
            Command::MetadataKeys { reply } => reply.send(self.metadata_keys()),
            Command::ReadMetadata { key, reply } => reply.send(self.read_metadata(&key)),
        }
    }

    fn read_async(&self, requests: Vec<(u64, Vec<u8>)>) -> Result<Vec<Vec<u8>>, VddkError> {
        /// Where a completion callback leaves its result (kept alive until after `Wait`).
        struct Done(std::sync::Mutex<Option<VixError>>);
        unsafe extern "C" fn on_done(data: *mut c_void, result: VixError) {
            // SAFETY: data is a &Done kept alive by read_async until Wait returned.
            let done = unsafe { &*data.cast::<Done>() };
            *done.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        }
        let mut buffers: Vec<Vec<u8>> = requests.iter().map(|_| Vec::new()).collect();
        let slots: Vec<Done> = requests.iter().map(|_| Done(std::sync::Mutex::new(None))).collect();
        let mut submit_error = None;
        for (i, (sector, buf)) in requests.into_iter().enumerate() {
            buffers[i] = buf;
            let n = buffers[i].len() as u64 / SECTOR;
            let data = std::ptr::from_ref(&slots[i]).cast_mut().cast::<c_void>();
            // SAFETY: the buffer and the slot stay alive and unmoved until Wait below returns
            // (the Vec of buffers is not resized from here on).
            let err = unsafe {
                self.sys().VixDiskLib_ReadAsync(self.handle, sector, n, buffers[i].as_mut_ptr(), Some(on_done), data)
            };
            if err != VIX_ASYNC && err != VIX_OK {
                submit_error = Some(call_error(self.sys(), "ReadAsync", err));
                break;
            }
        }
        // Always wait: submitted requests still own their buffers until they complete.
        // SAFETY: a live handle.
        self.check("Wait", unsafe { self.sys().VixDiskLib_Wait(self.handle) })?;
        if let Some(e) = submit_error {
            return Err(e);
        }
        for slot in &slots {
            match *slot.0.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(VIX_OK) => {}
                Some(err) => return Err(call_error(self.sys(), "ReadAsync", err)),
                None => return Err(VddkError::Invalid("Wait returned before a read completed".into())),
            }
        }
        Ok(buffers)
    }

    fn allocated(&self, start: u64, count: u64, chunk: u64) -> Result<Blocks, VddkError> {
        let sys = self.sys();
        if sys.VixDiskLib_QueryAllocatedBlocks.is_err() || sys.VixDiskLib_FreeBlockList.is_err() {
            return Ok(None);
        }
        if chunk < MIN_CHUNK {
            return Err(VddkError::Invalid(format!("chunk of {chunk} sectors (at least {MIN_CHUNK})")));
        }
        let end = start.checked_add(count).ok_or_else(|| VddkError::Invalid("range overflows".into()))?;
        let mut at = start - start % chunk;
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        while at < end {
            let n = (end - at).div_ceil(chunk).min(MAX_CHUNKS) * chunk;
            let mut list: *mut vddk_sys::VixDiskLibBlockList = std::ptr::null_mut();
            // SAFETY: a live handle on the thread that opened it; valid out-pointer.
            self.check("QueryAllocatedBlocks", unsafe {
                sys.VixDiskLib_QueryAllocatedBlocks(self.handle, at, n, chunk, &mut list)
            })?;
            if list.is_null() {
                return Err(VddkError::Invalid("QueryAllocatedBlocks returned no list".into()));
            }
            // SAFETY: the list holds numBlocks entries after its 8-byte count (layout checked in
            // vddk-sys); read, then freed once with the library's function.
            let got: Vec<(u64, u64)> = unsafe {
                let count = (*list).numBlocks as usize;
                let first = std::ptr::addr_of!((*list).blocks).cast::<vddk_sys::VixDiskLibBlock>();
                let v = (0..count).map(|i| *first.add(i)).map(|b| (b.offset, b.length)).collect();
                sys.VixDiskLib_FreeBlockList(list);
                v
            };
            for (offset, length) in got {
                // Every block must lie in the range asked about.
                let ok = offset >= at && offset.checked_add(length).is_some_and(|e| e <= at + n) && length > 0;
                if !ok {
                    return Err(VddkError::Invalid(format!(
                        "QueryAllocatedBlocks returned ({offset}, {length}) outside [{at}, {})",
                        at + n
                    )));
                }
                let (s, e) = (offset.max(start), (offset + length).min(end));
                match blocks.last_mut() {
                    Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(e - last.0),
                    _ if e > s => blocks.push((s, e - s)),
                    _ => {}
                }
            }
            at += n;
        }
        Ok(Some(blocks))
    }

    /// The two-call pattern: ask the length, then fill a buffer of that length (capped).
    fn two_call(
        &self,
        op: &'static str,
        call: impl Fn(*mut std::ffi::c_char, usize, *mut usize) -> VixError,
    ) -> Result<Option<Vec<u8>>, VddkError> {
        let mut needed = 0usize;
        let err = call(std::ptr::null_mut(), 0, &mut needed);
        match vddk_sys::vix_error_code(err) {
            0 | 24 => {}
            16052 => return Ok(None),
            _ => return Err(call_error(self.sys(), op, err)),
        }
        if needed == 0 || needed > MAX_METADATA {
            return Err(VddkError::Invalid(format!("{op} wants a buffer of {needed} bytes")));
        }
        let mut buf = vec![0u8; needed];
        let err = call(buf.as_mut_ptr().cast(), buf.len(), &mut needed);
        if vddk_sys::vix_error_code(err) == 16052 {
            return Ok(None);
        }
        self.check(op, err)?;
        Ok(Some(buf))
    }

    fn metadata_keys(&self) -> Result<Vec<String>, VddkError> {
        let buf = self.two_call("GetMetadataKeys", |b, len, need| {
            // SAFETY: b is NULL with len 0, or a writable buffer of len bytes.
            unsafe { self.sys().VixDiskLib_GetMetadataKeys(self.handle, b, len, need) }
        })?;
        Ok(buf
            .unwrap_or_default()
            .split(|&b| b == 0)
            .filter(|k| !k.is_empty())
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect())
    }

    fn read_metadata(&self, key: &str) -> Result<Option<String>, VddkError> {
        let key = cstring(key, "metadata key")?;
        let buf = self.two_call("ReadMetadata", |b, len, need| {
            // SAFETY: key is NUL-terminated; b is NULL with len 0, or writable for len bytes.
            unsafe { self.sys().VixDiskLib_ReadMetadata(self.handle, key.as_ptr(), b, len, need) }
        })?;
        Ok(buf.map(|b| String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or_default()).into_owned()))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a live handle: retire outstanding I/O, then close under the lock.
        unsafe { self.sys().VixDiskLib_Wait(self.handle) };
        let _guard = open_close_lock();
        // SAFETY: as above; the handle is not used again.
        unsafe { self.sys().VixDiskLib_Close(self.handle) };
    }
}

/// The first 56 bytes of `VixDiskLibInfo`, which every VDDK version has.
#[repr(C)]
struct VixDiskLibInfoPrefix {
    bios: vddk_sys::VixDiskLibGeometry,
    phys: vddk_sys::VixDiskLibGeometry,
    capacity: u64,
    adapter_type: u32,
    num_links: i32,
    parent_hint: *mut std::ffi::c_char,
    uuid: *mut std::ffi::c_char,
}

const _: () = assert!(std::mem::size_of::<VixDiskLibInfoPrefix>() == vddk_sys::INFO_SIZE_BEFORE_7);
