//! An async NBD client: fixed-newstyle negotiation (structured replies, `base:allocation`,
//! `NBD_OPT_GO`, with a fallback to `NBD_OPT_EXPORT_NAME` for old servers), then many requests
//! in flight on one connection, their replies routed by cookie by a reader task.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::NbdError;
use crate::proto::{self, Info, ReplyHeader, Request, chunk, cmd, opt, rep, tflag};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket.
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
}

/// What negotiation established about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::tflag`).
    pub flags: u16,
    /// Block size constraints (minimum, preferred, maximum), when the server gave them.
    pub block_size: Option<(u32, u32, u32)>,
    /// Whether replies are structured (reads can report holes).
    pub structured: bool,
    /// The `base:allocation` context id, when block status is available.
    pub allocation_context: Option<u32>,
}

impl Export {
    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & tflag::READ_ONLY != 0
    }

    /// Whether several connections may be opened to it with consistent results.
    pub fn multi_conn(&self) -> bool {
        self.flags & tflag::CAN_MULTI_CONN != 0
    }
}

/// One `base:allocation` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// `proto::state` flags (HOLE, ZERO).
    pub flags: u32,
}

/// The two directions of a connection, owned separately: the kernel lets one task read while
/// another writes, with no lock between them (`tokio::io::split` would take one on every poll,
/// measured as tens of thousands of futex waits per copy).
type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Replies are read through a buffer, so the small headers do not cost a system call each;
/// payloads larger than the buffer go straight into the request's memory.
type Reader = tokio::io::BufReader<Box<dyn AsyncRead + Send + Unpin>>;

/// The reply buffer: room for many headers, yet small, because the part of a payload that
/// arrives with a header is copied once more out of it (with 64 KiB, `memmove` was 2.8 % of a
/// copy's CPU).
const REPLY_BUFFER: usize = 8 << 10;

/// What a request is waiting for, owned by the table until its reply is done.
enum Waiting {
    Read { offset: u64, buf: BytesMut, covered: u64 },
    Status { offset: u64, extents: Vec<Extent> },
    Plain,
}

enum Done {
    Read(BytesMut),
    Status(Vec<Extent>),
    Plain,
}

struct Pending {
    op: &'static str,
    waiting: Waiting,
    error: Option<NbdError>,
    reply: oneshot::Sender<Result<Done, NbdError>>,
}

struct Shared {
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_cookie: AtomicU64,
    closed: Mutex<Option<String>>,
}

impl Shared {
    /// Why the connection is closed, once it is.
    fn closed_reason(&self) -> Option<String> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection to one NBD export. Requests may be issued concurrently from many tasks.
pub struct Client {
    shared: Arc<Shared>,
    export: Export,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("export", &self.export).finish()
    }
}

impl Client {
    /// Connects and negotiates `export` (often `""`).
    pub async fn connect(target: &Target, export: &str) -> Result<Self, NbdError> {
        let (negotiated, reader, writer): (Export, Box<dyn AsyncRead + Send + Unpin>, Writer) = match target {
            Target::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                let e = negotiate(&mut s, export).await?;
                let (r, w) = s.into_split();
                (e, Box::new(r), Box::new(w))
            }
            Target::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                let e = negotiate(&mut s, export).await?;
                let (r, w) = s.into_split();
                (e, Box::new(r), Box::new(w))
            }
        };
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            closed: Mutex::new(None),
        });
        let reader = tokio::io::BufReader::with_capacity(REPLY_BUFFER, reader);
        let task = tokio::spawn(read_replies(reader, shared.clone()));
        Ok(Self { shared, export: negotiated, reader: task })
    }

    /// What negotiation established.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// "Don't fragment" when the server allows it: one data chunk per read, so the server does
    /// not look for holes in data the client has already mapped with block status.
    fn read_flags(&self) -> u16 {
        if self.export.structured && self.export.flags & tflag::SEND_DF != 0 { proto::cflag::DF } else { 0 }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        if offset.checked_add(length).is_none_or(|end| end > self.export.size) {
            return Err(NbdError::OutOfRange { offset, length, size: self.export.size });
        }
        Ok(())
    }

    /// Sends `req` (its cookie is assigned here) with `payload`, and waits for its reply.
    async fn request(
        &self,
        op: &'static str,
        mut req: Request,
        payload: &[u8],
        waiting: Waiting,
    ) -> Result<Done, NbdError> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        req.cookie = cookie;
        let (tx, rx) = oneshot::channel();
        {
            if let Some(why) = self.shared.closed_reason() {
                return Err(NbdError::Closed(why));
            }
            self.shared.table().insert(cookie, Pending { op, waiting, error: None, reply: tx });
            // The reader may have failed (and drained the table) between the check and the
            // insert: look again, or this request would wait forever.
            if let Some(why) = self.shared.closed_reason() {
                self.shared.table().remove(&cookie);
                return Err(NbdError::Closed(why));
            }
        }
        let header = req.encode();
        let sent = {
            let mut w = self.shared.writer.lock().await;
            async {
                w.write_all(&header).await?;
                w.write_all(payload).await?;
                w.flush().await
            }
            .await
        };
        if let Err(e) = sent {
            self.shared.table().remove(&cookie);
            return Err(e.into());
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(NbdError::Closed(
                self.shared
                    .closed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "reader stopped".into()),
            )),
        }
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<BytesMut, NbdError> {
        self.read_into(offset, BytesMut::zeroed(length as usize)).await
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, which is handed back (so a caller can
    /// reuse its buffers); the data goes from the socket straight into it.
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, NbdError> {
        let length = u32::try_from(buf.len()).map_err(|_| NbdError::Protocol("read larger than 4 GiB".into()))?;
        self.check_range(offset, u64::from(length))?;
        // Servers differ on empty requests (nbdkit refuses them); nothing to ask for anyway.
        if length == 0 {
            return Ok(buf);
        }
        match self
            .request(
                "read",
                req(cmd::READ, self.read_flags(), offset, length),
                &[],
                Waiting::Read { offset, buf, covered: 0 },
            )
            .await?
        {
            Done::Read(b) => Ok(b),
            _ => Err(NbdError::Protocol("read finished without data".into())),
        }
    }

    /// Writes `data` at `offset`, durable before the reply if `fua`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let length = u32::try_from(data.len()).map_err(|_| NbdError::Protocol("write larger than 4 GiB".into()))?;
        self.check_range(offset, u64::from(length))?;
        if self.export.read_only() {
            return Err(NbdError::Unsupported("writes (the export is read-only)"));
        }
        if length == 0 {
            return Ok(());
        }
        let flags = if fua && self.export.flags & tflag::SEND_FUA != 0 { proto::cflag::FUA } else { 0 };
        self.request("write", req(cmd::WRITE, flags, offset, length), data, Waiting::Plain).await.map(|_| ())
    }

    /// Writes zeros without sending them (`NBD_CMD_WRITE_ZEROES`; never TRIM, whose contents
    /// are undefined afterwards). The server may punch a hole.
    pub async fn write_zeroes(&self, offset: u64, length: u32) -> Result<(), NbdError> {
        self.check_range(offset, u64::from(length))?;
        if self.export.flags & tflag::SEND_WRITE_ZEROES == 0 {
            return Err(NbdError::Unsupported("WRITE_ZEROES"));
        }
        if length == 0 {
            return Ok(());
        }
        self.request("write_zeroes", req(cmd::WRITE_ZEROES, 0, offset, length), &[], Waiting::Plain).await.map(|_| ())
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if self.export.flags & tflag::SEND_FLUSH == 0 {
            return Err(NbdError::Unsupported("FLUSH"));
        }
        self.request("flush", req(cmd::FLUSH, 0, 0, 0), &[], Waiting::Plain).await.map(|_| ())
    }

    /// `base:allocation` from `offset`: the server answers for a prefix of the range (at least
    /// one extent); call again from where it stopped.
    pub async fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>, NbdError> {
        self.check_range(offset, u64::from(length))?;
        if self.export.allocation_context.is_none() {
            return Err(NbdError::Unsupported("base:allocation block status"));
        }
        match self
            .request(
                "block_status",
                req(cmd::BLOCK_STATUS, 0, offset, length),
                &[],
                Waiting::Status { offset, extents: Vec::new() },
            )
            .await?
        {
            Done::Status(e) if !e.is_empty() => Ok(e),
            _ => Err(NbdError::Protocol("block status without extents".into())),
        }
    }

    /// Ends the session politely.
    pub async fn disconnect(self) -> Result<(), NbdError> {
        let header = Request { flags: 0, kind: cmd::DISC, cookie: 0, offset: 0, length: 0 }.encode();
        let mut w = self.shared.writer.lock().await;
        w.write_all(&header).await?;
        w.shutdown().await?;
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A request header without its cookie (assigned when it is sent).
fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request { flags, kind, cookie: 0, offset, length }
}

/// Reads replies until the connection ends, completing pending requests; on any error, fails
/// every request still waiting and refuses new ones.
async fn read_replies(mut r: Reader, shared: Arc<Shared>) {
    let why = match reply_loop(&mut r, &shared).await {
        Ok(()) => "the server closed the connection".to_owned(),
        Err(e) => e.to_string(),
    };
    *shared.closed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
    for (_, p) in shared.table().drain() {
        let _ = p.reply.send(Err(NbdError::Closed(why.clone())));
    }
}

async fn reply_loop(r: &mut Reader, shared: &Shared) -> Result<(), NbdError> {
    loop {
        let mut magic = [0u8; 4];
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let len = proto::reply_header_len(u32::from_be_bytes(magic))?;
        let mut header = [0u8; 20];
        header[..4].copy_from_slice(&magic);
        r.read_exact(&mut header[4..len]).await?;
        match proto::parse_reply_header(&header[..len])? {
            ReplyHeader::Simple { cookie, error } => {
                let mut p = shared
                    .table()
                    .remove(&cookie)
                    .ok_or_else(|| NbdError::Protocol(format!("reply for unknown cookie {cookie}")))?;
                let result = if error != 0 {
                    // A failed read sends no data.
                    Err(NbdError::Server { op: p.op, errno: error, message: String::new(), offset: None })
                } else {
                    match &mut p.waiting {
                        Waiting::Read { buf, .. } => {
                            r.read_exact(buf).await?;
                            Ok(Done::Read(std::mem::take(buf)))
                        }
                        Waiting::Status { .. } => Err(NbdError::Protocol("simple reply to block status".into())),
                        Waiting::Plain => Ok(Done::Plain),
                    }
                };
                let _ = p.reply.send(result);
            }
            ReplyHeader::Structured { cookie, flags, kind, length } => {
                chunk_in(r, shared, cookie, flags, kind, length).await?;
            }
        }
    }
}

async fn chunk_in(
    r: &mut Reader,
    shared: &Shared,
    cookie: u64,
    flags: u16,
    kind: u16,
    length: u32,
) -> Result<(), NbdError> {
    // Take the entry out while its data is read; put it back unless this chunk ends it.
    let mut p = shared
        .table()
        .remove(&cookie)
        .ok_or_else(|| NbdError::Protocol(format!("chunk for unknown cookie {cookie}")))?;
    let result = chunk_body(r, &mut p, kind, length).await;
    if let Err(e) = result {
        // A protocol error poisons the connection; tell this request first.
        let _ = p.reply.send(Err(NbdError::Protocol(e.to_string())));
        return Err(e);
    }
    if flags & chunk::FLAG_DONE == 0 {
        shared.table().insert(cookie, p);
        return Ok(());
    }
    let outcome = match (p.error.take(), p.waiting) {
        (Some(e), _) => Err(e),
        (None, Waiting::Read { buf, covered, .. }) if covered == buf.len() as u64 => Ok(Done::Read(buf)),
        (None, Waiting::Read { buf, covered, .. }) => {
            Err(NbdError::Protocol(format!("read reply covered {covered} of {} bytes", buf.len())))
        }
        (None, Waiting::Status { extents, .. }) => Ok(Done::Status(extents)),
        (None, Waiting::Plain) => Ok(Done::Plain),
    };
    let _ = p.reply.send(outcome);
    Ok(())
}

async fn read_payload(r: &mut Reader, length: u32) -> Result<Vec<u8>, NbdError> {
    if length > proto::MAX_PAYLOAD {
        return Err(NbdError::Protocol(format!("reply chunk of {length} bytes")));
    }
    let mut p = vec![0u8; length as usize];
    r.read_exact(&mut p).await?;
    Ok(p)
}

async fn chunk_body(r: &mut Reader, p: &mut Pending, kind: u16, length: u32) -> Result<(), NbdError> {
    match (kind, &mut p.waiting) {
        (chunk::NONE, _) if length == 0 => Ok(()),
        (chunk::OFFSET_DATA, Waiting::Read { offset, buf, covered }) => {
            // The data goes straight into the request's buffer, after bounds checks.
            let data_len = u64::from(length)
                .checked_sub(8)
                .ok_or_else(|| NbdError::Protocol("data chunk shorter than its offset".into()))?;
            let mut at = [0u8; 8];
            r.read_exact(&mut at).await?;
            let (start, end) = in_range(u64::from_be_bytes(at), data_len, *offset, buf.len())?;
            r.read_exact(&mut buf[start..end]).await?;
            *covered += data_len;
            Ok(())
        }
        (chunk::OFFSET_HOLE, Waiting::Read { offset, buf, covered }) => {
            let b = read_payload(r, length).await?;
            if b.len() != 12 {
                return Err(NbdError::Protocol("hole chunk of the wrong size".into()));
            }
            let hole_at = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
            let hole_len = u64::from(u32::from_be_bytes([b[8], b[9], b[10], b[11]]));
            let (start, end) = in_range(hole_at, hole_len, *offset, buf.len())?;
            buf[start..end].fill(0);
            *covered += hole_len;
            Ok(())
        }
        (chunk::BLOCK_STATUS, Waiting::Status { offset, extents }) => {
            let b = read_payload(r, length).await?;
            let (_context, descriptors) = proto::parse_block_status(&b)?;
            let mut at = extents.last().map_or(*offset, |e| e.offset + e.length);
            for (len, flags) in descriptors {
                if len == 0 {
                    return Err(NbdError::Protocol("block status extent of length 0".into()));
                }
                extents.push(Extent { offset: at, length: u64::from(len), flags });
                at += u64::from(len);
            }
            Ok(())
        }
        (chunk::ERROR | chunk::ERROR_OFFSET, _) => {
            let b = read_payload(r, length).await?;
            let (errno, message, offset) = proto::parse_error_chunk(kind, &b)?;
            p.error.get_or_insert(NbdError::Server { op: p.op, errno, message, offset });
            Ok(())
        }
        (k, _) => Err(NbdError::Protocol(format!("unexpected chunk type {k:#x} ({length} bytes) for {}", p.op))),
    }
}

/// Where `[at, at+len)` lies inside a request `[offset, offset+buf_len)`, as buffer indices.
fn in_range(at: u64, len: u64, offset: u64, buf_len: usize) -> Result<(usize, usize), NbdError> {
    let outside = || NbdError::Protocol(format!("chunk [{at}, +{len}) outside its request [{offset}, +{buf_len})"));
    let start = at.checked_sub(offset).and_then(|s| usize::try_from(s).ok()).ok_or_else(outside)?;
    let end =
        usize::try_from(len).ok().and_then(|l| start.checked_add(l)).filter(|&e| e <= buf_len).ok_or_else(outside)?;
    Ok((start, end))
}

/// Fixed-newstyle negotiation on a fresh stream.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, export: &str) -> Result<Export, NbdError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await?;
    let (magic, style) = (
        u64::from_be_bytes(hello[..8].try_into().unwrap_or_default()),
        u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default()),
    );
    if magic != proto::NBDMAGIC {
        return Err(NbdError::Protocol("not an NBD server (no NBDMAGIC)".into()));
    }
    if style != proto::IHAVEOPT {
        return Err(NbdError::Refused {
            what: "negotiation",
            code: 0,
            message: "oldstyle servers are not supported".into(),
        });
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Refused {
            what: "negotiation",
            code: 0,
            message: "the server is not fixed-newstyle".into(),
        });
    }
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let client_flags =
        u32::from(proto::FLAG_FIXED_NEWSTYLE) | if no_zeroes { u32::from(proto::FLAG_NO_ZEROES) } else { 0 };
    s.write_all(&client_flags.to_be_bytes()).await?;

    let structured = simple_option(s, opt::STRUCTURED_REPLY, &[]).await?;
    let mut allocation_context = None;
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| NbdError::Protocol("export name too long".into()))?;
    if structured {
        let mut data = Vec::new();
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&15u32.to_be_bytes());
        data.extend_from_slice(b"base:allocation");
        s.write_all(&proto::encode_option(opt::SET_META_CONTEXT, &data)).await?;
        loop {
            let (kind, payload) = option_reply(s, opt::SET_META_CONTEXT).await?;
            match kind {
                rep::META_CONTEXT if payload.len() >= 4 => {
                    allocation_context = Some(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
                }
                rep::ACK => break,
                k if k & rep::ERROR_BIT != 0 => break,
                k => return Err(NbdError::Protocol(format!("unexpected reply {k} to SET_META_CONTEXT"))),
            }
        }
    }

    let mut data = Vec::new();
    data.extend_from_slice(&name_len.to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&proto::info::EXPORT.to_be_bytes());
    data.extend_from_slice(&proto::info::BLOCK_SIZE.to_be_bytes());
    s.write_all(&proto::encode_option(opt::GO, &data)).await?;
    let (mut size, mut flags, mut block_size) = (None, 0u16, None);
    loop {
        let (kind, payload) = option_reply(s, opt::GO).await?;
        match kind {
            rep::INFO => match proto::parse_info(&payload)? {
                Info::Export { size: sz, flags: f } => (size, flags) = (Some(sz), f),
                Info::BlockSize(a, b, c) => block_size = Some((a, b, c)),
                Info::Other(_) => {}
            },
            rep::ACK => break,
            rep::ERR_UNSUP => {
                // An old server: select the export the old way (no reply on failure but a close).
                s.write_all(&proto::encode_option(opt::EXPORT_NAME, name)).await?;
                let mut b = [0u8; 10];
                s.read_exact(&mut b).await?;
                size = Some(u64::from_be_bytes(b[..8].try_into().unwrap_or_default()));
                flags = u16::from_be_bytes([b[8], b[9]]);
                if !no_zeroes {
                    let mut zeroes = [0u8; 124];
                    s.read_exact(&mut zeroes).await?;
                }
                break;
            }
            k if k & rep::ERROR_BIT != 0 => {
                return Err(NbdError::Refused {
                    what: "export",
                    code: k,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            k => return Err(NbdError::Protocol(format!("unexpected reply {k} to GO"))),
        }
    }
    let size = size.ok_or_else(|| NbdError::Protocol("the server never said the export's size".into()))?;
    Ok(Export { size, flags, block_size, structured, allocation_context })
}

/// Sends an option that is answered by a single ACK; `false` if unsupported.
async fn simple_option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<bool, NbdError> {
    s.write_all(&proto::encode_option(option, data)).await?;
    let (kind, _payload) = option_reply(s, option).await?;
    match kind {
        rep::ACK => Ok(true),
        k if k & rep::ERROR_BIT != 0 => Ok(false),
        k => Err(NbdError::Protocol(format!("unexpected reply {k} to option {option}"))),
    }
}

/// One option reply for `option`: (reply type, payload).
async fn option_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await?;
    let (opt, kind, len) = proto::parse_option_reply_header(&h)?;
    if opt != option {
        return Err(NbdError::Protocol(format!("reply for option {opt} while negotiating {option}")));
    }
    let mut payload = Vec::new();
    (&mut *s).take(u64::from(len)).read_to_end(&mut payload).await?;
    if payload.len() != len as usize {
        return Err(NbdError::Protocol("option reply cut short".into()));
    }
    Ok((kind, payload))
}
