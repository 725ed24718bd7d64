//! Fuzz target: SOAP responses from vCenter or ESXi (`fuzzing::vsphere::soap_response`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::vsphere::soap_response(data));
