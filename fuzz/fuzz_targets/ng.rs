//! The ng path (and the punch plan and NAT profile texts, which travel in the same kind
//! of untrusted input): the codec (decode, re-encode, decode again to the same value) and the
//! whole NgServer — cookie, reply cache, JSON and bencode dispatch, every command against a
//! real relay — over UDP datagrams and a TCP stream. Nothing may panic.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinhole_media::ng::{split_cookie, Bencode};
use pinhole_media::ng_server::NgServer;
use pinhole_media::relay::{Relay, RelayConfig};

fn relay(now: Instant) -> Relay {
    let cfg = RelayConfig::single("203.0.113.1".parse().expect("ip"), 30000, 30099);
    Relay::new(RelayConfig { offer_timeout: Duration::from_secs(60), max_sessions: 10, ..cfg }, now)
}

fuzz_target!(|data: &[u8]| {
    if let Ok((_, payload)) = split_cookie(data) {
        if let Ok(v) = Bencode::decode(payload) {
            let mut out = Vec::new();
            v.encode(&mut out);
            assert_eq!(Bencode::decode(&out).as_ref(), Ok(&v));
        }
    }
    // Text agents and the server read from each other: a punch plan in SDP, a NAT profile.
    let text = String::from_utf8_lossy(data);
    if let Some(plan) = pinhole_media::punch::sdp::WirePlan::from_sdp(&text) {
        assert_eq!(pinhole_media::punch::sdp::WirePlan::from_sdp(&plan.lines()), Some(plan));
    }
    let _ = pinhole_media::punch::sdp::strip(&text);
    if let Some((_, key)) = pinhole_media::punch::sdp::forwarder_offer(&text) {
        assert!(!key.is_empty() && key.len() <= 64);
    }
    if let Some(p) = pinhole_media::punch::NatProfile::parse_header(&text) {
        assert_eq!(pinhole_media::punch::NatProfile::parse_header(&p.to_header()), Some(p));
    }
    let now = Instant::now();
    let mut r = relay(now);
    let mut ng = NgServer::new(now, 1_700_000_000);
    // Each line is one datagram, so one input can offer, answer, query and delete.
    for datagram in data.split(|&b| b == b'\n') {
        let _ = ng.handle(now, Some(&mut r), datagram);
    }
    let mut buf = data.to_vec();
    let _ = ng.handle_stream(now, Some(&mut r), &mut buf);
    r.handle_timeout(now + Duration::from_secs(120));
    while r.poll_command().is_some() {}
});
