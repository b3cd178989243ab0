//! NAT behaviour discovery (RFC 5780 §4) as a sans-IO state machine. The shell binds the
//! sockets the probe asks for, sends its transmits, feeds back what arrives, and calls
//! [`NatProbe::handle_timeout`] when [`NatProbe::poll_timeout`] comes due.
//!
//! First a Binding to the server (UDP reachable? mapped address, OTHER-ADDRESS, NAT
//! present?); then every other test at once, each on sockets of its own, paced
//! [`PACING`] apart (as Tailscale's netcheck runs its probes together), so a profile takes
//! about a second and a half whatever the NAT, not the sum of the tests' timeouts:
//! - Port allocation first: several fresh sockets, one Binding each, back to back so no
//!   other new mapping falls between them: preserving, sequential (with its delta) or
//!   random, with the ports seen.
//! - Mapping: the main socket to the alternate address (same port), then to the alternate
//!   address and port: EIM, ADM or APDM.
//! - Filtering on a fresh socket: one request asking for an answer from the alternate
//!   address and port, one from the alternate port only: EIF, ADF or APDF.
//! - Hairpinning: a packet to our own mapped address.
//!
//! Each transaction is retransmitted on its own schedule ([`Test::schedule`]): a test
//! whose silence is itself the answer (filtering, hairpinning) gives up after 1.1 s.

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
/// Transactions start at least this far apart (RFC 5780 §4 asks for 10 a second at most;
/// a profile is a burst of eight, once).
const PACING: Duration = Duration::from_millis(25);

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

/// One of the probe's tests, each a single transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Reach,
    MapAltIp,
    MapAltIpPort,
    Hairpin,
    FilterIpPort,
    FilterPort,
    Alloc(u8),
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Reach => "binding",
            Test::MapAltIp => "mapping: alternate address",
            Test::MapAltIpPort => "mapping: alternate address and port",
            Test::Hairpin => "hairpinning: to our own mapped address",
            Test::FilterIpPort => "filtering: answer from alternate address and port",
            Test::FilterPort => "filtering: answer from alternate port",
            Test::Alloc(_) => "allocation sample",
        }
    }

    /// When the request is sent again, from its first send; the last entry is when it is
    /// given up. A test whose silence is itself the answer (filtering, hairpinning) waits
    /// little; the first binding, whose silence means no UDP at all, waits longest.
    fn schedule(self) -> &'static [Duration] {
        const fn ms(n: u64) -> Duration {
            Duration::from_millis(n)
        }
        const REACH: [Duration; 5] = [ms(0), ms(250), ms(750), ms(1500), ms(2500)];
        const SILENCE_ANSWERS: [Duration; 4] = [ms(0), ms(250), ms(600), ms(1100)];
        const ANSWERED: [Duration; 4] = [ms(0), ms(250), ms(750), ms(1500)];
        match self {
            Test::Reach => &REACH,
            Test::FilterIpPort | Test::FilterPort | Test::Hairpin => &SILENCE_ANSWERS,
            _ => &ANSWERED,
        }
    }
}

struct Pending {
    test: Test,
    id: TransactionId,
    socket: SocketId,
    to: SocketAddr,
    bytes: Vec<u8>,
    first: Instant,
    sent: usize,
}

impl Pending {
    fn next(&self) -> Instant {
        let s = self.test.schedule();
        self.first + s[self.sent.min(s.len() - 1)]
    }
}

pub struct NatProbe {
    server: SocketAddr,
    locals: Vec<(SocketId, SocketAddr)>,
    /// Transactions under way (several at once after the first binding).
    pending: Vec<Pending>,
    not_before: Instant,
    other: Option<SocketAddr>,
    mapped: [Option<SocketAddr>; 3],
    /// The two filtering tests' outcomes (answered?), as they come.
    filter: [Option<bool>; 2],
    /// Allocation samples not finished yet, and each one's (mapped, local) ports by index.
    samples_left: u8,
    samples: [Option<(u16, u16)>; ALLOCATION_SAMPLES as usize],
    done: bool,
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
            pending: Vec::new(),
            not_before: now,
            other: None,
            mapped: [None; 3],
            filter: [None; 2],
            samples_left: 0,
            samples: [None; ALLOCATION_SAMPLES as usize],
            done: false,
            out: Vec::new(),
            report: NatReport::default(),
            seed,
        };
        p.start(now, Test::Reach, SocketId::Main, server, None);
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
        self.pending.iter().map(Pending::next).min()
    }

    /// The report, once every test has run.
    #[must_use]
    pub fn result(&self) -> Option<&NatReport> {
        self.done.then_some(&self.report)
    }

    fn local(&self, s: SocketId) -> Option<SocketAddr> {
        self.locals.iter().find(|(id, _)| *id == s).map(|(_, a)| *a)
    }

    fn start(&mut self, now: Instant, test: Test, socket: SocketId, to: SocketAddr, change: Option<ChangeRequest>) {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.seed.to_be_bytes());
        tid[8..].copy_from_slice(&(self.report.observations.len() as u32 + self.pending.len() as u32).to_be_bytes());
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
        self.pending.push(Pending { test, id, socket, to, bytes, first: at, sent: 0 });
        if at <= now {
            self.handle_timeout(now);
        }
    }

    /// Sends what is due, retransmits, and gives up on transactions after their last try.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut given_up = Vec::new();
        for p in &mut self.pending {
            while p.next() <= now && p.sent + 1 < p.test.schedule().len() {
                self.out.push(ProbeTransmit { socket: p.socket, to: p.to, bytes: p.bytes.clone() });
                p.sent += 1;
            }
            if p.next() <= now && p.sent + 1 >= p.test.schedule().len() {
                given_up.push(p.id);
            }
        }
        for id in given_up {
            if let Some(i) = self.pending.iter().position(|p| p.id == id) {
                let p = self.pending.remove(i);
                self.record(p.test, p.socket, p.to, None, None);
                self.advance(now, p.test, None);
            }
        }
        self.finish_if_done();
    }

    /// A datagram arrived on `socket` from `from`.
    pub fn handle_input(&mut self, now: Instant, socket: SocketId, from: SocketAddr, data: &[u8]) {
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else { return };
        let Some(i) = self.pending.iter().position(|p| &p.id == msg.transaction_id()) else { return };
        let test = self.pending[i].test;
        if test == Test::Hairpin {
            // Our own request, come back round through the NAT to the main socket.
            if socket == SocketId::Main && msg.class() == MessageClass::Request {
                let p = self.pending.remove(i);
                self.record(test, SocketId::Hairpin, p.to, None, Some(from));
                self.report.hairpinning = Some(true);
            }
            self.finish_if_done();
            return;
        }
        if self.pending[i].socket != socket || msg.class() != MessageClass::SuccessResponse {
            return;
        }
        let mapped = match msg.get::<XorMappedAddress>() {
            Some(StunAttribute::XorMappedAddress(x)) => Some(*x.socket_address()),
            _ => None,
        };
        if test == Test::Reach {
            if let Some(StunAttribute::OtherAddress(o)) = msg.get::<OtherAddress>() {
                self.other = Some(*o.socket_address());
            }
        }
        let p = self.pending.remove(i);
        self.record(test, socket, p.to, mapped, Some(from));
        self.advance(now, test, Some(mapped));
        self.finish_if_done();
    }

    fn record(
        &mut self,
        test: Test,
        socket: SocketId,
        to: SocketAddr,
        mapped: Option<SocketAddr>,
        from: Option<SocketAddr>,
    ) {
        self.report.observations.push(Observation { test: test.name(), socket, to, mapped, from });
    }

    fn finish_if_done(&mut self) {
        if self.pending.is_empty() && !self.done {
            self.done = true;
        }
    }

    /// What a test's outcome (`None`: no answer) shows, and what starts next. After the
    /// first binding everything starts at once, paced: the allocation samples first (back
    /// to back, so no other new mapping falls between them), then the mapping, filtering
    /// and hairpinning tests, each on sockets of its own.
    fn advance(&mut self, now: Instant, test: Test, answer: Option<Option<SocketAddr>>) {
        let mapped = answer.flatten();
        match test {
            Test::Reach => {
                let Some(m) = mapped else { return };
                self.report.udp = true;
                self.report.mapped = Some(m);
                self.report.nat =
                    self.local(SocketId::Main).map(|l| l != m && !(l.ip().is_unspecified() && l.port() == m.port()));
                self.mapped[0] = Some(m);
                self.samples_left = ALLOCATION_SAMPLES;
                for k in 0..ALLOCATION_SAMPLES {
                    self.start(now, Test::Alloc(k), SocketId::Allocation(k), self.server, None);
                }
                if let Some(o) = self.other {
                    self.start(now, Test::MapAltIp, SocketId::Main, SocketAddr::new(o.ip(), self.server.port()), None);
                    let both = ChangeRequest::new(Some(ChangeRequestFlags::ChangeIp | ChangeRequestFlags::ChangePort));
                    self.start(now, Test::FilterIpPort, SocketId::Filtering, self.server, Some(both));
                    let port_only = ChangeRequest::new(Some(ChangeRequestFlags::ChangePort.into()));
                    self.start(now, Test::FilterPort, SocketId::Filtering, self.server, Some(port_only));
                }
                if self.report.nat == Some(true) {
                    self.start(now, Test::Hairpin, SocketId::Hairpin, m, None);
                }
            }
            Test::MapAltIp => {
                self.mapped[1] = mapped;
                if mapped.is_some() && mapped == self.mapped[0] {
                    self.report.mapping = Some(Behaviour::EndpointIndependent);
                } else if let Some(o) = self.other {
                    self.start(now, Test::MapAltIpPort, SocketId::Main, o, None);
                }
            }
            Test::MapAltIpPort => {
                self.mapped[2] = mapped;
                if mapped.is_some() {
                    self.report.mapping = Some(if mapped == self.mapped[1] {
                        Behaviour::AddressDependent
                    } else {
                        Behaviour::AddressAndPortDependent
                    });
                }
            }
            Test::Hairpin => self.report.hairpinning = Some(false),
            Test::FilterIpPort | Test::FilterPort => {
                self.filter[usize::from(test == Test::FilterPort)] = Some(answer.is_some());
                self.report.filtering = match self.filter {
                    [Some(true), _] => Some(Behaviour::EndpointIndependent),
                    [Some(false), Some(true)] => Some(Behaviour::AddressDependent),
                    [Some(false), Some(false)] => Some(Behaviour::AddressAndPortDependent),
                    _ => None,
                };
            }
            Test::Alloc(k) => {
                if let (Some(m), Some(l), Some(slot)) =
                    (mapped, self.local(SocketId::Allocation(k)), self.samples.get_mut(usize::from(k)))
                {
                    *slot = Some((m.port(), l.port()));
                }
                self.samples_left = self.samples_left.saturating_sub(1);
                if self.samples_left == 0 {
                    // In the order the samples were sent, which is the order the NAT mapped them.
                    self.report.ports = self.samples.iter().flatten().copied().collect();
                    self.report.allocation = classify_allocation(&self.report.ports);
                }
            }
        }
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
