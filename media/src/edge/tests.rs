//! Two agents' media engines on an open network with a modelled server (STUN and a
//! latching relay), in virtual time: what a phone's packet becomes before and after the
//! direct path, and what strangers get.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::latch::{Expected, LatchMode};
use crate::punch::scheduler::Credentials;
use crate::punch::Strategy;
use crate::relay::{PortSpec, RelayPort, Side};

const STUN: &str = "203.0.113.1:3478";
const RELAY: [&str; 2] = ["203.0.113.1:30000", "203.0.113.1:30002"];
const AGENT: [&str; 2] = ["203.0.113.2", "203.0.113.3"];
const PHONE: [&str; 2] = ["198.51.100.10:4000", "198.51.100.138:4000"];
const PHONE_PORT: u16 = 31000;
const WINDOW: u16 = 31002;
const RTP: &[u8] = &[0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7];

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn spec(ip: &str, port: u16, expected: &str) -> PortSpec {
    PortSpec {
        iface: 0,
        bind: ip.parse().expect("ip"),
        port: RelayPort(port),
        expected: Expected { sdp: Some(addr(expected)), signalling_ip: None },
        mode: LatchMode::default(),
        stats: Arc::default(),
        latched: None,
    }
}

fn plan(side: Side, start: Instant) -> PunchPlan {
    let (us, them) = if side == Side::A { ("aaaa", "bbbb") } else { ("bbbb", "aaaa") };
    PunchPlan {
        strategy: Strategy::SimultaneousOpen,
        side,
        // Stale windows from registration: gathering replaces them.
        windows: [addr("203.0.113.2:9"), addr("203.0.113.3:9")],
        credentials: Credentials {
            local_ufrag: us.into(),
            local_pwd: format!("{us}-password-0123456789"),
            remote_ufrag: them.into(),
            remote_pwd: format!("{them}-password-0123456789"),
        },
        start,
    }
}

struct Net {
    edges: [EdgeMedia; 2],
    now: Instant,
    wire: BTreeMap<(Instant, u64), (SocketAddr, SocketAddr, Vec<u8>)>,
    seq: u64,
    /// What each phone received: (from, bytes).
    phones: [Vec<(SocketAddr, Vec<u8>)>; 2],
}

impl Net {
    fn new() -> Net {
        let t0 = Instant::now();
        let edge = |i: usize| {
            let mut e = EdgeMedia::new(31000, 31099, addr(STUN), t0);
            e.apply(
                t0,
                Command::Link {
                    shard: 1,
                    a: spec(AGENT[i], PHONE_PORT, PHONE[i]),
                    b: spec(AGENT[i], WINDOW, RELAY[i]),
                },
            );
            e
        };
        Net { edges: [edge(0), edge(1)], now: t0, wire: BTreeMap::new(), seq: 0, phones: [Vec::new(), Vec::new()] }
    }

    fn put(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        self.seq += 1;
        self.wire.insert((self.now + Duration::from_millis(5), self.seq), (from, to, bytes));
    }

    fn source(i: usize, s: Socket) -> SocketAddr {
        let Socket::Port(p) = s else { panic!("no extra sockets in a simultaneous open") };
        SocketAddr::new(AGENT[i].parse::<IpAddr>().expect("ip"), p)
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        if to == addr(STUN) {
            if let Some(r) = crate::stun::binding_response(&bytes, from) {
                self.put(to, from, r);
            }
        } else if let Some(leg) = RELAY.iter().position(|r| addr(r) == to) {
            let dst = SocketAddr::new(AGENT[1 - leg].parse::<IpAddr>().expect("ip"), WINDOW);
            self.put(addr(RELAY[1 - leg]), dst, bytes);
        } else if let Some(p) = PHONE.iter().position(|p| addr(p) == to) {
            self.phones[p].push((from, bytes));
        } else if let Some(i) = AGENT.iter().position(|a| a.parse::<IpAddr>().ok() == Some(to.ip())) {
            let now = self.now;
            for (s, dst) in self.edges[i].on_packet(now, Socket::Port(to.port()), from, &bytes).iter() {
                self.put(Net::source(i, s), dst, bytes.clone());
            }
        }
    }

    /// A phone sends one packet to its agent; returns where the agent sent it.
    fn phone_sends(&mut self, i: usize) -> Sends {
        let now = self.now;
        let out = self.edges[i].on_packet(now, Socket::Port(PHONE_PORT), addr(PHONE[i]), RTP);
        for (s, dst) in out.iter() {
            self.put(Net::source(i, s), dst, RTP.to_vec());
        }
        out
    }

    fn run(&mut self, for_: Duration) {
        let until = self.now + for_;
        let mut next_frame = self.now;
        while self.now < until {
            for i in 0..2 {
                while let Some((s, to, bytes)) = self.edges[i].poll_transmit() {
                    self.put(Net::source(i, s), to, bytes);
                }
            }
            let timers = self.edges.iter().filter_map(EdgeMedia::poll_timeout).min();
            let wire = self.wire.keys().next().map(|k| k.0);
            self.now =
                [timers, wire, Some(next_frame), Some(until)].into_iter().flatten().min().expect("due").max(self.now);
            while let Some(((at, _), _)) = self.wire.first_key_value() {
                if *at > self.now {
                    break;
                }
                let Some((_, (from, to, bytes))) = self.wire.pop_first() else { break };
                self.deliver(from, to, bytes);
            }
            if self.now >= next_frame {
                self.phone_sends(0);
                self.phone_sends(1);
                next_frame += Duration::from_millis(20);
            }
            for e in &mut self.edges {
                e.handle_timeout(self.now);
            }
        }
    }
}

#[test]
fn a_phones_media_goes_to_the_relay_until_the_direct_path_is_proven_and_then_straight_to_the_peer() {
    let mut net = Net::new();
    let start = net.now + Duration::from_millis(200);
    assert!(net.edges[0].punch(start, "call-1", WINDOW, plan(Side::A, start), 1));
    assert!(net.edges[1].punch(start, "call-1", WINDOW, plan(Side::B, start), 2));
    assert_eq!(net.phone_sends(0), Sends([Some((Socket::Port(WINDOW), addr(RELAY[0]))), None]));
    net.run(Duration::from_millis(100));
    // Relayed media reaches the far phone from its agent's phone port.
    let from_agent = SocketAddr::new(AGENT[1].parse::<IpAddr>().expect("ip"), PHONE_PORT);
    assert!(net.phones[1].iter().any(|(f, b)| *f == from_agent && b == RTP), "relayed media arrived");
    net.run(Duration::from_secs(1));
    let b_window = SocketAddr::new(AGENT[1].parse::<IpAddr>().expect("ip"), WINDOW);
    assert_eq!(net.phone_sends(0), Sends([Some((Socket::Port(WINDOW), b_window)), None]), "direct now");
    let events: Vec<EdgeEvent> = std::iter::from_fn(|| net.edges[0].poll_event()).collect();
    assert!(events.iter().any(|e| e.call_id == "call-1"
        && e.method == "simultaneous-open"
        && matches!(e.event, PathEvent::Direct { .. })));
    assert_eq!(net.edges[1].paths().next(), Some(("call-1", "simultaneous-open", Phase::Direct)));
    // Direct media is handed to the phone like relayed media: from the agent's phone port.
    let before = net.phones[1].len();
    net.run(Duration::from_millis(100));
    assert!(net.phones[1][before..].iter().all(|(f, _)| *f == from_agent));
    assert!(net.phones[1].len() - before >= 4);
    // The phones never see a check or an announcement.
    assert!(net.phones.iter().flatten().all(|(_, b)| !crate::stun::looks_like_stun(b)));
}

#[test]
fn strangers_on_the_window_reach_no_phone_and_a_second_plan_for_the_call_is_ignored() {
    let mut net = Net::new();
    let start = net.now + Duration::from_millis(200);
    assert!(net.edges[0].punch(start, "call-1", WINDOW, plan(Side::A, start), 1));
    assert!(!net.edges[0].punch(start, "call-1", WINDOW, plan(Side::A, start), 1), "a retransmitted 2xx's plan");
    assert!(!net.edges[0].punch(start, "call-2", 31050, plan(Side::A, start), 1), "no such window");
    let now = net.now;
    let stranger = addr("192.0.2.66:5000");
    net.phone_sends(0); // the relay leg exists
                        // Wait out the latch's learning window: after it, only the relay is media here.
    let later = now + Duration::from_secs(10);
    assert_eq!(
        net.edges[0].on_packet(later, Socket::Port(WINDOW), addr(RELAY[0]), RTP).first().map(|f| f.1),
        Some(addr(PHONE[0]))
    );
    assert_eq!(net.edges[0].on_packet(later, Socket::Port(WINDOW), stranger, RTP), Sends::NONE);
    // An unsigned Binding request: header only.
    let mut bogus_check = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    bogus_check.extend([7u8; 12]);
    assert_eq!(net.edges[0].on_packet(later, Socket::Port(WINDOW), stranger, &bogus_check), Sends::NONE);
    assert_eq!(net.edges[0].poll_transmit(), None, "an unsigned check is not answered");
}

#[test]
fn unlinking_a_call_ends_its_path() {
    let mut net = Net::new();
    let start = net.now + Duration::from_millis(200);
    assert!(net.edges[0].punch(start, "call-1", WINDOW, plan(Side::A, start), 1));
    let now = net.now;
    net.edges[0].apply(now, Command::Unlink { shard: 1, ports: vec![RelayPort(PHONE_PORT), RelayPort(WINDOW)] });
    assert_eq!(net.edges[0].paths().count(), 0);
    assert_eq!(net.edges[0].poll_timeout(), None);
    assert_eq!(net.edges[0].on_packet(now, Socket::Port(PHONE_PORT), addr(PHONE[0]), RTP), Sends::NONE);
}

mod fake_tcp {
    //! A leg over fake TCP: the engine's tunnel against the forwarder core, in memory.

    use super::*;
    use crate::faketcp::forwarder::{Forwarder, Limits, Output};
    use crate::faketcp::{ipv4, Segment};

    const FWD: &str = "203.0.113.1:4443";
    const KEY: &str = "leg-key-0123456789abcdef";
    const LAN: &str = "198.51.100.10";

    fn engine(now: Instant) -> EdgeMedia {
        let mut e = EdgeMedia::new(31000, 31099, addr(STUN), now);
        e.apply(now, Command::Link { shard: 1, a: spec(LAN, PHONE_PORT, PHONE[0]), b: spec(LAN, WINDOW, RELAY[0]) });
        // And the RTCP ports above them.
        e.apply(
            now,
            Command::Link {
                shard: 1,
                a: spec(LAN, PHONE_PORT + 1, "198.51.100.10:4001"),
                b: spec(LAN, WINDOW + 1, "203.0.113.1:30001"),
            },
        );
        e
    }

    fn spec_for_forwarder() -> TunnelSpec {
        TunnelSpec { local_ip: LAN.parse().expect("ip"), server: FWD.parse().expect("fwd"), key: KEY.into() }
    }

    fn forwarder() -> Forwarder {
        let mut f = Forwarder::new(FWD.parse().expect("fwd"), Limits::default(), [7; 32], Instant::now());
        f.allow(30000, KEY.into());
        f
    }

    /// Moves segments between the engine and the forwarder until quiet; returns what the
    /// phone got and what reached the relay.
    fn settle(now: Instant, e: &mut EdgeMedia, f: &mut Forwarder) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut phone, mut relay) = (Vec::new(), Vec::new());
        loop {
            let mut moved = false;
            while let Some((from, to, bytes)) = e.poll_transmit() {
                let (Socket::Tcp { .. }, SocketAddr::V4(to)) = (from, to) else { continue };
                let p = ipv4(LAN.parse().expect("ip"), *to.ip(), &bytes, 1);
                f.handle_segment(now, &Segment::parse(&p).expect("segment"));
                moved = true;
            }
            while let Some(o) = f.poll_output() {
                moved = true;
                match o {
                    Output::Segment { from, to, tcp } => {
                        let p = ipv4(*from.ip(), *to.ip(), &tcp, 1);
                        let s = Segment::parse(&p).expect("segment");
                        if e.on_segment(now, &s).first().is_some() {
                            phone.push(s.payload.to_vec());
                        }
                    }
                    Output::ToRelay { datagram, .. } => relay.push(datagram),
                    Output::Bound { .. } => {}
                }
            }
            if !moved {
                return (phone, relay);
            }
        }
    }

    #[test]
    fn a_leg_whose_relay_stays_silent_moves_to_fake_tcp_and_carries_media_both_ways() {
        let t0 = Instant::now();
        let (mut e, mut f) = (engine(t0), forwarder());
        assert!(e.standby(t0, WINDOW, spec_for_forwarder()));
        // The phone talks; nothing comes back from the relay.
        let sent = e.on_packet(t0, Socket::Port(PHONE_PORT), addr(PHONE[0]), RTP);
        assert_eq!(sent.first().map(|s| s.1), Some(addr(RELAY[0])), "UDP first");
        assert_eq!(e.poll_timeout(), Some(t0 + RELAY_SILENCE));
        let later = t0 + RELAY_SILENCE;
        e.handle_timeout(later);
        settle(later, &mut e, &mut f);
        assert!(e.tunnelled(WINDOW));
        assert_eq!(e.on_packet(later, Socket::Port(PHONE_PORT), addr(PHONE[0]), RTP), Sends::NONE, "over the tunnel");
        let (_, relay) = settle(later, &mut e, &mut f);
        assert_eq!(relay, vec![RTP.to_vec()]);
        assert!(f.from_relay(later, 30000, b"\x80far side"));
        let (phone, _) = settle(later, &mut e, &mut f);
        assert_eq!(phone, vec![b"\x80far side".to_vec()]);
        // RTCP rides the same tunnel both ways, to and from the phone's RTCP port.
        let rtcp = [0x81, 200, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(e.on_packet(later, Socket::Port(PHONE_PORT + 1), addr("198.51.100.10:4001"), &rtcp), Sends::NONE);
        let (_, relay) = settle(later, &mut e, &mut f);
        assert_eq!(relay, vec![rtcp.to_vec()]);
        assert!(f.from_relay(later, 30000, &rtcp));
        let mut to_phone = Vec::new();
        while let Some(o) = f.poll_output() {
            if let Output::Segment { from, to, tcp } = o {
                let p = ipv4(*from.ip(), *to.ip(), &tcp, 1);
                to_phone.extend(e.on_segment(later, &Segment::parse(&p).expect("segment")).first());
            }
        }
        assert_eq!(to_phone, vec![(Socket::Port(PHONE_PORT + 1), addr("198.51.100.10:4001"))]);
        let tunnel: Vec<TunnelEvent> = std::iter::from_fn(|| e.poll_tunnel_event()).collect();
        assert_eq!(tunnel.last().map(|t| (t.window, t.phase)), Some((WINDOW, TunnelPhase::Up)));
    }

    #[test]
    fn a_leg_whose_relay_answers_stays_on_udp() {
        let t0 = Instant::now();
        let mut e = engine(t0);
        assert!(e.standby(t0, WINDOW, spec_for_forwarder()));
        let back = e.on_packet(t0, Socket::Port(WINDOW), addr(RELAY[0]), RTP);
        assert_eq!(back.first().map(|s| s.1), Some(addr(PHONE[0])));
        e.handle_timeout(t0 + RELAY_SILENCE);
        assert!(!e.tunnelled(WINDOW));
        assert!(std::iter::from_fn(|| e.poll_transmit()).all(|(s, _, _)| !matches!(s, Socket::Tcp { .. })));
        assert_eq!(e.poll_timeout(), None);
    }
}

#[test]
fn with_a_mapping_gateway_each_punched_window_gets_a_port_of_its_own_and_gives_it_back() {
    let t0 = Instant::now();
    let mut e = Net::new().edges.into_iter().next().expect("an edge");
    let gw = std::net::Ipv4Addr::new(198, 51, 100, 1);
    e.set_portmap(gw, std::net::Ipv4Addr::new(198, 51, 100, 10));
    assert!(e.punch(t0, "call-1", WINDOW, plan(Side::A, t0 + Duration::from_millis(200)), 1));
    let sent: Vec<(Socket, SocketAddr, Vec<u8>)> = std::iter::from_fn(|| e.poll_transmit()).collect();
    let (_, _, req) = sent
        .iter()
        .find(|(s, to, _)| *s == Socket::Port(WINDOW) && *to == SocketAddr::new(gw.into(), 5351))
        .expect("a PCP request from the window to the gateway")
        .clone();
    assert_eq!((req[0], req[1], u16::from_be_bytes([req[40], req[41]])), (2, 1, WINDOW), "PCP MAP of the window");
    // The gateway maps it at 45000: the window's public address, no STUN asked for it.
    let mut answer = req[..60].to_vec();
    answer[1] = 0x81;
    answer[4..8].copy_from_slice(&3600u32.to_be_bytes());
    answer[24 + 18..24 + 20].copy_from_slice(&45_000u16.to_be_bytes());
    answer[24 + 32..24 + 36].copy_from_slice(&[203, 0, 113, 2]);
    assert_eq!(e.on_packet(t0, Socket::Port(WINDOW), SocketAddr::new(gw.into(), 5351), &answer), Sends::NONE);
    let mut now = t0;
    let mut to_stun = 0;
    while now < t0 + Duration::from_millis(400) {
        now += Duration::from_millis(10);
        e.handle_timeout(now);
        to_stun += std::iter::from_fn(|| e.poll_transmit()).filter(|(_, to, _)| *to == addr(STUN)).count();
    }
    assert_eq!(to_stun, 0, "the mapped window is not gathered");
    // The call's end deletes the mapping.
    e.apply(now, Command::Unlink { shard: 1, ports: vec![RelayPort(PHONE_PORT), RelayPort(WINDOW)] });
    let delete = std::iter::from_fn(|| e.poll_transmit())
        .find(|(s, to, _)| *s == Socket::Port(WINDOW) && to.port() == 5351)
        .expect("a delete");
    assert_eq!(&delete.2[4..8], &0u32.to_be_bytes(), "lifetime 0");
}
