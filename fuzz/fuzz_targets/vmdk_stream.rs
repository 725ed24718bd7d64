//! Fuzz target: the streamOptimized marker reader (`fuzzing::vmdk::stream`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vmdk::stream(data));
