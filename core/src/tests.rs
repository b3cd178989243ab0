//! The node in virtual time: one output loop over proxy, relay and ng.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pinhole_media::ng::Bencode;
use pinhole_sip::{Cidr, Interface, Keepalive, RegistrarConfig, Transport};

use super::*;

const LOCAL: &str = "203.0.113.1:5060";
const TRUNK: &str = "203.0.113.50:5060";
const CALLEE: &str = "203.0.113.60:5060";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn config() -> NodeConfig {
    let ip = "203.0.113.1".parse().expect("ip");
    NodeConfig {
        proxy: ProxyConfig {
            domain: "example.com".into(),
            interfaces: vec![Interface {
                transport: Transport::Udp,
                bind: addr(LOCAL),
                advertise: "203.0.113.1".into(),
            }],
            realm: "example.com".into(),
            users: vec![],
            auth_algorithms: vec![pinhole_sip::auth::Algorithm::Md5],
            trusted: vec![Cidr::parse("203.0.113.0/24").expect("cidr")],
            registrar: RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 },
            keepalive: Keepalive::Off,
            keepalive_interval: Duration::from_secs(30),
            keepalive_min: Duration::from_secs(5),
            max_body: 16384,
            max_message: 32768,
            secret: [1; 32],
            punch: Default::default(),
            faketcp_port: None,
            record_users: Vec::new(),
            b2bua: Default::default(),
        },
        relay: Some(RelayConfig { media_timeout: Duration::from_secs(20), ..RelayConfig::single(ip, 30000, 30099) }),
        fleet: vec![],
    }
}

struct Run {
    node: Node,
    now: Instant,
    sent: Vec<Transmit>,
    commands: usize,
    events: Vec<Event>,
    /// Relay nodes by ng address: the edge's ng datagrams reach them and their replies
    /// come back at once. Datagrams to any other address are kept in `ng` unanswered.
    relays: Vec<(SocketAddr, Arc<Mutex<Node>>)>,
    ng: Vec<(SocketAddr, Vec<u8>)>,
}

impl Run {
    fn new() -> Run {
        let now = Instant::now();
        Run::with(Node::new(config(), now, 1_700_000_000, 9), now)
    }

    fn with(node: Node, now: Instant) -> Run {
        Run { node, now, sent: vec![], commands: 0, events: vec![], relays: vec![], ng: vec![] }
    }

    /// Polls until the node is waiting; returns what it waits for.
    fn drain(&mut self) -> Option<(Instant, &'static str)> {
        loop {
            match self.node.poll_output(self.now) {
                Output::Transmit(t) => self.sent.push(t),
                Output::Media(_) => self.commands += 1,
                Output::Event(e) => self.events.push(e),
                Output::Ng { to, payload } => {
                    let relay = self.relays.iter().find(|(a, _)| *a == to).map(|(_, n)| n.clone());
                    let reply =
                        relay.and_then(|n| n.lock().ok()?.handle_ng(self.now, addr("203.0.113.1:40000"), &payload));
                    match reply {
                        Some(reply) => assert!(self.node.handle_fleet_reply(self.now, to, &reply), "reply taken"),
                        None => self.ng.push((to, payload)),
                    }
                }
                Output::Timeout(at, why) => return Some((at, why)),
                _ => return None,
            }
        }
    }

    fn sip(&mut self, from: &str, text: &str) {
        let flow = Flow { transport: Transport::Udp, local: addr(LOCAL), remote: addr(from), conn: None };
        let wire = text.replace("\r\n", "\n").replace('\n', "\r\n");
        self.node.handle_sip(self.now, flow, Bytes::from(wire)).expect("SIP");
        self.drain();
    }

    /// Jumps from wakeup to wakeup until `d` has passed.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some((at, _)) = self.drain().filter(|(at, _)| *at <= end) {
            self.now = at.max(self.now);
            self.node.handle_timeout(self.now);
        }
        self.now = end;
    }
}

const SDP: &str = "v=0\no=- 1 1 IN IP4 203.0.113.50\ns=-\nc=IN IP4 203.0.113.50\nt=0 0\nm=audio 6000 RTP/AVP 0\n";

fn invite() -> String {
    format!(
        "INVITE sip:bob@{CALLEE} SIP/2.0
Via: SIP/2.0/UDP {TRUNK};branch=z9hG4bKnode1
Max-Forwards: 70
To: <sip:bob@example.com>
From: <sip:alice@example.com>;tag=a1
Call-ID: node-call
CSeq: 1 INVITE
Contact: <sip:alice@{TRUNK}>
Content-Type: application/sdp
Content-Length: {}

{SDP}",
        SDP.replace('\n', "\r\n").len()
    )
}

/// A fleet relay at `ng`, serving anyone.
fn relay_at(ng: &str) -> pinhole_media::fleet::RelaySpec {
    pinhole_media::fleet::RelaySpec { ng: addr(ng), weight: 1, region: None, cidrs: vec![], stun: None }
}

/// bob's REGISTER from the operator's network (vouched for), number `n`, with `extra`
/// header lines (each ending in a newline).
fn register_bob(n: u32, extra: &str) -> String {
    format!(
        "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/UDP {CALLEE};branch=z9hG4bKreg{n}
Max-Forwards: 70
To: <sip:bob@example.com>
From: <sip:bob@example.com>;tag=r{n}
Call-ID: reg-bob-{n}
CSeq: 1 REGISTER
Contact: <sip:bob@{CALLEE}>
{extra}Content-Length: 0

"
    )
}

#[test]
fn a_fresh_node_is_idle_and_says_why_it_wakes_once_it_has_work() {
    let mut r = Run::new();
    assert_eq!(r.drain(), None, "nothing to do, no timer");
    r.sip(TRUNK, &invite());
    let (_, why) = r.drain().expect("a timer now");
    assert!(["sip transaction timer", "relay statistics", "relay deadline"].contains(&why), "{why}");
}

#[test]
fn sdp_from_the_proxy_and_ng_commands_reach_the_same_relay() {
    let mut r = Run::new();
    r.sip(TRUNK, &invite());
    let fwd = r.sent.iter().find(|t| t.flow.remote == addr(CALLEE)).expect("forwarded INVITE");
    assert!(String::from_utf8_lossy(&fwd.payload).contains("c=IN IP4 203.0.113.1"), "anchored");
    assert!(r.commands >= 1, "the data plane was told to bind ports");
    let reply = r.node.handle_ng(r.now, addr("127.0.0.1:9"), b"l1 d7:command4:liste").expect("reply");
    let (_, body) = pinhole_media::ng::split_cookie(&reply).expect("cookie");
    let list = Bencode::decode(body).expect("bencode");
    assert_eq!(list.get("calls"), Some(&Bencode::List(vec![Bencode::str("node-call")])));
}

#[test]
fn a_call_the_relay_ends_is_reported_and_torn_down() {
    let mut r = Run::new();
    r.sip(TRUNK, &invite());
    let fwd = r.sent.iter().find(|t| t.flow.remote == addr(CALLEE)).expect("forwarded").clone();
    let m = pinhole_sip::message::Message::parse(Bytes::from(fwd.payload)).expect("SIP");
    let answer =
        "v=0\r\no=- 2 2 IN IP4 203.0.113.60\r\ns=-\r\nc=IN IP4 203.0.113.60\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";
    let mut ok =
        String::from_utf8(m.response(200, "OK", Some("b1"), &[format!("Contact: <sip:bob@{CALLEE}>")])).expect("utf8");
    for rr in m.value_texts(pinhole_sip::message::HeaderName::RecordRoute) {
        ok = ok.replacen("\r\n", &format!("\r\nRecord-Route: {rr}\r\n"), 1);
    }
    let ok = ok.replace(
        "Content-Length: 0\r\n",
        &format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n", answer.len()),
    ) + answer;
    r.sent.clear();
    r.sip(CALLEE, &ok);
    r.advance(Duration::from_secs(25));
    assert!(
        r.events.iter().any(|e| matches!(e, Event::CallEnded { call_id, reason: "media" } if call_id == "node-call")),
        "{:?}",
        r.events
    );
    let byes = r.sent.iter().filter(|t| t.payload.starts_with(b"BYE ")).map(|t| t.flow.remote).collect::<Vec<_>>();
    assert!(byes.contains(&addr(TRUNK)) && byes.contains(&addr(CALLEE)), "BYE to both sides: {byes:?}");
    assert_eq!(r.node.relay().map(Relay::call_count), Some(0));
}

#[test]
fn keepalives_on_the_sip_port_are_absorbed_or_answered_not_parsed_as_sip() {
    let mut r = Run::new();
    let flow = Flow { transport: Transport::Udp, local: addr(LOCAL), remote: addr("198.51.100.7:40000"), conn: None };
    assert!(r.node.handle_sip(r.now, flow, Bytes::from_static(b"\r\n\r\n")).is_ok());
    r.drain();
    assert!(r.sent.is_empty(), "a CRLF keepalive gets no answer");
    // A STUN Binding request: 20-byte header with the magic cookie, no attributes.
    let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7u8; 12]);
    assert!(r.node.handle_sip(r.now, flow, Bytes::from(stun.clone())).is_ok());
    r.drain();
    assert_eq!(r.sent.len(), 1);
    assert_eq!(r.sent[0].flow, flow);
    assert_eq!(&r.sent[0].payload[..2], &[0x01, 0x01], "a Binding success response");
    assert_eq!(&r.sent[0].payload[8..20], &stun[8..20], "same transaction id");
    assert!(r.sent[0].payload.len() <= 3 * stun.len());
}

#[test]
fn an_edge_with_a_fleet_anchors_on_the_relay_node_and_asks_it_for_statistics() {
    let now = Instant::now();
    let mut relay_cfg = config();
    relay_cfg.relay = Some(RelayConfig::single("203.0.113.21".parse().expect("ip"), 40000, 40099));
    let relay_node = Arc::new(Mutex::new(Node::new(relay_cfg, now, 1_700_000_000, 3)));
    let spec = relay_at("203.0.113.21:2223");
    let edge_cfg = NodeConfig { fleet: vec![spec], ..config() };
    let mut r = Run::with(Node::new(edge_cfg, now, 1_700_000_000, 9), now);
    assert!(r.node.relay().is_none(), "an edge with a fleet has no relay of its own");

    // The first poll asks the relay for its statistics.
    let cookie = match r.node.poll_output(now) {
        Output::Ng { to, payload } => {
            assert_eq!(to, addr("203.0.113.21:2223"));
            assert!(payload.ends_with(b"d7:command10:statisticse"));
            payload.split(|b| *b == b' ').next().map(<[u8]>::to_vec).unwrap_or_default()
        }
        other => panic!("expected a statistics request, got {other:?}"),
    };
    r.relays.push((addr("203.0.113.21:2223"), relay_node.clone()));
    r.sip(TRUNK, &invite());
    let fwd = r.sent.iter().find(|t| t.flow.remote == addr(CALLEE)).expect("forwarded INVITE");
    assert!(String::from_utf8_lossy(&fwd.payload).contains("c=IN IP4 203.0.113.21"), "anchored on the relay node");
    assert_eq!(r.commands, 0, "no data plane commands on the edge");
    let relay_calls = relay_node.lock().expect("lock").relay().map(Relay::call_count);
    assert_eq!(relay_calls, Some(1));
    assert_eq!(r.node.fleet().map(|f| f.call_count()), Some(1));

    // The callee's answer waits for the relay's answer too, then goes up anchored.
    let fwd = pinhole_sip::message::Message::parse(Bytes::from(fwd.payload.clone())).expect("SIP");
    let body =
        "v=0\r\no=- 2 2 IN IP4 203.0.113.60\r\ns=-\r\nc=IN IP4 203.0.113.60\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";
    let ok = String::from_utf8(fwd.response(200, "OK", Some("b1"), &["Contact: <sip:bob@203.0.113.60:5060>".into()]))
        .expect("utf8")
        .replace(
            "Content-Length: 0\r\n\r\n",
            &format!("Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        );
    r.sent.clear();
    r.sip(CALLEE, &ok);
    let up = r.sent.iter().find(|t| t.flow.remote == addr(TRUNK)).expect("the 200 went up");
    let up = String::from_utf8_lossy(&up.payload);
    assert!(up.starts_with("SIP/2.0 200") && up.contains("c=IN IP4 203.0.113.21"), "anchored on the relay:\n{up}");
    assert_eq!(r.node.proxy().media_waiting(), 0);

    // Its statistics reply is taken; garbage is not.
    let stats = [&cookie[..], b" d6:result2:ok10:statisticsd17:currentstatisticsd11:sessionsowni1eeee"].concat();
    assert!(!r.node.handle_fleet_reply(now, addr("203.0.113.21:2223"), &stats[1..]), "not our cookie");
    assert!(r.node.handle_fleet_reply(now, addr("203.0.113.21:2223"), &stats));
    assert!(!r.node.handle_fleet_reply(now, addr("203.0.113.21:2223"), b"junk"));
    let (_, why) = r.drain().expect("a timer");
    assert!(["sip transaction timer", "fleet"].contains(&why), "{why}");
}

#[test]
fn a_standby_relay_takes_over_when_ng_first_reaches_it() {
    let now = Instant::now();
    let mut active = Run::new();
    active.sip(TRUNK, &invite());
    let state = active.node.relay().and_then(|r| r.export("node-call", now, 1_700_000_000)).expect("state");

    let mut standby = Run::new();
    let relay = standby.node.relay_mut().expect("relay");
    relay.set_standby(true, now);
    relay.restore(now, 1_700_000_000, &state).expect("restored");
    standby.drain();
    assert!(standby.commands >= 2, "the mirrored call's ports are linked");
    assert!(standby.events.is_empty());

    standby.node.handle_ng(now, addr("127.0.0.1:9"), b"p1 d7:command4:pinge").expect("pong");
    standby.drain();
    assert_eq!(standby.events, vec![Event::TookOver { calls: 1 }]);
    assert!(!standby.node.relay().expect("relay").is_standby());
    standby.node.handle_ng(now, addr("127.0.0.1:9"), b"p2 d7:command4:pinge").expect("pong");
    standby.drain();
    assert_eq!(standby.events.len(), 1, "taken over once");
}

#[test]
fn a_callee_whose_agent_measured_a_nearer_relay_in_another_region_gets_its_leg_there() {
    let now = Instant::now();
    let mut nodes = Vec::new();
    let mut specs = Vec::new();
    for (n, region) in [(21, "eu"), (22, "us")] {
        let ip: std::net::IpAddr = format!("203.0.113.{n}").parse().expect("ip");
        let mut cfg = config();
        cfg.relay = Some(RelayConfig::single(ip, 40000, 40099));
        nodes.push((SocketAddr::new(ip, 2223), Arc::new(Mutex::new(Node::new(cfg, now, 1_700_000_000, 3)))));
        specs.push(pinhole_media::fleet::RelaySpec {
            ng: SocketAddr::new(ip, 2223),
            weight: 1,
            region: Some(region.into()),
            cidrs: vec![],
            stun: Some(SocketAddr::new(ip, 3478)),
        });
    }
    let mut r = Run::with(Node::new(NodeConfig { fleet: specs, ..config() }, now, 1_700_000_000, 9), now);
    r.relays = nodes.clone();
    // bob registers from the operator's network (so his REGISTER is vouched for) through
    // an agent that finds the us relay nearer.
    r.sip(CALLEE, &register_bob(1, "Pinhole-RTT: 203.0.113.21:3478=70, 203.0.113.22:3478=6\n"));
    let binding = r.node.proxy().registrar().lookup("bob@example.com", 1_700_000_000);
    assert_eq!(
        binding.first().and_then(|b| b.relay_rtts.as_deref()),
        Some("203.0.113.21:3478=70, 203.0.113.22:3478=6")
    );
    r.sent.clear();
    r.sip(TRUNK, &invite().replace(&format!("INVITE sip:bob@{CALLEE}"), "INVITE sip:bob@example.com"));
    let fwd = r.sent.iter().find(|t| t.flow.remote == addr(CALLEE)).expect("forwarded INVITE");
    let text = String::from_utf8_lossy(&fwd.payload);
    assert!(text.contains("c=IN IP4 203.0.113.22"), "bob's leg on the us relay:\n{text}");
    let calls = |i: usize| nodes[i].1.lock().expect("lock").relay().map(Relay::call_count);
    assert_eq!((calls(0), calls(1)), (Some(1), Some(1)), "the caller's leg on eu, chained to us");
}

#[test]
fn a_silent_fleet_relay_holds_up_only_its_own_call_never_another_phones_register() {
    let now = Instant::now();
    let spec = relay_at("203.0.113.21:2223");
    // No relay node behind the address: the ng datagrams go unanswered.
    let mut r = Run::with(Node::new(NodeConfig { fleet: vec![spec], ..config() }, now, 1_700_000_000, 9), now);
    r.sip(TRUNK, &invite());
    assert!(r.ng.iter().any(|(_, d)| d.windows(5).any(|w| w == b"offer")), "the offer went out as a datagram");
    assert_eq!(r.node.proxy().media_waiting(), 1, "the INVITE waits for the relay");
    assert!(r.sent.iter().all(|t| t.flow.remote != addr(CALLEE)), "not forwarded yet");

    // Meanwhile, in the same instant, another phone registers: answered at once.
    r.sent.clear();
    r.sip(CALLEE, &register_bob(9, ""));
    let ok = r.sent.iter().find(|t| t.flow.remote == addr(CALLEE)).expect("REGISTER answered in the same instant");
    assert!(ok.payload.starts_with(b"SIP/2.0 200"), "{}", String::from_utf8_lossy(&ok.payload));

    // The relay stays silent: asked twice, then the INVITE is answered 503 naming why.
    r.sent.clear();
    r.advance(pinhole_media::fleet::COMMAND_WAIT * pinhole_media::fleet::COMMAND_TRIES);
    let offers = r.ng.iter().filter(|(_, d)| d.windows(5).any(|w| w == b"offer")).count();
    assert_eq!(offers, pinhole_media::fleet::COMMAND_TRIES as usize);
    let refusal = r.sent.iter().find(|t| t.flow.remote == addr(TRUNK) && t.payload.starts_with(b"SIP/2.0 503"));
    let text = refusal.map(|t| String::from_utf8_lossy(&t.payload).into_owned()).unwrap_or_default();
    assert!(text.starts_with("SIP/2.0 503 No Media Relay Answering"), "{text}");
    assert_eq!(r.node.proxy().media_waiting(), 0);
    assert!(r.events.iter().any(|e| matches!(e, Event::FleetRelay { up: false, .. })), "the relay was taken out");
}
