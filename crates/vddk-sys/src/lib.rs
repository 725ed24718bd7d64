//! Raw VixDiskLib (VDDK) bindings, loaded at run time: the generated declarations, and
//! compile-time checks of every struct layout the safe crate relies on.
//!
//! VDDK is proprietary and never linked or shipped: [`VixDiskLib`] opens the user's copy with
//! `dlopen`, and every function is a `Result` field that is `Err` when the library lacks it
//! (the 6.7 additions are optional). The declarations are ours (`include/vixDiskLib.h`),
//! written from the public documentation; `cargo xtask codegen` regenerates `generated.rs`.
//! Layouts are those of x86-64 Linux, the only platform VDDK ships for that we support.
#![allow(unsafe_code, reason = "an FFI binding: the generated wrapper calls into the loaded library")]

mod generated;

use std::mem::{offset_of, size_of};

pub use generated::*;

/// `VIX_OK`.
pub const VIX_OK: VixError = 0;
/// `VIX_ASYNC`: the success answer of `ReadAsync`/`WriteAsync`.
pub const VIX_ASYNC: VixError = 25_000;
/// `VixDiskLibInfo`'s size before VDDK 7 (no sector sizes).
pub const INFO_SIZE_BEFORE_7: usize = 56;

/// The low 16 bits of a `VixError`: the error code.
pub const fn vix_error_code(e: VixError) -> u16 {
    (e & 0xFFFF) as u16
}

// Layouts from the reference (section 1.2), checked when this crate compiles, so a wrong
// declaration cannot hide behind a fake library that shares it.
const _: () = {
    assert!(size_of::<VixDiskLibConnectParams>() == 128);
    assert!(offset_of!(VixDiskLibConnectParams, vmxSpec) == 0);
    assert!(offset_of!(VixDiskLibConnectParams, serverName) == 8);
    assert!(offset_of!(VixDiskLibConnectParams, thumbPrint) == 16);
    assert!(offset_of!(VixDiskLibConnectParams, credType) == 32);
    assert!(offset_of!(VixDiskLibConnectParams, creds) == 40);
    assert!(offset_of!(VixDiskLibConnectParams, port) == 64);
    assert!(offset_of!(VixDiskLibConnectParams, nfcHostPort) == 68);
    assert!(offset_of!(VixDiskLibConnectParams, vimApiVer) == 72);
    assert!(offset_of!(VixDiskLibConnectParams, state) == 88);
    assert!(offset_of!(VixDiskLibConnectParams, spec) == 96);
    assert!(offset_of!(VixDiskLibConnectParams, specType) == 120);
    assert!(size_of::<VixDiskLibSessionIdCreds>() == 24);
    assert!(size_of::<VixDiskLibInfo>() == 64);
    assert!(offset_of!(VixDiskLibInfo, physGeo) == 12);
    assert!(offset_of!(VixDiskLibInfo, capacity) == 24);
    assert!(offset_of!(VixDiskLibInfo, adapterType) == 32);
    assert!(offset_of!(VixDiskLibInfo, numLinks) == 36);
    assert!(offset_of!(VixDiskLibInfo, parentFileNameHint) == 40);
    assert!(offset_of!(VixDiskLibInfo, uuid) == 48);
    assert!(offset_of!(VixDiskLibInfo, logicalSectorSize) == INFO_SIZE_BEFORE_7);
    assert!(offset_of!(VixDiskLibInfo, physicalSectorSize) == 60);
    assert!(size_of::<VixDiskLibBlock>() == 16);
    assert!(offset_of!(VixDiskLibBlockList, blocks) == 8);
};

/// Opens a VixDiskLib with `RTLD_NOW | RTLD_LOCAL`, so a missing dependency fails here rather
/// than at the first call, and resolves every symbol it has.
///
/// # Safety
/// Loading a library runs its initialisers: `path` must name a VixDiskLib (or a library that
/// honours its contract), and the process must not fork after VDDK starts its threads.
pub unsafe fn load(path: &std::path::Path) -> Result<VixDiskLib, libloading::Error> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: the caller vouches for the library (see above).
    let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }?;
    // SAFETY: the symbols are resolved by name against the declarations in generated.rs, whose
    // types follow the documented C signatures.
    unsafe { VixDiskLib::from_library(library) }
}
