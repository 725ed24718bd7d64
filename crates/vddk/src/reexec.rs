//! VDDK loads its own bundled libraries by bare name, so `<libdir>/lib64` must be on
//! `LD_LIBRARY_PATH` when the process starts; the dynamic loader reads it only then. A binary
//! that uses VDDK calls [`ensure_library_path`] first thing in `main`: if the folder is missing
//! it re-executes itself once with it added, and after that restores the caller's value so that
//! child processes see the environment they were given. No secret is ever in our arguments, so
//! re-executing with the same arguments exposes nothing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::VddkError;

/// Set for the re-executed process: the caller's original `LD_LIBRARY_PATH` (empty if unset).
const MARKER: &str = "SYNCPROXY_VDDK_REEXEC_ORIGINAL_LD_LIBRARY_PATH";

/// What [`ensure_library_path`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibraryPath {
    /// The folder was already on `LD_LIBRARY_PATH`.
    AlreadySet,
    /// This process is the re-executed one; `LD_LIBRARY_PATH` is back to the caller's value.
    Reexecuted,
}

/// The folder VDDK's own libraries live in.
pub fn library_folder(libdir: &Path) -> PathBuf {
    let lib64 = libdir.join("lib64");
    if lib64.is_dir() { lib64 } else { libdir.to_path_buf() }
}

/// Makes sure VDDK's library folder was on `LD_LIBRARY_PATH` at process start, re-executing
/// this program once if it was not. Call it before any thread is started.
pub fn ensure_library_path(libdir: &Path) -> Result<LibraryPath, VddkError> {
    let folder = library_folder(libdir);
    let current = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    let listed = std::env::split_paths(&current).any(|p| p == folder);
    if let Some(original) = std::env::var_os(MARKER) {
        if !listed {
            return Err(VddkError::Invalid(format!(
                "re-executed, but {} is still not on LD_LIBRARY_PATH",
                folder.display()
            )));
        }
        // set_var and remove_var race with threads reading the environment; the contract of
        // this function is that no other thread exists yet.
        // SAFETY: called at start-up, before this process starts any thread (documented above).
        unsafe {
            if original.is_empty() {
                std::env::remove_var("LD_LIBRARY_PATH");
            } else {
                std::env::set_var("LD_LIBRARY_PATH", &original);
            }
            std::env::remove_var(MARKER);
        }
        return Ok(LibraryPath::Reexecuted);
    }
    if listed {
        return Ok(LibraryPath::AlreadySet);
    }
    let mut paths = vec![folder];
    paths.extend(std::env::split_paths(&current));
    let joined =
        std::env::join_paths(paths).map_err(|e| VddkError::Invalid(format!("cannot build LD_LIBRARY_PATH: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| VddkError::Invalid(format!("cannot find this program to re-execute it: {e}")))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe).args(args).env("LD_LIBRARY_PATH", joined).env(MARKER, &current).exec();
    Err(VddkError::Invalid(format!("cannot re-execute with VDDK on LD_LIBRARY_PATH: {err}")))
}
