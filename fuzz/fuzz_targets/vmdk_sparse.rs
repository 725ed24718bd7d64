//! Fuzz target: the hosted sparse (KDMV) header and grain-table walk (`fuzzing::vmdk::sparse`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vmdk::sparse(data));
