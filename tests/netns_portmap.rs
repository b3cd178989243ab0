//! Port mapping against Debian's miniupnpd (NAT-PMP/PCP, nftables backend) on a Linux NAT
//! box in a network namespace.
//!
//! What this lab can show is bounded by its addresses: only RFC 5737 documentation ranges
//! may be used, and miniupnpd 2.3.1 refuses to forward on an external interface whose
//! address is reserved ("Port forwarding is impossible"), answering PCP with NO_RESOURCES
//! and NAT-PMP with NETWORK_FAILURE. So the lab proves the refusal half of the promise: a
//! gateway whose miniupnpd refuses changes nothing, quickly (the client reads the real
//! daemon's PCP answer as a refusal, not as a mapping), and one with no daemon at all
//! costs three seconds of asking, no more.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::{nft, NatKind, NatLab};
use common::{in_ns, wait_for, Bg, TempDir};
use pinhole_media::portmap::PortMapper;
use std::os::unix::process::CommandExt;

/// miniupnpd on `lab`'s NAT box, NAT-PMP and PCP on its LAN side, with chains of its own.
fn miniupnpd(lab: &NatLab, dir: &std::path::Path) -> (Bg, std::path::PathBuf) {
    let lan = &lab.lans[0];
    nft(
        &lan.nat,
        "table inet phupnp {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    jump forward_upnp\n  }\n  chain forward_upnp {\n  }\n  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n    jump prerouting_upnp\n  }\n  chain prerouting_upnp {\n  }\n  chain postrouting {\n    type nat hook postrouting priority 99; policy accept;\n    jump postrouting_upnp\n  }\n  chain postrouting_upnp {\n  }\n}\n",
    );
    let conf = dir.join("miniupnpd.conf");
    std::fs::write(
        &conf,
        "ext_ifname=wan0\nlistening_ip=lan0\nenable_natpmp=yes\nenable_upnp=no\nsecure_mode=yes\n\
         upnp_table_name=phupnp\nupnp_nat_table_name=phupnp\nupnp_forward_chain=forward_upnp\n\
         upnp_nat_chain=prerouting_upnp\nupnp_nat_postrouting_chain=postrouting_upnp\n\
         allow 1024-65535 198.51.100.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
    )
    .expect("config");
    let log = dir.join("miniupnpd.log");
    let child = NatLab::command(&lan.nat, "/usr/sbin/miniupnpd")
        .args(["-f", &conf.display().to_string(), "-d", "-P", &dir.join("miniupnpd.pid").display().to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .process_group(0)
        .spawn()
        .expect("miniupnpd (package miniupnpd-nftables) must be installed");
    assert!(
        wait_for(&log, "starting NAT-PMP/PCP", Duration::from_secs(5)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (Bg(Some(child)), log)
}

/// Runs a mapper for UDP port 31000 of the LAN host against its gateway over a real
/// socket: whether it ended with a mapping, how long it took, and the answers it got.
fn map_from_lan(lab: &NatLab) -> (bool, bool, Duration) {
    let lan = &lab.lans[0];
    let (host, router): (Ipv4Addr, Ipv4Addr) = (lan.host.parse().expect("ip"), lan.router.parse().expect("ip"));
    in_ns(&lan.lan, move || {
        let sock = UdpSocket::bind(SocketAddr::new(host.into(), 31000)).expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        let t0 = Instant::now();
        let mut m = PortMapper::new(t0, router, host, 31000, 600, [9; 12]);
        let mut buf = [0u8; 1500];
        while m.mapping().is_none() && !m.failed() && t0.elapsed() < Duration::from_secs(10) {
            while let Some(d) = m.poll_transmit() {
                sock.send_to(&d, m.gateway()).expect("send");
            }
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                m.handle_input(Instant::now(), from, &buf[..n]);
            }
            if m.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                m.handle_timeout(Instant::now());
            }
        }
        (m.mapping().is_some(), m.failed(), t0.elapsed())
    })
}

#[test]
fn a_gateway_whose_miniupnpd_refuses_changes_nothing_and_is_known_within_a_second() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("portmap");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted]);
    // No daemon at all: both protocols time out, in 3 s.
    let (mapped, failed, took) = map_from_lan(&lab);
    assert!(!mapped && failed, "nothing answers: no mapping");
    assert!(took >= Duration::from_millis(2900) && took <= Duration::from_millis(3500), "{took:?}");
    // The real daemon, refusing (its external address is reserved): known at once.
    let (_daemon, log) = miniupnpd(&lab, dir.path());
    let (mapped, failed, took) = map_from_lan(&lab);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("Port forwarding is impossible"), "{text}");
    assert!(!mapped && failed, "a refusal is no mapping\n{text}");
    assert!(took < Duration::from_secs(1), "refused in {took:?}, not timed out\n{text}");
    assert!(text.contains("request received from"), "the daemon heard our request\n{text}");
}
