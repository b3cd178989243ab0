//! RTCP and RTP from a latched party, as the relay's quality statistics read them: any
//! datagrams, in any order, never panic, never yield a round trip of 10 s or more, and never
//! count more lost than expected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinhole_media::latch::RtpInfo;
use pinhole_media::stats::StreamStats;

fuzz_target!(|data: &[u8]| {
    let (a, b) = (StreamStats::default(), StreamStats::default());
    let mut now_ns = 1_000_000_000u64;
    // Datagrams are length-prefixed: one byte of length, one byte saying who sent it and
    // how much time passed (in 10 ms steps).
    let mut rest = data;
    while rest.len() >= 2 {
        let (len, who) = (usize::from(rest[0]), rest[1]);
        rest = &rest[2..];
        let packet = &rest[..len.min(rest.len())];
        rest = &rest[packet.len()..];
        now_ns += u64::from(who >> 1) * 10_000_000;
        let (me, other) = if who & 1 == 0 { (&a, &b) } else { (&b, &a) };
        pinhole_media::rtcp::for_each(packet, |_| {});
        me.on_rtcp(other, now_ns, packet);
        me.on_packet(now_ns, packet.len(), RtpInfo::parse(packet));
    }
    for s in [&a, &b] {
        assert!(s.rtt_us().is_none_or(|r| r < 10_000_000));
        let q = s.quality();
        assert!(q.lost <= q.expected);
        assert!(q.loss_pct() <= 100.0);
        assert!(s.received() <= s.snapshot().packets);
    }
});
