//! Fake-TCP segments from the network: arbitrary IPv4 packets through the segment parser and
//! into established connections (client, server and a simultaneous open), the forwarder
//! and a direct path; their payloads through the introduction parser. Never panics; what
//! parses survives a round trip through the writer.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pinhole_media::faketcp::direct::{Direct, DirectPhase, Introduction};
use pinhole_media::faketcp::forwarder::{Forwarder, Limits, Output};
use pinhole_media::faketcp::{Conn, Segment};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = Segment::parse(data) else { return };
    let again = s.ip_bytes(1);
    let reparsed = Segment::parse(&again).expect("what we write parses");
    assert_eq!((reparsed.seq, reparsed.ack, reparsed.flags, reparsed.payload), (s.seq, s.ack, s.flags, s.payload));
    let now = Instant::now();
    let mut client = Conn::connect(now, 0x1234_5678);
    let mut server = Conn::accept(now, s.seq.wrapping_sub(1), 0x9abc_def0);
    let mut both = Conn::simultaneous(now, 0x1111_2222, s.seq);
    for c in [&mut client, &mut server, &mut both] {
        let _ = c.handle_segment(now, &s);
        let _ = c.send(now, s.payload);
        while c.poll_transmit().is_some() {}
        c.handle_timeout(now + std::time::Duration::from_secs(6));
    }
    // The forwarder: whatever arrives, nothing reaches the relay without a proof.
    let mut f = Forwarder::new(s.dst, Limits::default(), [7; 32], now);
    f.allow(30002, "leg-secret-0123456789abcdef".into());
    f.handle_segment(now, &s);
    let mut syn = s;
    syn.flags = pinhole_media::faketcp::SYN;
    f.handle_segment(now, &syn);
    f.handle_segment(now, &s);
    while let Some(o) = f.poll_output() {
        assert!(!matches!(o, Output::ToRelay { .. }), "media relayed without a proof");
    }
    f.handle_timeout(now + std::time::Duration::from_secs(11));
    while f.poll_discard().is_some() {}
    // An introduction must be signed; a direct path hands nothing on before a signed check.
    assert_eq!(Introduction::decode(s.payload, "leg-secret-0123456789abcdef"), None);
    let intro = Introduction { peer: s.src, isn: 5, peer_isn: s.seq, delay: std::time::Duration::ZERO, key: "k".into() };
    let mut d = Direct::new(now, s.dst, intro, 9);
    d.handle_timeout(now);
    assert_eq!(d.phase(), DirectPhase::Opening);
    let mut syn = s;
    syn.flags = pinhole_media::faketcp::SYN;
    let _ = d.handle_segment(now, &syn);
    assert_eq!(d.handle_segment(now, &s), None, "media before a check");
    while d.poll_transmit().is_some() {}
});
