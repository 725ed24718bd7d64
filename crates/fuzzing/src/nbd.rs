//! Fuzz entry point for `nbd-wire`: every parser of what a server sends (option replies,
//! export information, reply headers, error and block status chunks), and a whole
//! negotiation driven by the fuzzer's bytes as the server's side.

use nbd_wire::proto;

/// Parses `data` every way a server's bytes are parsed; nothing may panic, and a negotiation
/// that succeeds must describe a usable export.
pub fn reply(data: &[u8]) {
    if let Ok(h) = <&[u8; 20]>::try_from(data.get(..20).unwrap_or_default()) {
        let _ = proto::parse_option_reply_header(h);
    }
    let _ = proto::parse_info(data);
    if let Some(&[a, b, c, d]) = data.get(..4)
        && let Ok(len) = proto::reply_header_len(u32::from_be_bytes([a, b, c, d]))
    {
        let _ = data.get(..len).map(proto::parse_reply_header);
    }
    for kind in [proto::chunk::ERROR, proto::chunk::ERROR_OFFSET] {
        if let Ok((_, message, _)) = proto::parse_error_chunk(kind, data) {
            assert!(message.len() <= data.len() * 3, "message larger than its chunk");
        }
    }
    if let Ok((_, descriptors)) = proto::parse_block_status(data) {
        assert_eq!(descriptors.len() * 8 + 4, data.len());
    }
    if let Ok(export) = nbd_wire::negotiate_from_bytes(data) {
        assert!(export.allocation_context.is_none() || export.structured, "block status without structured replies");
    }
}
