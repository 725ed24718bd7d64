//! Fuzz entry points for `nbd-wire`: every parser of what a server sends (option replies,
//! export information, reply headers, error and block status chunks) and a whole negotiation
//! driven by the fuzzer's bytes as the server's side; and every parser of what a client sends
//! (client flags, options, export and meta context requests, request headers) and a whole
//! server session driven by the fuzzer's bytes as the client's side.

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

/// A server for one fuzzed session, fresh each time so that writes do not carry over between
/// inputs: `"disk"` (read-only, also the default export) and `"rw"` (writable), each 16 KiB of
/// data, a hole, and data again.
fn fuzz_server() -> nbd_wire::server::Server {
    use nbd_wire::server::{ExportSource, MemoryExport, Server, ServerConfig};
    let mut disk = vec![0u8; 16 << 10];
    disk[..4096].fill(0xa5);
    disk[12 << 10..].fill(0x5a);
    let read_only: std::sync::Arc<dyn ExportSource> = std::sync::Arc::new(MemoryExport::new(disk.clone(), 4096));
    let writable: std::sync::Arc<dyn ExportSource> = std::sync::Arc::new(MemoryExport::writable(disk, 4096));
    Server::new(ServerConfig::default(), vec![("disk".into(), read_only), ("rw".into(), writable)])
}

/// Parses `data` every way a server parses a client's bytes, then runs a whole server session
/// with `data` as the client's side: nothing may panic or hang, nothing parsed may be larger
/// than its input, and the server may not answer more than the input asked for.
pub fn server(data: &[u8]) {
    if let Ok(flags) = <&[u8; 4]>::try_from(data.get(..4).unwrap_or_default()) {
        let _ = proto::parse_client_flags(flags);
    }
    if let Ok(header) = <&[u8; 16]>::try_from(data.get(..16).unwrap_or_default()) {
        let _ = proto::parse_option_header(header);
    }
    if let Ok(header) = <&[u8; 28]>::try_from(data.get(..28).unwrap_or_default()) {
        let _ = proto::parse_request(header);
    }
    if let Ok(req) = proto::parse_export_request(data) {
        assert_eq!(4 + req.name.len() + 2 + req.infos.len() * 2, data.len());
    }
    if let Ok(req) = proto::parse_meta_context_request(data) {
        let queries: usize = req.queries.iter().map(|q| 4 + q.len()).sum();
        assert_eq!(4 + req.export.len() + 4 + queries, data.len());
    }
    let out = fuzz_server().session_from_bytes(data);
    assert_eq!(out.get(..8), Some(&proto::NBDMAGIC.to_be_bytes()[..]), "no hello");
    // Each option (16 bytes or more) or request (28) is answered with at most the export's
    // 16 KiB and the headers of a few chunks.
    let bound = 18 + (data.len() / 16 + 1) * ((16 << 10) + 1024);
    assert!(out.len() <= bound, "{} bytes out for {} in", out.len(), data.len());
}

#[cfg(test)]
mod tests {
    use nbd_wire::proto::{self, STRUCTURED_REPLY_MAGIC};

    fn seed(name: &str) -> Vec<u8> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/nbd_server");
        std::fs::read(dir.join(name)).unwrap()
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn server_seeds_reach_what_they_are_for() {
        let server = super::fuzz_server();
        // Writes land, and are read back (the session's runtime runs requests in order).
        let out = server.session_from_bytes(&seed("writes"));
        assert!(contains(&out, &proto::encode_simple_reply(2, 0)), "the write failed");
        let mut back = proto::encode_simple_reply(5, 0).to_vec();
        back.extend_from_slice(&[0x11; 512]);
        assert!(contains(&out, &back), "the write is not read back");
        // The structured session gets chunks (a hole among them) and a refused write.
        let out = server.session_from_bytes(&seed("structured-session"));
        assert!(contains(&out, &STRUCTURED_REPLY_MAGIC.to_be_bytes()));
        assert!(contains(&out, &proto::encode_hole_chunk(1, 0, 4096, 8192)), "no hole chunk");
        assert!(contains(&out, &proto::encode_simple_reply(5, proto::errno::EPERM)));
        // The old client reads with simple replies; its oversized read is refused.
        let out = server.session_from_bytes(&seed("old-client"));
        let mut read = proto::encode_simple_reply(1, 0).to_vec();
        read.extend_from_slice(&[0u8; 4096]);
        assert!(contains(&out, &read));
        assert!(contains(&out, &proto::encode_simple_reply(2, proto::errno::EINVAL)));
        // Every option is answered, the last with the ACK of ABORT.
        let out = server.session_from_bytes(&seed("options-then-abort"));
        assert!(out.ends_with(&proto::encode_option_reply(proto::opt::ABORT, proto::rep::ACK, &[])));
    }
}
