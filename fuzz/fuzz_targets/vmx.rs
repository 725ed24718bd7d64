//! Fuzz target: a drill's `.vmx`, its hardware and plan (`fuzzing::drill::vmx`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::drill::vmx(data));
