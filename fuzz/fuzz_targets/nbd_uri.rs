//! Fuzz target: NBD URIs as given on the command line (`fuzzing::pipeline::nbd_uri`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::pipeline::nbd_uri(data));
