//! The NBD wire protocol (fixed newstyle): constants, request encoding, and bounds-checked
//! decoding of everything a server sends. Pure functions over bytes, so they can be fuzzed and
//! reused by a server later.

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
    /// Export details and selection.
    pub const GO: u32 = 7;
    /// Structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// Metadata contexts for block status.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (errors have bit 31 set).
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// An information block (NBD_OPT_GO).
    pub const INFO: u32 = 3;
    /// A metadata context id.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31: an error.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
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
}
