//! Fuzz target: the COWD (vmfsSparse) header and grain walk (`fuzzing::vmdk::cowd`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vmdk::cowd(data));
