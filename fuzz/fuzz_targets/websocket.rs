//! What a browser (or anyone) sends a `ws:`/`wss:` listener: the upgrade request, then
//! frames. Nothing may panic; an accepted upgrade's response is a 101 naming `sip`; the
//! frames after it, fed in any split, give the same events as fed whole, and no message
//! is longer than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pinhole_sip::websocket::{accept_upgrade, UpgradeError, WsReader};

const MAX: usize = 4096;

fn events(chunks: &[&[u8]]) -> Vec<String> {
    let mut r = WsReader::new(MAX);
    let mut out = Vec::new();
    for c in chunks {
        r.extend(c);
        loop {
            match r.next_event() {
                Ok(Some(e)) => {
                    if let pinhole_sip::websocket::WsEvent::Message(m) = &e {
                        assert!(m.len() <= MAX, "a message over the limit");
                    }
                    out.push(format!("{e:?}"));
                }
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e}"));
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    match accept_upgrade(data, &["https://pbx.example".to_owned()]) {
        Ok((used, response)) => {
            assert!(used <= data.len());
            assert!(response.starts_with(b"HTTP/1.1 101 "));
            assert!(response.windows(28).any(|w| w == b"Sec-WebSocket-Protocol: sip\r"));
        }
        Err(UpgradeError::Refused { response, .. }) => assert!(response.starts_with(b"HTTP/1.1 4")),
        Err(UpgradeError::Incomplete) => {}
    }
    let whole = events(&[data]);
    let bytewise: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(whole, events(&bytewise), "the same events whatever the split");
});
