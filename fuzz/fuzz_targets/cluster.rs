//! What crosses between cluster nodes: a node's bindings read back from Redis, a relay's
//! call state read back from Redis (restored
//! on a standby, whatever it holds), and a fleet relay's ng replies (statistics on the
//! fleet socket, replies to offer/answer/delete). Nothing may panic, and a state that
//! restores exports to one that restores again.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinhole_media::anchor::{MediaAnchor, SdpIn};
use pinhole_media::fleet::{Fleet, RelaySpec};
use pinhole_media::relay::{CallState, Relay, RelayConfig};

/// Answers every datagram the fleet sent with the fuzz input under the datagram's own
/// cookie (so it reaches the reply parser), unless the input is empty.
fn answer_all(fleet: &mut Fleet, now: Instant, data: &[u8]) {
    while let Some((to, d)) = fleet.poll_transmit(now) {
        if data.is_empty() {
            continue;
        }
        let cookie = d.split(|b| *b == b' ').next().unwrap_or_default();
        let reply = [cookie, b" ", data].concat();
        let _ = fleet.handle_reply(now, to, &reply);
    }
}

const SDP: &[u8] = b"v=0\r\no=- 1 1 IN IP4 198.51.100.10\r\ns=-\r\nc=IN IP4 198.51.100.10\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    // A node's bindings of an AOR as another node stored them: decoded within its bounds
    // and applied as copies, never more than an AOR may hold.
    if let Some(v) = pinhole_sip::registrar::NodeBindings::decode(data) {
        let mut r = pinhole_sip::registrar::Registrar::new();
        r.set_remote("a@x", "edge-2", v.into_remote("edge-2"), 1_700_000_000);
        assert!(r.binding_count() <= pinhole_sip::registrar::MAX_BINDINGS_PER_AOR);
    }
    let mut relay = Relay::new(RelayConfig::single("203.0.113.21".parse().expect("ip"), 30000, 30099), now);
    relay.set_standby(true, now);
    if let Ok(state) = serde_json::from_slice::<CallState>(data) {
        if relay.restore(now, 1_700_000_000, &state).is_ok() {
            let back = relay.export(&state.call_id, now, 1_700_000_000).expect("restored call exports");
            let mut again = Relay::new(RelayConfig::single("203.0.113.21".parse().expect("ip"), 30000, 30099), now);
            assert!(again.restore(now, 1_700_000_000, &back).is_ok(), "an exported state restores");
            while relay.poll_command().is_some() {}
            relay.set_standby(false, now);
            relay.handle_timeout(now + Duration::from_secs(3600));
        }
    }

    let spec = |n: u8| RelaySpec {
        ng: SocketAddr::new(format!("203.0.113.{n}").parse().expect("ip"), 2223),
        weight: 1,
        region: None,
        cidrs: vec![],
        stun: Some(SocketAddr::new(format!("203.0.113.{n}").parse().expect("ip"), 3478)),
    };
    let mut fleet = Fleet::new(vec![spec(21), spec(22)], now, (100, Duration::from_secs(60)), [5; 32]);
    let _ = fleet.handle_reply(now, spec(21).ng, data);
    let text = String::from_utf8_lossy(data);
    if let Some(rtts) = pinhole_media::fleet::parse_rtts(&text) {
        assert_eq!(pinhole_media::fleet::parse_rtts(&pinhole_media::fleet::rtts_header(&rtts)), Some(rtts));
    }
    fleet.prefer("c", Some(&text), Some(&text));
    let ip = "198.51.100.10".parse().expect("ip");
    // Each SDP handled again while the fleet says it waits, its replies the fuzz input; an
    // empty input is a relay that never answers (its timers run out).
    let mut t = now;
    for tag in ["a", "b", "a"] {
        let sdp = SdpIn {
            call_id: "c",
            sender_tag: tag,
            sdp: SDP,
            signalling_ip: ip,
            to: None,
            hide: tag == "b",
            to_browser: false,
            record: tag == "a",
        };
        for _ in 0..8 {
            if fleet.anchor_sdp(t, &sdp) != Err(pinhole_media::anchor::Unanchored::Waiting) {
                break;
            }
            answer_all(&mut fleet, t, data);
            t += Duration::from_millis(200);
            fleet.handle_timeout(t);
            while fleet.poll_ready().is_some() {}
        }
    }
    fleet.release("c");
    answer_all(&mut fleet, t, data);
    fleet.handle_timeout(t + Duration::from_secs(5));
    while fleet.poll_released().is_some() {}
    while fleet.poll_change().is_some() {}
    assert!(fleet.in_flight() <= pinhole_media::fleet::MAX_ASKED);
});
