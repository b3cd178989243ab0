//! STUN from the network: keepalives on the SIP port and the RFC 5780 service. Arbitrary
//! datagrams must never panic, and whatever is answered must stay small (no amplification).
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
});
