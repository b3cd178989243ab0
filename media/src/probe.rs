//! NAT behaviour discovery (RFC 5780 §4) as a sans-IO state machine. The shell binds the
//! sockets the probe asks for, sends its transmits, feeds back what arrives, and calls
//! [`NatProbe::handle_timeout`] when [`NatProbe::poll_timeout`] comes due.
//!
//! Tests, in order, one transaction at a time, paced at most 10 per second, each
//! retransmitted per RFC 8489 §6.2.1 (RTO 500 ms doubling, 4 tries here):
//! 1. Binding to the server: UDP reachable? mapped address, OTHER-ADDRESS, NAT present?
//! 2. Mapping: the same socket to the alternate address (same port), then to the alternate
//!    address and port: EIM, ADM or APDM.
//! 3. Filtering on a fresh, idle socket: ask for an answer from the alternate address and
//!    port, then from the alternate port only: EIF, ADF or APDF.
//! 4. Port allocation: several fresh sockets, one Binding each: preserving, sequential
//!    (with its delta) or random, with the ports seen.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_rs::attributes::discovery::{ChangeRequest, ChangeRequestFlags, OtherAddress};
use stun_rs::attributes::stun::XorMappedAddress;
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessageBuilder, TransactionId,
};

/// Sockets the probe uses, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SocketId {
    Main,
    Filtering,
    /// Sends to the main socket's mapped address, to test hairpinning.
    Hairpin,
    Allocation(u8),
}

/// Fresh sockets used to sample port allocation.
pub const ALLOCATION_SAMPLES: u8 = 4;
const RTO: Duration = Duration::from_millis(500);
const TRIES: u32 = 4;
/// RFC 5780 §4: at most 10 transactions a second.
const PACING: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// The NAT kept each socket's local port.
    Preserving,
    /// Successive mappings differ by `delta`.
    Sequential {
        delta: i32,
    },
    /// Ports drawn from one aligned block (carrier-grade NATs); `size` is the smallest
    /// power-of-two block holding every sample, so an upper bound.
    PortBlock {
        size: u16,
    },
    Random,
}

/// One transaction and what it showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub test: &'static str,
    pub socket: SocketId,
    pub to: SocketAddr,
    /// The mapped address reported, or `None` for no answer.
    pub mapped: Option<SocketAddr>,
    pub from: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatReport {
    /// `false`: nothing came back at all (UDP blocked, or no server).
    pub udp: bool,
    /// Whether a NAT sits in front (mapped address differs from the local one).
    pub nat: Option<bool>,
    pub mapped: Option<SocketAddr>,
    pub mapping: Option<Behaviour>,
    pub filtering: Option<Behaviour>,
    pub allocation: Option<Allocation>,
    /// Whether a packet to our own mapped address comes back in (RFC 5780 §4.5).
    pub hairpinning: Option<bool>,
    /// Mapped ports of the allocation samples, with their local ports.
    pub ports: Vec<(u16, u16)>,
    pub observations: Vec<Observation>,
}

impl NatReport {
    /// The classic name (RFC 3489 terms), where the behaviours allow one.
    pub fn traditional_name(&self) -> &'static str {
        use Behaviour::*;
        match (self.udp, self.nat, self.mapping, self.filtering) {
            (false, ..) => "UDP blocked",
            (_, Some(false), _, Some(EndpointIndependent)) => "open internet",
            (_, Some(false), ..) => "no NAT, firewalled",
            (_, _, Some(EndpointIndependent), Some(EndpointIndependent)) => "full cone",
            (_, _, Some(EndpointIndependent), Some(AddressDependent)) => "restricted cone",
            (_, _, Some(EndpointIndependent), Some(AddressAndPortDependent)) => "port-restricted cone",
            (_, _, Some(_), _) => "symmetric",
            _ => "unknown",
        }
    }

    /// Share of the tests that could run (1.0: all answered or conclusively unanswered).
    pub fn confidence(&self) -> f64 {
        let parts = [self.udp, self.mapping.is_some(), self.filtering.is_some(), self.allocation.is_some()];
        parts.iter().filter(|b| **b).count() as f64 / parts.len() as f64
    }
}

/// A datagram for the shell to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTransmit {
    pub socket: SocketId,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Reach,
    MapAltIp,
    MapAltIpPort,
    Hairpin,
    FilterIpPort,
    FilterPort,
    Alloc(u8),
    Done,
}

struct Pending {
    id: TransactionId,
    socket: SocketId,
    to: SocketAddr,
    bytes: Vec<u8>,
    tries: u32,
    next: Instant,
}

pub struct NatProbe {
    server: SocketAddr,
    locals: Vec<(SocketId, SocketAddr)>,
    step: Step,
    pending: Option<Pending>,
    not_before: Instant,
    other: Option<SocketAddr>,
    mapped: [Option<SocketAddr>; 3],
    out: Vec<ProbeTransmit>,
    report: NatReport,
    seed: u64,
}

impl NatProbe {
    /// Probes against `server` (its primary address and port). `locals` are the local
    /// addresses of the sockets the shell bound for each role.
    pub fn new(now: Instant, server: SocketAddr, locals: Vec<(SocketId, SocketAddr)>, seed: u64) -> NatProbe {
        let mut p = NatProbe {
            server,
            locals,
            step: Step::Reach,
            pending: None,
            not_before: now,
            other: None,
            mapped: [None; 3],
            out: Vec::new(),
            report: NatReport::default(),
            seed,
        };
        p.start(now, SocketId::Main, server, None);
        p
    }

    /// The sockets a probe needs: the shell binds one per id before calling [`NatProbe::new`].
    pub fn sockets() -> Vec<SocketId> {
        let mut v = vec![SocketId::Main, SocketId::Filtering, SocketId::Hairpin];
        v.extend((0..ALLOCATION_SAMPLES).map(SocketId::Allocation));
        v
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<ProbeTransmit> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.next)
    }

    /// The report, once every test has run.
    #[must_use]
    pub fn result(&self) -> Option<&NatReport> {
        (self.step == Step::Done).then_some(&self.report)
    }

    fn local(&self, s: SocketId) -> Option<SocketAddr> {
        self.locals.iter().find(|(id, _)| *id == s).map(|(_, a)| *a)
    }

    fn start(&mut self, now: Instant, socket: SocketId, to: SocketAddr, change: Option<ChangeRequest>) {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.seed.to_be_bytes());
        tid[8..].copy_from_slice(&(self.report.observations.len() as u32).to_be_bytes());
        let id = TransactionId::from(tid);
        let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(id);
        if let Some(c) = change {
            b = b.with_attribute(c);
        }
        let mut bytes = vec![0u8; 64];
        let n = MessageEncoderBuilder::default().build().encode(&mut bytes, &b.build()).unwrap_or(0);
        bytes.truncate(n);
        let at = now.max(self.not_before);
        self.not_before = at + PACING;
        self.pending = Some(Pending { id, socket, to, bytes, tries: 0, next: at });
        if at <= now {
            self.handle_timeout(now);
        }
    }

    /// Retransmits, and gives up on a transaction after its last try.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(p) = self.pending.as_mut() else { return };
        if now < p.next {
            return;
        }
        let tries = if self.step == Step::Hairpin { 2 } else { TRIES };
        if p.tries < tries {
            self.out.push(ProbeTransmit { socket: p.socket, to: p.to, bytes: p.bytes.clone() });
            p.tries += 1;
            p.next = now + RTO * 2u32.pow(p.tries - 1);
            return;
        }
        // No answer.
        let (socket, to) = (p.socket, p.to);
        self.pending = None;
        self.record(socket, to, None, None);
        if self.step == Step::Hairpin {
            self.report.hairpinning = Some(false);
            self.begin_filtering(now);
            return;
        }
        self.advance(now, None);
    }

    /// A datagram arrived on `socket` from `from`.
    pub fn handle_input(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        let Some(p) = self.pending.as_ref() else { return };
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else { return };
        if self.step == Step::Hairpin {
            // Our own request, come back round through the NAT to the main socket.
            if socket == SocketId::Main && msg.transaction_id() == &p.id && msg.class() == MessageClass::Request {
                let to = p.to;
                self.pending = None;
                self.record(SocketId::Hairpin, to, None, Some(from));
                self.report.hairpinning = Some(true);
                self.begin_filtering(now);
            }
            return;
        }
        if p.socket != socket {
            return;
        }
        if msg.transaction_id() != &p.id || msg.class() != MessageClass::SuccessResponse {
            return;
        }
        let mapped = match msg.get::<XorMappedAddress>() {
            Some(StunAttribute::XorMappedAddress(x)) => Some(*x.socket_address()),
            _ => None,
        };
        if self.step == Step::Reach {
            if let Some(StunAttribute::OtherAddress(o)) = msg.get::<OtherAddress>() {
                self.other = Some(*o.socket_address());
            }
        }
        let to = p.to;
        self.pending = None;
        self.record(socket, to, mapped, Some(from));
        self.advance(now, Some(mapped));
    }

    fn record(&mut self, socket: SocketId, to: SocketAddr, mapped: Option<SocketAddr>, from: Option<SocketAddr>) {
        let test = match self.step {
            Step::Reach => "binding",
            Step::MapAltIp => "mapping: alternate address",
            Step::MapAltIpPort => "mapping: alternate address and port",
            Step::Hairpin => "hairpinning: to our own mapped address",
            Step::FilterIpPort => "filtering: answer from alternate address and port",
            Step::FilterPort => "filtering: answer from alternate port",
            Step::Alloc(_) => "allocation sample",
            Step::Done => "done",
        };
        self.report.observations.push(Observation { test, socket, to, mapped, from });
    }

    /// Moves to the next test given the last one's outcome (`None`: no answer).
    fn advance(&mut self, now: Instant, answer: Option<Option<SocketAddr>>) {
        let mapped = answer.flatten();
        let port_only = ChangeRequest::new(Some(ChangeRequestFlags::ChangePort.into()));
        match self.step {
            Step::Reach => {
                let Some(m) = mapped else {
                    self.step = Step::Done;
                    return;
                };
                self.report.udp = true;
                self.report.mapped = Some(m);
                self.report.nat =
                    self.local(SocketId::Main).map(|l| l != m && !(l.ip().is_unspecified() && l.port() == m.port()));
                self.mapped[0] = Some(m);
                match self.other {
                    Some(o) => {
                        self.step = Step::MapAltIp;
                        self.start(now, SocketId::Main, SocketAddr::new(o.ip(), self.server.port()), None);
                    }
                    None => self.begin_filtering(now),
                }
            }
            Step::MapAltIp => {
                self.mapped[1] = mapped;
                if mapped.is_some() && mapped == self.mapped[0] {
                    self.report.mapping = Some(Behaviour::EndpointIndependent);
                    self.begin_hairpin(now);
                } else if let Some(o) = self.other {
                    self.step = Step::MapAltIpPort;
                    self.start(now, SocketId::Main, o, None);
                } else {
                    self.begin_filtering(now);
                }
            }
            Step::MapAltIpPort => {
                self.mapped[2] = mapped;
                if mapped.is_some() {
                    self.report.mapping = Some(if mapped == self.mapped[1] {
                        Behaviour::AddressDependent
                    } else {
                        Behaviour::AddressAndPortDependent
                    });
                }
                self.begin_hairpin(now);
            }
            Step::FilterIpPort => {
                if answer.is_some() {
                    self.report.filtering = Some(Behaviour::EndpointIndependent);
                    self.begin_allocation(now);
                } else {
                    self.step = Step::FilterPort;
                    self.start(now, SocketId::Filtering, self.server, Some(port_only));
                }
            }
            Step::FilterPort => {
                self.report.filtering = Some(if answer.is_some() {
                    Behaviour::AddressDependent
                } else {
                    Behaviour::AddressAndPortDependent
                });
                self.begin_allocation(now);
            }
            Step::Alloc(k) => {
                if let (Some(m), Some(l)) = (mapped, self.local(SocketId::Allocation(k))) {
                    self.report.ports.push((m.port(), l.port()));
                }
                if k + 1 < ALLOCATION_SAMPLES {
                    self.step = Step::Alloc(k + 1);
                    self.start(now, SocketId::Allocation(k + 1), self.server, None);
                } else {
                    self.report.allocation = classify_allocation(&self.report.ports);
                    self.step = Step::Done;
                }
            }
            Step::Hairpin | Step::Done => {}
        }
    }

    fn begin_hairpin(&mut self, now: Instant) {
        match self.mapped[0] {
            Some(m) if self.report.nat == Some(true) => {
                self.step = Step::Hairpin;
                self.start(now, SocketId::Hairpin, m, None);
            }
            _ => self.begin_filtering(now),
        }
    }

    fn begin_filtering(&mut self, now: Instant) {
        if self.other.is_none() {
            self.begin_allocation(now);
            return;
        }
        self.step = Step::FilterIpPort;
        let c = ChangeRequest::new(Some(ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort));
        self.start(now, SocketId::Filtering, self.server, Some(c));
    }

    fn begin_allocation(&mut self, now: Instant) {
        self.step = Step::Alloc(0);
        self.start(now, SocketId::Allocation(0), self.server, None);
    }
}

/// Preserving if every mapping kept its local port; sequential if successive mappings
/// differ by one constant, small delta; random otherwise.
fn classify_allocation(ports: &[(u16, u16)]) -> Option<Allocation> {
    if ports.len() < 2 {
        return None;
    }
    if ports.iter().all(|(m, l)| m == l) {
        return Some(Allocation::Preserving);
    }
    let deltas: Vec<i32> = ports.windows(2).map(|w| i32::from(w[1].0) - i32::from(w[0].0)).collect();
    if deltas.iter().all(|d| *d == deltas[0]) && deltas[0] != 0 && deltas[0].abs() <= 16 {
        return Some(Allocation::Sequential { delta: deltas[0] });
    }
    let (lo, hi) = ports.iter().fold((u16::MAX, 0), |(lo, hi), (m, _)| (lo.min(*m), hi.max(*m)));
    let block = (6..=12).map(|k| 1u16 << k).find(|b| lo / b == hi / b);
    Some(match block {
        Some(size) => Allocation::PortBlock { size },
        None => Allocation::Random,
    })
}

pub mod lifetime;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod allocation_tests {
    use super::*;

    #[test]
    fn allocation_kinds_are_told_apart() {
        assert_eq!(classify_allocation(&[(5000, 5000), (6000, 6000)]), Some(Allocation::Preserving));
        assert_eq!(
            classify_allocation(&[(40004, 1), (40005, 2), (40006, 3)]),
            Some(Allocation::Sequential { delta: 1 })
        );
        assert_eq!(
            classify_allocation(&[(40010, 1), (40008, 2), (40006, 3)]),
            Some(Allocation::Sequential { delta: -2 })
        );
        assert_eq!(
            classify_allocation(&[(20500, 1), (20900, 2), (20611, 3), (20999, 4)]),
            Some(Allocation::PortBlock { size: 1024 }),
            "four draws inside 20480..21504"
        );
        assert_eq!(classify_allocation(&[(1195, 1), (60019, 2), (18489, 3), (61216, 4)]), Some(Allocation::Random));
        assert_eq!(classify_allocation(&[(1, 2)]), None);
    }
}
