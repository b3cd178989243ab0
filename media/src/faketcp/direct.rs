//! A direct fake-TCP path between two agents whose networks both drop UDP, sans-IO.
//!
//! Both agents' tunnels end at the server's forwarder. When both legs of a call are there,
//! the forwarder introduces each agent to the other ([`Introduction`]): the other's mapped
//! address (the source of its connection, as the forwarder sees it), both initial
//! sequence numbers, a start delay and a key for checks, in a STUN indication signed with
//! the leg's own key. At the start, each opens a connection to the other from the local
//! port of its tunnel (a NAT that keeps ports maps it to the public port the forwarder
//! saw): a simultaneous open ([`Conn::simultaneous`]), each SYN opening its own NAT for
//! the other's. On the established connection each sends Binding checks signed with the
//! check key; media moves to it only when our checks are answered (make before break),
//! and goes back to the forwarder when answers stop for [`CONSENT`]. Not checked within
//! [`OPEN_WITHIN`] of the start (a NAT that changes ports, or drops the segments): given
//! up, and the forwarder carries the call on.

use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use stun_rs::attributes::stun::MessageIntegrity;
use stun_rs::attributes::turn::{Data, XorPeerAddress};
use stun_rs::methods::BINDING;
use stun_rs::{HMACKey, MessageClass, MessageDecoderBuilder, StunAttribute, StunMessageBuilder};

use super::{Conn, Received, Segment, State};

/// How long after the introduction both ends send their SYNs.
pub const START_DELAY: Duration = Duration::from_millis(200);
/// Checks go this often until one is answered, then every [`CONSENT_EVERY`].
pub const CHECK_EVERY: Duration = Duration::from_millis(200);
pub const CONSENT_EVERY: Duration = Duration::from_secs(1);
/// No check answered for this long: media goes back to the forwarder.
pub const CONSENT: Duration = Duration::from_secs(3);
/// Not checked this long after the start: given up.
pub const OPEN_WITHIN: Duration = Duration::from_secs(5);

/// What the forwarder tells each agent about the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introduction {
    /// The peer's connection source, as the forwarder sees it.
    pub peer: SocketAddrV4,
    /// Our ISN and the peer's, for the simultaneous open.
    pub isn: u32,
    pub peer_isn: u32,
    /// When to send the SYN, after the introduction arrives.
    pub delay: Duration,
    /// The key both ends sign their checks with.
    pub key: String,
}

impl Introduction {
    /// The check key for a pair of legs: unpredictable without their keys, the same for both.
    pub fn check_key(key_a: &str, key_b: &str, isn_a: u32, isn_b: u32) -> String {
        let mut h = Sha256::new();
        for part in [b"pinhole direct fake-TCP".as_slice(), key_a.as_bytes(), key_b.as_bytes()] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part);
        }
        h.update(isn_a.to_be_bytes());
        h.update(isn_b.to_be_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// As the forwarder sends it over a leg's connection: a Binding indication with
    /// XOR-PEER-ADDRESS and DATA (our ISN, the peer's, the delay in ms, the check key),
    /// signed with the leg's key.
    pub fn encode(&self, leg_key: &str, transaction: [u8; 12]) -> Option<Vec<u8>> {
        let mut data = Vec::with_capacity(10 + self.key.len());
        data.extend_from_slice(&self.isn.to_be_bytes());
        data.extend_from_slice(&self.peer_isn.to_be_bytes());
        data.extend_from_slice(&(self.delay.as_millis().min(u128::from(u16::MAX)) as u16).to_be_bytes());
        data.extend_from_slice(self.key.as_bytes());
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Indication)
            .with_transaction_id(stun_rs::TransactionId::from(transaction))
            .with_attribute(XorPeerAddress::from(SocketAddr::V4(self.peer)))
            .with_attribute(Data::from(data))
            .with_attribute(MessageIntegrity::new(HMACKey::new_short_term(leg_key).ok()?))
            .build();
        crate::stun::encode(&msg)
    }

    /// An introduction signed with `leg_key`, if `datagram` is one.
    pub fn decode(datagram: &[u8], leg_key: &str) -> Option<Introduction> {
        let (msg, _) = MessageDecoderBuilder::default().build().decode(datagram).ok()?;
        if msg.method() != BINDING
            || msg.class() != MessageClass::Indication
            || !crate::stun::verified(datagram, leg_key)
        {
            return None;
        }
        let Some(StunAttribute::XorPeerAddress(peer)) = msg.get::<XorPeerAddress>() else { return None };
        let SocketAddr::V4(peer) = *peer.socket_address() else { return None };
        let Some(StunAttribute::Data(data)) = msg.get::<Data>() else { return None };
        let d = data.as_bytes();
        if d.len() < 10 {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
        Some(Introduction {
            peer,
            isn: word(0),
            peer_isn: word(4),
            delay: Duration::from_millis(u64::from(u16::from_be_bytes([d[8], d[9]]))),
            key: String::from_utf8(d[10..].to_vec()).ok()?,
        })
    }
}

/// Where the direct path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectPhase {
    /// Introduced; the SYN goes at the start.
    Waiting,
    /// Opening, or open and checking.
    Opening,
    /// Our checks are answered: media goes this way.
    Up,
    /// Never checked, or answers stopped: the forwarder carries the call.
    Failed,
}

pub struct Direct {
    intro: Introduction,
    local: SocketAddrV4,
    start: Instant,
    conn: Conn,
    phase: DirectPhase,
    check_id: [u8; 12],
    next_check: Instant,
    answered: Option<Instant>,
    /// A valid check came from the peer: what it sends is the peer's media.
    heard: bool,
    out: VecDeque<(SocketAddrV4, Vec<u8>)>,
    rng: u64,
}

impl Direct {
    /// A path from our `local` address (the tunnel's) as introduced at `now`.
    pub fn new(now: Instant, local: SocketAddrV4, intro: Introduction, seed: u64) -> Direct {
        let start = now + intro.delay;
        let mut conn = Conn::simultaneous(start, intro.isn, intro.peer_isn);
        while conn.poll_transmit().is_some() {} // the SYN goes at the start, not now
        Direct {
            intro,
            local,
            start,
            conn,
            phase: DirectPhase::Waiting,
            check_id: [0; 12],
            next_check: start,
            answered: None,
            heard: false,
            out: VecDeque::new(),
            rng: seed | 1,
        }
    }

    pub fn introduction(&self) -> &Introduction {
        &self.intro
    }

    pub fn phase(&self) -> DirectPhase {
        self.phase
    }

    pub fn is_up(&self) -> bool {
        self.phase == DirectPhase::Up
    }

    /// A datagram for the peer: `false` unless the path is up.
    pub fn send(&mut self, now: Instant, datagram: &[u8]) -> bool {
        if !self.is_up() {
            return false;
        }
        let sent = self.conn.send(now, datagram);
        self.flush();
        sent
    }

    /// Whether segment `s` is this path's (from the peer to our address).
    pub fn owns(&self, s: &Segment<'_>) -> bool {
        s.src == self.intro.peer && s.dst == self.local
    }

    /// A segment of this path: the peer's media in it, once the peer has passed a check.
    pub fn handle_segment<'a>(&mut self, now: Instant, s: &Segment<'a>) -> Option<&'a [u8]> {
        if matches!(self.phase, DirectPhase::Waiting | DirectPhase::Failed) {
            return None;
        }
        let r = self.conn.handle_segment(now, s);
        let mut media = None;
        match r {
            Received::Data if crate::stun::looks_like_stun(s.payload) => self.on_check(now, s.payload),
            Received::Data if self.heard || self.is_up() => media = Some(s.payload),
            Received::Reset if self.is_up() => self.phase = DirectPhase::Failed,
            // A reset while opening (a NAT box that answers for itself): open again.
            Received::Reset => self.conn = Conn::simultaneous(now, self.intro.isn, self.intro.peer_isn),
            _ => {}
        }
        if self.conn.state() == State::Established && self.check_id == [0; 12] {
            self.check(now);
        }
        self.flush();
        media
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.rng >> 16
    }

    fn check(&mut self, now: Instant) {
        let mut id = [0u8; 12];
        id[..8].copy_from_slice(&self.random().to_be_bytes());
        id[8..].copy_from_slice(&(self.random() as u32).to_be_bytes());
        self.check_id = id;
        if let Some(bytes) = crate::stun::signed_binding(MessageClass::Request, id, Some("direct"), &self.intro.key) {
            self.conn.send(now, &bytes);
        }
        self.next_check = now + if self.answered.is_some() { CONSENT_EVERY } else { CHECK_EVERY };
    }

    /// A check from the peer (answered, signed) or the answer to ours.
    fn on_check(&mut self, now: Instant, datagram: &[u8]) {
        if !crate::stun::verified(datagram, &self.intro.key) {
            return;
        }
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(datagram) else { return };
        match msg.class() {
            MessageClass::Request => {
                self.heard = true;
                let id = *msg.transaction_id().as_bytes();
                if let Some(bytes) =
                    crate::stun::signed_binding(MessageClass::SuccessResponse, id, None, &self.intro.key)
                {
                    self.conn.send(now, &bytes);
                }
            }
            MessageClass::SuccessResponse if msg.transaction_id().as_bytes() == &self.check_id => {
                self.answered = Some(now);
                if self.phase == DirectPhase::Opening {
                    self.phase = DirectPhase::Up;
                    self.next_check = now + CONSENT_EVERY;
                }
            }
            _ => {}
        }
    }

    fn flush(&mut self) {
        while let Some(o) = self.conn.poll_transmit() {
            self.out.push_back((self.intro.peer, o.segment(self.local, self.intro.peer)));
        }
    }

    /// A TCP segment (header and payload) to send from our address to the one given.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(SocketAddrV4, Vec<u8>)> {
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            DirectPhase::Waiting => Some(self.start),
            DirectPhase::Failed => None,
            DirectPhase::Opening | DirectPhase::Up => {
                let check = (self.conn.state() == State::Established).then_some(self.next_check);
                let give_up = match self.answered {
                    None => self.start + OPEN_WITHIN,
                    Some(t) => t + CONSENT,
                };
                [self.conn.poll_timeout(), check, Some(give_up)].into_iter().flatten().min()
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            DirectPhase::Waiting if now >= self.start => {
                self.phase = DirectPhase::Opening;
                self.conn = Conn::simultaneous(now, self.intro.isn, self.intro.peer_isn);
            }
            DirectPhase::Opening | DirectPhase::Up => {
                let silent = match self.answered {
                    None => now >= self.start + OPEN_WITHIN,
                    Some(t) => now >= t + CONSENT,
                };
                if silent || self.conn.state() == State::Closed {
                    self.phase = DirectPhase::Failed;
                    return;
                }
                if self.conn.poll_timeout().is_some_and(|t| t <= now) {
                    self.conn.handle_timeout(now);
                }
                if self.conn.state() == State::Established && now >= self.next_check {
                    self.check(now);
                }
            }
            _ => {}
        }
        self.flush();
    }
}

#[cfg(test)]
mod tests;
