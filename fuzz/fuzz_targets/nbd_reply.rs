//! Fuzz target: NBD reply parsers and negotiation from a hostile server (`fuzzing::nbd::reply`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::nbd::reply(data));
