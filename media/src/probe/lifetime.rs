//! How long an idle NAT mapping survives (RFC 5780 §4.6), as a sans-IO phase of the probe.
//!
//! The main socket refreshes its mapping and learns the mapped port; after an idle period
//! the other socket asks the server to answer to that port (RESPONSE-PORT). If the answer
//! reaches the main socket the mapping was alive; idle periods double from 2 s until one
//! fails. Driven like [`NatProbe`](super::NatProbe): `handle_input`, `handle_timeout` at
//! `poll_timeout`, `poll_transmit`, then `result`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_rs::attributes::discovery::ResponsePort;
use stun_rs::attributes::stun::XorMappedAddress;
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunAttribute, StunMessageBuilder};
use stun_rs::{StunMessage, TransactionId};

use super::{ProbeTransmit, SocketId};

/// Idle periods tried, in seconds.
pub const IDLE_STEPS: [u64; 7] = [2, 4, 8, 16, 32, 64, 128];
/// How long the main socket waits for the redirected answer.
const CHECK_WAIT: Duration = Duration::from_secs(2);
/// Retransmission interval and tries, for the refresh and the check alike.
const RTO: Duration = Duration::from_millis(500);
const TRIES: u32 = 3;

/// What the phase found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// The mapping outlived `alive` seconds of silence and was gone after `gone`
    /// (`None`: it outlived every step).
    Measured { alive: u64, gone: Option<u64> },
    /// The server stopped answering the refreshes.
    Failed,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Refreshing the mapping from the main socket (try number).
    Refresh(u32),
    /// Silent until the instant, holding the mapped port.
    Idle(Instant, u16),
    /// The redirected request was sent; waiting for its answer on the main socket until
    /// the deadline (tries of the request so far).
    Check(Instant, u16, u32),
    Done(Lifetime),
}

pub struct LifetimeProbe {
    server: SocketAddr,
    step: usize,
    alive: u64,
    phase: Phase,
    id: TransactionId,
    /// The request in flight, resent as is (same transaction) when unanswered.
    request: Vec<u8>,
    next_send: Option<Instant>,
    out: Vec<ProbeTransmit>,
    seed: u64,
}

impl LifetimeProbe {
    /// Sockets it needs: the main one (whose mapping is measured) and another.
    pub fn sockets() -> [SocketId; 2] {
        [SocketId::Main, SocketId::Filtering]
    }

    pub fn new(now: Instant, server: SocketAddr, seed: u64) -> LifetimeProbe {
        let mut p = LifetimeProbe {
            server,
            step: 0,
            alive: 0,
            phase: Phase::Refresh(0),
            id: TransactionId::default(),
            request: Vec::new(),
            next_send: Some(now),
            out: Vec::new(),
            seed,
        };
        p.handle_timeout(now);
        p
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<ProbeTransmit> {
        (!self.out.is_empty()).then(|| self.out.remove(0))
    }

    /// When to call [`LifetimeProbe::handle_timeout`] next; `None` once done.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Done(_) => None,
            Phase::Idle(until, _) => Some(until),
            Phase::Check(deadline, ..) => Some(self.next_send.map_or(deadline, |n| n.min(deadline))),
            Phase::Refresh(_) => self.next_send,
        }
    }

    #[must_use]
    pub fn result(&self) -> Option<Lifetime> {
        match self.phase {
            Phase::Done(r) => Some(r),
            _ => None,
        }
    }

    fn request(&mut self, response_port: Option<u16>) -> Vec<u8> {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.seed.to_be_bytes());
        tid[8..].copy_from_slice(b"life");
        self.id = TransactionId::from(tid);
        let mut b = StunMessageBuilder::new(BINDING, MessageClass::Request).with_transaction_id(self.id);
        if let Some(p) = response_port {
            b = b.with_attribute(ResponsePort::from(p));
        }
        let mut bytes = vec![0u8; 64];
        let n = MessageEncoderBuilder::default().build().encode(&mut bytes, &b.build()).unwrap_or(0);
        bytes.truncate(n);
        bytes
    }

    /// Sends a new request (`fresh`) or the one in flight again.
    fn send(&mut self, now: Instant, socket: SocketId, response_port: Option<u16>, fresh: bool) {
        if fresh {
            self.request = self.request(response_port);
        }
        self.out.push(ProbeTransmit { socket, to: self.server, bytes: self.request.clone() });
        self.next_send = Some(now + RTO);
    }

    /// Sends, retransmits and moves on when periods pass.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Done(_) => {}
            Phase::Refresh(tries) => {
                if self.next_send.is_some_and(|t| t <= now) {
                    if tries >= TRIES {
                        self.phase = Phase::Done(Lifetime::Failed);
                        return;
                    }
                    self.send(now, SocketId::Main, None, tries == 0);
                    self.phase = Phase::Refresh(tries + 1);
                }
            }
            Phase::Idle(until, port) => {
                if now >= until {
                    self.send(now, SocketId::Filtering, Some(port), true);
                    self.phase = Phase::Check(now + CHECK_WAIT, port, 1);
                }
            }
            Phase::Check(deadline, port, tries) => {
                if now >= deadline {
                    self.phase =
                        Phase::Done(Lifetime::Measured { alive: self.alive, gone: Some(IDLE_STEPS[self.step]) });
                } else if self.next_send.is_some_and(|t| t <= now) && tries < TRIES {
                    // A lost request must not pass for a dead mapping; a resend only
                    // refreshes the other socket's mapping.
                    self.send(now, SocketId::Filtering, Some(port), false);
                    self.phase = Phase::Check(deadline, port, tries + 1);
                } else if tries >= TRIES {
                    self.next_send = None;
                }
            }
        }
    }

    /// A datagram arrived on `socket`.
    pub fn handle_input(&mut self, now: Instant, socket: SocketId, data: &[u8]) {
        if socket != SocketId::Main {
            return;
        }
        let Ok((msg, _)) = MessageDecoderBuilder::default().build().decode(data) else { return };
        if msg.class() != MessageClass::SuccessResponse || msg.transaction_id() != &self.id {
            return;
        }
        match self.phase {
            Phase::Refresh(_) => {
                let Some(port) = mapped_port(&msg) else { return };
                self.next_send = None;
                self.phase = Phase::Idle(now + Duration::from_secs(IDLE_STEPS[self.step]), port);
            }
            Phase::Check(..) => {
                self.alive = IDLE_STEPS[self.step];
                self.step += 1;
                if self.step == IDLE_STEPS.len() {
                    self.phase = Phase::Done(Lifetime::Measured { alive: self.alive, gone: None });
                } else {
                    self.phase = Phase::Refresh(0);
                    self.next_send = Some(now);
                    self.handle_timeout(now);
                }
            }
            Phase::Idle(..) | Phase::Done(_) => {}
        }
    }
}

fn mapped_port(msg: &StunMessage) -> Option<u16> {
    match msg.get::<XorMappedAddress>() {
        Some(StunAttribute::XorMappedAddress(m)) => Some(m.socket_address().port()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "203.0.113.1:3478";

    /// A server behind which a NAT forgets idle mappings after `timeout` of silence.
    struct World {
        probe: LifetimeProbe,
        now: Instant,
        timeout: Duration,
        /// When the main socket's mapping last saw traffic, and its public port.
        last_traffic: Instant,
        mapped_port: u16,
        lose_first_check: bool,
    }

    impl World {
        fn new(timeout: Duration) -> World {
            let now = Instant::now();
            let server = SERVER.parse().expect("addr");
            World {
                probe: LifetimeProbe::new(now, server, 7),
                now,
                timeout,
                last_traffic: now,
                mapped_port: 40000,
                lose_first_check: false,
            }
        }

        fn answer(&self, req: &[u8], to: SocketAddr) -> Vec<u8> {
            let (msg, _) = MessageDecoderBuilder::default().build().decode(req).expect("request");
            let b = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(*msg.transaction_id())
                .with_attribute(XorMappedAddress::from(to));
            let mut out = vec![0u8; 128];
            let n = MessageEncoderBuilder::default().build().encode(&mut out, &b.build()).expect("encode");
            out.truncate(n);
            out
        }

        fn run(&mut self) -> Lifetime {
            for _ in 0..10_000 {
                while let Some(t) = self.probe.poll_transmit() {
                    let (msg, _) = MessageDecoderBuilder::default().build().decode(&t.bytes).expect("request");
                    let redirected = msg.get::<ResponsePort>().is_some();
                    if t.socket == SocketId::Main {
                        if self.now.duration_since(self.last_traffic) >= self.timeout {
                            self.mapped_port += 1; // the old mapping died: a new one
                        }
                        self.last_traffic = self.now;
                        let reply = self.answer(&t.bytes, SocketAddr::from(([198, 51, 100, 2], self.mapped_port)));
                        self.probe.handle_input(self.now, SocketId::Main, &reply);
                    } else if redirected {
                        if self.lose_first_check {
                            self.lose_first_check = false;
                            continue;
                        }
                        let alive = self.now.duration_since(self.last_traffic) < self.timeout;
                        if alive {
                            self.last_traffic = self.now;
                            let reply = self.answer(&t.bytes, SocketAddr::from(([198, 51, 100, 2], self.mapped_port)));
                            self.probe.handle_input(self.now, SocketId::Main, &reply);
                        }
                    }
                }
                if let Some(r) = self.probe.result() {
                    return r;
                }
                let at = self.probe.poll_timeout().expect("a timer while running");
                self.now = at.max(self.now);
                self.probe.handle_timeout(self.now);
            }
            panic!("the probe never finished");
        }
    }

    #[test]
    fn a_20_second_nat_is_alive_after_16_and_gone_after_32() {
        let mut w = World::new(Duration::from_secs(20));
        assert_eq!(w.run(), Lifetime::Measured { alive: 16, gone: Some(32) });
    }

    #[test]
    fn a_nat_that_never_forgets_outlives_every_step() {
        let mut w = World::new(Duration::from_secs(100_000));
        assert_eq!(w.run(), Lifetime::Measured { alive: 128, gone: None });
    }

    #[test]
    fn a_lost_check_is_retried_rather_than_read_as_a_dead_mapping() {
        let mut w = World::new(Duration::from_secs(20));
        w.lose_first_check = true;
        assert_eq!(w.run(), Lifetime::Measured { alive: 16, gone: Some(32) });
    }

    #[test]
    fn a_silent_server_fails_the_phase() {
        let now = Instant::now();
        let mut p = LifetimeProbe::new(now, SERVER.parse().expect("addr"), 1);
        let mut t = now;
        while p.result().is_none() {
            while p.poll_transmit().is_some() {}
            t = p.poll_timeout().expect("timer");
            p.handle_timeout(t);
        }
        assert_eq!(p.result(), Some(Lifetime::Failed));
        assert!(t.duration_since(now) < Duration::from_secs(3));
    }
}
