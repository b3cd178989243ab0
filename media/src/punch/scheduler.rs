//! Carrying out one side of a punch plan, sans-IO, in virtual time.
//!
//! Every probe is a STUN Binding request signed with the plan's short-term credentials
//! (USERNAME `peer:us`, MESSAGE-INTEGRITY keyed by the peer's password, as ICE does), so a
//! path is adopted only after a check succeeded in both directions: we answered the peer's
//! signed request, and the peer answered ours. Nothing unsigned is ever adopted. What a
//! side sends depends on the method and its role in it: null packets to open its own NAT,
//! checks at the peer's window, a window of predicted ports, a lockstep walk, or the
//! birthday spray. A check from the peer is answered and met with a check of our own back
//! to where it came from (a triggered check), so the first packet through wins.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{MessageIntegrity, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{HMACKey, MessageClass, MessageDecoderBuilder, StunAttribute, StunMessageBuilder, TransactionId};

use super::Strategy;
use crate::relay::Side;
use crate::stun::{encode, verified};

/// Spacing of probes in a spray (shotgun, birthday: 1 024 in about a second); checks at a
/// known address repeat at [`RETRY`]; a birthday's hard side checks from one socket after
/// another every [`HARD_PACE`] (256 sockets in about a quarter second).
const SPRAY_PACE: Duration = Duration::from_millis(1);
const HARD_PACE: Duration = Duration::from_millis(1);
const RETRY: Duration = Duration::from_millis(50);
/// Checks at a known address slow down to this after [`RETRY_FAST_FOR`] without an answer
/// (as ICE backs off its retransmissions): 20 + 20 checks in the five seconds.
const RETRY_SLOW: Duration = Duration::from_millis(200);
const RETRY_FAST_FOR: Duration = Duration::from_secs(1);
/// A prediction's spray stops after this many probes (about 31 walks of its window).
const MAX_SPRAY: u32 = 1024;
/// A birthday's hard side checks from each of its sockets this many times.
const HARD_ROUNDS: u32 = 4;
/// Packets a plan may send to addresses that have not answered it, whatever the method:
/// the most one answered call can make an agent send anywhere (every one of them to the
/// peer's address the server observed, see [`Puncher::handle_input`]).
pub const MAX_UNANSWERED: u32 = 2100;
/// Lockstep: time per step, the same on both sides.
const STEP: Duration = Duration::from_millis(20);
/// Give up after this long without a path.
pub const PUNCH_DEADLINE: Duration = Duration::from_secs(5);

/// How many sockets `side` of a plan with `strategy` punches from: one, or the birthday's
/// many on its hard side.
pub fn sockets_for(strategy: Strategy, side: Side) -> usize {
    match strategy {
        Strategy::Birthday { hard, sockets, .. } if hard == side => usize::from(sockets.max(1)),
        _ => 1,
    }
}

/// The short-term credentials of a plan (ICE-style ufrag and password per side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub local_ufrag: String,
    pub local_pwd: String,
    pub remote_ufrag: String,
    pub remote_pwd: String,
}

/// One side's part of a plan.
#[derive(Debug, Clone)]
pub struct PunchPlan {
    pub strategy: Strategy,
    /// Which side of the plan we are.
    pub side: Side,
    /// Both sides' windows (public address of the media socket), A then B.
    pub windows: [SocketAddr; 2],
    pub credentials: Credentials,
    /// When both sides start.
    pub start: Instant,
}

/// A datagram to send from socket `socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchTransmit {
    pub socket: usize,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

pub struct Puncher {
    plan: PlanView,
    creds: Credentials,
    out: std::collections::VecDeque<PunchTransmit>,
    next: Option<Instant>,
    /// Probes sent in the current spray or walk.
    sent: u32,
    rng: u64,
    /// Transactions of our checks: (id, socket, destination).
    checks: Vec<(TransactionId, usize, SocketAddr)>,
    /// Peers whose signed request we answered, per socket.
    heard: Vec<(usize, SocketAddr)>,
    /// Peers that answered our signed request, per socket.
    answered: Vec<(usize, SocketAddr)>,
    path: Option<(usize, SocketAddr)>,
    /// When the adopted path last answered one of our checks.
    last_answer: Option<Instant>,
    deadline: Instant,
    start: Instant,
    /// Packets sent to addresses that had not answered ([`MAX_UNANSWERED`] at most).
    unanswered: u32,
    /// Datagrams from an address other than the peer's (by IP), ignored.
    foreign: u64,
}

/// Checks remembered at most (a birthday spray sends 1 024; consent checks go on all call).
const MAX_CHECKS: usize = 4096;

/// The plan from our side's point of view.
#[derive(Debug, Clone, Copy)]
struct PlanView {
    strategy: Strategy,
    side: Side,
    peer: SocketAddr,
}

impl Puncher {
    pub fn new(plan: PunchPlan, seed: u64) -> Puncher {
        let idx = |s: Side| s as usize;
        let view = PlanView { strategy: plan.strategy, side: plan.side, peer: plan.windows[idx(plan.side.other())] };
        Puncher {
            plan: view,
            creds: plan.credentials,
            out: std::collections::VecDeque::new(),
            next: view.strategy.is_direct().then_some(plan.start),
            sent: 0,
            rng: seed | 1,
            checks: Vec::new(),
            heard: Vec::new(),
            answered: Vec::new(),
            path: None,
            last_answer: None,
            deadline: plan.start + PUNCH_DEADLINE,
            start: plan.start,
            unanswered: 0,
            foreign: 0,
        }
    }

    /// Packets sent so far to addresses that had not answered.
    pub fn unanswered_sent(&self) -> u32 {
        self.unanswered
    }

    /// Datagrams ignored because they came from another IP than the peer's.
    pub fn foreign(&self) -> u64 {
        self.foreign
    }

    /// The next retry of a check at a known address, slower once the first second passed.
    fn retry(&self, due: Instant) -> Instant {
        due + if due.saturating_duration_since(self.start) < RETRY_FAST_FOR { RETRY } else { RETRY_SLOW }
    }

    /// Whether one more packet may go to `to`: always to an address that answered, and to
    /// others within the plan's budget (counted here).
    fn budget(&mut self, socket: usize, to: SocketAddr) -> bool {
        if self.answered.contains(&(socket, to)) {
            return true;
        }
        if self.unanswered >= MAX_UNANSWERED {
            return false;
        }
        self.unanswered += 1;
        true
    }

    /// How many sockets this side needs (the hard side of a birthday opens many).
    pub fn sockets(&self) -> usize {
        sockets_for(self.plan.strategy, self.plan.side)
    }

    /// The adopted path: our socket and the peer's address, once checks succeeded both ways.
    pub fn path(&self) -> Option<(usize, SocketAddr)> {
        self.path
    }

    /// Whether `from` proved it holds the plan's credentials by a signed check to `socket`:
    /// its media may be taken.
    pub fn accepts(&self, socket: usize, from: SocketAddr) -> bool {
        self.heard.contains(&(socket, from))
    }

    /// When the adopted path last answered one of our checks (consent, RFC 7675).
    pub fn last_answer(&self) -> Option<Instant> {
        self.last_answer
    }

    /// A consent check on the adopted path (or any path): a signed request whose answer
    /// shows in [`Puncher::last_answer`].
    pub fn consent_check(&mut self, socket: usize, to: SocketAddr) {
        self.check(socket, to);
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<PunchTransmit> {
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next.filter(|_| self.path.is_none())
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.rng >> 33
    }

    /// A signed Binding request to `to` from `socket`.
    fn check(&mut self, socket: usize, to: SocketAddr) {
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.random().to_be_bytes());
        tid[8..].copy_from_slice(&(self.checks.len() as u32).to_be_bytes());
        let id = TransactionId::from(tid);
        let username = format!("{}:{}", self.creds.remote_ufrag, self.creds.local_ufrag);
        let (Ok(user), Ok(key)) = (UserName::new(username), HMACKey::new_short_term(&self.creds.remote_pwd)) else {
            return;
        };
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
            .with_transaction_id(id)
            .with_attribute(user)
            .with_attribute(MessageIntegrity::new(key))
            .build();
        if !self.budget(socket, to) {
            return;
        }
        if let Some(bytes) = encode(&msg) {
            if self.checks.len() >= MAX_CHECKS {
                self.checks.drain(..MAX_CHECKS / 4);
            }
            self.checks.push((id, socket, to));
            self.out.push_back(PunchTransmit { socket, to, bytes });
        }
    }

    /// Sends what the plan says is due now.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.next.filter(|t| *t <= now) else { return };
        if self.path.is_some() {
            return;
        }
        if now >= self.deadline {
            self.next = None;
            return;
        }
        let (side, peer) = (self.plan.side, self.plan.peer);
        let shifted =
            |port: u16, by: i32| u16::try_from(i32::from(port) + by).ok().map(|p| SocketAddr::new(peer.ip(), p));
        self.next = Some(match self.plan.strategy {
            Strategy::RelayOnly(_) => {
                self.next = None;
                return;
            }
            Strategy::Reach { target, open_first } => {
                if target == side {
                    if open_first && self.sent == 0 {
                        // Opens our address filter for the peer's address, any port.
                        self.null(peer);
                    }
                } else {
                    self.check(0, peer);
                }
                self.sent += 1;
                self.retry(due)
            }
            Strategy::SimultaneousOpen => {
                if self.sent == 0 {
                    self.null(peer);
                }
                self.check(0, peer);
                self.sent += 1;
                self.retry(due)
            }
            Strategy::Prediction { symmetric, delta, window } => {
                if symmetric == side {
                    self.check(0, peer);
                    self.sent += 1;
                    self.retry(due)
                } else if self.sent >= MAX_SPRAY {
                    self.next = None;
                    return;
                } else {
                    // The cone walks the window around the symmetric side's next port,
                    // nearest first, over and over.
                    let span = u32::from(window) * 2 + 1;
                    let k = i32::try_from(self.sent % span).unwrap_or(0);
                    let off = if k % 2 == 0 { k / 2 } else { -(k + 1) / 2 };
                    if let Some(to) = shifted(peer.port(), i32::from(delta) + off) {
                        self.check(0, to);
                    }
                    self.sent += 1;
                    due + SPRAY_PACE
                }
            }
            Strategy::LockstepShotgun { delta, window } => {
                // Step k: our k-th new mapping meets the peer's k-th, both sides in step.
                let k = (self.sent % u32::from(window.max(1))) + 1;
                let d = i32::from(delta[side.other() as usize]);
                if let Some(to) = shifted(peer.port(), d * i32::try_from(k).unwrap_or(1)) {
                    self.check(0, to);
                }
                self.sent += 1;
                due + STEP
            }
            Strategy::Birthday { hard, sockets, probes } => {
                if hard == side {
                    // Every socket opens a mapping towards the easy side's window, one at
                    // a time (a burst of hundreds of signed checks would hold up media),
                    // for a few rounds.
                    let n = u32::from(sockets.max(1));
                    if self.sent >= n * HARD_ROUNDS {
                        self.next = None;
                        return;
                    }
                    self.check((self.sent % n) as usize, peer);
                    self.sent += 1;
                    due + HARD_PACE
                } else if self.sent == 0 {
                    // The hard side's first round of checks opens its mappings: give it a
                    // head start, so no probe arrives before there is anything to hit.
                    self.sent = 1;
                    due + RETRY * 4
                } else if self.sent <= u32::from(probes) * super::BIRTHDAY_ROUNDS {
                    let port = 1024 + (self.random() % 64_512) as u16;
                    self.check(0, SocketAddr::new(peer.ip(), port));
                    self.sent += 1;
                    due + SPRAY_PACE
                } else {
                    self.next = None;
                    return;
                }
            }
        });
    }

    /// A null packet to `to` from the window, within the budget.
    fn null(&mut self, to: SocketAddr) {
        if self.budget(0, to) {
            self.out.push_back(PunchTransmit { socket: 0, to, bytes: Vec::new() });
        }
    }

    /// A datagram arrived on `socket` from `from`. Only the peer's IP (the one in the plan,
    /// which the server observed) is answered: a check signed with the plan's credentials
    /// from anywhere else, spoofed or not, makes us send nothing.
    pub fn handle_input(&mut self, now: Instant, socket: usize, from: SocketAddr, data: &[u8]) {
        if data.is_empty() {
            return; // a null packet: it opened something, nothing to answer
        }
        if from.ip() != self.plan.peer.ip() {
            self.foreign += 1;
            return;
        }
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else { return };
        match msg.class() {
            MessageClass::Request => {
                let expected = format!("{}:{}", self.creds.local_ufrag, self.creds.remote_ufrag);
                let named = matches!(msg.get::<UserName>(), Some(StunAttribute::UserName(u)) if u.as_str() == expected);
                if !named || !verified(data, &self.creds.local_pwd) {
                    return;
                }
                self.respond(socket, from, *msg.transaction_id());
                if !self.heard.contains(&(socket, from)) {
                    self.heard.push((socket, from));
                    // Triggered check: prove the way back too.
                    self.check(socket, from);
                }
            }
            MessageClass::SuccessResponse => {
                let ours =
                    self.checks.iter().any(|(id, s, to)| id == msg.transaction_id() && *s == socket && *to == from);
                if !ours || !verified(data, &self.creds.remote_pwd) {
                    return;
                }
                if !self.answered.contains(&(socket, from)) {
                    self.answered.push((socket, from));
                }
            }
            _ => return,
        }
        if self.path.is_none() && self.heard.contains(&(socket, from)) && self.answered.contains(&(socket, from)) {
            self.path = Some((socket, from));
            self.next = None;
            self.last_answer = Some(now);
        }
        if msg.class() == MessageClass::SuccessResponse && self.path == Some((socket, from)) {
            self.last_answer = Some(now);
        }
    }

    fn respond(&mut self, socket: usize, to: SocketAddr, id: TransactionId) {
        let Ok(key) = HMACKey::new_short_term(&self.creds.local_pwd) else { return };
        let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(id)
            .with_attribute(XorMappedAddress::from(to))
            .with_attribute(MessageIntegrity::new(key))
            .build();
        if let Some(bytes) = encode(&msg) {
            self.out.push_back(PunchTransmit { socket, to, bytes });
        }
    }
}

#[cfg(test)]
mod tests;
