//! Layering rules that keep the protocol cores sans-IO.

use std::process::Command;

/// `pinhole-sip` and `pinhole-media` must not depend on tokio (or any async runtime):
/// their logic is driven by the shell with explicit time.
#[test]
fn protocol_crates_do_not_depend_on_tokio() {
    for krate in ["pinhole-sip", "pinhole-media"] {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "--offline", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(tree.lines().any(|l| l.starts_with(krate)), "tree lists the crate itself");
        for banned in ["tokio ", "async-std ", "mio "] {
            assert!(!tree.lines().any(|l| l.starts_with(banned)), "{krate} depends on {banned}:\n{tree}");
        }
    }
}
