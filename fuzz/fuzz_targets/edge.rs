//! An agent's media engine with a call mid-punch: arbitrary datagrams on its window (from
//! the relay, the server's STUN, or a stranger), on the phone port and on nothing. Never
//! panics; a stranger's datagram never reaches the phone and is never answered.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinhole_media::edge::{EdgeMedia, Sends, Socket};
use pinhole_media::latch::{Expected, LatchMode};
use pinhole_media::punch::scheduler::{Credentials, PunchPlan};
use pinhole_media::punch::Strategy;
use pinhole_media::relay::{Command, PortSpec, RelayPort, Side};

fn spec(port: u16, expected: &str) -> PortSpec {
    PortSpec {
        iface: 0,
        bind: "198.51.100.10".parse().expect("ip"),
        port: RelayPort(port),
        expected: Expected { sdp: Some(expected.parse().expect("addr")), signalling_ip: None },
        mode: LatchMode::default(),
        stats: Arc::default(),
        latched: None,
    }
}

fuzz_target!(|data: &[u8]| {
    // A gateway's answer to a port-mapping request, whatever it holds.
    {
        let now = std::time::Instant::now();
        let gw = std::net::Ipv4Addr::new(198, 51, 100, 1);
        let mut m = pinhole_media::portmap::PortMapper::new(now, gw, std::net::Ipv4Addr::new(198, 51, 100, 10), 31000, 7200, [1; 12]);
        while m.poll_transmit().is_some() {}
        m.handle_input(now, m.gateway(), data);
        if let Some(t) = m.poll_timeout() {
            m.handle_timeout(t);
        }
        m.release();
    }
    let t0 = Instant::now();
    let relay = "203.0.113.1:30000".parse().expect("addr");
    let stranger = "192.0.2.66:4000".parse().expect("addr");
    let mut e = EdgeMedia::new(31000, 31099, "203.0.113.1:3478".parse().expect("addr"), t0);
    e.apply(t0, Command::Link { shard: 1, a: spec(31000, "198.51.100.20:4000"), b: spec(31002, "203.0.113.1:30000") });
    let plan = PunchPlan {
        strategy: Strategy::SimultaneousOpen,
        side: Side::A,
        windows: ["203.0.113.2:31002".parse().expect("a"), "203.0.113.3:31002".parse().expect("b")],
        credentials: Credentials {
            local_ufrag: "aaaa".into(),
            local_pwd: "aaaa-password-0123456789".into(),
            remote_ufrag: "bbbb".into(),
            remote_pwd: "bbbb-password-0123456789".into(),
        },
        start: t0,
    };
    assert!(e.punch(t0, "call", 31002, plan, 7));
    let later = t0 + Duration::from_secs(11); // past the latch's learning window
    e.handle_timeout(later);
    while e.poll_transmit().is_some() {}
    let from_stranger = e.on_packet(later, Socket::Port(31002), stranger, data);
    assert_eq!(from_stranger, Sends::NONE, "a stranger reached the phone");
    while let Some((_, to, _)) = e.poll_transmit() {
        assert_ne!(to, stranger, "a stranger was answered");
    }
    let _ = e.on_packet(later, Socket::Port(31002), relay, data);
    let _ = e.on_packet(later, Socket::Port(31002), "203.0.113.1:3478".parse().expect("addr"), data);
    let _ = e.on_packet(later, Socket::Port(31000), "198.51.100.20:4000".parse().expect("addr"), data);
    let _ = e.on_packet(later, Socket::Extra { window: 31002, index: 3 }, stranger, data);
    let _ = e.on_packet(later, Socket::Port(31050), stranger, data);
    e.handle_timeout(later + Duration::from_secs(1));
    while e.poll_transmit().is_some() {}
    while e.poll_event().is_some() {}
});
