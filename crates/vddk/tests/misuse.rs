//! The fake enforces VDDK's contract: each test here re-runs itself in a child process that
//! breaks one rule through the raw bindings, and expects the fake to abort it, naming the rule.
//! (A fake that let misuse through would let the safe wrapper's guarantees go untested.)
#![allow(unsafe_code, reason = "breaking the VDDK contract on purpose needs the raw calls")]

use std::process::Command;

use vddk_fake::{Fake, libdir};

/// In the child: load the raw library; in the parent: run the child and check its death.
fn in_child(test: &str, expect: &str, misuse: impl FnOnce(&vddk_sys::VixDiskLib)) {
    if std::env::var("VDDK_MISUSE_CHILD").as_deref() == Ok(test) {
        let path = libdir(Fake::V8).join("libvixDiskLib.so.8");
        // SAFETY: loading the fake built for these tests.
        let lib = unsafe { vddk_sys::load(&path) }.unwrap();
        misuse(&lib);
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("VDDK_MISUSE_CHILD", test)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{test}: the misuse was not caught");
    assert!(stderr.contains("contract violated") && stderr.contains(expect), "{test}: {stderr}");
}

unsafe extern "C" fn quiet(_: *const std::ffi::c_char, _: *mut vddk_sys::__va_list_tag) {}

/// InitEx, a local connection and an open disk of `size` bytes, all by the rules.
fn open_disk(lib: &vddk_sys::VixDiskLib, dir: &std::path::Path, size: usize) -> vddk_sys::VixDiskLibHandle {
    let file = dir.join("d.raw");
    std::fs::write(&file, vec![1u8; size]).unwrap();
    let path = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    let (mut conn, mut handle) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: the documented order, with valid out-pointers and a live path string.
    unsafe {
        lib.VixDiskLib_InitEx(8, 0, Some(quiet), Some(quiet), Some(quiet), std::ptr::null(), std::ptr::null());
        lib.VixDiskLib_ConnectEx(std::ptr::null(), 1, std::ptr::null(), std::ptr::null(), &mut conn);
        lib.VixDiskLib_Open(conn, path.as_ptr(), 4, &mut handle);
    }
    handle
}

#[test]
fn opening_before_init_is_refused() {
    in_child("opening_before_init_is_refused", "before VixDiskLib_InitEx", |lib| {
        let mut conn = std::ptr::null_mut();
        // SAFETY: deliberately out of order; the fake aborts before touching the arguments.
        unsafe { lib.VixDiskLib_ConnectEx(std::ptr::null(), 1, std::ptr::null(), std::ptr::null(), &mut conn) };
    });
}

#[test]
fn init_without_log_callbacks_is_refused() {
    in_child("init_without_log_callbacks_is_refused", "log callbacks", |lib| {
        // SAFETY: deliberately without callbacks; the fake aborts.
        unsafe { lib.VixDiskLib_InitEx(8, 0, None, None, None, std::ptr::null(), std::ptr::null()) };
    });
}

#[test]
fn exit_with_a_disk_open_is_refused() {
    in_child("exit_with_a_disk_open_is_refused", "disks still open", |lib| {
        let dir = tempfile::tempdir().unwrap();
        open_disk(lib, dir.path(), 4096);
        // SAFETY: deliberately Exit with the disk still open; the fake aborts.
        unsafe { lib.VixDiskLib_Exit() };
    });
}

#[test]
fn query_allocated_blocks_off_the_opening_thread_is_refused() {
    in_child("query_allocated_blocks_off_the_opening_thread_is_refused", "thread that opened", |lib| {
        let dir = tempfile::tempdir().unwrap();
        let handle = open_disk(lib, dir.path(), 1 << 20) as usize;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut list = std::ptr::null_mut();
                // SAFETY: deliberately on another thread; the fake aborts.
                unsafe {
                    lib.VixDiskLib_QueryAllocatedBlocks(handle as vddk_sys::VixDiskLibHandle, 0, 128, 128, &mut list)
                };
            });
        });
    });
}
