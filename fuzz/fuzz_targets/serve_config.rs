//! Fuzz target: the `proxy serve` configuration (`fuzzing::config::serve_config`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::config::serve_config(data));
