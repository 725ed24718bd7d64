//! A safe VixDiskLib (VDDK): loaded at run time from the user's copy, initialised once, with
//! every rule the library documents enforced by construction.
//!
//! - [`Library::load`] finds `libvixDiskLib.so.{9,8,7,6}` (with or without `lib64/`), checks the
//!   required functions and notes the optional ones; [`Library::init`] runs `InitEx` once and
//!   routes VDDK's logs into `tracing`.
//! - [`Vddk::connect`] gives a [`Connection`]; [`Connection::open`] gives a [`Disk`] served by
//!   its own worker thread, which makes every call on that handle. Open, Close, ConnectEx and
//!   Disconnect are serialised process-wide.
//! - Errors are mapped in one place ([`VddkError`], with VDDK's text and an [`ErrorClass`]).
//! - [`ensure_library_path`] solves VDDK's `LD_LIBRARY_PATH` need by re-executing once.
//!
//! Nothing here needs VDDK to build; tests use `vddk-fake`. x86-64 Linux only (VDDK's
//! `va_list` log callbacks are bound for that ABI).
#![allow(unsafe_code, reason = "the safe wrapper over the VDDK FFI; each block says why it holds")]

mod disk;
mod error;
mod library;
mod logging;
mod reexec;
mod reply;

pub use disk::{Blocks, Disk, DiskInfo, OpenFlags, SECTOR};
pub use error::{ErrorClass, VddkError};
pub use library::{ConnectParams, Connection, Credentials, Library, Vddk};
pub use reexec::{LibraryPath, ensure_library_path, library_folder};
pub use reply::ReplyRx;
