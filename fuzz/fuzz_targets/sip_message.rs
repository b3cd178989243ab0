//! The whole SIP message path: stream framing, scanning, validation, the proxy's routing
//! decision and the agent's stateless forwarding, fed with arbitrary bytes on UDP and TCP
//! flows. Nothing may panic.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pinhole_sip::stream::{Frame, Framer};
use pinhole_sip::{Cidr, ConnId, Flow, Interface, Keepalive, Proxy, ProxyConfig, RegistrarConfig, Transport};

fn config() -> ProxyConfig {
    let bind: SocketAddr = "203.0.113.1:5060".parse().expect("addr");
    ProxyConfig {
        domain: "example.com".into(),
        interfaces: vec![
            Interface { transport: Transport::Udp, bind, advertise: "203.0.113.1".into() },
            Interface { transport: Transport::Tcp, bind, advertise: "203.0.113.1".into() },
        ],
        realm: "example.com".into(),
        users: vec![("alice".into(), "pw".into())],
        auth_algorithms: vec![pinhole_sip::auth::Algorithm::Sha256, pinhole_sip::auth::Algorithm::Md5],
        trusted: vec![Cidr::parse("203.0.113.50/32").expect("cidr")],
        registrar: RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 },
        keepalive: Keepalive::Options,
        keepalive_interval: Duration::from_secs(30),
            keepalive_min: Duration::from_secs(5),
        max_body: 8192,
        max_message: 16384,
        secret: [3; 32],
        punch: Default::default(),
        faketcp_port: Some(4443),
        record_users: vec!["alice".into()],
        b2bua: Default::default(),
    }
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let now = *EPOCH.get_or_init(Instant::now);
    let mut proxy = Proxy::new(config(), None::<pinhole_media::relay::Relay>, now, 1_700_000_000, 7);
    let bind: SocketAddr = "203.0.113.1:5060".parse().expect("addr");
    // First byte picks the source: trusted or not; the rest is one datagram.
    let (src, payload) = match data.split_first() {
        Some((b, rest)) if b % 2 == 0 => ("203.0.113.50:5060", rest),
        Some((_, rest)) => ("198.51.100.9:40000", rest),
        None => return,
    };
    let remote: SocketAddr = src.parse().expect("addr");
    let udp = Flow { transport: Transport::Udp, local: bind, remote, conn: None };
    let _ = proxy.handle_input(now, udp, Bytes::copy_from_slice(payload));
    while proxy.poll_transmit().is_some() {}
    proxy.handle_timeout(now + Duration::from_secs(40));
    while proxy.poll_transmit().is_some() {}

    // The agent's stateless path sees the same datagram.
    let relay =
        pinhole_media::relay::Relay::new(pinhole_sip::agent::relay_config("198.51.100.2".parse().expect("ip"), 31000, 31099), now);
    let mut agent = pinhole_sip::agent::Agent::new(
        pinhole_sip::agent::AgentConfig {
            listen: bind,
            server: "203.0.113.50:5060".parse().expect("addr"),
            max_message: 16384,
            secret: [1; 32],
        },
        Some(relay),
    );
    let _ = agent.handle_input(now, udp, Bytes::copy_from_slice(payload));
    while agent.poll_transmit().is_some() {}
    // And as if the server sent it (plans and offers are then checked, signed or not).
    let server = Flow { remote: "203.0.113.50:5060".parse().expect("addr"), ..udp };
    let _ = agent.handle_input(now, server, Bytes::copy_from_slice(payload));
    while agent.poll_transmit().is_some() {}
    while agent.poll_plan().is_some() {}
    // The plan parser, its signature and the agent's key header, on the raw text.
    if let Ok(text) = std::str::from_utf8(payload) {
        let _ = pinhole_media::punch::sdp::WirePlan::from_sdp(text);
        let _ = pinhole_sip::agent::plan_signed(&[1; 32], "c", text);
        let _ = pinhole_sip::agent::key_from_header(text);
        let _ = pinhole_sip::agent::parse_profile_sig(text);
        let _ = pinhole_sip::b2bua::dialable(text);
    }

    let tcp = Flow { transport: Transport::Tcp, local: bind, remote, conn: Some(ConnId(1)) };
    let mut framer = Framer::new(16384);
    framer.extend(payload);
    while let Ok(Some(frame)) = framer.next_frame() {
        if let Frame::Message(m) = frame {
            if proxy.handle_input(now, tcp, m).is_err() {
                break;
            }
        }
    }
});
