//! Golden cases in rtpengine's AutoTest style: SDP in → SDP out. In the expected text,
//! `PORT`/`RTCP` stand for the first anchor's ports and `PORT2`/`RTCP2` for the second's.

use super::*;

const RELAY4: &str = "203.0.113.1";
const RELAY6: &str = "2001:db8::1";

fn anchor(addr: &str, rtp: u16) -> Option<Anchor> {
    Some(Anchor { addr: addr.parse().expect("ip"), rtp_port: rtp, rtcp_port: rtp + 1 })
}

/// Rewrites `input` (written with \n, sent with \r\n) and compares with `expected`.
fn golden(input: &str, media: Vec<Option<Anchor>>, remove_ice: bool, expected: &str) {
    let body = input.replace('\n', "\r\n");
    let sdp = Sdp::parse(body.as_bytes()).expect("parses");
    let out = sdp.rewrite(&Rewrite { media: media.clone(), origin: None, remove_ice, ..Default::default() });
    let ports: Vec<u16> = media.iter().flatten().map(|a| a.rtp_port).collect();
    let mut want = expected.to_owned();
    if let Some(p) = ports.get(1) {
        want = want.replace("PORT2", &p.to_string()).replace("RTCP2", &(p + 1).to_string());
    }
    if let Some(p) = ports.first() {
        want = want.replace("PORT", &p.to_string()).replace("RTCP", &(p + 1).to_string());
    }
    let want = want.replace('\n', "\r\n");
    assert_eq!(String::from_utf8(out).expect("utf8"), want);
}

#[test]
fn audio_offer_is_anchored_and_version_bumped() {
    golden(
        "v=0
o=- 1545997027 1 IN IP4 198.51.100.1
s=tester
t=0 0
m=audio 3000 RTP/AVP 0 8 101
c=IN IP4 198.51.100.1
a=rtpmap:101 telephone-event/8000
a=sendrecv
",
        vec![anchor(RELAY4, 30000)],
        true,
        "v=0
o=- 1545997027 2 IN IP4 198.51.100.1
s=tester
t=0 0
m=audio PORT RTP/AVP 0 8 101
c=IN IP4 203.0.113.1
a=rtpmap:101 telephone-event/8000
a=sendrecv
",
    );
}

#[test]
fn session_level_connection_and_rtcp_attribute() {
    golden(
        "v=0
o=alice 2890844526 2890844526 IN IP4 198.51.100.7
s=-
c=IN IP4 198.51.100.7
t=0 0
m=audio 49170 RTP/AVP 0
a=rtcp:49171 IN IP4 198.51.100.7
a=rtpmap:111 opus/48000/2
x-unknown=kept exactly
",
        vec![anchor(RELAY4, 30010)],
        true,
        "v=0
o=alice 2890844526 2890844527 IN IP4 198.51.100.7
s=-
c=IN IP4 203.0.113.1
t=0 0
m=audio PORT RTP/AVP 0
a=rtcp:RTCP IN IP4 203.0.113.1
a=rtpmap:111 opus/48000/2
x-unknown=kept exactly
",
    );
}

#[test]
fn audio_and_video_each_get_their_ports_and_disabled_stream_stays_disabled() {
    golden(
        "v=0
o=- 5 5 IN IP4 198.51.100.7
s=-
c=IN IP4 198.51.100.7
t=0 0
m=audio 49170 RTP/AVP 0
m=video 51372 RTP/AVP 96
a=rtpmap:96 VP8/90000
m=text 0 RTP/AVP 98
",
        vec![anchor(RELAY4, 30020), anchor(RELAY4, 30022), None],
        true,
        "v=0
o=- 5 6 IN IP4 198.51.100.7
s=-
c=IN IP4 203.0.113.1
t=0 0
m=audio PORT RTP/AVP 0
m=video PORT2 RTP/AVP 96
a=rtpmap:96 VP8/90000
m=text 0 RTP/AVP 98
",
    );
}

#[test]
fn rtcp_mux_points_rtcp_at_the_rtp_port_and_keeps_the_mux_attribute() {
    golden(
        "v=0
o=- 1 1 IN IP4 198.51.100.7
s=-
t=0 0
m=audio 49170 RTP/AVP 0
c=IN IP4 198.51.100.7
a=rtcp:49170
a=rtcp-mux
",
        vec![anchor(RELAY4, 30030)],
        true,
        "v=0
o=- 1 2 IN IP4 198.51.100.7
s=-
t=0 0
m=audio PORT RTP/AVP 0
c=IN IP4 203.0.113.1
a=rtcp:PORT
a=rtcp-mux
",
    );
}

#[test]
fn ice_attributes_are_removed_when_anchoring_and_kept_otherwise() {
    let input = "v=0
o=- 1 1 IN IP4 198.51.100.7
s=-
a=ice-lite
t=0 0
m=audio 49170 RTP/AVP 0
c=IN IP4 198.51.100.7
a=ice-ufrag:F7gI
a=ice-pwd:x9cml/YzichV2+XlhiMu8g
a=candidate:1 1 UDP 2130706431 198.51.100.7 49170 typ host
a=sendonly
";
    golden(
        input,
        vec![anchor(RELAY4, 30040)],
        true,
        "v=0
o=- 1 2 IN IP4 198.51.100.7
s=-
t=0 0
m=audio PORT RTP/AVP 0
c=IN IP4 203.0.113.1
a=sendonly
",
    );
    golden(
        input,
        vec![anchor(RELAY4, 30040)],
        false,
        &input
            .replace("o=- 1 1", "o=- 1 2")
            .replace("m=audio 49170", "m=audio PORT")
            .replace("c=IN IP4 198.51.100.7", "c=IN IP4 203.0.113.1"),
    );
}

#[test]
fn ipv6_offer_bridged_to_an_ipv4_relay_interface() {
    golden(
        "v=0
o=- 1 1 IN IP6 2001:db8::7
s=-
c=IN IP6 2001:db8::7
t=0 0
m=audio 49170 RTP/AVP 0
",
        vec![anchor(RELAY4, 30050)],
        true,
        "v=0
o=- 1 2 IN IP6 2001:db8::7
s=-
c=IN IP4 203.0.113.1
t=0 0
m=audio PORT RTP/AVP 0
",
    );
}

#[test]
fn streams_on_different_interfaces_get_their_own_connection_lines() {
    golden(
        "v=0
o=- 1 1 IN IP4 198.51.100.7
s=-
c=IN IP4 198.51.100.7
t=0 0
m=audio 49170 RTP/AVP 0
i=main audio
m=audio 49172 RTP/AVP 0
",
        vec![anchor(RELAY4, 30060), anchor(RELAY6, 30062)],
        true,
        "v=0
o=- 1 2 IN IP4 198.51.100.7
s=-
c=IN IP4 203.0.113.1
t=0 0
m=audio PORT RTP/AVP 0
i=main audio
m=audio PORT2 RTP/AVP 0
c=IN IP6 2001:db8::1
",
    );
}

#[test]
fn hold_with_zero_address_is_left_alone() {
    let sdp = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\n";
    let parsed = Sdp::parse(sdp.as_bytes()).expect("parses");
    assert!(!parsed.media[0].is_active());
    let out = parsed.rewrite(&Rewrite {
        media: vec![anchor(RELAY4, 30070)],
        origin: None,
        remove_ice: true,
        ..Default::default()
    });
    assert_eq!(String::from_utf8(out).expect("utf8"), sdp.replace("1 1 IN", "1 2 IN"));
}

#[test]
fn origin_address_is_replaced_when_asked() {
    let sdp = "v=0\no=- 7 9 IN IP4 198.51.100.7\ns=-\nc=IN IP4 198.51.100.7\nt=0 0\nm=audio 4000 RTP/AVP 0\n";
    let out = Sdp::parse(sdp.as_bytes()).expect("parses").rewrite(&Rewrite {
        media: vec![anchor(RELAY4, 30080)],
        origin: Some(RELAY4.parse().expect("ip")),
        remove_ice: true,
        ..Default::default()
    });
    let out = String::from_utf8(out).expect("utf8");
    assert!(out.starts_with("v=0\no=- 7 10 IN IP4 203.0.113.1\n"), "LF endings kept: {out}");
}

#[test]
fn missing_connection_is_an_error_not_a_panic() {
    let sdp = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\n";
    assert_eq!(Sdp::parse(sdp.as_bytes()).err(), Some(SdpError::NoConnection(0)));
    assert_eq!(Sdp::parse(b"hello").err(), Some(SdpError::NoVersion));
    assert_eq!(Sdp::parse(b"v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n").err(), Some(SdpError::Malformed("o=")));
    // sdp-rs panicked on this repeat line; here it is just an unknown line.
    let r = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nr=9999999999999999 1 1\r\nm=audio 1 RTP/AVP 0\r\n";
    assert!(Sdp::parse(r.as_bytes()).is_ok());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Rewriting then parsing gives the anchors back, and every line the editor does
        /// not own survives byte for byte.
        #[test]
        fn rewrite_round_trips(
            port in 1u16..65000,
            relay in 1024u16..60000,
            extra in proptest::collection::vec("[a-z]{1,8}:[ -~]{0,20}", 0..5),
            crlf in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut sdp = format!("v=0{eol}o=- 1 1 IN IP4 198.51.100.7{eol}s=-{eol}c=IN IP4 198.51.100.7{eol}t=0 0{eol}m=audio {port} RTP/AVP 0{eol}");
            for e in &extra {
                sdp.push_str(&format!("a={e}{eol}"));
            }
            let parsed = Sdp::parse(sdp.as_bytes()).expect("parses");
            let out = parsed.rewrite(&Rewrite { media: vec![anchor(RELAY4, relay)], origin: None, remove_ice: true, ..Default::default() });
            let again = Sdp::parse(&out).expect("output parses");
            prop_assert_eq!(again.media[0].port, relay);
            prop_assert_eq!(again.media[0].addr, Some(RELAY4.parse().expect("ip")));
            let text = String::from_utf8(out).expect("utf8");
            for e in &extra {
                let name = e.split(':').next().unwrap_or("");
                if !ICE_ATTRS.contains(&name) && name != "rtcp" {
                    let line = format!("a={e}{eol}");
                    prop_assert!(text.contains(&line));
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(s) = Sdp::parse(&data) {
                let n = s.media.len();
                let _ = s.rewrite(&Rewrite { media: vec![anchor(RELAY4, 30000); n], origin: None, remove_ice: true, ..Default::default() });
            }
        }
    }
}
