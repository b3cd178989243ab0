//! Fake-TCP segments from the network: arbitrary IPv4 packets through the segment parser and
//! into established connections (client and server). Never panics; what parses survives a
//! round trip through the writer.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
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
    for c in [&mut client, &mut server] {
        let _ = c.handle_segment(now, &s);
        let _ = c.send(now, s.payload);
        while c.poll_transmit().is_some() {}
        c.handle_timeout(now + std::time::Duration::from_secs(6));
    }
    // The forwarder: whatever arrives, nothing reaches the relay without a proof.
    let mut f = Forwarder::new(s.dst, Limits::default(), 7);
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
});
