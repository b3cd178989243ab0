//! The data plane's port table and forwarding rule, sans-IO: one slot per relay port of the
//! range, each with its latch, counters and the peer port packets leave from. The shell's
//! forwarding threads own one table each and attach their socket handle (`S`) to a slot;
//! per packet, [`PortTable::forward`] decides whether it goes on and where.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::latch::{Expected, Latch, RtpInfo, Verdict};
use crate::relay::{PortSpec, RelayPort};
use crate::stats::StreamStats;

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
}

/// Where an accepted packet goes: sent from `from_port` (bound on `from_ip`) to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub from_port: u16,
    pub from_ip: IpAddr,
    pub to: SocketAddr,
}

/// Slots for the ports `base..base + len`.
pub struct PortTable<S> {
    base: u16,
    slots: Vec<Option<PortSlot<S>>>,
}

impl<S> PortTable<S> {
    /// A table for the relay range `port_min..=port_max`.
    pub fn new(port_min: u16, port_max: u16) -> PortTable<S> {
        let len = usize::from(port_max.saturating_sub(port_min)) + 1;
        PortTable { base: port_min, slots: (0..len).map(|_| None).collect() }
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
        });
        true
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
        Some(Forward { from_port, from_ip: peer.bind, to: peer.latch.destination()? })
    }

    /// One packet from `src` arriving on `port`: latched, counted, and where it goes — or
    /// `None` to drop it (unknown port, refused source, or no destination learned yet).
    /// `now_ns` is the counters' clock (nanoseconds since the relay's epoch).
    pub fn forward(&mut self, now: Instant, now_ns: u64, port: u16, src: SocketAddr, data: &[u8]) -> Option<Forward> {
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
        let peer = self.slot(from_port)?;
        Some(Forward { from_port, from_ip: peer.bind, to: peer.latch.destination()? })
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
                to: "198.51.100.20:5000".parse().expect("b")
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
    fn an_expect_reopens_learning_for_the_new_address() {
        let (mut t, _, _, now) = linked();
        let moved = "198.51.100.11:4002".parse().expect("moved");
        t.expect(now, RelayPort(30000), Expected { sdp: Some(moved), signalling_ip: None });
        assert!(t.forward(now, 1, 30000, moved, &[0x80; 172]).is_some());
    }
}
