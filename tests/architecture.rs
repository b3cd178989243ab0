//! Layering rules that keep the protocol cores sans-IO.

use std::process::Command;

/// The sans-IO crates, by package name and source directory.
const SANS_IO: [(&str, &str); 3] =
    [("pinhole-sip", "sip/src"), ("pinhole-media", "media/src"), ("pinhole-core", "core/src")];

/// `pinhole-sip`, `pinhole-media` and `pinhole-core` must not depend on tokio (or any async
/// runtime): their logic is driven by the shell with explicit time.
#[test]
fn protocol_crates_do_not_depend_on_tokio() {
    for (krate, _) in SANS_IO {
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

/// Nor may their code (tests aside) touch sockets, files or the clock: time comes in as an
/// argument, bytes come in and go out through the shell.
#[test]
fn protocol_crates_do_no_io_and_read_no_clock() {
    const BANNED: [&str; 7] =
        ["UdpSocket", "TcpStream", "TcpListener", "std::fs", "Instant::now", "SystemTime::now", "std::process"];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    let mut lines_checked = 0;
    for (_, dir) in SANS_IO {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !name.ends_with(".rs") || name == "tests.rs" || name.ends_with("_tests.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source");
                checked += 1;
                let lines = outside_tests(&text);
                lines_checked += lines.len();
                if name == "b2bua.rs" {
                    // The declaration `mod tests;` sits mid-file there: what follows is read too.
                    assert!(
                        lines.last().is_some_and(|(i, _)| *i + 1 == text.lines().count()),
                        "b2bua.rs read to its end"
                    );
                }
                for (i, line) in lines {
                    if line.trim_start().starts_with("//") {
                        continue;
                    }
                    for banned in BANNED {
                        assert!(
                            !line.contains(banned),
                            "{}:{}: {banned} in sans-IO code: {line}",
                            path.display(),
                            i + 1
                        );
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} files checked");
    assert!(lines_checked >= 15_000, "only {lines_checked} lines checked");
}

/// The lines of a source file that are not test code, numbered from 0: everything but an
/// item marked `#[cfg(test)]` (a `mod tests;` declaration, or a block up to its closing
/// brace), wherever it sits in the file.
fn outside_tests(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            // Skip the item that follows: to its `;`, or to the brace that closes it.
            let mut depth = 0i32;
            let mut opened = false;
            for (_, l) in lines.by_ref() {
                let code = l.split("//").next().unwrap_or("");
                depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
                opened |= code.contains('{');
                if (opened && depth <= 0) || (!opened && code.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push((i, line));
    }
    out
}

#[test]
fn the_layering_guard_reads_past_a_test_module_to_the_end_of_the_file() {
    let src = "fn a() {}\n#[cfg(test)]\nmod tests;\nfn b() { Instant::now(); }\n#[cfg(test)]\nmod more {\n    fn t() { if x { y } }\n}\nfn c() {}\n";
    let kept: Vec<&str> = outside_tests(src).into_iter().map(|(_, l)| l).collect();
    assert_eq!(kept, vec!["fn a() {}", "fn b() { Instant::now(); }", "fn c() {}"]);
}
