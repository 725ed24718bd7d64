//! Fuzz target: changed-areas lists (`fuzzing::cbt::areas`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::cbt::areas(data));
