//! Finding the library: a missing one names every path tried; the VDDK distribution layout
//! (`lib64/`) is found; a file that is not a library is reported with dlopen's reason.

use vddk::{Library, VddkError};
use vddk_fake::{Fake, libdir};

#[test]
fn a_missing_library_names_every_path_tried() {
    let dir = tempfile::tempdir().unwrap();
    match Library::load(dir.path()) {
        Err(e @ VddkError::NotFound { .. }) => {
            let text = e.to_string();
            for v in [9, 8, 7, 6] {
                assert!(text.contains(&format!("lib64/libvixDiskLib.so.{v}")), "{text}");
                assert!(text.contains(&format!("{}/libvixDiskLib.so.{v}", dir.path().display())), "{text}");
            }
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[test]
fn the_distribution_layout_and_a_broken_file() {
    let lib = Library::load(&libdir(Fake::Distrib)).unwrap();
    assert!(lib.path().ends_with("lib64/libvixDiskLib.so.8"), "{}", lib.path().display());
    assert_eq!(lib.version(), 8);
    assert!(lib.optional_functions().iter().all(|(_, present)| *present));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libvixDiskLib.so.8"), "not a library").unwrap();
    let text = Library::load(dir.path()).unwrap_err().to_string();
    let line = format!("{}/libvixDiskLib.so.8: ", dir.path().display());
    let reason = text.lines().find_map(|l| l.trim().strip_prefix(line.as_str())).unwrap_or_default();
    assert!(reason.contains("header") || reason.contains("too short"), "dlopen's reason missing: {text}");
}
