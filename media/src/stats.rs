//! Per-stream counters, written by exactly one forwarding thread and readable by anyone at
//! any time without stopping forwarding (relaxed atomics; single writer).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::latch::RtpInfo;

/// A jump of at most this many sequence numbers is loss; more is a restart if the next
/// packet follows it (RFC 3550 A.1).
const MAX_DROPOUT: u16 = 3000;
/// A sequence number at most this far behind the highest is late or duplicate.
const MAX_MISORDER: u16 = 100;
/// `bad_seq` when no jump is pending.
const NO_BAD_SEQ: u32 = u32::MAX;
/// Sender reports remembered per stream for round trips (one per 5 s is typical).
const SENDER_REPORTS: usize = 4;

/// RFC 3550 A.1/A.3/A.8 statistics for packets arriving on one relay port.
#[derive(Debug)]
pub struct StreamStats {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Packets dropped by latching (not from the accepted source).
    pub dropped: AtomicU64,
    /// Nanoseconds since the relay epoch of the last accepted packet; 0 = none yet.
    pub last_ns: AtomicU64,
    /// Nanoseconds since the relay epoch of the last accepted RTP packet; 0 = none yet.
    pub last_rtp_ns: AtomicU64,
    /// RTP packets counted for loss (excluding RTCP).
    rtp_packets: AtomicU64,
    /// The SSRC of the current sequence; a new one starts a new sequence.
    ssrc: AtomicU32,
    base_seq: AtomicU32,
    /// Extended highest sequence number (cycles << 16 | seq) of the current sequence.
    ext_max: AtomicU32,
    /// Packets received in the current sequence.
    seq_received: AtomicU64,
    /// Expected and received of the sequences before it (SSRC changes, restarts).
    prior_expected: AtomicU64,
    prior_received: AtomicU64,
    /// After a jump: the sequence number that confirms a restart (RFC 3550 A.1).
    bad_seq: AtomicU32,
    /// Interarrival jitter × 16 in timestamp units (RFC 3550 A.8), for 8 kHz clocks.
    jitter16: AtomicU32,
    last_transit: AtomicU32,
    /// Round trip between the relay and this side in µs, from its RTCP reports on the
    /// other side's sender reports; 0 = not known.
    rtt_us: AtomicU32,
    /// This side's recent sender reports: (NTP middle 32 bits, arrival ns). RTCP is rare,
    /// so a lock here costs nothing per RTP packet.
    sender_reports: Mutex<[(u32, u64); SENDER_REPORTS]>,
    /// The last report block this side sent (and whether a sender report carried it), and
    /// how many it has sent: what the relay exports to a capture server.
    last_block: Mutex<Option<(bool, crate::rtcp::ReportBlock)>>,
    blocks: AtomicU64,
    /// The source the port latched, published by the forwarding thread when it changes
    /// (not per packet), for the relay's call state (takeover).
    latched: Mutex<Option<SocketAddr>>,
}

impl Default for StreamStats {
    fn default() -> StreamStats {
        StreamStats {
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            last_rtp_ns: AtomicU64::new(0),
            rtp_packets: AtomicU64::new(0),
            ssrc: AtomicU32::new(0),
            base_seq: AtomicU32::new(0),
            ext_max: AtomicU32::new(0),
            seq_received: AtomicU64::new(0),
            prior_expected: AtomicU64::new(0),
            prior_received: AtomicU64::new(0),
            bad_seq: AtomicU32::new(NO_BAD_SEQ),
            jitter16: AtomicU32::new(0),
            last_transit: AtomicU32::new(0),
            rtt_us: AtomicU32::new(0),
            sender_reports: Mutex::new([(0, 0); SENDER_REPORTS]),
            last_block: Mutex::new(None),
            blocks: AtomicU64::new(0),
            latched: Mutex::new(None),
        }
    }
}

/// RTP the kernel fast path forwarded since it was last counted: how many, the extended
/// highest sequence number it reached and its jitter × 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloaded {
    pub packets: u64,
    pub ext_max: u32,
    pub jitter16: u32,
}

/// What a stream's packets say of its quality so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Packets the sequence numbers say were sent, and those that never arrived.
    pub expected: u64,
    pub lost: u64,
    pub jitter_ms: f64,
    pub ssrc: u32,
}

impl Quality {
    pub fn loss_pct(&self) -> f64 {
        crate::quality::percent(self.lost, self.expected)
    }
}

impl StreamStats {
    /// Counts an accepted packet. `now_ns` is the arrival time since the relay epoch.
    pub fn on_packet(&self, now_ns: u64, len: usize, rtp: Option<RtpInfo>) {
        self.packets.store(self.packets.load(Relaxed) + 1, Relaxed);
        self.bytes.store(self.bytes.load(Relaxed) + len as u64, Relaxed);
        self.last_ns.store(now_ns.max(1), Relaxed);
        let Some(r) = rtp else { return };
        self.last_rtp_ns.store(now_ns.max(1), Relaxed);
        let n = self.rtp_packets.load(Relaxed);
        self.rtp_packets.store(n + 1, Relaxed);
        let mut fresh = n == 0 || r.ssrc != self.ssrc.load(Relaxed);
        if fresh {
            if n > 0 {
                self.end_sequence();
            }
            self.ssrc.store(r.ssrc, Relaxed);
            self.start_sequence(r.seq);
        } else {
            let max = self.ext_max.load(Relaxed);
            let delta = r.seq.wrapping_sub(max as u16);
            if delta < MAX_DROPOUT {
                self.ext_max.store(max.wrapping_add(u32::from(delta)), Relaxed);
                self.seq_received.store(self.seq_received.load(Relaxed) + 1, Relaxed);
            } else if delta <= u16::MAX - MAX_MISORDER {
                // A jump: the sender restarted its sequence if the next packet follows
                // this one; until then this one is not counted (RFC 3550 A.1).
                if u32::from(r.seq) == self.bad_seq.load(Relaxed) {
                    self.end_sequence();
                    self.start_sequence(r.seq);
                    fresh = true;
                } else {
                    self.bad_seq.store(u32::from(r.seq.wrapping_add(1)), Relaxed);
                    return;
                }
            } else {
                // Late or duplicate.
                self.seq_received.store(self.seq_received.load(Relaxed) + 1, Relaxed);
            }
        }
        // Jitter: only meaningful for a known clock; static payload types 0–34 are 8 kHz
        // except a few, which is what G.711 phones send.
        if r.payload_type <= 34 {
            let arrival = (now_ns / 125_000) as u32; // 8 kHz units
            let transit = arrival.wrapping_sub(r.timestamp);
            if !fresh {
                let last = self.last_transit.load(Relaxed);
                let d = transit.wrapping_sub(last) as i32;
                let d = d.unsigned_abs();
                let j = self.jitter16.load(Relaxed);
                // J += (|D| - J) / 16, kept scaled by 16.
                let j_new = j.wrapping_add(d).wrapping_sub(j >> 4);
                self.jitter16.store(j_new, Relaxed);
            }
            self.last_transit.store(transit, Relaxed);
        }
    }

    fn start_sequence(&self, seq: u16) {
        self.base_seq.store(u32::from(seq), Relaxed);
        self.ext_max.store(u32::from(seq), Relaxed);
        self.seq_received.store(1, Relaxed);
        self.bad_seq.store(NO_BAD_SEQ, Relaxed);
    }

    /// Folds the current sequence into the totals before a new one starts.
    fn end_sequence(&self) {
        let expected = u64::from(self.ext_max.load(Relaxed).wrapping_sub(self.base_seq.load(Relaxed))) + 1;
        self.prior_expected.store(self.prior_expected.load(Relaxed) + expected, Relaxed);
        self.prior_received.store(self.prior_received.load(Relaxed) + self.seq_received.load(Relaxed), Relaxed);
    }

    /// RTCP this side sent (`self`), arriving at `now_ns`; `other` is the other side's
    /// statistics for the same component. A sender report is remembered; a report block
    /// echoing one of the other side's sender reports gives this side's round trip: now,
    /// less when that report passed the relay, less the delay the reporter says it held it.
    pub fn on_rtcp(&self, other: &StreamStats, now_ns: u64, data: &[u8]) {
        let mut sender = None;
        crate::rtcp::for_each(data, |item| match item {
            crate::rtcp::Item::Sender { ssrc, ntp_middle } => {
                sender = Some(ssrc);
                let mut reports = self.sender_reports.lock().unwrap_or_else(|p| p.into_inner());
                // Replace the oldest.
                if let Some(slot) = reports.iter_mut().min_by_key(|(_, at)| *at) {
                    *slot = (ntp_middle, now_ns);
                }
            }
            crate::rtcp::Item::Block(b) => {
                *self.last_block.lock().unwrap_or_else(|p| p.into_inner()) = Some((sender == Some(b.reporter), b));
                self.blocks.store(self.blocks.load(Relaxed) + 1, Relaxed);
                if b.lsr == 0 {
                    return;
                }
                let sent = other
                    .sender_reports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|(lsr, at)| *lsr == b.lsr && *at != 0)
                    .map(|(_, at)| *at);
                let held_ns = u64::from(b.dlsr) * 1_000_000_000 / 65_536;
                if let Some(rtt) = sent.and_then(|at| now_ns.checked_sub(at)?.checked_sub(held_ns)) {
                    // Ten seconds or more is a confused reporter, not a round trip.
                    if rtt < 10_000_000_000 {
                        self.rtt_us.store(((rtt / 1000) as u32).max(1), Relaxed);
                    }
                }
            }
        });
    }

    /// How many report blocks this side has sent, and the last.
    pub fn last_report(&self) -> (u64, Option<(bool, crate::rtcp::ReportBlock)>) {
        (self.blocks.load(Relaxed), *self.last_block.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Round trip between the relay and this side, when its RTCP told it.
    pub fn rtt_us(&self) -> Option<u32> {
        Some(self.rtt_us.load(Relaxed)).filter(|r| *r > 0)
    }

    /// `packets` (`bytes`) the kernel fast path forwarded since they were last counted
    /// (none when 0): counted, and the stream was active at `now_ns` — with RTP when `rtp`
    /// says some were (agents' keepalives are not), whose sequence and jitter the program
    /// carried on from [`StreamStats::sequence`].
    pub fn on_offloaded(&self, now_ns: u64, packets: u64, bytes: u64, rtp: Option<Offloaded>) {
        if packets == 0 {
            return;
        }
        self.packets.store(self.packets.load(Relaxed) + packets, Relaxed);
        self.bytes.store(self.bytes.load(Relaxed) + bytes, Relaxed);
        self.last_ns.store(now_ns.max(1), Relaxed);
        let Some(r) = rtp.filter(|r| r.packets > 0) else { return };
        self.last_rtp_ns.store(now_ns.max(1), Relaxed);
        let n = self.rtp_packets.load(Relaxed);
        self.rtp_packets.store(n + r.packets, Relaxed);
        if n == 0 {
            // The kernel saw this stream's first RTP: its sequence started where the packets
            // counted so far say.
            self.base_seq.store(r.ext_max.wrapping_sub(r.packets as u32).wrapping_add(1), Relaxed);
            self.ext_max.store(r.ext_max, Relaxed);
            self.seq_received.store(r.packets, Relaxed);
        } else {
            // The program extended the 16-bit number it was given: keep our cycles.
            let max = self.ext_max.load(Relaxed);
            let delta = (r.ext_max as u16).wrapping_sub(max as u16);
            if delta < MAX_DROPOUT {
                self.ext_max.store(max.wrapping_add(u32::from(delta)), Relaxed);
            }
            self.seq_received.store(self.seq_received.load(Relaxed) + r.packets, Relaxed);
        }
        self.jitter16.store(r.jitter16, Relaxed);
    }

    /// Where the RTP sequence and jitter stand, for the kernel fast path to carry on:
    /// (extended highest sequence number, jitter × 16); `None` before any RTP.
    pub fn sequence(&self) -> Option<(u32, u32)> {
        (self.rtp_packets.load(Relaxed) > 0).then(|| (self.ext_max.load(Relaxed), self.jitter16.load(Relaxed)))
    }

    /// The forwarding thread latched a new source (rare: once per stream, or a rebind).
    pub fn set_latched(&self, addr: Option<SocketAddr>) {
        *self.latched.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    pub fn latched(&self) -> Option<SocketAddr> {
        *self.latched.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn on_drop(&self) {
        self.dropped.store(self.dropped.load(Relaxed) + 1, Relaxed);
    }

    /// RTP packets the sequence numbers say were sent, over every sequence so far.
    pub fn expected(&self) -> u64 {
        if self.rtp_packets.load(Relaxed) == 0 {
            return 0;
        }
        let current = u64::from(self.ext_max.load(Relaxed).wrapping_sub(self.base_seq.load(Relaxed))) + 1;
        self.prior_expected.load(Relaxed) + current
    }

    /// RTP packets that arrived and were counted for loss.
    pub fn received(&self) -> u64 {
        if self.rtp_packets.load(Relaxed) == 0 {
            return 0;
        }
        self.prior_received.load(Relaxed) + self.seq_received.load(Relaxed)
    }

    /// Packets lost, estimated from sequence numbers (RFC 3550 A.3); never negative.
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received())
    }

    /// Interarrival jitter in milliseconds (8 kHz clock assumed).
    pub fn jitter_ms(&self) -> f64 {
        f64::from(self.jitter16.load(Relaxed) >> 4) / 8.0
    }

    pub fn quality(&self) -> Quality {
        Quality {
            expected: self.expected(),
            lost: self.lost(),
            jitter_ms: self.jitter_ms(),
            ssrc: self.ssrc.load(Relaxed),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            packets: self.packets.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            lost: self.lost(),
            jitter_ms: self.jitter_ms(),
            last_ns: self.last_ns.load(Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatsSnapshot {
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub lost: u64,
    pub jitter_ms: f64,
    pub last_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16, ts: u32) -> Option<RtpInfo> {
        Some(RtpInfo { ssrc: 1, seq, timestamp: ts, payload_type: 0 })
    }

    #[test]
    fn loss_is_estimated_from_sequence_gaps_across_wraparound() {
        let s = StreamStats::default();
        let mut t = 0;
        for seq in [65530u16, 65531, 65533, 65534, 0, 1, 4] {
            t += 20_000_000;
            s.on_packet(t, 172, rtp(seq, u32::from(seq) * 160));
        }
        // 65530..=65535, 0..=4 is 11 expected, 7 received.
        assert_eq!(s.lost(), 4);
        assert_eq!(s.snapshot().packets, 7);
        assert_eq!(s.snapshot().bytes, 7 * 172);
    }

    fn rtp_from(ssrc: u32, seq: u16) -> Option<RtpInfo> {
        Some(RtpInfo { ssrc, seq, timestamp: u32::from(seq) * 160, payload_type: 0 })
    }

    #[test]
    fn a_new_ssrc_or_a_confirmed_jump_starts_a_new_sequence_without_counting_the_gap_as_loss() {
        let s = StreamStats::default();
        let mut t = 0;
        let mut send = |ssrc, seqs: &[u16]| {
            for &seq in seqs {
                t += 20_000_000;
                s.on_packet(t, 172, rtp_from(ssrc, seq));
            }
        };
        send(1, &[100, 101, 103]); // one lost
        send(2, &[40_000, 40_001]); // a re-INVITE's new SSRC
        send(2, &[7, 8, 9]); // a restart: the jump confirmed by the packet after it
        send(2, &[30_000]); // a stray jump never confirmed
        send(2, &[10, 11]);
        assert_eq!(s.lost(), 1, "only the gap in the first sequence");
        // 100..=103, 40000..=40001 and 8..=11 expected; neither the stray jump nor the
        // packet that opened the confirmed one (7) counts.
        assert_eq!(s.expected(), 10);
        assert_eq!(s.received(), 9);
        assert_eq!(s.quality().ssrc, 2);
    }

    #[test]
    fn late_and_duplicate_packets_do_not_move_the_highest_sequence() {
        let s = StreamStats::default();
        for (i, seq) in [10u16, 11, 12, 11, 9, 13].into_iter().enumerate() {
            s.on_packet(i as u64 * 20_000_000, 172, rtp_from(5, seq));
        }
        assert_eq!(s.expected(), 4, "10..=13");
        assert_eq!(s.lost(), 0, "the late 9 and the duplicate 11 make up for nothing lost");
    }

    #[test]
    fn a_report_echoing_the_other_sides_sender_report_gives_the_reporters_round_trip() {
        let (a, b) = (StreamStats::default(), StreamStats::default());
        let ms = 1_000_000u64;
        a.on_rtcp(&b, 1_000 * ms, &crate::rtcp::sender_report(0xa, 0x1234_5678));
        assert_eq!(b.rtt_us(), None);
        // B held the report 250 ms (16384/65536 s) and answered 330 ms after it passed: the
        // relay–B round trip is 80 ms.
        b.on_rtcp(&a, 1_330 * ms, &crate::rtcp::receiver_report(0xb, 0xa, 0x1234_5678, 16_384));
        assert_eq!(b.rtt_us(), Some(80_000));
        assert_eq!(a.rtt_us(), None, "A has not reported");
        // An LSR nobody sent, a zero LSR and a DLSR longer than the wait change nothing.
        b.on_rtcp(&a, 2_000 * ms, &crate::rtcp::receiver_report(0xb, 0xa, 0x9999_9999, 0));
        b.on_rtcp(&a, 2_000 * ms, &crate::rtcp::receiver_report(0xb, 0xa, 0, 0));
        b.on_rtcp(&a, 1_400 * ms, &crate::rtcp::receiver_report(0xb, 0xa, 0x1234_5678, 65_536));
        assert_eq!(b.rtt_us(), Some(80_000));
    }

    #[test]
    fn loss_counts_across_the_handover_to_the_kernel_fast_path_and_back() {
        let s = StreamStats::default();
        for seq in 0..100u16 {
            s.on_packet(u64::from(seq) * 20_000_000, 172, rtp_from(9, seq));
        }
        let (ext_max, jitter16) = s.sequence().expect("RTP seen");
        assert_eq!(ext_max, 99);
        // The kernel forwards 195 of the next 200 (5 lost on the way) and its
        // jitter drifts up.
        let jitter16 = jitter16 + 160;
        s.on_offloaded(5_000_000_000, 195, 195 * 172, Some(Offloaded { packets: 195, ext_max: 299, jitter16 }));
        assert_eq!((s.expected(), s.lost()), (300, 5));
        assert!(s.jitter_ms() >= 1.25, "{}", s.jitter_ms());
        // Back in userspace: the sequence goes on from the kernel's.
        s.on_packet(6_000_000_000, 172, rtp_from(9, 300));
        assert_eq!((s.expected(), s.lost()), (301, 5));
        // A stream the kernel saw from its first RTP packet.
        let k = StreamStats::default();
        k.on_offloaded(1, 100, 17_200, Some(Offloaded { packets: 100, ext_max: 65_535 + 50, jitter16: 0 }));
        assert_eq!((k.expected(), k.lost()), (100, 0));
    }

    #[test]
    fn steady_stream_has_no_jitter_and_late_packets_add_some() {
        let s = StreamStats::default();
        for i in 0..50u32 {
            s.on_packet(u64::from(i) * 20_000_000, 172, rtp(i as u16, i * 160));
        }
        assert!(s.jitter_ms() < 0.2, "{}", s.jitter_ms());
        for i in 50..100u32 {
            let wobble = if i % 2 == 0 { 15_000_000 } else { 0 };
            s.on_packet(u64::from(i) * 20_000_000 + wobble, 172, rtp(i as u16, i * 160));
        }
        assert!(s.jitter_ms() > 5.0, "{}", s.jitter_ms());
    }
}
