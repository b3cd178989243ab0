//! STUN from the network: keepalives on the SIP port, the RFC 5780 service, and a browser
//! leg's ICE-lite checks. Arbitrary datagrams must never panic, and whatever is answered
//! must stay small (no amplification); an unsigned check never moves a leg's media.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pinhole_media::stun::{binding_response, StunServer, StunServerConfig};

fuzz_target!(|data: &[u8]| {
    let src = "203.0.113.9:40001".parse().expect("addr");
    if let Some(resp) = binding_response(data, src) {
        assert!(resp.len() <= 2 * data.len().max(20) + 12);
    }
    let mut server = StunServer::new(StunServerConfig {
        primary: "203.0.113.1".parse().expect("ip"),
        alternate: Some("203.0.113.2".parse().expect("ip")),
        ports: [3478, 3479],
        rate: 1000,
        users: vec![],
    });
    if let Ok(r) = server.handle(Instant::now(), "203.0.113.1:3478".parse().expect("addr"), src, data) {
        assert!(r.bytes.len() <= (data.len() * 3).max(64));
        assert_eq!(r.to.ip(), src.ip(), "answers only ever go back to the requester's address");
    }
    let creds = pinhole_media::ice_lite::Credentials { ufrag: "fuzzfuzz".into(), pwd: "p".repeat(24) };
    let mut ice = pinhole_media::ice_lite::IceLite::new(creds);
    ice.set_remote_ufrag("brws");
    if let pinhole_media::ice_lite::Checked::Answer { bytes, .. } = ice.handle(src, data) {
        assert!(bytes.len() <= data.len(), "an ICE answer is never larger than its check");
    }
    assert!(ice.selected().is_none_or(|a| a == src));
});
