//! The upgrade and frames against RFC 6455's own examples, and every refusal.

use super::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade(extra: &str) -> String {
    format!(
        "GET /sip HTTP/1.1\r\nHost: pbx.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A client's frame: masked with `mask`.
fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn refusal(r: Result<(usize, Vec<u8>), UpgradeError>) -> (String, &'static str) {
    match r {
        Err(UpgradeError::Refused { response, reason }) => (String::from_utf8(response).expect("text"), reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn an_upgrade_offering_sip_is_accepted_with_rfc_6455s_own_accept_value() {
    let req = upgrade("Sec-WebSocket-Protocol: chat, sip\r\nOrigin: https://pbx.example.com\r\n");
    let mut wire = req.clone().into_bytes();
    wire.extend_from_slice(b"\x81"); // the first frame may follow in the same read
    let (used, response) = accept_upgrade(&wire, &[]).expect("accepted");
    assert_eq!(used, req.len(), "the frame after it is left");
    let response = String::from_utf8(response).expect("text");
    assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{response}");
    assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{response}");
    assert!(response.contains("Sec-WebSocket-Protocol: sip\r\n"), "{response}");
    let allowed = vec!["https://pbx.example.com".to_owned()];
    assert!(accept_upgrade(req.as_bytes(), &allowed).is_ok(), "an allowed origin");
}

#[test]
fn upgrades_are_refused_naming_what_is_wrong() {
    let (r, why) = refusal(accept_upgrade(upgrade("Sec-WebSocket-Protocol: chat\r\n").as_bytes(), &[]));
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(why, "no sip subprotocol offered");
    let old = upgrade("Sec-WebSocket-Protocol: sip\r\n").replace("Version: 13", "Version: 8");
    let (r, why) = refusal(accept_upgrade(old.as_bytes(), &[]));
    assert!(r.starts_with("HTTP/1.1 426") && r.contains("Sec-WebSocket-Version: 13"), "{r}");
    assert_eq!(why, "WebSocket version not 13");
    let allowed = vec!["https://pbx.example.com".to_owned()];
    let evil = upgrade("Sec-WebSocket-Protocol: sip\r\nOrigin: https://evil.example\r\n");
    let (r, why) = refusal(accept_upgrade(evil.as_bytes(), &allowed));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert_eq!(why, "origin not allowed");
    let (_, why) =
        refusal(accept_upgrade(upgrade("Sec-WebSocket-Protocol: sip\r\n").replace(KEY, "c2hvcnQ=").as_bytes(), &[]));
    assert_eq!(why, "bad Sec-WebSocket-Key");
    let (_, why) = refusal(accept_upgrade(b"POST / HTTP/1.1\r\n\r\n", &[]));
    assert_eq!(why, "not a GET over HTTP/1.1");
    let (_, why) = refusal(accept_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &[]));
    assert_eq!(why, "not a WebSocket upgrade");
    assert_eq!(accept_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n", &[]), Err(UpgradeError::Incomplete));
    let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_UPGRADE));
    let (r, _) = refusal(accept_upgrade(endless.as_bytes(), &[]));
    assert!(r.starts_with("HTTP/1.1 431"), "a request with no end is refused once past the bound: {r}");
}

#[test]
fn rfc_6455s_masked_hello_is_one_message_and_its_ping_gets_a_pong() {
    let mut r = WsReader::new(1024);
    r.extend(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    assert_eq!(r.next_event(), Ok(Some(WsEvent::Message(b"Hello".to_vec()))));
    assert_eq!(r.next_event(), Ok(None));
    r.extend(&masked(0x89, b"Hello", [1, 2, 3, 4]));
    // §5.7: the pong is the unmasked "Hello" with opcode 0xA.
    assert_eq!(r.next_event(), Ok(Some(WsEvent::Reply(vec![0x8a, 0x05, b'H', b'e', b'l', b'l', b'o']))));
    r.extend(&masked(0x8A, b"", [1, 2, 3, 4]));
    assert_eq!(r.next_event(), Ok(Some(WsEvent::Pong)));
    r.extend(&masked(0x88, &[0x03, 0xE8], [9, 9, 9, 9]));
    assert_eq!(r.next_event(), Ok(Some(WsEvent::Close(vec![0x88, 0x02, 0x03, 0xE8]))));
}

#[test]
fn fragments_with_a_ping_between_them_make_one_message_and_byte_by_byte_input_is_the_same() {
    let mut wire = masked(0x01, b"INVITE sip:", [5, 6, 7, 8]);
    wire.extend(masked(0x89, b"p", [1, 1, 1, 1]));
    wire.extend(masked(0x80, b"bob@x SIP/2.0", [9, 8, 7, 6]));
    let mut r = WsReader::new(1024);
    let mut events = Vec::new();
    for b in &wire {
        r.extend(&[*b]);
        while let Some(e) = r.next_event().expect("valid") {
            events.push(e);
        }
    }
    assert_eq!(
        events,
        vec![WsEvent::Reply(vec![0x8a, 1, b'p']), WsEvent::Message(b"INVITE sip:bob@x SIP/2.0".to_vec())]
    );
    assert_eq!(r.buffered(), 0);
}

#[test]
fn bad_frames_are_refused() {
    let cases: Vec<(Vec<u8>, WsError)> = vec![
        (vec![0x81, 0x05, b'H', b'e', b'l', b'l', b'o'], WsError::Unmasked),
        (masked(0xC1, b"x", [1, 2, 3, 4]), WsError::Reserved),
        (masked(0x83, b"x", [1, 2, 3, 4]), WsError::Reserved),
        (masked(0x09, b"x", [1, 2, 3, 4]), WsError::BadControl),
        (masked(0x89, &[0; 126], [1, 2, 3, 4]), WsError::BadControl),
        (masked(0x80, b"x", [1, 2, 3, 4]), WsError::BadContinuation),
        ([masked(0x01, b"a", [1, 2, 3, 4]), masked(0x81, b"b", [1, 2, 3, 4])].concat(), WsError::BadContinuation),
    ];
    for (wire, want) in cases {
        let mut r = WsReader::new(1024);
        r.extend(&wire);
        assert_eq!(r.next_event(), Err(want), "{wire:02x?}");
    }
}

#[test]
fn a_message_over_the_limit_is_refused_from_its_header_before_it_is_held() {
    let mut r = WsReader::new(1000);
    // A header claiming 2^40 bytes, and nothing more.
    r.extend(&[0x81, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
    assert_eq!(r.next_event(), Err(WsError::TooLarge));
    // Fragments adding up past the limit.
    let mut r = WsReader::new(1000);
    r.extend(&masked(0x01, &[b'a'; 600], [1, 2, 3, 4]));
    assert_eq!(r.next_event(), Ok(None));
    r.extend(&masked(0x80, &[b'a'; 600], [1, 2, 3, 4]));
    assert_eq!(r.next_event(), Err(WsError::TooLarge));
}

#[test]
fn our_frames_use_the_shortest_length_form() {
    assert_eq!(&text_frame(&[b'a'; 125])[..2], &[0x81, 125]);
    assert_eq!(&text_frame(&[b'a'; 126])[..4], &[0x81, 126, 0, 126]);
    assert_eq!(&text_frame(&[b'a'; 70_000])[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    assert_eq!(ping_frame()[0], 0x89);
}
