//! Two agents' tunnels, each behind a modelled NAT, against the real forwarder core and a
//! relay that passes datagrams between the call's two ports, in memory and virtual time.

use std::collections::HashMap;

use super::*;
use crate::faketcp::client::{Phase, Tunnel};
use crate::faketcp::forwarder::{Forwarder, Limits, Output};
use crate::faketcp::ipv4;

const FWD: &str = "203.0.113.1:4443";
const PORTS: [u16; 2] = [30002, 30004];
const KEYS: [&str; 2] = ["alice-leg-key-0123456789", "bob-leg-key-9876543210ab"];
const PRIVATE: [&str; 2] = ["198.51.100.10", "198.51.100.138"];
const PUBLIC: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

fn a(s: &str) -> SocketAddrV4 {
    s.parse().expect("addr")
}

/// A NAT with conntrack's rule for TCP: a flow's mapping is made by its first outbound
/// segment, and an inbound segment gets in only on a mapping made towards its source
/// (anything else is dropped, as the lab boxes' `ct state new drop` does).
struct Nat {
    public: std::net::Ipv4Addr,
    /// Keep the private port (Linux `masquerade`), or pick a new one per flow (`random`).
    keeps_ports: bool,
    /// (private, remote) -> public port, and back.
    out: HashMap<(SocketAddrV4, SocketAddrV4), u16>,
    back: HashMap<(u16, SocketAddrV4), SocketAddrV4>,
    next: u16,
    /// Drops every segment between the two agents' public addresses (a cut path).
    cut: bool,
}

impl Nat {
    fn new(public: &str, keeps_ports: bool) -> Nat {
        Nat {
            public: public.parse().expect("ip"),
            keeps_ports,
            out: HashMap::new(),
            back: HashMap::new(),
            next: 50_000,
            cut: false,
        }
    }

    fn outbound(&mut self, from: SocketAddrV4, to: SocketAddrV4) -> Option<SocketAddrV4> {
        if self.cut && to != a(FWD) {
            return None;
        }
        let port = match self.out.get(&(from, to)) {
            Some(p) => *p,
            None => {
                let p = if self.keeps_ports {
                    from.port()
                } else {
                    self.next += 7;
                    self.next
                };
                self.out.insert((from, to), p);
                self.back.insert((p, to), from);
                p
            }
        };
        Some(SocketAddrV4::new(self.public, port))
    }

    fn inbound(&self, from: SocketAddrV4, to: SocketAddrV4) -> Option<SocketAddrV4> {
        if self.cut && from != a(FWD) {
            return None;
        }
        self.back.get(&(to.port(), from)).copied()
    }
}

struct Lab {
    now: Instant,
    t: [Tunnel; 2],
    nat: [Nat; 2],
    f: Forwarder,
    /// What each phone got, and what crossed the relay from each side.
    got: [Vec<Vec<u8>>; 2],
    relayed: [usize; 2],
    introduced: usize,
}

impl Lab {
    fn new(keep_ports: [bool; 2]) -> Lab {
        let now = Instant::now();
        let mut f = Forwarder::new(a(FWD), Limits::default(), [11; 32], Instant::now());
        f.allow(PORTS[0], KEYS[0].into());
        f.allow(PORTS[1], KEYS[1].into());
        let tunnel = |i: usize| {
            let local = SocketAddrV4::new(PRIVATE[i].parse().expect("ip"), 0);
            Tunnel::new(now, local, (41000, 41009), a(FWD), PORTS[i], KEYS[i].into(), 5 + i as u64)
        };
        Lab {
            now,
            t: [tunnel(0), tunnel(1)],
            nat: [Nat::new(PUBLIC[0], keep_ports[0]), Nat::new(PUBLIC[1], keep_ports[1])],
            f,
            got: [Vec::new(), Vec::new()],
            relayed: [0, 0],
            introduced: 0,
        }
    }

    /// Which agent's NAT owns public address `ip`.
    fn side_of(ip: std::net::Ipv4Addr) -> Option<usize> {
        PUBLIC.iter().position(|p| p.parse::<std::net::Ipv4Addr>().ok() == Some(ip))
    }

    fn deliver_to_agent(&mut self, i: usize, from: SocketAddrV4, to: SocketAddrV4, tcp: &[u8]) {
        let Some(private) = self.nat[i].inbound(from, to) else { return };
        let p = ipv4(*from.ip(), *to.ip(), tcp, 1);
        let s = Segment::parse(&p).expect("segment");
        // The NAT rewrites the destination (a real one fixes the checksum too).
        let s = Segment { dst: private, ..s };
        if let Some(d) = self.t[i].handle_segment(self.now, &s) {
            self.got[i].push(d.to_vec());
        }
    }

    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..2 {
                while let Some((to, tcp)) = self.t[i].poll_transmit() {
                    moved = true;
                    let local = self.t[i].local();
                    let Some(public) = self.nat[i].outbound(local, to) else { continue };
                    // The NAT rewrites the source, and the checksum with it.
                    let p = ipv4(*local.ip(), *to.ip(), &tcp, 1);
                    let s = Segment { src: public, ..Segment::parse(&p).expect("segment") };
                    if to == a(FWD) {
                        self.f.handle_segment(self.now, &s);
                    } else if let Some(j) = Lab::side_of(*to.ip()) {
                        let tcp = s.tcp_bytes();
                        self.deliver_to_agent(j, public, to, &tcp);
                    }
                }
            }
            while let Some(o) = self.f.poll_output() {
                moved = true;
                match o {
                    Output::Segment { from, to, tcp } => {
                        if let Some(j) = Lab::side_of(*to.ip()) {
                            self.deliver_to_agent(j, from, to, &tcp);
                        }
                    }
                    // The relay passes each leg's datagrams to the other's.
                    Output::ToRelay { port, datagram } => {
                        let from = PORTS.iter().position(|p| *p == port).expect("a leg");
                        if !crate::stun::looks_like_stun(&datagram) {
                            self.relayed[from] += 1;
                        }
                        self.f.from_relay(self.now, PORTS[1 - from], &datagram);
                    }
                    Output::Bound { port } => {
                        let other = if port == PORTS[0] { PORTS[1] } else { PORTS[0] };
                        if self.f.carries(other) && self.f.introduce(self.now, port, other) {
                            self.introduced += 1;
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        loop {
            let next =
                [self.t[0].poll_timeout(), self.t[1].poll_timeout(), self.f.poll_timeout()].into_iter().flatten().min();
            let Some(t) = next.filter(|t| *t <= until) else { break };
            self.now = t.max(self.now);
            for tunnel in &mut self.t {
                tunnel.handle_timeout(self.now);
            }
            self.f.handle_timeout(self.now);
            self.settle();
        }
        self.now = until;
    }

    /// A call's worth of RTP: each phone sends every 20 ms for `by`.
    fn talk(&mut self, by: Duration) {
        let until = self.now + by;
        while self.now < until {
            for i in 0..2 {
                let rtp = [0x80, 0, 0, i as u8, 0, 0, 0, 160, 0, 0, 0, 9, 1, 2, 3];
                self.t[i].send(self.now, &rtp);
            }
            self.settle();
            self.advance(Duration::from_millis(20));
        }
    }
}

#[test]
fn two_agents_behind_port_keeping_nats_move_their_media_to_a_checked_direct_path() {
    let mut lab = Lab::new([true, true]);
    lab.settle();
    assert_eq!((lab.t[0].phase(), lab.t[1].phase()), (Phase::Up, Phase::Up));
    assert_eq!(lab.introduced, 1, "introduced once both legs were carried");
    assert_eq!(lab.t[0].direct(), Some(DirectPhase::Waiting));
    lab.talk(Duration::from_millis(600));
    assert_eq!((lab.t[0].direct(), lab.t[1].direct()), (Some(DirectPhase::Up), Some(DirectPhase::Up)));
    // Until then the forwarder carried the call; from now on, the direct path alone.
    let (relayed, heard) = (lab.relayed, [lab.got[0].len(), lab.got[1].len()]);
    assert!(relayed.iter().all(|r| *r > 0), "media went through the forwarder first: {relayed:?}");
    lab.talk(Duration::from_secs(3));
    assert_eq!(lab.relayed, relayed, "no media through the forwarder once direct");
    for (i, got) in lab.got.iter().enumerate() {
        assert!(got.len() >= heard[i] + 145, "phone {i} heard the other all along");
        assert_eq!(got.last().map(|d| d[3]), Some(1 - i as u8), "from the other phone");
    }
}

#[test]
fn a_nat_that_changes_ports_defeats_the_direct_path_and_the_forwarder_carries_on() {
    let mut lab = Lab::new([true, false]);
    lab.talk(Duration::from_secs(6));
    assert_eq!((lab.t[0].direct(), lab.t[1].direct()), (Some(DirectPhase::Failed), Some(DirectPhase::Failed)));
    let before = lab.relayed;
    let heard = [lab.got[0].len(), lab.got[1].len()];
    lab.talk(Duration::from_secs(1));
    for i in 0..2 {
        assert!(lab.relayed[i] >= before[i] + 48, "side {i} still relayed");
        assert!(lab.got[i].len() >= heard[i] + 48, "phone {i} still hears");
    }
}

#[test]
fn a_direct_path_that_goes_quiet_hands_media_back_to_the_forwarder() {
    let mut lab = Lab::new([true, true]);
    lab.talk(Duration::from_secs(1));
    assert_eq!(lab.t[0].direct(), Some(DirectPhase::Up));
    lab.nat[0].cut = true;
    lab.talk(Duration::from_millis(4100));
    assert_eq!((lab.t[0].direct(), lab.t[1].direct()), (Some(DirectPhase::Failed), Some(DirectPhase::Failed)));
    let heard = [lab.got[0].len(), lab.got[1].len()];
    lab.talk(Duration::from_secs(1));
    for (i, got) in lab.got.iter().enumerate() {
        assert!(got.len() >= heard[i] + 48, "phone {i} hears again, through the forwarder");
    }
}

#[test]
fn an_introduction_signed_with_another_key_is_not_one() {
    let intro = Introduction { peer: a("192.0.2.2:41000"), isn: 1, peer_isn: 2, delay: START_DELAY, key: "k".into() };
    let bytes = intro.encode(KEYS[0], [7; 12]).expect("encodes");
    assert_eq!(Introduction::decode(&bytes, KEYS[0]), Some(intro));
    assert_eq!(Introduction::decode(&bytes, KEYS[1]), None);
    let mut tampered = bytes.clone();
    tampered[30] ^= 1;
    assert_eq!(Introduction::decode(&tampered, KEYS[0]), None);
}

#[test]
fn the_check_key_is_the_same_for_both_ends_and_changes_with_every_input() {
    let k = Introduction::check_key("a", "b", 1, 2);
    assert_eq!(k.len(), 32);
    assert_ne!(k, Introduction::check_key("a", "c", 1, 2));
    assert_ne!(k, Introduction::check_key("a", "b", 1, 3));
    assert_ne!(Introduction::check_key("ab", "", 1, 2), Introduction::check_key("a", "b", 1, 2));
}
