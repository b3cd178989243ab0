//! Agents' connections to the forwarder, in virtual time: proof, binding, both directions,
//! reconnects, strangers and caps.

use super::*;
use crate::faketcp::{Conn, Outgoing, PSH, WINDOW};

const FWD: &str = "203.0.113.1:4443";
const KEY: &str = "leg-secret-0123456789abcdef";

fn a(s: &str) -> SocketAddrV4 {
    s.parse().expect("addr")
}

fn forwarder(limits: Limits) -> Forwarder {
    let mut f = Forwarder::new(a(FWD), limits, [99; 32], Instant::now());
    f.allow(30002, KEY.into());
    f
}

/// An agent's side of one connection.
struct Agent {
    addr: SocketAddrV4,
    conn: Conn,
}

impl Agent {
    /// Connects and completes the handshake.
    fn connect(f: &mut Forwarder, now: Instant, addr: &str) -> Agent {
        let mut ag = Agent { addr: a(addr), conn: Conn::connect(now, 1000) };
        ag.push(f, now);
        ag.take(f, now);
        ag.push(f, now); // the ACK
        assert_eq!(ag.conn.state(), State::Established);
        ag
    }

    fn segment(&self, o: &Outgoing) -> Vec<u8> {
        Segment {
            src: self.addr,
            dst: a(FWD),
            seq: o.seq,
            ack: o.ack,
            flags: o.flags,
            window: WINDOW,
            payload: &o.payload,
        }
        .ip_bytes(1)
    }

    fn push(&mut self, f: &mut Forwarder, now: Instant) {
        while let Some(o) = self.conn.poll_transmit() {
            let p = self.segment(&o);
            f.handle_segment(now, &Segment::parse(&p).expect("segment"));
        }
    }

    /// Takes the forwarder's segments for us; returns the datagrams they carried.
    fn take(&mut self, f: &mut Forwarder, now: Instant) -> Vec<Vec<u8>> {
        let mut data = Vec::new();
        let mut keep = Vec::new();
        while let Some(o) = f.poll_output() {
            match o {
                Output::Segment { from, to, tcp } if to == self.addr => {
                    let ip = crate::faketcp::ipv4(*from.ip(), *to.ip(), &tcp, 1);
                    let s = Segment::parse(&ip).expect("the forwarder's segment parses");
                    if self.conn.handle_segment(now, &s) == Received::Data {
                        data.push(s.payload.to_vec());
                    }
                }
                other => keep.push(other),
            }
        }
        f.out = keep.into();
        data
    }

    fn send(&mut self, f: &mut Forwarder, now: Instant, datagram: &[u8]) {
        assert!(self.conn.send(now, datagram));
        self.push(f, now);
    }
}

fn to_relay(f: &mut Forwarder) -> Vec<(u16, Vec<u8>)> {
    let mut got = Vec::new();
    let mut keep = Vec::new();
    while let Some(o) = f.poll_output() {
        match o {
            Output::ToRelay { port, datagram } => got.push((port, datagram)),
            other => keep.push(other),
        }
    }
    f.out = keep.into();
    got
}

const RTP: &[u8] = &[0x80, 0, 0, 1, 0, 0, 0, 160, 0, 0, 0, 9, 1, 2, 3];

#[test]
fn an_agent_that_proves_its_port_gets_its_media_relayed_both_ways() {
    let now = Instant::now();
    let mut f = forwarder(Limits::default());
    let mut ag = Agent::connect(&mut f, now, "198.51.100.2:40000");
    ag.send(&mut f, now, &proof(30002, KEY, [7; 12]).expect("proof"));
    let reply = ag.take(&mut f, now);
    assert_eq!(reply.len(), 1, "a signed answer");
    assert!(crate::stun::looks_like_stun(&reply[0]));
    assert!(f.carries(30002));
    ag.send(&mut f, now, RTP);
    assert_eq!(to_relay(&mut f), vec![(30002, RTP.to_vec())]);
    assert!(f.from_relay(now, 30002, b"\x80\x00\x00\x02from the far side"));
    assert_eq!(ag.take(&mut f, now), vec![b"\x80\x00\x00\x02from the far side".to_vec()]);
    assert!(!f.from_relay(now, 30004, RTP), "a port nobody carries stays on UDP");
}

#[test]
fn media_before_a_proof_or_with_a_wrong_one_goes_nowhere() {
    let now = Instant::now();
    let mut f = forwarder(Limits::default());
    let mut ag = Agent::connect(&mut f, now, "198.51.100.2:40000");
    ag.send(&mut f, now, RTP);
    ag.send(&mut f, now, &proof(30002, "not-the-key-0123456789", [1; 12]).expect("proof"));
    ag.send(&mut f, now, &proof(30004, KEY, [2; 12]).expect("proof for a port not allowed"));
    assert!(to_relay(&mut f).is_empty());
    assert!(!f.carries(30002) && !f.carries(30004));
    let drops: Vec<Discard> = std::iter::from_fn(|| f.poll_discard()).collect();
    assert_eq!(drops, vec![Discard::Unauthenticated; 3]);
    // And it is forgotten when its time to prove itself is up.
    f.handle_timeout(now + AUTH_WITHIN);
    assert_eq!(f.connections(), 0);
}

#[test]
fn a_reconnected_agent_takes_over_its_port_and_the_old_connection_goes() {
    let now = Instant::now();
    let mut f = forwarder(Limits::default());
    let mut old = Agent::connect(&mut f, now, "198.51.100.2:40000");
    old.send(&mut f, now, &proof(30002, KEY, [1; 12]).expect("proof"));
    let _ = old.take(&mut f, now);
    let mut new = Agent::connect(&mut f, now, "198.51.100.2:40001");
    new.send(&mut f, now, &proof(30002, KEY, [2; 12]).expect("proof"));
    let _ = new.take(&mut f, now);
    assert_eq!(f.connections(), 1);
    assert!(f.from_relay(now, 30002, RTP));
    assert_eq!(new.take(&mut f, now), vec![RTP.to_vec()]);
    // The call ends: the port is no longer carried.
    f.revoke(30002);
    assert!(!f.carries(30002) && f.connections() == 0);
}

#[test]
fn strangers_segments_are_dropped_and_connections_are_capped() {
    let now = Instant::now();
    let mut f = forwarder(Limits { max_connections: 3, max_per_source: 2 });
    let stray = Segment { src: a("192.0.2.9:5000"), dst: a(FWD), seq: 1, ack: 1, flags: ACK, window: 1, payload: b"x" };
    f.handle_segment(now, &stray);
    assert_eq!(f.poll_discard(), Some(Discard::Unknown));
    assert_eq!(f.poll_output(), None, "no answer to a stray segment");
    let syn = |addr: &str| Segment { src: a(addr), dst: a(FWD), seq: 5, ack: 0, flags: SYN, window: 1, payload: &[] };
    for addr in ["192.0.2.9:1", "192.0.2.9:2", "192.0.2.9:3", "192.0.2.10:1", "192.0.2.11:1"] {
        f.handle_segment(now, &syn(addr));
    }
    assert_eq!(f.connections(), 3, "two from one source, three in all");
    assert_eq!(std::iter::from_fn(|| f.poll_discard()).count(), 2);
    // Half-open ones (SYN-ACK never answered) go when their handshake gives up.
    let mut t = now;
    while let Some(next) = f.poll_timeout() {
        t = next;
        f.handle_timeout(t);
        while f.poll_output().is_some() {}
    }
    assert_eq!(f.connections(), 0);
    assert!(t - now <= AUTH_WITHIN);
}

#[test]
fn a_probe_gets_its_datagrams_echoed_up_to_a_limit_and_never_reaches_the_relay() {
    let now = Instant::now();
    let mut f = Forwarder::new(a("0.0.0.0:4443"), Limits::default(), [99; 32], Instant::now());
    let mut ag = Agent::connect(&mut f, now, "198.51.100.2:40000");
    ag.send(&mut f, now, &proof(0, PROBE_KEY, [3; 12]).expect("proof"));
    assert_eq!(ag.take(&mut f, now).len(), 1, "the answer to the proof");
    for k in 0..(PROBE_ECHOES + 5) {
        ag.send(&mut f, now, &k.to_be_bytes());
    }
    let echoed = ag.take(&mut f, now);
    assert_eq!(echoed.len() as u32, PROBE_ECHOES);
    assert_eq!(echoed[7], 7u32.to_be_bytes().to_vec());
    assert!(to_relay(&mut f).is_empty() && !f.carries(0));
}

#[test]
fn keys_can_come_from_the_owner_per_port() {
    let now = Instant::now();
    let mut f = Forwarder::new(a(FWD), Limits::default(), [99; 32], Instant::now());
    f.set_lookup(Box::new(|port| (port == 30010).then(|| "looked-up-key-0123456789".to_owned())));
    let mut ag = Agent::connect(&mut f, now, "198.51.100.2:40000");
    ag.send(&mut f, now, &proof(30010, "looked-up-key-0123456789", [4; 12]).expect("proof"));
    assert_eq!(ag.take(&mut f, now).len(), 1);
    assert_eq!(f.carried().collect::<Vec<_>>(), vec![30010]);
    let mut other = Agent::connect(&mut f, now, "198.51.100.2:40001");
    other.send(&mut f, now, &proof(30012, "looked-up-key-0123456789", [5; 12]).expect("proof"));
    assert!(other.take(&mut f, now).is_empty(), "no key for a port not in a call");
}

/// The forwarder's SYN-ACK to a SYN from `from`: its ISN.
fn syn_ack_isn(f: &mut Forwarder, now: Instant, from: &str) -> u32 {
    let syn = Segment { src: a(from), dst: a(FWD), seq: 1000, ack: 0, flags: SYN, window: WINDOW, payload: &[] };
    f.handle_segment(now, &syn);
    let mut isn = None;
    let mut keep = Vec::new();
    while let Some(o) = f.poll_output() {
        match o {
            Output::Segment { to, tcp, .. } if to == a(from) => {
                let ip = crate::faketcp::ipv4(*a(FWD).ip(), *a(from).ip(), &tcp, 1);
                isn = Segment::parse(&ip).ok().map(|s| s.seq);
            }
            other => keep.push(other),
        }
    }
    f.out = keep.into();
    isn.expect("a SYN-ACK")
}

#[test]
fn one_observed_syn_ack_predicts_no_other_and_a_blind_handshake_from_a_spoofed_address_echoes_nothing() {
    let now = Instant::now();
    let mut f = forwarder(Limits::default());
    // The attacker opens a connection of its own and sees the ISN.
    let seen = syn_ack_isn(&mut f, now, "198.51.100.66:40000");
    // What the old linear generator would have given next, and nearby guesses.
    let lcg = seen.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
    let victim = "192.0.2.77:40000";
    let real = syn_ack_isn(&mut f, now, victim);
    assert_ne!(real, lcg);
    assert!(real.wrapping_sub(seen) > 1 << 20 && seen.wrapping_sub(real) > 1 << 20, "not close to the one seen");
    // The blind handshake: the ACK and the probe's proof, spoofed from the victim, with
    // the guessed ISN. Nothing is established, nothing is echoed towards the victim.
    let blind = |ack: u32, payload: &[u8]| {
        Segment { src: a(victim), dst: a(FWD), seq: 1001, ack, flags: PSH | ACK, window: WINDOW, payload }.ip_bytes(1)
    };
    let probe = proof(0, PROBE_KEY, [3; 12]).expect("proof");
    for guess in [lcg, lcg.wrapping_add(1), seen.wrapping_add(1), seen.wrapping_add(64_001)] {
        let p = blind(guess.wrapping_add(1), &probe);
        f.handle_segment(now, &Segment::parse(&p).expect("segment"));
    }
    let towards_victim = std::iter::from_fn(|| f.poll_output())
        .filter(|o| matches!(o, Output::Segment { to, .. } if *to == a(victim)))
        .count();
    assert_eq!(towards_victim, 0, "no echo, no answer to the spoofed address");
    // The control: the right ISN would have got the echo (so the test can fail).
    let p = blind(real.wrapping_add(1), &probe);
    f.handle_segment(now, &Segment::parse(&p).expect("segment"));
    assert!(std::iter::from_fn(|| f.poll_output()).any(|o| matches!(o, Output::Segment { to, .. } if to == a(victim))));
    // And the same 4-tuple from another forwarder (another secret) gets another ISN.
    let mut other = Forwarder::new(a(FWD), Limits::default(), [98; 32], now);
    assert_ne!(syn_ack_isn(&mut other, now, victim), real);
}
