//! An agent's fake-TCP tunnel for one call leg, sans-IO: a connection to the server's
//! forwarder from a local port of its own, the leg's proof as its first datagram, then the
//! leg's datagrams both ways. A reset, a handshake that goes unanswered, a proof that goes
//! unanswered, or a connection gone dead (nothing heard from the forwarder, or our data
//! unacknowledged, for [`super::DEAD_AFTER`]: a forwarder that lost it to a blind reset
//! or a restart) opens a new connection from the next local port, and the call goes on.
//!
//! When the forwarder introduces the agent at the other end of the call (both legs came
//! over fake TCP), the tunnel also opens a [`Direct`] path to it; while that path is up
//! the leg's datagrams go that way, and the connection to the forwarder carries only a
//! signed keepalive every [`RELAY_KEEPALIVE`] (it holds the relay's call open).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use stun_rs::{MessageClass, MessageDecoderBuilder};

use super::direct::{Direct, DirectPhase, Introduction};
use super::forwarder::proof;
use super::{Conn, Received, Segment, State};

/// A proof unanswered this long: reconnect.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(3);
/// While media goes direct, the forwarder's connection carries a keepalive this often.
pub const RELAY_KEEPALIVE: Duration = Duration::from_secs(2);

/// Where the tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    /// Established; the proof is out.
    Proving,
    /// The forwarder answered the proof: datagrams flow.
    Up,
}

pub struct Tunnel {
    local: SocketAddrV4,
    server: SocketAddrV4,
    /// The relay port this leg speaks for, and its key.
    port: u16,
    key: String,
    /// Local ports to take connections from, cycling.
    ports: (u16, u16),
    conn: Conn,
    phase: Phase,
    proof_id: [u8; 12],
    proof_sent: Option<Instant>,
    out: std::collections::VecDeque<(SocketAddrV4, Vec<u8>)>,
    rng: u64,
    /// Connections opened (1 + reconnects).
    pub connections: u32,
    /// The direct path to the other end, once introduced.
    direct: Option<Direct>,
    next_keepalive: Instant,
}

impl Tunnel {
    /// A tunnel from `local` (its port the first of `ports`) to the forwarder `server`, for
    /// relay port `port` proven with `key`.
    pub fn new(
        now: Instant,
        local: SocketAddrV4,
        ports: (u16, u16),
        server: SocketAddrV4,
        port: u16,
        key: String,
        seed: u64,
    ) -> Tunnel {
        let mut t = Tunnel {
            local: SocketAddrV4::new(*local.ip(), ports.0),
            server,
            port,
            key,
            ports,
            conn: Conn::connect(now, 0),
            phase: Phase::Connecting,
            proof_id: [0; 12],
            proof_sent: None,
            out: std::collections::VecDeque::new(),
            rng: seed | 1,
            connections: 0,
            direct: None,
            next_keepalive: now,
        };
        t.open(now, ports.0);
        t
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.rng >> 16
    }

    fn open(&mut self, now: Instant, local_port: u16) {
        self.local.set_port(local_port);
        let isn = self.random() as u32;
        self.conn = Conn::connect(now, isn);
        self.phase = Phase::Connecting;
        self.proof_sent = None;
        self.connections += 1;
        self.flush();
    }

    /// A new connection from the next local port.
    fn reconnect(&mut self, now: Instant) {
        let (lo, hi) = self.ports;
        let next = if self.local.port() >= hi { lo } else { self.local.port() + 1 };
        self.open(now, next);
    }

    /// The local address of the current connection (the shell's raw socket filters on it).
    pub fn local(&self) -> SocketAddrV4 {
        self.local
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Where the direct path stands, if the forwarder introduced one.
    pub fn direct(&self) -> Option<DirectPhase> {
        self.direct.as_ref().map(Direct::phase)
    }

    fn direct_up(&self) -> bool {
        self.direct.as_ref().is_some_and(Direct::is_up)
    }

    fn flush(&mut self) {
        while let Some(o) = self.conn.poll_transmit() {
            self.out.push_back((self.server, o.segment(self.local, self.server)));
        }
        if let Some(d) = &mut self.direct {
            while let Some(t) = d.poll_transmit() {
                self.out.push_back(t);
            }
        }
    }

    /// A TCP segment (header and payload) to send from [`Tunnel::local`] to the address given.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(SocketAddrV4, Vec<u8>)> {
        self.out.pop_front()
    }

    /// A datagram of the leg towards the relay: `false` while the tunnel is not up.
    pub fn send(&mut self, now: Instant, datagram: &[u8]) -> bool {
        if self.phase != Phase::Up {
            return false;
        }
        let sent = match &mut self.direct {
            Some(d) if d.is_up() => d.send(now, datagram),
            _ => self.conn.send(now, datagram),
        };
        self.flush();
        sent
    }

    /// A segment from the forwarder; returns the leg's datagram it carried, if any.
    pub fn handle_segment<'a>(&mut self, now: Instant, s: &Segment<'a>) -> Option<&'a [u8]> {
        if let Some(d) = self.direct.as_mut().filter(|d| d.owns(s)) {
            let data = d.handle_segment(now, s);
            self.flush();
            return data;
        }
        if s.src != self.server || s.dst != self.local {
            return None;
        }
        let r = self.conn.handle_segment(now, s);
        let mut data = None;
        match r {
            Received::Data if self.phase == Phase::Proving && self.answers_proof(s.payload) => self.phase = Phase::Up,
            // Indications are ours (introductions; the other agent's keepalives the relay
            // passed on), never the phone's.
            Received::Data if self.phase == Phase::Up && is_indication(s.payload) => {
                if let Some(intro) = Introduction::decode(s.payload, &self.key) {
                    self.introduced(now, intro);
                }
            }
            Received::Data if self.phase == Phase::Up => data = Some(s.payload),
            Received::Reset => self.reconnect(now),
            _ => {}
        }
        if self.phase == Phase::Connecting && self.conn.state() == State::Established {
            self.prove(now);
        }
        self.flush();
        data
    }

    /// The forwarder introduced the other end: open a direct path to it (again, if this
    /// is a new introduction; a repeated one changes nothing).
    fn introduced(&mut self, now: Instant, intro: Introduction) {
        if self.direct.as_ref().is_some_and(|d| d.introduction() == &intro) {
            return;
        }
        let seed = self.random();
        self.direct = Some(Direct::new(now, self.local, intro, seed));
    }

    fn prove(&mut self, now: Instant) {
        let mut id = [0u8; 12];
        id[..8].copy_from_slice(&self.random().to_be_bytes());
        id[8..].copy_from_slice(&(self.random() as u32).to_be_bytes());
        self.proof_id = id;
        if let Some(p) = proof(self.port, &self.key, id) {
            self.phase = Phase::Proving;
            self.proof_sent = Some(now);
            self.conn.send(now, &p);
        }
    }

    /// Whether `datagram` is the forwarder's signed answer to our proof.
    fn answers_proof(&self, datagram: &[u8]) -> bool {
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(datagram) else { return false };
        msg.class() == MessageClass::SuccessResponse
            && msg.transaction_id().as_bytes() == &self.proof_id
            && crate::stun::verified(datagram, &self.key)
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let proof = self.proof_sent.filter(|_| self.phase == Phase::Proving).map(|t| t + PROOF_TIMEOUT);
        let keepalive = self.direct_up().then_some(self.next_keepalive);
        let direct = self.direct.as_ref().and_then(Direct::poll_timeout);
        [self.conn.poll_timeout(), self.conn.dead_at(), proof, keepalive, direct].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        if let Some(d) = self.direct.as_mut().filter(|d| d.poll_timeout().is_some_and(|t| t <= now)) {
            d.handle_timeout(now);
        }
        if self.direct_up() && now >= self.next_keepalive {
            self.next_keepalive = now + RELAY_KEEPALIVE;
            let id = self.random();
            if let Some(k) = keepalive(&self.key, id) {
                self.conn.send(now, &k);
            }
        }
        let proof_lost = self.phase == Phase::Proving && self.proof_sent.is_some_and(|t| now >= t + PROOF_TIMEOUT);
        if self.conn.state() == State::Closed || proof_lost || self.conn.dead(now) {
            self.reconnect(now);
        }
        self.flush();
    }
}

/// Whether `datagram` is a STUN indication (class bits 01).
fn is_indication(datagram: &[u8]) -> bool {
    crate::stun::looks_like_stun(datagram) && datagram[0] & 0x01 == 0 && datagram[1] & 0x10 != 0
}

/// A Binding indication signed with the leg's key: holds the relay's call open while the
/// media goes direct.
fn keepalive(key: &str, id: u64) -> Option<Vec<u8>> {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&id.to_be_bytes());
    crate::stun::signed_binding(MessageClass::Indication, t, None, key)
}

#[cfg(test)]
mod tests;
