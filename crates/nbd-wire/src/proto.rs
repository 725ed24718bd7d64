//! The NBD wire protocol (fixed newstyle): constants, and pure functions over bytes for both
//! sides: the client's request encoding and bounds-checked decoding of what a server sends, and
//! the server's bounds-checked decoding of client options and requests and encoding of its
//! replies. No I/O, so all of it can be fuzzed.

use crate::NbdError;

/// `NBDMAGIC`, the server's first eight bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Server handshake flag: no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;

/// Options.
pub mod opt {
    /// Old-style export selection (no reply on success).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// Export details without selecting it.
    pub const INFO: u32 = 6;
    /// Export details and selection.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List the metadata contexts an export offers.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Metadata contexts for block status.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (errors have bit 31 set).
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export's name (`NBD_OPT_LIST`).
    pub const SERVER: u32 = 2;
    /// An information block (NBD_OPT_GO).
    pub const INFO: u32 = 3;
    /// A metadata context id.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31: an error.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// Refused by the server's policy.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// The option's data is malformed, or the option is out of place.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// No export by that name.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// The option's data is too large.
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// The flags field is valid.
    pub const HAS_FLAGS: u16 = 1;
    /// Read-only export.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The DF (don't fragment) read flag is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to the export see one consistent disk.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch into the server's cache.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Forced unit access.
    pub const FUA: u16 = 1;
    /// WRITE_ZEROES: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ with structured replies: send the data in one chunk, without hole detection.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one descriptor is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload (with DONE: success).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (zeros) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = 0x8001;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = 0x8002;
    /// The flag marking the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
}

/// `base:allocation` status flags.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1;
    /// Reads as zeros.
    pub const ZERO: u32 = 2;
}

/// Error numbers carried in replies (the NBD protocol's fixed values, not the host's).
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid request (out of range, bad length, not negotiated).
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Request too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// The metadata context this crate serves and asks for.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest option data a server accepts: export names are at most 4096 bytes, and meta
/// context queries are short; more is a broken or hostile client.
pub const MAX_OPTION_DATA: u32 = 64 << 10;

/// Largest export name or meta context query accepted (the protocol's own limit).
pub const MAX_NAME: usize = 4096;

/// Largest payload accepted in one reply chunk or option reply (beyond the data of a read,
/// which the caller bounds): more is a broken or hostile server.
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The cookie that identifies the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// The 28 bytes on the wire.
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An option request: `IHAVEOPT`, the option, its data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn protocol(what: impl Into<String>) -> NbdError {
    NbdError::Protocol(what.into())
}

fn be_u16(b: &[u8], at: usize) -> Result<u16, NbdError> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or_else(|| protocol("short u16"))
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, NbdError> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]])).ok_or_else(|| protocol("short u32"))
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, NbdError> {
    b.get(at..at + 8).map(|s| u64::from_be_bytes(s.try_into().unwrap_or_default())).ok_or_else(|| protocol("short u64"))
}

/// The 20-byte header of an option reply: (option, reply type, payload length).
pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<(u32, u32, u32), NbdError> {
    if be_u64(b, 0)? != OPTION_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    let len = be_u32(b, 16)?;
    if len > MAX_PAYLOAD {
        return Err(protocol(format!("option reply of {len} bytes")));
    }
    // u64 magic, u32 option, u32 reply type, u32 length.
    Ok((be_u32(b, 8)?, be_u32(b, 12)?, len))
}

/// What `NBD_REP_INFO` told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// Export size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints (minimum, preferred, maximum).
    BlockSize(u32, u32, u32),
    /// Something we did not ask for or do not use.
    Other(u16),
}

/// Parses the payload of an `NBD_REP_INFO`.
pub fn parse_info(p: &[u8]) -> Result<Info, NbdError> {
    match be_u16(p, 0)? {
        info::EXPORT if p.len() == 12 => Ok(Info::Export { size: be_u64(p, 2)?, flags: be_u16(p, 10)? }),
        info::BLOCK_SIZE if p.len() == 14 => Ok(Info::BlockSize(be_u32(p, 2)?, be_u32(p, 6)?, be_u32(p, 10)?)),
        t @ (info::EXPORT | info::BLOCK_SIZE) => Err(protocol(format!("info {t} of {} bytes", p.len()))),
        t => Ok(Info::Other(t)),
    }
}

/// The header of a transmission reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (16 bytes): an error number and, for a successful read, the data follows.
    Simple {
        /// The cookie.
        cookie: u64,
        /// 0, or an errno.
        error: u32,
    },
    /// A structured reply chunk (20 bytes): the payload of `length` bytes follows.
    Structured {
        /// The cookie.
        cookie: u64,
        /// Chunk flags (`chunk::FLAG_DONE`).
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Payload length.
        length: u32,
    },
}

/// The length of the reply header that starts with this magic (16 or 20).
pub fn reply_header_len(magic: u32) -> Result<usize, NbdError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(16),
        STRUCTURED_REPLY_MAGIC => Ok(20),
        m => Err(protocol(format!("bad reply magic {m:#010x}"))),
    }
}

/// Parses a whole reply header (16 or 20 bytes, as [`reply_header_len`] said).
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader, NbdError> {
    match be_u32(b, 0)? {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple { error: be_u32(b, 4)?, cookie: be_u64(b, 8)? }),
        STRUCTURED_REPLY_MAGIC => {
            let length = be_u32(b, 16)?;
            Ok(ReplyHeader::Structured { flags: be_u16(b, 4)?, kind: be_u16(b, 6)?, cookie: be_u64(b, 8)?, length })
        }
        m => Err(protocol(format!("bad reply magic {m:#010x}"))),
    }
}

/// An error chunk: (errno, message, offset for ERROR_OFFSET).
pub fn parse_error_chunk(kind: u16, p: &[u8]) -> Result<(u32, String, Option<u64>), NbdError> {
    let errno = be_u32(p, 0)?;
    let len = usize::from(be_u16(p, 4)?);
    let msg = p.get(6..6 + len).ok_or_else(|| protocol("error message runs past its chunk"))?;
    let offset = if kind == chunk::ERROR_OFFSET { Some(be_u64(p, 6 + len)?) } else { None };
    Ok((errno, String::from_utf8_lossy(msg).into_owned(), offset))
}

/// A block status chunk: (context id, `(length, flags)` descriptors).
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>), NbdError> {
    let id = be_u32(p, 0)?;
    let body = p.get(4..).unwrap_or_default();
    if body.is_empty() || body.len() % 8 != 0 {
        return Err(protocol(format!("block status payload of {} bytes", p.len())));
    }
    let descriptors = body
        .chunks_exact(8)
        .map(|d| (u32::from_be_bytes([d[0], d[1], d[2], d[3]]), u32::from_be_bytes([d[4], d[5], d[6], d[7]])))
        .collect();
    Ok((id, descriptors))
}

// ---- The server's side: decoding what a client sends, encoding what a server answers. ----

/// The handshake a fixed-newstyle server opens with: `NBDMAGIC`, `IHAVEOPT`, its flags.
pub fn encode_server_hello(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// The client's flags after the hello: whether it omits the zero padding (`NO_ZEROES`). A
/// client that is not fixed-newstyle or sets a flag we do not know is refused, as the protocol
/// asks.
pub fn parse_client_flags(b: &[u8; 4]) -> Result<bool, NbdError> {
    let flags = u32::from_be_bytes(*b);
    let known = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    if flags & !known != 0 {
        return Err(protocol(format!("unknown client flags {flags:#x}")));
    }
    if flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(protocol("the client is not fixed-newstyle"));
    }
    Ok(flags & u32::from(FLAG_NO_ZEROES) != 0)
}

/// The 16-byte header of an option request: (option, data length). The length is returned
/// even when it exceeds [`MAX_OPTION_DATA`], so the server can answer `NBD_REP_ERR_TOO_BIG`;
/// the caller must check it before reading the data.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), NbdError> {
    if be_u64(b, 0)? != IHAVEOPT {
        return Err(protocol("bad option magic"));
    }
    Ok((be_u32(b, 8)?, be_u32(b, 12)?))
}

/// A length-prefixed string inside option data: (text, where the next field starts).
fn prefixed_name(d: &[u8], at: usize, what: &str) -> Result<(String, usize), NbdError> {
    let len = be_u32(d, at)? as usize;
    if len > MAX_NAME {
        return Err(protocol(format!("{what} of {len} bytes")));
    }
    let start = at + 4;
    let bytes = d.get(start..start + len).ok_or_else(|| protocol(format!("{what} runs past its option")))?;
    let text = std::str::from_utf8(bytes).map_err(|_| protocol(format!("{what} is not UTF-8")))?;
    Ok((text.to_owned(), start + len))
}

/// What `NBD_OPT_INFO` and `NBD_OPT_GO` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// The export's name (`""`: the default export).
    pub name: String,
    /// The information types requested (`info::*`).
    pub infos: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name, then a counted list of info types.
pub fn parse_export_request(d: &[u8]) -> Result<ExportRequest, NbdError> {
    let (name, at) = prefixed_name(d, 0, "export name")?;
    let count = usize::from(be_u16(d, at)?);
    let rest = d.get(at + 2..).unwrap_or_default();
    if rest.len() != count * 2 {
        return Err(protocol(format!("{count} info requests in {} bytes", rest.len())));
    }
    let infos = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(ExportRequest { name, infos })
}

/// What `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_LIST_META_CONTEXT` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export's name.
    pub export: String,
    /// The context queries (`"base:allocation"`, `"base:"`, ...).
    pub queries: Vec<String>,
}

/// Parses the data of a meta context option: export name, then a counted list of queries. The
/// count is checked against the bytes as they are read, so a huge count allocates nothing.
pub fn parse_meta_context_request(d: &[u8]) -> Result<MetaContextRequest, NbdError> {
    let (export, mut at) = prefixed_name(d, 0, "export name")?;
    let count = be_u32(d, at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let (q, next) = prefixed_name(d, at, "meta context query")?;
        queries.push(q);
        at = next;
    }
    if at != d.len() {
        return Err(protocol(format!("{} bytes after the meta context queries", d.len() - at)));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Parses a 28-byte transmission request header. The length is not bounded here (the server
/// answers an oversized request with an error, or closes if it carries a payload).
pub fn parse_request(b: &[u8; 28]) -> Result<Request, NbdError> {
    if be_u32(b, 0)? != REQUEST_MAGIC {
        return Err(protocol("bad request magic"));
    }
    Ok(Request {
        flags: be_u16(b, 4)?,
        kind: be_u16(b, 6)?,
        cookie: be_u64(b, 8)?,
        offset: be_u64(b, 16)?,
        length: be_u32(b, 24)?,
    })
}

/// An option reply: magic, option, reply type, payload.
pub fn encode_option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The payload of `NBD_REP_INFO` with `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// The payload of `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&minimum.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..].copy_from_slice(&maximum.to_be_bytes());
    b
}

/// The payload of `NBD_REP_INFO` with `NBD_INFO_NAME`.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len());
    b.extend_from_slice(&info::NAME.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The payload of `NBD_REP_SERVER` (one export of `NBD_OPT_LIST`).
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The payload of `NBD_REP_META_CONTEXT`: the context id, then its name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// What `NBD_OPT_EXPORT_NAME` is answered with: size, flags, and 124 zeros unless the client
/// chose `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A simple reply header; a successful read's data follows it.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` bytes of payload follow it.
pub fn encode_chunk_header(cookie: u64, flags: u16, kind: u16, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&length.to_be_bytes());
    b
}

/// The header and offset of an `OFFSET_DATA` chunk; `data_len` bytes of data follow it.
pub fn encode_data_chunk_header(cookie: u64, flags: u16, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&encode_chunk_header(cookie, flags, chunk::OFFSET_DATA, data_len.saturating_add(8)));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A whole `OFFSET_HOLE` chunk: `length` zero bytes at `offset`, not sent.
pub fn encode_hole_chunk(cookie: u64, flags: u16, offset: u64, length: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&encode_chunk_header(cookie, flags, chunk::OFFSET_HOLE, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..].copy_from_slice(&length.to_be_bytes());
    b
}

/// A whole `BLOCK_STATUS` chunk: the context id and `(length, flags)` descriptors.
pub fn encode_block_status_chunk(cookie: u64, flags: u16, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let payload = 4 + descriptors.len() * 8;
    let mut b = Vec::with_capacity(20 + payload);
    b.extend_from_slice(&encode_chunk_header(
        cookie,
        flags,
        chunk::BLOCK_STATUS,
        u32::try_from(payload).unwrap_or(u32::MAX),
    ));
    b.extend_from_slice(&context.to_be_bytes());
    for &(len, state) in descriptors {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&state.to_be_bytes());
    }
    b
}

/// A whole `ERROR` chunk (the last of its reply): errno and a message (cut to 4096 bytes).
pub fn encode_error_chunk(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(MAX_NAME);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let mut b = Vec::with_capacity(26 + msg.len());
    b.extend_from_slice(&encode_chunk_header(
        cookie,
        chunk::FLAG_DONE,
        chunk::ERROR,
        u32::try_from(6 + msg.len()).unwrap_or(u32::MAX),
    ));
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(u16::MAX).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_have_the_documented_layout() {
        let r = Request { flags: cflag::FUA, kind: cmd::WRITE, cookie: 7, offset: 4096, length: 512 };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), 1);
        let mut simple = [0u8; 16];
        simple[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        simple[4..8].copy_from_slice(&5u32.to_be_bytes());
        simple[8..].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(parse_reply_header(&simple).unwrap(), ReplyHeader::Simple { cookie: 9, error: 5 });
        assert!(parse_reply_header(&[0u8; 16]).is_err());
        assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 2]).is_err(), "descriptor cut short");
        assert_eq!(parse_block_status(&[0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 3]).unwrap(), (1, vec![(512, 3)]));
        assert!(parse_error_chunk(chunk::ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err(), "message longer than the chunk");
        assert_eq!(
            parse_info(&[0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1]).unwrap(),
            Info::Export { size: 4096, flags: 1 }
        );
        let mut reply = [0u8; 20];
        reply[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        reply[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        reply[12..16].copy_from_slice(&rep::ACK.to_be_bytes());
        assert_eq!(parse_option_reply_header(&reply).unwrap(), (opt::GO, rep::ACK, 0));
    }

    #[test]
    fn server_side_parses_what_clients_send_and_encodes_what_they_parse() {
        assert!(parse_client_flags(&[0, 0, 0, 3]).unwrap());
        assert!(!parse_client_flags(&[0, 0, 0, 1]).unwrap());
        assert!(parse_client_flags(&[0, 0, 0, 2]).is_err(), "not fixed-newstyle");
        assert!(parse_client_flags(&[0, 0, 1, 1]).is_err(), "unknown flag");
        let o = encode_option(opt::GO, b"abc");
        assert_eq!(parse_option_header(o[..16].try_into().unwrap()).unwrap(), (opt::GO, 3));
        let mut go = vec![0, 0, 0, 2, b'd', b'1', 0, 2];
        go.extend_from_slice(&[0, 3, 0, 1]);
        assert_eq!(
            parse_export_request(&go).unwrap(),
            ExportRequest { name: "d1".into(), infos: vec![info::BLOCK_SIZE, info::NAME] }
        );
        assert!(parse_export_request(&go[..go.len() - 1]).is_err(), "info list cut short");
        assert!(parse_export_request(&[0xff, 0xff, 0xff, 0xff]).is_err(), "name longer than the data");
        let mut meta = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
        meta.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_context_request(&meta).unwrap(),
            MetaContextRequest { export: String::new(), queries: vec![BASE_ALLOCATION.into()] }
        );
        assert!(parse_meta_context_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err(), "a count with no queries");
        let r = Request { flags: cflag::DF, kind: cmd::READ, cookie: 3, offset: 512, length: 4096 };
        assert_eq!(parse_request(&r.encode()).unwrap(), r);
        assert!(parse_request(&[0u8; 28]).is_err());
        // What the server encodes, the client's parsers read back.
        let rep = encode_option_reply(opt::INFO, rep::INFO, &encode_info_export(1 << 20, tflag::HAS_FLAGS));
        assert_eq!(parse_option_reply_header(rep[..20].try_into().unwrap()).unwrap(), (opt::INFO, rep::INFO, 12));
        assert_eq!(parse_info(&rep[20..]).unwrap(), Info::Export { size: 1 << 20, flags: tflag::HAS_FLAGS });
        assert_eq!(parse_info(&encode_info_block_size(1, 4096, 1 << 25)).unwrap(), Info::BlockSize(1, 4096, 1 << 25));
        let bs = encode_block_status_chunk(9, chunk::FLAG_DONE, 1, &[(4096, 3), (512, 0)]);
        assert_eq!(
            parse_reply_header(&bs[..20]).unwrap(),
            ReplyHeader::Structured { cookie: 9, flags: chunk::FLAG_DONE, kind: chunk::BLOCK_STATUS, length: 20 }
        );
        assert_eq!(parse_block_status(&bs[20..]).unwrap(), (1, vec![(4096, 3), (512, 0)]));
        let e = encode_error_chunk(4, errno::EPERM, "read-only");
        assert_eq!(parse_error_chunk(chunk::ERROR, &e[20..]).unwrap(), (1, "read-only".into(), None));
        let hole = encode_hole_chunk(4, 0, 8192, 512);
        assert_eq!(
            parse_reply_header(&hole[..20]).unwrap(),
            ReplyHeader::Structured { cookie: 4, flags: 0, kind: chunk::OFFSET_HOLE, length: 12 }
        );
        assert_eq!(
            parse_reply_header(&encode_simple_reply(5, 22)).unwrap(),
            ReplyHeader::Simple { cookie: 5, error: 22 }
        );
    }
}
