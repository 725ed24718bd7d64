//! Fuzz entry points for what the pipeline reads back from disk and the command line: digest
//! files, sync-state and checkpoint JSON, and NBD URIs.

use pipeline::Digests;
use replica::state::{Checkpoint, SyncState};

/// Decodes `data` as a digest file and as state JSON; nothing may panic, a decoded digest file
/// re-encodes to the same bytes and never holds more digests than its bytes can carry.
pub fn state_files(data: &[u8]) {
    if let Ok(d) = Digests::decode(data) {
        assert_eq!(d.encode(), data, "a decoded digest file re-encodes differently");
        assert!(d.blocks.len() * 32 <= data.len());
    }
    let _ = serde_json::from_slice::<SyncState>(data);
    let _ = serde_json::from_slice::<Checkpoint>(data);
}

/// Parses `data` as an NBD URI; one that parses names a target and survives a second look.
pub fn nbd_uri(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(uri) = nbd_wire::Uri::parse(text) {
        assert!(nbd_wire::Uri::is_uri(text));
        match uri.target {
            nbd_wire::Target::Unix(p) => assert!(!p.as_os_str().is_empty()),
            nbd_wire::Target::Tcp(a) => assert!(a.contains(':')),
        }
    }
}
