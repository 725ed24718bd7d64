//! Where the fake VixDiskLib this crate's build script compiles can be found, for tests that
//! load it through the real `dlopen` path. See `fake/fake_vixdisklib.c` for what it enforces
//! and how failures are injected (options in the connection's vmxSpec).

use std::path::PathBuf;

/// Which fake to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fake {
    /// `libvixDiskLib.so.8` with every symbol, directly in the folder.
    V8,
    /// `libvixDiskLib.so.6`: no QueryAllocatedBlocks, FreeBlockList or AllocateConnectParams,
    /// and the 56-byte `VixDiskLibInfo`, against a guard page.
    V6,
    /// `lib64/libvixDiskLib.so.8` under the folder, as in VMware's distribution.
    Distrib,
}

/// The folder to give `Library::load` for this fake.
pub fn libdir(fake: Fake) -> PathBuf {
    let out = PathBuf::from(env!("OUT_DIR"));
    match fake {
        Fake::V8 => out.join("v8"),
        Fake::V6 => out.join("v6"),
        Fake::Distrib => out.join("distrib"),
    }
}
