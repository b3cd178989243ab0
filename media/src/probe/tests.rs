//! The probe against simulated NATs of every behaviour, with the real STUN server logic,
//! in virtual time. Addresses are values only (RFC 5737 ranges); nothing is sent.

use std::net::SocketAddr;

use super::*;
use crate::natmodel::{NatKind, NatModel, PortAllocation};
use crate::stun::{StunServer, StunServerConfig};

fn model(mapping: Behaviour, filtering: Behaviour, allocation: PortAllocation) -> NatModel {
    NatModel::new(NatKind { mapping, filtering, allocation }, "198.51.100.1".parse().expect("ip"), 7)
}

fn run(nat: &mut NatModel) -> NatReport {
    timed(nat).0
}

/// The report, and how long the probe took in virtual time.
fn timed(nat: &mut NatModel) -> (NatReport, Duration) {
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
            return (r.clone(), now - t0);
        }
        let mut moved = false;
        while let Some(tx) = probe.poll_transmit() {
            moved = true;
            let local = locals.iter().find(|(s, _)| *s == tx.socket).map(|(_, a)| *a).expect("socket");
            let Some(public) = nat.outbound(now, local, tx.to) else { continue };
            if tx.to.ip() == nat.public {
                if let Some(back) = nat.hairpin_to(tx.to.port()) {
                    let sock = locals.iter().find(|(_, a)| *a == back).map(|(s, _)| *s).expect("socket");
                    probe.handle_input(now, sock, public, &tx.bytes);
                }
                continue;
            }
            let Ok(reply) = server.handle(now, tx.to, public, &tx.bytes) else { continue };
            if let Some(back) = nat.inbound(now, reply.to.port(), reply.from) {
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
    let r = run(&mut model(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, PortAllocation::Preserving));
    assert!(r.udp);
    assert_eq!(r.nat, Some(true));
    assert_eq!((r.mapping, r.filtering), (Some(Behaviour::EndpointIndependent), Some(Behaviour::EndpointIndependent)));
    assert_eq!(r.allocation, Some(Allocation::Preserving));
    assert_eq!(r.traditional_name(), "full cone");
    assert_eq!(r.confidence(), 1.0);
}

#[test]
fn restricted_and_port_restricted_cones_differ_only_in_filtering() {
    let r = run(&mut model(Behaviour::EndpointIndependent, Behaviour::AddressDependent, PortAllocation::Preserving));
    assert_eq!(r.traditional_name(), "restricted cone");
    let r =
        run(&mut model(Behaviour::EndpointIndependent, Behaviour::AddressAndPortDependent, PortAllocation::Preserving));
    assert_eq!(r.filtering, Some(Behaviour::AddressAndPortDependent));
    assert_eq!(r.traditional_name(), "port-restricted cone");
}

#[test]
fn symmetric_sequential_nat_reports_its_delta() {
    let r = run(&mut model(
        Behaviour::AddressAndPortDependent,
        Behaviour::AddressAndPortDependent,
        PortAllocation::Sequential { delta: 1 },
    ));
    assert_eq!(r.mapping, Some(Behaviour::AddressAndPortDependent));
    assert_eq!(r.allocation, Some(Allocation::Sequential { delta: 1 }));
    assert_eq!(r.traditional_name(), "symmetric");
    assert_eq!(r.ports.len(), usize::from(ALLOCATION_SAMPLES));
}

#[test]
fn address_dependent_mapping_and_random_ports() {
    let r = run(&mut model(Behaviour::AddressDependent, Behaviour::AddressAndPortDependent, PortAllocation::Random));
    assert_eq!(r.mapping, Some(Behaviour::AddressDependent));
    assert_eq!(r.allocation, Some(Allocation::Random));
}

#[test]
fn hairpinning_is_detected_when_the_nat_loops_back() {
    let mut nat = model(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, PortAllocation::Preserving);
    assert_eq!(run(&mut nat).hairpinning, Some(false));
    nat = model(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, PortAllocation::Preserving);
    nat.hairpin = true;
    let r = run(&mut nat);
    assert_eq!(r.hairpinning, Some(true));
    assert_eq!(r.traditional_name(), "full cone", "the rest of the probe still runs");
}

#[test]
fn packet_loss_is_survived_by_retransmission() {
    let mut nat = model(Behaviour::EndpointIndependent, Behaviour::AddressDependent, PortAllocation::Preserving);
    nat.lose_every = 3;
    let r = run(&mut nat);
    assert_eq!(r.traditional_name(), "restricted cone", "{:#?}", r.observations);
}

#[test]
fn no_answer_at_all_is_udp_blocked() {
    let mut nat = model(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent, PortAllocation::Preserving);
    nat.lose_every = 1;
    let r = run(&mut nat);
    assert!(!r.udp);
    assert_eq!(r.traditional_name(), "UDP blocked");
    assert_eq!(r.observations.len(), 1, "one unanswered binding, retransmitted, then done");
}

#[test]
fn every_nat_kind_is_profiled_within_three_seconds() {
    use crate::natmodel::MATRIX;
    for (name, kind) in MATRIX {
        let mut nat = NatModel::new(kind, "198.51.100.1".parse().expect("ip"), 7);
        let (r, took) = timed(&mut nat);
        assert!(r.mapping.is_some() && r.filtering.is_some() && r.allocation.is_some(), "{name}: {r:#?}");
        assert!(took <= Duration::from_secs(3), "{name} took {took:?}");
        eprintln!("{name}: profiled in {took:?}");
    }
}
