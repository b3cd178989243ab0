//! `cargo xtask test | bench sip | fuzz` — project automation.
//!
//! `test` installs the real peers the suites drive (Debian packages, as root), then runs
//! every tier: unit and property tests, loopback tests with sipp, and the
//! network-namespace NAT labs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// The allocator pinhole's binary uses, so `bench node` measures the same allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod b2buabench;
mod bench;
mod clusterbench;
mod dtlsbench;
mod faketcpbench;
mod mmsg;
#[allow(unreachable_pub)]
#[path = "../../tests/common/netns.rs"]
mod netns;
mod nodebench;
mod relaybench;

/// Debian packages the test tiers need, by the command that proves each is there.
const PEERS: &[(&str, &str)] = &[
    ("sipp", "sip-tester"),
    ("baresip", "baresip"),
    ("kamailio", "kamailio"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("socat", "socat"),
    ("openssl", "openssl"),
    ("rtpengine", "rtpengine-daemon"),
    ("turnserver", "coturn"),
    ("stun", "stun-client"),
    ("tcpdump", "tcpdump"),
    ("conntrack", "conntrack"),
    ("redis-server", "redis-server"),
    ("redis-sentinel", "redis-sentinel"),
    ("miniupnpd", "miniupnpd-nftables"),
    ("node", "nodejs"),
    ("chromium", "chromium"),
    // The kernel fast path's program (build.rs) and looking at what is attached.
    ("clang", "clang"),
    ("bpftool", "bpftool"),
    // The HEP receiver the capture test exports to.
    ("sngrep", "sngrep"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench::run(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("install-peers") => install_peers(),
        Some("lab") => lab(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask test | bench sip [--rate N] | bench relay [--calls N] [--seconds N] [--srtp] | bench dtls | bench ng [--rate N] | bench punch | bench faketcp [--calls N] [--seconds N] | fuzz [SECONDS] | lab KIND | install-peers");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

fn install_peers() -> anyhow::Result<()> {
    let missing: Vec<&str> = PEERS.iter().filter(|(cmd, _)| !have(cmd)).map(|(_, pkg)| *pkg).collect();
    let module_missing = |m: &str| {
        !Path::new("/usr/lib/x86_64-linux-gnu/kamailio/modules").join(m).exists()
            && !Path::new("/usr/lib/kamailio/modules").join(m).exists()
    };
    let mut pkgs: Vec<&str> = missing;
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        pkgs.push("libbpf-dev");
    }
    // Kamailio's modules in packages of their own: rtpengine (ng), websocket (browsers).
    for (module, pkg) in [("rtpengine.so", "kamailio-extra-modules"), ("websocket.so", "kamailio-websocket-modules")] {
        if module_missing(module) {
            pkgs.push(pkg);
        }
    }
    if pkgs.is_empty() {
        println!("xtask: test peers present");
        return install_js_peers();
    }
    if !is_root() {
        anyhow::bail!("missing packages {pkgs:?}; run as root so they can be installed with apt-get");
    }
    println!("xtask: installing {pkgs:?}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    install_js_peers()
}

/// The browser-side SIP stacks the tests drive (JsSIP, and playwright-core to drive
/// Debian's Chromium; esbuild bundles JsSIP for the page), from npm at the versions
/// tests/js/package-lock.json pins. No browser is downloaded.
fn install_js_peers() -> anyhow::Result<()> {
    let js = root().join("tests/js");
    if ["jssip", "playwright-core", "esbuild"].iter().all(|m| js.join("node_modules").join(m).exists()) {
        return Ok(());
    }
    println!("xtask: installing the JavaScript test peers (npm ci in tests/js)");
    run(Command::new("npm").current_dir(&js).args(["ci", "--no-audit", "--no-fund"]))
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
    if !status.success() {
        anyhow::bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn test() -> anyhow::Result<()> {
    let t0 = Instant::now();
    install_peers()?;
    println!("xtask: formatting and lints");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // The fuzz targets live outside the workspace: they must keep compiling all the same.
    run(cargo().args(["check", "--quiet", "--manifest-path", "fuzz/Cargo.toml", "--bins"]))?;
    println!("xtask: tier 1-2: unit and property tests");
    run(cargo().args(["test", "--workspace", "--lib", "--bins"]))?;
    run(cargo().args(["test", "--workspace", "--doc"]))?;
    println!("xtask: tier 3-4: loopback tests with sipp, network-namespace NAT labs with baresip");
    let before = (peer_processes(), untracked_files());
    // Strict: a lab that cannot run (no root) fails rather than skipping.
    let tests = run(cargo()
        .args(["test", "--workspace", "--test", "*"])
        .env("RUST_TEST_THREADS", "4")
        .env("PINHOLE_TEST_STRICT", "1"));
    let leftovers = leftovers(&before.0, &before.1);
    tests?;
    if !leftovers.is_empty() {
        anyhow::bail!("the suite left these behind:\n  {}", leftovers.join("\n  "));
    }
    println!("xtask: all tiers passed in {:.0?}, nothing left running", t0.elapsed());
    Ok(())
}

/// Programs the suites start; any of them still running afterwards was left behind.
const PEER_PROGRAMS: &[&str] = &[
    "pinhole",
    "sipp",
    "kamailio",
    "baresip",
    "rtpengine",
    "turnserver",
    "socat",
    "stun",
    "redis-server",
    "redis-sentinel",
    "miniupnpd",
    "tcpdump",
    "node",
    "chromium",
];

/// (pid, program) of every running peer program.
fn peer_processes() -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?.trim().to_owned();
        // A zombie runs nothing: it is only waiting to be reaped.
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        (PEER_PROGRAMS.contains(&comm.as_str()) && !zombie).then_some((pid, comm))
    })
    .collect()
}

/// Peer processes that were not running `before`, and lab namespaces still present.
/// Files in the work tree that git neither tracks nor ignores (empty outside a checkout).
fn untracked_files() -> Vec<String> {
    let out = Command::new("git")
        .args(["ls-files", "--others", "--exclude-standard"])
        .current_dir(root())
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out).lines().map(str::to_owned).collect()
}

fn leftovers(before: &[(u32, String)], files_before: &[String]) -> Vec<String> {
    // Give processes killed at the very end of a test a moment to be reaped.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut out: Vec<String> = peer_processes()
        .into_iter()
        .filter(|p| !before.contains(p))
        .map(|(pid, comm)| format!("process {pid} ({comm})"))
        .collect();
    let namespaces = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&namespaces).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(netns::PREFIX) {
            out.push(format!("network namespace {name}"));
        }
    }
    // A peer started in the crate's directory writes there (a Redis replica's dump.rdb
    // was once committed that way): tests keep their files in their own directories.
    out.extend(untracked_files().into_iter().filter(|f| !files_before.contains(f)).map(|f| format!("file {f}")));
    out
}

fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let secs = args.first().map(String::as_str).unwrap_or("60");
    if !have("cargo-fuzz") {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root().join("fuzz");
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    for target in [
        "sip_message",
        "ng",
        "stun",
        "auth",
        "edge",
        "faketcp",
        "b2bua",
        "cluster",
        "srtp",
        "websocket",
        "dtls",
        "rtcp",
    ] {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut c = Command::new("cargo");
        c.current_dir(&fuzz_dir);
        if nightly {
            c.arg("+nightly");
        } else {
            // cargo-fuzz needs nightly flags; the stable toolchain accepts them this way.
            c.env("RUSTC_BOOTSTRAP", "1");
        }
        run(c
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(fuzz_dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={secs}")))?;
    }
    Ok(())
}

/// `cargo xtask lab KIND`: brings up a NAT lab by hand (as root) and removes it on Enter.
fn lab(args: &[String]) -> anyhow::Result<()> {
    use netns::NatKind;
    let kind = match args.first().map(String::as_str) {
        Some("open") => NatKind::Open,
        Some("full-cone") => NatKind::FullCone,
        Some("restricted") => NatKind::Restricted,
        Some("port-restricted") => NatKind::PortRestricted,
        Some("symmetric-seq") => NatKind::SymmetricSeq,
        Some("symmetric-random") => NatKind::SymmetricRandom,
        Some("udp-blocked") => NatKind::UdpBlocked,
        Some("udp-blocked-random") => NatKind::UdpBlockedRandom,
        other => anyhow::bail!(
            "lab kind {other:?}: open | full-cone | restricted | port-restricted | symmetric-seq | symmetric-random | udp-blocked | udp-blocked-random"
        ),
    };
    if !is_root() {
        anyhow::bail!("labs need root (network namespaces)");
    }
    let lab = netns::NatLab::new(kind);
    let l = &lab.lans[0];
    println!("lab {kind:?} is up:");
    println!("  WAN namespace {} — pinhole's addresses {} and {}", lab.wan, netns::WAN_SERVER, netns::WAN_ALTERNATE);
    println!("  NAT box {} — public {}, LAN router {}", l.nat, l.nat_wan, l.router);
    println!("  LAN host {} — {}", l.lan, l.host);
    println!("try: ip netns exec {} target/release/pinhole server --config …", lab.wan);
    println!("     ip netns exec {} target/release/pinhole probe --server {}:3478", lab.lan, netns::WAN_SERVER);
    println!("press Enter to tear it down");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    drop(lab);
    Ok(())
}
