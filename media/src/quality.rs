//! Call quality per stream and direction, as the relay measures it: loss from sequence
//! numbers, interarrival jitter, the round trip from RTCP, and an MOS estimate from them —
//! sampled every [`SAMPLE_INTERVAL`] for the lowest and highest, and over the whole call
//! when it ends.

use std::time::{Duration, Instant};

use crate::relay::Side;
use crate::stats::StreamStats;

/// How often a call's streams are sampled for their lowest and highest MOS.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// The simplified ITU-T G.107 E-model that rtpengine uses (after PingPlotter's): `rtt_ms`
/// the round trip, `jitter_ms` interarrival jitter, `loss_pct` packets lost in percent.
/// Returns the MOS, 1.0 to about 4.4.
///
/// ```text
/// effective latency = rtt + 2 × jitter + 10 ms
/// R = 93.2 − latency / 40            (latency < 160 ms)
/// R = 93.2 − (latency − 120) / 10    (otherwise)
/// R = R − 2.5 × loss%
/// MOS = 1 + 0.035 R + 0.000007 R (R − 60)(100 − R), 1.0 when R < 0
/// ```
pub fn mos(rtt_ms: f64, jitter_ms: f64, loss_pct: f64) -> f64 {
    let latency = rtt_ms.max(0.0) + 2.0 * jitter_ms.max(0.0) + 10.0;
    let r = if latency < 160.0 { 93.2 - latency / 40.0 } else { 93.2 - (latency - 120.0) / 10.0 };
    let r = r - 2.5 * loss_pct.clamp(0.0, 100.0);
    if r < 0.0 {
        return 1.0;
    }
    (1.0 + 0.035 * r + 0.000_007 * r * (r - 60.0) * (100.0 - r)).clamp(1.0, 5.0)
}

/// [`mos`] with the round trip in µs as the statistics keep it (0 when no RTCP told it).
pub fn mos_us(rtt_us: Option<u32>, jitter_ms: f64, loss_pct: f64) -> f64 {
    mos(f64::from(rtt_us.unwrap_or(0)) / 1000.0, jitter_ms, loss_pct)
}

/// The round trip of a direction's whole path through the relay: the sender's leg plus the
/// receiver's, from whichever RTCP told them (`None` when neither did).
pub fn path_rtt_us(sender: Option<u32>, receiver: Option<u32>) -> Option<u32> {
    match (sender, receiver) {
        (None, None) => None,
        (s, r) => Some(s.unwrap_or(0).saturating_add(r.unwrap_or(0))),
    }
}

/// `part` of `whole` in percent (0 of nothing).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// One direction's figures over an interval (or the whole call).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub mos: f64,
    pub rtt_us: Option<u32>,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    pub at: Instant,
}

impl Sample {
    fn new(at: Instant, expected: u64, received: u64, jitter_ms: f64, rtt_us: Option<u32>) -> Sample {
        let loss_pct = percent(expected.saturating_sub(received), expected);
        Sample { mos: mos_us(rtt_us, jitter_ms, loss_pct), rtt_us, jitter_ms, loss_pct, at }
    }
}

/// A direction's samples: lowest, highest and their sums for the average.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Track {
    last_expected: u64,
    last_received: u64,
    pub samples: u32,
    sums: (f64, f64, f64, f64),
    pub lowest: Option<Sample>,
    pub highest: Option<Sample>,
}

impl Track {
    /// Samples the interval since the last sample of `stats` (what the direction's sender
    /// sent); an interval without RTP (on hold, gone direct) is no sample.
    pub fn sample(&mut self, at: Instant, stats: &StreamStats, rtt_us: Option<u32>) -> Option<Sample> {
        let (expected, received) = (stats.expected(), stats.received());
        let interval = expected.saturating_sub(self.last_expected);
        let got = received.saturating_sub(self.last_received);
        (self.last_expected, self.last_received) = (expected, received);
        if interval == 0 || got == 0 {
            return None;
        }
        let s = Sample::new(at, interval, got, stats.jitter_ms(), rtt_us);
        self.samples += 1;
        self.sums.0 += s.mos;
        self.sums.1 += f64::from(s.rtt_us.unwrap_or(0));
        self.sums.2 += s.jitter_ms;
        self.sums.3 += s.loss_pct;
        if self.lowest.is_none_or(|l| s.mos < l.mos) {
            self.lowest = Some(s);
        }
        if self.highest.is_none_or(|h| s.mos > h.mos) {
            self.highest = Some(s);
        }
        Some(s)
    }

    /// The average of the samples (MOS, round trip µs, jitter ms, loss %).
    pub fn average(&self) -> Option<(f64, f64, f64, f64)> {
        let n = f64::from(self.samples);
        (self.samples > 0).then(|| (self.sums.0 / n, self.sums.1 / n, self.sums.2 / n, self.sums.3 / n))
    }
}

/// What one direction of one stream measured over the whole call.
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    /// The stream's index in the call and the side that sent.
    pub stream: usize,
    pub from: Side,
    pub ssrc: u32,
    pub expected: u64,
    pub lost: u64,
    pub jitter_ms: f64,
    pub rtt_us: Option<u32>,
    /// Over the whole call, and the lowest interval's.
    pub mos: f64,
    pub lowest_mos: Option<f64>,
}

impl Direction {
    pub fn loss_pct(&self) -> f64 {
        percent(self.lost, self.expected)
    }

    /// Whole-call figures of `stats` (the sender's), `rtt_us` its path's round trip.
    pub fn measure(
        (stream, from): (usize, Side),
        stats: &StreamStats,
        rtt_us: Option<u32>,
        track: &Track,
    ) -> Direction {
        let q = stats.quality();
        Direction {
            stream,
            from,
            ssrc: q.ssrc,
            expected: q.expected,
            lost: q.lost,
            jitter_ms: q.jitter_ms,
            rtt_us,
            mos: mos_us(rtt_us, q.jitter_ms, q.loss_pct()),
            lowest_mos: track.lowest.map(|l| l.mos),
        }
    }
}

/// A call's quality when its media was released: each direction that carried RTP.
#[derive(Debug, Clone, PartialEq)]
pub struct CallQuality {
    pub call_id: String,
    pub directions: Vec<Direction>,
}

impl CallQuality {
    /// The worst direction's whole-call MOS, the figure a call is judged by.
    pub fn mos(&self) -> Option<f64> {
        self.directions.iter().map(|d| d.mos).min_by(f64::total_cmp)
    }

    /// The lowest interval MOS of any direction (the whole-call one when never sampled).
    pub fn lowest_mos(&self) -> Option<f64> {
        self.directions.iter().map(|d| d.lowest_mos.unwrap_or(d.mos).min(d.mos)).min_by(f64::total_cmp)
    }

    /// Loss over every direction, in percent.
    pub fn loss_pct(&self) -> f64 {
        let expected: u64 = self.directions.iter().map(|d| d.expected).sum();
        let lost: u64 = self.directions.iter().map(|d| d.lost).sum();
        percent(lost, expected)
    }

    /// The highest jitter and round trip of any direction.
    pub fn jitter_ms(&self) -> f64 {
        self.directions.iter().map(|d| d.jitter_ms).fold(0.0, f64::max)
    }

    pub fn rtt_us(&self) -> Option<u32> {
        self.directions.iter().filter_map(|d| d.rtt_us).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latch::RtpInfo;

    #[test]
    fn mos_falls_with_loss_jitter_and_round_trip() {
        let clean = mos(20.0, 1.0, 0.0);
        assert!((4.3..4.5).contains(&clean), "{clean}");
        assert!(mos(20.0, 1.0, 5.0) < clean - 0.3, "5% loss costs");
        assert!(mos(20.0, 40.0, 0.0) < clean, "jitter costs");
        assert!(mos(400.0, 1.0, 0.0) < 3.6, "a long round trip costs");
        assert_eq!(mos(20.0, 1.0, 60.0), 1.0, "R below 0 is the floor");
    }

    fn send(s: &StreamStats, seqs: impl IntoIterator<Item = u16>) {
        for seq in seqs {
            let ts = u32::from(seq) * 160;
            let at = u64::from(seq) * 20_000_000;
            s.on_packet(at, 172, Some(RtpInfo { ssrc: 7, seq, timestamp: ts, payload_type: 0 }));
        }
    }

    #[test]
    fn an_interval_with_loss_is_the_lowest_sample_and_a_silent_one_is_none() {
        let s = StreamStats::default();
        let mut t = Track::default();
        let at = Instant::now();
        send(&s, 0..250);
        let clean = t.sample(at, &s, Some(20_000)).expect("a sample");
        assert_eq!(clean.loss_pct, 0.0);
        // The next 250 with every tenth missing: 10% loss in this interval only.
        send(&s, (250..500).filter(|n| n % 10 != 0));
        let lossy = t.sample(at + SAMPLE_INTERVAL, &s, Some(20_000)).expect("a sample");
        assert!((lossy.loss_pct - 10.0).abs() < 0.01, "{}", lossy.loss_pct);
        assert_eq!(t.sample(at + 2 * SAMPLE_INTERVAL, &s, None), None, "nothing arrived");
        assert_eq!(t.samples, 2);
        assert_eq!(t.lowest.map(|l| l.mos), Some(lossy.mos));
        assert_eq!(t.highest.map(|h| h.mos), Some(clean.mos));
        assert!(lossy.mos < clean.mos - 0.5);
        let whole = Direction::measure((0, Side::A), &s, Some(20_000), &t);
        assert_eq!((whole.expected, whole.lost), (500, 25));
        assert!(whole.mos > lossy.mos && whole.mos < clean.mos);
    }

    #[test]
    fn a_path_round_trip_adds_the_legs_it_knows() {
        assert_eq!(path_rtt_us(None, None), None);
        assert_eq!(path_rtt_us(Some(10), None), Some(10));
        assert_eq!(path_rtt_us(Some(10), Some(30)), Some(40));
    }
}
