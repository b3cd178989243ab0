//! The probe against simulated NATs of every behaviour, with the real STUN server logic,
//! in virtual time. Addresses are values only (RFC 5737 ranges); nothing is sent.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::stun::{StunServer, StunServerConfig};

#[derive(Clone, Copy)]
enum Alloc {
    Preserve,
    Sequential(u16),
    Random,
}

struct SimNat {
    mapping: Behaviour,
    filtering: Behaviour,
    alloc: Alloc,
    public: IpAddr,
    /// (local, destination key) → public port.
    table: HashMap<(SocketAddr, Option<IpAddr>, Option<u16>), u16>,
    /// public port → (local, destinations sent to).
    sent: HashMap<u16, (SocketAddr, Vec<SocketAddr>)>,
    next: u16,
    rng: u64,
    /// Drop every n-th packet in each direction (0: none).
    lose_every: usize,
    count: usize,
    /// Loop packets sent to our own public address back inside.
    hairpin: bool,
}

impl SimNat {
    fn new(mapping: Behaviour, filtering: Behaviour, alloc: Alloc) -> SimNat {
        SimNat {
            mapping,
            filtering,
            alloc,
            public: "198.51.100.1".parse().expect("ip"),
            table: HashMap::new(),
            sent: HashMap::new(),
            next: 40000,
            rng: 7,
            lose_every: 0,
            count: 0,
            hairpin: false,
        }
    }

    fn lost(&mut self) -> bool {
        self.count += 1;
        self.lose_every != 0 && self.count.is_multiple_of(self.lose_every)
    }

    fn outbound(&mut self, local: SocketAddr, dst: SocketAddr) -> SocketAddr {
        let key = match self.mapping {
            Behaviour::EndpointIndependent => (local, None, None),
            Behaviour::AddressDependent => (local, Some(dst.ip()), None),
            Behaviour::AddressAndPortDependent => (local, Some(dst.ip()), Some(dst.port())),
        };
        let port = match self.table.get(&key) {
            Some(p) => *p,
            None => {
                let p = match self.alloc {
                    Alloc::Preserve => local.port(),
                    Alloc::Sequential(d) => {
                        self.next += d;
                        self.next
                    }
                    Alloc::Random => {
                        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                        20000 + (self.rng >> 33) as u16 % 40000
                    }
                };
                self.table.insert(key, p);
                p
            }
        };
        self.sent.entry(port).or_insert((local, Vec::new())).1.push(dst);
        SocketAddr::new(self.public, port)
    }

    fn inbound(&self, to_port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let (local, dsts) = self.sent.get(&to_port)?;
        let ok = match self.filtering {
            Behaviour::EndpointIndependent => true,
            Behaviour::AddressDependent => dsts.iter().any(|d| d.ip() == from.ip()),
            Behaviour::AddressAndPortDependent => dsts.contains(&from),
        };
        ok.then_some(*local)
    }
}

fn run(nat: &mut SimNat) -> NatReport {
    let t0 = Instant::now();
    let mut server = StunServer::new(StunServerConfig {
        primary: "203.0.113.1".parse().expect("ip"),
        alternate: Some("203.0.113.2".parse().expect("ip")),
        ports: [3478, 3479],
        rate: 100,
        users: vec![],
    });
    let locals: Vec<(SocketId, SocketAddr)> = NatProbe::sockets()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, SocketAddr::new("192.0.2.10".parse().expect("ip"), 5000 + i as u16)))
        .collect();
    let mut probe = NatProbe::new(t0, "203.0.113.1:3478".parse().expect("addr"), locals.clone(), 1);
    let mut now = t0;
    for _ in 0..10_000 {
        if let Some(r) = probe.result() {
            return r.clone();
        }
        let mut moved = false;
        while let Some(tx) = probe.poll_transmit() {
            moved = true;
            let local = locals.iter().find(|(s, _)| *s == tx.socket).map(|(_, a)| *a).expect("socket");
            let public = nat.outbound(local, tx.to);
            if nat.lost() {
                continue;
            }
            if tx.to.ip() == nat.public {
                let inside = nat.sent.get(&tx.to.port()).map(|(l, _)| *l);
                if let (true, Some(back)) = (nat.hairpin, inside) {
                    let sock = locals.iter().find(|(_, a)| *a == back).map(|(s, _)| *s).expect("socket");
                    probe.handle_input(now, sock, public, &tx.bytes);
                }
                continue;
            }
            let Ok(reply) = server.handle(now, tx.to, public, &tx.bytes) else { continue };
            if nat.lost() {
                continue;
            }
            if let Some(back) = nat.inbound(reply.to.port(), reply.from) {
                let sock = locals.iter().find(|(_, a)| *a == back).map(|(s, _)| *s).expect("socket");
                probe.handle_input(now, sock, reply.from, &reply.bytes);
            }
        }
        if !moved {
            now = probe.poll_timeout().expect("a probe that is not done waits for something");
            probe.handle_timeout(now);
        }
    }
    panic!("probe never finished");
}

#[test]
fn full_cone_is_eim_and_eif_with_preserved_ports() {
    let r = run(&mut SimNat::new(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, Alloc::Preserve));
    assert!(r.udp);
    assert_eq!(r.nat, Some(true));
    assert_eq!((r.mapping, r.filtering), (Some(Behaviour::EndpointIndependent), Some(Behaviour::EndpointIndependent)));
    assert_eq!(r.allocation, Some(Allocation::Preserving));
    assert_eq!(r.traditional_name(), "full cone");
    assert_eq!(r.confidence(), 1.0);
}

#[test]
fn restricted_and_port_restricted_cones_differ_only_in_filtering() {
    let r = run(&mut SimNat::new(Behaviour::EndpointIndependent, Behaviour::AddressDependent, Alloc::Preserve));
    assert_eq!(r.traditional_name(), "restricted cone");
    let r = run(&mut SimNat::new(Behaviour::EndpointIndependent, Behaviour::AddressAndPortDependent, Alloc::Preserve));
    assert_eq!(r.filtering, Some(Behaviour::AddressAndPortDependent));
    assert_eq!(r.traditional_name(), "port-restricted cone");
}

#[test]
fn symmetric_sequential_nat_reports_its_delta() {
    let r = run(&mut SimNat::new(
        Behaviour::AddressAndPortDependent,
        Behaviour::AddressAndPortDependent,
        Alloc::Sequential(1),
    ));
    assert_eq!(r.mapping, Some(Behaviour::AddressAndPortDependent));
    assert_eq!(r.allocation, Some(Allocation::Sequential { delta: 1 }));
    assert_eq!(r.traditional_name(), "symmetric");
    assert_eq!(r.ports.len(), usize::from(ALLOCATION_SAMPLES));
}

#[test]
fn address_dependent_mapping_and_random_ports() {
    let r = run(&mut SimNat::new(Behaviour::AddressDependent, Behaviour::AddressAndPortDependent, Alloc::Random));
    assert_eq!(r.mapping, Some(Behaviour::AddressDependent));
    assert_eq!(r.allocation, Some(Allocation::Random));
}

#[test]
fn hairpinning_is_detected_when_the_nat_loops_back() {
    let mut nat = SimNat::new(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, Alloc::Preserve);
    assert_eq!(run(&mut nat).hairpinning, Some(false));
    nat = SimNat::new(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, Alloc::Preserve);
    nat.hairpin = true;
    let r = run(&mut nat);
    assert_eq!(r.hairpinning, Some(true));
    assert_eq!(r.traditional_name(), "full cone", "the rest of the probe still runs");
}

#[test]
fn packet_loss_is_survived_by_retransmission() {
    let mut nat = SimNat::new(Behaviour::EndpointIndependent, Behaviour::AddressDependent, Alloc::Preserve);
    nat.lose_every = 3;
    let r = run(&mut nat);
    assert_eq!(r.traditional_name(), "restricted cone", "{:#?}", r.observations);
}

#[test]
fn no_answer_at_all_is_udp_blocked() {
    let mut nat = SimNat::new(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, Alloc::Preserve);
    nat.lose_every = 1;
    let r = run(&mut nat);
    assert!(!r.udp);
    assert_eq!(r.traditional_name(), "UDP blocked");
    assert_eq!(r.observations.len(), 1, "one unanswered binding, retransmitted, then done");
}
