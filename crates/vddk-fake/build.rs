//! Builds the fake VixDiskLib from C into this crate's output folder, twice: as
//! `libvixDiskLib.so.8` (also inside a VDDK-like `lib64/` tree) and, without the 6.7 symbols and
//! with VDDK 6's 56-byte `VixDiskLibInfo`, as `libvixDiskLib.so.6`.

use std::path::{Path, PathBuf};

fn build(out: &Path, dir: &str, soname: &str, defines: &[&str]) {
    let target = out.join(dir);
    std::fs::create_dir_all(&target).expect("create output folder");
    let compiler = cc::Build::new().get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-O2", "-g", "-std=c11", "-pthread", "-Wall", "-Wextra", "-Werror"])
        .args(defines)
        .arg("-I")
        .arg(Path::new("../vddk-sys/include"))
        .arg("fake/fake_vixdisklib.c")
        .arg(format!("-Wl,-soname,{soname}"))
        .arg("-o")
        .arg(target.join(soname))
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "building the fake {soname} failed");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    build(&out, "v8", "libvixDiskLib.so.8", &[]);
    build(&out, "v6", "libvixDiskLib.so.6", &["-DFAKE_VDDK6"]);
    build(&out, "distrib/lib64", "libvixDiskLib.so.8", &[]);
    println!("cargo::rerun-if-changed=fake/fake_vixdisklib.c");
    println!("cargo::rerun-if-changed=../vddk-sys/include/vixDiskLib.h");
}
