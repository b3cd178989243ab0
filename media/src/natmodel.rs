//! A NAT as data, for tests in virtual time: mapping (RFC 4787 EIM/ADM/APDM), filtering
//! (EIF/ADF/APDF), port allocation (preserving, sequential with a delta, port blocks or
//! random), loss, and mappings that die after a stretch of silence. The classifier's tests
//! and the punch planner's tests run against it; the netns labs are its system-level
//! counterpart with the kernel's own NAT.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::probe::{Allocation, Behaviour};

/// How a NAT picks the public port of a new mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAllocation {
    /// The local port, when free.
    Preserving,
    /// The previous mapping's port plus `delta`.
    Sequential {
        delta: u16,
    },
    /// Random ports within a block of `size` given to each local address.
    PortBlock {
        size: u16,
    },
    Random,
}

impl PortAllocation {
    /// What a classifier that measured this NAT reports.
    pub fn as_reported(self) -> Allocation {
        match self {
            PortAllocation::Preserving => Allocation::Preserving,
            PortAllocation::Sequential { delta } => Allocation::Sequential { delta: i32::from(delta) },
            PortAllocation::PortBlock { size } => Allocation::PortBlock { size },
            PortAllocation::Random => Allocation::Random,
        }
    }
}

/// The five kinds of the punching matrix, by the lab's names.
pub const MATRIX: [(&str, NatKind); 5] = [
    ("full-cone", NatKind::FULL_CONE),
    ("restricted", NatKind::RESTRICTED),
    ("port-restricted", NatKind::PORT_RESTRICTED),
    ("symmetric-seq", NatKind::SYMMETRIC_SEQ),
    ("symmetric-random", NatKind::SYMMETRIC_RANDOM),
];

/// The 15 unordered pairs of [`MATRIX`] kinds, by index.
pub fn matrix_pairs() -> Vec<(usize, usize)> {
    (0..MATRIX.len()).flat_map(|i| (i..MATRIX.len()).map(move |j| (i, j))).collect()
}

/// The NAT's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatKind {
    pub mapping: Behaviour,
    pub filtering: Behaviour,
    pub allocation: PortAllocation,
}

impl NatKind {
    /// The five kinds of the punching matrix, as the lab builds them with nftables.
    pub const FULL_CONE: NatKind = NatKind::new(Behaviour::EndpointIndependent, Behaviour::EndpointIndependent);
    pub const RESTRICTED: NatKind = NatKind::new(Behaviour::EndpointIndependent, Behaviour::AddressDependent);
    pub const PORT_RESTRICTED: NatKind =
        NatKind::new(Behaviour::EndpointIndependent, Behaviour::AddressAndPortDependent);
    pub const SYMMETRIC_SEQ: NatKind = NatKind {
        mapping: Behaviour::AddressAndPortDependent,
        filtering: Behaviour::AddressAndPortDependent,
        allocation: PortAllocation::Sequential { delta: 1 },
    };
    pub const SYMMETRIC_RANDOM: NatKind = NatKind {
        mapping: Behaviour::AddressAndPortDependent,
        filtering: Behaviour::AddressAndPortDependent,
        allocation: PortAllocation::Random,
    };

    const fn new(mapping: Behaviour, filtering: Behaviour) -> NatKind {
        NatKind { mapping, filtering, allocation: PortAllocation::Preserving }
    }
}

/// (local address, destination address if mapping depends on it, destination port if so).
type MapKey = (SocketAddr, Option<IpAddr>, Option<u16>);

struct Mapping {
    local: SocketAddr,
    /// Destinations this mapping sent to (for filtering).
    sent_to: Vec<SocketAddr>,
    last_active: Instant,
}

/// One NAT box in virtual time.
pub struct NatModel {
    pub kind: NatKind,
    pub public: IpAddr,
    /// Silence after which a mapping is forgotten.
    pub timeout: Duration,
    /// Drop every n-th packet in each direction (0: none).
    pub lose_every: usize,
    /// Loop packets sent to its own public address back inside (RFC 5780 §4.5).
    pub hairpin: bool,
    keys: HashMap<MapKey, u16>,
    mappings: HashMap<u16, Mapping>,
    /// Port mappings the gateway granted on request (PCP/NAT-PMP): local → public port,
    /// both ways, from and to anyone.
    forwards: HashMap<SocketAddr, u16>,
    next: u16,
    rng: u64,
    packets: usize,
}

impl NatModel {
    pub fn new(kind: NatKind, public: IpAddr, seed: u64) -> NatModel {
        NatModel {
            kind,
            public,
            timeout: Duration::from_secs(120),
            lose_every: 0,
            hairpin: false,
            keys: HashMap::new(),
            mappings: HashMap::new(),
            forwards: HashMap::new(),
            next: 40000,
            rng: seed | 1,
            packets: 0,
        }
    }

    fn lost(&mut self) -> bool {
        self.packets += 1;
        self.lose_every != 0 && self.packets.is_multiple_of(self.lose_every)
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        let dead: Vec<u16> = self
            .mappings
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_active) >= timeout)
            .map(|(p, _)| *p)
            .collect();
        for p in dead {
            self.mappings.remove(&p);
            self.keys.retain(|_, v| *v != p);
        }
    }

    fn allocate(&mut self, local: SocketAddr) -> u16 {
        let free = |p: u16, m: &HashMap<u16, Mapping>| p >= 1024 && !m.contains_key(&p);
        match self.kind.allocation {
            PortAllocation::Preserving if free(local.port(), &self.mappings) => local.port(),
            PortAllocation::Preserving | PortAllocation::Sequential { .. } => {
                let delta = match self.kind.allocation {
                    PortAllocation::Sequential { delta } => delta.max(1),
                    _ => 1,
                };
                loop {
                    self.next = self.next.wrapping_add(delta).max(1024);
                    if free(self.next, &self.mappings) {
                        break self.next;
                    }
                }
            }
            PortAllocation::PortBlock { size } => {
                let base = 20000 + (u16::try_from(self.mappings.len()).unwrap_or(0) / size.max(1)) * size.max(1);
                loop {
                    self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let p = base.wrapping_add((self.rng >> 33) as u16 % size.max(1));
                    if free(p, &self.mappings) {
                        break p;
                    }
                }
            }
            PortAllocation::Random => loop {
                self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let p = 1024 + (self.rng >> 33) as u16 % 64000;
                if free(p, &self.mappings) {
                    break p;
                }
            },
        }
    }

    /// A packet from `local` to `dst` leaves the NAT: from which public address, or `None`
    /// if it was lost.
    pub fn outbound(&mut self, now: Instant, local: SocketAddr, dst: SocketAddr) -> Option<SocketAddr> {
        self.expire(now);
        if let Some(port) = self.forwards.get(&local).copied() {
            return (!self.lost()).then_some(SocketAddr::new(self.public, port));
        }
        let key = match self.kind.mapping {
            Behaviour::EndpointIndependent => (local, None, None),
            Behaviour::AddressDependent => (local, Some(dst.ip()), None),
            Behaviour::AddressAndPortDependent => (local, Some(dst.ip()), Some(dst.port())),
        };
        let port = match self.keys.get(&key) {
            Some(p) => *p,
            None => {
                let p = self.allocate(local);
                self.keys.insert(key, p);
                self.mappings.insert(p, Mapping { local, sent_to: Vec::new(), last_active: now });
                p
            }
        };
        if let Some(m) = self.mappings.get_mut(&port) {
            m.last_active = now;
            if !m.sent_to.contains(&dst) {
                m.sent_to.push(dst);
            }
        }
        if self.lost() {
            return None;
        }
        Some(SocketAddr::new(self.public, port))
    }

    /// A packet from `from` arrives at the NAT's public `port`: to which local address, or
    /// `None` if no live mapping lets it in (or it was lost).
    pub fn inbound(&mut self, now: Instant, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        self.expire(now);
        if let Some((local, _)) = self.forwards.iter().find(|(_, p)| **p == port) {
            let local = *local;
            return (!self.lost()).then_some(local);
        }
        let filtering = self.kind.filtering;
        let m = self.mappings.get_mut(&port)?;
        let allowed = match filtering {
            Behaviour::EndpointIndependent => true,
            Behaviour::AddressDependent => m.sent_to.iter().any(|d| d.ip() == from.ip()),
            Behaviour::AddressAndPortDependent => m.sent_to.contains(&from),
        };
        if !allowed {
            return None;
        }
        m.last_active = now;
        let local = m.local;
        if self.lost() {
            return None;
        }
        Some(local)
    }

    /// What a PCP or NAT-PMP gateway does when asked: `local` is reachable at public port
    /// `port` from anyone, and leaves from it (RFC 6887 §11: a MAP mapping is used both
    /// ways). Returns the public address.
    pub fn forward(&mut self, local: SocketAddr, port: u16) -> SocketAddr {
        self.forwards.insert(local, port);
        SocketAddr::new(self.public, port)
    }

    /// Where a packet sent from inside to the NAT's own public `port` ends up, if the NAT
    /// hairpins: the local address behind that mapping.
    pub fn hairpin_to(&self, port: u16) -> Option<SocketAddr> {
        self.hairpin.then(|| self.mappings.get(&port).map(|m| m.local)).flatten()
    }

    /// Live mappings.
    pub fn mapping_count(&self) -> usize {
        self.mappings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    const LOCAL: &str = "192.0.2.10:5000";
    const S1: &str = "203.0.113.1:3478";
    const S2: &str = "203.0.113.2:3478";
    const S1B: &str = "203.0.113.1:3479";

    fn nat(kind: NatKind) -> (NatModel, Instant) {
        (NatModel::new(kind, "198.51.100.1".parse().expect("ip"), 3), Instant::now())
    }

    #[test]
    fn endpoint_independent_mapping_keeps_one_port_for_every_destination() {
        let (mut n, t) = nat(NatKind::PORT_RESTRICTED);
        let a = n.outbound(t, addr(LOCAL), addr(S1)).expect("out");
        let b = n.outbound(t, addr(LOCAL), addr(S2)).expect("out");
        assert_eq!(a, b);
        assert_eq!(a.port(), 5000, "port preserved");
    }

    #[test]
    fn symmetric_sequential_mapping_steps_by_its_delta_per_destination() {
        let (mut n, t) = nat(NatKind { allocation: PortAllocation::Sequential { delta: 2 }, ..NatKind::SYMMETRIC_SEQ });
        let ports: Vec<u16> =
            [S1, S2, S1B].iter().map(|d| n.outbound(t, addr(LOCAL), addr(d)).expect("out").port()).collect();
        assert_eq!(ports, vec![40002, 40004, 40006]);
        assert_eq!(n.outbound(t, addr(LOCAL), addr(S1)).expect("out").port(), 40002, "same destination, same port");
    }

    #[test]
    fn filtering_admits_by_endpoint_address_or_address_and_port() {
        for (kind, from_other_port, from_other_ip) in [
            (NatKind::FULL_CONE, true, true),
            (NatKind::RESTRICTED, true, false),
            (NatKind::PORT_RESTRICTED, false, false),
        ] {
            let (mut n, t) = nat(kind);
            let p = n.outbound(t, addr(LOCAL), addr(S1)).expect("out").port();
            assert_eq!(n.inbound(t, p, addr(S1)), Some(addr(LOCAL)), "{kind:?}: the reply comes in");
            assert_eq!(n.inbound(t, p, addr(S1B)).is_some(), from_other_port, "{kind:?}: other port");
            assert_eq!(n.inbound(t, p, addr(S2)).is_some(), from_other_ip, "{kind:?}: other address");
        }
    }

    #[test]
    fn silent_mappings_die_and_traffic_keeps_them() {
        let (mut n, t) = nat(NatKind::PORT_RESTRICTED);
        n.timeout = Duration::from_secs(20);
        let p = n.outbound(t, addr(LOCAL), addr(S1)).expect("out").port();
        assert!(n.inbound(t + Duration::from_secs(15), p, addr(S1)).is_some(), "inbound refreshes");
        assert!(n.inbound(t + Duration::from_secs(30), p, addr(S1)).is_some(), "15 s after the refresh");
        assert!(n.inbound(t + Duration::from_secs(51), p, addr(S1)).is_none(), "21 s of silence");
        assert_eq!(n.mapping_count(), 0);
    }

    #[test]
    fn random_and_port_block_allocations_stay_in_their_ranges_and_never_collide() {
        for alloc in [PortAllocation::Random, PortAllocation::PortBlock { size: 64 }] {
            let (mut n, t) = nat(NatKind { allocation: alloc, ..NatKind::SYMMETRIC_RANDOM });
            let mut seen = std::collections::HashSet::new();
            for i in 0..50u16 {
                let p = n.outbound(t, addr(LOCAL), SocketAddr::new("203.0.113.9".parse().expect("ip"), 1000 + i));
                let p = p.expect("out").port();
                assert!(p >= 1024);
                if let PortAllocation::PortBlock { size } = alloc {
                    assert!((20000..20000 + size).contains(&p), "{p} in its block");
                }
                assert!(seen.insert(p), "{alloc:?}: {p} reused");
            }
        }
    }

    #[test]
    fn loss_drops_every_nth_packet() {
        let (mut n, t) = nat(NatKind::FULL_CONE);
        n.lose_every = 3;
        let got: Vec<bool> = (0..6).map(|_| n.outbound(t, addr(LOCAL), addr(S1)).is_some()).collect();
        assert_eq!(got, vec![true, true, false, true, true, false]);
    }
}
