//! The data plane's port table and forwarding rule, sans-IO: one slot per relay port of the
//! range, each with its latch, counters and the peer port packets leave from. The shell's
//! forwarding threads own one table each and attach their socket handle (`S`) to a slot;
//! per packet, [`PortTable::forward`] decides whether it goes on and where.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::latch::{is_rtcp, Expected, Latch, RtpInfo, Verdict};
use crate::relay::{PortSpec, RelayPort, Side};
use crate::secure::{LegSetup, SecureLeg};
use crate::stats::{Offloaded, StreamStats};

/// Secure legs one table lets handshake at once; past it a new handshake waits (its
/// ClientHello is dropped and counted, and the browser retransmits).
pub const MAX_HANDSHAKES: usize = 1024;
/// Datagrams a table queues for the shell to send back (check answers, DTLS records)
/// before it drops more.
const MAX_REPLIES: usize = 256;

/// One relay port in use.
pub struct PortSlot<S> {
    /// The shell's socket for this port, when it reads per port.
    pub sock: Option<S>,
    /// The address the port is bound on (the source of what leaves it).
    pub bind: IpAddr,
    /// The port packets arriving here leave from.
    pub peer: RelayPort,
    latch: Latch,
    stats: Arc<StreamStats>,
    /// The latched source last published in `stats`.
    published: Option<SocketAddr>,
    /// On an RTP port: the leg's ICE, DTLS and SRTP, when pinhole terminates its transport.
    secure: Option<Box<SecureLeg>>,
    /// On an RTP port: the leg sends and takes RTCP on it (RFC 5761).
    mux: bool,
    /// The call's media is recorded: the recording's id and the side sending here.
    record: Option<(u64, Side)>,
}

/// Where an accepted packet goes: sent from `from_port` (bound on `from_ip`) to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub from_port: u16,
    pub from_ip: IpAddr,
    pub to: SocketAddr,
    /// The packet changed on the way (SRTP taken off or put on): send
    /// [`PortTable::rewritten`] instead of what arrived.
    pub rewritten: bool,
}

/// A datagram a port sends back on its own: an ICE check's answer, a DTLS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub from_port: u16,
    pub from_ip: IpAddr,
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// A port pair both of whose parties are latched and speak plain RTP: what the kernel fast
/// path needs to forward `src`'s packets to `relay` on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloadable {
    /// The latched party's source.
    pub src: SocketAddr,
    /// The relay address and port it sends to.
    pub relay: SocketAddr,
    /// Where its packets leave from (the peer port) and go (the other latched party).
    pub from: SocketAddr,
    pub to: SocketAddr,
}

/// Slots for the ports `base..base + len`.
pub struct PortTable<S> {
    base: u16,
    slots: Vec<Option<PortSlot<S>>>,
    /// The last rewritten packet.
    scratch: Vec<u8>,
    replies: std::collections::VecDeque<Reply>,
    /// RTP ports whose secure leg has timers.
    timers: Vec<u16>,
}

impl<S> PortTable<S> {
    /// A table for the relay range `port_min..=port_max`.
    pub fn new(port_min: u16, port_max: u16) -> PortTable<S> {
        let len = usize::from(port_max.saturating_sub(port_min)) + 1;
        PortTable {
            base: port_min,
            slots: (0..len).map(|_| None).collect(),
            scratch: Vec::with_capacity(2048),
            replies: Default::default(),
            timers: Vec::new(),
        }
    }

    fn index(&self, port: u16) -> Option<usize> {
        let i = usize::from(port.checked_sub(self.base)?);
        (i < self.slots.len()).then_some(i)
    }

    /// Puts a port in use, forwarding to `peer`. False for a port outside the range.
    pub fn open(&mut self, now: Instant, spec: PortSpec, peer: RelayPort, sock: Option<S>) -> bool {
        let Some(i) = self.index(spec.port.0) else { return false };
        self.slots[i] = Some(PortSlot {
            sock,
            bind: spec.bind,
            peer,
            latch: match spec.latched {
                Some(addr) => Latch::restored(spec.mode, spec.expected, addr),
                None => Latch::new(spec.mode, spec.expected, now),
            },
            published: spec.latched,
            stats: spec.stats,
            secure: None,
            mux: false,
            record: None,
        });
        true
    }

    /// A relay command applied to a table that has no sockets of its own (an agent's, a
    /// test's): links, expectations, security and closings.
    pub fn apply(&mut self, now: Instant, cmd: crate::relay::Command) {
        use crate::relay::Command;
        match cmd {
            Command::Link { a, b, .. } => {
                let (pa, pb) = (a.port, b.port);
                self.open(now, a, pb, None);
                self.open(now, b, pa, None);
            }
            Command::Expect { port, expected, .. } => self.expect(now, port, expected),
            Command::Secure { port, setup, mux, .. } => self.secure(port, setup.map(|s| *s), mux),
            Command::Unlink { ports, .. } => {
                for p in ports {
                    self.close(p);
                }
            }
            Command::Record { id, on, ports, .. } => self.record(id, on, &ports),
        }
    }

    /// Marks `ports` as recorded under recording `id` (or no longer, when `!on`).
    pub fn record(&mut self, id: u64, on: bool, ports: &[(RelayPort, Side)]) {
        for (port, side) in ports {
            if let Some(slot) = self.slot_mut(port.0) {
                slot.record = on.then_some((id, *side));
            }
        }
    }

    /// Whether what arrives on `port` is recorded: the recording's id and the sending side.
    pub fn recorded(&self, port: u16) -> Option<(u64, Side)> {
        self.slot(port)?.record
    }

    /// How the leg sending to RTP port `port` is secured (`None`: plain RTP), and whether
    /// it muxes RTCP. What did not change keeps its state.
    pub fn secure(&mut self, port: RelayPort, setup: Option<LegSetup>, mux: bool) {
        let Some(slot) = self.slot_mut(port.0) else { return };
        slot.mux = mux;
        match (setup, &mut slot.secure) {
            (None, s) => *s = None,
            (Some(setup), Some(leg)) => leg.update(setup),
            (Some(setup), s) => *s = Some(Box::new(SecureLeg::new(setup))),
        }
        if slot.secure.as_ref().is_some_and(|l| l.wants_timer()) && !self.timers.contains(&port.0) {
            self.timers.push(port.0);
        }
    }

    /// The packet a [`Forward`] with `rewritten` set sends.
    pub fn rewritten(&self) -> &[u8] {
        &self.scratch
    }

    pub fn has_replies(&self) -> bool {
        !self.replies.is_empty()
    }

    /// The next datagram a port sends back on its own.
    pub fn poll_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    /// Drives the secure legs' timers (DTLS retransmissions); call every few milliseconds
    /// while [`PortTable::has_timers`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut keep = Vec::with_capacity(self.timers.len());
        for port in std::mem::take(&mut self.timers) {
            let Some(slot) = self.slot_mut(port) else { continue };
            let bind = slot.bind;
            let Some(leg) = slot.secure.as_mut() else { continue };
            let out = leg.handle_timeout(now);
            let to = leg.peer();
            if leg.wants_timer() {
                keep.push(port);
            }
            if let Some(to) = to {
                for data in out {
                    self.reply(Reply { from_port: port, from_ip: bind, to, data });
                }
            }
        }
        self.timers = keep;
    }

    pub fn has_timers(&self) -> bool {
        !self.timers.is_empty()
    }

    fn reply(&mut self, r: Reply) {
        if self.replies.len() < MAX_REPLIES {
            self.replies.push_back(r);
        } else {
            metrics::counter!("pinhole_relay_replies_dropped_total").increment(1);
        }
    }

    fn handshakes(&self) -> usize {
        self.timers.len()
    }

    /// `port`'s flow, if the kernel may forward it: this port's party and its peer's are
    /// both latched (symmetric latching), neither leg is secure, and both ports are bound
    /// on a specific address.
    pub fn offloadable(&self, port: u16) -> Option<Offloadable> {
        let slot = self.slot(port)?;
        let peer = self.slot(slot.peer.0)?;
        let plain = |p: u16| self.slot(p & !1).is_some_and(|s| s.secure.is_none());
        if !plain(port) || !plain(slot.peer.0) || slot.bind.is_unspecified() || peer.bind.is_unspecified() {
            return None;
        }
        // A recorded call's packets must reach the recorder, which the kernel never feeds.
        if slot.record.is_some() || peer.record.is_some() {
            return None;
        }
        if slot.latch.mode() != crate::latch::LatchMode::Symmetric {
            return None;
        }
        Some(Offloadable {
            src: slot.latch.latched()?,
            relay: SocketAddr::new(slot.bind, port),
            from: SocketAddr::new(peer.bind, slot.peer.0),
            to: peer.latch.latched()?,
        })
    }

    /// The peer port of `port` (where its packets leave from).
    pub fn peer_of(&self, port: u16) -> Option<u16> {
        self.slot(port).map(|s| s.peer.0)
    }

    /// Counts what the kernel fast path forwarded for `port`'s party (see
    /// [`StreamStats::on_offloaded`]).
    pub fn account(&self, port: u16, now_ns: u64, (packets, bytes): (u64, u64), rtp: Option<Offloaded>) {
        if let Some(s) = self.slot(port) {
            s.stats.on_offloaded(now_ns, packets, bytes, rtp);
        }
    }

    /// Where `port`'s RTP sequence and jitter stand, for the kernel fast path to continue:
    /// (extended highest sequence number, jitter × 16), once RTP has arrived.
    pub fn sequence(&self, port: u16) -> Option<(u32, u32)> {
        self.slot(port)?.stats.sequence()
    }

    /// Signalling changed what `port` should expect: its learning window reopens.
    pub fn expect(&mut self, now: Instant, port: RelayPort, expected: Expected) {
        if let Some(slot) = self.slot_mut(port.0) {
            slot.latch.on_signal(now, expected);
        }
    }

    /// Takes a port out of use; returns its socket for the shell to deregister.
    pub fn close(&mut self, port: RelayPort) -> Option<S> {
        let i = self.index(port.0)?;
        self.slots[i].take()?.sock
    }

    pub fn slot(&self, port: u16) -> Option<&PortSlot<S>> {
        self.slots[self.index(port)?].as_ref()
    }

    fn slot_mut(&mut self, port: u16) -> Option<&mut PortSlot<S>> {
        let i = self.index(port)?;
        self.slots[i].as_mut()
    }

    /// Where packets leaving `port`'s peer for `port`'s side go: its latched (or signalled)
    /// address.
    pub fn destination(&self, port: u16) -> Option<SocketAddr> {
        self.slot(port)?.latch.destination()
    }

    /// A packet on `port` from a source vouched for elsewhere (a direct path's checked
    /// peer): counted and sent on like latched media, without asking the latch.
    pub fn deliver(&mut self, now_ns: u64, port: u16, data: &[u8]) -> Option<Forward> {
        let slot = self.slot_mut(port)?;
        slot.stats.on_packet(now_ns, data.len(), RtpInfo::parse(data));
        let from_port = slot.peer.0;
        let peer = self.slot(from_port)?;
        Some(Forward { from_port, from_ip: peer.bind, to: peer.latch.destination()?, rewritten: false })
    }

    /// RTCP a side sent to `port` (its RTP or RTCP port), accepted: its sender reports and
    /// round trip are kept with each side's RTP statistics, whichever port RTCP uses.
    fn observe_rtcp(&self, now_ns: u64, port: u16, data: &[u8]) {
        let Some(mine) = self.slot(port & !1) else { return };
        let Some(other) = self.slot(mine.peer.0 & !1) else { return };
        mine.stats.on_rtcp(&other.stats, now_ns, data);
    }

    /// One packet from `src` arriving on `port`: latched, counted, and where it goes — or
    /// `None` to drop it (unknown port, refused source, or no destination learned yet).
    /// `now_ns` is the counters' clock (nanoseconds since the relay's epoch).
    pub fn forward(&mut self, now: Instant, now_ns: u64, port: u16, src: SocketAddr, data: &[u8]) -> Option<Forward> {
        let peer_port = self.slot(port)?.peer.0;
        let secure = |p: u16| self.slot(p & !1).is_some_and(|s| s.secure.is_some());
        if secure(port) || secure(peer_port) {
            return self.forward_secure(now, now_ns, port, src, data);
        }
        let slot = self.slot_mut(port)?;
        let rtp = RtpInfo::parse(data);
        match slot.latch.on_packet(now, src, rtp) {
            Verdict::Forward => {
                slot.stats.on_packet(now_ns, data.len(), rtp);
                let latched = slot.latch.latched();
                if latched != slot.published {
                    slot.published = latched;
                    slot.stats.set_latched(latched);
                }
            }
            Verdict::Drop(_) => {
                slot.stats.on_drop();
                return None;
            }
        }
        let from_port = slot.peer.0;
        if rtp.is_none() && is_rtcp(data) {
            self.observe_rtcp(now_ns, port, data);
        }
        let peer = self.slot(from_port)?;
        Some(Forward { from_port, from_ip: peer.bind, to: peer.latch.destination()?, rewritten: false })
    }

    /// [`PortTable::forward`] where either leg is secure: control datagrams (STUN, DTLS)
    /// are the leg's own and answered from its port; media is taken from the leg's checked
    /// address only, unprotected with its keys, sent on (RTCP moved between a muxing and a
    /// non-muxing leg's ports) and protected with the other leg's.
    fn forward_secure(
        &mut self,
        now: Instant,
        now_ns: u64,
        port: u16,
        src: SocketAddr,
        data: &[u8],
    ) -> Option<Forward> {
        let here = port & !1;
        let first = *data.first()?;
        let handshakes = self.handshakes();
        let slot = self.slot_mut(here)?;
        let bind = slot.bind;
        if let Some(leg) = slot.secure.as_deref_mut() {
            // DTLS is the leg's own only from its checked address; without ICE, from the
            // source the port's latch takes.
            let dtls_from_leg = matches!(first, 20..=63)
                && if leg.has_ice() {
                    leg.peer() == Some(src)
                } else if slot.latch.on_packet(now, src, None) == Verdict::Forward {
                    leg.latch(src);
                    true
                } else {
                    false
                };
            let control = match first {
                0..=3 => Some(leg.on_stun(now, src, data)),
                20..=63 if dtls_from_leg && (handshakes < MAX_HANDSHAKES || leg.ready() || leg.wants_timer()) => {
                    Some(leg.on_dtls(now, src, data))
                }
                20..=63 => Some(crate::secure::Control { refused: true, ..Default::default() }),
                128..=191 => None,
                _ => Some(crate::secure::Control { refused: true, ..Default::default() }),
            };
            if let Some(c) = control {
                let timer = leg.wants_timer();
                if c.nominated {
                    slot.published = Some(src);
                    slot.stats.set_latched(Some(src));
                }
                if c.refused {
                    slot.stats.on_drop();
                    metrics::counter!("pinhole_relay_secure_dropped_total", "reason" => "control").increment(1);
                }
                for data in c.replies {
                    self.reply(Reply { from_port: port, from_ip: bind, to: src, data });
                }
                if timer && !self.timers.contains(&here) {
                    self.timers.push(here);
                }
                return None;
            }
        }
        let rtcp = is_rtcp(data);
        // Whether the packet comes from the leg's address.
        let from_leg = match self.slot(here).and_then(|s| s.secure.as_deref()) {
            Some(leg) if leg.has_ice() => leg.peer() == Some(src),
            _ => {
                let slot = self.slot_mut(port)?;
                matches!(slot.latch.on_packet(now, src, RtpInfo::parse(data)), Verdict::Forward)
            }
        };
        if !from_leg {
            self.slot(port)?.stats.on_drop();
            return None;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(data);
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.carry(now_ns, port, here, src, rtcp, &mut scratch);
        self.scratch = scratch;
        result
    }

    /// The media half of [`PortTable::forward_secure`], on the packet in `buf`.
    fn carry(
        &mut self,
        now_ns: u64,
        port: u16,
        here: u16,
        src: SocketAddr,
        rtcp: bool,
        buf: &mut Vec<u8>,
    ) -> Option<Forward> {
        let drop = |t: &mut Self, reason: &'static str| {
            if let Some(s) = t.slot(port) {
                s.stats.on_drop();
            }
            metrics::counter!("pinhole_relay_secure_dropped_total", "reason" => reason).increment(1);
            None
        };
        if let Some(leg) = self.slot_mut(here)?.secure.as_deref_mut() {
            if let Err(r) = leg.unprotect(buf, rtcp) {
                return drop(self, r.label());
            }
            // Without ICE, the address authenticated media comes from is the leg's.
            leg.latch(src);
        }
        if rtcp {
            self.observe_rtcp(now_ns, port, buf);
        }
        let slot = self.slot_mut(port)?;
        slot.stats.on_packet(now_ns, buf.len(), if rtcp { None } else { RtpInfo::parse(buf) });
        if slot.published != Some(src) {
            slot.published = Some(src);
            slot.stats.set_latched(Some(src));
        }
        // Where it leaves: the other leg's RTP port, or its RTCP port for RTCP unless it muxes.
        let there = slot.peer.0 & !1;
        let out_port = match (rtcp, self.slot(there)?.mux) {
            (true, false) => there + 1,
            _ => there,
        };
        let out = self.slot_mut(out_port)?;
        let from_ip = out.bind;
        let latch_to = out.latch.destination();
        let to = match self.slot_mut(there)?.secure.as_deref_mut() {
            Some(leg) => {
                if let Err(r) = leg.protect(buf, rtcp) {
                    return drop(self, r.label());
                }
                // A checked leg goes to its nominated address; without ICE the port's
                // own latch knows (RTCP to the RTCP port of a leg that does not mux).
                if leg.has_ice() {
                    leg.peer().or(latch_to)
                } else {
                    latch_to
                }
            }
            None => latch_to,
        };
        if buf.len() > 2048 {
            return drop(self, "too_large");
        }
        Some(Forward { from_port: out_port, from_ip, to: to?, rewritten: true })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use super::*;
    use crate::latch::LatchMode;

    fn spec(port: u16, sdp: &str, stats: &Arc<StreamStats>) -> PortSpec {
        PortSpec {
            iface: 0,
            bind: "203.0.113.1".parse().expect("ip"),
            port: RelayPort(port),
            expected: Expected { sdp: Some(sdp.parse().expect("addr")), signalling_ip: None },
            mode: LatchMode::default(),
            stats: stats.clone(),
            latched: None,
        }
    }

    /// Ports 30000 (A sends here) and 30002 (B sends here), linked.
    fn linked() -> (PortTable<()>, Arc<StreamStats>, Arc<StreamStats>, Instant) {
        let now = Instant::now();
        let (sa, sb) = (Arc::new(StreamStats::default()), Arc::new(StreamStats::default()));
        let mut t = PortTable::new(30000, 30099);
        assert!(t.open(now, spec(30000, "198.51.100.10:4000", &sa), RelayPort(30002), None));
        assert!(t.open(now, spec(30002, "198.51.100.20:5000", &sb), RelayPort(30000), None));
        (t, sa, sb, now)
    }

    #[test]
    fn a_packet_from_the_expected_source_leaves_from_the_peer_port_to_the_other_side() {
        let (mut t, sa, _, now) = linked();
        let f = t.forward(now, 1, 30000, "198.51.100.10:4000".parse().expect("a"), &[0x80; 172]);
        assert_eq!(
            f,
            Some(Forward {
                from_port: 30002,
                from_ip: "203.0.113.1".parse().expect("ip"),
                to: "198.51.100.20:5000".parse().expect("b"),
                rewritten: false,
            })
        );
        assert_eq!(sa.packets.load(Relaxed), 1);
    }

    #[test]
    fn a_stranger_is_dropped_and_counted() {
        let (mut t, sa, _, now) = linked();
        let later = now + Duration::from_secs(30);
        assert_eq!(t.forward(later, 1, 30000, "192.0.2.66:4000".parse().expect("x"), &[0x80; 172]), None);
        assert_eq!(sa.dropped.load(Relaxed), 1);
    }

    #[test]
    fn ports_outside_the_range_or_closed_forward_nothing() {
        let (mut t, _, _, now) = linked();
        let src = "198.51.100.10:4000".parse().expect("a");
        assert_eq!(t.forward(now, 1, 29999, src, &[0; 12]), None);
        assert_eq!(t.forward(now, 1, 30100, src, &[0; 12]), None);
        t.close(RelayPort(30002));
        assert_eq!(t.forward(now, 1, 30000, src, &[0x80; 172]), None, "no peer port left");
        assert!(t.slot(30002).is_none());
    }

    #[test]
    fn rtcp_on_its_own_ports_gives_the_round_trip_to_the_rtp_statistics() {
        let (mut t, sa, sb, now) = linked();
        let (ra, rb) = (Arc::new(StreamStats::default()), Arc::new(StreamStats::default()));
        assert!(t.open(now, spec(30001, "198.51.100.10:4001", &ra), RelayPort(30003), None));
        assert!(t.open(now, spec(30003, "198.51.100.20:5001", &rb), RelayPort(30001), None));
        let (a, b) = ("198.51.100.10:4001".parse().expect("a"), "198.51.100.20:5001".parse().expect("b"));
        let ms = 1_000_000;
        let sr = crate::rtcp::sender_report(0xa, 0x0102_0304);
        assert!(t.forward(now, 1_000 * ms, 30001, a, &sr).is_some());
        // B answers 150 ms later having held it 100 ms: a 50 ms round trip on B's leg.
        let rr = crate::rtcp::receiver_report(0xb, 0xa, 0x0102_0304, 6_554);
        assert!(t.forward(now, 1_150 * ms, 30003, b, &rr).is_some());
        let rtt = sb.rtt_us().expect("B's round trip");
        assert!((49_900..=50_100).contains(&rtt), "{rtt}");
        assert_eq!((sa.rtt_us(), ra.rtt_us(), rb.rtt_us()), (None, None, None));
        // A stranger's report never counts: it is dropped before it is read.
        let later = now + Duration::from_secs(30);
        let forged = crate::rtcp::receiver_report(0xa, 0xb, 0x0102_0304, 0);
        assert!(t.forward(later, 2_000 * ms, 30001, "192.0.2.66:4001".parse().expect("x"), &forged).is_none());
        assert_eq!(sa.rtt_us(), None);
    }

    #[test]
    fn an_expect_reopens_learning_for_the_new_address() {
        let (mut t, _, _, now) = linked();
        let moved = "198.51.100.11:4002".parse().expect("moved");
        t.expect(now, RelayPort(30000), Expected { sdp: Some(moved), signalling_ip: None });
        assert!(t.forward(now, 1, 30000, moved, &[0x80; 172]).is_some());
    }
}
