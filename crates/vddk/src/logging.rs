//! VDDK's log, warning and panic callbacks, routed into `tracing`. The callbacks receive a
//! printf format and a `va_list`; `vsnprintf` formats them (once: a `va_list` is consumed).

use std::ffi::{CStr, c_char, c_int};

use vddk_sys::__va_list_tag;

unsafe extern "C" {
    fn vsnprintf(buf: *mut c_char, len: usize, fmt: *const c_char, args: *mut __va_list_tag) -> c_int;
}

/// Lines VDDK 7 logs as errors that are only noise.
fn is_noise(line: &str) -> bool {
    line.contains("Get CEIP status failed") || line.contains("VDDK_PhoneHome:")
}

/// Formats a printf-style message into a bounded buffer (longer lines are cut).
///
/// # Safety
/// `fmt` and `args` must be what VDDK passed to a log callback.
unsafe fn format(fmt: *const c_char, args: *mut __va_list_tag) -> String {
    if fmt.is_null() {
        return String::new();
    }
    let mut buf = [0 as c_char; 2048];
    // SAFETY: buf is writable for its length; fmt and args come from VDDK as a matching pair
    // (the caller's contract), and vsnprintf never writes past `len`.
    unsafe { vsnprintf(buf.as_mut_ptr(), buf.len(), fmt, args) };
    // SAFETY: vsnprintf NUL-terminates within `len`.
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
    text.to_string_lossy().trim_end().to_owned()
}

pub(crate) unsafe extern "C" fn log_info(fmt: *const c_char, args: *mut __va_list_tag) {
    // SAFETY: VDDK calls this with a format and its arguments.
    let line = unsafe { format(fmt, args) };
    tracing::info!(target: "vddk", "{line}");
}

pub(crate) unsafe extern "C" fn log_warn(fmt: *const c_char, args: *mut __va_list_tag) {
    // SAFETY: as above.
    let line = unsafe { format(fmt, args) };
    if is_noise(&line) {
        tracing::debug!(target: "vddk", "{line}");
    } else {
        tracing::warn!(target: "vddk", "{line}");
    }
}

pub(crate) unsafe extern "C" fn log_panic(fmt: *const c_char, args: *mut __va_list_tag) {
    // SAFETY: as above.
    let line = unsafe { format(fmt, args) };
    tracing::error!(target: "vddk", "VDDK panic: {line}");
}
