//! The binding against the fake `libvixDiskLib.so.6`: no optional functions (allocation maps
//! degrade to "unknown"), calloc'ed connect parameters, and the 56-byte `VixDiskLibInfo`
//! placed against a guard page, so reading the 7.0 fields would crash this test.

mod common;

use vddk::{ConnectParams, Library, OpenFlags};
use vddk_fake::{Fake, libdir};

#[test]
fn vddk6_without_the_optional_functions() {
    let lib = Library::load(&libdir(Fake::V6)).unwrap();
    assert_eq!(lib.version(), 6);
    assert!(lib.optional_functions().iter().all(|(_, present)| !present), "{:?}", lib.optional_functions());
    let vddk = lib.init(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    let contents = common::image(&path, 1 << 20, &[(4096, 8192)]);
    let conn = vddk.connect(&ConnectParams { vm_moref: Some("vm-1".into()), ..ConnectParams::default() }).unwrap();
    let disk = conn.open(path.to_str().unwrap(), OpenFlags { read_only: true, ..OpenFlags::default() }).unwrap();
    assert_eq!(disk.info().capacity(), 1 << 20);
    assert_eq!(disk.info().sector_sizes, None, "VDDK 6 has no sector sizes");
    assert_eq!(disk.allocated_blocks(0, 2048, 128).unwrap(), None, "no QueryAllocatedBlocks: read everything");
    assert!(disk.read(0, vec![0; 1 << 20]).unwrap() == contents);
}
