//! Fuzz target: the NBD server's parsers and a whole session from a hostile client (`fuzzing::nbd::server`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::nbd::server(data));
