//! Source latching for one relay port: who may send to it, and where the other side's
//! packets go. Safe by default against the RTP Bleed class of attacks
//! (CVE-2017-14099, CVE-2017-14114, CVE-2025-53399): a third party sending from
//! elsewhere never redirects a stream.
//!
//! Rules:
//! - Candidates are ranked: the SDP address and port, then an expected IP (the SDP's, or
//!   the one signalling came from), then anything. With an expected IP known, unranked
//!   sources are never learned.
//! - The first packet from the best available rank latches the stream; from then on only
//!   that source is accepted (strict source).
//! - A later, better-ranked source may take over only while a learning window is open,
//!   and windows open only on signalling (offer/answer).
//! - A NAT rebind (same stream, new source) is followed only with proof: the same SSRC
//!   with a sequence number that continues the stream.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long a signalling event lets a better-ranked source take over a latched stream.
pub const LEARN_WINDOW: Duration = Duration::from_secs(3);
/// How far ahead of the last sequence number a rebinding source may be.
pub const REBIND_SEQ_WINDOW: u16 = 200;

/// The fields of an RTP header that latching and statistics use (RFC 3550 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpInfo {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub payload_type: u8,
}

/// Whether `b` is an RTCP packet (version 2, packet type 200–207, RFC 5761 §4).
pub fn is_rtcp(b: &[u8]) -> bool {
    b.len() >= 8 && b[0] >> 6 == 2 && (200..=207).contains(&b[1])
}

impl RtpInfo {
    /// Parses an RTP header; `None` for RTCP (RFC 5761 §4 payload types 64–95) and for
    /// anything that is not RTP version 2.
    pub fn parse(b: &[u8]) -> Option<RtpInfo> {
        if b.len() < 12 || b[0] >> 6 != 2 {
            return None;
        }
        let pt = b[1] & 0x7f;
        if (64..96).contains(&pt) {
            return None;
        }
        let csrc = usize::from(b[0] & 0x0f) * 4;
        if b.len() < 12 + csrc {
            return None;
        }
        Some(RtpInfo {
            payload_type: pt,
            seq: u16::from_be_bytes([b[2], b[3]]),
            timestamp: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

/// How a stream latches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatchMode {
    /// Learn the peer's real address from its packets and send back to it (symmetric RTP).
    #[default]
    Symmetric,
    /// Never learn: send to the SDP address; accept only expected IPs when any are known.
    Asymmetric,
}

/// What the endpoint behind this port is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expected {
    /// Address and port from the SDP.
    pub sdp: Option<SocketAddr>,
    /// The address signalling for this endpoint came from (its NAT's public address).
    pub signalling_ip: Option<IpAddr>,
}

impl Expected {
    /// Rank of a source: 0 is best; `None` means not an expected source at all.
    fn rank(&self, src: SocketAddr) -> Option<u8> {
        if self.sdp == Some(src) {
            Some(0)
        } else if self.sdp.map(|s| s.ip()) == Some(src.ip()) || self.signalling_ip == Some(src.ip()) {
            Some(1)
        } else if self.knows_ip() {
            None
        } else {
            Some(2)
        }
    }

    fn knows_ip(&self) -> bool {
        self.signalling_ip.is_some() || self.sdp.is_some_and(|s| !s.ip().is_unspecified())
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// From a source that is neither latched nor allowed to take over.
    NotLatched,
    /// Not an expected source, and none is latched yet.
    Unexpected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Learned {
    addr: SocketAddr,
    rank: u8,
    ssrc: Option<u32>,
    seq: Option<u16>,
}

#[derive(Debug, Clone, Default)]
pub struct Latch {
    mode: LatchMode,
    expected: Expected,
    learned: Option<Learned>,
    /// Until when a better-ranked source may take over (opened by signalling).
    window_until: Option<Instant>,
}

impl Latch {
    pub fn new(mode: LatchMode, expected: Expected, now: Instant) -> Latch {
        Latch { mode, expected, learned: None, window_until: Some(now + LEARN_WINDOW) }
    }

    /// A latch taken over from another relay node, already latched to `addr`: strict from
    /// the start (no learning window; a rebind still follows the stream's proof).
    pub fn restored(mode: LatchMode, expected: Expected, addr: SocketAddr) -> Latch {
        let rank = expected.rank(addr).unwrap_or(2);
        Latch { mode, expected, learned: Some(Learned { addr, rank, ssrc: None, seq: None }), window_until: None }
    }

    /// A signalling event (offer, answer, re-INVITE) updated what to expect.
    pub fn on_signal(&mut self, now: Instant, expected: Expected) {
        self.expected = expected;
        self.window_until = Some(now + LEARN_WINDOW);
    }

    /// Where packets for this endpoint go: the latched source, else the SDP address.
    pub fn destination(&self) -> Option<SocketAddr> {
        match (self.mode, self.learned) {
            (LatchMode::Symmetric, Some(l)) => Some(l.addr),
            _ => self.expected.sdp.filter(|a| !a.ip().is_unspecified() && a.port() != 0),
        }
    }

    pub fn mode(&self) -> LatchMode {
        self.mode
    }

    pub fn latched(&self) -> Option<SocketAddr> {
        self.learned.map(|l| l.addr)
    }

    /// Decides whether a packet from `src` is accepted, learning or re-learning the source
    /// when the rules allow.
    pub fn on_packet(&mut self, now: Instant, src: SocketAddr, rtp: Option<RtpInfo>) -> Verdict {
        let rank = self.expected.rank(src);
        if self.mode == LatchMode::Asymmetric {
            return if rank.is_some() { Verdict::Forward } else { Verdict::Drop(DropReason::Unexpected) };
        }
        let Some(learned) = self.learned else {
            return match rank {
                Some(r) => {
                    self.learn(src, r, rtp);
                    Verdict::Forward
                }
                None => Verdict::Drop(DropReason::Unexpected),
            };
        };
        if learned.addr == src {
            if let Some(r) = rtp {
                self.learned = Some(Learned { ssrc: Some(r.ssrc), seq: Some(r.seq), ..learned });
            }
            return Verdict::Forward;
        }
        // A NAT rebind: the same stream continuing from a new address.
        if let (Some(r), Some(ssrc), Some(seq)) = (rtp, learned.ssrc, learned.seq) {
            let ahead = r.seq.wrapping_sub(seq);
            if r.ssrc == ssrc && (1..=REBIND_SEQ_WINDOW).contains(&ahead) && rank.is_some() {
                self.learn(src, rank.unwrap_or(2).min(learned.rank), rtp);
                return Verdict::Forward;
            }
        }
        // A better-ranked source after signalling, inside the window.
        let window_open = self.window_until.is_some_and(|t| now <= t);
        if let Some(r) = rank {
            if window_open && r < learned.rank {
                self.learn(src, r, rtp);
                return Verdict::Forward;
            }
        }
        Verdict::Drop(DropReason::NotLatched)
    }

    fn learn(&mut self, src: SocketAddr, rank: u8, rtp: Option<RtpInfo>) {
        self.learned = Some(Learned { addr: src, rank, ssrc: rtp.map(|r| r.ssrc), seq: rtp.map(|r| r.seq) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn rtp(ssrc: u32, seq: u16) -> Option<RtpInfo> {
        Some(RtpInfo { ssrc, seq, timestamp: u32::from(seq) * 160, payload_type: 0 })
    }

    /// A phone behind a NAT: SDP says its private address, signalling came from the NAT.
    fn natted(now: Instant) -> Latch {
        Latch::new(
            LatchMode::Symmetric,
            Expected { sdp: Some(sa("198.51.100.10:4000")), signalling_ip: Some("203.0.113.2".parse().expect("ip")) },
            now,
        )
    }

    #[test]
    fn phone_behind_nat_is_learned_from_its_public_address() {
        let t = Instant::now();
        let mut l = natted(t);
        assert_eq!(l.destination(), Some(sa("198.51.100.10:4000")), "SDP until latched");
        assert_eq!(l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 10)), Verdict::Forward);
        assert_eq!(l.destination(), Some(sa("203.0.113.2:61000")));
    }

    #[test]
    fn attacker_before_first_packet_is_never_learned() {
        let t = Instant::now();
        let mut l = natted(t);
        // RTP Bleed: the attacker sprays the port before the phone's first packet.
        assert_eq!(l.on_packet(t, sa("192.0.2.66:5555"), rtp(9, 1)), Verdict::Drop(DropReason::Unexpected));
        assert_eq!(l.latched(), None);
        assert_eq!(l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 10)), Verdict::Forward);
        assert_eq!(l.latched(), Some(sa("203.0.113.2:61000")));
    }

    #[test]
    fn attacker_after_latching_is_dropped_even_inside_the_window() {
        let t = Instant::now();
        let mut l = natted(t);
        l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 10));
        for seq in 11..20 {
            assert_eq!(l.on_packet(t, sa("192.0.2.66:5555"), rtp(1, seq)), Verdict::Drop(DropReason::NotLatched));
        }
        assert_eq!(l.destination(), Some(sa("203.0.113.2:61000")));
    }

    #[test]
    fn attacker_from_the_phones_own_nat_ip_cannot_take_over_without_the_stream() {
        let t = Instant::now();
        let mut l = natted(t);
        l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 10));
        // Same public IP (another host behind the NAT), guessed SSRC wrong.
        assert_eq!(l.on_packet(t, sa("203.0.113.2:62000"), rtp(2, 11)), Verdict::Drop(DropReason::NotLatched));
        // Right SSRC but a sequence number far from the stream's.
        assert_eq!(l.on_packet(t, sa("203.0.113.2:62000"), rtp(1, 30000)), Verdict::Drop(DropReason::NotLatched));
        assert_eq!(l.latched(), Some(sa("203.0.113.2:61000")));
    }

    #[test]
    fn nat_rebind_with_same_ssrc_and_continuing_sequence_is_followed() {
        let t = Instant::now();
        let mut l = natted(t);
        l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 10));
        l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 11));
        let later = t + Duration::from_secs(60);
        assert_eq!(l.on_packet(later, sa("203.0.113.2:61500"), rtp(1, 12)), Verdict::Forward);
        assert_eq!(l.destination(), Some(sa("203.0.113.2:61500")));
        // The old mapping replaying packets already seen is now a stranger.
        assert_eq!(l.on_packet(later, sa("203.0.113.2:61000"), rtp(1, 12)), Verdict::Drop(DropReason::NotLatched));
        assert_eq!(l.on_packet(later, sa("203.0.113.2:61000"), rtp(1, 5)), Verdict::Drop(DropReason::NotLatched));
    }

    #[test]
    fn rebind_from_an_unexpected_ip_is_refused_even_with_the_stream() {
        let t = Instant::now();
        let mut l = natted(t);
        l.on_packet(t, sa("203.0.113.2:61000"), rtp(1, 10));
        // An on-path attacker who saw SSRC and sequence still is not an expected source.
        assert_eq!(l.on_packet(t, sa("192.0.2.66:5555"), rtp(1, 11)), Verdict::Drop(DropReason::NotLatched));
    }

    #[test]
    fn better_ranked_source_takes_over_only_in_a_signalling_window() {
        let t = Instant::now();
        let mut l = Latch::new(
            LatchMode::Symmetric,
            Expected { sdp: Some(sa("203.0.113.7:4000")), signalling_ip: Some("203.0.113.2".parse().expect("ip")) },
            t,
        );
        // Rank 1 first (the signalling IP), then the exact SDP address within the window.
        l.on_packet(t, sa("203.0.113.2:6000"), rtp(1, 1));
        assert_eq!(l.on_packet(t, sa("203.0.113.7:4000"), rtp(5, 1)), Verdict::Forward);
        assert_eq!(l.latched(), Some(sa("203.0.113.7:4000")));
        // After the window, even a good rank cannot move a latched stream.
        let mut m = natted(t);
        m.on_packet(t, sa("198.51.100.10:5000"), rtp(1, 1));
        let late = t + LEARN_WINDOW + Duration::from_secs(1);
        assert_eq!(m.on_packet(late, sa("198.51.100.10:4000"), rtp(7, 1)), Verdict::Drop(DropReason::NotLatched));
        // A re-INVITE reopens it.
        m.on_signal(late, m.expected);
        assert_eq!(m.on_packet(late, sa("198.51.100.10:4000"), rtp(7, 1)), Verdict::Forward);
    }

    #[test]
    fn without_any_expected_ip_the_first_source_wins_and_then_is_strict() {
        let t = Instant::now();
        let mut l = Latch::new(LatchMode::Symmetric, Expected::default(), t);
        assert_eq!(l.on_packet(t, sa("192.0.2.1:1000"), None), Verdict::Forward);
        assert_eq!(l.on_packet(t, sa("192.0.2.2:1000"), None), Verdict::Drop(DropReason::NotLatched));
    }

    #[test]
    fn asymmetric_mode_sends_to_sdp_and_filters_by_ip() {
        let t = Instant::now();
        let mut l =
            Latch::new(LatchMode::Asymmetric, Expected { sdp: Some(sa("203.0.113.7:4000")), signalling_ip: None }, t);
        assert_eq!(l.on_packet(t, sa("203.0.113.7:9999"), None), Verdict::Forward);
        assert_eq!(l.destination(), Some(sa("203.0.113.7:4000")), "never latches");
        assert_eq!(l.on_packet(t, sa("192.0.2.1:4000"), None), Verdict::Drop(DropReason::Unexpected));
    }

    #[test]
    fn rtcp_and_garbage_are_not_rtp() {
        let mut pkt = [0u8; 12];
        pkt[0] = 0x80;
        pkt[1] = 200; // RTCP SR with marker bit pattern
        assert_eq!(RtpInfo::parse(&pkt), None);
        pkt[1] = 0;
        pkt[2..4].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(RtpInfo::parse(&pkt).map(|r| r.seq), Some(7));
        assert_eq!(RtpInfo::parse(&pkt[..11]), None);
        pkt[0] = 0x8f; // 15 CSRCs claimed, none present
        assert_eq!(RtpInfo::parse(&pkt), None);
    }
}
