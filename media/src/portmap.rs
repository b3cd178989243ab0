//! Asking the LAN's gateway for a port mapping, sans-IO: PCP MAP (RFC 6887) first, NAT-PMP
//! (RFC 6886) when the gateway says it speaks only that (or does not answer PCP), nothing
//! when neither answers. A mapping is renewed at half its lifetime and deleted (lifetime 0)
//! when released. Answers count only from the gateway's port 5351, and only when they
//! answer what we asked (PCP's nonce, the opcode and our internal port).
//!
//! The shell sends [`PortMapper::poll_transmit`]'s datagrams to the gateway from any
//! socket of the agent's, feeds back what comes from the gateway, and calls
//! [`PortMapper::handle_timeout`] when due.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The port PCP and NAT-PMP servers listen on.
pub const PORT: u16 = 5351;
/// Requests are sent again after these delays from the first; then that protocol is given
/// up (RFC 6886 starts at 250 ms and doubles; a LAN gateway answers in milliseconds).
const RETRIES: [Duration; 3] = [Duration::from_millis(0), Duration::from_millis(250), Duration::from_millis(750)];
const GIVE_UP: Duration = Duration::from_millis(1500);
/// The longest lifetime asked for; a gateway may grant less.
pub const MAX_LIFETIME: u32 = 7200;

/// Which protocol a mapping came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pcp,
    Pmp,
}

impl Protocol {
    /// The `portmap=` token of a `Pinhole-NAT` profile.
    pub fn token(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::Pmp => "pmp",
        }
    }

    /// The protocol a `portmap=` token names.
    pub fn from_token(token: &str) -> Option<Protocol> {
        [Protocol::Pcp, Protocol::Pmp].into_iter().find(|p| p.token().eq_ignore_ascii_case(token))
    }
}

/// A mapping the gateway granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub protocol: Protocol,
    /// The public address packets to the internal port arrive at, from anyone.
    pub external: SocketAddrV4,
    pub lifetime: Duration,
    /// When it was granted (renewed at half its lifetime from here).
    pub granted: Instant,
}

impl Mapping {
    /// Whether the mapping's public address is the one the world sees us at (`seen`, from
    /// STUN). Behind a second NAT (a carrier's, beyond the home gateway) it is not: the
    /// gateway's "public" address is itself private, and a mapping there opens nothing.
    pub fn is_public_at(&self, seen: IpAddr) -> bool {
        IpAddr::V4(*self.external.ip()) == seen
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Asking with this protocol since `first`.
    Asking {
        protocol: Protocol,
        first: Instant,
        sent: usize,
    },
    Mapped(Mapping),
    /// Neither protocol answered, or the gateway refused.
    Failed,
    Released,
}

pub struct PortMapper {
    gateway: SocketAddr,
    client: Ipv4Addr,
    internal_port: u16,
    lifetime: u32,
    nonce: [u8; 12],
    state: State,
    /// NAT-PMP asks the external address in a request of its own.
    pmp_external: Option<Ipv4Addr>,
    out: VecDeque<Vec<u8>>,
}

impl PortMapper {
    /// Asks `gateway` for a mapping of UDP port `internal_port` of `client` (our LAN
    /// address) for `lifetime` seconds (at most [`MAX_LIFETIME`]); `nonce` identifies our
    /// PCP requests (random).
    pub fn new(
        now: Instant,
        gateway: Ipv4Addr,
        client: Ipv4Addr,
        internal_port: u16,
        lifetime: u32,
        nonce: [u8; 12],
    ) -> PortMapper {
        let mut m = PortMapper {
            gateway: SocketAddr::new(IpAddr::V4(gateway), PORT),
            client,
            internal_port,
            lifetime: lifetime.clamp(1, MAX_LIFETIME),
            nonce,
            state: State::Asking { protocol: Protocol::Pcp, first: now, sent: 0 },
            pmp_external: None,
            out: VecDeque::new(),
        };
        m.handle_timeout(now);
        m
    }

    /// The mapping, while there is one.
    pub fn mapping(&self) -> Option<Mapping> {
        match self.state {
            State::Mapped(m) => Some(m),
            _ => None,
        }
    }

    /// Whether asking is over without a mapping (the gateway has neither protocol, or said no).
    pub fn failed(&self) -> bool {
        self.state == State::Failed
    }

    /// The next datagram for the gateway (always to [`PortMapper::gateway`]).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Asking { first, sent, .. } => Some(first + RETRIES.get(sent).copied().unwrap_or(GIVE_UP)),
            State::Mapped(m) => Some(m.granted + m.lifetime / 2),
            State::Failed | State::Released => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Asking { protocol, first, sent } => {
                if sent < RETRIES.len() && now >= first + RETRIES[sent] {
                    self.send(protocol, self.lifetime);
                    self.state = State::Asking { protocol, first, sent: sent + 1 };
                } else if sent >= RETRIES.len() && now >= first + GIVE_UP {
                    // PCP unanswered: perhaps NAT-PMP; NAT-PMP unanswered: nothing here.
                    self.state = match protocol {
                        Protocol::Pcp => State::Asking { protocol: Protocol::Pmp, first: now, sent: 0 },
                        Protocol::Pmp => State::Failed,
                    };
                    if !self.failed() {
                        self.handle_timeout(now);
                    }
                }
            }
            State::Mapped(m) if now >= m.granted + m.lifetime / 2 => {
                // Renewal: asked again as at first, with the same protocol.
                self.state = State::Asking { protocol: m.protocol, first: now, sent: 0 };
                self.handle_timeout(now);
            }
            _ => {}
        }
    }

    /// Deletes the mapping (lifetime 0), if there is one.
    pub fn release(&mut self) {
        if let State::Mapped(m) = self.state {
            self.send(m.protocol, 0);
        }
        self.state = State::Released;
    }

    fn send(&mut self, protocol: Protocol, lifetime: u32) {
        match protocol {
            Protocol::Pcp => self.out.push_back(pcp_map_request(self.client, self.internal_port, lifetime, self.nonce)),
            Protocol::Pmp => {
                if self.pmp_external.is_none() {
                    self.out.push_back(vec![0, 0]);
                }
                let mut r = vec![0, 1, 0, 0];
                r.extend_from_slice(&self.internal_port.to_be_bytes());
                r.extend_from_slice(&self.internal_port.to_be_bytes());
                r.extend_from_slice(&lifetime.to_be_bytes());
                self.out.push_back(r);
            }
        }
    }

    /// A datagram from `from`: only the gateway's answers to what we asked count.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if from != self.gateway {
            return;
        }
        let State::Asking { protocol, .. } = self.state else { return };
        match (protocol, data.first()) {
            (Protocol::Pcp, Some(2)) => self.on_pcp(now, data),
            // A NAT-PMP-only gateway answers a PCP request with NAT-PMP's "unsupported version".
            (Protocol::Pcp, Some(0))
                if data.len() >= 4 && data[1] & 0x80 != 0 && u16::from_be_bytes([data[2], data[3]]) == 1 =>
            {
                self.state = State::Asking { protocol: Protocol::Pmp, first: now, sent: 0 };
                self.handle_timeout(now);
            }
            (Protocol::Pmp, Some(0)) => self.on_pmp(now, data),
            _ => {}
        }
    }

    fn on_pcp(&mut self, now: Instant, d: &[u8]) {
        // 24-byte header, 36-byte MAP payload.
        if d.len() < 60 || d[1] != 0x81 {
            return;
        }
        let result = d[3];
        let payload = &d[24..60];
        if payload[..12] != self.nonce
            || payload[12] != 17
            || u16::from_be_bytes([payload[16], payload[17]]) != self.internal_port
        {
            return; // not an answer to us
        }
        if result != 0 {
            // NOT_AUTHORIZED, NO_RESOURCES, …: no mapping from this gateway.
            self.state = State::Failed;
            return;
        }
        let lifetime = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
        let port = u16::from_be_bytes([payload[18], payload[19]]);
        let ip = &payload[20..36];
        if ip[..12] != [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] || lifetime == 0 || port == 0 {
            return;
        }
        let external = SocketAddrV4::new(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), port);
        self.mapped(now, Protocol::Pcp, external, lifetime);
    }

    fn on_pmp(&mut self, now: Instant, d: &[u8]) {
        if d.len() < 8 {
            return;
        }
        let (op, result) = (d[1], u16::from_be_bytes([d[2], d[3]]));
        if result != 0 {
            if op == 128 || op == 129 {
                self.state = State::Failed;
            }
            return;
        }
        match op {
            128 if d.len() >= 12 => self.pmp_external = Some(Ipv4Addr::new(d[8], d[9], d[10], d[11])),
            129 if d.len() >= 16 => {
                if u16::from_be_bytes([d[8], d[9]]) != self.internal_port {
                    return;
                }
                let port = u16::from_be_bytes([d[10], d[11]]);
                let lifetime = u32::from_be_bytes([d[12], d[13], d[14], d[15]]);
                let (Some(ip), true) = (self.pmp_external, port != 0 && lifetime != 0) else { return };
                self.mapped(now, Protocol::Pmp, SocketAddrV4::new(ip, port), lifetime);
            }
            _ => {}
        }
    }

    fn mapped(&mut self, now: Instant, protocol: Protocol, external: SocketAddrV4, lifetime: u32) {
        let lifetime = Duration::from_secs(u64::from(lifetime.min(self.lifetime)));
        self.state = State::Mapped(Mapping { protocol, external, lifetime, granted: now });
    }
}

/// A PCP MAP request (RFC 6887 §11.1) for UDP `port` of `client`, any external port.
fn pcp_map_request(client: Ipv4Addr, port: u16, lifetime: u32, nonce: [u8; 12]) -> Vec<u8> {
    let mut r = vec![2, 1, 0, 0];
    r.extend_from_slice(&lifetime.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    r.extend_from_slice(&client.octets());
    r.extend_from_slice(&nonce);
    r.extend_from_slice(&[17, 0, 0, 0]);
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&port.to_be_bytes()); // suggested: the same port
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0]);
    r
}

#[cfg(test)]
mod tests;
