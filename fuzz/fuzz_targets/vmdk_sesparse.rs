//! Fuzz target: the SEsparse headers and grain walk (`fuzzing::vmdk::sesparse`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vmdk::sesparse(data));
