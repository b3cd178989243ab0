//! Per-stream counters, written by exactly one forwarding thread and readable by anyone at
//! any time without stopping forwarding (relaxed atomics; single writer).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::latch::RtpInfo;

/// RFC 3550 A.3/A.8 statistics for packets arriving on one relay port.
#[derive(Debug, Default)]
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
    base_seq: AtomicU32,
    /// Extended highest sequence number (cycles << 16 | seq).
    ext_max: AtomicU32,
    /// Interarrival jitter × 16 in timestamp units (RFC 3550 A.8), for 8 kHz clocks.
    jitter16: AtomicU32,
    last_transit: AtomicU32,
    /// The source the port latched, published by the forwarding thread when it changes
    /// (not per packet), for the relay's call state (takeover).
    latched: Mutex<Option<SocketAddr>>,
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
        if n == 0 {
            self.base_seq.store(u32::from(r.seq), Relaxed);
            self.ext_max.store(u32::from(r.seq), Relaxed);
        } else {
            let max = self.ext_max.load(Relaxed);
            let delta = r.seq.wrapping_sub(max as u16);
            if delta != 0 && delta < 0x8000 {
                self.ext_max.store(max.wrapping_add(u32::from(delta)), Relaxed);
            }
        }
        // Jitter: only meaningful for a known clock; static payload types 0–34 are 8 kHz
        // except a few, which is what G.711 phones send.
        if r.payload_type <= 34 {
            let arrival = (now_ns / 125_000) as u32; // 8 kHz units
            let transit = arrival.wrapping_sub(r.timestamp);
            if n > 0 {
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

    /// `packets` (`bytes`) the kernel fast path forwarded since they were last counted
    /// (none when 0): counted, and the stream was active at `now_ns` — with RTP when `rtp`
    /// (agents' keepalives are not). Loss and jitter are not measured for them.
    pub fn on_offloaded(&self, now_ns: u64, packets: u64, bytes: u64, rtp: bool) {
        if packets == 0 {
            return;
        }
        self.packets.store(self.packets.load(Relaxed) + packets, Relaxed);
        self.bytes.store(self.bytes.load(Relaxed) + bytes, Relaxed);
        self.last_ns.store(now_ns.max(1), Relaxed);
        if rtp {
            self.last_rtp_ns.store(now_ns.max(1), Relaxed);
        }
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

    /// Packets lost, estimated from sequence numbers (RFC 3550 A.3); never negative.
    pub fn lost(&self) -> u64 {
        let n = self.rtp_packets.load(Relaxed);
        if n == 0 {
            return 0;
        }
        let expected = u64::from(self.ext_max.load(Relaxed).wrapping_sub(self.base_seq.load(Relaxed))) + 1;
        expected.saturating_sub(n)
    }

    /// Interarrival jitter in milliseconds (8 kHz clock assumed).
    pub fn jitter_ms(&self) -> f64 {
        f64::from(self.jitter16.load(Relaxed) >> 4) / 8.0
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
