//! Tier 4 for NAT discovery: `pinhole probe --json` on a LAN host behind the Linux kernel's
//! NAT, against pinhole's RFC 5780 STUN service on two WAN addresses, must report the
//! behaviour the nftables recipe gives. Needs root.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Stdio;

use common::netns::{NatKind, NatLab, WAN_ALTERNATE, WAN_SERVER};
use common::TempDir;

/// pinhole on the WAN with the RFC 5780 service on both WAN addresses; SIP over UDP, or UDP
/// and TCP (`sip = "tcp"`, for the TCP reachability check).
fn stun_config(sip: &str) -> String {
    let listen = if sip == "tcp" {
        format!("\"udp:{WAN_SERVER}:5060\", \"tcp:{WAN_SERVER}:5060\"")
    } else {
        format!("\"udp:{WAN_SERVER}:5060\"")
    };
    format!(
        "[sip]\nlisten = [{listen}]\ndomain = \"probe.test\"\n[registrar]\nstore = \"\"\n[media]\nmode = \"off\"\n\
         [stun]\nlisten = [\"{WAN_SERVER}:3478\", \"{WAN_SERVER}:3479\"]\nalternate = \"{WAN_ALTERNATE}\"\n[metrics]\n"
    )
}

/// `pinhole probe --json` on the lab's LAN host against the WAN server.
fn run_probe(lab: &NatLab, extra: &[&str]) -> std::process::Output {
    NatLab::command(&lab.lan, env!("CARGO_BIN_EXE_pinhole"))
        .args(["probe", "--server", &format!("{WAN_SERVER}:3478"), "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("probe")
}

fn probe(kind: NatKind) -> serde_json::Value {
    let dir = TempDir::new("probe");
    let lab = NatLab::new(kind);
    let (_pinhole, _log) = lab.start_pinhole(dir.path(), &stun_config("udp"));
    let out = run_probe(&lab, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "probe failed ({:?}): {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("probe JSON ({e}): {text}"));
    eprintln!(
        "probe {kind:?}: mapping {} · filtering {} · allocation {} {} · verdict {} · ports {}",
        r["mapping"],
        r["filtering"],
        r["allocation"]["kind"],
        r["allocation"]["delta"],
        r["verdict"],
        r["allocation"]["ports"]
    );
    r
}

#[test]
fn masquerade_is_classified_port_restricted_cone_with_preserved_ports() {
    if !common::netns::have_root() {
        return;
    }
    let r = probe(NatKind::PortRestricted);
    assert_eq!(r["nat"], true, "{r}");
    assert_eq!(r["mapping"], "endpoint-independent", "{r}");
    assert_eq!(r["filtering"], "address-and-port-dependent", "{r}");
    assert_eq!(r["allocation"]["kind"], "preserving", "{r}");
    assert_eq!(r["verdict"], "port-restricted cone", "{r}");
    assert!(r["mapped"].as_str().is_some_and(|m| m.starts_with("203.0.113.2:")), "{r}");
}

#[test]
fn masquerade_random_is_classified_symmetric_with_random_ports() {
    if !common::netns::have_root() {
        return;
    }
    let r = probe(NatKind::SymmetricRandom);
    assert_eq!(r["mapping"], "address-and-port-dependent", "{r}");
    assert_eq!(r["filtering"], "address-and-port-dependent", "{r}");
    assert_eq!(r["allocation"]["kind"], "random", "{r}");
    assert_eq!(r["verdict"], "symmetric", "{r}");
}

#[test]
fn no_nat_is_open_internet() {
    if !common::netns::have_root() {
        return;
    }
    let r = probe(NatKind::Open);
    assert_eq!(r["nat"], false, "{r}");
    assert_eq!(r["verdict"], "open internet", "{r}");
}

#[test]
fn full_cone_recipe_is_eim_and_eif() {
    if !common::netns::have_root() {
        return;
    }
    let r = probe(NatKind::FullCone);
    assert_eq!(
        (r["mapping"].as_str(), r["filtering"].as_str()),
        (Some("endpoint-independent"), Some("endpoint-independent")),
        "{r}"
    );
    assert_eq!(r["verdict"], "full cone", "{r}");
}

#[test]
fn restricted_cone_recipe_is_eim_and_adf() {
    if !common::netns::have_root() {
        return;
    }
    let r = probe(NatKind::Restricted);
    assert_eq!(
        (r["mapping"].as_str(), r["filtering"].as_str()),
        (Some("endpoint-independent"), Some("address-dependent")),
        "{r}"
    );
    assert_eq!(r["verdict"], "restricted cone", "{r}");
}

#[test]
fn numgen_symmetric_nat_allocates_sequentially_with_delta_one() {
    if !common::netns::have_root() {
        return;
    }
    let r = probe(NatKind::SymmetricSeq);
    assert_eq!(r["mapping"], "address-and-port-dependent", "{r}");
    assert_eq!(r["allocation"]["kind"], "sequential", "{r}");
    assert_eq!(r["allocation"]["delta"], 1, "{r}");
}

#[test]
fn udp_blocked_exits_3_and_says_tcp_still_works() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("probeblk");
    let lab = NatLab::new(NatKind::UdpBlocked);
    let (_pinhole, _log) = lab.start_pinhole(dir.path(), &stun_config("tcp"));
    let out = run_probe(&lab, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    let r: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!((r["udp"].as_bool(), r["tcp"].as_bool()), (Some(false), Some(true)), "{r}");
    assert_eq!(r["verdict"], "UDP blocked");
}

/// Cross-check with an independent RFC 5780 server: `pinhole probe` against coturn (from
/// Debian, STUN-only on both WAN addresses) reaches the same verdict as against pinhole.
#[test]
fn probe_against_coturn_agrees_with_probe_against_pinhole() {
    if !common::netns::have_root() {
        return;
    }
    for kind in [NatKind::PortRestricted, NatKind::SymmetricSeq] {
        let ours = probe(kind);
        let dir = TempDir::new("coturn");
        let lab = NatLab::new(kind);
        let log = dir.path().join("turnserver.log");
        let _coturn = common::Bg(Some(
            NatLab::command(&lab.wan, "turnserver")
                .args(["-n", "--stun-only", "--no-cli", "-L", WAN_SERVER, "-L", WAN_ALTERNATE])
                .args([
                    "--listening-port",
                    "3478",
                    "--alt-listening-port",
                    "3479",
                    "--log-file",
                    "stdout",
                    "--no-tls",
                    "--no-dtls",
                ])
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&log).expect("log"))
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("turnserver (package coturn) must be installed"),
        ));
        // coturn says nothing when ready: probe until it answers (exit 2: unreachable).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let out = loop {
            let out = run_probe(&lab, &[]);
            if out.status.code() != Some(2) || std::time::Instant::now() > deadline {
                break out;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let theirs: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{e}: {text}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        for key in ["mapping", "filtering", "verdict"] {
            assert_eq!(theirs[key], ours[key], "{kind:?} {key}: coturn {theirs} vs pinhole {ours}");
        }
        assert_eq!(theirs["allocation"]["kind"], ours["allocation"]["kind"], "{kind:?}");
    }
}

/// Cross-check with an independent client: Debian's `stun` (stun-client, RFC 3489) behind
/// each NAT, against pinhole's STUN service, reports a type consistent with our verdict.
#[test]
fn debian_stun_client_agrees_with_the_probe_verdict() {
    if !common::netns::have_root() {
        return;
    }
    for (kind, expect) in [
        (NatKind::Open, "Open"),
        (NatKind::FullCone, "Independent Mapping, Independent Filter"),
        (NatKind::Restricted, "Independent Mapping, Address Dependent Filter"),
        (NatKind::PortRestricted, "Independent Mapping, Port Dependent Filter"),
        (NatKind::SymmetricRandom, "Dependent Mapping"),
    ] {
        let dir = TempDir::new("stunclient");
        let lab = NatLab::new(kind);
        let (_pinhole, _log) = lab.start_pinhole(dir.path(), &stun_config("udp"));
        let out = NatLab::command(&lab.lan, "stun")
            .arg(format!("{WAN_SERVER}:3478"))
            .stdin(Stdio::null())
            .output()
            .expect("stun (package stun-client) must be installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let primary = text.lines().find_map(|l| l.strip_prefix("Primary:")).unwrap_or_default().trim().to_owned();
        // starts_with, not contains: "Independent Mapping" contains "Dependent Mapping".
        assert!(primary.starts_with(expect), "{kind:?}: stun said {primary:?}, expected {expect:?}\n{text}");
    }
}

/// `--lifetime`: with the NAT box's UDP conntrack timeouts cut to 5 s, an idle mapping is
/// still there after 4 s and gone after 8 s.
#[test]
fn binding_lifetime_follows_the_nat_timeout() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("lifetime");
    let lab = NatLab::new(NatKind::PortRestricted);
    common::netns::ns_exec(
        &lab.nat,
        &[
            "sysctl",
            "-q",
            "net.netfilter.nf_conntrack_udp_timeout=5",
            "net.netfilter.nf_conntrack_udp_timeout_stream=5",
        ],
    );
    let (_pinhole, _log) = lab.start_pinhole(dir.path(), &stun_config("udp"));
    let out = run_probe(&lab, &["--lifetime"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["lifetime"]["alive_after_s"], 4, "{r}");
    assert_eq!(r["lifetime"]["gone_after_s"], 8, "{r}");
}
