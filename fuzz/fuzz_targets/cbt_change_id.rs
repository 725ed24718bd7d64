//! Fuzz target: the CBT change-ID parser (`fuzzing::cbt::change_id`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::cbt::change_id(data));
