//! A call's state as another relay node needs it to take the call over (rtpengine's Redis
//! model): tags, ports, each side's SDP and signalling address, latched sources, the last
//! offer/answer and how old the call is. The active node writes it at every change, not
//! per packet ([`Relay::poll_changed`]); a standby restores it on the same ports
//! ([`Relay::restore`]) and forwards as soon as packets reach it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Call, Command, Component, PerSide, PortSpec, Relay, RelayPort, Side, Stream, StreamCounters};
use crate::latch::{Expected, LatchMode};

/// One call, as written to the shared store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallState {
    pub call_id: String,
    /// Tags of side A and side B (empty until known).
    pub tags: [String; 2],
    /// Wall-clock second the call was created.
    pub created_unix: u64,
    pub answered: bool,
    /// The side whose offer awaits an answer (0: A, 1: B).
    pub pending_offer: Option<u8>,
    /// Per side, the last SDP it sent and what it was rewritten to.
    pub last: [Option<(String, String)>; 2],
    pub streams: Vec<StreamState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub kind: String,
    pub proto: String,
    /// RTP port each side sends to (RTCP is +1).
    pub ports: [u16; 2],
    /// Index of the interface each side's port is on.
    pub iface: [usize; 2],
    /// Each side's RTP address from its SDP, and where its signalling came from.
    pub sdp: [Option<SocketAddr>; 2],
    pub signalling: [Option<IpAddr>; 2],
    pub asymmetric: bool,
    /// Latched sources: RTP of A, RTP of B, RTCP of A, RTCP of B.
    pub latched: [Option<SocketAddr>; 4],
}

/// Why a call state could not be restored here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("port {0} is outside this relay's range, in use by another call, or listed twice")]
    PortUnavailable(u16),
    #[error("interface {0} is not configured here")]
    UnknownInterface(usize),
}

impl Relay {
    /// Whether call state is collected for [`Relay::poll_changed`] (a node whose calls a
    /// standby may take over).
    pub fn keep_state(&mut self, on: bool) {
        self.keep_state = on;
    }

    pub(super) fn mark_changed(&mut self, call_id: &str) {
        if self.keep_state {
            self.changed.insert(call_id.to_owned());
        }
    }

    /// A standby mirrors calls and ends none; leaving standby (taking over) starts every
    /// call's media timer afresh from `now`.
    pub fn set_standby(&mut self, standby: bool, now: Instant) {
        if self.standby && !standby {
            for c in self.calls.values_mut() {
                if c.answered.is_some() {
                    c.answered = Some(now);
                }
                c.created = c.created.min(now);
            }
            let ids: Vec<String> = self.calls.keys().cloned().collect();
            for id in ids {
                self.plan_check(&id);
            }
        }
        self.standby = standby;
    }

    pub fn is_standby(&self) -> bool {
        self.standby
    }

    /// Marks the calls whose ports latched a new source since their state was last taken.
    pub fn note_latches(&mut self) {
        if !self.keep_state {
            return;
        }
        let mut moved = Vec::new();
        for (id, c) in &mut self.calls {
            for s in &mut c.streams {
                let now = latches(&s.stats);
                if now != s.saved_latches {
                    s.saved_latches = now;
                    moved.push(id.clone());
                }
            }
        }
        self.changed.extend(moved);
    }

    /// The next call whose state changed: its state now, or `None` when it ended. `now`
    /// and `unix_now` are the same moment on the two clocks.
    pub fn poll_changed(&mut self, now: Instant, unix_now: u64) -> Option<(String, Option<CallState>)> {
        let id = self.changed.pop_first()?;
        let state = self.export(&id, now, unix_now);
        Some((id, state))
    }

    /// A call's state (see [`CallState`]).
    pub fn export(&self, call_id: &str, now: Instant, unix_now: u64) -> Option<CallState> {
        let c = self.calls.get(call_id)?;
        let age = now.saturating_duration_since(c.created).as_secs();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Some(CallState {
            call_id: call_id.to_owned(),
            tags: c.tags.0.clone(),
            created_unix: unix_now.saturating_sub(age),
            answered: c.answered.is_some(),
            pending_offer: c.pending_offer.map(|s| s as u8),
            last: c.last.0.clone().map(|l| l.map(|(i, o)| (text(&i), text(&o)))),
            streams: c
                .streams
                .iter()
                .map(|s| StreamState {
                    kind: s.kind.clone(),
                    proto: s.proto.clone(),
                    ports: s.ports.0.map(|p| p.0),
                    iface: s.iface.0,
                    sdp: s.sdp.0,
                    signalling: s.signalling.0,
                    asymmetric: s.mode == LatchMode::Asymmetric,
                    latched: latches(&s.stats),
                })
                .collect(),
        })
    }

    /// Takes a call over from its state: the same ports (a call already here under that
    /// Call-ID is replaced), each already latched where the other node had latched, so
    /// media flows with the first packet that reaches this node.
    pub fn restore(&mut self, now: Instant, unix_now: u64, st: &CallState) -> Result<(), RestoreError> {
        // Checked before anything changes: ports free here (or the replaced call's own),
        // none listed twice, interfaces that exist.
        let held: Vec<u16> = self
            .calls
            .get(&st.call_id)
            .map(|c| c.streams.iter().flat_map(|s| s.ports.0.map(|p| p.0)).collect())
            .unwrap_or_default();
        let mut wanted: Vec<u16> = Vec::new();
        for s in &st.streams {
            if let Some(&i) = s.iface.iter().find(|&&i| i >= self.cfg.interfaces.len()) {
                return Err(RestoreError::UnknownInterface(i));
            }
            for p in s.ports {
                if wanted.contains(&p) || (!self.free.contains(&p) && !held.contains(&p)) {
                    return Err(RestoreError::PortUnavailable(p));
                }
                wanted.push(p);
            }
        }
        // Replaced: its ports close and are opened again with the new expectations.
        let keep = std::mem::replace(&mut self.keep_state, false);
        self.delete(&st.call_id);
        self.keep_state = keep;
        self.free.retain(|p| !wanted.contains(p));
        let serial = self.next_serial;
        self.next_serial += 1;
        let created = now.checked_sub(Duration::from_secs(unix_now.saturating_sub(st.created_unix))).unwrap_or(now);
        let mut streams = Vec::with_capacity(st.streams.len());
        for s in &st.streams {
            let stats = StreamCounters::default();
            let mode = if s.asymmetric { LatchMode::Asymmetric } else { LatchMode::Symmetric };
            for component in Component::BOTH {
                let spec = |side: Side| {
                    let i = side as usize;
                    let offset = component.port_offset();
                    let sdp = s.sdp[i].map(|a| SocketAddr::new(a.ip(), a.port().saturating_add(offset)));
                    PortSpec {
                        iface: s.iface[i],
                        bind: self.cfg.interfaces[s.iface[i]].bind,
                        port: RelayPort(s.ports[i] + offset),
                        expected: Expected { sdp, signalling_ip: s.signalling[i] },
                        mode,
                        stats: stats.get(component, side).clone(),
                        latched: s.latched[component as usize * 2 + i],
                    }
                };
                self.commands.push_back(Command::Link { shard: serial, a: spec(Side::A), b: spec(Side::B) });
            }
            streams.push(Stream {
                kind: s.kind.clone(),
                proto: s.proto.clone(),
                sdp: PerSide(s.sdp),
                iface: PerSide(s.iface),
                ports: PerSide(s.ports.map(RelayPort)),
                stats,
                signalling: PerSide(s.signalling),
                mode,
                saved_latches: s.latched,
                // Keys and handshakes stay with the node that made them: a restored secure
                // stream passes as plain until its next offer or answer.
                sec: Default::default(),
                quality: Default::default(),
                rtcp_exported: Default::default(),
            });
        }
        let bytes = |t: &(String, String)| (t.0.clone().into_bytes(), t.1.clone().into_bytes());
        let side = |n: u8| if n == 0 { Side::A } else { Side::B };
        self.calls.insert(
            st.call_id.clone(),
            Call {
                serial,
                tags: PerSide(st.tags.clone()),
                streams,
                created,
                last_signal: now,
                answered: st.answered.then_some(now),
                pending_offer: st.pending_offer.map(side),
                last: PerSide(st.last.clone().map(|l| l.as_ref().map(bytes))),
                // A recording stays with the node that made it.
                recording: false,
            },
        );
        self.plan_check(&st.call_id);
        Ok(())
    }
}

/// A stream's latched sources, in [`StreamCounters`] order.
fn latches(stats: &StreamCounters) -> [Option<SocketAddr>; 4] {
    let mut out = [None; 4];
    for (slot, st) in out.iter_mut().zip(stats.iter()) {
        *slot = st.latched();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortTable;
    use crate::relay::{Options, RelayConfig};

    fn relay(now: Instant) -> Relay {
        Relay::new(RelayConfig::single("203.0.113.21".parse().expect("ip"), 30000, 30099), now)
    }

    fn sdp(addr: &str, port: u16) -> Vec<u8> {
        format!("v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=-\r\nc=IN IP4 {addr}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
            .into_bytes()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// The data plane of one node, in memory: its commands applied to a port table.
    fn apply(relay: &mut Relay, table: &mut PortTable<()>, now: Instant) {
        while let Some(c) = relay.poll_command() {
            table.apply(now, c);
        }
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0u8; 160]);
        p
    }

    /// A call between two NATed phones on the active node, both sides latched.
    fn active_call(now: Instant) -> (Relay, PortTable<()>, u16, u16) {
        let mut r = relay(now);
        r.keep_state(true);
        let mut t = PortTable::new(30000, 30099);
        let alice_ip = Some("203.0.113.2".parse().expect("ip"));
        let bob_ip = Some("203.0.113.3".parse().expect("ip"));
        let o = r.offer(now, "c", "a", &sdp("198.51.100.10", 4000), alice_ip, Options::default()).expect("offer");
        let a = r.answer(now, "c", "b", &sdp("198.51.100.138", 5000), bob_ip, Options::default()).expect("answer");
        apply(&mut r, &mut t, now);
        let port = |b: &[u8]| crate::sdp::Sdp::parse(b).expect("sdp").media[0].port;
        let (to_bob, to_alice) = (port(&o), port(&a));
        // Alice sends to the port in the answer, bob to the one in the offer.
        assert!(t.forward(now, 1, to_alice, sa("203.0.113.2:61000"), &rtp(1)).is_some());
        assert!(t.forward(now, 2, to_bob, sa("203.0.113.3:62000"), &rtp(1)).is_some());
        (r, t, to_alice, to_bob)
    }

    #[test]
    fn changes_are_collected_at_signalling_and_latching_not_per_packet() {
        let now = Instant::now();
        let (mut r, mut t, to_alice, _) = active_call(now);
        let (id, state) = r.poll_changed(now, 1_700_000_000).expect("the call changed");
        assert_eq!(id, "c");
        assert!(state.is_some());
        assert_eq!(r.poll_changed(now, 1_700_000_000), None, "offer and answer: one change to write");
        r.note_latches();
        let (_, state) = r.poll_changed(now, 1_700_000_000).expect("latching is a change");
        let latched = state.expect("live").streams[0].latched;
        assert_eq!(latched[0], Some(sa("203.0.113.2:61000")), "alice's RTP source");
        assert_eq!(latched[1], Some(sa("203.0.113.3:62000")), "bob's RTP source");
        for seq in 2..50 {
            t.forward(now, 3, to_alice, sa("203.0.113.2:61000"), &rtp(seq));
        }
        r.note_latches();
        assert_eq!(r.poll_changed(now, 1_700_000_000), None, "more packets change nothing");
        assert!(r.delete("c"));
        assert_eq!(r.poll_changed(now, 1_700_000_000), Some(("c".to_owned(), None)), "the end is a change");
    }

    #[test]
    fn a_standby_restores_the_call_on_the_same_ports_and_forwards_at_once() {
        let now = Instant::now();
        let (mut active, _, to_alice, to_bob) = active_call(now);
        active.note_latches();
        let state = active.export("c", now, 1_700_000_000).expect("state");
        let json = serde_json::to_string(&state).expect("json");

        let later = now + Duration::from_secs(5);
        let mut standby = relay(later);
        standby.set_standby(true, later);
        let mut t = PortTable::new(30000, 30099);
        let back: CallState = serde_json::from_str(&json).expect("parse");
        standby.restore(later, 1_700_000_005, &back).expect("restored");
        apply(&mut standby, &mut t, later);
        // The first packet from either phone goes straight to the other's latched source.
        let f = t.forward(later, 1, to_alice, sa("203.0.113.2:61000"), &rtp(9)).expect("forwarded");
        assert_eq!((f.to, f.from_port), (sa("203.0.113.3:62000"), to_bob));
        let f = t.forward(later, 1, to_bob, sa("203.0.113.3:62000"), &rtp(9)).expect("forwarded");
        assert_eq!((f.to, f.from_port), (sa("203.0.113.2:61000"), to_alice));
        // A stranger does not get in by being first at the new node.
        assert!(t.forward(later, 1, to_alice, sa("192.0.2.66:4444"), &rtp(10)).is_none());

        // What query reports matches: tags, ports, endpoints, age.
        let (a, b) = (active.describe("c").expect("a"), standby.describe("c").expect("b"));
        assert_eq!(a.tags, b.tags);
        assert_eq!(a.streams[0].ports, b.streams[0].ports);
        assert_eq!(a.streams[0].sdp, b.streams[0].sdp);
        assert_eq!(standby.export("c", later, 1_700_000_005).map(|s| s.created_unix), Some(1_700_000_000));
        // Ports taken: a new call there gets others.
        let o = standby.offer(later, "new", "x", &sdp("198.51.100.20", 4000), None, Options::default()).expect("o");
        let p = crate::sdp::Sdp::parse(&o).expect("sdp").media[0].port;
        assert!(p != to_alice && p != to_bob);
    }

    #[test]
    fn a_standby_ends_nothing_until_it_takes_over_then_times_out_from_then() {
        let now = Instant::now();
        let (active, _, _, _) = active_call(now);
        let state = active.export("c", now, 1_700_000_000).expect("state");
        let mut standby = relay(now);
        standby.set_standby(true, now);
        standby.restore(now, 1_700_000_000, &state).expect("restored");
        standby.handle_timeout(now + Duration::from_secs(600));
        assert!(standby.has_call("c"), "no media on a standby is not a dead call");
        assert_eq!(standby.poll_timeout(), None);
        let t = now + Duration::from_secs(600);
        standby.set_standby(false, t);
        standby.handle_timeout(t + Duration::from_secs(30));
        assert!(standby.has_call("c"));
        standby.handle_timeout(t + Duration::from_secs(61));
        assert!(!standby.has_call("c"), "the media timeout runs from the takeover");
    }

    #[test]
    fn restoring_onto_a_port_another_call_holds_is_refused_and_changes_nothing() {
        let now = Instant::now();
        let (active, _, _, _) = active_call(now);
        let state = active.export("c", now, 1_700_000_000).expect("state");
        let mut other = relay(now);
        other.offer(now, "local", "x", &sdp("198.51.100.20", 4000), None, Options::default()).expect("o");
        other.answer(now, "local", "y", &sdp("198.51.100.30", 4000), None, Options::default()).expect("a");
        let e = other.restore(now, 1_700_000_000, &state).expect_err("ports held");
        assert!(matches!(e, RestoreError::PortUnavailable(_)));
        assert!(!other.has_call("c"));
        assert_eq!(other.call_count(), 1);
        let mut bad = state.clone();
        bad.streams[0].iface = [0, 3];
        assert_eq!(relay(now).restore(now, 1_700_000_000, &bad), Err(RestoreError::UnknownInterface(3)));
    }

    #[test]
    fn restoring_the_same_call_again_replaces_it_on_its_ports() {
        let now = Instant::now();
        let (active, _, _, _) = active_call(now);
        let state = active.export("c", now, 1_700_000_000).expect("state");
        let mut standby = relay(now);
        standby.restore(now, 1_700_000_000, &state).expect("first");
        standby.restore(now, 1_700_000_000, &state).expect("again");
        assert_eq!(standby.call_count(), 1);
        assert_eq!(standby.ports_in_use(), 4);
    }
}
