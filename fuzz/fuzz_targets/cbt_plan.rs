//! Fuzz target: `QueryChangedDiskAreas` paging plus the copy planner, against the naive models
//! (`fuzzing::cbt::plan_and_accumulate`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::cbt::plan_and_accumulate(data));
