//! STUN on the SIP port: arbitrary datagrams must never panic, and whatever is answered
//! must be small (no amplification).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinhole_media::stun::binding_response;

fuzz_target!(|data: &[u8]| {
    let src = "203.0.113.9:40001".parse().expect("addr");
    if let Some(resp) = binding_response(data, src) {
        assert!(resp.len() <= 2 * data.len().max(20) + 12);
    }
});
