//! One call's media path at an agent, sans-IO: relayed from the first packet, upgraded to a
//! direct path when the punch plan makes one, and back to the relay when it dies.
//!
//! The socket the agent's leg to the server relay leaves from is the "window" (socket 0);
//! a birthday's hard side adds sockets 1.. of its own. In order:
//! 1. **Gather**: a Binding request from the window to the server's STUN service says what
//!    the window's public address is now, just before punching (a sequential NAT's next
//!    port depends on every mapping made since it was measured, so predict late).
//! 2. **Announce**: that address goes to the peer agent over the relay path itself, in a
//!    Binding indication signed with the plan's credentials (USERNAME `peer:us`,
//!    MESSAGE-INTEGRITY keyed by the peer's password), every [`ANNOUNCE`] until a path is
//!    up; the peer's announcement gives us its window. An unsigned one changes nothing.
//! 3. **Punch**: the [`Puncher`] carries out the plan from both windows.
//! 4. **Direct**: once checks succeeded both ways, the phone's media leaves on the direct
//!    path (make-before-break: until then it went to the relay). Consent (RFC 7675) is a
//!    check every [`CONSENT`]; without an answer for [`CONSENT_LOST`] media goes back to
//!    the relay, and comes back to the direct path if it answers again. Meanwhile the relay
//!    leg is kept alive by an announcement every [`RELAY_KEEPALIVE`], so falling back needs
//!    no signalling and the relay's media timeout never ends a call that moved away.
//!
//! Media is taken from the relay, and from any source that proved the plan's credentials
//! by a signed check; nothing else on the window is media of this call.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{MessageIntegrity, UserName, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, StunAttribute, StunMessageBuilder, TransactionId};

use super::scheduler::{sockets_for, PunchPlan, PunchTransmit, Puncher, PUNCH_DEADLINE};
use crate::stun::{encode, verified};

/// How often the window's address is asked for and announced while no path is up.
pub const ANNOUNCE: Duration = Duration::from_millis(100);
/// Consent checks on the direct path.
pub const CONSENT: Duration = Duration::from_millis(200);
/// After this long without an answered consent check the path is shaky: media goes both
/// ways, direct and through the relay, so if the path is dead the far phone already hears
/// the relayed copy (it drops duplicates by sequence number).
pub const CONSENT_LATE: Duration = Duration::from_millis(300);
/// Back to the relay only after this long without an answered consent check.
pub const CONSENT_LOST: Duration = Duration::from_millis(800);
/// Consent checks on a path we fell back from, to come back to it when it answers.
pub const RETRY_DIRECT: Duration = Duration::from_secs(1);
/// Announcements on the relay leg while media goes direct.
pub const RELAY_KEEPALIVE: Duration = Duration::from_secs(2);
/// Gathering starts this long before the plan's start.
const GATHER_AHEAD: Duration = Duration::from_millis(150);

/// Where the phone's media goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Relay,
    Direct {
        socket: usize,
        to: SocketAddr,
    },
    /// The direct path is late answering: both, until it answers or is given up.
    Both {
        socket: usize,
        to: SocketAddr,
    },
}

/// What happened to the path, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEvent {
    /// Media moved to the direct path, this long after the plan's start.
    Direct { after: Duration },
    /// The direct path stopped answering; media is back on the relay.
    FellBack,
    /// The path we fell back from answers again; media is on it again.
    Recovered,
    /// No path within the punch deadline: the call stays relayed.
    Failed,
}

/// Where the path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Asking the server's STUN for our window, announcing it, waiting for the peer's.
    Gathering,
    Punching,
    Direct,
    /// Relayed after a direct path died; it is retried.
    FellBack,
    /// Relayed for good: the plan was relay-only, or punching found nothing.
    Relayed,
}

pub struct DirectPath {
    plan: PunchPlan,
    /// The server's STUN service.
    stun: SocketAddr,
    phase: Phase,
    own: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    /// Our last Binding request to the STUN service.
    gather_id: Option<TransactionId>,
    puncher: Option<Puncher>,
    path: Option<(usize, SocketAddr)>,
    next: Option<Instant>,
    /// When the relay leg next gets an announcement / the path a consent check.
    next_announce: Instant,
    next_consent: Instant,
    /// When we switched (consent is counted from there until the first answer).
    since: Instant,
    /// The direct path is late answering (see [`CONSENT_LATE`]).
    shaky: bool,
    /// When the direct path's consent must be looked at again.
    watch: Option<Instant>,
    out: VecDeque<PunchTransmit>,
    events: VecDeque<PathEvent>,
    seed: u64,
    /// Announcements with a bad signature or another address than the plan's, and stray
    /// STUN, ignored.
    ignored: u64,
    /// Our window is a port the gateway mapped on request: its public address is known,
    /// not gathered.
    mapped: bool,
}

impl DirectPath {
    /// The path for `plan`: nothing happens before `plan.start` less [`GATHER_AHEAD`].
    pub fn new(plan: PunchPlan, stun: SocketAddr, seed: u64) -> DirectPath {
        let direct = plan.strategy.is_direct();
        let begin = plan.start.checked_sub(GATHER_AHEAD).unwrap_or(plan.start);
        DirectPath {
            stun,
            phase: if direct { Phase::Gathering } else { Phase::Relayed },
            own: None,
            peer: None,
            gather_id: None,
            puncher: None,
            path: None,
            next: direct.then_some(begin),
            next_announce: begin,
            next_consent: begin,
            since: begin,
            shaky: false,
            watch: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            seed,
            ignored: 0,
            mapped: false,
            plan,
        }
    }

    /// The gateway mapped our window to `external` (PCP or NAT-PMP): that is our window's
    /// public address, announced as it is, whatever a STUN binding would say.
    pub fn set_mapped(&mut self, now: Instant, external: SocketAddr) {
        self.mapped = true;
        self.own = Some(external);
        self.maybe_punch(now);
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn method(&self) -> &'static str {
        self.plan.strategy.label()
    }

    /// How many extra sockets (beyond the window) the plan will need.
    pub fn extra_sockets(&self) -> usize {
        sockets_for(self.plan.strategy, self.plan.side).saturating_sub(1)
    }

    pub fn route(&self) -> Route {
        match (self.phase, self.path) {
            (Phase::Direct, Some((socket, to))) if self.shaky => Route::Both { socket, to },
            (Phase::Direct, Some((socket, to))) => Route::Direct { socket, to },
            _ => Route::Relay,
        }
    }

    /// Whether a packet from `from` on `socket` (not from the relay) is this call's media.
    pub fn accepts(&self, socket: usize, from: SocketAddr) -> bool {
        self.puncher.as_ref().is_some_and(|p| p.accepts(socket, from))
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<PunchTransmit> {
        if let Some(p) = self.puncher.as_mut() {
            if let Some(t) = p.poll_transmit() {
                return Some(t);
            }
        }
        self.out.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let punch = self.puncher.as_ref().and_then(Puncher::poll_timeout);
        [self.next, punch].into_iter().flatten().min()
    }

    fn random(&mut self) -> u64 {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.seed >> 16
    }

    fn gather(&mut self) {
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.random().to_be_bytes());
        tid[8..].copy_from_slice(&(self.random() as u32).to_be_bytes());
        let id = TransactionId::from(tid);
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(id).build();
        if let Some(bytes) = encode(&msg) {
            self.gather_id = Some(id);
            self.out.push_back(PunchTransmit { socket: 0, to: self.stun, bytes });
        }
    }

    /// Our window, signed, to the peer over the relay leg (also its keepalive).
    fn announce(&mut self, relay: SocketAddr) {
        let Some(own) = self.own else { return };
        let c = &self.plan.credentials;
        let username = format!("{}:{}", c.remote_ufrag, c.local_ufrag);
        let (Ok(user), Ok(key)) = (UserName::new(username), stun_rs::HMACKey::new_short_term(&c.remote_pwd)) else {
            return;
        };
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.random().to_be_bytes());
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Indication)
            .with_transaction_id(TransactionId::from(tid))
            .with_attribute(user)
            .with_attribute(XorMappedAddress::from(own))
            .with_attribute(MessageIntegrity::new(key))
            .build();
        if let Some(bytes) = encode(&msg) {
            self.out.push_back(PunchTransmit { socket: 0, to: relay, bytes });
        }
    }

    /// Runs what is due. `relay` is where the window's relay leg sends (the server relay's
    /// port for this call), once known.
    pub fn handle_timeout(&mut self, now: Instant, relay: Option<SocketAddr>) {
        if let Some(p) = self.puncher.as_mut() {
            p.handle_timeout(now);
        }
        if self.next.is_none_or(|t| t > now) {
            self.check_path(now);
            return;
        }
        match self.phase {
            Phase::Gathering | Phase::Punching => {
                if now >= self.plan.start + PUNCH_DEADLINE {
                    self.phase = Phase::Relayed;
                    self.next = None;
                    self.events.push_back(PathEvent::Failed);
                    return;
                }
                if self.own.is_none() {
                    self.gather();
                }
                if let Some(r) = relay {
                    self.announce(r);
                }
                self.maybe_punch(now);
                self.next = Some(now + ANNOUNCE);
            }
            Phase::Direct | Phase::FellBack => {
                if now >= self.next_announce {
                    if let Some(r) = relay {
                        self.announce(r);
                    }
                    self.next_announce = now + RELAY_KEEPALIVE;
                }
                if now >= self.next_consent {
                    if let (Some((socket, to)), Some(p)) = (self.path, self.puncher.as_mut()) {
                        p.consent_check(socket, to);
                    }
                    self.next_consent = now + if self.phase == Phase::Direct { CONSENT } else { RETRY_DIRECT };
                }
                self.check_path(now);
                let watch = self.watch.filter(|_| self.phase == Phase::Direct);
                self.next =
                    Some(watch.map_or(self.next_announce, |w| w.min(self.next_announce)).min(self.next_consent));
            }
            Phase::Relayed => self.next = None,
        }
    }

    /// Starts punching once both windows are known and the start has come.
    fn maybe_punch(&mut self, now: Instant) {
        let (Some(own), Some(peer), Phase::Gathering) = (self.own, self.peer, self.phase) else { return };
        if now < self.plan.start {
            return;
        }
        let mut plan = self.plan.clone();
        plan.windows[plan.side as usize] = own;
        plan.windows[plan.side.other() as usize] = peer;
        plan.start = now;
        let mut p = Puncher::new(plan, self.seed);
        p.handle_timeout(now);
        self.puncher = Some(p);
        self.phase = Phase::Punching;
    }

    /// Moves between relay and direct as the checks say.
    fn check_path(&mut self, now: Instant) {
        let Some(p) = self.puncher.as_ref() else { return };
        match self.phase {
            Phase::Punching => {
                if let Some(path) = p.path() {
                    self.path = Some(path);
                    self.phase = Phase::Direct;
                    self.since = now;
                    self.next_consent = now + CONSENT;
                    self.next_announce = now + RELAY_KEEPALIVE;
                    self.next = Some(now + CONSENT);
                    self.events.push_back(PathEvent::Direct { after: now.saturating_duration_since(self.plan.start) });
                }
            }
            Phase::Direct => {
                let fresh = p.last_answer().unwrap_or(self.since).max(self.since);
                let silent = now.saturating_duration_since(fresh);
                self.shaky = silent >= CONSENT_LATE;
                if silent >= CONSENT_LOST {
                    self.phase = Phase::FellBack;
                    self.shaky = false;
                    self.since = now;
                    self.next_consent = now + RETRY_DIRECT;
                    self.watch = None;
                    self.events.push_back(PathEvent::FellBack);
                } else {
                    // Look again when the path would turn shaky, or be given up.
                    let due = fresh + if self.shaky { CONSENT_LOST } else { CONSENT_LATE };
                    self.watch = Some(due);
                    self.next = Some(self.next.map_or(due, |n| n.min(due)));
                }
            }
            Phase::FellBack => {
                if p.last_answer().is_some_and(|t| t > self.since) {
                    self.phase = Phase::Direct;
                    self.since = now;
                    self.next_consent = now + CONSENT;
                    self.events.push_back(PathEvent::Recovered);
                }
            }
            Phase::Gathering | Phase::Relayed => {}
        }
    }

    /// A STUN message or null packet that arrived on `socket` from `from`. Returns whether
    /// it was ours (consumed); anything else is left to the media path's own rules.
    pub fn handle_input(
        &mut self,
        now: Instant,
        socket: usize,
        from: SocketAddr,
        data: &[u8],
        relay: Option<SocketAddr>,
    ) -> bool {
        if self.phase == Phase::Relayed && self.puncher.is_none() {
            return false;
        }
        if data.is_empty() {
            return true; // a null packet: it opened a NAT on its way, nothing to answer
        }
        if socket == 0 && from == self.stun {
            return self.on_gathered(now, data);
        }
        if socket == 0 && Some(from) == relay {
            return self.on_announcement(now, data);
        }
        let Some(p) = self.puncher.as_mut() else { return false };
        p.handle_input(now, socket, from, data);
        self.check_path(now);
        true
    }

    fn on_gathered(&mut self, now: Instant, data: &[u8]) -> bool {
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else { return false };
        if msg.class() != MessageClass::SuccessResponse || Some(*msg.transaction_id()) != self.gather_id {
            self.ignored += 1;
            return true;
        }
        if let Some(StunAttribute::XorMappedAddress(x)) = msg.get::<XorMappedAddress>() {
            if !self.mapped {
                self.own = Some(*x.socket_address());
                self.maybe_punch(now);
            }
        }
        true
    }

    fn on_announcement(&mut self, now: Instant, data: &[u8]) -> bool {
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else { return false };
        let c = &self.plan.credentials;
        let expected = format!("{}:{}", c.local_ufrag, c.remote_ufrag);
        let named = matches!(msg.get::<UserName>(), Some(StunAttribute::UserName(u)) if u.as_str() == expected);
        if msg.class() != MessageClass::Indication || !named || !verified(data, &c.local_pwd) {
            // Not ours: perhaps the far phone's own STUN, which goes on as media.
            return false;
        }
        if let Some(StunAttribute::XorMappedAddress(x)) = msg.get::<XorMappedAddress>() {
            // The peer may say which port its window has now, never which address: that
            // is the one the server observed and put in the plan (an agent announcing a
            // victim's address would aim our punching at it).
            let vouched = self.plan.windows[self.plan.side.other() as usize].ip();
            if x.socket_address().ip() != vouched {
                self.ignored += 1;
            } else if self.phase == Phase::Gathering {
                self.peer = Some(*x.socket_address());
                self.maybe_punch(now);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests;
