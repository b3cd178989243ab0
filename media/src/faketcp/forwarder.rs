//! The server's fake-TCP forwarder, sans-IO: segments to the forwarder port (default 4443)
//! from agents whose networks drop UDP, each connection carrying one call leg's datagrams.
//!
//! A connection is a stranger until it proves which relay port it speaks for: its first
//! datagram must be a STUN Binding request with USERNAME = the port number and
//! MESSAGE-INTEGRITY keyed by the secret the server gave that leg in SDP ([`Forwarder::allow`]).
//! Then it is bound to that port (a later connection with the same proof replaces it: the
//! agent reconnected) and answered with a signed success response; datagrams both ways go
//! between it and the relay port. Everything else — an unauthenticated connection's data,
//! segments of unknown connections, a wrong key — is dropped and counted, and connections
//! are capped in total, per source address, and in how long they may stay unbound.
//!
//! When both legs of a call come over fake TCP, the owner asks the forwarder to introduce
//! them ([`Forwarder::introduce`]): each agent then tries a direct path to the other
//! (see [`super::direct`]), and this connection carries only keepalives while it holds.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{MessageIntegrity, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{HMACKey, MessageClass, MessageDecoderBuilder, StunAttribute, StunMessageBuilder};

use super::direct::{Introduction, START_DELAY};
use super::{Conn, Received, Segment, State, ACK, SYN};

/// Relay port 0 is the probe: `pinhole probe --faketcp` proves it with [`PROBE_KEY`] and
/// gets its datagrams echoed, to learn whether fake TCP gets through from where it is. The
/// handshake already proved the prober receives at its address, so this reflects nothing
/// to anyone else; echoes are still limited to [`PROBE_ECHOES`] per connection.
pub const PROBE_KEY: &str = "pinhole-faketcp-probe";
pub const PROBE_ECHOES: u32 = 2000;

/// A connection must authenticate within this long of its SYN.
pub const AUTH_WITHIN: Duration = Duration::from_secs(10);
/// A bound connection with nothing received for this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_source: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 4096, max_per_source: 64 }
    }
}

/// What the forwarder wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A TCP segment (header and payload, checksummed) from `from` to `to`.
    Segment { from: SocketAddrV4, to: SocketAddrV4, tcp: Vec<u8> },
    /// A datagram from the agent for the relay, as if it had arrived on relay port `port`.
    ToRelay { port: u16, datagram: Vec<u8> },
    /// A connection proved relay port `port` (a new one, or a reconnect): if the call's
    /// other leg is carried too, the owner may [`Forwarder::introduce`] the two.
    Bound { port: u16 },
}

/// Why something was dropped (the shell counts them in a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Discard {
    /// Not a segment of a connection we have (and not a SYN).
    Unknown,
    /// Over a connection cap.
    Refused,
    /// Data before the connection proved its port, or a proof that failed.
    Unauthenticated,
    /// Outside the connection's window, or out of place.
    Window,
}

struct Entry {
    conn: Conn,
    /// Our address on this connection (the segment's destination).
    local: SocketAddrV4,
    opened: Instant,
    last_heard: Instant,
    port: Option<u16>,
    echoes: u32,
}

pub struct Forwarder {
    /// The forwarder port (and address, unless unspecified: then any of ours).
    local: SocketAddrV4,
    limits: Limits,
    conns: HashMap<SocketAddrV4, Entry>,
    /// Keys by relay port, for the legs that may come over fake TCP.
    keys: HashMap<u16, String>,
    /// Which connection speaks for a relay port.
    bound: HashMap<u16, SocketAddrV4>,
    out: std::collections::VecDeque<Output>,
    drops: Vec<Discard>,
    /// Keys the ISNs and every other number a stranger must not predict (RFC 6528).
    secret: [u8; 32],
    /// The ISNs' clock starts here (RFC 6528's M: a 4 µs timer).
    epoch: Instant,
    /// Numbers drawn for introductions so far (each one keyed apart).
    drawn: u64,
    /// Keys for ports not [`Forwarder::allow`]ed: derived by the owner (from the call).
    lookup: Option<KeyLookup>,
    /// Pairs of connections introduced to each other (lower address first).
    introduced: std::collections::HashSet<(SocketAddrV4, SocketAddrV4)>,
}

/// Finds the key of a relay port's leg, if the port is in a call now.
pub type KeyLookup = Box<dyn Fn(u16) -> Option<String> + Send>;

impl Forwarder {
    /// A forwarder on `local`; `secret` keys its initial sequence numbers (random per
    /// process in pinhole), `epoch` starts their clock.
    pub fn new(local: SocketAddrV4, limits: Limits, secret: [u8; 32], epoch: Instant) -> Forwarder {
        Forwarder {
            local,
            limits,
            conns: HashMap::new(),
            keys: HashMap::new(),
            bound: HashMap::new(),
            out: std::collections::VecDeque::new(),
            drops: Vec::new(),
            secret,
            epoch,
            drawn: 0,
            lookup: None,
            introduced: std::collections::HashSet::new(),
        }
    }

    /// Relay port `port`'s leg may come over fake TCP, proving itself with `key`.
    pub fn allow(&mut self, port: u16, key: String) {
        self.keys.insert(port, key);
    }

    /// Where keys of ports not allowed one by one come from.
    pub fn set_lookup(&mut self, lookup: KeyLookup) {
        self.lookup = Some(lookup);
    }

    fn key_of(&self, port: u16) -> Option<String> {
        if port == 0 {
            return Some(PROBE_KEY.to_owned());
        }
        self.keys.get(&port).cloned().or_else(|| self.lookup.as_ref().and_then(|l| l(port)))
    }

    /// Relay ports carried now.
    pub fn carried(&self) -> impl Iterator<Item = u16> + '_ {
        self.bound.keys().copied()
    }

    /// The leg's call ended: its connection is unbound (and forgotten).
    pub fn revoke(&mut self, port: u16) {
        self.keys.remove(&port);
        if let Some(peer) = self.bound.remove(&port) {
            self.drop_conn(peer);
        }
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether relay port `port` is carried by a fake-TCP connection now.
    pub fn carries(&self, port: u16) -> bool {
        self.bound.contains_key(&port)
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_discard(&mut self) -> Option<Discard> {
        self.drops.pop()
    }

    /// RFC 6528: ISN = M + F(4-tuple, secret), M a 4 µs clock, F a keyed hash: one SYN-ACK
    /// tells nothing about the ISN of another connection, nor of this one when reopened.
    fn isn(&self, now: Instant, local: SocketAddrV4, peer: SocketAddrV4) -> u32 {
        let tuple = [local.ip().octets(), peer.ip().octets()].concat();
        let ports = [local.port().to_be_bytes(), peer.port().to_be_bytes()].concat();
        let f = crate::mac::hmac(&self.secret, "faketcp-isn", &[&tuple, &ports]);
        let m = (now.saturating_duration_since(self.epoch).as_micros() / 4) as u32;
        u32::from_be_bytes([f[0], f[1], f[2], f[3]]).wrapping_add(m)
    }

    /// A number no stranger can predict (introductions' ISNs and message ids).
    fn draw(&mut self) -> u32 {
        self.drawn += 1;
        let f = crate::mac::hmac(&self.secret, "faketcp-draw", &[&self.drawn.to_be_bytes()]);
        u32::from_be_bytes([f[0], f[1], f[2], f[3]])
    }

    fn flush(&mut self, peer: SocketAddrV4) {
        let Some(e) = self.conns.get_mut(&peer) else { return };
        while let Some(o) = e.conn.poll_transmit() {
            self.out.push_back(Output::Segment { from: e.local, to: peer, tcp: o.segment(e.local, peer) });
        }
    }

    /// A segment to the forwarder port.
    pub fn handle_segment(&mut self, now: Instant, s: &Segment<'_>) {
        let ours =
            s.dst.port() == self.local.port() && (self.local.ip().is_unspecified() || s.dst.ip() == self.local.ip());
        if !ours {
            return;
        }
        let peer = s.src;
        if !self.conns.contains_key(&peer) {
            if s.flags & (SYN | ACK) != SYN {
                self.drops.push(Discard::Unknown);
                return;
            }
            let from_source = self.conns.keys().filter(|p| p.ip() == peer.ip()).count();
            if self.conns.len() >= self.limits.max_connections || from_source >= self.limits.max_per_source {
                self.drops.push(Discard::Refused);
                return;
            }
            let isn = self.isn(now, s.dst, peer);
            let conn = Conn::accept(now, s.seq, isn);
            self.conns.insert(peer, Entry { conn, local: s.dst, opened: now, last_heard: now, port: None, echoes: 0 });
            self.flush(peer);
            return;
        }
        let Some(e) = self.conns.get_mut(&peer) else { return };
        e.last_heard = now;
        match e.conn.handle_segment(now, s) {
            Received::Data => {
                let datagram = s.payload;
                match e.port {
                    Some(0) if e.echoes < PROBE_ECHOES => {
                        e.echoes += 1;
                        e.conn.send(now, datagram);
                    }
                    Some(0) => {}
                    Some(port) => self.out.push_back(Output::ToRelay { port, datagram: datagram.to_vec() }),
                    None => self.authenticate(now, peer, datagram),
                }
            }
            Received::Control => {}
            Received::Dropped => self.drops.push(Discard::Window),
            Received::Reset => self.forget(peer),
        }
        self.flush(peer);
    }

    /// The first datagram of a connection: its proof of which relay port it speaks for.
    fn authenticate(&mut self, now: Instant, peer: SocketAddrV4, datagram: &[u8]) {
        let Some(port) = self.proves(datagram) else {
            self.drops.push(Discard::Unauthenticated);
            return;
        };
        // An earlier connection for this port (the agent reconnected) is let go; probes
        // share port 0 and are never bound.
        if port != 0 {
            if let Some(old) = self.bound.insert(port, peer) {
                if old != peer {
                    self.drop_conn(old);
                }
            }
        }
        let key = self.key_of(port).unwrap_or_default();
        let Some(e) = self.conns.get_mut(&peer) else { return };
        e.port = Some(port);
        if let Some(reply) = success(datagram, peer, &key) {
            e.conn.send(now, &reply);
        }
        if port != 0 {
            self.out.push_back(Output::Bound { port });
        }
    }

    /// Relay ports `a` and `b` are the two legs of one call, both carried here: tell each
    /// agent where the other's connection comes from, with both ISNs, a start and a check
    /// key (each told in a message signed with its own leg's key). False when either is not
    /// carried, or these two connections were introduced already.
    pub fn introduce(&mut self, now: Instant, a: u16, b: u16) -> bool {
        let (Some(&peer_a), Some(&peer_b)) = (self.bound.get(&a), self.bound.get(&b)) else { return false };
        if !self.introduced.insert((peer_a.min(peer_b), peer_a.max(peer_b))) {
            return false;
        }
        let (Some(key_a), Some(key_b)) = (self.key_of(a), self.key_of(b)) else { return false };
        let (isn_a, isn_b) = (self.draw(), self.draw());
        let check = Introduction::check_key(&key_a, &key_b, isn_a, isn_b);
        let intro = |peer, isn, peer_isn| Introduction { peer, isn, peer_isn, delay: START_DELAY, key: check.clone() };
        let told = [(peer_a, intro(peer_b, isn_a, isn_b), key_a), (peer_b, intro(peer_a, isn_b, isn_a), key_b)];
        for (to, intro, key) in told {
            let mut id = [0u8; 12];
            id[..4].copy_from_slice(&self.draw().to_be_bytes());
            id[4..8].copy_from_slice(&self.draw().to_be_bytes());
            let Some(bytes) = intro.encode(&key, id) else { return false };
            if let Some(e) = self.conns.get_mut(&to) {
                e.conn.send(now, &bytes);
            }
            self.flush(to);
        }
        true
    }

    /// The relay port `datagram` proves it may speak for, if it does.
    fn proves(&self, datagram: &[u8]) -> Option<u16> {
        let (msg, _) = MessageDecoderBuilder::default().build().decode(datagram).ok()?;
        if msg.method() != BINDING || msg.class() != MessageClass::Request {
            return None;
        }
        let Some(StunAttribute::UserName(user)) = msg.get::<UserName>() else { return None };
        let port: u16 = user.as_str().parse().ok()?;
        crate::stun::verified(datagram, &self.key_of(port)?).then_some(port)
    }

    /// A datagram the relay sends towards relay port `port`'s party: over its connection,
    /// if one speaks for it. False when none does (the relay sends it over UDP as usual).
    pub fn from_relay(&mut self, now: Instant, port: u16, datagram: &[u8]) -> bool {
        let Some(peer) = self.bound.get(&port).copied() else { return false };
        let Some(e) = self.conns.get_mut(&peer) else { return false };
        let sent = e.conn.send(now, datagram);
        self.flush(peer);
        sent
    }

    fn drop_conn(&mut self, peer: SocketAddrV4) -> Option<Entry> {
        self.introduced.retain(|(x, y)| *x != peer && *y != peer);
        self.conns.remove(&peer)
    }

    fn forget(&mut self, peer: SocketAddrV4) {
        if let Some(e) = self.drop_conn(peer) {
            if let Some(port) = e.port {
                if self.bound.get(&port) == Some(&peer) {
                    self.bound.remove(&port);
                }
            }
        }
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns
            .values()
            .flat_map(|e| {
                let limit = if e.port.is_some() { e.last_heard + IDLE } else { e.opened + AUTH_WITHIN };
                [e.conn.poll_timeout(), Some(limit)]
            })
            .flatten()
            .min()
    }

    /// Keepalives and handshake retries; connections that never proved themselves, went
    /// idle or failed their handshake are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        let dead: Vec<SocketAddrV4> = self
            .conns
            .iter()
            .filter(|(_, e)| {
                let expired = match e.port {
                    Some(_) => now >= e.last_heard + IDLE,
                    None => now >= e.opened + AUTH_WITHIN,
                };
                expired || e.conn.state() == State::Closed
            })
            .map(|(p, _)| *p)
            .collect();
        for p in dead {
            self.forget(p);
        }
        let peers: Vec<SocketAddrV4> = self.conns.keys().copied().collect();
        for p in peers {
            if let Some(e) = self.conns.get_mut(&p) {
                if e.conn.poll_timeout().is_some_and(|t| t <= now) {
                    e.conn.handle_timeout(now);
                }
            }
            self.flush(p);
        }
    }
}

/// The signed success response to an agent's proof.
fn success(request: &[u8], peer: SocketAddrV4, key: &str) -> Option<Vec<u8>> {
    let (msg, _) = MessageDecoderBuilder::default().build().decode(request).ok()?;
    let key = HMACKey::new_short_term(key).ok()?;
    let reply = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*msg.transaction_id())
        .with_attribute(XorMappedAddress::from(std::net::SocketAddr::V4(peer)))
        .with_attribute(MessageIntegrity::new(key))
        .build();
    crate::stun::encode(&reply)
}

/// The proof an agent sends first on its connection for relay port `port`.
pub fn proof(port: u16, key: &str, transaction: [u8; 12]) -> Option<Vec<u8>> {
    crate::stun::signed_binding(MessageClass::Request, transaction, Some(&port.to_string()), key)
}

#[cfg(test)]
mod tests;
