//! Builds the kernel fast path's program (bpf/fastpath.bpf.c) with clang when it can
//! (Debian's `clang` and `libbpf-dev`); without them pinhole builds and runs on its
//! userspace relay, and says so when `[media] fastpath = "auto"` asks for the program.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pinhole_bpf)");
    println!("cargo::rerun-if-changed=bpf/fastpath.bpf.c");
    // Built again once clang appears (cargo xtask test installs it).
    println!("cargo::rerun-if-changed=/usr/bin/clang");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("fastpath.bpf.o");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default());
    let built = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{arch_include}"))
        .args(["-c", "bpf/fastpath.bpf.c", "-o"])
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    // Without it the build stays quiet: the server says at start that the fast path was
    // not built, where an operator looks.
    if built {
        println!("cargo::rustc-cfg=pinhole_bpf");
    }
}
