//! Fuzz target: repository files as read back from storage (`fuzzing::repo::repo_files`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::repo::repo_files(data));
