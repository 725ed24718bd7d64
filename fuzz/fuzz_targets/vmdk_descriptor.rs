//! Fuzz target: the VMDK descriptor parser (`fuzzing::vmdk::descriptor`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vmdk::descriptor(data));
