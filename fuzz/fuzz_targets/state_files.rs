//! Fuzz target: digest files and sync-state JSON read back from disk (`fuzzing::pipeline::state_files`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::pipeline::state_files(data));
