//! Fake TCP through a real Linux NAT box that drops all forwarded UDP, with the kernel's
//! default strict TCP window tracking: `pinhole probe --faketcp` on the LAN host against the
//! server's forwarder on the WAN. The connection must stay ESTABLISHED in the NAT box's
//! conntrack, every datagram must come back, and the box must see no RST and no INVALID
//! packet. Needs root (network namespaces, raw sockets, nftables).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::{nft, nft_counter, ns_exec, NatKind, NatLab, WAN_SERVER};
use common::TempDir;

fn counter(ns: &str, name: &str) -> u64 {
    nft_counter(ns, "phft", name)
}

#[test]
fn fake_tcp_crosses_a_udp_blocking_nat_with_strict_conntrack_and_stays_established() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("faketcp");
    let lab = NatLab::new(NatKind::UdpBlocked);
    let liberal = ns_exec(&lab.nat, &["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_be_liberal"]);
    assert_eq!(String::from_utf8_lossy(&liberal.stdout).trim(), "0", "strict window tracking");
    // What the NAT box forwards: RSTs and packets conntrack calls INVALID, counted.
    let rules = "table inet phft {\n  counter rst {}\n  counter invalid {}\n  counter segments {}\n  chain watch {\n    type filter hook forward priority -10; policy accept;\n    tcp flags & rst == rst counter name rst\n    ct state invalid counter name invalid\n    meta l4proto tcp counter name segments\n  }\n}\n";
    nft(&lab.nat, rules);
    let (_server, log) = lab.start_pinhole(
        dir.path(),
        &format!(
            "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n[registrar]\nstore = \"\"\n\
             [faketcp]\nlisten = \"{WAN_SERVER}:4443\"\n"
        ),
    );
    assert!(common::wait_for(&log, "fake-TCP forwarder", Duration::from_secs(5)), "forwarder not started");
    let probe = NatLab::command(&lab.lan, env!("CARGO_BIN_EXE_pinhole"))
        .args(["probe", "--faketcp", &format!("{WAN_SERVER}:4443"), "--count", "250"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("probe");
    // Mid-run, the NAT box tracks one TCP connection to the forwarder, ESTABLISHED.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut seen = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let out = ns_exec(&lab.nat, &["conntrack", "-L", "-p", "tcp", "--dport", "4443"]);
        seen = String::from_utf8_lossy(&out.stdout).into_owned();
        if seen.contains("ESTABLISHED") {
            break;
        }
    }
    assert!(seen.contains("ESTABLISHED") && seen.contains("dport=4443"), "conntrack: {seen}");
    eprintln!("conntrack on the NAT box during the run:\n{seen}");
    let out = probe.wait_with_output().expect("probe ran");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the probe failed: {stdout}");
    assert!(stdout.contains("250/250 datagrams echoed"), "{stdout}");
    // Still ESTABLISHED after 5 s of media, and nothing RST or INVALID crossed the box.
    let after = String::from_utf8_lossy(&ns_exec(&lab.nat, &["conntrack", "-L", "-p", "tcp"]).stdout).into_owned();
    assert!(after.contains("ESTABLISHED"), "{after}");
    assert!(counter(&lab.nat, "segments") >= 500, "the datagrams crossed as TCP");
    assert_eq!((counter(&lab.nat, "rst"), counter(&lab.nat, "invalid")), (0, 0));
    // And the server's host answered nothing itself: its RST rule was in place.
    let server_rules = String::from_utf8_lossy(&ns_exec(&lab.wan, &["nft", "list", "ruleset"]).stdout).into_owned();
    assert!(server_rules.contains("pinhole_faketcp"), "{server_rules}");
}
